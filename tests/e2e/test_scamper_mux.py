#!/usr/bin/env python3
"""End-to-end: two real `scamper -R` instances with different monitor
names attach to sc_remoted, which announces them on its mux socket with
their metadata (-m); a mux client runs a ping on each through mux
channels (PROTOCOL.md sections 5 and 6).

The mux is a feature of this project's sc_remoted only: skipped for the
2021 (Debian) binary.  Needs root and scamper; exits 77 (SKIP) otherwise."""

import os
import re
import shutil
import sys
import tempfile
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import e2e  # noqa: E402
from e2e import scr  # noqa: E402

VPS = {
    'vp-a.example': {'cc': 'NZ', 'place': 'Hamilton, Waikato',
                     'tags': ['alpha', 'e2e']},
    'vp-b.example': {'cc': 'US', 'st': 'CA', 'place': 'San Diego',
                     'tags': ['beta']},
}

META = '''# e2e metadata
vp-a.example cc NZ
vp-a.example place Hamilton, Waikato
vp-a.example tag alpha
vp-a.example tag e2e
vp-b.example cc US
vp-b.example st CA
vp-b.example place San Diego
vp-b.example tag beta
unused.example cc XX
'''

META_KEYS = ('asn4', 'asn6', 'latlong', 'cc', 'st', 'place', 'shortname',
             'iata')


def vp_summary(vp):
    keys = ['id', 'name', 'ipv4', 'ipv6', 'arrival'] + list(META_KEYS)
    parts = ['%s=%r' % (k, vp[k]) for k in keys if k in vp]
    parts.append('tags=%r' % vp['tags'])
    return ' '.join(parts)


@unittest.skipIf(scr.is_legacy(), 'the 2021 sc_remoted has no mux (-M)')
class ScamperMuxTest(unittest.TestCase):

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix='e2e-mux-')
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.d = e2e.start_daemon(self, udir=True, mux=True, meta=META)
        self.scampers = {}

    def tearDown(self):
        for name, sc in sorted(self.scampers.items()):
            e2e.show('scamper %s output' % name, sc.output())

    def check_vp(self, vp, name):
        want = VPS[name]
        self.assertEqual(vp.get('name'), name, vp_summary(vp))
        self.assertEqual(vp.get('ipv4'), '127.0.0.1', vp_summary(vp))
        self.assertNotIn('ipv6', vp)
        self.assertRegex(vp.get('arrival', ''), r'^\d+\.\d{6}$')
        for k in META_KEYS:
            self.assertEqual(vp.get(k), want.get(k),
                             '%s of %s: %s' % (k, name, vp_summary(vp)))
        self.assertEqual(vp['tags'], want['tags'], vp_summary(vp))
        self.assertGreater(vp['id'], 0)

    def test_two_vps_metadata_and_channels(self):
        # a client connected before any VP sees them arrive after GO
        early = self.d.mux()
        self.addCleanup(early.close)
        self.assertEqual(early.read_burst(), [])

        socks = {}
        for name in sorted(VPS):
            sc, socks[name] = e2e.start_vp(self, self.d, name)
            self.scampers[name] = sc
        arrived = {}
        for _ in VPS:
            ev = early.expect('update', timeout=10)
            arrived[ev[1].get('name')] = ev[1]
        self.assertEqual(sorted(arrived), sorted(VPS))

        # a client connected now gets both in its burst before GO
        mux = self.d.mux()
        self.addCleanup(mux.close)
        burst = mux.read_burst(timeout=10)
        e2e.show('mux VP list (burst before GO)',
                 '\n'.join(vp_summary(v) for v in burst))
        self.assertEqual(len(burst), 2, [vp_summary(v) for v in burst])
        # VP ids: unique, accept order (vp-a was started and waited for first)
        self.assertEqual([v.get('name') for v in burst], sorted(VPS))
        self.assertLess(burst[0]['id'], burst[1]['id'])
        byname = {}
        for vp in burst:
            self.check_vp(vp, vp['name'])
            early_vp = arrived[vp['name']]
            self.check_vp(early_vp, vp['name'])
            self.assertEqual(early_vp['id'], vp['id'])
            self.assertEqual(early_vp['arrival'], vp['arrival'])
            byname[vp['name']] = vp

        # one channel per VP, client-chosen ids
        chans = {}
        for n, name in enumerate(sorted(VPS), start=1):
            chans[n] = name
            mux.open(byname[name]['id'], n)
        data = {n: bytearray() for n in chans}
        closed = set()
        more = set()

        def pump(until, timeout, what):
            deadline = time.monotonic() + timeout
            while not until():
                rem = deadline - time.monotonic()
                if rem <= 0:
                    self.fail('timed out waiting for %s; data so far: %r; '
                              'daemon log:\n%s' % (what, {
                                  k: bytes(v) for k, v in data.items()},
                                  self.d.log()[-3000:]))
                try:
                    ev = mux.recv(timeout=min(rem, 1))
                except TimeoutError:
                    continue
                if ev[0] == 'data':
                    self.assertIn(ev[1], chans, 'data on unknown channel')
                    self.assertNotIn(ev[1], closed, 'data after CLOSE')
                    data[ev[1]] += ev[2]
                    if e2e.has_line('MORE')(bytes(data[ev[1]])):
                        more.add(ev[1])
                elif ev[0] == 'close':
                    self.assertIn(ev[1], chans, 'CLOSE of unknown channel')
                    self.assertNotIn(ev[1], closed, 'second CLOSE')
                    closed.add(ev[1])
                elif ev[0] == 'depart':
                    self.fail('unexpected VP_DEPART %d' % ev[1])
                else:
                    self.fail('unexpected mux event %r' % (ev,))

        pump(lambda: len(more) == len(chans), 20, 'MORE on both channels')
        for n in chans:
            mux.send(n, b'ping -c 1 127.0.0.1\n')
            mux.send(n, b'done\n')
        pump(lambda: len(closed) == len(chans), 30,
             'CHANNEL_CLOSE on both channels')

        for n, name in sorted(chans.items()):
            stream = bytes(data[n])
            e2e.show('mux channel %d (VP %d %s) received %d bytes'
                     % (n, byname[name]['id'], name, len(stream)),
                     stream.decode('ascii', 'replace'))
            items = scr.parse_control_stream(stream, strict=True)
            lines = [v for k, v in items if k == 'line']
            self.assertEqual(lines[0], 'MORE', lines)
            self.assertIn('OK id-1', lines)
            self.assertIn('OK', lines)
            self.assertFalse([l for l in lines if l.startswith('ERR')],
                             lines)
            blocks = [v for k, v in items if k == 'data']
            types = [t for b in blocks for t in b.types]
            self.assertEqual(types.count(scr.WARTS_PING), 1,
                             '%s: %r' % (name, types))
            self.assertEqual(types[-1], scr.WARTS_CYCLE_STOP, types)
            text = e2e.blocks_to_text(blocks, self.tmp, 'chan%d.warts' % n)
            e2e.show('sc_warts2text, mux channel %d' % n, text)
            e2e.assert_ping_text(self, text, count=1)
            # the channel really went to that VP: the warts list is named
            # after its alias (MASTER_ID, as in its -U socket name) and
            # carries its monitor name
            alias = os.path.basename(socks[name])[len(name) + 1:]
            names = e2e.list_names(b''.join(b.data for b in blocks))
            self.assertTrue(names, 'no warts list record')
            for ln in names:
                self.assertRegex(ln, r'^%s_\d+$' % re.escape(alias))
            if e2e.SC_WARTSDUMP:
                p = e2e.run_tool([e2e.SC_WARTSDUMP,
                                  os.path.join(self.tmp, 'chan%d.warts' % n)],
                                 30)
                self.assertEqual(p.returncode, 0, p.stderr)
                self.assertRegex(p.stdout, r'monitor: %s\b' %
                                 re.escape(name))
                self.assertRegex(p.stdout, r'name: %s_\d+' %
                                 re.escape(alias))

        # the early client opened nothing and must have received nothing
        try:
            ev = early.recv(timeout=0.5)
            self.fail('unexpected event on the other mux client: %r' % (ev,))
        except TimeoutError:
            pass
        for name, sc in self.scampers.items():
            self.assertTrue(sc.alive(), '%s: %s' % (name, sc.output()))
        self.assertEqual(len(self.d.list_sockets()), 2)


if __name__ == '__main__':
    e2e.require_env(('scamper', 'sc_warts2text'))
    e2e.run_main()
