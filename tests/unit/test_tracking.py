import pytest
from fakes import FakeBackend, FakeProcesses, proc

from tracer_exporter.model.counters import Counts
from tracer_exporter.model.tracking import (
    BadPid,
    LimitReached,
    NoSuchProcess,
    NotAProcess,
    NotReady,
    NotTracked,
    Tracker,
    parse_pid,
)


def make(*infos, limit=100):
    backend = FakeBackend(limit)
    tracker = Tracker(FakeProcesses(*infos))
    tracker.attach_backend(backend)
    return tracker, backend


@pytest.mark.parametrize("text", ["abc", "-1", "0", "1e3", "", " 1", "+5", "١٢", "99999999999999999999", "4194305"])
def test_parse_pid_rejects(text):
    with pytest.raises(BadPid):
        parse_pid(text)


def test_parse_pid_accepts():
    assert parse_pid("1") == 1
    assert parse_pid("4194304") == 4194304


def test_add_new_then_again():
    tracker, backend = make(proc(10, "demo"))
    assert tracker.add(10) is True
    assert tracker.add(10) is False
    assert [r.pid for r in tracker.rows()] == [10]
    assert tracker.rows()[0].comm == "demo"


def test_add_refuses_missing_zombie_and_thread():
    tracker, backend = make(proc(11, state="Z"), proc(13, tgid=12), proc(12))
    with pytest.raises(NoSuchProcess):
        tracker.add(99)
    with pytest.raises(NoSuchProcess):
        tracker.add(11)
    with pytest.raises(NotAProcess, match="pid 13 is a thread of process 12; track 12"):
        tracker.add(13)
    assert backend.maps == {}


def test_add_backs_out_when_the_process_exits_meanwhile():
    processes = FakeProcesses(proc(20))
    backend = FakeBackend()
    tracker = Tracker(processes)
    tracker.attach_backend(backend)
    real_track = backend.track

    def track_then_exit(pid, follow=False, parent=0):
        created = real_track(pid, follow)
        processes.infos[pid] = proc(pid, start=999)  # the pid was reused
        return created

    backend.track = track_then_exit
    with pytest.raises(NoSuchProcess, match="exited while being tracked"):
        tracker.add(20)
    assert backend.maps == {}


def test_limit():
    tracker, _ = make(proc(1), proc(2), limit=1)
    tracker.add(1)
    with pytest.raises(LimitReached) as e:
        tracker.add(2)
    assert (e.value.kind, e.value.pid) == ("limit", 2)


def test_remove():
    tracker, backend = make(proc(5))
    tracker.add(5)
    tracker.remove(5)
    assert backend.maps == {}
    with pytest.raises(NotTracked):
        tracker.remove(5)


def test_not_ready_before_backend():
    tracker = Tracker(FakeProcesses(proc(5)))
    with pytest.raises(NotReady) as e:
        tracker.add(5)
    assert e.value.kind == "not_ready"
    assert tracker.rows() == []


def test_rows_sorted_and_forget_what_the_kernel_dropped():
    tracker, backend = make(proc(30, "c"), proc(4, "a"), proc(200, "b"))
    for pid in (30, 4, 200):
        tracker.add(pid)
    backend.maps[30] = Counts(kmalloc_calls=3)
    assert [(r.pid, r.comm) for r in tracker.rows()] == [(4, "a"), (30, "c"), (200, "b")]
    del backend.maps[30]  # exited: the kernel removed it
    assert [r.pid for r in tracker.rows()] == [4, 200]
    # Back on the same pid later: a new process, a fresh row.
    tracker._processes.infos[30] = proc(30, "new", start=5000)
    assert tracker.add(30) is True
    assert [r.comm for r in tracker.rows() if r.pid == 30] == ["new"]


def test_sync_config_adds_warns_and_drops():
    tracker, backend = make(proc(1), proc(2), proc(3))
    assert tracker.sync_config([1, 2, 77]) == ["config pid 77: no process with pid 77"]
    assert set(backend.maps) == {1, 2}
    tracker.add(2)  # also asked for through the API
    tracker.sync_config([3])
    assert set(backend.maps) == {2, 3}


def test_followed_children_get_rows_with_their_parent():
    tracker, backend = make(proc(50, "server"))
    tracker.add(50, follow=True)
    backend.fork(50, 51, "server")
    backend.fork(51, 52, "server")
    rows = tracker.rows()
    assert [(r.pid, r.comm, r.parent) for r in rows] == [(50, "server", 0), (51, "server", 50), (52, "server", 51)]
    del backend.maps[51]  # the child exited
    assert [r.pid for r in tracker.rows()] == [50, 52]


def test_not_followed_means_no_children():
    tracker, backend = make(proc(60))
    tracker.add(60)
    backend.fork(60, 61)
    assert [r.pid for r in tracker.rows()] == [60]
