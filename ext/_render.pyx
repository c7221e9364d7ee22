# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The exposition hot path: the two big families rendered from the reader's raw buffers.

A kernel comm is up to 15 arbitrary bytes; label values must be UTF-8 and two
comms must never share a label (duplicate series).  So valid UTF-8 passes
through, and a backslash, a control character or any byte that is not valid
UTF-8 becomes the text \\xNN: the mapping is one-to-one.
"""
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from cpython.object cimport PyObject
from cpython.ref cimport Py_DECREF, Py_INCREF, Py_XDECREF
from libc.stdint cimport uint32_t, uint64_t
from libc.string cimport memcpy

from libc.stdint cimport int32_t
from libc.string cimport memset

from rawbpf cimport (TCPMON_COMM_LEN, TCPMON_LATENCY_SLOTS, TCPMON_RESULT_COUNT, TCPMON_RESULT_SUCCESS,
                     tcpmon_comm_key, tcpmon_outcome_value, tcpmon_pid_value)

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


cdef extern from *:
    """
    #if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    #define TCPMON_LITTLE_ENDIAN 1
    #else
    #define TCPMON_LITTLE_ENDIAN 0
    #endif
    #define TCPMON_ONES 0x0101010101010101ULL
    #define TCPMON_HIGHS 0x8080808080808080ULL
    #define TCPMON_FILLER 0x4141414141414141ULL
    """
    bint TCPMON_LITTLE_ENDIAN
    int __builtin_ctzll(unsigned long long) noexcept nogil
    const uint64_t ONES "TCPMON_ONES"
    const uint64_t HIGHS "TCPMON_HIGHS"
    const uint64_t FILLER "TCPMON_FILLER"   # "AAAAAAAA": plain bytes in place of those past the NUL


cdef inline uint64_t zero_bytes(uint64_t x) noexcept nogil:
    """The high bit of x's first zero byte is the lowest bit set (0: no zero byte)."""
    return (x - ONES) & ~x & HIGHS


cdef inline bint plain_word(uint64_t x) noexcept nogil:
    """Every byte of x is printable ASCII other than a backslash or a quote: written as it is."""
    return (((x - 0x20 * ONES) & ~x)             # a byte below 0x20
            | ((x + ONES) | x)                    # a byte above 0x7e
            | zero_bytes(x ^ (0x5c * ONES))       # a backslash
            | zero_bytes(x ^ (0x22 * ONES))) & HIGHS == 0   # a quote


cdef inline uint64_t first_bytes(uint64_t word, uint64_t zero, size_t *length) noexcept nogil:
    """word with the bytes from its first zero byte on replaced by FILLER; adds the bytes
    before it to `length`."""
    cdef int n
    if zero == 0:
        length[0] += 8
        return word
    n = __builtin_ctzll(zero) >> 3
    length[0] += n
    if n == 0:
        return FILLER
    return (word & ((1ULL << (8 * n)) - 1)) | (FILLER & ~((1ULL << (8 * n)) - 1))


cdef inline size_t put_plain_comm(char *out, const unsigned char *comm) noexcept nogil:
    """Most comms are plain printable ASCII: then their bytes up to the NUL, copied 16 at a time
    (the caller has room), and their length; else 0 (an empty comm also gives 0)."""
    cdef uint64_t w0, w1
    cdef size_t length = 0
    if not TCPMON_LITTLE_ENDIAN:
        return 0
    memcpy(&w0, comm, 8)
    memcpy(&w1, comm + 8, 8)
    w0 = first_bytes(w0, zero_bytes(w0), &length)
    if length == 8:
        w1 = first_bytes(w1, zero_bytes(w1), &length)
    else:
        w1 = FILLER
    if not (plain_word(w0) and plain_word(w1)):
        return 0
    memcpy(out, comm, TCPMON_COMM_LEN)
    return length


cdef size_t put_comm(char *out, const unsigned char *comm, bint escape) noexcept nogil:
    """Write the label text of a NUL-terminated comm; with `escape`, in exposition escaping."""
    cdef size_t length = put_plain_comm(out, comm), i = 0, o = 0, seq
    if length:
        return length
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


cdef const char *DIGIT_PAIRS = (b"00010203040506070809101112131415161718192021222324252627282930313233343536373839"
                                b"40414243444546474849505152535455565758596061626364656667686970717273747576777879"
                                b"8081828384858687888990919293949596979899")


cdef size_t put_u64(char *out, uint64_t value) noexcept nogil:
    """Decimal digits, two at a time (half the divisions: this runs twice per PID line)."""
    cdef char digits[MAX_U64_TEXT]
    cdef size_t n = MAX_U64_TEXT
    cdef uint64_t pair
    while value >= 100:
        pair = value % 100
        value //= 100
        n -= 2
        digits[n] = DIGIT_PAIRS[2 * pair]
        digits[n + 1] = DIGIT_PAIRS[2 * pair + 1]
    if value >= 10:
        n -= 2
        digits[n] = DIGIT_PAIRS[2 * value]
        digits[n + 1] = DIGIT_PAIRS[2 * value + 1]
    else:
        n -= 1
        digits[n] = c'0' + <char>value
    memcpy(out, digits + n, MAX_U64_TEXT - n)
    return MAX_U64_TEXT - n


def comm_label(bytes comm):
    """The label value tcpmon shows for a raw comm (at most 16 bytes, NUL-terminated or not)."""
    cdef unsigned char padded[TCPMON_COMM_LEN + 1]
    cdef char text[TCPMON_COMM_LEN * MAX_BYTE_TEXT]
    cdef Py_ssize_t n = min(len(comm), <Py_ssize_t>TCPMON_COMM_LEN)
    memcpy(padded, <const char *>comm, n)
    padded[n] = 0
    return text[:put_comm(text, padded, False)].decode("utf-8")


cdef extern from "Python.h":
    int _PyBytes_Resize(PyObject **bytes, Py_ssize_t newsize) except -1


cdef class _Lines:
    """Sample lines written straight into a bytes object sized for the worst case, cut to what
    was written at the end: realloc shrinks it in place, so the lines are never copied (at 100k
    PIDs a copy was 5 MB per scrape).  The exporter keeps freed memory for the next scrape
    (tcpmon.server.keep_freed_memory), so the pages are not faulted in anew each time."""
    cdef PyObject *body    # owned until take()
    cdef char *buf
    cdef size_t used
    cdef bytes opening     # name{comm="
    cdef const char *open_at
    cdef size_t open_len

    def __cinit__(self, bytes name, Py_ssize_t count):
        # name{comm="<comm>",pid="<u32>"} <u64>\n
        cdef size_t line_max = len(name) + 18 + TCPMON_COMM_LEN * MAX_BYTE_TEXT + 2 * MAX_U64_TEXT
        body = PyBytes_FromStringAndSize(NULL, line_max * count + 1)
        Py_INCREF(body)
        self.body = <PyObject *>body
        self.buf = PyBytes_AS_STRING(body)
        self.used = 0
        self.opening = name + b'{comm="'
        self.open_at = self.opening
        self.open_len = len(self.opening)

    def __dealloc__(self):
        Py_XDECREF(self.body)

    cdef inline void sample(self, const char *comm, const uint32_t *pid, uint64_t value) noexcept nogil:
        """name{comm="...",pid="..."} value, without the pid label when `pid` is NULL."""
        cdef char *at = self.buf + self.used
        memcpy(at, self.open_at, self.open_len)
        at += self.open_len
        at += put_comm(at, <const unsigned char *>comm, True)
        if pid != NULL:
            memcpy(at, b'",pid="', 7)
            at += 7
            at += put_u64(at, pid[0])
        memcpy(at, b'"} ', 3)
        at += 3
        at += put_u64(at, value)
        at[0] = c'\n'
        self.used = at + 1 - self.buf

    cdef bytes take(self):
        cdef PyObject *body = self.body
        self.body = NULL
        _PyBytes_Resize(&body, self.used)   # on failure it frees the object and raises
        lines = <bytes>body
        Py_DECREF(lines)   # the reference owned since __cinit__; `lines` holds its own
        return lines


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


cdef size_t put_seconds(char *out, uint64_t ns) noexcept nogil:
    """ns as decimal seconds, exactly: whole seconds, then up to nine digits, trailing zeros cut."""
    cdef size_t n = put_u64(out, ns // 1000000000)
    cdef uint64_t frac = ns % 1000000000
    cdef int digits = 9, i
    if frac == 0:
        return n
    while frac % 10 == 0:
        frac //= 10
        digits -= 1
    out[n] = c'.'
    for i in range(digits, 0, -1):
        out[n + i] = c'0' + <char>(frac % 10)
        frac //= 10
    return n + 1 + digits


cdef class _Text:
    """A growing output buffer of sample lines."""
    cdef bytearray buf
    cdef Py_ssize_t used

    def __cinit__(self, Py_ssize_t size):
        self.buf = bytearray(size)
        self.used = 0

    cdef char *room(self, Py_ssize_t need) except NULL:
        if self.used + need > len(self.buf):
            self.buf.extend(bytes(max(need, len(self.buf))))
        return <char *>self.buf + self.used

    cdef void put(self, const char *text, Py_ssize_t n) except *:
        memcpy(self.room(n), text, n)
        self.used += n

    cdef bytes take(self):
        return bytes(memoryview(self.buf)[:self.used])   # one copy (a bytearray slice would be two)


def _group_sums(const unsigned char[::1] values, Py_ssize_t stride, Py_ssize_t count,
                const int32_t[::1] group_of, Py_ssize_t groups, Py_ssize_t width):
    """Per group, the sum of the first `width` u64 of every entry in it (-1: left out)."""
    cdef uint64_t[::1] sums = memoryview(bytearray(max(groups, 1) * width * sizeof(uint64_t))).cast("Q")
    cdef const uint64_t *entry
    cdef Py_ssize_t i, j, g
    if <size_t>values.shape[0] < <size_t>(count * stride) or group_of.shape[0] < count:
        raise ValueError(f"buffers too small for {count} entries")
    with nogil:
        for i in range(count):
            g = group_of[i]
            if g < 0 or g >= groups:
                continue
            entry = <const uint64_t *>&values[i * stride]
            for j in range(width):
                sums[g * width + j] += entry[j]
    return sums


def render_outcomes(bytes results_name, bytes latency_name, list results, list bounds,
                    const unsigned char[::1] values, Py_ssize_t count,
                    const int32_t[::1] group_of, list group_labels):
    """The sample lines of the two outcome families, entries of the outcomes map summed per
    label set: entry i belongs to group_of[i] (-1: left out), whose label text (escaped,
    without braces) is group_labels[group_of[i]].  `results` are the result labels and `bounds`
    the le values of all but the last latency slot.  Returns (counter lines, histogram lines)."""
    cdef Py_ssize_t groups = len(group_labels), width = sizeof(tcpmon_outcome_value) // 8, g, r
    cdef uint64_t[::1] sums = _group_sums(values, sizeof(tcpmon_outcome_value), count, group_of, groups, width)
    cdef _Text counters = _Text(groups * 6 * 96 + 1), histogram = _Text(groups * 30 * 112 + 1)
    cdef const tcpmon_outcome_value *total
    cdef uint64_t cumulative
    cdef char number[48]
    cdef bytes labels, text
    if len(results) != TCPMON_RESULT_COUNT or len(bounds) != TCPMON_LATENCY_SLOTS - 1:
        raise ValueError("results and bounds do not match the ABI")
    for g in range(groups):
        labels = group_labels[g]
        total = <const tcpmon_outcome_value *>&sums[g * width]
        for r in range(TCPMON_RESULT_COUNT):
            text = results[r]
            _sample(counters, results_name, b"_total{", labels, b',result="', text, b'"} ', total.results[r])
        cumulative = 0
        for r in range(TCPMON_LATENCY_SLOTS - 1):
            cumulative += total.latency[r]
            text = bounds[r]
            _sample(histogram, latency_name, b"_bucket{", labels, b',le="', text, b'"} ', cumulative)
        _sample(histogram, latency_name, b"_bucket{", labels, b',le="', b"+Inf", b'"} ',
                total.results[TCPMON_RESULT_SUCCESS])
        histogram.put(latency_name, len(latency_name))
        histogram.put("_sum{", 5)
        histogram.put(labels, len(labels))
        histogram.put("} ", 2)
        histogram.put(number, put_seconds(number, total.duration_ns))
        histogram.put("\n", 1)
        _sample(histogram, latency_name, b"_count{", labels, b"", b"", b"} ", total.results[TCPMON_RESULT_SUCCESS])
    return counters.take(), histogram.take()


def render_grouped_counters(bytes sample_name, const unsigned char[::1] values, Py_ssize_t stride,
                            Py_ssize_t count, const int32_t[::1] group_of, list group_labels):
    """`sample_name{labels} total` per group, totals summed from the first u64 of each entry."""
    cdef Py_ssize_t groups = len(group_labels), g
    cdef uint64_t[::1] sums = _group_sums(values, stride, count, group_of, groups, 1)
    cdef _Text out = _Text(groups * 128 + 1)
    for g in range(groups):
        _sample(out, sample_name, b"{", group_labels[g], b"", b"", b"} ", sums[g])
    return out.take()


cdef void _sample(_Text out, bytes name, bytes open_, bytes labels, bytes sep, bytes extra, bytes close,
                  uint64_t value) except *:
    """One sample line: room is made once for the whole line, then the pieces are copied in."""
    cdef Py_ssize_t n_name = len(name), n_open = len(open_), n_labels = len(labels), n_sep = len(sep)
    cdef Py_ssize_t n_extra = len(extra), n_close = len(close)
    cdef char *at = out.room(n_name + n_open + n_labels + n_sep + n_extra + n_close + MAX_U64_TEXT + 1)
    cdef char *start = at
    memcpy(at, <const char *>name, n_name)
    at += n_name
    memcpy(at, <const char *>open_, n_open)
    at += n_open
    memcpy(at, <const char *>labels, n_labels)
    at += n_labels
    memcpy(at, <const char *>sep, n_sep)
    at += n_sep
    memcpy(at, <const char *>extra, n_extra)
    at += n_extra
    memcpy(at, <const char *>close, n_close)
    at += n_close
    at += put_u64(at, value)
    at[0] = c'\n'
    out.used += at + 1 - start
