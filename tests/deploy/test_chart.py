"""Security and wiring properties of the Helm chart, checked on the objects helm renders."""
import json
import re

import pytest
import yaml

from deploylib import REPO, helm_template
from tcpmon import attach, cli
from tcpmon.pins import DEFAULT_PIN_DIR


def _by_kind(docs):
    kinds = {}
    for doc in docs:
        kinds.setdefault(doc["kind"], []).append(doc)
    return kinds


def _one(docs, kind):
    found = _by_kind(docs).get(kind, [])
    assert len(found) == 1, f"expected one {kind}, rendered {len(found)}"
    return found[0]


@pytest.fixture(scope="module")
def default_docs(helm):
    return helm_template(helm)[0]


@pytest.fixture(scope="module")
def pod(default_docs):
    return _one(default_docs, "DaemonSet")["spec"]["template"]["spec"]


@pytest.fixture(scope="module")
def loader(pod):
    assert [c["name"] for c in pod["initContainers"]] == ["loader"]
    return pod["initContainers"][0]


@pytest.fixture(scope="module")
def exporter(pod):
    assert [c["name"] for c in pod["containers"]] == ["exporter"]
    return pod["containers"][0]


def _env(container):
    return {item["name"]: item["value"] for item in container.get("env", [])}


def _subcommand_envs(name):
    """The TCPMON_* variables the real CLI reads for `tcpmon NAME`."""
    sub = cli.build_parser()._subparsers._group_actions[0].choices[name]
    return {cli._env(opt) for action in sub._actions for opt in action.option_strings
            if opt.startswith("--") and opt not in ("--help", "--json", "--foreground")}


def test_default_render_has_exactly_the_expected_objects(default_docs):
    assert sorted(doc["kind"] for doc in default_docs) == ["DaemonSet", "Service", "ServiceAccount"]


def test_pod_shares_nothing_with_the_host_but_bpffs(pod):
    for key in ("hostPID", "hostIPC", "hostNetwork"):
        assert not pod.get(key), f"{key} is set: comm comes from the kernel, the host's namespaces are not needed"
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    host_paths = {vol["name"]: vol["hostPath"] for vol in pod["volumes"] if "hostPath" in vol}
    assert host_paths == {"bpffs": {"path": "/sys/fs/bpf", "type": "Directory"},
                          "tracefs": {"path": "/sys/kernel/tracing", "type": "Directory"}}
    assert set(host_paths) == {vol["name"] for vol in pod["volumes"]}


def test_loader_init_container_loads_with_bpf_and_perfmon_only(loader):
    assert loader["args"] == ["load"]
    ctx = loader["securityContext"]
    assert ctx["capabilities"] == {"drop": ["ALL"], "add": ["BPF", "PERFMON"]}
    assert ctx["privileged"] is False
    assert ctx["allowPrivilegeEscalation"] is False
    assert ctx["readOnlyRootFilesystem"] is True
    assert ctx["appArmorProfile"] == {"type": "Unconfined"}
    mounts = {m["mountPath"]: m.get("readOnly", False) for m in loader["volumeMounts"]}
    assert mounts == {"/sys/fs/bpf": False, "/sys/kernel/tracing": True}
    assert loader["resources"]["limits"] and loader["resources"]["requests"]


def test_exporter_runs_serve_with_cap_bpf_only(exporter):
    assert exporter["args"] == ["serve"]
    ctx = exporter["securityContext"]
    assert ctx["capabilities"] == {"drop": ["ALL"], "add": ["BPF"]}
    assert ctx["privileged"] is False
    assert ctx["allowPrivilegeEscalation"] is False
    assert ctx["readOnlyRootFilesystem"] is True
    assert "appArmorProfile" not in ctx
    assert exporter["volumeMounts"] == [{"name": "bpffs", "mountPath": "/sys/fs/bpf", "readOnly": True}]
    assert exporter["resources"]["limits"] and exporter["resources"]["requests"]


def test_probes_hit_the_health_port(exporter):
    ports = {port["name"]: port["containerPort"] for port in exporter["ports"]}
    assert ports == {"metrics": 9090, "health": 8080}
    for probe_name, path in (("livenessProbe", "/liveness"), ("readinessProbe", "/readiness")):
        check = exporter[probe_name]["httpGet"]
        assert check["path"] == path
        assert ports[check["port"]] == 8080
    env = _env(exporter)
    assert env["TCPMON_HEALTH_ADDR"].endswith(":8080")
    assert env["TCPMON_METRICS_ADDR"].endswith(":9090")


def test_every_environment_variable_is_one_the_cli_reads(loader, exporter):
    assert set(_env(loader)) <= _subcommand_envs("load")
    assert set(_env(exporter)) <= _subcommand_envs("serve")
    assert _env(loader)["TCPMON_PIN_DIR"] == _env(exporter)["TCPMON_PIN_DIR"] == DEFAULT_PIN_DIR


def test_runs_on_every_node(default_docs, pod):
    assert {"operator": "Exists"} in pod["tolerations"]
    ds = _one(default_docs, "DaemonSet")
    assert ds["spec"]["updateStrategy"]["type"] == "RollingUpdate"


def test_service_selects_the_pods_metrics_port(default_docs, exporter):
    service = _one(default_docs, "Service")
    labels = _one(default_docs, "DaemonSet")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["metrics"]


def test_monitoring_objects_are_optional_and_wired(helm, default_docs):
    docs = helm_template(helm, "serviceMonitor.enabled=true", "prometheusRule.enabled=true")[0]
    kinds = _by_kind(docs)
    monitor = kinds["ServiceMonitor"][0]
    service = kinds["Service"][0]
    assert monitor["spec"]["selector"]["matchLabels"] == service["spec"]["selector"]
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == [p["name"] for p in service["spec"]["ports"]]
    # the target labels the operator adds must not rename the attribution labels of the same names
    drops = [r["regex"] for e in monitor["spec"]["endpoints"] for r in e["relabelings"] if r.get("action") == "labeldrop"]
    assert drops == ["(namespace|pod|container)"]
    assert not any(e.get("honorLabels") for e in monitor["spec"]["endpoints"])
    alerts = {rule["alert"]: rule["expr"] for rule in kinds["PrometheusRule"][0]["spec"]["groups"][0]["rules"]}
    assert set(alerts) == set(ALERTS)
    assert all(f'job="{service["metadata"]["name"]}"' in expr for expr in alerts.values())


def test_rule_thresholds_come_from_the_values(helm):
    docs = helm_template(helm, "prometheusRule.enabled=true", "prometheusRule.connectStormFactor=25")[0]
    rules = {rule["alert"]: rule for rule in _one(docs, "PrometheusRule")["spec"]["groups"][0]["rules"]}
    assert "> 25 * sum by" in rules["TcpmonConnectStorm"]["expr"]
    assert "more than 25 times" in rules["TcpmonConnectStorm"]["annotations"]["description"]


def _dashboard_configmap(helm, *sets):
    docs = helm_template(helm, "dashboard.enabled=true", *sets)[0]
    return _one(docs, "ConfigMap")


def test_dashboard_configmap_is_what_the_grafana_sidecar_loads(helm):
    configmap = _dashboard_configmap(helm)
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert configmap["metadata"]["namespace"] == "monitoring"
    (name,) = configmap["data"]
    assert name.endswith(".json")
    shipped = json.loads((REPO / "charts/tcpmon/dashboards/tcpmon.json").read_text())
    assert json.loads(configmap["data"][name]) == shipped


def test_dashboard_label_namespace_and_folder_are_settable(helm):
    configmap = _dashboard_configmap(helm, "dashboard.label=grafana_dashboard_tcp", "dashboard.labelValue=yes",
                                     "dashboard.namespace=grafana", "dashboard.annotations.grafana_folder=Network")
    assert configmap["metadata"]["labels"]["grafana_dashboard_tcp"] == "yes"
    assert "grafana_dashboard" not in configmap["metadata"]["labels"]
    assert configmap["metadata"]["namespace"] == "grafana"
    assert configmap["metadata"]["annotations"] == {"grafana_folder": "Network"}


@pytest.fixture(scope="module")
def served(pin_dir):
    """The sample names the real exporter serves over the session's probe."""
    from metrics import served_names
    from tcpmon import exposition
    from tcpmon.collector import Collector
    collector = Collector(pin_dir)
    try:
        return served_names(exposition.render(collector.snapshot()).decode())
    finally:
        collector.close()


@pytest.fixture(scope="module")
def alert_rules(helm):
    docs = helm_template(helm, "prometheusRule.enabled=true")[0]
    return {rule["alert"]: rule for rule in _one(docs, "PrometheusRule")["spec"]["groups"][0]["rules"]}


ALERTS = [rule["alert"] for group in yaml.safe_load((REPO / "configs/tcpmon.rules.yml").read_text())["groups"]
          for rule in group["rules"]]


@pytest.mark.parametrize("alert", ALERTS)
def test_alert_uses_metrics_the_exporter_serves(alert_rules, served, alert):
    used = set(re.findall(r"\b(tcpmon_\w+)", alert_rules[alert]["expr"]))
    assert used <= served, f"{alert} uses metrics the exporter does not serve: {used - served}"


def test_unload_mode_unloads_and_serves_nothing(helm):
    docs = helm_template(helm, "unload=true")[0]
    pod = _one(docs, "DaemonSet")["spec"]["template"]["spec"]
    assert [(c["name"], c["args"]) for c in pod["initContainers"]] == [("unloader", ["unload"])]
    (idle,) = pod["containers"]
    assert idle["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert "ports" not in idle


def test_attach_modes_match_the_cli(helm):
    schema = json.loads((REPO / "charts/tcpmon/values.schema.json").read_text())
    assert schema["properties"]["loader"]["properties"]["attach"]["enum"] == ["auto", *attach.MODE_NAMES]


@pytest.mark.parametrize("bad", [
    "exporter.metricsPort=0",
    "exporter.healthPort=70000",
    "loader.attach=uprobe",
    "loader.extraCapabilities={ALL}",
    "loader.extraCapabilities={PERFMON}",
    "loader.maxPids=0",
    "exporter.logLevel=verbose",
    "pinDir=relative/dir",
    "bogusKey=1",
    "dashboard.bogusKey=1",
    "dashboard.label=not_a/valid/label",
    "prometheusRule.connectFailureRatio=2",
    "prometheusRule.connectStormFactor=1",
])
def test_schema_rejects_bad_values(helm, bad):
    result = helm_template(helm, bad, check=False)[1]
    assert result.returncode != 0, f"helm accepted --set {bad}"
    assert "schema" in result.stderr.lower() or "values don't meet" in result.stderr.lower()


def test_extra_capabilities_are_added_to_the_loader_only(helm):
    docs = helm_template(helm, "loader.extraCapabilities={IPC_LOCK}")[0]
    pod = _one(docs, "DaemonSet")["spec"]["template"]["spec"]
    assert pod["initContainers"][0]["securityContext"]["capabilities"]["add"] == ["BPF", "PERFMON", "IPC_LOCK"]
    assert pod["containers"][0]["securityContext"]["capabilities"]["add"] == ["BPF"]


def test_debug_daemonset_keeps_the_split(lint_tools):
    import yaml
    docs = list(yaml.safe_load_all((REPO / "k8s/debug-daemonset.yaml").read_text()))
    pod = _one(docs, "DaemonSet")["spec"]["template"]["spec"]
    assert not pod.get("hostPID")
    (init,) = pod["initContainers"]
    (main,) = pod["containers"]
    assert init["args"][0] == "load"
    assert init["securityContext"]["capabilities"]["add"] == ["BPF", "PERFMON"]
    assert main["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["BPF"]}
    assert {p["containerPort"] for p in main["ports"]} == {5678, 9090, 8080}
    assert "unload" in main["lifecycle"]["preStop"]["exec"]["command"]


# --- TLS and basic auth: the web config Secret and the ServiceMonitor --------------------------

def _web_values(tmp_path, **web):
    import sys

    import bcrypt
    import yaml
    sys.path.insert(0, str(REPO / "tests"))
    from certs import CA
    ca = CA()
    cert, key = ca.issue("tcpmon")
    values = {"exporter": {"webConfig": {
        "enabled": True,
        "config": {"tls_server_config": {"cert_file": "tls.crt", "key_file": "tls.key"},
                   "basic_auth_users": {"prometheus": bcrypt.hashpw(b"pw", bcrypt.gensalt(4)).decode()}},
        "files": {"tls.crt": cert.decode(), "tls.key": key.decode()}, **web}},
        "serviceMonitor": {"enabled": True, "scheme": "https",
                           "tlsConfig": {"ca": {"secret": {"name": "tcpmon-ca", "key": "ca.crt"}}},
                           "basicAuth": {"username": {"name": "scrape", "key": "username"},
                                         "password": {"name": "scrape", "key": "password"}}}}
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def test_the_web_config_secret_is_mounted_read_only_and_loads(helm, tmp_path):
    from tcpmon import web
    docs = helm_template(helm, values_file=_web_values(tmp_path))[0]
    secret = _one(docs, "Secret")
    pod = _one(docs, "DaemonSet")["spec"]["template"]["spec"]
    (exporter,) = pod["containers"]
    assert _env(exporter)["TCPMON_WEB_CONFIG_FILE"] == "/etc/tcpmon/web/web.yml"
    assert _env(exporter)["TCPMON_HEALTH_TLS"] == "0"
    assert {"name": "web-config", "mountPath": "/etc/tcpmon/web", "readOnly": True} in exporter["volumeMounts"]
    volume = next(v for v in pod["volumes"] if v["name"] == "web-config")
    assert volume["secret"] == {"secretName": secret["metadata"]["name"], "defaultMode": 0o400}
    assert "web-config" not in {m["name"] for m in pod["initContainers"][0]["volumeMounts"]}
    for probe_name in ("livenessProbe", "readinessProbe"):
        assert exporter[probe_name]["httpGet"]["scheme"] == "HTTP"
    for name, content in secret["stringData"].items():   # what the kubelet would mount
        (tmp_path / name).write_text(content)
    config = web.load(str(tmp_path / "web.yml"))
    assert config.tls.enabled and set(config.users) == {"prometheus"}


def test_health_tls_switches_the_probes_to_https(helm, tmp_path):
    docs = helm_template(helm, values_file=_web_values(tmp_path, healthTLS=True))[0]
    (exporter,) = _one(docs, "DaemonSet")["spec"]["template"]["spec"]["containers"]
    assert _env(exporter)["TCPMON_HEALTH_TLS"] == "1"
    for probe_name in ("livenessProbe", "readinessProbe"):
        assert exporter[probe_name]["httpGet"]["scheme"] == "HTTPS"


def test_an_existing_secret_is_used_as_it_is(helm, tmp_path):
    docs = helm_template(helm, "exporter.webConfig.existingSecret=my-web", values_file=_web_values(tmp_path))[0]
    assert "Secret" not in _by_kind(docs)
    pod = _one(docs, "DaemonSet")["spec"]["template"]["spec"]
    assert next(v for v in pod["volumes"] if v["name"] == "web-config")["secret"]["secretName"] == "my-web"


def test_the_service_monitor_scrapes_with_tls_and_basic_auth(helm, tmp_path):
    docs = helm_template(helm, values_file=_web_values(tmp_path))[0]
    (endpoint,) = _one(docs, "ServiceMonitor")["spec"]["endpoints"]
    assert endpoint["scheme"] == "https"
    assert endpoint["tlsConfig"] == {"ca": {"secret": {"name": "tcpmon-ca", "key": "ca.crt"}}}
    assert endpoint["basicAuth"]["password"] == {"name": "scrape", "key": "password"}
    plain = helm_template(helm, "serviceMonitor.enabled=true")[0]
    (endpoint,) = _one(plain, "ServiceMonitor")["spec"]["endpoints"]
    assert endpoint["scheme"] == "http" and "tlsConfig" not in endpoint and "basicAuth" not in endpoint


@pytest.mark.parametrize("bad", ["exporter.webConfig.config.tls_config.x=1", "exporter.webConfig.bogus=1",
                                 "serviceMonitor.scheme=ftp", "exporter.maxConnections=0",
                                 "exporter.readTimeout=0"])
def test_schema_rejects_bad_serving_values(helm, bad):
    result = helm_template(helm, bad, check=False)[1]
    assert result.returncode != 0, f"helm accepted --set {bad}"


# --- attribution (opt-in): the host's cgroupfs read-only, names from the API with list on pods only ---

@pytest.fixture(scope="module")
def attribution_docs(helm):
    return helm_template(helm, "attribution.enabled=true")[0]


def _envs(container):
    return {item["name"]: item.get("value", item.get("valueFrom")) for item in container.get("env", [])}


def test_attribution_is_off_by_default(default_docs, exporter):
    assert _env(exporter)["TCPMON_LABELS"] == "none"
    assert not {"ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"} & set(_by_kind(default_docs))


def test_attribution_rbac_lists_pods_and_nothing_else(attribution_docs):
    (role,) = _by_kind(attribution_docs)["ClusterRole"]
    assert role["rules"] == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]}]
    assert set(role["rules"][0]["verbs"]) <= {"get", "list", "watch"}
    assert not _by_kind(attribution_docs).get("Role") and not _by_kind(attribution_docs).get("RoleBinding")
    (binding,) = _by_kind(attribution_docs)["ClusterRoleBinding"]
    account = _one(attribution_docs, "ServiceAccount")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                  "name": role["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account["metadata"]["name"],
                                    "namespace": "monitoring"}]


def test_attribution_token_and_cgroupfs_reach_the_exporter_only(attribution_docs):
    pod = _one(attribution_docs, "DaemonSet")["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    (loader,), (exporter,) = pod["initContainers"], pod["containers"]
    assert {m["name"] for m in loader["volumeMounts"]} == {"bpffs", "tracefs"}
    mounts = {m["mountPath"]: (m["name"], m.get("readOnly", False)) for m in exporter["volumeMounts"]}
    assert mounts == {"/sys/fs/bpf": ("bpffs", True), "/host/sys/fs/cgroup": ("cgroup", True),
                      "/var/run/secrets/kubernetes.io/serviceaccount": ("kube-api-access", True)}
    assert exporter["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["BPF"]}
    volumes = {vol["name"]: vol for vol in pod["volumes"]}
    assert volumes["cgroup"]["hostPath"] == {"path": "/sys/fs/cgroup", "type": "Directory"}
    sources = volumes["kube-api-access"]["projected"]["sources"]
    assert {"path": "token", "expirationSeconds": 3607} == sources[0]["serviceAccountToken"]
    assert sources[1]["configMap"]["name"] == "kube-root-ca.crt"


def test_attribution_environment_is_what_serve_reads(attribution_docs):
    (exporter,) = _one(attribution_docs, "DaemonSet")["spec"]["template"]["spec"]["containers"]
    env = _envs(exporter)
    assert set(env) <= _subcommand_envs("serve")
    assert env["TCPMON_NODE_NAME"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    assert (env["TCPMON_KUBERNETES"], env["TCPMON_LABELS"], env["TCPMON_CGROUP_ROOT"]) == ("1", "auto", "/host/sys/fs/cgroup")
    args = cli.build_parser().parse_args(["serve"])
    assert args.labels == "auto"


def test_attribution_without_kubernetes_has_no_token_and_no_rbac(helm):
    docs = helm_template(helm, "attribution.enabled=true", "attribution.kubernetes.enabled=false",
                         "attribution.maxSeries=500", "attribution.labels=unit\\,container_id")[0]
    assert not {"ClusterRole", "ClusterRoleBinding"} & set(_by_kind(docs))
    pod = _one(docs, "DaemonSet")["spec"]["template"]["spec"]
    env = _envs(pod["containers"][0])
    assert "TCPMON_KUBERNETES" not in env and env["TCPMON_MAX_SERIES"] == "500"
    assert env["TCPMON_LABELS"] == "unit,container_id"
    assert "kube-api-access" not in {vol["name"] for vol in pod["volumes"]}


def test_attribution_renders_valid_kubernetes_objects(helm, lint_tools, tmp_path):
    import subprocess
    _, result = helm_template(helm, "attribution.enabled=true")
    manifest = tmp_path / "attribution.yaml"
    manifest.write_text(result.stdout)
    from deploylib import K8S_VERSION
    check = subprocess.run([str(lint_tools / "kubernetes-validate"), "--strict", "-k", K8S_VERSION, str(manifest)],
                           capture_output=True, text=True, timeout=300)
    assert check.returncode == 0, check.stdout + check.stderr


@pytest.mark.parametrize("bad", [
    "attribution.labels=pod\\,image",
    "attribution.maxSeries=0",
    "attribution.cgroupHostPath=sys/fs/cgroup",
    "attribution.kubernetes.watch=true",
    "attribution.bogus=1",
])
def test_schema_rejects_bad_attribution_values(helm, bad):
    result = helm_template(helm, bad, check=False)[1]
    assert result.returncode != 0, f"helm accepted --set {bad}"
    assert "schema" in result.stderr.lower() or "values don't meet" in result.stderr.lower()


def test_bpffs_mount_is_off_by_default(pod):
    assert [c["name"] for c in pod["initContainers"]] == ["loader"]
    for container in pod["initContainers"] + pod["containers"]:
        assert all("mountPropagation" not in m for m in container["volumeMounts"]), container["name"]
        assert container["securityContext"]["privileged"] is False


def test_bpffs_mount_adds_a_privileged_init_step_that_shares_its_mount_with_the_node(helm, lint_tools, tmp_path):
    import subprocess
    from deploylib import K8S_VERSION
    docs, result = helm_template(helm, "bpffsMount=true")
    pod = _one(docs, "DaemonSet")["spec"]["template"]["spec"]
    (mount, loader), (exporter,) = pod["initContainers"], pod["containers"]
    assert mount["name"] == "mount-bpffs" and mount["securityContext"]["privileged"] is True
    assert "mount -t bpf bpf /sys/fs/bpf" in mount["command"][-1]
    assert mount["volumeMounts"] == [{"name": "bpffs", "mountPath": "/sys/fs/bpf", "mountPropagation": "Bidirectional"}]
    assert loader["volumeMounts"][0] == {"name": "bpffs", "mountPath": "/sys/fs/bpf",
                                         "mountPropagation": "HostToContainer"}
    assert exporter["volumeMounts"] == [{"name": "bpffs", "mountPath": "/sys/fs/bpf", "readOnly": True,
                                         "mountPropagation": "HostToContainer"}]
    # the loader and the exporter keep their own capability sets
    assert loader["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["BPF", "PERFMON"]}
    assert exporter["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["BPF"]}
    assert loader["securityContext"]["privileged"] is exporter["securityContext"]["privileged"] is False
    manifest = tmp_path / "bpffs.yaml"
    manifest.write_text(result.stdout)
    check = subprocess.run([str(lint_tools / "kubernetes-validate"), "--strict", "-k", K8S_VERSION, str(manifest)],
                           capture_output=True, text=True, timeout=300)
    assert check.returncode == 0, check.stdout + check.stderr


def test_schema_rejects_a_bpffs_mount_that_is_not_a_boolean(helm):
    _, result = helm_template(helm, "bpffsMount=yes", check=False)
    assert result.returncode != 0 and "bpffsMount" in result.stderr, result.stderr
