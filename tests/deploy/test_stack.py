"""docker-compose.yml, configs/prometheus.yml, the CI workflow, and the docs' references
to tcpmon's settings, checked against each other and against the real CLI."""
import re

import pytest

from deploylib import REPO
from tcpmon import cli

BUILDX_PLATFORMS = {"linux/amd64", "linux/arm64", "linux/arm/v7", "linux/riscv64"}


def _yaml(rel):
    import yaml
    return yaml.safe_load((REPO / rel).read_text())


@pytest.fixture(scope="module")
def compose(lint_tools):
    return _yaml("docker-compose.yml")


@pytest.fixture(scope="module")
def workflow(lint_tools):
    return _yaml(".github/workflows/ci.yml")


def test_compose_tcpmon_has_only_the_loaders_capabilities(compose):
    tcpmon = compose["services"]["tcpmon"]
    assert tcpmon["command"] == ["run"]
    assert tcpmon["cap_drop"] == ["ALL"]
    assert tcpmon["cap_add"] == ["BPF", "PERFMON"]
    assert "pid" not in tcpmon and "privileged" not in tcpmon and "network_mode" not in tcpmon
    assert tcpmon["read_only"] is True
    assert "no-new-privileges:true" in tcpmon["security_opt"]
    mounts = {v["target"]: v.get("read_only", False) for v in tcpmon["volumes"]}
    assert mounts == {"/sys/fs/bpf": False, "/sys/kernel/tracing": True}
    # a string (CMD-SHELL): podman-compose 1.0.3 misquotes a CMD list
    assert isinstance(tcpmon["healthcheck"]["test"], str) and "/readiness" in tcpmon["healthcheck"]["test"]


def test_compose_prometheus_scrapes_tcpmon(compose):
    prometheus = compose["services"]["prometheus"]
    assert "./configs/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in prometheus["volumes"]
    assert re.fullmatch(r"prom/prometheus:v\d+\.\d+\.\d+", prometheus["image"])
    config = _yaml("configs/prometheus.yml")
    job = next(job for job in config["scrape_configs"] if job["job_name"] == "tcpmon")
    targets = [t for group in job["static_configs"] for t in group["targets"]]
    published = {port.rsplit(":", 1)[1] for port in compose["services"]["tcpmon"]["ports"]}  # the container ports
    metrics_port = cli.build_parser().parse_args(["serve"]).metrics_addr.rsplit(":", 1)[1]
    assert targets == [f"tcpmon:{metrics_port}"] and metrics_port in published


def _steps(job):
    return " ".join(step.get("run", "") + " " + step.get("uses", "") for step in job["steps"])


def test_workflow_jobs(workflow):
    jobs = workflow["jobs"]
    assert set(jobs) >= {"lint", "test", "bpf", "image", "chart"}
    assert "make lint" in _steps(jobs["lint"])
    assert "make test" in _steps(jobs["test"])
    assert "--privileged" in jobs["test"]["container"]["options"]
    assert "make build-all" in _steps(jobs["bpf"])
    assert "helm lint" in _steps(jobs["chart"])
    image = _steps(jobs["image"])
    assert "docker/setup-qemu-action" in image and "docker/setup-buildx-action" in image
    build = next(step for step in jobs["image"]["steps"] if step.get("uses", "").startswith("docker/build-push-action"))
    assert set(build["with"]["platforms"].split(",")) == BUILDX_PLATFORMS
    assert "Dockerfile.debug" in image


def test_every_action_is_pinned_to_a_version(workflow):
    for name, job in workflow["jobs"].items():
        for step in job["steps"]:
            if "uses" in step:
                assert re.fullmatch(r"[\w.-]+/[\w.-]+@v\d+", step["uses"]), f"{name}: {step['uses']}"


def _cli_envs():
    parser = cli.build_parser()
    envs = set()
    for sub in parser._subparsers._group_actions[0].choices.values():
        envs |= {cli._env(opt) for action in sub._actions for opt in action.option_strings if opt.startswith("--")}
    return envs


DOCUMENTS = ["docs/ARCHITECTURE.md", "docs/DEVELOPMENT.md", "docs/RELEASING.md", "deploy/systemd/tcpmon.default",
             "deploy/systemd/tcpmon.service", "deploy/systemd/tcpmon-load.service", "docker-compose.yml",
             "charts/tcpmon/templates/daemonset.yaml", "k8s/debug-daemonset.yaml", "charts/tcpmon/values.yaml"]


@pytest.mark.parametrize("rel", DOCUMENTS)
def test_every_tcpmon_variable_mentioned_exists(rel):
    mentioned = set(re.findall(r"\bTCPMON_[A-Z_]+\b", (REPO / rel).read_text()))
    unknown = mentioned - _cli_envs()
    assert not unknown, f"{rel} mentions settings the CLI does not read: {sorted(unknown)}"


@pytest.mark.parametrize("rel", ["docs/ARCHITECTURE.md", "docs/DEVELOPMENT.md"])
def test_every_tcpmon_command_line_in_the_docs_parses(rel):
    """`tcpmon SUBCOMMAND --flag ...` lines in the docs' code blocks are accepted by the real parser."""
    parser = cli.build_parser()
    lines = re.findall(r"^\s*(?:\$ |# |sudo )?(tcpmon (?:load|unload|status|dump|serve|run)\b[^\n|>&]*)",
                       (REPO / rel).read_text(), re.M)
    assert lines, f"{rel} shows no tcpmon command"
    for line in lines:
        args = line.split()[1:]
        args = args[:next((i for i, arg in enumerate(args) if arg.startswith("#")), len(args))]
        try:
            parser.parse_args(args)
        except SystemExit:
            pytest.fail(f"{rel}: '{line.strip()}' is not a valid tcpmon command line")
