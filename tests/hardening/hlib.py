"""hlib -- helpers for the hardening tests (tests/hardening/test_*.py).

Python 3 standard library only; builds on tests/lib/scr.py (its codec,
constants and Daemon).  Everything here is non-blocking and driven by one
selectors loop per thread, so a test can run thousands of peers, keep
reading while TCP pushes back, and bound every wait in time.

* Loop        -- a selectors loop with timers; run_until(pred, timeout)
* Conn        -- a non-blocking stream socket with an output queue
* NBScamper   -- a non-blocking fake remote scamper (NEW/RES/REJ, seq and
                 ACK checks, keepalives, its own 60 s rx_abort, resume with
                 retransmission of unacked frames)
* NBUnix      -- a non-blocking client of a per-VP (-U) socket
* NBMux       -- a non-blocking mux (-M) client
* Orphan      -- a socket read until the peer closes it
* serve_lines -- make an NBScamper answer its channels line by line
* Pinger      -- a well-behaved VP doing round trips in its own thread
* Relay       -- a TCP relay that cuts, stalls and delays connections
* Pattern, StreamChecker -- deterministic, verifiable byte streams
* process probes: rss_kib, fd_count, cpu_ticks; is_asan; sanitizer_report;
  raise_nofile; Sampler (a thread sampling the daemon's RSS)
* kill_started -- on SIGTERM/SIGINT/SIGHUP, our child processes and the
  registered process groups are killed (by id) before we die
"""

import collections
import errno
import heapq
import os
import random
import re
import resource
import selectors
import signal
import socket
import struct
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, '..', 'lib'))

import scr  # noqa: E402
from scr import (pack_frame, FrameReader, MASTER_NEW, MASTER_ID,  # noqa: E402
                 CHANNEL_NEW, CHANNEL_FIN, KEEPALIVE, ACK, MASTER_RES,
                 MASTER_REJ, MASTER_OK, U32, HDR, seq_lt)

KIB = 1 << 10
MIB = 1 << 20

RD = selectors.EVENT_READ
WR = selectors.EVENT_WRITE

# ---------------------------------------------------------------------------
# nothing we start may outlive us: on SIGTERM/SIGINT/SIGHUP (e.g. a harness
# timeout) kill our child processes (the daemons) and the process groups
# registered with track_group() (scamper and its helper), by id
# ---------------------------------------------------------------------------

_groups = set()


def track_group(pgid):
    _groups.add(pgid)


def untrack_group(pgid):
    _groups.discard(pgid)


def _children():
    me = os.getpid()
    out = []
    for p in os.listdir('/proc'):
        if not p.isdigit():
            continue
        try:
            with open('/proc/%s/stat' % p) as f:
                st = f.read()
        except OSError:
            continue
        if int(st[st.rindex(')') + 2:].split()[1]) == me:
            out.append(int(p))
    return out


def kill_started():
    for g in list(_groups):
        try:
            os.killpg(g, signal.SIGKILL)
        except OSError:
            pass
    for pid in _children():
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def _on_signal(sig, frame):
    kill_started()
    signal.signal(sig, signal.SIG_DFL)
    os.kill(os.getpid(), sig)


for _sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    signal.signal(_sig, _on_signal)

# ---------------------------------------------------------------------------
# process probes and environment
# ---------------------------------------------------------------------------

_asan_cache = {}


def is_asan(binary=None):
    """True if the daemon under test is built with AddressSanitizer: the
    harness exports ASAN_OPTIONS for such builds, and such a binary
    contains __asan_init."""
    if os.environ.get('ASAN_OPTIONS'):
        return True
    binary = binary or scr.SC_REMOTED
    if binary not in _asan_cache:
        found = False
        try:
            with open(binary, 'rb') as f:
                tail = b''
                while True:
                    block = f.read(1 << 20)
                    if not block:
                        break
                    if b'__asan_init' in tail + block:
                        found = True
                        break
                    tail = block[-16:]
        except OSError:
            pass
        _asan_cache[binary] = found
    return _asan_cache[binary]


def rss_kib(pid):
    """VmRSS of pid in KiB (from /proc/PID/status)."""
    with open('/proc/%d/status' % pid) as f:
        for line in f:
            if line.startswith('VmRSS:'):
                return int(line.split()[1])
    raise RuntimeError('no VmRSS for pid %d' % pid)


def fd_count(pid):
    return len(os.listdir('/proc/%d/fd' % pid))


def cpu_ticks(pid):
    """utime + stime of pid in clock ticks (from /proc/PID/stat)."""
    with open('/proc/%d/stat' % pid) as f:
        s = f.read()
    fields = s[s.rindex(')') + 2:].split()
    return int(fields[11]) + int(fields[12])


CLK_TCK = os.sysconf('SC_CLK_TCK')

_SAN_RX = re.compile(r'ERROR: (Address|Leak|Memory|Thread)Sanitizer|'
                     r'runtime error:|UndefinedBehaviorSanitizer|'
                     r'SUMMARY: \w+Sanitizer')


def sanitizer_report(text):
    """The first sanitizer report line in text, or None."""
    m = _SAN_RX.search(text)
    if m is None:
        return None
    start = text.rfind('\n', 0, m.start()) + 1
    return text[start:start + 2000]


def raise_nofile():
    """Raise this process's RLIMIT_NOFILE soft limit to the hard limit
    (inherited by the daemon, which also raises its own); returns it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


class Sampler:
    """A thread sampling the daemon's VmRSS every interval seconds."""

    def __init__(self, pid, interval=0.1):
        self.pid = pid
        self.interval = interval
        self.samples = []          # (monotonic time, KiB)
        self.stop_ev = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.stop_ev.is_set():
            try:
                self.samples.append((time.monotonic(), rss_kib(self.pid)))
            except (OSError, RuntimeError):
                return
            self.stop_ev.wait(self.interval)

    def peak(self, since=None):
        vals = [v for t, v in self.samples if since is None or t >= since]
        return max(vals) if vals else 0

    def stop(self):
        self.stop_ev.set()
        self.thread.join(5)


def daemon_log_tail(d, n=40):
    return '\n'.join(d.log().splitlines()[-n:])


def check_no_sanitizer(test, d):
    rep = sanitizer_report(d.log())
    test.assertIsNone(rep, 'sanitizer report in the daemon log:\n%s' % rep)


# ---------------------------------------------------------------------------
# verifiable byte streams
# ---------------------------------------------------------------------------


class Pattern:
    """A deterministic byte stream: the byte at offset o is R[o % P] with
    R random (from seed) and P = 1000003, a prime, so a lost, repeated or
    reordered block of any frame-like size shows up as a mismatch."""

    PERIOD = 1000003

    def __init__(self, seed, maxchunk=4 * MIB):
        r = random.Random(seed).randbytes(self.PERIOD)
        reps = (self.PERIOD + maxchunk) // self.PERIOD + 1
        self.buf = r * reps
        self.maxchunk = maxchunk

    def get(self, off, n):
        """The n bytes at stream offset off (n <= maxchunk)."""
        if n > self.maxchunk:
            raise ValueError('chunk too large')
        o = off % self.PERIOD
        return self.buf[o:o + n]

    def matches(self, off, data):
        """True if data equals the stream at offset off."""
        mv = memoryview(data)
        pos = 0
        while pos < len(mv):
            n = min(len(mv) - pos, self.maxchunk)
            if mv[pos:pos + n] != self.get(off + pos, n):
                return False
            pos += n
        return True

    def first_mismatch(self, off, data):
        """Offset within data of the first differing byte, or -1."""
        for i, b in enumerate(data):
            if b != self.buf[(off + i) % self.PERIOD]:
                return i
        return -1


class StreamChecker:
    """Checks that the bytes of one stream arrive in order, exactly once:
    feed() each received piece; .got counts bytes; a mismatch raises."""

    def __init__(self, pattern, total, what):
        self.pattern = pattern
        self.total = total
        self.what = what
        self.got = 0

    def feed(self, data):
        if self.got + len(data) > self.total:
            raise AssertionError('%s: %d bytes received, only %d were sent'
                                 % (self.what, self.got + len(data),
                                    self.total))
        if not self.pattern.matches(self.got, data):
            i = self.pattern.first_mismatch(self.got, data)
            raise AssertionError('%s: byte %d of the stream is wrong (data '
                                 'lost, repeated or reordered)'
                                 % (self.what, self.got + i))
        self.got += len(data)

    @property
    def done(self):
        return self.got == self.total


# ---------------------------------------------------------------------------
# the event loop
# ---------------------------------------------------------------------------


class Loop:
    """selectors loop plus a timer heap.  Handlers are callables taking
    the event mask; timers are callables taking no argument.  Exceptions
    from handlers propagate out of run_once()/run_until()."""

    def __init__(self):
        self.sel = selectors.DefaultSelector()
        self.timers = []
        self._tseq = 0

    def close(self):
        self.sel.close()

    def call_at(self, when, fn):
        self._tseq += 1
        heapq.heappush(self.timers, (when, self._tseq, fn))

    def call_later(self, delay, fn):
        self.call_at(time.monotonic() + delay, fn)

    def every(self, interval, fn):
        """Call fn every interval seconds while it returns a false value
        (returning True stops it)."""
        def tick():
            if not fn():
                self.call_later(interval, tick)
        self.call_later(interval, tick)

    def run_once(self, max_wait=0.05):
        now = time.monotonic()
        wait = max_wait
        if self.timers:
            wait = max(0.0, min(wait, self.timers[0][0] - now))
        if self.sel.get_map():
            events = self.sel.select(wait)
        else:
            time.sleep(wait)
            events = ()
        for key, mask in events:
            key.data(mask)
        now = time.monotonic()
        while self.timers and self.timers[0][0] <= now:
            _, _, fn = heapq.heappop(self.timers)
            fn()

    def run_for(self, seconds):
        end = time.monotonic() + seconds
        while True:
            rem = end - time.monotonic()
            if rem <= 0:
                return
            self.run_once(min(rem, 0.05))

    def run_until(self, pred, timeout, what='condition'):
        """Run until pred() is true; TimeoutError after timeout seconds."""
        end = time.monotonic() + timeout
        while not pred():
            rem = end - time.monotonic()
            if rem <= 0:
                raise TimeoutError('timed out after %.1fs waiting for %s'
                                   % (timeout, what))
            self.run_once(min(rem, 0.05))


class Conn:
    """A non-blocking stream socket registered with a Loop.  Output is
    queued (queue()) and written when the socket is writable; input is
    passed to on_data(bytes); EOF or a reset calls on_eof(why) once, after
    which the socket is closed."""

    RECV_SIZE = 256 * KIB

    def __init__(self, loop, sock=None):
        self.loop = loop
        self.sock = None
        self.out = collections.deque()
        self.out_len = 0
        self.sent = 0            # bytes accepted by the kernel
        self.received = 0
        self.reading = True
        self.connecting = False
        self.closed = True
        self._events = 0
        self._in_drain = False
        if sock is not None:
            self.attach(sock)

    # -- registration ----------------------------------------------------

    def attach(self, sock, connecting=False):
        sock.setblocking(False)
        self.sock = sock
        self.closed = False
        self.connecting = connecting
        self._events = 0
        self._update()

    def _update(self):
        if self.sock is None:
            return
        ev = 0
        if self.connecting:
            ev = WR
        else:
            if self.reading:
                ev |= RD
            if self.out_len:
                ev |= WR
        if ev == self._events:
            return
        if self._events == 0:
            self.loop.sel.register(self.sock, ev, self._on_event)
        elif ev == 0:
            self.loop.sel.unregister(self.sock)
        else:
            self.loop.sel.modify(self.sock, ev, self._on_event)
        self._events = ev

    def pause_reading(self):
        self.reading = False
        self._update()

    def resume_reading(self):
        self.reading = True
        self._update()

    # -- output ----------------------------------------------------------

    def queue(self, *parts):
        """Queue byte strings for sending (dropped when not connected)."""
        if self.sock is None:
            return
        for p in parts:
            if p:
                self.out.append(memoryview(p).cast('B'))
                self.out_len += len(p)
        if not self.connecting:
            self.flush()

    def clear_output(self):
        self.out.clear()
        self.out_len = 0
        self._update()

    def flush(self):
        while self.out and self.sock is not None:
            bufs = [self.out[i] for i in range(min(len(self.out), 32))]
            try:
                n = self.sock.sendmsg(bufs)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                self._lost('send: %s' % e)
                return
            self.sent += n
            self.out_len -= n
            while n > 0:
                head = self.out[0]
                if len(head) <= n:
                    n -= len(head)
                    self.out.popleft()
                else:
                    self.out[0] = head[n:]
                    n = 0
        self._update()
        if self.sock is not None and not self._in_drain:
            self._in_drain = True
            try:
                self.on_drain()
            finally:
                self._in_drain = False

    def on_drain(self):
        """Hook: called after each flush attempt (out_len may be > 0);
        not re-entered when it queues more output itself."""

    # -- events ----------------------------------------------------------

    def _on_event(self, mask):
        if self.sock is None:
            return
        if self.connecting:
            err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self._lost('connect: %s' % os.strerror(err))
                return
            self.connecting = False
            self._update()
            self.on_connected()
            if self.sock is not None and self.out:
                self.flush()
            return
        if mask & WR:
            self.flush()
            if self.sock is None:
                return
        if mask & RD and self.reading:
            self.read_some()

    def read_some(self):
        try:
            data = self.sock.recv(self.RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self._lost('recv: %s' % e)
            return
        if not data:
            self._lost('EOF')
            return
        self.received += len(data)
        self.on_data(data)

    def on_connected(self):
        """Hook: a non-blocking connect completed."""

    def on_data(self, data):
        """Hook: bytes arrived."""

    def on_eof(self, why):
        """Hook: the connection ended (EOF, reset, error)."""

    def _lost(self, why):
        self.close()
        self.on_eof(why)

    def detach_socket(self):
        """Forget the socket without closing it; return it."""
        s = self.sock
        if s is not None and self._events:
            self.loop.sel.unregister(s)
        self._events = 0
        self.sock = None
        self.closed = True
        self.connecting = False
        self.out.clear()
        self.out_len = 0
        return s

    def close(self):
        if self.sock is not None:
            if self._events:
                try:
                    self.loop.sel.unregister(self.sock)
                except (KeyError, ValueError):
                    pass
            self._events = 0
            try:
                self.sock.close()
            except OSError:
                pass
            self.sock = None
        self.closed = True
        self.connecting = False
        self.out.clear()
        self.out_len = 0


class Orphan(Conn):
    """Reads and discards until the peer closes; .eof is then the
    reason."""

    def __init__(self, loop, sock):
        Conn.__init__(self, loop, sock)
        self.eof = None

    def on_eof(self, why):
        self.eof = why


def tcp_connect_nb(host, port, src=None):
    """A non-blocking TCP socket with a connect in progress (or done)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if src is not None:
        s.bind((src, 0))
    s.setblocking(False)
    rc = s.connect_ex((host, port))
    if rc not in (0, errno.EINPROGRESS, errno.EAGAIN):
        s.close()
        raise OSError(rc, os.strerror(rc))
    return s


def unix_connect(path, timeout=5):
    """A connected unix stream socket (blocking connect: local and fast)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(path)
    except OSError:
        s.close()
        raise
    return s


# ---------------------------------------------------------------------------
# fake scamper
# ---------------------------------------------------------------------------


class ProtocolViolation(AssertionError):
    pass


class NBScamper(Conn):
    """A non-blocking fake remote scamper, following PROTOCOL.md 2 the way
    scamper does:

    * start() connects and sends MASTER_NEW, or MASTER_RES once the session
      is resumable (after MASTER_ID);
    * every frame from remoted is checked (CONNECT mode: only ID/OK/REJ
      with seq 0; GO mode: seq == rcv_nxt, only NEW/FIN/KEEPALIVE/ACK
      with the right body sizes; ACK == our oldest unacked seq) --
      a violation raises ProtocolViolation out of the loop;
    * reliable frames are ACKed at once; data for a channel never
      announced is a violation (data for a channel we already FINned is
      counted in late_data and dropped, as the FINs may cross);
    * reliable frames we send are numbered and kept until ACKed, also
      while disconnected; on MASTER_OK the ones remoted lacks are resent;
    * a KEEPALIVE goes out after ka_interval seconds without sending, and
      the connection is dropped after rx_abort seconds without receiving
      (tick() does both; call it about once a second).

    Hooks (assign callables): on_go(fs), on_chan_new(fs, ch),
    on_chan_data(fs, ch, bytes), on_chan_fin(fs, ch) (default: FIN back
    if we have not sent one), on_lost(fs, why), on_rej(fs).
    """

    def __init__(self, loop, port, host='127.0.0.1', name=None, magic=None,
                 src=None, ka_interval=30, rx_abort=60):
        Conn.__init__(self, loop)
        self.port = port
        self.host = host
        self.src = src
        self.name = name
        self.magic = magic if magic is not None else os.urandom(8)
        self.ka_interval = ka_interval
        self.rx_abort = rx_abort
        self.reader = FrameReader()
        self.state = 'idle'   # idle, handshake, go, down
        self.resumable = False
        self.snd_nxt = 0
        self.rcv_nxt = 0
        self.unacked = collections.deque()   # (seq, hdr, payload)
        self.open_chans = set()
        self.fin_sent = set()
        self.fin_rcvd = set()
        self.chans_seen = set()
        self.alias = None
        self.peer = None
        self.keepalives = 0
        self.late_data = 0
        self.connects = 0
        self.resumes = 0
        self.rejects = 0
        self.last_rx = self.last_tx = time.monotonic()
        # ack_data False: data frames are received but never ACKed (as if
        # the ACKs were lost); a MASTER_RES then tells remoted we have them.
        # 'hold': their ACKs are kept in held_acks until release_acks().
        self.ack_data = True
        self.acks_withheld = 0
        self.held_acks = []
        self.on_go = None
        self.on_chan_new = None
        self.on_chan_data = None
        self.on_chan_fin = None
        self.on_lost = None
        self.on_rej = None

    def __repr__(self):
        return 'NBScamper(%s %s %s)' % (self.name, self.state, self.peer)

    # -- connection management -----------------------------------------

    def start(self, keep_old=False):
        """Connect (again) and start the handshake: MASTER_RES if the
        session is resumable, else MASTER_NEW.  With keep_old, a current
        connection is not closed but returned (unregistered), e.g. to
        check that remoted closes it when the new one takes over."""
        old = None
        if self.sock is not None:
            if keep_old:
                old = self.detach_socket()
            else:
                self.close()
        self.reader = FrameReader()
        self.state = 'handshake'
        self.connects += 1
        s = tcp_connect_nb(self.host, self.port, self.src)
        self.attach(s, connecting=True)
        self.last_rx = self.last_tx = time.monotonic()
        if self.resumable:
            self.resumes += 1
            snd_una = self.unacked[0][0] if self.unacked else self.snd_nxt
            body = bytes([MASTER_RES, len(self.magic)]) + self.magic + \
                struct.pack('>III', self.rcv_nxt, snd_una, self.snd_nxt)
        else:
            self.snd_nxt = self.rcv_nxt = 0
            self.unacked.clear()
            body = bytes([MASTER_NEW, len(self.magic)]) + self.magic
            if self.name is not None:
                nb = self.name.encode()
                body += bytes([len(nb) + 1]) + nb + b'\0'
        self.queue(pack_frame(0, 0, body))
        return old

    def on_connected(self):
        try:
            self.peer = scr.peer_id(self.sock.getsockname())
        except OSError:
            pass

    def drop(self, why='dropped by the test'):
        """Close the connection as scamper would on a failure; the session
        stays resumable (if it was)."""
        if self.state in ('handshake', 'go'):
            self.close()
            self.state = 'down'

    def forget(self):
        """Like a MASTER_REJ: new magic, no state; next start() is NEW."""
        self.close()
        self.state = 'idle'
        self.resumable = False
        self.magic = os.urandom(8)
        self.snd_nxt = self.rcv_nxt = 0
        self.unacked.clear()
        self.open_chans.clear()
        self.fin_sent.clear()
        self.fin_rcvd.clear()
        self.chans_seen.clear()

    def on_eof(self, why):
        self.state = 'down'
        if self.on_lost is not None:
            self.on_lost(self, why)

    def tick(self, now=None):
        """Keepalive and rx_abort timers."""
        if self.state != 'go' or self.sock is None:
            return
        now = time.monotonic() if now is None else now
        if self.rx_abort and now - self.last_rx >= self.rx_abort:
            self._lost('rx_abort: nothing from remoted for %.0fs'
                       % (now - self.last_rx))
            return
        if self.ka_interval and now - self.last_tx >= self.ka_interval:
            self._send_unreliable(bytes([KEEPALIVE]))

    # -- sending ---------------------------------------------------------

    def _send_unreliable(self, body):
        if self.state != 'go' or self.sock is None:
            return
        self.last_tx = time.monotonic()
        self.queue(pack_frame(self.snd_nxt, 0, body))

    def send_reliable(self, chan, payload):
        payload = bytes(payload)
        hdr = HDR.pack(self.snd_nxt, chan, len(payload))
        self.unacked.append((self.snd_nxt, hdr, payload))
        self.snd_nxt = (self.snd_nxt + 1) & U32
        if self.state == 'go' and self.sock is not None:
            self.last_tx = time.monotonic()
            self.queue(hdr, payload)

    def send_data(self, chan, data, chunk=65535):
        data = bytes(data)
        if chan not in self.open_chans:
            raise AssertionError('%r: data for channel %d, which is not '
                                 'open' % (self, chan))
        for off in range(0, len(data), chunk):
            self.send_reliable(chan, data[off:off + chunk])

    def send_fin(self, chan):
        if chan in self.fin_sent:
            return
        self.fin_sent.add(chan)
        self.open_chans.discard(chan)
        self.send_reliable(0, bytes([CHANNEL_FIN]) + struct.pack('>I', chan))

    def _resend_unacked(self):
        # no on_drain() while resending: frames queued by it would land in
        # the middle of the retransmission, out of seq order
        was, self._in_drain = self._in_drain, True
        try:
            for _, hdr, payload in list(self.unacked):
                self.queue(hdr, payload)
        finally:
            self._in_drain = was

    # -- receiving -------------------------------------------------------

    def on_data(self, data):
        self.last_rx = time.monotonic()
        for f in self.reader.feed(data):
            if self.sock is None:
                return
            self._frame(f)

    def _violation(self, msg, f):
        raise ProtocolViolation('%r: %s: %r (rcv_nxt=%d snd_nxt=%d oldest '
                                'unacked=%s)' % (
                                    self, msg, f, self.rcv_nxt, self.snd_nxt,
                                    self.unacked[0][0] if self.unacked
                                    else None))

    def _frame(self, f):
        if self.state == 'handshake':
            if f.chan != 0 or f.seq != 0 or \
               f.type not in (MASTER_ID, MASTER_OK, MASTER_REJ):
                self._violation('unexpected frame in CONNECT mode', f)
            b = f.body
            if f.type == MASTER_ID:
                if self.resumable:
                    self._violation('MASTER_ID in reply to MASTER_RES', f)
                if len(b) < 2 or len(b) != 1 + b[0] or b[-1] != 0:
                    self._violation('malformed MASTER_ID', f)
                self.alias = bytes(b[1:-1]).decode('ascii', 'replace')
                self.resumable = True
                self.state = 'go'
                if self.on_go is not None:
                    self.on_go(self)
            elif f.type == MASTER_OK:
                if not self.resumable:
                    self._violation('MASTER_OK in reply to MASTER_NEW', f)
                if len(b) != 4:
                    self._violation('MASTER_OK body length != 4', f)
                ok = struct.unpack('>I', b)[0]
                while self.unacked and seq_lt(self.unacked[0][0], ok):
                    self.unacked.popleft()
                if self.unacked and self.unacked[0][0] != ok:
                    self._violation('MASTER_OK rcv_nxt %d is not our oldest '
                                    'unacked seq' % ok, f)
                if not self.unacked and ok != self.snd_nxt:
                    self._violation('MASTER_OK rcv_nxt %d != our snd_nxt'
                                    % ok, f)
                self.state = 'go'
                self.last_tx = time.monotonic()
                self._resend_unacked()
                if self.on_go is not None:
                    self.on_go(self)
            else:
                if not self.resumable:
                    self._violation('MASTER_REJ in reply to MASTER_NEW', f)
                self.rejects += 1
                self.forget()
                if self.on_rej is not None:
                    self.on_rej(self)
            return

        if f.seq != self.rcv_nxt:
            self._violation('seq %d != rcv_nxt %d' % (f.seq, self.rcv_nxt), f)
        if f.chan != 0:
            if self.ack_data is True:
                self._ack(f.seq)
            else:
                self.rcv_nxt = (self.rcv_nxt + 1) & U32
                self.acks_withheld += 1
                if self.ack_data == 'hold':
                    self.held_acks.append(f.seq)
            if f.chan in self.open_chans:
                if self.on_chan_data is not None:
                    self.on_chan_data(self, f.chan, f.payload)
            elif f.chan in self.chans_seen:
                self.late_data += 1
            else:
                self._violation('data for a channel never announced', f)
            return
        t, b = f.type, f.body
        if t in (CHANNEL_NEW, CHANNEL_FIN):
            if len(b) != 4:
                self._violation('bad body length', f)
            self._ack(f.seq)
            ch = struct.unpack('>I', b)[0]
            if t == CHANNEL_NEW:
                if ch == 0 or ch in self.chans_seen:
                    self._violation('CHANNEL_NEW with id 0 or reused', f)
                self.chans_seen.add(ch)
                self.open_chans.add(ch)
                if self.on_chan_new is not None:
                    self.on_chan_new(self, ch)
            else:
                if ch not in self.chans_seen:
                    self._violation('CHANNEL_FIN for a channel never '
                                    'announced', f)
                if ch in self.fin_rcvd:
                    self._violation('second CHANNEL_FIN for a channel', f)
                self.fin_rcvd.add(ch)
                if self.on_chan_fin is not None:
                    self.on_chan_fin(self, ch)
                else:
                    self.send_fin(ch)
        elif t == ACK:
            if len(b) != 4:
                self._violation('ACK body length != 4', f)
            a = struct.unpack('>I', b)[0]
            if not self.unacked:
                self._violation('ACK %d with nothing outstanding' % a, f)
            if a != self.unacked[0][0]:
                self._violation('ACK %d, oldest unacked is %d'
                                % (a, self.unacked[0][0]), f)
            self.unacked.popleft()
        elif t == KEEPALIVE:
            if len(b) != 0:
                self._violation('KEEPALIVE with a body', f)
            self.keepalives += 1
        else:
            self._violation('unexpected control message in GO mode', f)

    def release_acks(self):
        """Send the ACKs held back (ack_data == 'hold') in one burst."""
        acks = b''.join(pack_frame(self.snd_nxt, 0, bytes([ACK]) +
                                   struct.pack('>I', q))
                        for q in self.held_acks)
        self.held_acks = []
        if acks and self.state == 'go':
            self.last_tx = time.monotonic()
            self.queue(acks)

    def _ack(self, seq):
        self.rcv_nxt = (self.rcv_nxt + 1) & U32
        self._send_unreliable(bytes([ACK]) + struct.pack('>I', seq))


# ---------------------------------------------------------------------------
# local clients
# ---------------------------------------------------------------------------


class NBUnix(Conn):
    """A non-blocking client of a per-VP socket; on_bytes(c, data) and
    on_end(c, why) hooks; .eof once the daemon closed it."""

    def __init__(self, loop, path):
        Conn.__init__(self, loop, unix_connect(path))
        self.path = path
        self.eof = None
        self.on_bytes = None
        self.on_end = None

    def on_data(self, data):
        if self.on_bytes is not None:
            self.on_bytes(self, data)

    def on_eof(self, why):
        self.eof = why
        if self.on_end is not None:
            self.on_end(self, why)


MUX_HDR = struct.Struct('>II')


class NBMux(Conn):
    """A non-blocking mux client.  Tracks VPs announced (vps: id -> dict,
    by_name: name -> id); hooks on_update(m, vp), on_depart(m, id),
    on_close(m, chan), on_chan_data(m, chan, bytes), on_end(m, why)."""

    def __init__(self, loop, path):
        Conn.__init__(self, loop, unix_connect(path))
        self.path = path
        self.buf = bytearray()
        self.go = False
        self.eof = None
        self.vps = {}
        self.by_name = {}
        self.departed = set()
        self.on_update = None
        self.on_depart = None
        self.on_close = None
        self.on_chan_data = None
        self.on_end = None

    def open(self, vp_id, chan):
        self.queue(scr.mux_frame(0, struct.pack('>HII', scr.MUX_CHANNEL_OPEN,
                                                vp_id, chan)))

    def send(self, chan, data):
        data = bytes(data)
        self.queue(MUX_HDR.pack(chan, len(data)), data)

    def on_data(self, data):
        self.buf += data
        off = 0
        n = len(self.buf)
        while n - off >= 8:
            chan, ln = MUX_HDR.unpack_from(self.buf, off)
            if n - off - 8 < ln:
                break
            payload = bytes(self.buf[off + 8:off + 8 + ln])
            off += 8 + ln
            self._frame(chan, payload)
            if self.sock is None:
                break
        del self.buf[:off]

    def _frame(self, chan, p):
        if chan != 0:
            if not self.go:
                raise AssertionError('mux data before GO')
            if self.on_chan_data is not None:
                self.on_chan_data(self, chan, p)
            return
        if len(p) < 2:
            raise AssertionError('mux control frame shorter than 2 bytes')
        t = struct.unpack_from('>H', p)[0]
        if t == scr.MUX_VP_UPDATE:
            vp = scr.parse_vp_update(p)
            self.vps[vp['id']] = vp
            if 'name' in vp:
                self.by_name[vp['name']] = vp['id']
            if self.on_update is not None:
                self.on_update(self, vp)
        elif t == scr.MUX_GO:
            if self.go or len(p) != 2:
                raise AssertionError('bad or second GO')
            self.go = True
        elif t == scr.MUX_VP_DEPART:
            if not self.go or len(p) != 6:
                raise AssertionError('bad VP_DEPART')
            vid = struct.unpack_from('>I', p, 2)[0]
            self.departed.add(vid)
            vp = self.vps.pop(vid, None)
            if vp is not None and self.by_name.get(vp.get('name')) == vid:
                del self.by_name[vp['name']]
            if self.on_depart is not None:
                self.on_depart(self, vid)
        elif t == scr.MUX_CHANNEL_CLOSE:
            if not self.go or len(p) != 6:
                raise AssertionError('bad CHANNEL_CLOSE')
            if self.on_close is not None:
                self.on_close(self, struct.unpack_from('>I', p, 2)[0])
        else:
            raise AssertionError('unknown mux control type %d' % t)

    def on_eof(self, why):
        self.eof = why
        if self.on_end is not None:
            self.on_end(self, why)


def serve_lines(fs, answer):
    """Make fs answer its channels line by line: answer(fs, ch, line) is
    called for each complete line (without the newline).  The partial
    line buffers survive reconnects, as scamper's channel state does."""
    bufs = {}

    def on_data(fs, ch, data):
        b = bufs.setdefault(ch, bytearray())
        b += data
        start = 0
        while True:
            i = b.find(b'\n', start)
            if i < 0:
                break
            line = bytes(b[start:i])
            start = i + 1
            answer(fs, ch, line)
            if ch not in fs.open_chans:
                break
        del b[:start]
    fs.on_chan_data = on_data
    return bufs


class Pinger(threading.Thread):
    """A well-behaved VP in its own thread and loop: a fake scamper named
    `name`, a -U client on its socket and (with mux=True) a mux channel,
    each sending `req N` every interval seconds; the fake answers
    `resp N` (and ignores channels others open on it).  rtts holds (send time, round trip, path) for every answer.
    Any failure (a lost connection, a wrong or missing answer, a round trip
    over max_rtt) is kept in .error and ends the thread; check() raises
    it.  stop() ends it, waiting for outstanding answers first."""

    def __init__(self, daemon, name='pinger', interval=0.1, mux=False,
                 max_rtt=10.0):
        threading.Thread.__init__(self, daemon=True)
        self.d = daemon
        self.name = name
        self.interval = interval
        self.use_mux = mux
        self.max_rtt = max_rtt
        self.rtts = []
        self.error = None
        self.ready = threading.Event()
        self.stop_ev = threading.Event()
        self.sent = 0

    def run(self):
        loop = Loop()
        try:
            self._run(loop)
        except BaseException as e:  # noqa: BLE001 -- reported by check()
            import traceback
            self.error = '%s\n%s' % (e, traceback.format_exc())
        finally:
            for c in getattr(self, '_conns', ()):
                c.close()
            loop.close()
            self.ready.set()

    def _run(self, loop):
        d = self.d
        fs = NBScamper(loop, d.port, name=self.name)
        self._conns = [fs]
        own = []     # our channels; others (e.g. from garbage) are ignored

        def answer(fs, ch, line):
            if ch not in own:
                return
            m = re.match(rb'req (\d+)$', line)
            if not m:
                raise AssertionError('pinger VP got %r' % line)
            fs.send_data(ch, b'resp ' + m.group(1) + b'\n')
        serve_lines(fs, answer)
        fs.on_lost = lambda fs, why: self._fail('pinger VP lost: %s' % why)
        fs.start()
        loop.run_until(lambda: fs.state == 'go', 10, 'pinger handshake')
        path = d.wait_socket(self.name + '-*', timeout=10)
        uc = NBUnix(loop, path)
        self._conns.append(uc)
        loop.run_until(lambda: len(fs.open_chans) == 1, 10,
                       'pinger -U channel')
        own.append(min(fs.open_chans))
        ends = {}   # path -> (send function, pending dict, line buffer)
        ends['unix'] = (uc.queue, {}, bytearray())
        uc.on_bytes = lambda c, data: self._answers('unix', ends, data)
        uc.on_end = lambda c, why: self._fail('pinger -U client closed: %s'
                                              % why)
        if self.use_mux:
            mx = NBMux(loop, d.mux_path)
            self._conns.append(mx)
            loop.run_until(lambda: mx.go and self.name in mx.by_name, 10,
                           'pinger mux VP_UPDATE')
            my_id = mx.by_name[self.name]
            mx.open(my_id, 1)
            loop.run_until(lambda: len(fs.open_chans) == 2, 10,
                           'pinger mux channel')
            own.append(max(fs.open_chans))
            ends['mux'] = (lambda data: mx.send(1, data), {}, bytearray())
            mx.on_chan_data = lambda m, ch, data: self._answers('mux', ends,
                                                                data)
            mx.on_end = lambda m, why: self._fail('pinger mux client '
                                                  'closed: %s' % why)
            mx.on_depart = lambda m, vid: (vid == my_id and self._fail(
                'pinger VP departed'))
        self.ready.set()
        n = 0
        next_send = time.monotonic()
        stopping = None
        while self.error is None:
            now = time.monotonic()
            fs.tick(now)
            if self.stop_ev.is_set() and stopping is None:
                stopping = now
            if stopping is None and now >= next_send:
                n += 1
                for pth, (send, pending, _) in ends.items():
                    pending[n] = now
                    send(b'req %d\n' % n)
                    self.sent += 1
                next_send += self.interval
                if next_send < now:
                    next_send = now + self.interval
            for pth, (_, pending, _) in ends.items():
                if pending:
                    oldest = min(pending.values())
                    if now - oldest > self.max_rtt:
                        self._fail('%s: no answer after %.1fs (%d pending)'
                                   % (pth, now - oldest, len(pending)))
            if stopping is not None and \
               all(not p for _, p, _ in ends.values()):
                return
            loop.run_once(0.01)

    def _answers(self, pth, ends, data):
        _, pending, buf = ends[pth]
        buf += data
        now = time.monotonic()
        while True:
            i = buf.find(b'\n')
            if i < 0:
                return
            line = bytes(buf[:i])
            del buf[:i + 1]
            m = re.match(rb'resp (\d+)$', line)
            if not m:
                self._fail('%s: unexpected answer %r' % (pth, line))
                return
            k = int(m.group(1))
            if k not in pending:
                self._fail('%s: answer %d twice or unasked' % (pth, k))
                return
            if min(pending) != k:
                self._fail('%s: answer %d before %d' % (pth, k,
                                                        min(pending)))
                return
            self.rtts.append((pending[k], now - pending.pop(k), pth))

    def _fail(self, msg):
        if self.error is None:
            self.error = msg

    def check(self):
        if self.error is not None:
            raise AssertionError('pinger: %s' % self.error)

    def stop(self, timeout=15):
        self.stop_ev.set()
        self.join(timeout)
        if self.is_alive():
            raise AssertionError('pinger did not stop')
        self.check()

    def max_rtt_between(self, t0, t1):
        v = [r for t, r, _ in self.rtts if t0 <= t <= t1]
        return (max(v) if v else None), len(v)


# ---------------------------------------------------------------------------
# a TCP relay that can cut, stall and delay connections
# ---------------------------------------------------------------------------


class _RelaySide(Conn):
    def __init__(self, loop, pair, sock=None):
        Conn.__init__(self, loop, sock)
        self.pair = pair

    def on_data(self, data):
        self.pair.forward(self, data)

    def on_eof(self, why):
        self.pair.close('%s side: %s' % ('scamper' if self is
                                         self.pair.down else 'daemon', why))


class RelayPair:
    """One relayed connection: down (toward the fake scamper) and up
    (toward the daemon).  Modes: normal; delay (each chunk is held for
    a random time, order kept, sometimes split); stall (nothing is read
    or forwarded, nothing is closed)."""

    def __init__(self, relay, csock, n):
        self.relay = relay
        self.n = n
        self.loop = relay.loop
        self.mode = 'normal'
        self.mode_until = None
        self.closed = False
        self.why = None
        self.held = collections.deque()   # (release time, side, bytes)
        self.last_release = 0.0
        try:
            self.client = csock.getpeername()
        except OSError:
            self.client = None
        self.down = _RelaySide(self.loop, self, csock)
        self.up = _RelaySide(self.loop, self)
        self.up.attach(tcp_connect_nb(relay.upstream[0], relay.upstream[1]),
                       connecting=True)
        self.t0 = time.monotonic()

    def forward(self, side, data):
        if self.mode == 'delay' or self.held:
            now = time.monotonic()
            pieces = [data]
            if len(data) > 1 and random.random() < 0.3:
                cut = random.randint(1, len(data) - 1)
                pieces = [data[:cut], data[cut:]]
            extra = random.uniform(0.01, 0.4) if self.mode == 'delay' else 0
            for p in pieces:
                t = max(self.last_release, now + extra)
                self.last_release = t
                self.held.append((t, side, p))
            return
        (self.up if side is self.down else self.down).queue(data)

    def service(self, now):
        if self.closed:
            return
        while self.held and self.held[0][0] <= now and \
                self.mode != 'stall':
            _, side, p = self.held.popleft()
            (self.up if side is self.down else self.down).queue(p)
            if self.closed:
                return
        if self.mode_until is not None and now >= self.mode_until:
            if self.mode == 'stall':
                self.close('stall over', rst=True)
                return
            self.mode = 'normal'
            self.mode_until = None

    def delay(self, seconds):
        if self.mode == 'normal':
            self.mode = 'delay'
            self.mode_until = time.monotonic() + seconds

    def stall(self, seconds):
        """Silently stop relaying for seconds, then cut."""
        self.mode = 'stall'
        self.mode_until = time.monotonic() + seconds
        self.down.pause_reading()
        self.up.pause_reading()

    def close(self, why='cut', rst=False):
        if self.closed:
            return
        self.closed = True
        self.why = why
        for s in (self.down, self.up):
            if rst and s.sock is not None:
                try:
                    s.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                      struct.pack('ii', 1, 0))
                except OSError:
                    pass
            s.close()
        self.relay.events.append('%7.2f pair %d closed: %s'
                                 % (time.monotonic() - self.relay.t0, self.n,
                                    why))


class Relay:
    """Listens on 127.0.0.1:<ephemeral> and relays each connection to the
    upstream port; pairs lists the live RelayPairs.  Drive it with the
    loop it was created on."""

    def __init__(self, loop, upstream_port, host='127.0.0.1'):
        self.loop = loop
        self.upstream = (host, upstream_port)
        self.ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.ls.bind((host, 0))
        self.ls.listen(128)
        self.ls.setblocking(False)
        self.port = self.ls.getsockname()[1]
        self.pairs = []
        self.accepted = 0
        self.events = []
        self.t0 = time.monotonic()
        loop.sel.register(self.ls, RD, self._accept)
        loop.every(0.01, self.service)
        self.closed_flag = False

    def _accept(self, mask):
        while True:
            try:
                c, _ = self.ls.accept()
            except (BlockingIOError, InterruptedError):
                return
            self.accepted += 1
            self.pairs.append(RelayPair(self, c, self.accepted))

    def service(self):
        now = time.monotonic()
        for p in list(self.pairs):
            p.service(now)
            if p.closed:
                self.pairs.remove(p)
        return self.closed_flag

    def live(self):
        return [p for p in self.pairs if not p.closed]

    def close(self):
        self.closed_flag = True
        for p in list(self.pairs):
            p.close('relay closed')
        self.pairs = []
        try:
            self.loop.sel.unregister(self.ls)
        except (KeyError, ValueError):
            pass
        self.ls.close()
