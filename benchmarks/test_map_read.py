"""Map read: (a) Cython batch, (b) Cython per-key, (c) a plain-C batch floor, (d) naive ctypes per-key,
on maps with the production layout filled to each size."""
import struct

import pytest

import benchlib
from benchlib import PID_VALUE, BatchFloor, CtypesPidMap, timed
from tcpmon import _maps, probe

READERS = ("cython_batch", "cython_iterate", "c_floor", "ctypes_per_key")
# rounds per (reader, size): the slow readers get fewer
ROUNDS = {"cython_batch": {1000: 200, 10000: 100, 100000: 30},
          "cython_iterate": {1000: 30, 10000: 10, 100000: 3},
          "c_floor": {1000: 200, 10000: 100, 100000: 30},
          "ctypes_per_key": {1000: 10, 10000: 5, 100000: 2}}


@pytest.fixture(scope="module")
def filled_map(request, lib):
    n = request.param
    pin_dir = f"{benchlib.PIN_PREFIX}read{n}"
    benchlib.remove_pin_dir(pin_dir)
    benchlib.create_production_maps(lib, pin_dir, n, max_pids=benchlib.max_pids_for(n))
    expected = {1 + i: (1 + i % 5, benchlib.synthetic_comm(i % 100)) for i in range(n)}
    yield probe.Pins(pin_dir).map(probe.CONNECTS), expected
    benchlib.remove_pin_dir(pin_dir)


def decode(keys, values, count, value_stride):
    pids = struct.unpack_from(f"={count}I", keys)
    entries = {}
    for i, pid in enumerate(pids):
        connects, comm = PID_VALUE.unpack_from(values, i * value_stride)
        entries[pid] = (connects, comm.rstrip(b"\0"))
    return entries


@pytest.mark.parametrize("reader", READERS)
def test_map_read(filled_map, reader, benchmark, lib, results, request):
    def request_close(thing):
        request.addfinalizer(thing.close)

    path, expected = filled_map
    n = len(expected)
    with _maps.BpfMap(path) as bpf_map:
        bpf_map.check_layout(probe.CONNECTS.map_type, probe.CONNECTS.key_size, probe.CONNECTS.value_size)
        if reader == "cython_batch":
            def read():
                return bpf_map.read("batch")
            decoded = lambda: decode(bpf_map.keys, bpf_map.values, bpf_map.count, bpf_map.value_stride)  # noqa: E731
        elif reader == "cython_iterate":
            def read():
                return bpf_map.read("iterate")
            decoded = lambda: decode(bpf_map.keys, bpf_map.values, bpf_map.count, bpf_map.value_stride)  # noqa: E731
        elif reader == "c_floor":
            floor = BatchFloor(lib, bpf_map)
            read = floor.read
            decoded = lambda: decode(floor.keys.raw, floor.values.raw, count, floor.value_stride)  # noqa: E731
            if benchmark.enabled:
                results.put(("read_calls", n), floor.calls())
        else:
            naive = CtypesPidMap(path)
            request_close(naive)

            def read():
                return len(naive.items())
            decoded = lambda: {pid: (c, comm) for pid, (c, comm) in naive.items().items()}  # noqa: E731
        count, stats = timed(benchmark, read, rounds=ROUNDS[reader].get(n, 3))
        assert count == n
        assert decoded() == expected
    if stats:
        results.put(("read", reader, n), stats)
