"""The BPF program: its source and cflags, the probe mode, load, attach and detach."""

from __future__ import annotations

import contextlib
import logging
import platform
import re
from importlib import resources
from pathlib import Path

from tracer_exporter.kernel import btf, preempt, tracefs
from tracer_exporter.kernel.contract import FILTER_SLOTS
from tracer_exporter.kernel.errors import ProbeError
from tracer_exporter.kernel.symbols import KernelData, Kind, Plan
from tracer_exporter.model.config import Config
from tracer_exporter.model.health import Attachment

log = logging.getLogger(__name__)

SOURCE_NAME = "tracer.bpf.c"
MODE_AUTO = "auto"
MODE_KPROBE = "kprobe"
MODE_FENTRY = "fentry"
# What bpf_get_func_arg and bpf_get_func_ret, which the fentry programs use, need.
FENTRY_MIN_KERNEL = (5, 17)
AUTO_FENTRY_REASON = "the kernel has BTF and BPF trampolines, and does not preempt BPF programs"
# The tracepoints of bpf/tracer.bpf.c, which BCC attaches at load.
TRACEPOINTS = (
    b"sched:sched_process_exit",
    b"sched:sched_process_exec",
    b"cgroup:cgroup_attach_task",
    b"cgroup:cgroup_mkdir",
    b"cgroup:cgroup_rmdir",
)
TP_FORK = b"sched_process_fork"


def bpf_include_dir() -> Path:
    """bpf/ beside this module: package data, found alike in the checkout, a wheel and the .deb."""
    return Path(str(resources.files("tracer_exporter.kernel") / "bpf"))


def bpf_source_path(override: str | None = None) -> Path:
    """The program: bpf/tracer.bpf.c of the package, or the file override names
    (for debugging, and for testing what a program that does not compile does)."""
    if override:
        return Path(override)
    path = bpf_include_dir() / SOURCE_NAME
    if not path.is_file():
        raise ProbeError(f"BPF source {SOURCE_NAME} not found at {path}: the package was installed without its data")
    return path


def fentry_probes(plan: Plan) -> str:
    """The FENTRY_PROBES list of bpf/tracer.bpf.c: one item per attach point."""
    items = []
    for p in plan.probes:
        if p.kind is Kind.KMALLOC:
            items.append(f"KMALLOC({p.symbol}, {p.size_arg})")
        elif p.kind is Kind.KFREE:
            items.append(f"KFREE({p.symbol})")
        else:
            items.append(f"CALLS({p.symbol}, {p.entry_handler})")
    return " ".join(items)


def task_btf(release: str | None = None, btf: Path = Path("/sys/kernel/btf/vmlinux")) -> bool:
    """Whether bpf_get_current_task_btf() works here: Linux 5.11+ with kernel BTF."""
    version = kernel_version(release)
    return version is not None and version >= (5, 11) and btf.exists()


def cflags(
    config: Config,
    plan: Plan | None = None,
    mode: str = MODE_KPROBE,
    with_task_btf: bool = False,
    kernel: KernelData | None = None,
) -> list[str]:
    flags = [
        f"-DMAX_TRACKED={config.max_tracked_processes}",
        f"-DMAX_ALLOCS={config.alloc_map_entries}",
        f"-DMAX_INFLIGHT={config.inflight_map_entries}",
        f"-DMAX_GROUPS={config.max_groups}",
        f"-DMAX_CGROUPS={config.cgroup_map_entries}",
        f"-DFILTER_SLOTS={FILTER_SLOTS}",
        f"-I{bpf_include_dir()}",
    ]
    if with_task_btf:
        flags.append("-DTASK_BTF")
    count = kernel.preempt_count if kernel else None
    offsets = kernel.offsets if kernel else None
    if offsets is not None:
        flags.append("-DTASK_OFFSETS")
        flags += [f"-D{btf.FIELDS[f]}={offsets[f]}" for f in btf.FIELDS]
    if count is not None:
        flags.append(f"-DPER_CPU_OFFSETS={count.per_cpu_offset:#x}ULL")
        if count.in_pcpu_hot and offsets is not None:
            variable = count.variable + offsets[btf.PCPU_HOT_PREEMPT_COUNT]
            flags.append(f"-DPREEMPT_COUNT_VAR={variable:#x}ULL")
        else:
            flags.append(f"-DPREEMPT_COUNT_VAR={count.variable:#x}ULL")
            if count.in_pcpu_hot:
                flags.append("-DPREEMPT_COUNT_IN_PCPU_HOT")
    if kernel and kernel.vmalloc_base:
        flags.append(f"-DVMALLOC_BASE={kernel.vmalloc_base:#x}ULL")
    if mode == MODE_FENTRY and plan is not None:
        flags.append(f"-DFENTRY_PROBES={fentry_probes(plan)}")
    return flags


def kernel_version(release: str | None = None) -> tuple[int, int] | None:
    nums = re.match(r"(\d+)\.(\d+)", release or platform.release())
    return (int(nums[1]), int(nums[2])) if nums else None


def fentry_unsupported() -> str:
    """Why this kernel cannot run the fentry mode exactly, or "" when it can."""
    from bcc import BPF

    version = kernel_version()
    if version is not None and version < FENTRY_MIN_KERNEL:
        return f"Linux {version[0]}.{version[1]} has no bpf_get_func_arg (5.17 and later have)"
    if not BPF.support_kfunc():
        return "the kernel has no BTF (/sys/kernel/btf/vmlinux) or no BPF trampolines"
    return preempt.fentry_hazard(*preempt.current())


def choose_mode(requested: str, unsupported: str) -> tuple[str, str]:
    """The mode to try first and why: fentry when asked for, or for auto where it is exact."""
    if requested == MODE_KPROBE:
        return MODE_KPROBE, ""
    if unsupported:
        return MODE_KPROBE, unsupported
    return MODE_FENTRY, AUTO_FENTRY_REASON if requested == MODE_AUTO else ""


class Program:
    """One compiled program in the mode it could run in, and its attach points."""

    def __init__(self, config: Config, plan: Plan, source: Path, kernel: KernelData) -> None:
        self._config = config
        self._plan = plan
        self._source = source
        self._kernel = kernel
        self.bpf = None  # bcc.BPF once loaded
        self.mode = MODE_KPROBE  # what load() really used
        self.mode_reason = ""  # why it is not the requested one
        self.attachments: list[Attachment] = []
        self._kfuncs: tuple[list[bytes], list[bytes]] = ([], [])
        self._detached = False

    def load(self) -> None:
        try:
            from bcc import BPF
        except ImportError as e:
            raise ProbeError(f"the bcc Python module is missing ({e}); install the distribution's python3-bpfcc") from e
        removed = tracefs.remove_stale_bcc_events(self._plan.symbols)
        if removed:
            log.warning(
                "removed %d kprobe events left behind by a killed instance: %s", len(removed), " ".join(removed)
            )
        text = self._source.read_text()
        requested = self._config.probe_mode
        if requested != MODE_KPROBE:
            self.bpf = self._load_fentry(BPF, text, requested)
        if self.bpf is None:
            flags = cflags(self._config, with_task_btf=task_btf(), kernel=self._kernel)
            try:
                self.bpf = BPF(text=text, cflags=flags)
            except Exception as e:
                raise ProbeError(f"compiling {self._source} failed: {e}") from e

    def _load_fentry(self, bpf_class: type, text: str, requested: str) -> object | None:
        """The program in fentry mode (BCC attaches its trampolines at load), or
        None after one log line saying why the kprobe mode is used instead."""
        mode, why = choose_mode(requested, fentry_unsupported())
        if mode == MODE_FENTRY:
            try:
                flags = cflags(self._config, self._plan, MODE_FENTRY, task_btf(), self._kernel)
                bpf = bpf_class(text=text, cflags=flags)
            except Exception as e:
                why = f"loading the fentry/fexit programs failed: {str(e).strip().splitlines()[-1]}"
            else:
                self.mode, self.mode_reason = MODE_FENTRY, why
                self._kfuncs = (list(bpf.kfunc_entry_fds), list(bpf.kfunc_exit_fds))
                n = sum(map(len, self._kfuncs))
                if requested == MODE_AUTO:
                    log.info("probes.mode auto: fentry (%s), %d trampoline programs attached", why, n)
                else:
                    log.info("probes.mode fentry: %d trampoline programs attached", n)
                return bpf
        self.mode_reason = why
        if requested == MODE_AUTO:
            # The default: kprobes here are the expected choice, not a problem.
            log.info("probes.mode auto: kprobe (%s)", why)
        else:
            log.warning("probes.mode fentry is not available (%s); using kprobes", why)
        return None

    def attach(self) -> list[Attachment]:
        """Attach every probe of the plan; a failing symbol does not stop the rest."""
        assert self.bpf is not None
        if self._detached:
            # BCC attached the tracepoint handlers at load; detach() took them off.
            for tp in TRACEPOINTS:
                self.bpf.attach_tracepoint(tp=tp, fn_name=b"tracepoint__" + tp.replace(b":", b"__"))
            self.bpf.attach_raw_tracepoint(tp=TP_FORK, fn_name=b"raw_tracepoint__" + TP_FORK)
            self._detached = False
        out = self._attach_fentry() if self.mode == MODE_FENTRY else self._attach_kprobes()
        out += [Attachment(f, s, False, "not in /proc/kallsyms") for f, s in self._plan.tried]
        self.attachments = out
        return out

    def _attach_kprobes(self) -> list[Attachment]:
        assert self.bpf is not None
        out: list[Attachment] = []
        for p in self._plan.probes:
            try:
                self.bpf.attach_kprobe(event=p.symbol, fn_name=p.entry_handler)
                if p.return_handler:
                    self.bpf.attach_kretprobe(
                        event=p.symbol, fn_name=p.return_handler, maxactive=self._config.kretprobe_maxactive
                    )
            except Exception as e:
                log.warning("cannot attach %s at %s: %s", p.function, p.symbol, e)
                self._detach_quietly(p.symbol)
                out.append(Attachment(p.function, p.symbol, False, str(e)))
                continue
            log.debug("attached %s at %s", p.function, p.symbol)
            out.append(Attachment(p.function, p.symbol, True))
        return out

    def _attach_fentry(self) -> list[Attachment]:
        # Load attached every program, or failed as a whole and fell back.
        assert self.bpf is not None
        entry, exit_ = self._kfuncs
        for name in entry:
            if name not in self.bpf.kfunc_entry_fds:
                self.bpf.attach_kfunc(fn_name=name)
        for name in exit_:
            if name not in self.bpf.kfunc_exit_fds:
                self.bpf.attach_kretfunc(fn_name=name)
        return [Attachment(p.function, p.symbol, True) for p in self._plan.probes]

    def detach(self) -> None:
        """Detach every probe but keep the program and its maps (attach() again
        to resume): the benchmark interleaves configurations this way."""
        assert self.bpf is not None
        if not self._detached:
            for tp in TRACEPOINTS:
                self.bpf.detach_tracepoint(tp=tp)
            self.bpf.detach_raw_tracepoint(tp=TP_FORK)
            self._detached = True
        if self.mode == MODE_FENTRY:
            for name in list(self.bpf.kfunc_entry_fds):
                self.bpf.detach_kfunc(fn_name=name)
            for name in list(self.bpf.kfunc_exit_fds):
                self.bpf.detach_kretfunc(fn_name=name)
            return
        for symbol in sorted(self._plan.symbols):
            self._detach_quietly(symbol)

    def _detach_quietly(self, symbol: str) -> None:
        assert self.bpf is not None
        for detach in (self.bpf.detach_kprobe, self.bpf.detach_kretprobe):
            with contextlib.suppress(Exception):
                detach(event=symbol)

    def close(self) -> None:
        """Detach everything, including the tracefs events of return probes."""
        if self.bpf is not None:
            self.bpf.cleanup()
            self.bpf = None
