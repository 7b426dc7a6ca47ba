// SPDX-License-Identifier: GPL-2.0
/*
 * tracer_exporter: per-process counts of kmalloc, kfree, schedule, up,
 * down_interruptible, mutex_lock and mutex_unlock, and the bytes that
 * kmalloc handed out and kfree gave back.
 *
 * BCC dialect. Sizes arrive as -D flags so the program is compiled once;
 * the set of tracked processes is a map, never a recompile:
 *   MAX_TRACKED   tracked processes (the limit the control API enforces)
 *   MAX_ALLOCS    live allocations of tracked processes we remember
 *   MAX_INFLIGHT  threads of tracked processes with a kmalloc record
 *   FILTER_SLOTS  slots of each counting filter (a power of two)
 *   MAX_GROUPS    workload groups of the config's select (ids 1..MAX_GROUPS)
 *   MAX_CGROUPS   cgroups (selected ones and their descendants) remembered
 *   TASK_BTF      bpf_get_current_task_btf() is there (5.11+ with BTF)
 *   TASK_OFFSETS  task field offsets from the kernel's BTF, no sched headers
 *   PER_CPU_OFFSETS, PREEMPT_COUNT_VAR[, PREEMPT_COUNT_IN_PCPU_HOT]
 *                 where this CPU's preempt count is (see task_context)
 *   VMALLOC_BASE  the address of vmalloc_base (see is_vmalloc)
 *   FENTRY_PROBES the fentry/fexit mode's attach points (see the end);
 *                 unset, the kprobe handlers are attached by user space
 *
 * Both modes share every counting function below: a handler only turns its
 * context into a stack address and arguments.
 */
#include <uapi/linux/ptrace.h>
#ifdef TASK_OFFSETS
/*
 * The kernel's BTF gave user space the offsets of the few task fields read
 * here (TASK_STACK_OFF, TASK_TGID_OFF, TASK_SIGNAL_OFF, SIGNAL_LIVE_OFF):
 * the sched headers would be most of the compile. The preempt count's
 * layout comes from the kernel's own header: 7.x moved its hardirq bits.
 */
#include <uapi/asm-generic/errno-base.h>
#include <linux/preempt.h>
#ifndef TASK_COMM_LEN
#define TASK_COMM_LEN	16
#endif
#ifndef THREAD_SIZE
#define THREAD_SIZE	16384	/* x86-64 without KASAN */
#endif

static __always_inline u64 task_read(u64 task, u64 offset, u32 size)
{
	u64 val = 0;

	bpf_probe_read_kernel(&val, size, (void *)(task + offset));
	return val;
}
#else
#include <linux/sched.h>
#include <linux/sched/signal.h>
#endif
#include "tracer.h"

/*
 * A tracked thread's kmalloc between entry and return: what was asked, and
 * where the stack was. The record stays after the return, inactive, and is
 * rewritten in place at the thread's next kmalloc: a hash update and delete
 * per call cost more than the rest of the tracked path.
 */
struct inflight {
	u64 size;
	u64 sp;
	u64 ip;		/* the entry point, to tell a tail call from a lost return */
	u64 active;	/* between entry and return */
};

#ifndef THREAD_SIZE
#define THREAD_SIZE (PAGE_SIZE << 2)
#endif

/* ZERO_SIZE_PTR and NULL: kmalloc answered without memory. */
#define ZERO_OR_NULL(addr) ((addr) <= 16)

/*
 * kvmalloc's vmalloc fallback: its address is in the vmalloc area, which
 * starts (at the address in the kernel's vmalloc_base, randomized) above
 * the direct map that every kmalloc address is in.
 */
static __always_inline bool is_vmalloc(u64 addr)
{
#ifdef VMALLOC_BASE
	u64 start = 0;

	return !bpf_probe_read_kernel(&start, sizeof(start), (void *)VMALLOC_BASE) &&
	       start && addr >= start;
#else
	return false;
#endif
}

/* Key: tgid, the user-space pid. Sized by the tracked-process limit. */
BPF_HASH(tracked, u32, struct counters, MAX_TRACKED);
/* Key: address. Bounded; a full map is counted, never fatal. */
BPF_HASH(allocs, u64, u64, MAX_ALLOCS);
/* Key: pid_tgid, so each thread pairs its own entry and return. */
BPF_HASH(inflight, u64, struct inflight, MAX_INFLIGHT);
/*
 * Records in inflight. Over half full, a return deletes its record instead
 * of keeping it, so a process with more threads than that still counts
 * exactly, at the old price.
 */
BPF_ARRAY(inflight_records, s64, 1);
/* Final counters of TRACK_KEEP processes, until `run` reads them. */
BPF_HASH(exited, u32, struct counters, MAX_TRACKED);
/* Children not tracked because the map was full, per parent tgid. */
BPF_HASH(follow_dropped, u32, u64, 1024);
/* Tells user space the first time a parent loses a child to the limit. */
BPF_PERF_OUTPUT(follow_drop_events);
/* Per-CPU so hot paths never contend; user space sums the CPUs. */
BPF_PERCPU_ARRAY(stats, s64, STAT_COUNT);

/*
 * Workload groups. A selector map's value is the flags word a new member
 * starts with (its group id above GROUP_SHIFT). Members are enrolled at
 * events (exec, fork, cgroup attach), never by a check on a probe hit.
 */
struct comm_key {
	char comm[TASK_COMM_LEN];
};

struct exe_key {
	char path[EXE_LEN];
};

BPF_HASH(comm_groups, struct comm_key, u32, MAX_GROUPS);
BPF_HASH(exe_groups, struct exe_key, u32, MAX_GROUPS);
/* Selected cgroups and their descendants: by id, and by the hash of their path. */
BPF_HASH(cgroup_ids, u64, u32, MAX_CGROUPS);
BPF_HASH(cgroup_paths, u64, u32, MAX_CGROUPS);
/*
 * What members that left (exited, moved out, exec'd away) counted, so a
 * group's totals never go backwards. Index: group id.
 */
BPF_ARRAY(group_totals, struct counters, MAX_GROUPS + 1);
/* Processes that matched but were not tracked for the limit, per group. */
BPF_ARRAY(group_dropped, u64, MAX_GROUPS + 1);
/* settings[0]: nonzero while a cmdline selector wants to hear of every exec. */
BPF_ARRAY(settings, u32, 1);
/* The tgid of each exec, for user space's cmdline selectors. */
BPF_PERF_OUTPUT(exec_events);
/* A string too big for the BPF stack: one per CPU. */
BPF_PERCPU_ARRAY(scratch, struct exe_key, 1);

/*
 * Counting filters in front of the hash maps that every process on the host
 * would otherwise look up on every probe hit. A slot counts the map's keys
 * that fall in it, so an empty slot proves a key absent with one array load
 * the verifier inlines, where a hash-map miss hashes the key and walks a
 * bucket. A slot is raised before its key goes in and lowered after it comes
 * out, so it is never low while the key is present.
 *
 * A tracked slot has two halves: these programs add to theirs atomically,
 * and user space, which cannot, writes its own through mmap (one writer,
 * under a lock). Either side may remove the other's keys, so a half can go
 * negative; the sum is what counts. One slot holds both, so the check is
 * one lookup.
 */
#ifndef BPF_F_MMAPABLE
#define BPF_F_MMAPABLE (1U << 10)
#endif
BPF_F_TABLE("array", int, struct tracked_slot, tracked_slots, FILTER_SLOTS, BPF_F_MMAPABLE);
BPF_ARRAY(alloc_slots, s64, FILTER_SLOTS);

static __always_inline void stat_add(int idx, s64 delta)
{
	s64 *v = stats.lookup(&idx);

	if (v)
		*v += delta;
}

static __always_inline void inflight_records_add(s64 delta)
{
	int zero = 0;
	s64 *v = inflight_records.lookup(&zero);

	if (v)
		__sync_fetch_and_add(v, delta);
}

static __always_inline bool inflight_crowded(void)
{
	int zero = 0;
	s64 *v = inflight_records.lookup(&zero);

	return v && *v > MAX_INFLIGHT / 2;
}

static __always_inline u32 tgid_slot(u32 tgid)
{
	return tgid & (FILTER_SLOTS - 1);
}

/* Slab objects sit at multiples of their size: mix the bits before masking. */
static __always_inline u32 addr_slot(u64 addr)
{
	return ((addr >> 3) * 0x9E3779B97F4A7C15ULL >> 32) & (FILTER_SLOTS - 1);
}

static __always_inline bool maybe_tracked(u32 tgid)
{
	int slot = tgid_slot(tgid);
	struct tracked_slot *s = tracked_slots.lookup(&slot);

	return s && s->kern + s->user != 0;
}

static __always_inline void tracked_slot_add(u32 tgid, s32 delta)
{
	int slot = tgid_slot(tgid);
	struct tracked_slot *s = tracked_slots.lookup(&slot);

	if (s)
		__sync_fetch_and_add(&s->kern, delta);
}

static __always_inline bool maybe_alloc(u64 addr)
{
	u32 slot = addr_slot(addr);
	s64 *v = alloc_slots.lookup(&slot);

	return v && *v != 0;
}

static __always_inline void alloc_slot_add(u64 addr, s64 delta)
{
	u32 slot = addr_slot(addr);
	s64 *v = alloc_slots.lookup(&slot);

	if (v)
		__sync_fetch_and_add(v, delta);
}

/*
 * Interrupts and softirqs from kernel mode run on their own stacks and
 * borrow whatever task is current: their work is not the task's. A probe
 * hit counts only when the probed function runs on the current task's own
 * stack.
 *
 * @sp is a stack address of the probed call: the stack pointer a kprobe
 * saw, or, under a trampoline, its frame (the context it passes lives
 * there), which is just below the probed function's own.
 */
static __always_inline bool on_task_stack(u64 sp)
{
#ifdef TASK_OFFSETS
	u64 base = task_read(bpf_get_current_task(), TASK_STACK_OFF, sizeof(base));
#else
#ifdef TASK_BTF
	/* A BTF pointer (5.11+): a plain load, not a bpf_probe_read call. */
	struct task_struct *task = (struct task_struct *)bpf_get_current_task_btf();
#else
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();
#endif
	u64 base = (u64)task->stack;
#endif

	return sp >= base && sp < base + THREAD_SIZE;
}

#ifdef PREEMPT_COUNT_VAR
#if defined(PREEMPT_COUNT_IN_PCPU_HOT) && !defined(TASK_OFFSETS)
/* With TASK_OFFSETS, user space added the field's offset from BTF. */
#include <asm/current.h>
#define PREEMPT_COUNT_ADDR (PREEMPT_COUNT_VAR + offsetof(struct pcpu_hot, preempt_count))
#else
#define PREEMPT_COUNT_ADDR PREEMPT_COUNT_VAR
#endif
/* What ftrace flags as hardirq and softirq context; bh-disabled code is the task's. */
#define IRQ_CONTEXT (HARDIRQ_MASK | SOFTIRQ_OFFSET)

/*
 * An interrupt that arrives in user mode runs on the task's own stack on
 * x86-64, and so do the softirqs at its exit: only the preempt count tells
 * that work from the task's. It is per-CPU; user space found this CPU's
 * copy's offset (PREEMPT_COUNT_VAR) and the per-CPU bases (PER_CPU_OFFSETS)
 * in /proc/kallsyms. It replaces the stack check, which it covers.
 */
static __always_inline bool task_context(u64 sp)
{
	u64 cpu = bpf_get_smp_processor_id();
	u64 base = 0;
	u32 count = 0;

	if (bpf_probe_read_kernel(&base, sizeof(base), (void *)(PER_CPU_OFFSETS + cpu * sizeof(base))) ||
	    bpf_probe_read_kernel(&count, sizeof(count), (void *)(PREEMPT_COUNT_ADDR + base)))
		return on_task_stack(sp);
	/*
	 * A kprobe that is a breakpoint (not on ftrace, not optimized) runs
	 * inside the int3 handler, which enters NMI context itself. No probed
	 * function may be called from a real NMI, so NMI bits are always that:
	 * take the handler's own NMI entry off before looking.
	 */
	if (count & NMI_MASK)
		count -= NMI_OFFSET + HARDIRQ_OFFSET;
	return !(count & IRQ_CONTEXT);
}
#else
/* No preempt count to read: the stack check alone. */
static __always_inline bool task_context(u64 sp)
{
	return on_task_stack(sp);
}
#endif

static __always_inline struct counters *current_counters(u64 sp)
{
	/* tgid is the user-space pid: all threads share one row. */
	u32 tgid = bpf_get_current_pid_tgid() >> 32;
	struct counters *c;

	if (!maybe_tracked(tgid))
		return NULL;
	c = tracked.lookup(&tgid);
	if (c && !task_context(sp))
		return NULL;
	return c;
}

/*
 * kmalloc entry points nest: __kmalloc calls kmalloc_order_trace (5.x) and
 * __kmalloc_noprof calls __kmalloc_large_node_noprof (6.11+). Only the
 * outermost call counts. A nested call enters with a lower stack pointer
 * than the call in flight, so it is ignored; an entry at the same or a
 * higher stack pointer replaces a stale record whose return was missed.
 */
static __always_inline int kmalloc_enter(u64 sp, u64 size, u64 ip)
{
	u64 id = bpf_get_current_pid_tgid();
	u32 tgid = id >> 32;
	struct inflight rec = {};
	struct inflight *cur;

	if (!maybe_tracked(tgid) || !tracked.lookup(&tgid) || !task_context(sp))
		return 0;
	cur = inflight.lookup(&id);
	if (cur && cur->active && cur->sp > sp)
		return 0;
	/*
	 * A record from a shallower depth, or from this depth and this entry
	 * point, is a call whose return never came: counted, so a tracked
	 * thread's lost return is always seen. This depth and another entry
	 * point is a tail call (5.x __kmalloc jumps to kmalloc_order_trace),
	 * whose one return ends both.
	 */
	if (cur && cur->active && (cur->sp < sp || cur->ip == ip))
		stat_add(STAT_RETURNS_LOST, 1);
	/* Only this thread writes its record: no lock needed. */
	if (cur) {
		cur->size = size;
		cur->sp = sp;
		cur->ip = ip;
		cur->active = 1;
		return 0;
	}
	rec.size = size;
	rec.sp = sp;
	rec.ip = ip;
	rec.active = 1;
	if (inflight.insert(&id, &rec))
		stat_add(STAT_INFLIGHT_INSERT_FAILURES, 1);
	else
		inflight_records_add(1);
	return 0;
}

int kmalloc_enter_arg1(struct pt_regs *ctx)
{
	return kmalloc_enter(PT_REGS_SP(ctx), PT_REGS_PARM1(ctx), PT_REGS_IP(ctx));
}

int kmalloc_enter_arg3(struct pt_regs *ctx)
{
	return kmalloc_enter(PT_REGS_SP(ctx), PT_REGS_PARM3(ctx), PT_REGS_IP(ctx));
}

int kmalloc_enter_arg4(struct pt_regs *ctx)
{
	return kmalloc_enter(PT_REGS_SP(ctx), PT_REGS_PARM4(ctx), PT_REGS_IP(ctx));
}

static __always_inline void remember_alloc(u64 addr, u64 size)
{
	int err;

	alloc_slot_add(addr, 1);
	err = allocs.insert(&addr, &size);
	if (!err) {
		stat_add(STAT_ALLOC_ENTRIES, 1);
		return;
	}
	/* The key was already counted, or did not go in. */
	alloc_slot_add(addr, -1);
	/* Already known: it was freed by a path we do not see. */
	if (err == -EEXIST && !allocs.update(&addr, &size))
		return;
	stat_add(STAT_ALLOC_INSERT_FAILURES, 1);
}

/*
 * A return inside the recorded call is a nested one's, and is ignored. A
 * kretprobe (@ret_probe) returns above its entry's stack pointer, so a
 * nested call returns at or below the outer call's entry. A trampoline's
 * frame is the same at entry and exit, so a nested call's is below it.
 */
static __always_inline int kmalloc_exit(u64 sp, u64 addr, bool ret_probe)
{
	u64 id = bpf_get_current_pid_tgid();
	u32 tgid = id >> 32;
	struct inflight *rec;
	struct counters *c;
	u64 size;

	/* Only tracked threads have records. */
	if (!maybe_tracked(tgid))
		return 0;
	rec = inflight.lookup(&id);
	if (!rec || !rec->active || !task_context(sp))
		return 0;
	if (ret_probe ? sp <= rec->sp : sp < rec->sp)
		return 0;
	size = rec->size;
	if (!inflight_crowded())
		rec->active = 0;
	else if (!inflight.delete(&id))
		inflight_records_add(-1);
	c = tracked.lookup(&tgid);
	if (!c)
		return 0;
	__sync_fetch_and_add(&c->kmalloc_calls, 1);
	/* A vmalloc fallback: the kmalloc attempt failed. */
	if (ZERO_OR_NULL(addr) || is_vmalloc(addr))
		return 0;
	__sync_fetch_and_add(&c->kmalloc_bytes, size);
	remember_alloc(addr, size);
	return 0;
}

int kmalloc_return(struct pt_regs *ctx)
{
	return kmalloc_exit(PT_REGS_SP(ctx), PT_REGS_RC(ctx), true);
}

static __always_inline int kfree_hit(u64 sp, u64 addr)
{
	struct counters *c = current_counters(sp);
	u64 *size;

	if (c)
		__sync_fetch_and_add(&c->kfree_calls, 1);
	/* Any process's kfree retires the address, so no entry goes stale. */
	if (ZERO_OR_NULL(addr) || !maybe_alloc(addr))
		return 0;
	size = allocs.lookup(&addr);
	if (!size)
		return 0;
	if (c)
		__sync_fetch_and_add(&c->kfree_bytes, *size);
	if (!allocs.delete(&addr)) {
		alloc_slot_add(addr, -1);
		stat_add(STAT_ALLOC_ENTRIES, -1);
	}
	return 0;
}

int kfree_enter(struct pt_regs *ctx)
{
	return kfree_hit(PT_REGS_SP(ctx), PT_REGS_PARM1(ctx));
}

/* Entry probes only: a task sleeping in schedule() would pin a kretprobe. */
#define COUNT_CALLS(name, field)				\
static __always_inline int name##_hit(u64 sp)			\
{								\
	struct counters *c = current_counters(sp);		\
								\
	if (c)							\
		__sync_fetch_and_add(&c->field, 1);		\
	return 0;						\
}

COUNT_CALLS(schedule_enter, schedule_calls)
COUNT_CALLS(up_enter, up_calls)
COUNT_CALLS(down_interruptible_enter, down_calls)
COUNT_CALLS(mutex_lock_enter, lock_calls)
COUNT_CALLS(mutex_unlock_enter, unlock_calls)

/*
 * The kprobe programs, each at the start of its own macro: bcc 0.18 does not
 * find a program defined after another function in the same macro.
 */
#define KPROBE_CALLS(name)					\
int name(struct pt_regs *ctx)					\
{								\
	return name##_hit(PT_REGS_SP(ctx));			\
}

KPROBE_CALLS(schedule_enter)
KPROBE_CALLS(up_enter)
KPROBE_CALLS(down_interruptible_enter)
KPROBE_CALLS(mutex_lock_enter)
KPROBE_CALLS(mutex_unlock_enter)

/* Threads of the current one's group that have not exited yet. */
static __always_inline bool group_live(void)
{
#ifdef TASK_OFFSETS
	u64 signal = task_read(bpf_get_current_task(), TASK_SIGNAL_OFF, sizeof(signal));

	return task_read(signal, SIGNAL_LIVE_OFF, sizeof(int)) != 0;
#else
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();

	return task->signal->live.counter != 0;
#endif
}

static __always_inline u32 group_of(u32 flags)
{
	return flags >> GROUP_SHIFT;
}

static __always_inline void group_drop(u32 flags)
{
	u32 group = group_of(flags);
	u64 *n = group_dropped.lookup(&group);

	if (group && n)
		__sync_fetch_and_add(n, 1);
}

/* A member's counts go to its group's totals when it stops being counted. */
static __always_inline void fold(const struct counters *c)
{
	u32 group = group_of(c->flags);
	struct counters *t;

	if (!group)
		return;
	t = group_totals.lookup(&group);
	if (!t)
		return;
	__sync_fetch_and_add(&t->kmalloc_calls, c->kmalloc_calls);
	__sync_fetch_and_add(&t->kmalloc_bytes, c->kmalloc_bytes);
	__sync_fetch_and_add(&t->kfree_calls, c->kfree_calls);
	__sync_fetch_and_add(&t->kfree_bytes, c->kfree_bytes);
	__sync_fetch_and_add(&t->schedule_calls, c->schedule_calls);
	__sync_fetch_and_add(&t->up_calls, c->up_calls);
	__sync_fetch_and_add(&t->down_calls, c->down_calls);
	__sync_fetch_and_add(&t->lock_calls, c->lock_calls);
	__sync_fetch_and_add(&t->unlock_calls, c->unlock_calls);
}

/*
 * Deleted before folded: a scrape in between sees the group short, never
 * counted twice, and user space keeps a group's totals from going back.
 */
static __always_inline void untrack(u32 tgid, struct counters *c)
{
	struct counters last = *c;

	if (!tracked.delete(&tgid)) {
		tracked_slot_add(tgid, -1);
		fold(&last);
	}
}

/*
 * A new member with these flags; the limit counts against its group. @comm
 * is its name where it is not the current task (NULL: it is).
 */
static __always_inline void join(u32 tgid, u32 flags, const void *comm)
{
	struct counters c = {};

	c.flags = flags;
	if (comm)
		bpf_probe_read_kernel_str(&c.comm, sizeof(c.comm), comm);
	else
		bpf_get_current_comm(&c.comm, sizeof(c.comm));
	tracked_slot_add(tgid, 1);
	if (tracked.insert(&tgid, &c)) {
		tracked_slot_add(tgid, -1);
		group_drop(flags);
	}
}

/*
 * A member that joined by a selector and no longer matches it leaves, and
 * joins the one it matches now (0: none). A process tracked any other way
 * (by pid, by following a fork) stays as it is.
 */
static __always_inline void rematch(u32 tgid, u32 want, u32 by, const void *comm)
{
	struct counters *c = maybe_tracked(tgid) ? tracked.lookup(&tgid) : NULL;

	if (!c) {
		if (want)
			join(tgid, want, comm);
		return;
	}
	if (!(c->flags & by) || group_of(c->flags) == group_of(want))
		return;
	untrack(tgid, c);
	if (want)
		join(tgid, want, comm);
}

/*
 * Fires once per exiting thread. signal->live reaches zero only when the
 * last thread of the group has gone, so one thread's exit keeps the row.
 */
TRACEPOINT_PROBE(sched, sched_process_exit)
{
	u64 id = bpf_get_current_pid_tgid();
	u32 tgid = id >> 32;
	struct inflight *rec = inflight.lookup(&id);
	struct counters *c;
	bool lost = false;

	/* Every thread's, as a process no longer tracked may have left one. */
	if (rec) {
		/* No thread exits inside kmalloc: an active record is a lost return. */
		lost = rec->active;
		if (!inflight.delete(&id))
			inflight_records_add(-1);
	}
	if (!maybe_tracked(tgid))
		return 0;
	c = tracked.lookup(&tgid);
	if (!c)
		return 0;
	if (lost)
		stat_add(STAT_RETURNS_LOST, 1);
	if (group_live())
		return 0;
	if (c->flags & TRACK_KEEP) {
		bpf_get_current_comm(&c->comm, sizeof(c->comm));
		if (exited.update(&tgid, c))
			stat_add(STAT_EXITED_INSERT_FAILURES, 1);
	}
	untrack(tgid, c);
	return 0;
}

static __always_inline void follow_drop(struct bpf_raw_tracepoint_args *ctx, u32 parent)
{
	u64 one = 1;
	u64 *n;

	stat_add(STAT_FOLLOW_DROPPED, 1);
	n = follow_dropped.lookup(&parent);
	if (n) {
		__sync_fetch_and_add(n, 1);
		return;
	}
	/* Only the first drop per parent wakes user space: a fork bomb cannot flood it. */
	if (!follow_dropped.insert(&parent, &one))
		follow_drop_events.perf_submit(ctx, &parent, sizeof(parent));
}

/*
 * A followed process's new children are tracked from their creation, here
 * in the kernel, so nothing they do is missed while user space catches up.
 * fork runs in the parent. A raw tracepoint, because only the child's
 * task_struct tells a new process from a new thread, which joins its
 * process's row by itself.
 */
RAW_TRACEPOINT_PROBE(sched_process_fork)
{
	u64 task = ctx->args[1];
	u32 parent = bpf_get_current_pid_tgid() >> 32;
	struct counters *pc;
	struct counters child = {};
	u32 tgid = 0;

	if (!maybe_tracked(parent))
		return 0;
	pc = tracked.lookup(&parent);
	if (!pc || !(pc->flags & TRACK_FOLLOW))
		return 0;
#ifdef TASK_OFFSETS
	tgid = task_read(task, TASK_TGID_OFF, sizeof(tgid));
#else
	bpf_probe_read_kernel(&tgid, sizeof(tgid), &((struct task_struct *)task)->tgid);
#endif
	if (tgid == parent)
		return 0;
	child.parent = parent;
	/* A child stays in its parent's group through its own execs. */
	child.flags = pc->flags & ~TRACK_BY_EXEC;
	bpf_get_current_comm(&child.comm, sizeof(child.comm));
	tracked_slot_add(tgid, 1);
	if (tracked.insert(&tgid, &child)) {
		tracked_slot_add(tgid, -1);
		group_drop(child.flags);
		follow_drop(ctx, parent);
	}
	return 0;
}

/*
 * exec: the comm and exe selectors match the new image here, in the kernel,
 * so its first calls count. A process spawned straight into a cgroup
 * (clone3's CLONE_INTO_CGROUP, as systemd starts services) is found here
 * too: there is no cgroup attach for it.
 */
static __always_inline u32 exec_match(const void *filename)
{
	struct comm_key comm = {};
	struct exe_key *exe;
	u64 cgroup = bpf_get_current_cgroup_id();
	int zero = 0;
	u32 *want;

	bpf_get_current_comm(&comm.comm, sizeof(comm.comm));
	want = comm_groups.lookup(&comm);
	if (want)
		return *want;
	exe = scratch.lookup(&zero);
	if (exe) {
		__builtin_memset(exe, 0, sizeof(*exe));
		bpf_probe_read_kernel_str(exe->path, sizeof(exe->path), filename);
		want = exe_groups.lookup(exe);
		if (want)
			return *want;
	}
	want = cgroup_ids.lookup(&cgroup);
	return want ? *want : 0;
}

TRACEPOINT_PROBE(sched, sched_process_exec)
{
	u32 tgid = bpf_get_current_pid_tgid() >> 32;
	/* A __data_loc field: its offset from the record is the low 16 bits. */
	u32 want = exec_match((void *)args + (args->data_loc_filename & 0xFFFF));
	int zero = 0;
	u32 *cmdline = settings.lookup(&zero);

	rematch(tgid, want, TRACK_BY_EXEC, NULL);
	/* The cmdline selectors are user space's: it reads /proc/<tgid>/cmdline. */
	if (!want && cmdline && *cmdline)
		exec_events.perf_submit(args, &tgid, sizeof(tgid));
	return 0;
}

/*
 * A process moved into or out of a selected cgroup (cgroup v2) joins or
 * leaves its group. The event carries the thread group's leader: its pid
 * is the process's. The current task is the one that moved it.
 */
TRACEPOINT_PROBE(cgroup, cgroup_attach_task)
{
	u64 id = args->dst_id;
	u32 *want = cgroup_ids.lookup(&id);

	rematch(args->pid, want ? *want : 0, TRACK_BY_CGROUP,
		(void *)args + (args->data_loc_comm & 0xFFFF));
	return 0;
}

/*
 * The hash of an event's cgroup path (a __data_loc string), and its parent's
 * (the path up to its last '/'); 0 when it cannot be read.
 */
static __always_inline u64 path_hash(const void *args, u32 data_loc, u64 *parent)
{
	int zero = 0;
	struct exe_key *buf = scratch.lookup(&zero);
	u64 h = FNV_BASIS;

	*parent = 0;
	if (!buf)
		return 0;
	__builtin_memset(buf, 0, sizeof(*buf));
	bpf_probe_read_kernel_str(buf->path, sizeof(buf->path), args + (data_loc & 0xFFFF));
	for (int i = 0; i < CGROUP_PATH_LEN; i++) {
		char ch = buf->path[i];

		if (!ch)
			break;
		if (ch == '/')
			*parent = h;
		h = (h ^ (u8)ch) * FNV_PRIME;
	}
	return h;
}

/*
 * A new cgroup in a selected subtree, or a selected cgroup created again
 * (systemd does that at every restart of a unit): remember its id before
 * any process can enter it.
 */
TRACEPOINT_PROBE(cgroup, cgroup_mkdir)
{
	u64 id = args->id;
	u64 parent;
	u64 h = path_hash(args, args->data_loc_path, &parent);
	u32 *want = cgroup_paths.lookup(&h);
	u32 flags;

	if (want) {
		/* A selected cgroup itself, created again. */
		flags = *want & ~CGROUP_SELECTED;
		if (cgroup_ids.update(&id, &flags))
			stat_add(STAT_CGROUP_INSERT_FAILURES, 1);
		return 0;
	}
	want = cgroup_paths.lookup(&parent);
	if (!want)
		return 0;
	flags = *want & ~CGROUP_SELECTED;
	if (cgroup_ids.update(&id, &flags) || cgroup_paths.update(&h, &flags))
		stat_add(STAT_CGROUP_INSERT_FAILURES, 1);
	return 0;
}

TRACEPOINT_PROBE(cgroup, cgroup_rmdir)
{
	u64 id = args->id;
	u64 parent, h;
	u32 *v;

	if (cgroup_ids.delete(&id))
		return 0;
	h = path_hash(args, args->data_loc_path, &parent);
	/* A selector's own path stays, for when the cgroup comes back. */
	v = cgroup_paths.lookup(&h);
	if (v && !(*v & CGROUP_SELECTED))
		cgroup_paths.delete(&h);
	return 0;
}

#ifdef FENTRY_PROBES
/*
 * The fentry/fexit mode: BPF trampolines instead of kprobes. One program
 * attaches to one function, so user space lists the attach points of this
 * kernel in FENTRY_PROBES, e.g.
 *   -DFENTRY_PROBES='KMALLOC(__kmalloc, 1) KFREE(kfree) CALLS(up, up_enter)'
 * and each item below expands to the programs BCC attaches at load. The
 * context is the trampoline's frame on the current stack: its address
 * stands in for the stack pointer. Arguments and the return value come
 * from helpers, so no function's prototype is written down here.
 */
#define KMALLOC(sym, size_arg)						\
KFUNC_PROBE(sym)							\
{									\
	u64 size = 0;							\
									\
	bpf_get_func_arg(ctx, (size_arg) - 1, &size);			\
	return kmalloc_enter((u64)ctx, size,				\
			     bpf_get_func_ip(ctx));			\
}									\
									\
KRETFUNC_PROBE(sym)							\
{									\
	u64 addr = 0;							\
									\
	bpf_get_func_ret(ctx, &addr);					\
	return kmalloc_exit((u64)ctx, addr, false);			\
}

#define KFREE(sym)							\
KFUNC_PROBE(sym)							\
{									\
	u64 addr = 0;							\
									\
	bpf_get_func_arg(ctx, 0, &addr);				\
	return kfree_hit((u64)ctx, addr);				\
}

#define CALLS(sym, handler)						\
KFUNC_PROBE(sym)							\
{									\
	return handler##_hit((u64)ctx);					\
}

FENTRY_PROBES
#endif
