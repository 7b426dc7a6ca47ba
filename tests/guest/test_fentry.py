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
from conftest import Exporter
from test_exporter import (  # noqa: F401 (collected here, with this module's exporter)
    test_32_kernel_threads_at_once_are_exact,
    test_exact_counts_in_tracer_and_metrics,
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
    # BTF and trampolines (bookworm, trixie, trixie-backports): no fallback.
    assert "probes.mode fentry: " in log and "trampoline programs attached" in log, log
    assert "using kprobes" not in log
    # No kprobe events: trampolines need none.
    assert f"_bcc_{exporter.proc.pid}" not in events
