"""An independent BCC probe that sees every call one process makes of the
entry-counted functions, with the kernel stack of each, so a test can tell
the workload module's calls from other kernel work done in that process.

Like the exporter, it counts only what runs on the task's own stack (not
interrupts). It shares no code with the exporter.
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
	int stack;
};
BPF_STACK_TRACE(stacks, 16384);
BPF_HASH(calls, struct key_t, u64, 16384);

static int hit(struct pt_regs *ctx, u32 fn)
{
	struct task_struct *task;
	struct key_t key = {};
	u64 base, sp = PT_REGS_SP(ctx);

	if ((bpf_get_current_pid_tgid() >> 32) != TGID)
		return 0;
	task = (struct task_struct *)bpf_get_current_task();
	base = (u64)task->stack;
	if (sp < base || sp >= base + THREAD_SIZE)
		return 0;
	key.fn = fn;
	key.stack = stacks.get_stackid(ctx, 0);
	calls.increment(key);
	return 0;
}
"""


class Witness:
    """Attach before the work, `read` after it: (calls by the module, other calls with stacks)."""

    def __init__(self, tgid: int, module_function: str = "tw_work_run") -> None:
        from bcc import BPF

        text = PROGRAM.replace("TGID", str(tgid))
        for i in range(len(FUNCTIONS)):
            text += f"int on_{i}(struct pt_regs *ctx) {{ return hit(ctx, {i}); }}\n"
        self._bpf = BPF(text=text)
        for i, fn in enumerate(FUNCTIONS):
            self._bpf.attach_kprobe(event=fn, fn_name=f"on_{i}")
        self._module_function = module_function

    def read(self) -> tuple[Counter[str], dict[str, Counter[str]]]:
        names = list(FUNCTIONS.values())
        module: Counter[str] = Counter()
        other: dict[str, Counter[str]] = {}
        stacks = self._bpf["stacks"]
        for key, value in self._bpf["calls"].items():
            column = names[key.fn]
            frames = [] if key.stack < 0 else [self._bpf.ksym(a).decode() for a in stacks.walk(key.stack)]
            if self._module_function in frames:
                module[column] += value.value
            else:
                other.setdefault(column, Counter())[" < ".join(frames[:8]) or "(no stack)"] += value.value
        return module, other

    def close(self) -> None:
        self._bpf.cleanup()
