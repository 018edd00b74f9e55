/*
 * test_spool.c: a model test of a consumer's output with a spool
 * (issue 18): random appends (as a VP's frames arrive; none while the sink
 * is full, as its VP would be paused), random flushes to a socketpair and
 * random reads by the "client" on the other end, with small watermarks and
 * caps, and injected spool write failures (the file swapped for a
 * read-only descriptor of itself).  Every byte the client reads must be the
 * next byte of the stream; memory and spool stay within their bounds; at
 * the end everything is delivered and the spool file is closed.  Also: a
 * live upgrade's spool_drain_sink() moves the whole spool into out, in
 * order.
 *
 * sc_remoted.c is included whole (without main) to reach the sink.
 */
#define SC_REMOTED_NO_MAIN 1
#pragma GCC diagnostic ignored "-Wunused-function"
#include "../../sc_remoted.c"
#include "../unit/unit.h"

#define APPEND_MAX 70000

static uint8_t pat_byte(uint64_t off)
{
  return (uint8_t)((off * 2654435761ULL) >> 13);
}

typedef struct model
{
  mclient_t *mc;
  int        peer;           /* the client's end */
  uint64_t   sent;           /* bytes queued */
  uint64_t   got;            /* bytes the client read, all checked */
  int        bad;            /* first mismatch seen */
  int        injected;       /* write failures injected */
} model_t;

static void m_append(model_t *m, size_t len)
{
  static uint8_t tmp[APPEND_MAX];
  size_t i;
  for(i=0; i<len; i++)
    tmp[i] = pat_byte(m->sent + i);
  CHECK(buf_append(sink_in(&m->mc->sink), tmp, len) == 0);
  sink_appended(&m->mc->sink, NULL);
  m->sent += len;
}

static void m_read(model_t *m, size_t max)
{
  static uint8_t tmp[1 << 18];
  ssize_t n, i;
  if(max > sizeof(tmp))
    max = sizeof(tmp);
  if((n = read(m->peer, tmp, max)) <= 0)
    return;
  for(i=0; i<n && !m->bad; i++)
    if(tmp[i] != pat_byte(m->got + (uint64_t)i))
      {
	printf("  byte %llu of the stream is wrong\n",
	       (unsigned long long)(m->got + (uint64_t)i));
	m->bad = 1;
      }
  m->got += (uint64_t)n;
}

/* make the next spool write fail (EBADF), keeping the file readable */
static void m_break_spool(model_t *m)
{
  sink_t *s = &m->mc->sink;
  char path[64];
  int ro;
  if(s->sp_fd < 0)
    return;
  snprintf(path, sizeof(path), "/proc/self/fd/%d", s->sp_fd);
  if((ro = open(path, O_RDONLY | O_CLOEXEC)) < 0)
    return;
  close(s->sp_fd);
  s->sp_fd = ro;
  m->injected++;
}

static void m_check_bounds(model_t *m)
{
  sink_t *s = &m->mc->sink;
  if(!CHECK(sink_mem(s) <= opt_buf_high + 2 * SPOOL_SLACK +
	   3 * APPEND_MAX))
    printf("  out %zu pend %zu spooled %llu full %d off %d fd %d\n",
	   buf_len(&s->out), buf_len(&s->pend),
	   (unsigned long long)sink_spooled(s), s->full, s->sp_off,
	   s->sp_fd);
  CHECK(sink_spooled(s) <= opt_spool_max);
  CHECK(buf_len(&s->pend) <= SPOOL_SLACK + 2 * APPEND_MAX);
  CHECK(spool_live == sink_spooled(s));
  CHECK(spool_files == (s->sp_fd >= 0 ? 1U : 0U));
  CHECK(m->got + sink_backlog(s) <= m->sent);
}

static model_t *m_new(void)
{
  static model_t m;
  int sp[2];
  memset(&m, 0, sizeof(m));
  m.mc = calloc(1, sizeof(mclient_t));
  CHECK(m.mc != NULL);
  CHECK(socketpair(AF_UNIX, SOCK_STREAM, 0, sp) == 0);
  fd_nonblock(sp[0]);
  fd_nonblock(sp[1]);
  conn_init(&m.mc->conn, sp[0], FD_MC, m.mc, NULL);
  sink_init(&m.mc->sink, mc_stall);
  m.mc->gen = 1;
  m.peer = sp[1];
  return &m;
}

static void m_free(model_t *m)
{
  sink_fini(&m->mc->sink);
  conn_close(&m->mc->conn);
  close(m->peer);
  free(m->mc);
}

/* flush and read until everything queued has arrived (bounded) */
static void m_drain_all(model_t *m)
{
  int i;
  for(i=0; i<200000 && m->got < m->sent && !m->bad; i++)
    {
      CHECK(sink_flush(&m->mc->sink, &m->mc->conn) >= 0);
      m_read(m, 1 << 18);
    }
}

static void test_random(void)
{
  model_t *m = m_new();
  sink_t *s = &m->mc->sink;
  int i, op, fulls = 0, spooled = 0;

  srandom(18);
  for(i=0; i<60000 && !m->bad; i++)
    {
      op = (int)(random() % 100);
      if(op < 45)
	{
	  if(!s->full)
	    m_append(m, 1 + (size_t)random() % APPEND_MAX);
	}
      else if(op < 70)
	CHECK(sink_flush(s, &m->mc->conn) >= 0);
      else if(op < 97)
	m_read(m, 1 + (size_t)random() % 65536);
      else if(op < 98 && m->injected < 20)
	m_break_spool(m);
      else
	m_read(m, 1 << 18);
      if(s->full)
	fulls++;
      if(s->sp_fd >= 0)
	spooled++;
      m_check_bounds(m);
    }
  m_drain_all(m);
  CHECK(!m->bad);
  CHECK(m->got == m->sent);
  CHECK(sink_backlog(s) == 0);
  CHECK(s->sp_fd < 0 && spool_files == 0 && spool_live == 0);
  CHECK(fulls > 0);                   /* the caps and failures were hit */
  CHECK(spooled > 0);
  CHECK(stats.spool_cap_hits > 0);
  CHECK(stats.spool_errors > 0);
  printf("  %llu bytes in order; %llu spooled; %d steps full; "
	 "%llu cap hits, %llu errors\n", (unsigned long long)m->sent,
	 (unsigned long long)stats.spool_written, fulls,
	 (unsigned long long)stats.spool_cap_hits,
	 (unsigned long long)stats.spool_errors);
  m_free(m);
}

static void test_drain_for_upgrade(void)
{
  model_t *m = m_new();
  sink_t *s = &m->mc->sink;
  int i;

  for(i=0; i<100 && !s->full; i++)
    m_append(m, 30000);
  CHECK(sink_spooled(s) > 0);
  spool_drain_sink(s);
  CHECK(sink_spooled(s) == 0 && buf_len(&s->pend) == 0);
  CHECK(s->sp_fd < 0 && spool_files == 0);
  CHECK(buf_len(&s->out) == m->sent);
  m_drain_all(m);
  CHECK(!m->bad && m->got == m->sent);
  m_free(m);
}

int main(void)
{
  char dir[] = "/tmp/test_spool.XXXXXX";
  if(mkdtemp(dir) == NULL || globals_init() != 0 || ev_init() != 0)
    {
      printf("setup failed: %s\n", strerror(errno));
      return 1;
    }
  opt_spool_dir = dir;
  opt_buf_high = 256 * 1024;
  opt_buf_low = 64 * 1024;
  opt_spool_max = 2 * 1024 * 1024;
  opt_spool_total = 3 * 1024 * 1024 / 2;
  if(spool_init() != 0)
    return 1;
  UNIT_RUN(test_random);
  opt_spool_max = opt_spool_total = 64 * 1024 * 1024;
  UNIT_RUN(test_drain_for_upgrade);
  close(spool_dirfd);
  rmdir(dir);
  return unit_exit();
}
