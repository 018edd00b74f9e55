/*
 * state_seeds.c: builds daemon objects through the daemon's own code
 * paths and saves them with its own saver (upg_save in sc_remoted.c), to
 *
 *  - check the state format round trip: a saved state loads (upg_load),
 *    and saving the loaded state again gives the same bytes;
 *  - check that a reader skips an unknown record type and unknown fields
 *    in every record, and refuses a must-understand field it does not
 *    know, naming it;
 *  - with a directory argument, write the fuzz_state seeds there
 *    (tests/fuzz/corpus/fuzz_state/state-*): a full state, an empty one,
 *    a truncated one, one with unknown records and fields, one with a
 *    must-understand field.
 *
 * The objects: a TCP listener; a named VP in GO with a -U client and
 * data both ways (unacked, queued); a zombie (IPv6, no name); a VP in
 * handshake holding half a frame; a mux client with a channel on the
 * first VP and half a mux frame read.  Connections are socketpairs, as
 * in the fuzzers (tests/fuzz/fuzz_common.h does the daemon-side setup).
 * Exit status 0 when every check passes.
 */
#define SC_REMOTED_NO_MAIN 1
#pragma GCC diagnostic ignored "-Wunused-function"
/* fuzz_common.h sets options to constants gcc then follows into paths
 * this program never takes (pid file, TLS files) */
#pragma GCC diagnostic ignored "-Wnonnull"
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wformat-overflow"
#endif
#include "../../sc_remoted.c"
#include "../fuzz/fuzz_common.h"

static int failures = 0;

#define CHECK(c, ...) do { if(!(c)) { failures++;			\
      fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__);		\
      fprintf(stderr, __VA_ARGS__); fprintf(stderr, "\n"); } } while(0)

/* the objects listed at the top, then their state in w */
static void build_and_save(st_w_t *w, int full)
{
  static const uint8_t magic_a[8] = "AAAAAAAA", magic_b[8] = "BBBBBBBB";
  uint8_t b[600];
  fz_fd_t *fa, *fb, *fc, *uc, *mc;
  int da, db, dc, sv[2];
  size_t n;
  vp_t *va;

  fz_begin(900, 0);
  if(fz_pair(sv) != 0)
    abort();
  fdev_init(&tcp_lev[0], sv[0], FD_TCP_LISTEN, NULL);
  tcp_lev_count = 1;
  fz_keep(sv[1], FZ_FD_CONN);
  stats.arrivals = 3;
  stats.stall_disconnects = 12345;
  time_wall(&stats.start);
  if(full)
    {
      fa = fz_conn_open(4000, 0, &da);
      fz_write(fa, b, fz_master_new(b, magic_a, 8, "alpha"));
      va = fz_conn_vp(da);
      CHECK(va != NULL && va->state == VP_GO, "VP alpha not in GO");
      uc = fz_uc_add(va);
      fz_write(uc, (const uint8_t *)"to scamper", 10);

      fb = fz_conn_open(4001, 1, &db);
      fz_write(fb, b, fz_master_new(b, magic_b, 8, NULL));
      fz_close(fb);
      fz_step();

      fc = fz_conn_open(4002, 0, &dc);
      n = fz_master_new(b, magic_b, 8, "gamma");
      fz_write(fc, b, 5); /* half a frame */

      mc = fz_mc_open();
      fz_step();
      n = 0;
      bytes_htonl(b, 0);
      bytes_htonl(b + 4, 10);
      bytes_htons(b + 8, MUX_CHANNEL_OPEN);
      bytes_htonl(b + 10, va != NULL ? va->id : 1);
      bytes_htonl(b + 14, 7);
      n = 18;
      bytes_htonl(b + n, 7);          /* half a data frame on channel 7 */
      bytes_htonl(b + n + 4, 100);
      memcpy(b + n + 8, "partial", 7);
      fz_write(mc, b, n + 15);
      (void)fc;
    }
  memset(w, 0, sizeof(*w));
  upg_save(w);
  CHECK(!w->t.err, "upg_save failed");
  return;
}

/* load state p (len bytes) into a fresh daemon; 0 if loaded */
static int load(const uint8_t *p, size_t len, uint32_t nfds, char *why,
		size_t whylen)
{
  int *fds = calloc(nfds + 1, sizeof(int)), sv[2];
  uint8_t *used = calloc(nfds + 1, 1);
  const char *w = "";
  char *from = NULL;
  uint32_t i;
  int rc;

  fz_begin(900, 0);
  for(i=0; i<nfds; i++)
    {
      if(fz_pair(sv) != 0)
	abort();
      fz_keep(sv[1], FZ_FD_CONN);
      fds[i] = sv[0];
    }
  rc = upg_load(p, len, fds, used, nfds, &w, &from);
  snprintf(why, whylen, "%s", rc == 0 ? "" : w);
  for(i=0; i<nfds; i++)
    if(!used[i])
      close(fds[i]);
  free(fds);
  free(used);
  free(from);
  return rc;
}

/*
 * The state at p with an unknown record after every record and an
 * unknown field (tag, marked must-understand if asked) at the end of
 * every VP, channel and mux client record.
 */
static void add_unknown(tlv_w_t *out, const uint8_t *p, size_t len,
			uint16_t tag)
{
  tlv_r_t r = {p + 8, len - 8, 0};
  const uint8_t *v;
  uint32_t n;
  uint16_t type;
  size_t at;

  memset(out, 0, sizeof(*out));
  tlv_put(out, p, 8);
  while(tlv_next(&r, &type, &v, &n) == 1)
    {
      at = tlv_begin(out, type);
      tlv_put(out, v, n);
      if(type == ST_REC_VP || type == ST_REC_CHAN || type == ST_REC_MC)
	tlv_field(out, tag, "future", 6);
      tlv_end(out, at);
      if(type != ST_REC_END && !(tag & TLV_MUST))
	{
	  at = tlv_begin(out, 0x0e00);
	  tlv_field_uint(out, 1, 42, 4);
	  tlv_end(out, at);
	}
    }
  return;
}

static void write_seed(const char *dir, const char *name, const uint8_t *p,
		       size_t len)
{
  char path[1024];
  FILE *fp;
  snprintf(path, sizeof(path), "%s/%s", dir, name);
  if((fp = fopen(path, "wb")) == NULL || fwrite(p, 1, len, fp) != len ||
     fclose(fp) != 0)
    {
      perror(path);
      exit(1);
    }
  return;
}

int main(int argc, char *argv[])
{
  const char *dir = argc > 1 ? argv[1] : NULL;
  st_w_t w, w2;
  tlv_w_t u;
  char why[256];
  unsigned long cnt;
  uint32_t nfds;
  int rc;

  /* the empty state */
  build_and_save(&w, 0);
  fz_end();
  if(dir != NULL)
    write_seed(dir, "state-empty", w.t.p, w.t.len);
  rc = load(w.t.p, w.t.len, w.nfds, why, sizeof(why));
  CHECK(rc == 0, "empty state does not load: %s", why);
  fz_end();
  free(w.t.p);
  free(w.fds);

  /* the full state: loads, and saves back to the same bytes */
  build_and_save(&w, 1);
  cnt = upg_count;
  fz_end();
  nfds = w.nfds;
  CHECK(nfds >= 6, "only %u fds saved", nfds);
  rc = load(w.t.p, w.t.len, nfds, why, sizeof(why));
  CHECK(rc == 0, "full state does not load: %s", why);
  CHECK(splaytree_count(&vp_by_id) == 2, "%zu named VPs loaded",
	splaytree_count(&vp_by_id));
  CHECK(mc_list.head != NULL, "no mux client loaded");
  CHECK(stats.stall_disconnects == 12345, "counters not loaded");
  upg_count = cnt;
  memset(&w2, 0, sizeof(w2));
  upg_save(&w2);
  CHECK(w2.t.len == w.t.len && memcmp(w2.t.p, w.t.p, w.t.len) == 0,
	"state saved again differs (%zu vs %zu bytes)", w2.t.len, w.t.len);
  fz_end();
  free(w2.t.p);
  free(w2.fds);

  /* a truncated state is refused */
  rc = load(w.t.p, w.t.len / 2, nfds, why, sizeof(why));
  CHECK(rc != 0, "half a state loads");
  fz_end();

  /* unknown records and fields are skipped */
  add_unknown(&u, w.t.p, w.t.len, 777);
  rc = load(u.p, u.len, nfds, why, sizeof(why));
  CHECK(rc == 0, "state with unknown items does not load: %s", why);
  CHECK(splaytree_count(&vp_by_id) == 2, "unknown items: %zu VPs",
	splaytree_count(&vp_by_id));
  fz_end();
  if(dir != NULL)
    write_seed(dir, "state-unknown", u.p, u.len);
  free(u.p);

  /* ... unless marked must-understand: refused, naming record and field */
  add_unknown(&u, w.t.p, w.t.len, TLV_MUST | 777);
  rc = load(u.p, u.len, nfds, why, sizeof(why));
  CHECK(rc != 0 && strstr(why, "record mc: field 777") != NULL &&
	strstr(why, "must-understand") != NULL,
	"must-understand field: rc %d, why \"%s\"", rc, why);
  fz_end();
  if(dir != NULL)
    {
      write_seed(dir, "state-must", u.p, u.len);
      write_seed(dir, "state-full", w.t.p, w.t.len);
      write_seed(dir, "state-truncated", w.t.p, w.t.len / 2);
    }
  free(u.p);
  free(w.t.p);
  free(w.fds);
  printf("%s: %d failure(s)\n", argv[0], failures);
  return failures == 0 ? 0 : 1;
}
