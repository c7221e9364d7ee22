"""The Grafana dashboard (charts/tcpmon/dashboards/tcpmon.json): its structure, and every
panel's PromQL, with the variables substituted as Grafana substitutes them, run against a
real Prometheus that has scraped the session's real exporter while a process made real
connects."""
import json
import math
import re
import time
from dataclasses import dataclass

import pytest

from conftest import ROOT, Connector, unique_comm
from metrics import served_names
from tcpmon._render import comm_label
from test_prometheus import Prometheus, promql_string

DASHBOARD = ROOT / "charts" / "tcpmon" / "dashboards" / "tcpmon.json"
BOARD = json.loads(DASHBOARD.read_text())
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
# The `node` target label of the test's Prometheus; the dot is a regex metacharacter,
# which Grafana escapes when it substitutes a value of a multi-value variable.
NODE = "node-1.test"
# The families labelled by who connected, which the namespace and pod variables filter.
ATTRIBUTED = {"tcpmon_connects_total", "tcpmon_connect_duration_seconds_bucket",
              "tcpmon_connect_duration_seconds_sum", "tcpmon_connect_duration_seconds_count"}
# Grafana's default number of points of a panel; $__interval is never below the
# data source's scrape interval (set to Prometheus' own, as the data source docs advise).
MAX_DATA_POINTS = 1000


def _all_panels(board):
    for panel in board["panels"]:
        yield panel
        yield from panel.get("panels", [])  # a collapsed row holds its panels


PANELS = [panel for panel in _all_panels(BOARD) if panel["type"] != "row"]
VARIABLES = {variable["name"]: variable for variable in BOARD["templating"]["list"]}
QUERY_VARIABLES = [v for v in VARIABLES.values() if v["type"] == "query"]


def _families(expr):
    """The metric names an expression selects with {...}."""
    return set(re.findall(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\{", expr))


def _selectors(expr):
    return re.findall(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\{([^}]*)\}", expr)


# --- structure ---

def test_dashboard_is_a_provisionable_current_schema_dashboard():
    assert isinstance(BOARD["schemaVersion"], int) and BOARD["schemaVersion"] >= 36, \
        "schema 36 is where panels refer to data sources by uid"
    assert BOARD["uid"] == "tcpmon-connects" and BOARD["title"]
    assert BOARD["id"] is None, "a provisioned dashboard must not carry a database id"
    assert "__inputs" not in BOARD and "${DS_" not in DASHBOARD.read_text(), \
        "the sidecar does not resolve import inputs: use the datasource variable"


def test_panel_ids_are_unique():
    ids = [panel["id"] for panel in _all_panels(BOARD)]
    assert len(ids) == len(set(ids)), sorted(ids)


def test_panels_fit_the_grid_without_overlapping():
    boxes = [(p["id"], p["gridPos"]) for p in _all_panels(BOARD)]
    for pid, box in boxes:
        assert box["x"] >= 0 and box["x"] + box["w"] <= 24 and box["h"] > 0, pid
    for i, (a, pa) in enumerate(boxes):
        for b, pb in boxes[i + 1:]:
            apart = (pa["x"] + pa["w"] <= pb["x"] or pb["x"] + pb["w"] <= pa["x"]
                     or pa["y"] + pa["h"] <= pb["y"] or pb["y"] + pb["h"] <= pa["y"])
            assert apart, f"panels {a} and {b} overlap"


def test_every_panel_and_query_uses_the_datasource_variable():
    variable = VARIABLES["datasource"]
    assert variable["type"] == "datasource" and variable["query"] == "prometheus"
    for panel in PANELS:
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE, (panel["title"], target["refId"])
    for query_variable in QUERY_VARIABLES:
        assert query_variable["datasource"] == DATASOURCE, query_variable["name"]


def test_template_variables():
    assert list(VARIABLES) == ["datasource", "node", "namespace", "pod"]
    for variable in QUERY_VARIABLES:
        # All must match series without the label too: targets without `node`, processes outside pods
        assert variable["includeAll"] and variable["allValue"] == ".*", variable["name"]
    assert re.fullmatch(r"label_values\(tcpmon_build_info, node\)", VARIABLES["node"]["definition"])


def test_every_selector_filters_by_node_and_the_attribution_by_namespace_and_pod():
    for panel in PANELS:
        for target in panel["targets"]:
            for name, matchers in _selectors(target["expr"]):
                assert 'node=~"$node"' in matchers, (panel["title"], name)
                if name in ATTRIBUTED:
                    assert 'namespace=~"$namespace"' in matchers and 'pod=~"$pod"' in matchers, \
                        (panel["title"], name)


# --- the queries, on a real Prometheus ---

@dataclass
class Stack:
    prometheus: object
    served: set
    label: str       # the comm label of the test's connects
    live_pid: int    # the process still running
    start: float
    end: float


@pytest.fixture(scope="module")
def stack(exporter, tmp_path_factory):
    """A real Prometheus that scraped the session exporter before, between and after two
    processes of one comm made 3+2 and then 5+4 connects (opened + refused); the second
    is alive while the queries run."""
    prometheus = Prometheus(f"127.0.0.1:{exporter.metrics_port}", tmp_path_factory.mktemp("dashboard"),
                            labels={"node": NODE})
    try:
        prometheus.wait_for(f'up{{job="{prometheus.job}"}} == 1')
        start = time.time()
        comm = unique_comm("tcpdash")
        ours = f"{{comm={promql_string(comm_label(comm.encode()))}}}"
        with Connector(comm, opened=3, refused=2):
            prometheus.wait_for(f"tcpmon_connect_attempts_total{ours} == 5")
        with Connector(comm, opened=5, refused=4) as live:
            prometheus.wait_for(f"tcpmon_connect_attempts_total{ours} == 14")
            # outcomes are counted when the handshake ends, a moment after the attempt
            prometheus.wait_for(f"sum(tcpmon_connects_total{ours}) == 14")
            served = served_names(exporter.scrape())
            time.sleep(2 * Prometheus.SCRAPE_INTERVAL)  # a scrape or two after the last connects
            yield Stack(prometheus, served, comm_label(live.comm), live.pid, start, time.time())
    finally:
        assert prometheus.stop() == 0, prometheus.logs()


def _grafana_escape(value):
    """How Grafana's Prometheus data source writes a value of a multi-value variable into a regex matcher."""
    return re.sub(r"[$^*{}\[\]'+?.()|]", r"\\\\\g<0>", value.replace("\\", "\\\\\\\\"))


def _values(stack, node=NODE):
    range_s = stack.end - stack.start
    scrape = Prometheus.SCRAPE_INTERVAL
    interval = max(math.ceil(range_s / MAX_DATA_POINTS), scrape)
    return {"__interval": f"{interval}s", "__interval_ms": str(interval * 1000),
            "__rate_interval": f"{max(interval + scrape, 4 * scrape)}s",
            "__range": f"{round(range_s)}s", "__range_s": str(round(range_s)), "__range_ms": str(round(range_s * 1000)),
            "node": _grafana_escape(node), "namespace": ".*", "pod": ".*"}


def substitute(text, values):
    """$name, ${name} and [[name]] replaced as Grafana does; an unknown variable fails."""
    def value(match):
        name = next(group for group in match.groups() if group)
        assert name in values, f"unknown variable ${name} in {text}"
        return values[name]
    return re.sub(r"\$\{(\w+)\}|\[\[(\w+)\]\]|\$(\w+)", value, text)


def _run(stack, target, values):
    """(labels, [values]) of every series the target returns, as Grafana asks for it."""
    expr = substitute(target["expr"], values)
    if target.get("instant"):
        result = stack.prometheus.api("query", query=expr, time=stack.end)["result"]
        return [(series["metric"], [float(series["value"][1])]) for series in result]
    step = values["__interval"]
    result = stack.prometheus.api("query_range", query=expr, start=stack.start, end=stack.end, step=step)["result"]
    return [(series["metric"], [float(v) for _, v in series["values"]]) for series in result]


def _assert_served(stack, exprs):
    used = {name for expr in exprs for name in _families(expr) if name.startswith("tcp")}
    assert used <= stack.served, f"the dashboard uses metrics the exporter does not serve: {used - stack.served}"


def _series(results, **labels):
    return [values for metric, values in results if labels.items() <= metric.items()]


def _top(results, value_of_ours, **ours):
    """A topk table holds our row, or only rows with more than ours."""
    rows = [(metric, values[0]) for metric, values in results]
    assert len(rows) <= 10
    mine = _series(results, **ours)
    assert mine or all(value >= value_of_ours for _, value in rows), rows
    return mine


# What some panels must show of the test's connects, beyond "not empty".
def _check_attempts_by_comm(stack, results):
    (rates,) = _series(results[0], comm=stack.label)
    assert max(rates) > 0


def _check_top_comms(stack, results):
    for values in _top(results[0], 9, comm=stack.label, node=NODE):
        assert values[0] >= 9  # the second process' connects, all within the range


def _check_top_pids(stack, results):
    for values in _top(results[0], 9, pid=str(stack.live_pid)):
        assert values == [9]


def _check_probe_attached(stack, results):
    assert {values[-1] for values in _series(results[0], node=NODE)} == {1}


def _check_map_fill(stack, results):
    (fill,) = _series(results[0], map="connects")
    assert 0 < fill[-1] <= 1


def _check_scrape_duration(stack, results):
    assert all(0 < values[-1] < 10 for result in results for _, values in result)


def _check_connects_by_pod(stack, results):
    (rates,) = _series(results[0], pod="(no pod)")  # the test's processes are not in a pod
    assert max(rates) > 0


def _check_failures_by_result(stack, results):
    (rates,) = _series(results[0], result="refused")  # 2 + 4 connects to a closed port
    assert max(rates) > 0


CHECKS = {
    "Connect attempts by process name": _check_attempts_by_comm,
    "Top process names in the time range": _check_top_comms,
    "Top live processes": _check_top_pids,
    "Probe attached": _check_probe_attached,
    "Map fill": _check_map_fill,
    "Scrape duration": _check_scrape_duration,
    "Connects by pod": _check_connects_by_pod,
    "Failures by result": _check_failures_by_result,
}


def test_panel_checks_name_real_panels():
    assert set(CHECKS) <= {panel["title"] for panel in PANELS}


@pytest.mark.parametrize("panel", PANELS, ids=[panel["title"] for panel in PANELS])
def test_panel_queries_return_the_data(stack, panel):
    _assert_served(stack, [target["expr"] for target in panel["targets"]])
    results = [_run(stack, target, _values(stack)) for target in panel["targets"]]
    for target, result in zip(panel["targets"], results):
        assert result, f"{panel['title']} {target['refId']} is empty: {substitute(target['expr'], _values(stack))}"
        assert any(math.isfinite(v) for _, values in result for v in values), (panel["title"], target["refId"], result)
    if panel["title"] in CHECKS:
        CHECKS[panel["title"]](stack, results)


@pytest.mark.parametrize("panel", PANELS, ids=[panel["title"] for panel in PANELS])
def test_panel_shows_nothing_for_a_node_that_is_not_there(stack, panel):
    _assert_served(stack, [target["expr"] for target in panel["targets"]])
    for target in panel["targets"]:
        assert _run(stack, target, _values(stack, node="other-node.test")) == [], (panel["title"], target["refId"])


@pytest.mark.parametrize("variable", QUERY_VARIABLES, ids=[v["name"] for v in QUERY_VARIABLES])
def test_variable_query_returns_label_values(stack, variable):
    """label_values(SELECTOR, LABEL), which Grafana asks of /api/v1/label/LABEL/values."""
    definition = substitute(variable["definition"], _values(stack))
    match = re.fullmatch(r"label_values\((.+), (\w+)\)", definition)
    assert match, definition
    _assert_served(stack, [variable["definition"]])
    selector, label = match.groups()
    values = stack.prometheus.api(f"label/{label}/values", **{"match[]": selector},
                                  start=stack.start, end=stack.end)
    if variable["name"] == "node":
        assert values == [NODE]
    # namespace and pod: empty on a host without pods; the query only has to work
