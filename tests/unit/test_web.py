import io
import json
from wsgiref.util import setup_testing_defaults

import pytest
from fakes import TRACER_HEADER, FakeBackend, FakeProcesses, proc
from prometheus_client import CollectorRegistry

from tracer_exporter.model.counters import Counts
from tracer_exporter.model.health import Attachment, Health
from tracer_exporter.model.tracking import Tracker
from tracer_exporter.views.collector import TracerCollector
from tracer_exporter.web.access import ControlPolicy
from tracer_exporter.web.routes import App, client_allowed, parse_networks


class Client:
    def __init__(self, app):
        self.app = app

    def request(self, method, path, remote="127.0.0.1", headers=None, uid=0):
        """uid: the owner of the client's socket (None: a client on another host)."""
        path, _, query = path.partition("?")
        environ = {
            "REQUEST_METHOD": method,
            "PATH_INFO": path,
            "QUERY_STRING": query,
            "REMOTE_ADDR": remote,
            "wsgi.input": io.BytesIO(),
            "test.uid": uid,
        }
        environ.update(headers or {})
        setup_testing_defaults(environ)
        out = {}

        def start_response(status, hdrs, exc_info=None):
            out["status"] = int(status.split()[0])
            out["headers"] = dict(hdrs)

        body = b"".join(self.app(environ, start_response))
        return out["status"], out["headers"], body


def socket_owner(environ):
    return environ["test.uid"]


@pytest.fixture
def setup():
    backend = FakeBackend(limit=2)
    tracker = Tracker(FakeProcesses(proc(100, "alpha"), proc(200, "beta"), proc(300), proc(101, tgid=100)))
    health = Health(
        attachments=[Attachment("kmalloc", "__kmalloc", True), Attachment("up", "up", False, "boom")],
        missed={"kmalloc": 4},
        kernel_missed={"kmalloc": 11},
        skipped={"schedule": 3, "sched_process_exit": 0},
        alloc_entries=7,
        alloc_insert_failures=1,
    )
    problems: list[str] = []
    registry = CollectorRegistry()
    registry.register(TracerCollector(tracker.rows, lambda: health, "9.9", "6.1.0-test"))
    app = App(tracker, registry, lambda: problems, owner=socket_owner)
    tracker.attach_backend(backend)
    return Client(app), backend, registry, problems


def test_post_delete_cycle(setup):
    client, backend, _, _ = setup
    status, headers, body = client.request("POST", "/pids/100")
    assert (status, json.loads(body)) == (201, {"pid": 100, "tracked": True, "created": True})
    assert headers["Content-Type"] == "application/json"
    assert client.request("POST", "/pids/100")[0] == 200
    assert client.request("DELETE", "/pids/100")[0] == 200
    status, _, body = client.request("DELETE", "/pids/100")
    assert (status, json.loads(body)["error"]) == (404, "pid 100 is not tracked")


@pytest.mark.parametrize("pid", ["abc", "-1", "0", "1e3", "", "99999999999"])
def test_malformed_pid_is_400(setup, pid):
    client, backend, _, _ = setup
    status, _, body = client.request("POST", f"/pids/{pid}")
    assert status == 400
    assert json.loads(body)["error"]
    assert backend.maps == {}


def test_errors(setup):
    client, backend, _, _ = setup
    assert client.request("POST", "/pids/4000")[0] == 404
    status, _, body = client.request("POST", "/pids/101")
    assert status == 400
    assert "thread of process 100" in json.loads(body)["error"]
    client.request("POST", "/pids/100")
    client.request("POST", "/pids/200")
    status, _, body = client.request("POST", "/pids/300")
    assert status == 409
    assert "limit of 2 tracked processes" in json.loads(body)["error"]
    assert set(backend.maps) == {100, 200}


def test_control_is_loopback_only(setup):
    client, backend, _, _ = setup
    status, _, body = client.request("POST", "/pids/100", remote="10.0.2.2", uid=None)
    assert (status, json.loads(body)) == (
        403,
        {
            "error": "control requests from 10.0.2.2 are not allowed: not in control.allowed_networks "
            "and not an authenticated user of control.users"
        },
    )
    assert client.request("POST", "/pids/100", remote="::1")[0] == 201
    assert client.request("GET", "/tracer", remote="10.0.2.2", uid=None)[0] == 200


def test_control_is_root_only_by_default(setup):
    client, backend, _, _ = setup
    for method, path in (("POST", "/pids/100"), ("POST", "/pids/100?follow_forks=1"), ("DELETE", "/pids/200")):
        status, _, body = client.request(method, path, uid=65534)
        assert (status, json.loads(body)["error"]) == (
            403,
            "uid 65534 (nobody) may not control: only root, control.allowed_users and control.allowed_groups may",
        )
    assert backend.maps == {}
    # Scrapes stay open to everyone.
    assert client.request("GET", "/tracer", uid=65534)[0] == 200
    assert client.request("GET", "/pids", uid=65534)[0] == 200
    assert client.request("GET", "/metrics", uid=65534)[0] == 200
    assert client.request("POST", "/pids/100", uid=0)[0] == 201


def test_allowed_users_and_groups_widen_control(setup):
    client, backend, _, _ = setup
    policy = ControlPolicy(
        networks=parse_networks(["127.0.0.0/8"]),
        uids=frozenset({0, 1000}),
        gids=frozenset({50}),
        groups_of=lambda uid: frozenset({50, 7}) if uid == 2000 else frozenset({uid}),
    )
    client.app.policy = policy
    assert client.request("POST", "/pids/100", uid=1000)[0] == 201
    assert client.request("DELETE", "/pids/100", uid=2000)[0] == 200
    assert client.request("POST", "/pids/100", uid=3000)[0] == 403
    assert backend.maps == {}


def test_cross_site_and_rebound_control_is_refused(setup):
    client, backend, _, _ = setup
    cases = {
        "HTTP_ORIGIN": ("http://evil.example", "cross-origin control request refused: Origin 'http://evil.example'"),
        "HTTP_SEC_FETCH_SITE": ("cross-site", "cross-site control request refused: Sec-Fetch-Site is 'cross-site'"),
        "HTTP_HOST": ("rebind.evil.example:9867", "Host 'rebind.evil.example:9867' is not this server"),
    }
    for header, (value, message) in cases.items():
        status, _, body = client.request("POST", "/pids/100", headers={header: value})
        assert status == 403
        assert json.loads(body)["error"].startswith(message)
    assert backend.maps == {}
    ok = {"HTTP_HOST": "localhost:9867", "HTTP_ORIGIN": "http://localhost:9867", "HTTP_SEC_FETCH_SITE": "same-origin"}
    assert client.request("POST", "/pids/100", headers=ok)[0] == 201
    assert client.request("DELETE", "/pids/100", headers={"HTTP_HOST": "127.0.0.1:9867"})[0] == 200
    # Scrapes are not control: a page may read them as before.
    assert client.request("GET", "/tracer", headers={"HTTP_ORIGIN": "http://evil.example"})[0] == 200
    client.app.allowed_hosts = ("tracer.example",)
    assert client.request("POST", "/pids/100", headers={"HTTP_HOST": "tracer.example:9867"})[0] == 201


def test_without_control_the_routes_do_not_exist(setup):
    client, backend, _, _ = setup
    client.app.control = False
    for method in ("POST", "DELETE", "GET"):
        status, _, body = client.request(method, "/pids/100")
        assert (status, json.loads(body)) == (404, {"error": "no such route: /pids/100"})
    assert backend.maps == {}
    assert client.request("GET", "/pids")[0] == 200


def test_client_allowed():
    nets = parse_networks(["127.0.0.0/8", "::1/128"])
    assert client_allowed("127.0.0.5", nets)
    assert client_allowed("::ffff:127.0.0.1", nets)
    assert not client_allowed("192.0.2.1", nets)
    assert not client_allowed("garbage", nets)


def test_wrong_method_405_with_allow(setup):
    client, _, _, _ = setup
    status, headers, _ = client.request("GET", "/pids/100")
    assert (status, headers["Allow"]) == (405, "POST, DELETE")
    status, headers, _ = client.request("POST", "/tracer")
    assert (status, headers["Allow"]) == (405, "GET, HEAD")
    assert client.request("PUT", "/metrics")[0] == 405


def test_unknown_paths_404(setup):
    client, _, _, _ = setup
    assert client.request("POST", "/pids/../metrics")[0] == 404
    assert client.request("GET", "/nope")[0] == 404


def test_tracer_table_and_pids(setup):
    client, backend, _, _ = setup
    client.request("POST", "/pids/200")
    client.request("POST", "/pids/100")
    backend.maps[100] = Counts(1, 2, 3, 4, 5, 6, 7, 8, 9)
    status, headers, body = client.request("GET", "/tracer")
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain")
    lines = body.decode().splitlines()
    assert lines[0].split() == TRACER_HEADER
    assert [line.split() for line in lines[1:]] == [
        ["100", "1", "3", "2", "4", "5", "6", "7", "8", "9"],
        ["200", "0", "0", "0", "0", "0", "0", "0", "0", "0"],
    ]
    doc = json.loads(client.request("GET", "/pids")[2])
    assert [(d["pid"], d["comm"], d["counters"]["kfree_bytes"]) for d in doc] == [(100, "alpha", 4), (200, "beta", 0)]


def test_health_and_ready(setup):
    client, _, _, problems = setup
    assert client.request("GET", "/-/healthy")[0] == 200
    assert client.request("GET", "/-/ready")[0] == 200
    problems.append("compiling")
    status, _, body = client.request("GET", "/-/ready")
    assert (status, b"compiling" in body) == (503, True)


def test_metrics(setup):
    client, backend, registry, _ = setup
    client.request("POST", "/pids/100")
    backend.maps[100] = Counts(1, 2, 3, 4, 5, 6, 7, 8, 9)
    labels = {"pid": "100", "comm": "alpha", "parent_pid": ""}
    expected = {
        "tracer_kmalloc_calls_total": 1,
        "tracer_kmalloc_bytes_total": 2,
        "tracer_kfree_calls_total": 3,
        "tracer_kfree_bytes_total": 4,
        "tracer_schedule_calls_total": 5,
        "tracer_up_calls_total": 6,
        "tracer_down_interruptible_calls_total": 7,
        "tracer_mutex_lock_calls_total": 8,
        "tracer_mutex_unlock_calls_total": 9,
    }
    for name, value in expected.items():
        assert registry.get_sample_value(name, labels) == value, name
    assert registry.get_sample_value("tracer_tracked_processes") == 1
    assert registry.get_sample_value("tracer_probe_attached", {"function": "kmalloc", "symbol": "__kmalloc"}) == 1
    assert registry.get_sample_value("tracer_probe_attached", {"function": "up", "symbol": "up"}) == 0
    assert registry.get_sample_value("tracer_probe_missed_total", {"function": "kmalloc"}) == 4
    assert registry.get_sample_value("tracer_kprobe_missed_total", {"function": "kmalloc"}) == 11
    assert registry.get_sample_value("tracer_probe_skipped_total", {"function": "schedule"}) == 3
    assert registry.get_sample_value("tracer_probe_skipped_total", {"function": "sched_process_exit"}) == 0
    assert registry.get_sample_value("tracer_alloc_map_entries") == 7
    assert registry.get_sample_value("tracer_alloc_map_insert_failures_total") == 1
    assert registry.get_sample_value("tracer_build_info", {"version": "9.9", "kernel": "6.1.0-test"}) == 1
    # The process leaves: so do its series.
    del backend.maps[100]
    assert registry.get_sample_value("tracer_kmalloc_calls_total", labels) is None


def test_metrics_route_negotiates_openmetrics(setup):
    client, _, _, _ = setup
    status, headers, body = client.request("GET", "/metrics")
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain")
    assert b"# TYPE tracer_kmalloc_calls_total counter" in body
    status, headers, body = client.request(
        "GET", "/metrics", headers={"HTTP_ACCEPT": "application/openmetrics-text; version=1.0.0"}
    )
    assert headers["Content-Type"].startswith("application/openmetrics-text")
    assert body.endswith(b"# EOF\n")


def test_a_failing_part_does_not_take_metrics_down():
    def broken():
        raise OSError("map read failed")

    registry = CollectorRegistry()
    registry.register(TracerCollector(broken, lambda: Health(alloc_entries=3), "1", "k"))
    assert registry.get_sample_value("tracer_alloc_map_entries") == 3
    assert registry.get_sample_value("tracer_scrape_errors_total", {"part": "processes"}) >= 1


def test_follow_forks_query(setup):
    client, backend, registry, _ = setup
    assert client.request("POST", "/pids/100?follow_forks=1")[0] == 201
    backend.fork(100, 150, "alpha")
    assert (
        registry.get_sample_value("tracer_kfree_calls_total", {"pid": "150", "comm": "alpha", "parent_pid": "100"}) == 0
    )
    status, _, body = client.request("POST", "/pids/200?follow_forks=maybe")
    assert status == 400
    assert "follow_forks" in json.loads(body)["error"]
    assert 200 not in backend.maps


class CountingInput(io.BytesIO):
    """A request body that records how much of it the app read."""

    def __init__(self, size: int) -> None:
        super().__init__(b"x" * size)
        self.consumed = 0

    def read(self, n: int = -1) -> bytes:
        data = super().read(n)
        self.consumed += len(data)
        return data


def test_a_large_body_gets_413_and_is_read_so_the_client_sees_it(setup):
    client, backend, _, _ = setup
    body = CountingInput(5 * 1024 * 1024)
    headers = {"CONTENT_LENGTH": str(5 * 1024 * 1024), "wsgi.input": body}
    status, _, reply = client.request("POST", "/pids/100", headers=headers)
    assert status == 413
    assert "5242880 bytes refused" in json.loads(reply)["error"]
    # Only the first 256 KiB are read: past them the server closes the connection.
    assert body.consumed == 256 * 1024
    assert backend.maps == {}
    # Still serving, nothing changed.
    assert client.request("POST", "/pids/100")[0] == 201


def test_a_small_body_is_ignored(setup):
    client, backend, _, _ = setup
    headers = {"CONTENT_LENGTH": "2", "wsgi.input": io.BytesIO(b"{}")}
    assert client.request("POST", "/pids/100", headers=headers)[0] == 201
    assert 100 in backend.maps


@pytest.mark.parametrize(
    ("headers", "status"),
    [({"CONTENT_LENGTH": "-5"}, 400), ({"CONTENT_LENGTH": "1e3"}, 400), ({"HTTP_TRANSFER_ENCODING": "chunked"}, 411)],
)
def test_unusable_body_framing_is_refused(setup, headers, status):
    client, backend, _, _ = setup
    got, _, reply = client.request("POST", "/pids/100", headers=headers)
    assert got == status
    assert json.loads(reply)["error"]
    assert backend.maps == {}


def test_a_body_past_the_drain_limit_is_not_read_to_the_end(setup, monkeypatch):
    import tracer_exporter.web.routes as web

    monkeypatch.setattr(web, "DRAIN_BYTES", 1024 * 1024)
    client, _, _, _ = setup
    body = CountingInput(3 * 1024 * 1024)
    headers = {"CONTENT_LENGTH": str(3 * 1024 * 1024), "wsgi.input": body}
    assert client.request("GET", "/tracer", headers=headers)[0] == 413
    assert body.consumed == 1024 * 1024


def test_telemetry_path_moves_the_metrics(setup):
    _, _, registry, problems = setup
    tracker = Tracker(FakeProcesses(proc(100, "alpha")))
    client = Client(App(tracker, registry, lambda: problems, metrics_path="/x/prom"))
    status, _, body = client.request("GET", "/x/prom")
    assert status == 200
    assert b"# TYPE tracer_kmalloc_calls_total counter" in body
    assert client.request("GET", "/metrics")[0] == 404
    # The landing page links to where the metrics are.
    assert b'<li><a href="x/prom">/x/prom</a>: Prometheus metrics</li>' in client.request("GET", "/")[2]


@pytest.mark.parametrize(
    ("path", "why"),
    [
        ("metrics", "expected an absolute path such as /metrics"),
        ("//host/metrics", "expected an absolute path such as /metrics"),
        ("/m?x=1", "expected an absolute path such as /metrics"),
        ("/tracer", "that path is already a route of its own"),
        ("/pids/1", "that path is already a route of its own"),
        ("/", "that path is already a route of its own"),
    ],
)
def test_telemetry_path_refused(path, why):
    from tracer_exporter.web.routes import check_telemetry_path

    with pytest.raises(ValueError) as e:
        check_telemetry_path(path)
    assert str(e.value) == f"--web.telemetry-path {path!r}: {why}"


def test_the_probe_mode_is_an_info_gauge():
    from prometheus_client import generate_latest

    from tracer_exporter.model.health import ProbeMode

    def text(health: Health) -> str:
        registry = CollectorRegistry()
        registry.register(TracerCollector(lambda: [], lambda: health, "1", "k", processes=False))
        return generate_latest(registry).decode()

    fell_back = Health(mode=ProbeMode("kprobe", "fentry", "the kernel preempts BPF programs (preemption model full)"))
    assert (
        'tracer_probe_mode_info{mode="kprobe",reason="the kernel preempts BPF programs (preemption model full)",'
        'requested="fentry"} 1.0'
    ) in text(fell_back)
    assert 'tracer_probe_mode_info{mode="fentry",reason="",requested="fentry"} 1.0' in text(
        Health(mode=ProbeMode("fentry", "fentry"))
    )
    # Before the probes load there is no mode yet: the family, no sample.
    empty = text(Health())
    assert "# TYPE tracer_probe_mode_info gauge" in empty and "tracer_probe_mode_info{" not in empty


def test_tracer_by_group_puts_the_group_first_and_a_bad_by_is_400(setup):
    client, backend, _, _ = setup
    client.request("POST", "/pids/100")
    status, _, body = client.request("GET", "/tracer?by=group")
    assert status == 200
    lines = body.decode().splitlines()
    assert lines[0].split() == ["GROUP", *TRACER_HEADER]
    assert lines[1].split()[:2] == ["-", "100"]
    status, _, body = client.request("GET", "/tracer?by=colour")
    assert status == 400 and b"by must be pid or group" in body
