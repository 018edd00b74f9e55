/*
 * mjl_list.h: intrusive singly and doubly linked lists.
 *
 * The list never allocates: the caller embeds a node in its own object
 * and recovers the object with LIST_ITEM().  A node that is not on a list
 * has both pointers NULL (after *_node_init or removal), which is what
 * dlist_node_linked() tests.  Nothing here knows about sc_remoted.
 */
#ifndef MJL_LIST_H
#define MJL_LIST_H

#include <stddef.h>

#define LIST_ITEM(node, type, member) \
	((type *)(void *)((char *)(node) - offsetof(type, member)))

/* ---- singly linked FIFO/LIFO (O(1) push at both ends, pop at head) ---- */
typedef struct slist_node
{
  struct slist_node *next;
} slist_node_t;

typedef struct slist
{
  slist_node_t *head;
  slist_node_t *tail;
  size_t        count;
} slist_t;

void          slist_init(slist_t *list);
void          slist_push_head(slist_t *list, slist_node_t *node);
void          slist_push_tail(slist_t *list, slist_node_t *node);
slist_node_t *slist_pop_head(slist_t *list);          /* NULL when empty */
void          slist_concat(slist_t *dst, slist_t *src); /* src emptied */

/* ---- doubly linked list (O(1) removal of any node) ---- */
typedef struct dlist_node
{
  struct dlist_node *prev;
  struct dlist_node *next;
} dlist_node_t;

typedef struct dlist
{
  dlist_node_t *head;
  dlist_node_t *tail;
  size_t        count;
} dlist_t;

void          dlist_init(dlist_t *list);
void          dlist_node_init(dlist_node_t *node);
int           dlist_node_linked(const dlist_t *list, const dlist_node_t *node);
void          dlist_push_head(dlist_t *list, dlist_node_t *node);
void          dlist_push_tail(dlist_t *list, dlist_node_t *node);
void          dlist_insert_after(dlist_t *list, dlist_node_t *pos,
				 dlist_node_t *node);
void          dlist_remove(dlist_t *list, dlist_node_t *node); /* node reset */
dlist_node_t *dlist_pop_head(dlist_t *list);          /* NULL when empty */

#endif /* MJL_LIST_H */
