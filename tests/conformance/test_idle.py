#!/usr/bin/env python3
"""Conformance: a scamper arriving after the daemon idled (issue 9).

The daemon sleeps with no timeout while no timer is armed.  The first
connection after such a spell must get a full accept deadline, its
MASTER_ID, its -U socket and a working relay: once when nothing ever
connected, once after the last VP departed (its zombie expired) and the
daemon went idle again, on the default backend and with -O select.

The daemon runs on an accelerated clock (libfaketime, scr.faketime_env),
so 40 s of daemon idleness costs 40/SPEED real seconds; without
libfaketime the same cases run in real time and are skipped under
SC_TESTS_QUICK=1.  test_keepalive_accelerated shows that the acceleration
reaches the daemon's wheel and waits: a KEEPALIVE after 30 s of daemon
silence arrives after 30/SPEED real seconds.
"""

import os
import sys
import time
import unittest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                '..', 'lib'))
import scr  # noqa: E402
from scr import Daemon, UnixClient, KEEPALIVE  # noqa: E402

SPEED = 20          # daemon seconds per real second (libfaketime)
IDLE = 40           # daemon seconds with nothing connected
ZOMBIE = 5          # -Z: the departed VP's zombie expires quickly


class IdleTest(unittest.TestCase):

    def setUp(self):
        self.env = scr.faketime_env(SPEED)
        self.speed = SPEED if self.env is not None else 1
        if self.env is None and scr.QUICK:
            self.skipTest('libfaketime missing: the real-time variant is '
                          'slow (SC_TESTS_QUICK=1)')

    def daemon(self, extra=()):
        d = Daemon(env=self.env, zombie=ZOMBIE, extra_args=list(extra))
        self.addCleanup(d.__exit__, None, None, None)
        d.wait_listening()
        return d

    def idle(self, d, secs):
        """Let the daemon sit with nothing connected for secs of its time
        (a sleep is the test here: any longer spell is just as idle)."""
        time.sleep(secs / self.speed)
        self.assertTrue(d.alive(), 'daemon died while idle')

    def real(self, daemon_secs):
        """A real-time timeout covering daemon_secs of daemon time, plus
        room for a loaded machine."""
        return daemon_secs / self.speed + 5

    def vp_works(self, d, name):
        """Handshake, -U socket, relay both ways; then depart for good."""
        fs = d.fake(name=name)
        self.addCleanup(fs.close)
        fs.connect()
        try:
            fs.handshake(timeout=self.real(10))
        except (EOFError, TimeoutError) as e:
            self.fail('no MASTER_ID after idling (%s); log:\n%s'
                      % (e, d.log()[-2000:]))
        self.assertTrue(fs.vp_alias)
        path = d.wait_socket(fs.expected_socket_name(), 10)
        c = UnixClient(path)
        self.addCleanup(c.close)
        ch = fs.wait_channel_new(self.real(5))
        c.send(b'attach format warts\n')
        self.assertEqual(fs.recv_channel_data(ch, 20, self.real(5)),
                         b'attach format warts\n')
        fs.send_data(ch, b'OK\n')
        self.assertEqual(c.recv_exact(3, self.real(5)), b'OK\n')
        fs.wait_acked(self.real(5))
        self.assertNotIn('accept timeout', d.log())
        # depart: a zombie for -Z seconds, then gone; the wheel empties
        c.close()
        fs.close()
        d.wait_log(r'vp \d+ %s: closing: zombie expired' % name,
                   self.real(ZOMBIE + 5))
        d.wait_socket_gone(fs.expected_socket_name(), 10)

    def idle_cases(self, extra=()):
        d = self.daemon(extra)
        self.idle(d, IDLE)                  # nothing ever connected
        self.vp_works(d, 'idle1')
        self.idle(d, IDLE)                  # the last VP departed
        self.vp_works(d, 'idle2')
        self.assertEqual(d.log().count('MASTER_NEW magic'), 2)

    def test_first_vp_after_idle(self):
        self.idle_cases()

    def test_first_vp_after_idle_select(self):
        self.idle_cases(['-O', 'select'])

    def test_keepalive_accelerated(self):
        if self.env is None:
            self.skipTest('libfaketime not installed')
        d = self.daemon()
        fs = d.fake(name='ka')
        self.addCleanup(fs.close)
        fs.connect()
        t0 = time.monotonic()          # before the daemon stamps last_tx
        fs.handshake(timeout=self.real(10))
        fs.expect_control(KEEPALIVE, timeout=25)
        took = time.monotonic() - t0
        print('KEEPALIVE after %.3f real s = %.1f daemon s at x%d'
              % (took, took * SPEED, SPEED))
        # last_tx is stamped with the tick of MASTER_ID (after t0), so the
        # daemon waits at least 29 of its seconds from t0; unaccelerated it
        # would be 30 real seconds: half of that proves the acceleration
        self.assertGreaterEqual(took * SPEED, 29)
        self.assertLess(took, 15)


if __name__ == '__main__':
    scr.main()
