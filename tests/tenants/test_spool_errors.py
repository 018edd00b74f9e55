#!/usr/bin/env python3
"""The spool directory's failures (issue 18).

* At startup, a spool-dir that is missing, not a directory, or not
  writable is a clear error and a non-zero exit.
* Disk full while spooling (a small tmpfs the test mounts, so root only):
  the daemon logs the ENOSPC, falls back to the memory policy (pauses the
  VP at buffer-high), loses nothing -- A, when it resumes, receives every
  byte in order -- and B's commands complete again afterwards.

Without root the ENOSPC test is skipped; if every test is skipped the
script exits 77.
"""

import os
import shutil
import subprocess
import sys
import tempfile
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tenants  # noqa: E402
from tenants import scr, MIB  # noqa: E402

ROOT = os.geteuid() == 0


def can_mount():
    return ROOT and shutil.which('mount') and shutil.which('umount')


class SpoolErrorsTest(unittest.TestCase):

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix='scr-spool-')
        self.addCleanup(shutil.rmtree, self.tmp, True)

    def mount_tmpfs(self, path, opts):
        os.mkdir(path)
        r = subprocess.run(['mount', '-t', 'tmpfs', '-o', opts, 'tmpfs',
                            path], capture_output=True, text=True)
        if r.returncode != 0:
            self.skipTest('cannot mount a tmpfs: %s' % r.stderr.strip())
        self.addCleanup(subprocess.run, ['umount', '-l', path])

    def start_fails(self, spool, expect):
        port = scr.free_port()
        udir = os.path.join(self.tmp, 'u')
        os.makedirs(udir, exist_ok=True)
        r = subprocess.run([scr.SC_REMOTED, '-P', '127.0.0.1:%d' % port,
                            '-U', udir, '-O', 'spool-dir=' + spool],
                           capture_output=True, text=True, timeout=20)
        print('exit %d: %s' % (r.returncode, r.stderr.strip()))
        self.assertNotEqual(r.returncode, 0)
        self.assertIn('spool-dir=' + spool, r.stderr)
        self.assertIn(expect, r.stderr)

    def test_missing(self):
        self.start_fails(os.path.join(self.tmp, 'nope'),
                         'No such file or directory')

    def test_not_a_directory(self):
        f = os.path.join(self.tmp, 'file')
        open(f, 'w').close()
        self.start_fails(f, 'Not a directory')

    def test_unwritable(self):
        d = os.path.join(self.tmp, 'ro')
        if ROOT:   # root writes through modes: a read-only file system
            if not can_mount():
                self.skipTest('no mount')
            self.mount_tmpfs(d, 'size=1m,ro')
            self.start_fails(d, 'Read-only file system')
        else:
            os.mkdir(d, 0o500)
            self.start_fails(d, 'Permission denied')

    def test_enospc_falls_back_and_loses_nothing(self):
        if not can_mount():
            self.skipTest('needs root to mount a small tmpfs')
        spool = os.path.join(self.tmp, 'small')
        self.mount_tmpfs(spool, 'size=8m')
        total = 32 * MIB
        s = tenants.Scene('unix', 'mux', total=total, spool=spool,
                          opts=('stall-timeout=600',))
        self.addCleanup(s.close)
        s.stream_to_a()
        s.wait_log(r'local client on channel \d+: spooling failed '
                   r'\(writing\): No space left on device', 60)
        s.loop.run_until(
            lambda: s.metric('sc_remoted_backpressure_pauses_total') >= 1,
            30, 'the VP to be paused (memory policy)')
        self.assertGreaterEqual(s.metric('sc_remoted_spool_errors_total'), 1)
        c = s.consumer(s.ch_a)
        self.assertTrue(c['full'])
        self.assertLessEqual(c['spool_bytes'], 8 * MIB)
        self.assertFalse(s.vp_taken)
        print([l for l in s.d.log().splitlines() if 'spool' in l])
        s.a.resume_reading()
        s.loop.run_until(lambda: s.chk.done, 120,
                         'A to read its stream (%d of %d)'
                         % (s.chk.got, total))
        s.b_commands(100, 60, 'B after A drained')
        s.loop.run_until(lambda: s.spool_fds(spool) == 0, 10,
                         'the spool file to be closed')
        self.assertEqual(s.metric('sc_remoted_spool_bytes'), 0)
        self.assertEqual(s.lost, [])
        s.stop_clean(self)


if __name__ == '__main__':
    r = unittest.main(verbosity=2, exit=False).result
    if not r.wasSuccessful():
        sys.exit(1)
    if r.testsRun > 0 and len(r.skipped) == r.testsRun:
        sys.exit(77)
    sys.exit(0)
