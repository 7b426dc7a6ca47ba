"""What /proc says about a process: reading is apart from parsing."""

from __future__ import annotations

import os
from dataclasses import dataclass

# PID_MAX_LIMIT on 64-bit kernels: no pid is ever larger.
PID_MAX_LIMIT = 1 << 22


@dataclass(frozen=True)
class ProcessInfo:
    pid: int
    tgid: int
    comm: str
    state: str  # one letter, as in /proc/PID/stat
    start_time: int  # clock ticks after boot: tells a reused pid apart

    @property
    def exited(self) -> bool:
        return self.state in ("Z", "X", "x")


def parse_stat(text: str) -> tuple[str, str, int]:
    """(comm, state, start_time) from /proc/PID/stat."""
    # comm may hold spaces and parentheses: it ends at the last ')'.
    open_paren = text.index("(")
    close_paren = text.rindex(")")
    comm = text[open_paren + 1 : close_paren]
    rest = text[close_paren + 2 :].split()
    # rest[0] is field 3 (state); start_time is field 22.
    return comm, rest[0], int(rest[19])


def read_boot_id(path: str = "/proc/sys/kernel/random/boot_id") -> str:
    """This boot's id: a state file from another boot names other processes."""
    try:
        with open(path, encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        return ""


def parse_tgid(status: str) -> int:
    for line in status.splitlines():
        if line.startswith("Tgid:"):
            return int(line.split()[1])
    raise ValueError("no Tgid line in status")


class ProcFS:
    """Reads processes from a proc tree; tests point it at a fixture tree."""

    def __init__(self, root: str = "/proc") -> None:
        self.root = root

    def process(self, pid: int) -> ProcessInfo | None:
        """The process or thread `pid`, or None when there is none."""
        base = os.path.join(self.root, str(pid))
        try:
            with open(os.path.join(base, "stat"), encoding="utf-8", errors="replace") as f:
                stat = f.read()
            with open(os.path.join(base, "status"), encoding="utf-8", errors="replace") as f:
                status = f.read()
        except (FileNotFoundError, ProcessLookupError):
            return None
        comm, state, start_time = parse_stat(stat)
        return ProcessInfo(pid, parse_tgid(status), comm, state, start_time)


def parse_cgroup(text: str) -> str:
    """The cgroup v2 path from /proc/PID/cgroup ("0::/path"), or "" on a v1-only host."""
    for line in text.splitlines():
        if line.startswith("0::"):
            return line[3:].strip()
    return ""


class Identity:
    """What the selectors look at in /proc: each read may fail for a process that is gone."""

    def __init__(self, root: str = "/proc") -> None:
        self.root = root

    def pids(self) -> list[int]:
        return sorted(int(n) for n in os.listdir(self.root) if n.isdigit())

    def _read(self, pid: int, name: str) -> str:
        try:
            with open(os.path.join(self.root, str(pid), name), "rb") as f:
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def comm(self, pid: int) -> str:
        return self._read(pid, "comm").rstrip("\n")

    def cmdline(self, pid: int) -> str:
        """The arguments joined by spaces, as ps shows them."""
        return self._read(pid, "cmdline").rstrip("\0").replace("\0", " ")

    def cgroup(self, pid: int) -> str:
        return parse_cgroup(self._read(pid, "cgroup"))

    def exe(self, pid: int) -> str:
        """The executable's path; "" for a kernel thread, or where ptrace rules hide it."""
        try:
            return os.readlink(os.path.join(self.root, str(pid), "exe"))
        except OSError:
            return ""
