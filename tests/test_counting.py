"""Exact counts on the real kernel, checked against independent oracles."""
import shutil
import subprocess
import time

import pytest

from conftest import Connector, unique_comm
from metrics import comm_total, pid_value, pids_of


def test_counts_equal_active_opens_of_the_namespace(exporter):
    comm = unique_comm()
    with Connector(comm, opened=7, refused=5) as proc:
        text = exporter.scrape()
        assert proc.active_opens == 12
        assert pid_value(text, proc.pid, proc.comm) == 12
        assert comm_total(text, proc.comm) == 12


def test_threads_count_toward_their_process(exporter):
    with Connector(unique_comm(), opened=3, refused=2, threads=4) as proc:
        text = exporter.scrape()
        assert proc.active_opens == 20
        assert pid_value(text, proc.pid, proc.comm) == 20
        assert pids_of(text, proc.comm) == {proc.pid}


def test_exit_drops_the_pid_and_keeps_the_comm_total(exporter):
    comm = unique_comm()
    with Connector(comm, opened=4) as first:
        assert pid_value(exporter.scrape(), first.pid, first.comm) == 4
    text = exporter.scrape()
    assert pid_value(text, first.pid, first.comm) is None
    assert comm_total(text, first.comm) == 4
    with Connector(comm, refused=3) as second:
        text = exporter.scrape()
        assert pid_value(text, second.pid, second.comm) == 3
        assert comm_total(text, second.comm) == 7
    assert pids_of(exporter.scrape(), second.comm) == set()


BPFTRACE_SCRIPT = """
tracepoint:sock:inet_sock_set_state
/args->oldstate == 7 && args->newstate == 2 && args->protocol == 6 && comm == "%s"/
{ @[pid] = count(); }
"""


@pytest.mark.skipif(not shutil.which("bpftrace"), reason="bpftrace is not installed (scripts/apt-packages.txt)")
def test_counts_equal_bpftrace_on_the_same_hook(exporter, node_mounts):  # bpftrace reads tracefs
    comm = unique_comm()
    tracer = subprocess.Popen(["bpftrace", "-e", BPFTRACE_SCRIPT % comm], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        banner = []
        while not banner or "Attaching" not in banner[-1]:
            banner.append(tracer.stdout.readline())
            assert banner[-1] and len(banner) < 5, banner
        time.sleep(0.5)
        with Connector(comm, opened=6, refused=3) as proc:
            ours = pid_value(exporter.scrape(), proc.pid, proc.comm)
    finally:
        tracer.send_signal(subprocess.signal.SIGINT)
        output, _ = tracer.communicate(timeout=30)
    assert f"@[{proc.pid}]: 9" in output, output
    assert ours == 9


def test_a_full_map_shows_in_the_update_failures_metric(fresh_pin_dir):
    from conftest import Exporter
    from metrics import samples
    from tcpmon import loader
    loader.load(fresh_pin_dir, max_pids=1)
    comm = unique_comm()
    procs = [Connector(comm, opened=1) for _ in range(3)]
    server = Exporter(fresh_pin_dir)
    try:
        text = server.scrape()
        failures = samples(text, "tcpmon_map_update_failures_total")
        # Other processes on the host may hit the full map too, so at least ours.
        assert failures[frozenset({"map": "connects"}.items())] >= 2
        assert failures[frozenset({"map": "comm_totals"}.items())] == 0
        assert comm_total(text, comm.encode()) == 3
    finally:
        server.stop()
        for proc in procs:
            proc.close()
