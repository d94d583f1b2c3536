/* SPDX-License-Identifier: BSD-3-Clause */
/*
 * Doubly linked circular lists in the style of the Linux kernel, as used by
 * libblktapctl's tap_ctl_list() (struct tap_list embeds a struct list_head).
 */
#ifndef BLKTAP3_LIST_H
#define BLKTAP3_LIST_H

#include <stddef.h>

struct list_head {
	struct list_head *next;
	struct list_head *prev;
};

#define LIST_HEAD_INIT(name) { &(name), &(name) }
#define LIST_HEAD(name) struct list_head name = LIST_HEAD_INIT(name)

#ifndef containerof
#define containerof(_ptr, _type, _member) \
	((_type *)((char *)(_ptr) - offsetof(_type, _member)))
#endif

#define list_entry(_ptr, _type, _member) containerof(_ptr, _type, _member)

static inline void INIT_LIST_HEAD(struct list_head *head)
{
	head->next = head;
	head->prev = head;
}

static inline void __list_link(struct list_head *item,
			       struct list_head *before,
			       struct list_head *after)
{
	after->prev = item;
	item->next = after;
	item->prev = before;
	before->next = item;
}

/* Insert @item right after @head (stack order). */
static inline void list_add(struct list_head *item, struct list_head *head)
{
	__list_link(item, head, head->next);
}

/* Insert @item right before @head (queue order). */
static inline void list_add_tail(struct list_head *item, struct list_head *head)
{
	__list_link(item, head->prev, head);
}

/* Unlink @item and leave it as an empty list. */
static inline void list_del(struct list_head *item)
{
	item->prev->next = item->next;
	item->next->prev = item->prev;
	INIT_LIST_HEAD(item);
}

static inline int list_empty(const struct list_head *head)
{
	return head->next == head;
}

#define list_for_each(_pos, _head) \
	for ((_pos) = (_head)->next; (_pos) != (_head); (_pos) = (_pos)->next)

#define list_for_each_entry(_pos, _head, _member) \
	for ((_pos) = list_entry((_head)->next, __typeof__(*(_pos)), _member); \
	     &(_pos)->_member != (_head); \
	     (_pos) = list_entry((_pos)->_member.next, __typeof__(*(_pos)), _member))

/* Like list_for_each_entry, but @_pos may be unlinked and freed in the body. */
#define list_for_each_entry_safe(_pos, _tmp, _head, _member) \
	for ((_pos) = list_entry((_head)->next, __typeof__(*(_pos)), _member), \
	     (_tmp) = list_entry((_pos)->_member.next, __typeof__(*(_pos)), _member); \
	     &(_pos)->_member != (_head); \
	     (_pos) = (_tmp), \
	     (_tmp) = list_entry((_tmp)->_member.next, __typeof__(*(_pos)), _member))

#endif /* BLKTAP3_LIST_H */
