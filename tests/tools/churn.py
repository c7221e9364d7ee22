"""Keeps a pinned hash map full while replacing its keys as fast as it can.

Run as `python churn.py PATH`: the map must have 4-byte keys and values of at least
8 bytes.  It fills the map with keys 0..max_entries-1, prints "full" and then, until
stdin closes, deletes the oldest key and inserts the next new one, so the map stays
full and every key it ever holds is new.  Key k always carries the value k (the
first 8 bytes, little-endian; the rest zero), so a reader can check that every
key it read came with its own value.
"""
import ctypes
import os
import select
import struct
import sys

SYS_BPF = 321  # x86_64; aarch64: 280
BPF_MAP_UPDATE_ELEM, BPF_MAP_DELETE_ELEM, BPF_OBJ_GET, BPF_OBJ_GET_INFO_BY_FD = 2, 3, 7, 15
BPF_NOEXIST = 1

libc = ctypes.CDLL(None, use_errno=True)


class ElemAttr(ctypes.Structure):
    _fields_ = [("map_fd", ctypes.c_uint32), ("pad", ctypes.c_uint32), ("key", ctypes.c_uint64),
                ("value", ctypes.c_uint64), ("flags", ctypes.c_uint64)]


class ObjAttr(ctypes.Structure):
    _fields_ = [("pathname", ctypes.c_uint64), ("bpf_fd", ctypes.c_uint32), ("file_flags", ctypes.c_uint32)]


class InfoAttr(ctypes.Structure):
    _fields_ = [("bpf_fd", ctypes.c_uint32), ("info_len", ctypes.c_uint32), ("info", ctypes.c_uint64)]


def bpf(cmd, attr):
    ret = libc.syscall(SYS_BPF if os.uname().machine == "x86_64" else 280, cmd,
                       ctypes.byref(attr), ctypes.sizeof(attr))
    if ret < 0:
        raise OSError(ctypes.get_errno(), f"bpf({cmd}): {os.strerror(ctypes.get_errno())}")
    return ret


def open_map(path):
    name = ctypes.create_string_buffer(os.fsencode(path))
    fd = bpf(BPF_OBJ_GET, ObjAttr(pathname=ctypes.addressof(name)))
    info = (ctypes.c_uint32 * 20)()
    bpf(BPF_OBJ_GET_INFO_BY_FD, InfoAttr(bpf_fd=fd, info_len=ctypes.sizeof(info), info=ctypes.addressof(info)))
    key_size, value_size, max_entries = info[2], info[3], info[4]
    assert key_size == 4 and value_size >= 8, (key_size, value_size)
    return fd, value_size, max_entries


def main():
    fd, value_size, max_entries = open_map(sys.argv[1])
    key = ctypes.create_string_buffer(4)
    value = ctypes.create_string_buffer(value_size)
    update = ElemAttr(map_fd=fd, key=ctypes.addressof(key), value=ctypes.addressof(value), flags=BPF_NOEXIST)
    delete = ElemAttr(map_fd=fd, key=ctypes.addressof(key))  # fields past the key must be zero

    def put(k):
        key.raw = struct.pack("=I", k)
        value.raw = struct.pack("=Q", k).ljust(value_size, b"\0")
        bpf(BPF_MAP_UPDATE_ELEM, update)

    def drop(k):
        key.raw = struct.pack("=I", k)
        bpf(BPF_MAP_DELETE_ELEM, delete)

    for k in range(max_entries):
        put(k)
    print("full", flush=True)
    oldest = 0
    while True:
        for _ in range(1000):
            drop(oldest)
            put(oldest + max_entries)
            oldest += 1
        if select.select([sys.stdin], [], [], 0)[0]:
            return  # stdin closed or written: stop


if __name__ == "__main__":
    main()
