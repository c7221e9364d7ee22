"""What the probe object holds, where the loader pins it, and what is attached now.

Read-only: the exporter uses this with CAP_BPF alone; loading lives in loader.py.
"""
from dataclasses import dataclass, field
from pathlib import Path

from tcpmon import _maps
from tcpmon.errors import NotLoadedError, describe

DEFAULT_PIN_DIR = "/sys/fs/bpf/tcpmon"

# attach mode -> program in bpf/tcpconnect.bpf.c; auto tries them in this order
ATTACH_PROGRAMS = {
    "fentry": "connect_fentry",
    "kprobe": "connect_kprobe",
    "tp_btf": "connect_tp_btf",
    "tracepoint": "connect_tp",
}
ATTACH_MODES = tuple(ATTACH_PROGRAMS)
# attach mode -> the exit hook loaded with it: the same kind of link, so a kernel
# that can pin the connect link can pin this one too
EXIT_PROGRAMS = {
    "fentry": "process_exit_btf",
    "kprobe": "process_exit",
    "tp_btf": "process_exit_btf",
    "tracepoint": "process_exit",
}
ALL_PROGRAMS = tuple(ATTACH_PROGRAMS.values()) + tuple(sorted(set(EXIT_PROGRAMS.values())))
_MODE_OF_PROGRAM = {program: mode for mode, program in ATTACH_PROGRAMS.items()}


@dataclass(frozen=True)
class MapSpec:
    name: str
    map_type: int
    key_size: int
    value_size: int


CONNECTS = MapSpec(_maps.MAP_CONNECTS, _maps.MAP_TYPE_HASH, _maps.PID_KEY_SIZE, _maps.PID_VALUE_SIZE)
COMM_TOTALS = MapSpec(_maps.MAP_COMM_TOTALS, _maps.MAP_TYPE_HASH, _maps.COMM_KEY_SIZE, _maps.COUNTER_SIZE)
UPDATE_FAILURES = MapSpec(_maps.MAP_UPDATE_FAILURES, _maps.MAP_TYPE_PERCPU_ARRAY, 4, _maps.COUNTER_SIZE)
MAPS = (CONNECTS, COMM_TOTALS, UPDATE_FAILURES)


class Pins:
    """The paths of everything pinned under one pin dir."""

    def __init__(self, pin_dir=DEFAULT_PIN_DIR):
        self.dir = Path(pin_dir)
        self.connect_link = self.dir / _maps.PIN_CONNECT_LINK
        self.exit_link = self.dir / _maps.PIN_EXIT_LINK
        self.connect_prog = self.dir / _maps.PIN_CONNECT_PROG
        self.exit_prog = self.dir / _maps.PIN_EXIT_PROG

    def map(self, spec):
        return self.dir / spec.name

    def links(self):
        return (self.connect_link, self.exit_link)

    def programs(self):
        return (self.connect_prog, self.exit_prog)

    def maps(self):
        return tuple(self.map(spec) for spec in MAPS)

    def all(self):
        """Links first: removing them in this order detaches before anything else goes."""
        return self.links() + self.programs() + self.maps()


def open_map(pins, spec):
    """The pinned map for `spec`, read-only, after checking its layout."""
    path = pins.map(spec)
    try:
        bpf_map = _maps.BpfMap(path)
    except FileNotFoundError:
        raise NotLoadedError(f"no map pinned at {path}: run 'tcpmon load' (pin dir {pins.dir})") from None
    try:
        bpf_map.check_layout(spec.map_type, spec.key_size, spec.value_size)
    except Exception:
        bpf_map.close()
        raise
    return bpf_map


def mode_of_program(name):
    return _MODE_OF_PROGRAM.get(name)


@dataclass
class ProbeState:
    """What is loaded under a pin dir.  `problem` says why it is not ready, if it isn't."""
    pin_dir: str
    mode: str = None
    programs: dict = field(default_factory=dict)  # pin name -> prog info
    links: dict = field(default_factory=dict)     # pin name -> link info
    problem: str = None

    @property
    def attached(self):
        return self.problem is None


def _pinned_info(read_info, path):
    try:
        return read_info(path)
    except FileNotFoundError:
        return None


def inspect(pins):
    """The probe's state from its pins: which mode, which programs and links, attached or not."""
    state = ProbeState(pin_dir=str(pins.dir))
    try:
        for path in pins.programs():
            info = _pinned_info(_maps.pinned_prog_info, path)
            if info:
                state.programs[path.name] = info
        for path in pins.links():
            info = _pinned_info(_maps.pinned_link_info, path)
            if info:
                state.links[path.name] = info
    except OSError as exc:
        state.problem = describe(exc)
        return state
    connect_prog = state.programs.get(pins.connect_prog.name)
    if connect_prog:
        state.mode = mode_of_program(connect_prog["name"])
    state.problem = _why_not_attached(pins, state)
    return state


def _why_not_attached(pins, state):
    if not pins.dir.is_dir():
        return f"pin dir {pins.dir} does not exist: run 'tcpmon load'"
    if pins.connect_prog.name not in state.programs:
        return f"no program pinned at {pins.connect_prog}: run 'tcpmon load'"
    if state.mode is None:
        name = state.programs[pins.connect_prog.name]["name"]
        return f"program {pins.connect_prog} is '{name}', not a tcpmon probe: run 'tcpmon unload' and load again"
    link = state.links.get(pins.connect_link.name)
    if link is not None and link["prog_id"] == 0:
        return f"link {pins.connect_link} is detached: run 'tcpmon unload' and load again"
    return None


def bpf_stats_enabled():
    try:
        with open("/proc/sys/kernel/bpf_stats_enabled") as f:
            return f.read().strip() == "1"
    except OSError:
        return False
