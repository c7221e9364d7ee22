"""The systemd units and scripts/install.sh: staged with DESTDIR (nothing touches this
machine's system), verified by systemd-analyze, and the exporter run as tcpmon.service
would run it: an unprivileged user with ambient CAP_BPF only, no_new_privs, and no
writable-executable memory."""
import fnmatch
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from deploylib import REPO, through_readonly_bind
from tcpmon import __version__, state
from tcpmon.pins import DEFAULT_PIN_DIR, Pins
from tcpmon import loader as tcpmon_loader

UNITS = REPO / "deploy" / "systemd"
UNIT_DIR = "usr/local/lib/systemd/system"
HOME = "opt/tcpmon"


def parse_unit(path):
    """{(section, key): [values]}: systemd allows a key more than once."""
    entries, section = {}, None
    for raw in Path(path).read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        entries.setdefault((section, key.strip()), []).append(value.strip())
    return entries


@pytest.fixture(scope="module")
def load_unit():
    return parse_unit(UNITS / "tcpmon-load.service")


@pytest.fixture(scope="module")
def exporter_unit():
    return parse_unit(UNITS / "tcpmon.service")


@pytest.fixture(scope="module")
def staged(staged_install):
    """scripts/install.sh with DESTDIR (tests/conftest.py): the package built and installed with
    /usr/bin/python3, readable by user nobody wherever the checkout lies."""
    return staged_install


def test_loader_unit_is_a_oneshot_that_unloads_on_stop(load_unit):
    service = {key: values for (section, key), values in load_unit.items() if section == "Service"}
    assert service["Type"] == ["oneshot"]
    assert service["RemainAfterExit"] == ["yes"]
    assert [cmd.split()[:2] for cmd in service["ExecStart"]] == [["/opt/tcpmon/bin/tcpmon", "load"]]
    assert [cmd.split()[:2] for cmd in service["ExecStop"]] == [["/opt/tcpmon/bin/tcpmon", "unload"]]
    assert service["CapabilityBoundingSet"] == ["CAP_BPF CAP_PERFMON CAP_CHOWN"]
    assert service["NoNewPrivileges"] == ["yes"]


def test_exporter_unit_is_unprivileged_with_cap_bpf_only(exporter_unit):
    unit = {key: values for (section, key), values in exporter_unit.items() if section == "Unit"}
    service = {key: values for (section, key), values in exporter_unit.items() if section == "Service"}
    assert "tcpmon-load.service" in unit["Requires"][0].split()
    assert "tcpmon-load.service" in unit["After"][0].split()
    assert service["CapabilityBoundingSet"] == ["CAP_BPF"]
    assert service["AmbientCapabilities"] == ["CAP_BPF"]
    assert service["User"] != ["root"] and "DynamicUser" not in service
    for key, value in (("NoNewPrivileges", "yes"), ("ProtectSystem", "strict"), ("ProtectHome", "yes"),
                       ("PrivateTmp", "yes"), ("PrivateDevices", "yes"), ("MemoryDenyWriteExecute", "yes")):
        assert service[key] == [value], key
    assert [cmd.split()[:2] for cmd in service["ExecStart"]] == [["/opt/tcpmon/bin/tcpmon", "serve"]]


def _pin_dir_flag(command):
    args = command.split()
    return args[args.index("--pin-dir") + 1]


def test_units_agree_on_the_pin_dir_and_the_group(load_unit, exporter_unit):
    loaded = _pin_dir_flag(load_unit[("Service", "ExecStart")][0])
    assert loaded == _pin_dir_flag(load_unit[("Service", "ExecStop")][0]) == DEFAULT_PIN_DIR
    source, target = exporter_unit[("Service", "BindReadOnlyPaths")][0].split(":")
    assert source == loaded
    assert _pin_dir_flag(exporter_unit[("Service", "ExecStart")][0]) == target
    posts = [cmd.split() for cmd in load_unit[("Service", "ExecStartPost")]]
    targets = {next(arg for arg in cmd[1:] if arg.startswith("/")) for cmd in posts}
    assert targets == {loaded}
    grant = next(cmd for cmd in posts if cmd[0].endswith("find"))
    pattern = grant[grant.index("-name") + 1]
    links = {path.name for path in Pins(loaded).links()}
    assert {name for name in Pins(loaded).all_names() if fnmatch.fnmatch(name, pattern)} == links
    assert grant[grant.index("-exec") + 1:] == ["/usr/bin/chmod", "g+w", "{}", "+"]
    group = next(cmd[-2] for cmd in posts if cmd[0].endswith("chgrp"))
    assert exporter_unit[("Service", "Group")] == [group]
    user_line = (UNITS / "tcpmon.sysusers").read_text().split("\n")
    assert any(re.match(rf"u\s+{group}\s", line) for line in user_line)
    assert exporter_unit[("Service", "User")] == [group]


def test_install_stages_everything_under_destdir(staged):
    for rel in (f"{UNIT_DIR}/tcpmon-load.service", f"{UNIT_DIR}/tcpmon.service",
                "usr/local/lib/sysusers.d/tcpmon.conf", "etc/default/tcpmon"):
        assert (staged.root / rel).is_file(), rel
    assert (UNITS / "tcpmon.service").read_text() == (staged.root / UNIT_DIR / "tcpmon.service").read_text()
    assert os.readlink(staged.root / "usr/local/bin/tcpmon") == "/opt/tcpmon/bin/tcpmon"
    version = subprocess.run([str(staged.root / HOME / "bin/tcpmon"), "--version"], capture_output=True, text=True)
    assert version.stdout.strip() == f"tcpmon {__version__}"
    data = subprocess.run([str(staged.root / HOME / "bin/python"), "-c",
                           "import tcpmon.loader as l, os; print(os.path.getsize(l.default_object()))"],
                          capture_output=True, text=True)
    assert data.returncode == 0 and int(data.stdout) > 0, data.stderr


def test_installed_units_verify_against_the_installed_layout(staged, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(staged.root, root, symlinks=True)
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    (root / "usr/bin").mkdir(parents=True, exist_ok=True)
    for tool in ("/usr/bin/chgrp", "/usr/bin/chmod", "/usr/bin/kill"):
        shutil.copy2(tool, root / tool.lstrip("/"))
    result = subprocess.run(["systemd-analyze", "verify", f"--root={root}", "tcpmon-load.service", "tcpmon.service"],
                            capture_output=True, text=True)
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), result.stderr
    (root / HOME / "bin/tcpmon").unlink()
    missing = subprocess.run(["systemd-analyze", "verify", f"--root={root}", "tcpmon.service"],
                             capture_output=True, text=True)
    assert "tcpmon is not executable" in missing.stderr


def _exposure(root, unit):
    out = subprocess.run(["systemd-analyze", "security", "--offline=true", f"--root={root}", unit],
                         capture_output=True, text=True, check=True).stdout
    return re.search(r"Overall exposure level for \S+: (\d+\.\d)", out).group(1)


def test_documented_exposure_is_what_systemd_analyze_says(staged):
    docs = (REPO / "docs" / "DEVELOPMENT.md").read_text()
    for unit in ("tcpmon.service", "tcpmon-load.service"):
        documented = re.search(rf"`{re.escape(unit)}`[^|\n]*\|\s*(\d+\.\d)", docs)
        assert documented, f"docs/DEVELOPMENT.md has no exposure row for {unit}"
        assert documented.group(1) == _exposure(staged.root, unit), unit


def test_install_refuses_unknown_options():
    result = subprocess.run([str(REPO / "scripts/install.sh"), "--prefix=/x"], capture_output=True, text=True,
                            env=dict(os.environ, DESTDIR="/nonexistent-never-written"))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == ["install: unknown option '--prefix=/x': use --units-only or --no-start"]
    assert not os.path.exists("/nonexistent-never-written")


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _as_tcpmon_service(staged, pin_dir, view, *args):
    """The staged `tcpmon ARGS --pin-dir VIEW` as tcpmon.service runs it: uid/gid nobody,
    CAP_BPF ambient and bounding, no_new_privs, the unit's MemoryDenyWriteExecute= and
    SystemCallFilter= (unit_sandbox.py), and the pin dir bound read-only at VIEW
    (BindReadOnlyPaths=), in / (a system unit's default WorkingDirectory=; the checkout may be
    where nobody cannot enter)."""
    command = ["env", "--chdir=/", "setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
               "--inh-caps=-all,+bpf", "--ambient-caps=-all,+bpf", "--bounding-set=-all,+bpf", "--no-new-privs",
               "/usr/bin/python3", str(staged.helper("unit_sandbox.py")),
               str(staged.root / UNIT_DIR / "tcpmon.service"), str(staged.root / HOME / "bin/tcpmon"),
               *args, "--pin-dir", view]
    return through_readonly_bind(pin_dir, view, command)


def _as_loader_service(staged, *command):
    """`command` as tcpmon-load.service runs its Exec* lines: root holding only the unit's
    capabilities, no_new_privs, the unit's MemoryDenyWriteExecute= and SystemCallFilter=."""
    caps = parse_unit(staged.root / UNIT_DIR / "tcpmon-load.service")[("Service", "CapabilityBoundingSet")][0]
    bounding = ",".join(["-all"] + ["+" + cap.removeprefix("CAP_").lower() for cap in caps.split()])
    return ["setpriv", "--reuid=0", "--regid=0", "--clear-groups", "--inh-caps=-all", "--ambient-caps=-all",
            f"--bounding-set={bounding}", "--no-new-privs", "/usr/bin/python3", str(staged.helper("unit_sandbox.py")),
            str(staged.root / UNIT_DIR / "tcpmon-load.service"), *command]


def test_loader_unit_loads_shares_and_unloads_under_its_restrictions(staged, load_unit, node_mounts):
    """Without CAP_SYS_ADMIN the unit relies on systemd having mounted bpffs (node_mounts)."""
    pin_dir = f"/sys/fs/bpf/tcpmon-deploy-{os.getpid()}-{secrets.token_hex(3)}"
    service = {key: values for (section, key), values in load_unit.items() if section == "Service"}

    def run(command):
        args = [arg.replace(DEFAULT_PIN_DIR, pin_dir) for arg in command.split()]
        args = [str(staged.root / HOME / "bin/tcpmon") if arg == "/opt/tcpmon/bin/tcpmon" else arg for arg in args]
        if args[0].endswith("chgrp"):
            args[-2] = "nogroup"  # user tcpmon exists only where install.sh ran for real
        return subprocess.run(_as_loader_service(staged, *args), capture_output=True, text=True, timeout=120)

    try:
        for command in service["ExecStart"] + service["ExecStartPost"]:
            result = run(command)
            assert result.returncode == 0, f"{command}: {result.stderr}"
        assert state.inspect(Pins(pin_dir)).attached
        links = [link for link in Pins(pin_dir).links() if link.exists()]
        assert {Pins(pin_dir).connect_link, Pins(pin_dir).exit_link} <= set(links)
        for link in links:
            assert oct(os.stat(link).st_mode & 0o070) == "0o60", link
        result = run(service["ExecStop"][0])
        assert result.returncode == 0, result.stderr
        assert not os.path.exists(pin_dir)
    finally:
        tcpmon_loader.unload(pin_dir)


@pytest.fixture
def shared_pins(load_unit, node_mounts):
    """The probe loaded under a private pin dir, then the loader unit's ExecStartPost
    commands run on it with group nogroup in place of tcpmon."""
    pin_dir = f"/sys/fs/bpf/tcpmon-deploy-{os.getpid()}-{secrets.token_hex(3)}"
    tcpmon_loader.load(pin_dir)
    view = tempfile.mkdtemp(prefix="tcpmon-pins-")  # where BindReadOnlyPaths= puts them
    os.chmod(view, 0o755)

    def share():
        for command in load_unit[("Service", "ExecStartPost")]:
            args = [arg.replace(DEFAULT_PIN_DIR, pin_dir) for arg in command.split()]
            if args[0].endswith("chgrp"):
                args[-2] = "nogroup"
            subprocess.run(args, check=True)

    yield pin_dir, view, share
    tcpmon_loader.unload(pin_dir)
    os.rmdir(view)


def test_unprivileged_exporter_reads_pins_the_loader_unit_shared(staged, shared_pins):
    pin_dir, view, share = shared_pins
    before = subprocess.run(_as_tcpmon_service(staged, pin_dir, view, "dump", "--json"),
                            capture_output=True, text=True, timeout=60)
    assert before.returncode != 0, "user nobody read the pins before ExecStartPost made them group-readable"
    share()
    after = subprocess.run(_as_tcpmon_service(staged, pin_dir, view, "dump", "--json"),
                           capture_output=True, text=True, timeout=60)
    assert after.returncode == 0, after.stderr


def test_unprivileged_exporter_serves_under_the_units_restrictions(staged, shared_pins):
    pin_dir, view, share = shared_pins
    share()
    metrics, health = _free_port(), _free_port()
    proc = subprocess.Popen(_as_tcpmon_service(staged, pin_dir, view, "serve",
                                               "--metrics-addr", f"127.0.0.1:{metrics}",
                                               "--health-addr", f"127.0.0.1:{health}"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{health}/readiness", timeout=2) as reply:
                    assert reply.status == 200
                    break
            except (urllib.error.URLError, ConnectionError) as exc:
                assert proc.poll() is None, f"tcpmon serve exited: {proc.communicate()[1]}"
                assert time.monotonic() < deadline, f"tcpmon serve never became ready: {exc}"
                time.sleep(0.3)
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=5) as reply:
            body = reply.read().decode()
        assert "# TYPE tcp_connects_by_pid gauge" in body
        assert re.search(r"^tcpmon_probe_attached\{mode=\"\w+\"\} 1(\.0)?$", body, re.M), body[-2000:]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_unprivileged_exporter_serves_tls_from_a_web_config_under_the_units_restrictions(staged, shared_pins):
    """As the unit runs it, with TCPMON_WEB_CONFIG_FILE naming a config beside its certificate (a
    stand-in for /etc/tcpmon, readable by the exporter's group)."""
    import ssl

    import yaml
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from certs import CA
    pin_dir, view, share = shared_pins
    share()
    ca = CA()
    cert, key = ca.issue("tcpmon")
    etc = Path(tempfile.mkdtemp(prefix="tcpmon-etc-"))   # pytest's tmp_path is under a 0700 directory
    for name, data in (("tls.crt", cert), ("tls.key", key)):
        (etc / name).write_bytes(data)
    (etc / "web.yml").write_text(yaml.safe_dump({"tls_server_config": {"cert_file": "tls.crt",
                                                                        "key_file": "tls.key"}}))
    for path in [etc, *etc.iterdir()]:
        os.chown(path, 0, 65534)
        os.chmod(path, 0o750 if path.is_dir() else 0o640)
    metrics, health = _free_port(), _free_port()
    command = _as_tcpmon_service(staged, pin_dir, view, "serve", "--metrics-addr", f"127.0.0.1:{metrics}",
                                 "--health-addr", f"127.0.0.1:{health}")
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "TCPMON_WEB_CONFIG_FILE": str(etc / "web.yml")})
    context = ssl.create_default_context(cadata=ca.pem.decode())
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"https://127.0.0.1:{metrics}/metrics", timeout=2,
                                            context=context) as reply:
                    body = reply.read().decode()
                    break
            except (urllib.error.URLError, ConnectionError, ssl.SSLError) as exc:
                assert proc.poll() is None, f"tcpmon serve exited: {proc.communicate()[1]}"
                assert time.monotonic() < deadline, f"tcpmon serve never served TLS: {exc}"
                time.sleep(0.3)
        assert "# TYPE tcp_connects_by_pid gauge" in body
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        shutil.rmtree(etc)
