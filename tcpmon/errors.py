"""tcpmon's exceptions: every message is one line that names the object and the fix."""
import errno
import os


class TcpmonError(Exception):
    """An error the CLI prints as one line (no traceback) before exiting non-zero."""


class MapLayoutError(TcpmonError, ValueError):
    """A pinned map is not the map this version of tcpmon reads."""


class WrongPinError(TcpmonError, ValueError):
    """A pin holds another kind of object than tcpmon pins there (a program where a map should be)."""


class NotLoadedError(TcpmonError, FileNotFoundError):
    """The probe is not loaded under the pin dir."""


class LoadError(TcpmonError, RuntimeError):
    """The loader could not load or attach the probe."""


ENOTSUPP = 524  # kernel-internal "not supported" that bpf() and libbpf pass on


def strerror(err):
    """os.strerror, also for the kernel-internal ENOTSUPP."""
    return "Operation not supported (ENOTSUPP)" if err == ENOTSUPP else os.strerror(err)


_HINTS = {
    errno.EPERM: "needs CAP_BPF (run as root, or grant the capability)",
    errno.EACCES: "permission denied by the pin's file mode or an LSM",
    errno.ENOENT: "not pinned: run 'tcpmon load' first",
    errno.EINVAL: "not a BPF object: is bpffs mounted there ('mount -t bpf bpf /sys/fs/bpf')?",
}


def bpf_error(command, err, path=None, hint=None):
    """The OSError subclass for `err` (PermissionError, FileNotFoundError, ...),
    with strerror saying which bpf command failed on which path and what to do."""
    where = f" {path}" if path else ""
    why = hint or _HINTS.get(err)
    message = f"{command}{where}: {strerror(err)}" + (f": {why}" if why else "")
    return OSError(err, message)


def describe(exc):
    """The one-line text the CLI and the health endpoint show for `exc`."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)
