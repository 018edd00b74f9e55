#!/usr/bin/env python3
"""Tenant isolation with bounded memory (issue 18).

Two tenants on one VP, A and B (both -U, both mux, and mixed).  A opens a
channel and stops reading while the VP streams toward it (256 MiB in one
case per run, smaller in the others and under ASan / SC_TESTS_QUICK).
With -O spool-dir the daemon keeps reading the VP: every byte of the
stream is taken (ACKed) while A reads nothing, and then B completes its N
commands (without spool-dir, the daemon stops reading the VP at
buffer-high and neither happens).  The daemon's RSS stays bounded and the
spool holds the backlog; when A resumes it receives every byte in order
and the spool file is closed.  A consumer that disconnects frees its spool
at once.  The caps: at spool-max (or spool-total) the daemon falls back to
pausing the VP (log line, cap-hit metric, /vps "full"), and the consumer
is cut after stall-timeout seconds without progress, after which B's
commands complete again.  A consumer that drains, but slower than its VP
produces, never pauses the VP.  A live upgrade reads the spool back into
A's queue, and the successor delivers it.
"""

import os
import shutil
import sys
import tempfile
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tenants  # noqa: E402
from tenants import hlib, scr, MIB  # noqa: E402

ASAN = hlib.is_asan()
SMALL = ASAN or scr.QUICK
BIG = 32 * MIB if SMALL else 256 * MIB   # the case
MID = 32 * MIB if SMALL else 64 * MIB
N_CMDS = 200
RSS_BOUND = 48 * MIB     # daemon RSS growth while A is stalled (no ASan)
BUF_HIGH = 4 * MIB       # the default buffer-high


class TenantsTest(unittest.TestCase):

    def setUp(self):
        self.spool = tempfile.mkdtemp(prefix='scr-spool-')
        self.addCleanup(shutil.rmtree, self.spool, True)

    def scene(self, kind_a, kind_b, total, opts=(), spool=True):
        s = tenants.Scene(kind_a, kind_b, opts=opts, total=total,
                          spool=self.spool if spool else None)
        self.addCleanup(s.close)
        return s

    def isolation(self, kind_a, kind_b, total):
        s = self.scene(kind_a, kind_b, total)
        loop = s.loop
        base = hlib.rss_kib(s.d.pid)
        sampler = hlib.Sampler(s.d.pid)
        self.addCleanup(sampler.stop)

        # B works while the stream toward A is being taken
        s.b_start()
        s.stream_to_a()
        loop.run_until(lambda: s.sent == total and s.vp_taken,
                       120 if not ASAN else 300,
                       'the daemon to take all %d MiB for A (%d sent, '
                       'B done %d)' % (total // MIB, s.sent, s.b_done))
        s.b_stop()
        loop.run_until(lambda: s.b_sent == s.b_done, 10, 'B idle')
        self.assertEqual(s.chk.got, 0, 'A read nothing')
        self.assertIsNone(s.a_end)

        # ... and A's backlog sits in the spool, not in memory
        c = s.consumer(s.ch_a)
        self.assertIsNotNone(c)
        self.assertFalse(c['full'])
        # all of it, less what the socket took (plus mux frame headers)
        backlog = c['memory_bytes'] + c['spool_bytes']
        self.assertLessEqual(backlog, total + 8 * (total // 65535 + 1))
        self.assertGreaterEqual(backlog, total - 4 * MIB)
        self.assertGreaterEqual(c['spool_bytes'], total - BUF_HIGH - MIB)
        self.assertLessEqual(c['memory_bytes'], BUF_HIGH + MIB)
        self.assertEqual(s.metric('sc_remoted_spool_bytes'),
                         c['spool_bytes'])
        self.assertEqual(s.metric('sc_remoted_spool_files'), 1)
        self.assertEqual(s.spool_fds(self.spool), 1)
        self.assertEqual(os.listdir(self.spool), [],
                         'the spool file has no name (cannot outlive us)')
        self.assertEqual(s.metric('sc_remoted_backpressure_pauses_total'),
                         0)

        # B completes its N commands while A's backlog stays unread
        s.b_commands(N_CMDS, 60)
        print('B completed its %d commands while A had %d MiB unread; '
              'B worst wait %.1f ms' % (N_CMDS, total // MIB,
                                        s.b_wait_max * 1000))
        self.assertEqual(s.chk.got, 0)
        peak = sampler.peak()
        print('daemon RSS: %d KiB before, peak %d KiB' % (base, peak))
        if not ASAN:
            self.assertLess((peak - base) * 1024, RSS_BOUND)

        # A resumes: every byte, in order; the spool file is closed
        s.a.resume_reading()
        loop.run_until(lambda: s.chk.done, 120 if not ASAN else 300,
                       'A to read its stream (%d of %d)'
                       % (s.chk.got, total))
        loop.run_until(lambda: s.metric('sc_remoted_spool_files') == 0, 10,
                       'spool file closed')
        self.assertEqual(s.metric('sc_remoted_spool_bytes'), 0)
        self.assertEqual(s.spool_fds(self.spool), 0)
        self.assertGreaterEqual(
            s.metric('sc_remoted_spool_written_bytes_total'),
            c['spool_bytes'])
        self.assertEqual(s.lost, [])
        s.b_commands(10, 30, 'B after A resumed')
        s.stop_clean(self)

    def test_unix_unix_256mib(self):
        self.isolation('unix', 'unix', BIG)

    def test_mux_mux(self):
        self.isolation('mux', 'mux', MID)

    def test_unix_mux(self):
        self.isolation('unix', 'mux', MID)

    def test_mux_unix(self):
        self.isolation('mux', 'unix', MID)

    def test_disconnect_frees_spool(self):
        s = self.scene('mux', 'unix', MID)
        s.stream_to_a()
        s.loop.run_until(lambda: s.sent == MID and s.vp_taken, 120,
                         'the daemon to take the stream')
        self.assertEqual(s.spool_fds(self.spool), 1)
        self.assertGreater(s.metric('sc_remoted_spool_bytes'), 0)
        s.a.close()
        s.loop.run_until(lambda: s.spool_fds(self.spool) == 0, 10,
                         'the spool file to be closed')
        self.assertEqual(s.metric('sc_remoted_spool_bytes'), 0)
        self.assertEqual(s.metric('sc_remoted_spool_files'), 0)
        s.b_commands(N_CMDS, 60)
        s.stop_clean(self)

    def test_without_spool_dir_pauses(self):
        """Memory only (no spool-dir): past buffer-high the VP is paused,
        for B too, as documented; B works again once A drains."""
        s = self.scene('unix', 'mux', MID, spool=False)
        s.stream_to_a()
        s.loop.run_until(
            lambda: s.metric('sc_remoted_backpressure_pauses_total') >= 1,
            60, 'the VP to be paused')
        self.assertLess(s.sent - s.fs.out_len, MID)
        c = s.consumer(s.ch_a)
        self.assertTrue(c['full'])
        self.assertEqual(c['spool_bytes'], 0)
        s.a.resume_reading()
        s.loop.run_until(lambda: s.chk.done, 120, 'A to read its stream')
        s.b_commands(N_CMDS, 60)

    def cap(self, opt, what):
        s = self.scene('unix', 'mux', MID,
                       opts=(opt, 'stall-timeout=600'))
        s.stream_to_a()
        s.wait_log(r'local client on channel \d+: %s reached' % what, 60)
        s.loop.run_until(
            lambda: s.metric('sc_remoted_backpressure_pauses_total') >= 1,
            30, 'the VP to be paused')
        self.assertEqual(s.metric('sc_remoted_spool_cap_hits_total'), 1)
        c = s.consumer(s.ch_a)
        self.assertTrue(c['full'])
        self.assertLessEqual(c['spool_bytes'], 16 * MIB)
        self.assertFalse(s.vp_taken)
        # resuming: every byte in order, then B again
        s.a.resume_reading()
        s.loop.run_until(lambda: s.chk.done, 120, 'A to read its stream')
        s.b_commands(N_CMDS, 60)
        self.assertEqual(s.metric('sc_remoted_spool_files'), 0)
        s.stop_clean(self)

    def test_cap_spool_max(self):
        self.cap('spool-max=16m', 'spool-max')

    def test_cap_spool_total(self):
        self.cap('spool-total=16m', 'spool-total')

    def test_cap_then_stall_timeout_cuts_a(self):
        """Policy: the consumer at its cap is cut after stall-timeout
        seconds without progress; then B's commands complete."""
        s = self.scene('mux', 'unix', MID,
                       opts=('spool-max=8m', 'stall-timeout=2'))
        s.stream_to_a()
        s.wait_log(r'mux client \d+: spool-max reached', 60)
        s.loop.run_until(lambda: s.ch_a in s.fs.fin_rcvd, 30,
                         "A to be cut (the VP gets A's channel FIN)")
        s.wait_log(r'mux client \d+ stalled: \d+ bytes unread', 5)
        self.assertEqual(s.metric('sc_remoted_stall_disconnects_total'), 1)
        s.loop.run_until(lambda: s.spool_fds(self.spool) == 0, 10,
                         'the spool file to be closed')
        s.b_commands(N_CMDS, 60)
        self.assertEqual(s.metric('sc_remoted_spool_bytes'), 0)
        s.stop_clean(self)

    def test_slow_but_progressing_consumer(self):
        """Fairness: A drains, but slower than its VP produces (a burst of
        reading every 0.2 s); within its caps it never pauses the VP, so
        B's commands complete while A is still behind."""
        s = self.scene('mux', 'unix', MID)
        slow = {'on': True, 'mark': 0}

        def on_a(m, ch, data):     # at most ~256 KiB per nibble
            s.chk.feed(data)
            if slow['on'] and s.chk.got >= slow['mark']:
                s.a.pause_reading()
        s.a.on_chan_data = on_a

        def nibble():
            if not slow['on']:
                return True
            slow['mark'] = s.chk.got + 256 * 1024
            s.a.resume_reading()
            return False
        s.loop.every(0.2, nibble)
        s.stream_to_a()
        s.loop.run_until(lambda: s.sent == MID and s.vp_taken, 120,
                         'the daemon to take the stream')
        s.b_commands(N_CMDS, 60)
        s.loop.run_until(lambda: s.chk.got >= MIB, 30, 'A to read 1 MiB')
        behind = MID - s.chk.got
        print('A read %d MiB so far, %d MiB behind'
              % (s.chk.got // MIB, behind // MIB))
        self.assertGreater(s.chk.got, 0, 'A made progress')
        self.assertGreater(behind, BUF_HIGH, 'A is slower than its VP')
        self.assertEqual(s.metric('sc_remoted_backpressure_pauses_total'),
                         0)
        self.assertIsNone(s.a_end)
        slow['on'] = False
        s.a.resume_reading()
        s.loop.run_until(lambda: s.chk.done, 120, 'A to read its stream')
        s.stop_clean(self)

    def test_live_upgrade_drains_spool(self):
        """A live upgrade hands no spool file over: the backlog is read
        back into A's queue and carried by the state; A then receives
        every byte in order from the successor."""
        s = self.scene('unix', 'mux', MID)
        s.stream_to_a()
        s.loop.run_until(lambda: s.sent == MID and s.vp_taken, 120,
                         'the daemon to take the stream')
        spooled = s.metric('sc_remoted_spool_bytes')
        self.assertGreater(spooled, MID // 2)
        written = s.metric('sc_remoted_spool_written_bytes_total')
        self.assertGreaterEqual(written, spooled)
        old_pid = s.d.pid
        s.d.upgrade(60, pump=lambda: s.loop.run_once(0.01))
        self.assertNotEqual(s.d.pid, old_pid)
        # the counters cross the upgrade (the spool itself does not)
        self.assertGreaterEqual(
            s.metric('sc_remoted_spool_written_bytes_total'), written)
        c = s.consumer(s.ch_a)
        self.assertGreaterEqual(c['memory_bytes'] + c['spool_bytes'],
                                spooled)
        s.b_commands(N_CMDS, 60, 'B after the upgrade')
        s.a.resume_reading()
        s.loop.run_until(lambda: s.chk.done, 120, 'A to read its stream')
        self.assertEqual(s.fs.connects, 1)
        self.assertEqual(s.lost, [])
        s.loop.run_until(lambda: s.spool_fds(self.spool) == 0, 10,
                         'no spool file left')
        s.stop_clean(self)


if __name__ == '__main__':
    scr.main()
