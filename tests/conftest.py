"""Shared fixtures: a probe loaded on the real kernel under a private pin dir, an
exporter served by gunicorn, and test processes in their own network namespaces."""
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tcpmon import loader

ROOT = Path(__file__).resolve().parent.parent
CONNECTOR = Path(__file__).resolve().parent / "tools" / "connector.py"
TCPMON = [sys.executable, "-m", "tcpmon"]


def pytest_configure(config):
    if os.geteuid() != 0:
        pytest.exit("tcpmon's tests load BPF programs into the real kernel: run them as root (make test)", 2)


def private_pin_dir(tag):
    return f"/sys/fs/bpf/tcpmon-test-{os.getpid()}-{tag}"


@pytest.fixture(scope="session")
def pin_dir():
    """The probe loaded once for the session (auto attach) under a private pin dir."""
    path = private_pin_dir("session")
    loader.load(path)
    yield path
    loader.unload(path)


@pytest.fixture
def fresh_pin_dir():
    """A private pin dir for one test; whatever the test pinned there is unloaded afterwards."""
    path = private_pin_dir(secrets.token_hex(3))
    yield path
    loader.unload(path)
    if os.path.isdir(path):
        shutil.rmtree(path)


@pytest.fixture
def loaded_pin_dir(fresh_pin_dir):
    """A probe of its own for one test (auto attach, default sizes)."""
    loader.load(fresh_pin_dir)
    return fresh_pin_dir


def process_tree(pid):
    """`pid` and every process below it (the exporter's master and its workers)."""
    found = [pid]
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                kids = [int(child) for child in f.read().split()]
        except FileNotFoundError:
            continue
        for kid in kids:
            found.extend(process_tree(kid))
    return found


def open_fds(pids):
    """{"all": fds, "bpf": fds of BPF objects} summed over `pids`."""
    total = bpf = 0
    for pid in pids:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except FileNotFoundError:
                continue
            total += 1
            bpf += target.startswith("anon_inode:bpf")
    return {"all": total, "bpf": bpf}


def unique_comm(prefix="tcpmt"):
    return f"{prefix}{secrets.token_hex(4)}"


class Connector:
    """A process in its own netns that made known connect attempts and stays alive until closed."""

    def __init__(self, comm, opened=0, refused=0, threads=1):
        self.proc = subprocess.Popen(
            ["unshare", "-n", sys.executable, str(CONNECTOR), "--comm", comm, "--open", str(opened),
             "--closed", str(refused), "--threads", str(threads)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"connector failed: {self.proc.stderr.read()}")
        report = json.loads(line)
        self.pid = report["pid"]
        self.comm = bytes.fromhex(report["comm_hex"])
        self.active_opens = report["active_opens"]

    def close(self):
        if self.proc.poll() is None:
            self.proc.stdin.write("\n")
            self.proc.stdin.flush()
        self.proc.wait(timeout=10)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url, headers=None, timeout=10):
    """(status, headers, body) without raising on 4xx/5xx."""
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


class Exporter:
    """`tcpmon serve` under gunicorn on free loopback ports."""

    def __init__(self, pin_dir, *extra, env=None, prefix=()):
        self.metrics_port, self.health_port = free_port(), free_port()
        self.metrics = f"http://127.0.0.1:{self.metrics_port}"
        self.health = f"http://127.0.0.1:{self.health_port}"
        self.proc = subprocess.Popen(
            [*prefix, *TCPMON, "serve", "--pin-dir", pin_dir,
             "--metrics-addr", f"127.0.0.1:{self.metrics_port}",
             "--health-addr", f"127.0.0.1:{self.health_port}", *extra],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, **(env or {})}, cwd=ROOT)
        # with the health port on TLS, a worker that is up answers plain HTTP there with a 400
        self._alive = (200, 400) if "--health-tls" in extra or (env or {}).get("TCPMON_HEALTH_TLS") == "1" else (200,)
        self._wait_alive()

    def worker_pids(self):
        with open(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children") as f:
            return [int(pid) for pid in f.read().split()]

    def _wait_alive(self, timeout=20):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"exporter exited: {self.proc.stdout.read()}")
            try:
                if http_get(self.health + "/liveness", timeout=1)[0] in self._alive:
                    return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("exporter did not answer /liveness in time")

    def scrape(self, headers=None):
        status, _, body = http_get(self.metrics + "/metrics", headers)
        assert status == 200, body
        return body.decode()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture(scope="session")
def exporter(pin_dir):
    server = Exporter(pin_dir)
    yield server
    server.stop()
