/*
 * scbench: load generator for benchmarking sc_remoted.
 *
 * One single-threaded epoll process that plays both ends of a remote
 * controller: N fake scamper instances (the remote protocol of
 * PROTOCOL.md section 2, optionally over TLS) and the local clients that
 * drive them, either through the per-VP unix sockets (-U, section 4) or
 * through the multiplexed socket (-M, section 5).  It runs one scenario
 * against one already-running daemon and prints its figures as
 * "RESULT name value" lines; bench/run starts the daemons, alternates
 * ours and the reference, and writes BENCHMARKS.md.
 *
 * Every relayed byte is verified.  Each channel carries a deterministic
 * byte stream: byte o of the stream of channel key k is
 * pat_base[(o + shift(k)) mod PAT_PERIOD], PAT_PERIOD being a prime that
 * no frame or buffer size divides; a receiver compares what it gets
 * against the bytes expected at its running offset, so loss,
 * duplication, reordering or a mix-up between channels shows as a
 * mismatch, and the final count must equal what was sent.  The fake
 * scamper checks the protocol as it goes: every frame's seq, every ACK
 * against the oldest unacknowledged frame, MASTER_ID against its own
 * address.  Anything wrong prints a "FAIL ..." line; the exit status is
 * then 2.  Nothing is ever judged on speed.
 *
 * Scenarios (see usage()):
 *   connect   N VPs: handshakes/s, daemon RSS per idle VP, idle CPU
 *   stream    bulk data scamper->client or client->scamper
 *   rtt       command line -> 1 KiB DATA-like block, latency
 *   resume    cut N VPs mid-stream, resume them all at once
 *   relayd    a trivial TCP<->unix relay with 64 KiB buffers (the bound)
 *   relay     stream through relayd
 *
 * Building: cc -O2 -o scbench scbench.c -lssl -lcrypto
 * (-DSCBENCH_NO_TLS to build without OpenSSL).
 */

#define _GNU_SOURCE
#include <sys/types.h>
#include <sys/socket.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <arpa/inet.h>

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#ifndef SCBENCH_NO_TLS
#include <openssl/ssl.h>
#include <openssl/err.h>
#else
typedef struct ssl_st SSL;
#endif

#ifndef IP_BIND_ADDRESS_NO_PORT
#define IP_BIND_ADDRESS_NO_PORT 24
#endif

/* remote protocol */
#define RP_HDR          10
#define RP_MASTER_NEW   0
#define RP_MASTER_ID    1
#define RP_CHANNEL_NEW  2
#define RP_CHANNEL_FIN  3
#define RP_KEEPALIVE    4
#define RP_ACK          5
#define RP_MASTER_RES   6
#define RP_MASTER_REJ   7
#define RP_MASTER_OK    8

/* mux protocol */
#define MUX_HDR         8
#define MUX_VP_UPDATE   0
#define MUX_VP_DEPART   1
#define MUX_GO          2
#define MUX_CHAN_OPEN   3
#define MUX_CHAN_CLOSE  4

#define SCRATCH_SIZE    (512 * 1024)
#define OUT_HIWAT       (256 * 1024)
#define WRITE_MAX       (256 * 1024)
#define PAT_PERIOD      65521
#define PAT_SPAN        (256 * 1024)
#define HELLO_LEN       21          /* "HI vvvvvvvv cccccccc\n" */
#define RTT_BODY        1024
#define KEEPALIVE_NS    (30ULL * 1000000000ULL)
#define STALL_NS        (30ULL * 1000000000ULL)
#define NS              1000000000ULL

/* ---------------------------------------------------------------------
 * Options and global state
 */

static struct sockaddr_in opt_daemon;       /* -P */
static const char *opt_udir;                /* -U */
static const char *opt_mux;                 /* -M */
static pid_t       opt_pid;                 /* -p: daemon pid for RSS/CPU */
static int         opt_nsrc = 8;            /* -S: source addresses */
static int         opt_tls;                 /* -T */
static int         opt_verbose;             /* -v */

static int      g_nfail;
static uint64_t g_progress;                 /* last time anything moved */
static uint8_t *scratch;
static uint8_t *pat_base;
static int      epfd = -1;

#ifndef SCBENCH_NO_TLS
static SSL_CTX *g_ctx;
#endif

enum { MODE_IDLE, MODE_STREAM, MODE_RTT };
static int g_mode = MODE_IDLE;
static int g_running;                       /* data may flow */
static int g_quickack;                      /* TCP_QUICKACK after reads */
static int g_frame = 8192;                  /* data frame payload size */
static int g_cut;                           /* resume: VPs are being cut */

static uint64_t g_s2c_bytes, g_c2s_bytes;   /* verified totals */

static uint64_t now_ns(void)
{
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * NS + (uint64_t)ts.tv_nsec;
}

static void die(const char *fmt, ...)
{
  va_list ap;
  va_start(ap, fmt);
  fputs("scbench: ", stderr);
  vfprintf(stderr, fmt, ap);
  fputc('\n', stderr);
  va_end(ap);
  exit(1);
}

static int proc_alive(pid_t pid);
static int g_daemon_dead;

/* A verification failure: printed (the first 50), counted, exit 2 later */
static void fail(const char *fmt, ...)
{
  va_list ap;
  g_nfail++;
  if(g_nfail > 50 || g_daemon_dead)
    return;
  va_start(ap, fmt);
  fputs("FAIL ", stdout);
  vfprintf(stdout, fmt, ap);
  fputc('\n', stdout);
  va_end(ap);
  fflush(stdout);
}

/* a connection to the daemon ended: if the daemon is gone say so once,
 * and count (but no longer print) the connections that end with it */
static int daemon_died(void)
{
  static uint64_t checked;
  int alive;
  if(g_daemon_dead)
    {
      g_nfail++;
      return 1;
    }
  if(opt_pid <= 0 || now_ns() - checked < NS)
    return 0;
  /* a dying process closes its fds before it becomes a zombie */
  if((alive = proc_alive(opt_pid)) == 1)
    {
      usleep(100000);
      alive = proc_alive(opt_pid);
    }
  checked = now_ns();
  if(alive == 0)
    {
      fail("the daemon (pid %d) has died", (int)opt_pid);
      g_daemon_dead = 1;
      return 1;
    }
  return 0;
}

static void result(const char *name, const char *fmt, ...)
{
  va_list ap;
  va_start(ap, fmt);
  printf("RESULT %s ", name);
  vprintf(fmt, ap);
  putchar('\n');
  va_end(ap);
  fflush(stdout);
}

static void info(const char *fmt, ...)
{
  va_list ap;
  if(!opt_verbose)
    return;
  va_start(ap, fmt);
  fputs("# ", stderr);
  vfprintf(stderr, fmt, ap);
  fputc('\n', stderr);
  va_end(ap);
}

static void *xmalloc(size_t n)
{
  void *p = malloc(n);
  if(p == NULL)
    die("out of memory");
  return p;
}

static void *xrealloc(void *p, size_t n)
{
  if((p = realloc(p, n)) == NULL)
    die("out of memory");
  return p;
}

static void *xcalloc(size_t n, size_t sz)
{
  void *p = calloc(n, sz);
  if(p == NULL)
    die("out of memory");
  return p;
}

static void put32(uint8_t *p, uint32_t v)
{
  p[0] = v >> 24; p[1] = v >> 16; p[2] = v >> 8; p[3] = v;
}

static void put16(uint8_t *p, uint16_t v)
{
  p[0] = v >> 8; p[1] = v;
}

static uint32_t get32(const uint8_t *p)
{
  return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) |
    ((uint32_t)p[2] << 8) | p[3];
}

static uint16_t get16(const uint8_t *p)
{
  return (uint16_t)((p[0] << 8) | p[1]);
}

/* serial comparison a < b (PROTOCOL.md 2.3) */
static int seq_lt(uint32_t a, uint32_t b)
{
  return (int32_t)(a - b) < 0;
}

static void raise_nofile(void)
{
  struct rlimit rl;
  if(getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max)
    {
      rl.rlim_cur = rl.rlim_max;
      setrlimit(RLIMIT_NOFILE, &rl);
    }
}

/* ---------------------------------------------------------------------
 * Daemon process figures from /proc
 */

static long proc_status_kb(pid_t pid, const char *field)
{
  char path[64], line[256];
  size_t flen = strlen(field);
  long v = -1;
  FILE *f;

  if(pid <= 0)
    return -1;
  snprintf(path, sizeof(path), "/proc/%d/status", (int)pid);
  if((f = fopen(path, "r")) == NULL)
    return -1;
  while(fgets(line, sizeof(line), f) != NULL)
    if(strncmp(line, field, flen) == 0 && line[flen] == ':')
      {
	v = strtol(line + flen + 1, NULL, 10);
	break;
      }
  fclose(f);
  return v;
}

/* CPU time used by the daemon so far, in ns (schedstat, else stat ticks) */
static int64_t proc_cpu_ns(pid_t pid)
{
  char path[64], buf[1024], *p;
  unsigned long long ns, ut, st;
  FILE *f;
  int i;

  if(pid <= 0)
    return -1;
  snprintf(path, sizeof(path), "/proc/%d/schedstat", (int)pid);
  if((f = fopen(path, "r")) != NULL)
    {
      if(fscanf(f, "%llu", &ns) == 1 && ns > 0)
	{
	  fclose(f);
	  return (int64_t)ns;
	}
      fclose(f);
    }
  snprintf(path, sizeof(path), "/proc/%d/stat", (int)pid);
  if((f = fopen(path, "r")) == NULL)
    return -1;
  if(fgets(buf, sizeof(buf), f) == NULL)
    {
      fclose(f);
      return -1;
    }
  fclose(f);
  if((p = strrchr(buf, ')')) == NULL)
    return -1;
  p += 2;
  /* fields after the comm: state(3) ... utime(14) stime(15) */
  for(i = 3; i < 14 && p != NULL; i++)
    if((p = strchr(p, ' ')) != NULL)
      p++;
  if(p == NULL || sscanf(p, "%llu %llu", &ut, &st) != 2)
    return -1;
  return (int64_t)((ut + st) * (NS / (unsigned long long)sysconf(_SC_CLK_TCK)));
}

/* CPU time used by scbench itself, in ns */
static int64_t self_cpu_ns(void)
{
  struct rusage ru;
  getrusage(RUSAGE_SELF, &ru);
  return ((int64_t)ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) * (int64_t)NS +
    ((int64_t)ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) * 1000;
}

/* read and write syscalls (/proc/PID/io) and voluntary context switches
 * (times it slept in its poll) of the daemon so far; -1 if unknown */
static void proc_counts(pid_t pid, long long *syscr, long long *syscw,
			long long *vcsw)
{
  char path[64], line[256];
  FILE *f;

  *syscr = *syscw = *vcsw = -1;
  if(pid <= 0)
    return;
  snprintf(path, sizeof(path), "/proc/%d/io", (int)pid);
  if((f = fopen(path, "r")) != NULL)
    {
      while(fgets(line, sizeof(line), f) != NULL)
	{
	  sscanf(line, "syscr: %lld", syscr);
	  sscanf(line, "syscw: %lld", syscw);
	}
      fclose(f);
    }
  *vcsw = proc_status_kb(pid, "voluntary_ctxt_switches");
}

/* time the daemon spent runnable but waiting for a CPU, in ns (-1) */
static int64_t proc_wait_ns(pid_t pid)
{
  char path[64];
  unsigned long long run, wait;
  FILE *f;
  int n;
  if(pid <= 0)
    return -1;
  snprintf(path, sizeof(path), "/proc/%d/schedstat", (int)pid);
  if((f = fopen(path, "r")) == NULL)
    return -1;
  n = fscanf(f, "%llu %llu", &run, &wait);
  fclose(f);
  return n == 2 && run > 0 ? (int64_t)wait : -1;
}

/* a measured window: wall time and the CPU both processes used in it */
typedef struct window
{
  uint64_t  t0;
  int64_t   dcpu0, scpu0, dwait0;
  long long syscr0, syscw0, vcsw0;
} window_t;

static void window_start(window_t *w)
{
  proc_counts(opt_pid, &w->syscr0, &w->syscw0, &w->vcsw0);
  w->dcpu0 = proc_cpu_ns(opt_pid);
  w->dwait0 = proc_wait_ns(opt_pid);
  w->scpu0 = self_cpu_ns();
  w->t0 = now_ns();
}

/* report CPU use over the window; returns the wall time in ns */
/* is the daemon still running (not a zombie)? -1 if unknown */
static int proc_alive(pid_t pid)
{
  char path[64], buf[512], *p;
  FILE *f;
  if(pid <= 0)
    return -1;
  snprintf(path, sizeof(path), "/proc/%d/stat", (int)pid);
  if((f = fopen(path, "r")) == NULL)
    return 0;
  p = fgets(buf, sizeof(buf), f);
  fclose(f);
  if(p == NULL || (p = strrchr(buf, ')')) == NULL || p[1] == '\0')
    return 0;
  return p[2] != 'Z' && p[2] != 'X';
}

static uint64_t window_end(window_t *w)
{
  uint64_t t = now_ns() - w->t0;
  int64_t d = proc_cpu_ns(opt_pid), s = self_cpu_ns(), dw;
  long long r, wr, v;
  if(t == 0)
    t = 1;
  if(d >= 0 && w->dcpu0 >= 0)
    printf("RESULT daemon_cpu_pct %.1f\n", 100.0 * (double)(d - w->dcpu0) / (double)t);
  printf("RESULT scbench_cpu_pct %.1f\n", 100.0 * (double)(s - w->scpu0) / (double)t);
  if((dw = proc_wait_ns(opt_pid)) >= 0 && w->dwait0 >= 0)
    printf("RESULT daemon_runq_wait_pct %.1f\n",
	   100.0 * (double)(dw - w->dwait0) / (double)t);
  proc_counts(opt_pid, &r, &wr, &v);
  if(r >= 0 && w->syscr0 >= 0)
    printf("RESULT daemon_read_syscalls %lld\n"
	   "RESULT daemon_write_syscalls %lld\n", r - w->syscr0, wr - w->syscw0);
  if(v >= 0 && w->vcsw0 >= 0)
    printf("RESULT daemon_sleeps %lld\n", v - w->vcsw0);
  return t;
}

/* ---------------------------------------------------------------------
 * The byte pattern
 *
 * pat_base holds PAT_PERIOD pseudo-random bytes followed by a copy of
 * its first PAT_SPAN bytes, so that the expected bytes at any offset are
 * contiguous for PAT_SPAN bytes.
 */

static void pat_init(void)
{
  uint64_t x = 0x9e3779b97f4a7c15ULL;
  size_t i;

  pat_base = xmalloc(PAT_PERIOD + PAT_SPAN);
  for(i = 0; i < PAT_PERIOD; i++)
    {
      x ^= x << 13; x ^= x >> 7; x ^= x << 17;
      pat_base[i] = (uint8_t)(x >> 24);
    }
  for(i = 0; i < PAT_SPAN; i++)
    pat_base[PAT_PERIOD + i] = pat_base[i % PAT_PERIOD];
}

/* the key of a channel: both ends derive it from the hello */
static uint32_t chan_key(uint32_t vpidx, uint32_t chan)
{
  return vpidx * 64 + chan;
}

/* pointer to PAT_SPAN contiguous expected bytes from offset off */
static const uint8_t *pat_at(uint32_t key, uint64_t off)
{
  uint64_t shift = ((uint64_t)key * 2654435761ULL) % PAT_PERIOD;
  return pat_base + (off + shift) % PAT_PERIOD;
}

/* compare p[0..len) with the stream of key at off; -1 if equal, else
 * the index of the first differing byte */
static long pat_check(uint32_t key, uint64_t off, const uint8_t *p, size_t len)
{
  size_t done = 0, n, i;
  const uint8_t *e;

  while(done < len)
    {
      n = len - done;
      if(n > PAT_SPAN)
	n = PAT_SPAN;
      e = pat_at(key, off + done);
      if(memcmp(e, p + done, n) != 0)
	{
	  for(i = 0; i < n; i++)
	    if(e[i] != p[done + i])
	      return (long)(done + i);
	}
      done += n;
    }
  return -1;
}

/* ---------------------------------------------------------------------
 * Output buffers: a linear byte queue b[off .. off+len)
 */

typedef struct obuf
{
  uint8_t *b;
  size_t   off, len, cap;
} obuf_t;

static uint8_t *ob_reserve(obuf_t *o, size_t n)
{
  if(o->off + o->len + n > o->cap)
    {
      if(o->off > 0)
	{
	  memmove(o->b, o->b + o->off, o->len);
	  o->off = 0;
	}
      if(o->len + n > o->cap)
	{
	  size_t cap = o->cap ? o->cap : 256;
	  while(cap < o->len + n)
	    cap *= 2;
	  o->b = xrealloc(o->b, cap);
	  o->cap = cap;
	}
    }
  return o->b + o->off + o->len;
}

static void ob_append(obuf_t *o, const void *p, size_t n)
{
  memcpy(ob_reserve(o, n), p, n);
  o->len += n;
}

static void ob_consume(obuf_t *o, size_t n)
{
  o->off += n;
  o->len -= n;
  if(o->len == 0)
    o->off = 0;
}

/* ---------------------------------------------------------------------
 * Event loop
 *
 * Every fd belongs to an object that starts with obj_t.  Objects live
 * until the process exits (arrays allocated per scenario), so a stale
 * event for a closed fd finds fd == -1 and is skipped.  Output produced
 * while handling events is flushed once per iteration from the dirty
 * list, so ACKs for a batch of frames coalesce like a real scamper's.
 */

enum { OT_FVP = 1, OT_UC, OT_MUX };

typedef struct obj
{
  int          type;
  int          fd;
  uint32_t     mask;        /* registered epoll events, 0 = none */
  int          dirty;
  struct obj  *next_dirty;
} obj_t;

static obj_t *dirty_head;

static void ev_set(obj_t *o, uint32_t mask)
{
  struct epoll_event ev;
  if(o->fd < 0 || mask == o->mask)
    return;
  memset(&ev, 0, sizeof(ev));
  ev.events = mask;
  ev.data.ptr = o;
  if(epoll_ctl(epfd, o->mask == 0 ? EPOLL_CTL_ADD : EPOLL_CTL_MOD,
	       o->fd, &ev) != 0)
    die("epoll_ctl: %s", strerror(errno));
  o->mask = mask;
}

static void obj_close(obj_t *o)
{
  if(o->fd >= 0)
    {
      close(o->fd);
      o->fd = -1;
    }
  o->mask = 0;
}

static void mark_dirty(obj_t *o)
{
  if(o->dirty)
    return;
  o->dirty = 1;
  o->next_dirty = dirty_head;
  dirty_head = o;
}

static void fvp_event(obj_t *o, uint32_t ev);
static void uc_event(obj_t *o, uint32_t ev);
static void mux_event(obj_t *o, uint32_t ev);
static void fvp_flush_obj(obj_t *o);
static void uc_flush_obj(obj_t *o);
static void mux_flush_obj(obj_t *o);
static void fvp_tick(uint64_t now);

/* one pass over the objects dirty now; objects that mark themselves
 * again while flushing (a pump queueing more) wait for the next pass,
 * so one fast sender cannot keep the loop from reading */
static void flush_dirty(void)
{
  obj_t *o, *list = dirty_head;
  dirty_head = NULL;
  while((o = list) != NULL)
    {
      list = o->next_dirty;
      o->dirty = 0;
      if(o->fd < 0)
	continue;
      switch(o->type)
	{
	case OT_FVP: fvp_flush_obj(o); break;
	case OT_UC:  uc_flush_obj(o);  break;
	case OT_MUX: mux_flush_obj(o); break;
	}
    }
}

/* one iteration: wait at most timeout_ms, dispatch, flush */
static void loop_once(int timeout_ms)
{
  static struct epoll_event evs[1024];
  static uint64_t last_tick;
  uint64_t now;
  obj_t *o;
  int i, n;

  flush_dirty();
  n = epoll_wait(epfd, evs, 1024, timeout_ms);
  if(n < 0 && errno != EINTR)
    die("epoll_wait: %s", strerror(errno));
  for(i = 0; i < n; i++)
    {
      o = evs[i].data.ptr;
      if(o->fd < 0)
	continue;
      switch(o->type)
	{
	case OT_FVP: fvp_event(o, evs[i].events); break;
	case OT_UC:  uc_event(o, evs[i].events);  break;
	case OT_MUX: mux_event(o, evs[i].events); break;
	}
    }
  flush_dirty();
  now = now_ns();
  if(now - last_tick >= NS)
    {
      last_tick = now;
      fvp_tick(now);
    }
}

/* run the loop until cond() holds; a stall of STALL_NS fails */
static int loop_until(int (*cond)(void), const char *what)
{
  uint64_t now;
  g_progress = now_ns();
  while(!cond())
    {
      loop_once(100);
      now = now_ns();
      if(now - g_progress > STALL_NS)
	{
	  fail("%s: no progress for %llu s", what,
	       (unsigned long long)(STALL_NS / NS));
	  return -1;
	}
    }
  return 0;
}

static void loop_for(uint64_t ns)
{
  uint64_t end = now_ns() + ns, now;
  while((now = now_ns()) < end)
    {
      uint64_t left = (end - now) / 1000000;
      loop_once(left > 100 ? 100 : (int)left + 1);
    }
}

/* ---------------------------------------------------------------------
 * Fake scamper (one "VP")
 *
 * Reliable frames are kept as descriptors (seq, channel, kind, arg) in a
 * ring until ACKed; their bytes are regenerated from the descriptor when
 * they are first sent and when a resume retransmits them.
 */

enum { FS_IDLE, FS_CONNECTING, FS_TLS, FS_WAIT_ID, FS_GO, FS_WAIT_OK,
       FS_CUT, FS_DEAD };

enum { FK_PAT, FK_HELLO, FK_OK, FK_DHDR, FK_BODY };

typedef struct fdesc
{
  uint32_t seq;
  uint32_t chan;
  uint32_t len;
  uint32_t kind;
  uint64_t arg;
} fdesc_t;

typedef struct fchan
{
  uint32_t id, key;
  uint64_t tx_off, tx_total;       /* scamper->client bytes queued */
  uint64_t rx_off, rx_total;       /* client->scamper bytes verified */
  uint32_t lines;                  /* rtt: command lines seen */
  int      bad;
} fchan_t;

typedef struct fvp
{
  obj_t     o;
  uint32_t  idx;
  int       state;
  SSL      *ssl;
  int       tls_ww;                /* TLS wants the socket writable */
  int       resuming;
  uint8_t   magic[8];
  char      name[16];
  char      local[48];             /* a.b.c.d:port as remoted will see it */
  uint32_t  snd_nxt, rcv_nxt;
  uint32_t  res_una, res_nxt;      /* what MASTER_RES said */
  fdesc_t  *ua;                    /* unacked ring */
  uint32_t  ua_head, ua_n, ua_cap;
  obuf_t    out;
  uint8_t  *part;                  /* partial frame */
  uint32_t  part_len, part_cap;
  fchan_t  *ch;
  int       nch, chcap;
  int       rr;
  uint64_t  last_tx;
  uint64_t  t_start, t_go;
  uint32_t  vpid;                  /* from the mux */
  uint64_t  ka_rx;
} fvp_t;

static fvp_t   *vps;
static uint32_t nvps;
static uint32_t g_go, g_ok, g_rej, g_dead;
static uint32_t conn_next, conn_end, conn_inflight, conn_window;

static void fvp_lost(fvp_t *vp, const char *fmt, ...);

static void ua_push(fvp_t *vp, const fdesc_t *d)
{
  if(vp->ua_n == vp->ua_cap)
    {
      uint32_t cap = vp->ua_cap ? vp->ua_cap * 2 : 16, i;
      fdesc_t *n = xmalloc(sizeof(fdesc_t) * cap);
      for(i = 0; i < vp->ua_n; i++)
	n[i] = vp->ua[(vp->ua_head + i) & (vp->ua_cap - 1)];
      free(vp->ua);
      vp->ua = n;
      vp->ua_cap = cap;
      vp->ua_head = 0;
    }
  vp->ua[(vp->ua_head + vp->ua_n) & (vp->ua_cap - 1)] = *d;
  vp->ua_n++;
}

static fdesc_t *ua_front(fvp_t *vp)
{
  return vp->ua_n ? &vp->ua[vp->ua_head] : NULL;
}

static void ua_pop(fvp_t *vp)
{
  vp->ua_head = (vp->ua_head + 1) & (vp->ua_cap - 1);
  vp->ua_n--;
}

static fchan_t *fvp_chan(fvp_t *vp, uint32_t id)
{
  int i;
  for(i = 0; i < vp->nch; i++)
    if(vp->ch[i].id == id)
      return &vp->ch[i];
  return NULL;
}

static void rtt_body(uint32_t n, uint8_t *b)
{
  int i;
  for(i = 0; i < RTT_BODY - 1; i++)
    b[i] = (uint8_t)('A' + (i + n) % 26);
  b[RTT_BODY - 1] = '\n';
}

/* the payload of a descriptor: into buf (or a pointer into the pattern) */
static const uint8_t *fdesc_payload(const fvp_t *vp, const fdesc_t *d,
				    uint8_t *buf)
{
  switch(d->kind)
    {
    case FK_PAT:
      return pat_at(chan_key(vp->idx, d->chan), d->arg);
    case FK_HELLO:
      snprintf((char *)buf, 64, "HI %08x %08x\n", vp->idx, d->chan);
      return buf;
    case FK_OK:
      snprintf((char *)buf, 64, "OK id-%u\n", (unsigned)d->arg);
      return buf;
    case FK_DHDR:
      snprintf((char *)buf, 64, "DATA %d id-%u\n", RTT_BODY,
	       (unsigned)d->arg);
      return buf;
    case FK_BODY:
      rtt_body((uint32_t)d->arg, buf);
      return buf;
    }
  return buf;
}

static void fvp_hdr(uint8_t *h, uint32_t seq, uint32_t chan, uint32_t len)
{
  put32(h, seq);
  put32(h + 4, chan);
  put16(h + 8, (uint16_t)len);
}

static void fvp_emit(fvp_t *vp, const fdesc_t *d)
{
  uint8_t tmp[RTT_BODY];
  uint8_t *w = ob_reserve(&vp->out, RP_HDR + d->len);
  fvp_hdr(w, d->seq, d->chan, d->len);
  memcpy(w + RP_HDR, fdesc_payload(vp, d, tmp), d->len);
  vp->out.len += RP_HDR + d->len;
  mark_dirty(&vp->o);
}

/* a reliable data frame: numbered, kept until ACKed, sent if connected */
static void fvp_send_reliable(fvp_t *vp, uint32_t chan, uint32_t kind,
			      uint64_t arg, uint32_t len)
{
  fdesc_t d;
  d.seq = vp->snd_nxt++;
  d.chan = chan;
  d.len = len;
  d.kind = kind;
  d.arg = arg;
  ua_push(vp, &d);
  if(vp->state == FS_GO)
    fvp_emit(vp, &d);
}

/* ACK or KEEPALIVE: carries snd_nxt, dropped while not connected */
static void fvp_send_unreliable(fvp_t *vp, uint8_t type, uint32_t *ackseq)
{
  uint8_t *w;
  uint32_t len = ackseq != NULL ? 5 : 1;
  if(vp->state != FS_GO)
    return;
  w = ob_reserve(&vp->out, RP_HDR + len);
  fvp_hdr(w, vp->snd_nxt, 0, len);
  w[RP_HDR] = type;
  if(ackseq != NULL)
    put32(w + RP_HDR + 1, *ackseq);
  vp->out.len += RP_HDR + len;
  mark_dirty(&vp->o);
}

static void fvp_send_ack(fvp_t *vp, uint32_t seq)
{
  fvp_send_unreliable(vp, RP_ACK, &seq);
}

/* queue more scamper->client stream data; returns non-zero if it did */
static int fvp_pump(fvp_t *vp)
{
  int did = 0, tries;
  fchan_t *c = NULL;
  uint64_t left;
  uint32_t n;

  if(!g_running || g_mode != MODE_STREAM || vp->state != FS_GO ||
     vp->nch == 0)
    return 0;
  while(vp->out.len < OUT_HIWAT)
    {
      for(tries = 0; tries < vp->nch; tries++)
	{
	  c = &vp->ch[vp->rr];
	  vp->rr = (vp->rr + 1) % vp->nch;
	  if(c->tx_off < c->tx_total)
	    break;
	}
      if(tries == vp->nch)
	break;
      left = c->tx_total - c->tx_off;
      n = left < (uint64_t)g_frame ? (uint32_t)left : (uint32_t)g_frame;
      fvp_send_reliable(vp, c->id, FK_PAT, c->tx_off, n);
      c->tx_off += n;
      did = 1;
    }
  return did;
}

/* ---- transport: plain or TLS ---- */

static ssize_t fvp_read_raw(fvp_t *vp, uint8_t *buf, size_t len)
{
#ifndef SCBENCH_NO_TLS
  if(vp->ssl != NULL)
    {
      int n, e;
      ERR_clear_error();
      if((n = SSL_read(vp->ssl, buf, (int)len)) > 0)
	return n;
      e = SSL_get_error(vp->ssl, n);
      if(e == SSL_ERROR_WANT_READ)
	{ errno = EAGAIN; return -1; }
      if(e == SSL_ERROR_WANT_WRITE)
	{ vp->tls_ww = 1; errno = EAGAIN; return -1; }
      if(e == SSL_ERROR_ZERO_RETURN)
	return 0;
      errno = EIO;
      return -1;
    }
#endif
  return read(vp->o.fd, buf, len);
}

static ssize_t fvp_write_raw(fvp_t *vp, const uint8_t *buf, size_t len)
{
#ifndef SCBENCH_NO_TLS
  if(vp->ssl != NULL)
    {
      int n, e;
      if(len > 1 << 20)
	len = 1 << 20;
      ERR_clear_error();
      vp->tls_ww = 0;
      if((n = SSL_write(vp->ssl, buf, (int)len)) > 0)
	return n;
      e = SSL_get_error(vp->ssl, n);
      if(e == SSL_ERROR_WANT_WRITE)
	{ vp->tls_ww = 1; errno = EAGAIN; return -1; }
      if(e == SSL_ERROR_WANT_READ)
	{ errno = EAGAIN; return -1; }
      errno = EIO;
      return -1;
    }
#endif
  return write(vp->o.fd, buf, len);
}

/* does vp have stream data it has not queued yet? */
static int fvp_more(const fvp_t *vp)
{
  int i;
  if(!g_running || g_mode != MODE_STREAM || vp->state != FS_GO)
    return 0;
  for(i = 0; i < vp->nch; i++)
    if(vp->ch[i].tx_off < vp->ch[i].tx_total)
      return 1;
  return 0;
}

static void fvp_set_events(fvp_t *vp)
{
  uint32_t m;
  if(vp->o.fd < 0)
    return;
  if(vp->state == FS_CONNECTING)
    m = EPOLLOUT;
  else
    m = EPOLLIN |
      ((vp->out.len > 0 || vp->tls_ww || fvp_more(vp)) ? EPOLLOUT : 0);
  ev_set(&vp->o, m);
}

static void fvp_flush(fvp_t *vp)
{
  ssize_t n;
  int round;

  if(vp->o.fd < 0 || vp->state == FS_CONNECTING || vp->state == FS_TLS)
    return;
  for(round = 0; round < 8; round++)
    {
      if(vp->out.len == 0 && !fvp_pump(vp))
	break;
      n = fvp_write_raw(vp, vp->out.b + vp->out.off,
			vp->out.len > WRITE_MAX && vp->ssl == NULL ?
			WRITE_MAX : vp->out.len);
      if(n > 0)
	{
	  ob_consume(&vp->out, (size_t)n);
	  vp->last_tx = now_ns();
	  continue;
	}
      if(n < 0 && (errno == EAGAIN || errno == EINTR))
	break;
      fvp_lost(vp, "write: %s", n < 0 ? strerror(errno) : "0");
      return;
    }
  fvp_set_events(vp);
}

static void fvp_flush_obj(obj_t *o)
{
  fvp_flush((fvp_t *)o);
}

static void fvp_lost(fvp_t *vp, const char *fmt, ...)
{
  char msg[256];
  va_list ap;

  va_start(ap, fmt);
  vsnprintf(msg, sizeof(msg), fmt, ap);
  va_end(ap);
  fail("vp %u (%s, %s): %s", vp->idx, vp->name, vp->local, msg);
  if(vp->state == FS_CONNECTING || vp->state == FS_TLS ||
     vp->state == FS_WAIT_ID || vp->state == FS_WAIT_OK)
    conn_inflight--;
#ifndef SCBENCH_NO_TLS
  if(vp->ssl != NULL)
    {
      SSL_free(vp->ssl);
      vp->ssl = NULL;
    }
#endif
  obj_close(&vp->o);
  vp->state = FS_DEAD;
  g_dead++;
}

/* ---- handshake ---- */

static void fvp_send_hello(fvp_t *vp)
{
  uint8_t b[64];
  size_t len;

  if(!vp->resuming)
    {
      size_t nl = strlen(vp->name) + 1;
      b[RP_HDR] = RP_MASTER_NEW;
      b[RP_HDR + 1] = 8;
      memcpy(b + RP_HDR + 2, vp->magic, 8);
      b[RP_HDR + 10] = (uint8_t)nl;
      memcpy(b + RP_HDR + 11, vp->name, nl);
      len = 11 + nl;
      vp->state = FS_WAIT_ID;
    }
  else
    {
      fdesc_t *f = ua_front(vp);
      vp->res_una = f != NULL ? f->seq : vp->snd_nxt;
      vp->res_nxt = vp->snd_nxt;
      b[RP_HDR] = RP_MASTER_RES;
      b[RP_HDR + 1] = 8;
      memcpy(b + RP_HDR + 2, vp->magic, 8);
      put32(b + RP_HDR + 10, vp->rcv_nxt);
      put32(b + RP_HDR + 14, vp->res_una);
      put32(b + RP_HDR + 18, vp->res_nxt);
      len = 22;
      vp->state = FS_WAIT_OK;
    }
  fvp_hdr(b, 0, 0, (uint32_t)len);
  ob_append(&vp->out, b, RP_HDR + len);
  mark_dirty(&vp->o);
}

#ifndef SCBENCH_NO_TLS
static void fvp_tls_step(fvp_t *vp)
{
  int n, e;
  ERR_clear_error();
  vp->tls_ww = 0;
  if((n = SSL_do_handshake(vp->ssl)) == 1)
    {
      fvp_send_hello(vp);
      fvp_flush(vp);
      return;
    }
  e = SSL_get_error(vp->ssl, n);
  if(e == SSL_ERROR_WANT_READ)
    ev_set(&vp->o, EPOLLIN);
  else if(e == SSL_ERROR_WANT_WRITE)
    ev_set(&vp->o, EPOLLOUT);
  else
    {
      char eb[160];
      ERR_error_string_n(ERR_get_error(), eb, sizeof(eb));
      fvp_lost(vp, "TLS handshake: %s", eb);
    }
}
#endif

static void fvp_connected(fvp_t *vp)
{
  struct sockaddr_in sin;
  socklen_t sl = sizeof(sin);
  int err = 0;

  sl = sizeof(err);
  if(getsockopt(vp->o.fd, SOL_SOCKET, SO_ERROR, &err, &sl) != 0 || err != 0)
    {
      fvp_lost(vp, "connect: %s", strerror(err ? err : errno));
      return;
    }
  sl = sizeof(sin);
  if(getsockname(vp->o.fd, (struct sockaddr *)&sin, &sl) != 0)
    {
      fvp_lost(vp, "getsockname: %s", strerror(errno));
      return;
    }
  snprintf(vp->local, sizeof(vp->local), "%s:%u",
	   inet_ntoa(sin.sin_addr), ntohs(sin.sin_port));
#ifndef SCBENCH_NO_TLS
  if(opt_tls)
    {
      if((vp->ssl = SSL_new(g_ctx)) == NULL)
	die("SSL_new failed");
      SSL_set_fd(vp->ssl, vp->o.fd);
      SSL_set_connect_state(vp->ssl);
      vp->state = FS_TLS;
      fvp_tls_step(vp);
      return;
    }
#endif
  fvp_send_hello(vp);
  vp->state = vp->resuming ? FS_WAIT_OK : FS_WAIT_ID;
  fvp_flush(vp);
}

/* start a TCP connection for vp: a new session, or a resume */
static void fvp_connect(fvp_t *vp, int resume)
{
  struct sockaddr_in src;
  int fd, one = 1;

  if((fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC,
		  0)) < 0)
    die("socket: %s (raise the fd limit)", strerror(errno));
  setsockopt(fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof(one));
  memset(&src, 0, sizeof(src));
  src.sin_family = AF_INET;
  src.sin_addr.s_addr = htonl(0x7f000002U + (vp->idx % (uint32_t)opt_nsrc));
  if(bind(fd, (struct sockaddr *)&src, sizeof(src)) != 0)
    die("bind 127.0.0.%u: %s", 2 + vp->idx % opt_nsrc, strerror(errno));
  /* scamper sets TCP_NODELAY on its remote socket */
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  vp->o.type = OT_FVP;
  vp->o.fd = fd;
  vp->o.mask = 0;
  vp->resuming = resume;
  vp->part_len = 0;
  vp->tls_ww = 0;
  vp->t_start = now_ns();
  vp->state = FS_CONNECTING;
  conn_inflight++;
  if(connect(fd, (struct sockaddr *)&opt_daemon, sizeof(opt_daemon)) != 0 &&
     errno != EINPROGRESS)
    {
      fvp_lost(vp, "connect: %s", strerror(errno));
      return;
    }
  fvp_set_events(vp);
}

/* keep conn_window connection attempts in progress */
static void connect_more(void)
{
  while(conn_next < conn_end && conn_inflight < conn_window)
    fvp_connect(&vps[conn_next++], 0);
}

/* ---- receive ---- */

static void fvp_on_chan_new(fvp_t *vp, uint32_t id)
{
  fchan_t *c;
  if(fvp_chan(vp, id) != NULL)
    {
      fvp_lost(vp, "CHANNEL_NEW for channel %u twice", id);
      return;
    }
  if(vp->nch == vp->chcap)
    {
      vp->chcap = vp->chcap ? vp->chcap * 2 : 4;
      vp->ch = xrealloc(vp->ch, sizeof(fchan_t) * vp->chcap);
    }
  c = &vp->ch[vp->nch++];
  memset(c, 0, sizeof(*c));
  c->id = id;
  c->key = chan_key(vp->idx, id);
  /* like scamper's "MORE": the client learns the channel id from it */
  fvp_send_reliable(vp, id, FK_HELLO, 0, HELLO_LEN);
}

static void fvp_on_data(fvp_t *vp, uint32_t id, const uint8_t *p, uint32_t len)
{
  fchan_t *c = fvp_chan(vp, id);
  const uint8_t *nl, *end = p + len;
  long bad;

  if(c == NULL)
    {
      fvp_lost(vp, "data for unknown channel %u", id);
      return;
    }
  if(g_mode == MODE_RTT)
    {
      while((nl = memchr(p, '\n', (size_t)(end - p))) != NULL)
	{
	  c->lines++;
	  fvp_send_reliable(vp, id, FK_OK, c->lines,
			    (uint32_t)snprintf(NULL, 0, "OK id-%u\n", c->lines));
	  fvp_send_reliable(vp, id, FK_DHDR, c->lines,
			    (uint32_t)snprintf(NULL, 0, "DATA %d id-%u\n",
					       RTT_BODY, c->lines));
	  fvp_send_reliable(vp, id, FK_BODY, c->lines, RTT_BODY);
	  p = nl + 1;
	}
      return;
    }
  if(c->bad)
    return;
  if(c->rx_off + len > c->rx_total)
    {
      fail("vp %u chan %u: client->scamper %" PRIu64 " bytes beyond the %"
	   PRIu64 " sent (duplication)", vp->idx, id,
	   c->rx_off + len - c->rx_total, c->rx_total);
      c->bad = 1;
      return;
    }
  if((bad = pat_check(c->key, c->rx_off, p, len)) >= 0)
    {
      fail("vp %u chan %u: client->scamper byte %" PRIu64 " differs "
	   "(loss, duplication or reordering)", vp->idx, id,
	   c->rx_off + (uint64_t)bad);
      c->bad = 1;
      return;
    }
  c->rx_off += len;
  g_c2s_bytes += len;
  g_progress = now_ns();
}

static void fvp_on_master_ok(fvp_t *vp, uint32_t r)
{
  fdesc_t *f;
  uint32_t i;

  if(seq_lt(r, vp->res_una) || seq_lt(vp->res_nxt, r))
    {
      fvp_lost(vp, "MASTER_OK rcv_nxt %u outside [%u, %u]", r,
	       vp->res_una, vp->res_nxt);
      return;
    }
  while((f = ua_front(vp)) != NULL && seq_lt(f->seq, r))
    ua_pop(vp);
  vp->state = FS_GO;
  for(i = 0; i < vp->ua_n; i++)
    fvp_emit(vp, &vp->ua[(vp->ua_head + i) & (vp->ua_cap - 1)]);
  g_ok++;
  vp->t_go = now_ns();
  g_progress = vp->t_go;
  conn_inflight--;
  mark_dirty(&vp->o);
}

/* one complete frame from remoted; returns -1 if vp was closed */
static int fvp_frame(fvp_t *vp, uint32_t seq, uint32_t chan,
		     const uint8_t *b, uint32_t len)
{
  fdesc_t *f;
  uint32_t v;

  if(vp->state == FS_WAIT_ID)
    {
      if(seq != 0 || chan != 0 || len < 3 || b[0] != RP_MASTER_ID ||
	 b[1] == 0 || len != 2U + b[1] || b[len - 1] != '\0')
	{
	  fvp_lost(vp, "bad MASTER_ID (seq %u chan %u len %u type %u)",
		   seq, chan, len, len ? b[0] : 0);
	  return -1;
	}
      if(strcmp((const char *)b + 2, vp->local) != 0)
	{
	  fvp_lost(vp, "MASTER_ID \"%s\", expected \"%s\"", b + 2, vp->local);
	  return -1;
	}
      vp->state = FS_GO;
      vp->t_go = now_ns();
      g_progress = vp->t_go;
      g_go++;
      conn_inflight--;
      connect_more();
      return 0;
    }
  if(vp->state == FS_WAIT_OK)
    {
      if(seq != 0 || chan != 0 || len < 1)
	{
	  fvp_lost(vp, "bad reply to MASTER_RES (seq %u chan %u len %u)",
		   seq, chan, len);
	  return -1;
	}
      if(b[0] == RP_MASTER_REJ)
	{
	  g_rej++;
	  fvp_lost(vp, "MASTER_REJ in reply to MASTER_RES");
	  return -1;
	}
      if(b[0] != RP_MASTER_OK || len != 5)
	{
	  fvp_lost(vp, "bad MASTER_OK (type %u len %u)", b[0], len);
	  return -1;
	}
      fvp_on_master_ok(vp, get32(b + 1));
      return vp->state == FS_GO ? 0 : -1;
    }
  if(vp->state != FS_GO)
    return -1;
  if(seq != vp->rcv_nxt)
    {
      fvp_lost(vp, "frame seq %u, expected %u (chan %u len %u)", seq,
	       vp->rcv_nxt, chan, len);
      return -1;
    }
  if(chan != 0)
    {
      fvp_send_ack(vp, seq);
      vp->rcv_nxt++;
      fvp_on_data(vp, chan, b, len);
      return vp->state == FS_GO ? 0 : -1;
    }
  if(len < 1)
    {
      fvp_lost(vp, "empty control frame");
      return -1;
    }
  switch(b[0])
    {
    case RP_ACK:
      if(len != 5)
	{ fvp_lost(vp, "ACK of length %u", len); return -1; }
      v = get32(b + 1);
      if((f = ua_front(vp)) == NULL)
	{ fvp_lost(vp, "ACK %u with nothing outstanding", v); return -1; }
      if(f->seq != v)
	{
	  fvp_lost(vp, "ACK %u, oldest unacked is %u", v, f->seq);
	  return -1;
	}
      ua_pop(vp);
      return 0;
    case RP_KEEPALIVE:
      if(len != 1)
	{ fvp_lost(vp, "KEEPALIVE of length %u", len); return -1; }
      vp->ka_rx++;
      return 0;
    case RP_CHANNEL_NEW:
      if(len != 5)
	{ fvp_lost(vp, "CHANNEL_NEW of length %u", len); return -1; }
      fvp_send_ack(vp, seq);
      vp->rcv_nxt++;
      fvp_on_chan_new(vp, get32(b + 1));
      return vp->state == FS_GO ? 0 : -1;
    case RP_CHANNEL_FIN:
      if(len != 5)
	{ fvp_lost(vp, "CHANNEL_FIN of length %u", len); return -1; }
      fvp_send_ack(vp, seq);
      vp->rcv_nxt++;
      fail("vp %u: unexpected CHANNEL_FIN for channel %u", vp->idx,
	   get32(b + 1));
      return 0;
    }
  fvp_lost(vp, "unexpected control type %u in GO mode", b[0]);
  return -1;
}

/* parse frames in p[0..len); keep a trailing partial frame */
static void fvp_input(fvp_t *vp, const uint8_t *p, size_t len)
{
  uint32_t flen;
  while(len >= RP_HDR)
    {
      flen = get16(p + 8);
      if(len < RP_HDR + flen)
	break;
      if(fvp_frame(vp, get32(p), get32(p + 4), p + RP_HDR, flen) != 0)
	return;
      p += RP_HDR + flen;
      len -= RP_HDR + flen;
    }
  if(len > 0)
    {
      if(vp->part_cap < RP_HDR + 65535)
	{
	  vp->part_cap = RP_HDR + 65535;
	  vp->part = xrealloc(vp->part, vp->part_cap);
	}
      memmove(vp->part, p, len);
      vp->part_len = (uint32_t)len;
    }
}

/* read and parse: once for plaintext (epoll is level-triggered); for TLS
 * until OpenSSL wants the socket again, since decrypted bytes it holds
 * would not wake epoll */
static void fvp_read(fvp_t *vp)
{
  size_t have;
  ssize_t n;

  do
    {
      have = vp->part_len;
      if(have > 0)
	memcpy(scratch, vp->part, have);
      vp->part_len = 0;
      n = fvp_read_raw(vp, scratch + have, SCRATCH_SIZE - have);
      if(n <= 0)
	{
	  vp->part_len = (uint32_t)have;
	  if(have > 0)
	    memcpy(vp->part, scratch, have);
	  if(n < 0 && (errno == EAGAIN || errno == EINTR))
	    break;
	  if(g_cut)
	    return;
	  daemon_died();
	  fvp_lost(vp, "%s from daemon", n == 0 ? "EOF" : strerror(errno));
	  return;
	}
      if(g_quickack)
	{
	  int one = 1;
	  setsockopt(vp->o.fd, IPPROTO_TCP, TCP_QUICKACK, &one, sizeof(one));
	}
      fvp_input(vp, scratch, have + (size_t)n);
      if(vp->o.fd < 0)
	return;
    }
  while(vp->ssl != NULL);
}

static void fvp_event(obj_t *o, uint32_t ev)
{
  fvp_t *vp = (fvp_t *)o;

  if(vp->state == FS_CONNECTING)
    {
      fvp_connected(vp);
      return;
    }
#ifndef SCBENCH_NO_TLS
  if(vp->state == FS_TLS)
    {
      fvp_tls_step(vp);
      return;
    }
#endif
  if(ev & (EPOLLIN | EPOLLERR | EPOLLHUP))
    {
      fvp_read(vp);
      if(vp->o.fd < 0)
	return;
    }
  if(ev & EPOLLOUT)
    fvp_flush(vp);
}

/* once a second: keepalives after 30 s without sending */
static void fvp_tick(uint64_t now)
{
  uint32_t i;
  for(i = 0; i < nvps; i++)
    if(vps[i].state == FS_GO && now - vps[i].last_tx >= KEEPALIVE_NS)
      {
	vps[i].last_tx = now;
	fvp_send_unreliable(&vps[i], RP_KEEPALIVE, NULL);
      }
}

static void vps_alloc(uint32_t n)
{
  uint32_t i;
  uint64_t r = (uint64_t)now_ns() ^ ((uint64_t)getpid() << 32);

  vps = xcalloc(n, sizeof(fvp_t));
  nvps = n;
  for(i = 0; i < n; i++)
    {
      fvp_t *vp = &vps[i];
      vp->idx = i;
      vp->o.type = OT_FVP;
      vp->o.fd = -1;
      put32(vp->magic, i);
      r ^= r << 13; r ^= r >> 7; r ^= r << 17;
      put32(vp->magic + 4, (uint32_t)r);
      snprintf(vp->name, sizeof(vp->name), "b%u", i);
    }
}

static int cond_connected(void)
{
  return conn_next >= conn_end && conn_inflight == 0;
}

/* connect vps[first .. first+n) with window w; returns elapsed ns */
static uint64_t vps_connect(uint32_t first, uint32_t n, uint32_t w)
{
  uint64_t t0 = now_ns();
  conn_next = first;
  conn_end = first + n;
  conn_window = w;
  connect_more();
  loop_until(cond_connected, "connecting VPs");
  return now_ns() - t0;
}

/* ---------------------------------------------------------------------
 * Local clients
 *
 * An ep_t is the client end of one channel, reached through its own
 * -U socket (uc_t) or through the mux (mux_t).  It first reads the
 * 21-byte hello the fake scamper sends on every new channel, which names
 * the VP and the remote channel id (so both ends derive the same key),
 * then verifies the scamper->client stream, writes the client->scamper
 * stream, or runs command/response round trips.
 */

typedef struct ep
{
  obj_t    *owner;              /* the uc_t or the mux_t */
  uint32_t  mchan;              /* mux: client channel id */
  uint32_t  vpidx, chan, key;
  uint8_t   hello[HELLO_LEN];
  uint32_t  hello_got;
  int       ready, bad, done;
  uint64_t  rx_off, rx_total;   /* scamper->client verified */
  uint64_t  tx_off, tx_total;   /* client->scamper written */
  /* rtt */
  uint32_t  n;                  /* commands sent */
  int       waiting;
  uint64_t  t_sent;
  uint32_t  resp_got, resp_len;
  uint8_t   resp[RTT_BODY + 64];
} ep_t;

typedef struct uc
{
  obj_t   o;
  ep_t    ep;
  obuf_t  out;
} uc_t;

typedef struct mux
{
  obj_t     o;
  obuf_t    out;
  uint8_t  *part;
  size_t    part_len, part_cap;
  int       go;
  ep_t     *eps;                /* indexed by client channel id - 1 */
  uint32_t  neps;
  int       rr;
  uint32_t  known;              /* VPs announced */
} mux_t;

static ep_t    **eps;           /* every endpoint, in creation order */
static uint32_t  neps;
static uint32_t  g_ready, g_eps_done;
static uc_t     *ucs;
static mux_t    *g_mux;

/* rtt samples */
static uint64_t *rtt_lat;       /* ns */
static uint64_t *rtt_when;      /* completion time */
static size_t    rtt_n, rtt_cap;
static uint64_t  rtt_stop;      /* no new commands after this time */
static uint32_t  rtt_warm = 10; /* commands per endpoint not sampled */

static void ep_rtt_send(ep_t *ep);
static void uc_flush(uc_t *uc);
static void mux_flush(mux_t *mux);

static void ep_done(ep_t *ep)
{
  if(!ep->done)
    {
      ep->done = 1;
      g_eps_done++;
    }
}

/* bytes from the daemon for this endpoint */
static void ep_input(ep_t *ep, const uint8_t *p, size_t len)
{
  uint32_t vpidx, chan, n;
  long bad;

  if(ep->hello_got < HELLO_LEN)
    {
      n = HELLO_LEN - ep->hello_got;
      if(n > len)
	n = (uint32_t)len;
      memcpy(ep->hello + ep->hello_got, p, n);
      ep->hello_got += n;
      p += n;
      len -= n;
      if(ep->hello_got < HELLO_LEN)
	return;
      if(sscanf((char *)ep->hello, "HI %8x %8x\n", &vpidx, &chan) != 2 ||
	 ep->hello[HELLO_LEN - 1] != '\n' || vpidx != ep->vpidx)
	{
	  fail("endpoint on vp %u: bad hello \"%.*s\"", ep->vpidx,
	       HELLO_LEN - 1, ep->hello);
	  ep->bad = 1;
	  return;
	}
      ep->chan = chan;
      ep->key = chan_key(vpidx, chan);
      ep->ready = 1;
      g_ready++;
      g_progress = now_ns();
    }
  if(len == 0 || ep->bad)
    return;
  if(g_mode == MODE_RTT)
    {
      if(!ep->waiting || ep->resp_got + len > ep->resp_len ||
	 memcmp(ep->resp + ep->resp_got, p, len) != 0)
	{
	  fail("vp %u chan %u: response to command %u differs from what "
	       "scamper sent", ep->vpidx, ep->chan, ep->n);
	  ep->bad = 1;
	  return;
	}
      ep->resp_got += (uint32_t)len;
      if(ep->resp_got == ep->resp_len)
	{
	  uint64_t now = now_ns();
	  ep->waiting = 0;
	  g_progress = now;
	  if(ep->n > rtt_warm)
	    {
	      if(rtt_n == rtt_cap)
		{
		  rtt_cap = rtt_cap ? rtt_cap * 2 : 4096;
		  rtt_lat = xrealloc(rtt_lat, rtt_cap * sizeof(uint64_t));
		  rtt_when = xrealloc(rtt_when, rtt_cap * sizeof(uint64_t));
		}
	      rtt_lat[rtt_n] = now - ep->t_sent;
	      rtt_when[rtt_n] = now;
	      rtt_n++;
	    }
	  if(now < rtt_stop)
	    ep_rtt_send(ep);
	  else
	    ep_done(ep);
	}
      return;
    }
  if(ep->rx_off + len > ep->rx_total)
    {
      fail("vp %u chan %u: scamper->client %" PRIu64 " bytes beyond the %"
	   PRIu64 " sent (duplication)", ep->vpidx, ep->chan,
	   ep->rx_off + len - ep->rx_total, ep->rx_total);
      ep->bad = 1;
      return;
    }
  if((bad = pat_check(ep->key, ep->rx_off, p, len)) >= 0)
    {
      fail("vp %u chan %u: scamper->client byte %" PRIu64 " differs "
	   "(loss, duplication or reordering)", ep->vpidx, ep->chan,
	   ep->rx_off + (uint64_t)bad);
      ep->bad = 1;
      return;
    }
  ep->rx_off += len;
  g_s2c_bytes += len;
  g_progress = now_ns();
  if(ep->rx_off == ep->rx_total && ep->rx_total > 0)
    ep_done(ep);
}

/* the next command line, and the response it must produce */
static void ep_rtt_send(ep_t *ep)
{
  char line[64];
  int len, a, b;

  ep->n++;
  len = snprintf(line, sizeof(line), "ping -c 1 192.0.2.%u\n", ep->n % 256);
  a = snprintf((char *)ep->resp, 64, "OK id-%u\n", ep->n);
  b = snprintf((char *)ep->resp + a, 64, "DATA %d id-%u\n", RTT_BODY, ep->n);
  rtt_body(ep->n, ep->resp + a + b);
  ep->resp_len = (uint32_t)(a + b + RTT_BODY);
  ep->resp_got = 0;
  ep->waiting = 1;
  ep->t_sent = now_ns();
  if(ep->owner->type == OT_UC)
    {
      uc_t *uc = (uc_t *)ep->owner;
      ob_append(&uc->out, line, (size_t)len);
      uc_flush(uc);
    }
  else
    {
      mux_t *mux = (mux_t *)ep->owner;
      uint8_t *w = ob_reserve(&mux->out, MUX_HDR + (size_t)len);
      put32(w, ep->mchan);
      put32(w + 4, (uint32_t)len);
      memcpy(w + MUX_HDR, line, (size_t)len);
      mux->out.len += MUX_HDR + (size_t)len;
      mux_flush(mux);
    }
}

static void eps_add(ep_t *ep)
{
  eps = xrealloc(eps, sizeof(ep_t *) * (neps + 1));
  eps[neps++] = ep;
}

/* ---- -U clients ---- */

static void uc_set_events(uc_t *uc)
{
  int w = uc->out.len > 0 ||
    (g_running && uc->ep.ready && uc->ep.tx_off < uc->ep.tx_total);
  ev_set(&uc->o, EPOLLIN | (w ? EPOLLOUT : 0));
}

static void uc_flush(uc_t *uc)
{
  ep_t *ep = &uc->ep;
  ssize_t n;
  uint64_t left;
  int round;

  if(uc->o.fd < 0)
    return;
  while(uc->out.len > 0)
    {
      n = write(uc->o.fd, uc->out.b + uc->out.off, uc->out.len);
      if(n > 0)
	{
	  ob_consume(&uc->out, (size_t)n);
	  continue;
	}
      if(n < 0 && (errno == EAGAIN || errno == EINTR))
	break;
      fail("vp %u: unix client write: %s", ep->vpidx, strerror(errno));
      obj_close(&uc->o);
      return;
    }
  if(uc->out.len == 0 && g_running && ep->ready && g_mode == MODE_STREAM)
    for(round = 0; round < 8 && ep->tx_off < ep->tx_total; round++)
      {
	left = ep->tx_total - ep->tx_off;
	n = write(uc->o.fd, pat_at(ep->key, ep->tx_off),
		  left > WRITE_MAX ? WRITE_MAX : (size_t)left);
	if(n > 0)
	  {
	    ep->tx_off += (uint64_t)n;
	    continue;
	  }
	if(n < 0 && (errno == EAGAIN || errno == EINTR))
	  break;
	fail("vp %u: unix client write: %s", ep->vpidx, strerror(errno));
	obj_close(&uc->o);
	return;
      }
  uc_set_events(uc);
}

static void uc_flush_obj(obj_t *o)
{
  uc_flush((uc_t *)o);
}

static void uc_event(obj_t *o, uint32_t ev)
{
  uc_t *uc = (uc_t *)o;
  ssize_t n;

  if(ev & (EPOLLIN | EPOLLERR | EPOLLHUP))
    {
      n = read(uc->o.fd, scratch, SCRATCH_SIZE);
      if(n > 0)
	ep_input(&uc->ep, scratch, (size_t)n);
      else if(n == 0 || (errno != EAGAIN && errno != EINTR))
	{
	  if(!daemon_died())
	    fail("vp %u: unix client: %s from daemon", uc->ep.vpidx,
		 n == 0 ? "EOF" : strerror(errno));
	  obj_close(&uc->o);
	  return;
	}
    }
  if(ev & EPOLLOUT)
    uc_flush(uc);
}

/* connect a -U client to the socket of vp */
static void uc_open(uc_t *uc, fvp_t *vp)
{
  struct sockaddr_un sun;
  int fd;

  memset(&sun, 0, sizeof(sun));
  sun.sun_family = AF_UNIX;
  if((size_t)snprintf(sun.sun_path, sizeof(sun.sun_path), "%s/%s-%s",
		      opt_udir, vp->name, vp->local) >= sizeof(sun.sun_path))
    die("unix socket path too long");
  if((fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0)) < 0)
    die("socket: %s", strerror(errno));
  if(connect(fd, (struct sockaddr *)&sun, sizeof(sun)) != 0)
    {
      fail("vp %u: connect %s: %s", vp->idx, sun.sun_path, strerror(errno));
      close(fd);
      return;
    }
  fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
  uc->o.type = OT_UC;
  uc->o.fd = fd;
  uc->ep.owner = &uc->o;
  uc->ep.vpidx = vp->idx;
  eps_add(&uc->ep);
  uc_set_events(uc);
}

/* ---- mux client ---- */

static void mux_set_events(mux_t *mux)
{
  uint32_t i;
  int w = mux->out.len > 0;
  if(!w && g_running && g_mode == MODE_STREAM)
    for(i = 0; i < mux->neps && !w; i++)
      w = mux->eps[i].ready && mux->eps[i].tx_off < mux->eps[i].tx_total;
  ev_set(&mux->o, EPOLLIN | (w ? EPOLLOUT : 0));
}

/* queue client->scamper frames round-robin over the channels */
static int mux_pump(mux_t *mux)
{
  int did = 0;
  uint32_t tries, n;
  uint64_t left;
  ep_t *ep;
  uint8_t *w;

  if(!g_running || g_mode != MODE_STREAM || mux->neps == 0)
    return 0;
  while(mux->out.len < OUT_HIWAT)
    {
      for(tries = 0; tries < mux->neps; tries++)
	{
	  ep = &mux->eps[mux->rr];
	  mux->rr = (mux->rr + 1) % (int)mux->neps;
	  if(ep->ready && ep->tx_off < ep->tx_total)
	    break;
	}
      if(tries == mux->neps)
	break;
      left = ep->tx_total - ep->tx_off;
      n = left < (uint64_t)g_frame ? (uint32_t)left : (uint32_t)g_frame;
      w = ob_reserve(&mux->out, MUX_HDR + n);
      put32(w, ep->mchan);
      put32(w + 4, n);
      memcpy(w + MUX_HDR, pat_at(ep->key, ep->tx_off), n);
      mux->out.len += MUX_HDR + n;
      ep->tx_off += n;
      did = 1;
    }
  return did;
}

static void mux_flush(mux_t *mux)
{
  ssize_t n;
  int round;

  if(mux->o.fd < 0)
    return;
  for(round = 0; round < 8; round++)
    {
      if(mux->out.len == 0 && !mux_pump(mux))
	break;
      n = write(mux->o.fd, mux->out.b + mux->out.off,
		mux->out.len > WRITE_MAX ? WRITE_MAX : mux->out.len);
      if(n > 0)
	{
	  ob_consume(&mux->out, (size_t)n);
	  continue;
	}
      if(n < 0 && (errno == EAGAIN || errno == EINTR))
	break;
      fail("mux client write: %s", strerror(errno));
      obj_close(&mux->o);
      return;
    }
  mux_set_events(mux);
}

static void mux_flush_obj(obj_t *o)
{
  mux_flush((mux_t *)o);
}

static void mux_ctl(mux_t *mux, const uint8_t *b, uint32_t len)
{
  uint16_t type, attr;
  uint32_t id, off, idx;
  const uint8_t *nul;

  if(len < 2)
    {
      fail("mux: control message of length %u", len);
      return;
    }
  type = get16(b);
  switch(type)
    {
    case MUX_VP_UPDATE:
      if(len < 6)
	{ fail("mux: short VP_UPDATE"); return; }
      id = get32(b + 2);
      for(off = 6; off + 2 < len; )
	{
	  attr = get16(b + off);
	  off += 2;
	  if((nul = memchr(b + off, 0, len - off)) == NULL)
	    { fail("mux: VP_UPDATE attribute %u not terminated", attr); return; }
	  if(attr == 1 && b[off] == 'b' &&
	     sscanf((const char *)b + off + 1, "%u", &idx) == 1 && idx < nvps)
	    {
	      if(vps[idx].vpid == 0)
		mux->known++;
	      vps[idx].vpid = id;
	    }
	  off = (uint32_t)(nul - b) + 1;
	}
      return;
    case MUX_VP_DEPART:
      if(len != 6)
	{ fail("mux: VP_DEPART of length %u", len); return; }
      id = get32(b + 2);
      for(idx = 0; idx < nvps; idx++)
	if(vps[idx].vpid == id && id != 0)
	  fail("mux: VP_DEPART for vp %u (id %u)", idx, id);
      return;
    case MUX_GO:
      mux->go = 1;
      g_progress = now_ns();
      return;
    case MUX_CHAN_CLOSE:
      fail("mux: unexpected CHANNEL_CLOSE");
      return;
    }
  fail("mux: unknown control type %u", type);
}

static void mux_input(mux_t *mux, const uint8_t *p, size_t len)
{
  uint32_t chan, flen;
  while(len >= MUX_HDR)
    {
      chan = get32(p);
      flen = get32(p + 4);
      if(len < MUX_HDR + (size_t)flen)
	break;
      if(chan == 0)
	mux_ctl(mux, p + MUX_HDR, flen);
      else if(chan <= mux->neps)
	ep_input(&mux->eps[chan - 1], p + MUX_HDR, flen);
      else
	fail("mux: data for unknown channel %u", chan);
      p += MUX_HDR + flen;
      len -= MUX_HDR + flen;
    }
  if(len > 0)
    {
      if(mux->part_cap < len)
	{
	  mux->part_cap = len < 65536 + MUX_HDR ? 65536 + MUX_HDR : len;
	  mux->part = xrealloc(mux->part, mux->part_cap);
	}
      memmove(mux->part, p, len);
      mux->part_len = len;
    }
}

static void mux_event(obj_t *o, uint32_t ev)
{
  mux_t *mux = (mux_t *)o;
  size_t have, room;
  ssize_t n;

  if(ev & (EPOLLIN | EPOLLERR | EPOLLHUP))
    {
      /* a frame can exceed the scratch buffer only in theory (4 GiB
       * lengths); such a frame is a failure anyway */
      have = mux->part_len;
      if(have >= SCRATCH_SIZE)
	{
	  fail("mux: frame larger than %d bytes", SCRATCH_SIZE);
	  obj_close(&mux->o);
	  return;
	}
      if(have > 0)
	memcpy(scratch, mux->part, have);
      mux->part_len = 0;
      room = SCRATCH_SIZE - have;
      n = read(mux->o.fd, scratch + have, room);
      if(n > 0)
	mux_input(mux, scratch, have + (size_t)n);
      else
	{
	  if(have > 0)
	    memcpy(mux->part, scratch, have);
	  mux->part_len = have;
	  if(n == 0 || (errno != EAGAIN && errno != EINTR))
	    {
	      if(!daemon_died())
		fail("mux client: %s from daemon",
		     n == 0 ? "EOF" : strerror(errno));
	      obj_close(&mux->o);
	      return;
	    }
	}
    }
  if(ev & EPOLLOUT)
    mux_flush(mux);
}

static int cond_mux_go(void)
{
  return g_mux->go || g_mux->o.fd < 0;
}

static void mux_open(void)
{
  struct sockaddr_un sun;
  int fd;

  g_mux = xcalloc(1, sizeof(mux_t));
  memset(&sun, 0, sizeof(sun));
  sun.sun_family = AF_UNIX;
  snprintf(sun.sun_path, sizeof(sun.sun_path), "%s", opt_mux);
  if((fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0)) < 0)
    die("socket: %s", strerror(errno));
  if(connect(fd, (struct sockaddr *)&sun, sizeof(sun)) != 0)
    die("connect %s: %s", opt_mux, strerror(errno));
  fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
  g_mux->o.type = OT_MUX;
  g_mux->o.fd = fd;
  g_mux->o.mask = 0;
  mux_set_events(g_mux);
  loop_until(cond_mux_go, "waiting for mux GO");
}

/* open n mux channels: channel i+1 on vps[vpfirst + i % nvp] */
static void mux_open_chans(uint32_t n, uint32_t vpfirst, uint32_t nvp)
{
  uint32_t i;
  uint8_t *w;
  fvp_t *vp;

  g_mux->eps = xcalloc(n, sizeof(ep_t));
  g_mux->neps = n;
  for(i = 0; i < n; i++)
    {
      ep_t *ep = &g_mux->eps[i];
      vp = &vps[vpfirst + i % nvp];
      if(vp->vpid == 0)
	die("mux: vp %u was not announced", vp->idx);
      ep->owner = &g_mux->o;
      ep->mchan = i + 1;
      ep->vpidx = vp->idx;
      eps_add(ep);
      w = ob_reserve(&g_mux->out, MUX_HDR + 10);
      put32(w, 0);
      put32(w + 4, 10);
      put16(w + 8, MUX_CHAN_OPEN);
      put32(w + 10, vp->vpid);
      put32(w + 14, ep->mchan);
      g_mux->out.len += MUX_HDR + 10;
    }
  mux_flush(g_mux);
}

/* ---------------------------------------------------------------------
 * Scenario helpers
 */

static uint32_t g_wait_ready;

static int cond_ready(void)
{
  return g_ready >= g_wait_ready || g_nfail > 0;
}

/* n channels over vps[first .. first+nvp), through -U ('u') or -M ('m');
 * returns once every endpoint has its hello */
static void chans_open(uint32_t n, uint32_t first, uint32_t nvp, int via)
{
  uint32_t i;
  if(via == 'm')
    {
      if(opt_mux == NULL)
	die("-M is needed for mux channels");
      mux_open();
      if(g_mux->known < nvps)
	die("mux announced %u of %u VPs", g_mux->known, nvps);
      mux_open_chans(n, first, nvp);
    }
  else
    {
      if(opt_udir == NULL)
	die("-U is needed for unix channels");
      ucs = xcalloc(n, sizeof(uc_t));
      for(i = 0; i < n; i++)
	{
	  ucs[i].o.fd = -1;
	  uc_open(&ucs[i], &vps[first + i % nvp]);
	}
    }
  g_wait_ready = n;
  loop_until(cond_ready, "opening channels");
}

/* the scamper-side state of an endpoint's channel */
static fchan_t *ep_fchan(const ep_t *ep)
{
  return fvp_chan(&vps[ep->vpidx], ep->chan);
}

/* let data flow: everything that can send gets flushed */
static void start_running(void)
{
  uint32_t i;
  g_running = 1;
  for(i = 0; i < nvps; i++)
    if(vps[i].o.fd >= 0)
      mark_dirty(&vps[i].o);
  for(i = 0; i < neps; i++)
    if(eps[i]->owner->fd >= 0)
      mark_dirty(eps[i]->owner);
}

static uint64_t g_target;

static int cond_bytes(void)
{
  return g_s2c_bytes + g_c2s_bytes >= g_target || g_nfail > 0;
}

static int cond_acked(void)
{
  uint32_t i;
  if(g_nfail > 0)
    return 1;
  for(i = 0; i < nvps; i++)
    if(vps[i].state == FS_GO && vps[i].ua_n > 0)
      return 0;
  return 1;
}

static void report_daemon_mem(const char *prefix)
{
  char name[64];
  snprintf(name, sizeof(name), "%s_rss_kb", prefix);
  result(name, "%ld", proc_status_kb(opt_pid, "VmRSS"));
  snprintf(name, sizeof(name), "%s_hwm_kb", prefix);
  result(name, "%ld", proc_status_kb(opt_pid, "VmHWM"));
}

/* check every stream ended exactly at its total; report lost bytes */
static void streams_final_check(void)
{
  uint64_t lost = 0;
  uint32_t i;
  fchan_t *c;
  for(i = 0; i < neps; i++)
    {
      ep_t *ep = eps[i];
      if(ep->rx_off < ep->rx_total)
	lost += ep->rx_total - ep->rx_off;
      if((c = ep_fchan(ep)) != NULL && c->rx_off < c->rx_total)
	lost += c->rx_total - c->rx_off;
    }
  result("bytes_missing", "%" PRIu64, lost);
  if(lost > 0)
    fail("%" PRIu64 " bytes never arrived", lost);
}

/* ---------------------------------------------------------------------
 * connect: N VPs; handshakes/s, RSS per idle VP, idle CPU
 */

static int sc_connect(int argc, char **argv)
{
  uint32_t n = 1000, w = 128, i, ka = 0, sock_ok = 0, sock_n = 0;
  double hold = 0, secs;
  long rss0, rss1, rss2;
  int64_t cpu0, cpu1;
  uint64_t t;
  int c;

  while((c = getopt(argc, argv, "n:w:H:")) != -1)
    switch(c)
      {
      case 'n': n = (uint32_t)strtoul(optarg, NULL, 0); break;
      case 'w': w = (uint32_t)strtoul(optarg, NULL, 0); break;
      case 'H': hold = strtod(optarg, NULL); break;
      default: return 1;
      }
  vps_alloc(n);
  rss0 = proc_status_kb(opt_pid, "VmRSS");
  t = vps_connect(0, n, w);
  secs = (double)t / 1e9;
  result("vps", "%u", g_go);
  result("handshake_secs", "%.3f", secs);
  result("handshakes_per_s", "%.0f", g_go / secs);
  loop_for(NS);
  rss1 = proc_status_kb(opt_pid, "VmRSS");
  result("rss_before_kb", "%ld", rss0);
  result("rss_after_kb", "%ld", rss1);
  if(rss0 > 0 && rss1 > 0 && g_go > 0)
    result("rss_per_vp_bytes", "%.0f", (double)(rss1 - rss0) * 1024.0 / g_go);
  if(opt_udir != NULL)
    {
      struct stat st;
      char path[256];
      for(i = 0; i < n; i += (n / 16 ? n / 16 : 1))
	{
	  if(vps[i].state != FS_GO)
	    continue;
	  sock_n++;
	  snprintf(path, sizeof(path), "%s/%s-%s", opt_udir, vps[i].name,
		   vps[i].local);
	  if(stat(path, &st) == 0 && S_ISSOCK(st.st_mode))
	    sock_ok++;
	  else
	    fail("vp %u: no unix socket %s", i, path);
	}
      result("unix_sockets_checked", "%u/%u", sock_ok, sock_n);
    }
  if(hold > 0)
    {
      window_t win;
      cpu0 = proc_cpu_ns(opt_pid);
      window_start(&win);
      loop_for((uint64_t)(hold * 1e9));
      cpu1 = proc_cpu_ns(opt_pid);
      t = window_end(&win);
      for(i = 0; i < n; i++)
	if(vps[i].ka_rx > 0)
	  ka++;
      result("hold_secs", "%.1f", (double)t / 1e9);
      if(cpu0 >= 0 && cpu1 >= 0)
	{
	  result("idle_cpu_ms", "%.1f", (double)(cpu1 - cpu0) / 1e6);
	  result("idle_cpu_pct", "%.3f", 100.0 * (double)(cpu1 - cpu0) / (double)t);
	}
      result("vps_got_keepalive", "%u", ka);
      rss2 = proc_status_kb(opt_pid, "VmRSS");
      result("rss_after_hold_kb", "%ld", rss2);
      if(rss0 > 0 && rss2 > 0 && g_go > 0)
	result("rss_per_vp_after_hold_bytes", "%.0f",
	       (double)(rss2 - rss0) * 1024.0 / g_go);
    }
  if(g_go != n)
    fail("only %u of %u VPs completed the handshake", g_go, n);
  if(g_dead > 0)
    fail("%u VP connections were lost", g_dead);
  return 0;
}

/* ---------------------------------------------------------------------
 * stream: bulk data in one direction
 */

static int sc_stream(int argc, char **argv)
{
  uint32_t nvp = 1, nch = 1, i, j;
  uint64_t bytes = 256ULL << 20, share, t;
  int via = 'u', s2c = 1, c;
  double secs;
  window_t win;

  while((c = getopt(argc, argv, "n:c:b:d:m:f:")) != -1)
    switch(c)
      {
      case 'n': nvp = (uint32_t)strtoul(optarg, NULL, 0); break;
      case 'c': nch = (uint32_t)strtoul(optarg, NULL, 0); break;
      case 'b': bytes = strtoull(optarg, NULL, 0); break;
      case 'd': s2c = strcmp(optarg, "c2s") != 0; break;
      case 'm': via = optarg[0]; break;
      case 'f': g_frame = atoi(optarg); break;
      default: return 1;
      }
  if(g_frame < 1 || g_frame > 65535 || nvp < 1 || nch < 1)
    die("bad stream parameters");
  vps_alloc(nvp);
  vps_connect(0, nvp, 64);
  if(g_go != nvp)
    return 0;
  g_mode = MODE_STREAM;
  chans_open(nch, 0, nvp, via);
  if(g_nfail > 0)
    return 0;
  share = bytes / nch;
  g_target = share * nch;
  for(i = 0; i < nvp; i++)
    for(j = 0; j < (uint32_t)vps[i].nch; j++)
      {
	if(s2c) vps[i].ch[j].tx_total = share;
	else    vps[i].ch[j].rx_total = share;
      }
  for(i = 0; i < neps; i++)
    {
      if(s2c) eps[i]->rx_total = share;
      else    eps[i]->tx_total = share;
    }
  window_start(&win);
  start_running();
  loop_until(cond_bytes, "streaming");
  t = window_end(&win);
  secs = (double)t / 1e9;
  result("bytes", "%" PRIu64, s2c ? g_s2c_bytes : g_c2s_bytes);
  result("secs", "%.3f", secs);
  result("mb_per_s", "%.1f", (double)g_target / secs / 1e6);
  report_daemon_mem("daemon");
  loop_until(cond_acked, "waiting for the last ACKs");
  streams_final_check();
  return 0;
}

/* ---------------------------------------------------------------------
 * rtt: command line -> OK, DATA line, 1 KiB block
 */

static int cmp_u64(const void *a, const void *b)
{
  uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
  return x < y ? -1 : x > y;
}

static int cond_eps_done(void)
{
  return g_eps_done >= neps || g_nfail > 0;
}

static int sc_rtt(int argc, char **argv)
{
  uint32_t idle = 0, conc = 1, nact = 0, i;
  double dur = 5, secs;
  uint64_t t0, t1, total = 0;
  int via = 'u', c;
  window_t win;

  while((c = getopt(argc, argv, "i:c:n:t:qm:W:")) != -1)
    switch(c)
      {
      case 'i': idle = (uint32_t)strtoul(optarg, NULL, 0); break;
      case 'c': conc = (uint32_t)strtoul(optarg, NULL, 0); break;
      case 'n': nact = (uint32_t)strtoul(optarg, NULL, 0); break;
      case 't': dur = strtod(optarg, NULL); break;
      case 'q': g_quickack = 1; break;
      case 'm': via = optarg[0]; break;
      case 'W': rtt_warm = (uint32_t)strtoul(optarg, NULL, 0); break;
      default: return 1;
      }
  if(nact == 0)
    nact = conc < 4 ? conc : 4;
  vps_alloc(idle + nact);
  if(idle > 0)
    {
      vps_connect(0, idle, 128);
      result("idle_vps", "%u", g_go);
    }
  vps_connect(idle, nact, 64);
  if(g_go != idle + nact)
    {
      fail("only %u of %u VPs connected", g_go, idle + nact);
      return 0;
    }
  g_mode = MODE_RTT;
  chans_open(conc, idle, nact, via);
  if(g_nfail > 0)
    return 0;
  window_start(&win);
  t0 = win.t0;
  rtt_stop = t0 + (uint64_t)(dur * 1e9);
  g_running = 1;
  for(i = 0; i < neps; i++)
    ep_rtt_send(eps[i]);
  loop_until(cond_eps_done, "round trips");
  t1 = t0 + window_end(&win);
  for(i = 0; i < neps; i++)
    total += eps[i]->n;
  secs = (double)(t1 - t0) / 1e9;
  result("commands", "%" PRIu64, total);
  result("commands_per_s", "%.0f", (double)total / secs);
  if(rtt_n > 0)
    {
      double sum = 0;
      for(i = 0; i < rtt_n; i++)
	sum += (double)rtt_lat[i];
      qsort(rtt_lat, rtt_n, sizeof(uint64_t), cmp_u64);
      result("samples", "%zu", rtt_n);
      result("p50_us", "%.1f", rtt_lat[rtt_n / 2] / 1e3);
      result("p99_us", "%.1f", rtt_lat[(rtt_n * 99) / 100] / 1e3);
      result("mean_us", "%.1f", sum / rtt_n / 1e3);
      result("max_us", "%.1f", rtt_lat[rtt_n - 1] / 1e3);
    }
  else
    fail("no round-trip samples");
  return 0;
}

/* ---------------------------------------------------------------------
 * resume: N VPs streaming both ways, all cut at once, all resumed
 */

static int cond_all_ok(void)
{
  return g_ok + g_dead >= nvps;
}

static int sc_resume(int argc, char **argv)
{
  uint32_t n = 1000, i, fl_s2c = 0, fl_c2s = 0, fl_both = 0, fl_ua = 0;
  uint64_t bytes = 256 * 1024, t_cut, t_ok, t_done, t0;
  double frac = 0.3;
  fchan_t *fc;
  window_t win;
  int c;

  while((c = getopt(argc, argv, "n:b:x:")) != -1)
    switch(c)
      {
      case 'n': n = (uint32_t)strtoul(optarg, NULL, 0); break;
      case 'b': bytes = strtoull(optarg, NULL, 0); break;
      case 'x': frac = strtod(optarg, NULL); break;
      default: return 1;
      }
  vps_alloc(n);
  vps_connect(0, n, 128);
  if(g_go != n)
    {
      fail("only %u of %u VPs connected", g_go, n);
      return 0;
    }
  g_mode = MODE_STREAM;
  chans_open(n, 0, n, 'u');
  if(g_nfail > 0)
    return 0;
  for(i = 0; i < n; i++)
    {
      ep_t *ep = &ucs[i].ep;
      if((fc = ep_fchan(ep)) == NULL)
	die("vp %u: endpoint without scamper channel", i);
      ep->rx_total = ep->tx_total = bytes;
      fc->tx_total = fc->rx_total = bytes;
    }
  g_target = (uint64_t)((double)(2 * bytes * n) * frac);
  window_start(&win);
  t0 = win.t0;
  start_running();
  loop_until(cond_bytes, "streaming before the cut");
  window_end(&win);
  if(g_nfail > 0)
    return 0;

  /* what is in flight at the cut */
  for(i = 0; i < n; i++)
    {
      ep_t *ep = &ucs[i].ep;
      int a, b;
      fc = ep_fchan(ep);
      a = fc->tx_off > ep->rx_off;
      b = ep->tx_off > fc->rx_off;
      fl_s2c += a;
      fl_c2s += b;
      fl_both += a && b;
      fl_ua += vps[i].ua_n > 0;
    }
  result("streamed_before_cut_secs", "%.3f", (double)(now_ns() - t0) / 1e9);
  result("vps_inflight_s2c", "%u", fl_s2c);
  result("vps_inflight_c2s", "%u", fl_c2s);
  result("vps_inflight_both", "%u", fl_both);
  result("vps_with_unacked", "%u", fl_ua);

  /* cut every connection at once, then resume them all at once */
  g_cut = 1;
  for(i = 0; i < n; i++)
    {
      fvp_t *vp = &vps[i];
      if(vp->state != FS_GO)
	continue;
#ifndef SCBENCH_NO_TLS
      if(vp->ssl != NULL)
	{
	  SSL_free(vp->ssl);
	  vp->ssl = NULL;
	}
#endif
      obj_close(&vp->o);
      ob_consume(&vp->out, vp->out.len);
      vp->part_len = 0;
      vp->state = FS_CUT;
    }
  t_cut = now_ns();
  conn_window = n;
  conn_inflight = 0;
  for(i = 0; i < n; i++)
    if(vps[i].state == FS_CUT)
      fvp_connect(&vps[i], 1);
  g_cut = 0;
  loop_until(cond_all_ok, "resuming");
  t_ok = now_ns();
  result("resumed", "%u", g_ok);
  result("rejected", "%u", g_rej);
  result("resume_ms", "%.1f", (double)(t_ok - t_cut) / 1e6);
  g_target = 2 * bytes * n;
  loop_until(cond_bytes, "streaming after the resume");
  t_done = now_ns();
  result("finish_after_cut_secs", "%.3f", (double)(t_done - t_cut) / 1e9);
  loop_until(cond_acked, "waiting for the last ACKs");
  report_daemon_mem("daemon");
  streams_final_check();
  if(g_ok != n)
    fail("only %u of %u VPs resumed", g_ok, n);
  return 0;
}

/* ---------------------------------------------------------------------
 * The trivial relay (the physical bound) and its client
 */

static int listen_unix(const char *path)
{
  struct sockaddr_un sun;
  int fd;
  memset(&sun, 0, sizeof(sun));
  sun.sun_family = AF_UNIX;
  snprintf(sun.sun_path, sizeof(sun.sun_path), "%s", path);
  unlink(path);
  if((fd = socket(AF_UNIX, SOCK_STREAM, 0)) < 0 ||
     bind(fd, (struct sockaddr *)&sun, sizeof(sun)) != 0 ||
     listen(fd, 16) != 0)
    die("unix listen %s: %s", path, strerror(errno));
  return fd;
}

/*
 * relayd: accept one TCP and one unix connection and relay both ways
 * with one buffer per direction (64 KiB unless -B): read when the buffer
 * is empty, write it out, and only then read again.  Edge-triggered
 * epoll, registered once: per buffer-full it costs one read, one write
 * and at most one epoll_wait.  What a relay costs at the least.
 */
static int sc_relayd(int argc, char **argv)
{
  const char *upath = NULL;
  int lt, lu, fd[2], one = 1, c, i, k, progress;
  size_t bsz = 65536, off[2] = {0, 0}, len[2] = {0, 0};
  int eof[2] = {0, 0};
  uint8_t *buf[2];
  struct epoll_event ev, evs[4];
  ssize_t r;

  while((c = getopt(argc, argv, "u:B:")) != -1)
    switch(c)
      {
      case 'u': upath = optarg; break;
      case 'B': bsz = strtoul(optarg, NULL, 0); break;
      default: return 1;
      }
  if(upath == NULL || bsz < 1)
    die("relayd needs -u path");
  if((lt = socket(AF_INET, SOCK_STREAM, 0)) < 0)
    die("socket: %s", strerror(errno));
  setsockopt(lt, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  if(bind(lt, (struct sockaddr *)&opt_daemon, sizeof(opt_daemon)) != 0 ||
     listen(lt, 16) != 0)
    die("tcp listen: %s", strerror(errno));
  lu = listen_unix(upath);
  if((fd[0] = accept(lt, NULL, NULL)) < 0 ||
     (fd[1] = accept(lu, NULL, NULL)) < 0)
    die("accept: %s", strerror(errno));
  close(lt);
  close(lu);
  unlink(upath);
  for(i = 0; i < 2; i++)
    {
      buf[i] = xmalloc(bsz);
      fcntl(fd[i], F_SETFL, fcntl(fd[i], F_GETFL) | O_NONBLOCK);
      memset(&ev, 0, sizeof(ev));
      ev.events = EPOLLIN | EPOLLOUT | EPOLLET;
      ev.data.u32 = (uint32_t)i;
      if(epoll_ctl(epfd, EPOLL_CTL_ADD, fd[i], &ev) != 0)
	die("epoll_ctl: %s", strerror(errno));
    }
  /* direction k moves fd[k] -> fd[1-k]; run both until neither moves,
   * then wait for an edge */
  while(!(eof[0] && eof[1] && len[0] == 0 && len[1] == 0))
    {
      do
	{
	  progress = 0;
	  for(k = 0; k < 2; k++)
	    {
	      if(len[k] == 0 && !eof[k])
		{
		  r = read(fd[k], buf[k], bsz);
		  if(r > 0)
		    {
		      off[k] = 0;
		      len[k] = (size_t)r;
		      progress = 1;
		    }
		  else if(r == 0 || (errno != EAGAIN && errno != EINTR))
		    {
		      eof[k] = 1;
		      shutdown(fd[1 - k], SHUT_WR);
		    }
		}
	      if(len[k] > 0)
		{
		  r = write(fd[1 - k], buf[k] + off[k], len[k]);
		  if(r > 0)
		    {
		      off[k] += (size_t)r;
		      len[k] -= (size_t)r;
		      progress = 1;
		    }
		  else if(r < 0 && errno != EAGAIN && errno != EINTR)
		    {
		      len[k] = 0;
		      eof[k] = 1;
		    }
		}
	    }
	}
      while(progress);
      if(eof[0] && eof[1] && len[0] == 0 && len[1] == 0)
	break;
      if(epoll_wait(epfd, evs, 4, 1000) < 0 && errno != EINTR)
	die("epoll_wait: %s", strerror(errno));
    }
  return 0;
}

/* relay: stream bytes through relayd in one direction, verified */
static int sc_relay(int argc, char **argv)
{
  const char *upath = NULL;
  uint64_t bytes = 256ULL << 20, tx = 0, rx = 0, t;
  int s2c = 1, c, tfd, ufd, src, dst, one = 1;
  struct sockaddr_un sun;
  struct epoll_event ev, evs[4];
  long bad;
  ssize_t r;
  double secs;
  window_t win;

  while((c = getopt(argc, argv, "u:b:d:")) != -1)
    switch(c)
      {
      case 'u': upath = optarg; break;
      case 'b': bytes = strtoull(optarg, NULL, 0); break;
      case 'd': s2c = strcmp(optarg, "c2s") != 0; break;
      default: return 1;
      }
  if(upath == NULL)
    die("relay needs -u path");
  if((tfd = socket(AF_INET, SOCK_STREAM, 0)) < 0 ||
     connect(tfd, (struct sockaddr *)&opt_daemon, sizeof(opt_daemon)) != 0)
    die("connect to relayd: %s", strerror(errno));
  setsockopt(tfd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  memset(&sun, 0, sizeof(sun));
  sun.sun_family = AF_UNIX;
  snprintf(sun.sun_path, sizeof(sun.sun_path), "%s", upath);
  if((ufd = socket(AF_UNIX, SOCK_STREAM, 0)) < 0 ||
     connect(ufd, (struct sockaddr *)&sun, sizeof(sun)) != 0)
    die("connect to relayd %s: %s", upath, strerror(errno));
  src = s2c ? tfd : ufd;
  dst = s2c ? ufd : tfd;
  fcntl(src, F_SETFL, fcntl(src, F_GETFL) | O_NONBLOCK);
  fcntl(dst, F_SETFL, fcntl(dst, F_GETFL) | O_NONBLOCK);
  memset(&ev, 0, sizeof(ev));
  ev.events = EPOLLOUT;
  ev.data.fd = src;
  epoll_ctl(epfd, EPOLL_CTL_ADD, src, &ev);
  ev.events = EPOLLIN;
  ev.data.fd = dst;
  epoll_ctl(epfd, EPOLL_CTL_ADD, dst, &ev);
  window_start(&win);
  t = win.t0;
  g_progress = t;
  while(rx < bytes)
    {
      if(epoll_wait(epfd, evs, 4, 1000) < 0 && errno != EINTR)
	die("epoll_wait: %s", strerror(errno));
      while(tx < bytes)
	{
	  uint64_t left = bytes - tx;
	  r = write(src, pat_at(1, tx), left > WRITE_MAX ? WRITE_MAX : left);
	  if(r <= 0)
	    break;
	  tx += (uint64_t)r;
	}
      if(tx == bytes && src >= 0)
	{
	  epoll_ctl(epfd, EPOLL_CTL_DEL, src, NULL);
	  shutdown(src, SHUT_WR);
	}
      while((r = read(dst, scratch, SCRATCH_SIZE)) > 0)
	{
	  if((bad = pat_check(1, rx, scratch, (size_t)r)) >= 0)
	    {
	      fail("relay: byte %" PRIu64 " differs", rx + (uint64_t)bad);
	      return 0;
	    }
	  rx += (uint64_t)r;
	  g_progress = now_ns();
	}
      if(r == 0 && rx < bytes)
	{
	  fail("relay: EOF after %" PRIu64 " bytes", rx);
	  return 0;
	}
      if(now_ns() - g_progress > STALL_NS)
	{
	  fail("relay: stalled");
	  return 0;
	}
    }
  t = window_end(&win);
  secs = (double)t / 1e9;
  result("bytes", "%" PRIu64, rx);
  result("secs", "%.3f", secs);
  result("mb_per_s", "%.1f", (double)bytes / secs / 1e6);
  return 0;
}

/* ---------------------------------------------------------------------
 * main
 */

static void usage(void)
{
  fprintf(stderr,
"usage: scbench [-v] [-P ip:port] [-U dir] [-M path] [-p pid] [-S nsrc] [-T]\n"
"               scenario [options]\n"
"  -P  the daemon's TCP address (default 127.0.0.1:31337)\n"
"  -U  the daemon's -U directory      -M  the daemon's mux socket\n"
"  -p  the daemon's pid (RSS and CPU)  -S  source addresses 127.0.0.2.. (8)\n"
"  -T  TLS to the daemon                -v  progress on stderr\n"
"scenarios:\n"
"  connect -n N [-w window] [-H hold-secs]\n"
"  stream  [-n vps] [-c chans] [-b bytes] [-d s2c|c2s] [-m u|m] [-f frame]\n"
"  rtt     [-i idle-vps] [-c concurrency] [-n vps] [-t secs] [-q] [-m u|m]\n"
"          (-q: the fake scamper sets TCP_QUICKACK after every read)\n"
"  resume  [-n vps] [-b bytes-per-direction-per-vp] [-x cut-fraction]\n"
"  relayd  -u path [-B bufsize]  (listens on -P and path; relays one pair)\n"
"  relay   -u path [-b bytes] [-d s2c|c2s]\n"
"Prints RESULT lines; FAIL lines and exit status 2 on any verification\n"
"failure; exit status 1 on a usage or setup error.\n");
  exit(1);
}

static void parse_addr(const char *arg)
{
  char host[64];
  const char *colon = strrchr(arg, ':');
  memset(&opt_daemon, 0, sizeof(opt_daemon));
  opt_daemon.sin_family = AF_INET;
  if(colon == NULL || (size_t)(colon - arg) >= sizeof(host))
    die("bad -P %s", arg);
  memcpy(host, arg, (size_t)(colon - arg));
  host[colon - arg] = '\0';
  if(inet_pton(AF_INET, host, &opt_daemon.sin_addr) != 1)
    die("bad -P address %s", host);
  opt_daemon.sin_port = htons((uint16_t)atoi(colon + 1));
}

int main(int argc, char **argv)
{
  const char *scen;
  int c, rc;

  parse_addr("127.0.0.1:31337");
  while((c = getopt(argc, argv, "+vP:U:M:p:S:T")) != -1)
    switch(c)
      {
      case 'v': opt_verbose = 1; break;
      case 'P': parse_addr(optarg); break;
      case 'U': opt_udir = optarg; break;
      case 'M': opt_mux = optarg; break;
      case 'p': opt_pid = (pid_t)atoi(optarg); break;
      case 'S': opt_nsrc = atoi(optarg); break;
      case 'T': opt_tls = 1; break;
      default: usage();
      }
  if(optind >= argc || opt_nsrc < 1 || opt_nsrc > 250)
    usage();
  scen = argv[optind];
  argc -= optind;
  argv += optind;
  optind = 1;

  signal(SIGPIPE, SIG_IGN);
  raise_nofile();
  setvbuf(stdout, NULL, _IOLBF, 0);
  scratch = xmalloc(SCRATCH_SIZE);
  pat_init();
  if((epfd = epoll_create1(EPOLL_CLOEXEC)) < 0)
    die("epoll_create1: %s", strerror(errno));
  if(opt_tls)
    {
#ifndef SCBENCH_NO_TLS
      if((g_ctx = SSL_CTX_new(TLS_client_method())) == NULL)
	die("SSL_CTX_new failed");
      SSL_CTX_set_min_proto_version(g_ctx, TLS1_2_VERSION);
      SSL_CTX_set_verify(g_ctx, SSL_VERIFY_NONE, NULL);
      SSL_CTX_set_mode(g_ctx, SSL_MODE_ENABLE_PARTIAL_WRITE |
		       SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
#else
      die("built without TLS");
#endif
    }
  info("scenario %s", scen);

  if(strcmp(scen, "connect") == 0)     rc = sc_connect(argc, argv);
  else if(strcmp(scen, "stream") == 0) rc = sc_stream(argc, argv);
  else if(strcmp(scen, "rtt") == 0)    rc = sc_rtt(argc, argv);
  else if(strcmp(scen, "resume") == 0) rc = sc_resume(argc, argv);
  else if(strcmp(scen, "relayd") == 0) rc = sc_relayd(argc, argv);
  else if(strcmp(scen, "relay") == 0)  rc = sc_relay(argc, argv);
  else usage();
  if(rc != 0)
    usage();
  if(opt_pid > 0)
    result("daemon_alive", "%d", proc_alive(opt_pid));
  result("failures", "%d", g_nfail);
  return g_nfail > 0 ? 2 : 0;
}
