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
 *   TASK_BTF      bpf_get_current_task_btf() is there (5.11+ with BTF)
 *   FENTRY_PROBES the fentry/fexit mode's attach points (see the end);
 *                 unset, the kprobe handlers are attached by user space
 *
 * Both modes share every counting function below: a handler only turns its
 * context into a stack address and arguments.
 */
#include <uapi/linux/ptrace.h>
#include <linux/sched.h>
#include <linux/sched/signal.h>

/* Keep in step with tracer_exporter/counters.py. */
struct counters {
	u64 kmalloc_calls;
	u64 kmalloc_bytes;
	u64 kfree_calls;
	u64 kfree_bytes;
	u64 schedule_calls;
	u64 up_calls;
	u64 down_calls;
	u64 lock_calls;
	u64 unlock_calls;
	u32 parent;		/* tgid it was forked from when followed, else 0 */
	u32 flags;		/* TRACK_* */
	char comm[TASK_COMM_LEN];	/* set for followed children and on exit */
};

/* Keep in step with tracer_exporter/probes.py. */
#define TRACK_FOLLOW	1	/* new child processes are tracked too */
#define TRACK_KEEP	2	/* on exit, move the counters to exited */

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

/* Keep in step with tracer_exporter/probes.py. */
enum stat {
	STAT_ALLOC_ENTRIES,
	STAT_ALLOC_INSERT_FAILURES,
	STAT_INFLIGHT_INSERT_FAILURES,
	STAT_FOLLOW_DROPPED,
	STAT_EXITED_INSERT_FAILURES,
	STAT_RETURNS_LOST,
	STAT_COUNT,
};

#ifndef THREAD_SIZE
#define THREAD_SIZE (PAGE_SIZE << 2)
#endif

/* ZERO_SIZE_PTR and NULL: kmalloc answered without memory. */
#define ZERO_OR_NULL(addr) ((addr) <= 16)

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
#ifndef FILTER_SLOTS
#define FILTER_SLOTS 65536
#endif
#ifndef BPF_F_MMAPABLE
#define BPF_F_MMAPABLE (1U << 10)
#endif
/* Keep in step with tracer_exporter/probes.py. */
struct tracked_slot {
	s32 kern;
	s32 user;
};
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
 * Interrupts and softirqs run on their own stacks and borrow whatever task
 * is current: their work is not the task's. A probe hit counts only when
 * the probed function runs on the current task's own stack. Called after
 * the tracked lookup, so untracked processes never pay for it.
 *
 * @sp is a stack address of the probed call: the stack pointer a kprobe
 * saw, or, under a trampoline, its frame (the context it passes lives
 * there), which is just below the probed function's own.
 */
static __always_inline bool on_task_stack(u64 sp)
{
#ifdef TASK_BTF
	/* A BTF pointer (5.11+): a plain load, not a bpf_probe_read call. */
	struct task_struct *task = (struct task_struct *)bpf_get_current_task_btf();
#else
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();
#endif
	u64 base = (u64)task->stack;

	return sp >= base && sp < base + THREAD_SIZE;
}

static __always_inline struct counters *current_counters(u64 sp)
{
	/* tgid is the user-space pid: all threads share one row. */
	u32 tgid = bpf_get_current_pid_tgid() >> 32;
	struct counters *c;

	if (!maybe_tracked(tgid))
		return NULL;
	c = tracked.lookup(&tgid);
	if (c && !on_task_stack(sp))
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

	if (!maybe_tracked(tgid) || !tracked.lookup(&tgid) || !on_task_stack(sp))
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
	if (!rec || !rec->active || !on_task_stack(sp))
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
	if (ZERO_OR_NULL(addr))
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

/*
 * Fires once per exiting thread. signal->live reaches zero only when the
 * last thread of the group has gone, so one thread's exit keeps the row.
 */
TRACEPOINT_PROBE(sched, sched_process_exit)
{
	u64 id = bpf_get_current_pid_tgid();
	u32 tgid = id >> 32;
	struct inflight *rec = inflight.lookup(&id);
	struct task_struct *task;
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
	task = (struct task_struct *)bpf_get_current_task();
	if (task->signal->live.counter != 0)
		return 0;
	if (c->flags & TRACK_KEEP) {
		bpf_get_current_comm(&c->comm, sizeof(c->comm));
		if (exited.update(&tgid, c))
			stat_add(STAT_EXITED_INSERT_FAILURES, 1);
	}
	if (!tracked.delete(&tgid))
		tracked_slot_add(tgid, -1);
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
	struct task_struct *task = (struct task_struct *)ctx->args[1];
	u32 parent = bpf_get_current_pid_tgid() >> 32;
	struct counters *pc;
	struct counters child = {};
	u32 tgid = 0;

	if (!maybe_tracked(parent))
		return 0;
	pc = tracked.lookup(&parent);
	if (!pc || !(pc->flags & TRACK_FOLLOW))
		return 0;
	bpf_probe_read_kernel(&tgid, sizeof(tgid), &task->tgid);
	if (tgid == parent)
		return 0;
	child.parent = parent;
	child.flags = pc->flags;
	bpf_get_current_comm(&child.comm, sizeof(child.comm));
	tracked_slot_add(tgid, 1);
	if (tracked.insert(&tgid, &child)) {
		tracked_slot_add(tgid, -1);
		follow_drop(ctx, parent);
	}
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
