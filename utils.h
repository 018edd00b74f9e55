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

#endif /* UTILS_H */
