/*
 * sc_remoted: the controller that remote scamper instances (scamper -R)
 * dial into.  Each connected scamper is a vantage point (VP); local users
 * drive it through one unix socket per VP (-U, sc_attach -R) and through
 * one multiplexed unix socket for all VPs (-M, libscamperctrl).
 *
 * The wire protocols are specified in PROTOCOL.md; this file follows the
 * design in ARCHITECTURE.md:
 *
 *  - one event loop (epoll, kqueue, or select with -O select) over every
 *    fd; each fd is an fdev_t embedded in the object that owns it.
 *  - a hashed timer wheel of 1-second ticks; hot timers (rx_abort,
 *    keepalive) are lazy: they fire at their original deadline and re-arm
 *    against last_rx / last_tx, so per-frame work never touches a timer.
 *  - output is appended to chunked buffers and flushed once per loop
 *    iteration (one writev per peer), so ACKs for a batch of frames and
 *    relayed data coalesce into few packets.
 *  - reads land in one shared scratch buffer; a VP keeps heap memory only
 *    for a partial frame or queued output, so an idle VP costs a few
 *    hundred bytes.
 *  - an object torn down during dispatch is marked dead and freed only at
 *    the end of the iteration (deferred free), so pending events for it
 *    are skipped, never dereferenced after free.
 *
 * Departures from ARCHITECTURE.md: the mux channel record (mchan_t) is
 * merged into chan_t -- a mux channel is a chan_t that sits in two trees
 * (its VP's, by remote id, and its mux client's, by client id) -- so one
 * object, one teardown.  The unacked queue is a byte FIFO of serialized
 * frames rather than a list of messages: ACKs arrive strictly in order,
 * so releasing the oldest message is dropping its bytes from the head.
 * conn_t embeds the fd's registration (fdev_t) and carries the TLS
 * handshake: a VP's TLS handshake is a step of its connection
 * (conn_handshake, driven by vp_handshake) before the VP's HANDSHAKE
 * state, not a VP state of its own; only VP connections are ever TLS
 * (the -U, mux and HTTP clients are plain conn_t).  Besides the VP, the
 * -U, mux and HTTP clients have explicit states (uc_set_state,
 * mc_set_state, hc_set_state), and their DEAD state stands for the dead
 * flag; the upgrade records keep those states as the flag fields they
 * always had, so the state format did not change.  Flood log sites (one
 * line per refused connection) pass a second rate-limit table of one
 * line per second that -O debug does not lift.
 *
 * Sections, in order: options and usage; logging; buffers; objects;
 * statistics; event loop and backends; timer wheel; access control
 * (allow-lists, per-source limits); pre-protocol header (PROXY protocol
 * from trusted balancers); transport (plain/TLS); backpressure
 * (watermarks and spool files toward local consumers, the unacked limit
 * toward VPs); remote protocol; channels; per-VP unix sockets; mux
 * protocol; mux over TCP; metadata; TLS context and name matching;
 * service manager (sd_notify); metrics over HTTP (with the status page);
 * live upgrade (the mechanism: each object's record is saved and loaded
 * beside its constructor); signals; main.
 */

#ifdef HAVE_CONFIG_H
#include "config.h"
#endif

#include <sys/types.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <sys/resource.h>
#include <sys/select.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <arpa/inet.h>

#ifdef HAVE_EPOLL
#include <sys/epoll.h>
#endif
#ifdef HAVE_KQUEUE
#include <sys/event.h>
#endif

#ifdef HAVE_OPENSSL
#include <openssl/ssl.h>
#include <openssl/err.h>
#include <openssl/x509v3.h>
#include <openssl/pem.h>
#include <termios.h>
#endif

#include <assert.h>
#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <syslog.h>
#include <time.h>
#include <unistd.h>

#include "mjl_list.h"
#include "mjl_splaytree.h"
#include "utils.h"

#ifdef SC_REMOTED_VERSION_OVERRIDE  /* a second build for upgrade tests */
#undef PACKAGE_VERSION
#define PACKAGE_VERSION SC_REMOTED_VERSION_OVERRIDE
#endif
#ifndef PACKAGE_VERSION
#define PACKAGE_VERSION "unknown"
#endif

/* remote protocol (PROTOCOL.md 2) */
#define RP_HDRLEN          10
#define RP_MAXBODY         65535
#define RP_MASTER_NEW      0
#define RP_MASTER_ID       1
#define RP_CHANNEL_NEW     2
#define RP_CHANNEL_FIN     3
#define RP_KEEPALIVE       4
#define RP_ACK             5
#define RP_MASTER_RES      6
#define RP_MASTER_REJ      7
#define RP_MASTER_OK       8

/* mux protocol (PROTOCOL.md 5) */
#define MUX_HDRLEN         8
#define MUX_VP_UPDATE      0
#define MUX_VP_DEPART      1
#define MUX_GO             2
#define MUX_CHANNEL_OPEN   3
#define MUX_CHANNEL_CLOSE  4
#define MUX_CTL_MAX        65536   /* cap on a buffered control message */
#define MUX_UPDATE_MAX     65536   /* libscamperctrl's limit on a payload */
#define MC_BURST_MARK      4096    /* refill a mux client's burst below */

#define MUX_ATTR_NAME      1
#define MUX_ATTR_ARRIVAL   2
#define MUX_ATTR_IPV4      3
#define MUX_ATTR_IPV4_ASN  4
#define MUX_ATTR_CC        5
#define MUX_ATTR_ST        6
#define MUX_ATTR_PLACE     7
#define MUX_ATTR_LATLONG   8
#define MUX_ATTR_SHORTNAME 9
#define MUX_ATTR_TAG       10
#define MUX_ATTR_IATA      11
#define MUX_ATTR_IPV6      12
#define MUX_ATTR_IPV6_ASN  13

/* timers, in seconds (PROTOCOL.md 2.8) */
#define TIMEOUT_ACCEPT     30
#define TIMEOUT_RX_ABORT   60
#define TIMEOUT_KEEPALIVE  30
#define ZOMBIE_DEFAULT     900
#define ZOMBIE_MAX         10800

#define SCRATCH_SIZE       (256 * 1024)
#define UC_READ_MAX        RP_MAXBODY

/* -O options */
#define OPT_ALLOWGROUP     0x0001
#define OPT_ALLOWOTHER     0x0002
#define OPT_DEBUG          0x0004
#define OPT_SELECT         0x0008
#define OPT_SKIPNAMEVERIFY 0x0010
#define OPT_NOTIMES        0x0020
#define OPT_SYSLOG         0x0040
#define OPT_METRICS_VPS    0x0080  /* per-VP series on /metrics */

/* ---------------------------------------------------------------------
 * Options and usage
 *
 * Everything the command line sets lives here; nothing else writes these
 * after main() has validated them.
 * --------------------------------------------------------------------- */

static unsigned int  opt_flags     = 0;
static char         *opt_port_arg  = NULL;  /* -P as given */
static char         *opt_udir      = NULL;  /* -U */
static char         *opt_muxpath   = NULL;  /* -M */
static char         *opt_metafile  = NULL;  /* -m */
static char         *opt_pidfile   = NULL;  /* -e */
static long          opt_zombie    = ZOMBIE_DEFAULT; /* -Z */
static int           opt_family    = AF_UNSPEC;      /* -4 / -6 */
static int           opt_daemon    = 0;              /* -D */
#ifdef HAVE_CHROOT
static char         *opt_chroot    = NULL;  /* -R */
#endif

/* resource limits (-O name=value) */
static size_t        opt_buf_high  = 4 * 1024 * 1024; /* stop feeding */
static size_t        opt_buf_low   = 1024 * 1024;     /* resume feeding */
static long          opt_stall     = 60;     /* secs over high, no progress */
static size_t        opt_unacked_max = 16 * 1024 * 1024;
static long          opt_handshake_max = 1024;
static long          opt_upgrade_timeout = 10; /* secs for a successor */

/* tenant isolation: per-consumer spool files (-O spool-*) */
static const char   *opt_spool_dir = NULL;   /* NULL: memory only */
static size_t        opt_spool_max = (size_t)1024 * 1024 * 1024;
static uint64_t      opt_spool_total = (uint64_t)8 * 1024 * 1024 * 1024;

/* who may connect (-O allow, mux-allow, per-source-max, mux-*) */
static cidr_t       *opt_allow     = NULL;   /* VP sources; none: any */
static size_t        opt_allow_count = 0;
static cidr_t       *opt_mux_allow = NULL;   /* TCP mux sources */
static size_t        opt_mux_allow_count = 0;
static long          opt_per_source_max = 0; /* 0: no cap */
static const char   *opt_mux_listen = NULL;  /* -O mux-listen as given */
static long          opt_mux_max   = 0;      /* 0: no cap */
static long          opt_mux_burst_timeout = 60;
static struct sockaddr_storage mux_tcp_ss;   /* the parsed mux-listen */
static cidr_t       *opt_proxy_from = NULL;  /* balancers sending PROXY */
static size_t        opt_proxy_from_count = 0;
static unsigned int  opt_proxy_ports = 0x1;  /* PP_ bits; -P only */
static socklen_t     mux_tcp_sslen = 0;
#ifdef HAVE_OPENSSL
static char         *opt_certfile  = NULL;  /* -c */
static char         *opt_privfile  = NULL;  /* -p */
static char         *opt_cafile    = NULL;  /* -C */
#endif

/* -O metrics=[addr:]port (metrics_sslen 0: no listener), metrics-max */
static struct sockaddr_storage metrics_ss;
static socklen_t     metrics_sslen = 0;
static long          opt_metrics_max = 64;

/* the parsed -P: an optional literal address and a port */
static struct sockaddr_storage listen_ss;
static socklen_t     listen_sslen  = 0;    /* 0: wildcard addresses */
static int           listen_port   = 0;

#define USAGE_ALL  0xffffffffU
#define USAGE_P    0x0001
#define USAGE_U    0x0002
#define USAGE_M    0x0004
#define USAGE_O    0x0008
#define USAGE_Z    0x0010
#define USAGE_46   0x0020
#define USAGE_TLS  0x0040
#define USAGE_E    0x0080
#define USAGE_MF   0x0100
#define USAGE_R    0x0200

/*
 * The usage line, then (which != 0) the help of the options in which
 * (USAGE_ bits; USAGE_ALL: everything).  Writes to stderr only.
 */
static void usage(unsigned int which)
{
  fprintf(stderr,
	  "usage: sc_remoted [-?46Dv] -P [ip:]port [-M mux-socket] [-U unix-dir]"
	  " [-O option]\n"
#ifdef HAVE_OPENSSL
	  "                  [-C CA-file] [-c cert-file] [-p priv-file]\n"
#endif
#ifdef HAVE_CHROOT
	  "                  [-R chroot-dir] [-e pid-file] [-m meta-file]"
	  " [-Z zombie-time]\n");
#else
	  "                  [-e pid-file] [-m meta-file] [-Z zombie-time]\n");
#endif
  if(which == 0)
    return;
  fprintf(stderr, "\n");
  if(which == USAGE_ALL)
    fprintf(stderr, "     -? give an overview of the usage of sc_remoted\n"
	    "     -v print the version and exit\n"
	    "     -D start as a daemon\n");
  if(which & USAGE_46)
    fprintf(stderr, "     -4 listen on IPv4 only\n"
	    "     -6 listen on IPv6 only (not together with -4)\n");
  if(which & USAGE_P)
    fprintf(stderr, "     -P [ip:]port to accept remote scamper connections"
	    " on (required)\n");
  if(which & USAGE_U)
    fprintf(stderr, "     -U directory for per-VP unix domain sockets\n");
  if(which & USAGE_M)
    fprintf(stderr, "     -M path of the multiplexed unix domain socket\n");
  if(which & USAGE_O)
    fprintf(stderr, "     -O options: allowgroup, allowother, debug, select,"
#ifdef HAVE_OPENSSL
	    " skipnameverification,"
#endif
	    " notimes, syslog\n"
	    "        buffer-high=BYTES, buffer-low=BYTES (local client output"
	    " watermarks)\n"
	    "        stall-timeout=SECS, unacked-max=BYTES, handshake-max=N\n"
	    "        allow=CIDR, per-source-max=N (who may be a VP)\n"
	    "        proxy-from=CIDR (balancers that send a PROXY header),"
	    " proxy-ports=LIST\n"
	    "          (of scamper,mux,metrics; default scamper)\n"
	    "        mux-listen=[addr:]port, mux-allow=CIDR, mux-max=N,"
	    " mux-burst-timeout=SECS\n"
	    "        metrics=[addr:]port (HTTP /metrics, /vps and a status"
	    " page at /; no\n"
	    "        authentication), metrics-max=N, metrics-vps (per-VP"
	    " series)\n"
	    "        upgrade-timeout=SECS (SIGUSR2 live upgrade)\n"
	    "        spool-dir=DIR, spool-max=BYTES, spool-total=BYTES"
	    " (client backlog on disk)\n");
#ifdef HAVE_CHROOT
  if(which & USAGE_R)
    fprintf(stderr, "     -R chroot into this directory after startup\n");
#endif
#ifdef HAVE_OPENSSL
  if(which & USAGE_TLS)
    fprintf(stderr, "     -c server certificate file (PEM), with -p\n"
	    "     -p server private key file (PEM), with -c\n"
	    "     -C CA file to require and verify client certificates\n");
#endif
  if(which & USAGE_E)
    fprintf(stderr, "     -e file to write the process id to\n");
  if(which & USAGE_MF)
    fprintf(stderr, "     -m file of VP metadata\n");
  if(which & USAGE_Z)
    fprintf(stderr, "     -Z seconds to keep a disconnected VP for resumption"
	    " (0..%d, default %d)\n", ZOMBIE_MAX, ZOMBIE_DEFAULT);
  return;
}

/* a byte count with an optional k, m or g suffix */
static int parse_bytes(const char *s, size_t *out)
{
  unsigned long long v;
  char *end;
  if(*s < '0' || *s > '9')
    return -1;
  errno = 0;
  v = strtoull(s, &end, 10);
  if(errno != 0)
    return -1;
  switch(*end)
    {
    case 'k': case 'K': v *= 1024ULL; end++; break;
    case 'm': case 'M': v *= 1024ULL * 1024; end++; break;
    case 'g': case 'G': v *= 1024ULL * 1024 * 1024; end++; break;
    }
  if(*end != '\0' || v == 0 || v > (unsigned long long)SIZE_MAX / 2)
    return -1;
  *out = (size_t)v;
  return 0;
}

/* a plain decimal count in 1..max */
static int parse_count(const char *s, long max, long *out)
{
  if(!string_isdigits(s) || strlen(s) > 9 || atol(s) < 1 || atol(s) > max)
    return -1;
  *out = atol(s);
  return 0;
}

/* append one CIDR (a repeatable -O option) to a list */
static int parse_cidr_add(const char *val, cidr_t **list, size_t *count)
{
  cidr_t c, *nl;
  if(cidr_parse(val, &c) != 0)
    {
      fprintf(stderr, "sc_remoted: %s: not an address or CIDR network\n",
	      val);
      return -1;
    }
  if((nl = realloc(*list, (*count + 1) * sizeof(cidr_t))) == NULL)
    return -1;
  nl[(*count)++] = c;
  *list = nl;
  return 0;
}

/*
 * -O proxy-ports: a comma-separated list of the listeners that expect a
 * PROXY header from -O proxy-from addresses: scamper (-P), mux
 * (-O mux-listen), metrics (-O metrics).  Replaces the default (scamper).
 */
static int parse_proxy_ports(const char *val)
{
  static const char *names[] = {"scamper", "mux", "metrics"};
  const char *p = val, *e;
  unsigned int bits = 0;
  size_t i, n;

  for(;;)
    {
      e = strchr(p, ',');
      n = e != NULL ? (size_t)(e - p) : strlen(p);
      for(i=0; i<3; i++)
	if(n == strlen(names[i]) && strncasecmp(p, names[i], n) == 0)
	  break;
      if(i == 3)
	{
	  fprintf(stderr, "sc_remoted: proxy-ports: %.*s: not one of "
		  "scamper, mux, metrics\n", (int)n, p);
	  return -1;
	}
      bits |= 1U << i;
      if(e == NULL)
	break;
      p = e + 1;
    }
  opt_proxy_ports = bits;
  return 0;
}

/*
 * An extra listener's [addr:]port (-O mux-listen, -O metrics): a bare
 * port binds 127.0.0.1 only, since neither protocol authenticates;
 * otherwise addr:port or [v6addr]:port with a literal address.
 */
static int parse_listen_addr(const char *arg, struct sockaddr_storage *ss,
			     socklen_t *sl)
{
  char buf[INET6_ADDRSTRLEN + 16], *addr, *port, *p;
  long lo;

  if(string_isdigits(arg))
    {
      addr = "127.0.0.1";
      port = (char *)arg;
    }
  else
    {
      if(strlen(arg) >= sizeof(buf))
	return -1;
      strcpy(buf, arg);
      if(buf[0] == '[')
	{
	  if((p = strchr(buf, ']')) == NULL || p[1] != ':')
	    return -1;
	  *p = '\0';
	  addr = buf + 1;
	  port = p + 2;
	}
      else
	{
	  if((p = strrchr(buf, ':')) == NULL || strchr(buf, ':') != p)
	    return -1;
	  *p = '\0';
	  addr = buf;
	  port = p + 1;
	}
    }
  if(!string_isdigits(port) || strlen(port) > 5 ||
     string_tolong(port, &lo) != 0 || lo < 1 || lo > 65535)
    return -1;
  if(sockaddr_fromstr(addr, (int)lo, ss, sl) < 0)
    return -1;
  return 0;
}

/* how parse_O_value reads a -O name=value */
typedef enum
{
  OV_BYTES,     /* parse_bytes into a size_t */
  OV_BYTES64,   /* parse_bytes into a uint64_t */
  OV_COUNT,     /* parse_count (1..max) into a long */
  OV_CIDR,      /* parse_cidr_add to a list (var) and its count (aux) */
  OV_LISTEN,    /* parse_listen_addr into a sockaddr (var), length (aux) */
  OV_STRING,    /* the value itself (not empty) into a const char * */
  OV_PORTS,     /* parse_proxy_ports */
} ovkind_t;

/* -O name=value: the resource limits, lists and listeners, by table */
static int parse_O_value(const char *opt)
{
  static const struct
  {
    const char   *name;
    ovkind_t      kind;
    void         *var;
    void         *aux;
    long          max;       /* OV_COUNT */
    const char  **given;     /* also keep the value as given */
  } vals[] = {
    {"buffer-high",       OV_BYTES,  &opt_buf_high, NULL, 0, NULL},
    {"buffer-low",        OV_BYTES,  &opt_buf_low, NULL, 0, NULL},
    {"unacked-max",       OV_BYTES,  &opt_unacked_max, NULL, 0, NULL},
    {"stall-timeout",     OV_COUNT,  &opt_stall, NULL, 86400, NULL},
    {"handshake-max",     OV_COUNT,  &opt_handshake_max, NULL, 10000000,
     NULL},
    {"allow",             OV_CIDR,   &opt_allow, &opt_allow_count, 0, NULL},
    {"mux-allow",         OV_CIDR,   &opt_mux_allow, &opt_mux_allow_count, 0,
     NULL},
    {"proxy-from",        OV_CIDR,   &opt_proxy_from, &opt_proxy_from_count,
     0, NULL},
    {"proxy-ports",       OV_PORTS,  NULL, NULL, 0, NULL},
    {"per-source-max",    OV_COUNT,  &opt_per_source_max, NULL, 10000000,
     NULL},
    {"mux-listen",        OV_LISTEN, &mux_tcp_ss, &mux_tcp_sslen, 0,
     &opt_mux_listen},
    {"mux-max",           OV_COUNT,  &opt_mux_max, NULL, 10000000, NULL},
    {"mux-burst-timeout", OV_COUNT,  &opt_mux_burst_timeout, NULL, 86400,
     NULL},
    {"metrics",           OV_LISTEN, &metrics_ss, &metrics_sslen, 0, NULL},
    {"metrics-max",       OV_COUNT,  &opt_metrics_max, NULL, 1000000, NULL},
    {"upgrade-timeout",   OV_COUNT,  &opt_upgrade_timeout, NULL, 3600, NULL},
    {"spool-dir",         OV_STRING, &opt_spool_dir, NULL, 0, NULL},
    {"spool-max",         OV_BYTES,  &opt_spool_max, NULL, 0, NULL},
    {"spool-total",       OV_BYTES64, &opt_spool_total, NULL, 0, NULL},
  };
  size_t b;
  const char *eq = strchr(opt, '=');
  size_t i, nl = (size_t)(eq - opt);
  const char *val = eq + 1;

  for(i=0; i<sizeof(vals)/sizeof(vals[0]); i++)
    if(strlen(vals[i].name) == nl && strncasecmp(opt, vals[i].name, nl) == 0)
      break;
  if(i == sizeof(vals)/sizeof(vals[0]))
    return -1;
  if(vals[i].given != NULL)
    *vals[i].given = val;
  switch(vals[i].kind)
    {
    case OV_BYTES:  return parse_bytes(val, vals[i].var);
    case OV_COUNT:  return parse_count(val, vals[i].max, vals[i].var);
    case OV_CIDR:   return parse_cidr_add(val, vals[i].var, vals[i].aux);
    case OV_LISTEN: return parse_listen_addr(val, vals[i].var, vals[i].aux);
    case OV_BYTES64:
      if(parse_bytes(val, &b) != 0)
	return -1;
      *(uint64_t *)vals[i].var = b;
      return 0;
    case OV_STRING:
      if(*val == '\0')
	return -1;
      *(const char **)vals[i].var = val;
      return 0;
    case OV_PORTS:  return parse_proxy_ports(val);
    }
  return -1;
}

static int parse_O(const char *opt)
{
  static const struct { const char *name; unsigned int flag; } opts[] = {
    {"allowgroup", OPT_ALLOWGROUP},
    {"allowother", OPT_ALLOWOTHER},
    {"debug",      OPT_DEBUG},
    {"select",     OPT_SELECT},
#ifdef HAVE_OPENSSL
    {"skipnameverification", OPT_SKIPNAMEVERIFY},
#endif
    {"notimes",    OPT_NOTIMES},
    {"syslog",     OPT_SYSLOG},
    {"metrics-vps", OPT_METRICS_VPS},
  };
  size_t i;
  if(strchr(opt, '=') != NULL)
    return parse_O_value(opt);
  for(i=0; i<sizeof(opts)/sizeof(opts[0]); i++)
    {
      if(strcasecmp(opt, opts[i].name) == 0)
	{
	  opt_flags |= opts[i].flag;
	  return 0;
	}
    }
  return -1;
}

/*
 * Parse -P: an all-digit argument is a port on every address; otherwise
 * addr:port (split at the first ':') or [v6addr]:port.  The port is parsed
 * like strtol base 0 with trailing junk accepted (PROTOCOL.md 7).
 */
static int parse_P(const char *arg)
{
  char *dup = NULL, *addr = NULL, *port, *p;
  long lo;
  int rc = -1, fam;

  if(string_isdigits(arg))
    {
      if(string_tolong(arg, &lo) != 0 || lo < 1 || lo > 65535)
	goto done;
      listen_port = (int)lo;
      listen_sslen = 0;
      rc = 0;
      goto done;
    }

  if(strchr(arg, ':') == NULL || (dup = strdup(arg)) == NULL)
    goto done;
  if(dup[0] == '[')
    {
      if((p = strchr(dup, ']')) == NULL || p[1] != ':')
	goto done;
      *p = '\0';
      addr = dup + 1;
      port = p + 2;
    }
  else
    {
      p = strchr(dup, ':');
      *p = '\0';
      addr = dup;
      port = p + 1;
    }
  if(string_tolong(port, &lo) != 0 || lo < 1 || lo > 65535)
    goto done;
  listen_port = (int)lo;
  if((fam = sockaddr_fromstr(addr, listen_port, &listen_ss,
			     &listen_sslen)) < 0)
    goto done;
  rc = 0;

 done:
  free(dup);
  return rc;
}

/* ---------------------------------------------------------------------
 * Logging
 *
 * Four levels: log_err (LOG_ERR), log_warn (LOG_WARNING: problems the
 * daemon survives), log_notice (LOG_NOTICE: one line per VP lifecycle
 * event; logged by default) and log_dbg (LOG_DEBUG, only with -O debug).
 *
 * Where lines go: stderr in the foreground, with a [HH:MM:SS:mmm] local
 * time prefix once the loop runs (unless -O notimes); when stderr is the
 * journal (JOURNAL_STREAM names it) with sd-daemon "<N>" level prefixes
 * and no time; with -D or -O syslog to syslog (ident sc_remoted, LOG_PID,
 * LOG_DAEMON) through our own non-blocking /dev/log socket (utils.c says
 * why not syslog(3)).  Startup errors, before the loop runs, also go to
 * stderr so that whoever started the daemon sees them; an unreachable
 * /dev/log is said on stderr with -O syslog, and under -D (whose stderr
 * is for startup failures only) shows later as a count of dropped lines.
 *
 * Floods: each call site (keyed by its format string) may log LOG_BURST
 * lines per LOG_INTERVAL seconds; the rest are counted and reported as
 * "N similar messages suppressed" when the site next logs or, from the
 * service tick, when its interval ends.  -O debug turns the limit off.
 * Flood sites (log_warn_flood: a line per refused connection at a cap)
 * pass one line per second through a second table, -O debug or not.
 * Logging never blocks: syslog datagrams that do not fit are dropped and
 * counted, and the journal stream is non-blocking.
 * --------------------------------------------------------------------- */

#define LOG_BURST     20
#define LOG_INTERVAL  5
#define LOG_DEVLOG    "/dev/log"

static int       log_loop_started = 0;
static int       log_syslog = 0;      /* -D or -O syslog */
static int       log_journal = 0;     /* stderr is the journal */
static int       log_stderr = 1;      /* stderr is still worth writing */
static logsock_t log_sock;
static ratelim_t log_rl;
static ratelim_t log_rl_flood;        /* log_warn_flood sites: 1 per s */

static void svc_tick_need(void);

/* seconds on the monotonic clock, for the rate limiter */
static time_t log_now(void)
{
  struct timeval tv;
  time_mono(&tv);
  return tv.tv_sec;
}

/*
 * Choose the outputs; called once after the options are parsed and
 * before any chroot (so /dev/log is reachable).  The /dev/log socket is
 * connected now; if it is missing, the first log line says so on stderr.
 */
static void log_init(void)
{
  ratelim_init(&log_rl, LOG_BURST, LOG_INTERVAL);
  ratelim_init(&log_rl_flood, 1, 1);
  logsock_init(&log_sock, LOG_DEVLOG);
  if(opt_daemon || (opt_flags & OPT_SYSLOG))
    {
      log_syslog = 1;
      /* -D keeps stderr for startup failures only (PROTOCOL.md 8) */
      if(logsock_connect(&log_sock, log_now()) != 0 && !opt_daemon)
	fprintf(stderr, "sc_remoted: %s: %s: logging to syslog will be "
		"retried\n", LOG_DEVLOG, strerror(log_sock.err));
    }
  else if(journal_stream_match(getenv("JOURNAL_STREAM"), STDERR_FILENO))
    {
      log_journal = 1;
      fd_nonblock(STDERR_FILENO);
    }
  return;
}

/* the loop is starting: from now on, syslog mode writes only to syslog */
static void log_started(void)
{
  log_loop_started = 1;
  if(log_syslog)
    log_stderr = 0;
  return;
}

/* write one finished line to every output of the current mode */
static void log_emit(int level, const char *func, const char *msg)
{
  char line[640], ts[32], dg[700];
  struct timeval tv;
  struct tm tm;
  time_t t;
  size_t len;
  int n;

  if(log_syslog)
    {
      snprintf(line, sizeof(line), "%s: %s", func, msg);
      time_wall(&tv);
      if(log_sock.dropped > 0 && log_sock.fd >= 0)
	{
	  char note[96];
	  unsigned long d = log_sock.dropped;
	  snprintf(note, sizeof(note), "log: %lu messages dropped (syslog "
		   "socket full or unreachable)", d);
	  len = syslog_format(dg, sizeof(dg), LOG_DAEMON | LOG_WARNING,
			      tv.tv_sec, "sc_remoted", (long)getpid(), note);
	  if(logsock_send(&log_sock, dg, len, log_now()) == 0)
	    log_sock.dropped -= d;
	}
      len = syslog_format(dg, sizeof(dg), LOG_DAEMON | level, tv.tv_sec,
			  "sc_remoted", (long)getpid(), line);
      logsock_send(&log_sock, dg, len, log_now());
    }
  if(!log_stderr)
    return;
  if(log_journal)
    {
      /* one write per line: the stream is non-blocking, never wait */
      n = snprintf(line, sizeof(line), "<%d>%s: %s\n", level, func, msg);
      if(n > 0)
	{
	  len = (size_t)n < sizeof(line) ? (size_t)n : sizeof(line) - 1;
	  line[len - 1] = '\n';
	  if(write(STDERR_FILENO, line, len) < 0)
	    { /* the journal is busy: the line is lost */ }
	}
      return;
    }
  ts[0] = '\0';
  if(log_loop_started && (opt_flags & OPT_NOTIMES) == 0)
    {
      time_wall(&tv);
      t = tv.tv_sec;
      if(localtime_r(&t, &tm) != NULL)
	snprintf(ts, sizeof(ts), "[%02d:%02d:%02d:%03d] ", tm.tm_hour,
		 tm.tm_min, tm.tm_sec, (int)(tv.tv_usec / 1000));
    }
  fprintf(stderr, "%s%s: %s\n", ts, func, msg);
  return;
}

/* report a site's suppressed count (from a log call or the service tick) */
static void log_suppressed(int level, const char *func, unsigned long n)
{
  char msg[64];
  snprintf(msg, sizeof(msg), "%lu similar message%s suppressed", n,
	   n == 1 ? "" : "s");
  log_emit(level, func, msg);
  return;
}

/* one line from func, through the rate limiter (the flood table for a
 * flood site) unless -O debug turned the ordinary limit off */
static void log_vmsg(int level, const char *func, int flood,
		     const char *fmt, va_list ap)
{
  char msg[512];
  unsigned long sup = 0;
  ratelim_t *rl = flood ? &log_rl_flood : &log_rl;

  if(flood || (opt_flags & OPT_DEBUG) == 0)
    {
      if(level == LOG_DEBUG && (opt_flags & OPT_DEBUG) == 0)
	return;
      if(ratelim_check(rl, fmt, func, level, log_now(), &sup) == 0)
	{
	  svc_tick_need();
	  return;
	}
      if(sup > 0)
	log_suppressed(level, func, sup);
    }
  vsnprintf(msg, sizeof(msg), fmt, ap);
  log_emit(level, func, msg);
  return;
}

/* sites whose interval ended with suppressed lines: say so now */
static int log_flush_suppressed(void)
{
  const ratelim_site_t *s;
  unsigned long n;
  size_t iter = 0;
  int left = 0, i;

  while((s = ratelim_expired(&log_rl, log_now(), &iter, &n)) != NULL)
    log_suppressed(s->level, (const char *)s->tag, n);
  iter = 0;
  while((s = ratelim_expired(&log_rl_flood, log_now(), &iter, &n)) != NULL)
    log_suppressed(s->level, (const char *)s->tag, n);
  for(i=0; i<=RATELIM_SITES; i++)
    if(log_rl.site[i].suppressed > 0 || log_rl_flood.site[i].suppressed > 0)
      left = 1;
  return left;
}

#if defined(__GNUC__)
static void log_msg(int level, const char *func, const char *fmt, ...)
  __attribute__((format(printf, 3, 4)));
#endif

static void log_msg(int level, const char *func, const char *fmt, ...)
{
  va_list ap;
  va_start(ap, fmt);
  log_vmsg(level, func, 0, fmt, ap);
  va_end(ap);
  return;
}

#if defined(__GNUC__)
static void log_flood_msg(int level, const char *func, const char *fmt, ...)
  __attribute__((format(printf, 3, 4)));
#endif

static void log_flood_msg(int level, const char *func, const char *fmt, ...)
{
  va_list ap;
  va_start(ap, fmt);
  log_vmsg(level, func, 1, fmt, ap);
  va_end(ap);
  return;
}

#define log_warn_flood(...) log_flood_msg(LOG_WARNING, __func__, __VA_ARGS__)

#define log_err(...) log_msg(LOG_ERR, __func__, __VA_ARGS__)
#define log_warn(...) log_msg(LOG_WARNING, __func__, __VA_ARGS__)
#define log_notice(...) log_msg(LOG_NOTICE, __func__, __VA_ARGS__)
#define log_dbg(...) do {						\
    if(opt_flags & OPT_DEBUG) log_msg(LOG_DEBUG, __func__, __VA_ARGS__); \
  } while(0)

/* ---------------------------------------------------------------------
 * Buffers
 *
 * buf_t is a FIFO of chunks.  Empty buffers own no memory, and spare
 * chunks go to small global free lists, so the relay path does not call
 * malloc per frame and idle objects cost nothing.  A buffer that starts
 * with a small frame (a keepalive, an ACK, a mux control message) gets a
 * small chunk first: thousands of VPs sending a keepalive in the same
 * tick then hold a few hundred bytes each, not 16 KiB.
 * --------------------------------------------------------------------- */

#define CHUNK_SMALL     256
#define CHUNK_BIG       16384
#define BUF_IOV_MAX     64

typedef struct chunk
{
  struct chunk *next;
  uint32_t      head;   /* first unread byte */
  uint32_t      tail;   /* one past the last written byte */
  uint32_t      cap;    /* CHUNK_SMALL or CHUNK_BIG bytes of data */
  uint8_t       data[];
} chunk_t;

typedef struct buf
{
  chunk_t *first;
  chunk_t *last;
  size_t   len;
} buf_t;

/* free lists: [0] small chunks, [1] big chunks */
static chunk_t *chunk_freelist[2] = {NULL, NULL};
static size_t   chunk_freecount[2] = {0, 0};
static const size_t chunk_free_max[2] = {1024, 256};

static chunk_t *chunk_get(int big)
{
  uint32_t cap = big ? CHUNK_BIG : CHUNK_SMALL;
  chunk_t *c;
  if((c = chunk_freelist[big]) != NULL)
    {
      chunk_freelist[big] = c->next;
      chunk_freecount[big]--;
    }
  else if((c = malloc(sizeof(chunk_t) + cap)) == NULL)
    return NULL;
  c->next = NULL;
  c->head = c->tail = 0;
  c->cap = cap;
  return c;
}

static void chunk_put(chunk_t *c)
{
  int big = c->cap == CHUNK_BIG;
  if(chunk_freecount[big] >= chunk_free_max[big])
    {
      free(c);
      return;
    }
  c->next = chunk_freelist[big];
  chunk_freelist[big] = c;
  chunk_freecount[big]++;
  return;
}

static void chunk_freelist_clear(void)
{
  chunk_t *c;
  int i;
  for(i=0; i<2; i++)
    {
      while((c = chunk_freelist[i]) != NULL)
	{
	  chunk_freelist[i] = c->next;
	  free(c);
	}
      chunk_freecount[i] = 0;
    }
  return;
}

static size_t buf_len(const buf_t *b)
{
  return b->len;
}

/*
 * Append len bytes.  Every chunk needed is obtained before anything is
 * copied, so on allocation failure (-1) the buffer is unchanged and a
 * frame is never half queued.
 */
static int buf_append(buf_t *b, const void *data, size_t len)
{
  const uint8_t *p = data;
  chunk_t *c, *head = NULL, *tail = NULL;
  size_t space, n;

  space = b->last != NULL ? b->last->cap - b->last->tail : 0;
  while(space < len)
    {
      /* small first chunk only for a small frame into an empty buffer */
      if((c = chunk_get(b->last != NULL || head != NULL ||
			len > CHUNK_SMALL)) == NULL)
	{
	  while((c = head) != NULL)
	    {
	      head = c->next;
	      chunk_put(c);
	    }
	  return -1;
	}
      if(tail != NULL)
	tail->next = c;
      else
	head = c;
      tail = c;
      space += c->cap;
    }

  if(b->last != NULL && (n = b->last->cap - b->last->tail) > 0)
    {
      if(n > len)
	n = len;
      memcpy(b->last->data + b->last->tail, p, n);
      b->last->tail += (uint32_t)n;
      p += n;
      len -= n;
      b->len += n;
    }
  if(head == NULL)
    return 0;
  if(b->last != NULL)
    b->last->next = head;
  else
    b->first = head;
  b->last = tail;
  for(c = head; c != NULL; c = c->next)
    {
      n = len < c->cap ? len : c->cap;
      memcpy(c->data, p, n);
      c->tail = (uint32_t)n;
      p += n;
      len -= n;
      b->len += n;
    }
  return 0;
}

/* copy up to len bytes starting at offset off into dst; returns count */
static size_t buf_peek(const buf_t *b, size_t off, void *dst, size_t len)
{
  uint8_t *d = dst;
  const chunk_t *c;
  size_t n, got = 0;

  for(c = b->first; c != NULL && got < len; c = c->next)
    {
      n = c->tail - c->head;
      if(off >= n)
	{
	  off -= n;
	  continue;
	}
      n -= off;
      if(n > len - got)
	n = len - got;
      memcpy(d + got, c->data + c->head + off, n);
      got += n;
      off = 0;
    }
  return got;
}

/* discard len bytes from the head */
static void buf_drop(buf_t *b, size_t len)
{
  chunk_t *c;
  size_t n;

  while(len > 0 && (c = b->first) != NULL)
    {
      n = c->tail - c->head;
      if(n > len)
	{
	  c->head += (uint32_t)len;
	  b->len -= len;
	  return;
	}
      len -= n;
      b->len -= n;
      b->first = c->next;
      if(b->first == NULL)
	b->last = NULL;
      chunk_put(c);
    }
  return;
}

static void buf_clear(buf_t *b)
{
  buf_drop(b, b->len);
  assert(b->first == NULL && b->len == 0);
  return;
}

/* append the bytes of src from offset off to its end onto dst */
static int buf_append_buf(buf_t *dst, const buf_t *src, size_t off)
{
  const chunk_t *c;
  size_t n;

  for(c = src->first; c != NULL; c = c->next)
    {
      n = c->tail - c->head;
      if(off >= n)
	{
	  off -= n;
	  continue;
	}
      if(buf_append(dst, c->data + c->head + off, n - off) != 0)
	return -1;
      off = 0;
    }
  return 0;
}

/* fill iov with the buffered bytes; returns the number of entries used */
static int buf_iov(const buf_t *b, struct iovec *iov, int max)
{
  const chunk_t *c;
  int i = 0;
  for(c = b->first; c != NULL && i < max; c = c->next)
    {
      iov[i].iov_base = (void *)(c->data + c->head);
      iov[i].iov_len = c->tail - c->head;
      i++;
    }
  return i;
}

/*
 * Write buffered bytes to a plain fd with writev until the buffer is empty
 * or the fd would block.  Returns 0 (drained or would block), -1 on error.
 */
static int buf_writev(buf_t *b, int fd)
{
  struct iovec iov[BUF_IOV_MAX];
  size_t total;
  ssize_t rc;
  int i, n;

  while(b->len > 0)
    {
      n = buf_iov(b, iov, BUF_IOV_MAX);
      for(total = 0, i = 0; i < n; i++)
	total += iov[i].iov_len;
      if((rc = writev(fd, iov, n)) < 0)
	{
	  if(errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)
	    return 0;
	  return -1;
	}
      buf_drop(b, (size_t)rc);
      if((size_t)rc < total) /* partial: the socket is full */
	return 0;
    }
  return 0;
}

/* ---------------------------------------------------------------------
 * Objects
 *
 * Declared together so that the loop can dispatch to them; each object's
 * constructor and teardown live in its own section below.
 * --------------------------------------------------------------------- */

/* the object embedding a member: one implementation, mjl_list's (a
 * timer or fdev is found from its embedded member the same way) */
#define CONTAINER_OF(ptr, type, member) LIST_ITEM(ptr, type, member)

typedef enum
{
  FD_TCP_LISTEN = 1,  /* -P listener */
  FD_VP,              /* a scamper connection */
  FD_VP_LISTEN,       /* a per-VP unix listener (-U) */
  FD_UC,              /* a local client on a per-VP socket */
  FD_MUX_LISTEN,      /* the -M or -O mux-listen listener */
  FD_MC,              /* a mux client */
  FD_SIGNAL,          /* the self-pipe */
  FD_HTTP_LISTEN,     /* the -O metrics listener */
  FD_HC,              /* a metrics HTTP client */
  FD_PREHDR,          /* waiting for a PROXY header */
} fdtype_t;

/* one registered fd; embedded in the object that owns the fd */
typedef struct fdev
{
  int           fd;
  uint8_t       type;
  uint8_t       rd;        /* read interest registered */
  uint8_t       wr;        /* write interest registered */
  uint8_t       queued;    /* on the flush list */
  void         *obj;
  dlist_node_t  flush_node;
} fdev_t;

/*
 * One connection of a peer: the fd (registered with the loop) and, on a
 * TLS listener, its TLS session.  Owned by the object that embeds it;
 * every read, write, handshake and close of it goes through the conn_*
 * functions of "Transport (plain/TLS)", the only code that knows whether
 * it is TLS.  The flags are always 0 on a plain connection.
 */
typedef struct conn
{
  fdev_t        ev;
#ifdef HAVE_OPENSSL
  SSL          *ssl;           /* NULL: plain */
#endif
  const char   *peer;          /* for log lines; owned by the object */
  uint8_t       hs;            /* TLS handshake in progress */
  uint8_t       rd_want_wr;    /* a TLS read asked for writability */
  uint8_t       wr_want_rd;    /* a TLS write asked for readability */
} conn_t;

/* an intrusive timer on the wheel */
typedef struct tw_timer
{
  dlist_node_t  node;
  dlist_t      *slot;      /* list it is on; NULL when not armed */
  uint64_t      expire;    /* tick at or after which it fires */
  void        (*fn)(struct tw_timer *t);
} tw_timer_t;

typedef enum
{
  VP_HANDSHAKE = 1,  /* connected, no MASTER_NEW/RES yet */
  VP_GO,             /* a named, connected VP */
  VP_ZOMBIE,         /* named, disconnected, waiting for MASTER_RES */
  VP_FLUSH,          /* sending MASTER_REJ, then closing */
} vpstate_t;

/* the one table of VP state names (logs, /metrics, /vps, the page);
 * vp_state_names + VP_HANDSHAKE are the three states metrics count */
static const char *const vp_state_names[] = {
  "?", "handshake", "go", "zombie", "flush",
};

/* reassembly of a remote frame that spans reads */
typedef struct rp_rx
{
  uint8_t      *part;      /* header, then body; kept while streaming */
  uint32_t      have;      /* bytes held */
  uint32_t      cap;       /* bytes allocated at part */
  uint8_t       checked;   /* header of the held frame was validated */
} rp_rx_t;

/*
 * The output side of a local consumer (-U or mux client).  Above
 * opt_buf_high the consumer is "full": the VPs feeding it stop being read
 * until it drains below opt_buf_low.  A consumer full for opt_stall
 * seconds without writing anything is disconnected.  With -O spool-dir
 * its backlog beyond opt_buf_high goes to a spool file instead, and it is
 * full only when that is not possible (caps, errors: "Backpressure").
 */
typedef struct sink
{
  buf_t         out;
  uint8_t       full;           /* stops its feeders' reading: each VP it
				   feeds is rd_paused_by_sink */
  uint64_t      last_progress;  /* tick of the last successful write */
  tw_timer_t    stall_timer;
  /* -O spool-dir: the stream is out, then the spool file's bytes
   * [sp_rd, sp_wr), then pend (see "Backpressure") */
  buf_t         pend;           /* after the spool, not yet written to it */
  int           sp_fd;          /* unlinked spool file; -1 when none */
  uint8_t       sp_off;         /* spooling failed: memory only until
				   the spool has drained */
  uint8_t       sp_capped;      /* a cap hit was counted and logged */
  uint64_t      sp_rd;          /* file offset of the next byte out */
  uint64_t      sp_wr;          /* file offset of the next byte in */
} sink_t;

typedef struct chan chan_t;
typedef struct vp vp_t;
typedef struct uclient uclient_t;
typedef struct mclient mclient_t;

#define VP_FLAP_KEEP 8  /* connection times kept per VP (flaps in 1 h); the
                           live-upgrade rows 22-29 of vp_fields carry them */

struct vp
{
  conn_t        conn;           /* the scamper connection; fd -1 if none */
  vpstate_t     state;
  uint8_t       dead;
  uint8_t       rd_stopped_by_flush; /* this VP not read: FLUSH */
  uint8_t       rd_paused_by_sink; /* this VP not read: a consumer's sink
				   it feeds is full (sink_t.full) */
  uint8_t       in_handshake;   /* counted in handshake_count */
  uint32_t      id;             /* VP id; 0 until MASTER_NEW accepted */
  uint8_t       magic_len;
  uint8_t      *magic;
  char         *name;           /* monitor name; NULL when none sent */
  int           family;
  char          addr[INET6_ADDRSTRLEN]; /* peer address, no port */
  char          peer[INET6_ADDRSTRLEN + 8]; /* MASTER_ID string */
  struct timeval arrival;
  uint32_t      snd_nxt;
  uint32_t      snd_una;        /* oldest unacked seq (== snd_nxt: none) */
  uint32_t      rcv_nxt;
  uint32_t      chan_next;
  buf_t         out;            /* bytes for the current connection */
  buf_t         unacked;        /* serialized reliable frames, oldest first */
  rp_rx_t       rx;
  uint64_t      last_rx;        /* tick of the last read */
  uint64_t      last_tx;        /* tick of the last queued frame */
  tw_timer_t    rx_timer;       /* accept timeout, rx_abort, zombie expiry */
  tw_timer_t    ka_timer;       /* keepalive */
  fdev_t        lev;            /* -U listener; fd -1 if none */
  char         *sockpath;
  splaytree_t   chans;          /* chan_t by remote id */
  splaytree_node_t id_node;
  splaytree_node_t magic_node;
  uint8_t       in_id_tree;
  uint8_t       in_magic_tree;
  uint64_t      accept_seq;     /* place in vp_list (accept order) */
  dlist_node_t  list_node;      /* accept order */
  uint64_t      zombie_gen;     /* mux client generation when it went zombie */
  uint8_t       again_queued;
  dlist_node_t  again_node;
  struct src_ent *src;          /* per-source count held by the connection */
  slist_node_t  gc_node;
  uint8_t       gone;           /* vpgone_t: why it is going away (the
				   counters; log text is a why string) */
  uint64_t      conn_tick;      /* tick the current connection reached GO */
  uint64_t      rx_bytes;       /* channel data from scamper */
  uint64_t      rx_frames;
  uint64_t      tx_bytes;       /* channel data to scamper */
  uint64_t      tx_frames;
  uint32_t      flaps;          /* arrivals + resumes of this session */
  uint32_t      flap_ticks[VP_FLAP_KEEP]; /* ring: ticks of the last ones */
#ifdef UPG_TEST_EXTENDED
  uint64_t      test_extra;     /* a field only the extended test build has */
#endif
};

/* a channel of a VP; its consumer is a local client or a mux client */
struct chan
{
  uint32_t      id;             /* remote channel id */
  vp_t         *vp;             /* NULL once the VP is gone */
  uint8_t       fin_sent;
  uint8_t       fin_rcvd;
  uclient_t    *uc;             /* -U consumer, or */
  mclient_t    *mc;             /* mux consumer */
  uint32_t      mc_id;          /* the mux client's channel id */
  splaytree_node_t vp_node;
  splaytree_node_t mc_node;
  slist_node_t  gc_node;
#ifdef UPG_TEST_EXTENDED
  uint64_t      test_extra;
#endif
};

/* a -U client's states; uc_set_state() is the only writer */
typedef enum
{
  UC_RELAY = 1,                 /* read and written */
  UC_IN_PAUSED,                 /* its reading stopped: VP's unacked full */
  UC_HALF_CLOSED,               /* client sent EOF; written until the FIN */
  UC_DRAINING,                  /* not read; closed once out is written */
  UC_DEAD,                      /* closed; freed at the end of the iteration */
} ucstate_t;

struct uclient
{
  conn_t        conn;
  vp_t         *vp;
  chan_t       *chan;           /* NULL once detached */
  sink_t        sink;
  uint8_t       state;          /* ucstate_t */
  uint8_t       eof;            /* the client half-closed (for the log) */
  dlist_node_t  paused_node;    /* on uc_in_paused while UC_IN_PAUSED */
  slist_node_t  gc_node;
};

/* incremental parser state of the mux client byte stream */
typedef struct mux_rx
{
  uint8_t       hdr[MUX_HDRLEN];
  uint8_t       hdr_have;
  uint32_t      chan;           /* channel of the frame being read */
  uint32_t      left;           /* body bytes still to come */
  uint8_t      *ctl;            /* control body being assembled */
  uint32_t      ctl_have;
} mux_rx_t;

/* a mux client's states; mc_set_state() is the only writer */
typedef enum
{
  MC_BURST = 1,                 /* VP_UPDATE burst not finished: not read */
  MC_RELAY,                     /* read and written */
  MC_IN_PAUSED,                 /* its reading stopped: a VP's unacked full */
  MC_DEAD,                      /* closed; freed at the end of the iteration */
} mcstate_t;

struct mclient
{
  conn_t        conn;
  sink_t        sink;
  mux_rx_t      rx;
  splaytree_t   chans;          /* chan_t by client channel id */
  uint64_t      gen;            /* connection order */
  uint8_t       state;          /* mcstate_t */
  uint8_t       rd_stop_after_feed; /* stop reading it after this read:
				   it filled a VP's unacked queue */
  vp_t         *burst_next;     /* next VP of vp_list to consider; NULL: end */
  tw_timer_t    burst_timer;    /* -O mux-burst-timeout */
  dlist_node_t  paused_node;    /* on mc_in_paused while MC_IN_PAUSED */
  dlist_node_t  list_node;
  slist_node_t  gc_node;
#ifdef UPG_TEST_EXTENDED
  uint64_t      test_extra;
#endif
};

static uint8_t     *scratch = NULL;         /* the shared read buffer */
static dlist_t      vp_list;                /* all vp_t, accept order */
static uint64_t     vp_accept_seq = 0;      /* last vp_t.accept_seq given */
static splaytree_t  vp_by_id;
static splaytree_t  vp_by_magic;
static uint32_t     vp_id_next = 1;
static dlist_t      mc_list;                /* all mux clients */
static uint64_t     mc_gen = 0;
static slist_t      gc_vps, gc_chans, gc_ucs, gc_mcs;
static dlist_t      vp_again;               /* VPs with TLS data to read */
static dlist_t      uc_in_paused;           /* -U clients not read (unacked) */
static dlist_t      mc_in_paused;           /* mux clients not read */
static long         handshake_count = 0;

static fdev_t       tcp_lev[2];             /* -P listeners */
static int          tcp_lev_count = 0;
static fdev_t       mux_lev;                /* -M listener */
static fdev_t       mux_tcp_lev;            /* -O mux-listen listener */
static fdev_t       http_lev;               /* -O metrics listener */
static fdev_t       sig_ev;                 /* self-pipe, read end */
static int          sig_pipe[2] = {-1, -1};

static void vp_dispatch(vp_t *vp, int rd, int wr);
static void vp_flush(vp_t *vp);
static void vp_lev_accept(vp_t *vp);
static void uc_dispatch(uclient_t *uc, int rd, int wr);
static void uc_flush(uclient_t *uc);
static void mc_dispatch(mclient_t *mc, int rd, int wr);
static void mc_flush(mclient_t *mc);
static void tcp_accept(fdev_t *lev);
static int tcp_listen_fd(const struct sockaddr *sa, socklen_t sl,
			 const char *what);
static void mux_accept(fdev_t *lev);
static void sig_drain(void);
typedef struct hclient hclient_t;
static void hc_dispatch(hclient_t *hc, int rd, int wr);
static void http_accept(void);
typedef struct prehdr prehdr_t;
static void prehdr_read(prehdr_t *ph);

/*
 * Each object's live-upgrade record (see section "Live upgrade") is
 * written and read beside its constructor: vp_save/vp_load, chan_save/
 * chan_load, uc_save/uc_load, mc_save/mc_load, stats_save/stats_load.
 * They use the record codec of utils.c (tlv_*) through these state
 * helpers for fds, buffers and timers, defined in that section.
 */
typedef struct st_w
{
  tlv_w_t       t;
  int          *fds;            /* fds named by the state, in order */
  uint32_t      nfds;
  uint32_t      fdcap;
} st_w_t;

/* the reader of an untrusted state: every failure says why */
typedef struct st_r
{
  int          *fds;
  uint8_t      *fdused;         /* each received fd is used at most once */
  uint32_t      nfds;
  char          why[160];
  vp_t         *vp;             /* the last VP record: its channels follow */
  chan_t       *chan;           /* the last channel record: its -U client */
  uint32_t      nvp;
  uint32_t      nmc;
  uint32_t     *burst;          /* mux burst cursors, by mux client */
  uint32_t      burst_cap;
} st_r_t;

static void st_fd_put(st_w_t *w, uint16_t tag, int fd);
static int  st_fd_get(st_r_t *r, const uint8_t *v, uint32_t n);
static void st_buf_put(st_w_t *w, uint16_t tag, const buf_t *b);
static int  st_buf_get(st_r_t *r, buf_t *b, const uint8_t *v, uint32_t n);
static void st_timer_put(st_w_t *w, uint16_t tag, const tw_timer_t *t);
static int  st_timer_get(st_r_t *r, tw_timer_t *t, const uint8_t *v,
			 uint32_t n);
static int  st_flag_get(const uint8_t *v, uint32_t n, uint8_t *out);
static int  st_table_get(st_r_t *r, const char *rec, const tlv_desc_t *t,
			 size_t nt, void *obj, uint16_t tag, const uint8_t *v,
			 uint32_t n);
static int  st_unknown(st_r_t *r, const char *rec, uint16_t tag);
static int  st_bad(st_r_t *r, const char *fmt, ...)
#ifdef __GNUC__
  __attribute__((format(printf, 2, 3)))
#endif
  ;
static int  st_ev_register(st_r_t *r, fdev_t *ev, int no_read);
#define ST_TABLE_N(t) (sizeof(t) / sizeof((t)[0]))

/* record types of the state; their fields are listed beside each saver */
#define ST_REC_DAEMON  1    /* first: version, clock, id counters */
#define ST_REC_LISTEN  2    /* listeners and service sockets */
#define ST_REC_STATS   3
#define ST_REC_MC      4    /* a mux client */
#define ST_REC_VP      5
#define ST_REC_CHAN    6    /* a channel of the last VP record */
#define ST_REC_UC      7    /* the -U client of the last channel record */
#define ST_REC_END     8    /* last: the counts, so truncation shows */
#define ST_REC_TEST    0x0f00  /* written by the test builds only */
#define ST_TICK_MAX    ((uint64_t)1 << 40)

/* ---------------------------------------------------------------------
 * Statistics
 *
 * One global struct of event counters, bumped with plain increments at
 * the points where things happen (the VP state machine, vp_close, the
 * MASTER_REJ paths, relay, backpressure, accept pauses, TLS failures,
 * metadata loads).  Gauges (VPs by state, unacked bytes, channels,
 * clients) are not kept: the metrics page computes them by walking the
 * VPs when it is scraped, so the relay path pays only the increments.
 * Why a VP went away is a small enum, set by the first site that knows
 * (vp_gone_as) and counted once by vp_close (stats_vp_closed).
 * --------------------------------------------------------------------- */

typedef enum
{
  GONE_NONE = 0,
  GONE_CLOSED,        /* peer closed or I/O error */
  GONE_TIMEOUT,       /* rx_abort, or no handshake within 30 s */
  GONE_EXPIRED,       /* zombie deadline passed */
  GONE_PROTO,         /* protocol violation */
  GONE_TLS,           /* TLS error or certificate refused */
  GONE_TAKEOVER,      /* a resume took the connection of a GO session */
  GONE_SHUTDOWN,      /* the daemon is exiting */
  GONE_ERROR,         /* local failure: memory, registration */
  GONE_REJECTED,      /* MASTER_REJ sent (counted when sent) */
  GONE_MERGED,        /* a MASTER_RES connection merged into its session */
  GONE_MAX
} vpgone_t;

/* label values of sc_remoted_vp_departures_total, by vpgone_t */
static const char *const gone_depart_label[GONE_MAX] = {
  NULL, "closed", "timeout", "expired", "protocol_error", "tls_error",
  "takeover", "shutdown", "error", NULL, NULL,
};

typedef enum
{
  REJ_UNKNOWN_MAGIC = 0, /* MASTER_RES for no known session */
  REJ_INCONSISTENT,      /* MASTER_RES with sequence numbers out of range */
  REJ_HANDSHAKE_CAP,     /* refused at accept: -O handshake-max */
  REJ_PROTO,             /* malformed handshake */
  REJ_TIMEOUT,           /* no handshake within 30 s */
  REJ_TLS,               /* TLS handshake or certificate failed */
  REJ_CLOSED,            /* peer left during the handshake */
  REJ_ERROR,             /* local failure or shutdown */
  REJ_ALLOW,             /* refused at accept: source not in -O allow */
  REJ_PER_SOURCE,        /* refused at accept: -O per-source-max */
  REJ_MAX
} rejwhy_t;

static const char *const rej_label[REJ_MAX] = {
  "unknown_magic", "inconsistent_state", "handshake_cap", "protocol_error",
  "timeout", "tls_error", "closed", "error", "allow", "per_source",
};

typedef enum
{
  TLSF_HANDSHAKE = 0,    /* SSL_accept failed */
  TLSF_NO_CERT,          /* -C: no client certificate */
  TLSF_VERIFY,           /* -C: certificate did not verify */
  TLSF_NAME,             /* monitor name not in the certificate */
  TLSF_MAX
} tlsfail_t;

static const char *const tlsf_label[TLSF_MAX] = {
  "handshake", "no_certificate", "verify", "name_mismatch",
};

#define DIR_FROM_VP 0
#define DIR_TO_VP   1

static struct
{
  uint64_t  arrivals;
  uint64_t  resumes;
  uint64_t  zombies;
  uint64_t  rejects[REJ_MAX];
  uint64_t  departures[GONE_MAX];
  uint64_t  relay_bytes[2];            /* DIR_FROM_VP, DIR_TO_VP */
  uint64_t  relay_frames[2];
  uint64_t  bp_pauses;
  uint64_t  stall_disconnects;
  uint64_t  spool_written;             /* bytes written to spool files */
  uint64_t  spool_cap_hits;            /* spool-max/total fallbacks */
  uint64_t  spool_errors;              /* spool create/write/read errors */
  uint64_t  accept_pauses_emfile;
  uint64_t  accept_pauses_hscap;
  uint64_t  mux_refused[2];            /* -O mux-allow, -O mux-max */
  uint64_t  mux_burst_timeouts;
  uint64_t  tls_failures[TLSF_MAX];
  uint64_t  meta_loads_ok;
  uint64_t  meta_loads_err;
  struct timeval meta_last_ok;         /* wall time; 0 if never */
  uint64_t  http_requests[6];          /* by hc_code_idx() */
  uint64_t  http_refused;              /* over -O metrics-max */
  uint64_t  proxy_hdrs[3];             /* PROXY headers: PHR_ results */
  uint64_t  http_busy_us[3];           /* loop time serving HTTP, by
					  hc route: other, /metrics, /vps */
  struct timeval start;                /* wall time at startup */
} stats;

/* remember why vp is going away; the first site that knows wins */
static void vp_gone_as(vp_t *vp, vpgone_t reason)
{
  if(vp->gone == GONE_NONE)
    vp->gone = (uint8_t)reason;
  return;
}

/*
 * vp_close counts the VP once: a named VP as a departure, anything else
 * that never got a VP id as a refused connection.
 */
static void stats_vp_closed(const vp_t *vp)
{
  vpgone_t w = (vpgone_t)vp->gone;
  if(vp->id != 0)
    {
      if(w == GONE_NONE || gone_depart_label[w] == NULL)
	w = GONE_ERROR;
      stats.departures[w]++;
      return;
    }
  switch(w)
    {
    case GONE_REJECTED: case GONE_MERGED: return;
    case GONE_PROTO:    stats.rejects[REJ_PROTO]++; return;
    case GONE_TIMEOUT:  stats.rejects[REJ_TIMEOUT]++; return;
    case GONE_TLS:      stats.rejects[REJ_TLS]++; return;
    case GONE_CLOSED:   stats.rejects[REJ_CLOSED]++; return;
    default:           stats.rejects[REJ_ERROR]++; return;
    }
}

typedef struct vp_totals
{
  uint64_t vps[3];              /* handshake (and flush), go, zombie */
  uint64_t unacked;
  uint64_t channels;
  uint64_t uclients;
} vp_totals_t;

static int chan_count_uc(void *item, void *param)
{
  if(((chan_t *)item)->uc != NULL)
    (*(uint64_t *)param)++;
  return 0;
}

/*
 * The one walk over every VP for totals, shared by sd_notify's STATUS=,
 * /metrics and the status page.
 */
static void vp_totals(vp_totals_t *t)
{
  dlist_node_t *n;
  vp_t *vp;
  memset(t, 0, sizeof(*t));
  for(n = vp_list.head; n != NULL; n = n->next)
    {
      vp = CONTAINER_OF(n, vp_t, list_node);
      t->vps[vp->state == VP_GO ? 1 : vp->state == VP_ZOMBIE ? 2 : 0]++;
      t->unacked += buf_len(&vp->unacked);
      t->channels += splaytree_count(&vp->chans);
      splaytree_inorder(&vp->chans, chan_count_uc, &t->uclients);
    }
  return;
}

/* ---- live-upgrade record (section "Live upgrade") ---- */

/*
 * The counters as (tag, counter) pairs: a scalar has its own tag, an
 * array element its array's base + index (so a reason appended to its
 * enum gets a new tag, and old readers skip it).  Tags never change
 * meaning: a retired counter's tag is not reused.
 */
#define STATS_TAG_START     0x1000  /* struct timeval: u64 s, u32 us */
#define STATS_TAG_META_OK   0x1001
#define STATS_FIELDS_MAX    160

static size_t stats_fields(uint64_t **f, uint16_t *tag)
{
  size_t n = 0, i;
#define STAT1(t, x) do { if(n < STATS_FIELDS_MAX)			\
      { tag[n] = (t); f[n] = &(x); n++; } } while(0)
#define STATN(base, arr, cnt) for(i=0; i<(cnt); i++)			\
    STAT1((uint16_t)((base) + i), (arr)[i])
  STAT1(1, stats.arrivals);
  STAT1(2, stats.resumes);
  STAT1(3, stats.zombies);
  STAT1(4, stats.bp_pauses);
  STAT1(5, stats.stall_disconnects);
  STAT1(6, stats.accept_pauses_emfile);
  STAT1(7, stats.accept_pauses_hscap);
  STAT1(8, stats.mux_burst_timeouts);
  STAT1(9, stats.meta_loads_ok);
  STAT1(10, stats.meta_loads_err);
  STAT1(11, stats.http_refused);
  STAT1(12, stats.spool_written);
  STAT1(13, stats.spool_cap_hits);
  STAT1(14, stats.spool_errors);
  STATN(0x100, stats.rejects, REJ_MAX);
  STATN(0x200, stats.departures, GONE_MAX);
  STATN(0x300, stats.relay_bytes, 2);
  STATN(0x400, stats.relay_frames, 2);
  STATN(0x500, stats.mux_refused, 2);
  STATN(0x600, stats.tls_failures, TLSF_MAX);
  STATN(0x700, stats.http_requests, 6);
  STATN(0x800, stats.http_busy_us, 3);
  STATN(0x900, stats.proxy_hdrs, 3);
#undef STATN
#undef STAT1
  return n;
}

static void st_timeval_put(st_w_t *w, uint16_t tag, const struct timeval *tv)
{
  uint8_t b[12];
  bytes_htonl(b, (uint32_t)((uint64_t)tv->tv_sec >> 32));
  bytes_htonl(b + 4, (uint32_t)tv->tv_sec);
  bytes_htonl(b + 8, (uint32_t)tv->tv_usec);
  tlv_field(&w->t, tag, b, sizeof(b));
  return;
}

static int st_timeval_get(st_r_t *r, struct timeval *tv, const uint8_t *v,
			  uint32_t n)
{
  uint64_t s;
  if(n != 12 || bytes_ntohl(v + 8) >= 1000000 ||
     (s = ((uint64_t)bytes_ntohl(v) << 32) | bytes_ntohl(v + 4))
     > ((uint64_t)1 << 40))
    return st_bad(r, "record stats: bad time");
  tv->tv_sec = (time_t)s;
  tv->tv_usec = (suseconds_t)bytes_ntohl(v + 8);
  return 0;
}

/* the counters record; the start time is kept: uptime goes on */
static void stats_save(st_w_t *w)
{
  uint64_t *f[STATS_FIELDS_MAX];
  uint16_t tag[STATS_FIELDS_MAX];
  size_t i, n = stats_fields(f, tag), at = tlv_begin(&w->t, ST_REC_STATS);
  st_timeval_put(w, STATS_TAG_START, &stats.start);
  st_timeval_put(w, STATS_TAG_META_OK, &stats.meta_last_ok);
  for(i=0; i<n; i++)
    tlv_field_uint(&w->t, tag[i], *f[i], 8);
  tlv_end(&w->t, at);
  return;
}

/* read the counters record of len bytes at p: 0, or -1 with r->why */
static int stats_load(st_r_t *r, const uint8_t *p, uint32_t len)
{
  uint64_t *f[STATS_FIELDS_MAX], v;
  uint16_t tag[STATS_FIELDS_MAX], t;
  size_t i, n = stats_fields(f, tag);
  tlv_r_t fr = {p, len, 0};
  const uint8_t *val;
  uint32_t vlen;
  int rc;

  while((rc = tlv_next(&fr, &t, &val, &vlen)) == 1)
    {
      if(t == STATS_TAG_START || t == STATS_TAG_META_OK)
	{
	  if(st_timeval_get(r, t == STATS_TAG_START ? &stats.start :
			    &stats.meta_last_ok, val, vlen) != 0)
	    return -1;
	  continue;
	}
      for(i=0; i<n && tag[i] != t; i++)
	;
      if(i == n)
	{
	  if(st_unknown(r, "stats", t) != 0)
	    return -1;
	  continue;
	}
      if(tlv_uint(val, vlen, 8, &v) != 0)
	return st_bad(r, "record stats: field %u is not a u64", t);
      *f[i] = v;
    }
  return rc < 0 ? st_bad(r, "record stats: truncated field") : 0;
}

/* ---------------------------------------------------------------------
 * Event loop and backends
 *
 * ev_set() is the only way interest changes; the backends (epoll, kqueue,
 * select) sit behind ev_set, ev_forget, ev_move and ev_poll.  Output is
 * queued with out_queue() and flushed once per iteration.
 * --------------------------------------------------------------------- */

typedef enum { EVB_SELECT = 0, EVB_EPOLL, EVB_KQUEUE } evbackend_t;

static evbackend_t  ev_backend = EVB_SELECT;
static int          ev_fd = -1;             /* epoll or kqueue fd */
static fdev_t      *sel_fdevs[FD_SETSIZE];
static fd_set       sel_rd, sel_wr;
static int          sel_maxfd = -1;
static dlist_t      flush_list;
static int          loop_stop = 0;

static void fdev_init(fdev_t *ev, int fd, fdtype_t type, void *obj)
{
  memset(ev, 0, sizeof(*ev));
  ev->fd = fd;
  ev->type = (uint8_t)type;
  ev->obj = obj;
  dlist_node_init(&ev->flush_node);
  return;
}

/* with select, fds beyond FD_SETSIZE cannot be watched */
static int ev_fd_ok(int fd)
{
  return ev_backend != EVB_SELECT || fd < FD_SETSIZE;
}

#ifdef HAVE_EPOLL
static int ep_ctl(fdev_t *ev, int op, int rd, int wr)
{
  struct epoll_event e;
  memset(&e, 0, sizeof(e));
  e.events = (rd ? EPOLLIN : 0) | (wr ? EPOLLOUT : 0);
  e.data.ptr = ev;
  return epoll_ctl(ev_fd, op, ev->fd, &e);
}
#endif

#ifdef HAVE_KQUEUE
static int kq_ctl(fdev_t *ev, int rd, int wr, int force)
{
  struct kevent ch[2];
  int n = 0;
  if(force || rd != ev->rd)
    {
      EV_SET(&ch[n], ev->fd, EVFILT_READ, rd ? EV_ADD : EV_DELETE, 0, 0, ev);
      if(rd || ev->rd) n++;
    }
  if(force || wr != ev->wr)
    {
      EV_SET(&ch[n], ev->fd, EVFILT_WRITE, wr ? EV_ADD : EV_DELETE, 0, 0, ev);
      if(wr || ev->wr) n++;
    }
  if(n == 0)
    return 0;
  return kevent(ev_fd, ch, n, NULL, 0, NULL);
}
#endif

/*
 * Set the read/write interest of an fd, registering it on first use.
 * Returns 0, or -1 if the backend refused (the caller closes the object).
 */
static int ev_set(fdev_t *ev, int rd, int wr)
{
  rd = rd ? 1 : 0;
  wr = wr ? 1 : 0;
  switch(ev_backend)
    {
#ifdef HAVE_EPOLL
    case EVB_EPOLL:
      {
	int was = ev->rd || ev->wr, now = rd || wr;
	if(was == 0 && now == 0)
	  break;
	if(ep_ctl(ev, was ? (now ? EPOLL_CTL_MOD : EPOLL_CTL_DEL)
		  : EPOLL_CTL_ADD, rd, wr) != 0)
	  return -1;
	break;
      }
#endif
#ifdef HAVE_KQUEUE
    case EVB_KQUEUE:
      if(kq_ctl(ev, rd, wr, 0) != 0)
	return -1;
      break;
#endif
    default:
      if(ev->fd >= FD_SETSIZE)
	return -1;
      if(rd) FD_SET(ev->fd, &sel_rd); else FD_CLR(ev->fd, &sel_rd);
      if(wr) FD_SET(ev->fd, &sel_wr); else FD_CLR(ev->fd, &sel_wr);
      sel_fdevs[ev->fd] = (rd || wr) ? ev : NULL;
      if((rd || wr) && ev->fd > sel_maxfd)
	sel_maxfd = ev->fd;
      break;
    }
  ev->rd = (uint8_t)rd;
  ev->wr = (uint8_t)wr;
  return 0;
}

static int ev_want_write(fdev_t *ev, int wr)
{
  if((wr ? 1 : 0) == ev->wr)
    return 0;
  return ev_set(ev, ev->rd, wr);
}

static int ev_want_read(fdev_t *ev, int rd)
{
  if((rd ? 1 : 0) == ev->rd)
    return 0;
  return ev_set(ev, rd, ev->wr);
}

/* deregister the fd and take it off the flush list; does not close it */
static void ev_forget(fdev_t *ev)
{
  /* a failure cannot be acted on: the fd is closed or re-registered
   * (ev_move) next, either of which ends its old registration */
  if(ev->fd >= 0)
    (void)ev_set(ev, 0, 0);
  if(ev->queued)
    {
      dlist_remove(&flush_list, &ev->flush_node);
      ev->queued = 0;
    }
  return;
}

/* deregister and close the fd; pending events for it are then skipped */
static void ev_close(fdev_t *ev)
{
  if(ev->fd < 0)
    return;
  ev_forget(ev);
  close(ev->fd);
  ev->fd = -1;
  return;
}

/*
 * Hand a registered fd from one fdev to another (a resumed session takes
 * over the connection of the temporary object that carried MASTER_RES).
 */
static int ev_move(fdev_t *from, fdev_t *to)
{
  int rd = from->rd, wr = from->wr;
  ev_forget(from);
  to->fd = from->fd;
  from->fd = -1;
  to->rd = to->wr = 0;
  return ev_set(to, rd, wr);
}

/* note that ev has output to flush at the end of this iteration */
static void out_queue(fdev_t *ev)
{
  if(ev->queued || ev->fd < 0)
    return;
  dlist_push_tail(&flush_list, &ev->flush_node);
  ev->queued = 1;
  return;
}

static void ev_dispatch(fdev_t *ev, int rd, int wr)
{
  if(ev->fd < 0)
    return; /* closed earlier in this iteration */
  switch(ev->type)
    {
    case FD_TCP_LISTEN: tcp_accept(ev); break;
    case FD_VP:         vp_dispatch(ev->obj, rd, wr); break;
    case FD_VP_LISTEN:  vp_lev_accept(ev->obj); break;
    case FD_UC:         uc_dispatch(ev->obj, rd, wr); break;
    case FD_MUX_LISTEN: mux_accept(ev); break;
    case FD_MC:         mc_dispatch(ev->obj, rd, wr); break;
    case FD_SIGNAL:     sig_drain(); break;
    case FD_HTTP_LISTEN: http_accept(); break;
    case FD_HC:         hc_dispatch(ev->obj, rd, wr); break;
    case FD_PREHDR:     prehdr_read(ev->obj); break;
    }
  return;
}

/* flush every object that gained output during this iteration */
static void flush_pending(void)
{
  dlist_node_t *n;
  fdev_t *ev;

  while((n = dlist_pop_head(&flush_list)) != NULL)
    {
      ev = CONTAINER_OF(n, fdev_t, flush_node);
      ev->queued = 0;
      if(ev->fd < 0)
	continue;
      switch(ev->type)
	{
	case FD_VP: vp_flush(ev->obj); break;
	case FD_UC: uc_flush(ev->obj); break;
	case FD_MC: mc_flush(ev->obj); break;
	}
    }
  return;
}

static int ev_init(void)
{
  FD_ZERO(&sel_rd);
  FD_ZERO(&sel_wr);
  dlist_init(&flush_list);
  if(opt_flags & OPT_SELECT)
    {
      ev_backend = EVB_SELECT;
      return 0;
    }
#if defined(HAVE_EPOLL)
  if((ev_fd = epoll_create1(EPOLL_CLOEXEC)) < 0)
    {
      log_err("could not create epoll fd: %s", strerror(errno));
      return -1;
    }
  ev_backend = EVB_EPOLL;
#elif defined(HAVE_KQUEUE)
  if((ev_fd = kqueue()) < 0)
    {
      log_err("could not create kqueue: %s", strerror(errno));
      return -1;
    }
  ev_backend = EVB_KQUEUE;
#endif
  return 0;
}

#define EV_BATCH 1024

static void tw_now_update(void);

/*
 * Wait for events for at most timeout_ms (-1: forever) and dispatch them.
 * Objects torn down while dispatching are only marked; their memory is
 * freed after the batch, so later events in the batch see fd == -1.
 * Returns 0, -1 when the wait failed, or 1 when a signal interrupted it
 * before anything was dispatched (e.g. SIGCONT after SIGSTOP: epoll_wait
 * is never restarted after a stop).
 */
static int ev_poll(int timeout_ms)
{
  int i, n;

  switch(ev_backend)
    {
#ifdef HAVE_EPOLL
    case EVB_EPOLL:
      {
	static struct epoll_event evs[EV_BATCH];
	n = epoll_wait(ev_fd, evs, EV_BATCH, timeout_ms);
	tw_now_update(); /* "now" is current before any handler runs */
	if(n < 0)
	  return errno == EINTR ? 1 : -1;
	for(i=0; i<n; i++)
	  {
	    uint32_t e = evs[i].events;
	    int err = (e & (EPOLLERR | EPOLLHUP)) != 0;
	    ev_dispatch(evs[i].data.ptr, (e & EPOLLIN) || err,
			(e & EPOLLOUT) || err);
	  }
	return 0;
      }
#endif
#ifdef HAVE_KQUEUE
    case EVB_KQUEUE:
      {
	static struct kevent evs[EV_BATCH];
	struct timespec ts, *tsp = NULL;
	if(timeout_ms >= 0)
	  {
	    ts.tv_sec = timeout_ms / 1000;
	    ts.tv_nsec = (long)(timeout_ms % 1000) * 1000000L;
	    tsp = &ts;
	  }
	n = kevent(ev_fd, NULL, 0, evs, EV_BATCH, tsp);
	tw_now_update();
	if(n < 0)
	  return errno == EINTR ? 1 : -1;
	for(i=0; i<n; i++)
	  ev_dispatch(evs[i].udata, evs[i].filter == EVFILT_READ,
		      evs[i].filter == EVFILT_WRITE);
	return 0;
      }
#endif
    default:
      {
	static fdev_t *ready[FD_SETSIZE];
	static uint8_t rflag[FD_SETSIZE], wflag[FD_SETSIZE];
	struct timeval tv, *tvp = NULL;
	fd_set rfds = sel_rd, wfds = sel_wr;
	int fd, cnt = 0;
	if(timeout_ms >= 0)
	  {
	    tv.tv_sec = timeout_ms / 1000;
	    tv.tv_usec = (timeout_ms % 1000) * 1000;
	    tvp = &tv;
	  }
	n = select(sel_maxfd + 1, &rfds, &wfds, NULL, tvp);
	tw_now_update();
	if(n < 0)
	  return errno == EINTR ? 1 : -1;
	for(fd=0; fd <= sel_maxfd && cnt < n; fd++)
	  {
	    int r = FD_ISSET(fd, &rfds), w = FD_ISSET(fd, &wfds);
	    if((r || w) && sel_fdevs[fd] != NULL)
	      {
		ready[cnt] = sel_fdevs[fd];
		rflag[cnt] = r ? 1 : 0;
		wflag[cnt] = w ? 1 : 0;
		cnt++;
	      }
	  }
	for(i=0; i<cnt; i++)
	  ev_dispatch(ready[i], rflag[i], wflag[i]);
	return 0;
      }
    }
}

/* ---------------------------------------------------------------------
 * Timer wheel
 *
 * One-second ticks counted on the monotonic clock from startup.  A timer
 * sits in slot (expire % TW_SLOTS); advancing one tick visits one slot
 * and fires only the timers whose expiry has come, so a tick costs time
 * proportional to the due timers (plus long timers passing through), never
 * to the number of sessions.  Arm and cancel are O(1).
 *
 * Two ticks, because "now" and "fired up to" are different questions:
 *  - tw_tick is now.  tw_now_update() refreshes it right after the wait
 *    syscall returns, before any handler runs, so every timestamp a
 *    handler takes (last_rx, last_tx, last_progress, the hs_cap log
 *    throttle) and every timer it arms counts from the real moment.  The
 *    loop sleeps with no timeout while nothing is armed, so the first
 *    event after an idle spell used to run with a tick minutes old: a
 *    30 s accept deadline armed then was already due.
 *  - tw_done is how far the wheel has fired.  tw_advance() moves it up to
 *    tw_tick only after the iteration's events were dispatched, so frames
 *    already waiting in a socket are read (and last_rx refreshed) before
 *    the lazy rx_abort / keepalive timers judge silence.  For the same
 *    reason loop_run() does not fire timers after a wait a signal
 *    interrupted (SIGCONT after SIGSTOP), and polls once more, without
 *    blocking, when more than a tick passed since the wheel last fired.
 * Catch-up after a long stop (SIGSTOP, a suspended machine) is bounded:
 * at most TW_SLOTS slot visits whatever the gap, then the due timers are
 * merge-sorted by expiry so each fires once, in order.
 * --------------------------------------------------------------------- */

#define TW_SLOTS 1024

static dlist_t        tw_slot[TW_SLOTS];
static uint64_t       tw_tick = 0;       /* now, refreshed after each wait */
static uint64_t       tw_done = 0;       /* every timer due <= this fired */
static size_t         tw_count = 0;
static struct timeval tw_epoch;          /* monotonic time of tick 0 */

static void tw_init(void)
{
  int i;
  for(i=0; i<TW_SLOTS; i++)
    dlist_init(&tw_slot[i]);
  time_mono(&tw_epoch);
  tw_tick = 0;
  tw_done = 0;
  return;
}

static void tw_timer_init(tw_timer_t *t, void (*fn)(tw_timer_t *))
{
  dlist_node_init(&t->node);
  t->slot = NULL;
  t->expire = 0;
  t->fn = fn;
  return;
}

static void tw_cancel(tw_timer_t *t)
{
  if(t->slot == NULL)
    return;
  dlist_remove(t->slot, &t->node);
  t->slot = NULL;
  tw_count--;
  return;
}

/*
 * fire t at tick `expire` (or the next tick if that is not after now).
 * Never due in the iteration that arms it, so a callback re-arming itself
 * cannot loop inside one tw_advance().
 */
static void tw_arm_at(tw_timer_t *t, uint64_t expire)
{
  tw_cancel(t);
  if(expire <= tw_tick)
    expire = tw_tick + 1;
  t->expire = expire;
  t->slot = &tw_slot[expire % TW_SLOTS];
  dlist_push_tail(t->slot, &t->node);
  tw_count++;
  return;
}

static void tw_arm(tw_timer_t *t, unsigned int secs)
{
  tw_arm_at(t, tw_tick + secs);
  return;
}

/* the tick the monotonic clock is in now */
static uint64_t tw_clock(void)
{
  struct timeval now;
  int64_t ms;
  time_mono(&now);
  ms = timeval_diff_ms(&now, &tw_epoch);
  return ms < 0 ? 0 : (uint64_t)ms / 1000;
}

/*
 * Make tw_tick "now".  Called by ev_poll() as soon as the wait returns,
 * before dispatch; errno is kept for the caller's check of the wait.
 */
static void tw_now_update(void)
{
  int saved = errno;
  uint64_t now = tw_clock();
  if(now > tw_tick)
    tw_tick = now;
  errno = saved;
  return;
}

/*
 * Stable merge sort of a due list by expiry (bottom-up, O(n log n), no
 * allocation).  Only needed after a gap longer than the wheel, when slots
 * are visited in slot order rather than tick order.
 */
static void tw_sort_due(dlist_t *due)
{
  dlist_node_t *list = NULL, *n, **tail, *p, *q, *e;
  size_t k, psize, qsize, merges;

  /* detach into a NULL-terminated chain linked by ->next */
  tail = &list;
  while((n = dlist_pop_head(due)) != NULL)
    {
      *tail = n;
      tail = &n->next;
    }
  *tail = NULL;

  for(k = 1; list != NULL; k *= 2)
    {
      p = list;
      list = NULL;
      tail = &list;
      merges = 0;
      while(p != NULL)
	{
	  merges++;
	  q = p;
	  for(psize = 0; psize < k && q != NULL; psize++)
	    q = q->next;
	  qsize = k;
	  while(psize > 0 || (qsize > 0 && q != NULL))
	    {
	      /* take from p on ties: keeps arming order, i.e. stable */
	      if(psize == 0)
		{ e = q; q = q->next; qsize--; }
	      else if(qsize == 0 || q == NULL ||
		      CONTAINER_OF(p, tw_timer_t, node)->expire <=
		      CONTAINER_OF(q, tw_timer_t, node)->expire)
		{ e = p; p = p->next; psize--; }
	      else
		{ e = q; q = q->next; qsize--; }
	      *tail = e;
	      tail = &e->next;
	    }
	  p = q;
	}
      *tail = NULL;
      if(merges <= 1)
	break;
    }

  while(list != NULL)
    {
      n = list;
      list = list->next;
      dlist_push_tail(due, n);
    }
  return;
}

/*
 * Fire every timer due up to tick `now` (normally tw_tick; a test may
 * pass a later tick, which then becomes now).  Due timers are moved to a
 * private list first, so callbacks may arm or cancel any timer (including
 * ones still waiting on the private list) safely.
 */
static void tw_advance(uint64_t now)
{
  dlist_t due;
  dlist_node_t *n, *next;
  tw_timer_t *t;
  uint64_t tick, steps;

  if(now > tw_tick)
    tw_tick = now;
  if(now <= tw_done)
    return;
  steps = now - tw_done;
  if(steps > TW_SLOTS)
    steps = TW_SLOTS; /* every slot visited once is enough */
  dlist_init(&due);
  for(tick = now - steps + 1; tick <= now; tick++)
    {
      dlist_t *slot = &tw_slot[tick % TW_SLOTS];
      for(n = slot->head; n != NULL; n = next)
	{
	  next = n->next;
	  t = CONTAINER_OF(n, tw_timer_t, node);
	  if(t->expire > now)
	    continue;
	  dlist_remove(slot, n);
	  dlist_push_tail(&due, n);
	  t->slot = &due;
	}
    }
  /* slot order is expiry order unless the gap wrapped the wheel */
  if(now - tw_done > TW_SLOTS && due.count > 1)
    tw_sort_due(&due);
  tw_done = now;
  while((n = dlist_pop_head(&due)) != NULL)
    {
      t = CONTAINER_OF(n, tw_timer_t, node);
      t->slot = NULL;
      tw_count--;
      t->fn(t);
    }
  return;
}

/* milliseconds until the next tick boundary, or -1 when nothing is armed */
static int tw_timeout_ms(void)
{
  struct timeval now;
  int64_t ms;
  if(tw_count == 0)
    return -1;
  time_mono(&now);
  ms = (int64_t)(tw_tick + 1) * 1000 - timeval_diff_ms(&now, &tw_epoch);
  if(ms < 0)
    return 0;
  return (int)(ms + 1);
}

/* ---------------------------------------------------------------------
 * Access control: source allow-lists and per-source limits
 *
 * Decided at accept, from the peer address alone, before a byte is read:
 * -O allow for scamper connections, -O mux-allow for TCP mux clients,
 * -O per-source-max for the connections (in handshake or GO; a zombie
 * holds none) one source may hold at once, where a source is an IPv4
 * address or an IPv6 /64 (one host usually owns a whole /64), and
 * -O mux-max for mux clients of both kinds together.  An address is no
 * identity: this limits exposure, it does not authenticate (-C does).
 * Refusals are counted in stats (the metrics).
 * --------------------------------------------------------------------- */

#define SRC_V6_BITS 64

/* live connections of one source; exists while count > 0 */
typedef struct src_ent
{
  cidr_t           key;
  long             count;
  splaytree_node_t node;
} src_ent_t;

static splaytree_t src_index;
static int         src_index_ready = 0;

static int src_cmp(const void *a, const void *b)
{
  return cidr_cmp(&((const src_ent_t *)a)->key, &((const src_ent_t *)b)->key);
}

static void src_index_init(void)
{
  if(src_index_ready)
    return;
  splaytree_init(&src_index, src_cmp, offsetof(src_ent_t, node));
  src_index_ready = 1;
  return;
}

/* 1 if sa lies in one of the n networks */
static int cidr_list_match(const cidr_t *list, size_t n,
			   const struct sockaddr *sa)
{
  size_t i;
  for(i=0; i<n; i++)
    if(cidr_match(&list[i], sa))
      return 1;
  return 0;
}

/* the live connection count of sa's source (0 when none) */
static long src_count(const struct sockaddr *sa)
{
  src_ent_t key, *e;
  src_index_init();
  if(cidr_of_sockaddr(sa, SRC_V6_BITS, &key.key) != 0)
    return 0;
  if((e = splaytree_find(&src_index, &key)) == NULL)
    return 0;
  return e->count;
}

/*
 * The constructor side of a source count: vp's connection from sa now
 * counts against its source.  Only kept with -O per-source-max.  Without
 * memory the connection is simply not counted.
 */
static void src_hold(vp_t *vp, const struct sockaddr *sa)
{
  src_ent_t key, *e;
  if(opt_per_source_max == 0 || vp->src != NULL)
    return;
  src_index_init();
  if(cidr_of_sockaddr(sa, SRC_V6_BITS, &key.key) != 0)
    return;
  if((e = splaytree_find(&src_index, &key)) == NULL)
    {
      if((e = calloc(1, sizeof(src_ent_t))) == NULL)
	return;
      e->key = key.key;
      splaytree_insert(&src_index, e);
    }
  e->count++;
  vp->src = e;
  return;
}

/* the teardown side: vp's connection is gone; the last one frees it */
static void src_release(vp_t *vp)
{
  src_ent_t *e = vp->src;
  if(e == NULL)
    return;
  vp->src = NULL;
  if(--e->count > 0)
    return;
  splaytree_remove(&src_index, e);
  free(e);
  return;
}

/*
 * May a scamper connection from sa be taken?  Returns 0, or -1 after a
 * log line and a count (the caller closes the fd unread).
 */
static int access_vp_check(const struct sockaddr *sa)
{
  char addr[INET6_ADDRSTRLEN];
  long n;

  if(opt_allow_count == 0 && opt_per_source_max == 0)
    return 0;
  if(sockaddr_tostr(sa, addr, sizeof(addr)) == NULL)
    snprintf(addr, sizeof(addr), "?");
  if(opt_allow_count > 0 &&
     !cidr_list_match(opt_allow, opt_allow_count, sa))
    {
      stats.rejects[REJ_ALLOW]++;
      log_warn("%s: connection refused: source not in -O allow", addr);
      return -1;
    }
  if(opt_per_source_max > 0 && (n = src_count(sa)) >= opt_per_source_max)
    {
      stats.rejects[REJ_PER_SOURCE]++;
      log_warn("%s: connection refused: source holds %ld connections "
	       "(per-source-max)", addr, n);
      return -1;
    }
  return 0;
}

/*
 * May a mux client be taken?  tcp_sa is its address on the TCP mux, NULL
 * on the unix socket.  Returns 0, or -1 after a log line and a count.
 */
static int access_mux_check(const struct sockaddr *tcp_sa)
{
  char addr[INET6_ADDRSTRLEN];

  if(tcp_sa != NULL && opt_mux_allow_count > 0 &&
     !cidr_list_match(opt_mux_allow, opt_mux_allow_count, tcp_sa))
    {
      if(sockaddr_tostr(tcp_sa, addr, sizeof(addr)) == NULL)
	snprintf(addr, sizeof(addr), "?");
      stats.mux_refused[0]++;
      log_warn("%s: mux connection refused: source not in -O mux-allow",
	       addr);
      return -1;
    }
  if(opt_mux_max > 0 && (long)mc_list.count >= opt_mux_max)
    {
      stats.mux_refused[1]++;
      log_warn("%ld mux clients connected (mux-max): refusing a new one",
	       (long)mc_list.count);
      return -1;
    }
  return 0;
}

/* ---------------------------------------------------------------------
 * Pre-protocol header (PROXY protocol: -O proxy-from, -O proxy-ports)
 *
 * Behind a TCP balancer every connection comes from the balancer; with
 * the PROXY protocol (HAProxy's send-proxy / send-proxy-v2) it first
 * sends a header naming the real client.  A listener opts in with its
 * PP_ bit in opt_proxy_ports; a connection it accepts from an
 * -O proxy-from address is parked here as a prehdr_t and nothing else
 * sees it until the header is complete: the header is read with a peek
 * and only its own bytes are consumed, so TLS and the protocol behind it
 * find their first byte untouched.  Then the fd and the header's source
 * address go to the listener's take function (prehdr_take), which runs
 * the allow-list and per-source checks on that address exactly as for a
 * direct connection; the balancer's own address needs no -O allow entry.
 * Connections from other addresses never get here, so a header from an
 * untrusted source is only a protocol error to the protocol that reads
 * it.  A v2 LOCAL or v1 UNKNOWN header (a balancer's health check) is
 * closed quietly, and so is a connection that closes before sending a
 * byte (a plain TCP check).  Each parked connection has PREHDR_TIMEOUT
 * seconds; at most -O handshake-max are parked at once.  Live upgrade:
 * parked connections are not part of the handed-over state; the old
 * process closes them on exit and the balancer's client retries.
 * --------------------------------------------------------------------- */

#define PP_SCAMPER      0x1   /* -P */
#define PP_MUX          0x2   /* -O mux-listen */
#define PP_METRICS      0x4   /* -O metrics */
#define PREHDR_TIMEOUT  5     /* seconds for the whole header */

#define PHR_OK     0          /* stats.proxy_hdrs[]: a client's address */
#define PHR_LOCAL  1          /* health check (LOCAL, UNKNOWN, no bytes) */
#define PHR_BAD    2          /* malformed, truncated, or too slow */

struct prehdr
{
  fdev_t        ev;
  unsigned int  kind;                /* the listener's PP_ bit */
  uint8_t       dead;
  char          peer[INET6_ADDRSTRLEN + 8]; /* the balancer, for logs */
  uint8_t       in[PROXY_HDR_MAX];   /* header bytes consumed so far */
  size_t        have;
  tw_timer_t    timer;
  dlist_node_t  list_node;
  slist_node_t  gc_node;
};

static dlist_t prehdr_list;
static slist_t gc_prehdrs;

static void vp_take(int fd, const struct sockaddr *sa);
static void mux_take(int fd, const struct sockaddr *tcp_sa);
static void http_take(int fd);

/* does a connection from sa to the kind listener start with a header? */
static int prehdr_wanted(unsigned int kind, const struct sockaddr *sa)
{
  return (opt_proxy_ports & kind) != 0 && opt_proxy_from_count > 0 &&
    cidr_list_match(opt_proxy_from, opt_proxy_from_count, sa);
}

/*
 * The one teardown of a parked connection: closes the fd unless it was
 * handed on (fd -1); memory is freed at the end of the loop iteration.
 */
static void prehdr_close(prehdr_t *ph)
{
  if(ph->dead)
    return;
  ph->dead = 1;
  tw_cancel(&ph->timer);
  ev_close(&ph->ev);
  dlist_remove(&prehdr_list, &ph->list_node);
  slist_push_tail(&gc_prehdrs, &ph->gc_node);
  return;
}

/* a refused header: one log line, a count, the close */
static void prehdr_fail(prehdr_t *ph, const char *why)
{
  stats.proxy_hdrs[PHR_BAD]++;
  log_warn("%s: %s: closing", ph->peer, why);
  prehdr_close(ph);
  return;
}

static void prehdr_timer(tw_timer_t *t)
{
  prehdr_t *ph = CONTAINER_OF(t, prehdr_t, timer);
  prehdr_fail(ph, ph->have > 0 ? "PROXY header not complete in time" :
	      "no PROXY header in time");
  return;
}

/*
 * Park an accepted connection from a trusted balancer until its header
 * is read.  Owns fd from here on: closes it when refused.
 */
static void prehdr_open(int fd, const struct sockaddr *sa, unsigned int kind)
{
  prehdr_t *ph;
  char addr[INET6_ADDRSTRLEN];

  if((long)prehdr_list.count >= opt_handshake_max)
    {
      log_warn_flood("%ld connections waiting for a PROXY header: "
		     "refusing new ones", (long)prehdr_list.count);
      close(fd);
      return;
    }
  if(!ev_fd_ok(fd) || fd_nonblock(fd) != 0 || fd_cloexec(fd) != 0 ||
     (ph = calloc(1, sizeof(prehdr_t))) == NULL)
    {
      log_warn("could not take balancer connection fd %d", fd);
      close(fd);
      return;
    }
  fdev_init(&ph->ev, fd, FD_PREHDR, ph);
  ph->kind = kind;
  if(sockaddr_tostr(sa, addr, sizeof(addr)) == NULL)
    snprintf(addr, sizeof(addr), "?");
  snprintf(ph->peer, sizeof(ph->peer), "%s%c%d", addr,
	   sa->sa_family == AF_INET6 ? '.' : ':', sockaddr_port(sa));
  tw_timer_init(&ph->timer, prehdr_timer);
  dlist_node_init(&ph->list_node);
  dlist_push_tail(&prehdr_list, &ph->list_node);
  tw_arm(&ph->timer, PREHDR_TIMEOUT);
  if(ev_set(&ph->ev, 1, 0) != 0)
    prehdr_fail(ph, "could not register");
  return;
}

/* consume n header bytes already seen with MSG_PEEK; 0 or -1 */
static int prehdr_consume(prehdr_t *ph, size_t n)
{
  ssize_t r;
  while(n > 0)
    {
      if((r = recv(ph->ev.fd, ph->in + ph->have, n, 0)) <= 0)
	return -1; /* peeked bytes cannot vanish: treat as lost */
      ph->have += (size_t)r;
      n -= (size_t)r;
    }
  return 0;
}

/* the header is complete: hand the fd on under the client's address */
static void prehdr_take(prehdr_t *ph, const proxy_hdr_t *h)
{
  char addr[INET6_ADDRSTRLEN];
  int fd = ph->ev.fd;

  if(h->cmd == PROXY_CMD_LOCAL)
    {
      stats.proxy_hdrs[PHR_LOCAL]++;
      log_dbg("%s: PROXY v%d health check", ph->peer, h->version);
      prehdr_close(ph);
      return;
    }
  stats.proxy_hdrs[PHR_OK]++;
  if(opt_flags & OPT_DEBUG)
    {
      if(sockaddr_tostr((const struct sockaddr *)&h->src, addr,
			sizeof(addr)) == NULL)
	snprintf(addr, sizeof(addr), "?");
      log_dbg("%s: PROXY v%d: client %s port %d", ph->peer, h->version,
	      addr, sockaddr_port((const struct sockaddr *)&h->src));
    }
  ev_forget(&ph->ev);
  ph->ev.fd = -1;
  prehdr_close(ph);
  switch(ph->kind)
    {
    case PP_SCAMPER: vp_take(fd, (const struct sockaddr *)&h->src); break;
    case PP_MUX:     mux_take(fd, (const struct sockaddr *)&h->src); break;
    default:         http_take(fd); break;
    }
  return;
}

/*
 * Readable: peek at what has arrived, consume the bytes that belong to
 * the header (all of them while it is incomplete, since a PROXY_MORE
 * answer means every byte so far is header), and act on the verdict.
 */
static void prehdr_read(prehdr_t *ph)
{
  proxy_hdr_t h;
  ssize_t n;
  long rc;

  if(ph->dead)
    return;
  n = recv(ph->ev.fd, ph->in + ph->have, sizeof(ph->in) - ph->have,
	   MSG_PEEK);
  if(n < 0)
    {
      if(errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)
	prehdr_fail(ph, "read error before the PROXY header");
      return;
    }
  if(n == 0)
    {
      if(ph->have > 0)
	{
	  prehdr_fail(ph, "truncated PROXY header");
	  return;
	}
      stats.proxy_hdrs[PHR_LOCAL]++;
      log_dbg("%s: closed before a PROXY header (health check)", ph->peer);
      prehdr_close(ph);
      return;
    }
  rc = proxy_hdr_parse(ph->in, ph->have + (size_t)n, &h);
  if(rc < 0)
    prehdr_fail(ph, proxy_hdr_strerror(rc));
  else if(prehdr_consume(ph, rc == PROXY_MORE ? (size_t)n :
			 (size_t)rc - ph->have) != 0)
    prehdr_fail(ph, "read error in the PROXY header");
  else if(rc > 0)
    prehdr_take(ph, &h);
  return;
}

static void prehdr_shutdown(void)
{
  dlist_node_t *n;
  while((n = prehdr_list.head) != NULL)
    prehdr_close(CONTAINER_OF(n, prehdr_t, list_node));
  return;
}

static void prehdr_gc(void)
{
  slist_node_t *n;
  while((n = slist_pop_head(&gc_prehdrs)) != NULL)
    free(CONTAINER_OF(n, prehdr_t, gc_node));
  return;
}

/* ---------------------------------------------------------------------
 * Transport (plain/TLS)
 *
 * conn_t hides whether a connection is TLS: conn_read, conn_writev,
 * conn_handshake, conn_shutdown and conn_close take the plain path (one
 * read or writev) or the TLS one, and map EAGAIN / SSL_ERROR_WANT_* to
 * the CONN_ codes in this one place.  TLS wants (a read that needs
 * writability, a write that needs readability) are recorded in the conn
 * so the owner's dispatch can retry the right side.  The plain path costs
 * one predictable branch per call, never a syscall or an indirect call.
 * --------------------------------------------------------------------- */

#define CONN_AGAIN   (-2)  /* would block */
#define CONN_ERROR   (-1)  /* I/O error or reset: the connection is lost */
#define CONN_PROTO   (-3)  /* TLS protocol error: a protocol error */

#ifdef HAVE_OPENSSL
static SSL_CTX *tls_ctx = NULL;

static const char *tls_errstr(void)
{
  static char buf[256];
  unsigned long e = ERR_get_error();
  if(e == 0)
    return "no OpenSSL error";
  ERR_error_string_n(e, buf, sizeof(buf));
  ERR_clear_error();
  return buf;
}
#endif

/* a plain connection on fd for obj; peer names it in log lines */
static void conn_init(conn_t *c, int fd, fdtype_t type, void *obj,
		      const char *peer)
{
  fdev_init(&c->ev, fd, type, obj);
#ifdef HAVE_OPENSSL
  c->ssl = NULL;
#endif
  c->peer = peer;
  c->hs = 0;
  c->rd_want_wr = 0;
  c->wr_want_rd = 0;
  return;
}

/* 1 if this build can speak TLS at all */
static int conn_tls_built(void)
{
#ifdef HAVE_OPENSSL
  return 1;
#else
  return 0;
#endif
}

static int conn_is_tls(const conn_t *c)
{
#ifdef HAVE_OPENSSL
  return c->ssl != NULL;
#else
  (void)c;
  return 0;
#endif
}

/* 1 if TLS holds decrypted bytes, which raise no fd event */
static int conn_pending(const conn_t *c)
{
#ifdef HAVE_OPENSSL
  return c->ssl != NULL && SSL_pending(c->ssl) > 0;
#else
  (void)c;
  return 0;
#endif
}

/*
 * Start the server side of TLS on an accepted connection when a TLS
 * context is configured (-c/-p); a no-op otherwise.  The handshake then
 * runs in conn_handshake (c->hs set).  Returns 0, or -1 (logged) when no
 * TLS session could be made; the caller closes the connection.
 */
static int conn_tls_start(conn_t *c)
{
#ifdef HAVE_OPENSSL
  if(tls_ctx == NULL)
    return 0;
  if((c->ssl = SSL_new(tls_ctx)) == NULL ||
     SSL_set_fd(c->ssl, c->ev.fd) != 1)
    {
      log_warn("%s: could not create TLS session: %s", c->peer,
	      tls_errstr());
      return -1;
    }
  SSL_set_accept_state(c->ssl);
  c->hs = 1;
#else
  (void)c;
#endif
  return 0;
}

/*
 * Drive the non-blocking TLS handshake one step, watching the side it
 * waits for.  Returns 1 when established (c->hs cleared; the caller
 * re-registers the interest it wants), 0 while in progress, CONN_PROTO
 * when it failed (logged), or CONN_ERROR when the fd could not be
 * watched.  The caller closes the connection on < 0.
 */
static int conn_handshake(conn_t *c)
{
#ifdef HAVE_OPENSSL
  int rc, err;
  if(!c->hs)
    return 1;
  ERR_clear_error();
  if((rc = SSL_accept(c->ssl)) == 1)
    {
      c->hs = 0;
      log_dbg("%s: TLS established, %s", c->peer, SSL_get_version(c->ssl));
      return 1;
    }
  err = SSL_get_error(c->ssl, rc);
  if(err == SSL_ERROR_WANT_READ || err == SSL_ERROR_WANT_WRITE)
    return ev_set(&c->ev, 1, err == SSL_ERROR_WANT_WRITE) != 0 ?
      CONN_ERROR : 0;
  log_warn("%s: TLS handshake failed: %s", c->peer,
	   err == SSL_ERROR_SSL ? tls_errstr() : "connection error");
  return CONN_PROTO;
#else
  (void)c;
  return 1;
#endif
}

#ifdef HAVE_OPENSSL
/* the TLS side of conn_read */
static ssize_t conn_tls_read(conn_t *c, uint8_t *buf, size_t len)
{
  int rc, err;
  c->rd_want_wr = 0;
  ERR_clear_error();
  if((rc = SSL_read(c->ssl, buf, len > INT_MAX ? INT_MAX : (int)len)) > 0)
    return rc;
  err = SSL_get_error(c->ssl, rc);
  switch(err)
    {
    case SSL_ERROR_WANT_READ:
      return CONN_AGAIN;
    case SSL_ERROR_WANT_WRITE:
      c->rd_want_wr = 1;
      return ev_want_write(&c->ev, 1) != 0 ? CONN_ERROR : CONN_AGAIN;
    case SSL_ERROR_ZERO_RETURN:
      return 0;
    case SSL_ERROR_SYSCALL:
      if(errno == EAGAIN || errno == EINTR)
	return CONN_AGAIN;
      return errno == 0 ? 0 : CONN_ERROR;
    default:
#ifdef SSL_R_UNEXPECTED_EOF_WHILE_READING
      /* the peer vanished without close_notify: a lost connection */
      if(ERR_GET_REASON(ERR_peek_error()) ==
	 SSL_R_UNEXPECTED_EOF_WHILE_READING)
	{
	  ERR_clear_error();
	  return CONN_ERROR;
	}
#endif
      log_dbg("%s: TLS read: %s", c->peer, tls_errstr());
      return CONN_PROTO;
    }
}

/* the TLS side of conn_writev */
static int conn_tls_writev(conn_t *c, buf_t *b)
{
  chunk_t *ch;
  int rc, err;
  c->wr_want_rd = 0;
  while((ch = b->first) != NULL)
    {
      ERR_clear_error();
      rc = SSL_write(c->ssl, ch->data + ch->head, (int)(ch->tail - ch->head));
      if(rc > 0)
	{
	  buf_drop(b, (size_t)rc);
	  continue;
	}
      err = SSL_get_error(c->ssl, rc);
      if(err == SSL_ERROR_WANT_WRITE)
	return 0;
      if(err == SSL_ERROR_WANT_READ)
	{
	  c->wr_want_rd = 1;
	  return 0;
	}
      if(err == SSL_ERROR_SYSCALL)
	return CONN_ERROR;
      log_dbg("%s: TLS write: %s", c->peer, tls_errstr());
      return CONN_PROTO;
    }
  return 0;
}
#endif

/* read into buf; > 0 bytes, 0 EOF, or one of the CONN_ codes */
static ssize_t conn_read(conn_t *c, void *buf, size_t len)
{
  ssize_t n;
#ifdef HAVE_OPENSSL
  if(c->ssl != NULL)
    return conn_tls_read(c, buf, len);
#endif
  if((n = read(c->ev.fd, buf, len)) < 0)
    {
      if(errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)
	return CONN_AGAIN;
      return CONN_ERROR;
    }
  return n;
}

/*
 * Write as much of b as the connection takes (one writev when plain),
 * dropping what was written.  Returns 0 (drained or would block) or a
 * CONN_ error code.
 */
static int conn_writev(conn_t *c, buf_t *b)
{
#ifdef HAVE_OPENSSL
  if(c->ssl != NULL)
    return conn_tls_writev(c, b);
#endif
  return buf_writev(b, c->ev.fd) == 0 ? 0 : CONN_ERROR;
}

/*
 * Hand a connection from one owner to another (a resumed session takes
 * over the connection of the temporary object that carried MASTER_RES):
 * the fd's registration and the TLS session move; to's peer stays.
 * Returns ev_move's result; from is left closed either way.
 */
static int conn_move(conn_t *from, conn_t *to)
{
#ifdef HAVE_OPENSSL
  to->ssl = from->ssl;
  from->ssl = NULL;
#endif
  to->hs = from->hs;
  to->rd_want_wr = from->rd_want_wr;
  to->wr_want_rd = from->wr_want_rd;
  from->hs = from->rd_want_wr = from->wr_want_rd = 0;
  return ev_move(&from->ev, &to->ev);
}

/* say goodbye at the TLS level (close_notify) without closing the fd */
static void conn_shutdown(conn_t *c)
{
#ifdef HAVE_OPENSSL
  if(c->ssl != NULL && c->ev.fd >= 0)
    SSL_shutdown(c->ssl);
#else
  (void)c;
#endif
  return;
}

/* close the connection: TLS state freed, fd deregistered and closed */
static void conn_close(conn_t *c)
{
#ifdef HAVE_OPENSSL
  if(c->ssl != NULL)
    {
      SSL_free(c->ssl);
      c->ssl = NULL;
    }
#endif
  c->hs = 0;
  c->rd_want_wr = 0;
  c->wr_want_rd = 0;
  ev_close(&c->ev);
  return;
}

/* ---------------------------------------------------------------------
 * Backpressure
 *
 * Output toward a local consumer is bounded: past opt_buf_high the VPs
 * feeding it are paused (not read; TCP pushes back to scamper, which
 * buffers on its side) until it drains below opt_buf_low.  A paused VP
 * keeps sending keepalives and its rx_abort is suspended.  Input from a
 * local client is bounded by its VP's unacked queue (opt_unacked_max),
 * which matters most while the VP is a zombie.
 *
 * Tenant isolation (-O spool-dir).  Pausing a VP stops every channel on
 * it, so one consumer that stops reading would hold every other tenant of
 * its VPs to its pace; and the remote protocol has no per-channel flow
 * control, so the only way to keep serving the others is to go on reading
 * the VP and keep the stalled consumer's bytes somewhere.  Memory is not
 * that place (it would be unbounded); a file is.  So with a spool
 * directory a consumer's stream is, in order: its in-memory queue (out,
 * up to opt_buf_high), then an unlinked spool file (bytes [sp_rd, sp_wr)),
 * then a small in-memory tail (pend) that is appended to the file in
 * SPOOL_BATCH pieces.  New bytes go to out only while the file and pend
 * are empty and out is under buffer-high; as out drains below buffer-low
 * it is refilled from the file (consumed ranges are punched out, so the
 * disk used is the backlog, not the history), and once the file is empty
 * it is closed and pend is moved to out.  Nothing is reordered: each
 * byte's place is fixed when it is queued.  Memory per consumer stays
 * near buffer-high (out) + SPOOL_BATCH (pend), as without a spool, and
 * within buffer-high + 2 * SPOOL_SLACK (plus a frame) when pend cannot be
 * written (below: out is refilled from the file meanwhile); the file is
 * created with O_TMPFILE (or unlinked at once), so it never outlives the
 * process, and closing the consumer closes it.
 *
 * The sink is "full" (its VPs are paused, and stall-timeout runs) only
 * when pend exceeds SPOOL_SLACK, which happens only when pend cannot be
 * written: the consumer's spool is at -O spool-max,
 * all spools together are at -O spool-total (then the consumer that
 * next needs to spool falls back, whichever it is), or the write failed
 * (ENOSPC, EIO: nothing is lost, the bytes stay in memory; logged, and
 * the spool is not used again for that consumer until it has drained).
 * That is today's policy: the consumer that cannot take more pauses the
 * VPs that feed it and is cut after stall-timeout seconds with no write
 * progress.  It resumes them once pend fits in the spool again (or, when
 * spooling failed, once it has drained to buffer-low).  Each fallback
 * episode is logged once and counted (sc_remoted_spool_cap_hits_total,
 * sc_remoted_spool_errors_total).  A consumer that is slow but within
 * its caps never pauses its VPs and is never cut.  Without spool-dir
 * pend is never used and a consumer behaves as before: past buffer-high
 * (out) its VPs pause, for every tenant of them.
 *
 * A live upgrade does not hand spool files over: spool_drain_all(), just
 * before the state is saved, reads every spool back into its consumer's
 * out, which the state carries as ordinary queued output.
 * --------------------------------------------------------------------- */

#define SPOOL_BATCH   (64 * 1024)   /* pend is written in pieces this big */
#define SPOOL_SLACK   (256 * 1024)  /* pend over this: full (> a batch
				       plus a frame, so only when pend
				       cannot be written) */

static void vp_read(vp_t *vp);
static void vp_lost(vp_t *vp, const char *why);
static void uc_stall(tw_timer_t *t);
static void mc_stall(tw_timer_t *t);

static int      spool_dirfd = -1;      /* -O spool-dir, opened at startup */
static uint64_t spool_live  = 0;       /* bytes in all spool files */
static uint64_t spool_files = 0;       /* spool files open */

static void sink_init(sink_t *s, void (*stall_fn)(tw_timer_t *))
{
  memset(&s->out, 0, sizeof(s->out));
  memset(&s->pend, 0, sizeof(s->pend));
  s->full = 0;
  s->last_progress = tw_tick;
  tw_timer_init(&s->stall_timer, stall_fn);
  s->sp_fd = -1;
  s->sp_off = s->sp_capped = 0;
  s->sp_rd = s->sp_wr = 0;
  return;
}

/* the consumer's name for log lines: the stall callback tells its kind */
static const char *sink_who(const sink_t *s, char *buf, size_t len)
{
  if(s->stall_timer.fn == uc_stall)
    {
      const uclient_t *uc = CONTAINER_OF(s, uclient_t, sink);
      snprintf(buf, len, "%s: local client on channel %u",
	       uc->vp != NULL ? uc->vp->peer : "?",
	       uc->chan != NULL ? uc->chan->id : 0);
    }
  else
    snprintf(buf, len, "mux client %llu",
	     (unsigned long long)CONTAINER_OF(s, mclient_t, sink)->gen);
  return buf;
}

static uint64_t sink_spooled(const sink_t *s)
{
  return s->sp_wr - s->sp_rd;
}

/* every byte queued for the consumer: memory and spool */
static uint64_t sink_backlog(const sink_t *s)
{
  return buf_len(&s->out) + buf_len(&s->pend) + sink_spooled(s);
}

static size_t sink_mem(const sink_t *s)
{
  return buf_len(&s->out) + buf_len(&s->pend);
}

/* where bytes queued now belong: out, or behind the spool */
static buf_t *sink_in(sink_t *s)
{
  if(s->sp_fd < 0 && buf_len(&s->pend) == 0 &&
     (spool_dirfd < 0 || buf_len(&s->out) < opt_buf_high))
    return &s->out;
  return &s->pend;
}

/* close s's spool file (its bytes were read or are abandoned) */
static void spool_close(sink_t *s)
{
  if(s->sp_fd < 0)
    return;
  close(s->sp_fd);
  s->sp_fd = -1;
  spool_live -= sink_spooled(s);
  spool_files--;
  s->sp_rd = s->sp_wr = 0;
  s->sp_off = 0; /* a later backlog may try the disk again */
  return;
}

static void sink_fini(sink_t *s)
{
  tw_cancel(&s->stall_timer);
  buf_clear(&s->out);
  buf_clear(&s->pend);
  spool_close(s);
  s->full = 0;
  return;
}

/*
 * An unlinked file in the spool directory: O_TMPFILE where the kernel and
 * file system have it, else a fresh name unlinked at once.  Returns the
 * fd or -1 (errno set).
 */
static int spool_file_open(void)
{
  char name[64];
  int fd, i;
#ifdef O_TMPFILE
  if((fd = openat(spool_dirfd, ".", O_TMPFILE | O_RDWR | O_CLOEXEC,
		  0600)) >= 0)
    return fd;
  if(errno != EOPNOTSUPP && errno != EISDIR && errno != EINVAL)
    return -1;
#endif
  for(i=0; i<16; i++)
    {
      snprintf(name, sizeof(name), ".sc_remoted-spool-%ld-%08lx",
	       (long)getpid(), (unsigned long)random());
      if((fd = openat(spool_dirfd, name,
		      O_CREAT | O_EXCL | O_RDWR | O_CLOEXEC, 0600)) >= 0)
	{
	  unlinkat(spool_dirfd, name, 0);
	  return fd;
	}
      if(errno != EEXIST)
	return -1;
    }
  return -1;
}

/* a fallback episode starts: log and count it once */
static void spool_fallback(sink_t *s, const char *why, int err)
{
  char who[128];
  if(err != 0)
    {
      stats.spool_errors++;
      log_warn("%s: spooling failed (%s): %s; keeping its backlog in "
	       "memory, its VPs are paused while it is over buffer-high",
	       sink_who(s, who, sizeof(who)), why, strerror(err));
      s->sp_off = 1;
      return;
    }
  if(s->sp_capped)
    return;
  s->sp_capped = 1;
  stats.spool_cap_hits++;
  log_warn("%s: %s reached (%" PRIu64 " bytes spooled, %" PRIu64
	   " in all spools): pausing its VPs until it drains; cut after "
	   "%lds without progress", sink_who(s, who, sizeof(who)), why,
	   sink_spooled(s), spool_live, opt_stall);
  return;
}

/*
 * Append pend to the spool file, creating it if needed, when the caps
 * allow.  On a write error the written part stays written and the rest
 * stays in pend, so nothing is lost.  Returns 0 if pend was written.
 */
static int spool_write(sink_t *s)
{
  struct iovec iov[BUF_IOV_MAX];
  size_t len = buf_len(&s->pend);
  ssize_t rc;
  int n;

  if(spool_dirfd < 0 || s->sp_off || len == 0)
    return -1;
  if(sink_spooled(s) + len > opt_spool_max)
    {
      spool_fallback(s, "spool-max", 0);
      return -1;
    }
  if(spool_live + len > opt_spool_total)
    {
      spool_fallback(s, "spool-total", 0);
      return -1;
    }
  if(s->sp_fd < 0)
    {
      if((s->sp_fd = spool_file_open()) < 0)
	{
	  spool_fallback(s, "creating a file", errno);
	  return -1;
	}
      spool_files++;
    }
  while(buf_len(&s->pend) > 0)
    {
      n = buf_iov(&s->pend, iov, BUF_IOV_MAX);
      if((rc = pwritev(s->sp_fd, iov, n, (off_t)s->sp_wr)) <= 0)
	{
	  if(rc < 0 && errno == EINTR)
	    continue;
	  spool_fallback(s, "writing", rc < 0 ? errno : ENOSPC);
	  return -1;
	}
      buf_drop(&s->pend, (size_t)rc);
      s->sp_wr += (uint64_t)rc;
      spool_live += (uint64_t)rc;
      stats.spool_written += (uint64_t)rc;
    }
  s->sp_capped = 0;
  return 0;
}

/*
 * Move spooled bytes into out until out reaches `upto` or the file is
 * empty; an empty file is closed and pend follows into out.  Returns 0,
 * or -1 if the file could not be read (its bytes are lost: the caller
 * closes the consumer).
 */
static int spool_refill(sink_t *s, size_t upto)
{
  chunk_t *c;
  uint64_t from = s->sp_rd;
  size_t want;
  ssize_t rc;

  while(s->sp_fd >= 0 && sink_spooled(s) > 0 && buf_len(&s->out) < upto)
    {
      if((c = chunk_get(1)) == NULL)
	return 0; /* try again on the next flush */
      want = c->cap;
      if(want > sink_spooled(s))
	want = (size_t)sink_spooled(s);
      if((rc = pread(s->sp_fd, c->data, want, (off_t)s->sp_rd)) <= 0)
	{
	  chunk_put(c);
	  if(rc < 0 && errno == EINTR)
	    continue;
	  return -1;
	}
      c->tail = (uint32_t)rc;
      if(s->out.last != NULL)
	s->out.last->next = c;
      else
	s->out.first = c;
      s->out.last = c;
      s->out.len += (size_t)rc;
      s->sp_rd += (uint64_t)rc;
      spool_live -= (uint64_t)rc;
    }
#if defined(FALLOC_FL_PUNCH_HOLE) && defined(FALLOC_FL_KEEP_SIZE)
  if(s->sp_fd >= 0 && s->sp_rd > from && sink_spooled(s) > 0)
    (void)fallocate(s->sp_fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
		    (off_t)from, (off_t)(s->sp_rd - from));
#else
  (void)from;
#endif
  if(s->sp_fd >= 0 && sink_spooled(s) == 0)
    spool_close(s);
  if(s->sp_fd < 0 && buf_len(&s->pend) > 0 && buf_len(&s->out) < upto)
    {
      /* the file is done: pend is next; move its chunks, no copy */
      if(s->out.last != NULL)
	s->out.last->next = s->pend.first;
      else
	s->out.first = s->pend.first;
      s->out.last = s->pend.last;
      s->out.len += s->pend.len;
      memset(&s->pend, 0, sizeof(s->pend));
      s->sp_off = 0; /* a later backlog may try the disk again */
    }
  return 0;
}

/* stop reading vp until every consumer it feeds has drained */
static void vp_pause(vp_t *vp)
{
  if(vp->rd_paused_by_sink || vp->dead)
    return;
  vp->rd_paused_by_sink = 1;
  stats.bp_pauses++;
  if(vp->conn.ev.fd >= 0 && ev_want_read(&vp->conn.ev, 0) != 0)
    vp_lost(vp, "could not stop reading");
  return;
}

/* bytes were queued on sink_in(s) by feeder (NULL: by the daemon) */
static void sink_appended(sink_t *s, vp_t *feeder)
{
  if(buf_len(&s->pend) >= SPOOL_BATCH)
    spool_write(s);
  if(!s->full && (spool_dirfd >= 0 ? buf_len(&s->pend) > SPOOL_SLACK :
		   buf_len(&s->out) > opt_buf_high))
    {
      s->full = 1;
      s->last_progress = tw_tick;
      tw_arm(&s->stall_timer, (unsigned int)opt_stall);
    }
  if(s->full && feeder != NULL)
    vp_pause(feeder);
  return;
}

/* may a full sink take bytes again? */
static int sink_can_resume(const sink_t *s)
{
  if(sink_mem(s) <= opt_buf_low)
    return 1;
  /* pend was written to the spool again: back within the caps */
  return spool_dirfd >= 0 && !s->sp_off && buf_len(&s->pend) == 0 &&
    buf_len(&s->out) <= opt_buf_high;
}

/*
 * Write a consumer's queued output to its socket, refilling it from the
 * spool as it drains, watching for writability only while something is
 * left.  Returns -1 on a write or spool read error (the caller closes the
 * consumer), 1 when the sink just stopped being full (the caller wakes
 * the VPs that feed it), else 0.
 */
static int sink_flush(sink_t *s, conn_t *c)
{
  uint64_t before = sink_backlog(s);
  int round;
  for(round = 0; round < 4; round++)
    {
      if(conn_writev(c, &s->out) != 0)
	{
	  buf_clear(&s->out);
	  return -1;
	}
      if(buf_len(&s->out) > opt_buf_low ||
	 (s->sp_fd < 0 && buf_len(&s->pend) == 0))
	break;
      if(spool_refill(s, opt_buf_high) != 0)
	{
	  char who[128];
	  stats.spool_errors++;
	  log_err("%s: reading its spool failed: %s; closing it",
		  sink_who(s, who, sizeof(who)), strerror(errno));
	  return -1;
	}
      if(buf_len(&s->pend) >= SPOOL_BATCH ||
	 (s->full && buf_len(&s->pend) > 0))
	spool_write(s);
    }
  if(ev_want_write(&c->ev, buf_len(&s->out) > 0) != 0)
    return -1;
  if(sink_backlog(s) < before)
    s->last_progress = tw_tick;
  if(s->full && sink_can_resume(s))
    {
      s->full = 0;
      s->sp_capped = 0;
      tw_cancel(&s->stall_timer);
      return 1;
    }
  return 0;
}

/*
 * Before a live upgrade saves the state: every consumer's spool and pend
 * are read back into its out, which the state carries (spool files are
 * not handed over).  Returns -1 if the spool could not be read: the
 * caller closes that consumer (its stream would have a hole otherwise).
 */
static void uc_close(uclient_t *uc, const char *why);
static void mc_close(mclient_t *mc, const char *why);

static int spool_drain_sink(sink_t *s)
{
  char who[128];
  if(spool_refill(s, SIZE_MAX) == 0)
    return 0;
  log_err("%s: reading its spool for the upgrade failed: %s",
	  sink_who(s, who, sizeof(who)), strerror(errno));
  return -1;
}

/* the -U clients whose spool could not be read back, closed after the
 * walk over their VP's channel tree (closing releases channels) */
typedef struct uc_lost
{
  uclient_t   **v;
  size_t        n, cap;
} uc_lost_t;

static int chan_spool_drain(void *item, void *param)
{
  chan_t *c = item;
  uc_lost_t *lost = param;
  uclient_t **nv;
  if(c->uc == NULL || c->uc->state == UC_DEAD ||
     spool_drain_sink(&c->uc->sink) == 0)
    return 0;
  if(lost->n == lost->cap)
    {
      if((nv = realloc(lost->v, (lost->cap + 8) * sizeof(*nv))) == NULL)
	{
	  log_err("%s: out of memory: a -U client whose spool was lost"
		  " stays open", c->vp->peer);
	  return 0;
	}
      lost->v = nv;
      lost->cap += 8;
    }
  lost->v[lost->n++] = c->uc;
  return 0;
}

static void spool_drain_all(void)
{
  dlist_node_t *n, *next;
  mclient_t *mc;
  uc_lost_t lost = { NULL, 0, 0 };
  size_t i;
  if(spool_dirfd < 0)
    return;
  for(n = mc_list.head; n != NULL; n = next)
    {
      next = n->next;
      mc = CONTAINER_OF(n, mclient_t, list_node);
      if(mc->state != MC_DEAD && spool_drain_sink(&mc->sink) != 0)
	mc_close(mc, "spool unreadable at upgrade");
    }
  for(n = vp_list.head; n != NULL; n = n->next)
    splaytree_inorder(&CONTAINER_OF(n, vp_t, list_node)->chans,
		      chan_spool_drain, &lost);
  for(i=0; i<lost.n; i++)
    uc_close(lost.v[i], "spool unreadable at upgrade");
  free(lost.v);
  return;
}

/* the stall timer fired: 1 if the consumer must go, else re-armed */
static int sink_stalled(sink_t *s)
{
  if(!s->full)
    return 0;
  if(tw_tick >= s->last_progress + (uint64_t)opt_stall)
    {
      stats.stall_disconnects++;
      return 1;
    }
  tw_arm_at(&s->stall_timer, s->last_progress + (uint64_t)opt_stall);
  return 0;
}

static int chan_sink_full(void *item, void *param)
{
  chan_t *c = item;
  (void)param;
  if(c->uc != NULL && c->uc->sink.full)
    return 1;
  if(c->mc != NULL && c->mc->sink.full)
    return 1;
  return 0;
}

/* read vp again (next iteration): TLS may hold decrypted bytes */
static void vp_again_queue(vp_t *vp)
{
  if(vp->again_queued || vp->dead)
    return;
  vp->again_queued = 1;
  dlist_push_tail(&vp_again, &vp->again_node);
  return;
}

/* resume reading vp if none of the consumers it feeds is full */
static void vp_try_unpause(vp_t *vp)
{
  if(vp == NULL || !vp->rd_paused_by_sink || vp->dead)
    return;
  if(splaytree_inorder(&vp->chans, chan_sink_full, NULL) != 0)
    return;
  vp->rd_paused_by_sink = 0;
  vp->last_rx = tw_tick; /* a full rx_abort window from now */
  if(vp->conn.ev.fd < 0 || vp->rd_stopped_by_flush)
    return;
  if(ev_want_read(&vp->conn.ev, 1) != 0)
    {
      vp_lost(vp, "could not resume reading");
      return;
    }
  if(conn_pending(&vp->conn))
    vp_again_queue(vp);
  return;
}

/* read the VPs queued by vp_again_queue (TLS bytes already decrypted) */
static void vp_again_run(void)
{
  dlist_node_t *n;
  vp_t *vp;
  while((n = dlist_pop_head(&vp_again)) != NULL)
    {
      vp = CONTAINER_OF(n, vp_t, again_node);
      vp->again_queued = 0;
      if(!vp->dead && !vp->rd_paused_by_sink && vp->conn.ev.fd >= 0 && !vp->rd_stopped_by_flush)
	vp_read(vp);
    }
  return;
}

static int vp_unacked_full(const vp_t *vp)
{
  return vp != NULL && buf_len(&vp->unacked) > opt_unacked_max;
}

static void in_paused_recheck(void);

/* ---------------------------------------------------------------------
 * Remote protocol (PROTOCOL.md 2)
 *
 * Owns vp_t: accept, the frame parser, control message handlers, the
 * reliable/unreliable send paths, resumption, zombies and the VP state
 * machine.  vp_set_state() is the only place a VP changes state;
 * vp_close() is the only teardown.
 * --------------------------------------------------------------------- */

static void vp_close(vp_t *vp, const char *why);
static void mux_announce_vp(vp_t *vp, uint64_t after_gen);
static void mux_depart_vp(vp_t *vp);
static void mux_burst_forget(vp_t *vp);
static int  vp_lev_open(vp_t *vp);
static char *vp_sockpath(const vp_t *vp);
static void vp_lev_close(vp_t *vp);
static int  chan_save(void *item, void *param);
static void chan_vp_gone(chan_t *c);
static void chan_on_data(chan_t *c, const uint8_t *data, size_t len);
static void chan_on_fin(chan_t *c);
static int  tls_check_name(vp_t *vp);
static int  tls_check_peer(vp_t *vp);

static int vp_id_cmp(const void *a, const void *b)
{
  const vp_t *x = a, *y = b;
  if(x->id < y->id) return -1;
  if(x->id > y->id) return 1;
  return 0;
}

/* magic ordered by length, then bytes (PROTOCOL.md 9.1) */
static int vp_magic_cmp(const void *a, const void *b)
{
  const vp_t *x = a, *y = b;
  if(x->magic_len != y->magic_len)
    return x->magic_len < y->magic_len ? -1 : 1;
  return memcmp(x->magic, y->magic, x->magic_len);
}

static int chan_vp_cmp(const void *a, const void *b)
{
  const chan_t *x = a, *y = b;
  if(x->id < y->id) return -1;
  if(x->id > y->id) return 1;
  return 0;
}

static vp_t *vp_find_id(uint32_t id)
{
  vp_t key;
  key.id = id;
  return splaytree_find(&vp_by_id, &key);
}

/* the VP with the smallest id greater than `id`, or NULL */
static vp_t *vp_find_next(uint32_t id)
{
  vp_t key;
  key.id = id;
  return splaytree_find_next(&vp_by_id, &key);
}

static vp_t *vp_find_magic(const uint8_t *magic, uint8_t len)
{
  vp_t key;
  key.magic = (uint8_t *)magic;
  key.magic_len = len;
  return splaytree_find(&vp_by_magic, &key);
}

static chan_t *vp_chan_find(vp_t *vp, uint32_t id)
{
  chan_t key;
  key.id = id;
  return splaytree_find(&vp->chans, &key);
}

/* "len:" and the first 8 magic bytes in hex, for debug lines */
static const char *magic_str(const uint8_t *m, uint8_t len, char *buf,
			     size_t sz)
{
  size_t off;
  int i;
  off = (size_t)snprintf(buf, sz, "%u:", len);
  for(i=0; i<len && i<8 && off + 3 < sz; i++)
    off += (size_t)snprintf(buf + off, sz - off, "%02x", m[i]);
  if(len > 8 && off + 4 < sz)
    snprintf(buf + off, sz - off, "...");
  return buf;
}

static const char *vp_state_str(vpstate_t st)
{
  return vp_state_names[st >= VP_HANDSHAKE && st <= VP_FLUSH ? st : 0];
}

/* ---- send paths ---- */

static void rp_hdr(uint8_t *h, uint32_t seq, uint32_t chan, uint16_t len)
{
  bytes_htonl(h, seq);
  bytes_htonl(h + 4, chan);
  bytes_htons(h + 8, len);
  return;
}

/*
 * Queue an unreliable or handshake frame (ACK, KEEPALIVE, MASTER_*) on the
 * current connection.  Dropped when there is no connection: unreliable
 * messages are never kept (PROTOCOL.md 2.3 rule 5).
 */
static void vp_send_raw(vp_t *vp, uint32_t seq, const uint8_t *body,
			uint16_t len)
{
  uint8_t frame[RP_HDRLEN + 2 + INET6_ADDRSTRLEN + 8];
  assert(len <= sizeof(frame) - RP_HDRLEN);
  if(vp->conn.ev.fd < 0)
    return;
  rp_hdr(frame, seq, 0, len);
  memcpy(frame + RP_HDRLEN, body, len);
  if(buf_append(&vp->out, frame, RP_HDRLEN + (size_t)len) != 0)
    {
      log_err("%s: out of memory", vp->peer);
      return;
    }
  out_queue(&vp->conn.ev);
  return;
}

static void vp_send_ack(vp_t *vp, uint32_t seq)
{
  uint8_t body[5];
  if(vp->state != VP_GO)
    return;
  body[0] = RP_ACK;
  bytes_htonl(body + 1, seq);
  vp_send_raw(vp, vp->snd_nxt, body, sizeof(body));
  vp->last_tx = tw_tick;
  return;
}

static void vp_send_keepalive(vp_t *vp)
{
  uint8_t body[1] = {RP_KEEPALIVE};
  if(vp->state != VP_GO)
    return;
  vp_send_raw(vp, vp->snd_nxt, body, 1);
  vp->last_tx = tw_tick;
  return;
}

/*
 * Send a reliable frame: number it with snd_nxt, keep a copy in the
 * unacked queue until ACKed (it is replayed on resume), and put it on the
 * wire if the VP is connected.  pre (may be NULL) and data are sent as
 * one body of prelen + len <= 65535 bytes.  Returns 0, or -1 if memory ran
 * out: a half-queued frame would corrupt the stream, so the VP is closed
 * then and the caller must not use it further.
 */
static int vp_send_reliable(vp_t *vp, uint32_t chan, const uint8_t *pre,
			    size_t prelen, const uint8_t *data, size_t len)
{
  uint8_t hdr[RP_HDRLEN + 8];
  size_t hlen = RP_HDRLEN + prelen;

  assert(prelen <= 8 && prelen + len <= RP_MAXBODY);
  rp_hdr(hdr, vp->snd_nxt, chan, (uint16_t)(prelen + len));
  if(prelen > 0)
    memcpy(hdr + RP_HDRLEN, pre, prelen);

  if(buf_append(&vp->unacked, hdr, hlen) != 0 ||
     (len > 0 && buf_append(&vp->unacked, data, len) != 0))
    goto nomem;
  if(vp->state == VP_GO && vp->conn.ev.fd >= 0)
    {
      if(buf_append(&vp->out, hdr, hlen) != 0 ||
	 (len > 0 && buf_append(&vp->out, data, len) != 0))
	goto nomem;
      out_queue(&vp->conn.ev);
      vp->last_tx = tw_tick;
    }
  vp->snd_nxt++;
  return 0;

 nomem:
  log_err("%s: out of memory queueing a frame", vp->peer);
  vp_close(vp, "out of memory");
  return -1;
}

static int vp_send_chan_ctl(vp_t *vp, uint8_t type, uint32_t chan)
{
  uint8_t body[5];
  body[0] = type;
  bytes_htonl(body + 1, chan);
  return vp_send_reliable(vp, 0, body, sizeof(body), NULL, 0);
}

/* send channel data, split into frames of at most 65535 bytes */
static int vp_send_data(vp_t *vp, uint32_t chan, const uint8_t *data,
			size_t len)
{
  size_t n;
  while(len > 0)
    {
      n = len > RP_MAXBODY ? RP_MAXBODY : len;
      if(vp_send_reliable(vp, chan, NULL, 0, data, n) != 0)
	return -1;
      vp->tx_frames++;
      vp->tx_bytes += n;
      stats.relay_frames[DIR_TO_VP]++;
      stats.relay_bytes[DIR_TO_VP] += n;
      data += n;
      len -= n;
    }
  return 0;
}

/* ---- lifecycle ---- */

static void vp_timer_rx(tw_timer_t *t);
static void vp_timer_ka(tw_timer_t *t);

/*
 * A new VP in HANDSHAKE with no connection, peer or session yet: the one
 * initialisation behind vp_alloc() and vp_load().  Returns NULL if out of
 * memory.
 */
static vp_t *vp_new(void)
{
  vp_t *vp;
  if((vp = calloc(1, sizeof(vp_t))) == NULL)
    return NULL;
  conn_init(&vp->conn, -1, FD_VP, vp, vp->peer);
  fdev_init(&vp->lev, -1, FD_VP_LISTEN, vp);
  vp->state = VP_HANDSHAKE;
  vp->chan_next = 1;
  splaytree_init(&vp->chans, chan_vp_cmp, offsetof(chan_t, vp_node));
  tw_timer_init(&vp->rx_timer, vp_timer_rx);
  tw_timer_init(&vp->ka_timer, vp_timer_ka);
  dlist_node_init(&vp->list_node);
  dlist_node_init(&vp->again_node);
  vp->last_rx = vp->last_tx = tw_tick;
#ifdef UPG_TEST_EXTENDED
  vp->test_extra = UPG_TEST_EXTENDED;
#endif
  return vp;
}

static vp_t *vp_alloc(int fd, const struct sockaddr *sa)
{
  vp_t *vp;
  int port;

  if((vp = vp_new()) == NULL)
    return NULL;
  vp->conn.ev.fd = fd;
  vp->family = sa->sa_family;
  if(sockaddr_tostr(sa, vp->addr, sizeof(vp->addr)) == NULL)
    snprintf(vp->addr, sizeof(vp->addr), "?");
  port = sockaddr_port(sa);
  snprintf(vp->peer, sizeof(vp->peer), "%s%c%d", vp->addr,
	   sa->sa_family == AF_INET6 ? '.' : ':', port);
  return vp;
}

static void vp_free(vp_t *vp)
{
  free(vp->rx.part);
  free(vp->magic);
  free(vp->name);
  free(vp->sockpath);
  free(vp);
  return;
}

static void rp_rx_reset(rp_rx_t *rx)
{
  free(rx->part);
  rx->part = NULL;
  rx->have = 0;
  rx->cap = 0;
  rx->checked = 0;
  return;
}

/* make part hold at least need bytes, keeping what it holds */
static int rp_rx_reserve(rp_rx_t *rx, uint32_t need)
{
  uint8_t *np;
  if(rx->cap >= need)
    return 0;
  if((np = realloc(rx->part, need)) == NULL)
    return -1;
  rx->part = np;
  rx->cap = need;
  return 0;
}

/* an idle session gives its reassembly buffer back */
static void rp_rx_release_idle(rp_rx_t *rx)
{
  if(rx->have == 0)
    rp_rx_reset(rx);
  return;
}

/*
 * Drop everything tied to the VP's current connection -- the fd and TLS
 * session, queued output, partial frame, per-source count, pauses, -U
 * listener, keepalive -- while the session (id, channels, unacked queue)
 * remains: for a zombie, a takeover and the VP's teardown.
 */
static void vp_conn_drop(vp_t *vp)
{
  conn_close(&vp->conn);
  buf_clear(&vp->out);
  src_release(vp);
  rp_rx_reset(&vp->rx);
  vp->rd_stopped_by_flush = 0;
  vp->rd_paused_by_sink = 0;
  vp_lev_close(vp);
  tw_cancel(&vp->ka_timer);
  return;
}

/*
 * The one teardown of a VP (FREED).  Announces the departure to mux
 * clients if it ever reached GO, closes its -U clients, drops its mux
 * channels silently and its unacked queue.  Memory is freed at the end
 * of the loop iteration.
 */
static void vp_close(vp_t *vp, const char *why)
{
  chan_t *c;

  if(vp->dead)
    return;
  vp->dead = 1;
  stats_vp_closed(vp);
  if(vp->id != 0)
    log_notice("%s: vp %u %s: departed: %s", vp->peer, vp->id,
	    vp->name != NULL ? vp->name : "", why);
  else
    log_dbg("%s: closing: %s", vp->peer, why);

  if(vp->id != 0)
    mux_depart_vp(vp);
  vp_conn_drop(vp);
  tw_cancel(&vp->rx_timer);
  while((c = splaytree_pop_min(&vp->chans)) != NULL)
    chan_vp_gone(c);
  if(vp->in_id_tree)
    splaytree_remove(&vp_by_id, vp);
  if(vp->in_magic_tree)
    splaytree_remove(&vp_by_magic, vp);
  vp->in_id_tree = vp->in_magic_tree = 0;
  mux_burst_forget(vp);
  dlist_remove(&vp_list, &vp->list_node);
  if(vp->again_queued)
    {
      dlist_remove(&vp_again, &vp->again_node);
      vp->again_queued = 0;
    }
  if(vp->in_handshake)
    {
      vp->in_handshake = 0;
      handshake_count--;
    }
  buf_clear(&vp->unacked);
  slist_push_tail(&gc_vps, &vp->gc_node);
  if(uc_in_paused.count > 0 || mc_in_paused.count > 0)
    in_paused_recheck();
  return;
}

/* ---- live-upgrade record (section "Live upgrade") ---- */

/*
 * The VP record.  Plain values are rows of vp_fields (a missing field
 * gets the default column; TLVF_KEEP: what vp_new() set); the rest are
 * VPF_* fields handled in vp_save/vp_load.  Its channels follow it as
 * ST_REC_CHAN records.  A new plain field is one row here.
 */
enum
{
  VPF_STATE = 30, VPF_MAGIC, VPF_NAME, VPF_FAMILY, VPF_ADDR, VPF_PEER,
  VPF_ARRIVAL, VPF_SRC, VPF_UNACKED, VPF_RX_TIMER, VPF_KA_TIMER,
  VPF_CONN_FD, VPF_LEV_FD, VPF_OUT, VPF_RX_PART,
};

#define VPROW(tag, m, fl, mn, mx, df)					\
  { tag, (uint8_t)sizeof(((vp_t *)0)->m), fl, offsetof(vp_t, m), mn, mx,	\
    df, #m }
static const tlv_desc_t vp_fields[] = {
  VPROW(1,  id,            0, 0, UINT32_MAX, 0),
  VPROW(2,  snd_nxt,       0, 0, UINT32_MAX, 0),
  VPROW(3,  snd_una,       0, 0, UINT32_MAX, 0),
  VPROW(4,  rcv_nxt,       0, 0, UINT32_MAX, 0),
  VPROW(5,  chan_next,     0, 1, UINT32_MAX, 1),
  VPROW(6,  in_id_tree,    0, 0, 1, 0),
  VPROW(7,  in_magic_tree, 0, 0, 1, 0),
  VPROW(8,  in_handshake,  0, 0, 1, 0),
  VPROW(9,  zombie_gen,    0, 0, ST_TICK_MAX, 0),
  VPROW(10, conn_tick,     TLVF_PAST, 0, ST_TICK_MAX, 0),
  VPROW(11, rx_bytes,      0, 0, UINT64_MAX, 0),
#ifndef UPG_TEST_REDUCED
  VPROW(12, rx_frames,     0, 0, UINT64_MAX, 0),
#endif
  VPROW(13, tx_bytes,      0, 0, UINT64_MAX, 0),
#ifndef UPG_TEST_REDUCED
  VPROW(14, tx_frames,     0, 0, UINT64_MAX, 0),
#endif
  VPROW(15, last_rx,       TLVF_PAST | TLVF_KEEP, 0, ST_TICK_MAX, 0),
  VPROW(16, last_tx,       TLVF_PAST | TLVF_KEEP, 0, ST_TICK_MAX, 0),
  VPROW(17, rd_stopped_by_flush,    0, 0, 1, 0),
  VPROW(18, rd_paused_by_sink, 0, 0, 1, 0),
  VPROW(19, conn.ev.rd,    0, 0, 1, 0),
  VPROW(20, conn.ev.wr,    0, 0, 1, 0),
  VPROW(21, flaps,         0, 0, UINT32_MAX, 0),
  VPROW(22, flap_ticks[0], TLVF_PAST, 0, UINT32_MAX, 0),
  VPROW(23, flap_ticks[1], TLVF_PAST, 0, UINT32_MAX, 0),
  VPROW(24, flap_ticks[2], TLVF_PAST, 0, UINT32_MAX, 0),
  VPROW(25, flap_ticks[3], TLVF_PAST, 0, UINT32_MAX, 0),
  VPROW(26, flap_ticks[4], TLVF_PAST, 0, UINT32_MAX, 0),
  VPROW(27, flap_ticks[5], TLVF_PAST, 0, UINT32_MAX, 0),
  VPROW(28, flap_ticks[6], TLVF_PAST, 0, UINT32_MAX, 0),
  VPROW(29, flap_ticks[7], TLVF_PAST, 0, UINT32_MAX, 0),
#ifdef UPG_TEST_EXTENDED
  VPROW(900, test_extra,   0, 0, UINT64_MAX, UPG_TEST_EXTENDED),
#endif
#ifdef UPG_TEST_MUST
  VPROW(TLV_MUST | 901, id, 0, 0, UINT32_MAX, 0),
#endif
};
#undef VPROW

static int rp_name_char_ok(uint8_t c);

static int vp_is_tls(const vp_t *vp)
{
  return conn_is_tls(&vp->conn);
}

/*
 * Whether vp crosses an upgrade: a TLS connection cannot, so a TLS VP
 * in GO crosses as the zombie it becomes and a TLS connection not in GO
 * not at all.
 */
static int vp_saved(const vp_t *vp)
{
  return !vp_is_tls(vp) || vp->state == VP_GO;
}

/*
 * Write vp's record and its channels' into w.  A TLS VP is written as
 * the zombie it becomes: no connection, unread input or output, with
 * its -Z deadline from now.
 */
static void vp_save(st_w_t *w, const vp_t *vp)
{
  int conn = !vp_is_tls(vp);
  vp_t zv;
  size_t at;
  uint8_t fam = vp->family == AF_INET6 ? 6 : 4;

  if(!conn)
    {
      zv = *vp;
      zv.state = VP_ZOMBIE;
      zv.zombie_gen = mc_gen;
      zv.rd_stopped_by_flush = zv.rd_paused_by_sink = 0;
      zv.conn.ev.rd = zv.conn.ev.wr = 0;
      vp = &zv;
    }
  at = tlv_begin(&w->t, ST_REC_VP);
  tlv_table_put(&w->t, vp_fields, ST_TABLE_N(vp_fields), vp);
  tlv_field_uint(&w->t, VPF_STATE, (uint64_t)vp->state, 1);
  tlv_field(&w->t, VPF_MAGIC, vp->magic, vp->magic_len);
  tlv_field_str(&w->t, VPF_NAME, vp->name);
  tlv_field(&w->t, VPF_FAMILY, &fam, 1);
  tlv_field_str(&w->t, VPF_ADDR, vp->addr);
  tlv_field_str(&w->t, VPF_PEER, vp->peer);
  st_timeval_put(w, VPF_ARRIVAL, &vp->arrival);
  st_buf_put(w, VPF_UNACKED, &vp->unacked);
  if(conn)
    {
      tlv_field_uint(&w->t, VPF_SRC, vp->src != NULL, 1);
      st_timer_put(w, VPF_RX_TIMER, &vp->rx_timer);
      st_timer_put(w, VPF_KA_TIMER, &vp->ka_timer);
      st_fd_put(w, VPF_CONN_FD, vp->conn.ev.fd);
      st_fd_put(w, VPF_LEV_FD, vp->lev.fd);
      st_buf_put(w, VPF_OUT, &vp->out);
      if(vp->rx.have > 0)
	tlv_field(&w->t, VPF_RX_PART, vp->rx.part, vp->rx.have);
    }
  else
    tlv_field_uint(&w->t, VPF_RX_TIMER, tw_tick + (uint64_t)opt_zombie, 8);
  tlv_end(&w->t, at);
#ifdef UPG_TEST_EXTENDED
  /* a record type the other builds do not know */
  at = tlv_begin(&w->t, ST_REC_TEST);
  tlv_field_uint(&w->t, 1, vp->test_extra, 8);
  tlv_end(&w->t, at);
#endif
  splaytree_inorder(&vp->chans, chan_save, w);
  return;
}

/* the characters of an address or MASTER_ID peer string */
static int vp_peer_ok(const char *s)
{
  if(*s == '\0')
    return 0;
  for(; *s != '\0'; s++)
    if(!isxdigit((unsigned char)*s) && *s != ':' && *s != '.' && *s != '?')
      return 0;
  return 1;
}

/* a string field into a fixed array of len bytes (NUL included) */
static int st_strbuf_get(st_r_t *r, char *buf, size_t len,
			 const uint8_t *v, uint32_t n, const char *what)
{
  if(n == 0 || n >= len || memchr(v, '\0', n) != NULL)
    return st_bad(r, "record vp: bad %s", what);
  memcpy(buf, v, n);
  buf[n] = '\0';
  return 0;
}

/* one VPF_* field of a VP record into vp (or *src): 0, or -1 */
static int vp_load_field(st_r_t *r, vp_t *vp, uint16_t tag,
			 const uint8_t *v, uint32_t n, uint8_t *src)
{
  uint64_t x;
  uint32_t k;
  switch(tag)
    {
    case VPF_STATE:
      if(tlv_uint(v, n, 1, &x) != 0 || x < VP_HANDSHAKE || x > VP_FLUSH)
	return st_bad(r, "record vp: bad state");
      vp->state = (vpstate_t)x;
      return 0;
    case VPF_MAGIC:
      if(vp->magic != NULL || n > 255)
	return st_bad(r, "record vp: bad magic");
      if(n == 0)
	return 0;
      if((vp->magic = malloc(n)) == NULL)
	return st_bad(r, "out of memory");
      memcpy(vp->magic, v, n);
      vp->magic_len = (uint8_t)n;
      return 0;
    case VPF_NAME:
      if(vp->name != NULL || n == 0 || n > 255)
	return st_bad(r, "record vp: bad name");
      for(k=0; k<n; k++)
	if(!rp_name_char_ok(v[k]))
	  return st_bad(r, "record vp: bad name");
      if((vp->name = malloc(n + 1)) == NULL)
	return st_bad(r, "out of memory");
      memcpy(vp->name, v, n);
      vp->name[n] = '\0';
      return 0;
    case VPF_FAMILY:
      if(tlv_uint(v, n, 1, &x) != 0 || (x != 4 && x != 6))
	return st_bad(r, "record vp: bad family");
      vp->family = x == 6 ? AF_INET6 : AF_INET;
      return 0;
    case VPF_ADDR:
      return st_strbuf_get(r, vp->addr, sizeof(vp->addr), v, n, "addr");
    case VPF_PEER:
      return st_strbuf_get(r, vp->peer, sizeof(vp->peer), v, n, "peer");
    case VPF_ARRIVAL:
      return st_timeval_get(r, &vp->arrival, v, n);
    case VPF_SRC:
      return st_flag_get(v, n, src) != 0 ?
	st_bad(r, "record vp: bad src") : 0;
    case VPF_UNACKED:
      return buf_len(&vp->unacked) > 0 ? st_bad(r, "record vp: two unacked")
	: st_buf_get(r, &vp->unacked, v, n);
    case VPF_OUT:
      return buf_len(&vp->out) > 0 ? st_bad(r, "record vp: two out")
	: st_buf_get(r, &vp->out, v, n);
    case VPF_RX_TIMER:
      return st_timer_get(r, &vp->rx_timer, v, n);
    case VPF_KA_TIMER:
      return st_timer_get(r, &vp->ka_timer, v, n);
    case VPF_CONN_FD:
      if(vp->conn.ev.fd >= 0)
	return st_bad(r, "record vp: two connections");
      return (vp->conn.ev.fd = st_fd_get(r, v, n)) < 0 ? -1 : 0;
    case VPF_LEV_FD:
      if(vp->lev.fd >= 0)
	return st_bad(r, "record vp: two -U listeners");
      return (vp->lev.fd = st_fd_get(r, v, n)) < 0 ? -1 : 0;
    case VPF_RX_PART:
      /* a held header is checked again when the rest arrives */
      if(vp->rx.have > 0 || n == 0 || n >= RP_HDRLEN + 65535 ||
	 (n >= RP_HDRLEN && n >= RP_HDRLEN + (uint32_t)bytes_ntohs(v + 8)) ||
	 rp_rx_reserve(&vp->rx, n < RP_HDRLEN ? RP_HDRLEN : n) != 0)
	return st_bad(r, "record vp: bad partial frame");
      memcpy(vp->rx.part, v, n);
      vp->rx.have = n;
      return 0;
    }
  return st_unknown(r, "vp", tag);
}

/* the invariants across a loaded VP's fields */
static int vp_load_check(st_r_t *r, const vp_t *vp)
{
  const char *bad = NULL;
  if(vp->family == 0 || vp->addr[0] == '\0' || vp->peer[0] == '\0' ||
     !vp_peer_ok(vp->addr) || !vp_peer_ok(vp->peer))
    bad = "address";
  else if(vp->zombie_gen > mc_gen)
    bad = "zombie generation";
  else if((vp->in_id_tree && (vp->id == 0 || vp->id >= vp_id_next)) ||
	  (!vp->in_id_tree && vp->id != 0))
    bad = "id";
  else if(vp->in_magic_tree && vp->magic_len == 0)
    bad = "magic";
  else if((vp->state == VP_ZOMBIE) != (vp->conn.ev.fd < 0))
    bad = "state and connection";
  else if(vp->lev.fd >= 0 && (vp->state != VP_GO || opt_udir == NULL))
    bad = "-U listener";
  else if((vp->state == VP_GO || vp->state == VP_ZOMBIE) && !vp->in_id_tree)
    bad = "state and id";
  else if(vp->state == VP_ZOMBIE &&
	  (buf_len(&vp->out) > 0 || vp->rx.have > 0 || vp->conn.ev.rd ||
	   vp->conn.ev.wr))
    bad = "zombie with connection data";
  else if(vp->in_handshake && vp->state == VP_GO)
    bad = "handshake";
  else if(vp->in_id_tree && vp_find_id(vp->id) != NULL)
    bad = "duplicate id";
  else if(vp->in_magic_tree && vp_find_magic(vp->magic, vp->magic_len)
	  != NULL)
    bad = "duplicate magic";
  return bad != NULL ? st_bad(r, "record vp: %s", bad) : 0;
}

/*
 * Rebuild a VP from its record of len bytes at p, through vp_new() like
 * vp_alloc(); it goes on vp_list (accept order) at once, so a failure
 * leaves it to shutdown_all().  Returns 0, or -1 with r->why.
 */
static int vp_load(st_r_t *r, const uint8_t *p, uint32_t len)
{
  tlv_r_t fr = {p, len, 0};
  const uint8_t *v;
  struct sockaddr_storage ss;
  socklen_t sl = sizeof(ss);
  uint32_t n;
  uint16_t tag;
  uint8_t src = 0;
  vp_t *vp;
  int rc;

  if((vp = vp_new()) == NULL)
    return st_bad(r, "out of memory");
  vp->state = 0;
  dlist_push_tail(&vp_list, &vp->list_node);
  vp->accept_seq = ++vp_accept_seq;
  r->vp = vp;
  r->chan = NULL;
  r->nvp++;
  tlv_table_defaults(vp_fields, ST_TABLE_N(vp_fields), vp);
  while((rc = tlv_next(&fr, &tag, &v, &n)) == 1)
    {
      if((rc = st_table_get(r, "vp", vp_fields, ST_TABLE_N(vp_fields), vp,
			    tag, v, n)) < 0)
	return -1;
      if(rc == 0 && vp_load_field(r, vp, tag, v, n, &src) != 0)
	return -1;
    }
  if(rc < 0)
    return st_bad(r, "record vp: truncated field");
  if(vp->state == 0)
    return st_bad(r, "record vp: no state");
  if(vp_load_check(r, vp) != 0)
    return -1;
  if(vp->in_id_tree)
    splaytree_insert(&vp_by_id, vp);
  if(vp->in_magic_tree)
    splaytree_insert(&vp_by_magic, vp);
  if(vp->in_handshake)
    handshake_count++;
  /* the connection counts against its source again (per-source-max) */
  if(src && vp->conn.ev.fd >= 0 &&
     getpeername(vp->conn.ev.fd, (struct sockaddr *)&ss, &sl) == 0)
    src_hold(vp, (struct sockaddr *)&ss);
  if(vp->lev.fd >= 0)
    {
      if((vp->sockpath = vp_sockpath(vp)) == NULL)
	return st_bad(r, "out of memory");
      vp->lev.rd = 1;
      if(st_ev_register(r, &vp->lev, 0) != 0)
	return -1;
    }
  if(st_ev_register(r, &vp->conn.ev, 0) != 0)
    return -1;
  if(buf_len(&vp->out) > 0)
    out_queue(&vp->conn.ev);
  return 0;
}

/*
 * The VP state machine.  Entry work for each state:
 *  GO      create the -U socket (failure: -1, state unchanged), arm the
 *          rx_abort and keepalive timers; from HANDSHAKE assign the VP id,
 *          send MASTER_ID and announce to mux clients; from ZOMBIE or GO
 *          (resume) send MASTER_OK and replay the unacked queue, and
 *          announce to mux clients that connected while it was a zombie.
 *  ZOMBIE  close the connection and -U socket, keep channels, clients
 *          and the unacked queue, arm the -Z deadline.
 *  FLUSH   stop reading; close once MASTER_REJ has been written.
 */
static int vp_set_state(vp_t *vp, vpstate_t st, const char *why)
{
  vpstate_t old = vp->state;
  uint8_t body[8];

  switch(st)
    {
    case VP_GO:
      if(vp_lev_open(vp) != 0)
	return -1;
      vp->state = VP_GO;
      if(vp->in_handshake)
	{
	  vp->in_handshake = 0;
	  handshake_count--;
	}
      vp->last_rx = vp->last_tx = tw_tick;
      vp->conn_tick = tw_tick;
      vp->gone = GONE_NONE;
      if(old == VP_HANDSHAKE)
	stats.arrivals++;
      else
	stats.resumes++;
      vp->flap_ticks[vp->flaps++ % VP_FLAP_KEEP] = (uint32_t)tw_tick;
      tw_arm(&vp->rx_timer, TIMEOUT_RX_ABORT);
      tw_arm(&vp->ka_timer, TIMEOUT_KEEPALIVE);
      if(old == VP_HANDSHAKE)
	{
	  size_t idlen = strlen(vp->peer) + 1;
	  uint8_t idb[2 + sizeof(vp->peer)];
	  do
	    vp->id = vp_id_next++;
	  while(vp->id == 0 || vp_find_id(vp->id) != NULL);
	  splaytree_insert(&vp_by_id, vp);
	  vp->in_id_tree = 1;
	  time_wall(&vp->arrival);
	  idb[0] = RP_MASTER_ID;
	  idb[1] = (uint8_t)idlen;
	  memcpy(idb + 2, vp->peer, idlen);
	  vp_send_raw(vp, vp->snd_nxt, idb, (uint16_t)(2 + idlen));
	  log_notice("%s: vp %u %s: arrived, new session (%s)", vp->peer,
		     vp->id, vp->name != NULL ? vp->name : "", why);
	  mux_announce_vp(vp, 0);
	}
      else
	{
	  body[0] = RP_MASTER_OK;
	  bytes_htonl(body + 1, vp->rcv_nxt);
	  vp_send_raw(vp, 0, body, 5);
	  if(buf_append_buf(&vp->out, &vp->unacked, 0) != 0)
	    log_err("%s: out of memory replaying", vp->peer);
	  out_queue(&vp->conn.ev);
	  log_notice("%s: vp %u %s: resumed (%s), replaying %u frames",
		  vp->peer, vp->id, vp->name != NULL ? vp->name : "", why,
		  vp->snd_nxt - vp->snd_una);
	  if(old == VP_ZOMBIE)
	    mux_announce_vp(vp, vp->zombie_gen);
	}
      return 0;

    case VP_ZOMBIE:
      vp_conn_drop(vp);
      vp->state = VP_ZOMBIE;
      vp->zombie_gen = mc_gen;
      stats.zombies++;
      tw_arm(&vp->rx_timer, (unsigned int)opt_zombie);
      log_notice("%s: vp %u %s: zombie for %lds: %s", vp->peer, vp->id,
	      vp->name != NULL ? vp->name : "", opt_zombie, why);
      return 0;

    case VP_FLUSH:
      vp->state = VP_FLUSH;
      vp->rd_stopped_by_flush = 1;
      log_warn("%s: %s", vp->peer, why);
      if(ev_want_read(&vp->conn.ev, 0) != 0)
	vp_close(vp, "could not stop reading");
      return 0;

    case VP_HANDSHAKE:
      break;
    }
  log_err("%s: bad transition %s -> %s", vp->peer, vp_state_str(old),
	  vp_state_str(st));
  return -1;
}

/*
 * The connection failed (EOF, I/O error, rx_abort): a named session
 * becomes a zombie when -Z > 0; anything else is freed.
 */
static void vp_lost(vp_t *vp, const char *why)
{
  vp_gone_as(vp, GONE_CLOSED);
  if(vp->state == VP_GO && opt_zombie > 0)
    vp_set_state(vp, VP_ZOMBIE, why);
  else
    vp_close(vp, why);
  return;
}

/* a protocol violation: freed at once, never a zombie */
static int vp_proto_error(vp_t *vp, const char *why)
{
  log_warn("%s: protocol error: %s", vp->peer, why);
  vp_gone_as(vp, GONE_PROTO);
  vp_close(vp, why);
  return -1;
}

/* answer a MASTER_RES with MASTER_REJ, then close once it is written */
static int vp_reject(vp_t *vp, const char *why)
{
  uint8_t body[1] = {RP_MASTER_REJ};
  vp_gone_as(vp, GONE_REJECTED);
  vp_send_raw(vp, vp->snd_nxt, body, 1);
  vp_set_state(vp, VP_FLUSH, why);
  return -1;
}

static void vp_timer_rx(tw_timer_t *t)
{
  vp_t *vp = CONTAINER_OF(t, vp_t, rx_timer);
  switch(vp->state)
    {
    case VP_HANDSHAKE:
    case VP_FLUSH:
      vp_gone_as(vp, GONE_TIMEOUT);
      vp_close(vp, "accept timeout");
      break;
    case VP_GO:
      if(vp->rd_paused_by_sink)
	tw_arm(t, TIMEOUT_RX_ABORT); /* not reading: not its silence */
      else if(tw_tick >= vp->last_rx + TIMEOUT_RX_ABORT)
	{
	  vp_gone_as(vp, GONE_TIMEOUT);
	  vp_lost(vp, "rx_abort: nothing received for 60s");
	}
      else
	tw_arm_at(t, vp->last_rx + TIMEOUT_RX_ABORT);
      break;
    case VP_ZOMBIE:
      vp_gone_as(vp, GONE_EXPIRED);
      vp_close(vp, "zombie expired");
      break;
    }
  return;
}

static void vp_timer_ka(tw_timer_t *t)
{
  vp_t *vp = CONTAINER_OF(t, vp_t, ka_timer);
  if(vp->state != VP_GO)
    return;
  if(tw_tick >= vp->last_rx + TIMEOUT_KEEPALIVE)
    rp_rx_release_idle(&vp->rx);
  if(tw_tick >= vp->last_tx + TIMEOUT_KEEPALIVE)
    vp_send_keepalive(vp);
  tw_arm_at(t, vp->last_tx + TIMEOUT_KEEPALIVE);
  return;
}

/* ---- control message handlers ---- */

/* a monitor name byte: ASCII alphanumeric, '.' or '-' */
static int rp_name_char_ok(uint8_t c)
{
  return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') ||
    (c >= 'A' && c <= 'Z') || c == '.' || c == '-';
}

/*
 * Parse a MASTER_NEW body (after the type byte).  On success sets *magic,
 * *magic_len and *name (NULL when no name; points into body otherwise,
 * NUL-terminated there) and returns 0; -1 when malformed.
 */
static int rp_parse_master_new(const uint8_t *b, size_t len,
			       const uint8_t **magic, uint8_t *magic_len,
			       const char **name)
{
  size_t ml, nl, i;

  *name = NULL;
  if(len < 1 || (ml = b[0]) == 0 || len < 1 + ml)
    return -1;
  *magic = b + 1;
  *magic_len = (uint8_t)ml;
  if(len == 1 + ml || (nl = b[1 + ml]) == 0)
    return 0;
  if(len < 2 + ml + nl || b[1 + ml + nl] != '\0')
    return -1;
  for(i=0; i < nl - 1; i++)
    if(rp_name_char_ok(b[2 + ml + i]) == 0)
      return -1;
  *name = (const char *)(b + 2 + ml);
  return 0;
}

/* parse a MASTER_RES body: magic, then rcv_nxt, snd_una, snd_nxt */
static int rp_parse_master_res(const uint8_t *b, size_t len,
			       const uint8_t **magic, uint8_t *magic_len,
			       uint32_t seqs[3])
{
  size_t ml;
  if(len < 1 || (ml = b[0]) == 0 || len < 1 + ml + 12)
    return -1;
  *magic = b + 1;
  *magic_len = (uint8_t)ml;
  seqs[0] = bytes_ntohl(b + 1 + ml);
  seqs[1] = bytes_ntohl(b + 5 + ml);
  seqs[2] = bytes_ntohl(b + 9 + ml);
  return 0;
}

static int vp_handle_master_new(vp_t *vp, const uint8_t *b, size_t len)
{
  const uint8_t *magic;
  const char *name;
  uint8_t ml;
  char ms[32];

  if(rp_parse_master_new(b, len, &magic, &ml, &name) != 0)
    return vp_proto_error(vp, "malformed MASTER_NEW");
  if((vp->magic = malloc(ml)) == NULL ||
     (name != NULL && (vp->name = strdup(name)) == NULL))
    return vp_proto_error(vp, "out of memory");
  memcpy(vp->magic, magic, ml);
  vp->magic_len = ml;
  if(tls_check_name(vp) != 0)
    return -1;
  if(splaytree_insert(&vp_by_magic, vp) != 0)
    {
      log_warn("%s: duplicate magic %s", vp->peer,
	      magic_str(magic, ml, ms, sizeof(ms)));
      return vp_proto_error(vp, "duplicate magic in MASTER_NEW");
    }
  vp->in_magic_tree = 1;
  log_dbg("%s: MASTER_NEW magic %s name %s", vp->peer,
	  magic_str(magic, ml, ms, sizeof(ms)),
	  vp->name != NULL ? vp->name : "(none)");
  if(vp_set_state(vp, VP_GO, "MASTER_NEW") != 0)
    return vp_proto_error(vp, "could not create the unix socket");
  return 0;
}

/*
 * MASTER_RES on a fresh connection t (PROTOCOL.md 2.6).  On acceptance the
 * connection moves into the session m and t is freed; returns 1 then, so
 * the caller hands the rest of its input to m.
 */
static int vp_handle_master_res(vp_t *t, const uint8_t *b, size_t len,
				vp_t **moved)
{
  const uint8_t *magic;
  uint32_t s[3], k;
  uint8_t ml;
  vp_t *m;
  char ms[32];

  if(rp_parse_master_res(b, len, &magic, &ml, s) != 0)
    return vp_proto_error(t, "malformed MASTER_RES");
  magic_str(magic, ml, ms, sizeof(ms));
  if((m = vp_find_magic(magic, ml)) == NULL || m->dead)
    {
      stats.rejects[REJ_UNKNOWN_MAGIC]++;
        return vp_reject(t, "MASTER_RES: unknown magic, rejected");
    }
  if(serial_cmp(s[0], m->snd_una) < 0 || serial_cmp(s[0], m->snd_nxt) > 0)
    {
      log_warn("%s: resume of vp %u: rcv_nxt %u outside %u..%u", t->peer,
	      m->id, s[0], m->snd_una, m->snd_nxt);
      stats.rejects[REJ_INCONSISTENT]++;
      return vp_reject(t, "MASTER_RES: inconsistent rcv_nxt, rejected");
    }
  if(serial_cmp(s[1], m->rcv_nxt) > 0 || serial_cmp(m->rcv_nxt, s[2]) > 0)
    {
      log_warn("%s: resume of vp %u: our rcv_nxt %u outside %u..%u",
	      t->peer, m->id, m->rcv_nxt, s[1], s[2]);
      stats.rejects[REJ_INCONSISTENT]++;
      return vp_reject(t, "MASTER_RES: inconsistent snd_una/snd_nxt, "
		       "rejected");
    }

  /* scamper already has every frame before its rcv_nxt */
  for(k = s[0] - m->snd_una; k > 0; k--)
    {
      uint8_t h[RP_HDRLEN];
      buf_peek(&m->unacked, 0, h, RP_HDRLEN);
      buf_drop(&m->unacked, RP_HDRLEN + (size_t)bytes_ntohs(h + 8));
    }
  m->snd_una = s[0];

  if(m->state == VP_GO)
    {
      log_dbg("%s: vp %u: taken over by %s", m->peer, m->id, t->peer);
      stats.departures[GONE_TAKEOVER]++;
    }
  vp_conn_drop(m);
  if(conn_move(&t->conn, &m->conn) != 0)
    {
      vp_close(t, "could not register the resumed connection");
      vp_lost(m, "could not register the resumed connection");
      return -1;
    }
  m->src = t->src;   /* the connection's per-source count moves too */
  t->src = NULL;
  m->family = t->family;
  memcpy(m->addr, t->addr, sizeof(m->addr));
  memcpy(m->peer, t->peer, sizeof(m->peer));
  vp_gone_as(t, GONE_MERGED);
  vp_close(t, "connection merged into a resumed session");
  if(vp_set_state(m, VP_GO, "MASTER_RES") != 0)
    {
      /* no -U socket: a zombie again (as vp_lost does for a session
       * in GO) for scamper to retry, or gone without -Z */
      vp_gone_as(m, GONE_CLOSED);
      if(opt_zombie > 0)
	vp_set_state(m, VP_ZOMBIE,
		     "could not create the unix socket after resume");
      else
	vp_close(m, "could not create the unix socket after resume");
      return -1;
    }
  *moved = m;
  return 1;
}

static int vp_handle_ack(vp_t *vp, const uint8_t *b, size_t len)
{
  uint8_t h[RP_HDRLEN];
  uint32_t seq;
  size_t before;

  if(len != 4)
    return vp_proto_error(vp, "malformed ACK");
  seq = bytes_ntohl(b);
  if(vp->snd_una == vp->snd_nxt)
    return vp_proto_error(vp, "ACK with nothing outstanding");
  if(seq != vp->snd_una)
    {
      log_dbg("%s: ACK %u, expected %u", vp->peer, seq, vp->snd_una);
      return vp_proto_error(vp, "ACK for the wrong seq");
    }
  before = buf_len(&vp->unacked);
  buf_peek(&vp->unacked, 0, h, RP_HDRLEN);
  buf_drop(&vp->unacked, RP_HDRLEN + (size_t)bytes_ntohs(h + 8));
  vp->snd_una++;
  if(before > opt_unacked_max / 2 &&
     buf_len(&vp->unacked) <= opt_unacked_max / 2)
    in_paused_recheck();
  return 0;
}

static int vp_handle_fin(vp_t *vp, uint32_t seq, const uint8_t *b, size_t len)
{
  chan_t *c;
  uint32_t id;

  if(len != 4)
    return vp_proto_error(vp, "malformed CHANNEL_FIN");
  vp_send_ack(vp, seq);
  vp->rcv_nxt++;
  id = bytes_ntohl(b);
  if((c = vp_chan_find(vp, id)) == NULL)
    {
      log_dbg("%s: FIN for unknown channel %u", vp->peer, id);
      return 0;
    }
  chan_on_fin(c);
  return 0;
}

/* ---- receive path ---- */

#define RP_NOMEM (-2)

typedef struct rp_cb
{
  /* validate a header as soon as its 10 bytes are in; non-zero stops */
  int (*hdr)(void *arg, uint32_t seq, uint32_t chan, uint16_t len);
  /* a complete frame; non-zero stops */
  int (*frame)(void *arg, uint32_t seq, uint32_t chan,
	       const uint8_t *body, uint16_t len);
} rp_cb_t;


/*
 * Reassemble remote frames from a byte stream.  Complete frames in p are
 * handed to cb->frame in place (no copy); only a trailing partial frame
 * is copied into rx->part, which is kept (not freed per frame) while the
 * stream is busy; rp_rx_release_idle() gives it back.  Returns 0 when every byte
 * was consumed, the non-zero value of a callback that stopped the parse
 * (*used then says how many bytes were consumed, including the frame
 * that stopped it), or RP_NOMEM if memory ran out.
 */
static int rp_rx_feed(rp_rx_t *rx, const uint8_t *p, size_t len,
		      const rp_cb_t *cb, void *arg, size_t *used)
{
  const uint8_t *start = p;
  uint32_t want, n, cap;
  uint16_t blen;
  uint8_t *np;
  int rc;

  *used = 0;
  if(rx->have > 0)
    {
      if(rx->have < RP_HDRLEN)
	{
	  n = RP_HDRLEN - rx->have;
	  if(n > len) n = (uint32_t)len;
	  memcpy(rx->part + rx->have, p, n);
	  rx->have += n; p += n; len -= n;
	  if(rx->have < RP_HDRLEN)
	    goto done;
	}
      blen = bytes_ntohs(rx->part + 8);
      if(rx->checked == 0)
	{
	  rx->checked = 1;
	  if((rc = cb->hdr(arg, bytes_ntohl(rx->part),
			   bytes_ntohl(rx->part + 4), blen)) != 0)
	    goto stop;
	  if(rp_rx_reserve(rx, RP_HDRLEN + (uint32_t)blen) != 0)
	    return RP_NOMEM;
	}
      want = RP_HDRLEN + (uint32_t)blen - rx->have;
      n = want > len ? (uint32_t)len : want;
      memcpy(rx->part + rx->have, p, n);
      rx->have += n; p += n; len -= n;
      if(n < want)
	goto done;
      /* detach the buffer while the frame is handled: the handler may
       * tear the session (and its rx) down */
      np = rx->part;
      cap = rx->cap;
      rx->part = NULL;
      rx->have = rx->cap = 0;
      rx->checked = 0;
      rc = cb->frame(arg, bytes_ntohl(np), bytes_ntohl(np + 4),
		     np + RP_HDRLEN, blen);
      if(rx->part == NULL)
	{
	  rx->part = np;
	  rx->cap = cap;
	}
      else
	free(np);
      if(rc != 0)
	goto stop;
    }

  while(len >= RP_HDRLEN)
    {
      blen = bytes_ntohs(p + 8);
      if((rc = cb->hdr(arg, bytes_ntohl(p), bytes_ntohl(p + 4), blen)) != 0)
	{
	  p += len < (size_t)RP_HDRLEN + blen ? len : RP_HDRLEN + (size_t)blen;
	  goto stop;
	}
      if(len < RP_HDRLEN + (size_t)blen)
	{
	  if(rp_rx_reserve(rx, RP_HDRLEN + (uint32_t)blen) != 0)
	    return RP_NOMEM;
	  memcpy(rx->part, p, len);
	  rx->have = (uint32_t)len;
	  rx->checked = 1;
	  p += len; len = 0;
	  goto done;
	}
      rc = cb->frame(arg, bytes_ntohl(p), bytes_ntohl(p + 4),
		     p + RP_HDRLEN, blen);
      p += RP_HDRLEN + (size_t)blen;
      len -= RP_HDRLEN + (size_t)blen;
      if(rc != 0)
	goto stop;
    }
  if(len > 0)
    {
      if(rp_rx_reserve(rx, RP_HDRLEN) != 0)
	return RP_NOMEM;
      memcpy(rx->part, p, len);
      rx->have = (uint32_t)len;
      rx->checked = 0;
      p += len;
    }

 done:
  *used = (size_t)(p - start);
  return 0;

 stop:
  *used = (size_t)(p - start);
  return rc;
}

/* the VP whose frames are being parsed, and where input moves on resume */
typedef struct vp_rx_ctx
{
  vp_t *vp;
  vp_t *moved;
} vp_rx_ctx_t;

static int vp_rx_hdr(void *arg, uint32_t seq, uint32_t chan, uint16_t len)
{
  vp_t *vp = ((vp_rx_ctx_t *)arg)->vp;
  switch(vp->state)
    {
    case VP_HANDSHAKE:
      if(seq != 0)
	return vp_proto_error(vp, "first frame with seq != 0");
      if(chan != 0)
	return vp_proto_error(vp, "data frame before the handshake");
      break;
    case VP_GO:
      if(seq != vp->rcv_nxt)
	{
	  log_dbg("%s: seq %u, expected %u", vp->peer, seq, vp->rcv_nxt);
	  return vp_proto_error(vp, "bad sequence number");
	}
      break;
    default:
      return -1; /* not reading in other states */
    }
  if(chan == 0 && len == 0)
    return vp_proto_error(vp, "control frame with no type");
  return 0;
}

/*
 * One complete remote frame of ctx->vp (rp_rx_feed's callback): the
 * handshake messages in HANDSHAKE, else control messages (channel 0) or
 * data for a channel.  Borrows body.  May close the VP (returns -1: stop
 * feeding) or move the connection to a resumed session (ctx->moved, 1).
 * Returns 0 to go on.
 */
static int vp_rx_frame(void *arg, uint32_t seq, uint32_t chan,
		       const uint8_t *body, uint16_t len)
{
  vp_rx_ctx_t *ctx = arg;
  vp_t *vp = ctx->vp;
  chan_t *c;

  if(vp->state == VP_HANDSHAKE)
    {
      switch(body[0])
	{
	case RP_MASTER_NEW:
	  return vp_handle_master_new(vp, body + 1, (size_t)len - 1);
	case RP_MASTER_RES:
	  return vp_handle_master_res(vp, body + 1, (size_t)len - 1,
				      &ctx->moved);
	}
      return vp_proto_error(vp, "unexpected message type in handshake");
    }

  if(chan != 0)
    {
      vp_send_ack(vp, seq);
      vp->rcv_nxt++;
      vp->rx_frames++;
      vp->rx_bytes += len;
      stats.relay_frames[DIR_FROM_VP]++;
      stats.relay_bytes[DIR_FROM_VP] += len;
      if((c = vp_chan_find(vp, chan)) == NULL)
	{
	  log_dbg("%s: data for unknown channel %u", vp->peer, chan);
	  return 0;
	}
      chan_on_data(c, body, len);
      return 0;
    }

  switch(body[0])
    {
    case RP_CHANNEL_FIN:
      return vp_handle_fin(vp, seq, body + 1, (size_t)len - 1);
    case RP_KEEPALIVE:
      if(len != 1)
	return vp_proto_error(vp, "KEEPALIVE with a body");
      return 0;
    case RP_ACK:
      return vp_handle_ack(vp, body + 1, (size_t)len - 1);
    }
  log_dbg("%s: message type %u in go mode", vp->peer, body[0]);
  return vp_proto_error(vp, "unexpected message type");
}

static const rp_cb_t vp_rx_cb = { vp_rx_hdr, vp_rx_frame };

/*
 * Process bytes read from vp's connection.  Returns 0 if vp is still
 * readable afterwards, -1 if it was closed, became a zombie or was
 * merged into another session (remaining bytes then go to that one).
 */
static int vp_input(vp_t *vp, const uint8_t *p, size_t len)
{
  vp_rx_ctx_t ctx;
  size_t used;
  int rc;

  ctx.vp = vp;
  ctx.moved = NULL;
  if((rc = rp_rx_feed(&vp->rx, p, len, &vp_rx_cb, &ctx, &used)) == 0)
    return 0;
  if(rc == RP_NOMEM)
    vp_close(vp, "out of memory reassembling a frame");
  else if(rc == 1 && ctx.moved != NULL && used < len)
    vp_input(ctx.moved, p + used, len - used);
  return -1;
}

/*
 * Read the VP's connection into the shared scratch buffer and feed the
 * frame parser, at most eight reads per event (TLS bytes left over are
 * read next iteration: vp_again_queue).  Stops while the VP is paused.
 * May close the VP (EOF, error, protocol error) or make it a zombie.
 */
static void vp_read(vp_t *vp)
{
  ssize_t n;
  int budget = 8;

  for(;;)
    {
      if(vp->rd_paused_by_sink)
	return;
      if(budget <= 0)
	{
	  /* decrypted bytes raise no fd event: read them next iteration */
	  if(conn_pending(&vp->conn))
	    vp_again_queue(vp);
	  return;
	}
      budget--;
      n = conn_read(&vp->conn, scratch, SCRATCH_SIZE);
      if(n == CONN_AGAIN)
	return;
      if(n == 0)
	{
	  vp_lost(vp, "connection closed by peer");
	  return;
	}
      if(n == CONN_PROTO)
	{
	  vp_gone_as(vp, GONE_TLS);
	  vp_close(vp, "TLS error");
	  return;
	}
      if(n < 0)
	{
	  vp_lost(vp, "read error");
	  return;
	}
      if(vp->state != VP_HANDSHAKE)
	vp->last_rx = tw_tick;
      if(vp_input(vp, scratch, (size_t)n) != 0)
	return;
      if(vp->dead || vp->conn.ev.fd < 0 || vp->rd_stopped_by_flush)
	return;
      /* a short plain read drained the socket; TLS may hold more */
      if((size_t)n < SCRATCH_SIZE && !conn_is_tls(&vp->conn))
	return;
    }
}

/* write queued output; closes a FLUSH session once MASTER_REJ is out */
static void vp_flush(vp_t *vp)
{
  int rc;
  if(vp->dead || vp->conn.ev.fd < 0)
    return;
  if(vp->conn.hs)
    return;
  if((rc = conn_writev(&vp->conn, &vp->out)) != 0)
    {
      if(rc == CONN_PROTO)
	{
	  vp_gone_as(vp, GONE_TLS);
	  vp_close(vp, "TLS error on write");
	}
      else
	vp_lost(vp, "write error");
      return;
    }
  if(buf_len(&vp->out) == 0)
    {
      if(vp->state == VP_FLUSH)
	{
	  vp_close(vp, "MASTER_REJ sent");
	  return;
	}
      /* a TLS read that wants writability keeps it watched */
      if(ev_want_write(&vp->conn.ev, vp->conn.rd_want_wr) != 0)
	vp_lost(vp, "could not watch for writability");
      return;
    }
  if(ev_want_write(&vp->conn.ev, 1) != 0)
    vp_lost(vp, "could not watch for writability");
  return;
}

/*
 * The TLS handshake of a new connection, before any frame: one step per
 * event (conn_handshake), then the -C certificate checks, then the
 * connection is watched for frames and read at once (the handshake may
 * have brought some).  May close the VP (and so free it at the end of
 * the iteration) on a failed handshake or certificate.
 */
static void vp_handshake(vp_t *vp)
{
  int rc;
  if((rc = conn_handshake(&vp->conn)) == 0)
    return;
  if(rc == CONN_ERROR)
    {
      vp_close(vp, "could not register");
      return;
    }
  if(rc == CONN_PROTO)
    {
      stats.tls_failures[TLSF_HANDSHAKE]++;
      vp_gone_as(vp, GONE_TLS);
      vp_close(vp, "TLS handshake failed");
      return;
    }
  if(tls_check_peer(vp) != 0)
    return;
  if(ev_set(&vp->conn.ev, 1, buf_len(&vp->out) > 0) != 0)
    {
      vp_close(vp, "could not register");
      return;
    }
  vp_read(vp);
  return;
}

/*
 * An event on a VP's connection: the TLS handshake while it runs, else
 * write then read (a TLS read may have wanted writability, a TLS write
 * readability).  May close the VP.
 */
static void vp_dispatch(vp_t *vp, int rd, int wr)
{
  if(vp->dead)
    return;
  if(vp->conn.hs)
    {
      vp_handshake(vp);
      return;
    }
  if(wr && vp->conn.rd_want_wr)
    rd = 1;
  if(rd && vp->conn.wr_want_rd)
    wr = 1;
  if(wr)
    {
      vp_flush(vp);
      if(vp->dead || vp->conn.ev.fd < 0)
	return;
    }
  if(rd && !vp->rd_stopped_by_flush)
    vp_read(vp);
  return;
}

/* ---- accepting scamper connections ---- */

static int      accept_paused = 0;
static tw_timer_t accept_timer;

/* watch or ignore a listener; one that cannot be is closed (logged) */
static void lev_want(fdev_t *lev, int rd, const char *what)
{
  if(lev->fd >= 0 && ev_want_read(lev, rd) != 0)
    {
      log_err("%s: could not %s the listener: closed", what,
	      rd ? "watch" : "pause");
      ev_close(lev);
    }
  return;
}

/* watch or ignore every listener: TCP, mux and the per-VP sockets */
static void accept_listen_all(int rd)
{
  dlist_node_t *n;
  vp_t *vp;
  int i;
  for(i=0; i<tcp_lev_count; i++)
    lev_want(&tcp_lev[i], rd, "tcp");
  lev_want(&mux_lev, rd, "mux");
  lev_want(&mux_tcp_lev, rd, "mux over tcp");
  lev_want(&http_lev, rd, "metrics");
  for(n = vp_list.head; n != NULL; n = n->next)
    {
      vp = CONTAINER_OF(n, vp_t, list_node);
      lev_want(&vp->lev, rd, vp->sockpath);
    }
  return;
}

static void accept_resume(tw_timer_t *t)
{
  (void)t;
  accept_paused = 0;
  accept_listen_all(1);
  return;
}

/*
 * Out of fds: stop accepting for a second (one log line) instead of
 * spinning on a listener that stays readable.
 */
static void accept_pause(const char *what)
{
  if(accept_paused)
    return;
  accept_paused = 1;
  stats.accept_pauses_emfile++;
  log_warn("%s: out of file descriptors, pausing accepts for 1s", what);
  accept_listen_all(0);
  tw_arm(&accept_timer, 1);
  return;
}

/*
 * The one accept of every listener (TCP, -M, -U, mux over TCP, metrics),
 * with one errno policy: out of fds (EMFILE, ENFILE) pauses every
 * listener for a second (accept_pause); a connection aborted before it
 * was taken (ECONNABORTED) is skipped; would-block ends the batch; any
 * other error is logged and ends the batch.  ss may be NULL (no address
 * wanted).  Returns the new fd (the caller owns it), or -1: stop.
 */
static int lev_accept(fdev_t *lev, struct sockaddr_storage *ss,
		      const char *what)
{
  socklen_t sl;
  int fd;
  for(;;)
    {
      sl = sizeof(*ss);
      if((fd = accept(lev->fd, (struct sockaddr *)ss,
		      ss != NULL ? &sl : NULL)) >= 0)
	return fd;
      if(errno == ECONNABORTED)
	continue;
      if(errno == EMFILE || errno == ENFILE)
	accept_pause(what);
      else if(errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)
	log_warn("%s: accept failed: %s", what, strerror(errno));
      return -1;
    }
}

static uint64_t hs_cap_tick = UINT64_MAX; /* tick of the last refusal */

/*
 * Take an accepted scamper connection: a new session in HANDSHAKE with
 * its 30 s deadline, TLS started if configured.  The fd is closed on
 * refusal (handshake cap, select limit, no memory).  Returns the session,
 * or NULL when it was refused or closed at once.
 */
static vp_t *vp_accept_fd(int fd, const struct sockaddr *sa)
{
  vp_t *vp;
  int on = 1;

  if(handshake_count >= opt_handshake_max)
    {
      stats.rejects[REJ_HANDSHAKE_CAP]++;
      if(hs_cap_tick != tw_tick)  /* one episode per second of refusals */
	stats.accept_pauses_hscap++;
      hs_cap_tick = tw_tick;
      log_warn_flood("%ld connections in handshake: refusing new ones",
		     handshake_count);
      close(fd);
      return NULL;
    }
  if(!ev_fd_ok(fd) || fd_nonblock(fd) != 0 || fd_cloexec(fd) != 0 ||
     (vp = vp_alloc(fd, sa)) == NULL)
    {
      log_warn("could not take connection fd %d", fd);
      close(fd);
      return NULL;
    }
  vp->in_handshake = 1;
  handshake_count++;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &on, sizeof(on));
  vp->accept_seq = ++vp_accept_seq;
  dlist_push_tail(&vp_list, &vp->list_node);
  tw_arm(&vp->rx_timer, TIMEOUT_ACCEPT);
  log_dbg("%s: accepted", vp->peer);
  if(ev_set(&vp->conn.ev, 1, 0) != 0)
    {
      vp_close(vp, "could not register");
      return NULL;
    }
  if(conn_tls_start(&vp->conn) != 0)
    {
      vp_close(vp, "could not start TLS");
      return NULL;
    }
  return vp;
}

/*
 * A scamper connection from sa (its own address, or the one its PROXY
 * header gave): the access checks, then a session.  Owns fd.
 */
static void vp_take(int fd, const struct sockaddr *sa)
{
  vp_t *vp;
  if(access_vp_check(sa) != 0)
    {
      close(fd);
      return;
    }
  if((vp = vp_accept_fd(fd, sa)) != NULL)
    src_hold(vp, sa);
  return;
}

/* scamper connections on a -P listener, at most 64 per event */
static void tcp_accept(fdev_t *lev)
{
  struct sockaddr_storage ss;
  int fd, i;

  for(i=0; i<64; i++)
    {
      if((fd = lev_accept(lev, &ss, "tcp_accept")) < 0)
	return;
      if(prehdr_wanted(PP_SCAMPER, (struct sockaddr *)&ss))
	prehdr_open(fd, (struct sockaddr *)&ss, PP_SCAMPER);
      else
	vp_take(fd, (struct sockaddr *)&ss);
    }
  return;
}

/* ---------------------------------------------------------------------
 * Channels (PROTOCOL.md 2.7)
 *
 * A chan_t joins a VP's remote channel to its consumer: a -U client or a
 * mux client.  The VP's tree owns it; the consumer points at it.  A -U
 * channel ends with its client; a mux channel record stays (after
 * scamper's FIN, marked fin_rcvd) until its mux client or VP goes away,
 * which is what keeps mux channel ids from being reused.
 * --------------------------------------------------------------------- */

static void uc_on_fin(uclient_t *uc);
static void uc_close(uclient_t *uc, const char *why);
static void mc_deliver(mclient_t *mc, vp_t *feeder, uint32_t id,
		       const uint8_t *data, size_t len);
static void mc_send_channel_close(mclient_t *mc, uint32_t id);

/*
 * Open a channel on vp: allocate the next remote id (skipping 0 and ids
 * in use), send CHANNEL_NEW (queued if the VP is a zombie).  Returns NULL
 * if memory ran out (the VP may then have been closed).
 */
static chan_t *chan_open(vp_t *vp)
{
  chan_t *c;

  if((c = calloc(1, sizeof(chan_t))) == NULL)
    return NULL;
  do
    {
      c->id = vp->chan_next++;
      if(vp->chan_next == 0)
	vp->chan_next = 1;
    }
  while(c->id == 0 || vp_chan_find(vp, c->id) != NULL);
  c->vp = vp;
  splaytree_insert(&vp->chans, c);
  if(vp_send_chan_ctl(vp, RP_CHANNEL_NEW, c->id) != 0)
    return NULL; /* vp_close freed the channel with the VP */
  return c;
}

/* release a channel record: out of its VP's tree; memory freed later */
static void chan_release(chan_t *c)
{
  if(c->vp != NULL)
    splaytree_remove(&c->vp->chans, c);
  c->vp = NULL;
  c->uc = NULL;
  c->mc = NULL;
  slist_push_tail(&gc_chans, &c->gc_node);
  return;
}

/*
 * Tell scamper this side is done with the channel, unless a FIN already
 * went either way.  Returns -1 if the VP was closed (out of memory).
 */
static int chan_send_fin(chan_t *c)
{
  if(c->vp == NULL || c->fin_sent || c->fin_rcvd)
    return 0;
  c->fin_sent = 1;
  return vp_send_chan_ctl(c->vp, RP_CHANNEL_FIN, c->id);
}

static void chan_on_data(chan_t *c, const uint8_t *data, size_t len)
{
  if(c->fin_rcvd)
    return; /* scamper already ended the channel: a confused peer */
  if(c->uc != NULL)
    {
      uclient_t *uc = c->uc;
      if(uc->conn.ev.fd < 0)
	return;
      if(buf_append(sink_in(&uc->sink), data, len) != 0)
	{
	  uc_close(uc, "out of memory");
	  return;
	}
      out_queue(&uc->conn.ev);
      sink_appended(&uc->sink, c->vp);
    }
  else if(c->mc != NULL)
    mc_deliver(c->mc, c->vp, c->mc_id, data, len);
  return;
}

/* scamper finished the channel and has already forgotten it */
static void chan_on_fin(chan_t *c)
{
  if(c->fin_rcvd)
    return; /* a repeated FIN: already handled */
  c->fin_rcvd = 1;
  if(c->uc != NULL)
    uc_on_fin(c->uc);
  else if(c->mc != NULL)
    mc_send_channel_close(c->mc, c->mc_id);
  return;
}

/*
 * The VP is being freed: its -U clients are closed at once (unsent
 * output discarded) and its mux channels dropped silently (PROTOCOL.md
 * 2.9).  Called with c already out of the VP's tree.
 */
static void chan_vp_gone(chan_t *c)
{
  c->vp = NULL;
  if(c->uc != NULL)
    {
      uclient_t *uc = c->uc;
      buf_clear(&uc->sink.out);
      uc_close(uc, "vp freed");
      return;
    }
  if(c->mc != NULL)
    splaytree_remove(&c->mc->chans, c);
  chan_release(c);
  return;
}

/* ---- live-upgrade record (section "Live upgrade") ---- */

/*
 * The channel record follows its VP's.  A mux channel names its client
 * by generation and its id on that client; a -U channel is followed by
 * its client's ST_REC_UC record; a channel with neither has no consumer
 * (yet).
 */
enum { CHF_ID = 1, CHF_MUX_GEN = 4, CHF_MUX_ID = 5 };

#define CHROW(tag, m, mn, mx, df)					\
  { tag, (uint8_t)sizeof(((chan_t *)0)->m), 0, offsetof(chan_t, m), mn,	\
    mx, df, #m }
static const tlv_desc_t chan_fields[] = {
  CHROW(2, fin_sent, 0, 1, 0),
  CHROW(3, fin_rcvd, 0, 1, 0),
#ifdef UPG_TEST_EXTENDED
  CHROW(900, test_extra, 0, UINT64_MAX, UPG_TEST_EXTENDED),
#endif
};
#undef CHROW

static void uc_save(st_w_t *w, const uclient_t *uc);

/* write channel item's record (a splaytree_inorder callback) */
static int chan_save(void *item, void *param)
{
  chan_t *c = item;
  st_w_t *w = param;
  size_t at = tlv_begin(&w->t, ST_REC_CHAN);
  tlv_field_uint(&w->t, CHF_ID, c->id, 4);
  tlv_table_put(&w->t, chan_fields, ST_TABLE_N(chan_fields), c);
  if(c->mc != NULL && c->mc->state != MC_DEAD)
    {
      tlv_field_uint(&w->t, CHF_MUX_GEN, c->mc->gen, 8);
      tlv_field_uint(&w->t, CHF_MUX_ID, c->mc_id, 4);
    }
  tlv_end(&w->t, at);
#ifdef UPG_TEST_EXTENDED
  at = tlv_begin(&w->t, ST_REC_TEST);
  tlv_end(&w->t, at);
#endif
  if(c->uc != NULL && c->uc->state != UC_DEAD)
    uc_save(w, c->uc);
  return 0;
}

static mclient_t *mc_by_gen(uint64_t gen);

/*
 * A channel of the last VP record from its record of len bytes at p.
 * Returns 0, or -1 with r->why.
 */
static int chan_load(st_r_t *r, const uint8_t *p, uint32_t len)
{
  tlv_r_t fr = {p, len, 0};
  const uint8_t *v;
  uint64_t x, gen = 0;
  uint32_t n;
  uint16_t tag;
  chan_t *c, key;
  mclient_t *mc;
  int rc;

  if(r->vp == NULL)
    return st_bad(r, "record chan: no vp before it");
  if((c = calloc(1, sizeof(chan_t))) == NULL)
    return st_bad(r, "out of memory");
  tlv_table_defaults(chan_fields, ST_TABLE_N(chan_fields), c);
  while((rc = tlv_next(&fr, &tag, &v, &n)) == 1)
    {
      if((rc = st_table_get(r, "chan", chan_fields,
			    ST_TABLE_N(chan_fields), c, tag, v, n)) != 0)
	{
	  if(rc < 0)
	    goto err;
	  continue;
	}
      if(tag == CHF_ID || tag == CHF_MUX_ID)
	{
	  if(tlv_uint(v, n, 4, &x) != 0 || x == 0)
	    goto bad;
	  if(tag == CHF_ID)
	    c->id = (uint32_t)x;
	  else
	    c->mc_id = (uint32_t)x;
	}
      else if(tag == CHF_MUX_GEN)
	{
	  if(tlv_uint(v, n, 8, &gen) != 0 || gen == 0)
	    goto bad;
	}
      else if(st_unknown(r, "chan", tag) != 0)
	goto err;
    }
  if(rc < 0 || c->id == 0 || vp_chan_find(r->vp, c->id) != NULL ||
     (gen != 0) != (c->mc_id != 0))
    goto bad;
  if(gen != 0)
    {
      key.mc_id = c->mc_id;
      if((mc = mc_by_gen(gen)) == NULL ||
	 splaytree_find(&mc->chans, &key) != NULL)
	goto bad;
      c->mc = mc;
      splaytree_insert(&mc->chans, c);
    }
  c->vp = r->vp;
  splaytree_insert(&r->vp->chans, c);
  r->chan = gen != 0 ? NULL : c;
  return 0;

 bad:
  st_bad(r, "record chan: bad or missing id or consumer");
 err:
  free(c);
  return -1;
}


/* ---------------------------------------------------------------------
 * Per-VP unix sockets (PROTOCOL.md 4)
 *
 * A listener exists while its VP is in GO.  Each accepted client owns
 * exactly one channel; uc_close() is its one teardown and decides, from
 * the channel's FIN flags, whether scamper must be told.
 * --------------------------------------------------------------------- */

static mode_t unix_mode(void)
{
  mode_t mode = 0700;
  if(opt_flags & OPT_ALLOWGROUP) mode |= 0070;
  if(opt_flags & OPT_ALLOWOTHER) mode |= 0007;
  return mode;
}

/*
 * Bind and listen on a unix socket at path with the configured mode.  The
 * umask is set so the socket never exists with wider permissions, and
 * the chmod makes the mode exact.  Returns the fd or -1 (errno set).
 */
static int unix_bind_listen(const char *path)
{
  struct sockaddr_un sn;
  mode_t mode = unix_mode(), old;
  int fd, rc, err;

  memset(&sn, 0, sizeof(sn));
  sn.sun_family = AF_UNIX;
  memcpy(sn.sun_path, path, strlen(path) + 1);
  if((fd = socket(AF_UNIX, SOCK_STREAM, 0)) < 0)
    return -1;
  old = umask((mode_t)(~mode & 0777));
  rc = bind(fd, (struct sockaddr *)&sn, sizeof(sn));
  err = errno;
  umask(old);
  if(rc != 0)
    {
      close(fd);
      errno = err;
      return -1;
    }
  if(chmod(path, mode) != 0 || listen(fd, SOMAXCONN) != 0 ||
     fd_nonblock(fd) != 0 || fd_cloexec(fd) != 0 || !ev_fd_ok(fd))
    {
      err = errno != 0 ? errno : EMFILE;
      close(fd);
      unlink(path);
      errno = err;
      return -1;
    }
  return fd;
}

/*
 * Create a listening unix socket at path.  The socket is set up under a
 * temporary name in the same directory and then hard-linked into place,
 * so it appears only once it accepts connections (a client that sees
 * the file never gets "connection refused"), and an existing file at path
 * is never replaced (EEXIST, reported as address in use).  Returns the fd
 * or -1 with the error logged.
 */
static int unix_listen(const char *path)
{
  static unsigned long counter = 0;
  struct sockaddr_un sn;
  const char *slash;
  char tmp[sizeof(sn.sun_path)];
  int fd, n, err;

  if(path == NULL)
    return -1;
  if(strlen(path) >= sizeof(sn.sun_path))
    {
      log_err("%s: path too long for a unix socket", path);
      errno = ENAMETOOLONG;
      return -1;
    }
  slash = strrchr(path, '/');
  n = snprintf(tmp, sizeof(tmp), "%.*s.sc_remoted-%ld-%lu",
	       slash != NULL ? (int)(slash - path + 1) : 0, path,
	       (long)getpid(), counter++);
  if(n < 0 || (size_t)n >= sizeof(tmp))
    {
      /* no room for a temporary name: bind in place */
      if((fd = unix_bind_listen(path)) < 0)
	log_err("%s: %s", path, strerror(errno));
      return fd;
    }
  unlink(tmp);
  if((fd = unix_bind_listen(tmp)) < 0)
    {
      err = errno;
      log_err("%s: %s", path, strerror(err));
      errno = err;
      return -1;
    }
  if(link(tmp, path) != 0)
    {
      err = errno;
      unlink(tmp);
      close(fd);
      if(err != EEXIST)
	{
	  /* a filesystem without hard links: bind in place */
	  if((fd = unix_bind_listen(path)) < 0)
	    log_err("%s: %s", path, strerror(errno));
	  return fd;
	}
      log_err("%s: %s", path, strerror(EADDRINUSE));
      errno = EADDRINUSE;
      return -1;
    }
  unlink(tmp);
  return fd;
}

/*
 * The path of vp's -U socket, named after its monitor name and peer
 * (the one naming rule: a live upgrade's successor unlinks this path
 * when the VP goes).  Returns a malloc'd string, or NULL (no -U
 * directory, or out of memory).
 */
static char *vp_sockpath(const vp_t *vp)
{
  size_t len;
  char *path;
  if(opt_udir == NULL)
    return NULL;
  len = strlen(opt_udir) + strlen(vp->peer) + 3 +
    (vp->name != NULL ? strlen(vp->name) + 1 : 0);
  if((path = malloc(len)) == NULL)
    return NULL;
  if(vp->name != NULL)
    snprintf(path, len, "%s/%s-%s", opt_udir, vp->name, vp->peer);
  else
    snprintf(path, len, "%s/%s", opt_udir, vp->peer);
  return path;
}

/* create the VP's -U socket */
static int vp_lev_open(vp_t *vp)
{
  char *path;
  int fd;

  if(opt_udir == NULL)
    return 0;
  if((path = vp_sockpath(vp)) == NULL)
    return -1;
  if((fd = unix_listen(path)) < 0)
    {
      free(path);
      return -1;
    }
  fdev_init(&vp->lev, fd, FD_VP_LISTEN, vp);
  if(ev_set(&vp->lev, !accept_paused, 0) != 0)
    {
      close(fd);
      unlink(path);
      free(path);
      vp->lev.fd = -1;
      return -1;
    }
  vp->sockpath = path;
  return 0;
}

static void vp_lev_close(vp_t *vp)
{
  if(vp->lev.fd >= 0)
    ev_close(&vp->lev);
  if(vp->sockpath != NULL)
    {
      unlink(vp->sockpath);
      free(vp->sockpath);
      vp->sockpath = NULL;
    }
  return;
}

static void uc_stall(tw_timer_t *t);

/* a -U client on fd for vp, in RELAY; the caller registers the fd */
static uclient_t *uc_alloc(vp_t *vp, int fd)
{
  uclient_t *uc;
  if((uc = calloc(1, sizeof(uclient_t))) == NULL)
    return NULL;
  conn_init(&uc->conn, fd, FD_UC, uc, NULL);
  sink_init(&uc->sink, uc_stall);
  dlist_node_init(&uc->paused_node);
  uc->vp = vp;
  uc->state = UC_RELAY;
  return uc;
}

static void uc_close(uclient_t *uc, const char *why);

/*
 * The only place a -U client changes state.  Leaving IN_PAUSED takes it
 * off uc_in_paused.  Entry work: RELAY reads again; IN_PAUSED stops
 * reading and joins uc_in_paused (in_paused_recheck resumes it when its
 * VP's unacked queue has room); HALF_CLOSED (client EOF) and DRAINING
 * (closing once its output is written) stop reading; DEAD is the one
 * teardown: if neither side has sent a FIN on its channel, scamper is
 * sent one (client EOF, read or write error), then the channel record is
 * released and the VP feeding it may resume.  why is logged for DEAD.
 * Returns 0, or -1 when the client is (now) dead.
 */
static int uc_set_state(uclient_t *uc, ucstate_t st, const char *why)
{
  vp_t *feeder;
  chan_t *c;
  int rd = -1;

  if(uc->state == UC_DEAD)
    return -1;
  if(uc->state == UC_IN_PAUSED)
    dlist_remove(&uc_in_paused, &uc->paused_node);
  uc->state = (uint8_t)st;
  switch(st)
    {
    case UC_RELAY:
      rd = 1;
      break;
    case UC_IN_PAUSED:
      dlist_push_tail(&uc_in_paused, &uc->paused_node);
      rd = 0;
      break;
    case UC_HALF_CLOSED:
      uc->eof = 1;
      rd = 0;
      break;
    case UC_DRAINING:
      rd = 0;
      break;
    case UC_DEAD:
      log_dbg("%s: local client closed: %s",
	      uc->vp != NULL ? uc->vp->peer : "?", why);
      conn_close(&uc->conn);
      sink_fini(&uc->sink);
      if((c = uc->chan) != NULL)
	{
	  uc->chan = NULL;
	  c->uc = NULL;
	  feeder = c->vp;
	  if(chan_send_fin(c) == 0)
	    {
	      chan_release(c);
	      vp_try_unpause(feeder);
	    }
	}
      slist_push_tail(&gc_ucs, &uc->gc_node);
      return -1;
    }
  if(rd >= 0 && uc->conn.ev.fd >= 0 && ev_want_read(&uc->conn.ev, rd) != 0)
    {
      uc_close(uc, "could not change read interest");
      return -1;
    }
  return 0;
}

/* the one teardown of a -U client (see uc_set_state) */
static void uc_close(uclient_t *uc, const char *why)
{
  uc_set_state(uc, UC_DEAD, why);
  return;
}

static void uc_stall(tw_timer_t *t)
{
  uclient_t *uc = CONTAINER_OF(t, uclient_t, sink.stall_timer);
  if(sink_stalled(&uc->sink))
    {
      log_warn("%s: local client stalled: %" PRIu64 " bytes unread for "
	       "%lds", uc->vp != NULL ? uc->vp->peer : "?",
	       sink_backlog(&uc->sink), opt_stall);
      uc_close(uc, "stalled");
    }
  return;
}

/* ---- live-upgrade record (section "Live upgrade") ---- */

/* the -U client record, after its channel's; a sink's fields are
 * SINKF_OUT and SINKF_STALL in every consumer record */
enum { UCF_FD = 20, SINKF_OUT = 21, SINKF_STALL = 22 };
/* uc_set_state's state as the two flags of the record (rows 6, 7) */
enum { UCF_CLOSING = 6, UCF_IN_PAUSED = 7 };

#define UCROW(tag, m, fl, mn, mx, df)					\
  { tag, (uint8_t)sizeof(((uclient_t *)0)->m), fl,			\
    offsetof(uclient_t, m), mn, mx, df, #m }
static const tlv_desc_t uc_fields[] = {
  UCROW(1, conn.ev.rd,         0, 0, 1, 0),
  UCROW(2, conn.ev.wr,         0, 0, 1, 0),
  UCROW(3, sink.full,          0, 0, 1, 0),
  UCROW(4, sink.last_progress, TLVF_PAST, 0, ST_TICK_MAX, 0),
  UCROW(5, eof,                0, 0, 1, 0),
};
#undef UCROW

static void uc_save(st_w_t *w, const uclient_t *uc)
{
  size_t at = tlv_begin(&w->t, ST_REC_UC);
  tlv_table_put(&w->t, uc_fields, ST_TABLE_N(uc_fields), uc);
  tlv_field_uint(&w->t, UCF_CLOSING, uc->state == UC_DRAINING, 1);
  tlv_field_uint(&w->t, UCF_IN_PAUSED, uc->state == UC_IN_PAUSED, 1);
  st_fd_put(w, UCF_FD, uc->conn.ev.fd);
  st_buf_put(w, SINKF_OUT, &uc->sink.out);
  st_timer_put(w, SINKF_STALL, &uc->sink.stall_timer);
  tlv_end(&w->t, at);
  return;
}

/* one sink field of a consumer record: 1 taken, 0 not a sink field, -1 */
static int sink_load_field(st_r_t *r, sink_t *s, uint16_t tag,
			   const uint8_t *v, uint32_t n)
{
  if(tag == SINKF_OUT)
    {
      if(buf_len(&s->out) > 0)
	return st_bad(r, "two sink outputs");
      return st_buf_get(r, &s->out, v, n) == 0 ? 1 : -1;
    }
  if(tag == SINKF_STALL)
    return st_timer_get(r, &s->stall_timer, v, n) == 0 ? 1 : -1;
  return 0;
}

/*
 * The -U client of the last channel record, through uc_alloc() like
 * vp_lev_accept().  Returns 0, or -1 with r->why.
 */
static int uc_load(st_r_t *r, const uint8_t *p, uint32_t len)
{
  tlv_r_t fr = {p, len, 0};
  const uint8_t *v;
  uint32_t n;
  uint16_t tag;
  uclient_t *uc;
  uint64_t closing = 0, in_paused = 0;
  int rc;

  if(r->chan == NULL || r->chan->uc != NULL)
    return st_bad(r, "record uc: no free channel before it");
  if((uc = uc_alloc(r->vp, -1)) == NULL)
    return st_bad(r, "out of memory");
  r->chan->uc = uc;
  uc->chan = r->chan;
  tlv_table_defaults(uc_fields, ST_TABLE_N(uc_fields), uc);
  while((rc = tlv_next(&fr, &tag, &v, &n)) == 1)
    {
      if((rc = st_table_get(r, "uc", uc_fields, ST_TABLE_N(uc_fields), uc,
			    tag, v, n)) == 0)
	rc = sink_load_field(r, &uc->sink, tag, v, n);
      if(rc == 0 && (tag == UCF_CLOSING || tag == UCF_IN_PAUSED))
	rc = tlv_uint(v, n, 1, tag == UCF_CLOSING ? &closing : &in_paused)
	  != 0 || closing > 1 || in_paused > 1 ?
	  st_bad(r, "record uc: bad state flag") : 1;
      if(rc == 0 && tag == UCF_FD)
	rc = uc->conn.ev.fd >= 0 ? st_bad(r, "record uc: two fds") :
	  (uc->conn.ev.fd = st_fd_get(r, v, n)) < 0 ? -1 : 1;
      if(rc == 0 && st_unknown(r, "uc", tag) != 0)
	return -1;
      if(rc < 0)
	return -1;
    }
  if(rc < 0 || uc->conn.ev.fd < 0)
    return st_bad(r, "record uc: truncated or no fd");
  /* the state as saved (the fd is not registered yet: no entry work) */
  uc->state = closing ? UC_DRAINING : in_paused ? UC_IN_PAUSED :
    uc->eof ? UC_HALF_CLOSED : UC_RELAY;
  if(uc->state == UC_IN_PAUSED)
    dlist_push_tail(&uc_in_paused, &uc->paused_node);
  if(st_ev_register(r, &uc->conn.ev, uc->state == UC_IN_PAUSED) != 0)
    return -1;
  if(buf_len(&uc->sink.out) > 0)
    out_queue(&uc->conn.ev);
  return 0;
}

/* close once nothing is left to deliver, if scamper or the client ended */
static void uc_check_done(uclient_t *uc)
{
  if(uc->state == UC_DEAD || sink_backlog(&uc->sink) > 0)
    return;
  if(uc->state == UC_DRAINING || (uc->chan != NULL && uc->chan->fin_rcvd))
    uc_close(uc, uc->eof ? "client done and scamper finished"
	     : "scamper finished the channel");
  return;
}

/* scamper's FIN: stop reading, deliver what is queued, then close */
static void uc_on_fin(uclient_t *uc)
{
  if(uc_set_state(uc, UC_DRAINING, NULL) == 0)
    uc_check_done(uc);
  return;
}

/*
 * Read what the client sent and relay it to scamper on its channel, at
 * most four reads per event.  Stops (IN_PAUSED) while the VP's unacked
 * queue is full; on EOF tells scamper (FIN) and keeps delivering until
 * scamper's FIN, or closes at once if scamper had finished.  May close
 * the client, or its VP (and the client with it) on a send failure.
 */
static void uc_read(uclient_t *uc)
{
  chan_t *c;
  ssize_t n;
  int i;

  for(i=0; i<4; i++)
    {
      if(uc->chan != NULL && vp_unacked_full(uc->chan->vp))
	{
	  uc_set_state(uc, UC_IN_PAUSED, NULL);
	  return;
	}
      if((n = conn_read(&uc->conn, scratch, UC_READ_MAX)) < 0)
	{
	  if(n == CONN_AGAIN)
	    return;
	  uc_close(uc, "read error");
	  return;
	}
      c = uc->chan;
      if(n == 0)
	{
	  /* EOF: tell scamper; keep delivering until its FIN */
	  if(uc_set_state(uc, UC_HALF_CLOSED, NULL) != 0)
	    return;
	  if(c == NULL || c->fin_rcvd)
	    {
	      if(uc_set_state(uc, UC_DRAINING, NULL) == 0)
		uc_check_done(uc);
	      return;
	    }
	  if(chan_send_fin(c) != 0)
	    return; /* the VP was closed, and this client with it */
	  return;
	}
      if(c == NULL || c->vp == NULL || c->fin_rcvd || c->fin_sent)
	continue; /* nowhere to go */
      if(vp_send_data(c->vp, c->id, scratch, (size_t)n) != 0)
	return;
      if((size_t)n < UC_READ_MAX)
	return;
    }
  return;
}

static void uc_flush(uclient_t *uc)
{
  int rc;
  if(uc->state == UC_DEAD || uc->conn.ev.fd < 0)
    return;
  if((rc = sink_flush(&uc->sink, &uc->conn)) < 0)
    {
      uc_close(uc, "write error");
      return;
    }
  if(rc == 1 && uc->chan != NULL)
    vp_try_unpause(uc->chan->vp);
  uc_check_done(uc);
  return;
}

static void uc_dispatch(uclient_t *uc, int rd, int wr)
{
  if(uc->state == UC_DEAD)
    return;
  if(wr)
    {
      uc_flush(uc);
      if(uc->state == UC_DEAD)
	return;
    }
  if(rd && uc->conn.ev.rd)
    uc_read(uc);
  return;
}

/* accept local clients on a VP's socket; each gets a channel */
static void vp_lev_accept(vp_t *vp)
{
  uclient_t *uc;
  chan_t *c;
  int fd, i;

  for(i=0; i<16 && vp->lev.fd >= 0; i++)
    {
      if((fd = lev_accept(&vp->lev, NULL, vp->sockpath)) < 0)
	return;
      if(!ev_fd_ok(fd) || fd_nonblock(fd) != 0 || fd_cloexec(fd) != 0 ||
	 (uc = uc_alloc(vp, fd)) == NULL)
	{
	  close(fd);
	  continue;
	}
      if(ev_set(&uc->conn.ev, 1, 0) != 0)
	{
	  close(fd);
	  free(uc);
	  continue;
	}
      if((c = chan_open(vp)) == NULL)
	{
	  uc->chan = NULL;
	  uc_close(uc, "could not open a channel");
	  return;
	}
      c->uc = uc;
      uc->chan = c;
      log_dbg("%s: local client on channel %u", vp->peer, c->id);
    }
  return;
}

/* ---------------------------------------------------------------------
 * Mux protocol (PROTOCOL.md 5)
 *
 * One listening socket; each client gets the VP_UPDATE burst and GO, then
 * broadcasts of arrivals and departures, and any number of channels on
 * any VPs.  mux_rx_feed() is the parser of the client byte stream: data
 * is passed through as it arrives, control messages only once complete.
 * mc_close() is the one teardown of a client.
 * --------------------------------------------------------------------- */

typedef struct meta meta_t;
static meta_t *meta_find(const char *name);
static void meta_attrs(const meta_t *m,
		       void (*fn)(void *arg, uint16_t attr, const char *val),
		       void *arg);

static uint8_t mux_enc[MUX_HDRLEN + MUX_UPDATE_MAX];

static int chan_mc_cmp(const void *a, const void *b)
{
  const chan_t *x = a, *y = b;
  if(x->mc_id < y->mc_id) return -1;
  if(x->mc_id > y->mc_id) return 1;
  return 0;
}

/* an encoder of VP_UPDATE attributes into mux_enc */
typedef struct mux_upd
{
  size_t len;       /* payload bytes so far */
  int    truncated;
} mux_upd_t;

static void mux_upd_attr(void *arg, uint16_t attr, const char *val)
{
  mux_upd_t *u = arg;
  size_t vl = strlen(val) + 1;
  if(u->len + 2 + vl > MUX_UPDATE_MAX)
    {
      u->truncated++;
      return;
    }
  bytes_htons(mux_enc + MUX_HDRLEN + u->len, attr);
  memcpy(mux_enc + MUX_HDRLEN + u->len + 2, val, vl);
  u->len += 2 + vl;
  return;
}

/*
 * Encode VP_UPDATE for vp into mux_enc, attributes in the order of
 * PROTOCOL.md 5.4.  Frames larger than upstream's 1024 bytes are sent
 * (libscamperctrl accepts them); attributes that would push the payload
 * past 64 KiB are left out with a log line.  Returns the frame length.
 */
static size_t mux_encode_vp_update(const vp_t *vp)
{
  mux_upd_t u;
  char arrival[48];
  const meta_t *m;

  u.len = 0;
  u.truncated = 0;
  bytes_htons(mux_enc + MUX_HDRLEN, MUX_VP_UPDATE);
  bytes_htonl(mux_enc + MUX_HDRLEN + 2, vp->id);
  u.len = 6;
  if(vp->name != NULL)
    mux_upd_attr(&u, MUX_ATTR_NAME, vp->name);
  snprintf(arrival, sizeof(arrival), "%ld.%06ld", (long)vp->arrival.tv_sec,
	   (long)vp->arrival.tv_usec);
  mux_upd_attr(&u, MUX_ATTR_ARRIVAL, arrival);
  mux_upd_attr(&u, vp->family == AF_INET6 ? MUX_ATTR_IPV6 : MUX_ATTR_IPV4,
	       vp->addr);
  if(vp->name != NULL && (m = meta_find(vp->name)) != NULL)
    meta_attrs(m, mux_upd_attr, &u);
  if(u.truncated > 0)
    log_warn("vp %u %s: %d attributes left out of VP_UPDATE (over %d bytes)",
	    vp->id, vp->name != NULL ? vp->name : "", u.truncated,
	    MUX_UPDATE_MAX);
  bytes_htonl(mux_enc, 0);
  bytes_htonl(mux_enc + 4, (uint32_t)u.len);
  return MUX_HDRLEN + u.len;
}

static void mc_out(mclient_t *mc, const uint8_t *data, size_t len);

static void mc_send_ctl(mclient_t *mc, uint16_t type, uint32_t val,
			int has_val)
{
  uint8_t f[MUX_HDRLEN + 6];
  size_t len = has_val ? 6 : 2;
  bytes_htonl(f, 0);
  bytes_htonl(f + 4, (uint32_t)len);
  bytes_htons(f + 8, type);
  if(has_val)
    bytes_htonl(f + 10, val);
  mc_out(mc, f, MUX_HDRLEN + len);
  return;
}

/* 1 unless mc is in its burst and its cursor has not yet reached vp */
static int mc_burst_passed(const mclient_t *mc, const vp_t *vp)
{
  return mc->state != MC_BURST || mc->burst_next == NULL ||
    vp->accept_seq < mc->burst_next->accept_seq;
}

/* the VP after vp in accept order, or NULL */
static vp_t *vp_list_next(const vp_t *vp)
{
  dlist_node_t *n = vp->list_node.next;
  return n != NULL ? CONTAINER_OF(n, vp_t, list_node) : NULL;
}

/* vp leaves vp_list: cursors resting on it move to the next VP */
static void mux_burst_forget(vp_t *vp)
{
  dlist_node_t *n;
  mclient_t *mc;
  for(n = mc_list.head; n != NULL; n = n->next)
    {
      mc = CONTAINER_OF(n, mclient_t, list_node);
      if(mc->state == MC_BURST && mc->burst_next == vp)
	mc->burst_next = vp_list_next(vp);
    }
  return;
}

/*
 * Announce vp to mux clients whose generation is above after_gen: 0 for
 * every client (a new VP), or the generation at which the VP went zombie
 * (a resume: only clients that connected meanwhile lack it).  A client
 * still in its burst whose cursor has not reached vp is skipped: the
 * cursor will announce it (a new VP is appended to vp_list, so it is
 * always ahead of every cursor).
 */
static void mux_announce_vp(vp_t *vp, uint64_t after_gen)
{
  dlist_node_t *n;
  mclient_t *mc;
  size_t len = 0;

  for(n = mc_list.head; n != NULL; n = n->next)
    {
      mc = CONTAINER_OF(n, mclient_t, list_node);
      if(mc->state == MC_DEAD || mc->gen <= after_gen ||
	 !mc_burst_passed(mc, vp))
	continue;
      if(len == 0)
	len = mux_encode_vp_update(vp);
      mc_out(mc, mux_enc, len);
    }
  return;
}

/* VP_DEPART to every client, except a bursting one not yet told of vp */
static void mux_depart_vp(vp_t *vp)
{
  dlist_node_t *n;
  mclient_t *mc;
  for(n = mc_list.head; n != NULL; n = n->next)
    {
      mc = CONTAINER_OF(n, mclient_t, list_node);
      if(mc->state != MC_DEAD && mc_burst_passed(mc, vp))
	mc_send_ctl(mc, MUX_VP_DEPART, vp->id, 1);
    }
  return;
}

static void mc_close(mclient_t *mc, const char *why);
static void mc_teardown(mclient_t *mc, const char *why);

/* queue bytes for a mux client */
static void mc_out(mclient_t *mc, const uint8_t *data, size_t len)
{
  if(mc->state == MC_DEAD)
    return;
  if(buf_append(sink_in(&mc->sink), data, len) != 0)
    {
      mc_close(mc, "out of memory");
      return;
    }
  out_queue(&mc->conn.ev);
  sink_appended(&mc->sink, NULL);
  return;
}

/* scamper data on a mux channel: exactly one mux frame per remote frame */
static void mc_deliver(mclient_t *mc, vp_t *feeder, uint32_t id,
		       const uint8_t *data, size_t len)
{
  uint8_t h[MUX_HDRLEN];
  if(mc->state == MC_DEAD)
    return;
  bytes_htonl(h, id);
  bytes_htonl(h + 4, (uint32_t)len);
  if(buf_append(sink_in(&mc->sink), h, MUX_HDRLEN) != 0 ||
     buf_append(sink_in(&mc->sink), data, len) != 0)
    {
      mc_close(mc, "out of memory");
      return;
    }
  out_queue(&mc->conn.ev);
  sink_appended(&mc->sink, feeder);
  return;
}

static void mc_send_channel_close(mclient_t *mc, uint32_t id)
{
  mc_send_ctl(mc, MUX_CHANNEL_CLOSE, id, 1);
  return;
}

/*
 * The only place a mux client changes state.  Leaving BURST cancels the
 * burst deadline; leaving IN_PAUSED takes it off mc_in_paused.  Entry
 * work: BURST starts the VP_UPDATE cursor at the oldest VP, arms
 * -O mux-burst-timeout and stops reading (mc_burst_fill produces the
 * burst as the client reads); RELAY reads (after GO, or when its VPs'
 * unacked queues have room again); IN_PAUSED stops reading and joins
 * mc_in_paused (in_paused_recheck resumes it); DEAD is the one teardown
 * (see mc_close).  why is logged for DEAD.  Returns 0, or -1 when the
 * client is (now) dead.
 */
static int mc_set_state(mclient_t *mc, mcstate_t st, const char *why)
{
  int rd = -1;
  if(mc->state == MC_DEAD)
    return -1;
  if(mc->state == MC_BURST)
    tw_cancel(&mc->burst_timer);
  if(mc->state == MC_IN_PAUSED)
    dlist_remove(&mc_in_paused, &mc->paused_node);
  mc->state = (uint8_t)st;
  switch(st)
    {
    case MC_BURST:
      mc->burst_next = vp_list.head != NULL ?
	CONTAINER_OF(vp_list.head, vp_t, list_node) : NULL;
      tw_arm(&mc->burst_timer, (unsigned int)opt_mux_burst_timeout);
      rd = 0;
      break;
    case MC_RELAY:
      rd = 1;
      break;
    case MC_IN_PAUSED:
      mc->rd_stop_after_feed = 0;
      dlist_push_tail(&mc_in_paused, &mc->paused_node);
      rd = 0;
      break;
    case MC_DEAD:
      mc_teardown(mc, why);
      return -1;
    }
  if(rd >= 0 && ev_want_read(&mc->conn.ev, rd) != 0)
    {
      mc_close(mc, "could not change read interest");
      return -1;
    }
  return 0;
}

/* the one teardown of a mux client (see mc_teardown) */
static void mc_close(mclient_t *mc, const char *why)
{
  mc_set_state(mc, MC_DEAD, why);
  return;
}

/*
 * The entry work of DEAD: FIN to scamper for each of its channels that
 * neither side has finished, then its channel records are released (the
 * VPs feeding them may resume) and the socket closed.  Memory is freed
 * at the end of the loop iteration.
 */
static void mc_teardown(mclient_t *mc, const char *why)
{
  chan_t *c;
  log_dbg("mux client %llu: closing: %s", (unsigned long long)mc->gen, why);
  tw_cancel(&mc->burst_timer); /* armed only in BURST; cheap insurance */
  conn_close(&mc->conn);
  sink_fini(&mc->sink);
  while((c = splaytree_pop_min(&mc->chans)) != NULL)
    {
      vp_t *feeder = c->vp;
      c->mc = NULL;
      if(chan_send_fin(c) == 0)
	{
	  chan_release(c);
	  vp_try_unpause(feeder);
	}
    }
  free(mc->rx.ctl);
  mc->rx.ctl = NULL;
  dlist_remove(&mc_list, &mc->list_node);
  slist_push_tail(&gc_mcs, &mc->gc_node);
  return;
}

/* ---- client -> remoted ---- */

typedef struct mux_cb
{
  /* a complete control message body (starting at the u16 type) */
  int (*ctl)(void *arg, const uint8_t *body, uint32_t len);
  /* part of a data frame's payload, in order */
  int (*data)(void *arg, uint32_t chan, const uint8_t *data, size_t len);
  /* the stream is malformed beyond repair */
  int (*error)(void *arg, const char *why);
} mux_cb_t;

/*
 * Parse the mux client byte stream incrementally.  Data frame payloads
 * are passed to cb->data as they arrive, possibly in pieces; a control
 * message is passed to cb->ctl only once all 8 + len bytes are in.  A
 * control message shorter than 2 or longer than MUX_CTL_MAX is an error.
 * Returns 0 when all bytes were consumed, or the non-zero return of the
 * callback that stopped it.
 */
static int mux_rx_feed(mux_rx_t *rx, const uint8_t *p, size_t len,
		       const mux_cb_t *cb, void *arg)
{
  size_t n;
  int rc;

  while(len > 0)
    {
      if(rx->hdr_have < MUX_HDRLEN)
	{
	  n = MUX_HDRLEN - rx->hdr_have;
	  if(n > len) n = len;
	  memcpy(rx->hdr + rx->hdr_have, p, n);
	  rx->hdr_have += (uint8_t)n; p += n; len -= n;
	  if(rx->hdr_have < MUX_HDRLEN)
	    return 0;
	  rx->chan = bytes_ntohl(rx->hdr);
	  rx->left = bytes_ntohl(rx->hdr + 4);
	  if(rx->chan == 0)
	    {
	      if(rx->left < 2)
		return cb->error(arg, "control message shorter than 2 bytes");
	      if(rx->left > MUX_CTL_MAX)
		return cb->error(arg, "control message over 64 KiB");
	      if((rx->ctl = malloc(rx->left)) == NULL)
		return cb->error(arg, "out of memory");
	      rx->ctl_have = 0;
	    }
	  else if(rx->left == 0)
	    {
	      rx->hdr_have = 0;
	      continue;
	    }
	}
      n = rx->left;
      if(n > len) n = len;
      if(rx->chan == 0)
	{
	  memcpy(rx->ctl + rx->ctl_have, p, n);
	  rx->ctl_have += (uint32_t)n;
	  rx->left -= (uint32_t)n;
	  p += n; len -= n;
	  if(rx->left == 0)
	    {
	      uint8_t *ctl = rx->ctl;
	      rx->ctl = NULL;
	      rx->hdr_have = 0;
	      rc = cb->ctl(arg, ctl, rx->ctl_have);
	      free(ctl);
	      if(rc != 0)
		return rc;
	    }
	  continue;
	}
      rx->left -= (uint32_t)n;
      if(rx->left == 0)
	rx->hdr_have = 0;
      if((rc = cb->data(arg, rx->chan, p, n)) != 0)
	return rc;
      p += n; len -= n;
    }
  return 0;
}

static int mc_rx_error(void *arg, const char *why)
{
  mc_close(arg, why);
  return -1;
}

/* CHANNEL_OPEN(vp_id, chan): any invalid request closes the client */
static int mc_channel_open(mclient_t *mc, uint32_t vpid, uint32_t id)
{
  chan_t key, *c;
  vp_t *vp;

  key.mc_id = id;
  if(id == 0)
    return mc_rx_error(mc, "CHANNEL_OPEN with channel id 0");
  if(vpid == 0)
    return mc_rx_error(mc, "CHANNEL_OPEN with vp id 0");
  if(splaytree_find(&mc->chans, &key) != NULL)
    {
      log_dbg("mux client %llu: channel %u reused",
	      (unsigned long long)mc->gen, id);
      return mc_rx_error(mc, "CHANNEL_OPEN with a channel id in use");
    }
  if((vp = vp_find_id(vpid)) == NULL || vp->dead)
    {
      log_dbg("mux client %llu: no vp %u", (unsigned long long)mc->gen,
	      vpid);
      return mc_rx_error(mc, "CHANNEL_OPEN for an unknown vp");
    }
  if((c = chan_open(vp)) == NULL)
    return mc_rx_error(mc, "could not open a channel");
  c->mc = mc;
  c->mc_id = id;
  splaytree_insert(&mc->chans, c);
  log_dbg("mux client %llu: channel %u on vp %u is remote channel %u",
	  (unsigned long long)mc->gen, id, vpid, c->id);
  return 0;
}

static int mc_rx_ctl(void *arg, const uint8_t *b, uint32_t len)
{
  mclient_t *mc = arg;
  uint16_t type = bytes_ntohs(b);

  if(type == MUX_CHANNEL_OPEN)
    {
      if(len < 10)
	return mc_rx_error(mc, "short CHANNEL_OPEN");
      return mc_channel_open(mc, bytes_ntohl(b + 2), bytes_ntohl(b + 6));
    }
  log_dbg("mux client %llu: ignoring control type %u",
	  (unsigned long long)mc->gen, type);
  return 0;
}

static int mc_rx_data(void *arg, uint32_t id, const uint8_t *data,
		      size_t len)
{
  mclient_t *mc = arg;
  chan_t key, *c;

  key.mc_id = id;
  if((c = splaytree_find(&mc->chans, &key)) == NULL || c->vp == NULL ||
     c->fin_rcvd || c->fin_sent)
    return 0; /* unknown or finished channel: discarded */
  if(vp_send_data(c->vp, c->id, data, len) != 0)
    return mc->state == MC_DEAD ? -1 : 0;
  if(vp_unacked_full(c->vp))
    mc->rd_stop_after_feed = 1;
  return mc->state == MC_DEAD ? -1 : 0;
}

static void mc_stall(tw_timer_t *t)
{
  mclient_t *mc = CONTAINER_OF(t, mclient_t, sink.stall_timer);
  if(sink_stalled(&mc->sink))
    {
      log_warn("mux client %llu stalled: %" PRIu64 " bytes unread for "
	       "%lds", (unsigned long long)mc->gen, sink_backlog(&mc->sink),
	       opt_stall);
      mc_close(mc, "stalled");
    }
  return;
}

static int chan_unacked_full(void *item, void *param)
{
  (void)param;
  return vp_unacked_full(((chan_t *)item)->vp);
}

/* would writing to any of mc's channels grow a full unacked queue? */
static int mc_targets_full(mclient_t *mc)
{
  return splaytree_inorder(&mc->chans, chan_unacked_full, NULL) != 0;
}

/*
 * A VP's unacked queue shrank (or the VP went away): resume reading the
 * clients paused for it whose targets all have room again.
 */
static void in_paused_recheck(void)
{
  dlist_node_t *n, *next;
  uclient_t *uc;
  mclient_t *mc;

  for(n = uc_in_paused.head; n != NULL; n = next)
    {
      next = n->next;
      uc = CONTAINER_OF(n, uclient_t, paused_node);
      if(uc->chan != NULL && vp_unacked_full(uc->chan->vp))
	continue;
      uc_set_state(uc, UC_RELAY, NULL);
    }
  for(n = mc_in_paused.head; n != NULL; n = next)
    {
      next = n->next;
      mc = CONTAINER_OF(n, mclient_t, paused_node);
      if(mc_targets_full(mc))
	continue;
      mc_set_state(mc, MC_RELAY, NULL);
    }
  return;
}

static const mux_cb_t mc_rx_cb = { mc_rx_ctl, mc_rx_data, mc_rx_error };

/*
 * Read what the mux client sent and feed the mux parser (data to the
 * VPs, control messages), at most four reads per event.  Stops reading
 * it (IN_PAUSED) when a VP it writes to has a full unacked queue, before
 * a read or after one that filled it.  May close the client.
 */
static void mc_read(mclient_t *mc)
{
  ssize_t n;
  int i;

  for(i=0; i<4; i++)
    {
      if(mc_targets_full(mc))
	{
	  mc_set_state(mc, MC_IN_PAUSED, NULL);
	  return;
	}
      if((n = conn_read(&mc->conn, scratch, SCRATCH_SIZE)) < 0)
	{
	  if(n == CONN_AGAIN)
	    return;
	  mc_close(mc, "read error");
	  return;
	}
      if(n == 0)
	{
	  mc_close(mc, "disconnected");
	  return;
	}
      if(mux_rx_feed(&mc->rx, scratch, (size_t)n, &mc_rx_cb, mc) != 0 ||
	 mc->state == MC_DEAD)
	return;
      /* decide on the state now: ACKs may have drained it since */
      if(mc->rd_stop_after_feed)
	{
	  mc->rd_stop_after_feed = 0;
	  if(mc_targets_full(mc))
	    {
	      mc_set_state(mc, MC_IN_PAUSED, NULL);
	      return;
	    }
	}
      if((size_t)n < SCRATCH_SIZE)
	return;
    }
  return;
}

static int chan_wake_vp(void *item, void *param)
{
  (void)param;
  vp_try_unpause(((chan_t *)item)->vp);
  return 0;
}

static void mc_burst_fill(mclient_t *mc);

/*
 * Write what is queued.  A client in its burst gets the next VP_UPDATEs
 * each time its output drains below the burst mark, in this same call
 * while the socket takes them, so a fast client is not slowed down.
 */
static void mc_flush(mclient_t *mc)
{
  int rc;
  for(;;)
    {
      if(mc->state == MC_DEAD || mc->conn.ev.fd < 0)
	return;
      if((rc = sink_flush(&mc->sink, &mc->conn)) < 0)
	{
	  mc_close(mc, "write error");
	  return;
	}
      if(rc == 1)
	splaytree_inorder(&mc->chans, chan_wake_vp, NULL);
      if(mc->state != MC_BURST || buf_len(&mc->sink.out) >= MC_BURST_MARK)
	return;
      mc_burst_fill(mc);
    }
}

static void mc_dispatch(mclient_t *mc, int rd, int wr)
{
  if(mc->state == MC_DEAD)
    return;
  if(wr)
    {
      mc_flush(mc);
      if(mc->state == MC_DEAD)
	return;
    }
  if(rd)
    mc_read(mc);
  return;
}

/* ---- the VP_UPDATE burst ---- */

/*
 * Queue the next VP_UPDATEs of mc's burst until its output reaches the
 * burst mark, and GO after the last VP.  The cursor walks vp_list, in
 * accept order as upstream's burst (PROTOCOL.md 5.5; a resumed session
 * keeps its place), so a client that does not read costs at most the mark plus one
 * frame, not one frame per VP.  VPs in GO are announced as the cursor
 * reaches them; mux_announce_vp() and mux_depart_vp() use the cursor to
 * announce every VP exactly once, in accept order, before GO.  The client is
 * not read until GO is queued, so no channel of it can interleave data
 * with its burst (PROTOCOL.md 5.5).
 */
static void mc_burst_fill(mclient_t *mc)
{
  vp_t *vp;
  while(mc->state == MC_BURST && buf_len(&mc->sink.out) < MC_BURST_MARK)
    {
      if((vp = mc->burst_next) == NULL)
	{
	  mc_send_ctl(mc, MUX_GO, 0, 0);
	  if(mc_set_state(mc, MC_RELAY, NULL) != 0)
	    return;
	  log_dbg("mux client %llu: burst done",
		  (unsigned long long)mc->gen);
	  return;
	}
      mc->burst_next = vp_list_next(vp);
      if(vp->state == VP_GO && !vp->dead)
	mc_out(mc, mux_enc, mux_encode_vp_update(vp));
    }
  return;
}

static void mc_burst_timeout(tw_timer_t *t)
{
  mclient_t *mc = CONTAINER_OF(t, mclient_t, burst_timer);
  if(mc->state != MC_BURST)
    return;
  stats.mux_burst_timeouts++;
  log_warn("mux client %llu: VP_UPDATE burst not read within %lds "
	   "(mux-burst-timeout)", (unsigned long long)mc->gen,
	   opt_mux_burst_timeout);
  mc_close(mc, "burst timeout");
  return;
}

/*
 * A new mux client: the VP_UPDATE burst for every VP in GO, in accept
 * order, then GO, before any other event can interleave (PROTOCOL.md
 * 5.5).  The burst is produced as the client reads (mc_burst_fill).
 */
/*
 * A new mux client record with no fd, generation or burst yet: the one
 * initialisation behind mc_open() and mc_load().  NULL if out of memory.
 */
static mclient_t *mc_new(void)
{
  mclient_t *mc;
  if((mc = calloc(1, sizeof(mclient_t))) == NULL)
    return NULL;
  conn_init(&mc->conn, -1, FD_MC, mc, NULL);
  sink_init(&mc->sink, mc_stall);
  tw_timer_init(&mc->burst_timer, mc_burst_timeout);
  dlist_node_init(&mc->paused_node);
  splaytree_init(&mc->chans, chan_mc_cmp, offsetof(chan_t, mc_node));
  dlist_node_init(&mc->list_node);
#ifdef UPG_TEST_EXTENDED
  mc->test_extra = UPG_TEST_EXTENDED;
#endif
  return mc;
}

static mclient_t *mc_open(int fd)
{
  mclient_t *mc;

  if((mc = mc_new()) == NULL)
    return NULL;
  mc->conn.ev.fd = fd;
  mc->gen = ++mc_gen;
  if(ev_set(&mc->conn.ev, 1, 0) != 0)
    {
      free(mc);
      return NULL;
    }
  dlist_push_tail(&mc_list, &mc->list_node);
  log_dbg("mux client %llu: connected", (unsigned long long)mc->gen);
  if(mc_set_state(mc, MC_BURST, NULL) == 0)
    mc_burst_fill(mc);
  return mc;
}

/* ---- live-upgrade record (section "Live upgrade") ---- */

/*
 * The mux client record: socket, generation, output, parser state,
 * pauses and the VP_UPDATE burst cursor (the position among the VPs
 * saved of the VP it stands at; none: the end).  Mux client records
 * come before the VP records whose channels name them.
 */
enum { MCF_FD = 20, MCF_HDR = 23, MCF_CTL = 24, MCF_BURST_AT = 25,
       MCF_BURST_TIMER = 26 };
/* mc_set_state's state as the two flags of the record (rows 8, 10) */
enum { MCF_IN_PAUSED = 8, MCF_BURSTING = 10 };

#define MCROW(tag, m, fl, mn, mx, df)					\
  { tag, (uint8_t)sizeof(((mclient_t *)0)->m), fl,			\
    offsetof(mclient_t, m), mn, mx, df, #m }
static const tlv_desc_t mc_fields[] = {
  MCROW(1,  gen,               0, 1, ST_TICK_MAX, 0),
  MCROW(2,  conn.ev.rd,        0, 0, 1, 0),
  MCROW(3,  conn.ev.wr,        0, 0, 1, 0),
  MCROW(4,  sink.full,         0, 0, 1, 0),
  MCROW(5,  sink.last_progress, TLVF_PAST, 0, ST_TICK_MAX, 0),
  MCROW(6,  rx.hdr_have,       0, 0, MUX_HDRLEN, 0),
  MCROW(7,  rx.left,           0, 0, UINT32_MAX, 0),
  MCROW(9,  rd_stop_after_feed, 0, 0, 1, 0),
#ifdef UPG_TEST_EXTENDED
  MCROW(900, test_extra,       0, 0, UINT64_MAX, UPG_TEST_EXTENDED),
#endif
};
#undef MCROW

static int vp_saved(const vp_t *vp);

/* the position of vp (or the first saved VP after it) among the VPs
 * saved; UINT32_MAX for the end of the list */
static uint32_t mc_burst_index(const vp_t *vp)
{
  dlist_node_t *n;
  uint32_t i = 0;
  if(vp == NULL)
    return UINT32_MAX;
  for(n = vp_list.head; n != NULL; n = n->next)
    {
      const vp_t *x = CONTAINER_OF(n, vp_t, list_node);
      if(x->accept_seq >= vp->accept_seq && vp_saved(x))
	return i;
      if(vp_saved(x))
	i++;
    }
  return UINT32_MAX;
}

static void mc_save(st_w_t *w, const mclient_t *mc)
{
  size_t at = tlv_begin(&w->t, ST_REC_MC);
  tlv_table_put(&w->t, mc_fields, ST_TABLE_N(mc_fields), mc);
  tlv_field_uint(&w->t, MCF_IN_PAUSED, mc->state == MC_IN_PAUSED, 1);
  tlv_field_uint(&w->t, MCF_BURSTING, mc->state == MC_BURST, 1);
  st_fd_put(w, MCF_FD, mc->conn.ev.fd);
  st_buf_put(w, SINKF_OUT, &mc->sink.out);
  st_timer_put(w, SINKF_STALL, &mc->sink.stall_timer);
  tlv_field(&w->t, MCF_HDR, mc->rx.hdr, MUX_HDRLEN);
  if(mc->rx.hdr_have == MUX_HDRLEN && mc->rx.chan == 0 &&
     mc->rx.ctl_have > 0)
    tlv_field(&w->t, MCF_CTL, mc->rx.ctl, mc->rx.ctl_have);
  if(mc->state == MC_BURST && mc->burst_next != NULL)
    tlv_field_uint(&w->t, MCF_BURST_AT, mc_burst_index(mc->burst_next), 4);
  st_timer_put(w, MCF_BURST_TIMER, &mc->burst_timer);
  tlv_end(&w->t, at);
#ifdef UPG_TEST_EXTENDED
  at = tlv_begin(&w->t, ST_REC_TEST);
  tlv_end(&w->t, at);
#endif
  return;
}

static mclient_t *mc_by_gen(uint64_t gen)
{
  dlist_node_t *n;
  mclient_t *mc;
  for(n = mc_list.head; n != NULL; n = n->next)
    {
      mc = CONTAINER_OF(n, mclient_t, list_node);
      if(mc->gen == gen)
	return mc;
    }
  return NULL;
}

/* one MCF_* field of a mux client record: 0, or -1; the state flags
 * go to st (MCF_IN_PAUSED: bit 0, MCF_BURSTING: bit 1) */
static int mc_load_field(st_r_t *r, mclient_t *mc, uint16_t tag,
			 const uint8_t *v, uint32_t n, const uint8_t **ctl,
			 uint32_t *ctl_len, uint32_t *burst, unsigned int *st)
{
  uint64_t x;
  switch(tag)
    {
    case MCF_IN_PAUSED:
    case MCF_BURSTING:
      if(tlv_uint(v, n, 1, &x) != 0 || x > 1)
	return st_bad(r, "record mc: bad state flag");
      if(x)
	*st |= tag == MCF_IN_PAUSED ? 1 : 2;
      return 0;
    case MCF_FD:
      if(mc->conn.ev.fd >= 0)
	return st_bad(r, "record mc: two fds");
      return (mc->conn.ev.fd = st_fd_get(r, v, n)) < 0 ? -1 : 0;
    case MCF_HDR:
      if(n != MUX_HDRLEN)
	return st_bad(r, "record mc: bad header");
      memcpy(mc->rx.hdr, v, MUX_HDRLEN);
      return 0;
    case MCF_CTL:
      *ctl = v;
      *ctl_len = n;
      return 0;
    case MCF_BURST_AT:
      if(tlv_uint(v, n, 4, &x) != 0)
	return st_bad(r, "record mc: bad burst cursor");
      *burst = (uint32_t)x;
      return 0;
    case MCF_BURST_TIMER:
      return st_timer_get(r, &mc->burst_timer, v, n);
    }
  switch(sink_load_field(r, &mc->sink, tag, v, n))
    {
    case 1: return 0;
    case 0: return st_unknown(r, "mc", tag);
    default: return -1;
    }
}

/* the mux parser state read must be one mux_rx_feed could have left */
static int mc_load_rx(st_r_t *r, mclient_t *mc, const uint8_t *ctl,
		      uint32_t ctl_len)
{
  uint32_t total;
  if(mc->rx.hdr_have < MUX_HDRLEN)
    return mc->rx.left != 0 || ctl != NULL ?
      st_bad(r, "record mc: bad parser state") : 0;
  mc->rx.chan = bytes_ntohl(mc->rx.hdr);
  total = bytes_ntohl(mc->rx.hdr + 4);
  if(mc->rx.left == 0 || mc->rx.left > total ||
     (mc->rx.chan != 0 && ctl != NULL))
    return st_bad(r, "record mc: bad parser state");
  if(mc->rx.chan != 0)
    return 0;
  if(total < 2 || total > MUX_CTL_MAX || ctl_len != total - mc->rx.left)
    return st_bad(r, "record mc: bad control message");
  if((mc->rx.ctl = malloc(total)) == NULL)
    return st_bad(r, "out of memory");
  if(ctl_len > 0)
    memcpy(mc->rx.ctl, ctl, ctl_len);
  mc->rx.ctl_have = ctl_len;
  return 0;
}

/*
 * A mux client from its record of len bytes at p, through mc_new() like
 * mc_open(); it goes on mc_list at once (a failure leaves it to
 * shutdown_all()).  Its burst cursor is resolved once every VP is in
 * (r->burst).  Returns 0, or -1 with r->why.
 */
static int mc_load(st_r_t *r, const uint8_t *p, uint32_t len)
{
  tlv_r_t fr = {p, len, 0};
  const uint8_t *v, *ctl = NULL;
  uint32_t n, ctl_len = 0, burst = UINT32_MAX, *nb;
  uint16_t tag;
  mclient_t *mc, *prev;
  unsigned int st = 0;
  int rc;

  if(r->nvp > 0)
    return st_bad(r, "record mc: after a vp");
  if((mc = mc_new()) == NULL)
    return st_bad(r, "out of memory");
  prev = mc_list.tail != NULL ?
    CONTAINER_OF(mc_list.tail, mclient_t, list_node) : NULL;
  dlist_push_tail(&mc_list, &mc->list_node);
  tlv_table_defaults(mc_fields, ST_TABLE_N(mc_fields), mc);
  while((rc = tlv_next(&fr, &tag, &v, &n)) == 1)
    {
      if((rc = st_table_get(r, "mc", mc_fields, ST_TABLE_N(mc_fields), mc,
			    tag, v, n)) < 0)
	return -1;
      if(rc == 0 &&
	 mc_load_field(r, mc, tag, v, n, &ctl, &ctl_len, &burst, &st) != 0)
	return -1;
    }
  /* the state as saved (the fd is not registered yet: no entry work) */
  mc->state = (st & 2) ? MC_BURST : (st & 1) ? MC_IN_PAUSED : MC_RELAY;
  if(rc < 0 || mc->conn.ev.fd < 0 || mc->gen == 0 || mc->gen > mc_gen ||
     (prev != NULL && prev->gen >= mc->gen) ||
     (mc->state != MC_BURST && burst != UINT32_MAX))
    return st_bad(r, "record mc: truncated, no fd, or bad generation");
  /* the burst deadline runs exactly while the burst does */
  if(mc->state != MC_BURST && mc->burst_timer.slot != NULL)
    return st_bad(r, "record mc: burst deadline outside a burst");
  if(mc_load_rx(r, mc, ctl, ctl_len) != 0)
    return -1;
  if(r->nmc == r->burst_cap)
    {
      uint32_t cap = r->burst_cap > 0 ? r->burst_cap * 2 : 16;
      if((nb = realloc(r->burst, cap * sizeof(uint32_t))) == NULL)
	return st_bad(r, "out of memory");
      r->burst = nb;
      r->burst_cap = cap;
    }
  r->burst[r->nmc++] = burst;
  if(mc->state == MC_IN_PAUSED)
    dlist_push_tail(&mc_in_paused, &mc->paused_node);
  if(st_ev_register(r, &mc->conn.ev, mc->state == MC_IN_PAUSED) != 0)
    return -1;
  if(buf_len(&mc->sink.out) > 0)
    out_queue(&mc->conn.ev);
  return 0;
}

static void mux_tcp_setup(int fd, const struct sockaddr *sa);

/*
 * A mux client: tcp_sa is its address on the TCP mux (its own, or the one
 * its PROXY header gave), NULL on the -M socket.  Owns fd.
 */
static void mux_take(int fd, const struct sockaddr *tcp_sa)
{
  if(access_mux_check(tcp_sa) != 0)
    {
      close(fd);
      return;
    }
  if(tcp_sa != NULL)
    mux_tcp_setup(fd, tcp_sa);
  if(!ev_fd_ok(fd) || fd_nonblock(fd) != 0 || fd_cloexec(fd) != 0 ||
     mc_open(fd) == NULL)
    {
      log_warn("could not take mux client fd %d", fd);
      close(fd);
    }
  return;
}

/* a client on the -M socket or, with lev == &mux_tcp_lev, over TCP */
static void mux_accept(fdev_t *lev)
{
  struct sockaddr_storage ss;
  int fd, i, tcp = (lev == &mux_tcp_lev);
  for(i=0; i<16; i++)
    {
      if((fd = lev_accept(lev, &ss, "mux_accept")) < 0)
	return;
      if(tcp && prehdr_wanted(PP_MUX, (struct sockaddr *)&ss))
	prehdr_open(fd, (struct sockaddr *)&ss, PP_MUX);
      else
	mux_take(fd, tcp ? (struct sockaddr *)&ss : NULL);
    }
  return;
}

/* ---------------------------------------------------------------------
 * Mux over TCP (-O mux-listen)
 *
 * libscamperctrl's scamper_mux_add_inet(): a TCP connection speaking
 * exactly the mux protocol.  Only the listener and accept differ from
 * the -M socket (mux_accept() checks -O mux-allow and -O mux-max); the
 * clients are ordinary mclient_t.  Keepalive probes notice a client
 * whose host vanished without a FIN in about a minute and a half.
 * --------------------------------------------------------------------- */

#define MUX_TCP_KEEPIDLE   30   /* seconds idle before the first probe */
#define MUX_TCP_KEEPINTVL  10   /* seconds between probes */
#define MUX_TCP_KEEPCNT    6    /* unanswered probes before giving up */

/* set an int socket option and return what the kernel kept (-1: none) */
static int sockopt_int(int fd, int level, int name, int v)
{
  socklen_t vl = sizeof(v);
  setsockopt(fd, level, name, &v, sizeof(v));
  if(getsockopt(fd, level, name, &v, &vl) != 0)
    return -1;
  return v;
}

/* socket options of an accepted TCP mux client; failures are harmless */
static void mux_tcp_setup(int fd, const struct sockaddr *sa)
{
  char addr[INET6_ADDRSTRLEN];
  int idle = -1, intvl = -1, cnt = -1, ka;

  sockopt_int(fd, IPPROTO_TCP, TCP_NODELAY, 1);
  ka = sockopt_int(fd, SOL_SOCKET, SO_KEEPALIVE, 1);
#ifdef TCP_KEEPIDLE
  idle = sockopt_int(fd, IPPROTO_TCP, TCP_KEEPIDLE, MUX_TCP_KEEPIDLE);
#endif
#ifdef TCP_KEEPINTVL
  intvl = sockopt_int(fd, IPPROTO_TCP, TCP_KEEPINTVL, MUX_TCP_KEEPINTVL);
#endif
#ifdef TCP_KEEPCNT
  cnt = sockopt_int(fd, IPPROTO_TCP, TCP_KEEPCNT, MUX_TCP_KEEPCNT);
#endif
  if(opt_flags & OPT_DEBUG)
    {
      /* what the kernel took, so the debug log shows the real values */
      if(sockaddr_tostr(sa, addr, sizeof(addr)) == NULL)
	snprintf(addr, sizeof(addr), "?");
      log_dbg("%s.%d: mux over tcp: keepalive %d idle %d intvl %d cnt %d",
	      addr, sockaddr_port(sa), ka > 0, idle, intvl, cnt);
    }
  return;
}

/* open the -O mux-listen socket; 0 when done or not configured */
static int mux_tcp_listen(void)
{
  const struct sockaddr *sa = (struct sockaddr *)&mux_tcp_ss;
  int fd;

  fdev_init(&mux_tcp_lev, -1, FD_MUX_LISTEN, NULL);
  if(opt_mux_listen == NULL)
    return 0;
  if((fd = tcp_listen_fd(sa, mux_tcp_sslen, "mux clients")) < 0)
    return -1;
  mux_tcp_lev.fd = fd;
  log_dbg("mux over tcp on %s", opt_mux_listen);
  return 0;
}

/* ---------------------------------------------------------------------
 * Metadata (PROTOCOL.md 6)
 *
 * meta_parse() turns the file's text into a table, or says which line is
 * malformed; the table in use is replaced only by a complete new one.
 * --------------------------------------------------------------------- */

#define META_NFIELDS 8

/* key names, in VP_UPDATE emission order (PROTOCOL.md 5.4) */
static const struct { const char *key; uint16_t attr; }
  meta_keys[META_NFIELDS] = {
  {"asn4",      MUX_ATTR_IPV4_ASN},
  {"asn6",      MUX_ATTR_IPV6_ASN},
  {"latlong",   MUX_ATTR_LATLONG},
  {"cc",        MUX_ATTR_CC},
  {"st",        MUX_ATTR_ST},
  {"place",     MUX_ATTR_PLACE},
  {"shortname", MUX_ATTR_SHORTNAME},
  {"iata",      MUX_ATTR_IATA},
};

struct meta
{
  splaytree_node_t node;
  char            *name;
  char            *val[META_NFIELDS];
  char           **tags;
  size_t           tagc;
};

typedef struct meta_table
{
  splaytree_t tree;
} meta_table_t;

static meta_table_t *meta_table = NULL;

static int meta_cmp(const void *a, const void *b)
{
  return strcmp(((const meta_t *)a)->name, ((const meta_t *)b)->name);
}

static void meta_free(meta_t *m)
{
  size_t i;
  for(i=0; i<META_NFIELDS; i++)
    free(m->val[i]);
  for(i=0; i<m->tagc; i++)
    free(m->tags[i]);
  free(m->tags);
  free(m->name);
  free(m);
  return;
}

static void meta_table_free(meta_table_t *t)
{
  meta_t *m;
  if(t == NULL)
    return;
  while((m = splaytree_pop_min(&t->tree)) != NULL)
    meta_free(m);
  free(t);
  return;
}

static meta_t *meta_table_get(meta_table_t *t, const char *name, size_t len)
{
  meta_t key, *m;
  char *n;
  if((n = malloc(len + 1)) == NULL)
    return NULL;
  memcpy(n, name, len);
  n[len] = '\0';
  key.name = n;
  if((m = splaytree_find(&t->tree, &key)) != NULL)
    {
      free(n);
      return m;
    }
  if((m = calloc(1, sizeof(meta_t))) == NULL)
    {
      free(n);
      return NULL;
    }
  m->name = n;
  splaytree_insert(&t->tree, m);
  return m;
}

/* store one key/value; unknown keys are reported through *unknown */
static int meta_set(meta_t *m, const char *key, size_t klen,
		    const char *val, size_t vlen, int *unknown)
{
  char *v, **tags;
  size_t i;

  if((v = malloc(vlen + 1)) == NULL)
    return -1;
  memcpy(v, val, vlen);
  v[vlen] = '\0';
  if(klen == 3 && ascii_strncasecmp(key, "tag", 3) == 0)
    {
      if((tags = realloc(m->tags, (m->tagc + 1) * sizeof(char *))) == NULL)
	{
	  free(v);
	  return -1;
	}
      m->tags = tags;
      m->tags[m->tagc++] = v;
      return 0;
    }
  for(i=0; i<META_NFIELDS; i++)
    {
      if(strlen(meta_keys[i].key) == klen &&
	 ascii_strncasecmp(key, meta_keys[i].key, klen) == 0)
	{
	  free(m->val[i]); /* last one wins */
	  m->val[i] = v;
	  return 0;
	}
    }
  free(v);
  *unknown = 1;
  return 0;
}

static int meta_isspace(char c)
{
  return isspace((unsigned char)c);
}

/* the first whitespace character in [p, end), or end */
static const char *strpbrk_ws(const char *p, const char *end)
{
  while(p < end && !meta_isspace(*p))
    p++;
  return p;
}

/*
 * Parse metadata text: lines of NAME <ws> KEY <ws> VALUE, split on '\n'
 * only; empty lines and lines starting with '#' are skipped.  Returns a
 * new table (caller frees with meta_table_free), or NULL with *errline
 * (1-based; 0 for out of memory) and *errmsg set.  Unknown keys are logged
 * at debug level and otherwise ignored.
 */
static meta_table_t *meta_parse(const char *text, size_t len,
				size_t *errline, const char **errmsg)
{
  meta_table_t *t;
  const char *next = text, *ls, *end, *p, *key;
  size_t lineno = 0, klen;
  meta_t *m;
  int unknown;

  *errline = 0;
  *errmsg = "out of memory";
  if((t = calloc(1, sizeof(meta_table_t))) == NULL)
    return NULL;
  splaytree_init(&t->tree, meta_cmp, offsetof(meta_t, node));

  while(next < text + len)
    {
      lineno++;
      ls = next;
      if((end = memchr(ls, '\n', (size_t)(text + len - ls))) == NULL)
	end = text + len;
      next = end + 1;
      if(ls == end || *ls == '#')
	continue;

      *errline = lineno;
      for(p = ls; p < end && !meta_isspace(*p); p++)
	;
      if(p == end)
	{ *errmsg = "expected NAME KEY VALUE, found only a name"; goto err; }
      for(key = p; key < end && meta_isspace(*key); key++)
	;
      for(klen = 0; key + klen < end && !meta_isspace(key[klen]); klen++)
	;
      if(klen == 0)
	{ *errmsg = "missing key"; goto err; }
      for(p = key + klen; p < end && meta_isspace(*p); p++)
	;
      if(p == end)
	{ *errmsg = "missing value"; goto err; }
      unknown = 0;
      if((m = meta_table_get(t, ls, (size_t)(strpbrk_ws(ls, end) - ls)))
	 == NULL ||
	 meta_set(m, key, klen, p, (size_t)(end - p), &unknown) != 0)
	{ *errmsg = "out of memory"; goto err; }
      if(unknown)
	log_dbg("line %zu: unknown key %.*s ignored", lineno, (int)klen, key);
    }
  *errline = 0;
  *errmsg = NULL;
  return t;

 err:
  meta_table_free(t);
  return NULL;
}

static meta_t *meta_find(const char *name)
{
  meta_t key;
  if(meta_table == NULL)
    return NULL;
  key.name = (char *)name;
  return splaytree_find(&meta_table->tree, &key);
}

/* pass m's attributes to fn in emission order: fields, then tags */
static void meta_attrs(const meta_t *m,
		       void (*fn)(void *arg, uint16_t attr, const char *val),
		       void *arg)
{
  size_t i;
  for(i=0; i<META_NFIELDS; i++)
    if(m->val[i] != NULL)
      fn(arg, meta_keys[i].attr, m->val[i]);
  for(i=0; i<m->tagc; i++)
    fn(arg, MUX_ATTR_TAG, m->tags[i]);
  return;
}

/*
 * (Re)load the -m file.  On any failure the table in use is kept and the
 * reason is logged with the file name (and line); returns 0 or -1.
 */
static int meta_load(void)
{
  meta_table_t *t;
  const char *msg;
  size_t len, line;
  char *text;

  if(opt_metafile == NULL)
    return 0;
  if(file_read_all(opt_metafile, &text, &len) != 0)
    {
      log_err("%s: could not read metadata: %s", opt_metafile,
	      strerror(errno));
      stats.meta_loads_err++;
      return -1;
    }
  t = meta_parse(text, len, &line, &msg);
  free(text);
  if(t == NULL)
    {
      if(line > 0)
	log_err("%s: line %zu: %s", opt_metafile, line, msg);
      else
	log_err("%s: %s", opt_metafile, msg);
      stats.meta_loads_err++;
      return -1;
    }
  meta_table_free(meta_table);
  meta_table = t;
  stats.meta_loads_ok++;
  time_wall(&stats.meta_last_ok);
  log_dbg("%s: loaded %zu entries", opt_metafile,
	  splaytree_count(&t->tree));
  return 0;
}

/* ---------------------------------------------------------------------
 * TLS context and name matching (PROTOCOL.md 2.10)
 *
 * The context is built from -c/-p/-C at startup and rebuilt on SIGHUP;
 * each session holds a reference to the context it started with, so a
 * rebuild never disturbs it, and a failed rebuild keeps the old one.  An
 * encrypted key's passphrase is read once, before daemonising, and kept
 * (wiped on exit) for reloads.
 * --------------------------------------------------------------------- */

#ifdef HAVE_OPENSSL
static char   *tls_pass = NULL;
static size_t  tls_pass_len = 0;
static int     tls_pass_asked = 0;

static int tls_pass_cb(char *buf, int size, int rwflag, void *u)
{
  int n;
  (void)rwflag; (void)u;
  tls_pass_asked = 1;
  if(tls_pass == NULL || size <= 0)
    return -1;
  n = tls_pass_len > (size_t)size ? size : (int)tls_pass_len;
  memcpy(buf, tls_pass, (size_t)n);
  return n;
}

/* does the private key file need a passphrase? (no prompt is shown) */
static int tls_key_needs_pass(const char *path)
{
  EVP_PKEY *pkey;
  BIO *bio;
  if((bio = BIO_new_file(path, "r")) == NULL)
    return 0; /* reported when the context is built */
  tls_pass_asked = 0;
  pkey = PEM_read_bio_PrivateKey(bio, NULL, tls_pass_cb, NULL);
  BIO_free(bio);
  ERR_clear_error();
  if(pkey != NULL)
    {
      EVP_PKEY_free(pkey);
      return 0;
    }
  return tls_pass_asked;
}

/*
 * Read the passphrase: from the terminal with echo off when stdin is one,
 * otherwise the first line of stdin (so it can come from a file or a
 * service manager).  Returns 0 or -1.
 */
static int tls_read_pass(void)
{
  struct termios tio, old;
  char buf[1024];
  size_t len = 0;
  int tty = isatty(STDIN_FILENO), noecho = 0;
  ssize_t n;
  char c;

  if(tty)
    {
      fprintf(stderr, "Enter passphrase for %s: ", opt_privfile);
      fflush(stderr);
      if(tcgetattr(STDIN_FILENO, &old) == 0)
	{
	  tio = old;
	  tio.c_lflag &= ~(tcflag_t)ECHO;
	  noecho = tcsetattr(STDIN_FILENO, TCSAFLUSH, &tio) == 0;
	}
    }
  while(len < sizeof(buf) - 1)
    {
      if((n = read(STDIN_FILENO, &c, 1)) < 0 && errno == EINTR)
	continue;
      if(n <= 0 || c == '\n')
	break;
      buf[len++] = c;
    }
  if(noecho)
    tcsetattr(STDIN_FILENO, TCSAFLUSH, &old);
  if(tty)
    fprintf(stderr, "\n");
  if(len > 0 && buf[len-1] == '\r')
    len--;
  if((tls_pass = malloc(len + 1)) == NULL)
    return -1;
  memcpy(tls_pass, buf, len);
  tls_pass[len] = '\0';
  tls_pass_len = len;
  OPENSSL_cleanse(buf, sizeof(buf));
  return 0;
}

static void tls_pass_wipe(void)
{
  if(tls_pass == NULL)
    return;
  OPENSSL_cleanse(tls_pass, tls_pass_len);
  free(tls_pass);
  tls_pass = NULL;
  tls_pass_len = 0;
  return;
}

/* build a server context from the files; NULL (error logged) on failure */
static SSL_CTX *tls_ctx_build(void)
{
  STACK_OF(X509_NAME) *cas;
  SSL_CTX *ctx;

  if((ctx = SSL_CTX_new(TLS_server_method())) == NULL)
    {
      log_err("could not create TLS context: %s", tls_errstr());
      return NULL;
    }
  SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
  SSL_CTX_set_mode(ctx, SSL_MODE_ENABLE_PARTIAL_WRITE |
		   SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER |
		   SSL_MODE_RELEASE_BUFFERS);
#ifdef SSL_OP_NO_RENEGOTIATION
  SSL_CTX_set_options(ctx, SSL_OP_NO_RENEGOTIATION);
#endif
  SSL_CTX_set_default_passwd_cb(ctx, tls_pass_cb);
  if(SSL_CTX_use_certificate_chain_file(ctx, opt_certfile) != 1)
    {
      log_err("%s: could not load certificate: %s", opt_certfile,
	      tls_errstr());
      goto err;
    }
  if(SSL_CTX_use_PrivateKey_file(ctx, opt_privfile, SSL_FILETYPE_PEM) != 1)
    {
      log_err("%s: could not load private key%s: %s", opt_privfile,
	      tls_pass != NULL ? " (wrong passphrase?)" : "", tls_errstr());
      goto err;
    }
  if(SSL_CTX_check_private_key(ctx) != 1)
    {
      log_err("%s: private key does not match %s: %s", opt_privfile,
	      opt_certfile, tls_errstr());
      goto err;
    }
  if(opt_cafile != NULL)
    {
      if(SSL_CTX_load_verify_locations(ctx, opt_cafile, NULL) != 1 ||
	 (cas = SSL_load_client_CA_file(opt_cafile)) == NULL)
	{
	  log_err("%s: could not load CA: %s", opt_cafile, tls_errstr());
	  goto err;
	}
      SSL_CTX_set_client_CA_list(ctx, cas);
      /* a missing certificate is refused after the handshake */
      SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, NULL);
    }
  return ctx;

 err:
  SSL_CTX_free(ctx);
  return NULL;
}

/* startup: get the passphrase if the key needs one, build the context */
static int tls_init(void)
{
  if(opt_certfile == NULL)
    return 0;
  if(tls_key_needs_pass(opt_privfile) && tls_read_pass() != 0)
    return -1;
  if((tls_ctx = tls_ctx_build()) == NULL)
    return -1;
  return 0;
}

/* SIGHUP: new connections get a context built from the files now */
static void tls_reload(void)
{
  SSL_CTX *ctx;
  if(tls_ctx == NULL)
    return;
  if((ctx = tls_ctx_build()) == NULL)
    {
      log_warn("TLS reload failed; keeping the previous certificate");
      return;
    }
  SSL_CTX_free(tls_ctx); /* sessions keep their own reference */
  tls_ctx = ctx;
  log_dbg("TLS context reloaded");
  return;
}

/*
 * Does certificate name pat (len bytes) match name?  Case-insensitive;
 * "*.suffix" matches exactly one label followed by .suffix, and a name
 * starting with '.' never matches a wildcard.
 */
static int tls_name_match(const char *pat, size_t plen, const char *name)
{
  size_t nlen = strlen(name), slen;
  const char *suffix;

  if(plen >= 2 && pat[0] == '*' && pat[1] == '.')
    {
      suffix = pat + 1;
      slen = plen - 1;
      if(name[0] == '.' || slen >= nlen ||
	 ascii_strncasecmp(name + nlen - slen, suffix, slen) != 0)
	return 0;
      return strchr(name, '.') == name + nlen - slen;
    }
  return plen == nlen && ascii_strncasecmp(pat, name, nlen) == 0;
}

static int tls_asn1_match(const ASN1_STRING *s, const char *name)
{
  const char *d = (const char *)ASN1_STRING_get0_data(s);
  int len = ASN1_STRING_length(s);
  if(d == NULL || len <= 0 || memchr(d, '\0', (size_t)len) != NULL)
    return 0;
  return tls_name_match(d, (size_t)len, name);
}

/* SAN DNS entries first; the subject CN only if none of them matches */
static int tls_cert_match(X509 *cert, const char *name)
{
  GENERAL_NAMES *sans;
  X509_NAME *subj;
  int i, n, rc = 0;

  if((sans = X509_get_ext_d2i(cert, NID_subject_alt_name, NULL, NULL))
     != NULL)
    {
      n = sk_GENERAL_NAME_num(sans);
      for(i=0; i<n && rc == 0; i++)
	{
	  const GENERAL_NAME *gn = sk_GENERAL_NAME_value(sans, i);
	  if(gn->type == GEN_DNS && tls_asn1_match(gn->d.dNSName, name))
	    rc = 1;
	}
      GENERAL_NAMES_free(sans);
      if(rc)
	return 1;
    }
  if((subj = X509_get_subject_name(cert)) == NULL)
    return 0;
  for(i = X509_NAME_get_index_by_NID(subj, NID_commonName, -1); i >= 0;
      i = X509_NAME_get_index_by_NID(subj, NID_commonName, i))
    {
      X509_NAME_ENTRY *e = X509_NAME_get_entry(subj, i);
      if(tls_asn1_match(X509_NAME_ENTRY_get_data(e), name))
	return 1;
    }
  return 0;
}

static X509 *tls_peer_cert(SSL *ssl)
{
#if OPENSSL_VERSION_NUMBER >= 0x30000000L
  return SSL_get1_peer_certificate(ssl);
#else
  return SSL_get_peer_certificate(ssl);
#endif
}

/* with -C: the MASTER_NEW monitor name must match the client certificate */
static int tls_check_name(vp_t *vp)
{
  X509 *cert;
  int ok;
  if(vp->conn.ssl == NULL || opt_cafile == NULL ||
     (opt_flags & OPT_SKIPNAMEVERIFY))
    return 0;
  if(vp->name == NULL)
    return vp_proto_error(vp, "no monitor name to check against the "
			  "client certificate");
  if((cert = tls_peer_cert(vp->conn.ssl)) == NULL)
    {
      stats.tls_failures[TLSF_NO_CERT]++;
      vp_gone_as(vp, GONE_TLS);
      return vp_proto_error(vp, "no client certificate");
    }
  ok = tls_cert_match(cert, vp->name);
  X509_free(cert);
  if(!ok)
    {
      log_warn("%s: monitor name %s not in the client certificate",
	      vp->peer, vp->name);
      stats.tls_failures[TLSF_NAME]++;
      vp_gone_as(vp, GONE_TLS);
      return vp_proto_error(vp, "monitor name does not match the client "
			    "certificate");
    }
  return 0;
}

/*
 * After the TLS handshake, with -C: the client must have sent a
 * certificate that verified.  Returns 0, or -1 after closing the VP.
 */
static int tls_check_peer(vp_t *vp)
{
  X509 *cert;
  long vr;
  if(opt_cafile == NULL || vp->conn.ssl == NULL)
    return 0;
  if((cert = tls_peer_cert(vp->conn.ssl)) == NULL)
    {
      log_warn("%s: no client certificate", vp->peer);
      stats.tls_failures[TLSF_NO_CERT]++;
      vp_gone_as(vp, GONE_TLS);
      vp_close(vp, "no client certificate");
      return -1;
    }
  X509_free(cert);
  if((vr = SSL_get_verify_result(vp->conn.ssl)) != X509_V_OK)
    {
      log_warn("%s: client certificate refused: %s", vp->peer,
	       X509_verify_cert_error_string(vr));
      stats.tls_failures[TLSF_VERIFY]++;
      vp_gone_as(vp, GONE_TLS);
      vp_close(vp, "client certificate did not verify");
      return -1;
    }
  return 0;
}

/* the subject of a TLS peer's certificate; 0, or -1 if none */
static int conn_peer_subject(const conn_t *c, char *buf, size_t len)
{
  X509 *cert;
  if(c->ssl == NULL || (cert = tls_peer_cert(c->ssl)) == NULL)
    return -1;
  X509_NAME_oneline(X509_get_subject_name(cert), buf, (int)len);
  X509_free(cert);
  return 0;
}

#else /* !HAVE_OPENSSL: no TLS, nothing to check */

static int tls_check_name(vp_t *vp)
{
  (void)vp;
  return 0;
}

static int tls_check_peer(vp_t *vp)
{
  (void)vp;
  return 0;
}

static int conn_peer_subject(const conn_t *c, char *buf, size_t len)
{
  (void)c; (void)buf; (void)len;
  return -1;
}

#endif /* HAVE_OPENSSL */

/* ---------------------------------------------------------------------
 * Service manager (sd_notify)
 *
 * Under systemd (Type=notify) NOTIFY_SOCKET names a datagram socket: we
 * send READY=1 once every listener is up (with MAINPID= if -D forked),
 * RELOADING=1 / READY=1 around a SIGHUP reload, STOPPING=1 on SIGINT or
 * SIGTERM, STATUS= with the counts of live VPs, zombies and clients when
 * they changed (checked once a second), and WATCHDOG=1 every
 * WATCHDOG_USEC/2 (rounded down to whole ticks, at least one) when
 * WATCHDOG_PID is ours or unset; a live upgrade pings before it forks
 * and again in the handover (svc_upgrade_begin, svc_handover), and the
 * successor's schedule starts at its first loop iteration.  The socket
 * is connected at startup,
 * before any chroot, and sends never block: a notification that cannot be
 * sent is lost (systemd's own sd_notify behaves the same).  The once-a-
 * second service tick also reports rate-limited log sites whose interval
 * ended; it runs only while there is something for it to do.
 * --------------------------------------------------------------------- */

static int        svc_fd = -1;          /* connected NOTIFY_SOCKET */
static pid_t      svc_pid0 = 0;         /* our pid before any -D fork */
static uint64_t   svc_wd_ticks = 0;     /* watchdog period; 0: none */
static uint64_t   svc_wd_usec = 0;      /* WATCHDOG_USEC as given */
static int        svc_wd_extended = 0;  /* WATCHDOG_USEC= override sent */
static uint64_t   svc_wd_last = 0;      /* tick of the last WATCHDOG=1 */
static char       svc_status[96];       /* the last STATUS= sent */
static tw_timer_t svc_timer;

static void svc_tick(tw_timer_t *t);

/* send one notification; a failure is logged (rate-limited), never fatal */
static void svc_send(const char *msg)
{
  if(svc_fd < 0)
    return;
  if(sdnotify_send(svc_fd, msg) != 0)
    log_warn("NOTIFY_SOCKET: could not send %.*s: %s",
	     (int)strcspn(msg, "\n"), msg, strerror(errno));
  return;
}

/*
 * Read NOTIFY_SOCKET, WATCHDOG_USEC and WATCHDOG_PID and connect the
 * socket; called before chroot and -D.  A bad NOTIFY_SOCKET (missing,
 * not a socket, unsupported form) is one warning and no notifications.
 */
static void svc_init(void)
{
  const char *ns = getenv("NOTIFY_SOCKET");
  const char *wu = getenv("WATCHDOG_USEC");
  const char *wp = getenv("WATCHDOG_PID");
  long pid;
  unsigned long long usec;
  char *end;

  svc_pid0 = getpid();
  tw_timer_init(&svc_timer, svc_tick);
  if(ns == NULL || ns[0] == '\0')
    return;
  if((svc_fd = sdnotify_open(ns)) < 0)
    {
      log_warn("NOTIFY_SOCKET=%s: %s; not notifying the service manager",
	       ns, strerror(errno));
      return;
    }
  if(wu == NULL || wu[0] < '0' || wu[0] > '9')
    return;
  if(wp != NULL && (string_tolong(wp, &pid) != 0 || pid != (long)svc_pid0))
    return;
  errno = 0;
  usec = strtoull(wu, &end, 10);
  if(errno != 0 || *end != '\0' || usec == 0)
    return;
  svc_wd_usec = usec;
  svc_wd_ticks = usec / 2000000ULL;
  if(svc_wd_ticks == 0)
    svc_wd_ticks = 1;
  return;
}

/* send STATUS= if the counts changed since the last one sent */
static void svc_status_update(void)
{
  char msg[sizeof(svc_status)];
  vp_totals_t t;

  if(svc_fd < 0)
    return;
  vp_totals(&t);
  snprintf(msg, sizeof(msg), "STATUS=%lu VPs live, %lu zombies, %lu clients",
	   (unsigned long)t.vps[1], (unsigned long)t.vps[2],
	   (unsigned long)(t.uclients + mc_list.count));
  if(strcmp(msg, svc_status) == 0)
    return;
  memcpy(svc_status, msg, sizeof(svc_status));
  svc_send(msg);
  return;
}

/* the service tick: suppressed-log reports, STATUS=, WATCHDOG=1 */
static void svc_tick(tw_timer_t *t)
{
  int again = log_flush_suppressed();
  if(svc_fd >= 0)
    {
      svc_status_update();
      if(svc_wd_ticks > 0 && tw_tick >= svc_wd_last + svc_wd_ticks)
	{
	  svc_send("WATCHDOG=1");
	  svc_wd_last = tw_tick;
	}
      again = 1;
    }
  if(again)
    tw_arm(t, 1);
  return;
}

/* a log site began suppressing: make sure the tick will report it */
static void svc_tick_need(void)
{
  if(log_loop_started && svc_timer.fn != NULL && svc_timer.slot == NULL)
    tw_arm(&svc_timer, 1);
  return;
}

/*
 * every listener is up and the loop is about to run.  A live upgrade's
 * successor does not announce: the old (main) process sends MAINPID= and
 * READY=1 for it, and under NotifyAccess=main anything this process sends
 * before that is refused (and logged by systemd); its first STATUS= goes
 * from the service tick, a second later.
 */
static void svc_ready(int announce)
{
  char msg[64];
  if(svc_fd < 0)
    return;
  if(announce)
    {
      if(getpid() != svc_pid0)
	snprintf(msg, sizeof(msg), "READY=1\nMAINPID=%ld", (long)getpid());
      else
	snprintf(msg, sizeof(msg), "READY=1");
      svc_send(msg);
      svc_status_update();
    }
  svc_wd_last = tw_tick;
  tw_arm(&svc_timer, 1);
  return;
}

/* RELOADING=1 with the monotonic time newer systemd asks for */
static void svc_reloading(void)
{
  struct timeval tv;
  char msg[64];
  if(svc_fd < 0)
    return;
  time_mono(&tv);
  snprintf(msg, sizeof(msg), "RELOADING=1\nMONOTONIC_USEC=%llu",
	   (unsigned long long)tv.tv_sec * 1000000ULL +
	   (unsigned long long)tv.tv_usec);
  svc_send(msg);
  return;
}

/*
 * A live upgrade is about to fork: the loop (and so the watchdog tick)
 * stops until the handover ends, which may take up to timeout seconds
 * (-O upgrade-timeout: state of 10k+ VPs, a slow successor).  Ping now
 * so the whole watchdog period is left for it, and if even that is too
 * short, raise the watchdog limit with WATCHDOG_USEC= for the handover;
 * svc_upgrade_done() or svc_handover() puts it back.  (EXTEND_TIMEOUT_USEC=
 * only extends start/stop/reload/runtime timeouts, not the watchdog.)
 */
static void svc_upgrade_begin(long timeout)
{
  char msg[64];
  uint64_t need;
  if(svc_fd < 0 || svc_wd_ticks == 0)
    return;
  need = ((uint64_t)timeout + 5) * 1000000ULL;
  if(need < svc_wd_usec)
    {
      svc_send("WATCHDOG=1");
      return;
    }
  snprintf(msg, sizeof(msg), "WATCHDOG=1\nWATCHDOG_USEC=%llu",
	   (unsigned long long)need);
  svc_send(msg);
  svc_wd_extended = 1;
  return;
}

/* the restored watchdog limit, as a line to append ("" if unchanged) */
static void svc_wd_restore_line(char *buf, size_t len)
{
  buf[0] = '\0';
  if(svc_wd_extended)
    snprintf(buf, len, "\nWATCHDOG_USEC=%llu",
	     (unsigned long long)svc_wd_usec);
  svc_wd_extended = 0;
  return;
}

/* the upgrade failed and this process keeps serving: its own schedule,
 * restarted now, with the original limit */
static void svc_upgrade_done(void)
{
  char msg[64], wd[40];
  if(svc_fd < 0 || svc_wd_ticks == 0)
    return;
  svc_wd_restore_line(wd, sizeof(wd));
  snprintf(msg, sizeof(msg), "WATCHDOG=1%s", wd);
  svc_send(msg);
  svc_wd_last = tw_tick;
  return;
}

/*
 * The handover: this (old, main) process tells the service manager, in
 * one datagram, the successor's pid, that it is ready, and a watchdog
 * ping (systemd resets the watchdog on neither MAINPID= nor READY=1, and
 * the successor's first ping comes a watchdog half-period after its
 * first loop iteration), with the original WATCHDOG_USEC= if
 * svc_upgrade_begin() raised it.  It must be one datagram sent by the
 * old process, the only one NotifyAccess=main trusts until MAINPID= is
 * processed.  The caller _exit()s at once after this.
 *
 * Order and the main pid: systemd reads its notify socket before it
 * handles SIGCHLD (a higher event priority), and the datagram is queued
 * before the old process exits, so the old main pid's exit is never seen
 * before MAINPID= (which would end the service).  If systemd reads the
 * datagram while the old process still runs, the successor is still its
 * child and systemd logs "Supervising process N which is not our child"
 * (it marks the pid alien); the old process's _exit() a moment later
 * reparents the successor to the service manager (PID 1, or a subreaper
 * for a user manager), which watches that pid since MAINPID=, so a later
 * exit or crash of the successor still arrives as SIGCHLD and is handled
 * as the main process's (restart).  The container test kills a successor
 * to check that.  Exiting first and letting the successor announce
 * itself would need NotifyAccess=all and would race the old exit.
 */
static void svc_handover(long newpid)
{
  char msg[128], wd[40];
  if(svc_fd < 0)
    return;
  svc_wd_restore_line(wd, sizeof(wd));
  snprintf(msg, sizeof(msg), "MAINPID=%ld\nREADY=1%s%s", newpid,
	   svc_wd_ticks > 0 ? "\nWATCHDOG=1" : "", wd);
  svc_send(msg);
  return;
}

static void svc_close(void)
{
  tw_cancel(&svc_timer);
  if(svc_fd >= 0)
    close(svc_fd);
  svc_fd = -1;
  svc_status[0] = '\0';
  return;
}

/* ---------------------------------------------------------------------
 * Metrics over HTTP (-O metrics=[addr:]port)
 *
 * A small HTTP/1.1 server in the same loop: GET or HEAD of /metrics (the
 * Prometheus text format 0.0.4), /vps (JSON, one object per named
 * VP) and / (an HTML status page; its script and style are /status.js
 * and /status.css, so a strict Content-Security-Policy needs neither
 * 'unsafe-inline' nor hashes to keep in step with the code).  Each
 * connection (hclient_t) holds at most HC_HEAD_MAX bytes of
 * request and handles one request at a time; pipelined requests wait in
 * the input buffer, unread beyond it.  /metrics is small and built whole;
 * /vps is streamed: a cursor (the last VP id written) is advanced through
 * the id tree, and more is rendered only when the output has drained
 * below HC_LOW, so a connection holds O(HC_LOW + one VP) bytes whatever
 * the number of VPs and however slowly it reads (and its kernel send
 * buffer is fixed at HC_SNDBUF).  VPs that leave meanwhile
 * are skipped; VPs that arrive with higher ids are included.  The status
 * page's table and, with -O metrics-vps, the per-VP series of /metrics
 * (one pass over the VPs per metric family, since the text format wants
 * a family's samples together) are streamed the same way.
 *
 * One timer per connection: while waiting for a request it is the request
 * deadline (a whole request head within HC_TIMEOUT seconds of the
 * connection becoming idle, so bytes trickled by a slowloris buy nothing);
 * while answering, the write deadline (no progress for HC_TIMEOUT).  At
 * most opt_metrics_max connections exist; others are closed at accept.
 * There is no authentication: a bare port binds 127.0.0.1 only.
 * --------------------------------------------------------------------- */

#define HC_HEAD_MAX   8192     /* bytes of request head */
#define HC_LOW        16384    /* refill /vps output below this */
#define HC_TIMEOUT    10       /* request and write deadline, seconds */
#define HC_SNDBUF     131072   /* kernel send buffer: bounded too */
#define HC_BUDGET     65536    /* /vps bytes rendered per dispatch */

/* an HTTP client's states; hc_set_state() is the only writer */
typedef enum
{
  HC_IDLE = 1,                  /* reading a request head */
  HC_ANSWER,                    /* writing a fully queued answer */
  HC_STREAM,                    /* writing an answer rendered as out drains */
  HC_DEAD,                      /* closed; freed at the end of the iteration */
} hcstate_t;

typedef struct hclient
{
  conn_t        conn;
  char          in[HC_HEAD_MAX];
  size_t        in_len;
  buf_t         out;
  uint8_t       state;          /* hcstate_t */
  uint8_t       close_after;    /* close once the answer is written */
  uint8_t       vps_chunked;    /* with chunked transfer coding */
  uint8_t       vps_first;      /* no VP object written yet */
  uint8_t       kind;           /* HS_VPS, HS_PAGE or HS_METRICS */
  uint8_t       phase;          /* HS_METRICS: the per-VP family */
  uint8_t       route;          /* 0 other, 1 /metrics, 2 /vps */
  uint32_t      cursor;         /* last VP id written */
  tw_timer_t    timer;
  dlist_node_t  list_node;
  slist_node_t  gc_node;
} hclient_t;

/* what a streaming answer renders per VP */
#define HS_VPS     0            /* /vps: JSON objects */
#define HS_PAGE    1            /* /: HTML table rows */
#define HS_METRICS 2            /* /metrics with -O metrics-vps */

static dlist_t      hc_list;                /* all HTTP clients */
static slist_t      gc_hcs;

static void hc_close(hclient_t *hc, const char *why);
static int hc_set_state(hclient_t *hc, hcstate_t st, const char *why);
static void hc_write(hclient_t *hc);
static void hc_process(hclient_t *hc);

/* status codes counted in stats.http_requests, in that order */
static const int hc_codes[6] = {200, 400, 404, 405, 431, 500};

static int hc_code_idx(int code)
{
  int i;
  for(i=0; i<5; i++)
    if(hc_codes[i] == code)
      return i;
  return 5;
}

static const char *hc_reason(int code)
{
  switch(code)
    {
    case 200: return "OK";
    case 400: return "Bad Request";
    case 404: return "Not Found";
    case 405: return "Method Not Allowed";
    case 431: return "Request Header Fields Too Large";
    }
  return "Internal Server Error";
}

#if defined(__GNUC__)
static int bprintf(buf_t *b, const char *fmt, ...)
  __attribute__((format(printf, 2, 3)));
#endif

/* append formatted text (at most 1023 bytes) to b; 0 or -1 */
static int bprintf(buf_t *b, const char *fmt, ...)
{
  char tmp[1024];
  va_list ap;
  int n;
  va_start(ap, fmt);
  n = vsnprintf(tmp, sizeof(tmp), fmt, ap);
  va_end(ap);
  if(n < 0)
    return -1;
  if((size_t)n >= sizeof(tmp))
    n = (int)sizeof(tmp) - 1;
  return buf_append(b, tmp, (size_t)n);
}

/* append s (len bytes) as a quoted JSON string */
static int bjson_str(buf_t *b, const char *s, size_t len)
{
  char stack[1024], *esc = stack;
  size_t need = json_escape(NULL, 0, (const uint8_t *)s, len);
  int rc;
  if(need >= sizeof(stack) && (esc = malloc(need + 1)) == NULL)
    return -1;
  json_escape(esc, need + 1, (const uint8_t *)s, len);
  rc = buf_append(b, "\"", 1) | buf_append(b, esc, need) |
    buf_append(b, "\"", 1);
  if(esc != stack)
    free(esc);
  return rc;
}

/*
 * Wall-clock seconds of tick `tick`: ticks count from tw_epoch on the
 * monotonic clock, so the offset is taken once per response (now_wall -
 * now_mono), never stored per VP.
 */
typedef struct hc_clock
{
  double wall_at_tick0;
} hc_clock_t;

static void hc_clock_init(hc_clock_t *c)
{
  struct timeval w, m;
  time_wall(&w);
  time_mono(&m);
  c->wall_at_tick0 = (double)w.tv_sec + w.tv_usec / 1e6 -
    (double)timeval_diff_ms(&m, &tw_epoch) / 1000.0;
  return;
}

static double hc_tick_wall(const hc_clock_t *c, uint64_t tick)
{
  return c->wall_at_tick0 + (double)tick;
}

/* ---- /metrics ---- */

/* HELP and TYPE lines of one metric family */
static int prom_head(buf_t *b, const char *name, const char *type,
		     const char *help)
{
  return bprintf(b, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

static int prom_u64(buf_t *b, const char *name, const char *type,
		    const char *help, uint64_t v)
{
  return prom_head(b, name, type, help) |
    bprintf(b, "%s %" PRIu64 "\n", name, v);
}

/* one family with a label taking each of labels[0..n) */
static int prom_labelled(buf_t *b, const char *name, const char *type,
			 const char *help, const char *label,
			 const char *const *labels, const uint64_t *v,
			 size_t n)
{
  size_t i;
  int rc = prom_head(b, name, type, help);
  for(i=0; i<n; i++)
    if(labels[i] != NULL)
      rc |= bprintf(b, "%s{%s=\"%s\"} %" PRIu64 "\n", name, label,
		    labels[i], v[i]);
  return rc;
}

/* process_* metrics where the system tells (Linux /proc); else omitted */
static int prom_process(buf_t *b)
{
  struct rusage ru;
  struct rlimit rl;
  int rc = 0;
#ifdef __linux__
  unsigned long vsz, rss;
  FILE *fp;
  DIR *dir;
  struct dirent *de;
  struct stat sb;
  uint64_t fds = 0;
  /*
   * Linux >= 6.2 gives the count as the directory's size; reading a
   * directory of 19,000 entries would hold the loop for milliseconds.
   */
  if(stat("/proc/self/fd", &sb) == 0 && sb.st_size > 0)
    rc |= prom_u64(b, "process_open_fds", "gauge",
		   "Number of open file descriptors.", (uint64_t)sb.st_size);
  else if((dir = opendir("/proc/self/fd")) != NULL)
    {
      while((de = readdir(dir)) != NULL)
	if(de->d_name[0] != '.')
	  fds++;
      closedir(dir);
      rc |= prom_u64(b, "process_open_fds", "gauge",
		     "Number of open file descriptors.", fds - 1);
    }
  if((fp = fopen("/proc/self/statm", "r")) != NULL)
    {
      if(fscanf(fp, "%lu %lu", &vsz, &rss) == 2)
	{
	  long pg = sysconf(_SC_PAGESIZE);
	  rc |= prom_u64(b, "process_virtual_memory_bytes", "gauge",
			 "Virtual memory size in bytes.",
			 (uint64_t)vsz * (uint64_t)pg);
	  rc |= prom_u64(b, "process_resident_memory_bytes", "gauge",
			 "Resident memory size in bytes.",
			 (uint64_t)rss * (uint64_t)pg);
	}
      fclose(fp);
    }
#endif
  if(getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY)
    rc |= prom_u64(b, "process_max_fds", "gauge",
		   "Maximum number of open file descriptors.",
		   (uint64_t)rl.rlim_cur);
  if(getrusage(RUSAGE_SELF, &ru) == 0)
    rc |= prom_head(b, "process_cpu_seconds_total", "counter",
		    "Total user and system CPU time spent in seconds.") |
      bprintf(b, "process_cpu_seconds_total %.6f\n",
	      (double)(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) +
	      (double)(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6);
  rc |= prom_head(b, "process_start_time_seconds", "gauge",
		  "Start time of the process since unix epoch in seconds.") |
    bprintf(b, "process_start_time_seconds %ld.%06ld\n",
	    (long)stats.start.tv_sec, (long)stats.start.tv_usec);
  return rc;
}

/* render the whole /metrics page into b; 0, or -1 out of memory */
static int metrics_render(buf_t *b)
{
  const char *const *st_labels = vp_state_names + VP_HANDSHAKE;
  static const char *const dir_labels[2] = {"from_vp", "to_vp"};
  static const char *const ap_labels[2] = {"emfile", "handshake_cap"};
  static const char *const kind_labels[2] = {"unix", "mux"};
  static const char *const mux_ref_labels[2] = {"allow", "max"};
  static const char *const res_labels[2] = {"ok", "error"};
  static const char *const code_labels[6] = {"200", "400", "404", "405",
					     "431", "500"};
  static const char *const route_labels[3] = {"other", "/metrics", "/vps"};
  static const char *const proxy_labels[3] = {"client", "health_check",
					      "refused"};
  const char *backend = ev_backend == EVB_EPOLL ? "epoll" :
    ev_backend == EVB_KQUEUE ? "kqueue" : "select";
  vp_totals_t t;
  uint64_t v[2];
  int rc = 0, i;

  vp_totals(&t);
  rc |= prom_head(b, "sc_remoted_build_info", "gauge",
		  "Version and build features of sc_remoted; always 1.") |
    bprintf(b, "sc_remoted_build_info{version=\"%s\",backend=\"%s\","
	    "tls=\"%s\"} 1\n", PACKAGE_VERSION, backend,
	    conn_tls_built() ? "yes" : "no"
	    );
  rc |= prom_labelled(b, "sc_remoted_vps", "gauge",
		      "Scamper connections by state (handshake includes "
		      "connections being rejected).", "state", st_labels,
		      t.vps, 3);
  rc |= prom_u64(b, "sc_remoted_vp_arrivals_total", "counter",
		 "New VP sessions (MASTER_NEW accepted).", stats.arrivals);
  rc |= prom_u64(b, "sc_remoted_vp_resumes_total", "counter",
		 "Sessions resumed (MASTER_RES accepted).", stats.resumes);
  rc |= prom_u64(b, "sc_remoted_vp_zombies_total", "counter",
		 "VPs that lost their connection and became zombies.",
		 stats.zombies);
  rc |= prom_labelled(b, "sc_remoted_vp_rejects_total", "counter",
		      "Scamper connections refused or failed before they "
		      "became a VP, by reason.", "reason", rej_label,
		      stats.rejects, REJ_MAX);
  rc |= prom_labelled(b, "sc_remoted_vp_departures_total", "counter",
		      "VP sessions ended, by reason (takeover: the session's "
		      "connection was replaced by a resume).", "reason",
		      gone_depart_label, stats.departures, GONE_MAX);
  rc |= prom_labelled(b, "sc_remoted_relay_bytes_total", "counter",
		      "Channel data bytes relayed, by direction.",
		      "direction", dir_labels, stats.relay_bytes, 2);
  rc |= prom_labelled(b, "sc_remoted_relay_frames_total", "counter",
		      "Channel data frames relayed, by direction.",
		      "direction", dir_labels, stats.relay_frames, 2);
  rc |= prom_u64(b, "sc_remoted_unacked_bytes", "gauge",
		 "Bytes sent to VPs and not yet acknowledged, summed over "
		 "VPs.", t.unacked);
  rc |= prom_u64(b, "sc_remoted_channels", "gauge",
		 "Open channels, summed over VPs.", t.channels);
  v[0] = t.uclients;
  v[1] = mc_list.count;
  rc |= prom_labelled(b, "sc_remoted_clients", "gauge",
		      "Connected local clients: per-VP unix sockets (-U) "
		      "and mux clients (-M and -O mux-listen).", "kind",
		      kind_labels, v, 2);
  rc |= prom_labelled(b, "sc_remoted_mux_clients_refused_total", "counter",
		      "Mux clients closed at accept: source not in -O "
		      "mux-allow, or -O mux-max reached.", "reason",
		      mux_ref_labels, stats.mux_refused, 2);
  rc |= prom_u64(b, "sc_remoted_mux_burst_timeouts_total", "counter",
		 "Mux clients closed for not reading their VP_UPDATE burst "
		 "within -O mux-burst-timeout.", stats.mux_burst_timeouts);
  rc |= prom_u64(b, "sc_remoted_backpressure_pauses_total", "counter",
		 "Times a VP stopped being read because a local client was "
		 "full.", stats.bp_pauses);
  rc |= prom_u64(b, "sc_remoted_stall_disconnects_total", "counter",
		 "Local clients disconnected for not reading.",
		 stats.stall_disconnects);
  rc |= prom_u64(b, "sc_remoted_spool_bytes", "gauge",
		 "Client backlog held in -O spool-dir files.", spool_live);
  rc |= prom_u64(b, "sc_remoted_spool_files", "gauge",
		 "Spool files open (one per client with a spooled backlog).",
		 spool_files);
  rc |= prom_u64(b, "sc_remoted_spool_written_bytes_total", "counter",
		 "Bytes written to spool files.", stats.spool_written);
  rc |= prom_u64(b, "sc_remoted_spool_cap_hits_total", "counter",
		 "Times a client reached -O spool-max or spool-total, so its "
		 "VPs were paused.", stats.spool_cap_hits);
  rc |= prom_u64(b, "sc_remoted_spool_errors_total", "counter",
		 "Spool file errors (ENOSPC, EIO): that client's backlog "
		 "stayed in memory.", stats.spool_errors);
  v[0] = stats.accept_pauses_emfile;
  v[1] = stats.accept_pauses_hscap;
  rc |= prom_labelled(b, "sc_remoted_accept_pauses_total", "counter",
		      "Episodes of refusing new connections: out of file "
		      "descriptors, or at -O handshake-max.", "reason",
		      ap_labels, v, 2);
  if(conn_tls_built())
    rc |= prom_labelled(b, "sc_remoted_tls_handshake_failures_total",
			"counter", "TLS connections refused, by reason.",
			"reason", tlsf_label, stats.tls_failures, TLSF_MAX);
  v[0] = stats.meta_loads_ok;
  v[1] = stats.meta_loads_err;
  rc |= prom_labelled(b, "sc_remoted_metadata_reloads_total", "counter",
		      "Loads of the -m metadata file (startup and SIGHUP), "
		      "by result.", "result", res_labels, v, 2);
  rc |= prom_head(b, "sc_remoted_last_reload_timestamp_seconds", "gauge",
		  "Time of the last successful metadata load (0: never).") |
    bprintf(b, "sc_remoted_last_reload_timestamp_seconds %ld.%06ld\n",
	    (long)stats.meta_last_ok.tv_sec,
	    (long)stats.meta_last_ok.tv_usec);
  rc |= prom_u64(b, "sc_remoted_metadata_entries", "gauge",
		 "VP names in the metadata table in use.",
		 meta_table != NULL ? splaytree_count(&meta_table->tree) : 0);
  rc |= prom_labelled(b, "sc_remoted_http_requests_total", "counter",
		      "Requests to this endpoint, by status code.", "code",
		      code_labels, stats.http_requests, 6);
  rc |= prom_u64(b, "sc_remoted_http_connections_refused_total", "counter",
		 "HTTP connections closed at accept: over -O metrics-max.",
		 stats.http_refused);
  rc |= prom_labelled(b, "sc_remoted_proxy_headers_total", "counter",
		      "PROXY protocol headers from -O proxy-from balancers, "
		      "by result.", "result", proxy_labels, stats.proxy_hdrs,
		      3);
  rc |= prom_head(b, "sc_remoted_http_busy_seconds_total", "counter",
		  "Time the event loop spent serving HTTP connections, by "
		  "the path being answered.");
  for(i=0; i<3; i++)
    rc |= bprintf(b, "sc_remoted_http_busy_seconds_total{path=\"%s\"} "
		  "%.6f\n", route_labels[i],
		  (double)stats.http_busy_us[i] / 1e6);
  rc |= prom_process(b);
  return rc;
}

/* ---- /vps ---- */

typedef struct vp_clients
{
  uint32_t uc;
  uint32_t mc;
} vp_clients_t;

static int chan_count_clients(void *item, void *param)
{
  chan_t *c = item;
  vp_clients_t *n = param;
  if(c->uc != NULL) n->uc++;
  if(c->mc != NULL) n->mc++;
  return 0;
}

/* the -m metadata of the VP named name as a JSON object ({} if none)
 * appended to b; 0, or -1 out of memory */
static int bjson_meta(buf_t *b, const char *name)
{
  meta_t key, *m = NULL;
  size_t i;
  int rc = 0, first = 1;
  if(name != NULL && meta_table != NULL)
    {
      key.name = (char *)name;
      m = splaytree_find(&meta_table->tree, &key);
    }
  if(m == NULL)
    return buf_append(b, "{}", 2);
  rc |= buf_append(b, "{", 1);
  for(i=0; i<META_NFIELDS; i++)
    {
      if(m->val[i] == NULL)
	continue;
      rc |= bprintf(b, "%s\"%s\":", first ? "" : ",", meta_keys[i].key);
      rc |= bjson_str(b, m->val[i], strlen(m->val[i]));
      first = 0;
    }
  if(m->tagc > 0)
    {
      rc |= bprintf(b, "%s\"tags\":[", first ? "" : ",");
      for(i=0; i<m->tagc; i++)
	{
	  if(i > 0)
	    rc |= buf_append(b, ",", 1);
	  rc |= bjson_str(b, m->tags[i], strlen(m->tags[i]));
	}
      rc |= buf_append(b, "]", 1);
    }
  rc |= buf_append(b, "}", 1);
  return rc;
}

/* how many of the VP's arrivals and resumes fell in the last secs
 * seconds (at most VP_FLAP_KEEP are remembered) */
static unsigned int vp_flaps_recent(const vp_t *vp, uint64_t secs)
{
  unsigned int i, n = 0, kept;
  kept = vp->flaps < VP_FLAP_KEEP ? vp->flaps : VP_FLAP_KEEP;
  for(i=0; i<kept; i++)
    if((uint64_t)vp->flap_ticks[i] + secs > tw_tick)
      n++;
  return n;
}

typedef struct backlog_out
{
  buf_t   *b;
  int      n;                   /* consumers written so far */
} backlog_out_t;

/* one consumer of a VP's channels and its backlog (-O spool-dir) */
static int chan_render_backlog(void *item, void *param)
{
  chan_t *c = item;
  backlog_out_t *bo = param;
  const sink_t *s;
  char head[64];
  if(c->uc != NULL)
    {
      s = &c->uc->sink;
      snprintf(head, sizeof(head), "{\"kind\":\"unix\"");
    }
  else if(c->mc != NULL)
    {
      s = &c->mc->sink;
      snprintf(head, sizeof(head), "{\"kind\":\"mux\",\"client\":%llu",
	       (unsigned long long)c->mc->gen);
    }
  else
    return 0;
  return bprintf(bo->b, "%s%s,\"channel\":%u,\"memory_bytes\":%zu,"
		 "\"spool_bytes\":%" PRIu64 ",\"full\":%s}",
		 bo->n++ > 0 ? "," : "", head, c->id, sink_mem(s),
		 sink_spooled(s),
		 s->full ? "true" : "false") != 0 ? -1 : 0;
}

/* "consumers": each channel's consumer with its backlog */
static int vps_render_backlog(buf_t *b, vp_t *vp)
{
  backlog_out_t bo;
  bo.b = b;
  bo.n = 0;
  if(buf_append(b, ",\"consumers\":[", 14) != 0 ||
     splaytree_inorder(&vp->chans, chan_render_backlog, &bo) != 0)
    return -1;
  return buf_append(b, "]", 1);
}

/* one VP as a JSON object */
static int vps_render_one(buf_t *b, vp_t *vp, const hc_clock_t *clk)
{
  vp_clients_t cl = {0, 0};
  char subj[512];
  int rc = 0;

  splaytree_inorder(&vp->chans, chan_count_clients, &cl);
  rc |= bprintf(b, "{\"id\":%u,\"name\":", vp->id);
  rc |= vp->name != NULL ? bjson_str(b, vp->name, strlen(vp->name)) :
    buf_append(b, "null", 4);
  rc |= bprintf(b, ",\"address\":\"%s\",\"peer\":\"%s\",\"state\":\"%s\"",
		vp->addr, vp->peer, vp_state_str(vp->state));
  rc |= bprintf(b, ",\"arrival\":%ld.%03ld", (long)vp->arrival.tv_sec,
		(long)vp->arrival.tv_usec / 1000);
  if(vp->state == VP_GO)
    rc |= bprintf(b, ",\"connected_since\":%.0f",
		  hc_tick_wall(clk, vp->conn_tick));
  else
    rc |= bprintf(b, ",\"connected_since\":null");
  rc |= bprintf(b, ",\"last_rx\":%.0f", hc_tick_wall(clk, vp->last_rx));
  if(vp->state == VP_ZOMBIE && vp->rx_timer.slot != NULL)
    rc |= bprintf(b, ",\"zombie_deadline\":%.0f",
		  hc_tick_wall(clk, vp->rx_timer.expire));
  else
    rc |= bprintf(b, ",\"zombie_deadline\":null");
  rc |= bprintf(b, ",\"bytes_from_vp\":%" PRIu64 ",\"bytes_to_vp\":%" PRIu64
		",\"frames_from_vp\":%" PRIu64 ",\"frames_to_vp\":%" PRIu64,
		vp->rx_bytes, vp->tx_bytes, vp->rx_frames, vp->tx_frames);
  rc |= bprintf(b, ",\"unacked_bytes\":%zu,\"channels\":%zu,"
		"\"clients\":{\"unix\":%u,\"mux\":%u}",
		buf_len(&vp->unacked), splaytree_count(&vp->chans),
		cl.uc, cl.mc);
  rc |= bprintf(b, ",\"flaps\":%u,\"flaps_1h\":%u", vp->flaps,
		vp_flaps_recent(vp, 3600));
  rc |= vps_render_backlog(b, vp);
  if(conn_peer_subject(&vp->conn, subj, sizeof(subj)) == 0)
    {
      rc |= buf_append(b, ",\"tls_subject\":", 15);
      rc |= bjson_str(b, subj, strlen(subj));
    }
  rc |= buf_append(b, ",\"metadata\":", 12);
  rc |= bjson_meta(b, vp->name);
  rc |= buf_append(b, "}", 1);
  return rc;
}

/* ---- per-VP series (-O metrics-vps) ---- */

/*
 * The per-VP families, written one after the other; each is a pass over
 * the VPs in id order.  A VP is labelled vp="name", or address="a.b.c.d"
 * when it sent no name, plus id="N" (its session id): a scamper that
 * restarts gets a new session under the same name while the old one is
 * still a zombie, and two series with one label set would be dropped by
 * Prometheus as duplicates (alerts aggregate with max by (vp)).  Opt-in:
 * every VP adds 6 to 7 series to every scrape, and every session's series
 * live on in Prometheus's index for as long as it retains data.
 */
#define VPM_FAMILIES 6

static const struct { const char *name, *type, *help; }
  vpm_family[VPM_FAMILIES] = {
  {"sc_remoted_vp_up", "gauge",
   "1 while the VP is connected, 0 while it is a zombie."},
  {"sc_remoted_vp_connected_since_seconds", "gauge",
   "Start of the VP's current connection (absent while a zombie)."},
  {"sc_remoted_vp_last_rx_timestamp_seconds", "gauge",
   "Last time anything was read from the VP."},
  {"sc_remoted_vp_zombie_deadline_seconds", "gauge",
   "When a zombie VP will be discarded unless it resumes."},
  {"sc_remoted_vp_relay_bytes_total", "counter",
   "Channel data bytes relayed for the VP's session, by direction."},
  {"sc_remoted_vp_flaps_total", "counter",
   "Connections of the VP's session: its arrival plus each resume."},
};

static int vpm_head(buf_t *b, int phase)
{
  return prom_head(b, vpm_family[phase].name, vpm_family[phase].type,
		   vpm_family[phase].help);
}

/* the label set of vp, with room for one more label after it */
static int vpm_labels(buf_t *b, const vp_t *vp)
{
  char stack[256], *esc = stack;
  size_t len, need;
  int rc;
  if(vp->name == NULL)
    return bprintf(b, "{address=\"%s\",id=\"%u\"", vp->addr, vp->id);
  len = strlen(vp->name);
  need = prom_label_escape(NULL, 0, (const uint8_t *)vp->name, len);
  if(need >= sizeof(stack) && (esc = malloc(need + 1)) == NULL)
    return -1;
  prom_label_escape(esc, need + 1, (const uint8_t *)vp->name, len);
  rc = buf_append(b, "{vp=\"", 5) | buf_append(b, esc, need) |
    bprintf(b, "\",id=\"%u\"", vp->id);
  if(esc != stack)
    free(esc);
  return rc;
}

/* the sample(s) of family `phase` for vp */
static int vpm_render_one(buf_t *b, int phase, const vp_t *vp,
			  const hc_clock_t *clk)
{
  const char *name = vpm_family[phase].name;
  int rc = 0;

  switch(phase)
    {
    case 0:
      rc |= buf_append(b, name, strlen(name)) | vpm_labels(b, vp) |
	bprintf(b, "} %d\n", vp->state == VP_GO ? 1 : 0);
      break;
    case 1:
      if(vp->state == VP_GO)
	rc |= buf_append(b, name, strlen(name)) | vpm_labels(b, vp) |
	  bprintf(b, "} %.0f\n", hc_tick_wall(clk, vp->conn_tick));
      break;
    case 2:
      rc |= buf_append(b, name, strlen(name)) | vpm_labels(b, vp) |
	bprintf(b, "} %.0f\n", hc_tick_wall(clk, vp->last_rx));
      break;
    case 3:
      if(vp->state == VP_ZOMBIE && vp->rx_timer.slot != NULL)
	rc |= buf_append(b, name, strlen(name)) | vpm_labels(b, vp) |
	  bprintf(b, "} %.0f\n", hc_tick_wall(clk, vp->rx_timer.expire));
      break;
    case 4:
      rc |= buf_append(b, name, strlen(name)) | vpm_labels(b, vp) |
	bprintf(b, ",direction=\"from_vp\"} %" PRIu64 "\n", vp->rx_bytes);
      rc |= buf_append(b, name, strlen(name)) | vpm_labels(b, vp) |
	bprintf(b, ",direction=\"to_vp\"} %" PRIu64 "\n", vp->tx_bytes);
      break;
    default:
      rc |= buf_append(b, name, strlen(name)) | vpm_labels(b, vp) |
	bprintf(b, "} %u\n", vp->flaps);
      break;
    }
  return rc;
}

/* ---- the status page (/) ---- */

/* append s as HTML text (or a quoted attribute value) */
static int bhtml(buf_t *b, const char *s)
{
  char stack[1024], *esc = stack;
  size_t len = strlen(s), need;
  int rc;
  need = html_escape(NULL, 0, (const uint8_t *)s, len);
  if(need >= sizeof(stack) && (esc = malloc(need + 1)) == NULL)
    return -1;
  html_escape(esc, need + 1, (const uint8_t *)s, len);
  rc = buf_append(b, esc, need);
  if(esc != stack)
    free(esc);
  return rc;
}

/* a duration as the page shows it: "3d 4h", "2h 5m", "5m 2s", "7s" */
static int bdur(buf_t *b, uint64_t s)
{
  if(s >= 86400)
    return bprintf(b, "%" PRIu64 "d %" PRIu64 "h", s / 86400,
		   s % 86400 / 3600);
  if(s >= 3600)
    return bprintf(b, "%" PRIu64 "h %" PRIu64 "m", s / 3600, s % 3600 / 60);
  if(s >= 60)
    return bprintf(b, "%" PRIu64 "m %" PRIu64 "s", s / 60, s % 60);
  return bprintf(b, "%" PRIu64 "s", s);
}

/* a byte count as the page shows it: "812 B", "1.5 MB" (powers of 1000) */
static int bbytes(buf_t *b, uint64_t n)
{
  static const char *const unit[] = {"B", "kB", "MB", "GB", "TB", "PB"};
  double v = (double)n;
  int i = 0;
  if(n < 1000)
    return bprintf(b, "%" PRIu64 " B", n);
  while(v >= 1000 && i < 5)
    {
      v /= 1000;
      i++;
    }
  return bprintf(b, "%.1f %s", v, unit[i]);
}

static const meta_t *page_vp_meta(const vp_t *vp)
{
  meta_t key;
  if(vp->name == NULL || meta_table == NULL)
    return NULL;
  key.name = vp->name;
  return splaytree_find(&meta_table->tree, &key);
}

/* a metadata value (by key name) of m, or "" */
static const char *page_meta_val(const meta_t *m, const char *k)
{
  size_t i;
  if(m == NULL)
    return "";
  for(i=0; i<META_NFIELDS; i++)
    if(strcmp(meta_keys[i].key, k) == 0)
      return m->val[i] != NULL ? m->val[i] : "";
  return "";
}

/* the page's columns; status.js renders the same ones from /vps */
static const char *const page_cols[][2] = {
  {"name", "Name"}, {"place", "Place"}, {"cc", "Country"},
  {"address", "Address"}, {"state", "State"}, {"up", "Connected for"},
  {"rx", "Last data"}, {"zd", "Zombie deadline"},
  {"bytes_from_vp", "Bytes from VP"}, {"bytes_to_vp", "Bytes to VP"},
  {"frames_from_vp", "Frames from VP"}, {"frames_to_vp", "Frames to VP"},
  {"channels", "Channels"}, {"clients", "Clients"},
  {"flaps_1h", "Flaps (1h)"},
};

/* /status.css: the page's style */
static const char page_css[] =
  "body { font: 14px/1.4 system-ui, sans-serif; margin: 1em 2em; color: #222; background: #fafafa; }\n"
  "header h1 { display: inline-block; margin: 0 .5em 0 0; font-size: 1.6em; }\n"
  "header p { display: inline-block; margin: 0; color: #666; }\n"
  "a { color: #0550ae; }\n"
  "#totals { display: flex; flex-wrap: wrap; gap: .8em; margin: 1em 0; }\n"
  "#totals div { background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: .5em 1em; min-width: 7em; }\n"
  "#totals .k { display: block; color: #666; font-size: .85em; }\n"
  "#totals .v { display: block; font-size: 1.5em; font-weight: 600; }\n"
  "#t-go { color: #1a7f37; }\n"
  "#t-zombie { color: #bf3989; }\n"
  "#controls { margin: .5em 0; display: flex; gap: .5em; align-items: center; }\n"
  "#controls input { width: 22em; padding: .3em; }\n"
  "#status { color: #666; }\n"
  "body.stale #status { color: #c00; font-weight: 600; }\n"
  "table { border-collapse: collapse; background: #fff; width: 100%; }\n"
  "th, td { border: 1px solid #ddd; padding: .25em .5em; text-align: left; white-space: nowrap; }\n"
  "th { background: #eef1f4; position: sticky; top: 0; }\n"
  "body.js th { cursor: pointer; user-select: none; }\n"
  "th[aria-sort=\"ascending\"]::after { content: \" \\25B2\"; }\n"
  "th[aria-sort=\"descending\"]::after { content: \" \\25BC\"; }\n"
  "td.n { text-align: right; font-variant-numeric: tabular-nums; }\n"
  "tr.st-go td:nth-child(5) { color: #1a7f37; font-weight: 600; }\n"
  "tr.st-zombie { background: #fff0f6; }\n"
  "tr.st-zombie td:nth-child(5) { color: #bf3989; font-weight: 600; }\n"
  ".note { color: #666; }\n"
  "td:nth-child(2) { white-space: normal; min-width: 10em; max-width: 22em; }\n"
  "#controls[hidden] { display: none; }\n";

/*
 * /status.js: sorting, filtering and refreshing from /vps and /metrics
 * without a reload.  Rows are built with textContent only, never from
 * HTML, so VP names and metadata cannot become markup.
 */
static const char page_js[] =
  "'use strict';\n"
  "(function () {\n"
  "  var tbody = document.querySelector('#vps tbody');\n"
  "  var heads = Array.prototype.slice.call(document.querySelectorAll('#vps th'));\n"
  "  var keys = heads.map(function (th) { return th.dataset.key; });\n"
  "  var filter = document.getElementById('filter');\n"
  "  var fstate = document.getElementById('fstate');\n"
  "  var fcc = document.getElementById('fcc');\n"
  "  var status = document.getElementById('status');\n"
  "  var vps = [], skew = 0, sortKey = 'name', sortDir = 1, last = null;\n"
  "\n"
  "  function dur(s) {\n"
  "    s = Math.max(0, Math.round(s));\n"
  "    var d = Math.floor(s / 86400), h = Math.floor(s % 86400 / 3600);\n"
  "    var m = Math.floor(s % 3600 / 60), x = s % 60;\n"
  "    if (d) return d + 'd ' + h + 'h';\n"
  "    if (h) return h + 'h ' + m + 'm';\n"
  "    if (m) return m + 'm ' + x + 's';\n"
  "    return x + 's';\n"
  "  }\n"
  "  function bytes(n) {\n"
  "    var u = ['B', 'kB', 'MB', 'GB', 'TB', 'PB'], i = 0;\n"
  "    if (n < 1000) return n + ' B';\n"
  "    while (n >= 1000 && i < 5) { n /= 1000; i++; }\n"
  "    return n.toFixed(1) + ' ' + u[i];\n"
  "  }\n"
  "  function meta(v, k) {\n"
  "    var m = v.metadata;\n"
  "    return m && typeof m[k] === 'string' ? m[k] : '';\n"
  "  }\n"
  "  function lc(s) { return s.toLowerCase(); }\n"
  "  /* [text, sort key] of column `key` for VP v at server time now */\n"
  "  function cell(v, key, now) {\n"
  "    var x;\n"
  "    switch (key) {\n"
  "    case 'name': return v.name === null ? ['(none)', ''] : [v.name, lc(v.name)];\n"
  "    case 'place': case 'cc': x = meta(v, key); return [x, lc(x)];\n"
  "    case 'address': case 'state': return [v[key], v[key]];\n"
  "    case 'up':\n"
  "      if (v.connected_since === null) return ['', -1];\n"
  "      return [dur(now - v.connected_since), now - v.connected_since];\n"
  "    case 'rx': return [dur(now - v.last_rx) + ' ago', now - v.last_rx];\n"
  "    case 'zd':\n"
  "      if (v.zombie_deadline === null) return ['', Infinity];\n"
  "      return ['in ' + dur(v.zombie_deadline - now), v.zombie_deadline - now];\n"
  "    case 'clients':\n"
  "      x = v.clients ? (v.clients.unix || 0) + (v.clients.mux || 0) : 0;\n"
  "      return [String(x), x];\n"
  "    }\n"
  "    x = Number(v[key]) || 0;\n"
  "    return [key.indexOf('bytes') === 0 ? bytes(x) : String(x), x];\n"
  "  }\n"
  "  function render() {\n"
  "    var now = Date.now() / 1000 + skew, rows = [];\n"
  "    var q = lc(filter.value.trim()), st = fstate.value, cc = fcc.value;\n"
  "    vps.forEach(function (v) {\n"
  "      if (st && v.state !== st) return;\n"
  "      if (cc && meta(v, 'cc') !== cc) return;\n"
  "      if (q && lc([v.name || '', meta(v, 'place'), meta(v, 'cc'), v.address,\n"
  "                   v.state].join(' ')).indexOf(q) < 0) return;\n"
  "      rows.push({ id: v.id, state: v.state,\n"
  "                  c: keys.map(function (k) { return cell(v, k, now); }) });\n"
  "    });\n"
  "    var si = Math.max(0, keys.indexOf(sortKey));\n"
  "    rows.sort(function (a, b) {\n"
  "      var x = a.c[si][1], y = b.c[si][1];\n"
  "      return (x < y ? -1 : x > y ? 1 : a.id - b.id) * sortDir;\n"
  "    });\n"
  "    var frag = document.createDocumentFragment();\n"
  "    rows.forEach(function (r) {\n"
  "      var tr = document.createElement('tr');\n"
  "      tr.className = 'st-' + r.state;\n"
  "      tr.dataset.id = r.id;\n"
  "      r.c.forEach(function (c) {\n"
  "        var td = document.createElement('td');\n"
  "        td.textContent = c[0];\n"
  "        if (typeof c[1] === 'number') td.className = 'n';\n"
  "        tr.appendChild(td);\n"
  "      });\n"
  "      frag.appendChild(tr);\n"
  "    });\n"
  "    tbody.replaceChildren(frag);\n"
  "    heads.forEach(function (th) {\n"
  "      th.setAttribute('aria-sort', th.dataset.key !== sortKey ? 'none' :\n"
  "                      sortDir > 0 ? 'ascending' : 'descending');\n"
  "    });\n"
  "    status.textContent = rows.length + ' of ' + vps.length + ' VPs shown';\n"
  "  }\n"
  "  function countries() {\n"
  "    var seen = {}, cur = fcc.value;\n"
  "    vps.forEach(function (v) { var c = meta(v, 'cc'); if (c) seen[c] = 1; });\n"
  "    var list = Object.keys(seen).sort();\n"
  "    var opts = [new Option('any country', '')];\n"
  "    list.forEach(function (c) { opts.push(new Option(c, c)); });\n"
  "    fcc.replaceChildren.apply(fcc, opts);\n"
  "    fcc.value = list.indexOf(cur) >= 0 ? cur : '';\n"
  "  }\n"
  "  function metric(text, name, label) {\n"
  "    var lines = text.split('\\n'), p = name + (label ? '{' + label + '}' : '') + ' ';\n"
  "    for (var i = 0; i < lines.length; i++)\n"
  "      if (lines[i].indexOf(p) === 0) return Number(lines[i].slice(p.length));\n"
  "    return 0;\n"
  "  }\n"
  "  function set(id, text) { document.getElementById(id).textContent = text; }\n"
  "  function totals(text) {\n"
  "    var t = Date.now() / 1000;\n"
  "    var rx = metric(text, 'sc_remoted_relay_bytes_total', 'direction=\"from_vp\"');\n"
  "    var tx = metric(text, 'sc_remoted_relay_bytes_total', 'direction=\"to_vp\"');\n"
  "    set('t-go', metric(text, 'sc_remoted_vps', 'state=\"go\"'));\n"
  "    set('t-zombie', metric(text, 'sc_remoted_vps', 'state=\"zombie\"'));\n"
  "    set('t-handshake', metric(text, 'sc_remoted_vps', 'state=\"handshake\"'));\n"
  "    set('t-clients', metric(text, 'sc_remoted_clients', 'kind=\"unix\"') +\n"
  "        metric(text, 'sc_remoted_clients', 'kind=\"mux\"'));\n"
  "    if (last && t > last.t) {\n"
  "      set('t-rx', bytes(Math.round(Math.max(0, rx - last.rx) / (t - last.t))) + '/s');\n"
  "      set('t-tx', bytes(Math.round(Math.max(0, tx - last.tx) / (t - last.t))) + '/s');\n"
  "    }\n"
  "    last = { t: t, rx: rx, tx: tx };\n"
  "  }\n"
  "  function refresh() {\n"
  "    Promise.all([fetch('/vps', { cache: 'no-store' }),\n"
  "                 fetch('/metrics', { cache: 'no-store' })]).then(function (rs) {\n"
  "      if (!rs[0].ok || !rs[1].ok)\n"
  "        throw new Error('HTTP ' + rs[0].status + ', ' + rs[1].status);\n"
  "      var d = Date.parse(rs[0].headers.get('Date'));\n"
  "      if (!isNaN(d)) skew = d / 1000 - Date.now() / 1000;\n"
  "      return Promise.all([rs[0].json(), rs[1].text()]);\n"
  "    }).then(function (b) {\n"
  "      vps = b[0];\n"
  "      totals(b[1]);\n"
  "      countries();\n"
  "      render();\n"
  "      document.body.classList.remove('stale');\n"
  "    }).catch(function (e) {\n"
  "      status.textContent = 'refresh failed: ' + e.message;\n"
  "      document.body.classList.add('stale');\n"
  "    }).then(function () {\n"
  "      /* a big fleet's /vps is megabytes: fetch it less often */\n"
  "      setTimeout(refresh, vps.length > 2000 ? 15000 : 2000);\n"
  "    });\n"
  "  }\n"
  "  heads.forEach(function (th) {\n"
  "    th.tabIndex = 0;\n"
  "    th.addEventListener('click', function () {\n"
  "      if (sortKey === th.dataset.key) sortDir = -sortDir;\n"
  "      else { sortKey = th.dataset.key; sortDir = 1; }\n"
  "      render();\n"
  "    });\n"
  "    th.addEventListener('keydown', function (e) {\n"
  "      if (e.key === 'Enter' || e.key === ' ') { e.preventDefault(); th.click(); }\n"
  "    });\n"
  "  });\n"
  "  [filter, fstate, fcc].forEach(function (el) { el.addEventListener('input', render); });\n"
  "  document.getElementById('controls').hidden = false;\n"
  "  document.body.classList.add('js');\n"
  "  refresh();\n"
  "})();\n";

/* the page up to the first table row: totals, controls, table head */
static int page_head(buf_t *b)
{
  const char *const *st = vp_state_names + VP_HANDSHAKE;
  vp_totals_t t;
  size_t i;
  int rc = 0;

  vp_totals(&t);
  rc |= bprintf(b, "<!DOCTYPE html>\n<html lang=\"en\"><head>"
		"<meta charset=\"utf-8\">"
		"<meta name=\"viewport\" content=\"width=device-width, "
		"initial-scale=1\"><title>sc_remoted status</title>"
		"<link rel=\"stylesheet\" href=\"/status.css\">"
		"<script src=\"/status.js\" defer></script></head>\n<body>"
		"<header><h1>sc_remoted</h1><p>version %s &middot; "
		"<a href=\"/vps\">/vps</a> &middot; "
		"<a href=\"/metrics\">/metrics</a></p></header>\n",
		PACKAGE_VERSION);
  rc |= bprintf(b, "<section id=\"totals\">"
		"<div><span class=\"k\">VPs live</span>"
		"<span class=\"v\" id=\"t-go\">%" PRIu64 "</span></div>"
		"<div><span class=\"k\">zombie</span>"
		"<span class=\"v\" id=\"t-zombie\">%" PRIu64 "</span></div>"
		"<div><span class=\"k\">in handshake</span>"
		"<span class=\"v\" id=\"t-handshake\">%" PRIu64
		"</span></div>", t.vps[1], t.vps[2], t.vps[0]);
  rc |= bprintf(b, "<div><span class=\"k\">clients</span>"
		"<span class=\"v\" id=\"t-clients\">%" PRIu64 "</span></div>",
		t.uclients + mc_list.count);
  rc |= bprintf(b, "<div><span class=\"k\">relayed from VPs</span>"
		"<span class=\"v\" id=\"t-rx\">") |
    bbytes(b, stats.relay_bytes[0]) |
    bprintf(b, "</span></div><div><span class=\"k\">relayed to VPs"
	    "</span><span class=\"v\" id=\"t-tx\">") |
    bbytes(b, stats.relay_bytes[1]) |
    bprintf(b, "</span></div></section>\n");
  rc |= bprintf(b, "<div id=\"controls\" hidden>"
		"<input id=\"filter\" type=\"search\" placeholder=\"filter: "
		"name, place, country, address\" aria-label=\"filter\">"
		"<select id=\"fstate\" aria-label=\"state\">"
		"<option value=\"\">any state</option>");
  for(i=0; i<3; i++)
    rc |= bprintf(b, "<option>%s</option>", st[(i + 1) % 3]);
  rc |= bprintf(b, "</select><select id=\"fcc\" aria-label=\"country\">"
		"<option value=\"\">any country</option></select>"
		"<span id=\"status\"></span></div>\n"
		"<noscript><p class=\"note\">JavaScript is off: a snapshot "
		"in arrival order; reload to refresh.</p></noscript>\n"
		"<table id=\"vps\"><thead><tr>");
  for(i=0; i<sizeof(page_cols)/sizeof(page_cols[0]); i++)
    rc |= bprintf(b, "<th data-key=\"%s\">%s</th>", page_cols[i][0],
		  page_cols[i][1]);
  rc |= bprintf(b, "</tr></thead>\n<tbody>\n");
  return rc;
}

static int page_tail(buf_t *b)
{
  return bprintf(b, "</tbody></table>\n</body></html>\n");
}

/* one VP as a table row; every string from the VP or metadata escaped */
static int page_row(buf_t *b, vp_t *vp)
{
  const char *state = vp_state_str(vp->state);
  const meta_t *m = page_vp_meta(vp);
  vp_clients_t cl = {0, 0};
  int rc = 0;

  splaytree_inorder(&vp->chans, chan_count_clients, &cl);
  rc |= bprintf(b, "<tr class=\"st-%s\" data-id=\"%u\"><td>", state, vp->id);
  rc |= vp->name != NULL ? bhtml(b, vp->name) : bprintf(b, "(none)");
  rc |= bprintf(b, "</td><td>") | bhtml(b, page_meta_val(m, "place")) |
    bprintf(b, "</td><td>") | bhtml(b, page_meta_val(m, "cc")) |
    bprintf(b, "</td><td>%s</td><td>%s</td><td class=\"n\">", vp->addr,
	    state);
  if(vp->state == VP_GO)
    rc |= bdur(b, tw_tick - vp->conn_tick);
  rc |= bprintf(b, "</td><td class=\"n\">") |
    bdur(b, tw_tick > vp->last_rx ? tw_tick - vp->last_rx : 0) |
    bprintf(b, " ago</td><td class=\"n\">");
  if(vp->state == VP_ZOMBIE && vp->rx_timer.slot != NULL)
    rc |= bprintf(b, "in ") |
      bdur(b, vp->rx_timer.expire > tw_tick ?
	   vp->rx_timer.expire - tw_tick : 0);
  rc |= bprintf(b, "</td><td class=\"n\">") | bbytes(b, vp->rx_bytes) |
    bprintf(b, "</td><td class=\"n\">") | bbytes(b, vp->tx_bytes);
  rc |= bprintf(b, "</td><td class=\"n\">%" PRIu64 "</td><td class=\"n\">%"
		PRIu64 "</td><td class=\"n\">%zu</td><td class=\"n\">%u</td>"
		"<td class=\"n\">%u</td></tr>\n", vp->rx_frames,
		vp->tx_frames, splaytree_count(&vp->chans), cl.uc + cl.mc,
		vp_flaps_recent(vp, 3600));
  return rc;
}

/*
 * Render the next VPs after hc->cursor into hc->out, about HC_LOW bytes
 * at a time (one chunk when chunked), as hc->kind says: /vps objects,
 * status page rows, or per-VP series (one pass per family: at the end of
 * a pass the cursor restarts for the next).  After the last VP the
 * answer's tail ends the body.  Returns 0, or -1 out of memory.
 */
static int vps_fill(hclient_t *hc)
{
  buf_t tmp;
  hc_clock_t clk;
  vp_t *vp;
  int rc = 0, done = 0;

  memset(&tmp, 0, sizeof(tmp));
  hc_clock_init(&clk);
  while(buf_len(&tmp) < HC_LOW && rc == 0)
    {
      if((vp = vp_find_next(hc->cursor)) == NULL)
	{
	  if(hc->kind == HS_METRICS && ++hc->phase < VPM_FAMILIES)
	    {
	      hc->cursor = 0;
	      rc |= vpm_head(&tmp, hc->phase);
	      continue;
	    }
	  rc |= hc->kind == HS_VPS ? buf_append(&tmp, "]\n", 2) :
	    hc->kind == HS_PAGE ? page_tail(&tmp) : 0;
	  done = 1;
	  break;
	}
      hc->cursor = vp->id;
      if(hc->kind == HS_PAGE)
	rc |= page_row(&tmp, vp);
      else if(hc->kind == HS_METRICS)
	rc |= vpm_render_one(&tmp, hc->phase, vp, &clk);
      else
	{
	  if(!hc->vps_first)
	    rc |= buf_append(&tmp, ",\n", 2);
	  hc->vps_first = 0;
	  rc |= vps_render_one(&tmp, vp, &clk);
	}
    }
  /* an empty chunk would end the body early */
  if(rc == 0 && hc->vps_chunked && buf_len(&tmp) > 0)
    rc |= bprintf(&hc->out, "%zx\r\n", buf_len(&tmp));
  if(buf_len(&tmp) > 0)
    {
      rc |= buf_append_buf(&hc->out, &tmp, 0);
      if(hc->vps_chunked)
	rc |= buf_append(&hc->out, "\r\n", 2);
    }
  if(done)
    {
      if(hc->vps_chunked)
	rc |= buf_append(&hc->out, "0\r\n\r\n", 5);
      hc_set_state(hc, HC_ANSWER, NULL); /* the rest is queued */
    }
  buf_clear(&tmp);
  return rc;
}

/* ---- connections ---- */

/* the status line and headers; clen < 0: no Content-Length */
static int hc_head(hclient_t *hc, const http_req_t *req, int code,
		   const char *ctype, long clen, const char *extra)
{
  char date[64];
  time_t now = time(NULL);
  struct tm tm;
  int rc;
  stats.http_requests[hc_code_idx(code)]++;
  /* the status page's script takes the server's clock from Date */
  if(gmtime_r(&now, &tm) == NULL ||
     strftime(date, sizeof(date), "%a, %d %b %Y %H:%M:%S GMT", &tm) == 0)
    date[0] = '\0';
  rc = bprintf(&hc->out, "HTTP/1.%d %d %s\r\nServer: sc_remoted/%s\r\n"
	       "%s%s%sContent-Type: %s\r\n%s", req->minor == 0 ? 0 : 1, code,
	       hc_reason(code), PACKAGE_VERSION, date[0] ? "Date: " : "",
	       date, date[0] ? "\r\n" : "", ctype, extra);
  if(clen >= 0)
    rc |= bprintf(&hc->out, "Content-Length: %ld\r\n", clen);
  if(hc->close_after)
    rc |= bprintf(&hc->out, "Connection: close\r\n\r\n");
  else if(req->minor == 0)
    rc |= bprintf(&hc->out, "Connection: keep-alive\r\n\r\n");
  else
    rc |= bprintf(&hc->out, "\r\n");
  return rc;
}

/* a short text answer (errors) */
static int hc_text(hclient_t *hc, const http_req_t *req, int code,
		   const char *extra)
{
  char body[64];
  int n = snprintf(body, sizeof(body), "%d %s\n", code, hc_reason(code));
  int rc = hc_head(hc, req, code, "text/plain; charset=utf-8", n, extra);
  if(strcmp(req->method, "HEAD") != 0)
    rc |= buf_append(&hc->out, body, (size_t)n);
  return rc;
}

/*
 * Start streaming an answer of kind `kind` whose head is queued: the
 * first piece of the body (pre, may be empty) goes out now, the rest is
 * rendered by vps_fill as the output drains.
 */
static int hc_stream(hclient_t *hc, int kind, buf_t *pre)
{
  int rc = 0;
  hc->kind = (uint8_t)kind;
  hc_set_state(hc, HC_STREAM, NULL);
  if(buf_len(pre) == 0)
    return 0;
  if(hc->vps_chunked)
    rc |= bprintf(&hc->out, "%zx\r\n", buf_len(pre));
  rc |= buf_append_buf(&hc->out, pre, 0);
  if(hc->vps_chunked)
    rc |= buf_append(&hc->out, "\r\n", 2);
  return rc;
}

/* the headers of the status page and its script and style */
#define HC_PAGE_HDRS \
  "Content-Security-Policy: default-src 'none'; script-src 'self'; " \
  "style-src 'self'; connect-src 'self'; img-src 'self'; " \
  "base-uri 'none'; form-action 'none'; frame-ancestors 'none'\r\n" \
  "X-Content-Type-Options: nosniff\r\nReferrer-Policy: no-referrer\r\n" \
  "Cache-Control: no-store\r\n"

/* 0 other, 1 /metrics, 2 /vps, 3 /, 4 /status.js, 5 /status.css */
static int hc_path(const char *path)
{
  static const char *const paths[] = {"/metrics", "/vps", "/",
				      "/status.js", "/status.css"};
  int i;
  for(i=0; i<5; i++)
    if(strcmp(path, paths[i]) == 0)
      return i + 1;
  return 0;
}

/* answer one request: queue the head and (the start of) the body */
static int hc_respond(hclient_t *hc, const http_req_t *req)
{
  int head = strcmp(req->method, "HEAD") == 0;
  int path = hc_path(req->path), stream;
  const char *stat;
  buf_t page;
  int rc;

  hc_set_state(hc, HC_ANSWER, NULL);
  /* the page and its files count as "other" in http_busy_seconds */
  hc->route = path == 1 || path == 2 ? (uint8_t)path : 0;
  if(!req->keepalive)
    hc->close_after = 1;
  if(path == 0)
    return hc_text(hc, req, 404, "");
  if(!head && strcmp(req->method, "GET") != 0)
    return hc_text(hc, req, 405, "Allow: GET, HEAD\r\n");
  if(path == 4 || path == 5)
    {
      stat = path == 4 ? page_js : page_css;
      rc = hc_head(hc, req, 200, path == 4 ?
		   "text/javascript; charset=utf-8" : "text/css; charset=utf-8",
		   (long)strlen(stat), HC_PAGE_HDRS);
      if(!head)
	rc |= buf_append(&hc->out, stat, strlen(stat));
      return rc;
    }
  /* the rest streams unless it is /metrics without per-VP series:
   * chunked for HTTP/1.1; HTTP/1.0 gets the body up to the close */
  stream = path != 1 || (opt_flags & OPT_METRICS_VPS) != 0;
  memset(&page, 0, sizeof(page));
  if((path == 1 && metrics_render(&page) != 0) ||
     (path == 3 && page_head(&page) != 0) ||
     (path == 1 && stream && vpm_head(&page, 0) != 0) ||
     (path == 2 && buf_append(&page, "[\n", 2) != 0))
    {
      buf_clear(&page);
      hc->close_after = 1;
      return hc_text(hc, req, 500, "");
    }
  if(stream && req->minor == 0)
    hc->close_after = 1;
  hc->vps_chunked = stream && req->minor == 1;
  rc = hc_head(hc, req, 200, path == 1 ? "text/plain; version=0.0.4" :
	       path == 2 ? "application/json" : "text/html; charset=utf-8",
	       stream ? -1 : (long)buf_len(&page),
	       path != 3 ? (hc->vps_chunked ?
			    "Transfer-Encoding: chunked\r\n" : "") :
	       hc->vps_chunked ? HC_PAGE_HDRS "Transfer-Encoding: chunked\r\n" :
	       HC_PAGE_HDRS);
  if(!head && stream)
    rc |= hc_stream(hc, path == 1 ? HS_METRICS : path == 2 ? HS_VPS :
		    HS_PAGE, &page);
  else if(!head)
    rc |= buf_append_buf(&hc->out, &page, 0);
  buf_clear(&page);
  return rc;
}

static void hc_timer(tw_timer_t *t)
{
  hclient_t *hc = CONTAINER_OF(t, hclient_t, timer);
  if(hc->state != HC_IDLE)
    hc_close(hc, "write deadline passed");
  else
    hc_close(hc, hc->in_len > 0 ? "request not complete in time" :
	     "idle");
  return;
}

/*
 * The only place an HTTP client changes state, with each state's entry
 * work.  IDLE: a fresh request deadline and the socket watched for a
 * request (the state of a new client and after each kept-alive answer).
 * ANSWER: none (hc_respond queued the answer; hc_write sends it).
 * STREAM: Nagle off -- a streamed answer ends with a small write that
 * Nagle would hold for the client's delayed ACK (not a TCP socket:
 * harmless EOPNOTSUPP) -- and the renderer's cursor at the start (the
 * caller set hc->kind).  DEAD: the one teardown (why is logged); memory
 * is freed at the end of the loop iteration.  Returns 0, or -1 when the
 * client is (now) dead.
 */
static int hc_set_state(hclient_t *hc, hcstate_t st, const char *why)
{
  int on = 1;
  if(hc->state == HC_DEAD)
    return -1;
  hc->state = (uint8_t)st;
  switch(st)
    {
    case HC_IDLE:
      tw_arm(&hc->timer, HC_TIMEOUT);
      if(ev_set(&hc->conn.ev, 1, 0) != 0)
	return hc_close(hc, "could not register"), -1;
      break;
    case HC_ANSWER:
      break;
    case HC_STREAM:
      setsockopt(hc->conn.ev.fd, IPPROTO_TCP, TCP_NODELAY, &on, sizeof(on));
      hc->phase = 0;
      hc->vps_first = 1;
      hc->cursor = 0;
      break;
    case HC_DEAD:
      log_dbg("metrics client fd %d closed: %s", hc->conn.ev.fd, why);
      conn_close(&hc->conn);
      tw_cancel(&hc->timer);
      buf_clear(&hc->out);
      dlist_remove(&hc_list, &hc->list_node);
      slist_push_tail(&gc_hcs, &hc->gc_node);
      return -1;
    }
  return 0;
}

/* the one teardown of an HTTP client (see hc_set_state) */
static void hc_close(hclient_t *hc, const char *why)
{
  hc_set_state(hc, HC_DEAD, why);
  return;
}

/*
 * Parse and answer requests held in hc->in, one at a time: a request is
 * taken only when the previous answer has been written.  Malformed or
 * oversized heads get 400 or 431 and the connection closes after it.
 */
static void hc_process(hclient_t *hc)
{
  http_req_t req;
  long n;

  while(hc->state == HC_IDLE && !hc->close_after)
    {
      n = http_req_parse(hc->in, hc->in_len, HC_HEAD_MAX, &req);
      if(n == HTTP_REQ_MORE)
	break;
      if(n < 0)
	{
	  log_warn("metrics client fd %d: %s request, closing", hc->conn.ev.fd,
		   n == HTTP_REQ_TOOBIG ? "oversized" : "malformed");
	  memset(&req, 0, sizeof(req));
	  snprintf(req.method, sizeof(req.method), "GET");
	  req.minor = 1;
	  hc_set_state(hc, HC_ANSWER, NULL);
	  hc->close_after = 1;
	  hc->in_len = 0;
	  if(hc_text(hc, &req, n == HTTP_REQ_TOOBIG ? 431 : 400, "") != 0)
	    {
	      hc_close(hc, "out of memory");
	      return;
	    }
	}
      else
	{
	  memmove(hc->in, hc->in + n, hc->in_len - (size_t)n);
	  hc->in_len -= (size_t)n;
	  if(hc_respond(hc, &req) != 0)
	    {
	      hc_close(hc, "out of memory");
	      return;
	    }
	}
      tw_arm(&hc->timer, HC_TIMEOUT);
      hc_write(hc);
    }
  if(hc->state == HC_IDLE && ev_want_read(&hc->conn.ev, 1) != 0)
    hc_close(hc, "could not watch for readability");
  return;
}

/*
 * Write what is queued, refilling /vps output as it drains, until the
 * socket is full, the answer is complete, or HC_BUDGET bytes of /vps were
 * rendered in this call (the rest waits for the next writable event, so
 * other connections get their turn between).  A complete answer either
 * closes the connection or makes it idle (a fresh request deadline) and
 * waits for the next request (the caller looks for a pipelined one).
 */
static void hc_write(hclient_t *hc)
{
  size_t before, budget = HC_BUDGET;

  for(;;)
    {
      if(hc->state == HC_STREAM && buf_len(&hc->out) < HC_LOW)
	{
	  /* a fast reader must not hold the loop for the whole answer */
	  if(budget == 0)
	    {
	      if(ev_set(&hc->conn.ev, 0, 1) != 0)
		hc_close(hc, "could not watch for writability");
	      return;
	    }
	  before = buf_len(&hc->out);
	  if(vps_fill(hc) != 0)
	    {
	      hc_close(hc, "out of memory");
	      return;
	    }
	  before = buf_len(&hc->out) - before;
	  budget = before >= budget ? 0 : budget - before;
	}
      if(buf_len(&hc->out) == 0)
	break;
      before = buf_len(&hc->out);
      if(conn_writev(&hc->conn, &hc->out) != 0)
	{
	  hc_close(hc, "write error");
	  return;
	}
      if(buf_len(&hc->out) < before)
	tw_arm(&hc->timer, HC_TIMEOUT);
      if(buf_len(&hc->out) > 0)
	{
	  /* socket full: wait for writability, read nothing meanwhile */
	  if(ev_set(&hc->conn.ev, 0, 1) != 0)
	    hc_close(hc, "could not watch for writability");
	  return;
	}
    }
  if(hc->state == HC_STREAM)
    return;
  if(hc->close_after)
    {
      hc_close(hc, "answer complete");
      return;
    }
  hc_set_state(hc, HC_IDLE, NULL);
  return;
}

static void hc_read(hclient_t *hc)
{
  ssize_t n;
  if(hc->in_len >= sizeof(hc->in))
    {
      hc_process(hc);
      return;
    }
  n = conn_read(&hc->conn, hc->in + hc->in_len, sizeof(hc->in) - hc->in_len);
  if(n < 0)
    {
      if(n != CONN_AGAIN)
	hc_close(hc, "read error");
      return;
    }
  if(n == 0)
    {
      hc_close(hc, "closed by peer");
      return;
    }
  hc->in_len += (size_t)n;
  hc_process(hc);
  return;
}

static void hc_dispatch(hclient_t *hc, int rd, int wr)
{
  struct timeval t0, t1;
  if(hc->state == HC_DEAD)
    return;
  time_mono(&t0);
  if(wr && hc->state != HC_IDLE)
    {
      hc_write(hc);
      if(hc->state == HC_IDLE)
	hc_process(hc);
    }
  else if(rd && hc->state == HC_IDLE)
    hc_read(hc);
  else if(rd && ev_want_read(&hc->conn.ev, 0) != 0)
    hc_close(hc, "could not stop watching for readability");
  time_mono(&t1);
  stats.http_busy_us[hc->route] +=
    (uint64_t)((t1.tv_sec - t0.tv_sec) * 1000000L +
	       (t1.tv_usec - t0.tv_usec));
  if(hc->state == HC_IDLE)
    hc->route = 0;
  return;
}

/* a metrics client (after its PROXY header, if any); owns fd */
static void http_take(int fd)
{
  hclient_t *hc;
  int sndbuf;

  if((long)hc_list.count >= opt_metrics_max)
    {
      stats.http_refused++;
      log_warn_flood("%ld metrics connections open (-O metrics-max): "
		     "refusing new ones", opt_metrics_max);
      close(fd);
      return;
    }
  if(!ev_fd_ok(fd) || fd_nonblock(fd) != 0 || fd_cloexec(fd) != 0 ||
     (hc = calloc(1, sizeof(hclient_t))) == NULL)
    {
      log_err("could not take metrics client fd %d", fd);
      close(fd);
      return;
    }
  sndbuf = HC_SNDBUF;
  setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &sndbuf, sizeof(sndbuf));
  conn_init(&hc->conn, fd, FD_HC, hc, NULL);
  tw_timer_init(&hc->timer, hc_timer);
  dlist_node_init(&hc->list_node);
  dlist_push_tail(&hc_list, &hc->list_node);
  hc_set_state(hc, HC_IDLE, NULL);
  return;
}

static void http_accept(void)
{
  struct sockaddr_storage ss;
  int fd, i;

  for(i=0; i<64; i++)
    {
      if((fd = lev_accept(&http_lev, &ss, "http_accept")) < 0)
	return;
      if(prehdr_wanted(PP_METRICS, (struct sockaddr *)&ss))
	prehdr_open(fd, (struct sockaddr *)&ss, PP_METRICS);
      else
	http_take(fd);
    }
  return;
}

/* create the -O metrics listener (not yet watched); 0 or -1 */
static int http_listen(void)
{
  const struct sockaddr *sa = (const struct sockaddr *)&metrics_ss;
  int fd;

  fdev_init(&http_lev, -1, FD_HTTP_LISTEN, NULL);
  if(metrics_sslen == 0)
    return 0;
  if((fd = tcp_listen_fd(sa, metrics_sslen, "metrics")) < 0)
    return -1;
  http_lev.fd = fd;
  return 0;
}

/* close every HTTP client and the listener */
static void http_shutdown(void)
{
  dlist_node_t *n;
  while((n = hc_list.head) != NULL)
    hc_close(CONTAINER_OF(n, hclient_t, list_node), "shutting down");
  if(http_lev.fd >= 0)
    ev_close(&http_lev);
  return;
}

static void http_gc(void)
{
  slist_node_t *n;
  while((n = slist_pop_head(&gc_hcs)) != NULL)
    free(CONTAINER_OF(n, hclient_t, gc_node));
  return;
}

/* ---------------------------------------------------------------------
 * Live upgrade (SIGUSR2)
 *
 * SIGUSR2 asks the daemon to hand everything it holds to a fresh copy of
 * its binary (the absolute path it was started from, resolved once at
 * startup, so a new build installed there is what runs):
 *
 *  1. upg_run() checks the path is executable (under -R: inside the
 *     chroot), creates a SOCK_SEQPACKET socketpair and fork+execs the
 *     binary with the original argv and SC_REMOTED_UPGRADE_FD=<fd> in the
 *     environment.  The loop is not run again until the handover ends:
 *     from here on nothing is read from or written to any peer, so the
 *     state being copied is the state there is.
 *  2. The whole state is serialized into a memfd (a temporary file where
 *     memfd_create is missing) as typed records (below), one record per
 *     object, written by the object's own *_save, and sent with
 *     every fd it references (listeners, VP connections, -U and mux
 *     clients) in SCM_RIGHTS batches of UPG_FDS_MAX; fds are referenced
 *     in the state by their position in that sequence.
 *  3. The successor parses the options as usual (rejected options exit
 *     it), skips chroot, bind/listen and the pid file, and upg_load()s
 *     the state as untrusted input: every length bounded by what is left,
 *     every fd index checked and used once, every id unique, names and
 *     peers checked as the protocol parser would.  It rebuilds objects,
 *     trees and lists, adopts the old process's timer-wheel epoch and
 *     tick (CLOCK_MONOTONIC is system-wide) so every timer keeps its
 *     deadline, writes the pid file and only then answers "ready".
 *  4. On "ready" the old process sends a TLS close_notify on its TLS VPs
 *     (their sessions crossed as zombies: scamper resumes them with
 *     MASTER_RES into the new process), then _exit(0)s without any other
 *     goodbye: no VP_DEPART, no unlink, and closing its copies of the
 *     shared sockets sends nothing to peers.
 *
 * Until "ready" the old process keeps every object untouched; any failure
 * (binary missing or not executable, fork/exec failure, options rejected,
 * the successor exiting or crashing, an unreadable state version or a
 * must-understand item it does not know, no answer within -O
 * upgrade-timeout seconds) is one log line, the child is
 * killed and reaped, the pid file rewritten, and serving resumes; a later
 * SIGUSR2 starts over.  The pause the peers see is the time from fork to
 * "ready", during which the loop does not dispatch.
 *
 * The state (UPG_VERSION 2) is magic and version, then typed records: a
 * record is {u16 type, u32 length, body}, its body a sequence of fields
 * {u16 tag, u32 length, value} (the tlv_* codec of utils.c; integers
 * big-endian, fds as their index in the sequence sent).  Records, in
 * order: ST_REC_DAEMON (version string, the wheel's epoch and tick, id
 * counters), ST_REC_LISTEN, ST_REC_STATS, one ST_REC_MC per mux client,
 * one ST_REC_VP per VP in accept order each followed by an ST_REC_CHAN
 * per channel (a -U channel by its ST_REC_UC), and ST_REC_END with the
 * counts.  Each object's record is written and read beside its
 * constructor (vp_save/vp_load, chan_*, uc_*, mc_*, stats_*); the
 * loader builds objects through the constructors' own init helpers
 * (vp_new, mc_new, uc_alloc, vp_sockpath).  The rules, so that builds
 * whose state differs upgrade into each other both ways:
 *
 *  - A reader skips a record type or field tag it does not know, and
 *    gives a field a record lacks its documented default (the "def"
 *    column of the object's field table, or TLVF_KEEP: the value the
 *    init helper set).  Everything read is still validated as untrusted
 *    input: lengths, widths, bounds, fd indexes (each used once), ids
 *    unique, state against fds; invariants that span fields are checked
 *    in code after the record is read (vp_load_check).
 *  - To add a field: one row in the object's table (tag, member, flags,
 *    bounds, default) when it is a plain unsigned value; otherwise write
 *    it in the object's *_save and read it in its *_load_field.  A new
 *    tag, never a reused one; no version bump.  The default must be what
 *    a build that never had the field means (so an older predecessor's
 *    state is read right), and a build that does not know it must be
 *    able to drop it (so a rollback to it loses only that field).
 *  - To retire a field: stop writing it; keep its tag reserved (a
 *    comment) so it never comes back with another meaning; a reader that
 *    still knows it falls back to its default.
 *  - TLV_MUST on a tag or record type says a reader that does not know
 *    it must refuse (the upgrade then rolls back, logging the record and
 *    field).  Right only when dropping the item would break a peer or
 *    lose data silently, e.g. a new kind of queued data that only a
 *    build that knows it can send on; never for counters, timers with a
 *    safe default or anything a default reproduces.  A change of meaning
 *    of an existing field is a new field, not a must-understand mark.
 *  - UPG_VERSION changes only if the framing itself changes.
 *
 * The previous layout (UPG_VERSION 1: positional, commit 82f017c) is
 * still read (upg_v1_load), so that release upgrades live into this one;
 * it can be dropped once no release older than typed records runs
 * anywhere (one release after this one).  The socketpair messages
 * (header + memfd, fd batches, the answer) are the same in both.
 * --------------------------------------------------------------------- */

#define UPG_ENV        "SC_REMOTED_UPGRADE_FD"
#define UPG_MAGIC      0x53435255U  /* "SCRU" */
#ifdef UPG_VERSION_OVERRIDE
#define UPG_VERSION    UPG_VERSION_OVERRIDE
#else
#define UPG_VERSION    2            /* typed records */
#define UPG_VERSION_V1 1            /* positional (82f017c); read only */
#endif
#define UPG_FDS_MAX    250          /* Linux caps SCM_RIGHTS at 253 */
#define UPG_STR_MAX    4096
#define UPG_NONE       0xffffffffU  /* no fd / no consumer */
#define UPG_TICK_MAX   ST_TICK_MAX

static char        *upg_exe = NULL;      /* absolute path to exec */
static char       **upg_argv = NULL;     /* argv as given, before getopt */
static int          upg_requested = 0;   /* SIGUSR2 seen */
static int          upg_successor = 0;   /* started by an upgrade */
static int          upg_sock = -1;       /* successor: the socketpair end */
static unsigned long upg_count = 0;      /* upgrades this lineage made */

static int pidfile_open(void);
static int pidfile_write(void);

/* ---- state helpers: fds, buffers, timers (st_*) ---- */

/* an fd field: the fd's index in the sequence sent (none: no field) */
static void st_fd_put(st_w_t *w, uint16_t tag, int fd)
{
  int *nf;
  if(fd < 0 || w->t.err)
    return;
  if(w->nfds == w->fdcap)
    {
      uint32_t cap = w->fdcap > 0 ? w->fdcap * 2 : 256;
      if((nf = realloc(w->fds, cap * sizeof(int))) == NULL)
	{
	  w->t.err = 1;
	  return;
	}
      w->fds = nf;
      w->fdcap = cap;
    }
  w->fds[w->nfds] = fd;
  tlv_field_uint(&w->t, tag, w->nfds++, 4);
  return;
}

/* an fd field's fd: a received fd not used before; -1 with r->why */
static int st_fd_get(st_r_t *r, const uint8_t *v, uint32_t n)
{
  uint64_t i;
  if(tlv_uint(v, n, 4, &i) != 0 || i >= r->nfds || r->fdused[i])
    return st_bad(r, "bad or reused fd index");
  r->fdused[i] = 1;
  return r->fds[i];
}

/* a buffer's bytes as one field (empty: no field) */
static void st_buf_put(st_w_t *w, uint16_t tag, const buf_t *b)
{
  const chunk_t *c;
  size_t at;
  if(buf_len(b) == 0)
    return;
  at = tlv_begin(&w->t, tag);
  for(c = b->first; c != NULL; c = c->next)
    tlv_put(&w->t, c->data + c->head, c->tail - c->head);
  tlv_end(&w->t, at);
  return;
}

static int st_buf_get(st_r_t *r, buf_t *b, const uint8_t *v, uint32_t n)
{
  return buf_append(b, v, n) != 0 ? st_bad(r, "out of memory") : 0;
}

/* an armed timer: its absolute expiry tick (not armed: no field) */
static void st_timer_put(st_w_t *w, uint16_t tag, const tw_timer_t *t)
{
  if(t->slot != NULL)
    tlv_field_uint(&w->t, tag, t->expire, 8);
  return;
}

static int st_timer_get(st_r_t *r, tw_timer_t *t, const uint8_t *v,
			uint32_t n)
{
  uint64_t x;
  if(t->slot != NULL || tlv_uint(v, n, 8, &x) != 0 ||
     x > tw_tick + UPG_TICK_MAX)
    return st_bad(r, "bad timer");
  tw_arm_at(t, x);
  return 0;
}

static int st_flag_get(const uint8_t *v, uint32_t n, uint8_t *out)
{
  uint64_t x;
  if(tlv_uint(v, n, 1, &x) != 0 || x > 1)
    return -1;
  *out = (uint8_t)x;
  return 0;
}

/* record the first reason a load fails; returns -1 */
static int st_bad(st_r_t *r, const char *fmt, ...)
{
  va_list ap;
  if(r->why[0] == '\0')
    {
      va_start(ap, fmt);
      vsnprintf(r->why, sizeof(r->why), fmt, ap);
      va_end(ap);
    }
  return -1;
}

/* an item this build does not know: skipped, unless marked TLV_MUST */
static int st_unknown(st_r_t *r, const char *rec, uint16_t tag)
{
  if(tag & TLV_MUST)
    return st_bad(r, "record %s: field %u is marked must-understand and "
		  "this version does not know it", rec,
		  (unsigned int)(tag & ~TLV_MUST));
  return 0;
}

/* a field of an object's table: 1 stored, 0 not in it, -1 with r->why */
static int st_table_get(st_r_t *r, const char *rec, const tlv_desc_t *t,
			size_t nt, void *obj, uint16_t tag, const uint8_t *v,
			uint32_t n)
{
  const char *bad = NULL;
  int rc = tlv_table_get(t, nt, obj, tag, v, n, tw_tick, &bad);
  if(rc < 0)
    return st_bad(r, "record %s: field %s out of bounds", rec, bad);
  return rc;
}

/* register a loaded fdev with the interest its record gave (ev->rd,
 * ev->wr, which ev_set must see as not yet registered) */
static int st_ev_register(st_r_t *r, fdev_t *ev, int no_read)
{
  int rd = ev->rd && !no_read, wr = ev->wr;
  ev->rd = ev->wr = 0;
  if(ev->fd < 0)
    return (rd || wr) ? st_bad(r, "interest without an fd") : 0;
  if(!ev_fd_ok(ev->fd) || ev_set(ev, rd, wr) != 0)
    return st_bad(r, "cannot register fd %d", ev->fd);
  return 0;
}

/* ---- saving ---- */

/* the daemon record: who wrote the state, the clock, the id counters */
enum { DMF_VERSION = 1, DMF_EPOCH, DMF_TICK, DMF_VP_ID_NEXT, DMF_MC_GEN,
       DMF_UPG_COUNT };
/* the listener record: TCP listeners (up to two), then the others */
enum { LSF_TCP = 1, LSF_MUX, LSF_MUX_TCP, LSF_HTTP, LSF_SVC, LSF_LOG };
enum { ENDF_MC = 1, ENDF_VP };

/*
 * Serialize the daemon's whole state into w.  Called between loop
 * iterations (after flush and garbage collection), so no object is dead.
 */
static void upg_save(st_w_t *w)
{
  dlist_node_t *n;
  uint32_t nmc = 0, nvp = 0;
  uint8_t b[8];
  size_t at;
  int i;

  bytes_htonl(b, UPG_MAGIC);
  bytes_htonl(b + 4, UPG_VERSION);
  tlv_put(&w->t, b, 8);

  at = tlv_begin(&w->t, ST_REC_DAEMON);
  tlv_field_str(&w->t, DMF_VERSION, PACKAGE_VERSION);
  st_timeval_put(w, DMF_EPOCH, &tw_epoch);
  tlv_field_uint(&w->t, DMF_TICK, tw_tick, 8);
  tlv_field_uint(&w->t, DMF_VP_ID_NEXT, vp_id_next, 4);
  tlv_field_uint(&w->t, DMF_MC_GEN, mc_gen, 8);
  tlv_field_uint(&w->t, DMF_UPG_COUNT, (uint64_t)upg_count + 1, 8);
  tlv_end(&w->t, at);

  at = tlv_begin(&w->t, ST_REC_LISTEN);
  for(i=0; i<tcp_lev_count; i++)
    st_fd_put(w, LSF_TCP, tcp_lev[i].fd);
  st_fd_put(w, LSF_MUX, mux_lev.fd);
  st_fd_put(w, LSF_MUX_TCP, mux_tcp_lev.fd);
  st_fd_put(w, LSF_HTTP, http_lev.fd);
  st_fd_put(w, LSF_SVC, svc_fd); /* NOTIFY_SOCKET may be out of reach */
  st_fd_put(w, LSF_LOG, log_sock.fd); /* under -R, and so may /dev/log */
  tlv_end(&w->t, at);

  stats_save(w);
  for(n = mc_list.head; n != NULL; n = n->next, nmc++)
    mc_save(w, CONTAINER_OF(n, mclient_t, list_node));
  for(n = vp_list.head; n != NULL; n = n->next)
    if(vp_saved(CONTAINER_OF(n, vp_t, list_node)))
      {
	vp_save(w, CONTAINER_OF(n, vp_t, list_node));
	nvp++;
      }

  at = tlv_begin(&w->t, ST_REC_END);
  tlv_field_uint(&w->t, ENDF_MC, nmc, 4);
  tlv_field_uint(&w->t, ENDF_VP, nvp, 4);
  tlv_end(&w->t, at);
  return;
}

/* ---- loading ---- */

/*
 * An optional listener of the state for lev, which this process must
 * have been configured for too (else the state is refused).
 */
static int upg_listener_get(st_r_t *r, fdev_t *lev, fdtype_t type,
			    int configured, const uint8_t *v, uint32_t n)
{
  int fd;
  if(lev->fd >= 0)
    return st_bad(r, "record listen: two of a listener");
  if((fd = st_fd_get(r, v, n)) < 0)
    return -1;
  if(!configured)
    {
      close(fd);
      return st_bad(r, "record listen: a listener this process was not "
		    "configured for");
    }
  fdev_init(lev, fd, type, NULL);
  lev->rd = 1;
  return st_ev_register(r, lev, 0);
}

/* an optional service socket: taken if this process has none */
static int upg_svcfd_get(st_r_t *r, int *fdp, int wanted, const uint8_t *v,
			 uint32_t n)
{
  int fd = st_fd_get(r, v, n);
  if(fd < 0)
    return -1;
  if(wanted && *fdp < 0)
    *fdp = fd;
  else
    close(fd);
  return 0;
}

/*
 * The listeners record of len bytes at p: adopt each listener fd (and
 * the sd_notify and syslog sockets) this process is configured for too;
 * the fds become owned by the listeners.  Returns 0, or -1 with r->why
 * (also when no -P listener came).
 */
static int upg_load_listen(st_r_t *r, const uint8_t *p, uint32_t len)
{
  tlv_r_t fr = {p, len, 0};
  const uint8_t *v;
  uint32_t n;
  uint16_t tag;
  int rc, fd;

  while((rc = tlv_next(&fr, &tag, &v, &n)) == 1)
    {
      switch(tag)
	{
	case LSF_TCP:
	  if(tcp_lev_count >= 2 || (fd = st_fd_get(r, v, n)) < 0)
	    return st_bad(r, "record listen: bad TCP listener");
	  fdev_init(&tcp_lev[tcp_lev_count++], fd, FD_TCP_LISTEN, NULL);
	  tcp_lev[tcp_lev_count - 1].rd = 1;
	  rc = st_ev_register(r, &tcp_lev[tcp_lev_count - 1], 0);
	  break;
	case LSF_MUX:
	  rc = upg_listener_get(r, &mux_lev, FD_MUX_LISTEN,
				opt_muxpath != NULL, v, n);
	  break;
	case LSF_MUX_TCP:
	  rc = upg_listener_get(r, &mux_tcp_lev, FD_MUX_LISTEN,
				opt_mux_listen != NULL, v, n);
	  break;
	case LSF_HTTP:
	  rc = upg_listener_get(r, &http_lev, FD_HTTP_LISTEN,
				metrics_sslen != 0, v, n);
	  break;
	case LSF_SVC:
	  rc = upg_svcfd_get(r, &svc_fd, 1, v, n);
	  break;
	case LSF_LOG:
	  rc = upg_svcfd_get(r, &log_sock.fd, log_syslog, v, n);
	  break;
	default:
	  rc = st_unknown(r, "listen", tag);
	  break;
	}
      if(rc != 0)
	return -1;
    }
  if(rc < 0 || tcp_lev_count == 0)
    return st_bad(r, "record listen: truncated or no TCP listener");
  return 0;
}

/*
 * The daemon record: adopt the old process's clock (every absolute tick
 * in the state stays valid) and id counters.
 */
static int upg_load_daemon(st_r_t *r, const uint8_t *p, uint32_t len,
			   char **from_version)
{
  tlv_r_t fr = {p, len, 0};
  const uint8_t *v;
  struct timeval epoch = {0, 0};
  uint64_t x, tick = UINT64_MAX, now;
  uint32_t n;
  uint16_t tag;
  int rc, have = 0;

  while((rc = tlv_next(&fr, &tag, &v, &n)) == 1)
    {
      if(tag == DMF_VERSION)
	{
	  if(*from_version != NULL || n > 256 || memchr(v, 0, n) != NULL ||
	     (*from_version = malloc(n + 1)) == NULL)
	    return st_bad(r, "record daemon: bad version");
	  memcpy(*from_version, v, n);
	  (*from_version)[n] = '\0';
	  continue;
	}
      if(tag == DMF_EPOCH)
	{
	  if(st_timeval_get(r, &epoch, v, n) != 0)
	    return -1;
	  have |= 1;
	  continue;
	}
      if(tag < DMF_TICK || tag > DMF_UPG_COUNT)
	{
	  if(st_unknown(r, "daemon", tag) != 0)
	    return -1;
	  continue;
	}
      if(tlv_uint(v, n, tag == DMF_VP_ID_NEXT ? 4 : 8, &x) != 0 ||
	 x > UPG_TICK_MAX)
	return st_bad(r, "record daemon: field %u out of bounds", tag);
      switch(tag)
	{
	case DMF_TICK: tick = x; have |= 2; break;
	case DMF_VP_ID_NEXT: vp_id_next = (uint32_t)x; break;
	case DMF_MC_GEN: mc_gen = x; break;
	default: upg_count = (unsigned long)x; break;
	}
    }
  if(rc < 0 || have != 3 || vp_id_next == 0)
    return st_bad(r, "record daemon: truncated, or no clock");
  tw_epoch = epoch;
  tw_tick = tick;
  tw_done = tick; /* the old process fired everything due up to now */
  now = tw_clock();
  if(now < tick || now > tick + 3600)
    return st_bad(r, "clock: the state's tick is not this host's");
  return 0;
}

/* point each mux client's burst cursor at the VP its record named */
static int upg_load_bursts(st_r_t *r)
{
  dlist_node_t *n, *v;
  uint32_t i, k;
  for(i=0, n = mc_list.head; i<r->nmc && n != NULL; i++, n = n->next)
    {
      mclient_t *mc = CONTAINER_OF(n, mclient_t, list_node);
      if(r->burst[i] == UINT32_MAX)
	{
	  mc->burst_next = NULL;
	  continue;
	}
      if(r->burst[i] >= r->nvp)
	return st_bad(r, "record mc: burst cursor past the last vp");
      for(k=0, v = vp_list.head; k < r->burst[i]; k++)
	v = v->next;
      mc->burst_next = CONTAINER_OF(v, vp_t, list_node);
    }
  return 0;
}

static int upg_load_end(st_r_t *r, const uint8_t *p, uint32_t len)
{
  tlv_r_t fr = {p, len, 0};
  const uint8_t *v;
  uint64_t nmc = UINT64_MAX, nvp = UINT64_MAX;
  uint32_t n;
  uint16_t tag;
  int rc;
  while((rc = tlv_next(&fr, &tag, &v, &n)) == 1)
    if(tag == ENDF_MC || tag == ENDF_VP)
      {
	if(tlv_uint(v, n, 4, tag == ENDF_MC ? &nmc : &nvp) != 0)
	  return st_bad(r, "record end: bad count");
      }
    else if(st_unknown(r, "end", tag) != 0)
      return -1;
  if(rc < 0 || nmc != r->nmc || nvp != r->nvp)
    return st_bad(r, "record end: counts differ (state truncated?)");
  return upg_load_bursts(r);
}

/*
 * Read the records of a version-2 state (after its magic and version):
 * the daemon record first, the end record last, each other record to
 * its object's loader.
 */
static int upg_load_records(st_r_t *r, const uint8_t *p, size_t len,
			    char **from_version)
{
  tlv_r_t rr = {p, len, 0};
  const uint8_t *v;
  uint32_t n, nrec = 0;
  uint16_t type;
  int rc, end = 0;

  while((rc = tlv_next(&rr, &type, &v, &n)) == 1)
    {
      if(end)
	return st_bad(r, "a record after the end record");
      if((nrec++ == 0) != (type == ST_REC_DAEMON))
	return st_bad(r, "the daemon record is not first");
      switch(type)
	{
	case ST_REC_DAEMON: rc = upg_load_daemon(r, v, n, from_version);
	  break;
	case ST_REC_LISTEN: rc = upg_load_listen(r, v, n); break;
	case ST_REC_STATS: rc = stats_load(r, v, n); break;
	case ST_REC_MC: rc = mc_load(r, v, n); break;
	case ST_REC_VP: rc = vp_load(r, v, n); break;
	case ST_REC_CHAN: rc = chan_load(r, v, n); break;
	case ST_REC_UC: rc = uc_load(r, v, n); break;
	case ST_REC_END: rc = upg_load_end(r, v, n); end = 1; break;
	default:
	  if(type & TLV_MUST)
	    return st_bad(r, "record type %u is marked must-understand "
			  "and this version does not know it",
			  (unsigned int)(type & ~TLV_MUST));
	  rc = 0;
	  break;
	}
      if(rc != 0)
	return -1;
    }
  if(rc < 0 || !end)
    return st_bad(r, "state truncated");
  if(tcp_lev_count == 0)
    return st_bad(r, "no listener record");
  return 0;
}

#ifdef UPG_VERSION_V1
static int upg_v1_load(const uint8_t *buf, size_t len, int *fds,
		       uint8_t *used, uint32_t nfds, const char **why,
		       char **from_version);
#endif

/*
 * Rebuild the daemon's state from a serialized state of len bytes and
 * the nfds fds that came with it.  The input is untrusted: any
 * inconsistency fails the load (-1, *why says where: valid until the
 * next call), leaving objects built so far on the daemon's lists for
 * shutdown_all() to release.  The fds used are marked in used[]; the
 * caller closes the others.  On success *from_version is the old
 * process's version string (caller frees).
 */
static int upg_load(const uint8_t *buf, size_t len, int *fds,
		    uint8_t *used, uint32_t nfds, const char **why,
		    char **from_version)
{
  static char whybuf[sizeof(((st_r_t *)0)->why)];
  st_r_t r;
  int rc;

  *from_version = NULL;
  *why = "header";
  if(len < 8 || bytes_ntohl(buf) != UPG_MAGIC)
    return -1;
#ifdef UPG_VERSION_V1
  if(bytes_ntohl(buf + 4) == UPG_VERSION_V1)
    return upg_v1_load(buf, len, fds, used, nfds, why, from_version);
#endif
  if(bytes_ntohl(buf + 4) != UPG_VERSION)
    {
      *why = "state version";
      return -1;
    }
  memset(&r, 0, sizeof(r));
  r.fds = fds;
  r.fdused = used;
  r.nfds = nfds;
  rc = upg_load_records(&r, buf + 8, len - 8, from_version);
  free(r.burst);
  if(rc != 0)
    {
      memcpy(whybuf, r.why, sizeof(whybuf));
      *why = whybuf;
    }
  return rc;
}

/* ---- the previous layout (UPG_VERSION 1, positional; read only) ---- */

#ifdef UPG_VERSION_V1

/* the reader of an untrusted state; any overrun sets err and reads 0 */
typedef struct pos_r
{
  const uint8_t *p;
  size_t   len;
  size_t   off;
  int      err;
  int     *fds;
  uint8_t *fdused;
  uint32_t nfds;
} pos_r_t;

static const uint8_t *pos_get(pos_r_t *r, size_t n)
{
  const uint8_t *p;
  if(r->err || n > r->len - r->off)
    {
      r->err = 1;
      return NULL;
    }
  p = r->p + r->off;
  r->off += n;
  return p;
}

static uint8_t pos_u8(pos_r_t *r)
{
  const uint8_t *p = pos_get(r, 1);
  return p != NULL ? p[0] : 0;
}

static uint32_t pos_u32(pos_r_t *r)
{
  const uint8_t *p = pos_get(r, 4);
  return p != NULL ? bytes_ntohl(p) : 0;
}

static uint64_t pos_u64(pos_r_t *r)
{
  uint64_t hi = pos_u32(r);
  return (hi << 32) | pos_u32(r);
}

/* a flag that must be 0 or 1 */
static uint8_t pos_flag(pos_r_t *r)
{
  uint8_t v = pos_u8(r);
  if(v > 1)
    r->err = 1;
  return v;
}

/* a string of at most max bytes without NUL; *out NULL for NULL */
static int pos_str(pos_r_t *r, size_t max, char **out)
{
  const uint8_t *p;
  uint32_t n = pos_u32(r);
  *out = NULL;
  if(r->err || n == 0)
    return r->err ? -1 : 0;
  n--;
  if(n > max || (p = pos_get(r, n)) == NULL || memchr(p, '\0', n) != NULL ||
     (*out = malloc((size_t)n + 1)) == NULL)
    {
      r->err = 1;
      return -1;
    }
  memcpy(*out, p, n);
  (*out)[n] = '\0';
  return 0;
}

/* a string into a fixed array of size len (NUL included) */
static int pos_strbuf(pos_r_t *r, char *buf, size_t len)
{
  char *s;
  if(pos_str(r, len - 1, &s) != 0 || s == NULL)
    {
      r->err = 1;
      free(s);
      return -1;
    }
  memcpy(buf, s, strlen(s) + 1);
  free(s);
  return 0;
}

static int pos_buf(pos_r_t *r, buf_t *b)
{
  const uint8_t *p;
  uint64_t n = pos_u64(r);
  if(r->err || n > r->len - r->off || (p = pos_get(r, (size_t)n)) == NULL ||
     buf_append(b, p, (size_t)n) != 0)
    {
      r->err = 1;
      return -1;
    }
  return 0;
}

/* an fd index: must name a received fd not used before; -1 for none */
static int pos_fd(pos_r_t *r)
{
  uint32_t i = pos_u32(r);
  if(r->err || i == UPG_NONE)
    return -1;
  if(i >= r->nfds || r->fdused[i])
    {
      r->err = 1;
      return -1;
    }
  r->fdused[i] = 1;
  return r->fds[i];
}

/* a tick: no later than the current tick (a past event) */
static uint64_t pos_past(pos_r_t *r)
{
  uint64_t v = pos_u64(r);
  if(v > tw_tick)
    r->err = 1;
  return v;
}

static void pos_timer(pos_r_t *r, tw_timer_t *t)
{
  uint8_t armed = pos_flag(r);
  uint64_t exp = pos_u64(r);
  if(r->err || !armed)
    return;
  if(exp > tw_tick + UPG_TICK_MAX)
    {
      r->err = 1;
      return;
    }
  tw_arm_at(t, exp);
  return;
}

static void pos_sink(pos_r_t *r, sink_t *s)
{
  pos_buf(r, &s->out);
  s->full = pos_flag(r);
  s->last_progress = pos_past(r);
  pos_timer(r, &s->stall_timer);
  return;
}

/*
 * The statistics counters, in a fixed order (v1_stats_fields); the
 * format says how many there are, so a build that knows fewer or more
 * takes those it shares.  The start time is kept: uptime goes on.
 */
static size_t v1_stats_fields(uint64_t **f, size_t max)
{
  size_t n = 0, i;
#define V1_STAT(x) do { if(n < max) f[n] = &(x); n++; } while(0)
  V1_STAT(stats.arrivals);
  V1_STAT(stats.resumes);
  V1_STAT(stats.zombies);
  for(i=0; i<REJ_MAX; i++) V1_STAT(stats.rejects[i]);
  for(i=0; i<GONE_MAX; i++) V1_STAT(stats.departures[i]);
  for(i=0; i<2; i++) V1_STAT(stats.relay_bytes[i]);
  for(i=0; i<2; i++) V1_STAT(stats.relay_frames[i]);
  V1_STAT(stats.bp_pauses);
  V1_STAT(stats.stall_disconnects);
  V1_STAT(stats.accept_pauses_emfile);
  V1_STAT(stats.accept_pauses_hscap);
  for(i=0; i<2; i++) V1_STAT(stats.mux_refused[i]);
  V1_STAT(stats.mux_burst_timeouts);
  for(i=0; i<TLSF_MAX; i++) V1_STAT(stats.tls_failures[i]);
  V1_STAT(stats.meta_loads_ok);
  V1_STAT(stats.meta_loads_err);
  for(i=0; i<6; i++) V1_STAT(stats.http_requests[i]);
  V1_STAT(stats.http_refused);
  for(i=0; i<3; i++) V1_STAT(stats.http_busy_us[i]);
#undef UPG_STAT
  return n;
}

#define V1_STATS_MAX 128


static int v1_load_stats(pos_r_t *r)
{
  uint64_t *f[V1_STATS_MAX], v;
  size_t i, n = v1_stats_fields(f, V1_STATS_MAX);
  uint32_t cnt;

  stats.start.tv_sec = (time_t)pos_u64(r);
  stats.start.tv_usec = (suseconds_t)(pos_u32(r) % 1000000);
  stats.meta_last_ok.tv_sec = (time_t)pos_u64(r);
  stats.meta_last_ok.tv_usec = (suseconds_t)(pos_u32(r) % 1000000);
  cnt = pos_u32(r);
  if(r->err || cnt > V1_STATS_MAX)
    return -1;
  for(i=0; i<cnt && !r->err; i++)
    {
      v = pos_u64(r);
      if(i < n)
	*f[i] = v;
    }
  return r->err ? -1 : 0;
}

/* register a loaded fdev with the interest it had */
static void pos_ev(pos_r_t *r, fdev_t *ev, uint8_t rd, uint8_t wr)
{
  if(r->err || ev->fd < 0)
    return;
  if(!ev_fd_ok(ev->fd) || ev_set(ev, rd, wr) != 0)
    r->err = 1;
  return;
}

/*
 * An optional listener of the state: none, or an fd for lev, which this
 * process must have been configured for too (else the state is refused).
 */
static int pos_listener(pos_r_t *r, fdev_t *lev, fdtype_t type,
		      int configured)
{
  int fd;
  if((fd = pos_fd(r)) < 0)
    return 0;
  if(!configured)
    {
      close(fd);
      return -1;
    }
  fdev_init(lev, fd, type, NULL);
  pos_ev(r, lev, 1, 0);
  return 0;
}

/*
 * A mux client from a version-1 (positional) state, put on mc_list at
 * once (a failure leaves it to shutdown_all()); *burst_idx is its burst
 * cursor, resolved once the VPs are in.  Returns 0, or -1.
 */
static int v1_load_mc(pos_r_t *r, uint32_t *burst_idx)
{
  const uint8_t *p;
  mclient_t *mc;
  uint8_t rd, wr, in_paused, bursting;
  uint32_t total;

  if((mc = mc_new()) == NULL)
    return -1;
  dlist_push_tail(&mc_list, &mc->list_node);
  mc->conn.ev.fd = pos_fd(r);
  mc->gen = pos_u64(r);
  rd = pos_flag(r);
  wr = pos_flag(r);
  pos_sink(r, &mc->sink);
  mc->rx.hdr_have = pos_u8(r);
  if(r->err || mc->conn.ev.fd < 0 || mc->gen == 0 || mc->gen > mc_gen ||
     mc->rx.hdr_have > MUX_HDRLEN)
    return -1;
  if((p = pos_get(r, MUX_HDRLEN)) == NULL)
    return -1;
  memcpy(mc->rx.hdr, p, MUX_HDRLEN);
  mc->rx.left = pos_u32(r);
  if(r->err)
    return -1;
  if(mc->rx.hdr_have == MUX_HDRLEN)
    {
      mc->rx.chan = bytes_ntohl(mc->rx.hdr);
      total = bytes_ntohl(mc->rx.hdr + 4);
      if(mc->rx.left == 0 || mc->rx.left > total)
	return -1;
      if(mc->rx.chan == 0)
	{
	  mc->rx.ctl_have = pos_u32(r);
	  if(r->err || total < 2 || total > MUX_CTL_MAX ||
	     mc->rx.ctl_have != total - mc->rx.left ||
	     (p = pos_get(r, mc->rx.ctl_have)) == NULL ||
	     (mc->rx.ctl = malloc(total)) == NULL)
	    return -1;
	  memcpy(mc->rx.ctl, p, mc->rx.ctl_have);
	}
    }
  else if(mc->rx.left != 0)
    return -1;
  in_paused = pos_flag(r);
  mc->rd_stop_after_feed = pos_flag(r);
  bursting = pos_flag(r);
  /* the state as saved (the fd is not registered yet: no entry work) */
  mc->state = bursting ? MC_BURST : in_paused ? MC_IN_PAUSED : MC_RELAY;
  *burst_idx = pos_u32(r);
  pos_timer(r, &mc->burst_timer);
  if(r->err || (mc->state != MC_BURST && *burst_idx != UPG_NONE) ||
     (mc->state != MC_BURST && mc->burst_timer.slot != NULL) ||
     (mc->list_node.prev != NULL &&
		CONTAINER_OF(mc->list_node.prev, mclient_t,
			     list_node)->gen >= mc->gen))
    return -1; /* generations are unique and ascending */
  if(mc->state == MC_IN_PAUSED)
    dlist_push_tail(&mc_in_paused, &mc->paused_node);
  pos_ev(r, &mc->conn.ev, mc->state == MC_IN_PAUSED ? 0 : rd, wr);
  if(buf_len(&mc->sink.out) > 0)
    out_queue(&mc->conn.ev);
  return r->err ? -1 : 0;
}

static int v1_load_uc(pos_r_t *r, vp_t *vp, chan_t *c)
{
  uclient_t *uc;
  uint8_t rd, wr, closing, in_paused;

  if((uc = uc_alloc(vp, -1)) == NULL)
    return -1;
  c->uc = uc;
  uc->chan = c;
  uc->conn.ev.fd = pos_fd(r);
  rd = pos_flag(r);
  wr = pos_flag(r);
  pos_sink(r, &uc->sink);
  uc->eof = pos_flag(r);
  closing = pos_flag(r);
  in_paused = pos_flag(r);
  if(r->err || uc->conn.ev.fd < 0)
    return -1;
  /* the state as saved (the fd is not registered yet: no entry work) */
  uc->state = closing ? UC_DRAINING : in_paused ? UC_IN_PAUSED :
    uc->eof ? UC_HALF_CLOSED : UC_RELAY;
  if(uc->state == UC_IN_PAUSED)
    dlist_push_tail(&uc_in_paused, &uc->paused_node);
  pos_ev(r, &uc->conn.ev, uc->state == UC_IN_PAUSED ? 0 : rd, wr);
  if(buf_len(&uc->sink.out) > 0)
    out_queue(&uc->conn.ev);
  return r->err ? -1 : 0;
}

/*
 * A channel of vp from a version-1 state, with its consumer: a -U client
 * (v1_load_uc) or the mux client of the saved generation.  The channel
 * goes into vp's tree at once.  Returns 0, or -1.
 */
static int v1_load_chan(pos_r_t *r, vp_t *vp)
{
  chan_t *c, key;
  mclient_t *mc;
  uint8_t kind;
  uint32_t id = pos_u32(r);

  if(r->err || id == 0 || vp_chan_find(vp, id) != NULL ||
     (c = calloc(1, sizeof(chan_t))) == NULL)
    return -1;
  c->id = id;
  c->vp = vp;
  splaytree_insert(&vp->chans, c);
  c->fin_sent = pos_flag(r);
  c->fin_rcvd = pos_flag(r);
  kind = pos_u8(r);
  if(r->err)
    return -1;
  if(kind == 1)
    return v1_load_uc(r, vp, c);
  if(kind == 2)
    {
      uint64_t gen = pos_u64(r);
      key.mc_id = pos_u32(r);
      if(r->err || key.mc_id == 0 || (mc = mc_by_gen(gen)) == NULL ||
	 splaytree_find(&mc->chans, &key) != NULL)
	return -1;
      c->mc = mc;
      c->mc_id = key.mc_id;
      splaytree_insert(&mc->chans, c);
      return 0;
    }
  return kind == 0 ? 0 : -1;
}

/*
 * A VP from a version-1 state, put on vp_list at once (a failure leaves
 * it to shutdown_all()), with its trees, timers, fds and channels.
 * Returns 0, or -1.
 */
static int v1_load_vp(pos_r_t *r)
{
  const uint8_t *p;
  vp_t *vp;
  uint32_t i, nchans, have;
  uint8_t rd = 0, wr = 0, fam, st, src;
  struct sockaddr_storage ss;
  socklen_t sl = sizeof(ss);
  size_t k;

  if((vp = vp_new()) == NULL)
    return -1;
  dlist_push_tail(&vp_list, &vp->list_node);
  vp->accept_seq = ++vp_accept_seq;

  st = pos_u8(r);
  vp->state = (vpstate_t)st;
  vp->id = pos_u32(r);
  vp->magic_len = pos_u8(r);
  if(r->err || st < VP_HANDSHAKE || st > VP_FLUSH)
    return -1;
  if(vp->magic_len > 0)
    {
      if((p = pos_get(r, vp->magic_len)) == NULL ||
	 (vp->magic = malloc(vp->magic_len)) == NULL)
	return -1;
      memcpy(vp->magic, p, vp->magic_len);
    }
  if(pos_str(r, 255, &vp->name) != 0)
    return -1;
  if(vp->name != NULL)
    for(k=0; vp->name[k] != '\0'; k++)
      if(!rp_name_char_ok((uint8_t)vp->name[k]))
	return -1;
  fam = pos_u8(r);
  vp->family = fam == 6 ? AF_INET6 : AF_INET;
  if(pos_strbuf(r, vp->addr, sizeof(vp->addr)) != 0 ||
     pos_strbuf(r, vp->peer, sizeof(vp->peer)) != 0 ||
     (fam != 4 && fam != 6) || !vp_peer_ok(vp->addr) ||
     !vp_peer_ok(vp->peer))
    return -1;
  vp->arrival.tv_sec = (time_t)pos_u64(r);
  vp->arrival.tv_usec = (suseconds_t)(pos_u32(r) % 1000000);
  vp->snd_nxt = pos_u32(r);
  vp->snd_una = pos_u32(r);
  vp->rcv_nxt = pos_u32(r);
  vp->chan_next = pos_u32(r);
  vp->in_id_tree = pos_flag(r);
  vp->in_magic_tree = pos_flag(r);
  vp->in_handshake = pos_flag(r);
  vp->zombie_gen = pos_u64(r);
  src = pos_flag(r);
  vp->conn_tick = pos_past(r);
  vp->rx_bytes = pos_u64(r);
  vp->rx_frames = pos_u64(r);
  vp->tx_bytes = pos_u64(r);
  vp->tx_frames = pos_u64(r);
  pos_buf(r, &vp->unacked);
  vp->last_rx = pos_past(r);
  vp->last_tx = pos_past(r);
  pos_timer(r, &vp->rx_timer);
  pos_timer(r, &vp->ka_timer);
  vp->conn.ev.fd = pos_fd(r);
  vp->lev.fd = pos_fd(r);
  pos_buf(r, &vp->out);
  have = pos_u32(r);
  if(r->err || vp->zombie_gen > mc_gen || vp->chan_next == 0 ||
     (vp->in_id_tree && (vp->id == 0 || vp->id >= vp_id_next)) ||
     (!vp->in_id_tree && vp->id != 0) ||
     (vp->in_magic_tree && vp->magic_len == 0) ||
     (vp->state == VP_ZOMBIE) != (vp->conn.ev.fd < 0) ||
     (vp->lev.fd >= 0 && (vp->state != VP_GO || opt_udir == NULL)) ||
     ((vp->state == VP_GO || vp->state == VP_ZOMBIE) && !vp->in_id_tree) ||
     (vp->state == VP_ZOMBIE && (buf_len(&vp->out) > 0 || have > 0)) ||
     (vp->in_handshake && vp->state == VP_GO) ||
     have >= RP_HDRLEN + 65535 ||
     (have > 0 && rp_rx_reserve(&vp->rx, have < RP_HDRLEN ?
				RP_HDRLEN : have) != 0))
    return -1;
  if(have > 0)
    {
      if((p = pos_get(r, have)) == NULL)
	return -1;
      memcpy(vp->rx.part, p, have);
      vp->rx.have = have;
      /* a held header is checked again when the rest arrives */
      if(have >= RP_HDRLEN &&
	 have >= RP_HDRLEN + (uint32_t)bytes_ntohs(vp->rx.part + 8))
	return -1;
    }
  rd = pos_flag(r);
  wr = pos_flag(r);
  vp->rd_stopped_by_flush = pos_flag(r);
  vp->rd_paused_by_sink = pos_flag(r);
  if(r->err)
    return -1;
  if(vp->in_id_tree)
    {
      if(vp_find_id(vp->id) != NULL)
	return -1;
      splaytree_insert(&vp_by_id, vp);
    }
  if(vp->in_magic_tree)
    {
      if(vp_find_magic(vp->magic, vp->magic_len) != NULL)
	return -1;
      splaytree_insert(&vp_by_magic, vp);
    }
  if(vp->in_handshake)
    handshake_count++;
  /* the connection counts against its source again (per-source-max) */
  if(src && vp->conn.ev.fd >= 0 &&
     getpeername(vp->conn.ev.fd, (struct sockaddr *)&ss, &sl) == 0)
    src_hold(vp, (struct sockaddr *)&ss);
  if(vp->lev.fd >= 0)
    {
      if((vp->sockpath = vp_sockpath(vp)) == NULL)
	return -1;
      pos_ev(r, &vp->lev, 1, 0);
    }
  pos_ev(r, &vp->conn.ev, rd, wr);
  if(buf_len(&vp->out) > 0)
    out_queue(&vp->conn.ev);
  nchans = pos_u32(r);
  for(i=0; i<nchans && !r->err; i++)
    if(v1_load_chan(r, vp) != 0)
      return -1;
  return r->err ? -1 : 0;
}

/* upg_load() of a version-1 state: the same contract */
static int upg_v1_load(const uint8_t *buf, size_t len, int *fds,
		    uint8_t *used, uint32_t nfds, const char **why,
		    char **from_version)
{
  pos_r_t rr, *r = &rr;
  struct timeval epoch;
  uint64_t tick, now;
  uint32_t i, cnt, ver, nmc, *burst = NULL;
  dlist_node_t *n;
  uint8_t nlev;
  int fd;

  memset(r, 0, sizeof(*r));
  r->p = buf;
  r->len = len;
  r->fds = fds;
  r->fdused = used;
  r->nfds = nfds;
  *from_version = NULL;

  *why = "header";
  if(pos_u32(r) != UPG_MAGIC)
    return -1;
  if((ver = pos_u32(r)) != UPG_VERSION_V1)
    {
      *why = "state version";
      return -1;
    }
  if(pos_str(r, 256, from_version) != 0)
    return -1;
  epoch.tv_sec = (time_t)pos_u64(r);
  epoch.tv_usec = (suseconds_t)(pos_u32(r) % 1000000);
  tick = pos_u64(r);
  vp_id_next = pos_u32(r);
  mc_gen = pos_u64(r);
  upg_count = (unsigned long)pos_u64(r);
  if(r->err || tick > UPG_TICK_MAX || mc_gen > UPG_TICK_MAX)
    return -1;

  /* adopt the old process's clock: every absolute tick stays valid */
  *why = "clock";
  tw_epoch = epoch;
  tw_tick = tick;
  tw_done = tick; /* the old process fired everything due up to now */
  now = tw_clock();
  if(now < tick || now > tick + 3600)
    return -1;

  *why = "listeners";
  nlev = pos_u8(r);
  if(r->err || nlev > 2)
    return -1;
  for(i=0; i<nlev; i++)
    {
      fdev_init(&tcp_lev[i], pos_fd(r), FD_TCP_LISTEN, NULL);
      if(tcp_lev[i].fd < 0)
	return -1;
      tcp_lev_count++;
      pos_ev(r, &tcp_lev[i], 1, 0);
    }
  if(pos_listener(r, &mux_lev, FD_MUX_LISTEN, opt_muxpath != NULL) != 0)
    return -1;
  if(pos_listener(r, &mux_tcp_lev, FD_MUX_LISTEN, opt_mux_listen != NULL) != 0)
    return -1;
  if(pos_listener(r, &http_lev, FD_HTTP_LISTEN, metrics_sslen != 0) != 0)
    return -1;
  if((fd = pos_fd(r)) >= 0)
    {
      if(svc_fd < 0)
	svc_fd = fd;
      else
	close(fd);
    }
  if((fd = pos_fd(r)) >= 0)
    {
      if(log_syslog && log_sock.fd < 0)
	log_sock.fd = fd;
      else
	close(fd);
    }
  if(r->err || tcp_lev_count == 0)
    return -1;

  *why = "counters";
  if(v1_load_stats(r) != 0)
    return -1;

  *why = "mux clients";
  nmc = pos_u32(r);
  if(r->err || nmc > r->len - r->off ||
     (burst = malloc(((size_t)nmc + 1) * sizeof(uint32_t))) == NULL)
    return -1;
  for(i=0; i<nmc && !r->err; i++)
    if(v1_load_mc(r, &burst[i]) != 0)
      goto err;
  *why = "VPs";
  cnt = pos_u32(r);
  for(i=0; i<cnt && !r->err; i++)
    if(v1_load_vp(r) != 0)
      goto err;
  *why = "mux burst cursors";
  for(i=0, n = mc_list.head; i<nmc && n != NULL; i++, n = n->next)
    {
      mclient_t *mc = CONTAINER_OF(n, mclient_t, list_node);
      dlist_node_t *v = vp_list.head;
      uint32_t k;
      if(burst[i] != UPG_NONE && burst[i] >= cnt)
	goto err;
      for(k=0; burst[i] != UPG_NONE && k < burst[i]; k++)
	v = v->next;
      mc->burst_next = (burst[i] != UPG_NONE && v != NULL) ?
	CONTAINER_OF(v, vp_t, list_node) : NULL;
    }
  free(burst);
  burst = NULL;
  *why = "trailer";
  if(pos_u32(r) != UPG_MAGIC || r->off != r->len)
    return -1;
  return 0;

 err:
  free(burst);
  return -1;
}

#endif /* UPG_VERSION_V1 */

/* ---- the handover: messages over the socketpair ---- */

/* send len bytes of data and n fds (n <= UPG_FDS_MAX) as one message */
static int upg_sendmsg(int sock, const void *data, size_t len,
		       const int *fds, uint32_t n)
{
  union
  {
    struct cmsghdr h;
    char b[CMSG_SPACE(UPG_FDS_MAX * sizeof(int))];
  } u;
  struct msghdr msg;
  struct iovec iov;
  struct cmsghdr *cm;
  ssize_t rc;

  memset(&msg, 0, sizeof(msg));
  memset(&u, 0, sizeof(u));
  iov.iov_base = (void *)data;
  iov.iov_len = len;
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  if(n > 0)
    {
      msg.msg_control = u.b;
      msg.msg_controllen = CMSG_SPACE(n * sizeof(int));
      cm = CMSG_FIRSTHDR(&msg);
      cm->cmsg_level = SOL_SOCKET;
      cm->cmsg_type = SCM_RIGHTS;
      cm->cmsg_len = CMSG_LEN(n * sizeof(int));
      memcpy(CMSG_DATA(cm), fds, n * sizeof(int));
    }
  do
    rc = sendmsg(sock, &msg, 0);
  while(rc < 0 && errno == EINTR);
  return rc == (ssize_t)len ? 0 : -1;
}

/*
 * Receive one message of at most len bytes and at most UPG_FDS_MAX fds
 * (close-on-exec).  Returns the bytes read (0: EOF) or -1; *n is the
 * number of fds stored at fds.  A message whose fds did not fit fails.
 */
static ssize_t upg_recvmsg(int sock, void *data, size_t len, int *fds,
			   uint32_t *n)
{
  union
  {
    struct cmsghdr h;
    char b[CMSG_SPACE(UPG_FDS_MAX * sizeof(int))];
  } u;
  struct msghdr msg;
  struct iovec iov;
  struct cmsghdr *cm;
  ssize_t rc;
  int flags = 0;
  uint32_t i, k;

#ifdef MSG_CMSG_CLOEXEC
  flags |= MSG_CMSG_CLOEXEC;
#endif
  *n = 0;
  memset(&msg, 0, sizeof(msg));
  iov.iov_base = data;
  iov.iov_len = len;
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  msg.msg_control = u.b;
  msg.msg_controllen = sizeof(u.b);
  do
    rc = recvmsg(sock, &msg, flags);
  while(rc < 0 && errno == EINTR);
  if(rc < 0)
    return -1;
  for(cm = CMSG_FIRSTHDR(&msg); cm != NULL; cm = CMSG_NXTHDR(&msg, cm))
    {
      if(cm->cmsg_level != SOL_SOCKET || cm->cmsg_type != SCM_RIGHTS)
	continue;
      k = (uint32_t)((cm->cmsg_len - CMSG_LEN(0)) / sizeof(int));
      for(i=0; i<k; i++)
	{
	  int fd;
	  memcpy(&fd, CMSG_DATA(cm) + i * sizeof(int), sizeof(int));
	  if(fds != NULL && *n < UPG_FDS_MAX)
	    {
	      fd_cloexec(fd);
	      fds[(*n)++] = fd;
	    }
	  else
	    close(fd);
	}
    }
  if(msg.msg_flags & (MSG_CTRUNC | MSG_TRUNC))
    return -1;
  return rc;
}

/* a file descriptor for the serialized state */
static int upg_state_fd(const uint8_t *p, size_t len)
{
  size_t off = 0;
  ssize_t n;
  int fd;
#ifdef HAVE_MEMFD_CREATE
  fd = memfd_create("sc_remoted-state", MFD_CLOEXEC);
#else
  FILE *fp = tmpfile();
  fd = fp != NULL ? dup(fileno(fp)) : -1;
  if(fp != NULL)
    fclose(fp);
  if(fd >= 0)
    fd_cloexec(fd);
#endif
  if(fd < 0)
    return -1;
  while(off < len)
    {
      if((n = write(fd, p + off, len - off)) < 0)
	{
	  if(errno == EINTR)
	    continue;
	  close(fd);
	  return -1;
	}
      off += (size_t)n;
    }
  return fd;
}

/* ---- the old process ---- */

/* describe how child pid ended, reaping it (killed first if running) */
static void upg_reap(pid_t pid, char *buf, size_t len)
{
  int st, i;
  pid_t rc = 0;

  /* it may be exiting on its own: give it a moment to be reaped */
  for(i=0; i<100; i++)
    {
      if((rc = waitpid(pid, &st, WNOHANG)) != 0)
	break;
      usleep(10000);
    }
  if(rc == 0)
    {
      kill(pid, SIGKILL);
      rc = waitpid(pid, &st, 0);
      snprintf(buf, len, "pid %ld killed", (long)pid);
      return;
    }
  if(rc < 0)
    snprintf(buf, len, "pid %ld lost", (long)pid);
  else if(WIFEXITED(st))
    snprintf(buf, len, "pid %ld exited with status %d%s", (long)pid,
	     WEXITSTATUS(st), WEXITSTATUS(st) == 127 ?
	     " (could not execute)" : "");
  else if(WIFSIGNALED(st))
    snprintf(buf, len, "pid %ld killed by signal %d", (long)pid,
	     WTERMSIG(st));
  else
    snprintf(buf, len, "pid %ld ended", (long)pid);
  return;
}

/* the pid file names this process again (the successor may have
 * written its own pid before failing) */
static void upg_pidfile_restore(void)
{
  char buf[32];
  int fd, len;
  if(opt_pidfile == NULL)
    return;
  if((fd = open(opt_pidfile, O_WRONLY | O_CREAT | O_TRUNC | O_NOFOLLOW |
		O_CLOEXEC, 0644)) < 0)
    return;
  len = snprintf(buf, sizeof(buf), "%ld\n", (long)getpid());
  if(write(fd, buf, (size_t)len) != len)
    log_err("%s: could not rewrite pid file", opt_pidfile);
  close(fd);
  return;
}

/* the environment for the successor: ours plus UPG_ENV (and the path) */
static char **upg_envp(int fd)
{
  extern char **environ;
  char **envp;
  size_t n = 0, k = 0, len;

  while(environ[n] != NULL)
    n++;
  if((envp = calloc(n + 3, sizeof(char *))) == NULL)
    return NULL;
  /* WATCHDOG_PID names this process: without it the successor, which
   * becomes the main pid, keeps the watchdog */
  for(n=0; environ[n] != NULL; n++)
    if(strncmp(environ[n], UPG_ENV, strlen(UPG_ENV)) != 0 &&
       strncmp(environ[n], "WATCHDOG_PID=", 13) != 0)
      envp[k++] = environ[n];
  if((envp[k] = malloc(64)) == NULL)
    {
      free(envp);
      return NULL;
    }
  snprintf(envp[k++], 64, UPG_ENV "=%d", fd);
  len = strlen(UPG_ENV) + strlen("_EXE=") + strlen(upg_exe) + 1;
  if((envp[k] = malloc(len)) == NULL)
    {
      free(envp[k - 1]);
      free(envp);
      return NULL;
    }
  snprintf(envp[k], len, UPG_ENV "_EXE=%s", upg_exe);
  return envp;
}

static void upg_envp_free(char **envp)
{
  size_t n;
  if(envp == NULL)
    return;
  for(n=0; envp[n] != NULL; n++)
    if(strncmp(envp[n], UPG_ENV, strlen(UPG_ENV)) == 0)
      free(envp[n]);
  free(envp);
  return;
}

/*
 * The old process is done: the service manager learns the new main pid
 * (from this process, the one NotifyAccess=main trusts) and that it is
 * ready; TLS VPs get a close_notify (their sessions went across as
 * zombies); the process exits without touching anything else the
 * successor now serves.
 */
static void upg_exit(long newpid)
{
  dlist_node_t *n;
  vp_t *vp;
  for(n = vp_list.head; n != NULL; n = n->next)
    {
      vp = CONTAINER_OF(n, vp_t, list_node);
      if(conn_is_tls(&vp->conn) && vp->conn.ev.fd >= 0)
	{
	  conn_shutdown(&vp->conn);
	  close(vp->conn.ev.fd);
	}
    }
  svc_handover(newpid);
  fflush(NULL);
  _exit(0);
}

/* wait until sock is readable or the deadline (monotonic) passes */
static int upg_wait(int sock, const struct timeval *deadline)
{
  struct pollfd pfd;
  struct timeval now;
  int64_t ms;
  int rc;

  for(;;)
    {
      time_mono(&now);
      if((ms = timeval_diff_ms(deadline, &now)) <= 0)
	return 0;
      pfd.fd = sock;
      pfd.events = POLLIN;
      pfd.revents = 0;
      rc = poll(&pfd, 1, ms > INT_MAX ? INT_MAX : (int)ms);
      if(rc > 0)
	return 1;
      if(rc < 0 && errno != EINTR)
	return -1;
    }
}

/*
 * Hand over to a new process (see the section comment).  Returns only
 * if the upgrade failed: everything is as it was, and it has been logged.
 */
static void upg_run(void)
{
  char why[384], how[96], reply[512];
  struct timeval t0, t1, deadline, tv;
  uint8_t hdr[24];
  st_w_t w;
  char **envp = NULL;
  int sp[2] = {-1, -1}, memfd = -1;
  uint32_t off, n, got;
  pid_t pid = -1;
  ssize_t rn;

  why[0] = '\0';
  memset(&w, 0, sizeof(w));
  time_mono(&t0);
  if(upg_exe == NULL)
    {
      log_err("upgrade refused: the path of the running binary is unknown");
      return;
    }
  if(access(upg_exe, X_OK) != 0)
    {
      log_err("upgrade refused: cannot execute %s%s: %s", upg_exe,
#ifdef HAVE_CHROOT
	      opt_chroot != NULL ? " inside the -R chroot" :
#endif
	      "", strerror(errno));
      return;
    }

  svc_upgrade_begin(opt_upgrade_timeout);
  spool_drain_all(); /* spool files are not handed over */
  upg_save(&w);
  if(w.t.err || (memfd = upg_state_fd(w.t.p, w.t.len)) < 0)
    {
      snprintf(why, sizeof(why), "could not write the state: %s",
	       w.t.err ? "out of memory" : strerror(errno));
      goto fail;
    }
  time_mono(&t1);
  if(socketpair(AF_UNIX, SOCK_SEQPACKET, 0, sp) != 0 ||
     fd_cloexec(sp[0]) != 0 || fd_cloexec(sp[1]) != 0 ||
     (envp = upg_envp(sp[1])) == NULL)
    {
      snprintf(why, sizeof(why), "socketpair: %s", strerror(errno));
      goto fail;
    }
  fflush(NULL);
  if((pid = fork()) < 0)
    {
      snprintf(why, sizeof(why), "fork: %s", strerror(errno));
      goto fail;
    }
  if(pid == 0)
    {
      /* only async-signal-safe calls until exec */
      close(sp[0]);
      fcntl(sp[1], F_SETFD, 0);
      execve(upg_exe, upg_argv, envp);
      _exit(127);
    }
  close(sp[1]);
  sp[1] = -1;
  upg_envp_free(envp);
  envp = NULL;

  /* no send may block past the deadline */
  deadline = t0;
  deadline.tv_sec += opt_upgrade_timeout;
  tv.tv_sec = opt_upgrade_timeout;
  tv.tv_usec = 0;
  setsockopt(sp[0], SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));

  bytes_htonl(hdr, UPG_MAGIC);
  bytes_htonl(hdr + 4, UPG_VERSION);
  bytes_htonl(hdr + 8, w.nfds);
  bytes_htonl(hdr + 12, (uint32_t)((uint64_t)w.t.len >> 32));
  bytes_htonl(hdr + 16, (uint32_t)w.t.len);
  bytes_htonl(hdr + 20, (uint32_t)getpid());
  /* a send fails when the new process has gone away; it may have said
   * why first (e.g. it cannot read this state version), so look for
   * its answer either way */
  if(upg_sendmsg(sp[0], hdr, 24, &memfd, 1) == 0)
    for(off = 0; off < w.nfds; off += n)
      {
	n = w.nfds - off > UPG_FDS_MAX ? UPG_FDS_MAX : w.nfds - off;
	bytes_htonl(hdr, UPG_MAGIC);
	bytes_htonl(hdr + 4, off);
	bytes_htonl(hdr + 8, n);
	if(upg_sendmsg(sp[0], hdr, 12, w.fds + off, n) != 0)
	  break;
      }
  close(memfd);
  memfd = -1;

  if(upg_wait(sp[0], &deadline) <= 0)
    {
      upg_reap(pid, how, sizeof(how));
      snprintf(why, sizeof(why), "no answer within %lds (%s)",
	       opt_upgrade_timeout, how);
      pid = -1;
      goto fail;
    }
  if((rn = upg_recvmsg(sp[0], reply, sizeof(reply) - 1, NULL, &got)) < 9 ||
     bytes_ntohl((uint8_t *)reply) != UPG_MAGIC)
    goto lost;
  reply[rn] = '\0';
  if(reply[4] != 0)
    {
      upg_reap(pid, how, sizeof(how));
      snprintf(why, sizeof(why), "%.160s (%s)", reply + 9, how);
      pid = -1;
      goto fail;
    }

  time_mono(&tv);
  log_notice("upgrade: pid %ld (version %s) serves now, after a %lldms "
	     "pause (state: %zu bytes, %u fds, written in %lldms); pid %ld "
	     "(version %s) exits", (long)bytes_ntohl((uint8_t *)reply + 5),
	     reply + 9, (long long)timeval_diff_ms(&tv, &t0), w.t.len, w.nfds,
	     (long long)timeval_diff_ms(&t1, &t0), (long)getpid(),
	     PACKAGE_VERSION);
  upg_exit((long)bytes_ntohl((uint8_t *)reply + 5));
  return;

 lost:
  upg_reap(pid, how, sizeof(how));
  snprintf(why, sizeof(why), "the new process went away before it was "
	   "ready (%s)", how);
  pid = -1;

 fail:
  if(pid > 0)
    upg_reap(pid, how, sizeof(how));
  log_err("upgrade failed, still serving: %s", why);
  svc_upgrade_done();
  upg_pidfile_restore();
  upg_envp_free(envp);
  if(sp[0] >= 0) close(sp[0]);
  if(sp[1] >= 0) close(sp[1]);
  if(memfd >= 0) close(memfd);
  free(w.t.p);
  free(w.fds);
  return;
}

/* ---- the successor ---- */

/* tell the old process how the load went: ok, or why not */
static void upg_reply(int ok, const char *text)
{
  uint8_t b[9 + 256];
  size_t len = strlen(text);
  if(len > 255)
    len = 255;
  bytes_htonl(b, UPG_MAGIC);
  b[4] = ok ? 0 : 1;
  bytes_htonl(b + 5, (uint32_t)getpid());
  memcpy(b + 9, text, len);
  if(upg_sendmsg(upg_sock, b, 9 + len, NULL, 0) != 0)
    log_err("upgrade: could not answer the old process: %s",
	    strerror(errno));
  return;
}

/*
 * Receive the state and fds from the old process and rebuild everything
 * from them; then write the pid file and answer "ready".  Returns 0, or
 * -1 after logging and answering why (the caller exits without cleanup:
 * nothing it holds may be unlinked or closed toward a peer).
 */
static int upg_successor_load(void)
{
  char why[256], *from = NULL;
  const char *where = NULL;
  uint8_t hdr[24], *used = NULL;
  const uint8_t *map = MAP_FAILED;
  int *fds = NULL, memfd = -1, rc = -1;
  uint32_t nfds = 0, got = 0, k, ver;
  uint64_t slen;
  long oldpid;
  struct stat sb;
  ssize_t n;
  dlist_node_t *nd;
  unsigned int nvp = 0, nmc = 0;
  struct timeval t0, t1;

  why[0] = '\0';
  time_mono(&t0);
  if((n = upg_recvmsg(upg_sock, hdr, sizeof(hdr), &memfd, &k)) != 24 ||
     k != 1 || bytes_ntohl(hdr) != UPG_MAGIC)
    {
      snprintf(why, sizeof(why), "no state header from the old process");
      goto done;
    }
  ver = bytes_ntohl(hdr + 4);
  nfds = bytes_ntohl(hdr + 8);
  slen = ((uint64_t)bytes_ntohl(hdr + 12) << 32) | bytes_ntohl(hdr + 16);
  oldpid = (long)bytes_ntohl(hdr + 20);
  /* the fds are taken in any case (the header and batches are the same
   * in every version): a socket closed with messages unread would reset
   * the old process's end before it reads why */
  if(nfds > (1U << 24) || (fds = malloc((nfds + 1) * sizeof(int))) == NULL ||
     (used = calloc(nfds + 1, 1)) == NULL)
    {
      snprintf(why, sizeof(why), "too many fds (%u)", nfds);
      goto done;
    }
  while(got < nfds)
    {
      uint8_t b[12];
      int batch[UPG_FDS_MAX];
      if((n = upg_recvmsg(upg_sock, b, sizeof(b), batch, &k)) != 12 ||
	 bytes_ntohl(b) != UPG_MAGIC || bytes_ntohl(b + 4) != got ||
	 bytes_ntohl(b + 8) != k || k == 0 || k > nfds - got)
	{
	  uint32_t i;
	  for(i=0; i<k; i++)
	    close(batch[i]);
	  snprintf(why, sizeof(why), "bad fd batch after %u of %u fds", got,
		   nfds);
	  goto done;
	}
      memcpy(fds + got, batch, k * sizeof(int));
      got += k;
    }
  if(ver != UPG_VERSION
#ifdef UPG_VERSION_V1
     && ver != UPG_VERSION_V1
#endif
     )
    {
      snprintf(why, sizeof(why), "version %s cannot read state version %u "
	       "(reads %u)", PACKAGE_VERSION, ver, (unsigned int)UPG_VERSION);
      goto done;
    }
  if(fstat(memfd, &sb) != 0 || (uint64_t)sb.st_size != slen || slen == 0 ||
     slen > SIZE_MAX ||
     (map = mmap(NULL, (size_t)slen, PROT_READ, MAP_PRIVATE, memfd, 0))
     == MAP_FAILED)
    {
      snprintf(why, sizeof(why), "cannot read the state: %s",
	       strerror(errno));
      goto done;
    }
  if(upg_load(map, (size_t)slen, fds, used, nfds, &where, &from) != 0)
    {
      snprintf(why, sizeof(why), "version %s: bad state (%s)",
	       PACKAGE_VERSION, where);
      goto done;
    }
  if(pidfile_open() != 0 || pidfile_write() != 0)
    {
      snprintf(why, sizeof(why), "could not write the pid file");
      goto done;
    }
  rc = 0;

 done:
  if(map != MAP_FAILED)
    munmap((void *)map, (size_t)slen);
  if(memfd >= 0)
    close(memfd);
  for(k=0; k<got; k++)
    if(!used[k])
      close(fds[k]);
  free(fds);
  free(used);
  if(rc != 0)
    {
      log_err("upgrade: not taking over: %s", why);
      upg_reply(0, why);
      free(from);
      return -1;
    }
  for(nd = vp_list.head; nd != NULL; nd = nd->next)
    nvp++;
  for(nd = mc_list.head; nd != NULL; nd = nd->next)
    nmc++;
  time_mono(&t1);
  log_notice("upgrade %lu: pid %ld version %s took over from pid %ld "
	     "version %s: %u VPs, %u mux clients (loaded in %lldms)",
	     upg_count, (long)getpid(), PACKAGE_VERSION, oldpid,
	     from != NULL ? from : "?", nvp, nmc,
	     (long long)timeval_diff_ms(&t1, &t0));
  free(from);
  upg_reply(1, PACKAGE_VERSION);
  close(upg_sock);
  upg_sock = -1;
  return 0;
}

/*
 * At startup, before getopt permutes argv: keep argv for the successor,
 * find the absolute path of this binary, and notice whether this process
 * is a successor.  Returns 0, or -1 if out of memory.
 */
static int upg_init(int argc, char *argv[])
{
  char buf[PATH_MAX], *p;
  ssize_t n;
  int i;
  long fd;

  if((upg_argv = calloc((size_t)argc + 1, sizeof(char *))) == NULL)
    return -1;
  for(i=0; i<argc; i++)
    if((upg_argv[i] = strdup(argv[i])) == NULL)
      return -1;
  if((p = getenv(UPG_ENV "_EXE")) != NULL && p[0] == '/')
    upg_exe = strdup(p);
  else if((n = readlink("/proc/self/exe", buf, sizeof(buf) - 1)) > 0 &&
	  buf[0] == '/')
    {
      buf[n] = '\0';
      upg_exe = strdup(buf);
    }
  else if(argc > 0 && strchr(argv[0], '/') != NULL &&
	  realpath(argv[0], buf) != NULL)
    upg_exe = strdup(buf);
  if((p = getenv(UPG_ENV)) != NULL)
    {
      if(string_tolong(p, &fd) == 0 && fd > 2 && fd < INT_MAX)
	{
	  upg_successor = 1;
	  upg_sock = (int)fd;
	  fd_cloexec(upg_sock);
	}
      unsetenv(UPG_ENV);
    }
  unsetenv(UPG_ENV "_EXE");
  return 0;
}

/*
 * Before -R chroots (not in a successor: it is already inside): the
 * binary's path as seen inside the chroot, if it lies under it.
 */
static void upg_chroot_path(void)
{
#ifdef HAVE_CHROOT
  char root[PATH_MAX];
  size_t len;
  if(opt_chroot == NULL || upg_successor || upg_exe == NULL ||
     realpath(opt_chroot, root) == NULL)
    return;
  len = strlen(root);
  if(len > 1 && strncmp(upg_exe, root, len) == 0 && upg_exe[len] == '/')
    memmove(upg_exe, upg_exe + len, strlen(upg_exe + len) + 1);
#endif
  return;
}

static void upg_free(void)
{
  size_t i;
  if(upg_argv != NULL)
    for(i=0; upg_argv[i] != NULL; i++)
      free(upg_argv[i]);
  free(upg_argv);
  upg_argv = NULL;
  free(upg_exe);
  upg_exe = NULL;
  return;
}

/* ---------------------------------------------------------------------
 * Signals
 *
 * Handlers only write the signal number to a self-pipe; the loop reads it
 * and does the work (reload on SIGHUP, clean exit on SIGINT/SIGTERM).
 * --------------------------------------------------------------------- */

static void sig_handler(int sig)
{
  int saved = errno;
  uint8_t b = (uint8_t)sig;
  if(write(sig_pipe[1], &b, 1) < 0)
    { /* the pipe is full: a signal is already pending */ }
  errno = saved;
  return;
}

static void reload(void)
{
  log_dbg("SIGHUP: reloading");
  svc_reloading();
  meta_load();
#ifdef HAVE_OPENSSL
  tls_reload();
#endif
  svc_send("READY=1");
  return;
}

static void sig_drain(void)
{
  uint8_t b[64];
  ssize_t n, i;
  while((n = read(sig_pipe[0], b, sizeof(b))) > 0)
    {
      for(i=0; i<n; i++)
	{
	  if(b[i] == SIGHUP)
	    reload();
	  else if(b[i] == SIGINT || b[i] == SIGTERM)
	    {
	      if(!loop_stop)
		svc_send("STOPPING=1");
	      loop_stop = 1;
	    }
	  else if(b[i] == SIGUSR2)
	    upg_requested = 1;
	}
    }
  return;
}

static int sig_init(void)
{
  struct sigaction sa;
  if(pipe(sig_pipe) != 0 || fd_nonblock(sig_pipe[0]) != 0 ||
     fd_nonblock(sig_pipe[1]) != 0 || fd_cloexec(sig_pipe[0]) != 0 ||
     fd_cloexec(sig_pipe[1]) != 0)
    {
      log_err("could not create the signal pipe: %s", strerror(errno));
      return -1;
    }
  fdev_init(&sig_ev, sig_pipe[0], FD_SIGNAL, NULL);
  if(ev_set(&sig_ev, 1, 0) != 0)
    return -1;
  memset(&sa, 0, sizeof(sa));
  sigemptyset(&sa.sa_mask);
  sa.sa_handler = SIG_IGN;
  sigaction(SIGPIPE, &sa, NULL);
  sa.sa_handler = sig_handler;
  sa.sa_flags = 0; /* no SA_RESTART: the wait returns */
  if(sigaction(SIGHUP, &sa, NULL) != 0 || sigaction(SIGINT, &sa, NULL) != 0 ||
     sigaction(SIGTERM, &sa, NULL) != 0 || sigaction(SIGUSR2, &sa, NULL) != 0)
    {
      log_err("could not install signal handlers: %s", strerror(errno));
      return -1;
    }
  return 0;
}

/* ---------------------------------------------------------------------
 * Main: option validation, startup in the order of PROTOCOL.md 8, the
 * loop, and clean shutdown.
 * --------------------------------------------------------------------- */

static int pidfile_fd = -1;
static int pidfile_created = 0;   /* ours to unlink on exit */

static void gc_collect(void)
{
  slist_node_t *n;
  while((n = slist_pop_head(&gc_chans)) != NULL)
    free(CONTAINER_OF(n, chan_t, gc_node));
  while((n = slist_pop_head(&gc_ucs)) != NULL)
    free(CONTAINER_OF(n, uclient_t, gc_node));
  while((n = slist_pop_head(&gc_mcs)) != NULL)
    free(CONTAINER_OF(n, mclient_t, gc_node));
  while((n = slist_pop_head(&gc_vps)) != NULL)
    vp_free(CONTAINER_OF(n, vp_t, gc_node));
  http_gc();
  prehdr_gc();
  return;
}

/*
 * A non-blocking TCP listener on sa, for `what` (named in the error
 * line); the fd, or -1 after a log line.
 */
static int tcp_listen_fd(const struct sockaddr *sa, socklen_t sl,
			 const char *what)
{
  char addr[INET6_ADDRSTRLEN];
  int fd, on = 1;

  if(sockaddr_tostr(sa, addr, sizeof(addr)) == NULL)
    snprintf(addr, sizeof(addr), "?");
  if((fd = socket(sa->sa_family, SOCK_STREAM, 0)) < 0)
    {
      log_err("could not create %s %s socket: %s", what,
	      sa->sa_family == AF_INET6 ? "IPv6" : "IPv4", strerror(errno));
      return -1;
    }
  setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &on, sizeof(on));
  if(sa->sa_family == AF_INET6)
    setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &on, sizeof(on));
  if(bind(fd, sa, sl) != 0 || listen(fd, SOMAXCONN) != 0 ||
     fd_nonblock(fd) != 0 || fd_cloexec(fd) != 0)
    {
      log_err("could not listen for %s on %s port %d: %s", what, addr,
	      sockaddr_port(sa), strerror(errno));
      close(fd);
      return -1;
    }
  return fd;
}

static int tcp_listen_one(const struct sockaddr *sa, socklen_t sl)
{
  int fd;
  if((fd = tcp_listen_fd(sa, sl, "scamper")) < 0)
    return -1;
  fdev_init(&tcp_lev[tcp_lev_count++], fd, FD_TCP_LISTEN, NULL);
  return 0;
}

static int tcp_listen(void)
{
  struct sockaddr_storage ss;
  socklen_t sl;

  if(listen_sslen != 0)
    return tcp_listen_one((struct sockaddr *)&listen_ss, listen_sslen);
  if(opt_family != AF_INET6)
    {
      sockaddr_fromstr("0.0.0.0", listen_port, &ss, &sl);
      if(tcp_listen_one((struct sockaddr *)&ss, sl) != 0)
	return -1;
    }
  if(opt_family != AF_INET)
    {
      sockaddr_fromstr("::", listen_port, &ss, &sl);
      if(tcp_listen_one((struct sockaddr *)&ss, sl) != 0)
	return -1;
    }
  return 0;
}

static int mux_listen(void)
{
  int fd;
  fdev_init(&mux_lev, -1, FD_MUX_LISTEN, NULL);
  if(opt_muxpath == NULL)
    return 0;
  if((fd = unix_listen(opt_muxpath)) < 0)
    return -1;
  mux_lev.fd = fd;
  return 0;
}

/* open the pid file before daemonising so a failure can be reported */
static int pidfile_open(void)
{
  if(opt_pidfile == NULL)
    return 0;
  if((pidfile_fd = open(opt_pidfile, O_WRONLY | O_CREAT | O_TRUNC |
			O_NOFOLLOW | O_CLOEXEC, 0644)) < 0)
    {
      log_err("%s: could not open pid file: %s", opt_pidfile,
	      strerror(errno));
      return -1;
    }
  fchmod(pidfile_fd, 0644);
  pidfile_created = 1;
  return 0;
}

static int pidfile_write(void)
{
  char buf[32];
  int len;
  if(pidfile_fd < 0)
    return 0;
  len = snprintf(buf, sizeof(buf), "%ld\n", (long)getpid());
  if(write(pidfile_fd, buf, (size_t)len) != len)
    {
      log_err("%s: could not write pid file: %s", opt_pidfile,
	      strerror(errno));
      return -1;
    }
  close(pidfile_fd);
  pidfile_fd = -1;
  return 0;
}

static void raise_nofile(void)
{
  struct rlimit rl;
  if(getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max)
    {
      rl.rlim_cur = rl.rlim_max;
      setrlimit(RLIMIT_NOFILE, &rl);
    }
  return;
}

static int become_daemon(void)
{
#ifdef HAVE_DAEMON
  if(daemon(1, 0) != 0)
    {
      log_err("could not daemonise: %s", strerror(errno));
      return -1;
    }
#else
  pid_t pid;
  int fd;
  if((pid = fork()) < 0)
    return -1;
  if(pid > 0)
    _exit(0);
  setsid();
  if((fd = open("/dev/null", O_RDWR)) >= 0)
    {
      dup2(fd, 0); dup2(fd, 1); dup2(fd, 2);
      if(fd > 2) close(fd);
    }
#endif
  return 0;
}

/* parse and validate the command line; 0 to run, else the exit status */
static int check_options(int argc, char *argv[])
{
#ifdef HAVE_CHROOT
  struct stat sb;
#endif
  long lo;
  int ch;
  const char *opts = "?46DvP:U:M:O:e:m:Z:"
#ifdef HAVE_OPENSSL
    "c:p:C:"
#endif
#ifdef HAVE_CHROOT
    "R:"
#endif
    ;

  while((ch = getopt(argc, argv, opts)) != -1)
    {
      switch(ch)
	{
	case '4':
	case '6':
	  if(opt_family != AF_UNSPEC &&
	     opt_family != (ch == '4' ? AF_INET : AF_INET6))
	    {
	      usage(USAGE_46);
	      return 255;
	    }
	  opt_family = ch == '4' ? AF_INET : AF_INET6;
	  break;
	case 'D': opt_daemon = 1; break;
	case 'v':
	  printf("sc_remoted version %s\n", PACKAGE_VERSION);
	  return 1;
	case 'P': opt_port_arg = optarg; break;
	case 'U': opt_udir = optarg; break;
	case 'M': opt_muxpath = optarg; break;
	case 'e': opt_pidfile = optarg; break;
	case 'm': opt_metafile = optarg; break;
#ifdef HAVE_OPENSSL
	case 'c': opt_certfile = optarg; break;
	case 'p': opt_privfile = optarg; break;
	case 'C': opt_cafile = optarg; break;
#endif
#ifdef HAVE_CHROOT
	case 'R': opt_chroot = optarg; break;
#endif
	case 'O':
	  if(parse_O(optarg) != 0)
	    {
	      usage(USAGE_ALL);
	      return 255;
	    }
	  break;
	case 'Z':
	  if(string_tolong(optarg, &lo) != 0 || lo < 0 || lo > ZOMBIE_MAX)
	    {
	      usage(USAGE_Z);
	      return 255;
	    }
	  opt_zombie = lo;
	  break;
	case '?':
	default:
	  usage(USAGE_ALL);
	  return 255;
	}
    }

  if(optind != argc)
    {
      fprintf(stderr, "sc_remoted: unexpected argument %s\n", argv[optind]);
      usage(USAGE_ALL);
      return 255;
    }
  if(opt_port_arg == NULL || parse_P(opt_port_arg) != 0)
    {
      usage(USAGE_P);
      return 255;
    }
  if(listen_sslen != 0 && opt_family != AF_UNSPEC &&
     listen_ss.ss_family != opt_family)
    {
      usage(USAGE_P | USAGE_46);
      return 255;
    }
  if(opt_udir == NULL && opt_muxpath == NULL && opt_mux_listen == NULL)
    {
      usage(USAGE_U | USAGE_M);
      return 255;
    }
#ifdef HAVE_OPENSSL
  if((opt_certfile == NULL) != (opt_privfile == NULL) ||
     (opt_cafile != NULL && opt_certfile == NULL))
    {
      usage(USAGE_TLS);
      return 255;
    }
#endif
#ifdef HAVE_CHROOT
  if(opt_chroot != NULL && !upg_successor &&
     (stat(opt_chroot, &sb) != 0 || !S_ISDIR(sb.st_mode)))
    {
      fprintf(stderr, "sc_remoted: -R %s: not a directory\n", opt_chroot);
      usage(USAGE_R);
      return 255;
    }
#endif
  if(opt_buf_low >= opt_buf_high)
    {
      fprintf(stderr, "sc_remoted: buffer-low must be below buffer-high\n");
      usage(USAGE_O);
      return 255;
    }
  /* the mux has no authentication: off loopback only to named networks */
  if(opt_mux_listen != NULL && opt_mux_allow_count == 0 &&
     !sockaddr_is_loopback((struct sockaddr *)&mux_tcp_ss))
    {
      fprintf(stderr, "sc_remoted: -O mux-listen=%s is not a loopback "
	      "address: the mux protocol has no authentication, so give the "
	      "networks that may connect with -O mux-allow=CIDR\n",
	      opt_mux_listen);
      return 255;
    }
  return 0;
}

/* -U must name a directory; checked after chroot, inside it */
static int check_udir(void)
{
  struct stat sb;
  if(opt_udir != NULL &&
     (stat(opt_udir, &sb) != 0 || !S_ISDIR(sb.st_mode)))
    {
      fprintf(stderr, "sc_remoted: -U %s: not a directory\n", opt_udir);
      usage(USAGE_U);
      return 255;
    }
  return 0;
}

/*
 * -O spool-dir must be a directory in which this process can create and
 * write files; checked after chroot, inside it.  The directory stays open
 * (spool files are created relative to it).  Returns 0 or 255.
 */
static int spool_init(void)
{
  char c = 0;
  int fd;
  if(opt_spool_dir == NULL)
    return 0;
  if((spool_dirfd = open(opt_spool_dir, O_RDONLY | O_DIRECTORY |
			 O_CLOEXEC)) < 0)
    {
      fprintf(stderr, "sc_remoted: -O spool-dir=%s: %s\n", opt_spool_dir,
	      strerror(errno));
      return 255;
    }
  if((fd = spool_file_open()) < 0 || pwrite(fd, &c, 1, 0) != 1)
    {
      fprintf(stderr, "sc_remoted: -O spool-dir=%s: cannot create a file "
	      "in it: %s\n", opt_spool_dir, strerror(errno));
      if(fd >= 0)
	close(fd);
      close(spool_dirfd);
      spool_dirfd = -1;
      return 255;
    }
  close(fd);
  return 0;
}

/*
 * Enter the -R chroot (regaining a setuid euid just for the call), then
 * drop a setuid binary's privileges for good.  Returns 0 or -1.
 */
static int privileges_settle(uid_t ruid, uid_t euid)
{
#ifdef HAVE_CHROOT
  if(opt_chroot != NULL && !upg_successor) /* a successor is inside */
    {
      if(ruid != euid && seteuid(euid) != 0)
	{
	  log_err("could not regain privileges: %s", strerror(errno));
	  return -1;
	}
      if(chroot(opt_chroot) != 0 || chdir("/") != 0)
	{
	  log_err("chroot %s: %s", opt_chroot, strerror(errno));
	  return -1;
	}
    }
#endif
  if(ruid != euid && (seteuid(ruid) != 0 || setuid(ruid) != 0))
    {
      log_err("could not drop privileges: %s", strerror(errno));
      return -1;
    }
  /* -D is silent unless startup fails */
#ifdef HAVE_CHROOT
  if(ruid == 0 && opt_chroot == NULL && !opt_daemon && !upg_successor)
    log_warn("warning: running as root without -R");
#else
  if(ruid == 0 && !opt_daemon && !upg_successor)
    log_warn("warning: running as root");
#endif
  return 0;
}

/* close everything with no protocol goodbye; unlink sockets and pid file */
static void shutdown_all(void)
{
  dlist_node_t *n;
  int i;

  http_shutdown();
  prehdr_shutdown();
  while((n = mc_list.head) != NULL)
    mc_close(CONTAINER_OF(n, mclient_t, list_node), "shutting down");
  while((n = vp_list.head) != NULL)
    {
      vp_gone_as(CONTAINER_OF(n, vp_t, list_node), GONE_SHUTDOWN);
      vp_close(CONTAINER_OF(n, vp_t, list_node), "shutting down");
    }
  gc_collect();
  for(i=0; i<tcp_lev_count; i++)
    ev_close(&tcp_lev[i]);
  if(mux_lev.fd >= 0)
    {
      ev_close(&mux_lev);
      unlink(opt_muxpath);
    }
  if(mux_tcp_lev.fd >= 0)
    ev_close(&mux_tcp_lev);
  tcp_lev_count = 0;
  if(sig_ev.fd >= 0)
    ev_close(&sig_ev);
  if(sig_pipe[1] >= 0)
    close(sig_pipe[1]);
  sig_pipe[0] = sig_pipe[1] = -1;
  tw_cancel(&accept_timer);
  svc_close();
  if(ev_fd >= 0)
    close(ev_fd);
  ev_fd = -1;
  if(pidfile_created)
    unlink(opt_pidfile);
  pidfile_created = 0;
  meta_table_free(meta_table);
  meta_table = NULL;
#ifdef HAVE_OPENSSL
  if(tls_ctx != NULL)
    SSL_CTX_free(tls_ctx);
  tls_ctx = NULL;
  tls_pass_wipe();
#endif
  chunk_freelist_clear();
  free(scratch);
  scratch = NULL;
  return;
}

/* the daemon's empty state; shutdown_all() returns to it */
static int globals_init(void)
{
  dlist_init(&vp_list);
  dlist_init(&mc_list);
  splaytree_init(&vp_by_id, vp_id_cmp, offsetof(vp_t, id_node));
  splaytree_init(&vp_by_magic, vp_magic_cmp, offsetof(vp_t, magic_node));
  slist_init(&gc_vps); slist_init(&gc_chans);
  slist_init(&gc_ucs); slist_init(&gc_mcs);
  dlist_init(&vp_again);
  dlist_init(&uc_in_paused);
  dlist_init(&mc_in_paused);
  handshake_count = 0;
  fdev_init(&mux_lev, -1, FD_MUX_LISTEN, NULL);
  fdev_init(&mux_tcp_lev, -1, FD_MUX_LISTEN, NULL);
  fdev_init(&sig_ev, -1, FD_SIGNAL, NULL);
  dlist_init(&hc_list);
  slist_init(&gc_hcs);
  dlist_init(&prehdr_list);
  slist_init(&gc_prehdrs);
  fdev_init(&http_lev, -1, FD_HTTP_LISTEN, NULL);
  time_wall(&stats.start);
  tw_init();
  tw_timer_init(&accept_timer, accept_resume);
  if(scratch == NULL && (scratch = malloc(SCRATCH_SIZE)) == NULL)
    return -1;
  return 0;
}

/* run until SIGINT/SIGTERM (0) or a failure of the wait itself (-1) */
static int loop_run(void)
{
  int rc;
  log_started();
  while(!loop_stop)
    {
      if((rc = ev_poll(vp_again.count > 0 ? 0 : tw_timeout_ms())) < 0)
	{
	  log_err("wait failed: %s", strerror(errno));
	  return -1;
	}
      /*
       * Interrupted before dispatch (a signal; SIGCONT after a stop):
       * wait again before judging timers, so frames that arrived while
       * the daemon was stopped are read before silence is.
       */
      if(rc > 0)
	continue;
      /*
       * More than a tick passed since the wheel last fired (the process
       * was stopped or starved): the wait may have ended on its timeout
       * without reporting what arrived meanwhile, so read once more,
       * without blocking, before timers judge silence.
       */
      if(tw_count > 0 && tw_tick > tw_done + 1 && ev_poll(0) < 0)
	{
	  log_err("wait failed: %s", strerror(errno));
	  return -1;
	}
      vp_again_run();
      tw_advance(tw_tick); /* after dispatch: read before judging silence */
      flush_pending();
      gc_collect();
      if(upg_requested && !loop_stop)
	{
	  upg_requested = 0;
	  upg_run(); /* returns only if the upgrade failed */
	}
    }
  return 0;
}

#ifndef SC_REMOTED_NO_MAIN
int main(int argc, char *argv[])
{
  uid_t ruid = getuid(), euid = geteuid();
  int i, rc;

  /* a setuid binary runs as the invoking user until it needs more */
  if(ruid != euid && seteuid(ruid) != 0)
    return 255;
  if(upg_init(argc, argv) != 0)
    return 255;
  if((rc = check_options(argc, argv)) != 0)
    return rc == 1 ? 0 : rc;
  log_init();
  svc_init();
  upg_chroot_path();
  if(privileges_settle(ruid, euid) != 0)
    return 255;
  if((rc = check_udir()) != 0)
    return rc;
  if((rc = spool_init()) != 0)
    return rc;

  if(globals_init() != 0)
    return 255;
  raise_nofile();

#ifdef HAVE_OPENSSL
  SSL_library_init();
  SSL_load_error_strings();
  if(tls_init() != 0)
    goto fail;
#endif
  if(upg_successor)
    {
      /* listeners and everything else come with the state; the pid file
       * is written once it is loaded; -D already happened */
      fdev_init(&mux_lev, -1, FD_MUX_LISTEN, NULL);
      if(meta_load() != 0 || ev_init() != 0 || sig_init() != 0 ||
	 upg_successor_load() != 0)
	{
	  fflush(NULL);
	  _exit(255); /* nothing shared may be unlinked or closed */
	}
    }
  else
    {
      if(tcp_listen() != 0 || mux_listen() != 0 || mux_tcp_listen() != 0 ||
	 http_listen() != 0 || meta_load() != 0 || pidfile_open() != 0)
	goto fail;
      if(opt_daemon && become_daemon() != 0)
	goto fail;
      if(pidfile_write() != 0 || ev_init() != 0 || sig_init() != 0)
	goto fail;
    }
  for(i=0; i<tcp_lev_count; i++)
    if(ev_set(&tcp_lev[i], 1, 0) != 0)
      goto fail;
  if(mux_lev.fd >= 0 && ev_set(&mux_lev, 1, 0) != 0)
    goto fail;
  if(mux_tcp_lev.fd >= 0 && ev_set(&mux_tcp_lev, 1, 0) != 0)
    goto fail;
  if(http_lev.fd >= 0 && ev_set(&http_lev, 1, 0) != 0)
    goto fail;
  svc_ready(!upg_successor);

  rc = loop_run();
  shutdown_all();
  upg_free();
  return rc == 0 ? 0 : 255;

 fail:
  if(pidfile_fd >= 0)
    {
      close(pidfile_fd);
      pidfile_fd = -1;
    }
  shutdown_all();
  upg_free();
  return 255;
}
#endif
