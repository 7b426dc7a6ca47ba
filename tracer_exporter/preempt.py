"""Whether the running kernel preempts BPF programs.

A fentry program runs with preemption enabled where the kernel's model is
"full", "lazy" or "rt". The kernel guards each program with a per-CPU
recursion count, so while one task is preempted inside the program every
other task on that CPU skips it (the program's recursion_misses): calls of
tracked threads would be lost. kprobe programs run with preemption disabled.
"""

from __future__ import annotations

import gzip
import platform
import re
from pathlib import Path

PREEMPTIBLE = frozenset({"full", "lazy", "rt"})
DEBUGFS_PREEMPT = Path("/sys/kernel/debug/sched/preempt")
# Kernel config, most specific option first: a lazy or RT build also sets CONFIG_PREEMPT_BUILD.
CONFIG_MODES = (
    ("CONFIG_PREEMPT_RT", "rt"),
    ("CONFIG_PREEMPT_LAZY", "lazy"),
    ("CONFIG_PREEMPT", "full"),
    ("CONFIG_PREEMPT_VOLUNTARY", "voluntary"),
    ("CONFIG_PREEMPT_NONE", "none"),
)


def debugfs_mode(text: str) -> str | None:
    """The current model in /sys/kernel/debug/sched/preempt: the one in parentheses."""
    m = re.search(r"\((\w+)\)", text)
    return m[1] if m else None


def cmdline_mode(cmdline: str) -> str | None:
    """The preempt= boot parameter, which overrides a dynamic kernel's default."""
    m = re.search(r"(?:^|\s)preempt=(\w+)", cmdline)
    return m[1] if m else None


def config_mode(config: str) -> str | None:
    """The default model a kernel was built with."""
    options = set(re.findall(r"^(CONFIG_PREEMPT\w*)=y$", config, re.M))
    return next((mode for option, mode in CONFIG_MODES if option in options), None)


def model(version: str, debugfs: str | None, cmdline: str, config: str | None) -> tuple[str | None, str]:
    """The preemption model and where it was read, or (None, what was missing).

    version is `uname -v`, whose build flags say PREEMPT_RT, PREEMPT_DYNAMIC,
    PREEMPT (full or lazy), or nothing (none or voluntary)."""
    flags = version.split("#", 1)[-1].split()
    if "PREEMPT_RT" in flags:
        return "rt", "uname -v"
    if "PREEMPT_DYNAMIC" in flags:
        if debugfs is not None and (mode := debugfs_mode(debugfs)):
            return mode, str(DEBUGFS_PREEMPT)
        if mode := cmdline_mode(cmdline):
            return mode, "preempt= on the kernel command line"
        if config is not None and (mode := config_mode(config)):
            return mode, "the kernel config's default"
        return None, f"a dynamic kernel, and neither {DEBUGFS_PREEMPT} nor its config could be read"
    if "PREEMPT" in flags:
        return (config_mode(config) if config else None) or "full", "uname -v"
    return (config_mode(config) if config else None) or "voluntary", "uname -v"


def _read(path: Path) -> str | None:
    try:
        if path.suffix == ".gz":
            return gzip.decompress(path.read_bytes()).decode(errors="replace")
        return path.read_text(errors="replace")
    except OSError:
        return None


def current() -> tuple[str | None, str]:
    """model() for the running kernel."""
    release = platform.release()
    config = _read(Path(f"/boot/config-{release}")) or _read(Path("/proc/config.gz"))
    return model(platform.version(), _read(DEBUGFS_PREEMPT), _read(Path("/proc/cmdline")) or "", config)


def fentry_hazard(mode: str | None, source: str) -> str:
    """Why fentry programs would lose tracked calls under this model, or ""."""
    if mode is None:
        return f"cannot tell whether the kernel preempts BPF programs ({source})"
    if mode in PREEMPTIBLE:
        return (
            f"the kernel preempts BPF programs (preemption model {mode}, from {source}), and a fentry"
            " program preempted on a CPU is skipped there for every other task until it resumes"
        )
    return ""
