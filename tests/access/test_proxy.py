#!/usr/bin/env python3
"""The PROXY protocol (issue 21): -O proxy-from, -O proxy-ports.

A connection from a -O proxy-from address must start with a PROXY v1 or
v2 header; its source address is then the VP's address everywhere
(MASTER_ID, -U socket name, /vps, -O allow, per-source-max).  The
"balancer" here is the test itself connecting from 127.0.0.1 (trusted)
or 127.0.0.2 (not trusted) and writing the header by hand.
"""

import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import unittest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                '..', 'lib'))
import scr  # noqa: E402
from scr import (Daemon, FakeScamper, proxy_v1, proxy_v2,  # noqa: E402
                 proxy_factory, wait_closed)

def count_log(d, regex):
    return len(re.findall(regex, d.log(), re.M))


class ProxyBase(unittest.TestCase):

    def daemon(self, args=(), **kw):
        d = Daemon(extra_args=['-O', 'proxy-from=127.0.0.1'] + list(args),
                   **kw)
        self.addCleanup(d.__exit__, None, None, None)
        d.wait_listening()
        return d

    def fake(self, d, header, source=None, **kw):
        fs = FakeScamper(d.port, sock_factory=proxy_factory(
            '127.0.0.1', d.port, header, source), **kw)
        self.addCleanup(fs.close)
        return fs

    def raw(self, d, data, source=None, port=None):
        kw = {'source_address': (source, 0)} if source else {}
        s = socket.create_connection(('127.0.0.1', port or d.port),
                                     timeout=5, **kw)
        self.addCleanup(s.close)
        if data:
            s.sendall(data)
        return s


@unittest.skipIf(scr.is_legacy(), 'PROXY protocol is this daemon only')
class ProxyScamperTest(ProxyBase):

    def test_v2_address_everywhere(self):
        d = self.daemon(metrics=True)
        src = ('127.0.0.9', 4242)
        fs = self.fake(d, proxy_v2(src, ('127.0.0.1', d.port)), name='pv')
        self.assertEqual(fs.handshake(), '127.0.0.9:4242')
        d.wait_socket('pv-127.0.0.9:4242')
        vps = d.vps()
        self.assertEqual([(v['address'], v['peer']) for v in vps],
                         [('127.0.0.9', '127.0.0.9:4242')])
        self.assertRegex(d.log(), r'127\.0\.0\.1:\d+: PROXY v2: client '
                         r'127\.0\.0\.9 port 4242')
        m = d.scrape()
        self.assertEqual(m[('sc_remoted_proxy_headers_total',
                            (('result', 'client'),))], 1)

    def test_v1_and_ipv6_source(self):
        d = self.daemon()
        fs = self.fake(d, proxy_v1(('2001:db8::7', 1000), ('::1', 1)))
        self.assertEqual(fs.handshake(), '2001:db8::7.1000')
        d.wait_socket('2001:db8::7.1000')

    def test_header_and_protocol_in_one_segment_and_split(self):
        """Only the header's bytes are taken: MASTER_NEW in the same
        segment reaches the remote protocol; a header dribbled byte by
        byte is still read."""
        d = self.daemon()
        hdr = proxy_v2(('127.0.0.11', 7), ('127.0.0.1', d.port))
        fs = FakeScamper(d.port, sock=self.raw(d, b''), name='one')
        self.addCleanup(fs.close)
        fs.send_raw(hdr + scr.pack_frame(0, 0, fs.new_payload('one')))
        f = fs.recv_frame()
        self.assertEqual(fs.vp_alias, '127.0.0.11:7', f)
        s = self.raw(d, b'')
        for b in proxy_v1(('127.0.0.12', 8), ('127.0.0.1', 1)):
            s.sendall(bytes([b]))
            time.sleep(0.002)
        fs2 = FakeScamper(d.port, sock=s)
        self.addCleanup(fs2.close)
        fs2.send_new()
        fs2.recv_frame()
        self.assertEqual(fs2.vp_alias, '127.0.0.12:8')

    @unittest.skipIf(os.environ.get('SC_HAVE_OPENSSL') == '0' or
                     not shutil.which('openssl'), 'no TLS')
    def test_header_before_tls(self):
        """The header comes in clear before the TLS ClientHello."""
        tmp = tempfile.mkdtemp(prefix='scr-proxy-tls-')
        self.addCleanup(shutil.rmtree, tmp, True)
        key, crt = os.path.join(tmp, 'k.pem'), os.path.join(tmp, 'c.pem')
        subprocess.run(['openssl', 'req', '-x509', '-newkey', 'ec',
                        '-pkeyopt', 'ec_paramgen_curve:prime256v1',
                        '-nodes', '-keyout', key, '-out', crt, '-days', '2',
                        '-subj', '/CN=localhost'], check=True,
                       capture_output=True)
        d = self.daemon(tls={'cert': crt, 'key': key})
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        raw = self.raw(d, proxy_v2(('127.0.0.13', 99), ('127.0.0.1', 1)))
        tls = ctx.wrap_socket(raw, server_hostname=None)
        fs = FakeScamper(d.port, sock=tls, name='tls')
        self.addCleanup(fs.close)
        fs.send_new()
        fs.recv_frame()
        self.assertEqual(fs.vp_alias, '127.0.0.13:99')
        d.wait_socket('tls-127.0.0.13:99')

    def test_untrusted_source_header_is_protocol_error(self):
        d = self.daemon()
        s = self.raw(d, proxy_v2(('127.0.0.9', 1), ('127.0.0.1', 2)),
                     source='127.0.0.2')
        wait_closed(s, 10)
        self.assertNotIn('127.0.0.9', d.log())
        # and a direct VP from there still works, under its own address
        fs = FakeScamper(d.port, sock_factory=lambda: socket.create_connection(
            ('127.0.0.1', d.port), source_address=('127.0.0.2', 0)))
        self.addCleanup(fs.close)
        self.assertTrue(fs.handshake().startswith('127.0.0.2:'))

    def test_health_checks_closed_quietly(self):
        d = self.daemon(metrics=True)
        key = ('sc_remoted_proxy_headers_total', (('result', 'health_check'),))
        base = d.scrape()[key]    # wait_listening's probe is one
        s = self.raw(d, proxy_v2(local=True))
        wait_closed(s, 5)
        s = self.raw(d, b'PROXY UNKNOWN\r\n')
        wait_closed(s, 5)
        self.raw(d, b'').close()        # a plain TCP connect check
        scr.wait_until(lambda: d.scrape()[key] == base + 3, 5,
                       what='3 checks')
        self.assertNotRegex(d.log(), r'closing|refused')
        self.assertEqual(d.vps(), [])

    def test_bad_headers(self):
        d = self.daemon(metrics=True)
        dst = ('127.0.0.1', d.port)
        good4 = proxy_v2(('127.0.0.9', 1), dst)
        cases = [
            (b'GET / HTTP/1.0\r\n\r\n', 'no PROXY protocol signature'),
            (b'PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n', 'malformed PROXY v1'),
            (b'PROXY TCP4 ' + b'9' * 120, 'PROXY header too long'),
            (good4[:12] + b'\x21\x11\x10\x00', 'PROXY header too long'),
            (good4[:12] + b'\x31' + good4[13:], 'unknown PROXY v2 version'),
            (proxy_v2(('127.0.0.9', 1), dst, fam=0x12),
             'family is not TCP'),
            (proxy_v2(('127.0.0.9', 1), dst, tlvs=b'\x04\x00\x09x'),
             'bad PROXY v2 TLV'),
            (proxy_v2(('127.0.0.9', 1), dst,
                      tlvs=b'\x03\x00\x04\x00\x00\x00\x01'),
             'bad PROXY v2 TLV'),
        ]
        for data, msg in cases:
            s = self.raw(d, data)
            wait_closed(s, 5)
            d.wait_log(re.escape(msg) + r'.*: closing')
        s = self.raw(d, good4[:20])
        s.shutdown(socket.SHUT_WR)
        wait_closed(s, 5)
        d.wait_log(r'truncated PROXY header: closing')
        m = d.scrape()
        self.assertEqual(m[('sc_remoted_proxy_headers_total',
                            (('result', 'refused'),))], len(cases) + 1)
        # the daemon carries on
        fs = self.fake(d, good4)
        self.assertEqual(fs.handshake(), '127.0.0.9:1')

    def test_deadline(self):
        d = self.daemon()
        s = self.raw(d, b'PROXY TCP4 ')
        wait_closed(s, 15)
        d.wait_log(r'PROXY header not complete in time: closing')

    def test_allow_and_per_source_on_real_source(self):
        d = self.daemon(['-O', 'allow=127.0.0.8/31',
                         '-O', 'per-source-max=1'])
        dst = ('127.0.0.1', d.port)
        a = self.fake(d, proxy_v2(('127.0.0.8', 1), dst))
        self.assertEqual(a.handshake(), '127.0.0.8:1')
        b = self.fake(d, proxy_v2(('127.0.0.9', 2), dst))
        self.assertEqual(b.handshake(), '127.0.0.9:2')
        # the same real source again: per-source-max, though the
        # balancer's address (127.0.0.1) holds both connections
        c = self.fake(d, proxy_v2(('127.0.0.8', 3), dst))
        c.connect()
        c.send_new()
        c.expect_closed()
        d.wait_log(r'127\.0\.0\.8: connection refused: source holds 1 '
                   r'connections \(per-source-max\)')
        e = self.fake(d, proxy_v1(('127.0.0.20', 4), dst))
        e.connect()
        e.send_new()
        e.expect_closed()
        d.wait_log(r'127\.0\.0\.20: connection refused: source not in '
                   r'-O allow')

    def test_mux_and_metrics_opt_in(self):
        d = self.daemon(['-O', 'proxy-ports=mux,metrics,scamper',
                         '-O', 'mux-allow=127.0.0.30'],
                        mux=True, mux_tcp=True, metrics=True)
        fs = self.fake(d, proxy_v2(('127.0.0.9', 1), ('127.0.0.1', 1)))
        fs.handshake()
        s = self.raw(d, proxy_v1(('127.0.0.30', 5), ('127.0.0.1', 1)),
                     port=d.mux_tcp[1])
        buf = b''
        deadline = time.time() + 5
        while b'127.0.0.9' not in buf and time.time() < deadline:
            chunk = s.recv(4096)
            if not chunk:
                break
            buf += chunk
        self.assertIn(b'127.0.0.9', buf)   # the VP_UPDATE burst came
        s2 = self.raw(d, proxy_v1(('127.0.0.31', 5), ('127.0.0.1', 1)),
                      port=d.mux_tcp[1])
        wait_closed(s2, 5)
        d.wait_log(r'127\.0\.0\.31: mux connection refused')
        h = self.raw(d, proxy_v2(('127.0.0.40', 9), ('127.0.0.1', 1)) +
                     b'GET /vps HTTP/1.0\r\n\r\n', port=d.metrics_port)
        body = b''
        while True:
            chunk = h.recv(65536)
            if not chunk:
                break
            body += chunk
        self.assertIn(b'200 OK', body)
        self.assertIn(b'"address":"127.0.0.9"', body)

    def test_default_is_scamper_port_only(self):
        d = self.daemon(metrics=True)
        h = self.raw(d, b'GET /vps HTTP/1.0\r\n\r\n', port=d.metrics_port)
        self.assertIn(b'200 OK', h.recv(65536))

    def test_bad_proxy_options(self):
        for bad in (['-O', 'proxy-from=example.org'],
                    ['-O', 'proxy-ports=scamper,ftp'],
                    ['-O', 'proxy-ports=']):
            rc, _, err = scr.run_cli(['-P', '1'] + bad)
            self.assertNotEqual(rc, 0, bad)


if __name__ == '__main__':
    unittest.main()
