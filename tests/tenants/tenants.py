"""Two tenants on one VP (issue 18), shared by the tests in this directory
and by bench/tenants.

A Scene is one daemon, one fake VP (hlib.NBScamper) and two local
consumers of it, each a -U client or a mux client:

* A opens a channel and stops reading; the VP streams `total` patterned
  bytes toward it (stream_to_a(); the stream stops early if the daemon
  closes A's channel);
* B runs commands one at a time on its own channel ("cmd N" -> the VP
  answers "done N"); b_done counts the answers, checked in order.

Everything runs in one hlib.Loop in the calling thread.
"""

import os
import re
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, '..', 'hardening'))
import hlib  # noqa: E402
from hlib import scr, MIB, Loop, NBScamper, NBUnix, NBMux  # noqa: E402

FRAME = 65535


class Scene:

    def __init__(self, kind_a, kind_b, opts=(), spool=None, total=0,
                 binary=None, metrics=True, notimes=None):
        self.loop = Loop()
        self.cleanups = [self.loop.close]
        args = []
        if spool is not None:
            args += ['-O', 'spool-dir=' + spool]
        for o in opts:
            args += ['-O', o]
        env_binary = None
        if binary is not None:
            env_binary = scr.SC_REMOTED
            scr.SC_REMOTED = binary
        try:
            self.d = scr.Daemon(udir=True, mux='mux' in (kind_a, kind_b),
                                extra_args=args, notimes=notimes,
                                metrics=metrics)
        finally:
            if env_binary is not None:
                scr.SC_REMOTED = env_binary
        self.cleanups.append(lambda: self.d.__exit__(None, None, None))
        self.d.wait_listening()
        self.total = total
        self.pattern = hlib.Pattern(18)
        self.chk = hlib.StreamChecker(self.pattern, total, 'A stream')
        self.sent = 0            # bytes of A's stream the VP has queued
        self.a_end = None
        self.b_done = 0          # commands B completed
        self.b_sent = 0
        self.b_wait_max = 0.0    # B's longest wait for an answer, seconds
        self.b_t0 = None
        self.b_running = False
        self.b_limit = None
        self.b_buf = bytearray()

        fs = self.fs = NBScamper(self.loop, self.d.port, name='vp')
        self.cleanups.append(fs.close)
        self.lost = []
        fs.on_lost = lambda fs, why: self.lost.append(why)
        fs.start()
        self.loop.run_until(lambda: fs.state == 'go', 10, 'VP GO')
        self.loop.every(1.0, lambda: fs.tick() or False)
        self.vp_buf = {}
        fs.on_chan_data = self._vp_data

        self.a, self.ch_a, self.a_mux = self._consumer(kind_a, 1)
        self.b, self.ch_b, self.b_mux = self._consumer(kind_b, 2)
        self.a.pause_reading()
        if self.a_mux:
            self.a.on_chan_data = lambda m, ch, data: self.chk.feed(data)
        else:
            self.a.on_bytes = lambda c, data: self.chk.feed(data)
        self.a.on_end = self._a_end
        if self.b_mux:
            self.b.on_chan_data = lambda m, ch, data: self._b_data(data)
        else:
            self.b.on_bytes = lambda c, data: self._b_data(data)
        self.b.on_end = self._b_end
        fs.on_drain = self._fill

    def _consumer(self, kind, mux_chan):
        fs = self.fs
        before = set(fs.chans_seen) | set(fs.open_chans)
        if kind == 'unix':
            c = NBUnix(self.loop, self.d.wait_socket('vp-*'))
            mux = False
        else:
            c = NBMux(self.loop, self.d.mux_path)
            self.loop.run_until(lambda: c.go and 'vp' in c.by_name, 10,
                                'mux GO')
            c.open(c.by_name['vp'], mux_chan)
            mux = True
        self.cleanups.append(c.close)
        self.loop.run_until(lambda: set(fs.open_chans) - before, 10,
                            '%s channel' % kind)
        ch = min(set(fs.open_chans) - before)
        return c, ch, mux

    def _a_end(self, c, why):
        self.a_end = why

    def _b_end(self, c, why):
        raise AssertionError('B lost its connection: %s' % why)

    # -- the VP ----------------------------------------------------------

    def _vp_data(self, fs, ch, data):
        if ch != self.ch_b:
            raise AssertionError('VP: data on channel %d' % ch)
        b = self.vp_buf.setdefault(ch, bytearray())
        b += data
        while True:
            i = b.find(b'\n')
            if i < 0:
                break
            m = re.match(rb'cmd (\d+)$', bytes(b[:i]))
            if m is None:
                raise AssertionError('VP: bad command %r' % bytes(b[:i]))
            del b[:i + 1]
            fs.send_data(ch, b'done ' + m.group(1) + b'\n')

    def _fill(self):
        fs = self.fs
        if getattr(self, '_filling', False):
            return
        self._filling = True
        frames = 0
        try:
            # at most 1 MiB per call: queueing flushes, and a daemon that
            # keeps up would otherwise keep us here until the whole stream
            # is sent, with B's commands unread (the loop calls us again
            # on the next writable event)
            while (fs.out_len < 2 * MIB and self.sent < self.total and
                   fs.state == 'go' and self.ch_a in fs.open_chans and
                   frames < 16):
                frames += 1
                n = min(FRAME, self.total - self.sent)
                fs.send_reliable(self.ch_a, self.pattern.get(self.sent, n))
                self.sent += n
        finally:
            self._filling = False
        if frames == 16:
            self.loop.call_later(0, self._fill)

    def stream_to_a(self):
        self._fill()

    @property
    def vp_taken(self):
        """The daemon has read and ACKed everything the VP sent."""
        return not self.fs.unacked and self.fs.out_len == 0

    # -- B ---------------------------------------------------------------

    def _b_send(self):
        self.b_sent += 1
        self.b_t0 = time.monotonic()
        data = b'cmd %d\n' % self.b_sent
        if self.b_mux:
            self.b.send(2, data)
        else:
            self.b.queue(data)

    def _b_data(self, data):
        self.b_buf += data
        while True:
            i = self.b_buf.find(b'\n')
            if i < 0:
                return
            line = bytes(self.b_buf[:i])
            del self.b_buf[:i + 1]
            if line != b'done %d' % (self.b_done + 1):
                raise AssertionError('B: %r out of order (expected done '
                                     '%d)' % (line, self.b_done + 1))
            self.b_done += 1
            self.b_wait_max = max(self.b_wait_max,
                                  time.monotonic() - self.b_t0)
            if self.b_running and (self.b_limit is None or
                                   self.b_sent < self.b_limit):
                self._b_send()

    def b_start(self, limit=None):
        """B sends commands one at a time (up to `limit` in all)."""
        self.b_limit = limit
        self.b_running = True
        if self.b_sent == self.b_done:
            self._b_send()

    def b_stop(self):
        self.b_running = False

    def b_commands(self, n, timeout, what='B commands'):
        """Run until B has completed n more commands."""
        goal = self.b_done + n
        self.b_start(goal)
        self.loop.run_until(lambda: self.b_done >= goal, timeout,
                            '%s (%d of %d done)' % (what, self.b_done, goal))
        self.b_stop()

    # -- the daemon --------------------------------------------------------

    def wait_log(self, regex, timeout):
        """Run the loop until the daemon's log matches regex."""
        rx = re.compile(regex, re.M)
        self.loop.run_until(lambda: rx.search(self.d.log()) is not None,
                            timeout, 'log line %r' % regex)

    def metric(self, name):
        return scr.prom_value(self.d.scrape(), name) or 0

    def consumer(self, ch):
        for v in self.d.vps():
            for c in v.get('consumers', ()):
                if c['channel'] == ch:
                    return c
        return None

    def spool_fds(self, spool):
        """Spool files the daemon holds open: fds into the spool dir."""
        n = 0
        fd_dir = '/proc/%d/fd' % self.d.pid
        real = os.path.realpath(spool)
        for fd in os.listdir(fd_dir):
            try:
                t = os.readlink(os.path.join(fd_dir, fd))
            except OSError:
                continue
            if t.startswith(real + '/'):
                n += 1
        return n

    def stop_clean(self, test):
        """Stop the daemon: exit status 0, no sanitizer report (leaks
        are reported at exit)."""
        rc = self.d.stop()
        hlib.check_no_sanitizer(test, self.d)
        test.assertEqual(rc, 0)

    def close(self):
        for fn in reversed(self.cleanups):
            try:
                fn()
            except Exception:  # noqa: BLE001 -- best effort teardown
                pass
