"""A node that holds the previous release's pins takes this release without losing counts.

The previous release (ABI 1: connects, comm_totals, a two-slot update_failures, no stamp) is
built here from git history and loaded the way its loader pinned it; then this release's
`tcpmon load` runs over it.
"""
import subprocess
import time
from pathlib import Path

import pytest

from conftest import TCPMON, Connector, Exporter, http_get, unique_comm
from metrics import samples
from tcpmon import _libbpf, loader, maps, state
from tcpmon.pins import Pins

ROOT = Path(__file__).resolve().parent.parent
PREVIOUS_RELEASE = "50a79e04dcd19dccca602c08d20e9061925e4f72"  # the last commit of ABI 1
PREVIOUS_SOURCES = ("bpf/tcpconnect.bpf.c", "bpf/tcpmon.h", "bpf/kernel_types.h")


@pytest.fixture(scope="module")
def previous_object(tmp_path_factory):
    """The previous release's BPF object, compiled from its sources in git."""
    out = tmp_path_factory.mktemp("previous")
    for source in PREVIOUS_SOURCES:
        shown = subprocess.run(["git", "-C", str(ROOT), "show", f"{PREVIOUS_RELEASE}:{source}"],
                               capture_output=True)
        if shown.returncode != 0:
            pytest.skip(f"the previous release ({PREVIOUS_RELEASE[:7]}) is not in this clone's history")
        (out / Path(source).name).write_bytes(shown.stdout)
    arch = {"x86_64": "x86", "aarch64": "arm64"}.get(subprocess.check_output(["uname", "-m"], text=True).strip())
    obj = out / "tcpconnect.bpf.o"
    subprocess.run(["clang", "-g", "-O2", "-target", "bpf", f"-D__TARGET_ARCH_{arch}", "-c",
                    str(out / "tcpconnect.bpf.c"), "-o", str(obj)], check=True)
    return obj


def load_previous(obj, pin_dir):
    """What the previous release's `tcpmon load` pinned, in tp_btf mode."""
    Path(pin_dir).mkdir()
    pins = Pins(pin_dir)
    with _libbpf.BpfObject(obj) as bpf:
        for program in ("connect_kprobe", "connect_fentry", "connect_tp_btf", "connect_tp",
                        "process_exit", "process_exit_btf"):
            bpf.set_autoload(program, program in ("connect_tp_btf", "process_exit_btf"))
        for name in ("connects", "comm_totals", "update_failures"):
            bpf.set_pin_path(name, f"{pin_dir}/{name}")
        bpf.load()
        for program, prog_pin, link_pin in (("process_exit_btf", pins.exit_prog, pins.exit_link),
                                            ("connect_tp_btf", pins.connect_prog, pins.connect_link)):
            link = bpf.attach(program)
            bpf.pin_program(program, prog_pin)
            link.pin(link_pin)


def comm_total(pin_dir, comm):
    with maps.open_map(Pins(pin_dir), maps.COMM_TOTALS) as totals:
        value = totals.lookup(maps.comm_key(comm.encode()))
    return None if value is None else maps.COMM_TOTALS.value.unpack(value)["count"]


def program_ids(pin_dir):
    return {info["id"] for info in state.inspect(Pins(pin_dir)).programs.values()}


def test_the_previous_release_s_pins_migrate_and_keep_counting(previous_object, fresh_pin_dir):
    load_previous(previous_object, fresh_pin_dir)
    old_programs = program_ids(fresh_pin_dir)
    comm = unique_comm("tcpmu")
    with Connector(comm, opened=3, refused=2) as before:
        assert before.active_opens == 5
        with maps.open_map(Pins(fresh_pin_dir), maps.CONNECTS) as connects:
            old_pid_count = connects.lookup(maps.CONNECTS.key.pack(tgid=before.pid))
        problem = state.inspect(Pins(fresh_pin_dir)).problem
        assert "not ABI v2" in problem and "tcpmon load" in problem, problem
        cli = subprocess.run([*TCPMON, "load", "--pin-dir", fresh_pin_dir], capture_output=True, text=True)
        assert cli.returncode == 0, cli.stderr
        assert "migrating the pins" in cli.stdout and "replaced map update_failures" in cli.stdout, cli.stdout
        assert "connects" not in cli.stdout.split("replaced map")[-1].split("\n")[0]
        assert comm_total(fresh_pin_dir, comm) == 5  # kept across the upgrade
        with maps.open_map(Pins(fresh_pin_dir), maps.CONNECTS) as connects:
            assert connects.lookup(maps.CONNECTS.key.pack(tgid=before.pid)) == old_pid_count
    assert state.inspect(Pins(fresh_pin_dir)).attached
    assert not old_programs & program_ids(fresh_pin_dir)
    with Connector(comm, opened=4, refused=1) as after:
        assert after.active_opens == 5
    assert comm_total(fresh_pin_dir, comm) == 10  # counting went on, once per connect
    server = Exporter(fresh_pin_dir)
    try:
        assert http_get(server.health + "/readiness")[0] == 200
        successes = [value for labels, value in samples(server.scrape(), "tcpmon_connects_total").items()
                     if dict(labels)["comm"] == comm and dict(labels)["result"] == "success"]
        assert successes == [4]
    finally:
        server.stop()
    # the old programs are freed once their links are gone (RCU: poll)
    deadline = time.monotonic() + 10
    while any(subprocess.run(["bpftool", "prog", "show", "id", str(i)], capture_output=True).returncode == 0
              for i in old_programs) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert time.monotonic() < deadline, "the previous release's programs are still loaded"


def test_loading_again_after_the_migration_changes_nothing(previous_object, fresh_pin_dir):
    load_previous(previous_object, fresh_pin_dir)
    first = loader.load(fresh_pin_dir)
    assert first.migrated
    second = loader.load(fresh_pin_dir)
    assert second.already_loaded and not second.migrated


def test_pins_of_a_newer_release_are_refused_and_left_alone(fresh_pin_dir):
    loader.load(fresh_pin_dir)
    pins = Pins(fresh_pin_dir)
    newer = pins.dir / f"abi-{maps.ABI_VERSION + 1}"
    pins.stamp.rename(newer)
    try:
        before = sorted(path.name for path in pins.dir.iterdir())
        cli = subprocess.run([*TCPMON, "load", "--pin-dir", fresh_pin_dir], capture_output=True, text=True)
        assert cli.returncode == 1
        assert cli.stderr.startswith(f"tcpmon: the pins under {fresh_pin_dir} are ABI v{maps.ABI_VERSION + 1}, "
                                     "newer than this tcpmon"), cli.stderr
        assert len(cli.stderr.strip().splitlines()) == 1
        assert sorted(path.name for path in pins.dir.iterdir()) == before
    finally:
        newer.rename(pins.stamp)
