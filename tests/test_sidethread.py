"""tcpmon.sidethread: a call runs on another thread beside the caller, its result and its
exception come back, a busy thread never queues; and a scrape split over two threads reads and
renders exactly what the same scrape on one thread does."""
import re
import threading

import pytest

from conftest import Connector, unique_comm
from metrics import comm_total, pid_value, samples
from tcpmon import maps
from tcpmon.collector import Collector
from tcpmon.exposition import Renderer
from tcpmon.sidethread import SideThread, run_here

WAIT = 10   # seconds: a call that never ran beside the caller fails the test instead of hanging it


def test_a_call_runs_beside_the_caller_and_returns_its_result():
    side = SideThread()
    started, release = threading.Event(), threading.Event()

    def call(x):
        started.set()
        assert release.wait(WAIT), "the caller never released the call"
        return x * 2, threading.get_ident()

    handle = side.start(call, 21)
    assert started.wait(WAIT), "the call did not start while the caller went on"
    release.set()
    value, ident = handle.result()
    assert value == 42 and ident != threading.get_ident()


def test_the_exception_of_a_call_is_raised_in_the_caller():
    side = SideThread()

    def fail():
        raise KeyError("from the side")

    handle = side.start(fail)
    with pytest.raises(KeyError, match="from the side"):
        handle.result()
    assert side.start(lambda: 7).result() == 7, "a failed call left the thread busy"


def test_a_busy_thread_leaves_the_next_call_to_the_thread_that_takes_its_result():
    side = SideThread()
    release = threading.Event()
    first = side.start(lambda: release.wait(WAIT))
    ran = []
    second = side.start(lambda: ran.append(threading.get_ident()) or "second")   # while the first is not taken
    assert ran == [], "a call for a busy thread ran in the thread that started it"
    taker = threading.Thread(target=lambda: ran.append(second.result()))
    taker.start()
    taker.join(WAIT)
    assert ran == [taker.ident, "second"]
    assert second.result() == "second" and len(ran) == 2, "a call ran twice"
    release.set()
    assert first.result() is True
    third = side.start(threading.get_ident)    # the first was taken: the thread is free again
    assert third.result() not in (threading.get_ident(), taker.ident)


def test_run_here_runs_the_call_now():
    calls = []
    handle = run_here(calls.append, 1)
    assert calls == [1] and handle.result() is None


def _without_changing_lines(body):
    """The body without what changes from one scrape to the next whatever is read: this
    process's own metrics and the read's duration."""
    return [line for line in body.decode().split("\n")
            if not re.match(r"(# (HELP|TYPE) )?(process_|python_gc_|tcpmon_scrape_duration_seconds)", line)]


def test_a_scrape_on_two_threads_reads_and_renders_what_one_thread_does(loaded_pin_dir):
    side = SideThread().start
    split, serial = Collector(loaded_pin_dir, beside=side), Collector(loaded_pin_dir)
    comm = unique_comm()
    try:
        with Connector(comm, opened=3, refused=4) as proc:
            first, second = split.snapshot(), serial.snapshot()
            for snapshot in (first, second):
                assert set(snapshot.reads) == {spec.name for spec in (maps.CONNECTS, maps.COMM_TOTALS, maps.OUTCOMES,
                                                                       maps.DESTINATIONS)}
                assert snapshot.probe_state.attached and snapshot.update_failures is not None
                assert snapshot.process, "the process metrics were not read"
            bodies = [Renderer(beside=beside).render(snapshot)
                      for beside in (side, run_here) for snapshot in (first, second)]
            for body in map(bytes.decode, bodies):
                assert pid_value(body, proc.pid, proc.comm) == 7 and comm_total(body, proc.comm) == 7
                results = {dict(key)["result"]: value for key, value in samples(body, "tcpmon_connects_total").items()
                           if dict(key)["comm"] == comm}
                assert results["success"] == 3 and results["refused"] == 4
            # Connects elsewhere on the host may land between the two reads: each read's two
            # renderings are compared line by line.
            assert _without_changing_lines(bodies[0]) == _without_changing_lines(bodies[2])
            assert _without_changing_lines(bodies[1]) == _without_changing_lines(bodies[3])
    finally:
        split.close()
        serial.close()
