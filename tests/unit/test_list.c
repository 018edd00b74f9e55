/*
 * test_list.c: unit tests for mjl_list (slist and dlist).
 */
#ifdef HAVE_CONFIG_H
#include "config.h"
#endif

#include <stddef.h>

#include "mjl_list.h"
#include "unit.h"

typedef struct item
{
  int          pad;   /* keeps the nodes away from offset 0 */
  int          val;
  slist_node_t snode;
  dlist_node_t dnode;
} item_t;

#define NITEMS 8
static item_t items[NITEMS];

static void items_reset(void)
{
  int i;

  for(i = 0; i < NITEMS; i++)
    {
      items[i].pad = -1;
      items[i].val = i;
      items[i].snode.next = NULL;
      dlist_node_init(&items[i].dnode);
    }
}

/*
 * Check that an slist holds exactly the values in want[0..n), in order,
 * with count and tail consistent.  Returns 1 if so.
 */
static int slist_is(const slist_t *list, const int *want, size_t n)
{
  slist_node_t *node, *last = NULL;
  size_t i = 0;

  for(node = list->head; node != NULL; node = node->next, i++)
    {
      if(i >= n || LIST_ITEM(node, item_t, snode)->val != want[i])
	return 0;
      last = node;
    }
  return i == n && list->count == n && list->tail == last;
}

/*
 * Check that a dlist holds exactly want[0..n) in order, walking forward
 * and backward, with prev/next links, head, tail and count consistent.
 */
static int dlist_is(const dlist_t *list, const int *want, size_t n)
{
  dlist_node_t *node, *prev = NULL;
  size_t i = 0;

  for(node = list->head; node != NULL; node = node->next, i++)
    {
      if(i >= n || node->prev != prev ||
	 LIST_ITEM(node, item_t, dnode)->val != want[i])
	return 0;
      prev = node;
    }
  if(i != n || list->tail != prev || list->count != n)
    return 0;
  for(node = list->tail; node != NULL; node = node->prev)
    {
      if(i == 0 || LIST_ITEM(node, item_t, dnode)->val != want[--i])
	return 0;
    }
  return i == 0;
}

static void test_list_item_macro(void)
{
  items_reset();
  CHECK(LIST_ITEM(&items[3].snode, item_t, snode) == &items[3]);
  CHECK(LIST_ITEM(&items[5].dnode, item_t, dnode) == &items[5]);
}

static void test_slist_push_pop(void)
{
  slist_t list;
  slist_node_t *node;
  int want1[] = {2, 0, 1, 3};
  int want2[] = {0, 1, 3};

  items_reset();
  slist_init(&list);
  CHECK(slist_is(&list, NULL, 0));
  CHECK(slist_pop_head(&list) == NULL);
  CHECK(list.count == 0);

  slist_push_tail(&list, &items[0].snode);
  slist_push_tail(&list, &items[1].snode);
  slist_push_head(&list, &items[2].snode);
  slist_push_tail(&list, &items[3].snode);
  CHECK(slist_is(&list, want1, 4));

  node = slist_pop_head(&list);
  CHECK(node == &items[2].snode);
  CHECK(node != NULL && node->next == NULL);
  CHECK(slist_is(&list, want2, 3));

  while(slist_pop_head(&list) != NULL)
    ;
  CHECK(slist_is(&list, NULL, 0));
  CHECK(list.tail == NULL);

  /* a list emptied by popping is usable again from either end */
  slist_push_head(&list, &items[4].snode);
  CHECK(list.head == &items[4].snode && list.tail == &items[4].snode);
  slist_push_tail(&list, &items[5].snode);
  CHECK(list.tail == &items[5].snode && list.count == 2);
}

static void test_slist_concat(void)
{
  slist_t a, b;
  int want_ab[] = {0, 1, 2, 3, 4};
  int want_b[] = {5, 6};

  items_reset();
  slist_init(&a);
  slist_init(&b);

  /* both empty */
  slist_concat(&a, &b);
  CHECK(slist_is(&a, NULL, 0) && slist_is(&b, NULL, 0));

  /* non-empty onto non-empty */
  slist_push_tail(&a, &items[0].snode);
  slist_push_tail(&a, &items[1].snode);
  slist_push_tail(&b, &items[2].snode);
  slist_push_tail(&b, &items[3].snode);
  slist_push_tail(&b, &items[4].snode);
  slist_concat(&a, &b);
  CHECK(slist_is(&a, want_ab, 5));
  CHECK(slist_is(&b, NULL, 0));
  CHECK(b.head == NULL && b.tail == NULL);

  /* empty src leaves dst alone */
  slist_concat(&a, &b);
  CHECK(slist_is(&a, want_ab, 5));

  /* non-empty onto empty */
  slist_push_tail(&b, &items[5].snode);
  slist_push_tail(&b, &items[6].snode);
  slist_concat(&b, &a);
  CHECK(slist_is(&a, NULL, 0));
  {
    int want_ba[] = {5, 6, 0, 1, 2, 3, 4};
    CHECK(slist_is(&b, want_ba, 7));
  }
  slist_init(&a);
  slist_push_tail(&a, &items[5].snode);
  slist_push_tail(&a, &items[6].snode);
  slist_init(&b);
  slist_concat(&b, &a);
  CHECK(slist_is(&b, want_b, 2));

  /* appending after a concat goes after the old src tail */
  slist_push_tail(&b, &items[7].snode);
  CHECK(b.tail == &items[7].snode && b.count == 3);
  CHECK(items[6].snode.next == &items[7].snode);
}

static void test_dlist_push_pop(void)
{
  dlist_t list;
  dlist_node_t *node;
  int want1[] = {2, 0, 1, 3};
  int want2[] = {0, 1, 3};

  items_reset();
  dlist_init(&list);
  CHECK(dlist_is(&list, NULL, 0));
  CHECK(dlist_pop_head(&list) == NULL);

  dlist_push_tail(&list, &items[0].dnode);
  dlist_push_tail(&list, &items[1].dnode);
  dlist_push_head(&list, &items[2].dnode);
  dlist_push_tail(&list, &items[3].dnode);
  CHECK(dlist_is(&list, want1, 4));

  node = dlist_pop_head(&list);
  CHECK(node == &items[2].dnode);
  CHECK(node != NULL && node->prev == NULL && node->next == NULL);
  CHECK(dlist_is(&list, want2, 3));

  while(dlist_pop_head(&list) != NULL)
    ;
  CHECK(dlist_is(&list, NULL, 0));
  CHECK(list.head == NULL && list.tail == NULL);

  dlist_push_head(&list, &items[4].dnode);
  CHECK(list.head == &items[4].dnode && list.tail == &items[4].dnode);
}

static void test_dlist_insert_after(void)
{
  dlist_t list;
  int want1[] = {0, 1, 2};
  int want2[] = {0, 3, 1, 2, 4};
  int want3[] = {5, 0, 3, 1, 2, 4};

  items_reset();
  dlist_init(&list);

  /* into an empty list with pos NULL */
  dlist_insert_after(&list, NULL, &items[0].dnode);
  dlist_insert_after(&list, &items[0].dnode, &items[1].dnode); /* tail */
  dlist_insert_after(&list, &items[1].dnode, &items[2].dnode); /* tail */
  CHECK(dlist_is(&list, want1, 3));

  dlist_insert_after(&list, &items[0].dnode, &items[3].dnode); /* middle */
  dlist_insert_after(&list, &items[2].dnode, &items[4].dnode); /* tail */
  CHECK(dlist_is(&list, want2, 5));

  dlist_insert_after(&list, NULL, &items[5].dnode); /* head */
  CHECK(dlist_is(&list, want3, 6));
}

static void test_dlist_remove(void)
{
  dlist_t list;
  int i;
  int want1[] = {1, 2, 3, 4};
  int want2[] = {1, 2, 4};
  int want3[] = {1, 2};
  int want4[] = {2};

  items_reset();
  dlist_init(&list);
  for(i = 0; i < 5; i++)
    dlist_push_tail(&list, &items[i].dnode);

  dlist_remove(&list, &items[0].dnode); /* head */
  CHECK(dlist_is(&list, want1, 4));
  dlist_remove(&list, &items[3].dnode); /* middle */
  CHECK(dlist_is(&list, want2, 3));
  dlist_remove(&list, &items[4].dnode); /* tail */
  CHECK(dlist_is(&list, want3, 2));
  dlist_remove(&list, &items[1].dnode);
  CHECK(dlist_is(&list, want4, 1));
  dlist_remove(&list, &items[2].dnode); /* only */
  CHECK(dlist_is(&list, NULL, 0));

  /* removed nodes are reset */
  for(i = 0; i < 5; i++)
    CHECK(items[i].dnode.prev == NULL && items[i].dnode.next == NULL);

  /* and can be linked again */
  dlist_push_tail(&list, &items[3].dnode);
  dlist_push_head(&list, &items[0].dnode);
  {
    int want5[] = {0, 3};
    CHECK(dlist_is(&list, want5, 2));
  }
}

static void test_dlist_node_linked(void)
{
  dlist_t list;

  items_reset();
  dlist_init(&list);
  CHECK(!dlist_node_linked(&list, &items[0].dnode));

  dlist_push_tail(&list, &items[0].dnode);   /* sole member */
  CHECK(dlist_node_linked(&list, &items[0].dnode));
  CHECK(!dlist_node_linked(&list, &items[1].dnode));

  dlist_push_tail(&list, &items[1].dnode);
  dlist_push_tail(&list, &items[2].dnode);
  CHECK(dlist_node_linked(&list, &items[0].dnode));
  CHECK(dlist_node_linked(&list, &items[1].dnode));
  CHECK(dlist_node_linked(&list, &items[2].dnode));

  dlist_remove(&list, &items[1].dnode);
  CHECK(!dlist_node_linked(&list, &items[1].dnode));
  dlist_remove(&list, &items[0].dnode);
  dlist_remove(&list, &items[2].dnode);
  CHECK(!dlist_node_linked(&list, &items[0].dnode));
  CHECK(!dlist_node_linked(&list, &items[2].dnode));

  /* popped nodes are unlinked too */
  dlist_push_tail(&list, &items[3].dnode);
  CHECK(dlist_pop_head(&list) == &items[3].dnode);
  CHECK(!dlist_node_linked(&list, &items[3].dnode));
}

/* many random operations against a reference membership array */
static void test_dlist_random(void)
{
  enum { N = 64, OPS = 20000 };
  static item_t pool[N];
  dlist_t list;
  dlist_node_t *node;
  uint32_t seed = 12345;
  size_t count = 0;
  int in[N], i, k, ok = 1;

  dlist_init(&list);
  for(i = 0; i < N; i++)
    {
      pool[i].val = i;
      dlist_node_init(&pool[i].dnode);
      in[i] = 0;
    }
  for(i = 0; i < OPS && ok; i++)
    {
      k = (int)(unit_rand(&seed) % N);
      if(in[k])
	{
	  dlist_remove(&list, &pool[k].dnode);
	  in[k] = 0;
	  count--;
	}
      else if(unit_rand(&seed) & 1)
	{
	  dlist_push_head(&list, &pool[k].dnode);
	  in[k] = 1;
	  count++;
	}
      else
	{
	  dlist_push_tail(&list, &pool[k].dnode);
	  in[k] = 1;
	  count++;
	}
      ok &= CHECK(list.count == count);
      ok &= CHECK(dlist_node_linked(&list, &pool[k].dnode) == in[k]);
    }
  /* every linked node is reachable exactly once */
  for(node = list.head; node != NULL; node = node->next)
    {
      k = LIST_ITEM(node, item_t, dnode)->val;
      CHECK(in[k] == 1);
      in[k] = 2;
    }
  for(i = 0; i < N; i++)
    CHECK(in[i] != 1);
}

int main(void)
{
  UNIT_RUN(test_list_item_macro);
  UNIT_RUN(test_slist_push_pop);
  UNIT_RUN(test_slist_concat);
  UNIT_RUN(test_dlist_push_pop);
  UNIT_RUN(test_dlist_insert_after);
  UNIT_RUN(test_dlist_remove);
  UNIT_RUN(test_dlist_node_linked);
  UNIT_RUN(test_dlist_random);
  return unit_exit();
}
