"""The state file: the processes tracked at run time, so that a restart keeps them.

JSON, replaced atomically (a temporary file in the same directory, fsync,
rename), so a crash leaves the old file or the new one, never half of one.
Each entry carries the process's start time and the boot it was seen in,
which tells a reused pid (or a reboot) from the process that was tracked.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass

FORMAT_VERSION = 1
# A state file is a few KiB; anything this big is not one.
MAX_BYTES = 16 * 1024 * 1024


class StateError(Exception):
    """The state file cannot be read or written; the message names it."""


@dataclass(frozen=True, order=True)
class Saved:
    pid: int
    start_time: int  # clock ticks after boot, as in /proc/PID/stat
    follow: bool = False
    parent: int = 0  # set for a child tracked because its parent was followed


def encode(boot_id: str, entries: Iterable[Saved]) -> bytes:
    doc = {
        "version": FORMAT_VERSION,
        "boot_id": boot_id,
        "pids": [
            {"pid": e.pid, "start_time": e.start_time, "follow_forks": e.follow, "parent_pid": e.parent}
            for e in sorted(entries)
        ],
    }
    return json.dumps(doc, indent=1).encode() + b"\n"


def _int(item: dict[str, object], key: str, where: str) -> int:
    value = item.get(key, 0)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise StateError(f"{where}.{key}: expected a non-negative integer, got {value!r}")
    return value


def decode(data: bytes, source: str = "state file") -> tuple[str, list[Saved]]:
    """(boot_id, entries), or StateError naming what is wrong."""
    try:
        doc = json.loads(data)
    except ValueError as e:
        raise StateError(f"{source}: not valid JSON: {e}") from e
    if not isinstance(doc, dict) or doc.get("version") != FORMAT_VERSION:
        raise StateError(f"{source}: not a version {FORMAT_VERSION} state file")
    boot_id = doc.get("boot_id")
    items = doc.get("pids")
    if not isinstance(boot_id, str) or not isinstance(items, list):
        raise StateError(f"{source}: expected boot_id (a string) and pids (a list)")
    out: list[Saved] = []
    for i, item in enumerate(items):
        where = f"{source}: pids[{i}]"
        if not isinstance(item, dict):
            raise StateError(f"{where}: expected a mapping")
        follow = item.get("follow_forks", False)
        if not isinstance(follow, bool):
            raise StateError(f"{where}.follow_forks: expected true or false, got {follow!r}")
        pid = _int(item, "pid", where)
        if pid == 0:
            raise StateError(f"{where}.pid: missing or 0")
        out.append(Saved(pid, _int(item, "start_time", where), follow, _int(item, "parent_pid", where)))
    return boot_id, out


class StateFile:
    """One state file on disk; `save` writes only what changed."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._written: bytes | None = None

    def load(self) -> tuple[str, list[Saved]] | None:
        """What the file holds; None when there is no file yet.

        A symlink, FIFO, device or a file over MAX_BYTES is refused without reading
        it: none of them can block or exhaust the start.
        """
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise StateError(f"{self.path}: the state file is a symbolic link; not followed") from e
            raise StateError(f"{self.path}: cannot read the state file: {e.strerror}") from e
        try:
            info = os.fstat(fd)
            problem = check_stat(info)
            if problem:
                raise StateError(f"{self.path}: {problem}; not read")
            data = _read(fd, MAX_BYTES + 1)
        except OSError as e:
            raise StateError(f"{self.path}: cannot read the state file: {e.strerror}") from e
        finally:
            os.close(fd)
        if len(data) > MAX_BYTES:
            raise StateError(f"{self.path}: the state file grew over {MAX_BYTES} bytes; not read")
        return decode(data, self.path)

    def directory_warning(self) -> str:
        """A warning when others may replace the file (its directory is writable by them), else ''."""
        directory = os.path.dirname(os.path.abspath(self.path))
        try:
            info = os.stat(directory)
        except OSError:
            return ""
        return check_directory(directory, info)

    def save(self, boot_id: str, entries: Iterable[Saved]) -> bool:
        """Replaces the file atomically; False when it already held this."""
        data = encode(boot_id, entries)
        if data == self._written:
            return False
        directory = os.path.dirname(os.path.abspath(self.path))
        try:
            os.makedirs(directory, mode=0o750, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".state-", dir=directory)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self.path)
            except BaseException:
                os.unlink(tmp)
                raise
            _fsync_dir(directory)
        except OSError as e:
            raise StateError(f"{self.path}: cannot write the state file: {e.strerror or e}") from e
        self._written = data
        return True


def check_stat(info: os.stat_result) -> str:
    """Why a file of this type and size is not a state file, or ''."""
    if not stat.S_ISREG(info.st_mode):
        kinds = {
            stat.S_IFIFO: "a FIFO",
            stat.S_IFCHR: "a character device",
            stat.S_IFBLK: "a block device",
            stat.S_IFSOCK: "a socket",
            stat.S_IFDIR: "a directory",
        }
        return f"the state file is {kinds.get(stat.S_IFMT(info.st_mode), 'not a regular file')}, not a regular file"
    if info.st_size > MAX_BYTES:
        return f"the state file is {info.st_size} bytes, over the limit of {MAX_BYTES}"
    return ""


def check_directory(directory: str, info: os.stat_result) -> str:
    if info.st_mode & stat.S_IWOTH:
        return (
            f"state file directory {directory} is writable by every user (mode {stat.S_IMODE(info.st_mode):o}): "
            "another user could replace the file and choose what is tracked after a restart"
        )
    if info.st_mode & stat.S_IWGRP and info.st_gid != 0:
        return (
            f"state file directory {directory} is writable by group {info.st_gid} "
            f"(mode {stat.S_IMODE(info.st_mode):o}): its members could choose what is tracked after a restart"
        )
    return ""


def _read(fd: int, limit: int) -> bytes:
    chunks = []
    while limit > 0:
        chunk = os.read(fd, min(limit, 1 << 20))
        if not chunk:
            break
        chunks.append(chunk)
        limit -= len(chunk)
    return b"".join(chunks)


def _fsync_dir(directory: str) -> None:
    """Makes the rename durable; some filesystems cannot sync a directory."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
