#!/usr/bin/env python3
"""The status page and the per-VP series over plain HTTP (issue 20).

* GET / : HTML with a strict Content-Security-Policy (no inline script or
  style allowed, none used), one table row per VP in id order, every
  string from the metadata file escaped (<script>, quotes, ampersand)
  and non-ASCII kept as UTF-8; streamed (chunked on HTTP/1.1, up to the
  close on HTTP/1.0), HEAD has no body; works for hundreds of VPs;
* /status.js and /status.css are served (and the script parses, where
  node is installed);
* flaps: a resume counts, in /vps (flaps, flaps_1h), on the page and in
  sc_remoted_vp_flaps_total;
* -O metrics-vps: the per-VP families follow the fixed part on one
  keep-alive connection (chunked), over HTTP/1.0 too; without the
  option /metrics is unchanged (Content-Length, no per-VP series).

The browser side (rendering, sorting, refresh) is
tests/browser/test_status_browser.py.
"""

import html.parser
import re
import shutil
import subprocess
import tempfile
import unittest

import scr
from scr import Daemon, HttpConn, http_get, parse_prom, prom_value, \
    wait_until

HOSTILE = '<script>alert(1)</script> "dq" \'sq\' a&b Zürich'
META = ('evil place %s\nevil cc N"Z\nams-nl place Amsterdam\n'
        'ams-nl cc NL\n' % HOSTILE).encode()


class Table(html.parser.HTMLParser):
    """The cells of the page's table body, and every start tag seen."""

    def __init__(self):
        super().__init__()
        self.rows, self.tags, self._in = [], [], None

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag == 'tr':
            self.rows.append([])
        elif tag == 'td' and self.rows:
            self._in = []

    def handle_endtag(self, tag):
        if tag == 'td' and self._in is not None:
            self.rows[-1].append(''.join(self._in))
            self._in = None

    def handle_data(self, data):
        if self._in is not None:
            self._in.append(data)


def table(body):
    t = Table()
    t.feed(body.decode('utf-8'))
    # the header row has th cells only
    t.rows = [r for r in t.rows if r]
    return t


class PageTest(unittest.TestCase):

    def setUp(self):
        self.d = Daemon(udir=True, metrics=True, zombie=60, meta=META,
                        extra_args=['-O', 'metrics-vps'])
        self.addCleanup(self.d.__exit__, None, None, None)
        self.d.wait_listening()
        self.port = self.d.metrics_port

    def vp(self, name):
        f = self.d.fake(name=name)
        f.connect()
        f.handshake()
        self.addCleanup(f.close)
        return f

    def test_page_escaping_and_headers(self):
        self.vp('ams-nl')
        self.vp('evil')
        self.vp(None)
        r = http_get(self.port, '/')
        self.assertEqual(r.status, 200)
        self.assertEqual(r.headers['content-type'], 'text/html; charset=utf-8')
        csp = r.headers['content-security-policy']
        self.assertIn("default-src 'none'", csp)
        self.assertIn("script-src 'self'", csp)
        self.assertNotIn('unsafe', csp)
        self.assertEqual(r.headers['x-content-type-options'], 'nosniff')
        self.assertIn('date', r.headers)
        body = r.body
        # no inline script or style: the CSP would block them anyway
        self.assertEqual(re.findall(rb'<script[^>]*>', body),
                         [b'<script src="/status.js" defer>'])
        self.assertNotIn(b'<style', body)
        self.assertNotIn(b' style=', body)
        self.assertNotIn(b'<script>alert', body)
        self.assertIn(b'&lt;script&gt;alert(1)&lt;/script&gt; &quot;dq&quot;'
                      b' &#39;sq&#39; a&amp;b Z\xc3\xbcrich', body)
        t = table(body)
        self.assertEqual([r[0] for r in t.rows], ['ams-nl', 'evil', '(none)'])
        self.assertEqual(t.rows[1][1], HOSTILE)
        self.assertEqual(t.rows[1][2], 'N"Z')
        self.assertEqual(t.rows[0][1:5], ['Amsterdam', 'NL', '127.0.0.1',
                                          'go'])
        self.assertEqual(len(t.rows[0]), 15)
        self.assertEqual(len([tg for tg, _ in t.tags if tg == 'th']), 15)
        ids = {a.get('id') for _, a in t.tags}
        for i in ('t-go', 't-zombie', 't-handshake', 't-clients', 't-rx',
                  't-tx', 'controls', 'filter', 'fstate', 'fcc', 'vps'):
            self.assertIn(i, ids)
        self.assertIn(b'id="t-go">3<', body)
        # HEAD: the same head, no body
        h = http_get(self.port, '/', method='HEAD')
        self.assertEqual((h.status, h.body), (200, b''))
        self.assertEqual(h.headers['content-security-policy'], csp)
        # HTTP/1.0: the body up to the close, not chunked
        with HttpConn(self.port) as c:
            c.request('/', version='1.0')
            r10 = c.response()
            self.assertNotIn('transfer-encoding', r10.headers)
            self.assertEqual([r[0] for r in table(r10.body).rows],
                             ['ams-nl', 'evil', '(none)'])
            self.assertTrue(c.closed())

    def test_static_files(self):
        js = http_get(self.port, '/status.js')
        css = http_get(self.port, '/status.css')
        self.assertEqual(js.status, 200)
        self.assertEqual(js.headers['content-type'],
                         'text/javascript; charset=utf-8')
        self.assertEqual(int(js.headers['content-length']), len(js.body))
        self.assertIn(b"fetch('/vps'", js.body)
        self.assertNotIn(b'innerHTML', js.body)
        self.assertEqual(css.status, 200)
        self.assertEqual(css.headers['content-type'],
                         'text/css; charset=utf-8')
        self.assertIn(b'tr.st-zombie', css.body)
        self.assertEqual(http_get(self.port, '/status.js',
                                  method='POST').status, 405)
        self.assertEqual(http_get(self.port, '/index.html').status, 404)
        node = shutil.which('node') or shutil.which('nodejs')
        if node:
            with tempfile.NamedTemporaryFile(suffix='.js') as f:
                f.write(js.body)
                f.flush()
                p = subprocess.run([node, '--check', f.name], timeout=30,
                                   stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT)
                self.assertEqual(p.returncode, 0, p.stdout)

    def test_flaps_counted(self):
        f = self.vp('ams-nl')
        self.vp('evil')
        f.detach().close()
        wait_until(lambda: self.d.vps()[0]['state'] == 'zombie', 10,
                   what='ams-nl a zombie')
        f.resume()
        v = self.d.vps()
        self.assertEqual((v[0]['name'], v[0]['state'], v[0]['flaps'],
                          v[0]['flaps_1h']), ('ams-nl', 'go', 2, 2))
        self.assertEqual((v[1]['flaps'], v[1]['flaps_1h']), (1, 1))
        m = self.d.scrape()
        self.assertEqual(prom_value(m, 'sc_remoted_vp_flaps_total',
                                    vp='ams-nl', id='1'), 2)
        self.assertEqual(prom_value(m, 'sc_remoted_vp_flaps_total',
                                    vp='evil', id='2'), 1)
        self.assertEqual(prom_value(m, 'sc_remoted_vp_up', vp='ams-nl',
                                    id='1'), 1)
        rows = table(http_get(self.port, '/').body).rows
        self.assertEqual([(r[0], r[14]) for r in rows],
                         [('ams-nl', '2'), ('evil', '1')])

    def test_many_vps_streamed(self):
        n = 300
        fakes = [self.vp('vp%03d' % i) for i in range(n)]
        self.assertEqual(len(fakes), n)
        with HttpConn(self.port) as c:
            # one keep-alive connection: page, per-VP metrics, page again
            c.request('/')
            r = c.response()
            self.assertEqual(r.headers.get('transfer-encoding'), 'chunked')
            self.assertEqual([row[0] for row in table(r.body).rows],
                             ['vp%03d' % i for i in range(n)])
            c.request('/metrics')
            r = c.response()
            self.assertEqual(r.headers.get('transfer-encoding'), 'chunked')
            m = parse_prom(r.body.decode())
            ups = [k for k in m if k[0] == 'sc_remoted_vp_up']
            self.assertEqual(len(ups), n)
            self.assertEqual(len([k for k in m if k[0] ==
                                  'sc_remoted_vp_relay_bytes_total']), 2 * n)
            self.assertEqual(prom_value(m, 'sc_remoted_vps', state='go'), n)
            c.request('/')
            self.assertEqual(len(table(c.response().body).rows), n)
        with HttpConn(self.port) as c:
            c.request('/metrics', version='1.0')
            r = c.response()
            self.assertNotIn('transfer-encoding', r.headers)
            m = parse_prom(r.body.decode())
            self.assertEqual(len([k for k in m if k[0] ==
                                  'sc_remoted_vp_flaps_total']), n)


class DefaultTest(unittest.TestCase):

    def test_no_per_vp_series_without_option(self):
        with Daemon(udir=True, metrics=True) as d:
            d.wait_listening()
            f = d.fake(name='ams-nl')
            f.connect()
            f.handshake()
            try:
                r = http_get(d.metrics_port, '/metrics')
                self.assertIn('content-length', r.headers)
                self.assertNotIn(b'sc_remoted_vp_up', r.body)
                self.assertEqual(prom_value(parse_prom(r.body.decode()),
                                            'sc_remoted_vps', state='go'), 1)
                self.assertEqual(len(table(http_get(d.metrics_port,
                                                    '/').body).rows), 1)
            finally:
                f.close()


if __name__ == '__main__':
    scr.main()
