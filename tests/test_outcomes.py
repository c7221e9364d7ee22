"""How connects end, counted in the kernel: every result class, latency buckets and sums, IPv6
and v4-mapped addresses, no leaked in-flight entries, and overflow of the in-flight map.

Oracles the test controls, in a network namespace of the connecting process
(tests/tools/outcomes.py): the listener's accepts, the errno each connect() returned, the
namespace's ActiveOpens, nft rules that drop, reject or delay SYNs, and the time each delayed
connect took as the process measured it.
"""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client.utils import floatToGoString

from conftest import Exporter, unique_comm
from metrics import samples
from tcpmon import _render, loader, maps
from tcpmon.pins import Pins

OUTCOMES = Path(__file__).resolve().parent / "tools" / "outcomes.py"
BOUNDS = [2 ** (slot + 1) / 1e6 for slot in range(maps.LATENCY_SLOTS - 1)]


class Outcomes:
    """tests/tools/outcomes.py in its own netns; alive until closed."""

    def __init__(self, comm, **counts):
        args = [arg for name, n in counts.items() for arg in (f"--{name}", str(n))]
        self.proc = subprocess.Popen(["unshare", "-n", sys.executable, str(OUTCOMES), "--comm", comm, *args],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"outcomes.py failed: {self.proc.stderr.read()}")
        self.report = json.loads(line)

    def close(self):
        if self.proc.poll() is None:
            self.proc.stdin.write("\n")
            self.proc.stdin.flush()
        self.proc.wait(timeout=10)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def outcome_entries(pin_dir, comm):
    """The outcomes map's entries for `comm` (one per cgroup), summed."""
    with maps.open_map(Pins(pin_dir), maps.OUTCOMES) as bpf_map:
        bpf_map.read()
        rows = [value for key, value in maps.OUTCOMES.entries(bpf_map) if key["comm"] == maps.comm_key(comm.encode())]
    assert rows, f"no outcomes entry for {comm}"
    return {"attempts": sum(r["attempts"] for r in rows),
            "results": [sum(r["results"][i] for r in rows) for i in range(len(maps.RESULTS))],
            "duration_ns": sum(r["duration_ns"] for r in rows),
            "latency": [sum(r["latency"][i] for r in rows) for i in range(maps.LATENCY_SLOTS)]}


def in_flight(pin_dir, comm):
    with maps.open_map(Pins(pin_dir), maps.SOCKETS) as bpf_map:
        bpf_map.read()
        return [value for _, value in maps.SOCKETS.entries(bpf_map) if value["comm"] == maps.comm_key(comm.encode())]


def kernel_misses(pin_dir):
    """{program name: runs the kernel skipped}, as bpftool reads the pinned programs."""
    found = {}
    for path in filter(Path.exists, Pins(pin_dir).programs()):
        info = json.loads(subprocess.run(["bpftool", "-j", "prog", "show", "pinned", str(path)],
                                         capture_output=True, text=True, check=True).stdout)
        found[info["name"]] = info.get("recursion_misses", 0)
    return found


def what_was_lost(pin_dir):
    """Why a count could be missing: skipped runs and full maps (shown when an exact check fails)."""
    with maps.open_map(Pins(pin_dir), maps.UPDATE_FAILURES) as failures:
        failures.read()
        return {"missed runs": kernel_misses(pin_dir), "update failures": maps.failures_by_map(failures)}


INITIAL_RTO = 1.0  # seconds: a dropped first SYN is sent again no sooner (TCP_TIMEOUT_INIT)


def slot_of(seconds):
    us = max(int(seconds * 1e6), 0)
    return min(int(math.log2(us)) if us > 1 else 0, maps.LATENCY_SLOTS - 1)


def slots_between(low, high):
    """The latency slots of every duration from `low` to `high` seconds."""
    return set(range(slot_of(low), slot_of(high) + 1))


EVERY_WAY = dict(success=5, success6=3, mapped=2, refused=4, timeout=2, unreachable=3, other=1, aborted=3,
                 delayed=2)


@pytest.fixture(scope="module")
def ended(pin_dir):
    """One process that ended connects in every way, and what the kernel counted for it."""
    comm = unique_comm("tcpmo")
    with Outcomes(comm, **EVERY_WAY) as proc:
        counted = outcome_entries(pin_dir, comm)
        counted["lost"] = what_was_lost(pin_dir)
        yield comm, proc.report, counted


def test_every_attempt_is_counted_once(ended):
    _, report, counted = ended
    assert counted["attempts"] == report["active_opens"] == sum(EVERY_WAY.values())


def test_each_result_class_matches_what_connect_returned(ended):
    _, report, counted = ended
    results = dict(zip(maps.RESULTS, counted["results"]))
    errors = report["errors"]
    assert sum(results.values()) == counted["attempts"], (results, counted["lost"])
    assert report["accepted"] == EVERY_WAY["success"] + EVERY_WAY["success6"] + EVERY_WAY["mapped"]
    assert results["success"] == report["accepted"] + report["delayed_accepted"] == errors["ok"] + EVERY_WAY["delayed"]
    assert results["refused"] == errors["ECONNREFUSED"] == EVERY_WAY["refused"]
    assert results["timeout"] == errors["ETIMEDOUT"] == EVERY_WAY["timeout"]
    assert results["unreachable"] == errors["EHOSTUNREACH"] == EVERY_WAY["unreachable"]
    assert results["other"] == errors["ENOPROTOOPT"] == EVERY_WAY["other"]
    assert results["aborted"] == EVERY_WAY["aborted"]
    assert sum(results.values()) == counted["attempts"]


def test_delayed_connects_land_in_their_buckets_and_the_sum(ended):
    _, report, counted = ended
    delayed = report["delayed_seconds"]
    assert len(delayed) == EVERY_WAY["delayed"] and all(0.9 < s < 3.5 for s in delayed), delayed
    # every other success is a loopback handshake: well under a millisecond's slot
    slow = [n for slot, n in enumerate(counted["latency"]) if BOUNDS[min(slot, len(BOUNDS) - 1)] > 0.5]
    assert sum(slow) == len(delayed)
    # The kernel times from inside connect() to the handshake's end: no less than the initial
    # RTO, no more than the caller saw (who also waited to be scheduled).
    for seconds in delayed:
        slots = slots_between(INITIAL_RTO, seconds)
        assert any(counted["latency"][slot] for slot in slots), (seconds, counted["latency"])
    assert sum(n for slot, n in enumerate(counted["latency"])
               if slot in set().union(*(slots_between(INITIAL_RTO, s) for s in delayed))) == len(delayed)
    total = counted["duration_ns"] / 1e9
    fast = sum(counted["latency"]) - len(delayed)
    assert INITIAL_RTO * len(delayed) <= total <= sum(delayed) + fast * 0.01
    assert sum(counted["latency"]) == counted["results"][0]


def test_no_entry_of_a_finished_connect_stays_in_flight(ended, pin_dir):
    comm, _, _ = ended
    assert in_flight(pin_dir, comm) == []


def test_the_exporter_serves_results_and_a_histogram(ended, exporter):
    comm, _, counted = ended
    text = exporter.scrape()
    label = _render.comm_label(comm.encode())
    outcomes = {dict(k)["result"]: v for k, v in samples(text, "tcpmon_connects_total").items()
                if dict(k)["comm"] == label}
    assert outcomes == {result: float(n) for result, n in zip(maps.RESULTS, counted["results"])}
    buckets = {dict(k)["le"]: v for k, v in samples(text, "tcpmon_connect_duration_seconds_bucket").items()
               if dict(k)["comm"] == label}
    assert buckets["+Inf"] == counted["results"][0]
    cumulative = 0
    for slot, bound in enumerate(BOUNDS):
        cumulative += counted["latency"][slot]
        assert buckets[floatToGoString(bound)] == cumulative
    (total,) = [v for k, v in samples(text, "tcpmon_connect_duration_seconds_sum").items()
                if dict(k)["comm"] == label]
    assert total == pytest.approx(counted["duration_ns"] / 1e9)
    (count,) = [v for k, v in samples(text, "tcpmon_connect_duration_seconds_count").items()
                if dict(k)["comm"] == label]
    assert count == counted["results"][0]


def test_the_exporter_serves_the_runs_the_kernel_skipped(pin_dir, exporter):
    served = {dict(k)["program"]: v for k, v in samples(exporter.scrape(), "tcpmon_probe_missed_runs_total").items()}
    # the kernel's own name field holds 15 bytes; bpftool shows the BTF name in full
    kernel = {name[:15]: n for name, n in kernel_misses(pin_dir).items()}
    assert set(served) == set(kernel) and any(name.startswith("connect_") for name in served)
    assert all(served[name] <= kernel[name] for name in kernel)  # read before bpftool's, never more


def test_a_process_killed_mid_connect_leaves_nothing_in_flight(pin_dir):
    comm = unique_comm("tcpmk")
    # connects to the dropping port stay in SYN_SENT until the process dies
    code = ("import socket, ctypes, os, sys, time; ctypes.CDLL(None).prctl(15, sys.argv[1].encode(), 0, 0, 0);"
            "import subprocess; subprocess.run(['ip', 'link', 'set', 'lo', 'up'], check=True);"
            "subprocess.run(['nft', 'add table ip t; add chain ip t o { type filter hook output priority 0; };"
            " add rule ip t o tcp dport 9 drop'], check=True);"
            "socks = [socket.socket() for _ in range(5)];"
            "[s.setblocking(False) or s.connect_ex(('127.0.0.1', 9)) for s in socks];"
            "print('connecting', flush=True); time.sleep(60)")
    victim = subprocess.Popen(["unshare", "-n", sys.executable, "-c", code, comm], stdout=subprocess.PIPE, text=True)
    try:
        assert victim.stdout.readline().strip() == "connecting"
        assert len(in_flight(pin_dir, comm)) == 5
    finally:
        victim.kill()
        victim.wait()
    assert in_flight(pin_dir, comm) == []
    counted = outcome_entries(pin_dir, comm)
    assert counted["attempts"] == 5 and dict(zip(maps.RESULTS, counted["results"]))["aborted"] == 5


def test_a_full_in_flight_map_counts_what_it_could_not_track(fresh_pin_dir):
    loader.load(fresh_pin_dir, max_sockets=4)
    comm = unique_comm("tcpmf")
    with Outcomes(comm, timeout=10):
        pass
    counted = outcome_entries(fresh_pin_dir, comm)
    assert counted["attempts"] == 10
    tracked = sum(counted["results"])
    assert tracked >= 4 and counted["results"][maps.RESULTS.index("timeout")] == tracked
    with maps.open_map(Pins(fresh_pin_dir), maps.UPDATE_FAILURES) as failures:
        failures.read()
        lost = maps.failures_by_map(failures)["sockets"]
    assert lost >= 10 - tracked  # other connects on the host may have found it full too
