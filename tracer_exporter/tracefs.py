"""tracefs: where the kernel reports what our return probes missed."""

from __future__ import annotations

import os
import re

TRACEFS_ROOTS = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")


def tracefs_root() -> str | None:
    for root in TRACEFS_ROOTS:
        if os.path.exists(os.path.join(root, "kprobe_events")):
            return root
    return None


def bcc_event_name(prefix: str, symbol: str, pid: int) -> str:
    """The name BCC gives a kprobe event it creates through tracefs."""
    return f"{prefix}_{re.sub(r'[+.]', '_', symbol)}_bcc_{pid}"


def parse_kprobe_profile(text: str) -> dict[str, tuple[int, int]]:
    """event name -> (hits, misses), from kprobe_profile."""
    out: dict[str, tuple[int, int]] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[-1].isdigit() and parts[-2].isdigit():
            out[parts[0]] = (int(parts[-2]), int(parts[-1]))
    return out


def read_kprobe_profile(root: str | None = None) -> dict[str, tuple[int, int]]:
    root = root or tracefs_root()
    if root is None:
        return {}
    with open(os.path.join(root, "kprobe_profile"), encoding="ascii", errors="replace") as f:
        return parse_kprobe_profile(f.read())


def our_kprobe_events(text: str, pid: int) -> list[str]:
    """Lines of kprobe_events that belong to the BCC instance in process pid."""
    suffix = f"_bcc_{pid}"
    return [line for line in text.splitlines() if line.split(" ", 1)[0].endswith(suffix)]
