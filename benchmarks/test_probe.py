"""Probe cost: kernel ns per connect attempt (kernel.bpf_stats_enabled=1) for each attach mode this
kernel supports, against bpftrace counting the same on the same hook in the same windows; and
connects/s of a tight connect loop with and without the probe."""
import os
import secrets
import statistics

import pytest

import benchlib
from benchlib import BPFTRACE_SCRIPTS, Bpftrace, BpfStats, NoopPrograms, connect_loop, timed
from tcpmon import _maps, attach, loader, maps
from tcpmon.pins import Pins
from tcpmon.errors import LoadError

WINDOWS = (1, 10)         # (quick, full) measurement windows per mode
CONNECTS = (2000, 20000)  # connects per window
RATE_SECONDS = (2.0, 16.0)   # per toggled run: (quick, full)


def comm_total(pin_dir, comm):
    with maps.open_map(Pins(pin_dir), maps.COMM_TOTALS) as bpf_map:
        value = bpf_map.lookup(comm.encode().ljust(maps.COMM_LEN, b"\0"))
    return int.from_bytes(value, "little") if value else 0


def try_load(pin_dir, mode):
    benchlib.remove_pin_dir(pin_dir)
    try:
        return loader.load(pin_dir, attach=mode)
    except LoadError as exc:
        return str(exc)


@pytest.mark.parametrize("mode", attach.MODE_NAMES)
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


def _pair_ratios(run):
    """with ÷ without connects per CPU-second of each adjacent pair of periods."""
    return [without / with_ for without, with_ in run["pairs"]]


def _summary(ratios):
    return {"ratio": statistics.median(ratios), "pairs": len(ratios),
            "stderr": statistics.stdev(ratios) / len(ratios) ** 0.5 if len(ratios) > 1 else None}


def test_connect_rate(helpers, benchmark, results, full):
    """connects/s of a tight connect loop with and without the probe, stats off (as in production).

    One refused-connect loop runs for a while (procfarm stream) and notes its own CPU time every 256
    attempts, while the probe (tcpmon's shipped object, loaded once) is attached and detached every
    0.2 s: each "with" stretch is compared with the "without" stretch just before it, so the load of
    this shared machine, which drifts over seconds, hits both sides of every pair alike.  The same is
    done, in the same run, for an empty program on the same hook (what any program there costs) and
    for an empty program on a hook the loop never fires (which must come out at 1.00: the check of
    the method itself)."""
    seconds = RATE_SECONDS[full]
    procfarm = helpers["procfarm"]
    modes = []
    pin_dir = f"{benchlib.PIN_PREFIX}rate"
    for mode in attach.MODE_NAMES:
        if not isinstance(try_load(pin_dir, mode), str):
            modes.append(mode)
        benchlib.remove_pin_dir(pin_dir)
    assert modes, "no attach mode works on this kernel"
    runs = {}

    def measure():
        runs["idle"] = benchlib.toggled_rate(procfarm, NoopPrograms(helpers["noop"], "idle", attach=False), seconds)
        for mode in modes:
            runs[mode] = benchlib.toggled_rate(procfarm, benchlib.ProbeToggle(mode), seconds)
            if mode in NoopPrograms.PROGRAMS:
                runs["noop-" + mode] = benchlib.toggled_rate(
                    procfarm, NoopPrograms(helpers["noop"], mode, attach=False), seconds)
    timed(benchmark, measure, rounds=1, warmup=0)
    for name, run in runs.items():
        assert run["errors"] == 0 and run["pairs"], (name, run["errors"], len(run["pairs"]))
    if full:
        results.put(("rate_check",), _summary(_pair_ratios(runs["idle"])))
        for mode in modes:
            cpu_ns = statistics.median(without for without, _ in runs[mode]["pairs"])
            entry = dict(_summary(_pair_ratios(runs[mode])), cpu_ns_per_connect=cpu_ns,
                         **{"with": 1e9 / statistics.median(with_ for _, with_ in runs[mode]["pairs"]),
                            "without": 1e9 / cpu_ns})
            if "noop-" + mode in runs:
                entry["empty_program"] = _summary(_pair_ratios(runs["noop-" + mode]))
            results.put(("rate", mode), entry)
