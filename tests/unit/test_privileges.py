"""Capabilities: the masks read from /proc and what is kept (the drop itself is a guest test)."""

import pytest

from tracer_exporter.privileges import CAP, mask_of, names, parse_caps, to_keep

STATUS = """\
Name:\tpython3
CapInh:\t0000000000000000
CapPrm:\t000001ffffffffff
CapEff:\t0000008000800000
CapBnd:\t000001ffffffffff
CapAmb:\t0000000000000000
"""


def test_parse_caps_and_names():
    assert parse_caps(STATUS) == (1 << 39) | (1 << 23)
    assert names(parse_caps(STATUS)) == ["CAP_SYS_NICE", "CAP_BPF"]
    assert len(names(parse_caps(STATUS, "CapPrm"))) == 41
    assert names(parse_caps(STATUS, "CapInh")) == []
    with pytest.raises(ValueError, match="no CapXyz line"):
        parse_caps(STATUS, "CapXyz")


def test_what_is_kept():
    everything = (1 << 41) - 1
    assert names(to_keep(everything, 40)) == ["CAP_SYS_NICE", "CAP_BPF"]
    # Before 5.8 there is no CAP_BPF: bpf() needs CAP_SYS_ADMIN, which then stays.
    before = everything & ~mask_of(["CAP_BPF", "CAP_PERFMON", "CAP_CHECKPOINT_RESTORE"])
    assert names(to_keep(before, 37)) == ["CAP_SYS_ADMIN", "CAP_SYS_NICE"]
    # Never more than the process had.
    assert names(to_keep(mask_of(["CAP_BPF", "CAP_PERFMON"]), 40)) == ["CAP_BPF"]
    assert CAP["CAP_SYS_ADMIN"] == 21 and CAP["CAP_CHECKPOINT_RESTORE"] == 40
