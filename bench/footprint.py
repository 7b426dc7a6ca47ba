#!/usr/bin/env python3
"""The exporter itself, run inside a guest by `make bench`: see bench/README.md.

Starts the real exporter with no config (probes.mode auto, the default), and
measures what an operator sees of it: the time from start to /-/ready, RSS
once ready and after scrapes of 10,000 tracked processes, CPU per scrape at
1,000 and 10,000 processes, and CPU while idle. Writes
bench/results/<kernel>-exporter.md and prints it.
"""

from __future__ import annotations

import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import BinaryIO

REPO = Path(__file__).resolve().parent.parent
SPAWNER_C = REPO / "tests" / "guest" / "spawner.c"
SIZES = (1000, 10000)
SCRAPES = 10  # after the first, which formats every new process's lines
IDLE_S = 10.0
READY_TIMEOUT = 600.0
HTTP_TIMEOUT = 120.0
# The targets of bench/README.md.
RSS_LIMIT_MB = 64


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_ns(pid: int) -> int:
    """Time on CPU of every live thread of pid, in ns (schedstat, not tick-sampled)."""
    return sum(int((t / "schedstat").read_text().split()[0]) for t in Path(f"/proc/{pid}/task").iterdir())


def cpu_s(pid: int) -> float:
    """User and system time of pid, threads that ended included (a connection's thread ends with it)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT) as r:
        return r.read()


def probe_mode(metrics: bytes) -> str:
    for line in metrics.decode().splitlines():
        if line.startswith("tracer_probe_mode_info{") and line.endswith(" 1.0"):
            return line.rsplit(" ", 1)[0]
    return "?"


class Spawner:
    """tests/guest/spawner.c: "N" on stdin adds N sleeping children, "ok TOTAL" answers."""

    def __init__(self, build: Path) -> None:
        exe = build / "spawner"
        subprocess.run(["gcc", "-O2", "-o", str(exe), str(SPAWNER_C)], check=True, timeout=300)
        self.proc = subprocess.Popen([str(exe)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.total = 0

    def grow_to(self, n: int) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"{n - self.total}\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline().strip()
        if line != f"ok {n}":
            raise RuntimeError(f"spawner: expected 'ok {n}', got {line!r}")
        self.total = n

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(30)


def scrape_cpu(pid: int, url: str) -> tuple[float, float, float]:
    """(first scrape's CPU seconds, the mean of the next ones, their median wall seconds).

    CPU from /proc/PID/stat, which counts the connection threads that ended,
    in clock ticks: the next scrapes are timed together, then divided.
    """
    c = cpu_s(pid)
    get(url)
    first = cpu_s(pid) - c
    wall = []
    c = cpu_s(pid)
    for _ in range(SCRAPES):
        t = time.perf_counter()
        get(url)
        wall.append(time.perf_counter() - t)
    return first, (cpu_s(pid) - c) / SCRAPES, statistics.median(wall)


def measure() -> dict:
    with tempfile.TemporaryFile() as log:
        return measure_with(log)


def measure_with(log: BinaryIO) -> dict:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    argv = [sys.executable, "-m", "tracer_exporter", "--web.listen-address", f"127.0.0.1:{port}", "--state.file", ""]
    started = time.monotonic()
    exp = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
    out: dict = {}
    spawner = None
    try:
        while True:
            if exp.poll() is not None or time.monotonic() - started > READY_TIMEOUT:
                log.seek(0)
                raise RuntimeError(f"the exporter did not get ready:\n{log.read().decode(errors='replace')}")
            try:
                if urllib.request.urlopen(base + "/-/ready", timeout=5).status == 200:
                    break
            except OSError:
                pass
            time.sleep(0.1)
        out["ready_s"] = time.monotonic() - started
        out["rss_ready_mb"] = rss_mb(exp.pid)
        out["mode"] = probe_mode(get(base + "/metrics"))
        before = cpu_ns(exp.pid)
        time.sleep(IDLE_S)
        out["idle_cpu_ms"] = (cpu_ns(exp.pid) - before) / 1e6
        with tempfile.TemporaryDirectory() as build:
            spawner = Spawner(Path(build))
            req = urllib.request.Request(f"{base}/pids/{spawner.proc.pid}?follow_forks=1", method="POST")
            urllib.request.urlopen(req, timeout=HTTP_TIMEOUT).read()
            for n in SIZES:
                spawner.grow_to(n)
                out[f"scrape_{n}"] = scrape_cpu(exp.pid, base + "/metrics")
            out["rss_after_mb"] = rss_mb(exp.pid)
    finally:
        if spawner is not None:
            spawner.close()
        exp.send_signal(signal.SIGTERM)
        exp.wait(120)
    return out


def report(m: dict) -> str:
    rss_ok = max(m["rss_ready_mb"], m["rss_after_mb"]) <= RSS_LIMIT_MB
    worst = max(m["rss_ready_mb"], m["rss_after_mb"])
    verdict = "met" if rss_ok else f"missed by {worst - RSS_LIMIT_MB:.0f} MB ({worst:.0f} vs {RSS_LIMIT_MB} MB)"
    lines = [
        f"# The exporter itself: kernel {platform.release()}",
        "",
        f"- started with no config: `{m['mode']}`",
        f"- date: {time.strftime('%Y-%m-%d')}; times are emulated (TCG): compare within this file only",
        "",
        "| measure | value |",
        "|---|---|",
        f"| start to `/-/ready` | {m['ready_s']:.1f} s |",
        f"| RSS once ready | {m['rss_ready_mb']:.1f} MB |",
        f"| RSS after scrapes of 10,000 tracked processes | {m['rss_after_mb']:.1f} MB |",
        f"| CPU while idle, {IDLE_S:.0f} s | {m['idle_cpu_ms']:.1f} ms |",
    ]
    for n in SIZES:
        first, median, wall = m[f"scrape_{n}"]
        lines.append(
            f"| CPU per /metrics scrape, {n:,} processes | {median * 1000:.0f} ms (the first {first * 1000:.0f} ms;"
            f" wall {wall * 1000:.0f} ms) |"
        )
    lines += ["", f"Target: RSS at most {RSS_LIMIT_MB} MB: {verdict}.", ""]
    return "\n".join(lines)


def main() -> int:
    text = report(measure())
    out = REPO / "bench" / "results" / f"{platform.release()}-exporter.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
