"""bpffs and tracefs: the loader mounts them when they are missing and it may."""
import ctypes
import errno
import os

from tcpmon.errors import LoadError

BPFFS = "/sys/fs/bpf"
TRACEFS = "/sys/kernel/tracing"


def _mounts():
    """mount point -> fs type, from /proc/self/mounts."""
    found = {}
    with open("/proc/self/mounts") as f:
        for line in f:
            fields = line.split()
            found[fields[1].replace("\\040", " ")] = fields[2]
    return found


def fs_type(path):
    """The type of the filesystem `path` lives on (its longest mounted prefix)."""
    mounts = _mounts()
    path = os.path.abspath(path)
    while path not in mounts:
        path = os.path.dirname(path)
    return mounts[path]


# In a pod the loader has no CAP_SYS_ADMIN; the chart's opt-in init step mounts bpffs instead.
CHART_BPFFS_FIX = "or, in Kubernetes, install the chart with --set bpffsMount=true"


def _mount(fstype, target, or_else=""):
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(fstype.encode(), target.encode(), fstype.encode(), 0, None) != 0:
        err = ctypes.get_errno()
        hint = "needs CAP_SYS_ADMIN" if err == errno.EPERM else os.strerror(err)
        raise LoadError(f"cannot mount {fstype} at {target}: {hint}: "
                        f"run 'mount -t {fstype} {fstype} {target}' as root{' ' + or_else if or_else else ''}")


def ensure_bpffs(pin_dir):
    """Make sure `pin_dir` can be created on bpffs, mounting it at /sys/fs/bpf if needed."""
    parent = os.path.dirname(os.path.abspath(pin_dir))
    if fs_type(parent) == "bpf":
        return
    if os.path.abspath(parent) != BPFFS:
        raise LoadError(f"pin dir {pin_dir} is not on bpffs: mount one with "
                        f"'mount -t bpf bpf {parent}' or use a pin dir under {BPFFS}")
    _mount("bpf", BPFFS, or_else=CHART_BPFFS_FIX)


def ensure_tracefs():
    """tracepoint and legacy kprobe attach look up event ids in tracefs."""
    if os.path.isdir(os.path.join(TRACEFS, "events")) or os.path.isdir("/sys/kernel/debug/tracing/events"):
        return
    _mount("tracefs", TRACEFS)
