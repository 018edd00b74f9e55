/*
 * test_splaytree.c: unit tests for mjl_splaytree.
 *
 * Besides directed cases, a seeded randomized test drives thousands of
 * insert/find/remove/min/pop_min operations against a reference
 * membership array and checks the tree's shape (binary-search order,
 * node count) with an independent walker after every batch.
 */
#ifdef HAVE_CONFIG_H
#include "config.h"
#endif

#include <stddef.h>
#include <stdlib.h>

#include "mjl_splaytree.h"
#include "unit.h"

typedef struct item
{
  double           pad;   /* keeps the node away from offset 0 */
  int              key;
  int              tag;
  splaytree_node_t node;
} item_t;

static int item_cmp(const void *a, const void *b)
{
  const item_t *x = a, *y = b;

  if(x->key < y->key) return -1;
  if(x->key > y->key) return 1;
  return 0;
}

static void tree_new(splaytree_t *tree)
{
  splaytree_init(tree, item_cmp, offsetof(item_t, node));
}

static item_t *item_find(splaytree_t *tree, int key)
{
  item_t k;

  k.key = key;
  return splaytree_find(tree, &k);
}

static item_t *item_remove(splaytree_t *tree, int key)
{
  item_t k;

  k.key = key;
  return splaytree_remove(tree, &k);
}

/*
 * Independent structural check: an explicit-stack in-order walk over the
 * raw nodes, verifying strictly increasing keys and that the number of
 * nodes equals splaytree_count.  Returns 1 if the tree is sound.
 */
static int tree_sound(const splaytree_t *tree)
{
  splaytree_node_t **stack, *cur = tree->root;
  size_t sp = 0, seen = 0, max = tree->count + 1;
  const item_t *it;
  int have_prev = 0, prev = 0, ok = 1;

  if((stack = malloc(max * sizeof(*stack))) == NULL)
    return 0;
  while(ok && (cur != NULL || sp > 0))
    {
      while(cur != NULL && sp < max)
	{
	  stack[sp++] = cur;
	  cur = cur->left;
	}
      if(cur != NULL)
	{
	  ok = 0;   /* deeper than count: a cycle or a miscount */
	  break;
	}
      cur = stack[--sp];
      it = (const item_t *)(const void *)((const char *)cur -
					  offsetof(item_t, node));
      if(have_prev && it->key <= prev)
	ok = 0;
      prev = it->key;
      have_prev = 1;
      seen++;
      cur = cur->right;
    }
  free(stack);
  return ok && seen == tree->count;
}

/* collects walked keys into an array */
typedef struct walk
{
  int   *keys;
  size_t n;
  size_t max;
  size_t stop_after;  /* return 7 after this many items; 0 = never */
} walk_t;

static int walk_fn(void *item, void *param)
{
  walk_t *w = param;

  if(w->n < w->max)
    w->keys[w->n] = ((item_t *)item)->key;
  w->n++;
  if(w->stop_after != 0 && w->n == w->stop_after)
    return 7;
  return 0;
}

static void test_empty(void)
{
  splaytree_t tree;
  walk_t w = {NULL, 0, 0, 0};

  tree_new(&tree);
  CHECK(splaytree_count(&tree) == 0);
  CHECK(item_find(&tree, 1) == NULL);
  CHECK(item_remove(&tree, 1) == NULL);
  CHECK(splaytree_min(&tree) == NULL);
  CHECK(splaytree_pop_min(&tree) == NULL);
  CHECK(splaytree_inorder(&tree, walk_fn, &w) == 0);
  CHECK(w.n == 0);
  CHECK(tree_sound(&tree));
}

static void test_basic(void)
{
  static item_t it[5];
  int keys[] = {30, 10, 50, 20, 40}, i;
  splaytree_t tree;

  tree_new(&tree);
  for(i = 0; i < 5; i++)
    {
      it[i].key = keys[i];
      it[i].tag = i;
      CHECK(splaytree_insert(&tree, &it[i]) == 0);
    }
  CHECK(splaytree_count(&tree) == 5);
  CHECK(tree_sound(&tree));
  for(i = 0; i < 5; i++)
    CHECK(item_find(&tree, keys[i]) == &it[i]);
  CHECK(item_find(&tree, 0) == NULL);
  CHECK(item_find(&tree, 25) == NULL);
  CHECK(item_find(&tree, 60) == NULL);
  CHECK(splaytree_min(&tree) == &it[1]);
  CHECK(splaytree_count(&tree) == 5);

  CHECK(item_remove(&tree, 30) == &it[0]);
  CHECK(item_remove(&tree, 30) == NULL);
  CHECK(item_find(&tree, 30) == NULL);
  CHECK(splaytree_count(&tree) == 4);
  CHECK(tree_sound(&tree));

  /* a removed item can be inserted again */
  CHECK(splaytree_insert(&tree, &it[0]) == 0);
  CHECK(item_find(&tree, 30) == &it[0]);
  CHECK(tree_sound(&tree));
}

static void test_duplicates(void)
{
  static item_t a, b, c;
  splaytree_t tree;

  tree_new(&tree);
  a.key = 5; a.tag = 1;
  b.key = 5; b.tag = 2;
  c.key = 6; c.tag = 3;
  CHECK(splaytree_insert(&tree, &a) == 0);
  CHECK(splaytree_insert(&tree, &c) == 0);
  CHECK(splaytree_insert(&tree, &b) == -1);   /* equal key, other item */
  CHECK(splaytree_insert(&tree, &c) == -1);   /* same item again */
  CHECK(splaytree_count(&tree) == 2);
  CHECK(item_find(&tree, 5) == &a);
  CHECK(tree_sound(&tree));

  /* re-inserting an item that is linked, with children, must not
   * disturb it: the failed insert cannot touch its node */
  {
    static item_t more[9];
    int i;
    for(i = 0; i < 9; i++)
      {
	more[i].key = 100 + i;
	CHECK(splaytree_insert(&tree, &more[i]) == 0);
      }
    CHECK(item_find(&tree, 104) == &more[4]);   /* now the root */
    CHECK(splaytree_insert(&tree, &more[4]) == -1);
    CHECK(splaytree_insert(&tree, &more[0]) == -1);
    CHECK(splaytree_count(&tree) == 11);
    CHECK(tree_sound(&tree));
    for(i = 0; i < 9; i++)
      CHECK(item_remove(&tree, 100 + i) == &more[i]);
  }

  /* after the original goes, the other item with that key fits */
  CHECK(item_remove(&tree, 5) == &a);
  CHECK(splaytree_insert(&tree, &b) == 0);
  CHECK(item_find(&tree, 5) == &b);
  CHECK(splaytree_count(&tree) == 2);
}

/* insert a shuffled 0..N-1; walking must yield 0..N-1 in order */
static void test_inorder(void)
{
  enum { N = 1000 };
  static item_t it[N];
  static int order[N], got[N];
  splaytree_t tree;
  walk_t w;
  uint32_t seed = 0xC0FFEE;
  int i, j, t, ok = 1;

  for(i = 0; i < N; i++)
    order[i] = i;
  for(i = N - 1; i > 0; i--)
    {
      j = (int)(unit_rand(&seed) % (uint32_t)(i + 1));
      t = order[i]; order[i] = order[j]; order[j] = t;
    }
  tree_new(&tree);
  for(i = 0; i < N; i++)
    {
      it[i].key = order[i];
      CHECK(splaytree_insert(&tree, &it[i]) == 0);
    }

  w.keys = got; w.n = 0; w.max = N; w.stop_after = 0;
  CHECK(splaytree_inorder(&tree, walk_fn, &w) == 0);
  CHECK(w.n == N);
  for(i = 0; i < N; i++)
    ok &= (got[i] == i);
  CHECK(ok);

  /* an early stop returns fn's value and leaves the tree intact */
  w.n = 0; w.stop_after = 10;
  CHECK(splaytree_inorder(&tree, walk_fn, &w) == 7);
  CHECK(w.n == 10);
  CHECK(got[9] == 9);
  CHECK(tree_sound(&tree));
  CHECK(splaytree_count(&tree) == N);
  w.n = 0; w.stop_after = 0;
  CHECK(splaytree_inorder(&tree, walk_fn, &w) == 0);
  CHECK(w.n == N);

  /* stopping at the very first and very last item */
  w.n = 0; w.stop_after = 1;
  CHECK(splaytree_inorder(&tree, walk_fn, &w) == 7 && w.n == 1);
  w.n = 0; w.stop_after = N;
  CHECK(splaytree_inorder(&tree, walk_fn, &w) == 7 && w.n == N);
  CHECK(tree_sound(&tree));
}

/*
 * Sequential inserts make a splay tree a single path of length N.  The
 * walk and the splays over it must not recurse; draining with pop_min
 * must come out sorted.
 */
static void test_degenerate(void)
{
  enum { N = 200000 };
  item_t *it;
  splaytree_t tree;
  walk_t w = {NULL, 0, 0, 0};
  item_t *p;
  int i, ok = 1;

  if((it = calloc(N, sizeof(*it))) == NULL)
    {
      CHECK(it != NULL);
      return;
    }
  tree_new(&tree);
  for(i = 0; i < N; i++)
    {
      it[i].key = i;
      ok &= (splaytree_insert(&tree, &it[i]) == 0);
    }
  CHECK(ok);
  CHECK(splaytree_inorder(&tree, walk_fn, &w) == 0);
  CHECK(w.n == N);
  CHECK(tree_sound(&tree));
  CHECK(item_find(&tree, 0) == &it[0]);        /* deepest node */
  CHECK(item_find(&tree, N - 1) == &it[N - 1]);
  CHECK(tree_sound(&tree));

  for(i = 0, ok = 1; i < N; i++)
    {
      p = splaytree_pop_min(&tree);
      ok &= (p == &it[i]);
    }
  CHECK(ok);
  CHECK(splaytree_count(&tree) == 0);
  CHECK(splaytree_pop_min(&tree) == NULL);
  free(it);
}

/* one random operation on key k, mirrored in the reference in[] */
static int random_op(splaytree_t *tree, item_t *it, int *in, int nkeys,
		     int k, uint32_t r, size_t *count)
{
  int m, ok = 1;
  item_t *p;

  switch(r % 5)
    {
    case 0: case 1:  /* insert (twice as likely, to keep the tree full) */
      ok &= (splaytree_insert(tree, &it[k]) == (in[k] ? -1 : 0));
      if(!in[k]) { in[k] = 1; (*count)++; }
      break;
    case 2:
      ok &= (item_find(tree, k) == (in[k] ? &it[k] : NULL));
      break;
    case 3:
      ok &= (item_remove(tree, k) == (in[k] ? &it[k] : NULL));
      if(in[k]) { in[k] = 0; (*count)--; }
      break;
    default:  /* min or pop_min of the reference's smallest key */
      for(m = 0; m < nkeys && !in[m]; m++)
	;
      p = (r & 8) ? splaytree_pop_min(tree) : splaytree_min(tree);
      ok &= (p == (m < nkeys ? &it[m] : NULL));
      if((r & 8) && m < nkeys) { in[m] = 0; (*count)--; }
      break;
    }
  return ok && splaytree_count(tree) == *count;
}

static void test_random(void)
{
  enum { NKEYS = 2000, OPS = 50000, BATCH = 1000 };
  static item_t it[NKEYS];
  static int in[NKEYS];
  static int got[NKEYS];
  splaytree_t tree;
  walk_t w;
  uint32_t seed = 20260101;
  size_t count = 0, n;
  int i, k, ok = 1, shape_ok = 1, walk_ok = 1;

  tree_new(&tree);
  for(i = 0; i < NKEYS; i++)
    {
      it[i].key = i;
      in[i] = 0;
    }
  for(i = 0; i < OPS; i++)
    {
      k = (int)(unit_rand(&seed) % NKEYS);
      ok &= random_op(&tree, it, in, NKEYS, k, unit_rand(&seed), &count);
      if((i + 1) % BATCH != 0)
	continue;
      shape_ok &= tree_sound(&tree);
      w.keys = got; w.n = 0; w.max = NKEYS; w.stop_after = 0;
      walk_ok &= (splaytree_inorder(&tree, walk_fn, &w) == 0);
      walk_ok &= (w.n == count);
      for(k = 0, n = 0; k < NKEYS && n < w.n; k++)
	if(in[k])
	  walk_ok &= (got[n++] == k);
    }
  CHECK(ok);
  CHECK(shape_ok);
  CHECK(walk_ok);

  /* drain: pop_min yields the reference's members in order */
  for(k = 0; k < NKEYS; k++)
    if(in[k])
      ok &= (splaytree_pop_min(&tree) == &it[k]);
  CHECK(ok);
  CHECK(splaytree_count(&tree) == 0);
  CHECK(tree.root == NULL);
}

/* a string-keyed tree, as used for metadata keyed by name */
typedef struct named
{
  const char      *name;
  splaytree_node_t node;
} named_t;

static int named_cmp(const void *a, const void *b)
{
  const char *x = ((const named_t *)a)->name, *y = ((const named_t *)b)->name;

  while(*x != '\0' && *x == *y) { x++; y++; }
  return (unsigned char)*x - (unsigned char)*y;
}

static void test_string_keys(void)
{
  static named_t n[4] = {{"vp2", {0, 0}}, {"vp10", {0, 0}},
			 {"a", {0, 0}}, {"vp1", {0, 0}}};
  splaytree_t tree;
  named_t key;
  int i;

  splaytree_init(&tree, named_cmp, offsetof(named_t, node));
  for(i = 0; i < 4; i++)
    CHECK(splaytree_insert(&tree, &n[i]) == 0);
  key.name = "vp10";
  CHECK(splaytree_find(&tree, &key) == &n[1]);
  key.name = "vp3";
  CHECK(splaytree_find(&tree, &key) == NULL);
  CHECK(splaytree_pop_min(&tree) == &n[2]);
  CHECK(splaytree_pop_min(&tree) == &n[3]);
  CHECK(splaytree_pop_min(&tree) == &n[1]);
  CHECK(splaytree_pop_min(&tree) == &n[0]);
  CHECK(splaytree_pop_min(&tree) == NULL);
}

/*
 * splaytree_find_next against a sorted reference: every key from -1 to
 * past the end, for present and absent keys, on a tree whose shape keeps
 * changing because each query splays.
 */
static void test_find_next(void)
{
  enum { NKEYS = 300 };
  static item_t it[NKEYS];
  splaytree_t tree;
  item_t key, *got;
  uint32_t seed = 7;
  int i, k, want, ok = 1;

  tree_new(&tree);
  key.key = 5;
  CHECK(splaytree_find_next(&tree, &key) == NULL);
  /* every third key present, inserted in a scrambled order */
  for(i = 0; i < NKEYS; i++)
    it[i].key = i;
  for(i = 0; i < NKEYS; i++)
    {
      k = (i * 7) % NKEYS;
      if(k % 3 == 0)
	splaytree_insert(&tree, &it[k]);
    }
  for(i = 0; i < 3 * NKEYS; i++)
    {
      k = (i < NKEYS + 2) ? i - 1 : (int)(unit_rand(&seed) % (NKEYS + 2)) - 1;
      key.key = k;
      got = splaytree_find_next(&tree, &key);
      want = k < 0 ? 0 : (k / 3 + 1) * 3;
      if(want >= NKEYS)
	ok &= (got == NULL);
      else
	ok &= (got == &it[want]);
    }
  CHECK(ok);
  CHECK(tree_sound(&tree));
  /* walking the whole tree by successor visits every item once */
  key.key = -1;
  for(i = 0; (got = splaytree_find_next(&tree, &key)) != NULL; i++)
    key.key = got->key;
  CHECK(i == (NKEYS + 2) / 3);
  CHECK(splaytree_count(&tree) == (size_t)i);
}

int main(void)
{
  UNIT_RUN(test_empty);
  UNIT_RUN(test_basic);
  UNIT_RUN(test_duplicates);
  UNIT_RUN(test_inorder);
  UNIT_RUN(test_degenerate);
  UNIT_RUN(test_random);
  UNIT_RUN(test_string_keys);
  UNIT_RUN(test_find_next);
  return unit_exit();
}
