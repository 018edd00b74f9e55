#!/usr/bin/env python3
"""Conformance: garbage, hostile peers and timeouts must only affect the
offending connection (PROTOCOL.md 2.2, 2.8, 9.1, 11)."""

import os
import random
import socket
import sys
import threading
import time
import unittest

MIB = 1 << 20

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                '..', 'lib'))
import scr  # noqa: E402
from scr import (Daemon, UnixClient, pack_frame, pack_hdr, wait_closed,  # noqa: E402,E501
                 MASTER_NEW, ACK, KEEPALIVE)


class RobustnessTest(unittest.TestCase):

    def setUp(self):
        self.d = Daemon(zombie=900)
        self.addCleanup(self.d.__exit__, None, None, None)
        self.d.wait_listening()
        # the well-behaved pair
        self.good = self.d.fake(name='good')
        self.addCleanup(self.good.close)
        self.good.handshake()
        self.gpath = self.d.wait_socket(self.good.expected_socket_name())
        self.gc = UnixClient(self.gpath)
        self.addCleanup(self.gc.close)
        self.gch = self.good.wait_channel_new(5)
        self.n = 0

    def roundtrip(self):
        self.n += 1
        line = b'ping -c 1 192.0.2.%d\n' % (self.n % 250)
        self.gc.send(line)
        self.assertEqual(self.good.recv_channel_data(self.gch, len(line)),
                         line)
        reply = b'OK id-%d\n' % self.n
        self.good.send_data(self.gch, reply)
        self.assertEqual(self.gc.recv_exact(len(reply)), reply)
        self.good.wait_acked(5)
        self.assertTrue(self.d.alive())

    def tcp(self):
        s = socket.create_connection(('127.0.0.1', self.d.port), timeout=5)
        self.addCleanup(s.close)
        return s

    def fake(self, **kw):
        fs = self.d.fake(**kw)
        self.addCleanup(fs.close)
        return fs

    def send_ignoring_reset(self, s, data):
        try:
            s.sendall(data)
        except OSError:
            pass        # remoted may close mid-way; that is fine

    # -- garbage on the TCP port ----------------------------------------------

    def test_garbage_on_tcp_port(self):
        rnd = random.Random(10)
        blobs = [
            b'GET / HTTP/1.0\r\n\r\n',
            # a TLS ClientHello-like start
            bytes.fromhex('16030100f4010000f00303') + rnd.randbytes(200),
            b'\xff' * 100,
        ]
        for i in range(10):
            b = rnd.randbytes(rnd.randint(11, 3000))
            if b[:4] == b'\0\0\0\0':
                b = b'\x01' + b[1:]
            blobs.append(b)
        socks = []
        for b in blobs:
            s = self.tcp()
            self.send_ignoring_reset(s, b)
            socks.append(s)
        self.roundtrip()
        for s in socks:
            wait_closed(s, 5)
        self.roundtrip()
        self.assertEqual(self.d.list_sockets(), [self.good.expected_socket_name()])

    def test_random_frames_after_handshake(self):
        rnd = random.Random(11)
        fakes = []
        for i in range(8):
            fs = self.fake(name='bad%d' % i)
            fs.handshake()
            self.d.wait_socket(fs.expected_socket_name())
            fakes.append(fs)
        for fs in fakes:
            out = bytearray()
            for j in range(20):
                seq = rnd.randint(1, 0xffffffff)   # never remoted's rcv_nxt 0
                chan = rnd.choice([0, 1, 2, rnd.randint(0, 0xffffffff)])
                ln = rnd.randint(0, 300)
                out += pack_frame(seq, chan, rnd.randbytes(ln))
            self.send_ignoring_reset(fs.sock, bytes(out))
        self.roundtrip()
        for fs in fakes:
            fs.expect_closed(5)
            self.d.wait_socket_gone(fs.expected_socket_name())
        self.roundtrip()
        self.assertEqual(self.d.list_sockets(), [self.good.expected_socket_name()])

    def test_valid_seq_random_control(self):
        # frames with a correct seq but a random control body
        rnd = random.Random(12)
        for i in range(20):
            fs = self.fake()
            fs.handshake()
            t = rnd.choice([0, 1, 2, 6, 7, 8, 9, 200])
            body = rnd.randbytes(rnd.randint(0, 40))
            fs.send_raw(pack_frame(0, 0, bytes([t]) + body))
            fs.expect_closed(5)
        self.roundtrip()

    def test_oversize_declared_lengths(self):
        # a header declaring 65535 bytes followed by only a few: remoted
        # must wait for the rest without harming anyone
        fs = self.fake()
        fs.connect()
        fs.send_raw(pack_hdr(0, 0, 65535) + bytes([MASTER_NEW, 8]) +
                    fs.magic)
        self.roundtrip()
        fs.expect_silence(0.5)
        # a full 65535-byte MASTER_NEW: 8-byte magic, no name, junk after
        # a name_len of 0 is ignored
        fs2 = self.fake()
        fs2.connect()
        payload = bytes([MASTER_NEW, 8]) + fs2.magic + b'\x00'
        payload += bytes(65535 - len(payload))
        fs2.send_raw(pack_frame(0, 0, payload))
        f = fs2.recv_frame(5)
        self.assertEqual(f.type, scr.MASTER_ID)
        # a max-size data frame to an unknown channel is ACKed and dropped;
        # to a real channel it is delivered
        if not scr.is_legacy():
            fs2.send_data(12345, bytes(65535))
            fs2.wait_acked(5)
        self.roundtrip()
        big = bytes(range(256)) * 255 + bytes(range(255))
        self.assertEqual(len(big), 65535)
        self.good.send_data(self.gch, big)
        self.assertEqual(self.gc.recv_exact(65535, 10), big)
        self.good.wait_acked(5)
        # a control message with a huge body
        fs3 = self.fake()
        fs3.handshake()
        fs3.send_raw(pack_frame(0, 0, bytes([ACK]) + bytes(65534)))
        fs3.expect_closed(5)
        fs4 = self.fake()
        fs4.handshake()
        fs4.send_raw(pack_frame(0, 0, bytes([KEEPALIVE]) + bytes(65534)))
        fs4.expect_closed(5)
        self.roundtrip()

    def test_truncated_header_then_close(self):
        for n in range(1, 10):
            s = self.tcp()
            s.sendall(pack_frame(0, 0, bytes([MASTER_NEW, 8]) +
                                 os.urandom(8))[:n])
            s.close()
        fs = self.fake()
        fs.handshake()
        fs.send_raw(pack_frame(0, self.gch, b'partial')[:12])
        fs.close()
        self.roundtrip()

    # -- per-VP unix socket --------------------------------------------------------

    def test_garbage_on_unix_socket_relayed_opaquely(self):
        rnd = random.Random(13)
        junk = rnd.randbytes(20000)
        bad = UnixClient(self.gpath)
        self.addCleanup(bad.close)
        bch = self.good.wait_channel_new(5)
        bad.send(junk)
        # remoted does not parse channel bytes: they arrive intact, on the
        # bad client's channel only
        self.assertEqual(self.good.recv_channel_data(bch, len(junk), 10), junk)
        self.roundtrip()
        self.assertEqual(bytes(self.good.chan_data[self.gch]), b'')
        # scamper would answer with an error and FIN: the bad client only
        # is closed
        self.good.send_data(bch, b'ERR invalid character in line\n')
        self.good.send_fin(bch)
        self.assertEqual(bad.recv_until_eof(5),
                         b'ERR invalid character in line\n')
        self.roundtrip()

    def test_unix_connect_storm(self):
        # many clients that connect and vanish at once
        for i in range(50):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(self.gpath)
            if i % 2:
                s.sendall(b'x' * 10)
            s.close()
        seen = set()
        deadline = time.monotonic() + 10
        while len(self.good.fins) < 50 and time.monotonic() < deadline:
            try:
                self.good.recv_frame(1)
            except TimeoutError:
                pass
        while self.good.new_channels:
            seen.add(self.good.new_channels.popleft())
        self.assertEqual(len(seen), 50)
        self.assertEqual(self.good.fins, seen)
        for ch in sorted(seen):
            self.good.send_fin(ch)
        self.good.wait_acked(5)
        self.roundtrip()

    def test_client_reset_while_output_pending(self):
        # a client closes with unread input: remoted's read may fail with
        # ECONNRESET in the same event that reports it writable
        for i in range(10):
            c = UnixClient(self.gpath)
            ch = self.good.wait_channel_new(5)
            self.good.send_data(ch, b'y' * 200000, chunk=8192)
            c.send(b'z\n')
            time.sleep(0.01)
            c.close()
            try:
                self.good.wait_fin(ch, 5)
            except TimeoutError:
                # upstream sends no FIN after a write error; the
                # recommended behaviour (4.3) does
                if not scr.is_legacy():
                    raise
            self.good.send_fin(ch)
            self.good.wait_acked(10)
        self.roundtrip()

    def test_accept_pending_when_vp_disappears(self):
        # a local connect racing with the VP's disconnect or takeover
        # (upstream crashed on this)
        for i in range(30):
            self.assertTrue(self.d.alive(), 'sc_remoted died (status %s) at '
                            'iteration %d' % (self.d.proc.returncode, i))
            fs = self.fake(name='race')
            fs.handshake()
            path = self.d.wait_socket(fs.expected_socket_name())
            socks = []
            for j in range(3):
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.addCleanup(s.close)
                s.connect(path)
                socks.append(s)
            if i % 2:
                fs.close()                  # -> zombie
            else:
                old = fs.detach()           # -> takeover by a resume
                self.addCleanup(old.close)
                fs.connect()
                fs.send_res()
            for s in socks:
                s.close()
            time.sleep(0.02)
        time.sleep(0.2)
        self.assertTrue(self.d.alive(), 'sc_remoted died (status %s)'
                        % self.d.proc.returncode)
        self.roundtrip()

    def test_many_sessions(self):
        fakes = []
        for i in range(60):
            fs = self.fake(name='m%d' % i)
            fs.connect()
            fs.send_new()
            fakes.append(fs)
        ids = set()
        for fs in fakes:
            fs.expect_control(scr.MASTER_ID, 5, strict=True)
            ids.add(fs.vp_alias)
        self.assertEqual(len(ids), 60)
        for fs in fakes:
            self.d.wait_socket(fs.expected_socket_name())
        self.assertEqual(len(self.d.list_sockets()), 61)
        self.roundtrip()

    # -- slow consumers -------------------------------------------------------------

    def test_stalled_client_does_not_block_others(self):
        # VP A's local client does not read while A's scamper sends 8 MiB;
        # VP B keeps working, and A's data all arrives once the client reads
        size = 8 * MIB
        data = random.Random(14).randbytes(size)
        a = self.fake(name='stalled')
        a.handshake()
        ca = UnixClient(self.d.wait_socket(a.expected_socket_name()))
        self.addCleanup(ca.close)
        cha = a.wait_channel_new(5)
        err = []

        def send():
            try:
                a.sock.settimeout(60)
                a.send_data(cha, data, chunk=8192)
            except Exception as e:
                err.append(e)
        th = threading.Thread(target=send, daemon=True)
        th.start()
        time.sleep(1)
        for i in range(3):
            self.roundtrip()
        got = []
        rd = threading.Thread(target=lambda: got.append(
            ca.recv_exact(size, 60)), daemon=True)
        rd.start()
        th.join(60)
        self.assertFalse(th.is_alive(), 'sender blocked')
        self.assertEqual(err, [])
        a.wait_acked(60)
        rd.join(60)
        self.assertTrue(got and got[0] == data, 'data to stalled client differs')
        self.roundtrip()

    def test_stalled_scamper_does_not_block_others(self):
        # VP A's scamper does not read while its local client sends 8 MiB
        size = 8 * MIB
        data = random.Random(15).randbytes(size)
        a = self.fake(name='deaf')
        a.handshake()
        ca = UnixClient(self.d.wait_socket(a.expected_socket_name()))
        self.addCleanup(ca.close)
        cha = a.wait_channel_new(5)
        err = []

        def send():
            try:
                ca.sock.settimeout(60)
                ca.sock.sendall(data)
            except Exception as e:
                err.append(e)
        th = threading.Thread(target=send, daemon=True)
        th.start()
        time.sleep(1)
        for i in range(3):
            self.roundtrip()
        self.assertEqual(a.recv_channel_data(cha, size, 60), data)
        th.join(10)
        self.assertEqual(err, [])
        self.roundtrip()

    # -- timeouts -------------------------------------------------------------------

    @scr.slow
    def test_silent_connection_closed_after_30s(self):
        # The handshake has a hard 30 s deadline: a silent connection and
        # one that trickles bytes without ever completing MASTER_NEW are
        # both cut at ~30 s (a slow handshake must not hold a slot; this
        # project's deviation from upstream, where bytes re-arm 60 s).
        silent = self.tcp()
        partial = self.tcp()
        partial.sendall(b'\x00\x00\x00\x00\x00')
        t0 = time.monotonic()
        result = {}

        def watch(name, sock):
            try:
                wait_closed(sock, 40)
                result[name] = time.monotonic() - t0
            except AssertionError as e:
                result[name] = e

        ths = [threading.Thread(target=watch, args=(n, s), daemon=True)
               for n, s in (('silent', silent), ('partial', partial))]
        for th in ths:
            th.start()
        # meanwhile the good pair keeps working
        while any(th.is_alive() for th in ths) and \
                time.monotonic() - t0 < 42:
            self.roundtrip()
            for th in ths:
                th.join(0.5)
        for th in ths:
            th.join(1)
        for name in ('silent', 'partial'):
            self.assertIn(name, result, 'watcher did not finish')
            dt = result[name]
            self.assertIsInstance(dt, float, '%s connection: %r' % (name, dt))
            self.assertGreaterEqual(dt, 27, '%s closed too early: %.1fs'
                                    % (name, dt))
            self.assertLessEqual(dt, 36, '%s closed too late: %.1fs'
                                 % (name, dt))
        self.roundtrip()


if __name__ == '__main__':
    scr.main()
