"""The fentry/fexit probe mode: in use where the kernel allows it, a clear
fallback where it does not. Its counts are those of the kprobe mode: the
exact-count tests run in both (conftest's any_mode).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import PREEMPT, Exporter, preemption_model, trampolines_expected

pytestmark = pytest.mark.guest


@pytest.mark.exact
def probe_mode(exporter) -> dict[str, str]:
    """The labels of tracer_probe_mode_info's one sample."""
    (labels,) = [dict(k) for (name, k), v in exporter.metrics().items() if name == "tracer_probe_mode_info" and v == 1]
    return labels


def test_fentry_mode_is_in_use_or_falls_back_clearly(fentry_exporter):
    exporter = fentry_exporter
    log = exporter.log()
    mode = probe_mode(exporter)
    events = Path("/sys/kernel/tracing/kprobe_events").read_text()
    if not trampolines_expected():
        assert "probes.mode fentry is not available (" in log and "); using kprobes" in log, log
        assert mode["mode"] == "kprobe" and mode["requested"] == "fentry" and mode["reason"], mode
        return
    model = preemption_model()
    if model in ("full", "lazy", "rt"):
        # trixie-backports: its 7.3 preempts BPF programs, so fentry would lose calls.
        assert (
            f"probes.mode fentry is not available (the kernel preempts BPF programs (preemption model {model}, from"
            in log
        ), log
        assert "); using kprobes" in log
        assert (mode["mode"], mode["requested"]) == ("kprobe", "fentry")
        assert mode["reason"].startswith(f"the kernel preempts BPF programs (preemption model {model}, from"), mode
        return
    # BTF and trampolines, no preemption (bookworm, trixie): no fallback.
    assert mode == {"mode": "fentry", "requested": "fentry", "reason": ""}
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
            mode = probe_mode(exp)
            assert (mode["mode"], mode["requested"]) == ("kprobe", "fentry")
            assert mode["reason"].startswith("the kernel preempts BPF programs (preemption model full,"), mode
            attached = [v for (name, _), v in exp.metrics().items() if name == "tracer_probe_attached"]
            assert attached and all(v == 1 for v in attached)
            # Return probes on the kmalloc entry points: the kprobe mode is in use.
            assert f"_bcc_{exp.proc.pid}" in Path("/sys/kernel/tracing/kprobe_events").read_text()
        finally:
            assert exp.stop() == 0
    finally:
        PREEMPT.write_text("voluntary")
    assert preemption_model() == "voluntary"
