"""gunicorn runs the exporter: gthread workers, each with its own Collector."""

from gunicorn.app.base import BaseApplication

from tcpmon.app import make_app
from tcpmon.collector import Collector


# Small requests only, slow or idle clients can't hold a thread (gthread parks
# them in its poller), and SIGTERM drains in-flight scrapes.
_SETTINGS = {
    "worker_class": "gthread",
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


class Exporter(BaseApplication):
    def __init__(self, pin_dir, metrics_addr, health_addr, workers=1, threads=8,
                 log_level="info", read_mode="auto"):
        self.pin_dir = pin_dir
        self.read_mode = read_mode
        self.metrics_port = split_addr(metrics_addr, "--metrics-addr")[1]
        self.health_port = split_addr(health_addr, "--health-addr")[1]
        binds = [metrics_addr] if metrics_addr == health_addr else [metrics_addr, health_addr]
        self.options = dict(_SETTINGS, bind=binds, workers=workers, threads=threads, loglevel=log_level)
        super().__init__()

    def load_config(self):
        for key, value in self.options.items():
            if key in self.cfg.settings:  # older gunicorn lacks the newest settings
                self.cfg.set(key, value)

    def load(self):
        # Runs in each worker after fork: map fds are never shared between workers.
        collector = Collector(self.pin_dir, read_mode=self.read_mode)
        return make_app(collector, self.metrics_port, self.health_port)
