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

#endif /* UTILS_H */
