"""The exporter's HTTP side on real sockets: routing by port, methods, health and readiness through
load/unload, responsiveness under idle, slow and concurrent clients, SIGTERM, and privileges."""
import http.client
import json
import os
import platform
import re
import signal
import socket
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, closing

import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families as parse_text

from conftest import TCPMON, Connector, Exporter, http_get, unique_comm
from metrics import pid_value, samples
from tcpmon import attach, loader

CAP_BPF = 39
HEALTH_PATHS = ("/liveness", "/readiness", "/health")
HEALTH_KEYS = {"ready", "alive", "timestamp", "attach_mode", "map_entries", "reason", "last_error", "notes",
               "last_scrape_ok", "last_scrape_age_seconds"}
CAP_BPF_ONLY = ["setpriv", "--inh-caps=-all,+bpf", "--ambient-caps=-all,+bpf", "--bounding-set=-all,+bpf", "--"]
NO_CAPS = ["setpriv", "--inh-caps=-all", "--ambient-caps=-all", "--bounding-set=-all", "--"]


def request(port, method, path, body=None, headers=None):
    """(status, headers, body) over a fresh connection, any method."""
    with closing(http.client.HTTPConnection("127.0.0.1", port, timeout=10)) as conn:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()


def raw_exchange(port, data, timeout=10):
    """Everything the server sends back on one connection until it closes it."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def read_response(sock):
    """One HTTP/1.1 response with a Content-Length, leaving the connection open."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, "connection closed before the headers"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"(?im)^content-length:\s*(\d+)", head).group(1))
    while len(body) < length:
        body += sock.recv(65536)
    return head, body


def probe_attached(text):
    values = samples(text, "tcpmon_probe_attached")
    assert len(values) == 1, values
    return next(iter(values.items()))


def read_errors(text, map_name="connects"):
    return samples(text, "tcpmon_map_read_errors_total")[frozenset({"map": map_name}.items())]


def children(pid):
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(child) for child in f.read().split()]


def capabilities(pid):
    with open(f"/proc/{pid}/status") as f:
        fields = dict(line.rstrip("\n").split(":\t", 1) for line in f if line.startswith("Cap"))
    return {name: int(value, 16) for name, value in fields.items()}


def worker_pid(server, timeout=10):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        workers = children(server.proc.pid)
        if workers:
            return workers[0]
        time.sleep(0.1)
    raise AssertionError("gunicorn started no worker")


# --- routing and methods -----------------------------------------------------------------

@pytest.mark.parametrize("port_name, path", [
    ("metrics", "/nope"), ("metrics", "/metrics/extra"), ("health", "/nope"), ("health", "/"),
    *[("metrics", path) for path in HEALTH_PATHS], ("health", "/metrics")])
def test_paths_of_the_other_port_and_unknown_paths_are_404(exporter, port_name, path):
    port = exporter.metrics_port if port_name == "metrics" else exporter.health_port
    status, headers, body = request(port, "GET", path)
    assert status == 404
    text = body.decode()
    assert text.count("\n") == 1 and text.startswith(path + " "), text


@pytest.mark.parametrize("port_name, path", [("metrics", "/metrics"), ("health", "/health"),
                                             ("health", "/readiness"), ("health", "/liveness")])
@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "OPTIONS"])
def test_other_methods_are_405_with_allow(exporter, port_name, path, method):
    port = exporter.metrics_port if port_name == "metrics" else exporter.health_port
    status, headers, body = request(port, method, path, body=b"x=1" if method in ("POST", "PUT") else None)
    assert status == 405, body
    assert {m.strip() for m in headers["allow"].split(",")} == {"GET", "HEAD"}
    assert body.decode().count("\n") == 1


@pytest.mark.parametrize("port_name, path", [("metrics", "/metrics"), ("health", "/health"),
                                             ("health", "/liveness")])
def test_head_sends_headers_and_no_body(exporter, port_name, path):
    port = exporter.metrics_port if port_name == "metrics" else exporter.health_port
    reply = raw_exchange(port, f"HEAD {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".encode())
    head, sep, body = reply.partition(b"\r\n\r\n")
    assert sep and head.startswith(b"HTTP/1.1 200 "), reply[:200]
    assert body == b""
    assert re.search(rb"(?im)^content-type: ", head)
    get_status, get_headers, get_body = http_get(f"http://127.0.0.1:{port}{path}")
    assert get_status == 200 and get_body
    length = int(re.search(rb"(?im)^content-length:\s*(\d+)", head).group(1))
    if path == "/liveness":
        assert length == len(get_body)
    else:
        assert length > 0


def test_liveness(exporter):
    status, headers, body = http_get(exporter.health + "/liveness")
    assert (status, body) == (200, b"alive\n")


# --- health and readiness ----------------------------------------------------------------

def bpftool_mode(pin_dir):
    """The attach mode from the pinned program's name, as bpftool reads it."""
    out = subprocess.run(["bpftool", "-j", "prog", "show", "pinned", f"{pin_dir}/prog_connect"],
                         capture_output=True, text=True, check=True).stdout
    name = json.loads(out)["name"]
    return attach.mode_of_program(name)


def test_health_has_exactly_the_documented_keys(exporter, pin_dir):
    with Connector(unique_comm(), opened=1):
        text = exporter.scrape()
        before = time.time()
        status, headers, body = http_get(exporter.health + "/health")
        after = time.time()
    assert status == 200 and headers["Content-Type"] == "application/json"
    report = json.loads(body)
    assert set(report) == HEALTH_KEYS
    assert report["ready"] is True and report["alive"] is True
    assert isinstance(report["timestamp"], float) and before - 0.01 <= report["timestamp"] <= after + 0.01
    assert report["attach_mode"] == bpftool_mode(pin_dir)
    # map_entries is the last scrape's (the session exporter may have served another scrape since)
    assert type(report["map_entries"]) is int and report["map_entries"] >= 1
    assert report["reason"] is None and report["last_error"] is None
    assert report["last_scrape_ok"] is True
    assert isinstance(report["last_scrape_age_seconds"], float) and report["last_scrape_age_seconds"] >= 0
    assert samples(text, "tcpmon_map_entries")[frozenset({"map": "connects"}.items())] >= 1
    status, _, body = http_get(exporter.health + "/readiness")
    assert (status, body) == (200, b"ready\n")


def test_readiness_follows_load_and_unload(fresh_pin_dir):
    server = Exporter(fresh_pin_dir)
    try:
        # nothing loaded yet
        status, _, body = http_get(server.health + "/readiness")
        reason = body.decode()
        assert status == 503 and reason.startswith("not ready: ") and reason.count("\n") == 1, reason
        assert fresh_pin_dir in reason and "tcpmon load" in reason
        status, _, body = http_get(server.health + "/health")
        report = json.loads(body)
        assert status == 503 and set(report) == HEALTH_KEYS
        assert report["ready"] is False and report["alive"] is True
        assert report["reason"] == reason[len("not ready: "):].rstrip("\n")
        assert report["attach_mode"] is None and report["map_entries"] is None
        # health never reads a map: before the first scrape there is no last scrape to report
        assert report["last_error"] is None and report["last_scrape_ok"] is None
        assert report["last_scrape_age_seconds"] is None
        text = server.scrape()
        assert probe_attached(text) == (frozenset({"mode": "none"}.items()), 0)
        report = json.loads(http_get(server.health + "/health")[2])
        assert report["last_scrape_ok"] is False and "tcpmon load" in report["last_error"]
        assert http_get(server.health + "/liveness")[0] == 200

        # loaded: ready, and counting exactly
        result = loader.load(fresh_pin_dir)
        status, _, body = http_get(server.health + "/readiness")
        assert (status, body) == (200, b"ready\n")
        with Connector(unique_comm(), opened=2, refused=3) as proc:
            text = server.scrape()
            assert pid_value(text, proc.pid, proc.comm) == 5 == proc.active_opens
        assert probe_attached(text) == (frozenset({"mode": result.mode}.items()), 1)
        status, _, body = http_get(server.health + "/health")
        report = json.loads(body)
        assert status == 200 and report["ready"] is True and report["last_scrape_ok"] is True
        assert report["map_entries"] == samples(text, "tcpmon_map_entries")[frozenset({"map": "connects"}.items())]

        # unloaded: not ready again, /metrics still served and counting its failed reads
        loader.unload(fresh_pin_dir)
        status, _, body = http_get(server.health + "/readiness")
        assert status == 503 and "tcpmon load" in body.decode(), body
        first = server.scrape()
        second = server.scrape()
        assert probe_attached(second) == (frozenset({"mode": "none"}.items()), 0)
        assert read_errors(second) > read_errors(first) >= 1
        assert samples(second, "tcp_connects_by_pid") == {}
        report = json.loads(http_get(server.health + "/health")[2])
        assert report["ready"] is False and report["map_entries"] is None and report["last_error"]
        assert report["last_scrape_ok"] is False
    finally:
        assert server.stop() == 0


# --- responsiveness ----------------------------------------------------------------------

@pytest.fixture
def spare_exporter(pin_dir):
    """An exporter of its own, so the abuse below cannot slow the session's."""
    server = Exporter(pin_dir)
    yield server
    server.stop()


def health_latencies(server, rounds=5, limit=2.0):
    """(status or error, seconds) of `rounds` sequential /health requests."""
    results = []
    for _ in range(rounds):
        start = time.monotonic()
        try:
            status = http_get(server.health + "/health", timeout=limit + 1)[0]
        except OSError as exc:
            status = type(exc).__name__
        results.append((status, round(time.monotonic() - start, 2)))
        if status != 200:
            break  # one miss is enough; don't spend the whole timeout again
    return results


def open_idle_keepalive(port):
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n")
    head, _ = read_response(sock)
    assert head.startswith(b"HTTP/1.1 200") and b"connection: close" not in head.lower()
    return sock


def open_silent(port):
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def open_slowloris(port):
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(b"GET /metr")
    return sock


@pytest.mark.parametrize("kind, count, opener", [
    ("idle keep-alive after a request", 50, open_idle_keepalive),
    ("connected and silent", 50, open_silent),
    ("slowloris: partial request line", 20, open_slowloris)])
def test_health_answers_quickly_while_clients_hold_the_metrics_port(spare_exporter, kind, count, opener):
    """server.py promises slow or idle clients cost no thread; both ports share the worker's event
    loop, so if they could block it, a kubelet probing /readiness would give up on a healthy exporter.
    (tests/test_hostile.py holds 500 of each kind on both ports for a minute.)"""
    with ExitStack() as stack:
        for _ in range(count):
            stack.enter_context(opener(spare_exporter.metrics_port))
        time.sleep(0.3)
        latencies = health_latencies(spare_exporter)
    assert all(status == 200 and seconds < 2.0 for status, seconds in latencies), (kind, latencies)
    assert health_latencies(spare_exporter, rounds=1, limit=15)[0][0] == 200  # and it recovers


def test_health_answers_quickly_during_concurrent_scrapes(spare_exporter):
    stop = threading.Event()
    statuses = []

    def scrape_loop():
        while not stop.is_set():
            statuses.append(http_get(spare_exporter.metrics + "/metrics", timeout=30)[0])

    with ThreadPoolExecutor(6) as pool:
        loops = [pool.submit(scrape_loop) for _ in range(6)]
        time.sleep(0.2)
        latencies = health_latencies(spare_exporter)
        stop.set()
        for loop in loops:
            loop.result()
    assert all(status == 200 and seconds < 2.0 for status, seconds in latencies), latencies
    assert statuses and set(statuses) == {200}


def shape(families):
    return [(family.name, family.type, sorted({tuple(sorted(s.labels)) for s in family.samples}))
            for family in families if not family.name.startswith(("process_", "python_"))]


def test_concurrent_scrapes_are_all_valid_and_alike(exporter):
    with Connector(unique_comm(), opened=3, refused=1) as proc:
        barrier = threading.Barrier(16)

        def scrape(openmetrics):
            barrier.wait()
            headers = {"Accept": "application/openmetrics-text; version=1.0.0"} if openmetrics else None
            status, _, body = http_get(exporter.metrics + "/metrics", headers, timeout=30)
            assert status == 200
            return body.decode()

        with ThreadPoolExecutor(16) as pool:
            bodies = list(pool.map(scrape, [i % 2 == 1 for i in range(16)]))
    texts, openmetrics = bodies[0::2], bodies[1::2]
    text_shapes = [shape(parse_text(text)) for text in texts]
    om_shapes = [shape(parse_openmetrics(body)) for body in openmetrics]
    assert all(s == text_shapes[0] for s in text_shapes)
    assert all(s == om_shapes[0] for s in om_shapes)
    assert all(body.endswith("# EOF\n") for body in openmetrics)
    for text in texts:
        assert pid_value(text, proc.pid, proc.comm) == 4
    for body in openmetrics:
        assert f'tcp_connects_by_pid{{comm="{proc.comm.decode()}",pid="{proc.pid}"}} 4\n' in body


# --- shutdown ----------------------------------------------------------------------------

@pytest.mark.parametrize("hold", ["nothing", "a kept-alive connection"])
def test_sigterm_exits_zero_within_seconds(pin_dir, hold):
    server = Exporter(pin_dir)
    worker = worker_pid(server)
    with ExitStack() as stack:
        if hold != "nothing":
            stack.enter_context(open_idle_keepalive(server.metrics_port))
        started = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        try:
            returncode = server.proc.wait(timeout=8)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait()
            pytest.fail("tcpmon serve did not exit within 8 s of SIGTERM")
    elapsed = time.monotonic() - started
    assert returncode == 0 and elapsed < 5, (returncode, elapsed, server.proc.stdout.read())
    assert not os.path.exists(f"/proc/{worker}")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", server.metrics_port), timeout=2).close()


# --- privileges --------------------------------------------------------------------------

def test_the_exporter_works_with_only_cap_bpf(pin_dir):
    server = Exporter(pin_dir, prefix=CAP_BPF_ONLY)
    try:
        for pid in (server.proc.pid, worker_pid(server)):
            caps = capabilities(pid)
            assert caps["CapEff"] == caps["CapPrm"] == 1 << CAP_BPF, (pid, caps)
            assert caps["CapBnd"] == 1 << CAP_BPF
        status, _, body = http_get(server.health + "/readiness")
        assert (status, body) == (200, b"ready\n")
        with Connector(unique_comm(), opened=4, refused=2) as proc:
            text = server.scrape()
            assert pid_value(text, proc.pid, proc.comm) == 6 == proc.active_opens
        assert probe_attached(text)[1] == 1
        assert all(value == 0 for value in samples(text, "tcpmon_map_read_errors_total").values())
    finally:
        assert server.stop() == 0


def _kernel_at_least(major, minor):
    found = re.match(r"(\d+)\.(\d+)", platform.release())
    return (int(found.group(1)), int(found.group(2))) >= (major, minor)


def test_dump_as_root_without_any_capability(pin_dir):
    """Before Linux 6.5, bpf() refused every command without CAP_BPF while
    kernel.unprivileged_bpf_disabled was set: tcpmon must then say so in one line.  Since 6.5 a
    pinned map is governed by its bpffs file mode only, and root owns the pins."""
    probe_caps = subprocess.run([*NO_CAPS, "grep", "^CapEff", "/proc/self/status"],
                                capture_output=True, text=True, check=True).stdout
    assert int(probe_caps.split()[1], 16) == 0
    with Connector(unique_comm(), opened=2, refused=1) as proc:
        result = subprocess.run([*NO_CAPS, *TCPMON, "dump", "--json", "--pin-dir", pin_dir],
                                capture_output=True, text=True, timeout=60)
    assert "Traceback" not in result.stderr
    with open("/proc/sys/kernel/unprivileged_bpf_disabled") as f:
        restricted = f.read().strip() != "0"
    if restricted and not _kernel_at_least(6, 5):
        assert result.returncode != 0 and result.stdout == ""
        assert result.stderr.count("\n") == 1 and "CAP_BPF" in result.stderr, result.stderr
    else:
        assert result.returncode == 0, result.stderr
        entries = [entry for entry in json.loads(result.stdout) if entry["pid"] == proc.pid]
        assert entries == [{"pid": proc.pid, "comm": proc.comm.decode(), "connects": 3}]


def test_dump_without_any_capability_or_pin_access_fails_in_one_line(pin_dir, staged_install):
    """As user nobody, which may not enter the checkout or the test venv: the staged install, from /."""
    result = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *NO_CAPS[1:],
                             str(staged_install.tcpmon), "dump", "--pin-dir", pin_dir],
                            capture_output=True, text=True, timeout=60, cwd="/")
    assert result.returncode != 0 and result.stdout == ""
    assert "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("tcpmon: "), result.stderr
    assert pin_dir in result.stderr
    assert "CAP_BPF" in result.stderr or "file mode" in result.stderr, result.stderr


# --- bounded time and a bounded number of connections ---------------------------------------------

def _closed_within(sock, limit, keep_sending=None):
    """Seconds until the server closed `sock` (EOF or reset), or None if still open after `limit`;
    `keep_sending` (bytes) goes out every 0.2 s meanwhile, as a trickling client would."""
    started = time.monotonic()
    sock.settimeout(0.2)
    while time.monotonic() - started < limit:
        try:
            if not sock.recv(65536):
                return time.monotonic() - started
        except socket.timeout:
            pass
        except (ConnectionResetError, BrokenPipeError):
            return time.monotonic() - started
        if keep_sending:
            try:
                sock.sendall(keep_sending)
            except (ConnectionResetError, BrokenPipeError):
                return time.monotonic() - started
    return None


HOSTILE_OPENINGS = {
    "silent": (b"", None),
    "partial request line": (b"GET /metr", None),
    "partial headers": (b"GET /metrics HTTP/1.1\r\nHost: t\r\n", None),
    "a header a byte at a time": (b"GET /metrics HTTP/1.1\r\nX-Slow: ", b"a"),
    "a body a byte at a time": (b"POST /metrics HTTP/1.1\r\nHost: t\r\nContent-Length: 100000\r\n\r\n", b"x"),
}


@pytest.fixture(scope="module")
def quick_timeout_exporter(pin_dir):
    server = Exporter(pin_dir, "--read-timeout", "1")
    yield server
    server.stop()


@pytest.mark.parametrize("kind", HOSTILE_OPENINGS)
@pytest.mark.parametrize("port_name", ["metrics", "health"])
def test_a_connection_without_a_whole_request_is_closed_after_the_read_timeout(quick_timeout_exporter, kind,
                                                                                 port_name):
    opening, trickle = HOSTILE_OPENINGS[kind]
    server = quick_timeout_exporter
    port = server.metrics_port if port_name == "metrics" else server.health_port
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(opening)
        closed = _closed_within(sock, 10, keep_sending=trickle)
    assert closed is not None, f"{kind}: still open 10 s after --read-timeout 1"
    assert closed >= 0.5, f"{kind}: closed after {closed:.2f} s, before the read timeout"


def test_an_idle_kept_alive_connection_is_closed_after_the_read_timeout(quick_timeout_exporter):
    with open_idle_keepalive(quick_timeout_exporter.metrics_port) as sock:
        assert _closed_within(sock, 10) is not None


def test_the_default_read_timeout_lets_a_slow_request_finish(exporter):
    """The control: at the default 10 s a request sent over 2 s is answered, not cut off."""
    with socket.create_connection(("127.0.0.1", exporter.health_port), timeout=10) as sock:
        for piece in (b"GET /liv", b"eness HTTP/1.1\r\n", b"Host: t\r\n", b"\r\n"):
            sock.sendall(piece)
            time.sleep(0.5)
        head, body = read_response(sock)
    assert head.startswith(b"HTTP/1.1 200") and body == b"alive\n"


def test_connections_past_the_cap_are_closed_at_once_and_health_keeps_its_own(pin_dir):
    server = Exporter(pin_dir, "--max-connections", "5")
    try:
        with ExitStack() as stack:
            held = [stack.enter_context(open_silent(server.metrics_port)) for _ in range(5)]
            time.sleep(0.3)
            extra = stack.enter_context(open_silent(server.metrics_port))
            closed = _closed_within(extra, 5)
            assert closed is not None, "the sixth connection was kept waiting"
            # the health port has slots of its own
            assert http_get(server.health + "/readiness", timeout=5)[0] == 200
            for sock in held:
                sock.close()
            time.sleep(0.3)
            assert server.scrape()   # slots free again: served
    finally:
        assert server.stop() == 0
    log = server.proc.stdout.read()
    assert re.search(r"closed \d+ new connections on port %d: it holds 5" % server.metrics_port, log), log
    assert "Traceback" not in log
