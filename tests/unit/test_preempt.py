"""Reading the kernel's preemption model, which decides whether fentry can be exact."""

from __future__ import annotations

import gzip

from tracer_exporter import preempt
from tracer_exporter.preempt import cmdline_mode, config_mode, debugfs_mode, fentry_hazard, model

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
