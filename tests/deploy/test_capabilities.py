"""The capability sets the chart and the systemd units grant are enough, and needed.

The loader and the exporter run for real on this kernel as uid 0 with only the
capabilities the rendered chart gives each container (setpriv limits the bounding
set; root then has exactly those), with no_new_privs as allowPrivilegeEscalation:
false sets it.
"""
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile

import pytest

from deploylib import helm_template
from tcpmon import loader as tcpmon_loader
from tcpmon import state
from tcpmon.pins import Pins

TCPMON = [sys.executable, "-m", "tcpmon"]


def _caps_of(helm):
    pod = next(doc for doc in helm_template(helm)[0] if doc["kind"] == "DaemonSet")["spec"]["template"]["spec"]
    return {"loader": pod["initContainers"][0]["securityContext"]["capabilities"]["add"],
            "exporter": pod["containers"][0]["securityContext"]["capabilities"]["add"]}


def as_container(caps, *args):
    """`tcpmon ARGS` as uid 0 holding only `caps` (Kubernetes names, e.g. BPF), no_new_privs set."""
    bounding = ",".join(["-all"] + [f"+{cap.lower()}" for cap in caps])
    cmd = ["setpriv", "--reuid=0", "--regid=0", "--clear-groups", "--inh-caps=-all", "--ambient-caps=-all",
           f"--bounding-set={bounding}", "--no-new-privs", *TCPMON, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def caps(helm):
    return _caps_of(helm)


@pytest.fixture
def pin_dir_for_caps(node_mounts):
    """A private pin dir on the host's bpffs, which these containers cannot mount themselves."""
    path = f"/sys/fs/bpf/tcpmon-deploy-{os.getpid()}-{secrets.token_hex(3)}"
    yield path
    tcpmon_loader.unload(path)
    if os.path.isdir(path):
        shutil.rmtree(path)


def test_setpriv_limits_root_to_the_given_capabilities():
    result = subprocess.run(["setpriv", "--bounding-set=-all,+bpf", "--inh-caps=-all", "--no-new-privs",
                             "grep", "-E", "^(CapEff|NoNewPrivs)", "/proc/self/status"],
                            capture_output=True, text=True, check=True)
    fields = dict(line.split(":\t") for line in result.stdout.splitlines())
    assert int(fields["CapEff"], 16) == 1 << 39  # CAP_BPF alone
    assert fields["NoNewPrivs"] == "1"


def in_pod_container(pod, container, *args):
    """`tcpmon ARGS` as the rendered `container` would run it on this machine: private
    mount and network namespaces with a fresh read-only sysfs on /sys (as container runtimes mount it,
    without the host's bpffs and tracefs), then exactly the container's hostPath
    volumeMounts (read-only where it says so), then uid 0 with only the container's
    capabilities and no_new_privs."""
    host_paths = {vol["name"]: vol["hostPath"]["path"] for vol in pod["volumes"] if "hostPath" in vol}
    mounts = [(host_paths[m["name"]], m["mountPath"], m.get("readOnly", False)) for m in container["volumeMounts"]]
    stage = tempfile.mkdtemp(prefix="tcpmon-pod-")
    lines = ["set -e"]
    for i, (host, _, _) in enumerate(mounts):
        lines.append(f"mkdir -p {stage}/{i} && mount --bind {host} {stage}/{i}")
    lines.append("mount -t sysfs -o ro,nosuid,nodev,noexec sysfs /sys")
    for i, (_, path, readonly) in enumerate(mounts):
        lines.append(f"mount --bind {'-o ro ' if readonly else ''}{stage}/{i} {path}")
    lines.append('exec "$@"')
    caps = container["securityContext"]["capabilities"]
    assert caps["drop"] == ["ALL"]
    bounding = ",".join(["-all"] + [f"+{cap.lower()}" for cap in caps.get("add", [])])
    # its own network namespace too (hostNetwork is off), which also gives it its own sysfs
    command = ["unshare", "--mount", "--net", "--propagation", "private", "sh", "-c", "\n".join(lines), "sh",
               "setpriv", "--reuid=0", "--regid=0", "--clear-groups", "--inh-caps=-all", "--ambient-caps=-all",
               f"--bounding-set={bounding}", "--no-new-privs", *TCPMON, *args]
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=120)
    finally:
        shutil.rmtree(stage)


def test_loader_and_exporter_work_as_the_chart_runs_them(helm, pin_dir_for_caps):
    pod = next(doc for doc in helm_template(helm)[0] if doc["kind"] == "DaemonSet")["spec"]["template"]["spec"]
    (loader,), (exporter,) = pod["initContainers"], pod["containers"]
    assert loader["securityContext"]["capabilities"]["add"] == ["BPF", "PERFMON"]
    assert exporter["securityContext"]["capabilities"]["add"] == ["BPF"]
    loaded = in_pod_container(pod, loader, *loader["args"], "--pin-dir", pin_dir_for_caps)
    assert loaded.returncode == 0, f"the loader init container fails: {loaded.stderr}"
    status = in_pod_container(pod, exporter, "status", "--json", "--pin-dir", pin_dir_for_caps)
    assert status.returncode == 0, f"tcpmon status fails in the exporter container: {status.stderr}"
    report = json.loads(status.stdout)
    assert report["attached"] is True
    assert all("error" not in fill for fill in report["maps"].values()), report["maps"]
    dumped = in_pod_container(pod, exporter, "dump", "--json", "--pin-dir", pin_dir_for_caps)
    assert dumped.returncode == 0, f"tcpmon dump fails in the exporter container: {dumped.stderr}"
    assert isinstance(json.loads(dumped.stdout), list)
    unload = in_pod_container(pod, exporter, "unload", "--pin-dir", pin_dir_for_caps)
    assert unload.returncode != 0, "the exporter's read-only bpffs let it unload the probe"
    assert state.inspect(Pins(pin_dir_for_caps)).attached


def test_loading_needs_perfmon(pin_dir_for_caps):
    result = as_container(["BPF"], "load", "--pin-dir", pin_dir_for_caps)
    assert result.returncode != 0, "tcpmon load worked with CAP_BPF alone: the chart grants more than it needs"
    assert result.stderr.startswith("tcpmon: ") and len(result.stderr.strip().splitlines()) == 1


def _kernel_at_least(major, minor):
    release = os.uname().release.split("-")[0].split(".")
    return (int(release[0]), int(release[1])) >= (major, minor)


def test_reading_without_capabilities_depends_on_the_kernel(pin_dir_for_caps):
    """Before Linux 6.5, kernel.unprivileged_bpf_disabled gated every bpf() command, so the
    exporter needs CAP_BPF; from 6.5 it gates only map creation and program loading,
    and reading pinned maps takes just read permission on the pins."""
    with open("/proc/sys/kernel/unprivileged_bpf_disabled") as f:
        if f.read().strip() == "0":
            pytest.skip("kernel.unprivileged_bpf_disabled=0: bpf() is open to everyone on this machine")
    tcpmon_loader.load(pin_dir_for_caps)
    result = as_container([], "dump", "--json", "--pin-dir", pin_dir_for_caps)
    if _kernel_at_least(6, 5):
        assert result.returncode == 0, f"reading pins without capabilities fails on {os.uname().release}: {result.stderr}"
    else:
        assert result.returncode != 0, f"tcpmon dump worked without CAP_BPF on {os.uname().release}"
        assert result.stderr.startswith("tcpmon: ")
