#!/usr/bin/env python3
"""The mux suite (tests/mux/test_mux.py) over TCP: every daemon it starts
also gets -O mux-listen on a loopback port and every MuxClient connects
there (scr.py's SCR_MUX_TCP=1), so the burst, GO, channels, metadata,
errors and zombie cases are checked byte for byte on the TCP path."""

import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))

if __name__ == '__main__':
    if not os.environ.get('SC_REMOTED'):
        print('SKIP: $SC_REMOTED not set')
        sys.exit(77)
    env = dict(os.environ, SCR_MUX_TCP='1')
    suite = os.path.join(HERE, '..', 'mux', 'test_mux.py')
    try:
        rc = subprocess.run([sys.executable, suite] + sys.argv[1:], env=env,
                            timeout=900).returncode
    except subprocess.TimeoutExpired:
        print('FAIL: the mux suite over TCP did not finish in 900 s')
        rc = 1
    sys.exit(rc)
