"""One threaded HTTP server for every route, with bounded connections and deadlines, optionally TLS.

A connection gets a thread, which sleeps in recv until its client sends (an
idle connection costs no CPU). The request line and headers (and the TLS
handshake) must arrive within HEADER_DEADLINE_SECONDS, or one watchdog thread
shuts the socket. At most MAX_CONNECTIONS are open at once (fewer under a low
open-files limit); past that a new one is answered 503 and closed. Once its headers are in, a request runs only
if one of --web.max-requests slots is free, else it is answered 503.
"""

from __future__ import annotations

import contextlib
import errno
import heapq
import itertools
import json
import logging
import resource
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from tracer_exporter.web.auth import WebConfig, wrap_app
from tracer_exporter.web.routes import LISTEN, LOCAL, PEER

log = logging.getLogger(__name__)

# A client that stops sending in the middle of a body or a reply is dropped after this long.
REQUEST_TIMEOUT_SECONDS = 30.0
# The request line and every header (and a TLS handshake) must arrive within this.
HEADER_DEADLINE_SECONDS = 10.0
DEFAULT_MAX_REQUESTS = 40
# Open connections, each a sleeping thread; a cap keeps fds and threads bounded. Below
# the open-files limit (less a margin for BPF's fds), so a scrape never waits for an fd.
MAX_CONNECTIONS = 4096
_FD_MARGIN = 256
# accept() failing for want of fds: wait this long (doubling) instead of spinning.
_ACCEPT_BACKOFF = (0.005, 1.0)

_BUSY_BODY = b"too many connections; try again later\n"
_BUSY = (
    b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\nConnection: close\r\n"
    b"Content-Length: %d\r\n\r\n%s" % (len(_BUSY_BODY), _BUSY_BODY)
)


def raise_nofile_limit() -> int:
    """Soft RLIMIT_NOFILE up to the hard limit; returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (OSError, ValueError) as e:
            log.warning("cannot raise the open-files limit from %d to %d: %s", soft, hard, e)
    return soft


class Deadlines:
    """One thread that shuts sockets whose deadline passed; it sleeps while none is pending."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int]] = []
        self._socks: dict[int, socket.socket] = {}  # the pending ones, by key
        self._ids = itertools.count()
        self._cond = threading.Condition()
        self._calls: list[Callable[[], None]] = []
        self._thread = threading.Thread(target=self._run, name="http-deadlines", daemon=True)
        self._thread.start()

    def add(self, sock: socket.socket, seconds: float) -> int:
        key = next(self._ids)
        with self._cond:
            heapq.heappush(self._heap, (time.monotonic() + seconds, key))
            self._socks[key] = sock
            self._cond.notify()
        return key

    def retarget(self, key: int, sock: socket.socket) -> None:
        """The connection's socket is now sock (a TLS socket took over the fd)."""
        with self._cond:
            if key in self._socks:
                self._socks[key] = sock

    def cancel(self, key: int) -> None:
        with self._cond:
            self._socks.pop(key, None)
            if self._heap and self._heap[0][1] == key:
                # Else the thread would wake at this deadline, long after the request, in an idle exporter.
                self._cond.notify()

    def call_soon(self, fn: Callable[[], None]) -> None:
        """Runs fn in this thread (for per-thread state: capabilities)."""
        with self._cond:
            self._calls.append(fn)
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                calls, self._calls = self._calls, []
            for fn in calls:
                fn()
            with self._cond:
                if self._calls:
                    continue
                while self._heap and self._heap[0][1] not in self._socks:
                    heapq.heappop(self._heap)
                if not self._heap:
                    self._cond.wait()
                    continue
                when, key = self._heap[0]
                delay = when - time.monotonic()
                if delay > 0:
                    self._cond.wait(delay)
                    continue
                heapq.heappop(self._heap)
                sock = self._socks.pop(key)
                # Inside the lock: cancel() cannot return, and the fd be closed and
                # reused, while this shuts it. Wakes the connection's thread with EOF.
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


class Limiter:
    """WSGI middleware: at most n requests inside the application at once; 503 past it."""

    def __init__(self, app: Callable[..., Iterable[bytes]], n: int) -> None:
        self._app = app
        self._slots = threading.BoundedSemaphore(n)
        self.n = n

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if not self._slots.acquire(blocking=False):
            body = json.dumps({"error": f"too many requests at once (--web.max-requests {self.n})"}).encode() + b"\n"
            start_response(
                "503 Service Unavailable",
                [("Content-Type", "application/json"), ("Content-Length", str(len(body))), ("Retry-After", "1")],
            )
            return [body]
        try:
            # Joined here, so the slot is held until the reply is built.
            return [b"".join(self._app(environ, start_response))]
        finally:
            self._slots.release()


def parse_listen_address(text: str) -> tuple[str, int]:
    """HOST:PORT, [IPV6]:PORT or :PORT (all interfaces)."""
    host, sep, port_text = text.rpartition(":")
    if not sep:
        raise ValueError(f"listen address {text!r} has no port: use HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"listen address {text!r}: port must be a number from 0 to 65535")
    return host, int(port_text)


class _Handler(WSGIRequestHandler):
    timeout = REQUEST_TIMEOUT_SECONDS
    deadline_key: int | None = None

    def __init__(self, request: Any, client_address: Any, server: Any, deadline_key: int | None = None) -> None:
        self.deadline_key = deadline_key  # before the base class handles the request
        super().__init__(request, client_address, server)

    def parse_request(self) -> bool:
        ok = super().parse_request()  # reads the headers
        if self.deadline_key is not None:
            self.server.deadlines.cancel(self.deadline_key)  # type: ignore[attr-defined]
        return ok

    def get_environ(self) -> dict[str, Any]:
        env = super().get_environ()
        if getattr(self.server, "ssl_context", None) is not None:
            env["HTTPS"] = "on"
            env["wsgi.url_scheme"] = "https"
        with contextlib.suppress(OSError):
            env[LOCAL] = self.connection.getsockname()[:2]
        env[PEER] = tuple(self.client_address[:2])
        env[LISTEN] = getattr(self.server, "listen_host", "")
        return env

    def log_message(self, format: str, *args: Any) -> None:
        if log.isEnabledFor(logging.DEBUG):  # formatted only when it is written
            log.debug("%s %s", self.address_string(), format % args)


# What a plain-HTTP client gets from a TLS port (as Go's net/http answers it).
PLAIN_HTTP_TO_TLS = (
    b"HTTP/1.0 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\nConnection: close\r\n\r\n"
    b"Client sent an HTTP request to an HTTPS server.\n"
)
_TLS_HANDSHAKE = 0x16  # the first byte of a TLS record carrying a ClientHello


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True
    # socketserver's default of 5 drops connections when many clients arrive at once; a
    # burst of hundreds must not fill it either, or a scrape's SYN waits for retransmits.
    request_queue_size = 4096
    ssl_context: ssl.SSLContext | None = None
    listen_host = ""
    deadlines: Deadlines
    _backoff = 0.0
    _calls: tuple[Callable[[], None], ...] = ()

    def service_actions(self) -> None:
        # Between two accepts, in the accept thread.
        super().service_actions()
        calls, self._calls = self._calls, ()
        for fn in calls:
            fn()

    def server_activate(self) -> None:
        super().server_activate()
        self.deadlines = Deadlines()
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        room = soft - _FD_MARGIN if soft != resource.RLIM_INFINITY else MAX_CONNECTIONS
        self.max_connections = max(1, min(MAX_CONNECTIONS, room))
        self._connections = threading.BoundedSemaphore(self.max_connections)

    def get_request(self) -> Any:
        try:
            conn = super().get_request()
        except OSError as e:
            if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                # The listening socket stays readable: without a pause, the loop would spin.
                self._backoff = min(max(self._backoff * 2, _ACCEPT_BACKOFF[0]), _ACCEPT_BACKOFF[1])
                log.warning("accept: %s; retrying in %.3f s", e.strerror, self._backoff)
                time.sleep(self._backoff)
            raise
        self._backoff = 0.0
        return conn

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._connections.acquire(blocking=False):
            with contextlib.suppress(OSError):
                request.send(_BUSY, socket.MSG_DONTWAIT)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._connections.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._connections.release()

    def finish_request(self, request: Any, client_address: Any) -> None:
        # Runs in the request's own thread: a slow client blocks nobody else.
        key = self.deadlines.add(request, HEADER_DEADLINE_SECONDS)
        try:
            self._finish(request, client_address, key)
        finally:
            self.deadlines.cancel(key)

    def _finish(self, request: Any, client_address: Any, key: int) -> None:
        if self.ssl_context is None:
            self.RequestHandlerClass(request, client_address, self, deadline_key=key)
            return
        request.settimeout(REQUEST_TIMEOUT_SECONDS)
        tls = None
        try:
            first = request.recv(1, socket.MSG_PEEK)
            if first and first[0] != _TLS_HANDSHAKE:
                log.debug("%s: plain HTTP on the TLS port", client_address[0])
                request.sendall(PLAIN_HTTP_TO_TLS)
                return
            tls = self.ssl_context.wrap_socket(request, server_side=True, do_handshake_on_connect=False)
            self.deadlines.retarget(key, tls)
            tls.do_handshake()
        except (OSError, ssl.SSLError) as e:
            log.debug("%s: TLS handshake failed: %s", client_address[0], e)
            if tls is not None:
                tls.close()  # it owns the fd now
            return
        try:
            self.RequestHandlerClass(tls, client_address, self, deadline_key=key)
        finally:
            with contextlib.suppress(OSError):
                tls.shutdown(socket.SHUT_RDWR)
            tls.close()


class _Server6(_Server):
    address_family = socket.AF_INET6


class HTTPServer:
    """Serves app on address; with a web config, over TLS and/or behind basic auth."""

    def __init__(
        self, address: str, app: Any, web_config: WebConfig | None = None, max_requests: int = DEFAULT_MAX_REQUESTS
    ) -> None:
        host, port = parse_listen_address(address)
        server_class = _Server6 if ":" in host else _Server
        web_config = web_config or WebConfig()
        context = web_config.ssl_context()
        # The limit is inside basic auth: clients refused there (and paused when they
        # hammer) hold no slot, so they cannot crowd out those with the right password.
        self._server = make_server(
            host,
            port,
            wrap_app(Limiter(app, max_requests), web_config),
            server_class=server_class,
            handler_class=_Handler,
        )
        self._server.ssl_context = context
        self._server.listen_host = host
        self.tls = context is not None
        # No poll interval: the thread sleeps until a connection comes, so an idle
        # exporter uses no CPU between scrapes; stop() wakes it with one.
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": None}, name="http", daemon=True
        )

    def run_in_threads(self, fn: Callable[[], None], timeout: float = 5.0) -> bool:
        """Runs fn in the accept thread and the deadline thread; True once both ran it.

        Connection threads start from the accept thread, so they inherit what fn set.
        """
        done = [threading.Event(), threading.Event()]

        def wrap(event: threading.Event) -> Callable[[], None]:
            def run() -> None:
                try:
                    fn()
                finally:
                    event.set()

            return run

        self._server._calls = (*self._server._calls, wrap(done[0]))
        self._server.deadlines.call_soon(wrap(done[1]))
        deadline = time.monotonic() + timeout
        while not done[0].is_set() and time.monotonic() < deadline:
            self._wake()
            done[0].wait(0.2)
        return all(e.wait(max(0.0, deadline - time.monotonic())) for e in done)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        # shutdown() waits for serve_forever to return; run it bounded.
        stopper = threading.Thread(target=self._server.shutdown, daemon=True)
        stopper.start()
        deadline = time.monotonic() + timeout
        while stopper.is_alive() and self._thread.is_alive() and time.monotonic() < deadline:
            self._wake()
            stopper.join(0.05)
        stopper.join(max(0.0, deadline - time.monotonic()))
        self._server.server_close()

    def _wake(self) -> None:
        """Connect to ourselves, so serve_forever sees the shutdown request."""
        host, port = self._server.server_address[:2]
        host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1.0):
            pass
