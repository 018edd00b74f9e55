#!/usr/bin/env python3
"""Live upgrade between builds whose state differs (issue 17).

The state crosses as typed records: a reader skips what it does not know
and defaults what is missing, so builds that add or lack fields upgrade
into each other both ways.  The builds (tests/upgrade/Makefile.inc):

  sc_remoted_ext      VP, channel and mux client records carry an extra
                      field, followed by a record type the others lack
  sc_remoted_reduced  lacks the VP fields rx_frames and tx_frames
  sc_remoted_must     writes a VP field marked must-understand
  sc_remoted_v1       today's release (commit 82f017c: positional state,
                      UPG_VERSION 1), built here with `git archive`

Checked:
  * current -> ext -> current -> reduced -> current under load: idle VPs,
    zombies, a -U client mid-result with data in flight both ways, a mux
    channel mid-result; every byte checked; zombie deadlines and
    connection times unchanged (/vps); no peer or client ever sees a
    close; and (a daemon of its own, names too long for -U sockets) a mux
    client mid-burst that reads its burst only after the last upgrade:
    every VP once, in accept order, then GO;
  * the same chain with a TLS VP that crosses as a zombie and resumes
    after each upgrade, with nothing lost either way;
  * a must-understand field unknown to the successor: the upgrade rolls
    back with one log line naming the record and field, and serving goes
    on;
  * from today's release (v1 layout) to this one under the same load, and
    the way back refused cleanly (v1 cannot read typed records).
"""

import os
import re
import shutil
import subprocess
import sys
import tempfile
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, '..', 'lib'))
sys.path.insert(0, os.path.join(HERE, '..', 'tls'))
sys.path.insert(0, HERE)
import scr  # noqa: E402
from scr import Daemon, FakeScamper, MuxClient  # noqa: E402
import test_upgrade  # noqa: E402
from test_upgrade import (Upgrader, pattern, raise_nofile,  # noqa: E402
                          version_of, BUILD)

T = 30
UPG = os.path.join(BUILD, 'tests', 'upgrade')
EXT = os.path.join(UPG, 'sc_remoted_ext')
REDUCED = os.path.join(UPG, 'sc_remoted_reduced')
MUST = os.path.join(UPG, 'sc_remoted_must')
V1_COMMIT = '82f017c'
IDLE_VPS = 150 if scr.QUICK else 500
BURST_VPS = 1300              # x ~230 bytes: more than a socket holds


def build_v1(dest):
    """Build today's release (positional state) from git into dest;
    returns None, or why it cannot be built."""
    src = os.environ.get('SC_TOP_SRCDIR', os.path.join(HERE, '..', '..'))
    git = shutil.which('git')
    if git is None:
        return 'git is missing'
    if subprocess.run([git, '-C', src, 'cat-file', '-e',
                       V1_COMMIT + '^{commit}'],
                      stdout=subprocess.DEVNULL,
                      stderr=subprocess.DEVNULL).returncode != 0:
        return 'commit %s is not in %s' % (V1_COMMIT, src)
    tmp = tempfile.mkdtemp(prefix='scr-v1-')
    try:
        arch = subprocess.run([git, '-C', src, 'archive', V1_COMMIT,
                               'sc_remoted.c', 'utils.c', 'utils.h',
                               'mjl_list.c', 'mjl_list.h', 'mjl_splaytree.c',
                               'mjl_splaytree.h'],
                              stdout=subprocess.PIPE, check=True,
                              timeout=60).stdout
        subprocess.run(['tar', '-x', '-C', tmp], input=arch, check=True,
                       timeout=60)
        libs = [] if os.environ.get('SC_HAVE_OPENSSL') == '0' \
            else ['-lssl', '-lcrypto']
        cmd = [os.environ.get('CC', 'cc'), '-O1', '-DHAVE_CONFIG_H',
               '-DSC_REMOTED_VERSION_OVERRIDE="v1-82f017c"',
               '-I', BUILD, '-I', tmp, '-o', dest] + \
            [os.path.join(tmp, f) for f in
             ('sc_remoted.c', 'utils.c', 'mjl_list.c', 'mjl_splaytree.c')] \
            + libs
        r = subprocess.run(cmd, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, timeout=300)
        if r.returncode != 0:
            return 'cannot build %s: %s' % (V1_COMMIT,
                                            r.stdout.decode()[-500:])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return None


class Load:
    """The load of the upgrade tests on one daemon: a streaming VP with a
    -U client, a VP driven through a mux channel, idle VPs and zombies
    (a mux client mid-burst needs names too long for -U sockets: see
    test_burst_chain)."""

    def __init__(self, t, d, idle=IDLE_VPS):
        self.t, self.d = t, d
        self.fs = t.session(d, 'stream')
        self.uc, self.chan = t.uclient(d, self.fs)
        self.mfs = t.session(d, 'muxvp')
        self.mc = MuxClient(d.mux_path, T)
        t.addCleanup(self.mc.close)
        vps = {v['name']: v['id'] for v in self.mc.read_burst(T)}
        self.mc.open(vps['muxvp'], 7)
        self.mchan = self.mfs.wait_channel_new(T)
        self.idle = []
        for i in range(idle):
            f = FakeScamper(d.port, name='idle%04d' % i)
            t.addCleanup(f.close)
            f.handshake(T)
            self.idle.append(f)
        self.zombies = []
        for i in range(3):
            z = t.session(d, 'zombie%d' % i)
            z.sock.close()
            z.sock = None
            self.zombies.append(z)
        d.wait_log(r'zombie2.*zombie for', T)
        self.down = self.up = 0
        self.k = 0

    def before(self):
        """Data in flight both ways, half a remote frame, half a mux
        frame and half a result when the upgrade happens."""
        fs, uc, k = self.fs, self.uc, self.k
        self.n = n = 32 * 1024 + k * 1000
        fs.send_data(self.chan, pattern(b'down', self.down, n))
        uc.send(pattern(b'up', self.up, n))
        got = fs.recv_channel_data(self.chan, 1000, T)
        self.t.assertEqual(got, pattern(b'up', self.up, 1000))
        self.up += 1000
        hf = scr.Frame(fs.snd_nxt, self.chan,
                       pattern(b'down', self.down + n, 3000))
        fs.snd_nxt = (fs.snd_nxt + 1) & 0xffffffff
        fs.unacked.append(hf)
        self.half = hf.raw()
        fs.send_raw(self.half[:1500])
        self.mc.send_raw(scr.mux_frame(7, b'ping%d' % k)[:5])
        self.mfs.send_data(self.mchan, b'result-%d-part1;' % k)

    def after(self):
        """Complete what was half sent; every byte once, in order."""
        fs, uc, k, n, t = self.fs, self.uc, self.k, self.n, self.t
        fs.send_raw(self.half[1500:])
        self.mc.send_raw(scr.mux_frame(7, b'ping%d' % k)[5:])
        self.mfs.send_data(self.mchan, b'result-%d-part2;' % k)
        t.assertEqual(uc.recv_exact(n + 3000, T),
                      pattern(b'down', self.down, n + 3000))
        self.down += n + 3000
        t.assertEqual(fs.recv_channel_data(self.chan, n - 1000, T),
                      pattern(b'up', self.up, n - 1000))
        self.up += n - 1000
        t.assertEqual(self.mfs.recv_channel_data(self.mchan, 4 + len(str(k)),
                                                 T), b'ping%d' % k)
        want = b'result-%d-part1;result-%d-part2;' % (k, k)
        t.assertEqual(self.mc.recv_channel_data(7, len(want), T), want)
        fs.wait_acked(T)
        self.k += 1

    def finish(self):
        """Idle peers open, the burst whole, zombies resume."""
        t = self.t
        for i, f in enumerate(self.idle):
            t.assert_open(f.sock, 'idle VP %d' % i)
        t.assert_open(self.uc.sock, '-U client')
        t.assert_open(self.mc.sock, 'mux client')
        for z in self.zombies:
            z.resume()
            t.assertTrue(z.go)
        log = self.d.log()
        t.assertNotRegex(log[log.index('took over'):],
                         r'vp \d+ \S*: closing|local client closed|'
                         r'mux client \d+: closing|departed')
        t.assertEqual(len(re.findall(r'zombie for', log)), 3)


def deadlines(d):
    """Per VP name: the times the daemon derives from its timers."""
    return dict((v['name'], (v.get('zombie_deadline'),
                             v.get('connected_since'))) for v in d.vps())


@unittest.skipUnless(all(os.path.exists(p) for p in (EXT, REDUCED, MUST)),
                     'needs the variant builds (make check builds them)')
class TestUpgradeCompat(unittest.TestCase):

    daemon = test_upgrade.TestUpgrade.daemon
    assert_no_sanitizer = test_upgrade.TestUpgrade.assert_no_sanitizer
    session = test_upgrade.TestUpgrade.session
    uclient = test_upgrade.TestUpgrade.uclient
    assert_open = test_upgrade.TestUpgrade.assert_open

    def daemon_with(self, build, **kw):
        """A daemon started from build (installed where it runs from)."""
        raise_nofile()
        d = Daemon(start=False, **kw)
        self.addCleanup(d.__exit__, None, None, None)
        self.addCleanup(self.assert_no_sanitizer, d)
        up = Upgrader(d)
        up.install(build)
        d.start()
        d.wait_listening()
        return d, up

    def assert_deadlines(self, before, after):
        self.assertEqual(sorted(before), sorted(after))
        for name, (zd, cs) in before.items():
            for a, b in zip(after[name], (zd, cs)):
                if b is None:
                    self.assertIsNone(a, name)
                else:
                    self.assertLessEqual(abs(a - b), 2, name)

    def chain(self, d, up, load, builds):
        versions = [version_of(b) for b in builds]
        for b, ver in zip(builds, versions):
            load.before()
            before = deadlines(d)
            up.install(b)
            pid, got = d.upgrade(T)
            self.assertEqual(got, ver)
            load.after()
            self.assert_deadlines(before, deadlines(d))

    def test_chain_across_layouts(self):
        """current -> ext -> current -> reduced -> current under load."""
        d, up = self.daemon(pidfile=True, metrics=True)
        load = Load(self, d)
        self.chain(d, up, load, [EXT, scr.SC_REMOTED, REDUCED,
                                 scr.SC_REMOTED])
        load.finish()
        log = d.log()
        self.assertEqual(len(re.findall(r'took over', log)), 4)
        self.assertNotRegex(log, r'upgrade failed|not taking over')
        self.assertEqual(d.stop(), 0)

    def test_burst_chain(self):
        """A mux client in the middle of its VP_UPDATE burst (it reads
        nothing until the chain is done) keeps its place across the
        chain: every VP once, in accept order, then GO."""
        d, up = self.daemon(udir=False)
        names = []
        for i in range(BURST_VPS):
            name = ('v%04d-' % i) + 'x' * 220
            f = FakeScamper(d.port, name=name)
            self.addCleanup(f.close)
            f.handshake(T)
            names.append(name)
        mc = MuxClient(d.mux_path, T)
        self.addCleanup(mc.close)
        d.wait_log(r'mux client 1: connected', T)
        for b in [EXT, scr.SC_REMOTED, REDUCED, scr.SC_REMOTED]:
            up.install(b)
            d.upgrade(T)
        vps = mc.read_burst(T)
        self.assertEqual([v['name'] for v in vps], names)
        log = d.log()
        self.assertRegex(log[log.index('took over'):], r'burst done')
        self.assertEqual(d.stop(), 0)

    @unittest.skipIf(os.environ.get('SC_HAVE_OPENSSL') == '0',
                     'needs an OpenSSL build')
    def test_tls_chain(self):
        """A TLS VP crosses each upgrade of the chain as a zombie and
        resumes; its -U client stays connected; nothing lost."""
        import certs
        from test_upgrade_tls import connect_tls
        import test_upgrade_tls
        tmp = tempfile.mkdtemp(prefix='scr-compat-tls-')
        self.addCleanup(shutil.rmtree, tmp, True)
        test_upgrade_tls.CERTS = cs = certs.CertSet(tmp)
        d, up = self.daemon_with(scr.SC_REMOTED, zombie=120,
                                 tls={'cert': cs.server_cert,
                                      'key': cs.server_key})
        fs = FakeScamper(d.port, name='tlsvp',
                         sock_factory=lambda: connect_tls(d.port))
        self.addCleanup(fs.close)
        fs.handshake(T)
        uc, chan = self.uclient(d, fs)
        down = upo = 0
        for k, b in enumerate([EXT, scr.SC_REMOTED, REDUCED,
                               scr.SC_REMOTED]):
            fs.send_data(chan, pattern(b'down', down, 3000 + k))
            self.assertEqual(uc.recv_exact(3000 + k, T),
                             pattern(b'down', down, 3000 + k))
            down += 3000 + k
            # unacknowledged toward scamper when the upgrade happens
            fs.auto_ack = False
            uc.send(pattern(b'up', upo, 2000))
            self.assertEqual(fs.recv_channel_data(chan, 2000, T),
                             pattern(b'up', upo, 2000))
            upo += 2000
            up.install(b)
            d.upgrade(T)
            fs.expect_closed(T)
            fs.close()
            uc.send(pattern(b'up', upo, 1000 + k))
            fs.auto_ack = True
            fs.resume()
            self.assertTrue(fs.go)
            self.assertEqual(fs.recv_channel_data(chan, 1000 + k, T),
                             pattern(b'up', upo, 1000 + k))
            upo += 1000 + k
        fs.send_data(chan, pattern(b'down', down, 4000))
        self.assertEqual(uc.recv_exact(4000, T), pattern(b'down', down, 4000))
        self.assert_open(uc.sock, '-U client')
        self.assertEqual(len(re.findall(r'took over', d.log())), 4)
        self.assertEqual(d.stop(), 0)

    def test_must_understand_rolls_back(self):
        """A field marked must-understand that the successor does not
        know: one log line names it, the old process serves on."""
        d, up = self.daemon_with(MUST, mux=True, zombie=120)
        fs = self.session(d, 'vp')
        uc, chan = self.uclient(d, fs)
        old = d.pid
        up.install(scr.SC_REMOTED)
        line = d.upgrade_fails(T)
        self.assertRegex(line, r'record vp: field 901 is marked '
                         r'must-understand and this version does not '
                         r'know it')
        self.assertEqual(d.pid, old)
        self.assertEqual(len(re.findall(r'upgrade failed, still serving',
                                        d.log())), 1)
        fs.send_data(chan, b'still served')
        self.assertEqual(uc.recv_exact(12, T), b'still served')
        uc.send(b'back')
        self.assertEqual(fs.recv_channel_data(chan, 4, T), b'back')
        # a build that knows the field takes over
        up.install(MUST)
        d.upgrade(T)
        fs.send_data(chan, b'after')
        self.assertEqual(uc.recv_exact(5, T), b'after')
        self.assertEqual(d.stop(), 0)

    def test_from_release_v1(self):
        """Today's release (positional state) upgrades live into this
        one under the same load; this one back to it is refused."""
        v1 = os.path.join(tempfile.mkdtemp(prefix='scr-v1bin-'),
                          'sc_remoted_v1')
        self.addCleanup(shutil.rmtree, os.path.dirname(v1), True)
        why = build_v1(v1)
        if why is not None:
            self.skipTest(why)
        d, up = self.daemon_with(v1, mux=True, zombie=120, metrics=True)
        self.assertEqual(version_of(up.path), 'v1-82f017c')
        load = Load(self, d, idle=IDLE_VPS // 3)
        self.chain(d, up, load, [scr.SC_REMOTED])
        self.assertRegex(d.log(), r'took over from pid \d+ version '
                         r'v1-82f017c')
        # back to the positional release: refused, nothing lost
        up.install(v1)
        line = d.upgrade_fails(T)
        self.assertRegex(line, r'cannot read state version 2 \(reads 1\)')
        load.before()
        up.install(EXT)
        d.upgrade(T)
        load.after()
        load.finish()
        self.assertEqual(d.stop(), 0)


def main():
    if not os.path.exists(EXT):
        print('skip: needs tests/upgrade/sc_remoted_ext (make check)')
        sys.exit(77)
    scr.main()


if __name__ == '__main__':
    main()
