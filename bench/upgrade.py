#!/usr/bin/env python3
"""Benchmark: the service pause of a live upgrade (SIGUSR2, issue 12).

    SC_REMOTED=build/sc_remoted python3 bench/upgrade.py [--vps 1000,10000]
        [--upgrades 5]

For each VP count N: a daemon (-M only, so 10,000 VPs fit the fd limit)
gets N fake scampers (tests/lib/scr.py); every VP has a mux channel with
1 KiB sent toward it that it never ACKs (unacked queues and queued
output to cross), and one mux client stops reading while a VP streams to
it until the daemon holds ~4 MiB for it (data in flight).  A probe loop
runs mux -> VP -> mux round trips (64 bytes) without pause; each upgrade
is triggered in the middle of it.  Reported per upgrade:
  * pause (daemon): fork to "ready", from the old process's log line;
  * gap (client): the longest probe round trip around the upgrade, i.e.
    the longest time no event was served, as a client sees it;
  * state save + load: the old process's time to write the state and the
    new one's to load it (both logged), the part the state format costs.
Then a plain restart for comparison: SIGTERM, start again, listening;
every session is lost (scamper would return 30-61 s later and start new
sessions; clients are cut).
"""

import argparse
import os
import re
import resource
import shutil
import signal
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, '..', 'tests', 'lib'))
import scr  # noqa: E402


def run(n, upgrades):
    d = scr.Daemon(udir=False, mux=True, zombie=120, debug=False,
                   start=False)
    exe = os.path.join(d.tmp, 'sc_remoted')
    shutil.copy(scr.SC_REMOTED, exe)
    d.args[0] = exe
    d.start()
    d.wait_listening()
    try:
        probe = scr.FakeScamper(d.port, name='probe')
        probe.handshake(20)
        sink = scr.FakeScamper(d.port, name='sink')
        sink.handshake(20)
        vps = []
        for i in range(n):
            f = scr.FakeScamper(d.port, name='vp%d' % i, auto_ack=False)
            f.handshake(20)
            vps.append(f)
        mc = scr.MuxClient(d.mux_path, 20)
        ids = {v['name']: v['id'] for v in mc.read_burst(60)}
        # 1 KiB toward every VP, never ACKed
        blob = b'u' * 1024
        for i, f in enumerate(vps):
            mc.open(ids['vp%d' % i], 100 + i)
            mc.send(100 + i, blob)
        for f in vps:
            f.wait_channel_new(20)
            f.recv_channel_data(f.channels_seen[0], 1024, 20)
        # a stalled mux client with ~4 MiB queued for it
        stalled = scr.MuxClient(d.mux_path, 20)
        stalled.read_burst(60)
        stalled.open(ids['sink'], 1)
        sch = sink.wait_channel_new(20)
        for _ in range(64):
            sink.send_data(sch, b's' * 65535)
        # the probe channel
        mc.open(ids['probe'], 2)
        pch = probe.wait_channel_new(20)

        def rtt():
            t = time.monotonic()
            mc.send(2, b'p' * 64)
            probe.recv_channel_data(pch, 64, 30)
            probe.send_data(pch, b'q' * 64)
            mc.recv_channel_data(2, 64, 30)
            return time.monotonic() - t

        base = sorted(rtt() for _ in range(200))[100]
        out = []
        for k in range(upgrades):
            nlog = len(re.findall(r'after a (\d+)ms pause', d.log()))
            old = d.proc
            gap = 0.0
            old.send_signal(signal.SIGUSR2)
            deadline = time.monotonic() + 60
            while old.poll() is None or \
                    len(re.findall(r'after a \d+ms pause', d.log())) <= nlog:
                gap = max(gap, rtt())
                if time.monotonic() > deadline:
                    raise RuntimeError('no handover; log:\n' + d.log())
            for _ in range(20):
                gap = max(gap, rtt())
            pause = int(re.findall(r'after a (\d+)ms pause', d.log())[nlog])
            # the state format's own share: save, and load in the new process
            wr = int(re.findall(r'written in (\d+)ms', d.log())[nlog])
            ld = int(re.findall(r'\(loaded in (\d+)ms\)', d.log())[nlog])
            m = re.findall(r'upgrade \d+: pid (\d+) version', d.log())
            d.proc = scr.AdoptedProc(int(m[-1]))
            out.append((pause, gap * 1000, wr, ld))
        # every VP still there: a resume is not needed, sockets open
        probe.send_data(pch, b'end')
        mc.recv_channel_data(2, 3, 30)
        # a plain restart, for comparison
        t = time.monotonic()
        d.proc.send_signal(signal.SIGTERM)
        d.proc.wait(60)
        d.proc = None
        d._close_fh()
        d.start()
        d.wait_listening(60)
        restart = (time.monotonic() - t) * 1000
        lost = sum(1 for f in vps if scr.wait_closed(f.sock, 30) is not None)
        return base * 1000, out, restart, lost
    finally:
        d.kill()
        shutil.rmtree(d.tmp, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--vps', default='1000,10000')
    ap.add_argument('--upgrades', type=int, default=5)
    a = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    scr.become_subreaper()
    print('| VPs | probe RTT (median) | pause, daemon (ms): each upgrade '
          '| longest gap, client (ms) | state save + load (ms) '
          '| plain restart |')
    print('|---|---|---|---|---|---|')
    for n in [int(x) for x in a.vps.split(',')]:
        base, out, restart, lost = run(n, a.upgrades)
        print('| %d | %.2f ms | %s | %s (max %.0f) | %s | %.0f ms to listen '
              'again; %d of %d sessions lost |'
              % (n, base, ', '.join(str(o[0]) for o in out),
                 ', '.join('%.0f' % o[1] for o in out),
                 max(o[1] for o in out),
                 ', '.join('%d+%d' % (o[2], o[3]) for o in out),
                 restart, lost, n))
        sys.stdout.flush()
    return 0


if __name__ == '__main__':
    sys.exit(main())
