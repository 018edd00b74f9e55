#!/usr/bin/env python3
"""Live upgrade under load (issue 12): a 256 MiB stream each way between
a (non-blocking) fake scamper and a -U client, with UPGRADES upgrades
alternating between two builds while the bytes flow.  Every byte is
checked (tests/hardening/hlib.py's patterns: nothing lost, repeated or
reordered), scamper never reconnects and the client is never cut.
SC_TESTS_QUICK=1 skips it; SC_UPGRADE_STREAM_MIB sets the size.
"""

import os
import re
import sys
import time
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, '..', 'hardening'))
sys.path.insert(0, HERE)
import hlib  # noqa: E402
from hlib import scr, MIB, Loop, NBScamper, NBUnix  # noqa: E402
from test_upgrade import Upgrader, ALT  # noqa: E402

TOTAL = int(os.environ.get('SC_UPGRADE_STREAM_MIB', '256')) * MIB
UPGRADES = 20
FRAME = 65535


class StreamUpgradeTest(unittest.TestCase):

    @scr.slow
    def test_streams_across_upgrades(self):
        hlib.raise_nofile()
        d = scr.Daemon(start=False, udir=True, zombie=120)
        self.addCleanup(d.__exit__, None, None, None)
        up = Upgrader(d)
        d.start()
        d.wait_listening()
        loop = Loop()
        self.addCleanup(loop.close)

        a = NBScamper(loop, d.port, name='stream')
        lost = []
        a.on_lost = lambda fs, why: lost.append(why)
        a.start()
        loop.run_until(lambda: a.state == 'go', 20, 'GO')
        uc = NBUnix(loop, d.wait_socket('stream-*'))
        self.addCleanup(uc.close)
        loop.run_until(lambda: len(a.open_chans) == 1, 20, 'channel')
        ch = min(a.open_chans)

        down, upp = hlib.Pattern(11), hlib.Pattern(12)
        chk_down = hlib.StreamChecker(down, TOTAL, 'scamper -> client')
        chk_up = hlib.StreamChecker(upp, TOTAL, 'client -> scamper')
        uc.on_bytes = lambda c, data: chk_down.feed(data)

        def on_chan(fs, c, data):
            self.assertEqual(c, ch)
            chk_up.feed(data)
        a.on_chan_data = on_chan

        sent = {'down': 0, 'up': 0, 'busy': False}

        def fill():
            if sent['busy']:
                return
            sent['busy'] = True
            try:
                while a.out_len < 2 * MIB and a.state == 'go' and \
                        sent['down'] < TOTAL:
                    n = min(FRAME, TOTAL - sent['down'])
                    a.send_reliable(ch, down.get(sent['down'], n))
                    sent['down'] += n
                while uc.out_len < 512 * 1024 and uc.sock is not None and \
                        sent['up'] < TOTAL:
                    n = min(64 * 1024, TOTAL - sent['up'])
                    uc.queue(upp.get(sent['up'], n))
                    sent['up'] += n
            finally:
                sent['busy'] = False
        a.on_drain = fill
        uc.on_drain = fill
        loop.every(1.0, lambda: a.tick() and False)
        fill()

        builds = [ALT, scr.SC_REMOTED]
        t0 = time.monotonic()
        for k in range(UPGRADES):
            mark = (k + 1) * TOTAL // (UPGRADES + 1)
            loop.run_until(lambda: chk_down.got >= mark and
                           chk_up.got >= mark, 120,
                           'the streams to reach %d MiB' % (mark // MIB))
            up.install(builds[k % 2])
            d.upgrade(30, pump=lambda: (loop.run_once(0.01), fill()))
        loop.run_until(lambda: chk_down.done and chk_up.done, 300,
                       'the streams to finish')
        secs = time.monotonic() - t0
        self.assertEqual(lost, [])
        self.assertIsNone(uc.eof)
        self.assertEqual(a.connects, 1, 'scamper had to reconnect')
        log = d.log()
        self.assertEqual(len(re.findall(r'took over', log)), UPGRADES)
        pauses = [int(x) for x in re.findall(r'after a (\d+)ms pause', log)]
        print('%d MiB each way, %d upgrades in %.1f s; pauses (ms): %s'
              % (TOTAL // MIB, UPGRADES, secs, pauses))
        hlib.check_no_sanitizer(self, d)
        self.assertEqual(d.stop(), 0)


if __name__ == '__main__':
    if not os.path.exists(ALT):
        print('SKIP: tests/upgrade/sc_remoted_alt not built')
        sys.exit(77)
    scr.main()
