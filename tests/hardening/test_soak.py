#!/usr/bin/env python3
"""Hardening: soak with 2,000 fake VPs and churn (issue 5).

One selectors loop drives 2,000 fake scampers (from several 127.0.0.x
source addresses), four mux clients and many -U clients against one daemon
started with -Z 5.  For SC_SOAK_SECONDS (default 150; 20 with
SC_TESTS_QUICK=1) VPs drop and resume, get taken over by a new connection,
are left to expire and register again, half-open connections come and go,
and -U and mux clients open channels, exchange echoed data and close them
(cleanly with `done`, or abruptly).  Every channel's data is checked byte
for byte and every channel must end properly.

The daemon's open fd count and VmRSS are recorded at a baseline (after a
first, shorter round with 2,000 VPs whose zombies then expired) and again
after the churn, once every VP is gone: the fd count must be back to the
baseline exactly, and RSS within RSS_BOUND of it (not asserted under
ASan).
"""

import os
import random
import re
import socket
import sys
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import hlib  # noqa: E402
from hlib import scr, MIB, Loop, NBScamper, NBUnix, NBMux, Orphan  # noqa: E402,E501

N_VPS = int(os.environ.get('SC_SOAK_VPS', '2000'))
SOAK_SECONDS = float(os.environ.get('SC_SOAK_SECONDS',
                                    '20' if scr.QUICK else '150'))
WARMUP_SECONDS = 5 if scr.QUICK else 10
ZOMBIE = 5
N_MUX = 4
SOURCES = ['127.0.0.%d' % i for i in range(1, 9)]
RSS_BOUND = 16 * MIB
MAX_HANDSHAKING = 200

# churn rates, per second
RATE_BOUNCE = 8.0       # drop, resume (MASTER_RES) 0.2-2.5 s later
RATE_EXPIRE = 0.5       # drop, RES after the zombie expired -> REJ, NEW
RATE_TAKEOVER = 1.0     # RES on a new connection while the old one lives
RATE_HALFOPEN = 2.0     # TCP connections closed before any handshake
RATE_UNIX = 6.0         # -U channels opened
RATE_MUX = 6.0          # mux channels opened
P_ABORT = 0.1           # a -U channel closed abruptly instead of `done`
MUX_KILL_EVERY = 15.0   # a mux client disconnected with channels open


class Failure(AssertionError):
    pass


class Slot:
    """One VP position: a fake scamper that lives through generations
    (a new generation after each expiry)."""

    def __init__(self, soak, idx):
        self.soak = soak
        self.idx = idx
        self.gen = 0
        self.state = 'idle'    # connecting, up, bounce, expire, idle
        self.due = None        # when to reconnect (bounce / expire)
        self.active = set()    # uids of channels not yet settled
        self.fs = NBScamper(soak.loop, soak.d.port, name=self.name(),
                            src=SOURCES[idx % len(SOURCES)])
        self.fs.on_go = self.on_go
        self.fs.on_lost = self.on_lost
        self.fs.on_rej = self.on_rej
        self.fs.on_chan_fin = self.on_chan_fin
        self.lines = hlib.serve_lines(self.fs, self.answer)
        self.remote = {}       # remote channel id -> Chan

    def name(self):
        return 'sk%04d-g%d' % (self.idx, self.gen)

    def connect(self):
        self.state = 'connecting'
        self.soak.handshaking += 1
        self.fs.start()

    def on_go(self, fs):
        if self.state == 'expire':
            self.soak.fail('%s resumed after its zombie should have '
                           'expired' % self.name())
        if self.state in ('connecting', 'bounce'):
            self.soak.handshaking -= 1
        self.state = 'up'
        self.soak.slot_by_name[self.name()] = self

    def on_lost(self, fs, why):
        self.soak.fail('%s (%s): connection lost: %s' % (self.name(),
                                                         self.state, why))

    def on_rej(self, fs):
        if self.state != 'expire':
            self.soak.fail('%s (%s): MASTER_REJ' % (self.name(), self.state))
        self.soak.stats['expired'] += 1
        self.soak.handshaking -= 1
        self.soak.slot_by_name.pop(self.name(), None)
        self.gen += 1
        fs.name = self.name()
        self.remote.clear()
        self.lines.clear()
        self.connect()

    def answer(self, fs, ch, line):
        m = re.match(rb'(m|done) (\d+)', line)
        if not m:
            self.soak.fail('%s: unexpected line %r' % (self.name(),
                                                       line[:60]))
        c = self.soak.chans.get(int(m.group(2)))
        if c is None or (c.slot is not self):
            self.soak.fail('%s: line for unknown channel %r' % (
                self.name(), line[:60]))
        if self.remote.setdefault(ch, c) is not c:
            self.soak.fail('%s: two client channels on remote channel %d'
                           % (self.name(), ch))
        c.remote = ch
        fs.send_data(ch, line + b'\n')
        if m.group(1) == b'done':
            fs.send_fin(ch)

    def on_chan_fin(self, fs, ch):
        c = self.remote.get(ch)
        if c is not None:
            c.fin_at_vp = True
            self.soak.settle(c)
        fs.send_fin(ch)


class Chan:
    """One client channel (a -U connection or a mux channel) running a
    script of messages, then `done` (or an abrupt close)."""

    def __init__(self, soak, uid, slot, kind):
        self.soak = soak
        self.uid = uid
        self.slot = slot
        self.kind = kind
        self.sent = bytearray()
        self.recv = bytearray()
        self.left = random.randint(1, 6)
        self.next_t = time.monotonic()
        self.state = 'open'    # open, done, aborted, complete, settled
        self.remote = None
        self.fin_at_vp = False
        self.conn = None
        self.mux_id = None
        self.abort = kind == 'unix' and random.random() < P_ABORT

    def send(self, data):
        self.sent += data
        if self.kind == 'unix':
            self.conn.queue(data)
        else:
            self.conn.send(self.mux_id, data)

    def step(self, now):
        if self.state != 'open' or now < self.next_t:
            return
        if self.left > 0:
            self.left -= 1
            payload = os.urandom(random.randint(5, 1500)).hex().encode()
            self.send(b'm %d %d %s\n' % (self.uid, self.left, payload))
            self.next_t = now + random.uniform(0, 1.0)
        elif self.abort:
            if self.conn.out_len:
                return      # let our last message reach the daemon first
            self.state = 'aborted'
            self.conn.close()
            self.soak.stats['unix_aborted'] += 1
            self.soak.settle(self)
        else:
            self.send(b'done %d\n' % self.uid)
            self.state = 'done'

    def got(self, data):
        n = len(self.recv)
        if self.sent[n:n + len(data)] != data:
            self.soak.fail('channel %d (%s on %s): echo differs at byte %d'
                           % (self.uid, self.kind, self.slot.name(), n))
        self.recv += data

    def ended(self, why):
        """The daemon ended the channel (EOF on -U, CHANNEL_CLOSE)."""
        if self.state == 'aborted':
            return
        if self.state != 'done' or self.recv != self.sent:
            self.soak.fail('channel %d (%s on %s) ended early (%s, state %s,'
                           ' %d of %d bytes echoed)'
                           % (self.uid, self.kind, self.slot.name(), why,
                              self.state, len(self.recv), len(self.sent)))
        self.state = 'complete'
        self.soak.stats[self.kind + '_completed'] += 1
        self.soak.settle(self)


class Soak:

    def __init__(self, test, d):
        self.test = test
        self.d = d
        self.loop = Loop()
        self.error = None
        self.stats = dict.fromkeys(
            ['bounced', 'expired', 'takeovers', 'halfopen', 'unix_completed',
             'mux_completed', 'unix_aborted', 'mux_aborted', 'mux_killed'],
            0)
        self.handshaking = 0
        self.slots = [Slot(self, i) for i in range(N_VPS)]
        self.slot_by_name = {}
        self.chans = {}
        self.next_uid = 1
        self.orphans = []
        self.halfopen = []
        self.muxes = []
        self.mux_next_id = {}
        self.churning = False
        self.last_mux_kill = time.monotonic()
        self.loop.every(1.0, self.tick)

    def fail(self, msg):
        if self.error is None:
            self.error = msg
        raise Failure(msg)

    def check(self):
        if self.error is not None:
            raise Failure(self.error)

    def run_until(self, pred, timeout, what):
        self.loop.run_until(lambda: self.error is not None or pred(),
                            timeout, what)
        self.check()

    # -- VPs --------------------------------------------------------------

    def connect_all(self, timeout=120):
        """Start every idle slot (NEW), at most MAX_HANDSHAKING at once."""
        pending = [s for s in self.slots if s.state == 'idle']

        def pump():
            while pending and self.handshaking < MAX_HANDSHAKING:
                pending.pop().connect()
            return not pending and all(s.state == 'up' for s in self.slots)
        self.run_until(pump, timeout, 'all VPs up')

    def drop_all(self):
        for s in self.slots:
            if s.state in ('connecting', 'bounce', 'expire'):
                self.fail('drop_all: %s is %s' % (s.name(), s.state))
            s.fs.close()
            s.fs.forget()
            s.gen += 1
            s.fs.name = s.name()
            s.state = 'idle'
            s.remote.clear()
            s.lines.clear()
        self.slot_by_name.clear()

    def tick(self):
        now = time.monotonic()
        for s in self.slots:
            s.fs.tick(now)
            if s.due is not None and now >= s.due:
                s.due = None
                if s.state == 'bounce':
                    self.handshaking += 1
                s.fs.start()
        return self.error is not None

    def up_slots(self, k, pred=None):
        ups = [s for s in random.sample(self.slots, min(len(self.slots),
                                                        4 * k + 8))
               if s.state == 'up' and (pred is None or pred(s))]
        return ups[:k]

    def churn_step(self, dt):
        now = time.monotonic()

        def n(rate):
            x = rate * dt
            return int(x) + (1 if random.random() < x - int(x) else 0)

        for s in self.up_slots(n(RATE_BOUNCE)):
            s.fs.drop()
            s.state = 'bounce'
            s.due = now + random.uniform(0.2, 2.5)
            self.stats['bounced'] += 1
        for s in self.up_slots(n(RATE_EXPIRE), lambda s: not s.active):
            s.fs.drop()
            s.state = 'expire'
            s.due = now + ZOMBIE + random.uniform(2.5, 4)
            self.handshaking += 1
            self.slot_by_name.pop(s.name(), None)
        for s in self.up_slots(n(RATE_TAKEOVER)):
            old = s.fs.start(keep_old=True)
            s.state = 'bounce'
            self.handshaking += 1
            self.orphans.append(Orphan(self.loop, old))
            self.stats['takeovers'] += 1
        for _ in range(n(RATE_HALFOPEN)):
            src = random.choice(SOURCES)
            sock = hlib.tcp_connect_nb('127.0.0.1', self.d.port, src)
            self.halfopen.append((now + random.uniform(0, 1.0), sock))
            self.stats['halfopen'] += 1
        for s in self.up_slots(n(RATE_UNIX)):
            self.open_unix(s)
        for _ in range(n(RATE_MUX)):
            self.open_mux()
        if now - self.last_mux_kill >= MUX_KILL_EVERY:
            self.last_mux_kill = now
            self.kill_mux()

    def reap_halfopen(self):
        now = time.monotonic()
        keep = []
        for t, sock in self.halfopen:
            if now >= t:
                sock.close()
            else:
                keep.append((t, sock))
        self.halfopen = keep

    # -- channels ---------------------------------------------------------

    def new_chan(self, slot, kind):
        c = Chan(self, self.next_uid, slot, kind)
        self.next_uid += 1
        self.chans[c.uid] = c
        slot.active.add(c.uid)
        return c

    def settle(self, c):
        """A channel is settled when it completed, or when it was closed
        abruptly and its VP got the FIN (or had sent its own)."""
        if c.state == 'complete' or (c.state == 'aborted' and (
                c.fin_at_vp or (c.remote is not None and
                                c.remote in c.slot.fs.fin_sent))):
            c.state = 'settled'
            c.slot.active.discard(c.uid)

    def open_unix(self, s):
        path = os.path.join(self.d.udir, '%s-%s' % (s.name(), s.fs.peer))
        c = self.new_chan(s, 'unix')
        try:
            c.conn = NBUnix(self.loop, path)
        except OSError as e:
            self.fail('cannot connect to %s (VP up): %s' % (path, e))
        c.conn.on_bytes = lambda conn, data: c.got(data)
        c.conn.on_end = lambda conn, why: c.ended(why)
        c.step(time.monotonic())

    def add_mux(self):
        m = NBMux(self.loop, self.d.mux_path)
        m.chans = {}
        m.vps_by_chan = {}
        m.on_chan_data = self.mux_data
        m.on_close = self.mux_close
        m.on_depart = self.mux_depart
        m.on_end = lambda m, why: self.fail('mux client closed: %s' % why)
        self.muxes.append(m)
        self.mux_next_id[m] = 1
        return m

    def mux_data(self, m, ch, data):
        c = m.chans.get(ch)
        if c is None:
            self.fail('mux data on unknown channel %d' % ch)
        c.got(data)

    def mux_close(self, m, ch):
        c = m.chans.get(ch)
        if c is None:
            self.fail('CHANNEL_CLOSE for unknown mux channel %d' % ch)
        c.ended('CHANNEL_CLOSE')

    def mux_depart(self, m, vid):
        for c in m.chans.values():
            if c.state in ('open', 'done') and \
               m.vps_by_chan.get(c.mux_id) == vid:
                self.fail('VP %d departed with mux channel %d open'
                          % (vid, c.uid))

    def open_mux(self):
        ready = [m for m in self.muxes if m.go]
        if not ready:
            return
        m = random.choice(ready)
        names = [nm for nm in random.sample(list(m.by_name),
                                            min(len(m.by_name), 8))
                 if nm in self.slot_by_name and
                 self.slot_by_name[nm].state in ('up', 'bounce')]
        if not names:
            return
        s = self.slot_by_name[names[0]]
        c = self.new_chan(s, 'mux')
        c.conn = m
        c.mux_id = self.mux_next_id[m]
        self.mux_next_id[m] += 1
        m.chans[c.mux_id] = c
        m.vps_by_chan[c.mux_id] = m.by_name[names[0]]
        m.open(m.by_name[names[0]], c.mux_id)
        c.step(time.monotonic())

    def kill_mux(self):
        # a killed client's channels must have reached the daemon: their
        # FINs are matched to them by their first line
        ready = [m for m in self.muxes if m.out_len == 0]
        if not ready:
            return
        m = random.choice(ready)
        self.muxes.remove(m)
        m.on_end = None
        m.close()
        for c in m.chans.values():
            if c.state in ('open', 'done'):
                c.state = 'aborted'
                self.stats['mux_aborted'] += 1
                self.settle(c)
        self.stats['mux_killed'] += 1
        self.add_mux()

    def step_chans(self):
        now = time.monotonic()
        for c in list(self.chans.values()):
            if c.state == 'settled':
                del self.chans[c.uid]
                continue
            c.step(now)

    # -- phases -----------------------------------------------------------

    def run_churn(self, seconds):
        self.churning = True
        for _ in range(N_MUX - len(self.muxes)):
            self.add_mux()
        end = time.monotonic() + seconds
        last = time.monotonic()
        while time.monotonic() < end:
            self.loop.run_once(0.02)
            self.check()
            now = time.monotonic()
            if now - last >= 0.1:
                self.churn_step(now - last)
                last = now
            self.reap_halfopen()
            self.step_chans()
        self.churning = False
        # let every channel finish and every VP come back up
        def calm():
            self.reap_halfopen()
            self.step_chans()
            return not self.chans and not self.halfopen and \
                all(s.state == 'up' for s in self.slots)
        self.run_until(calm, 60, 'channels to finish and VPs to be up')
        self.run_until(lambda: all(o.eof is not None for o in self.orphans),
                       10, 'taken-over connections to be closed')
        del self.orphans[:]

    def close_muxes(self):
        for m in self.muxes:
            m.on_end = None
            m.close()
        del self.muxes[:]


class SoakTest(unittest.TestCase):

    def test_soak(self):
        nofile = hlib.raise_nofile()
        if nofile < 2 * N_VPS + 500:
            self.skipTest('RLIMIT_NOFILE %d too low' % nofile)
        d = scr.Daemon(udir=True, mux=True, zombie=ZOMBIE)
        self.addCleanup(d.__exit__, None, None, None)
        d.wait_listening()
        asan = hlib.is_asan()
        random.seed(int(os.environ.get('SC_SOAK_SEED', str(os.getpid()))))
        soak = Soak(self, d)
        self.addCleanup(soak.loop.close)
        t0 = time.monotonic()

        def note(msg):
            print('%7.1f %s' % (time.monotonic() - t0, msg))
            sys.stdout.flush()

        def settle_daemon(what):
            """Wait until every VP (now all zombies) expired."""
            want = start_fds
            scr.wait_until(lambda: hlib.fd_count(d.pid) <= want, 30,
                           what=what + ': fds back to %d (now %d)'
                           % (want, hlib.fd_count(d.pid)))
            time.sleep(ZOMBIE + 2)

        time.sleep(0.3)
        start_fds = hlib.fd_count(d.pid)
        note('daemon started: %d fds, %d KiB' % (start_fds,
                                                 hlib.rss_kib(d.pid)))
        soak.connect_all()
        note('%d VPs up: %d fds, %d KiB' % (N_VPS, hlib.fd_count(d.pid),
                                            hlib.rss_kib(d.pid)))
        soak.run_churn(WARMUP_SECONDS)
        soak.close_muxes()
        soak.drop_all()
        settle_daemon('warm-up')
        base_fds = hlib.fd_count(d.pid)
        base_rss = hlib.rss_kib(d.pid)
        note('baseline after a warm-up round: %d fds, %d KiB; %r'
             % (base_fds, base_rss, soak.stats))

        for k in soak.stats:
            soak.stats[k] = 0
        soak.connect_all()
        note('%d VPs up again: %d fds, %d KiB' % (
            N_VPS, hlib.fd_count(d.pid), hlib.rss_kib(d.pid)))
        silent = []
        if SOAK_SECONDS >= 40:
            for i in range(5):
                s = socket.create_connection(('127.0.0.1', d.port), 5)
                silent.append(s)
                self.addCleanup(s.close)
        t_silent = time.monotonic()
        soak.run_churn(SOAK_SECONDS)
        mid_fds, mid_rss = hlib.fd_count(d.pid), hlib.rss_kib(d.pid)
        note('churn over (%.0f s): %d fds, %d KiB; %r' % (
            SOAK_SECONDS, mid_fds, mid_rss, soak.stats))
        st = soak.stats
        self.assertGreater(st['unix_completed'], 0)
        self.assertGreater(st['mux_completed'], 0)
        self.assertGreater(st['bounced'], 0)
        self.assertGreater(st['takeovers'], 0)
        if SOAK_SECONDS >= 20:
            self.assertGreater(st['expired'], 0)
        for s in silent:
            s.settimeout(max(0.1, t_silent + 35 - time.monotonic()))
            try:
                self.assertEqual(s.recv(1), b'',
                                 'silent connection not closed after 30 s')
            except socket.timeout:
                self.fail('silent connection still open after 35 s')
            except ConnectionResetError:
                pass
        soak.close_muxes()
        soak.drop_all()
        settle_daemon('after the churn')
        end_fds = hlib.fd_count(d.pid)
        end_rss = hlib.rss_kib(d.pid)
        note('after the churn, all VPs expired: %d fds, %d KiB' %
             (end_fds, end_rss))
        print('SOAK_BASELINE fds %d rss_kib %d; SOAK_END fds %d rss_kib %d;'
              ' delta %+d KiB%s' % (base_fds, base_rss, end_fds, end_rss,
                                    end_rss - base_rss,
                                    ' (ASan: RSS not asserted)' if asan
                                    else ''))
        self.assertEqual(end_fds, base_fds,
                         'daemon fds: %s' % sorted(
                             os.readlink('/proc/%d/fd/%s' % (d.pid, f))
                             for f in os.listdir('/proc/%d/fd' % d.pid)))
        if not asan:
            self.assertLess((end_rss - base_rss) * 1024, RSS_BOUND)
        # the daemon still works and exits cleanly
        fs = d.fake(name='last')
        self.addCleanup(fs.close)
        fs.handshake()
        self.assertEqual(d.stop(), 0)
        hlib.check_no_sanitizer(self, d)


if __name__ == '__main__':
    scr.main()
