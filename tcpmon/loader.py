"""tcpmon load / unload: libbpf loads the probe, attaches one mode's programs and pins it all.

Only this module needs more than CAP_BPF (CAP_PERFMON to attach, CAP_SYS_ADMIN
to mount bpffs); the exporter only reads what it pinned.
"""
import errno
import fcntl
import logging
import os
import signal
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import resources

from tcpmon import _libbpf, _maps, maps, mounts, state
from tcpmon.attach import BY_NAME as MODES_BY_NAME
from tcpmon.attach import MODE_NAMES, MODES, PROGRAMS
from tcpmon.errors import ENOTSUPP, LoadError
from tcpmon.pins import DEFAULT_PIN_DIR, Pins

log = logging.getLogger("tcpmon.loader")

# What a failed attempt most likely means, by (mode, errno).
_HINTS = {
    ("fentry", errno.EPERM): "the kernel refuses fentry programs here (lockdown or no BPF trampoline)",
    ("fentry", errno.ESRCH): "tcp_connect has no BTF entry in this kernel",
    ("fentry", ENOTSUPP): "no BPF trampoline on this kernel (arm64 has one from 6.4 on)",
    ("kprobe", errno.ENOENT): "kprobes are unavailable (CONFIG_KPROBES unset) or tcp_connect is not probeable",
    ("kprobe", errno.EOPNOTSUPP): "kprobes are unavailable on this kernel",
    ("tp_btf", errno.ESRCH): "no BTF for the inet_sock_set_state tracepoint",
    ("tracepoint", errno.ENOENT): "the sock:inet_sock_set_state tracepoint is missing (or tracefs is not mounted)",
}

EPHEMERAL_PORTS = "/proc/sys/net/ipv4/ip_local_port_range"

# ABI version -> the maps whose layout changed after it, which a migration from it
# replaces.  Any other pinned map that does not fit is refused, as a foreign one.
CHANGED_SINCE = {1: ("update_failures",)}  # v2: slots for the new maps


@dataclass
class Sizes:
    """Capacities the user asked for; None keeps a pinned map's size, or the default."""
    max_pids: int = None
    max_comms: int = None
    max_sockets: int = None
    max_outcomes: int = None
    max_destinations: int = None

    def wanted(self, destinations):
        """{map name: capacity or None}; without destinations, their map holds one entry."""
        return {maps.CONNECTS.name: self.max_pids, maps.COMM_TOTALS.name: self.max_comms,
                maps.SOCKETS.name: self.max_sockets, maps.OUTCOMES.name: self.max_outcomes,
                maps.DESTINATIONS.name: self.max_destinations if destinations else 1}


@dataclass
class LoadResult:
    mode: str
    pin_dir: str
    already_loaded: bool = False
    migrated: list = field(default_factory=list)  # what an older release's pins needed
    skipped: dict = field(default_factory=dict)   # mode -> why it was not used
    links: list = field(default_factory=list)     # held open by --foreground instead of pinned
    holder: int = None                            # --foreground: the fd holding the flock on pins.holder


def default_object():
    """The BPF object shipped in the package (make bpf puts the host's there)."""
    return str(resources.files("tcpmon") / "data" / "tcpconnect.bpf.o")


@contextmanager
def _locked(pin_dir):
    """One loader at a time per pin dir."""
    fd = os.open(pin_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _hold_lock(pins):
    """--foreground: take the flock that tells readers a live loader holds the links.
    The fd stays open (and the lock held) until hold() returns or the process dies."""
    os.makedirs(pins.holder, exist_ok=True)
    fd = os.open(pins.holder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    # Blocks only for a reader's instant: loaders take turns under _locked(), and this one
    # found no live holder.
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def _release_lock(pins, fd):
    os.close(fd)
    try:
        os.rmdir(pins.holder)
    except FileNotFoundError:
        pass


def _remove_stale_holder(pins):
    """The holder directory of a foreground loader that is gone (nobody holds its lock)."""
    if state.held_by_foreground(pins):
        raise LoadError(f"a live 'tcpmon load --foreground' holds {pins.holder} but the probe under "
                        f"{pins.dir} is not attached: stop that process (SIGTERM), then load again")
    try:
        os.rmdir(pins.holder)
    except FileNotFoundError:
        pass


def _candidates(mode):
    if mode == "auto":
        return MODES
    if mode not in MODES_BY_NAME:
        raise LoadError(f"attach mode '{mode}' is unknown: use auto or one of {', '.join(MODE_NAMES)}")
    return (MODES_BY_NAME[mode],)


def _pinned_abi(pins):
    """The ABI version of what is pinned: the newest stamp; 1 for pins without one."""
    stamps = pins.stamps()
    return int(stamps[0].name[4:]) if stamps else 1


def _incompatible(pins, spec):
    """Why this release cannot reuse the pinned map for `spec`, or None."""
    with _maps.BpfMap(pins.map(spec)) as bpf_map:
        diffs = bpf_map.layout_differences(spec.map_type, spec.key_size, spec.value_size)
        if spec.name not in Sizes().wanted(True) and bpf_map.max_entries != spec.default_max_entries:
            diffs.append(f"{bpf_map.max_entries} entries, expected {spec.default_max_entries}")
    return ", ".join(diffs) or None


def _refuse_newer(pins):
    version = _pinned_abi(pins)
    if version > maps.ABI_VERSION:
        raise LoadError(f"the pins under {pins.dir} are ABI v{version}, newer than this tcpmon "
                        f"(v{maps.ABI_VERSION}): run the newer release, or 'tcpmon unload' first")


def _migrate(pins, result):
    """Make an older release's pins loadable by this one: maps that changed are replaced
    (their counts restart), the others kept with their counts."""
    version = _pinned_abi(pins)
    if version == maps.ABI_VERSION or not any(path.exists() for path in pins.maps()):
        return
    changed = {name for since, names in CHANGED_SINCE.items() if since >= version for name in names}
    result.migrated.append(f"migrating the pins under {pins.dir} from ABI v{version} to v{maps.ABI_VERSION}")
    for spec in maps.MAPS:
        why = pins.map(spec).exists() and _incompatible(pins, spec)
        if why and spec.name not in changed:
            maps.open_map(pins, spec).close()  # raises MapLayoutError, naming every difference
        if why:
            os.unlink(pins.map(spec))
            result.migrated.append(f"replaced map {spec.name} ({why}): its counts restart")
    for stamp in pins.stamps():
        os.rmdir(stamp)
    for line in result.migrated:
        log.warning("%s", line)


def _existing_sizes(pins):
    """max_entries of maps already pinned (libbpf reuses them only at their size); checks layouts."""
    sizes = {}
    for spec in maps.MAPS:
        if pins.map(spec).exists():
            with maps.open_map(pins, spec) as bpf_map:
                sizes[spec.name] = bpf_map.max_entries
    return sizes


def _map_sizes(pins, sizes, destinations):
    wanted = sizes.wanted(destinations)
    existing = _existing_sizes(pins)
    for name, size in existing.items():
        if wanted.get(name) not in (None, size):
            log.warning("map %s is already pinned with %d entries; keeping it (unload to resize)",
                        pins.dir / name, size)
    chosen = {name: size for name, size in wanted.items() if size is not None}
    chosen.update({name: size for name, size in existing.items() if name in wanted})
    return chosen


def _ephemeral_ports():
    try:
        with open(EPHEMERAL_PORTS) as f:
            low, high = (int(part) for part in f.read().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999  # the kernel's default


def _config(destinations):
    low, high = _ephemeral_ports()
    return maps.CONFIG.pack(count_destinations=int(destinations), ephemeral_low=low, ephemeral_high=high)


def _why(mode, exc):
    if getattr(exc, "call", None) == "bpf_link__pin":
        hint = "this kernel cannot pin this kind of link (perf links need 5.15+): use 'tcpmon load --foreground'"
    else:
        hint = _HINTS.get((mode.name, getattr(exc, "errno", None)))
    return f"{exc} ({hint})" if hint else str(exc)


def _pin_paths(pins, mode):
    """(program, program pin, link pin), attached and pinned in this order: the exit and
    outcome programs before the connect program, so no socket starts unwatched."""
    order = [(mode.exit, pins.exit_prog, pins.exit_link)]
    if mode.outcome:
        order.append((mode.outcome, pins.outcome_prog, pins.outcome_link))
    order.append((mode.connect, pins.connect_prog, pins.connect_link))
    return order


def _attach(pins, mode, object_path, sizes, config, pin_links):
    """Load the object with only `mode`'s programs, attach them, pin."""
    wanted = {program.name for program in mode.programs()}
    with _libbpf.BpfObject(object_path) as obj:
        for program in PROGRAMS:
            obj.set_autoload(program.name, program.name in wanted)
        for spec in maps.MAPS:
            obj.set_pin_path(spec.name, pins.map(spec))
        for name, size in sizes.items():
            obj.set_max_entries(name, size)
        obj.set_rodata(config)
        obj.load()
        links, pinned = [], []
        try:
            for program, prog_pin, link_pin in _pin_paths(pins, mode):
                links.append(obj.attach(program.name))
                obj.pin_program(program.name, prog_pin)
                pinned.append(prog_pin)
                if pin_links:
                    links[-1].pin(link_pin)
                    pinned.append(link_pin)
        except LoadError:
            _remove(reversed(pinned))
            raise
        return links


def _remove(paths):
    removed = []
    for path in paths:
        try:
            os.unlink(path)
            removed.append(str(path))
        except FileNotFoundError:
            pass
    return removed


def load(pin_dir=DEFAULT_PIN_DIR, attach="auto", object_path=None, max_pids=None, max_comms=None,
         foreground=False, *, max_sockets=None, max_outcomes=None, destinations=False, max_destinations=None):
    """Load and attach the probe under `pin_dir` unless it is attached there already.
    Capacities left None keep a pinned map's size, or take the default."""
    sizes = Sizes(max_pids, max_comms, max_sockets, max_outcomes, max_destinations)
    pins = Pins(pin_dir)
    object_path = object_path or default_object()
    if not os.path.isfile(object_path):
        raise LoadError(f"BPF object {object_path} not found: run 'make bpf' or pass --bpf-object")
    candidates = _candidates(attach)
    mounts.ensure_bpffs(pins.dir)
    if os.path.lexists(pins.dir) and not os.path.isdir(pins.dir):
        raise LoadError(pins.not_a_directory())
    os.makedirs(pins.dir, mode=0o755, exist_ok=True)
    with _locked(pins.dir):
        current = state.inspect(pins)
        if current.attached:
            if attach not in ("auto", current.mode):
                raise LoadError(f"probe already attached in mode {current.mode} under {pins.dir}: "
                                f"run 'tcpmon unload' before loading with --attach {attach}")
            return LoadResult(current.mode, str(pins.dir), already_loaded=True)
        result = LoadResult(None, str(pins.dir))
        _refuse_newer(pins)
        _remove_stale_holder(pins)
        # Leftovers of a detached, killed, foreground or older load; the maps (and counts) stay.
        _remove(pins.links() + pins.programs())
        _migrate(pins, result)
        chosen = _map_sizes(pins, sizes, destinations)
        maps_before = {path for path in pins.maps() if path.exists()}
        stamped = pins.stamp.is_dir()
        # Stamped before anything is pinned, so the pins of an interrupted load are not
        # taken for an older release's.
        os.makedirs(pins.stamp, exist_ok=True)
        if foreground:
            result.holder = _hold_lock(pins)
        config = _config(destinations)
        for mode in candidates:
            try:
                if mode.name in ("tracepoint", "kprobe"):
                    mounts.ensure_tracefs()
                result.links = _attach(pins, mode, object_path, chosen, config, pin_links=not foreground)
            except LoadError as exc:
                result.skipped[mode.name] = _why(mode, exc)
                log.debug("%s: libbpf said:\n%s", mode.name, "\n".join(getattr(exc, "log", [])))
                continue
            result.mode = mode.name
            return result
        _remove(path for path in pins.maps() if path not in maps_before)
        if result.holder is not None:
            _release_lock(pins, result.holder)
        if not stamped and not maps_before:
            os.rmdir(pins.stamp)
        tried = "; ".join(f"{mode}: {why}" for mode, why in result.skipped.items())
        raise LoadError(f"no attach mode worked under {pins.dir}: {tried}")


def hold(result, ready=lambda: None):
    """--foreground: keep the links (and so the probe) until SIGTERM or SIGINT, then detach.
    `ready` runs once the signal handlers are in place."""
    stop = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.append(True))
    ready()
    while not stop:
        signal.pause()
    pins = Pins(result.pin_dir)
    _release_lock(pins, result.holder)  # first: the lock must never outlive the links
    for link in reversed(result.links):  # the connect program first
        link.destroy()
    _remove(pins.programs())


def unload(pin_dir=DEFAULT_PIN_DIR):
    """Remove every pin tcpmon makes (links first, which detaches), then the pin dir if empty."""
    pins = Pins(pin_dir)
    if not pins.dir.is_dir():
        return []
    with _locked(pins.dir):
        if state.held_by_foreground(pins):
            log.warning("a 'tcpmon load --foreground' still holds the probe under %s attached: "
                        "stop it (SIGTERM) to detach it", pins.dir)
        removed = _remove(pins.all())
        for directory in pins.stamps() + [pins.holder]:
            try:
                os.rmdir(directory)
                removed.append(str(directory))
            except FileNotFoundError:
                pass
    try:
        os.rmdir(pins.dir)
    except OSError as exc:
        if exc.errno != errno.ENOTEMPTY:
            raise
        log.warning("left %s in place: it holds pins tcpmon did not make: %s",
                    pins.dir, ", ".join(sorted(os.listdir(pins.dir))))
    return removed
