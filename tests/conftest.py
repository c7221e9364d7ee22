"""Shared fixtures: a probe loaded on the real kernel under a private pin dir, an
exporter served by gunicorn, and test processes in their own network namespaces."""
import hashlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import pkgutil
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

import tcpmon
from tcpmon import _abi, loader

ROOT = Path(__file__).resolve().parent.parent
# What tests that drop privileges run besides tcpmon: staged with it (staged_install).
STAGED_HELPERS = (Path(__file__).resolve().parent / "deploy" / "unit_sandbox.py",)
CONNECTOR = Path(__file__).resolve().parent / "tools" / "connector.py"
TCPMON = [sys.executable, "-m", "tcpmon"]
# Run by the staged install's interpreter: what its extension modules were built from.
ABI_REPORT = ("import json, tcpmon._abi as a; "
              "print(json.dumps([a.ABI_VERSION, a.STRUCTS, a.MAPS, a.PINS], sort_keys=True, default=list))")


def pytest_configure(config):
    if os.geteuid() != 0:
        pytest.exit("tcpmon's tests load BPF programs into the real kernel: run them as root (make test)", 2)


NODE_MOUNTS = (("bpf", "/sys/fs/bpf"), ("tracefs", "/sys/kernel/tracing"))


def mounted(path, fstype):
    """Whether `fstype` is mounted at `path` in this mount namespace (/proc/self/mounts)."""
    with open("/proc/self/mounts") as f:
        return any(fields[1] == path and fields[2] == fstype for fields in (line.split() for line in f))


@pytest.fixture(scope="session")
def node_mounts():
    """This host set up as a node is: bpffs at /sys/fs/bpf and tracefs at /sys/kernel/tracing
    (systemd mounts both at boot). A fresh host has neither until something mounts them, and
    tests that run tcpmon without CAP_SYS_ADMIN (as the chart and the units do) must not rely
    on an earlier test's `tcpmon load` as root having done it. Left mounted, as on a node:
    other tests' pins may live there."""
    for fstype, path in NODE_MOUNTS:
        if not mounted(path, fstype):
            subprocess.run(["mount", "-t", fstype, fstype, path], check=True, capture_output=True, text=True)
    return dict((path, fstype) for fstype, path in NODE_MOUNTS)


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


class StagedInstall:
    """tcpmon installed by scripts/install.sh with DESTDIR under a world-readable temporary
    directory, for tests that drop privileges: the checkout may lie below a directory other
    users cannot enter (/root is 0700), and so may the test venv's interpreter."""
    UNIT_DIR = "usr/local/lib/systemd/system"
    HOME = "opt/tcpmon"

    def __init__(self, top):
        self.top = top
        self.root = top / "root"                  # DESTDIR
        self.helpers = top / "helpers"            # test helpers the unprivileged side runs
        self.python = self.root / self.HOME / "bin/python"
        self.tcpmon = self.root / self.HOME / "bin/tcpmon"

    def helper(self, name):
        return self.helpers / name

    def data_file(self, name):
        run = subprocess.run([str(self.python), "-c", "import tcpmon, os; print(os.path.dirname(tcpmon.__file__))"],
                             capture_output=True, text=True, check=True, cwd="/")
        return Path(run.stdout.strip()) / "data" / name


def _sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="session")
def staged_install():
    """scripts/install.sh with DESTDIR (Debian's /usr/bin/python3, as on a host), every part
    readable by any user, the helpers in STAGED_HELPERS copied beside it. The staged package
    carries the checkout's BPF object byte for byte, and its extension modules are built from the
    checkout's sources: the same modules, reporting the same ABI (tcpmon/_abi) as the checkout's."""
    top = Path(tempfile.mkdtemp(prefix="tcpmon-staged-"))
    try:
        top.chmod(0o755)
        staged = StagedInstall(top)
        staged.helpers.mkdir(mode=0o755)
        for helper in STAGED_HELPERS:
            shutil.copy(helper, staged.helpers / helper.name)
            (staged.helpers / helper.name).chmod(0o644)
        result = subprocess.run([str(ROOT / "scripts/install.sh")], capture_output=True, text=True, timeout=900,
                                env=dict(os.environ, DESTDIR=str(staged.root), PYTHON="/usr/bin/python3"))
        assert result.returncode == 0, f"DESTDIR install failed: {result.stderr}"
        subprocess.run(["chmod", "-R", "a+rX", str(top)], check=True)
        assert _sha256(staged.data_file("tcpconnect.bpf.o")) == _sha256(ROOT / "tcpmon/data/tcpconnect.bpf.o"), \
            "the staged install carries another BPF object than the checkout"
        abi = subprocess.run([str(staged.python), "-c", ABI_REPORT], capture_output=True, text=True, cwd="/")
        ours = json.dumps([_abi.ABI_VERSION, _abi.STRUCTS, _abi.MAPS, _abi.PINS], sort_keys=True, default=list)
        assert abi.returncode == 0 and json.loads(abi.stdout) == json.loads(ours), \
            f"the staged extension modules differ from the checkout's: {abi.stderr}"
        staged_modules = subprocess.run([str(staged.python), "-c", "import tcpmon, pkgutil; print(sorted(m.name "
                                         "for m in pkgutil.iter_modules(tcpmon.__path__) if m.name.startswith('_')))"],
                                        capture_output=True, text=True, check=True, cwd="/").stdout.strip()
        assert staged_modules == str(sorted(m.name for m in pkgutil.iter_modules(tcpmon.__path__)
                                            if m.name.startswith("_"))), staged_modules
        yield staged
    finally:
        shutil.rmtree(top)
