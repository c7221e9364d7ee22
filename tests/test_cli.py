"""The tcpmon command line: env twins, one-line errors, exit codes, and dump against live processes."""
import json
import os
import re
import signal
import subprocess
import time

import pytest

from conftest import ROOT, TCPMON, Connector, free_port, http_get, unique_comm
from metrics import pid_value
from tcpmon._render import comm_label

SUBCOMMANDS = ("load", "unload", "status", "dump", "serve", "run")


def env_without_twins(**extra):
    """The environment minus any TCPMON_* the caller's shell may have set."""
    return {key: value for key, value in os.environ.items() if not key.startswith("TCPMON_")} | extra


def run_clean(*args, timeout=60, **env):
    return subprocess.run([*TCPMON, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env=env_without_twins(**env))


def assert_one_line_error(result, *words):
    """Non-zero exit, nothing on stdout, one line on stderr naming `words`, no traceback."""
    assert result.returncode != 0, result
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stdout == "", result.stdout
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("tcpmon: "), result.stderr
    for word in words:
        assert word in result.stderr, (word, result.stderr)


def assert_usage_error(result, command, *words):
    """argparse's exit 2: its usage, then exactly one error line naming `words`; no traceback."""
    assert result.returncode == 2, result
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.rstrip("\n").split("\n")
    errors = [line for line in lines if "error:" in line]
    assert errors == [lines[-1]] and lines[-1].startswith(f"tcpmon {command}: error: "), result.stderr
    for word in words:
        assert word in lines[-1], (word, result.stderr)


def dump(pin_dir, *args, **env):
    result = run_clean("dump", "--json", "--pin-dir", pin_dir, *args, **env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def entry_of(entries, pid):
    found = [entry for entry in entries if entry["pid"] == pid]
    assert len(found) <= 1, found
    return found[0] if found else None


# --- help and env twins ------------------------------------------------------------------

def help_options(command):
    """{flag: its help text, wrapped lines joined} from `tcpmon COMMAND --help`."""
    result = run_clean(command, "--help", COLUMNS="1000")
    assert result.returncode == 0, result.stderr
    options, flag = {}, None
    for line in result.stdout.splitlines():
        found = re.match(r"  (-[a-zA-Z], )?(--[a-z][a-z.-]*)", line)
        if found:
            flag = found.group(2)
            options[flag] = line.strip()
        elif flag and line.startswith("    "):
            options[flag] += " " + line.strip()
        else:
            flag = None
    options.pop("--help", None)
    return options


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_help_names_the_env_twin_of_every_flag(command):
    """README and cli.py: every flag has an environment twin, and --help lists them."""
    options = help_options(command)
    assert "--pin-dir" in options and "--log-level" in options
    missing = {flag: line.strip() for flag, line in options.items()
               if f"(env TCPMON_{flag[2:].upper().replace('-', '_').replace('.', '_')};" not in line}
    assert not missing, f"tcpmon {command} --help names no env twin for: {missing}"


def test_pin_dir_twin_for_status_and_dump(pin_dir):
    status = run_clean("status", "--json", TCPMON_PIN_DIR=pin_dir)
    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout)
    assert report["pin_dir"] == pin_dir and report["attached"] is True
    with Connector(unique_comm(), opened=3, refused=2) as proc:
        result = run_clean("dump", "--json", TCPMON_PIN_DIR=pin_dir)
    assert result.returncode == 0, result.stderr
    assert entry_of(json.loads(result.stdout), proc.pid) == \
        {"pid": proc.pid, "comm": comm_label(proc.comm), "connects": 5}


def test_a_flag_wins_over_its_env_twin(pin_dir, fresh_pin_dir):
    result = run_clean("status", "--json", "--pin-dir", pin_dir, TCPMON_PIN_DIR=fresh_pin_dir)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["pin_dir"] == pin_dir
    assert not os.path.exists(fresh_pin_dir)


def test_a_flag_wins_over_a_bad_env_twin(pin_dir):
    """'a flag given on the command line wins': an invalid twin it overrides must not matter."""
    result = run_clean("dump", "--json", "--read-mode", "batch", "--pin-dir", pin_dir,
                       TCPMON_READ_MODE="bogus")
    assert result.returncode == 0, result.stderr
    assert isinstance(json.loads(result.stdout), list)


def test_a_bad_env_twin_of_another_commands_flag_does_not_break_status(pin_dir):
    """TCPMON_MAX_PIDS is load's; status has no --max-pids and must not fail on it."""
    result = run_clean("status", "--pin-dir", pin_dir, TCPMON_MAX_PIDS="-3")
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("command", ["status", "dump", "unload"])
def test_a_bad_env_twin_is_reported_against_the_command_that_ran(command, fresh_pin_dir):
    result = run_clean(command, "--pin-dir", fresh_pin_dir, TCPMON_LOG_LEVEL="bogus")
    assert_usage_error(result, command, "TCPMON_LOG_LEVEL", "bogus")


@pytest.mark.parametrize("env, words", [
    ({"TCPMON_MAX_PIDS": "-3"}, ["TCPMON_MAX_PIDS", "-3"]),
    ({"TCPMON_ATTACH": "bogus"}, ["TCPMON_ATTACH", "bogus"]),
    ({"TCPMON_LOG_LEVEL": "loud"}, ["TCPMON_LOG_LEVEL", "loud"])])
def test_a_bad_env_twin_is_a_one_line_usage_error(env, words, fresh_pin_dir):
    result = run_clean("load", "--pin-dir", fresh_pin_dir, **env)
    assert_usage_error(result, "load", *words)
    assert not os.path.exists(fresh_pin_dir)


def test_serve_takes_its_addresses_and_workers_from_env_twins(pin_dir):
    metrics_port, health_port = free_port(), free_port()
    proc = subprocess.Popen(
        [*TCPMON, "serve"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
        env=env_without_twins(TCPMON_PIN_DIR=pin_dir, TCPMON_METRICS_ADDR=f"127.0.0.1:{metrics_port}",
                              TCPMON_HEALTH_ADDR=f"127.0.0.1:{health_port}", TCPMON_WORKERS="2",
                              TCPMON_THREADS="3"))
    try:
        deadline = time.monotonic() + 20
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if http_get(f"http://127.0.0.1:{health_port}/readiness", timeout=1)[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "serve never became ready on TCPMON_HEALTH_ADDR"
            time.sleep(0.1)
        with Connector(unique_comm(), opened=2, refused=1) as conn:
            status, _, body = http_get(f"http://127.0.0.1:{metrics_port}/metrics")
            assert status == 200 and pid_value(body.decode(), conn.pid, conn.comm) == 3
        assert http_get(f"http://127.0.0.1:{metrics_port}/readiness")[0] == 404  # ports are not swapped
        deadline = time.monotonic() + 10
        while len(children(proc.pid)) != 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(children(proc.pid)) == 2
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0


def children(pid):
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return f.read().split()


# --- bad input ---------------------------------------------------------------------------

@pytest.mark.parametrize("flag", ["--metrics-addr", "--health-addr"])
@pytest.mark.parametrize("value", ["nonsense", "127.0.0.1:99999", "127.0.0.1:", ":http", "127.0.0.1:0",
                                   "127.0.0.1:65536", "127.0.0.1:９０９０", "127.0.0.1:²"])
def test_serve_rejects_a_bad_address_in_one_line(flag, value, fresh_pin_dir):
    started = time.monotonic()
    result = run_clean("serve", "--pin-dir", fresh_pin_dir, flag, value, timeout=30)
    assert_usage_error(result, "serve", flag, f"'{value}'")
    assert result.stderr.count("\n") == 1
    assert time.monotonic() - started < 10


def test_serve_rejects_a_bad_address_from_its_env_twin(fresh_pin_dir):
    result = run_clean("serve", "--pin-dir", fresh_pin_dir, TCPMON_METRICS_ADDR="nonsense", timeout=30)
    assert_usage_error(result, "serve", "TCPMON_METRICS_ADDR", "'nonsense'")


def test_load_rejects_an_unknown_attach_mode(fresh_pin_dir):
    result = run_clean("load", "--pin-dir", fresh_pin_dir, "--attach", "bogus")
    assert_usage_error(result, "load", "--attach", "'bogus'")
    assert not os.path.exists(fresh_pin_dir)


@pytest.mark.parametrize("value", ["-3", "0", "abc", "1.5"])
def test_load_rejects_a_bad_map_size(value, fresh_pin_dir):
    result = run_clean("load", "--pin-dir", fresh_pin_dir, f"--max-pids={value}")
    assert_usage_error(result, "load", "--max-pids", f"'{value}'")
    assert not os.path.exists(fresh_pin_dir)


def test_load_max_pids_minus_3_as_separate_argument(fresh_pin_dir):
    result = run_clean("load", "--pin-dir", fresh_pin_dir, "--max-pids", "-3")
    assert_usage_error(result, "load", "--max-pids", "'-3'")


def test_load_with_a_missing_bpf_object_names_the_object_and_the_flag(fresh_pin_dir):
    result = run_clean("load", "--pin-dir", fresh_pin_dir, "--bpf-object", "/nonexistent")
    assert_one_line_error(result, "/nonexistent")
    assert not os.path.exists(fresh_pin_dir)
    # the hint must name a flag that exists
    hinted = set(re.findall(r"--[a-z][a-z-]*", result.stderr))
    assert hinted <= set(help_options("load")), result.stderr


def test_dump_on_a_missing_pin_dir_says_to_load(fresh_pin_dir):
    result = run_clean("dump", "--pin-dir", fresh_pin_dir)
    assert_one_line_error(result, "run 'tcpmon load'", fresh_pin_dir)
    assert result.returncode == 1


def test_dump_on_an_empty_pin_dir_says_to_load(fresh_pin_dir):
    os.mkdir(fresh_pin_dir)
    for args in ([], ["--json"]):
        result = run_clean("dump", "--pin-dir", fresh_pin_dir, *args)
        assert_one_line_error(result, "run 'tcpmon load'", fresh_pin_dir)


# --- status and dump ---------------------------------------------------------------------

def test_status_exit_code_follows_what_is_loaded(pin_dir, fresh_pin_dir):
    missing = run_clean("status", "--pin-dir", fresh_pin_dir)
    assert missing.returncode != 0 and "Traceback" not in missing.stderr
    assert re.search(r"(?m)^attached:\s+no$", missing.stdout), missing.stdout
    as_json = run_clean("status", "--json", "--pin-dir", fresh_pin_dir)
    assert as_json.returncode == missing.returncode
    report = json.loads(as_json.stdout)
    assert report["attached"] is False and "tcpmon load" in report["problem"]
    loaded = run_clean("status", "--pin-dir", pin_dir)
    assert loaded.returncode == 0, loaded.stderr
    assert re.search(r"(?m)^attached:\s+yes, mode ", loaded.stdout), loaded.stdout
    report = json.loads(run_clean("status", "--json", "--pin-dir", pin_dir).stdout)
    assert report["attached"] is True and report["problem"] is None


def test_dump_lists_live_processes_with_exact_counts(pin_dir):
    with Connector(unique_comm(), opened=4, refused=3) as one, \
            Connector(unique_comm(), opened=1, threads=3) as other:
        entries = dump(pin_dir)
        text = run_clean("dump", "--pin-dir", pin_dir)
    assert entries == sorted(entries, key=lambda entry: entry["pid"])
    assert entry_of(entries, one.pid) == {"pid": one.pid, "comm": comm_label(one.comm), "connects": 7}
    assert entry_of(entries, other.pid) == {"pid": other.pid, "comm": comm_label(other.comm), "connects": 3}
    assert one.active_opens == 7 and other.active_opens == 3
    assert re.search(rf"(?m)^\s*{one.pid}\s+{re.escape(comm_label(one.comm))}\s+7$", text.stdout), text.stdout
    assert entry_of(dump(pin_dir), one.pid) is None  # gone with its process


def test_iterate_and_batch_read_the_same_entries(pin_dir):
    with Connector(unique_comm(), opened=2, refused=2) as one, Connector(unique_comm(), refused=5) as other:
        for _ in range(5):
            before = dump(pin_dir, "--read-mode", "batch")
            iterated = dump(pin_dir, "--read-mode", "iterate")
            after = dump(pin_dir, "--read-mode", "batch")
            if before == after:
                break
        for proc, count in ((one, 4), (other, 5)):
            expected = {"pid": proc.pid, "comm": comm_label(proc.comm), "connects": count}
            assert entry_of(before, proc.pid) == entry_of(iterated, proc.pid) == expected
    if before == after:
        assert iterated == before
    else:  # other processes on this host connect meanwhile: counts only grow between the reads
        old, new = ({e["pid"]: e for e in read} for read in (before, after))
        it = {e["pid"]: e for e in iterated}
        for pid in old.keys() & new.keys():
            if old[pid]["comm"] == new[pid]["comm"]:
                assert pid in it and old[pid]["connects"] <= it[pid]["connects"] <= new[pid]["connects"]
