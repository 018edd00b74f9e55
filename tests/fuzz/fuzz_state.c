/*
 * fuzz_state.c: libFuzzer target for the live-upgrade state loader
 * (upg_load in sc_remoted.c, section "Live upgrade"), which a successor
 * runs on the state its predecessor serialized: untrusted input that must
 * never crash, leak or corrupt the daemon's trees and lists.
 *
 * The input is a serialized state, in either layout the loader reads:
 * typed records (version 2) or the positional layout of version 1.
 * FZ_ST_NFDS connected socketpairs stand for the fds that came with it
 * (the daemon's ends, non-blocking, referenced by index
 * 0..FZ_ST_NFDS-1).  The harness overwrites the state's timer-wheel
 * epoch and tick with the current clock where the input holds them (the
 * epoch and tick fields of the first record; the fixed positions of
 * version 1), so inputs are not all rejected by the clock check.  When
 * the load succeeds, timers are advanced past every protocol timeout and
 * pending output is flushed, which exercises the rebuilt objects; then
 * shutdown_all() must release everything (fz_end checks: no timers, no
 * objects, nothing in the -U directory).
 * Seeds: state-* are written by the daemon's own saver
 * (tests/upgrade/state_seeds, which builds real objects), including
 * states with unknown records and fields and a must-understand field;
 * v1-state-* are states of the version-1 layout.
 */
#define SC_REMOTED_NO_MAIN 1
#pragma GCC diagnostic ignored "-Wunused-function"
#include "../../sc_remoted.c"
#include "fuzz_common.h"

#define FZ_ST_NFDS 12

/* the clock fields of the daemon record (the first) of a typed state */
static void fz_state_clock(uint8_t *buf, size_t size)
{
  tlv_r_t rr = {buf + 8, size - 8, 0}, fr;
  const uint8_t *v, *fv;
  uint32_t n, fn;
  uint16_t type, tag;
  uint8_t *w;

  if(tlv_next(&rr, &type, &v, &n) != 1 || type != ST_REC_DAEMON)
    return;
  fr.p = v;
  fr.len = n;
  fr.off = 0;
  while(tlv_next(&fr, &tag, &fv, &fn) == 1)
    {
      w = buf + (fv - buf);
      if(tag == DMF_EPOCH && fn == 12)
	{
	  bytes_htonl(w, 0);
	  bytes_htonl(w + 4, (uint32_t)tw_epoch.tv_sec);
	  bytes_htonl(w + 8, (uint32_t)tw_epoch.tv_usec);
	}
      else if(tag == DMF_TICK && fn == 8)
	memset(w, 0, 8);
    }
  return;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
  static uint8_t *buf = NULL;
  static size_t cap = 0;
  int pairs[FZ_ST_NFDS][2], fds[FZ_ST_NFDS];
  uint8_t used[FZ_ST_NFDS];
  const char *why;
  char *from = NULL;
  size_t off;
  uint32_t slen;
  int i, rc;

  if(size == 0)
    return 0;
  if(size > cap)
    {
      free(buf);
      if((buf = malloc(size)) == NULL)
	abort();
      cap = size;
    }
  memcpy(buf, data, size);

  fz_begin(900, 0);
  if(size >= 8 && bytes_ntohl(buf + 4) == UPG_VERSION)
    fz_state_clock(buf, size);
  /* version 1: magic, version, version string, then the epoch and tick */
  else if(size >= 12)
    {
      slen = bytes_ntohl(buf + 8);
      off = 12 + (slen > 0 ? slen - 1 : 0);
      if(slen <= 256 && off + 20 <= size)
	{
	  bytes_htonl(buf + off, 0);
	  bytes_htonl(buf + off + 4, (uint32_t)tw_epoch.tv_sec);
	  bytes_htonl(buf + off + 8, (uint32_t)tw_epoch.tv_usec);
	  bytes_htonl(buf + off + 12, 0);
	  bytes_htonl(buf + off + 16, 0);
	}
    }
  for(i=0; i<FZ_ST_NFDS; i++)
    {
      if(socketpair(AF_UNIX, SOCK_STREAM, 0, pairs[i]) != 0)
	abort();
      fd_nonblock(pairs[i][0]);
      fd_nonblock(pairs[i][1]);
      fds[i] = pairs[i][0];
    }
  memset(used, 0, sizeof(used));

  rc = upg_load(buf, size, fds, used, FZ_ST_NFDS, &why, &from);
  if(fz_debug)
    fprintf(stderr, "upg_load: %s%s\n", rc == 0 ? "loaded" : "failed at ",
	    rc == 0 ? "" : why);
  free(from);
  if(rc == 0)
    {
      flush_pending();
      gc_collect();
      tw_advance(tw_tick + 61);
      flush_pending();
      gc_collect();
    }
  /* fds the state did not take are the caller's to close */
  for(i=0; i<FZ_ST_NFDS; i++)
    if(!used[i])
      close(fds[i]);
  fz_end();
  for(i=0; i<FZ_ST_NFDS; i++)
    close(pairs[i][1]);
  return 0;
}
