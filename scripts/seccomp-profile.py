#!/usr/bin/env python3
"""Writes the seccomp profile tcpmon's containers run under with podman: the engine's own
default profile (containers-common's seccomp.json), plus bpf(2) for a container that holds
CAP_BPF and perf_event_open(2) for one that holds CAP_PERFMON.

containers-common allows both calls only with CAP_SYS_ADMIN (and denies them otherwise with
an explicit EPERM rule); containerd's RuntimeDefault and Docker 23+ allow them with the
narrower capabilities, which is what the chart's loader and exporter hold.  The profile is
generated from the installed default rather than checked in, so it follows the engine's
updates.

Usage: seccomp-profile.py [--default PATH] OUT
"""
import argparse
import copy
import json
import sys

DEFAULT = "/usr/share/containers/seccomp.json"
# syscall -> the capability that allows it (besides CAP_SYS_ADMIN)
GRANTS = {"bpf": "CAP_BPF", "perf_event_open": "CAP_PERFMON"}


def widen(profile):
    """The profile with each syscall of GRANTS allowed to a holder of its capability."""
    rules = []
    for rule in profile["syscalls"]:
        granted = [name for name in rule["names"] if name in GRANTS]
        denies = bool(rule.get("excludes", {}).get("caps")) and rule["action"] != "SCMP_ACT_ALLOW"
        if not (granted and denies):
            rules.append(rule)
            continue
        # a deny for those without CAP_SYS_ADMIN: it must not apply to the capability's holder either
        rest = [name for name in rule["names"] if name not in GRANTS]
        if rest:
            rules.append({**rule, "names": rest})
        for name in granted:
            split = copy.deepcopy(rule)
            split["names"] = [name]
            split["excludes"]["caps"] = rule["excludes"]["caps"] + [GRANTS[name]]
            rules.append(split)
    for name, cap in GRANTS.items():
        rules.append({"names": [name], "action": "SCMP_ACT_ALLOW", "args": [],
                      "comment": f"tcpmon: {name} with {cap}, as containerd's RuntimeDefault",
                      "includes": {"caps": [cap]}, "excludes": {}})
    return {**profile, "syscalls": rules}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--default", default=DEFAULT, help=f"the engine's default profile ({DEFAULT})")
    parser.add_argument("out")
    args = parser.parse_args()
    try:
        with open(args.default) as f:
            profile = json.load(f)
    except OSError as error:
        sys.exit(f"tcpmon: no default seccomp profile at {args.default} ({error.strerror}): "
                 "install golang-github-containers-common (comes with podman)")
    with open(args.out, "w") as f:
        json.dump(widen(profile), f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
