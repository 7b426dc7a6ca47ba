"""Hardening against a real kernel: large bodies, the state file, config reloads,
the limits, concurrent control requests, a busy multi-threaded process and churn.

Every number checked is what the workload module did, as its own tally says.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import COLUMNS, Exporter, Lines, alloc_entries, bcc_events, missed, row_of
from witness import Witness
from workload import Tally, Workload, expected

pytestmark = pytest.mark.guest

HERE = Path(__file__).resolve().parent
UP, DOWN, LOCK, UNLOCK = 5, 6, 7, 8
# How many short-lived processes the churn soak runs (TRACER_CHURN for another count).
# 1000 takes about 2.5 min under TCG; a per-process leak shows in maps and RSS at any count.
CHURN = int(os.environ.get("TRACER_CHURN", "1000"))


def wait_for(predicate, what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.2)


def started(*args: str, log_name: str) -> Exporter:
    exp = Exporter(*args, log_name=log_name)
    try:
        exp.wait_ready()
    except BaseException:
        exp.stop()
        raise
    return exp


def kthread_job(exp: Exporter, workload: Workload, pid: int) -> Tally:
    workload.start(pid)
    return workload.wait(pid, 30000)


def test_a_body_of_several_mb_gets_413_and_changes_nothing(exporter, workload):
    pid = workload.spawn("mutex:3")
    try:
        # Up to 256 KiB of a refused body is read, so the client sees the 413 ...
        conn = http.client.HTTPConnection("127.0.0.1", exporter.port, timeout=60)
        conn.request("POST", f"/pids/{pid}", body=b"x" * (200 << 10))
        reply = conn.getresponse()
        body = json.loads(reply.read())
        conn.close()
        assert reply.status == 413
        assert "204800 bytes refused" in body["error"]
        # ... past that the connection is closed, the reply perhaps lost in the reset.
        conn = http.client.HTTPConnection("127.0.0.1", exporter.port, timeout=60)
        try:
            conn.request("POST", f"/pids/{pid}", body=b"x" * (8 << 20))
            assert conn.getresponse().status == 413
        except (ConnectionResetError, BrokenPipeError):
            pass
        finally:
            conn.close()
        assert pid not in exporter.tracer()
        # Still serving, and the same request without a body works.
        exporter.track(pid)
        assert kthread_job(exporter, workload, pid).lock == exporter.tracer()[pid][LOCK] == 3
    finally:
        workload.stop(pid)


def sleeper_that_forks() -> tuple[subprocess.Popen[str], Lines]:
    """A process that forks a sleeping child when told to, and prints its pid."""
    code = "import os, sys, time\nsys.stdin.readline()\nc = os.fork()\nif c == 0:\n    time.sleep(600)\n"
    code += "    os._exit(0)\nprint(c, flush=True)\ntime.sleep(600)\n"
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    return proc, Lines(proc)


def state_pids(path: Path) -> dict[int, dict]:
    return {e["pid"]: e for e in json.loads(path.read_text())["pids"]}


def test_a_restart_after_sigkill_cleans_up_and_keeps_the_runtime_pids(tmp_path, workload):
    """One crash and restart: the new instance removes the kprobe events the
    killed one left, restores the runtime pids that still run, drops those
    that exited meanwhile, and counts the restored ones exactly."""
    state = tmp_path / "state.json"
    # kprobe mode: its return probes are what a killed instance leaves behind.
    config = tmp_path / "c.yaml"
    config.write_text("probes:\n  mode: kprobe\n")
    first = started("--config.file", str(config), "--state.file", str(state), log_name="state-first")
    parent, lines = sleeper_that_forks()
    kept = workload.spawn("updown:7 mutex:5")
    gone = workload.spawn("mutex:1")
    child = 0
    try:
        first.track(kept)
        first.track(gone)
        assert first.request("POST", f"/pids/{parent.pid}?follow_forks=1")[0] == 201
        lines.say()
        child = int(lines.next())
        wait_for(lambda: child in first.tracer(), "the forked child tracked")
        # Written by the exporter's state writer, a moment after the change.
        want = sorted([kept, gone, parent.pid, child])
        wait_for(lambda: state.exists() and sorted(state_pids(state)) == want, "the state file naming all four", 10)
        saved = state_pids(state)
        assert saved[child]["parent_pid"] == parent.pid and saved[child]["follow_forks"]
        assert saved[parent.pid]["follow_forks"] and not saved[kept]["follow_forks"]
        # A crash, and a tracked process exits while the exporter is down.
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait(30)
        left = bcc_events(first.proc.pid)
        assert left, "a SIGKILLed BCC instance leaves its return probes in tracefs"
        workload.stop(gone)
        second = started("--config.file", str(config), "--state.file", str(state), log_name="state-second")
        try:
            assert bcc_events(first.proc.pid) == []
            assert f"removed {len(left)} kprobe events left behind by a killed instance" in second.log()
            pids = {e["pid"]: e for e in second.pids()}
            assert sorted(pids) == sorted([kept, parent.pid, child])
            assert f"state pid {gone}: no process with pid {gone}; dropped from the state file" in second.log()
            assert sorted(state_pids(state)) == sorted(pids)
            labels = frozenset({("pid", str(child)), ("comm", "python3"), ("parent_pid", str(parent.pid))})
            assert ("tracer_schedule_calls_total", labels) in second.metrics()
            # The restored pid counts exactly from the restart on.
            tally = kthread_job(second, workload, kept)
            assert second.tracer()[kept] == row_of(tally) == row_of(expected("updown:7 mutex:5", kthread=True))
        finally:
            assert second.stop() == 0
        assert bcc_events(second.proc.pid) == []
        # A clean stop keeps the file too.
        assert sorted(state_pids(state)) == sorted([kept, parent.pid, child])
    finally:
        for pid in (kept, gone):
            with contextlib.suppress(OSError):
                workload.stop(pid)
        parent.kill()
        parent.wait(10)
        if child:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)
        first.stop()


def test_sighup_with_a_broken_config_keeps_the_old_one(tmp_path, workload):
    a = workload.spawn("mutex:6")
    b = workload.spawn("updown:4")
    config = tmp_path / "c.yaml"
    config.write_text(f"pids: [{a}]\n")
    exp = started("--config.file", str(config), log_name="sighup")
    try:
        assert a in exp.tracer()
        for broken, reason in (
            (f"pids: [{b}\n", "not valid YAML at line"),
            (f"pids: [{b}]\nbogus: 1\n", "bogus: unknown key"),
            (f"pids: [{b}]\nlimits: {{max_tracked_processes: -3}}\n", "limits.max_tracked_processes: must be from 1"),
        ):
            config.write_text(broken)
            exp.proc.send_signal(signal.SIGHUP)
            wait_for(lambda r=reason: r in exp.log(), f"the log naming {reason!r}")
            assert "config reload failed, keeping the running config" in exp.log()
            assert sorted(exp.tracer()) == [a]
        assert kthread_job(exp, workload, a).lock == exp.tracer()[a][LOCK] == 6
        config.write_text(f"pids: [{b}]\n")
        exp.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "config reloaded" in exp.log(), "the reload")
        assert sorted(exp.tracer()) == [b]
        assert kthread_job(exp, workload, b).up == exp.tracer()[b][UP] == 4
    finally:
        workload.stop(a)
        workload.stop(b)
        assert exp.stop() == 0


def test_the_limits_are_a_409_and_a_counter_and_the_rest_stays_exact(tmp_path, workload):
    config = tmp_path / "c.yaml"
    config.write_text("limits: {max_tracked_processes: 3, alloc_map_entries: 16}\n")
    exp = started("--config.file", str(config), log_name="limits")
    pids = [workload.spawn(f"mutex:{10 + i}") for i in range(4)]
    allocating = workload.spawn("kmalloc:40:100 kfree:all")
    try:
        for pid in pids[:3]:
            exp.track(pid)
        status, body = exp.request("POST", f"/pids/{pids[3]}")
        assert status == 409
        assert "limit of 3 tracked processes is reached (limits.max_tracked_processes)" in json.loads(body)["error"]
        for pid in pids:
            kthread_job(exp, workload, pid)
        rows = exp.tracer()
        assert sorted(rows) == sorted(pids[:3])
        assert [rows[p][LOCK] for p in pids[:3]] == [10, 11, 12]
        # Room again after a DELETE.
        for pid in pids[:3]:
            assert exp.request("DELETE", f"/pids/{pid}")[0] == 200
        exp.track(pids[3])
        # A full alloc map: 40 blocks, room for 16.
        exp.track(allocating)
        tally = kthread_job(exp, workload, allocating)
        row = exp.tracer()[allocating]
        assert (tally.kmalloc, tally.kmalloc_bytes, tally.kfree, tally.kfree_bytes) == (40, 4000, 40, 4000)
        # Every call is counted; only the 16 blocks the map could hold have a known size at kfree.
        assert row[:4] == [40, 40, 4000, 1600]
        m = exp.metrics()
        assert m[("tracer_alloc_map_insert_failures_total", frozenset())] == 24
        assert alloc_entries(exp) == 0
        assert missed(exp) == 0
    finally:
        for pid in (*pids, allocating):
            workload.stop(pid)
        assert exp.stop() == 0


class Scraper:
    """Scrapes /metrics and /tracer every interval until stopped; counts failures."""

    def __init__(self, exp: Exporter, interval: float = 0.1) -> None:
        self.exp = exp
        self.interval = interval
        self.scrapes = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            for path in ("/metrics", "/tracer"):
                try:
                    status, _ = self.exp.request("GET", path)
                    if status != 200:
                        self.failures.append(f"{path}: {status}")
                except OSError as e:
                    self.failures.append(f"{path}: {e}")
                self.scrapes += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(60)
        assert not self._thread.is_alive()


def test_500_concurrent_control_requests_while_scraping(exporter, workload):
    pids = [workload.spawn(f"updown:{20 + i} mutex:{5 + i}") for i in range(10)]
    rng = random.Random(500)
    # 50 requests on each pid, POSTs and DELETEs mixed, all 500 at once (32 in flight, with
    # the scraper within --web.max-requests' 40).
    plan = [(rng.choice(("POST", "DELETE")), pids[i % 10]) for i in range(500)]
    scraper = Scraper(exporter)
    try:
        with ThreadPoolExecutor(max_workers=32) as pool:
            results = list(pool.map(lambda req: (req, exporter.request(req[0], f"/pids/{req[1]}")[0]), plan))
        scraper.stop()
        assert scraper.failures == [] and scraper.scrapes > 0
        tracked = set(exporter.tracer())
        for pid in pids:
            statuses = [(m, s) for (m, p), s in results if p == pid]
            bad = [(m, s) for m, s in statuses if s not in ((200, 201) if m == "POST" else (200, 404))]
            assert bad == [], f"pid {pid}: {bad}"
            # Every creation and every removal answered is one the map saw: they add up.
            created = sum(1 for m, s in statuses if (m, s) == ("POST", 201))
            removed = sum(1 for m, s in statuses if (m, s) == ("DELETE", 200))
            assert created - removed == (1 if pid in tracked else 0), pid
        # The survivors count exactly; the rest not at all.
        for i, pid in enumerate(pids):
            tally = kthread_job(exporter, workload, pid)
            rows = exporter.tracer()
            if pid in tracked:
                assert (rows[pid][UP], rows[pid][LOCK]) == (tally.up, tally.lock) == (20 + i, 5 + i)
            else:
                assert pid not in rows
        assert missed(exporter) == 0
    finally:
        scraper.stop()
        for pid in pids:
            workload.stop(pid)


@pytest.fixture(scope="module")
def hammer(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hammer") / "hammer"
    subprocess.run(["gcc", "-O2", "-Wall", "-pthread", "-o", str(out), str(HERE / "hammer.c")], check=True, timeout=300)
    return out


def reclaim_stalls() -> int:
    """Direct reclaim and compaction so far: kernel work a kmalloc may do for its caller."""
    stats = dict(line.split() for line in Path("/proc/vmstat").read_text().splitlines())
    return sum(int(v) for k, v in stats.items() if k.startswith(("allocstall_", "compact_stall")))


@pytest.fixture
def small_inflight(tmp_path):
    """An exporter whose in-flight map holds 48 records: over 24, a return drops
    its thread's record instead of keeping it for the next call."""
    config = tmp_path / "c.yaml"
    config.write_text("limits: {inflight_map_entries: 48}\n")
    exp = started("--config.file", str(config), log_name="small-inflight")
    try:
        yield exp
    finally:
        assert exp.stop() == 0, exp.log()[-4000:]


def test_32_threads_of_one_process_for_10_s_are_exact(small_inflight, workload, hammer):
    # 32 threads against room for 24 kept records: both ways of pairing a
    # kmalloc's entry with its return run at once.
    exporter = small_inflight
    ops = "kmalloc:3:200 kzalloc:1:72 kmalloc_const:1 kfree:all updown:2 mutex:4"
    # Free memory first: a kmalloc that must reclaim takes mutexes for its caller,
    # real work the module's tally does not know of. (The hammer warms up and
    # locks its pages before "ready", so no page fault reads its code from disk.)
    subprocess.run(["sync"], check=True, timeout=120)
    Path("/proc/sys/vm/drop_caches").write_text("3")
    stalls = reclaim_stalls()
    proc = subprocess.Popen(
        [str(hammer), "32", "10", *ops.split()], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    lines = Lines(proc, timeout=120)
    try:
        assert lines.next() == "ready"
        exporter.track(proc.pid)
        witness = Witness(proc.pid)
        before = exporter.tracer()[proc.pid]
        assert before[:4] == [0, 0, 0, 0] and before[UP:] == [0, 0, 0, 0]
        proc.send_signal(signal.SIGUSR1)
        wait_for(
            lambda: Path(f"/proc/{proc.pid}/stat").read_text().rsplit(") ", 1)[1][0] == "T",
            "the hammer to stop itself after its 10 s",
            timeout=300,
        )
        row = exporter.tracer()[proc.pid]
        metrics = exporter.metrics()
        module, other = witness.read()
        witness.close()
        proc.send_signal(signal.SIGCONT)
        tally = Tally.parse(lines.next())
        runs = int(lines.next().split("=")[1])
        assert proc.wait(60) == 0, proc.stderr.read() if proc.stderr else ""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    per_run = expected(ops)
    assert runs > 32
    assert tally == Tally(**{f: getattr(per_run, f) * runs for f in Tally.__dataclass_fields__ if f != "held"})
    stalls = reclaim_stalls() - stalls
    got = dict(zip((name for name, _ in COLUMNS), row))
    want = dict(zip((name for name, _ in COLUMNS), row_of(tally)))
    entry_counted = ("kfree", "up", "down", "lock", "unlock")
    sys.stderr.write(f"interrupt work in the process, not its own: {dict(witness.interrupt)}\n")
    for column, stacks in other.items():
        sys.stderr.write(f"{column}: {sum(stacks.values())} calls outside the module:\n")
        sys.stderr.writelines(f"  {n} x {stack}\n" for stack, n in stacks.most_common(5))
    # kmalloc and the bytes: the module's exactly.
    for column in ("kmalloc", "kmalloc_bytes", "kfree_bytes"):
        assert got[column] == want[column], (column, got, want, f"{stalls} reclaim stalls")
    # The entry-counted calls: exactly what the independent witness saw in the
    # process, the module's calls plus other kernel work that ran there (a
    # context switch's clean-up, reclaim), each with its stack. schedule() is
    # left out: the threads' own futex waits call it too.
    for column in entry_counted:
        seen = module[column] + sum(other.get(column, {}).values())
        assert got[column] == seen, (column, got, module, other.get(column))
    # And the module's calls are all there, but for calls neither program saw:
    # in 1 run of about 8 on 6.12 the witness counted 0.08 % fewer `down` than
    # the module made (cause not yet known). A call only the witness missed
    # fails the equality above; one both missed is reported and bounded here.
    short = {c: want[c] - module[c] for c in entry_counted if module[c] != want[c]}
    if short:
        sys.stderr.write(f"calls the module made that no probe saw: {short} of {want}\n")
    assert all(0 <= n <= want[c] // 1000 for c, n in short.items()), (short, want)
    labels = frozenset({("pid", str(proc.pid)), ("comm", "hammer"), ("parent_pid", "")})
    assert metrics[("tracer_mutex_lock_calls_total", labels)] == got["lock"]
    assert missed(exporter) == 0


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


@pytest.mark.timeout(1800)
def test_churn_soak(exporter, workload):
    exp = exporter
    baseline = alloc_entries(exp)
    workers = 4
    warmup = CHURN // 10
    done = 0
    done_lock = threading.Lock()
    rss: dict[str, int] = {}
    churned: set[int] = set()
    scraper = Scraper(exp)

    def one(w: Workload, i: int) -> tuple[list[int], Tally]:
        nonlocal done
        ops = f"kmalloc:{1 + i % 4}:{64 + 8 * (i % 9)} kzalloc:1:{i % 300} kfree:all updown:{1 + i % 3} mutex:{i % 5}"
        pid = w.spawn(ops)
        churned.add(pid)
        try:
            exp.track(pid)
            w.start(pid)
            tally = w.wait(pid, 30000)
            assert tally == expected(ops, kthread=True), (pid, ops, tally)
            row = exp.tracer()[pid]  # scraped just before the exit
        finally:
            w.stop(pid)
        with done_lock:
            done += 1
            if done == warmup:
                rss["warm"] = rss_kib(exp.proc.pid)
        return row, tally

    def worker(k: int) -> list[tuple[list[int], Tally]]:
        with Workload() as w:
            return [one(w, i) for i in range(k, CHURN, workers)]

    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            results = [r for part in pool.map(worker, range(workers)) for r in part]
        scraper.stop()
        wait_for(
            lambda: not churned & {e["pid"] for e in exp.pids()}, "every churned process gone from the tracked map", 60
        )
        rss["end"] = rss_kib(exp.proc.pid)
        assert len(results) == CHURN
        assert scraper.failures == [] and scraper.scrapes > 0
        # The churn leaves no entry behind; what earlier tests' processes still hold may be freed meanwhile.
        assert alloc_entries(exp) <= baseline
        assert missed(exp) == 0
        sums = [sum(col) for col in zip(*(row for row, _ in results))]
        assert sums == [sum(col) for col in zip(*(row_of(t) for _, t in results))]
        # Each row was exact, not only the sums.
        assert [row for row, _ in results] == [row_of(t) for _, t in results]
        assert rss["end"] < rss["warm"] * 1.10, rss
        sys.stderr.write(f"churn: {CHURN} processes, {scraper.scrapes} scrapes, RSS {rss} KiB\n")
    finally:
        scraper.stop()
