"""unit_sandbox.py UNIT PROGRAM [ARG...]: exec PROGRAM under the UNIT file's
MemoryDenyWriteExecute= and SystemCallFilter=, as systemd would apply them.

Run it with Debian's /usr/bin/python3 (python3-seccomp) after no_new_privs is set
(setpriv --no-new-privs).  MemoryDenyWriteExecute=yes becomes the kernel's
PR_SET_MDWE (Linux 6.3+), which execve keeps; SystemCallFilter= becomes a libseccomp
filter: the first, allow-list assignment sets what is allowed, each later ~deny-list
assignment removes from it, the syscall groups are expanded by systemd-analyze
syscall-filter, and everything else fails with SystemCallErrorNumber=.
"""
import ctypes
import errno
import os
import subprocess
import sys

PR_SET_MDWE = 65
PR_MDWE_REFUSE_EXEC_GAIN = 1


def unit_settings(path):
    settings = {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if "=" in line and not line.startswith(("#", ";", "[")):
                key, _, value = line.partition("=")
                settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def syscall_groups():
    out = subprocess.run(["systemd-analyze", "syscall-filter"], capture_output=True, text=True, check=True).stdout
    groups, current = {}, None
    for line in out.splitlines():
        if line.startswith("@"):
            current = groups.setdefault(line.strip(), set())
        elif line.strip() and not line.strip().startswith("#") and current is not None:
            current.add(line.strip())
    return groups


def expand(names, groups):
    result = set()
    for name in names:
        result |= expand(groups[name], groups) if name.startswith("@") else {name}
    return result


def allowed_syscalls(filters):
    groups = syscall_groups()
    first, *rest = filters
    if first.startswith("~"):
        sys.exit("unit_sandbox: only an allow-list first SystemCallFilter= is supported")
    allowed = expand(first.split(), groups) | expand(["@default"], groups)
    for line in rest:
        names = line.lstrip("~").split()
        allowed = allowed - expand(names, groups) if line.startswith("~") else allowed | expand(names, groups)
    return allowed


def main():
    unit, program = sys.argv[1], sys.argv[2:]
    settings = unit_settings(unit)
    if settings.get("MemoryDenyWriteExecute") == ["yes"]:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
            sys.exit(f"unit_sandbox: PR_SET_MDWE failed: {os.strerror(ctypes.get_errno())} (Linux 6.3+)")
    if settings.get("SystemCallFilter"):
        import seccomp
        err = getattr(errno, settings.get("SystemCallErrorNumber", ["EPERM"])[-1])
        sandbox = seccomp.SyscallFilter(defaction=seccomp.ERRNO(err))
        for name in sorted(allowed_syscalls(settings["SystemCallFilter"])):
            try:
                sandbox.add_rule(seccomp.ALLOW, name)
            except (RuntimeError, ValueError):
                pass  # not a system call of this architecture
        sandbox.load()
    os.execv(program[0], program)


if __name__ == "__main__":
    main()
