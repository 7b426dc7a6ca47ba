"""What the kernel says about the program: its stats map, kprobe_profile, recursion misses."""

from __future__ import annotations

import os

from tracer_exporter.kernel import progstats, tracefs
from tracer_exporter.kernel.contract import (
    STAT_ALLOC_ENTRIES,
    STAT_ALLOC_INSERT_FAILURES,
    STAT_CGROUP_INSERT_FAILURES,
    STAT_EXITED_INSERT_FAILURES,
    STAT_FOLLOW_DROPPED,
    STAT_INFLIGHT_INSERT_FAILURES,
    STAT_RETURNS_LOST,
)
from tracer_exporter.kernel.maps import sum_per_cpu
from tracer_exporter.kernel.preempt import Unpreempted
from tracer_exporter.kernel.symbols import Plan
from tracer_exporter.model.health import Attachment, Health, ProbeMode

STATS = (
    STAT_RETURNS_LOST,
    STAT_INFLIGHT_INSERT_FAILURES,
    STAT_ALLOC_ENTRIES,
    STAT_ALLOC_INSERT_FAILURES,
    STAT_FOLLOW_DROPPED,
    STAT_EXITED_INSERT_FAILURES,
    STAT_CGROUP_INSERT_FAILURES,
)


def kernel_missed(plan: Plan, pid: int) -> dict[str, int]:
    """Per function, what the kernel says its return probes missed (kprobe_profile)."""
    profile = tracefs.read_kprobe_profile()
    out: dict[str, int] = {}
    for p in plan.probes:
        if p.return_handler:
            _, miss = profile.get(tracefs.bcc_event_name("r", p.symbol, pid), (0, 0))
            out[p.function] = out.get(p.function, 0) + miss
    return out


def skipped(plan: Plan, funcs: dict[bytes, object]) -> dict[str, int]:
    """Runs of each function's programs the kernel skipped (see progstats)."""
    handlers = {h: p.function for p in plan.probes for h in (p.entry_handler, p.return_handler) if h}
    symbols = {p.symbol: p.function for p in plan.probes}
    fds = {name.decode(): f.fd for name, f in funcs.items()}  # type: ignore[attr-defined]
    out: dict[str, int] = {}
    for name, label in progstats.program_labels(fds, handlers, symbols).items():
        n = progstats.recursion_misses(fds[name])
        if n is not None:
            out[label] = out.get(label, 0) + n
    return out


def read_health(
    stats: object,
    funcs: dict[bytes, object],
    plan: Plan,
    attachments: list[Attachment],
    mode: ProbeMode,
    unpreempted: Unpreempted,
    exec_events_lost: int = 0,
) -> Health:
    """stats: the program's stats map; funcs: its loaded programs (BPF.funcs)."""
    returns_lost, inflight_failures, entries, insert_failures, dropped, exited_dropped, cgroup_failures = sum_per_cpu(
        stats, STATS, unpreempted
    )
    return Health(
        attachments=list(attachments),
        mode=mode,
        # What tracked threads lost: returns never seen, and entries not recorded.
        missed={"kmalloc": returns_lost + inflight_failures},
        kernel_missed=kernel_missed(plan, os.getpid()),
        skipped=skipped(plan, funcs),
        alloc_entries=entries,
        alloc_insert_failures=insert_failures,
        follow_dropped=dropped,
        exited_dropped=exited_dropped,
        cgroup_insert_failures=cgroup_failures,
        exec_events_lost=exec_events_lost,
    )
