"""Map read: (a) Cython batch, (b) Cython per-key, (c) a plain-C batch floor, (d) naive ctypes per-key,
on maps with the production layout filled to each size."""
import struct
import time

import pytest

import benchlib
from benchlib import PID_VALUE, BatchFloor, CtypesPidMap, timed
from tcpmon import _maps, maps
from tcpmon.pins import Pins

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
    yield Pins(pin_dir).map(maps.CONNECTS), expected
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
    """One whole-map read per round.  Before each round (untimed by pytest-benchmark) the reader this
    one is compared with runs once and is timed here: the C floor for the Cython batch reader, the
    Cython batch reader for the others.  Ratios come from these interleaved rounds, so a noisy
    stretch of the run hits both sides alike."""
    path, expected = filled_map
    n = len(expected)
    with _maps.BpfMap(path) as bpf_map:
        bpf_map.check_layout(maps.CONNECTS.map_type, maps.CONNECTS.key_size, maps.CONNECTS.value_size)
        floor = BatchFloor(lib, bpf_map)

        def cython_batch():
            return bpf_map.read("batch")

        def cython_decoded():
            return decode(bpf_map.keys, bpf_map.values, bpf_map.count, bpf_map.value_stride)
        if reader == "cython_batch":
            read, decoded, partner = cython_batch, cython_decoded, floor.read
        elif reader == "cython_iterate":
            read, decoded, partner = (lambda: bpf_map.read("iterate")), cython_decoded, cython_batch
        elif reader == "c_floor":
            read, partner = floor.read, cython_batch
            decoded = lambda: decode(floor.keys.raw, floor.values.raw, n, floor.value_stride)  # noqa: E731
            if benchmark.enabled:
                results.put(("read_calls", n), floor.calls())
        else:
            naive = CtypesPidMap(path)
            request.addfinalizer(naive.close)
            read, partner = (lambda: len(naive.items())), cython_batch
            decoded = lambda: dict(naive.items())  # noqa: E731
        partner_times = []

        def between_rounds():
            started = time.perf_counter()
            partner()
            partner_times.append(time.perf_counter() - started)

        count, stats = timed(benchmark, read, rounds=ROUNDS[reader].get(n, 3), setup=between_rounds)
        assert count == n
        assert decoded() == expected
    if stats:
        results.put(("read", reader, n), dict(stats, partner_min=min(partner_times)))
