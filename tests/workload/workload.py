"""Drive the tracer_workload kernel module (/dev/tracer_workload) from tests.

The module makes an exact, known number of kmalloc/kfree/schedule/up/
down_interruptible/mutex_lock/mutex_unlock calls, in the calling process
(``run``) or in a kernel thread of its own (``spawn``/``start``/``wait``/
``stop``), and reports what it did as a :class:`Tally`. :func:`expected` says
what a list of ops should yield. See README.md beside this file.

Standard library only; Python 3.9+.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import subprocess
import tempfile
import threading
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Union

DEVICE = Path("/dev/tracer_workload")
MODULE = "tracer_workload"
SOURCES = ("Kbuild", "Makefile", "tracer_workload.c")

CONST_SIZE = 192  # kmalloc_const, kmalloc_node_const
CONST_LARGE_SIZE = 16384  # kmalloc_const_large
WAIT_DEFAULT_MS = 30000
MAKE_TIMEOUT = 900.0  # a build under TCG emulation takes a minute or two
INSMOD_TIMEOUT = 60.0
NODE_TIMEOUT = 5.0  # for devtmpfs (or us) to make the device node

Ops = Union[str, Iterable[str]]


@dataclass(frozen=True)
class Tally:
    """What a job did, as the module counts it (one result line)."""

    kmalloc: int = 0
    kmalloc_bytes: int = 0
    kfree: int = 0
    kfree_bytes: int = 0
    sched: int = 0
    up: int = 0
    down: int = 0
    lock: int = 0
    unlock: int = 0
    held: int = 0

    @classmethod
    def parse(cls, line: str) -> Tally:
        """Parses ``kmalloc=1 kmalloc_bytes=2 ... held=0``; every field, nothing else."""
        pairs = dict(item.split("=", 1) for item in line.split())
        names = [f.name for f in fields(cls)]
        if sorted(pairs) != sorted(names):
            raise ValueError(f"not a tally line: {line!r}")
        return cls(**{name: int(pairs[name]) for name in names})


class WorkloadError(OSError):
    """A command the module refused; ``reason`` is its ``error: ...`` line."""

    def __init__(self, err: int, command: str, reason: str) -> None:
        super().__init__(err, f"{command!r}: {reason or os.strerror(err)}")
        self.command = command
        self.reason = reason


def _ops_text(ops: Ops) -> str:
    return ops if isinstance(ops, str) else " ".join(ops)


class Workload:
    """One open file of the device. Thread-safe: commands on it take turns."""

    def __init__(self, device: Path = DEVICE) -> None:
        self._fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
        self._lock = threading.Lock()

    def close(self) -> None:
        """Closes the file; blocks ``run`` left held are freed (in no tally)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> Workload:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def command(self, text: str) -> str:
        """Sends one command; returns its result line without the newline."""
        with self._lock:
            try:
                os.write(self._fd, text.encode())
            except OSError as e:
                reason = ""
                if e.errno != errno.EBUSY:
                    reason = os.pread(self._fd, 4096, 0).decode().strip()
                raise WorkloadError(e.errno or errno.EIO, text, reason) from None
            return os.pread(self._fd, 4096, 0).decode().rstrip("\n")

    def run(self, ops: Ops) -> Tally:
        """Performs ops in this thread, inside write(). Blocks left held by
        the previous run are freed first and counted in this tally."""
        return Tally.parse(self.command("run " + _ops_text(ops)))

    def free(self) -> Tally:
        """Frees the blocks ``run`` left held; the tally counts those kfrees."""
        return Tally.parse(self.command("free"))

    def spawn(self, ops: Ops) -> int:
        """A kernel thread that will perform ops once started; returns its pid."""
        return int(self.command("spawn " + _ops_text(ops)))

    def start(self, pid: int) -> None:
        self.command(f"start {pid}")

    def wait(self, pid: int, timeout_ms: int = WAIT_DEFAULT_MS) -> Tally:
        """Waits until the thread is done and asleep; its tally counts that sleep."""
        return Tally.parse(self.command(f"wait {pid} {timeout_ms}"))

    def stop(self, pid: int) -> None:
        """Stops the thread; what it still holds is freed by this process."""
        self.command(f"stop {pid}")

    def irq(
        self, pid: int, cpu: int, count: int, size: int, mode: str, timeout_ms: int = WAIT_DEFAULT_MS
    ) -> dict[str, int]:
        """Interrupt-context kmalloc(size) and kfree() pairs on ``pid``'s time:
        ``count`` of them, each from a timer on ``cpu`` (``mode`` hard: hardirq,
        soft: softirq) that found the process running in user mode. Blocks
        until done; returns ``hits``, ``fires`` and ``failed`` allocations."""
        reply = self.command(f"irq {pid} {cpu} {count} {size} {mode} {timeout_ms}")
        return {k: int(v) for k, v in (item.split("=") for item in reply.split())}


def _parse_op(token: str) -> tuple[str, str, int]:
    parts = token.split(":")
    if len(parts) not in (2, 3):
        raise ValueError(f"{token!r}: expected op:count[:size]")
    name, count = parts[0], parts[1]
    if name not in _SIZES:
        raise ValueError(f"{token!r}: unknown op")
    wants_size = _SIZES[name] is None
    if wants_size != (len(parts) == 3):
        raise ValueError(f"{token!r}: {name} {'needs' if wants_size else 'takes no'} size")
    size = int(parts[2]) if wants_size else _SIZES[name] or 0
    return name, count, size


# Allocating ops and the size they request (None: taken from the op).
_SIZES: dict[str, int | None] = {
    "kmalloc": None,
    "kzalloc": None,
    "kmalloc_node": None,
    "kmemdup": None,
    "kvmalloc": None,
    "kmalloc_const": CONST_SIZE,
    "kmalloc_node_const": CONST_SIZE,
    "kmalloc_const_large": CONST_LARGE_SIZE,
    "kmalloc_fail": 0,
    "kfree": 0,
    "kfree_null": 0,
    "schedule": 0,
    "updown": 0,
    "mutex": 0,
}
# Ops whose blocks are held (kmalloc_fail's calls all fail).
_ALLOCATING = {
    "kmalloc",
    "kzalloc",
    "kmalloc_node",
    "kmemdup",
    "kvmalloc",
    "kmalloc_const",
    "kmalloc_node_const",
    "kmalloc_const_large",
}


def expected(ops: Ops, kthread: bool = False) -> Tally:
    """The tally ops should yield, on a fd (or thread) holding nothing before.

    With ``kthread``, includes the schedule() the thread sleeps in when
    ``wait`` returns.
    """
    c = dict.fromkeys((f.name for f in fields(Tally) if f.name != "held"), 0)
    held: deque[int] = deque()
    for token in _ops_text(ops).split():
        name, count, size = _parse_op(token)
        n = len(held) if (name, count) == ("kfree", "all") else int(count)
        if n < 0:
            raise ValueError(f"{token!r}: negative count")
        if name in _ALLOCATING or name == "kmalloc_fail":
            c["kmalloc"] += n
        if name in _ALLOCATING:
            c["kmalloc_bytes"] += n * size
            held.extend([size] * n)
        elif name == "kfree":
            if n > len(held):
                raise ValueError(f"{token!r}: only {len(held)} blocks held")
            c["kfree"] += n
            c["kfree_bytes"] += sum(held.popleft() for _ in range(n))
        elif name == "kfree_null":
            c["kfree"] += n
        elif name == "schedule":
            c["sched"] += n
        elif name == "updown":
            c["up"] += n
            c["down"] += n
        elif name == "mutex":
            c["lock"] += n
            c["unlock"] += n
    if kthread:
        c["sched"] += 1
    return Tally(**c, held=len(held))


def _run(cmd: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as e:
        raise RuntimeError(f"{' '.join(cmd)}: no result after {timeout} s") from e


def _make_node() -> None:
    """Waits for devtmpfs to make the node, and makes it where nobody does."""
    deadline = time.monotonic() + NODE_TIMEOUT
    while not DEVICE.exists():
        if time.monotonic() > deadline:
            major, minor = Path(f"/sys/class/misc/{MODULE}/dev").read_text().split(":")
            os.mknod(DEVICE, 0o600 | stat.S_IFCHR, os.makedev(int(major), int(minor)))
            return
        time.sleep(0.05)


def build_and_load(src_dir: str | Path, kdir: str | Path | None = None) -> None:
    """Builds the module from src_dir (in a temporary copy) and loads it.

    Does nothing if the device already exists. kdir defaults to
    /lib/modules/$(uname -r)/build. Raises RuntimeError with make's (or
    insmod's) output when either fails.
    """
    if DEVICE.exists():
        return
    if not Path(f"/sys/module/{MODULE}").exists() and not _load_prebuilt(Path(src_dir)):
        build = Path(tempfile.mkdtemp(prefix="tracer-workload-"))
        try:
            _build_and_insmod(Path(src_dir), build, Path(kdir or f"/lib/modules/{os.uname().release}/build"))
        finally:
            shutil.rmtree(build, ignore_errors=True)
    _make_node()


def _load_prebuilt(src_dir: Path) -> bool:
    """Loads build/workload/<release>/ from prebuild.sh when it is as new as the source."""
    ko = src_dir.parent.parent / "build" / "workload" / os.uname().release / f"{MODULE}.ko"
    source = src_dir / f"{MODULE}.c"
    if not ko.exists() or ko.stat().st_mtime < source.stat().st_mtime:
        return False
    # A module that does not fit this kernel is refused here; then it is built.
    return _run(["insmod", str(ko)], INSMOD_TIMEOUT).returncode == 0


def _build_and_insmod(src_dir: Path, build: Path, kdir: Path) -> None:
    for name in SOURCES:
        shutil.copy(src_dir / name, build / name)
    make = _run(["make", "-j2", "-C", str(kdir), f"M={build}", "modules"], MAKE_TIMEOUT)
    if make.returncode != 0:
        raise RuntimeError(f"building {MODULE} failed ({make.returncode}):\n{make.stdout}{make.stderr}")
    insmod = _run(["insmod", str(build / f"{MODULE}.ko")], INSMOD_TIMEOUT)
    # Someone else may have loaded it meanwhile; that is as good.
    if insmod.returncode != 0 and not Path(f"/sys/module/{MODULE}").exists():
        raise RuntimeError(f"insmod {MODULE} failed ({insmod.returncode}):\n{insmod.stdout}{insmod.stderr}")
