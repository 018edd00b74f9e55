#!/usr/bin/env python3
"""Timers: the daemon stopped (SIGSTOP) for 20 minutes and continued
(issue 9), on the accelerated clock of tlib (20 min = 5 real s at x240).

Before the stop: a handshake left pending (accept deadline due while
stopped), VP "silent" whose last frame is just before the stop (rx_abort
due), three zombies (-Z 300) expiring while stopped, and VP "waiting",
which sends a KEEPALIVE while the daemon is stopped, so its frame is
already in the socket when the daemon wakes.

After SIGCONT: every due timer fires exactly once and in expiry order
(accept timeout, rx_abort, zombie 1, 2, 3); "waiting" is NOT aborted --
the daemon reads before it judges silence -- and gets one KEEPALIVE at
once, not one per 30 s missed, then the next 30 s later.  The same on
the select backend.  That waking costs at most TW_SLOTS slot visits
whatever the gap is shown by tests/unit/test_internals.c.
"""

import os
import signal
import socket
import sys
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tlib  # noqa: E402
from tlib import scr  # noqa: E402
from scr import Daemon, KEEPALIVE, MASTER_ID  # noqa: E402

ZOMBIE = 300
STOP_AT = 100
STOP_FOR = 1200
W = 600                  # daemon seconds for things that happen at once


class SuspendTest(unittest.TestCase):

    def run_case(self, extra=()):
        clk = tlib.Clock()
        d = Daemon(zombie=ZOMBIE, notimes=False, extra_args=list(extra))
        self.addCleanup(d.__exit__, None, None, None)
        d.wait_listening(W)

        def vp(name):
            fs = d.fake(name=name)
            self.addCleanup(fs.close)
            fs.handshake(W)
            return fs

        zombies = []
        for i in range(3):
            clk.sleep_until(10 * (i + 1))
            z = vp('zombie%d' % (i + 1))
            z.close()                       # expires at ~10(i+1) + 300
            zombies.append(z)
        waiting = vp('waiting')
        silent = vp('silent')
        clk.sleep_until(STOP_AT - 15)
        waiting.send_keepalive()
        silent.send_keepalive()             # rx_abort due at ~145
        clk.sleep_until(STOP_AT - 5)
        for fs in (waiting, silent):        # drain the 30 s KEEPALIVEs
            fs.pump(2)
        pending = socket.create_connection((d.connect_host, d.port), W)
        self.addCleanup(pending.close)      # accept deadline ~127
        # accepted before the stop (else its deadline rightly counts
        # from the accept after the wake)
        d.wait_log(r':%d: accepted' % pending.getsockname()[1], W)
        clk.sleep_until(STOP_AT)

        d.signal(signal.SIGSTOP)
        self.addCleanup(d.signal, signal.SIGCONT)
        mark = len(d.log())
        clk.sleep_until(STOP_AT + STOP_FOR - 10)
        waiting.send_keepalive()            # sits in the socket
        ka_before = waiting.keepalives
        clk.sleep_until(STOP_AT + STOP_FOR)
        d.signal(signal.SIGCONT)
        woke = clk.now()

        # waiting: one KEEPALIVE at once, the next one 30 s later
        f = waiting.expect_control(KEEPALIVE, W)
        t1 = clk.now()
        waiting.expect_control(KEEPALIVE, 60)
        t2 = clk.now()
        silent.expect_closed(W)
        d.wait_log(r'zombie3: closing: zombie expired', W)
        clk.sleep_until(clk.now() + 5)
        pending.settimeout(W)
        self.assertEqual(pending.recv(1), b'', 'pending connection open')

        log = d.log()[mark:]
        events = []
        for pat in (r'closing: accept timeout',
                    r'vp \d+ silent: zombie for \d+s: rx_abort',
                    r'vp \d+ zombie1: closing: zombie expired',
                    r'vp \d+ zombie2: closing: zombie expired',
                    r'vp \d+ zombie3: closing: zombie expired'):
            hits = tlib.log_times(log, pat)
            self.assertEqual(len(hits), 1, '%s fired %d times; log:\n%s'
                             % (pat, len(hits), log[-3000:]))
            events.append(log.index(hits[0][1].group(0)))
        self.assertEqual(events, sorted(events),
                         'due timers fired out of order; log:\n%s' % log)
        self.assertNotIn('waiting: zombie', log,
                         'a VP with frames waiting was judged silent')
        self.assertTrue(waiting.go and not waiting.eof)
        self.assertEqual(waiting.keepalives, ka_before + 2)
        self.d = d
        print('woke at %.0f; first KEEPALIVE %.2f s later, next after '
              '%.2f s; %r' % (woke, t1 - woke, t2 - t1, f))
        self.assertGreaterEqual(t2 - t1, 30 - tlib.TICK - tlib.SLACK)
        self.assertLessEqual(t2 - t1, 30 + tlib.TICK + tlib.SLACK)
        # and waiting is still a working VP
        waiting.send_keepalive()
        waiting.expect_silence(5)
        self.assertTrue(d.alive())
        self.assertIsNotNone(MASTER_ID)

    def test_sigstop_20_minutes(self):
        self.run_case()

    def test_sigstop_20_minutes_select(self):
        self.run_case(['-O', 'select'])


if __name__ == '__main__':
    tlib.reexec_accelerated()
    scr.main()
