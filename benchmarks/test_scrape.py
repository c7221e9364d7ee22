"""Full scrape through the real gunicorn exporter vs the old agent, and the worker's memory.

live-N: the real probe under a private pin dir counts N live processes (procfarm hold, each with one
connect); map-N: maps with the production layout filled with N synthetic PIDs (100k > pid_max here).
"""
import os
import re
import secrets
import statistics
import subprocess
import time
from dataclasses import dataclass

import pytest

import benchlib
from benchlib import BatchFloor, Farm, OldAgent, Scraper, timed
from tcpmon import _maps, loader, maps
from tcpmon.pins import Pins

ROUNDS = {"tcpmon": {200: 10, 1000: 50, 2000: 10, 10000: 50, 100000: 30},
          "old_agent": {200: 3, 1000: 10, 2000: 3, 10000: 5, 100000: 3}}

PID_SERIES = re.compile(rb'^tcp_connects_by_pid\{comm="([^"]*)",pid="(\d+)"\} (\d+)$', re.M)
COMM_SERIES = re.compile(rb'^tcpmon_connect_attempts_total\{comm="([^"]*)"\} (\d+)$', re.M)
OLD_SERIES = re.compile(rb'^tcp_connects_by_pid\{comm="([^"]*)",pid="(\d+)"\} ([0-9.e+]+)$', re.M)
MAP_ENTRIES = re.compile(rb'^tcpmon_map_entries\{map="connects"\} ([0-9.e+]+)$', re.M)


@dataclass
class ScrapeEnv:
    kind: str
    size: int
    pin_dir: str
    exporter: object
    agent: object
    scrape: object           # Scraper of the exporter's /metrics
    floor: object            # BatchFloor on this env's connects map
    expected_pids: dict      # pid -> (comm, connects) that must be exported
    expected_totals: dict    # comm -> total that must be exported
    closers: list


def pid_series(body):
    return {int(pid): (comm.decode(), int(value)) for comm, pid, value in PID_SERIES.findall(body)}


def comm_series(body):
    return {comm.decode(): int(value) for comm, value in COMM_SERIES.findall(body)}


def make_env(kind, n, helpers, lib):
    pin_dir = f"{benchlib.PIN_PREFIX}scrape-{kind}{n}"
    benchlib.remove_pin_dir(pin_dir)
    closers = [lambda: benchlib.remove_pin_dir(pin_dir)]

    def close_all():
        for close in reversed(closers):
            close()
    try:
        if kind == "live":
            loader.load(pin_dir, max_pids=benchlib.max_pids_for(n))
            farm = Farm(helpers["procfarm"], n, f"bs{secrets.token_hex(2)}-", ncomms=100)
            closers.append(farm.close)
            assert farm.errors == 0, f"{farm.errors} farm processes failed their connect"
            expected_pids = {pid: (farm.comm(i), 1) for i, pid in enumerate(farm.pids)}
            expected_totals = {}
            for comm, _ in expected_pids.values():
                expected_totals[comm] = expected_totals.get(comm, 0) + 1
        else:
            pid_base = 32769  # above pid_max: never a live process
            totals = benchlib.create_production_maps(lib, pin_dir, n, max_pids=benchlib.max_pids_for(n),
                                                     pid_base=pid_base)
            expected_pids = {pid_base + i: (benchlib.synthetic_comm(i % 100).decode(), 1 + i % 5) for i in range(n)}
            expected_totals = {comm.decode(): total for comm, total in totals.items()}
        exporter = benchlib.tests_helpers().Exporter(pin_dir)
        closers.append(exporter.stop)
        agent = OldAgent(pin_dir)
        closers.append(agent.stop)
        scrape = Scraper(exporter.metrics_port)
        closers.append(scrape.close)
        bpf_map = _maps.BpfMap(Pins(pin_dir).map(maps.CONNECTS))
        closers.append(bpf_map.close)
        return ScrapeEnv(kind, n, pin_dir, exporter, agent, scrape, BatchFloor(lib, bpf_map),
                         expected_pids, expected_totals, closers), close_all
    except BaseException:
        close_all()
        raise


def partner_case(full):
    """The largest live case: the map-only case's scrape is timed interleaved with it."""
    return max((case for case in benchlib.SIZES["scrape"][full] if case[0] == "live"), key=lambda case: case[1])


@pytest.fixture(scope="module")
def env_pool(helpers, lib, full):
    """Scrape environments, made on first use.  A new one closes the others first (a loaded probe
    would count the next env's farm too), except the partner case, which stays for the map case."""
    envs = {}
    keep = partner_case(full)

    def get_env(kind, n):
        if (kind, n) not in envs:
            for case in [case for case in envs if case != keep]:
                envs.pop(case)[1]()
            envs[kind, n] = make_env(kind, n, helpers, lib)
        return envs[kind, n][0]
    yield get_env
    for _, close in envs.values():
        close()


@pytest.fixture(scope="module")
def scrape_env(request, env_pool):
    kind, n = request.param
    return env_pool(kind, n)


def test_scrape_exports_every_series(scrape_env):
    """Correctness first (both modes): every expected PID and comm total, exactly."""
    body = scrape_env.scrape()
    exported = pid_series(body)
    missing = {pid: want for pid, want in scrape_env.expected_pids.items() if exported.get(pid) != want}
    assert not missing, f"{len(missing)} PIDs wrong or missing, e.g. {list(missing.items())[:3]}"
    totals = comm_series(body)
    wrong = {comm: (totals.get(comm), want) for comm, want in scrape_env.expected_totals.items()
             if totals.get(comm) != want}
    assert not wrong, f"comm totals (got, want): {list(wrong.items())[:3]}"
    entries = float(MAP_ENTRIES.search(body).group(1))
    assert entries >= scrape_env.size
    old = {int(pid): (comm.decode(), float(value)) for comm, pid, value in OLD_SERIES.findall(scrape_env.agent.scrape())}
    for pid, (comm, connects) in scrape_env.expected_pids.items():
        want = (comm if scrape_env.kind == "live" else "unknown", float(connects))
        assert old.get(pid) == want, f"old agent: pid {pid}: {old.get(pid)} != {want}"


def test_scrape_tcpmon(scrape_env, benchmark, results, request):
    """One GET /metrics per round; before each round (untimed by pytest-benchmark) the C batch floor
    reads this env's connects map, and for the map-only case (100k) the largest live one (10k) is
    scraped too: both timed here, so scrape ÷ floor and 100k ÷ 10k compare rounds interleaved in time."""
    env = scrape_env
    partner = None
    if env.kind == "map":
        partner = request.getfixturevalue("env_pool")(*partner_case(benchmark.enabled))
    floor_times, partner_times = [], []

    def between_rounds():
        started = time.perf_counter()
        env.floor.read()
        floor_times.append(time.perf_counter() - started)
        if partner:
            started = time.perf_counter()
            partner.scrape()
            partner_times.append(time.perf_counter() - started)

    body, stats = timed(benchmark, env.scrape, rounds=ROUNDS["tcpmon"].get(env.size, 5), warmup=2,
                        setup=between_rounds)
    assert len(PID_SERIES.findall(body)) >= env.size
    if stats:
        results.put(("scrape", "tcpmon", env.kind, env.size), stats)
        results.put(("scrape_floor", env.kind, env.size), min(floor_times))
        results.put(("scrape_bytes", env.kind, env.size), len(body))
        if partner:
            results.put(("scrape_partner", env.kind, env.size), (partner.kind, partner.size, min(partner_times)))


def test_scrape_old_agent(scrape_env, benchmark, results):
    env = scrape_env
    body, stats = timed(benchmark, env.agent.scrape, rounds=ROUNDS["old_agent"].get(env.size, 3))
    assert len(OLD_SERIES.findall(body)) >= env.size
    if stats:
        results.put(("scrape", "old_agent", env.kind, env.size), stats)


def test_worker_rss(scrape_env, benchmark, results):
    """RSS of the exporter's gunicorn worker after it has served this size (and of the old agent)."""
    env = scrape_env
    timed(benchmark, env.scrape, rounds=1, warmup=0)
    workers = benchlib.children(env.exporter.proc.pid)
    assert len(workers) == 1, f"expected one gunicorn worker, found {workers}"
    ours = benchlib.rss_bytes(workers[0])
    theirs = benchlib.rss_bytes(env.agent.proc.pid)
    assert ours > 0 and theirs > 0
    if benchmark.enabled:
        results.put(("rss", "tcpmon", env.kind, env.size), ours)
        results.put(("rss", "old_agent", env.kind, env.size), theirs)


# --- serving: scrapes under hostile connections, gzip --------------------------------------------

ATTACK = {False: {"size": 1000, "per_port": 40, "rounds": 3, "settle": 1.0},
          True: {"size": 10000, "per_port": 500, "rounds": 300, "settle": 3.0}}
GZIP_SIZES = {False: (1000, 2000), True: (10000, 100000)}
GZIP_ROUNDS = {False: 2, True: 50}


class LoadedMap:
    """The real probe under a private pin dir, its connects map holding `n` synthetic PIDs, and an
    exporter serving it."""

    def __init__(self, lib, n, tag):
        self.pin_dir = f"{benchlib.PIN_PREFIX}{tag}{n}"
        benchlib.remove_pin_dir(self.pin_dir)
        loader.load(self.pin_dir, max_pids=benchlib.max_pids_for(n))
        try:
            self.expected = benchlib.fill_loaded_probe(lib, self.pin_dir, n)
            self.exporter = benchlib.tests_helpers().Exporter(self.pin_dir)
        except BaseException:
            benchlib.remove_pin_dir(self.pin_dir)
            raise
        self.worker = benchlib.children(self.exporter.proc.pid)[0]

    def close(self):
        self.exporter.stop()
        benchlib.remove_pin_dir(self.pin_dir)


FLOOR_SIZES = {False: (1000, 2000), True: (10000, 100000)}
FLOOR_ROUNDS = {False: (3, 1), True: (200, 10)}     # (timed pairs, warm-up pairs) per size
OUTCOME_SERIES = re.compile(rb'^tcpmon_connects_total\{[^}]*result="refused"[^}]*\} \d+$', re.M)


@pytest.mark.parametrize("size_index", [0, 1], ids=["small", "large"])
def test_scrape_near_floor(lib, helpers, full, results, size_index):
    """Warm kept-alive scrapes of N PIDs with the outcome families present ÷ the C batch read of
    the same maps (every map a scrape reads), timed in pairs right beside each other: floor, then
    scrape, over and over after a warm-up; medians of each.  Each round then also times the same C
    reads served by a process of their own (benchlib.ServedFloor): a floor that, like the exporter,
    waits between reads, shown for information."""
    n = FLOOR_SIZES[full][size_index]
    rounds, warmup = FLOOR_ROUNDS[full]
    if full and n >= 100000:
        rounds = 60
    env = LoadedMap(lib, n, "floor")
    floor = benchlib.ScrapedMapsFloor(lib, env.pin_dir)
    served = benchlib.ServedFloor(helpers["libbpfbench"], env.pin_dir)
    scrape = Scraper(env.exporter.metrics_port)
    try:
        outcomes = benchlib.fill_outcomes(lib, env.pin_dir)
        floor_times, scrape_times, served_times = [], [], []
        for i in range(warmup + rounds):
            started = time.perf_counter()
            entries = floor.read()
            between = time.perf_counter()
            body = scrape()
            done = time.perf_counter()
            assert served.read() == entries
            if i >= warmup:
                floor_times.append(between - started)
                scrape_times.append(done - between)
                served_times.append(time.perf_counter() - done)
        assert entries >= n + outcomes
        assert len(PID_SERIES.findall(body)) >= n
        assert len(OUTCOME_SERIES.findall(body)) >= outcomes, "the outcome families are missing"
    finally:
        scrape.close()
        served.close()
        floor.close()
        env.close()
    if full:
        results.put(("scrape_warm", n), {"scrape": statistics.median(scrape_times),
                                         "floor": statistics.median(floor_times),
                                         "served_floor": statistics.median(served_times),
                                         "scrape_min": min(scrape_times), "floor_min": min(floor_times),
                                         "rounds": rounds, "outcome_entries": outcomes, "bytes": len(body)})


def _quantile(values, q):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _scrape_times(scrape, rounds):
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        body = scrape()
        times.append(time.perf_counter() - started)
    return times, body


def test_scrape_under_hostile_connections(lib, full, results):
    """p50 and p99 of kept-alive scrapes of a 10k map while tests/tools/hostile.py holds 500
    connections on each port (idle, partial line, partial headers, a body a byte a second), ÷ the
    same without them: the rounds without run before and after the attack."""
    case = ATTACK[full]
    env = LoadedMap(lib, case["size"], "attack")
    scrape = Scraper(env.exporter.metrics_port, timeout=30)
    attacker = None
    try:
        half = max(1, case["rounds"] // 2)
        quiet, body = _scrape_times(scrape, half)
        assert len(PID_SERIES.findall(body)) >= case["size"]
        hostile = benchlib.ROOT / "tests" / "tools" / "hostile.py"
        seconds = 3600 if full else 30
        attacker = subprocess.Popen([benchlib.PYTHON, str(hostile), "--ports", str(env.exporter.metrics_port),
                                     str(env.exporter.health_port), "--count", str(case["per_port"]),
                                     "--seconds", str(seconds)], stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE, text=True)
        time.sleep(case["settle"])
        held = len(os.listdir(f"/proc/{env.worker}/fd"))
        attacked, body = _scrape_times(scrape, case["rounds"])
        assert len(PID_SERIES.findall(body)) >= case["size"]
        assert attacker.poll() is None, attacker.stderr.read()
        benchlib.stop(attacker)
        attacker = None
        time.sleep(case["settle"])
        after, _ = _scrape_times(scrape, half)
        quiet += after
    finally:
        if attacker is not None:
            benchlib.stop(attacker)
        scrape.close()
        env.close()
    assert held >= 2 * case["per_port"] * 0.9, f"the worker held only {held} fds: the attack did not reach it"
    if full:
        results.put(("attack", case["size"]), {
            "p50": (_quantile(attacked, 0.5), _quantile(quiet, 0.5)),
            "p99": (_quantile(attacked, 0.99), _quantile(quiet, 0.99)),
            "connections": 2 * case["per_port"], "rounds": (len(attacked), len(quiet))})


def _cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.parametrize("size_index", [0, 1], ids=["small", "large"])
def test_scrape_gzip(lib, full, results, size_index):
    """Bytes on the wire and the worker's CPU time per scrape, with Accept-Encoding: gzip and
    without, alternating rounds over one kept-alive connection each."""
    import gzip
    import http.client
    n = GZIP_SIZES[full][size_index]
    env = LoadedMap(lib, n, "gzip")
    conns = {coded: http.client.HTTPConnection("127.0.0.1", env.exporter.metrics_port, timeout=60)
             for coded in (False, True)}
    cpu = {False: 0.0, True: 0.0}
    sizes = {}
    try:
        for _ in range(GZIP_ROUNDS[full]):
            for coded, conn in conns.items():
                before = _cpu_seconds(env.worker)
                conn.request("GET", "/metrics", headers={"Accept-Encoding": "gzip"} if coded else {})
                response = conn.getresponse()
                body = response.read()
                cpu[coded] += _cpu_seconds(env.worker) - before
                assert response.status == 200
                assert (response.getheader("Content-Encoding") == "gzip") == coded
                text = gzip.decompress(body) if coded else body
                assert len(PID_SERIES.findall(text)) >= n
                sizes[coded] = len(body)
    finally:
        for conn in conns.values():
            conn.close()
        env.close()
    assert sizes[True] < sizes[False] / 3, sizes
    if full:
        rounds = GZIP_ROUNDS[full]
        results.put(("gzip", n), {"bytes": (sizes[True], sizes[False]),
                                  "cpu": (cpu[True] / rounds, cpu[False] / rounds)})
