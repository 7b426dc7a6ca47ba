/* SPDX-License-Identifier: GPL-2.0 */
/*
 * What tracer.bpf.c shares with user space: the map values it reads and the
 * numbers it passes. tracer_exporter/kernel/contract.py is the Python side, and
 * tests/unit/test_contract.py checks on the host that the two agree.
 */
#ifndef TRACER_H
#define TRACER_H

/* Value of the tracked and exited maps. */
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
	u32 flags;		/* TRACK_*, and the group above GROUP_SHIFT */
	char comm[TASK_COMM_LEN];	/* set for followed children and on exit */
};

/* counters.flags */
#define TRACK_FOLLOW	1	/* new child processes are tracked too */
#define TRACK_KEEP	2	/* on exit, move the counters to exited */
#define TRACK_BY_EXEC	4	/* a group member by its exec: leaves at an exec that does not match */
#define TRACK_BY_CGROUP	8	/* a group member by its cgroup: leaves when moved out */
/*
 * A group member's group id (1 and up) is the flags' upper half: the value of
 * the selector maps is the flags word a member starts with.
 */
#define GROUP_SHIFT	16
/* In cgroup_paths only: a selector's own path, kept when its cgroup is removed. */
#define CGROUP_SELECTED	0x8000

/* The selector maps' keys: an exe path as exec'd, a path hash (FNV-1a, 64 bit). */
#define EXE_LEN		256
#define CGROUP_PATH_LEN	256
#define FNV_BASIS	0xcbf29ce484222325ULL
#define FNV_PRIME	0x100000001b3ULL

/* Index of the per-CPU stats array. */
enum stat {
	STAT_ALLOC_ENTRIES,
	STAT_ALLOC_INSERT_FAILURES,
	STAT_INFLIGHT_INSERT_FAILURES,
	STAT_FOLLOW_DROPPED,
	STAT_EXITED_INSERT_FAILURES,
	STAT_RETURNS_LOST,
	STAT_CGROUP_INSERT_FAILURES,
	STAT_COUNT,
};

/* Slots of each counting filter (a power of two); user space passes it too. */
#ifndef FILTER_SLOTS
#define FILTER_SLOTS 65536
#endif

/* A tracked filter slot: this program's half, then user space's (mmap'd). */
struct tracked_slot {
	s32 kern;
	s32 user;
};

#endif /* TRACER_H */
