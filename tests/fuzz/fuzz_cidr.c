/*
 * fuzz_cidr.c: libFuzzer target for the CIDR parser and matcher of
 * utils.c (-O allow, -O mux-allow).
 *
 * Input layout: bytes 0..15 are an address (the first 4 as IPv4, all 16
 * as IPv6), the rest is the CIDR text (NUL-terminated here; an embedded
 * NUL ends it).  The parse result is compared with an independent
 * statement of the grammar -- addr or addr/len, len 1 to 3 decimal
 * digits at most 32 or 128, addr what inet_pton takes for its family, an
 * IPv4-mapped network of /96 or longer being the IPv4 network --
 * and a parsed network is checked: host bits clear, its own address
 * inside it, a bitwise reference for the match of the input address,
 * and the IPv4-mapped form matching exactly like the IPv4 one.
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

/* the grammar, stated again: 1 if s should parse */
static int fz_ref_parse(const char *s, int *fam, int *bits, uint8_t *addr)
{
  char buf[64];
  const char *slash = strchr(s, '/'), *p;
  size_t al = slash != NULL ? (size_t)(slash - s) : strlen(s);
  int max, b = -1, i;

  if(slash != NULL)
    {
      if(slash[1] == '\0' || strlen(slash + 1) > 3)
	return 0;
      b = 0;
      for(p = slash + 1; *p != '\0'; p++)
	{
	  if(*p < '0' || *p > '9')
	    return 0;
	  b = b * 10 + (*p - '0');
	}
    }
  if(al == 0 || al >= sizeof(buf))
    return 0;
  memcpy(buf, s, al);
  buf[al] = '\0';
  if(inet_pton(AF_INET6, buf, addr) == 1)
    {
      *fam = AF_INET6;
      max = 128;
    }
  else if(strchr(buf, ':') == NULL && inet_pton(AF_INET, buf, addr) == 1)
    {
      *fam = AF_INET;
      max = 32;
    }
  else
    return 0;
  if(b < 0)
    b = max;
  if(b > max)
    return 0;
  /* ::ffff:0:0/96 and longer: the IPv4 network */
  if(*fam == AF_INET6 && b >= 96)
    {
      for(i = 0; i < 12; i++)
	if(addr[i] != (i < 10 ? 0 : 0xff))
	  break;
      if(i == 12)
	{
	  memmove(addr, addr + 12, 4);
	  *fam = AF_INET;
	  b -= 96;
	}
    }
  *bits = b;
  return 1;
}

/* 1 if the first bits bits of a and b agree */
static int fz_prefix_eq(const uint8_t *a, const uint8_t *b, int bits)
{
  int i;
  for(i=0; i<bits; i++)
    if(((a[i / 8] >> (7 - i % 8)) & 1) != ((b[i / 8] >> (7 - i % 8)) & 1))
      return 0;
  return 1;
}

static void fz_sa4(struct sockaddr_storage *ss, const uint8_t *a)
{
  struct sockaddr_in *s4 = (struct sockaddr_in *)ss;
  memset(ss, 0, sizeof(*ss));
  s4->sin_family = AF_INET;
  memcpy(&s4->sin_addr, a, 4);
}

static void fz_sa6(struct sockaddr_storage *ss, const uint8_t *a)
{
  struct sockaddr_in6 *s6 = (struct sockaddr_in6 *)ss;
  memset(ss, 0, sizeof(*ss));
  s6->sin6_family = AF_INET6;
  memcpy(&s6->sin6_addr, a, 16);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
  struct sockaddr_storage ss;
  uint8_t in[16], ref_addr[16], mapped[16];
  char *text;
  cidr_t c;
  int rc, ref, fam = 0, bits = 0, i, alen, m4, mm;

  if(size < 16 || size > 256)
    return 0;
  memcpy(in, data, 16);
  if((text = malloc(size - 16 + 1)) == NULL)
    return 0;
  memcpy(text, data + 16, size - 16);
  text[size - 16] = '\0';

  rc = cidr_parse(text, &c);
  ref = fz_ref_parse(text, &fam, &bits, ref_addr);
  if((rc == 0) != (ref == 1))
    FZ_FAIL("cidr_parse(\"%s\") = %d, reference says %d", text, rc, ref);
  if(rc == 0)
    {
      alen = c.family == AF_INET ? 4 : 16;
      if(c.family != fam || c.bits != bits)
	FZ_FAIL("\"%s\": family/bits %d/%d, want %d/%d", text, c.family,
		c.bits, fam, bits);
      if(!fz_prefix_eq(c.addr, ref_addr, bits))
	FZ_FAIL("\"%s\": network prefix differs", text);
      for(i = bits; i < alen * 8; i++)
	if((c.addr[i / 8] >> (7 - i % 8)) & 1)
	  FZ_FAIL("\"%s\": host bit %d set", text, i);
      /* the network's own address is inside it */
      if(c.family == AF_INET)
	fz_sa4(&ss, c.addr);
      else
	fz_sa6(&ss, c.addr);
      if(cidr_match(&c, (struct sockaddr *)&ss) != 1)
	FZ_FAIL("\"%s\": does not match its own address", text);
      /* the input address, against a bitwise reference */
      if(c.family == AF_INET)
	{
	  fz_sa4(&ss, in);
	  m4 = cidr_match(&c, (struct sockaddr *)&ss);
	  if(m4 != fz_prefix_eq(in, c.addr, bits))
	    FZ_FAIL("\"%s\": IPv4 match %d wrong", text, m4);
	  memset(mapped, 0, 10);
	  mapped[10] = mapped[11] = 0xff;
	  memcpy(mapped + 12, in, 4);
	  fz_sa6(&ss, mapped);
	  mm = cidr_match(&c, (struct sockaddr *)&ss);
	  if(mm != m4)
	    FZ_FAIL("\"%s\": v4-mapped match %d, IPv4 match %d", text, mm, m4);
	}
      else
	{
	  fz_sa6(&ss, in);
	  mm = cidr_match(&c, (struct sockaddr *)&ss);
	  if(in[0] == 0 && in[1] == 0 && in[2] == 0 && in[3] == 0 &&
	     in[4] == 0 && in[5] == 0 && in[6] == 0 && in[7] == 0 &&
	     in[8] == 0 && in[9] == 0 && in[10] == 0xff && in[11] == 0xff)
	    {
	      if(mm != 0)
		FZ_FAIL("\"%s\": v4-mapped source matched an IPv6 rule", text);
	    }
	  else if(mm != fz_prefix_eq(in, c.addr, bits))
	    FZ_FAIL("\"%s\": IPv6 match %d wrong", text, mm);
	}
    }
  free(text);
  return 0;
}
