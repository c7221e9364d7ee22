# cython: language_level=3
"""bpf/tcpmon.h as data: every pinned map, the fields of every ABI struct, and the
constants both sides share.  The C preprocessor expands the header's own lists into
the tables below, so user space never declares a layout a second time
(tcpmon/maps.py builds its map descriptions from these tables)."""

cdef extern from *:
    """
    #include <stddef.h>
    #include <linux/bpf.h>
    #include "tcpmon.h"

    struct abi_field { const char *name; unsigned int offset, size, count; char kind; };
    struct abi_struct { const char *name; unsigned int size; const struct abi_field *fields; };
    struct abi_map {
        const char *name; unsigned int type; const char *key, *value;
        unsigned int key_size, value_size, max_entries; char key_kind;
    };

    /* the struct module's code of each field type */
    #define ABI_KIND(type) _Generic((type *)0, char *: 'c', __u8 *: 'B', __u16 *: 'H', __u32 *: 'I', \
                                    __u64 *: 'Q', default: 0)
    #define ABI_FIELD(S, type, name) { #name, offsetof(struct S, name), sizeof(type), 1, ABI_KIND(type) },
    #define ABI_ARRAY(S, type, name, n) { #name, offsetof(struct S, name), sizeof(type), n, ABI_KIND(type) },
    #define ABI_FIELDS(name, FIELDS) \
        static const struct abi_field name##_fields[] = { FIELDS(name, ABI_FIELD, ABI_ARRAY) { 0 } };
    TCPMON_STRUCTS(ABI_FIELDS)

    #define ABI_STRUCT(name, FIELDS) { #name, sizeof(struct name), name##_fields },
    static const struct abi_struct abi_structs[] = { TCPMON_STRUCTS(ABI_STRUCT) { 0 } };

    #define ABI_MAP(name, type, key, value, max) \
        { #name, BPF_MAP_TYPE_##type, #key, #value, sizeof(key), sizeof(value), max, ABI_KIND(key) },
    static const struct abi_map abi_maps[] = { TCPMON_MAPS(ABI_MAP) { 0 } };

    #define ABI_LABEL(NAME, label) #label,
    static const char *abi_results[] = { TCPMON_RESULTS(ABI_LABEL) NULL };
    static const char *abi_failure_maps[] = { TCPMON_FAILURES(ABI_LABEL) NULL };
    """
    struct abi_field:
        const char *name
        unsigned int offset, size, count
        char kind

    struct abi_struct:
        const char *name
        unsigned int size
        const abi_field *fields

    struct abi_map:
        const char *name
        unsigned int type
        const char *key
        const char *value
        unsigned int key_size, value_size, max_entries
        char key_kind

    const abi_struct abi_structs[]
    const abi_map abi_maps[]
    const char *abi_results[]
    const char *abi_failure_maps[]

cdef extern from "tcpmon.h":
    enum:
        TCPMON_ABI_VERSION
        TCPMON_COMM_LEN
        TCPMON_LATENCY_SLOTS
    const char *TCPMON_PIN_CONNECT_LINK
    const char *TCPMON_PIN_OUTCOME_LINK
    const char *TCPMON_PIN_EXIT_LINK
    const char *TCPMON_PIN_CONNECT_PROG
    const char *TCPMON_PIN_OUTCOME_PROG
    const char *TCPMON_PIN_EXIT_PROG


cdef list _strings(const char **table):
    cdef list out = []
    cdef Py_ssize_t i = 0
    while table[i] != NULL:
        out.append(table[i].decode())
        i += 1
    return out


cdef list _fields(const abi_field *row):
    cdef list out = []
    while row.name != NULL:
        out.append((row.name.decode(), row.offset, row.size, row.count, chr(row.kind)))
        row += 1
    return out


def _structs():
    cdef dict out = {}
    cdef const abi_struct *row = abi_structs
    while row.name != NULL:
        out[row.name.decode()] = (row.size, tuple(_fields(row.fields)))
        row += 1
    return out


def _layout_name(const char *ctype, unsigned int size, char kind):
    """The struct name of a map's key or value type; a scalar key (an array index)
    becomes a struct of one field, `index`, entered in STRUCTS."""
    name = ctype.decode()
    if name.startswith("struct "):
        return name[len("struct "):]
    STRUCTS[name] = (size, (("index", 0, size, 1, chr(kind)),))
    return name


def _maps():
    cdef list out = []
    cdef const abi_map *row = abi_maps
    while row.name != NULL:
        out.append((row.name.decode(), row.type, _layout_name(row.key, row.key_size, row.key_kind),
                    _layout_name(row.value, row.value_size, 0), row.max_entries))
        row += 1
    return tuple(out)


ABI_VERSION = TCPMON_ABI_VERSION
COMM_LEN = TCPMON_COMM_LEN
LATENCY_SLOTS = TCPMON_LATENCY_SLOTS
RESULTS = tuple(_strings(abi_results))            # result labels, by enum tcpmon_result
FAILURE_MAPS = tuple(_strings(abi_failure_maps))  # update_failures slot -> the map that was full
STRUCTS = _structs()                               # name -> (size, ((field, offset, size, count, kind), ...))
MAPS = _maps()                                     # (name, map type, key struct, value struct, max_entries)
PINS = {"connect_link": TCPMON_PIN_CONNECT_LINK.decode(), "outcome_link": TCPMON_PIN_OUTCOME_LINK.decode(),
        "exit_link": TCPMON_PIN_EXIT_LINK.decode(), "connect_prog": TCPMON_PIN_CONNECT_PROG.decode(),
        "outcome_prog": TCPMON_PIN_OUTCOME_PROG.decode(), "exit_prog": TCPMON_PIN_EXIT_PROG.decode()}
