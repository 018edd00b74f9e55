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
        try:
            loop.run_until(lambda: chk.done and w.done, 60,
                           '%d MiB at scamper' % (TOTAL // MIB))
        except TimeoutError:
            self.fail('stuck after the resume: scamper got %d bytes, the '
                      'client handed %d to its socket (%d accepted, %d '
                      'queued), %d frames unacked by scamper; log:\n%s'
                      % (chk.got, w.offset, client.sent, client.out_len,
                         len(a.unacked), hlib.daemon_log_tail(d, 30)))
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

    def acks_lost_case(self, client_kind):
        """scamper receives the client's data but its ACKs never reach
        the daemon, so the unacked queue fills and the client is paused;
        then scamper resumes with a MASTER_RES saying it has everything.
        The daemon drops the whole queue: the client must be read again."""
        d, loop = self.d, self.loop
        a = NBScamper(loop, d.port, name='vpz')
        self.addCleanup(a.close)
        a.start()
        loop.run_until(lambda: a.state == 'go', 10, 'GO')
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
        loop.run_until(lambda: len(a.open_chans) == 1 and not a.unacked and
                       a.rcv_nxt == 1, 10, 'CHANNEL_NEW')
        pat = hlib.Pattern(12)
        chk = hlib.StreamChecker(pat, TOTAL, 'data at scamper')
        a.on_chan_data = lambda fs, c, data: chk.feed(data)
        a.ack_data = False
        w = Writer(client, pat, mux_chan)
        w.fill()

        # The daemon's guarantee: it stops reading the client only once
        # its unacked queue -- serialized frames, headers included --
        # passes unacked-max.  How much payload that is depends on read
        # and frame sizes (timing), so count what scamper holds unACKed
        # the way the daemon does: payload plus a header per data frame.
        def queued():
            return chk.got + scr.HDR_LEN * a.acks_withheld
        loop.run_until(lambda: queued() > UNACKED_MAX, 30,
                       'the unacked queue to pass unacked-max')
        last = [client.sent, time.monotonic()]

        def plateau():
            if client.sent != last[0]:
                last[0], last[1] = client.sent, time.monotonic()
            return time.monotonic() - last[1] >= 2.0
        loop.run_until(plateau, 30, 'the client writes to block')
        self.note('%s client blocked after %.2f MiB; scamper has %.2f MiB '
                  'in %d frames, none of it ACKed'
                  % (client_kind, client.sent / MIB, chk.got / MIB,
                     a.acks_withheld))
        self.assertGreater(queued(), UNACKED_MAX)
        self.assertLess(client.sent, UNACKED_MAX + SLACK)
        self.assertLess(queued(), UNACKED_MAX + SLACK)
        a.ack_data = True
        a.drop()
        a.start()                      # RES: rcv_nxt covers all of it
        loop.run_until(lambda: a.state == 'go', 10, 'MASTER_OK')
        try:
            loop.run_until(lambda: chk.done and w.done, 60,
                           '%d MiB at scamper' % (TOTAL // MIB))
        except TimeoutError:
            self.fail('the client was not read again after the resume '
                      'emptied the unacked queue: scamper has %d bytes, '
                      'the client wrote %d; log:\n%s'
                      % (chk.got, client.sent, hlib.daemon_log_tail(d, 20)))
        loop.run_until(lambda: not a.unacked, 10, 'ACKs')
        self.assertEqual(chk.got, TOTAL)
        self.assertTrue(d.alive())
        hlib.check_no_sanitizer(self, d)

    def test_unix_client_acks_lost_then_resume(self):
        self.acks_lost_case('unix')

    def test_mux_client_acks_lost_then_resume(self):
        self.acks_lost_case('mux')

    def pause_race_case(self, client_kind, cycles=8):
        """The read that takes the unacked queue past unacked-max is
        followed, before the client is read again, by ACKs that empty the
        queue.  The client must still be read afterwards (a pause decided
        on the old state must not stick once the queue has room)."""
        d, loop = self.d, self.loop
        a = NBScamper(loop, d.port, name='vpz')
        self.addCleanup(a.close)
        a.start()
        loop.run_until(lambda: a.state == 'go', 10, 'GO')
        if client_kind == 'unix':
            client = NBUnix(loop, d.wait_socket('vpz-*'))

            def send(data):
                client.queue(data)
        else:
            client = NBMux(loop, d.mux_path)
            loop.run_until(lambda: client.go and 'vpz' in client.by_name, 10,
                           'mux GO')
            client.open(client.by_name['vpz'], 1)

            def send(data):
                client.send(1, data)
        self.addCleanup(client.close)
        loop.run_until(lambda: len(a.open_chans) == 1 and not a.unacked, 10,
                       'CHANNEL_NEW')
        got = [0]
        a.on_chan_data = lambda fs, c, data: got.__setitem__(
            0, got[0] + len(data))
        a.ack_data = 'hold'
        acked = written = 0
        for cycle in range(cycles):
            # fill the daemon's unacked queue to just under the limit
            while got[0] - acked < UNACKED_MAX - 96 * 1024:
                send(b'f' * 65536)
                written += 65536
                loop.run_until(lambda: got[0] == written, 10, 'fill')
            # one read takes it past the limit (and the client may then be
            # paused with some of this unread) ...
            send(b'x' * 100000)
            written += 100000
            last = [got[0], time.monotonic()]

            def quiet():
                if got[0] != last[0]:
                    last[0], last[1] = got[0], time.monotonic()
                return time.monotonic() - last[1] >= 0.3
            loop.run_until(quiet, 10, 'the crossing data')
            self.assertGreater(got[0] - acked, UNACKED_MAX - 4096)
            # ... then the ACKs for everything arrive, then more data
            a.release_acks()
            acked = got[0]
            loop.run_for(0.05)
            send(b'y' * 65536)
            written += 65536
            try:
                loop.run_until(lambda: got[0] == written, 10,
                               'data after the ACKs')
            except TimeoutError:
                self.fail('cycle %d: the %s client is no longer read although '
                          'every frame was ACKed (scamper got %d of %d bytes)'
                          '; log:\n%s' % (cycle, client_kind, got[0],
                                          written,
                                          hlib.daemon_log_tail(d, 10)))
            a.release_acks()
            acked = got[0]
        self.assertTrue(d.alive())
        hlib.check_no_sanitizer(self, d)

    def test_unix_client_pause_race(self):
        self.pause_race_case('unix')

    def test_mux_client_pause_race(self):
        self.pause_race_case('mux')

    def test_unix_client_to_zombie(self):
        self.run_case('unix', 'zombie')

    def test_mux_client_to_zombie(self):
        self.run_case('mux', 'zombie')

    def test_unix_client_to_scamper_not_reading(self):
        self.run_case('unix', 'not reading')


if __name__ == '__main__':
    scr.main()
