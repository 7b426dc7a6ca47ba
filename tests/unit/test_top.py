"""`tracer-exporter top`: rates, rendering, sorting and a real HTTP round trip, on the host."""

from __future__ import annotations

import http.server
import io
import json
import threading
from pathlib import Path

import pytest

from tracer_exporter.cli import top
from tracer_exporter.cli.top import Snapshot, View

METRICS = """# HELP tracer_exporter_build_info x
# TYPE tracer_exporter_build_info gauge
tracer_exporter_build_info{pythonversion="3.11.2",revision="abc",version="0.1.0"} 1.0
tracer_kernel_info{release="6.1.0-57-amd64"} 1.0
tracer_probe_mode_info{mode="fentry",reason="",requested="fentry"} 1.0
tracer_probe_missed_total{function="kmalloc"} 0.0
tracer_kprobe_missed_total{function="kmalloc"} 2.0
tracer_probe_skipped_total{function="kfree"} 3.0
tracer_probe_skipped_total{function="schedule"} 4.0
"""


def counters(**values: int) -> dict[str, int]:
    return {key: values.get(key, 0) for _, key in top.COLUMNS}


def pids(*rows: tuple[int, str, dict[str, int]]) -> bytes:
    return json.dumps([{"pid": p, "comm": c, "counters": v} for p, c, v in rows]).encode()


def test_the_header_facts_come_from_the_exposition():
    info, lost = top.parse_metrics(METRICS)
    assert info == {"version": "0.1.0", "kernel": "6.1.0-57-amd64", "mode": "fentry"}
    assert lost == {"missed": 0.0, "kprobe_missed": 2.0, "skipped": 7.0}


def test_rates_are_per_second_and_none_without_an_earlier_value():
    prev = Snapshot(10.0, {1: ("a", counters(kmalloc_calls=100)), 2: ("b", counters(up_calls=50))})
    cur = Snapshot(
        12.0,
        {
            1: ("a", counters(kmalloc_calls=300)),
            2: ("c", counters(up_calls=10)),  # another process now: its pid was reused
            3: ("d", counters(kfree_calls=8)),  # new since the last snapshot
        },
    )
    r = top.rates(prev, cur)
    assert r[1]["kmalloc"] == 100.0 and r[1]["up"] == 0.0
    assert r[2]["up"] is None and r[3]["kfree"] is None
    assert all(v is None for v in top.rates(None, cur)[1].values())


def snapshots() -> tuple[Snapshot, Snapshot]:
    info, lost = top.parse_metrics(METRICS)
    prev = Snapshot(0.0, {7: ("sshd", counters()), 42: ("postgres", counters()), 9: ("nginx", counters())}, info, lost)
    cur = Snapshot(
        1.0,
        {
            7: ("sshd", counters(kmalloc_calls=5, up_calls=900)),
            42: ("postgres", counters(kmalloc_calls=1500, kmalloc_bytes=2_000_000)),
            9: ("nginx", counters(kmalloc_calls=40, up_calls=3)),
        },
        info,
        lost,
    )
    return prev, cur


def test_the_once_view_is_this_text():
    prev, cur = snapshots()
    lines = top.render(cur, prev, View(), 400, 100, "http://127.0.0.1:9867")
    assert lines[0] == "tracer-exporter 0.1.0  kernel 6.1.0-57-amd64  mode fentry  3 tracked  http://127.0.0.1:9867"
    assert lines[1] == "missed 0  kernel kprobe missed 2  skipped 7"
    header = ["PID", "COMM", "kmallocv", "kfree", "kmalloc_mem", "kfree_mem", "sched", "up", "down", "lock", "unlock"]
    assert lines[2].split() == header
    assert lines[3].split() == ["/s", "total"] * 9
    assert [line.split()[:4] for line in lines[4:]] == [
        ["42", "postgres", "1.5k", "1.5k"],
        ["9", "nginx", "40", "40"],
        ["7", "sshd", "5", "5"],
    ]
    assert lines[4].split()[6:8] == ["2.0M", "2.0M"]  # kmalloc bytes: rate and total


def test_sorting_by_another_column_reorders_and_the_width_clips():
    prev, cur = snapshots()
    view = View(sort="up")
    assert [line.split()[0] for line in top.render(cur, prev, view, 400, 100, "u")[4:]] == ["7", "9", "42"]
    view.cycle_sort(1)
    assert view.sort == "down"
    view = View(sort="pid", descending=False)
    assert [line.split()[0] for line in top.render(cur, prev, view, 400, 100, "u")[4:]] == ["7", "9", "42"]
    assert all(len(line) <= 50 for line in top.render(cur, prev, view, 50, 100, "u"))
    assert len(top.render(cur, prev, view, 400, 4, "u")) == 4


def test_the_filter_and_a_loss_are_shown():
    prev, cur = snapshots()
    cur.lost["missed"] = 3.0
    lines = top.render(cur, prev, View(comm_filter="GIN"), 400, 100, "u")
    assert lines[1].endswith("NOT EXACT: tracked calls were lost")
    assert lines[2] == "filter: comm contains 'GIN'"
    assert [line.split()[1] for line in lines[5:]] == ["nginx"]


def test_fetch_errors_are_one_line():
    import urllib.error

    e401 = urllib.error.HTTPError("u", 401, "Unauthorized", {}, None)  # type: ignore[arg-type]
    assert top.fetch_error("u", e401).startswith("u: 401 Unauthorized: give --user")
    e503 = urllib.error.HTTPError("u", 503, "Service Unavailable", {}, None)  # type: ignore[arg-type]
    assert top.fetch_error("u", e503) == "u: HTTP 503 Service Unavailable; retrying"
    refused = urllib.error.URLError(ConnectionRefusedError(111, "Connection refused"))
    assert top.fetch_error("u", refused) == "u: cannot connect: [Errno 111] Connection refused; retrying"


class Exporter(http.server.BaseHTTPRequestHandler):
    """A stand-in exporter: /pids and /metrics, behind basic auth (alice:pw)."""

    calls = 0

    def do_GET(self) -> None:
        if self.headers.get("Authorization") != "Basic YWxpY2U6cHc=":
            self.send_response(401)
            self.end_headers()
            return
        if self.path == "/pids":
            Exporter.calls += 1
            body = pids((5, "worker", counters(kmalloc_calls=10 * Exporter.calls, lock_calls=4)))
        else:
            body = METRICS.encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Exporter)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def test_once_over_http_with_basic_auth(server, tmp_path: Path, capsys):
    secret = tmp_path / "pw"
    secret.write_text("pw\n")
    args = top.parse_args(["--url", server, "--user", "alice", "--password-file", str(secret), "--interval", "0.2"])
    out = io.StringIO()
    assert top.once(top.build_client(args), View(), args.interval, out) == 0
    (row,) = [line for line in out.getvalue().splitlines() if line.split()[:2] == ["5", "worker"]]
    rate, total = row.split()[2:4]
    assert float(total) > 0 and float(rate.rstrip("k")) > 0  # 10 more calls in about 0.2 s


def test_once_without_auth_is_a_clear_error_and_exit_1(server, capsys):
    args = top.parse_args(["--url", server, "--interval", "0.1"])
    assert top.once(top.build_client(args), View(), args.interval, io.StringIO()) == 1
    assert capsys.readouterr().err.startswith(f"tracer-exporter top: {server}: 401 Unauthorized")


def test_a_web_configs_client_section_gives_the_credentials(server, tmp_path: Path):
    web = tmp_path / "web.yml"
    web.write_text("client:\n  basic_auth:\n    username: alice\n    password: pw\n")
    args = top.parse_args(["--url", server, "--web.config.file", str(web), "--interval", "0.1"])
    assert top.once(top.build_client(args), View(), args.interval, io.StringIO()) == 0


def test_bad_flags_are_refused():
    with pytest.raises(SystemExit):
        top.parse_args(["--interval", "0"])
    with pytest.raises(SystemExit):
        top.parse_args(["--sort", "bogus"])


GROUP_METRICS = (
    METRICS
    + """tracer_group_kmalloc_calls_total{group="web"} 40.0
tracer_group_up_calls_total{group="web"} 7.0
tracer_group_kmalloc_calls_total{group="api"} 5.0
tracer_group_processes{group="web"} 2.0
"""
)


def test_by_group_rows_come_from_the_group_counters():
    groups = top.parse_groups(GROUP_METRICS)
    assert groups["web"]["kmalloc_calls"] == 40 and groups["web"]["up_calls"] == 7 and groups["web"]["lock_calls"] == 0
    assert set(groups) == {"web", "api"}
    info, lost = top.parse_metrics(GROUP_METRICS)
    prev = Snapshot(0.0, {1: ("api", counters()), 2: ("web", counters())}, info, lost)
    cur = Snapshot(2.0, {1: ("api", groups["api"]), 2: ("web", groups["web"])}, info, lost)
    lines = top.render(cur, prev, View(by="group"), 400, 100, "u")
    assert "2 groups" in lines[0]
    assert lines[2].split()[:2] == ["GROUP", "kmallocv"]
    assert [line.split()[:3] for line in lines[4:]] == [["web", "20", "40"], ["api", "2.5", "5"]]
