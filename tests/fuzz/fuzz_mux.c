/*
 * fuzz_mux.c: libFuzzer target for the mux client byte stream (PROTOCOL.md
 * 5) as sc_remoted reads it from a -M client, with scamper-side events on
 * the VPs interleaved so that channels opened through the mux see data,
 * FINs, ACKs, zombies, resumes and departures.
 *
 * Setup: one or two VPs are connected and sent a valid MASTER_NEW (VP 1:
 * magic "FUZZMAG1", name "vp1", IPv4 peer; VP 2: magic "FUZZMAG2", no
 * name, IPv6 peer), so their VP ids are 1 and 2; a mux client is opened
 * with mc_open() as mux_accept() does.
 *
 * Input layout:
 *
 *   byte 0     setup
 *              bit 0     a second VP
 *              bits 1-2  -Z: 900, 60, 1, 0
 *              bit 3     a -U client on VP 1 as well (takes remote channel 1)
 *              bit 4     metadata for "vp1" (extra VP_UPDATE attributes)
 *              bit 5     mux client 1 connects before the VPs arrive
 *              bit 6     mux client 2 connects after them
 *              bit 7     mux client 1 disconnects after the input
 *   byte 1     setup2: FZ_S2_* of fuzz_common.h (small limits, small
 *              socket buffers, select backend)
 *   byte 2     n: the number of op bytes (low 6 bits)
 *   n bytes    ops, each consuming the next chunk of the stream
 *   the rest   the stream, written by mux client 1
 *
 * Op byte: bits 0-3 choose the chunk length (fz_chunk_len), bits 4-7 what
 * happens with it:
 *   0  written by mux client 1
 *   1  written by mux client 2 (client 1 if there is none)
 *   2  written raw on VP 1's connection (as scamper)
 *   3  a well-formed scamper frame, with the seq the VP expects, made
 *      from the chunk: c[0] bit 7 picks VP 2, bits 0-1 the kind: 0 data on
 *      remote channel ((c[0] >> 2) & 7) + 1 carrying c[1..]; 1 CHANNEL_FIN
 *      for that channel; 2 ACK of the oldest unacked frame (KEEPALIVE if
 *      none); 3 ACKs for every unacked frame
 *   4  written by mux client 1, then the clock advances 61 s
 *   5  c[0] bit 7 picks VP 2: its connection is cut (zombie, or freed with
 *      -Z 0); with c[0] bit 0 a new connection sends MASTER_RES for it,
 *      consistent unless c[0] bit 1 (then rejected); the rcv_nxt it
 *      claims is chosen by c[1]
 *   6  mux client 2 connects if it has not, then writes the chunk
 *   7  mux client 1 disconnects, a new mux client 1 connects and writes
 *      the chunk
 *   8  written by mux client 1, then the clock advances 1 s
 *   9  written by mux client 1, then 31 s
 *  10  written by mux client 1, which then stops (or resumes) reading
 *  11  written by mux client 2, which then stops (or resumes) reading
 *  12  written by mux client 1, then scamper stops (or resumes) reading
 *      both VP connections
 *  13  written raw on VP 2's connection (as scamper)
 *  14  a burst of scamper frames, one per chunk byte b, as op 3 with
 *      c[0] = b and 512 bytes of data for the data kind
 *  15  written by mux client 1 one byte per read
 * Then every reader resumes.  After the input, every VP still connected
 * receives data on remote channels 1 and 2 and a FIN for channel 1 (those
 * that are open and not finished by scamper: the epilogue plays a
 * well-behaved scamper), and ACKs for all it sent.
 */
#define SC_REMOTED_NO_MAIN 1
#pragma GCC diagnostic ignored "-Wunused-function"
#include "../../sc_remoted.c"
#include "fuzz_common.h"

typedef struct fz_vp
{
  uint8_t  magic[8];
  fz_fd_t *conn;       /* the harness's end of its latest connection */
  int      dfd;        /* the daemon's end of it */
} fz_vp_t;

static fz_vp_t  fz_v[2];
static int      fz_nv;
static int      fz_port;
static fz_fd_t *fz_mc1, *fz_mc2;

static const char fz_meta_text[] =
  "vp1 asn4 64496\n"
  "vp1 asn6 64497\n"
  "vp1 latlong -37.78,175.28\n"
  "vp1 cc NZ\n"
  "vp1 place Hamilton, New Zealand\n"
  "vp1 tag first\n"
  "vp1 tag second\n"
  "vp2 cc US\n";

/* the session of VP slot i if its connection is the slot's latest */
static vp_t *fz_vp_live(int i)
{
  vp_t *vp;
  if(i >= fz_nv)
    return NULL;
  vp = vp_find_magic(fz_v[i].magic, 8);
  if(vp == NULL || vp->dead || vp->state != VP_GO || vp->conn.ev.fd < 0 ||
     vp->conn.ev.fd != fz_v[i].dfd)
    return NULL;
  return vp;
}

static void fz_vp_connect(int i)
{
  fz_v[i].conn = fz_conn_open(41000 + fz_port, i == 1, &fz_v[i].dfd);
  fz_port++;
  fz_step();
  return;
}

/* scamper of VP slot i does one thing (FZ_SC_*) */
static void fz_scamper(int i, int kind, uint32_t chan, const uint8_t *data,
		       size_t len)
{
  if(fz_vp_live(i) == NULL)
    return;
  fz_sc_cmd(fz_v[i].conn, fz_v[i].dfd, kind, chan, data, len);
  fz_step();
  return;
}

/*
 * The epilogue plays a well-behaved scamper: it only speaks on channels
 * that exist and that it has not finished.  Sends text if not NULL;
 * returns 1 if the channel was open.
 */
static int fz_epilogue_data(int i, uint32_t chan, const char *text)
{
  chan_t *c;
  vp_t *vp;
  if((vp = fz_vp_live(i)) == NULL || (c = vp_chan_find(vp, chan)) == NULL ||
     c->fin_rcvd)
    return 0;
  if(text != NULL)
    fz_scamper(i, FZ_SC_DATA, chan, (const uint8_t *)text, strlen(text));
  return 1;
}

/* op 3: c[0] picks the VP, the kind and the channel; c[1..] is data */
static void fz_scamper_frame(const uint8_t *c, size_t len)
{
  if(len < 1)
    return;
  fz_scamper((c[0] & 0x80) ? 1 : 0, c[0] & 3, (uint32_t)((c[0] >> 2) & 7) + 1,
	     c + 1, len - 1);
  return;
}

/* cut VP slot i's connection; maybe resume it on a new one */
static void fz_vp_cut(const uint8_t *c, size_t len)
{
  uint8_t frame[64];
  uint32_t span, rcv;
  vp_t *vp;
  int i;

  if(len < 1)
    return;
  i = (c[0] & 0x80) ? 1 : 0;
  if(i >= fz_nv)
    return;
  if(fz_vp_live(i) != NULL)
    {
      fz_close(fz_v[i].conn);
      fz_step();
    }
  if((c[0] & 1) == 0 || (vp = vp_find_magic(fz_v[i].magic, 8)) == NULL ||
     vp->dead)
    return;
  span = vp->snd_nxt - vp->snd_una;
  rcv = vp->snd_una + (len > 1 ? c[1] % (span + 1) : span);
  if(c[0] & 2)
    rcv = vp->snd_nxt + 1;
  len = fz_master_res(frame, fz_v[i].magic, 8, rcv, vp->rcv_nxt,
		      vp->rcv_nxt);
  fz_vp_connect(i);
  fz_write(fz_v[i].conn, frame, len);
  fz_step();
  return;
}

static void fz_mc_send(fz_fd_t *mc, const uint8_t *p, size_t len)
{
  if(mc == NULL || len == 0)
    return;
  fz_write(mc, p, len);
  fz_step();
  return;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
  static const long zombie[4] = {900, 60, 1, 0};
  static const char *names[2] = {"vp1", NULL};
  static uint8_t burst[1 + 512];
  uint8_t frame[300], setup, setup2;
  const uint8_t *ops, *p;
  size_t nops, left, len, i, j, el;
  meta_table_t *mt;
  const char *msg;
  int v, action;

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

  fz_begin(zombie[(setup >> 1) & 3], setup2);
  fz_nv = (setup & 1) ? 2 : 1;
  fz_port = 0;
  fz_mc1 = fz_mc2 = NULL;
  memcpy(fz_v[0].magic, "FUZZMAG1", 8);
  memcpy(fz_v[1].magic, "FUZZMAG2", 8);
  if(setup & 0x10)
    {
      if((mt = meta_parse(fz_meta_text, sizeof(fz_meta_text) - 1, &el,
			  &msg)) == NULL)
	abort();
      meta_table = mt;
    }
  if(setup & 0x20)
    fz_mc1 = fz_mc_open();
  for(v=0; v<fz_nv; v++)
    {
      fz_vp_connect(v);
      len = fz_master_new(frame, fz_v[v].magic, 8, names[v]);
      fz_write(fz_v[v].conn, frame, len);
      fz_step();
    }
  if(setup & 0x08)
    fz_uc_add(fz_vp_live(0));
  if(fz_mc1 == NULL)
    fz_mc1 = fz_mc_open();
  if(setup & 0x40)
    fz_mc2 = fz_mc_open();
  fz_step();

  memset(burst, 'D', sizeof(burst));
  burst[sizeof(burst) - 1] = '\n';
  for(i=0; i<nops; i++)
    {
      len = fz_chunk_len[ops[i] & 15];
      action = ops[i] >> 4;
      if(len > left)
	len = left;
      switch(action)
	{
	case 1:
	case 11:
	  fz_mc_send(fz_mc2 != NULL ? fz_mc2 : fz_mc1, p, len);
	  if(action == 11 && fz_mc2 != NULL)
	    fz_mc2->stalled = !fz_mc2->stalled;
	  break;
	case 2:
	case 13:
	  v = action == 2 ? 0 : 1;
	  if(fz_vp_live(v) != NULL)
	    {
	      fz_write(fz_v[v].conn, p, len);
	      fz_step();
	    }
	  break;
	case 3:
	  fz_scamper_frame(p, len);
	  break;
	case 5:
	  fz_vp_cut(p, len);
	  break;
	case 6:
	  if(fz_mc2 == NULL)
	    {
	      fz_mc2 = fz_mc_open();
	      fz_step();
	    }
	  fz_mc_send(fz_mc2, p, len);
	  break;
	case 7:
	  fz_close(fz_mc1);
	  fz_step();
	  fz_mc1 = fz_mc_open();
	  fz_step();
	  fz_mc_send(fz_mc1, p, len);
	  break;
	case 14:
	  for(j=0; j<len; j++)
	    {
	      burst[0] = p[j];
	      fz_scamper_frame(burst, (p[j] & 3) == 0 ? sizeof(burst) : 1);
	    }
	  break;
	case 15:
	  for(j=0; j<len; j++)
	    fz_mc_send(fz_mc1, p + j, 1);
	  break;
	default: /* 0, 4, 8, 9, 10, 12 */
	  fz_mc_send(fz_mc1, p, len);
	  if(action == 4) fz_tick(61);
	  if(action == 8) fz_tick(1);
	  if(action == 9) fz_tick(31);
	  if(action == 10 && fz_mc1 != NULL)
	    fz_mc1->stalled = !fz_mc1->stalled;
	  if(action == 12)
	    for(v=0; v<fz_nv; v++)
	      if(fz_v[v].conn != NULL)
		fz_v[v].conn->stalled = !fz_v[v].conn->stalled;
	  break;
	}
      p += len;
      left -= len;
      fz_step();
    }
  fz_mc_send(fz_mc1, p, left);
  for(i=0; i<(size_t)fz_nfds; i++)
    fz_fds[i].stalled = 0;
  fz_step();
  fz_step();

  if(setup & 0x80)
    {
      fz_close(fz_mc1);
      fz_step();
    }
  for(v=0; v<fz_nv; v++)
    {
      fz_epilogue_data(v, 1, "epilogue 1\n");
      fz_epilogue_data(v, 2, "epilogue 2\n");
      if(fz_epilogue_data(v, 1, NULL))
	fz_scamper(v, FZ_SC_FIN, 1, NULL, 0);
      fz_scamper(v, FZ_SC_ACKALL, 0, NULL, 0);
    }
  fz_step();
  fz_end();
  return 0;
}
