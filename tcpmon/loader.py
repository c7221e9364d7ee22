"""tcpmon load / unload: libbpf loads the probe, attaches one connect hook and pins it all.

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

from tcpmon import _libbpf, _maps, mounts, probe
from tcpmon.errors import ENOTSUPP, LoadError

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


@dataclass
class LoadResult:
    mode: str
    pin_dir: str
    already_loaded: bool = False
    skipped: dict = field(default_factory=dict)  # mode -> why it was not used
    links: list = field(default_factory=list)    # held open by --foreground instead of pinned


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


def _candidates(attach):
    if attach == "auto":
        return probe.ATTACH_MODES
    if attach not in probe.ATTACH_PROGRAMS:
        raise LoadError(f"attach mode '{attach}' is unknown: use auto or one of {', '.join(probe.ATTACH_MODES)}")
    return (attach,)


def _existing_sizes(pins):
    """max_entries of maps already pinned (so libbpf can reuse them); checks their layout."""
    sizes = {}
    for spec in probe.MAPS:
        if not pins.map(spec).exists():
            continue
        with probe.open_map(pins, spec) as bpf_map:
            sizes[spec.name] = bpf_map.max_entries
    return sizes


def _map_sizes(pins, max_pids, max_comms):
    wanted = {probe.CONNECTS.name: max_pids or _maps.DEFAULT_MAX_PIDS,
              probe.COMM_TOTALS.name: max_comms or _maps.DEFAULT_MAX_COMMS}
    existing = _existing_sizes(pins)
    for name, size in existing.items():
        if name in wanted and size != wanted[name] and (max_pids or max_comms):
            log.warning("map %s is already pinned with %d entries; keeping it (unload to resize)",
                        pins.dir / name, size)
    wanted.update({name: size for name, size in existing.items() if name in wanted})
    return wanted


def _why(mode, exc):
    if getattr(exc, "call", None) == "bpf_link__pin":
        hint = "this kernel cannot pin this kind of link (perf links need 5.15+): use 'tcpmon load --foreground'"
    else:
        hint = _HINTS.get((mode, getattr(exc, "errno", None)))
    return f"{exc} ({hint})" if hint else str(exc)


def _attach(pins, mode, object_path, sizes, pin_links):
    """Load the object with only `mode`'s connect and exit programs, attach both, pin."""
    program, exit_program = probe.ATTACH_PROGRAMS[mode], probe.EXIT_PROGRAMS[mode]
    with _libbpf.BpfObject(object_path) as obj:
        for name in probe.ALL_PROGRAMS:
            obj.set_autoload(name, name in (program, exit_program))
        for spec in probe.MAPS:
            obj.set_pin_path(spec.name, pins.map(spec))
        for name, size in sizes.items():
            obj.set_max_entries(name, size)
        obj.load()
        links = [obj.attach(program), obj.attach(exit_program)]
        pinned = []
        try:
            for name, path in ((program, pins.connect_prog), (exit_program, pins.exit_prog)):
                obj.pin_program(name, path)
                pinned.append(path)
            if pin_links:
                for link, path in zip(links, pins.links()):
                    link.pin(path)
                    pinned.append(path)
        except LoadError:
            _remove(pinned)
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


def load(pin_dir=probe.DEFAULT_PIN_DIR, attach="auto", object_path=None,
         max_pids=None, max_comms=None, foreground=False):
    """Load and attach the probe under `pin_dir` unless it is attached there already."""
    pins = probe.Pins(pin_dir)
    object_path = object_path or default_object()
    if not os.path.isfile(object_path):
        raise LoadError(f"BPF object {object_path} not found: run 'make bpf' or pass --bpf-object")
    candidates = _candidates(attach)
    mounts.ensure_bpffs(pins.dir)
    os.makedirs(pins.dir, mode=0o755, exist_ok=True)
    with _locked(pins.dir):
        state = probe.inspect(pins)
        if state.attached:
            if attach not in ("auto", state.mode):
                raise LoadError(f"probe already attached in mode {state.mode} under {pins.dir}: "
                                f"run 'tcpmon unload' before loading with --attach {attach}")
            return LoadResult(state.mode, str(pins.dir), already_loaded=True)
        _remove(pins.links() + pins.programs())  # leftovers of a detached or foreground load
        sizes = _map_sizes(pins, max_pids, max_comms)
        maps_before = {path for path in pins.maps() if path.exists()}
        result = LoadResult(None, str(pins.dir))
        for mode in candidates:
            try:
                if mode in ("tracepoint", "kprobe"):
                    mounts.ensure_tracefs()
                result.links = _attach(pins, mode, object_path, sizes, pin_links=not foreground)
            except LoadError as exc:
                result.skipped[mode] = _why(mode, exc)
                log.debug("%s: libbpf said:\n%s", mode, "\n".join(getattr(exc, "log", [])))
                continue
            result.mode = mode
            return result
        _remove(path for path in pins.maps() if path not in maps_before)
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
    for link in result.links:
        link.destroy()
    _remove(probe.Pins(result.pin_dir).programs())


def unload(pin_dir=probe.DEFAULT_PIN_DIR):
    """Remove every pin tcpmon makes (links first, which detaches), then the pin dir if empty."""
    pins = probe.Pins(pin_dir)
    if not pins.dir.is_dir():
        return []
    with _locked(pins.dir):
        removed = _remove(pins.all())
    try:
        os.rmdir(pins.dir)
    except OSError as exc:
        if exc.errno != errno.ENOTEMPTY:
            raise
        log.warning("left %s in place: it holds pins tcpmon did not make: %s",
                    pins.dir, ", ".join(sorted(os.listdir(pins.dir))))
    return removed
