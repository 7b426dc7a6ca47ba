"""The fentry/fexit probe mode gives the very counts the kprobe mode gives.

The exact-count tests of test_exporter.py run again here, against an
exporter started with probes.mode fentry (pytest collects the imported
tests in this module, where `exporter` is the fixture below).
"""

from __future__ import annotations

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


def test_fentry_mode_is_in_use(exporter):
    # Both test kernels have BTF and trampolines: no fallback to kprobes.
    log = exporter.log()
    assert "probes.mode fentry: " in log and "trampoline programs attached" in log, log
    assert "using kprobes" not in log
    # No kprobe events: trampolines need none.
    assert f"_bcc_{exporter.proc.pid}" not in Path("/sys/kernel/tracing/kprobe_events").read_text()
