"""Whether the running kernel preempts BPF programs, and keeping our map
syscalls from being preempted where it does.

A fentry program runs with preemption enabled where the kernel's model is
"full", "lazy" or "rt". The kernel guards each program with a per-CPU
recursion count, so while one task is preempted inside the program every
other task on that CPU skips it (the program's recursion_misses): calls of
tracked threads would be lost. kprobe programs run with preemption disabled,
but a BPF map syscall holds its CPU's guard for kprobe programs
(bpf_prog_active) with preemption enabled: see Unpreempted.
"""

from __future__ import annotations

import contextlib
import gzip
import logging
import os
import platform
import re
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

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


class Unpreempted:
    """Runs blocks of BPF map syscalls as a real-time thread where the kernel preempts.

    Preempted inside such a syscall, a thread would keep its CPU's BPF guard,
    and the kernel would skip every kprobe program there, losing the calls
    other tasks make meanwhile. Ordinary tasks do not preempt a SCHED_FIFO
    thread, so the syscall ends first, as on a kernel that does not preempt.
    The policy is per thread and restored after the block.
    """

    def __init__(self) -> None:
        self.enabled = True  # until the policy cannot be set: warned once, then left alone

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        saved = self._raise() if self.enabled else None
        try:
            yield
        finally:
            if saved is not None:
                os.sched_setscheduler(0, *saved)

    def _raise(self) -> tuple[int, os.sched_param] | None:
        try:
            policy, param = os.sched_getscheduler(0), os.sched_getparam(0)
            if policy in (os.SCHED_FIFO, os.SCHED_RR):
                return None  # already real-time: started so by the operator
            os.sched_setscheduler(0, os.SCHED_FIFO | os.SCHED_RESET_ON_FORK, os.sched_param(1))
        except OSError as e:
            self.enabled = False
            log.warning(
                "cannot run BPF map reads and writes as SCHED_FIFO (%s); on a kernel that preempts, a preempted"
                " one can make kprobe programs skip other tasks' calls (see tracer_probe_skipped_total)",
                e,
            )
            return None
        return policy, param
