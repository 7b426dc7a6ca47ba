from __future__ import annotations

import json
import os

import pytest
from fakes import FakeBackend, FakeProcesses, proc

from tracer_exporter.model.state import Saved, StateError, StateFile, decode, encode
from tracer_exporter.model.tracking import Tracker


def test_round_trip():
    entries = [Saved(30, 7, True, 20), Saved(20, 5, True)]
    boot, got = decode(encode("boot-1", entries))
    assert (boot, got) == ("boot-1", sorted(entries))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"{not json", "not valid JSON"),
        (b"[]", "not a version 1 state file"),
        (b'{"version": 1, "boot_id": 3, "pids": []}', "expected boot_id"),
        (b'{"version": 1, "boot_id": "b", "pids": [7]}', r"pids\[0\]: expected a mapping"),
        (b'{"version": 1, "boot_id": "b", "pids": [{"pid": -4}]}', r"pids\[0\]\.pid: expected a non-negative"),
        (b'{"version": 1, "boot_id": "b", "pids": [{"start_time": 3}]}', r"pids\[0\]\.pid: missing"),
        (b'{"version": 1, "boot_id": "b", "pids": [{"pid": 4, "follow_forks": "y"}]}', "follow_forks"),
    ],
)
def test_a_bad_file_is_refused_naming_the_problem(data, message):
    with pytest.raises(StateError, match=message):
        decode(data, "s.json")


def test_save_is_atomic_and_writes_only_changes(tmp_path):
    path = tmp_path / "sub" / "state.json"
    state = StateFile(str(path))
    assert state.load() is None
    assert state.save("b", [Saved(20, 5)])
    assert state.load() == ("b", [Saved(20, 5)])
    mtime = path.stat().st_mtime_ns
    assert not state.save("b", [Saved(20, 5)])
    assert path.stat().st_mtime_ns == mtime
    assert state.save("b", [])
    assert json.loads(path.read_text())["pids"] == []
    # No temporary file is left behind.
    assert sorted(os.listdir(path.parent)) == ["state.json"]


def test_an_unwritable_place_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    state = StateFile(str(blocker / "state.json"))
    with pytest.raises(StateError, match="cannot write the state file"):
        state.save("b", [Saved(1, 1)])


def _tracker(processes, saved):
    backend = FakeBackend()
    tracker = Tracker(processes, saved.append)
    tracker.attach_backend(backend)
    return tracker, backend


def test_runtime_pids_are_saved_on_every_change_but_config_pids_are_not():
    processes = FakeProcesses(proc(20, start=5), proc(21, start=6), proc(30, start=9))
    saved: list[list[Saved]] = []
    tracker, backend = _tracker(processes, saved)
    tracker.restore([])
    assert saved == [[]]
    tracker.add(20, follow=True)
    tracker.sync_config([21])
    assert saved[-1] == [Saved(20, 5, True)]
    # A child the kernel tracked on fork is kept too, with its parent.
    backend.fork(20, 30)
    tracker.rows()
    # Its start time is read by the state file's writer (start_times), not by the scrape.
    assert saved[-1] == [Saved(20, 5, True), Saved(30, 0, True, 20)]
    assert tracker.start_times(saved[-1]) == [Saved(20, 5, True), Saved(30, 9, True, 20)]
    tracker.remove(20)
    assert saved[-1] == [Saved(30, 9, True, 20)]  # and kept
    # The kernel dropped the child at its exit: the next look saves that.
    backend.maps.pop(30)
    n = len(saved)
    tracker.rows()
    assert saved[-1] == [] and len(saved) == n + 1
    tracker.rows()
    assert len(saved) == n + 1  # nothing changed, nothing written


def test_a_child_gone_before_its_start_time_is_read_is_not_saved():
    processes = FakeProcesses(proc(20, start=5), proc(30, state="Z"))
    saved: list[list[Saved]] = []
    tracker, backend = _tracker(processes, saved)
    tracker.restore([])
    tracker.add(20, follow=True)
    backend.fork(20, 30)
    tracker.rows()
    assert tracker.start_times(saved[-1]) == [Saved(20, 5, True)]


def test_nothing_is_saved_before_restore_ran():
    saved: list[list[Saved]] = []
    tracker, _ = _tracker(FakeProcesses(proc(20, start=5)), saved)
    tracker.rows()
    assert saved == []


def test_restore_drops_exited_and_reused_pids_and_keeps_the_rest():
    processes = FakeProcesses(proc(20, start=5), proc(30, start=9), proc(40, start=77), proc(50, state="Z"))
    saved: list[list[Saved]] = []
    tracker, backend = _tracker(processes, saved)
    entries = [Saved(20, 5, True), Saved(30, 9, True, 20), Saved(40, 11), Saved(50, 3), Saved(60, 4)]
    restored, dropped = tracker.restore(entries)
    assert restored == [20, 30]
    assert len(dropped) == 3
    assert "pid 40 is now another process" in dropped[0]
    assert "no process with pid 50" in dropped[1] and "no process with pid 60" in dropped[2]
    assert backend.followed == {20, 30}
    assert [(r.pid, r.parent) for r in tracker.rows()] == [(20, 0), (30, 20)]
    # The file is rewritten at once without what was dropped.
    assert saved[0] == [Saved(20, 5, True), Saved(30, 9, True, 20)]


def test_a_fifo_a_device_a_symlink_and_a_huge_file_are_refused_without_reading(tmp_path):
    import time

    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    link = tmp_path / "link.json"
    link.symlink_to("/dev/zero")
    good = tmp_path / "good.json"
    good.write_bytes(encode("b", [Saved(4, 1)]))
    link_to_good = tmp_path / "link-good.json"
    link_to_good.symlink_to(good)
    huge = tmp_path / "huge.json"
    with open(huge, "wb") as f:
        f.truncate(16 * 1024 * 1024 + 1)
    start = time.monotonic()
    for path, message in (
        (fifo, "the state file is a FIFO, not a regular file; not read"),
        (link, "the state file is a symbolic link; not followed"),
        (link_to_good, "the state file is a symbolic link; not followed"),
        (huge, "the state file is 16777217 bytes, over the limit of 16777216; not read"),
    ):
        with pytest.raises(StateError) as e:
            StateFile(str(path)).load()
        assert str(e.value) == f"{path}: {message}"
    assert time.monotonic() - start < 2.0
    with pytest.raises(StateError, match="a character device, not a regular file"):
        StateFile("/dev/zero").load()
    assert StateFile(str(good)).load() == ("b", [Saved(4, 1)])
    # Saving replaces the FIFO itself; it does not write into it.
    StateFile(str(fifo)).save("b", [Saved(5, 2)])
    assert StateFile(str(fifo)).load() == ("b", [Saved(5, 2)])


def test_a_directory_others_may_write_is_warned_of(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    assert StateFile(str(shared / "s.json")).directory_warning() == (
        f"state file directory {shared} is writable by every user (mode 1777): "
        "another user could replace the file and choose what is tracked after a restart"
    )
    private = tmp_path / "private"
    private.mkdir(mode=0o750)
    private.chmod(0o750)
    assert StateFile(str(private / "s.json")).directory_warning() == ""
