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

import pytest

from deploylib import helm_template, through_readonly_bind
from tcpmon import loader as tcpmon_loader

TCPMON = [sys.executable, "-m", "tcpmon"]


def _caps_of(helm):
    pod = next(doc for doc in helm_template(helm)[0] if doc["kind"] == "DaemonSet")["spec"]["template"]["spec"]
    return {"loader": pod["initContainers"][0]["securityContext"]["capabilities"]["add"],
            "exporter": pod["containers"][0]["securityContext"]["capabilities"]["add"]}


def as_container(caps, *args, readonly_bpffs=False):
    """`tcpmon ARGS` as uid 0 holding only `caps` (Kubernetes names, e.g. BPF), no_new_privs
    set, and with readonly_bpffs /sys/fs/bpf read-only as the exporter's volumeMount has it."""
    bounding = ",".join(["-all"] + [f"+{cap.lower()}" for cap in caps])
    cmd = ["setpriv", "--reuid=0", "--regid=0", "--clear-groups", "--inh-caps=-all", "--ambient-caps=-all",
           f"--bounding-set={bounding}", "--no-new-privs", *TCPMON, *args]
    if readonly_bpffs:
        cmd = through_readonly_bind("/sys/fs/bpf", "/sys/fs/bpf", cmd)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def caps(helm):
    return _caps_of(helm)


@pytest.fixture
def pin_dir_for_caps():
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


def test_loader_and_exporter_work_with_the_charts_capabilities(caps, pin_dir_for_caps):
    assert caps == {"loader": ["BPF", "PERFMON"], "exporter": ["BPF"]}
    loaded = as_container(caps["loader"], "load", "--pin-dir", pin_dir_for_caps)
    assert loaded.returncode == 0, f"tcpmon load fails with {caps['loader']}: {loaded.stderr}"
    status = as_container(caps["exporter"], "status", "--json", "--pin-dir", pin_dir_for_caps, readonly_bpffs=True)
    assert status.returncode == 0, f"tcpmon status fails with {caps['exporter']}: {status.stderr}"
    report = json.loads(status.stdout)
    assert report["attached"] is True
    assert all("error" not in fill for fill in report["maps"].values()), report["maps"]
    unload = as_container(caps["exporter"], "unload", "--pin-dir", pin_dir_for_caps, readonly_bpffs=True)
    assert unload.returncode != 0, "the exporter's read-only bpffs let it unload the probe"
    dumped = as_container(caps["exporter"], "dump", "--json", "--pin-dir", pin_dir_for_caps, readonly_bpffs=True)
    assert dumped.returncode == 0, f"tcpmon dump fails with {caps['exporter']}: {dumped.stderr}"
    assert isinstance(json.loads(dumped.stdout), list)


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
