"""What the kernel counts per BPF program: runs it skipped.

The kernel skips a program when it finds one already running on that CPU:
for fentry programs the same program (per-program guard), for kprobe and
tracepoint programs any program (bpf_prog_active). It counts each skip in
the program's recursion_misses (Linux 5.12+ for fentry, 6.7+ for kprobes),
shown in the program fd's fdinfo.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

FENTRY_NAME = re.compile(r"k(?:ret)?func__(?:vmlinux__)?(\w+)")  # BCC's KFUNC_PROBE/KRETFUNC_PROBE names
TRACEPOINT_NAME = re.compile(r"(?:raw_)?tracepoint__(?:\w+?__)?(\w+)")


def parse_recursion_misses(fdinfo: str) -> int | None:
    """recursion_misses from a program fd's fdinfo; None where the kernel has no such line."""
    m = re.search(r"^recursion_misses:\s*(\d+)$", fdinfo, re.M)
    return int(m[1]) if m else None


def recursion_misses(fd: int) -> int | None:
    try:
        with open(f"/proc/self/fdinfo/{fd}") as f:
            return parse_recursion_misses(f.read())
    except OSError:
        return None


def program_labels(names: Iterable[str], handlers: Mapping[str, str], symbols: Mapping[str, str]) -> dict[str, str]:
    """The function label of each loaded program: by handler name (kprobe mode),
    by the symbol in its name (fentry mode), or the tracepoint's name."""
    out = {}
    for name in names:
        if name in handlers:
            out[name] = handlers[name]
        elif (m := FENTRY_NAME.fullmatch(name)) and m[1] in symbols:
            out[name] = symbols[m[1]]
        elif m := TRACEPOINT_NAME.fullmatch(name):
            out[name] = m[1]
    return out
