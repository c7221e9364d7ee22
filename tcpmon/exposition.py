"""Snapshot -> Prometheus text format 0.0.4 or OpenMetrics 1.0.

The families that grow with the host are rendered by the Cython hot path
straight from the map bytes: per PID, per comm, and the outcome families,
whose entries are summed per label set (Python only works out each key's label
text, once).  The small families and this process's metrics (read by the
collector, tcpmon.processmetrics) are Family tuples that tcpmon.textformat
writes; prometheus-client writes them for OpenMetrics.
"""
import array
import operator

from prometheus_client import CollectorRegistry
from prometheus_client.openmetrics import exposition as openmetrics_format
from prometheus_client.utils import floatToGoString

from tcpmon import __version__, maps, negotiation, textformat
from tcpmon._render import (comm_label, render_comm_series, render_grouped_counters, render_outcomes,
                            render_pid_series)
from tcpmon.attribution import Attributor, Config
from tcpmon.attribution.metrics import families as attribution_families
from tcpmon.collector import SCRAPED
from tcpmon.destinations import remote_of
from tcpmon.escaping import label_text
from tcpmon.textformat import Family

# Not prometheus-client's CONTENT_TYPE_LATEST: that became text 1.0.0 in 0.22, the body is 0.0.4.
CONTENT_TYPE_TEXT = negotiation.CONTENT_TYPE_TEXT
CONTENT_TYPE_OPENMETRICS = negotiation.openmetrics_type()
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



def wants_openmetrics(accept_header):
    return negotiation.choose_format(accept_header).openmetrics


class Renderer:
    """Renders snapshots for one worker, with `attribution` (an attribution.Attributor) labelling
    and capping the outcome and destination families; remembers the label text it built."""

    MAX_REMEMBERED = 1 << 16

    def __init__(self, attribution=None, networks=()):
        self.attribution = attribution or Attributor(Config(labels=()))
        self.networks = networks
        self._key_labels = {}   # (map name, raw key without its cgroup id) -> (comm label, *trailing labels)
        self._texts = {}        # label names and values -> label text
        self._shown = {}        # attribution label values -> the same in comm_label's notation
        self._grouping = {}     # (map name, families) -> (what the grouping depends on, the grouping)

    def render(self, snapshot, openmetrics=False, process_registry=None):
        """The whole /metrics body for one snapshot, as one bytes object."""
        return b"".join(self.render_parts(snapshot, openmetrics, process_registry))

    def render_parts(self, snapshot, openmetrics=False, process_registry=None, grouped=None):
        """The /metrics body for one snapshot as a list of bytes to be sent in turn (joining a
        100k-PID body would copy 5 MB once more).  `process_registry` replaces this process's
        own metrics (tcpmon.workers: every worker's, labelled); `grouped`: grouped_parts() of
        this snapshot in this format, made earlier.  Not thread-safe: one call at a time."""
        if grouped is None:
            grouped = self.grouped_parts(snapshot, openmetrics)
        pid_and_comm = _pid_and_comm_families(snapshot, openmetrics)
        # After the capped families: the small ones report what their caps folded.
        small = _small_families(_SnapshotFamilies(snapshot, self.attribution), openmetrics)
        return pid_and_comm + grouped + small + _process_families(snapshot.process, openmetrics, process_registry)

    def grouped_parts(self, snapshot, openmetrics=False):
        """The families summed per label set (outcomes and destinations), which need only those
        two maps of `snapshot`: a scrape makes them while the connects map is still being read.
        Not thread-safe: one call at a time, and not beside render_parts."""
        for cache in (self._key_labels, self._texts, self._shown):
            if len(cache) > self.MAX_REMEMBERED:
                cache.clear()
        view = self.attribution.view(self._cgroup_ids(snapshot))
        return [*self._outcome_families(snapshot, view, openmetrics),
                *self._destination_family(snapshot, view, openmetrics)]

    @staticmethod
    def _cgroup_ids(snapshot):
        ids = set()
        for spec in (maps.OUTCOMES, maps.DESTINATIONS):
            read = snapshot.reads.get(spec.name)
            if read is not None and read.count:
                words = memoryview(read.keys).cast("Q")   # cgroup_id is each key's first u64
                ids.update(words[::spec.key_size // 8][:read.count])
        return ids

    def _labels_of_key(self, spec, raw, trailing):
        """(comm label, *trailing(key)) of a raw key, worked out once per key."""
        cached = self._key_labels.get((spec.name, raw[8:]))
        if cached is None:
            key = spec.key.unpack(raw)
            cached = (comm_label(key["comm"]),) + trailing(key)
            self._key_labels[(spec.name, raw[8:])] = cached
        return cached

    def _text(self, names, labels):
        text = self._texts.get((names, labels))
        if text is None:
            text = self._texts[(names, labels)] = _labels(names, labels).encode()
        return text

    def _groups(self, spec, read, view, families, trailing_names=(), trailing=lambda key: ()):
        """(the group of each entry, the label text of each group): entries with the same labels
        are one group; label sets beyond the attribution's cap are folded into one ~other group;
        entries of cgroups that are gone are in none (-1).

        The grouping depends only on the keys and their cgroups' labels, which change when a new
        (cgroup, comm) connects or a cgroup goes, not with the counts: while both stay as they
        were, the last scrape's grouping is reused.  That is exact, the cap included: capping the
        same rows again folds the same label sets, which adds nothing to the folded counters."""
        keys = bytes(memoryview(read.keys)[:read.count * spec.key_size])
        ids = sorted(set(memoryview(keys).cast("Q")[::spec.key_size // 8])) if keys else []
        memo_key = (keys, view.label_names, tuple(view.labels(cgroup_id) for cgroup_id in ids))
        memo = self._grouping.get((spec.name, families))
        if memo is not None and memo[0] == memo_key:
            return memo[1]
        result = self._group(spec, read, view, families, trailing_names, trailing)
        self._grouping[(spec.name, families)] = (memo_key, result)
        return result

    def _group(self, spec, read, view, families, trailing_names, trailing):
        size, keys = spec.key_size, read.keys
        groups_of, ages = {}, []
        raw_groups = array.array("i", [-1]) * read.count
        for i in range(read.count):
            raw = keys[i * size:(i + 1) * size]
            cgroup_id = int.from_bytes(raw[:8], "little")
            who = view.labels(cgroup_id)
            if who is None:
                continue
            comm, *rest = self._labels_of_key(spec, raw, trailing)
            shown = self._shown.get(who)
            if shown is None:
                shown = self._shown[who] = tuple(label_text(value) for value in who)
            labels = (comm, *shown, *rest)
            group = groups_of.get(labels)
            if group is None:
                group = groups_of[labels] = len(ages)
                ages.append(cgroup_id)
            elif cgroup_id < ages[group]:
                ages[group] = cgroup_id
            raw_groups[i] = group
        rows = [(labels, [group], ages[group]) for labels, group in groups_of.items()]
        for family in families:
            kept, _ = self.attribution.cap(family, rows, add=operator.add)
        final = array.array("i", [-1]) * len(ages)
        names = ("comm", *view.label_names, *trailing_names)
        texts = []
        for position, (labels, members) in enumerate(kept):
            for group in members:
                final[group] = position
            texts.append(self._text(names, labels))
        return array.array("i", (final[g] if g >= 0 else -1 for g in raw_groups)), texts

    def _outcome_families(self, snapshot, view, openmetrics):
        head = _header(OUTCOME_FAMILY, "counter", OUTCOME_HELP, openmetrics).encode()
        head_latency = _header(LATENCY_FAMILY, "histogram", LATENCY_HELP, openmetrics).encode()
        read = snapshot.reads.get(maps.OUTCOMES.name)
        if read is None:
            return head, head_latency
        groups, labels = self._groups(maps.OUTCOMES, read, view,
                                      (f"{OUTCOME_FAMILY}_total", LATENCY_FAMILY))
        counters, histogram = render_outcomes(OUTCOME_FAMILY.encode(), LATENCY_FAMILY.encode(), _RESULT_TEXT,
                                              _BOUND_TEXT, read.values, read.count, groups, labels)
        return head, counters, head_latency, histogram

    def _destination_family(self, snapshot, view, openmetrics):
        read = snapshot.reads.get(maps.DESTINATIONS.name)
        if read is None or read.max_entries <= 1:  # not counted: tcpmon load --destinations turns it on
            return ()

        def where(key):
            return (maps.RESULTS[key["result"]], str(key["port"]), remote_of(key, self.networks))
        groups, labels = self._groups(maps.DESTINATIONS, read, view, (f"{DESTINATION_FAMILY}_total",),
                                      ("result", "remote_port", "remote"), where)
        head = _header(DESTINATION_FAMILY, "counter", DESTINATION_HELP, openmetrics).encode()
        return head, render_grouped_counters(f"{DESTINATION_FAMILY}_total".encode(), read.values,
                                             read.value_stride, read.count, groups, labels)


_RESULT_TEXT = [result.encode() for result in maps.RESULTS]
_BOUND_TEXT = [bound.encode() for bound in LATENCY_BOUNDS]
_DEFAULT = Renderer()


def render(snapshot, openmetrics=False, process_registry=None):
    """The /metrics body with comm-only outcome labels and no network names."""
    return _DEFAULT.render(snapshot, openmetrics, process_registry)


def _header(family, kind, help_text, openmetrics):
    # OpenMetrics names a counter family without the _total its samples carry.
    name = family if openmetrics or kind != "counter" else family + "_total"
    return f"# HELP {name} {help_text}\n# TYPE {name} {kind}\n"


def _small_families(small, openmetrics):
    if openmetrics:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(textformat.ClientCollector(small.families))
        return [openmetrics_format.generate_latest(registry).replace(_EOF, b"")]
    return ["".join(textformat.write(small.families(), [])).encode()]


def _process_families(families, openmetrics, process_registry):
    """This process's metrics (`families`, or `process_registry`'s: every worker's), and the end
    of the body."""
    if openmetrics:
        process = process_registry or textformat.ClientCollector(lambda: families)
        return [openmetrics_format.generate_latest(process).replace(_EOF, b""), _EOF]
    if process_registry is None:
        return ["".join(textformat.write(families, [])).encode()]
    return [textformat.generate(process_registry)]


def _pid_and_comm_families(snapshot, openmetrics):
    """The families of the per-PID and per-comm maps: the big ones, written outside the GIL."""
    return [*_pid_family(snapshot.connects), *_comm_family(snapshot.comm_totals, openmetrics)]


def _pid_family(connects):
    header = _header(PID_FAMILY, "gauge", PID_HELP, False).encode()
    if connects is None:
        return (header,)
    return header, render_pid_series(PID_FAMILY.encode(), connects.keys, connects.values, connects.count)


def _comm_family(comm_totals, openmetrics):
    header = _header(COMM_FAMILY, "counter", COMM_HELP, openmetrics).encode()
    if comm_totals is None:
        return (header,)
    sample = (COMM_FAMILY + "_total").encode()
    return header, render_comm_series(sample, comm_totals.keys, comm_totals.values, comm_totals.count)


def escape(value):
    """A label value as the text formats write it."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(names, values):
    """The label text; an empty attribution label is left out (to Prometheus an empty label is
    no label, and at 10k PIDs the empty ones were an eighth of the body).  comm always shows."""
    return ",".join(f'{name}="{escape(value)}"' for name, value in zip(names, values)
                    if value or name == "comm")


class _SnapshotFamilies:
    """The small families of one snapshot, as Family tuples."""

    def __init__(self, snapshot, attribution):
        self.snapshot = snapshot
        self.attribution = attribution

    def families(self):
        snap = self.snapshot
        yield from self._maps(snap)
        yield from attribution_families(self.attribution.stats(), [f"{OUTCOME_FAMILY}_total", LATENCY_FAMILY])
        mode = (snap.probe_state.mode if snap.probe_state else None) or "none"
        attached = 1 if snap.probe_state and snap.probe_state.attached else 0
        yield Family("tcpmon_probe_attached", "gauge", "1 while tcpmon's connect probe is attached", ("mode",),
                     [((mode,), attached)])
        yield Family("tcpmon_build", "info", "tcpmon version and the attach mode in use",
                     ("version", "attach_mode"), [((__version__, mode), 1)])
        yield Family("tcpmon_scrape_duration_seconds", "gauge", "Time this scrape spent reading the pinned maps",
                     (), [((), snap.duration)])
        yield Family("tcpmon_bpf_stats_enabled", "gauge",
                     "1 when kernel.bpf_stats_enabled=1 makes probe run time visible", (),
                     [((), int(snap.bpf_stats_enabled))])
        if snap.probe_state:
            yield self._probe_misses(snap.probe_state)
        if snap.bpf_stats_enabled and snap.probe_state:
            yield from self._probe_cost(snap.probe_state)

    @staticmethod
    def _maps(snap):
        by_map = ("map",)
        yield Family("tcpmon_map_entries", "gauge", "Entries in a pinned map", by_map,
                     [((name,), read.count) for name, read in snap.reads.items()])
        yield Family("tcpmon_map_max_entries", "gauge", "Capacity of a pinned map", by_map,
                     [((name,), read.max_entries) for name, read in snap.reads.items()])
        yield Family("tcpmon_map_update_failures", "counter",
                     "Connects the probe could not count because a map was full", by_map,
                     [((name,), count) for name, count in (snap.update_failures or {}).items()])
        if snap.read_errors is None:
            return   # these two per worker, from tcpmon.workers
        yield Family("tcpmon_map_read_errors", "counter", "Failed reads of a pinned map by this worker", by_map,
                     [((spec.name,), snap.read_errors.get(spec.name, 0)) for spec in SCRAPED])
        yield Family("tcpmon_map_read_truncated", "counter",
                     "Reads of a pinned map by this worker that stopped before its end "
                     "(it changed faster than it was read)", by_map,
                     [((spec.name,), snap.read_truncations.get(spec.name, 0)) for spec in SCRAPED])

    @staticmethod
    def _probe_cost(state):
        programs = state.programs.values()
        yield Family("tcpmon_probe_run_time_seconds", "counter", "Kernel time spent in tcpmon's programs",
                     ("program",), [((info["name"],), info["run_time_ns"] / 1e9) for info in programs])
        yield Family("tcpmon_probe_runs", "counter", "Runs of tcpmon's programs", ("program",),
                     [((info["name"],), info["run_cnt"]) for info in programs])

    @staticmethod
    def _probe_misses(state):
        # Counted whatever bpf_stats says (5.12+): an event that fired while the same program ran
        # on that CPU (a softirq over a process-context run) was not seen, so its count is missing.
        return Family("tcpmon_probe_missed_runs", "counter",
                      "Events the kernel did not pass to tcpmon's programs because the "
                      "program was already running on that CPU", ("program",),
                      [((info["name"],), info.get("recursion_misses", 0)) for info in state.programs.values()])
