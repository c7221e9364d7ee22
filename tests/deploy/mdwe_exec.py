"""mdwe_exec.py PROGRAM [ARG...]: exec PROGRAM with the kernel's memory-deny-write-execute
(PR_SET_MDWE, Linux 6.3+), which execve keeps: what MemoryDenyWriteExecute=yes enforces."""
import ctypes
import os
import sys

PR_SET_MDWE = 65
PR_MDWE_REFUSE_EXEC_GAIN = 1

libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
    sys.exit(f"mdwe_exec: PR_SET_MDWE failed: {os.strerror(ctypes.get_errno())} (needs Linux 6.3 or later)")
os.execv(sys.argv[1], sys.argv[1:])
