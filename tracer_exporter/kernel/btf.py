"""Byte offsets of kernel struct members, from the kernel's BTF.

The BPF program reads the few task_struct fields it needs at offsets given
as -D flags, so it compiles without the kernel's sched headers: those are
most of a compile's time (35 of 44 s in an emulated guest).

Only what that needs is parsed: the type section's records, to find a
struct by name and walk its members, anonymous ones included.
"""

from __future__ import annotations

import struct
from pathlib import Path

VMLINUX = Path("/sys/kernel/btf/vmlinux")
MAGIC = 0xEB9F
HEADER = struct.Struct("<HBBIIIII")
TYPE = struct.Struct("<III")
MEMBER = struct.Struct("<III")
KIND_STRUCT, KIND_UNION = 4, 5
# Bytes that follow a type's 12-byte record, by kind: (fixed, per vlen item).
EXTRA = {
    1: (4, 0),  # INT
    3: (12, 0),  # ARRAY
    4: (0, 12),  # STRUCT
    5: (0, 12),  # UNION
    6: (0, 8),  # ENUM
    13: (0, 8),  # FUNC_PROTO
    14: (4, 0),  # VAR
    15: (0, 12),  # DATASEC
    17: (4, 0),  # DECL_TAG
    19: (0, 12),  # ENUM64
}
KNOWN_KINDS = set(range(1, 20))

# What the program reads: "struct.member" -> the -D flag that carries its offset.
FIELDS = {
    "task_struct.stack": "TASK_STACK_OFF",
    "task_struct.tgid": "TASK_TGID_OFF",
    "task_struct.signal": "TASK_SIGNAL_OFF",
    "signal_struct.live": "SIGNAL_LIVE_OFF",
}
# 6.2 to 6.14 keep the preempt count in pcpu_hot: added to its address.
PCPU_HOT_PREEMPT_COUNT = "pcpu_hot.preempt_count"


class BTFError(Exception):
    """The data is not BTF this parser understands, or lacks a wanted member."""


class BTF:
    def __init__(self, data: bytes) -> None:
        if len(data) < HEADER.size:
            raise BTFError("shorter than a BTF header")
        magic, _version, _flags, hdr_len, type_off, type_len, str_off, str_len = HEADER.unpack_from(data)
        if magic != MAGIC:
            raise BTFError(f"bad magic {magic:#x}")
        self._data = data
        self._strings = data[hdr_len + str_off : hdr_len + str_off + str_len]
        self._start = hdr_len + type_off
        self._end = self._start + type_len
        self._offsets = self._index()

    def _index(self) -> list[int]:
        """Where each type's record starts, by type id (id 0 is void)."""
        offsets = [0]
        data, pos, end = self._data, self._start, self._end
        while pos < end:
            offsets.append(pos)
            info = TYPE.unpack_from(data, pos)[1]
            kind, vlen = (info >> 24) & 0x1F, info & 0xFFFF
            if kind not in KNOWN_KINDS:
                raise BTFError(f"unknown kind {kind} at type {len(offsets) - 1}")
            fixed, each = EXTRA.get(kind, (0, 0))
            pos += TYPE.size + fixed + each * vlen
        return offsets

    def _name(self, off: int) -> str:
        return self._strings[off : self._strings.index(b"\0", off)].decode()

    def _struct(self, name: str) -> int:
        # Strings are deduplicated: one offset names every type called @name.
        at = self._strings.find(b"\0" + name.encode() + b"\0")
        if at >= 0:
            for tid in range(1, len(self._offsets)):
                name_off, info, _ = TYPE.unpack_from(self._data, self._offsets[tid])
                if name_off == at + 1 and (info >> 24) & 0x1F == KIND_STRUCT and info & 0xFFFF:
                    return tid
        raise BTFError(f"no struct {name}")

    def _members(self, tid: int):  # type: ignore[no-untyped-def]
        pos = self._offsets[tid]
        info = TYPE.unpack_from(self._data, pos)[1]
        bitfields = bool(info >> 31)
        for i in range(info & 0xFFFF):
            name_off, mtype, offset = MEMBER.unpack_from(self._data, pos + TYPE.size + i * MEMBER.size)
            yield name_off, mtype, (offset & 0xFFFFFF) if bitfields else offset

    def _find(self, tid: int, member: str, base: int) -> int | None:
        for name_off, mtype, bits in self._members(tid):
            if name_off and self._name(name_off) == member:
                return base + bits
            if not name_off:  # an anonymous struct or union: its members are this one's
                kind = (TYPE.unpack_from(self._data, self._offsets[mtype])[1] >> 24) & 0x1F
                if kind in (KIND_STRUCT, KIND_UNION):
                    found = self._find(mtype, member, base + bits)
                    if found is not None:
                        return found
        return None

    def offset(self, field: str) -> int:
        """The byte offset of "struct.member"."""
        name, member = field.split(".")
        bits = self._find(self._struct(name), member, 0)
        if bits is None:
            raise BTFError(f"struct {name} has no member {member}")
        if bits % 8:
            raise BTFError(f"{field} is a bit field")
        return bits // 8


def field_offsets(path: Path = VMLINUX, fields: tuple[str, ...] = tuple(FIELDS)) -> dict[str, int]:
    """{"task_struct.stack": 24, ...} for the running kernel, or BTFError."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise BTFError(f"{path}: {e.strerror}") from e
    btf = BTF(data)
    return {f: btf.offset(f) for f in fields}
