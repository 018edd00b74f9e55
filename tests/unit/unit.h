/*
 * unit.h: a minimal check harness for the C unit tests.
 *
 * Usage:
 *
 *   static void test_something(void) { CHECK(1 + 1 == 2); }
 *   int main(void) { UNIT_RUN(test_something); return unit_exit(); }
 *
 * CHECK records a failure (printing the expression and location) and
 * carries on; UNIT_RUN prints one "PASS: name" or "FAIL: name" line per
 * check group; unit_exit prints a summary and returns the exit status
 * (0 when every check passed, 1 otherwise) for main to return.
 */
#ifndef UNIT_H
#define UNIT_H

#include <stdint.h>
#include <stdio.h>

static int unit_failed_checks = 0;   /* failed CHECKs in the whole run */
static int unit_failed_groups = 0;   /* groups with at least one failure */
static int unit_groups = 0;          /* groups run */

/* record one check; prints the failing expression, returns ok */
static inline int unit_check(int ok, const char *expr, const char *file,
			     int line)
{
  if(!ok)
    {
      printf("  check failed: %s (%s:%d)\n", expr, file, line);
      fflush(stdout);
      unit_failed_checks++;
    }
  return ok;
}

#define CHECK(cond) unit_check((cond) ? 1 : 0, #cond, __FILE__, __LINE__)

/* run fn as a named check group and print its verdict */
static inline void unit_run(void (*fn)(void), const char *name)
{
  int before = unit_failed_checks;

  fn();
  unit_groups++;
  if(unit_failed_checks != before)
    {
      unit_failed_groups++;
      printf("FAIL: %s (%d failed checks)\n", name,
	     unit_failed_checks - before);
    }
  else
    printf("PASS: %s\n", name);
  fflush(stdout);
}

#define UNIT_RUN(fn) unit_run(fn, #fn)

/* print a summary line; the process exit status for main to return */
static inline int unit_exit(void)
{
  printf("%d groups, %d failed groups, %d failed checks\n",
	 unit_groups, unit_failed_groups, unit_failed_checks);
  return unit_failed_checks == 0 ? 0 : 1;
}

/* deterministic xorshift32 PRNG; seed must be non-zero */
static inline uint32_t unit_rand(uint32_t *state)
{
  uint32_t x = *state;

  x ^= x << 13;
  x ^= x >> 17;
  x ^= x << 5;
  *state = x;
  return x;
}

#endif /* UNIT_H */
