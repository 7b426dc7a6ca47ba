"""How a scrape's cost grows from 1,000 to 10,000 tracked processes, and that
an idle exporter uses no CPU at all.

Ratios in one boot only: an absolute time depends on what else the host runs
(a cold CI run builds a kernel beside the guests); `make bench` reports the
exporter's CPU and wall time per scrape (bench/footprint.py).

The processes are real: children of a small spawner (tests/guest/spawner.c)
that the kernel tracks on fork because the spawner is followed. They sleep,
so after the first scrape (which formats every line) a scrape reuses their
lines: the targets are on those; the first one's time is printed.
"""

from __future__ import annotations

import contextlib
import statistics
import subprocess
import time
from pathlib import Path

import pytest
from conftest import Exporter, Lines

pytestmark = pytest.mark.guest

HERE = Path(__file__).resolve().parent
SIZES = (100, 1000, 10000)
SCRAPES = 3  # per route and size; the median counts
# Linear growth: ten times the processes may cost at most this many times more.
GROWTH_LIMIT = 12.0
IDLE_S = 5.0


def cpu_ns(pid: int) -> int:
    """Time on CPU of every thread of pid, in ns (schedstat, not tick-sampled)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        # A thread that ended meanwhile (a request's): its time is not in an idle window.
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            total += int((task / "schedstat").read_text().split()[0])
    return total


def timed(exporter: Exporter, path: str, expect_rows: int) -> tuple[float, float]:
    """(first scrape, median of the next ones): the first formats every new
    process's lines; later ones reuse those of processes that did not change."""
    times = []
    for _ in range(1 + SCRAPES):
        started = time.perf_counter()
        status, body = exporter.request("GET", path)
        times.append(time.perf_counter() - started)
        assert status == 200
    if path == "/tracer":
        assert len(body.splitlines()) == 1 + expect_rows
    else:
        assert body.count(b"\ntracer_kmalloc_calls_total{") == expect_rows
    return times[0], statistics.median(times[1:])


@pytest.fixture(scope="module")
def spawner(tmp_path_factory):
    exe = tmp_path_factory.mktemp("spawner") / "spawner"
    subprocess.run(["gcc", "-O2", "-o", str(exe), str(HERE / "spawner.c")], check=True, timeout=300)
    proc = subprocess.Popen([str(exe)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        yield proc, Lines(proc, timeout=600)
    finally:
        proc.kill()
        proc.wait(30)


def test_scrape_cost_grows_linearly(spawner, capsys):
    proc, out = spawner
    exp = Exporter(log_name="scrape")
    try:
        exp.wait_ready()
        assert exp.request("POST", f"/pids/{proc.pid}?follow_forks=1")[0] == 201
        results: dict[int, tuple[tuple[float, float], tuple[float, float]]] = {}
        have = 0
        for size in SIZES:
            out.say(str(size - have))
            have = size
            assert out.next() == f"ok {size}"
            rows = size + 1  # the children and the spawner
            results[size] = (timed(exp, "/metrics", rows), timed(exp, "/tracer", rows))
        # Idle: no polling loop, so no thread of the exporter runs at all, once the work the
        # new children brought is done (the state writer reads their start times).
        settle_deadline = time.monotonic() + 180
        last = cpu_ns(exp.proc.pid)
        while time.monotonic() < settle_deadline:
            time.sleep(1.0)
            now = cpu_ns(exp.proc.pid)
            if now == last:
                break
            last = now
        before = cpu_ns(exp.proc.pid)
        time.sleep(IDLE_S)
        idle = cpu_ns(exp.proc.pid) - before
    finally:
        code = exp.stop()
    with capsys.disabled():
        for size, (metrics, tracer) in results.items():
            print(
                f"\nscrape with {size} processes (first, then median of {SCRAPES}): "
                f"/metrics {metrics[0] * 1000:.0f}, {metrics[1] * 1000:.0f} ms; "
                f"/tracer {tracer[0] * 1000:.0f}, {tracer[1] * 1000:.0f} ms"
            )
        print(f"exporter CPU over {IDLE_S:.0f} s idle: {idle} ns")
    assert code == 0
    for i, route in enumerate(("/metrics", "/tracer")):
        small, big = results[1000][i][1], results[10000][i][1]
        assert big <= GROWTH_LIMIT * small, f"{route}: {big:.3f} s at 10,000 vs {small:.3f} s at 1,000"
    assert idle == 0
