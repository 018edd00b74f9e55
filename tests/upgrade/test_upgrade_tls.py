#!/usr/bin/env python3
"""Live upgrade with a TLS VP (issue 12): OpenSSL cannot hand a live
record layer to another process, so the TLS session crosses as a zombie.
The old process sends close_notify on the TLS connection as it exits;
scamper resumes with MASTER_RES into the new process, and nothing is
lost either way; the VP's -U client stays connected throughout.
Exit status 77 (skip) when the daemon was built without OpenSSL.
"""

import os
import shutil
import socket
import ssl
import sys
import tempfile
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, '..', 'lib'))
sys.path.insert(0, os.path.join(HERE, '..', 'tls'))
sys.path.insert(0, HERE)
import scr  # noqa: E402
from scr import Daemon, FakeScamper, UnixClient  # noqa: E402
from test_upgrade import Upgrader, pattern, ALT  # noqa: E402

T = 20
CERTS = None
_TMP = None


def setUpModule():
    global CERTS, _TMP
    import certs
    _TMP = tempfile.mkdtemp(prefix='scr-upg-tls-')
    CERTS = certs.CertSet(_TMP)


def tearDownModule():
    if _TMP:
        shutil.rmtree(_TMP, ignore_errors=True)


def connect_tls(port):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(CERTS.ca_cert)
    raw = socket.create_connection(('127.0.0.1', port), timeout=T)
    s = ctx.wrap_socket(raw, server_hostname=None)
    s.settimeout(T)
    return s


class TestUpgradeTLS(unittest.TestCase):

    def test_tls_vp_resumes_in_new_process(self):
        d = Daemon(start=False, zombie=120,
                   tls={'cert': CERTS.server_cert, 'key': CERTS.server_key})
        self.addCleanup(d.__exit__, None, None, None)
        up = Upgrader(d)
        d.start()
        d.wait_listening()
        fs = FakeScamper(d.port, name='tlsvp',
                         sock_factory=lambda: connect_tls(d.port))
        self.addCleanup(fs.close)
        fs.handshake(T)
        d.wait_socket(fs.expected_socket_name(), T)
        uc = UnixClient(os.path.join(d.udir, fs.expected_socket_name()), T)
        self.addCleanup(uc.close)
        chan = fs.wait_channel_new(T)
        fs.send_data(chan, pattern(b'down', 0, 5000))
        self.assertEqual(uc.recv_exact(5000, T), pattern(b'down', 0, 5000))

        # data toward scamper that it has not acknowledged when the
        # upgrade happens: it must be replayed after the resume
        fs.auto_ack = False
        uc.send(pattern(b'up', 0, 3000))
        self.assertEqual(fs.recv_channel_data(chan, 3000, T),
                         pattern(b'up', 0, 3000))
        up.install(ALT)
        d.upgrade(T)
        # the old process said goodbye with close_notify
        fs.expect_closed(T)
        fs.close()
        # meanwhile the client keeps writing; the new process queues it
        uc.send(pattern(b'up', 3000, 2000))
        fs.auto_ack = True
        # scamper reconnects and resumes: its MASTER_RES says it has the
        # 3000 bytes it never ACKed, so only the 2000 queued since come
        fs.resume()
        self.assertTrue(fs.go)
        self.assertEqual(fs.recv_channel_data(chan, 2000, T),
                         pattern(b'up', 3000, 2000))
        fs.send_data(chan, pattern(b'down', 5000, 4000))
        self.assertEqual(uc.recv_exact(4000, T), pattern(b'down', 5000, 4000))
        self.assertRegex(d.log(), r'upgrade 1: pid \d+ version \S+-alt took '
                         r'over from .*: 1 VPs')
        self.assertEqual(d.stop(), 0)


def main():
    if os.environ.get('SC_HAVE_OPENSSL') == '0' or not os.path.exists(ALT):
        print('skip: needs an OpenSSL build and tests/upgrade/sc_remoted_alt')
        sys.exit(77)
    scr.main()


if __name__ == '__main__':
    main()
