"""Faults and bad input against a real kernel: the exporter says what is
wrong, keeps serving, and loses nothing."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import Exporter, bcc_events

pytestmark = pytest.mark.guest

UP, DOWN, LOCK, UNLOCK = 5, 6, 7, 8


def test_a_missing_symbol_leaves_the_rest_working(tmp_path, workload):
    config = tmp_path / "c.yaml"
    config.write_text("probes:\n  symbols:\n    up: [no_such_symbol_here]\n")
    exp = Exporter("--config.file", str(config), log_name="missing-symbol")
    try:
        deadline = time.monotonic() + 300
        while "attached" not in exp.log() and time.monotonic() < deadline:
            assert exp.proc.poll() is None, exp.log()
            time.sleep(0.5)
        time.sleep(1)
        status, body = exp.request("GET", "/-/ready")
        assert status == 503
        assert b"no_such_symbol_here" in body
        m = exp.metrics()
        attached = {dict(k)["function"]: v for (name, k), v in m.items() if name == "tracer_probe_attached"}
        assert attached["up"] == 0 and attached["down_interruptible"] == 1 and attached["mutex_lock"] == 1
        assert m[("tracer_probe_attached", frozenset({("function", "up"), ("symbol", "no_such_symbol_here")}))] == 0
        # Still tracking, still exact for what is attached.
        pid = workload.spawn("updown:9 mutex:4")
        exp.track(pid)
        workload.start(pid)
        workload.wait(pid, 30000)
        row = exp.tracer()[pid]
        assert (row[UP], row[DOWN], row[LOCK], row[UNLOCK]) == (0, 9, 4, 4)
        workload.stop(pid)
    finally:
        assert exp.stop() == 0


def test_a_program_that_does_not_compile_is_one_clear_error(tmp_path):
    broken = tmp_path / "broken.bpf.c"
    broken.write_text("int kfree_enter(struct pt_regs *ctx) { return undefined_thing; }\n")
    env = dict(os.environ, TRACER_EXPORTER_BPF_SOURCE=str(broken))
    out = subprocess.run(
        ["tracer-exporter", "--web.listen-address", "127.0.0.1:0"], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 1
    assert f"compiling {broken} failed" in out.stderr
    assert bcc_events(0) == []


def test_bad_pids(exporter):
    zombie = subprocess.Popen([sys.executable, "-c", "import os; os.fork() or os._exit(0); os.kill(os.getpid(), 19)"])
    # A thread that is not its process's leader.
    threaded = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import threading, time; threading.Thread(target=time.sleep, args=(60,)).start(); time.sleep(60)",
        ]
    )
    try:
        time.sleep(2)
        kids = Path(f"/proc/{zombie.pid}/task/{zombie.pid}/children").read_text().split()
        assert len(kids) == 1 and Path(f"/proc/{kids[0]}/stat").read_text().split(") ")[1][0] == "Z"
        status, body = exporter.request("POST", f"/pids/{kids[0]}")
        assert status == 404 and b"no process" in body
        tids = sorted(int(t) for t in os.listdir(f"/proc/{threaded.pid}/task"))
        other = next(t for t in tids if t != threaded.pid)
        status, body = exporter.request("POST", f"/pids/{other}")
        assert status == 400
        assert f"is a thread of process {threaded.pid}".encode() in body
        for bad in ("abc", "-1", "0", "1e3", "2147483648", "99999999999999999999"):
            assert exporter.request("POST", f"/pids/{bad}")[0] == 400, bad
        assert exporter.request("POST", "/pids/")[0] == 400
        assert exporter.request("GET", "/pids/../metrics")[0] == 404
        assert exporter.request("PUT", f"/pids/{threaded.pid}")[0] == 405
        assert exporter.request("GET", "/-/ready")[0] == 200  # still serving
        assert threaded.pid not in exporter.tracer()
    finally:
        for p in (zombie, threaded):
            p.kill()
            p.wait(10)


def test_a_reused_pid_is_not_counted(exporter, workload):
    first = workload.spawn("mutex:1")
    exporter.track(first)
    workload.stop(first)  # exits before it ever ran
    assert first not in exporter.tracer()
    # Hand the same number to a new process.
    Path("/proc/sys/kernel/ns_last_pid").write_text(str(first - 1))
    second = workload.spawn("mutex:30")
    try:
        if second != first:
            pytest.skip(f"pid {first} was taken by another process meanwhile")
        workload.start(second)
        workload.wait(second, 30000)
        assert second not in exporter.tracer()
    finally:
        workload.stop(second)
