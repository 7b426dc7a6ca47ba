"""The tracked set: which processes are counted, and why each one is.

The kernel map is the truth about what is tracked (the kernel drops a process
when its last thread exits); this module keeps what the kernel cannot: the
comm at the time tracking began and whether the config or the API asked.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

from tracer_exporter.kernel.errors import MapFull
from tracer_exporter.model.counters import Entry, Row
from tracer_exporter.model.procfs import PID_MAX_LIMIT, ProcessInfo
from tracer_exporter.model.selectors import Selector
from tracer_exporter.model.state import Saved

log = logging.getLogger(__name__)


SOURCE_API = "api"
SOURCE_CONFIG = "config"
SOURCE_FOLLOW = "follow"  # a child the kernel tracked on fork
SOURCE_SELECT = "select"  # a member of a workload group, found again by its selector after a restart


class Backend(Protocol):
    """The kernel side of tracking (the BPF maps)."""

    def track(self, pid: int, follow: bool = False, parent: int = 0) -> bool:
        """Start counting pid (and its future children when follow); False when it
        was tracked already. `parent` restores a followed child's parent. Raises
        MapFull."""

    def enrol(self, pid: int, group: int, selector: Selector) -> bool:
        """Start counting pid as a member of group (the id of selector's group);
        False when it was tracked already. Raises MapFull."""

    def untrack(self, pid: int) -> bool:
        """Stop counting pid (a member's counts go to its group); False when it was not tracked."""

    def read_all(self) -> dict[int, Entry]:
        """Every tracked pid with its counters."""


class Processes(Protocol):
    def process(self, pid: int) -> ProcessInfo | None: ...


class TrackError(Exception):
    """A request the tracked set refuses; `kind` says how (web.routes maps it to an HTTP status)."""

    kind = "invalid"

    def __init__(self, message: str, pid: int | None = None) -> None:
        super().__init__(message)
        self.pid = pid


class BadPid(TrackError):
    kind = "invalid"


class NotAProcess(TrackError):
    """A thread id that is not its process's id."""

    kind = "invalid"


class NoSuchProcess(TrackError):
    kind = "not_found"


class NotTracked(TrackError):
    kind = "not_found"


class LimitReached(TrackError):
    kind = "limit"


class NotReady(TrackError):
    kind = "not_ready"


def parse_pid(text: str) -> int:
    """A pid from a URL segment or config: decimal digits, 1..PID_MAX_LIMIT."""
    if not text:
        raise BadPid("empty pid: expected a process id such as 1234")
    if not (text.isascii() and text.isdigit()):
        raise BadPid(f"malformed pid {text!r}: expected a positive decimal integer")
    if len(text) > 12 or int(text) > PID_MAX_LIMIT:
        raise BadPid(f"pid {text} is out of range: pids run from 1 to {PID_MAX_LIMIT}")
    pid = int(text)
    if pid == 0:
        raise BadPid("pid 0 is the idle task and cannot be tracked")
    return pid


@dataclass
class _Meta:
    comm: str
    start_time: int
    sources: set[str] = field(default_factory=set)
    follow: bool = False
    parent: int = 0


# Told the processes tracked at run time (API and followed children) whenever
# that set changes: the state file's writer.
OnChange = Callable[[list[Saved]], None]


class Tracker:
    """Adds, removes and lists tracked processes; safe across HTTP threads."""

    def __init__(self, processes: Processes, on_change: OnChange | None = None) -> None:
        self._processes = processes
        self._backend: Backend | None = None
        self._meta: dict[int, _Meta] = {}
        self._lock = threading.Lock()
        self._on_change = on_change
        # None until restore() ran: a scrape before it must not overwrite the state file.
        self._saved: list[Saved] | None = None
        self._groups: dict[int, str] = {}  # workload group names by id

    def attach_backend(self, backend: Backend) -> None:
        """The kernel side is ready: requests are served from now on."""
        with self._lock:
            self._backend = backend

    def _ready_backend(self) -> Backend:
        if self._backend is None:
            raise NotReady("the probes are not attached yet; see /-/ready")
        return self._backend

    def _live_process(self, pid: int) -> ProcessInfo:
        info = self._processes.process(pid)
        if info is None or info.exited:
            raise NoSuchProcess(f"no process with pid {pid}", pid)
        if info.tgid != pid:
            raise NotAProcess(
                f"pid {pid} is a thread of process {info.tgid}; track {info.tgid} to count all its threads",
                pid,
            )
        return info

    def add(self, pid: int, source: str = SOURCE_API, follow: bool = False, parent: int = 0) -> bool:
        """Track pid; True when newly tracked, False when it already was."""
        with self._lock:
            created = self._add(pid, source, follow, parent)
            self._changed()
            return created

    def _add(
        self,
        pid: int,
        source: str,
        follow: bool,
        parent: int = 0,
        start_time: int | None = None,
        group: tuple[int, Selector] | None = None,
    ) -> bool:
        backend = self._ready_backend()
        info = self._live_process(pid)
        if start_time is not None and info.start_time != start_time:
            raise NoSuchProcess(f"pid {pid} is now another process (it started at a different time)", pid)
        try:
            created = backend.enrol(pid, *group) if group else backend.track(pid, follow, parent)
        except MapFull as e:
            raise LimitReached(str(e), pid) from e
        if created:
            # It may have exited between the look and the insert, and then
            # no exit event would ever remove it.
            again = self._processes.process(pid)
            if again is None or again.exited or again.start_time != info.start_time:
                backend.untrack(pid)
                raise NoSuchProcess(f"process {pid} exited while being tracked", pid)
            self._meta[pid] = _Meta(info.comm, info.start_time, follow=follow, parent=parent)
        meta = self._meta.setdefault(pid, _Meta(info.comm, info.start_time, follow=follow, parent=parent))
        meta.sources.add(source)
        return created

    def enrol(self, pid: int, group: int, selector: Selector) -> bool:
        """Track pid as a member of a workload group; True when newly tracked."""
        with self._lock:
            return self._add(pid, SOURCE_SELECT, selector.follow_forks, group=(group, selector))

    def set_groups(self, names: dict[int, str]) -> None:
        with self._lock:
            self._groups = dict(names)

    def remove(self, pid: int) -> None:
        with self._lock:
            backend = self._ready_backend()
            self._meta.pop(pid, None)
            removed = backend.untrack(pid)
            self._changed()
            if not removed:
                raise NotTracked(f"pid {pid} is not tracked", pid)

    def restore(self, entries: Iterable[Saved]) -> tuple[list[int], list[str]]:
        """Tracks again what the state file kept: (pids restored, why others were not).

        A pid whose process exited, or whose number now belongs to another
        process (another start time), is dropped.
        """
        restored: list[int] = []
        dropped: list[str] = []
        with self._lock:
            # Parents first, so that a restored child keeps its parent's row order.
            for e in sorted(entries, key=lambda e: (e.parent != 0, e.pid)):
                source = SOURCE_FOLLOW if e.parent else SOURCE_API
                try:
                    self._add(e.pid, source, e.follow, e.parent, e.start_time)
                    restored.append(e.pid)
                except TrackError as err:
                    dropped.append(f"state pid {e.pid}: {err}")
            # Written even when unchanged, so the file drops what was not restored.
            self._saved = self._runtime()
            if self._on_change is not None:
                self._on_change(self._saved)
        return restored, dropped

    def _runtime(self) -> list[Saved]:
        return sorted(
            Saved(pid, m.start_time, m.follow, m.parent)
            for pid, m in self._meta.items()
            if m.sources & {SOURCE_API, SOURCE_FOLLOW} and (m.start_time or SOURCE_FOLLOW in m.sources)
        )

    def start_times(self, entries: list[Saved]) -> list[Saved]:
        """entries with every start time known: a followed child's is read here, in the
        state writer's thread, and kept; a child gone meanwhile is left out."""
        out: list[Saved] = []
        learned: dict[int, int] = {}
        for e in entries:
            if e.start_time:
                out.append(e)
                continue
            info = self._processes.process(e.pid)
            if info is not None and not info.exited:
                learned[e.pid] = info.start_time
                out.append(Saved(e.pid, info.start_time, e.follow, e.parent))
        with self._lock:
            for pid, start in learned.items():
                meta = self._meta.get(pid)
                if meta is not None and not meta.start_time:
                    meta.start_time = start
        return out

    def _changed(self) -> None:
        """Tells on_change when the runtime set differs from what it was last told."""
        if self._on_change is None or self._saved is None:
            return
        now = self._runtime()
        if now != self._saved:
            self._saved = now
            self._on_change(now)

    def rows(self) -> list[Row]:
        """Tracked processes sorted by pid; forgets those the kernel dropped."""
        with self._lock:
            if self._backend is None:
                return []
            entries = self._backend.read_all()
            gone = self._meta.keys() - entries.keys()
            for pid in gone:
                del self._meta[pid]
            new = [pid for pid in entries if pid not in self._meta]
            for pid in new:
                # Tracked by the kernel on fork: it knows the comm and the parent. The start
                # time, which only the state file needs, is read by its writer (start_times):
                # a burst of thousands of children costs a scrape no /proc reads.
                e = entries[pid]
                # A group member comes back by its selector, not from the state file.
                source = SOURCE_SELECT if e.group else SOURCE_FOLLOW
                self._meta[pid] = _Meta(e.comm, 0, {source}, follow=True, parent=e.parent)
            # Only a change of the set can change what the state file keeps:
            # a scrape of an unchanged set does not rebuild it.
            if gone or new:
                self._changed()
            groups = self._groups
            return [
                Row(pid, self._meta[pid].comm, e.counts, e.parent, groups.get(e.group, ""))
                for pid, e in sorted(entries.items())
            ]

    def sync_config(self, pids: Iterable[int], follow: Iterable[int] = ()) -> list[str]:
        """Make the config's pids tracked and drop those it no longer lists.

        `follow` are the pids whose children are tracked too. Returns one
        warning per pid that could not be tracked; the rest proceed. A pid
        also added through the API stays when the config drops it.
        """
        wanted = set(pids)
        following = set(follow)
        warnings: list[str] = []
        for pid in sorted(wanted):
            try:
                self.add(pid, SOURCE_CONFIG, pid in following)
            except TrackError as e:
                warnings.append(f"config pid {pid}: {e}")
        with self._lock:
            dropped = [pid for pid, meta in self._meta.items() if SOURCE_CONFIG in meta.sources and pid not in wanted]
            for pid in dropped:
                meta = self._meta[pid]
                meta.sources.discard(SOURCE_CONFIG)
                if not meta.sources and self._backend is not None:
                    self._backend.untrack(pid)
                    del self._meta[pid]
            self._changed()
        return warnings
