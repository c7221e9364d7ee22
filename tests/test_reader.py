"""The raw bpf() reader: batch and per-key paths, fallback, layout checks, read-only fds."""
import os
import socket
import struct
import subprocess

import pytest

from conftest import Connector, unique_comm
from tcpmon import _maps, maps
from tcpmon.pins import Pins
from tcpmon.errors import MapLayoutError

PID_VALUE = struct.Struct("=Q16s")


def bpftool_map(path, *spec):
    subprocess.run(["bpftool", "map", "create", path, *spec], check=True)


def fill(path, entries, tmp_path):
    """Insert raw (key, value) pairs with one bpftool batch."""
    def hexbytes(raw):
        return " ".join(f"{b:02x}" for b in raw)
    batch = tmp_path / "fill.batch"
    batch.write_text("".join(f"map update pinned {path} key hex {hexbytes(k)} value hex {hexbytes(v)}\n"
                             for k, v in entries))
    subprocess.run(["bpftool", "batch", "file", str(batch)], check=True, capture_output=True)


def entries_of(bpf_map):
    keys, values = bytes(bpf_map.keys), bytes(bpf_map.values)
    ks, vs = bpf_map.key_size, bpf_map.value_stride
    return {keys[i * ks:(i + 1) * ks]: values[i * vs:(i + 1) * vs] for i in range(bpf_map.count)}


@pytest.fixture
def map_dir(fresh_pin_dir):
    os.makedirs(fresh_pin_dir)
    return fresh_pin_dir


# A chunk of 1 meets buckets of two or more entries (2000 in 4096 buckets), which the kernel
# refuses with ENOSPC: the reader asks again for the room left.
@pytest.mark.parametrize("chunk", [1, 7, _maps.BATCH_CHUNK, 1 << 20])
def test_batch_and_iterate_read_the_same_entries(map_dir, tmp_path, chunk):
    path = f"{map_dir}/connects"
    bpftool_map(path, "type", "hash", "key", "4", "value", "24", "entries", "3000", "name", "connects")
    wanted = {struct.pack("=I", pid): PID_VALUE.pack(pid * 3, f"c{pid}".encode()) for pid in range(1, 2001)}
    fill(path, wanted.items(), tmp_path)
    with maps.open_map(Pins(map_dir), maps.CONNECTS) as bpf_map:
        assert bpf_map.read("batch", chunk=chunk) == 2000
        assert entries_of(bpf_map) == wanted and bpf_map.truncated is None
        assert bpf_map.read("iterate") == 2000
        assert entries_of(bpf_map) == wanted


@pytest.mark.parametrize("chunk", [1, 7, _maps.BATCH_CHUNK])
def test_a_chunked_batch_read_of_an_array_reads_every_slot_once(map_dir, tmp_path, chunk):
    path = f"{map_dir}/slots"
    bpftool_map(path, "type", "array", "key", "4", "value", "8", "entries", "20", "name", "slots")
    wanted = {struct.pack("=I", slot): struct.pack("=Q", slot * 11 + 5) for slot in range(20)}
    fill(path, wanted.items(), tmp_path)
    bpf_map = _maps.BpfMap(path)
    try:
        assert bpf_map.read("batch", chunk=chunk) == 20
        assert entries_of(bpf_map) == wanted and bpf_map.truncated is None
        with pytest.raises(ValueError, match="chunk of at least one"):
            bpf_map.read("batch", chunk=0)
    finally:
        bpf_map.close()


def test_auto_falls_back_to_iteration_when_the_kernel_has_no_batch(map_dir, tmp_path):
    # Device maps have no batch lookup: the kernel refuses it.
    path = f"{map_dir}/devices"
    bpftool_map(path, "type", "devmap", "key", "4", "value", "4", "entries", "8", "name", "devices")
    loopback = struct.pack("=I", socket.if_nametoindex("lo"))
    wanted = {struct.pack("=I", slot): loopback for slot in (1, 4, 6)}
    fill(path, wanted.items(), tmp_path)
    bpf_map = _maps.BpfMap(path)
    with pytest.raises(OSError, match="BPF_MAP_LOOKUP_BATCH .*use read mode 'iterate'"):
        bpf_map.read("batch")
    assert bpf_map.read_mode == "auto"
    assert bpf_map.read() == 3
    assert bpf_map.read_mode == "iterate"
    assert entries_of(bpf_map) == wanted
    bpf_map.close()


def test_per_cpu_values_have_one_slot_per_possible_cpu(pin_dir):
    with maps.open_map(Pins(pin_dir), maps.UPDATE_FAILURES) as failures:
        assert failures.value_stride == 8 * _maps.possible_cpus()
        assert failures.read() == len(maps.FAILURE_MAPS)


def test_live_map_agrees_with_the_kernel_in_both_modes(pin_dir):
    with Connector(unique_comm(), opened=2, refused=1) as proc:
        with maps.open_map(Pins(pin_dir), maps.CONNECTS) as connects:
            for mode in ("batch", "iterate"):
                connects.read(mode)
                connects_by_pid = {struct.unpack("=I", k)[0]: PID_VALUE.unpack(v)
                                   for k, v in entries_of(connects).items()}
                assert connects_by_pid[proc.pid] == (3, proc.comm.ljust(16, b"\0"))


@pytest.mark.parametrize("spec, message", [
    (("type", "hash", "key", "4", "value", "16", "entries", "8"), "value size 16, expected 24"),
    (("type", "hash", "key", "8", "value", "24", "entries", "8"), "key size 8, expected 4"),
    (("type", "array", "key", "4", "value", "32", "entries", "8"),
     "type array, expected hash, value size 32, expected 24"),
])
def test_layout_mismatch_names_the_path_every_difference_and_the_fix(map_dir, spec, message):
    path = f"{map_dir}/connects"
    bpftool_map(path, *spec, "name", "connects")
    with pytest.raises(MapLayoutError) as error:
        maps.open_map(Pins(map_dir), maps.CONNECTS)
    assert str(error.value) == f"pinned map {path} has {message}: run 'tcpmon unload' and load again"


def test_missing_pin_says_to_load(map_dir):
    with pytest.raises(FileNotFoundError, match=f"no map pinned at {map_dir}/connects: run 'tcpmon load'"):
        maps.open_map(Pins(map_dir), maps.CONNECTS)


def test_the_exporter_holds_a_read_only_fd_and_close_is_idempotent(pin_dir):
    bpf_map = maps.open_map(Pins(pin_dir), maps.CONNECTS)
    fd = bpf_map.fileno()
    with open(f"/proc/self/fdinfo/{fd}") as f:
        info = dict(line.split(":", 1) for line in f)
    assert int(info["flags"], 8) & os.O_ACCMODE == os.O_RDONLY
    assert int(info["flags"], 8) & os.O_CLOEXEC
    bpf_map.close()
    bpf_map.close()
    with pytest.raises(ValueError, match="closed"):
        bpf_map.read()
