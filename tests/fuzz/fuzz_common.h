/*
 * fuzz_common.h: the scaffolding shared by the libFuzzer targets that drive
 * sc_remoted's sessions (fuzz_remote.c, fuzz_mux.c).  Include it after
 * sc_remoted.c.
 *
 * Each input runs in a fresh daemon state: fz_begin() does what main()
 * does before its loop (globals_init, ev_init: epoll, or select with
 * FZ_S2_SELECT) and fz_end() what it does after (shutdown_all), then
 * checks that nothing was left behind: no armed timers, no objects on the
 * lists, no sockets in the -U directory.
 *
 * Connections are socketpairs.  The daemon's end is handed to vp_alloc()
 * or mc_open() as tcp_accept() and mux_accept() do after accept(); the
 * harness keeps the other end, writes input bytes into it, and runs one
 * loop iteration (fz_step: ev_poll(0) and the rest of loop_run() except
 * the clock, which only fz_tick() advances), so the bytes take the
 * daemon's own read path (vp_read -> vp_input -> rp_rx_feed, mc_read ->
 * mux_rx_feed, uc_read).  Whatever the daemon writes back is drained
 * after every step (so its writes never block), except from ends the
 * input marked as stalled readers (to reach the back-pressure paths), and
 * is checked by small independent parsers of the remote and mux
 * protocols; a violation of PROTOCOL.md found there aborts, which
 * libFuzzer reports as a crash.
 * Set FUZZ_NO_ORACLE=1 in the environment to keep only the memory checks,
 * FUZZ_DEBUG=1 for the daemon's debug log (-O debug) while reproducing.
 */
#ifndef FUZZ_COMMON_H
#define FUZZ_COMMON_H

#include <dirent.h>
#include <sys/ioctl.h>
#include <sys/socket.h>

#define FZ_MAXFD   40
#define FZ_RXMAX   (MUX_HDRLEN + MUX_CTL_MAX + 16)

#define FZ_FD_CONN 1   /* the scamper end of a remote connection */
#define FZ_FD_UC   2   /* a -U local client */
#define FZ_FD_MUX  3   /* a mux client */

static void fz_rmdir(void);

#define FZ_FAIL(...) do {						\
    fprintf(stderr, "fuzz oracle: " __VA_ARGS__);			\
    fprintf(stderr, "\n");						\
    fz_rmdir();								\
    abort();								\
  } while(0)

/* what the oracle knows about one mux channel id of one client */
typedef struct fz_mchan
{
  uint32_t id;
  uint32_t vpid;        /* from the client's first CHANNEL_OPEN for id */
  uint8_t  closed;      /* CHANNEL_CLOSE seen */
} fz_mchan_t;

#define FZ_MCHAN_MAX 64
#define FZ_VPID_MAX  64

/* one fd the harness holds, with the reassembly state of its oracle */
typedef struct fz_fd
{
  int      fd;            /* -1 once closed */
  int      type;
  int      eof;           /* the daemon closed its end */
  int      stalled;       /* not drained: a reader that stopped reading */
  uint8_t *pend;          /* written by the harness, not yet taken by the */
  size_t   pend_len;      /* socket (the daemon is not reading): sent as */
  size_t   pend_cap;      /* it makes room, like a blocked TCP sender */
  uint8_t *rx;            /* reassembly of the daemon's output */
  size_t   rx_have;

  /* the harness as a well-behaved scamper on this connection */
  int      sc_init;
  uint32_t sc_seq;        /* seq of scamper's next frame */
  uint32_t sc_ack;        /* remoted's seq scamper ACKs next */

  /* remote stream (FZ_FD_CONN) */
  int      started;       /* MASTER_ID or MASTER_OK seen */
  int      rejected;      /* MASTER_REJ seen */
  int      seq_known;
  uint32_t seq_next;      /* next reliable seq expected from remoted */

  /* mux stream (FZ_FD_MUX): daemon -> client */
  int      go;
  uint32_t updated[FZ_VPID_MAX]; size_t nupdated;
  uint32_t departed[FZ_VPID_MAX]; size_t ndeparted;
  fz_mchan_t mchan[FZ_MCHAN_MAX]; size_t nmchan;
  /* client -> daemon, parsed to learn the CHANNEL_OPEN requests */
  uint8_t  tx_hdr[MUX_HDRLEN]; size_t tx_hdr_have;
  uint32_t tx_left, tx_chan;
  uint8_t  tx_ctl[12]; size_t tx_ctl_have;
} fz_fd_t;

static fz_fd_t  fz_fds[FZ_MAXFD];
static int      fz_nfds = 0;
static char     fz_udir[64];
static int      fz_oracle = 1;
static int      fz_debug = 0;
static uint8_t  fz_buf[65536 * 2];
static int      fz_small_bufs = 0; /* small socket buffers this input */

/* remove the -U directory and what is in it (at exit, or on a finding) */
static void fz_rmdir(void)
{
  char path[sizeof(fz_udir) + 300];
  struct dirent *de;
  DIR *d;

  if(fz_udir[0] == '\0')
    return;
  if((d = opendir(fz_udir)) != NULL)
    {
      while((de = readdir(d)) != NULL)
	if(strcmp(de->d_name, ".") != 0 && strcmp(de->d_name, "..") != 0)
	  {
	    snprintf(path, sizeof(path), "%s/%s", fz_udir, de->d_name);
	    unlink(path);
	  }
      closedir(d);
    }
  rmdir(fz_udir);
  return;
}

static void fz_init_once(void)
{
  static int done = 0;
  struct stat sb;
  const char *e, *tmp;
  if(done)
    return;
  done = 1;
  signal(SIGPIPE, SIG_IGN);

  /* the -U directory: short (sun_path), on tmpfs when there is one */
  if((tmp = getenv("TMPDIR")) == NULL || *tmp == '\0' ||
     strlen(tmp) > 24)
    tmp = stat("/dev/shm", &sb) == 0 && S_ISDIR(sb.st_mode) &&
      access("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp";
  snprintf(fz_udir, sizeof(fz_udir), "%s/sc_remoted_fuzz.XXXXXX", tmp);
  if(mkdtemp(fz_udir) == NULL)
    {
      perror("mkdtemp");
      abort();
    }
  atexit(fz_rmdir);
  if((e = getenv("FUZZ_NO_ORACLE")) != NULL && *e != '\0' && *e != '0')
    fz_oracle = 0;
  if((e = getenv("FUZZ_DEBUG")) != NULL && *e != '\0' && *e != '0')
    fz_debug = 1;
  return;
}

/* ---- the harness's fds ---- */

static fz_fd_t *fz_keep(int fd, int type)
{
  fz_fd_t *f;
  if(fz_nfds >= FZ_MAXFD)
    {
      close(fd);
      return NULL;
    }
  f = &fz_fds[fz_nfds++];
  memset(f, 0, sizeof(*f));
  f->fd = fd;
  f->type = type;
  if(type != FZ_FD_UC && (f->rx = malloc(FZ_RXMAX)) == NULL)
    abort();
  return f;
}

static fz_fd_t *fz_find(int fd)
{
  int i;
  for(i=0; i<fz_nfds; i++)
    if(fz_fds[i].fd == fd)
      return &fz_fds[i];
  return NULL;
}

static void fz_close(fz_fd_t *f)
{
  if(f == NULL || f->fd < 0)
    return;
  close(f->fd);
  f->fd = -1;
  f->pend_len = 0;
  return;
}

/* write what is pending on f as far as the socket takes it */
static void fz_pend_flush(fz_fd_t *f)
{
  ssize_t n;
  while(f->fd >= 0 && f->pend_len > 0)
    {
      if((n = write(f->fd, f->pend, f->pend_len)) > 0)
	{
	  memmove(f->pend, f->pend + n, f->pend_len - (size_t)n);
	  f->pend_len -= (size_t)n;
	  continue;
	}
      if(n < 0 && errno != EAGAIN && errno != EINTR)
	f->pend_len = 0; /* the daemon closed its end */
      return;
    }
  return;
}

/* ---- oracle: remoted -> scamper (PROTOCOL.md 2.2 - 2.4) ---- */

static void fz_rp_seq(fz_fd_t *f, uint32_t seq, int reliable, const char *what)
{
  if(f->seq_known && seq != f->seq_next)
    FZ_FAIL("remote: %s with seq %u, expected %u", what, seq, f->seq_next);
  f->seq_known = 1;
  f->seq_next = reliable ? seq + 1 : seq;
  return;
}

static void fz_rp_frame(fz_fd_t *f, uint32_t seq, uint32_t chan,
			const uint8_t *b, uint16_t len)
{
  uint8_t type;
  size_t i, idl;

  if(f->rejected)
    FZ_FAIL("remote: frame after MASTER_REJ");
  if(chan != 0)
    {
      if(!f->started)
	FZ_FAIL("remote: data frame before MASTER_ID/MASTER_OK");
      fz_rp_seq(f, seq, 1, "data frame");
      return;
    }
  if(len < 1)
    FZ_FAIL("remote: control frame without a type");
  type = b[0];
  switch(type)
    {
    case RP_MASTER_ID:
      if(f->started)
	FZ_FAIL("remote: second MASTER_ID/MASTER_OK on a connection");
      if(seq != 0 || len < 3 || (idl = b[1]) == 0 || (size_t)len != 2 + idl ||
	 b[1 + idl] != '\0')
	FZ_FAIL("remote: malformed MASTER_ID (seq %u len %u)", seq, len);
      for(i=0; i+1 < idl; i++)
	if(!isprint(b[2 + i]))
	  FZ_FAIL("remote: unprintable MASTER_ID");
      f->started = 1;
      f->seq_known = 1;
      f->seq_next = 0;
      return;
    case RP_MASTER_OK:
      if(f->started)
	FZ_FAIL("remote: second MASTER_ID/MASTER_OK on a connection");
      if(seq != 0 || len != 5)
	FZ_FAIL("remote: malformed MASTER_OK (seq %u len %u)", seq, len);
      f->started = 1;
      f->seq_known = 0;
      return;
    case RP_MASTER_REJ:
      if(f->started)
	FZ_FAIL("remote: MASTER_REJ in go mode");
      if(seq != 0)
	FZ_FAIL("remote: MASTER_REJ with seq %u", seq);
      f->rejected = 1;
      return;
    case RP_CHANNEL_NEW:
    case RP_CHANNEL_FIN:
      if(!f->started)
	FZ_FAIL("remote: channel message before the handshake");
      if(len != 5 || bytes_ntohl(b + 1) == 0)
	FZ_FAIL("remote: malformed CHANNEL_%s",
		type == RP_CHANNEL_NEW ? "NEW" : "FIN");
      fz_rp_seq(f, seq, 1, type == RP_CHANNEL_NEW ? "CHANNEL_NEW" :
		"CHANNEL_FIN");
      return;
    case RP_KEEPALIVE:
    case RP_ACK:
      if(!f->started)
	FZ_FAIL("remote: %s before the handshake",
		type == RP_ACK ? "ACK" : "KEEPALIVE");
      if(len != (type == RP_ACK ? 5 : 1))
	FZ_FAIL("remote: malformed %s", type == RP_ACK ? "ACK" : "KEEPALIVE");
      fz_rp_seq(f, seq, 0, type == RP_ACK ? "ACK" : "KEEPALIVE");
      return;
    }
  FZ_FAIL("remote: remoted sent control type %u", type);
}

/* ---- oracle: remoted -> mux client (PROTOCOL.md 5) ---- */

static int fz_u32_in(const uint32_t *a, size_t n, uint32_t v)
{
  size_t i;
  for(i=0; i<n; i++)
    if(a[i] == v)
      return 1;
  return 0;
}

static fz_mchan_t *fz_mchan(fz_fd_t *f, uint32_t id)
{
  size_t i;
  for(i=0; i<f->nmchan; i++)
    if(f->mchan[i].id == id)
      return &f->mchan[i];
  return NULL;
}

/* position of each attribute in the emission order of PROTOCOL.md 5.4 */
static int fz_attr_rank(uint16_t a)
{
  static const int rank[14] = {-1, 0, 1, 2, 4, 7, 8, 9, 6, 10, 12, 11, 2, 5};
  return a < 14 ? rank[a] : -1;
}

static void fz_mux_update(fz_fd_t *f, const uint8_t *b, uint32_t len)
{
  uint32_t off = 6, vpid;
  uint16_t attr;
  const uint8_t *nul;
  int last = -1, r, seen_arrival = 0, seen_addr = 0;

  if(len < 6 || (vpid = bytes_ntohl(b + 2)) == 0)
    FZ_FAIL("mux: malformed VP_UPDATE");
  if(fz_u32_in(f->updated, f->nupdated, vpid))
    FZ_FAIL("mux: second VP_UPDATE for vp %u", vpid);
  if(fz_u32_in(f->departed, f->ndeparted, vpid))
    FZ_FAIL("mux: VP_UPDATE for departed vp %u", vpid);
  if(f->nupdated < FZ_VPID_MAX)
    f->updated[f->nupdated++] = vpid;
  while(off < len)
    {
      if(len - off < 3)
	FZ_FAIL("mux: truncated VP_UPDATE attribute");
      attr = bytes_ntohs(b + off);
      if((r = fz_attr_rank(attr)) < 0)
	FZ_FAIL("mux: VP_UPDATE attribute %u", attr);
      if(r < last || (r == last && attr != MUX_ATTR_TAG))
	FZ_FAIL("mux: VP_UPDATE attribute %u out of order", attr);
      last = r;
      if(attr == MUX_ATTR_ARRIVAL) seen_arrival = 1;
      if(attr == MUX_ATTR_IPV4 || attr == MUX_ATTR_IPV6) seen_addr = 1;
      if((nul = memchr(b + off + 2, '\0', len - off - 2)) == NULL)
	FZ_FAIL("mux: VP_UPDATE value not NUL-terminated");
      off = (uint32_t)(nul - b) + 1;
    }
  if(!seen_arrival || !seen_addr)
    FZ_FAIL("mux: VP_UPDATE without arrival or address");
  return;
}

static void fz_mux_frame(fz_fd_t *f, uint32_t chan, const uint8_t *b,
			 uint32_t len)
{
  fz_mchan_t *mc;
  uint16_t type;
  uint32_t v;

  if(chan != 0)
    {
      if(!f->go)
	FZ_FAIL("mux: data before GO");
      if((mc = fz_mchan(f, chan)) == NULL)
	FZ_FAIL("mux: data on channel %u the client never opened", chan);
      if(mc->closed)
	FZ_FAIL("mux: data on channel %u after CHANNEL_CLOSE", chan);
      if(fz_u32_in(f->departed, f->ndeparted, mc->vpid))
	FZ_FAIL("mux: data on channel %u after VP_DEPART(%u)", chan,
		mc->vpid);
      if(len > RP_MAXBODY)
	FZ_FAIL("mux: data frame of %u bytes", len);
      return;
    }
  if(len < 2)
    FZ_FAIL("mux: control frame of %u bytes", len);
  type = bytes_ntohs(b);
  if(!f->go && type != MUX_VP_UPDATE && type != MUX_GO)
    FZ_FAIL("mux: control type %u before GO", type);
  switch(type)
    {
    case MUX_VP_UPDATE:
      fz_mux_update(f, b, len);
      return;
    case MUX_GO:
      if(f->go || len != 2)
	FZ_FAIL("mux: second or malformed GO");
      f->go = 1;
      return;
    case MUX_VP_DEPART:
      if(len != 6)
	FZ_FAIL("mux: malformed VP_DEPART");
      v = bytes_ntohl(b + 2);
      if(v == 0)
	FZ_FAIL("mux: VP_DEPART(0)");
      if(fz_u32_in(f->departed, f->ndeparted, v))
	FZ_FAIL("mux: second VP_DEPART(%u)", v);
      if(f->ndeparted < FZ_VPID_MAX)
	f->departed[f->ndeparted++] = v;
      return;
    case MUX_CHANNEL_CLOSE:
      if(len != 6)
	FZ_FAIL("mux: malformed CHANNEL_CLOSE");
      v = bytes_ntohl(b + 2);
      if((mc = fz_mchan(f, v)) == NULL)
	FZ_FAIL("mux: CHANNEL_CLOSE for channel %u never opened", v);
      if(mc->closed)
	FZ_FAIL("mux: second CHANNEL_CLOSE for channel %u", v);
      if(fz_u32_in(f->departed, f->ndeparted, mc->vpid))
	FZ_FAIL("mux: CHANNEL_CLOSE(%u) after VP_DEPART(%u)", v, mc->vpid);
      mc->closed = 1;
      return;
    }
  FZ_FAIL("mux: remoted sent control type %u", type);
}

/* learn the client's CHANNEL_OPEN requests from the bytes it writes */
static void fz_mux_tx(fz_fd_t *f, const uint8_t *p, size_t len)
{
  size_t n;
  while(len > 0)
    {
      if(f->tx_hdr_have < MUX_HDRLEN)
	{
	  n = MUX_HDRLEN - f->tx_hdr_have;
	  if(n > len) n = len;
	  memcpy(f->tx_hdr + f->tx_hdr_have, p, n);
	  f->tx_hdr_have += n; p += n; len -= n;
	  if(f->tx_hdr_have < MUX_HDRLEN)
	    return;
	  f->tx_chan = bytes_ntohl(f->tx_hdr);
	  f->tx_left = bytes_ntohl(f->tx_hdr + 4);
	  f->tx_ctl_have = 0;
	  if(f->tx_left == 0)
	    {
	      f->tx_hdr_have = 0;
	      continue;
	    }
	}
      n = f->tx_left < len ? f->tx_left : len;
      if(f->tx_chan == 0 && f->tx_ctl_have < sizeof(f->tx_ctl))
	{
	  size_t c = sizeof(f->tx_ctl) - f->tx_ctl_have;
	  if(c > n) c = n;
	  memcpy(f->tx_ctl + f->tx_ctl_have, p, c);
	  f->tx_ctl_have += c;
	}
      f->tx_left -= (uint32_t)n; p += n; len -= n;
      if(f->tx_left > 0)
	continue;
      f->tx_hdr_have = 0;
      if(f->tx_chan == 0 && f->tx_ctl_have >= 10 &&
	 bytes_ntohs(f->tx_ctl) == MUX_CHANNEL_OPEN)
	{
	  /*
	   * A new id, or one whose VP has departed (its record went with
	   * the VP, so the id may be used again); reusing any other id
	   * closes the client.
	   */
	  fz_mchan_t *mc = fz_mchan(f, bytes_ntohl(f->tx_ctl + 6));
	  if(mc != NULL &&
	     !fz_u32_in(f->departed, f->ndeparted, mc->vpid))
	    continue;
	  if(mc == NULL)
	    {
	      if(f->nmchan >= FZ_MCHAN_MAX)
		continue;
	      mc = &f->mchan[f->nmchan++];
	    }
	  mc->id = bytes_ntohl(f->tx_ctl + 6);
	  mc->vpid = bytes_ntohl(f->tx_ctl + 2);
	  mc->closed = 0;
	}
    }
  return;
}

/* feed the daemon's output on f to the oracle, whole frames at a time */
static size_t fz_frame_need(const fz_fd_t *f, size_t hl)
{
  if(f->type == FZ_FD_CONN)
    return hl + bytes_ntohs(f->rx + 8);
  return hl + bytes_ntohl(f->rx + 4);
}

static void fz_oracle_rx(fz_fd_t *f, const uint8_t *p, size_t len)
{
  size_t hl = f->type == FZ_FD_CONN ? RP_HDRLEN : MUX_HDRLEN, need, n;

  if(f->type == FZ_FD_UC || !fz_oracle)
    return;
  for(;;)
    {
      need = f->rx_have < hl ? hl : fz_frame_need(f, hl);
      if(need > FZ_RXMAX)
	FZ_FAIL("mux: frame of %zu bytes from remoted", need - hl);
      if(f->rx_have < need)
	{
	  if(len == 0)
	    return;
	  n = need - f->rx_have;
	  if(n > len) n = len;
	  memcpy(f->rx + f->rx_have, p, n);
	  f->rx_have += n; p += n; len -= n;
	  continue;
	}
      if(f->type == FZ_FD_CONN)
	fz_rp_frame(f, bytes_ntohl(f->rx), bytes_ntohl(f->rx + 4),
		    f->rx + hl, (uint16_t)(need - hl));
      else
	fz_mux_frame(f, bytes_ntohl(f->rx), f->rx + hl,
		     (uint32_t)(need - hl));
      f->rx_have = 0;
    }
}

/* read everything the daemon wrote to the harness's ends */
static void fz_drain(void)
{
  ssize_t n;
  int i;
  for(i=0; i<fz_nfds; i++)
    {
      fz_fd_t *f = &fz_fds[i];
      if(f->fd < 0 || f->eof || f->stalled)
	continue;
      while((n = read(f->fd, fz_buf, sizeof(fz_buf))) > 0)
	fz_oracle_rx(f, fz_buf, (size_t)n);
      if(n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR))
	f->eof = 1;
    }
  return;
}

/* one iteration of the daemon's loop, without waiting, then drain */
static void fz_step(void)
{
  int i;
  for(i=0; i<fz_nfds; i++)
    if(fz_fds[i].pend_len > 0)
      fz_pend_flush(&fz_fds[i]);
  ev_poll(0);
  vp_again_run();
  flush_pending();
  gc_collect();
  fz_drain();
  return;
}

/* advance the daemon's clock by secs one-second ticks */
static void fz_tick(unsigned int secs)
{
  tw_advance(tw_tick + secs);
  flush_pending();
  gc_collect();
  fz_drain();
  return;
}

/*
 * Write to one of the harness's ends, letting the daemon read as needed.
 * What the socket does not take now stays pending on f and is sent as
 * the daemon makes room (fz_step), in order, like a blocked TCP sender.
 */
static void fz_write(fz_fd_t *f, const uint8_t *p, size_t len)
{
  size_t before;
  int stuck = 0;

  if(f == NULL || f->fd < 0 || len == 0)
    return;
  if(f->type == FZ_FD_MUX && fz_oracle)
    fz_mux_tx(f, p, len);
  if(f->pend_len + len > f->pend_cap)
    {
      size_t cap = f->pend_len + len + 4096;
      uint8_t *np = realloc(f->pend, cap);
      if(np == NULL)
	abort();
      f->pend = np;
      f->pend_cap = cap;
    }
  memcpy(f->pend + f->pend_len, p, len);
  f->pend_len += len;
  while(f->pend_len > 0 && stuck < 2)
    {
      before = f->pend_len;
      fz_pend_flush(f);
      stuck = f->pend_len < before ? 0 : stuck + 1;
      fz_step();
    }
  return;
}

/* ---- connections, clients ---- */

#define FZ_SMALL_SNDBUF 1 /* the kernel's minimum */

static void fz_small_sndbuf(int fd)
{
  int sz = FZ_SMALL_SNDBUF;
  setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &sz, sizeof(sz));
  return;
}

static int fz_pair(int sv[2])
{
  int sz = 1 << 22;
  if(socketpair(AF_UNIX, SOCK_STREAM, 0, sv) != 0)
    return -1;
  if(fd_nonblock(sv[0]) != 0 || fd_nonblock(sv[1]) != 0)
    {
      close(sv[0]); close(sv[1]);
      return -1;
    }
  if(fz_small_bufs)
    sz = FZ_SMALL_SNDBUF;
  setsockopt(sv[0], SOL_SOCKET, SO_SNDBUF, &sz, sizeof(sz));
  setsockopt(sv[1], SOL_SOCKET, SO_SNDBUF, &sz, sizeof(sz));
  return 0;
}

/*
 * A scamper connection, taken the way tcp_accept() takes one after its
 * accept(): the handshake cap, vp_alloc() with the peer address (a fake
 * AF_INET 127.0.0.1:port or AF_INET6 2001:db8::1.port here), the
 * handshake count, the VP list, the accept timeout, read interest.  Keep
 * in step with tcp_accept().  *dfd is the daemon's fd.
 */
static fz_fd_t *fz_conn_open(int port, int v6, int *dfd)
{
  struct sockaddr_storage ss;
  struct sockaddr_in *sin = (struct sockaddr_in *)&ss;
  struct sockaddr_in6 *sin6 = (struct sockaddr_in6 *)&ss;
  fz_fd_t *f;
  vp_t *vp;
  int sv[2];

  *dfd = -1;
  if(fz_nfds >= FZ_MAXFD || fz_pair(sv) != 0)
    return NULL;
  f = fz_keep(sv[1], FZ_FD_CONN);
  memset(&ss, 0, sizeof(ss));
  if(v6)
    {
      sin6->sin6_family = AF_INET6;
      sin6->sin6_port = htons((uint16_t)port);
      inet_pton(AF_INET6, "2001:db8::1", &sin6->sin6_addr);
    }
  else
    {
      sin->sin_family = AF_INET;
      sin->sin_port = htons((uint16_t)port);
      sin->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    }
  /* the daemon's own accept path (refusal closes sv[0]: the harness
   * sees EOF) */
  if((vp = vp_accept_fd(sv[0], (struct sockaddr *)&ss)) == NULL ||
     vp->dead)
    return f;
  *dfd = sv[0];
  return f;
}

/* the live VP whose connection is the daemon's fd dfd */
static vp_t *fz_conn_vp(int dfd)
{
  dlist_node_t *n;
  vp_t *vp;
  if(dfd < 0)
    return NULL;
  for(n = vp_list.head; n != NULL; n = n->next)
    {
      vp = CONTAINER_OF(n, vp_t, list_node);
      if(!vp->dead && vp->conn.ev.fd == dfd)
	return vp;
    }
  return NULL;
}

/* small send buffers on the daemon's ends of vp's -U clients */
static int fz_uc_small(void *item, void *param)
{
  chan_t *c = item;
  (void)param;
  if(c->uc != NULL && c->uc->conn.ev.fd >= 0)
    fz_small_sndbuf(c->uc->conn.ev.fd);
  return 0;
}

/* a local client connecting to vp's -U socket (accepted on the next step) */
static fz_fd_t *fz_uc_connect(vp_t *vp)
{
  struct sockaddr_un sn;
  int fd;

  if(vp == NULL || vp->sockpath == NULL || fz_nfds >= FZ_MAXFD ||
     strlen(vp->sockpath) >= sizeof(sn.sun_path))
    return NULL;
  if((fd = socket(AF_UNIX, SOCK_STREAM, 0)) < 0)
    return NULL;
  memset(&sn, 0, sizeof(sn));
  sn.sun_family = AF_UNIX;
  memcpy(sn.sun_path, vp->sockpath, strlen(vp->sockpath) + 1);
  if(connect(fd, (struct sockaddr *)&sn, sizeof(sn)) != 0 ||
     fd_nonblock(fd) != 0)
    {
      close(fd);
      return NULL;
    }
  return fz_keep(fd, FZ_FD_UC);
}

/* a -U client connects to vp's socket and is accepted */
static fz_fd_t *fz_uc_add(vp_t *vp)
{
  fz_fd_t *f;
  if((f = fz_uc_connect(vp)) == NULL)
    return NULL;
  fz_step(); /* vp_lev_accept */
  if(fz_small_bufs && (vp = fz_conn_vp(vp->conn.ev.fd)) != NULL)
    splaytree_inorder(&vp->chans, fz_uc_small, NULL);
  return f;
}

/* a mux client the way mux_accept() takes one */
static fz_fd_t *fz_mc_open(void)
{
  int sv[2];
  if(fz_nfds >= FZ_MAXFD || fz_pair(sv) != 0)
    return NULL;
  if(mc_open(sv[0]) == NULL)
    {
      close(sv[0]); close(sv[1]);
      return NULL;
    }
  return fz_keep(sv[1], FZ_FD_MUX);
}

/* ---- frames ---- */

static size_t fz_rp_put(uint8_t *p, uint32_t seq, uint32_t chan,
			const uint8_t *body, size_t len)
{
  bytes_htonl(p, seq);
  bytes_htonl(p + 4, chan);
  bytes_htons(p + 8, (uint16_t)len);
  memcpy(p + RP_HDRLEN, body, len);
  return RP_HDRLEN + len;
}

/* MASTER_NEW with the given magic and optional name */
static size_t fz_master_new(uint8_t *p, const uint8_t *magic, uint8_t ml,
			    const char *name)
{
  uint8_t b[2 + 255 + 1 + 255];
  size_t len = 0, nl;
  b[len++] = RP_MASTER_NEW;
  b[len++] = ml;
  memcpy(b + len, magic, ml);
  len += ml;
  if(name != NULL)
    {
      nl = strlen(name) + 1;
      b[len++] = (uint8_t)nl;
      memcpy(b + len, name, nl);
      len += nl;
    }
  return fz_rp_put(p, 0, 0, b, len);
}

static size_t fz_master_res(uint8_t *p, const uint8_t *magic, uint8_t ml,
			    uint32_t rcv_nxt, uint32_t snd_una,
			    uint32_t snd_nxt)
{
  uint8_t b[2 + 255 + 12];
  size_t len = 0;
  b[len++] = RP_MASTER_RES;
  b[len++] = ml;
  memcpy(b + len, magic, ml);
  len += ml;
  bytes_htonl(b + len, rcv_nxt); len += 4;
  bytes_htonl(b + len, snd_una); len += 4;
  bytes_htonl(b + len, snd_nxt); len += 4;
  return fz_rp_put(p, 0, 0, b, len);
}

/* ---- the harness as a well-behaved scamper ---- */

/* bytes written to the daemon's fd that it has not read yet */
static int fz_unread(int dfd)
{
  int n = 0;
  if(dfd < 0 || ioctl(dfd, FIONREAD, &n) != 0)
    return 0;
  return n;
}

/* the VP in GO whose connection is dfd */
static vp_t *fz_sc_vp(int dfd)
{
  vp_t *vp = fz_conn_vp(dfd);
  return vp != NULL && vp->state == VP_GO ? vp : NULL;
}

/*
 * Take scamper's counters from the session when the daemon has read all
 * that was sent; while it has not (it stops reading a VP whose consumer
 * is full), scamper goes on numbering, its frames waiting in the socket.
 */
static void fz_sc_sync(fz_fd_t *f, const vp_t *vp, int dfd)
{
  if(f->sc_init &&
     (f->pend_len != 0 || fz_unread(dfd) != 0 || vp->rx.have != 0))
    return;
  f->sc_init = 1;
  f->sc_seq = vp->rcv_nxt;
  f->sc_ack = vp->snd_una;
  return;
}

/* one frame from scamper on f (the daemon's end: dfd), with the right seq */
static void fz_sc_frame(fz_fd_t *f, int dfd, uint32_t chan,
			const uint8_t *body, size_t len)
{
  static uint8_t frame[RP_HDRLEN + 4096];
  vp_t *vp;

  if(f == NULL || (vp = fz_sc_vp(dfd)) == NULL)
    return;
  if(len > 4096)
    len = 4096;
  fz_sc_sync(f, vp, dfd);
  len = fz_rp_put(frame, f->sc_seq, chan, body, len);
  if(chan != 0 || body[0] == RP_CHANNEL_FIN)
    f->sc_seq++;
  fz_write(f, frame, len);
  return;
}

#define FZ_SC_DATA    0  /* data on a channel */
#define FZ_SC_FIN     1  /* CHANNEL_FIN */
#define FZ_SC_ACK     2  /* ACK of remoted's oldest unacked frame */
#define FZ_SC_ACKALL  3  /* ACKs of all of them */

/* scamper does one thing; an ACK with nothing to ACK is a KEEPALIVE */
static void fz_sc_cmd(fz_fd_t *f, int dfd, int kind, uint32_t chan,
		      const uint8_t *data, size_t len)
{
  uint8_t b[5];
  vp_t *vp;
  int n;

  switch(kind)
    {
    case FZ_SC_DATA:
      if(len > 0)
	fz_sc_frame(f, dfd, chan, data, len);
      return;
    case FZ_SC_FIN:
      b[0] = RP_CHANNEL_FIN;
      bytes_htonl(b + 1, chan);
      fz_sc_frame(f, dfd, 0, b, 5);
      return;
    }
  for(n=0; n<256 && f != NULL && (vp = fz_sc_vp(dfd)) != NULL; n++)
    {
      fz_sc_sync(f, vp, dfd);
      if(f->sc_ack == vp->snd_nxt)
	{
	  if(n == 0)
	    {
	      b[0] = RP_KEEPALIVE;
	      fz_sc_frame(f, dfd, 0, b, 1);
	    }
	  return;
	}
      b[0] = RP_ACK;
      bytes_htonl(b + 1, f->sc_ack);
      f->sc_ack++;
      fz_sc_frame(f, dfd, 0, b, 5);
      if(kind == FZ_SC_ACK)
	return;
    }
  return;
}

/* chunk lengths selected by the low 4 bits of an op byte (clipped to
   what is left of the input) */
static const size_t fz_chunk_len[16] = {
  0, 1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 16, 24, 64, 256, 1024,
};

/* ---- per-input state ---- */

/* bits of the second setup byte, common to fuzz_remote and fuzz_mux */
#define FZ_S2_LIMITS  0x01  /* small buffer/unacked/stall/handshake limits */
#define FZ_S2_SMALLBUF 0x02 /* small socket send buffers */
#define FZ_S2_SELECT  0x04  /* the select backend (-O select) */

static void fz_begin(long zombie, uint8_t setup2)
{
  static int saved = 0;
  static size_t buf_high, buf_low, unacked_max;
  static long stall, handshake_max;

  fz_init_once();
  if(!saved)
    {
      saved = 1;
      buf_high = opt_buf_high; buf_low = opt_buf_low;
      unacked_max = opt_unacked_max; stall = opt_stall;
      handshake_max = opt_handshake_max;
    }
  opt_buf_high = buf_high; opt_buf_low = buf_low;
  opt_unacked_max = unacked_max; opt_stall = stall;
  opt_handshake_max = handshake_max;
  if(setup2 & FZ_S2_LIMITS)
    {
      opt_buf_high = 2048;
      opt_buf_low = 512;
      opt_unacked_max = 2048;
      opt_stall = 90;   /* beyond rx_abort (60): a paused VP's timer */
      opt_handshake_max = 2;
    }
  fz_small_bufs = (setup2 & FZ_S2_SMALLBUF) != 0;
  opt_flags = fz_debug ? OPT_DEBUG : 0;
  if(setup2 & FZ_S2_SELECT)
    opt_flags |= OPT_SELECT;
  opt_udir = fz_udir;
  opt_muxpath = NULL;
  opt_metafile = NULL;
  opt_zombie = zombie;
  vp_id_next = 1;
  mc_gen = 0;
  accept_paused = 0;
  loop_stop = 0;
  fz_nfds = 0;
  if(globals_init() != 0 || ev_init() != 0)
    abort();
  return;
}

static void fz_end(void)
{
  DIR *d;
  struct dirent *de;
  int i;

  shutdown_all();
  for(i=0; i<fz_nfds; i++)
    {
      fz_close(&fz_fds[i]);
      free(fz_fds[i].rx);
      fz_fds[i].rx = NULL;
      free(fz_fds[i].pend);
      fz_fds[i].pend = NULL;
    }
  fz_nfds = 0;

  /* nothing may outlive shutdown_all */
  if(tw_count != 0)
    FZ_FAIL("%zu timers still armed after shutdown", tw_count);
  if(vp_list.head != NULL || mc_list.head != NULL ||
     splaytree_count(&vp_by_id) != 0 || splaytree_count(&vp_by_magic) != 0)
    FZ_FAIL("objects left after shutdown");
  if(dlist_pop_head(&flush_list) != NULL)
    FZ_FAIL("flush list not empty after shutdown");
  if((d = opendir(fz_udir)) != NULL)
    {
      while((de = readdir(d)) != NULL)
	if(strcmp(de->d_name, ".") != 0 && strcmp(de->d_name, "..") != 0)
	  {
	    fprintf(stderr, "fuzz oracle: %s left in the -U directory after "
		    "shutdown\n", de->d_name);
	    closedir(d);
	    fz_rmdir();
	    abort();
	  }
      closedir(d);
    }
  return;
}

#endif /* FUZZ_COMMON_H */
