#!/usr/bin/env python3
"""Offline checks of the test library's codecs (no daemon needed), so that
a failure elsewhere can be trusted to be the daemon's."""

import os
import random
import struct
import sys
import unittest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                '..', 'lib'))
import scr  # noqa: E402


class CodecTest(unittest.TestCase):

    def test_pack_frame_layout(self):
        self.assertEqual(scr.pack_frame(0, 0, b'\x07'),
                         bytes.fromhex('00000000 00000000 0001 07'))
        self.assertEqual(scr.pack_frame(0x01020304, 0x0a0b0c0d, b'ab'),
                         bytes.fromhex('01020304 0a0b0c0d 0002 6162'))
        with self.assertRaises(ValueError):
            scr.pack_frame(0, 1, bytes(65536))

    def test_frame_reader_reassembly(self):
        rnd = random.Random(1)
        frames = [(rnd.randint(0, 0xffffffff), rnd.randint(0, 5),
                   rnd.randbytes(rnd.randint(0, 3000))) for _ in range(50)]
        frames.append((1, 2, bytes(65535)))
        stream = b''.join(scr.pack_frame(*f) for f in frames)
        r = scr.FrameReader()
        got = []
        off = 0
        while off < len(stream):
            n = rnd.randint(1, 5000)
            got += r.feed(stream[off:off + n])
            off += n
        self.assertEqual([tuple(f) for f in got], frames)
        self.assertEqual(r.pending, 0)
        # split header
        r = scr.FrameReader()
        self.assertEqual(r.feed(b'\0' * 9), [])
        self.assertEqual(r.feed(b'\0'), [scr.Frame(0, 0, b'')])

    def test_frame_properties(self):
        f = scr.Frame(3, 0, bytes([scr.ACK]) + struct.pack('>I', 9))
        self.assertEqual(f.type, scr.ACK)
        self.assertEqual(f.body, struct.pack('>I', 9))
        self.assertFalse(f.reliable)
        self.assertTrue(scr.Frame(0, 0, b'\x03\0\0\0\1').reliable)
        self.assertTrue(scr.Frame(0, 4, b'x').reliable)

    def test_seq_lt(self):
        self.assertTrue(scr.seq_lt(0xffffffff, 0))
        self.assertFalse(scr.seq_lt(0, 0xffffffff))
        self.assertTrue(scr.seq_lt(1, 2))
        self.assertFalse(scr.seq_lt(2, 2))

    def test_uuencode_length_formula(self):
        for n in (0, 1, 2, 3, 44, 45, 46, 89, 90, 91, 1000):
            enc = scr.uuencode(os.urandom(n))
            r = n % 45
            want = 62 * (n // 45) + ((2 + 4 * -(-r // 3)) if r else 0) + 2
            self.assertEqual(len(enc), want, 'n=%d' % n)
            self.assertTrue(enc.endswith(b'`\n'))
            self.assertNotIn(b' ', enc)

    def test_uu_roundtrip(self):
        rnd = random.Random(2)
        for n in (0, 1, 45, 100, 4000):
            data = rnd.randbytes(n)
            self.assertEqual(scr.uudecode(scr.uuencode(data)), data)

    def test_parse_data_blocks(self):
        ping = scr.warts_record(scr.WARTS_PING, b'p' * 60)
        lst = scr.warts_record(scr.WARTS_LIST, b'l' * 10) + \
            scr.warts_record(scr.WARTS_CYCLE_START, b'c' * 12)
        stop = scr.warts_record(scr.WARTS_CYCLE_STOP, b'')
        stream = (b'MORE\n' + scr.data_block(lst) + b'OK id-1\nMORE\n' +
                  scr.data_block(ping, 1) + b'OK\n' + scr.data_block(stop) +
                  b'DATA 99\nabc')          # incomplete trailing block
        blocks = scr.parse_data_blocks(stream)
        self.assertEqual(len(blocks), 3)
        h, data = blocks[1]
        self.assertEqual(h, 'DATA %d id-1' % len(scr.uuencode(ping)))
        self.assertEqual(data, ping)
        self.assertEqual(blocks[0].types, [scr.WARTS_LIST,
                                           scr.WARTS_CYCLE_START])
        self.assertEqual(blocks[1].type, 7)
        self.assertEqual(blocks[1].task_id, 1)
        self.assertEqual(blocks[2].type, 4)
        self.assertIsNone(blocks[2].task_id)
        with self.assertRaises(ValueError):
            scr.parse_data_blocks(stream, strict=True)
        lines = [i[1] for i in scr.parse_control_stream(stream)
                 if i[0] == 'line']
        self.assertEqual(lines, ['MORE', 'OK id-1', 'MORE', 'OK'])

    def test_warts_records_errors(self):
        with self.assertRaises(ValueError):
            scr.warts_records(b'\x12\x06\0\x07\0\0\0\0')
        with self.assertRaises(ValueError):
            scr.warts_records(scr.warts_record(7, b'abc')[:-1])

    def test_vp_update_parse(self):
        payload = struct.pack('>HI', 0, 5)
        for a, v in ((1, b'vp.one'), (2, b'1795413934.825990'),
                     (3, b'192.0.2.1'), (10, b't1'), (10, b't2'),
                     (99, b'unknown')):
            payload += struct.pack('>H', a) + v + b'\0'
        frame = scr.mux_frame(0, payload)
        vp = scr.parse_vp_update(payload, frame)
        self.assertEqual(vp['id'], 5)
        self.assertEqual(vp['name'], 'vp.one')
        self.assertEqual(vp['arrival'], '1795413934.825990')
        self.assertEqual(vp['ipv4'], '192.0.2.1')
        self.assertEqual(vp['tags'], ['t1', 't2'])
        self.assertEqual(vp['attr99'], 'unknown')
        self.assertEqual(vp['attr_order'], [1, 2, 3, 10, 10, 99])
        self.assertEqual(vp['raw'], frame)
        with self.assertRaises(ValueError):
            scr.parse_vp_update(payload[:-1])

    def test_peer_id(self):
        self.assertEqual(scr.peer_id(('127.0.0.1', 5)), '127.0.0.1:5')
        self.assertEqual(scr.peer_id(('2001:db8::1', 1026, 0, 0)),
                         '2001:db8::1.1026')


if __name__ == '__main__':
    scr.main()
