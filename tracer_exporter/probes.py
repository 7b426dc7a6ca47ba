"""The kernel side: compile the BPF program, attach it, read and write its maps.

Everything here needs root and a kernel with kprobes; nothing else in the
package does.
"""

from __future__ import annotations

import contextlib
import ctypes as ct
import errno
import logging
import mmap
import os
import platform
import re
import struct
import sys
import threading
from pathlib import Path

from tracer_exporter import preempt, progstats, tracefs
from tracer_exporter.config import Config
from tracer_exporter.counters import Counts, Entry
from tracer_exporter.health import Attachment, Health
from tracer_exporter.symbols import Plan
from tracer_exporter.tracking import LimitReached

log = logging.getLogger(__name__)

BPF_NOEXIST = 1
ENOTSUPP = 524  # the kernel's own "not supported", which Python's errno lacks
# Keep in step with enum stat and TRACK_* in bpf/tracer.bpf.c.
STAT_ALLOC_ENTRIES = 0
STAT_ALLOC_INSERT_FAILURES = 1
STAT_INFLIGHT_INSERT_FAILURES = 2
STAT_FOLLOW_DROPPED = 3
STAT_EXITED_INSERT_FAILURES = 4
STAT_RETURNS_LOST = 5
TRACK_FOLLOW = 1
TRACK_KEEP = 2
# The follow-drop reader blocks until an event comes: nothing wakes between scrapes.
EVENT_POLL_FOREVER = -1
SOURCE_NAME = "tracer.bpf.c"
MODE_KPROBE = "kprobe"
# The tracepoints of bpf/tracer.bpf.c, which BCC attaches at load.
TP_EXIT = b"sched:sched_process_exit"
TP_FORK = b"sched_process_fork"
MODE_FENTRY = "fentry"
FILTER_SLOTS = 65536  # keep in step with FILTER_SLOTS in bpf/tracer.bpf.c
SLOT_BYTES = 8  # struct tracked_slot: the program's s32, then user space's


class ProbeError(Exception):
    """The BPF program could not be built or loaded."""


def bpf_source_path() -> Path:
    """bpf/tracer.bpf.c of the checkout, or of an installed copy.

    TRACER_EXPORTER_BPF_SOURCE names another file: for debugging, and for
    testing what a program that does not compile does.
    """
    override = os.environ.get("TRACER_EXPORTER_BPF_SOURCE")
    if override:
        return Path(override)
    candidates = (
        Path(__file__).resolve().parent.parent / "bpf" / SOURCE_NAME,
        Path(sys.prefix) / "share" / "tracer-exporter" / "bpf" / SOURCE_NAME,
    )
    for path in candidates:
        if path.is_file():
            return path
    raise ProbeError(f"BPF source {SOURCE_NAME} not found in: {', '.join(str(p) for p in candidates)}")


def fentry_probes(plan: Plan) -> str:
    """The FENTRY_PROBES list of bpf/tracer.bpf.c: one item per attach point."""
    items = []
    for p in plan.probes:
        if p.return_handler:
            items.append(f"KMALLOC({p.symbol}, {p.entry_handler.rsplit('arg', 1)[1]})")
        elif p.function == "kfree":
            items.append(f"KFREE({p.symbol})")
        else:
            items.append(f"CALLS({p.symbol}, {p.entry_handler})")
    return " ".join(items)


def task_btf(release: str | None = None, btf: Path = Path("/sys/kernel/btf/vmlinux")) -> bool:
    """Whether bpf_get_current_task_btf() works here: Linux 5.11+ with kernel BTF."""
    nums = re.match(r"(\d+)\.(\d+)", release or platform.release())
    return nums is not None and (int(nums[1]), int(nums[2])) >= (5, 11) and btf.exists()


def cflags(config: Config, plan: Plan | None = None, mode: str = MODE_KPROBE, with_task_btf: bool = False) -> list[str]:
    flags = [
        f"-DMAX_TRACKED={config.max_tracked_processes}",
        f"-DMAX_ALLOCS={config.alloc_map_entries}",
        f"-DMAX_INFLIGHT={config.inflight_map_entries}",
        f"-DFILTER_SLOTS={FILTER_SLOTS}",
    ]
    if with_task_btf:
        flags.append("-DTASK_BTF")
    if mode == MODE_FENTRY and plan is not None:
        flags.append(f"-DFENTRY_PROBES={fentry_probes(plan)}")
    return flags


def fentry_unsupported() -> str:
    """Why this kernel cannot run the fentry mode, or "" when it can."""
    from bcc import BPF

    if not BPF.support_kfunc():
        return "the kernel has no BTF (/sys/kernel/btf/vmlinux) or no BPF trampolines"
    return preempt.fentry_hazard(*preempt.current())


def _leaf_struct(leaf: type) -> struct.Struct | None:
    """struct counters of bpf/tracer.bpf.c as a struct format, if the layout is the expected one."""
    layout = struct.Struct("=9QII16s")  # the counters, parent, flags, comm
    names = [f[0] for f in leaf._fields_]  # type: ignore[attr-defined]
    if names != [*Counts._fields, "parent", "flags", "comm"] or ct.sizeof(leaf) != layout.size:
        return None
    if leaf.parent.offset != 72 or leaf.comm.offset != 80:  # type: ignore[attr-defined]
        return None
    return layout


def _errno(res: int) -> int:
    # libbcc returns -errno from newer libbpf and -1 with errno from older ones.
    return -res if res < -1 else ct.get_errno()


class KernelProbes:
    """One loaded BPF program and its attachments."""

    def __init__(self, config: Config, plan: Plan, keep_exited: bool = False) -> None:
        self._config = config
        self._plan = plan
        self._bpf = None
        self._attachments: list[Attachment] = []
        # `run` keeps the final counters of processes that exit.
        self._base_flags = TRACK_KEEP if keep_exited else 0
        self._events: threading.Thread | None = None
        self._stopping = threading.Event()
        self._warned_parents: set[int] = set()
        self.mode = MODE_KPROBE  # what load() really used
        self._detached = False
        self._batch: dict[str, tuple[ct.Array, ct.Array]] = {}  # reusable batch-read buffers per map
        self._batch_ok = True
        self._entries: dict[bytes, Entry] = {}  # the last read's entries, by their bytes
        self._last_read: tuple[tuple[int, ...], bytes, dict[int, Entry]] = ((), b"", {})
        self._slots: memoryview | None = None  # user space's halves of the tracked filter
        self._slots_lock = threading.Lock()  # user space's filter slots have one writer at a time
        # Around map syscalls, on every kernel: a dynamic one can be switched to full preemption at any time.
        self._unpreempted = preempt.Unpreempted(True)

    def load(self) -> None:
        try:
            from bcc import BPF
        except ImportError as e:
            raise ProbeError(f"the bcc Python module is missing ({e}); install the distribution's python3-bpfcc") from e
        source = bpf_source_path()
        removed = tracefs.remove_stale_bcc_events(self._plan.symbols)
        if removed:
            log.warning(
                "removed %d kprobe events left behind by a killed instance: %s", len(removed), " ".join(removed)
            )
        text = source.read_text()
        if self._config.probe_mode == MODE_FENTRY:
            self._bpf = self._load_fentry(BPF, text, source)
        if self._bpf is None:
            try:
                self._bpf = BPF(text=text, cflags=cflags(self._config, with_task_btf=task_btf()))
            except Exception as e:
                raise ProbeError(f"compiling {source} failed: {e}") from e
        self._tracked = self._bpf.get_table("tracked")
        self._map_slots()
        self._exited = self._bpf.get_table("exited")
        self._stats = self._bpf.get_table("stats")
        from bcc.libbcc import lib

        self._lib = lib

    def _load_fentry(self, bpf_class: type, text: str, source: Path) -> object | None:
        """The program in fentry mode (BCC attaches its trampolines at load), or
        None after one log line saying why the kprobe mode is used instead."""
        why = fentry_unsupported()
        if not why:
            try:
                bpf = bpf_class(text=text, cflags=cflags(self._config, self._plan, MODE_FENTRY, task_btf()))
            except Exception as e:
                why = f"loading the fentry/fexit programs failed: {str(e).strip().splitlines()[-1]}"
            else:
                self.mode = MODE_FENTRY
                self._kfuncs = (list(bpf.kfunc_entry_fds), list(bpf.kfunc_exit_fds))
                log.info("probes.mode fentry: %d trampoline programs attached", sum(map(len, self._kfuncs)))
                return bpf
        log.warning("probes.mode fentry is not available (%s); using kprobes", why)
        return None

    def attach(self) -> list[Attachment]:
        """Attach every probe of the plan; a failing symbol does not stop the rest."""
        assert self._bpf is not None
        if self._detached:
            # BCC attached the tracepoint handlers at load; detach() took them off.
            self._bpf.attach_tracepoint(tp=TP_EXIT, fn_name=b"tracepoint__" + TP_EXIT.replace(b":", b"__"))
            self._bpf.attach_raw_tracepoint(tp=TP_FORK, fn_name=b"raw_tracepoint__" + TP_FORK)
            self._detached = False
        if self.mode == MODE_FENTRY:
            return self._attach_fentry()
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
        out += [Attachment(f, s, False, "not in /proc/kallsyms") for f, s in self._plan.tried]
        self._attachments = out
        return out

    def _attach_fentry(self) -> list[Attachment]:
        # Load attached every program, or failed as a whole and fell back.
        assert self._bpf is not None
        entry, exit_ = self._kfuncs
        for name in entry:
            if name not in self._bpf.kfunc_entry_fds:
                self._bpf.attach_kfunc(fn_name=name)
        for name in exit_:
            if name not in self._bpf.kfunc_exit_fds:
                self._bpf.attach_kretfunc(fn_name=name)
        out = [Attachment(p.function, p.symbol, True) for p in self._plan.probes]
        out += [Attachment(f, s, False, "not in /proc/kallsyms") for f, s in self._plan.tried]
        self._attachments = out
        return out

    def detach(self) -> None:
        """Detach every probe but keep the program and its maps (attach() again
        to resume); for the benchmark, which interleaves configurations."""
        assert self._bpf is not None
        if not self._detached:
            self._bpf.detach_tracepoint(tp=TP_EXIT)
            self._bpf.detach_raw_tracepoint(tp=TP_FORK)
            self._detached = True
        if self.mode == MODE_FENTRY:
            for name in list(self._bpf.kfunc_entry_fds):
                self._bpf.detach_kfunc(fn_name=name)
            for name in list(self._bpf.kfunc_exit_fds):
                self._bpf.detach_kretfunc(fn_name=name)
            return
        for symbol in sorted(self._plan.symbols):
            self._detach_quietly(symbol)

    def _detach_quietly(self, symbol: str) -> None:
        assert self._bpf is not None
        for detach in (self._bpf.detach_kprobe, self._bpf.detach_kretprobe):
            with contextlib.suppress(Exception):
                detach(event=symbol)

    def _key(self, pid: int) -> ct.c_uint32:
        return self._tracked.Key(pid)

    def _map_slots(self) -> None:
        """User space's halves of the tracked filter (struct tracked_slot in
        bpf/tracer.bpf.c), written in place: a map update would overwrite the
        program's halves."""
        assert self._bpf is not None
        table = self._bpf.get_table("tracked_slots")
        if ct.sizeof(table.Leaf) != SLOT_BYTES:
            raise ProbeError(f"struct tracked_slot is {ct.sizeof(table.Leaf)} bytes, expected {SLOT_BYTES}")
        try:
            self._slots_mem = mmap.mmap(table.map_fd, FILTER_SLOTS * SLOT_BYTES)
        except OSError as e:
            raise ProbeError(f"cannot map the tracked filter into memory: {e}") from e
        # Aligned 4-byte stores, so the program never reads half a write.
        self._slots = memoryview(self._slots_mem).cast("i")

    def _slot_add(self, pid: int, delta: int) -> None:
        """Raised before a pid goes in, lowered after it comes out."""
        assert self._slots is not None
        self._slots[(pid % FILTER_SLOTS) * 2 + 1] += delta

    def track(self, pid: int, follow: bool = False, parent: int = 0) -> bool:
        leaf = self._tracked.Leaf()
        leaf.flags = self._base_flags | (TRACK_FOLLOW if follow else 0)
        leaf.parent = parent
        if follow:
            self._watch_follow_drops()
        with self._slots_lock, self._unpreempted():
            self._slot_add(pid, 1)
            res = self._lib.bpf_update_elem(self._tracked.map_fd, ct.byref(self._key(pid)), ct.byref(leaf), BPF_NOEXIST)
            if res != 0:
                self._slot_add(pid, -1)
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
        with self._slots_lock, self._unpreempted():
            res = self._lib.bpf_delete_elem(self._tracked.map_fd, ct.byref(self._key(pid)))
            if res == 0:
                self._slot_add(pid, -1)
        if res == 0:
            return True
        err = _errno(res)
        if err == errno.ENOENT:
            return False
        raise OSError(err, f"untracking pid {pid}: {os.strerror(err)}")

    @staticmethod
    def _entry(v: object) -> Entry:
        counts = Counts(*(getattr(v, f) for f in Counts._fields))
        comm = bytes(v.comm).split(b"\0", 1)[0].decode(errors="replace")  # type: ignore[attr-defined]
        return Entry(counts, int(v.parent), comm)  # type: ignore[attr-defined]

    def read_all(self) -> dict[int, Entry]:
        with self._unpreempted():
            got = self._read_batch("tracked", self._tracked)
            if got is None:
                # Per key: two syscalls an entry (next key, lookup).
                return {k.value: self._entry(v) for k, v in self._tracked.items()}
        keys, values, total = got
        unpack = _leaf_struct(self._tracked.Leaf)
        if unpack is None or ct.sizeof(self._tracked.Key) != 4:
            return {int(k): self._entry(v) for k, v in zip(keys[:total], values[:total])}
        # Straight from the bytes: ctypes field access costs more than the syscalls.
        # An entry whose bytes did not change since the last read is not decoded again.
        pids = struct.unpack(f"={total}I", ct.string_at(ct.addressof(keys), 4 * total))
        size = unpack.size
        raw = ct.string_at(ct.addressof(values), size * total)
        if (pids, raw) == self._last_read[:2]:
            return dict(self._last_read[2])  # nothing moved since the last read
        seen, now, out = self._entries, {}, {}
        for i, pid in enumerate(pids):
            rec = raw[i * size : (i + 1) * size]
            entry = seen.get(rec)
            if entry is None:
                v = unpack.unpack(rec)
                entry = Entry(Counts._make(v[:9]), v[9], v[11].split(b"\0", 1)[0].decode(errors="replace"))
            now[rec] = out[pid] = entry
        self._entries = now
        self._last_read = (pids, raw, out)
        return dict(out)

    def _read_batch(self, name: str, table: object) -> tuple[ct.Array, ct.Array, int] | None:
        """Every entry of a hash map in a few BPF_MAP_LOOKUP_BATCH calls, or None
        where bcc (before 0.20) or the kernel (before 5.6) lacks them."""
        lookup = getattr(self._lib, "bpf_lookup_batch", None)
        if lookup is None or not self._batch_ok:
            return None
        key_t, leaf_t = table.Key, table.Leaf  # type: ignore[attr-defined]
        if name not in self._batch:
            n = int(table.max_entries)  # type: ignore[attr-defined]
            self._batch[name] = ((key_t * n)(), (leaf_t * n)())
        keys, values = self._batch[name]
        size = len(keys)
        in_batch, out_batch, count = ct.c_uint32(0), ct.c_uint32(0), ct.c_uint32(0)
        total = 0
        while total < size:
            count.value = size - total
            res = lookup(
                table.map_fd,  # type: ignore[attr-defined]
                ct.byref(in_batch) if total else None,
                ct.byref(out_batch),
                ct.byref(keys, ct.sizeof(key_t) * total),
                ct.byref(values, ct.sizeof(leaf_t) * total),
                ct.byref(count),
            )
            err = _errno(res) if res else 0
            total += count.value
            if err == errno.ENOENT:
                break  # every bucket read
            if err:
                if total == 0 and err in (errno.EINVAL, errno.EOPNOTSUPP, ENOTSUPP):
                    log.info("batch map reads unavailable (%s); reading entries one by one", os.strerror(err))
                    self._batch_ok = False
                    return None
                raise OSError(err, f"reading the {name} map: {os.strerror(err)}")
            in_batch.value = out_batch.value
        return keys, values, total

    def pop_exited(self) -> dict[int, Entry]:
        """Final counters of processes that exited while kept (see keep_exited)."""
        with self._unpreempted():
            out = {k.value: self._entry(v) for k, v in self._exited.items()}
            for pid in out:
                self._lib.bpf_delete_elem(self._exited.map_fd, ct.byref(self._exited.Key(pid)))
        return out

    def _watch_follow_drops(self) -> None:
        """Log once per parent whose children were not tracked for the limit."""
        if self._events is not None or self._bpf is None:
            return

        def on_event(_cpu: int, data: int, size: int) -> None:
            parent = ct.cast(data, ct.POINTER(ct.c_uint32)).contents.value
            if parent not in self._warned_parents:
                self._warned_parents.add(parent)
                log.warning(
                    "children of pid %d are not tracked: the limit of %d tracked processes"
                    " (limits.max_tracked_processes) is reached; see tracer_follow_dropped_total",
                    parent,
                    self._config.max_tracked_processes,
                )

        self._bpf["follow_drop_events"].open_perf_buffer(on_event)
        bpf = self._bpf

        def poll() -> None:
            # Blocks until an event comes; exits with the process (daemon thread).
            while not self._stopping.is_set():
                bpf.perf_buffer_poll(timeout=EVENT_POLL_FOREVER)

        # Started only once a process is followed: otherwise nothing wakes at all.
        self._events = threading.Thread(target=poll, name="follow-drops", daemon=True)
        self._events.start()

    def _read_stats(self, *indexes: int) -> list[int]:
        """Per-CPU stats summed over CPUs, in one block of map lookups."""
        with self._unpreempted():
            return [int(sum(self._stats[self._stats.Key(i)])) for i in indexes]

    def _skipped(self) -> dict[str, int]:
        """Runs of each function's programs the kernel skipped (see progstats)."""
        assert self._bpf is not None
        handlers = {h: p.function for p in self._plan.probes for h in (p.entry_handler, p.return_handler) if h}
        symbols = {p.symbol: p.function for p in self._plan.probes}
        fds = {name.decode(): f.fd for name, f in self._bpf.funcs.items()}
        out: dict[str, int] = {}
        for name, label in progstats.program_labels(fds, handlers, symbols).items():
            n = progstats.recursion_misses(fds[name])
            if n is not None:
                out[label] = out.get(label, 0) + n
        return out

    def health(self) -> Health:
        profile = tracefs.read_kprobe_profile()
        me = os.getpid()
        kernel_missed: dict[str, int] = {}
        for p in self._plan.probes:
            if p.return_handler:
                _, miss = profile.get(tracefs.bcc_event_name("r", p.symbol, me), (0, 0))
                kernel_missed[p.function] = kernel_missed.get(p.function, 0) + miss
        returns_lost, inflight_failures, entries, insert_failures, dropped = self._read_stats(
            STAT_RETURNS_LOST,
            STAT_INFLIGHT_INSERT_FAILURES,
            STAT_ALLOC_ENTRIES,
            STAT_ALLOC_INSERT_FAILURES,
            STAT_FOLLOW_DROPPED,
        )
        return Health(
            attachments=list(self._attachments),
            # What tracked threads lost: returns never seen, and entries not recorded.
            missed={"kmalloc": returns_lost + inflight_failures},
            kernel_missed=kernel_missed,
            skipped=self._skipped(),
            alloc_entries=entries,
            alloc_insert_failures=insert_failures,
            follow_dropped=dropped,
        )

    def close(self) -> None:
        """Detach everything, including the tracefs events of return probes."""
        # The follow-drop reader may sleep on; with every probe detached nothing wakes it.
        self._stopping.set()
        if self._slots is not None:
            self._slots.release()
            self._slots_mem.close()
            self._slots = None
        if self._bpf is not None:
            self._bpf.cleanup()
            self._bpf = None
