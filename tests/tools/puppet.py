"""A test process in its own netns that connects when told to, for `tcpmon top`'s rates.

Run as `unshare -n python puppet.py --comm NAME [--outcomes]` (\\xNN escapes allowed in
NAME).  It brings loopback up, listens on 127.0.0.1, sets its comm, prints one JSON line
(pid, comm_hex) and then obeys one command per stdin line, answering each with one line:
  connect N        N connects to the listener              -> "ok N"
  pace R [KIND]    R connects a second (of KIND) until stop -> "ok"
  stop             end the pacing                          -> "ok N" (connects it made)
  exec NAME        exec itself (same PID) and take NAME    -> the JSON line again
  end KIND N       N connects that end as KIND             -> "ok N ERRNO=COUNT..." (how
                   connect() returned; delayed: the seconds each took, as timed around it)
KIND (with --outcomes, which sets up this namespace as tests/tools/outcomes.py does:
tcp_syn_retries=1 and its nft rules) is success, refused, timeout (in parallel, ~3 s),
unreachable, other, aborted, or delayed (the first SYN dropped: done after ~1 s).
EOF on stdin ends it.
"""
import argparse
import ctypes
import json
import os
import socket
import sys
import threading
import time

from pyroute2 import IPRoute

import outcomes

PR_SET_NAME = 15


def set_comm(name):
    raw = name.encode("latin-1").decode("unicode_escape").encode("latin-1")
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_NAME, ctypes.c_char_p(raw), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NAME)")


def loopback_up():
    with IPRoute() as ipr:
        ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")


class Pacer(threading.Thread):
    """Connects on a fixed schedule (connect i at start + i/rate), so its average rate is `rate`."""

    def __init__(self, connect, rate):
        super().__init__(daemon=True)
        self.connect, self.rate = connect, rate
        self.done = threading.Event()
        self.made = 0

    def run(self):
        start = time.monotonic()
        while not self.done.is_set():
            wait = start + self.made / self.rate - time.monotonic()
            if wait > 0 and self.done.wait(wait):
                break
            self.connect()
            self.made += 1


class Ends:
    """Connects that end in a chosen way, on the ports and nft rules of tests/tools/outcomes.py."""

    def __init__(self, succeed):
        outcomes.prepare_namespace()
        self.delay_listener = outcomes.Listener(outcomes.PORTS["delay"])
        self.closed = socket.socket()
        self.closed.bind(("127.0.0.1", outcomes.PORTS["refused"]))  # bound, never listening: RST
        self.succeed = succeed

    def make(self, kind, n):
        """N connects that end as `kind`: how connect() returned ("ok" or the errno's name, and
        how often), or for delayed ones the seconds each took."""
        errors = {}
        if kind == "success":
            for _ in range(n):
                self.succeed()
            errors["ok"] = n
        elif kind == "timeout":
            outcomes.in_parallel(n, outcomes.connect, socket.AF_INET, ("127.0.0.1", outcomes.PORTS["drop"]), errors)
        elif kind == "aborted":
            outcomes.aborted(n)  # closed while in progress (it exits unless connect() said so)
            errors["EINPROGRESS"] = n
        elif kind == "delayed":
            return outcomes.delayed(n)
        elif kind in ("refused", "unreachable", "other"):
            for _ in range(n):
                outcomes.connect(socket.AF_INET, ("127.0.0.1", outcomes.PORTS[kind]), errors)
        else:
            raise SystemExit(f"puppet: unknown outcome {kind!r}")
        return [f"{name}={count}" for name, count in sorted(errors.items())]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--comm", required=True)
    parser.add_argument("--outcomes", action="store_true")
    args = parser.parse_args()
    loopback_up()
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4096)
    port = listener.getsockname()[1]

    def connect():
        with socket.create_connection(("127.0.0.1", port)):
            pass
        listener.accept()[0].close()

    ends = Ends(connect) if args.outcomes else None

    set_comm(args.comm)
    with open("/proc/self/comm", "rb") as f:
        comm = f.read()[:-1]
    print(json.dumps({"pid": os.getpid(), "comm_hex": comm.hex()}), flush=True)
    pacer = None
    for line in sys.stdin:
        command, _, argument = line.strip().partition(" ")
        if command == "connect":
            for _ in range(int(argument)):
                connect()
            print(f"ok {argument}", flush=True)
        elif command == "pace":
            rate, _, kind = argument.partition(" ")
            pacer = Pacer(connect if not kind else lambda: ends.make(kind, 1), float(rate))
            pacer.start()
            print("ok", flush=True)
        elif command == "end":
            kind, n = argument.split()
            took = ends.make(kind, int(n))
            print(" ".join(["ok", n, *map(str, took)]), flush=True)
        elif command == "stop":
            pacer.done.set()
            pacer.join()
            print(f"ok {pacer.made}", flush=True)
        elif command == "exec":
            listener.close()
            os.execv(sys.executable, [sys.executable, __file__, "--comm", argument])
        else:
            raise SystemExit(f"puppet: unknown command {line!r}")


if __name__ == "__main__":
    main()
