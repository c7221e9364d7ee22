# Declarations only: the part of libbpf (Debian libbpf-dev, 1.x API) the loader uses.
from libc.stdint cimport uint32_t


cdef extern from "<stdarg.h>":
    ctypedef struct va_list:
        pass


cdef extern from "<stdio.h>" nogil:
    # GNU: allocates the whole message (a verifier log can be megabytes)
    int vasprintf(char **out, const char *fmt, va_list args)


cdef extern from "<bpf/libbpf.h>" nogil:
    struct bpf_object:
        pass
    struct bpf_program:
        pass
    struct bpf_map:
        pass
    struct bpf_link:
        pass
    struct bpf_object_open_opts:
        pass

    enum libbpf_print_level:
        LIBBPF_WARN
        LIBBPF_INFO
        LIBBPF_DEBUG

    ctypedef int (*libbpf_print_fn_t)(libbpf_print_level level, const char *fmt, va_list args) noexcept

    libbpf_print_fn_t libbpf_set_print(libbpf_print_fn_t fn)

    bpf_object *bpf_object__open_file(const char *path, const bpf_object_open_opts *opts)
    int bpf_object__load(bpf_object *obj)
    void bpf_object__close(bpf_object *obj)
    bpf_program *bpf_object__find_program_by_name(const bpf_object *obj, const char *name)
    bpf_map *bpf_object__find_map_by_name(const bpf_object *obj, const char *name)

    int bpf_program__set_autoload(bpf_program *prog, bint autoload)
    bpf_link *bpf_program__attach(const bpf_program *prog)
    int bpf_program__pin(bpf_program *prog, const char *path)
    int bpf_program__fd(const bpf_program *prog)

    int bpf_map__set_max_entries(bpf_map *map, uint32_t max_entries)
    int bpf_map__set_pin_path(bpf_map *map, const char *path)
    int bpf_map__set_initial_value(bpf_map *map, const void *data, size_t size)
    int bpf_map__unpin(bpf_map *map, const char *path)

    int bpf_link__pin(bpf_link *link, const char *path)
    int bpf_link__fd(const bpf_link *link)
    int bpf_link__destroy(bpf_link *link)
