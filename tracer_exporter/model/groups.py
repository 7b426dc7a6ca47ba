"""Workload groups: ids for the config's selectors, the start-up scan, cmdline
matching at exec, and per-group totals that never go backwards.

The kernel enrols comm, exe and cgroup members itself (kernel/groups.py) and
folds a member's counts into its group when it exits or leaves; this module
finds the processes that matched before the exporter started and the
cmdline members, which only user space can read.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
from collections.abc import Callable
from typing import NamedTuple, Protocol

from tracer_exporter.model.counters import Counts, Row, add_counts
from tracer_exporter.model.procfs import Identity
from tracer_exporter.model.selectors import Selector, match, unit_path
from tracer_exporter.model.tracking import LimitReached, Tracker, TrackError

log = logging.getLogger(__name__)


class GroupSpec(NamedTuple):
    id: int  # 1 and up: the kernel's group id
    selector: Selector
    cgroup: str  # the resolved cgroup path of a cgroup or systemd_unit selector, else ""


class GroupRow(NamedTuple):
    name: str
    counts: Counts
    processes: int
    dropped: int


class GroupBackend(Protocol):
    def load_selectors(self, specs: list[GroupSpec], cmdline: bool) -> list[str]:
        """Puts the selectors in the kernel's maps; returns warnings."""

    def left_totals(self) -> dict[int, Counts]:
        """Per group id, what members that exited or left counted."""

    def group_dropped(self) -> dict[int, int]:
        """Per group id, matching processes the kernel did not track for the limit."""


def systemd_unit_path(unit: str) -> str:
    """The unit's cgroup as systemd reports it, or where it will be once started."""
    import subprocess

    try:
        out = subprocess.run(
            ["systemctl", "show", "--property=ControlGroup", "--property=Slice", "--", unit],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        out = ""
    props = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    return unit_path(unit, props.get("ControlGroup", ""), props.get("Slice", ""))


class Groups:
    """The config's groups: which id each has, and what each counted."""

    def __init__(
        self,
        tracker: Tracker,
        identity: Identity | None = None,
        resolve_unit: Callable[[str], str] = systemd_unit_path,
    ) -> None:
        self._tracker = tracker
        self._identity = identity or Identity()
        self._resolve_unit = resolve_unit
        self._backend: GroupBackend | None = None
        self._lock = threading.Lock()
        self._ids: dict[str, int] = {}  # by name, kept across reloads
        self._specs: list[GroupSpec] = []
        self._cmdline: list[GroupSpec] = []
        self._dropped: dict[int, int] = {}  # user space's own: the scan and cmdline matches
        self._last: dict[str, Counts] = {}  # what each group last showed
        self._hidden: frozenset[str] = frozenset()  # groups without per-process series

    def attach_backend(self, backend: GroupBackend) -> None:
        self._backend = backend

    @property
    def cmdline_wanted(self) -> bool:
        return bool(self._cmdline)

    def _assign(self, selectors: tuple[Selector, ...]) -> list[GroupSpec]:
        names = {s.name for s in selectors}
        # A group that is gone frees its id; one that stays keeps its series.
        self._ids = {n: i for n, i in self._ids.items() if n in names}
        free = (i for i in range(1, 1 << 16) if i not in self._ids.values())
        specs = []
        for s in selectors:
            gid = self._ids.get(s.name) or next(free)
            self._ids[s.name] = gid
            path = self._resolve_unit(s.value) if s.kind == "systemd_unit" else s.value if s.by_cgroup else ""
            specs.append(GroupSpec(gid, s, path))
        return specs

    def configure(self, selectors: tuple[Selector, ...]) -> list[str]:
        """Loads the selectors and tracks the processes that match now; returns warnings."""
        assert self._backend is not None
        gone = {s.selector.name for s in self._specs} - {s.name for s in selectors}
        for r in self._tracker.rows():
            if r.group in gone:
                # Its group is no more: it is not counted any longer.
                with contextlib.suppress(TrackError):
                    self._tracker.remove(r.pid)
        with self._lock:
            old = {spec.id for spec in self._specs}
            specs = self._assign(selectors)
            self._specs = specs
            self._cmdline = [s for s in specs if not s.selector.in_kernel]
            kept = {s.id for s in specs}
            for gone in old - kept:
                self._dropped.pop(gone, None)
            self._last = {n: c for n, c in self._last.items() if n in self._ids}
            self._tracker.set_groups({s.id: s.selector.name for s in specs})
            self._hidden = frozenset(s.selector.name for s in specs if not s.selector.per_process)
            warnings = self._backend.load_selectors(specs, bool(self._cmdline))
        warnings += self.scan()
        return warnings

    def scan(self) -> list[str]:
        """Tracks every process that matches a selector now (the kernel sees only what comes)."""
        specs = self._specs
        if not specs:
            return []
        selectors = [dataclasses.replace(s.selector, value=s.cgroup) if s.cgroup else s.selector for s in specs]
        ident = self._identity
        needs_exe = any(s.kind == "exe" for s in selectors)
        warnings: list[str] = []
        for pid in ident.pids():
            comm = ident.comm(pid)
            if not comm:
                continue  # gone
            i = match(selectors, comm, ident.exe(pid) if needs_exe else "", ident.cmdline(pid), ident.cgroup(pid))
            if i >= 0:
                self._enrol(pid, specs[i], warnings)
        return warnings

    def on_exec(self, pid: int) -> None:
        """A process exec'd and no kernel selector took it: the cmdline selectors' turn."""
        specs = self._cmdline
        if not specs:
            return
        cmdline = self._identity.cmdline(pid)
        for spec in specs:
            if spec.selector.pattern is not None and cmdline and spec.selector.pattern.search(cmdline):
                warnings: list[str] = []
                self._enrol(pid, spec, warnings)
                for w in warnings:
                    log.info("%s", w)
                return

    def _enrol(self, pid: int, spec: GroupSpec, warnings: list[str]) -> None:
        try:
            self._tracker.enrol(pid, spec.id, spec.selector)
        except LimitReached as e:
            with self._lock:
                self._dropped[spec.id] = self._dropped.get(spec.id, 0) + 1
            warnings.append(f"group {spec.selector.name}: pid {pid} not tracked: {e}")
        except TrackError:
            pass  # exited meanwhile, or a thread

    def metric_rows(self, rows: list[Row]) -> list[Row]:
        """The rows with per-process series: a group's members only with per_process."""
        hidden = self._hidden
        return [r for r in rows if r.group not in hidden] if hidden else rows

    def rows(self, read: Callable[[], list[Row]]) -> list[GroupRow]:
        """Each group's totals: members now (read() gives the tracked rows, called only
        when there are groups: a scrape without them reads the map once), plus what
        members that left counted."""
        if self._backend is None or not self._specs:
            return []
        rows = read()
        left = self._backend.left_totals()
        dropped = self._backend.group_dropped()
        live: dict[str, list[Row]] = {}
        for r in rows:
            if r.group:
                live.setdefault(r.group, []).append(r)
        out = []
        with self._lock:
            for spec in self._specs:
                name = spec.selector.name
                total = left.get(spec.id, Counts())
                for r in live.get(name, ()):
                    total = add_counts(total, r.counts)
                # A member counted after it left the map and before its counts were folded
                # would read short for an instant: a group never shows less than before.
                last = self._last.get(name)
                if last is not None:
                    total = Counts(*map(max, total, last))
                self._last[name] = total
                n_dropped = dropped.get(spec.id, 0) + self._dropped.get(spec.id, 0)
                out.append(GroupRow(name, total, len(live.get(name, ())), n_dropped))
        return out
