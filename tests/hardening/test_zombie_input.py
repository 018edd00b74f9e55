#!/usr/bin/env python3
"""Hardening: input from local clients toward a VP is bounded by the VP's
unacked queue (-O unacked-max, issue 5).

A client writes 64 MiB toward a VP that cannot take it (a zombie, or a
live scamper that stopped reading) with -O unacked-max=4m: the daemon
stops reading the client, so the client's writes block and the daemon's
RSS stays bounded; once scamper resumes (MASTER_RES) or reads again and
ACKs, every byte arrives in order, exactly once.
"""

import os
import sys
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import hlib  # noqa: E402
from hlib import scr, MIB, Loop, NBScamper, NBUnix, NBMux  # noqa: E402

TOTAL = 64 * MIB
UNACKED_MAX = 4 * MIB
# what may be in flight beyond unacked-max: the daemon checks the limit
# before each read of up to 64 KiB (4 per loop), plus unix socket buffers
SLACK = 4 * MIB
RSS_BOUND = 32 * MIB


class Writer:
    """Writes TOTAL patterned bytes through a Conn, as -U bytes or as mux
    data frames on channel mux_chan, keeping little queued in user space.
    .offset is the payload offset handed to the socket layer."""

    def __init__(self, conn, pattern, mux_chan=None, chunk=64 * 1024):
        self.conn = conn
        self.pattern = pattern
        self.mux_chan = mux_chan
        self.chunk = chunk
        self.offset = 0
        self.busy = False
        conn.on_drain = self.fill

    def fill(self):
        if self.busy:
            return
        self.busy = True
        try:
            c = self.conn
            while c.out_len < 256 * 1024 and self.offset < TOTAL and \
                    c.sock is not None:
                n = min(self.chunk, TOTAL - self.offset)
                data = self.pattern.get(self.offset, n)
                if self.mux_chan is None:
                    c.queue(data)
                else:
                    c.send(self.mux_chan, data)
                self.offset += n
        finally:
            self.busy = False

    @property
    def done(self):
        return self.offset >= TOTAL and self.conn.out_len == 0


class ZombieInputTest(unittest.TestCase):

    def setUp(self):
        self.d = scr.Daemon(udir=True, mux=True, extra_args=[
            '-O', 'unacked-max=4m'])
        self.addCleanup(self.d.__exit__, None, None, None)
        self.d.wait_listening()
        self.loop = Loop()
        self.addCleanup(self.loop.close)
        self.t0 = time.monotonic()

    def note(self, msg):
        print('%7.2f %s' % (time.monotonic() - self.t0, msg))
        sys.stdout.flush()

    def run_case(self, client_kind, vp_down):
        d, loop = self.d, self.loop
        asan = hlib.is_asan()
        a = NBScamper(loop, d.port, name='vpz')
        self.addCleanup(a.close)
        a.start()
        loop.run_until(lambda: a.state == 'go', 10, 'GO')
        lost = []
        a.on_lost = lambda fs, why: lost.append(why)
        fins = []
        a.on_chan_fin = lambda fs, ch: (fins.append(ch), fs.send_fin(ch))

        def tick():
            a.tick()
            return False
        loop.every(1.0, tick)

        if client_kind == 'unix':
            client = NBUnix(loop, d.wait_socket('vpz-*'))
            mux_chan = None
        else:
            client = NBMux(loop, d.mux_path)
            loop.run_until(lambda: client.go and 'vpz' in client.by_name, 10,
                           'mux GO')
            mux_chan = 5
            client.open(client.by_name['vpz'], mux_chan)
        self.addCleanup(client.close)
        loop.run_until(lambda: len(a.open_chans) == 1, 10, 'CHANNEL_NEW')
        ch = min(a.open_chans)
        pat = hlib.Pattern(11)
        chk = hlib.StreamChecker(pat, TOTAL, 'data at scamper')
        a.on_chan_data = lambda fs, c, data: chk.feed(data)

        if vp_down == 'zombie':
            a.drop()
            d.wait_socket_gone('vpz-*', 10)
            self.note('VP is a zombie')
        else:
            a.pause_reading()
            self.note('fake scamper stopped reading')
        time.sleep(0.3)
        base = hlib.rss_kib(d.pid)
        sampler = hlib.Sampler(d.pid, 0.1)
        self.addCleanup(sampler.stop)

        w = Writer(client, pat, mux_chan)
        w.fill()
        last = [client.sent, time.monotonic()]

        def plateau():
            if client.sent != last[0]:
                last[0], last[1] = client.sent, time.monotonic()
            return time.monotonic() - last[1] >= 3.0
        loop.run_until(plateau, 30, 'the client writes to block')
        held = client.sent
        self.note('%s client blocked after writing %.2f MiB of %d MiB'
                  % (client_kind, held / MIB, TOTAL // MIB))
        self.assertLess(held, UNACKED_MAX + SLACK,
                        'the daemon kept reading the client past '
                        'unacked-max')
        self.assertGreater(held, UNACKED_MAX,
                           'the daemon stopped reading before unacked-max')
        self.assertIsNone(client.eof, 'client disconnected')
        loop.run_for(2)
        self.assertEqual(client.sent, held, 'client writes did not block')
        self.assertEqual(chk.got, 0)

        # scamper comes back: everything must arrive, in order, once
        if vp_down == 'zombie':
            lost.clear()
            a.start()
            loop.run_until(lambda: a.state == 'go', 10, 'MASTER_OK')
            self.assertEqual(a.resumes, 1)
        else:
            a.resume_reading()
        loop.run_until(lambda: chk.done and w.done, 120,
                       '%d MiB at scamper' % (TOTAL // MIB))
        self.note('all %d MiB arrived in order' % (TOTAL // MIB))
        # finish the channel; nothing more may arrive
        if client_kind == 'unix':
            client.sock.shutdown(hlib.socket.SHUT_WR)
            loop.run_until(lambda: fins == [ch] and client.eof is not None,
                           10, 'FIN to scamper, EOF to the client')
        else:
            closes = []
            client.on_close = lambda m, c: closes.append(c)
            a.send_fin(ch)
            loop.run_until(lambda: closes == [mux_chan], 10, 'CHANNEL_CLOSE')
        loop.run_until(lambda: not a.unacked, 10, 'ACKs')
        loop.run_for(0.5)
        self.assertEqual(chk.got, TOTAL)
        self.assertEqual(lost, [])
        self.assertEqual(a.late_data, 0)
        sampler.stop()
        peak = sampler.peak()
        self.note('daemon VmRSS: baseline %d KiB, peak %d KiB (+%.1f MiB)%s'
                  % (base, peak, (peak - base) / 1024.0,
                     ' [ASan: not asserted]' if asan else ''))
        if not asan:
            self.assertLess((peak - base) * 1024, RSS_BOUND)
        self.assertTrue(d.alive())
        hlib.check_no_sanitizer(self, d)

    def test_unix_client_to_zombie(self):
        self.run_case('unix', 'zombie')

    def test_mux_client_to_zombie(self):
        self.run_case('mux', 'zombie')

    def test_unix_client_to_scamper_not_reading(self):
        self.run_case('unix', 'not reading')


if __name__ == '__main__':
    scr.main()
