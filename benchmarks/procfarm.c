// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * procfarm: real processes making real TCP connect attempts, for tcpmon's benchmarks.
 * Run it inside a network namespace of its own (`unshare -n procfarm ...`): it
 * brings that namespace's loopback up, and every connect goes to 127.0.0.1 there.
 *
 *   procfarm hold N PREFIX NCOMMS
 *       forks N children; child i names itself PREFIX<i % NCOMMS>, makes one
 *       connect attempt (refused: nothing listens on the port) and waits.
 *       Prints {"pids": [...], "errors": E} once all have connected, then keeps
 *       them alive until its stdin reaches a newline or EOF.
 *
 *   procfarm churn TOTAL BATCH COMM REUSE REUSECOMM
 *       forks TOTAL short-lived children, BATCH at a time: each names itself
 *       COMM, makes one connect attempt and exits.  Then, for up to REUSE of
 *       their (dead) PIDs, steers the kernel into handing that PID to a new
 *       child (kernel.ns_last_pid) that names itself REUSECOMM, connects once
 *       and waits.  Prints {"forked", "errors", "distinct_pids", "reused": [...]}
 *       and keeps the reused children alive until stdin reaches a newline or EOF.
 *
 *   procfarm loop COUNT SECONDS refused|accept|mixed [COMM]
 *       a tight connect loop in this process (named COMM if given): up to COUNT attempts or SECONDS,
 *       whichever ends first.  refused: to a port nobody listens on (SYN, RST);
 *       accept: full handshakes with a listener it accepts from, closed with RST
 *       (no TIME_WAIT); mixed: accept and refused in turn (even attempts accepted).
 *       The ports are fixed, LISTEN_PORT and CLOSED_PORT, below the ephemeral range, so that
 *       tcpmon --destinations counts them (it skips ephemeral remote ports).  Prints {"connects": N, "seconds": S, "cpu_seconds": C, "errors": E}: C is
 *       this process's user + system time (the scheduler's exact run time, softirq work done on its
 *       behalf included), which a busy machine's other tasks do not inflate.
 *
 *   procfarm stream SECONDS EVERY [refused|accept]
 *       a connect loop for SECONDS, noting (CLOCK_MONOTONIC ns, this thread's CPU ns, attempts so
 *       far) every EVERY attempts; prints {"records": [[t, cpu, n], ...], "errors": E}.  refused
 *       (the default): to a closed port; accept: full handshakes as in `loop ... accept`.
 *       The benchmark attaches and detaches the probe on a schedule meanwhile, and compares the CPU
 *       per attempt of the stretches with and without it.
 *
 * A child that fails its connect exits (or reports) an error; nothing here
 * talks to any address but 127.0.0.1 inside the namespace.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <net/if.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static void die(const char *what)
{
	fprintf(stderr, "procfarm: %s: %s\n", what, strerror(errno));
	exit(2);
}

static void loopback_up(void)
{
	struct ifreq ifr;
	int fd = socket(AF_INET, SOCK_DGRAM, 0);

	if (fd < 0)
		die("socket");
	memset(&ifr, 0, sizeof(ifr));
	strcpy(ifr.ifr_name, "lo");
	if (ioctl(fd, SIOCGIFFLAGS, &ifr) < 0)
		die("SIOCGIFFLAGS lo");
	ifr.ifr_flags |= IFF_UP;
	if (ioctl(fd, SIOCSIFFLAGS, &ifr) < 0)
		die("SIOCSIFFLAGS lo");
	close(fd);
}

/* A loopback port with a socket bound to it but not listening: connects get RST. */
static int closed_port(int *holder)
{
	struct sockaddr_in addr = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
	socklen_t len = sizeof(addr);
	int fd = socket(AF_INET, SOCK_STREAM, 0);

	if (fd < 0 || bind(fd, (struct sockaddr *)&addr, sizeof(addr)) < 0 ||
	    getsockname(fd, (struct sockaddr *)&addr, &len) < 0)
		die("bind closed port");
	*holder = fd;
	return ntohs(addr.sin_port);
}

/* Fixed ports of `loop` (the namespace is its own: nothing else holds them). */
#define LISTEN_PORT 5001
#define CLOSED_PORT 5002

/* A socket bound to 127.0.0.1:port, listening if `backlog` > 0. */
static int bound_socket(int port, int backlog)
{
	struct sockaddr_in addr = { .sin_family = AF_INET, .sin_port = htons(port),
				    .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
	int fd = socket(AF_INET, SOCK_STREAM, 0);

	if (fd < 0 || bind(fd, (struct sockaddr *)&addr, sizeof(addr)) < 0 || (backlog && listen(fd, backlog) < 0))
		die("bind fixed port");
	return fd;
}

/* One connect attempt that the peer refuses: 0 when it went as expected. */
static int connect_refused(int port)
{
	struct sockaddr_in addr = { .sin_family = AF_INET, .sin_port = htons(port),
				    .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
	int fd = socket(AF_INET, SOCK_STREAM, 0), ok;

	if (fd < 0)
		return -1;
	ok = connect(fd, (struct sockaddr *)&addr, sizeof(addr)) < 0 && errno == ECONNREFUSED;
	close(fd);
	return ok ? 0 : -1;
}

static void set_comm(const char *comm)
{
	if (prctl(PR_SET_NAME, comm, 0, 0, 0) < 0)
		die("PR_SET_NAME");
}

static void wait_stdin(void)
{
	char c;

	while (read(0, &c, 1) == 1 && c != '\n')
		;
}

static void print_pids(const pid_t *pids, int n)
{
	for (int i = 0; i < n; i++)
		printf("%s%d", i ? "," : "", pids[i]);
}

/* Child side of hold and reuse: name, connect, report one byte, wait for the release pipe to close. */
static void child_connect_and_wait(const char *comm, int port, int ready_fd, int release_fd)
{
	char status;
	char c;

	prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0);
	set_comm(comm);
	status = connect_refused(port) == 0 ? 'o' : 'e';
	if (write(ready_fd, &status, 1) != 1)
		_exit(1);
	while (read(release_fd, &c, 1) < 0 && errno == EINTR)
		;
	_exit(0);
}

static int cmd_hold(int n, const char *prefix, int ncomms)
{
	int ready[2], release[2], holder, port, errors = 0;
	pid_t *pids = calloc(n, sizeof(*pids));

	if (!pids || pipe(ready) < 0 || pipe(release) < 0)
		die("setup");
	port = closed_port(&holder);
	for (int i = 0; i < n; i++) {
		pids[i] = fork();
		if (pids[i] < 0)
			die("fork");
		if (pids[i] == 0) {
			char comm[16];

			close(ready[0]);
			close(release[1]);
			snprintf(comm, sizeof(comm), "%s%d", prefix, i % ncomms);
			child_connect_and_wait(comm, port, ready[1], release[0]);
		}
	}
	close(ready[1]);
	close(release[0]);
	for (int got = 0; got < n;) {
		char buf[4096];
		ssize_t r = read(ready[0], buf, sizeof(buf));

		if (r <= 0)
			die("children died before connecting");
		for (ssize_t i = 0; i < r; i++)
			errors += buf[i] != 'o';
		got += r;
	}
	printf("{\"pids\": [");
	print_pids(pids, n);
	printf("], \"errors\": %d}\n", errors);
	fflush(stdout);
	wait_stdin();
	close(release[1]);
	for (int i = 0; i < n; i++)
		waitpid(pids[i], NULL, 0);
	return 0;
}

static int cmp_pid(const void *a, const void *b)
{
	return *(const pid_t *)a - *(const pid_t *)b;
}

static int set_last_pid(pid_t pid)
{
	char text[16];
	int fd = open("/proc/sys/kernel/ns_last_pid", O_WRONLY), n, ok;

	if (fd < 0)
		return -1;
	n = snprintf(text, sizeof(text), "%d", pid);
	ok = write(fd, text, n) == n;
	close(fd);
	return ok ? 0 : -1;
}

static int cmd_churn(int total, int batch, const char *comm, int reuse, const char *reuse_comm)
{
	int holder, port = closed_port(&holder), errors = 0, distinct = 0, nreused = 0;
	pid_t *pids = calloc(total, sizeof(*pids)), *sorted = calloc(total, sizeof(*pids));
	pid_t *reused = calloc(reuse ? reuse : 1, sizeof(*pids));
	int ready[2], release[2];

	if (!pids || !sorted || !reused || pipe(ready) < 0 || pipe(release) < 0)
		die("setup");
	for (int done = 0; done < total; done += batch) {
		int n = total - done < batch ? total - done : batch;

		for (int i = 0; i < n; i++) {
			pid_t pid = fork();

			if (pid < 0)
				die("fork");
			if (pid == 0) {
				set_comm(comm);
				_exit(connect_refused(port) == 0 ? 0 : 1);
			}
			pids[done + i] = pid;
		}
		for (int i = 0; i < n; i++) {
			int status;

			if (waitpid(pids[done + i], &status, 0) < 0 || !WIFEXITED(status) || WEXITSTATUS(status))
				errors++;
		}
	}
	memcpy(sorted, pids, total * sizeof(*pids));
	qsort(sorted, total, sizeof(*sorted), cmp_pid);
	for (int i = 0; i < total; i++)
		distinct += i == 0 || sorted[i] != sorted[i - 1];

	/* Hand dead churn PIDs to new processes: the oldest first (the first batch). */
	for (int i = 0; i < total && nreused < reuse; i++) {
		pid_t want = pids[i], got;
		int already = 0;

		for (int j = 0; j < nreused; j++)
			already |= reused[j] == want;
		if (already || want <= 300)
			continue;
		if (set_last_pid(want - 1) < 0)
			die("write /proc/sys/kernel/ns_last_pid");
		got = fork();
		if (got < 0)
			die("fork");
		if (got == 0) {
			if (getpid() != want)
				_exit(0); /* another process took the PID first: try the next one */
			close(ready[0]);
			close(release[1]);
			child_connect_and_wait(reuse_comm, port, ready[1], release[0]);
		}
		if (got != want) {
			waitpid(got, NULL, 0);
			continue;
		}
		reused[nreused++] = got;
		char status;

		if (read(ready[0], &status, 1) != 1)
			die("reused child died");
		errors += status != 'o';
	}
	close(ready[1]);
	close(release[0]);
	printf("{\"forked\": %d, \"errors\": %d, \"distinct_pids\": %d, \"reused\": [", total, errors, distinct);
	print_pids(reused, nreused);
	printf("]}\n");
	fflush(stdout);
	wait_stdin();
	close(release[1]);
	for (int i = 0; i < nreused; i++)
		waitpid(reused[i], NULL, 0);
	return 0;
}

static double now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static double cpu_seconds(void)
{
	struct rusage ru;

	getrusage(RUSAGE_SELF, &ru);
	return ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6;
}

/* One full handshake with `listener` (on `addr`), both ends closed with RST: 0, or -1. */
static int connect_accepted(int listener, const struct sockaddr_in *addr)
{
	struct linger rst = { .l_onoff = 1, .l_linger = 0 };
	int fd = socket(AF_INET, SOCK_STREAM, 0), peer;

	if (fd < 0 || connect(fd, (const struct sockaddr *)addr, sizeof(*addr)) < 0)
		die("connect");
	peer = accept(listener, NULL, NULL);
	if (peer < 0)
		die("accept");
	setsockopt(fd, SOL_SOCKET, SO_LINGER, &rst, sizeof(rst));
	close(fd);
	close(peer);
	return 0;
}

static int cmd_loop(long count, double seconds, const char *mode, const char *comm)
{
	struct sockaddr_in addr = { .sin_family = AF_INET, .sin_port = htons(LISTEN_PORT),
				    .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
	int accept_every = strcmp(mode, "accept") == 0 ? 1 : strcmp(mode, "mixed") == 0 ? 2 : 0;
	int listener = -1;
	long done = 0, errors = 0;
	double start, end, cpu_start;

	if (!accept_every && strcmp(mode, "refused") != 0) {
		fprintf(stderr, "procfarm: loop mode %s: use refused, accept or mixed\n", mode);
		return 2;
	}
	if (comm)
		set_comm(comm);
	if (accept_every)
		listener = bound_socket(LISTEN_PORT, 128);
	bound_socket(CLOSED_PORT, 0);
	cpu_start = cpu_seconds();
	start = now();
	end = start + seconds;
	while (done < count) {
		/* the clock is read every 64 attempts: cheap enough to vanish in the loop */
		if ((done & 63) == 0 && now() >= end)
			break;
		if (accept_every && done % accept_every == 0)
			errors += connect_accepted(listener, &addr) < 0;
		else
			errors += connect_refused(CLOSED_PORT) < 0;
		done++;
	}
	end = now();
	printf("{\"connects\": %ld, \"seconds\": %.6f, \"cpu_seconds\": %.6f, \"errors\": %ld}\n", done, end - start,
	       cpu_seconds() - cpu_start, errors);
	return 0;
}

static long long clock_ns(clockid_t id)
{
	struct timespec ts;

	clock_gettime(id, &ts);
	return ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static int cmd_stream(double seconds, long every, const char *mode)
{
	long long end = clock_ns(CLOCK_MONOTONIC) + (long long)(seconds * 1e9), (*records)[3] = NULL;
	long done = 0, errors = 0, n = 0, capacity = 0;
	int holder, port = closed_port(&holder), listener = -1;
	struct sockaddr_in addr = { .sin_family = AF_INET, .sin_port = htons(LISTEN_PORT),
				    .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };

	if (strcmp(mode, "accept") == 0) {
		listener = bound_socket(LISTEN_PORT, 128);
	} else if (strcmp(mode, "refused") != 0) {
		fprintf(stderr, "procfarm: stream mode %s: use refused or accept\n", mode);
		return 2;
	}

	for (;;) {
		if (done % every == 0) {
			long long t = clock_ns(CLOCK_MONOTONIC);

			if (n == capacity) {
				capacity = capacity ? 2 * capacity : 4096;
				records = realloc(records, capacity * sizeof(*records));
				if (!records)
					die("realloc");
			}
			records[n][0] = t;
			records[n][1] = clock_ns(CLOCK_THREAD_CPUTIME_ID);
			records[n][2] = done;
			n++;
			if (t >= end)
				break;
		}
		if ((listener >= 0 ? connect_accepted(listener, &addr) : connect_refused(port)) < 0)
			errors++;
		done++;
	}
	printf("{\"records\": [");
	for (long i = 0; i < n; i++)
		printf("%s[%lld,%lld,%lld]", i ? "," : "", records[i][0], records[i][1], records[i][2]);
	printf("], \"errors\": %ld}\n", errors);
	return 0;
}

int main(int argc, char **argv)
{
	setvbuf(stdout, NULL, _IOFBF, 1 << 20);
	if (argc < 2)
		goto usage;
	loopback_up();
	if (strcmp(argv[1], "hold") == 0 && argc == 5)
		return cmd_hold(atoi(argv[2]), argv[3], atoi(argv[4]));
	if (strcmp(argv[1], "churn") == 0 && argc == 7)
		return cmd_churn(atoi(argv[2]), atoi(argv[3]), argv[4], atoi(argv[5]), argv[6]);
	if (strcmp(argv[1], "stream") == 0 && (argc == 4 || argc == 5))
		return cmd_stream(atof(argv[2]), atol(argv[3]), argc == 5 ? argv[4] : "refused");
	if (strcmp(argv[1], "loop") == 0 && (argc == 5 || argc == 6))
		return cmd_loop(atol(argv[2]), atof(argv[3]), argv[4], argc == 6 ? argv[5] : NULL);
usage:
	fprintf(stderr, "usage: procfarm hold N PREFIX NCOMMS | churn TOTAL BATCH COMM REUSE REUSECOMM |"
		" loop COUNT SECONDS refused|accept|mixed [COMM] | stream SECONDS EVERY [refused|accept]\n");
	return 2;
}
