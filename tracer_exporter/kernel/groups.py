"""The workload groups' maps: selectors in, per-group totals and drops out.

comm and exe selectors are keys the program looks up at exec; a cgroup
selector is its subtree's cgroup ids (the program adds new descendants at
mkdir) and their path hashes (so a removed cgroup created again is known).
"""

from __future__ import annotations

import ctypes as ct
import logging
import os
import threading
from pathlib import Path

from tracer_exporter.kernel.contract import (
    CGROUP_SELECTED,
    GROUP_SHIFT,
    TRACK_BY_CGROUP,
    TRACK_BY_EXEC,
    TRACK_FOLLOW,
    path_hash,
)
from tracer_exporter.kernel.maps import entry_of
from tracer_exporter.kernel.preempt import Unpreempted
from tracer_exporter.model.counters import Counts, add_counts
from tracer_exporter.model.groups import GroupSpec
from tracer_exporter.model.selectors import Selector

log = logging.getLogger(__name__)

CGROUP_ROOT = Path("/sys/fs/cgroup")
SELECTOR_MAPS = ("comm_groups", "exe_groups", "cgroup_ids", "cgroup_paths")


def member_flags(selector: Selector, group: int) -> int:
    """The flags word a member of this selector starts with (bpf/tracer.h)."""
    flags = group << GROUP_SHIFT
    if selector.by_cgroup:
        # Children share their parent's cgroup: members whatever follow_forks says.
        return flags | TRACK_BY_CGROUP | TRACK_FOLLOW
    return flags | TRACK_BY_EXEC | (TRACK_FOLLOW if selector.follow_forks else 0)


def subtree(root: Path, path: str) -> list[tuple[str, int]]:
    """(path, cgroup id) of a cgroup and its descendants: the id is the directory's inode."""
    out: list[tuple[str, int]] = []
    top = root / path.lstrip("/")
    for dirpath, _dirs, _files in os.walk(top):
        try:
            ino = os.stat(dirpath).st_ino
        except OSError:
            continue  # removed meanwhile
        rel = "/" + os.path.relpath(dirpath, root)
        out.append((rel, ino))
    return out


class KernelGroups:
    """The GroupBackend of model.groups, on the program's maps."""

    def __init__(self, bpf: object, unpreempted: Unpreempted, root: Path = CGROUP_ROOT) -> None:
        self._bpf = bpf
        self._unpreempted = unpreempted
        self._root = root
        self._totals = bpf.get_table("group_totals")  # type: ignore[attr-defined]
        self._dropped = bpf.get_table("group_dropped")  # type: ignore[attr-defined]
        self._max = int(self._totals.max_entries) - 1
        self._lock = threading.Lock()
        self._left: dict[int, Counts] = {}  # members user space untracked
        self._ids: list[int] = []  # the groups in use

    def load_selectors(self, specs: list[GroupSpec], cmdline: bool) -> list[str]:
        bpf = self._bpf
        warnings: list[str] = []
        with self._unpreempted():
            for name in SELECTOR_MAPS:
                bpf[name].clear()  # type: ignore[index]
            kept = {s.id for s in specs}
            for gid in range(1, self._max + 1):
                if gid not in kept:
                    # An id that is free again starts from zero for its next group.
                    self._totals[self._totals.Key(gid)] = self._totals.Leaf()
                    self._dropped[self._dropped.Key(gid)] = self._dropped.Leaf(0)
            for spec in specs:
                warnings += self._load(spec)
            settings = bpf["settings"]  # type: ignore[index]
            settings[settings.Key(0)] = settings.Leaf(1 if cmdline else 0)
        with self._lock:
            self._left = {g: c for g, c in self._left.items() if g in kept}
            self._ids = sorted(kept)
        return warnings

    def _load(self, spec: GroupSpec) -> list[str]:
        s, flags = spec.selector, member_flags(spec.selector, spec.id)
        bpf = self._bpf
        if s.kind == "comm":
            table = bpf["comm_groups"]  # type: ignore[index]
            key = table.Key()
            key.comm = s.value.encode()
            table[key] = ct.c_uint32(flags)
        elif s.kind == "exe":
            table = bpf["exe_groups"]  # type: ignore[index]
            key = table.Key()
            key.path = s.value.encode()
            table[key] = ct.c_uint32(flags)
        elif s.by_cgroup:
            return self._load_cgroup(spec.cgroup, flags, s.name)
        return []

    def _load_cgroup(self, path: str, flags: int, name: str) -> list[str]:
        ids = self._bpf["cgroup_ids"]  # type: ignore[index]
        paths = self._bpf["cgroup_paths"]  # type: ignore[index]
        # The selector's own path first: a cgroup made while we walk is added by the program.
        paths[paths.Key(path_hash(path))] = ct.c_uint32(flags | CGROUP_SELECTED)
        found = subtree(self._root, path)
        try:
            for rel, ino in found:
                ids[ids.Key(ino)] = ct.c_uint32(flags)
                if rel != path:
                    paths[paths.Key(path_hash(rel))] = ct.c_uint32(flags)
        except Exception as e:
            return [f"group {name}: not every cgroup below {path} is remembered ({e}): see limits.cgroup_map_entries"]
        if not found:
            log.info("group %s: cgroup %s does not exist yet; its members are found once it does", name, path)
        return []

    def untracked(self, group: int, counts: Counts) -> None:
        """A member user space stopped counting: its counts stay in its group."""
        with self._lock:
            self._left[group] = add_counts(self._left.get(group, Counts()), counts)

    def left_totals(self) -> dict[int, Counts]:
        t = self._totals
        with self._unpreempted():
            out = {g: entry_of(t[t.Key(g)]).counts for g in self._ids}  # type: ignore[index]
        with self._lock:
            for g, c in self._left.items():
                out[g] = add_counts(out.get(g, Counts()), c)
        return out

    def group_dropped(self) -> dict[int, int]:
        t = self._dropped
        with self._unpreempted():
            return {g: int(t[t.Key(g)].value) for g in self._ids}  # type: ignore[index]
