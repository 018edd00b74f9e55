/*
 * test_utils.c: unit tests for utils.c.
 */
#ifdef HAVE_CONFIG_H
#include "config.h"
#endif

#include <sys/types.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/un.h>
#include <netinet/in.h>
#include <arpa/inet.h>

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "utils.h"
#include "unit.h"

static void test_bytes(void)
{
  static const uint16_t v16[] = {0, 1, 0x1234, 0x8000, 0xffff};
  static const uint32_t v32[] = {0, 1, 0x12345678, 0x80000000, 0xffffffff,
				 0xdeadbeef};
  uint8_t b[4];
  size_t i;

  bytes_htons(b, 0x1234);
  CHECK(b[0] == 0x12 && b[1] == 0x34);
  bytes_htonl(b, 0xdeadbeef);
  CHECK(b[0] == 0xde && b[1] == 0xad && b[2] == 0xbe && b[3] == 0xef);

  for(i = 0; i < sizeof(v16) / sizeof(v16[0]); i++)
    {
      bytes_htons(b, v16[i]);
      CHECK(bytes_ntohs(b) == v16[i]);
    }
  for(i = 0; i < sizeof(v32) / sizeof(v32[0]); i++)
    {
      bytes_htonl(b, v32[i]);
      CHECK(bytes_ntohl(b) == v32[i]);
    }

  b[0] = 0x00; b[1] = 0x00; b[2] = 0x7a; b[3] = 0x69;
  CHECK(bytes_ntohl(b) == 31337);
  CHECK(bytes_ntohs(b + 2) == 31337);
}

static void test_serial_cmp(void)
{
  CHECK(serial_cmp(5, 5) == 0);
  CHECK(serial_cmp(0, 0) == 0);
  CHECK(serial_cmp(0xffffffffU, 0xffffffffU) == 0);
  CHECK(serial_cmp(1, 0) > 0);
  CHECK(serial_cmp(0, 1) < 0);
  /* wrap: 0 comes after 0xffffffff */
  CHECK(serial_cmp(0, 0xffffffffU) > 0);
  CHECK(serial_cmp(0xffffffffU, 0) < 0);
  CHECK(serial_cmp(0x10, 0xfffffff0U) > 0);
  CHECK(serial_cmp(0xfffffff0U, 0x10) < 0);
  /* the largest forward distance */
  CHECK(serial_cmp(0x7fffffffU, 0) > 0);
  CHECK(serial_cmp(0, 0x7fffffffU) < 0);
  CHECK(serial_cmp(0x80000005U, 6) > 0);
  /* exactly 2^31 apart: (int32)(a-b) is INT32_MIN either way */
  CHECK(serial_cmp(0x80000000U, 0) < 0);
  CHECK(serial_cmp(0, 0x80000000U) < 0);
  CHECK(serial_cmp(0x80000001U, 0) < 0);
}

static void test_string_tolong(void)
{
  char buf[64];
  long v;

  v = -1; CHECK(string_tolong("0x10", &v) == 0 && v == 16);
  v = -1; CHECK(string_tolong("0X1f", &v) == 0 && v == 31);
  v = -1; CHECK(string_tolong("010", &v) == 0 && v == 8);
  v = -1; CHECK(string_tolong("08", &v) == 0 && v == 0); /* '8' is junk */
  v = -1; CHECK(string_tolong("12junk", &v) == 0 && v == 12);
  v = -1; CHECK(string_tolong("31337", &v) == 0 && v == 31337);
  v = -1; CHECK(string_tolong("0", &v) == 0 && v == 0);
  v = 0;  CHECK(string_tolong("  -42", &v) == 0 && v == -42);
  v = 0;  CHECK(string_tolong("+7", &v) == 0 && v == 7);
  v = 0;  CHECK(string_tolong("65535:x", &v) == 0 && v == 65535);

  v = 99; CHECK(string_tolong("abc", &v) == -1 && v == 99);
  v = 99; CHECK(string_tolong("", &v) == -1 && v == 99);
  v = 99; CHECK(string_tolong("   ", &v) == -1 && v == 99);
  v = 99; CHECK(string_tolong("-", &v) == -1 && v == 99);
  v = 99; CHECK(string_tolong(NULL, &v) == -1 && v == 99);

  /* overflow either way */
  v = 99;
  CHECK(string_tolong("99999999999999999999999999", &v) == -1 && v == 99);
  CHECK(string_tolong("-99999999999999999999999999", &v) == -1 && v == 99);
  CHECK(string_tolong("0x1ffffffffffffffffffffffff", &v) == -1);

  /* the extremes themselves are fine */
  snprintf(buf, sizeof(buf), "%ld", LONG_MAX);
  CHECK(string_tolong(buf, &v) == 0 && v == LONG_MAX);
  snprintf(buf, sizeof(buf), "%ld", LONG_MIN);
  CHECK(string_tolong(buf, &v) == 0 && v == LONG_MIN);

  /* a stale errno must not leak into the result */
  errno = ERANGE;
  CHECK(string_tolong("5", &v) == 0 && v == 5);
}

static void test_string_isdigits(void)
{
  CHECK(string_isdigits("0") == 1);
  CHECK(string_isdigits("31337") == 1);
  CHECK(string_isdigits("") == 0);
  CHECK(string_isdigits(NULL) == 0);
  CHECK(string_isdigits("12a") == 0);
  CHECK(string_isdigits("-1") == 0);
  CHECK(string_isdigits(" 1") == 0);
  CHECK(string_isdigits("1 ") == 0);
  CHECK(string_isdigits("0x10") == 0);
  CHECK(string_isdigits("1.2.3.4:80") == 0);
}

static void test_ascii_strncasecmp(void)
{
  CHECK(ascii_strncasecmp("DEBUG", "debug", 5) == 0);
  CHECK(ascii_strncasecmp("SkipNameVerification",
			  "skipnameverification", 100) == 0);
  CHECK(ascii_strncasecmp("abc", "abd", 3) < 0);
  CHECK(ascii_strncasecmp("abd", "ABC", 3) > 0);
  CHECK(ascii_strncasecmp("abc", "abd", 2) == 0);
  CHECK(ascii_strncasecmp("abc", "ab", 3) > 0);
  CHECK(ascii_strncasecmp("ab", "abc", 3) < 0);
  CHECK(ascii_strncasecmp("x", "y", 0) == 0);
  CHECK(ascii_strncasecmp("", "", 10) == 0);
  /* stops at the NUL: bytes after it are not compared */
  CHECK(ascii_strncasecmp("Hi\0X", "HI\0Y", 4) == 0);
  /* only ASCII letters fold: '@' (0x40) and '`' (0x60) differ */
  CHECK(ascii_strncasecmp("@", "`", 1) != 0);
  CHECK(ascii_strncasecmp("[", "{", 1) != 0);
  /* high bytes compare as unsigned */
  CHECK(ascii_strncasecmp("\xe9", "a", 1) > 0);
}

static void test_fd_flags(void)
{
  int p[2], flags;

  if(!CHECK(pipe(p) == 0))
    return;
  CHECK((fcntl(p[0], F_GETFL) & O_NONBLOCK) == 0);
  CHECK(fd_nonblock(p[0]) == 0);
  CHECK((flags = fcntl(p[0], F_GETFL)) != -1 && (flags & O_NONBLOCK));
  CHECK(fd_nonblock(p[0]) == 0); /* idempotent */
  CHECK(read(p[0], &flags, 1) == -1 && errno == EAGAIN);

  CHECK((fcntl(p[1], F_GETFD) & FD_CLOEXEC) == 0);
  CHECK(fd_cloexec(p[1]) == 0);
  CHECK((flags = fcntl(p[1], F_GETFD)) != -1 && (flags & FD_CLOEXEC));
  CHECK(fd_cloexec(p[1]) == 0);

  close(p[0]);
  close(p[1]);
  /* closed descriptors fail with EBADF */
  errno = 0;
  CHECK(fd_nonblock(p[0]) == -1 && errno == EBADF);
  errno = 0;
  CHECK(fd_cloexec(p[1]) == -1 && errno == EBADF);
}

static void test_time(void)
{
  struct timeval a, b;

  time_wall(&a);
  CHECK(a.tv_sec > 1500000000);      /* after 2017 */
  CHECK(a.tv_usec >= 0 && a.tv_usec < 1000000);
  time_mono(&a);
  time_mono(&b);
  CHECK(b.tv_usec >= 0 && b.tv_usec < 1000000);
  CHECK(timeval_diff_ms(&b, &a) >= 0);

  a.tv_sec = 5; a.tv_usec = 500000;
  b.tv_sec = 3; b.tv_usec = 0;
  CHECK(timeval_diff_ms(&a, &b) == 2500);
  CHECK(timeval_diff_ms(&b, &a) == -2500);
  CHECK(timeval_diff_ms(&a, &a) == 0);

  a.tv_sec = 2; a.tv_usec = 1000;
  b.tv_sec = 1; b.tv_usec = 999000;
  CHECK(timeval_diff_ms(&a, &b) == 2);
  CHECK(timeval_diff_ms(&b, &a) == -2);

  /* sub-millisecond differences truncate toward zero both ways */
  a.tv_sec = 2; a.tv_usec = 0;
  b.tv_sec = 1; b.tv_usec = 999999;
  CHECK(timeval_diff_ms(&a, &b) == 0);
  CHECK(timeval_diff_ms(&b, &a) == 0);

  /* large spans do not overflow */
  a.tv_sec = 2000000000; a.tv_usec = 0;
  b.tv_sec = 0; b.tv_usec = 0;
  CHECK(timeval_diff_ms(&a, &b) == INT64_C(2000000000000));
}

/* parse addr:port, check family and length, then print it back */
static int addr_roundtrip(const char *addr, int port, int af,
			  const char *want)
{
  struct sockaddr_storage ss;
  socklen_t sl = 0;
  char buf[64];
  const char *s;

  if(sockaddr_fromstr(addr, port, &ss, &sl) != af || ss.ss_family != af)
    return 0;
  if(af == AF_INET && sl != sizeof(struct sockaddr_in))
    return 0;
  if(af == AF_INET6 && sl != sizeof(struct sockaddr_in6))
    return 0;
  if(sockaddr_port((struct sockaddr *)&ss) != port)
    return 0;
  s = sockaddr_tostr((struct sockaddr *)&ss, buf, sizeof(buf));
  return s == buf && strcmp(buf, want) == 0;
}

static void test_sockaddr_v4(void)
{
  struct sockaddr_storage ss;
  char buf[16];

  CHECK(addr_roundtrip("192.0.2.1", 31337, AF_INET, "192.0.2.1"));
  CHECK(addr_roundtrip("127.0.0.1", 1, AF_INET, "127.0.0.1"));
  CHECK(addr_roundtrip("0.0.0.0", 65535, AF_INET, "0.0.0.0"));
  CHECK(addr_roundtrip("255.255.255.255", 0, AF_INET, "255.255.255.255"));

  /* the buffer must hold the text and its NUL */
  CHECK(sockaddr_fromstr("192.0.2.1", 80, &ss, NULL) == AF_INET);
  CHECK(sockaddr_tostr((struct sockaddr *)&ss, buf, 10) == buf);
  CHECK(strcmp(buf, "192.0.2.1") == 0);
  CHECK(sockaddr_tostr((struct sockaddr *)&ss, buf, 9) == NULL);
  CHECK(sockaddr_tostr((struct sockaddr *)&ss, buf, 0) == NULL);

  CHECK(sockaddr_fromstr("192.0.2.256", 80, &ss, NULL) == -1);
  CHECK(sockaddr_fromstr("1.2.3", 80, &ss, NULL) == -1);
  CHECK(sockaddr_fromstr("localhost", 80, &ss, NULL) == -1);
  CHECK(sockaddr_fromstr("host.example", 80, &ss, NULL) == -1);
  CHECK(sockaddr_fromstr("", 80, &ss, NULL) == -1);
  CHECK(sockaddr_fromstr(" 192.0.2.1", 80, &ss, NULL) == -1);
  CHECK(sockaddr_fromstr("192.0.2.1:80", 80, &ss, NULL) == -1);
  CHECK(sockaddr_fromstr(NULL, 80, &ss, NULL) == -1);
  CHECK(sockaddr_fromstr("192.0.2.1", -1, &ss, NULL) == -1);
  CHECK(sockaddr_fromstr("192.0.2.1", 65536, &ss, NULL) == -1);
}

static void test_sockaddr_v6(void)
{
  struct sockaddr_storage ss;
  socklen_t sl;
  char buf[INET6_ADDRSTRLEN];

  CHECK(addr_roundtrip("2001:db8::1", 31337, AF_INET6, "2001:db8::1"));
  CHECK(addr_roundtrip("::1", 443, AF_INET6, "::1"));
  CHECK(addr_roundtrip("::", 65535, AF_INET6, "::"));
  CHECK(addr_roundtrip("2001:DB8:0:0:0:0:0:2", 1, AF_INET6, "2001:db8::2"));
  CHECK(addr_roundtrip("::ffff:192.0.2.1", 80, AF_INET6,
		       "::ffff:192.0.2.1"));

  CHECK(sockaddr_fromstr("[::1]", 80, &ss, &sl) == -1);
  CHECK(sockaddr_fromstr("2001:db8::1::2", 80, &ss, &sl) == -1);
  CHECK(sockaddr_fromstr("2001:db8::g", 80, &ss, &sl) == -1);
  CHECK(sockaddr_fromstr(":", 80, &ss, &sl) == -1);
  CHECK(sockaddr_fromstr("::1", 70000, &ss, &sl) == -1);

  CHECK(sockaddr_fromstr("2001:db8::1", 80, &ss, NULL) == AF_INET6);
  CHECK(sockaddr_tostr((struct sockaddr *)&ss, buf, 12) == buf);
  CHECK(sockaddr_tostr((struct sockaddr *)&ss, buf, 11) == NULL);
}

static void test_sockaddr_other(void)
{
  struct sockaddr_un su;
  char buf[64];

  memset(&su, 0, sizeof(su));
  su.sun_family = AF_UNIX;
  CHECK(sockaddr_tostr((struct sockaddr *)&su, buf, sizeof(buf)) == NULL);
  CHECK(sockaddr_port((struct sockaddr *)&su) == -1);
}

/* write len bytes to a fresh temp file; its path goes in path[] */
static int temp_file(char *path, size_t pathlen, const char *data,
		     size_t len)
{
  const char *dir = getenv("TMPDIR");
  int fd;

  if(dir == NULL || *dir == '\0')
    dir = "/tmp";
  snprintf(path, pathlen, "%s/test_utils.XXXXXX", dir);
  if((fd = mkstemp(path)) == -1)
    return -1;
  if(len > 0 && write(fd, data, len) != (ssize_t)len)
    {
      close(fd);
      unlink(path);
      return -1;
    }
  close(fd);
  return 0;
}

static void test_file_read_all(void)
{
  enum { BIG = 100000 };
  char path[512], *data, *buf = NULL;
  size_t len = 0, i;
  int ok;

  if(!CHECK((data = malloc(BIG)) != NULL))
    return;
  for(i = 0; i < BIG; i++)
    data[i] = (char)(i * 7 + 3);   /* includes NUL bytes */

  /* a file larger than any initial buffer, with embedded NULs */
  if(CHECK(temp_file(path, sizeof(path), data, BIG) == 0))
    {
      CHECK(file_read_all(path, &buf, &len) == 0);
      CHECK(len == BIG);
      CHECK(buf != NULL && memcmp(buf, data, BIG) == 0 && buf[BIG] == '\0');
      free(buf); buf = NULL;
      unlink(path);
    }

  /* a short text file */
  if(CHECK(temp_file(path, sizeof(path), "vp1 key=value\n", 14) == 0))
    {
      CHECK(file_read_all(path, &buf, &len) == 0);
      CHECK(len == 14 && buf != NULL && strcmp(buf, "vp1 key=value\n") == 0);
      free(buf); buf = NULL;
      unlink(path);
    }

  /* an empty file: a valid empty string */
  if(CHECK(temp_file(path, sizeof(path), NULL, 0) == 0))
    {
      len = 99;
      CHECK(file_read_all(path, &buf, &len) == 0);
      CHECK(len == 0 && buf != NULL && buf[0] == '\0');
      free(buf); buf = NULL;
      unlink(path);
    }

  /* missing file: -1, ENOENT, outputs untouched */
  len = 99;
  errno = 0;
  ok = file_read_all("/nonexistent/dir/test_utils.missing", &buf, &len);
  CHECK(ok == -1 && errno == ENOENT);
  CHECK(buf == NULL && len == 99);

  /* a directory cannot be read as a file */
  errno = 0;
  CHECK(file_read_all("/", &buf, &len) == -1 && errno != 0);
  CHECK(buf == NULL);

  /* a file whose stat size is 0 but has content (Linux /proc) */
  if(access("/proc/self/status", R_OK) == 0)
    {
      CHECK(file_read_all("/proc/self/status", &buf, &len) == 0);
      CHECK(len > 0 && buf != NULL && strlen(buf) == len);
      free(buf); buf = NULL;
    }
  free(data);
}

/* ---- syslog datagrams ---- */

static void test_syslog_format(void)
{
  char buf[128], want[128];
  struct tm tm;
  time_t t = 86400 * 365;
  size_t n;

  localtime_r(&t, &tm);
  snprintf(want, sizeof(want), "<29>Jan %2d %02d:%02d:%02d id[42]: hello",
	   tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec);
  if(tm.tm_mon == 0)
    {
      n = syslog_format(buf, sizeof(buf), 29, t, "id", 42, "hello");
      CHECK(strcmp(buf, want) == 0);
      CHECK(n == strlen(want));
    }
  /* truncation keeps a terminated prefix and reports its length */
  n = syslog_format(buf, 8, 29, t, "id", 42, "hello");
  CHECK(n == 7 && strlen(buf) == 7 && memcmp(buf, "<29>", 4) == 0);
  CHECK(syslog_format(buf, 0, 29, t, "id", 42, "x") == 0);
}

/* a bound unix datagram socket at a fresh temporary path */
static int dgram_bind(char *path, size_t len)
{
  struct sockaddr_un sun;
  int fd;
  snprintf(path, len, "/tmp/test_utils.%ld.sock", (long)getpid());
  unlink(path);
  if((fd = socket(AF_UNIX, SOCK_DGRAM, 0)) < 0)
    return -1;
  memset(&sun, 0, sizeof(sun));
  sun.sun_family = AF_UNIX;
  snprintf(sun.sun_path, sizeof(sun.sun_path), "%s", path);
  if(bind(fd, (struct sockaddr *)&sun, sizeof(sun)) != 0)
    {
      close(fd);
      return -1;
    }
  return fd;
}

static void test_logsock(void)
{
  char path[108], buf[64];
  logsock_t ls;
  ssize_t n;
  int rx, i, sent = 0;

  logsock_init(&ls, "/nonexistent/dev/log");
  CHECK(logsock_connect(&ls, 100) == -1 && ls.err == ENOENT);
  CHECK(logsock_send(&ls, "x", 1, 100) == -1 && ls.dropped == 1);
  logsock_close(&ls);

  if((rx = dgram_bind(path, sizeof(path))) < 0)
    return;
  logsock_init(&ls, path);
  CHECK(logsock_send(&ls, "<30>hi", 6, 10) == 0 && ls.dropped == 0);
  n = recv(rx, buf, sizeof(buf), 0);
  CHECK(n == 6 && memcmp(buf, "<30>hi", 6) == 0);

  /* a full receiver: sends are dropped and counted, never block */
  for(i=0; i<100000 && ls.dropped == 0; i++)
    if(logsock_send(&ls, "<30>flood", 9, 10) == 0)
      sent++;
  CHECK(ls.dropped > 0 && sent > 0);

  /* the receiver goes away and comes back: reconnect, at most 1/s */
  close(rx);
  unlink(path);
  CHECK(logsock_send(&ls, "a", 1, 10) == -1);
  CHECK(ls.fd == -1);
  if((rx = dgram_bind(path, sizeof(path))) < 0)
    return;
  CHECK(logsock_send(&ls, "b", 1, 10) == -1);     /* too soon */
  CHECK(logsock_send(&ls, "c", 1, 11) == 0);      /* a second later */
  n = recv(rx, buf, sizeof(buf), 0);
  CHECK(n == 1 && buf[0] == 'c');
  logsock_close(&ls);
  close(rx);
  unlink(path);
}

/* ---- service manager ---- */

static void test_sdnotify(void)
{
  char path[108], buf[64], longp[200];
  ssize_t n;
  int rx, fd;

  errno = 0;
  CHECK(sdnotify_open(NULL) == -1 && errno == EINVAL);
  CHECK(sdnotify_open("") == -1 && errno == EINVAL);
  CHECK(sdnotify_open("vsock:2:123") == -1 && errno == EAFNOSUPPORT);
  CHECK(sdnotify_open("/nonexistent/notify") == -1 && errno == ENOENT);
  memset(longp, 'a', sizeof(longp));
  longp[0] = '/';
  longp[sizeof(longp) - 1] = '\0';
  CHECK(sdnotify_open(longp) == -1 && errno == EINVAL);
  /* a regular file is not a socket */
  CHECK(sdnotify_open("/etc/passwd") == -1 && errno == ECONNREFUSED);
  CHECK(sdnotify_send(-1, "READY=1") == -1);

  if((rx = dgram_bind(path, sizeof(path))) < 0)
    return;
  CHECK((fd = sdnotify_open(path)) >= 0);
  CHECK(sdnotify_send(fd, "READY=1") == 0);
  n = recv(rx, buf, sizeof(buf), 0);
  CHECK(n == 7 && memcmp(buf, "READY=1", 7) == 0);
  close(fd);
  close(rx);
  unlink(path);

#ifdef __linux__
  {
    struct sockaddr_un sun;
    socklen_t sl;
    char name[64];
    snprintf(name, sizeof(name), "@test_utils.%ld", (long)getpid());
    memset(&sun, 0, sizeof(sun));
    sun.sun_family = AF_UNIX;
    memcpy(sun.sun_path + 1, name + 1, strlen(name) - 1);
    sl = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + strlen(name));
    if((rx = socket(AF_UNIX, SOCK_DGRAM, 0)) >= 0 &&
       bind(rx, (struct sockaddr *)&sun, sl) == 0)
      {
	CHECK((fd = sdnotify_open(name)) >= 0);
	CHECK(sdnotify_send(fd, "STOPPING=1") == 0);
	n = recv(rx, buf, sizeof(buf), 0);
	CHECK(n == 10 && memcmp(buf, "STOPPING=1", 10) == 0);
	close(fd);
      }
    if(rx >= 0)
      close(rx);
  }
#endif
}

static void test_journal_stream(void)
{
  struct stat sb;
  char env[64];
  int fd = open("/dev/null", O_RDONLY);

  CHECK(fd >= 0 && fstat(fd, &sb) == 0);
  snprintf(env, sizeof(env), "%llu:%llu", (unsigned long long)sb.st_dev,
	   (unsigned long long)sb.st_ino);
  CHECK(journal_stream_match(env, fd) == 1);
  snprintf(env, sizeof(env), "%llu:%llu", (unsigned long long)sb.st_dev,
	   (unsigned long long)sb.st_ino + 1);
  CHECK(journal_stream_match(env, fd) == 0);
  CHECK(journal_stream_match(NULL, fd) == 0);
  CHECK(journal_stream_match("", fd) == 0);
  CHECK(journal_stream_match("12", fd) == 0);
  CHECK(journal_stream_match("1:2x", fd) == 0);
  CHECK(journal_stream_match(env, -1) == 0);
  close(fd);
}

/* ---- rate limiting ---- */

static void test_ratelim(void)
{
  static const char a[] = "a", b[] = "b";
  static char keys[200];
  const ratelim_site_t *s;
  ratelim_t rl;
  unsigned long sup;
  size_t iter;
  int i, passed = 0;

  ratelim_init(&rl, 3, 5);
  for(i=0; i<10; i++)
    passed += ratelim_check(&rl, a, "fa", 4, 100, &sup);
  CHECK(passed == 3);
  /* another site is independent */
  CHECK(ratelim_check(&rl, b, "fb", 5, 100, &sup) == 1 && sup == 0);
  /* nothing to report before the interval ends */
  iter = 0;
  CHECK(ratelim_expired(&rl, 104, &iter, &sup) == NULL);
  /* the next message after the interval carries the count */
  CHECK(ratelim_check(&rl, a, "fa", 4, 105, &sup) == 1 && sup == 7);
  CHECK(ratelim_check(&rl, a, "fa", 4, 105, &sup) == 1 && sup == 0);

  /* or the tick reports it when the site stays quiet */
  for(i=0; i<5; i++)
    ratelim_check(&rl, a, "fa", 4, 106, &sup);
  iter = 0;
  s = ratelim_expired(&rl, 110, &iter, &sup);
  CHECK(s != NULL && s->key == a && sup == 4 && s->level == 4 &&
	strcmp((const char *)s->tag, "fa") == 0);
  CHECK(ratelim_expired(&rl, 110, &iter, &sup) == NULL);
  iter = 0;
  CHECK(ratelim_expired(&rl, 200, &iter, &sup) == NULL);

  /* more sites than slots: bounded, the rest share the overflow slot */
  ratelim_init(&rl, 1, 5);
  passed = 0;
  for(i=0; i<200; i++)
    passed += ratelim_check(&rl, &keys[i], "f", 4, 300, &sup);
  CHECK(passed >= RATELIM_SITES && passed <= RATELIM_SITES + 1);
  /* quiet sites are reused after their interval */
  passed = 0;
  for(i=0; i<200; i++)
    passed += ratelim_check(&rl, &keys[i], "f", 4, 400, &sup);
  CHECK(passed >= RATELIM_SITES - 1);
}

/* a sockaddr for a literal address, for the CIDR tests */
static const struct sockaddr *sa_of(const char *addr,
				    struct sockaddr_storage *ss)
{
  if(sockaddr_fromstr(addr, 1, ss, NULL) < 0)
    memset(ss, 0, sizeof(*ss));
  return (const struct sockaddr *)ss;
}

static void test_cidr_parse(void)
{
  static const char *bad[] = {
    "", "/", "/24", "10.0.0.0/", "10.0.0.0/33", "10.0.0.0/-1",
    "10.0.0.0/+8", "10.0.0.0/ 8", "10.0.0.0/8/8", "10.0.0.0/0008",
    "10.0.0", "10.0.0.256", "host.example", "::1/129", "::1/", "[::1]",
    "[::1]/128", "10.0.0.0 /8", " 10.0.0.1", "1::2::3", "10.0.0.0/8x",
    "fe80::1%lo", "0123456789012345678901234567890123456789012345678901",
  };
  cidr_t c;
  size_t i;

  for(i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
    if(!CHECK(cidr_parse(bad[i], &c) == -1))
      printf("  accepted: \"%s\"\n", bad[i]);
  CHECK(cidr_parse(NULL, &c) == -1);

  CHECK(cidr_parse("192.0.2.7", &c) == 0);
  CHECK(c.family == AF_INET && c.bits == 32);
  CHECK(c.addr[0] == 192 && c.addr[3] == 7);
  CHECK(cidr_parse("10.1.2.3/8", &c) == 0);  /* host bits cleared */
  CHECK(c.bits == 8 && c.addr[0] == 10 && c.addr[1] == 0 && c.addr[3] == 0);
  CHECK(cidr_parse("0.0.0.0/0", &c) == 0 && c.bits == 0);
  CHECK(cidr_parse("10.0.0.0/08", &c) == 0 && c.bits == 8);
  CHECK(cidr_parse("2001:db8::1", &c) == 0);
  CHECK(c.family == AF_INET6 && c.bits == 128 && c.addr[15] == 1);
  CHECK(cidr_parse("2001:db8:ffff::/33", &c) == 0);
  CHECK(c.bits == 33 && c.addr[4] == 0x80 && c.addr[5] == 0);
  CHECK(cidr_parse("::/0", &c) == 0 && c.bits == 0);
  CHECK(cidr_parse("::ffff:10.0.0.1/128", &c) == 0 && c.family == AF_INET);
  CHECK(c.bits == 32 && c.addr[0] == 10 && c.addr[3] == 1);
  CHECK(cidr_parse("::ffff:10.0.0.0/104", &c) == 0 && c.family == AF_INET);
  CHECK(c.bits == 8 && c.addr[0] == 10 && c.addr[4] == 0);
  CHECK(cidr_parse("::ffff:0:0/95", &c) == 0 && c.family == AF_INET6);
}

static void test_cidr_match(void)
{
  struct sockaddr_storage ss;
  cidr_t c;

  CHECK(cidr_parse("127.0.0.2", &c) == 0);
  CHECK(cidr_match(&c, sa_of("127.0.0.2", &ss)) == 1);
  CHECK(cidr_match(&c, sa_of("127.0.0.3", &ss)) == 0);
  /* a v4-mapped source of a dual-stack socket matches IPv4 rules */
  CHECK(cidr_match(&c, sa_of("::ffff:127.0.0.2", &ss)) == 1);
  CHECK(cidr_match(&c, sa_of("::ffff:127.0.0.3", &ss)) == 0);
  CHECK(cidr_match(&c, sa_of("::1", &ss)) == 0);

  CHECK(cidr_parse("10.20.0.0/14", &c) == 0);
  CHECK(cidr_match(&c, sa_of("10.23.255.255", &ss)) == 1);
  CHECK(cidr_match(&c, sa_of("10.24.0.0", &ss)) == 0);
  CHECK(cidr_match(&c, sa_of("10.19.255.255", &ss)) == 0);
  CHECK(cidr_parse("0.0.0.0/0", &c) == 0);
  CHECK(cidr_match(&c, sa_of("203.0.113.9", &ss)) == 1);
  CHECK(cidr_match(&c, sa_of("2001:db8::9", &ss)) == 0);

  CHECK(cidr_parse("2001:db8:0:1::/64", &c) == 0);
  CHECK(cidr_match(&c, sa_of("2001:db8:0:1:ffff::1", &ss)) == 1);
  CHECK(cidr_match(&c, sa_of("2001:db8:0:2::1", &ss)) == 0);
  CHECK(cidr_match(&c, sa_of("10.0.0.1", &ss)) == 0);
  CHECK(cidr_parse("::1", &c) == 0);
  CHECK(cidr_match(&c, sa_of("::1", &ss)) == 1);
  CHECK(cidr_match(&c, sa_of("::2", &ss)) == 0);
  CHECK(cidr_parse("::/0", &c) == 0);
  CHECK(cidr_match(&c, sa_of("::ffff:10.0.0.1", &ss)) == 0);
  CHECK(cidr_match(NULL, sa_of("::1", &ss)) == 0);
  memset(&ss, 0, sizeof(ss));
  ss.ss_family = AF_UNIX;
  CHECK(cidr_match(&c, (struct sockaddr *)&ss) == 0);
}

static void test_cidr_source(void)
{
  struct sockaddr_storage ss;
  cidr_t a, b;

  /* IPv6 sources count per /64, IPv4 (and mapped) per address */
  CHECK(cidr_of_sockaddr(sa_of("2001:db8:1:2:3::4", &ss), 64, &a) == 0);
  CHECK(cidr_of_sockaddr(sa_of("2001:db8:1:2:ffff::9", &ss), 64, &b) == 0);
  CHECK(cidr_cmp(&a, &b) == 0 && a.bits == 64);
  CHECK(cidr_of_sockaddr(sa_of("2001:db8:1:3::4", &ss), 64, &b) == 0);
  CHECK(cidr_cmp(&a, &b) != 0);
  CHECK(cidr_of_sockaddr(sa_of("127.0.0.2", &ss), 64, &a) == 0);
  CHECK(cidr_of_sockaddr(sa_of("::ffff:127.0.0.2", &ss), 64, &b) == 0);
  CHECK(cidr_cmp(&a, &b) == 0 && a.family == AF_INET && a.bits == 32);
  CHECK(cidr_of_sockaddr(sa_of("127.0.0.3", &ss), 64, &b) == 0);
  CHECK(cidr_cmp(&a, &b) < 0 && cidr_cmp(&b, &a) > 0);
  CHECK(cidr_of_sockaddr(sa_of("127.0.0.3", &ss), 129, &b) == -1);

  CHECK(sockaddr_is_loopback(sa_of("127.0.0.1", &ss)) == 1);
  CHECK(sockaddr_is_loopback(sa_of("127.255.0.9", &ss)) == 1);
  CHECK(sockaddr_is_loopback(sa_of("::1", &ss)) == 1);
  CHECK(sockaddr_is_loopback(sa_of("::ffff:127.0.0.1", &ss)) == 1);
  CHECK(sockaddr_is_loopback(sa_of("0.0.0.0", &ss)) == 0);
  CHECK(sockaddr_is_loopback(sa_of("::", &ss)) == 0);
  CHECK(sockaddr_is_loopback(sa_of("10.0.0.1", &ss)) == 0);
  CHECK(sockaddr_is_loopback(sa_of("128.0.0.1", &ss)) == 0);
}

static long hp(const char *s, size_t max, http_req_t *r)
{
  return http_req_parse(s, strlen(s), max, r);
}

static void test_http_req(void)
{
  http_req_t r;
  const char *a = "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n";
  char big[300];
  size_t i;

  CHECK(hp(a, 8192, &r) == (long)strlen(a));
  CHECK(strcmp(r.method, "GET") == 0 && strcmp(r.path, "/metrics") == 0);
  CHECK(r.minor == 1 && r.keepalive == 1);
  /* every proper prefix needs more */
  for(i = 0; i < strlen(a); i++)
    CHECK(http_req_parse(a, i, 8192, &r) == HTTP_REQ_MORE);
  /* pipelined: only the first head is consumed */
  CHECK(hp("HEAD /vps?x=1 HTTP/1.0\n\nGET / HTTP/1.1\n\n", 8192, &r) == 24);
  CHECK(strcmp(r.method, "HEAD") == 0 && strcmp(r.path, "/vps") == 0);
  CHECK(r.minor == 0 && r.keepalive == 0);
  CHECK(hp("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n", 99, &r) > 0);
  CHECK(r.keepalive == 1);
  CHECK(hp("GET / HTTP/1.1\r\nconnection: foo, close\r\n\r\n", 99, &r) > 0);
  CHECK(r.keepalive == 0);
  CHECK(hp("GET / HTTP/1.1\r\nContent-Length: 0\r\n\r\n", 99, &r) > 0);
  CHECK(hp("DELETE / HTTP/1.1\r\n\r\n", 99, &r) > 0);
  CHECK(strcmp(r.method, "DELETE") == 0);

  /* malformed */
  CHECK(hp("GET / HTTP/1.1\r\nContent-Length: 5\r\n\r\n", 99, &r) ==
	HTTP_REQ_BAD);
  CHECK(hp("GET / HTTP/1.1\r\nContent-Length: x\r\n\r\n", 99, &r) ==
	HTTP_REQ_BAD);
  CHECK(hp("GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", 99, &r)
	== HTTP_REQ_BAD);
  CHECK(hp("GET / HTTP/2.0\r\n\r\n", 99, &r) == HTTP_REQ_BAD);
  CHECK(hp("GET / HTTP/1.10\r\n\r\n", 99, &r) == HTTP_REQ_BAD);
  CHECK(hp("GET /\r\n\r\n", 99, &r) == HTTP_REQ_BAD);
  CHECK(hp("GET x HTTP/1.1\r\n\r\n", 99, &r) == HTTP_REQ_BAD);
  CHECK(hp("GET  / HTTP/1.1\r\n\r\n", 99, &r) == HTTP_REQ_BAD);
  CHECK(hp("G(T / HTTP/1.1\r\n\r\n", 99, &r) == HTTP_REQ_BAD);
  CHECK(hp("\r\n\r\n", 99, &r) == HTTP_REQ_BAD);
  CHECK(hp("GET / HTTP/1.1\r\nNoColon\r\n\r\n", 99, &r) == HTTP_REQ_BAD);
  CHECK(hp("GET / HTTP/1.1\r\n folded: x\r\n\r\n", 99, &r) == HTTP_REQ_BAD);
  CHECK(hp("GET / HTTP/1.1\r\nA: b\x01\r\n\r\n", 99, &r) == HTTP_REQ_BAD);
  CHECK(hp("GET / HTTP/1.1\r\nA\r: b\r\n\r\n", 99, &r) == HTTP_REQ_BAD);
  CHECK(http_req_parse("GET / HTTP/1.1\r\n\0: b\r\n\r\n", 24, 99, &r) ==
	HTTP_REQ_BAD);
  CHECK(hp("ABCDEFGHIJKLMNOPQ / HTTP/1.1\r\n\r\n", 99, &r) == HTTP_REQ_BAD);
  /* a path of HTTP_PATH_MAX bytes is too long */
  memset(big, 'a', sizeof(big));
  memcpy(big, "GET /", 5);
  memcpy(big + 4 + HTTP_PATH_MAX, " HTTP/1.1\n\n", 12);
  CHECK(hp(big, 8192, &r) == HTTP_REQ_BAD);
  big[4 + HTTP_PATH_MAX - 1] = ' ';
  memcpy(big + 4 + HTTP_PATH_MAX - 1, " HTTP/1.1\n\n", 12);
  CHECK(hp(big, 8192, &r) > 0 && strlen(r.path) == HTTP_PATH_MAX - 1);

  /* too big: no end of head within max bytes */
  CHECK(hp("GET / HTTP/1.1\r\nA: bbbbbbbbbbbbbbbb", 20, &r) ==
	HTTP_REQ_TOOBIG);
  CHECK(hp("GET / HTTP/1.1\r\nA: b\r\n", 20, &r) == HTTP_REQ_TOOBIG);
  CHECK(hp("GET / HTTP/1.1\r\nA: b\r\n", 99, &r) == HTTP_REQ_MORE);
}

static size_t je(char *out, size_t outlen, const char *s, size_t len)
{
  return json_escape(out, outlen, (const uint8_t *)s, len);
}

static void test_json_escape(void)
{
  char out[128];
  size_t n;

  CHECK(je(out, sizeof(out), "plain", 5) == 5 && strcmp(out, "plain") == 0);
  n = je(out, sizeof(out), "a\"b\\c\n\t\x01\x7f", 9);
  CHECK(strcmp(out, "a\\\"b\\\\c\\n\\t\\u0001\\u007f") == 0);
  CHECK(n == strlen(out));
  CHECK(je(out, sizeof(out), "x\0y", 3) == 8 &&
	strcmp(out, "x\\u0000y") == 0);
  /* valid UTF-8 passes through: e-acute, euro, U+1F600 */
  CHECK(je(out, sizeof(out), "\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80", 9) == 9
	&& memcmp(out, "\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80", 10) == 0);
  /* invalid: stray continuation, overlong, surrogate, > U+10FFFF,
   * truncated, 0xff */
  CHECK(je(out, sizeof(out), "\x80", 1) == 6 && strcmp(out, "\\ufffd") == 0);
  CHECK(je(out, sizeof(out), "\xc0\xaf", 2) == 12 &&
	strcmp(out, "\\ufffd\\ufffd") == 0);
  CHECK(je(out, sizeof(out), "\xe0\x80\xaf", 3) == 18);
  CHECK(je(out, sizeof(out), "\xed\xa0\x80", 3) == 18);
  CHECK(je(out, sizeof(out), "\xf4\x90\x80\x80", 4) == 24);
  CHECK(je(out, sizeof(out), "a\xe2\x82", 3) == 13 &&
	strcmp(out, "a\\ufffd\\ufffd") == 0);
  CHECK(je(out, sizeof(out), "\xff" "b", 2) == 7 &&
	strcmp(out, "\\ufffdb") == 0);
  /* truncation: never a partial escape, always NUL-terminated */
  CHECK(je(out, 4, "ab\"c", 4) == 5 && strcmp(out, "ab") == 0);
  CHECK(je(out, 5, "ab\"c", 4) == 5 && strcmp(out, "ab\\\"") == 0);
  CHECK(je(out, 1, "abc", 3) == 3 && out[0] == '\0');
  CHECK(je(NULL, 0, "\x01", 1) == 6);
}

/* a v2 header: sig, ver/cmd, fam, then the body given */
static size_t pp2(uint8_t *b, int vercmd, int fam, const uint8_t *body,
		  size_t blen)
{
  static const uint8_t sig[12] = {0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A,
				  0x51, 0x55, 0x49, 0x54, 0x0A};
  memcpy(b, sig, 12);
  b[12] = (uint8_t)vercmd;
  b[13] = (uint8_t)fam;
  bytes_htons(b + 14, (uint16_t)blen);
  memcpy(b + 16, body, blen);
  return 16 + blen;
}

static long pp(const char *s, proxy_hdr_t *h)
{
  return proxy_hdr_parse((const uint8_t *)s, strlen(s), h);
}

static void test_proxy_v1(void)
{
  static const char *bad[] = {
    "PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n",          /* LF without CR */
    "PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n",           /* a field short */
    "PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n",       /* a field more */
    "PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n",        /* double space */
    "PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n",        /* leading zero */
    "PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n",     /* port range */
    "PROXY TCP4 ::1 ::1 1 2\r\n",                 /* family mismatch */
    "PROXY TCP6 1.2.3.4 5.6.7.8 1 2\r\n",
    "PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n",
    "PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n",
    "PROXY \r\n",
  };
  char longline[200];
  proxy_hdr_t h;
  const char *ok = "PROXY TCP4 192.0.2.7 198.51.100.1 40000 2000\r\nXYZ";
  size_t i;
  char a[INET6_ADDRSTRLEN];

  CHECK(pp(ok, &h) == (long)strlen(ok) - 3);
  CHECK(h.version == 1 && h.cmd == PROXY_CMD_PROXY);
  CHECK(strcmp(sockaddr_tostr((struct sockaddr *)&h.src, a, sizeof(a)),
	       "192.0.2.7") == 0);
  CHECK(sockaddr_port((struct sockaddr *)&h.src) == 40000);
  CHECK(sockaddr_port((struct sockaddr *)&h.dst) == 2000);
  CHECK(pp("PROXY TCP6 2001:db8::1 ::1 0 65535\r\n", &h) == 36);
  CHECK(h.src.ss_family == AF_INET6 &&
	sockaddr_port((struct sockaddr *)&h.dst) == 65535);
  CHECK(pp("PROXY UNKNOWN\r\n", &h) == 15 && h.cmd == PROXY_CMD_LOCAL);
  CHECK(pp("PROXY UNKNOWN ffff::1 ::1 1 2\r\n", &h) > 0 &&
	h.cmd == PROXY_CMD_LOCAL);
  /* every prefix of a good line asks for more */
  for(i=1; i<strlen(ok) - 4; i++)
    if(!CHECK(proxy_hdr_parse((const uint8_t *)ok, i, &h) == PROXY_MORE))
      break;
  for(i=0; i<sizeof(bad)/sizeof(bad[0]); i++)
    if(!CHECK(pp(bad[i], &h) == PROXY_E_V1))
      printf("  bad v1: %s", bad[i]);
  CHECK(pp("PROXZ", &h) == PROXY_E_SIG);
  CHECK(pp("GET / HTTP/1.0\r\n", &h) == PROXY_E_SIG);
  CHECK(pp("\r\n\r\x0b", &h) == PROXY_E_SIG);
  memset(longline, 'x', sizeof(longline) - 1);
  longline[sizeof(longline) - 1] = '\0';
  memcpy(longline, "PROXY TCP4 ", 11);
  CHECK(pp(longline, &h) == PROXY_E_LONG);
  CHECK(proxy_hdr_parse((const uint8_t *)longline, 106, &h) == PROXY_MORE);
}

static void test_proxy_v2(void)
{
  uint8_t b[PROXY_HDR_MAX + 64], body[300];
  proxy_hdr_t h;
  size_t n, i;
  uint32_t crc;
  char a[INET6_ADDRSTRLEN];

  CHECK(crc32c(0, (const uint8_t *)"123456789", 9) == 0xE3069283U);
  /* PROXY TCP over IPv4: 127.0.0.5:4242 -> 127.0.0.1:8000 */
  memcpy(body, "\x7f\x00\x00\x05\x7f\x00\x00\x01\x10\x92\x1f\x40", 12);
  n = pp2(b, 0x21, 0x11, body, 12);
  CHECK(proxy_hdr_parse(b, n, &h) == 28);
  CHECK(h.version == 2 && h.cmd == PROXY_CMD_PROXY);
  CHECK(strcmp(sockaddr_tostr((struct sockaddr *)&h.src, a, sizeof(a)),
	       "127.0.0.5") == 0);
  CHECK(sockaddr_port((struct sockaddr *)&h.src) == 4242);
  CHECK(sockaddr_port((struct sockaddr *)&h.dst) == 8000);
  for(i=0; i<n; i++)
    if(!CHECK(proxy_hdr_parse(b, i, &h) == PROXY_MORE))
      break;
  /* trailing bytes after the header are not the parser's */
  b[n] = 0xAA;
  CHECK(proxy_hdr_parse(b, n + 1, &h) == 28);

  /* IPv6 with a NOOP TLV and a valid CRC32C TLV */
  memset(body, 0, 36);
  body[15] = 1;          /* src ::1 */
  body[31] = 2;          /* dst ::2 */
  body[32] = 0x01; body[33] = 0x02; body[34] = 0x00; body[35] = 0x50;
  memcpy(body + 36, "\x04\x00\x02xy", 5);
  memcpy(body + 41, "\x03\x00\x04\x00\x00\x00\x00", 7);
  n = pp2(b, 0x21, 0x21, body, 48);
  crc = crc32c(0, b, n);
  bytes_htonl(b + n - 4, crc);
  CHECK(proxy_hdr_parse(b, n, &h) == (long)n);
  CHECK(h.src.ss_family == AF_INET6 &&
	sockaddr_port((struct sockaddr *)&h.src) == 258);
  b[n - 1] ^= 1;
  CHECK(proxy_hdr_parse(b, n, &h) == PROXY_E_TLV);
  /* a TLV running past the end; a stray byte after the last TLV */
  n = pp2(b, 0x21, 0x21, body, 40);
  CHECK(proxy_hdr_parse(b, n, &h) == PROXY_E_TLV);
  n = pp2(b, 0x21, 0x21, body, 37);
  CHECK(proxy_hdr_parse(b, n, &h) == PROXY_E_TLV);
  /* CRC32C TLV of the wrong length */
  memcpy(body + 36, "\x03\x00\x03\x00\x00\x00", 6);
  n = pp2(b, 0x21, 0x21, body, 42);
  CHECK(proxy_hdr_parse(b, n, &h) == PROXY_E_TLV);

  /* LOCAL: accepted whatever the family; address ignored */
  n = pp2(b, 0x20, 0x00, body, 0);
  CHECK(proxy_hdr_parse(b, n, &h) == 16 && h.cmd == PROXY_CMD_LOCAL);
  n = pp2(b, 0x20, 0x11, body, 12);
  CHECK(proxy_hdr_parse(b, n, &h) == 28 && h.cmd == PROXY_CMD_LOCAL);
  memset(body, 0, 216);
  n = pp2(b, 0x20, 0x31, body, 216);
  CHECK(proxy_hdr_parse(b, n, &h) == (long)n && h.cmd == PROXY_CMD_LOCAL);

  /* refusals */
  n = pp2(b, 0x11, 0x11, body, 12);
  CHECK(proxy_hdr_parse(b, n, &h) == PROXY_E_VERSION);
  n = pp2(b, 0x22, 0x11, body, 12);
  CHECK(proxy_hdr_parse(b, n, &h) == PROXY_E_VERSION);
  n = pp2(b, 0x21, 0x00, body, 0);
  CHECK(proxy_hdr_parse(b, n, &h) == PROXY_E_FAMILY);
  n = pp2(b, 0x21, 0x12, body, 12);          /* UDP */
  CHECK(proxy_hdr_parse(b, n, &h) == PROXY_E_FAMILY);
  n = pp2(b, 0x21, 0x31, body, 216);         /* unix */
  CHECK(proxy_hdr_parse(b, n, &h) == PROXY_E_FAMILY);
  n = pp2(b, 0x21, 0x41, body, 12);
  CHECK(proxy_hdr_parse(b, n, &h) == PROXY_E_FAMILY);
  n = pp2(b, 0x21, 0x11, body, 8);
  CHECK(proxy_hdr_parse(b, n, &h) == PROXY_E_ADDRLEN);
  n = pp2(b, 0x21, 0x21, body, 12);
  CHECK(proxy_hdr_parse(b, n, &h) == PROXY_E_ADDRLEN);
  /* oversized: known from the length field, before the body arrives */
  pp2(b, 0x21, 0x11, body, 0);
  bytes_htons(b + 14, PROXY_HDR_MAX - 15);
  CHECK(proxy_hdr_parse(b, 16, &h) == PROXY_E_LONG);
  bytes_htons(b + 14, PROXY_HDR_MAX - 16);
  CHECK(proxy_hdr_parse(b, 16, &h) == PROXY_MORE);
  /* a wrong signature byte, at any position */
  for(i=0; i<12; i++)
    {
      n = pp2(b, 0x21, 0x11, body, 12);
      b[i] ^= 0x40;
      if(!CHECK(proxy_hdr_parse(b, n, &h) == PROXY_E_SIG))
	break;
    }
  CHECK(strcmp(proxy_hdr_strerror(PROXY_E_TLV),
	       "bad PROXY v2 TLV (length or CRC32C)") == 0);
}

static void test_html_escape(void)
{
  char out[128];
  const char *s = "<script>alert(\"x\")</script>&'";
  size_t n;

  n = html_escape(out, sizeof(out), (const uint8_t *)s, strlen(s));
  CHECK(strcmp(out, "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;"
	       "&amp;&#39;") == 0);
  CHECK(n == strlen(out));
  /* valid UTF-8 passes; invalid bytes and controls become U+FFFD */
  CHECK(html_escape(out, sizeof(out), (const uint8_t *)"\xc3\xa9", 2) == 2
	&& strcmp(out, "\xc3\xa9") == 0);
  CHECK(html_escape(out, sizeof(out), (const uint8_t *)"a\xff\x01", 3) == 7
	&& strcmp(out, "a\xef\xbf\xbd\xef\xbf\xbd") == 0);
  CHECK(html_escape(out, sizeof(out), (const uint8_t *)"\xe2\x82", 2) == 6);
  /* truncation: never half a reference */
  CHECK(html_escape(out, 4, (const uint8_t *)"a<b", 3) == 6 &&
	strcmp(out, "a") == 0);
  CHECK(html_escape(NULL, 0, (const uint8_t *)"&", 1) == 5);
}

static void test_prom_label_escape(void)
{
  char out[128];
  size_t n;

  n = prom_label_escape(out, sizeof(out), (const uint8_t *)"a\\b\"c\nd", 7);
  CHECK(strcmp(out, "a\\\\b\\\"c\\nd") == 0 && n == strlen(out));
  CHECK(prom_label_escape(out, sizeof(out),
			  (const uint8_t *)"<x>\t'\xc3\xa9", 7) == 7 &&
	strcmp(out, "<x>\t'\xc3\xa9") == 0);
  CHECK(prom_label_escape(out, sizeof(out), (const uint8_t *)"\xc0\xaf", 2)
	== 6 && strcmp(out, "\xef\xbf\xbd\xef\xbf\xbd") == 0);
  CHECK(prom_label_escape(out, 3, (const uint8_t *)"a\"", 2) == 3 &&
	strcmp(out, "a") == 0);
}

/* ---- typed records (tlv_*) ---- */

typedef struct tlv_obj
{
  uint8_t  flag;
  uint32_t count;
  uint64_t tick;
  uint64_t kept;
} tlv_obj_t;

static const tlv_desc_t tlv_obj_fields[] = {
  { 1, 1, 0, offsetof(tlv_obj_t, flag), 0, 1, 1, "flag" },
  { 2, 4, 0, offsetof(tlv_obj_t, count), 1, 100, 7, "count" },
  { 3, 8, TLVF_PAST, offsetof(tlv_obj_t, tick), 0, UINT64_MAX, 0, "tick" },
  { 4, 8, TLVF_KEEP, offsetof(tlv_obj_t, kept), 0, UINT64_MAX, 0, "kept" },
};

static void test_tlv_codec(void)
{
  tlv_w_t w;
  tlv_r_t r, fr;
  const uint8_t *v;
  uint32_t n;
  uint16_t type;
  uint64_t x;
  size_t at;

  memset(&w, 0, sizeof(w));
  at = tlv_begin(&w, 5);
  tlv_field_uint(&w, 1, 0x0102, 2);
  tlv_field_str(&w, 2, "ab");
  tlv_field_str(&w, 3, NULL);            /* nothing written */
  tlv_end(&w, at);
  tlv_field(&w, TLV_MUST | 9, NULL, 0);  /* an empty item */
  CHECK(!w.err);
  CHECK(w.len == 6 + (6 + 2) + (6 + 2) + 6);
  CHECK(w.p[0] == 0 && w.p[1] == 5 && bytes_ntohl(w.p + 2) == 16);

  r.p = w.p; r.len = w.len; r.off = 0;
  CHECK(tlv_next(&r, &type, &v, &n) == 1 && type == 5 && n == 16);
  fr.p = v; fr.len = n; fr.off = 0;
  CHECK(tlv_next(&fr, &type, &v, &n) == 1 && type == 1 && n == 2);
  CHECK(tlv_uint(v, n, 2, &x) == 0 && x == 0x0102);
  CHECK(tlv_uint(v, n, 4, &x) == -1);    /* wrong width */
  CHECK(tlv_next(&fr, &type, &v, &n) == 1 && type == 2 && n == 2 &&
	memcmp(v, "ab", 2) == 0);
  CHECK(tlv_next(&fr, &type, &v, &n) == 0);
  CHECK(tlv_next(&r, &type, &v, &n) == 1 && type == (TLV_MUST | 9) &&
	n == 0);
  CHECK(tlv_next(&r, &type, &v, &n) == 0);

  /* an item that overruns, and a header cut short */
  bytes_htonl(w.p + 2, (uint32_t)w.len);
  r.off = 0;
  CHECK(tlv_next(&r, &type, &v, &n) == -1);
  CHECK(tlv_next(&r, &type, &v, &n) == 0);
  r.len = 5; r.off = 0;
  CHECK(tlv_next(&r, &type, &v, &n) == -1);
  free(w.p);
}

static void test_tlv_table(void)
{
  tlv_obj_t a, b;
  tlv_w_t w;
  tlv_r_t r;
  const uint8_t *v;
  const char *bad = NULL;
  uint32_t n;
  uint16_t tag;
  uint8_t big[4];

  a.flag = 1; a.count = 42; a.tick = 9; a.kept = 77;
  memset(&w, 0, sizeof(w));
  tlv_table_put(&w, tlv_obj_fields, 4, &a);
  CHECK(!w.err && w.len == 4 * 6 + 1 + 4 + 8 + 8);

  /* defaults: TLVF_KEEP leaves the field as the constructor set it */
  b.flag = 0; b.count = 0; b.tick = 5; b.kept = 3;
  tlv_table_defaults(tlv_obj_fields, 4, &b);
  CHECK(b.flag == 1 && b.count == 7 && b.tick == 0 && b.kept == 3);

  r.p = w.p; r.len = w.len; r.off = 0;
  while(tlv_next(&r, &tag, &v, &n) == 1)
    CHECK(tlv_table_get(tlv_obj_fields, 4, &b, tag, v, n, 10, &bad) == 1);
  CHECK(memcmp(&a, &b, sizeof(a)) == 0 || (a.flag == b.flag &&
	a.count == b.count && a.tick == b.tick && a.kept == b.kept));

  /* not in the table; out of bounds; a tick in the future; bad width */
  CHECK(tlv_table_get(tlv_obj_fields, 4, &b, 99, w.p, 1, 10, &bad) == 0);
  bytes_htonl(big, 101);
  CHECK(tlv_table_get(tlv_obj_fields, 4, &b, 2, big, 4, 10, &bad) == -1 &&
	strcmp(bad, "count") == 0);
  bytes_htonl(big, 0);
  CHECK(tlv_table_get(tlv_obj_fields, 4, &b, 2, big, 4, 10, &bad) == -1);
  CHECK(b.count == 42);
  r.off = 0;
  while(tlv_next(&r, &tag, &v, &n) == 1)
    if(tag == 3)
      CHECK(tlv_table_get(tlv_obj_fields, 4, &b, tag, v, n, 8, &bad) == -1
	    && strcmp(bad, "tick") == 0);
  CHECK(tlv_table_get(tlv_obj_fields, 4, &b, 1, big, 2, 10, &bad) == -1);
  big[0] = 2;
  CHECK(tlv_table_get(tlv_obj_fields, 4, &b, 1, big, 1, 10, &bad) == -1);
  free(w.p);
}

int main(void)
{
  UNIT_RUN(test_bytes);
  UNIT_RUN(test_serial_cmp);
  UNIT_RUN(test_string_tolong);
  UNIT_RUN(test_string_isdigits);
  UNIT_RUN(test_ascii_strncasecmp);
  UNIT_RUN(test_fd_flags);
  UNIT_RUN(test_time);
  UNIT_RUN(test_sockaddr_v4);
  UNIT_RUN(test_sockaddr_v6);
  UNIT_RUN(test_sockaddr_other);
  UNIT_RUN(test_file_read_all);
  UNIT_RUN(test_syslog_format);
  UNIT_RUN(test_logsock);
  UNIT_RUN(test_sdnotify);
  UNIT_RUN(test_journal_stream);
  UNIT_RUN(test_ratelim);
  UNIT_RUN(test_cidr_parse);
  UNIT_RUN(test_cidr_match);
  UNIT_RUN(test_cidr_source);
  UNIT_RUN(test_http_req);
  UNIT_RUN(test_json_escape);
  UNIT_RUN(test_proxy_v1);
  UNIT_RUN(test_proxy_v2);
  UNIT_RUN(test_html_escape);
  UNIT_RUN(test_prom_label_escape);
  UNIT_RUN(test_tlv_codec);
  UNIT_RUN(test_tlv_table);
  return unit_exit();
}
