"""The program's perf-buffer events: children of followed processes left untracked at
the limit, and execs for the cmdline selectors. One thread reads every buffer."""

from __future__ import annotations

import ctypes as ct
import logging
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)

# The reader blocks until an event comes: nothing wakes between scrapes.
EVENT_POLL_FOREVER = -1


class Poller:
    """The one reader of the program's perf buffers (BCC polls them all at once)."""

    def __init__(self, bpf: object) -> None:
        self._bpf = bpf
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    def start(self) -> None:
        """Once something is there to hear: before, nothing would ever wake it."""
        if self._thread is not None:
            return
        bpf = self._bpf

        def poll() -> None:
            # Blocks until an event comes; exits with the process (daemon thread).
            while not self._stopping.is_set():
                bpf.perf_buffer_poll(timeout=EVENT_POLL_FOREVER)  # type: ignore[attr-defined]

        self._thread = threading.Thread(target=poll, name="perf-events", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        # The reader may sleep on; with every probe detached nothing wakes it.
        self._stopping.set()


def _u32(data: int) -> int:
    return ct.cast(data, ct.POINTER(ct.c_uint32)).contents.value


class FollowDrops:
    """Logs once per parent whose children were not tracked for the limit
    (the count itself is the stats map's: tracer_follow_dropped_total)."""

    def __init__(self, bpf: object, limit: int, poller: Poller) -> None:
        self._bpf = bpf
        self._limit = limit
        self._poller = poller
        self._open = False
        self._warned: set[int] = set()

    def open(self) -> None:
        """Opens the perf buffer. The daemon calls it before dropping capabilities:
        Debian allows perf_event_open only with CAP_SYS_ADMIN."""
        if self._open:
            return
        self._bpf["follow_drop_events"].open_perf_buffer(self._on_event)  # type: ignore[index]
        self._open = True

    def _on_event(self, _cpu: int, data: int, _size: int) -> None:
        parent = _u32(data)
        if parent not in self._warned:
            self._warned.add(parent)
            log.warning(
                "children of pid %d are not tracked: the limit of %d tracked processes"
                " (limits.max_tracked_processes) is reached; see tracer_follow_dropped_total",
                parent,
                self._limit,
            )

    def watch(self) -> None:
        """Hears of drops from now on, once a process is followed."""
        self.open()
        self._poller.start()


class ExecEvents:
    """Every exec no kernel selector took, while a cmdline selector wants them;
    events the buffer had no room for are counted (lost)."""

    def __init__(self, bpf: object, poller: Poller) -> None:
        self._bpf = bpf
        self._poller = poller
        self._open = False
        self.on_exec: Callable[[int], None] | None = None
        self.lost = 0

    def open(self) -> None:
        """Before dropping capabilities, as FollowDrops.open: a reload may add a cmdline selector."""
        if self._open:
            return
        # 16 pages a CPU: thousands of 4-byte events between two reads, little memory.
        self._bpf["exec_events"].open_perf_buffer(self._on_event, page_cnt=16, lost_cb=self._on_lost)  # type: ignore[index]
        self._open = True

    def _on_event(self, _cpu: int, data: int, _size: int) -> None:
        handler = self.on_exec
        if handler is None:
            return
        try:
            handler(_u32(data))
        except Exception:
            log.exception("matching an exec against the cmdline selectors failed")

    def _on_lost(self, count: int) -> None:
        self.lost += count
        log.warning("%d execs not seen by the cmdline selectors: the perf buffer was full", count)

    def watch(self, handler: Callable[[int], None]) -> None:
        self.on_exec = handler
        self.open()
        self._poller.start()
