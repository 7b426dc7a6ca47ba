"""The kernel side as the model sees it: one loaded program, its maps and its health.

Everything here needs root and a kernel with kprobes; nothing else in the
package does. The parts live beside it: program (compile, mode, attach),
maps (the tracked set, batch reads), events (perf buffer), health.
"""

from __future__ import annotations

import logging
from pathlib import Path

from tracer_exporter.kernel import footprint, health, maps
from tracer_exporter.kernel.contract import TRACK_KEEP
from tracer_exporter.kernel.events import ExecEvents, FollowDrops, Poller
from tracer_exporter.kernel.groups import KernelGroups, member_flags
from tracer_exporter.kernel.preempt import Unpreempted
from tracer_exporter.kernel.program import Program, bpf_source_path
from tracer_exporter.kernel.symbols import Plan, read_kernel_data
from tracer_exporter.model.config import Config
from tracer_exporter.model.counters import Entry
from tracer_exporter.model.health import Attachment, Health, ProbeMode
from tracer_exporter.model.selectors import Selector

log = logging.getLogger(__name__)


class KernelProbes:
    """The Backend of model.tracking: track, untrack, read; plus load, attach, health and close."""

    def __init__(self, config: Config, plan: Plan, keep_exited: bool = False, source: Path | None = None) -> None:
        self._config = config
        self._plan = plan
        self._source = source  # the program; None: the package's own
        # `run` keeps the final counters of processes that exit.
        self._base_flags = TRACK_KEEP if keep_exited else 0
        self.program: Program | None = None
        self._tracked: maps.TrackedMap | None = None
        self._drops: FollowDrops | None = None
        self._poller: Poller | None = None
        self.groups: KernelGroups | None = None
        self.execs: ExecEvents | None = None
        # Around map syscalls, on every kernel: a dynamic one can be switched to full preemption at any time.
        self._unpreempted = Unpreempted()

    @property
    def mode(self) -> str:
        assert self.program is not None
        return self.program.mode

    def load(self) -> None:
        kernel = read_kernel_data()
        if kernel.preempt_count is None:
            log.warning(
                "the preempt count's address is not in /proc/kallsyms: interrupt work that arrives while a"
                " tracked process runs in user mode may be charged to it"
            )
        source = self._source or bpf_source_path()
        program = Program(self._config, self._plan, source, kernel)
        program.load()
        self.program = program
        bpf = program.bpf
        from bcc.libbcc import lib

        self._lib = lib
        self._tracked = maps.TrackedMap(
            bpf, lib, self._base_flags, self._config.max_tracked_processes, self._unpreempted, source
        )
        self._exited = bpf.get_table("exited")  # type: ignore[union-attr]
        self._stats = bpf.get_table("stats")  # type: ignore[union-attr]
        self._poller = Poller(bpf)
        self._drops = FollowDrops(bpf, self._config.max_tracked_processes, self._poller)
        self.execs = ExecEvents(bpf, self._poller)
        self.groups = KernelGroups(bpf, self._unpreempted)

    def attach(self) -> list[Attachment]:
        assert self.program is not None
        attachments = self.program.attach()
        # Nothing compiles from here on: the compiler's memory is the bulk of our RSS.
        footprint.release()
        return attachments

    def track(self, pid: int, follow: bool = False, parent: int = 0) -> bool:
        assert self._tracked is not None and self._drops is not None
        if follow:
            self._drops.watch()
        return self._tracked.track(pid, follow, parent)

    def enrol(self, pid: int, group: int, selector: Selector) -> bool:
        assert self._tracked is not None
        if selector.follow_forks or selector.by_cgroup:
            self.watch_follow_drops()
        return self._tracked.track(pid, flags=member_flags(selector, group))

    def watch_follow_drops(self) -> None:
        assert self._drops is not None
        self._drops.watch()

    def untrack(self, pid: int) -> bool:
        assert self._tracked is not None and self.groups is not None
        entry = self._tracked.lookup(pid)
        removed = self._tracked.untrack(pid)
        if removed and entry is not None and entry.group:
            self.groups.untracked(entry.group, entry.counts)
        return removed

    def read_all(self) -> dict[int, Entry]:
        assert self._tracked is not None
        return self._tracked.read_all()

    def pop_exited(self) -> dict[int, Entry]:
        """Final counters of processes that exited while kept (see keep_exited)."""
        return maps.pop_all(self._exited, self._lib, self._unpreempted)

    def open_follow_drops(self) -> None:
        """The perf buffers (children not tracked for the limit, execs for the cmdline
        selectors), while perf_event_open is allowed."""
        if self._drops is not None and self.execs is not None:
            self._drops.open()
            self.execs.open()

    def health(self) -> Health:
        program = self.program
        assert program is not None and program.bpf is not None
        mode = ProbeMode(program.mode, self._config.probe_mode, program.mode_reason)
        return health.read_health(
            self._stats,
            program.bpf.funcs,
            self._plan,
            program.attachments,
            mode,
            self._unpreempted,
            self.execs.lost if self.execs else 0,
        )

    def close(self) -> None:
        """Detach everything, including the tracefs events of return probes."""
        if self._poller is not None:
            self._poller.stop()
        if self._tracked is not None:
            self._tracked.close()
            self._tracked = None
        if self.program is not None:
            self.program.close()
