#!/usr/bin/env python3
"""End-to-end: a real `scamper -R` loses its TCP connection while a
measurement is outstanding, the VP goes zombie, scamper reconnects and
resumes (MASTER_RES / MASTER_OK, PROTOCOL.md 2.6), and the local client
that stayed connected gets every result -- nothing lost in either
direction.

scamper reaches the daemon through a TCP relay inside the test, which is
what gets cut.  scamper waits 30-61 s before reconnecting, so the test
takes about a minute; SC_TESTS_QUICK=1 skips it.

Needs root and scamper; exits 77 (SKIP) otherwise."""

import os
import shutil
import sys
import tempfile
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import e2e  # noqa: E402
from e2e import scr  # noqa: E402

MON = 'e2e.mon'
RESUME_WAIT = 100       # scamper reconnects 30-61 s after the cut


class ScamperResumeTest(unittest.TestCase):

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix='e2e-resume-')
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.d = e2e.start_daemon(self, udir=True)
        self.relay = e2e.Relay(self.d.port)
        self.addCleanup(self._stop_relay)
        self.sc, self.sock = e2e.start_vp(self, self.d, MON,
                                          port=self.relay.port)
        self.t0 = time.monotonic()
        self.steps = []

    def step(self, msg):
        self.steps.append('%7.2f %s' % (time.monotonic() - self.t0, msg))

    def _stop_relay(self):
        self.relay.close()
        e2e.show('relay events', '\n'.join(self.relay.events))

    def tearDown(self):
        e2e.show('test steps', '\n'.join(self.steps))
        e2e.show('scamper output', self.sc.output())

    @scr.slow
    def test_cut_zombie_resume_nothing_lost(self):
        old = os.path.basename(self.sock)
        self.step('VP socket %s' % old)
        c = e2e.ControlClient(self.sock)
        self.addCleanup(c.close)
        c.read_until(e2e.has_line('MORE'), 20, 'MORE from scamper')
        c.send(b'ping -c 5 -i 2 127.0.0.1\n')
        c.read_until(e2e.has_line('OK id-1'), 20, 'OK id-1')
        self.step('ping -c 5 -i 2 accepted (OK id-1)')

        # the ping takes ~8 s; cut while it is outstanding
        time.sleep(1.5)
        self.assertEqual(self.relay.cut(), 1, 'relay had no connection')
        self.step('relay cut')

        # the daemon notices the EOF and makes the VP a zombie: no socket
        self.d.wait_socket_gone(self.sock, 10)
        self.step('VP socket gone (zombie)')
        self.assertTrue(self.sc.alive(), self.sc.output())

        # the local client stays connected; what it writes now is queued
        # by the daemon and must reach scamper after the resume
        c.send(b'ping -c 1 127.0.0.1\ndone\n')
        self.step('sent "ping -c 1" and "done" while zombie')

        deadline = time.monotonic() + RESUME_WAIT
        new = None
        while new is None:
            c.poll(0.2)
            self.assertFalse(c.eof, 'local client got EOF while the VP was '
                             'a zombie; received:\n' + c.text())
            socks = self.d.list_sockets()
            if socks:
                new = socks[0]
            elif time.monotonic() >= deadline:
                self.fail('scamper did not resume within %ds; daemon log:\n%s'
                          % (RESUME_WAIT, self.d.log()[-3000:]))
            self.assertTrue(self.d.alive(), 'sc_remoted died:\n' +
                            self.d.log()[-3000:])
        self.step('new VP socket %s' % new)
        self.assertEqual(self.relay.accepted, 2,
                         'scamper did not reconnect through the relay')
        self.assertRegex(new, e2e.vp_name_re(MON))
        self.assertNotEqual(new, old, 'socket name did not change with the '
                            'new source port')
        self.assertEqual(self.d.list_sockets(), [new])

        stream = c.read_to_eof(60)
        self.step('local client EOF')
        e2e.show('local client received (%d bytes)' % len(stream), c.text())

        items = scr.parse_control_stream(stream, strict=True)
        lines = [v for k, v in items if k == 'line']
        self.assertFalse([l for l in lines if l.startswith('ERR')], lines)
        for want in ('MORE', 'OK id-1', 'OK id-2', 'OK'):
            self.assertIn(want, lines)
        self.assertLess(lines.index('OK id-2'), lines.index('OK'))
        blocks = [v for k, v in items if k == 'data']
        types = [t for b in blocks for t in b.types]
        self.assertEqual(types.count(scr.WARTS_PING), 2,
                         'expected two ping records, got %r' % types)
        self.assertEqual(types[-1], scr.WARTS_CYCLE_STOP, types)
        text = e2e.blocks_to_text(blocks, self.tmp)
        e2e.show('sc_warts2text of the DATA blocks', text)
        self.assertEqual(text.count('ping statistics'), 2, text)
        e2e.assert_ping_text(self, text, count=5)
        e2e.assert_ping_text(self, text, count=1)

        # the resumed VP takes new clients on its new socket
        self.assertTrue(self.sc.alive(), self.sc.output())
        c2 = e2e.ControlClient(os.path.join(self.d.udir, new))
        self.addCleanup(c2.close)
        c2.read_until(e2e.has_line('MORE'), 20, 'MORE on the new socket')
        c2.send(b'ping -c 1 127.0.0.1\ndone\n')
        stream2 = c2.read_to_eof(30)
        blocks2 = scr.parse_data_blocks(stream2, strict=True)
        types2 = [t for b in blocks2 for t in b.types]
        self.assertEqual(types2.count(scr.WARTS_PING), 1, types2)
        e2e.assert_ping_text(self, e2e.blocks_to_text(blocks2, self.tmp,
                                                      'after.warts'))
        self.step('new client on the resumed VP got its ping')
        self.assertEqual(self.relay.accepted, 2)


if __name__ == '__main__':
    e2e.require_env(('scamper', 'sc_warts2text'))
    e2e.run_main()
