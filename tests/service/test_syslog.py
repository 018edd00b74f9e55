#!/usr/bin/env python3
"""Syslog with a real receiver (issue 10): a daemonised (-D) sc_remoted in
a private mount namespace whose /dev/log is a datagram socket this test
owns.  Checks facility LOG_DAEMON, the levels, ident sc_remoted and the
daemon's pid; a SIGHUP with a broken -m file gives an error naming the
file and line; an unreachable /dev/log is survived.  Needs root and
unshare(1) (CI runs as root); otherwise exits 77 (skip)."""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import unittest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                '..', 'lib'))
import scr  # noqa: E402
from scr import DgramReceiver, parse_syslog, wait_until  # noqa: E402

LOG_DAEMON = 3
LOG_ERR, LOG_WARNING, LOG_NOTICE = 3, 4, 5

# In a private mount namespace: a tmpfs over /dev holding only null (bound
# from the real one) and log (bound from the test's socket or file), so
# nothing outside the namespace sees the change.
NS_SCRIPT = r'''set -e
mount --make-rprivate /
mount --bind /dev "$T/devsave"
mount -t tmpfs -o mode=755 tmpfs /dev
: > /dev/null
: > /dev/log
mount --bind "$T/devsave/null" /dev/null
mount --bind "$LOGSRC" /dev/log
exec "$@"
'''


def can_unshare():
    if os.geteuid() != 0 or shutil.which('unshare') is None:
        return False
    try:
        p = subprocess.run(['unshare', '-m', 'sh', '-c',
                            'mount --make-rprivate / && '
                            'mount -t tmpfs tmpfs /mnt'],
                           capture_output=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return p.returncode == 0


class SyslogTest(unittest.TestCase):

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix='scr-syslog-')
        self.addCleanup(shutil.rmtree, self.tmp, True)
        os.mkdir(os.path.join(self.tmp, 'devsave'))
        os.mkdir(os.path.join(self.tmp, 'u'))
        self.pidf = os.path.join(self.tmp, 'd.pid')
        self.port = scr.free_port()
        self.pid = None

    def start(self, logsrc, extra=()):
        """sc_remoted -D in the namespace; returns the parent's stderr."""
        env = dict(os.environ, T=self.tmp, LOGSRC=logsrc)
        for k in ('NOTIFY_SOCKET', 'JOURNAL_STREAM'):
            env.pop(k, None)
        args = ['unshare', '-m', 'sh', '-c', NS_SCRIPT, 'sh', scr.SC_REMOTED,
                '-D', '-P', '127.0.0.1:%d' % self.port,
                '-U', os.path.join(self.tmp, 'u'), '-e', self.pidf,
                '-Z', '30'] + list(extra)
        p = subprocess.run(args, env=env, stdin=subprocess.DEVNULL,
                           capture_output=True, timeout=30)
        self.assertEqual(p.returncode, 0, p.stderr)
        self.pid = wait_until(lambda: scr.read_pidfile(self.pidf), 10,
                              what='pid file')
        self.addCleanup(self.kill)
        return p.stderr.decode('utf-8', 'replace')

    def kill(self):
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def wait_gone(self):
        wait_until(lambda: not os.path.exists(self.pidf), 15,
                   what='the daemon to exit')

    def test_levels_and_reload(self):
        meta = os.path.join(self.tmp, 'meta.txt')
        with open(meta, 'w') as f:
            f.write('')
        rx = DgramReceiver(os.path.join(self.tmp, 'log.sock'))
        self.addCleanup(rx.close)
        self.start(rx.path, ['-m', meta])
        fs = scr.FakeScamper(self.port, name='sysvp')
        self.addCleanup(fs.close)
        fs.handshake()
        peer = scr.peer_id(fs.sock.getsockname())

        def lines():
            return [parse_syslog(m) for m in rx.seen]

        def match(sev, rx_text):
            def pred(m):
                p = parse_syslog(m)
                return p is not None and p[1] == sev and \
                    re.search(rx_text, p[4]) is not None
            return pred
        rx.wait_for(match(LOG_NOTICE, r'^vp_set_state: %s: vp \d+ sysvp: '
                          r'arrived' % re.escape(peer)), 10, 'arrival')
        fs.close()
        rx.wait_for(match(LOG_NOTICE, r'vp \d+ sysvp: zombie for 30s'), 10,
                    'zombie')

        # a broken metadata file on SIGHUP: an error naming file and line
        with open(meta, 'w') as f:
            f.write('# ok\nsysvp\tcc\n')
        os.kill(self.pid, signal.SIGHUP)
        m = rx.wait_for(lambda m: parse_syslog(m) is not None and
                        'meta.txt' in m, 10, 'the metadata error')
        p = parse_syslog(m)
        self.assertIn(p[1], (LOG_ERR, LOG_WARNING))
        self.assertRegex(p[4], r'%s: line 2: ' % re.escape(meta))

        os.kill(self.pid, signal.SIGTERM)
        rx.wait_for(match(LOG_NOTICE, r'vp \d+ sysvp: departed: shutting '
                          r'down'), 10, 'departure')
        self.wait_gone()
        for p in lines():
            self.assertIsNotNone(p, rx.seen)
            self.assertEqual(p[0], LOG_DAEMON)
            self.assertEqual(p[2], 'sc_remoted')
            self.assertEqual(p[3], self.pid)
            self.assertNotEqual(p[1], 7, 'a debug line without -O debug')
        print('syslog datagrams:')
        for m in rx.seen:
            print('  ' + m)

    def test_devlog_unreachable(self):
        """/dev/log is a regular file: -D starts, says nothing on stderr
        (kept for startup failures), and works; in the foreground, -O syslog
        says why on stderr and works."""
        plain = os.path.join(self.tmp, 'plain')
        with open(plain, 'w') as f:
            f.write('')
        err = self.start(plain)
        self.assertEqual(err, '')
        fs = scr.FakeScamper(self.port, name='nolog')
        self.addCleanup(fs.close)
        fs.handshake()
        fs.close()
        os.kill(self.pid, signal.SIGTERM)
        self.wait_gone()

        port = scr.free_port()
        errf = os.path.join(self.tmp, 'fg.err')
        env = dict(os.environ, T=self.tmp, LOGSRC=plain)
        with open(errf, 'wb') as ef:
            p = subprocess.Popen(['unshare', '-m', 'sh', '-c', NS_SCRIPT, 'sh',
                                  scr.SC_REMOTED, '-O', 'syslog', '-P',
                                  '127.0.0.1:%d' % port, '-U',
                                  os.path.join(self.tmp, 'u')], env=env,
                                 stdin=subprocess.DEVNULL, stdout=ef,
                                 stderr=ef)
        try:
            wait_until(lambda: 'logging to syslog will be retried' in
                       open(errf).read() or p.poll() is not None, 10,
                       what='the /dev/log line')
            self.assertIn('/dev/log: Connection refused: logging to syslog '
                          'will be retried', open(errf).read())
            fs = scr.FakeScamper(port, name='fg')
            self.addCleanup(fs.close)
            wait_until(lambda: p.poll() is not None or self.try_connect(fs),
                       10, what='the listener')
            fs.handshake()
            self.assertIsNone(p.poll())
        finally:
            p.terminate()
            p.wait(10)
        self.assertEqual(p.returncode, 0)

    def test_receiver_full_never_blocks(self):
        """A syslog receiver that does not read (a tiny receive buffer):
        -O syslog -O debug keeps serving VPs (each handshake is a round
        trip through the loop), the lines that did not fit are dropped and
        counted, and the count is logged once the receiver reads again."""
        rx = DgramReceiver(os.path.join(self.tmp, 'log.sock'))
        self.addCleanup(rx.close)
        rx.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
        port = scr.free_port()
        env = dict(os.environ, T=self.tmp, LOGSRC=rx.path)
        p = subprocess.Popen(['unshare', '-m', 'sh', '-c', NS_SCRIPT, 'sh',
                              scr.SC_REMOTED, '-O', 'syslog', '-O', 'debug',
                              '-P', '127.0.0.1:%d' % port, '-U',
                              os.path.join(self.tmp, 'u'), '-Z', '0'],
                             env=env, stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
        try:
            fs = scr.FakeScamper(port, name='full0')
            wait_until(lambda: p.poll() is not None or self.try_connect(fs),
                       10, what='the listener')
            fs.handshake()
            fs.close()
            for i in range(1, 60):
                fs = scr.FakeScamper(port, name='full%d' % i)
                fs.handshake(timeout=10)
                fs.close()
            self.assertIsNone(p.poll())
            # read everything queued, then one more event
            while rx.recv(0.5) is not None:
                self.assertLess(len(rx.seen), 100000)
            fs = scr.FakeScamper(port, name='after')
            fs.handshake()
            fs.close()
            rx.wait_for(lambda m: 'vp_close' in m and 'after' in m, 10,
                        'the last departure')
            notes = [m for m in rx.seen if 'messages dropped' in m]
            self.assertTrue(notes, 'no dropped count logged')
            m = notes[0]
            pm = parse_syslog(m)
            self.assertEqual(pm[1], LOG_WARNING)
            n = int(re.search(r'log: (\d+) messages dropped', pm[4]).group(1))
            self.assertGreater(n, 0)
            print('receiver full: %d datagrams read, %d dropped and counted'
                  % (len(rx.seen) - 1, n))
        finally:
            p.terminate()
            p.wait(10)
        self.assertEqual(p.returncode, 0)

    @staticmethod
    def try_connect(fs):
        try:
            fs.connect()
            return True
        except OSError:
            return False


if __name__ == '__main__':
    if scr.is_legacy():
        print('SKIP: the reference daemon logs through syslog(3)')
        sys.exit(77)
    if not can_unshare():
        print('SKIP: needs root and a working `unshare -m` (private mount '
              'namespace) to own /dev/log')
        sys.exit(77)
    scr.main()
