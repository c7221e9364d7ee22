"""`tcpmon top`, the model: reads of the pinned maps, rates, sorting and filtering.

Everything here is pure except `read_sample`, the one function that touches the
maps (through the read-only reader the exporter uses), and `two_reads` and
`main`, which drive it.  The view lives apart: `top_text` lays a Frame out as
lines that fit a terminal width (shared by `--once` and the screen),
`top_screen` draws them with curses and turns keys into sort and filter.

Rates are per row key, (pid, comm) for processes: a PID that exits and is
reused, or that execs and takes a new name, is a new row with no rate until it
has been seen in two reads, and a counter that went down belongs to a new
process (or a reloaded map), so it has no rate either, never a negative one.

A table is a `Table`: its key fields, its monotonic counters (each gets a
`<counter>_rate` field) and its columns.  New maps (per-connect outcomes,
latency histograms, cgroup attribution) become new tables or new counters and
columns here, and one more read in `read_sample`.
"""
import codecs
import json
import shutil
import sys
import time
from dataclasses import dataclass

from tcpmon import maps, top_text
from tcpmon.dumping import readable
from tcpmon.errors import TcpmonError
from tcpmon.pins import Pins

SORT_KEYS = ("rate", "total", "pid", "comm")


@dataclass(frozen=True)
class Column:
    field: str        # the row field it shows
    title: str
    width: int        # the least it needs; a `flex` column also takes what is left
    kind: str         # how top_text formats it: pid, count, rate, name
    flex: bool = False
    drop: int = 0     # on a narrow terminal the highest `drop` goes first; 0 stays


PID = Column("pid", "PID", 7, "pid")
RATE = Column("connects_rate", "CONN/S", 8, "rate")
TOTAL = Column("connects", "TOTAL", 10, "count", drop=1)
COMM = Column("comm", "COMM", 8, "name", flex=True)


@dataclass(frozen=True)
class Table:
    name: str         # its key in JSON and in Sample.tables
    title: str        # what the screen calls it
    map: str          # the map its rows come from (a new map id restarts the rates)
    key: tuple        # the fields that identify a row
    counters: tuple   # monotonic counters; each gets a "<counter>_rate" field (per second)
    columns: tuple
    sort_fields: dict  # --sort key -> row field ("rate" and "total" at least); others sort by rate


PROCESSES = Table("processes", "processes", maps.CONNECTS.name, ("pid", "comm"), ("connects",),
                  (PID, RATE, TOTAL, COMM),
                  {"rate": "connects_rate", "total": "connects", "pid": "pid", "comm": "comm"})
NAMES = Table("names", "names, exited processes included", maps.COMM_TOTALS.name, ("comm",),
              ("connects",), (RATE, TOTAL, COMM),
              {"rate": "connects_rate", "total": "connects", "comm": "comm"})
TABLES = (PROCESSES, NAMES)


@dataclass(frozen=True)
class MapFill:
    map_id: int       # a new id means the map was created anew: its counts restarted
    entries: int
    max_entries: int


@dataclass(frozen=True)
class Sample:
    """One read: per table, row key -> {counter: value}; and the fill of each map read."""
    taken: float      # time.monotonic() just before the read
    tables: dict
    maps: dict        # map name -> MapFill


def read_sample(pin_dir):
    """One read of the maps top shows.  The only code here that touches them: re-point it
    when the maps change."""
    pins = Pins(pin_dir)
    taken = time.monotonic()
    pids, pid_fill = _read(pins, maps.CONNECTS)
    comms, comm_fill = _read(pins, maps.COMM_TOTALS)
    return Sample(taken,
                  {PROCESSES.name: {(e["tgid"], e["comm"]): {"connects": e["connects"]} for e in pids},
                   NAMES.name: {(e["comm"],): {"connects": e["count"]} for e in comms}},
                  {maps.CONNECTS.name: pid_fill, maps.COMM_TOTALS.name: comm_fill})


def _read(pins, spec):
    """The entries of one read of `spec`'s map as `tcpmon dump` decodes them (comms as
    their labels), and the map's fill."""
    with maps.open_map(pins, spec) as bpf_map:
        count = bpf_map.read()
        entries = [readable({**key, **value}) for key, value in spec.entries(bpf_map)]
        return entries, MapFill(bpf_map.map_id, count, bpf_map.max_entries)


def rates(before, now, counters, seconds):
    """{counter_rate: per second} from two reads of one row; None for each when the row is
    new (not in the earlier read) or any counter went down (a new process under that key)."""
    if before is None or seconds <= 0 or any(now[c] < before[c] for c in counters):
        return {f"{c}_rate": None for c in counters}
    return {f"{c}_rate": (now[c] - before[c]) / seconds for c in counters}


def rows(table, previous, current):
    """The rows of `table` from the current Sample, with rates against the previous one."""
    earlier = {}
    if previous is not None and _same_map(table, previous, current):
        earlier = previous.tables[table.name]
    seconds = current.taken - previous.taken if previous is not None else 0
    out = []
    for key, counters in current.tables[table.name].items():
        row = dict(zip(table.key, key))
        row.update(counters)
        row.update(rates(earlier.get(key), counters, table.counters, seconds))
        out.append(row)
    return out


def _same_map(table, previous, current):
    return previous.maps[table.map].map_id == current.maps[table.map].map_id


def _number(value):
    return -1.0 if value is None else value  # no rate yet sorts below a rate of 0


def sort_rows(table, table_rows, sort):
    """Rows in the order `sort` asks for: numbers high to low, pid and comm ascending;
    ties by rate, then total, then key, so the order is stable from frame to frame."""
    by = table.sort_fields.get(sort, table.sort_fields["rate"])
    rate, total = table.sort_fields["rate"], table.sort_fields["total"]

    def order(row):
        tie = (-_number(row[rate]), -row[total], tuple(row[k] for k in table.key))
        if by in table.key:
            return (row[by],) + tie
        return (-_number(row[by]),) + tie
    return sorted(table_rows, key=order)


def matches(row, name_filter):
    """Does the row's name contain `name_filter`, ignoring case?  Either as the label or as
    the screen shows it (with \\xNN for what a terminal would act on)."""
    wanted = name_filter.casefold()
    return (not wanted or wanted in row["comm"].casefold()
            or wanted in top_text.terminal_text(row["comm"]).casefold())


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


class Watch:
    """The state of a running `top`: the last two reads, the sort and the filter."""

    def __init__(self, pin_dir, sort="rate", name_filter=""):
        self.pin_dir = pin_dir
        self.sort = sort
        self.name_filter = name_filter or ""
        self.previous = self.current = None
        self.error = None
        self._rows = {}   # table name -> rows with rates, until the next read

    def add(self, sample):
        self.previous, self.current = self.current, sample
        self.error = None
        self._rows = {table.name: rows(table, self.previous, sample) for table in TABLES}

    def failed(self, message):
        self.error = message

    def frame(self):
        tables = []
        for table in TABLES:
            all_rows = self._rows[table.name]
            shown = [row for row in all_rows if matches(row, self.name_filter)]
            tables.append((table, sort_rows(table, shown, self.sort), len(all_rows)))
        return Frame(self.pin_dir, self._seconds(), self.sort, self.name_filter, tuple(tables),
                     self.current.maps, self._host_rate(), self.error)

    def _seconds(self):
        return self.current.taken - self.previous.taken if self.previous else None

    def _host_rate(self):
        """Connects per second of every name in both reads, exited processes included."""
        if self.previous is None:
            return None
        return sum(row["connects_rate"] for row in self._rows[NAMES.name] if row["connects_rate"] is not None)


def to_json(frame):
    """One JSON document; comm is the exposition's label text (as in `tcpmon dump --json`)."""
    return json.dumps({
        "pin_dir": frame.pin_dir, "seconds": frame.seconds, "sort": frame.sort,
        "filter": frame.name_filter, "host_connects_rate": frame.host_rate,
        "maps": {name: {"entries": fill.entries, "max_entries": fill.max_entries}
                 for name, fill in frame.maps.items()},
        **{table.name: table_rows for table, table_rows, _ in frame.tables},
        "rows_before_filter": {table.name: total for table, _, total in frame.tables}})


def two_reads(pin_dir, interval, sort, name_filter):
    """The Frame of two reads `interval` seconds apart (a rate needs two)."""
    watch = Watch(pin_dir, sort, name_filter)
    watch.add(read_sample(pin_dir))
    time.sleep(interval)
    watch.add(read_sample(pin_dir))
    return watch.frame()


def is_utf8(encoding):
    return codecs.lookup(encoding or "ascii").name == "utf-8"


def main(pin_dir, interval, sort, name_filter, once=False, as_json=False):
    """`tcpmon top`: one frame on stdout (`once`, `as_json`), else the screen until q."""
    if once or as_json:
        frame = two_reads(pin_dir, interval, sort, name_filter)
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
    watch.add(read_sample(pin_dir))
    from tcpmon import top_screen
    return top_screen.run(watch, lambda: read_sample(pin_dir), interval)
