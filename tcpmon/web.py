"""The web config file of exporter-toolkit (node_exporter, Prometheus): TLS, basic auth, headers.

`load(path)` reads and checks the YAML as exporter-toolkit does (unknown keys and bad values are
errors, relative paths are relative to the file), and builds the TLS context once to prove the
certificates load.  `WebState` is a worker's live copy: it re-reads the file when it or a file it
names changes (or on SIGHUP), so certificates rotate without a restart, and keeps the previous
config when the new one is invalid.  bcrypt runs through `run_bcrypt` (one native thread, as
exporter-toolkit runs one bcrypt at a time), and verified credentials are cached the same way:
up to 100 (user, hash, password) outcomes, here under a SHA-256 key instead of the plaintext.
"""
import base64
import binascii
import hashlib
import ipaddress
import logging
import os
import random
import re
import ssl
import stat
import time
from dataclasses import dataclass, field

import yaml

from tcpmon.errors import TcpmonError

log = logging.getLogger("tcpmon.web")

MAX_FILE_BYTES = 1 << 20
CACHE_SIZE = 100
# exporter-toolkit's bcrypt of "fakepassword": unknown users cost as much as known ones.
_FAKE_HASH = b"$2y$10$QOauhQNbBCuQDKes6eFzPeMqBSjb7Mr5DUmpZ/VcEd00UAV/LDeSi"
_BCRYPT = re.compile(r"^\$2[abxy]?\$(0[4-9]|[12][0-9]|3[01])\$[./A-Za-z0-9]{53}$")
_BCRYPT_MAX_PASSWORD = 72   # bcrypt uses no more of a password

_TLS_VERSIONS = {"TLS10": ssl.TLSVersion.TLSv1, "TLS11": ssl.TLSVersion.TLSv1_1,
                 "TLS12": ssl.TLSVersion.TLSv1_2, "TLS13": ssl.TLSVersion.TLSv1_3}
# Go's crypto/tls names -> OpenSSL's; the TLS 1.3 suites are not configurable (in Go neither).
_CIPHERS = {
    "TLS_RSA_WITH_AES_128_CBC_SHA": "AES128-SHA", "TLS_RSA_WITH_AES_256_CBC_SHA": "AES256-SHA",
    "TLS_RSA_WITH_AES_128_GCM_SHA256": "AES128-GCM-SHA256", "TLS_RSA_WITH_AES_256_GCM_SHA384": "AES256-GCM-SHA384",
    "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA": "ECDHE-ECDSA-AES128-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA": "ECDHE-ECDSA-AES256-SHA",
    "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA": "ECDHE-RSA-AES128-SHA",
    "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA": "ECDHE-RSA-AES256-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256": "ECDHE-ECDSA-AES128-GCM-SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384": "ECDHE-ECDSA-AES256-GCM-SHA384",
    "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256": "ECDHE-RSA-AES128-GCM-SHA256",
    "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384": "ECDHE-RSA-AES256-GCM-SHA384",
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-RSA-CHACHA20-POLY1305",
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-ECDSA-CHACHA20-POLY1305",
    "TLS_AES_128_GCM_SHA256": None, "TLS_AES_256_GCM_SHA384": None, "TLS_CHACHA20_POLY1305_SHA256": None,
}
_CURVES = {"CurveP256": "prime256v1", "CurveP384": "secp384r1", "CurveP521": "secp521r1", "X25519": "X25519"}
_CLIENT_AUTH = {"": ssl.CERT_NONE, "NoClientCert": ssl.CERT_NONE, "RequestClientCert": ssl.CERT_OPTIONAL,
                "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL, "RequireAnyClientCert": ssl.CERT_REQUIRED,
                "RequireClientCert": ssl.CERT_REQUIRED, "RequireAndVerifyClientCert": ssl.CERT_REQUIRED}
_UNVERIFIED_AUTH = ("RequestClientCert", "RequireAnyClientCert", "RequireClientCert")
# exporter-toolkit's list: the only headers a web config may set, and their allowed values.
_HEADERS = {"Strict-Transport-Security": None, "X-Content-Type-Options": ("nosniff",),
            "X-Frame-Options": ("deny", "sameorigin"), "X-XSS-Protection": None, "Content-Security-Policy": None}
_DURATION = re.compile(r"^(?:(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h))+$")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


class WebConfigError(TcpmonError, ValueError):
    """The web config file is unreadable or invalid; the message names the key."""


@dataclass(frozen=True)
class TlsSettings:
    cert_file: str = None
    key_file: str = None
    cert: str = None
    key: str = None
    client_ca_file: str = None
    client_ca: str = None
    client_auth_type: str = ""
    cipher_suites: tuple = ()
    curve_preferences: tuple = ()
    min_version: str = "TLS12"
    max_version: str = "TLS13"
    prefer_server_cipher_suites: bool = True
    client_allowed_sans: tuple = None

    @property
    def enabled(self):
        return any((self.cert_file, self.key_file, self.cert, self.key, self.client_ca_file, self.client_ca,
                    self.client_auth_type))

    def files(self):
        return [path for path in (self.cert_file, self.key_file, self.client_ca_file) if path]


@dataclass(frozen=True)
class WebConfig:
    path: str
    tls: TlsSettings = field(default_factory=TlsSettings)
    users: dict = field(default_factory=dict)       # user -> bcrypt hash (bytes)
    headers: dict = field(default_factory=dict)
    http2: bool = True                               # accepted; tcpmon serves HTTP/1.1
    rate_burst: int = 0
    rate_interval: float = 0.0                       # seconds; 0: no rate limit

    def files(self):
        return [self.path] + self.tls.files()


# --- reading and checking the file ---------------------------------------------------------------

class _StrictLoader(yaml.SafeLoader):
    """YAML with duplicate keys refused, as Go's yaml.UnmarshalStrict does."""


def _mapping(loader, node):
    loader.flatten_mapping(node)
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key '{key}'", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


def _read(path):
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise WebConfigError(f"web config {path}: not a regular file")
        if st.st_size > MAX_FILE_BYTES:
            raise WebConfigError(f"web config {path}: larger than {MAX_FILE_BYTES} bytes")
        with open(path, "rb") as f:
            return f.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise WebConfigError(f"web config {path}: {exc.strerror or exc}") from None


class _Checker:
    """Pulls typed values out of a parsed section, naming `section.key` in every error."""

    def __init__(self, path, section, data, keys):
        self.path, self.section = path, section
        if data is None:
            data = {}
        if not isinstance(data, dict):
            self.fail(None, f"must be a mapping, not {type(data).__name__}")
        self.data = data
        for key in data:
            if key not in keys:
                self.fail(key, f"unknown key (known: {', '.join(keys)})")

    def name(self, key):
        return ".".join(part for part in (self.section, str(key) if key is not None else None) if part)

    def fail(self, key, why):
        raise WebConfigError(f"web config {self.path}: {self.name(key) or 'top level'}: {why}")

    def string(self, key, default=None):
        value = self.data.get(key)
        if value is None:
            return default
        if not isinstance(value, str):
            self.fail(key, f"must be a string, not {type(value).__name__}")
        return value

    def boolean(self, key, default):
        value = self.data.get(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            self.fail(key, "must be true or false")
        return value

    def strings(self, key):
        value = self.data.get(key)
        if value is None:
            return None
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            self.fail(key, "must be a list of strings")
        return tuple(value)

    def choice(self, key, choices, default):
        value = self.string(key, default)
        if value not in choices:
            self.fail(key, f"'{value}' is not one of {', '.join(c for c in choices if c)}")
        return value

    def path_in(self, key, base):
        value = self.string(key)
        return os.path.join(base, value) if value else None


def _tls(path, data):
    keys = ("cert", "key", "client_ca", "cert_file", "key_file", "client_auth_type", "client_ca_file",
            "cipher_suites", "curve_preferences", "min_version", "max_version", "prefer_server_cipher_suites",
            "client_allowed_sans")
    check = _Checker(path, "tls_server_config", data, keys)
    base = os.path.dirname(os.path.abspath(path))
    ciphers = check.strings("cipher_suites") or ()
    for name in ciphers:
        if name not in _CIPHERS:
            check.fail("cipher_suites", f"unknown cipher '{name}'")
    curves = check.strings("curve_preferences") or ()
    for name in curves:
        if name not in _CURVES:
            check.fail("curve_preferences", f"unknown curve '{name}' (known: {', '.join(_CURVES)})")
    settings = TlsSettings(
        cert_file=check.path_in("cert_file", base), key_file=check.path_in("key_file", base),
        cert=check.string("cert"), key=check.string("key"),
        client_ca_file=check.path_in("client_ca_file", base), client_ca=check.string("client_ca"),
        client_auth_type=check.choice("client_auth_type", tuple(_CLIENT_AUTH), ""),
        cipher_suites=ciphers, curve_preferences=curves,
        min_version=check.choice("min_version", tuple(_TLS_VERSIONS), "TLS12"),
        max_version=check.choice("max_version", tuple(_TLS_VERSIONS), "TLS13"),
        prefer_server_cipher_suites=check.boolean("prefer_server_cipher_suites", True),
        client_allowed_sans=check.strings("client_allowed_sans"))
    if not settings.enabled:
        return settings
    if not (settings.cert_file or settings.cert):
        check.fail(None, "missing one of cert or cert_file")
    if not (settings.key_file or settings.key):
        check.fail(None, "missing one of key or key_file")
    has_ca = settings.client_ca_file or settings.client_ca
    if has_ca and _CLIENT_AUTH[settings.client_auth_type] == ssl.CERT_NONE:
        check.fail("client_ca_file", "client CAs are configured without a client_auth_type")
    if settings.client_auth_type in _UNVERIFIED_AUTH and not has_ca:
        check.fail("client_auth_type", f"{settings.client_auth_type}: tcpmon verifies every client certificate, "
                                       "so it needs client_ca_file (or client_ca)")
    if _TLS_VERSIONS[settings.min_version] > _TLS_VERSIONS[settings.max_version]:
        check.fail("min_version", f"{settings.min_version} is above max_version {settings.max_version}")
    return settings


def _users(path, data):
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise WebConfigError(f"web config {path}: basic_auth_users: must be a mapping of user: bcrypt hash")
    users = {}
    for user, hashed in data.items():
        if not isinstance(user, str) or not isinstance(hashed, str) or not _BCRYPT.match(hashed):
            raise WebConfigError(f"web config {path}: basic_auth_users.{user}: not a bcrypt hash "
                                 "(make one with: htpasswd -nBC 10 '' | tr -d ':')")
        users[user] = hashed.encode()
    return users


def _http(path, data):
    check = _Checker(path, "http_server_config", data, ("http2", "headers"))
    headers = check.data.get("headers") or {}
    if not isinstance(headers, dict):
        check.fail("headers", "must be a mapping of header: value")
    for name, value in headers.items():
        if name not in _HEADERS:
            check.fail(f"headers.{name}", f"this header can not be configured (allowed: {', '.join(_HEADERS)})")
        allowed = _HEADERS[name]
        if not isinstance(value, str) or (allowed and value not in allowed):
            check.fail(f"headers.{name}", f"'{value}' is not one of {', '.join(allowed or ('a string',))}")
    return check.boolean("http2", True), dict(headers)


def parse_duration(text):
    """Go's time.ParseDuration for the units a web config uses: '1s', '100ms', '1m30s'."""
    if not isinstance(text, str) or not _DURATION.match(text):
        return None
    return sum(float(number) * _UNITS[unit] for number, unit in _DURATION_PART.findall(text))


def _rate_limit(path, data):
    check = _Checker(path, "rate_limit", data, ("burst", "interval"))
    burst = check.data.get("burst", 0) or 0
    if not isinstance(burst, int) or isinstance(burst, bool) or burst < 0:
        check.fail("burst", "must be a whole number >= 0")
    interval = check.data.get("interval")
    seconds = 0.0 if interval in (None, 0, "0") else parse_duration(interval)
    if seconds is None:
        check.fail("interval", f"'{interval}' is not a duration like 1s or 100ms")
    return burst, seconds


def load(path):
    """The WebConfig in `path`, checked (TLS context built once): WebConfigError otherwise."""
    raw = _read(path)
    try:
        data = yaml.load(raw, Loader=_StrictLoader)
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" (line {where.line + 1})" if where else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise WebConfigError(f"web config {path}: not valid YAML{at}: {problem}") from None
    top = _Checker(path, "", data, ("tls_server_config", "http_server_config", "basic_auth_users", "rate_limit"))
    tls = _tls(path, top.data.get("tls_server_config"))
    http2, headers = _http(path, top.data.get("http_server_config"))
    burst, interval = _rate_limit(path, top.data.get("rate_limit"))
    config = WebConfig(path=path, tls=tls, users=_users(path, top.data.get("basic_auth_users")), headers=headers,
                       http2=http2, rate_burst=burst, rate_interval=interval)
    if tls.enabled:
        tls_context(config)
    return config


# --- TLS -----------------------------------------------------------------------------------------

def _pem_path(text, what):
    """A path the ssl module can read an inline PEM from (an in-memory file, never on disk)."""
    fd = os.memfd_create(f"tcpmon-{what}", os.MFD_CLOEXEC)
    os.write(fd, text.encode())
    return fd, f"/proc/self/fd/{fd}"


def tls_context(config):
    """An ssl.SSLContext (gevent's, in a patched worker) for the config's tls_server_config."""
    tls, where = config.tls, f"web config {config.path}: tls_server_config"
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = _TLS_VERSIONS[tls.min_version]
    context.maximum_version = _TLS_VERSIONS[tls.max_version]
    openssl_ciphers = [_CIPHERS[name] for name in tls.cipher_suites if _CIPHERS[name]]
    # Older protocols (and ciphers) must be allowed by OpenSSL's security level when asked for.
    level = ":@SECLEVEL=0" if context.minimum_version < ssl.TLSVersion.TLSv1_2 else ""
    try:
        if openssl_ciphers or level:
            context.set_ciphers((":".join(openssl_ciphers) or "DEFAULT") + level)
    except ssl.SSLError as exc:
        raise WebConfigError(f"{where}.cipher_suites: {exc.reason or exc}") from None
    if tls.curve_preferences:
        try:   # Python's ssl sets one curve; OpenSSL builds differ on which (X25519 often not)
            context.set_ecdh_curve(_CURVES[tls.curve_preferences[0]])
        except (ssl.SSLError, ValueError):
            pass   # OpenSSL's default groups, which include every curve a web config can name
    if tls.prefer_server_cipher_suites:
        context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    context.set_alpn_protocols(["http/1.1"])
    fds = []
    try:
        cert, key = tls.cert_file, tls.key_file
        if not cert:
            fd, cert = _pem_path(tls.cert, "cert")
            fds.append(fd)
        if not key:
            fd, key = _pem_path(tls.key, "key")
            fds.append(fd)
        try:
            context.load_cert_chain(cert, key)
        except (OSError, ssl.SSLError) as exc:
            files = " and ".join(f for f in (tls.cert_file, tls.key_file) if f) or "inline"
            raise WebConfigError(f"{where}.cert_file and key_file: cannot load them ({files}): "
                                 f"{getattr(exc, 'reason', None) or exc.strerror or exc}") from None
    finally:
        for fd in fds:
            os.close(fd)
    context.verify_mode = _CLIENT_AUTH[tls.client_auth_type]
    if tls.client_ca_file or tls.client_ca:
        try:
            context.load_verify_locations(cafile=tls.client_ca_file, cadata=tls.client_ca)
        except (OSError, ssl.SSLError) as exc:
            raise WebConfigError(f"{where}.client_ca_file: {getattr(exc, 'reason', None) or exc.strerror or exc}") \
                from None
    return context


def _sans(cert):
    values = []
    for kind, value in (cert or {}).get("subjectAltName", ()):
        if kind == "IP Address":
            value = str(ipaddress.ip_address(value.strip()))
        values.append(value)
    return values


# --- basic auth ----------------------------------------------------------------------------------

def parse_basic(header):
    """(user, password bytes) from an Authorization header, as Go's Request.BasicAuth reads it."""
    if not header or len(header) < 6 or header[:6].lower() != "basic ":
        return None
    try:
        decoded = base64.b64decode(header[6:].encode("latin-1"), validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        return None
    user, sep, password = decoded.partition(b":")
    if not sep:
        return None
    try:
        return user.decode(), password
    except UnicodeDecodeError:
        return None


def _checkpw(password, hashed):
    import bcrypt
    try:
        return bcrypt.checkpw(password[:_BCRYPT_MAX_PASSWORD], hashed)
    except ValueError:
        return False


def _signature(path):
    try:
        st = os.stat(path)
        return st.st_ino, st.st_mtime_ns, st.st_size
    except OSError:
        return None


class WebState:
    """A worker's current web config, its TLS context, the credential cache and the rate limit."""

    def __init__(self, path, run_bcrypt=lambda fn, args: fn(*args)):
        self.path = path
        self._run_bcrypt = run_bcrypt
        self.config = load(path)
        self.tls_enabled = self.config.tls.enabled
        self.context = tls_context(self.config) if self.tls_enabled else None
        self._signatures = self._sign(self.config)
        self._cache = {}
        self._tokens, self._filled = float(self.config.rate_burst), time.monotonic()

    @staticmethod
    def _sign(config):
        return {path: _signature(path) for path in config.files()}

    def changed(self):
        current = {path: _signature(path) for path in self._signatures}
        return current != self._signatures

    def reload(self, why):
        """Take the file as it is now; an invalid one is logged and the previous config kept."""
        try:
            config = load(self.path)
            if config.tls.enabled != self.tls_enabled:
                raise WebConfigError(f"web config {self.path}: turning TLS {'on' if config.tls.enabled else 'off'} "
                                     "takes a restart")
            context = tls_context(config) if self.tls_enabled else None
        except WebConfigError as exc:
            self._signatures = {path: _signature(path) for path in self._signatures}
            log.error("kept the previous web config (%s): %s", why, exc)
            return False
        self.config, self.context = config, context
        self._signatures = self._sign(config)
        self._cache.clear()
        log.info("re-read web config %s (%s)", self.path, why)
        return True

    def handshake(self, sock):
        """The server side of a TLS handshake on `sock`; raises on a refused client."""
        tls_sock = self.context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        try:
            tls_sock.do_handshake()
            allowed = self.config.tls.client_allowed_sans
            if allowed is not None and not set(_sans(tls_sock.getpeercert())) & set(allowed):
                raise PermissionError("the client certificate has none of client_allowed_sans")
        except BaseException:
            tls_sock.close()
            raise
        return tls_sock

    def allow_request(self):
        """exporter-toolkit's rate_limit: a token bucket of `burst`, one token per `interval`."""
        config = self.config
        if not config.rate_interval:
            return True
        now = time.monotonic()
        self._tokens = min(float(config.rate_burst), self._tokens + (now - self._filled) / config.rate_interval)
        self._filled = now
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        return False

    def authorized(self, header):
        users = self.config.users
        credentials = parse_basic(header)
        if credentials is None:
            return False
        user, password = credentials
        hashed = users.get(user)
        known = hashed is not None
        hashed = hashed if known else _FAKE_HASH
        key = hashlib.sha256(b"\0".join((user.encode(), hashed, password))).digest()
        verdict = self._cache.get(key)
        if verdict is None:
            matches = self._run_bcrypt(_checkpw, (password, hashed))   # unknown users too: same cost
            verdict = known and matches
            self._remember(key, verdict)
        return verdict and known

    def _remember(self, key, verdict):
        if len(self._cache) >= CACHE_SIZE:
            for old in random.sample(list(self._cache), max(len(self._cache) // 10, 1)):
                del self._cache[old]
        self._cache[key] = verdict
