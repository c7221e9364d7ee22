"""What is loaded under a pin dir and whether it is attached, read from the kernel.

Attached means: every program of the mode is pinned, and each one is held attached
either by a pinned link that points at it (the kernel's link info) or by a live
`tcpmon load --foreground`, whose flock on the holder directory the kernel drops when
that process dies.  Both are read with CAP_BPF at most, through a read-only mount too.

Read-only: the exporter uses this with CAP_BPF alone; loading lives in loader.py.
"""
import errno
import fcntl
import os
from dataclasses import dataclass, field

from tcpmon import _maps, attach, maps, mounts
from tcpmon.errors import TcpmonError, describe


@dataclass
class ProbeState:
    """What is loaded under a pin dir.  `problem` says why it is not ready, if it isn't."""
    pin_dir: str
    mode: str = None
    programs: dict = field(default_factory=dict)  # pin name -> prog info
    links: dict = field(default_factory=dict)     # pin name -> link info
    held: bool = False                            # a live foreground loader holds the links
    problem: str = None

    @property
    def attached(self):
        return self.problem is None


def _pinned_info(read_info, path):
    try:
        return read_info(path)
    except FileNotFoundError:
        return None


def held_by_foreground(pins):
    """True while a `tcpmon load --foreground` holds the probe (it holds an exclusive flock
    on pins.holder for as long as it lives).  Testing the lock takes a shared one for an
    instant, which needs only read access to the directory."""
    try:
        fd = os.open(pins.holder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError as exc:
        raise OSError(exc.errno, f"cannot open {pins.holder} to test the foreground loader's lock: "
                                 f"{exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno == errno.EWOULDBLOCK:
            return True
        raise OSError(exc.errno, f"flock {pins.holder}: {exc.strerror}") from None
    finally:
        os.close(fd)  # drops the shared lock, if taken
    return False


def inspect(pins):
    """The probe's state from the kernel: which mode, which programs and links, attached or not."""
    state = ProbeState(pin_dir=str(pins.dir))
    state.problem = _pin_dir_problem(pins)
    if state.problem:
        return state
    try:
        for path in pins.programs():
            info = _pinned_info(_maps.pinned_prog_info, path)
            if info:
                state.programs[path.name] = info
        for path in pins.links():
            info = _pinned_info(_maps.pinned_link_info, path)
            if info:
                state.links[path.name] = info
        state.held = held_by_foreground(pins)
    except (OSError, TcpmonError) as exc:
        state.problem = describe(exc)
        return state
    connect_prog = state.programs.get(pins.connect_prog.name)
    if connect_prog:
        state.mode = attach.mode_of_program(connect_prog["name"])
    state.problem = _why_not_attached(pins, state)
    return state


def _pin_dir_problem(pins):
    if pins.dir.is_dir():
        return None
    if os.path.lexists(pins.dir):
        return pins.not_a_directory()
    parent = pins.dir.parent
    try:
        on_bpffs = mounts.fs_type(parent) == "bpf"
    except OSError:
        on_bpffs = True  # no /proc/self/mounts to tell: say only what is certain
    if not on_bpffs:
        return (f"pin dir {pins.dir} does not exist: no bpffs is mounted at {parent} "
                f"(mount -t bpf bpf {parent}), then run 'tcpmon load'")
    return f"pin dir {pins.dir} does not exist: run 'tcpmon load'"


def _pin_paths(pins, mode):
    """(program pin, link pin) of each program `mode` attaches."""
    pairs = [(pins.connect_prog, pins.connect_link), (pins.exit_prog, pins.exit_link)]
    if mode.outcome:
        pairs.append((pins.outcome_prog, pins.outcome_link))
    return pairs


def _why_not_attached(pins, state):
    if pins.connect_prog.name not in state.programs:
        return f"no program pinned at {pins.connect_prog}: run 'tcpmon load'"
    if state.mode is None:
        name = state.programs[pins.connect_prog.name]["name"]
        return f"program {pins.connect_prog} is '{name}', not a tcpmon probe: run 'tcpmon unload' and load again"
    if not pins.stamp.is_dir():
        return (f"the pins under {pins.dir} are not ABI v{maps.ABI_VERSION} (an older tcpmon loaded them, "
                "or its load was interrupted): run this release's 'tcpmon load'")
    pairs = _pin_paths(pins, attach.BY_NAME[state.mode])
    for prog_pin, _ in pairs:
        if prog_pin.name not in state.programs:
            return f"no program pinned at {prog_pin} (a load was interrupted?): run 'tcpmon load'"
    if state.held:
        return None
    if not state.links:
        return (f"nothing holds the programs under {pins.dir} attached: no link is pinned and no "
                "'tcpmon load --foreground' holds them (it was killed?): run 'tcpmon load'")
    for prog_pin, link_pin in pairs:
        problem = _link_problem(link_pin, state.links.get(link_pin.name), state.programs[prog_pin.name])
        if problem:
            return problem
    return None


def _link_problem(path, link, program):
    if link is None:
        return f"no link pinned at {path} (a load was interrupted?): run 'tcpmon load'"
    if link["prog_id"] == 0:
        return f"link {path} is detached: run 'tcpmon load'"
    if link["prog_id"] != program["id"]:
        return (f"link {path} holds program id {link['prog_id']}, not the pinned '{program['name']}' "
                f"(id {program['id']}): run 'tcpmon load'")
    return None


def bpf_stats_enabled():
    try:
        with open("/proc/sys/kernel/bpf_stats_enabled") as f:
            return f.read().strip() == "1"
    except OSError:
        return False
