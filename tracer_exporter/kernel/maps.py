"""The program's maps from user space: the tracked set and its filter, batch reads, decoding."""

from __future__ import annotations

import ctypes as ct
import errno
import logging
import mmap
import os
import struct
import threading

from tracer_exporter.kernel.contract import (
    COUNTER_FIELDS,
    COUNTERS,
    FILTER_SLOTS,
    GROUP_SHIFT,
    TRACK_FOLLOW,
    TRACKED_SLOT,
)
from tracer_exporter.kernel.errors import MapFull, ProbeError
from tracer_exporter.kernel.preempt import Unpreempted
from tracer_exporter.model.counters import Counts, Entry

log = logging.getLogger(__name__)

BPF_NOEXIST = 1
ENOTSUPP = 524  # the kernel's own "not supported", which Python's errno lacks
SLOT_BYTES = TRACKED_SLOT.size


def errno_of(res: int) -> int:
    # libbcc returns -errno from newer libbpf and -1 with errno from older ones.
    return -res if res < -1 else ct.get_errno()


def leaf_layout(leaf: type) -> struct.Struct | None:
    """struct counters as BCC compiled it, if it is contract.COUNTERS (the same names, size and offsets)."""
    names = [f[0] for f in leaf._fields_]  # type: ignore[attr-defined]
    if names != [*COUNTER_FIELDS, "parent", "flags", "comm"] or ct.sizeof(leaf) != COUNTERS.size:
        return None
    parent = 8 * len(COUNTER_FIELDS)
    if leaf.parent.offset != parent or leaf.comm.offset != parent + 8:  # type: ignore[attr-defined]
        return None
    return COUNTERS


def entry_of(v: object) -> Entry:
    """One struct counters, read through its ctypes fields."""
    counts = Counts(*(getattr(v, f) for f in Counts._fields))
    comm = bytes(v.comm).split(b"\0", 1)[0].decode(errors="replace")  # type: ignore[attr-defined]
    return Entry(counts, int(v.parent), comm, int(v.flags) >> GROUP_SHIFT)  # type: ignore[attr-defined]


class Filter:
    """User space's halves of the tracked filter (struct tracked_slot), written in
    place through mmap: a map update would overwrite the program's halves."""

    def __init__(self, table: object) -> None:
        if ct.sizeof(table.Leaf) != SLOT_BYTES:  # type: ignore[attr-defined]
            raise ProbeError(f"struct tracked_slot is {ct.sizeof(table.Leaf)} bytes, expected {SLOT_BYTES}")  # type: ignore[attr-defined]
        try:
            self._mem = mmap.mmap(table.map_fd, FILTER_SLOTS * SLOT_BYTES)  # type: ignore[attr-defined]
        except OSError as e:
            raise ProbeError(f"cannot map the tracked filter into memory: {e}") from e
        # Aligned 4-byte stores, so the program never reads half a write.
        self._slots: memoryview | None = memoryview(self._mem).cast("i")

    def add(self, pid: int, delta: int) -> None:
        """Raised before a pid goes in, lowered after it comes out."""
        assert self._slots is not None
        self._slots[(pid % FILTER_SLOTS) * 2 + 1] += delta

    def close(self) -> None:
        if self._slots is not None:
            self._slots.release()
            self._mem.close()
            self._slots = None


class BatchReader:
    """Every entry of a hash map in a few BPF_MAP_LOOKUP_BATCH calls, into buffers reused across reads."""

    def __init__(self, lib: object, name: str, table: object) -> None:
        self._lookup = getattr(lib, "bpf_lookup_batch", None)  # absent before bcc 0.20
        self.available = self._lookup is not None
        self._name = name
        self._table = table
        self._key_t, self._leaf_t = table.Key, table.Leaf  # type: ignore[attr-defined]
        self.keys: ct.Array | None = None  # allocated at the first read, where batch reads exist
        self.values: ct.Array | None = None

    def read(self) -> int | None:
        """How many entries are now in keys and values; None where the kernel (before 5.6) has no batch reads."""
        if not self.available:
            return None
        if self.keys is None or self.values is None:
            n = int(self._table.max_entries)  # type: ignore[attr-defined]
            self.keys, self.values = (self._key_t * n)(), (self._leaf_t * n)()
        size = len(self.keys)
        in_batch, out_batch, count = ct.c_uint32(0), ct.c_uint32(0), ct.c_uint32(0)
        total = 0
        while total < size:
            count.value = size - total
            res = self._lookup(  # type: ignore[misc]
                self._table.map_fd,  # type: ignore[attr-defined]
                ct.byref(in_batch) if total else None,
                ct.byref(out_batch),
                ct.byref(self.keys, ct.sizeof(self._key_t) * total),
                ct.byref(self.values, ct.sizeof(self._leaf_t) * total),
                ct.byref(count),
            )
            err = errno_of(res) if res else 0
            total += count.value
            if err == errno.ENOENT:
                break  # every bucket read
            if err:
                if total == 0 and err in (errno.EINVAL, errno.EOPNOTSUPP, ENOTSUPP):
                    log.info("batch map reads unavailable (%s); reading entries one by one", os.strerror(err))
                    self.available = False
                    return None
                raise OSError(err, f"reading the {self._name} map: {os.strerror(err)}")
            in_batch.value = out_batch.value
        return total


class TrackedMap:
    """The tracked map and its filter: which processes are counted, and what they counted."""

    def __init__(
        self, bpf: object, lib: object, base_flags: int, limit: int, unpreempted: Unpreempted, source: object
    ) -> None:
        self._table = bpf.get_table("tracked")  # type: ignore[attr-defined]
        layout = leaf_layout(self._table.Leaf)
        if layout is None or ct.sizeof(self._table.Key) != 4:
            raise ProbeError(
                f"the tracked map of {source} is not the layout of contract.COUNTERS: bpf/tracer.h and"
                " contract.py disagree"
            )
        self._layout = layout
        self._lib = lib
        self._base_flags = base_flags
        self._limit = limit
        self._unpreempted = unpreempted
        self._filter = Filter(bpf.get_table("tracked_slots"))  # type: ignore[attr-defined]
        self._lock = threading.Lock()  # the filter's slots have one writer at a time
        self._batch = BatchReader(lib, "tracked", self._table)
        self._entries: dict[bytes, Entry] = {}  # the last read's entries, by their bytes
        self._last: tuple[tuple[int, ...], bytes, dict[int, Entry]] = ((), b"", {})

    def track(self, pid: int, follow: bool = False, parent: int = 0, flags: int = 0) -> bool:
        """flags: a group member's (see model.selectors.member_flags)."""
        leaf = self._table.Leaf()
        leaf.flags = self._base_flags | flags | (TRACK_FOLLOW if follow else 0)
        leaf.parent = parent
        key = self._table.Key(pid)
        with self._lock, self._unpreempted():
            self._filter.add(pid, 1)
            res = self._lib.bpf_update_elem(self._table.map_fd, ct.byref(key), ct.byref(leaf), BPF_NOEXIST)  # type: ignore[attr-defined]
            if res != 0:
                self._filter.add(pid, -1)
        if res == 0:
            return True
        err = errno_of(res)
        if err == errno.EEXIST:
            return False
        if err == errno.E2BIG:
            raise MapFull(f"the limit of {self._limit} tracked processes is reached (limits.max_tracked_processes)")
        raise OSError(err, f"tracking pid {pid}: {os.strerror(err)}")

    def lookup(self, pid: int) -> Entry | None:
        key = self._table.Key(pid)
        leaf = self._table.Leaf()
        with self._unpreempted():
            res = self._lib.bpf_lookup_elem(self._table.map_fd, ct.byref(key), ct.byref(leaf))  # type: ignore[attr-defined]
        return entry_of(leaf) if res == 0 else None

    def untrack(self, pid: int) -> bool:
        key = self._table.Key(pid)
        with self._lock, self._unpreempted():
            res = self._lib.bpf_delete_elem(self._table.map_fd, ct.byref(key))  # type: ignore[attr-defined]
            if res == 0:
                self._filter.add(pid, -1)
        if res == 0:
            return True
        err = errno_of(res)
        if err == errno.ENOENT:
            return False
        raise OSError(err, f"untracking pid {pid}: {os.strerror(err)}")

    def read_all(self) -> dict[int, Entry]:
        with self._unpreempted():
            total = self._batch.read()
            if total is None:
                # Per key: two syscalls an entry (next key, lookup).
                return {k.value: entry_of(v) for k, v in self._table.items()}
        return self._decode(total)

    def _decode(self, total: int) -> dict[int, Entry]:
        # Straight from the bytes: ctypes field access costs more than the syscalls.
        # An entry whose bytes did not change since the last read is not decoded again.
        layout = self._layout
        keys, values = self._batch.keys, self._batch.values
        assert keys is not None and values is not None  # read() filled them
        pids = struct.unpack(f"={total}I", ct.string_at(ct.addressof(keys), 4 * total))
        size = layout.size
        raw = ct.string_at(ct.addressof(values), size * total)
        if (pids, raw) == self._last[:2]:
            return dict(self._last[2])  # nothing moved since the last read
        seen, now, out = self._entries, {}, {}
        for i, pid in enumerate(pids):
            rec = raw[i * size : (i + 1) * size]
            entry = seen.get(rec)
            if entry is None:
                v = layout.unpack(rec)
                comm = v[11].split(b"\0", 1)[0].decode(errors="replace")
                entry = Entry(Counts._make(v[:9]), v[9], comm, v[10] >> GROUP_SHIFT)
            now[rec] = out[pid] = entry
        self._entries = now
        self._last = (pids, raw, out)
        return dict(out)

    def close(self) -> None:
        self._filter.close()


def pop_all(table: object, lib: object, unpreempted: Unpreempted) -> dict[int, Entry]:
    """Every entry of a map of struct counters, deleted as read (the exited map)."""
    with unpreempted():
        out = {k.value: entry_of(v) for k, v in table.items()}  # type: ignore[attr-defined]
        for pid in out:
            lib.bpf_delete_elem(table.map_fd, ct.byref(table.Key(pid)))  # type: ignore[attr-defined]
    return out


def sum_per_cpu(table: object, indexes: tuple[int, ...], unpreempted: Unpreempted) -> list[int]:
    """Per-CPU values summed over CPUs, in one block of map lookups."""
    with unpreempted():
        return [int(sum(table[table.Key(i)])) for i in indexes]  # type: ignore[attr-defined,index]
