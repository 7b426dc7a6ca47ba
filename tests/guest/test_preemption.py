"""Scrapes must not cost tracked threads any call, on a kernel that preempts.

A module of its own: only the shared kprobe-mode exporter is loaded while it
runs (conftest's fentry exporter lives per module). With a second BPF tool
on the same functions in fentry mode, a preempting 6.1 has been seen to
shift the kprobe mode's kmalloc count (41 of 50,000): that is another
scenario than this one, and is not yet explained.
"""

from __future__ import annotations

import subprocess
import threading
from pathlib import Path

import pytest
from conftest import Lines, metrics_row, row_of
from oracle import SlabOwnKmallocs

pytestmark = pytest.mark.guest

HERE = Path(__file__).resolve().parent
# Scraped while counting: enough rows that a scrape's map read takes a while.
SCRAPED_ROWS = 300
SCRAPED_OPS = "mutex:400000 updown:200000 kmalloc:50000:64 kfree:all schedule:5000"


def skipped_total(exporter) -> float:
    return sum(v for (name, _), v in exporter.metrics().items() if name == "tracer_probe_skipped_total")


@pytest.mark.exact
def test_counts_stay_exact_while_scraped_on_a_kernel_that_preempts(exporter, workload, preemptible, tmp_path, capsys):
    """A BPF map syscall holds its CPU's guard for kprobe programs; preempted
    there, it would make the kernel skip them for every task on that CPU. So a
    scrape must not cost tracked threads any call: a kernel thread does known
    work on a busy guest while /metrics reads hundreds of rows in a loop.
    Debian 12 and 13 run voluntary preemption: the fixture switches them to
    full for the test."""
    exe = tmp_path / "spawner"
    subprocess.run(["gcc", "-O2", "-o", str(exe), str(HERE / "spawner.c")], check=True, timeout=300)
    spawner = subprocess.Popen([str(exe)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    busy: list[subprocess.Popen] = []
    scrapes: list[int] = []
    stop = threading.Event()

    def scrape() -> None:
        while not stop.is_set():
            scrapes.append(exporter.request("GET", "/metrics")[0])

    try:
        assert exporter.request("POST", f"/pids/{spawner.pid}?follow_forks=1")[0] == 201
        out = Lines(spawner, timeout=300)
        out.say(str(SCRAPED_ROWS))
        assert out.next() == f"ok {SCRAPED_ROWS}"
        skipped_before = skipped_total(exporter)
        pid = workload.spawn(SCRAPED_OPS)
        exporter.track(pid)
        # One CPU-bound loop: the scraper shares its CPU, so it is preempted now and then.
        busy.append(subprocess.Popen(["sh", "-c", "while :; do :; done"]))
        scraper = threading.Thread(target=scrape)
        scraper.start()
        try:
            with SlabOwnKmallocs() as slab:
                workload.start(pid)
                tally = workload.wait(pid, 300000)
                slab_calls, slab_bytes = slab.of(pid)
        finally:
            stop.set()
            scraper.join(120)
        try:
            row = exporter.tracer()[pid]
            metrics = metrics_row(exporter.metrics(), pid, exporter.comm(pid))
            skipped = skipped_total(exporter) - skipped_before
        finally:
            workload.stop(pid)
    finally:
        for p in (*busy, spawner):
            p.kill()
            p.wait(30)
    with capsys.disabled():
        print(
            f"\n{len(scrapes)} scrapes of {SCRAPED_ROWS + 2} rows while counting; runs the kernel skipped: {skipped:.0f};"
            f" the slab's own kmallocs: {slab_calls}"
        )
    assert len(scrapes) >= 3 and set(scrapes) == {200}
    assert metrics == row
    # On 7.x a kfree may need a new sheaf: the allocator's own kmalloc, which
    # the kernel counts for this thread. Those calls bound the difference.
    want = row_of(tally)
    assert 0 <= row[0] - want[0] <= slab_calls, (row, want, slab_calls)
    assert 0 <= row[2] - want[2] <= slab_bytes, (row, want, slab_bytes)
    assert row[1:2] + row[3:] == want[1:2] + want[3:]
