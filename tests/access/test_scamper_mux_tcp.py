#!/usr/bin/env python3
"""End-to-end over the TCP mux: tests/e2e/test_scamper_mux.py (two real
`scamper -R` VPs, the VP list with metadata, a ping through a mux channel
on each) with every mux client connected over TCP (-O mux-listen,
scr.py's SCR_MUX_TCP=1).  Needs root and scamper like the original:
exits 77 (SKIP) otherwise."""

import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))

if __name__ == '__main__':
    if not os.environ.get('SC_REMOTED'):
        print('SKIP: $SC_REMOTED not set')
        sys.exit(77)
    env = dict(os.environ, SCR_MUX_TCP='1')
    suite = os.path.join(HERE, '..', 'e2e', 'test_scamper_mux.py')
    try:
        rc = subprocess.run([sys.executable, suite] + sys.argv[1:], env=env,
                            timeout=600).returncode
    except subprocess.TimeoutExpired:
        print('FAIL: the e2e mux test over TCP did not finish in 600 s')
        rc = 1
    sys.exit(rc)
