/*
 * fuzz_remote.c: libFuzzer target for the remote protocol byte stream
 * (PROTOCOL.md 2) as sc_remoted reads it from a scamper connection, with
 * -U local clients, time, cuts and reconnections interleaved.
 *
 * Input layout:
 *
 *   byte 0     setup
 *              bits 0-1  mode: 0 the stream starts in HANDSHAKE;
 *                        1 a valid MASTER_NEW comes first, so the stream
 *                          is parsed in GO;
 *                        2 a first session is made (MASTER_NEW) and cut,
 *                          so it is a zombie, and the stream arrives on a
 *                          second connection (MASTER_RES resumes it);
 *                        3 as 2, but the first session stays connected
 *                          (MASTER_RES takes a live session over)
 *              bits 2-3  -U clients opened on the first session (modes 1-3)
 *              bits 4-5  -Z: 900, 60, 1, 0 (0 is 900 in mode 2)
 *              bit 6     the first session sends the monitor name "vp1"
 *              bit 7     the connection is cut (EOF) after the input
 *   byte 1     setup2: FZ_S2_* of fuzz_common.h (small limits, small
 *              socket buffers, select backend)
 *   byte 2     n: the number of op bytes (low 6 bits)
 *   n bytes    ops, each consuming the next chunk of the stream
 *   the rest   the stream
 *
 * Op byte: bits 0-3 choose the chunk length (fz_chunk_len), bits 4-7 what
 * happens with it ("conn" is the connection the stream currently goes to):
 *   0  to conn
 *   1  to conn, then the clock advances 1 s
 *   2  to conn, then 31 s (keepalive)
 *   3  to conn, then 61 s (accept timeout, rx_abort, -Z 60 expiry)
 *   4  written by a -U client (data for scamper); to conn if none
 *   5  to conn, then a -U client half-closes
 *   6  to conn, then a -U client closes
 *   7  to conn, then a new -U client connects to conn's VP's socket
 *   8  to conn, then conn is cut and a new connection becomes conn
 *   9  to conn, then the -U clients stop (or resume) reading
 *  10  to conn, then scamper stops (or resumes) reading conn
 *  11  to conn, then 901 s (-Z 900 expiry)
 *  12  written by a -U client, which then half-closes
 *  13  to conn, then a new connection becomes conn; the old one stays
 *  14  to conn one byte per read
 *  15  a burst of well-formed frames from scamper on conn, with the seqs
 *      conn's VP expects, one per chunk byte b: b & 3 = 0: 512 bytes of
 *      data on remote channel ((b >> 2) & 7) + 1; 1: CHANNEL_FIN for that
 *      channel; 2: ACK of the oldest unacked frame (KEEPALIVE if none);
 *      3: ACKs for every unacked frame
 * The -U client of ops 4-6 and 12 is chosen by the op's index.  The
 * stream left after the ops goes to conn in one write; then every reader
 * resumes, so all output is checked.
 *
 * The first session's magic is "FUZZMAGC" (8 bytes); seeds use it.
 */
#define SC_REMOTED_NO_MAIN 1
#pragma GCC diagnostic ignored "-Wunused-function"
#include "../../sc_remoted.c"
#include "fuzz_common.h"

#define FZ_MAXUC   8
#define FZ_MAXCONN 8

static const uint8_t fz_magic[8] = {'F','U','Z','Z','M','A','G','C'};

/*
 * The peer port of each connection: -U socket names change length with
 * it (a resumed session's name may no longer fit), and one repeats, so
 * two live sessions can want the same socket name.
 */
static const int fz_ports[FZ_MAXCONN] = {
  40000, 7, 65535, 40000, 80, 12345, 1, 443,
};

typedef struct fz_remote
{
  fz_fd_t *conn;            /* the connection the stream goes to */
  int      dfd;             /* its daemon-side fd */
  int      nconn;
  fz_fd_t *uc[FZ_MAXUC];
  int      nuc;
  int      uc_stalled;
} fz_remote_t;

static void fz_new_conn(fz_remote_t *r)
{
  r->conn = NULL;
  r->dfd = -1;
  if(r->nconn >= FZ_MAXCONN)
    return;
  r->conn = fz_conn_open(fz_ports[r->nconn], 0, &r->dfd);
  r->nconn++;
  fz_step();
  return;
}

/* cut the connection: EOF for the daemon (zombie or free) */
static void fz_cut(fz_remote_t *r)
{
  fz_close(r->conn);
  fz_step();
  return;
}

static void fz_add_uc(fz_remote_t *r)
{
  fz_fd_t *f;
  if(r->nuc >= FZ_MAXUC || (f = fz_uc_add(fz_conn_vp(r->dfd))) == NULL)
    return;
  f->stalled = r->uc_stalled;
  r->uc[r->nuc++] = f;
  return;
}

/* op 15: scamper does one thing per byte (FZ_SC_* in the low 2 bits) */
static void fz_scamper_burst(fz_remote_t *r, const uint8_t *p, size_t len)
{
  static uint8_t text[512];
  size_t i;

  memset(text, 'S', sizeof(text));
  text[sizeof(text) - 1] = '\n';
  for(i=0; i<len; i++)
    {
      fz_sc_cmd(r->conn, r->dfd, p[i] & 3, (uint32_t)((p[i] >> 2) & 7) + 1,
		text, sizeof(text));
      fz_step();
    }
  return;
}

static fz_fd_t *fz_pick_uc(fz_remote_t *r, size_t i)
{
  if(r->nuc == 0)
    return NULL;
  return r->uc[i % (size_t)r->nuc];
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
  static const long zombie[4] = {900, 60, 1, 0};
  fz_remote_t r;
  uint8_t frame[600];
  const uint8_t *ops, *p;
  size_t nops, left, len, i, j;
  int mode, nuc, k, action;
  uint8_t setup, setup2;
  fz_fd_t *uc;
  long z;

  if(size < 3)
    return 0;
  setup = data[0];
  setup2 = data[1];
  nops = data[2] & 63;
  if(size < 3 + nops)
    return 0;
  ops = data + 3;
  p = data + 3 + nops;
  left = size - 3 - nops;
  mode = setup & 3;
  nuc = (setup >> 2) & 3;
  z = zombie[(setup >> 4) & 3];
  if(mode == 2 && z == 0)
    z = 900;

  fz_begin(z, setup2);
  memset(&r, 0, sizeof(r));
  r.dfd = -1;
  fz_new_conn(&r);

  if(mode != 0)
    {
      /* the first session */
      len = fz_master_new(frame, fz_magic, sizeof(fz_magic),
			  (setup & 0x40) ? "vp1" : NULL);
      fz_write(r.conn, frame, len);
      fz_step();
      for(k=0; k<nuc; k++)
	fz_add_uc(&r);
      if(mode == 2)
	fz_cut(&r);
      if(mode >= 2)
	fz_new_conn(&r);
    }

  for(i=0; i<nops; i++)
    {
      len = fz_chunk_len[ops[i] & 15];
      action = ops[i] >> 4;
      if(len > left)
	len = left;
      uc = fz_pick_uc(&r, i);
      if((action == 4 || action == 12) && uc != NULL)
	fz_write(uc, p, len);
      else if(action == 14)
	for(j=0; j<len; j++)
	  fz_write(r.conn, p + j, 1);
      else if(action == 15)
	fz_scamper_burst(&r, p, len);
      else
	fz_write(r.conn, p, len);
      p += len;
      left -= len;
      fz_step();

      switch(action)
	{
	case 1: fz_tick(1); break;
	case 2: fz_tick(31); break;
	case 3: fz_tick(61); break;
	case 11: fz_tick(901); break;
	case 5:
	case 12:
	  if(uc != NULL && uc->fd >= 0)
	    {
	      shutdown(uc->fd, SHUT_WR);
	      fz_step();
	    }
	  break;
	case 6:
	  if(uc != NULL)
	    {
	      fz_close(uc);
	      fz_step();
	    }
	  break;
	case 7:
	  fz_add_uc(&r);
	  break;
	case 8:
	  fz_cut(&r);
	  fz_new_conn(&r);
	  break;
	case 9:
	  r.uc_stalled = !r.uc_stalled;
	  for(k=0; k<r.nuc; k++)
	    r.uc[k]->stalled = r.uc_stalled;
	  fz_step();
	  break;
	case 10:
	  if(r.conn != NULL)
	    r.conn->stalled = !r.conn->stalled;
	  fz_step();
	  break;
	case 13:
	  fz_new_conn(&r);
	  break;
	}
    }

  if(left > 0)
    {
      fz_write(r.conn, p, left);
      fz_step();
    }
  for(k=0; k<fz_nfds; k++)
    fz_fds[k].stalled = 0;
  fz_step();
  fz_step();
  if(setup & 0x80)
    fz_cut(&r);
  fz_step();
  fz_end();
  return 0;
}
