# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The exposition hot path: the per-PID family rendered from the reader's raw buffers.

A kernel comm is up to 15 arbitrary bytes.  Label values must be UTF-8, so
valid UTF-8 passes through and every other byte becomes the text \\xNN.
"""
from cpython.bytes cimport PyBytes_FromStringAndSize
from libc.stdint cimport uint32_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy

from rawbpf cimport TCPMON_COMM_LEN, tcpmon_pid_value

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


cdef size_t put_comm(char *out, const unsigned char *comm, bint escape) noexcept nogil:
    """Write the label text of a NUL-terminated comm; with `escape`, in exposition escaping."""
    cdef size_t length = 0, i = 0, o = 0, seq
    cdef unsigned char c
    while length < TCPMON_COMM_LEN and comm[length] != 0:
        length += 1
    while i < length:
        c = comm[i]
        if c < 0x80:
            if escape and (c == c'\\' or c == c'"'):
                out[o] = c'\\'
                out[o + 1] = c
                o += 2
            elif escape and c == c'\n':
                out[o] = c'\\'
                out[o + 1] = c'n'
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
        if escape:
            out[o] = c'\\'
            o += 1
        out[o] = c'\\'
        out[o + 1] = c'x'
        out[o + 2] = HEX[c >> 4]
        out[o + 3] = HEX[c & 15]
        o += 4
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
    cdef size_t n = min(len(comm), <size_t>TCPMON_COMM_LEN)
    memcpy(padded, <const char *>comm, n)
    padded[n] = 0
    return text[:put_comm(text, padded, False)].decode("utf-8")


def render_pid_series(bytes name, const unsigned char[::1] keys,
                      const unsigned char[::1] values, Py_ssize_t count):
    """Sample lines `name{comm="...",pid="N"} connects` for `count` connects-map entries."""
    cdef const char *cname = name
    cdef size_t name_len = len(name)
    cdef size_t line_max = name_len + 18 + TCPMON_COMM_LEN * MAX_BYTE_TEXT + 2 * MAX_U64_TEXT
    cdef size_t used = 0
    cdef Py_ssize_t i
    cdef const uint32_t *pids
    cdef const tcpmon_pid_value *entries
    if count < 0 or keys.shape[0] < count * sizeof(uint32_t) \
            or values.shape[0] < count * sizeof(tcpmon_pid_value):
        raise ValueError(f"buffers too small for {count} connects entries")
    if count == 0:
        return b""
    pids = <const uint32_t *>&keys[0]
    entries = <const tcpmon_pid_value *>&values[0]
    cdef char *out = <char *>malloc(line_max * count)
    if out == NULL:
        raise MemoryError()
    try:
        with nogil:
            for i in range(count):
                memcpy(out + used, cname, name_len)
                used += name_len
                memcpy(out + used, b'{comm="', 7)
                used += 7
                used += put_comm(out + used, <const unsigned char *>entries[i].comm, True)
                memcpy(out + used, b'",pid="', 7)
                used += 7
                used += put_u64(out + used, pids[i])
                memcpy(out + used, b'"} ', 3)
                used += 3
                used += put_u64(out + used, entries[i].connects)
                out[used] = c'\n'
                used += 1
        return PyBytes_FromStringAndSize(out, used)
    finally:
        free(out)
