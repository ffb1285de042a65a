// SPDX-License-Identifier: GPL-2.0
/*
 * tm-forkbomb: the research's user-space fault, unbounded process creation
 * with heavy memory allocation. Built static on the host, run in the guest.
 *
 *   tm-forkbomb [--seconds S] [--max N] [--mib M] [--delay-ms D] [--linear | --hog]
 *               [--daemon] [--sid-file PATH]
 *
 * Every process keeps forking, and every child first allocates M MiB
 * (default 16) and touches each page, then forks on its own: the number of
 * processes grows exponentially until memory, the pid space or N runs out.
 * With --linear only the first process forks (its children allocate, touch
 * and wait), so processes and memory grow at a steady rate: one every D ms.
 * Each process waits D ms (default 0) between forks. After S seconds
 * (default 60) every process exits, so the bomb is bounded in time; N
 * (default 0: no limit) bounds the number of processes created.
 * With --hog it is a memory bomb instead: the one process forks nothing and
 * allocates and touches M MiB every D ms, keeping all of it.
 *
 * It puts itself in its own session (setsid), so the whole bomb is killed with
 * `kill -KILL -SID`, and asks the OOM killer to take its processes first
 * (oom_score_adj 1000) so that the guest's own services survive.
 * With --daemon it detaches, prints the session id and returns at once;
 * --sid-file appends the session id to PATH before the first fork.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static double now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void usage(void)
{
	fputs("usage: tm-forkbomb [--seconds S] [--max N] [--mib M] [--delay-ms D]"
	      " [--linear | --hog] [--daemon] [--sid-file PATH]\n", stderr);
	exit(2);
}

static long number(const char *s)
{
	char *end;
	long v;

	errno = 0;
	v = strtol(s, &end, 10);
	if (errno || *end || v < 0)
		usage();
	return v;
}

static void touch_memory(size_t mib)
{
	size_t size = mib << 20;
	char *p;

	if (!size)
		return;
	p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (p == MAP_FAILED)
		return;
	for (size_t i = 0; i < size; i += 4096)
		p[i] = (char)(i >> 12) | 1;  /* non-zero: no zero-page sharing */
}

int main(int argc, char **argv)
{
	double seconds = 60, deadline;
	long max = 0, mib = 16, delay_ms = 0;
	int daemon = 0, linear = 0, hog = 0, fd;
	const char *sid_file = NULL;
	atomic_long *created;

	for (int i = 1; i < argc; i++) {
		if (!strcmp(argv[i], "--daemon"))
			daemon = 1;
		else if (!strcmp(argv[i], "--linear"))
			linear = 1;
		else if (!strcmp(argv[i], "--hog"))
			hog = 1;
		else if (i + 1 >= argc)
			usage();
		else if (!strcmp(argv[i], "--seconds"))
			seconds = (double)number(argv[++i]);
		else if (!strcmp(argv[i], "--max"))
			max = number(argv[++i]);
		else if (!strcmp(argv[i], "--mib"))
			mib = number(argv[++i]);
		else if (!strcmp(argv[i], "--sid-file"))
			sid_file = argv[++i];
		else if (!strcmp(argv[i], "--delay-ms"))
			delay_ms = number(argv[++i]);
		else
			usage();
	}

	if (daemon) {
		int ready[2];
		pid_t pid;
		char c;

		if (pipe(ready))
			return 1;
		pid = fork();
		if (pid < 0)
			return 1;
		if (pid > 0) {
			close(ready[1]);
			if (read(ready[0], &c, 1) != 1)
				return 1;
			printf("%d\n", (int)pid);
			return 0;
		}
		close(ready[0]);
		if (setsid() < 0)
			return 1;
		fd = open("/dev/null", O_RDWR);
		dup2(fd, 0);
		dup2(fd, 1);
		dup2(fd, 2);
		if (fd > 2)
			close(fd);
		if (sid_file) {
			FILE *f = fopen(sid_file, "a");

			if (!f)
				return 1;
			fprintf(f, "%d\n", (int)getsid(0));
			fclose(f);
		}
		if (write(ready[1], "r", 1) != 1)
			return 1;
		close(ready[1]);
	} else if (getsid(0) != getpid()) {
		setsid();
	}

	fd = open("/proc/self/oom_score_adj", O_WRONLY);
	if (fd >= 0) {
		if (write(fd, "1000", 4) < 0)
			perror("oom_score_adj");
		close(fd);
	}
	signal(SIGCHLD, SIG_IGN);  /* children are reaped by the kernel */

	created = mmap(NULL, sizeof(*created), PROT_READ | PROT_WRITE,
		       MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	if (created == MAP_FAILED)
		return 1;
	atomic_store(created, 1);
	deadline = now() + seconds;

	while (now() < deadline) {
		pid_t pid;

		if (hog) {
			touch_memory((size_t)mib);
			usleep((useconds_t)delay_ms * 1000);
			continue;
		}
		if (max && atomic_load(created) >= max)
			break;
		pid = fork();
		if (pid == 0) {
			atomic_fetch_add(created, 1);
			touch_memory((size_t)mib);
			if (linear)
				break;
		} else if (pid < 0) {
			usleep(10000);  /* out of pids or memory: keep pressing */
		}
		if (delay_ms)
			usleep((useconds_t)delay_ms * 1000);
	}
	while (now() < deadline)
		usleep(100000);
	return 0;
}
