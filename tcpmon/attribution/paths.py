"""cgroup path -> unit, container_id and pod_uid, from tables of how runtimes name cgroups.

A path is read segment by segment ('a:b:c' segments, which containerd makes when it runs
without systemd under a kubelet that uses the systemd driver, are read part by part):

- container_id: the innermost segment that a row of CONTAINERS matches (so the Kubernetes
  container wins over the node container around it in kind or minikube);
- pod_uid: the innermost segment that a row of PODS matches, dashes for the systemd driver's
  underscores (static pods keep their 32-hex config hash: it is what the kubelet names them by);
- unit: the innermost `.service` or `.scope` segment (the user unit inside user@UID.service,
  as systemd's cg_path_get_user_unit() finds it), except the per-container scopes that
  runtimes create (their name holds the 64-hex id: the container_id says it better). In a pod
  only the segments inside the container count, so a container never gets the unit of the
  runtime or kubelet whose cgroup it happens to sit in.
"""
from __future__ import annotations

import re
from typing import NamedTuple

_ID = r"(?P<id>[0-9a-f]{64})"
_UID = r"(?P<uid>[0-9a-f]{8}(?:[-_][0-9a-f]{4}){3}[-_][0-9a-f]{12}|[0-9a-f]{32})"

# (who names a container's cgroup this way, the pattern of that one segment)
CONTAINERS = (
    ("containerd (systemd driver; some setups without .scope)", rf"cri-containerd-{_ID}(?:\.scope)?"),
    ("CRI-O (systemd driver; cgroupfs without .scope)", rf"crio-{_ID}(?:\.scope)?"),
    ("Docker, cri-dockerd (systemd driver)", rf"docker-{_ID}\.scope"),
    ("podman (systemd and cgroupfs managers)", rf"libpod-{_ID}(?:\.scope)?"),
    ("podman --cgroups=split (quadlet units)", rf"libpod-payload-{_ID}"),
    ("cgroupfs driver: containerd, Docker, cri-containerd:<id> parts", _ID),
)
# (cgroup driver, the pattern of the pod's segment, whether a kubepods segment must come first)
PODS = (
    ("systemd driver: kubepods[-<qos>]-pod<uid>.slice", rf"(?:.+-)?kubepods(?:-besteffort|-burstable)?-pod{_UID}\.slice",
     False),
    ("cgroupfs driver: kubepods/[<qos>/]pod<uid>", rf"pod{_UID}", True),
)
_UNIT = re.compile(r".+\.(?:service|scope)")
_HAS_ID = re.compile(r"[0-9a-f]{64}")
_CONTAINERS = tuple(re.compile(pattern) for _, pattern in CONTAINERS)
_PODS = tuple((re.compile(pattern), after_kubepods) for _, pattern, after_kubepods in PODS)


class PathLabels(NamedTuple):
    unit: str = ""
    container_id: str = ""
    pod_uid: str = ""


def _match(patterns, text):
    for pattern in patterns:
        found = pattern.fullmatch(text)
        if found:
            return found
    return None


def _pod_uid(part, seen_kubepods):
    for pattern, after_kubepods in _PODS:
        if after_kubepods and not seen_kubepods:
            continue
        found = pattern.fullmatch(part)
        if found:
            return found["uid"].replace("_", "-")
    return None


def _unescape(segment):
    # systemd prefixes "_" to cgroup names that could pass for kernel files (_cpu.service)
    return segment[1:] if segment.startswith("_") else segment


def labels_of_path(path):
    """PathLabels of a cgroup path relative to the cgroup2 root ('' or '/' is the root)."""
    unit = container_id = pod_uid = ""
    inside_container = seen_kubepods = False
    for segment in path.strip("/").split("/"):
        parts = segment.split(":")
        for part in parts:
            seen_kubepods = seen_kubepods or "kubepods" in part
            uid = _pod_uid(part, seen_kubepods)
            if uid:
                pod_uid, unit, inside_container = uid, "", False
            found = _match(_CONTAINERS, part)
            if found:
                container_id, inside_container = found["id"], True
                if pod_uid:
                    unit = ""
        if _UNIT.fullmatch(segment) and not _HAS_ID.search(segment) and (inside_container or not pod_uid):
            unit = _unescape(segment)
    return PathLabels(unit, container_id, pod_uid)
