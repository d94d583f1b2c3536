/* SPDX-License-Identifier: BSD-3-Clause */
/*
 * Exercises libblktapctl.so.0 through its public header, the way libxl does.
 * Driven by tests/capi/main.rs; prints "FAIL: ..." and exits 1 on any mismatch.
 *
 *   tap_ctl_test sizes <sizeof tapdisk_message_t>
 *   tap_ctl_test empty
 *   tap_ctl_test live <pid> <minor> <state> <type> <path> <n orphan minors>
 *   tap_ctl_test destroy <pid> <minor>
 *   tap_ctl_test create_fail <type:path> <expected errno>
 *   tap_ctl_test find_device <type> <path>   (needs a real tapdisk; prints "devname <path>")
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>

#include <tap-ctl.h>
#include <list.h>

static int failures;

#define CHECK(cond, ...) do { \
	if (!(cond)) { \
		printf("FAIL: %s:%d: %s: ", __FILE__, __LINE__, #cond); \
		printf(__VA_ARGS__); \
		printf("\n"); \
		failures++; \
	} \
} while (0)

static int count_entries(struct list_head *list)
{
	tap_list_t *entry;
	int n = 0;

	tap_list_for_each_entry(entry, list)
		n++;
	return n;
}

static int test_sizes(int expected)
{
	CHECK((int)sizeof(tapdisk_message_t) == expected, "sizeof %zu", sizeof(tapdisk_message_t));
	CHECK(offsetof(tapdisk_message_t, u.params.path) == (expected == 544 ? 20 : 16),
	      "path @%zu", offsetof(tapdisk_message_t, u.params.path));
	CHECK(TAPDISK_MESSAGE_EXIT == 30, "%d", TAPDISK_MESSAGE_EXIT);
	return 0;
}

static int test_empty(void)
{
	struct list_head list = LIST_HEAD_INIT(list);
	int err;

	err = tap_ctl_list(&list);
	CHECK(err == 0, "tap_ctl_list = %d", err);
	CHECK(list_empty(&list), "list not empty: %d entries", count_entries(&list));
	tap_ctl_list_free(&list);
	CHECK(list_empty(&list), "list not empty after free");

	err = tap_ctl_find_minor("vhd", "/no/such.vhd");
	CHECK(err == -ENOENT, "tap_ctl_find_minor = %d", err);
	err = tap_ctl_find_pid(3);
	CHECK(err == -ENOENT, "tap_ctl_find_pid = %d", err);
	return 0;
}

static int test_live(int pid, int minor, int state, const char *type, const char *path,
		     int orphans)
{
	struct list_head list;
	tap_list_t *entry, *next;
	int err, seen_vbd = 0, seen_orphans = 0, n;

	/* An uninitialised head is fine: tap_ctl_list initialises it. */
	memset(&list, 0xa5, sizeof(list));
	err = tap_ctl_list(&list);
	CHECK(err == 0, "tap_ctl_list = %d", err);

	tap_list_for_each_entry(entry, &list) {
		if (entry->pid == pid && entry->minor == minor) {
			seen_vbd++;
			CHECK(entry->state == state, "state %#x", entry->state);
			CHECK(entry->type && !strcmp(entry->type, type), "type %s",
			      entry->type ? entry->type : "(null)");
			CHECK(entry->path && !strcmp(entry->path, path), "path %s",
			      entry->path ? entry->path : "(null)");
		} else if (entry->pid == -1) {
			seen_orphans++;
			CHECK(entry->minor >= 0, "orphan minor %d", entry->minor);
			CHECK(entry->state == -1, "orphan state %d", entry->state);
			CHECK(entry->type == NULL && entry->path == NULL, "orphan strings");
		} else {
			CHECK(0, "unexpected entry pid %d minor %d", entry->pid, entry->minor);
		}
	}
	CHECK(seen_vbd == 1, "vbd rows %d", seen_vbd);
	CHECK(seen_orphans == orphans, "orphan rows %d", seen_orphans);

	/* libxl's pattern: unlink entries while walking with the _safe macro. */
	n = 0;
	tap_list_for_each_entry_safe(entry, next, &list) {
		if (entry->pid == -1) {
			list_del(&entry->entry);
			free(entry);	/* orphans own no strings */
			n++;
		}
	}
	CHECK(n == orphans, "removed %d", n);
	CHECK(count_entries(&list) == 1, "left %d", count_entries(&list));
	tap_ctl_list_free(&list);
	CHECK(list_empty(&list), "list not empty after free");

	err = tap_ctl_find_minor(type, path);
	CHECK(err == minor, "tap_ctl_find_minor = %d", err);
	err = tap_ctl_find_minor(type, "/other");
	CHECK(err == -ENOENT, "tap_ctl_find_minor(other) = %d", err);
	err = tap_ctl_find_pid(minor);
	CHECK(err == pid, "tap_ctl_find_pid = %d", err);
	err = tap_ctl_get_pid(pid);
	CHECK(err == pid, "tap_ctl_get_pid = %d", err);
	return 0;
}

static int test_destroy(int pid, int minor)
{
	struct timeval tv = { .tv_sec = 5, .tv_usec = 0 };
	int err;

	err = tap_ctl_destroy(pid, minor, 0, &tv);
	CHECK(err == 0, "tap_ctl_destroy = %d", err);
	err = tap_ctl_destroy(pid, -1, 0, NULL);
	CHECK(err == -EINVAL, "tap_ctl_destroy(minor -1) = %d", err);
	return 0;
}

static int test_create_fail(const char *params, int expected)
{
	char *devname = NULL;
	int err;

	err = tap_ctl_create(params, &devname, 0, -1, NULL, 0);
	CHECK(err == -expected, "tap_ctl_create = %d", err);
	CHECK(devname == NULL, "devname set on failure");
	return 0;
}

/* libxl's path for an existing tapdisk: find its minor, then its device, instead of
 * assuming /dev/xen/blktap-2/tapdev<minor>. */
static int test_find_device(const char *type, const char *path)
{
	char params[4096], *created = NULL, *found = NULL, *again = NULL;
	int err, minor, pid;

	snprintf(params, sizeof(params), "%s:%s", type, path);
	err = tap_ctl_create(params, &created, 0, -1, NULL, 0);
	CHECK(err == 0, "tap_ctl_create = %d", err);
	if (err)
		return 0;
	minor = tap_ctl_find_minor(type, path);
	CHECK(minor >= 0, "tap_ctl_find_minor = %d", minor);
	if (minor < 0)
		return 0;
	pid = tap_ctl_find_pid(minor);
	CHECK(pid > 0, "tap_ctl_find_pid = %d", pid);

	err = tap_ctl_find_device(minor, &found);
	CHECK(err == 0, "tap_ctl_find_device = %d", err);
	CHECK(found && !strcmp(found, created), "found %s, created %s",
	      found ? found : "(null)", created);
	printf("devname %s\n", created);

	err = tap_ctl_find_device(minor + 1000, &again);
	CHECK(err == -ENOENT, "tap_ctl_find_device(other minor) = %d", err);
	CHECK(again == NULL, "devname set on failure");
	err = tap_ctl_find_device(-1, &again);
	CHECK(err == -EINVAL, "tap_ctl_find_device(-1) = %d", err);
	err = tap_ctl_find_device(minor, NULL);
	CHECK(err == -EINVAL, "tap_ctl_find_device(NULL) = %d", err);

	err = tap_ctl_destroy(pid, minor, 0, NULL);
	CHECK(err == 0, "tap_ctl_destroy = %d", err);
	err = tap_ctl_find_device(minor, &again);
	CHECK(err == -ENOENT, "tap_ctl_find_device after destroy = %d", err);
	CHECK(again == NULL, "devname set after destroy");
	free(created);
	free(found);
	return 0;
}

int main(int argc, char **argv)
{
	if (argc < 2)
		return 2;
	if (!strcmp(argv[1], "sizes") && argc == 3)
		test_sizes(atoi(argv[2]));
	else if (!strcmp(argv[1], "empty"))
		test_empty();
	else if (!strcmp(argv[1], "live") && argc == 8)
		test_live(atoi(argv[2]), atoi(argv[3]), (int)strtol(argv[4], NULL, 0),
			  argv[5], argv[6], atoi(argv[7]));
	else if (!strcmp(argv[1], "destroy") && argc == 4)
		test_destroy(atoi(argv[2]), atoi(argv[3]));
	else if (!strcmp(argv[1], "create_fail") && argc == 4)
		test_create_fail(argv[2], atoi(argv[3]));
	else if (!strcmp(argv[1], "find_device") && argc == 4)
		test_find_device(argv[2], argv[3]);
	else
		return 2;
	if (failures)
		return 1;
	printf("ok\n");
	return 0;
}
