"""Which kernel symbol each traced function is probed at, on the running kernel.

The table is pure data; `resolve` matches it against the symbols a kernel
really has (read from /proc/kallsyms), never against its version number.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

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
)


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
    returns: bool = False  # also needs the return probe (kmalloc only)


FUNCTIONS: tuple[Function, ...] = (
    Function("kmalloc", "", (tuple(s for s, _ in KMALLOC_SYMBOLS),), returns=True),
    Function("kfree", "kfree_enter", (("kfree",),)),
    Function("schedule", "schedule_enter", (("schedule",),)),
    Function("up", "up_enter", (("up",),)),
    Function("down_interruptible", "down_interruptible_enter", (("down_interruptible",),)),
    # With CONFIG_DEBUG_LOCK_ALLOC mutex_lock is a macro over these two.
    Function("mutex_lock", "mutex_lock_enter", (("mutex_lock",), ("mutex_lock_nested", "_mutex_lock_nest_lock"))),
    Function("mutex_unlock", "mutex_unlock_enter", (("mutex_unlock",),)),
)

FUNCTION_NAMES: tuple[str, ...] = tuple(f.name for f in FUNCTIONS)
KMALLOC_RETURN_HANDLER = "kmalloc_return"
_SIZE_ARG = dict(KMALLOC_SYMBOLS)


@dataclass(frozen=True)
class Probe:
    """One attach point: an entry handler, plus a return handler for kmalloc."""

    function: str
    symbol: str
    entry_handler: str
    return_handler: str = ""


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


def kmalloc_entry_handler(symbol: str) -> str:
    return f"kmalloc_enter_arg{_SIZE_ARG.get(symbol, 1)}"


def _probe(function: Function, symbol: str) -> Probe:
    if function.returns:
        return Probe(function.name, symbol, kmalloc_entry_handler(symbol), KMALLOC_RETURN_HANDLER)
    return Probe(function.name, symbol, function.handler)


def resolve(available: Iterable[str], overrides: Mapping[str, Iterable[str]] | None = None) -> Plan:
    """Choose the probes for a kernel whose text symbols are `available`.

    `overrides` replaces a function's candidates with the given symbols (for
    kernels this table does not know yet, and for testing what happens when a
    symbol is absent).
    """
    have = set(available)
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


def parse_kallsyms(text: str) -> set[str]:
    """Names of the text (function) symbols of the core kernel."""
    names: set[str] = set()
    for line in text.splitlines():
        parts = line.split()
        # Module symbols carry a fourth field, [module]; we probe the core kernel.
        if len(parts) == 3 and parts[1] in ("t", "T"):
            names.add(parts[2])
    return names


def read_kallsyms(path: str = "/proc/kallsyms") -> set[str]:
    with open(path, encoding="ascii", errors="replace") as f:
        return parse_kallsyms(f.read())
