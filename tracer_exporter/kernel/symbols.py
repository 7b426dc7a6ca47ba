"""Which kernel symbol each traced function is probed at, on the running kernel.

The table is pure data; `resolve` matches it against the symbols a kernel
really has (read from /proc/kallsyms), never against its version number.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Container, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from tracer_exporter.kernel import btf
from tracer_exporter.model import counters

log = logging.getLogger(__name__)

# kmalloc entry points and the position of their size argument. One kmalloc()
# reaches exactly one of these from the caller; some call another inside
# (5.x __kmalloc -> kmalloc_order_trace, 6.11+ __kmalloc_noprof ->
# __kmalloc_large_node_noprof), which the BPF side counts once.
# Positions are read from each kernel's include/linux/slab.h, checked on 5.10
# (bullseye), 6.1, 6.12 and 7.3 (trixie-backports). In 7.x the bucket and
# kmalloc-token parameters (SLAB_BUCKETS, KMALLOC_PARTITION_CACHES) come after
# the size, so its position holds.
KMALLOC_SYMBOLS: tuple[tuple[str, int], ...] = (
    # 5.x
    ("__kmalloc", 1),
    ("kmem_cache_alloc_trace", 3),
    ("kmalloc_order_trace", 1),
    ("__kmalloc_node", 1),
    ("kmem_cache_alloc_node_trace", 4),
    ("__kmalloc_track_caller", 1),
    ("__kmalloc_node_track_caller", 1),
    # 6.1 - 6.9
    ("kmalloc_trace", 3),
    ("kmalloc_large", 1),
    ("kmalloc_node_trace", 4),
    ("kmalloc_large_node", 1),
    # 6.10
    ("kmalloc_trace_noprof", 3),
    ("kmalloc_large_noprof", 1),
    ("kmalloc_node_trace_noprof", 4),
    ("kmalloc_large_node_noprof", 1),
    # 6.10 and 6.11+
    ("__kmalloc_noprof", 1),
    ("__kmalloc_node_noprof", 1),
    ("__kmalloc_node_track_caller_noprof", 1),
    # 6.11+ (7.3 too)
    ("__kmalloc_cache_noprof", 3),
    ("__kmalloc_cache_node_noprof", 4),
    ("__kmalloc_large_noprof", 1),
    ("__kmalloc_large_node_noprof", 1),
    # kvmalloc's kmalloc attempt: 6.11 and 6.12 call __kmalloc_node_noprof
    # (nested, so counted once), 7.x inlines it. A vmalloc fallback counts as
    # the failed attempt it is: a call, no bytes (VMALLOC_BASE in the program).
    ("__kvmalloc_node_noprof", 1),
    # 7.x: kmalloc with slab alloc_flags (sheaves, object extension vectors).
    ("__kmalloc_flags_noprof", 1),
)


class Kind(enum.Enum):
    """What the program does at an attach point."""

    KMALLOC = "kmalloc"  # counts the call and, at return, the bytes of what it returned
    KFREE = "kfree"  # counts the call and the bytes of what it frees
    CALLS = "calls"  # counts the call


@dataclass(frozen=True)
class Function:
    """A traced function: the BPF entry handler and where it may live.

    `groups` are alternatives in order of preference: the first group with any
    symbol present on the kernel is used, and every present symbol of it is
    probed.
    """

    name: str
    handler: str
    groups: tuple[tuple[str, ...], ...]
    kind: Kind = Kind.CALLS

    @property
    def returns(self) -> bool:
        """Also needs the return probe: kmalloc's bytes are known at its return."""
        return self.kind is Kind.KMALLOC


FUNCTIONS: tuple[Function, ...] = (
    Function("kmalloc", "", (tuple(s for s, _ in KMALLOC_SYMBOLS),), Kind.KMALLOC),
    Function("kfree", "kfree_enter", (("kfree",),), Kind.KFREE),
    Function("schedule", "schedule_enter", (("schedule",),)),
    Function("up", "up_enter", (("up",),)),
    Function("down_interruptible", "down_interruptible_enter", (("down_interruptible",),)),
    # With CONFIG_DEBUG_LOCK_ALLOC mutex_lock is a macro over these two.
    Function("mutex_lock", "mutex_lock_enter", (("mutex_lock",), ("mutex_lock_nested", "_mutex_lock_nest_lock"))),
    Function("mutex_unlock", "mutex_unlock_enter", (("mutex_unlock",),)),
)

FUNCTION_NAMES: tuple[str, ...] = tuple(f.name for f in FUNCTIONS)
assert FUNCTION_NAMES == counters.FUNCTION_NAMES, "every counted function has its probe table, in order"
KMALLOC_RETURN_HANDLER = "kmalloc_return"
_SIZE_ARG = dict(KMALLOC_SYMBOLS)


@dataclass(frozen=True)
class Probe:
    """One attach point: an entry handler, plus a return handler for kmalloc."""

    function: str
    symbol: str
    entry_handler: str
    return_handler: str = ""
    kind: Kind = Kind.CALLS
    size_arg: int = 0  # kmalloc: the size argument's position, from 1


@dataclass(frozen=True)
class Plan:
    probes: tuple[Probe, ...]
    missing: tuple[str, ...]  # functions with no symbol on this kernel
    tried: tuple[tuple[str, str], ...] = ()  # (function, symbol) looked for in vain, for missing ones

    @property
    def symbols(self) -> set[str]:
        return {p.symbol for p in self.probes}

    def symbols_of(self, function: str) -> list[str]:
        return [p.symbol for p in self.probes if p.function == function]


def _probe(function: Function, symbol: str) -> Probe:
    if function.kind is Kind.KMALLOC:
        arg = _SIZE_ARG.get(symbol, 1)
        return Probe(function.name, symbol, f"kmalloc_enter_arg{arg}", KMALLOC_RETURN_HANDLER, Kind.KMALLOC, arg)
    return Probe(function.name, symbol, function.handler, kind=function.kind)


def resolve(available: Container[str] | Iterable[str], overrides: Mapping[str, Iterable[str]] | None = None) -> Plan:
    """Choose the probes for a kernel whose text symbols are `available`.

    `overrides` replaces a function's candidates with the given symbols (for
    kernels this table does not know yet, and for testing what happens when a
    symbol is absent).
    """
    have = available if isinstance(available, Container) else set(available)
    overrides = overrides or {}
    probes: list[Probe] = []
    missing: list[str] = []
    tried: list[tuple[str, str]] = []
    for function in FUNCTIONS:
        groups = function.groups
        if function.name in overrides:
            groups = (tuple(overrides[function.name]),)
        chosen: list[str] = []
        for group in groups:
            chosen = [s for s in group if s in have]
            if chosen:
                break
        if not chosen:
            missing.append(function.name)
            tried.extend((function.name, s) for s in groups[0])
        probes.extend(_probe(function, s) for s in chosen)
    return Plan(tuple(probes), tuple(missing), tuple(tried))


def kernel_plan(overrides: Mapping[str, Iterable[str]] | None = None) -> Plan:
    """The probes for the running kernel."""
    return resolve(read_kallsyms(), overrides)


class TextSymbols(Container[str]):
    """The core kernel's text (function) symbols in /proc/kallsyms text.

    Looked up by name, one substring search each: the plan asks for a few
    dozen names, and parsing all 150,000 lines costs about a second under TCG.
    A core symbol's line is `ADDR t NAME`; a module's carries a fourth field,
    `\t[module]`, and we probe the core kernel.
    """

    def __init__(self, text: str) -> None:
        self._text = text if text.endswith("\n") else text + "\n"

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and (f" T {name}\n" in self._text or f" t {name}\n" in self._text)


def parse_kallsyms(text: str) -> TextSymbols:
    return TextSymbols(text)


def read_kallsyms(path: str = "/proc/kallsyms") -> TextSymbols:
    with open(path, encoding="ascii", errors="replace") as f:
        return parse_kallsyms(f.read())


@dataclass(frozen=True)
class PreemptCount:
    """Where the BPF program reads this CPU's preempt count (x86-64).

    The count is a per-CPU variable: this CPU's copy is at the variable's
    per-CPU address plus __per_cpu_offset[cpu]. It is `__preempt_count` up to
    6.1 and again from 6.15, and a field of `pcpu_hot` in between.
    """

    per_cpu_offset: int  # address of the __per_cpu_offset[] array
    variable: int  # per-CPU address of __preempt_count, or of pcpu_hot
    in_pcpu_hot: bool

    def describe(self) -> str:
        name = "pcpu_hot.preempt_count" if self.in_pcpu_hot else "__preempt_count"
        return f"{name} at {self.variable:#x} + __per_cpu_offset[cpu] ({self.per_cpu_offset:#x})"


def data_symbols(text: str, names: Iterable[str]) -> dict[str, int]:
    """Addresses of the named core-kernel symbols in /proc/kallsyms text (0
    where the kernel hides them: kptr_restrict, or not root)."""
    if not text.endswith("\n"):
        text += "\n"
    found: dict[str, int] = {}
    # One substring search per name: a regex over the 150,000 lines costs far more under TCG.
    for name in set(names):
        needle = f" {name}\n"
        at = text.find(needle)
        while at >= 0:
            fields = text[text.rfind("\n", 0, at) + 1 : at + len(needle)].split()
            if len(fields) == 3 and fields[2] == name:
                found[name] = int(fields[0], 16)
                break
            at = text.find(needle, at + 1)
    return found


def parse_vmalloc_base(text: str) -> int:
    """The address of the kernel variable holding the vmalloc area's start
    (x86-64 with a randomized layout), or 0."""
    return data_symbols(text, ("vmalloc_base",)).get("vmalloc_base", 0)


def parse_preempt_count(text: str) -> PreemptCount | None:
    """The preempt count's location from /proc/kallsyms text, or None where
    the kernel has none of the symbols or hides their addresses."""
    found = data_symbols(text, ("__per_cpu_offset", "__preempt_count", "pcpu_hot"))
    offsets = found.get("__per_cpu_offset", 0)
    if not offsets:
        return None
    # 0 is a valid per-CPU offset only for the first per-CPU symbol, which neither is.
    if found.get("__preempt_count"):
        return PreemptCount(offsets, found["__preempt_count"], False)
    if found.get("pcpu_hot"):
        return PreemptCount(offsets, found["pcpu_hot"], True)
    return None


@dataclass(frozen=True)
class KernelData:
    """Kernel variables the program reads (see parse_preempt_count,
    parse_vmalloc_base), and the struct offsets from BTF (tracer_exporter.kernel.btf)
    that let it compile without the kernel's sched headers: None without BTF."""

    preempt_count: PreemptCount | None
    vmalloc_base: int
    offsets: dict[str, int] | None = None


def read_offsets(preempt: PreemptCount | None, path: Path = btf.VMLINUX) -> dict[str, int] | None:
    fields = tuple(btf.FIELDS) + ((btf.PCPU_HOT_PREEMPT_COUNT,) if preempt and preempt.in_pcpu_hot else ())
    try:
        return btf.field_offsets(path, fields)
    except btf.BTFError as e:
        log.info("kernel BTF not usable (%s): compiling with the kernel headers", e)
        return None


def read_kernel_data(path: str = "/proc/kallsyms", btf_path: Path = btf.VMLINUX) -> KernelData:
    with open(path, encoding="ascii", errors="replace") as f:
        text = f.read()
    preempt = parse_preempt_count(text)
    return KernelData(preempt, parse_vmalloc_base(text), read_offsets(preempt, btf_path))
