#!/usr/bin/env python3
"""Hardening: garbage on every socket (issue 5).

Hundreds of connections, one after another and then many at once, send
random bytes and mutated valid frames to the TCP port (remote protocol),
the mux socket and the per-VP sockets, while two well-behaved VPs keep
doing request/response round trips through -U and mux clients.  The
round trips must never break or stall, the daemon must stay up, exit
cleanly on SIGTERM, and print no AddressSanitizer/UBSan report.
"""

import os
import random
import socket
import struct
import sys
import threading
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import hlib  # noqa: E402
from hlib import scr  # noqa: E402
from scr import pack_frame  # noqa: E402

SEQUENTIAL = 400
THREADS = 16
PER_THREAD = 25


# ---------------------------------------------------------------------------
# generators
# ---------------------------------------------------------------------------

def rnd_bytes(rng, lo=1, hi=3000):
    return rng.randbytes(rng.randint(lo, hi))


def mutate(rng, data):
    """A few random byte-level mutations of data."""
    b = bytearray(data)
    for _ in range(rng.randint(1, 5)):
        op = rng.randrange(7)
        if not b:
            b += rnd_bytes(rng, 1, 16)
            continue
        i = rng.randrange(len(b))
        if op == 0:
            b[i] ^= 1 << rng.randrange(8)
        elif op == 1:
            b[i] = rng.choice([0, 0xff, 0x7f, 0x80, rng.randrange(256)])
        elif op == 2:
            b[i:i] = rnd_bytes(rng, 1, 12)
        elif op == 3:
            del b[i:i + rng.randint(1, 12)]
        elif op == 4:
            del b[i:]
        elif op == 5:
            j = rng.randrange(len(b))
            b[i:i] = b[j:j + rng.randint(1, 40)]
        else:
            # a length field set to something large
            if len(b) >= i + 2:
                b[i:i + 2] = b'\xff\xff'
    return bytes(b)


def remote_stream(rng):
    """A plausible remote-protocol conversation from a fake scamper."""
    magic = rng.randbytes(rng.choice([1, 8, 8, 255]))
    out = []
    if rng.random() < 0.75:
        p = bytes([0, len(magic)]) + magic
        if rng.random() < 0.7:
            name = rng.choice([b'gb', b'g.b-1', b'', b'bad name', b'x' * 254])
            p += bytes([(len(name) + 1) & 0xff]) + name + b'\0'
        out.append(pack_frame(0, 0, p))
    else:
        out.append(pack_frame(0, 0, bytes([6, len(magic)]) + magic +
                              struct.pack('>III', rng.randrange(4),
                                          rng.randrange(4),
                                          rng.randrange(4))))
    seq = 0
    for _ in range(rng.randint(0, 25)):
        k = rng.randrange(8)
        if k < 3:
            out.append(pack_frame(seq, rng.choice([1, 2, 3, 7, 0xffffffff]),
                                  rnd_bytes(rng, 0, 2000)))
            seq += 1
        elif k == 3:
            out.append(pack_frame(seq, 0, bytes([3]) +
                                  struct.pack('>I', rng.randrange(5))))
            seq += 1
        elif k == 4:
            out.append(pack_frame(seq, 0, bytes([5]) +
                                  struct.pack('>I', rng.randrange(4))))
        elif k == 5:
            out.append(pack_frame(seq, 0, bytes([4])))
        elif k == 6:
            out.append(pack_frame(seq, 0, bytes([rng.randrange(256)]) +
                                  rnd_bytes(rng, 0, 40)))
        else:
            out.append(pack_frame(rng.randrange(1 << 32), rng.randrange(3),
                                  rnd_bytes(rng, 0, 64)))
    s = b''.join(out)
    return mutate(rng, s) if rng.random() < 0.8 else s


def mux_stream(rng, vp_ids):
    """A plausible mux client conversation."""
    out = []
    for _ in range(rng.randint(1, 25)):
        k = rng.randrange(7)
        if k < 2:
            vid = rng.choice(vp_ids + [0, rng.randrange(1 << 32)])
            ch = rng.choice([1, 2, 3, 0, rng.randrange(1 << 32)])
            out.append(scr.mux_frame(0, struct.pack('>HII', 3, vid, ch)))
        elif k < 4:
            out.append(scr.mux_frame(rng.choice([1, 2, 3, 9]),
                                     rnd_bytes(rng, 0, 3000)))
        elif k == 4:
            out.append(scr.mux_frame(0, struct.pack('>H', rng.randrange(9)) +
                                     rnd_bytes(rng, 0, 30)))
        elif k == 5:
            out.append(struct.pack('>II', 0, rng.randrange(2)))
        else:
            out.append(struct.pack('>II', rng.randrange(4),
                                   rng.choice([0xffffffff, 70000, 65537])) +
                       rnd_bytes(rng, 0, 100))
    s = b''.join(out)
    return mutate(rng, s) if rng.random() < 0.7 else s


# ---------------------------------------------------------------------------
# one garbage connection
# ---------------------------------------------------------------------------

def send_garbage(rng, target, data, linger):
    """Connect to target (('tcp', port) or ('unix', path)), send data in
    random pieces, read what comes back for up to linger seconds, close
    (sometimes with a reset).  Errors from the peer closing are fine."""
    kind, addr = target
    if kind == 'tcp':
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        addr = ('127.0.0.1', addr)
    else:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(2)
    try:
        s.connect(addr)
        off = 0
        while off < len(data):
            n = rng.randint(1, max(1, len(data) - off))
            s.sendall(data[off:off + n])
            off += n
            if rng.random() < 0.2:
                time.sleep(rng.uniform(0, 0.02))
        end = time.monotonic() + linger
        while time.monotonic() < end:
            s.settimeout(max(0.001, end - time.monotonic()))
            try:
                if not s.recv(65536):
                    break
            except socket.timeout:
                break
        if rng.random() < 0.3:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                         struct.pack('ii', 1, 0))
    except (OSError, socket.timeout):
        pass
    finally:
        s.close()


class GarbageTest(unittest.TestCase):

    def pick(self, rng):
        """A random target and the bytes to send it."""
        r = rng.random()
        if r < 0.45:
            data = remote_stream(rng) if rng.random() < 0.7 \
                else rnd_bytes(rng)
            return ('tcp', self.d.port), data
        if r < 0.75:
            data = mux_stream(rng, self.vp_ids) if rng.random() < 0.7 \
                else rnd_bytes(rng)
            return ('unix', self.d.mux_path), data
        socks = [os.path.join(self.d.udir, n) for n in self.d.list_sockets()]
        if not socks:
            return ('tcp', self.d.port), rnd_bytes(rng)
        return ('unix', rng.choice(socks)), rnd_bytes(rng, 1, 9000)

    def check_alive(self):
        self.assertTrue(self.d.alive(), 'daemon died:\n' +
                        hlib.daemon_log_tail(self.d))
        for p in self.pingers:
            p.check()

    def test_garbage(self):
        d = scr.Daemon(udir=True, mux=True)
        self.d = d
        self.addCleanup(d.__exit__, None, None, None)
        d.wait_listening()
        self.pingers = [hlib.Pinger(d, 'good', interval=0.1, mux=True,
                                    max_rtt=5.0),
                        hlib.Pinger(d, 'victim', interval=0.2, max_rtt=5.0)]
        for p in self.pingers:
            self.addCleanup(p.stop_ev.set)
            p.start()
            self.assertTrue(p.ready.wait(20))
            p.check()
        with scr.MuxClient(d.mux_path) as m:
            self.vp_ids = [v['id'] for v in m.read_burst()]
        self.assertEqual(len(self.vp_ids), 2)
        seed = int(os.environ.get('SC_GARBAGE_SEED', str(os.getpid())))
        print('seed %d' % seed)
        rng = random.Random(seed)
        t0 = time.monotonic()

        for i in range(SEQUENTIAL):
            target, data = self.pick(rng)
            send_garbage(rng, target, data, rng.choice([0, 0.01, 0.05]))
            if i % 20 == 0:
                self.check_alive()
        self.check_alive()
        t_seq = time.monotonic() - t0

        errors = []

        def worker(k):
            wr = random.Random(seed * 100 + k)
            try:
                for _ in range(PER_THREAD):
                    target, data = self.pick(wr)
                    send_garbage(wr, target, data, wr.choice([0, 0.05, 0.2]))
            except Exception as e:  # noqa: BLE001 -- reported below
                errors.append(repr(e))
        threads = [threading.Thread(target=worker, args=(k,), daemon=True)
                   for k in range(THREADS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
            self.assertFalse(t.is_alive(), 'garbage worker hung')
        self.assertEqual(errors, [])
        self.check_alive()
        t_all = time.monotonic() - t0
        # the good VPs kept round-tripping the whole time
        time.sleep(1)
        for p in self.pingers:
            p.stop()
        for p in self.pingers:
            worst, n = p.max_rtt_between(t0, time.monotonic())
            print('%s: %d round trips during the garbage, max %.3f s'
                  % (p.name, n, worst))
            self.assertGreater(n, 5 * t_all * (1 if p.name == 'good' else 0.5))
            self.assertLess(worst, 2.0)
        print('%d sequential connections in %.1f s, %d concurrent; log has '
              '%d lines' % (SEQUENTIAL, t_seq, THREADS * PER_THREAD,
                            d.log().count('\n')))
        hlib.check_no_sanitizer(self, d)
        self.assertEqual(d.stop(), 0, hlib.daemon_log_tail(d))
        hlib.check_no_sanitizer(self, d)


if __name__ == '__main__':
    scr.main()
