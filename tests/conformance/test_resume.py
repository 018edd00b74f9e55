#!/usr/bin/env python3
"""Conformance: zombies, MASTER_RES, REJ and retransmission (PROTOCOL.md
2.6, 2.9, 4.1, 4.2, 4.3, 11)."""

import os
import socket
import struct
import sys
import time
import unittest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                '..', 'lib'))
import scr  # noqa: E402
from scr import (Daemon, UnixClient, pack_frame, MASTER_OK,  # noqa: E402
                 probe_res, wait_closed)

REJ_FRAME = bytes.fromhex('00000000 00000000 0001 07')


def ok_frame(rcv_nxt):
    return pack_frame(0, 0, bytes([MASTER_OK]) + struct.pack('>I', rcv_nxt))


class ResumeTest(unittest.TestCase):

    def daemon(self, **kw):
        d = Daemon(**kw)
        self.addCleanup(d.__exit__, None, None, None)
        d.wait_listening()
        return d

    def vp(self, d, name='res.vp'):
        fs = d.fake(name=name)
        self.addCleanup(fs.close)
        fs.handshake()
        path = d.wait_socket(fs.expected_socket_name())
        return fs, path

    def client(self, path):
        c = UnixClient(path)
        self.addCleanup(c.close)
        return c

    def fresh(self, d, magic):
        fs = d.fake(magic=magic)
        self.addCleanup(fs.close)
        fs.connect()
        return fs

    def expect_rej(self, d, magic, rcv_nxt, snd_una, snd_nxt, what=''):
        fs = self.fresh(d, magic)
        fs.send_res(rcv_nxt, snd_una, snd_nxt)
        f = fs.recv_frame(5)
        self.assertEqual(f.raw(), REJ_FRAME, '%s: got %r' % (what, f))
        fs.expect_closed(5)

    # -- basic resume ---------------------------------------------------------

    def test_disconnect_makes_zombie(self):
        d = self.daemon()
        fs, path = self.vp(d)
        c = self.client(path)
        fs.wait_channel_new(5)
        fs.close()
        d.wait_socket_gone(path)
        self.assertEqual(d.list_sockets(), [])
        # the local client stays connected
        c.expect_silence(0.5)
        self.assertTrue(d.alive())

    def test_resume_retransmits_and_keeps_client(self):
        d = self.daemon()
        fs, path = self.vp(d)
        old_name = fs.expected_socket_name()
        c = self.client(path)
        ch = fs.wait_channel_new(5)
        # a normal exchange first
        c.send(b'ping -c 1 192.0.2.1\n')
        self.assertEqual(fs.recv_channel_data(ch, 20), b'ping -c 1 192.0.2.1\n')
        fs.send_data(ch, b'OK id-1\n')
        self.assertEqual(c.recv_exact(8), b'OK id-1\n')
        fs.wait_acked(5)
        # a frame from remoted that scamper will claim it never received
        fs.auto_ack = False
        c.send(b'lost 1\n')
        self.assertEqual(fs.recv_channel_data(ch, 7), b'lost 1\n')
        lost = fs.log[-1]
        self.assertEqual(lost.chan, ch)
        # a frame from scamper whose ACK is lost with the connection
        more_seq = fs.send_data(ch, b'MORE\n')[0]
        self.assertEqual(c.recv_exact(5), b'MORE\n')
        fs.close()
        d.wait_socket_gone(path)
        # written by the local client while the VP is a zombie
        c.send(b'while zombie\n')
        time.sleep(0.3)
        # scamper also queues while disconnected
        fs.send_data(ch, b'queued by scamper\n')
        self.assertEqual(len(fs.unacked), 2)
        rsnd_nxt = fs.rcv_nxt    # remoted's snd_nxt before the zombie write
        fs.auto_ack = True
        fs.reconnect()
        fs.send_res(rcv_nxt=lost.seq)
        f = fs.recv_frame(5)
        # remoted has received everything up to and including 'MORE'
        self.assertEqual(f.raw(), ok_frame(more_seq + 1))
        self.assertEqual([u.payload for u in fs.unacked],
                         [b'queued by scamper\n'])
        # retransmission: original seq and channel, in order
        f = fs.recv_frame(5)
        self.assertEqual(f.raw(), lost.raw())
        got = fs.recv_channel_data(ch, 7 + 13, 5)
        self.assertEqual(got, b'lost 1\nwhile zombie\n')
        self.assertEqual(fs.rcv_nxt, rsnd_nxt + 1)
        # (the FakeScamper retransmitted its own queue on MASTER_OK)
        self.assertEqual(c.recv_exact(18), b'queued by scamper\n')
        fs.wait_acked(5)
        # new socket name from the new source port
        new_name = fs.expected_socket_name()
        self.assertNotEqual(new_name, old_name)
        d.wait_socket(new_name)
        self.assertEqual(d.list_sockets(), [new_name])
        # the existing client works in both directions; nothing duplicated
        c.send(b'after resume\n')
        self.assertEqual(fs.recv_channel_data(ch, 13), b'after resume\n')
        fs.send_data(ch, b'OK id-2\n')
        self.assertEqual(c.recv_exact(8), b'OK id-2\n')
        fs.wait_acked(5)
        c.expect_silence(0.3)
        fs.expect_silence(0.01)
        self.assertEqual(bytes(fs.chan_data[ch]), b'')
        # a new local client gets the next channel id (the counter survives)
        c2 = self.client(d.wait_socket(new_name))
        self.assertEqual(fs.wait_channel_new(5), ch + 1)
        c2.send(b'x\n')
        self.assertEqual(fs.recv_channel_data(ch + 1, 2), b'x\n')

    def test_resume_numbers_exact(self):
        # build a known state: remoted snd_nxt=4 with seqs 1..3 unacked,
        # remoted rcv_nxt=2
        d = self.daemon()
        fs, path = self.vp(d)
        c = self.client(path)
        ch = fs.wait_channel_new(5)         # seq 0, ACKed
        fs.auto_ack = False
        sent = []
        for i in range(3):
            c.send(b'cmd %d\n' % i)
            self.assertEqual(fs.recv_channel_data(ch, 6), b'cmd %d\n' % i)
            sent.append(fs.log[-1])
        self.assertEqual([f.seq for f in sent], [1, 2, 3])
        fs.send_data(ch, b'r0\n')
        fs.send_data(ch, b'r1\n')
        fs.wait_acked(5)
        self.assertEqual(c.recv_exact(6), b'r0\nr1\n')
        fs.close()
        d.wait_socket_gone(path)
        # step 1 passes; step 2: rcv_nxt must be remoted's snd_nxt (4) or
        # the seq of an unacked message (1, 2, 3)
        self.expect_rej(d, fs.magic, 0, 2, 2, 'rcv_nxt 0 (already ACKed)')
        self.expect_rej(d, fs.magic, 5, 2, 2, 'rcv_nxt 5 (beyond snd_nxt)')
        self.expect_rej(d, fs.magic, 0x80000001, 2, 2, 'rcv_nxt far away')
        # step 3: snd_una <= remoted rcv_nxt (2) <= snd_nxt
        self.expect_rej(d, fs.magic, 4, 3, 3, 'snd_una 3 > rcv_nxt 2')
        self.expect_rej(d, fs.magic, 4, 0, 1, 'snd_nxt 1 < rcv_nxt 2')
        self.expect_rej(d, fs.magic, 2, 3, 5, 'snd_una 3 > rcv_nxt 2')
        # none of that harmed the zombie: RES(rcv_nxt=2) is accepted and
        # seqs 2 and 3 come again with their original seq and channel
        fs.auto_ack = True
        fs.reconnect()
        fs.send_res(2, 2, 2)
        self.assertEqual(fs.recv_frame(5).raw(), ok_frame(2))
        self.assertEqual(fs.recv_frame(5).raw(), sent[1].raw())
        self.assertEqual(fs.recv_frame(5).raw(), sent[2].raw())
        fs.expect_silence(0.3)
        # the client's earlier 'cmd 1' 'cmd 2' were consumed in our buffer
        # already; the retransmitted copies are the only new data
        self.assertEqual(bytes(fs.chan_data[ch]), b'cmd 1\ncmd 2\n')

    def test_resume_with_empty_queue_and_trailing_bytes(self):
        d = self.daemon()
        fs, path = self.vp(d)
        c = self.client(path)
        ch = fs.wait_channel_new(5)
        fs.close()
        d.wait_socket_gone(path)
        fs.reconnect()
        # bytes after the 12 sequence bytes are ignored
        fs.send_frame(0, 0, fs.res_payload() + b'extra')
        self.assertEqual(fs.recv_frame(5).raw(), ok_frame(0))
        fs.expect_silence(0.3)
        d.wait_socket(fs.expected_socket_name())
        c.send(b'hi\n')
        self.assertEqual(fs.recv_channel_data(ch, 3), b'hi\n')

    def test_resume_serial_comparison(self):
        d = self.daemon()
        fs, path = self.vp(d)          # remoted rcv_nxt = 0, snd_nxt = 0
        fs.close()
        d.wait_socket_gone(path)
        # snd_nxt 0x80000001 is serially *before* 0, so rcv_nxt 0 > snd_nxt
        self.expect_rej(d, fs.magic, 0, 0, 0x80000001, 'snd_nxt wrapped')
        # snd_una 0xffffffff is serially before 0: accepted
        fs.reconnect()
        fs.send_res(0, 0xffffffff, 0)
        self.assertEqual(fs.recv_frame(5).raw(), ok_frame(0))

    def test_res_unknown_magic_rejected(self):
        d = self.daemon()
        fs = self.fresh(d, os.urandom(8))
        fs.send_res(0, 0, 0)
        # exactly the 11-byte REJ frame, then the connection is closed
        got = bytearray()
        deadline = time.monotonic() + 5
        while len(got) < len(REJ_FRAME):
            d_ = scr._recv_some(fs.sock, deadline)
            if not d_:
                break
            got += d_
        self.assertEqual(bytes(got[:11]), REJ_FRAME)
        self.assertEqual(fs.expect_closed(5), b'')
        self.assertEqual(bytes(got[11:]), b'')

    def test_res_malformed_keeps_zombie(self):
        d = self.daemon()
        fs, path = self.vp(d)
        fs.close()
        d.wait_socket_gone(path)
        short = fs.res_payload()[:-1]       # one sequence byte missing
        t = self.fresh(d, fs.magic)
        t.send_frame(0, 0, short)
        self.assertEqual(t.expect_closed(5), b'')
        t = self.fresh(d, fs.magic)
        t.send_frame(0, 0, bytes([scr.MASTER_RES, 0]) + bytes(12))
        got = t.expect_closed(5)
        self.assertIn(got, (b'', REJ_FRAME))
        fs.reconnect()
        fs.send_res()
        self.assertEqual(fs.recv_frame(5).raw(), ok_frame(0))

    def test_takeover_live_session(self):
        d = self.daemon()
        fs, path = self.vp(d)
        c = self.client(path)
        ch = fs.wait_channel_new(5)
        c.send(b'before\n')
        self.assertEqual(fs.recv_channel_data(ch, 7), b'before\n')
        # a second connection resumes the LIVE session
        old = fs.detach()
        self.addCleanup(old.close)
        fs.connect()
        fs.send_res()
        self.assertEqual(fs.recv_frame(5).raw(), ok_frame(0))
        # the old connection is closed
        wait_closed(old, 5)
        new_name = fs.expected_socket_name()
        d.wait_socket(new_name)
        d.wait_socket_gone(path)
        self.assertEqual(d.list_sockets(), [new_name])
        c.send(b'after\n')
        self.assertEqual(fs.recv_channel_data(ch, 6), b'after\n')
        fs.send_data(ch, b'reply\n')
        self.assertEqual(c.recv_exact(6), b'reply\n')
        fs.wait_acked(5)

    def test_resume_twice(self):
        d = self.daemon()
        fs, path = self.vp(d)
        c = self.client(path)
        ch = fs.wait_channel_new(5)
        for i in range(3):
            fs.close()
            d.wait_socket_gone(fs.expected_socket_name())
            c.send(b'z%d\n' % i)
            time.sleep(0.1)
            fs.resume()
            self.assertEqual(fs.recv_channel_data(ch, 3), b'z%d\n' % i)
            d.wait_socket(fs.expected_socket_name())
            self.assertEqual(d.list_sockets(), [fs.expected_socket_name()])
            fs.send_data(ch, b'a%d\n' % i)
            self.assertEqual(c.recv_exact(3), b'a%d\n' % i)
            fs.wait_acked(5)

    def test_rejected_resume_after_free_then_new(self):
        # after a REJ scamper starts over with a new magic; that works
        d = self.daemon(zombie=0)
        fs, path = self.vp(d)
        fs.close()
        d.wait_socket_gone(path)
        self.expect_rej(d, fs.magic, 0, 0, 0)
        fs2 = d.fake(name='res.vp')
        self.addCleanup(fs2.close)
        fs2.handshake()
        d.wait_socket(fs2.expected_socket_name())

    # -- zombie lifetime -------------------------------------------------------

    def test_zombie_expiry(self):
        d = self.daemon(zombie=2)
        fs, path = self.vp(d)
        c = self.client(path)
        fs.wait_channel_new(5)
        fs.close()
        t0 = time.monotonic()
        d.wait_socket_gone(path)
        # the session is freed when the zombie expires: the client is closed
        c.expect_closed(6)
        dt = time.monotonic() - t0
        self.assertGreaterEqual(dt, 1.0, 'zombie freed too early (%.1fs)' % dt)
        time.sleep(max(0, 4 - dt))
        self.assertEqual(probe_res(d.port, fs.magic, fs.rcv_nxt,
                                   fs.snd_nxt, fs.snd_nxt), 'REJ')

    def test_zombie_resumable_before_expiry(self):
        d = self.daemon(zombie=5)
        fs, path = self.vp(d)
        fs.close()
        d.wait_socket_gone(path)
        time.sleep(1.5)
        self.assertEqual(fs.resume(), 0)
        d.wait_socket(fs.expected_socket_name())

    def test_zombie_zero_frees_at_once(self):
        d = self.daemon(zombie=0)
        fs, path = self.vp(d)
        c = self.client(path)
        fs.wait_channel_new(5)
        fs.close()
        d.wait_socket_gone(path)
        c.expect_closed(2)
        self.assertEqual(probe_res(d.port, fs.magic, fs.rcv_nxt,
                                   fs.snd_nxt, fs.snd_nxt), 'REJ')

    def test_zombie_socket_refuses_connections(self):
        d = self.daemon()
        fs, path = self.vp(d)
        fs.close()
        d.wait_socket_gone(path)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(s.close)
        with self.assertRaises(OSError):
            s.connect(path)


if __name__ == '__main__':
    scr.main()
