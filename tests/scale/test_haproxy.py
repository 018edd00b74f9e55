#!/usr/bin/env python3
"""Several controllers behind HAProxy (issue 21).

HAProxy (the Debian package) listens on loopback in mode tcp with
`balance source` / `hash-type consistent`, `send-proxy-v2` and health
checks that send a PROXY v2 LOCAL header, in front of three sc_remoted
with -O proxy-from=127.0.0.1 (HAProxy's address), -O per-source-max=1,
-O mux-listen and -O metrics.  Nineteen fake scampers (scr.ReconnectingVP,
each from its own 127.0.0.x, reconnecting the way scamper does with its
30-61 s waits scaled down to 0.2-1 s) and one real `scamper -R` connect
through HAProxy.  A mux client aggregates the three TCP muxes the way a
libscamperctrl client with one scamper_mux_add_inet() per controller
does.  Checked, in order:

  * every VP is seen exactly once over the three muxes, spread over all
    three daemons, and answers a command over a mux channel;
  * each daemon's /vps shows the VPs' real 127.0.0.x addresses;
  * per-source-max applies per real source (a second connection from a
    VP's address is refused although HAProxy's address holds them all);
  * health checks never become sessions;
  * drain: a daemon in HAProxy state `drain` keeps its VPs, new VPs go to
    the other two;
  * failover: that daemon is killed (SIGKILL); its VPs reconnect through
    HAProxy to the other two as new sessions (the aggregating client sees
    the controller's VPs depart with its mux connection, then a VP_UPDATE
    for each from a survivor); no other VP is disturbed;
  * the killed daemon comes back and new VPs reach it.

Prints the VP distribution, /vps, and the failover timeline.  Exits 77
when haproxy is missing.  Takes about 12 s.
"""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import unittest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                '..', 'lib'))
import scr  # noqa: E402
from scr import Daemon, FakeScamper, MuxClient, ReconnectingVP  # noqa: E402

HAPROXY = shutil.which('haproxy') or '/usr/sbin/haproxy'
SCAMPER = shutil.which('scamper')
N_FAKE = 19
NAMES = ['r1', 'r2', 'r3']


def show(title, text):
    print('\n---- %s ----\n%s' % (title, text.rstrip()), flush=True)


class Aggregator:
    """One MuxClient per controller, merged into one VP list as a
    libscamperctrl client with a scamper_mux_add_inet() per controller
    sees it.  view: {(ctl, vp id): VP_UPDATE dict}; log: (time, ctl,
    'update'|'depart'|'lost', vp dict or id)."""

    def __init__(self, daemons):
        self.daemons = daemons
        self.conns = {}
        self.view = {}
        self.log = []
        self.chan_data = {}
        for i in range(len(daemons)):
            self.connect(i)

    def connect(self, i):
        mc = MuxClient(self.daemons[i].mux_tcp, timeout=5)
        for vp in mc.read_burst(10):
            self._update(i, vp)
        self.conns[i] = mc

    def _update(self, i, vp):
        self.view[(i, vp['id'])] = vp
        self.log.append((time.monotonic(), i, 'update', vp))

    def _lost(self, i):
        """The controller's mux connection is gone: all of its VPs
        depart for this client."""
        mc = self.conns.pop(i)
        mc.close()
        for key in [k for k in self.view if k[0] == i]:
            self.log.append((time.monotonic(), i, 'lost', self.view.pop(key)))

    def poll(self, duration=0.2):
        deadline = time.monotonic() + duration
        while True:
            for i, mc in list(self.conns.items()):
                while True:
                    try:
                        ev = mc.recv(timeout=0.02)
                    except TimeoutError:
                        break
                    except (EOFError, OSError, AssertionError):
                        self._lost(i)
                        break
                    if ev[0] == 'update':
                        self._update(i, ev[1])
                    elif ev[0] == 'depart':
                        vp = self.view.pop((i, ev[1]), None)
                        self.log.append((time.monotonic(), i, 'depart', vp))
                    elif ev[0] == 'data':
                        self.chan_data.setdefault((i, ev[1]), bytearray())
                        self.chan_data[(i, ev[1])] += ev[2]
            if time.monotonic() >= deadline:
                return

    def names(self):
        return sorted(v.get('name') for v in self.view.values())

    def where(self, name):
        return [k for k, v in self.view.items() if v.get('name') == name]


class HAProxyScaleTest(unittest.TestCase):

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix='scr-haproxy-')
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.vps = {}
        self.daemons = []
        for _ in NAMES:
            d = Daemon(mux_tcp=True, metrics=True, udir=True,
                       extra_args=['-O', 'proxy-from=127.0.0.1',
                                   '-O', 'per-source-max=1'])
            self.addCleanup(d.__exit__, None, None, None)
            self.daemons.append(d)
        for d in self.daemons:
            d.wait_listening()
        self.hport = scr.free_port()
        self.admin = os.path.join(self.tmp, 'admin.sock')
        self.start_haproxy()
        self.scamper = None

    # -- HAProxy -----------------------------------------------------------

    def start_haproxy(self):
        servers = ''.join(
            '  server %s 127.0.0.1:%d send-proxy-v2 check check-send-proxy '
            'inter 500ms fall 2 rise 1\n' % (n, d.port)
            for n, d in zip(NAMES, self.daemons))
        cfg = ('global\n'
               '  stats socket %s mode 600 level admin\n'
               '  maxconn 2000\n'
               'defaults\n'
               '  mode tcp\n'
               '  timeout connect 2s\n'
               '  timeout client 10m\n'
               '  timeout server 10m\n'
               '  timeout check 2s\n'
               '  retries 2\n'
               '  option redispatch\n'
               'frontend scamper\n'
               '  bind 127.0.0.1:%d\n'
               '  default_backend remoted\n'
               'backend remoted\n'
               '  balance source\n'
               '  hash-type consistent\n%s') % (self.admin, self.hport,
                                                servers)
        path = os.path.join(self.tmp, 'haproxy.cfg')
        with open(path, 'w') as f:
            f.write(cfg)
        self.hlog = open(os.path.join(self.tmp, 'haproxy.log'), 'wb')
        self.hap = subprocess.Popen([HAPROXY, '-db', '-f', path],
                                    stdout=self.hlog, stderr=self.hlog,
                                    stdin=subprocess.DEVNULL)
        self.addCleanup(self.stop_haproxy)
        scr.wait_until(lambda: os.path.exists(self.admin), 10,
                       what='haproxy stats socket')
        scr.wait_until(lambda: self.server_states() == ['UP'] * 3, 10,
                       what='all three servers UP')

    def stop_haproxy(self):
        if self.hap.poll() is None:
            self.hap.terminate()
            try:
                self.hap.wait(10)
            except subprocess.TimeoutExpired:
                self.hap.kill()
                self.hap.wait(10)
        self.hlog.close()

    def admin_cmd(self, cmd):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(5)
        s.connect(self.admin)
        s.sendall(cmd.encode() + b'\n')
        out = b''
        while True:
            d = s.recv(65536)
            if not d:
                break
            out += d
        s.close()
        return out.decode()

    def server_states(self):
        """[status of r1, r2, r3] from `show stat` (UP, DOWN, DRAIN...)."""
        try:
            out = self.admin_cmd('show stat')
        except OSError:
            return []
        hdr, st = None, {}
        for line in out.splitlines():
            if line.startswith('# '):
                hdr = line[2:].split(',')
                continue
            f = line.split(',')
            if hdr and len(f) == len(hdr) and f[0] == 'remoted':
                st[f[1]] = f[hdr.index('status')]
        return [st.get(n) for n in NAMES]

    # -- VPs ---------------------------------------------------------------

    def start_vp(self, name, source):
        vp = ReconnectingVP('127.0.0.1', self.hport, name, source=source)
        self.vps[name] = vp
        vp.start()
        self.addCleanup(vp.stop)
        return vp

    def start_scamper(self):
        if SCAMPER is None or os.geteuid() != 0:
            print('note: no real scamper (needs scamper and root); '
                  'fake VPs only')
            return None
        out = open(os.path.join(self.tmp, 'scamper.out'), 'wb')
        self.addCleanup(out.close)
        p = subprocess.Popen([SCAMPER, '-R', '127.0.0.1:%d' % self.hport,
                              '-M', 'real1'], stdin=subprocess.DEVNULL,
                             stdout=out, stderr=subprocess.STDOUT,
                             cwd=self.tmp, start_new_session=True)

        def stop():
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(p.pid, sig)
                except ProcessLookupError:
                    pass
                try:
                    p.wait(5)
                except subprocess.TimeoutExpired:
                    pass
        self.addCleanup(stop)
        return p

    def wait_view(self, agg, names, timeout, what):
        deadline = time.monotonic() + timeout
        while agg.names() != sorted(names):
            if time.monotonic() > deadline:
                self.fail('%s: view %r, want %r\nlogs:\n%s' % (
                    what, agg.names(), sorted(names), self.logs()))
            agg.poll(0.2)

    def logs(self):
        return '\n'.join('== %s\n%s' % (n, d.log()[-2000:])
                         for n, d in zip(NAMES, self.daemons))

    def distribution(self, agg):
        per = {n: [] for n in NAMES}
        for (i, _), vp in sorted(agg.view.items()):
            per[NAMES[i]].append(vp.get('name'))
        return per

    def run_commands(self, agg, names):
        """Open a channel to each VP over its controller's mux, send a
        command, and wait for its answer (fake: echo; real scamper: a
        ping's "OK id-1")."""
        chans = {}
        for n, name in enumerate(sorted(names), start=1):
            (i, vid), = agg.where(name)
            agg.conns[i].open(vid, n)
            chans[name] = (i, n)
            if name.startswith('vp'):
                agg.conns[i].send(n, b'hello %d\n' % n)

        pinged = set()

        def answered(name):
            i, n = chans[name]
            data = bytes(agg.chan_data.get((i, n), b''))
            if name.startswith('vp'):
                return b'echo %s hello %d\n' % (name.encode(), n) in data
            # real scamper: its MORE first, then a ping, then OK id-1
            if b'MORE\n' in data and name not in pinged:
                pinged.add(name)
                agg.conns[i].send(n, b'ping -c 1 127.0.0.1\n')
            return b'OK id-1\n' in data

        deadline = time.monotonic() + 30
        while not all(answered(n) for n in names):
            if time.monotonic() > deadline:
                self.fail('no answer from %r' % [n for n in names
                                                  if not answered(n)])
            agg.poll(0.2)

    # -- the test ----------------------------------------------------------

    def test_three_controllers_behind_haproxy(self):
        t_start = time.monotonic()
        d = self.daemons
        agg = Aggregator(d)
        self.addCleanup(lambda: [mc.close() for mc in agg.conns.values()])
        self.assertEqual(agg.view, {})

        # twenty VPs through HAProxy, each from its own address
        sources = {}
        for k in range(1, N_FAKE + 1):
            name = 'vp%02d' % k
            sources[name] = '127.0.0.%d' % (10 + k)
            self.start_vp(name, sources[name])
        names = sorted(sources)
        if self.start_scamper() is not None:
            names.append('real1')
            sources['real1'] = '127.0.0.1'
        self.wait_view(agg, names, 60, 'every VP on some controller')
        agg.poll(1.0)       # nothing announced twice after a pause
        self.assertEqual(agg.names(), sorted(names))
        per = self.distribution(agg)
        show('VP distribution over three daemons behind HAProxy',
             '\n'.join('%s (port %d): %2d  %s' % (
                 n, dd.port, len(per[n]), ' '.join(per[n]))
                 for n, dd in zip(NAMES, d)))
        for n in NAMES:
            self.assertTrue(per[n], 'no VP on %s: %r' % (n, per))

        # a command on each VP over its controller's mux
        self.run_commands(agg, names)

        # /vps: the real source addresses, not HAProxy's
        for i, dd in enumerate(d):
            vps = dd.vps()
            got = sorted((v['name'], v['address']) for v in vps)
            want = sorted((v['name'], sources[v['name']])
                          for (j, _), v in agg.view.items() if j == i)
            self.assertEqual(got, want)
            for v in vps:
                self.assertTrue(v['peer'].startswith(v['address'] + ':'), v)
        vps0 = d[0].vps()
        show('/vps of r1 (behind HAProxy)', '\n'.join(
            '{"name": "%s", "address": "%s", "peer": "%s", "state": "%s"}'
            % (v['name'], v['address'], v['peer'], v['state'])
            for v in vps0))
        # each VP's MASTER_ID names its real source too
        for name in names:
            if name.startswith('vp'):
                self.assertTrue(self.vps[name].alias.startswith(
                    sources[name] + ':'), self.vps[name].alias)

        # per-source-max=1 per real source: vp01's address again is
        # hashed to vp01's controller, which refuses it
        (i1, _), = agg.where('vp01')
        extra = FakeScamper(self.hport, name='dup', sock_factory=lambda: (
            socket.create_connection(('127.0.0.1', self.hport), timeout=5,
                                     source_address=(sources['vp01'], 0))))
        self.addCleanup(extra.close)
        extra.connect()
        extra.send_new()
        extra.expect_closed(10)
        d[i1].wait_log(r'%s: connection refused: source holds 1 connections'
                       r' \(per-source-max\)' % re.escape(sources['vp01']))

        # health checks: seen, never sessions, never warnings
        checks = []
        for dd in d:
            checks.append(dd.wait_log(
                r'^.*PROXY v2 health check.*$'
            ).group(0))
            self.assertNotRegex(dd.log(), r'PROXY.*: closing')
        show('HAProxy health check, as r1 logs it', str(checks[0]))

        # the failover target: the controller with the most fake VPs and
        # not the real scamper (which waits 30-61 s twice to move)
        real_on = [k[0] for k in agg.where('real1')]
        target = max((i for i in range(3) if i not in real_on),
                     key=lambda i: len(per[NAMES[i]]))
        tname = NAMES[target]
        moving = sorted(per[tname])
        staying = sorted(set(names) - set(moving))
        before = {v.get('name'): k for k, v in agg.view.items()}

        # drain: HAProxy sends no new connection there; its VPs stay
        out = self.admin_cmd('set server remoted/%s state drain' % tname)
        self.assertEqual(out.strip(), '', out)
        scr.wait_until(lambda: self.server_states()[target] == 'DRAIN', 5,
                       what='%s in DRAIN' % tname)
        t_drain = time.monotonic()
        extra_names = []
        for k in range(1, 7):
            name = 'dr%02d' % k
            sources[name] = '127.0.0.%d' % (40 + k)
            self.start_vp(name, sources[name])
            extra_names.append(name)
        names += extra_names
        self.wait_view(agg, names, 30, 'the VPs started during drain')
        for name in extra_names:
            (i, _), = agg.where(name)
            self.assertNotEqual(i, target, '%s went to drained %s'
                                % (name, tname))
        for name in moving:
            self.assertEqual(agg.where(name), [before[name]])
            self.assertEqual(self.vps[name].events_since(t_drain, 'lost'), [])
        show('drain', '%s in DRAIN: kept %d VPs (%s); %d new VPs went to '
             'the others' % (tname, len(moving), ' '.join(moving),
                             len(extra_names)))

        # failover: kill the drained controller; its VPs move
        staying += extra_names
        before = {v.get('name'): k for k, v in agg.view.items()}
        t_kill = time.monotonic()
        d[target].kill()
        deadline = t_kill + 60
        back = {}
        while len(back) < len(moving):
            if time.monotonic() > deadline:
                self.fail('not back: %r\n%s' % (
                    sorted(set(moving) - set(back)), self.logs()))
            agg.poll(0.1)
            for name in moving:
                w = agg.where(name)
                if name not in back and w and w[0][0] != target:
                    back[name] = time.monotonic() - t_kill
        agg.poll(0.5)
        self.assertEqual(agg.names(), sorted(names))
        lost = [e for e in agg.log if e[0] >= t_kill and e[1] == target]
        self.assertEqual(sorted(e[3].get('name') for e in lost), moving)
        self.assertFalse([e for e in agg.log if e[0] >= t_kill and
                          e[2] in ('depart', 'lost') and e[1] != target])
        for name in staying:
            self.assertEqual(agg.where(name), [before[name]], name)
            if name in self.vps:
                self.assertEqual(self.vps[name].events_since(t_kill, 'lost'),
                                 [], name)
        for name in moving:
            ev = self.vps[name].events_since(t_kill)
            kinds = [e[1] for e in ev]
            # lost, then MASTER_RES refused by a controller that never knew
            # the session, then a new session: exactly scamper's sequence
            self.assertEqual(kinds[0], 'lost', ev)
            self.assertIn('rej', kinds, ev)
            self.assertEqual(kinds[-1], 'go', ev)
        per2 = self.distribution(agg)
        show('failover timeline (SIGKILL of %s at t=0)' % tname,
             '\n'.join('t=%5.2fs  %s back on %s' % (
                 back[n], n, NAMES[agg.where(n)[0][0]])
                 for n in sorted(back, key=back.get)) +
             '\nevery VP of %s back on the other two after %.2f s '
             '(%d VPs; HAProxy health checks every 0.5 s, fall 2; VP retry '
             'delay 0.2-1 s, real scamper waits 30-61 s)\n'
             'distribution after failover: %s' % (
                 tname, max(back.values()), len(moving),
                 ', '.join('%s %d' % (n, len(per2[n])) for n in NAMES)))

        # the controller comes back; new VPs reach it
        d[target].proc = None
        d[target].start()
        d[target].wait_listening()
        self.admin_cmd('set server remoted/%s state ready' % tname)
        scr.wait_until(lambda: self.server_states()[target] == 'UP', 10,
                       what='%s UP again' % tname)
        agg.connect(target)
        self.assertEqual([k for k in agg.view if k[0] == target], [])
        reached = None
        for k in range(1, 41):
            name = 'nw%02d' % k
            sources[name] = '127.0.1.%d' % k
            self.start_vp(name, sources[name])
            names.append(name)
            self.wait_view(agg, names, 20, 'new VP %s' % name)
            (i, _), = agg.where(name)
            if i == target:
                reached = name
                break
        self.assertIsNotNone(reached, 'no new VP reached restarted %s'
                             % tname)
        show('restart', '%s back; new VP %s (from %s) reached it' % (
            tname, reached, sources[reached]))
        self.assertEqual(agg.names(), sorted(names))
        show('duration', '%.1f s' % (time.monotonic() - t_start))


if __name__ == '__main__':
    if not os.path.exists(HAPROXY):
        print('SKIP: haproxy is not installed (tests/install-deps)')
        sys.exit(77)
    unittest.main(verbosity=2)
