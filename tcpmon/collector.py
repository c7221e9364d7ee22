"""Reads the pinned maps at scrape time into an immutable Snapshot.

One Collector per worker process.  Concurrent scrapes share one read, a
failing map read degrades only its own families (and is counted), and a map
replaced by unload + load is reopened on the next scrape.  The read itself runs
through `offload` (the server's native threads), and health asks only for what
is cheap: the probe's pins and the last scrape's outcome, never a map read.
"""
import _thread
import logging
import os
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

from tcpmon import maps, processmetrics, state
from tcpmon.errors import describe
from tcpmon.pins import DEFAULT_PIN_DIR, Pins
from tcpmon.sidethread import Deferred, run_here

log = logging.getLogger("tcpmon.collector")

# What a scrape reads.  `sockets` only holds connects in flight: status and dump show it.
SCRAPED = (maps.CONNECTS, maps.COMM_TOTALS, maps.OUTCOMES, maps.DESTINATIONS, maps.UPDATE_FAILURES)
# The one that takes most of a read (one entry per PID, the kernel's time outside the GIL): the
# others, and the work that needs only them, are done meanwhile.
BIGGEST = maps.CONNECTS
# Seconds of that other work the event loop's thread may do itself: above it (the last time it
# was measured, wherever it ran), it goes to the side thread instead, and /health never waits
# longer than about this for the event loop.
INLINE_BUDGET = 0.002


@dataclass(frozen=True)
class MapRead:
    """One map's entries as the kernel laid them out (bytes, so later reads can't change them)."""
    keys: bytes
    values: bytes
    count: int
    max_entries: int
    value_stride: int
    truncated: str = None   # why the read stopped before the end of the map, or None


@dataclass(frozen=True)
class Snapshot:
    reads: dict = field(default_factory=dict)        # map name -> MapRead; absent: it could not be read
    update_failures: dict = None                      # map name -> connects it had no room for
    read_errors: dict = field(default_factory=dict)  # map name -> failed reads since start
    read_truncations: dict = field(default_factory=dict)  # map name -> reads that stopped early
    probe_state: state.ProbeState = None
    bpf_stats_enabled: bool = False
    duration: float = 0.0
    last_error: str = None
    process: tuple = ()   # this process's own metrics (tcpmon.processmetrics), read with the maps

    @property
    def connects(self):
        return self.reads.get(maps.CONNECTS.name)

    @property
    def comm_totals(self):
        return self.reads.get(maps.COMM_TOTALS.name)

    def entries(self, spec):
        """Decoded (key, value) dicts of `spec`'s map; empty when it was not read."""
        read = self.reads.get(spec.name)
        return spec.entries(read) if read else ()


@dataclass(frozen=True)
class ScrapeStatus:
    """What /health reports of the last scrape: no map is read for it."""
    ok: bool              # every map was read
    age: float            # seconds since it finished
    map_entries: int = None
    last_error: str = None


@dataclass(frozen=True)
class _Failed:
    exc: Exception


def _run_here(fn, *args):
    return fn(*args)


class Collector:
    def __init__(self, pin_dir=DEFAULT_PIN_DIR, read_mode="auto", offload=_run_here, beside=run_here,
                 start=None, process_metrics=True, allocate_lock=_thread.allocate_lock):
        """`offload(fn, *args)` runs a read in a native thread and returns its result;
        `start(fn, *args)` starts one there and returns a handle whose result() waits for it
        (without it, a scrape offloads); `beside(fn, *args)` starts a call beside the caller
        (a tcpmon.sidethread.SideThread's start); `allocate_lock` makes locks that native
        threads can wait on; `process_metrics`: read this process's metrics with the maps
        (with --workers > 1, tcpmon.workers reads every worker's instead)."""
        self.pins = Pins(pin_dir)
        self.read_mode = read_mode
        self._offload = offload
        self._beside = beside
        self._start = start
        self._process_metrics = process_metrics
        self._allocate_lock = allocate_lock
        self._others_cost = 0.0   # seconds the last _read_others took
        self._latest_at = None    # (Snapshot, time.monotonic() when it was read) of the last scrape
        self._open = {}           # map name -> (BpfMap, (st_dev, st_ino) of its pin)
        self._read_errors = Counter()
        self._truncations = Counter()
        self._truncated_last = set()  # maps whose latest read stopped early
        self._last_error = None
        self._cond = threading.Condition()
        self._reading = False
        self._latest = None

    def snapshot(self):
        """A fresh read; a scrape that arrives while another reads gets that read's result."""
        return self.snapshot_then(None)[0]

    def snapshot_then(self, then, early=None):
        """(a fresh read, then(it, made)): like snapshot(), and `then` runs in the same offloaded
        call as the read, so a scrape hands over to a native thread once, not twice (each
        hand-over waits for a CPU: on a busy node that is most of a small scrape's overhead).
        `early(a snapshot of the small maps alone)` runs while the biggest is still read;
        `made` is what it returned (None if it failed).  A scrape that arrives while another
        reads gets that read, and runs `then(it, None)`."""
        with self._cond:
            if self._reading:
                latest = self._latest
                self._cond.wait_for(lambda: self._latest is not latest)
                shared = self._latest
                return shared, (self._offload(then, shared, None) if then else None)
            self._reading = True
        snapshot = result = None
        try:
            snapshot, result = self._read_beside(then, early)
        finally:
            with self._cond:
                self._reading = False
                self._latest = snapshot or Snapshot(last_error="read failed")
                self._latest_at = (self._latest, time.monotonic())
                self._cond.notify_all()
        if isinstance(result, _Failed):
            raise result.exc
        return snapshot, result

    def _read_beside(self, then, early):
        """The read and `then` in a native thread, the other maps and `early` beside it: in
        this (the event loop's) thread while they are cheap, since a woken side thread often
        queues behind the read's on one CPU while the other idles; else on the side thread."""
        if self._start is None or self._others_cost > INLINE_BUDGET:
            # Started before the hand-over, so that the side thread wakes on this CPU and the
            # offloaded read on another (tcpmon.sidethread).
            others = self._beside(self._timed_others, early)
            return self._offload(self._read_then, then, others)
        others = Deferred(self._timed_others, early, allocate_lock=self._allocate_lock)
        reading = self._start(self._read_then, then, others)
        others.run()
        return reading.result()

    def _read_then(self, then, others):
        snapshot, made = self._read(others)
        if then is None:
            return snapshot, None
        try:
            return snapshot, then(snapshot, made)
        except Exception as exc:   # the read stands (health reports it); the scrape fails
            return snapshot, _Failed(exc)

    def per_process_counters(self):
        """({map name: failed reads}, {map name: truncated reads}) by this process."""
        return dict(self._read_errors), dict(self._truncations)

    def last_scrape(self):
        """The last finished scrape's ScrapeStatus, or None before the first; never waits."""
        if self._latest_at is None:
            return None
        latest, finished = self._latest_at
        ok = len(latest.reads) == len(SCRAPED) - 1 and latest.update_failures is not None
        return ScrapeStatus(ok=ok, age=time.monotonic() - finished,
                            map_entries=latest.connects.count if latest.connects else None,
                            last_error=latest.last_error)

    def readiness(self):
        """(why the exporter is not ready or None, the ProbeState): pins and map layout only."""
        probe_state = state.inspect(self.pins)
        if not probe_state.attached:
            return probe_state.problem, probe_state
        try:
            # A map of its own: the scrape thread may be reading (or reopening) the cached one.
            # Opening checks type, key and value size; nothing is read.
            maps.open_map(self.pins, maps.CONNECTS).close()
        except Exception as exc:
            return describe(exc), probe_state
        return None, probe_state

    def readiness_problem(self):
        """Why the exporter is not ready (no probe attached, map missing or wrong), or None."""
        return self.readiness()[0]

    def capacity_notes(self):
        """One line per map that ran full since load (the probe counted what it had no room for)."""
        try:
            with maps.open_map(self.pins, maps.UPDATE_FAILURES) as failures:
                failures.read(self.read_mode)
                lost = maps.failures_by_map(failures)
        except Exception:
            return []  # readiness_problem() reports a probe that cannot be read
        return [f"map {name} ran full: {count} connects it had no room for since load "
                f"(raise {maps.CAPACITY_FLAGS[name]})" for name, count in lost.items() if count]

    def close(self):
        for bpf_map, _ in self._open.values():
            bpf_map.close()
        self._open.clear()

    def _map(self, spec):
        """The open map for `spec`, reopened when its pin now names another map."""
        path = self.pins.map(spec)
        try:
            st = os.stat(path)
            identity = (st.st_dev, st.st_ino)
        except FileNotFoundError:
            identity = None
        cached = self._open.get(spec.name)
        if cached and cached[1] == identity:
            return cached[0]
        if cached:
            cached[0].close()
            del self._open[spec.name]
        bpf_map = maps.open_map(self.pins, spec)
        self._open[spec.name] = (bpf_map, identity)
        return bpf_map

    def _read_map(self, spec):
        try:
            bpf_map = self._map(spec)
            count = bpf_map.read(self.read_mode)
            self._learn_read_mode(bpf_map)
            self._note_truncation(spec, bpf_map)
            return MapRead(bytes(bpf_map.keys), bytes(bpf_map.values), count, bpf_map.max_entries,
                           bpf_map.value_stride, bpf_map.truncated)
        except Exception as exc:
            self._failed(spec, exc)
            return None

    def _learn_read_mode(self, bpf_map):
        """A kernel that refuses one batch lookup refuses them for every map tcpmon reads
        (hash and array batch ops came in the same release): read per key from now on,
        every map, reopened ones too."""
        if self.read_mode == "auto" and bpf_map.read_mode == "iterate":
            self.read_mode = "iterate"
            log.warning("the kernel refused a batch lookup of %s: reading every map per key from now on",
                        bpf_map.path)

    def _note_truncation(self, spec, bpf_map):
        if bpf_map.truncated is None:
            self._truncated_last.discard(spec.name)
            return
        self._truncations[spec.name] += 1
        if spec.name not in self._truncated_last:  # once per run of truncated reads
            log.warning("reading %s stopped early (%s): %d of at most %d entries read, the map changed "
                        "faster than it was read; the next scrape reads it again",
                        spec.name, bpf_map.truncated, bpf_map.count, bpf_map.max_entries)
        self._truncated_last.add(spec.name)

    def _failed(self, spec, exc):
        self._read_errors[spec.name] += 1
        message = describe(exc)
        if message != self._last_error:
            log.warning("reading %s failed: %s", spec.name, message)
        self._last_error = message
        stale = self._open.pop(spec.name, None)
        if stale:
            stale[0].close()

    def _timed_others(self, early):
        began = time.perf_counter()
        try:
            return self._read_others(early)
        finally:
            self._others_cost = time.perf_counter() - began

    def _read_others(self, early):
        """Every map but the biggest, the probe's state and this process's metrics, then
        `early` on what they give: Python work, done while the biggest read waits outside the
        GIL for the kernel."""
        reads = {spec: self._read_map(spec) for spec in SCRAPED if spec is not BIGGEST}
        found = (reads, state.inspect(self.pins), state.bpf_stats_enabled(),
                 tuple(processmetrics.families()) if self._process_metrics else ())
        if early is None:
            return found, None
        try:
            return found, early(Snapshot(reads={spec.name: read for spec, read in reads.items() if read is not None}))
        except Exception:   # `then` does it again, and reports what fails
            log.debug("work beside the read failed", exc_info=True)
            return found, None

    def _read(self, others):
        """(the snapshot, what `early` made): the biggest map read here, the rest by `others`
        (a started _read_others) meanwhile."""
        started = time.perf_counter()
        try:
            biggest = self._read_map(BIGGEST)
        finally:
            (reads, probe_state, stats_enabled, process), made = others.result()
        reads[BIGGEST] = biggest
        reads = {spec.name: reads[spec] for spec in SCRAPED if reads[spec] is not None}
        failures = reads.pop(maps.UPDATE_FAILURES.name, None)
        failures = maps.failures_by_map(failures) if failures else None
        if len(reads) == len(SCRAPED) - 1 and failures is not None:
            self._last_error = None
        snapshot = Snapshot(reads=reads, update_failures=failures, read_errors=dict(self._read_errors),
                            read_truncations=dict(self._truncations), probe_state=probe_state,
                            bpf_stats_enabled=stats_enabled, duration=time.perf_counter() - started,
                            last_error=self._last_error, process=process)
        return snapshot, made
