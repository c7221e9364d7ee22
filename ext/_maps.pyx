# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Raw bpf() access to tcpmon's pinned maps, links and programs (no libbpf in the read path)."""
from libc.stdint cimport uint32_t, uint64_t, uintptr_t
from libc.errno cimport EACCES, EINVAL, ENOENT, ENOSPC, EOPNOTSUPP
from libc.string cimport memcpy, memset
from posix.unistd cimport close

from rawbpf cimport *

import os

from tcpmon.errors import ENOTSUPP as _ENOTSUPP, MapLayoutError, WrongPinError, bpf_error

# Kernel-internal errno that BPF_MAP_LOOKUP_BATCH returns for maps without batch support.
cdef int ENOTSUPP = _ENOTSUPP
cdef int BATCH_UNSUPPORTED = 1
# Entries asked for per BPF_MAP_LOOKUP_BATCH call.  A kernel without full preemption (what
# server distributions ship) holds the CPU for the whole of one call: a thread woken onto that
# CPU (the event loop, the side thread) waits for it.  1024 entries keep a call well under a millisecond at
# a few hundred ns per entry, and the extra calls cost a fraction of a percent of the read.
BATCH_CHUNK = 1024

MAP_TYPE_HASH = BPF_MAP_TYPE_HASH
MAP_TYPE_ARRAY = BPF_MAP_TYPE_ARRAY
MAP_TYPE_PERCPU_ARRAY = BPF_MAP_TYPE_PERCPU_ARRAY
_PERCPU_TYPES = (BPF_MAP_TYPE_PERCPU_HASH, BPF_MAP_TYPE_PERCPU_ARRAY, BPF_MAP_TYPE_LRU_PERCPU_HASH)
_MAP_TYPE_NAMES = {BPF_MAP_TYPE_HASH: "hash", BPF_MAP_TYPE_ARRAY: "array",
                   BPF_MAP_TYPE_PERCPU_HASH: "percpu_hash", BPF_MAP_TYPE_PERCPU_ARRAY: "percpu_array",
                   BPF_MAP_TYPE_LRU_HASH: "lru_hash", BPF_MAP_TYPE_LRU_PERCPU_HASH: "lru_percpu_hash"}


def possible_cpus(path="/sys/devices/system/cpu/possible"):
    """How many per-CPU slots the kernel copies out for a per-CPU map ("0-3,5" -> 6)."""
    with open(path) as f:
        spec = f.read().strip()
    highest = max(int(part.rpartition("-")[2]) for part in spec.split(","))
    return highest + 1


def map_type_name(unsigned int map_type):
    return _MAP_TYPE_NAMES.get(map_type, f"type {map_type}")


# What /proc/self/fd/N names for each kind of BPF object (anon inodes; bpftool tells them apart the same way).
_FD_KINDS = {"anon_inode:bpf-map": "map", "anon_inode:bpf-prog": "program", "anon_inode:bpf_link": "link"}
_KIND_TEXT = {"map": "a BPF map", "program": "a BPF program", "link": "a BPF link", "directory": "a directory"}


cdef int _obj_get(object path, unsigned int flags):
    """The fd of the object pinned at `path`, or -errno."""
    cdef bytes cpath = os.fsencode(path)
    cdef bpf_attr attr
    cdef int fd
    memset(&attr, 0, sizeof(attr))
    attr.pathname = <uint64_t><uintptr_t><const char *>cpath
    attr.file_flags = flags
    with nogil:
        fd = sys_bpf(BPF_OBJ_GET, &attr, sizeof(attr))
    return fd


def _fd_kind(int fd):
    """"map", "program" or "link"; None when /proc cannot tell."""
    try:
        return _FD_KINDS.get(os.readlink(f"/proc/self/fd/{fd}"))
    except OSError:
        return None


def pin_kind(path):
    """What is pinned at `path`: "map", "program", "link", "directory", or None (no BPF object).
    Programs and links open read-write only, so this needs write permission on their pins."""
    cdef int fd
    if os.path.isdir(path):
        return "directory"
    fd = _obj_get(path, 0)
    if fd < 0:
        fd = _obj_get(path, BPF_F_RDONLY)
    if fd < 0:
        return None
    try:
        return _fd_kind(fd)
    finally:
        close(fd)


cdef int obj_get(object path, unsigned int flags, str kind) except -1:
    """The fd of the BPF `kind` ("map", "program", "link") pinned at `path`; raises
    WrongPinError when another kind of object is pinned there."""
    cdef int fd = _obj_get(path, flags)
    if fd < 0:
        # The kernel says EINVAL for a program or link opened read-only, EACCES for a directory.
        found = pin_kind(path) if -fd in (EINVAL, EACCES) else None
        if found is not None and found != kind:
            raise _wrong_kind(path, found, kind)
        raise bpf_error("BPF_OBJ_GET", -fd, path)
    found = _fd_kind(fd)
    if found is not None and found != kind:
        close(fd)
        raise _wrong_kind(path, found, kind)
    return fd


def _wrong_kind(path, found, kind):
    return WrongPinError(f"{path} is {_KIND_TEXT[found]}, not {_KIND_TEXT[kind]}: run 'tcpmon unload' and load again")


cdef int obj_info(int fd, void *info, uint32_t size, object path) except -1:
    cdef bpf_attr attr
    cdef int ret
    memset(&attr, 0, sizeof(attr))
    memset(info, 0, size)
    attr.info.bpf_fd = fd
    attr.info.info_len = size
    attr.info.info = <uint64_t><uintptr_t>info
    with nogil:
        ret = sys_bpf(BPF_OBJ_GET_INFO_BY_FD, &attr, sizeof(attr))
    if ret < 0:
        raise bpf_error("BPF_OBJ_GET_INFO_BY_FD", -ret, path)
    return 0


def pinned_link_info(path):
    """type, id and prog_id of the link pinned at `path` (prog_id 0: detached)."""
    cdef bpf_link_info info
    cdef int fd = obj_get(path, 0, "link")  # the kernel opens links read-write only
    try:
        obj_info(fd, &info, sizeof(info), path)
    finally:
        close(fd)
    return {"type": info.type, "id": info.id, "prog_id": info.prog_id}


def pinned_prog_info(path):
    """id, name, (with kernel.bpf_stats_enabled=1) run time, and the runs the kernel skipped
    because the program was already running on that CPU, of the program pinned at `path`."""
    cdef bpf_prog_info info
    cdef int fd = obj_get(path, BPF_F_RDONLY, "program")
    try:
        obj_info(fd, &info, sizeof(info), path)
    finally:
        close(fd)
    return {"type": info.type, "id": info.id, "name": info.name.decode(errors="replace"),
            "run_time_ns": info.run_time_ns, "run_cnt": info.run_cnt,
            "recursion_misses": info.recursion_misses}


cdef int _batch_has_more(int fd, uint64_t *token, char *key, char *value) noexcept nogil:
    """After a batch read filled every slot: 1 if the map holds an entry past `token`, 0 if
    not (a full array ends this way), or -errno.  Reads at most one entry into key/value."""
    cdef bpf_attr attr
    cdef uint64_t next_token[8]
    cdef int ret
    memset(&attr, 0, sizeof(attr))
    attr.batch.map_fd = fd
    attr.batch.in_batch = <uint64_t><uintptr_t>token
    attr.batch.out_batch = <uint64_t><uintptr_t>next_token
    attr.batch.keys = <uint64_t><uintptr_t>key
    attr.batch.values = <uint64_t><uintptr_t>value
    attr.batch.count = 1
    ret = sys_bpf(BPF_MAP_LOOKUP_BATCH, &attr, sizeof(attr))
    if ret == -ENOSPC:
        return 1   # the next bucket holds more than the one slot offered
    if ret < 0 and ret != -ENOENT:
        return ret
    return 1 if attr.batch.count > 0 else 0


cdef class BpfMap:
    """A pinned map opened read-only: its layout, and whole-map reads into reused buffers.

    The kernel writes keys and values straight into two preallocated buffers
    sized from max_entries; `keys` and `values` are views of the last read.
    """
    cdef int fd
    cdef readonly object path
    cdef readonly unsigned int map_type
    cdef readonly unsigned int map_id
    cdef readonly unsigned int key_size
    cdef readonly unsigned int value_size
    cdef readonly unsigned int max_entries
    cdef readonly str name
    # bytes per value as the kernel copies it out (per-CPU maps: one slot per CPU)
    cdef readonly unsigned int value_stride
    # "auto" until the kernel refuses a batch lookup, then "iterate"
    cdef readonly str read_mode
    # why the last read() stopped before the end of the map, or None: it read every entry
    cdef readonly str truncated
    cdef bytearray _keys
    cdef bytearray _values
    cdef bytearray _spare   # one key and one value, for looking past a full buffer
    cdef Py_ssize_t _count

    def __cinit__(self, path, *, bint writable=False):
        self.fd = -1
        self.path = os.fspath(path)
        self.fd = obj_get(self.path, 0 if writable else BPF_F_RDONLY, "map")
        cdef bpf_map_info info
        obj_info(self.fd, &info, sizeof(info), self.path)
        self.map_type = info.type
        self.map_id = info.id
        self.key_size = info.key_size
        self.value_size = info.value_size
        self.max_entries = info.max_entries
        self.name = info.name.decode(errors="replace")
        self.value_stride = self.value_size
        if self.map_type in _PERCPU_TYPES:
            self.value_stride = ((self.value_size + 7) // 8 * 8) * possible_cpus()
        self.read_mode = "auto"
        self.truncated = None
        self._count = 0

    def __dealloc__(self):
        if self.fd >= 0:
            close(self.fd)

    def close(self):
        """Idempotent."""
        if self.fd >= 0:
            close(self.fd)
            self.fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def fileno(self):
        return self.fd

    def layout_differences(self, unsigned int map_type, unsigned int key_size, unsigned int value_size):
        """Every way this map differs from the given layout, as text; empty when it matches."""
        diffs = []
        if self.map_type != map_type:
            diffs.append(f"type {map_type_name(self.map_type)}, expected {map_type_name(map_type)}")
        if self.key_size != key_size:
            diffs.append(f"key size {self.key_size}, expected {key_size}")
        if self.value_size != value_size:
            diffs.append(f"value size {self.value_size}, expected {value_size}")
        return diffs

    def check_layout(self, unsigned int map_type, unsigned int key_size, unsigned int value_size):
        """Raise MapLayoutError naming every difference from the layout tcpmon expects."""
        diffs = self.layout_differences(map_type, key_size, value_size)
        if diffs:
            raise MapLayoutError(f"pinned map {self.path} has {', '.join(diffs)}: "
                                 "run 'tcpmon unload' and load again")

    @property
    def keys(self):
        return memoryview(self._keys)[:self._count * self.key_size]

    @property
    def values(self):
        return memoryview(self._values)[:self._count * self.value_stride]

    @property
    def count(self):
        """Entries found by the last read()."""
        return self._count

    def read(self, mode="auto", unsigned int chunk=BATCH_CHUNK):
        """Read every entry; returns how many.  mode: "auto" (batch, and per-key
        iteration from the first time the kernel refuses batch), "batch" or "iterate";
        `chunk`: entries asked for per batch call (a bucket with more is read whole).
        A read that had to stop early (the map changed faster than it was read) keeps
        what it read and says why in `truncated`."""
        if mode not in ("auto", "batch", "iterate"):
            raise ValueError(f"read mode {mode!r}: use auto, batch or iterate")
        if chunk == 0:
            raise ValueError("a batch read needs a chunk of at least one entry")
        if mode == "auto":
            mode = self.read_mode   # "iterate" once the kernel refused a batch lookup
        self._ensure_buffers()
        if self.fd < 0:
            raise ValueError(f"map {self.path} is closed")
        self.truncated = None
        if mode == "iterate":
            self._read_iterate()
        elif self._read_batch(chunk) == BATCH_UNSUPPORTED:
            if mode == "batch":
                raise bpf_error("BPF_MAP_LOOKUP_BATCH", EOPNOTSUPP, self.path,
                                "this kernel has no batch lookup for this map: use read mode 'iterate'")
            self.read_mode = "iterate"
            self._read_iterate()
        return self._count

    def lookup(self, bytes key):
        """The value stored under `key`, or None."""
        if len(key) != self.key_size:
            raise ValueError(f"key of {len(key)} bytes for map {self.path} with key size {self.key_size}")
        value = bytearray(self.value_stride)
        cdef bpf_attr attr
        cdef char *kbuf = key
        cdef char *vbuf = value
        cdef int ret
        memset(&attr, 0, sizeof(attr))
        attr.map_fd = self.fd
        attr.key = <uint64_t><uintptr_t>kbuf
        attr.value = <uint64_t><uintptr_t>vbuf
        with nogil:
            ret = sys_bpf(BPF_MAP_LOOKUP_ELEM, &attr, sizeof(attr))
        if ret == -ENOENT:
            return None
        if ret < 0:
            raise bpf_error("BPF_MAP_LOOKUP_ELEM", -ret, self.path)
        return bytes(value)

    def _ensure_buffers(self):
        if self._keys is None:
            self._keys = bytearray(self.max_entries * self.key_size)
            self._values = bytearray(self.max_entries * self.value_stride)
            self._spare = bytearray(self.key_size + self.value_stride)

    cdef int _read_batch(self, uint32_t chunk) except -1:
        cdef bpf_attr attr
        cdef char *keys = self._keys
        cdef char *values = self._values
        cdef char *spare = self._spare
        cdef uint64_t token[8]   # batch position: a bucket index for hash maps, a key for others
        cdef uint64_t next_token[8]
        cdef uint32_t total = 0
        cdef uint32_t capacity = self.max_entries
        cdef uint32_t ks = self.key_size, vs = self.value_stride
        cdef int fd = self.fd
        cdef int ret = 0
        cdef bint first = True
        if ks > sizeof(token):
            return BATCH_UNSUPPORTED
        with nogil:
            while True:
                memset(&attr, 0, sizeof(attr))
                attr.batch.map_fd = fd
                attr.batch.in_batch = 0 if first else <uint64_t><uintptr_t>token
                attr.batch.out_batch = <uint64_t><uintptr_t>next_token
                attr.batch.keys = <uint64_t><uintptr_t>(keys + <size_t>total * ks)
                attr.batch.values = <uint64_t><uintptr_t>(values + <size_t>total * vs)
                attr.batch.count = capacity - total
                if attr.batch.count > chunk:
                    attr.batch.count = chunk
                ret = sys_bpf(BPF_MAP_LOOKUP_BATCH, &attr, sizeof(attr))
                if ret == -ENOSPC and capacity - total > chunk:
                    attr.batch.count = capacity - total   # the next bucket holds more than a chunk
                    ret = sys_bpf(BPF_MAP_LOOKUP_BATCH, &attr, sizeof(attr))
                if ret < 0 and ret != -ENOENT:
                    break
                total += attr.batch.count
                if ret == -ENOENT:
                    ret = 0
                    break
                memcpy(token, next_token, sizeof(token))
                first = False
                if total == capacity or attr.batch.count == 0:
                    ret = _batch_has_more(fd, token, spare, spare + ks)
                    break
        if first and (ret == -EINVAL or ret == -ENOTSUPP or ret == -EOPNOTSUPP):
            return BATCH_UNSUPPORTED
        self._count = total
        if ret == 1:
            self.truncated = "capacity"   # more entries than the map holds at once were seen
        elif ret == -ENOSPC:
            # The next bucket holds more entries than there is room left: the map filled
            # up while it was read.  Keep what was read.
            self.truncated = "ENOSPC"
        elif ret < 0:
            raise bpf_error("BPF_MAP_LOOKUP_BATCH", -ret, self.path)
        return 0

    cdef int _read_iterate(self) except -1:
        # Per-key walk.  A key deleted under us makes GET_NEXT_KEY restart from
        # the first key, so keys already seen are skipped and the walk is bounded.
        cdef bpf_attr attr
        cdef char *keys = self._keys
        cdef char *values = self._values
        cdef char *spare = self._spare
        cdef uint32_t ks = self.key_size, vs = self.value_stride
        cdef uint32_t n = 0, steps = 0, limit = 2 * self.max_entries + 1
        cdef char *prev = NULL
        cdef char *slot_key
        cdef int fd = self.fd
        cdef int ret
        seen = set()
        scratch = bytearray(ks)
        cdef char *last = scratch
        while True:
            if steps == limit:
                self.truncated = "iteration bound"   # restarted over and over by deletions
                break
            steps += 1
            # With every slot taken, the next key goes to the spare slot: it only tells
            # whether the map holds more.
            slot_key = keys + <size_t>n * ks if n < self.max_entries else spare
            memset(&attr, 0, sizeof(attr))
            attr.map_fd = fd
            attr.key = <uint64_t><uintptr_t>prev
            attr.next_key = <uint64_t><uintptr_t>slot_key
            with nogil:
                ret = sys_bpf(BPF_MAP_GET_NEXT_KEY, &attr, sizeof(attr))
            if ret == -ENOENT:
                break
            if ret < 0:
                raise bpf_error("BPF_MAP_GET_NEXT_KEY", -ret, self.path)
            scratch[:] = slot_key[:ks]
            prev = last
            key = bytes(scratch)
            if key in seen:
                continue
            if n == self.max_entries:
                self.truncated = "capacity"   # more keys than the map holds at once were seen
                break
            memset(&attr, 0, sizeof(attr))
            attr.map_fd = fd
            attr.key = <uint64_t><uintptr_t>slot_key
            attr.value = <uint64_t><uintptr_t>(values + <size_t>n * vs)
            with nogil:
                ret = sys_bpf(BPF_MAP_LOOKUP_ELEM, &attr, sizeof(attr))
            if ret == -ENOENT:
                continue  # deleted between the two calls
            if ret < 0:
                raise bpf_error("BPF_MAP_LOOKUP_ELEM", -ret, self.path)
            seen.add(key)
            n += 1
        self._count = n
        return 0
