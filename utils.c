/*
 * utils.c: small helpers shared by sc_remoted and its tests.
 *
 * See utils.h.  Nothing here knows about sc_remoted's objects or
 * protocols, and nothing here logs: failures are reported through return
 * values and errno.
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
#include <time.h>
#include <unistd.h>

#include "utils.h"

#ifndef O_CLOEXEC
#define O_CLOEXEC 0
#endif

/* ---- byte order ---- */

void bytes_htons(uint8_t *b, uint16_t v)
{
  b[0] = (uint8_t)(v >> 8);
  b[1] = (uint8_t)v;
}

void bytes_htonl(uint8_t *b, uint32_t v)
{
  b[0] = (uint8_t)(v >> 24);
  b[1] = (uint8_t)(v >> 16);
  b[2] = (uint8_t)(v >> 8);
  b[3] = (uint8_t)v;
}

uint16_t bytes_ntohs(const uint8_t *b)
{
  return (uint16_t)(((uint16_t)b[0] << 8) | b[1]);
}

uint32_t bytes_ntohl(const uint8_t *b)
{
  return ((uint32_t)b[0] << 24) | ((uint32_t)b[1] << 16) |
    ((uint32_t)b[2] << 8) | (uint32_t)b[3];
}

/*
 * Serial-number order (RFC 1982 style) of two u32 counters: the sign of
 * (int32_t)(a - b), computed without relying on implementation-defined
 * unsigned-to-signed conversion.  Returns -1, 0 or 1.  A difference of
 * exactly 2^31 counts as "a before b", as the int32 cast would.
 */
int serial_cmp(uint32_t a, uint32_t b)
{
  uint32_t d = a - b;

  if(d == 0)
    return 0;
  return d < UINT32_C(0x80000000) ? 1 : -1;
}

/* ---- strings ---- */

/*
 * strtol(s, &end, 0) with the error cases folded into the return value:
 * 0 and *out set when at least one digit was consumed without overflow,
 * -1 (and *out untouched) for NULL, no digits, or ERANGE.
 */
int string_tolong(const char *s, long *out)
{
  char *end;
  long v;

  if(s == NULL || out == NULL)
    return -1;
  errno = 0;
  v = strtol(s, &end, 0);
  if(end == s || errno == ERANGE)
    return -1;
  *out = v;
  return 0;
}

int string_isdigits(const char *s)
{
  if(s == NULL || *s == '\0')
    return 0;
  for(; *s != '\0'; s++)
    if(*s < '0' || *s > '9')
      return 0;
  return 1;
}

/* tolower for ASCII letters only, whatever the locale */
static int ascii_tolower(unsigned char c)
{
  return (c >= 'A' && c <= 'Z') ? c - 'A' + 'a' : c;
}

/*
 * Compare at most n bytes of a and b, folding ASCII case, stopping at the
 * first NUL.  Returns <0, 0 or >0 like strncasecmp in the C locale.
 */
int ascii_strncasecmp(const char *a, const char *b, size_t n)
{
  const unsigned char *x = (const unsigned char *)a;
  const unsigned char *y = (const unsigned char *)b;
  int d;
  size_t i;

  for(i = 0; i < n; i++)
    {
      if((d = ascii_tolower(x[i]) - ascii_tolower(y[i])) != 0)
	return d;
      if(x[i] == '\0')
	break;
    }
  return 0;
}

/* ---- file descriptors ---- */

/* set O_NONBLOCK on fd; 0 on success, -1 with errno set */
int fd_nonblock(int fd)
{
  int flags;

  if((flags = fcntl(fd, F_GETFL)) == -1)
    return -1;
  if((flags & O_NONBLOCK) != 0)
    return 0;
  return fcntl(fd, F_SETFL, flags | O_NONBLOCK) == -1 ? -1 : 0;
}

/* set FD_CLOEXEC on fd; 0 on success, -1 with errno set */
int fd_cloexec(int fd)
{
  int flags;

  if((flags = fcntl(fd, F_GETFD)) == -1)
    return -1;
  if((flags & FD_CLOEXEC) != 0)
    return 0;
  return fcntl(fd, F_SETFD, flags | FD_CLOEXEC) == -1 ? -1 : 0;
}

/* ---- time ---- */

void time_wall(struct timeval *tv)
{
  gettimeofday(tv, NULL);
}

/*
 * Monotonic time as a timeval.  Falls back to the wall clock only if the
 * system has no working CLOCK_MONOTONIC.
 */
void time_mono(struct timeval *tv)
{
  struct timespec ts;

  if(clock_gettime(CLOCK_MONOTONIC, &ts) != 0)
    {
      gettimeofday(tv, NULL);
      return;
    }
  tv->tv_sec = ts.tv_sec;
  tv->tv_usec = (suseconds_t)(ts.tv_nsec / 1000);
}

/*
 * a - b in whole milliseconds, truncated toward zero, so that
 * timeval_diff_ms(a, b) == -timeval_diff_ms(b, a).
 */
int64_t timeval_diff_ms(const struct timeval *a, const struct timeval *b)
{
  int64_t us;

  us = ((int64_t)a->tv_sec - (int64_t)b->tv_sec) * 1000000;
  us += (int64_t)a->tv_usec - (int64_t)b->tv_usec;
  return us / 1000;
}

/* ---- socket addresses ---- */

/*
 * inet_ntop of an AF_INET or AF_INET6 address, without the port.
 * Returns buf, or NULL for any other family or when len is too small.
 */
const char *sockaddr_tostr(const struct sockaddr *sa, char *buf, size_t len)
{
  const struct sockaddr_in *sin;
  const struct sockaddr_in6 *sin6;

  if(sa == NULL || buf == NULL || len > (size_t)INT_MAX)
    return NULL;
  if(sa->sa_family == AF_INET)
    {
      sin = (const struct sockaddr_in *)(const void *)sa;
      return inet_ntop(AF_INET, &sin->sin_addr, buf, (socklen_t)len);
    }
  if(sa->sa_family == AF_INET6)
    {
      sin6 = (const struct sockaddr_in6 *)(const void *)sa;
      return inet_ntop(AF_INET6, &sin6->sin6_addr, buf, (socklen_t)len);
    }
  return NULL;
}

/* the host-order port of an AF_INET or AF_INET6 sockaddr, or -1 */
int sockaddr_port(const struct sockaddr *sa)
{
  const struct sockaddr_in *sin;
  const struct sockaddr_in6 *sin6;

  if(sa == NULL)
    return -1;
  if(sa->sa_family == AF_INET)
    {
      sin = (const struct sockaddr_in *)(const void *)sa;
      return ntohs(sin->sin_port);
    }
  if(sa->sa_family == AF_INET6)
    {
      sin6 = (const struct sockaddr_in6 *)(const void *)sa;
      return ntohs(sin6->sin6_port);
    }
  return -1;
}

/* fill ss as an AF_INET sockaddr if addr is an IPv4 literal */
static int sockaddr_fromstr4(const char *addr, int port,
			     struct sockaddr_storage *ss, socklen_t *sslen)
{
  struct sockaddr_in *sin = (struct sockaddr_in *)(void *)ss;

  if(inet_pton(AF_INET, addr, &sin->sin_addr) != 1)
    return -1;
  sin->sin_family = AF_INET;
  sin->sin_port = htons((uint16_t)port);
#ifdef HAVE_STRUCT_SOCKADDR_IN_SIN_LEN
  sin->sin_len = sizeof(*sin);
#endif
  if(sslen != NULL)
    *sslen = sizeof(*sin);
  return AF_INET;
}

/* fill ss as an AF_INET6 sockaddr if addr is an IPv6 literal */
static int sockaddr_fromstr6(const char *addr, int port,
			     struct sockaddr_storage *ss, socklen_t *sslen)
{
  struct sockaddr_in6 *sin6 = (struct sockaddr_in6 *)(void *)ss;

  if(inet_pton(AF_INET6, addr, &sin6->sin6_addr) != 1)
    return -1;
  sin6->sin6_family = AF_INET6;
  sin6->sin6_port = htons((uint16_t)port);
#ifdef HAVE_STRUCT_SOCKADDR_IN6_SIN6_LEN
  sin6->sin6_len = sizeof(*sin6);
#endif
  if(sslen != NULL)
    *sslen = sizeof(*sin6);
  return AF_INET6;
}

/*
 * Parse an IPv4 or IPv6 literal (no names, brackets or scope ids) into a
 * zeroed ss with the given port.  Returns AF_INET or AF_INET6, or -1 if
 * addr is not a literal or port is outside 0..65535.  sslen may be NULL.
 */
int sockaddr_fromstr(const char *addr, int port,
		     struct sockaddr_storage *ss, socklen_t *sslen)
{
  if(addr == NULL || ss == NULL || port < 0 || port > 65535)
    return -1;
  memset(ss, 0, sizeof(*ss));
  if(strchr(addr, ':') == NULL)
    return sockaddr_fromstr4(addr, port, ss, sslen);
  return sockaddr_fromstr6(addr, port, ss, sslen);
}

/* ---- files ---- */

/*
 * Make room for at least one more byte plus the NUL in *buf, doubling
 * its capacity *cap when needed.  0 on success, -1 with errno set.
 */
static int file_grow(char **buf, size_t *cap, size_t len)
{
  size_t ncap;
  char *nbuf;

  if(len + 1 < *cap)
    return 0;
  if(*cap > SIZE_MAX / 2)
    {
      errno = ENOMEM;
      return -1;
    }
  ncap = *cap * 2;
  if((nbuf = realloc(*buf, ncap)) == NULL)
    return -1;
  *buf = nbuf;
  *cap = ncap;
  return 0;
}

/*
 * Read fd to end of file into a NUL-terminated heap buffer, starting
 * with a capacity of hint + 1 bytes (hint may be 0, as for /proc files).
 */
static int fd_read_all(int fd, size_t hint, char **out, size_t *outlen)
{
  size_t cap = hint < 4096 ? 4096 : hint + 2, len = 0;
  char *buf;
  ssize_t rc;

  if((buf = malloc(cap)) == NULL)
    return -1;
  for(;;)
    {
      if(file_grow(&buf, &cap, len) != 0)
	break;
      rc = read(fd, buf + len, cap - len - 1);
      if(rc > 0)
	len += (size_t)rc;
      else if(rc == 0)
	{
	  buf[len] = '\0';
	  *out = buf;
	  *outlen = len;
	  return 0;
	}
      else if(errno != EINTR)
	break;
    }
  free(buf);
  return -1;
}

/*
 * Read the whole of path into a NUL-terminated heap buffer.  Returns 0
 * with *buf (caller frees) and *len (excluding the NUL) set, or -1 with
 * errno set and *buf and *len untouched.
 */
int file_read_all(const char *path, char **buf, size_t *len)
{
  struct stat sb;
  size_t hint = 0;
  int fd, rc, err;

  if(path == NULL || buf == NULL || len == NULL)
    {
      errno = EINVAL;
      return -1;
    }
  if((fd = open(path, O_RDONLY | O_CLOEXEC)) == -1)
    return -1;
  if(fstat(fd, &sb) == 0 && S_ISREG(sb.st_mode) && sb.st_size > 0 &&
     (uintmax_t)sb.st_size < (uintmax_t)SIZE_MAX / 2)
    hint = (size_t)sb.st_size;
  rc = fd_read_all(fd, hint, buf, len);
  err = errno;
  close(fd);
  errno = err;
  return rc;
}

/* ---- syslog datagrams ----
 *
 * Why not syslog(3): glibc's syslog() writes to a blocking datagram
 * socket, so a stalled or busy syslog daemon (its receive queue full)
 * would stall the whole event loop; it also reconnects on every failure.
 * These functions send the same datagram syslog(3) sends to /dev/log on
 * a non-blocking socket: a message that does not fit is dropped and
 * counted, and the caller reports the count later.
 */

size_t syslog_format(char *buf, size_t len, int pri, time_t t,
		     const char *ident, long pid, const char *msg)
{
  static const char mon[12][4] = {"Jan", "Feb", "Mar", "Apr", "May", "Jun",
				   "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"};
  struct tm tm;
  int n;

  if(len == 0)
    return 0;
  if(localtime_r(&t, &tm) == NULL)
    memset(&tm, 0, sizeof(tm));
  n = snprintf(buf, len, "<%d>%s %2d %02d:%02d:%02d %s[%ld]: %s", pri,
	       mon[tm.tm_mon >= 0 && tm.tm_mon < 12 ? tm.tm_mon : 0],
	       tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec, ident, pid, msg);
  if(n < 0)
    {
      buf[0] = '\0';
      return 0;
    }
  return (size_t)n < len ? (size_t)n : len - 1;
}

void logsock_init(logsock_t *ls, const char *path)
{
  ls->fd = -1;
  ls->path = path;
  ls->next_try = 0;
  ls->dropped = 0;
  ls->err = 0;
  return;
}

void logsock_close(logsock_t *ls)
{
  if(ls->fd >= 0)
    close(ls->fd);
  ls->fd = -1;
  return;
}

/* a non-blocking, close-on-exec datagram socket connected to sun */
static int dgram_connect(const struct sockaddr_un *sun, socklen_t sl)
{
  int fd, err;
  if((fd = socket(AF_UNIX, SOCK_DGRAM, 0)) < 0)
    return -1;
  if(fd_nonblock(fd) != 0 || fd_cloexec(fd) != 0 ||
     connect(fd, (const struct sockaddr *)sun, sl) != 0)
    {
      err = errno;
      close(fd);
      errno = err;
      return -1;
    }
  return fd;
}

int logsock_connect(logsock_t *ls, time_t now)
{
  struct sockaddr_un sun;

  if(ls->fd >= 0)
    return 0;
  ls->next_try = now + 1;
  memset(&sun, 0, sizeof(sun));
  sun.sun_family = AF_UNIX;
  if(ls->path == NULL || strlen(ls->path) >= sizeof(sun.sun_path))
    {
      ls->err = errno = EINVAL;
      return -1;
    }
  memcpy(sun.sun_path, ls->path, strlen(ls->path));
  if((ls->fd = dgram_connect(&sun, (socklen_t)sizeof(sun))) < 0)
    {
      ls->err = errno;
      return -1;
    }
  ls->err = 0;
  return 0;
}

/* send(2) flags for a datagram that must never block or raise SIGPIPE */
static int dgram_send_flags(void)
{
  int flags = 0;
#ifdef MSG_DONTWAIT
  flags |= MSG_DONTWAIT;
#endif
#ifdef MSG_NOSIGNAL
  flags |= MSG_NOSIGNAL;
#endif
  return flags;
}

int logsock_send(logsock_t *ls, const char *buf, size_t len, time_t now)
{
  int flags = dgram_send_flags(), tries;
  /* a second try only after reconnecting a socket whose peer went away */
  for(tries = 0; tries < 2; tries++)
    {
      if(ls->fd < 0 && (now < ls->next_try || logsock_connect(ls, now) != 0))
	break;
      if(send(ls->fd, buf, len, flags) >= 0)
	{
	  ls->err = 0;
	  return 0;
	}
      ls->err = errno;
      if(errno == EAGAIN || errno == EWOULDBLOCK || errno == ENOBUFS ||
	 errno == EINTR || errno == EMSGSIZE)
	break;
      /* ECONNREFUSED, ENOTCONN...: the receiver was restarted */
      logsock_close(ls);
      ls->next_try = now;
    }
  ls->dropped++;
  return -1;
}

/* ---- service manager (systemd) ---- */

int sdnotify_open(const char *addr)
{
  struct sockaddr_un sun;
  size_t len;

  if(addr == NULL || (addr[0] != '/' && addr[0] != '@'))
    {
      errno = addr == NULL || addr[0] == '\0' ? EINVAL : EAFNOSUPPORT;
      return -1;
    }
  len = strlen(addr);
  if(len < 2 || len > sizeof(sun.sun_path) ||
     (addr[0] == '/' && len == sizeof(sun.sun_path)))
    {
      errno = EINVAL;
      return -1;
    }
  memset(&sun, 0, sizeof(sun));
  sun.sun_family = AF_UNIX;
  memcpy(sun.sun_path, addr, len);
  if(addr[0] == '@')
    {
      /* abstract: a leading NUL and exactly the name's bytes */
      sun.sun_path[0] = '\0';
      return dgram_connect(&sun, (socklen_t)(offsetof(struct sockaddr_un,
						      sun_path) + len));
    }
  return dgram_connect(&sun, (socklen_t)sizeof(sun));
}

int sdnotify_send(int fd, const char *msg)
{
  int flags = dgram_send_flags();
  if(fd < 0)
    {
      errno = EBADF;
      return -1;
    }
  return send(fd, msg, strlen(msg), flags) < 0 ? -1 : 0;
}

int journal_stream_match(const char *env, int fd)
{
  unsigned long long dev, ino;
  struct stat sb;
  char tail;

  if(env == NULL || sscanf(env, "%llu:%llu%c", &dev, &ino, &tail) != 2)
    return 0;
  if(fstat(fd, &sb) != 0)
    return 0;
  return (unsigned long long)sb.st_dev == dev &&
    (unsigned long long)sb.st_ino == ino;
}

/* ---- per-site rate limiting ---- */

void ratelim_init(ratelim_t *rl, unsigned int burst, time_t interval)
{
  memset(rl->site, 0, sizeof(rl->site));
  rl->burst = burst > 0 ? burst : 1;
  rl->interval = interval > 0 ? interval : 1;
  return;
}

/*
 * The site for key: its own slot, a free one, or one whose window ended
 * with nothing left to report (reused); else the shared overflow slot.
 * Probing starts at a hash of the pointer, so a lookup is usually one
 * comparison; the table is small enough that a full probe is cheap.
 */
static ratelim_site_t *ratelim_find(ratelim_t *rl, const void *key,
				    time_t now)
{
  ratelim_site_t *s, *reuse = NULL;
  size_t h = (size_t)((uintptr_t)key >> 3) * 2654435761U, i, j;

  for(i=0; i<RATELIM_SITES; i++)
    {
      j = (h + i) % RATELIM_SITES;
      s = &rl->site[j];
      if(s->key == key)
	return s;
      if(s->key == NULL)
	{
	  if(reuse == NULL)
	    reuse = s;
	  break;
	}
      if(reuse == NULL && s->suppressed == 0 && now - s->start >= rl->interval)
	reuse = s;
    }
  if(reuse == NULL)
    return &rl->site[RATELIM_SITES];
  /* key may still sit further along the probe chain: keep looking */
  for(; i<RATELIM_SITES; i++)
    {
      s = &rl->site[(h + i) % RATELIM_SITES];
      if(s->key == key)
	return s;
      if(s->key == NULL)
	break;
    }
  memset(reuse, 0, sizeof(*reuse));
  reuse->key = key;
  reuse->start = now;
  return reuse;
}

int ratelim_check(ratelim_t *rl, const void *key, const void *tag,
		  int level, time_t now, unsigned long *suppressed)
{
  ratelim_site_t *s = ratelim_find(rl, key, now);

  *suppressed = 0;
  if(s == &rl->site[RATELIM_SITES] && s->key == NULL)
    s->key = s;   /* mark the overflow slot as in use */
  if(now - s->start >= rl->interval || now < s->start)
    {
      *suppressed = s->suppressed;
      s->suppressed = 0;
      s->n = 0;
      s->start = now;
    }
  s->tag = tag;
  s->level = level;
  if(s->n < rl->burst)
    {
      s->n++;
      return 1;
    }
  s->suppressed++;
  return 0;
}

const ratelim_site_t *ratelim_expired(ratelim_t *rl, time_t now,
				      size_t *iter, unsigned long *suppressed)
{
  ratelim_site_t *s;
  while(*iter <= RATELIM_SITES)
    {
      s = &rl->site[(*iter)++];
      if(s->key != NULL && s->suppressed > 0 &&
	 (now - s->start >= rl->interval || now < s->start))
	{
	  *suppressed = s->suppressed;
	  s->suppressed = 0;
	  s->n = 0;
	  s->start = now;
	  return s;
	}
    }
  return NULL;
}

/* ---- CIDR networks ---- */

/* clear the bits of addr (len bytes) below a prefix of bits */
static void cidr_mask(uint8_t *addr, size_t len, int bits)
{
  size_t i;
  for(i = 0; i < len; i++)
    {
      if(bits >= 8)
	bits -= 8;
      else if(bits > 0)
	{
	  addr[i] &= (uint8_t)(0xff << (8 - bits));
	  bits = 0;
	}
      else
	addr[i] = 0;
    }
  return;
}

int cidr_parse(const char *s, cidr_t *out)
{
  char buf[INET6_ADDRSTRLEN + 1];
  const char *slash;
  size_t al;
  int max, bits = -1;

  if(s == NULL || out == NULL)
    return -1;
  memset(out, 0, sizeof(*out));
  if((slash = strchr(s, '/')) != NULL)
    {
      /* 1 to 3 decimal digits, nothing else: no sign, no spaces */
      if(!string_isdigits(slash + 1) || strlen(slash + 1) > 3)
	return -1;
      bits = atoi(slash + 1);
      al = (size_t)(slash - s);
    }
  else
    al = strlen(s);
  if(al == 0 || al >= sizeof(buf))
    return -1;
  memcpy(buf, s, al);
  buf[al] = '\0';
  if(strchr(buf, ':') != NULL)
    {
      if(inet_pton(AF_INET6, buf, out->addr) != 1)
	return -1;
      out->family = AF_INET6;
      max = 128;
    }
  else
    {
      if(inet_pton(AF_INET, buf, out->addr) != 1)
	return -1;
      out->family = AF_INET;
      max = 32;
    }
  if(bits < 0)
    bits = max;
  if(bits > max)
    return -1;
  /* an IPv4-mapped rule is the IPv4 rule: sources are matched that way */
  if(max == 128 && bits >= 96 &&
     memcmp(out->addr, "\0\0\0\0\0\0\0\0\0\0\xff\xff", 12) == 0)
    {
      memmove(out->addr, out->addr + 12, 4);
      memset(out->addr + 4, 0, 12);
      out->family = AF_INET;
      bits -= 96;
      max = 32;
    }
  out->bits = bits;
  cidr_mask(out->addr, (size_t)max / 8, bits);
  return 0;
}

/*
 * The address bytes of sa as matched: a v4-mapped IPv6 address becomes
 * IPv4.  Returns the family, or -1.
 */
static int sockaddr_addr(const struct sockaddr *sa, uint8_t *addr)
{
  const struct sockaddr_in6 *s6;
  static const uint8_t mapped[12] = {0,0,0,0,0,0,0,0,0,0,0xff,0xff};

  if(sa == NULL)
    return -1;
  if(sa->sa_family == AF_INET)
    {
      memcpy(addr, &((const struct sockaddr_in *)(const void *)sa)->sin_addr,
	     4);
      return AF_INET;
    }
  if(sa->sa_family != AF_INET6)
    return -1;
  s6 = (const struct sockaddr_in6 *)(const void *)sa;
  if(memcmp(s6->sin6_addr.s6_addr, mapped, 12) == 0)
    {
      memcpy(addr, s6->sin6_addr.s6_addr + 12, 4);
      return AF_INET;
    }
  memcpy(addr, s6->sin6_addr.s6_addr, 16);
  return AF_INET6;
}

int cidr_match(const cidr_t *c, const struct sockaddr *sa)
{
  uint8_t a[16];
  int fam;

  if(c == NULL || (fam = sockaddr_addr(sa, a)) != c->family)
    return 0;
  cidr_mask(a, fam == AF_INET ? 4 : 16, c->bits);
  return memcmp(a, c->addr, fam == AF_INET ? 4 : 16) == 0;
}

int cidr_of_sockaddr(const struct sockaddr *sa, int v6bits, cidr_t *out)
{
  int fam;

  if(out == NULL || v6bits < 0 || v6bits > 128)
    return -1;
  memset(out, 0, sizeof(*out));
  if((fam = sockaddr_addr(sa, out->addr)) < 0)
    return -1;
  out->family = fam;
  out->bits = fam == AF_INET ? 32 : v6bits;
  cidr_mask(out->addr, fam == AF_INET ? 4 : 16, out->bits);
  return 0;
}

int cidr_cmp(const cidr_t *a, const cidr_t *b)
{
  if(a->family != b->family)
    return a->family < b->family ? -1 : 1;
  if(a->bits != b->bits)
    return a->bits < b->bits ? -1 : 1;
  return memcmp(a->addr, b->addr, sizeof(a->addr));
}

int sockaddr_is_loopback(const struct sockaddr *sa)
{
  static const uint8_t one[16] = {0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,1};
  uint8_t a[16];
  int fam;

  if((fam = sockaddr_addr(sa, a)) == AF_INET)
    return a[0] == 127;
  return fam == AF_INET6 && memcmp(a, one, 16) == 0;
}

/* an RFC 9110 token character */
static int http_tchar(int c)
{
  if((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
     (c >= '0' && c <= '9'))
    return 1;
  return c != '\0' && strchr("!#$%&'*+-.^_`|~", c) != NULL;
}

/* does the comma-separated list v (vlen bytes) hold token tok? */
static int http_list_has(const char *v, size_t vlen, const char *tok)
{
  size_t i = 0, s, e, tl = strlen(tok);
  while(i < vlen)
    {
      while(i < vlen && (v[i] == ' ' || v[i] == '\t' || v[i] == ','))
	i++;
      s = i;
      while(i < vlen && v[i] != ',')
	i++;
      e = i;
      while(e > s && (v[e-1] == ' ' || v[e-1] == '\t'))
	e--;
      if(e - s == tl && ascii_strncasecmp(v + s, tok, tl) == 0)
	return 1;
    }
  return 0;
}

/*
 * Parse one header field line (without its line end) into req's
 * connection flags; -1 when malformed or announcing a body.
 */
static int http_field(const char *l, size_t n, int *conn_close,
		      int *conn_ka)
{
  size_t i = 0, vs, k;
  unsigned long cl = 0;

  while(i < n && http_tchar((unsigned char)l[i]))
    i++;
  if(i == 0 || i >= n || l[i] != ':')
    return -1; /* also obs-fold: a line starting with white space */
  vs = i + 1;
  while(vs < n && (l[vs] == ' ' || l[vs] == '\t'))
    vs++;
  for(k = vs; k < n; k++)
    if(((unsigned char)l[k] < 0x20 && l[k] != '\t') || l[k] == 0x7f)
      return -1;
  if(i == 10 && ascii_strncasecmp(l, "connection", 10) == 0)
    {
      if(http_list_has(l + vs, n - vs, "close"))
	*conn_close = 1;
      if(http_list_has(l + vs, n - vs, "keep-alive"))
	*conn_ka = 1;
    }
  else if(i == 14 && ascii_strncasecmp(l, "content-length", 14) == 0)
    {
      for(k = vs; k < n && l[k] != ' ' && l[k] != '\t'; k++)
	{
	  if(l[k] < '0' || l[k] > '9')
	    return -1;
	  cl = cl * 10 + (unsigned long)(l[k] - '0');
	  if(cl > 0)
	    return -1;
	}
      if(k == vs)
	return -1;
    }
  else if(i == 17 && ascii_strncasecmp(l, "transfer-encoding", 17) == 0)
    return -1;
  return 0;
}

/* the request line: METHOD SP target SP HTTP/1.x */
static int http_reqline(const char *l, size_t n, http_req_t *req)
{
  size_t i = 0, ts, te, pe;

  while(i < n && http_tchar((unsigned char)l[i]))
    i++;
  if(i == 0 || i >= HTTP_METHOD_MAX || i >= n || l[i] != ' ')
    return -1;
  memcpy(req->method, l, i);
  req->method[i] = '\0';
  ts = ++i;
  while(i < n && l[i] != ' ')
    {
      if((unsigned char)l[i] <= 0x20 || (unsigned char)l[i] >= 0x7f)
	return -1;
      i++;
    }
  te = i;
  if(te == ts || l[ts] != '/' || i >= n)
    return -1;
  for(pe = ts; pe < te && l[pe] != '?'; pe++)
    ;
  if(pe - ts >= HTTP_PATH_MAX)
    return -1;
  memcpy(req->path, l + ts, pe - ts);
  req->path[pe - ts] = '\0';
  i++;
  if(n - i != 8 || memcmp(l + i, "HTTP/1.", 7) != 0 ||
     (l[i+7] != '0' && l[i+7] != '1'))
    return -1;
  req->minor = l[i+7] - '0';
  return 0;
}

long http_req_parse(const char *buf, size_t len, size_t max,
		    http_req_t *req)
{
  size_t pos = 0, eol, n, lines = 0;
  int conn_close = 0, conn_ka = 0;

  if(len > max)
    len = max;
  memset(req, 0, sizeof(*req));
  for(;;)
    {
      const char *nl = memchr(buf + pos, '\n', len - pos);
      if(nl == NULL)
	return len >= max ? HTTP_REQ_TOOBIG : HTTP_REQ_MORE;
      eol = (size_t)(nl - buf);
      n = eol - pos;
      if(n > 0 && buf[eol-1] == '\r')
	n--;
      if(memchr(buf + pos, '\0', n) != NULL ||
	 memchr(buf + pos, '\r', n) != NULL)
	return HTTP_REQ_BAD;
      if(lines == 0)
	{
	  if(http_reqline(buf + pos, n, req) != 0)
	    return HTTP_REQ_BAD;
	}
      else if(n == 0)
	break;
      else if(http_field(buf + pos, n, &conn_close, &conn_ka) != 0)
	return HTTP_REQ_BAD;
      lines++;
      pos = eol + 1;
    }
  if(conn_close)
    req->keepalive = 0;
  else if(req->minor == 1 || conn_ka)
    req->keepalive = 1;
  return (long)(eol + 1);
}

/*
 * The length of the valid UTF-8 sequence at s (1..4), or 0 if s does not
 * start one (stray continuation, overlong form, surrogate, > U+10FFFF,
 * truncated).
 */
static size_t utf8_seqlen(const uint8_t *s, size_t len)
{
  uint8_t c = s[0];
  size_t n, i;
  uint8_t lo = 0x80, hi = 0xbf;

  if(c < 0x80)
    return 1;
  if(c >= 0xc2 && c <= 0xdf)
    n = 2;
  else if(c >= 0xe0 && c <= 0xef)
    {
      n = 3;
      if(c == 0xe0) lo = 0xa0;       /* overlong */
      else if(c == 0xed) hi = 0x9f;  /* surrogates */
    }
  else if(c >= 0xf0 && c <= 0xf4)
    {
      n = 4;
      if(c == 0xf0) lo = 0x90;       /* overlong */
      else if(c == 0xf4) hi = 0x8f;  /* above U+10FFFF */
    }
  else
    return 0;
  if(len < n)
    return 0;
  if(s[1] < lo || s[1] > hi)
    return 0;
  for(i = 2; i < n; i++)
    if(s[i] < 0x80 || s[i] > 0xbf)
      return 0;
  return n;
}

/*
 * The loop shared by json_escape, html_escape and prom_label_escape:
 * valid UTF-8 passes through, each byte that does not start a valid
 * sequence becomes bad (U+FFFD in the output's syntax), and bytes for
 * which special() returns a piece (of *n bytes, possibly built in buf)
 * are replaced by it.  Same return and truncation rules as json_escape.
 */
static size_t escape_utf8(char *dst, size_t dstlen, const uint8_t *src,
			  size_t len, const char *bad,
			  const char *(*special)(uint8_t c, char *buf,
						 size_t *n))
{
  char buf[8];
  size_t i = 0, out = 0, n, k, end = 0;
  int full = 0;
  const char *piece;

  while(i < len)
    {
      if((piece = special(src[i], buf, &n)) != NULL)
	i++;
      else if((n = utf8_seqlen(src + i, len - i)) == 0)
	{
	  piece = bad; n = strlen(bad);
	  i++;
	}
      else
	{
	  piece = (const char *)src + i;
	  i += n;
	}
      if(full == 0 && out + n < dstlen)
	{
	  for(k = 0; k < n; k++)
	    dst[out + k] = piece[k];
	  end = out + n;
	}
      else
	full = 1;
      out += n;
    }
  if(dstlen > 0)
    dst[end] = '\0';
  return out;
}

/* json_escape's special bytes: quote, backslash, controls */
static const char *json_special(uint8_t c, char *esc, size_t *n)
{
  static const char hex[] = "0123456789abcdef";
  if(c == '"' || c == '\\')
    {
      esc[0] = '\\'; esc[1] = (char)c; *n = 2;
      return esc;
    }
  if(c >= 0x20 && c != 0x7f)
    return NULL;
  esc[0] = '\\';
  *n = 2;
  switch(c)
    {
    case '\n': esc[1] = 'n'; break;
    case '\r': esc[1] = 'r'; break;
    case '\t': esc[1] = 't'; break;
    case '\b': esc[1] = 'b'; break;
    case '\f': esc[1] = 'f'; break;
    default:
      esc[1] = 'u'; esc[2] = '0'; esc[3] = '0';
      esc[4] = hex[c >> 4]; esc[5] = hex[c & 15]; *n = 6;
      break;
    }
  return esc;
}

size_t json_escape(char *dst, size_t dstlen, const uint8_t *src,
		   size_t len)
{
  return escape_utf8(dst, dstlen, src, len, "\\ufffd", json_special);
}

/* ---- PROXY protocol header ---- */

static const uint8_t proxy_v2_sig[12] = {
  0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A
};

uint32_t crc32c(uint32_t crc, const uint8_t *buf, size_t len)
{
  size_t i;
  int k;
  crc = ~crc;
  for(i=0; i<len; i++)
    {
      crc ^= buf[i];
      for(k=0; k<8; k++)
	crc = (crc >> 1) ^ (0x82F63B78U & (0U - (crc & 1U)));
    }
  return ~crc;
}

/* a v1 port: 1 to 5 digits, no leading zero, at most 65535; or -1 */
static int proxy_v1_port(const char *s)
{
  size_t n = strlen(s), i;
  long v = 0;
  if(n == 0 || n > 5 || (n > 1 && s[0] == '0'))
    return -1;
  for(i=0; i<n; i++)
    {
      if(s[i] < '0' || s[i] > '9')
	return -1;
      v = v * 10 + (s[i] - '0');
    }
  return v <= 65535 ? (int)v : -1;
}

/* split line at single spaces into at most max fields; the count or -1 */
static int proxy_v1_split(char *line, char **f, int max)
{
  int n = 0;
  char *p = line;
  for(;;)
    {
      if(n == max || *p == '\0' || *p == ' ')
	return -1; /* too many fields, or an empty one */
      f[n++] = p;
      if((p = strchr(p, ' ')) == NULL)
	return n;
      *p++ = '\0';
    }
}

/* a version 1 line whose bytes so far match "PROXY " */
static long proxy_v1_parse(const uint8_t *buf, size_t len, proxy_hdr_t *out)
{
  static const char pfx[] = "PROXY ";
  char line[PROXY_V1_MAX + 1], *f[5];
  size_t i, end = len < PROXY_V1_MAX ? len : PROXY_V1_MAX;
  int fam, sport, dport, n;

  for(i=0; i<end && buf[i] != '\n'; i++)
    {
      if(i < 6 && buf[i] != (uint8_t)pfx[i])
	return PROXY_E_SIG;
      if(buf[i] == '\0')
	return PROXY_E_V1;
    }
  if(i == end)
    return len >= PROXY_V1_MAX ? PROXY_E_LONG : PROXY_MORE;
  if(i < 7 || buf[i-1] != '\r')
    return PROXY_E_V1;
  memcpy(line, buf + 6, i - 7);
  line[i - 7] = '\0';
  memset(out, 0, sizeof(*out));
  out->version = 1;
  if(strcmp(line, "UNKNOWN") == 0 || strncmp(line, "UNKNOWN ", 8) == 0)
    {
      out->cmd = PROXY_CMD_LOCAL;
      return (long)i + 1;
    }
  if((n = proxy_v1_split(line, f, 5)) != 5)
    return PROXY_E_V1;
  if(strcmp(f[0], "TCP4") == 0)
    fam = AF_INET;
  else if(strcmp(f[0], "TCP6") == 0)
    fam = AF_INET6;
  else
    return PROXY_E_V1;
  if((sport = proxy_v1_port(f[3])) < 0 || (dport = proxy_v1_port(f[4])) < 0)
    return PROXY_E_V1;
  /* sockaddr_fromstr takes either family: insist on the one named */
  if(strchr(f[1], ':') != NULL || strchr(f[2], ':') != NULL)
    {
      if(fam != AF_INET6)
	return PROXY_E_V1;
    }
  else if(fam != AF_INET)
    return PROXY_E_V1;
  if(sockaddr_fromstr(f[1], sport, &out->src, &out->srclen) != fam ||
     sockaddr_fromstr(f[2], dport, &out->dst, &out->dstlen) != fam)
    return PROXY_E_V1;
  out->cmd = PROXY_CMD_PROXY;
  return (long)i + 1;
}

/* fill ss from a v2 address block: addresses then ports, network order */
static void proxy_v2_addr(int fam, const uint8_t *a, const uint8_t *port,
			  struct sockaddr_storage *ss, socklen_t *sl)
{
  struct sockaddr_in *s4 = (struct sockaddr_in *)ss;
  struct sockaddr_in6 *s6 = (struct sockaddr_in6 *)ss;
  memset(ss, 0, sizeof(*ss));
  if(fam == AF_INET)
    {
      s4->sin_family = AF_INET;
      memcpy(&s4->sin_addr, a, 4);
      memcpy(&s4->sin_port, port, 2);
      *sl = sizeof(*s4);
    }
  else
    {
      s6->sin6_family = AF_INET6;
      memcpy(&s6->sin6_addr, a, 16);
      memcpy(&s6->sin6_port, port, 2);
      *sl = sizeof(*s6);
    }
  return;
}

/* the TLVs in buf[off..total): they must tile it; CRC32C must match */
static long proxy_v2_tlvs(const uint8_t *buf, size_t off, size_t total)
{
  uint8_t copy[PROXY_HDR_MAX];
  size_t tl;
  while(off < total)
    {
      if(total - off < 3)
	return PROXY_E_TLV;
      tl = bytes_ntohs(buf + off + 1);
      if(total - off - 3 < tl)
	return PROXY_E_TLV;
      if(buf[off] == 0x03) /* PP2_TYPE_CRC32C over the header, field 0 */
	{
	  if(tl != 4)
	    return PROXY_E_TLV;
	  memcpy(copy, buf, total);
	  memset(copy + off + 3, 0, 4);
	  if(crc32c(0, copy, total) != bytes_ntohl(buf + off + 3))
	    return PROXY_E_TLV;
	}
      off += 3 + tl;
    }
  return 0;
}

/* a version 2 header whose bytes so far match the signature */
static long proxy_v2_parse(const uint8_t *buf, size_t len, proxy_hdr_t *out)
{
  size_t i, total, alen;
  int cmd, fam;
  long rc;

  for(i=0; i<len && i<sizeof(proxy_v2_sig); i++)
    if(buf[i] != proxy_v2_sig[i])
      return PROXY_E_SIG;
  if(len < 16)
    return PROXY_MORE;
  if((buf[12] >> 4) != 2 || (cmd = buf[12] & 0x0f) > PROXY_CMD_PROXY)
    return PROXY_E_VERSION;
  total = 16 + (size_t)bytes_ntohs(buf + 14);
  if(total > PROXY_HDR_MAX)
    return PROXY_E_LONG;
  if(len < total)
    return PROXY_MORE;
  /* LOCAL ignores the addresses, but they still come before any TLV */
  switch(buf[13] >> 4)
    {
    case 0: alen = 0; fam = AF_UNSPEC; break;
    case 1: alen = 12; fam = AF_INET; break;
    case 2: alen = 36; fam = AF_INET6; break;
    case 3: alen = 216; fam = AF_UNIX; break;
    default: return PROXY_E_FAMILY;
    }
  if(cmd == PROXY_CMD_PROXY &&
     ((fam != AF_INET && fam != AF_INET6) || (buf[13] & 0x0f) != 1))
    return PROXY_E_FAMILY;
  if(total - 16 < alen)
    return PROXY_E_ADDRLEN;
  if((rc = proxy_v2_tlvs(buf, 16 + alen, total)) != 0)
    return rc;
  memset(out, 0, sizeof(*out));
  out->version = 2;
  out->cmd = cmd;
  if(cmd == PROXY_CMD_PROXY && fam == AF_INET)
    {
      proxy_v2_addr(fam, buf + 16, buf + 24, &out->src, &out->srclen);
      proxy_v2_addr(fam, buf + 20, buf + 26, &out->dst, &out->dstlen);
    }
  else if(cmd == PROXY_CMD_PROXY)
    {
      proxy_v2_addr(fam, buf + 16, buf + 48, &out->src, &out->srclen);
      proxy_v2_addr(fam, buf + 32, buf + 50, &out->dst, &out->dstlen);
    }
  return (long)total;
}

long proxy_hdr_parse(const uint8_t *buf, size_t len, proxy_hdr_t *out)
{
  if(len == 0)
    return PROXY_MORE;
  if(buf[0] == 'P')
    return proxy_v1_parse(buf, len, out);
  if(buf[0] == proxy_v2_sig[0])
    return proxy_v2_parse(buf, len, out);
  return PROXY_E_SIG;
}

const char *proxy_hdr_strerror(long rc)
{
  switch(rc)
    {
    case PROXY_E_SIG:     return "no PROXY protocol signature";
    case PROXY_E_LONG:    return "PROXY header too long";
    case PROXY_E_V1:      return "malformed PROXY v1 line";
    case PROXY_E_VERSION: return "unknown PROXY v2 version or command";
    case PROXY_E_FAMILY:  return "PROXY v2 family is not TCP over IPv4/IPv6";
    case PROXY_E_ADDRLEN: return "PROXY v2 header shorter than its addresses";
    case PROXY_E_TLV:     return "bad PROXY v2 TLV (length or CRC32C)";
    }
  return rc > 0 ? "complete" : "incomplete PROXY header";
}

static const char *html_special(uint8_t c, char *buf, size_t *n)
{
  const char *p;
  (void)buf;
  switch(c)
    {
    case '<':  p = "&lt;"; break;
    case '>':  p = "&gt;"; break;
    case '&':  p = "&amp;"; break;
    case '"':  p = "&quot;"; break;
    case '\'': p = "&#39;"; break;
    default:
      if(c < 0x20 || c == 0x7f)
	{
	  /* controls have no business in a name: show them as U+FFFD */
	  *n = 3;
	  return "\xef\xbf\xbd";
	}
      return NULL;
    }
  *n = strlen(p);
  return p;
}

size_t html_escape(char *dst, size_t dstlen, const uint8_t *src, size_t len)
{
  return escape_utf8(dst, dstlen, src, len, "\xef\xbf\xbd", html_special);
}

static const char *prom_special(uint8_t c, char *buf, size_t *n)
{
  (void)buf;
  *n = 2;
  switch(c)
    {
    case '\\': return "\\\\";
    case '"':  return "\\\"";
    case '\n': return "\\n";
    }
  return NULL;
}

size_t prom_label_escape(char *dst, size_t dstlen, const uint8_t *src,
			 size_t len)
{
  return escape_utf8(dst, dstlen, src, len, "\xef\xbf\xbd", prom_special);
}

/* ---- typed records (tlv_*) ---- */

void tlv_put(tlv_w_t *w, const void *d, size_t n)
{
  uint8_t *np;
  size_t cap;
  if(w->err || n == 0)
    return;
  if(n > SIZE_MAX / 4 - w->len)
    {
      w->err = 1;
      return;
    }
  if(w->len + n > w->cap)
    {
      cap = w->cap > 0 ? w->cap : 65536;
      while(cap < w->len + n)
	cap *= 2;
      if((np = realloc(w->p, cap)) == NULL)
	{
	  w->err = 1;
	  return;
	}
      w->p = np;
      w->cap = cap;
    }
  memcpy(w->p + w->len, d, n);
  w->len += n;
  return;
}

size_t tlv_begin(tlv_w_t *w, uint16_t type)
{
  uint8_t b[TLV_HDRLEN];
  size_t at = w->len;
  bytes_htons(b, type);
  memset(b + 2, 0, 4);
  tlv_put(w, b, sizeof(b));
  return at;
}

void tlv_end(tlv_w_t *w, size_t at)
{
  size_t n;
  if(w->err)
    return;
  n = w->len - at - TLV_HDRLEN;
  if(n > UINT32_MAX)
    {
      w->err = 1;
      return;
    }
  bytes_htonl(w->p + at + 2, (uint32_t)n);
  return;
}

void tlv_field(tlv_w_t *w, uint16_t tag, const void *d, size_t n)
{
  uint8_t b[TLV_HDRLEN];
  if(n > UINT32_MAX)
    {
      w->err = 1;
      return;
    }
  bytes_htons(b, tag);
  bytes_htonl(b + 2, (uint32_t)n);
  tlv_put(w, b, sizeof(b));
  tlv_put(w, d, n);
  return;
}

/* the most common field: header and value in one append */
void tlv_field_uint(tlv_w_t *w, uint16_t tag, uint64_t v, size_t width)
{
  uint8_t b[TLV_HDRLEN + 8];
  size_t i;
  if(width > 8)
    width = 8;
  bytes_htons(b, tag);
  bytes_htonl(b + 2, (uint32_t)width);
  for(i=0; i<width; i++)
    b[TLV_HDRLEN + width - 1 - i] = (uint8_t)(v >> (8 * i));
  tlv_put(w, b, TLV_HDRLEN + width);
  return;
}

void tlv_field_str(tlv_w_t *w, uint16_t tag, const char *s)
{
  if(s != NULL)
    tlv_field(w, tag, s, strlen(s));
  return;
}

int tlv_next(tlv_r_t *r, uint16_t *type, const uint8_t **val,
	     uint32_t *vlen)
{
  const uint8_t *p;
  uint32_t n;
  if(r->off >= r->len)
    return 0;
  if(r->len - r->off < TLV_HDRLEN)
    {
      r->off = r->len;
      return -1;
    }
  p = r->p + r->off;
  n = bytes_ntohl(p + 2);
  if(n > r->len - r->off - TLV_HDRLEN)
    {
      r->off = r->len;
      return -1;
    }
  *type = bytes_ntohs(p);
  *val = p + TLV_HDRLEN;
  *vlen = n;
  r->off += TLV_HDRLEN + (size_t)n;
  return 1;
}

int tlv_uint(const uint8_t *val, uint32_t vlen, size_t width, uint64_t *v)
{
  size_t i;
  if(vlen != width || width == 0 || width > 8)
    return -1;
  *v = 0;
  for(i=0; i<width; i++)
    *v = (*v << 8) | val[i];
  return 0;
}

static uint64_t tlv_load_width(const void *p, uint8_t width)
{
  uint8_t u8;
  uint32_t u32;
  uint64_t u64;
  switch(width)
    {
    case 1: memcpy(&u8, p, 1); return u8;
    case 4: memcpy(&u32, p, 4); return u32;
    default: memcpy(&u64, p, 8); return u64;
    }
}

static void tlv_store_width(void *p, uint8_t width, uint64_t v)
{
  uint8_t u8 = (uint8_t)v;
  uint32_t u32 = (uint32_t)v;
  switch(width)
    {
    case 1: memcpy(p, &u8, 1); break;
    case 4: memcpy(p, &u32, 4); break;
    default: memcpy(p, &v, 8); break;
    }
  return;
}

void tlv_table_put(tlv_w_t *w, const tlv_desc_t *t, size_t n,
		   const void *obj)
{
  size_t i;
  for(i=0; i<n; i++)
    tlv_field_uint(w, t[i].tag,
		   tlv_load_width((const uint8_t *)obj + t[i].off,
				  t[i].width), t[i].width);
  return;
}

void tlv_table_defaults(const tlv_desc_t *t, size_t n, void *obj)
{
  size_t i;
  for(i=0; i<n; i++)
    if(!(t[i].flags & TLVF_KEEP))
      tlv_store_width((uint8_t *)obj + t[i].off, t[i].width, t[i].def);
  return;
}

int tlv_table_get(const tlv_desc_t *t, size_t n, void *obj, uint16_t tag,
		  const uint8_t *val, uint32_t vlen, uint64_t now,
		  const char **bad)
{
  uint64_t v;
  size_t i;
  for(i=0; i<n; i++)
    if(t[i].tag == tag)
      break;
  if(i == n)
    return 0;
  if(tlv_uint(val, vlen, t[i].width, &v) != 0 || v < t[i].min ||
     v > t[i].max || ((t[i].flags & TLVF_PAST) && v > now))
    {
      *bad = t[i].name;
      return -1;
    }
  tlv_store_width((uint8_t *)obj + t[i].off, t[i].width, v);
  return 1;
}
