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
 *   byte 1     n: the number of op bytes (low 6 bits)
 *   n bytes    ops, each consuming the next chunk of the stream
 *   the rest   the stream, written by mux client 1
 *
 * Op byte: bits 0-4 choose the chunk length (fz_chunk_len), bits 5-7 what
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
 * After the input, every VP still connected receives data on remote
 * channels 1 and 2 and a FIN for channel 1 (those that are open and not
 * finished by scamper: the epilogue plays a well-behaved scamper), and
 * ACKs for all it sent.
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
  if(vp == NULL || vp->dead || vp->state != VP_GO || vp->ev.fd < 0 ||
     vp->ev.fd != fz_v[i].dfd)
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

/* send a frame from scamper of VP slot i with the seq remoted expects */
static void fz_scamper_send(int i, uint32_t chan, const uint8_t *body,
			    size_t len)
{
  uint8_t frame[RP_HDRLEN + 4200];
  vp_t *vp;
  if((vp = fz_vp_live(i)) == NULL)
    return;
  if(len > 4096)
    len = 4096;
  len = fz_rp_put(frame, vp->rcv_nxt, chan, body, len);
  fz_write(fz_v[i].conn, frame, len);
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
    fz_scamper_send(i, chan, (const uint8_t *)text, strlen(text));
  return 1;
}

static void fz_scamper_ack(int i, int all)
{
  uint8_t b[5];
  vp_t *vp;
  int n = 0;

  while((vp = fz_vp_live(i)) != NULL && n++ < 64)
    {
      if(vp->snd_una == vp->snd_nxt)
	{
	  if(n == 1)
	    {
	      b[0] = RP_KEEPALIVE;
	      fz_scamper_send(i, 0, b, 1);
	    }
	  return;
	}
      b[0] = RP_ACK;
      bytes_htonl(b + 1, vp->snd_una);
      fz_scamper_send(i, 0, b, 5);
      if(!all)
	return;
    }
  return;
}

static void fz_scamper_frame(const uint8_t *c, size_t len)
{
  uint8_t b[5];
  uint32_t chan;
  int i;

  if(len < 1)
    return;
  i = (c[0] & 0x80) ? 1 : 0;
  chan = (uint32_t)((c[0] >> 2) & 7) + 1;
  switch(c[0] & 3)
    {
    case 0:
      fz_scamper_send(i, chan, c + 1, len - 1);
      break;
    case 1:
      b[0] = RP_CHANNEL_FIN;
      bytes_htonl(b + 1, chan);
      fz_scamper_send(i, 0, b, 5);
      break;
    default:
      fz_scamper_ack(i, (c[0] & 3) == 3);
      break;
    }
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
  uint8_t frame[300], b[5];
  const uint8_t *ops, *p;
  size_t nops, left, len, i, el;
  meta_table_t *mt;
  const char *msg;
  uint8_t setup, op;
  int v;

  if(size < 2)
    return 0;
  setup = data[0];
  nops = data[1] & 63;
  if(size < 2 + nops)
    return 0;
  ops = data + 2;
  p = data + 2 + nops;
  left = size - 2 - nops;

  fz_begin(zombie[(setup >> 1) & 3]);
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
    {
      fz_uc_connect(fz_vp_live(0));
      fz_step();
    }
  if(fz_mc1 == NULL)
    fz_mc1 = fz_mc_open();
  if(setup & 0x40)
    fz_mc2 = fz_mc_open();
  fz_step();

  for(i=0; i<nops; i++)
    {
      op = ops[i];
      len = fz_chunk_len[op & 31];
      if(len > left)
	len = left;
      switch(op >> 5)
	{
	case 0:
	  fz_mc_send(fz_mc1, p, len);
	  break;
	case 1:
	  fz_mc_send(fz_mc2 != NULL ? fz_mc2 : fz_mc1, p, len);
	  break;
	case 2:
	  if(fz_vp_live(0) != NULL)
	    {
	      fz_write(fz_v[0].conn, p, len);
	      fz_step();
	    }
	  break;
	case 3:
	  fz_scamper_frame(p, len);
	  break;
	case 4:
	  fz_mc_send(fz_mc1, p, len);
	  fz_tick(61);
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
	}
      p += len;
      left -= len;
    }
  fz_mc_send(fz_mc1, p, left);

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
	{
	  b[0] = RP_CHANNEL_FIN;
	  bytes_htonl(b + 1, 1);
	  fz_scamper_send(v, 0, b, 5);
	}
      fz_scamper_ack(v, 1);
    }
  fz_step();
  fz_end();
  return 0;
}
