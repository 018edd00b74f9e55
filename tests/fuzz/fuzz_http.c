/*
 * fuzz_http.c: libFuzzer target for the HTTP request head parser and the
 * JSON string escaper of utils.c (the -O metrics endpoint).
 *
 * The input is the bytes a metrics client sends.  Oracles:
 *  - http_req_parse() on the whole input returns MORE, BAD, TOOBIG or a
 *    head length n <= min(len, max) whose last line is empty; then the
 *    method is a non-empty token, the path starts with '/' and holds no
 *    space or control byte, the minor version is 0 or 1, and parsing just
 *    the n head bytes gives the same answer, while the head minus its
 *    last byte is not complete (MORE, or TOOBIG/BAD never before the end);
 *  - MORE only when no complete head fits; TOOBIG only when len >= max;
 *  - json_escape() of the input writes exactly what it says it needs, a
 *    NUL after it, only printable ASCII, valid escapes and valid UTF-8,
 *    and a truncated escape is a prefix of the full one.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../../utils.h"

#define FZ_FAIL(...) do {						\
    fprintf(stderr, "fuzz oracle: " __VA_ARGS__);			\
    fprintf(stderr, "\n");						\
    abort();								\
  } while(0)

#define FZ_MAX 1024

static void fz_http(const char *d, size_t len)
{
  http_req_t r, r2;
  long n, n2;
  size_t i;

  n = http_req_parse(d, len, FZ_MAX, &r);
  if(n == HTTP_REQ_TOOBIG && len < FZ_MAX)
    FZ_FAIL("TOOBIG with %zu < %d bytes", len, FZ_MAX);
  if(n == HTTP_REQ_MORE && len >= FZ_MAX)
    FZ_FAIL("MORE with %zu >= %d bytes", len, FZ_MAX);
  if(n == HTTP_REQ_MORE || n == HTTP_REQ_BAD || n == HTTP_REQ_TOOBIG)
    return;
  if(n <= 0 || (size_t)n > len || n > FZ_MAX)
    FZ_FAIL("head length %ld of %zu", n, len);
  if(d[n-1] != '\n' || !(n >= 2 && (d[n-2] == '\n' ||
				    (n >= 3 && d[n-2] == '\r' &&
				     d[n-3] == '\n'))))
    FZ_FAIL("head does not end with an empty line");
  if(r.method[0] == '\0' || r.path[0] != '/' || (r.minor != 0 &&
						   r.minor != 1))
    FZ_FAIL("bad fields");
  if(r.keepalive != 0 && r.keepalive != 1)
    FZ_FAIL("keepalive %d", r.keepalive);
  for(i = 0; r.path[i] != '\0'; i++)
    if((unsigned char)r.path[i] <= 0x20 || (unsigned char)r.path[i] >= 0x7f)
      FZ_FAIL("path byte %02x", (unsigned char)r.path[i]);
  n2 = http_req_parse(d, (size_t)n, FZ_MAX, &r2);
  if(n2 != n || memcmp(&r, &r2, sizeof(r)) != 0)
    FZ_FAIL("head alone parses differently: %ld vs %ld", n2, n);
  n2 = http_req_parse(d, (size_t)n - 1, FZ_MAX, &r2);
  if(n2 != HTTP_REQ_MORE)
    FZ_FAIL("head minus one byte: %ld", n2);
  return;
}

static void fz_json(const uint8_t *d, size_t len)
{
  size_t need, i, k, cut;
  char *out, *part;

  need = json_escape(NULL, 0, d, len);
  if(need > 6 * len)
    FZ_FAIL("needs %zu for %zu bytes", need, len);
  if((out = malloc(need + 1)) == NULL)
    return;
  memset(out, 'X', need + 1);
  if(json_escape(out, need + 1, d, len) != need || out[need] != '\0' ||
     strlen(out) != need)
    FZ_FAIL("length mismatch");
  for(i = 0; i < need; i++)
    {
      unsigned char c = (unsigned char)out[i];
      if(c < 0x20 || c == 0x7f || c == '"')
	FZ_FAIL("raw byte %02x at %zu", c, i);
      if(c == '\\')
	{
	  char e = out[++i];
	  if(e == 'u')
	    {
	      for(k = 1; k <= 4; k++)
		if(strchr("0123456789abcdef", out[i+k]) == NULL ||
		   out[i+k] == '\0')
		  FZ_FAIL("bad \\u escape");
	      i += 4;
	    }
	  else if(strchr("\"\\nrtbf", e) == NULL || e == '\0')
	    FZ_FAIL("bad escape \\%c", e);
	}
      else if(c >= 0x80)
	{
	  size_t sl = c >= 0xf0 ? 4 : c >= 0xe0 ? 3 : 2;
	  for(k = 1; k < sl; k++)
	    if(((unsigned char)out[i+k] & 0xc0) != 0x80)
	      FZ_FAIL("bad UTF-8 at %zu", i);
	  i += sl - 1;
	}
    }
  cut = len > 0 ? (size_t)d[0] % (need + 1) : 0;
  if((part = malloc(cut + 1)) != NULL)
    {
      if(json_escape(part, cut + 1, d, len) != need ||
	 strncmp(part, out, strlen(part)) != 0 || strlen(part) > cut)
	FZ_FAIL("truncated escape is not a prefix");
      free(part);
    }
  free(out);
  return;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
  fz_http((const char *)data, size);
  fz_json(data, size);
  return 0;
}
