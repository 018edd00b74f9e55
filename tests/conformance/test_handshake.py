#!/usr/bin/env python3
"""Conformance: new-session handshake (PROTOCOL.md 2.4, 2.5, 4.1, 4.2, 11)."""

import os
import socket
import struct
import sys
import time
import unittest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                '..', 'lib'))
import scr  # noqa: E402
from scr import (Daemon, UnixClient, pack_frame, pack_hdr,  # noqa: E402
                 MASTER_NEW, MASTER_ID, CHANNEL_NEW, KEEPALIVE, ACK,
                 probe_res, assert_session_freed)


def new_payload(magic, name_field=b''):
    return bytes([MASTER_NEW, len(magic)]) + magic + name_field


class HandshakeTest(unittest.TestCase):

    def daemon(self, **kw):
        d = Daemon(**kw)
        self.addCleanup(d.__exit__, None, None, None)
        d.wait_listening()
        return d

    def fake(self, d, **kw):
        fs = d.fake(**kw)
        self.addCleanup(fs.close)
        return fs

    def expect_rejected_new(self, d, payload, seq=0, what=''):
        """Send a first frame; remoted must close without a reply and
        create no socket; the magic must not have been registered."""
        fs = self.fake(d)
        fs.connect()
        fs.send_raw(pack_frame(seq, 0, payload))
        got = fs.expect_closed(5)
        self.assertEqual(got, b'', '%s: remoted replied %s' % (what, got.hex()))
        self.assertEqual(d.list_sockets(), [], what)
        return fs

    # -- MASTER_ID ---------------------------------------------------------

    def test_master_id_exact_bytes(self):
        d = self.daemon()
        fs = self.fake(d)
        fs.connect()
        fs.send_raw(pack_frame(0, 0, new_payload(fs.magic)))
        ident = ('127.0.0.1:%d' % fs.sport).encode() + b'\0'
        want = pack_frame(0, 0, bytes([MASTER_ID, len(ident)]) + ident)
        f = fs.recv_frame(5)
        self.assertEqual(f.raw(), want)
        self.assertEqual(fs.vp_alias, '127.0.0.1:%d' % fs.sport)
        # MASTER_ID is the only thing sent
        fs.expect_silence(0.5)

    def test_master_id_real_capture_layout(self):
        # the capture in 2.5: magic_len 8, name "test.mon"
        d = self.daemon()
        fs = self.fake(d, magic=bytes.fromhex('d6db7d642d528130'))
        fs.connect()
        fs.send_raw(bytes.fromhex('00000000000000000014' '0008d6db7d642d528130'
                                  '09746573742e6d6f6e00'))
        ident = ('127.0.0.1:%d' % fs.sport).encode() + b'\0'
        f = fs.recv_frame(5)
        self.assertEqual(f.raw(), pack_frame(0, 0, bytes([1, len(ident)]) +
                                             ident))
        self.assertEqual(d.list_sockets(), ['test.mon-127.0.0.1:%d' % fs.sport])

    def test_new_delivered_byte_by_byte(self):
        d = self.daemon()
        fs = self.fake(d, name='slow.vp')
        fs.connect()
        raw = pack_frame(0, 0, fs.new_payload('slow.vp'))
        for b in raw:
            fs.send_raw(bytes([b]))
            time.sleep(0.005)
        f = fs.recv_frame(5)
        self.assertEqual(f.type, MASTER_ID)
        self.assertEqual(fs.vp_alias, fs.peer_id)
        d.wait_socket(fs.expected_socket_name())

    def test_new_coalesced_with_keepalive(self):
        d = self.daemon()
        fs = self.fake(d)
        fs.connect()
        fs.send_raw(pack_frame(0, 0, fs.new_payload()) +
                    pack_frame(0, 0, bytes([KEEPALIVE])))
        f = fs.recv_frame(5)
        self.assertEqual(f.type, MASTER_ID)
        path = d.wait_socket(fs.expected_socket_name())
        # session usable: a local client gets a channel
        c = UnixClient(path)
        self.addCleanup(c.close)
        self.assertEqual(fs.wait_channel_new(5), 1)

    def test_magic_lengths(self):
        d = self.daemon()
        for n in (1, 16, 255):
            with self.subTest(magic_len=n):
                fs = self.fake(d, magic=os.urandom(n))
                self.assertEqual(fs.handshake(), fs.peer_id)
                d.wait_socket(fs.expected_socket_name())

    # -- socket names ------------------------------------------------------

    def test_socket_name_with_name(self):
        d = self.daemon()
        fs = self.fake(d, name='test.mon')
        fs.handshake()
        d.wait_socket('test.mon-*')
        self.assertEqual(d.list_sockets(), ['test.mon-127.0.0.1:%d' % fs.sport])

    def test_socket_name_without_name(self):
        d = self.daemon()
        fs = self.fake(d)
        fs.handshake()
        d.wait_socket('*')
        self.assertEqual(d.list_sockets(), ['127.0.0.1:%d' % fs.sport])

    def test_socket_name_empty_name(self):
        d = self.daemon()
        fs = self.fake(d, name='')
        fs.connect()
        # name_len 1: just the NUL
        fs.send_raw(pack_frame(0, 0, new_payload(fs.magic, b'\x01\x00')))
        fs.expect_control(MASTER_ID, 5, strict=True)
        d.wait_socket('*')
        self.assertEqual(d.list_sockets(), ['-127.0.0.1:%d' % fs.sport])

    def test_socket_name_name_len_zero(self):
        # name_len 0 means "no name"
        d = self.daemon()
        fs = self.fake(d)
        fs.connect()
        fs.send_raw(pack_frame(0, 0, new_payload(fs.magic, b'\x00')))
        fs.expect_control(MASTER_ID, 5, strict=True)
        d.wait_socket('*')
        self.assertEqual(d.list_sockets(), ['127.0.0.1:%d' % fs.sport])

    def test_bytes_after_name_ignored(self):
        d = self.daemon()
        fs = self.fake(d)
        fs.connect()
        fs.send_raw(pack_frame(0, 0, new_payload(fs.magic, b'\x04ab9\x00'
                                                 b'junk\xff\x00')))
        fs.expect_control(MASTER_ID, 5, strict=True)
        d.wait_socket('*')
        self.assertEqual(d.list_sockets(), ['ab9-127.0.0.1:%d' % fs.sport])

    def test_socket_path_too_long(self):
        d = self.daemon()
        name = 'n' * (120 - len(d.udir))
        fs = self.fake(d, name=name)
        fs.connect()
        self.assertGreater(len(os.path.join(d.udir, fs.expected_socket_name())),
                           107)
        fs.send_new()
        self.assertEqual(fs.expect_closed(5), b'')
        self.assertEqual(d.list_sockets(), [])
        # the magic is not left registered
        self.assertEqual(probe_res(d.port, fs.magic), 'REJ')
        fs2 = self.fake(d, name='short')
        fs2.handshake()
        d.wait_socket(fs2.expected_socket_name())

    def test_socket_name_exists(self):
        d = self.daemon()
        port = scr.free_port()

        def factory():
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(('127.0.0.1', port))
            s.settimeout(5)
            s.connect(('127.0.0.1', d.port))
            return s
        fs = self.fake(d, name='clash', sock_factory=factory)
        blocker = os.path.join(d.udir, 'clash-127.0.0.1:%d' % port)
        with open(blocker, 'w') as f:
            f.write('x')
        fs.connect()
        self.assertEqual(fs.expected_socket_name(), os.path.basename(blocker))
        fs.send_new()
        self.assertEqual(fs.expect_closed(5), b'')
        # the existing file is left alone
        with open(blocker) as f:
            self.assertEqual(f.read(), 'x')
        self.assertEqual(probe_res(d.port, fs.magic), 'REJ')

    def test_two_vps_distinct_sockets(self):
        d = self.daemon()
        a = self.fake(d, name='dup')
        b = self.fake(d, name='dup')
        a.handshake()
        b.handshake()
        self.assertNotEqual(a.vp_alias, b.vp_alias)
        d.wait_socket(a.expected_socket_name())
        d.wait_socket(b.expected_socket_name())
        self.assertEqual(d.list_sockets(), sorted([a.expected_socket_name(),
                                                   b.expected_socket_name()]))

    # -- permissions ---------------------------------------------------------

    def check_mode(self, opts, want):
        mux = not scr.is_legacy()
        extra = []
        for o in opts:
            extra += ['-O', o]
        d = self.daemon(extra_args=extra, mux=mux, umask=0o022)
        fs = self.fake(d)
        fs.handshake()
        p = d.wait_socket(fs.expected_socket_name())
        self.assertEqual(scr.socket_mode(p), want,
                         'socket mode %o, want %o' % (scr.socket_mode(p), want))
        if mux:
            self.assertEqual(scr.socket_mode(d.mux_path), want,
                             'mux socket mode %o' % scr.socket_mode(d.mux_path))

    def test_socket_mode_default(self):
        self.check_mode([], 0o700)

    def test_socket_mode_allowgroup(self):
        self.check_mode(['allowgroup'], 0o770)

    def test_socket_mode_allowother(self):
        self.check_mode(['allowother'], 0o707)

    def test_socket_mode_both(self):
        self.check_mode(['allowgroup', 'allowother'], 0o777)

    def test_socket_mode_umask_zero(self):
        # the chmod after bind fixes the mode whatever the umask
        d = self.daemon(umask=0)
        fs = self.fake(d)
        fs.handshake()
        p = d.wait_socket(fs.expected_socket_name())
        self.assertEqual(scr.socket_mode(p), 0o700)

    # -- invalid MASTER_NEW --------------------------------------------------

    def test_bad_names_close(self):
        d = self.daemon()
        cases = [
            (b'\x04a_b\x00', 'underscore'),
            (b'\x04a b\x00', 'space'),
            (b'\x04a/b\x00', 'slash'),
            (b'\x04ab\xe9\x00', 'non-ascii'),
            (b'\x03abc', 'missing NUL'),
            (b'\x04ab\x00c', 'NUL not last'),
            (b'\x06abc\x00', 'name_len beyond frame'),
        ]
        for field, what in cases:
            with self.subTest(what):
                fs = self.expect_rejected_new(d, new_payload(os.urandom(8),
                                                             field), what=what)
                # the magic was not registered
                self.assertEqual(probe_res(d.port, fs.magic), 'REJ')
        self.assertTrue(d.alive())
        # the daemon still accepts good sessions
        ok = self.fake(d, name='good')
        ok.handshake()
        d.wait_socket(ok.expected_socket_name())

    def test_bad_magic_close(self):
        d = self.daemon()
        cases = [
            (bytes([MASTER_NEW, 0]), 'magic_len 0'),
            (bytes([MASTER_NEW, 8]) + b'1234567', 'magic truncated'),
            (bytes([MASTER_NEW]), 'no magic_len'),
        ]
        for payload, what in cases:
            with self.subTest(what):
                self.expect_rejected_new(d, payload, what=what)

    def test_duplicate_magic_closes_second(self):
        d = self.daemon()
        a = self.fake(d, name='first')
        a.handshake()
        pa = d.wait_socket(a.expected_socket_name())
        b = self.fake(d, name='second', magic=a.magic)
        b.connect()
        b.send_new()
        self.assertEqual(b.expect_closed(5), b'')
        time.sleep(0.2)
        self.assertEqual(d.list_sockets(), [a.expected_socket_name()])
        # the first session is unaffected
        c = UnixClient(pa)
        self.addCleanup(c.close)
        ch = a.wait_channel_new(5)
        c.send(b'ping\n')
        self.assertEqual(a.recv_channel_data(ch, 5), b'ping\n')

    def test_first_frame_seq_nonzero(self):
        d = self.daemon()
        for seq in (1, 0x80000000, 0xffffffff):
            with self.subTest(seq=seq):
                self.expect_rejected_new(d, new_payload(os.urandom(8)),
                                         seq=seq)

    def test_res_seq_nonzero_closes(self):
        d = self.daemon()
        a = self.fake(d)
        a.handshake()
        a.close()
        d.wait_socket_gone(a.expected_socket_name())
        b = self.fake(d, magic=a.magic)
        b.connect()
        b.send_raw(pack_frame(1, 0, b.res_payload(0, 0, 0)))
        self.assertEqual(b.expect_closed(5), b'')
        # a bad RES does not harm the zombie: a correct one resumes it
        c = self.fake(d, magic=a.magic)
        c.connect()
        c.send_res(0, 0, 0)
        c.expect_control(scr.MASTER_OK, 5, strict=True)

    @scr.not_legacy('headers examined only when more bytes follow')
    def test_control_len_zero_header_only(self):
        # only the 10 header bytes are sent: the recommended behaviour
        # examines the header as soon as it is complete
        d = self.daemon()
        fs = self.fake(d)
        fs.connect()
        fs.send_raw(pack_hdr(0, 0, 0))
        self.assertEqual(fs.expect_closed(5), b'')

    def test_control_len_zero_followed_by_new(self):
        d = self.daemon()
        fs = self.fake(d)
        fs.connect()
        fs.send_raw(pack_hdr(0, 0, 0) + pack_frame(0, 0, fs.new_payload()))
        self.assertEqual(fs.expect_closed(5), b'')
        self.assertEqual(d.list_sockets(), [])

    @scr.not_legacy('headers examined only when more bytes follow')
    def test_control_len_zero_in_go_mode(self):
        d = self.daemon()
        fs = self.fake(d)
        fs.handshake()
        d.wait_socket(fs.expected_socket_name())
        fs.send_raw(pack_hdr(fs.snd_nxt, 0, 0))
        assert_session_freed(d, fs)

    def test_control_len_zero_in_go_mode_followed(self):
        d = self.daemon()
        fs = self.fake(d)
        fs.handshake()
        d.wait_socket(fs.expected_socket_name())
        fs.send_raw(pack_hdr(fs.snd_nxt, 0, 0) +
                    pack_frame(fs.snd_nxt, 0, bytes([KEEPALIVE])))
        assert_session_freed(d, fs)

    def test_data_frame_before_handshake(self):
        d = self.daemon()
        fs = self.fake(d)
        fs.connect()
        fs.send_raw(pack_frame(0, 1, b'hello\n'))
        self.assertEqual(fs.expect_closed(5), b'')
        self.assertEqual(d.list_sockets(), [])

    def test_unexpected_type_in_connect_mode(self):
        d = self.daemon()
        for t in (MASTER_ID, CHANNEL_NEW, scr.CHANNEL_FIN, KEEPALIVE, ACK,
                  scr.MASTER_REJ, scr.MASTER_OK, 9, 255):
            with self.subTest(type=t):
                body = b'' if t in (KEEPALIVE, scr.MASTER_REJ) \
                    else struct.pack('>I', 0)
                self.expect_rejected_new(d, bytes([t]) + body)

    def test_second_master_new_in_go_mode(self):
        d = self.daemon(zombie=900)
        fs = self.fake(d, name='twice')
        fs.handshake()
        path = d.wait_socket(fs.expected_socket_name())
        c = UnixClient(path)
        self.addCleanup(c.close)
        ch = fs.wait_channel_new(5)
        # one data frame so that remoted's rcv_nxt is 1: the NEW below then
        # has a correct seq and fails only on its type
        fs.send_data(ch, b'MORE\n')
        self.assertEqual(c.recv_exact(5), b'MORE\n')
        fs.wait_acked(5)
        fs.send_raw(pack_frame(fs.snd_nxt, 0, fs.new_payload('twice')))
        assert_session_freed(d, fs, clients=[c])

    def test_unexpected_type_in_go_mode(self):
        d = self.daemon(zombie=900)
        cases = [
            (bytes([MASTER_NEW, 8]) + os.urandom(8), 'MASTER_NEW'),
            (bytes([MASTER_ID, 2, 0x41, 0]), 'MASTER_ID'),
            (bytes([CHANNEL_NEW]) + struct.pack('>I', 1), 'CHANNEL_NEW'),
            (None, 'MASTER_RES'),
            (bytes([scr.MASTER_REJ]), 'MASTER_REJ'),
            (bytes([scr.MASTER_OK]) + struct.pack('>I', 0), 'MASTER_OK'),
            (bytes([9]), 'type 9'),
        ]
        for payload, what in cases:
            with self.subTest(what):
                fs = self.fake(d)
                fs.handshake()
                d.wait_socket(fs.expected_socket_name())
                if payload is None:
                    payload = fs.res_payload(0, 0, 0)
                fs.send_raw(pack_frame(fs.snd_nxt, 0, payload))
                assert_session_freed(d, fs)


if __name__ == '__main__':
    scr.main()
