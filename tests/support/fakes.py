"""Stand-ins for the kernel side, for tests of the pure logic only."""

from __future__ import annotations

from tracer_exporter.kernel.errors import MapFull
from tracer_exporter.model.counters import Counts, Entry
from tracer_exporter.model.procfs import ProcessInfo

# The /proc/tracer header, as the contract spells it.
TRACER_HEADER = "PID kmalloc kfree kmalloc_mem kfree_mem sched up down lock unlock".split()  # noqa: SIM905


class FakeBackend:
    def __init__(self, limit: int = 100) -> None:
        self.limit = limit
        self.maps: dict[int, Counts] = {}
        self.followed: set[int] = set()
        self.children: dict[int, tuple[int, str]] = {}  # pid -> (parent, comm)

    def fork(self, parent: int, child: int, comm: str = "child") -> None:
        """What the kernel does when a followed process forks."""
        if parent in self.followed:
            self.maps[child] = Counts()
            self.followed.add(child)
            self.children[child] = (parent, comm)

    def track(self, pid: int, follow: bool = False, parent: int = 0) -> bool:
        if pid in self.maps:
            return False
        if len(self.maps) >= self.limit:
            raise MapFull(f"the limit of {self.limit} tracked processes is reached")
        self.maps[pid] = Counts()
        if follow:
            self.followed.add(pid)
        if parent:
            self.children[pid] = (parent, "child")
        return True

    def untrack(self, pid: int) -> bool:
        return self.maps.pop(pid, None) is not None

    def read_all(self) -> dict[int, Entry]:
        return {pid: Entry(c, *self.children.get(pid, (0, ""))) for pid, c in self.maps.items()}


class FakeProcesses:
    def __init__(self, *infos: ProcessInfo) -> None:
        self.infos = {i.pid: i for i in infos}

    def process(self, pid: int) -> ProcessInfo | None:
        return self.infos.get(pid)


def proc(pid: int, comm: str = "worker", tgid: int | None = None, state: str = "S", start: int = 100) -> ProcessInfo:
    return ProcessInfo(pid, pid if tgid is None else tgid, comm, state, start)
