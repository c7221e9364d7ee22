"""What a BPF object must hold for this loader, one line each, for scripts/check-bpf-objects.sh:

    program SECTION NAME    every program of every attach mode, in its section
    map NAME                every pinned map
    rodata SIZE             the size of the read-only data the loader sets before load
"""
from tcpmon import attach, maps


def lines():
    for program in attach.PROGRAMS:
        yield f"program {program.section} {program.name}"
    for spec in maps.MAPS:
        yield f"map {spec.name}"
    yield f"rodata {maps.CONFIG.size}"


if __name__ == "__main__":
    print("\n".join(lines()))
