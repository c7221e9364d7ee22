"""The attach modes: which programs of bpf/tcpconnect.bpf.c each one loads, and where.

`--attach auto` tries the modes in the order of MODES.  Each mode's programs are
of one link kind, so a kernel that can pin one of its links can pin them all.
"""
from dataclasses import dataclass


@dataclass(frozen=True)
class Program:
    name: str      # the function in bpf/tcpconnect.bpf.c
    section: str   # its SEC(): the loader's contract with the object


@dataclass(frozen=True)
class AttachMode:
    name: str
    connect: Program
    outcome: Program   # None where the connect program also sees the outcome (same hook)
    exit: Program

    def programs(self):
        """connect, outcome, exit, without the outcome a connect program already does."""
        return tuple(p for p in (self.connect, self.outcome, self.exit) if p is not None)


_EXIT_BTF = Program("process_exit_btf", "tp_btf/sched_process_exit")
_EXIT_TP = Program("process_exit", "tracepoint/sched/sched_process_exit")
_OUTCOME_BTF = Program("outcome_tp_btf", "tp_btf/inet_sock_set_state")
_OUTCOME_TP = Program("outcome_tp", "tracepoint/sock/inet_sock_set_state")

MODES = (
    AttachMode("fentry", Program("connect_fentry", "fentry/tcp_connect"), _OUTCOME_BTF, _EXIT_BTF),
    AttachMode("kprobe", Program("connect_kprobe", "kprobe/tcp_connect"), _OUTCOME_TP, _EXIT_TP),
    AttachMode("tp_btf", Program("connect_tp_btf", "tp_btf/inet_sock_set_state"), None, _EXIT_BTF),
    AttachMode("tracepoint", Program("connect_tp", "tracepoint/sock/inet_sock_set_state"), None, _EXIT_TP),
)
BY_NAME = {mode.name: mode for mode in MODES}
MODE_NAMES = tuple(BY_NAME)
PROGRAMS = tuple({p.name: p for mode in MODES for p in mode.programs()}.values())
_MODE_OF_CONNECT = {mode.connect.name: mode.name for mode in MODES}


def mode_of_program(name):
    """The mode whose connect program is called `name`, or None."""
    return _MODE_OF_CONNECT.get(name)
