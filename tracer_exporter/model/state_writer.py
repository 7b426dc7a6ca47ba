"""Writes the state file off the request path.

The tracker reports each change of its runtime set; a scrape that notices a
process gone is one. Writing there would put an fsync under the tracker's
lock, in the scrape. Instead the latest set is handed to one thread, which
waits a moment for more changes and writes only the newest. Writes never
overlap, and the last one is always the newest set.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from tracer_exporter.model.state import Saved

log = logging.getLogger(__name__)

DEBOUNCE_SECONDS = 0.2  # a burst of changes (a fork storm, a churn) is one write
FLUSH_TIMEOUT_SECONDS = 30.0


class StateWriter:
    def __init__(self, save: Callable[[list[Saved]], None], debounce: float = DEBOUNCE_SECONDS) -> None:
        self._save = save
        self._debounce = debounce
        self._cond = threading.Condition()
        self._pending: list[Saved] | None = None
        self._busy = False  # a write is in progress
        self._closed = False
        self._thread: threading.Thread | None = None

    def submit(self, entries: list[Saved]) -> None:
        """The runtime set changed: written soon, in the writer's thread. Never blocks on the disk."""
        with self._cond:
            self._pending = list(entries)
            if self._thread is None and not self._closed:
                # Started on first use: after the capability drop, which threads started later inherit.
                self._thread = threading.Thread(target=self._run, name="state-writer", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._pending is None and not self._closed:
                    self._cond.wait()
                if self._pending is None:
                    return  # closed, nothing left
                # Wait for more changes; close ends the wait, so it never waits out the debounce.
                deadline = time.monotonic() + self._debounce
                while not self._closed and (left := deadline - time.monotonic()) > 0:
                    self._cond.wait(left)
            self._write_pending(FLUSH_TIMEOUT_SECONDS)

    def _write_pending(self, timeout: float) -> bool:
        """Writes the newest pending set, after any write in progress; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._busy:
                left = deadline - time.monotonic()
                if left <= 0 or (not self._cond.wait(left) and self._busy):
                    return False
            entries, self._pending = self._pending, None
            if entries is None:
                return True
            self._busy = True
        try:
            self._save(entries)
        except Exception:
            # save reports its own errors (StateError); anything else must not end the thread.
            log.exception("writing the state file failed")
        finally:
            with self._cond:
                self._busy = False
                self._cond.notify_all()
        return True

    def flush(self, timeout: float = FLUSH_TIMEOUT_SECONDS) -> bool:
        """Writes what is pending now, in the caller's thread; True once the newest set is on disk."""
        if not self._write_pending(timeout):
            log.warning("the state file was not written within %.0f s", timeout)
            return False
        return True

    def close(self, timeout: float = FLUSH_TIMEOUT_SECONDS) -> None:
        """Writes what is pending and stops the thread (bounded by timeout)."""
        self.flush(timeout)
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)
