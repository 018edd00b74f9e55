/*
 * mjl_list.c: intrusive singly and doubly linked lists.
 *
 * See mjl_list.h.  Nothing here allocates; every function is O(1) except
 * where noted.  Callers own the memory holding both lists and nodes.
 */
#ifdef HAVE_CONFIG_H
#include "config.h"
#endif

#include <stddef.h>

#include "mjl_list.h"

/* ---- singly linked list ---- */

void slist_init(slist_t *list)
{
  list->head = NULL;
  list->tail = NULL;
  list->count = 0;
}

/*
 * Put node at the front of list.  node must not be on any list; its next
 * pointer is overwritten.
 */
void slist_push_head(slist_t *list, slist_node_t *node)
{
  node->next = list->head;
  list->head = node;
  if(list->tail == NULL)
    list->tail = node;
  list->count++;
}

/*
 * Put node at the back of list.  node must not be on any list; its next
 * pointer is overwritten.
 */
void slist_push_tail(slist_t *list, slist_node_t *node)
{
  node->next = NULL;
  if(list->tail != NULL)
    list->tail->next = node;
  else
    list->head = node;
  list->tail = node;
  list->count++;
}

/*
 * Detach and return the first node, with its next pointer cleared, or
 * NULL if the list is empty.
 */
slist_node_t *slist_pop_head(slist_t *list)
{
  slist_node_t *node = list->head;

  if(node == NULL)
    return NULL;
  list->head = node->next;
  if(list->head == NULL)
    list->tail = NULL;
  list->count--;
  node->next = NULL;
  return node;
}

/*
 * Append every node of src to dst, preserving order, and leave src empty.
 * dst and src must be distinct lists.
 */
void slist_concat(slist_t *dst, slist_t *src)
{
  if(src->head == NULL)
    return;
  if(dst->tail != NULL)
    dst->tail->next = src->head;
  else
    dst->head = src->head;
  dst->tail = src->tail;
  dst->count += src->count;
  slist_init(src);
}

/* ---- doubly linked list ---- */

void dlist_init(dlist_t *list)
{
  list->head = NULL;
  list->tail = NULL;
  list->count = 0;
}

void dlist_node_init(dlist_node_t *node)
{
  node->prev = NULL;
  node->next = NULL;
}

/*
 * Non-zero if node is on list.  node must be either on list or unlinked
 * (initialised or removed); a node on a different list gives a wrong
 * answer only if it is that list's sole member.
 */
int dlist_node_linked(const dlist_t *list, const dlist_node_t *node)
{
  if(node->prev != NULL || node->next != NULL)
    return 1;
  return list->head == node;
}

/* Put an unlinked node at the front of list. */
void dlist_push_head(dlist_t *list, dlist_node_t *node)
{
  node->prev = NULL;
  node->next = list->head;
  if(list->head != NULL)
    list->head->prev = node;
  else
    list->tail = node;
  list->head = node;
  list->count++;
}

/* Put an unlinked node at the back of list. */
void dlist_push_tail(dlist_t *list, dlist_node_t *node)
{
  node->next = NULL;
  node->prev = list->tail;
  if(list->tail != NULL)
    list->tail->next = node;
  else
    list->head = node;
  list->tail = node;
  list->count++;
}

/*
 * Insert an unlinked node immediately after pos, which must be on list.
 * A NULL pos inserts at the head.
 */
void dlist_insert_after(dlist_t *list, dlist_node_t *pos, dlist_node_t *node)
{
  if(pos == NULL)
    {
      dlist_push_head(list, node);
      return;
    }
  node->prev = pos;
  node->next = pos->next;
  if(pos->next != NULL)
    pos->next->prev = node;
  else
    list->tail = node;
  pos->next = node;
  list->count++;
}

/*
 * Unlink node from list and reset its pointers to NULL.  node must be on
 * list.
 */
void dlist_remove(dlist_t *list, dlist_node_t *node)
{
  if(node->prev != NULL)
    node->prev->next = node->next;
  else
    list->head = node->next;
  if(node->next != NULL)
    node->next->prev = node->prev;
  else
    list->tail = node->prev;
  list->count--;
  dlist_node_init(node);
}

/* Detach and return the first node (reset), or NULL if list is empty. */
dlist_node_t *dlist_pop_head(dlist_t *list)
{
  dlist_node_t *node = list->head;

  if(node != NULL)
    dlist_remove(list, node);
  return node;
}
