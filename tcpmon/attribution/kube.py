"""namespace, pod and container names from the Kubernetes API: the pods of this node.

One request, `GET /api/v1/pods?fieldSelector=spec.nodeName=<node>&resourceVersion=0` (served
from the API server's watch cache), with the pod's service account token: read-only RBAC on
pods is all it needs, where a container runtime's socket would be root on the node. Each
request has a deadline and a size limit; a failure is logged, counted and backed off, and the
names stay empty until the API answers again.
"""
from __future__ import annotations

import http.client
import json
import logging
import os
import socket
import ssl
import time
import urllib.parse
import zlib
from typing import NamedTuple

from tcpmon.errors import TcpmonError

log = logging.getLogger("tcpmon.attribution")

SERVICEACCOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"
TIMEOUT = 2.0                   # seconds for one request, connect to last byte
MAX_RESPONSE = 16 << 20         # bytes of JSON (after gzip); 250 pods are a few MB, parsed ~10x that
MAX_CONTAINERS = 65536          # index entries kept from one response
MIN_INTERVAL = 5.0              # seconds between two requests at least
MAX_BACKOFF = 300.0             # the longest wait after failures, or for a name that stays unknown
MIRROR = "kubernetes.io/config.mirror"   # a static pod's mirror: the hash its cgroup is named by
NO_NAMES = ("", "", "")


class KubeError(TcpmonError):
    """The Kubernetes API could not be asked, or its answer was not a PodList."""


class ClusterConfig(NamedTuple):
    host: str
    port: int
    token_file: str
    ca_file: str

    @property
    def url(self):
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"https://{host}:{self.port}"

    @classmethod
    def in_cluster(cls, environ=None, serviceaccount=SERVICEACCOUNT):
        """The API server and credentials a pod is given: KUBERNETES_SERVICE_HOST/PORT and the
        service account's token and ca.crt."""
        environ = os.environ if environ is None else environ
        host, port = environ.get("KUBERNETES_SERVICE_HOST"), environ.get("KUBERNETES_SERVICE_PORT")
        if not host or not port:
            raise KubeError("KUBERNETES_SERVICE_HOST/KUBERNETES_SERVICE_PORT are not set: "
                            "--kubernetes works in a pod only")
        if not port.isdigit():
            raise KubeError(f"KUBERNETES_SERVICE_PORT '{port}' is not a port number")
        config = cls(host, int(port), os.path.join(serviceaccount, "token"), os.path.join(serviceaccount, "ca.crt"))
        for path in (config.token_file, config.ca_file):
            if not os.path.isfile(path):
                raise KubeError(f"no {path}: mount the service account token into the exporter "
                                f"(the chart does with attribution.kubernetes.enabled)")
        return config


class PodLister:
    """Lists the pods of one node, with a deadline and a size limit on every request."""

    def __init__(self, config, node_name, timeout=TIMEOUT, max_response=MAX_RESPONSE):
        self.config = config
        self.node_name = node_name
        self.timeout = timeout
        self.max_response = max_response
        query = urllib.parse.urlencode({"fieldSelector": f"spec.nodeName={node_name}", "resourceVersion": "0"})
        self.path = f"/api/v1/pods?{query}"

    def _context(self):
        # made per request, so a rotated ca.crt is picked up
        return ssl.create_default_context(cafile=self.config.ca_file)

    def _token(self):
        # the kubelet rotates the token file: read it for each request
        with open(self.config.token_file, encoding="ascii") as f:
            return f.read().strip()

    def list(self):
        """The PodList as a dict; KubeError with a one-line reason otherwise."""
        what = f"kubernetes API {self.config.url}: listing the pods of node {self.node_name}"
        deadline = time.monotonic() + self.timeout
        try:
            headers = {"Authorization": f"Bearer {self._token()}", "Accept": "application/json",
                       "Accept-Encoding": "gzip", "User-Agent": "tcpmon"}
            conn = http.client.HTTPSConnection(self.config.host, self.config.port, timeout=self.timeout,
                                               context=self._context())
            try:
                conn.request("GET", self.path, headers=headers)
                sock = conn.sock   # the response may outlive conn.sock; the socket stays open for it
                response = conn.getresponse()
                body = self._read(response, sock, deadline)
            finally:
                conn.close()
        except (socket.timeout, TimeoutError):
            raise KubeError(f"{what}: no answer within {self.timeout:g}s") from None
        except (OSError, http.client.HTTPException) as exc:
            raise KubeError(f"{what}: {_why(exc)}") from None
        if response.status != 200:
            raise KubeError(f"{what}: {response.status} {response.reason}{_hint(response.status)}")
        return self._decode(body, response.getheader("Content-Encoding", ""), what)

    def _read(self, response, sock, deadline):
        chunks, size = [], 0
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise socket.timeout()
            sock.settimeout(left)
            chunk = response.read1(65536)
            if not chunk:
                return b"".join(chunks)
            size += len(chunk)
            if size > self.max_response:
                raise http.client.HTTPException(f"answer larger than {self.max_response} bytes")
            chunks.append(chunk)

    def _decode(self, body, encoding, what):
        try:
            if encoding == "gzip":
                inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)
                body = inflate.decompress(body, self.max_response + 1)
                if len(body) > self.max_response:
                    raise KubeError(f"{what}: answer larger than {self.max_response} bytes")
            pods = json.loads(body)
        except (ValueError, RecursionError, zlib.error) as exc:
            raise KubeError(f"{what}: not JSON ({str(exc)[:100]})") from None
        if not isinstance(pods, dict) or pods.get("kind") != "PodList" or not isinstance(pods.get("items"), list):
            raise KubeError(f"{what}: the answer is not a PodList")
        return pods


def _why(exc):
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS: certificate verify failed ({exc.verify_message}): is ca.crt the cluster's CA?"
    if isinstance(exc, ssl.SSLError):
        return f"TLS: {exc.reason or exc}"
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
    return str(exc) or type(exc).__name__


def _hint(status):
    if status == 401:
        return ": the service account token was refused (expired, or not mounted)"
    if status == 403:
        return ": the service account needs list on pods (the chart's ClusterRole)"
    return ""


def _dict(value):
    return value if isinstance(value, dict) else {}


def _container_id(status):
    # "containerd://<64 hex>", "cri-o://...", "docker://..." -> the id
    _, sep, cid = str(status.get("containerID") or "").partition("://")
    return cid if sep else ""


def index_pods(pod_list, max_entries=MAX_CONTAINERS):
    """({pod uid or mirror hash: (namespace, pod)}, {container id: (namespace, pod, container)}).
    Items that are not shaped like pods are skipped; at most max_entries of each are kept."""
    pods, containers = {}, {}
    for item in pod_list["items"]:
        meta, status = _dict(_dict(item).get("metadata")), _dict(_dict(item).get("status"))
        names = (str(meta.get("namespace", "")), str(meta.get("name", "")))
        for key in (meta.get("uid"), _dict(meta.get("annotations")).get(MIRROR)):
            if key and len(pods) < max_entries:
                pods[str(key)] = names
        for field in ("initContainerStatuses", "containerStatuses", "ephemeralContainerStatuses"):
            statuses = status.get(field)
            for container in map(_dict, statuses if isinstance(statuses, list) else ()):
                cid = _container_id(container)
                if cid and len(containers) < max_entries:
                    containers[cid] = (*names, str(container.get("name", "")))
    if len(pods) >= max_entries or len(containers) >= max_entries:
        log.warning("the pods of this node hold more than %d entries: names of the rest stay empty", max_entries)
    return pods, containers


class PodNames:
    """(pod_uid, container_id) -> (namespace, pod, container), refreshed from the API on a miss.

    One request per miss, at most one per MIN_INTERVAL; a key the API still does not know is
    asked for again after a wait that doubles up to MAX_BACKOFF, and so is the API after a
    failure. Not thread-safe: the Attributor holds a lock.
    """

    def __init__(self, lister, min_interval=MIN_INTERVAL, max_backoff=MAX_BACKOFF, clock=time.monotonic):
        self.lister = lister
        self.min_interval = min_interval
        self.max_backoff = max_backoff
        self._clock = clock
        self._pods, self._containers = {}, {}
        self._misses = {}            # key -> (when to ask again, how long the last wait was)
        self._next_request = None
        self._backoff = min_interval
        self.requests = 0
        self.errors = 0
        self.last_error = None
        self._logged = (None, None)  # (message, when)

    def names(self, keys):
        """{(pod_uid, container_id): (namespace, pod, container)} for keys with a pod_uid."""
        now = self._clock()
        wanted = [key for key in keys if key[0] and self._lookup(key) is None]
        if any(self._due(part, now) for key in wanted for part in self._parts(key)) and self._refresh(now):
            for key in wanted:
                for part in self._parts(key):
                    if self._known(part):
                        self._misses.pop(part, None)
                    elif self._due(part, now):
                        self._remember_miss(part, now)
        return {key: self._lookup(key) or self._partial(key) for key in keys}

    @staticmethod
    def _parts(key):
        pod_uid, container_id = key
        return (pod_uid, container_id) if container_id else (pod_uid,)

    def _known(self, part):
        return part in self._pods or part in self._containers

    def _lookup(self, key):
        pod_uid, container_id = key
        if container_id in self._containers:
            return self._containers[container_id]
        if pod_uid in self._pods and not container_id:
            return (*self._pods[pod_uid], "")
        return None

    def _partial(self, key):
        pod_uid = key[0]
        return (*self._pods[pod_uid], "") if pod_uid in self._pods else NO_NAMES

    def _due(self, part, now):
        if self._known(part):
            return False
        miss = self._misses.get(part)
        return miss is None or now >= miss[0]

    def _remember_miss(self, part, now):
        wait = min(self.max_backoff, 2 * self._misses[part][1]) if part in self._misses else self.min_interval
        if len(self._misses) >= MAX_CONTAINERS:
            self._misses.pop(next(iter(self._misses)))
        self._misses[part] = (now + wait, wait)

    def _refresh(self, now):
        """True when a fresh list came in."""
        if self._next_request is not None and now < self._next_request:
            return False
        self.requests += 1
        try:
            self._pods, self._containers = index_pods(self.lister.list())
        except KubeError as exc:
            self.errors += 1
            self.last_error = str(exc)
            self._next_request = now + self._backoff
            self._backoff = min(self.max_backoff, 2 * self._backoff)
            self._log_failure(str(exc), now)
            return False
        if self.last_error is not None:
            log.info("kubernetes API answers again: %d pods on node %s", len(set(self._pods.values())),
                     self.lister.node_name)
        self.last_error, self._logged = None, (None, None)
        self._backoff = self.min_interval
        self._next_request = now + self.min_interval
        return True

    def _log_failure(self, message, now):
        last_message, last_time = self._logged
        if message != last_message or now - last_time >= 60:
            log.warning("%s (names stay empty; failures so far: %d)", message, self.errors)
            self._logged = (message, now)
