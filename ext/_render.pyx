# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The exposition hot path: the two big families rendered from the reader's raw buffers.

A kernel comm is up to 15 arbitrary bytes; label values must be UTF-8 and two
comms must never share a label (duplicate series).  So valid UTF-8 passes
through, and a backslash, a control character or any byte that is not valid
UTF-8 becomes the text \\xNN: the mapping is one-to-one.
"""
from cpython.bytes cimport PyBytes_FromStringAndSize
from libc.stdint cimport uint32_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy

from rawbpf cimport TCPMON_COMM_LEN, tcpmon_comm_key, tcpmon_pid_value

cdef const char *HEX = b"0123456789abcdef"
cdef enum:
    MAX_BYTE_TEXT = 5   # longest rendering of one comm byte: \\xNN escaped for exposition
    MAX_U64_TEXT = 20


cdef inline size_t utf8_sequence_length(const unsigned char *s, size_t left) noexcept nogil:
    """Length of the valid UTF-8 sequence starting at s, or 0 if it is not valid."""
    cdef unsigned char c = s[0]
    cdef size_t need, i
    if c < 0xC2 or c > 0xF4:
        return 0
    need = 2 if c < 0xE0 else (3 if c < 0xF0 else 4)
    if need > left:
        return 0
    for i in range(1, need):
        if (s[i] & 0xC0) != 0x80:
            return 0
    # overlong 3-byte forms, UTF-16 surrogates, overlong 4-byte forms, > U+10FFFF
    if (c == 0xE0 and s[1] < 0xA0) or (c == 0xED and s[1] > 0x9F) \
            or (c == 0xF0 and s[1] < 0x90) or (c == 0xF4 and s[1] > 0x8F):
        return 0
    return need


cdef inline size_t put_hex_byte(char *out, unsigned char c, bint escape) noexcept nogil:
    """The text \\xNN (its backslash doubled for exposition when `escape`)."""
    cdef size_t o = 0
    if escape:
        out[0] = c'\\'
        o = 1
    out[o] = c'\\'
    out[o + 1] = c'x'
    out[o + 2] = HEX[c >> 4]
    out[o + 3] = HEX[c & 15]
    return o + 4


cdef size_t put_comm(char *out, const unsigned char *comm, bint escape) noexcept nogil:
    """Write the label text of a NUL-terminated comm; with `escape`, in exposition escaping."""
    cdef size_t length = 0, i = 0, o = 0, seq
    cdef unsigned char c
    while length < TCPMON_COMM_LEN and comm[length] != 0:
        length += 1
    while i < length:
        c = comm[i]
        if c < 0x80:
            if c == c'\\' or c < 0x20 or c == 0x7f:
                o += put_hex_byte(out + o, c, escape)
            elif escape and c == c'"':
                out[o] = c'\\'
                out[o + 1] = c
                o += 2
            else:
                out[o] = c
                o += 1
            i += 1
            continue
        seq = utf8_sequence_length(comm + i, length - i)
        if seq:
            memcpy(out + o, comm + i, seq)
            o += seq
            i += seq
            continue
        o += put_hex_byte(out + o, c, escape)
        i += 1
    return o


cdef size_t put_u64(char *out, uint64_t value) noexcept nogil:
    cdef char digits[20]
    cdef size_t n = 0, i
    while True:
        digits[n] = c'0' + <char>(value % 10)
        value //= 10
        n += 1
        if value == 0:
            break
    for i in range(n):
        out[i] = digits[n - 1 - i]
    return n


def comm_label(bytes comm):
    """The label value tcpmon shows for a raw comm (at most 16 bytes, NUL-terminated or not)."""
    cdef unsigned char padded[TCPMON_COMM_LEN + 1]
    cdef char text[TCPMON_COMM_LEN * MAX_BYTE_TEXT]
    cdef Py_ssize_t n = min(len(comm), <Py_ssize_t>TCPMON_COMM_LEN)
    memcpy(padded, <const char *>comm, n)
    padded[n] = 0
    return text[:put_comm(text, padded, False)].decode("utf-8")


cdef class _Lines:
    """Sample lines in a malloc'd buffer sized for the worst case, turned into bytes at the end."""
    cdef char *buf
    cdef size_t used
    cdef const char *name
    cdef size_t name_len

    def __cinit__(self, bytes name, Py_ssize_t count):
        # name{comm="<comm>",pid="<u32>"} <u64>\n
        cdef size_t line_max = len(name) + 18 + TCPMON_COMM_LEN * MAX_BYTE_TEXT + 2 * MAX_U64_TEXT
        self.buf = <char *>malloc(line_max * count + 1)
        if self.buf == NULL:
            raise MemoryError()
        self.used = 0
        self.name = name
        self.name_len = len(name)

    def __dealloc__(self):
        free(self.buf)

    cdef inline void put(self, const char *text, size_t n) noexcept nogil:
        memcpy(self.buf + self.used, text, n)
        self.used += n

    cdef inline void sample(self, const char *comm, const uint32_t *pid, uint64_t value) noexcept nogil:
        """name{comm="...",pid="..."} value, without the pid label when `pid` is NULL."""
        self.put(self.name, self.name_len)
        self.put('{comm="', 7)
        self.used += put_comm(self.buf + self.used, <const unsigned char *>comm, True)
        if pid != NULL:
            self.put('",pid="', 7)
            self.used += put_u64(self.buf + self.used, pid[0])
        self.put('"} ', 3)
        self.used += put_u64(self.buf + self.used, value)
        self.put('\n', 1)

    cdef bytes take(self):
        return PyBytes_FromStringAndSize(self.buf, self.used)


cdef void check_buffers(const unsigned char[::1] keys, size_t key_size,
                        const unsigned char[::1] values, size_t value_size, Py_ssize_t count) except *:
    if count < 0 or <size_t>keys.shape[0] < count * key_size \
            or <size_t>values.shape[0] < count * value_size:
        raise ValueError(f"buffers too small for {count} entries")


def render_pid_series(bytes name, const unsigned char[::1] keys,
                      const unsigned char[::1] values, Py_ssize_t count):
    """Sample lines `name{comm="...",pid="N"} connects` from `count` entries of the connects map."""
    check_buffers(keys, sizeof(uint32_t), values, sizeof(tcpmon_pid_value), count)
    cdef _Lines lines = _Lines(name, count)
    cdef const uint32_t *pids = <const uint32_t *>&keys[0] if count else NULL
    cdef const tcpmon_pid_value *entries = <const tcpmon_pid_value *>&values[0] if count else NULL
    cdef Py_ssize_t i
    with nogil:
        for i in range(count):
            lines.sample(entries[i].comm, &pids[i], entries[i].connects)
    return lines.take()


def render_comm_series(bytes name, const unsigned char[::1] keys,
                       const unsigned char[::1] values, Py_ssize_t count):
    """Sample lines `name{comm="..."} total` from `count` entries of the comm_totals map."""
    check_buffers(keys, sizeof(tcpmon_comm_key), values, sizeof(uint64_t), count)
    cdef _Lines lines = _Lines(name, count)
    cdef const tcpmon_comm_key *comms = <const tcpmon_comm_key *>&keys[0] if count else NULL
    cdef const uint64_t *totals = <const uint64_t *>&values[0] if count else NULL
    cdef Py_ssize_t i
    with nogil:
        for i in range(count):
            lines.sample(comms[i].comm, NULL, totals[i])
    return lines.take()
