/*
 * mjl_splaytree.c: an intrusive top-down splay tree.
 *
 * See mjl_splaytree.h.  The splay is Sleator and Tarjan's top-down
 * variant: one pass from the root, reassembling the tree from a left and
 * a right partial tree hung off a sentinel on the stack.  Nothing here
 * allocates and nothing recurses, so a degenerate (list-shaped) tree
 * costs no stack depth.
 */
#ifdef HAVE_CONFIG_H
#include "config.h"
#endif

#include <stddef.h>

#include "mjl_splaytree.h"

/* the item a node is embedded in */
static void *node_item(const splaytree_t *tree, splaytree_node_t *node)
{
  return (char *)node - tree->offset;
}

/* the node embedded in an item */
static splaytree_node_t *item_node(const splaytree_t *tree, void *item)
{
  return (splaytree_node_t *)(void *)((char *)item + tree->offset);
}

/*
 * Compare key with the item holding node.  A NULL key is the internal
 * "minus infinity" used to splay the minimum to the root.
 */
static int key_cmp(const splaytree_t *tree, const void *key,
		   splaytree_node_t *node)
{
  if(key == NULL)
    return -1;
  return tree->cmp(key, node_item(tree, node));
}

/*
 * Top-down splay of the subtree rooted at t around key, returning the new
 * subtree root.  If an item equal to key is present it becomes the root;
 * otherwise the root is the last node on the search path, i.e. key's
 * in-order predecessor or successor.  t may be NULL.
 */
static splaytree_node_t *splay(const splaytree_t *tree,
			       splaytree_node_t *t, const void *key)
{
  splaytree_node_t side, *l = &side, *r = &side, *y;
  int c;

  if(t == NULL)
    return NULL;
  side.left = side.right = NULL;

  while((c = key_cmp(tree, key, t)) != 0)
    {
      if(c < 0)
	{
	  if(t->left == NULL)
	    break;
	  if(key_cmp(tree, key, t->left) < 0)
	    {
	      /* zig-zig: rotate right */
	      y = t->left; t->left = y->right; y->right = t; t = y;
	      if(t->left == NULL)
		break;
	    }
	  /* link t into the right tree */
	  r->left = t; r = t; t = t->left;
	}
      else
	{
	  if(t->right == NULL)
	    break;
	  if(key_cmp(tree, key, t->right) > 0)
	    {
	      /* zag-zag: rotate left */
	      y = t->right; t->right = y->left; y->left = t; t = y;
	      if(t->right == NULL)
		break;
	    }
	  /* link t into the left tree */
	  l->right = t; l = t; t = t->right;
	}
    }

  /* reassemble: left tree, t, right tree */
  l->right = t->left;
  r->left = t->right;
  t->left = side.right;
  t->right = side.left;
  return t;
}

void splaytree_init(splaytree_t *tree, splaytree_cmp_t cmp, size_t offset)
{
  tree->root = NULL;
  tree->cmp = cmp;
  tree->offset = offset;
  tree->count = 0;
}

/*
 * Link item into the tree as the new root.  Returns -1 if an equal item
 * is already present (possibly item itself): then the tree is unchanged
 * except for its shape, and item's node is not touched.  Otherwise the
 * item's embedded node is overwritten.
 */
int splaytree_insert(splaytree_t *tree, void *item)
{
  splaytree_node_t *node = item_node(tree, item), *root;
  int c;

  if(tree->root == NULL)
    node->left = node->right = NULL;
  else
    {
      root = tree->root = splay(tree, tree->root, item);
      if((c = key_cmp(tree, item, root)) == 0)
	return -1;
      if(c < 0)
	{
	  node->left = root->left;
	  node->right = root;
	  root->left = NULL;
	}
      else
	{
	  node->right = root->right;
	  node->left = root;
	  root->right = NULL;
	}
    }
  tree->root = node;
  tree->count++;
  return 0;
}

/* The item equal to key (splayed to the root), or NULL. */
void *splaytree_find(splaytree_t *tree, const void *key)
{
  if(tree->root == NULL)
    return NULL;
  tree->root = splay(tree, tree->root, key);
  if(key_cmp(tree, key, tree->root) != 0)
    return NULL;
  return node_item(tree, tree->root);
}

/*
 * Unlink the root node, which the caller has just splayed there.  The
 * root's left subtree holds only smaller keys, so splaying it for the
 * original key brings its maximum up with an empty right subtree.
 */
static void unlink_root(splaytree_t *tree, const void *key)
{
  splaytree_node_t *old = tree->root, *root;

  if(old->left == NULL)
    root = old->right;
  else
    {
      root = splay(tree, old->left, key);
      root->right = old->right;
    }
  tree->root = root;
  tree->count--;
  old->left = old->right = NULL;
}

/* Remove and return the item equal to key, or NULL if there is none. */
void *splaytree_remove(splaytree_t *tree, const void *key)
{
  void *item;

  if((item = splaytree_find(tree, key)) != NULL)
    unlink_root(tree, key);
  return item;
}

/* The smallest item (splayed to the root), or NULL when empty. */
void *splaytree_min(splaytree_t *tree)
{
  if(tree->root == NULL)
    return NULL;
  tree->root = splay(tree, tree->root, NULL);
  return node_item(tree, tree->root);
}

/*
 * The smallest item greater than key, or NULL.  Splaying around key
 * leaves either key's successor at the root (when key is absent and the
 * search ended on the larger side) or something <= key there, whose
 * successor is then the minimum of its right subtree.
 */
void *splaytree_find_next(splaytree_t *tree, const void *key)
{
  splaytree_node_t *n;

  if(tree->root == NULL)
    return NULL;
  tree->root = splay(tree, tree->root, key);
  if(key_cmp(tree, key, tree->root) < 0)
    return node_item(tree, tree->root);
  if((n = tree->root->right) == NULL)
    return NULL;
  while(n->left != NULL)
    n = n->left;
  return node_item(tree, n);
}

size_t splaytree_count(const splaytree_t *tree)
{
  return tree->count;
}

/*
 * Morris in-order traversal: O(n) time and O(1) space, which matters
 * because a splay tree may be a single long path.  It threads each
 * node's in-order predecessor to it through the predecessor's NULL right
 * pointer and removes the thread on the second visit.  After fn asks to
 * stop, the walk still runs to the end, without calling fn, so that every
 * thread is removed and the tree is left exactly as it was.  The tree
 * struct itself is not written; only nodes are, transiently, which is why
 * fn must not look at or change this tree at all.
 */
int splaytree_inorder(const splaytree_t *tree,
		      int (*fn)(void *item, void *param), void *param)
{
  splaytree_node_t *cur = tree->root, *pre;
  int rc = 0;

  while(cur != NULL)
    {
      if(cur->left != NULL)
	{
	  pre = cur->left;
	  while(pre->right != NULL && pre->right != cur)
	    pre = pre->right;
	  if(pre->right == NULL)
	    {
	      /* first visit: thread and descend left */
	      pre->right = cur;
	      cur = cur->left;
	      continue;
	    }
	  pre->right = NULL; /* second visit: left subtree done */
	}
      if(rc == 0)
	rc = fn(node_item(tree, cur), param);
      cur = cur->right;
    }

  return rc;
}

/* Remove and return the smallest item, or NULL when empty. */
void *splaytree_pop_min(splaytree_t *tree)
{
  void *item;

  if((item = splaytree_min(tree)) != NULL)
    unlink_root(tree, NULL);
  return item;
}
