#!/usr/bin/env python3
"""End-to-end: a real `scamper -R` attaches to sc_remoted, and local
clients (sc_attach -R, and a raw unix-socket client) run measurements
through the per-VP socket (PROTOCOL.md sections 1-4).

Needs root (scamper pings) and the scamper tools; exits 77 (SKIP)
otherwise.  The daemon under test is SC_REMOTED (see tests/lib/scr.py);
it may be Debian's 2021 /usr/bin/sc_remoted."""

import os
import re
import shutil
import socket
import sys
import tempfile
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import e2e  # noqa: E402
from e2e import scr  # noqa: E402

MON = 'e2e.mon'


class ScamperAttachTest(unittest.TestCase):

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix='e2e-attach-')
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.d = e2e.start_daemon(self, udir=True)
        # cleanups run in reverse order: scamper is stopped before the daemon
        self.sc, self.sock = e2e.start_vp(self, self.d, MON)
        name = os.path.basename(self.sock)
        m = e2e.vp_name_re(MON).match(name)
        self.assertIsNotNone(m, 'bad VP socket name %r' % name)
        self.peer_port = int(m.group(1))
        # the alias scamper got in MASTER_ID names its warts lists
        self.list_re = re.compile(r'^127\.0\.0\.1:%d_\d+$' % self.peer_port)

    def tearDown(self):
        e2e.show('scamper output', self.sc.output())

    # -- helpers -----------------------------------------------------------

    def sc_attach(self, commands, tag, extra=()):
        cmds = os.path.join(self.tmp, 'cmds-%s.txt' % tag)
        out = os.path.join(self.tmp, 'out-%s.warts' % tag)
        with open(cmds, 'w') as f:
            f.write(commands)
        args = [e2e.SC_ATTACH, '-d', '-R', self.sock, '-i', cmds,
                '-o', out] + list(extra)
        p = e2e.run_tool(args, 60)
        e2e.show('sc_attach %s: %s (exit %d)' % (tag, ' '.join(args),
                                                 p.returncode),
                 'stdout:\n%sstderr:\n%s' % (p.stdout, p.stderr))
        self.assertEqual(p.returncode, 0, 'sc_attach failed: %s' % p.stderr)
        self.assertTrue(os.path.exists(out) and os.path.getsize(out) > 0,
                        'sc_attach wrote no output file')
        with open(out, 'rb') as f:
            raw = f.read()
        text = e2e.warts2text(out)
        e2e.show('sc_warts2text %s' % os.path.basename(out), text)
        return out, raw, text

    def check_lists(self, warts_bytes):
        names = e2e.list_names(warts_bytes)
        self.assertTrue(names, 'no warts list record')
        for n in names:
            self.assertRegex(n, self.list_re,
                             'list name does not carry the MASTER_ID alias')

    def assert_vp_still_there(self):
        self.assertTrue(self.sc.alive(), 'scamper exited:\n' +
                        self.sc.output())
        self.assertEqual(self.d.list_sockets(), [os.path.basename(self.sock)])

    # -- tests -------------------------------------------------------------

    def test_sc_attach_ping_and_trace(self):
        out, raw, text = self.sc_attach(
            'ping -c 1 127.0.0.1\ntrace 127.0.0.1\n', 'ping-trace')
        e2e.assert_ping_text(self, text, count=1)
        e2e.assert_trace_text(self, text)
        types = [t for t, _ in scr.warts_records(raw)]
        self.assertEqual(types.count(scr.WARTS_PING), 1, types)
        self.assertEqual(types.count(scr.WARTS_TRACE), 1, types)
        self.check_lists(raw)
        if e2e.SC_WARTSDUMP:
            p = e2e.run_tool([e2e.SC_WARTSDUMP, out], 30)
            self.assertEqual(p.returncode, 0, p.stderr)
            e2e.show('sc_wartsdump (head)',
                     '\n'.join(p.stdout.splitlines()[:16]))
            self.assertRegex(p.stdout, r'monitor: %s\b' % re.escape(MON))
            self.assertRegex(p.stdout, r'ping from \S+ to 127\.0\.0\.1')
            self.assertRegex(p.stdout, r'traceroute from \S+ to 127\.0\.0\.1')
        self.assert_vp_still_there()

    def test_two_sequential_sc_attach_sessions(self):
        _, raw1, text1 = self.sc_attach('ping -c 1 127.0.0.1\n', 'first')
        e2e.assert_ping_text(self, text1, count=1)
        self.assertEqual(text1.count('ping statistics'), 1)
        self.assert_vp_still_there()
        _, raw2, text2 = self.sc_attach('ping -c 2 -i 1 127.0.0.1\n',
                                        'second')
        e2e.assert_ping_text(self, text2, count=2)
        self.assertEqual(text2.count('ping statistics'), 1)
        self.check_lists(raw1)
        self.check_lists(raw2)
        # each channel is its own scamper source: distinct list names
        self.assertNotEqual(set(e2e.list_names(raw1)),
                            set(e2e.list_names(raw2)))
        self.assert_vp_still_there()

    def test_sc_attach_many_commands_impatient(self):
        # all commands in one burst (sc_attach -O impatient): many frames
        # each way, results interleaved; every result must arrive
        cmds = ''.join('ping -c 1 127.0.0.%d\n' % (i % 4 + 1)
                       for i in range(24))
        cmds += ''.join('trace 127.0.0.%d\n' % i for i in range(1, 3))
        _, raw, text = self.sc_attach(cmds, 'many', ('-O', 'impatient'))
        types = [t for t, _ in scr.warts_records(raw)]
        self.assertEqual(types.count(scr.WARTS_PING), 24, types)
        self.assertEqual(types.count(scr.WARTS_TRACE), 2, types)
        self.assertEqual(text.count('ping statistics'), 24)
        self.assertEqual(len(re.findall(
            r'^1 packets transmitted, 1 packets received', text, re.M)), 24)
        for i in range(1, 3):
            e2e.assert_trace_text(self, text, '127.0.0.%d' % i)
        self.check_lists(raw)
        self.assert_vp_still_there()

    def test_raw_client_ping_done_eof(self):
        c = e2e.ControlClient(self.sock)
        self.addCleanup(c.close)
        c.read_until(e2e.has_line('MORE'), 20, 'MORE from scamper')
        c.send(b'ping -c 1 127.0.0.1\ndone\n')
        stream = c.read_to_eof(30)
        e2e.show('raw client received (%d bytes, EOF after %.2fs)'
                 % (len(stream), c.eof_at - c.t0), c.text())

        items = scr.parse_control_stream(stream, strict=True)
        lines = [v for k, v in items if k == 'line']
        self.assertEqual(lines[0], 'MORE', lines)
        self.assertIn('OK id-1', lines)
        self.assertIn('OK', lines)
        self.assertLess(lines.index('OK id-1'), lines.index('OK'))
        self.assertFalse([l for l in lines if l.startswith('ERR')], lines)

        blocks = [v for k, v in items if k == 'data']
        types = [b.types for b in blocks]
        flat = [t for ts in types for t in ts]
        self.assertEqual(flat.count(scr.WARTS_PING), 1,
                         'expected one warts ping record, got %r' % types)
        self.assertEqual(flat[0], scr.WARTS_LIST, types)
        # scamper sends the cycle stop record last, then its FIN; the EOF
        # must come after it, with nothing truncated (strict parse above)
        self.assertEqual(flat[-1], scr.WARTS_CYCLE_STOP, types)
        ping_at = [i for i, (k, v) in enumerate(items)
                   if k == 'data' and scr.WARTS_PING in v.types][0]
        self.assertLess(items.index(('line', 'OK id-1')), ping_at)
        self.check_lists(b''.join(b.data for b in blocks))

        text = e2e.blocks_to_text(blocks, self.tmp)
        e2e.show('sc_warts2text of the raw client DATA blocks', text)
        e2e.assert_ping_text(self, text, count=1)
        self.assert_vp_still_there()

    def test_raw_client_half_close(self):
        # the client's EOF makes the daemon send CHANNEL_FIN; it must keep
        # delivering scamper's output and close only after scamper's FIN
        # (PROTOCOL.md 4.3).  scamper 20211212 still runs the queued ping
        # after a FIN; later versions abandon it (2.7).
        c = e2e.ControlClient(self.sock)
        self.addCleanup(c.close)
        c.read_until(e2e.has_line('MORE'), 20, 'MORE from scamper')
        c.send(b'ping -c 2 -i 1 127.0.0.1\n')
        c.read_until(e2e.has_line('OK id-1'), 20, 'OK id-1')
        c.sock.shutdown(socket.SHUT_WR)
        stream = c.read_to_eof(30)
        e2e.show('half-closed client received (%d bytes, EOF after %.2fs)'
                 % (len(stream), c.eof_at - c.t0), c.text())
        blocks = scr.parse_data_blocks(stream, strict=True)
        types = [t for b in blocks for t in b.types]
        self.assertEqual(types[-1], scr.WARTS_CYCLE_STOP, types)
        if e2e.scamper_version() == 20211212:
            self.assertEqual(types.count(scr.WARTS_PING), 1, types)
            text = e2e.blocks_to_text(blocks, self.tmp)
            e2e.show('sc_warts2text of the half-closed client', text)
            e2e.assert_ping_text(self, text, count=2)
        self.assert_vp_still_there()


if __name__ == '__main__':
    e2e.require_env(('scamper', 'sc_attach', 'sc_warts2text'))
    e2e.run_main()
