"""The kernel side: compile the BPF program, attach it, read and write its maps.

Everything here needs root and a kernel with kprobes; nothing else in the
package does.
"""

from __future__ import annotations

import contextlib
import ctypes as ct
import errno
import logging
import os
import sys
from pathlib import Path

from tracer_exporter import tracefs
from tracer_exporter.config import Config
from tracer_exporter.counters import Counts
from tracer_exporter.health import Attachment, Health
from tracer_exporter.symbols import Plan
from tracer_exporter.tracking import LimitReached

log = logging.getLogger(__name__)

BPF_NOEXIST = 1
# Keep in step with enum stat in bpf/tracer.bpf.c.
STAT_ALLOC_ENTRIES, STAT_ALLOC_INSERT_FAILURES, STAT_INFLIGHT_INSERT_FAILURES = 0, 1, 2
SOURCE_NAME = "tracer.bpf.c"


class ProbeError(Exception):
    """The BPF program could not be built or loaded."""


def bpf_source_path() -> Path:
    """bpf/tracer.bpf.c of the checkout, or of an installed copy."""
    candidates = (
        Path(__file__).resolve().parent.parent / "bpf" / SOURCE_NAME,
        Path(sys.prefix) / "share" / "tracer-exporter" / "bpf" / SOURCE_NAME,
    )
    for path in candidates:
        if path.is_file():
            return path
    raise ProbeError(f"BPF source {SOURCE_NAME} not found in: {', '.join(str(p) for p in candidates)}")


def cflags(config: Config) -> list[str]:
    # Threads inside kmalloc at once cannot exceed the return-probe instances.
    inflight = max(config.kretprobe_maxactive * 4, 1024)
    return [
        f"-DMAX_TRACKED={config.max_tracked_processes}",
        f"-DMAX_ALLOCS={config.alloc_map_entries}",
        f"-DMAX_INFLIGHT={inflight}",
    ]


def _errno(res: int) -> int:
    # libbcc returns -errno from newer libbpf and -1 with errno from older ones.
    return -res if res < -1 else ct.get_errno()


class KernelProbes:
    """One loaded BPF program and its attachments."""

    def __init__(self, config: Config, plan: Plan) -> None:
        self._config = config
        self._plan = plan
        self._bpf = None
        self._attachments: list[Attachment] = []

    def load(self) -> None:
        try:
            from bcc import BPF
        except ImportError as e:
            raise ProbeError(f"the bcc Python module is missing ({e}); install the distribution's python3-bpfcc") from e
        source = bpf_source_path()
        try:
            self._bpf = BPF(text=source.read_text(), cflags=cflags(self._config))
        except Exception as e:
            raise ProbeError(f"compiling {source} failed: {e}") from e
        self._tracked = self._bpf.get_table("tracked")
        self._stats = self._bpf.get_table("stats")
        from bcc.libbcc import lib

        self._lib = lib

    def attach(self) -> list[Attachment]:
        """Attach every probe of the plan; a failing symbol does not stop the rest."""
        assert self._bpf is not None
        out: list[Attachment] = []
        for p in self._plan.probes:
            try:
                self._bpf.attach_kprobe(event=p.symbol, fn_name=p.entry_handler)
                if p.return_handler:
                    self._bpf.attach_kretprobe(
                        event=p.symbol, fn_name=p.return_handler, maxactive=self._config.kretprobe_maxactive
                    )
            except Exception as e:
                log.warning("cannot attach %s at %s: %s", p.function, p.symbol, e)
                self._detach_quietly(p.symbol)
                out.append(Attachment(p.function, p.symbol, False, str(e)))
                continue
            log.debug("attached %s at %s", p.function, p.symbol)
            out.append(Attachment(p.function, p.symbol, True))
        self._attachments = out
        return out

    def _detach_quietly(self, symbol: str) -> None:
        assert self._bpf is not None
        for detach in (self._bpf.detach_kprobe, self._bpf.detach_kretprobe):
            with contextlib.suppress(Exception):
                detach(event=symbol)

    def _key(self, pid: int) -> ct.c_uint32:
        return self._tracked.Key(pid)

    def track(self, pid: int) -> bool:
        leaf = self._tracked.Leaf()
        res = self._lib.bpf_update_elem(self._tracked.map_fd, ct.byref(self._key(pid)), ct.byref(leaf), BPF_NOEXIST)
        if res == 0:
            return True
        err = _errno(res)
        if err == errno.EEXIST:
            return False
        if err == errno.E2BIG:
            raise LimitReached(
                f"the limit of {self._config.max_tracked_processes} tracked processes is reached"
                " (limits.max_tracked_processes)",
                pid,
            )
        raise OSError(err, f"tracking pid {pid}: {os.strerror(err)}")

    def untrack(self, pid: int) -> bool:
        res = self._lib.bpf_delete_elem(self._tracked.map_fd, ct.byref(self._key(pid)))
        if res == 0:
            return True
        err = _errno(res)
        if err == errno.ENOENT:
            return False
        raise OSError(err, f"untracking pid {pid}: {os.strerror(err)}")

    def read_all(self) -> dict[int, Counts]:
        fields = Counts._fields
        return {k.value: Counts(*(getattr(v, f) for f in fields)) for k, v in self._tracked.items()}

    def _stat(self, index: int) -> int:
        return int(sum(self._stats[self._stats.Key(index)]))

    def health(self) -> Health:
        profile = tracefs.read_kprobe_profile()
        me = os.getpid()
        missed: dict[str, int] = {}
        for p in self._plan.probes:
            if p.return_handler:
                _, miss = profile.get(tracefs.bcc_event_name("r", p.symbol, me), (0, 0))
                missed[p.function] = missed.get(p.function, 0) + miss
        return Health(
            attachments=list(self._attachments),
            missed=missed,
            alloc_entries=self._stat(STAT_ALLOC_ENTRIES),
            alloc_insert_failures=self._stat(STAT_ALLOC_INSERT_FAILURES),
            inflight_insert_failures=self._stat(STAT_INFLIGHT_INSERT_FAILURES),
        )

    def close(self) -> None:
        """Detach everything, including the tracefs events of return probes."""
        if self._bpf is not None:
            self._bpf.cleanup()
            self._bpf = None
