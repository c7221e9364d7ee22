"""Where the cgroup2 hierarchy is mounted: /sys/fs/cgroup on pure v2 hosts,
/sys/fs/cgroup/unified on hybrid ones, anywhere under --cgroup-root in a pod."""
from __future__ import annotations

import os
import re
from typing import NamedTuple

MOUNTS = "/proc/self/mounts"
ROOT_ID = 1   # the hierarchy's root cgroup; kernfs numbers it 1 on every architecture
_ESCAPE = re.compile(r"\\([0-7]{3})")


class Hierarchy(NamedTuple):
    path: str | None       # a mount that shows the whole hierarchy, or None
    problem: str | None    # why there is none: the readiness detail and the log line


def _unescape(field):
    # the kernel writes space, tab, newline and backslash in mount points as \ooo
    return _ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


def cgroup2_mounts(mounts=MOUNTS):
    """Mount points of cgroup2 filesystems, in mount order."""
    with open(mounts, encoding="utf-8", errors="surrogateescape") as f:
        return [_unescape(fields[1]) for fields in map(str.split, f)
                if len(fields) > 2 and fields[2] == "cgroup2"]


def _shows_whole_hierarchy(path):
    # A mount made inside a cgroup namespace, or a bind mount of a subtree, starts below the
    # root: its top directory is some container's cgroup, whose id is not the root's.
    try:
        return os.stat(path).st_ino == ROOT_ID
    except OSError:
        return False


def _under(path, root):
    return path == root or path.startswith(root.rstrip("/") + "/")


def find_cgroup2(root="auto", mounts=MOUNTS):
    """The cgroup2 mount to map cgroup ids with: the first that shows the whole hierarchy,
    at or under `root` unless root is 'auto'."""
    try:
        found = cgroup2_mounts(mounts)
    except OSError as exc:
        return Hierarchy(None, f"cannot read {mounts}: {exc.strerror}: exporting without attribution labels")
    if root != "auto":
        candidates = [path for path in found if _under(path, os.path.normpath(root))]
        where = f" at or under --cgroup-root {root}"
    else:
        candidates, where = found, ""
    for path in candidates:
        if _shows_whole_hierarchy(path):
            return Hierarchy(path, None)
    if candidates:
        return Hierarchy(None, f"the cgroup2 mount at {candidates[0]} shows only a part of the hierarchy "
                               f"(a cgroup namespace): mount the host's /sys/fs/cgroup and point "
                               f"--cgroup-root at it; exporting without attribution labels")
    if found:
        return Hierarchy(None, f"no cgroup2 mount{where} (cgroup2 is mounted at {', '.join(found)}): "
                               f"exporting without attribution labels")
    return Hierarchy(None, f"no cgroup2 filesystem in {mounts} (a cgroup v1 host): "
                           f"exporting without attribution labels")
