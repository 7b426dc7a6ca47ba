"""probes.mode in the config, and the fentry attach points handed to the BPF program."""

from __future__ import annotations

import pytest

from tracer_exporter.config import ConfigError, parse_config
from tracer_exporter.probes import FILTER_SLOTS, MODE_FENTRY, cflags, fentry_probes, task_btf
from tracer_exporter.symbols import resolve


def test_the_default_mode_is_kprobe():
    assert parse_config({}).probe_mode == "kprobe"
    assert parse_config({"probes": {"mode": "fentry"}}).probe_mode == "fentry"


def test_an_unknown_mode_names_the_field_and_the_choices():
    with pytest.raises(ConfigError) as e:
        parse_config({"probes": {"mode": "uprobe"}}, "c.yaml")
    assert str(e.value) == "c.yaml: probes.mode: expected one of kprobe, fentry, got 'uprobe'"


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
