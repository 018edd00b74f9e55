/*
 * fuzz_meta.c: libFuzzer target for the metadata parser (PROTOCOL.md 6)
 * and the VP_UPDATE encoder that consumes its table (PROTOCOL.md 5.4).
 *
 * The input is the text of a -m file.  When meta_parse() accepts it, a VP
 * named after the first entry of the table is encoded with
 * mux_encode_vp_update(), and the frame is decoded again and compared
 * with what the table says: the attributes, in emission order, each a
 * NUL-terminated string inside the frame.  When it rejects the input, the
 * error line must be within the text.
 */
#define SC_REMOTED_NO_MAIN 1
#pragma GCC diagnostic ignored "-Wunused-function"
#include "../../sc_remoted.c"

#define FZ_FAIL(...) do {						\
    fprintf(stderr, "fuzz oracle: " __VA_ARGS__);			\
    fprintf(stderr, "\n");						\
    abort();								\
  } while(0)

/* the expected attribute sequence, built from the table independently */
#define FZ_EXP_MAX (MUX_UPDATE_MAX / 3 + 1) /* an attribute takes >= 3 bytes */

typedef struct fz_exp
{
  uint16_t    attr[FZ_EXP_MAX];
  const char *val[FZ_EXP_MAX];
  size_t      n;
  size_t      bytes;   /* payload bytes they need */
} fz_exp_t;

static void fz_exp_add(fz_exp_t *e, uint16_t attr, const char *val)
{
  size_t need = 2 + strlen(val) + 1;
  if(e->bytes + need > MUX_UPDATE_MAX)
    return; /* left out by the encoder, which logs it */
  e->attr[e->n] = attr;
  e->val[e->n] = val;
  e->n++;
  e->bytes += need;
  return;
}

static void fz_check_update(const vp_t *vp, const meta_t *m, size_t flen)
{
  static const uint16_t order[META_NFIELDS] = {
    MUX_ATTR_IPV4_ASN, MUX_ATTR_IPV6_ASN, MUX_ATTR_LATLONG, MUX_ATTR_CC,
    MUX_ATTR_ST, MUX_ATTR_PLACE, MUX_ATTR_SHORTNAME, MUX_ATTR_IATA,
  };
  static fz_exp_t e;
  char arrival[48];
  size_t i, off, vl;
  const uint8_t *f = mux_enc;

  e.n = 0;
  e.bytes = 6;
  fz_exp_add(&e, MUX_ATTR_NAME, vp->name);
  snprintf(arrival, sizeof(arrival), "%ld.%06ld", (long)vp->arrival.tv_sec,
	   (long)vp->arrival.tv_usec);
  fz_exp_add(&e, MUX_ATTR_ARRIVAL, arrival);
  fz_exp_add(&e, MUX_ATTR_IPV4, vp->addr);
  for(i=0; i<META_NFIELDS; i++)
    if(m->val[i] != NULL)
      fz_exp_add(&e, order[i], m->val[i]);
  for(i=0; i<m->tagc; i++)
    fz_exp_add(&e, MUX_ATTR_TAG, m->tags[i]);

  if(flen < MUX_HDRLEN + 6 || flen > MUX_HDRLEN + MUX_UPDATE_MAX)
    FZ_FAIL("VP_UPDATE frame of %zu bytes", flen);
  if(bytes_ntohl(f) != 0 || bytes_ntohl(f + 4) != flen - MUX_HDRLEN ||
     bytes_ntohs(f + 8) != MUX_VP_UPDATE || bytes_ntohl(f + 10) != vp->id)
    FZ_FAIL("VP_UPDATE header");
  off = MUX_HDRLEN + 6;
  for(i=0; i<e.n; i++)
    {
      vl = strlen(e.val[i]) + 1;
      if(off + 2 + vl > flen)
	FZ_FAIL("VP_UPDATE ends before attribute %zu", i);
      if(bytes_ntohs(f + off) != e.attr[i] ||
	 memcmp(f + off + 2, e.val[i], vl) != 0)
	FZ_FAIL("VP_UPDATE attribute %zu: got %u, expected %u", i,
		bytes_ntohs(f + off), e.attr[i]);
      off += 2 + vl;
    }
  if(off != flen)
    FZ_FAIL("VP_UPDATE has %zu bytes after the expected attributes",
	    flen - off);
  return;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
  meta_table_t *t;
  const char *msg;
  size_t line, nl, i, flen;
  meta_t *first;
  vp_t *vp;
  char *text;

  /* an exact-size copy, so reading past the end is caught */
  if((text = malloc(size > 0 ? size : 1)) == NULL)
    return 0;
  memcpy(text, data, size);
  opt_flags = 0;
  t = meta_parse(text, size, &line, &msg);
  if(t == NULL)
    {
      for(nl = 1, i = 0; i < size; i++)
	if(text[i] == '\n')
	  nl++;
      if(msg == NULL || line == 0 || line > nl)
	FZ_FAIL("meta_parse failed with line %zu of %zu (%s)", line, nl,
		msg != NULL ? msg : "no message");
      free(text);
      return 0;
    }
  free(text); /* the table must not point into the text */

  if((first = splaytree_min(&t->tree)) != NULL)
    {
      if((vp = calloc(1, sizeof(vp_t))) == NULL)
	abort();
      vp->id = 1;
      vp->family = AF_INET;
      snprintf(vp->addr, sizeof(vp->addr), "192.0.2.1");
      vp->name = first->name;
      vp->arrival.tv_sec = 1795413934;
      vp->arrival.tv_usec = 825990;
      meta_table = t;
      flen = mux_encode_vp_update(vp);
      if(meta_find(first->name) != first)
	FZ_FAIL("meta_find did not find the first entry");
      fz_check_update(vp, first, flen);
      meta_table = NULL;
      free(vp);
    }
  meta_table_free(t);
  return 0;
}
