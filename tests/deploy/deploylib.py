"""Helpers of the deployment tests: the lint script, the rendered chart, read-only binds.

Named deploylib (not conftest) so that `from conftest import ...` in tests/ keeps finding
tests/conftest.py."""
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LINT = REPO / "scripts" / "lint.sh"
VENV = Path(sys.prefix)
CHART = REPO / "charts" / "tcpmon"
K8S_VERSION = "1.35.0"

# What a lint run over a copy of the tree needs (tests break the copy, never the repo).
DEPLOY_FILES = [".ci", ".github", ".vscode", "charts", "configs", "deploy", "k8s", "kernels", "scripts",
                "Dockerfile", "Dockerfile.debug", "docker-compose.yml", ".hadolint.yaml", ".yamllint"]


def lint_env(**extra):
    env = dict(os.environ, VENV=str(VENV), K8S_VERSION=K8S_VERSION)
    env.update(extra)
    return env


def run_lint(*steps, root=None, **env):
    """scripts/lint.sh STEP... over `root` (default: the repository)."""
    extra = {"LINT_ROOT": str(root)} if root else {}
    extra.update(env)
    return subprocess.run([str(LINT), *steps], cwd=REPO, env=lint_env(**extra),
                          capture_output=True, text=True, timeout=600)


def helm_template(helm, *sets, check=True, values_file=None):
    """The chart rendered with `--set` arguments (and a values file): (list of objects, CompletedProcess)."""
    import yaml
    args = [helm, "template", "tcpmon", str(CHART), "--namespace", "monitoring", "--kube-version", K8S_VERSION]
    if values_file:
        args += ["--values", str(values_file)]
    for value in sets:
        args += ["--set", value]
    result = subprocess.run(args, capture_output=True, text=True, timeout=120)
    if check:
        assert result.returncode == 0, result.stderr
    docs = [doc for doc in yaml.safe_load_all(result.stdout) if doc] if result.returncode == 0 else []
    return docs, result


def through_readonly_bind(source, target, command):
    """`command` in a private mount namespace in which `source` is bound read-only at
    `target`: what a readOnly hostPath volumeMount and BindReadOnlyPaths= give."""
    script = 'mount --bind -o ro "$1" "$2" && shift 2 && exec "$@"'
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh",
            str(source), str(target), *command]
