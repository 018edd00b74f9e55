#!/usr/bin/env python3
"""Conformance: sequence numbers, ACKs and keepalives (PROTOCOL.md 2.3,
2.4, 2.8, 11)."""

import os
import struct
import sys
import time
import unittest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                '..', 'lib'))
import scr  # noqa: E402
from scr import (Daemon, UnixClient, pack_frame, CHANNEL_NEW,  # noqa: E402
                 CHANNEL_FIN, KEEPALIVE, ACK, assert_session_freed)


def ack_frame(seq, acked):
    return pack_frame(seq, 0, bytes([ACK]) + struct.pack('>I', acked))


class SeqAckTest(unittest.TestCase):

    def setUp(self):
        self.d = Daemon(zombie=900)
        self.addCleanup(self.d.__exit__, None, None, None)
        self.d.wait_listening()

    def vp(self, name=None):
        fs = self.d.fake(name=name)
        self.addCleanup(fs.close)
        fs.handshake()
        path = self.d.wait_socket(fs.expected_socket_name())
        return fs, path

    def client(self, path):
        c = UnixClient(path)
        self.addCleanup(c.close)
        return c

    def vp_with_channel(self, name=None):
        fs, path = self.vp(name)
        c = self.client(path)
        ch = fs.wait_channel_new(5)
        return fs, path, c, ch

    def roundtrip(self, fs, c, ch, tag=b'x'):
        c.send(b'cmd ' + tag + b'\n')
        self.assertEqual(fs.recv_channel_data(ch, 5 + len(tag)),
                         b'cmd ' + tag + b'\n')
        fs.send_data(ch, b'OK ' + tag + b'\n')
        self.assertEqual(c.recv_exact(4 + len(tag)), b'OK ' + tag + b'\n')
        fs.wait_acked(5)

    # -- remoted's ACKs ------------------------------------------------------

    def test_every_data_frame_acked_exactly(self):
        fs, path, c, ch = self.vp_with_channel()
        # remoted consumed seq 0 for CHANNEL_NEW, so its snd_nxt is now 1
        self.assertEqual(fs.rcv_nxt, 1)
        for i in range(10):
            seq = fs.snd_nxt
            self.assertEqual(seq, i)
            fs.send_data(ch, b'line %d\n' % i)
            f = fs.recv_frame(5)
            # unreliable ACK carrying remoted's snd_nxt (1), body = our seq
            self.assertEqual(f.raw(), ack_frame(1, seq))
        self.assertEqual(fs.unacked, [])
        want = b''.join(b'line %d\n' % i for i in range(10))
        self.assertEqual(c.recv_exact(len(want)), want)
        fs.expect_silence(0.3)

    def test_fin_acked(self):
        fs, path, c, ch = self.vp_with_channel()
        seq = fs.send_fin(ch)
        f = fs.recv_frame(5)
        self.assertEqual(f.raw(), ack_frame(fs.rcv_nxt, seq))
        self.assertEqual(c.recv_until_eof(5), b'')
        fs.expect_silence(0.3)

    def test_acks_in_order_for_burst(self):
        fs, path, c, ch = self.vp_with_channel()
        for i in range(200):
            fs.send_data(ch, b'%d\n' % i)
        fs.wait_acked(10)   # the FakeScamper checks each ACK body in order
        want = b''.join(b'%d\n' % i for i in range(200))
        self.assertEqual(c.recv_exact(len(want)), want)

    def test_remoted_seq_numbers(self):
        # CHANNEL_NEW, data and FIN from remoted are numbered 0,1,2,...
        # (checked by the FakeScamper on every frame) and ACKs carry the
        # current snd_nxt without consuming it
        fs, path = self.vp()
        c1 = self.client(path)
        f = fs.recv_frame(5)
        self.assertEqual(f.raw(), pack_frame(0, 0, bytes([CHANNEL_NEW]) +
                                             struct.pack('>I', 1)))
        fs.new_channels.clear()
        c2 = self.client(path)
        f = fs.recv_frame(5)
        self.assertEqual(f.raw(), pack_frame(1, 0, bytes([CHANNEL_NEW]) +
                                             struct.pack('>I', 2)))
        fs.new_channels.clear()
        c1.send(b'a\n')
        f = fs.recv_frame(5)
        self.assertEqual(f.raw(), pack_frame(2, 1, b'a\n'))
        fs.send_data(1, b'x\n')
        f = fs.recv_frame(5)
        self.assertEqual(f.raw(), ack_frame(3, 0))
        c2.send(b'b\n')
        f = fs.recv_frame(5)
        self.assertEqual(f.raw(), pack_frame(3, 2, b'b\n'))
        c2.shutdown_write()
        f = fs.recv_frame(5)
        self.assertEqual(f.raw(), pack_frame(4, 0, bytes([CHANNEL_FIN]) +
                                             struct.pack('>I', 2)))
        self.assertEqual(c1.recv_exact(2), b'x\n')

    def test_unacked_frames_do_not_stop_remoted(self):
        # no window: remoted keeps sending with nothing ACKed
        fs, path = self.vp()
        fs.auto_ack = False
        c = self.client(path)
        ch = fs.wait_channel_new(5)
        for i in range(50):
            c.send(b'%03d\n' % i)
            time.sleep(0.002)
        want = b''.join(b'%03d\n' % i for i in range(50))
        self.assertEqual(fs.recv_channel_data(ch, len(want), 10), want)
        # ACK them all now, in order
        for f in fs.log:
            if f.reliable:
                fs.send_ack(f.seq)
        self.roundtrip(fs, c, ch)

    # -- protocol errors: session freed ------------------------------------

    def test_ack_wrong_seq(self):
        fs, path = self.vp()
        fs.auto_ack = False
        c = self.client(path)
        fs.wait_channel_new(5)       # remoted's seq 0 is outstanding
        fs.send_ack(5)
        assert_session_freed(self.d, fs, clients=[c])

    def test_ack_nothing_outstanding(self):
        fs, path = self.vp()
        fs.send_ack(0)
        assert_session_freed(self.d, fs)

    def test_ack_already_acked(self):
        fs, path, c, ch = self.vp_with_channel()   # CHANNEL_NEW 0 ACKed
        fs.send_ack(0)
        assert_session_freed(self.d, fs, clients=[c])

    def test_ack_not_oldest(self):
        fs, path = self.vp()
        fs.auto_ack = False
        c1 = self.client(path)
        fs.wait_channel_new(5)
        c2 = self.client(path)
        fs.wait_channel_new(5)       # seqs 0 and 1 outstanding
        fs.send_ack(1)               # no cumulative or out-of-order ACKs
        assert_session_freed(self.d, fs, clients=[c1, c2])

    def test_ack_bad_body_length(self):
        for body in (b'\x00\x00\x00', b'\x00\x00\x00\x00\x00', b''):
            with self.subTest(len=len(body)):
                fs, path = self.vp()
                fs.auto_ack = False
                self.client(path)
                fs.wait_channel_new(5)
                fs.send_raw(pack_frame(fs.snd_nxt, 0, bytes([ACK]) + body))
                assert_session_freed(self.d, fs)

    def test_keepalive_ok(self):
        fs, path, c, ch = self.vp_with_channel()
        for i in range(3):
            fs.send_keepalive()
        # keepalives are not answered and do not consume a seq: a data
        # frame with seq 0 is still accepted
        self.assertEqual(fs.snd_nxt, 0)
        fs.expect_silence(0.3)
        self.roundtrip(fs, c, ch)

    def test_keepalive_with_body(self):
        fs, path, c, ch = self.vp_with_channel()
        fs.send_raw(pack_frame(fs.snd_nxt, 0, bytes([KEEPALIVE, 0])))
        assert_session_freed(self.d, fs, clients=[c])

    def test_data_seq_ahead(self):
        fs, path, c, ch = self.vp_with_channel()
        fs.send_raw(pack_frame(fs.snd_nxt + 1, ch, b'skip\n'))
        assert_session_freed(self.d, fs, clients=[c])

    def test_data_seq_replayed(self):
        fs, path, c, ch = self.vp_with_channel()
        fs.send_data(ch, b'one\n')
        fs.wait_acked(5)
        self.assertEqual(c.recv_exact(4), b'one\n')
        fs.send_raw(pack_frame(0, ch, b'one\n'))
        assert_session_freed(self.d, fs, clients=[c])

    def test_ack_frame_with_bad_seq(self):
        fs, path = self.vp()
        fs.auto_ack = False
        c = self.client(path)
        fs.wait_channel_new(5)
        # the body is right but the frame's own seq is not remoted's rcv_nxt
        fs.send_raw(ack_frame(fs.snd_nxt + 7, 0))
        assert_session_freed(self.d, fs, clients=[c])

    def test_keepalive_frame_with_bad_seq(self):
        fs, path = self.vp()
        fs.send_raw(pack_frame(0xffffffff, 0, bytes([KEEPALIVE])))
        assert_session_freed(self.d, fs)

    def test_fin_bad_body_length(self):
        fs, path, c, ch = self.vp_with_channel()
        fs.send_raw(pack_frame(fs.snd_nxt, 0, bytes([CHANNEL_FIN]) +
                               struct.pack('>I', ch) + b'\x00'))
        assert_session_freed(self.d, fs, clients=[c])

    def test_error_frees_only_that_session(self):
        good, gpath, gc, gch = self.vp_with_channel('good')
        bad, bpath, bc, bch = self.vp_with_channel('bad')
        bad.send_ack(42)
        assert_session_freed(self.d, bad, clients=[bc])
        self.roundtrip(good, gc, gch)
        self.assertEqual(self.d.list_sockets(), [good.expected_socket_name()])

    # -- unknown channels ----------------------------------------------------

    @scr.not_legacy('data for an unknown channel is a protocol error')
    def test_data_unknown_channel_acked_and_dropped(self):
        fs, path, c, ch = self.vp_with_channel()
        seq = fs.send_data(77, b'nobody\n')[0]
        f = fs.recv_frame(5)
        self.assertEqual(f.raw(), ack_frame(fs.rcv_nxt, seq))
        # the session is alive and the data went nowhere
        self.roundtrip(fs, c, ch)
        c.expect_silence(0.2)
        fs.expect_silence(0.2)

    @scr.not_legacy('FIN for an unknown channel is a protocol error')
    def test_fin_unknown_channel_acked_and_ignored(self):
        fs, path, c, ch = self.vp_with_channel()
        seq = fs.send_fin(77)
        f = fs.recv_frame(5)
        self.assertEqual(f.raw(), ack_frame(fs.rcv_nxt, seq))
        fs.expect_silence(0.3)
        self.roundtrip(fs, c, ch)
        # a channel opened later does not get id 77 treatment either
        c2 = self.client(path)
        ch2 = fs.wait_channel_new(5)
        self.assertEqual(ch2, 2)
        self.roundtrip(fs, c2, ch2, b'y')

    @scr.not_legacy('data for a finished channel is a protocol error')
    def test_data_after_channel_finished_dropped(self):
        fs, path, c, ch = self.vp_with_channel()
        fs.send_fin(ch)
        self.assertEqual(c.recv_until_eof(5), b'')
        fs.wait_acked(5)
        seq = fs.send_data(ch, b'late\n')[0]
        f = fs.recv_frame(5)
        self.assertEqual(f.raw(), ack_frame(fs.rcv_nxt, seq))
        c2 = self.client(path)
        ch2 = fs.wait_channel_new(5)
        self.roundtrip(fs, c2, ch2)

    # -- keepalive from remoted ----------------------------------------------

    @scr.slow
    def test_idle_keepalive_then_rx_abort(self):
        fs, path = self.vp()
        t0 = time.monotonic()
        # stay quiet; remoted must send KEEPALIVE about 30 s after its last
        # send (MASTER_ID) and must not drop us before 60 s
        f = fs.recv_frame(40)
        dt = time.monotonic() - t0
        self.assertEqual(f.raw(), pack_frame(0, 0, bytes([KEEPALIVE])))
        self.assertGreaterEqual(dt, 27, 'keepalive too early: %.1fs' % dt)
        self.assertLessEqual(dt, 33, 'keepalive too late: %.1fs' % dt)
        self.assertIn(fs.expected_socket_name(), self.d.list_sockets())
        # no inbound bytes for 60 s: rx_abort turns the session into a
        # zombie (another KEEPALIVE may come first)
        while True:
            try:
                f = fs.recv_frame(75 - (time.monotonic() - t0))
            except EOFError:
                break
            self.assertEqual(f.type, KEEPALIVE)
        dt = time.monotonic() - t0
        self.assertGreaterEqual(dt, 57, 'rx_abort too early: %.1fs' % dt)
        self.assertLessEqual(dt, 66, 'rx_abort too late: %.1fs' % dt)
        self.d.wait_socket_gone(path, 2)
        self.assertEqual(fs.resume(), 0)
        self.d.wait_socket(fs.expected_socket_name())


if __name__ == '__main__':
    scr.main()
