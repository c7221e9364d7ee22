"""The scrape baseline: an exporter as tcpmon's predecessor (and most hand-written BPF
exporters) did it, written to be reasonable, not slow.

On every scrape it walks the per-PID map key by key with bpf() through ctypes
(GET_NEXT_KEY + LOOKUP_ELEM, as bcc's table iteration does), reads
/proc/<pid>/comm for each PID, sets one prometheus-client Gauge child per
(pid, comm), and serves generate_latest() of the default registry (which, like
tcpmon's output, also carries the process, platform and GC metrics) from
prometheus-client's own threaded WSGI server.

A PID without /proc entry is exported with comm="unknown": in the 100k map-only
benchmark no key is a live process, and the baseline must still export every
series (its open() of a missing file is cheaper than a real read, which favours it).

    python benchmarks/old_agent.py --pin-dir DIR --port PORT
"""
import argparse
import os
import sys
import threading
from wsgiref.simple_server import make_server

from prometheus_client import REGISTRY, Gauge, make_wsgi_app

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import CtypesPidMap  # noqa: E402

try:  # what prometheus_client.start_http_server serves with
    from prometheus_client.exposition import ThreadingWSGIServer, _SilentHandler
except ImportError:  # pragma: no cover
    from wsgiref.simple_server import WSGIRequestHandler as _SilentHandler, WSGIServer as ThreadingWSGIServer

CONNECTS = Gauge("tcp_connects_by_pid", "Number of tcp_connect() calls observed per PID", ["pid", "comm"])


def read_comm(pid):
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().rstrip("\n")
    except OSError:
        return "unknown"


class Agent:
    def __init__(self, pin_dir):
        self.map = CtypesPidMap(os.path.join(pin_dir, "connects"))
        self.lock = threading.Lock()
        self.metrics = make_wsgi_app(REGISTRY)

    def refresh(self):
        entries = self.map.items()
        CONNECTS.clear()
        for pid, (connects, _) in entries.items():
            CONNECTS.labels(str(pid), read_comm(pid)).set(connects)

    def __call__(self, environ, start_response):
        if environ.get("PATH_INFO") == "/metrics":
            with self.lock:
                self.refresh()
                return self.metrics(environ, start_response)
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"old agent\n"]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--pin-dir", required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    server = make_server("127.0.0.1", args.port, Agent(args.pin_dir), ThreadingWSGIServer,
                         handler_class=_SilentHandler)
    server.serve_forever()


if __name__ == "__main__":
    main()
