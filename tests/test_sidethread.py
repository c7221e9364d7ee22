"""tcpmon.sidethread: a call runs on another thread beside the caller, its result and its
exception come back, a busy thread never queues; a deferred call's result waits for its
starter; and a scrape split over two threads reads and renders exactly what the same scrape
on one thread does, with the small maps' work in the caller while it is cheap."""
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import Connector, unique_comm
from metrics import comm_total, pid_value, samples
from tcpmon import maps
from tcpmon.collector import INLINE_BUDGET, Collector
from tcpmon.exposition import Renderer
from tcpmon.sidethread import Deferred, SideThread, run_here

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


def test_a_deferred_call_runs_when_its_starter_says_and_its_takers_wait_for_it():
    calls, taken = [], []
    deferred = Deferred(lambda x: calls.append(threading.get_ident()) or x + 1, 41)
    taker = threading.Thread(target=lambda: taken.append(deferred.result()))
    taker.start()
    taker.join(0.2)
    assert taker.is_alive() and calls == [], "the result was taken before the call ran"
    deferred.run()
    taker.join(WAIT)
    assert taken == [42] and calls == [threading.get_ident()]
    assert deferred.result() == 42 and len(calls) == 1, "a second taker ran the call again"
    failing = Deferred(int, "not a number")
    failing.run()
    with pytest.raises(ValueError):
        failing.result()


def _outcomes_of(body, comm):
    """{result: count} of `comm`'s tcpmon_connects_total samples in the text `body`."""
    return {dict(key)["result"]: value for key, value in samples(body, "tcpmon_connects_total").items()
            if dict(key)["comm"] == comm}


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
            renderer = Renderer()
            for snapshot in (first, second):
                whole = renderer.render(snapshot)
                early = b"".join(renderer.render_parts(snapshot, grouped=renderer.grouped_parts(snapshot)))
                # Connects elsewhere on the host may land between the two reads: each read's two
                # renderings are compared line by line.
                assert _without_changing_lines(whole) == _without_changing_lines(early)
                body = whole.decode()
                assert pid_value(body, proc.pid, proc.comm) == 7 and comm_total(body, proc.comm) == 7
                results = _outcomes_of(body, comm)
                assert results["success"] == 3 and results["refused"] == 4
    finally:
        split.close()
        serial.close()


@pytest.mark.parametrize("fails", [False, True], ids=["made", "failed"])
def test_the_work_beside_a_read_sees_the_small_maps_and_hands_its_result_to_the_render(loaded_pin_dir, fails):
    collector = Collector(loaded_pin_dir, beside=SideThread().start)
    renderer = Renderer()
    seen = {}

    def early(small):
        seen.update(thread=threading.get_ident(), maps=set(small.reads))
        if fails:
            raise OSError("beside")
        return renderer.grouped_parts(small)

    def then(snapshot, grouped):
        seen["grouped"] = grouped
        return b"".join(renderer.render_parts(snapshot, grouped=grouped))

    comm = unique_comm()
    try:
        with Connector(comm, opened=2, refused=1):
            snapshot, body = collector.snapshot_then(then, early=early)
        assert seen["thread"] != threading.get_ident(), "the early work did not run on the side thread"
        assert seen["maps"] == {maps.COMM_TOTALS.name, maps.OUTCOMES.name, maps.DESTINATIONS.name,
                                maps.UPDATE_FAILURES.name}, "the early work saw the connects map or missed one"
        assert (seen["grouped"] is None) == fails
        results = _outcomes_of(body.decode(), comm)
        assert (results["success"], results["refused"]) == (2, 1)
        assert _without_changing_lines(body) == _without_changing_lines(renderer.render(snapshot))
    finally:
        collector.close()


def test_the_work_beside_a_read_runs_in_the_caller_while_cheap_and_on_the_side_thread_when_not(loaded_pin_dir):
    """With `start` (the server's), the caller (the event loop) does the small maps and `early`
    itself while a native thread reads the connects map; a scrape whose part took longer than
    INLINE_BUDGET sends the next one's to the side thread, until it is cheap again."""
    reader = ThreadPoolExecutor(1)
    collector = Collector(loaded_pin_dir, offload=lambda fn, *args: reader.submit(fn, *args).result(),
                          start=reader.submit, beside=SideThread().start)
    renderer = Renderer()
    slow = [False, False, True, False, False]   # the third scrape's early work is slow
    ran_in, read_in = [], []

    def early(small):
        ran_in.append(threading.get_ident())
        if slow[len(ran_in) - 1]:
            time.sleep(3 * INLINE_BUDGET)
        return renderer.grouped_parts(small)

    def then(snapshot, grouped):
        read_in.append(threading.get_ident())
        assert grouped is not None, "the early work's result did not reach the render"
        return b"".join(renderer.render_parts(snapshot, grouped=grouped))

    comm = unique_comm()
    try:
        with Connector(comm, opened=2, refused=1):
            bodies = [collector.snapshot_then(then, early=early) for _ in slow]
        here = threading.get_ident()
        where = ["caller" if ident == here else "read" if ident == read_in[0] else "side" for ident in ran_in]
        assert where == ["caller", "caller", "caller", "side", "caller"]
        assert here not in read_in and len(set(read_in)) == 1
        for snapshot, body in bodies:
            results = _outcomes_of(body.decode(), comm)
            assert (results["success"], results["refused"]) == (2, 1)
            assert _without_changing_lines(body) == _without_changing_lines(renderer.render(snapshot))
    finally:
        reader.shutdown()
        collector.close()
