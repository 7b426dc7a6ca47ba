"""The Python side of bpf/tracer.h: what the BPF program and user space share.

tests/unit/test_contract.py parses the header and checks every value here
against it, so a change on one side alone fails on the host.
"""

from __future__ import annotations

import struct

HEADER_NAME = "tracer.h"

# struct counters: the nine counters (named as counters.Counts), parent, flags, comm.
COUNTER_FIELDS = (
    "kmalloc_calls",
    "kmalloc_bytes",
    "kfree_calls",
    "kfree_bytes",
    "schedule_calls",
    "up_calls",
    "down_calls",
    "lock_calls",
    "unlock_calls",
)
TASK_COMM_LEN = 16
COUNTERS = struct.Struct(f"={len(COUNTER_FIELDS)}QII{TASK_COMM_LEN}s")

# counters.flags
TRACK_FOLLOW = 1
TRACK_KEEP = 2

# enum stat: indexes of the per-CPU stats array.
STAT_ALLOC_ENTRIES = 0
STAT_ALLOC_INSERT_FAILURES = 1
STAT_INFLIGHT_INSERT_FAILURES = 2
STAT_FOLLOW_DROPPED = 3
STAT_EXITED_INSERT_FAILURES = 4
STAT_RETURNS_LOST = 5
STAT_COUNT = 6

# The counting filters' slots, and struct tracked_slot: the program's s32, then user space's.
FILTER_SLOTS = 65536
TRACKED_SLOT = struct.Struct("=ii")
