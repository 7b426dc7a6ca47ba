"""The fentry/fexit probe mode gives the very counts the kprobe mode gives.

The exact-count tests of test_exporter.py run again here, against an
exporter started with probes.mode fentry (pytest collects the imported
tests in this module, where `exporter` is the fixture below).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from conftest import PREEMPT, Exporter, preemption_model
from test_exporter import (  # noqa: F401 (collected here, with this module's exporter)
    test_32_kernel_threads_at_once_are_exact,
    test_exact_counts_in_tracer_and_metrics,
    test_skipped_runs_are_the_kernels_recursion_misses,
    test_untracked_work_is_not_counted,
)

pytestmark = pytest.mark.guest


@pytest.fixture(scope="module")
def exporter(tmp_path_factory):
    config = tmp_path_factory.mktemp("fentry") / "config.yaml"
    config.write_text("probes:\n  mode: fentry\n")
    exp = Exporter("--config.file", str(config), log_name="fentry")
    try:
        exp.wait_ready()
        yield exp
    finally:
        code = exp.stop()
        sys.stderr.write(f"--- exporter log ({exp.log_path}) ---\n{exp.log()[-4000:]}\n")
    assert code == 0


def trampolines_expected() -> bool:
    """Kernel BTF and bpf_get_func_arg/ret (5.17): what the fentry mode needs."""
    major, minor = (int(x) for x in os.uname().release.split(".")[:2])
    return (major, minor) >= (5, 17) and Path("/sys/kernel/btf/vmlinux").exists()


@pytest.fixture(autouse=True)
def _trampolines_only(request, exporter):
    """Where the mode fell back to kprobes, the kprobe-mode tests already cover the counts."""
    if request.node.name != "test_fentry_mode_is_in_use_or_falls_back_clearly" and "using kprobes" in exporter.log():
        pytest.skip("no fentry on this kernel: the exporter runs in kprobe mode, tested by test_exporter.py")


@pytest.mark.exact
def test_fentry_mode_is_in_use_or_falls_back_clearly(exporter):
    log = exporter.log()
    events = Path("/sys/kernel/tracing/kprobe_events").read_text()
    if not trampolines_expected():
        assert "probes.mode fentry is not available (" in log and "); using kprobes" in log, log
        return
    model = preemption_model()
    if model in ("full", "lazy", "rt"):
        # trixie-backports: its 7.3 preempts BPF programs, so fentry would lose calls.
        assert (
            f"probes.mode fentry is not available (the kernel preempts BPF programs (preemption model {model}, from"
            in log
        ), log
        assert "); using kprobes" in log
        return
    # BTF and trampolines, no preemption (bookworm, trixie): no fallback.
    assert "probes.mode fentry: " in log and "trampoline programs attached" in log, log
    assert "using kprobes" not in log
    # No kprobe events: trampolines need none.
    assert f"_bcc_{exporter.proc.pid}" not in events


@pytest.mark.exact
def test_fentry_falls_back_when_the_kernel_is_switched_to_full_preemption(tmp_path):
    """A dynamic kernel switched to full preemption at run time: fentry would lose calls, so kprobes it is."""
    if not trampolines_expected() or not PREEMPT.exists() or preemption_model() != "voluntary":
        pytest.skip("needs fentry support and a dynamic kernel running voluntary preemption (bookworm, trixie)")
    config = tmp_path / "config.yaml"
    config.write_text("probes:\n  mode: fentry\n")
    PREEMPT.write_text("full")
    try:
        exp = Exporter("--config.file", str(config), log_name="fentry-full")
        try:
            exp.wait_ready()
            log = exp.log()
            assert (
                "probes.mode fentry is not available (the kernel preempts BPF programs (preemption model full,"
                " from /sys/kernel/debug/sched/preempt)" in log
            ), log
            assert "probes.mode fentry: " not in log
            attached = [v for (name, _), v in exp.metrics().items() if name == "tracer_probe_attached"]
            assert attached and all(v == 1 for v in attached)
            # Return probes on the kmalloc entry points: the kprobe mode is in use.
            assert f"_bcc_{exp.proc.pid}" in Path("/sys/kernel/tracing/kprobe_events").read_text()
        finally:
            assert exp.stop() == 0
    finally:
        PREEMPT.write_text("voluntary")
    assert preemption_model() == "voluntary"
