"""What `tcpmon serve` is configured with, importable without gevent or gunicorn (the CLI's
parser reads it for every command)."""

READ_TIMEOUT = 10.0      # seconds for a whole request, from accept or the previous response
MAX_CONNECTIONS = 1024   # per port and per worker
THREADS = 4              # native threads per worker: map reads, rendering, gzip


def split_addr(addr, flag):
    """'0.0.0.0:9090' or '[::]:9090' -> ('0.0.0.0', 9090); a clear error for anything else."""
    host, sep, port = addr.rpartition(":")
    if not sep or not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
        raise ValueError(f"{flag} '{addr}' is not HOST:PORT with a port from 1 to 65535 (e.g. 0.0.0.0:9090)")
    return host.strip("[]") or "0.0.0.0", int(port)
