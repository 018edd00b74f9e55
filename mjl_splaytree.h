/*
 * mjl_splaytree.h: an intrusive top-down splay tree.
 *
 * The caller embeds a splaytree_node_t in each item and tells the tree the
 * node's offset inside the item; the compare callback sees items, never
 * nodes.  Lookups take a "key item": any item (often a stack object) with
 * the key fields filled in.  The tree never allocates, so insert cannot
 * fail except on a duplicate key.  Nothing here knows about sc_remoted.
 */
#ifndef MJL_SPLAYTREE_H
#define MJL_SPLAYTREE_H

#include <stddef.h>

typedef int (*splaytree_cmp_t)(const void *a, const void *b);

typedef struct splaytree_node
{
  struct splaytree_node *left;
  struct splaytree_node *right;
} splaytree_node_t;

typedef struct splaytree
{
  splaytree_node_t *root;
  splaytree_cmp_t   cmp;
  size_t            offset; /* offsetof(item type, node member) */
  size_t            count;
} splaytree_t;

void  splaytree_init(splaytree_t *tree, splaytree_cmp_t cmp, size_t offset);

/* 0 on success, -1 if an item comparing equal is already present */
int   splaytree_insert(splaytree_t *tree, void *item);

/* the item comparing equal to key, or NULL */
void *splaytree_find(splaytree_t *tree, const void *key);

/* remove the item comparing equal to key; returns it, or NULL */
void *splaytree_remove(splaytree_t *tree, const void *key);

/* the smallest item comparing greater than key, or NULL */
void *splaytree_find_next(splaytree_t *tree, const void *key);

void *splaytree_min(splaytree_t *tree);  /* smallest item or NULL */

size_t splaytree_count(const splaytree_t *tree);

/*
 * In-order walk.  fn returns 0 to continue, non-zero to stop the walk (that
 * value is returned).  fn must not modify the tree; to empty a tree use
 * splaytree_pop_min() in a loop.
 */
int   splaytree_inorder(const splaytree_t *tree,
			int (*fn)(void *item, void *param), void *param);

/* remove and return the smallest item, or NULL when empty */
void *splaytree_pop_min(splaytree_t *tree);

#endif /* MJL_SPLAYTREE_H */
