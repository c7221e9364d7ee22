"""A real container (podman + runc, as /work/shared/CONTAINERS.md runs them here) started the
way a kubelet would: with the io.kubernetes.* labels and under a pod's cgroup. bpftrace sees
its connect's cgroup id; the attribution maps that id to the container id `podman inspect`
reports and to the pod's uid, and the names the API serves for it match the kubelet labels."""
import json
import os
import pathlib
import secrets
import shutil
import subprocess
import tempfile
import time
import uuid

import pytest

from attribution_support import bpftrace_cgroups, cgroup2_root
from test_attribution_kube import ApiServer, FakeClock, serviceaccount, tls_dir  # noqa: F401 (fixtures)
from tcpmon.attribution import LABELS, Attributor, Config

NODE = "worker-1"


def _static_busybox():
    path = shutil.which("busybox")
    if not path:
        return None
    ldd = subprocess.run(["ldd", path], capture_output=True, text=True)
    return path if "not a dynamic executable" in ldd.stdout + ldd.stderr else None


pytestmark = pytest.mark.skipif(not (shutil.which("podman") and shutil.which("runc") and _static_busybox()),
                                reason="needs podman, runc and a static busybox (busybox-static)")


class Podman:
    """podman with storage, per-boot state and locks of its own (nothing shared with other users
    of podman on the machine), runc, and CONTAINERS.md's limits."""

    def __init__(self):
        self.state = tempfile.mkdtemp(prefix="tcpmon-podman-")   # podman wants a runroot of 50 characters at most
        tmp = pathlib.Path(self.state)
        nofile = subprocess.run(["sh", "-c", "ulimit -Hn"], capture_output=True, text=True).stdout.strip()
        conf = tmp / "containers.conf"
        conf.write_text(f'[containers]\ndefault_ulimits = ["nofile={nofile}:{nofile}", "nproc=32768:32768"]\n'
                        '[engine]\nruntime = "runc"\ncgroup_manager = "cgroupfs"\nlock_type = "file"\n'
                        f'tmp_dir = "{tmp / "tmp"}"\n')
        self.env = {**os.environ, "CONTAINERS_CONF": str(conf)}
        self.base = ["podman", "--root", str(tmp / "storage"), "--runroot", str(tmp / "run"),
                     "--cgroup-manager", "cgroupfs"]

    def close(self):
        shutil.rmtree(self.state, ignore_errors=True)

    def __call__(self, *args):
        result = subprocess.run([*self.base, *args], capture_output=True, text=True, env=self.env, timeout=120)
        assert result.returncode == 0, f"podman {' '.join(args)}: {result.stderr}"
        return result.stdout.strip()


def _rootfs(tmp, comm):
    """busybox as sh, nc, sleep, and under a name that is the connecting process's comm."""
    bin_dir = tmp / "rootfs" / "bin"
    bin_dir.mkdir(parents=True)
    shutil.copy(_static_busybox(), bin_dir / "busybox")
    for name in ("sh", "nc", "sleep", comm):
        os.symlink("busybox", bin_dir / name)
    return tmp / "rootfs"


def _remove_everywhere(top):
    """The cgroup-parent tree in every hierarchy: podman's cgroupfs manager makes it in the v1
    controllers too."""
    with open("/proc/self/mounts") as f:
        roots = [fields[1] for fields in map(str.split, f) if fields[2] in ("cgroup", "cgroup2")]
    for root in roots:
        for dirpath, _, _ in sorted(os.walk(os.path.join(root, top)), key=lambda e: -e[0].count("/")):
            os.rmdir(dirpath)


def _wait_connected(pid, timeout=20):
    """Until the container's client has its connection to port 7 (seen in its own netns)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(f"/proc/{pid}/net/tcp") as f:
            if any(fields[2].endswith(":0007") and fields[3] == "01" for fields in map(str.split, f)):
                return
        time.sleep(0.05)
    raise AssertionError("the container never connected")


def _pod_list(uid, cid, labels):
    return {"kind": "PodList", "apiVersion": "v1", "metadata": {"resourceVersion": "9"}, "items": [{
        "metadata": {"name": labels["io.kubernetes.pod.name"], "namespace": labels["io.kubernetes.pod.namespace"],
                     "uid": uid},
        "spec": {"nodeName": NODE, "containers": [{"name": labels["io.kubernetes.container.name"]}]},
        "status": {"phase": "Running", "containerStatuses": [
            {"name": labels["io.kubernetes.container.name"], "containerID": f"containerd://{cid}", "ready": True}]}}]}


def test_a_kubelet_style_container_maps_to_its_id_pod_and_names(tmp_path, tls_dir, serviceaccount):  # noqa: F811
    root = cgroup2_root()
    podman = Podman()
    comm = f"busybox{secrets.token_hex(4)}"
    uid = str(uuid.uuid4())
    top = f"tcpmon-test-{os.getpid()}-{secrets.token_hex(3)}"
    kubelet_labels = {"io.kubernetes.pod.namespace": "shop", "io.kubernetes.pod.name": "web-0",
                      "io.kubernetes.pod.uid": uid, "io.kubernetes.container.name": "nginx"}
    name = f"tcpmon-test-{secrets.token_hex(4)}"
    script = f"sleep 1000 | nc -l -p 7 >/dev/null & sleep 0.3; exec {comm} nc 127.0.0.1 7"
    api = None
    try:
        with bpftrace_cgroups(comm) as seen:
            podman("run", "-d", "-i", "--name", name, "--network", "none", "--cgroup-parent",
                   f"/{top}/kubepods/besteffort/pod{uid}",
                   *[arg for key, value in kubelet_labels.items() for arg in ("--label", f"{key}={value}")],
                   "--rootfs", str(_rootfs(tmp_path, comm)), "/bin/sh", "-c", script)
            inspect = json.loads(podman("inspect", name))[0]
            assert inspect["State"]["Running"], inspect["State"]
            _wait_connected(inspect["State"]["Pid"])
        (cgroup_id,) = [cgroup for (seen_comm, cgroup) in seen if seen_comm == comm]
        assert inspect["Config"]["Labels"].items() >= kubelet_labels.items()

        api = ApiServer(tls_dir)
        api.body = json.dumps(_pod_list(uid, inspect["Id"], kubelet_labels)).encode()
        clock = FakeClock()
        attributor = Attributor(Config(labels=LABELS, kubernetes=True, node_name=NODE), clock=clock,
                                serviceaccount=str(serviceaccount),
                                environ={"KUBERNETES_SERVICE_HOST": "127.0.0.1",
                                         "KUBERNETES_SERVICE_PORT": str(api.port)})
        assert attributor.cgroup_root == root
        series = attributor.series("tcpmon_connects_total", [(cgroup_id, comm, [1])])
        assert series.rows == [((comm, "", inspect["Id"], uid, "shop", "web-0", "nginx"), [1])]
        with open(f"/proc/{inspect['State']['Pid']}/cgroup") as f:
            v2_path = [line.split(":", 2)[2].strip() for line in f if line.startswith("0::")][0]
        assert v2_path == f"/{top}/kubepods/besteffort/pod{uid}/libpod-{inspect['Id']}"
        assert os.stat(root + v2_path).st_ino == cgroup_id

        podman("rm", "-f", "-t", "0", name)
        clock.now += 10   # past the interval in which a cached path is trusted unchecked
        gone = attributor.series("tcpmon_connects_total", [(cgroup_id, comm, [1])])
        assert (gone.rows, gone.gone) == ([], 1)
    finally:
        if api:
            api.close()
        subprocess.run([*podman.base, "rm", "-f", "-t", "0", name], capture_output=True, env=podman.env)
        podman.close()
        _remove_everywhere(top)
