"""This process's metrics as prometheus-client's Process, Platform and GC collectors name them,
read in one pass per scrape: /proc/self/stat, the fd count and the fd limit (getrlimit, not a
parse of /proc/self/limits).  tests/test_exposition.py checks them against those collectors."""
import gc
import os
import platform
import resource

from tcpmon.textformat import Family

_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE = resource.getpagesize()


def _boot_time():
    with open("/proc/stat", "rb") as stat:
        for line in stat:
            if line.startswith(b"btime "):
                return float(line.split()[1])
    return 0.0


_BOOT_TIME = _boot_time()
_MAJOR, _MINOR, _PATCH = platform.python_version_tuple()
_PYTHON = Family("python_info", "gauge", "Python platform information",
                 ("implementation", "major", "minor", "patchlevel", "version"),
                 [((platform.python_implementation(), _MAJOR, _MINOR, _PATCH, platform.python_version()), 1)])


def families():
    """Family tuples of this process, in the order prometheus-client's default registry has them."""
    with open("/proc/self/stat", "rb") as f:
        stat = f.read().rsplit(b")", 1)[-1].split()
    yield Family("process_virtual_memory_bytes", "gauge", "Virtual memory size in bytes.", (),
                 [((), float(stat[20]))])
    yield Family("process_resident_memory_bytes", "gauge", "Resident memory size in bytes.", (),
                 [((), float(stat[21]) * _PAGE)])
    yield Family("process_start_time_seconds", "gauge", "Start time of the process since unix epoch in seconds.",
                 (), [((), float(stat[19]) / _TICKS + _BOOT_TIME)])
    yield Family("process_cpu_seconds", "counter", "Total user and system CPU time spent in seconds.", (),
                 [((), (float(stat[11]) + float(stat[12])) / _TICKS)])
    yield Family("process_open_fds", "gauge", "Number of open file descriptors.", (),
                 [((), len(os.listdir("/proc/self/fd")))])
    yield Family("process_max_fds", "gauge", "Maximum number of open file descriptors.", (),
                 [((), float(resource.getrlimit(resource.RLIMIT_NOFILE)[0]))])
    yield _PYTHON
    stats = gc.get_stats()
    for field, name, text in (("collected", "python_gc_objects_collected", "Objects collected during gc"),
                              ("uncollectable", "python_gc_objects_uncollectable",
                               "Uncollectable objects found during GC"),
                              ("collections", "python_gc_collections",
                               "Number of times this generation was collected")):
        yield Family(name, "counter", text, ("generation",),
                     [((str(gen),), stat[field]) for gen, stat in enumerate(stats)])
