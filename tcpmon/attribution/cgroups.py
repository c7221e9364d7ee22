"""cgroup id -> cgroup path, from walks of the cgroup2 filesystem.

On cgroup v2 a cgroup's id (what bpf_get_current_cgroup_id() returns) is the inode number of its
directory, and ids only grow: a removed cgroup's id never comes back. So a walk maps every id
that exists to its path, an id that a walk does not find is gone for good, and a cached entry
whose directory is gone, or now has another inode, belongs to a removed cgroup.
"""
from __future__ import annotations

import os
import sys
import time
from collections import OrderedDict

DEFAULT_MAX_CGROUPS = 8192
WALK_INTERVAL = 1.0    # seconds between two walks at least, however many ids miss
CHECK_INTERVAL = 5.0   # seconds a cached path is trusted before its inode is checked again


class _Verdict:
    def __init__(self, name):
        self.name = name

    def __repr__(self):
        return self.name


GONE = _Verdict("GONE")        # the cgroup was removed: its series disappear
PENDING = _Verdict("PENDING")  # new since the last walk, and walking again must wait
NO_CGROUP = 0                  # what a probe records when it has no cgroup id: no labels, never gone


def _inode_of(cgroup_id):
    # 64-bit kernels use the whole id as the inode number, 32-bit ones its low 32 bits
    return cgroup_id if sys.maxsize > 2**32 else cgroup_id & 0xFFFFFFFF


def walk(root):
    """{inode: path relative to root} of every cgroup under root ('' is root itself)."""
    found = {os.stat(root).st_ino: ""}
    pending = [""]
    while pending:
        rel = pending.pop()
        try:
            with os.scandir(os.path.join(root, rel)) as entries:
                for entry in entries:
                    # d_type and d_ino come with the directory listing: no stat per cgroup
                    if entry.is_dir(follow_symlinks=False):
                        path = f"{rel}/{entry.name}" if rel else entry.name
                        found[entry.inode()] = path
                        pending.append(path)
        except OSError:
            continue   # removed while we walked, or not ours to read
    return found


class _Bounded(OrderedDict):
    """An LRU dict that forgets its oldest entries beyond `limit`."""

    def __init__(self, limit):
        super().__init__()
        self.limit = limit

    def put(self, key, value):
        self[key] = value
        self.move_to_end(key)
        while len(self) > self.limit:
            self.popitem(last=False)


class CgroupPaths:
    """A bounded cache of cgroup id -> path under one cgroup2 mount.

    resolve() gives each id its path, GONE or PENDING. A miss walks the hierarchy again, at most
    once per walk_interval; cached paths are checked against their inode at most once per
    check_interval. Not thread-safe: one caller at a time (the Attributor holds a lock).
    """

    def __init__(self, root, max_entries=DEFAULT_MAX_CGROUPS, walk_interval=WALK_INTERVAL,
                 check_interval=CHECK_INTERVAL, clock=time.monotonic):
        self.root = root
        self.walk_interval = walk_interval
        self.check_interval = check_interval
        self._clock = clock
        self._paths = _Bounded(max_entries)   # inode -> [path, time of the last check]
        self._gone = _Bounded(max_entries)    # inode -> None
        self._last_walk = None
        self._last_found = None   # what the last walk found, if no larger than the cache
        self.walks = 0
        self.evictions = 0

    @property
    def max_entries(self):
        return self._paths.limit

    def __len__(self):
        return len(self._paths)

    def resolve(self, cgroup_ids, since=None):
        """{id: path | GONE | PENDING}. `since` is when the caller read the ids (default: now):
        a walk that started after it has seen every cgroup that existed then."""
        now = self._clock()
        since = now if since is None else since
        verdicts, unknown = {}, []
        for cgroup_id in cgroup_ids:
            verdict = "" if cgroup_id == NO_CGROUP else self._cached(_inode_of(cgroup_id), now)
            if verdict is None:
                unknown.append(cgroup_id)
            else:
                verdicts[cgroup_id] = verdict
        if unknown:
            verdicts.update(self._resolve_unknown(unknown, since, now))
        return verdicts

    def _cached(self, inode, now):
        entry = self._paths.get(inode)
        if entry is None:
            return GONE if inode in self._gone else None
        self._paths.move_to_end(inode)
        if now - entry[1] >= self.check_interval:
            if not self._still_there(inode, entry[0]):
                self._evict(inode)
                return GONE
            entry[1] = now
        return entry[0]

    def _still_there(self, inode, path):
        try:
            return os.stat(os.path.join(self.root, path)).st_ino == inode
        except OSError:
            return False

    def _evict(self, inode):
        del self._paths[inode]
        self._gone.put(inode, None)
        self.evictions += 1

    def _resolve_unknown(self, unknown, since, now):
        """Walk unless a walk since `since` saw them already; the walk's verdict, not the
        bounded cache, says which exist (the cache may not hold them all)."""
        if self._last_walk is not None and self._last_walk > since and self._last_found is not None:
            found = self._last_found
        elif self._last_walk is not None and now - self._last_walk < self.walk_interval:
            found = None
        else:
            found = self._refresh({_inode_of(cgroup_id) for cgroup_id in unknown}, now)
        if found is None:
            return {cgroup_id: PENDING for cgroup_id in unknown}
        verdicts = {}
        for cgroup_id in unknown:
            path = found.get(_inode_of(cgroup_id))
            if path is None:
                self._gone.put(_inode_of(cgroup_id), None)
                verdicts[cgroup_id] = GONE
            else:
                verdicts[cgroup_id] = path
        return verdicts

    def _refresh(self, wanted, now):
        """Walk, then keep within the bound: the ids asked for, the ids in use, then the rest.
        The walk's {inode: path}, or None when it failed (the mount is gone or unreadable)."""
        self._last_walk = now
        self._last_found = None
        self.walks += 1
        try:
            found = walk(self.root)
        except OSError:
            return None
        old = self._paths
        fresh = _Bounded(old.limit)
        for inode, path in found.items():
            if inode not in old and inode not in wanted:
                fresh[inode] = [path, now]
        for inode in old:
            if inode in found:
                fresh[inode] = [found[inode], now]
            else:
                self._gone.put(inode, None)
                self.evictions += 1
        for inode in wanted & found.keys():
            fresh[inode] = [found[inode], now]
        while len(fresh) > fresh.limit:
            fresh.popitem(last=False)
        self._paths = fresh
        self._last_found = found if len(found) <= fresh.limit else None
        return found
