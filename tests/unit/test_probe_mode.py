"""probes.mode in the config, and the fentry attach points handed to the BPF program."""

from __future__ import annotations

import pytest

from tracer_exporter.config import ConfigError, parse_config
from tracer_exporter.probes import MODE_FENTRY, cflags, fentry_probes
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
