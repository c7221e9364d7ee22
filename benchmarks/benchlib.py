"""What tcpmon's benchmarks are made of: helpers compiled from benchmarks/*.c, maps with the
production layout in private pin dirs, process farms in network namespaces, the baselines'
readers, kernel BPF run-time stats, bpftrace, and small HTTP and /proc helpers.

Named benchlib (not conftest) so that `from conftest import ...` in tests/ never finds it.
"""
import ctypes
import errno
import glob
import http.client
import importlib.util
import json
import os
import platform
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tcpmon import _maps, attach, loader, maps
from tcpmon.pins import Pins

ROOT = Path(__file__).resolve().parent.parent
BENCH = Path(__file__).resolve().parent
BUILD = ROOT / "build" / "benchmarks"
PYTHON = sys.executable

PID_VALUE = maps.CONNECTS.value.struct
COMM_LEN = maps.COMM_LEN

# Sizes: (quick mode, make bench).  The scrape of the last ("map") case is timed interleaved with
# the largest "live" one for the 100k ÷ 10k ratio.
SIZES = {
    "map_read": ([1000], [1000, 10000, 100000]),
    "scrape": ([("live", 200), ("map", 2000)], [("live", 1000), ("live", 10000), ("map", 100000)]),
    "churn": (2000, 20000),
}

# Every pin dir the benchmarks make: the tests' private prefix, so stray ones are recognisable.
PIN_PREFIX = f"/sys/fs/bpf/tcpmon-test-{os.getpid()}-bench-"


def tests_helpers():
    """tests/conftest.py (Exporter, http_get, ...), imported under a name of its own."""
    name = "tcpmon_tests_conftest"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "tests" / "conftest.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


# --- timing ---

def timed(benchmark, fn, rounds, warmup=1, setup=None):
    """Run `fn` under pytest-benchmark: (its last result, {min, median, mean, rounds} in seconds).
    `setup` runs before every round, untimed.  In the quick mode fn runs once and the stats are None."""
    result = benchmark.pedantic(fn, rounds=rounds, warmup_rounds=warmup if benchmark.enabled else 0, setup=setup)
    if not benchmark.enabled or benchmark.stats is None:
        return result, None
    stats = benchmark.stats.stats
    return result, {"min": stats.min, "median": stats.median, "mean": stats.mean, "rounds": stats.rounds}


def max_pids_for(n):
    """The loader's --max-pids a user would pick for n PIDs: the default, or the next power of two."""
    size = maps.CONNECTS.default_max_entries
    while size < n:
        size *= 2
    return size


# --- helpers compiled from benchmarks/ -------------------------------------------------------

def _stale(target, *sources):
    return not target.exists() or any(src.stat().st_mtime > target.stat().st_mtime for src in sources)


def _compile(target, sources, command):
    """Run `command` (which writes to {out}) into a temporary file, then rename: concurrent runs never
    see a half-written helper."""
    if not _stale(target, *sources):
        return target
    BUILD.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}")
    cmd = [part.replace("{out}", str(tmp)) for part in command]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stderr}")
    os.replace(tmp, target)
    return target


def build_helpers():
    """{name: path} of the compiled helpers (rebuilt when their source changed)."""
    arch = {"x86_64": "x86", "aarch64": "arm64", "riscv64": "riscv"}.get(platform.machine(), "x86")
    return {
        "libbpfbench": _compile(BUILD / "libbpfbench.so", [BENCH / "bpfbench.c"],
                                ["gcc", "-O2", "-Wall", "-Wextra", "-shared", "-fPIC", "-o", "{out}",
                                 str(BENCH / "bpfbench.c")]),
        "procfarm": _compile(BUILD / "procfarm", [BENCH / "procfarm.c"],
                             ["gcc", "-O2", "-Wall", "-Wextra", "-o", "{out}", str(BENCH / "procfarm.c")]),
        "noop": _compile(BUILD / "noop.bpf.o", [BENCH / "noop.bpf.c"],
                         ["clang", "-O2", "-g", "-target", "bpf", f"-D__TARGET_ARCH_{arch}", "-c",
                          str(BENCH / "noop.bpf.c"), "-o", "{out}"]),
    }


class BenchLib:
    """ctypes binding of libbpfbench.so (benchmarks/bpfbench.c)."""

    def __init__(self, path):
        lib = ctypes.CDLL(str(path), use_errno=True)
        u32, cp, vp = ctypes.c_uint32, ctypes.c_char_p, ctypes.c_void_p
        lib.bench_map_create.argtypes = [u32, cp, u32, u32, u32, cp]
        lib.bench_update_batch.argtypes = [ctypes.c_int, cp, cp, u32, u32, u32]
        lib.bench_read_batch.argtypes = [ctypes.c_int, vp, vp, u32, u32, u32, ctypes.POINTER(ctypes.c_int)]
        lib.bench_close.argtypes = [ctypes.c_int]
        self.lib = lib

    @staticmethod
    def _check(ret, what):
        if ret < 0:
            raise OSError(-ret, f"{what}: {os.strerror(-ret)}")
        return ret

    def create_map(self, map_type, name, key_size, value_size, max_entries, pin_path):
        """Create a map, pin it at `pin_path`; returns its fd."""
        return self._check(self.lib.bench_map_create(map_type, name.encode(), key_size, value_size,
                                                     max_entries, str(pin_path).encode()),
                           f"create and pin {pin_path}")

    def update_batch(self, fd, keys, values, count, key_size, value_size):
        return self._check(self.lib.bench_update_batch(fd, keys, values, count, key_size, value_size),
                           "BPF_MAP_UPDATE_BATCH")

    def close(self, fd):
        self.lib.bench_close(fd)


class BatchFloor:
    """The floor: tcpmon's batch lookup loop in plain C, into buffers allocated once."""

    def __init__(self, lib, bpf_map):
        self.lib = lib.lib
        self.fd = bpf_map.fileno()
        self.capacity = bpf_map.max_entries
        self.key_size, self.value_stride = bpf_map.key_size, bpf_map.value_stride
        self.keys = ctypes.create_string_buffer(self.capacity * self.key_size)
        self.values = ctypes.create_string_buffer(self.capacity * self.value_stride)

    def read(self):
        return self._read(None)

    def calls(self):
        calls = ctypes.c_int(0)
        self._read(ctypes.byref(calls))
        return calls.value

    def _read(self, calls):
        n = self.lib.bench_read_batch(self.fd, self.keys, self.values, self.capacity, self.key_size,
                                      self.value_stride, calls)
        if n < 0:
            raise OSError(-n, f"BPF_MAP_LOOKUP_BATCH: {os.strerror(-n)}")
        return n


# --- maps with the production layout -----------------------------------------------------------

def synthetic_comm(j):
    return f"synth{j}".encode()


def create_production_maps(lib, pin_dir, n_pids, *, max_pids=maps.CONNECTS.default_max_entries, pid_base=1, n_comms=100):
    """Every map as the loader pins it, connects sized `max_pids` and holding `n_pids` PIDs
    (pid_base, pid_base + 1, ...) spread over `n_comms` comms, comm_totals their totals; filled
    with batch updates.  Returns {comm bytes: total} as comm_totals holds it."""
    os.makedirs(pin_dir, exist_ok=True)
    pins = Pins(pin_dir)
    fds = {}
    try:
        for spec in maps.MAPS:
            size = max_pids if spec is maps.CONNECTS else spec.default_max_entries
            fds[spec.name] = lib.create_map(spec.map_type, spec.name, spec.key_size, spec.value_size, size,
                                            pins.map(spec))
        keys = struct.pack(f"={n_pids}I", *range(pid_base, pid_base + n_pids))
        totals = {}
        values = bytearray(n_pids * PID_VALUE.size)
        for i in range(n_pids):
            comm, connects = synthetic_comm(i % n_comms), 1 + i % 5
            PID_VALUE.pack_into(values, i * PID_VALUE.size, connects, comm)
            totals[comm] = totals.get(comm, 0) + connects
        if n_pids:
            assert lib.update_batch(fds["connects"], keys, bytes(values), n_pids, 4, PID_VALUE.size) == n_pids
        comm_keys = b"".join(maps.comm_key(comm) for comm in totals)
        comm_values = struct.pack(f"={len(totals)}Q", *totals.values())
        if totals:
            lib.update_batch(fds["comm_totals"], comm_keys, comm_values, len(totals), COMM_LEN, 8)
        return totals
    finally:
        for fd in fds.values():
            lib.close(fd)


def open_pinned_rw(path):
    """A read-write fd of a pinned map (BPF_OBJ_GET without BPF_F_RDONLY); close it with os.close."""
    libc = ctypes.CDLL(None, use_errno=True)
    cpath = ctypes.create_string_buffer(os.fsencode(str(path)))
    attr = _ObjAttr(pathname=ctypes.addressof(cpath), file_flags=0)
    fd = libc.syscall(_SYS_BPF[platform.machine()], BPF_OBJ_GET, ctypes.byref(attr), ctypes.sizeof(attr))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"BPF_OBJ_GET {path}: {os.strerror(err)}")
    return fd


def fill_loaded_probe(lib, pin_dir, n_pids, pid_base=32769, n_comms=100):
    """`n_pids` synthetic PIDs (from `pid_base`, above pid_max: never a live process, so the exit hook
    never drops them) written into the connects map of the probe loaded under `pin_dir`, by one
    BPF_MAP_UPDATE_BATCH.  Returns {pid: (comm, connects)}."""
    keys = struct.pack(f"={n_pids}I", *range(pid_base, pid_base + n_pids))
    values = bytearray(n_pids * PID_VALUE.size)
    expected = {}
    for i in range(n_pids):
        comm, connects = synthetic_comm(i % n_comms), 1 + i % 5
        PID_VALUE.pack_into(values, i * PID_VALUE.size, connects, comm)
        expected[pid_base + i] = (comm.decode(), connects)
    fd = open_pinned_rw(Pins(pin_dir).map(maps.CONNECTS))
    try:
        assert lib.update_batch(fd, keys, bytes(values), n_pids, 4, PID_VALUE.size) == n_pids
    finally:
        os.close(fd)
    return expected


def own_cgroup_id():
    """The cgroup v2 id of this process (its cgroup directory's inode), or 1 without cgroup2."""
    from tcpmon.attribution.mounts import find_cgroup2
    root = find_cgroup2().path
    if root is None:
        return 1
    with open("/proc/self/cgroup") as f:
        path = next((line.split(":", 2)[2].strip() for line in f if line.startswith("0::")), "/")
    try:
        return os.stat(os.path.join(root, path.lstrip("/"))).st_ino
    except OSError:
        return os.stat(root).st_ino


def fill_outcomes(lib, pin_dir, n_comms=100, cgroup_id=None):
    """One outcomes entry per synthetic comm (the comms fill_loaded_probe uses), in this process's
    cgroup, with every result and a spread of latency slots: the outcome families a real node shows.
    Returns the number of entries written."""
    cgroup_id = own_cgroup_id() if cgroup_id is None else cgroup_id
    key_layout, value_layout = maps.OUTCOMES.key, maps.OUTCOMES.value
    keys = b"".join(key_layout.pack(cgroup_id=cgroup_id, comm=synthetic_comm(j)) for j in range(n_comms))
    values = b"".join(value_layout.pack(
        attempts=100 + j, results=tuple(range(1 + j % 7, 1 + j % 7 + len(maps.RESULTS))),
        duration_ns=1000000 * (j + 1), latency=tuple((i + j) % 5 for i in range(maps.LATENCY_SLOTS)))
        for j in range(n_comms))
    fd = open_pinned_rw(Pins(pin_dir).map(maps.OUTCOMES))
    try:
        assert lib.update_batch(fd, keys, values, n_comms, key_layout.size, value_layout.size) == n_comms
    finally:
        os.close(fd)
    return n_comms


class ScrapedMapsFloor:
    """The floor of a whole scrape: the C batch read of every map a scrape reads
    (tcpmon.collector.SCRAPED), each into buffers allocated once."""

    def __init__(self, lib, pin_dir):
        from tcpmon.collector import SCRAPED
        self.maps = [_maps.BpfMap(Pins(pin_dir).map(spec)) for spec in SCRAPED]
        self.floors = [BatchFloor(lib, bpf_map) for bpf_map in self.maps]

    def read(self):
        return sum(floor.read() for floor in self.floors)

    def close(self):
        for bpf_map in self.maps:
            bpf_map.close()


_SERVE_FLOOR = """
import socket, struct, sys
sys.path[:0] = sys.argv[1:3]
import benchlib
floor = benchlib.ScrapedMapsFloor(benchlib.BenchLib(sys.argv[3]), sys.argv[4])
sock = socket.socket(fileno=int(sys.argv[5]))
while sock.recv(1):
    sock.sendall(struct.pack("=Q", floor.read()))
"""


class ServedFloor:
    """The same C batch reads in a process of their own, run when a byte arrives on a socket and
    answered with the entry count: a floor that waits between reads, as the exporter does, so
    that both wake on CPUs that sat idle."""

    def __init__(self, lib_path, pin_dir):
        self.sock, theirs = socket.socketpair()
        try:
            self.proc = subprocess.Popen([sys.executable, "-c", _SERVE_FLOOR, str(BENCH), str(ROOT), str(lib_path),
                                          pin_dir, str(theirs.fileno())], pass_fds=[theirs.fileno()])
        finally:
            theirs.close()

    def read(self):
        self.sock.sendall(b"r")
        answer = self.sock.recv(8, socket.MSG_WAITALL)
        if len(answer) != 8:
            raise RuntimeError(f"the served floor stopped (exit status {self.proc.poll()})")
        return struct.unpack("=Q", answer)[0]

    def close(self):
        self.sock.close()
        stop(self.proc)


def remove_pin_dir(pin_dir):
    """Unpin everything tcpmon pins there (links first), then anything else, then the dir."""
    try:
        loader.unload(pin_dir)
    except Exception:
        pass
    if os.path.isdir(pin_dir):
        shutil.rmtree(pin_dir, ignore_errors=True)


# --- the baselines' reader: per-key bpf() through ctypes ---------------------------------------

_SYS_BPF = {"x86_64": 321, "aarch64": 280, "riscv64": 280, "armv7l": 386, "armv6l": 386, "i686": 357}
BPF_MAP_LOOKUP_ELEM, BPF_MAP_GET_NEXT_KEY, BPF_OBJ_GET = 1, 4, 7
BPF_F_RDONLY = 1 << 3


class _ElemAttr(ctypes.Structure):
    """union bpf_attr as BPF_MAP_LOOKUP_ELEM / BPF_MAP_GET_NEXT_KEY use it."""
    _fields_ = [("map_fd", ctypes.c_uint32), ("_pad", ctypes.c_uint32), ("key", ctypes.c_uint64),
                ("value", ctypes.c_uint64), ("flags", ctypes.c_uint64)]


class _ObjAttr(ctypes.Structure):
    _fields_ = [("pathname", ctypes.c_uint64), ("bpf_fd", ctypes.c_uint32), ("file_flags", ctypes.c_uint32)]


class _PidValue(ctypes.Structure):
    _fields_ = [("connects", ctypes.c_uint64), ("comm", ctypes.c_char * COMM_LEN)]


class CtypesPidMap:
    """The reader a user writes in Python without tcpmon: open the pin, then GET_NEXT_KEY +
    LOOKUP_ELEM per key through ctypes (what bcc's table iteration does)."""

    def __init__(self, path):
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.nr = _SYS_BPF[platform.machine()]
        cpath = ctypes.create_string_buffer(os.fsencode(path))
        attr = _ObjAttr(pathname=ctypes.addressof(cpath), file_flags=BPF_F_RDONLY)
        fd = self.libc.syscall(self.nr, BPF_OBJ_GET, ctypes.byref(attr), ctypes.sizeof(attr))
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"BPF_OBJ_GET {path}: {os.strerror(err)}")
        self.fd = fd

    def items(self):
        """{pid: (connects, comm bytes)}; a key deleted under the walk restarts it, hence the dict."""
        syscall, nr = self.libc.syscall, self.nr
        key, next_key, value = ctypes.c_uint32(), ctypes.c_uint32(), _PidValue()
        step = _ElemAttr(map_fd=self.fd, key=0, value=ctypes.addressof(next_key))
        lookup = _ElemAttr(map_fd=self.fd, key=ctypes.addressof(next_key), value=ctypes.addressof(value))
        step_ref, lookup_ref, size = ctypes.byref(step), ctypes.byref(lookup), ctypes.sizeof(_ElemAttr)
        entries = {}
        while True:
            if syscall(nr, BPF_MAP_GET_NEXT_KEY, step_ref, size) < 0:
                err = ctypes.get_errno()
                if err == errno.ENOENT:
                    return entries
                raise OSError(err, f"BPF_MAP_GET_NEXT_KEY: {os.strerror(err)}")
            if syscall(nr, BPF_MAP_LOOKUP_ELEM, lookup_ref, size) == 0:
                entries[next_key.value] = (value.connects, value.comm)
            key.value = next_key.value
            step.key = ctypes.addressof(key)

    def close(self):
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


# --- processes ------------------------------------------------------------------------------

def _json_line(proc, what, timeout):
    """The first stdout line of `proc` as JSON, within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    import selectors
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while time.monotonic() < deadline:
            if sel.select(timeout=1):
                line = proc.stdout.readline()
                if not line:
                    break
                return json.loads(line)
            if proc.poll() is not None:
                break
    proc.kill()
    raise RuntimeError(f"{what} gave no report: {proc.stderr.read() if proc.stderr else ''}")


class Farm:
    """`procfarm hold`: N live processes in a netns of their own, each named PREFIX<i % ncomms>,
    each with exactly one connect attempt."""

    def __init__(self, procfarm, n, prefix, ncomms=100, timeout=300):
        self.prefix, self.ncomms = prefix, ncomms
        self.proc = subprocess.Popen(["unshare", "-n", str(procfarm), "hold", str(n), prefix, str(ncomms)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
        report = _json_line(self.proc, "procfarm hold", timeout)
        self.pids, self.errors = report["pids"], report["errors"]

    def comm(self, i):
        return f"{self.prefix}{i % self.ncomms}"

    def close(self):
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("\n")
                self.proc.stdin.flush()
            except BrokenPipeError:
                pass
            try:
                self.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Churn:
    """`procfarm churn`: TOTAL short-lived processes named COMM (BATCH at a time), then up to REUSE
    of their PIDs handed to new live processes named REUSECOMM."""

    def __init__(self, procfarm, total, batch, comm, reuse, reuse_comm, timeout=540):
        started = time.perf_counter()
        self.proc = subprocess.Popen(["unshare", "-n", str(procfarm), "churn", str(total), str(batch), comm,
                                      str(reuse), reuse_comm],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
        self.report = _json_line(self.proc, "procfarm churn", timeout)
        self.seconds = time.perf_counter() - started

    close = Farm.close


def connect_loop(procfarm, count, seconds, mode="refused", comm=None):
    """{"connects", "seconds", "errors"} of one tight connect loop in a fresh netns."""
    cmd = ["unshare", "-n", str(procfarm), "loop", str(count), str(seconds), mode] + ([comm] if comm else [])
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60)
    if result.returncode != 0:
        raise RuntimeError(f"procfarm loop failed: {result.stderr}")
    return json.loads(result.stdout)


def rss_bytes(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def children(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except FileNotFoundError:
        return []


def alive(pid):
    """Running (a zombie has exited: it is dead for tcpmon's purposes)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] not in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def stop(proc, timeout=20):
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# --- HTTP -----------------------------------------------------------------------------------

class Scraper:
    """GET /metrics the way Prometheus does: one kept-alive connection, reopened whenever the
    server closes it (the old agent's HTTP/1.0 server closes after every response)."""

    def __init__(self, port, path="/metrics", timeout=120):
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        self.port, self.path = port, path

    def __call__(self):
        try:
            self.conn.request("GET", self.path)
            response = self.conn.getresponse()
        except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
            self.conn.close()  # a kept-alive connection the server had dropped: once more, fresh
            self.conn.request("GET", self.path)
            response = self.conn.getresponse()
        body = response.read()
        if response.status != 200:
            raise RuntimeError(f"GET :{self.port}{self.path}: {response.status} {body[:200]!r}")
        return body

    def close(self):
        self.conn.close()


def get(port, path="/metrics", timeout=120):
    """One GET on a fresh connection: the body."""
    scraper = Scraper(port, path, timeout)
    try:
        return scraper()
    finally:
        scraper.close()


def wait_http(port, path, proc, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited: {proc.stderr.read() if proc.stderr else ''}")
        try:
            get(port, path, timeout=2)
            return
        except (OSError, RuntimeError):
            time.sleep(0.1)
    raise RuntimeError(f"nothing answered :{port}{path}")


class OldAgent:
    """benchmarks/old_agent.py serving the pin dir's connects map."""

    def __init__(self, pin_dir):
        self.port = tests_helpers().free_port()
        self.proc = subprocess.Popen([PYTHON, str(BENCH / "old_agent.py"), "--pin-dir", str(pin_dir),
                                      "--port", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        wait_http(self.port, "/", self.proc)
        self.scrape = Scraper(self.port)

    def stop(self):
        self.scrape.close()
        stop(self.proc)


# --- kernel BPF statistics and bpftrace ------------------------------------------------------

BPF_STATS = "/proc/sys/kernel/bpf_stats_enabled"


class BpfStats:
    """kernel.bpf_stats_enabled=1 for the block, then the value it had."""
    changed = []   # values to restore if the run dies inside the block (see conftest)

    def __enter__(self):
        with open(BPF_STATS) as f:
            self.before = f.read().strip()
        BpfStats.changed.append(self.before)
        with open(BPF_STATS, "w") as f:
            f.write("1")
        return self

    def __exit__(self, *exc):
        with open(BPF_STATS, "w") as f:
            f.write(self.before)
        BpfStats.changed.remove(self.before)


def prog_stats(prog_id):
    """(run_time_ns, run_cnt) of a loaded program (0, 0 while stats were never on)."""
    out = subprocess.run(["bpftool", "prog", "show", "id", str(prog_id), "--json"], capture_output=True,
                         text=True, check=True).stdout
    info = json.loads(out)
    return info.get("run_time_ns", 0), info.get("run_cnt", 0)


def prog_ids_of(pid):
    """IDs of the BPF programs process `pid` holds open."""
    ids = set()
    for path in glob.glob(f"/proc/{pid}/fdinfo/*"):
        try:
            with open(path) as f:
                text = f.read()
        except OSError:
            continue
        match = re.search(r"^prog_id:\s*(\d+)", text, re.M)
        if match:
            ids.add(int(match.group(1)))
    return ids


# The same aggregation as tcpmon, written the way a bpftrace user would: at connect, the per-PID
# and per-comm counts, attempts per (cgroup, comm) and the socket's start (time, cgroup, comm) in a
# map keyed by the socket; when the socket leaves SYN_SENT, the entry is taken and deleted, the
# result counted per (cgroup, comm, result) from the socket's error, and a success adds its
# duration to a sum and a log2 histogram (µs).  PIDs are dropped at exit.  Result numbers are
# tcpmon's slots (0 success, 1 refused, 2 timeout, 3 unreachable, 4 aborted, 5 other).
# bpftrace 0.17 has no tp_btf probes: for tp_btf it runs on the same kernel tracepoint through
# the classic (perf) tracepoint attach.
_BT_CONNECT = """@connects[pid] = count(); @comm_totals[comm] = count(); @attempts[cgroup, comm] = count();
    @sockets[%(sk)s] = (nsecs, cgroup, comm);"""
_BT_OUTCOME = """$s = @sockets[args->skaddr];
    if ($s.0 != 0) {
      delete(@sockets[args->skaddr]);
      if (args->newstate != 7) {
        @results[$s.1, $s.2, 0] = count();
        @duration_ns[$s.1, $s.2] = sum(nsecs - $s.0);
        @latency_us[$s.1, $s.2] = hist((nsecs - $s.0) / 1000);
      } else {
        $err = ((struct sock *)args->skaddr)->sk_err;
        $r = $err == 0 ? 4 : ($err == 111 ? 1 : ($err == 110 ? 2 : (($err == 113 || $err == 101) ? 3 : 5)));
        @results[$s.1, $s.2, $r] = count();
      }
    }"""
_BT_EXIT = "tracepoint:sched:sched_process_exit { delete(@connects[pid]); }\n"
_BT_STATE = "tracepoint:sock:inet_sock_set_state\n/args->protocol == 6%s/\n"
_BT_TRACEPOINT = (_BT_STATE % "" + "{\n  if (args->oldstate == 7 && args->newstate == 2) {\n    "
                  + _BT_CONNECT % {"sk": "args->skaddr"}
                  + "\n  } else if (args->oldstate == 2 && args->newstate != 2) {\n    " + _BT_OUTCOME
                  + "\n  }\n}\n" + _BT_EXIT)


def _bt_function(probe):
    """kprobe/kfunc on tcp_connect for the connect part, the tracepoint for the outcome."""
    sk = "arg0" if probe.startswith("kprobe") else "args->sk"
    return (f"{probe}\n{{ " + _BT_CONNECT % {"sk": f"(uint64){sk}"} + " }\n"
            + _BT_STATE % " && args->oldstate == 2 && args->newstate != 2" + "{\n    " + _BT_OUTCOME.replace(
                "@sockets[args->skaddr]", "@sockets[(uint64)args->skaddr]") + "\n}\n" + _BT_EXIT)


BPFTRACE_SCRIPTS = {"tracepoint": _BT_TRACEPOINT, "tp_btf": _BT_TRACEPOINT,
                    "kprobe": _bt_function("kprobe:tcp_connect"), "fentry": _bt_function("kfunc:tcp_connect")}
BPFTRACE_PROGRAMS = {"tracepoint": 2, "tp_btf": 2, "kprobe": 3, "fentry": 3}
BPFTRACE_HOOK = {"tracepoint": "tracepoint sock:inet_sock_set_state",
                 "tp_btf": "tracepoint sock:inet_sock_set_state (bpftrace 0.17 has no tp_btf)",
                 "kprobe": "kprobe tcp_connect + tracepoint", "fentry": "kfunc tcp_connect + tracepoint"}


class Bpftrace:
    """bpftrace running `script` until stop(); `programs` are the IDs of its loaded programs.
    Returns once every program is attached: perf-event attachments (tracepoints, kprobes) are
    listed by `bpftool perf list`; for other kinds (kfunc links) it waits half a second more."""

    def __init__(self, script, programs=2, timeout=60):
        self.proc = subprocess.Popen(["bpftrace", "-e", script], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, errors="replace")
        self.output = ""
        deadline = time.monotonic() + timeout
        self.programs = set()
        perf_events = "kfunc:" not in script
        while len(self.programs) < programs or (perf_events and self._attached() < programs):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                output = self.proc.stdout.read() if self.proc.poll() is not None else ""
                stop(self.proc)
                raise RuntimeError(f"bpftrace did not attach: {output}")
            time.sleep(0.1)
            self.programs = prog_ids_of(self.proc.pid)
        if not perf_events:
            time.sleep(0.5)

    def _attached(self):
        out = subprocess.run(["bpftool", "perf", "list", "--json"], capture_output=True, text=True).stdout
        try:
            return sum(1 for entry in json.loads(out or "[]") if entry.get("pid") == self.proc.pid)
        except ValueError:
            return 0

    def run_time_ns(self):
        return sum(prog_stats(prog)[0] for prog in self.programs)

    def stop(self):
        """SIGINT, and the maps it prints: {map: {key text: value}}."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            output, _ = self.proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            output, _ = self.proc.communicate()
        self.output = output
        maps = {}
        for name, key, value in re.findall(r"^@(\w+)\[(.*)\]: (\d+)$", output, re.M):
            maps.setdefault(name, {})[key] = int(value)
        return maps


class _OneProgram:
    """Programs of a BPF object loaded alone (the others' autoload off), attached and detached
    together at will without reloading.  `program` is one name or a tuple of them."""

    def __init__(self, object_path, program, all_programs):
        from tcpmon import _libbpf
        self.program = program
        self.names = (program,) if isinstance(program, str) else tuple(program)
        self.obj = _libbpf.BpfObject(str(object_path))
        for name in all_programs:
            self.obj.set_autoload(name, name in self.names)
        self.obj.load()
        self.links = []

    def attach(self):
        self.links = [self.obj.attach(name) for name in self.names]

    def detach(self):
        for link in self.links:
            link.destroy()
        self.links = []

    def close(self):
        self.detach()
        self.obj.close()


class NoopPrograms(_OneProgram):
    """benchmarks/noop.bpf.c's empty program for `mode` ("tp_btf", "tracepoint" or "idle"), loaded;
    attach() / detach() at will; pinned at `pin_path` (if given) to read its run time like tcpmon's."""
    PROGRAMS = {"tp_btf": "noop_tp_btf", "tracepoint": "noop_tp", "idle": "noop_idle"}

    def __init__(self, object_path, mode, pin_path=None, attach=True):
        super().__init__(object_path, self.PROGRAMS[mode], self.PROGRAMS.values())
        self.pin_path = str(pin_path) if pin_path else None
        if attach:
            self.attach()
        if self.pin_path:
            self.obj.pin_program(self.program, self.pin_path)

    def run_time_ns(self):
        return _maps.pinned_prog_info(self.pin_path)["run_time_ns"]

    def close(self):
        super().close()
        if self.pin_path and os.path.exists(self.pin_path):
            os.unlink(self.pin_path)


def tcpmon_run_time_ns(pin_dir):
    """Kernel run time of tcpmon's programs (connect, outcome, exit) pinned under `pin_dir`."""
    pins = Pins(pin_dir)
    return sum(_maps.pinned_prog_info(path)["run_time_ns"] for path in pins.programs() if path.exists())


# --- connect rate with the probe toggled under a running loop -------------------------------

class ProbeToggle(_OneProgram):
    """tcpmon's shipped BPF object loaded for `mode`: its connect program, and the outcome program
    where that is a separate one (fentry, kprobe; on tp_btf and tracepoint the connect program sees
    the outcome too); not the exit hook, which does not run in a connect loop.  Attached and
    detached at will without reloading."""

    def __init__(self, mode):
        chosen = attach.BY_NAME[mode]
        names = tuple(p.name for p in (chosen.connect, chosen.outcome) if p is not None)
        super().__init__(loader.default_object(), names, [program.name for program in attach.PROGRAMS])


def toggled_rate(procfarm, toggle, seconds, period=0.2, every=256, workload="refused"):
    """Run `procfarm stream` for `seconds` (`workload`: refused connects, or accepted handshakes)
    while `toggle` (a ProbeToggle or NoopPrograms, loaded and detached) is attached for every other
    `period`; closes `toggle`.
    Returns {"pairs": [(without, with) CPU ns per connect of adjacent periods], "errors"}: each pair
    is two neighbouring fractions of a second, so a busy stretch of the machine hits both alike."""
    out_file = tempfile.TemporaryFile(mode="w+")   # its report is larger than a pipe holds
    proc = subprocess.Popen(["unshare", "-n", str(procfarm), "stream", str(seconds), str(every), workload],
                            stdout=out_file, stderr=subprocess.PIPE, text=True)
    changes = []   # (earliest ns the new state may hold, latest ns the old state may hold, new state)
    try:
        time.sleep(0.2)   # the loop starts (unshare, exec) detached
        attached = False
        while proc.poll() is None:
            time.sleep(period)
            before = time.monotonic_ns()
            toggle.detach() if attached else toggle.attach()
            attached = not attached
            changes.append((time.monotonic_ns(), before, attached))
        err = proc.stderr.read()
        out_file.seek(0)
        out = out_file.read()
    finally:
        toggle.close()
        stop(proc)
        out_file.close()
    if proc.returncode != 0:
        raise RuntimeError(f"procfarm stream failed: {err}")
    report = json.loads(out)
    records = report["records"]
    # period k runs from changes[k-1] to changes[k] (period 0 from the start: detached)
    sums = {}
    k = 0
    for (t0, c0, n0), (t1, c1, n1) in zip(records, records[1:]):
        while k < len(changes) and changes[k][1] <= t0:
            k += 1       # this stretch starts after change k's call returned... or during it
        if k < len(changes) and changes[k][1] < t1:
            continue     # a toggle happened inside this stretch: not clearly one state
        if k > 0 and changes[k - 1][0] > t0:
            continue     # the previous toggle's call was still running at t0
        state = changes[k - 1][2] if k > 0 else False
        cpu, n = sums.get(k, (0, 0, state))[:2]
        sums[k] = (cpu + c1 - c0, n + n1 - n0, state)
    pairs = []
    for k in sorted(sums):
        cpu, n, state = sums[k]
        prev = sums.get(k - 1)
        if state and prev and not prev[2] and n and prev[1]:
            pairs.append((prev[0] / prev[1], cpu / n))
    return {"pairs": pairs, "errors": report["errors"]}
