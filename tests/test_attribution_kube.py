"""Names from the Kubernetes API, against a local HTTPS server that answers like the API server:
it checks the path, the field selector and the bearer token, and serves a PodList in the API
server's own shape (compact JSON, its key order, containerStatuses' containerd://<id>, a static
pod's mirror, init and ephemeral containers, a pending pod). The in-cluster discovery reads
KUBERNETES_SERVICE_HOST/PORT and a service account directory with token and ca.crt."""
import gzip
import http.server
import json
import logging
import os
import secrets
import socket
import ssl
import subprocess
import threading
import urllib.parse

import pytest

from attribution_support import TestCgroups
from tcpmon.attribution import LABELS, Attributor, Config
from tcpmon.attribution.kube import ClusterConfig, KubeError, PodLister, PodNames, index_pods

NODE = "worker-1"
WEB_UID, PROXY_UID, ETCD_UID, PENDING_UID, DEBUG_UID = (
    "3f0c8f52-9b7e-4c1e-8a43-2f6d1c7e9b10", "b8e2a4d1-5c3f-4e6a-9d7b-1a2c3e4f5a6b",
    "6d3a1f0e-2b4c-4d5e-8f9a-0b1c2d3e4f5a", "0a9b8c7d-6e5f-4a3b-2c1d-0e9f8a7b6c5d", "5e4d3c2b-1a09-4f8e-7d6c-5b4a39281706")
ETCD_HASH = "8daa50c3a64c9ff60bb9eab7b44b56fd"   # the static pod's cgroup is named by this, not its mirror's uid
NGINX, INIT, PROXY, ETCD, DEBUG = (secrets.token_hex(32) for _ in range(5))
TOKEN = "eyJhbGciOiJSUzI1NiIsImtpZCI6InRjcG1vbi10ZXN0In0.eyJzdWIiOiJzeXN0ZW06c2VydmljZWFjY291bnQ6bW9uaXRvcmluZzp0Y3Btb24ifQ.c2ln"


def _meta(name, namespace, uid, **extra):
    return {"name": name, **({"generateName": extra.pop("generateName")} if "generateName" in extra else {}),
            "namespace": namespace, "uid": uid, "resourceVersion": "48213", "creationTimestamp": "2026-11-30T08:12:41Z",
            **extra,
            "managedFields": [{"manager": "kubelet", "operation": "Update", "apiVersion": "v1",
                               "time": "2026-11-30T08:12:44Z", "fieldsType": "FieldsV1",
                               "fieldsV1": {"f:status": {"f:containerStatuses": {}}}, "subresource": "status"}]}


def _running(name, cid, image):
    return {"name": name, "state": {"running": {"startedAt": "2026-11-30T08:12:43Z"}}, "lastState": {},
            "ready": True, "restartCount": 0, "image": image, "imageID": f"{image}@sha256:{'ab' * 32}",
            "containerID": f"containerd://{cid}", "started": True}


POD_LIST = {
    "kind": "PodList", "apiVersion": "v1", "metadata": {"resourceVersion": "48230"},
    "items": [
        {"metadata": _meta("web-5d9c7b8f6d-x2x7k", "shop", WEB_UID, generateName="web-5d9c7b8f6d-",
                           labels={"app": "web", "pod-template-hash": "5d9c7b8f6d"},
                           ownerReferences=[{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-5d9c7b8f6d",
                                             "uid": "22a5a8be-7cee-42cd-a6c3-02b620f4ce88", "controller": True,
                                             "blockOwnerDeletion": True}]),
         "spec": {"initContainers": [{"name": "init-config", "image": "busybox:1.36"}],
                  "containers": [{"name": "nginx", "image": "nginx:1.27"}], "nodeName": NODE,
                  "serviceAccountName": "default"},
         "status": {"phase": "Running", "hostIP": "10.0.0.11", "podIP": "10.244.1.17", "qosClass": "Burstable",
                    "initContainerStatuses": [{"name": "init-config", "state": {"terminated": {
                        "exitCode": 0, "reason": "Completed", "startedAt": "2026-11-30T08:12:42Z",
                        "finishedAt": "2026-11-30T08:12:42Z", "containerID": f"containerd://{INIT}"}},
                        "lastState": {}, "ready": True, "restartCount": 0, "image": "docker.io/library/busybox:1.36",
                        "imageID": "", "containerID": f"containerd://{INIT}", "started": False}],
                    "containerStatuses": [_running("nginx", NGINX, "docker.io/library/nginx:1.27")]}},
        {"metadata": _meta("kube-proxy-7xk2p", "kube-system", PROXY_UID, generateName="kube-proxy-",
                           labels={"k8s-app": "kube-proxy"}),
         "spec": {"containers": [{"name": "kube-proxy", "image": "registry.k8s.io/kube-proxy:v1.35.0"}],
                  "nodeName": NODE},
         "status": {"phase": "Running", "qosClass": "BestEffort",
                    "containerStatuses": [_running("kube-proxy", PROXY, "registry.k8s.io/kube-proxy:v1.35.0")]}},
        {"metadata": _meta(f"etcd-{NODE}", "kube-system", ETCD_UID, labels={"component": "etcd", "tier": "control-plane"},
                           annotations={"kubernetes.io/config.hash": ETCD_HASH, "kubernetes.io/config.mirror": ETCD_HASH,
                                        "kubernetes.io/config.seen": "2026-11-30T08:10:02.123456789Z",
                                        "kubernetes.io/config.source": "file"},
                           ownerReferences=[{"apiVersion": "v1", "kind": "Node", "name": NODE, "uid": "e1f2",
                                             "controller": True}]),
         "spec": {"containers": [{"name": "etcd", "image": "registry.k8s.io/etcd:3.5.21-0"}], "nodeName": NODE,
                  "priorityClassName": "system-node-critical"},
         "status": {"phase": "Running", "qosClass": "Burstable",
                    "containerStatuses": [_running("etcd", ETCD, "registry.k8s.io/etcd:3.5.21-0")]}},
        {"metadata": _meta("batch-28714560-q9z8w", "jobs", PENDING_UID, generateName="batch-28714560-"),
         "spec": {"containers": [{"name": "worker", "image": "example.org/worker:2"}], "nodeName": NODE},
         "status": {"phase": "Pending", "qosClass": "BestEffort",
                    "containerStatuses": [{"name": "worker", "state": {"waiting": {"reason": "ContainerCreating"}},
                                           "lastState": {}, "ready": False, "restartCount": 0,
                                           "image": "example.org/worker:2", "imageID": "", "started": False}]}},
        {"metadata": _meta("api-0", "shop", DEBUG_UID),
         "spec": {"containers": [{"name": "api", "image": "example.org/api:7"}], "nodeName": NODE,
                  "ephemeralContainers": [{"name": "debugger-4kq2m", "image": "busybox:1.36"}]},
         "status": {"phase": "Running", "qosClass": "BestEffort", "containerStatuses": [],
                    "ephemeralContainerStatuses": [_running("debugger-4kq2m", DEBUG, "docker.io/library/busybox:1.36")]}},
    ],
}
BODY = json.dumps(POD_LIST, separators=(",", ":")).encode()


def _status(code, reason, message):
    return json.dumps({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                       "message": message, "reason": reason, "code": code}, separators=(",", ":")).encode()


class ApiServer:
    """An HTTPS server on 127.0.0.1 that answers GET /api/v1/pods like the API server would for
    a service account allowed to list pods, and refuses everything else."""

    def __init__(self, tls_dir):
        self.token = TOKEN
        self.body, self.gzip, self.stall = BODY, False, False
        self.requests = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                server.requests.append(self.path)
                if server.stall:
                    server.release.wait(10)
                    return
                url = urllib.parse.urlsplit(self.path)
                query = urllib.parse.parse_qs(url.query)
                if self.headers.get("Authorization") != f"Bearer {server.token}":
                    return self._send(401, _status(401, "Unauthorized", "Unauthorized"))
                if url.path != "/api/v1/pods" or query.get("fieldSelector") != [f"spec.nodeName={NODE}"]:
                    return self._send(403, _status(403, "Forbidden", 'pods is forbidden: User "system:serviceaccount:'
                                                   'monitoring:tcpmon" cannot list resource "pods" in API group "" '
                                                   'at the cluster scope'))
                body = server.body
                gzipped = server.gzip and "gzip" in self.headers.get("Accept-Encoding", "")
                self._send(200, gzip.compress(body) if gzipped else body, gzipped)

            def _send(self, code, body, gzipped=False):
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                if gzipped:
                    self.send_header("Content-Encoding", "gzip")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.release = threading.Event()
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(os.path.join(tls_dir, "apiserver.crt"), os.path.join(tls_dir, "apiserver.key"))
        self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


def _openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def tls_dir(tmp_path_factory):
    """A cluster CA and an API server certificate for 127.0.0.1, like kubeadm's."""
    path = tmp_path_factory.mktemp("pki")
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2", "-subj", "/CN=kubernetes",
             cwd=path)
    _openssl("req", *ec, "-keyout", "apiserver.key", "-out", "apiserver.csr", "-subj", "/CN=kube-apiserver", cwd=path)
    (path / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:kubernetes.default.svc\n")
    _openssl("x509", "-req", "-in", "apiserver.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", "apiserver.crt", "-days", "2", "-extfile", "san.ext", cwd=path)
    _openssl("req", "-x509", *ec, "-keyout", "other.key", "-out", "other-ca.crt", "-days", "2", "-subj", "/CN=other",
             cwd=path)
    return str(path)


@pytest.fixture
def api(tls_dir):
    server = ApiServer(tls_dir)
    yield server
    server.close()


@pytest.fixture
def serviceaccount(tmp_path, tls_dir):
    """/var/run/secrets/kubernetes.io/serviceaccount as the projected volume fills it."""
    sa = tmp_path / "serviceaccount"
    sa.mkdir()
    (sa / "token").write_text(TOKEN)
    (sa / "ca.crt").write_bytes(open(os.path.join(tls_dir, "ca.crt"), "rb").read())
    (sa / "namespace").write_text("monitoring")
    return sa


def _environ(api):
    return {"KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": str(api.port)}


def _lister(api, serviceaccount, timeout=2.0):
    return PodLister(ClusterConfig.in_cluster(_environ(api), str(serviceaccount)), NODE, timeout=timeout)


class FakeClock:
    def __init__(self):
        self.now = 50.0

    def __call__(self):
        return self.now


def test_in_cluster_config_is_found_from_the_pod_environment(api, serviceaccount):
    config = ClusterConfig.in_cluster(_environ(api), str(serviceaccount))
    assert config.url == f"https://127.0.0.1:{api.port}"
    assert config.token_file == str(serviceaccount / "token") and config.ca_file == str(serviceaccount / "ca.crt")
    assert ClusterConfig("fd00:10:96::1", 443, "t", "c").url == "https://[fd00:10:96::1]:443"


@pytest.mark.parametrize("environ, missing, message", [
    ({}, None, "KUBERNETES_SERVICE_HOST/KUBERNETES_SERVICE_PORT are not set"),
    ({"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "https"}, None, "is not a port number"),
    ({"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"}, "token", "token: mount the service"),
    ({"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"}, "ca.crt", "ca.crt: mount the"),
])
def test_in_cluster_config_says_what_is_missing(serviceaccount, environ, missing, message):
    if missing:
        (serviceaccount / missing).unlink()
    with pytest.raises(KubeError, match=message):
        ClusterConfig.in_cluster(environ, str(serviceaccount))


def test_lists_the_pods_of_this_node_with_the_token(api, serviceaccount):
    pods = _lister(api, serviceaccount).list()
    assert pods == POD_LIST
    path = urllib.parse.urlsplit(api.requests[-1])
    assert path.path == "/api/v1/pods"
    assert urllib.parse.parse_qs(path.query) == {"fieldSelector": [f"spec.nodeName={NODE}"], "resourceVersion": ["0"]}


def test_index_has_every_container_and_the_static_pods_hash():
    pods, containers = index_pods(POD_LIST)
    assert pods[WEB_UID] == ("shop", "web-5d9c7b8f6d-x2x7k")
    assert pods[ETCD_HASH] == pods[ETCD_UID] == ("kube-system", f"etcd-{NODE}")
    assert containers == {NGINX: ("shop", "web-5d9c7b8f6d-x2x7k", "nginx"),
                          INIT: ("shop", "web-5d9c7b8f6d-x2x7k", "init-config"),
                          PROXY: ("kube-system", "kube-proxy-7xk2p", "kube-proxy"),
                          ETCD: ("kube-system", f"etcd-{NODE}", "etcd"),
                          DEBUG: ("shop", "api-0", "debugger-4kq2m")}


@pytest.mark.parametrize("pod_list", [
    {"kind": "PodList", "items": [None, 3, "x", {"metadata": [], "status": {"containerStatuses": {"a": 1}}},
                                  {"metadata": {"uid": WEB_UID}, "status": {"containerStatuses": [7, {"containerID": 5}]}}]},
])
def test_index_skips_what_is_not_shaped_like_a_pod(pod_list):
    pods, containers = index_pods(pod_list)
    assert pods == {WEB_UID: ("", "")} and containers == {}


def test_index_is_bounded(caplog):
    many = {"kind": "PodList", "items": [{"metadata": {"uid": str(i), "name": f"p{i}", "namespace": "n"},
                                          "status": {"containerStatuses": [{"name": "c", "containerID": f"containerd://{i}"}]}}
                                         for i in range(50)]}
    with caplog.at_level(logging.WARNING, "tcpmon.attribution"):
        pods, containers = index_pods(many, max_entries=10)
    assert len(pods) == len(containers) == 10
    assert "more than 10 entries" in caplog.text


def test_gzip_answers_are_read(api, serviceaccount):
    api.gzip = True
    assert _lister(api, serviceaccount).list() == POD_LIST


def test_a_rotated_token_is_read_again(api, serviceaccount):
    lister = _lister(api, serviceaccount)
    assert lister.list()["kind"] == "PodList"
    api.token = TOKEN + "rotated"
    with pytest.raises(KubeError, match="401 Unauthorized: the service account token was refused"):
        lister.list()
    (serviceaccount / "token").write_text(TOKEN + "rotated\n")
    assert lister.list()["kind"] == "PodList"


def _trust_another_ca(sa, tls_dir):
    (sa / "ca.crt").write_bytes(open(os.path.join(tls_dir, "other-ca.crt"), "rb").read())


@pytest.mark.parametrize("tweak, message", [
    (lambda api, sa, lister, tls: setattr(lister, "path", "/api/v1/pods"),
     "403 Forbidden: the service account needs list on pods"),
    (lambda api, sa, lister, tls: setattr(api, "body", b"<html>proxy error</html>"), "not JSON"),
    (lambda api, sa, lister, tls: setattr(api, "body", b"[" * 200000), "not JSON"),
    (lambda api, sa, lister, tls: setattr(api, "body", b'{"kind":"Status","items":[]}'), "the answer is not a PodList"),
    (lambda api, sa, lister, tls: setattr(lister, "max_response", 1000), "answer larger than 1000 bytes"),
    (lambda api, sa, lister, tls: _trust_another_ca(sa, tls), "TLS: certificate verify failed"),
    (lambda api, sa, lister, tls: (sa / "token").unlink(), "No such file or directory: .*token"),
], ids=["no field selector", "not json", "deep json", "not a PodList", "too large", "another CA", "no token"])
def test_failures_are_one_line_errors(api, serviceaccount, tls_dir, tweak, message):
    lister = _lister(api, serviceaccount)
    tweak(api, serviceaccount, lister, tls_dir)
    with pytest.raises(KubeError, match=message) as error:
        lister.list()
    assert "\n" not in str(error.value) and f"node {NODE}" in str(error.value)


def test_a_silent_api_server_times_out(api, serviceaccount):
    api.stall = True
    with pytest.raises(KubeError, match=r"no answer within 0\.3s"):
        _lister(api, serviceaccount, timeout=0.3).list()


def test_a_closed_port_is_a_one_line_error(serviceaccount):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = ClusterConfig.in_cluster({"KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": str(port)},
                                      str(serviceaccount))
    with pytest.raises(KubeError, match="Connection refused"):
        PodLister(config, NODE).list()


def test_names_are_asked_for_on_a_miss_only(api, serviceaccount):
    clock = FakeClock()
    names = PodNames(_lister(api, serviceaccount), clock=clock)
    keys = {(WEB_UID, NGINX), (ETCD_HASH, ETCD), (PROXY_UID, PROXY)}
    assert names.names(keys) == {(WEB_UID, NGINX): ("shop", "web-5d9c7b8f6d-x2x7k", "nginx"),
                                 (ETCD_HASH, ETCD): ("kube-system", f"etcd-{NODE}", "etcd"),
                                 (PROXY_UID, PROXY): ("kube-system", "kube-proxy-7xk2p", "kube-proxy")}
    clock.now += 100
    names.names(keys)
    assert names.requests == len(api.requests) == 1   # all known: no request


def test_a_key_the_api_does_not_know_is_asked_for_less_and_less(api, serviceaccount):
    clock = FakeClock()
    names = PodNames(_lister(api, serviceaccount), min_interval=5, max_backoff=20, clock=clock)
    sandbox = secrets.token_hex(32)   # the pause container: in no status
    asked = []
    for _ in range(60):
        assert names.names({(WEB_UID, sandbox)})[(WEB_UID, sandbox)] == ("shop", "web-5d9c7b8f6d-x2x7k", "")
        asked.append(names.requests)
        clock.now += 1
    times = [t for t, (a, b) in enumerate(zip([0] + asked, asked)) if b > a]
    assert [b - a for a, b in zip(times, times[1:])] == [5, 10, 20, 20]


def test_a_new_container_shows_up_at_the_next_list(api, serviceaccount):
    clock = FakeClock()
    names = PodNames(_lister(api, serviceaccount), min_interval=5, clock=clock)
    worker = secrets.token_hex(32)
    assert names.names({(PENDING_UID, worker)})[(PENDING_UID, worker)] == ("jobs", "batch-28714560-q9z8w", "")
    started = json.loads(BODY)
    started["items"][3]["status"]["containerStatuses"][0]["containerID"] = f"containerd://{worker}"
    api.body = json.dumps(started, separators=(",", ":")).encode()
    clock.now += 5
    assert names.names({(PENDING_UID, worker)})[(PENDING_UID, worker)] == ("jobs", "batch-28714560-q9z8w", "worker")


def test_a_failing_api_is_counted_logged_backed_off_and_names_stay_empty(api, serviceaccount, caplog):
    clock = FakeClock()
    names = PodNames(_lister(api, serviceaccount), min_interval=5, max_backoff=40, clock=clock)
    api.token = "revoked"
    with caplog.at_level(logging.INFO, "tcpmon.attribution"):
        for _ in range(100):
            assert names.names({(WEB_UID, NGINX)}) == {(WEB_UID, NGINX): ("", "", "")}
            clock.now += 1
        assert names.errors == names.requests == 5   # at 0, 5, 15, 35, 75 s
        assert "401 Unauthorized" in names.last_error
        failures = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(failures) == 2   # the first, then once a minute while it repeats
        api.token = TOKEN
        clock.now += 40
        assert names.names({(WEB_UID, NGINX)})[(WEB_UID, NGINX)] == ("shop", "web-5d9c7b8f6d-x2x7k", "nginx")
    assert names.last_error is None
    assert "kubernetes API answers again: 5 pods" in caplog.text


def test_all_six_labels_of_real_cgroups_with_names_from_the_api(api, serviceaccount):
    cgroups = TestCgroups()
    try:
        web = cgroups.make(f"kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{WEB_UID.replace('-', '_')}"
                           f".slice/cri-containerd-{NGINX}.scope")
        etcd = cgroups.make(f"kubepods/burstable/pod{ETCD_HASH}/{ETCD}")
        unit = cgroups.make("system.slice/kubelet.service")
        ids = {rel: os.stat(cgroups.dir(rel)).st_ino for rel in (web, etcd, unit)}
        attributor = Attributor(Config(labels=LABELS, kubernetes=True, node_name=NODE),
                                serviceaccount=str(serviceaccount), environ=_environ(api))
        assert attributor.problem is None
        series = attributor.series("tcpmon_connects_total", [(ids[web], "nginx", [4, 1]), (ids[etcd], "etcd", [2, 0]),
                                                             (ids[unit], "kubelet", [9, 0])])
        assert series.rows == [
            (("etcd", "", ETCD, ETCD_HASH, "kube-system", f"etcd-{NODE}", "etcd"), [2, 0]),
            (("kubelet", "kubelet.service", "", "", "", "", ""), [9, 0]),
            (("nginx", "", NGINX, WEB_UID, "shop", "web-5d9c7b8f6d-x2x7k", "nginx"), [4, 1]),
        ]
        assert attributor.stats()["kube_requests"] == 1
    finally:
        cgroups.close()


def test_kubernetes_outside_a_pod_is_a_problem_not_a_crash(serviceaccount):
    attributor = Attributor(Config(labels=LABELS, kubernetes=True, node_name=NODE), environ={},
                            serviceaccount=str(serviceaccount))
    assert "KUBERNETES_SERVICE_HOST" in attributor.problem and "stay empty" in attributor.problem
    assert attributor.label_names == LABELS
    assert attributor.series("f", [(1, "init", [1])]).rows == [(("init", "", "", "", "", "", ""), [1])]
