"""Stand-ins for the kernel side, for tests of the pure logic only."""

from __future__ import annotations

from tracer_exporter.counters import Counts
from tracer_exporter.procfs import ProcessInfo
from tracer_exporter.tracking import LimitReached


class FakeBackend:
    def __init__(self, limit: int = 100) -> None:
        self.limit = limit
        self.maps: dict[int, Counts] = {}

    def track(self, pid: int) -> bool:
        if pid in self.maps:
            return False
        if len(self.maps) >= self.limit:
            raise LimitReached(f"the limit of {self.limit} tracked processes is reached", pid)
        self.maps[pid] = Counts()
        return True

    def untrack(self, pid: int) -> bool:
        return self.maps.pop(pid, None) is not None

    def read_all(self) -> dict[int, Counts]:
        return dict(self.maps)


class FakeProcesses:
    def __init__(self, *infos: ProcessInfo) -> None:
        self.infos = {i.pid: i for i in infos}

    def process(self, pid: int) -> ProcessInfo | None:
        return self.infos.get(pid)


def proc(pid: int, comm: str = "worker", tgid: int | None = None, state: str = "S", start: int = 100) -> ProcessInfo:
    return ProcessInfo(pid, pid if tgid is None else tgid, comm, state, start)
