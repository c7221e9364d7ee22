"""`tcpmon top`, the model: reads of the pinned maps, rates, quantiles, sorting and filtering.

Everything here is pure except `read_sample`, the one function that touches the
maps (through the read-only reader the exporter uses) and the cgroup tree
(through the exporter's Attributor), and `two_reads` and `main`, which drive
it.  The view lives apart: `top_text` lays a Frame out as lines that fit a
terminal (shared by `--once` and the screen), `top_screen` draws them with
curses and turns keys into sort and filter.

A table is a `Table`: its key fields, its monotonic counters (each gets a
`<counter>_rate` field) and its columns.  A read gives each table's members,
the map entries, each with the row it belongs to: for processes and names a
member is its row; for outcomes a member is one (cgroup id, comm) entry and its
row is (pod or unit, comm), so the cgroups of one workload are summed.

Rates are the members' increases between two reads, summed per row, over the
time between the reads.  A member's increase is known when it was in both reads
and no counter went down, or (outcomes only) when it is new: the kernel creates
a (cgroup, comm) entry at its first connect and never deletes one, so a new
entry counted from zero within the interval.  A per-PID entry keeps its count
across an exec, so a new (pid, comm) has no rate until it is seen twice.  A
row with any member whose increase is unknown (a counter went down; a map
created anew, seen by its map id) has no rate for that interval, never a
negative one.  A member whose cgroup is gone, or too new to be found yet, is in
no row: rows of removed cgroups disappear.
"""
import codecs
import contextlib
import json
import shutil
import sys
import time
from dataclasses import dataclass, replace

from tcpmon import maps, top_text
from tcpmon.attribution import Attributor, Config
from tcpmon.dumping import readable
from tcpmon.escaping import label_text
from tcpmon.errors import TcpmonError
from tcpmon.pins import Pins

SORT_KEYS = ("rate", "total", "failures", "p99", "pid", "comm")
FAILURES = tuple(result for result in maps.RESULTS if result != "success")
# The `le` bounds of tcpmon_connect_duration_seconds (exposition.LATENCY_BOUNDS) as numbers:
# slot i holds [2^i, 2^(i+1)) microseconds, slot 0 from 0, the last slot has no bound (+Inf).
LATENCY_BOUNDS = tuple(2 ** (slot + 1) / 1e6 for slot in range(maps.LATENCY_SLOTS - 1))
SHORT_ID = 12   # hex digits of a container id shown, as `docker ps` shows them


@dataclass(frozen=True)
class Column:
    field: str        # the row field it shows
    title: str
    width: int        # the least it needs; a `flex` column also takes what is left
    kind: str         # how top_text formats it: pid, count, rate, percent, seconds, name
    flex: bool = False
    drop: int = 0     # on a narrow terminal the highest `drop` goes first; 0 stays


PID = Column("pid", "PID", 7, "pid")
RATE = Column("connects_rate", "CONN/S", 8, "rate")
TOTAL = Column("connects", "TOTAL", 10, "count", drop=1)
COMM = Column("comm", "COMM", 8, "name", flex=True)

RESULT_TITLES = {"refused": "REF/S", "timeout": "TMO/S", "unreachable": "UNR/S", "aborted": "ABT/S",
                 "other": "OTH/S"}
RESULT_COLUMNS = tuple(Column(f"{result}_rate", RESULT_TITLES[result], 6, "rate") for result in FAILURES)
# What a narrow terminal cuts first: the smaller failure classes (the smallest first),
# then p50, then the biggest class, then the failure ratio (see `arranged`).
FIRST_RESULT_DROP, P50_DROP, BIGGEST_RESULT_DROP = 5, 4, 3
OUTCOME_COLUMNS = (Column("attempts_rate", "CONN/S", 6, "rate"), Column("failures_rate", "FAIL/S", 6, "rate"),
                   Column("failure_ratio", "FAIL%", 5, "percent", drop=2), *RESULT_COLUMNS,
                   Column("p50_seconds", "P50", 5, "seconds", drop=P50_DROP),
                   Column("p99_seconds", "P99", 5, "seconds"),
                   Column("pod_or_unit", "POD/UNIT", 16, "name", flex=True),
                   Column("comm", "COMM", maps.COMM_LEN - 1, "name"))   # a comm in full, escapes aside


@dataclass(frozen=True)
class Table:
    name: str         # its key in JSON and in Sample.tables
    title: str        # what the screen calls it
    map: str          # the map its rows come from (a new map id restarts the rates)
    key: tuple        # the fields that identify a row
    counters: tuple   # monotonic counters; each gets a "<counter>_rate" field (per second)
    columns: tuple
    sort_fields: dict  # --sort key -> row field ("rate" and "total" at least); others sort by rate
    names: tuple = ("comm",)   # the fields the filter looks in
    histogram: str = None      # a monotonic vector (latency slots): its increase goes to `derive`
    new_from_zero: bool = False  # a member new since the last read counted from zero
    derive: object = None      # (increase or None, members) -> more fields of a row
    ranked: tuple = ()         # columns that narrow terminals cut in the order of their rows' sums
    gap: int = top_text.GAP    # blank columns between two columns


def outcome_fields(increase, members):
    """A row's failure ratio and latency quantiles over the interval (None where the interval
    had no connect that ended, or no success), and how many cgroups it sums."""
    ended = sum(increase[result] for result in maps.RESULTS) if increase else 0
    latency = increase["latency"] if increase else ()
    return {"failure_ratio": increase["failures"] / ended if ended else None,
            "p50_seconds": quantile(0.5, latency), "p99_seconds": quantile(0.99, latency),
            "cgroups": members}


PROCESSES = Table("processes", "processes", maps.CONNECTS.name, ("pid", "comm"), ("connects",),
                  (PID, RATE, TOTAL, COMM),
                  {"rate": "connects_rate", "total": "connects", "pid": "pid", "comm": "comm"})
OUTCOMES = Table("outcomes", "outcomes", maps.OUTCOMES.name, ("pod_or_unit", "comm"),
                 ("attempts", *maps.RESULTS, "failures"), OUTCOME_COLUMNS,
                 {"rate": "attempts_rate", "total": "attempts", "failures": "failures_rate", "p99": "p99_seconds",
                  "comm": "comm"},
                 names=("pod_or_unit", "comm"), histogram="latency", new_from_zero=True, derive=outcome_fields,
                 ranked=RESULT_COLUMNS, gap=1)
NAMES = Table("names", "names, exited processes included", maps.COMM_TOTALS.name, ("comm",),
              ("connects",), (RATE, TOTAL, COMM),
              {"rate": "connects_rate", "total": "connects", "comm": "comm"})
TABLES = (PROCESSES, OUTCOMES, NAMES)


def quantile(q, slots):
    """The q-quantile (0 < q <= 1) of the latencies counted in `slots` (counts per latency slot),
    in seconds, as Prometheus' histogram_quantile() estimates it from tcpmon_connect_duration_
    seconds: find the slot where the rank q * count falls and interpolate linearly inside it
    (from 0 in the first slot); in the last slot, which has no upper bound, its lower bound.
    None when nothing was counted.  The same operations in the same order, so the same float."""
    observations = sum(slots)
    if observations == 0:
        return None
    rank = q * observations
    below = 0
    for slot, upper in enumerate(LATENCY_BOUNDS):
        if below + slots[slot] >= rank:
            lower = LATENCY_BOUNDS[slot - 1] if slot else 0.0
            return lower + (upper - lower) * ((rank - below) / slots[slot])
        below += slots[slot]
    return LATENCY_BOUNDS[-1]


def pod_or_unit(labels):
    """What an operator calls the workload of a cgroup's labels ({name: value}): namespace/pod
    when the names are known, else the pod uid, else the container id (short), else the unit,
    else '' (a process outside pods, containers and units, or no labels asked for)."""
    if labels.get("pod"):
        return "/".join(part for part in (labels.get("namespace"), labels["pod"]) if part)
    if labels.get("pod_uid"):
        return labels["pod_uid"]
    if labels.get("container_id"):
        return labels["container_id"][:SHORT_ID]
    return labels.get("unit", "")


@dataclass(frozen=True)
class MapFill:
    map_id: int       # a new id means the map was created anew: its counts restarted
    entries: int
    max_entries: int


@dataclass(frozen=True)
class Sample:
    """One read: per table, member -> (its row key, or None for no row; {counter: value});
    the fill of each map read; the attribution labels asked for and why there are none."""
    taken: float      # time.monotonic() just before the read
    tables: dict
    maps: dict        # map name -> MapFill
    labels: tuple = ()
    attribution_problem: str = None


NO_LABELS = Attributor(Config(labels=()))


def read_sample(pin_dir, attributor=NO_LABELS):
    """One read of the maps top shows, cgroups labelled by `attributor`.  The only code here
    that touches them: re-point it when the maps change."""
    pins = Pins(pin_dir)
    taken = time.monotonic()
    (pids, pid_fill), (comms, comm_fill), (outcomes, outcome_fill) = _read(
        pins, (maps.CONNECTS, maps.COMM_TOTALS, maps.OUTCOMES))
    view = attributor.view(entry["cgroup_id"] for entry in outcomes)
    return Sample(taken,
                  {PROCESSES.name: {(e["tgid"], e["comm"]): ((e["tgid"], e["comm"]), {"connects": e["connects"]})
                                    for e in pids},
                   OUTCOMES.name: {(e["cgroup_id"], e["comm"]): (_workload(view, e), _outcome_values(e))
                                   for e in outcomes},
                   NAMES.name: {(e["comm"],): ((e["comm"],), {"connects": e["count"]}) for e in comms}},
                  {maps.CONNECTS.name: pid_fill, maps.COMM_TOTALS.name: comm_fill, maps.OUTCOMES.name: outcome_fill},
                  view.label_names, attributor.problem)


def _read(pins, specs):
    """[(entries, fill)] of one read of each map of `specs`, the entries as `tcpmon dump` decodes
    them (comms as their labels).  Every map is read before any is decoded, so that the reads
    are as close in time as they can be (a connect between two of them shows in one only)."""
    with contextlib.ExitStack() as opened:
        bpf_maps = [opened.enter_context(maps.open_map(pins, spec)) for spec in specs]
        counts = [bpf_map.read() for bpf_map in bpf_maps]
        return [([readable({**key, **value}) for key, value in spec.entries(bpf_map)],
                 MapFill(bpf_map.map_id, count, bpf_map.max_entries))
                for spec, bpf_map, count in zip(specs, bpf_maps, counts)]


def _workload(view, entry):
    """(pod or unit, comm) of an outcomes entry, or None when its cgroup is gone or not found yet."""
    labels = view.labels(entry["cgroup_id"])
    if labels is None:
        return None
    shown = {name: label_text(value) for name, value in zip(view.label_names, labels)}
    return (pod_or_unit(shown), entry["comm"])


def _outcome_values(entry):
    values = {"attempts": entry["attempts"], **dict(zip(maps.RESULTS, entry["results"])),
              "latency": tuple(entry["latency"])}
    values["failures"] = sum(values[result] for result in FAILURES)
    return values


def increase(table, before, now):
    """{counter: growth} of one member from its earlier values (None: not in the earlier read);
    None when its growth is unknown."""
    if before is None:
        return dict(now) if table.new_from_zero else None
    if any(now[c] < before[c] for c in table.counters):
        return None
    grown = {c: now[c] - before[c] for c in table.counters}
    if table.histogram:
        slots = [a - b for a, b in zip(now[table.histogram], before[table.histogram])]
        if min(slots, default=0) < 0:
            return None
        grown[table.histogram] = tuple(slots)
    return grown


class _Row:
    """The sum of a row's members: totals, and their increase (None once one is unknown)."""

    def __init__(self, table):
        self.table = table
        self.totals = dict.fromkeys(table.counters, 0)
        self.increase = {**dict.fromkeys(table.counters, 0),
                         **({table.histogram: (0,) * maps.LATENCY_SLOTS} if table.histogram else {})}
        self.members = 0

    def add(self, values, grown):
        self.members += 1
        for c in self.table.counters:
            self.totals[c] += values[c]
        if grown is None or self.increase is None:
            self.increase = None
            return
        for c in self.table.counters:
            self.increase[c] += grown[c]
        if self.table.histogram:
            h = self.table.histogram
            self.increase[h] = tuple(a + b for a, b in zip(self.increase[h], grown[h]))

    def fields(self, seconds):
        out = dict(self.totals)
        known = self.increase is not None and seconds > 0
        out.update({f"{c}_rate": self.increase[c] / seconds if known else None for c in self.table.counters})
        if self.table.derive:
            out.update(self.table.derive(self.increase if known else None, self.members))
        return out


def _summed(table, previous, current, row_of):
    """{row key: _Row} of the current Sample's members, `row_of(row key)` choosing the row."""
    earlier = None
    if previous is not None and _same_map(table, previous, current):
        earlier = previous.tables[table.name]
    rows_by_key = {}
    for member, (row_key, values) in current.tables[table.name].items():
        key = row_of(row_key)
        if key is None:
            continue
        row = rows_by_key.get(key)
        if row is None:
            row = rows_by_key[key] = _Row(table)
        before = earlier.get(member, (None, None))[1] if earlier is not None else None
        row.add(values, None if earlier is None else increase(table, before, values))
    return rows_by_key


def rows(table, previous, current):
    """The rows of `table` from the current Sample, with rates against the previous one."""
    seconds = current.taken - previous.taken if previous is not None else 0
    return [{**dict(zip(table.key, key)), **row.fields(seconds)}
            for key, row in _summed(table, previous, current, lambda key: key).items()]


def host_row(table, previous, current):
    """Every member of `table` summed, those without a row (cgroups gone or too new) too."""
    seconds = current.taken - previous.taken if previous is not None else 0
    row = _summed(table, previous, current, lambda key: ()).get(())
    return row.fields(seconds) if row else {f"{c}_rate": None if previous is None else 0.0 for c in table.counters}


def _same_map(table, previous, current):
    return previous.maps[table.map].map_id == current.maps[table.map].map_id


def _number(value):
    return -1.0 if value is None else value  # no rate yet sorts below a rate of 0


def sort_rows(table, table_rows, sort):
    """Rows in the order `sort` asks for: numbers high to low (none yet last), pid and comm
    ascending; ties by rate, then total, then key, so the order is stable from frame to frame."""
    by = table.sort_fields.get(sort, table.sort_fields["rate"])
    rate, total = table.sort_fields["rate"], table.sort_fields["total"]

    def order(row):
        tie = (-_number(row[rate]), -row[total], tuple(row[k] for k in table.key))
        if by in table.key:
            return (row[by],) + tie
        return (-_number(row[by]),) + tie
    return sorted(table_rows, key=order)


def matches(table, row, name_filter):
    """Does one of the row's names (comm; pod or unit) contain `name_filter`, ignoring case?
    Either as the label or as the screen shows it (with \\xNN for what a terminal would act on)."""
    wanted = name_filter.casefold()
    return not wanted or any(wanted in row[name].casefold() or wanted in top_text.terminal_text(row[name]).casefold()
                             for name in table.names)


def arranged(table, shown):
    """`table` with its ranked columns' drop order set by the rows shown: the column with the
    largest sum is cut last of them, the others go first, smallest first (ties in map order)."""
    if not table.ranked:
        return table
    by_size = sorted(table.ranked, key=lambda c: -sum(row[c.field] or 0 for row in shown))
    drops = {c.field: BIGGEST_RESULT_DROP if rank == 0 else FIRST_RESULT_DROP + rank - 1
             for rank, c in enumerate(by_size)}
    return replace(table, columns=tuple(replace(c, drop=drops[c.field]) if c.field in drops else c
                                        for c in table.columns))


@dataclass(frozen=True)
class Frame:
    """What one refresh shows: each table's rows, filtered and sorted, and how many it had."""
    pin_dir: str
    seconds: float        # between the two reads the rates come from; None before the second
    sort: str
    name_filter: str
    tables: tuple         # (Table, rows shown, rows before filtering) per table
    maps: dict            # map name -> MapFill
    host_rate: float      # connects/s over every name seen in both reads; None before
    error: str = None     # the last read failed (the rows are from the read before)
    host_failures_rate: float = None  # failed connects/s over every cgroup; None before
    labels: tuple = ()    # the attribution labels the pod/unit column comes from
    attribution_problem: str = None   # why there are none (no cgroup2 mount)


class Watch:
    """The state of a running `top`: the last two reads, the sort and the filter."""

    def __init__(self, pin_dir, sort="rate", name_filter=""):
        self.pin_dir = pin_dir
        self.sort = sort
        self.name_filter = name_filter or ""
        self.previous = self.current = None
        self.error = None
        self._rows = {}   # table name -> rows with rates, until the next read
        self._host_failures = None

    def add(self, sample):
        self.previous, self.current = self.current, sample
        self.error = None
        self._rows = {table.name: rows(table, self.previous, sample) for table in TABLES}
        self._host_failures = host_row(OUTCOMES, self.previous, sample)["failures_rate"]

    def failed(self, message):
        self.error = message

    def frame(self):
        tables = []
        for table in TABLES:
            all_rows = self._rows[table.name]
            shown = [row for row in all_rows if matches(table, row, self.name_filter)]
            tables.append((arranged(table, shown), sort_rows(table, shown, self.sort), len(all_rows)))
        return Frame(self.pin_dir, self._seconds(), self.sort, self.name_filter, tuple(tables),
                     self.current.maps, self._host_rate(), self.error, self._host_failures,
                     self.current.labels, self.current.attribution_problem)

    def _seconds(self):
        return self.current.taken - self.previous.taken if self.previous else None

    def _host_rate(self):
        """Connects per second of every name in both reads, exited processes included."""
        if self.previous is None:
            return None
        return sum(row["connects_rate"] for row in self._rows[NAMES.name] if row["connects_rate"] is not None)


def to_json(frame):
    """One JSON document; comm, pod_or_unit are the exposition's label text (as `tcpmon dump
    --json` shows comms)."""
    return json.dumps({
        "pin_dir": frame.pin_dir, "seconds": frame.seconds, "sort": frame.sort,
        "filter": frame.name_filter, "host_connects_rate": frame.host_rate,
        "host_failures_rate": frame.host_failures_rate,
        "labels": list(frame.labels), "attribution_problem": frame.attribution_problem,
        "maps": {name: {"entries": fill.entries, "max_entries": fill.max_entries}
                 for name, fill in frame.maps.items()},
        **{table.name: table_rows for table, table_rows, _ in frame.tables},
        "rows_before_filter": {table.name: total for table, _, total in frame.tables}})


def two_reads(read, pin_dir, interval, sort, name_filter):
    """The Frame of two reads `interval` seconds apart (a rate needs two)."""
    watch = Watch(pin_dir, sort, name_filter)
    watch.add(read())
    time.sleep(interval)
    watch.add(read())
    return watch.frame()


def is_utf8(encoding):
    return codecs.lookup(encoding or "ascii").name == "utf-8"


def main(pin_dir, interval, sort, name_filter, once=False, as_json=False, attribution=Config(labels=())):
    """`tcpmon top`: one frame on stdout (`once`, `as_json`), else the screen until q.
    `attribution` (an attribution.Config) says which labels make the pod/unit column."""
    attributor = Attributor(attribution)

    def read():
        return read_sample(pin_dir, attributor)
    if once or as_json:
        frame = two_reads(read, pin_dir, interval, sort, name_filter)
        if as_json:
            print(to_json(frame))
        else:
            width = shutil.get_terminal_size((80, 24)).columns
            ascii_only = not is_utf8(sys.stdout.encoding)
            print("\n".join(text for text, _ in top_text.frame_lines(frame, width, ascii_only=ascii_only)))
        return 0
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        raise TcpmonError("top needs a terminal on stdin and stdout: use --once or --json for scripts")
    watch = Watch(pin_dir, sort, name_filter)
    watch.add(read())
    from tcpmon import top_screen
    return top_screen.run(watch, read, interval)
