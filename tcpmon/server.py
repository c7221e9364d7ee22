"""gunicorn runs the exporter: gthread workers, each with its own Collector.

The health port gets threads of its own, so clients that are slow, silent or
hostile on the metrics port can never starve the kubelet's probes; a request
that stalls half-read gives its thread back after READ_TIMEOUT seconds.
"""
import logging
import socket
import struct
from concurrent.futures import ThreadPoolExecutor

from gunicorn.app.base import BaseApplication
from gunicorn.workers.gthread import ThreadWorker

from tcpmon import exposition
from tcpmon.app import make_app
from tcpmon.attribution import Attributor, Config
from tcpmon.collector import Collector

READ_TIMEOUT = 10
HEALTH_THREADS = 2

_SETTINGS = {
    "keepalive": 5,
    "timeout": 30,
    "graceful_timeout": 10,
    "limit_request_line": 2048,
    "limit_request_fields": 32,
    "limit_request_field_size": 4096,
    "worker_connections": 256,
    "worker_tmp_dir": "/dev/shm",   # works with a read-only root filesystem
    "proc_name": "tcpmon",
    "accesslog": None,
    "errorlog": "-",
    "control_socket_disable": True,  # gunicorn >= 24; nothing may be written to a read-only root
}


def split_addr(addr, flag):
    """'0.0.0.0:9090' or '[::]:9090' -> ('0.0.0.0', 9090); a clear error for anything else."""
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{flag} '{addr}' is not HOST:PORT (e.g. 0.0.0.0:9090)")
    return host.strip("[]") or "0.0.0.0", int(port)


class _PoolPerPort:
    """What gthread calls its thread pool: one pool for the health port, one for the rest."""

    def __init__(self, health_port, threads):
        self.health_port = health_port
        self.health = ThreadPoolExecutor(HEALTH_THREADS, thread_name_prefix="health")
        self.metrics = ThreadPoolExecutor(threads, thread_name_prefix="metrics")

    def submit(self, handle, conn, *args):
        # A blocking recv on this socket now fails after READ_TIMEOUT instead of waiting forever.
        conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", READ_TIMEOUT, 0))
        pool = self.health if conn.server[1] == self.health_port else self.metrics
        return pool.submit(handle, conn, *args)

    def shutdown(self, wait=True, **kwargs):
        self.health.shutdown(wait=wait, **kwargs)
        self.metrics.shutdown(wait=wait, **kwargs)


class _StalledClientFilter(logging.Filter):
    """A request that hit READ_TIMEOUT half-read is the client's doing: one line, no traceback."""

    def filter(self, record):
        if record.exc_info and isinstance(record.exc_info[1], BlockingIOError):
            record.msg, record.args, record.exc_info = (
                f"closed a connection that sent no complete request within {READ_TIMEOUT}s", (), None)
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


class ExporterWorker(ThreadWorker):
    health_port = None  # set on the subclass Exporter makes

    def init_process(self):
        self.log.error_log.addFilter(_StalledClientFilter())
        super().init_process()

    def get_thread_pool(self):
        return _PoolPerPort(self.health_port, self.cfg.threads)


class Exporter(BaseApplication):
    def __init__(self, pin_dir, metrics_addr, health_addr, workers=1, threads=8,
                 log_level="info", read_mode="auto", networks=(), attribution=None):
        self.pin_dir = pin_dir
        self.read_mode = read_mode
        self.networks = networks
        self.attribution = attribution  # attribution.Config; None: outcome families by comm alone
        self.metrics_port = split_addr(metrics_addr, "--metrics-addr")[1]
        self.health_port = split_addr(health_addr, "--health-addr")[1]
        same_port = self.metrics_port == self.health_port
        worker = type("ExporterWorker", (ExporterWorker,), {"health_port": None if same_port else self.health_port})
        binds = [metrics_addr] if same_port else [metrics_addr, health_addr]
        self.options = dict(_SETTINGS, bind=binds, workers=workers, threads=threads, loglevel=log_level,
                            worker_class=worker)
        super().__init__()

    def load_config(self):
        for key, value in self.options.items():
            if key in self.cfg.settings:  # older gunicorn lacks the newest settings
                self.cfg.set(key, value)

    def load(self):
        # Runs in each worker after fork: map fds are never shared between workers.
        collector = Collector(self.pin_dir, read_mode=self.read_mode)
        attributor = Attributor(self.attribution or Config(labels=()))
        renderer = exposition.Renderer(attributor, networks=self.networks)
        return make_app(collector, self.metrics_port, self.health_port, render=renderer.render,
                        notes=lambda: [attributor.problem] if attributor.problem else [])
