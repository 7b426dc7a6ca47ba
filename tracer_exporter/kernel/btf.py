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
KIND_STRUCT, KIND_UNION = 4, 5
# 32-bit words that follow a type's 3-word record, by kind: (fixed, per vlen item).
# Every record is whole words, so the type section is read as one array of them: a
# Python loop over its 130,000 records takes about a second under TCG otherwise.
EXTRA = {
    1: (1, 0),  # INT
    3: (3, 0),  # ARRAY
    4: (0, 3),  # STRUCT
    5: (0, 3),  # UNION
    6: (0, 2),  # ENUM
    13: (0, 2),  # FUNC_PROTO
    14: (1, 0),  # VAR
    15: (0, 3),  # DATASEC
    17: (1, 0),  # DECL_TAG
    19: (0, 3),  # ENUM64
}
KNOWN_KINDS = set(range(1, 20))
_FIXED = [EXTRA.get(k, (0, 0))[0] for k in range(32)]
_EACH = [EXTRA.get(k, (0, 0))[1] for k in range(32)]

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
        start = hdr_len + type_off
        if start % 4 or type_len % 4:
            raise BTFError("the type section is not whole 32-bit words")
        if start + type_len > len(data):
            raise BTFError(f"the type section ends at byte {start + type_len}, past the data's {len(data)}")
        self._strings = data[hdr_len + str_off : hdr_len + str_off + str_len]
        # Little-endian words: BTF is in the kernel's byte order, and we run on x86-64.
        self._words = memoryview(data)[start : start + type_len].cast("I")
        self._offsets = self._index()

    def _index(self) -> list[int]:
        """Where each type's record starts (in words), by type id (id 0 is void)."""
        offsets = [0]
        words, pos, end = self._words, 0, len(self._words)
        fixed, each, known = _FIXED, _EACH, KNOWN_KINDS
        while pos < end:
            offsets.append(pos)
            info = words[pos + 1]
            kind = (info >> 24) & 0x1F
            if kind not in known:
                raise BTFError(f"unknown kind {kind} at type {len(offsets) - 1}")
            pos += 3 + fixed[kind] + each[kind] * (info & 0xFFFF)
        if pos != end:
            raise BTFError("the last type record runs past the type section")
        return offsets

    def _name(self, off: int) -> str:
        return self._strings[off : self._strings.index(b"\0", off)].decode()

    def _struct(self, name: str) -> int:
        # Strings are deduplicated: one offset names every type called @name.
        at = self._strings.find(b"\0" + name.encode() + b"\0")
        if at >= 0:
            words = self._words
            for tid in range(1, len(self._offsets)):
                pos = self._offsets[tid]
                info = words[pos + 1]
                if words[pos] == at + 1 and (info >> 24) & 0x1F == KIND_STRUCT and info & 0xFFFF:
                    return tid
        raise BTFError(f"no struct {name}")

    def _members(self, tid: int):  # type: ignore[no-untyped-def]
        words, pos = self._words, self._offsets[tid]
        info = words[pos + 1]
        bitfields = bool(info >> 31)
        for i in range(info & 0xFFFF):
            at = pos + 3 + 3 * i
            name_off, mtype, offset = words[at], words[at + 1], words[at + 2]
            yield name_off, mtype, (offset & 0xFFFFFF) if bitfields else offset

    def _find(self, tid: int, member: str, base: int) -> int | None:
        for name_off, mtype, bits in self._members(tid):
            if name_off and self._name(name_off) == member:
                return base + bits
            if not name_off:  # an anonymous struct or union: its members are this one's
                kind = (self._words[self._offsets[mtype] + 1] >> 24) & 0x1F
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
