#!/usr/bin/env python3
"""The -O metrics HTTP endpoint (issue 11): /metrics and /vps.

* HTTP behaviour: exact Content-Types, HEAD, keep-alive (1.1 default,
  Connection: close honoured, 1.0 closes unless keep-alive), pipelining,
  404, 405 with Allow, 400 for garbage, 431 for an endless header.
* counters and gauges against what the test created and relayed through
  fake scampers, -U clients and a mux client; departures and rejects by
  reason.
* /vps fields, JSON escaping of metadata (quotes, backslash, control
  characters, non-UTF-8 bytes), incremental output over many VPs.
* bad input: slowloris (request deadline), a client that never reads a
  large /vps (write deadline), the cap on concurrent connections with its
  log line, many idle connections; VPs and clients keep working.
"""

import os
import resource
import shutil
import socket
import ssl
import sys
import tempfile
import time
import unittest

import scr
from scr import Daemon, UnixClient, HttpConn, http_get, prom_value

HC_TIMEOUT = 10     # the daemon's request/write deadline


def relay_roundtrip(test, fs, client, ch, req, ans):
    client.send(req)
    test.assertEqual(fs.recv_channel_data(ch, len(req), 5), req)
    del fs.chan_data[ch][:len(req)]
    fs.send_data(ch, ans)
    test.assertEqual(client.recv_exact(len(ans), 5), ans)


def close_quietly(objs):
    for o in objs:
        try:
            o.close()
        except OSError:
            pass


class HttpTest(unittest.TestCase):

    def setUp(self):
        self.d = Daemon(udir=True, metrics=True)
        self.addCleanup(self.d.__exit__, None, None, None)
        self.d.wait_listening()
        self.port = self.d.metrics_port

    def test_metrics_page(self):
        r = http_get(self.port, '/metrics')
        self.assertEqual(r.status, 200)
        self.assertEqual(r.headers['content-type'],
                         'text/plain; version=0.0.4')
        m = scr.parse_prom(r.body.decode())
        for name in ('sc_remoted_vp_arrivals_total',
                     'sc_remoted_vp_resumes_total',
                     'sc_remoted_unacked_bytes', 'sc_remoted_channels',
                     'sc_remoted_backpressure_pauses_total',
                     'sc_remoted_stall_disconnects_total',
                     'sc_remoted_last_reload_timestamp_seconds',
                     'process_start_time_seconds'):
            self.assertIn((name, ()), m, name)
        for st in ('handshake', 'go', 'zombie'):
            self.assertIsNotNone(prom_value(m, 'sc_remoted_vps', state=st))
        for dr in ('from_vp', 'to_vp'):
            self.assertEqual(prom_value(m, 'sc_remoted_relay_bytes_total',
                                        direction=dr), 0)
        build = [k for k in m if k[0] == 'sc_remoted_build_info']
        self.assertEqual(len(build), 1)
        labels = dict(build[0][1])
        self.assertIn(labels['backend'], ('epoll', 'kqueue', 'select'))
        self.assertEqual(labels['tls'], 'no' if os.environ.get(
            'SC_HAVE_OPENSSL', '1') == '0' else 'yes')
        self.assertEqual((prom_value(
            m, 'sc_remoted_tls_handshake_failures_total', reason='handshake')
            is None), labels['tls'] == 'no')
        if sys.platform.startswith('linux'):
            self.assertGreater(m[('process_open_fds', ())], 3)
            self.assertGreater(m[('process_resident_memory_bytes', ())], 0)

    def test_head_404_405_400(self):
        g = http_get(self.port, '/metrics')
        h = http_get(self.port, '/metrics', method='HEAD')
        self.assertEqual(h.status, 200)
        self.assertEqual(h.body, b'')
        self.assertEqual(h.headers['content-type'], g.headers['content-type'])
        self.assertIn('content-length', h.headers)
        h = http_get(self.port, '/vps', method='HEAD')
        self.assertEqual((h.status, h.headers['content-type']),
                         (200, 'application/json'))
        r = http_get(self.port, '/nope')
        self.assertEqual(r.status, 404)
        r = http_get(self.port, '/metrics', method='POST')
        self.assertEqual(r.status, 405)
        self.assertEqual(r.headers['allow'], 'GET, HEAD')
        with HttpConn(self.port) as c:
            c.send(b'\x16\x03\x01 garbage\r\n\r\n')
            r = c.response()
            self.assertEqual(r.status, 400)
            self.assertTrue(c.closed())
        with HttpConn(self.port) as c:
            c.send(b'GET /metrics HTTP/1.1\r\n')
            for _ in range(20):
                try:
                    c.send(b'X-Long: ' + b'a' * 500 + b'\r\n')
                except OSError:
                    break
            r = c.response()
            self.assertEqual(r.status, 431)
            self.assertTrue(c.closed())
        m = self.d.scrape()
        self.assertGreaterEqual(prom_value(
            m, 'sc_remoted_http_requests_total', code='400'), 1)
        self.assertGreaterEqual(prom_value(
            m, 'sc_remoted_http_requests_total', code='431'), 1)
        self.assertIn('malformed request', self.d.log())

    def test_keepalive(self):
        with HttpConn(self.port) as c:
            for path in ('/metrics', '/vps', '/metrics', '/x'):
                c.request(path)
                r = c.response()
                self.assertEqual(r.status, 404 if path == '/x' else 200)
                self.assertNotIn('connection', r.headers)
            # pipelined: three requests in one write, answered in order
            c.send(b'GET /vps HTTP/1.1\r\n\r\nHEAD /metrics HTTP/1.1\r\n\r\n'
                   b'GET /nope HTTP/1.1\r\n\r\n')
            self.assertEqual(c.response().status, 200)
            self.assertEqual(c.response(head_only=True).status, 200)
            self.assertEqual(c.response().status, 404)
            c.request('/metrics', headers=('Connection: close',))
            r = c.response()
            self.assertEqual(r.headers['connection'], 'close')
            self.assertTrue(c.closed())
        with HttpConn(self.port) as c:
            c.request('/metrics', version='1.0')
            r = c.response()
            self.assertEqual((r.version, r.status), ('HTTP/1.0', 200))
            self.assertTrue(c.closed())
        with HttpConn(self.port) as c:
            c.request('/metrics', version='1.0',
                      headers=('Connection: keep-alive',))
            self.assertEqual(c.response().headers['connection'],
                             'keep-alive')
            c.request('/vps', version='1.0',
                      headers=('Connection: keep-alive',))
            r = c.response()    # no length: the body ends with the close
            self.assertEqual(r.body, b'[\n]\n')
            self.assertTrue(c.closed())


META = (b'obs1 cc NZ\n'
        b'obs1 place Quote " back \\ slash\x01 e\xc3\xa9 bad\xff\n'
        b'obs1 tag first\n'
        b'obs1 tag second\n')


class CountersTest(unittest.TestCase):

    def test_counters_and_vps(self):
        d = Daemon(udir=True, mux=True, metrics=True, zombie=0, meta=META)
        self.addCleanup(d.__exit__, None, None, None)
        d.wait_listening()
        fs1 = d.fake(name='obs1')
        fs2 = d.fake(name='obs2')
        self.addCleanup(close_quietly, [fs1, fs2])
        fs1.handshake()
        fs2.handshake()
        d.wait_socket(fs1.expected_socket_name())
        uc = UnixClient(os.path.join(d.udir, fs1.expected_socket_name()))
        self.addCleanup(uc.close)
        ch = fs1.wait_channel_new()
        mux = d.mux()
        self.addCleanup(mux.close)
        mux.read_burst()

        sent_to = sent_from = 0
        for i in range(5):
            req = b'request %d\n' % i
            ans = b'answer %d ' % i + b'x' * (1000 * i) + b'\n'
            relay_roundtrip(self, fs1, uc, ch, req, ans)
            sent_to += len(req)
            sent_from += len(ans)

        m = scr.wait_until(
            lambda: (lambda m: m if prom_value(
                m, 'sc_remoted_vps', state='go') == 2 and prom_value(
                    m, 'sc_remoted_vps', state='handshake') == 0
                else None)(d.scrape()), 10, what='2 VPs in go')
        self.assertEqual(m[('sc_remoted_vp_arrivals_total', ())], 2)
        self.assertEqual(prom_value(m, 'sc_remoted_relay_bytes_total',
                                    direction='from_vp'), sent_from)
        self.assertEqual(prom_value(m, 'sc_remoted_relay_bytes_total',
                                    direction='to_vp'), sent_to)
        self.assertEqual(prom_value(m, 'sc_remoted_relay_frames_total',
                                    direction='from_vp'), 5)
        self.assertEqual(prom_value(m, 'sc_remoted_relay_frames_total',
                                    direction='to_vp'), 5)
        self.assertEqual(m[('sc_remoted_channels', ())], 1)
        self.assertEqual(prom_value(m, 'sc_remoted_clients', kind='unix'), 1)
        self.assertEqual(prom_value(m, 'sc_remoted_clients', kind='mux'), 1)
        self.assertEqual(prom_value(m, 'sc_remoted_metadata_reloads_total',
                                    result='ok'), 1)
        self.assertGreater(
            m[('sc_remoted_last_reload_timestamp_seconds', ())], 1e9)

        vps = d.vps()
        self.assertEqual([v['name'] for v in vps], ['obs1', 'obs2'])
        v = vps[0]
        self.assertLess(v['id'], vps[1]['id'])
        self.assertEqual(v['state'], 'go')
        self.assertEqual(v['address'], '127.0.0.1')
        self.assertEqual(v['peer'], fs1.peer_id)
        self.assertEqual((v['bytes_from_vp'], v['bytes_to_vp']),
                         (sent_from, sent_to))
        self.assertEqual((v['frames_from_vp'], v['frames_to_vp']), (5, 5))
        self.assertEqual(v['channels'], 1)
        self.assertEqual(v['clients'], {'unix': 1, 'mux': 0})
        self.assertIsNone(v['zombie_deadline'])
        now = time.time()
        self.assertLessEqual(abs(v['connected_since'] - now), 60)
        self.assertLessEqual(abs(v['last_rx'] - now), 60)
        self.assertGreaterEqual(v['unacked_bytes'], 0)
        self.assertNotIn('tls_subject', v)
        self.assertEqual(v['metadata']['cc'], 'NZ')
        self.assertEqual(v['metadata']['place'],
                         'Quote " back \\ slash\x01 e\u00e9 bad\ufffd')
        self.assertEqual(v['metadata']['tags'], ['first', 'second'])
        self.assertEqual(vps[1]['metadata'], {})
        self.assertEqual(vps[1]['bytes_from_vp'], 0)

        # a protocol error, an unknown resume, a peer close (-Z 0)
        fs2.send_frame(12345, 0, b'\x05')
        fs2.expect_closed()
        r = scr.probe_res(d.port, os.urandom(8))
        fs1.close()
        m = scr.wait_until(
            lambda: (lambda m: m if prom_value(
                m, 'sc_remoted_vp_departures_total', reason='closed') == 1
                else None)(d.scrape()), 10, what='departure counted')
        self.assertEqual(prom_value(m, 'sc_remoted_vp_departures_total',
                                    reason='protocol_error'), 1)
        self.assertEqual(prom_value(m, 'sc_remoted_vp_rejects_total',
                                    reason='unknown_magic'), 1, r)
        self.assertEqual(prom_value(m, 'sc_remoted_vps', state='go'), 0)
        self.assertEqual(d.vps(), [])

    def test_zombie_and_resume(self):
        d = Daemon(udir=True, metrics=True, zombie=60)
        self.addCleanup(d.__exit__, None, None, None)
        d.wait_listening()
        fs = d.fake(name='z1')
        self.addCleanup(fs.close)
        fs.handshake()
        fs.detach().close()
        vps = scr.wait_until(
            lambda: (lambda v: v if v and v[0]['state'] == 'zombie'
                     else None)(d.vps()), 10, what='zombie')
        dl = vps[0]['zombie_deadline']
        self.assertIsNone(vps[0]['connected_since'])
        self.assertTrue(50 <= dl - time.time() <= 62, dl - time.time())
        fs.reconnect()
        fs.resume()
        m = scr.wait_until(
            lambda: (lambda m: m if m[('sc_remoted_vp_resumes_total', ())]
                     == 1 else None)(d.scrape()), 10, what='resume')
        self.assertEqual(m[('sc_remoted_vp_zombies_total', ())], 1)
        self.assertEqual(prom_value(m, 'sc_remoted_vps', state='go'), 1)
        self.assertEqual(d.vps()[0]['state'], 'go')


class ManyVpsTest(unittest.TestCase):
    """/vps over a few hundred VPs with big metadata: complete, in id
    order, while VPs leave during the transfer; a client that never reads
    is closed by the write deadline and nobody else notices."""

    N = 300

    def test_many(self):
        big = b'v' * 3000
        meta = b''.join(b'm%d tag %s\n' % (i, big) for i in range(self.N))
        d = Daemon(udir=False, mux=True, metrics=True, zombie=0, meta=meta)
        self.addCleanup(d.__exit__, None, None, None)
        d.wait_listening()
        fakes = []
        self.addCleanup(close_quietly, fakes)
        for i in range(self.N):
            fs = d.fake(name='m%d' % i)
            fakes.append(fs)
            fs.handshake()
        vps = d.vps()
        self.assertEqual(len(vps), self.N)
        ids = [v['id'] for v in vps]
        self.assertEqual(ids, sorted(ids))
        self.assertEqual(vps[7]['metadata']['tags'], [big.decode()])

        # a reader that stops: small receive window, one byte read
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect(('127.0.0.1', d.metrics_port))
        self.addCleanup(s.close)
        s.sendall(b'GET /vps HTTP/1.1\r\n\r\n')
        s.settimeout(5)
        self.assertTrue(s.recv(1))
        t0 = time.monotonic()
        # meanwhile: VPs leave, scrapes and a relay keep working
        for fs in fakes[:50]:
            fs.close()
        m = scr.wait_until(
            lambda: (lambda m: m if prom_value(
                m, 'sc_remoted_vps', state='go') == self.N - 50
                else None)(d.scrape()), 10, what='50 departures')
        with HttpConn(d.metrics_port) as c:
            c.request('/vps')
            got = scr.json.loads(c.response().body)
        self.assertEqual(len(got), self.N - 50)
        mux = d.mux()
        self.addCleanup(mux.close)
        burst = mux.read_burst()
        self.assertEqual(len(burst), self.N - 50)
        # the stalled reader is dropped after the write deadline (it
        # reads nothing until then: any read is progress)
        d.wait_log(r'write deadline passed', timeout=HC_TIMEOUT + 20)
        self.assertGreaterEqual(time.monotonic() - t0, HC_TIMEOUT - 1.5)
        s.settimeout(5)
        got = 0
        try:
            while True:
                n = len(s.recv(1 << 20))
                if n == 0:
                    break
                got += n
        except ConnectionResetError:
            pass
        self.assertLess(got, 512 * 1024)   # the answer is over 750 kB
        self.assertEqual(len(d.vps()), self.N - 50)


class BadInputTest(unittest.TestCase):

    def test_slowloris_and_cap(self):
        d = Daemon(udir=True, metrics=True,
                   extra_args=['-O', 'metrics-max=8'])
        self.addCleanup(d.__exit__, None, None, None)
        d.wait_listening()
        fs = d.fake(name='slow1')
        self.addCleanup(fs.close)
        fs.handshake()
        d.wait_socket(fs.expected_socket_name())
        uc = UnixClient(os.path.join(d.udir, fs.expected_socket_name()))
        self.addCleanup(uc.close)
        ch = fs.wait_channel_new()

        # slowloris: a byte every 0.5 s never completes a request
        slow = HttpConn(d.metrics_port)
        self.addCleanup(slow.close)
        t0 = time.monotonic()
        req = b'GET /metrics HTTP/1.1\r\nX-A: ' + b'a' * 1000
        i = 0
        closed = False
        while time.monotonic() - t0 < HC_TIMEOUT + 20:
            try:
                slow.send(req[i:i + 1])
            except OSError:
                closed = True
                break
            i += 1
            relay_roundtrip(self, fs, uc, ch, b'q%d\n' % i, b'a%d\n' % i)
            slow.sock.setblocking(False)
            try:
                if slow.sock.recv(100) == b'':
                    closed = True
                    break
            except BlockingIOError:
                pass
            except OSError:
                closed = True
                break
            slow.sock.setblocking(True)
            time.sleep(0.5)
        self.assertTrue(closed, 'slowloris connection not closed')
        self.assertGreaterEqual(time.monotonic() - t0, HC_TIMEOUT - 1.5)
        self.assertIn('request not complete in time', d.log())

        # the cap: 8 idle connections; the 9th is closed at accept
        idle = [HttpConn(d.metrics_port) for _ in range(8)]
        self.addCleanup(close_quietly, idle)
        over = HttpConn(d.metrics_port)
        self.addCleanup(over.close)
        self.assertTrue(over.closed(5))
        d.wait_log(r'metrics connections open \(-O metrics-max\)')
        relay_roundtrip(self, fs, uc, ch, b'still\n', b'working\n')
        close_quietly(idle)
        m = scr.wait_until(lambda: self._try_scrape(d), 10, what='scrape')
        self.assertGreaterEqual(
            m[('sc_remoted_http_connections_refused_total', ())], 1)

    @staticmethod
    def _try_scrape(d):
        try:
            return d.scrape(timeout=2)
        except (OSError, AssertionError, TimeoutError):
            return None

    def test_many_idle_connections(self):
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        n = min(10000, hard - 200)
        if n < 1000:
            print('SKIP: fd limit %d too low for the idle-connection test'
                  % hard)
            return
        if soft < n + 100:
            resource.setrlimit(resource.RLIMIT_NOFILE, (n + 100, hard))
        d = Daemon(udir=True, mux=True, metrics=True)
        self.addCleanup(d.__exit__, None, None, None)
        d.wait_listening()
        fs = d.fake(name='idle1')
        self.addCleanup(fs.close)
        fs.handshake()
        socks = []
        self.addCleanup(close_quietly, socks)
        for _ in range(n):
            s = socket.socket()
            s.setblocking(False)
            try:
                s.connect(('127.0.0.1', d.metrics_port))
            except BlockingIOError:
                pass
            socks.append(s)
        d.wait_log(r'metrics connections open', timeout=30)
        # the daemon holds at most 64 of them
        self.assertTrue(d.alive())
        mux = d.mux()
        self.addCleanup(mux.close)
        self.assertEqual([v['name'] for v in mux.read_burst()], ['idle1'])
        close_quietly(socks)
        m = scr.wait_until(lambda: BadInputTest._try_scrape(d), 30,
                           what='scrape after the flood')
        if sys.platform.startswith('linux'):
            self.assertLess(m[('process_open_fds', ())], 200)
        self.assertGreater(
            m[('sc_remoted_http_connections_refused_total', ())], 0)


class TlsTest(unittest.TestCase):
    """tls_subject on /vps; TLS failures counted by reason."""

    def test_tls(self):
        if os.environ.get('SC_HAVE_OPENSSL', '1') == '0' or \
                shutil.which('openssl') is None:
            print('SKIP: no OpenSSL build or openssl command')
            return
        sys.path.insert(0, os.path.join(os.environ.get(
            'SC_TOP_SRCDIR', os.path.join(os.path.dirname(
                os.path.abspath(__file__)), '..', '..')), 'tests', 'tls'))
        import certs as certmod
        tmp = tempfile.mkdtemp(prefix='scr-mtls-')
        self.addCleanup(shutil.rmtree, tmp, True)
        cs = certmod.CertSet(tmp)
        d = Daemon(udir=True, metrics=True, tls={
            'cert': cs.server_cert, 'key': cs.server_key, 'ca': cs.ca_cert},
            start=False)
        self.addCleanup(d.__exit__, None, None, None)
        d.start()
        d.wait_listening()

        def ctx(client):
            c = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            c.check_hostname = False
            c.verify_mode = ssl.CERT_NONE
            if client is not None:
                c.load_cert_chain(*cs.clients[client])
            return c

        def factory(client):
            def f():
                raw = socket.create_connection(('127.0.0.1', d.port), 5)
                return ctx(client).wrap_socket(raw, server_hostname=None)
            return f

        fs = scr.FakeScamper(d.port, name='vp1.example.org',
                             sock_factory=factory('vp1'))
        self.addCleanup(fs.close)
        fs.handshake()
        hs_failures = ('handshake', 'no_certificate', 'verify')
        # wait_listening's plain probe failed its TLS handshake before
        m0 = d.scrape()
        base = sum(prom_value(m0, 'sc_remoted_tls_handshake_failures_total',
                              reason=r) for r in hs_failures)
        vps = d.vps()
        self.assertEqual(len(vps), 1)
        self.assertIn('CN=vp1 client', vps[0]['tls_subject'])
        # the monitor name is not in the certificate
        bad = scr.FakeScamper(d.port, name='other.example.org',
                              sock_factory=factory('vp1'))
        self.addCleanup(bad.close)
        bad.connect()
        bad.send_new()
        bad.expect_closed()
        # no client certificate at all
        try:
            s = factory(None)()
            s.settimeout(5)
            s.recv(1)
            s.close()
        except (OSError, ssl.SSLError):
            pass
        m = scr.wait_until(
            lambda: (lambda m: m if sum(prom_value(
                m, 'sc_remoted_tls_handshake_failures_total', reason=r)
                for r in hs_failures) > base
                else None)(d.scrape()), 10, what='TLS failure counted')
        self.assertEqual(prom_value(
            m, 'sc_remoted_tls_handshake_failures_total',
            reason='name_mismatch'), 1)
        self.assertEqual(sum(prom_value(
            m, 'sc_remoted_tls_handshake_failures_total', reason=r)
            for r in hs_failures), base + 1)
        self.assertGreaterEqual(prom_value(
            m, 'sc_remoted_vp_rejects_total', reason='tls_error'), 3)
        self.assertEqual(prom_value(m, 'sc_remoted_vps', state='go'), 1)


if __name__ == '__main__':
    scr.main()
