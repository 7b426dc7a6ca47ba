"""HTTP routes: /metrics, /tracer, the /pids control API and health checks.

A plain WSGI application, so it is tested without sockets and served by
any WSGI server.
"""

from __future__ import annotations

import html
import ipaddress
import json
import logging
import re
import threading
import urllib.parse
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, make_wsgi_app

from tracer_exporter.model.config import LOOPBACK
from tracer_exporter.model.tracking import Tracker, TrackError, parse_pid
from tracer_exporter.views import tables as render
from tracer_exporter.web.access import ControlPolicy, fetch_site_refusal, host_refusal, in_networks, origin_refusal
from tracer_exporter.web.auth import AUTH_USER
from tracer_exporter.web.peer import peer_uid

log = logging.getLogger(__name__)

StartResponse = Callable[..., Any]

_PID_PATH = re.compile(r"^/pids/([^/]*)$")

# No route takes a body; a small one (say "{}") is read and ignored.
MAX_BODY_BYTES = 64 * 1024
# A refused body is still read up to this much, so the client reads the 413
# instead of a connection reset; past it the connection is simply closed.
DRAIN_BYTES = 256 * 1024
_DRAIN_CHUNK = 64 * 1024

# The server puts the connection's two ends here (see server.py).
PEER = "tracer_exporter.peer"
LOCAL = "tracer_exporter.local"
LISTEN = "tracer_exporter.listen"  # the host of --web.listen-address

DEFAULT_TELEMETRY_PATH = "/metrics"
# The routes of their own; --web.telemetry-path may be any other absolute path.
FIXED_PATHS = ("/", "/tracer", "/pids", "/-/healthy", "/-/ready")

LANDING = """<!doctype html>
<html><head><title>tracer_exporter</title></head><body>
<h1>tracer_exporter</h1>
<ul>
<li><a href="{href}">{path}</a>: Prometheus metrics</li>
<li><a href="tracer">/tracer</a>: the tracked processes as a table</li>
<li><a href="pids">/pids</a>: the tracked processes as JSON</li>
<li><a href="-/ready">/-/ready</a>: 200 once every probe is attached</li>
</ul></body></html>
"""


def check_telemetry_path(path: str) -> str:
    """--web.telemetry-path: an absolute path that is not another route's."""
    if not path.startswith("/") or path.startswith("//") or "?" in path or "#" in path:
        raise ValueError(f"--web.telemetry-path {path!r}: expected an absolute path such as /metrics")
    if path in FIXED_PATHS or path.startswith("/pids/"):
        raise ValueError(f"--web.telemetry-path {path!r}: that path is already a route of its own")
    return path


class Response(Exception):
    """A reply decided early; raised from inside a handler."""

    def __init__(self, status: str, body: bytes, content_type: str, headers: Sequence[tuple[str, str]] = ()) -> None:
        super().__init__(status)
        self.status = status
        self.body = body
        self.content_type = content_type
        self.headers = list(headers)


def json_response(status: str, doc: object, headers: Sequence[tuple[str, str]] = ()) -> Response:
    return Response(status, json.dumps(doc).encode() + b"\n", "application/json", headers)


def json_error(status: str, message: str, headers: Sequence[tuple[str, str]] = ()) -> Response:
    return json_response(status, {"error": message}, headers)


# The model's refusals (tracking.TrackError.kind) as HTTP statuses.
KIND_STATUS = {"invalid": 400, "not_found": 404, "limit": 409, "not_ready": 503}

_STATUS = {
    200: "200 OK",
    201: "201 Created",
    400: "400 Bad Request",
    403: "403 Forbidden",
    404: "404 Not Found",
    405: "405 Method Not Allowed",
    409: "409 Conflict",
    411: "411 Length Required",
    413: "413 Content Too Large",
    500: "500 Internal Server Error",
    503: "503 Service Unavailable",
}


def parse_networks(specs: Iterable[str]) -> list[Any]:
    return [ipaddress.ip_network(s, strict=False) for s in specs]


def client_allowed(remote: str, networks: Sequence[Any]) -> bool:
    return in_networks(remote, networks)


def socket_owner(environ: dict[str, Any]) -> int | None:
    """The uid owning the client's socket (a client on this host), else None."""
    peer, local = environ.get(PEER), environ.get(LOCAL)
    if peer is None or local is None:
        return None
    return peer_uid(peer, local)


def _drain(stream: Any, length: int) -> None:
    """Reads length bytes or up to EOF; the server's socket timeout bounds it."""
    while stream is not None and length > 0:
        try:
            chunk = stream.read(min(length, _DRAIN_CHUNK))
        except OSError as e:
            raise json_error(_STATUS[400], f"the request body was not received: {e}") from e
        if not chunk:
            return
        length -= len(chunk)


def parse_follow(query: str) -> bool:
    """follow_forks from a query string: 1/true/yes or 0/false/no (default no)."""
    values = urllib.parse.parse_qs(query, keep_blank_values=True).get("follow_forks", ["0"])
    value = values[-1].lower()
    if value in ("1", "true", "yes"):
        return True
    if value in ("0", "false", "no"):
        return False
    raise TrackError(f"follow_forks must be 1 or 0, got {values[-1]!r}")


class App:
    """The exporter's WSGI application."""

    def __init__(
        self,
        tracker: Tracker,
        registry: CollectorRegistry,
        not_ready: Callable[[], list[str]],
        policy: ControlPolicy | None = None,
        metrics_app: Callable[..., Iterable[bytes]] | None = None,
        *,
        metrics_path: str = DEFAULT_TELEMETRY_PATH,
        control: bool = True,
        allowed_hosts: Sequence[str] = (),
        owner: Callable[[dict[str, Any]], int | None] = socket_owner,
    ) -> None:
        self.tracker = tracker
        self.not_ready = not_ready
        # control=False (run --listen): the control routes do not exist at all.
        self.control = control
        self.policy = policy if policy is not None else ControlPolicy(networks=parse_networks(LOOPBACK))
        self.allowed_hosts = tuple(allowed_hosts)
        self._owner = owner
        # cli passes exposition.MetricsApp: the per-process families without per-sample objects.
        self._metrics = metrics_app or make_wsgi_app(registry)
        self.metrics_path = check_telemetry_path(metrics_path)
        self._landing = LANDING.format(
            href=html.escape(metrics_path[1:], quote=True), path=html.escape(metrics_path)
        ).encode()
        self._table = render.TracerTable()
        self._table_lock = threading.Lock()  # the table keeps its lines between requests

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "") or "/"
        method = environ.get("REQUEST_METHOD", "GET")
        try:
            self._consume_body(environ)
            if path == self.metrics_path:
                self._allow(method, ("GET", "HEAD"))
                return self._metrics(environ, start_response)
            reply = self._route(method, path, environ)
        except Response as r:
            reply = r
        except Exception:
            log.exception("error serving %s %s", method, path)
            reply = json_error(_STATUS[500], "internal error; see the exporter's log")
        headers = [("Content-Type", reply.content_type), ("Content-Length", str(len(reply.body)))]
        start_response(reply.status, headers + reply.headers)
        return [b"" if method == "HEAD" else reply.body]

    @staticmethod
    def _consume_body(environ: dict[str, Any]) -> None:
        """Reads and drops the request body, refusing one that is too large."""
        if environ.get("HTTP_TRANSFER_ENCODING"):
            raise json_error(_STATUS[411], "chunked request bodies are not accepted; no route takes a body")
        text = environ.get("CONTENT_LENGTH") or "0"
        if not text.isdigit():
            raise json_error(_STATUS[400], f"bad Content-Length {text!r}")
        length = int(text)
        stream = environ.get("wsgi.input")
        if length > MAX_BODY_BYTES:
            _drain(stream, min(length, DRAIN_BYTES))
            raise json_error(
                _STATUS[413], f"request body of {length} bytes refused: no route takes a body (limit {MAX_BODY_BYTES})"
            )
        _drain(stream, length)

    @staticmethod
    def _allow(method: str, allowed: Sequence[str]) -> None:
        if method not in allowed:
            raise json_error(_STATUS[405], f"method {method} is not allowed here", [("Allow", ", ".join(allowed))])

    def _route(self, method: str, path: str, environ: dict[str, Any]) -> Response:
        if path == "/":
            self._allow(method, ("GET", "HEAD"))
            return Response(_STATUS[200], self._landing, "text/html; charset=utf-8")
        if path == "/tracer":
            self._allow(method, ("GET", "HEAD"))
            by = urllib.parse.parse_qs(environ.get("QUERY_STRING", "")).get("by", [""])[-1]
            if by not in ("", "pid", "group"):
                raise json_error(_STATUS[400], f"by must be pid or group, got {by!r}")
            rows = self.tracker.rows()
            if by == "group":
                return Response(_STATUS[200], render.group_table(rows).encode(), "text/plain; charset=utf-8")
            with self._table_lock:
                table = self._table.render(rows)
            return Response(_STATUS[200], table.encode(), "text/plain; charset=utf-8")
        if path == "/pids":
            self._allow(method, ("GET", "HEAD"))
            return Response(_STATUS[200], render.pids_json(self.tracker.rows()), "application/json")
        if path == "/-/healthy":
            self._allow(method, ("GET", "HEAD"))
            return Response(_STATUS[200], b"Healthy\n", "text/plain; charset=utf-8")
        if path == "/-/ready":
            self._allow(method, ("GET", "HEAD"))
            problems = self.not_ready()
            if problems:
                body = "Not ready:\n" + "".join(f"  {p}\n" for p in problems)
                return Response(_STATUS[503], body.encode(), "text/plain; charset=utf-8")
            return Response(_STATUS[200], b"Ready\n", "text/plain; charset=utf-8")
        match = _PID_PATH.match(path) if self.control else None
        if match:
            return self._pid(method, match.group(1), environ)
        raise json_error(_STATUS[404], f"no such route: {path}")

    def _pid(self, method: str, text: str, environ: dict[str, Any]) -> Response:
        self._allow(method, ("POST", "DELETE"))
        why = self._refusal(environ)
        if why is not None:
            log.info("refused %s %s from %s: %s", method, environ.get("PATH_INFO"), environ.get("REMOTE_ADDR"), why)
            raise json_error(_STATUS[403], why)
        try:
            pid = parse_pid(text)
            if method == "POST":
                follow = parse_follow(environ.get("QUERY_STRING", ""))
                created = self.tracker.add(pid, follow=follow)
                status = 201 if created else 200
                return json_response(_STATUS[status], {"pid": pid, "tracked": True, "created": created})
            self.tracker.remove(pid)
            return json_response(_STATUS[200], {"pid": pid, "tracked": False})
        except TrackError as e:
            doc: dict[str, object] = {"error": str(e)}
            if e.pid is not None:
                doc["pid"] = e.pid
            return json_response(_STATUS[KIND_STATUS[e.kind]], doc)

    def _refusal(self, environ: dict[str, Any]) -> str | None:
        """Why this control request is refused, or None: cross-site checks first, then who."""
        host = environ.get("HTTP_HOST")
        local = environ.get(LOCAL)
        listen = environ.get(LISTEN, "")
        why = (
            fetch_site_refusal(environ.get("HTTP_SEC_FETCH_SITE"))
            or host_refusal(host, [listen, local[0] if local else ""], self.allowed_hosts)
            or origin_refusal(environ.get("HTTP_ORIGIN"), host, environ.get("wsgi.url_scheme", "http"))
        )
        if why is not None:
            return why
        return self.policy.refusal(environ.get(AUTH_USER), environ.get("REMOTE_ADDR", ""), self._owner(environ))
