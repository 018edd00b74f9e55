/*
 * test_internals.c: unit tests of sc_remoted's pure internals, driven
 * without sockets: the buffer, the timer wheel, the remote frame parser
 * (frames split at every byte boundary), the mux stream parser, the
 * metadata parser and the certificate-name matcher.
 *
 * sc_remoted.c is included whole (without main) so its static functions
 * can be reached; nothing here opens a socket.
 */
#define SC_REMOTED_NO_MAIN 1
/* without main, the startup functions are unused here */
#pragma GCC diagnostic ignored "-Wunused-function"
#include "../../sc_remoted.c"
#include "unit.h"

/* ---- buffers ---- */

static void test_buf(void)
{
  static uint8_t src[100000], dst[100000];
  buf_t b, c;
  size_t i, off;

  memset(&b, 0, sizeof(b));
  memset(&c, 0, sizeof(c));
  for(i=0; i<sizeof(src); i++)
    src[i] = (uint8_t)(i * 7 + 3);
  CHECK(buf_append(&b, src, 10) == 0);
  CHECK(buf_append(&b, src + 10, sizeof(src) - 10) == 0);
  CHECK(buf_len(&b) == sizeof(src));
  CHECK(buf_peek(&b, 0, dst, sizeof(dst)) == sizeof(dst));
  CHECK(memcmp(src, dst, sizeof(src)) == 0);
  CHECK(buf_peek(&b, 40000, dst, 10) == 10);
  CHECK(memcmp(src + 40000, dst, 10) == 0);
  buf_drop(&b, 20000);
  CHECK(buf_len(&b) == sizeof(src) - 20000);
  CHECK(buf_peek(&b, 0, dst, 5) == 5 && memcmp(dst, src + 20000, 5) == 0);
  CHECK(buf_append_buf(&c, &b, 100) == 0);
  CHECK(buf_len(&c) == sizeof(src) - 20100);
  off = buf_peek(&c, 0, dst, sizeof(dst));
  CHECK(off == sizeof(src) - 20100);
  CHECK(memcmp(dst, src + 20100, off) == 0);
  buf_clear(&b);
  buf_clear(&c);
  CHECK(buf_len(&b) == 0 && b.first == NULL && c.first == NULL);

  /* a small frame into an empty buffer takes a small chunk; more data
   * continues in big chunks, and the bytes stay in order */
  CHECK(buf_append(&b, src, 11) == 0);
  CHECK(b.first != NULL && b.first->cap == CHUNK_SMALL);
  CHECK(buf_append(&b, src + 11, 5000) == 0);
  CHECK(b.last != NULL && b.last->cap == CHUNK_BIG);
  CHECK(buf_peek(&b, 0, dst, 5011) == 5011 && memcmp(dst, src, 5011) == 0);
  buf_clear(&b);
  CHECK(buf_append(&b, src, CHUNK_SMALL + 1) == 0);
  CHECK(b.first->cap == CHUNK_BIG);
  buf_clear(&b);
  chunk_freelist_clear();
}

/* ---- timer wheel ---- */

static int fired[16];
static uint64_t fired_at[16];
static tw_timer_t timers[16];
static int rearm_count;

static void t_fire(tw_timer_t *t)
{
  int i = (int)(t - timers);
  fired[i]++;
  fired_at[i] = tw_tick;
  if(i == 3 && rearm_count++ < 2)
    tw_arm(t, 5);      /* periodic: re-arm from its own callback */
  if(i == 4)
    tw_cancel(&timers[5]); /* cancel a timer due in the same tick */
}

static void test_timer_wheel(void)
{
  uint64_t t;
  int i;

  tw_init();
  memset(fired, 0, sizeof(fired));
  for(i=0; i<16; i++)
    tw_timer_init(&timers[i], t_fire);
  tw_arm(&timers[0], 1);
  tw_arm(&timers[1], 30);
  tw_arm(&timers[2], 3000);     /* several turns of the wheel */
  tw_arm(&timers[3], 5);
  tw_arm(&timers[4], 10);
  tw_arm(&timers[5], 10);
  tw_arm(&timers[6], 60);
  tw_cancel(&timers[6]);
  tw_arm(&timers[7], 20);
  tw_arm(&timers[7], 40);       /* re-arm moves it */
  CHECK(tw_count == 7);

  for(t = 1; t <= 100; t++)
    tw_advance(t);
  CHECK(fired[0] == 1 && fired_at[0] == 1);
  CHECK(fired[1] == 1 && fired_at[1] == 30);
  CHECK(fired[2] == 0);
  CHECK(fired[3] == 3 && fired_at[3] == 15);
  CHECK(fired[4] == 1 && fired_at[4] == 10);
  CHECK(fired[5] == 0);         /* cancelled by timer 4 in the same tick */
  CHECK(fired[6] == 0);
  CHECK(fired[7] == 1 && fired_at[7] == 40);

  /* a jump longer than the wheel fires the long timer once */
  tw_advance(5000);
  CHECK(fired[2] == 1 && fired_at[2] == 5000);
  CHECK(tw_count == 0);
  CHECK(tw_timeout_ms() == -1);

  /* arming in the past fires on the next tick */
  tw_arm_at(&timers[8], 10);
  tw_advance(5001);
  CHECK(fired[8] == 1);
}

/*
 * Issue 9: the first event after an idle spell must see the current tick.
 * The clock is moved by shifting tw_epoch back, which is what the real
 * monotonic clock does to the daemon while it sleeps with nothing armed.
 */
static tw_timer_t idle_t;
static int idle_fired;
static uint64_t idle_fired_at;

static void t_idle_fire(tw_timer_t *t)
{
  (void)t;
  idle_fired++;
  idle_fired_at = tw_tick;
}

static void test_timer_arm_after_idle(void)
{
  uint64_t armed;

  tw_init();
  tw_timer_init(&idle_t, t_idle_fire);
  idle_fired = 0;
  CHECK(tw_timeout_ms() == -1);       /* nothing armed: sleep forever */
  tw_epoch.tv_sec -= 5000;            /* ... for 5000 s */
  tw_now_update();                    /* what ev_poll does on waking */
  CHECK(tw_tick >= 5000 && tw_tick <= 5002);
  CHECK(tw_done == 0);
  armed = tw_tick;
  tw_arm(&idle_t, 30);                /* the accept deadline */
  CHECK(idle_t.expire == armed + 30);
  tw_advance(tw_tick);                /* end of that iteration */
  CHECK(idle_fired == 0);
  CHECK(tw_done == armed);
  tw_advance(armed + 29);
  CHECK(idle_fired == 0);
  tw_advance(armed + 30);
  CHECK(idle_fired == 1 && idle_fired_at == armed + 30);
  tw_advance(armed + 5000);
  CHECK(idle_fired == 1);
  CHECK(tw_count == 0);
}

/*
 * Issue 9: a gap longer than the wheel (a SIGSTOP of 20 minutes) fires
 * each due timer exactly once and in expiry order (ties in arming order),
 * and leaves the not-yet-due ones armed for their own time.
 */
#define CU_N 200
static tw_timer_t cu_t[CU_N];
static int cu_fired[CU_N];
static int cu_order[CU_N + 8];
static int cu_nfired;

static void t_cu_fire(tw_timer_t *t)
{
  int i = (int)(t - cu_t);
  cu_fired[i]++;
  cu_order[cu_nfired++] = i;
  CHECK(t->expire <= tw_tick);
}

static void test_timer_catchup(void)
{
  uint64_t base = 100, jump = 1200, exp[CU_N];
  int i, ok, due = 0;

  tw_init();
  tw_advance(base);
  cu_nfired = 0;
  for(i=0; i<CU_N; i++)
    {
      cu_fired[i] = 0;
      tw_timer_init(&cu_t[i], t_cu_fire);
      /* scattered over 1..1500 s, several sharing a slot or an expiry */
      tw_arm(&cu_t[i], (unsigned int)((i * 397) % 1500) + 1);
      exp[i] = cu_t[i].expire;
      if(exp[i] <= base + jump)
	due++;
    }
  CHECK(due > 100 && due < CU_N);

  tw_advance(base + jump);            /* 1200 ticks at once */
  CHECK(cu_nfired == due);
  ok = 1;
  for(i=0; i<CU_N; i++)
    if(cu_fired[i] != (exp[i] <= base + jump ? 1 : 0))
      ok = 0;
  CHECK(ok);                          /* each due once, none early */
  ok = 1;
  for(i=1; i<cu_nfired; i++)
    {
      uint64_t a = exp[cu_order[i-1]], b = exp[cu_order[i]];
      if(a > b || (a == b && cu_order[i-1] > cu_order[i]))
	ok = 0;
    }
  CHECK(ok);                          /* expiry order, stable */
  CHECK(tw_count == (size_t)(CU_N - due));

  /* the rest fire at their own ticks, still once each */
  tw_advance(base + 1499);
  tw_advance(base + 1500);
  CHECK(cu_nfired == CU_N);
  ok = 1;
  for(i=0; i<CU_N; i++)
    if(cu_fired[i] != 1)
      ok = 0;
  CHECK(ok);
  CHECK(tw_count == 0);

  /* a gap of many wheel turns: a timer armed for 3 turns fires once */
  tw_arm(&cu_t[0], 3 * TW_SLOTS + 7);
  tw_arm(&cu_t[1], 10);
  tw_advance(tw_tick + 20 * TW_SLOTS);
  CHECK(cu_fired[0] == 2 && cu_fired[1] == 2);
  CHECK(cu_order[cu_nfired-2] == 1 && cu_order[cu_nfired-1] == 0);
}

/* ---- remote frame parser ---- */

typedef struct rec
{
  int      nframes, nhdrs, stop_at_hdr;
  uint32_t seq[64], chan[64];
  uint16_t len[64];
  uint8_t  body[64][300];
} rec_t;

static int rec_hdr(void *arg, uint32_t seq, uint32_t chan, uint16_t len)
{
  rec_t *r = arg;
  (void)chan; (void)len;
  r->nhdrs++;
  if(r->stop_at_hdr >= 0 && (int)seq == r->stop_at_hdr)
    return -1;
  return 0;
}

static int rec_frame(void *arg, uint32_t seq, uint32_t chan,
		     const uint8_t *body, uint16_t len)
{
  rec_t *r = arg;
  int i = r->nframes++;
  if(i >= 64)
    return -1;
  r->seq[i] = seq;
  r->chan[i] = chan;
  r->len[i] = len;
  memcpy(r->body[i], body, len);
  return 0;
}

static const rp_cb_t rec_cb = { rec_hdr, rec_frame };

static size_t make_frames(uint8_t *out, int n)
{
  size_t off = 0;
  int i, j;
  for(i=0; i<n; i++)
    {
      uint16_t len = (uint16_t)((i * 37) % 290);
      if(i % 5 == 0) len = 0;
      rp_hdr(out + off, (uint32_t)i, (uint32_t)(i % 3), len);
      for(j=0; j<len; j++)
	out[off + RP_HDRLEN + j] = (uint8_t)(i + j);
      off += RP_HDRLEN + len;
    }
  return off;
}

static int check_frames(const rec_t *r, int n)
{
  int i, j;
  if(r->nframes != n)
    return 0;
  for(i=0; i<n; i++)
    {
      uint16_t len = (uint16_t)((i * 37) % 290);
      if(i % 5 == 0) len = 0;
      if(r->seq[i] != (uint32_t)i || r->chan[i] != (uint32_t)(i % 3) ||
	 r->len[i] != len)
	return 0;
      for(j=0; j<len; j++)
	if(r->body[i][j] != (uint8_t)(i + j))
	  return 0;
    }
  return 1;
}

static void test_rp_parser_splits(void)
{
  static uint8_t stream[40 * 310];
  static rec_t r;
  rp_rx_t rx;
  size_t len, cut, cut2, used;
  int ok = 1, n = 40;

  memset(&rx, 0, sizeof(rx));
  len = make_frames(stream, n);
  /* in one piece */
  memset(&r, 0, sizeof(r)); r.stop_at_hdr = -1;
  rp_rx_reset(&rx);
  CHECK(rp_rx_feed(&rx, stream, len, &rec_cb, &r, &used) == 0);
  CHECK(used == len && rx.have == 0);
  CHECK(check_frames(&r, n));
  CHECK(r.nhdrs == n);

  /* split in two at every byte boundary */
  for(cut = 1; cut < len; cut++)
    {
      memset(&r, 0, sizeof(r)); r.stop_at_hdr = -1;
      rp_rx_reset(&rx);
      if(rp_rx_feed(&rx, stream, cut, &rec_cb, &r, &used) != 0 ||
	 rp_rx_feed(&rx, stream + cut, len - cut, &rec_cb, &r, &used) != 0 ||
	 !check_frames(&r, n) || r.nhdrs != n || rx.have != 0)
	{
	  ok = 0;
	  printf("  split at %zu failed\n", cut);
	  break;
	}
    }
  CHECK(ok);

  /* three pieces, every pair of cuts in the first 200 bytes */
  ok = 1;
  for(cut = 1; cut < 200 && ok; cut++)
    for(cut2 = cut; cut2 < 200 && ok; cut2++)
      {
	memset(&r, 0, sizeof(r)); r.stop_at_hdr = -1;
	rp_rx_reset(&rx);
	rp_rx_feed(&rx, stream, cut, &rec_cb, &r, &used);
	rp_rx_feed(&rx, stream + cut, cut2 - cut, &rec_cb, &r, &used);
	rp_rx_feed(&rx, stream + cut2, len - cut2, &rec_cb, &r, &used);
	if(!check_frames(&r, n))
	  ok = 0;
      }
  CHECK(ok);

  /* one byte at a time */
  memset(&r, 0, sizeof(r)); r.stop_at_hdr = -1;
  rp_rx_reset(&rx);
  for(cut = 0; cut < len; cut++)
    rp_rx_feed(&rx, stream + cut, 1, &rec_cb, &r, &used);
  CHECK(check_frames(&r, n));
  /* the buffer kept while streaming is given back when idle */
  CHECK(rx.have == 0);
  rp_rx_release_idle(&rx);
  CHECK(rx.part == NULL && rx.cap == 0);
}

static void test_rp_parser_header_check(void)
{
  static uint8_t stream[40 * 310];
  static rec_t r;
  rp_rx_t rx;
  size_t len, used;
  int rc;

  memset(&rx, 0, sizeof(rx));
  len = make_frames(stream, 40);
  /* a bad header stops the parse before its body arrives */
  memset(&r, 0, sizeof(r)); r.stop_at_hdr = 3;
  rp_rx_reset(&rx);
  rc = rp_rx_feed(&rx, stream, len, &rec_cb, &r, &used);
  CHECK(rc == -1);
  CHECK(r.nframes == 3);

  /* the header alone (10 bytes, no body yet) is enough to stop it */
  memset(&r, 0, sizeof(r)); r.stop_at_hdr = 0;
  rp_rx_reset(&rx);
  rc = rp_rx_feed(&rx, stream, RP_HDRLEN, &rec_cb, &r, &used);
  CHECK(rc == -1 && r.nhdrs == 1 && r.nframes == 0);
  /* and a header completed across two feeds is checked as it completes */
  memset(&r, 0, sizeof(r)); r.stop_at_hdr = 0;
  rp_rx_reset(&rx);
  CHECK(rp_rx_feed(&rx, stream, 4, &rec_cb, &r, &used) == 0);
  rc = rp_rx_feed(&rx, stream + 4, 6, &rec_cb, &r, &used);
  CHECK(rc == -1 && r.nhdrs == 1);
  rp_rx_reset(&rx);
}

/* ---- control message parsers ---- */

static void test_master_new_parse(void)
{
  const uint8_t *magic;
  const char *name;
  uint8_t ml;
  uint8_t ok1[] = {8, 1,2,3,4,5,6,7,8, 9, 't','e','s','t','.','m','o','n',0};
  uint8_t noname[] = {2, 0xaa, 0xbb};
  uint8_t len0name[] = {2, 0xaa, 0xbb, 0};
  uint8_t empty[] = {1, 0x11, 1, 0};
  uint8_t badch[] = {1, 0x11, 4, 'a','_','b',0};
  uint8_t nonul[] = {1, 0x11, 3, 'a','b','c'};
  uint8_t shortn[] = {1, 0x11, 5, 'a','b',0};
  uint8_t zeroml[] = {0, 0x11};
  uint8_t shortm[] = {4, 1, 2};
  uint32_t s[3];
  uint8_t res[] = {2, 9, 9, 0,0,0,4, 0,0,0,0x12, 0,0,0,0x13};

  CHECK(rp_parse_master_new(ok1, sizeof(ok1), &magic, &ml, &name) == 0 &&
	ml == 8 && magic == ok1 + 1 && name != NULL &&
	strcmp(name, "test.mon") == 0);
  CHECK(rp_parse_master_new(noname, sizeof(noname), &magic, &ml, &name) == 0
	&& name == NULL && ml == 2);
  CHECK(rp_parse_master_new(len0name, sizeof(len0name), &magic, &ml, &name)
	== 0 && name == NULL);
  CHECK(rp_parse_master_new(empty, sizeof(empty), &magic, &ml, &name) == 0 &&
	name != NULL && name[0] == '\0');
  CHECK(rp_parse_master_new(badch, sizeof(badch), &magic, &ml, &name) != 0);
  CHECK(rp_parse_master_new(nonul, sizeof(nonul), &magic, &ml, &name) != 0);
  CHECK(rp_parse_master_new(shortn, sizeof(shortn), &magic, &ml, &name) != 0);
  CHECK(rp_parse_master_new(zeroml, sizeof(zeroml), &magic, &ml, &name) != 0);
  CHECK(rp_parse_master_new(shortm, sizeof(shortm), &magic, &ml, &name) != 0);
  CHECK(rp_parse_master_new(ok1, 0, &magic, &ml, &name) != 0);
  CHECK(rp_parse_master_res(res, sizeof(res), &magic, &ml, s) == 0 &&
	ml == 2 && s[0] == 4 && s[1] == 0x12 && s[2] == 0x13);
  CHECK(rp_parse_master_res(res, sizeof(res) - 1, &magic, &ml, s) != 0);
}

/* ---- mux parser ---- */

typedef struct mrec
{
  int     nctl, errors;
  uint8_t ctl[8][64];
  uint32_t ctllen[8];
  uint8_t data[4][70000];
  size_t  datalen[4];
} mrec_t;

static int mrec_ctl(void *arg, const uint8_t *b, uint32_t len)
{
  mrec_t *r = arg;
  if(r->nctl < 8 && len <= 64)
    {
      memcpy(r->ctl[r->nctl], b, len);
      r->ctllen[r->nctl] = len;
    }
  r->nctl++;
  return 0;
}

static int mrec_data(void *arg, uint32_t chan, const uint8_t *d, size_t len)
{
  mrec_t *r = arg;
  if(chan < 4 && r->datalen[chan] + len <= sizeof(r->data[0]))
    {
      memcpy(r->data[chan] + r->datalen[chan], d, len);
      r->datalen[chan] += len;
    }
  return 0;
}

static int mrec_err(void *arg, const char *why)
{
  (void)why;
  ((mrec_t *)arg)->errors++;
  return -1;
}

static const mux_cb_t mrec_cb = { mrec_ctl, mrec_data, mrec_err };

static size_t mux_put(uint8_t *p, uint32_t chan, const uint8_t *d,
		      uint32_t len)
{
  bytes_htonl(p, chan);
  bytes_htonl(p + 4, len);
  if(len > 0)
    memcpy(p + 8, d, len);
  return 8 + (size_t)len;
}

static void test_mux_parser(void)
{
  static uint8_t stream[200000];
  static uint8_t big[70000];
  static mrec_t r;
  uint8_t open[10] = {0, 3, 0,0,0,1, 0,0,0,7};
  uint8_t other[2] = {0, 9};
  mux_rx_t rx;
  size_t len = 0, cut, i;
  int ok = 1;

  for(i=0; i<sizeof(big); i++)
    big[i] = (uint8_t)(i * 13);
  len += mux_put(stream + len, 0, open, sizeof(open));
  len += mux_put(stream + len, 1, (const uint8_t *)"ping\n", 5);
  len += mux_put(stream + len, 2, big, sizeof(big));
  len += mux_put(stream + len, 3, NULL, 0);
  len += mux_put(stream + len, 0, other, sizeof(other));
  len += mux_put(stream + len, 1, (const uint8_t *)"done\n", 5);

  for(cut = 0; cut <= 200 && ok; cut++)
    {
      size_t c = cut == 200 ? len / 2 : cut;
      memset(&r, 0, sizeof(r));
      memset(&rx, 0, sizeof(rx));
      if(mux_rx_feed(&rx, stream, c, &mrec_cb, &r) != 0 ||
	 mux_rx_feed(&rx, stream + c, len - c, &mrec_cb, &r) != 0)
	ok = 0;
      else if(r.nctl != 2 || r.ctllen[0] != 10 ||
	      memcmp(r.ctl[0], open, 10) != 0 || r.ctllen[1] != 2 ||
	      r.datalen[1] != 10 || memcmp(r.data[1], "ping\ndone\n", 10) ||
	      r.datalen[2] != sizeof(big) ||
	      memcmp(r.data[2], big, sizeof(big)) != 0 || r.datalen[3] != 0)
	ok = 0;
      if(!ok)
	printf("  mux split at %zu failed\n", c);
    }
  CHECK(ok);

  /* a CHANNEL_OPEN one byte at a time is delivered once, complete */
  memset(&r, 0, sizeof(r));
  memset(&rx, 0, sizeof(rx));
  for(i=0; i<18; i++)
    mux_rx_feed(&rx, stream + i, 1, &mrec_cb, &r);
  CHECK(r.nctl == 1 && memcmp(r.ctl[0], open, 10) == 0);

  /* control len < 2 and > 64 KiB are errors */
  memset(&r, 0, sizeof(r));
  memset(&rx, 0, sizeof(rx));
  len = mux_put(stream, 0, open, 1);
  CHECK(mux_rx_feed(&rx, stream, len, &mrec_cb, &r) != 0 && r.errors == 1);
  memset(&r, 0, sizeof(r));
  memset(&rx, 0, sizeof(rx));
  bytes_htonl(stream, 0);
  bytes_htonl(stream + 4, MUX_CTL_MAX + 1);
  CHECK(mux_rx_feed(&rx, stream, 8, &mrec_cb, &r) != 0 && r.errors == 1);
  free(rx.ctl);
}

/* ---- metadata ---- */

static const char *meta_val(meta_table_t *t, const char *name, int field)
{
  meta_t key, *m;
  key.name = (char *)name;
  if((m = splaytree_find(&t->tree, &key)) == NULL)
    return NULL;
  return m->val[field];
}

static void test_meta_parse(void)
{
  const char *good =
    "# comment\n"
    "\n"
    "vp1.example cc us\n"
    "vp1.example CC  nz  \n"
    "vp1.example place Auckland, New Zealand\n"
    "vp1.example tag one\n"
    "vp1.example TAG two\n"
    "vp1.example colour blue\n"
    "vp2\tasn4\t\t64496\r\n"
    " #indented x y\n"
    "vp3 iata akl";
  meta_table_t *t;
  const char *msg;
  meta_t key, *m;
  size_t line;

  t = meta_parse(good, strlen(good), &line, &msg);
  CHECK(t != NULL);
  if(t == NULL)
    return;
  CHECK(strcmp(meta_val(t, "vp1.example", 3), "nz  ") == 0); /* cc */
  CHECK(strcmp(meta_val(t, "vp1.example", 5), "Auckland, New Zealand")
	== 0);
  CHECK(strcmp(meta_val(t, "vp2", 0), "64496\r") == 0);
  CHECK(strcmp(meta_val(t, "vp3", 7), "akl") == 0);
  CHECK(meta_val(t, "VP3", 7) == NULL); /* names are case-sensitive */
  key.name = (char *)"vp1.example";
  m = splaytree_find(&t->tree, &key);
  CHECK(m != NULL && m->tagc == 2 && strcmp(m->tags[0], "one") == 0 &&
	strcmp(m->tags[1], "two") == 0);
  key.name = (char *)"";  /* leading whitespace: empty NAME */
  CHECK(splaytree_find(&t->tree, &key) != NULL);
  meta_table_free(t);

  CHECK(meta_parse("a b\n", 4, &line, &msg) == NULL && line == 1);
  CHECK(meta_parse("a b c\nx y\n", 10, &line, &msg) == NULL && line == 2);
  CHECK(meta_parse("a b c\n   \n", 10, &line, &msg) == NULL && line == 2);
  CHECK(meta_parse("onlyname\n", 9, &line, &msg) == NULL && line == 1);
  CHECK(meta_parse("a b  \n", 6, &line, &msg) == NULL && line == 1);
  t = meta_parse("", 0, &line, &msg);
  CHECK(t != NULL && splaytree_count(&t->tree) == 0);
  meta_table_free(t);
}

/* ---- certificate name matching ---- */

#ifdef HAVE_OPENSSL
static int nm(const char *pat, const char *name)
{
  return tls_name_match(pat, strlen(pat), name);
}

static void test_name_match(void)
{
  CHECK(nm("vp1.example.org", "vp1.example.org"));
  CHECK(nm("VP1.Example.ORG", "vp1.example.org"));
  CHECK(!nm("vp1.example.org", "vp2.example.org"));
  CHECK(!nm("vp1.example.org", "vp1.example.or"));
  CHECK(nm("*.example", "a.example"));
  CHECK(nm("*.EXAMPLE", "abc.example"));
  CHECK(!nm("*.example", "x.b.example"));
  CHECK(!nm("*.example", ".example"));
  CHECK(!nm("*.example", "example"));
  CHECK(!nm("*.example", "a.example.org"));
  CHECK(!nm("f*.x", "fa.x"));
  CHECK(!nm("*", "a"));
  CHECK(!nm("", "a"));
}
#endif

int main(void)
{
  UNIT_RUN(test_buf);
  UNIT_RUN(test_timer_wheel);
  UNIT_RUN(test_timer_arm_after_idle);
  UNIT_RUN(test_timer_catchup);
  UNIT_RUN(test_rp_parser_splits);
  UNIT_RUN(test_rp_parser_header_check);
  UNIT_RUN(test_master_new_parse);
  UNIT_RUN(test_mux_parser);
  UNIT_RUN(test_meta_parse);
#ifdef HAVE_OPENSSL
  UNIT_RUN(test_name_match);
#endif
  chunk_freelist_clear();
  return unit_exit();
}
