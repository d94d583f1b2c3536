/* SPDX-License-Identifier: BSD-3-Clause */
/*
 * A stand-in for /usr/bin/tapback in tests/hotplug/run.sh: daemonises the way tapback does
 * (the parent returns once the daemon wrote its pid file, or fails with the daemon's
 * error), appends "start <pid> <args>" to $STANDIN_LOG, and on SIGTERM removes its pid file
 * and exits. Being a real executable named tapback, start-stop-daemon matches it by --exec
 * and by --name as it matches the real one.
 *
 *   tapback [-d] [-v] [-b] [-n NAME] [-x DOMID] -p PIDFILE
 * Environment: STANDIN_LOG (required), STANDIN_EXIT_DELAY_MS (delay between SIGTERM and
 * the exit), STANDIN_IGNORE_TERM=1 (ignore SIGTERM), STANDIN_FAIL=1 (fail start-up).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static volatile sig_atomic_t term;

static void on_term(int sig)
{
	(void)sig;
	term = 1;
}

static void sleep_ms(long ms)
{
	struct timespec ts = { ms / 1000, (ms % 1000) * 1000000L };

	while (nanosleep(&ts, &ts) && errno == EINTR)
		;
}

int main(int argc, char **argv)
{
	const char *pidfile = NULL, *logpath = getenv("STANDIN_LOG");
	char ready;
	int opt, fds[2];
	pid_t pid;
	FILE *f;

	while ((opt = getopt(argc, argv, "dvbn:x:p:")) != -1) {
		switch (opt) {
		case 'p':
			pidfile = optarg;
			break;
		case 'd': case 'v': case 'b': case 'n': case 'x':
			break;
		default:
			return 22;
		}
	}
	if (!pidfile || !logpath) {
		fprintf(stderr, "tapback (stand-in): -p PIDFILE and STANDIN_LOG are required\n");
		return 22;
	}
	if (getenv("STANDIN_FAIL")) {
		fprintf(stderr, "tapback (stand-in): start-up failed as asked\n");
		return 19;
	}
	if (pipe(fds))
		return 1;
	pid = fork();
	if (pid < 0)
		return 1;
	if (pid > 0) {
		close(fds[1]);
		if (read(fds[0], &ready, 1) == 1)
			return 0;
		fprintf(stderr, "tapback (stand-in): the daemon died during start-up\n");
		return 1;
	}
	close(fds[0]);
	setsid();
	if (getenv("STANDIN_IGNORE_TERM"))
		signal(SIGTERM, SIG_IGN);
	else
		signal(SIGTERM, on_term);
	f = fopen(pidfile, "w");
	if (!f || fprintf(f, "%d\n", (int)getpid()) < 0 || fclose(f))
		return 1;
	f = fopen(logpath, "a");
	if (!f)
		return 1;
	fprintf(f, "start %d", (int)getpid());
	for (int i = 1; i < argc; i++)
		fprintf(f, " %s", argv[i]);
	fprintf(f, "\n");
	fclose(f);
	if (write(fds[1], "r", 1) != 1)
		return 1;
	close(fds[1]);
	if (!freopen("/dev/null", "r", stdin) || !freopen("/dev/null", "w", stdout) ||
	    !freopen("/dev/null", "w", stderr))
		return 1;
	while (!term)
		pause();
	if (getenv("STANDIN_EXIT_DELAY_MS"))
		sleep_ms(atol(getenv("STANDIN_EXIT_DELAY_MS")));
	unlink(pidfile);
	return 0;
}
