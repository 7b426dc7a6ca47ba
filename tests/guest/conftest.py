"""Fixtures for tests that run inside the QEMU guest (see tests/vm/run).

They need root and a kernel with kprobes; on any other machine they skip.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "workload"))

from workload import Workload, build_and_load  # noqa: E402

# The /proc/tracer header, as the contract spells it.
TRACER_HEADER = "PID kmalloc kfree kmalloc_mem kfree_mem sched up down lock unlock".split()  # noqa: SIM905
READY_TIMEOUT = 300.0  # BCC compiles in about 10 s under TCG; allow a slow machine
HTTP_TIMEOUT = 30.0


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    usable = os.geteuid() == 0 and os.path.exists("/sys/kernel/tracing/kprobe_events")
    if usable:
        return
    skip = pytest.mark.skip(reason="needs root and a kprobes kernel: run through tests/vm/run")
    for item in items:
        if "guest" in item.keywords:
            item.add_marker(skip)


PREEMPT = Path("/sys/kernel/debug/sched/preempt")  # guest-fstab mounts debugfs


def preemption_model() -> str:
    """The running model: debugfs on a dynamic kernel, else the build flag in uname -v."""
    if PREEMPT.exists():
        return PREEMPT.read_text().split("(")[1].split(")")[0]
    flags = os.uname().version.split()
    return "rt" if "PREEMPT_RT" in flags else "full" if "PREEMPT" in flags else "voluntary"


@pytest.fixture
def preemptible():
    """The kernel preempting: as it is (7.3), or switched to full for the test (6.1, 6.12)."""
    model = preemption_model()
    if model in ("full", "lazy", "rt"):
        yield model
        return
    if not PREEMPT.exists():
        pytest.skip(f"preemption model {model}, and not a dynamic kernel (bullseye's 5.10)")
    PREEMPT.write_text("full")
    try:
        yield "full"
    finally:
        PREEMPT.write_text(model)
    assert preemption_model() == model


class Lines:
    """A child's stdout read line by line, every read bounded by a timeout."""

    def __init__(self, proc: subprocess.Popen[str], timeout: float = 60.0) -> None:
        self.proc = proc
        self.timeout = timeout
        self._queue: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put("<EOF>")

    def next(self) -> str:
        try:
            return self._queue.get(timeout=self.timeout)
        except queue.Empty:
            raise AssertionError(f"no line from pid {self.proc.pid} within {self.timeout} s") from None

    def say(self, line: str = "go") -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Exporter:
    """A tracer-exporter process under test, and an HTTP client for it."""

    def __init__(self, *args: str, log_name: str = "exporter") -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path("/tmp") / f"{log_name}-{self.port}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 (kept open for the process)
        if "--state.file" not in args:
            # Not the default under /var/lib: that is in the image, shared by every boot.
            args = (*args, "--state.file", f"/tmp/state-{self.port}.json")
        cmd = ["tracer-exporter", "--web.listen-address", f"127.0.0.1:{self.port}", "--log.level", "debug", *args]
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"exporter exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if self.request("GET", "/-/ready")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.5)
        raise AssertionError(f"exporter not ready after {timeout} s:\n{self.log()}")

    def request(self, method: str, path: str) -> tuple[int, bytes]:
        req = urllib.request.Request(self.url + path, method=method)
        try:
            with urllib.request.urlopen(req, timeout=HTTP_TIMEOUT) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def track(self, pid: int) -> None:
        status, body = self.request("POST", f"/pids/{pid}")
        assert status == 201, body

    def tracer(self) -> dict[int, list[int]]:
        """/tracer as pid -> the nine counters, checking the header on the way."""
        status, body = self.request("GET", "/tracer")
        assert status == 200
        lines = body.decode().splitlines()
        assert lines[0].split() == TRACER_HEADER
        rows = {}
        for line in lines[1:]:
            cells = [int(c) for c in line.split()]
            assert len(cells) == 10, line
            rows[cells[0]] = cells[1:]
        return rows

    def metrics(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        from prometheus_client.parser import text_string_to_metric_families

        status, body = self.request("GET", "/metrics")
        assert status == 200
        out = {}
        for family in text_string_to_metric_families(body.decode()):
            for s in family.samples:
                out[(s.name, frozenset(s.labels.items()))] = s.value
        return out

    def pids(self) -> list[dict]:
        status, body = self.request("GET", "/pids")
        assert status == 200
        return json.loads(body)

    def comm(self, pid: int) -> str:
        (entry,) = [e for e in self.pids() if e["pid"] == pid]
        return str(entry["comm"])

    def stop(self, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
                raise AssertionError(f"exporter ignored SIGTERM for {timeout} s:\n{self.log()}") from None
        self._log.close()
        return self.proc.returncode


@pytest.fixture(scope="session")
def workload() -> Workload:
    build_and_load(REPO / "tests" / "workload")
    return Workload()


@pytest.fixture(scope="module")
def exporter():
    exp = Exporter()
    try:
        exp.wait_ready()
        yield exp
    finally:
        code = exp.stop()
        sys.stderr.write(f"--- exporter log ({exp.log_path}) ---\n{exp.log()[-4000:]}\n")
    assert code == 0
