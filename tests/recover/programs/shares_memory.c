/* A process and a child that shares its memory (clone with CLONE_VM, not a thread):
 * CRIU cannot rebuild that, and recovery must say so. Both wait in pause(). */
#define _GNU_SOURCE
#include <sched.h>
#include <signal.h>
#include <stdlib.h>
#include <unistd.h>

static int child(void *unused)
{
	(void)unused;
	for (;;)
		pause();
	return 0;
}

int main(void)
{
	size_t size = 1 << 16;
	char *stack = malloc(size);

	if (!stack || clone(child, stack + size, CLONE_VM | SIGCHLD, NULL) < 0)
		return 1;
	for (;;)
		pause();
}
