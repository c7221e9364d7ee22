"""The quick kernel matrix: a Debian 12 (6.1) x86 kernel booted under qemu TCG.

This machine's own kernel has no kprobes, so the kprobe path (and whether a
pinned perf-event link keeps counting after `tcpmon load` exits) can only be
proven in a guest.  kernels/run-matrix.sh --quick boots one and runs
kernels/guest_smoke.py there: kprobe and tracepoint modes, N random connects
from a process named tcpmon-smoke, exact N from `tcpmon dump --json` and from
`tcpmon serve`'s /metrics.  A second run loads a deliberately miscounting BPF
object and must fail, so the harness is shown to catch a wrong count.

Needs root (as all of make test) and qemu-system-x86, which it installs from
scripts/apt-packages.txt when missing and skips only if that fails.  Takes
about two minutes (both guests).  The full matrix is `make test-kernels`.
"""
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUN_MATRIX = ROOT / "kernels" / "run-matrix.sh"
CACHE = ROOT / ".cache" / "kernels"
QUICK_MODES = ("kprobe", "tracepoint")


@pytest.fixture(scope="module")
def qemu():
    if shutil.which("qemu-system-x86_64") is None:
        # Same path as `make deps`: the package is listed in scripts/apt-packages.txt.
        proc = subprocess.run([str(ROOT / "scripts" / "install-deps.sh")], capture_output=True, text=True)
        if shutil.which("qemu-system-x86_64") is None:
            pytest.skip("qemu-system-x86 is not installed and could not be installed "
                        f"(scripts/install-deps.sh exited {proc.returncode}: {proc.stderr.strip()[-300:]})")
    return shutil.which("qemu-system-x86_64")


def run_matrix(tmp_path, *args):
    runs = tmp_path / "runs"
    output = tmp_path / "quick.md"
    proc = subprocess.run([str(RUN_MATRIX), "--quick", "--timeout", "600", "--runs", str(runs),
                           "--output", str(output), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    results = []
    for path in sorted(runs.glob("*/results.jsonl")):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if "mode" in record:
                results.append(record)
    return proc, output, results


def explain(proc):
    return f"run-matrix exited {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"


def test_quick_guest_counts_exactly(qemu, tmp_path):
    proc, output, results = run_matrix(tmp_path)
    assert proc.returncode == 0, explain(proc)
    by_mode = {r["mode"]: r for r in results}
    assert set(by_mode) == set(QUICK_MODES), explain(proc)
    for mode, r in by_mode.items():
        assert not r["load_failed"], f"{mode}: {r['load_output']}"
        assert r["attached_mode"] == mode
        assert r["expected"] >= 5
        assert r["dump"] == r["expected"], f"{mode}: tcpmon dump counted {r['dump']}, expected {r['expected']}"
        assert r["metrics"] == r["expected"], f"{mode}: /metrics showed {r['metrics']}, expected {r['expected']}"
        assert r["comm_ok"] is True
        assert r["outcomes"] == r["expected_outcomes"], f"{mode}: outcomes {r['outcomes']}"
        assert r["expected_outcomes"]["refused"] > 0
        assert r["pid_dropped_on_exit"] is True
        assert r["unloaded"] is True
        assert r["errors"] == []
        # kprobe and tracepoint attach through perf events; the load process had
        # exited before the connects, so the pinned perf link kept counting alone.
        assert r["loader_exited"] is True
        assert r["link_type"] == "perf_event"
    table = output.read_text()
    for mode, r in by_mode.items():
        row = re.search(rf"^\| 6\.1\.\S+ \| x86 \| {mode} \| perf_event \| (\d+)/(\d+) \| (\d+)/(\d+) \|.*\| PASS \|$",
                        table, re.M)
        assert row, f"no PASS row for {mode} in {output}:\n{table}"
        assert row.groups() == (str(r["expected"]),) * 4


def overcounting_object():
    """The probe with `connects += 2` instead of 1: built outside /tmp, which the guest covers."""
    source = (ROOT / "bpf" / "tcpconnect.bpf.c").read_text()
    broken, n = re.subn(r"__atomic_add_fetch\(&value->connects, 1,", "__atomic_add_fetch(&value->connects, 2,",
                        source)
    assert n == 1, "bpf/tcpconnect.bpf.c no longer increments value->connects by 1: update this test's sabotage"
    out = CACHE / f"test-{os.getpid()}"
    out.mkdir(parents=True, exist_ok=True)
    (out / "tcpconnect.bpf.c").write_text(broken)
    obj = out / "overcount.bpf.o"
    subprocess.run(["clang", "-g", "-O2", "-target", "bpf", "-D__TARGET_ARCH_x86", f"-I{ROOT / 'bpf'}",
                    "-c", str(out / "tcpconnect.bpf.c"), "-o", str(obj)], check=True)
    return out, obj


def test_quick_guest_catches_a_miscount(qemu, tmp_path):
    out, obj = overcounting_object()
    try:
        proc, output, results = run_matrix(tmp_path, "--modes", "kprobe", "--bpf-object", str(obj))
    finally:
        shutil.rmtree(out, ignore_errors=True)
    assert proc.returncode == 1, explain(proc)
    [r] = results
    assert not r["load_failed"], r["load_output"]
    # every connect adds 2 (a new PID's entry starts at 0)
    assert r["dump"] == 2 * r["expected"], explain(proc)
    assert r["metrics"] == 2 * r["expected"]
    assert "**FAIL**" in output.read_text()


def test_a_guest_that_cannot_be_prepared_fails_its_row_with_the_reason(tmp_path):
    """A setup step that fails (here dpkg-deb on a cached kernel .deb that is not there) fails
    the row with that step's own stderr, in the table and the log, not an empty console tail."""
    cache = tmp_path / "cache"
    (cache / "deb12-x86").mkdir(parents=True)
    (cache / "deb12-x86" / "debs.txt").write_text("linux-image-absent_1_amd64.deb\n")
    (cache / "debs" / "amd64").mkdir(parents=True)
    env = dict(os.environ, TCPMON_KERNEL_CACHE=str(cache))
    output = tmp_path / "quick.md"
    proc = subprocess.run([str(RUN_MATRIX), "--only", "deb12-x86", "--modes", "kprobe", "--offline",
                           "--runs", str(tmp_path / "runs"), "--output", str(output)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, explain(proc)
    [row] = [line for line in output.read_text().splitlines() if line.startswith("| ") and "| kprobe |" in line]
    assert "**FAIL**: setup failed: preparing the guest failed (exit" in row, row
    # dpkg-deb's message names the missing file
    assert re.search(r"stderr: .*dpkg-deb.*linux-image-absent_1_amd64\.deb", row), row
    assert "linux-image-absent_1_amd64.deb" in (tmp_path / "runs" / "deb12-x86" / "setup.log").read_text()
    assert re.search(r"run-matrix: FAIL deb12-x86: setup failed: .*dpkg-deb", proc.stderr), explain(proc)
