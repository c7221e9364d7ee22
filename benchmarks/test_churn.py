"""PID churn: many short-lived processes with one connect each, PIDs wrapping at pid_max.

Afterwards the per-PID map holds only live processes, no dead PID is exported, a process that
gets a dead one's PID starts at 1, and the comm total grew by exactly the number of processes
with zero map-update failures.  Checked through the real exporter's /metrics.
"""
import re
import secrets

import benchlib
from benchlib import Churn, Scraper, timed
from tcpmon import loader

BATCH = 500
REUSE = (5, 50)   # dead PIDs handed to new processes: (quick, full)

PID_SERIES = re.compile(r'^tcp_connects_by_pid\{comm="([^"]*)",pid="(\d+)"\} (\d+)$', re.M)
FAILURES = re.compile(r'^tcpmon_map_update_failures_total\{map="(\w+)"\} ([0-9.e+]+)$', re.M)
ENTRIES = re.compile(r'^tcpmon_map_entries\{map="connects"\} ([0-9.e+]+)$', re.M)


def comm_total(text, comm):
    match = re.search(rf'^tcpmon_connect_attempts_total\{{comm="{re.escape(comm)}"\}} (\d+)$', text, re.M)
    return int(match.group(1)) if match else 0


def exported(text):
    """{pid: (comm, connects)}"""
    return {int(pid): (comm, int(value)) for comm, pid, value in PID_SERIES.findall(text)}


def test_pid_churn(helpers, benchmark, results, full):
    total = benchlib.SIZES["churn"][full]
    pin_dir = f"{benchlib.PIN_PREFIX}churn"
    benchlib.remove_pin_dir(pin_dir)
    comm, reuse_comm = f"ch{secrets.token_hex(3)}", f"ru{secrets.token_hex(3)}"
    exporter = scrape = churn = None
    try:
        loader.load(pin_dir)
        exporter = benchlib.tests_helpers().Exporter(pin_dir)
        scrape = Scraper(exporter.metrics_port)
        before = comm_total(scrape().decode(), comm)

        churn = timed(benchmark, lambda: Churn(helpers["procfarm"], total, BATCH, comm, REUSE[full], reuse_comm),
                      rounds=1, warmup=0)[0]
        report = churn.report
        assert report["forked"] == total and report["errors"] == 0, report
        reused = report["reused"]

        text = scrape().decode()
        growth = comm_total(text, comm) - before
        failures = {name: float(value) for name, value in FAILURES.findall(text)}
        entries = float(ENTRIES.search(text).group(1))
        series = exported(text)
        churned = {pid for pid, (c, _) in series.items() if c == comm}
        # Dead but exported: not alive now, and still exported by a second scrape (a process that
        # merely exited between the first scrape and the check is gone from the second one).
        dead = {pid for pid in series if not benchlib.alive(pid)}
        again = exported(scrape().decode())
        dead_exported = {pid for pid in dead if pid in again and not benchlib.alive(pid)} | churned
        inherited = {pid: series.get(pid) for pid in reused if series.get(pid) != (reuse_comm, 1)}

        assert growth == total, f"comm total grew by {growth}, not {total}"
        assert failures and all(value == 0 for value in failures.values()), failures
        assert entries < 500, f"{entries} per-PID entries after the churn"
        assert not dead_exported, f"dead PIDs exported: {sorted(dead_exported)[:10]}"
        assert reused, "no dead PID could be handed to a new process"
        assert not inherited, f"reused PIDs not at exactly 1: {inherited}"
        if full:
            results.put(("churn",), {"processes": total, "growth": growth,
                                      "failures": int(sum(failures.values())), "entries": int(entries),
                                      "dead_exported": len(dead_exported), "reused": len(reused),
                                      "inherited": len(inherited), "distinct_pids": report["distinct_pids"],
                                      "seconds": churn.seconds})
    finally:
        for close in (churn and churn.close, scrape and scrape.close, exporter and exporter.stop):
            if close:
                close()
        benchlib.remove_pin_dir(pin_dir)
