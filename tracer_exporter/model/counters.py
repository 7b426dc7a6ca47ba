"""The counters kept per tracked process, and how each one is published."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

# The kernel functions counted, in the order of the design; kernel.symbols says where each is probed.
FUNCTION_NAMES: tuple[str, ...] = (
    "kmalloc",
    "kfree",
    "schedule",
    "up",
    "down_interruptible",
    "mutex_lock",
    "mutex_unlock",
)


class Counts(NamedTuple):
    """One process's counters, in the order of `struct counters` in bpf/."""

    kmalloc_calls: int = 0
    kmalloc_bytes: int = 0
    kfree_calls: int = 0
    kfree_bytes: int = 0
    schedule_calls: int = 0
    up_calls: int = 0
    down_calls: int = 0
    lock_calls: int = 0
    unlock_calls: int = 0


def add_counts(a: Counts, b: Counts) -> Counts:
    """Two processes' counters summed, column by column."""
    return Counts(*(x + y for x, y in zip(a, b)))


@dataclass(frozen=True)
class Field:
    name: str  # attribute of Counts
    column: str  # /tracer column, as /proc/tracer had it
    metric: str  # Prometheus counter name, without _total
    unit: str  # "" or "bytes"
    help: str


# /tracer column order; metrics follow the same order.
FIELDS: tuple[Field, ...] = (
    Field("kmalloc_calls", "kmalloc", "tracer_kmalloc_calls", "", "Calls of kmalloc by the process."),
    Field("kfree_calls", "kfree", "tracer_kfree_calls", "", "Calls of kfree by the process."),
    Field(
        "kmalloc_bytes",
        "kmalloc_mem",
        "tracer_kmalloc_bytes",
        "bytes",
        "Bytes requested by the process's kmalloc calls that returned memory.",
    ),
    Field(
        "kfree_bytes",
        "kfree_mem",
        "tracer_kfree_bytes",
        "bytes",
        "Bytes freed by the process's kfree calls, for blocks a tracked process allocated.",
    ),
    Field("schedule_calls", "sched", "tracer_schedule_calls", "", "Calls of schedule() by the process."),
    Field("up_calls", "up", "tracer_up_calls", "", "Calls of up() by the process."),
    Field(
        "down_calls",
        "down",
        "tracer_down_interruptible_calls",
        "",
        "Calls of down_interruptible() by the process.",
    ),
    Field("lock_calls", "lock", "tracer_mutex_lock_calls", "", "Calls of mutex_lock() by the process."),
    Field("unlock_calls", "unlock", "tracer_mutex_unlock_calls", "", "Calls of mutex_unlock() by the process."),
)


# Entry and Row are named tuples, not dataclasses: a scrape makes one of each
# per tracked process, and tuples are several times cheaper to make.
class Entry(NamedTuple):
    """A tracked process as the kernel map holds it."""

    counts: Counts
    parent: int = 0  # the followed process it was forked from, else 0
    comm: str = ""  # kept by the kernel for followed children and exited processes
    group: int = 0  # the id of its workload group (config select), else 0


class Row(NamedTuple):
    """A tracked process as published: pid, comm when tracking began, counters."""

    pid: int
    comm: str
    counts: Counts
    parent: int = 0
    group: str = ""  # the name of its workload group, else ""
