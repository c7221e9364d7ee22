"""Probe cost: kernel ns per connect attempt (kernel.bpf_stats_enabled=1) for each attach mode this
kernel supports, against bpftrace counting the same on the same hook in the same windows; and
connects/s of a tight connect loop with and without the probe."""
import os
import random
import secrets
import statistics

import pytest

import benchlib
from benchlib import BPFTRACE_SCRIPTS, Bpftrace, BpfStats, NoopPrograms, connect_loop, timed
from tcpmon import _maps, loader, probe
from tcpmon.errors import LoadError

WINDOWS = (1, 10)         # (quick, full) measurement windows per mode
CONNECTS = (2000, 20000)  # connects per window
RATE_ROUNDS = (1, 12)
RATE_SECONDS = (0.2, 1.0)


def comm_total(pin_dir, comm):
    with probe.open_map(probe.Pins(pin_dir), probe.COMM_TOTALS) as bpf_map:
        value = bpf_map.lookup(comm.encode().ljust(_maps.COMM_LEN, b"\0"))
    return int.from_bytes(value, "little") if value else 0


def try_load(pin_dir, mode):
    benchlib.remove_pin_dir(pin_dir)
    try:
        return loader.load(pin_dir, attach=mode)
    except LoadError as exc:
        return str(exc)


@pytest.mark.parametrize("mode", probe.ATTACH_MODES)
def test_probe_cost(mode, helpers, benchmark, results, full):
    """Windows of N refused connects with tcpmon, bpftrace and an empty program attached together.
    Programs on one tracepoint run in attach order, and the first to run pays the cold cache misses
    of the hook: so the windows alternate which of tcpmon and bpftrace was attached last (the other
    one is reloaded before the window).  Each window also checks that both counted every connect."""
    pin_dir = f"{benchlib.PIN_PREFIX}probe-{mode}"
    noop_dir = f"{benchlib.PIN_PREFIX}noop-{mode}"
    loaded = try_load(pin_dir, mode)
    try:
        if isinstance(loaded, str):
            results.put(("probe", mode), {"unsupported": loaded})
            pytest.skip(f"{mode} does not attach on this kernel: {loaded}")
        comm = f"lp{secrets.token_hex(3)}"
        per_window = CONNECTS[full]
        samples = {"tcpmon": [], "bpftrace": [], "noop": []}
        with BpfStats():
            noop = None
            if mode in NoopPrograms.PROGRAMS:
                os.makedirs(noop_dir, exist_ok=True)
                noop = NoopPrograms(helpers["noop"], mode, f"{noop_dir}/noop")
            tracer, traced = Bpftrace(BPFTRACE_SCRIPTS[mode]), 0

            def check_tracer():
                maps = tracer.stop()
                assert maps.get("comm_totals", {}).get(comm) == traced, \
                    f"bpftrace counted {maps.get('comm_totals', {}).get(comm)} of {traced} connects: " \
                    f"...{tracer.output[-1000:]}"
            try:
                def window():
                    counted = comm_total(pin_dir, comm)
                    before = (benchlib.tcpmon_run_time_ns(pin_dir), tracer.run_time_ns(),
                              noop.run_time_ns() if noop else 0)
                    run = connect_loop(helpers["procfarm"], per_window, 120, "refused", comm)
                    after = (benchlib.tcpmon_run_time_ns(pin_dir), tracer.run_time_ns(),
                             noop.run_time_ns() if noop else 0)
                    assert run["errors"] == 0 and run["connects"] == per_window, run
                    assert comm_total(pin_dir, comm) - counted == per_window
                    for name, b, a in zip(samples, before, after):
                        samples[name].append((a - b) / run["connects"])
                    return run["connects"]
                for i in range(WINDOWS[full]):
                    if i % 2:      # bpftrace runs first: reload tcpmon behind it
                        benchlib.remove_pin_dir(pin_dir)
                        loader.load(pin_dir, attach=mode)
                    elif i:        # tcpmon runs first: restart bpftrace behind it
                        check_tracer()
                        tracer, traced = Bpftrace(BPFTRACE_SCRIPTS[mode]), 0
                    # the benchmark fixture times the first window
                    traced += timed(benchmark, window, rounds=1, warmup=0)[0] if i == 0 else window()
            finally:
                if tracer.proc.poll() is None:
                    check_tracer()
                if noop:
                    noop.close()
        if full:
            results.put(("probe", mode), {
                "tcpmon": min(samples["tcpmon"]), "bpftrace": min(samples["bpftrace"]),
                "noop": min(samples["noop"]) if noop else None,
                "tcpmon_median": statistics.median(samples["tcpmon"]),
                "bpftrace_median": statistics.median(samples["bpftrace"]),
                "windows": len(samples["tcpmon"]), "connects_per_window": per_window,
                "tcpmon_windows": [round(x) for x in samples["tcpmon"]],
                "bpftrace_windows": [round(x) for x in samples["bpftrace"]],
                "bpftrace_hook": benchlib.BPFTRACE_HOOK[mode]})
    finally:
        benchlib.remove_pin_dir(pin_dir)
        benchlib.remove_pin_dir(noop_dir)


def test_connect_rate(helpers, benchmark, results, full):
    """Tight connect loop, stats off: rounds of (without, each supported mode) in shuffled order.
    The rate is connects per second of the loop's own CPU time (its exact scheduler run time):
    on this shared 2-CPU machine wall-clock rates mostly measure the neighbours (kept as info)."""
    pin_dir = f"{benchlib.PIN_PREFIX}rate"
    modes = []
    for mode in probe.ATTACH_MODES:
        if not isinstance(try_load(pin_dir, mode), str):
            modes.append(mode)
        benchlib.remove_pin_dir(pin_dir)
    assert modes, "no attach mode works on this kernel"
    rates = {mode: [] for mode in ["none"] + modes}
    wall = {mode: [] for mode in ["none"] + modes}
    ratios = {mode: [] for mode in modes}

    def one_round():
        order = list(rates)
        random.shuffle(order)
        this_round = {}
        for mode in order:
            if mode != "none":
                loader.load(pin_dir, attach=mode)
            try:
                run = connect_loop(helpers["procfarm"], 10**9, RATE_SECONDS[full], "refused")
            finally:
                benchlib.remove_pin_dir(pin_dir)
            assert run["errors"] == 0 and run["connects"] > 0, run
            this_round[mode] = run["connects"] / run["cpu_seconds"]
            rates[mode].append(this_round[mode])
            wall[mode].append(run["connects"] / run["seconds"])
        for mode in modes:
            ratios[mode].append(this_round[mode] / this_round["none"])

    for i in range(RATE_ROUNDS[full]):  # the benchmark fixture times the first round
        if i == 0:
            timed(benchmark, one_round, rounds=1, warmup=0)
        else:
            one_round()
    if full:
        for mode in modes:
            results.put(("rate", mode), {"with": statistics.median(rates[mode]),
                                         "without": statistics.median(rates["none"]),
                                         "ratio": statistics.median(ratios[mode]),
                                         "best_ratio": max(rates[mode]) / max(rates["none"]),
                                         "wall_with": statistics.median(wall[mode]),
                                         "wall_without": statistics.median(wall["none"]),
                                         "rounds": len(ratios[mode])})
