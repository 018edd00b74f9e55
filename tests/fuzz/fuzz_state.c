/*
 * fuzz_state.c: libFuzzer target for the live-upgrade state loader
 * (upg_load in sc_remoted.c, section "Live upgrade"), which a successor
 * runs on the state its predecessor serialized: untrusted input that must
 * never crash, leak or corrupt the daemon's trees and lists.
 *
 * The input is a serialized state.  FZ_ST_NFDS connected socketpairs
 * stand for the fds that came with it (the daemon's ends, non-blocking,
 * referenced by index 0..FZ_ST_NFDS-1).  The harness overwrites the
 * state's timer-wheel epoch and tick with the current clock when the
 * input is long enough to hold them, so inputs are not all rejected by
 * the clock check.  When the load succeeds, timers are advanced past
 * every protocol timeout and pending output is flushed, which exercises
 * the rebuilt objects; then shutdown_all() must release everything
 * (fz_end checks: no timers, no objects, nothing in the -U directory).
 * Seeds (tests/fuzz/make-seeds.py) are valid states.
 */
#define SC_REMOTED_NO_MAIN 1
#pragma GCC diagnostic ignored "-Wunused-function"
#include "../../sc_remoted.c"
#include "fuzz_common.h"

#define FZ_ST_NFDS 12

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
  /* magic, version, version string, then the epoch and tick */
  if(size >= 12)
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
