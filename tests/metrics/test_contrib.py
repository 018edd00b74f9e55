#!/usr/bin/env python3
"""The shipped alert rules and Grafana dashboard (issue 20).

* contrib/prometheus/sc_remoted.rules.yml passes `promtool check rules`
  and its unit tests (`promtool test rules sc_remoted.rules.test.yml`,
  synthetic series);
* contrib/grafana/sc_remoted.json is valid JSON, and every query in it
  (panels, annotations) is valid PromQL: each one, with Grafana's
  variables replaced, becomes a recording rule of a generated rules file
  that `promtool check rules` must accept;
* every metric name a rule or a panel uses is one the daemon exports:
  compared with a scrape of a running daemon with -O metrics-vps, a live
  VP and a zombie (so every per-VP family is present); the checker itself
  is shown to catch a misspelt name;
* the -O metrics-vps page passes `promtool check metrics`.

Skips (77) when promtool is not installed.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import unittest

import scr
from scr import Daemon, http_get, wait_until

PROMTOOL = shutil.which('promtool')
if PROMTOOL is None:
    print('SKIP: promtool not installed (apt-get install prometheus)')
    sys.exit(77)

TOP = os.environ.get('SC_TOP_SRCDIR') or \
    os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..')
RULES_DIR = os.path.join(TOP, 'contrib', 'prometheus')
RULES = os.path.join(RULES_DIR, 'sc_remoted.rules.yml')
DASH = os.path.join(TOP, 'contrib', 'grafana', 'sc_remoted.json')

# metric names come from these two prefixes; `up` is Prometheus's own
NAME_RE = re.compile(r'(?<![\w:"])((?:sc_remoted|process)_[a-zA-Z0-9_:]*)')


def promtool(*args, cwd=None):
    p = subprocess.run([PROMTOOL] + list(args), cwd=cwd, timeout=60,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       stdin=subprocess.DEVNULL)
    return p.returncode, p.stdout.decode('utf-8', 'replace')


def rule_exprs():
    """The expr of every rule in the rules file (the file is YAML; its
    exprs are either one line or a '>-' block, as written in it)."""
    exprs, cur = [], None
    with open(RULES) as f:
        for line in f:
            m = re.match(r'^(\s*)expr:\s*(.*)$', line)
            if m:
                if cur is not None:
                    exprs.append(' '.join(cur[1]))
                if m.group(2) in ('>-', '|', '>'):
                    cur = (len(m.group(1)), [])
                else:
                    exprs.append(m.group(2))
                    cur = None
                continue
            if cur is not None:
                ind = len(line) - len(line.lstrip())
                if line.strip() and ind <= cur[0]:
                    exprs.append(' '.join(cur[1]))
                    cur = None
                elif line.strip():
                    cur[1].append(line.strip())
    if cur is not None:
        exprs.append(' '.join(cur[1]))
    return exprs


def dashboard_exprs(dash):
    """Every PromQL query of the dashboard: panel targets (also inside
    rows) and annotations."""
    out = []

    def walk(panels):
        for p in panels:
            for t in p.get('targets', []):
                out.append((p.get('title', '?'), t['expr']))
            walk(p.get('panels', []))
    walk(dash['panels'])
    for a in dash.get('annotations', {}).get('list', []):
        if 'expr' in a:
            out.append(('annotation ' + a['name'], a['expr']))
    return out


def grafana_to_promql(expr):
    """Replace the dashboard's variables with what Grafana would put in."""
    expr = expr.replace('$__rate_interval', '5m')
    expr = expr.replace('$instance', '.*')
    left = re.findall(r'\$\{?\w+', expr)
    assert not left, 'unknown Grafana variable %s in %s' % (left, expr)
    return expr


def unknown_names(exprs, exported):
    bad = []
    for where, e in exprs:
        for name in NAME_RE.findall(e):
            if name not in exported:
                bad.append((where, name))
    return bad


class ContribTest(unittest.TestCase):

    @classmethod
    def setUpClass(cls):
        """One daemon with -O metrics-vps: a live named VP, a zombie, an
        unnamed VP; the names it exports."""
        cls.d = Daemon(udir=True, metrics=True, zombie=60,
                       extra_args=['-O', 'metrics-vps'])
        try:
            cls.d.wait_listening()
            cls.fakes = []
            for name in ('ams-nl', 'syd-au', None):
                f = cls.d.fake(name=name)
                f.connect()
                f.handshake()
                cls.fakes.append(f)
            cls.fakes[1].detach()
            wait_until(lambda: any(v['state'] == 'zombie'
                                   for v in cls.d.vps()), 10,
                       what='a zombie')
            r = http_get(cls.d.metrics_port, '/metrics')
            assert r.status == 200, r
            cls.page = r.body.decode()
        except BaseException:
            cls.d.__exit__(None, None, None)
            raise
        cls.exported = set()
        for line in cls.page.splitlines():
            m = re.match(r'# TYPE (\S+) ', line)
            if m:
                cls.exported.add(m.group(1))
            elif line and not line.startswith('#'):
                cls.exported.add(re.match(r'[\w:]+', line).group(0))

    @classmethod
    def tearDownClass(cls):
        for f in cls.fakes:
            f.close()
        cls.d.__exit__(None, None, None)

    def test_rules_check_and_unit_tests(self):
        rc, out = promtool('check', 'rules', RULES)
        self.assertEqual(rc, 0, out)
        self.assertIn('SUCCESS: 8 rules found', out)
        rc, out = promtool('test', 'rules', 'sc_remoted.rules.test.yml',
                           cwd=RULES_DIR)
        print(out)
        self.assertEqual(rc, 0, out)
        self.assertIn('SUCCESS', out)

    def test_dashboard_queries_parse(self):
        with open(DASH) as f:
            dash = json.load(f)
        exprs = dashboard_exprs(dash)
        self.assertGreater(len(exprs), 20)
        titles = {p['title'] for p in dash['panels']}
        for want in ('VPs live', 'Relay bytes', 'VPs'):
            self.assertIn(want, titles)
        names = {a['name'] for a in dash['annotations']['list']}
        self.assertIn('Upgrades and restarts', names)
        self.assertIn('Metadata reloads', names)
        tmp = tempfile.mkdtemp(prefix='scr-dash-')
        self.addCleanup(shutil.rmtree, tmp, True)
        path = os.path.join(tmp, 'dashboard.rules.yml')
        with open(path, 'w') as f:
            f.write('groups:\n  - name: dashboard\n    rules:\n')
            for i, (where, e) in enumerate(exprs):
                f.write('      - record: dashboard:q%d\n' % i)
                f.write('        expr: %s\n' % json.dumps(
                    grafana_to_promql(e)))
        rc, out = promtool('check', 'rules', path)
        self.assertEqual(rc, 0, out)
        self.assertIn('SUCCESS: %d rules found' % len(exprs), out)
        # a broken query is caught by the same path
        with open(path, 'a') as f:
            f.write('      - record: dashboard:broken\n'
                    '        expr: "sum by (vp (sc_remoted_vp_up)"\n')
        rc, out = promtool('check', 'rules', path)
        self.assertNotEqual(rc, 0, out)

    def test_names_exported(self):
        for fam in ('sc_remoted_vp_up', 'sc_remoted_vp_connected_since_seconds',
                    'sc_remoted_vp_last_rx_timestamp_seconds',
                    'sc_remoted_vp_zombie_deadline_seconds',
                    'sc_remoted_vp_relay_bytes_total',
                    'sc_remoted_vp_flaps_total'):
            self.assertIn(fam, self.exported)
        with open(DASH) as f:
            dash = json.load(f)
        exprs = dashboard_exprs(dash) + \
            [('rule', e) for e in rule_exprs()]
        self.assertEqual(len(rule_exprs()), 8)
        used = {n for _, e in exprs for n in NAME_RE.findall(e)}
        self.assertGreater(len(used), 15)
        self.assertEqual(unknown_names(exprs, self.exported), [])
        # the checker catches a name the daemon does not export
        self.assertEqual(
            unknown_names([('x', 'rate(sc_remoted_vp_flap_total[5m]) + '
                            'process_open_fd')], self.exported),
            [('x', 'sc_remoted_vp_flap_total'), ('x', 'process_open_fd')])

    def test_metrics_vps_page(self):
        p = subprocess.run([PROMTOOL, 'check', 'metrics'],
                           input=self.page.encode(), stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, timeout=60)
        self.assertEqual((p.returncode, p.stdout), (0, b''))
        m = scr.parse_prom(self.page)
        self.assertEqual(scr.prom_value(m, 'sc_remoted_vp_up', vp='ams-nl',
                                        id='1'), 1)
        self.assertEqual(scr.prom_value(m, 'sc_remoted_vp_up', vp='syd-au',
                                        id='2'), 0)
        self.assertEqual(scr.prom_value(m, 'sc_remoted_vp_up',
                                        address='127.0.0.1', id='3'), 1)
        self.assertIsNotNone(scr.prom_value(
            m, 'sc_remoted_vp_zombie_deadline_seconds', vp='syd-au', id='2'))
        self.assertIsNone(scr.prom_value(
            m, 'sc_remoted_vp_connected_since_seconds', vp='syd-au', id='2'))


if __name__ == '__main__':
    unittest.main()
