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


# TRACER_SHARD=I/N (tests/vm/matrix, suite full@I/N): every exact-count test runs, and of
# the others only the modules of part I. Debian 12 and 13 split those between them: they
# test the exporter's own behaviour (HTTP, security, the state file, run, limits), which
# the two kernels do not change; what the kernel does is the exact-count tests' part, and
# those run on every kernel. The parts are balanced by the modules' measured times.
SHARE_OF_MODULE = {
    # About 12 compiles each (an exporter's start, a `run`, a witness): BCC's compile is
    # most of a guest test's time under TCG. The exact-count tests add 3 to each part.
    "test_hardening.py": 1,  # 6
    "test_faults.py": 1,  # 2
    "test_scrape_cost.py": 1,  # 1
    "test_security.py": 2,  # 3
    "test_follow_and_run.py": 2,  # 6
    "test_workload_module.py": 2,  # 1
    # Exact-count tests all but a few checks: whichever part.
    "test_exporter.py": 2,
    "test_fentry.py": 1,
    "test_kernel_accounting.py": 1,
    "test_preemption.py": 2,
    "test_installed.py": 1,
    "test_groups.py": 2,
}


def shard() -> tuple[int, int] | None:
    value = os.environ.get("TRACER_SHARD", "")
    if not value:
        return None
    i, _, n = value.partition("/")
    return int(i), int(n)


def in_shard(item: pytest.Item, part: tuple[int, int]) -> bool:
    i, n = part
    if "exact" in item.keywords:
        return True
    name = item.path.name
    if name not in SHARE_OF_MODULE:
        # A new module: somewhere stable until the table names it.
        return sum(name.encode()) % n + 1 == i
    return (SHARE_OF_MODULE[name] - 1) % n + 1 == i


def uses_fentry_exporter(item: pytest.Item) -> bool:
    callspec = getattr(item, "callspec", None)
    return "fentry_exporter" in getattr(item, "fixturenames", ()) or (
        callspec is not None and callspec.params.get("any_mode") == "fentry"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    part = shard()
    if part is not None:
        deselected = [item for item in items if not in_shard(item, part)]
        if deselected:
            config.hook.pytest_deselected(items=deselected)
            items[:] = [item for item in items if in_shard(item, part)]
    # The tests of the fentry-mode exporter last: it is started once (a compile) and
    # runs beside the kprobe one only for them, not under every other test's counts.
    items[:] = [i for i in items if not uses_fentry_exporter(i)] + [i for i in items if uses_fentry_exporter(i)]
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


def trampolines_expected() -> bool:
    """Kernel BTF and bpf_get_func_arg/ret (5.17): what the fentry mode needs."""
    major, minor = (int(x) for x in os.uname().release.split(".")[:2])
    return (major, minor) >= (5, 17) and Path("/sys/kernel/btf/vmlinux").exists()


def fentry_expected() -> bool:
    """Whether probes.mode fentry runs here rather than falling back to kprobes."""
    return trampolines_expected() and preemption_model() in ("none", "voluntary")


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

    def __init__(self, *args: str, log_name: str = "exporter", exe: str = "tracer-exporter") -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path("/tmp") / f"{log_name}-{self.port}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 (kept open for the process)
        if "--state.file" not in args:
            # Not the default under /var/lib: that is in the image, shared by every boot.
            args = (*args, "--state.file", f"/tmp/state-{self.port}.json")
        cmd = [exe, "--web.listen-address", f"127.0.0.1:{self.port}", "--log.level", "debug", *args]
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


# /tracer columns after PID, and the metric each one is published as.
COLUMNS = (
    ("kmalloc", "tracer_kmalloc_calls_total"),
    ("kfree", "tracer_kfree_calls_total"),
    ("kmalloc_bytes", "tracer_kmalloc_bytes_total"),
    ("kfree_bytes", "tracer_kfree_bytes_total"),
    ("sched", "tracer_schedule_calls_total"),
    ("up", "tracer_up_calls_total"),
    ("down", "tracer_down_interruptible_calls_total"),
    ("lock", "tracer_mutex_lock_calls_total"),
    ("unlock", "tracer_mutex_unlock_calls_total"),
)


def metrics_row(metrics, pid: int, comm: str) -> list[float]:
    """The /metrics samples of a pid's row, in /tracer's column order."""
    labels = frozenset({("pid", str(pid)), ("comm", comm), ("parent_pid", "")})
    return [metrics.get((metric, labels)) for _, metric in COLUMNS]


def row_of(tally) -> list[int]:
    return [getattr(tally, name) for name, _ in COLUMNS]


def run_kthread(exporter: Exporter, workload: Workload, ops: str):
    """Spawn, track, run and wait for a kernel thread; returns (pid, tally)."""
    pid = workload.spawn(ops)
    exporter.track(pid)
    workload.start(pid)
    return pid, workload.wait(pid, 30000)


@pytest.fixture(scope="session")
def workload() -> Workload:
    build_and_load(REPO / "tests" / "workload")
    return Workload()


def alloc_entries(exporter: Exporter) -> float:
    return exporter.metrics()[("tracer_alloc_map_entries", frozenset())]


def missed(exporter: Exporter) -> float:
    m = exporter.metrics()
    return sum(v for (name, _), v in m.items() if name == "tracer_probe_missed_total")


KPROBE_EVENTS = Path("/sys/kernel/tracing/kprobe_events")


def bcc_events(pid: int) -> list[str]:
    """The kprobe events (BCC's return probes) of the BCC process @pid."""
    return [line for line in KPROBE_EVENTS.read_text().splitlines() if f"_bcc_{pid} " in line + " "]


def shared_exporter(*args: str, log_name: str):  # type: ignore[no-untyped-def]
    """An exporter shared by many tests. Its teardown is the SIGTERM check:
    it exits 0 within a minute, and every kprobe event it made is gone."""
    exp = Exporter(*args, log_name=log_name)
    try:
        exp.wait_ready()
        yield exp
    finally:
        code = exp.stop()
        sys.stderr.write(f"--- exporter log ({exp.log_path}) ---\n{exp.log()[-4000:]}\n")
    assert code == 0
    assert bcc_events(exp.proc.pid) == []


@pytest.fixture(scope="session")
def kprobe_exporter(tmp_path_factory):
    """probes.mode kprobe, asked for: the default (auto) picks fentry where it can."""
    config = tmp_path_factory.mktemp("kprobe") / "config.yaml"
    config.write_text("probes:\n  mode: kprobe\n")
    yield from shared_exporter("--config.file", str(config), log_name="kprobe")


@pytest.fixture(scope="session")
def fentry_exporter(tmp_path_factory):
    """Started with probes.mode fentry: trampolines where the kernel allows, else the logged fallback.
    Its tests run last (pytest_collection_modifyitems): the others run with the kprobe-mode exporter alone."""
    config = tmp_path_factory.mktemp("fentry") / "config.yaml"
    config.write_text("probes:\n  mode: fentry\n")
    yield from shared_exporter("--config.file", str(config), log_name="fentry")


@pytest.fixture
def exporter(kprobe_exporter):
    """The shared default exporter: tests that need other settings start their own."""
    return kprobe_exporter


@pytest.fixture(params=["kprobe", "fentry"])
def any_mode(request):
    """The shared exporter of each probe mode; fentry only where it runs (else kprobe mode covers it)."""
    if request.param == "fentry" and not fentry_expected():
        pytest.skip("no fentry on this kernel: it falls back to kprobes, tested in kprobe mode")
    exp = request.getfixturevalue(f"{request.param}_exporter")
    if request.param == "fentry":
        assert "probes.mode fentry: " in exp.log() and "using kprobes" not in exp.log(), exp.log()
    return exp
