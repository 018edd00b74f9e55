#!/usr/bin/env python3
"""Live upgrade on SIGUSR2 (issue 12).

The daemon runs from a copy of its binary in its temp dir; before each
SIGUSR2 the test installs one of two builds there (the main build and
tests/upgrade/sc_remoted_alt, whose version string differs), so the
upgrades alternate between them.  Checked across the upgrades:

  * streams each way between a FakeScamper and a -U client, with data in
    flight at every upgrade (queued toward both peers, unacked, half a
    remote frame received, half a mux control message received), every
    byte verified, in order, exactly once;
  * idle VPs stay connected; no peer or client ever sees a close;
  * mux client round trips through a VP on a mux channel;
  * a -U client mid-result (half of it before the upgrade, half after);
  * zombies keep their -Z deadline (not restarted by an upgrade) and can
    be resumed in the new process;
  * each upgrade is logged with the new version, and the pid file names
    the serving process;
  * every rollback case (binary missing, not executable, options
    rejected, crash while loading, unreadable state version, no answer
    in time), each followed by a successful upgrade.
"""

import os
import re
import resource
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
import unittest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                '..', 'lib'))
import scr  # noqa: E402
from scr import Daemon, FakeScamper, UnixClient, MuxClient  # noqa: E402

T = 20
BUILD = os.environ.get('SC_TOP_BUILDDIR',
                       os.path.dirname(os.path.abspath(scr.SC_REMOTED)))
ALT = os.path.join(BUILD, 'tests', 'upgrade', 'sc_remoted_alt')
BADSTATE = os.path.join(BUILD, 'tests', 'upgrade', 'sc_remoted_badstate')
IDLE_VPS = 200 if scr.QUICK else 1000
UPGRADES = 6 if scr.QUICK else 20


def pattern(tag, off, n):
    """n bytes of the stream named tag from offset off: 64-byte blocks
    numbered by offset, so loss, duplication and reordering show."""
    start = off - off % 64
    out = bytearray()
    blk = start // 64
    while len(out) < (off - start) + n:
        out += (b'%s:%010d:' % (tag, blk)).ljust(64, b'.')
        blk += 1
    return bytes(out[off - start:off - start + n])


def raise_nofile():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class Upgrader:
    """Installs builds at the path a daemon runs from, atomically."""

    def __init__(self, d):
        self.d = d
        self.path = os.path.join(d.tmp, 'bin', 'sc_remoted')
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        self.install(scr.SC_REMOTED)
        d.args[0] = self.path

    def install(self, src=None, text=None, mode=0o755):
        tmp = self.path + '.new'
        if text is not None:
            with open(tmp, 'w') as f:
                f.write(text)
        else:
            shutil.copy(src, tmp)
        os.chmod(tmp, mode)
        os.rename(tmp, tmp[:-4])

    def remove(self):
        os.unlink(self.path)


def version_of(path):
    out = subprocess.run([path, '-v'], stdout=subprocess.PIPE, timeout=T,
                         check=True).stdout.decode()
    return out.split()[-1]


@unittest.skipUnless(os.path.exists(ALT), 'needs tests/upgrade/sc_remoted_alt'
                     ' (make check builds it)')
class TestUpgrade(unittest.TestCase):

    def daemon(self, pidfile=False, **kw):
        raise_nofile()
        kw.setdefault('mux', True)
        kw.setdefault('zombie', 120)
        d = Daemon(start=False, **kw)
        self.addCleanup(d.__exit__, None, None, None)
        self.addCleanup(self.assert_no_sanitizer, d)
        up = Upgrader(d)
        if pidfile:
            d.args += ['-e', os.path.join(d.tmp, 'pid')]
        d.start()
        d.wait_listening()
        return d, up

    def assert_no_sanitizer(self, d):
        m = re.search(r'^.*(Sanitizer|runtime error).*$', d.log(), re.M)
        if m:
            self.fail('sanitizer report in the log: %s' % m.group(0))

    def session(self, d, name):
        fs = d.fake(name=name)
        self.addCleanup(fs.close)
        fs.handshake(T)
        return fs

    def uclient(self, d, fs):
        d.wait_socket(fs.expected_socket_name(), T)
        uc = UnixClient(os.path.join(d.udir, fs.expected_socket_name()), T)
        self.addCleanup(uc.close)
        chan = fs.wait_channel_new(T)
        return uc, chan

    def assert_open(self, sock, what):
        """Nothing (no EOF, no reset) pending on an idle socket."""
        sock.setblocking(False)
        try:
            d = sock.recv(1, socket.MSG_PEEK)
            if d == b'':
                self.fail('%s was closed' % what)
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as e:
            self.fail('%s: %s' % (what, e))
        finally:
            sock.setblocking(True)

    def test_upgrades_in_a_row(self):
        """Streams, idle VPs, zombies, mux and -U clients across
        UPGRADES upgrades alternating between two builds."""
        d, up = self.daemon(pidfile=True)
        pidfile = os.path.join(d.tmp, 'pid')

        # the streaming VP and its -U client
        fs = self.session(d, 'stream')
        uc, chan = self.uclient(d, fs)
        # a VP driven through the mux
        mfs = self.session(d, 'muxvp')
        mc = MuxClient(d.mux_path, T)
        self.addCleanup(mc.close)
        vps = {v['name']: v['id'] for v in mc.read_burst(T)}
        mc.open(vps['muxvp'], 7)
        mchan = mfs.wait_channel_new(T)
        # idle VPs
        idle = []
        for i in range(IDLE_VPS):
            f = FakeScamper(d.port, name='idle%d' % i)
            self.addCleanup(f.close)
            f.handshake(T)
            idle.append(f)
        # zombies: sessions whose connection went away
        zombies = []
        for i in range(3):
            z = self.session(d, 'zombie%d' % i)
            z.sock.close()
            z.sock = None
            zombies.append(z)
        d.wait_log(r'zombie2.*zombie for', T)

        down_off = up_off = 0     # scamper->client, client->scamper
        builds = [scr.SC_REMOTED, ALT]
        versions = [version_of(scr.SC_REMOTED), version_of(ALT)]
        self.assertNotEqual(versions[0], versions[1])
        pids = [d.pid]
        for k in range(UPGRADES):
            # data in flight in both directions, not yet read by anyone
            n = 64 * 1024 + k * 1000
            fs.send_data(chan, pattern(b'down', down_off, n))
            uc.send(pattern(b'up', up_off, n))
            # wait until the daemon has read the client's bytes (they
            # reach scamper's socket) before pulling the trigger
            got = fs.recv_channel_data(chan, 1000, T)
            self.assertEqual(got, pattern(b'up', up_off, 1000))
            up_off += 1000
            # half a remote frame (no ACK may follow it: the fake reads
            # nothing until the rest is sent) and half a mux frame
            hf = scr.Frame(fs.snd_nxt, chan,
                           pattern(b'down', down_off + n, 3000))
            fs.snd_nxt = (fs.snd_nxt + 1) & 0xffffffff
            fs.unacked.append(hf)
            half = hf.raw()
            fs.send_raw(half[:1500])
            mc.send_raw(scr.mux_frame(7, b'ping%d' % k)[:5])
            # a result half delivered
            mfs.send_data(mchan, b'result-%d-part1;' % k)

            up.install(builds[(k + 1) % 2])
            pid, ver = d.upgrade(T)
            self.assertEqual(ver, versions[(k + 1) % 2])
            self.assertNotIn(pid, pids)
            pids.append(pid)
            with open(pidfile) as f:
                self.assertEqual(int(f.read()), pid)

            # complete what was half sent
            fs.send_raw(half[1500:])
            mc.send_raw(scr.mux_frame(7, b'ping%d' % k)[5:])
            mfs.send_data(mchan, b'result-%d-part2;' % k)
            self.assertEqual(uc.recv_exact(n + 3000, T),
                             pattern(b'down', down_off, n + 3000))
            down_off += n + 3000
            self.assertEqual(fs.recv_channel_data(chan, n - 1000, T),
                             pattern(b'up', up_off, n - 1000))
            up_off += n - 1000
            self.assertEqual(mfs.recv_channel_data(mchan, 4 + len(str(k)),
                                                   T), b'ping%d' % k)
            want = b'result-%d-part1;result-%d-part2;' % (k, k)
            self.assertEqual(mc.recv_channel_data(7, len(want), T), want)
            fs.wait_acked(T)

        for i, f in enumerate(idle):
            self.assert_open(f.sock, 'idle VP %d' % i)
        self.assert_open(uc.sock, '-U client')
        self.assert_open(mc.sock, 'mux client')
        # zombies resume in the last process, with what was queued
        for z in zombies:
            z.resume()
            self.assertTrue(z.go)
        # an idle VP still relays
        f = idle[-1]
        uc2, ch2 = self.uclient(d, f)
        f.send_data(ch2, b'still here')
        self.assertEqual(uc2.recv_exact(10, T), b'still here')
        log = d.log()
        # (wait_listening's probes come and go before the first upgrade)
        self.assertNotRegex(log[log.index('took over'):],
                            r'vp \d+ \S*: closing|local client closed|'
                            r'mux client \d+: closing')
        # only the three sessions closed on purpose became zombies
        self.assertEqual(len(re.findall(r'zombie for', log)), 3)
        self.assertEqual(len(re.findall(r'took over', log)), UPGRADES)
        self.assertEqual(d.stop(), 0)

    def test_mux_burst_cursor_and_tcp_mux(self):
        """A mux client in the middle of its VP_UPDATE burst (it has not
        read it; the daemon produces it as the client drains) keeps its
        place across an upgrade: it then reads every VP exactly once, in
        accept order, then GO.  The mux here is also served over TCP
        (-O mux-listen), whose listener and clients cross too."""
        d, up = self.daemon(mux_tcp=True, udir=False)
        n = 1500
        names = []
        for i in range(n):
            name = ('v%04d-' % i) + 'x' * 200
            f = FakeScamper(d.port, name=name)
            self.addCleanup(f.close)
            f.handshake(T)
            names.append(name)
        mc = MuxClient(d.mux_path, T)          # unix (TCP if SCR_MUX_TCP)
        self.addCleanup(mc.close)
        tc = MuxClient(d.mux_tcp, T)           # TCP
        self.addCleanup(tc.close)
        # neither reads: their bursts stop where their sockets are full
        d.wait_log(r'mux client 2: connected', T)
        up.install(ALT)
        d.upgrade(T)
        for c in (mc, tc):
            vps = c.read_burst(T)
            self.assertEqual([v['name'] for v in vps], names)
            self.assertEqual([v['id'] for v in vps],
                             sorted(v['id'] for v in vps))
        # the unix client was still in its burst when the state crossed
        log = d.log()
        self.assertRegex(log[log.index('took over'):], r'burst done')
        # a VP arriving now is announced once to both
        f = FakeScamper(d.port, name='late')
        self.addCleanup(f.close)
        f.handshake(T)
        for c in (mc, tc):
            ev = c.expect('update', T)
            self.assertEqual(ev[1]['name'], 'late')
        self.assertEqual(d.stop(), 0)

    def test_per_source_counts_cross(self):
        """-O per-source-max: the connections held before an upgrade
        still count after it (a third one is refused), and a VP that
        leaves frees its place in the new process."""
        d, up = self.daemon(extra_args=['-O', 'per-source-max=2'])
        a = self.session(d, 'psa')
        self.session(d, 'psb')
        up.install(ALT)
        d.upgrade(T)
        c = FakeScamper(d.port, name='psc')
        self.addCleanup(c.close)
        c.connect()
        c.expect_closed(T)
        d.wait_log(r'per-source-max', T)
        a.sock.close()
        a.sock = None
        d.wait_log(r'psa: zombie for', T)
        self.session(d, 'psd')
        self.assertEqual(d.stop(), 0)

    def test_counters_and_metrics_cross(self):
        """-O metrics: the listener crosses (same port, no refused
        connection), the counters carry over (relayed bytes, arrivals,
        start time) and so do each VP's byte counters on /vps."""
        d, up = self.daemon(metrics=True)
        fs = self.session(d, 'mvp')
        uc, chan = self.uclient(d, fs)
        fs.send_data(chan, b'x' * 5000)
        self.assertEqual(uc.recv_exact(5000, T), b'x' * 5000)
        uc.send(b'y' * 3000)
        fs.recv_channel_data(chan, 3000, T)
        fs.wait_acked(T)

        def relevant(m):
            return dict((k, v) for k, v in m.items()
                        if 'relay' in k[0] or 'arrival' in k[0] or
                        'start_time' in k[0] or 'departures' in k[0] or
                        'rejects' in k[0])
        before = relevant(d.scrape())
        vps_before = d.vps()
        self.assertTrue(before)
        up.install(ALT)
        d.upgrade(T)
        after = relevant(d.scrape())
        self.assertEqual(after, before)
        vps_after = d.vps()
        # times derived from ticks may round to the next second
        wall = ('connected_since', 'last_rx', 'zombie_deadline')
        self.assertEqual(len(vps_after), len(vps_before))
        for a, b in zip(vps_after, vps_before):
            for k in wall:
                if b.get(k) is None:
                    self.assertIsNone(a.get(k), k)
                else:
                    self.assertLessEqual(abs(a[k] - b[k]), 2, k)
            self.assertEqual(dict((k, v) for k, v in a.items()
                                  if k not in wall),
                             dict((k, v) for k, v in b.items()
                                  if k not in wall))
        self.assertEqual(d.stop(), 0)

    def test_zombie_keeps_deadline(self):
        """A zombie's -Z deadline is not restarted by upgrades: with -Z 6
        and upgrades every second it still expires, no earlier than 6 s
        after it became a zombie."""
        d, up = self.daemon(zombie=6)
        z = self.session(d, 'z')
        t0 = time.monotonic()
        z.sock.close()
        z.sock = None
        d.wait_log(r'zombie for 6s', T)
        builds = [ALT, scr.SC_REMOTED]
        k = 0
        deadline = time.monotonic() + 60
        while 'zombie expired' not in d.log():
            self.assertLess(time.monotonic(), deadline,
                            'zombie never expired; log:\n%s' % d.log())
            up.install(builds[k % 2])
            d.upgrade(T)
            k += 1
            time.sleep(1)
        self.assertGreaterEqual(time.monotonic() - t0, 5.0)
        self.assertEqual(scr.probe_res(d.port, z.magic), 'REJ')

    def test_rollback(self):
        """Each way an upgrade can fail leaves the old process serving,
        sessions intact, and a later SIGUSR2 works."""
        d, up = self.daemon(extra_args=['-O', 'upgrade-timeout=3'])
        fs = self.session(d, 'vp')
        uc, chan = self.uclient(d, fs)
        mc = MuxClient(d.mux_path, T)
        self.addCleanup(mc.close)
        mc.read_burst(T)
        real = scr.SC_REMOTED
        cases = [
            ('missing', lambda: up.remove(), r'refused: cannot execute'),
            ('not executable', lambda: up.install(real, mode=0o644),
             r'refused: cannot execute'),
            ('options rejected',
             lambda: up.install(text='#!/bin/sh\nexec %s "$@" -Z bogus\n'
                                % real), r'exited with status 255'),
            ('crash', lambda: up.install(text='#!/bin/sh\nkill -SEGV $$\n'),
             r'killed by signal 11'),
            ('state version', lambda: up.install(BADSTATE),
             r'cannot read state version 2 \(reads 999\)'),
            ('no answer', lambda: up.install(
                text='#!/bin/sh\nexec sleep 30\n'), r'no answer within 3s'),
        ]
        if not os.path.exists(BADSTATE):
            cases = [c for c in cases if c[0] != 'state version']
        for i, (what, prep, rx) in enumerate(cases):
            old = d.pid
            prep()
            line = d.upgrade_fails(T + 10)
            self.assertRegex(line, rx, what)
            self.assertEqual(d.pid, old)
            # everything still served by the old process
            fs.send_data(chan, b'after %s' % what.encode())
            self.assertEqual(uc.recv_exact(len(what) + 6, T),
                             b'after %s' % what.encode())
            uc.send(b'back %d' % i)
            self.assertEqual(fs.recv_channel_data(chan, 6, T), b'back %d' % i)
            # then a good binary takes over
            up.install(ALT if i % 2 == 0 else real)
            d.upgrade(T)
            fs.send_data(chan, b'ok %d' % i)
            self.assertEqual(uc.recv_exact(4, T), b'ok %d' % i)
        self.assertEqual(len(re.findall(r'upgrade failed, still serving|'
                                        r'upgrade refused', d.log())),
                         len(cases))
        self.assert_open(mc.sock, 'mux client')
        self.assertEqual(d.stop(), 0)


class NotifyRx:
    """A NOTIFY_SOCKET that reports each datagram with its sender's pid
    (SO_PASSCRED)."""

    def __init__(self, path):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(path)

    def recv(self, timeout):
        self.sock.settimeout(timeout)
        data, anc, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
        pid = None
        for level, kind, blob in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = struct.unpack('iII', blob[:12])[0]
        return pid, data.decode()

    def wait_for(self, pred, timeout):
        deadline = time.monotonic() + timeout
        while True:
            rem = deadline - time.monotonic()
            if rem <= 0:
                raise TimeoutError('no such notification')
            pid, msg = self.recv(rem)
            if pred(pid, msg):
                return pid, msg

    def close(self):
        self.sock.close()


class TestUpgradeNotify(unittest.TestCase):

    def test_mainpid_and_ready(self):
        """Under Type=notify with NotifyAccess=main: the old (main)
        process announces MAINPID=<new pid> with READY=1 and a watchdog
        ping before it exits, and the new process then keeps the
        watchdog.  A watchdog shorter than -O upgrade-timeout (10 s) is
        raised with WATCHDOG_USEC= for the handover and put back in the
        MAINPID= datagram."""
        self.check_handover(2000000, 'WATCHDOG=1\nWATCHDOG_USEC=15000000',
                            '\nWATCHDOG=1\nWATCHDOG_USEC=2000000')

    def test_handover_long_watchdog(self):
        """A watchdog longer than the upgrade timeout: a plain ping before
        the fork and WATCHDOG=1 with MAINPID=, no WATCHDOG_USEC=."""
        self.check_handover(60000000, 'WATCHDOG=1', '\nWATCHDOG=1')

    def check_handover(self, wd_usec, before, tail):
        d = Daemon(start=False, env=dict(
            (k, v) for k, v in os.environ.items()
            if k not in ('NOTIFY_SOCKET', 'WATCHDOG_PID', 'WATCHDOG_USEC')))
        self.addCleanup(d.__exit__, None, None, None)
        rx = NotifyRx(os.path.join(d.tmp, 'notify'))
        self.addCleanup(rx.close)
        d.env['NOTIFY_SOCKET'] = rx.path
        d.env['WATCHDOG_USEC'] = str(wd_usec)
        up = Upgrader(d)
        d.start()
        old = d.pid
        rx.wait_for(lambda p, m: m == 'READY=1', T)
        up.install(ALT)
        new, _ = d.upgrade(T)
        seen = []
        pid, msg = rx.wait_for(lambda p, m: seen.append((p, m)) or
                               m.startswith('MAINPID='), T)
        self.assertEqual(pid, old)
        self.assertEqual(msg, 'MAINPID=%d\nREADY=1%s' % (new, tail))
        # the ping (and any raised limit) before the fork, from the old
        self.assertIn((old, before), seen)
        if wd_usec > 5000000:
            d.stop()
            return
        pid, msg = rx.wait_for(lambda p, m: seen.append((p, m)) or
                               (m == 'WATCHDOG=1' and p == new), T)
        # the new process is not the main pid until MAINPID=: it must not
        # announce READY=1 itself (systemd refuses and logs it), and its
        # STATUS= comes from its service tick
        mine = [m for p, m in seen if p == new]
        self.assertNotIn('READY=1', mine)
        self.assertTrue(any(m.startswith('STATUS=') for m in mine), seen)
        self.assertEqual(d.stop(), 0)


def copy_with_libs(binary, root, dest):
    """Copy binary to root+dest with the shared libraries it needs (per
    ldd) at their paths under root, so it can run inside a chroot."""
    os.makedirs(os.path.dirname(root + dest), exist_ok=True)
    shutil.copy(binary, root + dest)
    out = subprocess.run(['ldd', binary], stdout=subprocess.PIPE,
                         timeout=T).stdout.decode()
    for lib in re.findall(r'(/\S+)', out):
        if os.path.exists(lib):
            os.makedirs(os.path.dirname(root + lib), exist_ok=True)
            shutil.copy(lib, root + lib)


@unittest.skipUnless(os.geteuid() == 0 and shutil.which('ldd'),
                     'chroot needs root (and ldd)')
class TestUpgradeChroot(unittest.TestCase):

    def test_upgrade_inside_chroot(self):
        """Under -R the binary is run by its path inside the chroot: an
        upgrade works when it is reachable there, and is refused with a
        log line naming the chroot when it is not."""
        sys.path.insert(0, os.path.join(os.path.dirname(
            os.path.abspath(__file__)), '..', 'hardening'))
        import hlib
        if hlib.is_asan():
            # the sanitizer runtime reads its options from /proc, absent
            # in the chroot, so the successor would run LeakSanitizer
            self.skipTest('AddressSanitizer build: no /proc in the chroot')
        root = tempfile.mkdtemp(prefix='scr-upg-chroot-')
        self.addCleanup(shutil.rmtree, root, True)
        os.chmod(root, 0o755)
        os.mkdir(os.path.join(root, 'u'))
        copy_with_libs(scr.SC_REMOTED, root, '/bin/sc_remoted')
        d = Daemon(udir=False, start=False, extra_args=[
            '-R', root, '-U', '/u', '-e', '/sc.pid'])
        self.addCleanup(d.__exit__, None, None, None)
        d.args[0] = root + '/bin/sc_remoted'
        d.udir = os.path.join(root, 'u')
        d.start()
        d.wait_listening()
        fs = d.fake(name='chrt')
        self.addCleanup(fs.close)
        fs.handshake(T)
        d.wait_socket(fs.expected_socket_name(), T)
        uc = UnixClient(os.path.join(d.udir, fs.expected_socket_name()), T)
        self.addCleanup(uc.close)
        chan = fs.wait_channel_new(T)
        pid, _ = d.upgrade(T)
        self.assertEqual(os.readlink('/proc/%d/root' % pid),
                         os.path.realpath(root))
        with open(os.path.join(root, 'sc.pid')) as f:
            self.assertEqual(int(f.read()), pid)
        fs.send_data(chan, b'inside')
        self.assertEqual(uc.recv_exact(6, T), b'inside')
        os.unlink(root + '/bin/sc_remoted')
        line = d.upgrade_fails(T)
        self.assertIn('/bin/sc_remoted inside the -R chroot', line)
        uc.send(b'still')
        self.assertEqual(fs.recv_channel_data(chan, 5, T), b'still')
        self.assertEqual(d.stop(), 0)


if __name__ == '__main__':
    scr.main()
