"""With --workers N, every scrape shows every worker's own counters, labelled worker="0".."N-1".

Any worker may answer a scrape.  Counters that belong to one process (its failed map reads, its
CPU time, its garbage collections) would jump back whenever another worker answered, so each
worker publishes its counters into a slot of memory shared by all workers (an anonymous shared
mapping the arbiter makes before it forks them), and the worker that answers renders every
slot.  Process metrics of the other workers come from their /proc/<pid>, as prometheus-client's
ProcessCollector reads its own.  A worker that gunicorn replaces takes over the dead one's slot
and starts its counters from zero, as a restarted process does.
"""
import gc
import mmap
import os
import struct

from prometheus_client.core import CounterMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.process_collector import ProcessCollector

from tcpmon.collector import SCRAPED

_MAPS = tuple(spec.name for spec in SCRAPED)
_GC_FIELDS = ("collections", "collected", "uncollectable")
_GENERATIONS = 3
# pid, read errors and truncated reads per map, gc counters per generation
_SLOT = struct.Struct(f"=q{2 * len(_MAPS)}Q{_GENERATIONS * len(_GC_FIELDS)}Q")


def _alive(pid):
    if not isinstance(pid, int):
        return True   # gunicorn's "[booting]": being forked right now
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


class WorkerSlots:
    """One slot per worker in memory shared across the fork."""

    def __init__(self, count):
        self.count = count
        self.memory = mmap.mmap(-1, _SLOT.size * count)   # MAP_SHARED | MAP_ANONYMOUS
        self.owners = [None] * count                      # the arbiter's view: worker objects

    def reserve(self, worker):
        """In the arbiter, before the fork: the slot this worker will use."""
        for index, owner in enumerate(self.owners):
            if owner is None or not _alive(owner.pid):
                self.owners[index] = worker
                return index
        raise RuntimeError(f"no free worker slot among {self.count}")

    def bind(self, index):
        """In the worker, after the fork: its Slot, counters from zero."""
        slot = Slot(self, index)
        slot.publish({}, {})
        return slot

    def read(self):
        """[(index, pid, read errors {map: n}, truncated reads {map: n},
        gc [(collections, collected, uncollectable)])] of the live slots."""
        found = []
        for index in range(self.count):
            pid, *values = _SLOT.unpack_from(self.memory, index * _SLOT.size)
            if pid <= 0 or not _alive(pid):
                continue
            errors = dict(zip(_MAPS, values[:len(_MAPS)]))
            truncated = dict(zip(_MAPS, values[len(_MAPS):2 * len(_MAPS)]))
            flat = values[2 * len(_MAPS):]
            gcs = [tuple(flat[g * 3:g * 3 + 3]) for g in range(_GENERATIONS)]
            found.append((index, pid, errors, truncated, gcs))
        return found


class Slot:
    def __init__(self, slots, index):
        self.slots, self.index = slots, index
        self.pid = os.getpid()

    def publish(self, read_errors, truncations):
        """This worker's counters, now."""
        stats = gc.get_stats()[:_GENERATIONS]
        flat = [generation.get(name, 0) for generation in stats for name in _GC_FIELDS]
        flat += [0] * (_GENERATIONS * len(_GC_FIELDS) - len(flat))
        _SLOT.pack_into(self.slots.memory, self.index * _SLOT.size, self.pid,
                        *(read_errors.get(name, 0) for name in _MAPS),
                        *(truncations.get(name, 0) for name in _MAPS), *flat)


def _labelled(family, worker):
    out = Metric(family.name, family.documentation, family.type, family.unit)
    for sample in family.samples:
        out.add_sample(sample.name, {**sample.labels, "worker": worker}, sample.value, sample.timestamp)
    return out


class WorkerFamilies:
    """prometheus-client collector of every live worker's counters, with a `worker` label."""

    def __init__(self, slots):
        self.slots = slots

    def collect(self):
        live = self.slots.read()
        errors = CounterMetricFamily("tcpmon_map_read_errors", "Failed reads of a pinned map by a worker",
                                     labels=["map", "worker"])
        truncated = CounterMetricFamily("tcpmon_map_read_truncated",
                                        "Reads of a pinned map by a worker that stopped before its end "
                                        "(it changed faster than it was read)", labels=["map", "worker"])
        collections = CounterMetricFamily("python_gc_collections", "Number of times this generation was collected",
                                          labels=["generation", "worker"])
        collected = CounterMetricFamily("python_gc_objects_collected", "Objects collected during gc",
                                        labels=["generation", "worker"])
        uncollectable = CounterMetricFamily("python_gc_objects_uncollectable", "Uncollectable objects found during GC",
                                            labels=["generation", "worker"])
        process = {}
        for index, pid, read_errors, truncations, gcs in live:
            worker = str(index)
            for name, count in read_errors.items():
                errors.add_metric([name, worker], count)
            for name, count in truncations.items():
                truncated.add_metric([name, worker], count)
            for generation, (runs, objects, stuck) in enumerate(gcs):
                collections.add_metric([str(generation), worker], runs)
                collected.add_metric([str(generation), worker], objects)
                uncollectable.add_metric([str(generation), worker], stuck)
            for family in ProcessCollector(pid=lambda pid=pid: pid, registry=None).collect():
                merged = process.setdefault(family.name, Metric(family.name, family.documentation, family.type,
                                                                family.unit))
                merged.samples.extend(_labelled(family, worker).samples)
        yield errors
        yield truncated
        yield collected
        yield uncollectable
        yield collections
        yield from process.values()


class PerWorker:
    """One worker's side: its slot to publish into, and the registry that renders every slot."""

    def __init__(self, slots, index):
        from prometheus_client import CollectorRegistry, PlatformCollector
        self.slot = slots.bind(index)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(WorkerFamilies(slots))
        PlatformCollector(registry=self.registry)

    def publish(self, read_errors, truncations):
        self.slot.publish(read_errors, truncations)
