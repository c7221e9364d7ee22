"""tcpmon's benchmark suite (issue 4): sizes, shared fixtures, the results table and RESULTS.md.

Two modes, chosen by pytest-benchmark itself:
  benchmarks enabled (`make bench`, i.e. --benchmark-enable): full sizes, timed rounds, one
      table of measure / ours / baseline / ratio / target / pass, written to benchmarks/RESULTS.md;
  benchmarks disabled (`make test`: pytest.ini's --benchmark-disable): the quick mode, small
      sizes, every body runs once, only correctness is asserted (counts, totals), never speed.
"""
import os
import sys

import pytest

import benchlib
import benchreport

def bench_enabled(config):
    session = getattr(config, "_benchmarksession", None)
    if session is not None:
        return not session.disabled
    return config.getoption("benchmark_enable", False) or not config.getoption("benchmark_disable", False)


def size_label(n):
    return f"{n // 1000}k" if n >= 1000 and n % 1000 == 0 else str(n)


def pytest_configure(config):
    if os.geteuid() != 0:
        pytest.exit("tcpmon's benchmarks load BPF programs and create maps: run them as root", 2)
    # tests/*.py import their helpers with `from conftest import ...`: pytest imported this file
    # as module "conftest" after tests/conftest.py, so give that name back to the tests' one.
    tests_conftest = config.pluginmanager.get_plugin(str(benchlib.ROOT / "tests" / "conftest.py"))
    if tests_conftest is not None:
        sys.modules["conftest"] = tests_conftest
    config._tcpmon_results = benchreport.Results(full=bench_enabled(config))


def pytest_sessionstart(session):
    bench = getattr(session.config, "_benchmarksession", None)
    if bench is not None and not bench.disabled:
        bench.quiet = True   # make bench prints one table: ours (pytest-benchmark's stats go to RESULTS.md)


def pytest_generate_tests(metafunc):
    full = bench_enabled(metafunc.config)
    if "filled_map" in metafunc.fixturenames:
        sizes = benchlib.SIZES["map_read"][full]
        metafunc.parametrize("filled_map", sizes, indirect=True, scope="module", ids=[size_label(n) for n in sizes])
    if "scrape_env" in metafunc.fixturenames:
        cases = benchlib.SIZES["scrape"][full]
        metafunc.parametrize("scrape_env", cases, indirect=True, scope="module",
                             ids=[f"{kind}-{size_label(n)}" for kind, n in cases])


@pytest.fixture(scope="session")
def full(request):
    """True under make bench (timed, full sizes); False in the quick mode."""
    return bench_enabled(request.config)


@pytest.fixture(scope="session")
def results(request):
    return request.config._tcpmon_results


@pytest.fixture(scope="session")
def helpers():
    return benchlib.build_helpers()


@pytest.fixture(scope="session")
def lib(helpers):
    return benchlib.BenchLib(helpers["libbpfbench"])


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    results = config._tcpmon_results
    if not results.data:
        return
    if not results.full:
        terminalreporter.write_sep("-", "benchmarks: quick mode (correctness only; make bench measures)")
        return
    rows = benchreport.rows(results)
    terminalreporter.write_sep("=", "tcpmon benchmarks (issue 4): ratios from this one run")
    terminalreporter.write_line(benchreport.text_table(rows))
    path = benchlib.BENCH / "RESULTS.md"
    path.write_text(benchreport.markdown(results, rows))
    terminalreporter.write_line(f"written to {path.relative_to(benchlib.ROOT)}")


def pytest_sessionfinish(session, exitstatus):
    """Whatever a failed or interrupted benchmark left: the sysctl, then this run's pin dirs."""
    while benchlib.BpfStats.changed:
        value = benchlib.BpfStats.changed.pop()
        with open(benchlib.BPF_STATS, "w") as f:
            f.write(value)
    parent = os.path.dirname(benchlib.PIN_PREFIX)
    prefix = os.path.basename(benchlib.PIN_PREFIX)
    for name in os.listdir(parent):
        if name.startswith(prefix):
            benchlib.remove_pin_dir(os.path.join(parent, name))
