"""Real cgroups, processes in them and an independent oracle of cgroup ids, for test_attribution_*.

Every cgroup a test makes lives under one private directory, tcpmon-test-<pid>-<hex>, of the
cgroup2 mount that /proc/mounts shows; below it the names are the real ones
(kubepods.slice/..., system.slice/...). Cleanup stops the processes and removes the tree.
"""
import contextlib
import ctypes
import os
import re
import secrets
import shutil
import signal
import struct
import subprocess
import sys
import time

import pytest

from tcpmon import mounts
from tcpmon.attribution.mounts import find_cgroup2


# Waits for "go", sets its comm, makes N connects to a closed port in its own netns, says
# "done", and waits for a line before it exits.
_CONNECTER = r"""
import ctypes, socket, sys
sys.stdin.readline()
ctypes.CDLL(None).prctl(15, sys.argv[1].encode(), 0, 0, 0)
closed = socket.socket(); closed.bind(("127.0.0.1", 0))
for _ in range(int(sys.argv[2])):
    s = socket.socket(); s.connect_ex(closed.getsockname()); s.close()
print("done", flush=True)
sys.stdin.readline()
"""


def cgroup2_root():
    found = find_cgroup2()
    if found.path is None:
        pytest.skip(found.problem)
    return found.path


class _FileHandle(ctypes.Structure):
    _fields_ = [("handle_bytes", ctypes.c_uint), ("handle_type", ctypes.c_int), ("f_handle", ctypes.c_ubyte * 64)]


def handle_id(path):
    """The cgroup id as name_to_handle_at(2) encodes it: kernfs's 64-bit node id, by another
    route than the inode number the attribution code reads."""
    libc = ctypes.CDLL(None, use_errno=True)
    handle, mount_id = _FileHandle(handle_bytes=64), ctypes.c_int()
    if libc.name_to_handle_at(-100, os.fsencode(path), ctypes.byref(handle), ctypes.byref(mount_id), 0) != 0:
        raise OSError(ctypes.get_errno(), f"name_to_handle_at {path}")
    assert handle.handle_bytes == 8, handle.handle_bytes
    return struct.unpack("=Q", bytes(handle.f_handle[:8]))[0]


def start_connecter(comm, connects, cgroup_dir):
    """A process that is in `cgroup_dir` before it makes `connects` connects; returns it after."""
    proc = subprocess.Popen(
        ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$0" "$@"', sys.executable, "-c", _CONNECTER,
         comm, str(connects)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    with open(os.path.join(cgroup_dir, "cgroup.procs"), "w") as f:
        f.write(str(proc.pid))
    proc.stdin.write("go\n")
    proc.stdin.flush()
    assert proc.stdout.readline() == "done\n"
    return proc


def stop(proc):
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=10)


class TestCgroups:
    """cgroups under a private directory of the cgroup2 mount, removed with their processes."""

    __test__ = False

    def __init__(self, root=None):
        self.root = root or cgroup2_root()
        self.top = f"tcpmon-test-{os.getpid()}-{secrets.token_hex(3)}"
        os.mkdir(os.path.join(self.root, self.top))
        self.procs = []

    def make(self, path):
        """Creates top/path (and its parents); the path relative to the cgroup2 root."""
        rel = f"{self.top}/{path}"
        os.makedirs(os.path.join(self.root, rel))
        return rel

    def dir(self, rel):
        return os.path.join(self.root, rel)

    def run_in(self, rel, comm, connects):
        proc = start_connecter(comm, connects, self.dir(rel))
        self.procs.append(proc)
        return proc

    def remove(self, rel):
        """Stops the processes in rel, then removes it and what is below it."""
        inside = set(_pids_below(self.dir(rel)))
        for proc in self.procs:
            if proc.pid in inside:
                stop(proc)
        _rmtree_cgroups(self.dir(rel))

    def close(self):
        for proc in self.procs:
            stop(proc)
        _rmtree_cgroups(os.path.join(self.root, self.top))


def _pids_below(path):
    pids = []
    for dirpath, _, _ in os.walk(path):
        with contextlib.suppress(OSError), open(os.path.join(dirpath, "cgroup.procs")) as f:
            pids += [int(line) for line in f]
    return pids


def _rmtree_cgroups(path, timeout=10):
    """rmdir bottom-up (cgroupfs holds no files of its own to delete), waiting for killed
    processes to leave."""
    deadline = time.monotonic() + timeout
    for dirpath, _, _ in sorted(os.walk(path), key=lambda entry: -entry[0].count("/")):
        while True:
            try:
                os.rmdir(dirpath)
                break
            except FileNotFoundError:
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)


@contextlib.contextmanager
def bpftrace_cgroups(comm_prefix):
    """Yields a dict that, after the block, holds {(comm, cgroup id): connects} as bpftrace's
    `cgroup` builtin (bpf_get_current_cgroup_id(), what the probe records) saw them on
    sock:inet_sock_set_state, for comms starting with comm_prefix."""
    if not shutil.which("bpftrace"):
        pytest.skip("bpftrace is not installed (scripts/apt-packages.txt)")
    mounts.ensure_tracefs()   # as `tcpmon load` does: on a fresh host tracefs is not mounted
    script = ("tracepoint:sock:inet_sock_set_state /args->oldstate == 7 && args->newstate == 2 && "
              f'strncmp(comm, "{comm_prefix}", {len(comm_prefix)}) == 0/ {{ @[comm, cgroup] = count(); }}')
    tracer = subprocess.Popen(["bpftrace", "-e", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = {}
    try:
        banner = []
        while not banner or "Attaching" not in banner[-1]:
            banner.append(tracer.stdout.readline())
            assert banner[-1] and len(banner) < 5, banner
        time.sleep(0.5)   # "Attaching" comes before the attach itself
        yield seen
    finally:
        tracer.send_signal(signal.SIGINT)
        output, _ = tracer.communicate(timeout=120)  # a loaded machine is slow to detach and print
    for comm, cgroup_id, count in re.findall(r"^@\[(\S+), (\d+)\]: (\d+)$", output, re.M):
        seen[(comm, int(cgroup_id))] = int(count)


def unique_comm(prefix):
    return f"{prefix}{secrets.token_hex(4)}"
