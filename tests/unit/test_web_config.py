"""--web.config.file: parsing, basic auth, and TLS on a real loopback socket."""

import base64
import http.client
import io
import json
import socket
import ssl
from wsgiref.util import setup_testing_defaults

import bcrypt
import pytest
from certs import make_pki
from fakes import FakeBackend, FakeProcesses, proc
from prometheus_client import CollectorRegistry

from tracer_exporter.cli import main
from tracer_exporter.model.tracking import Tracker
from tracer_exporter.web.access import ControlPolicy
from tracer_exporter.web.auth import (
    AUTH_USER,
    BasicAuth,
    WebConfig,
    WebConfigError,
    load_web_config,
    parse_web_config,
)
from tracer_exporter.web.routes import App, parse_networks
from tracer_exporter.web.server import PLAIN_HTTP_TO_TLS, HTTPServer

PASSWORD = "s3cret pass"
HASH = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(4)).decode()


def basic(user, password):
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


# ---------------------------------------------------------------- parsing


def test_no_file_is_plain_http_without_auth():
    config = load_web_config(None)
    assert config == WebConfig()
    assert config.ssl_context() is None


def test_full_config_with_paths_relative_to_the_file(pki, tmp_path):
    path = pki.dir / "web.yml"
    path.write_text(
        "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n  client_ca_file: ca.crt\n"
        f"  min_version: TLS13\nbasic_auth_users:\n  alice: '{HASH}'\n"
        "http_server_config:\n  headers:\n    X-Frame-Options: deny\n"
    )
    config = load_web_config(str(path))
    assert config.tls.cert_file == pki.dir / "server.crt"
    # A client CA alone means verified client certificates, as in the exporter-toolkit.
    assert config.tls.client_auth_type == "RequireAndVerifyClientCert"
    assert config.users == {"alice": HASH.encode()}
    assert config.headers == {"X-Frame-Options": "deny"}
    ctx = config.ssl_context()
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_3


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"tls": {}}, "tls: unknown or unsupported key"),
        ({"tls_server_config": {"cert_file": "server.crt"}}, "tls_server_config.key_file: required"),
        ({"tls_server_config": {"cert_file": "nope.crt", "key_file": "server.key"}}, "no such file"),
        (
            {"tls_server_config": {"cert_file": "server.crt", "key_file": "server.key", "client_auth_type": "Maybe"}},
            "client_auth_type: expected one of",
        ),
        (
            {
                "tls_server_config": {
                    "cert_file": "server.crt",
                    "key_file": "server.key",
                    "client_auth_type": "RequireAnyClientCert",
                }
            },
            "RequireAnyClientCert is not supported",
        ),
        (
            {
                "tls_server_config": {
                    "cert_file": "server.crt",
                    "key_file": "server.key",
                    "client_auth_type": "VerifyClientCertIfGiven",
                }
            },
            "VerifyClientCertIfGiven needs client_ca_file",
        ),
        (
            {"tls_server_config": {"cert_file": "server.crt", "key_file": "server.key", "min_version": "TLS11"}},
            "min_version: expected TLS12 or TLS13",
        ),
        ({"basic_auth_users": {"alice": "plaintext"}}, "basic_auth_users.alice: expected a bcrypt hash"),
        ({"basic_auth_users": ["alice"]}, "basic_auth_users: expected a mapping"),
        ({"http_server_config": {"http2": True}}, "http_server_config.http2: unknown"),
    ],
)
def test_problems_name_the_field(pki, doc, message):
    with pytest.raises(WebConfigError, match=message):
        parse_web_config(doc, pki.dir)


def test_key_that_does_not_match_the_cert_is_an_error(pki, tmp_path):
    path = pki.dir / "mismatch.yml"
    path.write_text("tls_server_config: {cert_file: server.crt, key_file: client.key}\n")
    with pytest.raises(WebConfigError, match="cannot load cert_file"):
        load_web_config(str(path))


def test_cli_bad_web_config_exits_2(tmp_path, capsys):
    path = tmp_path / "web.yml"
    path.write_text("basic_auth_users: {bob: hunter2}\n")
    assert main(["--web.config.file", str(path)]) == 2
    assert "basic_auth_users.bob: expected a bcrypt hash" in capsys.readouterr().err


# ---------------------------------------------------------------- basic auth, WSGI level


def call(app, method="GET", path="/", remote="127.0.0.1", auth=None):
    environ = {"REQUEST_METHOD": method, "PATH_INFO": path, "REMOTE_ADDR": remote, "wsgi.input": io.BytesIO()}
    if auth is not None:
        environ["HTTP_AUTHORIZATION"] = auth
    setup_testing_defaults(environ)
    out = {}

    def start_response(status, headers, exc_info=None):
        out["status"] = int(status.split()[0])
        out["headers"] = dict(headers)

    body = b"".join(app(environ, start_response))
    return out["status"], out["headers"], body, environ


def echo_user(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [environ[AUTH_USER].encode()]


@pytest.mark.parametrize(
    "auth",
    [None, basic("alice", "wrong"), basic("mallory", PASSWORD), "Basic !!!", "Bearer abc", basic("alice", "")],
)
def test_wrong_or_missing_credentials_get_401(auth):
    app = BasicAuth(echo_user, {"alice": HASH.encode()})
    status, headers, body, _ = call(app, auth=auth)
    assert (status, body) == (401, b"Unauthorized\n")
    assert headers["WWW-Authenticate"].startswith("Basic realm=")


def test_right_credentials_pass_and_name_the_user():
    app = BasicAuth(echo_user, {"alice": HASH.encode()})
    for _ in range(2):  # the second time from the cache of good credentials
        status, _, body, _ = call(app, auth=basic("alice", PASSWORD))
        assert (status, body) == (200, b"alice")
    assert call(app, auth=basic("alice", PASSWORD + "x"))[0] == 401


@pytest.fixture
def control_app():
    backend = FakeBackend()
    tracker = Tracker(FakeProcesses(proc(100, "alpha")))
    tracker.attach_backend(backend)
    policy = ControlPolicy(networks=parse_networks(["127.0.0.0/8"]), users=frozenset({"alice"}))
    # Every client here is on another host: no local socket owner.
    return App(tracker, CollectorRegistry(), lambda: [], policy, owner=lambda environ: None), backend


def test_authenticated_control_users_may_control_from_anywhere(control_app):
    app, backend = control_app
    guarded = BasicAuth(app, {"alice": HASH.encode(), "bob": HASH.encode()})
    # Without auth configured, a remote client is refused the control routes ...
    status, _, body, _ = call(app, "POST", "/pids/100", remote="10.0.2.2")
    assert (status, json.loads(body)["error"]) == (
        403,
        "control requests from 10.0.2.2 are not allowed: not in control.allowed_networks "
        "and not an authenticated user of control.users",
    )
    # ... with it, wrong credentials get 401, a scrape-only user 403, and a control user may track.
    assert call(guarded, "POST", "/pids/100", remote="10.0.2.2", auth=basic("alice", "nope"))[0] == 401
    assert call(guarded, "POST", "/pids/100", remote="10.0.2.2", auth=basic("bob", PASSWORD))[0] == 403
    assert call(guarded, "GET", "/pids", remote="10.0.2.2", auth=basic("bob", PASSWORD))[0] == 200
    assert 100 not in backend.maps
    status, _, body, _ = call(guarded, "POST", "/pids/100", remote="10.0.2.2", auth=basic("alice", PASSWORD))
    assert (status, json.loads(body)["created"]) == (201, True)
    assert call(guarded, "DELETE", "/pids/100", remote="10.0.2.2", auth=basic("alice", PASSWORD))[0] == 200


# ---------------------------------------------------------------- real sockets


def hello(environ, start_response):
    body = f"{environ['wsgi.url_scheme']} {environ.get(AUTH_USER, '-')}\n".encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


@pytest.fixture
def serve():
    servers = []

    def start(config):
        server = HTTPServer("127.0.0.1:0", hello, config)
        server.start()
        servers.append(server)
        return server.port

    yield start
    for server in servers:
        server.stop()


def client_context(pki, cert=None):
    ctx = ssl.create_default_context(cafile=str(pki.ca))
    if cert:
        ctx.load_cert_chain(str(pki.cert(cert)), str(pki.key(cert)))
    return ctx


def https_get(port, ctx, auth=None, host="127.0.0.1"):
    conn = http.client.HTTPSConnection(host, port, context=ctx, timeout=10)
    try:
        conn.request("GET", "/metrics", headers={"Authorization": auth} if auth else {})
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def write_config(pki, text):
    path = pki.dir / "web.yml"
    path.write_text(text)
    return load_web_config(str(path))


def test_tls_with_basic_auth_both_ways(pki, serve):
    port = serve(
        write_config(
            pki,
            f"tls_server_config: {{cert_file: server.crt, key_file: server.key}}\nbasic_auth_users: {{alice: '{HASH}'}}\n",
        )
    )
    ctx = client_context(pki)
    assert https_get(port, ctx, basic("alice", PASSWORD)) == (200, b"https alice\n")
    assert https_get(port, ctx, host="localhost", auth=basic("alice", PASSWORD))[0] == 200
    assert https_get(port, ctx, basic("alice", "wrong"))[0] == 401
    assert https_get(port, ctx)[0] == 401


def test_plain_http_to_the_tls_port_fails_cleanly(pki, serve):
    port = serve(write_config(pki, "tls_server_config: {cert_file: server.crt, key_file: server.key}\n"))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        reply = b""
        while chunk := s.recv(4096):
            reply += chunk
    assert reply == PLAIN_HTTP_TO_TLS
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/metrics")
    r = conn.getresponse()
    assert (r.status, r.read()) == (400, b"Client sent an HTTP request to an HTTPS server.\n")
    # A client that does not trust the certificate fails its handshake; the server serves on.
    with pytest.raises(ssl.SSLCertVerificationError):
        https_get(port, ssl.create_default_context())
    assert https_get(port, client_context(pki)) == (200, b"https -\n")


def test_client_certificates_required(pki, serve):
    port = serve(
        write_config(
            pki,
            "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n  client_ca_file: ca.crt\n"
            "  client_auth_type: RequireAndVerifyClientCert\n",
        )
    )
    assert https_get(port, client_context(pki, cert="client")) == (200, b"https -\n")
    # Without a client certificate the server ends the handshake (TLS 1.3: seen at the first read).
    with pytest.raises((ssl.SSLError, ConnectionError)):
        https_get(port, client_context(pki))
    # A certificate the CA did not sign is refused too: the server's own is not a client cert of it.
    other = make_pki(pki.dir / "other")
    with pytest.raises((ssl.SSLError, ConnectionError)):
        https_get(port, _foreign(pki, other))


def _foreign(pki, other):
    ctx = ssl.create_default_context(cafile=str(pki.ca))
    ctx.load_cert_chain(str(other.cert("client")), str(other.key("client")))
    return ctx


def test_plain_server_without_web_config(serve):
    port = serve(None)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/")
    r = conn.getresponse()
    assert (r.status, r.read()) == (200, b"http -\n")


def test_a_web_config_that_is_not_text_is_a_clear_error(tmp_path):
    path = tmp_path / "web.yml"
    path.write_bytes(b"basic_auth_users:\n  \xff: x\n")
    with pytest.raises(WebConfigError, match="not UTF-8 text"):
        load_web_config(str(path))


# ---------------------------------------------------------------- headers and the bcrypt cache


def test_headers_are_the_toolkits_allowlist(tmp_path):
    doc = {
        "http_server_config": {
            "headers": {
                "x-frame-options": "SAMEORIGIN",
                "Strict-Transport-Security": "max-age=31536000",
                "Content-Security-Policy": "default-src 'none'",
                "X-Content-Type-Options": "nosniff",
                "X-XSS-Protection": "0",
            }
        }
    }
    assert parse_web_config(doc, tmp_path).headers == {
        "X-Frame-Options": "SAMEORIGIN",
        "Strict-Transport-Security": "max-age=31536000",
        "Content-Security-Policy": "default-src 'none'",
        "X-Content-Type-Options": "nosniff",
        "X-XSS-Protection": "0",
    }
    bad = {"Connection": "close", "X-Frame-Options": "allow-from x", "X-Content-Type-Options": "sniff"}
    with pytest.raises(WebConfigError) as e:
        parse_web_config({"http_server_config": {"headers": bad}}, tmp_path)
    allowed = (
        "Strict-Transport-Security, X-Content-Type-Options, X-Frame-Options, X-XSS-Protection, Content-Security-Policy"
    )
    assert str(e.value).splitlines() == [
        f"http_server_config.headers.Connection: this header cannot be configured (allowed: {allowed})",
        "http_server_config.headers.X-Frame-Options: expected one of deny, sameorigin, got 'allow-from x'",
        "http_server_config.headers.X-Content-Type-Options: expected one of nosniff, got 'sniff'",
    ]


def test_bad_and_good_credentials_are_each_checked_by_bcrypt_once():
    app = BasicAuth(echo_user, {"alice": HASH.encode()})
    for _ in range(5):
        assert call(app, auth=basic("alice", "wrong"))[0] == 401
        assert call(app, auth=basic("mallory", "wrong"))[0] == 401
        assert call(app, auth=basic("alice", PASSWORD))[:3:2] == (200, b"alice")
    assert app.bcrypt_checks == 3


def test_the_cache_is_bounded(monkeypatch):
    import tracer_exporter.web.auth as wc

    monkeypatch.setattr(wc, "AUTH_CACHE_ENTRIES", 4)
    app = BasicAuth(echo_user, {"alice": HASH.encode()})
    for i in range(6):
        app.check(basic("alice", f"wrong{i}"))
    assert len(app._seen) == 4
    app.check(basic("alice", "wrong0"))  # forgotten: checked again
    assert app.bcrypt_checks == 7


def test_bcrypt_runs_one_check_at_a_time_and_a_known_password_is_not_held_up(monkeypatch):
    import threading
    import time

    real = bcrypt.checkpw
    running, most = [0], [0]
    guard = threading.Lock()

    def slow_checkpw(password, hashed):
        with guard:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.02)
        try:
            return real(password, hashed)
        finally:
            with guard:
                running[0] -= 1

    monkeypatch.setattr(bcrypt, "checkpw", slow_checkpw)
    app = BasicAuth(echo_user, {"alice": HASH.encode()})
    assert app.check(basic("alice", PASSWORD)) == "alice"
    stop = threading.Event()

    def hammer(k):
        i = 0
        while not stop.is_set():
            app.check(basic("alice", f"wrong-{k}-{i}"))
            i += 1

    threads = [threading.Thread(target=hammer, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.2)
        start = time.monotonic()
        assert app.check(basic("alice", PASSWORD)) == "alice"
        assert time.monotonic() - start < 0.05
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    assert most[0] == 1
    assert app.bcrypt_checks > 8


def test_past_ten_refusals_a_second_the_rest_are_answered_one_at_a_time_after_a_pause():
    import threading
    import time

    app = BasicAuth(echo_user, {"alice": HASH.encode()})
    app.failure_pause = 0.1
    assert app.check(basic("alice", PASSWORD)) == "alice"
    took = []
    for _ in range(10):
        start = time.monotonic()
        assert call(app, auth=basic("alice", "wrong"))[0] == 401
        took.append(time.monotonic() - start)
    assert all(t < 0.1 for t in took), took
    # Eight clients at once past the rate: one answer per pause, so 0.8 s for all.
    start = time.monotonic()
    threads = [threading.Thread(target=call, args=(app,), kwargs={"auth": basic("alice", "wrong")}) for _ in range(8)]
    for t in threads:
        t.start()
    # The right password is not held up meanwhile.
    assert call(app, auth=basic("alice", PASSWORD))[0] == 200
    assert time.monotonic() - start < 0.1
    for t in threads:
        t.join(10)
    assert time.monotonic() - start >= 0.8
