#!/usr/bin/env python3
"""A real Prometheus scrapes sc_remoted (issue 11).

Starts Debian's prometheus on a free loopback port with a temporary TSDB
and a scrape config (scrape_interval: 1s) aimed at the daemon's -O
metrics port, waits until the target is up (/api/v1/targets), then asks
/api/v1/query for sc_remoted_vps{state="go"} and the relay byte counters
and checks them against what the test created and relayed.  Also runs
`promtool check metrics` on a scraped page: it must pass with no output.
Skips (77) only when prometheus or promtool is not installed.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import unittest
import urllib.parse
import urllib.request

import scr
from scr import Daemon, UnixClient, http_get

PROMETHEUS = shutil.which('prometheus')
PROMTOOL = shutil.which('promtool')
if PROMETHEUS is None or PROMTOOL is None:
    print('SKIP: prometheus/promtool not installed (apt-get install '
          'prometheus)')
    sys.exit(77)

NVPS = 3


def api(port, path, **params):
    url = 'http://127.0.0.1:%d%s' % (port, path)
    if params:
        url += '?' + urllib.parse.urlencode(params)
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read().decode())


class PrometheusTest(unittest.TestCase):

    def setUp(self):
        self.d = Daemon(udir=True, metrics=True)
        self.addCleanup(self.d.__exit__, None, None, None)
        self.d.wait_listening()
        self.tmp = tempfile.mkdtemp(prefix='scr-prom-')
        self.addCleanup(shutil.rmtree, self.tmp, True)

    def start_prometheus(self):
        self.pport = scr.free_port()
        cfg = os.path.join(self.tmp, 'prometheus.yml')
        with open(cfg, 'w') as f:
            f.write('global:\n'
                    '  scrape_interval: 1s\n'
                    '  scrape_timeout: 1s\n'
                    'scrape_configs:\n'
                    '  - job_name: sc_remoted\n'
                    '    static_configs:\n'
                    "      - targets: ['127.0.0.1:%d']\n"
                    % self.d.metrics_port)
        self.plog = open(os.path.join(self.tmp, 'prometheus.log'), 'wb')
        self.addCleanup(self.plog.close)
        self.prom = subprocess.Popen(
            [PROMETHEUS, '--config.file=' + cfg,
             '--storage.tsdb.path=' + os.path.join(self.tmp, 'data'),
             '--web.listen-address=127.0.0.1:%d' % self.pport],
            stdin=subprocess.DEVNULL, stdout=self.plog, stderr=self.plog)
        self.addCleanup(self.stop_prometheus)

    def stop_prometheus(self):
        if self.prom.poll() is None:
            self.prom.terminate()
            try:
                self.prom.wait(20)
            except subprocess.TimeoutExpired:
                self.prom.kill()
                self.prom.wait(5)

    def prom_log(self):
        with open(os.path.join(self.tmp, 'prometheus.log'), 'rb') as f:
            return f.read().decode(errors='replace')[-3000:]

    def query(self, expr):
        try:
            r = api(self.pport, '/api/v1/query', query=expr)
        except OSError:
            return None
        if r.get('status') != 'success' or not r['data']['result']:
            return None
        return r['data']['result']

    def wait_query(self, expr, want, timeout=60):
        def ok():
            if self.prom.poll() is not None:
                raise AssertionError('prometheus exited:\n' + self.prom_log())
            res = self.query(expr)
            if res is None:
                return None
            val = float(res[0]['value'][1])
            return res if val == want else None
        try:
            return scr.wait_until(ok, timeout, interval=0.5, what=expr)
        except TimeoutError:
            raise AssertionError('%s != %r: %r' % (expr, want,
                                                   self.query(expr)))

    def test_scrape_and_query(self):
        d = self.d
        fakes = []
        self.addCleanup(lambda: [f.close() for f in fakes])
        for i in range(NVPS):
            fs = d.fake(name='prom%d' % i)
            fs.handshake()
            fakes.append(fs)
        fs = fakes[0]
        d.wait_socket(fs.expected_socket_name())
        uc = UnixClient(os.path.join(d.udir, fs.expected_socket_name()))
        self.addCleanup(uc.close)
        ch = fs.wait_channel_new()
        to_vp = b'do ping 192.0.2.1\n' * 10
        from_vp = b'R' * 70000         # two frames
        uc.send(to_vp)
        self.assertEqual(fs.recv_channel_data(ch, len(to_vp)), to_vp)
        fs.send_data(ch, from_vp)
        self.assertEqual(uc.recv_exact(len(from_vp)), from_vp)

        # promtool on a scraped page: passes, says nothing
        page = http_get(d.metrics_port, '/metrics').body
        p = subprocess.run([PROMTOOL, 'check', 'metrics'], input=page,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           timeout=30)
        self.assertEqual((p.returncode, p.stdout), (0, b''),
                         p.stdout.decode(errors='replace'))

        self.start_prometheus()

        def target_up():
            if self.prom.poll() is not None:
                raise AssertionError('prometheus exited:\n' + self.prom_log())
            try:
                t = api(self.pport, '/api/v1/targets')
            except OSError:
                return None
            act = t['data']['activeTargets']
            return act if act and act[0]['health'] == 'up' else None
        try:
            scr.wait_until(target_up, 60, interval=0.5, what='target up')
        except TimeoutError:
            raise AssertionError('target never up:\n' + self.prom_log())

        res = self.wait_query('sc_remoted_vps{state="go"}', NVPS)
        print('query sc_remoted_vps{state="go"}:', json.dumps(res))
        res = self.wait_query(
            'sc_remoted_relay_bytes_total{direction="from_vp"}',
            len(from_vp))
        print('query relay_bytes from_vp:', json.dumps(res))
        self.wait_query('sc_remoted_relay_bytes_total{direction="to_vp"}',
                        len(to_vp))
        self.wait_query('sc_remoted_relay_frames_total{direction="from_vp"}',
                        2)
        self.wait_query('sc_remoted_vp_arrivals_total', NVPS)
        # a departure shows up too
        fakes[2].close()
        self.wait_query('sum(sc_remoted_vps{state=~"go|zombie"})', NVPS)
        self.wait_query('sc_remoted_vp_zombies_total', 1)


if __name__ == '__main__':
    scr.main()
