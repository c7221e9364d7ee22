"""`tcpmon top` on the real kernel: the screen driven in tmux (send-keys, capture-pane) at
80x24, `--once` and `--json` without a terminal, and the rate model on real reads of
processes that connect in network namespaces of their own, including a reused PID and an exec;
connect outcomes per pod or unit from processes in real cgroups that end connects in known ways
(tests/tools/outcomes.py's nft rules); latency quantiles checked against a Python reference and
against promtool's histogram_quantile."""
import json
import math
import os
import pty
import random
import re
import secrets
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.utils import floatToGoString

from attribution_support import TestCgroups
from conftest import ROOT, TCPMON, Connector, unique_comm
from test_cli import help_options
from tcpmon import exposition, maps, top, top_text
from tcpmon._render import comm_label
from tcpmon.escaping import label_text
from tcpmon.attribution import Attributor, Config
from tcpmon.attribution.labels import PATH_LABELS
from tcpmon.attribution.paths import labels_of_path

PUPPET = Path(__file__).resolve().parent / "tools" / "puppet.py"
C1_CONTROL = re.compile("[\x80-\x9f]")
INITIAL_RTO = 1.0  # seconds: a dropped first SYN is sent again no sooner (TCP_TIMEOUT_INIT)


def env_without_twins(**extra):
    return {key: value for key, value in os.environ.items()
            if not key.startswith("TCPMON_") and key not in ("TMUX", "COLUMNS", "LINES")} | extra


def run_top(pin_dir, *args, timeout=60, **env):
    return subprocess.run([*TCPMON, "top", "--pin-dir", pin_dir, *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, stdin=subprocess.DEVNULL, env=env_without_twins(**env))


class Puppet:
    """A process in its own netns that connects when told (tests/tools/puppet.py); with
    `outcomes`, one that can end connects in every way; in cgroup directory `cgroup` if given."""

    def __init__(self, comm, outcomes=False, cgroup=None):
        self.proc = subprocess.Popen(["unshare", "-n", sys.executable, str(PUPPET), "--comm", comm,
                                      *(["--outcomes"] if outcomes else [])],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
        self._hello()
        if cgroup is not None:
            with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:
                f.write(str(self.pid))

    def _hello(self):
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"puppet failed: {self.proc.stderr.read()}")
        report = json.loads(line)
        self.pid, self.comm = report["pid"], bytes.fromhex(report["comm_hex"])
        self.label = comm_label(self.comm)

    def tell(self, command):
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        if command.startswith("exec "):
            self._hello()
            return None
        answer = self.proc.stdout.readline().split()
        assert answer[:1] == ["ok"], (command, answer, self.proc.stderr.read())
        return answer[1:]

    def connect(self, n):
        self.tell(f"connect {n}")

    def end(self, kind, n):
        """N connects that end as `kind`: {errno name: count} as connect() returned them, or the
        seconds each delayed connect took."""
        answer = self.tell(f"end {kind} {n}")
        assert answer[0] == str(n), answer
        if kind == "delayed":
            return [float(seconds) for seconds in answer[1:]]
        return dict((name, int(count)) for name, count in (item.split("=") for item in answer[1:]))

    def close(self):
        if self.proc.poll() is None:
            self.proc.stdin.close()
        self.proc.wait(timeout=10)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def row_of(frame, table_name, **key):
    found = [row for table, rows, _ in frame.tables if table.name == table_name
             for row in rows if all(row[k] == v for k, v in key.items())]
    assert len(found) <= 1, found
    return found[0] if found else None


def watched(*samples, **kwargs):
    watch = top.Watch("unused", **kwargs)
    for sample in samples:
        watch.add(sample)
    return watch.frame()


# --- the model on real reads -------------------------------------------------------------

def test_rate_is_the_connects_between_two_reads_over_their_interval(pin_dir):
    with Puppet(unique_comm()) as proc:
        proc.connect(3)
        first = top.read_sample(pin_dir)
        proc.connect(7)
        second = top.read_sample(pin_dir)
    seconds = second.taken - first.taken
    frame = watched(first, second)
    assert row_of(frame, "processes", pid=proc.pid) == \
        {"pid": proc.pid, "comm": proc.label, "connects": 10, "connects_rate": 7 / seconds}
    assert row_of(frame, "names", comm=proc.label) == \
        {"comm": proc.label, "connects": 10, "connects_rate": 7 / seconds}
    assert frame.seconds == seconds


def test_a_row_seen_once_has_no_rate_yet(pin_dir):
    with Puppet(unique_comm()) as proc:
        before = top.read_sample(pin_dir)
        proc.connect(4)
        after = top.read_sample(pin_dir)
    assert row_of(watched(after), "processes", pid=proc.pid)["connects_rate"] is None
    assert row_of(watched(before, after), "processes", pid=proc.pid) == \
        {"pid": proc.pid, "comm": proc.label, "connects": 4, "connects_rate": None}


def test_an_execd_process_is_a_new_row_not_a_jump_in_the_old_one(pin_dir):
    """After exec the PID keeps its count under its new name: (pid, new comm) is new."""
    old_name, new_name = unique_comm("tcpmx"), unique_comm("tcpmy")
    with Puppet(old_name) as proc:
        proc.connect(4)
        before = top.read_sample(pin_dir)
        proc.tell(f"exec {new_name}")
        proc.connect(3)
        after = top.read_sample(pin_dir)
        proc.connect(2)
        later = top.read_sample(pin_dir)
    assert proc.label == new_name
    frame = watched(before, after)
    assert row_of(frame, "processes", pid=proc.pid) == \
        {"pid": proc.pid, "comm": new_name, "connects": 7, "connects_rate": None}
    assert row_of(frame, "names", comm=new_name)["connects_rate"] is None
    assert row_of(frame, "names", comm=old_name)["connects_rate"] == 0.0
    assert row_of(watched(after, later), "processes", pid=proc.pid)["connects_rate"] == \
        2 / (later.taken - after.taken)


def puppet_at(pid, comm, attempts=200):
    """A puppet that gets PID `pid` again: the kernel hands out ns_last_pid + 1 next."""
    for _ in range(attempts):
        with open("/proc/sys/kernel/ns_last_pid", "w") as f:
            f.write(str(pid - 1))
        proc = Puppet(comm)
        if proc.pid == pid:
            return proc
        proc.close()
    pytest.fail(f"could not get PID {pid} back in {attempts} forks")


def test_a_reused_pid_whose_count_went_down_is_a_new_process_never_a_negative_rate(pin_dir):
    name = unique_comm()
    with Puppet(name) as gone:
        gone.connect(5)
        before = top.read_sample(pin_dir)
    assert before.tables["processes"][(gone.pid, name)] == ((gone.pid, name), {"connects": 5})
    with puppet_at(gone.pid, name) as reborn:
        reborn.connect(2)
        after = top.read_sample(pin_dir)
        reborn.connect(3)
        later = top.read_sample(pin_dir)
    assert row_of(watched(before, after), "processes", pid=gone.pid) == \
        {"pid": gone.pid, "comm": name, "connects": 2, "connects_rate": None}
    assert row_of(watched(after, later), "processes", pid=gone.pid)["connects_rate"] == \
        3 / (later.taken - after.taken)
    # the name's total is kept past the exit: 5 + 2 + 3, and its rate never stopped
    assert row_of(watched(before, after), "names", comm=name) == \
        {"comm": name, "connects": 7, "connects_rate": 2 / (after.taken - before.taken)}


def test_a_reused_pid_under_another_name_is_a_new_row(pin_dir):
    first_name, second_name = unique_comm(), unique_comm()
    with Puppet(first_name) as gone:
        gone.connect(6)
        before = top.read_sample(pin_dir)
    with puppet_at(gone.pid, second_name) as reborn:
        reborn.connect(9)
        after = top.read_sample(pin_dir)
    frame = watched(before, after)
    assert row_of(frame, "processes", pid=gone.pid) == \
        {"pid": gone.pid, "comm": second_name, "connects": 9, "connects_rate": None}


def test_sort_and_filter_of_real_rows(pin_dir):
    prefix = unique_comm("tcps")
    with Puppet(prefix + "a") as busy, Puppet(prefix + "b") as idle:
        idle.connect(30)
        busy.connect(1)
        first = top.read_sample(pin_dir)
        busy.connect(5)
        second = top.read_sample(pin_dir)

    def pids(sort, name_filter=prefix):
        frame = watched(first, second, sort=sort, name_filter=name_filter)
        return [row["pid"] for table, rows, _ in frame.tables if table.name == "processes" for row in rows]
    assert pids("rate") == [busy.pid, idle.pid]
    assert pids("total") == [idle.pid, busy.pid]
    assert pids("pid") == sorted([busy.pid, idle.pid])
    assert pids("comm") == [busy.pid, idle.pid]
    assert pids("rate", prefix.upper() + "B") == [idle.pid]
    assert pids("rate", "no such name " + prefix) == []


def test_frame_lines_fit_every_width(pin_dir):
    name = "\\x1b" * 15  # 15 control bytes: a label of 60 columns
    with Puppet(name) as proc:
        proc.connect(1)
        first = top.read_sample(pin_dir)
        proc.connect(1)
        frame = watched(first, top.read_sample(pin_dir))
    for width in (20, 32, 40, 60, 80, 132):
        for height in (None, 6, 24):
            lines = top_text.frame_lines(frame, width, height)
            assert height is None or len(lines) <= height
            for text, _ in lines:
                assert top_text.width_of(text) <= width, (width, text)
    row = [text for text, _ in top_text.frame_lines(frame, 80) if text.lstrip().startswith(f"{proc.pid} ")]
    assert len(row) == 1 and row[0].endswith("…") and "\\x1b" * 11 in row[0] and "\x1b" not in row[0], row


# --- latency quantiles from slot differences -----------------------------------------------

def kernel_slot(seconds):
    """The probe's latency slot of a duration: floor(log2(whole microseconds)), 0 below 2 us,
    the last slot from 2^25 us (bpf/tcpconnect.bpf.c latency_slot)."""
    us = int(seconds * 1e6)
    return min(us.bit_length() - 1 if us > 1 else 0, maps.LATENCY_SLOTS - 1)


def slot_range(slot):
    """[lower, upper] seconds of a slot as histogram_quantile sees it (the last one: its lower bound)."""
    lower = 0.0 if slot == 0 else 2 ** slot / 1e6
    return (lower, lower) if slot == maps.LATENCY_SLOTS - 1 else (lower, 2 ** (slot + 1) / 1e6)


def reference_quantile(q, slots):
    """histogram_quantile() on cumulative buckets, written from its documentation: the bucket
    where rank q*count falls, linear inside it; the highest finite bound for the +Inf bucket."""
    bounds = [2 ** (slot + 1) / 1e6 for slot in range(len(slots) - 1)] + [math.inf]
    cumulative = [sum(slots[:i + 1]) for i in range(len(slots))]
    if cumulative[-1] == 0:
        return None
    rank = q * cumulative[-1]
    b = next(i for i, c in enumerate(cumulative[:-1] + [math.inf]) if c >= rank)
    if b == len(slots) - 1:
        return bounds[-2]
    start, before = (bounds[b - 1], cumulative[b - 1]) if b else (0.0, 0)
    return start + (bounds[b] - start) * ((rank - before) / (cumulative[b] - before))


slot_counts = st.lists(st.integers(0, 10 ** 6), min_size=maps.LATENCY_SLOTS, max_size=maps.LATENCY_SLOTS)
quantiles = st.sampled_from([0.5, 0.9, 0.99, 0.999, 1.0]) | st.floats(0.001, 1.0)


@given(slot_counts, quantiles)
@settings(max_examples=400, deadline=None)
def test_quantile_is_the_reference_histogram_quantile(slots, q):
    assert top.quantile(q, slots) == reference_quantile(q, slots)


@given(st.lists(st.floats(0, 40.0), min_size=1, max_size=300), quantiles)
@settings(max_examples=400, deadline=None)
def test_quantile_lies_in_the_slot_of_the_true_quantile(durations, q):
    """Durations counted in slots as the probe counts them: the estimate is inside the slot that
    holds the q-quantile of the durations themselves (the ceil(q*n)-th smallest)."""
    slots = [0] * maps.LATENCY_SLOTS
    for seconds in durations:
        slots[kernel_slot(seconds)] += 1
    true = sorted(durations)[math.ceil(q * len(durations)) - 1]   # the float rank, as histogram_quantile's
    lower, upper = slot_range(kernel_slot(true))
    assert lower <= top.quantile(q, slots) <= upper * (1 + 1e-12)


@given(slot_counts, slot_counts)
@settings(max_examples=200, deadline=None)
def test_quantiles_of_an_interval_are_those_of_the_slot_differences(before, grown):
    """Two reads of one member: p50 and p99 are the quantiles of what each slot grew by."""
    after = [a + b for a, b in zip(before, grown)]
    first = outcome_sample(0.0, {(7, "c"): (("u", "c"), outcome_values(latency=before))})
    second = outcome_sample(2.0, {(7, "c"): (("u", "c"), outcome_values(latency=after))})
    (row,) = top.rows(top.OUTCOMES, first, second)
    assert (row["p50_seconds"], row["p99_seconds"]) == (top.quantile(0.5, grown), top.quantile(0.99, grown))


def test_no_success_in_the_interval_has_no_quantile():
    assert top.quantile(0.99, [0] * maps.LATENCY_SLOTS) is None


def test_latency_bounds_are_the_exported_le_bounds():
    assert [floatToGoString(bound) for bound in top.LATENCY_BOUNDS] == list(exposition.LATENCY_BOUNDS)
    assert all(float(text) == bound for text, bound in zip(exposition.LATENCY_BOUNDS, top.LATENCY_BOUNDS))


def promtool_histograms(rng, count):
    """Slot counts with the cases histogram_quantile treats apart, and random ones."""
    n = maps.LATENCY_SLOTS
    fixed = [[1] + [0] * (n - 1), [0] * (n - 1) + [5], [1, 1] + [0] * (n - 2), [0] * 19 + [3, 1] + [0] * (n - 21),
             [100] * n, [0] * 10 + [1] + [0] * (n - 12) + [1000]]
    spread = [[rng.choice([0, 0, 0, rng.randint(1, 9), rng.randint(1, 10 ** 6)]) for _ in range(n)]
              for _ in range(count)]
    return fixed + [slots for slots in spread if sum(slots)]


def test_quantile_is_what_promtool_computes(tmp_path):
    """Prometheus' own histogram_quantile (promtool's rule unit tests compare floats exactly)
    on the buckets the exposition would write for the same slot counts."""
    histograms = promtool_histograms(random.Random(12), 40)
    series = []
    for h, slots in enumerate(histograms):
        cumulative = 0
        for bound, n in zip([*exposition.LATENCY_BOUNDS, "+Inf"], slots):
            cumulative += n
            series.append({"series": f'd_bucket{{h="{h}",le="{bound}"}}', "values": str(cumulative)})
    cases = [{"expr": f"histogram_quantile({q}, d_bucket)", "eval_time": "0m",
              "exp_samples": [{"labels": f'{{h="{h}"}}', "value": top.quantile(q, slots)}
                              for h, slots in enumerate(histograms)]} for q in (0.5, 0.99, 0.999)]
    unit = {"rule_files": [], "evaluation_interval": "1m",
            "tests": [{"interval": "1m", "input_series": series, "promql_expr_test": cases}]}
    path = tmp_path / "quantiles.test.yml"
    path.write_text(json.dumps(unit))   # YAML is a superset of JSON; floats written as repr() writes them
    result = subprocess.run(["promtool", "test", "rules", str(path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "SUCCESS" in result.stdout, result.stdout + result.stderr


# --- outcome rows: the model on synthetic reads --------------------------------------------

def outcome_values(attempts=0, latency=None, **results):
    values = {"attempts": attempts, **{result: results.get(result, 0) for result in maps.RESULTS},
              "latency": tuple(latency or [0] * maps.LATENCY_SLOTS)}
    values["failures"] = sum(values[result] for result in top.FAILURES)
    return values


def outcome_sample(taken, members, map_id=1):
    """A Sample whose outcomes table has `members` ({(cgroup id, comm): (row key, values)})."""
    fills = {spec.name: top.MapFill(map_id, 0, 1) for spec in (maps.CONNECTS, maps.COMM_TOTALS, maps.OUTCOMES)}
    return top.Sample(taken, {"processes": {}, "names": {}, "outcomes": members}, fills, ("unit",))


def outcome_row(frame, **key):
    return row_of(frame, "outcomes", **key)


def test_a_row_sums_its_cgroups_and_their_increases():
    first = outcome_sample(10.0, {(1, "nginx"): (("web.service", "nginx"), outcome_values(5, success=5)),
                                  (2, "nginx"): (("web.service", "nginx"), outcome_values(3, refused=3))})
    second = outcome_sample(12.0, {(1, "nginx"): (("web.service", "nginx"), outcome_values(9, success=7, timeout=1)),
                                   (2, "nginx"): (("web.service", "nginx"), outcome_values(7, refused=6)),
                                   (3, "nginx"): (("web.service", "nginx"), outcome_values(2, aborted=2))})
    row = outcome_row(watched(first, second), pod_or_unit="web.service")
    assert row["attempts"] == 18 and row["attempts_rate"] == 10 / 2   # 4 + 4 + 2 (new: from zero)
    assert (row["success_rate"], row["refused_rate"], row["timeout_rate"], row["aborted_rate"]) == (1, 1.5, 0.5, 1)
    assert row["failures"] == 9 and row["failures_rate"] == 3.0 and row["failure_ratio"] == 6 / 8
    assert row["cgroups"] == 3 and row["p99_seconds"] is None   # no latency slots moved


def test_a_row_whose_counter_went_down_or_whose_map_is_new_has_no_rate():
    first = outcome_sample(0.0, {(1, "a"): (("u", "a"), outcome_values(5, success=5)),
                                 (2, "b"): (("u", "b"), outcome_values(5, success=5))})
    second = outcome_sample(1.0, {(1, "a"): (("u", "a"), outcome_values(2, success=2)),
                                  (2, "b"): (("u", "b"), outcome_values(6, success=6))})
    frame = watched(first, second)
    assert outcome_row(frame, comm="a")["attempts_rate"] is None
    assert outcome_row(frame, comm="a")["failure_ratio"] is None and outcome_row(frame, comm="b")["attempts_rate"] == 1
    recreated = outcome_sample(1.0, second.tables["outcomes"], map_id=2)
    assert all(row["attempts_rate"] is None for row in watched(first, recreated).tables[1][1])


def test_rows_of_gone_cgroups_disappear_and_a_recreated_cgroup_counts_from_zero():
    """A row key of None is a cgroup the attribution found gone (or not yet): no row.  The same
    unit in a new cgroup (a restart) is a new member of the same row, counted from zero."""
    first = outcome_sample(0.0, {(1, "a"): (("old.service", "a"), outcome_values(5, success=5)),
                                 (2, "a"): (("web.service", "a"), outcome_values(8, refused=8))})
    second = outcome_sample(2.0, {(1, "a"): (None, outcome_values(5, success=5)),
                                  (2, "a"): (None, outcome_values(8, refused=8)),
                                  (3, "a"): (("web.service", "a"), outcome_values(4, refused=4))})
    frame = watched(first, second)
    assert outcome_row(frame, pod_or_unit="old.service") is None
    assert outcome_row(frame, pod_or_unit="web.service") == {
        **outcome_row(frame, pod_or_unit="web.service"), "attempts": 4, "attempts_rate": 2.0, "refused_rate": 2.0,
        "failure_ratio": 1.0, "cgroups": 1}
    assert frame.host_failures_rate == 2.0   # every cgroup, gone ones too


member_values = st.builds(lambda attempts, refused, slots: outcome_values(attempts, refused=refused, latency=slots),
                          st.integers(0, 50), st.integers(0, 50),
                          st.lists(st.integers(0, 5), min_size=maps.LATENCY_SLOTS, max_size=maps.LATENCY_SLOTS))
members = st.dictionaries(st.tuples(st.integers(1, 6), st.sampled_from(["a", "b"])),
                          st.tuples(st.sampled_from([("x", "a"), ("y", "a"), ("x", "b"), None]), member_values),
                          max_size=8)


@given(members, members, st.floats(0.01, 100))
@settings(max_examples=300, deadline=None)
def test_rates_are_never_negative_and_are_the_members_known_increases(earlier, later, seconds):
    """Any two reads (counters that go up, down, members that come and go): a row's rate is the
    sum of its members' increases (new members from zero) over the interval, or None when one
    member's counters went down; never negative."""
    frame = watched(outcome_sample(0.0, earlier), outcome_sample(seconds, later))
    by_row = {}
    for member, (key, values) in later.items():
        if key is not None:
            by_row.setdefault(key, []).append((earlier.get(member, (None, None))[1], values))
    assert {(row["pod_or_unit"], row["comm"]) for row in frame.tables[1][1]} == set(by_row)
    for key, pairs in by_row.items():
        row = outcome_row(frame, pod_or_unit=key[0], comm=key[1])
        went_down = any(before is not None and (now["attempts"] < before["attempts"] or now["refused"] <
                        before["refused"] or any(a < b for a, b in zip(now["latency"], before["latency"])))
                        for before, now in pairs)
        for counter in ("attempts", "refused", "failures"):
            rate = row[f"{counter}_rate"]
            assert row[counter] == sum(now[counter] for _, now in pairs)
            if went_down:
                assert rate is None
            else:
                grown = sum(now[counter] - (before[counter] if before else 0) for before, now in pairs)
                assert rate == pytest.approx(grown / seconds) and rate >= 0
        assert row["p99_seconds"] is None or 0 <= row["p99_seconds"] <= top.LATENCY_BOUNDS[-1]


def synthetic_frame(rows_each=12, width_of_names=40, **watch):
    """A frame with `rows_each` rows in every table, long names, every failure class moving."""
    long = "\\x1b" * (width_of_names // 4)
    base = {"processes": {}, "names": {}, "outcomes": {}}
    later = {"processes": {}, "names": {}, "outcomes": {}}
    for i in range(rows_each):
        comm = f"{long}{i:02d}"
        base["processes"][(100 + i, comm)] = ((100 + i, comm), {"connects": 0})
        later["processes"][(100 + i, comm)] = ((100 + i, comm), {"connects": i})
        base["names"][(comm,)] = ((comm,), {"connects": 0})
        later["names"][(comm,)] = ((comm,), {"connects": i})
        key = (f"kube-system/coredns-{long}{i}", comm)
        base["outcomes"][(i, comm)] = (key, outcome_values())
        later["outcomes"][(i, comm)] = (key, outcome_values(50 * i, success=10 * i, refused=i, timeout=2 * i,
                                                            unreachable=3 * i, aborted=4 * i, other=0,
                                                            latency=[0] * 5 + [10 * i] + [0] * 20))
    fills = {spec.name: top.MapFill(1, 10, 100) for spec in (maps.CONNECTS, maps.COMM_TOTALS, maps.OUTCOMES)}
    return watched(top.Sample(0.0, base, fills), top.Sample(1.0, later, fills), **watch)


def outcome_header(lines):
    (header,) = [text for text, style in lines if style == "header" and text.startswith("CONN/S FAIL/S")]
    return header.split()


def test_the_narrow_terminal_keeps_the_biggest_failure_classes():
    """Unreachable (3/s per row) and aborted (4/s) are the biggest here: at 80 columns they are
    the two result columns shown, in map order; refused, timeout, other come back wider."""
    frame = synthetic_frame()
    assert outcome_header(top_text.frame_lines(frame, 80))[:7] == ["CONN/S", "FAIL/S", "FAIL%", "UNR/S", "ABT/S",
                                                                    "P50", "P99"]
    assert outcome_header(top_text.frame_lines(frame, 66))[:5] == ["CONN/S", "FAIL/S", "FAIL%", "ABT/S", "P99"]
    assert outcome_header(top_text.frame_lines(frame, 60))[:4] == ["CONN/S", "FAIL/S", "FAIL%", "P99"]
    wide = outcome_header(top_text.frame_lines(frame, 120))
    assert wide[:10] == ["CONN/S", "FAIL/S", "FAIL%", "REF/S", "TMO/S", "UNR/S", "ABT/S", "OTH/S", "P50", "P99"]


def test_80x24_shows_every_section_with_rows_shared_out():
    frame = synthetic_frame()
    lines = top_text.frame_lines(frame, 80, 23)   # the screen keeps the last line for its keys
    assert len(lines) == 23 and all(top_text.width_of(text) <= 80 for text, _ in lines)
    headers = [i for i, (_, style) in enumerate(lines) if style == "header"]
    assert len(headers) == 3
    rows_per_table = [b - a - 1 for a, b in zip(headers, headers[1:] + [len(lines)])]
    # the heading (its host line wrapped at 80) and 3 headers; the rest shared, the odd rows first
    assert sum(rows_per_table) == 23 - headers[0] - 3 and rows_per_table in ([6, 6, 6], [6, 6, 5])
    assert lines[headers[1]][0].endswith(" P99 POD/UNIT (12/12)   COMM")
    row = lines[headers[1] + 1][0]   # the busiest: 11 * 50 attempts/s, 11 * 10 failures/s
    assert row.split()[:7] == ["550.0", "110.0", "50.0%", "33.0", "44.0", "48µs", "64µs"], row
    assert "kube-system/cored…" in row


def test_sort_by_failures_and_by_p99():
    first = outcome_sample(0.0, {(1, "a"): (("u", "a"), outcome_values()), (2, "b"): (("u", "b"), outcome_values()),
                                 (3, "c"): (("u", "c"), outcome_values())})
    slow, fast = [0] * 19 + [2] + [0] * 6, [0] * 4 + [2] + [0] * 21
    second = outcome_sample(1.0, {(1, "a"): (("u", "a"), outcome_values(20, success=18, refused=2,
                                                                       latency=[0] * 5 + [18] + [0] * 20)),
                                  (2, "b"): (("u", "b"), outcome_values(9, success=2, timeout=7, latency=fast)),
                                  (3, "c"): (("u", "c"), outcome_values(2, success=2, latency=slow))})

    def comms(sort):
        return [row["comm"] for row in watched(first, second, sort=sort).tables[1][1]]
    assert comms("rate") == ["a", "b", "c"]
    assert comms("failures") == ["b", "a", "c"]
    assert comms("p99") == ["c", "a", "b"]
    assert comms("comm") == ["a", "b", "c"]


def test_the_filter_looks_in_pod_or_unit_too():
    first = outcome_sample(0.0, {(1, "curl"): (("shop/cart-7d9f", "curl"), outcome_values()),
                                 (2, "curl"): (("nginx.service", "curl"), outcome_values())})
    assert [row["pod_or_unit"] for row in watched(first, name_filter="CART").tables[1][1]] == ["shop/cart-7d9f"]
    assert len(watched(first, name_filter="curl").tables[1][1]) == 2


@pytest.mark.parametrize("labels, shown", [
    ({"unit": "nginx.service"}, "nginx.service"),
    ({"unit": "", "container_id": "ab" * 32, "pod_uid": ""}, "ab" * 6),
    ({"unit": "x.service", "container_id": "ab" * 32, "pod_uid": "1-2-3"}, "1-2-3"),
    ({"pod_uid": "1-2-3", "namespace": "shop", "pod": "cart-0"}, "shop/cart-0"),
    ({"unit": "", "container_id": "", "pod_uid": ""}, ""),
    ({}, ""),
])
def test_pod_or_unit(labels, shown):
    assert top.pod_or_unit(labels) == shown


@pytest.mark.parametrize("value, text", [
    ("nginx.service", "nginx.service"),
    ("a\x1b[2Jb.service", "a\\x1b[2Jb.service"),
    ("back\\slash", "back\\x5cslash"),
    ("bad\udcffbyte", "bad\\xffbyte"),          # a byte that is not UTF-8, as os.scandir gives it
    ("c1\u009bcsi", "c1\u009bcsi"),            # valid UTF-8: the label keeps it, terminal_text escapes it
])
def test_label_text_writes_attribution_values_as_comm_labels(value, text):
    assert label_text(value) == text == comm_label(os.fsencode(value))


# --- outcome rows from real cgroups and real connects --------------------------------------

@pytest.fixture
def cgroups():
    made = TestCgroups()
    yield made
    made.close()


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def labelled(clock=None):
    return Attributor(Config(labels=PATH_LABELS), **({"clock": clock} if clock else {}))


def test_outcome_rows_count_each_failure_class_over_the_interval(pin_dir, cgroups):
    unit = f"tt{secrets.token_hex(3)}.service"
    rel = cgroups.make(f"system.slice/{unit}")
    attributor = labelled()
    with Puppet(unique_comm("tcpmo"), outcomes=True, cgroup=cgroups.dir(rel)) as proc:
        proc.end("success", 2)
        first = top.read_sample(pin_dir, attributor)
        returned = {}
        for kind, n in (("success", 3), ("refused", 4), ("unreachable", 3), ("other", 1), ("aborted", 2),
                        ("timeout", 2)):
            for name, count in proc.end(kind, n).items():
                returned[name] = returned.get(name, 0) + count
        second = top.read_sample(pin_dir, attributor)
    assert returned == {"ok": 3, "ECONNREFUSED": 4, "EHOSTUNREACH": 3, "ENOPROTOOPT": 1, "EINPROGRESS": 2,
                        "ETIMEDOUT": 2}
    seconds = second.taken - first.taken
    row = outcome_row(watched(first, second), comm=proc.label)
    assert row["pod_or_unit"] == unit and row["cgroups"] == 1
    assert {result: row[result] for result in maps.RESULTS} == \
        {"success": 5, "refused": 4, "timeout": 2, "unreachable": 3, "aborted": 2, "other": 1}
    assert {result: row[f"{result}_rate"] for result in maps.RESULTS} == \
        {"success": 3 / seconds, "refused": 4 / seconds, "timeout": 2 / seconds, "unreachable": 3 / seconds,
         "aborted": 2 / seconds, "other": 1 / seconds}
    assert row["attempts"] == 17 and row["attempts_rate"] == 15 / seconds
    assert row["failures"] == 12 and row["failures_rate"] == 12 / seconds and row["failure_ratio"] == 12 / 15
    assert row["p99_seconds"] < 0.5   # loopback handshakes: nowhere near a retransmission


def test_delayed_connects_give_a_p99_in_their_slot(pin_dir):
    with Puppet(unique_comm("tcpmd"), outcomes=True) as proc:
        proc.end("success", 1)
        first = top.read_sample(pin_dir)
        proc.end("success", 8)
        took = proc.end("delayed", 2)
        second = top.read_sample(pin_dir)
    assert len(took) == 2 and all(INITIAL_RTO < seconds < 3.5 for seconds in took), took
    row = outcome_row(watched(first, second), comm=proc.label)
    assert row["success_rate"] == 10 / (second.taken - first.taken)
    assert 0.5 < row["p99_seconds"] < 2.1, row
    # in the slot of a duration from the initial RTO to what the caller timed
    slots = range(kernel_slot(INITIAL_RTO), kernel_slot(max(took)) + 1)
    assert any(slot_range(slot)[0] <= row["p99_seconds"] <= slot_range(slot)[1] for slot in slots), row
    assert row["p50_seconds"] < 0.1   # 8 of 10 are loopback handshakes


def pod_uid():
    return str(uuid.uuid4())


def test_rows_are_per_pod_or_unit_summed_over_their_cgroups(pin_dir, cgroups):
    uid, uid2, cid1, cid2, cid3, cid4 = pod_uid(), pod_uid(), *(secrets.token_hex(32) for _ in range(4))
    pod = f"kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid.replace('-', '_')}.slice"
    places = {"pod container 1": cgroups.make(f"{pod}/cri-containerd-{cid1}.scope"),
              "pod container 2": cgroups.make(f"{pod}/cri-containerd-{cid2}.scope"),
              "cgroupfs pod": cgroups.make(f"kubepods/burstable/pod{uid2}/{cid4}"),
              "docker": cgroups.make(f"system.slice/docker-{cid3}.scope")}
    comm = unique_comm("tcpmp")
    attributor = labelled()
    with Puppet(comm, cgroup=cgroups.dir(places["pod container 1"])) as one, \
            Puppet(comm, cgroup=cgroups.dir(places["pod container 2"])) as two, \
            Puppet(comm, cgroup=cgroups.dir(places["cgroupfs pod"])) as three, \
            Puppet(comm, cgroup=cgroups.dir(places["docker"])) as four:
        for proc in (one, two, three, four):
            proc.connect(1)
        first = top.read_sample(pin_dir, attributor)
        one.connect(2)
        two.connect(3)
        three.connect(4)
        second = top.read_sample(pin_dir, attributor)
    seconds = second.taken - first.taken
    frame = watched(first, second, name_filter=comm)
    rows = {row["pod_or_unit"]: (row["attempts"], row["attempts_rate"], row["success"], row["cgroups"])
            for row in frame.tables[1][1]}
    assert rows == {uid: (7, 5 / seconds, 7, 2), uid2: (5, 4 / seconds, 5, 1), cid3[:12]: (1, 0.0, 1, 1)}
    by_pod = watched(first, second, name_filter=uid[:13].upper())
    assert [row["pod_or_unit"] for row in by_pod.tables[1][1]] == [uid]
    assert by_pod.tables[0][1] == [] and by_pod.tables[2][1] == []   # the others only filter by name


def test_rows_of_a_removed_cgroup_disappear_and_a_restarted_unit_counts_from_zero(pin_dir, cgroups):
    stopped, restarted = (cgroups.make(f"system.slice/tt{secrets.token_hex(3)}.service") for _ in range(2))
    comm = unique_comm("tcpmr")
    clock = FakeClock()
    attributor = labelled(clock)
    with Puppet(comm, cgroup=cgroups.dir(stopped)) as a, Puppet(comm, cgroup=cgroups.dir(restarted)) as b:
        a.connect(2)
        b.connect(5)
        first = top.read_sample(pin_dir, attributor)
    cgroups.remove(stopped)
    cgroups.remove(restarted)
    os.mkdir(cgroups.dir(restarted))   # as systemd restarts a unit: the same name, a new cgroup id
    with Puppet(comm, cgroup=cgroups.dir(restarted)) as again:
        again.connect(3)
        clock.now += 10   # past the attribution's check of cached cgroups
        second = top.read_sample(pin_dir, attributor)
    unit = restarted.rsplit("/", 1)[1]
    frame = watched(first, second, name_filter=comm)
    assert [(row["pod_or_unit"], row["attempts"], row["attempts_rate"]) for row in frame.tables[1][1]] == \
        [(unit, 3, 3 / (second.taken - first.taken))]
    gone = [member for member, (key, _) in second.tables["outcomes"].items() if member[1] == comm and key is None]
    assert len(gone) == 2   # still in the map, in no row


def test_unit_names_are_escaped_like_comms(pin_dir, cgroups):
    raw_unit = "tt\x1b[2J\x07\u009b\udcff.service"   # ESC [2J, BEL, C1 CSI (UTF-8), a byte that is not UTF-8
    rel = cgroups.make(f"system.slice/{raw_unit}")
    comm = unique_comm("tcpmu")
    with Puppet(comm, cgroup=cgroups.dir(rel)) as proc:
        proc.connect(2)
        once = run_top(pin_dir, "--once", "--interval", "0.2", "--filter", comm, COLUMNS="160")
        as_json = run_top(pin_dir, "--json", "--interval", "0.2", "--filter", comm)
    assert once.returncode == 0 and as_json.returncode == 0, (once.stderr, as_json.stderr)
    label = "tt\\x1b[2J\\x07\u009b\\xff.service"
    assert [row["pod_or_unit"] for row in json.loads(as_json.stdout)["outcomes"]] == [label]
    assert "tt\\x1b[2J\\x07\\xc2\\x9b\\xff.service" in once.stdout, once.stdout
    assert not re.search("[\x00-\x09\x0b-\x1f\x7f]", once.stdout) and not C1_CONTROL.search(once.stdout)


# --- --once and --json, no terminal --------------------------------------------------------

def pod_or_unit_of(pid):
    """What the POD/UNIT column should say for process `pid`: its cgroup v2 path, as
    /proc/PID/cgroup names it, read by the path rules."""
    with open(f"/proc/{pid}/cgroup") as f:
        (path,) = [line.split(":", 2)[2].strip() for line in f if line.startswith("0::")]
    return top.pod_or_unit(labels_of_path(path)._asdict())


def test_once_prints_one_frame_of_80_columns(pin_dir):
    with Connector(unique_comm(), opened=4, refused=2) as proc:
        result = run_top(pin_dir, "--once", "--interval", "0.5", "--filter", proc.comm.decode())
        where = pod_or_unit_of(proc.pid)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    title = rf"tcpmon top  sort: rate  filter: {proc.comm.decode()}  over 0\.5\ds  /sys/fs/bpf/"
    assert re.match(title, lines[0]), lines
    assert lines[1].startswith("host ") and " conn/s " in lines[1] and " fail/s " in lines[1], lines
    assert all(len(line) <= 80 for line in lines), lines
    assert any(line.startswith("CONN/S FAIL/S FAIL%  REF/S  TMO/S   P50   P99 POD/UNIT") for line in lines), lines
    rows = [line.split() for line in lines if line.split()[-1:] == [proc.comm.decode()]]
    # an idle process: its 6 connects were made before the first read, so exactly 0 per second,
    # and none ended in the interval: no failure ratio, no latency
    assert rows == [[str(proc.pid), "0.0", "6", proc.comm.decode()],
                    ["0.0", "0.0", "-", "0.0", "0.0", "-", "-", *([where] if where else []), proc.comm.decode()],
                    ["0.0", "6", proc.comm.decode()]], lines


def test_once_takes_its_width_from_columns(pin_dir):
    result = run_top(pin_dir, "--once", "--interval", "0.2", COLUMNS="40")
    assert result.returncode == 0, result.stderr
    assert max(len(line) for line in result.stdout.splitlines()) <= 40, result.stdout


def test_json_is_one_document_with_a_plausible_rate(pin_dir):
    with Puppet(unique_comm()) as proc:
        proc.tell("pace 20")
        result = run_top(pin_dir, "--json", "--interval", "2", "--filter", proc.label, TCPMON_SORT="total")
        proc.tell("stop")
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["sort"] == "total" and document["filter"] == proc.label
    assert 1.9 < document["seconds"] < 10
    (row,) = document["processes"]
    assert row["pid"] == proc.pid and row["comm"] == proc.label and row["connects"] > 0
    assert 10 <= row["connects_rate"] <= 30, row  # paced at 20 per second
    # the maps are read one after the other: a connect between two reads shows in one of them only
    one_connect = 1 / document["seconds"] + 1e-9
    (name,) = document["names"]
    assert name["comm"] == proc.label and abs(name["connects_rate"] - row["connects_rate"]) <= one_connect
    assert set(document["maps"]) == {"connects", "comm_totals", "outcomes"}
    assert document["rows_before_filter"]["processes"] >= 1
    (outcome,) = document["outcomes"]
    assert outcome["comm"] == proc.label and abs(outcome["attempts_rate"] - row["connects_rate"]) <= one_connect


OUTCOME_FIELDS = {"pod_or_unit", "comm", "cgroups", "attempts", "attempts_rate", "failures", "failures_rate",
                  "failure_ratio", "p50_seconds", "p99_seconds",
                  *maps.RESULTS, *(f"{result}_rate" for result in maps.RESULTS)}


def test_json_has_the_outcome_fields(pin_dir, cgroups):
    unit = f"tt{secrets.token_hex(3)}.service"
    rel = cgroups.make(f"system.slice/{unit}")
    with Puppet(unique_comm(), outcomes=True, cgroup=cgroups.dir(rel)) as proc:
        proc.tell("pace 10 refused")
        result = run_top(pin_dir, "--json", "--interval", "2", "--filter", unit, TCPMON_SORT="failures")
        proc.tell("stop")
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["labels"] == ["unit", "container_id", "pod_uid"] and document["attribution_problem"] is None
    assert document["sort"] == "failures" and document["processes"] == [] and document["names"] == []
    (row,) = document["outcomes"]
    assert set(row) == OUTCOME_FIELDS
    assert (row["pod_or_unit"], row["comm"], row["cgroups"]) == (unit, proc.label, 1)
    assert 5 <= row["refused_rate"] <= 15, row   # paced at 10 per second
    assert row["failures_rate"] == row["refused_rate"] == row["attempts_rate"] and row["failure_ratio"] == 1.0
    assert row["success_rate"] == 0 and row["p50_seconds"] is None and row["p99_seconds"] is None
    assert document["host_failures_rate"] >= row["failures_rate"]
    assert document["maps"]["outcomes"]["entries"] >= 1


def test_labels_none_makes_one_row_per_comm(pin_dir, cgroups):
    rels = [cgroups.make(f"system.slice/tt{secrets.token_hex(3)}.service") for _ in range(2)]
    comm = unique_comm()
    with Puppet(comm, cgroup=cgroups.dir(rels[0])) as one, Puppet(comm, cgroup=cgroups.dir(rels[1])) as two:
        one.connect(2)
        two.connect(3)
        labelled_json = run_top(pin_dir, "--json", "--interval", "0.2", "--filter", comm)
        plain_json = run_top(pin_dir, "--json", "--interval", "0.2", "--filter", comm, TCPMON_LABELS="none")
    assert sorted((row["pod_or_unit"], row["attempts"]) for row in json.loads(labelled_json.stdout)["outcomes"]) == \
        sorted([(rels[0].rsplit("/", 1)[1], 2), (rels[1].rsplit("/", 1)[1], 3)])
    document = json.loads(plain_json.stdout)
    assert document["labels"] == [] and [(row["pod_or_unit"], row["attempts"], row["cgroups"])
                                         for row in document["outcomes"]] == [("", 5, 2)]


RAW_HOSTILE = "\\x1b[2J\\x07\\xc2\\x9b\\xff"  # clear screen, bell, C1 CSI (valid UTF-8), invalid UTF-8


def test_control_bytes_in_a_name_come_out_escaped(pin_dir):
    prefix = unique_comm("tc")[:6]
    with Connector(prefix + RAW_HOSTILE, opened=2) as proc:
        once = run_top(pin_dir, "--once", "--interval", "0.2", "--filter", prefix)
        as_json = run_top(pin_dir, "--json", "--interval", "0.2", "--filter", prefix)
    assert proc.comm == prefix.encode() + b"\x1b[2J\x07\xc2\x9b\xff"
    assert once.returncode == 0 and as_json.returncode == 0, (once.stderr, as_json.stderr)
    shown = prefix + r"\x1b[2J\x07\xc2\x9b\xff"
    assert f"  {shown}" in once.stdout, once.stdout
    assert not re.search("[\x00-\x09\x0b-\x1f\x7f]", once.stdout) and not C1_CONTROL.search(once.stdout)
    assert as_json.stdout.isascii()  # \u escapes only: safe to print
    document = json.loads(as_json.stdout)
    assert [row["comm"] for row in document["processes"]] == [comm_label(proc.comm)]
    assert comm_label(proc.comm) == prefix + "\\x1b[2J\\x07\u009b\\xff"  # the exposition keeps U+009B


# --- errors ---------------------------------------------------------------------------------

def assert_one_line_error(result, *words):
    assert result.returncode != 0 and "Traceback" not in result.stderr, result
    assert result.stdout == "" and result.stderr.count("\n") == 1 and result.stderr.startswith("tcpmon: "), result
    for word in words:
        assert word in result.stderr, (word, result.stderr)


def test_top_without_a_terminal_says_to_use_once(pin_dir):
    assert_one_line_error(run_top(pin_dir), "terminal", "--once")


def test_once_without_a_probe_says_to_load(fresh_pin_dir):
    assert_one_line_error(run_top(fresh_pin_dir, "--once", "--interval", "0.1"), "tcpmon load")


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "soon", "3601"])
def test_a_bad_interval_is_a_usage_error(value, pin_dir):
    for result in (run_top(pin_dir, "--once", "--interval", value),
                   run_top(pin_dir, "--once", TCPMON_INTERVAL=value)):
        assert result.returncode == 2 and "Traceback" not in result.stderr, result
        assert result.stderr.splitlines()[-1].startswith("tcpmon top: error: ") and value in result.stderr


def test_help_names_the_env_twin_of_every_flag():
    options = help_options("top")
    assert {"--pin-dir", "--log-level", "--interval", "--sort", "--filter", "--labels", "--cgroup-root", "--once",
            "--json"} == set(options)
    for flag, text in options.items():
        assert f"(env TCPMON_{flag[2:].upper().replace('-', '_')};" in text, text
    assert "two reads" in options["--interval"]


def test_a_terminal_curses_cannot_drive_is_one_line(pin_dir):
    controller, terminal = pty.openpty()
    try:
        result = subprocess.run([*TCPMON, "top", "--pin-dir", pin_dir], stdin=terminal, stdout=terminal,
                                stderr=subprocess.PIPE, text=True, timeout=30, cwd=ROOT,
                                env=env_without_twins(TERM="no-such-terminal"))
    finally:
        os.close(terminal)
        os.close(controller)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.count("\n") == 1 and "TERM='no-such-terminal'" in result.stderr and "--once" in result.stderr


# --- the screen, in tmux ---------------------------------------------------------------------

class TmuxTop:
    """`tcpmon top` typed into a shell in a private tmux server's 80x24 window."""

    def __init__(self, pin_dir, *args, width=80, height=24):
        self.socket_dir = tempfile.mkdtemp(prefix=f"tcpmon-test-{os.getpid()}-tmux-")
        self.tmux = ["tmux", "-u", "-S", os.path.join(self.socket_dir, "socket"), "-f", "/dev/null"]
        self.env = env_without_twins(LANG="C.UTF-8", PS1="$ ")
        command = " ".join([*map(shlex.quote, TCPMON), "top", "--pin-dir", shlex.quote(pin_dir),
                            *map(shlex.quote, args)])
        try:
            self._tmux("new-session", "-d", "-s", "top", "-x", str(width), "-y", str(height),
                       "bash --norc --noprofile")
            self.type_line(f"cd {shlex.quote(str(ROOT))} && clear && echo before-top && {command}; "
                           "echo top-exited-$?")
            self.wait_for(lambda lines: lines and lines[0].startswith("tcpmon top "), "the first frame")
        except BaseException:
            self.close()
            raise

    def _tmux(self, *args):
        return subprocess.run([*self.tmux, *args], capture_output=True, text=True, check=True, timeout=30,
                              env=self.env).stdout

    def type_line(self, text):
        self._tmux("send-keys", "-t", "top", "-l", text)
        self._tmux("send-keys", "-t", "top", "Enter")

    def keys(self, *keys):
        self._tmux("send-keys", "-t", "top", *keys)

    def lines(self):
        """The pane's lines; wrapped lines joined (-J), so a line too long would show."""
        text = self._tmux("capture-pane", "-p", "-J", "-t", "top")
        return [line.rstrip(" ") for line in text.rstrip("\n").split("\n")]

    def flag(self, name):
        return self._tmux("display-message", "-p", "-t", "top", f"#{{{name}}}").strip()

    def wait_for(self, check, what, timeout=30):
        deadline = time.monotonic() + timeout
        while True:
            lines = self.lines()
            found = check(lines)
            if found:
                return found
            if time.monotonic() > deadline:
                pytest.fail(f"the screen never showed {what}:\n" + "\n".join(lines))
            time.sleep(0.2)

    def close(self):
        subprocess.run([*self.tmux, "kill-server"], capture_output=True, env=self.env)
        shutil.rmtree(self.socket_dir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def table_rows(lines, is_its_header):
    """The lines of the table whose header `is_its_header`, up to the next header (every header
    has a CONN/S column) or the key line at the bottom."""
    start = next(i for i, line in enumerate(lines) if is_its_header(line))
    end = next((i for i in range(start + 1, len(lines)) if "CONN/S" in lines[i]), len(lines) - 1)
    return [line for line in lines[start + 1:end] if line.strip()]


def process_rows(lines):
    """[[pid, rate, total, comm]] of the processes table on the screen."""
    return [line.split(None, 3) for line in table_rows(lines, lambda line: "COMM (processes:" in line)]


def outcome_rows(lines):
    """[[conn/s, fail/s, fail%, two result columns, p50, p99, (pod/unit,) comm]] of the outcomes table."""
    return [line.split() for line in table_rows(lines, lambda line: line.startswith("CONN/S FAIL/S"))]


def name_rows(lines):
    return [line.split(None, 2) for line in table_rows(lines, lambda line: "COMM (names" in line)]


def pids_shown(lines):
    return [int(row[0]) for row in process_rows(lines)]


def rate_of(lines, pid):
    rows = [row for row in process_rows(lines) if row[0] == str(pid) and row[1] != "-"]
    return float(rows[0][1]) if rows else None


def test_screen_shows_the_row_with_a_plausible_rate_and_fits_80x24(pin_dir):
    with Puppet(unique_comm()) as proc, Puppet("\\x1b" * 15) as long_name:
        proc.tell("pace 20")
        long_name.tell("pace 5")
        with TmuxTop(pin_dir) as screen:
            assert screen.flag("window_width") == "80" and screen.flag("window_height") == "24"
            lines = screen.wait_for(lambda lines: (r := rate_of(lines, proc.pid)) and 10 <= r <= 30 and lines,
                                    f"pid {proc.pid} at about 20 connects/s")
            assert len(lines) == 24 and all(len(line) <= 80 for line in lines), lines
            assert lines[-1].startswith("q quit") and lines[1].startswith("host "), lines
            (row,) = [row for row in process_rows(lines) if row[0] == str(proc.pid)]
            assert row[3] == proc.label and 10 <= float(row[1]) <= 30
            screen.keys("/")
            screen.keys("-l", "\\x1b\\x1b\\x1b")
            screen.keys("Enter")
            lines = screen.wait_for(lambda lines: pids_shown(lines) == [long_name.pid] and lines,
                                    "only the process with the long name")
            (row,) = process_rows(lines)
            assert row[3] == "\\x1b" * 12 + "…"  # 60 columns of label cut to the 49 left of 80
            assert all(len(line) <= 80 for line in lines), lines
        proc.tell("stop")
        long_name.tell("stop")


def test_screen_sort_keys_change_the_order(pin_dir):
    prefix = unique_comm("tcps")
    with Puppet(prefix + "a") as busy, Puppet(prefix + "b") as idle:
        idle.connect(500)
        busy.tell("pace 5")
        with TmuxTop(pin_dir, "--filter", prefix) as screen:
            def order(sort, pids):
                return lambda lines: f"sort: {sort}  " in lines[0] and pids_shown(lines) == pids and all(
                    row[1] != "-" for row in process_rows(lines)) and lines
            screen.wait_for(order("rate", [busy.pid, idle.pid]), "the busy process first (sort: rate)")
            screen.keys("t")
            by_total = order("total", [idle.pid, busy.pid])
            # Both tables in one condition: a capture taken while the screen is redrawn can show
            # the processes table in the new order and the names table still in the old one.
            screen.wait_for(lambda lines: by_total(lines) and [row[2] for row in name_rows(lines)] == [
                prefix + "b", prefix + "a"], "the idle process and its name first (sort: total)")
            screen.keys("p")
            screen.wait_for(order("pid", sorted([busy.pid, idle.pid])), "pid order (sort: pid)")
            screen.keys("t", "n")
            screen.wait_for(order("comm", [busy.pid, idle.pid]), "name order (sort: comm)")
            screen.keys("s")
            screen.wait_for(lambda lines: "sort: rate  " in lines[0], "s cycling on to rate")
        busy.tell("stop")


def test_screen_filter_hides_the_others(pin_dir):
    prefix = unique_comm("tcpf")
    with Puppet(prefix + "a") as kept, Puppet(prefix + "b") as hidden:
        kept.connect(2)
        hidden.connect(2)
        with TmuxTop(pin_dir, "--filter", prefix) as screen:
            screen.wait_for(lambda lines: sorted(pids_shown(lines)) == sorted([kept.pid, hidden.pid]),
                            "both processes")
            screen.keys("/", *["BSpace"] * len(prefix))  # the --filter text, gone
            screen.keys("C-u", "Tab")  # not printable: no part of a filter
            screen.keys("-l", prefix.upper() + "A")
            screen.keys("Enter")
            lines = screen.wait_for(lambda lines: pids_shown(lines) == [kept.pid] and [
                row[2] for row in name_rows(lines)] == [prefix + "a"] and lines, "only the kept one, in both tables")
            assert f"filter: {prefix.upper()}A" in lines[0]
            assert all(str(hidden.pid) not in line and prefix + "b" not in line for line in lines), lines
            screen.keys("Escape")
            lines = screen.wait_for(lambda lines: {kept.pid, hidden.pid} <= set(pids_shown(lines)) and lines,
                                    "every process again after Esc")
            assert "filter:" not in lines[0]


def test_screen_q_quits_with_status_0_and_restores_the_terminal(pin_dir):
    with TmuxTop(pin_dir) as screen:
        assert screen.flag("alternate_on") == "1" and screen.flag("cursor_flag") == "0"
        screen.keys("q")
        lines = screen.wait_for(lambda lines: "top-exited-0" in lines and lines, "top exiting with status 0")
        assert screen.flag("alternate_on") == "0" and screen.flag("cursor_flag") == "1"
        assert screen.flag("keypad_cursor_flag") == "0"
        assert "before-top" in lines and not any(line.startswith("tcpmon top ") for line in lines), lines
        screen.type_line("echo typed-$((6 * 7))")  # the tty echoes and reads lines again
        screen.wait_for(lambda lines: "typed-42" in lines, "the shell working after top")


def test_screen_says_why_a_read_failed_and_keeps_running(fresh_pin_dir):
    from tcpmon import loader
    loader.load(fresh_pin_dir)
    with TmuxTop(fresh_pin_dir, "--interval", "0.2") as screen:
        loader.unload(fresh_pin_dir)
        lines = screen.wait_for(lambda lines: any(line.startswith("read failed") for line in lines) and lines,
                                "the read error")
        at = next(i for i, line in enumerate(lines) if line.startswith("read failed"))
        assert "no map pinned at" in lines[at] and "run 'tcpmon load'" in lines[at + 1], lines
        loader.load(fresh_pin_dir)
        screen.wait_for(lambda lines: not any("read failed" in line for line in lines), "the error gone after a load")
        screen.keys("q")
        screen.wait_for(lambda lines: "top-exited-0" in lines, "top exiting with status 0")


def test_screen_shows_outcomes_sorts_them_by_failures_and_p99_and_fits_80x24(pin_dir, cgroups):
    prefix = unique_comm("o")
    units = [f"tt{secrets.token_hex(2)}.service" for _ in range(2)]
    rels = [cgroups.make(f"system.slice/{unit}") for unit in units]
    with Puppet(prefix + "a", outcomes=True, cgroup=cgroups.dir(rels[0])) as busy, \
            Puppet(prefix + "b", outcomes=True, cgroup=cgroups.dir(rels[1])) as failing:
        busy.tell("pace 20")
        failing.tell("pace 5 refused")
        with TmuxTop(pin_dir, "--filter", prefix) as screen:
            def order(sort, comms):
                return lambda lines: f"sort: {sort}  " in lines[0] and [row[-1] for row in outcome_rows(lines)] == \
                    comms and all(row[0] != "-" for row in outcome_rows(lines)) and lines
            lines = screen.wait_for(order("rate", [busy.label, failing.label]), "the busy one first (sort: rate)")
            assert len(lines) == 24 and all(len(line) <= 80 for line in lines), lines
            headers = [line for line in lines if "CONN/S" in line]
            assert len(headers) == 3 and all(re.fullmatch(pattern, line) for pattern, line in zip([
                r"    PID    CONN/S       TOTAL  COMM \(processes: 2 of \d+\)",
                r"CONN/S FAIL/S FAIL%  REF/S  TMO/S   P50   P99 POD/UNIT \(2( of |/)\d+\) +COMM",
                r"  CONN/S       TOTAL  COMM \(names, exited processes included: 2 of \d+\)"], headers)), lines
            busy_row, failing_row = outcome_rows(lines)
            assert busy_row[1:5] == ["0.0", "0.0%", "0.0", "0.0"] and busy_row[-2:] == [units[0], busy.label]
            assert 10 <= float(busy_row[0]) <= 30 and busy_row[6].endswith(("µs", "ms")), busy_row
            assert failing_row[2] == "100%" and failing_row[0] == failing_row[1] == failing_row[3], failing_row
            assert 2 <= float(failing_row[3]) <= 10 and failing_row[5:] == ["-", "-", units[1], failing.label]
            screen.keys("f")
            screen.wait_for(order("failures", [failing.label, busy.label]), "the failing one first (sort: failures)")
            screen.keys("l")
            screen.wait_for(order("p99", [busy.label, failing.label]), "the one with a latency first (sort: p99)")
            screen.keys("/", *["BSpace"] * len(prefix))
            screen.keys("-l", units[1].upper())
            screen.keys("Enter")
            screen.wait_for(lambda lines: [row[-1] for row in outcome_rows(lines)] == [failing.label] and
                            process_rows(lines) == [] and name_rows(lines) == [], "only the failing unit's row")
        busy.tell("stop")
        failing.tell("stop")


def test_without_a_cgroup2_mount_top_says_so_and_shows_rows_per_comm(pin_dir):
    """In a mount namespace without cgroup2 (as on a host with none): no labels, the reason in
    the JSON and on the frame, rows as with --labels none."""
    comm = unique_comm()
    with Puppet(comm) as proc:
        proc.connect(2)
        shell = "for m in $(awk '$3 == \"cgroup2\" {print $2}' /proc/self/mounts); do umount -l $m; done; true"
        runs = [subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", f'{shell} && exec "$@"',
                                "sh", *TCPMON, "top", "--pin-dir", pin_dir, mode, "--interval", "0.2",
                                "--filter", comm], capture_output=True, text=True, timeout=60, cwd=ROOT,
                               stdin=subprocess.DEVNULL, env=env_without_twins(COLUMNS="200"))
                for mode in ("--json", "--once")]
    as_json, once = runs
    assert as_json.returncode == 0 and once.returncode == 0, (as_json.stderr, once.stderr)
    document = json.loads(as_json.stdout)
    assert document["labels"] == [] and document["attribution_problem"].startswith("no cgroup2 filesystem")
    assert [(row["pod_or_unit"], row["attempts"]) for row in document["outcomes"]] == [("", 2)]
    assert once.stdout.splitlines()[2] == f"no pod/unit: {document['attribution_problem']}"
