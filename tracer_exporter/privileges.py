"""Capabilities: once the probes are attached, keep only what the exporter still uses.

Loading and attaching BPF programs needs CAP_SYS_ADMIN (or CAP_BPF and
CAP_PERFMON); what follows does not:

- CAP_BPF: map reads and writes are bpf() syscalls on fds the exporter holds,
  and a kernel with kernel.unprivileged_bpf_disabled set (Debian's default)
  refuses every bpf() call of a task without CAP_BPF or CAP_SYS_ADMIN (up to 6.4).
- CAP_SYS_NICE: map reads and writes run briefly as SCHED_FIFO (see preempt.py).

The perf buffer of followed children that could not be tracked is opened
before the drop (Debian's perf_event_open wants CAP_SYS_ADMIN) and read from
memory already mapped. Detaching at SIGTERM closes fds and writes tracefs's kprobe_events, a file
owned by root, which uid 0 may write with no capability. Capabilities belong
to each thread: drop() changes the calling thread's (and its bounding set),
and threads it starts later inherit them; cli runs it in each thread it has.
Only ctypes and libc: no new dependency.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
from collections.abc import Iterable

CAP_NAMES = (  # noqa: SIM905 (the kernel's numbering, in order)
    "CAP_CHOWN CAP_DAC_OVERRIDE CAP_DAC_READ_SEARCH CAP_FOWNER CAP_FSETID CAP_KILL CAP_SETGID CAP_SETUID "
    "CAP_SETPCAP CAP_LINUX_IMMUTABLE CAP_NET_BIND_SERVICE CAP_NET_BROADCAST CAP_NET_ADMIN CAP_NET_RAW "
    "CAP_IPC_LOCK CAP_IPC_OWNER CAP_SYS_MODULE CAP_SYS_RAWIO CAP_SYS_CHROOT CAP_SYS_PTRACE CAP_SYS_PACCT "
    "CAP_SYS_ADMIN CAP_SYS_BOOT CAP_SYS_NICE CAP_SYS_RESOURCE CAP_SYS_TIME CAP_SYS_TTY_CONFIG CAP_MKNOD "
    "CAP_LEASE CAP_AUDIT_WRITE CAP_AUDIT_CONTROL CAP_SETFCAP CAP_MAC_OVERRIDE CAP_MAC_ADMIN CAP_SYSLOG "
    "CAP_WAKE_ALARM CAP_BLOCK_SUSPEND CAP_AUDIT_READ CAP_PERFMON CAP_BPF CAP_CHECKPOINT_RESTORE"
).split()
CAP = {name: i for i, name in enumerate(CAP_NAMES)}
# What the exporter keeps after attaching, and why: see the module docstring.
KEEP = ("CAP_BPF", "CAP_SYS_NICE")

_PR_CAPBSET_DROP = 24
_VERSION_3 = 0x20080522


class _Header(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _Data(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)


def parse_caps(status: str, field: str = "CapEff") -> int:
    """A capability mask (CapEff, CapPrm, CapBnd, ...) from /proc/PID/status."""
    for line in status.splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1], 16)
    raise ValueError(f"no {field} line in status")


def names(mask: int) -> list[str]:
    return [CAP_NAMES[i] if i < len(CAP_NAMES) else f"cap_{i}" for i in range(64) if mask >> i & 1]


def mask_of(caps: Iterable[str]) -> int:
    out = 0
    for name in caps:
        out |= 1 << CAP[name]
    return out


def last_cap(path: str = "/proc/sys/kernel/cap_last_cap") -> int:
    try:
        with open(path, encoding="ascii") as f:
            return int(f.read())
    except (OSError, ValueError):
        return CAP["CAP_AUDIT_READ"]


def to_keep(permitted: int, last: int) -> int:
    """KEEP, or on a kernel without CAP_BPF and CAP_PERFMON (before 5.8) CAP_SYS_ADMIN in
    their place, within permitted."""
    keep = mask_of(KEEP)
    if last < CAP["CAP_BPF"] or not permitted >> CAP["CAP_BPF"] & 1:
        keep = keep & ~mask_of(["CAP_BPF", "CAP_PERFMON"]) | mask_of(["CAP_SYS_ADMIN"])
    return keep & permitted


def current(field: str = "CapPrm") -> int:
    """The calling thread's mask."""
    with open(f"/proc/self/task/{threading.get_native_id()}/status", encoding="ascii") as f:
        return parse_caps(f.read(), field)


def drop(keep: int) -> None:
    """The calling thread keeps only keep, in its effective, permitted and bounding sets.

    Raises OSError when the kernel refuses (the caller logs it and goes on).
    """
    last = last_cap()
    for cap in range(last + 1):
        if not keep >> cap & 1 and _libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            e = ctypes.get_errno()
            if e != 22:  # EINVAL: a capability this kernel does not know
                raise OSError(e, f"PR_CAPBSET_DROP {CAP_NAMES[cap]}: {os.strerror(e)}")
    header = _Header(_VERSION_3, 0)
    data = (_Data * 2)()
    data[0].effective = data[0].permitted = keep & 0xFFFFFFFF
    data[1].effective = data[1].permitted = keep >> 32
    if _libc.capset(ctypes.byref(header), data) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"capset: {os.strerror(e)}")
