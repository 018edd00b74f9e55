/*
 * utils.h: small helpers shared by sc_remoted and its tests.  Nothing here
 * knows about sc_remoted's objects or protocols.
 */
#ifndef UTILS_H
#define UTILS_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>

/* big-endian (network order) encode/decode into byte buffers */
void     bytes_htons(uint8_t *b, uint16_t v);
void     bytes_htonl(uint8_t *b, uint32_t v);
uint16_t bytes_ntohs(const uint8_t *b);
uint32_t bytes_ntohl(const uint8_t *b);

/* serial-number comparison of u32 counters: <0, 0, >0 as (int32)(a-b) */
int      serial_cmp(uint32_t a, uint32_t b);

/*
 * Parse like strtol(s, &end, 0): leading whitespace and sign allowed,
 * 0x hex and leading-0 octal, trailing junk accepted.  Returns 0 and sets
 * *out when at least one digit was consumed and there was no overflow,
 * -1 otherwise.
 */
int      string_tolong(const char *s, long *out);

/* 1 if s is non-empty and every char is an ASCII digit */
int      string_isdigits(const char *s);

/* fd flags: 0 on success, -1 on failure (errno set) */
int      fd_nonblock(int fd);
int      fd_cloexec(int fd);

/* current times: wall clock (for logs, arrival stamps) and monotonic */
void     time_wall(struct timeval *tv);
void     time_mono(struct timeval *tv);
/* a - b in milliseconds (may be negative) */
int64_t  timeval_diff_ms(const struct timeval *a, const struct timeval *b);

/*
 * Address text without port: inet_ntop of an AF_INET/AF_INET6 sockaddr.
 * Returns buf, or NULL for another family or a too-small buffer.
 */
const char *sockaddr_tostr(const struct sockaddr *sa, char *buf, size_t len);
/* the port of an AF_INET/AF_INET6 sockaddr in host order, or -1 */
int      sockaddr_port(const struct sockaddr *sa);

/*
 * Parse a literal IPv4 or IPv6 address (no names, no brackets) into ss
 * with the given port.  Returns the address family, or -1 if it is not a
 * literal.
 */
int      sockaddr_fromstr(const char *addr, int port,
			  struct sockaddr_storage *ss, socklen_t *sslen);

/*
 * Read a whole file into a NUL-terminated heap buffer.  Returns 0 and sets
 * *buf (caller frees) and *len, or -1 with errno set.
 */
int      file_read_all(const char *path, char **buf, size_t *len);

/* case-insensitive ASCII compare of at most n bytes, like strncasecmp */
int      ascii_strncasecmp(const char *a, const char *b, size_t n);


/* ---- syslog datagrams ---- */

/*
 * Format one syslog(3)-style datagram as glibc sends it to /dev/log:
 * "<pri>Mmm dd hh:mm:ss ident[pid]: msg" (RFC 3164; local time, no
 * trailing newline).  Returns the length written (truncated to len-1).
 */
size_t   syslog_format(char *buf, size_t len, int pri, time_t t,
		       const char *ident, long pid, const char *msg);

/*
 * A non-blocking datagram connection to a local syslog socket.  A send
 * that would block, or any send while the socket is unreachable, is
 * dropped and counted; reconnection is tried at most once a second.
 */
typedef struct logsock
{
  int            fd;        /* -1 while not connected */
  const char    *path;      /* e.g. "/dev/log"; not copied */
  time_t         next_try;  /* earliest (caller's clock) reconnect attempt */
  unsigned long  dropped;   /* messages lost since the caller last reset */
  int            err;       /* errno of the last failure, 0 after success */
} logsock_t;

void     logsock_init(logsock_t *ls, const char *path);
/* connect now if not connected; 0 or -1 (errno and ls->err set) */
int      logsock_connect(logsock_t *ls, time_t now);
/* 0 if the datagram was handed to the socket, -1 if it was dropped */
int      logsock_send(logsock_t *ls, const char *buf, size_t len, time_t now);
void     logsock_close(logsock_t *ls);

/* ---- service manager (systemd) ---- */

/*
 * Open a non-blocking datagram socket connected to NOTIFY_SOCKET's value
 * (a path, or '@' for an abstract name).  Returns the fd, or -1 with
 * errno set (EAFNOSUPPORT for an unsupported address form, EINVAL for an
 * empty or too long one, or connect's error: ENOENT, ECONNREFUSED...).
 */
int      sdnotify_open(const char *addr);
/* send one notification; 0, or -1 with errno set (never blocks) */
int      sdnotify_send(int fd, const char *msg);
/*
 * 1 if JOURNAL_STREAM's "dev:inode" value names the file open on fd (the
 * service manager connected it to the journal), else 0.
 */
int      journal_stream_match(const char *env, int fd);

/* ---- per-site rate limiting ---- */

/*
 * A bounded table of rate-limited sites, each keyed by a pointer (e.g. a
 * format string).  A site may pass `burst` messages per `interval`
 * seconds; the rest are counted as suppressed.  Sites the table has no
 * room for share one overflow slot.  No allocation.
 */
#define RATELIM_SITES 64

typedef struct ratelim_site
{
  const void    *key;         /* NULL: free */
  const void    *tag;         /* caller's data, returned with the key */
  int            level;       /* caller's data */
  time_t         start;       /* start of the current window */
  unsigned int   n;           /* messages passed in this window */
  unsigned long  suppressed;  /* messages refused in this window */
} ratelim_site_t;

typedef struct ratelim
{
  ratelim_site_t site[RATELIM_SITES + 1]; /* the last is the overflow */
  unsigned int   burst;
  time_t         interval;
} ratelim_t;

void     ratelim_init(ratelim_t *rl, unsigned int burst, time_t interval);
/*
 * A message from site key at time now: returns 1 if it may be emitted,
 * 0 if it is suppressed.  When it returns 1 after a window in which
 * messages were suppressed, *suppressed is that count (report it first);
 * otherwise 0.
 */
int      ratelim_check(ratelim_t *rl, const void *key, const void *tag,
		       int level, time_t now, unsigned long *suppressed);
/*
 * Visit sites whose window has ended with suppressed messages: returns
 * such a site (its count in *suppressed, then reset) or NULL when none
 * remain.  *iter starts at 0.
 */
const ratelim_site_t *ratelim_expired(ratelim_t *rl, time_t now,
				      size_t *iter, unsigned long *suppressed);
/*
 * An IPv4 or IPv6 network for source allow-lists.  addr holds 4 or 16
 * bytes in network order with the host bits cleared.
 */
typedef struct cidr
{
  int      family;     /* AF_INET or AF_INET6 */
  int      bits;       /* prefix length: 0..32 or 0..128 */
  uint8_t  addr[16];
} cidr_t;

/*
 * Parse "addr" or "addr/len" with a literal IPv4 or IPv6 address; a bare
 * address is a /32 or /128.  Host bits below the prefix are cleared.  An
 * IPv4-mapped IPv6 network of /96 or longer becomes the IPv4 network.
 * Returns 0, or -1 when malformed (then *out is unspecified).
 */
int      cidr_parse(const char *s, cidr_t *out);

/*
 * 1 if the address of sa (AF_INET or AF_INET6) lies in c, else 0.  An
 * IPv4-mapped IPv6 address (::ffff:a.b.c.d) is matched as IPv4, so IPv4
 * rules apply to IPv4 clients of a dual-stack socket.
 */
int      cidr_match(const cidr_t *c, const struct sockaddr *sa);

/*
 * The network of sa's address for per-source accounting: an IPv4 (or
 * IPv4-mapped) address as a /32, an IPv6 address masked to v6bits.
 * Returns 0, or -1 for another family.
 */
int      cidr_of_sockaddr(const struct sockaddr *sa, int v6bits, cidr_t *out);

/* order of two networks (family, bits, address) for trees: <0, 0, >0 */
int      cidr_cmp(const cidr_t *a, const cidr_t *b);

/* 1 if sa is a loopback address: 127.0.0.0/8, ::1, or v4-mapped 127/8 */
int      sockaddr_is_loopback(const struct sockaddr *sa);
/*
 * An HTTP/1.x request head (request line and header fields, no body).
 * http_req_parse() looks at the bytes received so far on a connection:
 * it returns the length of the complete head (through the blank line)
 * and fills *req, HTTP_REQ_MORE when the head is not complete yet and
 * fits in max bytes, HTTP_REQ_TOOBIG when it does not, or HTTP_REQ_BAD
 * for a malformed head (bad request line, version other than 1.0/1.1,
 * bad header field, a body announced with Content-Length > 0 or
 * Transfer-Encoding: this parser reads no bodies).  Lines may end in
 * CRLF or LF.  The path is the request target up to '?', which must
 * start with '/'.  keepalive follows the version's default (1.1: yes,
 * 1.0: no) unless a Connection header says close or keep-alive.
 */
#define HTTP_REQ_MORE   0
#define HTTP_REQ_BAD    (-1)
#define HTTP_REQ_TOOBIG (-2)
#define HTTP_METHOD_MAX 16
#define HTTP_PATH_MAX   256
typedef struct http_req
{
  char     method[HTTP_METHOD_MAX];
  char     path[HTTP_PATH_MAX];
  int      minor;          /* HTTP/1.minor: 0 or 1 */
  int      keepalive;      /* 1 if the connection may stay open */
} http_req_t;
long     http_req_parse(const char *buf, size_t len, size_t max,
			http_req_t *req);

/*
 * Escape len bytes of src as the inside of a JSON string (no quotes):
 * '"' and '\\' get a backslash, control characters become \n, \t ... or
 * \u00XX, DEL becomes \u007f, and bytes that are not part of valid UTF-8
 * (overlong, surrogate, above U+10FFFF, truncated) each become \ufffd.
 * Writes at most dstlen - 1 bytes plus a NUL (never a partial escape);
 * returns the length the whole escape needs, like snprintf.  At most
 * 6 * len + 1 bytes are ever needed.
 */
size_t   json_escape(char *dst, size_t dstlen, const uint8_t *src,
		     size_t len);

/*
 * The PROXY protocol header (HAProxy's proxy-protocol.txt, versions 1 and
 * 2) that a trusted balancer puts before the first byte of a relayed
 * connection.  proxy_hdr_parse() looks at the bytes received so far:
 *   > 0            the length of the complete header; *out is filled
 *   PROXY_MORE     not complete yet; every byte given belongs to the
 *                  header, so the caller may consume them all and read on
 *   < 0            one of the PROXY_E_ errors (proxy_hdr_strerror)
 * Version 1: "PROXY TCP4|TCP6 src dst sport dport\r\n" (single spaces,
 * literal addresses of the named family, ports 0..65535 without leading
 * zeros) or "PROXY UNKNOWN...\r\n", at most PROXY_V1_MAX bytes.  Version
 * 2: the 12-byte signature, version 2, command LOCAL or PROXY, and for
 * PROXY a TCP over IPv4 or IPv6 address block; the TLVs after it must
 * tile the rest exactly and a CRC32C TLV, if present, must match.  The
 * whole header is at most PROXY_HDR_MAX bytes.  LOCAL (v2) and UNKNOWN
 * (v1) carry no address: cmd is PROXY_CMD_LOCAL.
 */
#define PROXY_V1_MAX      107
#define PROXY_HDR_MAX     1024
#define PROXY_MORE        0
#define PROXY_E_SIG       (-1)  /* neither signature */
#define PROXY_E_LONG      (-2)  /* longer than the limits above */
#define PROXY_E_V1        (-3)  /* malformed version 1 line */
#define PROXY_E_VERSION   (-4)  /* v2 version or command not known */
#define PROXY_E_FAMILY    (-5)  /* v2 family/transport not TCP over IP */
#define PROXY_E_ADDRLEN   (-6)  /* v2 length shorter than the addresses */
#define PROXY_E_TLV       (-7)  /* v2 TLVs do not tile, or bad CRC32C */
#define PROXY_CMD_LOCAL   0
#define PROXY_CMD_PROXY   1
typedef struct proxy_hdr
{
  int      version;      /* 1 or 2 */
  int      cmd;          /* PROXY_CMD_LOCAL or PROXY_CMD_PROXY */
  struct sockaddr_storage src, dst;  /* PROXY only, with the ports */
  socklen_t srclen, dstlen;
} proxy_hdr_t;
long     proxy_hdr_parse(const uint8_t *buf, size_t len, proxy_hdr_t *out);
const char *proxy_hdr_strerror(long rc);

/* CRC32C (Castagnoli), as the PROXY v2 CRC32C TLV uses; crc 0 to start */
uint32_t crc32c(uint32_t crc, const uint8_t *buf, size_t len);

/*
 * Escape len bytes of src for HTML text or a quoted attribute value:
 * < > & " ' become character references, control characters and bytes
 * that are not part of valid UTF-8 each become U+FFFD; the rest (valid
 * UTF-8) passes through.  Return and truncation rules as json_escape; at
 * most 6 * len + 1 bytes are ever needed.
 */
size_t   html_escape(char *dst, size_t dstlen, const uint8_t *src,
		     size_t len);

/*
 * Escape len bytes of src as a Prometheus text-format label value (no
 * quotes): backslash, '"' and newline get a backslash; bytes that are
 * not part of valid UTF-8 (which Prometheus rejects) become U+FFFD.
 * Return and truncation rules as json_escape; at most 3 * len + 1 bytes.
 */
size_t   prom_label_escape(char *dst, size_t dstlen, const uint8_t *src,
			   size_t len);

/*
 * Typed records (the live-upgrade state format).  A record and a field
 * have the same framing: u16 type (or tag), u32 length, then length bytes
 * (all big-endian).  A record's body is a sequence of fields.  The high
 * bit of a type or tag (TLV_MUST) marks an item a reader must understand:
 * a reader skips any item it does not know unless it carries that bit.
 */
#define TLV_MUST   0x8000
#define TLV_HDRLEN 6

typedef struct tlv_w
{
  uint8_t *p;
  size_t   len;
  size_t   cap;
  int      err;      /* out of memory or an item over 4 GiB: p is junk */
} tlv_w_t;

/* append raw bytes; set err instead of failing */
void     tlv_put(tlv_w_t *w, const void *d, size_t n);
/* open an item (record or field) whose length is patched by tlv_end:
 * returns the position to pass to tlv_end */
size_t   tlv_begin(tlv_w_t *w, uint16_t type);
void     tlv_end(tlv_w_t *w, size_t at);
/* a whole field: bytes, a big-endian unsigned of width 1/2/4/8, a string
 * (no NUL on the wire; nothing written for NULL) */
void     tlv_field(tlv_w_t *w, uint16_t tag, const void *d, size_t n);
void     tlv_field_uint(tlv_w_t *w, uint16_t tag, uint64_t v, size_t width);
void     tlv_field_str(tlv_w_t *w, uint16_t tag, const char *s);

/* a reader over len bytes at p (a state, or one record's body) */
typedef struct tlv_r
{
  const uint8_t *p;
  size_t   len;
  size_t   off;
} tlv_r_t;

/*
 * The next item: *type, its value at *val of *vlen bytes.  Returns 1, 0
 * at the end, -1 if the item overruns what is left (the reader then
 * stays at the end).
 */
int      tlv_next(tlv_r_t *r, uint16_t *type, const uint8_t **val,
		  uint32_t *vlen);
/* a big-endian unsigned of exactly width bytes (1/2/4/8): 0 and *v, or
 * -1 when vlen differs */
int      tlv_uint(const uint8_t *val, uint32_t vlen, size_t width,
		  uint64_t *v);

/*
 * A field table drives the fields that are plain unsigned values of an
 * object: each row says the tag, where the value lives (offset into the
 * object; its C type is an unsigned of the same width), its bounds and
 * its default (what a reader gives the field when the record lacks it).
 * TLVF_PAST: a tick no later than the reader's now (bounds still apply).
 */
#define TLVF_PAST 0x01
#define TLVF_KEEP 0x02  /* no default: the constructor's value stays */

typedef struct tlv_desc
{
  uint16_t    tag;
  uint8_t     width;   /* 1, 4 or 8 */
  uint8_t     flags;
  size_t      off;
  uint64_t    min;
  uint64_t    max;
  uint64_t    def;
  const char *name;
} tlv_desc_t;

/* write every field of the table from obj */
void     tlv_table_put(tlv_w_t *w, const tlv_desc_t *t, size_t n,
		       const void *obj);
/* give every field of the table its default */
void     tlv_table_defaults(const tlv_desc_t *t, size_t n, void *obj);
/*
 * Store field tag from val into obj if the table has it.  Returns 1 when
 * stored, 0 when the table does not have tag, -1 when the value is the
 * wrong width or out of bounds (*bad names the field).
 */
int      tlv_table_get(const tlv_desc_t *t, size_t n, void *obj,
		       uint16_t tag, const uint8_t *val, uint32_t vlen,
		       uint64_t now, const char **bad);

#endif /* UTILS_H */
