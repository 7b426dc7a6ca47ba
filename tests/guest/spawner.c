// SPDX-License-Identifier: GPL-2.0
/*
 * Makes real processes cheaply, for the scrape-cost test: each line "N" on
 * stdin adds N children, then "ok N" (the total) is printed. A child shares
 * the spawner's memory (CLONE_VM without CLONE_THREAD: a process of its own,
 * with no page tables to copy), sleeps, and dies with the spawner.
 */
#define _GNU_SOURCE
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#define STACK_SIZE 4096

static pid_t spawner;

static int child(void *arg)
{
	(void)arg;
	/* Raw syscalls only: the C library's state is the spawner's. */
	syscall(SYS_prctl, PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0);
	if (syscall(SYS_getppid) != spawner)
		syscall(SYS_exit, 0);
	for (;;)
		syscall(SYS_pause);
	return 0;
}

int main(void)
{
	long total = 0, n;
	char line[64];

	spawner = getpid();
	while (fgets(line, sizeof(line), stdin)) {
		n = strtol(line, NULL, 10);
		for (; n > 0; n--, total++) {
			char *stack = malloc(STACK_SIZE);

			if (!stack || clone(child, stack + STACK_SIZE, CLONE_VM | SIGCHLD, NULL) < 0) {
				perror("clone");
				return 1;
			}
		}
		printf("ok %ld\n", total);
		fflush(stdout);
	}
	return 0;
}
