// SPDX-License-Identifier: GPL-2.0
/*
 * One process, N threads, each hammering /dev/tracer_workload with "run"
 * commands for S seconds; prints the sum of the module's tallies.
 *
 * Between "ready" and the final SIGSTOP the process makes no system call
 * that kmallocs, kfrees, takes a mutex or a semaphore except the module's
 * own work: the threads only write() and pread() the device, and the main
 * thread waits in sigwait() and on barriers; no thread exits. So the exporter's numbers
 * for those calls must equal the tallies exactly. schedule() is not
 * compared: the threads' futex waits call it too.
 *
 * usage: hammer THREADS SECONDS OPS...
 *   prints "ready" once every thread waits, then waits for SIGUSR1;
 *   after the work, with every thread still alive, it stops itself
 *   (SIGSTOP); on SIGCONT the threads exit and it prints the tally.
 */
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define FIELDS 10

static const char *const names[FIELDS] = {
	"kmalloc", "kmalloc_bytes", "kfree", "kfree_bytes", "sched",
	"up", "down", "lock", "unlock", "held",
};

struct worker {
	pthread_t thread;
	int fd;
	long long tally[FIELDS];
	long runs;
	int failed;
};

static pthread_barrier_t warm_line, start_line, finish_line, exit_line;
static struct timespec deadline;
static char command[512];
static size_t command_len;

static int past_deadline(void)
{
	struct timespec now;

	clock_gettime(CLOCK_MONOTONIC, &now);	/* vDSO: no system call */
	return now.tv_sec > deadline.tv_sec ||
	       (now.tv_sec == deadline.tv_sec && now.tv_nsec >= deadline.tv_nsec);
}

/* Adds one "kmalloc=1 kmalloc_bytes=2 ..." reply to t; 0 on success. */
static int add_reply(long long *t, char *reply)
{
	char *tok, *save = NULL;
	int seen = 0;

	for (tok = strtok_r(reply, " \n", &save); tok;
	     tok = strtok_r(NULL, " \n", &save)) {
		char *eq = strchr(tok, '=');
		int i;

		if (!eq)
			return -1;
		*eq = '\0';
		for (i = 0; i < FIELDS; i++) {
			if (!strcmp(tok, names[i])) {
				t[i] += atoll(eq + 1);
				seen++;
			}
		}
	}
	return seen == FIELDS ? 0 : -1;
}

/* One command and its reply, added to t; 0 on success. */
static int run_once(struct worker *w, long long *t)
{
	char reply[512];
	ssize_t n;

	if (write(w->fd, command, command_len) != (ssize_t)command_len)
		return -1;
	n = pread(w->fd, reply, sizeof(reply) - 1, 0);
	if (n <= 0)
		return -1;
	reply[n] = '\0';
	return add_reply(t, reply);
}

static void *work(void *arg)
{
	struct worker *w = arg;
	long long warm[FIELDS] = { 0 };

	/*
	 * One untracked run first: every page of the loop's code is then
	 * resident (and locked by main), so no page fault inside the window
	 * reads from disk, which would take mutexes.
	 */
	w->failed = run_once(w, warm) != 0;
	pthread_barrier_wait(&warm_line);
	pthread_barrier_wait(&start_line);
	while (!w->failed && !past_deadline()) {
		if (run_once(w, w->tally)) {
			w->failed = 1;
			break;
		}
		w->runs++;
	}
	pthread_barrier_wait(&finish_line);
	/* A thread's exit takes mutexes: exit only after the test has read. */
	pthread_barrier_wait(&exit_line);
	return NULL;
}

int main(int argc, char **argv)
{
	struct worker *workers;
	long long total[FIELDS] = { 0 };
	long runs = 0;
	int nthreads, seconds, i, j, sig, failed = 0;
	sigset_t set;
	pthread_attr_t attr;

	if (argc < 4) {
		fprintf(stderr, "usage: hammer THREADS SECONDS OPS...\n");
		return 2;
	}
	nthreads = atoi(argv[1]);
	seconds = atoi(argv[2]);
	strcpy(command, "run");
	for (i = 3; i < argc; i++) {
		if (strlen(command) + strlen(argv[i]) + 2 > sizeof(command))
			return 2;
		strcat(command, " ");
		strcat(command, argv[i]);
	}
	command_len = strlen(command);

	sigemptyset(&set);
	sigaddset(&set, SIGUSR1);
	pthread_sigmask(SIG_BLOCK, &set, NULL);	/* inherited by the threads */

	workers = calloc(nthreads, sizeof(*workers));
	/* Small stacks: mlockall() below makes every page of them resident. */
	pthread_attr_init(&attr);
	pthread_attr_setstacksize(&attr, 256 * 1024);
	pthread_barrier_init(&warm_line, NULL, nthreads + 1);
	pthread_barrier_init(&start_line, NULL, nthreads + 1);
	pthread_barrier_init(&finish_line, NULL, nthreads + 1);
	pthread_barrier_init(&exit_line, NULL, nthreads + 1);
	for (i = 0; i < nthreads; i++) {
		workers[i].fd = open("/dev/tracer_workload", O_RDWR);
		if (workers[i].fd < 0) {
			perror("/dev/tracer_workload");
			return 1;
		}
		pthread_create(&workers[i].thread, &attr, work, &workers[i]);
	}
	pthread_barrier_wait(&warm_line);
	if (mlockall(MCL_CURRENT | MCL_FUTURE)) {
		perror("mlockall");
		return 1;
	}
	printf("ready\n");
	fflush(stdout);

	sigwait(&set, &sig);
	clock_gettime(CLOCK_MONOTONIC, &deadline);
	deadline.tv_sec += seconds;
	pthread_barrier_wait(&start_line);
	pthread_barrier_wait(&finish_line);
	raise(SIGSTOP);	/* the test reads the exporter now */
	pthread_barrier_wait(&exit_line);
	for (i = 0; i < nthreads; i++)
		pthread_join(workers[i].thread, NULL);

	for (i = 0; i < nthreads; i++) {
		for (j = 0; j < FIELDS; j++)
			total[j] += workers[i].tally[j];
		runs += workers[i].runs;
		failed |= workers[i].failed;
	}
	for (j = 0; j < FIELDS; j++)
		printf("%s%s=%lld", j ? " " : "", names[j], total[j]);
	printf("\nruns=%ld\n", runs);
	return failed;
}
