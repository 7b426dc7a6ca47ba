"""Workload selectors (the config's `select`): what each one matches, and its checks.

Pure logic: the kernel side (kernel/groups.py) loads comm, exe and cgroup
selectors into maps and matches them at exec, fork and cgroup attach; the
start-up scan and the cmdline selectors use match() here on /proc data.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

MATCHERS = ("comm", "exe", "cmdline", "cgroup", "systemd_unit")
OPTIONS = ("follow_forks", "per_process")
NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
UNIT = re.compile(r"[A-Za-z0-9:_.@\\-]{1,255}")
# What the program's keys hold (TASK_COMM_LEN and EXE_LEN less the NUL; test_contract checks).
COMM_MAX = 15
EXE_MAX = 255
DEFAULT_MAX_GROUPS = 64
MAX_GROUPS_LIMIT = 4096  # ids live in the upper 16 bits of a member's flags


@dataclass(frozen=True)
class Selector:
    name: str
    kind: str  # one of MATCHERS
    value: str
    follow_forks: bool = True
    per_process: bool = False
    pattern: re.Pattern[str] | None = field(default=None, compare=False, repr=False)  # cmdline's

    @property
    def in_kernel(self) -> bool:
        """Matched by the program at exec (comm, exe) or by cgroup; cmdline is user space's."""
        return self.kind != "cmdline"

    @property
    def by_cgroup(self) -> bool:
        return self.kind in ("cgroup", "systemd_unit")


def unit_path(unit: str, control_group: str = "", slice_name: str = "") -> str:
    """A systemd unit's cgroup: what systemd says it is, or where its slice puts it
    (a-b.slice is /a.slice/a-b.slice), or system.slice."""
    if control_group:
        return control_group
    slice_name = slice_name or "system.slice"
    parts = slice_name.removesuffix(".slice").split("-")
    path = "".join("/" + "-".join(parts[: i + 1]) + ".slice" for i in range(len(parts)) if parts[0])
    return f"{path}/{unit}"


def match(selectors: list[Selector], comm: str, exe: str, cmdline: str, cgroup: str) -> int:
    """The index of the first selector a process matches, or -1. cgroup is its
    cgroup v2 path; a selector's cgroup path must be resolved (systemd units)."""
    for i, s in enumerate(selectors):
        if (
            (s.kind == "comm" and comm == s.value)
            or (s.kind == "exe" and exe and exe == s.value)
            or (s.kind == "cmdline" and s.pattern is not None and s.pattern.search(cmdline))
            or (s.by_cgroup and in_subtree(cgroup, s.value))
        ):
            return i
    return -1


def in_subtree(path: str, top: str) -> bool:
    return path == top or path.startswith(top.rstrip("/") + "/")


def _bool(where: str, value: Any, problems: list[str]) -> bool | None:
    if not isinstance(value, bool):
        problems.append(f"{where}: expected true or false, got {value!r}")
        return None
    return value


def _check_value(where: str, kind: str, value: Any, problems: list[str]) -> tuple[bool, re.Pattern[str] | None]:
    """(good, the compiled pattern of a cmdline); a bad value adds its problem."""
    if not isinstance(value, str) or not value:
        problems.append(f"{where}: expected a non-empty string, got {value!r}")
        return False, None
    if kind == "comm" and len(value.encode()) > COMM_MAX:
        problems.append(f"{where}: {value!r} is longer than a task name can be ({COMM_MAX} bytes)")
        return False, None
    if kind in ("exe", "cgroup") and not value.startswith("/"):
        problems.append(f"{where}: {value!r} is a relative path: expected an absolute one such as /usr/sbin/sshd")
        return False, None
    if kind == "exe" and len(value.encode()) > EXE_MAX:
        problems.append(f"{where}: longer than {EXE_MAX} bytes")
        return False, None
    if kind == "cgroup" and (value == "/" or "//" in value or "/../" in value + "/" or value.endswith("/")):
        problems.append(f"{where}: {value!r} is not a cgroup below the root, such as /system.slice/api.service")
        return False, None
    if kind == "systemd_unit" and not UNIT.fullmatch(value):
        problems.append(f"{where}: {value!r} is not a unit name such as postgresql.service")
        return False, None
    if kind == "cmdline":
        try:
            return True, re.compile(value)
        except re.error as e:
            problems.append(f"{where}: the regex does not compile: {e}")
            return False, None
    return True, None


def parse_select(value: Any, max_groups: int, problems: list[str]) -> tuple[Selector, ...]:
    """The `select` list, one problem per line naming the field."""
    if value is None:
        return ()
    if not isinstance(value, list):
        problems.append(f"select: expected a list of selectors, got {type(value).__name__}")
        return ()
    if len(value) > max_groups:
        problems.append(f"select: {len(value)} groups, more than limits.max_groups ({max_groups})")
    out: list[Selector] = []
    names: set[str] = set()
    for i, item in enumerate(value):
        where = f"select[{i}]"
        if not isinstance(item, dict):
            problems.append(f"{where}: expected a mapping with name and one of {', '.join(MATCHERS)}")
            continue
        for key in sorted(set(item) - {"name", *MATCHERS, *OPTIONS}, key=str):
            problems.append(f"{where}.{key}: unknown key (known: {', '.join(sorted({'name', *MATCHERS, *OPTIONS}))})")
        name = item.get("name")
        if name is None:
            problems.append(f"{where}.name: missing")
        elif not isinstance(name, str) or not NAME.fullmatch(name):
            problems.append(f"{where}.name: {name!r} is not 1 to 64 of A-Z a-z 0-9 _ . -")
            name = None
        elif name in names:
            problems.append(f"{where}.name: {name!r} is the name of another group")
            name = None
        else:
            names.add(name)
        kinds = [k for k in MATCHERS if k in item]
        if not kinds:
            problems.append(f"{where}: no matcher: give one of {', '.join(MATCHERS)}")
        elif len(kinds) > 1:
            problems.append(f"{where}: {' and '.join(kinds)}: give exactly one matcher")
        options = {k: _bool(f"{where}.{k}", item[k], problems) for k in OPTIONS if k in item}
        if len(kinds) != 1 or name is None:
            continue
        kind = kinds[0]
        good, pattern = _check_value(f"{where}.{kind}", kind, item[kind], problems)
        if not good or None in options.values():
            continue
        out.append(Selector(name, kind, item[kind], pattern=pattern, **options))  # type: ignore[arg-type]
    return tuple(out)
