"""The state file's writer: off the caller's thread, newest last, bounded waits."""

from __future__ import annotations

import threading
import time

from tracer_exporter.model.state import Saved
from tracer_exporter.model.state_writer import StateWriter


def entries(n: int) -> list[Saved]:
    return [Saved(pid, 100 + pid, False, 0) for pid in range(1, n + 1)]


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, list[Saved]]] = []
        self.written = threading.Event()

    def __call__(self, got: list[Saved]) -> None:
        self.calls.append((threading.current_thread().name, got))
        self.written.set()


def test_a_burst_is_written_once_in_the_writers_thread_newest_last():
    rec = Recorder()
    writer = StateWriter(rec, debounce=0.3)
    for n in range(1, 51):
        writer.submit(entries(n))
    assert rec.calls == []  # submit never writes in the caller
    assert rec.written.wait(10)
    writer.close()
    assert [name for name, _ in rec.calls] == ["state-writer"]
    assert rec.calls[-1][1] == entries(50)


def test_flush_writes_the_pending_set_in_the_caller_at_once():
    rec = Recorder()
    writer = StateWriter(rec, debounce=30.0)
    writer.submit(entries(2))
    writer.submit(entries(3))
    started = time.monotonic()
    assert writer.flush(5.0)
    assert time.monotonic() - started < 5.0
    assert rec.calls == [(threading.current_thread().name, entries(3))]
    assert writer.flush(5.0)  # nothing pending: nothing written again
    assert len(rec.calls) == 1
    writer.close(5.0)


def test_close_writes_what_is_pending_and_ends_the_thread():
    rec = Recorder()
    writer = StateWriter(rec, debounce=30.0)
    writer.submit(entries(4))
    writer.close(5.0)
    assert rec.calls[-1][1] == entries(4)
    assert writer._thread is not None and not writer._thread.is_alive()


def test_a_failing_save_does_not_end_the_writer():
    rec = Recorder()
    failures = []

    def save(got: list[Saved]) -> None:
        if not failures:
            failures.append(got)
            raise RuntimeError("disk on fire")
        rec(got)

    writer = StateWriter(save, debounce=0.05)
    writer.submit(entries(1))
    deadline = time.monotonic() + 10
    while not failures and time.monotonic() < deadline:
        time.sleep(0.01)
    writer.submit(entries(2))
    assert rec.written.wait(10)
    writer.close(5.0)
    assert failures == [entries(1)] and rec.calls[-1][1] == entries(2)


def test_flush_gives_up_after_its_timeout_when_a_write_hangs(caplog):
    release = threading.Event()
    in_save = threading.Event()

    def save(got: list[Saved]) -> None:
        in_save.set()
        release.wait(10)

    writer = StateWriter(save, debounce=0.0)
    writer.submit(entries(1))
    assert in_save.wait(10)
    writer.submit(entries(2))
    started = time.monotonic()
    assert not writer.flush(0.3)
    assert time.monotonic() - started < 5.0
    assert "the state file was not written within 0 s" in caplog.text
    release.set()
    writer.close(5.0)
