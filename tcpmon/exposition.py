"""Snapshot -> Prometheus text format 0.0.4 or OpenMetrics 1.0.

The two families that grow with the host (per PID, per comm) are rendered by
the Cython hot path straight from the map bytes; the outcome families are
summed per label set here; the small ones go through prometheus-client, which
also supplies the process metrics.
"""
from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from prometheus_client import exposition as text_format
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.openmetrics import exposition as openmetrics_format
from prometheus_client.utils import floatToGoString

from tcpmon import __version__, maps
from tcpmon._render import comm_label, render_comm_series, render_pid_series
from tcpmon.collector import SCRAPED
from tcpmon.destinations import remote_of

CONTENT_TYPE_TEXT = text_format.CONTENT_TYPE_LATEST
CONTENT_TYPE_OPENMETRICS = openmetrics_format.CONTENT_TYPE_LATEST
_EOF = b"# EOF\n"

PID_FAMILY = "tcp_connects_by_pid"
PID_HELP = "Number of tcp_connect() calls observed per PID"
COMM_FAMILY = "tcpmon_connect_attempts"
COMM_HELP = "TCP connect attempts per process name, kept after the processes exit"
OUTCOME_FAMILY = "tcpmon_connects"
OUTCOME_HELP = "TCP connects by how the handshake ended (counted when it ends)"
LATENCY_FAMILY = "tcpmon_connect_duration_seconds"
LATENCY_HELP = "Time from connect() to the established connection, successful connects only"
DESTINATION_FAMILY = "tcpmon_connect_destinations"
DESTINATION_HELP = "TCP connects by remote address (or configured network name) and port"

# The le bound of each latency slot but the last: slot i holds [2^i, 2^(i+1)) microseconds.
LATENCY_BOUNDS = tuple(floatToGoString(2 ** (slot + 1) / 1e6) for slot in range(maps.LATENCY_SLOTS - 1))



class _NoAttribution:
    """Outcome families labelled by comm alone."""
    label_names = ()

    @staticmethod
    def labels(cgroup_id):
        return ()


NO_ATTRIBUTION = _NoAttribution()

_PROCESS_REGISTRY = CollectorRegistry(auto_describe=False)
ProcessCollector(registry=_PROCESS_REGISTRY)
PlatformCollector(registry=_PROCESS_REGISTRY)
GCCollector(registry=_PROCESS_REGISTRY)


def wants_openmetrics(accept_header):
    return "application/openmetrics-text" in (accept_header or "")


def render(snapshot, openmetrics=False, attribution=NO_ATTRIBUTION, networks=()):
    """The whole /metrics body for one snapshot."""
    generate = openmetrics_format.generate_latest if openmetrics else text_format.generate_latest
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_SnapshotFamilies(snapshot))
    parts = [_pid_family(snapshot.connects), _comm_family(snapshot.comm_totals, openmetrics),
             _outcome_families(snapshot, attribution, openmetrics),
             _destination_family(snapshot, attribution, networks, openmetrics),
             generate(registry), generate(_PROCESS_REGISTRY)]
    body = b"".join(part.replace(_EOF, b"") if openmetrics else part for part in parts)
    return body + _EOF if openmetrics else body


def _header(family, kind, help_text, openmetrics):
    # OpenMetrics names a counter family without the _total its samples carry.
    name = family if openmetrics or kind != "counter" else family + "_total"
    return f"# HELP {name} {help_text}\n# TYPE {name} {kind}\n"


def _pid_family(connects):
    header = _header(PID_FAMILY, "gauge", PID_HELP, False).encode()
    if connects is None:
        return header
    return header + render_pid_series(PID_FAMILY.encode(), connects.keys, connects.values, connects.count)


def _comm_family(comm_totals, openmetrics):
    header = _header(COMM_FAMILY, "counter", COMM_HELP, openmetrics).encode()
    if comm_totals is None:
        return header
    sample = (COMM_FAMILY + "_total").encode()
    return header + render_comm_series(sample, comm_totals.keys, comm_totals.values, comm_totals.count)


def escape(value):
    """A label value as the text formats write it."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(names, values):
    return ",".join(f'{name}="{escape(value)}"' for name, value in zip(names, values))


def _sum_by_labels(snapshot, spec, attribution, label_of):
    """{label values: summed value dict} over `spec`'s entries; entries of cgroups that
    are gone are left out (attribution.labels gives None)."""
    rows = {}
    for key, value in snapshot.entries(spec):
        who = attribution.labels(key["cgroup_id"])
        if who is None:
            continue
        labels = (comm_label(key["comm"]),) + who + label_of(key)
        total = rows.get(labels)
        rows[labels] = value if total is None else _add(total, value)
    return rows


def _add(a, b):
    return {name: tuple(x + y for x, y in zip(a[name], b[name])) if isinstance(a[name], tuple)
            else a[name] + b[name] for name in a}


def _outcome_families(snapshot, attribution, openmetrics):
    names = ("comm",) + attribution.label_names
    rows = _sum_by_labels(snapshot, maps.OUTCOMES, attribution, lambda key: ())
    outcomes = [_header(OUTCOME_FAMILY, "counter", OUTCOME_HELP, openmetrics)]
    latency = [_header(LATENCY_FAMILY, "histogram", LATENCY_HELP, openmetrics)]
    for labels, value in sorted(rows.items()):
        text = _labels(names, labels)
        for result, count in zip(maps.RESULTS, value["results"]):
            outcomes.append(f'{OUTCOME_FAMILY}_total{{{text},result="{result}"}} {count}\n')
        cumulative = 0
        for bound, count in zip(LATENCY_BOUNDS, value["latency"]):
            cumulative += count
            latency.append(f'{LATENCY_FAMILY}_bucket{{{text},le="{bound}"}} {cumulative}\n')
        successes = value["results"][0]
        latency.append(f'{LATENCY_FAMILY}_bucket{{{text},le="+Inf"}} {successes}\n'
                       f'{LATENCY_FAMILY}_sum{{{text}}} {floatToGoString(value["duration_ns"] / 1e9)}\n'
                       f'{LATENCY_FAMILY}_count{{{text}}} {successes}\n')
    return "".join(outcomes + latency).encode()


def _destination_family(snapshot, attribution, networks, openmetrics):
    read = snapshot.reads.get(maps.DESTINATIONS.name)
    if read is None or read.max_entries <= 1:  # not counted: tcpmon load --destinations turns it on
        return b""
    names = ("comm",) + attribution.label_names + ("result", "remote_port", "remote")

    def where(key):
        return (maps.RESULTS[key["result"]], str(key["port"]), remote_of(key, networks))
    rows = _sum_by_labels(snapshot, maps.DESTINATIONS, attribution, where)
    lines = [_header(DESTINATION_FAMILY, "counter", DESTINATION_HELP, openmetrics)]
    for labels, value in sorted(rows.items()):
        lines.append(f"{DESTINATION_FAMILY}_total{{{_labels(names, labels)}}} {value['count']}\n")
    return "".join(lines).encode()


class _SnapshotFamilies:
    """The small families of one snapshot, for prometheus-client to render."""

    def __init__(self, snapshot):
        self.snapshot = snapshot

    def collect(self):
        snap = self.snapshot
        yield from self._maps(snap)
        mode = snap.probe_state.mode if snap.probe_state else None
        attached = GaugeMetricFamily("tcpmon_probe_attached", "1 while tcpmon's connect probe is attached",
                                     labels=["mode"])
        attached.add_metric([mode or "none"], 1 if snap.probe_state and snap.probe_state.attached else 0)
        yield attached
        yield InfoMetricFamily("tcpmon_build", "tcpmon version and the attach mode in use",
                               value={"version": __version__, "attach_mode": mode or "none"})
        yield GaugeMetricFamily("tcpmon_scrape_duration_seconds",
                                "Time this scrape spent reading the pinned maps", value=snap.duration)
        yield GaugeMetricFamily("tcpmon_bpf_stats_enabled",
                                "1 when kernel.bpf_stats_enabled=1 makes probe run time visible",
                                value=int(snap.bpf_stats_enabled))
        if snap.bpf_stats_enabled and snap.probe_state:
            yield from self._probe_cost(snap.probe_state)

    def _maps(self, snap):
        entries = GaugeMetricFamily("tcpmon_map_entries", "Entries in a pinned map", labels=["map"])
        capacity = GaugeMetricFamily("tcpmon_map_max_entries", "Capacity of a pinned map", labels=["map"])
        for name, read in snap.reads.items():
            entries.add_metric([name], read.count)
            capacity.add_metric([name], read.max_entries)
        yield entries
        yield capacity
        failures = CounterMetricFamily("tcpmon_map_update_failures",
                                       "Connects the probe could not count because a map was full",
                                       labels=["map"])
        for name, count in (snap.update_failures or {}).items():
            failures.add_metric([name], count)
        yield failures
        errors = CounterMetricFamily("tcpmon_map_read_errors", "Failed reads of a pinned map by this worker",
                                     labels=["map"])
        for spec in SCRAPED:
            errors.add_metric([spec.name], snap.read_errors.get(spec.name, 0))
        yield errors
        truncated = CounterMetricFamily("tcpmon_map_read_truncated",
                                        "Reads of a pinned map by this worker that stopped before its end "
                                        "(it changed faster than it was read)", labels=["map"])
        for spec in SCRAPED:
            truncated.add_metric([spec.name], snap.read_truncations.get(spec.name, 0))
        yield truncated

    def _probe_cost(self, state):
        run_time = CounterMetricFamily("tcpmon_probe_run_time_seconds",
                                       "Kernel time spent in tcpmon's programs", labels=["program"])
        runs = CounterMetricFamily("tcpmon_probe_runs", "Runs of tcpmon's programs", labels=["program"])
        for info in state.programs.values():
            run_time.add_metric([info["name"]], info["run_time_ns"] / 1e9)
            runs.add_metric([info["name"]], info["run_cnt"])
        yield run_time
        yield runs
