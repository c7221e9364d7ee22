"""A real Prometheus server scrapes the session exporter and stores exactly what was counted.

Prometheus 2.x asks for OpenMetrics first, so this is also the OpenMetrics body ingested by the
reference implementation.
"""
import json
import os
import secrets
import subprocess
import time
import urllib.parse

import pytest

from conftest import Connector, free_port, http_get, unique_comm
from tcpmon._render import comm_label

PROMETHEUS = "/usr/bin/prometheus"

pytestmark = pytest.mark.skipif(not os.access(PROMETHEUS, os.X_OK),
                                reason=f"{PROMETHEUS} missing: install Debian's prometheus package "
                                       "(scripts/apt-packages.txt)")


class Prometheus:
    """A Prometheus scraping `target` every second, with `labels` on the target and
    `rule_files` evaluated every second."""
    SCRAPE_INTERVAL = 1

    def __init__(self, target, workdir, job=None, labels=None, rule_files=()):
        self.job = job or f"tcpmon-test-{secrets.token_hex(3)}"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = workdir / "prometheus.yml"
        interval = f"{self.SCRAPE_INTERVAL}s"
        config.write_text(json.dumps({  # YAML is a superset of JSON
            "global": {"scrape_interval": interval, "scrape_timeout": interval, "evaluation_interval": interval},
            "rule_files": [str(path) for path in rule_files],
            "scrape_configs": [{"job_name": self.job,
                                "static_configs": [{"targets": [target], "labels": labels or {}}]}]}))
        self.log = open(workdir / "prometheus.log", "w+")
        self.proc = subprocess.Popen(
            [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn",
             f"--web.console.templates={workdir}", f"--web.console.libraries={workdir}"],
            stdout=self.log, stderr=subprocess.STDOUT, cwd=workdir)
        self._wait_ready()

    def _wait_ready(self, timeout=30):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited {self.proc.returncode}: {self.logs()}")
            try:
                if http_get(self.url + "/-/ready", timeout=1)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"prometheus not ready in {timeout}s: {self.logs()}")

    def logs(self):
        self.log.seek(0)
        return self.log.read()[-4000:]

    def api(self, path, **params):
        """The `data` of a successful /api/v1/ reply; fails on an error or a warning."""
        status, _, body = http_get(f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params, doseq=True)}")
        reply = json.loads(body)
        assert status == 200 and reply["status"] == "success", (path, params, reply)
        assert not reply.get("warnings"), (path, params, reply["warnings"])
        return reply["data"]

    def query(self, promql):
        return self.api("query", query=promql)["result"]

    def wait_for(self, promql, timeout=60):
        """The query's result as soon as it is not empty (bounded wait)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            result = self.query(promql)
            if result:
                return result
            time.sleep(0.25)
        pytest.fail(f"no sample for {promql} within {timeout}s; targets: "
                    f"{http_get(self.url + '/api/v1/targets')[2][:2000]!r}; log: {self.logs()}")

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
        return self.proc.returncode


@pytest.fixture(scope="module")
def prometheus(exporter, tmp_path_factory):
    server = Prometheus(f"127.0.0.1:{exporter.metrics_port}", tmp_path_factory.mktemp("prometheus"))
    yield server
    assert server.stop() == 0, server.logs()


def promql_string(text):
    """A PromQL double-quoted string (Go escaping)."""
    return json.dumps(text)


def test_prometheus_stores_the_exact_counts(prometheus):
    with Connector(unique_comm(), opened=5, refused=4) as proc:
        label = comm_label(proc.comm)
        result = prometheus.wait_for(f'tcp_connects_by_pid{{comm={promql_string(label)}}}')
        assert len(result) == 1, result
        metric, (_, value) = result[0]["metric"], result[0]["value"]
        assert metric["pid"] == str(proc.pid) and metric["job"] == prometheus.job
        assert value == "9" and proc.active_opens == 9
        total = prometheus.wait_for(f'tcpmon_connect_attempts_total{{comm={promql_string(label)}}}')
        assert [sample["value"][1] for sample in total] == ["9"]
    up = prometheus.query(f'up{{job="{prometheus.job}"}}')
    assert [sample["value"][1] for sample in up] == ["1"]
    attached = prometheus.query(f'tcpmon_probe_attached{{job="{prometheus.job}"}}')
    assert [sample["value"][1] for sample in attached] == ["1"]


def test_prometheus_keeps_hostile_labels_apart(prometheus):
    """Prometheus' own parser ingests the escaped labels as tcpmon means them."""
    tag = secrets.token_hex(2)
    # newline not last: the Connector reads its comm back with rstrip(b"\n"), which would drop it
    comms = [tag + r'"q\\b\x0az', tag + r"\xff\xfe", tag + r"\\xff", tag + r"\xc3\xa9"]
    connectors = [Connector(comm, opened=1 + i) for i, comm in enumerate(comms)]
    try:
        for i, proc in enumerate(connectors):
            result = prometheus.wait_for(f'tcp_connects_by_pid{{pid="{proc.pid}"}}')
            assert [(r["metric"]["comm"], r["value"][1]) for r in result] == [(comm_label(proc.comm), str(1 + i))]
    finally:
        for proc in connectors:
            proc.close()


def test_the_scrape_target_is_healthy(prometheus):
    prometheus.wait_for(f'up{{job="{prometheus.job}"}} == 1')
    status, _, body = http_get(prometheus.url + "/api/v1/targets?state=active")
    targets = [t for t in json.loads(body)["data"]["activeTargets"] if t["labels"]["job"] == prometheus.job]
    assert len(targets) == 1 and targets[0]["health"] == "up" and targets[0]["lastError"] == "", targets
    samples = prometheus.query(f'scrape_samples_post_metric_relabeling{{job="{prometheus.job}"}}')
    assert samples and int(samples[0]["value"][1]) > 0
