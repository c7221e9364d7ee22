# cython: language_level=3
"""A thin binding to libbpf for the loader: open, configure, load, attach, pin.

Every failing call raises LibbpfError with the call, the errno and what
libbpf logged while it ran (the verifier log included).
"""
from libc.errno cimport errno
from libc.stdlib cimport free

from libbpf_api cimport *

import os

from tcpmon.errors import LoadError, strerror

cdef list _log = []   # libbpf's messages since the last take_log()
cdef bint _debug = False


cdef int _collect(libbpf_print_level level, const char *fmt, va_list args) noexcept with gil:
    cdef char *message = NULL
    if level == LIBBPF_DEBUG and not _debug:
        return 0
    if vasprintf(&message, fmt, args) < 0:
        return 0
    try:
        _log.append(message.decode("utf-8", "replace").rstrip("\n"))
    finally:
        free(message)
    return 0


libbpf_set_print(_collect)


def set_debug(bint enabled):
    """Also keep libbpf's debug messages (tcpmon load --log-level debug)."""
    global _debug
    _debug = enabled


def take_log():
    """libbpf's messages since the last call, oldest first."""
    lines = list(_log)
    _log.clear()
    return lines


class LibbpfError(LoadError):
    def __init__(self, call, err, subject):
        self.call = call
        self.errno = err
        self.log = take_log()
        super().__init__(f"{call} {subject}: {strerror(err)}")


cdef inline int check(int ret, str call, subject) except -1:
    # libbpf 1.x returns -errno
    if ret < 0:
        raise LibbpfError(call, -ret, subject)
    return ret


cdef class BpfObject:
    """An opened BPF object file; close() (or the context manager) frees it."""
    cdef bpf_object *obj
    cdef readonly str path

    def __cinit__(self, path):
        self.path = os.fspath(path)
        take_log()
        self.obj = bpf_object__open_file(os.fsencode(self.path), NULL)
        if self.obj == NULL:
            raise LibbpfError("bpf_object__open_file", errno, self.path)

    def __dealloc__(self):
        if self.obj != NULL:
            bpf_object__close(self.obj)

    def close(self):
        """Frees the object; links and pins made from it stay.  Idempotent."""
        if self.obj != NULL:
            bpf_object__close(self.obj)
            self.obj = NULL

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    cdef bpf_program *_program(self, str name) except NULL:
        cdef bpf_program *prog = bpf_object__find_program_by_name(self.obj, name.encode())
        if prog == NULL:
            raise LoadError(f"BPF object {self.path} has no program {name}: rebuild it with 'make bpf'")
        return prog

    cdef bpf_map *_map(self, str name) except NULL:
        cdef bpf_map *m = bpf_object__find_map_by_name(self.obj, name.encode())
        if m == NULL:
            raise LoadError(f"BPF object {self.path} has no map {name}: rebuild it with 'make bpf'")
        return m

    def set_autoload(self, str program, bint autoload):
        check(bpf_program__set_autoload(self._program(program), autoload),
              "bpf_program__set_autoload", program)

    def set_max_entries(self, str map_name, unsigned int max_entries):
        check(bpf_map__set_max_entries(self._map(map_name), max_entries),
              "bpf_map__set_max_entries", map_name)

    def set_pin_path(self, str map_name, path):
        """load() then reuses a compatible map pinned at `path`, or creates and pins one."""
        check(bpf_map__set_pin_path(self._map(map_name), os.fsencode(path)),
              "bpf_map__set_pin_path", map_name)

    def set_rodata(self, bytes data):
        """The program's read-only data (its `const volatile` globals), set before load()."""
        check(bpf_map__set_initial_value(self._map(".rodata"), <const char *>data, len(data)),
              "bpf_map__set_initial_value", f".rodata of {self.path} ({len(data)} bytes)")

    def load(self):
        take_log()
        check(bpf_object__load(self.obj), "bpf_object__load", self.path)

    def attach(self, str program):
        cdef bpf_program *prog = self._program(program)
        cdef bpf_link *link
        take_log()
        with nogil:
            link = bpf_program__attach(prog)
        if link == NULL:
            raise LibbpfError("bpf_program__attach", errno, program)
        result = Link.__new__(Link)
        (<Link>result).link = link
        (<Link>result).program = program
        return result

    def pin_program(self, str program, path):
        check(bpf_program__pin(self._program(program), os.fsencode(path)), "bpf_program__pin", path)


cdef class Link:
    """An attachment.  Dropping it detaches the program unless it was pinned."""
    cdef bpf_link *link
    cdef readonly str program

    def __dealloc__(self):
        if self.link != NULL:
            bpf_link__destroy(self.link)

    def pin(self, path):
        check(bpf_link__pin(self.link, os.fsencode(path)), "bpf_link__pin", path)

    def fileno(self):
        return bpf_link__fd(self.link)

    def destroy(self):
        """Detach now (a pinned link stays attached until its pin is removed).  Idempotent."""
        if self.link != NULL:
            bpf_link__destroy(self.link)
            self.link = NULL
