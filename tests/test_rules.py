"""The alert rules: configs/tcpmon.rules.yml is the chart's PrometheusRule, promtool's unit
tests (tests/rules/) pass for each alert and fail when the alert is broken, and a real
Prometheus evaluates the rules on a real exporter's series and fires on a really full map."""
import json
import subprocess
import time

import pytest
import yaml

from conftest import ROOT, Connector, Exporter, unique_comm
from tcpmon import loader

PROMTOOL = "promtool"
RULES = ROOT / "configs" / "tcpmon.rules.yml"
UNIT_TESTS = ROOT / "tests" / "rules" / "tcpmon.rules.test.yml"
RENDER = ROOT / "scripts" / "render-rules.sh"


def _rules(path=RULES):
    return [rule for group in yaml.safe_load(path.read_text())["groups"] for rule in group["rules"]]


ALERTS = [rule["alert"] for rule in _rules()]


def _groups_testing(alert):
    """The unit test groups of tests/rules/ that test `alert` (each tests one alert)."""
    groups = yaml.safe_load(UNIT_TESTS.read_text())["tests"]
    return [g for g in groups if {t["alertname"] for t in g["alert_rule_test"]} == {alert}]


def _firing(groups, fires):
    """The groups with a case where the alert fires (fires=True), or only quiet ones."""
    return [g for g in groups if any(t["exp_alerts"] for t in g["alert_rule_test"]) == fires]


def _promtool_test(tmp_path, groups, rules=RULES):
    unit = yaml.safe_load(UNIT_TESTS.read_text())
    unit.update(rule_files=[str(rules)], tests=groups)
    path = tmp_path / "unit.test.yml"
    path.write_text(yaml.safe_dump(unit))
    return subprocess.run([PROMTOOL, "test", "rules", str(path)], capture_output=True, text=True, timeout=120)


def _rendered(tmp_path, *helm_args):
    """The rules file rendered from the chart with other values (scripts/render-rules.sh --stdout)."""
    result = subprocess.run([str(RENDER), "--stdout", *helm_args], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    path = tmp_path / "rendered.rules.yml"
    path.write_text(result.stdout)
    return path


def _with_expr(tmp_path, alert, expr):
    """A copy of the rules file in which `alert` has another expression."""
    doc = yaml.safe_load(RULES.read_text())
    (rule,) = [r for group in doc["groups"] for r in group["rules"] if r.get("alert") == alert]
    rule["expr"] = expr
    path = tmp_path / "mutant.rules.yml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_rules_file_passes_promtool_check():
    result = subprocess.run([PROMTOOL, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in result.stdout


def test_rules_file_is_what_the_chart_renders():
    result = subprocess.run([str(RENDER), "--check"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_issue_names_every_alert():
    assert set(ALERTS) == {"TcpmonExporterDown", "TcpmonProbeDetached", "TcpmonMapNearlyFull",
                           "TcpmonMapUpdateFailures", "TcpmonConnectFailureRatioHigh", "TcpmonConnectLatencyHigh",
                           "TcpmonConnectStorm"}


@pytest.mark.parametrize("alert", ALERTS)
def test_alert_has_a_firing_and_a_quiet_case(alert):
    cases = [t for g in _groups_testing(alert) for t in g["alert_rule_test"]]
    assert any(t["exp_alerts"] for t in cases), f"no unit test where {alert} fires"
    assert any(not t["exp_alerts"] for t in cases), f"no unit test where {alert} stays quiet"


@pytest.mark.parametrize("alert", ALERTS)
def test_alert_unit_tests_pass(tmp_path, alert):
    result = _promtool_test(tmp_path, _groups_testing(alert))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@pytest.mark.parametrize("alert", ALERTS)
@pytest.mark.parametrize("expr, caught_by", [("vector(1) == 0", True), ("vector(1)", False)],
                         ids=["never-fires", "always-fires"])
def test_alert_unit_tests_fail_on_a_broken_rule(tmp_path, alert, expr, caught_by):
    """The unit tests can fail: an alert that never fires fails its firing case, one that
    fires all the time its quiet case."""
    groups = _firing(_groups_testing(alert), caught_by)
    result = _promtool_test(tmp_path, groups, _with_expr(tmp_path, alert, expr))
    assert result.returncode != 0, f"the unit tests of {alert} pass with expr {expr!r}:\n{result.stdout}"
    assert "FAILED" in result.stdout + result.stderr


# Each quiet case is quiet because of the chart value it names: with that value loosened
# (rendered from the chart, so the value really reaches the rule), the same case fires.
QUIET_BECAUSE_OF = [
    ("TcpmonMapNearlyFull", "prometheusRule.mapFullRatio=0.85"),
    ("TcpmonConnectFailureRatioHigh", "prometheusRule.connectFailureRatio=0.04"),
    ("TcpmonConnectFailureRatioHigh", "prometheusRule.connectMinRate=0"),
    ("TcpmonConnectLatencyHigh", "prometheusRule.connectMinRate=0.01"),
    ("TcpmonConnectLatencyHigh", "prometheusRule.connectLatencyP99Seconds=0.0005"),
    ("TcpmonConnectStorm", "prometheusRule.connectStormMinRate=1"),
]


@pytest.mark.parametrize("alert, value", QUIET_BECAUSE_OF)
def test_quiet_case_fires_with_the_threshold_loosened(tmp_path, alert, value):
    quiet = _firing(_groups_testing(alert), False)
    assert _promtool_test(tmp_path, quiet).returncode == 0
    result = _promtool_test(tmp_path, quiet, _rendered(tmp_path, "--set-json", value))
    output = result.stdout + result.stderr
    assert result.returncode != 0 and f'alertname="{alert}"' in output, \
        f"{alert} stays quiet with {value}: its quiet case does not depend on it\n{output}"


def test_job_name_selects_the_scrape_job(tmp_path):
    rules = _rules(_rendered(tmp_path, "--set", "fullnameOverride=edge-tcpmon"))
    for rule in rules:
        assert 'job="edge-tcpmon"' in rule["expr"] and 'job="tcpmon"' not in rule["expr"], rule["alert"]


# --- a real Prometheus evaluating the rules on a real exporter ---

def _alerts(prometheus):
    return {(a["labels"]["alertname"], a["labels"].get("map")): a["state"]
            for a in prometheus.api("alerts")["alerts"]}


def _wait_for_alert(prometheus, key, state, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _alerts(prometheus).get(key) == state:
            return
        time.sleep(0.25)
    pytest.fail(f"{key} not {state} within {timeout}s: {_alerts(prometheus)}; "
                f"rules: {json.dumps(prometheus.api('rules'))[:3000]}")


def test_real_prometheus_fires_on_a_really_full_map(fresh_pin_dir, tmp_path):
    """A map of one entry: connects of a second process go uncounted, and a real Prometheus
    evaluating configs/tcpmon.rules.yml raises TcpmonMapUpdateFailures at once and has
    TcpmonMapNearlyFull pending (it waits 15 minutes); the exporter and probe alerts stay
    quiet, and every rule evaluates without an error.  (The connect alerts judge the whole
    host's connects, which other tests make too: they may be active or not.)"""
    from test_prometheus import Prometheus
    loader.load(fresh_pin_dir, max_pids=1)
    exporter = Exporter(fresh_pin_dir)
    prometheus = None
    try:
        prometheus = Prometheus(f"127.0.0.1:{exporter.metrics_port}", tmp_path, job="tcpmon",
                                labels={"node": "rules-test"}, rule_files=[RULES])
        before = prometheus.wait_for('tcpmon_map_update_failures_total{map="connects"}')
        comm = unique_comm()
        procs = [Connector(comm, opened=1) for _ in range(3)]
        try:
            prometheus.wait_for(f'tcpmon_map_update_failures_total{{map="connects"}} > {before[0]["value"][1]}')
            _wait_for_alert(prometheus, ("TcpmonMapUpdateFailures", "connects"), "firing")
            _wait_for_alert(prometheus, ("TcpmonMapNearlyFull", "connects"), "pending")
        finally:
            for proc in procs:
                proc.close()
        active = {name for name, _ in _alerts(prometheus)}
        assert not active & {"TcpmonExporterDown", "TcpmonProbeDetached"}, _alerts(prometheus)
        rules = [r for g in prometheus.api("rules")["groups"] for r in g["rules"]]
        assert sorted(r["name"] for r in rules) == sorted(ALERTS)
        assert all(r["health"] == "ok" and not r.get("lastError") for r in rules), rules
    finally:
        if prometheus:
            assert prometheus.stop() == 0, prometheus.logs()
        exporter.stop()
