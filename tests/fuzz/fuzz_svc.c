/*
 * fuzz_svc.c: libFuzzer target for the service helpers of utils.c that
 * read outside input: the JOURNAL_STREAM value parser, the syslog datagram
 * formatter (message and ident are arbitrary text), and the per-site rate
 * limiter driven by an arbitrary sequence of sites and clock steps.
 *
 * Input layout: the whole input, NUL-terminated, is the JOURNAL_STREAM
 * value and the syslog message; byte 0 also picks the output buffer size;
 * then each pair of bytes (site, clock step) is one rate-limiter event.
 * Oracles: journal_stream_match() says 1 only for "dev:ino" of the fd;
 * syslog_format() returns strlen() of what it wrote, below the size, with
 * a "<pri>" prefix; the rate limiter never passes more than `burst`
 * messages of one site in one window and every suppressed message is
 * reported exactly once (by ratelim_check or ratelim_expired).
 */
#include <sys/stat.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "utils.h"

#define FZ_FAIL(...) do {						\
    fprintf(stderr, "fuzz oracle: " __VA_ARGS__);			\
    fprintf(stderr, "\n");						\
    abort();								\
  } while(0)

#define FZ_KEYS 100

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
  static char keys[FZ_KEYS];
  static ratelim_t rl;
  unsigned long in_window[FZ_KEYS + 1], sup, suppressed = 0, reported = 0;
  const ratelim_site_t *s;
  char *text, buf[300], want[64];
  unsigned long long dev, ino;
  struct stat sb;
  size_t i, n, blen, iter;
  time_t now = 1000;
  int pass, k;

  if((text = malloc(size + 1)) == NULL)
    return 0;
  memcpy(text, data, size);
  text[size] = '\0';

  /* JOURNAL_STREAM */
  if(journal_stream_match(text, STDIN_FILENO) == 1)
    {
      if(fstat(STDIN_FILENO, &sb) != 0 ||
	 sscanf(text, "%llu:%llu", &dev, &ino) != 2 ||
	 dev != (unsigned long long)sb.st_dev ||
	 ino != (unsigned long long)sb.st_ino)
	FZ_FAIL("journal_stream_match accepted %s", text);
    }

  /* the syslog datagram */
  blen = size > 0 ? (size_t)data[0] % sizeof(buf) : sizeof(buf);
  n = syslog_format(buf, blen, 29, (time_t)size * 7919, text, 4242, text);
  if(blen == 0)
    {
      if(n != 0)
	FZ_FAIL("syslog_format wrote into a 0-byte buffer");
    }
  else
    {
      if(n >= blen || strlen(buf) != n)
	FZ_FAIL("syslog_format returned %zu for %zu bytes", n, blen);
      snprintf(want, sizeof(want), "<29>");
      if(strncmp(buf, want, n < 4 ? n : 4) != 0)
	FZ_FAIL("syslog_format prefix");
    }

  /* the rate limiter: burst 3 per 4 s */
  ratelim_init(&rl, 3, 4);
  memset(in_window, 0, sizeof(in_window));
  for(i=0; i+1 < size; i+=2)
    {
      k = data[i] % FZ_KEYS;
      now += data[i+1] % 3;
      pass = ratelim_check(&rl, &keys[k], NULL, 0, now, &sup);
      reported += sup;
      if(!pass)
	suppressed++;
      if(data[i+1] == 255)
	{
	  iter = 0;
	  while((s = ratelim_expired(&rl, now, &iter, &sup)) != NULL)
	    reported += sup;
	}
    }
  for(i=0; i<=RATELIM_SITES; i++)
    if(rl.site[i].n > rl.burst)
      FZ_FAIL("site %zu passed %u > burst", i, rl.site[i].n);
  iter = 0;
  while((s = ratelim_expired(&rl, now + 10, &iter, &sup)) != NULL)
    reported += sup;
  if(reported != suppressed)
    FZ_FAIL("suppressed %lu, reported %lu", suppressed, reported);
  free(text);
  (void)in_window;
  return 0;
}
