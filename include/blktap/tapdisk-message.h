/* SPDX-License-Identifier: BSD-3-Clause */
/*
 * The tap-ctl <-> tapdisk control message: a fixed-size struct in host byte order
 * with native alignment (544 bytes on x86_64, 536 on i686). One request per
 * connection on <control dir>/ctl<pid>; see blktap3's control::msg module.
 */
#ifndef BLKTAP3_TAPDISK_MESSAGE_H
#define BLKTAP3_TAPDISK_MESSAGE_H

#include <stdint.h>
#include <stddef.h>
#include <sys/types.h>

#define TAPDISK_MESSAGE_MAX_PATH_LENGTH		256
#define TAPDISK_MESSAGE_STRING_LENGTH		256
#define TAPDISK_MESSAGE_MAX_MINORS		((256 / sizeof(int)) - 1)

/* params.flags */
#define TAPDISK_MESSAGE_FLAG_SHARED		0x001
#define TAPDISK_MESSAGE_FLAG_RDONLY		0x002
#define TAPDISK_MESSAGE_FLAG_ADD_CACHE		0x004
#define TAPDISK_MESSAGE_FLAG_VHD_INDEX		0x008
#define TAPDISK_MESSAGE_FLAG_ADD_LOG		0x010
#define TAPDISK_MESSAGE_FLAG_ADD_LCACHE		0x020
#define TAPDISK_MESSAGE_FLAG_REUSE_PRT		0x040
#define TAPDISK_MESSAGE_FLAG_SECONDARY		0x080
#define TAPDISK_MESSAGE_FLAG_STANDBY		0x100
#define TAPDISK_MESSAGE_FLAG_NO_O_DIRECT	0x200
#define TAPDISK_MESSAGE_FLAG_OPEN_ENCRYPTED	0x400

/* blkif.proto */
#define BLKIF_PROTOCOL_NATIVE	1
#define BLKIF_PROTOCOL_X86_32	2
#define BLKIF_PROTOCOL_X86_64	3

enum tapdisk_message_id {
	TAPDISK_MESSAGE_ERROR = 1,
	TAPDISK_MESSAGE_RUNTIME_ERROR,
	TAPDISK_MESSAGE_PID,
	TAPDISK_MESSAGE_PID_RSP,
	TAPDISK_MESSAGE_ATTACH,
	TAPDISK_MESSAGE_ATTACH_RSP,
	TAPDISK_MESSAGE_OPEN,
	TAPDISK_MESSAGE_OPEN_RSP,
	TAPDISK_MESSAGE_PAUSE,
	TAPDISK_MESSAGE_PAUSE_RSP,
	TAPDISK_MESSAGE_RESUME,
	TAPDISK_MESSAGE_RESUME_RSP,
	TAPDISK_MESSAGE_CLOSE,
	TAPDISK_MESSAGE_CLOSE_RSP,
	TAPDISK_MESSAGE_DETACH,
	TAPDISK_MESSAGE_DETACH_RSP,
	TAPDISK_MESSAGE_LIST_MINORS,
	TAPDISK_MESSAGE_LIST_MINORS_RSP,
	TAPDISK_MESSAGE_LIST,
	TAPDISK_MESSAGE_LIST_RSP,
	TAPDISK_MESSAGE_STATS,
	TAPDISK_MESSAGE_STATS_RSP,
	TAPDISK_MESSAGE_FORCE_SHUTDOWN,
	TAPDISK_MESSAGE_XENBLKIF_CONNECT,
	TAPDISK_MESSAGE_XENBLKIF_CONNECT_RSP,
	TAPDISK_MESSAGE_XENBLKIF_DISCONNECT,
	TAPDISK_MESSAGE_XENBLKIF_DISCONNECT_RSP,
	TAPDISK_MESSAGE_DISK_INFO,
	TAPDISK_MESSAGE_DISK_INFO_RSP,
	TAPDISK_MESSAGE_EXIT,
};

typedef struct tapdisk_message_params {
	uint32_t flags;
	uint32_t devnum;
	uint32_t domid;
	char path[TAPDISK_MESSAGE_MAX_PATH_LENGTH];
	uint32_t prt_devnum;
	uint16_t req_timeout;
	char secondary[TAPDISK_MESSAGE_MAX_PATH_LENGTH];
} tapdisk_message_params_t;

typedef struct tapdisk_message_image {
	uint64_t sectors;
	uint32_t sector_size;
	uint32_t info;
} tapdisk_message_image_t;

typedef struct tapdisk_message_string {
	char text[TAPDISK_MESSAGE_STRING_LENGTH];
} tapdisk_message_string_t;

typedef struct tapdisk_message_response {
	int error;		/* positive errno */
	char message[TAPDISK_MESSAGE_STRING_LENGTH];
} tapdisk_message_response_t;

typedef struct tapdisk_message_minors {
	int count;
	int list[TAPDISK_MESSAGE_MAX_MINORS];
} tapdisk_message_minors_t;

typedef struct tapdisk_message_list {
	int count;
	int minor;
	int state;
	char path[TAPDISK_MESSAGE_MAX_PATH_LENGTH];
} tapdisk_message_list_t;

typedef struct tapdisk_message_stat {
	uint16_t type;
	uint16_t cookie;
	size_t length;
} tapdisk_message_stat_t;

typedef struct tapdisk_message_blkif {
	uint32_t domid;
	uint32_t devid;
	uint32_t gref[8];
	uint32_t order;
	uint32_t proto;
	char pool[TAPDISK_MESSAGE_STRING_LENGTH];
	uint32_t port;
	uint32_t poll_duration;
	uint32_t poll_idle_threshold;
} tapdisk_message_blkif_t;

/*
 * blktap3 extension for ring order 4 (16 pages, like Linux blkback's
 * XENBUS_MAX_RING_GRANT_ORDER): gref[8] only holds orders 0..3, so grant refs
 * 8..15 travel in spare union bytes right after the 316-byte blkif struct
 * (union offset 316..348; the union is 536 bytes on x86_64, 532 on i686).
 * gref_ext is read and written only when blkif.order == 4; for orders 0..3 it
 * is zero on send and ignored on receive, so messages without it are unchanged.
 * Order > 4 is refused with EINVAL. A C tapdisk refuses order 4 (EINVAL).
 */
#define TAPDISK_MESSAGE_BLKIF_MAX_ORDER		4
#define TAPDISK_MESSAGE_BLKIF_EXT_ORDER		4

typedef struct tapdisk_message_blkif_ext {
	tapdisk_message_blkif_t blkif;
	uint32_t gref_ext[8];	/* grant refs 8..15, order 4 only */
} tapdisk_message_blkif_ext_t;

typedef struct tapdisk_message_resume {
	uint32_t flags;
	char new_params[TAPDISK_MESSAGE_MAX_PATH_LENGTH];
	char secondary[TAPDISK_MESSAGE_MAX_PATH_LENGTH];
} tapdisk_message_resume_t;

typedef struct tapdisk_message {
	uint16_t type;
	uint16_t cookie;
	union {
		pid_t tapdisk_pid;
		tapdisk_message_params_t params;
		tapdisk_message_image_t image;
		tapdisk_message_string_t string;
		tapdisk_message_response_t response;
		tapdisk_message_minors_t minors;
		tapdisk_message_list_t list;
		tapdisk_message_stat_t info;
		tapdisk_message_blkif_t blkif;
		tapdisk_message_blkif_ext_t blkif_ext;	/* same bytes as blkif + gref_ext */
		tapdisk_message_resume_t resume;
	} u;
} tapdisk_message_t;

#endif /* BLKTAP3_TAPDISK_MESSAGE_H */
