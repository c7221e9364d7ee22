"""gunicorn runs the exporter: gevent workers, each with its own Collector.

A connection is a greenlet, so one that is idle, half-sent or trickling costs a
few kilobytes and no thread.  Each port of a worker holds at most
`max_connections` of them; one more is closed as it arrives.  A connection must
deliver a complete request (and its TLS handshake) within `read_timeout`
seconds of its accept or of its previous response, or it is closed.  The map
read, rendering, gzip and bcrypt run in native threads (the Cython reader and
renderer release the GIL), so the event loop keeps serving health meanwhile; a
scrape also uses a second one, a SideThread, for its Python parts.
docs/ARCHITECTURE.md says why this design.
"""
import ctypes
import logging
import math
import resource
import signal
import socket
import time
from functools import partial

import gevent
from gevent import monkey
from gevent.pool import Group
from gevent.server import StreamServer
from gunicorn.app.base import BaseApplication
from gunicorn.arbiter import Arbiter
from gunicorn.workers.base_async import AsyncWorker
from gunicorn.workers.ggevent import GeventWorker

from tcpmon import exposition, web
from tcpmon.app import make_app
from tcpmon.attribution import Attributor, Config
from tcpmon.collector import Collector
from tcpmon.serve_options import MAX_CONNECTIONS, READ_TIMEOUT, THREADS, split_addr
from tcpmon.sidethread import SideThread
from tcpmon.workers import PerWorker, WorkerSlots

log = logging.getLogger("tcpmon.server")

REFUSAL_LOG_INTERVAL = 10.0
RELOAD_POLL = 1.0           # seconds between checks of the web config's files
_TLS_HANDSHAKE = 0x16       # first byte of a TLS record that starts a handshake
_PLAIN_HTTP_ON_TLS = (b"HTTP/1.0 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\n"
                      b"Connection: close\r\n\r\nClient sent an HTTP request to an HTTPS server.\n")

_SETTINGS = {
    "timeout": 30,
    "graceful_timeout": 10,
    "limit_request_line": 2048,
    "limit_request_fields": 32,
    "limit_request_field_size": 4096,
    "worker_tmp_dir": "/dev/shm",   # works with a read-only root filesystem
    "proc_name": "tcpmon",
    "accesslog": None,
    "errorlog": "-",
    "control_socket_disable": True,  # gunicorn >= 24; nothing may be written to a read-only root
}


# glibc's mallopt parameters; a scrape allocates and frees the same few large buffers (the body,
# up to 5 MB at 100k PIDs) every time.  glibc's defaults hand big ones back to the kernel (mmap,
# heap trimming), so each scrape paid a page fault and a zeroed page for every 4 KB of them.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_KEEP_BELOW = 64 << 20


def keep_freed_memory():
    """Let malloc keep freed buffers below 64 MB for the next scrape (no-op off glibc)."""
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    mallopt(_M_MMAP_THRESHOLD, _KEEP_BELOW)
    mallopt(_M_TRIM_THRESHOLD, 2 * _KEEP_BELOW)


def raise_fd_limit():
    """Soft RLIMIT_NOFILE up to the hard one (what Go does at start): each connection is an fd."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass


class ConnectionCap:
    """StreamServer's spawn for one port: at most `limit` connections at once; one past it is
    closed as it arrives (and counted, logged at most every REFUSAL_LOG_INTERVAL seconds)."""

    def __init__(self, port, limit):
        self.port, self.limit = port, limit
        self.group = Group()
        self.refused = 0
        self._unlogged, self._logged_at = 0, 0.0

    def __call__(self, run, handle, close, args):
        if len(self.group) >= self.limit:
            close(*args)
            self._refuse()
            return None
        return self.group.spawn(run, handle, close, args)

    def _refuse(self):
        self.refused += 1
        self._unlogged += 1
        now = time.monotonic()
        if now - self._logged_at >= REFUSAL_LOG_INTERVAL:
            log.warning("closed %d new connections on port %d: it holds %d, the limit (--max-connections)",
                        self._unlogged, self.port, self.limit)
            self._unlogged, self._logged_at = 0, now


class _ClientTroubleFilter(logging.Filter):
    """A client that stops reading our response is the client's doing: one line, no traceback."""

    def filter(self, record):
        if record.exc_info and isinstance(record.exc_info[1], TimeoutError):
            record.msg, record.args, record.exc_info = "closed a connection that stopped reading", (), None
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


class ExporterWorker(GeventWorker):
    """gunicorn's gevent worker with a capped StreamServer per port, TLS on the ports that have it,
    and the request-read bound on the first request as on every later one."""
    exporter = None  # the Exporter, set on the subclass it makes

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # In the arbiter, before the fork: which shared slot this worker's counters go to.
        slots = self.exporter.slots
        self.slot_index = slots.reserve(self) if slots is not None else None

    def init_process(self):
        self.exporter.slot_index = self.slot_index
        self.log.error_log.addFilter(_ClientTroubleFilter())
        self.connections = {}     # greenlet -> [socket, busy]
        super().init_process()

    def init_signals(self):
        super().init_signals()
        signal.signal(signal.SIGHUP, lambda sig, frame: gevent.spawn(self.exporter.reload_web, "SIGHUP"))

    def timeout_ctx(self):
        return gevent.Timeout(self.exporter.read_timeout, False)

    def handle_request(self, listener_name, req, sock, addr):
        state = self.connections.get(gevent.getcurrent())
        if state:
            state[1] = True
        try:
            return super().handle_request(listener_name, req, sock, addr)
        finally:
            if state:
                state[1] = False

    def serve_connection(self, listener, tls, client, addr):
        """One connection, in its own greenlet: TLS handshake if the port has TLS, then HTTP/1.1."""
        me = gevent.getcurrent()
        client.settimeout(self.exporter.read_timeout)  # every recv and send is bounded too
        self.connections[me] = [client, False]
        try:
            if tls is not None:
                client = self._handshake(tls, client, addr)
                if client is None:
                    return
                self.connections[me][0] = client
            AsyncWorker.handle(self, listener, client, addr)
        finally:
            self.connections.pop(me, None)

    def _handshake(self, tls, client, addr):
        """The TLS socket, or None (after answering plain HTTP as Go's servers do) when the client
        sent no valid handshake within the read timeout."""
        with gevent.Timeout(self.exporter.read_timeout, False):
            try:
                first = client.recv(1, socket.MSG_PEEK)
                if not first:
                    return None
                if first[0] != _TLS_HANDSHAKE:
                    self._refuse_plain_http(client)
                    return None
                return tls.handshake(client)
            except (OSError, web.WebConfigError) as exc:
                self.log.debug("TLS handshake from %s failed: %s", addr, exc)
                return None
        self.log.debug("TLS handshake from %s timed out", addr)
        return None

    @staticmethod
    def _refuse_plain_http(client):
        """Go's answer, then close the way Go does: write side first, then a short drain, so the
        unread request does not turn the close into a reset that loses the answer."""
        client.sendall(_PLAIN_HTTP_ON_TLS)
        client.shutdown(socket.SHUT_WR)
        client.settimeout(0.5)
        try:
            for _ in range(16):
                if not client.recv(4096):
                    break
        except OSError:
            pass

    def run(self):
        exporter = self.exporter
        caps, servers = [], []
        for listener in self.sockets:
            port = listener.getsockname()[1]
            cap = ConnectionCap(port, exporter.max_connections)
            server = StreamServer(listener, handle=partial(self.serve_connection, listener, exporter.tls_for(port)),
                                  spawn=cap)
            if self.cfg.workers > 1:
                server.max_accept = 1
            server.start()
            caps.append(cap)
            servers.append(server)
        watcher = gevent.spawn(exporter.watch_web)
        while self.alive:
            self.notify()
            exporter.publish()
            gevent.sleep(1.0)
        watcher.kill(block=False)
        self._drain(servers, caps)

    def _drain(self, servers, caps):
        """Stop accepting, close idle connections now, give busy ones graceful_timeout."""
        for server in servers:
            server.close()
        for sock, busy in list(self.connections.values()):
            if not busy:
                try:
                    sock.shutdown(socket.SHUT_RDWR)   # its pending read ends: the greenlet closes it
                except OSError:
                    pass
        deadline = time.monotonic() + self.cfg.graceful_timeout
        while any(len(cap.group) for cap in caps) and time.monotonic() < deadline:
            self.notify()
            gevent.sleep(0.1)
        for cap in caps:
            cap.group.kill(block=True, timeout=1)


class _OneAtATime:
    """An exposition.Renderer behind a real lock: its caches and the attributor are not
    thread-safe.  grouped_parts() never waits for it, since the event loop may be the caller:
    while another render holds it, it returns None, and render_parts() makes them itself."""

    def __init__(self, renderer, lock):
        self._renderer, self._lock = renderer, lock

    def render_parts(self, snapshot, **kwargs):
        with self._lock:
            return self._renderer.render_parts(snapshot, **kwargs)

    def grouped_parts(self, snapshot, **kwargs):
        if not self._lock.acquire(False):
            return None
        try:
            return self._renderer.grouped_parts(snapshot, **kwargs)
        finally:
            self._lock.release()


class _Arbiter(Arbiter):
    """SIGHUP re-reads the web config in the workers instead of restarting them."""

    def handle_hup(self):
        self.log.info("SIGHUP: re-reading the web config")
        self.kill_workers(signal.SIGHUP)


class Exporter(BaseApplication):
    def __init__(self, pin_dir, metrics_addr, health_addr, workers=1, threads=THREADS,
                 log_level="info", read_mode="auto", read_timeout=READ_TIMEOUT,
                 max_connections=MAX_CONNECTIONS, web_config_file=None, health_tls=False, networks=(),
                 attribution=None):
        self.pin_dir = pin_dir
        self.read_mode = read_mode
        self.threads = threads
        self.read_timeout = read_timeout
        self.max_connections = max_connections
        self.networks = networks
        self.attribution = attribution  # attribution.Config; None: outcome families by comm alone
        self.metrics_port = split_addr(metrics_addr, "--metrics-addr")[1]
        self.health_port = split_addr(health_addr, "--health-addr")[1]
        self.web_config_file = web_config_file
        self.health_tls = health_tls
        if web_config_file:
            web.load(web_config_file)   # refused here, before any port is bound, when invalid
        self.web = None
        self.slots = WorkerSlots(workers) if workers > 1 else None
        self.slot_index = None      # set in each worker after the fork
        self.collector = self.per_worker = None
        same_port = self.metrics_port == self.health_port
        worker = type("ExporterWorker", (ExporterWorker,), {"exporter": self})
        binds = [metrics_addr] if same_port else [metrics_addr, health_addr]
        self.options = dict(_SETTINGS, bind=binds, workers=workers, loglevel=log_level, worker_class=worker,
                            keepalive=max(1, math.ceil(read_timeout)), worker_connections=max_connections)
        raise_fd_limit()
        keep_freed_memory()   # in the arbiter: the workers inherit it across the fork
        super().__init__()

    def run(self):
        try:
            _Arbiter(self).run()
        except RuntimeError as exc:
            raise SystemExit(f"tcpmon: {exc}") from None

    def load_config(self):
        for key, value in self.options.items():
            if key in self.cfg.settings:  # older gunicorn lacks the newest settings
                self.cfg.set(key, value)

    def load(self):
        # Runs in each worker after fork (and gevent's patching): map fds are never shared.
        from gevent.threadpool import ThreadPool
        pool = ThreadPool(self.threads)

        def offload(fn, *args):
            return pool.apply(fn, args)

        def start(fn, *args):
            return pool.spawn(fn, *args)   # its result() waits in this greenlet, not the event loop

        if self.web_config_file:
            self.web = web.WebState(self.web_config_file, run_bcrypt=ThreadPool(1).apply)
        if self.slots is not None:
            self.per_worker = PerWorker(self.slots, self.slot_index)
        # While a native thread reads the connects map outside the GIL, the small maps and the
        # grouped families are done by the event loop's thread itself while that is cheap, or
        # by a real thread beside it (tcpmon.collector says when).
        allocate_lock = monkey.get_original("_thread", "allocate_lock")
        beside = SideThread(monkey.get_original("_thread", "start_new_thread"), allocate_lock).start
        self.collector = Collector(self.pin_dir, read_mode=self.read_mode, offload=offload, start=start,
                                   beside=beside, process_metrics=self.per_worker is None,
                                   allocate_lock=allocate_lock)
        attributor = Attributor(self.attribution or Config(labels=()))
        renderer = _OneAtATime(exposition.Renderer(attributor, networks=self.networks), allocate_lock())
        return make_app(self.collector, self.metrics_port, self.health_port, renderer=renderer,
                        notes=lambda: [attributor.problem] if attributor.problem else [], offload=offload,
                        web=self.web, per_worker=self.per_worker)

    def publish(self):
        """This worker's counters into its slot (with --workers > 1), for the others' scrapes."""
        if self.per_worker is not None and self.collector is not None:
            self.per_worker.publish(*self.collector.per_process_counters())

    def tls_for(self, port):
        """The WebState that does this port's TLS, or None for plain HTTP."""
        if self.web is None or not self.web.tls_enabled:
            return None
        if port == self.metrics_port or self.health_tls:
            return self.web
        return None

    def reload_web(self, why):
        if self.web is not None:
            self.web.reload(why)

    def watch_web(self):
        """Re-reads the web config when it or a file it names changes (certificates rotate)."""
        if self.web is None:
            return
        while True:
            gevent.sleep(RELOAD_POLL)
            if self.web.changed():
                self.web.reload("a file changed")
