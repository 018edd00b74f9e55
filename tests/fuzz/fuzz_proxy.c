/*
 * fuzz_proxy.c: libFuzzer target for the PROXY protocol header parser of
 * utils.c (proxy_hdr_parse, -O proxy-from).
 *
 * Input layout: the bytes a trusted balancer's connection starts with.
 * Oracles: a complete header is at most the input and PROXY_HDR_MAX long
 * and parses again alone to the same length and addresses; every shorter
 * prefix of it asks for more (the daemon consumes every byte of a
 * PROXY_MORE answer, so no prefix may claim a header); a prefix that is
 * refused stays refused with more bytes; PROXY_MORE is never the answer
 * once PROXY_HDR_MAX bytes are held; v2 addresses are the bytes at
 * their fixed offsets.
 */
#ifdef HAVE_CONFIG_H
#include "config.h"
#endif

#include <sys/types.h>
#include <sys/socket.h>
#include <netinet/in.h>
#include <arpa/inet.h>

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "utils.h"

#define FZ_FAIL(...) do {						\
    fprintf(stderr, "fuzz oracle: " __VA_ARGS__);			\
    fprintf(stderr, "\n");						\
    abort();								\
  } while(0)

/* the v2 address bytes of h equal the input at the fixed offsets */
static void fz_check_v2_addr(const uint8_t *d, const proxy_hdr_t *h)
{
  const struct sockaddr_in *s4 = (const struct sockaddr_in *)&h->src;
  const struct sockaddr_in6 *s6 = (const struct sockaddr_in6 *)&h->src;
  if(h->cmd != PROXY_CMD_PROXY)
    return;
  if(h->src.ss_family == AF_INET)
    {
      if(memcmp(&s4->sin_addr, d + 16, 4) != 0 ||
	 memcmp(&s4->sin_port, d + 24, 2) != 0)
	FZ_FAIL("v2 IPv4 source differs from the header bytes");
    }
  else if(h->src.ss_family == AF_INET6)
    {
      if(memcmp(&s6->sin6_addr, d + 16, 16) != 0 ||
	 memcmp(&s6->sin6_port, d + 48, 2) != 0)
	FZ_FAIL("v2 IPv6 source differs from the header bytes");
    }
  else
    FZ_FAIL("PROXY command with family %d", h->src.ss_family);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
  proxy_hdr_t h, h2;
  long rc, rc2, prev = PROXY_MORE;
  size_t i;

  if(size > 2 * PROXY_HDR_MAX)
    return 0;
  rc = proxy_hdr_parse(data, size, &h);
  if(rc == PROXY_MORE && size >= PROXY_HDR_MAX)
    FZ_FAIL("more wanted with %zu bytes held", size);
  if(rc > 0)
    {
      if((size_t)rc > size || rc > PROXY_HDR_MAX)
	FZ_FAIL("header length %ld of %zu bytes", rc, size);
      if(h.version != 1 && h.version != 2)
	FZ_FAIL("version %d", h.version);
      if((rc2 = proxy_hdr_parse(data, (size_t)rc, &h2)) != rc ||
	 h2.cmd != h.cmd ||
	 memcmp(&h2.src, &h.src, sizeof(h.src)) != 0)
	FZ_FAIL("alone the header parses to %ld, not %ld", rc2, rc);
      if(h.version == 2)
	fz_check_v2_addr(data, &h);
    }
  /* walk the prefixes: MORE until the header, an error stays an error */
  for(i=0; i<size && i < (size_t)(rc > 0 ? rc : (long)size); i++)
    {
      rc2 = proxy_hdr_parse(data, i, &h2);
      if(rc > 0 && rc2 != PROXY_MORE)
	FZ_FAIL("prefix %zu of a %ld-byte header gave %ld", i, rc, rc2);
      if(prev < 0 && rc2 >= 0)
	FZ_FAIL("prefix %zu accepted after a shorter one was refused", i);
      prev = rc2;
    }
  if(prev < 0 && rc >= 0)
    FZ_FAIL("input accepted after a prefix was refused");
  (void)proxy_hdr_strerror(rc);
  return 0;
}
