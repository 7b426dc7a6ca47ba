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
        self.groups: dict[int, int] = {}  # pid -> group id

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

    def enrol(self, pid: int, group: int, selector: object) -> bool:
        created = self.track(pid)
        if created:
            self.groups[pid] = group
        return created

    def untrack(self, pid: int) -> bool:
        self.groups.pop(pid, None)
        return self.maps.pop(pid, None) is not None

    def read_all(self) -> dict[int, Entry]:
        return {
            pid: Entry(c, *self.children.get(pid, (0, "")), self.groups.get(pid, 0)) for pid, c in self.maps.items()
        }


class FakeGroupBackend:
    """The kernel's group maps: what was loaded, and totals of members that left."""

    def __init__(self) -> None:
        self.specs: list = []
        self.cmdline = False
        self.left: dict[int, Counts] = {}
        self.dropped: dict[int, int] = {}

    def load_selectors(self, specs: list, cmdline: bool) -> list[str]:
        self.specs, self.cmdline = list(specs), cmdline
        return []

    def left_totals(self) -> dict[int, Counts]:
        return dict(self.left)

    def group_dropped(self) -> dict[int, int]:
        return dict(self.dropped)


class FakeIdentity:
    """/proc as the selectors read it: pid -> (comm, exe, cmdline, cgroup)."""

    def __init__(self, procs: dict[int, tuple[str, str, str, str]]) -> None:
        self.procs = procs

    def pids(self) -> list[int]:
        return sorted(self.procs)

    def comm(self, pid: int) -> str:
        return self.procs.get(pid, ("", "", "", ""))[0]

    def exe(self, pid: int) -> str:
        return self.procs.get(pid, ("", "", "", ""))[1]

    def cmdline(self, pid: int) -> str:
        return self.procs.get(pid, ("", "", "", ""))[2]

    def cgroup(self, pid: int) -> str:
        return self.procs.get(pid, ("", "", "", ""))[3]


class FakeProcesses:
    def __init__(self, *infos: ProcessInfo) -> None:
        self.infos = {i.pid: i for i in infos}

    def process(self, pid: int) -> ProcessInfo | None:
        return self.infos.get(pid)


def proc(pid: int, comm: str = "worker", tgid: int | None = None, state: str = "S", start: int = 100) -> ProcessInfo:
    return ProcessInfo(pid, pid if tgid is None else tgid, comm, state, start)
