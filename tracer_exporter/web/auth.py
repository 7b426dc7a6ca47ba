"""--web.config.file: TLS and basic auth, in the Prometheus exporter-toolkit format.

    tls_server_config:
      cert_file: server.crt          # paths are relative to this file
      key_file: server.key
      client_ca_file: ca.crt         # optional: client certificates
      client_auth_type: RequireAndVerifyClientCert
      min_version: TLS12             # optional: TLS12 (default) or TLS13
      max_version: TLS13
    basic_auth_users:
      alice: $2b$12$...              # bcrypt hashes (htpasswd -nBC 10 "" | tr -d ':\\n')

The same file works for node_exporter and every exporter-toolkit program, within
the keys above. Parsed and checked here; the socket side is in server.py.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import ssl
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# The WSGI environ key that names the user a request authenticated as.
AUTH_USER = "tracer_exporter.auth_user"

_TLS_KEYS = {"cert_file", "key_file", "client_ca_file", "client_auth_type", "min_version", "max_version"}
_TOP_KEYS = {"tls_server_config", "basic_auth_users", "http_server_config"}
_HTTP_KEYS = {"headers"}

_VERSIONS = {"TLS12": ssl.TLSVersion.TLSv1_2, "TLS13": ssl.TLSVersion.TLSv1_3}
# client_auth_type -> ssl verify mode. Python's ssl cannot ask for a certificate
# without verifying it, so RequestClientCert and RequireAnyClientCert are refused.
_CLIENT_AUTH = {
    "NoClientCert": ssl.CERT_NONE,
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
}
_UNSUPPORTED_CLIENT_AUTH = {"RequestClientCert", "RequireAnyClientCert"}

# The exporter-toolkit's allowlist of http_server_config.headers, with the values it
# allows where it restricts them (compared case-insensitively).
ALLOWED_HEADERS: dict[str, tuple[str, ...]] = {
    "Strict-Transport-Security": (),
    "X-Content-Type-Options": ("nosniff",),
    "X-Frame-Options": ("deny", "sameorigin"),
    "X-XSS-Protection": (),
    "Content-Security-Policy": (),
}
# Credentials checked are remembered, good and bad, up to this many.
AUTH_CACHE_ENTRIES = 1024
# Past this many refusals within a second, further ones are answered one at a time,
# each after a pause: however many clients hammer wrong credentials, the exporter
# then answers at most 1/FAILURE_PAUSE_SECONDS of them a second, and they wait.
FAILURES_PER_SECOND = 10
FAILURE_PAUSE_SECONDS = 0.1

# Compared against when the user does not exist, so timing does not tell users apart.
_DUMMY_HASH = b"$2b$10$rDMnqDs1EbS1MWIgFbLisOn21w0Y9VYVTGSikzy6YhkwjhEOQoHwS"


class WebConfigError(Exception):
    """Every problem found, one per line, each naming the field."""


@dataclass(frozen=True)
class TLSConfig:
    cert_file: Path
    key_file: Path
    client_ca_file: Path | None = None
    client_auth_type: str = "NoClientCert"
    min_version: str = "TLS12"
    max_version: str = ""

    def context(self) -> ssl.SSLContext:
        """A server context; raises WebConfigError when a file cannot be used."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = _VERSIONS[self.min_version]
        if self.max_version:
            ctx.maximum_version = _VERSIONS[self.max_version]
        try:
            ctx.load_cert_chain(str(self.cert_file), str(self.key_file))
        except (OSError, ssl.SSLError) as e:
            raise WebConfigError(
                f"tls_server_config: cannot load cert_file {self.cert_file} / key_file {self.key_file}: {e}"
            ) from e
        ctx.verify_mode = _CLIENT_AUTH[self.client_auth_type]
        if self.client_ca_file is not None:
            try:
                ctx.load_verify_locations(cafile=str(self.client_ca_file))
            except (OSError, ssl.SSLError) as e:
                raise WebConfigError(f"tls_server_config.client_ca_file: cannot load {self.client_ca_file}: {e}") from e
        return ctx


@dataclass(frozen=True)
class WebConfig:
    tls: TLSConfig | None = None
    users: Mapping[str, bytes] = field(default_factory=dict)  # user -> bcrypt hash
    headers: Mapping[str, str] = field(default_factory=dict)

    def ssl_context(self) -> ssl.SSLContext | None:
        return self.tls.context() if self.tls is not None else None


def _str(where: str, value: Any, problems: list[str]) -> str | None:
    if not isinstance(value, str) or not value:
        problems.append(f"{where}: expected a non-empty string, got {value!r}")
        return None
    return value


def _unknown(where: str, doc: Mapping[str, Any], known: Iterable[str], problems: list[str]) -> None:
    known = set(known)
    for key in sorted(set(doc) - known, key=str):
        problems.append(f"{where}{key}: unknown or unsupported key (known: {', '.join(sorted(known))})")


def _tls(doc: Any, base: Path, problems: list[str]) -> TLSConfig | None:
    if doc is None:
        return None
    if not isinstance(doc, dict):
        problems.append(f"tls_server_config: expected a mapping, got {type(doc).__name__}")
        return None
    _unknown("tls_server_config.", doc, _TLS_KEYS, problems)

    def path(key: str, required: bool) -> Path | None:
        if doc.get(key) is None:
            if required:
                problems.append(f"tls_server_config.{key}: required")
            return None
        text = _str(f"tls_server_config.{key}", doc[key], problems)
        if text is None:
            return None
        p = base / text
        if not p.is_file():
            problems.append(f"tls_server_config.{key}: no such file: {p}")
        return p

    cert, key, ca = path("cert_file", True), path("key_file", True), path("client_ca_file", False)
    auth = doc.get("client_auth_type")
    if auth is None:
        # As the exporter-toolkit: a client CA alone means verified client certificates.
        auth = "RequireAndVerifyClientCert" if ca is not None else "NoClientCert"
    elif auth in _UNSUPPORTED_CLIENT_AUTH:
        problems.append(
            f"tls_server_config.client_auth_type: {auth} is not supported (Python's ssl cannot request "
            "a certificate without verifying it); use VerifyClientCertIfGiven or RequireAndVerifyClientCert"
        )
        auth = None
    elif auth not in _CLIENT_AUTH:
        problems.append(f"tls_server_config.client_auth_type: expected one of {', '.join(_CLIENT_AUTH)}, got {auth!r}")
        auth = None
    if auth in ("VerifyClientCertIfGiven", "RequireAndVerifyClientCert") and doc.get("client_ca_file") is None:
        problems.append(f"tls_server_config.client_auth_type: {auth} needs client_ca_file")
    versions = {}
    for name, default in (("min_version", "TLS12"), ("max_version", "")):
        value = doc.get(name, default)
        if value and value not in _VERSIONS:
            problems.append(f"tls_server_config.{name}: expected TLS12 or TLS13, got {value!r}")
            value = default
        versions[name] = value
    if versions["max_version"] and _VERSIONS[versions["max_version"]] < _VERSIONS[versions["min_version"]]:
        problems.append("tls_server_config: max_version is below min_version")
    if cert is None or key is None or auth is None:
        return None
    return TLSConfig(cert, key, ca, auth, versions["min_version"], versions["max_version"])


def _users(doc: Any, problems: list[str]) -> dict[str, bytes]:
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        problems.append(f"basic_auth_users: expected a mapping of user: bcrypt hash, got {type(doc).__name__}")
        return {}
    users = {}
    for user, hashed in doc.items():
        if not isinstance(user, str) or not user or ":" in user:
            problems.append(f"basic_auth_users: {user!r}: a user name is a non-empty string without ':'")
            continue
        if not isinstance(hashed, str) or not hashed.startswith(("$2a$", "$2b$", "$2y$")) or len(hashed) != 60:
            problems.append(f"basic_auth_users.{user}: expected a bcrypt hash ($2y$..., 60 characters)")
            continue
        users[user] = hashed.encode()
    if users:
        try:
            import bcrypt  # noqa: F401
        except ImportError:
            problems.append("basic_auth_users: needs the bcrypt module (Debian: python3-bcrypt; pip: bcrypt)")
    return users


def _headers(raw: Any, problems: list[str]) -> dict[str, str]:
    if not isinstance(raw, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in raw.items()):
        problems.append("http_server_config.headers: expected a mapping of header: value")
        return {}
    known = {name.lower(): name for name in ALLOWED_HEADERS}
    headers = {}
    for key, value in raw.items():
        name = known.get(key.lower())
        if name is None:
            problems.append(
                f"http_server_config.headers.{key}: this header cannot be configured "
                f"(allowed: {', '.join(ALLOWED_HEADERS)})"
            )
        elif ALLOWED_HEADERS[name] and value.lower() not in ALLOWED_HEADERS[name]:
            problems.append(
                f"http_server_config.headers.{key}: expected one of {', '.join(ALLOWED_HEADERS[name])}, got {value!r}"
            )
        elif not value or any(c in value for c in "\r\n\0"):
            problems.append(f"http_server_config.headers.{key}: expected a one-line, non-empty value")
        else:
            headers[name] = value
    return headers


def parse_web_config(doc: Any, base: Path) -> WebConfig:
    """Checks a parsed document; paths in it are relative to base."""
    if doc is None:
        return WebConfig()
    if not isinstance(doc, dict):
        raise WebConfigError(f"web config: expected a mapping, got {type(doc).__name__}")
    problems: list[str] = []
    _unknown("", doc, _TOP_KEYS, problems)
    tls = _tls(doc.get("tls_server_config"), base, problems)
    users = _users(doc.get("basic_auth_users"), problems)
    headers: dict[str, str] = {}
    http = doc.get("http_server_config")
    if http is not None:
        if not isinstance(http, dict):
            problems.append("http_server_config: expected a mapping")
        else:
            _unknown("http_server_config.", http, _HTTP_KEYS, problems)
            headers = _headers(http.get("headers") or {}, problems)
    if problems:
        raise WebConfigError("\n".join(problems))
    return WebConfig(tls, users, headers)


def load_web_config(path: str | None) -> WebConfig:
    """The web config at path (none: plain HTTP, no auth). Also builds the TLS context once, to check it."""
    if path is None:
        return WebConfig()
    try:
        with open(path, encoding="utf-8") as f:
            doc = yaml.safe_load(f)
    except OSError as e:
        raise WebConfigError(f"web config {path}: {e.strerror or e}") from e
    except yaml.YAMLError as e:
        raise WebConfigError(f"web config {path}: not valid YAML: {e}") from e
    except UnicodeDecodeError as e:
        raise WebConfigError(f"web config {path}: not UTF-8 text (byte {e.start})") from e
    try:
        config = parse_web_config(doc, Path(path).resolve().parent)
        config.ssl_context()
    except WebConfigError as e:
        # Name the file on every line, as the read errors above do.
        lines = (line.removeprefix("web config: ") for line in str(e).splitlines())
        raise WebConfigError("\n".join(f"web config {path}: {line}" for line in lines)) from e
    return config


class BasicAuth:
    """WSGI middleware: every route needs a user of basic_auth_users.

    Each check's answer, right or wrong, is remembered under a salted digest of the
    credentials (at most AUTH_CACHE_ENTRIES, the oldest forgotten first), so neither a
    scrape every few seconds nor a client repeating a wrong password pays bcrypt's
    deliberate slowness more than once. bcrypt itself runs one check at a time: clients
    trying many passwords get one core at most, and remembered ones are answered at once.
    """

    def __init__(self, app: Callable[..., Any], users: Mapping[str, bytes], realm: str = "tracer_exporter") -> None:
        self._app = app
        self._users = dict(users)
        self._realm = realm
        self._seen: OrderedDict[bytes, bool] = OrderedDict()
        self._lock = threading.Lock()  # guards _seen
        self._bcrypt = threading.Lock()  # one bcrypt check at a time
        self._salt = os.urandom(16)
        self.bcrypt_checks = 0
        self._failures: deque[float] = deque(maxlen=4 * FAILURES_PER_SECOND)
        self._penalty = threading.Lock()  # refusals past the rate wait here, one at a time
        self.failure_pause = FAILURE_PAUSE_SECONDS

    def _throttle(self) -> None:
        now = time.monotonic()
        with self._lock:
            self._failures.append(now)
            while self._failures[0] < now - 1.0:
                self._failures.popleft()
            hammered = len(self._failures) > FAILURES_PER_SECOND
        if hammered:
            with self._penalty:
                time.sleep(self.failure_pause)

    def _remembered(self, digest: bytes) -> bool | None:
        with self._lock:
            ok = self._seen.get(digest)
            if ok is not None:
                self._seen.move_to_end(digest)
            return ok

    def _remember(self, digest: bytes, ok: bool) -> None:
        with self._lock:
            self._seen[digest] = ok
            while len(self._seen) > AUTH_CACHE_ENTRIES:
                self._seen.popitem(last=False)

    def check(self, header: str) -> str | None:
        """The user a ``Basic ...`` Authorization header authenticates, or None."""
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "basic":
            return None
        try:
            user, sep, password = base64.b64decode(token.strip(), validate=True).decode("utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return None
        if not sep:
            return None
        digest = hmac.new(self._salt, f"{user}\0{password}".encode(), hashlib.sha256).digest()
        ok = self._remembered(digest)
        if ok is None:
            with self._bcrypt:
                # Another thread may have checked the same credentials while this one waited.
                ok = self._remembered(digest)
                if ok is None:
                    ok = self._bcrypt_check(user, password)
                    self._remember(digest, ok)
        return user if ok else None

    def _bcrypt_check(self, user: str, password: str) -> bool:
        import bcrypt

        self.bcrypt_checks += 1
        hashed = self._users.get(user)
        try:
            ok = bcrypt.checkpw(password.encode(), hashed if hashed is not None else _DUMMY_HASH)
        except ValueError:  # a malformed hash in the config
            ok = False
        return ok and hashed is not None

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        user = self.check(environ.get("HTTP_AUTHORIZATION", ""))
        if user is None:
            self._throttle()
            body = b"Unauthorized\n"
            start_response(
                "401 Unauthorized",
                [
                    ("Content-Type", "text/plain; charset=utf-8"),
                    ("Content-Length", str(len(body))),
                    ("WWW-Authenticate", f'Basic realm="{self._realm}", charset="UTF-8"'),
                ],
            )
            return [b"" if environ.get("REQUEST_METHOD") == "HEAD" else body]
        environ[AUTH_USER] = user
        return self._app(environ, start_response)


class ExtraHeaders:
    """WSGI middleware adding http_server_config.headers to every reply."""

    def __init__(self, app: Callable[..., Any], headers: Mapping[str, str]) -> None:
        self._app = app
        self._headers = list(headers.items())

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        def start(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            return start_response(status, list(headers) + self._headers, exc_info)

        return self._app(environ, start)


def wrap_app(app: Callable[..., Any], config: WebConfig) -> Callable[..., Any]:
    """app behind basic auth and with the extra headers, as the web config says."""
    if config.users:
        app = BasicAuth(app, config.users)
    if config.headers:
        app = ExtraHeaders(app, config.headers)
    return app
