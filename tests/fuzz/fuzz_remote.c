/*
 * fuzz_remote.c: libFuzzer target for the remote protocol byte stream
 * (PROTOCOL.md 2) as sc_remoted reads it from a scamper connection.
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
 *   byte 1     n: the number of op bytes (low 6 bits)
 *   n bytes    ops, each consuming the next chunk of the stream
 *   the rest   the stream
 *
 * Op byte: bits 0-4 choose the chunk length (fz_chunk_len), bits 5-7 what
 * happens with it:
 *   0  chunk to the connection
 *   1  chunk to the connection, then the clock advances 31 s (keepalive)
 *   2  chunk to the connection, then the clock advances 61 s (accept
 *      timeout, rx_abort, -Z expiry)
 *   3  chunk written by a -U client (data for scamper); to the
 *      connection when there is no client
 *   4  chunk to the connection, then a -U client half-closes
 *   5  chunk to the connection, then a -U client closes
 *   6  chunk to the connection, then a new -U client connects to the
 *      socket of the connection's VP
 *   7  chunk to the connection, then the connection is cut and a new one
 *      is opened; later chunks go to the new one
 * The stream left after the ops goes to the connection in one write.
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

typedef struct fz_remote
{
  fz_fd_t *conn;            /* the connection the stream goes to */
  int      dfd;             /* its daemon-side fd */
  int      nconn;
  fz_fd_t *uc[FZ_MAXUC];
  int      nuc;
} fz_remote_t;

static void fz_new_conn(fz_remote_t *r)
{
  r->conn = NULL;
  r->dfd = -1;
  if(r->nconn >= FZ_MAXCONN)
    return;
  r->conn = fz_conn_open(40000 + r->nconn, 0, &r->dfd);
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
  if(r->nuc >= FZ_MAXUC ||
     (f = fz_uc_connect(fz_conn_vp(r->dfd))) == NULL)
    return;
  r->uc[r->nuc++] = f;
  fz_step();  /* vp_lev_accept */
  return;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
  static const long zombie[4] = {900, 60, 1, 0};
  fz_remote_t r;
  uint8_t frame[600];
  const uint8_t *ops, *p;
  size_t nops, left, len, i;
  int mode, nuc, k;
  uint8_t setup, op;
  fz_fd_t *first;
  long z;

  if(size < 2)
    return 0;
  setup = data[0];
  nops = data[1] & 63;
  if(size < 2 + nops)
    return 0;
  ops = data + 2;
  p = data + 2 + nops;
  left = size - 2 - nops;
  mode = setup & 3;
  nuc = (setup >> 2) & 3;
  z = zombie[(setup >> 4) & 3];
  if(mode == 2 && z == 0)
    z = 900;

  fz_begin(z);
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
      if(mode >= 2)
	{
	  first = r.conn;
	  if(mode == 2)
	    fz_cut(&r);
	  fz_new_conn(&r);
	  (void)first;
	}
    }

  for(i=0; i<nops; i++)
    {
      op = ops[i];
      len = fz_chunk_len[op & 31];
      if(len > left)
	len = left;
      switch(op >> 5)
	{
	case 3:
	  if(r.nuc > 0)
	    {
	      fz_write(r.uc[i % (size_t)r.nuc], p, len);
	      break;
	    }
	  /* FALLTHROUGH */
	default:
	  fz_write(r.conn, p, len);
	  break;
	}
      p += len;
      left -= len;
      fz_step();

      switch(op >> 5)
	{
	case 1: fz_tick(31); break;
	case 2: fz_tick(61); break;
	case 4:
	  if(r.nuc > 0 && r.uc[i % (size_t)r.nuc]->fd >= 0)
	    {
	      shutdown(r.uc[i % (size_t)r.nuc]->fd, SHUT_WR);
	      fz_step();
	    }
	  break;
	case 5:
	  if(r.nuc > 0)
	    {
	      fz_close(r.uc[i % (size_t)r.nuc]);
	      fz_step();
	    }
	  break;
	case 6:
	  fz_add_uc(&r);
	  break;
	case 7:
	  fz_cut(&r);
	  fz_new_conn(&r);
	  break;
	}
    }

  if(left > 0)
    {
      fz_write(r.conn, p, left);
      fz_step();
    }
  if(setup & 0x80)
    fz_cut(&r);
  fz_step();
  fz_end();
  return 0;
}
