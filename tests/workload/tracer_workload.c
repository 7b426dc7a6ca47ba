// SPDX-License-Identifier: GPL-2.0
/*
 * tracer_workload: a test workload that makes an exact, known number of
 * kmalloc/kfree/schedule/up/down_interruptible/mutex_lock/mutex_unlock calls,
 * so that the tracer's end-to-end tests can assert exact counts.
 *
 * The whole point is the noise rule: while a job runs, the task running it
 * makes no countable call other than the requested ones, and it counts each
 * of those in its tally. Everything a job needs is allocated before its ops
 * start.
 *
 * /dev/tracer_workload: text commands in, one result line out.
 *
 * One command per write() (at most 512 bytes, trailing newline optional).
 * write() rewinds the file position to 0, so a plain read() right after it
 * returns the result line of that command; pread() at offset 0 returns it
 * again at any time. A failed command returns its error from write() and
 * leaves "error: <reason>" as the result; the reason also goes to the log.
 *
 *   run OPS...              perform OPS in the calling task; result: tally
 *   free                    free the blocks run left held; result: tally
 *   spawn OPS...            a kernel thread "tw/<n>" that will perform OPS;
 *                           result: its pid
 *   start PID               let it perform OPS; result: ok
 *   wait PID [TIMEOUT_MS]   until it is done and asleep (default 30000 ms);
 *                           result: tally
 *   stop PID                stop it, free what it holds; result: ok, once
 *                           its pid is released
 *   irq PID CPU COUNT SIZE hard|soft [TIMEOUT_MS]
 *                           interrupt work on PID's time (see tw_cmd_irq);
 *                           result: hits, fires and failed allocations
 *
 * Each open file has its own work area for run, allocated at open() so that
 * run allocates nothing while the caller may be watched. No mutex is taken on
 * the command path: a busy bit keeps a second command on the same fd out.
 */
#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/atomic.h>
#include <linux/completion.h>
#include <linux/ctype.h>
#include <linux/err.h>
#include <linux/fs.h>
#include <linux/hrtimer.h>
#include <linux/jiffies.h>
#include <linux/kthread.h>
#include <linux/list.h>
#include <linux/miscdevice.h>
#include <linux/mm.h>
#include <linux/module.h>
#include <linux/mutex.h>
#include <linux/numa.h>
#include <linux/pid.h>
#include <linux/rcupdate.h>
#include <linux/refcount.h>
#include <linux/sched.h>
#include <linux/sched/signal.h>
#include <linux/sched/task_stack.h>
#include <linux/sched/task.h>
#include <linux/semaphore.h>
#include <linux/smp.h>
#include <linux/slab.h>
#include <linux/spinlock.h>
#include <linux/string.h>
#include <linux/types.h>
#include <linux/uaccess.h>
#include <linux/version.h>
#include <linux/vmalloc.h>

#define TW_CMD_MAX		512
/* The shortest op token plus a separator ("mutex:1 ") takes 8 bytes. */
#define TW_MAX_OPS		(TW_CMD_MAX / 8)
/* A tally line with every counter at 20 digits fits. */
#define TW_REPLY_MAX		320
#define TW_CONST_SIZE		192
#define TW_CONST_LARGE_SIZE	16384
#define TW_MAX_COUNT		(1U << 24)
/* Bounds the bytes one command allocates; the test guests have 2 GiB. */
#define TW_MAX_BYTES		(256ULL << 20)
/* Far past KMALLOC_MAX_SIZE: the page allocator refuses the order at once. */
#define TW_FAIL_SIZE		(KMALLOC_MAX_SIZE << 4)
#define TW_WAIT_DEFAULT_MS	30000
/* For the thread to reach its gate, or to be gone after kthread_stop(). */
#define TW_THREAD_TIMEOUT_MS	10000

static unsigned int tw_max_blocks = 1U << 20;
module_param_named(max_blocks, tw_max_blocks, uint, 0444);
MODULE_PARM_DESC(max_blocks,
		 "blocks one command may allocate; each open file reserves 12 bytes per block");

enum tw_op_kind {
	/* Allocating kinds first: tw_op_allocates() relies on the order. */
	TW_OP_KMALLOC,
	TW_OP_KMALLOC_CONST,
	TW_OP_KMALLOC_CONST_LARGE,
	TW_OP_KZALLOC,
	TW_OP_KMALLOC_NODE,
	TW_OP_KMALLOC_NODE_CONST,
	TW_OP_KMEMDUP,
	TW_OP_KVMALLOC,
	TW_OP_KMALLOC_FAIL,
	TW_OP_KFREE,
	TW_OP_KFREE_ALL,
	TW_OP_KFREE_NULL,
	TW_OP_SCHEDULE,
	TW_OP_UPDOWN,
	TW_OP_MUTEX,
};

struct tw_op {
	enum tw_op_kind kind;
	u32 count;
	size_t size;		/* requested size, for the byte tallies */
};

struct tw_ops {
	unsigned int nr;
	u64 allocs;		/* blocks the ops may hold: sizes the held arrays */
	struct tw_op op[TW_MAX_OPS];
};

struct tw_tally {
	u64 kmalloc;
	u64 kmalloc_bytes;
	u64 kfree;
	u64 kfree_bytes;
	u64 sched;
	u64 up;
	u64 down;
	u64 lock;
	u64 unlock;
};

/* Blocks a job still holds, oldest first (kfree:N frees from @head). */
struct tw_held {
	void **ptr;
	u32 *size;
	u32 cap;
	u32 head;
	u32 tail;
};

/* One job's work: what to do, what was done, and its private locks. */
struct tw_work {
	struct tw_ops ops;
	struct tw_tally tally;
	struct tw_held held;
	struct semaphore sem;	/* for updown: private, so never contended */
	struct mutex lock;	/* for mutex: private, so never contended */
};

/* The text a command leaves for read(). */
struct tw_reply {
	size_t len;
	char buf[TW_REPLY_MAX];
};

enum {
	TW_JOB_STARTED,
	TW_JOB_STOPPED,
};

/* A job run by a kernel thread. */
struct tw_job {
	struct tw_work work;
	struct list_head node;		/* in tw_jobs while spawned */
	struct task_struct *task;
	pid_t pid;
	unsigned long flags;
	struct completion gated;	/* the thread is about to sleep in the gate */
	struct completion done;		/* ops done, or the job stopped */
	unsigned long gate_nvcsw;
	unsigned long done_nvcsw;
	refcount_t ref;
};

enum {
	TW_FILE_BUSY,
};

/* An open file of the device. */
struct tw_file {
	unsigned long flags;
	struct tw_work work;	/* run's work area */
	struct tw_reply reply;
	char cmd[TW_CMD_MAX + 1];
};

static __printf(2, 3) void tw_reply_set(struct tw_reply *r, const char *fmt, ...)
{
	va_list args;

	va_start(args, fmt);
	r->len = vscnprintf(r->buf, sizeof(r->buf), fmt, args);
	va_end(args);
}

/* Leaves "error: <reason>" for read() and logs it; returns @err. */
static __printf(3, 4) int tw_reply_error(struct tw_reply *r, int err,
					 const char *fmt, ...)
{
	va_list args;
	size_t n;

	n = scnprintf(r->buf, sizeof(r->buf), "error: ");
	va_start(args, fmt);
	n += vscnprintf(r->buf + n, sizeof(r->buf) - n, fmt, args);
	va_end(args);
	pr_info("%s (%d)\n", r->buf, err);
	n += scnprintf(r->buf + n, sizeof(r->buf) - n, "\n");
	r->len = n;
	return err;
}

static void tw_reply_tally(struct tw_reply *r, const struct tw_tally *t, u32 held)
{
	tw_reply_set(r,
		     "kmalloc=%llu kmalloc_bytes=%llu kfree=%llu kfree_bytes=%llu sched=%llu up=%llu down=%llu lock=%llu unlock=%llu held=%u\n",
		     t->kmalloc, t->kmalloc_bytes, t->kfree, t->kfree_bytes,
		     t->sched, t->up, t->down, t->lock, t->unlock, held);
}

/* Splits off the next whitespace-separated token, NUL-terminated in place. */
static char *tw_next_token(char **cursor)
{
	char *s = skip_spaces(*cursor), *tok;

	if (!*s) {
		*cursor = s;
		return NULL;
	}
	tok = s;
	while (*s && !isspace(*s))
		s++;
	if (*s)
		*s++ = '\0';
	*cursor = s;
	return tok;
}

/*
 * OPS ("op:count[:size] ..."): parsing them and performing them.
 *
 * Everything between the first op and the last is the counted work: no
 * kmalloc, kfree, schedule(), up, down or mutex call may happen here other
 * than the requested ones, and each one is added to the job's tally.
 */

struct tw_op_desc {
	const char *name;
	enum tw_op_kind kind;
	bool sized;		/* takes :size from the command */
	size_t size;		/* fixed size of the other allocating kinds */
};

static const struct tw_op_desc tw_op_descs[] = {
	{ "kmalloc",		 TW_OP_KMALLOC,		    true,  0 },
	{ "kmalloc_const",	 TW_OP_KMALLOC_CONST,	    false, TW_CONST_SIZE },
	{ "kmalloc_const_large", TW_OP_KMALLOC_CONST_LARGE, false,
	  TW_CONST_LARGE_SIZE },
	{ "kzalloc",		 TW_OP_KZALLOC,		    true,  0 },
	{ "kmalloc_node",	 TW_OP_KMALLOC_NODE,	    true,  0 },
	{ "kmalloc_node_const",	 TW_OP_KMALLOC_NODE_CONST,  false, TW_CONST_SIZE },
	{ "kmemdup",		 TW_OP_KMEMDUP,		    true,  0 },
	{ "kvmalloc",		 TW_OP_KVMALLOC,	    true,  0 },
	{ "kmalloc_fail",	 TW_OP_KMALLOC_FAIL,	    false, TW_FAIL_SIZE },
	{ "kfree",		 TW_OP_KFREE,		    false, 0 },
	{ "kfree_null",		 TW_OP_KFREE_NULL,	    false, 0 },
	{ "schedule",		 TW_OP_SCHEDULE,	    false, 0 },
	{ "updown",		 TW_OP_UPDOWN,		    false, 0 },
	{ "mutex",		 TW_OP_MUTEX,		    false, 0 },
};

/*
 * kmemdup's source: allocated at load so that no job allocates one while it
 * runs. Large enough for any size a command may ask for.
 */
static void *tw_dup_src;

static int tw_ops_init(void)
{
	tw_dup_src = vmalloc(KMALLOC_MAX_SIZE);
	if (!tw_dup_src)
		return -ENOMEM;
	memset(tw_dup_src, 0x5a, KMALLOC_MAX_SIZE);
	return 0;
}

static void tw_ops_exit(void)
{
	vfree(tw_dup_src);
}

static bool tw_op_allocates(enum tw_op_kind kind)
{
	return kind <= TW_OP_KMALLOC_FAIL;
}

static const struct tw_op_desc *tw_op_lookup(const char *name)
{
	size_t i;

	for (i = 0; i < ARRAY_SIZE(tw_op_descs); i++)
		if (!strcmp(tw_op_descs[i].name, name))
			return &tw_op_descs[i];
	return NULL;
}

static int tw_parse_count(struct tw_op *op, const char *tok, const char *s,
			  struct tw_reply *r)
{
	if (op->kind == TW_OP_KFREE && !strcmp(s, "all")) {
		op->kind = TW_OP_KFREE_ALL;
		op->count = 0;
		return 0;
	}
	if (kstrtou32(s, 10, &op->count) || op->count > TW_MAX_COUNT)
		return tw_reply_error(r, -EINVAL,
				      "%s: count must be 0..%u", tok,
				      TW_MAX_COUNT);
	return 0;
}

static int tw_parse_size(struct tw_op *op, const char *tok, const char *s,
			 struct tw_reply *r)
{
	unsigned long long size;

	if (!s)
		return tw_reply_error(r, -EINVAL, "%s: needs :size", tok);
	if (kstrtoull(s, 10, &size) || size > KMALLOC_MAX_SIZE)
		return tw_reply_error(r, -EINVAL,
				      "%s: size must be 0..%lu (kmalloc_fail makes failing calls)",
				      tok, KMALLOC_MAX_SIZE);
	op->size = size;
	return 0;
}

/* Parses one "op:count[:size]" token (split in place) into @op. */
static int tw_parse_op(struct tw_op *op, char *tok, struct tw_reply *r)
{
	char *name = tok, *count, *size;
	const struct tw_op_desc *d;
	int err;

	count = strchr(name, ':');
	if (!count)
		return tw_reply_error(r, -EINVAL, "%s: expected op:count[:size]",
				      tok);
	*count++ = '\0';
	size = strchr(count, ':');
	if (size)
		*size++ = '\0';
	d = tw_op_lookup(name);
	if (!d)
		return tw_reply_error(r, -EINVAL, "unknown op '%s'", name);
	op->kind = d->kind;
	op->size = d->size;
	err = tw_parse_count(op, name, count, r);
	if (err)
		return err;
	if (d->sized)
		return tw_parse_size(op, name, size, r);
	if (size)
		return tw_reply_error(r, -EINVAL, "%s: takes no size", name);
	return 0;
}

/*
 * Checks what the ops will hold, assuming every allocation but kmalloc_fail
 * succeeds: kfree:N may not free more than is held, and the blocks held at
 * once must fit the limits.
 */
static int tw_ops_check(struct tw_ops *ops, struct tw_reply *r)
{
	u64 held = 0, bytes = 0;
	unsigned int i;

	ops->allocs = 0;
	for (i = 0; i < ops->nr; i++) {
		const struct tw_op *op = &ops->op[i];

		if (op->kind == TW_OP_KFREE_ALL) {
			held = 0;
		} else if (op->kind == TW_OP_KFREE) {
			if (op->count > held)
				return tw_reply_error(r, -EINVAL,
						      "op %u: kfree:%u but only %llu blocks held",
						      i + 1, op->count, held);
			held -= op->count;
		} else if (tw_op_allocates(op->kind) &&
			   op->kind != TW_OP_KMALLOC_FAIL) {
			held += op->count;
			ops->allocs += op->count;
			bytes += (u64)op->count * op->size;
		}
	}
	if (ops->allocs > tw_max_blocks)
		return tw_reply_error(r, -E2BIG,
				      "%llu allocations, max_blocks is %u",
				      ops->allocs, tw_max_blocks);
	if (bytes > TW_MAX_BYTES)
		return tw_reply_error(r, -E2BIG, "%llu bytes, at most %llu",
				      bytes, TW_MAX_BYTES);
	return 0;
}

static int tw_ops_parse(struct tw_ops *ops, char *text, struct tw_reply *r)
{
	char *tok;
	int err;

	ops->nr = 0;
	while ((tok = tw_next_token(&text))) {
		if (ops->nr == TW_MAX_OPS)
			return tw_reply_error(r, -EINVAL, "more than %u ops",
					      TW_MAX_OPS);
		err = tw_parse_op(&ops->op[ops->nr], tok, r);
		if (err)
			return err;
		ops->nr++;
	}
	if (!ops->nr)
		return tw_reply_error(r, -EINVAL, "no ops given");
	return tw_ops_check(ops, r);
}

static void tw_work_init(struct tw_work *w)
{
	memset(&w->tally, 0, sizeof(w->tally));
	sema_init(&w->sem, 0);
	mutex_init(&w->lock);
}

static void tw_held_destroy(struct tw_held *h)
{
	kvfree(h->ptr);
	kvfree(h->size);
	h->ptr = NULL;
	h->size = NULL;
	h->cap = 0;
}

static int tw_held_alloc(struct tw_held *h, u32 cap)
{
	h->head = 0;
	h->tail = 0;
	h->cap = cap;
	if (!cap)
		return 0;
	h->ptr = kvmalloc_array(cap, sizeof(*h->ptr), GFP_KERNEL);
	h->size = kvmalloc_array(cap, sizeof(*h->size), GFP_KERNEL);
	if (!h->ptr || !h->size) {
		tw_held_destroy(h);
		return -ENOMEM;
	}
	return 0;
}

static u32 tw_held_count(const struct tw_held *h)
{
	return h->tail - h->head;
}

static void tw_free_oldest(struct tw_held *h, struct tw_tally *t)
{
	u32 i = h->head++;

	kfree(h->ptr[i]);
	t->kfree++;
	t->kfree_bytes += h->size[i];
}

/* Frees every held block, counting the calls in @t. */
static void tw_held_release(struct tw_held *h, struct tw_tally *t)
{
	while (h->head != h->tail) {
		tw_free_oldest(h, t);
		cond_resched();
	}
	h->head = 0;
	h->tail = 0;
}

/*
 * One allocation of @kind. Constant sizes are written as literals so that
 * kmalloc()'s inline part takes its compile-time branch, and run-time sizes
 * come from the caller so that it cannot.
 */
static void *tw_alloc_one(enum tw_op_kind kind, size_t size)
{
	switch (kind) {
	case TW_OP_KMALLOC:
		return kmalloc(size, GFP_KERNEL);
	case TW_OP_KMALLOC_CONST:
		return kmalloc(TW_CONST_SIZE, GFP_KERNEL);
	case TW_OP_KMALLOC_CONST_LARGE:
		return kmalloc(TW_CONST_LARGE_SIZE, GFP_KERNEL);
	case TW_OP_KZALLOC:
		return kzalloc(size, GFP_KERNEL);
	case TW_OP_KMALLOC_NODE:
		return kmalloc_node(size, GFP_KERNEL, NUMA_NO_NODE);
	case TW_OP_KMALLOC_NODE_CONST:
		return kmalloc_node(TW_CONST_SIZE, GFP_KERNEL, NUMA_NO_NODE);
	case TW_OP_KMEMDUP:
		return kmemdup(tw_dup_src, size, GFP_KERNEL);
	case TW_OP_KVMALLOC:
		return kvmalloc(size, GFP_KERNEL);
	case TW_OP_KMALLOC_FAIL:
		return kmalloc(size, GFP_KERNEL | __GFP_NOWARN);
	default:
		return NULL;
	}
}

static void tw_do_alloc(struct tw_work *w, const struct tw_op *op)
{
	/* A volatile read, so the compiler cannot fold a known size. */
	size_t size = READ_ONCE(op->size);
	struct tw_held *h = &w->held;
	void *p = tw_alloc_one(op->kind, size);

	w->tally.kmalloc++;
	if (!p)
		return;
	if (is_vmalloc_addr(p)) {
		/* kvmalloc fell back: its kmalloc attempt failed. */
		pr_warn("kvmalloc(%zu) fell back to vmalloc: the tally is not exact\n", size);
		vfree(p);
		return;
	}
	if (!ZERO_OR_NULL_PTR(p))
		w->tally.kmalloc_bytes += size;
	if (WARN_ON_ONCE(h->tail == h->cap)) {
		/* tw_ops_check() sized the arrays; free rather than leak. */
		kfree(p);
		w->tally.kfree++;
		w->tally.kfree_bytes += size;
		return;
	}
	h->ptr[h->tail] = p;
	h->size[h->tail] = size;
	h->tail++;
}

static void tw_do_updown(struct tw_work *w)
{
	int err;

	up(&w->sem);
	w->tally.up++;
	/* The up() above makes the count 1: this never sleeps nor fails. */
	err = down_interruptible(&w->sem);
	w->tally.down++;
	WARN_ON_ONCE(err);
}

static void tw_do_mutex(struct tw_work *w)
{
	mutex_lock(&w->lock);
	w->tally.lock++;
	mutex_unlock(&w->lock);
	w->tally.unlock++;
}

static void tw_step(struct tw_work *w, const struct tw_op *op)
{
	switch (op->kind) {
	case TW_OP_KFREE:
	case TW_OP_KFREE_ALL:
		tw_free_oldest(&w->held, &w->tally);
		break;
	case TW_OP_KFREE_NULL:
		kfree(NULL);
		w->tally.kfree++;
		break;
	case TW_OP_SCHEDULE:
		/* TASK_RUNNING: schedule() returns at once, maybe after others ran. */
		w->tally.sched++;
		schedule();
		break;
	case TW_OP_UPDOWN:
		tw_do_updown(w);
		break;
	case TW_OP_MUTEX:
		tw_do_mutex(w);
		break;
	default:
		tw_do_alloc(w, op);
		break;
	}
}

/* How many steps @op takes; kfree:N is capped by what an odd failure left. */
static u32 tw_op_steps(const struct tw_work *w, const struct tw_op *op)
{
	u32 held = tw_held_count(&w->held);

	if (op->kind == TW_OP_KFREE_ALL)
		return held;
	if (op->kind == TW_OP_KFREE)
		return min(op->count, held);
	return op->count;
}

/*
 * Performs the ops in the calling task. cond_resched() keeps long runs from
 * tripping the soft-lockup detector; it goes through __schedule(), not
 * schedule(), so a tracer of schedule() does not see it.
 */
static int tw_work_run(struct tw_work *w)
{
	unsigned int i;
	u32 n, steps;

	for (i = 0; i < w->ops.nr; i++) {
		const struct tw_op *op = &w->ops.op[i];

		steps = tw_op_steps(w, op);
		for (n = 0; n < steps; n++) {
			tw_step(w, op);
			if (fatal_signal_pending(current))
				return -EINTR;
			cond_resched();
		}
	}
	return 0;
}

/*
 * Jobs run by kernel threads: spawn, start, wait, stop.
 *
 * A tracer starts watching a job's thread between spawn and start, so the
 * thread must not make any countable call after spawn returns other than the
 * ones in its tally:
 *
 * - spawn wakes the new thread at once and returns only after it sleeps in
 *   tw_job_gate(). Whatever kthread() itself does after the first wake-up
 *   (newer kernels set the thread's affinity there, under a mutex) happens
 *   before anyone watches. The gate's schedule() is entered before spawn
 *   returns too, so it is not in the tally either.
 * - after the ops the thread announces done and sleeps until stopped; each of
 *   those schedule() calls is in the tally, and wait returns only once the
 *   thread is inside the first of them.
 */

/* A spinlock, not a mutex: mutex_lock() is one of the counted calls. */
static DEFINE_SPINLOCK(tw_jobs_lock);
static LIST_HEAD(tw_jobs);
static atomic_t tw_job_seq = ATOMIC_INIT(0);

static void tw_job_put(struct tw_job *job)
{
	if (!refcount_dec_and_test(&job->ref))
		return;
	tw_held_destroy(&job->work.held);
	mutex_destroy(&job->work.lock);
	if (job->task)
		put_task_struct(job->task);
	kfree(job);
}

static struct tw_job *tw_job_find(pid_t pid)
{
	struct tw_job *job;

	list_for_each_entry(job, &tw_jobs, node)
		if (job->pid == pid)
			return job;
	return NULL;
}

/* Looks a job up and takes a reference on it. */
static struct tw_job *tw_job_get(pid_t pid)
{
	struct tw_job *job;

	spin_lock(&tw_jobs_lock);
	job = tw_job_find(pid);
	if (job)
		refcount_inc(&job->ref);
	spin_unlock(&tw_jobs_lock);
	return job;
}

/*
 * Waits until @task has switched out voluntarily since @nvcsw was read, that
 * is, has gone through schedule() into the sleep that followed the read.
 */
static int tw_wait_switched_out(struct task_struct *task, unsigned long nvcsw,
				unsigned long timeout)
{
	unsigned long deadline = jiffies + timeout;

	while (READ_ONCE(task->nvcsw) == nvcsw) {
		if (time_after(jiffies, deadline))
			return -ETIMEDOUT;
		schedule_timeout_uninterruptible(1);
	}
	return 0;
}

/* Sleeps until started; false when stopped first. */
static bool tw_job_gate(struct tw_job *job)
{
	bool first = true;

	set_current_state(TASK_INTERRUPTIBLE);
	job->gate_nvcsw = current->nvcsw;
	complete(&job->gated);
	while (!test_bit(TW_JOB_STARTED, &job->flags) && !kthread_should_stop()) {
		/* Only a spurious wake-up makes a second, watched, call. */
		if (!first)
			job->work.tally.sched++;
		first = false;
		schedule();
		set_current_state(TASK_INTERRUPTIBLE);
	}
	__set_current_state(TASK_RUNNING);
	return !kthread_should_stop();
}

/* After the ops: announce done, then sleep until stopped. */
static void tw_job_rest(struct tw_job *job)
{
	bool announced = false;

	for (;;) {
		set_current_state(TASK_INTERRUPTIBLE);
		if (kthread_should_stop())
			break;
		/* Counted before done is announced: wait's tally includes it. */
		WRITE_ONCE(job->work.tally.sched, job->work.tally.sched + 1);
		if (!announced) {
			job->done_nvcsw = current->nvcsw;
			complete_all(&job->done);
			announced = true;
		}
		schedule();
	}
	__set_current_state(TASK_RUNNING);
}

static int tw_job_thread(void *data)
{
	struct tw_job *job = data;

	if (tw_job_gate(job)) {
		tw_work_run(&job->work);
		tw_job_rest(job);
	}
	return 0;
}

/*
 * kthread_stop() returns once the exiting thread signals its vfork completion,
 * before the sched_process_exit tracepoint and before its pid is released.
 * Then release_task() leaves a put of the task_struct to an RCU callback.
 * Waits until only the job's reference is left: the pid is gone (a caller of
 * stop may rely on that) and the callback has run. Fails if the pid is not
 * released; other references held elsewhere only cost the timeout.
 */
static int tw_wait_reaped(struct task_struct *task, unsigned long timeout)
{
	unsigned long deadline = jiffies + timeout;

	while (pid_alive(task) || refcount_read(&task->usage) > 1) {
		if (time_after(jiffies, deadline))
			return pid_alive(task) ? -ETIMEDOUT : 0;
		schedule_timeout_uninterruptible(1);
	}
	return 0;
}

/*
 * Stops the thread and frees what the job holds, in our context.
 *
 * A dead thread's task_struct and creds are freed through RCU callbacks,
 * which run in softirq context on top of whatever task is current then:
 * often the next job's thread, to which a tracer keyed by the current task
 * would count their kfree calls. So the last put of the task_struct happens
 * here, and the barrier runs the creds' callback that it queues.
 */
static int tw_job_end(struct tw_job *job)
{
	struct tw_tally scratch = {};
	int err;

	kthread_stop(job->task);
	err = tw_wait_reaped(job->task,
			     msecs_to_jiffies(TW_THREAD_TIMEOUT_MS));
	set_bit(TW_JOB_STOPPED, &job->flags);
	complete_all(&job->done);
	tw_held_release(&job->work.held, &scratch);
	tw_job_put(job);
	rcu_barrier();
	return err;
}

static struct tw_job *tw_job_alloc(char *ops_text, struct tw_reply *r)
{
	struct tw_job *job;
	int err;

	job = kzalloc(sizeof(*job), GFP_KERNEL);
	if (!job) {
		tw_reply_error(r, -ENOMEM, "out of memory for a job");
		return ERR_PTR(-ENOMEM);
	}
	refcount_set(&job->ref, 1);
	INIT_LIST_HEAD(&job->node);
	init_completion(&job->gated);
	init_completion(&job->done);
	tw_work_init(&job->work);
	err = tw_ops_parse(&job->work.ops, ops_text, r);
	if (!err) {
		err = tw_held_alloc(&job->work.held, job->work.ops.allocs);
		if (err)
			tw_reply_error(r, err, "out of memory for %llu blocks",
				       job->work.ops.allocs);
	}
	if (err) {
		tw_job_put(job);
		return ERR_PTR(err);
	}
	return job;
}

/* Creates the thread and waits until it sleeps in the gate. */
static int tw_job_launch(struct tw_job *job, struct tw_reply *r)
{
	struct task_struct *task;

	task = kthread_create(tw_job_thread, job, "tw/%d",
			      atomic_inc_return(&tw_job_seq));
	if (IS_ERR(task))
		return tw_reply_error(r, PTR_ERR(task), "kthread_create failed");
	get_task_struct(task);
	job->task = task;
	job->pid = task_pid_nr(task);
	wake_up_process(task);
	wait_for_completion(&job->gated);
	if (tw_wait_switched_out(task, job->gate_nvcsw,
				 msecs_to_jiffies(TW_THREAD_TIMEOUT_MS))) {
		kthread_stop(task);
		return tw_reply_error(r, -ETIMEDOUT,
				      "thread %d did not reach its gate",
				      job->pid);
	}
	return 0;
}

static int tw_job_spawn(char *ops_text, struct tw_reply *r)
{
	struct tw_job *job;
	int err;

	job = tw_job_alloc(ops_text, r);
	if (IS_ERR(job))
		return PTR_ERR(job);
	err = tw_job_launch(job, r);
	if (err) {
		tw_job_put(job);
		return err;
	}
	spin_lock(&tw_jobs_lock);
	list_add_tail(&job->node, &tw_jobs);
	spin_unlock(&tw_jobs_lock);
	tw_reply_set(r, "%d\n", job->pid);
	return 0;
}

static int tw_job_start(pid_t pid, struct tw_reply *r)
{
	struct tw_job *job = tw_job_get(pid);
	int err = 0;

	if (!job)
		return tw_reply_error(r, -ESRCH, "start: no job %d", pid);
	if (test_and_set_bit(TW_JOB_STARTED, &job->flags)) {
		err = tw_reply_error(r, -EINVAL, "start: job %d already started",
				     pid);
	} else {
		wake_up_process(job->task);
		tw_reply_set(r, "ok\n");
	}
	tw_job_put(job);
	return err;
}

static int tw_job_await(struct tw_job *job, unsigned int timeout_ms,
			struct tw_reply *r)
{
	long left;

	left = wait_for_completion_killable_timeout(&job->done,
						    msecs_to_jiffies(timeout_ms));
	if (left < 0)
		return left;
	if (!left)
		return tw_reply_error(r, -ETIMEDOUT,
				      "wait: job %d not done after %u ms",
				      job->pid, timeout_ms);
	if (test_bit(TW_JOB_STOPPED, &job->flags))
		return tw_reply_error(r, -ESRCH, "wait: job %d was stopped",
				      job->pid);
	if (tw_wait_switched_out(job->task, job->done_nvcsw, left))
		return tw_reply_error(r, -ETIMEDOUT,
				      "wait: job %d done but not asleep",
				      job->pid);
	return 0;
}

static int tw_job_wait(pid_t pid, unsigned int timeout_ms, struct tw_reply *r)
{
	struct tw_job *job = tw_job_get(pid);
	struct tw_tally t;
	int err;

	if (!job)
		return tw_reply_error(r, -ESRCH, "wait: no job %d", pid);
	err = tw_job_await(job, timeout_ms, r);
	if (!err) {
		t = job->work.tally;
		t.sched = READ_ONCE(job->work.tally.sched);
		tw_reply_tally(r, &t, tw_held_count(&job->work.held));
	}
	tw_job_put(job);
	return err;
}

static int tw_job_stop(pid_t pid, struct tw_reply *r)
{
	struct tw_job *job;

	spin_lock(&tw_jobs_lock);
	job = tw_job_find(pid);
	if (job)
		list_del_init(&job->node);
	spin_unlock(&tw_jobs_lock);
	if (!job)
		return tw_reply_error(r, -ESRCH, "stop: no job %d", pid);
	if (tw_job_end(job))
		return tw_reply_error(r, -ETIMEDOUT,
				      "stop: thread %d stopped, pid not released",
				      pid);
	tw_reply_set(r, "ok\n");
	return 0;
}

static void tw_jobs_stop_all(void)
{
	struct tw_job *job;

	for (;;) {
		spin_lock(&tw_jobs_lock);
		job = list_first_entry_or_null(&tw_jobs, struct tw_job, node);
		if (job)
			list_del_init(&job->node);
		spin_unlock(&tw_jobs_lock);
		if (!job)
			return;
		tw_job_end(job);
	}
}

/* Parses "PID" or, when @timeout_ms is given, "PID [TIMEOUT_MS]". */
static int tw_parse_pid_args(char *args, const char *verb, pid_t *pid,
			     unsigned int *timeout_ms, struct tw_reply *r)
{
	char *tok = tw_next_token(&args);

	if (!tok || kstrtoint(tok, 10, pid) || *pid <= 0)
		return tw_reply_error(r, -EINVAL, "%s: expected a pid", verb);
	tok = tw_next_token(&args);
	if (tok && timeout_ms && kstrtouint(tok, 10, timeout_ms))
		return tw_reply_error(r, -EINVAL, "%s: bad timeout '%s'", verb,
				      tok);
	if ((tok && !timeout_ms) || tw_next_token(&args))
		return tw_reply_error(r, -EINVAL, "%s: too many arguments",
				      verb);
	return 0;
}

/*
 * run: the caller is the job. The previous run's leftover blocks are freed
 * here and counted in this tally, so that the tally always matches what a
 * tracer sees during this write().
 */
static int tw_cmd_run(struct tw_file *tf, char *args)
{
	struct tw_work *w = &tf->work;
	int err;

	/* The held arrays have max_blocks entries, as tw_ops_check() allows. */
	err = tw_ops_parse(&w->ops, args, &tf->reply);
	if (err)
		return err;
	memset(&w->tally, 0, sizeof(w->tally));
	tw_held_release(&w->held, &w->tally);
	err = tw_work_run(w);
	if (err)
		return tw_reply_error(&tf->reply, err, "run: interrupted");
	tw_reply_tally(&tf->reply, &w->tally, tw_held_count(&w->held));
	return 0;
}

static int tw_cmd_free(struct tw_file *tf, char *args)
{
	struct tw_tally t = {};

	if (tw_next_token(&args))
		return tw_reply_error(&tf->reply, -EINVAL,
				      "free: takes no arguments");
	tw_held_release(&tf->work.held, &t);
	tw_reply_tally(&tf->reply, &t, 0);
	return 0;
}

static int tw_cmd_spawn(struct tw_file *tf, char *args)
{
	return tw_job_spawn(args, &tf->reply);
}

static int tw_cmd_start(struct tw_file *tf, char *args)
{
	pid_t pid;
	int err = tw_parse_pid_args(args, "start", &pid, NULL, &tf->reply);

	return err ?: tw_job_start(pid, &tf->reply);
}

static int tw_cmd_wait(struct tw_file *tf, char *args)
{
	unsigned int timeout_ms = TW_WAIT_DEFAULT_MS;
	pid_t pid;
	int err;

	err = tw_parse_pid_args(args, "wait", &pid, &timeout_ms, &tf->reply);
	return err ?: tw_job_wait(pid, timeout_ms, &tf->reply);
}

static int tw_cmd_stop(struct tw_file *tf, char *args)
{
	pid_t pid;
	int err = tw_parse_pid_args(args, "stop", &pid, NULL, &tf->reply);

	return err ?: tw_job_stop(pid, &tf->reply);
}

/*
 * irq: interrupt-context kmalloc/kfree on another task's time. An hrtimer
 * pinned to CPU fires every millisecond, in hardirq ("hard") or in the
 * timer softirq ("soft"). Each time it finds PID's task current and itself
 * on that task's own stack, that is, the interrupt arrived while the task
 * ran in user mode, it does kmalloc(SIZE, GFP_ATOMIC) and kfree() of the
 * result: a hit. It stops after COUNT hits. None of this is the task's own
 * work, so a tracer must charge the task nothing for it.
 */
#define TW_IRQ_PERIOD_NS	(1000 * 1000)
#define TW_IRQ_TIMEOUT_MS	30000

struct tw_irq {
	struct hrtimer timer;
	pid_t tgid;
	u32 size;
	u32 want;
	/* Written by the callback only, on one CPU; read after it stopped. */
	u32 hits;
	u32 fires;
	u32 failed;
	bool soft;
	struct completion done;
};

static enum hrtimer_restart tw_irq_fire(struct hrtimer *timer)
{
	struct tw_irq *irq = container_of(timer, struct tw_irq, timer);
	unsigned long here = 0;
	void *p;

	irq->fires++;
	if (current->tgid == irq->tgid && object_is_on_stack(&here) &&
	    (irq->soft ? in_serving_softirq() : hardirq_count())) {
		p = kmalloc(irq->size, GFP_ATOMIC | __GFP_NOWARN);
		if (!p)
			irq->failed++;
		kfree(p);
		irq->hits++;
	}
	if (irq->hits >= irq->want) {
		complete(&irq->done);
		return HRTIMER_NORESTART;
	}
	hrtimer_forward_now(timer, ns_to_ktime(TW_IRQ_PERIOD_NS));
	return HRTIMER_RESTART;
}

static enum hrtimer_mode tw_irq_mode(const struct tw_irq *irq)
{
	return irq->soft ? HRTIMER_MODE_REL_PINNED_SOFT : HRTIMER_MODE_REL_PINNED;
}

/* Runs on the chosen CPU, so that the pinned timer fires there. */
static void tw_irq_arm(void *data)
{
	struct tw_irq *irq = data;

	hrtimer_start(&irq->timer, ns_to_ktime(TW_IRQ_PERIOD_NS),
		      tw_irq_mode(irq));
}

static int tw_irq_parse(char *args, struct tw_irq *irq, unsigned int *cpu,
			unsigned int *timeout_ms, struct tw_reply *r)
{
	char *pid = tw_next_token(&args), *c = tw_next_token(&args);
	char *count = tw_next_token(&args), *size = tw_next_token(&args);
	char *mode = tw_next_token(&args), *tmo = tw_next_token(&args);

	if (!mode || tw_next_token(&args))
		return tw_reply_error(r, -EINVAL,
				      "irq: expected PID CPU COUNT SIZE hard|soft [TIMEOUT_MS]");
	if (kstrtoint(pid, 10, &irq->tgid) || irq->tgid <= 0)
		return tw_reply_error(r, -EINVAL, "irq: bad pid '%s'", pid);
	if (kstrtouint(c, 10, cpu) || *cpu >= nr_cpu_ids || !cpu_online(*cpu))
		return tw_reply_error(r, -EINVAL, "irq: no online cpu '%s'", c);
	if (kstrtou32(count, 10, &irq->want) || !irq->want ||
	    irq->want > TW_MAX_COUNT)
		return tw_reply_error(r, -EINVAL, "irq: bad count '%s'", count);
	if (kstrtou32(size, 10, &irq->size) || irq->size > PAGE_SIZE)
		return tw_reply_error(r, -EINVAL, "irq: bad size '%s' (at most %lu)",
				      size, PAGE_SIZE);
	if (strcmp(mode, "hard") && strcmp(mode, "soft"))
		return tw_reply_error(r, -EINVAL, "irq: mode '%s' is not hard or soft",
				      mode);
	irq->soft = !strcmp(mode, "soft");
	if (tmo && kstrtouint(tmo, 10, timeout_ms))
		return tw_reply_error(r, -EINVAL, "irq: bad timeout '%s'", tmo);
	return 0;
}

static int tw_cmd_irq(struct tw_file *tf, char *args)
{
	unsigned int cpu, timeout_ms = TW_IRQ_TIMEOUT_MS;
	struct tw_irq *irq;
	long left;
	int err;

	irq = kzalloc(sizeof(*irq), GFP_KERNEL);
	if (!irq)
		return tw_reply_error(&tf->reply, -ENOMEM, "irq: out of memory");
	err = tw_irq_parse(args, irq, &cpu, &timeout_ms, &tf->reply);
	if (err)
		goto out;
	init_completion(&irq->done);
#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 13, 0)
	hrtimer_setup(&irq->timer, tw_irq_fire, CLOCK_MONOTONIC, tw_irq_mode(irq));
#else
	hrtimer_init(&irq->timer, CLOCK_MONOTONIC, tw_irq_mode(irq));
	irq->timer.function = tw_irq_fire;
#endif
	err = smp_call_function_single(cpu, tw_irq_arm, irq, 1);
	if (err) {
		tw_reply_error(&tf->reply, err, "irq: cannot arm a timer on cpu %u", cpu);
		goto out;
	}
	left = wait_for_completion_interruptible_timeout(&irq->done,
							 msecs_to_jiffies(timeout_ms));
	hrtimer_cancel(&irq->timer);
	if (left <= 0) {
		err = left ? (int)left : -ETIMEDOUT;
		tw_reply_error(&tf->reply, err, "irq: %u of %u hits in %u fires",
			       irq->hits, irq->want, irq->fires);
		goto out;
	}
	tw_reply_set(&tf->reply, "hits=%u fires=%u failed=%u\n", irq->hits,
		     irq->fires, irq->failed);
out:
	kfree(irq);
	return err;
}

static const struct {
	const char *name;
	int (*fn)(struct tw_file *tf, char *args);
} tw_cmds[] = {
	{ "run", tw_cmd_run },
	{ "spawn", tw_cmd_spawn },
	{ "start", tw_cmd_start },
	{ "wait", tw_cmd_wait },
	{ "stop", tw_cmd_stop },
	{ "free", tw_cmd_free },
	{ "irq", tw_cmd_irq },
};

static int tw_dispatch(struct tw_file *tf, size_t len)
{
	char *args = tf->cmd, *verb;
	size_t i;

	if (strlen(tf->cmd) != len)
		return tw_reply_error(&tf->reply, -EINVAL,
				      "command contains a NUL byte");
	verb = tw_next_token(&args);
	if (!verb)
		return tw_reply_error(&tf->reply, -EINVAL, "empty command");
	for (i = 0; i < ARRAY_SIZE(tw_cmds); i++)
		if (!strcmp(verb, tw_cmds[i].name))
			return tw_cmds[i].fn(tf, args);
	return tw_reply_error(&tf->reply, -EINVAL, "unknown command '%s'",
			      verb);
}

static ssize_t tw_write(struct file *file, const char __user *ubuf,
			size_t len, loff_t *ppos)
{
	struct tw_file *tf = file->private_data;
	int err;

	if (test_and_set_bit_lock(TW_FILE_BUSY, &tf->flags))
		return -EBUSY;
	if (!len || len > TW_CMD_MAX) {
		err = tw_reply_error(&tf->reply, -EINVAL,
				     "a command is 1..%d bytes, not %zu",
				     TW_CMD_MAX, len);
	} else if (copy_from_user(tf->cmd, ubuf, len)) {
		err = tw_reply_error(&tf->reply, -EFAULT, "bad buffer");
	} else {
		tf->cmd[len] = '\0';
		err = tw_dispatch(tf, len);
	}
	*ppos = 0;
	clear_bit_unlock(TW_FILE_BUSY, &tf->flags);
	return err ? err : (ssize_t)len;
}

static ssize_t tw_read(struct file *file, char __user *ubuf, size_t len,
		       loff_t *ppos)
{
	struct tw_file *tf = file->private_data;
	ssize_t ret;

	if (test_and_set_bit_lock(TW_FILE_BUSY, &tf->flags))
		return -EBUSY;
	ret = simple_read_from_buffer(ubuf, len, ppos, tf->reply.buf,
				      tf->reply.len);
	clear_bit_unlock(TW_FILE_BUSY, &tf->flags);
	return ret;
}

static int tw_open(struct inode *inode, struct file *file)
{
	struct tw_file *tf;
	int err;

	tf = kzalloc(sizeof(*tf), GFP_KERNEL);
	if (!tf)
		return -ENOMEM;
	tw_work_init(&tf->work);
	err = tw_held_alloc(&tf->work.held, tw_max_blocks);
	if (err) {
		kfree(tf);
		return err;
	}
	file->private_data = tf;
	return 0;
}

/* Close frees what run left held; those kfree calls are in no tally. */
static int tw_release(struct inode *inode, struct file *file)
{
	struct tw_file *tf = file->private_data;
	struct tw_tally scratch = {};

	tw_held_release(&tf->work.held, &scratch);
	tw_held_destroy(&tf->work.held);
	mutex_destroy(&tf->work.lock);
	kfree(tf);
	return 0;
}

static const struct file_operations tw_fops = {
	.owner = THIS_MODULE,
	.open = tw_open,
	.release = tw_release,
	.read = tw_read,
	.write = tw_write,
	.llseek = default_llseek,
};

static struct miscdevice tw_miscdev = {
	.minor = MISC_DYNAMIC_MINOR,
	.name = "tracer_workload",
	.fops = &tw_fops,
	.mode = 0600,
};

static int __init tw_init(void)
{
	int err;

	if (!tw_max_blocks || tw_max_blocks > (1U << 26)) {
		pr_err("max_blocks must be 1..%u\n", 1U << 26);
		return -EINVAL;
	}
	err = tw_ops_init();
	if (err)
		return err;
	err = misc_register(&tw_miscdev);
	if (err)
		tw_ops_exit();
	return err;
}

static void __exit tw_exit(void)
{
	/* No file is open (each holds a module reference), so no command runs. */
	misc_deregister(&tw_miscdev);
	tw_jobs_stop_all();
	tw_ops_exit();
}

module_init(tw_init);
module_exit(tw_exit);

MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("Test workload with exact kmalloc/kfree/schedule/semaphore/mutex call counts");
