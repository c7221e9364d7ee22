"""scripts/lint.sh passes on the tree and fails on each kind of breakage it is there to catch."""
import re

import pytest

from deploylib import run_lint

STEPS = ["chart", "docker", "systemd", "prometheus", "shell", "yaml", "json", "workflow"]


def test_lint_passes_on_the_repository(lint_tools):
    result = run_lint()
    assert result.returncode == 0, f"make lint fails:\n{result.stdout}\n{result.stderr}"
    for step in STEPS:
        assert f"lint: {step}: ok" in result.stdout


def test_lint_rejects_an_unknown_step(lint_tools):
    result = run_lint("bogus")
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == ["lint: unknown step 'bogus': use one of " + " ".join(STEPS)]


def _edit(path, old, new, count=1):
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}: the test's breakage no longer applies"
    path.write_text(text.replace(old, new, count))


# (step, file, text to replace, replacement, what the failing tool says)
BREAKAGES = {
    "chart-schema-port": ("chart", "charts/tcpmon/values.yaml", "metricsPort: 9090", "metricsPort: 0",
                          r"metricsPort.*(minimum|greater)"),
    "chart-schema-unknown-value": ("chart", "charts/tcpmon/values.yaml", "unload: false\n",
                                   "unload: false\nunlaod: true\n", r"unlaod"),
    "chart-invalid-field-type": ("chart", "charts/tcpmon/templates/daemonset.yaml",
                                 "automountServiceAccountToken: false", "automountServiceAccountToken: \"no\"",
                                 r"automountServiceAccountToken|is not of type|not valid"),
    "chart-unknown-field": ("chart", "charts/tcpmon/templates/daemonset.yaml",
                            "allowPrivilegeEscalation: false", "allowPrivilegeEscalation: false\n            privilegedd: false",
                            r"privilegedd|[Aa]dditional properties"),
    "chart-template-error": ("chart", "charts/tcpmon/templates/service.yaml", "{{ .Values.service.port }}",
                             "{{ .Values.service.port | nosuchfunction }}", r"nosuchfunction"),
    "chart-bad-promql": ("chart", "charts/tcpmon/templates/prometheusrule.yaml", "> 0\n", "> > 0\n",
                         r"promtool|parse error|unexpected"),
    "chart-dashboard-configmap": ("chart", "charts/tcpmon/templates/dashboard-configmap.yaml", "\ndata:\n",
                                  "\ndatta:\n", r"datta|[Aa]dditional properties"),
    "k8s-debug-manifest": ("chart", "k8s/debug-daemonset.yaml", "containerPort: 5678", "containerPort: \"five\"",
                           r"containerPort|not of type|not valid"),
    "dockerfile-latest": ("docker", "Dockerfile", "ARG DEBIAN_IMAGE=debian:13.1-slim\n",
                          "ARG DEBIAN_IMAGE=debian:13.1-slim\nFROM debian:latest AS scratchpad\n", r"DL3007"),
    "dockerfile-no-yes": ("docker", "Dockerfile", "apt-get install -y --no-install-recommends libbpf1",
                          "apt-get install --no-install-recommends libbpf1", r"DL3014"),
    "dockerfile-debug-cd": ("docker", "Dockerfile.debug", "RUN /opt/tcpmon/bin/python -m ensurepip",
                            "RUN cd /tmp && /opt/tcpmon/bin/python -m ensurepip", r"DL3003"),
    "compose-caps": ("docker", "docker-compose.yml", "    cap_drop:\n      - ALL\n", "    cap_drop: 7\n",
                     r"cap_drop|not of type|not valid"),
    "unit-unknown-key": ("systemd", "deploy/systemd/tcpmon.service", "NoNewPrivileges=yes",
                         "NoNewPrivilege=yes", r"Unknown key"),
    "unit-bad-type": ("systemd", "deploy/systemd/tcpmon-load.service", "Type=oneshot", "Type=oneshott",
                      r"[Ff]ailed to parse service type|oneshott"),
    "unit-missing-program": ("systemd", "deploy/systemd/tcpmon-load.service", "ExecStartPost=/usr/bin/chgrp",
                             "ExecStartPost=/usr/bin/chgrpp", r"not executable"),
    "unit-exposure": ("systemd", "deploy/systemd/tcpmon.service", "UMask=0077\n",
                      "UMask=0077\nProtectSystem=no\nPrivateDevices=no\nProtectKernelTunables=no\nPrivateTmp=no\n"
                      "RestrictNamespaces=no\nSystemCallFilter=\n", r"exposure is above"),
    "prometheus-duration": ("prometheus", "configs/prometheus.yml", "scrape_interval: 15s", "scrape_interval: 15",
                            r"scrape_interval|duration|unmarshal|not a valid"),
    "prometheus-bad-rule": ("prometheus", "configs/tcpmon.rules.yml", "> 0.9\n", "> > 0.9\n",
                            r"tcpmon.rules.yml|parse error|unexpected"),
    "shell-unquoted": ("shell", "scripts/cleanup-debug.sh", 'kubectl delete -f "$repo/k8s/debug-daemonset.yaml"',
                       "kubectl delete -f $repo/k8s/debug-daemonset.yaml", r"SC2086"),
    "yaml-duplicate-key": ("yaml", "configs/prometheus.yml", "  scrape_timeout: 10s\n",
                           "  scrape_timeout: 10s\n  scrape_timeout: 5s\n", r"duplication of key"),
    "json-trailing-comma": ("json", ".vscode/launch.json", '"justMyCode": false\n    }\n  ]',
                            '"justMyCode": false,\n    }\n  ]', r"not valid JSON"),
    "json-dashboard": ("json", "charts/tcpmon/dashboards/tcpmon.json", '"schemaVersion": 39,', '"schemaVersion": 39,,',
                       r"tcpmon.json is not valid JSON"),
    "workflow-no-runner": ("workflow", ".github/workflows/ci.yml", "  chart:\n    runs-on: ubuntu-24.04\n",
                           "  chart:\n", r"runs-on|is not valid|required"),
}


@pytest.mark.parametrize("case", sorted(BREAKAGES))
def test_lint_fails_on_a_broken_copy(lint_tools, tree_copy, case):
    step, rel, old, new, said = BREAKAGES[case]
    clean = run_lint(step, root=tree_copy)
    assert clean.returncode == 0, f"the unbroken copy fails {step}:\n{clean.stdout}\n{clean.stderr}"
    _edit(tree_copy / rel, old, new)
    broken = run_lint(step, root=tree_copy)
    output = broken.stdout + broken.stderr
    assert broken.returncode != 0, f"lint {step} passed with {rel} broken ({case}):\n{output}"
    assert f"lint: {step}: FAILED" in broken.stderr
    assert re.search(said, output), f"lint {step} failed without naming the problem ({said}):\n{output}"


def test_lint_reports_every_failed_step(lint_tools, tree_copy):
    _edit(tree_copy / "Dockerfile", "apt-get install -y --no-install-recommends libbpf1",
          "apt-get install --no-install-recommends libbpf1")
    _edit(tree_copy / "configs/prometheus.yml", "scrape_interval: 15s", "scrape_interval: 15")
    result = run_lint("docker", "prometheus", "yaml", root=tree_copy)
    assert result.returncode == 1
    assert "lint: failed: docker prometheus" in result.stderr
    assert "lint: yaml: ok" in result.stdout
