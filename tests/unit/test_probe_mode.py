"""probes.mode in the config, and the fentry attach points handed to the BPF program."""

from __future__ import annotations

import pytest

from tracer_exporter.kernel.contract import FILTER_SLOTS
from tracer_exporter.kernel.program import (
    AUTO_FENTRY_REASON,
    MODE_FENTRY,
    cflags,
    choose_mode,
    fentry_probes,
    kernel_version,
    task_btf,
)
from tracer_exporter.kernel.symbols import resolve
from tracer_exporter.model.config import ConfigError, parse_config


def test_the_default_mode_is_auto():
    assert parse_config({}).probe_mode == "auto"
    assert parse_config({"probes": {"mode": "fentry"}}).probe_mode == "fentry"
    assert parse_config({"probes": {"mode": "kprobe"}}).probe_mode == "kprobe"


def test_auto_takes_fentry_only_where_it_is_exact_and_says_why():
    assert choose_mode("auto", "") == ("fentry", AUTO_FENTRY_REASON)
    preempts = "the kernel preempts BPF programs (preemption model lazy, from /sys/kernel/debug/sched/preempt)"
    assert choose_mode("auto", preempts) == ("kprobe", preempts)
    assert choose_mode("fentry", "") == ("fentry", "")
    assert choose_mode("fentry", preempts) == ("kprobe", preempts)
    # An explicit kprobe never looks further.
    assert choose_mode("kprobe", "") == ("kprobe", "")


def test_kernel_versions():
    assert kernel_version("5.10.0-35-amd64") == (5, 10) and kernel_version("7.3.4+bpo-amd64") == (7, 3)
    assert kernel_version("weird") is None


def test_an_unknown_mode_names_the_field_and_the_choices():
    with pytest.raises(ConfigError) as e:
        parse_config({"probes": {"mode": "uprobe"}}, "c.yaml")
    assert str(e.value) == "c.yaml: probes.mode: expected one of auto, kprobe, fentry, got 'uprobe'"


def test_fentry_items_follow_the_plan():
    plan = resolve({"__kmalloc", "kmalloc_trace", "kfree", "schedule", "up", "down_interruptible", "mutex_lock",
                    "mutex_unlock"})  # fmt: skip
    items = fentry_probes(plan).split(" ")
    assert "KMALLOC(__kmalloc," in items and "KMALLOC(kmalloc_trace," in items
    text = fentry_probes(plan)
    assert "KMALLOC(__kmalloc, 1)" in text and "KMALLOC(kmalloc_trace, 3)" in text
    assert "KFREE(kfree)" in text and "CALLS(mutex_unlock, mutex_unlock_enter)" in text
    assert text.count("CALLS(") == 5


def test_only_the_fentry_mode_compiles_the_trampolines():
    config = parse_config({})
    plan = resolve({"kfree"})
    assert not any(f.startswith("-DFENTRY_PROBES") for f in cflags(config, plan))
    assert "-DFENTRY_PROBES=KFREE(kfree)" in cflags(config, plan, MODE_FENTRY)


def test_task_btf_needs_5_11_and_kernel_btf(tmp_path):
    btf = tmp_path / "vmlinux"
    btf.write_bytes(b"")
    assert task_btf("6.1.0-56-amd64", btf) and task_btf("5.11.0", btf) and task_btf("7.3.4+bpo-amd64", btf)
    assert not task_btf("5.10.0-35-amd64", btf)
    assert not task_btf("6.12.0", tmp_path / "missing")
    assert not task_btf("weird", btf)


def test_task_btf_and_the_filter_size_reach_the_program():
    config = parse_config({})
    assert "-DTASK_BTF" in cflags(config, with_task_btf=True)
    assert "-DTASK_BTF" not in cflags(config)
    assert f"-DFILTER_SLOTS={FILTER_SLOTS}" in cflags(config)
    assert FILTER_SLOTS & (FILTER_SLOTS - 1) == 0  # the program masks with FILTER_SLOTS - 1


def test_the_inflight_map_is_sized_by_its_own_limit():
    assert "-DMAX_INFLIGHT=4096" in cflags(parse_config({}))
    assert "-DMAX_INFLIGHT=32" in cflags(parse_config({"limits": {"inflight_map_entries": 32}}))


def test_the_preempt_count_location_reaches_the_program():
    from tracer_exporter.kernel.symbols import KernelData, PreemptCount

    config = parse_config({})
    flags = cflags(config, kernel=KernelData(PreemptCount(0xFFFFFFFF8241CB60, 0x1FB40, False), 0xFFFFFFFF82E0E8A8))
    assert "-DPER_CPU_OFFSETS=0xffffffff8241cb60ULL" in flags and "-DPREEMPT_COUNT_VAR=0x1fb40ULL" in flags
    assert "-DVMALLOC_BASE=0xffffffff82e0e8a8ULL" in flags
    assert "-DPREEMPT_COUNT_IN_PCPU_HOT" not in flags
    assert "-DPREEMPT_COUNT_IN_PCPU_HOT" in cflags(config, kernel=KernelData(PreemptCount(1, 2, True), 0))
    assert not any(f.startswith(("-DPREEMPT_COUNT", "-DVMALLOC")) for f in cflags(config, kernel=KernelData(None, 0)))


def test_btf_offsets_replace_the_sched_headers():
    from tracer_exporter.kernel.symbols import KernelData, PreemptCount

    config = parse_config({})
    offsets = {"task_struct.stack": 24, "task_struct.tgid": 1268, "task_struct.signal": 1848, "signal_struct.live": 4}
    flags = cflags(config, kernel=KernelData(PreemptCount(1, 0x1FB40, False), 0, offsets))
    assert "-DTASK_OFFSETS" in flags
    assert {"-DTASK_STACK_OFF=24", "-DTASK_TGID_OFF=1268", "-DTASK_SIGNAL_OFF=1848", "-DSIGNAL_LIVE_OFF=4"} <= set(
        flags
    )
    assert "-DPREEMPT_COUNT_VAR=0x1fb40ULL" in flags
    # In pcpu_hot (6.2 to 6.14) the field's offset is added here, not in the program.
    hot = cflags(config, kernel=KernelData(PreemptCount(1, 0x35000, True), 0, {**offsets, "pcpu_hot.preempt_count": 8}))
    assert "-DPREEMPT_COUNT_VAR=0x35008ULL" in hot and "-DPREEMPT_COUNT_IN_PCPU_HOT" not in hot
    assert "-DTASK_OFFSETS" not in cflags(config, kernel=KernelData(None, 0))
