#!/usr/bin/env python3
"""Live upgrade with the real Debian scamper (issues 12, 17): `ping -c 20
-i 1` runs through `sc_attach -R` on a VP's -U socket while the daemon is
upgraded (SIGUSR2) to the extended build (tests/upgrade/sc_remoted_ext:
its state carries fields and a record type this build does not know) and
back; the result arrives once and whole (20 packets sent and received),
scamper never reconnects, and sc_attach is never cut off.  Needs root and the scamper tools (exit 77 otherwise).
SC_UPGRADE_LOG=path keeps the daemon log there (for the lead's note).
"""

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, '..', 'e2e'))
sys.path.insert(0, HERE)
import e2e  # noqa: E402
from e2e import scr  # noqa: E402
from test_upgrade import Upgrader, ALT, BUILD  # noqa: E402

EXT = os.path.join(BUILD, 'tests', 'upgrade', 'sc_remoted_ext')

MON = 'upg.mon'


class UpgradeScamperTest(unittest.TestCase):

    def test_ping_across_upgrade(self):
        tmp = tempfile.mkdtemp(prefix='e2e-upgrade-')
        self.addCleanup(shutil.rmtree, tmp, True)
        d = scr.Daemon(start=False, udir=True, zombie=120)
        self.addCleanup(d.__exit__, None, None, None)
        up = Upgrader(d)
        d.start()
        d.wait_listening()
        sc, sock = e2e.start_vp(self, d, MON)

        cmds = os.path.join(tmp, 'cmds.txt')
        out = os.path.join(tmp, 'out.warts')
        with open(cmds, 'w') as f:
            f.write('ping -c 20 -i 1 127.0.0.1\n')
        att = subprocess.Popen([e2e.SC_ATTACH, '-d', '-R', sock, '-i', cmds,
                                '-o', out], stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
        self.addCleanup(lambda: att.poll() is None and att.kill())
        # mid-measurement: the channel is open and pings are under way
        d.wait_log(r'local client on channel', 20)
        time.sleep(5)
        self.assertIsNone(att.poll(), 'sc_attach ended before the upgrade')
        other = EXT if os.path.exists(EXT) else ALT
        up.install(other)
        pid, ver = d.upgrade(20)
        self.assertTrue(ver.endswith('-ext' if other == EXT else '-alt'))
        time.sleep(3)
        self.assertIsNone(att.poll(), 'sc_attach ended between upgrades')
        up.install(scr.SC_REMOTED)
        pid, ver = d.upgrade(20)
        self.assertFalse(ver.endswith('-ext') or ver.endswith('-alt'))
        try:
            so, se = att.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            att.kill()
            so, se = att.communicate()
            self.fail('sc_attach did not finish; log:\n%s' % d.log())
        self.assertEqual(att.returncode, 0, 'sc_attach: %s' % se)
        text = e2e.warts2text(out)
        e2e.show('sc_warts2text', text)
        e2e.assert_ping_text(self, text, count=20)
        self.assertEqual(len(re.findall(r'^ping ', text, re.M)), 1,
                         'the ping result must arrive exactly once')
        log = d.log()
        keep = os.environ.get('SC_UPGRADE_LOG')
        if keep:
            with open(keep, 'w') as f:
                f.write(log)
        e2e.show('sc_remoted log', log)
        # scamper never had to reconnect: one session, no zombie, no resume
        self.assertEqual(len(re.findall(r'new session', log)), 1)
        self.assertNotRegex(log, r'zombie for|resumed')
        self.assertTrue(sc.alive())
        self.assertEqual(d.stop(), 0)


if __name__ == '__main__':
    e2e.require_env(('scamper', 'sc_attach', 'sc_warts2text'))
    if not os.path.exists(ALT):
        print('SKIP: tests/upgrade/sc_remoted_alt not built')
        sys.exit(77)
    e2e.run_main()
