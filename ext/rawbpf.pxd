# Declarations only: the bpf() syscall and the parts of <linux/bpf.h> tcpmon uses.
# union bpf_attr's anonymous structs are declared flat: C reaches their fields
# directly (attr.map_fd), and the named ones (batch, info) as nested structs.
from libc.errno cimport errno
from libc.stdint cimport uint32_t, uint64_t


cdef extern from "<sys/syscall.h>":
    long SYS_bpf


cdef extern from "<unistd.h>" nogil:
    long syscall(long number, ...)


cdef extern from "<linux/bpf.h>":
    enum bpf_cmd:
        BPF_MAP_LOOKUP_ELEM
        BPF_MAP_GET_NEXT_KEY
        BPF_OBJ_GET
        BPF_OBJ_GET_INFO_BY_FD
        BPF_MAP_LOOKUP_BATCH

    enum bpf_map_type:
        BPF_MAP_TYPE_HASH
        BPF_MAP_TYPE_ARRAY
        BPF_MAP_TYPE_PERCPU_HASH
        BPF_MAP_TYPE_PERCPU_ARRAY
        BPF_MAP_TYPE_LRU_HASH
        BPF_MAP_TYPE_LRU_PERCPU_HASH

    enum:
        BPF_F_RDONLY
        BPF_OBJ_NAME_LEN

    # Only ever used through a bpf_attr; never instantiated on its own.
    struct bpf_attr_batch:
        uint64_t in_batch
        uint64_t out_batch
        uint64_t keys
        uint64_t values
        uint32_t count
        uint32_t map_fd
        uint64_t elem_flags
        uint64_t flags

    struct bpf_attr_info:
        uint32_t bpf_fd
        uint32_t info_len
        uint64_t info

    union bpf_attr:
        # BPF_MAP_*_ELEM, BPF_MAP_GET_NEXT_KEY
        uint32_t map_fd
        uint64_t key
        uint64_t value
        uint64_t next_key
        uint64_t flags
        # BPF_OBJ_GET
        uint64_t pathname
        uint32_t bpf_fd
        uint32_t file_flags
        bpf_attr_batch batch
        bpf_attr_info info

    struct bpf_map_info:
        uint32_t type
        uint32_t id
        uint32_t key_size
        uint32_t value_size
        uint32_t max_entries
        uint32_t map_flags
        char name[16]

    struct bpf_prog_info:
        uint32_t type
        uint32_t id
        char name[16]
        uint64_t run_time_ns
        uint64_t run_cnt
        uint64_t recursion_misses

    struct bpf_link_info:
        uint32_t type
        uint32_t id
        uint32_t prog_id


# The ABI structs the hot loops index (their layout comes from the header's lists;
# tcpmon._abi has every field of every struct as data).
cdef extern from "tcpmon.h":
    enum:
        TCPMON_COMM_LEN
        TCPMON_RESULT_COUNT
        TCPMON_RESULT_SUCCESS
        TCPMON_LATENCY_SLOTS

    struct tcpmon_outcome_value:
        uint64_t attempts
        uint64_t results[TCPMON_RESULT_COUNT]
        uint64_t duration_ns
        uint64_t latency[TCPMON_LATENCY_SLOTS]

    struct tcpmon_pid_value:
        uint64_t connects
        char comm[TCPMON_COMM_LEN]

    struct tcpmon_comm_key:
        char comm[TCPMON_COMM_LEN]

    struct tcpmon_counter:
        uint64_t count


cdef inline int sys_bpf(int cmd, bpf_attr *attr, unsigned int size) noexcept nogil:
    """One bpf() call: the fd or 0 on success, -errno on failure."""
    cdef long ret = syscall(SYS_bpf, cmd, attr, size)
    if ret < 0:
        return -errno
    return <int>ret
