"""--workers 2: whichever worker answers, every scrape shows both workers' own counters, labelled
worker="0" and worker="1", and none of them ever goes back (tcpmon.workers).

Oracle: with nothing loaded, each scrape is one failed read of each map in the worker that
answered it, so after k scrapes on fresh connections the read errors summed over the workers are
exactly k.
"""
import time

import pytest

from conftest import Exporter, http_get
from metrics import samples

SCRAPES = 40
MAX_SCRAPES = 200   # until both workers have answered some


def by_worker(text, name, **labels):
    found = {}
    for key, value in samples(text, name).items():
        key = dict(key)
        if all(key.get(k) == v for k, v in labels.items()):
            found[key["worker"]] = value
    return found


@pytest.fixture
def two_workers(fresh_pin_dir):
    server = Exporter(fresh_pin_dir, "--workers", "2")
    deadline = time.monotonic() + 20
    while len(server.worker_pids()) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(server.worker_pids()) == 2
    time.sleep(1.5)   # both have published their slot once
    yield server
    assert server.stop() == 0


def test_per_worker_counters_never_go_back_whichever_worker_answers(two_workers):
    previous = {}
    answered = set()
    for k in range(1, MAX_SCRAPES + 1):
        if k > SCRAPES and answered == {"0", "1"}:
            break
        status, headers, body = http_get(two_workers.metrics + "/metrics", headers={"Connection": "close"})
        assert status == 200
        text = body.decode()
        errors = by_worker(text, "tcpmon_map_read_errors_total", map="connects")
        assert set(errors) == {"0", "1"}, errors
        assert sum(errors.values()) == k, (k, errors)
        for worker, value in errors.items():
            if value > previous.get(("errors", worker), 0):
                answered.add(worker)
        series = {("errors", w): v for w, v in errors.items()}
        series.update({("cpu", w): v for w, v in by_worker(text, "process_cpu_seconds_total").items()})
        series.update({("gc", w): v for w, v in by_worker(text, "python_gc_collections_total", generation="0").items()})
        assert {key[0] for key in series} == {"errors", "cpu", "gc"}
        for key, value in series.items():
            assert value >= previous.get(key, 0), (k, key, value, previous.get(key))
        previous = series
    assert answered == {"0", "1"}, "one worker answered every scrape: the test proved nothing"
    # this worker's own families are not also served unlabelled
    assert all("worker" in dict(key) for key in samples(text, "tcpmon_map_read_errors_total"))
    assert all("worker" in dict(key) for key in samples(text, "process_cpu_seconds_total"))
    truncated = samples(text, "tcpmon_map_read_truncated_total")
    assert truncated and all("worker" in dict(key) for key in truncated)


def test_one_worker_keeps_the_unlabelled_families(exporter):
    text = exporter.scrape()
    assert all("worker" not in dict(key) for key in samples(text, "tcpmon_map_read_errors_total"))
    assert samples(text, "process_cpu_seconds_total")
