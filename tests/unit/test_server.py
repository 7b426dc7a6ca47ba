"""The HTTP server's bounds, on real loopback sockets: deadlines, request slots, connections, fds."""

import http.client
import json
import resource
import socket
import subprocess
import sys
import threading
import time

import pytest

from tracer_exporter.web import server as server_mod
from tracer_exporter.web.server import HTTPServer, raise_nofile_limit


def hello(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "3")])
    return [b"hi\n"]


@pytest.fixture
def serve():
    servers = []

    def start(app=hello, **kw):
        s = HTTPServer("127.0.0.1:0", app, **kw)
        s.start()
        servers.append(s)
        return s.port

    yield start
    for s in servers:
        s.stop()


def get(port, path="/"):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def read_all(sock, timeout=10.0):
    sock.settimeout(timeout)
    out = b""
    while chunk := sock.recv(4096):
        out += chunk
    return out


def test_half_sent_headers_are_closed_at_the_deadline_while_others_are_served(serve, monkeypatch):
    monkeypatch.setattr(server_mod, "HEADER_DEADLINE_SECONDS", 0.5)
    port = serve()
    slow = [socket.create_connection(("127.0.0.1", port)) for _ in range(20)]
    start = time.monotonic()
    for s in slow:
        s.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # never the blank line
    assert get(port) == (200, b"hi\n")
    for s in slow:
        assert read_all(s) == b""  # closed without a reply
        s.close()
    assert 0.4 < time.monotonic() - start < 5.0
    # A client that sends a byte at a time does not extend the deadline.
    with socket.create_connection(("127.0.0.1", port)) as s:
        start = time.monotonic()
        s.settimeout(5.0)
        with pytest.raises(OSError):
            for ch in b"GET / HTTP/1.1\r\nX-Pad: " + b"a" * 100:
                s.send(bytes([ch]))
                time.sleep(0.02)
            read_all(s)
            s.send(b"more")  # the server's end is gone
            time.sleep(0.2)
            s.send(b"more")
        assert time.monotonic() - start < 5.0


def test_past_max_requests_is_503(serve):
    inside = threading.Semaphore(0)
    release = threading.Event()

    def slow(environ, start_response):
        inside.release()
        release.wait(10)
        return hello(environ, start_response)

    port = serve(slow, max_requests=2)
    results = []
    threads = [threading.Thread(target=lambda: results.append(get(port))) for _ in range(2)]
    for t in threads:
        t.start()
    assert inside.acquire(timeout=5) and inside.acquire(timeout=5)
    status, body = get(port)
    assert (status, json.loads(body)) == (503, {"error": "too many requests at once (--web.max-requests 2)"})
    release.set()
    for t in threads:
        t.join(10)
    assert results == [(200, b"hi\n")] * 2
    assert get(port) == (200, b"hi\n")


def test_past_max_connections_a_new_one_is_answered_503_and_closed(serve, monkeypatch):
    monkeypatch.setattr(server_mod, "MAX_CONNECTIONS", 3)
    port = serve()
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
    time.sleep(0.2)
    with socket.create_connection(("127.0.0.1", port)) as s:
        reply = read_all(s)
    assert reply.startswith(b"HTTP/1.0 503 Service Unavailable\r\n")
    assert reply.endswith(b"\r\n\r\ntoo many connections; try again later\n")
    for s in idle:
        s.close()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if get(port)[0] == 200:
            break
        time.sleep(0.05)
    assert get(port) == (200, b"hi\n")


def test_the_connection_cap_stays_below_the_open_files_limit(serve):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))
        low = HTTPServer("127.0.0.1:0", hello)
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))
        high = HTTPServer("127.0.0.1:0", hello)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert low._server.max_connections == 1024 - 256
    assert high._server.max_connections == (4096 if hard >= 4352 else hard - 256)
    low._server.server_close()
    high._server.server_close()


def test_raise_nofile_limit_makes_soft_the_hard_limit():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, 256), hard))
        assert raise_nofile_limit() == hard
        assert resource.getrlimit(resource.RLIMIT_NOFILE) == (hard, hard)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


# Out of fds, the accept loop waits instead of spinning on EMFILE. The clients are
# the test's, so only the server's process is out of fds.
EMFILE_SCRIPT = """
import resource, socket, sys, time
from tracer_exporter.web.server import HTTPServer
def app(environ, start_response):
    start_response("200 OK", [("Content-Length", "0")])
    return [b""]
s = HTTPServer("127.0.0.1:0", app)
s.start()
resource.setrlimit(resource.RLIMIT_NOFILE, (64, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
held = []
try:
    while True:
        held.append(socket.socket())
except OSError:
    pass
print(s.port, flush=True)
sys.stdin.readline()
time.sleep(0.3)
cpu = time.process_time()
time.sleep(2.0)
print(round(time.process_time() - cpu, 3), flush=True)
"""


def test_out_of_fds_the_accept_loop_does_not_spin():
    proc = subprocess.Popen(
        [sys.executable, "-c", EMFILE_SCRIPT],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        port = int(proc.stdout.readline())
        clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(5)]
        proc.stdin.write("go\n")
        proc.stdin.flush()
        used = float(proc.stdout.readline())
        for c in clients:
            c.close()
    finally:
        proc.kill()
        err = proc.communicate(timeout=30)[1]
    assert "accept: Too many open files; retrying in" in err
    # Spinning would burn the whole 2 s; waiting (up to 1 s between tries) costs next to nothing.
    assert used < 0.3, used


def test_a_stalled_tls_handshake_is_closed_at_the_deadline(monkeypatch, tmp_path):
    from certs import make_pki

    from tracer_exporter.web.auth import TLSConfig, WebConfig

    monkeypatch.setattr(server_mod, "HEADER_DEADLINE_SECONDS", 0.5)
    pki = make_pki(tmp_path)
    s = HTTPServer("127.0.0.1:0", hello, WebConfig(tls=TLSConfig(pki.dir / "server.crt", pki.dir / "server.key")))
    s.start()
    try:
        with socket.create_connection(("127.0.0.1", s.port)) as c:
            start = time.monotonic()
            c.sendall(b"\x16\x03\x01")  # the start of a ClientHello, never the rest
            assert read_all(c) == b""
            assert time.monotonic() - start < 5.0
    finally:
        s.stop()


def test_a_cancelled_deadline_does_not_wake_the_idle_watchdog_later():
    deadlines = server_mod.Deadlines()
    a, b = socket.socketpair()
    try:
        key = deadlines.add(a, 3600.0)
        time.sleep(0.2)  # the watchdog now sleeps until that deadline
        deadlines.cancel(key)
        # The watchdog drops it now, and then sleeps with nothing pending; left in the
        # heap, it would wake at its deadline in an exporter with no request at all.
        until = time.monotonic() + 5
        while deadlines._heap and time.monotonic() < until:
            time.sleep(0.01)
        assert deadlines._heap == []
        assert a.send(b"x") == 1  # not shut
    finally:
        a.close()
        b.close()
