"""The config file: parsed and checked here, knowing nothing of BPF."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any

import yaml

from tracer_exporter.model.procfs import PID_MAX_LIMIT
from tracer_exporter.model.selectors import DEFAULT_MAX_GROUPS, MAX_GROUPS_LIMIT, Selector, parse_select

# Bounds keep a typo from preallocating gigabytes of kernel memory.
MAX_TRACKED_LIMIT = 1 << 20
MAX_ALLOC_ENTRIES_LIMIT = 1 << 24
MAX_INFLIGHT_ENTRIES_LIMIT = 1 << 20
# The kernel refuses more return-probe instances than this per probe.
MAXACTIVE_LIMIT = 4096
# Control requests are answered for these clients unless the config says otherwise.
LOOPBACK = ("127.0.0.0/8", "::1/128")
# auto (the default): fentry where it is exact and cheaper, else kprobe; kprobe: kprobes and
# kretprobes; fentry: BPF trampolines where the kernel has them (else kprobe, with a warning).
PROBE_MODES = ("auto", "kprobe", "fentry")


@dataclass(frozen=True)
class Config:
    pids: tuple[int, ...] = ()
    follow_pids: tuple[int, ...] = ()  # the pids whose children are tracked too
    max_tracked_processes: int = 16384
    alloc_map_entries: int = 65536
    inflight_map_entries: int = 4096
    kretprobe_maxactive: int = 1024
    control_allowed_networks: tuple[str, ...] = LOOPBACK
    # Local socket owners allowed to control besides root: names or numeric ids.
    control_allowed_users: tuple[str | int, ...] = ()
    control_allowed_groups: tuple[str | int, ...] = ()
    # Basic-auth users (of --web.config.file) who may control, from anywhere.
    control_users: tuple[str, ...] = ()
    symbol_overrides: dict[str, tuple[str, ...]] = field(default_factory=dict)
    probe_mode: str = "auto"
    select: tuple[Selector, ...] = ()  # workload groups
    max_groups: int = DEFAULT_MAX_GROUPS
    # Selected cgroups and their descendants the kernel remembers.
    cgroup_map_entries: int = 8192


class ConfigError(Exception):
    """Every problem found, one per line, each naming the field."""


_SCHEMA: dict[str, set[str]] = {
    "pids": set(),
    "follow_forks": set(),
    "select": set(),
    "limits": {
        "max_tracked_processes",
        "alloc_map_entries",
        "inflight_map_entries",
        "max_groups",
        "cgroup_map_entries",
    },
    "probes": {"kretprobe_maxactive", "symbols", "mode"},
    "control": {"allowed_networks", "allowed_users", "allowed_groups", "users"},
}


def _int(where: str, value: Any, low: int, high: int, problems: list[str]) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int):
        problems.append(f"{where}: expected an integer, got {value!r}")
        return None
    if not low <= value <= high:
        problems.append(f"{where}: must be from {low} to {high}, got {value}")
        return None
    return value


def _section(doc: dict[str, Any], name: str, problems: list[str]) -> dict[str, Any]:
    value = doc.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict):
        problems.append(f"{name}: expected a mapping, got {type(value).__name__}")
        return {}
    for key in sorted(set(value) - _SCHEMA[name], key=str):
        problems.append(f"{name}.{key}: unknown key (known: {', '.join(sorted(_SCHEMA[name]))})")
    return value


def _pids(value: Any, follow_all: bool, problems: list[str]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(pids, pids followed). An entry is a pid or {pid: N, follow_forks: bool}."""
    if value is None:
        return (), ()
    if not isinstance(value, list):
        problems.append(f"pids: expected a list of process ids, got {type(value).__name__}")
        return (), ()
    pids: list[int] = []
    follow: list[int] = []
    for i, item in enumerate(value):
        follows = follow_all
        if isinstance(item, dict):
            for key in sorted(set(item) - {"pid", "follow_forks"}, key=str):
                problems.append(f"pids[{i}].{key}: unknown key (known: follow_forks, pid)")
            if not isinstance(item.get("follow_forks", follow_all), bool):
                problems.append(f"pids[{i}].follow_forks: expected true or false, got {item['follow_forks']!r}")
            else:
                follows = item.get("follow_forks", follow_all)
            if "pid" not in item:
                problems.append(f"pids[{i}].pid: missing")
                continue
            item = item["pid"]
        pid = _int(f"pids[{i}]", item, 1, PID_MAX_LIMIT, problems)
        if pid is None:
            continue
        if pid in pids:
            problems.append(f"pids[{i}]: pid {pid} is listed twice")
            continue
        pids.append(pid)
        if follows:
            follow.append(pid)
    return tuple(pids), tuple(follow)


def _networks(value: Any, problems: list[str]) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        problems.append("control.allowed_networks: expected a non-empty list of CIDR networks")
        return LOOPBACK
    good: list[str] = []
    for i, item in enumerate(value):
        try:
            good.append(str(ipaddress.ip_network(str(item), strict=False)))
        except ValueError:
            problems.append(f"control.allowed_networks[{i}]: {item!r} is not a network such as 127.0.0.0/8")
    return tuple(good)


def _names(where: str, value: Any, ids: bool, problems: list[str]) -> tuple[Any, ...]:
    """A list of names (and, when ids, non-negative numeric ids)."""
    if not isinstance(value, list):
        problems.append(f"{where}: expected a list of {'names or ids' if ids else 'names'}")
        return ()
    out: list[Any] = []
    for i, item in enumerate(value):
        if ids and isinstance(item, int) and not isinstance(item, bool) and item >= 0:
            out.append(item)
        elif isinstance(item, str) and item and not item.isspace():
            out.append(int(item) if ids and item.isdigit() else item)
        else:
            kind = "a name or a non-negative id" if ids else "a user name"
            problems.append(f"{where}[{i}]: expected {kind}, got {item!r}")
    return tuple(out)


def _symbols(value: Any, problems: list[str]) -> dict[str, tuple[str, ...]]:
    from tracer_exporter.model.counters import FUNCTION_NAMES

    if not isinstance(value, dict):
        problems.append("probes.symbols: expected a mapping of function name to a list of kernel symbols")
        return {}
    out: dict[str, tuple[str, ...]] = {}
    for name, syms in value.items():
        if name not in FUNCTION_NAMES:
            problems.append(f"probes.symbols.{name}: unknown function (known: {', '.join(FUNCTION_NAMES)})")
        elif not isinstance(syms, list) or not syms or not all(isinstance(s, str) and s for s in syms):
            problems.append(f"probes.symbols.{name}: expected a non-empty list of symbol names")
        else:
            out[name] = tuple(syms)
    return out


def parse_config(doc: Any, source: str = "config") -> Config:
    """A Config from a parsed YAML document, or ConfigError listing every problem."""
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(doc).__name__}")
    problems: list[str] = []
    for key in sorted(set(doc) - set(_SCHEMA), key=str):
        problems.append(f"{key}: unknown key (known: {', '.join(sorted(_SCHEMA))})")
    limits = _section(doc, "limits", problems)
    probes = _section(doc, "probes", problems)
    control = _section(doc, "control", problems)
    defaults = Config()
    follow_all = doc.get("follow_forks", False)
    if not isinstance(follow_all, bool):
        problems.append(f"follow_forks: expected true or false, got {follow_all!r}")
        follow_all = False
    pids, follow = _pids(doc.get("pids"), follow_all, problems)
    values: dict[str, Any] = {"pids": pids, "follow_pids": follow}
    for key, section, where, high in (
        ("max_tracked_processes", limits, "limits", MAX_TRACKED_LIMIT),
        ("alloc_map_entries", limits, "limits", MAX_ALLOC_ENTRIES_LIMIT),
        ("inflight_map_entries", limits, "limits", MAX_INFLIGHT_ENTRIES_LIMIT),
        ("max_groups", limits, "limits", MAX_GROUPS_LIMIT),
        ("cgroup_map_entries", limits, "limits", MAX_TRACKED_LIMIT),
        ("kretprobe_maxactive", probes, "probes", MAXACTIVE_LIMIT),
    ):
        if key in section:
            got = _int(f"{where}.{key}", section[key], 1, high, problems)
            values[key] = got if got is not None else getattr(defaults, key)
    values["select"] = parse_select(doc.get("select"), values.get("max_groups", defaults.max_groups), problems)
    if "allowed_networks" in control:
        values["control_allowed_networks"] = _networks(control["allowed_networks"], problems)
    for key, ids in (("allowed_users", True), ("allowed_groups", True), ("users", False)):
        if key in control:
            values[f"control_{key}"] = _names(f"control.{key}", control[key], ids, problems)
    if "symbols" in probes:
        values["symbol_overrides"] = _symbols(probes["symbols"], problems)
    if "mode" in probes:
        if probes["mode"] in PROBE_MODES:
            values["probe_mode"] = probes["mode"]
        else:
            problems.append(f"probes.mode: expected one of {', '.join(PROBE_MODES)}, got {probes['mode']!r}")
    if problems:
        raise ConfigError("\n".join(f"{source}: {p}" for p in problems))
    return Config(**values)


def load_config(path: str | None) -> Config:
    """The config at path (None: defaults, nothing tracked)."""
    if path is None:
        return Config()
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config file: {e.strerror}") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start})") from e
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}: {getattr(e, 'problem', e)}") from e
    return parse_config(doc, path)
