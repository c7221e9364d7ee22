"""Injected faults on the real kernel: each has a clear outcome, and nothing the kernel still
holds is lost.  Checked through what users see: HTTP status and body, metrics, the CLI.

docs/DEVELOPMENT.md ("What survives what") lists every fault with its outcome and test."""
import http.client
import json
import os
import re
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import TCPMON, Connector, Exporter, http_get, open_fds, process_tree, unique_comm
from metrics import comm_total, pid_value, pids_of, samples
from tcpmon import _maps, collector, exposition, loader, maps, mounts, state
from tcpmon.pins import Pins

TOOLS = Path(__file__).resolve().parent / "tools"
SYSTEM_PYTHON = "/usr/bin/python3"  # Debian's, with python3-seccomp


def tcpmon(*args, timeout=60):
    return subprocess.run([*TCPMON, *args], capture_output=True, text=True, timeout=timeout)


def readiness(server):
    status, _, body = http_get(server.health + "/readiness")
    return status, body.decode()


def attached_metric(text):
    values = samples(text, "tcpmon_probe_attached")
    assert len(values) == 1, values
    return next(iter(values.values()))


def per_map(text, name, map_name):
    return samples(text, name).get(frozenset({"map": map_name}.items()))


def status_json(pin_dir):
    result = tcpmon("status", "--json", "--pin-dir", pin_dir)
    assert "Traceback" not in result.stderr
    return result.returncode, json.loads(result.stdout)


def poll(predicate, attempts=100, pause=0.1):
    """predicate() once it is truthy; after `attempts` tries, its last value."""
    for _ in range(attempts - 1):
        value = predicate()
        if value:
            return value
        time.sleep(pause)
    return predicate()


def object_exists(kind, object_id):
    return subprocess.run(["bpftool", kind, "show", "id", str(object_id)], capture_output=True).returncode == 0


def kernel_objects(pin_dir):
    """[(kind, id)] of every program, link and map pinned under `pin_dir`."""
    pins = Pins(pin_dir)
    found = []
    for path in pins.programs():
        if path.exists():
            found.append(("prog", _maps.pinned_prog_info(path)["id"]))
    for path in pins.links():
        if path.exists():
            found.append(("link", _maps.pinned_link_info(path)["id"]))
    for path in pins.maps():
        if path.exists():
            with _maps.BpfMap(path) as bpf_map:
                found.append(("map", bpf_map.map_id))
    return found


def assert_nothing_behind(pin_dir, objects):
    """The pin dir is gone and the kernel freed every object it held (freed after RCU: poll)."""
    assert not os.path.lexists(pin_dir)
    assert poll(lambda: not any(object_exists(kind, object_id) for kind, object_id in objects)), objects


# --- §2: attachment is a fact of the kernel ------------------------------------------------

CAP_BPF_ONLY = ["setpriv", "--inh-caps=-all,+bpf", "--ambient-caps=-all,+bpf", "--bounding-set=-all,+bpf", "--"]


def status_as_the_exporter(pin_dir):
    """`tcpmon status --json` as the chart runs the exporter: CAP_BPF alone, /sys/fs/bpf read-only."""
    run = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                          'mount -o remount,bind,ro /sys/fs/bpf && exec "$@"', "sh", *CAP_BPF_ONLY,
                          *TCPMON, "status", "--json", "--pin-dir", pin_dir], capture_output=True, text=True, timeout=60)
    assert "Traceback" not in run.stderr, run.stderr
    return run.returncode, json.loads(run.stdout)


def hold_in_foreground(pin_dir):
    holder = subprocess.Popen([*TCPMON, "load", "--foreground", "--pin-dir", pin_dir],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    while not lines or "holding the probe" not in lines[-1]:
        lines.append(holder.stdout.readline())
        assert lines[-1] and len(lines) < 10, lines
    return holder


def test_a_foreground_loader_killed_by_sigkill_is_not_attached_and_load_attaches_again(fresh_pin_dir):
    server = Exporter(fresh_pin_dir)
    comm = unique_comm()
    try:
        holder = hold_in_foreground(fresh_pin_dir)
        with Connector(comm, opened=2) as proc:
            assert proc.active_opens == 2
        assert readiness(server) == (200, "ready\n")
        assert attached_metric(server.scrape()) == 1
        code, report = status_as_the_exporter(fresh_pin_dir)
        assert code == 0 and report["attached"] is True and report["held_by_foreground"] is True
        holder.send_signal(signal.SIGKILL)  # as the OOM killer would: no handler runs
        assert holder.wait(timeout=10) == -signal.SIGKILL
        assert os.path.exists(Pins(fresh_pin_dir).connect_prog)  # the programs stay pinned

        code, report = status_json(fresh_pin_dir)
        assert code == 3 and report["attached"] is False and report["held_by_foreground"] is False
        assert "no 'tcpmon load --foreground' holds them" in report["problem"], report
        assert report["problem"].endswith("run 'tcpmon load'")
        assert status_as_the_exporter(fresh_pin_dir) == (code, report)
        status, body = readiness(server)
        assert (status, body) == (503, f"not ready: {report['problem']}\n")
        text = server.scrape()
        assert attached_metric(text) == 0
        with Connector(comm, opened=3):  # and indeed nothing counts now
            assert comm_total(server.scrape(), comm.encode()) == 2

        load = tcpmon("load", "--pin-dir", fresh_pin_dir)
        assert load.returncode == 0, load.stderr
        assert "tcpmon: attached in mode" in load.stdout and "already" not in load.stdout
        assert readiness(server) == (200, "ready\n")
        with Connector(comm, opened=4, refused=1) as proc:
            text = server.scrape()
            assert pid_value(text, proc.pid, proc.comm) == 5 == proc.active_opens
        assert comm_total(text, comm.encode()) == 2 + 5  # the maps, and their counts, survived
        assert attached_metric(text) == 1
        assert status_json(fresh_pin_dir)[0] == 0
    finally:
        assert server.stop() == 0


SCRAPES = 3
COLLECT = f"""
import json, os, sys
from tcpmon import maps
from tcpmon.collector import Collector
collector = Collector(sys.argv[1])
found = []
for _ in range({SCRAPES}):
    snapshot = collector.snapshot()
    os.getppid()  # marks the end of this scrape in the trace
    counts = {{key["tgid"]: value["connects"] for key, value in snapshot.entries(maps.CONNECTS)}}
    read = list(snapshot.reads) + (["update_failures"] if snapshot.update_failures is not None else [])
    found.append({{"read": sorted(read), "errors": snapshot.read_errors,
                  "connects": counts.get(int(sys.argv[2]))}})
print(json.dumps({{"scrapes": found, "read_mode": collector.read_mode}}))
"""


def test_a_kernel_that_refuses_batch_lookups_costs_one_failed_call_per_worker(pin_dir, tmp_path):
    """no_batch.py makes bpf(BPF_MAP_LOOKUP_BATCH) fail with EINVAL, as a kernel before 5.6 does;
    strace counts the attempts the collector makes per scrape."""
    trace = tmp_path / "trace"
    with Connector(unique_comm(), opened=2, refused=1) as proc:
        run = subprocess.run(["strace", "-f", "-qq", "-o", str(trace), "-e", "trace=bpf,getppid",
                              SYSTEM_PYTHON, str(TOOLS / "no_batch.py"), sys.executable, "-c", COLLECT,
                              pin_dir, str(proc.pid)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    attempts, refused = [0], 0
    for line in trace.read_text().splitlines():
        if "getppid(" in line:
            attempts.append(0)
        elif "BPF_MAP_LOOKUP_BATCH" in line:
            attempts[-1] += 1
            refused += "= -1 EINVAL" in line
    assert attempts == [1] + [0] * (SCRAPES - 1) + [0], attempts
    assert refused == 1
    assert report["read_mode"] == "iterate"
    for scrape in report["scrapes"]:  # and every scrape read every map, per key
        assert scrape == {"read": sorted(spec.name for spec in collector.SCRAPED), "errors": {}, "connects": 3}
    assert "reading every map per key from now on" in run.stderr


# --- §2: truncated reads ------------------------------------------------------------------

@pytest.fixture
def churned_map(fresh_pin_dir, request):
    """A pinned `connects`-shaped hash map of `request.param` entries that tests/tools/churn.py
    keeps full while replacing its keys; key k always holds the value k."""
    mounts.ensure_bpffs(fresh_pin_dir)  # on a fresh host nothing has mounted it yet
    os.makedirs(fresh_pin_dir)
    path = f"{fresh_pin_dir}/connects"
    subprocess.run(["bpftool", "map", "create", path, "type", "hash", "key", "4", "value", "24",
                    "entries", str(request.param), "name", "connects"], check=True)
    churn = subprocess.Popen([sys.executable, str(TOOLS / "churn.py"), path], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert churn.stdout.readline() == "full\n"
        yield path
    finally:
        churn.stdin.close()
        churn.wait(timeout=10)


def check_pairs(bpf_map):
    """Every key read is distinct and came with its own value (no torn or shifted entries)."""
    keys = [struct.unpack_from("=I", bpf_map.keys, 4 * i)[0] for i in range(bpf_map.count)]
    values = [struct.unpack_from("=Q", bpf_map.values, bpf_map.value_stride * i)[0] for i in range(bpf_map.count)]
    assert keys == values and len(set(keys)) == len(keys) <= bpf_map.max_entries


def truncations(bpf_map, mode, wanted, reads):
    """Reasons seen over up to `reads` reads under churn, stopping once every `wanted` one was."""
    seen = set()
    for _ in range(reads):
        count = bpf_map.read(mode)
        assert count == bpf_map.count
        check_pairs(bpf_map)
        seen.add(bpf_map.truncated)
        if wanted <= seen:
            break
    return seen


@pytest.mark.parametrize("churned_map, mode, wanted", [
    (64, "batch", {"ENOSPC", "capacity"}),        # ENOSPC: the next bucket no longer fits
    (16, "iterate", {"capacity", "iteration bound"}),
], indirect=["churned_map"])
def test_a_read_of_a_full_churning_map_keeps_what_it_read_and_says_why_it_stopped(churned_map, mode, wanted):
    with _maps.BpfMap(churned_map) as bpf_map:
        seen = truncations(bpf_map, mode, wanted, reads=200000)
    assert wanted <= seen, seen


@pytest.mark.parametrize("churned_map", [64], indirect=True)
def test_truncated_reads_are_counted_per_map_and_logged_once_per_run(churned_map, caplog):
    reader = collector.Collector(os.path.dirname(churned_map))
    caplog.set_level("WARNING", logger="tcpmon.collector")
    snapshot, truncated = None, 0
    for _ in range(200000):
        snapshot = reader.snapshot()
        read = snapshot.connects
        assert read is not None and read.count <= read.max_entries
        truncated += read.truncated is not None
        if truncated >= 3:
            break
    reader.close()
    assert snapshot.read_truncations == {"connects": truncated} and truncated >= 3
    text = exposition.render(snapshot).decode()
    assert per_map(text, "tcpmon_map_read_truncated_total", "connects") == truncated
    assert per_map(text, "tcpmon_map_read_truncated_total", "comm_totals") == 0
    lines = [r.getMessage() for r in caplog.records if "stopped early" in r.getMessage()]
    assert 1 <= len(lines) <= truncated and all(line.startswith("reading connects stopped early (") for line in lines)


# --- §3: pins and bpffs under a running exporter ---------------------------------------

def exporter_fds(server):
    """Fewest open fds of the exporter's processes over a few looks (a reply may still be closing)."""
    looks = [open_fds(process_tree(server.proc.pid)) for _ in range(5) if not time.sleep(0.05)]
    return {kind: min(look[kind] for look in looks) for kind in ("all", "bpf")}


def test_pins_removed_under_a_running_exporter_then_loaded_again(loaded_pin_dir):
    server = Exporter(loaded_pin_dir)
    try:
        assert readiness(server) == (200, "ready\n")
        server.scrape()
        processes = process_tree(server.proc.pid)
        before = exporter_fds(server)
        assert before["bpf"] >= len(collector.SCRAPED)

        for name in os.listdir(loaded_pin_dir):  # rm -r, behind tcpmon's back
            path = os.path.join(loaded_pin_dir, name)
            os.rmdir(path) if os.path.isdir(path) else os.unlink(path)
        os.rmdir(loaded_pin_dir)

        status, body = readiness(server)
        assert (status, body) == (503, f"not ready: pin dir {loaded_pin_dir} does not exist: run 'tcpmon load'\n")
        for _ in range(3):
            text = server.scrape()
            assert attached_metric(text) == 0
            assert samples(text, "tcp_connects_by_pid") == {}
            assert samples(text, "process_open_fds")  # the self-metrics are still there
        assert per_map(text, "tcpmon_map_read_errors_total", "connects") >= 3
        health = json.loads(http_get(server.health + "/health")[2])
        assert health["ready"] is False and "tcpmon load" in health["reason"]
        assert process_tree(server.proc.pid) == processes  # no worker crashed or was replaced
        after = exporter_fds(server)
        assert after["bpf"] == 0 and after["all"] <= before["all"] - before["bpf"]

        loader.load(loaded_pin_dir)
        assert readiness(server) == (200, "ready\n")
        with Connector(unique_comm(), opened=3, refused=2) as proc:
            text = server.scrape()
            assert pid_value(text, proc.pid, proc.comm) == 5 == proc.active_opens
        assert attached_metric(text) == 1
        assert process_tree(server.proc.pid) == processes
        assert exporter_fds(server) == before
    finally:
        assert server.stop() == 0


def in_namespace_of(server):
    return ["nsenter", f"--mount=/proc/{server.proc.pid}/ns/mnt", "--"]


def test_bpffs_unmounted_and_remounted_under_a_running_exporter(loaded_pin_dir, tmp_path):
    """The exporter runs in a mount namespace of its own, where the host's bpffs is also bound
    at `spare`; only that namespace's mounts change."""
    spare = tmp_path / "bpffs"
    spare.mkdir()
    own_namespace = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                     f'mount --bind /sys/fs/bpf {spare} && exec "$@"', "sh"]
    server = Exporter(loaded_pin_dir, prefix=own_namespace)
    inside = in_namespace_of(server)
    comm = unique_comm()
    try:
        assert readiness(server) == (200, "ready\n")
        subprocess.run([*inside, "umount", "/sys/fs/bpf"], check=True)
        status, body = readiness(server)
        assert status == 503 and body == (f"not ready: pin dir {loaded_pin_dir} does not exist: no bpffs is "
                                          "mounted at /sys/fs/bpf (mount -t bpf bpf /sys/fs/bpf), then run "
                                          "'tcpmon load'\n")
        assert attached_metric(server.scrape()) == 0
        with Connector(comm, opened=2):  # the probe counts on: the host's mount still pins it
            pass

        subprocess.run([*inside, "mount", "--bind", str(spare), "/sys/fs/bpf"], check=True)
        assert readiness(server) == (200, "ready\n")
        with Connector(comm, opened=1, refused=1) as proc:
            text = server.scrape()
            assert pid_value(text, proc.pid, proc.comm) == 2
        assert comm_total(text, comm.encode()) == 4  # counted while unmounted too

        # A new, empty bpffs instead: nothing is pinned there until a load.
        subprocess.run([*inside, "umount", "/sys/fs/bpf"], check=True)
        subprocess.run([*inside, "mount", "-t", "bpf", "bpf", "/sys/fs/bpf"], check=True)
        assert readiness(server) == (503, f"not ready: pin dir {loaded_pin_dir} does not exist: run 'tcpmon load'\n")
        load = subprocess.run([*inside, *TCPMON, "load", "--pin-dir", loaded_pin_dir], capture_output=True, text=True)
        assert load.returncode == 0 and "attached in mode" in load.stdout, load.stderr
        assert readiness(server) == (200, "ready\n")
        with Connector(comm, opened=3) as proc:
            assert pid_value(server.scrape(), proc.pid, proc.comm) == 3
        subprocess.run([*inside, *TCPMON, "unload", "--pin-dir", loaded_pin_dir], check=True, capture_output=True)
    finally:
        assert server.stop() == 0
    assert comm_total_of(loaded_pin_dir, comm) == 4 + 3  # the host's probe counted all along


def comm_total_of(pin_dir, comm):
    with maps.open_map(Pins(pin_dir), maps.COMM_TOTALS) as totals:
        value = totals.lookup(maps.comm_key(comm.encode()))
    return None if value is None else int.from_bytes(value, "little")


def test_the_pin_dir_replaced_by_a_file_then_put_back(loaded_pin_dir):
    aside = loaded_pin_dir + "-aside"
    server = Exporter(loaded_pin_dir)
    comm = unique_comm()
    try:
        os.rename(loaded_pin_dir, aside)  # the probe stays pinned (and counting) under aside
        subprocess.run(["bpftool", "map", "create", loaded_pin_dir, "type", "array", "key", "4", "value", "4",
                        "entries", "1", "name", "not_a_dir"], check=True)
        problem = (f"pin dir {loaded_pin_dir} is not a directory: remove what is there ('rm {loaded_pin_dir}') "
                   "and run 'tcpmon load', or use another --pin-dir")
        assert readiness(server) == (503, f"not ready: {problem}\n")
        assert attached_metric(server.scrape()) == 0
        code, report = status_json(loaded_pin_dir)
        assert code == 3 and report["problem"] == problem
        for command in ("load", "dump"):
            result = tcpmon(command, "--pin-dir", loaded_pin_dir)
            assert (result.returncode, result.stderr) == (1, f"tcpmon: {problem}\n")
        unload = tcpmon("unload", "--pin-dir", loaded_pin_dir)  # leaves what it did not pin alone
        assert unload.returncode == 0 and os.path.isfile(loaded_pin_dir), unload.stderr
        with Connector(comm, opened=2):
            pass

        os.unlink(loaded_pin_dir)
        os.rename(aside, loaded_pin_dir)
        assert readiness(server) == (200, "ready\n")
        assert comm_total(server.scrape(), comm.encode()) == 2
    finally:
        assert server.stop() == 0
        if os.path.isdir(aside):
            loader.unload(aside)


@pytest.mark.parametrize("pin, other, command, kind", [
    ("connects", "prog_connect", "prog", "a BPF program, not a BPF map"),
    ("prog_connect", "comm_totals", "map", "a BPF map, not a BPF program"),
    ("link_connect", "comm_totals", "map", "a BPF map, not a BPF link"),
])
def test_a_pin_replaced_by_an_object_of_another_kind(loaded_pin_dir, pin, other, command, kind):
    path, aside = f"{loaded_pin_dir}/{pin}", f"{loaded_pin_dir}/{pin}-aside"
    server = Exporter(loaded_pin_dir)
    comm = unique_comm()
    try:
        os.rename(path, aside)
        subprocess.run(["bpftool", command, "pin", "pinned", f"{loaded_pin_dir}/{other}", path], check=True)
        problem = f"{path} is {kind}: run 'tcpmon unload' and load again"
        assert readiness(server) == (503, f"not ready: {problem}\n")
        with Connector(comm, opened=2):
            text = server.scrape()
        assert comm_total(text, comm.encode()) == 2  # the other maps are still read
        if pin == "connects":
            assert per_map(text, "tcpmon_map_read_errors_total", "connects") >= 1
            dump = tcpmon("dump", "--pin-dir", loaded_pin_dir)
            assert (dump.returncode, dump.stderr) == (1, f"tcpmon: {problem}\n")
        else:
            assert attached_metric(text) == 0
            assert status_json(loaded_pin_dir)[1]["problem"] == problem

        os.unlink(path)
        os.rename(aside, path)
        assert readiness(server) == (200, "ready\n")
        with Connector(comm, opened=1) as proc:
            text = server.scrape()
            assert pid_value(text, proc.pid, proc.comm) == 1
        assert comm_total(text, comm.encode()) == 3
    finally:
        assert server.stop() == 0


# --- §3: tcpmon load killed part way -------------------------------------------------------

def bpf_calls(trace):
    """[(command, pinned name or None)] of every bpf() call in an strace log, in order."""
    calls = []
    for line in trace.splitlines():
        found = re.search(r'bpf\((BPF_\w+), (?:\{pathname="([^"]*)")?', line)
        if found:
            calls.append((found.group(1), found.group(2) and os.path.basename(found.group(2))))
    return calls


def kill_call(calls, point):
    """The 1-based index of the bpf() call to kill `tcpmon load` at, so that it dies right after
    the last map pin, the first link pin, or the last program pin."""
    pins = [(i, name) for i, (command, name) in enumerate(calls, 1) if command == "BPF_OBJ_PIN"]
    kinds = {"maps": [i for i, name in pins if name in maps.BY_NAME],
             "first link": [i for i, name in pins if name.startswith("link_")][:1],
             "programs": [i for i, name in pins if name.startswith("prog_")]}
    return kinds[point][-1] + 1


def traced_load(pin_dir, mode, tmp_path):
    trace = tmp_path / f"trace-{os.path.basename(pin_dir)}"
    subprocess.run(["strace", "-qq", "-s", "256", "-o", str(trace), "-e", "trace=bpf", *TCPMON, "load",
                    "--attach", mode, "--pin-dir", pin_dir], check=True, capture_output=True, timeout=120)
    return bpf_calls(trace.read_text())


def killed_load(pin_dir, mode, call):
    run = subprocess.run(["strace", "-qq", "-o", "/dev/null", "-e", "trace=bpf",
                          "-e", f"inject=bpf:signal=KILL:when={call}", *TCPMON, "load", "--attach", mode,
                          "--pin-dir", pin_dir], capture_output=True, text=True, timeout=120)
    assert run.returncode == -signal.SIGKILL, (run.returncode, run.stderr)


def after_a_dead_foreground_loader(pin_dir, comm):
    """Maps that hold counts (`comm`: 2 connects), programs pinned, nothing attached."""
    holder = hold_in_foreground(pin_dir)
    with Connector(comm, opened=2):
        pass
    holder.kill()
    holder.wait(timeout=10)


STARTS = {"fresh": lambda pin_dir, comm: None, "counting": after_a_dead_foreground_loader}
LEFT = {  # what the killed load left pinned, of the pins that tell the three points apart
    "maps": {"connects"},
    "first link": {"connects", "prog_exit", "link_exit"},
    "programs": {"connects", "prog_exit", "link_exit", "prog_connect"},
}
TELLING = {"connects", "prog_exit", "link_exit", "prog_connect", "link_connect"}


@pytest.fixture(scope="module")
def session_mode(pin_dir):
    return state.inspect(Pins(pin_dir)).mode


@pytest.mark.parametrize("start, point", [("fresh", "maps"), ("fresh", "first link"), ("fresh", "programs"),
                                          ("counting", "first link"), ("counting", "programs")])
@pytest.mark.parametrize("then", ["load", "unload"])
def test_a_load_killed_part_way_is_repaired_by_the_next_load_and_unload_leaves_nothing(
        fresh_pin_dir, session_mode, tmp_path, start, point, then):
    comm = unique_comm()
    rehearsal = fresh_pin_dir + "-rehearsal"  # the same start, traced, to find the call to kill at
    try:
        STARTS[start](rehearsal, comm)
        call = kill_call(traced_load(rehearsal, session_mode, tmp_path), point)
    finally:
        loader.unload(rehearsal)
    STARTS[start](fresh_pin_dir, comm)
    killed_load(fresh_pin_dir, session_mode, call)
    assert set(os.listdir(fresh_pin_dir)) & TELLING == LEFT[point]
    code, report = status_json(fresh_pin_dir)
    assert code == 3 and report["attached"] is False and report["problem"].endswith("run 'tcpmon load'"), report
    counted = 2 if start == "counting" else None

    if then == "load":
        load = tcpmon("load", "--pin-dir", fresh_pin_dir)
        assert load.returncode == 0 and "tcpmon: attached in mode" in load.stdout, (load.stdout, load.stderr)
        assert "migrating" not in load.stdout  # an interrupted load's pins are this release's
        assert status_json(fresh_pin_dir)[0] == 0
        with Connector(comm, opened=3, refused=1) as proc:
            entries = json.loads(tcpmon("dump", "--json", "--pin-dir", fresh_pin_dir).stdout)
            assert {e["pid"]: e["connects"] for e in entries}[proc.pid] == 4 == proc.active_opens
        counted = (counted or 0) + 4
    assert comm_total_of(fresh_pin_dir, comm) == counted  # kept wherever the maps survived

    objects = kernel_objects(fresh_pin_dir)
    unload = tcpmon("unload", "--pin-dir", fresh_pin_dir)
    assert unload.returncode == 0 and unload.stderr == "", unload.stderr
    assert_nothing_behind(fresh_pin_dir, objects)


# --- §3: the exporter's own processes ------------------------------------------------------

def workers(server):
    return process_tree(server.proc.pid)[1:]


def test_a_worker_killed_mid_scrape_is_replaced_and_the_next_scrape_is_200(pin_dir):
    server = Exporter(pin_dir)
    try:
        server.scrape()
        (worker,) = poll(lambda: workers(server))
        # strace kills the worker at its next bpf() call: reading a map, in the middle of a scrape.
        tracer = subprocess.Popen(["strace", "-f", "-o", "/dev/null", "-p", str(worker), "-e", "trace=bpf",
                                   "-e", "inject=bpf:signal=KILL:when=1"], stderr=subprocess.PIPE, text=True)
        assert "attached" in tracer.stderr.readline()
        with pytest.raises((OSError, http.client.HTTPException)):
            http_get(server.metrics + "/metrics", timeout=30)
        tracer.wait(timeout=30)
        assert poll(lambda: not os.path.exists(f"/proc/{worker}") or open(f"/proc/{worker}/stat").read().split()[2] == "Z")
        replaced = poll(lambda: [pid for pid in workers(server) if pid != worker])
        assert replaced, "gunicorn started no new worker"
        with Connector(unique_comm(), opened=2, refused=2) as proc:
            status, _, body = http_get(server.metrics + "/metrics", timeout=30)
            assert status == 200 and pid_value(body.decode(), proc.pid, proc.comm) == 4
        assert readiness(server) == (200, "ready\n")
    finally:
        assert server.stop() == 0


# --- §3: a full map -------------------------------------------------------------------------

def test_a_map_filled_by_real_processes_counts_its_failures_and_says_so(fresh_pin_dir):
    loader.load(fresh_pin_dir, max_pids=8)
    server = Exporter(fresh_pin_dir)
    comm = unique_comm()
    procs = []
    try:
        procs = [Connector(comm, opened=1, refused=1) for _ in range(12)]
        text = server.scrape()
        ours = pids_of(text, comm.encode())
        assert len(ours) <= 8 and all(pid_value(text, pid, comm.encode()) == 2 for pid in ours)
        missing = 12 - len(ours)
        assert missing >= 4
        # Other processes on this host may find the map full too: at least ours.
        failures = per_map(text, "tcpmon_map_update_failures_total", "connects")
        assert failures >= missing
        assert per_map(text, "tcpmon_map_max_entries", "connects") == 8
        assert comm_total(text, comm.encode()) == 24 == sum(proc.active_opens for proc in procs)
        status, body = readiness(server)
        assert status == 200
        found = re.fullmatch(r"ready\nnote: map connects ran full: (\d+) connects it had no room for since load "
                             r"\(raise --max-pids\)\n", body)
        assert found and int(found.group(1)) >= missing, body
        notes = json.loads(http_get(server.health + "/health")[2])["notes"]
        assert any(note.startswith("map connects ran full: ") for note in notes), notes
    finally:
        for proc in procs:
            proc.close()
        assert server.stop() == 0


# --- §3: the exporter's environment ---------------------------------------------------------

READ_ONLY_ROOT = r"""
set -e
# Every mount read-only, /sys/fs/bpf too, as the chart runs the exporter; the kernel's
# own /proc and /dev stay as a container runtime leaves them.
for mount_point in $(awk '{print $2}' /proc/self/mounts | sort -u); do
    case "$mount_point" in /proc|/proc/*|/dev|/dev/*) continue;; esac
    mount -o remount,bind,ro "$mount_point" 2>/dev/null || true
done
mount -t tmpfs -o size=64k tmpfs /tmp
case "$PWD" in /tmp/*)  # a checkout under /tmp: bind it back (our cwd still is the original)
    mkdir -p "$PWD"
    mount --no-canonicalize --bind /proc/self/cwd "$PWD"
    mount -o remount,bind,ro "$PWD";;
esac
dd if=/dev/zero of=/tmp/fill bs=4k 2>/dev/null || true
for path in /tmp/one-more "$PWD/.rw-check" /sys/fs/bpf/rw-check /root/.rw-check; do
    if (printf x > "$path") 2>/dev/null; then echo "could write $path" >&2; exit 9; fi
done
exec "$@"
"""


def test_the_exporter_serves_from_a_read_only_root_with_a_full_tmp(pin_dir):
    server = Exporter(pin_dir, prefix=["unshare", "--mount", "--propagation", "private", "sh", "-c",
                                       READ_ONLY_ROOT, "sh"])
    try:
        assert readiness(server) == (200, "ready\n")
        with Connector(unique_comm(), opened=3, refused=1) as proc:
            text = server.scrape()
            assert pid_value(text, proc.pid, proc.comm) == 4 == proc.active_opens
        assert http_get(server.health + "/health")[0] == 200
    finally:
        assert server.stop() == 0
    output = server.proc.stdout.read()
    assert "Traceback" not in output and "Read-only file system" not in output and "No space left" not in output


# --- §3: many CLI calls at once -----------------------------------------------------------

STORM = """
import gc, json, os, sys
from tcpmon import cli, dumping  # imported once, before the forks

pin_dir, out_dir, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
go_read, go_write = os.pipe()
gc.freeze()  # keep the children's copy-on-write pages few
children = []
for i in range(count):
    pid = os.fork()
    if pid == 0:
        os.close(go_write)
        args = ["status", "--json", "--pin-dir", pin_dir] if i % 2 else ["dump", "--json", "--pin-dir", pin_dir]
        out = os.open(f"{out_dir}/{i}.out", os.O_WRONLY | os.O_CREAT, 0o600)
        os.dup2(out, 1)
        os.dup2(out, 2)
        os.close(out)
        os.read(go_read, 1)  # every child waits here until the parent lets them all go at once
        os.close(go_read)
        before = len(os.listdir("/proc/self/fd"))
        code = cli.main(args)
        sys.stdout.flush()
        after = len(os.listdir("/proc/self/fd"))
        with open(f"{out_dir}/{i}.fds", "w") as f:
            f.write(f"{before} {after}")
        os._exit(code)
    children.append(pid)
os.close(go_read)
os.close(go_write)  # EOF for every child: go
codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in children]
print(json.dumps(codes))
"""


def test_a_thousand_concurrent_status_and_dump_calls_against_a_live_probe(fresh_pin_dir, tmp_path):
    # Small maps: each call's read buffers are sized from them, a thousand times over.
    loader.load(fresh_pin_dir, max_pids=1024, max_comms=1024, max_sockets=1024, max_outcomes=1024)
    pin_dir, calls = fresh_pin_dir, 1000
    with Connector(unique_comm(), opened=2, refused=1) as proc:
        run = subprocess.run([sys.executable, "-c", STORM, pin_dir, str(tmp_path), str(calls)],
                             capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr
        codes = json.loads(run.stdout)
        assert codes == [0] * calls, sorted(set(codes))
        for i in range(calls):
            output = json.loads((tmp_path / f"{i}.out").read_text())  # nothing but the JSON
            if i % 2:
                assert output["attached"] is True and output["problem"] is None
                assert all("error" not in fill for fill in output["maps"].values()), output["maps"]
            else:
                assert {"pid": proc.pid, "comm": proc.comm.decode(), "connects": 3} in output
            before, after = map(int, (tmp_path / f"{i}.fds").read_text().split())
            assert after == before, (i, before, after)
        entries = json.loads(tcpmon("dump", "--json", "--pin-dir", pin_dir).stdout)
        assert {"pid": proc.pid, "comm": proc.comm.decode(), "connects": 3} in entries  # still exact
