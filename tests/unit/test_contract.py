"""bpf/tracer.h against tracer_exporter/kernel/contract.py: drift fails here, on the host."""

from __future__ import annotations

import re
import struct
from pathlib import Path

from tracer_exporter.kernel import contract
from tracer_exporter.model import selectors
from tracer_exporter.model.counters import Counts

HEADER = Path(__file__).resolve().parents[2] / "tracer_exporter" / "kernel" / "bpf" / contract.HEADER_NAME
PROGRAM = HEADER.with_name("tracer.bpf.c")
# C types of the header, as struct format characters (native sizes, no padding: "=").
FORMATS = {"u64": "Q", "u32": "I", "s32": "i", "char": "s"}


def header() -> str:
    return re.sub(r"/\*.*?\*/", "", HEADER.read_text(), flags=re.S)


def members(name: str) -> list[tuple[str, str, str]]:
    """(type, field, array length or "") of struct @name."""
    body = re.search(rf"struct {name} \{{(.*?)\}};", header(), re.S)
    assert body, f"no struct {name} in {HEADER.name}"
    return re.findall(r"(\w+)\s+(\w+)(?:\[(\w+)\])?;", body[1])


def layout(fields: list[tuple[str, str, str]]) -> str:
    out = "="
    for ctype, _, length in fields:
        n = contract.TASK_COMM_LEN if length == "TASK_COMM_LEN" else int(length or 1)
        out += f"{n}s" if ctype == "char" else FORMATS[ctype] * n
    return out


def test_struct_counters_is_the_layout_user_space_reads():
    fields = members("counters")
    assert [f for _, f, _ in fields] == [*contract.COUNTER_FIELDS, "parent", "flags", "comm"]
    assert struct.calcsize(layout(fields)) == contract.COUNTERS.size
    assert layout(fields) == "=" + "Q" * 9 + "II16s" and contract.COUNTERS.format == "=9QII16s"
    # And the Python counters are the same, in the same order.
    assert Counts._fields == contract.COUNTER_FIELDS


def test_the_track_flags_agree():
    defines = dict(re.findall(r"#define (TRACK_\w+)\s+(\d+)", header()))
    assert defines == {
        n: str(getattr(contract, n)) for n in ("TRACK_FOLLOW", "TRACK_KEEP", "TRACK_BY_EXEC", "TRACK_BY_CGROUP")
    }


def test_the_group_constants_agree():
    defines = dict(re.findall(r"#define (\w+)\s+(0x[0-9a-fA-F]+|\d+)(?:ULL)?\b", header()))
    for name in ("GROUP_SHIFT", "CGROUP_SELECTED", "EXE_LEN", "CGROUP_PATH_LEN", "FNV_BASIS", "FNV_PRIME"):
        assert int(defines[name], 0) == getattr(contract, name), name
    # The config's length checks are the keys' sizes less the NUL.
    assert selectors.COMM_MAX == contract.TASK_COMM_LEN - 1 and selectors.EXE_MAX == contract.EXE_LEN - 1
    # Group ids fit the flags' upper half.
    assert selectors.MAX_GROUPS_LIMIT < 1 << (32 - contract.GROUP_SHIFT)
    # And a flag bit never reaches the group id.
    assert contract.CGROUP_SELECTED < 1 << contract.GROUP_SHIFT


def test_the_path_hash_is_fnv1a():
    # The published FNV-1a 64 test vectors.
    assert contract.path_hash("") == 0xCBF29CE484222325
    assert contract.path_hash("a") == 0xAF63DC4C8601EC8C
    assert contract.path_hash("foobar") == 0x85944171F73967E8


def test_enum_stat_is_in_the_order_user_space_indexes():
    body = re.search(r"enum stat \{(.*?)\};", header(), re.S)
    assert body
    names = re.findall(r"(STAT_\w+)", body[1])
    assert names == sorted((n for n in vars(contract) if n.startswith("STAT_")), key=lambda n: getattr(contract, n))
    assert [getattr(contract, n) for n in names] == list(range(len(names)))


def test_the_filter_slots_and_their_layout_agree():
    (default,) = re.findall(r"#define FILTER_SLOTS (\d+)", header())
    assert int(default) == contract.FILTER_SLOTS
    assert contract.FILTER_SLOTS & (contract.FILTER_SLOTS - 1) == 0  # a power of two: slots are masked
    assert layout(members("tracked_slot")) == contract.TRACKED_SLOT.format


def test_the_program_defines_none_of_it_again():
    program = PROGRAM.read_text()
    assert '#include "tracer.h"' in program
    for name in ("struct counters {", "enum stat {", "struct tracked_slot {", "#define TRACK_", "#define FILTER_SLOTS"):
        assert name not in program, name
