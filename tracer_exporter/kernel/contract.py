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

# counters.flags, and the group id in its upper half
TRACK_FOLLOW = 1
TRACK_KEEP = 2
TRACK_BY_EXEC = 4
TRACK_BY_CGROUP = 8
GROUP_SHIFT = 16
CGROUP_SELECTED = 0x8000  # a selector's own path in cgroup_paths

# The selector maps' keys and the path hash (FNV-1a, 64 bit).
EXE_LEN = 256
CGROUP_PATH_LEN = 256
FNV_BASIS = 0xCBF29CE484222325
FNV_PRIME = 0x100000001B3

# enum stat: indexes of the per-CPU stats array.
STAT_ALLOC_ENTRIES = 0
STAT_ALLOC_INSERT_FAILURES = 1
STAT_INFLIGHT_INSERT_FAILURES = 2
STAT_FOLLOW_DROPPED = 3
STAT_EXITED_INSERT_FAILURES = 4
STAT_RETURNS_LOST = 5
STAT_CGROUP_INSERT_FAILURES = 6
STAT_COUNT = 7

# The counting filters' slots, and struct tracked_slot: the program's s32, then user space's.
FILTER_SLOTS = 65536
TRACKED_SLOT = struct.Struct("=ii")


def path_hash(path: str) -> int:
    """FNV-1a of a cgroup path, as the program's path_hash computes it."""
    h = FNV_BASIS
    for byte in path.encode()[:CGROUP_PATH_LEN]:
        h = ((h ^ byte) * FNV_PRIME) & 0xFFFFFFFFFFFFFFFF
    return h
