"""TLS and basic auth from an exporter-toolkit web config, with real TLS clients (Python's ssl,
openssl's s_client where it says more) against a CA and certificates made here.

Behaviour follows exporter-toolkit (and Prometheus, which reads the same file): 401 with
WWW-Authenticate for missing or wrong credentials, plain HTTP on a TLS port answered with Go's 400,
min_version honoured, client certificates verified against client_ca_file, certificates re-read
when their files change, one line naming the key for a bad file.
"""
import http.client
import os
import signal
import socket
import ssl
import subprocess
import time
import warnings
from base64 import b64encode
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import bcrypt
import pytest
import yaml

from certs import CA
from conftest import ROOT, TCPMON, Connector, Exporter, http_get, unique_comm
from metrics import pid_value

USER, PASSWORD = "prometheus", "correct horse"


def auth(user=USER, password=PASSWORD):
    return {"Authorization": "Basic " + b64encode(f"{user}:{password}".encode()).decode()}


def hashed(password, rounds=4):
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds)).decode()


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    directory = tmp_path_factory.mktemp("pki")
    ca, other = CA(), CA("another CA")
    files = {"ca.pem": ca.pem}
    for name, (cert, key) in {"server": ca.issue("tcpmon"), "client": ca.issue("scraper", client=True),
                              "rogue": other.issue("rogue", client=True)}.items():
        files[f"{name}.crt"], files[f"{name}.key"] = cert, key
    for name, data in files.items():
        (directory / name).write_bytes(data)
    return SimpleNamespace(dir=directory, ca=ca, path=lambda name: str(directory / name))


def write_config(path, config):
    path.write_text(yaml.safe_dump(config))
    return str(path)


def tls_config(pki, **extra):
    return {"cert_file": pki.path("server.crt"), "key_file": pki.path("server.key"), **extra}


def client_context(pki, cert=None, version=None):
    context = ssl.create_default_context(cafile=pki.path("ca.pem"))
    if cert:
        context.load_cert_chain(pki.path(f"{cert}.crt"), pki.path(f"{cert}.key"))
    if version:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)   # TLS 1.1: the point of the test
            context.minimum_version = context.maximum_version = version
        context.set_ciphers("DEFAULT:@SECLEVEL=0")
    return context


def https_get(port, context, path="/metrics", headers=None, timeout=10):
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=timeout)
    try:
        conn.request("GET", path, headers=headers or {})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def served_certificate(port, context):
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            return tls.getpeercert(binary_form=True)


@pytest.fixture(scope="module")
def tls_exporter(pin_dir, pki, tmp_path_factory):
    path = write_config(tmp_path_factory.mktemp("web") / "web.yml", {
        "tls_server_config": tls_config(pki),
        "basic_auth_users": {USER: hashed(PASSWORD)},
        "http_server_config": {"headers": {"X-Content-Type-Options": "nosniff", "X-Frame-Options": "deny"}}})
    server = Exporter(pin_dir, "--web.config.file", path)
    yield server
    server.stop()


# --- basic auth over TLS ---------------------------------------------------------------------

def test_the_right_user_and_password_get_the_metrics(tls_exporter, pki):
    with Connector(unique_comm(), opened=2, refused=1) as proc:
        status, headers, body = https_get(tls_exporter.metrics_port, client_context(pki), headers=auth())
        assert status == 200, body
        assert pid_value(body.decode(), proc.pid, proc.comm) == 3
    assert headers["x-content-type-options"] == "nosniff" and headers["x-frame-options"] == "deny"


@pytest.mark.parametrize("credentials", ["none", "wrong password", "unknown user", "not base64", "no colon"])
def test_missing_or_wrong_credentials_are_401_with_www_authenticate(tls_exporter, pki, credentials):
    headers = {"none": {}, "wrong password": auth(password="wrong"), "unknown user": auth(user="nobody"),
               "not base64": {"Authorization": "Basic ***"},
               "no colon": {"Authorization": "Basic " + b64encode(b"prometheus").decode()}}[credentials]
    status, reply_headers, body = https_get(tls_exporter.metrics_port, client_context(pki), headers=headers)
    assert status == 401 and body == b"Unauthorized\n"
    assert reply_headers["www-authenticate"] == "Basic"
    assert reply_headers["x-frame-options"] == "deny"   # exporter-toolkit sets the headers on a 401 too


def test_health_stays_plain_http_without_auth(tls_exporter):
    for path in ("/liveness", "/readiness", "/health"):
        assert http_get(tls_exporter.health + path)[0] == 200


def test_plain_http_on_the_tls_port_is_refused(tls_exporter):
    with socket.create_connection(("127.0.0.1", tls_exporter.metrics_port), timeout=10) as sock:
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n")
        reply = b""
        while chunk := sock.recv(4096):
            reply += chunk
    assert reply.startswith(b"HTTP/1.0 400 Bad Request") and b"HTTP request to an HTTPS server" in reply
    assert b"tcp_connects_by_pid" not in reply


# --- protocol versions and client certificates -----------------------------------------------

@pytest.mark.parametrize("min_version, accepted", [("TLS12", False), ("TLS10", True)])
def test_tls11_is_refused_when_min_version_is_tls12(pin_dir, pki, tmp_path, min_version, accepted):
    path = write_config(tmp_path / "web.yml", {"tls_server_config": tls_config(pki, min_version=min_version)})
    server = Exporter(pin_dir, "--web.config.file", path)
    try:
        old = client_context(pki, version=ssl.TLSVersion.TLSv1_1)
        if accepted:   # the control: the refusal below is the config's doing, not the library's
            assert https_get(server.metrics_port, old)[0] == 200
        else:
            with pytest.raises(ssl.SSLError):
                https_get(server.metrics_port, old)
        assert https_get(server.metrics_port, client_context(pki, version=ssl.TLSVersion.TLSv1_2))[0] == 200
        assert https_get(server.metrics_port, client_context(pki, version=ssl.TLSVersion.TLSv1_3))[0] == 200
    finally:
        server.stop()


@pytest.fixture(scope="module")
def mtls_exporter(pin_dir, pki, tmp_path_factory):
    path = write_config(tmp_path_factory.mktemp("mtls") / "web.yml", {"tls_server_config": tls_config(
        pki, client_auth_type="RequireAndVerifyClientCert", client_ca_file=pki.path("ca.pem"))})
    server = Exporter(pin_dir, "--web.config.file", path)
    yield server
    server.stop()


@pytest.mark.parametrize("cert", [None, "rogue"], ids=["no client certificate", "another CA's certificate"])
def test_require_and_verify_client_cert_refuses(mtls_exporter, pki, cert):
    with pytest.raises((ssl.SSLError, ConnectionResetError, BrokenPipeError, http.client.RemoteDisconnected)):
        https_get(mtls_exporter.metrics_port, client_context(pki, cert=cert))


def test_require_and_verify_client_cert_serves_a_ca_signed_certificate(mtls_exporter, pki):
    status, _, body = https_get(mtls_exporter.metrics_port, client_context(pki, cert="client"))
    assert status == 200 and b"tcp_connects_by_pid" in body


# --- rotation and reloads --------------------------------------------------------------------

def wait_until(predicate, timeout=15, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    pytest.fail(f"{what} within {timeout}s")


def test_a_rotated_certificate_is_served_without_a_restart(pin_dir, pki, tmp_path):
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    first = pki.ca.issue("first")
    cert.write_bytes(first[0])
    key.write_bytes(first[1])
    path = write_config(tmp_path / "web.yml", {"tls_server_config": {"cert_file": "tls.crt", "key_file": "tls.key"}})
    server = Exporter(pin_dir, "--web.config.file", path)
    try:
        context = client_context(pki)
        worker = server.worker_pids()
        before = served_certificate(server.metrics_port, context)
        second = pki.ca.issue("second")
        for target, data in ((cert, second[0]), (key, second[1])):   # as a Secret update does: rename over
            staged = target.with_suffix(".new")
            staged.write_bytes(data)
            os.replace(staged, target)
        wanted = ssl.PEM_cert_to_DER_cert(second[0].decode())
        assert before != wanted
        wait_until(lambda: served_certificate(server.metrics_port, context) == wanted, what="the new certificate")
        assert https_get(server.metrics_port, context)[0] == 200
        assert server.worker_pids() == worker    # re-read, not restarted
    finally:
        server.stop()


def _rewrite_in_place(path, text):
    """New content, same inode, size and mtime: only SIGHUP can tell."""
    st = os.stat(path)
    with open(path, "r+") as f:
        f.write(text)
        f.truncate()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(path).st_size == st.st_size


def test_sighup_rereads_the_web_config(pin_dir, pki, tmp_path):
    config = {"tls_server_config": tls_config(pki), "basic_auth_users": {USER: hashed("old password 1")}}
    path = write_config(tmp_path / "web.yml", config)
    server = Exporter(pin_dir, "--web.config.file", path)
    try:
        context = client_context(pki)
        assert https_get(server.metrics_port, context, headers=auth(password="old password 1"))[0] == 200
        config["basic_auth_users"][USER] = hashed("new password 2")
        _rewrite_in_place(path, yaml.safe_dump(config))
        time.sleep(2.5)   # two polls of the files: nothing changed that they can see
        assert https_get(server.metrics_port, context, headers=auth(password="old password 1"))[0] == 200
        worker = server.worker_pids()
        server.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: https_get(server.metrics_port, context, headers=auth(password="new password 2"))[0] == 200,
                   what="the new password after SIGHUP")
        assert https_get(server.metrics_port, context, headers=auth(password="old password 1"))[0] == 401
        assert server.worker_pids() == worker
    finally:
        server.stop()


def test_an_invalid_new_config_keeps_the_previous_one(pin_dir, pki, tmp_path):
    path = write_config(tmp_path / "web.yml", {"tls_server_config": tls_config(pki),
                                               "basic_auth_users": {USER: hashed(PASSWORD)}})
    server = Exporter(pin_dir, "--web.config.file", path)
    try:
        with open(path, "a") as f:
            f.write("tls_server_config_typo: {}\n")
        time.sleep(2.5)
        assert https_get(server.metrics_port, client_context(pki), headers=auth())[0] == 200
    finally:
        server.stop()
    log = server.proc.stdout.read()
    assert "kept the previous web config" in log and "tls_server_config_typo" in log, log


# --- bounded time ----------------------------------------------------------------------------

@pytest.mark.parametrize("opening", [b"", b"\x16\x03\x01\x00"], ids=["silent", "half a ClientHello"])
def test_a_slow_tls_handshake_is_closed_after_the_read_timeout(pin_dir, pki, tmp_path, opening):
    path = write_config(tmp_path / "web.yml", {"tls_server_config": tls_config(pki)})
    server = Exporter(pin_dir, "--web.config.file", path, "--read-timeout", "1")
    try:
        with socket.create_connection(("127.0.0.1", server.metrics_port), timeout=10) as sock:
            sock.sendall(opening)
            started = time.monotonic()
            try:
                assert sock.recv(100) == b""
            except ConnectionResetError:
                pass
            assert 0.5 <= time.monotonic() - started < 10
    finally:
        server.stop()


def test_wrong_passwords_do_not_hold_up_health_or_cached_scrapes(pin_dir, pki, tmp_path):
    """bcrypt at cost 12 takes a good fraction of a second: a flood of wrong passwords queues for the
    one bcrypt thread, while health and a scrape whose credentials were verified before go on."""
    path = write_config(tmp_path / "web.yml", {"tls_server_config": tls_config(pki),
                                               "basic_auth_users": {USER: hashed(PASSWORD, rounds=12)}})
    server = Exporter(pin_dir, "--web.config.file", path)
    context = client_context(pki)
    try:
        assert https_get(server.metrics_port, context, headers=auth())[0] == 200   # verified once: cached
        with ThreadPoolExecutor(12) as pool:
            flood = [pool.submit(https_get, server.metrics_port, context, "/metrics",
                                 auth(password=f"guess {i}"), 120) for i in range(12)]
            time.sleep(0.5)
            for _ in range(3):
                started = time.monotonic()
                assert http_get(server.health + "/health", timeout=5)[0] == 200
                assert https_get(server.metrics_port, context, headers=auth(), timeout=5)[0] == 200
                assert time.monotonic() - started < 4
            assert sum(1 for f in flood if not f.done()) > 0, "the flood was over before it could get in the way"
            assert {f.result()[0] for f in flood} == {401}
    finally:
        server.stop()


# --- the health port with TLS, and bad files -------------------------------------------------

def test_health_tls_serves_health_over_the_same_tls(pin_dir, pki, tmp_path):
    path = write_config(tmp_path / "web.yml", {"tls_server_config": tls_config(pki),
                                               "basic_auth_users": {USER: hashed(PASSWORD)}})
    server = Exporter(pin_dir, "--web.config.file", path, env={"TCPMON_HEALTH_TLS": "1"})
    try:
        status, _, body = https_get(server.health_port, client_context(pki), path="/readiness")
        assert (status, body) == (200, b"ready\n")         # no basic auth on health
        with socket.create_connection(("127.0.0.1", server.health_port), timeout=10) as sock:
            sock.sendall(b"GET /liveness HTTP/1.1\r\nHost: t\r\n\r\n")
            assert sock.recv(100).startswith(b"HTTP/1.0 400")
    finally:
        server.stop()


BAD_CONFIGS = [
    ("tls_config: {}\n", ["tls_config", "unknown key"]),
    ("tls_server_config: {cert_file: a, key_file: b, min_versio: TLS12}\n", ["tls_server_config.min_versio"]),
    ("tls_server_config: {cert_file: a, key_file: b, min_version: TLS14}\n", ["tls_server_config.min_version", "TLS14"]),
    ("tls_server_config: {cert_file: a, key_file: b, cipher_suites: [TLS_BOGUS]}\n", ["cipher_suites", "TLS_BOGUS"]),
    ("tls_server_config: {cert_file: a, key_file: b, client_auth_type: Sometimes}\n", ["client_auth_type", "Sometimes"]),
    ("tls_server_config: {cert_file: a}\n", ["tls_server_config", "key_file"]),
    ("tls_server_config: {cert_file: /nonexistent.crt, key_file: /nonexistent.key}\n", ["cert_file", "/nonexistent.crt"]),
    ("basic_auth_users: {alice: plaintext}\n", ["basic_auth_users.alice", "bcrypt"]),
    ("http_server_config: {headers: {X-Powered-By: tcpmon}}\n", ["headers.X-Powered-By"]),
    ("http_server_config: {headers: {X-Frame-Options: allow}}\n", ["headers.X-Frame-Options", "allow"]),
    ("rate_limit: {burst: 1, interval: soon}\n", ["rate_limit.interval", "soon"]),
    ("basic_auth_users: {a: x}\nbasic_auth_users: {b: y}\n", ["duplicate key", "basic_auth_users"]),
    ("tls_server_config: [\n", ["not valid YAML"]),
]


@pytest.mark.parametrize("text, words", BAD_CONFIGS, ids=[words[0] for _, words in BAD_CONFIGS])
def test_a_bad_web_config_is_refused_at_start_in_one_line(fresh_pin_dir, tmp_path, text, words):
    path = tmp_path / "web.yml"
    path.write_text(text)
    for how in ("flag", "env"):
        args = ["serve", "--pin-dir", fresh_pin_dir] + (["--web.config.file", str(path)] if how == "flag" else [])
        env = {k: v for k, v in os.environ.items() if not k.startswith("TCPMON_")}
        if how == "env":
            env["TCPMON_WEB_CONFIG_FILE"] = str(path)
        result = subprocess.run([*TCPMON, *args], capture_output=True, text=True, timeout=60, cwd=ROOT, env=env)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert result.stderr.count("\n") == 1 and result.stderr.startswith("tcpmon serve: error: "), result.stderr
        assert str(path) in result.stderr
        for word in words:
            assert word in result.stderr, (word, result.stderr)


def test_a_missing_web_config_file_is_refused_in_one_line(fresh_pin_dir, tmp_path):
    result = subprocess.run([*TCPMON, "serve", "--pin-dir", fresh_pin_dir, "--web.config.file",
                             str(tmp_path / "absent.yml")], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "absent.yml" in result.stderr and "No such file" in result.stderr


def test_node_exporters_example_config_is_accepted(pin_dir, pki, tmp_path):
    """exporter-toolkit's documented example, keys and all, with this test's files."""
    text = f"""
tls_server_config:
  cert_file: {pki.path('server.crt')}
  key_file: {pki.path('server.key')}
  client_auth_type: "VerifyClientCertIfGiven"
  client_ca_file: {pki.path('ca.pem')}
  min_version: "TLS12"
  max_version: "TLS13"
  cipher_suites: [TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256, TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384]
  prefer_server_cipher_suites: true
  curve_preferences: [X25519, CurveP256]
http_server_config:
  http2: true
  headers:
    Strict-Transport-Security: max-age=31536000
basic_auth_users:
  {USER}: {hashed(PASSWORD)}
"""
    path = tmp_path / "web.yml"
    path.write_text(text)
    server = Exporter(pin_dir, "--web.config.file", str(path))
    try:
        context = client_context(pki, version=ssl.TLSVersion.TLSv1_2)
        status, headers, _ = https_get(server.metrics_port, context, headers=auth())
        assert status == 200 and headers["strict-transport-security"] == "max-age=31536000"
        status, _, _ = https_get(server.metrics_port, client_context(pki, cert="client"), headers=auth())
        assert status == 200
    finally:
        server.stop()


# --- the file format, without a server ---------------------------------------------------------

def test_inline_certificates_and_relative_paths_load(pki, tmp_path):
    from tcpmon import web
    cert, key = pki.ca.issue("inline")
    path = tmp_path / "web.yml"
    path.write_text(yaml.safe_dump({"tls_server_config": {
        "cert": cert.decode(), "key": key.decode(), "client_ca": pki.ca.pem.decode(),
        "client_auth_type": "VerifyClientCertIfGiven"}}))
    config = web.load(str(path))
    assert config.tls.enabled and web.tls_context(config).verify_mode == ssl.CERT_OPTIONAL
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.crt").write_bytes(cert)
    (tmp_path / "sub" / "a.key").write_bytes(key)
    path.write_text(yaml.safe_dump({"tls_server_config": {"cert_file": "sub/a.crt", "key_file": "sub/a.key"}}))
    assert web.load(str(path)).tls.cert_file == str(tmp_path / "sub" / "a.crt")


def test_an_empty_file_is_plain_http_without_users(tmp_path):
    from tcpmon import web
    path = tmp_path / "web.yml"
    path.write_text("")
    config = web.load(str(path))
    assert not config.tls.enabled and config.users == {} and config.headers == {}


@pytest.mark.parametrize("header, parsed", [
    (None, None), ("", None), ("Bearer x", None), ("Basic", None),
    ("Basic " + b64encode(b"u:p").decode(), ("u", b"p")), ("basic " + b64encode(b"u:p:q").decode(), ("u", b"p:q")),
    ("BASIC " + b64encode(b":").decode(), ("", b"")), ("Basic " + b64encode(b"nocolon").decode(), None),
    ("Basic !!!", None), ("Basic " + b64encode("ü:ß".encode()).decode(), ("ü", "ß".encode()))])
def test_basic_auth_header_is_read_as_go_reads_it(header, parsed):
    from tcpmon import web
    assert web.parse_basic(header) == parsed


@pytest.mark.parametrize("text, seconds", [("1s", 1), ("100ms", 0.1), ("1m30s", 90), ("2h", 7200), ("1.5s", 1.5),
                                           ("", None), ("1", None), ("s", None), ("-1s", None), ("1d", None)])
def test_durations_as_go_writes_them(text, seconds):
    from tcpmon import web
    assert web.parse_duration(text) == (pytest.approx(seconds) if seconds is not None else None)
