"""Judges the kernel-matrix guests' results and writes the markdown table.

    python3 kernels/report.py --output docs/KERNELS.md RUNDIR...

Each RUNDIR (.cache/kernels/runs/<label>/) holds meta.env and setup.log (the
stderr of fetching the kernel and building the guest, written by run-matrix.sh),
results.jsonl (written by kernels/guest_smoke.py in the guest), console.log and
qemu.log.  A guest that failed before or while booting is reported with the
tail of whichever of those logs says why.  A mode passes when `tcpmon dump` and the exporter both show
exactly the expected connects for the connector's PID and comm, the PID leaves
the map when the connector exits, and unload frees everything.  A mode that is
not must-work may fail to load ("not supported"); any other failure, a guest
that did not finish, or a missing result fails the run (exit 1).
"""
import argparse
import datetime
import json
import os
import platform
import re
import sys

MODES_ORDER = ("kprobe", "fentry", "tp_btf", "tracepoint", "auto")


def read_meta(rundir):
    meta = {}
    try:
        with open(os.path.join(rundir, "meta.env")) as f:
            for line in f:
                key, sep, value = line.rstrip("\n").partition("=")
                if sep:
                    meta[key] = value
    except FileNotFoundError:
        pass
    return meta


def read_results(rundir):
    facts, results = {}, []
    try:
        with open(os.path.join(rundir, "results.jsonl")) as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                try:
                    record = json.loads(line)
                except ValueError:
                    continue  # a line cut short by a guest that died mid-write
                if "facts" in record:
                    facts = record["facts"]
                else:
                    results.append(record)
    except FileNotFoundError:
        pass
    return facts, results


def log_tail(rundir, name, lines=20):
    """The last LINES non-empty lines of RUNDIR/NAME ([] when it is missing or empty)."""
    try:
        with open(os.path.join(rundir, name), errors="replace") as f:
            text = f.read()
    except FileNotFoundError:
        return []
    return [line.rstrip() for line in text.splitlines() if line.strip()][-lines:]


def setup_reason(meta, rundir):
    """'setup failed: WHAT: THE LAST LINES OF ITS STDERR' for a guest that could not be prepared."""
    reason = f"setup failed: {meta['setup_error']}"
    # run-matrix's own progress notes are not reasons; the failing step's messages are
    said = [line for line in log_tail(rundir, "setup.log") if line.split(": ", 1)[-1] not in reason
            and not re.match(r"run-matrix: [\w-]+: (unpacking|downloading) ", line)][-3:]
    if said:
        reason += " — stderr: " + " / ".join(said)
    elif "(exit" in meta["setup_error"]:
        reason += " — no stderr (setup.log is empty)"
    return reason[:600]


def failure_log(rundir, console_tail):
    """The logs that say why a guest failed, for the terminal."""
    parts = []
    for name, lines in (("setup.log", log_tail(rundir, "setup.log")), ("qemu.log", log_tail(rundir, "qemu.log"))):
        if lines:
            parts.append(f"{name} tail ({os.path.join(rundir, name)}):\n" + "\n".join(lines))
    if console_tail.strip():
        parts.append(f"console tail ({os.path.join(rundir, 'console.log')}):\n{console_tail}")
    return "\n".join(parts) or f"no setup, qemu or console output in {rundir}"


def console_done(rundir):
    try:
        with open(os.path.join(rundir, "console.log"), errors="replace") as f:
            text = f.read()
    except FileNotFoundError:
        return None, ""
    marker = "TCPMON-GUEST-DONE rc="
    at = text.rfind(marker)
    if at < 0:
        return None, text[-1500:]
    return text[at + len(marker):].split()[0], text[-1500:]


def judge(result, must_work):
    """(verdict, reasons): PASS, FAIL or UNSUPPORTED."""
    mode, expected = result["mode"], result.get("expected")
    required = mode in must_work or (mode == "auto" and bool(must_work))
    if result.get("load_failed"):
        if required:
            return "FAIL", [f"load failed: {last_line(result.get('load_output', ''))}"]
        return "UNSUPPORTED", [last_line(result.get("load_output", ""))]
    reasons = []
    if result.get("dump") != expected:
        reasons.append(f"dump counted {result.get('dump')}, expected {expected}")
    if result.get("metrics") != expected:
        reasons.append(f"exporter showed {result.get('metrics')}, expected {expected}")
    if result.get("comm_total") not in (None, expected):
        reasons.append(f"per-comm total {result.get('comm_total')}, expected {expected}")
    for outcome, want in (result.get("expected_outcomes") or {}).items():
        got = result.get("outcomes", {}).get(outcome)
        if got != want:
            reasons.append(f"{outcome} connects {got}, expected {want}")
    if result.get("comm_ok") is not True:
        reasons.append("comm in the map is not the connector's")
    if result.get("pid_dropped_on_exit") is not True:
        reasons.append("PID not dropped when the connector exited")
    if result.get("unloaded") is not True:
        reasons.append("unload left pins or programs behind")
    reasons += [e for e in result.get("errors", []) if e not in reasons]
    return ("FAIL" if reasons else "PASS"), reasons


def kernel_package(debs):
    """'linux-image-6.1.0-57-amd64 6.1.192-3' from the .deb names run-matrix unpacked."""
    for deb in debs.split():
        name, _, rest = deb.partition("_")
        if name.startswith(("linux-image-", "linux-binary-")) and name.split("-")[2][:1].isdigit():
            return f"{name} {rest.rpartition('_')[0].replace('%3a', ':')}"
    return debs


def last_line(text):
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def cell(value, expected):
    return "–" if value is None else f"{value}/{expected}"


def evaluate(rundirs):
    rows, failures, kernels = [], [], []
    for rundir in rundirs:
        meta = read_meta(rundir)
        facts, results = read_results(rundir)
        done_rc, console_tail = console_done(rundir)
        label = meta.get("label", os.path.basename(rundir))
        asked = [m for m in meta.get("modes", "").split(",") if m]
        must = [m for m in meta.get("must", "").split(",") if m and (not asked or m in asked)]
        kernel = facts.get("release") or meta.get("release", "?")
        kernels.append({"label": label, "kernel": kernel, "arch": meta.get("arch", "?"),
                        "machine": facts.get("machine", "?"), "suite": meta.get("suite", "?"),
                        "packages": kernel_package(meta.get("packages", "")), "seconds": meta.get("boot_seconds", "?"),
                        "qemu": meta.get("qemu", "?"), "git": meta.get("git", "?"), "facts": facts})
        seen = set()
        for result in results:
            verdict, reasons = judge(result, must)
            seen.add(result["mode"])
            rows.append({"label": label, "kernel": kernel, "arch": meta.get("arch", "?"), "result": result,
                         "verdict": verdict, "reasons": reasons})
            if verdict == "FAIL":
                failures.append(f"{label} {result['mode']}: {'; '.join(reasons)}")
        missing = [m for m in must if m not in seen]
        if done_rc is None or done_rc != "0" or missing or not results:
            why = []
            if meta.get("setup_error"):
                why.append(setup_reason(meta, rundir))
            elif meta.get("qemu_rc") == "124":
                why.append("guest hung (timeout)")
            if done_rc is None and not meta.get("setup_error"):
                said = log_tail(rundir, "qemu.log", 2) or [last_line(console_tail)]
                why.append(f"guest did not finish (qemu exit {meta.get('qemu_rc', '?')})"
                           + (f": {' / '.join(s for s in said if s)}" if any(said) else ""))
            elif done_rc is not None and done_rc != "0":
                why.append(f"smoke exited {done_rc}")
            if missing:
                why.append(f"no result for {', '.join(missing)}")
            if why:
                failures.append(f"{label}: {'; '.join(why)}\n{failure_log(rundir, console_tail)}")
                rows.append({"label": label, "kernel": kernel, "arch": meta.get("arch", "?"),
                             "result": {"mode": ", ".join(missing) or "–"}, "verdict": "FAIL",
                             "reasons": why})
    return rows, failures, kernels


def version_key(release):
    """'6.12.95+deb12-amd64' -> (6, 12, 95) for ordering kernels."""
    numbers = re.match(r"[\d.]+", release or "")
    return tuple(int(n) for n in numbers.group(0).strip(".").split(".")) if numbers else ()


def summary(rows, kernels):
    """Sentences derived from the rows: where each mode counted exactly, what persists."""
    lines = []
    for mode in MODES_ORDER:
        mine = [r for r in rows if r["result"].get("mode") == mode]
        if not mine:
            continue
        def where(verdict):
            return ", ".join(f"{r['kernel']}" for r in mine if r["verdict"] == verdict)
        text = f"- `{mode}`: counted exactly on {where('PASS') or 'no kernel'}"
        if where("UNSUPPORTED"):
            text += f"; not supported on {where('UNSUPPORTED')}"
        if where("FAIL"):
            text += f"; **failed** on {where('FAIL')}"
        lines.append(text + ".")
    perf = [r for r in rows if r["result"].get("link_type") == "perf_event"]
    if perf:
        kept = sorted({r["kernel"] for r in perf if r["verdict"] == "PASS"}, key=version_key)
        lost = sorted({r["kernel"] for r in perf if r["verdict"] != "PASS"}, key=version_key)
        lines.append(f"- Pinned perf-event links (kprobe, tracepoint) kept counting after `tcpmon load` "
                     f"exited on: {', '.join(kept) or 'none'}" + (f"; not on: {', '.join(lost)}" if lost else "") + ".")
    for arch in sorted({k["arch"] for k in kernels}):
        complete = sorted((k["kernel"] for k in kernels if k["arch"] == arch and all(
            r["verdict"] == "PASS" for r in rows if r["label"] == k["label"]) and any(
            r["label"] == k["label"] for r in rows)), key=version_key)
        lines.append(f"- {arch}: every attach mode counted exactly on "
                     f"{', '.join(complete) if complete else 'no kernel of this run'}.")
    return lines


def markdown(rows, kernels, failures):
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    out = ["# Kernel matrix", "",
           "Generated by `make test-kernels` (`kernels/run-matrix.sh`, judged by `kernels/report.py`) "
           f"on {now}; do not edit by hand.",
           "",
           "Each guest is a Debian kernel booted under qemu with TCG (no KVM) and no network device. "
           "For every attach mode the smoke runs `tcpmon load --attach MODE` (the loader exits), "
           "then a process named `tcpmon-smoke` makes N TCP connects (N random per mode), a third of "
           "them to a loopback port that does not listen and the rest to a loopback listener; then "
           "`tcpmon dump --json` and the `/metrics` of `tcpmon serve` must both show exactly N for that "
           "PID, and `tcpmon_connects_total` exactly the successes and the refusals; the PID must leave "
           "the map when the process exits, and `tcpmon unload` must remove the pins and free the "
           "programs.",
           "",
           "Cells are counted/expected.  Every connect happens after `tcpmon load` has exited, so a "
           "passing row also proves the pinned link keeps counting without the loader.",
           "",
           "| kernel | arch | attach mode | link | `tcpmon dump` | exporter | per-comm total | "
           "success | refused | PID dropped on exit | unload | result |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    order = {m: i for i, m in enumerate(MODES_ORDER)}
    runs = {k["label"]: i for i, k in enumerate(kernels)}   # matrix.conf order
    for row in sorted(rows, key=lambda r: (runs.get(r["label"], 99), order.get(r["result"].get("mode"), 99))):
        r = row["result"]
        expected = r.get("expected")
        mode = r.get("mode", "?")
        if mode == "auto" and r.get("attached_mode"):
            mode = f"auto → {r['attached_mode']}"
        verdict = row["verdict"]
        if verdict == "UNSUPPORTED":
            verdict = f"not supported: {row['reasons'][0]}" if row["reasons"] else "not supported"
        elif verdict == "FAIL":
            verdict = "**FAIL**: " + "; ".join(row["reasons"])
        yes_no = {True: "yes", False: "**no**", None: "–"}
        total = r.get("comm_total")
        out.append("| " + " | ".join([
            f"{row['kernel']}", row["arch"], mode, r.get("link_type") or "–",
            cell(r.get("dump"), expected), cell(r.get("metrics"), expected),
            cell(int(total) if isinstance(total, float) and total.is_integer() else total, expected),
            *(cell(r.get("outcomes", {}).get(outcome), want) if want is not None else "–"
              for outcome, want in ((o, (r.get("expected_outcomes") or {}).get(o)) for o in ("success", "refused"))),
            yes_no.get(r.get("pid_dropped_on_exit"), "–"), yes_no.get(r.get("unloaded"), "–"),
            verdict.replace("|", "\\|")]) + " |")
    out += ["", "## What the table says", ""] + summary(rows, kernels)
    out += ["", "## Guests", "",
            "| label | kernel | package | suite | guest | BTF | kprobe PMU | tcpmon (git, BPF object sha256) "
            "| seconds (boot to poweroff) |",
            "|---|---|---|---|---|---|---|---|---|"]
    for k in kernels:
        f = k["facts"]
        out.append(f"| {k['label']} | {k['kernel']} | {k['packages']} | {k['suite']} | "
                   f"{k['machine']}, {f.get('cpus', '?')} CPUs, Python {f.get('python', '?')} | "
                   f"{'yes' if f.get('btf') else 'no'} | {'yes' if f.get('kprobe_pmu') else 'no'} | "
                   f"{k['git']}, {(f.get('object_sha256') or '?')[:12]} | {k['seconds']} |")
    qemus = sorted({k["qemu"] for k in kernels})
    out += ["", f"Host: {platform.system()} {platform.release()} {platform.machine()}; "
            f"{'; '.join(qemus)}.", ""]
    if failures:
        out += ["## Failures", ""] + [f"- {line.splitlines()[0]}" for line in failures] + [""]
    return "\n".join(out)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True)
    parser.add_argument("rundirs", nargs="+")
    args = parser.parse_args()
    rows, failures, kernels = evaluate(args.rundirs)
    text = markdown(rows, kernels, failures)
    with open(args.output + ".new", "w") as f:
        f.write(text)
    os.replace(args.output + ".new", args.output)
    table = [line for line in text.splitlines() if line.startswith("|")]
    print("\n".join(table))
    print(f"\nrun-matrix: wrote {args.output}")
    for failure in failures:
        print(f"run-matrix: FAIL {failure}", file=sys.stderr)
    passed = sum(row["verdict"] == "PASS" for row in rows)
    print(f"run-matrix: {passed} passed, {len(failures)} failed, "
          f"{sum(row['verdict'] == 'UNSUPPORTED' for row in rows)} not supported")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
