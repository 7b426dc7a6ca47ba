"""An independent BCC probe that sees every call one process makes of the
entry-counted functions, with the kernel stack of each, so a test can tell
the workload module's calls from other kernel work done in that process.

It counts what runs on the task's own stack, and tells interrupt work from
the rest by its frames: an interrupt that arrives while the task runs in user
mode, and the softirqs at its exit, run on the task's stack too, but their
stacks pass through the kernel's interrupt entry or softirq code. It shares
no code with the exporter (which reads the preempt count instead).
"""

from __future__ import annotations

from collections import Counter

# function -> the /tracer column it is counted in
FUNCTIONS = {
    "kfree": "kfree",
    "up": "up",
    "down_interruptible": "down",
    "mutex_lock": "lock",
    "mutex_unlock": "unlock",
}

PROGRAM = r"""
#include <uapi/linux/ptrace.h>
#include <linux/sched.h>
#ifndef THREAD_SIZE
#define THREAD_SIZE (PAGE_SIZE << 2)
#endif

struct key_t {
	u32 fn;
	u32 module;	/* called from the module's code */
	int stack;	/* other callers only; -1 when none or not recorded */
};
BPF_STACK_TRACE(stacks, 16384);
BPF_HASH(calls, struct key_t, u64, 16384);

static int hit(struct pt_regs *ctx, u32 fn)
{
	struct task_struct *task;
	struct key_t key = {};
	u64 base, ret = 0, sp = PT_REGS_SP(ctx);

	if ((bpf_get_current_pid_tgid() >> 32) != TGID)
		return 0;
	task = (struct task_struct *)bpf_get_current_task();
	base = (u64)task->stack;
	if (sp < base || sp >= base + THREAD_SIZE)
		return 0;
	key.fn = fn;
	/* At function entry the stack's top is the return address: the caller. */
	bpf_probe_read_kernel(&ret, sizeof(ret), (void *)sp);
	key.module = ret >= MOD_START && ret < MOD_END;
	key.stack = key.module ? -1 : stacks.get_stackid(ctx, 0);
	calls.increment(key);
	return 0;
}
"""


# Frames of the interrupt entry and softirq code: a stack through any is interrupt work.
INTERRUPT_FRAMES = ("handle_softirqs", "__do_softirq", "do_softirq", "irq_exit_rcu", "__irq_exit_rcu", "irq_exit")
INTERRUPT_PREFIXES = ("asm_sysvec_", "sysvec_", "asm_common_interrupt", "common_interrupt")


def interrupt_work(frames: list[str]) -> bool:
    return any(f in INTERRUPT_FRAMES or f.startswith(INTERRUPT_PREFIXES) for f in frames)


def module_range(name: str) -> tuple[int, int]:
    """[start, end) of a loaded module's memory, from /proc/modules."""
    with open("/proc/modules", encoding="ascii") as f:
        for line in f:
            fields = line.split()
            if fields[0] == name:
                start = int(fields[5], 16)
                return start, start + int(fields[1])
    raise LookupError(f"module {name} is not loaded")


class Witness:
    """Attach before the work, `read` after it: (calls from the module, other calls by stack)."""

    def __init__(self, tgid: int, module: str = "tracer_workload") -> None:
        from bcc import BPF

        start, end = module_range(module)
        text = PROGRAM.replace("TGID", str(tgid)).replace("MOD_START", f"{start}ULL").replace("MOD_END", f"{end}ULL")
        for i in range(len(FUNCTIONS)):
            text += f"int on_{i}(struct pt_regs *ctx) {{ return hit(ctx, {i}); }}\n"
        self._bpf = BPF(text=text)
        self.interrupt: Counter[str] = Counter()  # left out by read(), per column
        for i, fn in enumerate(FUNCTIONS):
            self._bpf.attach_kprobe(event=fn, fn_name=f"on_{i}")

    def read(self) -> tuple[Counter[str], dict[str, Counter[str]]]:
        names = list(FUNCTIONS.values())
        module: Counter[str] = Counter()
        other: dict[str, Counter[str]] = {}
        stacks = self._bpf["stacks"]
        for key, value in self._bpf["calls"].items():
            column = names[key.fn]
            if key.module:
                module[column] += value.value
                continue
            frames = [] if key.stack < 0 else [self._bpf.ksym(a).decode() for a in stacks.walk(key.stack)]
            if interrupt_work(frames):
                self.interrupt[column] += value.value
                continue
            other.setdefault(column, Counter())[" < ".join(frames[:8]) or "(stack not recorded)"] += value.value
        return module, other

    def close(self) -> None:
        self._bpf.cleanup()
