#!/usr/bin/env python3
"""Conformance: command line, pid file, signals, daemonising (PROTOCOL.md
7, 8)."""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import unittest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                '..', 'lib'))
import scr  # noqa: E402
from scr import Daemon, UnixClient, free_port, run_cli, wait_until  # noqa: E402


def have_ipv6_loopback():
    try:
        s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    except OSError:
        return False
    try:
        s.bind(('::1', 0))
        return True
    except OSError:
        return False
    finally:
        s.close()


def pid_alive(pid):
    """True if pid exists and is not a zombie."""
    try:
        with open('/proc/%d/stat' % pid) as f:
            st = f.read()
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    state = st[st.rindex(')') + 2]
    return state not in ('Z', 'X')


class CliTest(unittest.TestCase):

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix='scr-cli-')
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.udir = os.path.join(self.tmp, 'u')
        os.mkdir(self.udir)

    def run_fails(self, args, what=None):
        """The daemon must exit 255 at once (not start serving)."""
        try:
            rc, out, err = run_cli(args, timeout=5)
        except subprocess.TimeoutExpired:
            self.fail('%s: sc_remoted kept running with %r' % (what, args))
        self.assertEqual(rc, 255, '%s: exit %d for %r; stderr: %s'
                         % (what, rc, args, err))
        self.assertNotEqual(err, '', '%s: nothing on stderr' % what)
        return err

    def port_args(self):
        return ['-P', '127.0.0.1:%d' % free_port()]

    def daemon(self, **kw):
        d = Daemon(**kw)
        self.addCleanup(d.__exit__, None, None, None)
        return d

    # -- informational options ---------------------------------------------

    @scr.not_legacy('no -v')
    def test_version(self):
        rc, out, err = run_cli(['-v'])
        self.assertEqual(rc, 0)
        self.assertRegex(out, r'^sc_remoted version \S+\n\Z')

    @scr.not_legacy('no -v')
    def test_version_stops_parsing(self):
        # options after -v are not parsed; -P is not required
        rc, out, err = run_cli(['-v', '-Z', 'abc', '-O', 'bogus'])
        self.assertEqual(rc, 0)
        self.assertTrue(out.startswith('sc_remoted version '))

    def test_usage(self):
        rc, out, err = run_cli(['-?'])
        self.assertEqual(rc, 255)
        self.assertIn('sc_remoted', err)
        self.assertIn('-P', err)

    # -- required options ------------------------------------------------------

    def test_missing_p(self):
        self.run_fails(['-U', self.udir], 'no -P')

    @scr.not_legacy('-U is mandatory and there is no -M')
    def test_missing_u_and_m(self):
        self.run_fails(self.port_args(), 'neither -U nor -M')

    def test_unknown_option(self):
        self.run_fails(self.port_args() + ['-U', self.udir, '-x'],
                       'unknown option')

    @scr.not_legacy('positional arguments are accepted')
    def test_positional_argument(self):
        self.run_fails(self.port_args() + ['-U', self.udir, 'extra'],
                       'positional argument')

    # -- -Z ----------------------------------------------------------------------

    def test_zombie_out_of_range(self):
        for v in (['10801'] if not scr.is_legacy() else ['3601']) + ['-1']:
            with self.subTest(z=v):
                self.run_fails(self.port_args() + ['-U', self.udir, '-Z', v],
                               '-Z %s' % v)

    @scr.not_legacy('-Z abc is accepted as 0')
    def test_zombie_not_a_number(self):
        self.run_fails(self.port_args() + ['-U', self.udir, '-Z', 'abc'],
                       '-Z abc')

    def zombie_ok(self, z):
        d = self.daemon(zombie=z)
        d.wait_listening()
        self.assertTrue(d.alive())
        return d

    def test_zombie_hex_accepted(self):
        # 0x10 = 16 s, parsed like strtol base 0: a VP stays a zombie
        # (resumable) for more than 2 s, which 0 or 10 would not show but a
        # failed parse (0) would
        d = self.zombie_ok('0x10')
        fs = d.fake()
        self.addCleanup(fs.close)
        fs.handshake()
        fs.close()
        d.wait_socket_gone(fs.expected_socket_name())
        time.sleep(1.5)
        self.assertEqual(fs.resume(), 0)

    def test_zombie_limits_accepted(self):
        for v in ('0', '3600' if scr.is_legacy() else '10800'):
            with self.subTest(z=v):
                self.zombie_ok(v)

    # -- -O ----------------------------------------------------------------------

    def test_bad_o(self):
        self.run_fails(self.port_args() + ['-U', self.udir, '-O', 'bogus'],
                       '-O bogus')

    def test_o_case_insensitive(self):
        d = self.daemon(extra_args=['-O', 'AllowGroup', '-O', 'DEBUG'],
                        debug=False, umask=0o022)
        d.wait_listening()
        fs = d.fake()
        self.addCleanup(fs.close)
        fs.handshake()
        p = d.wait_socket(fs.expected_socket_name())
        self.assertEqual(scr.socket_mode(p), 0o770)

    # -- -P and address families --------------------------------------------------

    @scr.not_legacy('-4 -6 together starts with no listener')
    def test_4_and_6(self):
        self.run_fails(['-4', '-6'] + self.port_args() + ['-U', self.udir],
                       '-4 -6')

    def test_family_mismatch(self):
        self.run_fails(['-6', '-P', '127.0.0.1:%d' % free_port(),
                        '-U', self.udir], '-6 with IPv4 address')
        if not scr.is_legacy():
            self.run_fails(['-4', '-P', '[::1]:%d' % free_port(),
                            '-U', self.udir], '-4 with IPv6 address')

    def test_bad_ports(self):
        for p in ('127.0.0.1:0', '127.0.0.1:65536', '0', '65536', '-5'):
            with self.subTest(p=p):
                self.run_fails(['-P', p, '-U', self.udir], '-P %s' % p)

    def test_port_only_listens_on_all(self):
        d = self.daemon(host=None)
        d.wait_listening()
        fs = d.fake()
        self.addCleanup(fs.close)
        self.assertEqual(fs.handshake(), '127.0.0.1:%d' % fs.sport)

    @unittest.skipUnless(have_ipv6_loopback(), 'no IPv6 loopback')
    def test_ipv6_listen(self):
        d = self.daemon(host='::1')
        d.wait_listening()
        fs = d.fake()
        self.addCleanup(fs.close)
        fs.connect()
        fs.send_new()
        ident = ('::1.%d' % fs.sport).encode() + b'\0'
        f = fs.recv_frame(5)
        self.assertEqual(f.raw(), scr.pack_frame(0, 0, bytes([1, len(ident)])
                                                 + ident))
        d.wait_socket('*')
        self.assertEqual(d.list_sockets(), ['::1.%d' % fs.sport])

    def test_select_backend(self):
        d = self.daemon(extra_args=['-O', 'select'])
        d.wait_listening()
        fs = d.fake(name='sel')
        self.addCleanup(fs.close)
        fs.handshake()
        c = UnixClient(d.wait_socket(fs.expected_socket_name()))
        self.addCleanup(c.close)
        ch = fs.wait_channel_new(5)
        c.send(b'ping\n')
        self.assertEqual(fs.recv_channel_data(ch, 5), b'ping\n')
        fs.close()
        d.wait_socket_gone(fs.expected_socket_name())
        c.send(b'zombie\n')
        fs.resume()
        self.assertEqual(fs.recv_channel_data(ch, 7), b'zombie\n')
        fs.send_data(ch, b'OK\n')
        self.assertEqual(c.recv_exact(3), b'OK\n')
        fs.wait_acked(5)

    # -- -U / -M / -R / -m ------------------------------------------------------------

    def test_u_missing_dir(self):
        self.run_fails(self.port_args() + ['-U', os.path.join(self.tmp, 'no')],
                       '-U nonexistent')

    def test_u_is_file(self):
        f = os.path.join(self.tmp, 'file')
        open(f, 'w').close()
        self.run_fails(self.port_args() + ['-U', f], '-U file')

    @scr.not_legacy('no -M')
    def test_mux_path_exists(self):
        m = os.path.join(self.tmp, 'mux')
        open(m, 'w').close()
        self.run_fails(self.port_args() + ['-M', m], '-M existing path')
        self.assertTrue(os.path.isfile(m), 'existing -M path was removed')

    @scr.not_legacy('no -R')
    def test_chroot_dir_missing(self):
        self.run_fails(self.port_args() + ['-U', self.udir, '-R',
                                           os.path.join(self.tmp, 'nodir')],
                       '-R nonexistent')

    @scr.not_legacy('no -m')
    def test_meta_missing_removes_mux(self):
        m = os.path.join(self.tmp, 'mux')
        self.run_fails(self.port_args() + ['-M', m, '-m',
                                           os.path.join(self.tmp, 'nometa')],
                       '-m nonexistent')
        self.assertFalse(os.path.exists(m), 'mux socket left behind')

    @scr.not_legacy('TLS not compiled in')
    def test_cert_without_key(self):
        self.run_fails(self.port_args() + ['-U', self.udir, '-c',
                                           os.path.join(self.tmp, 'c.pem')],
                       '-c without -p')

    # -- pid file --------------------------------------------------------------------

    def test_pidfile(self):
        pidf = os.path.join(self.tmp, 'sc_remoted.pid')
        with open(pidf, 'w') as f:
            f.write('123456789012345678901234567890\n')     # truncated
        d = self.daemon(extra_args=['-e', pidf], umask=0)
        d.wait_listening()

        # the port listens before the pid is written (main() opens the
        # listeners, then writes the pid file): poll for it, bounded
        def content():
            with open(pidf) as f:
                return f.read()
        try:
            scr.wait_until(lambda: content() == '%d\n' % d.pid, 10,
                           what='the pid in the pid file')
        except TimeoutError:
            pass
        self.assertEqual(content(), '%d\n' % d.pid)
        self.assertEqual(scr.socket_mode(pidf), 0o644)
        if scr.is_legacy():
            return
        self.assertEqual(d.stop(), 0)
        self.assertFalse(os.path.exists(pidf), 'pid file not removed')

    def test_pidfile_new_mode(self):
        pidf = os.path.join(self.tmp, 'new.pid')
        d = self.daemon(extra_args=['-e', pidf], umask=0)
        d.wait_listening()
        self.assertEqual(scr.socket_mode(pidf), 0o644)

    # -- signals ------------------------------------------------------------------------

    def check_clean_exit(self, sig):
        mux = not scr.is_legacy()
        pidf = os.path.join(self.tmp, 'p.pid')
        d = self.daemon(mux=mux, extra_args=['-e', pidf])
        d.wait_listening()
        fakes = []
        for name in ('a', 'b', None):
            fs = d.fake(name=name)
            self.addCleanup(fs.close)
            fs.handshake()
            d.wait_socket(fs.expected_socket_name())
            fakes.append(fs)
        c = UnixClient(d.wait_socket('a-*'))
        self.addCleanup(c.close)
        fakes[0].wait_channel_new(5)
        # one zombie too
        fakes[2].close()
        d.wait_socket_gone(fakes[2].expected_socket_name())
        self.assertEqual(len(d.list_sockets()), 2)
        d.signal(sig)
        self.assertEqual(d.wait_exit(10), 0)
        self.assertEqual(d.list_sockets(), [])
        if mux:
            self.assertFalse(os.path.exists(d.mux_path), 'mux socket left')
        self.assertFalse(os.path.exists(pidf), 'pid file left')
        # connections are closed, with no goodbye
        self.assertEqual(fakes[0].expect_closed(5), b'')
        self.assertEqual(fakes[1].expect_closed(5), b'')
        self.assertEqual(c.expect_closed(5), b'')

    @scr.not_legacy('SIGTERM is not handled')
    def test_sigterm(self):
        self.check_clean_exit(signal.SIGTERM)

    def test_sigint(self):
        self.check_clean_exit(signal.SIGINT)

    def test_sighup_keeps_running(self):
        d = self.daemon()
        d.wait_listening()
        fs = d.fake()
        self.addCleanup(fs.close)
        fs.handshake()
        path = d.wait_socket(fs.expected_socket_name())
        d.signal(signal.SIGHUP)
        time.sleep(0.3)
        self.assertTrue(d.alive())
        c = UnixClient(path)
        self.addCleanup(c.close)
        ch = fs.wait_channel_new(5)
        c.send(b'x\n')
        self.assertEqual(fs.recv_channel_data(ch, 2), b'x\n')

    # -- -D ------------------------------------------------------------------------------

    @scr.not_legacy('pid file written before daemonising')
    def test_daemonise(self):
        # relative -U, to check the working directory is kept
        port = free_port()
        pidf = os.path.join(self.tmp, 'd.pid')
        errf = os.path.join(self.tmp, 'err.log')
        with open(errf, 'wb') as ef:
            p = subprocess.Popen([scr.SC_REMOTED, '-D', '-O', 'debug',
                                  '-P', '127.0.0.1:%d' % port, '-U', 'u',
                                  '-e', pidf], cwd=self.tmp,
                                 stdin=subprocess.DEVNULL, stdout=ef,
                                 stderr=ef)
            try:
                rc = p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
                self.fail('parent did not exit after daemonising')
        self.assertEqual(rc, 0)
        pid = wait_until(lambda: os.path.exists(pidf) and
                         re.fullmatch(r'\d+\n', open(pidf).read()) and
                         int(open(pidf).read()), 5, what='pid file')
        self.assertNotEqual(pid, p.pid, 'pid file holds the parent pid')

        def cleanup():
            if pid_alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self.addCleanup(cleanup)
        self.assertTrue(pid_alive(pid))
        # it serves, with the relative -U directory
        fs = scr.FakeScamper(port)
        self.addCleanup(fs.close)
        fs.handshake()
        sock = os.path.join(self.udir, fs.expected_socket_name())
        wait_until(lambda: os.path.exists(sock), 5, what=sock)
        # nothing is logged under -D, not even debug lines
        time.sleep(0.2)
        with open(errf, 'rb') as f:
            self.assertEqual(f.read(), b'')
        os.kill(pid, signal.SIGTERM)
        wait_until(lambda: not pid_alive(pid), 10, what='daemon exit')
        self.assertFalse(os.path.exists(pidf))
        self.assertFalse(os.path.exists(sock))


if __name__ == '__main__':
    scr.main()
