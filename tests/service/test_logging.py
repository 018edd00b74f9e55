#!/usr/bin/env python3
"""Logging (issue 10): levels by default, journald "<N>" prefixes when
JOURNAL_STREAM names stderr, per-site rate limiting of floods, and bad
-e / -O syslog inputs.  (Syslog datagrams: test_syslog.py.)"""

import os
import re
import shutil
import sys
import tempfile
import unittest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                '..', 'lib'))
import scr  # noqa: E402
from scr import Daemon, run_cli  # noqa: E402


def clean_env(**kw):
    e = dict(os.environ)
    for k in ('NOTIFY_SOCKET', 'WATCHDOG_USEC', 'WATCHDOG_PID',
              'JOURNAL_STREAM'):
        e.pop(k, None)
    e.update(kw)
    return e


class LoggingTest(unittest.TestCase):

    def setUp(self):
        if scr.is_legacy():
            raise unittest.SkipTest('the reference daemon has no log levels')

    def test_default_levels(self):
        """Without -O debug: VP lifecycle lines (arrival with name and
        address, zombie, expiry/departure with reason) and no debug lines."""
        d = Daemon(debug=False, zombie=1, env=clean_env())
        self.addCleanup(d.__exit__)
        d.wait_listening()
        fs = d.fake(name='lvp')
        fs.handshake()
        peer = re.escape(scr.peer_id(fs.sock.getsockname()))
        d.wait_log(r'^vp_set_state: %s: vp \d+ lvp: arrived, new session'
                   % peer)
        fs.close()
        d.wait_log(r'^vp_set_state: %s: vp \d+ lvp: zombie for 1s' % peer)
        d.wait_log(r'^vp_close: %s: vp \d+ lvp: departed: zombie expired'
                   % peer)
        self.assertNotRegex(d.log(), r'accepted|MASTER_NEW magic')
        self.assertEqual(d.stop(), 0)

    def test_journal_prefixes(self):
        """stderr is the journal: "<N>" prefixes and no timestamps."""
        d = Daemon(debug=False, notimes=False, zombie=0, start=False)
        self.addCleanup(d.__exit__)
        with open(d.stderr_path, 'wb'):
            pass
        st = os.stat(d.stderr_path)
        d.env = clean_env(JOURNAL_STREAM='%d:%d' % (st.st_dev, st.st_ino))
        d.start()
        d.wait_listening()
        fs = d.fake(name='jvp')
        fs.handshake()
        fs.close()
        d.wait_log(r'^<5>vp_close: \S+: vp \d+ jvp: departed: ')
        log = d.log()
        self.assertRegex(log, r'(?m)^<5>vp_set_state: \S+: vp \d+ jvp: '
                         r'arrived')
        for line in log.splitlines():
            self.assertRegex(line, r'^<[0-7]>\w+: ', 'unprefixed line')
            self.assertNotIn('[', line.split(':', 1)[0])
        self.assertEqual(d.stop(), 0)

    def test_no_journal_when_stream_differs(self):
        """A JOURNAL_STREAM naming another file: today's format."""
        d = Daemon(debug=False, zombie=0,
                   env=clean_env(JOURNAL_STREAM='1:1'))
        self.addCleanup(d.__exit__)
        d.wait_listening()
        fs = d.fake(name='pvp')
        fs.handshake()
        d.wait_log(r'^vp_set_state: \S+: vp \d+ pvp: arrived')
        self.assertNotRegex(d.log(), r'(?m)^<\d>')
        fs.close()
        self.assertEqual(d.stop(), 0)

    def test_flood_rate_limited(self):
        """60 connections with a malformed MASTER_NEW: at most 20 lines per
        5 s from that call site, the rest reported as "N similar messages
        suppressed"; every message is accounted for; the daemon works."""
        total = 60
        d = Daemon(debug=False, env=clean_env())
        self.addCleanup(d.__exit__)
        d.wait_listening()
        for i in range(total):
            fs = d.fake(name='f')
            fs.connect()
            fs.send_ctl(scr.MASTER_NEW, b'')
            scr.wait_closed(fs.sock, 10)
            fs.close()

        def accounted():
            log = d.log()
            shown = len(re.findall(r'(?m)^vp_proto_error: .*protocol error: '
                                   r'malformed MASTER_NEW$', log))
            sup = sum(int(n) for n in re.findall(
                r'(?m)^vp_proto_error: (\d+) similar messages? suppressed$',
                log))
            return (shown, sup) if shown + sup >= total else None
        shown, sup = scr.wait_until(accounted, 30, 0.1,
                                    'the suppressed count')
        self.assertEqual(shown + sup, total)
        self.assertGreater(sup, 0)
        fs = d.fake(name='after')
        fs.handshake()
        fs.close()
        self.assertTrue(d.alive())
        print('flood: %d lines shown, %d suppressed' % (shown, sup))
        self.assertEqual(d.stop(), 0)

    def test_debug_not_limited(self):
        """-O debug logs every line (no rate limiting)."""
        d = Daemon(debug=True, env=clean_env())
        self.addCleanup(d.__exit__)
        d.wait_listening()
        for i in range(25):
            fs = d.fake(name='f')
            fs.connect()
            fs.send_ctl(scr.MASTER_NEW, b'')
            scr.wait_closed(fs.sock, 10)
            fs.close()
        scr.wait_until(lambda: len(re.findall(
            r'protocol error: malformed MASTER_NEW', d.log())) == 25, 10,
                       what='25 lines')
        self.assertNotIn('suppressed', d.log())
        self.assertEqual(d.stop(), 0)

    def test_pidfile_unwritable(self):
        """-e in a missing directory: one clear line naming the file; a
        startup error (exit 255), before daemonising, never a hang."""
        tmp = tempfile.mkdtemp(prefix='scr-log-')
        self.addCleanup(shutil.rmtree, tmp, True)
        port = scr.free_port()
        bad = '/nonexistent-dir/sc.pid'
        for extra in ([], ['-D']):
            rc, out, err = run_cli(extra + ['-P', '127.0.0.1:%d' % port,
                                            '-U', tmp, '-e', bad],
                                   env=clean_env())
            self.assertEqual(rc, 255)
            self.assertRegex(err, r'/nonexistent-dir/sc.pid: could not open '
                             r'pid file: No such file or directory')

    def test_syslog_unreachable_foreground(self):
        """-O syslog where /dev/log cannot be reached (e.g. no syslog
        daemon): one line on stderr, the daemon keeps working."""
        if os.path.exists('/dev/log'):
            raise unittest.SkipTest('/dev/log exists here: see test_syslog')
        d = Daemon(debug=False, extra_args=['-O', 'syslog'], env=clean_env())
        self.addCleanup(d.__exit__)
        d.wait_listening()
        d.wait_log(r'/dev/log: No such file or directory: logging to '
                   r'syslog will be retried')
        fs = d.fake(name='s')
        fs.handshake()
        fs.close()
        self.assertTrue(d.alive())
        self.assertEqual(d.stop(), 0)


if __name__ == '__main__':
    scr.main()
