/* SPDX-License-Identifier: BSD-3-Clause */
/*
 * libblktapctl (blktap3 in Rust): control tapdisks from C.
 *
 * Every function returns 0 (or a non-negative value where stated) on success and a
 * negative errno on failure. Strings returned through pointers are malloc'ed; the
 * caller frees them with free(), except the tap_list entries, which
 * tap_ctl_list_free() releases. The control directory is /run/blktap-control, or
 * $BLKTAP_CONTROL_DIR; spawned tapdisks ($BLKTAP_TAPDISK, else /usr/libexec/tapdisk)
 * inherit the caller's environment.
 */
#ifndef BLKTAP3_TAP_CTL_H
#define BLKTAP3_TAP_CTL_H

#include <stdint.h>
#include <sys/time.h>
#include <sys/types.h>

#include "list.h"
#include "tapdisk-message.h"

#ifdef __cplusplus
extern "C" {
#endif

/* One row of tap_ctl_list(): -1 / NULL for fields that are unknown. */
typedef struct tap_list {
	pid_t pid;
	int minor;
	int state;
	char *type;
	char *path;
	struct list_head entry;
} tap_list_t;

#define tap_list_for_each_entry(_pos, _head) \
	list_for_each_entry(_pos, _head, entry)

#define tap_list_for_each_entry_safe(_pos, _n, _head) \
	list_for_each_entry_safe(_pos, _n, _head, entry)

/* Fill @list (re-initialised first) with every VBD of every live tapdisk,
 * tapdisks without VBDs (pid only) and allocated minors nobody serves
 * (minor only). Free with tap_ctl_list_free(). */
int tap_ctl_list(struct list_head *list);
void tap_ctl_list_free(struct list_head *list);

/* The minor of the VBD serving type:path, or -ENOENT. */
int tap_ctl_find_minor(const char *type, const char *path);

/* The device of the VBD @minor of a live tapdisk: *@devname receives a malloc'ed
 * path, /dev/nbdN if the kernel NBD driver has the VBD's export, else the export's
 * NBD socket path. Returns 0, -ENOENT if no live tapdisk serves @minor (or nothing is
 * open on it), -EINVAL for a negative @minor or a NULL @devname. */
int tap_ctl_find_device(int minor, char **devname);

/* allocate + spawn + attach + open. @flags are TAPDISK_MESSAGE_FLAG_*,
 * @prt_minor < 0 for none, @secondary may be NULL, @timeout is the per-request
 * timeout in seconds (0 = default). *@devname receives a malloc'ed device path:
 * /dev/nbdN (also linked as /dev/xen/blktap-2/tapdev<minor>, or under
 * $BLKTAP_TAPDEV_DIR) when the kernel NBD driver takes the export, else the
 * export's NBD socket path (no tapdev link). */
int tap_ctl_create(const char *params, char **devname, int flags, int prt_minor,
		   const char *secondary, int timeout);

/* close (forced if @force) + detach + free, disconnecting the VBD's /dev/nbdN and
 * removing its tapdev link; @timeout may be NULL. */
int tap_ctl_destroy(int pid, int minor, int force, struct timeval *timeout);

/* Lower-level operations. */
int tap_ctl_allocate(int *minor, char **devname);
int tap_ctl_free(int minor);
int tap_ctl_spawn(void);			/* the new tapdisk's pid */
pid_t tap_ctl_get_pid(int pid);
int tap_ctl_attach(int pid, int minor);
int tap_ctl_detach(int pid, int minor);
int tap_ctl_open(int pid, int minor, const char *params, int flags, int prt_minor,
		 const char *secondary, int timeout, const char *logpath,
		 uint8_t key_size, const uint8_t *encryption_key);
int tap_ctl_close(int pid, int minor, int force, struct timeval *timeout);
int tap_ctl_pause(int pid, int minor, struct timeval *timeout);
int tap_ctl_unpause(int pid, int minor, const char *params, int flags,
		    const char *secondary, const char *logpath);
int tap_ctl_find_pid(int minor);		/* pid serving @minor, or -ENOENT */

#ifdef __cplusplus
}
#endif

#endif /* BLKTAP3_TAP_CTL_H */
