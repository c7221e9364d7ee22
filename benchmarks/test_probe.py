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
# (procfarm stream workload, attempts between CPU-time notes): refused connects, the cheapest there
# are and the target; full handshakes, which cost twice the CPU and run the hook more often.
RATE_WORKLOADS = (("refused", 256), ("accept", 64))


def comm_total(pin_dir, comm):
    with maps.open_map(Pins(pin_dir), maps.COMM_TOTALS) as bpf_map:
        value = bpf_map.lookup(comm.encode().ljust(maps.COMM_LEN, b"\0"))
    return int.from_bytes(value, "little") if value else 0


def counted(pin_dir, comm):
    """What tcpmon under `pin_dir` counted for `comm`: (attempts, {result: n}, destinations)."""
    key = maps.comm_key(comm.encode())
    pins = Pins(pin_dir)
    with maps.open_map(pins, maps.OUTCOMES) as bpf_map:
        bpf_map.read()
        rows = [value for k, value in maps.OUTCOMES.entries(bpf_map) if k["comm"] == key]
    results = {name: sum(row["results"][i] for row in rows) for i, name in enumerate(maps.RESULTS)}
    with maps.open_map(pins, maps.DESTINATIONS) as bpf_map:
        bpf_map.read()
        destinations = sum(value["count"] for k, value in maps.DESTINATIONS.entries(bpf_map) if k["comm"] == key)
    return comm_total(pin_dir, comm), {k: v for k, v in results.items() if v}, destinations


def try_load(pin_dir, mode, destinations=False):
    benchlib.remove_pin_dir(pin_dir)
    try:
        return loader.load(pin_dir, attach=mode, destinations=destinations)
    except LoadError as exc:
        return str(exc)


# The mixed workload: even attempts complete a handshake (success), odd ones are refused.
WORKLOAD = "mixed"


def expected_counts(n):
    return n, {"success": (n + 1) // 2, "refused": n // 2}


class Participants:
    """What runs on the hooks in one window: tcpmon (destinations off), tcpmon --destinations,
    bpftrace, and the empty programs on tcpmon's hook and on bpftrace's (the floors)."""

    def __init__(self, mode, helpers, comm):
        self.mode, self.comm = mode, comm
        tag = f"{benchlib.PIN_PREFIX}probe-{mode}"
        self.dirs = {"tcpmon": f"{tag}", "destinations": f"{tag}-dest"}
        self.noop_dir = f"{benchlib.PIN_PREFIX}noop-{mode}"
        self.noops = {}
        self.tracer, self.traced = None, 0
        self.helpers = helpers

    def load(self, order=("tcpmon", "destinations")):
        for name in order:
            benchlib.remove_pin_dir(self.dirs[name])
            loader.load(self.dirs[name], attach=self.mode, destinations=name == "destinations")

    def attach_noops(self):
        """Floors: an empty program on tcpmon's hook and one on the classic tracepoint bpftrace
        runs on (one and the same in tracepoint mode); none for the function hooks."""
        os.makedirs(self.noop_dir, exist_ok=True)
        programs = {}
        for hook in {self.mode, "tracepoint"} & set(NoopPrograms.PROGRAMS):
            programs[hook] = NoopPrograms(self.helpers["noop"], hook, f"{self.noop_dir}/noop-{hook}")
        self.noops = {name: programs[hook] for name, hook in (("tcpmon", self.mode), ("bpftrace", "tracepoint"))
                      if hook in programs}

    def start_tracer(self):
        self.tracer = Bpftrace(BPFTRACE_SCRIPTS[self.mode], programs=benchlib.BPFTRACE_PROGRAMS[self.mode])
        self.traced = 0

    def check_tracer(self):
        """Stop bpftrace; it must have counted every connect of its windows, and their results."""
        found = self.tracer.stop()
        attempts, results = expected_counts(self.traced)
        assert found.get("comm_totals", {}).get(self.comm) == attempts, \
            f"bpftrace counted {found.get('comm_totals', {}).get(self.comm)} of {attempts} connects: " \
            f"...{self.tracer.output[-1000:]}"
        got = {}
        for key, value in found.get("results", {}).items():
            _, comm, result = (part.strip() for part in key.rsplit(",", 2))
            if comm == self.comm:
                got[maps.RESULTS[int(result)]] = got.get(maps.RESULTS[int(result)], 0) + value
        assert got == {k: v for k, v in results.items() if v}, (got, results)

    def run_times(self):
        times = {name: benchlib.tcpmon_run_time_ns(path) for name, path in self.dirs.items()}
        times["bpftrace"] = self.tracer.run_time_ns()
        for name, noop in self.noops.items():
            times["noop_" + name] = noop.run_time_ns()
        return times

    def close(self):
        if self.tracer is not None and self.tracer.proc.poll() is None:
            self.check_tracer()
        for noop in {id(noop): noop for noop in self.noops.values()}.values():
            noop.close()
        for path in self.dirs.values():
            benchlib.remove_pin_dir(path)
        benchlib.remove_pin_dir(self.noop_dir)


@pytest.mark.parametrize("mode", attach.MODE_NAMES)
def test_probe_cost(mode, helpers, benchmark, results, full):
    """Windows of N mixed connects (successes and refused, in turn) with tcpmon, tcpmon
    --destinations, bpftrace doing the same aggregation and the empty programs attached together.
    Programs on one hook run in attach order, and the first to run pays the cold cache misses of
    the hook: so the windows alternate which of tcpmon and bpftrace was attached last (the other
    one is reloaded before the window), and which of the two tcpmons.  Each window checks that
    every participant counted every connect, each outcome, and (with --destinations) each
    destination."""
    pin_dir = f"{benchlib.PIN_PREFIX}probe-{mode}"
    loaded = try_load(pin_dir, mode)
    benchlib.remove_pin_dir(pin_dir)
    if isinstance(loaded, str):
        results.put(("probe", mode), {"unsupported": loaded})
        pytest.skip(f"{mode} does not attach on this kernel: {loaded}")
    comm = f"lp{secrets.token_hex(3)}"
    per_window = CONNECTS[full]
    on = Participants(mode, helpers, comm)
    samples = {}
    try:
        with BpfStats():
            on.load()
            on.attach_noops()
            on.start_tracer()

            def window():
                before_counts = {name: counted(path, comm) for name, path in on.dirs.items()}
                before = on.run_times()
                run = connect_loop(helpers["procfarm"], per_window, 120, WORKLOAD, comm)
                after = on.run_times()
                assert run["errors"] == 0 and run["connects"] == per_window, run
                attempts, outcomes = expected_counts(per_window)
                for name, path in on.dirs.items():
                    (a0, r0, d0), (a1, r1, d1) = before_counts[name], counted(path, comm)
                    assert a1 - a0 == attempts, (name, a1 - a0, attempts)
                    assert {k: r1.get(k, 0) - r0.get(k, 0) for k in outcomes} == outcomes, (name, r0, r1)
                    assert d1 - d0 == (attempts if name == "destinations" else 0), (name, d1 - d0)
                for name in after:
                    samples.setdefault(name, []).append((after[name] - before[name]) / run["connects"])
                return run["connects"]
            for i in range(WINDOWS[full]):
                if i % 2:      # bpftrace runs first: reload the tcpmons behind it, in turn
                    on.load(("tcpmon", "destinations") if i % 4 == 1 else ("destinations", "tcpmon"))
                elif i:        # the tcpmons run first: restart bpftrace behind them
                    on.check_tracer()
                    on.start_tracer()
                # the benchmark fixture times the first window
                on.traced += timed(benchmark, window, rounds=1, warmup=0)[0] if i == 0 else window()
    finally:
        on.close()
    if full:
        best = {name: min(values) for name, values in samples.items()}
        results.put(("probe", mode), {
            "tcpmon": best["tcpmon"], "bpftrace": best["bpftrace"], "destinations": best["destinations"],
            "noop": best.get("noop_tcpmon"), "noop_bpftrace": best.get("noop_bpftrace"),
            "tcpmon_median": statistics.median(samples["tcpmon"]),
            "bpftrace_median": statistics.median(samples["bpftrace"]),
            "destinations_median": statistics.median(samples["destinations"]),
            "windows": len(samples["tcpmon"]), "connects_per_window": per_window, "workload": WORKLOAD,
            "windows_ns": {name: [round(x) for x in values] for name, values in samples.items()},
            "bpftrace_hook": benchlib.BPFTRACE_HOOK[mode]})


def _pair_ratios(run):
    """with ÷ without connects per CPU-second of each adjacent pair of periods."""
    return [without / with_ for without, with_ in run["pairs"]]


def _summary(ratios):
    return {"ratio": statistics.median(ratios), "pairs": len(ratios),
            "stderr": statistics.stdev(ratios) / len(ratios) ** 0.5 if len(ratios) > 1 else None}


def test_connect_rate(helpers, benchmark, results, full):
    """connects/s of a tight connect loop with and without the probe, stats off (as in production).

    One refused-connect loop runs for a while (procfarm stream) and notes its own CPU time every 256
    attempts (and then a loop of full handshakes, every 64), while the probe (tcpmon's shipped object, loaded once) is attached and detached every
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
            for workload, every in RATE_WORKLOADS:
                runs[mode, workload] = benchlib.toggled_rate(procfarm, benchlib.ProbeToggle(mode), seconds,
                                                             every=every, workload=workload)
                if mode in NoopPrograms.PROGRAMS:
                    runs["noop", mode, workload] = benchlib.toggled_rate(
                        procfarm, NoopPrograms(helpers["noop"], mode, attach=False), seconds, every=every,
                        workload=workload)
    timed(benchmark, measure, rounds=1, warmup=0)
    for name, run in runs.items():
        assert run["errors"] == 0 and run["pairs"], (name, run["errors"], len(run["pairs"]))
    if full:
        results.put(("rate_check",), _summary(_pair_ratios(runs["idle"])))
        for mode in modes:
            for workload, _ in RATE_WORKLOADS:
                results.put(("rate", mode) + (() if workload == "refused" else (workload,)),
                            _rate_entry(runs[mode, workload], runs.get(("noop", mode, workload))))


def _rate_entry(run, empty_run):
    cpu_ns = statistics.median(without for without, _ in run["pairs"])
    entry = dict(_summary(_pair_ratios(run)), cpu_ns_per_connect=cpu_ns,
                 **{"with": 1e9 / statistics.median(with_ for _, with_ in run["pairs"]), "without": 1e9 / cpu_ns})
    if empty_run is not None:
        entry["empty_program"] = _summary(_pair_ratios(empty_run))
    return entry
