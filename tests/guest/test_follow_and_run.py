"""Fork-following and `tracer-exporter run`, against a real kernel.

up()/down_interruptible() are made only by the workload module here, so
their counts are exact per process; the total row must be the exact sum of
the rows for every column.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from conftest import TRACER_HEADER, Exporter, Lines, free_port

pytestmark = pytest.mark.guest

UP, DOWN = 5, 6  # positions in a /tracer row after the pid

# python3 -c DRIVE N: one `run updown:N` through the workload module.
DRIVE = "import os, sys; os.write(os.open('/dev/tracer_workload', os.O_RDWR), b'run updown:' + sys.argv[1].encode())"


def run_cmd(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["tracer-exporter", "run", *args], capture_output=True, text=True, timeout=timeout)


def test_run_reports_exact_numbers_and_the_status_of_a_killed_command(workload, tmp_path):
    """One run (one compile): CMD drives the module 37 times, then SIGTERM kills it."""
    result = tmp_path / "result.json"
    drive_then_die = DRIVE + "; import signal; os.kill(os.getpid(), signal.SIGTERM)"
    out = run_cmd("--format", "json", "--output", str(result), "--", sys.executable, "-c", drive_then_die, "37")
    assert out.returncode == 128 + signal.SIGTERM, out.stderr
    assert out.stdout == ""
    doc = json.loads(result.read_text())
    assert doc["exit_status"] == 128 + signal.SIGTERM
    (proc,) = doc["processes"]
    assert proc["comm"] == "python3"
    assert (proc["counters"]["up_calls"], proc["counters"]["down_calls"]) == (37, 37)
    assert proc["counters"]["kmalloc_calls"] > 0  # exec and start-up allocate: counted from the start


def test_run_table_follows_forks_with_exact_rows_and_total(workload):
    script = f'for n in 11 22 33; do {sys.executable} -c "{DRIVE}" $n; done; exit 3'
    out = run_cmd("--follow-forks", "--", "sh", "-c", script)
    assert out.returncode == 3, out.stderr  # CMD's own status
    lines = out.stdout.splitlines()
    assert lines[0].split() == TRACER_HEADER
    rows = [[int(c) for c in line.split()] for line in lines[1:-1]]
    assert lines[-1].split()[0] == "total"
    totals = [int(c) for c in lines[-1].split()[1:]]
    assert totals == [sum(r[i] for r in rows) for i in range(1, 10)]
    # One row for sh and one for each child; only the children drive the module.
    assert len(rows) == 4
    assert sorted(r[1 + UP] for r in rows) == [0, 11, 22, 33]
    assert sorted(r[1 + DOWN] for r in rows) == [0, 11, 22, 33]


def test_run_of_a_missing_command_is_127():
    # A killed command's status: test_run_reports_exact_numbers_and_the_status_of_a_killed_command.
    missing = run_cmd("--", "/nonexistent/cmd")
    assert missing.returncode == 127
    assert "/nonexistent/cmd: No such file or directory" in missing.stderr


def test_run_second_interrupt_exits_130():
    # CMD ignores SIGINT and lets go of our pipes, so only tracer-exporter can end this.
    proc = subprocess.Popen(
        ["tracer-exporter", "run", "--", "sh", "-c", 'trap "" INT; echo started; exec sleep 120 >/dev/null 2>&1'],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    out = Lines(proc, timeout=300)
    try:
        assert out.next() == "started"  # CMD runs: probes attached
        proc.send_signal(signal.SIGINT)  # forwarded; CMD ignores it
        time.sleep(1)
        assert proc.poll() is None
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 130
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the sleep left behind
        proc.wait(10)
    assert "interrupted twice" in proc.stderr.read()


# Drives the module, says so, and exits when its stdin closes.
DRIVE_AND_WAIT = DRIVE + "; print('driven', flush=True); sys.stdin.read()"


def test_run_listen_serves_behind_the_web_config(tmp_path, workload):
    import base64
    import http.client

    import bcrypt

    web = tmp_path / "web.yml"
    hashed = bcrypt.hashpw(b"s3cret", bcrypt.gensalt(4)).decode()
    web.write_text(f"basic_auth_users:\n  alice: '{hashed}'\n")
    port = free_port()
    proc = subprocess.Popen(
        ["tracer-exporter", "run", "--listen", f"127.0.0.1:{port}", "--web.config.file", str(web), "--format", "json",
         "--", sys.executable, "-c", DRIVE_AND_WAIT, "23"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    out = Lines(proc, timeout=300)

    def get(path: str, auth: bytes | None, method: str = "GET") -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        try:
            headers = {"Authorization": "Basic " + base64.b64encode(auth).decode()} if auth else {}
            conn.request(method, path, headers=headers)
            r = conn.getresponse()
            return r.status, r.read()
        finally:
            conn.close()

    try:
        assert out.next() == "driven"
        assert get("/tracer", None)[0] == 401
        assert get("/tracer", b"alice:wrong")[0] == 401
        status, body = get("/tracer", b"alice:s3cret")
        assert status == 200
        (row,) = [line.split() for line in body.decode().splitlines()[1:]]
        assert (int(row[1 + UP]), int(row[1 + DOWN])) == (23, 23)
        # Read-only whatever the auth: root, authenticated, over loopback finds no control route.
        pid = int(row[0])
        for method in ("POST", "DELETE"):
            status, body = get(f"/pids/{pid}", b"alice:s3cret", method)
            assert (status, json.loads(body)) == (404, {"error": f"no such route: /pids/{pid}"})
        assert get(f"/pids/{os.getpid()}", b"alice:s3cret", "POST")[0] == 404
        assert proc.stdin is not None
        proc.stdin.close()
        assert proc.wait(60) == 0, proc.stderr.read() if proc.stderr else ""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    rest = []
    while (line := out.next()) != "<EOF>":
        rest.append(line)
    (final,) = json.loads("\n".join(rest))["processes"]
    assert (final["counters"]["up_calls"], final["counters"]["down_calls"]) == (23, 23)


def test_run_refuses_a_bad_web_config_before_cmd_starts(tmp_path):
    marker = tmp_path / "ran"
    out = run_cmd(
        "--listen", "127.0.0.1:0", "--web.config.file", str(tmp_path / "none.yml"), "--", "touch", str(marker)
    )
    assert out.returncode == 2
    assert f"web config {tmp_path / 'none.yml'}: No such file or directory" in out.stderr
    assert not marker.exists()


# A parent that forks N children; child i makes 100+i up/down pairs, says so,
# then waits for its own pipe to close before exiting. The parent prints
# "forked" once every child has reported.
FORKER = textwrap.dedent(
    """
    import os, sys
    n = int(sys.argv[1])
    sys.stdin.readline()  # tracked now
    ready_r, ready_w = os.pipe()
    pipes = []
    for i in range(n):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                os.close(w)
                for _, other in pipes:  # earlier children's: they must see EOF when the parent closes them
                    os.close(other)
                fd = os.open("/dev/tracer_workload", os.O_RDWR)  # one job per open file
                os.write(fd, b"run updown:%d" % (100 + i))
                print("child", i, os.getpid(), flush=True)
                os.write(ready_w, b"r")
                os.read(r, 1)
            finally:
                os._exit(0)
        os.close(r)
        pipes.append((pid, w))
    for _ in range(n):
        os.read(ready_r, 1)
    print("forked", flush=True)
    sys.stdin.readline()
    for pid, w in pipes:
        os.close(w)
        os.waitpid(pid, 0)
    print("reaped", flush=True)
    sys.stdin.readline()
    """
)


def start_forker(n: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", FORKER, str(n)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )


def test_follow_forks_through_the_api(exporter, workload):
    parent = start_forker(50)
    out = Lines(parent)
    try:
        assert exporter.request("POST", f"/pids/{parent.pid}?follow_forks=1")[0] == 201
        out.say()
        children = {}
        for _ in range(50):
            word, i, pid = out.next().split()
            assert word == "child"
            children[int(pid)] = int(i)
        assert out.next() == "forked"
        rows = exporter.tracer()
        for pid, i in children.items():
            assert rows[pid][UP] == rows[pid][DOWN] == 100 + i, f"child {i}"
        assert rows[parent.pid][UP] == 0
        series = exporter.metrics()
        for pid in children:
            labels = frozenset({("pid", str(pid)), ("comm", "python3"), ("parent_pid", str(parent.pid))})
            assert series[("tracer_up_calls_total", labels)] == 100 + children[pid]
        out.say()
        assert out.next() == "reaped"
        # Every child row went with its child; the parent stays.
        assert set(exporter.tracer()) & set(children) == set()
        assert parent.pid in exporter.tracer()
        out.say()
        assert parent.wait(30) == 0
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait(10)
    assert parent.pid not in exporter.tracer()


def test_fork_bomb_is_capped_by_the_limit(tmp_path, workload):
    config = tmp_path / "limit.yaml"
    config.write_text("limits: {max_tracked_processes: 10}\n")
    exp = Exporter("--config.file", str(config), log_name="forkbomb")
    parent = start_forker(30)
    out = Lines(parent)
    try:
        exp.wait_ready()
        assert exp.request("POST", f"/pids/{parent.pid}?follow_forks=1")[0] == 201
        out.say()
        for _ in range(30):
            assert out.next().startswith("child")
        assert out.next() == "forked"
        rows = exp.tracer()
        assert len(rows) == 10  # the parent and the first 9 children
        m = exp.metrics()
        assert m[("tracer_follow_dropped_total", frozenset())] == 21
        assert exp.request("GET", "/-/ready")[0] == 200
        assert exp.request("POST", "/pids/1")[0] == 409
        out.say()
        assert out.next() == "reaped"
        assert list(exp.tracer()) == [parent.pid]
        out.say()
        parent.wait(30)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait(10)
        code = exp.stop()
    log = exp.log()
    assert log.count(f"children of pid {parent.pid} are not tracked") == 1, log
    assert code == 0


def test_run_says_when_the_exited_map_was_full_and_exits_3(tmp_path):
    # Four rows fit; eight children and the shell exit one after another.
    config = tmp_path / "c.yaml"
    config.write_text("limits: {max_tracked_processes: 4}\n")
    out = run_cmd(
        "--config.file", str(config), "--follow-forks", "--format", "json", "--",
        "sh", "-c", "for n in 1 2 3 4 5 6 7 8; do /bin/true; done",
    )  # fmt: skip
    assert out.returncode == 3, out.stderr
    doc = json.loads(out.stdout)
    assert (len(doc["processes"]), doc["missing_processes"]) == (4, 5)
    assert "run: 5 processes are missing: they exited while the exited map" in out.stderr
