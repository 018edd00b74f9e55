/*
 * bench/upgrade-state-cost.c: the CPU cost of the live-upgrade state
 * itself, free of exec, startup and scheduling noise: N VPs in GO, each
 * with a -U socket and a mux channel carrying 1 KiB never ACKed, and one
 * mux client, built through the daemon's own code paths (the fuzzers'
 * scaffolding, tests/fuzz/fuzz_common.h); then the state is saved
 * (upg_save) and loaded into a fresh daemon (upg_load) R times, and the
 * fastest save and load are printed with the state's size.
 *
 * Compiled against a sc_remoted.c of either state format (the typed
 * records of UPG_VERSION 2, or the positional layout of version 1 before
 * them), so both can be compared on one machine in one run:
 * bench/upgrade-state-cost.sh does that (this tree and git's 82f017c).
 *
 *     upgrade-state-cost [N=1000] [R=20]
 */
#define SC_REMOTED_NO_MAIN 1
#pragma GCC diagnostic ignored "-Wunused-function"
#include "sc_remoted.c"
#include "tests/fuzz/fuzz_common.h"

#ifdef UPG_VERSION_V1
typedef st_w_t bench_w_t;          /* typed records */
#define BW_P(w)   ((w).t.p)
#define BW_LEN(w) ((w).t.len)
#else
typedef upg_w_t bench_w_t;         /* positional */
#define BW_P(w)   ((w).p)
#define BW_LEN(w) ((w).len)
#endif

static double now_ms(void)
{
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

/* the other ends of the VP connections (the fuzzers' own table holds
 * only a few dozen) */
static int *peer;

/* write len bytes to the daemon through fd and let it read them */
static void feed(int fd, const uint8_t *p, size_t len)
{
  if(write(fd, p, len) != (ssize_t)len)
    abort();
  fz_step();
  return;
}

static void build(int n)
{
  struct sockaddr_in sin;
  uint8_t b[1100], magic[8];
  char name[32];
  fz_fd_t *mc;
  int i, sv[2];
  vp_t *vp;

  fz_begin(900, 0);
  opt_handshake_max = n + 10;
  if(fz_pair(sv) != 0)
    abort();
  fdev_init(&tcp_lev[0], sv[0], FD_TCP_LISTEN, NULL);
  tcp_lev_count = 1;
  fz_keep(sv[1], FZ_FD_CONN);
  mc = fz_mc_open();
  fz_step();
  peer = calloc((size_t)n, sizeof(int));
  for(i=0; i<n; i++)
    {
      if(fz_pair(sv) != 0)
	abort();
      peer[i] = sv[1];
      memset(&sin, 0, sizeof(sin));
      sin.sin_family = AF_INET;
      sin.sin_port = htons((uint16_t)(10000 + i));
      sin.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
      if((vp = vp_accept_fd(sv[0], (struct sockaddr *)&sin)) == NULL)
	abort();
      snprintf((char *)magic, sizeof(magic), "%07d", i);
      magic[7] = 'M';
      snprintf(name, sizeof(name), "vp%d", i);
      feed(peer[i], b, fz_master_new(b, magic, 8, name));
      if(vp->state != VP_GO)
	{
	  fprintf(stderr, "VP %d not in GO\n", i);
	  exit(1);
	}
      /* a mux channel to it with 1 KiB the VP never ACKs */
      bytes_htonl(b, 0);
      bytes_htonl(b + 4, 10);
      bytes_htons(b + 8, MUX_CHANNEL_OPEN);
      bytes_htonl(b + 10, vp->id);
      bytes_htonl(b + 14, (uint32_t)(100 + i));
      bytes_htonl(b + 18, (uint32_t)(100 + i));
      bytes_htonl(b + 22, 1024);
      memset(b + 26, 'u', 1024);
      fz_write(mc, b, 26 + 1024);
    }
  return;
}

int main(int argc, char *argv[])
{
  int n = argc > 1 ? atoi(argv[1]) : 1000, reps = argc > 2 ? atoi(argv[2])
    : 20, r, i, sv[2], *fds;
  double t, save = 1e9, load = 1e9;
  struct rlimit rl;
  uint8_t *used;
  const char *why;
  char *from;
  bench_w_t w;
  uint32_t nfds = 0;
  size_t len = 0;

  getrlimit(RLIMIT_NOFILE, &rl);
  rl.rlim_cur = rl.rlim_max;
  setrlimit(RLIMIT_NOFILE, &rl);
  build(n);
  for(r=0; r<reps; r++)
    {
      memset(&w, 0, sizeof(w));
      t = now_ms();
      upg_save(&w);
      t = now_ms() - t;
      if(t < save)
	save = t;
      len = BW_LEN(w);
      nfds = w.nfds;
      if(r < reps - 1)
	{
	  free(BW_P(w));
	  free(w.fds);
	}
    }
  fz_end();
  for(r=0; r<reps; r++)
    {
      fz_begin(900, 0);
      fds = calloc(nfds, sizeof(int));
      used = calloc(nfds, 1);
      for(i=0; i<(int)nfds; i++)
	{
	  if(fz_pair(sv) != 0)
	    abort();
	  fz_keep(sv[1], FZ_FD_CONN);
	  fds[i] = sv[0];
	}
      from = NULL;
      t = now_ms();
      if(upg_load(BW_P(w), len, fds, used, nfds, &why, &from) != 0)
	{
	  fprintf(stderr, "load failed: %s\n", why);
	  return 1;
	}
      t = now_ms() - t;
      if(t < load)
	load = t;
      free(from);
      for(i=0; i<(int)nfds; i++)
	if(!used[i])
	  close(fds[i]);
      free(fds);
      free(used);
      fz_end();
    }
  printf("%d VPs: state %zu bytes, %u fds; save %.2f ms, load %.2f ms "
	 "(fastest of %d)\n", n, len, nfds, save, load, reps);
  return 0;
}
