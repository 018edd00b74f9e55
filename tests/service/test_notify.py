#!/usr/bin/env python3
"""Service manager: the sd_notify datagrams sc_remoted sends to a
test-owned NOTIFY_SOCKET (issue 10), and bad NOTIFY_SOCKET values."""

import os
import re
import signal
import subprocess
import sys
import tempfile
import shutil
import unittest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                '..', 'lib'))
import scr  # noqa: E402
from scr import Daemon, DgramReceiver, wait_until  # noqa: E402


class NotifyTest(unittest.TestCase):

    def setUp(self):
        if scr.is_legacy():
            raise unittest.SkipTest('the reference daemon has no sd_notify')
        self.tmp = tempfile.mkdtemp(prefix='scr-notify-')
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.rx = DgramReceiver(os.path.join(self.tmp, 'notify'))
        self.addCleanup(self.rx.close)

    def env(self, **kw):
        e = dict(os.environ)
        for k in ('NOTIFY_SOCKET', 'WATCHDOG_USEC', 'WATCHDOG_PID',
                  'JOURNAL_STREAM'):
            e.pop(k, None)
        e.update(kw)
        return e

    def test_sequence(self):
        """READY=1, STATUS=, a STATUS= change for a VP, RELOADING=1 with
        MONOTONIC_USEC then READY=1 on SIGHUP, STOPPING=1 on SIGTERM, and
        WATCHDOG=1 throughout, in that order."""
        d = Daemon(mux=True, env=self.env(NOTIFY_SOCKET=self.rx.path,
                                          WATCHDOG_USEC='2000000'))
        self.addCleanup(d.__exit__)
        self.assertEqual(self.rx.recv(10), 'READY=1')
        st = self.rx.wait_for(lambda m: m.startswith('STATUS='), 10)
        self.assertEqual(st, 'STATUS=0 VPs live, 0 zombies, 0 clients')
        # a watchdog ping every WATCHDOG_USEC/2 = 1 s
        self.rx.wait_for(lambda m: m == 'WATCHDOG=1', 10, 'WATCHDOG=1')

        # a VP and a mux client change the status line
        d.wait_listening()
        fs = d.fake(name='nvp')
        self.addCleanup(fs.close)
        fs.handshake()
        m = d.mux()
        self.addCleanup(m.close)
        self.rx.wait_for(lambda s: s == 'STATUS=1 VPs live, 0 zombies, '
                         '1 clients', 15, 'STATUS with one VP and a client')

        d.signal(signal.SIGHUP)
        msg = self.rx.wait_for(lambda s: s.startswith('RELOADING=1'), 10)
        self.assertRegex(msg, r'^RELOADING=1\nMONOTONIC_USEC=\d+$')
        self.rx.wait_for(lambda s: s != 'WATCHDOG=1', 10)
        self.assertEqual(self.rx.seen[-1], 'READY=1')

        d.signal(signal.SIGTERM)
        self.rx.wait_for(lambda s: s != 'WATCHDOG=1' and
                         not s.startswith('STATUS='), 10)
        self.assertEqual(self.rx.seen[-1], 'STOPPING=1')
        self.assertEqual(d.wait_exit(10), 0)

        kinds = []
        for s in self.rx.seen:
            k = s.split('=', 1)[0]
            if k != 'WATCHDOG' and (not kinds or kinds[-1] != k):
                kinds.append(k)
        self.assertEqual(kinds, ['READY', 'STATUS', 'RELOADING', 'READY',
                                 'STOPPING'])
        print('notify sequence: %r' % (self.rx.seen,))

    def test_watchdog_pid_other(self):
        """WATCHDOG_PID naming another process: no WATCHDOG=1."""
        d = Daemon(env=self.env(NOTIFY_SOCKET=self.rx.path,
                                WATCHDOG_USEC='2000000', WATCHDOG_PID='1'))
        self.addCleanup(d.__exit__)
        self.assertEqual(self.rx.recv(10), 'READY=1')
        # STATUS comes, then the tick runs for three seconds: no watchdog
        deadline_msgs = []
        while True:
            m = self.rx.recv(3)
            if m is None:
                break
            deadline_msgs.append(m)
            self.assertLess(len(deadline_msgs), 10)
        self.assertNotIn('WATCHDOG=1', self.rx.seen)

    def test_daemonised_mainpid(self):
        """With -D: READY=1 carries MAINPID= of the daemon (the pid file's)."""
        port = scr.free_port()
        pidf = os.path.join(self.tmp, 'd.pid')
        os.mkdir(os.path.join(self.tmp, 'u'))
        p = subprocess.run([scr.SC_REMOTED, '-D', '-P', '127.0.0.1:%d' % port,
                            '-U', os.path.join(self.tmp, 'u'), '-e', pidf],
                           env=self.env(NOTIFY_SOCKET=self.rx.path),
                           stdin=subprocess.DEVNULL, capture_output=True,
                           timeout=20)
        self.assertEqual(p.returncode, 0, p.stderr)
        pid = wait_until(lambda: scr.read_pidfile(pidf), 10,
                         what='pid file')

        def cleanup():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.addCleanup(cleanup)
        msg = self.rx.recv(10)
        self.assertEqual(msg, 'READY=1\nMAINPID=%d' % pid)
        os.kill(pid, signal.SIGTERM)
        self.rx.wait_for(lambda s: s == 'STOPPING=1', 10)
        wait_until(lambda: not os.path.exists(pidf), 10, what='daemon exit')

    def check_bad(self, value, what):
        d = Daemon(debug=False, env=self.env(NOTIFY_SOCKET=value))
        self.addCleanup(d.__exit__)
        d.wait_listening()
        d.wait_log(r'NOTIFY_SOCKET=%s: %s; not notifying' %
                   (re.escape(value), what))
        # the daemon keeps working: a VP handshakes and is announced
        fs = d.fake(name='bad%d' % len(value))
        self.addCleanup(fs.close)
        fs.handshake()
        d.wait_log(r'vp \d+ bad\d+: arrived')
        self.assertTrue(d.alive())
        self.assertEqual(d.stop(), 0)

    def test_missing(self):
        self.check_bad(os.path.join(self.tmp, 'nonexistent'),
                       'No such file or directory')

    def test_not_a_socket(self):
        f = os.path.join(self.tmp, 'plain')
        with open(f, 'w') as fh:
            fh.write('x')
        self.check_bad(f, 'Connection refused')

    def test_unsupported(self):
        self.check_bad('vsock:2:1234', 'Address family not supported.*')


if __name__ == '__main__':
    scr.main()
