"""The exporter's columns against the kernel's own accounting, in both probe modes.

- Interrupt work that lands while a tracked process runs in user mode runs on
  that process's stack; it is not the process's work and is not charged.
- kvmalloc's kmalloc attempt counts once on every kernel (7.x inlines it).
- Real programs, tracked over a window where they sleep at both ends, match an
  independent counter (oracle.py: ftrace hist triggers, no BPF) on every column
  but kfree_mem.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest
from conftest import Exporter, row_of, run_kthread
from driver import COMMANDS, DRIVER, wait_settled
from oracle import COLUMNS, Oracle, for_pids
from workload import WorkloadError, expected

pytestmark = [pytest.mark.guest, pytest.mark.exact]

# The /pids counter names of the oracle's columns.
PIDS_NAMES = {
    "kmalloc": "kmalloc_calls",
    "kfree": "kfree_calls",
    "kmalloc_bytes": "kmalloc_bytes",
    "sched": "schedule_calls",
    "up": "up_calls",
    "down": "down_calls",
    "lock": "lock_calls",
    "unlock": "unlock_calls",
}
IRQ_PAIRS = 200


@pytest.fixture
def exporter(any_mode):
    return any_mode


def counters(exporter: Exporter, pid: int) -> dict[str, int]:
    (entry,) = [e for e in exporter.pids() if e["pid"] == pid]
    return {column: int(entry["counters"][name]) for column, name in PIDS_NAMES.items()}


def delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before[k] for k in after}


@pytest.mark.parametrize("context", ["hard", "soft"])
def test_interrupt_work_on_a_process_in_user_mode_is_not_charged(exporter, workload, context):
    cpu = os.cpu_count() - 1
    # Spins in user mode on one CPU: no kernel call of its own while it does.
    spinner = subprocess.Popen(
        [sys.executable, "-c", f"import os\nos.sched_setaffinity(0, {{{cpu}}})\nprint(flush=True)\nwhile True: pass"],
        stdout=subprocess.PIPE,
    )
    try:
        assert spinner.stdout.readline() == b"\n"
        exporter.track(spinner.pid)
        before = counters(exporter, spinner.pid)
        try:
            got = workload.irq(spinner.pid, cpu, IRQ_PAIRS, 64, context, timeout_ms=10000)
        except WorkloadError as e:
            if context == "soft" and " 0 of " in e.reason:
                pytest.skip(f"softirqs at interrupt exit run on the IRQ stack here, never on the task's: {e.reason}")
            raise
        after = counters(exporter, spinner.pid)
    finally:
        spinner.kill()
        spinner.wait(10)
    # The module made them all, in interrupt context, on the spinner's own stack.
    assert (got["hits"], got["failed"]) == (IRQ_PAIRS, 0), got
    changed = delta(after, before)
    # schedule() is the spinner's own when it is preempted; nothing else is.
    changed.pop("sched")
    assert changed == dict.fromkeys(changed, 0), (context, got, changed)


KVMALLOC = {
    "small": "kvmalloc:7:100 kfree:all",
    "page": "kvmalloc:5:4096 kfree:all",
    "over_8k": "kvmalloc:3:16384 kfree:all",
    "zero": "kvmalloc:2:0 kfree:all",
}


@pytest.mark.parametrize("ops", KVMALLOC.values(), ids=KVMALLOC.keys())
def test_kvmalloc_counts_its_kmalloc_once(exporter, workload, ops):
    pid, tally = run_kthread(exporter, workload, ops)
    try:
        assert tally == expected(ops, kthread=True)
        row = exporter.tracer()[pid]
    finally:
        workload.stop(pid)
    assert row == row_of(tally)


def snapshot(exporter: Exporter, oracle: Oracle, pid: int, tids: set[int]) -> tuple[dict, dict]:
    """Both counters at one quiet moment: the oracle is read on both sides of the exporter."""
    for _ in range(5):
        first = oracle.counts(tids)
        ours = counters(exporter, pid)
        if oracle.counts(tids) == first:
            return ours, first
        wait_settled(pid)
    raise AssertionError(f"pid {pid} kept working while asleep in read()")


def test_real_programs_match_the_kernels_own_counts(exporter, workload, tmp_path):
    cpu = os.cpu_count() - 1
    driver = subprocess.Popen(
        [sys.executable, "-c", DRIVER, str(tmp_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert driver.stdout.readline() == "ready\n"
        with for_pids([driver.pid]) as oracle:
            exporter.track(driver.pid)
            wait_settled(driver.pid)
            tids = {driver.pid}
            ours_before, kernel_before = snapshot(exporter, oracle, driver.pid, tids)
            for command in COMMANDS:
                irq = None
                if command == "compress":
                    # Interrupt work on its time while it computes in user mode.
                    os.sched_setaffinity(driver.pid, {cpu})
                    irq = threading.Thread(target=workload.irq, args=(driver.pid, cpu, 50, 128, "soft", 20000))
                    irq.start()
                driver.stdin.write(command + "\n")
                driver.stdin.flush()
                tids |= {int(t) for t in driver.stdout.readline().split()}
                if irq is not None:
                    irq.join(30)
                wait_settled(driver.pid)
            ours_after, kernel_after = snapshot(exporter, oracle, driver.pid, tids)
    finally:
        driver.kill()
        driver.wait(10)
    missed = sum(v for (name, _), v in exporter.metrics().items() if name == "tracer_probe_missed_total")
    assert missed == 0
    ours, kernel = delta(ours_after, ours_before), delta(kernel_after, kernel_before)
    print(f"window of {sorted(COMMANDS)}: exporter {ours}, kernel {kernel}")
    assert set(kernel) == set(COLUMNS)
    assert kernel["kmalloc"] > 1000 and kernel["kfree"] > 1000 and kernel["sched"] > 10  # a real workload ran
    if int(os.uname().release.split(".")[0]) >= 7:
        # 7.x's slab refills its per-CPU sheaves with a kmalloc that slub.c
        # inlines (alloc_empty_sheaf): no entry point to probe. Reported, bounded.
        unseen = kernel["kmalloc"] - ours["kmalloc"]
        print(
            f"7.x: {unseen} slab-internal kmalloc calls ({kernel['kmalloc_bytes'] - ours['kmalloc_bytes']} bytes) unseen"
        )
        assert 0 <= unseen <= kernel["kmalloc"] // 200, (ours, kernel)
        for column in ("kmalloc", "kmalloc_bytes"):
            ours.pop(column), kernel.pop(column)
    assert ours == kernel
