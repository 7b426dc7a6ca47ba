"""Reading the kernel's preemption model, which decides whether fentry can be exact."""

from __future__ import annotations

import gzip
import os

import pytest

from tracer_exporter.kernel import preempt
from tracer_exporter.kernel.preempt import Unpreempted, cmdline_mode, config_mode, debugfs_mode, fentry_hazard, model

DYNAMIC = "#1 SMP PREEMPT_DYNAMIC Debian 7.3.4-1~bpo13+1 (2026-11-15)"
LAZY_CONFIG = (
    "CONFIG_PREEMPT_BUILD=y\nCONFIG_ARCH_HAS_PREEMPT_LAZY=y\n# CONFIG_PREEMPT is not set\nCONFIG_PREEMPT_LAZY=y\n"
)
VOLUNTARY_CONFIG = "CONFIG_PREEMPT_BUILD=y\nCONFIG_PREEMPT_VOLUNTARY=y\nCONFIG_PREEMPT_DYNAMIC=y\n"


def test_debugfs_names_the_current_model_in_parentheses():
    assert debugfs_mode("none (voluntary) full \n") == "voluntary"  # Debian 12 and 13
    assert debugfs_mode("full (lazy) \n") == "lazy"  # Debian's 7.3
    assert debugfs_mode("(full) lazy\n") == "full"
    assert debugfs_mode("") is None


def test_the_boot_parameter_and_the_config_default():
    assert cmdline_mode("BOOT_IMAGE=/vmlinuz root=/dev/vda ro preempt=full quiet") == "full"
    assert cmdline_mode("preempt=none") == "none"
    assert cmdline_mode("root=/dev/vda nopreempt=full") is None
    assert config_mode(LAZY_CONFIG) == "lazy"
    assert config_mode(VOLUNTARY_CONFIG) == "voluntary"
    assert config_mode("CONFIG_PREEMPT=y\nCONFIG_PREEMPT_RT=y\n") == "rt"
    assert config_mode("CONFIG_PREEMPT=y\n") == "full"
    assert config_mode("# CONFIG_PREEMPT is not set\n") is None


def test_a_dynamic_kernel_prefers_debugfs_then_the_command_line_then_the_config():
    assert model(DYNAMIC, "full (lazy)", "preempt=full", VOLUNTARY_CONFIG) == ("lazy", str(preempt.DEBUGFS_PREEMPT))
    assert model(DYNAMIC, None, "ro preempt=full", VOLUNTARY_CONFIG) == ("full", "preempt= on the kernel command line")
    assert model(DYNAMIC, None, "ro", VOLUNTARY_CONFIG) == ("voluntary", "the kernel config's default")
    mode, why = model(DYNAMIC, None, "ro", None)
    assert mode is None and "neither /sys/kernel/debug/sched/preempt nor its config could be read" in why


def test_a_static_kernel_says_it_in_uname():
    assert model("#1 SMP PREEMPT_RT Debian 6.12.1-1", None, "", None) == ("rt", "uname -v")
    assert model("#1 SMP PREEMPT Tue Jan 1", None, "", None) == ("full", "uname -v")
    assert model("#1 SMP PREEMPT Tue Jan 1", None, "", LAZY_CONFIG) == ("lazy", "uname -v")
    assert model("#1 SMP Debian 5.10.1-1", None, "preempt=full", None) == ("voluntary", "uname -v")
    assert model("#1 SMP Debian 5.10.1-1", None, "", "CONFIG_PREEMPT_NONE=y\n") == ("none", "uname -v")


def test_only_a_model_that_preempts_bpf_programs_rules_fentry_out():
    assert fentry_hazard("voluntary", "uname -v") == ""
    assert fentry_hazard("none", "uname -v") == ""
    why = fentry_hazard("lazy", "/sys/kernel/debug/sched/preempt")
    assert "preemption model lazy, from /sys/kernel/debug/sched/preempt" in why
    assert "skipped there for every other task" in why
    assert fentry_hazard(None, "no config").startswith(
        "cannot tell whether the kernel preempts BPF programs (no config"
    )


def test_current_reads_the_files_of_the_running_kernel(tmp_path, monkeypatch):
    packed = tmp_path / "config.gz"
    packed.write_bytes(gzip.compress(LAZY_CONFIG.encode()))
    assert preempt._read(packed) == LAZY_CONFIG
    assert preempt._read(tmp_path / "absent") is None
    files = {"/proc/config.gz": LAZY_CONFIG, "/proc/cmdline": "ro quiet"}
    monkeypatch.setattr(preempt, "_read", lambda p: files.get(str(p)))
    monkeypatch.setattr(preempt.platform, "version", lambda: DYNAMIC)
    monkeypatch.setattr(preempt.platform, "release", lambda: "7.3.4+deb13-amd64")
    assert preempt.current() == ("lazy", "the kernel config's default")
    files["/boot/config-7.3.4+deb13-amd64"] = VOLUNTARY_CONFIG  # before /proc/config.gz
    assert preempt.current() == ("voluntary", "the kernel config's default")
    files["/proc/cmdline"] = "ro preempt=full"
    assert preempt.current() == ("full", "preempt= on the kernel command line")
    files["/sys/kernel/debug/sched/preempt"] = "full (lazy) \n"
    assert preempt.current() == ("lazy", "/sys/kernel/debug/sched/preempt")


class FakeSched:
    """os.sched_* of one thread."""

    def __init__(self, policy: int = os.SCHED_OTHER, fail: bool = False) -> None:
        self.policy, self.priority, self.fail = policy, 0, fail
        self.calls: list[tuple[int, int]] = []

    def install(self, monkeypatch) -> None:
        monkeypatch.setattr(preempt.os, "sched_getscheduler", lambda pid: self.policy)
        monkeypatch.setattr(preempt.os, "sched_getparam", lambda pid: os.sched_param(self.priority))
        monkeypatch.setattr(preempt.os, "sched_setscheduler", self.set)

    def set(self, pid: int, policy: int, param: os.sched_param) -> None:
        assert pid == 0  # the calling thread only
        if self.fail:
            raise PermissionError(1, "Operation not permitted")
        self.calls.append((policy, param.sched_priority))
        self.policy, self.priority = policy & ~os.SCHED_RESET_ON_FORK, param.sched_priority


def test_map_syscalls_run_real_time_and_the_policy_comes_back(monkeypatch):
    sched = FakeSched()
    sched.install(monkeypatch)
    unpreempted = Unpreempted()
    with unpreempted():
        assert (sched.policy, sched.priority) == (os.SCHED_FIFO, 1)
    # Children never inherit it; the thread is ordinary again after the block, even after an error.
    assert sched.calls == [(os.SCHED_FIFO | os.SCHED_RESET_ON_FORK, 1), (os.SCHED_OTHER, 0)]
    with pytest.raises(KeyError), unpreempted():
        raise KeyError("boom")
    assert (sched.policy, sched.priority) == (os.SCHED_OTHER, 0)


def test_a_thread_already_real_time_is_left_alone(monkeypatch):
    sched = FakeSched(policy=os.SCHED_RR)
    sched.install(monkeypatch)
    with Unpreempted()():
        pass
    assert sched.calls == []


def test_without_the_privilege_it_warns_once_and_goes_on(monkeypatch, caplog):
    sched = FakeSched(fail=True)
    sched.install(monkeypatch)
    unpreempted = Unpreempted()
    for _ in range(3):
        with unpreempted():
            pass
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "cannot run BPF map reads and writes as SCHED_FIFO" in warnings[0]
    assert not unpreempted.enabled
