"""The capability sets the chart and the systemd units grant are enough, and needed.

The loader and the exporter run for real on this kernel as uid 0 with only the
capabilities the rendered chart gives each container (setpriv limits the bounding
set; root then has exactly those), with no_new_privs as allowPrivilegeEscalation:
false sets it.
"""
import contextlib
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
def pin_dir_for_caps(node_mounts, fresh_pin_dir):
    """A private pin dir on the host's bpffs, which these containers cannot mount themselves."""
    return fresh_pin_dir


def test_setpriv_limits_root_to_the_given_capabilities():
    result = subprocess.run(["setpriv", "--bounding-set=-all,+bpf", "--inh-caps=-all", "--no-new-privs",
                             "grep", "-E", "^(CapEff|NoNewPrivs)", "/proc/self/status"],
                            capture_output=True, text=True, check=True)
    fields = dict(line.split(":\t") for line in result.stdout.splitlines())
    assert int(fields["CapEff"], 16) == 1 << 39  # CAP_BPF alone
    assert fields["NoNewPrivs"] == "1"


# Kubernetes' mountPropagation as mount(8) propagation types: None keeps the container's
# mount private, HostToContainer makes it a slave of the host's, Bidirectional a peer of it.
PROPAGATION = {"None": "--make-private", "HostToContainer": "--make-rslave", "Bidirectional": "--make-rshared"}


def in_pod_container(pod, container, *args, node=None):
    """`tcpmon ARGS` (or, without ARGS, the container's own command) as the rendered `container`
    would run it on this machine: private mount and network namespaces with a fresh sysfs on /sys
    (read-only unless privileged; as container runtimes mount it, without the host's bpffs and
    tracefs), then exactly the container's hostPath volumeMounts (read-only where it says so,
    with its mountPropagation), then uid 0 with only the container's capabilities and
    no_new_privs (all capabilities and no no_new_privs if privileged). `node`: the pid of a
    node_without_bpffs() namespace to run in instead of this host's."""
    host_paths = {vol["name"]: vol["hostPath"]["path"] for vol in pod["volumes"] if "hostPath" in vol}
    mounts = [(host_paths[m["name"]], m["mountPath"], m.get("readOnly", False), m.get("mountPropagation", "None"))
              for m in container["volumeMounts"]]
    bidirectional = any(propagation == "Bidirectional" for *_, propagation in mounts)
    assert node or not bidirectional, "Bidirectional mounts reach the node: only in a node of the test's own"
    privileged = container["securityContext"].get("privileged", False)
    stage = tempfile.mkdtemp(prefix="tcpmon-pod-")
    lines = ["set -e"]
    for i, (host, _, _, _) in enumerate(mounts):
        lines.append(f"mkdir -p {stage}/{i} && mount --bind {host} {stage}/{i}")
    lines.append(f"mount -t sysfs -o {'rw' if privileged else 'ro'},nosuid,nodev,noexec sysfs /sys")
    for i, (_, path, readonly, propagation) in enumerate(mounts):
        lines.append(f"mount --bind {'-o ro ' if readonly else ''}{stage}/{i} {path}")
        lines.append(f"mount {PROPAGATION[propagation]} {path}")
    lines.append('exec "$@"')
    if privileged:
        identity = ["setpriv", "--reuid=0", "--regid=0", "--clear-groups"]
    else:
        caps = container["securityContext"]["capabilities"]
        assert caps["drop"] == ["ALL"]
        bounding = ",".join(["-all"] + [f"+{cap.lower()}" for cap in caps.get("add", [])])
        identity = ["setpriv", "--reuid=0", "--regid=0", "--clear-groups", "--inh-caps=-all", "--ambient-caps=-all",
                    f"--bounding-set={bounding}", "--no-new-privs"]
    argv = [*TCPMON, *args] if args else [*container["command"], *container.get("args", [])]
    # Its own network namespace too (hostNetwork is off), which also gives it its own sysfs.
    # A Bidirectional mount keeps the node's propagation (everything but bpffs is private there).
    propagation = "unchanged" if bidirectional else "private"
    command = [*in_node(node), "unshare", "--mount", "--net", "--propagation", propagation, "sh", "-c",
               "\n".join(lines), "sh", *identity, *argv]
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=120)
    finally:
        shutil.rmtree(stage)


def in_node(node):
    return ["nsenter", f"--mount=/proc/{node}/ns/mnt", "--"] if node else []


@contextlib.contextmanager
def node_without_bpffs():
    """A node of the test's own, as a fresh one is: a private mount namespace with nothing mounted
    at /sys/fs/bpf; there the kubelet's hostPath is a shared mount point (as every mount is on a
    systemd host), so that a container's Bidirectional mount reaches the node. Yields its pid;
    whatever was mounted or pinned in it goes with it."""
    script = ("while grep -qs ' /sys/fs/bpf ' /proc/self/mounts; do umount -l /sys/fs/bpf; done; "
              "mount --bind /sys/fs/bpf /sys/fs/bpf && mount --make-shared /sys/fs/bpf && "
              "echo ready && exec sleep infinity")
    holder = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready", "could not set up a node without bpffs"
        yield holder.pid
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()


def bpffs_mounts_of(node):
    with open(f"/proc/{node}/mounts") as f:
        return [line for line in f if line.split()[1:3] == ["/sys/fs/bpf", "bpf"]]


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


def test_on_a_node_without_bpffs_the_loader_names_the_value_and_bpffs_mount_makes_it_work(helm, node_mounts):
    pin_dir = f"/sys/fs/bpf/tcpmon-deploy-{os.getpid()}-{secrets.token_hex(3)}"  # on that node's own bpffs
    default = next(doc for doc in helm_template(helm)[0] if doc["kind"] == "DaemonSet")["spec"]["template"]["spec"]
    pod = next(doc for doc in helm_template(helm, "bpffsMount=true")[0]
               if doc["kind"] == "DaemonSet")["spec"]["template"]["spec"]
    (mount, loader), (exporter,) = pod["initContainers"], pod["containers"]
    with node_without_bpffs() as node:
        refused = in_pod_container(default, default["initContainers"][0], "load", "--pin-dir", pin_dir, node=node)
        assert refused.returncode != 0
        assert refused.stderr.startswith("tcpmon: cannot mount bpf at /sys/fs/bpf: needs CAP_SYS_ADMIN"), refused.stderr
        assert "bpffsMount=true" in refused.stderr and refused.stderr.count("\n") == 1, refused.stderr
        assert bpffs_mounts_of(node) == []
        mounted = in_pod_container(pod, mount, node=node)
        assert mounted.returncode == 0, f"the mount-bpffs init container fails: {mounted.stderr}"
        assert len(bpffs_mounts_of(node)) == 1, "the init container's mount did not reach the node"
        again = in_pod_container(pod, mount, node=node)  # a restarted pod: mounts nothing more
        assert again.returncode == 0 and len(bpffs_mounts_of(node)) == 1, again.stderr
        try:
            loaded = in_pod_container(pod, loader, *loader["args"], "--pin-dir", pin_dir, node=node)
            assert loaded.returncode == 0, f"the loader init container fails after mount-bpffs: {loaded.stderr}"
            status = in_pod_container(pod, exporter, "status", "--json", "--pin-dir", pin_dir, node=node)
            assert status.returncode == 0, f"tcpmon status fails in the exporter container: {status.stderr}"
            assert json.loads(status.stdout)["attached"] is True
            assert not os.path.exists(pin_dir), "the pins landed on this host's bpffs, not the node's"
        finally:
            subprocess.run([*in_node(node), *TCPMON, "unload", "--pin-dir", pin_dir], capture_output=True, timeout=120)
