"""What is loaded under a pin dir and whether it is attached, read from the pins.

Read-only: the exporter uses this with CAP_BPF alone; loading lives in loader.py.
"""
from dataclasses import dataclass, field

from tcpmon import _maps, attach, maps
from tcpmon.errors import describe


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
        state.mode = attach.mode_of_program(connect_prog["name"])
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
    if not pins.stamp.is_dir():
        return (f"the pins under {pins.dir} are not ABI v{maps.ABI_VERSION} (an older tcpmon loaded them): "
                "run this release's 'tcpmon load' to migrate them")
    for path in (pins.connect_link, pins.outcome_link):
        link = state.links.get(path.name)
        if link is not None and link["prog_id"] == 0:
            return f"link {path} is detached: run 'tcpmon unload' and load again"
    return None


def bpf_stats_enabled():
    try:
        with open("/proc/sys/kernel/bpf_stats_enabled") as f:
            return f.read().strip() == "1"
    except OSError:
        return False
