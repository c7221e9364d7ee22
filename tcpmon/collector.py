"""Reads the pinned maps at scrape time into an immutable Snapshot.

One Collector per worker process.  Concurrent scrapes share one read, a
failing map read degrades only its own families (and is counted), and a map
replaced by unload + load is reopened on the next scrape.  The read itself runs
through `offload` (the server's native threads), and health asks only for what
is cheap: the probe's pins and the last scrape's outcome, never a map read.
"""
import logging
import os
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

from tcpmon import probe
from tcpmon.errors import describe

log = logging.getLogger("tcpmon.collector")

_PER_CPU_COUNTER = struct.Struct("=Q")
_SLOT = struct.Struct("=I")


@dataclass(frozen=True)
class MapRead:
    """One map's entries as the kernel laid them out (bytes, so later reads can't change them)."""
    keys: bytes
    values: bytes
    count: int
    max_entries: int


@dataclass(frozen=True)
class Snapshot:
    connects: MapRead = None        # None: the map could not be read (see read_errors)
    comm_totals: MapRead = None
    update_failures: dict = None    # map name -> failed inserts summed over CPUs
    read_errors: dict = field(default_factory=dict)  # map name -> failed reads since start
    probe_state: probe.ProbeState = None
    bpf_stats_enabled: bool = False
    duration: float = 0.0
    last_error: str = None


@dataclass(frozen=True)
class ScrapeStatus:
    """What /health reports of the last scrape: no map is read for it."""
    ok: bool              # every map was read
    age: float            # seconds since it finished
    map_entries: int = None
    last_error: str = None


def _run_here(fn, *args):
    return fn(*args)


class Collector:
    def __init__(self, pin_dir=probe.DEFAULT_PIN_DIR, read_mode="auto", offload=_run_here):
        self.pins = probe.Pins(pin_dir)
        self.read_mode = read_mode
        self._offload = offload
        self._finished = None     # time.monotonic() when _latest was read
        self._open = {}           # map name -> (BpfMap, (st_dev, st_ino) of its pin)
        self._read_errors = Counter()
        self._last_error = None
        self._cond = threading.Condition()
        self._reading = False
        self._latest = None

    def snapshot(self):
        """A fresh read; a scrape that arrives while another reads gets that read's result."""
        with self._cond:
            if self._reading:
                latest = self._latest
                self._cond.wait_for(lambda: self._latest is not latest)
                return self._latest
            self._reading = True
        snapshot = None
        try:
            snapshot = self._offload(self._read)
        finally:
            with self._cond:
                self._reading = False
                self._latest = snapshot or Snapshot(last_error="read failed")
                self._finished = time.monotonic()
                self._cond.notify_all()
        return snapshot

    def read_errors(self):
        """{map name: failed reads by this process}."""
        return dict(self._read_errors)

    def last_scrape(self):
        """The last finished scrape's ScrapeStatus, or None before the first; never waits."""
        latest, finished = self._latest, self._finished
        if latest is None or finished is None:
            return None
        ok = latest.connects is not None and latest.comm_totals is not None and latest.update_failures is not None
        return ScrapeStatus(ok=ok, age=time.monotonic() - finished,
                            map_entries=latest.connects.count if latest.connects else None,
                            last_error=latest.last_error)

    def readiness(self):
        """(why the exporter is not ready or None, the ProbeState): pins and map layout only."""
        state = probe.inspect(self.pins)
        if not state.attached:
            return state.problem, state
        try:
            # A map of its own: the scrape thread may be reading (or reopening) the cached one.
            # Opening checks type, key and value size; nothing is read.
            probe.open_map(self.pins, probe.CONNECTS).close()
        except Exception as exc:
            return describe(exc), state
        return None, state

    def readiness_problem(self):
        """Why the exporter is not ready (no probe attached, map missing or wrong), or None."""
        return self.readiness()[0]

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
        bpf_map = probe.open_map(self.pins, spec)
        self._open[spec.name] = (bpf_map, identity)
        return bpf_map

    def _read_map(self, spec):
        try:
            bpf_map = self._map(spec)
            count = bpf_map.read(self.read_mode)
            return MapRead(bytes(bpf_map.keys), bytes(bpf_map.values), count, bpf_map.max_entries)
        except Exception as exc:
            self._failed(spec, exc)
            return None

    def _read_failures(self):
        read = self._read_map(probe.UPDATE_FAILURES)
        if read is None:
            return None
        per_slot = (probe.CONNECTS.name, probe.COMM_TOTALS.name)
        stride = len(read.values) // read.count if read.count else 0  # one u64 per possible CPU
        totals = {}
        for i, (slot,) in enumerate(_SLOT.iter_unpack(read.keys)):
            if slot < len(per_slot):
                cpus = read.values[i * stride:(i + 1) * stride]
                totals[per_slot[slot]] = sum(n for (n,) in _PER_CPU_COUNTER.iter_unpack(cpus))
        return totals

    def _failed(self, spec, exc):
        self._read_errors[spec.name] += 1
        message = describe(exc)
        if message != self._last_error:
            log.warning("reading %s failed: %s", spec.name, message)
        self._last_error = message
        stale = self._open.pop(spec.name, None)
        if stale:
            stale[0].close()

    def _read(self):
        started = time.perf_counter()
        connects = self._read_map(probe.CONNECTS)
        comm_totals = self._read_map(probe.COMM_TOTALS)
        failures = self._read_failures()
        state = probe.inspect(self.pins)
        if connects and comm_totals and failures is not None:
            self._last_error = None
        return Snapshot(connects=connects, comm_totals=comm_totals, update_failures=failures,
                        read_errors=dict(self._read_errors), probe_state=state,
                        bpf_stats_enabled=probe.bpf_stats_enabled(),
                        duration=time.perf_counter() - started, last_error=self._last_error)
