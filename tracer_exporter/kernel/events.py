"""The program's perf-buffer events: children of followed processes left untracked at the limit."""

from __future__ import annotations

import ctypes as ct
import logging
import threading

log = logging.getLogger(__name__)

# The reader blocks until an event comes: nothing wakes between scrapes.
EVENT_POLL_FOREVER = -1


class FollowDrops:
    """Logs once per parent whose children were not tracked for the limit
    (the count itself is the stats map's: tracer_follow_dropped_total)."""

    def __init__(self, bpf: object, limit: int) -> None:
        self._bpf = bpf
        self._limit = limit
        self._open = False
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._warned: set[int] = set()

    def open(self) -> None:
        """Opens the perf buffer. The daemon calls it before dropping capabilities:
        Debian allows perf_event_open only with CAP_SYS_ADMIN."""
        if self._open:
            return
        self._bpf["follow_drop_events"].open_perf_buffer(self._on_event)  # type: ignore[index]
        self._open = True

    def _on_event(self, _cpu: int, data: int, _size: int) -> None:
        parent = ct.cast(data, ct.POINTER(ct.c_uint32)).contents.value
        if parent not in self._warned:
            self._warned.add(parent)
            log.warning(
                "children of pid %d are not tracked: the limit of %d tracked processes"
                " (limits.max_tracked_processes) is reached; see tracer_follow_dropped_total",
                parent,
                self._limit,
            )

    def watch(self) -> None:
        """Starts the reader, once a process is followed: before, nothing would ever wake it."""
        if self._thread is not None:
            return
        self.open()
        bpf = self._bpf

        def poll() -> None:
            # Blocks until an event comes; exits with the process (daemon thread).
            while not self._stopping.is_set():
                bpf.perf_buffer_poll(timeout=EVENT_POLL_FOREVER)  # type: ignore[attr-defined]

        self._thread = threading.Thread(target=poll, name="follow-drops", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        # The reader may sleep on; with every probe detached nothing wakes it.
        self._stopping.set()
