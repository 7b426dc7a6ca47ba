"""An independent counter: the kernel's own per-thread counts of the exporter's
columns, from ftrace hist triggers on kprobe events and the kmem:kmalloc
tracepoint, with no BPF at all.

Each event gets a hist trigger keyed by thread id and common_flags: hits in
hardirq or softirq context (0x08, 0x10; see task_context for NMI) are not
the thread's work and are left out. kmem:kmalloc gives kmalloc calls and
`bytes_req`, with two corrections the kernel makes necessary:
- it does not fire for kmalloc(0), which returns ZERO_SIZE_PTR before it: a
  kprobe event on the size-first entry points with `if size == 0` counts those;
- on 6.10+ a run-time size over 8 KiB fires it twice (__kmalloc_large_node_noprof
  traces, and its caller traces again): a kprobe event there, keyed by the
  return address on the stack, finds the doubled ones. (Not the event's
  call_site: the exporter's return probes replace return addresses. This
  event, added after them, runs before them.)
Failed kmallocs fire it with ptr 0: they count as calls, their bytes do not.
"""

from __future__ import annotations

import contextlib
import os
import platform
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

TRACING = Path("/sys/kernel/tracing")
GROUP = "tracer_oracle"
HARDIRQ, SOFTIRQ, NMI = 0x08, 0x10, 0x40  # ftrace's common_flags
COLUMNS = ("kmalloc", "kfree", "kmalloc_bytes", "sched", "up", "down", "lock", "unlock")
# Entry points that run __do_kmalloc_node (or 5.x's equivalent) themselves:
# kmalloc(0) through them returns before the tracepoint.
ZERO_SIZE_ENTRIES = (
    "__kmalloc",
    "__kmalloc_node",
    "__kmalloc_track_caller",
    "__kmalloc_node_track_caller",
    "__kmalloc_noprof",
    "__kmalloc_node_noprof",
    "__kmalloc_node_track_caller_noprof",
)
# 7.x inlines the kmalloc attempt of these two (6.12's kvmalloc calls __kmalloc_node_noprof).
ZERO_SIZE_ENTRIES_7 = ("__kvmalloc_node_noprof", "__kmalloc_flags_noprof")
# Callers of __kmalloc_large_node_noprof that trace kmem:kmalloc again after it.
DOUBLING_CALLERS = (
    "__kmalloc_noprof",
    "__kmalloc_node_noprof",
    "__kmalloc_node_track_caller_noprof",
    "__kvmalloc_node_noprof",
    "__kmalloc_flags_noprof",
)


def _write(path: Path, text: str) -> None:
    # tracefs refuses the seek that Python's append mode makes.
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def text_symbols() -> set[str]:
    names = set()
    for line in Path("/proc/kallsyms").read_text().splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[1] in "tT":
            names.add(parts[2])
    return names


@dataclass
class Section:
    """One hist trigger's output: per key, the values."""

    trigger: str
    rows: list[dict[str, str]]
    dropped: int = 0


def parse_hist(text: str) -> list[Section]:
    """`{ common_pid: 12[, caller: [ffff...] sym] } hitcount: 3  size: 64` rows, per trigger."""
    sections: list[Section] = []
    for line in text.splitlines():
        if line.startswith("# trigger info:"):
            sections.append(Section(line.split(":", 1)[1].strip(), []))
        elif line.startswith("{") and sections:
            key, _, values = line[1:].partition("}")
            row = dict(re.findall(r"(\w+):\s*(\d+)", values))
            pid = re.search(r"common_pid:\s*(\d+)", key)
            row["common_pid"] = pid[1] if pid else "-1"
            flags = re.search(r"common_flags:\s*(\d+)", key)
            row["common_flags"] = flags[1] if flags else "0"
            caller = re.search(r"caller:\s*(?:\[[0-9a-f]+\]\s*)?([\w.]+)", key)
            if caller:
                row["caller"] = caller[1]
            sections[-1].rows.append(row)
        elif line.strip().startswith("Dropped:") and sections:
            sections[-1].dropped = int(line.split(":")[1])
    return sections


def task_context(flags: int) -> bool:
    """Whether an event's common_flags say it ran in task context. A kprobe
    that is a breakpoint (neither on ftrace nor optimized, as on the lockdep
    kernel) runs inside the int3 handler, which enters NMI and hardirq
    context itself; no probed function runs in a real NMI, so there the NMI
    bit means that, and only the softirq bit tells."""
    if flags & NMI:
        return not flags & SOFTIRQ
    return not flags & (HARDIRQ | SOFTIRQ)


class Oracle:
    def __init__(self) -> None:
        self.release = tuple(int(n) for n in re.findall(r"\d+", platform.release())[:2])
        have = text_symbols()
        self.calls = {
            "sched": ["schedule"],
            "up": ["up"],
            "down": ["down_interruptible"],
            "lock": ["mutex_lock"] if "mutex_lock" in have else ["mutex_lock_nested", "_mutex_lock_nest_lock"],
            "unlock": ["mutex_unlock"],
            "kfree": ["kfree"],
        }
        zero = ZERO_SIZE_ENTRIES + (ZERO_SIZE_ENTRIES_7 if self.release >= (7, 0) else ())
        self.zero = [s for s in zero if s in have]
        self.large = "__kmalloc_large_node_noprof" if self.release >= (6, 10) else ""
        self.kmalloc_events = [e for e in ("kmalloc", "kmalloc_node") if (TRACING / "events/kmem" / e).exists()]
        self.triggers: list[tuple[Path, str]] = []
        self.events: list[str] = []

    def __enter__(self) -> Oracle:
        try:
            self._install()
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def _event(self, name: str, probe: str) -> Path:
        _write(TRACING / "kprobe_events", f"p:{GROUP}/{name} {probe}\n")
        self.events.append(name)
        return TRACING / "events" / GROUP / name

    def _trigger(self, event: Path, text: str) -> None:
        _write(event / "trigger", text + "\n")
        self.triggers.append((event, text))

    def _counted(self, event: Path, vals: str = "hitcount", where: str = "", keys: str = "common_pid") -> None:
        # Keyed by the flags too, so each hit's context is known. Room for every
        # thread and call site of a test run: a full table drops hits.
        both = f" if {where}" if where else ""
        self._trigger(event, f"hist:keys={keys},common_flags:vals={vals}:size=16384{both}")

    def _install(self) -> None:
        for column, symbols in self.calls.items():
            for i, symbol in enumerate(symbols):
                self._counted(self._event(f"{column}_{i}", symbol))
        for i, symbol in enumerate(self.zero):
            self._counted(self._event(f"zero_{i}", f"{symbol} size=%di:u64"), where="size == 0")
        if self.large:
            event = self._event("large", f"{self.large} size=%di:u64 caller=+0($stack):x64")
            self._counted(event, "hitcount,size", keys="common_pid,caller.sym")
        for name in self.kmalloc_events:
            event = TRACING / "events/kmem" / name
            self._counted(event, "hitcount,bytes_req")
            self._counted(event, "hitcount,bytes_req", where="ptr == 0")

    def remove(self) -> None:
        for event, text in reversed(self.triggers):
            with contextlib.suppress(OSError):
                _write(event / "trigger", f"!{text}\n")
        self.triggers.clear()
        for name in reversed(self.events):
            with contextlib.suppress(OSError):
                _write(TRACING / "kprobe_events", f"-:{GROUP}/{name}\n")
        self.events.clear()

    def _read(self, event: Path, tids: set[int], where: str = "", doubled: bool = False) -> dict[str, int]:
        """Sum of each value over @tids, task-context hits only, for the trigger filtered by @where."""
        out: dict[str, int] = {}
        for section in parse_hist((event / "hist").read_text()):
            cond = section.trigger.split(" if ", 1)[1].split(" [", 1)[0].strip() if " if " in section.trigger else ""
            if cond != where:
                continue
            assert section.dropped == 0, f"{event}: the hist table dropped {section.dropped} hits"
            for row in section.rows:
                if int(row["common_pid"]) not in tids or not task_context(int(row["common_flags"])):
                    continue
                if doubled and row.get("caller") not in DOUBLING_CALLERS:
                    continue
                for key, value in row.items():
                    if key not in ("common_pid", "common_flags", "caller"):
                        out[key] = out.get(key, 0) + int(value)
        return out

    def counts(self, tids: Iterable[int]) -> dict[str, int]:
        """The columns for the threads @tids, task context only."""
        tids = set(tids)
        out = dict.fromkeys(COLUMNS, 0)
        base = TRACING / "events" / GROUP
        for column, symbols in self.calls.items():
            for i in range(len(symbols)):
                out[column] += self._read(base / f"{column}_{i}", tids).get("hitcount", 0)
        for i in range(len(self.zero)):
            out["kmalloc"] += self._read(base / f"zero_{i}", tids, where="size == 0").get("hitcount", 0)
        for name in self.kmalloc_events:
            event = TRACING / "events/kmem" / name
            got = self._read(event, tids)
            failed = self._read(event, tids, where="ptr == 0")
            out["kmalloc"] += got.get("hitcount", 0)
            out["kmalloc_bytes"] += got.get("bytes_req", 0) - failed.get("bytes_req", 0)
        if self.large:
            # A doubled call that failed would have its size taken twice: real programs make none.
            doubled = self._read(base / "large", tids, doubled=True)
            out["kmalloc"] -= doubled.get("hitcount", 0)
            out["kmalloc_bytes"] -= doubled.get("size", 0)
        return out


def hist_triggers() -> bool:
    """Whether the kernel has CONFIG_HIST_TRIGGERS (Debian 11's 5.10 has not):
    every event then has a `hist` file."""
    return (TRACING / "events/sched/sched_switch/hist").exists()


class SlabOwnKmallocs(Oracle):
    """The slab allocator's own kmallocs on 7.x, per thread: its sheaves and
    object vectors come from __kmalloc_flags_noprof (mm-internal), also from
    inside a kfree. The kernel counts them as kmalloc calls and so does the
    exporter, so a row may exceed what the workload module asked for by at
    most these (their bytes too); elsewhere there are none."""

    SYMBOL = "__kmalloc_flags_noprof"

    def _install(self) -> None:
        if self.SYMBOL in text_symbols():
            self._counted(self._event("slab_own", f"{self.SYMBOL} size=%di:u64"), "hitcount,size")

    def of(self, tid: int) -> tuple[int, int]:
        """(calls, bytes) in task context by @tid."""
        if not self.events:
            return 0, 0
        got = self._read(TRACING / "events" / GROUP / "slab_own", {tid})
        return got.get("hitcount", 0), got.get("size", 0)


# `comm-TID [CPU] FLAGS TIMESTAMP: EVENT: FIELDS` lines of a trace buffer.
TRACE_LINE = re.compile(r"^\s*.*-(\d+)\s+(?:\(\s*[\d-]+\)\s+)?\[\d+\]\s+(\S{4,5})\s+[\d.]+:\s+(\w+):(.*)$")
NULL_POINTERS = ("(null)", "0000000000000000", "0x0", "00000000")


class TraceOracle(Oracle):
    """The same counts where the kernel has no hist triggers: every hit of
    the threads of @pids (and their children, event-fork) is recorded in a
    trace instance of its own and counted in Python."""

    def __init__(self, pids: Iterable[int]) -> None:
        super().__init__()
        assert not self.large, "no doubled kmallocs to correct before 6.10"
        self.pids = list(pids)
        self.instance = TRACING / "instances" / GROUP
        self.enabled: list[Path] = []

    def _install(self) -> None:
        self.instance.mkdir()
        _write(self.instance / "buffer_size_kb", "16384")
        _write(self.instance / "options/event-fork", "1")
        _write(self.instance / "set_event_pid", " ".join(map(str, self.pids)))
        super()._install()
        header = (self.instance / "trace").read_text(errors="replace")[:2000]
        assert "entries-in-buffer" in header, header

    def _counted(self, event: Path, vals: str = "hitcount", where: str = "", keys: str = "common_pid") -> None:
        here = self.instance / event.relative_to(TRACING)
        if here in self.enabled:
            return
        if where == "size == 0":
            _write(here / "filter", where)
        _write(here / "enable", "1")
        self.enabled.append(here)

    def remove(self) -> None:
        for here in reversed(self.enabled):
            with contextlib.suppress(OSError):
                _write(here / "enable", "0")
        self.enabled.clear()
        with contextlib.suppress(OSError):
            self.instance.rmdir()
        super().remove()

    def counts(self, tids: Iterable[int]) -> dict[str, int]:
        text = (self.instance / "trace").read_text(errors="replace")
        written = re.search(r"entries-in-buffer/entries-written: (\d+)/(\d+)", text)
        assert written and written[1] == written[2], f"the trace buffer lost events: {written and written[0]}"
        self._lines = [m.groups() for m in map(TRACE_LINE.match, text.splitlines()) if m]
        return super().counts(tids)

    def _read(self, event: Path, tids: set[int], where: str = "", doubled: bool = False) -> dict[str, int]:
        out = {"hitcount": 0, "bytes_req": 0}
        for tid, flags, name, fields in self._lines:
            # The hardirq/softirq column: '.' task, 'h'/'s'/'H' interrupts, 'z'/'Z' the int3 handler.
            if name != event.name or int(tid) not in tids or flags[2] in "hsH":
                continue
            values = dict(re.findall(r"(\w+)=(\S+)", fields))
            if where == "ptr == 0" and values.get("ptr") not in NULL_POINTERS:
                continue
            out["hitcount"] += 1
            out["bytes_req"] += int(values.get("bytes_req", 0))
        return out


def for_pids(pids: Iterable[int]) -> Oracle:
    """The oracle this kernel can run, counting (at least) the threads of @pids."""
    return Oracle() if hist_triggers() else TraceOracle(pids)
