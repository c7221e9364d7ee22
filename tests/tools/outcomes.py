"""A test process that ends connects in every known way, in a network namespace of its own.

Run as `unshare -n python outcomes.py --comm NAME [--success N] [--refused N] ...`.  It brings
loopback up, sets net.ipv4.tcp_syn_retries=1 in this namespace (a dropped SYN then times out
after about 3 s), installs nft rules on its own loopback, and makes:

  --success N      connects to a listener (IPv4), counted by the listener's accepts
  --success6 N     the same over IPv6 (::1)
  --mapped N       IPv6 sockets connecting to ::ffff:127.0.0.1 (v4-mapped)
  --refused N      connects to a bound port that does not listen (RST)
  --timeout N      connects whose SYNs are dropped, in parallel, until ETIMEDOUT
  --unreachable N  SYNs answered with ICMP host-unreachable
  --other N        SYNs answered with ICMP protocol-unreachable (ENOPROTOOPT)
  --aborted N      non-blocking connects to the dropping port, closed before an answer
  --delayed N      connects whose first SYN is dropped: they complete on the retransmission
                   after the initial RTO (~1 s); each is timed around connect()

Then it prints one JSON line (pid, comm, the namespace's ActiveOpens delta, accepts, errnos
seen, the delayed connects' durations) and waits for a line on stdin before exiting.
"""
import argparse
import ctypes
import errno
import json
import os
import socket
import subprocess
import sys
import threading
import time

from pyroute2 import IPRoute

PR_SET_NAME = 15
PORTS = {"listen": 7001, "refused": 7002, "drop": 7003, "unreachable": 7004, "other": 7005, "delay": 7006}

NFT_RULES = f"""
table inet tcpmon_outcomes {{
  set delayed {{ type inet_service; flags dynamic, timeout; timeout 1m; }}
  chain output {{
    type filter hook output priority 0; policy accept;
    tcp flags & (syn | ack) != syn accept
    tcp dport {PORTS['drop']} drop
    meta nfproto ipv4 tcp dport {PORTS['unreachable']} reject with icmp type host-unreachable
    meta nfproto ipv4 tcp dport {PORTS['other']} reject with icmp type prot-unreachable
    tcp dport {PORTS['delay']} tcp sport @delayed accept
    tcp dport {PORTS['delay']} add @delayed {{ tcp sport }} drop
  }}
}}
"""


def set_comm(name):
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_NAME, ctypes.c_char_p(name), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NAME)")


def active_opens():
    with open("/proc/net/snmp") as f:
        rows = [line.split() for line in f if line.startswith("Tcp:")]
    return int(rows[1][rows[0].index("ActiveOpens")])


def prepare_namespace():
    with IPRoute() as ipr:
        ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
    with open("/proc/sys/net/ipv4/tcp_syn_retries", "w") as f:
        f.write("1")
    subprocess.run(["nft", "-f", "-"], input=NFT_RULES, text=True, check=True)


class Listener:
    """Accepts on 127.0.0.1 and ::1 (same port) and counts what it accepted."""

    def __init__(self, port):
        self.accepted = 0
        self.lock = threading.Lock()
        self.sockets = []
        for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::")):
            sock = socket.socket(family)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((host, port))
            sock.listen(4096)
            self.sockets.append(sock)
            threading.Thread(target=self._accept, args=(sock,), daemon=True).start()

    def _accept(self, sock):
        while True:
            conn, _ = sock.accept()
            conn.close()
            with self.lock:
                self.accepted += 1


_errors_lock = threading.Lock()


def connect(family, address, errors):
    """One blocking connect; `errors` counts how connect() ended, by errno name ("ok")."""
    sock = socket.socket(family)
    try:
        err = sock.connect_ex(address)
    finally:
        sock.close()
    name = errno.errorcode.get(err, str(err)) if err else "ok"
    with _errors_lock:
        errors[name] = errors.get(name, 0) + 1


def in_parallel(count, target, *args):
    threads = [threading.Thread(target=target, args=args) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def aborted(count):
    for _ in range(count):
        sock = socket.socket()
        sock.setblocking(False)
        if sock.connect_ex(("127.0.0.1", PORTS["drop"])) != errno.EINPROGRESS:
            raise SystemExit("a connect to the dropping port did not stay in progress")
        sock.close()


def delayed(count):
    durations = []
    for _ in range(count):
        started = time.monotonic()
        with socket.create_connection(("127.0.0.1", PORTS["delay"]), timeout=10):
            durations.append(time.monotonic() - started)
    return durations


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--comm", required=True)
    for name in ("success", "success6", "mapped", "refused", "timeout", "unreachable", "other",
                 "aborted", "delayed"):
        parser.add_argument(f"--{name}", type=int, default=0)
    args = parser.parse_args()
    prepare_namespace()
    listener = Listener(PORTS["listen"])
    delay_listener = Listener(PORTS["delay"])
    closed = socket.socket()
    closed.bind(("127.0.0.1", PORTS["refused"]))  # bound, never listening: connects get RST
    errors = {}
    before = active_opens()
    set_comm(args.comm.encode())
    for _ in range(args.success):
        connect(socket.AF_INET, ("127.0.0.1", PORTS["listen"]), errors)
    for _ in range(args.success6):
        connect(socket.AF_INET6, ("::1", PORTS["listen"]), errors)
    for _ in range(args.mapped):
        connect(socket.AF_INET6, ("::ffff:127.0.0.1", PORTS["listen"]), errors)
    for _ in range(args.refused):
        connect(socket.AF_INET, ("127.0.0.1", PORTS["refused"]), errors)
    for _ in range(args.unreachable):
        connect(socket.AF_INET, ("127.0.0.1", PORTS["unreachable"]), errors)
    for _ in range(args.other):
        connect(socket.AF_INET, ("127.0.0.1", PORTS["other"]), errors)
    aborted(args.aborted)
    durations = delayed(args.delayed)
    in_parallel(args.timeout, connect, socket.AF_INET, ("127.0.0.1", PORTS["drop"]), errors)
    time.sleep(0.2)  # the listeners' accept threads catch up
    report = {"pid": os.getpid(), "active_opens": active_opens() - before,
              "accepted": listener.accepted, "delayed_accepted": delay_listener.accepted,
              "errors": errors, "delayed_seconds": durations}
    print(json.dumps(report), flush=True)
    sys.stdin.readline()


if __name__ == "__main__":
    main()
