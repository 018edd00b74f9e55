#!/usr/bin/env python3
"""Conformance: channels over per-VP unix sockets (PROTOCOL.md 2.7, 4.3)."""

import os
import random
import struct
import sys
import threading
import time
import unittest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                '..', 'lib'))
import scr  # noqa: E402
from scr import Daemon, UnixClient, CHANNEL_FIN, MAX_PAYLOAD  # noqa: E402

MIB = 1 << 20


class Sender(threading.Thread):
    """sendall() data on a socket in the background."""

    def __init__(self, sock, data, chunks=None):
        super().__init__(daemon=True)
        self.sock, self.data, self.chunks = sock, data, chunks
        self.error = None

    def run(self):
        try:
            self.sock.settimeout(60)
            if self.chunks:
                off = 0
                for n in self.chunks:
                    self.sock.sendall(self.data[off:off + n])
                    off += n
            else:
                self.sock.sendall(self.data)
        except Exception as e:   # reported by the test
            self.error = e


class Reader(threading.Thread):
    """Read exactly n bytes from a UnixClient in the background."""

    def __init__(self, client, n, timeout=60):
        super().__init__(daemon=True)
        self.client, self.n, self.timeout = client, n, timeout
        self.data = None
        self.error = None

    def run(self):
        try:
            self.data = self.client.recv_exact(self.n, self.timeout)
        except Exception as e:
            self.error = e


class ChannelTest(unittest.TestCase):

    def setUp(self):
        self.d = Daemon()
        self.addCleanup(self.d.__exit__, None, None, None)
        self.d.wait_listening()
        self.fs = self.d.fake(name='chan.test')
        self.addCleanup(self.fs.close)
        self.fs.handshake()
        self.path = self.d.wait_socket(self.fs.expected_socket_name())

    def client(self):
        c = UnixClient(self.path)
        self.addCleanup(c.close)
        return c

    def test_channel_new_frames(self):
        fs = self.fs
        c1 = self.client()
        f = fs.recv_frame(5)
        self.assertEqual(f.raw(), bytes.fromhex('00000000 00000000 0005'
                                                '02 00000001'))
        c2 = self.client()
        f = fs.recv_frame(5)
        self.assertEqual(f.raw(), bytes.fromhex('00000001 00000000 0005'
                                                '02 00000002'))
        # remoted sends nothing to the local clients itself
        c1.expect_silence(0.3)
        c2.expect_silence(0.01)
        self.assertEqual(list(fs.new_channels), [1, 2])

    def test_channel_ids_not_reused(self):
        fs = self.fs
        seen = []
        for i in range(5):
            c = self.client()
            ch = fs.wait_channel_new(5)
            seen.append(ch)
            c.close()
            fs.wait_fin(ch, 5)
            fs.send_fin(ch)
            fs.wait_acked(5)
        self.assertEqual(seen, [1, 2, 3, 4, 5])

    def test_bytes_to_scamper_in_order(self):
        fs = self.fs
        c = self.client()
        ch = fs.wait_channel_new(5)
        parts = [b'ping -c 1 192.0.2.%d\n' % i for i in range(1, 30)]
        for p in parts:
            c.send(p)
        want = b''.join(parts)
        self.assertEqual(fs.recv_channel_data(ch, len(want), 10), want)
        fs.expect_silence(0.2)

    def test_client_to_scamper_1mib(self):
        fs = self.fs
        c = self.client()
        ch = fs.wait_channel_new(5)
        data = random.Random(1).randbytes(MIB)
        s = Sender(c.sock, data)
        s.start()
        got = fs.recv_channel_data(ch, MIB, 60)
        s.join(10)
        self.assertIsNone(s.error)
        self.assertEqual(len(got), MIB)
        self.assertTrue(got == data, 'relayed bytes differ')
        for f in fs.log:
            if f.chan == ch:
                self.assertLessEqual(len(f.payload), MAX_PAYLOAD)
                self.assertGreater(len(f.payload), 0, 'empty data frame')
        fs.expect_silence(0.2)

    def test_scamper_to_client_1mib_varying_frames(self):
        fs = self.fs
        c = self.client()
        ch = fs.wait_channel_new(5)
        rnd = random.Random(2)
        data = rnd.randbytes(MIB)
        rd = Reader(c, MIB)
        rd.start()
        off = 0
        sizes = [1, MAX_PAYLOAD, 2, 4096, 4097, 8192, 65534]
        while off < MIB:
            n = sizes.pop(0) if sizes else rnd.randint(1, MAX_PAYLOAD)
            n = min(n, MIB - off)
            fs.send_data(ch, data[off:off + n])
            off += n
        fs.wait_acked(30)
        rd.join(60)
        self.assertIsNone(rd.error)
        self.assertTrue(rd.data == data, 'relayed bytes differ')
        c.expect_silence(0.2)

    def test_two_channels_separate(self):
        fs = self.fs
        c1 = self.client()
        ch1 = fs.wait_channel_new(5)
        c2 = self.client()
        ch2 = fs.wait_channel_new(5)
        for i in range(20):
            fs.send_data(ch1, b'one %d\n' % i)
            fs.send_data(ch2, b'two %d\n' % i)
            c1.send(b'c1 %d\n' % i)
            c2.send(b'c2 %d\n' % i)
        w1 = b''.join(b'one %d\n' % i for i in range(20))
        w2 = b''.join(b'two %d\n' % i for i in range(20))
        u1 = b''.join(b'c1 %d\n' % i for i in range(20))
        u2 = b''.join(b'c2 %d\n' % i for i in range(20))
        self.assertEqual(c1.recv_exact(len(w1)), w1)
        self.assertEqual(c2.recv_exact(len(w2)), w2)
        self.assertEqual(fs.recv_channel_data(ch1, len(u1)), u1)
        self.assertEqual(fs.recv_channel_data(ch2, len(u2)), u2)
        fs.wait_acked(5)
        c1.expect_silence(0.2)
        c2.expect_silence(0.01)

    def test_client_half_close_sends_fin(self):
        fs = self.fs
        c = self.client()
        ch = fs.wait_channel_new(5)
        c.send(b'ping 192.0.2.1\n')
        c.shutdown_write()
        self.assertEqual(fs.recv_channel_data(ch, 15), b'ping 192.0.2.1\n')
        fs.wait_fin(ch, 5)
        fin = [f for f in fs.log if f.chan == 0 and f.type == CHANNEL_FIN]
        self.assertEqual(len(fin), 1)
        self.assertEqual(fin[0].body, struct.pack('>I', ch))
        # after EOF remoted keeps delivering scamper's output to the client
        fs.send_data(ch, b'OK id-1\n')
        fs.send_data(ch, b'DATA 2\n`\n')
        self.assertEqual(c.recv_exact(8 + 9), b'OK id-1\nDATA 2\n`\n')
        c.expect_silence(0.2)
        # and closes it after scamper's FIN; remoted sends no second FIN
        fs.send_fin(ch)
        self.assertEqual(c.recv_until_eof(5), b'')
        fs.wait_acked(5)
        fs.expect_silence(0.3)
        self.assertEqual(len([f for f in fs.log
                              if f.chan == 0 and f.type == CHANNEL_FIN]), 1)

    def test_client_close_sends_fin(self):
        fs = self.fs
        c = self.client()
        ch = fs.wait_channel_new(5)
        c.close()
        fs.wait_fin(ch, 5)
        # data scamper still sends is ACKed and dropped; its FIN is ACKed
        fs.send_data(ch, b'MORE\n')
        fs.send_fin(ch)
        fs.wait_acked(5)
        fs.expect_silence(0.3)
        # the session carries on
        c2 = self.client()
        ch2 = fs.wait_channel_new(5)
        self.assertEqual(ch2, ch + 1)
        c2.send(b'x\n')
        self.assertEqual(fs.recv_channel_data(ch2, 2), b'x\n')

    def test_scamper_fin_flushes_then_eof(self):
        fs = self.fs
        c = self.client()
        ch = fs.wait_channel_new(5)
        data = random.Random(3).randbytes(256 * 1024)
        # everything, then FIN, while the client is not reading
        fs.send_data(ch, data, chunk=8192)
        fs.send_fin(ch)
        time.sleep(0.5)
        got = c.recv_until_eof(30)
        fs.wait_acked(10)
        self.assertEqual(len(got), len(data))
        self.assertTrue(got == data, 'data before FIN differs')
        # no FIN comes back from remoted
        fs.expect_silence(0.5)
        self.assertNotIn(ch, fs.fins)

    def test_scamper_fin_empty_buffer_closes_at_once(self):
        fs = self.fs
        c = self.client()
        ch = fs.wait_channel_new(5)
        fs.send_fin(ch)
        self.assertEqual(c.recv_until_eof(5), b'')
        fs.wait_acked(5)
        fs.expect_silence(0.3)

    def test_fin_after_client_closed(self):
        fs = self.fs
        c = self.client()
        ch = fs.wait_channel_new(5)
        c.send(b'done\n')
        self.assertEqual(fs.recv_channel_data(ch, 5), b'done\n')
        c.close()
        fs.wait_fin(ch, 5)
        fs.send_data(ch, b'OK\n')
        fs.send_fin(ch)
        fs.wait_acked(5)
        fs.expect_silence(0.3)
        self.assertTrue(self.d.alive())
        self.assertEqual(self.d.list_sockets(), [fs.expected_socket_name()])

    def test_many_clients(self):
        fs = self.fs
        clients = []
        for i in range(20):
            clients.append(self.client())
        chans = [fs.wait_channel_new(5) for _ in clients]
        self.assertEqual(chans, list(range(1, 21)))
        # channel n belongs to the n-th accepted client; check by a
        # round trip on every channel
        for i, ch in enumerate(chans):
            fs.send_data(ch, b'hello %d\n' % ch)
        got = {}
        for c in clients:
            line = b''
            while not line.endswith(b'\n'):
                line += c.recv_exact(1)
            got[int(line.split()[1])] = c
        self.assertEqual(sorted(got), chans)
        for ch, c in got.items():
            c.send(b'reply %d\n' % ch)
            want = b'reply %d\n' % ch
            self.assertEqual(fs.recv_channel_data(ch, len(want)), want)


if __name__ == '__main__':
    scr.main()
