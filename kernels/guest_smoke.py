"""The smoke the kernel matrix runs inside each qemu guest (as PID 1's child, as root).

For every attach mode asked for, through tcpmon's own command line only:
  1. `tcpmon load --attach MODE` in a process that exits before anything connects,
  2. a child renamed to a known comm makes N TCP connects to a loopback listener
     (N is random per mode, so no constant can pass),
  3. `tcpmon dump --json` must show exactly N for the child's PID and comm,
  4. `tcpmon serve`'s /metrics must show tcp_connects_by_pid{comm,pid} N,
  5. the child exits: its PID must leave the map (the exit hook),
  6. `tcpmon unload` must remove the pins and free the programs.
One JSON object per mode goes to RESULTS/results.jsonl (and a summary line to
the console); the host (kernels/run-matrix.sh) decides pass or fail.

Also the connector: `guest_smoke.py --connector PORT N` renames itself and connects.
"""
import argparse
import ctypes
import errno
import hashlib
import json
import os
import platform
import random
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request

COMM = "tcpmon-smoke"        # < 16 bytes: the kernel keeps it whole
PR_SET_NAME = 15
# bpf_link_type in include/uapi/linux/bpf.h
LINK_TYPES = {1: "raw_tracepoint", 2: "tracing", 3: "cgroup", 4: "iter", 5: "netns", 6: "xdp",
              7: "perf_event", 8: "kprobe_multi", 9: "struct_ops", 10: "netfilter", 11: "tcx",
              12: "uprobe_multi", 13: "netkit"}
SAMPLE = re.compile(r'^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)\{(?P<labels>[^}]*)\}\s+(?P<value>\S+)')
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def refused_share(count):
    """How many of a mode's `count` connects go to a closed port (the rest succeed)."""
    return count // 3


def connector(port, count):
    """Runs in the child: take the known comm, connect `count` times (refused_share(count) of
    them to a port that does not listen), wait for stdin to close."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_NAME, COMM.encode(), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NAME)")
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))  # bound, never listening: connects get RST
    refused = refused_share(count)
    for _ in range(count - refused):
        with socket.create_connection(("127.0.0.1", port), timeout=30):
            pass
    for _ in range(refused):
        with socket.socket() as sock:
            if sock.connect_ex(closed.getsockname()) != errno.ECONNREFUSED:
                raise SystemExit("a connect to the closed port was not refused")
    print("connected", flush=True)
    sys.stdin.read()


class Listener:
    """A loopback TCP listener that accepts and closes, so connects never queue."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            conn.close()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Guest:
    def __init__(self, args):
        self.args = args
        self.tcpmon = [sys.executable, "-m", "tcpmon"]
        self.bpftool = shutil.which("bpftool")

    def run(self, *argv, timeout=300):
        started = time.monotonic()
        proc = subprocess.run(self.tcpmon + list(argv), capture_output=True, text=True, timeout=timeout)
        return proc, time.monotonic() - started

    def facts(self):
        return {"release": platform.release(), "machine": platform.machine(),
                "object_sha256": self.object_sha256(),
                "btf": os.path.exists("/sys/kernel/btf/vmlinux"),
                "kprobe_pmu": os.path.exists("/sys/bus/event_source/devices/kprobe"),
                "tracepoint": os.path.isdir("/sys/kernel/tracing/events/sock/inet_sock_set_state"),
                "cpus": os.cpu_count(), "python": platform.python_version()}

    def object_sha256(self):
        """Which BPF object the guest loads: --bpf-object, or the one in the tcpmon package."""
        path = self.args.bpf_object
        if not path:
            try:
                import importlib.resources
                path = str(importlib.resources.files("tcpmon") / "data" / "tcpconnect.bpf.o")
            except ImportError:
                return None
        try:
            with open(path, "rb") as f:
                return hashlib.sha256(f.read()).hexdigest()
        except OSError:
            return None

    def smoke(self, mode, expected):
        pin_dir = f"/sys/fs/bpf/tcpmon-kern-{os.getpid()}-{mode}"
        refused = refused_share(expected)
        result = {"mode": mode, "expected": expected, "dump": None, "metrics": None,
                  "expected_outcomes": {"success": expected - refused, "refused": refused}, "outcomes": {},
                  "comm_ok": None, "attached_mode": None, "link_type": None, "loader_exited": None,
                  "pid_dropped_on_exit": None, "unloaded": None, "errors": [], "seconds": {}}
        started = time.monotonic()
        extra = ["--bpf-object", self.args.bpf_object] if self.args.bpf_object else []
        proc, result["seconds"]["load"] = self.run("load", "--pin-dir", pin_dir, "--attach", mode, *extra)
        result["load_output"] = (proc.stdout + proc.stderr).strip()[-2000:]
        if proc.returncode != 0:
            result["load_failed"] = True
            result["errors"].append(f"tcpmon load --attach {mode} exited {proc.returncode}")
            self.run("unload", "--pin-dir", pin_dir)  # a failed load may leave its pin dir
            if os.path.isdir(pin_dir) and not os.listdir(pin_dir):
                os.rmdir(pin_dir)
            return result
        result["load_failed"] = False
        result["loader_exited"] = True   # subprocess.run returned: every connect below is after it exited
        try:
            self._while_loaded(pin_dir, mode, expected, result)
        finally:
            proc, result["seconds"]["unload"] = self.run("unload", "--pin-dir", pin_dir)
            if proc.returncode != 0:
                result["errors"].append(f"tcpmon unload exited {proc.returncode}: {proc.stderr.strip()}")
            result["unloaded"] = self._gone(pin_dir, result)
            result["seconds"]["total"] = round(time.monotonic() - started, 1)
        return result

    def _while_loaded(self, pin_dir, mode, expected, result):
        proc, _ = self.run("status", "--pin-dir", pin_dir, "--json")
        try:
            status = json.loads(proc.stdout)
        except ValueError:
            result["errors"].append(f"tcpmon status --json exited {proc.returncode}: {proc.stderr.strip()}")
            status = {}
        result["attached_mode"] = status.get("attach_mode")
        result["prog_ids"] = [info.get("id") for info in status.get("programs", {}).values()]
        link = status.get("links", {}).get("link_connect")
        if link:
            result["link_type"] = LINK_TYPES.get(link.get("type"), f"type {link.get('type')}")
        if mode != "auto" and result["attached_mode"] != mode:
            result["errors"].append(f"status says mode {result['attached_mode']}, asked for {mode}")

        listener = Listener()
        child = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--connector",
                                  str(listener.port), str(expected)],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            if child.stdout.readline().strip() != "connected":
                result["errors"].append(f"connector failed (exit {child.wait()})")
                return
            with open(f"/proc/{child.pid}/comm") as f:
                actual_comm = f.read().strip()
            if actual_comm != COMM:
                result["errors"].append(f"connector comm is {actual_comm!r}, not {COMM!r}")
            result["dump"], result["comm_ok"] = self._dump_count(pin_dir, child.pid, result)
            t0 = time.monotonic()
            result["metrics"], result["metric_samples"] = self._metrics_count(pin_dir, child.pid, result)
            result["seconds"]["serve"] = round(time.monotonic() - t0, 1)
        finally:
            child.stdin.close()
            child.wait(timeout=60)
            listener.sock.close()
        result["pid_dropped_on_exit"] = self._pid_dropped(pin_dir, child.pid, result)

    def _dump(self, pin_dir, result):
        proc, _ = self.run("dump", "--pin-dir", pin_dir, "--json")
        if proc.returncode != 0:
            result["errors"].append(f"tcpmon dump exited {proc.returncode}: {proc.stderr.strip()}")
            return None
        return json.loads(proc.stdout)

    def _dump_count(self, pin_dir, pid, result):
        entries = self._dump(pin_dir, result)
        if entries is None:
            return None, None
        mine = [e for e in entries if e.get("pid") == pid]
        if not mine:
            result["errors"].append(f"dump has no entry for pid {pid}: {entries}")
            return 0, None
        return mine[0].get("connects"), mine[0].get("comm") == COMM

    def _pid_dropped(self, pin_dir, pid, result):
        # The exit hook runs as the child dies; give a slow (TCG) guest a moment.
        for _ in range(20):
            entries = self._dump(pin_dir, result)
            if entries is None:
                return None
            if all(e.get("pid") != pid for e in entries):
                return True
            time.sleep(0.5)
        result["errors"].append(f"pid {pid} still in the map after it exited")
        return False

    def _metrics_count(self, pin_dir, pid, result):
        metrics_port, health_port = free_port(), free_port()
        log_path = f"/tmp/serve-{os.path.basename(pin_dir)}.log"
        with open(log_path, "w") as log:
            server = subprocess.Popen(self.tcpmon + ["serve", "--pin-dir", pin_dir,
                                                     "--metrics-addr", f"127.0.0.1:{metrics_port}",
                                                     "--health-addr", f"127.0.0.1:{health_port}"],
                                      stdout=log, stderr=subprocess.STDOUT)
        try:
            body = self._scrape(metrics_port, server)
        finally:
            server.terminate()
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
        if body is None:
            with open(log_path) as f:
                tail = f.read()[-1500:]
            result["errors"].append(f"no /metrics from tcpmon serve: {tail}")
            return None, {}
        found, samples = None, {}
        for line in body.splitlines():
            match = SAMPLE.match(line)
            if not match:
                continue
            labels = dict(LABEL.findall(match["labels"]))
            if labels.get("comm") != COMM:
                continue
            key = match["name"] + ("{pid}" if "pid" in labels else "")
            samples[key] = float(match["value"])
            if match["name"] == "tcp_connects_by_pid" and labels.get("pid") == str(pid):
                found = float(match["value"])
            elif match["name"] == "tcpmon_connect_attempts_total":
                # the per-comm total: the maps are fresh for every mode, so it is N too
                result["comm_total"] = float(match["value"])
            elif match["name"] == "tcpmon_connects_total" and labels.get("result") in ("success", "refused"):
                value = float(match["value"])
                result["outcomes"][labels["result"]] = int(value) if value.is_integer() else value
        if found is None:
            result["errors"].append(f"/metrics has no tcp_connects_by_pid sample for pid {pid}")
            return 0, samples
        return int(found) if found.is_integer() else found, samples

    @staticmethod
    def _scrape(port, server, timeout=240):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if server.poll() is not None:
                return None
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as reply:
                    return reply.read().decode()
            except OSError:
                time.sleep(0.5)
        return None

    def _gone(self, pin_dir, result):
        if os.path.exists(pin_dir) and os.listdir(pin_dir):
            result["errors"].append(f"unload left {os.listdir(pin_dir)} in {pin_dir}")
            return False
        if not self.bpftool:
            return True
        # Programs are freed once the last link, pin and fd are gone (after an RCU grace period).
        for _ in range(40):
            alive = [pid for pid in result.get("prog_ids", []) if pid and subprocess.run(
                [self.bpftool, "prog", "show", "id", str(pid)], capture_output=True).returncode == 0]
            if not alive:
                return True
            time.sleep(0.25)
        result["errors"].append(f"programs {alive} still loaded after unload")
        return False


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connector", nargs=2, type=int, metavar=("PORT", "N"), help=argparse.SUPPRESS)
    parser.add_argument("--results", help="directory for results.jsonl")
    parser.add_argument("--modes", default="kprobe,fentry,tp_btf,tracepoint")
    parser.add_argument("--bpf-object", help="passed to tcpmon load (default: the package's object)")
    parser.add_argument("--connects", default="5-40",
                        help="N connects per mode, or LOW-HIGH for a random N per mode")
    args = parser.parse_args()
    if args.connector:
        return connector(*args.connector)

    low, _, high = args.connects.partition("-")
    rng = random.SystemRandom()
    guest = Guest(args)
    facts = guest.facts()
    out = open(os.path.join(args.results, "results.jsonl"), "a")
    out.write(json.dumps({"facts": facts}) + "\n")
    out.flush()
    print(f"TCPMON-FACTS {json.dumps(facts)}", flush=True)
    for mode in args.modes.split(","):
        expected = rng.randint(int(low), int(high or low))
        try:
            result = guest.smoke(mode, expected)
        except Exception as exc:  # one mode's crash must not hide the others
            result = {"mode": mode, "expected": expected, "errors": [f"smoke crashed: {exc!r}"]}
        out.write(json.dumps(result) + "\n")
        out.flush()
        os.fsync(out.fileno())
        print(f"TCPMON-RESULT mode={mode} expected={expected} dump={result.get('dump')} "
              f"metrics={result.get('metrics')} link={result.get('link_type')} "
              f"errors={len(result['errors'])}", flush=True)
        for error in result["errors"]:
            print(f"TCPMON-ERROR mode={mode} {error}", flush=True)
    out.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
