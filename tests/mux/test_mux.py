#!/usr/bin/env python3
"""Mux socket and metadata conformance (PROTOCOL.md 2.9, 5 and 6).

Every test starts its own sc_remoted ($SC_REMOTED) with -M, drives it with
fake scamper VPs (scr.FakeScamper) and mux clients (scr.MuxClient), and
checks what crosses the mux socket, often byte for byte.

Project choices checked here where upstream differs (PROTOCOL.md's
"Recommended" notes and the 2026 upstream quirks):
  * VP_DEPART only for sessions that reached GO (no VP_DEPART(0));
  * CHANNEL_OPEN with vp id 0 or channel id 0 closes the mux client;
  * a control message declaring more than 64 KiB closes the mux client;
  * a VP_UPDATE larger than upstream's 1024-byte limit is still sent;
  * a VP that resumes is announced to mux clients that do not know it;
  * a malformed metadata file on SIGHUP is logged (naming the file).
"""

import os
import random
import re
import shutil
import signal
import socket
import struct
import sys
import tempfile
import time
import unittest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                '..', 'lib'))
import scr  # noqa: E402
from scr import Daemon, UnixClient, probe_res, run_cli  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))

# mux control types (5.3) and attributes (5.4)
VP_UPDATE, VP_DEPART, GO, CHANNEL_OPEN, CHANNEL_CLOSE = 0, 1, 2, 3, 4
A_NAME, A_ARRIVAL, A_IPV4, A_ASN4, A_CC, A_ST, A_PLACE = 1, 2, 3, 4, 5, 6, 7
A_LATLONG, A_SHORTNAME, A_TAG, A_IATA, A_IPV6, A_ASN6 = 8, 9, 10, 11, 12, 13

GO_BYTES = bytes.fromhex('00000000' '00000002' '0002')


# ---------------------------------------------------------------------------
# local encoders (written independently of scr so that byte-level checks do
# not depend on the library's own encoder)
# ---------------------------------------------------------------------------

def mux_frame(chan, payload):
    return struct.pack('>II', chan, len(payload)) + bytes(payload)


def mux_ctl(mtype, body=b''):
    return mux_frame(0, struct.pack('>H', mtype) + bytes(body))


def open_msg(vp_id, chan):
    return mux_ctl(CHANNEL_OPEN, struct.pack('>II', vp_id, chan))


def vp_update_frame(vp_id, attrs):
    """Expected VP_UPDATE bytes for [(attr, value), ...] (str or bytes)."""
    body = struct.pack('>HI', VP_UPDATE, vp_id)
    for a, v in attrs:
        if isinstance(v, str):
            v = v.encode()
        body += struct.pack('>H', a) + v + b'\0'
    return mux_frame(0, body)


def depart_frame(vp_id):
    return mux_ctl(VP_DEPART, struct.pack('>I', vp_id))


def close_frame(chan):
    return mux_ctl(CHANNEL_CLOSE, struct.pack('>I', chan))


def arrival_of(raw):
    """The ARRIVAL string of a raw VP_UPDATE frame."""
    vp = scr.parse_vp_update(raw[8:], raw)
    return vp.get('arrival')


# fixtures
META_FULL = os.path.join(HERE, 'meta_full.txt')
META_BAD_NOVALUE = os.path.join(HERE, 'meta_bad_novalue.txt')   # line 5
META_BAD_BLANK = os.path.join(HERE, 'meta_bad_blank.txt')       # line 4

# what meta_full.txt gives "meta.vp", in emission order (5.4)
META_FULL_ATTRS = [
    (A_ASN4, 'AS64500'),
    (A_ASN6, 'AS64501'),
    (A_LATLONG, '-37.8136,144.9631'),
    (A_CC, 'us  '),
    (A_ST, 'VIC'),
    (A_PLACE, 'San Francisco Bay Area'),
    (A_SHORTNAME, 'sfo-1'),
    (A_IATA, 'SFO'),
    (A_TAG, 'first tag'),
    (A_TAG, 'second'),
    (A_TAG, 'third  tag '),
]


class MuxTestBase(unittest.TestCase):

    # -- setup helpers (everything is cleaned up by addCleanup) -------------

    def daemon(self, **kw):
        kw.setdefault('mux', True)
        d = Daemon(**kw)
        self.addCleanup(d.__exit__, None, None, None)
        d.wait_listening()
        if d.mux_path:
            self.wait_mux_accepting(d)
        return d

    @staticmethod
    def wait_mux_accepting(d, timeout=10):
        """Wait until a connect to the mux socket succeeds: the socket
        file exists from bind(), before listen() (scr's wait_listening
        only checks that it exists)."""
        deadline = time.monotonic() + timeout
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(d.mux_path)
                return
            except OSError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.02)
            finally:
                s.close()

    def fake(self, d, **kw):
        fs = d.fake(**kw)
        self.addCleanup(fs.close)
        return fs

    def vp(self, d, name=None, **kw):
        """A fake scamper that completed MASTER_NEW/MASTER_ID; .t0/.t1
        bracket the handshake in wall-clock time."""
        fs = self.fake(d, name=name, **kw)
        fs.t0 = time.time()
        fs.handshake()
        fs.t1 = time.time()
        return fs

    def mux(self, d):
        mc = scr.MuxClient(d.mux_path)
        self.addCleanup(mc.close)
        return mc

    def burst(self, d):
        """A new mux client and its burst (list of VP dicts)."""
        mc = self.mux(d)
        return mc, mc.read_burst(5)

    def uclient(self, path):
        c = UnixClient(path)
        self.addCleanup(c.close)
        return c

    # -- assertions ---------------------------------------------------------

    def raw_next(self, mc, timeout=5):
        """Raw bytes of the next mux frame (nothing may be in the backlog)."""
        self.assertFalse(mc.backlog, 'unread events: %r' % list(mc.backlog))
        return mc.recv_raw_frame(timeout)[2]

    def expect_quiet(self, mc, duration=0.3, what=''):
        """Nothing (no frame, no partial frame, no EOF) arrives on mc."""
        self.assertFalse(mc.backlog, '%s: unexpected events %r'
                         % (what, list(mc.backlog)))
        try:
            _, _, raw = mc.recv_raw_frame(duration)
        except TimeoutError:
            self.assertEqual(bytes(mc.buf), b'',
                             '%s: partial frame received' % what)
            return
        except EOFError:
            self.fail('%s: mux connection closed unexpectedly' % what)
        self.fail('%s: unexpected mux frame %s' % (what, raw[:64].hex()))

    def assert_arrival(self, arrival, fs):
        self.assertIsNotNone(arrival, 'no ARRIVAL attribute')
        self.assertRegex(arrival, r'^[0-9]+\.[0-9]{6}$',
                         'ARRIVAL not sec.usec with 6-digit usec')
        t = float(arrival)
        self.assertGreaterEqual(t, fs.t0 - 1.0, 'ARRIVAL before the connect')
        self.assertLessEqual(t, fs.t1 + 1.0, 'ARRIVAL after the handshake')

    def assert_update(self, raw, vp_id, fs, name=None, extra=()):
        """raw is exactly VP_UPDATE(vp_id) for fs: NAME (if name is not
        None), ARRIVAL near fs's handshake, IPV4 127.0.0.1, then extra."""
        arrival = arrival_of(raw)
        self.assert_arrival(arrival, fs)
        attrs = []
        if name is not None:
            attrs.append((A_NAME, name))
        attrs += [(A_ARRIVAL, arrival), (A_IPV4, '127.0.0.1')]
        attrs += list(extra)
        want = vp_update_frame(vp_id, attrs)
        self.assertEqual(raw.hex(), want.hex(),
                         'VP_UPDATE(%d) bytes differ' % vp_id)

    def roundtrip(self, fs, rid, mc=None, chan=None, uc=None, tag=b'x'):
        """Data both ways between fs's remote channel rid and either mux
        client mc's channel chan or the -U client uc."""
        up = b'up ' + tag + b' ' + os.urandom(6).hex().encode() + b'\n'
        down = b'down ' + tag + b' ' + os.urandom(6).hex().encode() + b'\n'
        if mc is not None:
            mc.send(chan, up)
        else:
            uc.send(up)
        self.assertEqual(fs.recv_channel_data(rid, len(up), 5), up)
        fs.send_data(rid, down)
        if mc is not None:
            self.assertEqual(mc.recv_channel_data(chan, len(down), 5), down)
        else:
            self.assertEqual(uc.recv_exact(len(down), 5), down)

    def open_chan(self, mc, fs, vp_id, chan):
        """CHANNEL_OPEN(vp_id, chan) on mc; returns the remote channel id
        fs sees in CHANNEL_NEW."""
        mc.open(vp_id, chan)
        return fs.wait_channel_new(5)

    def wait_log_after(self, d, offset, regex, timeout=5):
        rx = re.compile(regex)
        deadline = time.monotonic() + timeout
        while True:
            if rx.search(d.log()[offset:]):
                return
            if time.monotonic() >= deadline:
                self.fail('log did not match %r within %.1fs; new log:\n%s'
                          % (regex, timeout, d.log()[offset:][-3000:]))
            time.sleep(0.05)


# ---------------------------------------------------------------------------
# 5.4, 5.5, 5.7: VP_UPDATE, GO, VP_DEPART
# ---------------------------------------------------------------------------

class BurstTest(MuxTestBase):

    def test_burst_exact_bytes(self):
        d = self.daemon()
        v1 = self.vp(d, name='vp.one')
        v2 = self.vp(d)                 # no monitor name
        v3 = self.vp(d, name='')        # empty monitor name (name_len 1)
        mc = self.mux(d)
        self.assert_update(self.raw_next(mc), 1, v1, name='vp.one')
        self.assert_update(self.raw_next(mc), 2, v2)
        self.assert_update(self.raw_next(mc), 3, v3, name='')
        self.assertEqual(self.raw_next(mc).hex(), GO_BYTES.hex())
        self.expect_quiet(mc, 0.3, 'after GO')

    def test_burst_order_and_library_view(self):
        d = self.daemon()
        v1 = self.vp(d, name='first')
        self.vp(d, name='second')
        mc, vps = self.burst(d)
        self.assertEqual([v['id'] for v in vps], [1, 2])
        self.assertEqual([v['name'] for v in vps], ['first', 'second'])
        for v in vps:
            self.assertEqual(v['attr_order'], [A_NAME, A_ARRIVAL, A_IPV4])
            self.assertEqual(v['ipv4'], '127.0.0.1')
            self.assertNotIn('ipv6', v)
        self.assert_arrival(vps[0]['arrival'], v1)
        # the two arrivals are ordered
        self.assertLessEqual(float(vps[0]['arrival']),
                             float(vps[1]['arrival']))

    def test_arrival_usec_zero_padded(self):
        # handshake early in a wall-clock second so that usec < 100000
        d = self.daemon()
        mc, _ = self.burst(d)
        deadline = time.monotonic() + 3
        while not 0.005 <= time.time() % 1 <= 0.04:
            self.assertLess(time.monotonic(), deadline)
            time.sleep(0.002)
        v1 = self.vp(d, name='early')
        raw = self.raw_next(mc)
        self.assert_update(raw, 1, v1, name='early')
        if int(v1.t0) == int(v1.t1) and v1.t1 % 1 < 0.09:
            self.assertRegex(arrival_of(raw), r'^[0-9]+\.0[0-9]{5}$')

    def test_client_before_any_vp_gets_only_go(self):
        d = self.daemon()
        mc = self.mux(d)
        self.assertEqual(self.raw_next(mc).hex(), GO_BYTES.hex())
        self.expect_quiet(mc, 0.3, 'after GO')

    def test_new_vp_after_go_one_update_each(self):
        d = self.daemon()
        mc, vps = self.burst(d)
        self.assertEqual(vps, [])
        v1 = self.vp(d, name='late.vp')
        self.assert_update(self.raw_next(mc), 1, v1, name='late.vp')
        self.expect_quiet(mc, 0.2, 'after first VP_UPDATE')
        v2 = self.vp(d)
        self.assert_update(self.raw_next(mc), 2, v2)
        self.expect_quiet(mc, 0.3, 'after second VP_UPDATE')
        # a later client sees both, in accept order
        _, vps = self.burst(d)
        self.assertEqual([v['id'] for v in vps], [1, 2])

    def test_freed_vp_departs(self):
        d = self.daemon(zombie=0)
        mc, _ = self.burst(d)
        v1 = self.vp(d, name='dep.one')
        v2 = self.vp(d, name='dep.two')
        self.assertEqual(mc.recv(5)[1]['id'], 1)
        self.assertEqual(mc.recv(5)[1]['id'], 2)
        # an open mux channel on the departing VP gets no CHANNEL_CLOSE
        rid = self.open_chan(mc, v1, 1, 1)
        self.roundtrip(v1, rid, mc, 1)
        v1.close()
        self.assertEqual(self.raw_next(mc).hex(), depart_frame(1).hex())
        self.expect_quiet(mc, 0.3, 'after VP_DEPART')
        # data for the dropped channel is discarded, client stays up
        mc.send(1, b'ping -c 1 192.0.2.1\n')
        self.expect_quiet(mc, 0.2, 'after data on a dropped channel')
        _, vps = self.burst(d)
        self.assertEqual([v['id'] for v in vps], [2])
        # VP ids are never reused
        v3 = self.vp(d, name='dep.three')
        self.assert_update(self.raw_next(mc), 3, v3, name='dep.three')
        v2.close()
        self.assertEqual(self.raw_next(mc).hex(), depart_frame(2).hex())
        self.expect_quiet(mc, 0.2, 'after second VP_DEPART')

    def test_expired_zombie_departs(self):
        d = self.daemon(zombie=1)
        mc, _ = self.burst(d)
        v1 = self.vp(d, name='short.lived')
        self.assertEqual(mc.recv(5)[1]['id'], 1)
        v1.close()
        self.assertEqual(self.raw_next(mc, 6).hex(), depart_frame(1).hex())
        self.assertEqual(probe_res(d.port, v1.magic), 'REJ')

    def test_no_depart_for_connections_that_never_were_vps(self):
        d = self.daemon(zombie=60)
        mc, _ = self.burst(d)
        vp = self.vp(d, name='res.vp')
        self.assertEqual(mc.recv(5)[1]['id'], 1)

        # 1. garbage first bytes
        s = socket.create_connection((d.connect_host, d.port), timeout=5)
        self.addCleanup(s.close)
        s.sendall(b'GET / HTTP/1.0\r\n\r\n' + os.urandom(64))
        scr.wait_closed(s, 5)
        s.close()
        # 2. a handshake that fails (space in the monitor name)
        bad = self.fake(d, name='bad name')
        bad.connect()
        bad.send_new()
        bad.expect_closed(5)
        # 3. a MASTER_NEW reusing a known magic
        dup = self.fake(d, name='dup.vp', magic=vp.magic)
        dup.connect()
        dup.send_new()
        dup.expect_closed(5)
        # 4. a connection closed before saying anything
        s = socket.create_connection((d.connect_host, d.port), timeout=5)
        s.close()
        # 5. a rejected resume
        self.assertEqual(probe_res(d.port, os.urandom(8)), 'REJ')
        # 6. successful resumes: taking over the live session, then
        #    resuming after a clean disconnect
        vp.resume(close_old=False)
        scr.wait_closed(vp.prev_sock, 5)
        vp.prev_sock.close()
        vp.resume()
        fs_rid = self.open_chan(mc, vp, 1, 1)
        self.roundtrip(vp, fs_rid, mc, 1)

        time.sleep(0.2)
        # the next thing the mux client sees is the sentinel VP's update,
        # with id 2: no VP_DEPART for any of the above, no id consumed
        sentinel = self.vp(d, name='sentinel')
        self.assert_update(self.raw_next(mc), 2, sentinel, name='sentinel')
        self.expect_quiet(mc, 0.3, 'after sentinel VP_UPDATE')


# ---------------------------------------------------------------------------
# 6: metadata
# ---------------------------------------------------------------------------

def meta_lines(name, pairs):
    return ''.join('%s %s %s\n' % (name, k, v) for k, v in pairs)


class MetadataTest(MuxTestBase):

    def test_fixture_intact(self):
        with open(META_FULL, 'rb') as f:
            data = f.read()
        self.assertIn(b'\nmeta.vp cc  us  \n', data,
                      'meta_full.txt lost its trailing whitespace')
        self.assertIn(b'\nmeta.vp TAG third  tag \n', data,
                      'meta_full.txt lost its trailing whitespace')
        self.assertIn(b'\nmeta.vp\tASN6\tAS64501\n', data,
                      'meta_full.txt lost its tabs')
        self.assertIn(b'\n  cc leading whitespace', data,
                      'meta_full.txt lost its leading whitespace')

    def test_every_key_exact_update(self):
        d = self.daemon(meta=META_FULL)
        mc, _ = self.burst(d)
        v1 = self.vp(d, name='meta.vp')
        # broadcast after GO
        self.assert_update(self.raw_next(mc), 1, v1, name='meta.vp',
                           extra=META_FULL_ATTRS)
        # and in a new client's burst
        mc2 = self.mux(d)
        self.assert_update(self.raw_next(mc2), 1, v1, name='meta.vp',
                           extra=META_FULL_ATTRS)
        self.assertEqual(self.raw_next(mc2).hex(), GO_BYTES.hex())

    def test_metadata_only_for_exact_name(self):
        d = self.daemon(meta=META_FULL)
        v_upper = self.vp(d, name='Meta.VP')
        v_mixed = self.vp(d, name='meta.VP')
        v_none = self.vp(d)     # must not match the NAME "" line
        v_other = self.vp(d, name='other.vp')
        v_prefix = self.vp(d, name='meta.vpx')
        mc = self.mux(d)
        self.assert_update(self.raw_next(mc), 1, v_upper, name='Meta.VP',
                           extra=[(A_CC, 'XX'), (A_TAG, 'upper')])
        self.assert_update(self.raw_next(mc), 2, v_mixed, name='meta.VP')
        self.assert_update(self.raw_next(mc), 3, v_none)
        self.assert_update(self.raw_next(mc), 4, v_other, name='other.vp',
                           extra=[(A_CC, 'ZZ')])
        self.assert_update(self.raw_next(mc), 5, v_prefix, name='meta.vpx')
        self.assertEqual(self.raw_next(mc).hex(), GO_BYTES.hex())

    def test_large_update_is_announced(self):
        tags = ['t%02d-' % i + 'abcdefghijklmnopqrstuvwxyz0123456789'[:36]
                for i in range(40)]
        for t in tags:
            self.assertEqual(len(t), 40)
        meta = meta_lines('big.vp', [('tag', t) for t in tags])
        meta += meta_lines('big.vp', [('place', 'P' * 200)])
        d = self.daemon(meta=meta)
        mc, _ = self.burst(d)
        v1 = self.vp(d, name='big.vp')
        extra = [(A_PLACE, 'P' * 200)] + [(A_TAG, t) for t in tags]
        raw = self.raw_next(mc)
        self.assertGreater(len(raw), 1024)
        self.assert_update(raw, 1, v1, name='big.vp', extra=extra)
        # the same in a later client's burst
        mc2, vps = self.burst(d)
        self.assertEqual(len(vps), 1)
        self.assertEqual(vps[0]['tags'], tags)
        self.assertEqual(vps[0]['raw'], raw)

    def test_sighup_reload(self):
        v1_meta = meta_lines('hup.vp', [('cc', 'au'), ('place', 'Old Town'),
                                        ('tag', 'old')])
        v2_meta = meta_lines('hup.vp', [('cc', 'nz'), ('tag', 'new1'),
                                        ('tag', 'new2')])
        v3_bad = meta_lines('hup.vp', [('cc', 'bad')]) + 'hup.vp tag\n'
        v4_meta = meta_lines('hup.vp', [('asn4', '64512')])
        d = self.daemon(meta=v1_meta)
        fs = self.vp(d, name='hup.vp')
        mc, vps = self.burst(d)
        self.assertEqual((vps[0]['cc'], vps[0]['place'], vps[0]['tags']),
                         ('au', 'Old Town', ['old']))

        def reload_and_wait(content, want_cc, want_asn4=None):
            d.write_meta(content)
            d.signal(signal.SIGHUP)
            deadline = time.monotonic() + 5
            while True:
                c = scr.MuxClient(d.mux_path)
                try:
                    got = c.read_burst(5)[0]
                finally:
                    c.close()
                if got.get('cc') == want_cc and \
                        got.get('asn4') == want_asn4:
                    return got
                self.assertLess(time.monotonic(), deadline,
                                'metadata not reloaded: %r' % got)
                time.sleep(0.1)

        got = reload_and_wait(v2_meta, 'nz')
        self.assertEqual(got['attr_order'],
                         [A_NAME, A_ARRIVAL, A_IPV4, A_CC, A_TAG, A_TAG])
        self.assertEqual(got['tags'], ['new1', 'new2'])
        self.assertNotIn('place', got)
        # nothing is re-sent to a client that already knew the VP
        self.expect_quiet(mc, 0.2, 'after reload')
        # a VP arriving now is announced with the new metadata
        fs2 = self.vp(d, name='hup.vp')
        self.assert_update(self.raw_next(mc), 2, fs2, name='hup.vp',
                           extra=[(A_CC, 'nz'), (A_TAG, 'new1'),
                                  (A_TAG, 'new2')])

        # a malformed file: old table kept, error logged naming the file
        for what, action in (('malformed', lambda: d.write_meta(v3_bad)),
                             ('missing', lambda: os.unlink(d.meta_path))):
            with self.subTest(what):
                off = len(d.log())
                action()
                d.signal(signal.SIGHUP)
                self.wait_log_after(d, off, re.escape(d.meta_path))
                self.assertTrue(d.alive(), 'sc_remoted died on SIGHUP')
                _, vps = self.burst(d)
                self.assertEqual([v['cc'] for v in vps], ['nz', 'nz'])
                self.assertEqual(vps[0]['tags'], ['new1', 'new2'])
        # and a good file loads again afterwards
        got = reload_and_wait(v4_meta, None, '64512')
        self.assertEqual(got['attr_order'],
                         [A_NAME, A_ARRIVAL, A_IPV4, A_ASN4])

    # -- startup failures -----------------------------------------------------

    def run_bad_meta(self, meta_path):
        tmp = tempfile.mkdtemp(prefix='scr-mux-')
        self.addCleanup(shutil.rmtree, tmp, True)
        mux = os.path.join(tmp, 'mux')
        args = ['-P', '127.0.0.1:%d' % scr.free_port(), '-M', mux,
                '-m', meta_path]
        if not scr.is_legacy():
            args += ['-O', 'notimes']
        rc, out, err = run_cli(args, timeout=10)
        self.assertEqual(rc, 255, 'exit status %r; stderr:\n%s' % (rc, err))
        self.assertFalse(os.path.exists(mux),
                         'mux socket left behind after the failed start')
        return err

    def assert_names_line(self, err, path, line):
        self.assertIn(path, err, 'error does not name the file')
        pat = r'(%s:%d\b|\bline\s*:?\s*%d\b)' % (re.escape(path), line, line)
        self.assertRegex(err, pat, 'error does not give line %d' % line)

    def test_startup_line_without_value(self):
        err = self.run_bad_meta(META_BAD_NOVALUE)
        self.assert_names_line(err, META_BAD_NOVALUE, 5)

    def test_startup_whitespace_only_line(self):
        err = self.run_bad_meta(META_BAD_BLANK)
        self.assert_names_line(err, META_BAD_BLANK, 4)

    def test_startup_missing_file(self):
        tmp = tempfile.mkdtemp(prefix='scr-mux-')
        self.addCleanup(os.rmdir, tmp)
        self.run_bad_meta(os.path.join(tmp, 'no-such-file'))

    def test_startup_unreadable_file(self):
        tmp = tempfile.mkdtemp(prefix='scr-mux-')
        self.addCleanup(shutil.rmtree, tmp, True)
        # a directory opens but cannot be read, even by root
        self.run_bad_meta(tmp)
        if os.geteuid() != 0:
            p = os.path.join(tmp, 'meta.txt')
            with open(p, 'w') as f:
                f.write('x.vp cc us\n')
            os.chmod(p, 0)
            self.run_bad_meta(p)


# ---------------------------------------------------------------------------
# 5.6: channels
# ---------------------------------------------------------------------------

class ChannelTest(MuxTestBase):

    def setup_vp(self, name='chan.vp', **dkw):
        d = self.daemon(**dkw)
        fs = self.vp(d, name=name)
        mc, vps = self.burst(d)
        self.assertEqual([v['id'] for v in vps], [1])
        return d, fs, mc

    def test_open_and_data_both_ways(self):
        d, fs, mc = self.setup_vp()
        rid = self.open_chan(mc, fs, 1, 7)
        self.assertNotEqual(rid, 0)
        # scamper -> client: each remote data frame is one mux frame
        frames = [b'MORE\n', b'OK id-1\n', os.urandom(3000), b'D' * 65535,
                  b'\n']
        for p in frames:
            fs.send_data(rid, p)
        for p in frames:
            raw = self.raw_next(mc)
            self.assertEqual(raw[:8].hex(), struct.pack('>II', 7, len(p)).hex())
            self.assertTrue(raw[8:] == p, 'payload differs (%d bytes)' % len(p))
        fs.wait_acked(5)
        # client -> scamper: in order on the remote channel
        pieces = [b'ping -c 1 192.0.2.1\n', os.urandom(10000), b'x',
                  b'done\n']
        for p in pieces:
            mc.send(7, p)
        want = b''.join(pieces)
        self.assertTrue(fs.recv_channel_data(rid, len(want), 5) == want)
        fs.pump(0.2)
        self.assertEqual({c: bytes(v) for c, v in fs.chan_data.items() if v},
                         {}, 'stray channel data')
        self.assertEqual(set(f.chan for f in fs.log if f.chan != 0), {rid})
        self.expect_quiet(mc, 0.1)

    def test_two_channels_get_distinct_remote_ids(self):
        d, fs, mc = self.setup_vp()
        r1 = self.open_chan(mc, fs, 1, 1)
        r2 = self.open_chan(mc, fs, 1, 2)
        self.assertNotEqual(r1, r2)
        fs.send_data(r2, b'two\n')
        fs.send_data(r1, b'one\n')
        self.assertEqual(mc.recv(5), ('data', 2, b'two\n'))
        self.assertEqual(mc.recv(5), ('data', 1, b'one\n'))
        mc.send(2, b'to two\n')
        mc.send(1, b'to one\n')
        self.assertEqual(fs.recv_channel_data(r2, 7), b'to two\n')
        self.assertEqual(fs.recv_channel_data(r1, 7), b'to one\n')

    def test_scamper_fin_closes_channel(self):
        d, fs, mc = self.setup_vp()
        rid = self.open_chan(mc, fs, 1, 3)
        fs.send_data(rid, b'OK\n')
        fs.send_fin(rid)
        self.assertEqual(mc.recv(5), ('data', 3, b'OK\n'))
        self.assertEqual(self.raw_next(mc).hex(), close_frame(3).hex())
        fs.wait_acked(5)
        fs.pump(0.5)
        self.assertNotIn(rid, fs.fins, 'remoted answered FIN with FIN')
        self.expect_quiet(mc, 0.1, 'after CHANNEL_CLOSE')
        # scamper has forgotten the channel: client data for it is dropped
        # (scamper treats data for an unknown channel as fatal)
        start = len(fs.log)
        mc.send(3, b'ping -c 1 192.0.2.1\n')
        fs.pump(0.3)
        self.assertEqual([f for f in fs.log[start:] if f.chan != 0], [],
                         'data forwarded on a channel scamper closed')
        self.expect_quiet(mc, 0.1, 'after data on a closed channel')
        # disconnecting afterwards sends no FIN for that channel either
        mc.close()
        fs.pump(0.5)
        self.assertNotIn(rid, fs.fins, 'FIN for a channel scamper closed')

    def test_repeated_fin_and_late_data_ignored(self):
        # a confused scamper: FIN twice, then data on the finished channel;
        # the client sees exactly one CHANNEL_CLOSE and no data after it
        d, fs, mc = self.setup_vp()
        rid = self.open_chan(mc, fs, 1, 4)
        fs.send_fin(rid)
        fs.send_fin(rid)
        fs.send_data(rid, b'late\n')
        self.assertEqual(self.raw_next(mc).hex(), close_frame(4).hex())
        fs.wait_acked(5)
        self.expect_quiet(mc, 0.3, 'after the first CHANNEL_CLOSE')
        self.assertTrue(d.alive())

    def test_client_disconnect_fins_open_channels(self):
        d, fs, mc = self.setup_vp()
        r1 = self.open_chan(mc, fs, 1, 1)
        r2 = self.open_chan(mc, fs, 1, 2)
        r3 = self.open_chan(mc, fs, 1, 3)
        fs.send_fin(r2)
        self.assertEqual(mc.recv(5), ('close', 2))
        # a second client's channel is unaffected by the first leaving
        mc2, _ = self.burst(d)
        r4 = self.open_chan(mc2, fs, 1, 1)
        mc.close()
        fs.wait_fin(r1, 5)
        fs.wait_fin(r3, 5)
        fs.pump(0.5)
        self.assertEqual(fs.fins, {r1, r3})
        fins = [f for f in fs.log if f.chan == 0 and f.type == scr.CHANNEL_FIN]
        self.assertEqual(len(fins), 2, 'FINs: %r' % fins)
        self.roundtrip(fs, r4, mc2, 1)

    def test_unknown_channel_data_discarded(self):
        d, fs, mc = self.setup_vp()
        mc.send(99, b'nobody listens\n')
        mc.send(0xffffffff, b'nor here\n')
        rid = self.open_chan(mc, fs, 1, 1)
        mc.send(2, b'not opened either\n')
        mc.send(1, b'hello\n')
        self.assertEqual(fs.recv_channel_data(rid, 6), b'hello\n')
        fs.pump(0.3)
        self.assertEqual(set(f.chan for f in fs.log if f.chan != 0), {rid})
        self.assertEqual(bytes(fs.chan_data[rid]), b'')
        self.roundtrip(fs, rid, mc, 1)

    def test_client_close_and_unknown_types_ignored(self):
        d, fs, mc = self.setup_vp()
        rid = self.open_chan(mc, fs, 1, 1)
        mc.send_control(CHANNEL_CLOSE, struct.pack('>I', 1))
        for t in (VP_UPDATE, VP_DEPART, GO, 5, 99, 0xffff):
            mc.send_control(t, b'')
            mc.send_control(t, b'\x00\x00\x00\x01' * 3)
        self.roundtrip(fs, rid, mc, 1)
        fs.pump(0.3)
        self.assertNotIn(rid, fs.fins, 'client CHANNEL_CLOSE sent a FIN')
        self.assertEqual(list(fs.new_channels), [])
        self.expect_quiet(mc, 0.1)

    def test_large_frames_split_at_65535(self):
        d, fs, mc = self.setup_vp()
        rid = self.open_chan(mc, fs, 1, 1)
        for size in (65535, 65536, 200000):
            with self.subTest(size=size):
                start = len(fs.log)
                data = os.urandom(size)
                mc.send(1, data)
                got = fs.recv_channel_data(rid, size, 10)
                self.assertTrue(got == data, 'content differs')
                frames = [f for f in fs.log[start:] if f.chan == rid]
                self.assertLessEqual(max(len(f.payload) for f in frames),
                                     65535)
                self.assertGreaterEqual(len(frames), -(-size // 65535))
        self.roundtrip(fs, rid, mc, 1)

    def test_open_byte_by_byte_and_coalesced(self):
        d, fs, mc = self.setup_vp()
        msg = open_msg(1, 9) + mux_frame(9, b'hi\n')
        for b in msg:
            mc.send_raw(bytes([b]))
            time.sleep(0.01)
        rid = fs.wait_channel_new(5)
        self.assertEqual(fs.recv_channel_data(rid, 3), b'hi\n')
        # several messages in one write
        mc.send_raw(open_msg(1, 10) + mux_frame(10, b'ten\n') +
                    open_msg(1, 11) + mux_frame(11, b'eleven\n'))
        r10 = fs.wait_channel_new(5)
        r11 = fs.wait_channel_new(5)
        self.assertEqual(fs.recv_channel_data(r10, 4), b'ten\n')
        self.assertEqual(fs.recv_channel_data(r11, 7), b'eleven\n')
        # a control message split at every possible point, with data
        for cut in range(1, 18):
            chan = 100 + cut
            m = open_msg(1, chan) + mux_frame(chan, b'c\n')
            mc.send_raw(m[:cut])
            time.sleep(0.02)
            mc.send_raw(m[cut:])
            r = fs.wait_channel_new(5)
            self.assertEqual(fs.recv_channel_data(r, 2), b'c\n')
        self.roundtrip(fs, rid, mc, 9)

    def test_fifty_channels_five_vps(self):
        d = self.daemon()
        fakes = [self.vp(d, name='cc%d' % i) for i in range(5)]
        mc, vps = self.burst(d)
        ids = {v['name']: v['id'] for v in vps}
        self.assertEqual(len(ids), 5)
        nchan = 50
        owner = {c: fakes[(c - 1) % 5] for c in range(1, nchan + 1)}
        for c in range(1, nchan + 1):
            mc.open(ids[owner[c].name], c)
        rid = {}
        for c in range(1, nchan + 1):
            rid[c] = owner[c].wait_channel_new(5)
        for fs in fakes:
            rs = [rid[c] for c in rid if owner[c] is fs]
            self.assertEqual(len(set(rs)), 10)
        size = 65536
        up = {c: os.urandom(size) for c in rid}
        down = {c: os.urandom(size) for c in rid}
        rng = random.Random(1234)
        off = 0
        deadline = time.monotonic() + 60
        while off < size:
            n = min(size - off, rng.choice((1000, 4096, 3333, 8192)))
            order = list(rid)
            rng.shuffle(order)
            for c in order:
                mc.send(c, up[c][off:off + n])
            for c in order:
                fs, r = owner[c], rid[c]
                got = fs.recv_channel_data(r, n, 10)
                self.assertTrue(got == up[c][off:off + n],
                                'client->scamper data differs on chan %d at '
                                '%d' % (c, off))
            rng.shuffle(order)
            for c in order:
                owner[c].send_data(rid[c], down[c][off:off + n])
            for c in order:
                got = mc.recv_channel_data(c, n, 10)
                self.assertTrue(got == down[c][off:off + n],
                                'scamper->client data differs on chan %d at '
                                '%d' % (c, off))
            off += n
            self.assertLess(time.monotonic(), deadline, 'too slow')
        for fs in fakes:
            fs.pump(0.1)
            self.assertEqual([c for c, v in fs.chan_data.items() if v], [])
        self.assertEqual(list(mc.backlog), [])
        self.assertEqual({c: bytes(v) for c, v in mc.chan_data.items() if v},
                         {})
        self.expect_quiet(mc, 0.1)


# ---------------------------------------------------------------------------
# 5.3, 5.6, 5.8: errors close only the offending mux client
# ---------------------------------------------------------------------------

class ErrorTest(MuxTestBase):

    def check_closes_only_victim(self, bad, reuse_first=False, fin_first=False,
                                 new_channels=0):
        """bad(victim) misbehaves; the victim must be closed while a
        bystander mux client and a -U client keep working."""
        d = self.d = self.daemon(udir=True)
        fs = self.vp(d, name='err.vp')
        fs2 = self.vp(d, name='err.two')
        uc = self.uclient(d.wait_socket('err.vp-*'))
        ru = fs.wait_channel_new(5)
        by, vps = self.burst(d)
        self.assertEqual(len(vps), 2)
        rb = self.open_chan(by, fs, 1, 1)
        victim, vps = self.burst(d)
        self.assertEqual(len(vps), 2)
        rv = None
        if reuse_first:
            rv = self.open_chan(victim, fs, 1, 5)
            self.roundtrip(fs, rv, victim, 5)
            if fin_first:
                fs.send_fin(rv)
                self.assertEqual(victim.recv(5), ('close', 5))
        bad(victim)
        victim.expect_closed(5)
        fs.pump(0.3)
        fs2.pump(0.1)
        self.assertEqual(len(fs.new_channels) + len(fs2.new_channels),
                         new_channels, 'CHANNEL_NEW sent for a bad open')
        if rv is not None:
            if fin_first:
                self.assertNotIn(rv, fs.fins)
            else:
                self.assertIn(rv, fs.fins, 'no FIN for the closed client')
        # the others keep working
        self.roundtrip(fs, rb, by, 1, tag=b'bystander')
        self.roundtrip(fs, ru, uc=uc, tag=b'unix')
        self.expect_quiet(by, 0.1)
        self.assertTrue(d.alive())
        _, vps = self.burst(d)
        self.assertEqual([v['id'] for v in vps], [1, 2])

    def test_open_unknown_vp(self):
        self.check_closes_only_victim(lambda mc: mc.open(9999, 1))

    def test_open_vp_zero(self):
        # upstream could match a session still in its handshake (id 0)
        def bad(mc):
            pending = socket.create_connection((self.d.connect_host,
                                                self.d.port), timeout=5)
            self.addCleanup(pending.close)
            time.sleep(0.1)
            mc.open(0, 1)
            self.pending = pending
        self.check_closes_only_victim(bad)
        # the pending connection was not sent anything
        self.pending.settimeout(0.2)
        try:
            got = self.pending.recv(100)
        except socket.timeout:
            got = None
        self.assertIsNone(got, 'handshake connection got %r' % (got,))

    def test_open_channel_zero(self):
        self.check_closes_only_victim(lambda mc: mc.open(1, 0))

    def test_open_reused_channel(self):
        self.check_closes_only_victim(lambda mc: mc.open(1, 5),
                                      reuse_first=True)

    def test_open_reused_channel_other_vp(self):
        self.check_closes_only_victim(lambda mc: mc.open(2, 5),
                                      reuse_first=True)

    def test_open_reused_channel_after_fin(self):
        self.check_closes_only_victim(lambda mc: mc.open(1, 5),
                                      reuse_first=True, fin_first=True)

    def test_control_len_zero(self):
        self.check_closes_only_victim(lambda mc: mc.send_raw(mux_frame(0, b'')))

    def test_control_len_one(self):
        self.check_closes_only_victim(
            lambda mc: mc.send_raw(mux_frame(0, b'\x00')))

    def test_control_len_one_then_more(self):
        # the one-byte control message followed by a valid open
        self.check_closes_only_victim(
            lambda mc: mc.send_raw(mux_frame(0, b'\x03') + open_msg(1, 1)))

    def test_control_declared_over_64k(self):
        def bad(mc):
            hdr = struct.pack('>II', 0, 1 << 20) + struct.pack('>H', 99)
            try:
                mc.send_raw(hdr)
                for _ in range(9):     # 72 KiB of body, never the full 1 MiB
                    mc.send_raw(b'\0' * 8192)
            except OSError:
                pass                  # closed while sending: fine
        self.check_closes_only_victim(bad)


# ---------------------------------------------------------------------------
# 2.9, 5.7: zombies
# ---------------------------------------------------------------------------

class ZombieTest(MuxTestBase):

    def test_open_on_zombie_and_announce_on_resume(self):
        d = self.daemon(zombie=60, udir=True)
        fs = self.vp(d, name='zz.vp')
        knew, vps = self.burst(d)
        self.assertEqual([v['id'] for v in vps], [1])
        first_raw = vps[0]['raw']
        sockname = fs.expected_socket_name()
        d.wait_socket(sockname)
        fs.close()                       # -> zombie
        d.wait_socket_gone(sockname)
        # going zombie says nothing on the mux
        self.expect_quiet(knew, 0.2, 'zombie transition')
        # a client connecting now does not see the zombie
        late, vps = self.burst(d)
        self.assertEqual(vps, [])
        # channels can be opened on the zombie; the CHANNEL_NEW is queued
        knew.open(1, 3)
        knew.send(3, b'queued line\n')
        self.expect_quiet(knew, 0.2, 'open on zombie')
        self.assertTrue(d.alive())
        fs.resume()
        rid = fs.wait_channel_new(5)
        self.assertEqual(fs.recv_channel_data(rid, 12), b'queued line\n')
        # the late client learns about the VP now, the other does not
        raw = self.raw_next(late)
        self.assertEqual(raw, first_raw,
                         'VP_UPDATE on resume differs from the original')
        self.expect_quiet(late, 0.3, 'after resume VP_UPDATE')
        self.expect_quiet(knew, 0.1, 'client that knew the VP')
        # the queued channel works
        fs.send_data(rid, b'MORE\n')
        self.assertEqual(knew.recv(5), ('data', 3, b'MORE\n'))
        self.roundtrip(fs, rid, knew, 3)
        # a client connecting after the resume sees the VP once
        _, vps = self.burst(d)
        self.assertEqual([v['id'] for v in vps], [1])
        self.assertEqual(vps[0]['raw'], first_raw)


if __name__ == '__main__':
    scr.main()
