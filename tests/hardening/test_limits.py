#!/usr/bin/env python3
"""Hardening: connection and resource limits (issue 5).

* -O handshake-max=N: connections beyond N still in the handshake are
  closed at once, with a rate-limited log line; VPs past the handshake do
  not count.
* Out of file descriptors (RLIMIT_NOFILE 64): accepting pauses with one
  log line a second instead of spinning, existing connections keep
  working, and accepting resumes once fds are free.
* -R chroot: -U, -M, -m and -e are resolved inside the chroot.
* a pid file path that is a symlink is a startup error (O_NOFOLLOW).
* invalid -O resource values are startup errors.
"""

import os
import re
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import hlib  # noqa: E402
from hlib import scr  # noqa: E402
from scr import Daemon, UnixClient, MuxClient, run_cli  # noqa: E402


class LimitedDaemon(Daemon):
    """A Daemon started with RLIMIT_NOFILE soft = hard = nofile."""

    def __init__(self, nofile, **kw):
        self.nofile = nofile
        Daemon.__init__(self, **kw)

    def _limit(self):
        resource.setrlimit(resource.RLIMIT_NOFILE, (self.nofile, self.nofile))

    def start(self):
        self._stderr_fh = open(self.stderr_path, 'wb')
        self.proc = subprocess.Popen(self.args, stdin=subprocess.DEVNULL,
                                     stdout=self._stderr_fh,
                                     stderr=self._stderr_fh,
                                     preexec_fn=self._limit)
        return self


def roundtrip(test, fs, ch, client, tag):
    """One request/response through a -U client and fake scamper."""
    client.send(b'ask %s\n' % tag)
    test.assertEqual(fs.recv_channel_data(ch, 5 + len(tag), 5),
                     b'ask %s\n' % tag)
    fs.send_data(ch, b'ans %s\n' % tag)
    test.assertEqual(client.recv_exact(5 + len(tag), 5), b'ans %s\n' % tag)


def silent_connect(port, n):
    out = []
    for _ in range(n):
        s = socket.create_connection(('127.0.0.1', port), timeout=5)
        s.setblocking(False)
        out.append(s)
    return out


def is_closed(s):
    try:
        return s.recv(1) == b''
    except BlockingIOError:
        return False
    except OSError:
        return True


def wait_file(path, timeout=5):
    """The contents of path once it is non-empty."""
    def read():
        try:
            with open(path) as f:
                return f.read()
        except FileNotFoundError:
            return ''
    return scr.wait_until(read, timeout, what='contents of ' + path)


def close_all(socks):
    for s in socks:
        try:
            s.close()
        except OSError:
            pass
    del socks[:]


class HandshakeMaxTest(unittest.TestCase):

    def test_handshake_max(self):
        n = 20
        d = Daemon(udir=True, extra_args=['-O', 'handshake-max=%d' % n])
        self.addCleanup(d.__exit__, None, None, None)
        d.wait_listening()
        time.sleep(0.3)   # wait_listening's probe connections are gone
        # VPs past the handshake do not count
        vps = []
        for i in range(5):
            fs = d.fake(name='gov%d' % i)
            self.addCleanup(fs.close)
            fs.handshake()
            vps.append(fs)
        silent = silent_connect(d.port, n + 10)
        self.addCleanup(close_all, silent)
        t0 = time.monotonic()
        closed = set()
        while time.monotonic() - t0 < 3.0 and len(closed) < 10:
            for i, s in enumerate(silent):
                if i not in closed and is_closed(s):
                    closed.add(i)
            time.sleep(0.02)
        dt = time.monotonic() - t0
        time.sleep(0.5)
        for i, s in enumerate(silent):
            if i not in closed and is_closed(s):
                closed.add(i)
        self.assertEqual(sorted(closed), list(range(n, n + 10)),
                         'not exactly the connections beyond %d were '
                         'closed; log:\n%s' % (n, hlib.daemon_log_tail(d)))
        self.assertLess(dt, 2.0, 'the extras were not closed at once')
        lines = re.findall(r'connections in handshake: refusing new ones',
                           d.log())
        self.assertGreaterEqual(len(lines), 1)
        self.assertLessEqual(len(lines), 3, 'log line not rate-limited')
        # a real handshake now is refused too
        extra = d.fake(name='extra')
        self.addCleanup(extra.close)
        extra.connect()
        extra.send_new()
        self.assertRaises(EOFError, extra.recv_frame, 3)
        # once the silent ones are gone, handshakes work again
        close_all(silent)
        ok = d.fake(name='after')
        self.addCleanup(ok.close)
        deadline = time.monotonic() + 5
        while True:
            try:
                ok.handshake(3)
                break
            except (EOFError, OSError):
                ok.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        c = UnixClient(d.wait_socket('after-*'))
        self.addCleanup(c.close)
        roundtrip(self, ok, ok.wait_channel_new(), c, b'x')
        for fs in vps:
            fs.send_keepalive()
            fs.expect_silence(0.1)
        self.assertTrue(d.alive())
        hlib.check_no_sanitizer(self, d)


class NoFileTest(unittest.TestCase):

    NOFILE = 64
    rx = re.compile(r'out of file descriptors')

    def at_the_limit(self):
        """A daemon with RLIMIT_NOFILE 64, a VP 'good' with a -U client,
        and silent TCP connections until accept fails with EMFILE."""
        d = LimitedDaemon(self.NOFILE, udir=True, mux=True)
        self.addCleanup(d.__exit__, None, None, None)
        d.wait_listening()
        with open('/proc/%d/limits' % d.pid) as f:
            self.assertRegex(f.read(), r'Max open files\s+%d\s+%d'
                             % (self.NOFILE, self.NOFILE))
        good = d.fake(name='good')
        self.addCleanup(good.close)
        good.handshake()
        gpath = d.wait_socket('good-*')
        gc = UnixClient(gpath)
        self.addCleanup(gc.close)
        gch = good.wait_channel_new()
        roundtrip(self, good, gch, gc, b'before')

        # fill the daemon's fd table with silent connections
        silent = []
        self.addCleanup(close_all, silent)
        for i in range(self.NOFILE + 20):
            silent += silent_connect(d.port, 1)
            if self.rx.search(d.log()):
                break
            time.sleep(0.01)
        d.wait_log(r'tcp_accept: out of file descriptors', 5)
        nfd = hlib.fd_count(d.pid)
        self.assertGreaterEqual(nfd, self.NOFILE - 1)
        silent += silent_connect(d.port, 10)   # queued in the backlog
        return d, good, gch, gc, gpath, silent

    def test_emfile_unix_listener(self):
        """At the fd limit, a client waiting on a per-VP socket must not
        make the daemon spin either; it gets its channel once fds are
        free."""
        d, good, gch, gc, gpath, silent = self.at_the_limit()
        n0 = len(self.rx.findall(d.log()))
        t0 = hlib.cpu_ticks(d.pid)
        w0 = time.monotonic()
        c2 = UnixClient(gpath)                 # in the listener's backlog
        self.addCleanup(c2.close)
        for i in range(6):
            roundtrip(self, good, gch, gc, b'limit%d' % i)
            time.sleep(0.5)
        cpu = (hlib.cpu_ticks(d.pid) - t0) / float(hlib.CLK_TCK)
        wall = time.monotonic() - w0
        n_lines = len(self.rx.findall(d.log())) - n0
        print('a client pending on a -U socket at the fd limit: %.2f s CPU '
              'in %.1f s; %d "out of file descriptors" lines' % (cpu, wall,
                                                                 n_lines))
        self.assertLess(cpu, 0.1 * wall, 'the daemon spins at the fd limit '
                        'with a client pending on a -U socket')
        self.assertLessEqual(n_lines, 2 * wall + 4, 'log line not limited')
        close_all(silent)
        ch2 = good.wait_channel_new(5)
        roundtrip(self, good, ch2, c2, b'second')
        self.assertTrue(d.alive())
        hlib.check_no_sanitizer(self, d)

    def test_emfile(self):
        d, good, gch, gc, gpath, silent = self.at_the_limit()
        rx = self.rx
        mx = MuxClient(d.mux_path)             # likewise, on the mux
        self.addCleanup(mx.close)

        # at the limit: no spinning, the existing pair keeps relaying
        t0 = hlib.cpu_ticks(d.pid)
        w0 = time.monotonic()
        for i in range(6):
            roundtrip(self, good, gch, gc, b'limit%d' % i)
            time.sleep(0.5)
        cpu = (hlib.cpu_ticks(d.pid) - t0) / float(hlib.CLK_TCK)
        wall = time.monotonic() - w0
        n_lines = len(rx.findall(d.log()))
        print('at the fd limit: %.2f s CPU in %.1f s; %d "out of file '
              'descriptors" lines so far' % (cpu, wall, n_lines))
        self.assertLess(cpu, 0.1 * wall, 'the daemon spins at the fd limit')
        self.assertGreaterEqual(n_lines, 1)
        self.assertLessEqual(n_lines, 2 * wall + 4, 'log line not limited')
        self.assertTrue(d.alive())

        # free fds: accepting resumes (backlog first), new VPs work
        close_all(silent)
        self.assertEqual(len(mx.read_burst(5)), 1)
        new = d.fake(name='new')
        self.addCleanup(new.close)
        new.handshake(5)
        nc = UnixClient(d.wait_socket('new-*'))
        self.addCleanup(nc.close)
        roundtrip(self, new, new.wait_channel_new(), nc, b'after')
        roundtrip(self, good, gch, gc, b'after')
        ev = mx.expect('update', 5)
        self.assertEqual(ev[1].get('name'), 'new')
        n_lines = len(rx.findall(d.log()))
        print('%d "out of file descriptors" lines in total' % n_lines)
        self.assertLess(n_lines, 30)
        self.assertTrue(d.alive())
        hlib.check_no_sanitizer(self, d)


def chroot_env():
    """The daemon's environment inside a chroot: under ASan, without
    LeakSanitizer, which needs /proc at exit (absent in the chroot)."""
    if not hlib.is_asan():
        return None
    env = dict(os.environ)
    env['ASAN_OPTIONS'] = (env.get('ASAN_OPTIONS', '') +
                           ':detect_leaks=0').lstrip(':')
    return env


@unittest.skipUnless(os.geteuid() == 0, 'chroot needs root')
class ChrootTest(unittest.TestCase):

    def setUp(self):
        self.root = tempfile.mkdtemp(prefix='scr-chroot-')
        self.addCleanup(shutil.rmtree, self.root, True)
        os.chmod(self.root, 0o755)
        os.mkdir(os.path.join(self.root, 'u'))

    def test_paths_inside_chroot(self):
        for p in ('/u', '/mux', '/sc.pid', '/meta.txt'):
            if os.path.exists(p):
                self.skipTest('%s exists outside the chroot' % p)
        with open(os.path.join(self.root, 'meta.txt'), 'w') as f:
            f.write('chrt.vp cc nz\n')
        d = Daemon(udir=False, env=chroot_env(), extra_args=[
            '-R', self.root, '-U', '/u', '-M', '/mux', '-m', '/meta.txt',
            '-e', '/sc.pid'])
        self.addCleanup(d.__exit__, None, None, None)
        d.udir = os.path.join(self.root, 'u')
        d.mux_path = os.path.join(self.root, 'mux')
        d.wait_listening()
        self.assertTrue(scr.stat.S_ISSOCK(os.lstat(d.mux_path).st_mode))
        # (the pid is written just after the sockets start listening)
        self.assertEqual(wait_file(os.path.join(self.root, 'sc.pid')),
                         '%d\n' % d.pid)
        self.assertEqual(os.readlink('/proc/%d/root' % d.pid),
                         os.path.realpath(self.root))
        fs = d.fake(name='chrt.vp')
        self.addCleanup(fs.close)
        fs.handshake()
        path = d.wait_socket('chrt.vp-*')
        self.assertEqual(os.path.basename(path), fs.expected_socket_name())
        c = UnixClient(path)
        self.addCleanup(c.close)
        roundtrip(self, fs, fs.wait_channel_new(), c, b'chroot')
        mx = MuxClient(d.mux_path)
        self.addCleanup(mx.close)
        vps = mx.read_burst()
        self.assertEqual([v.get('cc') for v in vps], ['nz'],
                         'metadata not read inside the chroot')
        for p in ('/u', '/mux', '/sc.pid'):
            self.assertFalse(os.path.exists(p), p)
        self.assertEqual(d.stop(), 0, d.log())
        self.assertFalse(os.path.exists(d.mux_path))
        self.assertFalse(os.path.exists(os.path.join(self.root, 'sc.pid')))
        self.assertEqual(os.listdir(d.udir), [])
        hlib.check_no_sanitizer(self, d)

    def test_udir_resolved_inside_chroot(self):
        # the -U dir exists outside, but not inside, the chroot
        port = str(scr.free_port())
        rc, out, err = run_cli(['-P', port, '-R', self.root,
                                '-U', os.path.join(self.root, 'u')],
                               env=chroot_env())
        self.assertEqual(rc, 255, err)
        self.assertIn('not a directory', err)

    def test_missing_chroot_dir(self):
        port = str(scr.free_port())
        missing = os.path.join(self.root, 'nope')
        rc, out, err = run_cli(['-P', port, '-R', missing, '-U', '/u'])
        self.assertEqual(rc, 255, err)
        afile = os.path.join(self.root, 'file')
        open(afile, 'w').close()
        rc, out, err = run_cli(['-P', port, '-R', afile, '-U', '/u'])
        self.assertEqual(rc, 255, err)


class StartupErrorTest(unittest.TestCase):

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix='scr-lim-')
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.udir = os.path.join(self.tmp, 'u')
        os.mkdir(self.udir)

    def cli(self, *args):
        return run_cli(['-P', '127.0.0.1:%d' % scr.free_port(),
                        '-U', self.udir] + list(args))

    def test_pidfile_symlink(self):
        target = os.path.join(self.tmp, 'target')
        with open(target, 'w') as f:
            f.write('keep\n')
        link = os.path.join(self.tmp, 'pid')
        os.symlink(target, link)
        rc, out, err = self.cli('-e', link)
        self.assertEqual(rc, 255, err)
        self.assertIn('pid file', err)
        with open(target) as f:
            self.assertEqual(f.read(), 'keep\n')
        self.assertTrue(os.path.islink(link))
        # a dangling symlink: the target must not be created
        dangling = os.path.join(self.tmp, 'pid2')
        newtarget = os.path.join(self.tmp, 'created')
        os.symlink(newtarget, dangling)
        rc, out, err = self.cli('-e', dangling)
        self.assertEqual(rc, 255, err)
        self.assertFalse(os.path.exists(newtarget))
        # control: a plain path works
        plain = os.path.join(self.tmp, 'plain.pid')
        d = Daemon(udir=True, extra_args=['-e', plain])
        self.addCleanup(d.__exit__, None, None, None)
        d.wait_listening()
        self.assertEqual(wait_file(plain), '%d\n' % d.pid)
        self.assertEqual(d.stop(), 0)
        self.assertFalse(os.path.exists(plain))

    def test_bad_resource_options(self):
        bad = [
            ['buffer-low=8m', 'buffer-high=4m'],
            ['buffer-low=4m', 'buffer-high=4m'],
            ['buffer-high=abc'],
            ['buffer-high=-1'],
            ['buffer-high=4x'],
            ['buffer-low=0'],
            ['unacked-max=0'],
            ['unacked-max='],
            ['stall-timeout=0'],
            ['stall-timeout=ten'],
            ['handshake-max=0'],
            ['handshake-max=1.5'],
            ['no-such-limit=5'],
        ]
        for opts in bad:
            args = []
            for o in opts:
                args += ['-O', o]
            rc, out, err = self.cli(*args)
            self.assertEqual(rc, 255, '%r: exit %s\n%s' % (opts, rc, err))
            self.assertIn('usage', err)

    def test_good_resource_options(self):
        d = Daemon(udir=True, extra_args=[
            '-O', 'buffer-high=2m', '-O', 'buffer-low=1m',
            '-O', 'STALL-TIMEOUT=5', '-O', 'unacked-max=1g',
            '-O', 'handshake-max=1', '-O', 'buffer-low=512K'])
        self.addCleanup(d.__exit__, None, None, None)
        d.wait_listening()
        self.assertTrue(d.alive())
        self.assertEqual(d.stop(), 0)


if __name__ == '__main__':
    scr.main()
