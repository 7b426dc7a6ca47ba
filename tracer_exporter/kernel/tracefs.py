"""tracefs: where the kernel reports what our return probes missed."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable

log = logging.getLogger(__name__)

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


def stale_bcc_events(text: str, symbols: set[str], alive: Callable[[int], bool]) -> list[str]:
    """Events of kprobe_events that a BCC process now dead left on our symbols.

    A BCC tool killed with SIGKILL cannot remove the return probes it created
    through tracefs; they stay until someone does.
    """
    names = {re.sub(r"[+.]", "_", s) for s in symbols}
    stale = []
    for line in text.splitlines():
        event = line.split(" ", 1)[0].split(":", 1)[-1].split("/", 1)[-1]
        m = re.match(r"^[pr]_(.+)_bcc_(\d+)$", event)
        if m and m.group(1) in names and not alive(int(m.group(2))):
            stale.append(event)
    return stale


def pid_alive(pid: int) -> bool:
    return os.path.exists(f"/proc/{pid}")


def remove_stale_bcc_events(symbols: set[str], root: str | None = None) -> list[str]:
    """Remove what stale_bcc_events finds; returns the names removed."""
    root = root or tracefs_root()
    if root is None:
        return []
    path = os.path.join(root, "kprobe_events")
    with open(path, encoding="ascii", errors="replace") as f:
        stale = stale_bcc_events(f.read(), symbols, pid_alive)
    removed = []
    for event in stale:
        # os.open: Python's append mode seeks, which tracefs refuses.
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND)
            try:
                os.write(fd, f"-:kprobes/{event}\n".encode())
            finally:
                os.close(fd)
            removed.append(event)
        except OSError as e:
            log.warning("cannot remove stale kprobe event %s: %s", event, e.strerror)
    return removed
