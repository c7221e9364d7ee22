"""`tcpmon top` on the real kernel: the screen driven in tmux (send-keys, capture-pane) at
80x24, `--once` and `--json` without a terminal, and the rate model on real reads of
processes that connect in network namespaces of their own, including a reused PID and an exec."""
import json
import os
import pty
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import ROOT, TCPMON, Connector, unique_comm
from test_cli import help_options
from tcpmon import top, top_text
from tcpmon._render import comm_label

PUPPET = Path(__file__).resolve().parent / "tools" / "puppet.py"
C1_CONTROL = re.compile("[\x80-\x9f]")


def env_without_twins(**extra):
    return {key: value for key, value in os.environ.items()
            if not key.startswith("TCPMON_") and key not in ("TMUX", "COLUMNS", "LINES")} | extra


def run_top(pin_dir, *args, timeout=60, **env):
    return subprocess.run([*TCPMON, "top", "--pin-dir", pin_dir, *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, stdin=subprocess.DEVNULL, env=env_without_twins(**env))


class Puppet:
    """A process in its own netns that connects when told (tests/tools/puppet.py)."""

    def __init__(self, comm):
        self.proc = subprocess.Popen(["unshare", "-n", sys.executable, str(PUPPET), "--comm", comm],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
        self._hello()

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
    assert before.tables["processes"][(gone.pid, name)] == {"connects": 5}
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


# --- --once and --json, no terminal --------------------------------------------------------

def test_once_prints_one_frame_of_80_columns(pin_dir):
    with Connector(unique_comm(), opened=4, refused=2) as proc:
        result = run_top(pin_dir, "--once", "--interval", "0.5", "--filter", proc.comm.decode())
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"tcpmon top  sort: rate  filter: {proc.comm.decode()}  /sys/fs/bpf/"), lines
    assert lines[1].startswith("host ") and " conn/s over 0.5" in lines[1], lines
    assert all(len(line) <= 80 for line in lines), lines
    rows = [line.split() for line in lines if line.split()[-1:] == [proc.comm.decode()]]
    # an idle process: its 6 connects were made before the first read, so exactly 0 per second
    assert rows == [[str(proc.pid), "0.0", "6", proc.comm.decode()], ["0.0", "6", proc.comm.decode()]], lines


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
    (name,) = document["names"]
    assert name["comm"] == proc.label and name["connects_rate"] == pytest.approx(row["connects_rate"])
    assert set(document["maps"]) == {"connects", "comm_totals"}
    assert document["rows_before_filter"]["processes"] >= 1


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
    assert {"--pin-dir", "--log-level", "--interval", "--sort", "--filter", "--once", "--json"} == set(options)
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


def process_rows(lines):
    """[[pid, rate, total, comm]] of the processes table on the screen."""
    start = next(i for i, line in enumerate(lines) if "COMM (processes:" in line)
    end = next(i for i, line in enumerate(lines) if "COMM (names" in line)
    return [line.split(None, 3) for line in lines[start + 1:end]]


def name_rows(lines):
    start = next(i for i, line in enumerate(lines) if "COMM (names" in line)
    return [line.split(None, 2) for line in lines[start + 1:-1] if line.strip()]


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
            lines = screen.wait_for(order("total", [idle.pid, busy.pid]), "the idle process first (sort: total)")
            assert [row[2] for row in name_rows(lines)] == [prefix + "b", prefix + "a"]
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
            lines = screen.wait_for(lambda lines: pids_shown(lines) == [kept.pid] and lines, "only the kept one")
            assert [row[2] for row in name_rows(lines)] == [prefix + "a"]
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
        lines = screen.wait_for(lambda lines: lines[2].startswith("read failed") and lines, "the read error")
        assert "no map pinned at" in lines[2] and "run 'tcpmon load'" in lines[3], lines
        loader.load(fresh_pin_dir)
        screen.wait_for(lambda lines: not any("read failed" in line for line in lines), "the error gone after a load")
        screen.keys("q")
        screen.wait_for(lambda lines: "top-exited-0" in lines, "top exiting with status 0")
