"""One threaded HTTP server for every route, with per-request timeouts, optionally TLS."""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import threading
import time
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from tracer_exporter.web_config import WebConfig, wrap_app

log = logging.getLogger(__name__)

# A client that stops sending is dropped after this long, so no thread hangs.
REQUEST_TIMEOUT_SECONDS = 30.0


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

    def get_environ(self) -> dict[str, Any]:
        env = super().get_environ()
        if getattr(self.server, "ssl_context", None) is not None:
            env["HTTPS"] = "on"
            env["wsgi.url_scheme"] = "https"
        return env

    def log_message(self, format: str, *args: Any) -> None:
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
    # socketserver's default of 5 drops connections when many clients arrive at once.
    request_queue_size = 128
    ssl_context: ssl.SSLContext | None = None

    def finish_request(self, request: Any, client_address: Any) -> None:
        # Runs in the request's own thread: a slow handshake blocks nobody else.
        if self.ssl_context is None:
            super().finish_request(request, client_address)
            return
        request.settimeout(REQUEST_TIMEOUT_SECONDS)
        try:
            first = request.recv(1, socket.MSG_PEEK)
            if first and first[0] != _TLS_HANDSHAKE:
                log.debug("%s: plain HTTP on the TLS port", client_address[0])
                request.sendall(PLAIN_HTTP_TO_TLS)
                return
            tls = self.ssl_context.wrap_socket(request, server_side=True)
        except (OSError, ssl.SSLError) as e:
            log.debug("%s: TLS handshake failed: %s", client_address[0], e)
            return
        try:
            super().finish_request(tls, client_address)
        finally:
            with contextlib.suppress(OSError):
                tls.shutdown(socket.SHUT_RDWR)
            tls.close()


class _Server6(_Server):
    address_family = socket.AF_INET6


class HTTPServer:
    """Serves app on address; with a web config, over TLS and/or behind basic auth."""

    def __init__(self, address: str, app: Any, web_config: WebConfig | None = None) -> None:
        host, port = parse_listen_address(address)
        server_class = _Server6 if ":" in host else _Server
        web_config = web_config or WebConfig()
        context = web_config.ssl_context()
        self._server = make_server(
            host, port, wrap_app(app, web_config), server_class=server_class, handler_class=_Handler
        )
        self._server.ssl_context = context
        self.tls = context is not None
        # No poll interval: the thread sleeps until a connection comes, so an idle
        # exporter uses no CPU between scrapes; stop() wakes it with one.
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": None}, name="http", daemon=True
        )

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
