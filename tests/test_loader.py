"""tcpmon load / unload / status on the real kernel."""
import json
import os
import signal
import subprocess
import time

import pytest

from conftest import TCPMON, Connector, unique_comm
from tcpmon import _maps, attach, loader, maps, state
from tcpmon.pins import Pins
from tcpmon.cli import read_pid_entries
from tcpmon.errors import LoadError, MapLayoutError


def program_exists(prog_id):
    return subprocess.run(["bpftool", "prog", "show", "id", str(prog_id)], capture_output=True).returncode == 0


def wait_gone(prog_ids, timeout=10):
    """Programs are freed after their last reference goes (RCU), so poll."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(program_exists(prog_id) for prog_id in prog_ids):
            return True
        time.sleep(0.1)
    return False


def comm_total(pin_dir, comm):
    with maps.open_map(Pins(pin_dir), maps.COMM_TOTALS) as totals:
        value = totals.lookup(comm.ljust(maps.COMM_LEN, b"\0"))
    return None if value is None else int.from_bytes(value, "little")


def test_auto_takes_the_first_mode_that_works_and_says_why_it_skipped_the_others(fresh_pin_dir):
    result = loader.load(fresh_pin_dir)
    order = attach.MODE_NAMES
    assert result.mode in order
    assert list(result.skipped) == list(order[:order.index(result.mode)])
    assert all(why for why in result.skipped.values())
    assert state.inspect(Pins(fresh_pin_dir)).mode == result.mode


def test_load_twice_attaches_once_and_keeps_counts(fresh_pin_dir):
    first = loader.load(fresh_pin_dir)
    before = state.inspect(Pins(fresh_pin_dir))
    comm = unique_comm().encode()
    with Connector(comm.decode(), opened=3):
        pass
    second = loader.load(fresh_pin_dir)
    assert second.already_loaded and second.mode == first.mode
    again = state.inspect(Pins(fresh_pin_dir))
    assert {info["id"] for info in again.programs.values()} == {info["id"] for info in before.programs.values()}
    assert {info["id"] for info in again.links.values()} == {info["id"] for info in before.links.values()}
    with Connector(comm.decode(), refused=2):
        pass
    assert comm_total(fresh_pin_dir, comm) == 5


def test_unload_detaches_and_removes_every_pin(fresh_pin_dir):
    loader.load(fresh_pin_dir)
    prog_ids = [info["id"] for info in state.inspect(Pins(fresh_pin_dir)).programs.values()]
    assert len(prog_ids) == 2 and all(program_exists(prog_id) for prog_id in prog_ids)
    pinned = sorted(os.listdir(fresh_pin_dir))
    known = {p.name for p in Pins("/").all()} | {Pins("/").stamp.name}
    assert set(pinned) <= known and Pins("/").stamp.name in pinned
    removed = loader.unload(fresh_pin_dir)
    assert sorted(os.path.basename(path) for path in removed) == pinned
    assert not os.path.exists(fresh_pin_dir)
    assert wait_gone(prog_ids)


def test_a_map_with_another_layout_is_refused_with_the_fix(fresh_pin_dir):
    os.makedirs(fresh_pin_dir)
    path = f"{fresh_pin_dir}/connects"
    subprocess.run(["bpftool", "map", "create", path, "type", "hash", "key", "4", "value", "16",
                    "entries", "64", "name", "connects"], check=True)
    with pytest.raises(MapLayoutError) as error:
        loader.load(fresh_pin_dir)
    assert str(error.value) == (f"pinned map {path} has value size 16, expected 24: "
                                "run 'tcpmon unload' and load again")
    cli = subprocess.run([*TCPMON, "load", "--pin-dir", fresh_pin_dir], capture_output=True, text=True)
    assert cli.returncode == 1
    assert cli.stderr == f"tcpmon: {error.value}\n"
    assert not Pins(fresh_pin_dir).connect_link.exists()


def test_tracepoint_mode_counts_exactly(fresh_pin_dir):
    assert loader.load(fresh_pin_dir, attach="tracepoint").mode == "tracepoint"
    with Connector(unique_comm(), opened=4, refused=4) as proc:
        entries = {entry["pid"]: entry for entry in read_pid_entries(fresh_pin_dir)}
        assert entries[proc.pid]["connects"] == proc.active_opens == 8


def test_switching_mode_needs_an_unload(fresh_pin_dir):
    mode = loader.load(fresh_pin_dir).mode
    other = "tracepoint" if mode != "tracepoint" else "tp_btf"
    with pytest.raises(LoadError, match=f"already attached in mode {mode}.*tcpmon unload"):
        loader.load(fresh_pin_dir, attach=other)


def test_a_mode_the_kernel_lacks_fails_cleanly(fresh_pin_dir):
    skipped = loader.load(fresh_pin_dir).skipped
    loader.unload(fresh_pin_dir)
    if not skipped:
        pytest.skip("every attach mode works on this kernel")
    mode, why = next(iter(skipped.items()))
    with pytest.raises(LoadError) as error:
        loader.load(fresh_pin_dir, attach=mode)
    assert str(error.value) == f"no attach mode worked under {fresh_pin_dir}: {mode}: {why}"
    assert os.listdir(fresh_pin_dir) == []  # the maps it created are gone again


def test_full_map_counts_its_failures(fresh_pin_dir):
    loader.load(fresh_pin_dir, max_pids=4)
    comm = unique_comm()
    procs = [Connector(comm, opened=1) for _ in range(6)]
    try:
        with maps.open_map(Pins(fresh_pin_dir), maps.CONNECTS) as connects:
            assert connects.max_entries == 4
            connects.read()
            assert connects.count == 4
        ours_stored = sum(entry["comm"] == comm for entry in read_pid_entries(fresh_pin_dir))
        with maps.open_map(Pins(fresh_pin_dir), maps.UPDATE_FAILURES) as failures:
            failures.read()
            per_cpu = [int.from_bytes(bytes(failures.values)[i:i + 8], "little")
                       for i in range(0, failures.value_stride, 8)]
        # Other processes on the host may hit the full map too, so at least ours.
        assert sum(per_cpu) >= 6 - ours_stored >= 2
        assert comm_total(fresh_pin_dir, comm.encode()) == 6
    finally:
        for proc in procs:
            proc.close()


def test_foreground_holds_the_probe_until_sigterm(fresh_pin_dir):
    holder = subprocess.Popen([*TCPMON, "load", "--foreground", "--pin-dir", fresh_pin_dir],
                              stdout=subprocess.PIPE, text=True)
    try:
        lines = [holder.stdout.readline()]
        while "holding the probe" not in lines[-1]:
            lines.append(holder.stdout.readline())
            assert lines[-1] and len(lines) < 10, lines
        held = state.inspect(Pins(fresh_pin_dir))
        assert held.attached and held.links == {}
        prog_ids = [info["id"] for info in held.programs.values()]
        with Connector(unique_comm(), opened=2) as proc:
            assert {e["pid"]: e["connects"] for e in read_pid_entries(fresh_pin_dir)}[proc.pid] == 2
    finally:
        holder.send_signal(signal.SIGTERM)
        assert holder.wait(timeout=10) == 0
    assert not state.inspect(Pins(fresh_pin_dir)).attached
    assert wait_gone(prog_ids)
    comm = unique_comm()
    with Connector(comm, opened=2):
        pass
    assert comm_total(fresh_pin_dir, comm.encode()) is None


def test_load_mounts_bpffs_when_it_is_missing():
    # A private mount namespace without bpffs: the loader must mount it itself.
    pin_dir = "/sys/fs/bpf/tcpmon-test-mount"
    script = (f"umount /sys/fs/bpf 2>/dev/null; ! grep -q ' /sys/fs/bpf bpf ' /proc/self/mounts || exit 9; "
              f"{' '.join(TCPMON)} load --pin-dir {pin_dir} && {' '.join(TCPMON)} status --json --pin-dir {pin_dir}")
    run = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    status = json.loads(run.stdout[run.stdout.index("{"):])
    assert status["attached"] and status["pin_dir"] == pin_dir
    assert not os.path.exists(pin_dir)  # that bpffs lived only in the namespace
