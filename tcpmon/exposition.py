"""Snapshot -> Prometheus text format 0.0.4 or OpenMetrics 1.0.

The two families that grow with the host (per PID, per comm) are rendered by
the Cython hot path straight from the map bytes; the small ones go through
prometheus-client, which also supplies the process metrics.
"""
from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from prometheus_client import exposition as text_format
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.openmetrics import exposition as openmetrics_format

from tcpmon import __version__, negotiation, probe
from tcpmon._render import render_comm_series, render_pid_series

# Not prometheus-client's CONTENT_TYPE_LATEST: that became text 1.0.0 in 0.22, the body is 0.0.4.
CONTENT_TYPE_TEXT = negotiation.CONTENT_TYPE_TEXT
CONTENT_TYPE_OPENMETRICS = negotiation.openmetrics_type()
_EOF = b"# EOF\n"

PID_FAMILY = "tcp_connects_by_pid"
PID_HELP = "Number of tcp_connect() calls observed per PID"
COMM_FAMILY = "tcpmon_connect_attempts"
COMM_HELP = "TCP connect attempts per process name, kept after the processes exit"

_PROCESS_REGISTRY = CollectorRegistry(auto_describe=False)
ProcessCollector(registry=_PROCESS_REGISTRY)
PlatformCollector(registry=_PROCESS_REGISTRY)
GCCollector(registry=_PROCESS_REGISTRY)


def wants_openmetrics(accept_header):
    return negotiation.choose_format(accept_header).openmetrics


def render(snapshot, openmetrics=False, process_registry=None):
    """The whole /metrics body for one snapshot.  `process_registry` replaces this process's own
    metrics (tcpmon.workers: every worker's, labelled)."""
    generate = openmetrics_format.generate_latest if openmetrics else text_format.generate_latest
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_SnapshotFamilies(snapshot))
    parts = [_pid_family(snapshot.connects), _comm_family(snapshot.comm_totals, openmetrics),
             generate(registry), generate(process_registry or _PROCESS_REGISTRY)]
    body = b"".join(part.replace(_EOF, b"") if openmetrics else part for part in parts)
    return body + _EOF if openmetrics else body


def _pid_family(connects):
    header = f"# HELP {PID_FAMILY} {PID_HELP}\n# TYPE {PID_FAMILY} gauge\n".encode()
    if connects is None:
        return header
    return header + render_pid_series(PID_FAMILY.encode(), connects.keys, connects.values, connects.count)


def _comm_family(comm_totals, openmetrics):
    # OpenMetrics names the counter family without the _total its samples carry.
    family = COMM_FAMILY if openmetrics else COMM_FAMILY + "_total"
    header = f"# HELP {family} {COMM_HELP}\n# TYPE {family} counter\n".encode()
    if comm_totals is None:
        return header
    sample = (COMM_FAMILY + "_total").encode()
    return header + render_comm_series(sample, comm_totals.keys, comm_totals.values, comm_totals.count)


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
        for name, read in ((probe.CONNECTS.name, snap.connects), (probe.COMM_TOTALS.name, snap.comm_totals)):
            if read is not None:
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
        if snap.read_errors is None:
            return   # per worker, from tcpmon.workers
        errors = CounterMetricFamily("tcpmon_map_read_errors", "Failed reads of a pinned map by this worker",
                                     labels=["map"])
        for spec in probe.MAPS:
            errors.add_metric([spec.name], snap.read_errors.get(spec.name, 0))
        yield errors

    def _probe_cost(self, state):
        run_time = CounterMetricFamily("tcpmon_probe_run_time_seconds",
                                       "Kernel time spent in tcpmon's programs", labels=["program"])
        runs = CounterMetricFamily("tcpmon_probe_runs", "Runs of tcpmon's programs", labels=["program"])
        for info in state.programs.values():
            run_time.add_metric([info["name"]], info["run_time_ns"] / 1e9)
            runs.add_metric([info["name"]], info["run_cnt"])
        yield run_time
        yield runs
