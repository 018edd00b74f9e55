#!/usr/bin/env python3
"""A TCP mux client whose host vanishes without a FIN is noticed through
TCP keepalives (-O mux-listen sets SO_KEEPALIVE, TCP_KEEPIDLE 30 s,
TCP_KEEPINTVL 10 s, TCP_KEEPCNT 6).

The daemon and the client run in a private network namespace
(unshare -n); once the client has its burst, the namespace's loopback
is taken down, so nothing (no FIN, no RST, no keepalive answer) reaches
the daemon any more.  The daemon must close that client by itself,
within the keepalive time (about 90 s; waited for up to 240 s) while a
-M client on the unix socket stays.  Needs root, unshare(1) and ip(8):
exits 77 (SKIP) otherwise; SC_TESTS_QUICK=1 skips it (it takes ~95 s).
"""

import os
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, '..', 'lib'))


def inner():
    import scr
    subprocess.run(['ip', 'link', 'set', 'lo', 'up'], check=True)
    d = scr.Daemon(udir=False, mux=True, mux_tcp=True)
    try:
        d.wait_listening()
        local = scr.MuxClient(d.mux_path)
        local.read_burst(5)
        remote = scr.MuxClient(d.mux_tcp)
        remote.read_burst(5)
        port = remote.sock.getsockname()[1]
        m = d.wait_log(r'127\.0\.0\.1\.%d: mux over tcp.*\n'
                       r'.*mux client (\d+): connected' % port)
        gen = m.group(1)
        t0 = time.monotonic()
        # the client's host vanishes: no FIN, nothing at all any more
        subprocess.run(['ip', 'link', 'set', 'lo', 'down'], check=True)
        d.wait_log(r'mux client %s: closing: (read|write) error' % gen,
                   timeout=240)
        print('the vanished TCP mux client was closed after %.0f s'
              % (time.monotonic() - t0))
        assert d.alive()
        # only that client (and wait_listening's probe) went away
        gone = [l for l in d.log().splitlines()
                if 'mux client' in l and 'closing' in l]
        print('\n'.join(gone))
        assert len(gone) == 2, gone
        local.close()
        return 0
    except Exception:
        print(d.log()[-3000:])
        raise
    finally:
        d.__exit__(None, None, None)


def main():
    if not os.environ.get('SC_REMOTED'):
        print('SKIP: $SC_REMOTED not set')
        return 77
    if os.environ.get('SC_TESTS_QUICK') == '1':
        print('SKIP: takes about 95 s (SC_TESTS_QUICK=1)')
        return 77
    if os.geteuid() != 0 or not shutil.which('unshare') or \
            not shutil.which('ip'):
        print('SKIP: needs root, unshare(1) and ip(8)')
        return 77
    try:
        p = subprocess.run(['unshare', '-n', sys.executable,
                            os.path.abspath(__file__), '--inner'],
                           timeout=400)
    except subprocess.TimeoutExpired:
        print('FAIL: did not finish in 400 s')
        return 1
    return p.returncode


if __name__ == '__main__':
    if sys.argv[1:] == ['--inner']:
        sys.exit(inner())
    sys.exit(main())
