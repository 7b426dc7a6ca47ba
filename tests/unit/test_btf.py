"""The BTF reader, on BTF blobs built here in the kernel's format."""

from __future__ import annotations

import struct

import pytest

from tracer_exporter.kernel import btf


class Builder:
    """Types and strings of a BTF blob; ids from 1 in the order added."""

    def __init__(self) -> None:
        self.strings = b"\0"
        self.types = b""
        self.count = 0

    def name(self, text: str) -> int:
        if not text:
            return 0
        at = self.strings.find(b"\0" + text.encode() + b"\0")
        if at >= 0:
            return at + 1
        self.strings += text.encode() + b"\0"
        return len(self.strings) - len(text) - 1

    def add(self, name: str, kind: int, vlen: int, size_or_type: int, extra: bytes = b"", bits: bool = False) -> int:
        info = (int(bits) << 31) | (kind << 24) | vlen
        self.types += struct.pack("<III", self.name(name), info, size_or_type) + extra
        self.count += 1
        return self.count

    def int_(self, name: str, size: int) -> int:
        return self.add(name, 1, 0, size, struct.pack("<I", size * 8))

    def struct_(self, name: str, members: list[tuple[str, int, int]], kind: int = 4, bits: bool = False) -> int:
        body = b"".join(struct.pack("<III", self.name(m), t, off) for m, t, off in members)
        return self.add(name, kind, len(members), 64, body, bits)

    def blob(self, magic: int = btf.MAGIC) -> bytes:
        header = struct.pack("<HBBIIIII", magic, 1, 0, 24, 0, len(self.types), len(self.types), len(self.strings))
        return header + self.types + self.strings


def kernel_like() -> bytes:
    b = Builder()
    i32 = b.int_("int", 4)
    ptr = b.add("", 2, 0, 0)  # void *
    b.add("task_struct", 4, 0, 0)  # a forward declaration first (vlen 0): skipped
    b.add("", 13, 2, 0, struct.pack("<IIII", 0, i32, 0, ptr))  # a FUNC_PROTO between, with its params
    pids = b.struct_("", [("pid", i32, 0), ("tgid", i32, 32)], kind=5)  # anonymous union
    b.struct_("task_struct", [("__state", i32, 0), ("stack", ptr, 64), ("", pids, 1024), ("signal", ptr, 2048)])
    b.struct_("signal_struct", [("sigcnt", i32, 0), ("live", i32, 32)])
    inner = b.struct_("", [("current_task", ptr, 0), ("preempt_count", i32, 64)])
    outer = b.struct_("", [("", inner, 0)], kind=5)
    b.struct_("pcpu_hot", [("", outer, 0)])
    b.struct_("flags_only", [("a", i32, (1 << 24) | 3)], bits=True)
    return b.blob()


def test_offsets_of_direct_and_anonymous_members():
    t = btf.BTF(kernel_like())
    assert t.offset("task_struct.stack") == 8
    assert t.offset("task_struct.tgid") == 132  # in the anonymous union at byte 128
    assert t.offset("task_struct.signal") == 256
    assert t.offset("signal_struct.live") == 4
    assert t.offset("pcpu_hot.preempt_count") == 8  # two anonymous levels down


def test_field_offsets_reads_a_file(tmp_path):
    path = tmp_path / "vmlinux"
    path.write_bytes(kernel_like())
    offsets = btf.field_offsets(path, (*btf.FIELDS, btf.PCPU_HOT_PREEMPT_COUNT))
    assert offsets == {
        "task_struct.stack": 8,
        "task_struct.tgid": 132,
        "task_struct.signal": 256,
        "signal_struct.live": 4,
        "pcpu_hot.preempt_count": 8,
    }


@pytest.mark.parametrize(
    ("field", "error"),
    [
        ("mm_struct.pgd", "no struct mm_struct"),
        ("task_struct.mm", "struct task_struct has no member mm"),
        ("flags_only.a", "flags_only.a is a bit field"),
    ],
)
def test_what_is_not_there_is_named(field, error):
    with pytest.raises(btf.BTFError, match=error):
        btf.BTF(kernel_like()).offset(field)


def test_not_btf_is_an_error(tmp_path):
    with pytest.raises(btf.BTFError, match="bad magic 0x1234"):
        btf.BTF(Builder().blob(magic=0x1234))
    with pytest.raises(btf.BTFError, match="shorter than a BTF header"):
        btf.BTF(b"\x9f\xeb")
    with pytest.raises(btf.BTFError, match="No such file"):
        btf.field_offsets(tmp_path / "none")


def test_an_unknown_kind_is_an_error():
    b = Builder()
    b.add("future", 30, 0, 0)
    with pytest.raises(btf.BTFError, match="unknown kind 30 at type 1"):
        btf.BTF(b.blob())


def test_a_cut_or_misaligned_type_section_is_an_error():
    b = Builder()
    b.int_("int", 4)
    b.struct_("s", [("a", 1, 0), ("b", 1, 32)])
    b.types = b.types[:-12]  # the struct says 2 members; the section holds 1
    with pytest.raises(btf.BTFError, match="runs past the type section"):
        btf.BTF(b.blob())
    b.types += b"\0\0"
    with pytest.raises(btf.BTFError, match="not whole 32-bit words"):
        btf.BTF(b.blob())
    # A header that claims more types than the data holds.
    header = struct.pack("<HBBIIIII", btf.MAGIC, 1, 0, 24, 0, 1200, 1200, 1)
    with pytest.raises(btf.BTFError, match="ends at byte 1224, past the data's 36"):
        btf.BTF(header + b"\0" * 12)
