"""The workload module against a real kernel, checked by a tracer of its own.

tests/workload/ builds tracer_workload.ko; every tally it reports must match
expected() for the ops asked, and a small BCC program here, independent of
the exporter, must count exactly the same calls at kernel function entry:

- kernel-thread jobs (spawn/start/wait): every call the thread makes between
  start and the return of wait, by its pid;
- process jobs (run): every call made inside the module's write handler.

kmalloc is reached through several entry points (they differ by kernel and by
whether the size is a compile-time constant), and some call others (on 6.12 a
large __kmalloc_noprof goes through __kmalloc_large_node_noprof), so the
program counts each entry point and, separately, the outermost kmalloc-family
call of each nest. Calls made by interrupts on top of the task (RCU callbacks
freeing a dead thread's structures, say) are not the task's and are counted
apart.
"""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

import pytest
from workload import Tally, Workload, WorkloadError, expected

pytestmark = pytest.mark.guest

# Entry points of kmalloc() and friends across kernels; those absent from
# kallsyms are skipped. 6.1: __kmalloc, kmalloc_trace, kmalloc_large, ...;
# 6.12: the *_noprof ones; 5.10: kmem_cache_alloc_trace, kmalloc_order_trace.
KMALLOC_FUNCS = (
    "__kmalloc",
    "__kmalloc_noprof",
    "kmalloc_trace",
    "kmalloc_trace_noprof",
    "kmalloc_large",
    "kmalloc_large_node",
    "__kmalloc_node",
    "__kmalloc_node_noprof",
    "kmalloc_node_trace",
    "kmalloc_node_trace_noprof",
    "__kmalloc_track_caller",
    "__kmalloc_node_track_caller",
    "__kmalloc_node_track_caller_noprof",
    "__kmalloc_cache_noprof",
    "__kmalloc_cache_node_noprof",
    "__kmalloc_large_noprof",
    "__kmalloc_large_node_noprof",
    "kmalloc_order",
    "kmalloc_order_trace",
    "kmem_cache_alloc_trace",
    "kmem_cache_alloc_node_trace",
)
# The other counted functions, and the tally field each one must match.
OTHER_FUNCS = {
    "kfree": "kfree",
    "schedule": "sched",
    "up": "up",
    "down_interruptible": "down",
    "mutex_lock": "lock",
    "mutex_unlock": "unlock",
}
FUNCS = KMALLOC_FUNCS + tuple(OTHER_FUNCS)
# Counter slots: one per function for calls in the task's own context, one per
# function for calls in interrupt context on top of it, one for outermost calls.
IRQ = len(FUNCS)
OUTER = 2 * len(FUNCS)
WRITE_HANDLER = "tw_write"  # the module's write(): the window of a run

BPF_PROGRAM = """
#include <uapi/linux/ptrace.h>
#include <linux/sched.h>

/*
 * The tgid (user-space pid) watched, or 0 to watch every thread while it is
 * inside the module's write() instead. Never both: the commands that drive a
 * kernel thread (spawn, start, wait) allocate and sleep in write() too.
 */
BPF_ARRAY(target, u32, 1);
BPF_HASH(in_write, u32, u32, 1024);  /* threads inside the module's write() */
BPF_HASH(depth, u32, u32, 1024);     /* kmalloc-family nesting, per thread */
BPF_ARRAY(counts, u64, NSLOTS);

/*
 * Interrupts (and the softirqs run as they end) borrow whatever task is
 * current, here on the CPU's interrupt stack: RCU callbacks freeing an exited
 * task's structures, for one, call kfree on top of the next task. Those calls
 * are not the task's; they are counted apart.
 */
static __always_inline int on_task_stack(struct pt_regs *ctx)
{
    struct task_struct *task = (struct task_struct *)bpf_get_current_task();
    u64 base = (u64)task->stack;

    return PT_REGS_SP(ctx) - base < THREAD_SIZE;
}

/* 0: not watched; 1: the watched task; 2: an interrupt on top of it. */
static __always_inline int watched(struct pt_regs *ctx)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32, tid = (u32)id, zero = 0;
    u32 *t = target.lookup(&zero);
    int w;

    if (t && *t)
        w = *t == tgid;
    else
        w = in_write.lookup(&tid) != NULL;
    if (w && !on_task_stack(ctx))
        w = 2;
    return w;
}

static __always_inline void bump(u32 slot)
{
    u64 *v = counts.lookup(&slot);

    if (v)
        __sync_fetch_and_add(v, 1);
}

static __always_inline int hit(struct pt_regs *ctx, u32 slot)
{
    int w = watched(ctx);

    if (w)
        bump(w == 1 ? slot : IRQ + slot);
    return 0;
}

static __always_inline int alloc_enter(struct pt_regs *ctx, u32 slot)
{
    u32 tid = bpf_get_current_pid_tgid(), one = 1;
    int w = watched(ctx);
    u32 *d;

    if (w != 1) {
        if (w)
            bump(IRQ + slot);
        return 0;
    }
    bump(slot);
    d = depth.lookup(&tid);
    if (d) {
        if (*d == 0)
            bump(OUTER);
        *d += 1;
    } else {
        bump(OUTER);
        depth.update(&tid, &one);
    }
    return 0;
}

static __always_inline int alloc_leave(struct pt_regs *ctx)
{
    u32 tid = bpf_get_current_pid_tgid();
    u32 *d;

    if (!on_task_stack(ctx))
        return 0;
    d = depth.lookup(&tid);
    if (d && *d)
        *d -= 1;
    return 0;
}

int write_enter(struct pt_regs *ctx)
{
    u32 tid = bpf_get_current_pid_tgid(), one = 1;

    in_write.update(&tid, &one);
    return 0;
}

int write_leave(struct pt_regs *ctx)
{
    u32 tid = bpf_get_current_pid_tgid();

    in_write.delete(&tid);
    return 0;
}

int alloc_ret(struct pt_regs *ctx)
{
    return alloc_leave(ctx);
}
"""


def handlers() -> str:
    """One entry handler per function, so each has its own counter slot."""
    out = []
    for slot, name in enumerate(FUNCS):
        body = f"alloc_enter(ctx, {slot})" if name in KMALLOC_FUNCS else f"hit(ctx, {slot})"
        out.append(f"int enter_{slot}(struct pt_regs *ctx) {{ return {body}; }}")
    return "\n".join(out)


def kallsyms() -> set[str]:
    names = set()
    for line in Path("/proc/kallsyms").read_text().splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[1] in "tTwW":
            names.add(parts[2])
    return names


class Probes:
    """Entry counts of the counted functions, for one watched pid or for run."""

    def __init__(self) -> None:
        from bcc import BPF

        symbols = kallsyms()
        self.present = [name for name in FUNCS if name in symbols]
        slots = [f"-DIRQ={IRQ}", f"-DOUTER={OUTER}", f"-DNSLOTS={OUTER + 1}"]
        self.bpf = BPF(text=BPF_PROGRAM + handlers(), cflags=slots)
        for slot, name in enumerate(FUNCS):
            if name not in self.present:
                continue
            self.bpf.attach_kprobe(event=name, fn_name=f"enter_{slot}")
            if name in KMALLOC_FUNCS:
                self.bpf.attach_kretprobe(event=name, fn_name="alloc_ret", maxactive=64)
        self.bpf.attach_kprobe(event=WRITE_HANDLER, fn_name="write_enter")
        self.bpf.attach_kretprobe(event=WRITE_HANDLER, fn_name="write_leave", maxactive=64)

    def close(self) -> None:
        self.bpf.cleanup()

    def _target(self, tgid: int) -> None:
        import ctypes

        self.bpf["target"][ctypes.c_int(0)] = ctypes.c_uint32(tgid)

    def _clear(self) -> None:
        self.bpf["counts"].clear()
        self.bpf["depth"].clear()

    def watch(self, tgid: int) -> None:
        """Counts the calls of one process (or kernel thread) from now on."""
        self._clear()
        self._target(tgid)

    def watch_writes(self) -> None:
        """Counts the calls made inside the module's write() from now on."""
        self._target(0)
        self._clear()

    def counts(self) -> dict[str, int]:
        """Calls in the task's context, by function, and kmalloc_outer."""
        table = self.bpf["counts"]
        out = {name: table[table.Key(slot)].value for slot, name in enumerate(FUNCS)}
        out["kmalloc_outer"] = table[table.Key(OUTER)].value
        return out

    def interrupt_counts(self) -> dict[str, int]:
        """Calls made by interrupts on top of the task, by function; not its own."""
        table = self.bpf["counts"]
        got = {name: table[table.Key(IRQ + slot)].value for slot, name in enumerate(FUNCS)}
        return {name: n for name, n in got.items() if n}


@pytest.fixture(scope="module")
def probes(workload):
    # The module must be loaded (by the workload fixture) for tw_write to exist.
    p = Probes()
    try:
        yield p
    finally:
        p.close()


@pytest.fixture(scope="module")
def fd(workload):
    """An fd of our own for run: its held blocks are ours to account."""
    with Workload() as w:
        yield w


def runtime_kmalloc_entry(present: list[str]) -> str:
    (name,) = [n for n in ("__kmalloc", "__kmalloc_noprof") if n in present]
    return name


def runtime_kmalloc_calls(ops: str) -> int:
    """kmalloc/kzalloc/kmalloc_fail calls: all go through __kmalloc(_noprof)."""
    total = 0
    for token in ops.split():
        name, count = token.split(":")[:2]
        if name in ("kmalloc", "kzalloc", "kmalloc_fail"):
            total += int(count)
    return total


def check_counts(probes: Probes, ops: str, tally: Tally, label: str) -> dict[str, int]:
    got = probes.counts()
    for func, field in OTHER_FUNCS.items():
        assert got[func] == getattr(tally, field), f"{label}: {func}: {got}"
    assert got["kmalloc_outer"] == tally.kmalloc, f"{label}: outermost kmalloc calls: {got}"
    entry = runtime_kmalloc_entry(probes.present)
    assert got[entry] == runtime_kmalloc_calls(ops), f"{label}: {entry}: {got}"
    hits = {k: v for k, v in got.items() if v and k in KMALLOC_FUNCS}
    print(f"{label}: {ops!r}: kmalloc entry points {hits}; in interrupts on top: {probes.interrupt_counts()}")
    return got


# Every op, alone (so each shows which entry point it reaches) and mixed.
CASES = {
    "kmalloc": "kmalloc:37:100 kfree:all",
    "kmalloc_zero": "kmalloc:5:0 kfree:all",
    "kmalloc_runtime_large": "kmalloc:3:20000 kfree:all",
    "kmalloc_const": "kmalloc_const:11 kfree:all",
    "kmalloc_const_large": "kmalloc_const_large:4 kfree:all",
    "kzalloc": "kzalloc:9:64 kfree:all",
    "kmalloc_node": "kmalloc_node:8:512 kfree:all",
    "kmalloc_node_const": "kmalloc_node_const:6 kfree:all",
    "kmemdup": "kmemdup:7:300 kfree:all",
    "kmalloc_fail": "kmalloc_fail:5",
    "kfree_part": "kmalloc:10:48 kfree:3 kfree:2",
    "kfree_null": "kfree_null:13",
    "schedule": "schedule:21",
    "updown": "updown:19",
    "mutex": "mutex:23",
    "mixed": "kmalloc:11:96 kmalloc_const:2 kzalloc:3:40 kmalloc_node:2:512 kmemdup:1:33 kmalloc:1:16384 "
    "kmalloc_const_large:1 kmalloc_node_const:2 kmalloc_fail:2 kfree:9 kfree_null:2 schedule:6 updown:5 mutex:4",
}


@pytest.mark.parametrize("ops", CASES.values(), ids=CASES.keys())
def test_kthread_job_is_exact(workload, probes, ops):
    pid = workload.spawn(ops)
    try:
        probes.watch(pid)
        workload.start(pid)
        tally = workload.wait(pid, 60000)
        assert tally == expected(ops, kthread=True)
        # Read before stop: the thread's exit frees things of its own.
        check_counts(probes, ops, tally, f"kthread {pid}")
    finally:
        probes.watch_writes()
        workload.stop(pid)


@pytest.mark.parametrize("ops", CASES.values(), ids=CASES.keys())
def test_run_in_process_is_exact(fd, probes, ops):
    probes.watch_writes()
    tally = fd.run(ops)
    assert tally == expected(ops)
    check_counts(probes, ops, tally, "run")
    # What the run left held is freed by free, which counts it too.
    probes.watch_writes()
    freed = fd.free()
    assert freed == Tally(kfree=tally.held, kfree_bytes=tally.kmalloc_bytes - tally.kfree_bytes)
    assert probes.counts()["kfree"] == tally.held


def test_next_run_frees_and_counts_what_the_last_one_left(fd, probes):
    first = fd.run("kmalloc:4:1000 kmalloc:2:24")
    assert first.held == 6
    probes.watch_writes()
    second = fd.run("mutex:1")
    assert second == Tally(kfree=6, kfree_bytes=4048, lock=1, unlock=1)
    assert probes.counts()["kfree"] == 6
    assert fd.free() == Tally()


def test_wait_includes_every_sleep_and_can_be_repeated(workload, probes):
    pid = workload.spawn("updown:2")
    try:
        probes.watch(pid)
        workload.start(pid)
        first = workload.wait(pid, 30000)
        time.sleep(0.5)
        assert workload.wait(pid, 1000) == first
        assert probes.counts()["schedule"] == first.sched == 1
    finally:
        probes.watch_writes()
        workload.stop(pid)


def test_a_large_job_in_a_kernel_thread(workload):
    # 200,000+ operations: cond_resched() keeps the soft-lockup detector quiet.
    ops = "kmalloc:50000:32 kfree:all schedule:20000 updown:50000 mutex:50000 kfree_null:30000"
    pid = workload.spawn(ops)
    try:
        workload.start(pid)
        assert workload.wait(pid, 600000) == expected(ops, kthread=True)
    finally:
        workload.stop(pid)


def test_a_job_stopped_before_start_never_runs(workload):
    pid = workload.spawn("kmalloc:3:10")
    workload.stop(pid)
    with pytest.raises(WorkloadError) as e:
        workload.wait(pid, 100)
    assert e.value.errno == errno.ESRCH


def test_stop_frees_what_the_thread_holds(workload):
    pid = workload.spawn("kmalloc:5:4096 kfree:1")
    try:
        workload.start(pid)
        assert workload.wait(pid).held == 4
    finally:
        workload.stop(pid)
    assert not Path(f"/proc/{pid}").exists()


@pytest.mark.parametrize(
    ("command", "err", "reason"),
    [
        ("dance", errno.EINVAL, "unknown command"),
        ("run", errno.EINVAL, "no ops"),
        ("run kmalloc:1", errno.EINVAL, "needs :size"),
        ("run kmalloc_const:1:5", errno.EINVAL, "takes no size"),
        ("run malloc:1", errno.EINVAL, "unknown op"),
        ("run kfree:1", errno.EINVAL, "only 0 blocks held"),
        ("run kmalloc:2:8 kfree:3", errno.EINVAL, "only 2 blocks held"),
        ("run kmalloc:1:99999999", errno.EINVAL, "size must be"),
        ("run kmalloc:99999999999:1", errno.EINVAL, "count must be"),
        ("run kmalloc:16777216:1 kmalloc:16777216:1", errno.E2BIG, "max_blocks"),
        ("run kmalloc:100:4194304", errno.E2BIG, "bytes"),
        ("start 0", errno.EINVAL, "expected a pid"),
        ("start 1 2", errno.EINVAL, "too many"),
        ("wait 1 soon", errno.EINVAL, "bad timeout"),
        ("stop 4194304", errno.ESRCH, "no job"),
        ("run " + "mutex:1 " * 65, errno.EINVAL, "bytes"),
    ],
)
def test_bad_commands_are_refused_with_a_reason(fd, command, err, reason):
    with pytest.raises(WorkloadError) as e:
        fd.command(command)
    assert e.value.errno == err
    assert e.value.reason.startswith("error: ") and reason in e.value.reason


def test_wait_times_out_and_start_happens_once(workload):
    pid = workload.spawn("updown:1")
    try:
        started = time.monotonic()
        with pytest.raises(WorkloadError) as e:
            workload.wait(pid, 200)
        assert e.value.errno == errno.ETIMEDOUT
        assert 0.15 < time.monotonic() - started < 10
        workload.start(pid)
        with pytest.raises(WorkloadError) as e:
            workload.start(pid)
        assert e.value.errno == errno.EINVAL
        assert workload.wait(pid) == expected("updown:1", kthread=True)
    finally:
        workload.stop(pid)


def test_thread_names_and_read_semantics(workload):
    pid = workload.spawn("mutex:1")
    try:
        assert Path(f"/proc/{pid}/comm").read_text().startswith("tw/")
    finally:
        workload.stop(pid)
    raw = os.open("/dev/tracer_workload", os.O_RDWR)
    try:
        os.write(raw, b"run mutex:2\n")
        line = os.read(raw, 4096)
        assert line.endswith(b"\n") and Tally.parse(line.decode()).lock == 2
        assert os.read(raw, 4096) == b""  # one read() consumes the line...
        assert os.pread(raw, 4096, 0) == line  # ...pread() at 0 returns it again
    finally:
        os.close(raw)
