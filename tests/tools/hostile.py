"""Hostile HTTP clients that hold connections to loopback ports and reconnect whenever the server
closes one, so the pressure holds.  One thread, non-blocking sockets, one selector.

Kinds, spread evenly over --count connections per port:
  idle      connects and sends nothing
  line      a partial request line ("GET /metr")
  headers   a request line and part of the headers, then nothing
  trickle   a whole head announcing a body, then the body one byte a second

Runs for --seconds, then prints one JSON line: per port and kind, connections opened, closed by
the server (EOF or reset), refused or failed connects, and how many were open at the end.
Bounded: a fixed number of sockets, a fixed duration, loopback only.
"""
import argparse
import errno
import json
import resource
import selectors
import socket
import time

KINDS = ("idle", "line", "headers", "trickle")
OPENERS = {
    "idle": b"",
    "line": b"GET /metr",
    "headers": b"GET /metrics HTTP/1.1\r\nHost: hostile\r\nUser-Agent: slow",
    "trickle": b"POST /metrics HTTP/1.1\r\nHost: hostile\r\nContent-Type: text/plain\r\nContent-Length: 100000\r\n\r\n",
}


class Conn:
    def __init__(self, port, kind):
        self.port, self.kind = port, kind
        self.sock = None
        self.connected = False
        self.next_byte = 0.0


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--ports", type=int, nargs="+", required=True)
    parser.add_argument("--count", type=int, default=500, help="connections per port")
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args()
    assert args.host.startswith("127.") or args.host == "::1", "loopback only"
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    stats = {str(port): {kind: {"opened": 0, "closed_by_server": 0, "connect_failed": 0, "open_at_end": 0}
                         for kind in KINDS} for port in args.ports}
    sel = selectors.DefaultSelector()
    conns = [Conn(port, KINDS[i % len(KINDS)]) for port in args.ports for i in range(args.count)]

    def stat(conn, key):
        stats[str(conn.port)][conn.kind][key] += 1

    def drop(conn):
        if conn.sock is not None:
            try:
                sel.unregister(conn.sock)
            except (KeyError, ValueError):
                pass
            conn.sock.close()
        conn.sock, conn.connected = None, False

    def start(conn):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        err = sock.connect_ex((args.host, conn.port))
        if err not in (0, errno.EINPROGRESS):
            sock.close()
            stat(conn, "connect_failed")
            return
        conn.sock = sock
        sel.register(sock, selectors.EVENT_WRITE, conn)

    for conn in conns:
        start(conn)
    deadline = time.monotonic() + args.seconds
    while time.monotonic() < deadline:
        now = time.monotonic()
        for key, events in sel.select(timeout=0.2):
            conn = key.data
            if not conn.connected:
                err = conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    stat(conn, "connect_failed")
                    drop(conn)
                    continue
                conn.connected = True
                stat(conn, "opened")
                try:
                    conn.sock.send(OPENERS[conn.kind])
                except OSError:
                    stat(conn, "closed_by_server")
                    drop(conn)
                    continue
                conn.next_byte = now + 1.0
                sel.modify(conn.sock, selectors.EVENT_READ, conn)
                continue
            try:
                data = conn.sock.recv(65536)
            except OSError:
                data = b""
            if not data:   # the server closed it (or answered and closed): come back at once
                stat(conn, "closed_by_server")
                drop(conn)
        for conn in conns:
            if conn.sock is None:
                start(conn)
            elif conn.connected and conn.kind == "trickle" and now >= conn.next_byte:
                try:
                    conn.sock.send(b"x")
                except OSError:
                    stat(conn, "closed_by_server")
                    drop(conn)
                    continue
                conn.next_byte = now + 1.0
    for conn in conns:
        if conn.sock is not None and conn.connected:
            stat(conn, "open_at_end")
        drop(conn)
    print(json.dumps(stats), flush=True)


if __name__ == "__main__":
    main()
