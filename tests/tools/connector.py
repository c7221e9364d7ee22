"""A test process with a chosen comm that makes known TCP connect attempts in its own netns.

Run as `unshare -n python connector.py --comm NAME --open N --closed M [--threads T]`.
It brings loopback up (pyroute2), listens on 127.0.0.1, makes N connects to the
listener and M to a closed port, and prints one JSON line: its pid, its comm and
the namespace's /proc/net/snmp Tcp ActiveOpens delta (every connect that sent a
SYN, refused ones included).  Then it waits for a line on stdin before exiting,
so the test can scrape while it is alive.
"""
import argparse
import ctypes
import json
import os
import socket
import sys
import threading

from pyroute2 import IPRoute

PR_SET_NAME = 15


def set_comm(name):
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_NAME, ctypes.c_char_p(name), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NAME)")


def active_opens():
    with open("/proc/net/snmp") as f:
        rows = [line.split() for line in f if line.startswith("Tcp:")]
    header, values = rows[0], rows[1]
    return int(values[header.index("ActiveOpens")])


def loopback_up():
    with IPRoute() as ipr:
        ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")


def connect_all(port_open, port_closed, opened, refused):
    for _ in range(opened):
        with socket.create_connection(("127.0.0.1", port_open)):
            pass
    for _ in range(refused):
        s = socket.socket()
        try:
            if s.connect_ex(("127.0.0.1", port_closed)) == 0:
                raise SystemExit("the closed port accepted a connection")
        finally:
            s.close()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--comm", required=True, help="raw comm; \\xNN escapes allowed")
    parser.add_argument("--open", type=int, default=0)
    parser.add_argument("--closed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    loopback_up()
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4096)
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))  # bound, never listening: connects get RST
    before = active_opens()
    set_comm(args.comm.encode("latin-1").decode("unicode_escape").encode("latin-1"))
    workers = [threading.Thread(target=connect_all, args=(listener.getsockname()[1], closed.getsockname()[1],
                                                          args.open, args.closed))
               for _ in range(args.threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    with open("/proc/self/comm", "rb") as f:
        comm = f.read()[:-1]  # the kernel appends exactly one newline
    print(json.dumps({"pid": os.getpid(), "comm_hex": comm.hex(),
                      "active_opens": active_opens() - before}), flush=True)
    sys.stdin.readline()


if __name__ == "__main__":
    main()
