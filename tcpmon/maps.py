"""Every pinned map, described once, from bpf/tcpmon.h: name, type, key and value layout,
default capacity, and how to decode its entries.

The layouts come from the header's own field lists (through tcpmon._abi), so nothing
here restates a size or an offset.  The loader, the collector, `status`, `dump`,
`top`, the benchmarks and scripts/check-bpf-objects.sh all use these descriptions.
"""
import struct
from dataclasses import dataclass, field

from tcpmon import _abi, _maps
from tcpmon.errors import NotLoadedError

ABI_VERSION = _abi.ABI_VERSION
COMM_LEN = _abi.COMM_LEN
RESULTS = _abi.RESULTS            # tcpmon_connects_total's result labels, by slot
LATENCY_SLOTS = _abi.LATENCY_SLOTS
FAILURE_MAPS = _abi.FAILURE_MAPS  # update_failures slot -> the map that was full

_PER_CPU_TYPES = (_maps.MAP_TYPE_PERCPU_ARRAY,)


@dataclass(frozen=True)
class Field:
    name: str
    offset: int
    size: int    # of one element
    count: int   # elements: 1 for a scalar
    kind: str    # the struct module's code of one element

    @property
    def is_bytes(self):
        """char and __u8 arrays decode to bytes, other arrays to tuples of ints."""
        return self.count > 1 and self.kind in "cB"

    @property
    def code(self):
        if self.is_bytes:
            return f"{self.count}s"
        return f"{self.count}{self.kind}" if self.count > 1 else self.kind


class Layout:
    """One struct of the ABI: decodes and encodes it as a dict of its fields."""

    def __init__(self, name, size, fields):
        self.name = name
        self.size = size
        self.fields = tuple(Field(*row) for row in fields)
        self.struct = struct.Struct(self._format())
        assert self.struct.size == size, f"{name}: format {self.struct.format} is not {size} bytes"

    def _format(self):
        parts, end = ["="], 0
        for f in self.fields:
            if f.offset > end:
                parts.append(f"{f.offset - end}x")
            parts.append(f.code)
            end = f.offset + f.size * f.count
        if self.size > end:
            parts.append(f"{self.size - end}x")
        return "".join(parts)

    def _group(self, flat):
        out, i = {}, 0
        for f in self.fields:
            if f.count > 1 and not f.is_bytes:
                out[f.name] = flat[i:i + f.count]
                i += f.count
            else:
                out[f.name] = flat[i]
                i += 1
        return out

    def unpack(self, buf, offset=0):
        return self._group(self.struct.unpack_from(buf, offset))

    def iter_unpack(self, buf, count, stride=None):
        """The first `count` structs of `buf`, `stride` bytes apart (default: packed)."""
        stride = stride or self.size
        unpack = self.struct.unpack_from
        for i in range(count):
            yield self._group(unpack(buf, i * stride))

    def pack(self, **values):
        """Fields left out are zero."""
        flat = []
        for f in self.fields:
            value = values.get(f.name, b"" if f.is_bytes else (0,) * f.count if f.count > 1 else 0)
            flat.extend(value if f.count > 1 and not f.is_bytes else (value,))
        return self.struct.pack(*flat)


LAYOUTS = {name: Layout(name, size, fields) for name, (size, fields) in _abi.STRUCTS.items()}



@dataclass(frozen=True)
class MapSpec:
    name: str
    map_type: int
    key: Layout = field(repr=False)
    value: Layout = field(repr=False)
    default_max_entries: int

    @property
    def key_size(self):
        return self.key.size

    @property
    def value_size(self):
        return self.value.size

    @property
    def per_cpu(self):
        return self.map_type in _PER_CPU_TYPES

    def entries(self, bpf_map):
        """(key, value) dicts of the last read of `bpf_map`; per-CPU values summed over CPUs."""
        keys = self.key.iter_unpack(bpf_map.keys, bpf_map.count)
        if not self.per_cpu:
            return zip(keys, self.value.iter_unpack(bpf_map.values, bpf_map.count))
        return ((key, self._sum_cpus(bpf_map, i)) for i, key in enumerate(keys))

    def _sum_cpus(self, bpf_map, i):
        slot = (self.value.size + 7) // 8 * 8   # the kernel rounds each CPU's copy to 8 bytes
        cpus = bpf_map.value_stride // slot
        base = i * bpf_map.value_stride
        per_cpu = list(self.value.iter_unpack(bpf_map.values[base:base + bpf_map.value_stride], cpus, slot))
        return {name: sum(value[name] for value in per_cpu) for name in per_cpu[0]}


MAPS = tuple(MapSpec(name, map_type, LAYOUTS[key], LAYOUTS[value], max_entries)
             for name, map_type, key, value, max_entries in _abi.MAPS)
BY_NAME = {spec.name: spec for spec in MAPS}

CONNECTS = BY_NAME["connects"]
COMM_TOTALS = BY_NAME["comm_totals"]
SOCKETS = BY_NAME["sockets"]
OUTCOMES = BY_NAME["outcomes"]
DESTINATIONS = BY_NAME["destinations"]
UPDATE_FAILURES = BY_NAME["update_failures"]
CONFIG = LAYOUTS["tcpmon_config"]

# The `tcpmon load` flag that sizes each map (update_failures has a slot per map, no flag).
CAPACITY_FLAGS = {CONNECTS.name: "--max-pids", COMM_TOTALS.name: "--max-comms", SOCKETS.name: "--max-sockets",
                  OUTCOMES.name: "--max-outcomes", DESTINATIONS.name: "--max-destinations"}


def open_map(pins, spec, writable=False):
    """The pinned map for `spec`, read-only unless `writable`, after checking its layout."""
    path = pins.map(spec)
    try:
        bpf_map = _maps.BpfMap(path, writable=writable)
    except FileNotFoundError:
        raise NotLoadedError(f"no map pinned at {path}: run 'tcpmon load' (pin dir {pins.dir})") from None
    except NotADirectoryError:
        raise NotLoadedError(pins.not_a_directory()) from None
    try:
        bpf_map.check_layout(spec.map_type, spec.key_size, spec.value_size)
    except Exception:
        bpf_map.close()
        raise
    return bpf_map


def comm_key(comm):
    """The raw key of a comm: NUL-padded to the kernel's length."""
    return comm[:COMM_LEN].ljust(COMM_LEN, b"\0")


def failures_by_map(update_failures):
    """{map name: connects it had no room for} from a read of update_failures."""
    return {FAILURE_MAPS[key["index"]]: value["count"]
            for key, value in UPDATE_FAILURES.entries(update_failures) if key["index"] < len(FAILURE_MAPS)}
