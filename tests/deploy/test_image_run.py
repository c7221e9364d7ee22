"""The images built (make image: scripts/build-image.sh, podman + runc) and run the way the
chart runs them: the loader init container with exactly the rendered chart's user,
capabilities, hostPath mounts and read-only root, then the exporter with CAP_BPF alone and
/sys/fs/bpf read-only.  Counts scraped from the exporter container are checked against a
process in a network namespace of the test's own; docker-compose.yml is brought up, scraped
and taken down with podman-compose.

The build is skipped when the tagged images carry the current sources' key (a clean machine
builds once, ~5 min; later runs reuse the images).  The images stay in podman's storage, as
make image leaves them; every container and pin dir the tests make is removed."""
import json
import os
import secrets
import shutil
import subprocess
import time

import pytest

from conftest import Connector, free_port, http_get, unique_comm
from deploylib import REPO, helm_template
from metrics import comm_total, pid_value
from tcpmon import __version__, state
from tcpmon.pins import Pins

BUILD = REPO / "scripts" / "build-image.sh"
IMAGE = f"localhost/tcpmon:{__version__}"
DEBUG_IMAGE = f"localhost/tcpmon:{__version__}-debug"
COMPOSE = shutil.which("podman-compose")


def _engine_problem():
    """Why no engine can run here, or None."""
    if not shutil.which("podman"):
        return "podman is not installed (scripts/apt-packages.txt, [test])"
    if not shutil.which("runc"):
        return "runc is not installed (scripts/apt-packages.txt, [test]); crun fails on this kind of host"
    return None


pytestmark = pytest.mark.skipif(_engine_problem() is not None, reason=str(_engine_problem()))


class Podman:
    """podman with the settings scripts/podman-conf.sh writes (runc, limits, the seccomp
    profile); the same storage as make image, so that its images are found."""

    def __init__(self):
        conf = subprocess.run([str(REPO / "scripts" / "podman-conf.sh")], capture_output=True, text=True)
        assert conf.returncode == 0, conf.stderr
        self.conf = conf.stdout.strip()
        self.seccomp = os.path.join(os.path.dirname(self.conf), "seccomp.json")
        self.env = {**os.environ, "CONTAINERS_CONF": self.conf}

    def run(self, *args, timeout=120):
        return subprocess.run(["podman", *args], capture_output=True, text=True, env=self.env, timeout=timeout)

    def __call__(self, *args, timeout=120):
        result = self.run(*args, timeout=timeout)
        assert result.returncode == 0, f"podman {' '.join(args)}: {result.stderr}"
        return result.stdout.strip()


@pytest.fixture(scope="module")
def podman():
    engine = Podman()
    info = engine.run("info", "--format", "{{.Host.OCIRuntime.Name}}")
    if info.returncode != 0:
        pytest.skip(f"podman cannot run here: {info.stderr.strip().splitlines()[-1]}")
    return engine


@pytest.fixture(scope="module")
def images(podman):
    """make image's images: built by scripts/build-image.sh, which skips an up-to-date build."""
    result = subprocess.run([str(BUILD)], capture_output=True, text=True, env=podman.env, timeout=3600)
    assert result.returncode == 0, f"make image failed: {result.stderr[-3000:]}"
    key = subprocess.run([str(BUILD), "--key"], capture_output=True, text=True, check=True).stdout.strip()
    for image in (IMAGE, DEBUG_IMAGE):
        labels = json.loads(podman("image", "inspect", image))[0]["Labels"]
        assert labels["org.tcpmon.source-key"] == key, f"{image} was not built from these sources"
    return IMAGE


@pytest.fixture
def pin_dir(node_mounts, fresh_pin_dir):
    """A private pin dir on the host's bpffs, mounted as on a node (the chart binds its hostPath)."""
    return fresh_pin_dir


@pytest.fixture
def containers(podman):
    """Names of the containers a test starts; each is removed afterwards."""
    names = []
    yield names
    for name in names:
        podman.run("rm", "-f", "-t", "0", name)


def _apparmor_enabled():
    try:
        with open("/sys/module/apparmor/parameters/enabled") as f:
            return f.read().strip() == "Y"
    except OSError:
        return False


def run_args(pod, container, pin_dir, seccomp):
    """`podman run` arguments that give `container` of the rendered `pod` what a kubelet gives it:
    its user, capabilities, no_new_privs, read-only root (and no tmpfs podman would add), its
    hostPath volumeMounts, its env (with a private pin dir), its ports on loopback, RuntimeDefault
    seccomp (the generated profile) and its own network namespace."""
    context = container["securityContext"]
    assert context["privileged"] is False and pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    args = ["--user", str(context["runAsUser"]), "--security-opt", f"seccomp={seccomp}"]
    if context["readOnlyRootFilesystem"]:
        args += ["--read-only", "--read-only-tmpfs=false"]
    if context["allowPrivilegeEscalation"] is False:
        args += ["--security-opt", "no-new-privileges"]
    caps = context["capabilities"]
    args += [f"--cap-drop={cap}" for cap in caps.get("drop", [])]
    args += [f"--cap-add=CAP_{cap}" for cap in caps.get("add", [])]
    if "appArmorProfile" in context and _apparmor_enabled():
        args += ["--security-opt", f"apparmor={context['appArmorProfile']['type'].lower()}"]
    host_paths = {vol["name"]: vol["hostPath"]["path"] for vol in pod["volumes"] if "hostPath" in vol}
    for mount in container.get("volumeMounts", []):
        ro = ":ro" if mount.get("readOnly") else ""
        args += ["-v", f"{host_paths[mount['name']]}:{mount['mountPath']}{ro}"]
    for var in container.get("env", []):
        value = pin_dir if var["name"] == "TCPMON_PIN_DIR" else var["value"]
        args += ["-e", f"{var['name']}={value}"]
    ports = {}
    for port in container.get("ports", []):
        ports[port["name"]] = free_port()
        args += ["-p", f"127.0.0.1:{ports[port['name']]}:{port['containerPort']}"]
    return args, ports


def pod_spec(helm, *sets):
    docs = helm_template(helm, f"image.repository=localhost/tcpmon", f"image.tag={__version__}", *sets)[0]
    return next(doc for doc in docs if doc["kind"] == "DaemonSet")["spec"]["template"]["spec"]


def run_init(podman, pod, pin_dir, containers):
    """The pod's init container, to its end: (returncode, output)."""
    (init,) = pod["initContainers"]
    args, _ = run_args(pod, init, pin_dir, podman.seccomp)
    name = f"tcpmon-test-{init['name']}-{secrets.token_hex(3)}"
    containers.append(name)
    result = podman.run("run", "--name", name, *args, init["image"], *init["args"], timeout=300)
    return result.returncode, result.stdout + result.stderr


def wait_ready(url, podman, name, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            status, _, body = http_get(url, timeout=2)
            if status == 200:
                return
        except OSError:
            pass
        if podman("inspect", "--format", "{{.State.Running}}", name) != "true":
            break
        time.sleep(0.3)
    raise AssertionError(f"{name} never got ready: {podman.run('logs', name).stderr[-2000:]}")


def test_the_images_start_and_hold_no_compiler(podman, images):
    assert podman("run", "--rm", images, "--version") == f"tcpmon {__version__}"
    tools = podman.run("run", "--rm", "--entrypoint", "/bin/sh", images, "-c",
                       "command -v gcc cc clang ld python3-config; ls /usr/include 2>/dev/null | head -1")
    assert tools.stdout == "", f"build tools in the runtime image: {tools.stdout}"
    debug = podman("run", "--rm", "--entrypoint", "/opt/tcpmon/bin/python", DEBUG_IMAGE, "-c",
                   "import debugpy, tcpmon; print(tcpmon.__version__)")
    assert debug == __version__


def test_loader_and_exporter_containers_as_the_chart_runs_them(podman, images, helm, pin_dir, containers):
    pod = pod_spec(helm)
    (loader,), (exporter,) = pod["initContainers"], pod["containers"]
    assert loader["securityContext"]["capabilities"]["add"] == ["BPF", "PERFMON"]
    assert exporter["securityContext"]["capabilities"]["add"] == ["BPF"]
    assert [m.get("readOnly", False) for m in exporter["volumeMounts"] if m["name"] == "bpffs"] == [True]
    assert loader["image"] == images

    code, output = run_init(podman, pod, pin_dir, containers)
    assert code == 0, f"the loader container fails: {output}"
    assert state.inspect(Pins(pin_dir)).attached

    args, ports = run_args(pod, exporter, pin_dir, podman.seccomp)
    name = f"tcpmon-test-exporter-{secrets.token_hex(3)}"
    containers.append(name)
    podman("run", "-d", "--name", name, *args, exporter["image"], *exporter["args"])
    health = f"http://127.0.0.1:{ports['health']}"
    wait_ready(health + "/readiness", podman, name)
    status, _, body = http_get(health + "/health")
    assert status == 200, body

    with Connector(unique_comm(), opened=7, refused=5) as proc:
        status, _, body = http_get(f"http://127.0.0.1:{ports['metrics']}/metrics")
        assert status == 200, body
        text = body.decode()
        assert proc.active_opens == 12
        assert pid_value(text, proc.pid, proc.comm) == 12
        assert comm_total(text, proc.comm) == 12

    # the exporter's read-only bpffs: it may read the pins, never remove them
    denied = podman.run("exec", name, "tcpmon", "unload", "--pin-dir", pin_dir)
    assert denied.returncode != 0, "the exporter container unloaded the probe through its read-only /sys/fs/bpf"
    assert state.inspect(Pins(pin_dir)).attached
    podman("rm", "-f", "-t", "10", name)

    # unload=true: the chart's init container runs `tcpmon unload` with the loader's rights
    code, output = run_init(podman, pod_spec(helm, "unload=true"), pin_dir, containers)
    assert code == 0, f"the unloader container fails: {output}"
    assert not os.path.exists(pin_dir) or not state.inspect(Pins(pin_dir)).attached


def test_the_engines_default_seccomp_profile_stops_the_loader(podman, images, helm, pin_dir, containers):
    """Why the generated profile exists: containers-common's default allows bpf() and
    perf_event_open() only with CAP_SYS_ADMIN, which the chart's loader does not hold."""
    pod = pod_spec(helm)
    (loader,) = pod["initContainers"]
    args, _ = run_args(pod, loader, pin_dir, "/usr/share/containers/seccomp.json")
    name = f"tcpmon-test-seccomp-{secrets.token_hex(3)}"
    containers.append(name)
    result = podman.run("run", "--name", name, *args, loader["image"], *loader["args"])
    assert result.returncode != 0, "the loader worked under the engine's default seccomp profile"
    assert "Operation not permitted" in result.stderr, result.stderr


def test_the_exporter_container_cannot_load(podman, images, helm, pin_dir, containers):
    """CAP_BPF alone, as the exporter holds it: `tcpmon load` fails with one line."""
    pod = pod_spec(helm)
    (exporter,) = pod["containers"]
    args, _ = run_args(pod, exporter, pin_dir, podman.seccomp)
    args = [arg.replace(":/sys/fs/bpf:ro", ":/sys/fs/bpf") for arg in args]   # the pins writable
    name = f"tcpmon-test-load-{secrets.token_hex(3)}"
    containers.append(name)
    result = podman.run("run", "--name", name, *args, exporter["image"], "load")
    assert result.returncode != 0, "tcpmon load worked in a container holding CAP_BPF alone"
    assert result.stderr.startswith("tcpmon: ") and len(result.stderr.strip().splitlines()) == 1, result.stderr


@pytest.mark.skipif(not COMPOSE, reason="podman-compose is not installed (scripts/apt-packages.txt, [test])")
def test_compose_up_scrape_down(podman, images, pin_dir):
    """docker-compose.yml's tcpmon service (the built image, `tcpmon run`) on free ports and a
    private pin dir; the prometheus service needs a registry pull, so only tcpmon is brought up."""
    project = f"tcpmon-test-{secrets.token_hex(3)}"
    metrics_port, health_port = free_port(), free_port()
    env = {**podman.env, "TCPMON_PIN_DIR": pin_dir, "METRICS_PORT": str(metrics_port),
           "HEALTH_PORT": str(health_port)}

    def compose(*args):
        return subprocess.run([COMPOSE, "-f", str(REPO / "docker-compose.yml"), "-p", project, *args],
                              capture_output=True, text=True, env=env, cwd=REPO, timeout=300)

    try:
        up = compose("up", "-d", "--no-build", "tcpmon")
        assert up.returncode == 0, up.stdout + up.stderr
        name = f"{project}_tcpmon_1"
        wait_ready(f"http://127.0.0.1:{health_port}/readiness", podman, name)
        with Connector(unique_comm(), opened=3, refused=2) as proc:
            status, _, body = http_get(f"http://127.0.0.1:{metrics_port}/metrics")
            assert status == 200, body
            assert pid_value(body.decode(), proc.pid, proc.comm) == 5
        down = compose("down", "-t", "5")
        assert down.returncode == 0, down.stdout + down.stderr
        assert podman("ps", "-a", "-q", "--filter", f"label=io.podman.compose.project={project}") == ""
        assert state.inspect(Pins(pin_dir)).attached, "the probe did not outlive `down`"
        # the compose file's unload command (--no-deps: podman-compose 1.0.3 would start every
        # service first; -T: no terminal here)
        unload = compose("run", "--no-deps", "--rm", "-T", "tcpmon", "unload")
        assert unload.returncode == 0, unload.stdout + unload.stderr
        assert not os.path.exists(pin_dir) or not state.inspect(Pins(pin_dir)).attached
    finally:
        compose("down", "-t", "0")
        for cid in podman.run("ps", "-a", "-q", "--filter", f"label=io.podman.compose.project={project}").stdout.split():
            podman.run("rm", "-f", "-t", "0", cid)
        podman.run("network", "rm", f"{project}_default")
