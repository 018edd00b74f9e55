#!/usr/bin/env python3
"""Hardening: chaos between scamper and the daemon (issue 5).

test_fake_scampers: fake scampers reach the daemon through a relay that,
for CHAOS_SECONDS (120; 20 and no long stalls with SC_TESTS_QUICK=1),
cuts connections (FIN or RST), delays and splits bytes, and stalls
connections silently past 60 s (several at once, so both sides' 60 s
rx_abort fire).  The fakes reconnect at once with MASTER_RES, as scamper
does after rx_abort.  Meanwhile -U and mux clients send numbered commands
on long-lived and short-lived channels and the fakes answer each with a
result line: every result must arrive exactly once and in order, every
command must reach scamper exactly once and in order, and every channel
must end properly (`done` -> `OK done` -> FIN -> EOF / CHANNEL_CLOSE).

test_real_scamper: the same with /usr/bin/scamper -R through the relay
(root only; skipped with SC_TESTS_QUICK=1): the relay is cut 2-3 times
while `ping -c 3 -i 1` commands run on a -U client that stays connected;
scamper resumes after 30-61 s each time, and every ping's result arrives
exactly once.
"""

import glob
import os
import random
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import hlib  # noqa: E402
from hlib import scr, Loop, NBScamper, NBUnix, NBMux, Relay  # noqa: E402

QUICK = scr.QUICK
CHAOS_SECONDS = 20 if QUICK else 120
N_VPS = 8
STALL_WAVES = [] if QUICK else [(5.0, 3), (42.0, 3)]   # (start, how many)
STALL_SECONDS = 66
CYCLE_EVERY = 2.5       # a cut or a delay burst
SHORT_EVERY = 1.5       # a short-lived channel


class Failure(AssertionError):
    pass


class CmdChan:
    """A client channel sending `cmd N UID` lines and checking that the
    `result N UID ...` answers arrive once each, in order; it ends with
    `done UID` -> `OK done UID` -> close.  n_cmds None: until told to
    finish."""

    def __init__(self, chaos, uid, vp, kind, n_cmds=None):
        self.chaos = chaos
        self.uid = uid
        self.vp = vp
        self.kind = kind
        self.n_cmds = n_cmds
        self.sent_n = 0
        self.recv_n = 0
        self.buf = bytearray()
        self.got_bytes = 0
        self.state = 'open'     # open, done, complete, refused
        self.done_ok = False
        self.next_t = time.monotonic()
        self.conn = None
        self.mux_id = None

    def __repr__(self):
        return 'chan %d (%s on %s, %s, %d/%d)' % (
            self.uid, self.kind, self.vp.name, self.state, self.recv_n,
            self.sent_n)

    def send(self, data):
        if self.kind == 'unix':
            self.conn.queue(data)
        else:
            self.conn.send(self.mux_id, data)

    def step(self, now):
        if self.state != 'open' or now < self.next_t:
            return
        more = (self.sent_n < self.n_cmds) if self.n_cmds is not None \
            else not self.chaos.finishing
        if more:
            self.sent_n += 1
            self.send(b'cmd %d %d\n' % (self.sent_n, self.uid))
            self.next_t = now + random.uniform(0.05, 0.5)
        else:
            self.send(b'done %d\n' % self.uid)
            self.state = 'done'

    def got(self, data):
        self.got_bytes += len(data)
        self.buf += data
        while True:
            i = self.buf.find(b'\n')
            if i < 0:
                return
            line = bytes(self.buf[:i])
            del self.buf[:i + 1]
            m = re.match(rb'result (\d+) (\d+) [0-9a-f]*$', line)
            if m:
                n, uid = int(m.group(1)), int(m.group(2))
                if uid != self.uid or n != self.recv_n + 1:
                    self.chaos.fail('%r: got result %d for %d' % (self, n,
                                                                  uid))
                if n > self.sent_n:
                    self.chaos.fail('%r: result %d before its command'
                                    % (self, n))
                self.recv_n = n
            elif line == b'OK done %d' % self.uid:
                if self.state != 'done' or self.done_ok:
                    self.chaos.fail('%r: unexpected OK done' % self)
                if self.recv_n != self.sent_n:
                    self.chaos.fail('%r: OK done with results missing'
                                    % self)
                self.done_ok = True
            else:
                self.chaos.fail('%r: unexpected line %r' % (self,
                                                            line[:80]))

    def ended(self, why):
        if self.done_ok and self.recv_n == self.sent_n and not self.buf:
            self.state = 'complete'
            return
        if self.kind == 'unix' and self.got_bytes == 0 and \
           self.uid not in self.chaos.seen_uids and self.n_cmds is not None:
            # connected just as the VP's socket was torn down (zombie or
            # resume): the kernel reset it; nothing of it reached scamper
            self.state = 'refused'
            self.chaos.stats['refused'] += 1
            return
        self.chaos.fail('%r ended early: %s' % (self, why))


class ChaosVP:
    def __init__(self, chaos, i):
        self.chaos = chaos
        self.name = 'cv%d' % i
        self.fs = NBScamper(chaos.loop, chaos.relay.port, name=self.name)
        self.fs.on_lost = self.on_lost
        self.fs.on_rej = lambda fs: chaos.fail('%s: MASTER_REJ' % self.name)
        self.fs.on_go = self.on_go
        self.last_cmd = {}
        self.used_chans = set()     # channels that carried commands
        hlib.serve_lines(self.fs, self.answer)
        self.ups = 0

    def on_go(self, fs):
        self.ups += 1

    def on_lost(self, fs, why):
        self.chaos.stats['lost'] += 1
        if why.startswith('rx_abort'):
            self.chaos.stats['fake_rx_abort'] += 1
        # scamper reconnects at once after rx_abort; after other failures
        # it waits 30-61 s (shortened here)
        self.chaos.loop.call_later(random.uniform(0, 1.0), self.reconnect)

    def reconnect(self):
        if self.fs.state == 'down':
            self.fs.start()

    def answer(self, fs, ch, line):
        self.used_chans.add(ch)
        m = re.match(rb'(cmd|done) (\d+)(?: (\d+))?$', line)
        if not m:
            self.chaos.fail('%s: unexpected line %r' % (self.name, line))
        if m.group(1) == b'done':
            uid = int(m.group(2))
            self.chaos.seen_uids.add(uid)
            fs.send_data(ch, b'OK done %d\n' % uid)
            fs.send_fin(ch)
            return
        n, uid = int(m.group(2)), int(m.group(3))
        self.chaos.seen_uids.add(uid)
        if n != self.last_cmd.get(uid, 0) + 1:
            self.chaos.fail('%s: command %d of channel %d after %d (lost '
                            'or repeated)' % (self.name, n, uid,
                                              self.last_cmd.get(uid, 0)))
        self.last_cmd[uid] = n
        size = random.choice([0, 10, 200, 2000, 2000, 40000])
        fs.send_data(ch, b'result %d %d %s\n' % (n, uid,
                                                 os.urandom(size // 2).hex()
                                                 .encode()))

    def pair(self):
        """The relay pair carrying this VP's current connection."""
        if self.fs.sock is None or self.fs.state != 'go':
            return None
        try:
            me = self.fs.sock.getsockname()
        except OSError:
            return None
        for p in self.chaos.relay.live():
            if p.down.sock is not None and p.client == me:
                return p
        return None


class Chaos:
    def __init__(self, test, d):
        self.test = test
        self.d = d
        self.loop = Loop()
        self.relay = Relay(self.loop, d.port)
        self.error = None
        self.finishing = False
        self.orphans = []
        self.stats = dict.fromkeys(['cut', 'rst', 'takeover', 'delay',
                                    'stall', 'lost',
                                    'fake_rx_abort', 'short', 'refused'], 0)
        self.seen_uids = set()
        self.vps = [ChaosVP(self, i) for i in range(N_VPS)]
        self.chans = []
        self.uid = 0
        self.muxes = []
        self.loop.every(1.0, self.tick)

    def fail(self, msg):
        if self.error is None:
            self.error = msg
        raise Failure(msg)

    def tick(self):
        now = time.monotonic()
        for v in self.vps:
            v.fs.tick(now)
        return False

    def run_until(self, pred, timeout, what):
        def p():
            self.step_chans()
            return pred()
        self.loop.run_until(p, timeout, what)

    def step_chans(self):
        now = time.monotonic()
        for c in self.chans:
            c.step(now)

    def next_uid(self):
        self.uid += 1
        return self.uid

    def socket_of(self, v):
        hits = glob.glob(os.path.join(glob.escape(self.d.udir),
                                      v.name + '-*'))
        return hits[0] if len(hits) == 1 else None

    def open_unix(self, v, n_cmds=None):
        path = self.socket_of(v)
        if path is None:
            return None
        c = CmdChan(self, self.next_uid(), v, 'unix', n_cmds)
        try:
            c.conn = NBUnix(self.loop, path)
        except OSError:
            return None     # torn down since the glob
        c.conn.on_bytes = lambda conn, data: c.got(data)
        c.conn.on_end = lambda conn, why: c.ended(why)
        self.chans.append(c)
        return c

    def open_mux(self, v, m, n_cmds=None):
        c = CmdChan(self, self.next_uid(), v, 'mux', n_cmds)
        c.conn = m
        c.mux_id = c.uid
        m.chans[c.mux_id] = c
        m.open(m.by_name[v.name], c.mux_id)
        self.chans.append(c)
        return c

    def add_mux(self):
        m = NBMux(self.loop, self.d.mux_path)
        m.chans = {}

        def data(m, ch, payload):
            m.chans[ch].got(payload)

        def close(m, ch):
            m.chans[ch].ended('CHANNEL_CLOSE')
        m.on_chan_data = data
        m.on_close = close
        m.on_depart = lambda m, vid: self.fail('VP %d departed' % vid)
        m.on_end = lambda m, why: self.fail('mux client closed: %s' % why)
        self.muxes.append(m)
        return m

    def chaos_action(self):
        v = random.choice(self.vps)
        p = v.pair()
        if p is None or p.mode != 'normal':
            return False
        r = random.random()
        if r < 0.3:
            p.close('cut by the test')
            self.stats['cut'] += 1
        elif r < 0.45:
            p.close('reset by the test', rst=True)
            self.stats['rst'] += 1
        elif r < 0.55:
            # scamper thinks its connection died and resumes on a new
            # one; the daemon still has the old one: a take-over
            old = v.fs.start(keep_old=True)
            self.orphans.append(hlib.Orphan(self.loop, old))
            self.stats['takeover'] += 1
        else:
            p.delay(random.uniform(1.0, 4.0))
            self.stats['delay'] += 1
        return True

    def short_channel(self):
        v = random.choice(self.vps)
        n = random.randint(1, 6)
        if random.random() < 0.5:
            c = self.open_unix(v, n)
        else:
            c = self.open_mux(v, random.choice(self.muxes), n)
        if c is not None:
            self.stats['short'] += 1


class ChaosTest(unittest.TestCase):

    def note(self, msg):
        print('%7.1f %s' % (time.monotonic() - self.t0, msg))
        sys.stdout.flush()

    def test_fake_scampers(self):
        self.t0 = time.monotonic()
        d = scr.Daemon(udir=True, mux=True)
        self.addCleanup(d.__exit__, None, None, None)
        d.wait_listening()
        random.seed(int(os.environ.get('SC_CHAOS_SEED', str(os.getpid()))))
        ch = Chaos(self, d)
        self.addCleanup(ch.loop.close)
        self.addCleanup(ch.relay.close)
        for v in ch.vps:
            v.fs.start()
        ch.run_until(lambda: all(v.fs.state == 'go' for v in ch.vps), 10,
                     'VPs up')
        for _ in range(2):
            m = ch.add_mux()
            ch.run_until(lambda: m.go and len(m.by_name) == N_VPS, 10,
                         'mux GO')
        for i, v in enumerate(ch.vps):
            ch.run_until(lambda: ch.socket_of(v), 10, 'socket of ' + v.name)
            self.assertIsNotNone(ch.open_unix(v))
            ch.open_mux(v, ch.muxes[i % 2])
        ch.run_until(lambda: all(len(v.fs.open_chans) == 2 for v in ch.vps),
                     10, 'long-lived channels')
        self.note('%d VPs, %d long-lived channels; chaos for %d s'
                  % (N_VPS, len(ch.chans), CHAOS_SECONDS))

        start = time.monotonic()
        waves = list(STALL_WAVES)
        stalled = set()
        next_cycle = start + 1.0
        next_short = start + 0.5
        cycles = 0
        while time.monotonic() - start < CHAOS_SECONDS:
            ch.loop.run_once(0.02)
            ch.step_chans()
            now = time.monotonic()
            if waves and now - start >= waves[0][0]:
                _, k = waves.pop(0)
                cand = [v for v in ch.vps if v.name not in stalled and
                        v.pair() is not None]
                for v in cand[:k]:
                    v.pair().stall(STALL_SECONDS)
                    stalled.add(v.name)
                    ch.stats['stall'] += 1
                    cycles += 1
                self.note('stalled %s' % sorted(stalled))
            if now >= next_cycle:
                if ch.chaos_action():
                    cycles += 1
                    next_cycle = now + random.uniform(0.5 * CYCLE_EVERY,
                                                      1.5 * CYCLE_EVERY)
            if now >= next_short:
                ch.short_channel()
                next_short = now + random.uniform(0.5 * SHORT_EVERY,
                                                  1.5 * SHORT_EVERY)
        self.note('chaos over: %d cycles; %r' % (cycles, ch.stats))

        # wait for every VP to be connected through a calm relay, then end
        # every channel
        def calm():
            return all(v.fs.state == 'go' and v.pair() is not None and
                       v.pair().mode == 'normal' and not v.pair().held
                       for v in ch.vps)

        def vp_states():
            return ['%s %s %s' % (v.name, v.fs.state, v.pair() and
                                  (v.pair().mode, len(v.pair().held)))
                    for v in ch.vps]
        try:
            ch.run_until(calm, 90, 'all VPs connected again')
        except TimeoutError:
            self.fail('VPs not all connected: %s\nrelay: %s\nlog:\n%s'
                      % (vp_states(), ch.relay.events[-20:],
                         hlib.daemon_log_tail(d, 60)))
        ch.run_until(lambda: all(o.eof for o in ch.orphans), 10,
                     'taken-over connections to be closed')
        self.note('all VPs connected through a calm relay; finishing')
        ch.finishing = True
        ch.run_until(lambda: all(c.state in ('complete', 'refused')
                                 for c in ch.chans), 60,
                     'every channel to finish: %r' % [
                         c for c in ch.chans
                         if c.state not in ('complete', 'refused')])
        resumes = sum(v.fs.resumes for v in ch.vps)
        n_cmds = sum(c.sent_n for c in ch.chans)
        log = d.log()
        takeovers = len(re.findall(r'taken over by', log))
        rx_aborts = len(re.findall(r'rx_abort: nothing received', log))
        self.note('%d channels (%d refused at connect), %d commands, all '
                  'answered once and in order; %d resumes (%d take-overs), '
                  '%d daemon rx_aborts, %d fake rx_aborts' % (
                      len(ch.chans), ch.stats['refused'], n_cmds, resumes,
                      takeovers, rx_aborts, ch.stats['fake_rx_abort']))
        for v in ch.vps:
            self.assertFalse(v.fs.open_chans, '%s has channels open: %r'
                             % (v.name, v.fs.open_chans))
            # a client refused at connect never became a channel: every
            # channel scamper saw carried its client's commands
            self.assertEqual(v.fs.chans_seen, v.used_chans, v.name)
            self.assertEqual(v.fs.rejects, 0)
        if not QUICK:
            self.assertGreaterEqual(cycles, 40)
            self.assertGreaterEqual(rx_aborts + ch.stats['fake_rx_abort'],
                                    1, 'no stall reached rx_abort')
        self.assertGreater(resumes, 0)
        self.assertGreater(n_cmds, 100)
        # nothing dangles in the daemon: only the relay's live VPs remain
        self.assertEqual(len(d.list_sockets()), N_VPS)
        self.assertTrue(d.alive())
        hlib.check_no_sanitizer(self, d)


# ---------------------------------------------------------------------------
# the real scamper
# ---------------------------------------------------------------------------

SCAMPER = os.environ.get('SCAMPER') or shutil.which('scamper') or ''
MON = 'chaos.test'
REAL_BUDGET = 280      # seconds, for the whole test
UID_BASE = 0xC0DE0000
# scamper runs pings to one destination one after the other (~3 s each):
# a slower pace keeps the backlog, and the drain after `done`, short
PING_EVERY = 4.0


class ScamperProc:
    """scamper -R in its own process group; stop() kills the group."""

    def __init__(self, port):
        self.tmp = tempfile.mkdtemp(prefix='scr-chaos-scamper-')
        self.out = open(os.path.join(self.tmp, 'out'), 'wb')
        self.proc = subprocess.Popen(
            [SCAMPER, '-R', '127.0.0.1:%d' % port, '-M', MON],
            stdin=subprocess.DEVNULL, stdout=self.out,
            stderr=subprocess.STDOUT, cwd=self.tmp, start_new_session=True)
        hlib.track_group(self.proc.pid)

    def output(self):
        with open(os.path.join(self.tmp, 'out'), 'rb') as f:
            return f.read().decode('utf-8', 'replace')

    def stop(self):
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.proc.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                self.proc.wait(3)
            except subprocess.TimeoutExpired:
                pass
        hlib.untrack_group(self.proc.pid)
        self.out.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


@unittest.skipIf(QUICK, 'takes minutes (SC_TESTS_QUICK=1)')
@unittest.skipUnless(SCAMPER and os.access(SCAMPER, os.X_OK),
                     'scamper not installed')
@unittest.skipUnless(os.geteuid() == 0, 'scamper needs root to ping')
class RealScamperChaosTest(unittest.TestCase):

    def note(self, msg):
        print('%7.1f %s' % (time.monotonic() - self.t0, msg))
        sys.stdout.flush()

    def test_real_scamper(self):
        self.t0 = time.monotonic()
        deadline = self.t0 + REAL_BUDGET
        d = scr.Daemon(udir=True)
        self.addCleanup(d.__exit__, None, None, None)
        d.wait_listening()
        loop = Loop()
        self.addCleanup(loop.close)
        relay = Relay(loop, d.port)
        self.addCleanup(relay.close)
        sc = ScamperProc(relay.port)
        self.addCleanup(sc.stop)

        def sockets():
            return glob.glob(os.path.join(glob.escape(d.udir), MON + '-*'))
        loop.run_until(lambda: len(sockets()) == 1 and relay.live(), 30,
                       'scamper to connect')
        c = NBUnix(loop, sockets()[0])
        self.addCleanup(c.close)
        stream = bytearray()
        c.on_bytes = lambda conn, data: stream.extend(data)
        loop.run_until(lambda: b'MORE\n' in stream, 20, 'MORE')
        self.note('scamper connected through the relay')

        uids = []

        def command():
            uid = UID_BASE + len(uids) + 1
            uids.append(uid)
            c.queue(b'ping -c 3 -i 1 -U %d 127.0.0.1\n' % uid)

        def run_commands(seconds):
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                command()
                loop.run_for(min(PING_EVERY,
                                 max(0.0, end - time.monotonic())))
                self.assertIsNone(c.eof, 'client disconnected')

        cuts = 0
        run_commands(8)
        while cuts < 3:
            if cuts >= 2 and time.monotonic() + 75 > deadline - 30:
                break
            accepted = relay.accepted
            self.assertEqual(len(relay.live()), 1)
            relay.live()[0].close('cut by the test')
            cuts += 1
            t_cut = time.monotonic()
            self.note('cut %d' % cuts)
            # commands keep coming while the VP is a zombie
            while relay.accepted == accepted or len(sockets()) != 1:
                if time.monotonic() - t_cut > 75:
                    self.fail('scamper did not resume within 75 s; '
                              'scamper said:\n%s\nlog:\n%s' % (
                                  sc.output(), hlib.daemon_log_tail(d)))
                command()
                loop.run_for(PING_EVERY)
                self.assertIsNone(c.eof, 'client disconnected')
                self.assertTrue(d.alive())
            gap = time.monotonic() - t_cut
            self.note('scamper resumed %.0f s after cut %d' % (gap, cuts))
            self.assertGreaterEqual(gap, 25)
            run_commands(8)
        c.queue(b'done\n')
        loop.run_until(lambda: c.eof is not None, 90, 'EOF after done')
        self.note('%d pings over %d cuts; EOF' % (len(uids), cuts))
        self.assertGreaterEqual(cuts, 2)
        items = scr.parse_control_stream(bytes(stream), strict=True)
        lines = [v for k, v in items if k == 'line']
        self.assertFalse([ln for ln in lines if ln.startswith('ERR')], lines)
        oks = [ln for ln in lines if re.match(r'OK id-\d+$', ln)]
        self.assertEqual(len(oks), len(uids), lines)
        self.assertEqual(len(set(oks)), len(oks), 'a command was accepted '
                         'twice: %r' % oks)
        blocks = [v for k, v in items if k == 'data']
        pings = [body for b in blocks for t, body in scr.warts_records(b.data)
                 if t == scr.WARTS_PING]
        self.assertEqual(len(pings), len(uids))
        for uid in uids:
            n = sum(1 for p in pings if struct.pack('>I', uid) in p)
            self.assertEqual(n, 1, 'ping -U %d: %d results' % (uid, n))
        types = [t for b in blocks for t in b.types]
        self.assertEqual(types[-1], scr.WARTS_CYCLE_STOP)
        self.assertEqual(d.list_sockets(), [os.path.basename(sockets()[0])])
        self.assertTrue(d.alive())
        hlib.check_no_sanitizer(self, d)


if __name__ == '__main__':
    scr.main()
