"""no_batch.py PROGRAM [ARG...]: exec PROGRAM where bpf(BPF_MAP_LOOKUP_BATCH) fails with
EINVAL, as on a kernel without batch lookups (before 5.6); every other system call works.

Run it with Debian's /usr/bin/python3 (python3-seccomp).  The libseccomp filter stays
in force across execve, for PROGRAM and everything it starts.
"""
import errno
import os
import sys

import seccomp

BPF_MAP_LOOKUP_BATCH = 24  # enum bpf_cmd in <linux/bpf.h>


def main():
    sandbox = seccomp.SyscallFilter(defaction=seccomp.ALLOW)
    sandbox.add_rule(seccomp.ERRNO(errno.EINVAL), "bpf", seccomp.Arg(0, seccomp.EQ, BPF_MAP_LOOKUP_BATCH))
    sandbox.load()
    os.execv(sys.argv[1], sys.argv[1:])


if __name__ == "__main__":
    main()
