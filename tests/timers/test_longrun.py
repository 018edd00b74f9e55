#!/usr/bin/env python3
"""Timers: six hours of daemon time in about a minute and a half (issue 9).

The script re-executes itself under libfaketime (tlib), so the daemons it
starts and its fake peers share one clock running SPEED (240) times
faster than real time.  Two daemons run side by side for 6 h 05 min:

daemon B (epoll, -Z 10800, stall-timeout=120):
  * 3 long-lived VPs sending their own KEEPALIVE every 20 s: the daemon,
    with nothing else to say, sends one KEEPALIVE per 30 s of its silence;
  * silent VPs: after MASTER_ID they send nothing; the daemon sends one
    KEEPALIVE at 30 s, aborts at 60 s (rx_abort), keeps the zombie for
    -Z 10800 s (longer than the wheel's 1024 slots) and expires it once;
  * slow handshakes (MASTER_NEW 12 s after connecting: accepted) and
    connections that never handshake (closed at the 30 s deadline);
  * a local client on a VP's -U socket that stops reading while the VP
    sends it 1 MiB: disconnected once, at stall-timeout;
  * RSS and fd count sampled at 1 h and at 6 h, with the same long-lived
    connections open: no growth.
daemon A (-O select, -Z 0): with nothing connected it sleeps without a
  timeout; after idle gaps of 31 s to 20 min a VP arrives, handshakes
  slowly (20 s) and relays both ways, or a connection that never
  handshakes is closed at exactly its 30 s deadline.

Every timer is checked to fire exactly once, at its time +/- 1 tick plus
tlib.SLACK (real scheduling jitter seen in daemon time, see tlib); the
share within 1 tick is printed per timer kind.
"""

import os
import select
import socket
import struct
import sys
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tlib  # noqa: E402
from tlib import scr  # noqa: E402
from scr import (Daemon, UnixClient, MASTER_ID, KEEPALIVE,  # noqa: E402
                 CHANNEL_FIN)

HOUR = 3600
DURATION = 6 * HOUR + 300
ZOMBIE = 10800
STALL = 120
LONG_LIVED = 3
SILENT_AT = (100, 1900, 3000, 7000)
SLOW_AT = (600, 2500, 9500, 14000, 20000)
NOHS_AT = (1200, 4000, 11000, 17000, 21000)
STALL_AT = (1800, 5400, 9000, 12600, 16200, 19800)
SAMPLE_AT = (HOUR, 6 * HOUR)
IDLE_GAPS = (31, 45, 60, 90, 120, 240, 300, 600, 900, 1200)
# A peer's margins are daemon seconds too, i.e. milliseconds of real time
# at x240: a VP keeps itself alive every 20 s (rx_abort is 60 s), a slow
# handshake waits 12 s of the 30 s deadline.  W bounds waits for things
# that should happen at once (2.5 real seconds at x240).
KA_EVERY = 20
SLOW_WAIT = 12
W = 600


class LongRunTest(unittest.TestCase):

    def setUp(self):
        self.clk = tlib.Clock()
        self.rec = tlib.Recorder()
        self.end = DURATION

    # -- helpers -----------------------------------------------------------

    def handshake(self, fs, timeout=600):
        """MASTER_NEW -> MASTER_ID; returns (sent, got) times, the window
        holding the daemon's last_rx/last_tx stamp."""
        sent = self.clk.now()
        fs.send_new()
        f = fs.recv_frame(timeout)
        if f.chan != 0 or f.type != MASTER_ID:
            raise AssertionError('expected MASTER_ID, got %r' % (f,))
        return sent, self.clk.now()

    def fake(self, d, name):
        fs = d.fake(name=name)
        self.addCleanup(fs.close)
        return fs

    # -- daemon B actors ---------------------------------------------------

    def long_lived(self, d, i):
        """KEEPALIVE arrivals are read with their kernel receive stamps
        (SO_TIMESTAMPNS: real time, not faked, taken as the daemon's write
        lands on loopback) and scaled by SPEED, so a late wake-up of this
        Python thread does not show as a late or early daemon timer."""
        clk, rec = self.clk, self.rec
        fs = self.fake(d, 'long%d' % i)
        fs.connect()
        t_sent, t_id = self.handshake(fs)
        last_seen = t_id
        s = fs.sock
        try:
            s.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        except OSError:
            pass                 # kernel_stamp() falls back to the clock
        reader = scr.FrameReader()
        last, n, next_ka = None, 0, t_id + KA_EVERY
        while clk.now() < self.end:
            s.settimeout(max(min(next_ka, self.end) - clk.now(), 0.001))
            try:
                data, anc, _, _ = s.recvmsg(4096, 64)
            except socket.timeout:
                data = None
            if data == b'':
                rec.fail('long%d: closed by the daemon' % i)
                break
            if data:
                stamp = kernel_stamp(anc)
                if stamp is None:
                    stamp = clk.now() / tlib.SPEED
                frames = reader.feed(data)
                for f in frames:
                    if f.chan != 0 or f.type != KEEPALIVE:
                        rec.fail('long%d: unexpected %r' % (i, f))
                        continue
                    if len(frames) > 1:
                        # this thread was starved and TCP merged the
                        # segments: one stamp for several, no interval
                        rec.count('keepalives read together', 1)
                        last, last_seen, n = stamp, clk.now(), n + 1
                        continue
                    if last is not None:
                        dt = (stamp - last) * tlib.SPEED
                        rec.interval('keepalive', 'long%d#%d' % (i, n), 30,
                                     dt, dt)
                    else:
                        rec.interval('keepalive', 'long%d#first' % i, 30,
                                     clk.now() - t_id, clk.now() - t_sent)
                    last, last_seen, n = stamp, clk.now(), n + 1
            if clk.now() >= next_ka:
                fs.send_keepalive()
                next_ka += KA_EVERY
        rec.count('keepalives long%d' % i, n)
        # a KEEPALIVE a tick late moves the next one a tick too (30 s of
        # silence count from the last send), so over 6 h the count is
        # not (end - start) / 30; no gap at either end and every interval
        # at 30 s is what "one per 30 s of silence" means
        if self.end - last_seen > 30 + tlib.TICK + tlib.SLACK:
            rec.fail('long%d: no KEEPALIVE in the last %.1f s'
                     % (i, self.end - last_seen))

    def silent(self, d, at):
        clk, rec = self.clk, self.rec
        clk.sleep_until(at)
        name = 'silent%d' % at
        fs = self.fake(d, name)
        fs.connect()
        sent, got = self.handshake(fs)
        kas = []
        while True:
            try:
                f = fs.recv_frame(120)
            except EOFError:
                break
            if f.chan == 0 and f.type == KEEPALIVE:
                kas.append(clk.now())
            else:
                rec.fail('%s: unexpected %r' % (name, f))
        t = clk.now()
        rec.interval('rx_abort', name, 60, t - got, t - sent)
        if len(kas) != 1:
            rec.fail('%s: %d keepalives before rx_abort, expected 1'
                     % (name, len(kas)))
        for k in kas:
            rec.interval('keepalive', name, 30, k - got, k - sent)
        rec.count('rx_abort')

    def slow_handshake(self, d, at, wait=SLOW_WAIT):
        clk, rec = self.clk, self.rec
        clk.sleep_until(at)
        name = 'slow%d' % at
        fs = self.fake(d, name)
        fs.connect()
        clk.sleep_until(at + wait)
        try:
            self.handshake(fs)
        except (EOFError, AssertionError) as e:
            rec.fail('%s: MASTER_NEW after %d s refused: %s'
                     % (name, wait, e))
            return
        d.wait_socket(fs.expected_socket_name(), W)
        fs.close()               # a zombie for -Z
        rec.count('slow handshakes')

    def no_handshake(self, d, at, label):
        clk, rec = self.clk, self.rec
        clk.sleep_until(at)
        c0 = clk.now()
        s = socket.create_connection((d.connect_host, d.port), timeout=W)
        c1 = clk.now()
        try:
            s.settimeout(120)
            data = s.recv(1)
        except OSError:
            data = b''
        t = clk.now()
        s.close()
        if data:
            rec.fail('%s: daemon sent %r before a handshake' % (label, data))
        rec.interval('handshake_deadline', label, 30, t - c1, t - c0)
        rec.count('handshake deadlines')

    def stall_vp(self, d):
        """One VP; at each STALL_AT a client attaches and stops reading
        while the VP sends it 1 MiB; the daemon drops it at STALL."""
        clk, rec = self.clk, self.rec
        fs = self.fake(d, 'stallvp')
        fs.connect()
        self.handshake(fs)
        path = d.wait_socket(fs.expected_socket_name(), W)
        next_ka = clk.now() + KA_EVERY
        todo = list(STALL_AT)
        while clk.now() < self.end:
            if todo and clk.now() >= todo[0]:
                todo.pop(0)
                self.one_stall(d, fs, path)
            until = min([next_ka, self.end] + todo[:1])
            try:
                f = fs.recv_frame(max(until - clk.now(), 0.001))
                if f.chan == 0 and f.type == CHANNEL_FIN:
                    fs.send_fin(struct_u32(f.body))
            except TimeoutError:
                pass
            if clk.now() >= next_ka:
                fs.send_keepalive()
                next_ka = clk.now() + KA_EVERY

    def one_stall(self, d, fs, path):
        clk, rec = self.clk, self.rec
        c = UnixClient(path)
        self.addCleanup(c.close)
        ch = fs.wait_channel_new(60)
        b0 = clk.now()
        fs.sock.settimeout(W)
        fs.send_data(ch, b'\xab' * (1024 * 1024))
        b1 = clk.now()
        p = select.poll()
        p.register(c.sock, select.POLLHUP)
        hup = None
        while clk.now() < b1 + 3 * STALL:
            # keep the VP's side moving (ACKs, FIN) while the client
            # sits on its unread bytes
            try:
                f = fs.recv_frame(0.5)
                if f.chan == 0 and f.type == CHANNEL_FIN:
                    fs.send_fin(struct_u32(f.body))
            except TimeoutError:
                pass
            if p.poll(0):
                hup = clk.now()
                break
        if hup is None:
            rec.fail('stall: client not disconnected in %d s' % (3 * STALL))
        else:
            # last_progress lies in the burst (or just after it)
            rec.interval('stall', 'stall@%d' % int(b0), STALL,
                         hup - b1, hup - b0)
            rec.count('stalls')
        c.close()

    def sampler(self, d):
        self.samples = {}
        for at in SAMPLE_AT:
            self.clk.sleep_until(at)
            self.samples[at] = tlib.proc_sample(d.pid)

    # -- daemon A actor ----------------------------------------------------

    def idle_arrivals(self, d):
        clk, rec = self.clk, self.rec
        t, i = clk.now(), 0
        while True:
            gap = IDLE_GAPS[i % len(IDLE_GAPS)]
            if t + gap + 60 > self.end:
                break
            clk.sleep_until(t + gap)
            if i % 2 == 0:
                name = 'idle%d' % i
                fs = d.fake(name=name)
                try:
                    fs.connect()
                    clk.sleep_until(clk.now() + SLOW_WAIT)
                    self.handshake(fs)
                    path = d.wait_socket(fs.expected_socket_name(), W)
                    c = UnixClient(path)
                    ch = fs.wait_channel_new(60)
                    c.send(b'ping\n')
                    if fs.recv_channel_data(ch, 5, W) != b'ping\n':
                        rec.fail('%s: relay to the VP' % name)
                    fs.send_data(ch, b'pong\n')
                    if c.recv_exact(5, W) != b'pong\n':
                        rec.fail('%s: relay to the client' % name)
                    c.close()
                    rec.count('idle arrivals')
                except Exception as e:
                    rec.fail('%s after %d s idle: %r; log:\n%s'
                             % (name, gap, e, d.log()[-1500:]))
                fs.close()       # -Z 0: departs, the daemon idles again
                d.wait_socket_gone('%s-*' % name, W)
            else:
                self.no_handshake(d, clk.now(), 'idle-nohs%d' % i)
            t = clk.now()
            i += 1
        self.idle_cycles = i

    # -- the test ----------------------------------------------------------

    def test_six_hours(self):
        rec, clk = self.rec, self.clk
        b = Daemon(zombie=ZOMBIE, notimes=False, extra_args=[
            '-O', 'stall-timeout=%d' % STALL, '-O', 'buffer-high=256k',
            '-O', 'buffer-low=64k'])
        self.addCleanup(b.__exit__, None, None, None)
        a = Daemon(zombie=0, notimes=False, extra_args=['-O', 'select'])
        self.addCleanup(a.__exit__, None, None, None)
        b.wait_listening(60)
        a.wait_listening(60)

        actors = []

        def add(name, fn, *args):
            actors.append(tlib.Actor(rec, name, lambda: fn(*args)))
        for i in range(LONG_LIVED):
            add('long%d' % i, self.long_lived, b, i)
        for at in SILENT_AT:
            add('silent%d' % at, self.silent, b, at)
        for at in SLOW_AT:
            add('slow%d' % at, self.slow_handshake, b, at)
        for at in NOHS_AT:
            add('nohs%d' % at, self.no_handshake, b, at, 'nohs%d' % at)
        add('stall', self.stall_vp, b)
        add('sampler', self.sampler, b)
        add('idle', self.idle_arrivals, a)
        for t in actors:
            t.start()
        for t in actors:
            # bounded: DURATION of daemon time plus room, in daemon time
            t.join(max(self.end + 2 * HOUR - clk.now(), 1) / tlib.SPEED)
            if t.is_alive():
                rec.fail('%s did not finish' % t.name)
        daemon_hours = clk.now() / HOUR
        real_s = clk.real_elapsed()

        first, last = self.samples[SAMPLE_AT[0]], self.samples[SAMPLE_AT[1]]
        summary = {
            'speed': tlib.SPEED, 'slack_s': tlib.SLACK,
            'daemon_hours': round(daemon_hours, 2),
            'real_seconds': round(real_s, 1),
            'counts': rec.counts,
            'idle_cycles_daemon_A': self.idle_cycles,
            'timers': rec.summary(),
            'rss_kib_1h_6h': [first[0], last[0]],
            'fds_1h_6h': [first[1], last[1]],
        }
        self.check_zombies(b)
        rec.check_precision()
        summary['timers'] = rec.summary()
        print(tlib.dump(summary))
        if rec.failures:
            print('\n'.join(rec.failures[:20]))
        logb, loga = b.log(), a.log()
        self.assertEqual(logb.count('closing: accept timeout'), len(NOHS_AT),
                         'daemon B accept timeouts')
        self.assertEqual(logb.count('rx_abort: nothing received'),
                         len(SILENT_AT), 'daemon B rx_aborts')
        self.assertEqual(logb.count('local client stalled'), len(STALL_AT),
                         'daemon B stall disconnects')
        self.assertEqual(loga.count('closing: accept timeout'),
                         self.idle_cycles // 2, 'daemon A accept timeouts')
        self.assertTrue(a.alive() and b.alive())

        self.assertEqual(rec.failures, [], '\n'.join(rec.failures[:20]))
        self.assertGreaterEqual(daemon_hours, 6)
        self.assertEqual(first[1], last[1], 'fd count changed 1 h -> 6 h')
        if not tlib.is_asan():
            self.assertLessEqual(last[0], first[0] + 512,
                                 'RSS grew from 1 h to 6 h')
        for k in range(LONG_LIVED):
            self.assertIn('keepalives long%d' % k, rec.counts)

    def check_zombies(self, d):
        """Each zombie that had time to expire did, once, at -Z +/- 1."""
        log = d.log()
        born = {}
        for t, m in tlib.log_times(log, r'vp \d+ (\S+): zombie for \d+s'):
            born.setdefault(m.group(1), []).append(t)
        died = {}
        for t, m in tlib.log_times(log, r'vp \d+ (\S+): closing: zombie '
                                   r'expired'):
            died.setdefault(m.group(1), []).append(t)
        t0 = None
        for t, _ in tlib.log_times(log, r'.'):
            t0 = t
        expired = 0
        for name, ts in sorted(born.items()):
            if len(ts) != 1:
                self.rec.fail('%s: zombie %d times' % (name, len(ts)))
                continue
            got = died.get(name, [])
            due = ts[0] + ZOMBIE
            if due + 10 < t0 and len(got) != 1:
                self.rec.fail('%s: zombie expired %d times, due at %.0f'
                              % (name, len(got), due))
            elif got:
                self.rec.interval('zombie_expiry', name, ZOMBIE,
                                  got[0] - ts[0], got[0] - ts[0])
                expired += 1
        self.rec.count('zombie expiries', expired)
        if expired < len(SILENT_AT):
            self.rec.fail('only %d zombie expiries' % expired)


# Linux's value; Python does not export it
SO_TIMESTAMPNS = getattr(socket, 'SO_TIMESTAMPNS', 35)


def kernel_stamp(anc):
    """Real seconds of an SCM_TIMESTAMPNS control message, or None."""
    for level, typ, val in anc:
        if level == socket.SOL_SOCKET and typ == SO_TIMESTAMPNS and \
                len(val) >= 16:
            sec, nsec = struct.unpack('qq', val[:16])
            return sec + nsec / 1e9
    return None


def struct_u32(b):
    return int.from_bytes(bytes(b[:4]), 'big')


if __name__ == '__main__':
    tlib.reexec_accelerated()
    scr.main()
