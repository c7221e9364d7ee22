"""The runtime dependency closure of tcpmon, pinned to the versions a Python environment has.

    .venv/bin/python kernels/runtime_deps.py [--machine aarch64]   -> name==version, one a line

kernels/build-rootfs.sh puts these wheels in the arm64 guest's root, so the guest
runs the versions the host's .venv tests with.  The closure starts at tcpmon's own
requirements (read from setup.py through the installed distribution's metadata),
leaves out extras, and evaluates environment markers for the guest (Linux, CPython
3.11, MACHINE), not for the host.
"""
import argparse
import importlib.metadata as metadata
import platform
import re
import sys

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name


def guest_environment(machine):
    env = default_environment()
    env.update(platform_machine=machine, sys_platform="linux", platform_system="Linux",
               os_name="posix", implementation_name="cpython", platform_python_implementation="CPython",
               python_version="3.11", python_full_version="3.11.2")
    return env


def closure(root, env):
    """{canonical name: (distribution name, version)} of everything ROOT needs at run time."""
    found, queue = {}, [root]
    while queue:
        name = queue.pop()
        key = canonicalize_name(name)
        if key in found:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            sys.exit(f"runtime_deps: {name} is not installed in {sys.prefix}: run 'make build'")
        found[key] = (dist.metadata["Name"], dist.version)
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate(dict(env, extra="")):
                queue.append(req.name)
    return found


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--machine", default=platform.machine())
    args = parser.parse_args()
    found = closure("tcpmon", guest_environment(args.machine))
    del found["tcpmon"]  # the cross-built wheel, not PyPI's
    for _, (name, version) in sorted(found.items()):
        if not re.fullmatch(r"[\w.+!-]+", version):
            sys.exit(f"runtime_deps: {name} has version {version!r}, not a release to pin")
        print(f"{name}=={version}")


if __name__ == "__main__":
    main()
