/* SPDX-License-Identifier: BSD-3-Clause */
/*
 * libxl-tap: drives libblktapctl.so.0 the way OpenXT's libxl (libxl_blktap3.c with the
 * meta-blktap3 Xen patches) does for a vbd3 disk. Built on the host by scripts/xen-e2e.sh
 * against include/blktap/tap-ctl.h and linked with -lblktapctl; used by the libxl-capi test.
 *
 *   libxl-tap create TYPE PATH [ro]
 *       libxl__blktap_devpath(): tap_ctl_find_minor(TYPE, PATH); when no tapdisk serves
 *       the image, tap_ctl_create("TYPE:PATH", &devname, flags, -1, NULL, 0) with flags
 *       TAPDISK_MESSAGE_FLAG_RDONLY for "ro" (access=ro disks), else 0.
 *       Prints "created minor=M pid=P devname=D" or "existing minor=M pid=P".
 *   libxl-tap destroy TYPE:PATH
 *       libxl__device_destroy_tapdisk(): splits the tapdisk-params value at the first ':',
 *       tap_ctl_find_minor(TYPE, PATH), the serving pid from tap_ctl_list(), then
 *       tap_ctl_destroy(pid, minor, 0, NULL). Prints "destroyed minor=M pid=P".
 * Exit status 0, or 1 with "libxl-tap: ..." on stderr.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <list.h>
#include <tap-ctl.h>

/* The pid of the tapdisk serving @minor (from tap_ctl_list, as libxl walks it), or -1. */
static int pid_of_minor(int minor)
{
	struct list_head list = LIST_HEAD_INIT(list);
	tap_list_t *entry, *next;
	int err, pid = -1;

	err = tap_ctl_list(&list);
	if (err) {
		fprintf(stderr, "libxl-tap: tap_ctl_list: %s\n", strerror(-err));
		return -1;
	}
	tap_list_for_each_entry_safe(entry, next, &list)
		if (entry->minor == minor && entry->pid > 0)
			pid = entry->pid;
	tap_ctl_list_free(&list);
	return pid;
}

static int do_create(const char *type, const char *path, int ro)
{
	char *params, *devname = NULL;
	int minor, err;

	minor = tap_ctl_find_minor(type, path);
	if (minor >= 0) {
		printf("existing minor=%d pid=%d\n", minor, pid_of_minor(minor));
		return 0;
	}
	if (minor != -ENOENT) {
		fprintf(stderr, "libxl-tap: tap_ctl_find_minor: %s\n", strerror(-minor));
		return 1;
	}
	if (asprintf(&params, "%s:%s", type, path) < 0)
		return 1;
	err = tap_ctl_create(params, &devname, ro ? TAPDISK_MESSAGE_FLAG_RDONLY : 0, -1, NULL, 0);
	free(params);
	if (err) {
		fprintf(stderr, "libxl-tap: tap_ctl_create: %s\n", strerror(-err));
		return 1;
	}
	minor = tap_ctl_find_minor(type, path);
	if (minor < 0) {
		fprintf(stderr, "libxl-tap: created, but tap_ctl_find_minor: %s\n", strerror(-minor));
		free(devname);
		return 1;
	}
	printf("created minor=%d pid=%d devname=%s\n", minor, pid_of_minor(minor), devname);
	free(devname);
	return 0;
}

static int do_destroy(const char *params)
{
	const char *colon = strchr(params, ':');
	char *type;
	int minor, pid, err;

	if (!colon) {
		fprintf(stderr, "libxl-tap: tapdisk-params '%s' has no type\n", params);
		return 1;
	}
	type = strndup(params, (size_t)(colon - params));
	if (!type)
		return 1;
	minor = tap_ctl_find_minor(type, colon + 1);
	free(type);
	if (minor < 0) {
		fprintf(stderr, "libxl-tap: tap_ctl_find_minor: %s\n", strerror(-minor));
		return 1;
	}
	pid = pid_of_minor(minor);
	if (pid < 0) {
		fprintf(stderr, "libxl-tap: no tapdisk serves minor %d\n", minor);
		return 1;
	}
	err = tap_ctl_destroy(pid, minor, 0, NULL);
	if (err) {
		fprintf(stderr, "libxl-tap: tap_ctl_destroy: %s\n", strerror(-err));
		return 1;
	}
	printf("destroyed minor=%d pid=%d\n", minor, pid);
	return 0;
}

int main(int argc, char **argv)
{
	if (argc >= 4 && argc <= 5 && !strcmp(argv[1], "create"))
		return do_create(argv[2], argv[3], argc == 5 && !strcmp(argv[4], "ro"));
	if (argc == 3 && !strcmp(argv[1], "destroy"))
		return do_destroy(argv[2]);
	fprintf(stderr, "usage: libxl-tap create TYPE PATH [ro] | destroy TYPE:PATH\n");
	return 1;
}
