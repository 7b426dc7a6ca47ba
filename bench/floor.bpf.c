// SPDX-License-Identifier: GPL-2.0
/*
 * The floor: programs that return at once, attached where the exporter's
 * are (same kprobes and kretprobes, or the same trampolines, and the same
 * two tracepoints). What a configuration costs above this is what its
 * programs do; the floor itself is the price of being attached at all.
 */
#include <uapi/linux/ptrace.h>

int floor_enter(struct pt_regs *ctx)
{
	return 0;
}

int floor_return(struct pt_regs *ctx)
{
	return 0;
}

TRACEPOINT_PROBE(sched, sched_process_exit)
{
	return 0;
}

RAW_TRACEPOINT_PROBE(sched_process_fork)
{
	return 0;
}

#ifdef FENTRY_PROBES
/* The items tracer_exporter/kernel/program.py lists, as in tracer_exporter/kernel/bpf/tracer.bpf.c. */
#define KMALLOC(sym, size_arg)		\
KFUNC_PROBE(sym)			\
{					\
	return 0;			\
}					\
KRETFUNC_PROBE(sym)			\
{					\
	return 0;			\
}

#define KFREE(sym)			\
KFUNC_PROBE(sym)			\
{					\
	return 0;			\
}

#define CALLS(sym, handler)		\
KFUNC_PROBE(sym)			\
{					\
	return 0;			\
}

FENTRY_PROBES
#endif
