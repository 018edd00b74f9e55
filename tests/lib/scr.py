"""scr -- shared test library for sc_remoted.

Python 3 standard library only.  Provides:

* Daemon          -- start/stop an sc_remoted instance in a private temp dir
* run_cli         -- run the binary once with arbitrary arguments
* pack_frame / FrameReader / Frame / message type constants
                  -- the remote protocol codec (PROTOCOL.md section 2)
* FakeScamper     -- a fake remote scamper that checks remoted's seq rules
* UnixClient      -- a local client of a per-VP unix socket (section 4)
* MuxClient       -- a mux protocol client (section 5)
* parse_data_blocks / warts_records / uuencode
                  -- helpers for the scamper control text protocol (3.4)
* slow            -- decorator skipping a test when SC_TESTS_QUICK=1
* faketime_env    -- environment running a process on an accelerated clock

Every blocking call takes a timeout and raises when it expires.
"""

import binascii
import collections
import errno
import glob
import json
import os
import random
import re
import shutil
import signal
import socket
import ssl
import stat
import struct
import subprocess
import tempfile
import threading
import time
import unittest

__all__ = [
    'SC_REMOTED', 'is_legacy', 'not_legacy', 'free_port', 'Daemon', 'run_cli', 'slow',
    'QUICK', 'pack_frame', 'FrameReader', 'Frame', 'FakeScamper',
    'UnixClient', 'MuxClient', 'parse_data_blocks', 'warts_records',
    'uuencode', 'uudecode', 'DataBlock', 'peer_id', 'socket_mode',
    'wait_until', 'probe_res', 'assert_session_freed', 'wait_closed',
    'faketime_lib', 'faketime_env',
    'main', 'AdoptedProc', 'become_subreaper',
    'MASTER_NEW', 'MASTER_ID', 'CHANNEL_NEW', 'CHANNEL_FIN', 'KEEPALIVE',
    'ACK', 'MASTER_RES', 'MASTER_REJ', 'MASTER_OK',
]

# ---------------------------------------------------------------------------
# Environment
# ---------------------------------------------------------------------------


def _default_binary():
    path = os.environ.get('SC_REMOTED')
    if path:
        return path
    top = os.environ.get('SC_TOP_BUILDDIR')
    if top:
        return os.path.join(top, 'sc_remoted')
    return './sc_remoted'


SC_REMOTED = _default_binary()

QUICK = os.environ.get('SC_TESTS_QUICK', '') == '1'

# decorator: skip a test that waits more than ~20 s in quick mode
slow = unittest.skipIf(QUICK, 'slow test skipped (SC_TESTS_QUICK=1)')

_legacy = None


def not_legacy(reason):
    """Decorator: skip when SC_REMOTED is the 2021 sc_remoted, for
    behaviour that differs there (reason says how).  Set
    SC_TESTS_NO_LEGACY_SKIP=1 to run them anyway (they should fail)."""
    skip = is_legacy() and os.environ.get('SC_TESTS_NO_LEGACY_SKIP') != '1'

    def deco(obj):
        return unittest.skipIf(skip, 'differs in 2021 sc_remoted: '
                               + reason)(obj)
    return deco


def is_legacy():
    """True if SC_REMOTED looks like the 2021 (Debian) sc_remoted.

    Decided by env SC_REMOTED_LEGACY=0/1 if set, else by whether `-v`
    succeeds (the 2021 binary has no -v).  The result is cached."""
    global _legacy
    if _legacy is None:
        env = os.environ.get('SC_REMOTED_LEGACY')
        if env is not None and env != '':
            _legacy = env not in ('0', 'no', 'false')
        else:
            try:
                p = subprocess.run([SC_REMOTED, '-v'], stdin=subprocess.DEVNULL,
                                   stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, timeout=10)
                _legacy = not (p.returncode == 0 and
                               p.stdout.startswith(b'sc_remoted version'))
            except (OSError, subprocess.TimeoutExpired):
                _legacy = False
    return _legacy


def free_port(host='127.0.0.1'):
    """Return a TCP port that is currently unused on host."""
    fam = socket.AF_INET6 if ':' in host else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM)
    try:
        s.bind((host, 0))
        return s.getsockname()[1]
    finally:
        s.close()


def wait_until(pred, timeout, interval=0.02, what='condition'):
    """Poll pred() until it returns a true value; return that value.
    Raises TimeoutError after timeout seconds."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() >= deadline:
            raise TimeoutError('timed out after %.1fs waiting for %s'
                               % (timeout, what))
        time.sleep(interval)


def socket_mode(path):
    """Permission bits of path (lstat)."""
    return stat.S_IMODE(os.lstat(path).st_mode)


def peer_id(addr):
    """remoted's id string for a peer (address, port[, ...]) tuple:
    'a.b.c.d:PORT' for IPv4 and '<v6>.PORT' for IPv6 (PROTOCOL.md 2.4)."""
    host, port = addr[0], addr[1]
    if ':' in host:
        return '%s.%d' % (host, port)
    return '%s:%d' % (host, port)


def run_cli(args, timeout=10, stdin_data=None, env=None, cwd=None):
    """Run SC_REMOTED with args; return (returncode, stdout, stderr) as
    (int, str, str).  Raises subprocess.TimeoutExpired (after killing the
    process) if it does not exit within timeout."""
    p = subprocess.Popen([SC_REMOTED] + list(args),
                         stdin=subprocess.PIPE if stdin_data is not None
                         else subprocess.DEVNULL,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env=env, cwd=cwd)
    try:
        out, err = p.communicate(stdin_data, timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.communicate()
        raise
    return (p.returncode, out.decode('utf-8', 'replace'),
            err.decode('utf-8', 'replace'))


# ---------------------------------------------------------------------------
# Accelerated clock (libfaketime)
# ---------------------------------------------------------------------------
#
# Debian's libfaketime (LD_PRELOAD) with FAKETIME="+0 xN" makes a process's
# clock_gettime (CLOCK_MONOTONIC and CLOCK_REALTIME), gettimeofday and
# time() run N times faster from the moment the library loads, and divides
# the timeouts of epoll_wait, select, poll, ppoll, nanosleep and
# clock_nanosleep by N.  So sc_remoted's wheel ticks N times per real
# second and its waits end on time, with no change to the daemon.  Each
# process's fake clock starts at its own real start time: two processes
# agree on rates (intervals), not on absolute values.  Python under the
# library (time.monotonic, time.sleep, socket timeouts) runs in the same
# frame, which is how the timer tests make their fake peers live in daemon
# time.  FAKETIME_DONT_FAKE_MONOTONIC=1 leaves CLOCK_MONOTONIC real (then
# the wheel would not accelerate, and Python's time.sleep fails with
# EINVAL), so it is removed here.


def faketime_lib():
    """Path of libfaketime.so.1, or None when it is not installed."""
    pats = ('/usr/lib/*/faketime/libfaketime.so.1',
            '/usr/lib/faketime/libfaketime.so.1',
            '/usr/local/lib/faketime/libfaketime.so.1')
    for pat in pats:
        hits = sorted(glob.glob(pat))
        if hits:
            return hits[0]
    return None


def faketime_env(speed, env=None):
    """A copy of env (default os.environ) under which a process and its
    children run their clocks and timeouts `speed` times faster; None
    when libfaketime is not installed.  Pass it as Daemon(env=...)."""
    lib = faketime_lib()
    if lib is None:
        return None
    e = dict(os.environ if env is None else env)
    pre = e.get('LD_PRELOAD', '')
    if lib not in pre.split():
        e['LD_PRELOAD'] = (lib + ' ' + pre).strip()
    e['FAKETIME'] = '+0 x%g' % speed
    e.pop('FAKETIME_DONT_FAKE_MONOTONIC', None)
    # an ASan build must not refuse a preload that comes before its runtime
    asan = e.get('ASAN_OPTIONS', '')
    if 'verify_asan_link_order' not in asan:
        e['ASAN_OPTIONS'] = (asan + ':' if asan else '') + \
            'verify_asan_link_order=0'
    return e


# ---------------------------------------------------------------------------
# Daemon
# ---------------------------------------------------------------------------


# SCR_MUX_TCP=1 runs mux tests over TCP: every Daemon with a mux also gets
# -O mux-listen=<free loopback port>, and MuxClient(d.mux_path) connects to
# that port instead of the unix socket (same protocol, PROTOCOL.md 5).
MUX_TCP = os.environ.get('SCR_MUX_TCP', '') == '1'
_mux_tcp_by_path = {}


class Daemon:
    """An sc_remoted process in a private temporary directory.

    Daemon(udir=True, mux=False, zombie=None, meta=None, extra_args=(),
           port=None, debug=True, start=True, tls=None, stdin_data=None,
           host='127.0.0.1', notimes=None, env=None, cwd=None)

    * udir: create <tmp>/u and pass -U
    * mux: pass -M <tmp>/mux
    * zombie: -Z value (int or str)
    * meta: bytes -> written to <tmp>/meta.txt; str containing a newline ->
      likewise; any other str -> used as a path.  Passed as -m.
    * tls: dict with optional keys cert, key, ca -> -c, -p, -C
    * host: listen address for -P (an IPv6 literal is bracketed); None means
      -P <port> alone (all addresses).  connect_host is what clients use.
    * notimes: pass -O notimes (default: yes unless the binary is legacy)
    * umask: umask for the daemon process (default: inherited)
    * stdin_data: bytes written to the daemon's stdin (e.g. a passphrase),
      after which stdin is closed.
    * mux_tcp: also pass -O mux-listen=127.0.0.1:<free port>; .mux_tcp is
      then (host, port).  Default: with a mux when SCR_MUX_TCP=1.
    * metrics: pass -O metrics=<free port> (metrics_port); scrape() and
      vps() fetch /metrics (parsed) and /vps (decoded JSON)
    """

    def __init__(self, udir=True, mux=False, zombie=None, meta=None,
                 extra_args=(), port=None, debug=True, start=True, tls=None,
                 stdin_data=None, host='127.0.0.1', notimes=None, env=None,
                 cwd=None, umask=None, mux_tcp=None, metrics=False):
        self.umask = umask
        self.mux_tcp = None
        self.metrics_port = free_port() if metrics else None
        self.tmp = tempfile.mkdtemp(prefix='scr-')
        self.udir = None
        self.mux_path = None
        self.meta_path = None
        self.proc = None
        self.returncode = None
        self.host = host
        self.connect_host = host if host else '127.0.0.1'
        self.port = port if port is not None else free_port(self.connect_host)
        self._auto_port = port is None
        self._port_retries = 0
        self.stderr_path = os.path.join(self.tmp, 'stderr.log')
        self.stdin_data = stdin_data
        self.env = env
        self.cwd = cwd
        self._stderr_fh = None

        if udir:
            self.udir = os.path.join(self.tmp, 'u')
            os.mkdir(self.udir, 0o755)
        if mux:
            self.mux_path = os.path.join(self.tmp, 'mux')
        if meta is not None:
            if isinstance(meta, bytes) or '\n' in meta:
                self.meta_path = os.path.join(self.tmp, 'meta.txt')
                self.write_meta(meta)
            else:
                self.meta_path = meta

        if host is None:
            pspec = str(self.port)
        elif ':' in host:
            pspec = '[%s]:%d' % (host, self.port)
        else:
            pspec = '%s:%d' % (host, self.port)
        args = [SC_REMOTED, '-P', pspec]
        if self.udir:
            args += ['-U', self.udir]
        if self.mux_path:
            args += ['-M', self.mux_path]
        if mux_tcp is None:
            mux_tcp = MUX_TCP and mux and not is_legacy()
        if mux_tcp:
            self.mux_tcp = ('127.0.0.1', free_port())
            args += ['-O', 'mux-listen=%s:%d' % self.mux_tcp]
            if MUX_TCP and self.mux_path:
                _mux_tcp_by_path[self.mux_path] = self.mux_tcp
        if notimes is None:
            notimes = not is_legacy()
        if notimes:
            args += ['-O', 'notimes']
        if debug:
            args += ['-O', 'debug']
        if zombie is not None:
            args += ['-Z', str(zombie)]
        if self.meta_path:
            args += ['-m', self.meta_path]
        if tls:
            if tls.get('cert'):
                args += ['-c', tls['cert']]
            if tls.get('key'):
                args += ['-p', tls['key']]
            if tls.get('ca'):
                args += ['-C', tls['ca']]
        if self.metrics_port is not None:
            args += ['-O', 'metrics=%d' % self.metrics_port]
        args += list(extra_args)
        # SC_REMOTED_EXTRA_ARGS: options added to every daemon the tests
        # start (tests/run reruns the conformance suite with -O select)
        args += os.environ.get('SC_REMOTED_EXTRA_ARGS', '').split()
        self.args = args
        if start:
            self.start()

    # -- lifecycle ---------------------------------------------------------

    def start(self):
        if self.proc is not None:
            raise RuntimeError('daemon already started')
        self._stderr_fh = open(self.stderr_path, 'wb')
        stdin = subprocess.PIPE if self.stdin_data is not None \
            else subprocess.DEVNULL
        self.proc = subprocess.Popen(self.args, stdin=stdin,
                                     stdout=self._stderr_fh,
                                     stderr=self._stderr_fh,
                                     env=self.env, cwd=self.cwd,
                                     umask=-1 if self.umask is None
                                     else self.umask)
        if self.stdin_data is not None:
            try:
                self.proc.stdin.write(self.stdin_data)
                self.proc.stdin.close()
            except OSError:
                pass
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.kill()
        shutil.rmtree(self.tmp, ignore_errors=True)
        return False

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self):
        return self.proc.pid

    def signal(self, sig):
        if self.alive():
            self.proc.send_signal(sig)

    def wait_exit(self, timeout=10):
        """Wait for the process to exit by itself; return its exit code."""
        try:
            self.returncode = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError('sc_remoted did not exit within %.1fs' % timeout)
        return self.returncode

    def stop(self, timeout=10):
        """SIGTERM, then SIGKILL after timeout; return the exit code
        (negative signal number if killed by a signal)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.returncode = self.proc.returncode
        self._close_fh()
        return self.returncode

    def kill(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
        if self.proc is not None:
            self.returncode = self.proc.returncode
        self._close_fh()

    # -- live upgrade (SIGUSR2) ------------------------------------------

    _UPG_OK = re.compile(r'upgrade \d+: pid (\d+) version (\S+) took over')
    _UPG_FAIL = re.compile(r'upgrade (?:failed, still serving|refused): .*')

    def upgrade(self, timeout=20, pump=None):
        """SIGUSR2 and wait for the handover: the serving process exits
        0 and its successor's log line names its pid and version.  From
        then on this object controls the successor (see AdoptedProc).
        pump: called repeatedly while waiting (an event loop's run_once)
        instead of sleeping.  Returns (new pid, new version string)."""
        become_subreaper()
        n0 = len(self._UPG_OK.findall(self.log()))
        old = self.proc
        old.send_signal(signal.SIGUSR2)
        deadline = time.monotonic() + timeout
        while old.poll() is None:
            if time.monotonic() >= deadline:
                raise TimeoutError('no handover within %.1fs; log:\n%s'
                                   % (timeout, self.log()[-3000:]))
            if pump is not None:
                pump()
            else:
                time.sleep(0.01)
        rc = old.returncode
        if rc != 0:
            raise AssertionError('old process exited %s; log:\n%s'
                                 % (rc, self.log()[-3000:]))
        deadline = time.monotonic() + timeout
        while True:
            found = self._UPG_OK.findall(self.log())
            if len(found) > n0:
                pid, ver = int(found[n0][0]), found[n0][1]
                break
            if time.monotonic() >= deadline:
                raise TimeoutError('no successor log line; log:\n%s'
                                   % self.log()[-3000:])
            if pump is not None:
                pump()
            else:
                time.sleep(0.02)
        self.proc = AdoptedProc(pid)
        return pid, ver

    def upgrade_fails(self, timeout=30):
        """SIGUSR2 expecting a rollback: returns the failure log line once
        it appears; the same process must still be serving."""
        become_subreaper()
        n0 = len(self._UPG_FAIL.findall(self.log()))
        self.proc.send_signal(signal.SIGUSR2)
        deadline = time.monotonic() + timeout
        while True:
            found = self._UPG_FAIL.findall(self.log())
            if len(found) > n0:
                break
            self._check_alive('a failed upgrade')
            if time.monotonic() >= deadline:
                raise TimeoutError('no rollback line; log:\n%s'
                                   % self.log()[-3000:])
            time.sleep(0.02)
        self._check_alive('a failed upgrade')
        return found[n0]

    def _close_fh(self):
        if self._stderr_fh is not None:
            try:
                self._stderr_fh.close()
            except OSError:
                pass
            self._stderr_fh = None

    # -- observation -------------------------------------------------------

    def log(self):
        """stderr (and stdout) text so far."""
        try:
            with open(self.stderr_path, 'rb') as f:
                return f.read().decode('utf-8', 'replace')
        except OSError:
            return ''

    def wait_log(self, regex, timeout=10, flags=re.M):
        """Wait until regex matches the log; return the match object."""
        rx = re.compile(regex, flags)
        deadline = time.monotonic() + timeout
        while True:
            m = rx.search(self.log())
            if m:
                return m
            if time.monotonic() >= deadline:
                raise TimeoutError('log did not match %r within %.1fs; log:\n%s'
                                   % (regex, timeout, self.log()[-3000:]))
            time.sleep(0.05)

    def _check_alive(self, what):
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError('sc_remoted exited (status %s) while waiting for '
                               '%s; log:\n%s' % (self.proc.returncode, what,
                                                 self.log()[-3000:]))

    def _retry_port_in_use(self):
        """The port free_port() picked was taken by another process
        before the daemon bound it (a busy shared machine): start again on
        a new one, at most 3 times, and only for a port picked here."""
        if not self._auto_port or self._port_retries >= 3 or \
                self.proc is None or self.proc.poll() is None or \
                'Address already in use' not in self.log():
            return False
        self._port_retries += 1
        old = str(self.port)
        self.port = free_port(self.connect_host)
        i = self.args.index('-P') + 1
        self.args[i] = self.args[i][:-len(old)] + str(self.port)
        self._close_fh()
        self.proc = None
        self.start()
        return True

    def wait_listening(self, timeout=10):
        """Poll-connect the TCP port until it accepts (and, with -M, until
        the mux socket exists)."""
        deadline = time.monotonic() + timeout
        fam = socket.AF_INET6 if ':' in self.connect_host else socket.AF_INET
        while True:
            if self._retry_port_in_use():
                continue
            self._check_alive('listening')
            ok = False
            s = socket.socket(fam, socket.SOCK_STREAM)
            s.settimeout(1)
            try:
                s.connect((self.connect_host, self.port))
                ok = True
            except OSError:
                pass
            finally:
                s.close()
            if ok and self.mux_tcp is not None:
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                s.settimeout(1)
                try:
                    s.connect(self.mux_tcp)
                except OSError:
                    ok = False
                finally:
                    s.close()
            if ok and (self.mux_path is None or os.path.exists(self.mux_path)):
                return self
            if time.monotonic() >= deadline:
                raise TimeoutError('sc_remoted not listening on %s:%d after '
                                   '%.1fs; log:\n%s' % (self.connect_host,
                                                       self.port, timeout,
                                                       self.log()[-3000:]))
            time.sleep(0.05)

    def list_sockets(self):
        """Sorted names of the entries in the -U directory."""
        if not self.udir or not os.path.isdir(self.udir):
            return []
        return sorted(os.listdir(self.udir))

    def wait_socket(self, pattern='*', timeout=10):
        """Wait until a -U socket matching the glob pattern exists; return
        its path (the first, sorted, if several)."""
        deadline = time.monotonic() + timeout
        while True:
            hits = sorted(glob.glob(os.path.join(glob.escape(self.udir),
                                                 pattern)))
            hits = [h for h in hits if stat.S_ISSOCK(os.lstat(h).st_mode)]
            if hits:
                return hits[0]
            self._check_alive('socket %s' % pattern)
            if time.monotonic() >= deadline:
                raise TimeoutError('no socket matching %r in %s after %.1fs '
                                   '(have %r); log:\n%s'
                                   % (pattern, self.udir, timeout,
                                      self.list_sockets(), self.log()[-3000:]))
            time.sleep(0.02)

    def wait_socket_gone(self, path_or_pattern, timeout=10):
        """Wait until no -U entry matches (a path or a glob pattern)."""
        if os.path.isabs(path_or_pattern):
            pat = glob.escape(path_or_pattern)
        else:
            pat = os.path.join(glob.escape(self.udir), path_or_pattern)
        deadline = time.monotonic() + timeout
        while True:
            if not glob.glob(pat):
                return
            if time.monotonic() >= deadline:
                raise TimeoutError('%r still present after %.1fs; log:\n%s'
                                   % (path_or_pattern, timeout,
                                      self.log()[-3000:]))
            time.sleep(0.02)

    def write_meta(self, content):
        if isinstance(content, str):
            content = content.encode()
        if self.meta_path is None:
            self.meta_path = os.path.join(self.tmp, 'meta.txt')
        with open(self.meta_path, 'wb') as f:
            f.write(content)

    def fake(self, **kw):
        """A FakeScamper aimed at this daemon."""
        kw.setdefault('host', self.connect_host)
        return FakeScamper(self.port, **kw)

    def mux(self):
        """A connected MuxClient."""
        return MuxClient(self.mux_path)

    def scrape(self, timeout=5):
        """GET /metrics; returns parse_prom() of the page."""
        r = http_get(self.metrics_port, '/metrics', timeout=timeout)
        assert r.status == 200, r
        return parse_prom(r.body.decode())

    def vps(self, timeout=5):
        """GET /vps; returns the decoded JSON list."""
        r = http_get(self.metrics_port, '/vps', timeout=timeout)
        assert r.status == 200, r
        return json.loads(r.body.decode())


# ---------------------------------------------------------------------------
# Remote protocol codec
# ---------------------------------------------------------------------------

MASTER_NEW = 0
MASTER_ID = 1
CHANNEL_NEW = 2
CHANNEL_FIN = 3
KEEPALIVE = 4
ACK = 5
MASTER_RES = 6
MASTER_REJ = 7
MASTER_OK = 8

MSG_NAMES = {MASTER_NEW: 'MASTER_NEW', MASTER_ID: 'MASTER_ID',
             CHANNEL_NEW: 'CHANNEL_NEW', CHANNEL_FIN: 'CHANNEL_FIN',
             KEEPALIVE: 'KEEPALIVE', ACK: 'ACK', MASTER_RES: 'MASTER_RES',
             MASTER_REJ: 'MASTER_REJ', MASTER_OK: 'MASTER_OK'}

HDR = struct.Struct('>IIH')
HDR_LEN = 10
MAX_PAYLOAD = 65535
U32 = 0xffffffff


def pack_frame(seq, chan, payload):
    """Encode one remote-protocol frame."""
    payload = bytes(payload)
    if len(payload) > MAX_PAYLOAD:
        raise ValueError('payload too long: %d' % len(payload))
    return HDR.pack(seq & U32, chan & U32, len(payload)) + payload


def pack_hdr(seq, chan, length):
    """Encode just a header (length may disagree with what follows)."""
    return HDR.pack(seq & U32, chan & U32, length & 0xffff)


def seq_lt(a, b):
    """Serial-number comparison a < b (mod 2^32)."""
    d = (a - b) & U32
    return d >= 0x80000000


class Frame(collections.namedtuple('Frame', 'seq chan payload')):
    """A decoded frame; unpacks as (seq, chan, payload)."""
    __slots__ = ()

    @property
    def is_control(self):
        return self.chan == 0

    @property
    def type(self):
        """Message type of a control frame (None for data or empty)."""
        if self.chan != 0 or not self.payload:
            return None
        return self.payload[0]

    @property
    def body(self):
        return self.payload[1:] if self.chan == 0 else self.payload

    @property
    def reliable(self):
        return self.chan != 0 or self.type in (CHANNEL_NEW, CHANNEL_FIN)

    def raw(self):
        return pack_frame(self.seq, self.chan, self.payload)

    def __repr__(self):
        if self.chan == 0:
            t = self.type
            name = MSG_NAMES.get(t, 'type%s' % t)
            return 'Frame(seq=%d, ctl %s, body=%s)' % (
                self.seq, name, bytes(self.body).hex())
        p = bytes(self.payload)
        shown = p[:40] + (b'...' if len(p) > 40 else b'')
        return 'Frame(seq=%d, chan=%d, len=%d, %r)' % (
            self.seq, self.chan, len(p), shown)


class FrameReader:
    """Incremental reassembly of remote-protocol frames."""

    def __init__(self):
        self.buf = bytearray()

    def feed(self, data):
        """Add bytes; return a list of complete Frames."""
        self.buf += data
        out = []
        off = 0
        n = len(self.buf)
        while n - off >= HDR_LEN:
            seq, chan, ln = HDR.unpack_from(self.buf, off)
            if n - off < HDR_LEN + ln:
                break
            out.append(Frame(seq, chan,
                             bytes(self.buf[off + HDR_LEN:off + HDR_LEN + ln])))
            off += HDR_LEN + ln
        if off:
            del self.buf[:off]
        return out

    @property
    def pending(self):
        return len(self.buf)


def ctl_payload(mtype, body=b''):
    return bytes([mtype]) + bytes(body)


# ---------------------------------------------------------------------------
# Socket helpers
# ---------------------------------------------------------------------------

_CLOSED_ERRS = (ConnectionResetError, ConnectionAbortedError, BrokenPipeError)


def _recv_some(sock, deadline, bufsize=65536):
    """One recv bounded by deadline.  Returns bytes (b'' on EOF or reset);
    raises TimeoutError when the deadline passes."""
    while True:
        rem = deadline - time.monotonic()
        if rem <= 0:
            raise TimeoutError('timed out')
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            rem = 0.001
        sock.settimeout(rem)
        try:
            return sock.recv(bufsize)
        except socket.timeout:
            raise TimeoutError('timed out') from None
        except ssl.SSLWantReadError:
            continue
        except (ssl.SSLEOFError, ssl.SSLZeroReturnError):
            return b''
        except ssl.SSLError:
            return b''
        except _CLOSED_ERRS:
            return b''
        except OSError as e:
            if e.errno in (errno.ECONNRESET, errno.EPIPE, errno.ENOTCONN):
                return b''
            raise


def wait_closed(sock, timeout):
    """Read and discard until EOF/reset; return the bytes read.  Raises
    AssertionError if the peer keeps the connection open for timeout."""
    deadline = time.monotonic() + timeout
    got = bytearray()
    while True:
        try:
            d = _recv_some(sock, deadline)
        except TimeoutError:
            raise AssertionError('connection still open after %.1fs (read %d '
                                 'bytes: %r)' % (timeout, len(got),
                                                 bytes(got[:64]))) from None
        if not d:
            return bytes(got)
        got += d


# ---------------------------------------------------------------------------
# Fake scamper
# ---------------------------------------------------------------------------


class FakeScamper:
    """A fake remote scamper.

    State: snd_nxt, rcv_nxt, unacked (list of Frames awaiting remoted's
    ACK), go (GO mode), vp_alias (id string from MASTER_ID), chan_data
    (dict chan -> bytearray of received channel bytes not yet consumed),
    new_channels (deque of channel ids from CHANNEL_NEW not yet consumed),
    fins (set of channels remoted sent FIN for), keepalives (count), log
    (list of every received Frame).

    Receive-side checks (AssertionError on violation), on every frame read
    through recv_frame(check=True):
      * CONNECT mode: MASTER_ID/OK/REJ with seq 0 and channel 0 only;
      * GO mode: seq == rcv_nxt; only CHANNEL_NEW/FIN/KEEPALIVE/ACK control
        types with the right body lengths;
      * an ACK body equals the seq of our oldest unacknowledged message.
    Reliable frames increment rcv_nxt and, if auto_ack, are ACKed at once.
    On MASTER_OK, messages remoted already has are dropped from unacked
    and, if auto_resend, the rest are retransmitted at once (as scamper
    does).
    """

    def __init__(self, port, name=None, magic=None, host='127.0.0.1',
                 sock=None, sock_factory=None, auto_ack=True,
                 auto_resend=True):
        self.port = port
        self.host = host
        self.name = name
        self.magic = magic if magic is not None else os.urandom(8)
        self.sock = sock
        self.sock_factory = sock_factory
        self.auto_ack = auto_ack
        self.auto_resend = auto_resend
        self.reader = FrameReader()
        self.frames = collections.deque()
        self.eof = False
        self.snd_nxt = 0
        self.rcv_nxt = 0
        self.unacked = []
        self.go = False
        self.rejected = False
        self.vp_alias = None
        self.ok_rcv_nxt = None
        self.chan_data = collections.defaultdict(bytearray)
        self.new_channels = collections.deque()
        self.channels_seen = []
        self.fins = set()
        self.keepalives = 0
        self.log = []
        if sock is not None:
            self._after_connect()

    # -- connection --------------------------------------------------------

    def connect(self, timeout=5):
        if self.sock is not None:
            return self
        if self.sock_factory is not None:
            self.sock = self.sock_factory()
        else:
            self.sock = socket.create_connection((self.host, self.port),
                                                 timeout=timeout)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._after_connect()
        return self

    def _after_connect(self):
        self.reader = FrameReader()
        self.frames = collections.deque()
        self.eof = False
        self.go = False
        self.local_addr = self.sock.getsockname()
        self.sport = self.local_addr[1]
        self.peer_id = peer_id(self.local_addr)

    def expected_socket_name(self):
        """The -U socket name remoted should use for this connection."""
        if self.name is None:
            return self.peer_id
        return '%s-%s' % (self.name, self.peer_id)

    def detach(self):
        """Forget the current socket without closing it; return it."""
        s = self.sock
        self.sock = None
        self.go = False
        return s

    def reconnect(self, close_old=True, timeout=5):
        """Drop the current connection (closing it unless close_old is
        False; the old socket is returned then) and open a new one."""
        old = self.detach()
        if old is not None and close_old:
            old.close()
            old = None
        self.connect(timeout)
        return old

    def close(self):
        if self.sock is not None:
            try:
                self.sock.close()
            except OSError:
                pass
            self.sock = None
        self.go = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    # -- sending -----------------------------------------------------------

    def send_raw(self, data):
        self.sock.sendall(bytes(data))

    def send_frame(self, seq, chan, payload):
        self.send_raw(pack_frame(seq, chan, payload))

    def send_ctl(self, mtype, body=b'', seq=None):
        """Send a control frame with the given type (seq default snd_nxt,
        not consumed)."""
        self.send_frame(self.snd_nxt if seq is None else seq, 0,
                        ctl_payload(mtype, body))

    def new_payload(self, name=None, magic=None):
        magic = self.magic if magic is None else magic
        p = bytes([MASTER_NEW, len(magic)]) + magic
        if name is not None:
            nb = name.encode() if isinstance(name, str) else name
            p += bytes([len(nb) + 1]) + nb + b'\0'
        return p

    def send_new(self, name=None, seq=0):
        """MASTER_NEW with seq 0 and our magic; name defaults to self.name
        (name_len includes the NUL).  Resets the session counters."""
        if name is None:
            name = self.name
        self.snd_nxt = 0
        self.rcv_nxt = 0
        self.unacked = []
        self.send_frame(seq, 0, self.new_payload(name))

    def handshake(self, timeout=5):
        """connect + MASTER_NEW + expect MASTER_ID; returns the alias."""
        self.connect()
        self.send_new()
        f = self.recv_frame(timeout)
        if f.chan != 0 or f.type != MASTER_ID:
            raise AssertionError('expected MASTER_ID, got %r' % (f,))
        return self.vp_alias

    def res_payload(self, rcv_nxt=None, snd_una=None, snd_nxt=None,
                    magic=None):
        magic = self.magic if magic is None else magic
        if rcv_nxt is None:
            rcv_nxt = self.rcv_nxt
        if snd_nxt is None:
            snd_nxt = self.snd_nxt
        if snd_una is None:
            snd_una = self.unacked[0].seq if self.unacked else snd_nxt
        return bytes([MASTER_RES, len(magic)]) + magic + \
            struct.pack('>III', rcv_nxt & U32, snd_una & U32, snd_nxt & U32)

    def send_res(self, rcv_nxt=None, snd_una=None, snd_nxt=None, magic=None):
        """MASTER_RES (seq 0).  Defaults describe our true state.  Our
        rcv_nxt is set to the value sent, since remoted will retransmit
        from there."""
        if rcv_nxt is None:
            rcv_nxt = self.rcv_nxt
        p = self.res_payload(rcv_nxt, snd_una, snd_nxt, magic)
        self.rcv_nxt = rcv_nxt & U32
        self.go = False
        self.send_frame(0, 0, p)

    def resume(self, rcv_nxt=None, snd_una=None, snd_nxt=None, resend=True,
               timeout=5, close_old=True):
        """Reconnect, send MASTER_RES, expect MASTER_OK (which, if resend,
        retransmits our unacked messages at once).  Returns OK's rcv_nxt.
        With close_old=False the previous socket is kept in prev_sock."""
        self.prev_sock = self.reconnect(close_old=close_old)
        self.send_res(rcv_nxt, snd_una, snd_nxt)
        old, self.auto_resend = self.auto_resend, resend
        try:
            f = self.recv_frame(timeout)
        finally:
            self.auto_resend = old
        if f.chan != 0 or f.type != MASTER_OK:
            raise AssertionError('expected MASTER_OK, got %r' % (f,))
        return self.ok_rcv_nxt

    def resend_unacked(self):
        for f in self.unacked:
            self.send_raw(f.raw())

    def _send_reliable(self, chan, payload):
        f = Frame(self.snd_nxt, chan, bytes(payload))
        self.snd_nxt = (self.snd_nxt + 1) & U32
        self.unacked.append(f)
        if self.sock is not None:
            self.send_raw(f.raw())
        return f.seq

    def send_data(self, chan, data, chunk=MAX_PAYLOAD):
        """Reliable data frame(s): seq = snd_nxt, snd_nxt++ each.  Data
        longer than chunk is split.  Returns the list of seqs used.  With
        no connection the frames are only queued (as scamper does)."""
        data = bytes(data)
        seqs = []
        if not data:
            seqs.append(self._send_reliable(chan, b''))
        for off in range(0, len(data), chunk):
            seqs.append(self._send_reliable(chan, data[off:off + chunk]))
        return seqs

    def send_fin(self, chan):
        """Reliable CHANNEL_FIN; returns its seq."""
        return self._send_reliable(0, ctl_payload(CHANNEL_FIN,
                                                  struct.pack('>I', chan)))

    def send_ack(self, seq):
        """ACK(seq), carrying our current snd_nxt (unreliable)."""
        self.send_ctl(ACK, struct.pack('>I', seq & U32))

    def ack(self, seq, chan=None):
        """ACK a reliable frame from remoted (chan is accepted for
        readability only; ACKs are per-session, not per-channel)."""
        self.send_ack(seq)

    def send_keepalive(self):
        self.send_ctl(KEEPALIVE)

    # -- receiving ---------------------------------------------------------

    def _fill(self, deadline):
        if self.sock is None:
            raise EOFError('not connected')
        if self.eof:
            raise EOFError('connection closed by remoted')
        d = _recv_some(self.sock, deadline)
        if not d:
            self.eof = True
            if self.reader.pending:
                raise EOFError('connection closed by remoted with %d bytes of '
                               'a partial frame pending: %s' % (
                                   self.reader.pending,
                                   bytes(self.reader.buf[:32]).hex()))
            raise EOFError('connection closed by remoted')
        self.frames.extend(self.reader.feed(d))

    def recv_frame(self, timeout=5, check=True):
        """Next frame from remoted (processed: seq checks, ACK accounting,
        auto-ACK, channel data buffering).  Raises TimeoutError or EOFError."""
        deadline = time.monotonic() + timeout
        while not self.frames:
            self._fill(deadline)
        f = self.frames.popleft()
        self.log.append(f)
        self._process(f, check)
        return f

    def _fail(self, msg, f):
        raise AssertionError('%s: %r (rcv_nxt=%d snd_nxt=%d unacked=%r)'
                             % (msg, f, self.rcv_nxt, self.snd_nxt,
                                [u.seq for u in self.unacked]))

    def _process(self, f, check):
        if not self.go:
            if check:
                if f.chan != 0:
                    self._fail('data frame in CONNECT mode', f)
                if f.type not in (MASTER_ID, MASTER_OK, MASTER_REJ):
                    self._fail('unexpected message in CONNECT mode', f)
                if f.seq != 0:
                    self._fail('handshake reply with seq != 0', f)
            t = f.type
            if t == MASTER_ID:
                b = f.body
                if check:
                    if len(b) < 2 or b[0] < 1 or len(b) != 1 + b[0]:
                        self._fail('malformed MASTER_ID', f)
                    if b[-1] != 0:
                        self._fail('MASTER_ID not NUL-terminated', f)
                    if any(c < 0x20 or c > 0x7e for c in b[1:-1]):
                        self._fail('MASTER_ID has unprintable chars', f)
                self.vp_alias = bytes(b[1:-1]).decode('ascii', 'replace')
                self.go = True
            elif t == MASTER_OK:
                b = f.body
                if check and len(b) != 4:
                    self._fail('MASTER_OK body length != 4', f)
                self.ok_rcv_nxt = struct.unpack('>I', b[:4])[0]
                # discard our queued messages remoted already has
                self.unacked = [u for u in self.unacked
                                if not seq_lt(u.seq, self.ok_rcv_nxt)]
                self.go = True
                # like scamper, retransmit the rest at once, before anything
                # else (our ACKs carry snd_nxt, which counts them)
                if self.auto_resend:
                    self.resend_unacked()
            elif t == MASTER_REJ:
                self.rejected = True
            return

        if check and f.seq != self.rcv_nxt:
            self._fail('remoted frame seq %d != our rcv_nxt %d'
                       % (f.seq, self.rcv_nxt), f)
        if f.chan != 0:
            self.rcv_nxt = (self.rcv_nxt + 1) & U32
            if self.auto_ack:
                self.send_ack(f.seq)
            self.chan_data[f.chan] += f.payload
            return
        t = f.type
        b = f.body
        if t in (CHANNEL_NEW, CHANNEL_FIN):
            if check and len(b) != 4:
                self._fail('%s body length %d != 4' % (MSG_NAMES[t], len(b)),
                           f)
            self.rcv_nxt = (self.rcv_nxt + 1) & U32
            if self.auto_ack:
                self.send_ack(f.seq)
            ch = struct.unpack('>I', b[:4])[0]
            if t == CHANNEL_NEW:
                if check and (ch == 0 or ch in self.channels_seen):
                    self._fail('CHANNEL_NEW with zero or reused id %d' % ch, f)
                self.new_channels.append(ch)
                self.channels_seen.append(ch)
            else:
                self.fins.add(ch)
        elif t == ACK:
            if check and len(b) != 4:
                self._fail('ACK body length %d != 4' % len(b), f)
            a = struct.unpack('>I', b[:4])[0]
            if not self.unacked:
                if check:
                    self._fail('ACK %d with nothing outstanding' % a, f)
                return
            if a != self.unacked[0].seq:
                if check:
                    self._fail('ACK %d but oldest unacked is %d'
                               % (a, self.unacked[0].seq), f)
                return
            self.unacked.pop(0)
        elif t == KEEPALIVE:
            if check and len(b) != 0:
                self._fail('KEEPALIVE with a body', f)
            self.keepalives += 1
        elif check:
            self._fail('unexpected control message in GO mode', f)

    def expect_control(self, mtype, timeout=5, strict=False):
        """Read frames until a control frame of mtype arrives; return it.
        Other frames are processed normally (strict: they are an error)."""
        deadline = time.monotonic() + timeout
        while True:
            rem = deadline - time.monotonic()
            try:
                f = self.recv_frame(max(rem, 0.001))
            except TimeoutError:
                raise TimeoutError('no %s within %.1fs' %
                                   (MSG_NAMES.get(mtype, mtype),
                                    timeout)) from None
            if f.chan == 0 and f.type == mtype:
                return f
            if strict:
                raise AssertionError('expected %s, got %r'
                                     % (MSG_NAMES.get(mtype, mtype), f))

    def pump(self, timeout=1.0, auto_ack=None, until=None):
        """Read and process frames for up to timeout seconds (stopping
        early on EOF, or when until() is true after a frame).  Returns the
        list of frames received."""
        old = self.auto_ack
        if auto_ack is not None:
            self.auto_ack = auto_ack
        out = []
        deadline = time.monotonic() + timeout
        try:
            while True:
                if until is not None and until():
                    break
                rem = deadline - time.monotonic()
                if rem <= 0:
                    break
                try:
                    out.append(self.recv_frame(rem))
                except TimeoutError:
                    break
                except EOFError:
                    break
        finally:
            self.auto_ack = old
        return out

    def wait_channel_new(self, timeout=5):
        """Channel id of the next CHANNEL_NEW (already received ones first)."""
        deadline = time.monotonic() + timeout
        while not self.new_channels:
            rem = deadline - time.monotonic()
            if rem <= 0:
                raise TimeoutError('no CHANNEL_NEW within %.1fs' % timeout)
            try:
                self.recv_frame(rem)
            except TimeoutError:
                raise TimeoutError('no CHANNEL_NEW within %.1fs'
                                   % timeout) from None
        return self.new_channels.popleft()

    def recv_channel_data(self, chan, nbytes, timeout=5):
        """Exactly nbytes of channel data for chan (buffered data first)."""
        deadline = time.monotonic() + timeout
        buf = self.chan_data[chan]
        while len(buf) < nbytes:
            rem = deadline - time.monotonic()
            if rem <= 0:
                raise TimeoutError('got %d of %d bytes on channel %d within '
                                   '%.1fs' % (len(buf), nbytes, chan, timeout))
            try:
                self.recv_frame(rem)
            except TimeoutError:
                continue
        out = bytes(buf[:nbytes])
        del buf[:nbytes]
        return out

    def wait_fin(self, chan, timeout=5):
        """Wait until remoted has sent CHANNEL_FIN for chan."""
        deadline = time.monotonic() + timeout
        while chan not in self.fins:
            rem = deadline - time.monotonic()
            if rem <= 0:
                raise TimeoutError('no CHANNEL_FIN(%d) within %.1fs'
                                   % (chan, timeout))
            try:
                self.recv_frame(rem)
            except TimeoutError:
                continue

    def wait_acked(self, timeout=5):
        """Wait until every message we sent has been ACKed."""
        deadline = time.monotonic() + timeout
        while self.unacked:
            rem = deadline - time.monotonic()
            if rem <= 0:
                raise TimeoutError('%d messages still unacked after %.1fs '
                                   '(oldest seq %d)' % (len(self.unacked),
                                                        timeout,
                                                        self.unacked[0].seq))
            try:
                self.recv_frame(rem)
            except TimeoutError:
                continue

    def expect_closed(self, timeout=5):
        """Assert remoted closes the connection (EOF or reset) within
        timeout.  Frames already buffered are ignored.  Returns bytes read."""
        if self.sock is None:
            raise AssertionError('not connected')
        if self.eof:
            return b''
        got = wait_closed(self.sock, timeout)
        self.eof = True
        return got

    def expect_silence(self, duration):
        """Assert that nothing (no byte, no EOF) arrives for duration."""
        if self.frames:
            raise AssertionError('unexpected frame: %r' % (self.frames[0],))
        deadline = time.monotonic() + duration
        try:
            d = _recv_some(self.sock, deadline)
        except TimeoutError:
            return
        if not d:
            raise AssertionError('connection closed unexpectedly')
        raise AssertionError('unexpected bytes: %s' % d[:64].hex())


def probe_res(port, magic, rcv_nxt=0, snd_una=0, snd_nxt=0,
              host='127.0.0.1', timeout=5):
    """Send MASTER_RES for magic on a fresh connection and report the
    outcome: 'REJ' (a proper REJ frame, then close), 'OK', or 'closed'
    (closed without a reply).  Raises on anything else."""
    fs = FakeScamper(port, magic=magic, host=host)
    try:
        fs.connect()
        fs.send_res(rcv_nxt, snd_una, snd_nxt)
        try:
            f = fs.recv_frame(timeout)
        except EOFError:
            return 'closed'
        if f.type == MASTER_OK:
            return 'OK'
        if f.type == MASTER_REJ:
            if f.raw() != bytes.fromhex('00000000000000000001') + b'\x07':
                raise AssertionError('REJ frame not exactly 00000000 '
                                     '00000000 0001 07: %s' % f.raw().hex())
            fs.expect_closed(timeout)
            return 'REJ'
        raise AssertionError('unexpected reply to RES: %r' % (f,))
    finally:
        fs.close()


def assert_session_freed(daemon, fs, sockname=None, clients=(), timeout=5):
    """Assert that fs's session was freed (not turned into a zombie):
    fs's connection is closed, its -U socket (sockname, default
    fs.expected_socket_name()) disappears, every UnixClient in clients is
    closed, and a MASTER_RES carrying fs's true sequence state is answered
    with MASTER_REJ (a zombie would answer MASTER_OK)."""
    if fs.sock is not None and not fs.eof:
        fs.expect_closed(timeout)
    if daemon.udir:
        if sockname is None:
            sockname = fs.expected_socket_name()
        daemon.wait_socket_gone(sockname, timeout)
    for c in clients:
        c.expect_closed(timeout)
    snd_una = fs.unacked[0].seq if fs.unacked else fs.snd_nxt
    r = probe_res(daemon.port, fs.magic, fs.rcv_nxt, snd_una, fs.snd_nxt,
                  host=fs.host, timeout=timeout)
    if r != 'REJ':
        raise AssertionError('session still known to remoted: RES got %s'
                             % r)


def become_subreaper():
    """Make this process the reaper of orphaned descendants (Linux
    PR_SET_CHILD_SUBREAPER), so a daemon's successor after a live
    upgrade (a child of the old process) can be waited for."""
    import ctypes
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(36, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass


class AdoptedProc:
    """A Popen-like handle on a process this test did not start but
    reaps as a subreaper (poll, wait, send_signal, kill, pid,
    returncode)."""

    def __init__(self, pid):
        self.pid = pid
        self.returncode = None

    def poll(self):
        if self.returncode is None:
            try:
                pid, st = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                self.returncode = -1
                return self.returncode
            if pid == self.pid:
                self.returncode = os.waitstatus_to_exitcode(st)
        return self.returncode

    def wait(self, timeout=None):
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(['pid %d' % self.pid],
                                                timeout)
            time.sleep(0.01)
        return self.returncode

    def send_signal(self, sig):
        if self.poll() is None:
            os.kill(self.pid, sig)

    def kill(self):
        self.send_signal(signal.SIGKILL)


# ---------------------------------------------------------------------------
# Local (per-VP unix socket) client
# ---------------------------------------------------------------------------


class UnixClient:
    """A local client of a per-VP -U socket (or any unix stream socket)."""

    def __init__(self, path, timeout=5):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.buf = bytearray()
        self.eof = False

    def send(self, data):
        self.sock.sendall(bytes(data))

    def shutdown_write(self):
        self.sock.shutdown(socket.SHUT_WR)

    def _fill(self, deadline):
        if self.eof:
            raise EOFError('EOF from remoted after %d buffered bytes'
                           % len(self.buf))
        d = _recv_some(self.sock, deadline)
        if not d:
            self.eof = True
            raise EOFError('EOF from remoted')
        self.buf += d

    def recv_exact(self, n, timeout=5):
        deadline = time.monotonic() + timeout
        while len(self.buf) < n:
            try:
                self._fill(deadline)
            except TimeoutError:
                raise TimeoutError('got %d of %d bytes within %.1fs'
                                   % (len(self.buf), n, timeout)) from None
            except EOFError:
                raise EOFError('EOF after %d of %d bytes'
                               % (len(self.buf), n)) from None
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def recv_until_eof(self, timeout=5):
        """All bytes until EOF (AssertionError if no EOF within timeout)."""
        deadline = time.monotonic() + timeout
        while not self.eof:
            try:
                self._fill(deadline)
            except TimeoutError:
                raise AssertionError('no EOF within %.1fs (%d bytes read)'
                                     % (timeout, len(self.buf))) from None
            except EOFError:
                break
        out = bytes(self.buf)
        self.buf.clear()
        return out

    def expect_closed(self, timeout=5):
        return self.recv_until_eof(timeout)

    def expect_silence(self, duration):
        if self.buf:
            raise AssertionError('unexpected bytes: %r' % bytes(self.buf[:64]))
        deadline = time.monotonic() + duration
        try:
            self._fill(deadline)
        except TimeoutError:
            return
        except EOFError:
            raise AssertionError('unexpected EOF') from None
        raise AssertionError('unexpected bytes: %r' % bytes(self.buf[:64]))

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


# ---------------------------------------------------------------------------
# Mux client
# ---------------------------------------------------------------------------

MUX_VP_UPDATE = 0
MUX_VP_DEPART = 1
MUX_GO = 2
MUX_CHANNEL_OPEN = 3
MUX_CHANNEL_CLOSE = 4

MUX_HDR = struct.Struct('>II')

VP_ATTRS = {1: 'name', 2: 'arrival', 3: 'ipv4', 4: 'asn4', 5: 'cc', 6: 'st',
            7: 'place', 8: 'latlong', 9: 'shortname', 10: 'tags', 11: 'iata',
            12: 'ipv6', 13: 'asn6'}
VP_ATTR_NUMS = {v: k for k, v in VP_ATTRS.items()}


def mux_frame(chan, payload):
    payload = bytes(payload)
    return MUX_HDR.pack(chan & U32, len(payload)) + payload


def parse_vp_update(payload, raw=b''):
    """Parse a VP_UPDATE control payload (starting with the u16 type) into
    a dict; raises ValueError if malformed."""
    if len(payload) < 6:
        raise ValueError('VP_UPDATE too short: %s' % bytes(payload).hex())
    t, vid = struct.unpack_from('>HI', payload, 0)
    if t != MUX_VP_UPDATE:
        raise ValueError('not a VP_UPDATE')
    vp = {'id': vid, 'tags': [], 'attr_order': [], 'raw': bytes(raw)}
    off = 6
    while off < len(payload):
        if len(payload) - off < 2:
            raise ValueError('truncated attribute header at %d' % off)
        a = struct.unpack_from('>H', payload, off)[0]
        off += 2
        end = payload.find(b'\0', off)
        if end < 0:
            raise ValueError('attribute %d value not NUL-terminated' % a)
        val = bytes(payload[off:end]).decode('utf-8', 'surrogateescape')
        off = end + 1
        vp['attr_order'].append(a)
        name = VP_ATTRS.get(a, 'attr%d' % a)
        if name == 'tags':
            vp['tags'].append(val)
        else:
            vp[name] = val
    return vp


class MuxClient:
    """A client of the -M mux socket (PROTOCOL.md section 5).

    path: the unix socket, or a (host, port) tuple for the TCP mux
    (-O mux-listen).  With SCR_MUX_TCP=1 a unix path of a Daemon that also
    listens on TCP is replaced by its TCP address.  source: local address
    to bind before a TCP connect (e.g. '127.0.0.2')."""

    def __init__(self, path, timeout=5, source=None):
        self.path = path
        if not isinstance(path, tuple) and path in _mux_tcp_by_path:
            path = _mux_tcp_by_path[path]
        if isinstance(path, tuple):
            fam = socket.AF_INET6 if ':' in path[0] else socket.AF_INET
            self.sock = socket.socket(fam, socket.SOCK_STREAM)
            self.sock.settimeout(timeout)
            if source is not None:
                self.sock.bind((source, 0))
            self.sock.connect(path)
        else:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(timeout)
            self.sock.connect(path)
        self.buf = bytearray()
        self.eof = False
        self.backlog = collections.deque()
        self.chan_data = collections.defaultdict(bytearray)

    # -- sending -----------------------------------------------------------

    def send_raw(self, data):
        self.sock.sendall(bytes(data))

    def send_frame(self, chan, payload):
        self.send_raw(mux_frame(chan, payload))

    def send_control(self, mtype, body=b''):
        self.send_frame(0, struct.pack('>H', mtype) + bytes(body))

    def open(self, vp_id, chan):
        self.send_control(MUX_CHANNEL_OPEN, struct.pack('>II', vp_id, chan))

    def send(self, chan, data):
        self.send_frame(chan, data)

    def shutdown_write(self):
        self.sock.shutdown(socket.SHUT_WR)

    # -- receiving ---------------------------------------------------------

    def recv_raw_frame(self, timeout=5):
        """Next frame as (chan, payload, raw_bytes)."""
        deadline = time.monotonic() + timeout
        while True:
            if len(self.buf) >= 8:
                chan, ln = MUX_HDR.unpack_from(self.buf, 0)
                if len(self.buf) >= 8 + ln:
                    raw = bytes(self.buf[:8 + ln])
                    del self.buf[:8 + ln]
                    return chan, raw[8:], raw
            if self.eof:
                raise EOFError('mux connection closed (%d bytes pending)'
                               % len(self.buf))
            d = _recv_some(self.sock, deadline)
            if not d:
                self.eof = True
                continue
            self.buf += d

    def _decode(self, chan, payload, raw):
        if chan != 0:
            return ('data', chan, payload)
        if len(payload) < 2:
            raise AssertionError('mux control frame with len < 2: %s'
                                 % raw.hex())
        t = struct.unpack_from('>H', payload, 0)[0]
        if t == MUX_VP_UPDATE:
            try:
                return ('update', parse_vp_update(payload, raw))
            except ValueError as e:
                raise AssertionError('bad VP_UPDATE %s: %s' % (raw.hex(), e))
        if t == MUX_VP_DEPART:
            if len(payload) != 6:
                raise AssertionError('bad VP_DEPART: %s' % raw.hex())
            return ('depart', struct.unpack_from('>I', payload, 2)[0])
        if t == MUX_GO:
            if len(payload) != 2:
                raise AssertionError('bad GO: %s' % raw.hex())
            return ('go',)
        if t == MUX_CHANNEL_CLOSE:
            if len(payload) != 6:
                raise AssertionError('bad CHANNEL_CLOSE: %s' % raw.hex())
            return ('close', struct.unpack_from('>I', payload, 2)[0])
        raise AssertionError('unknown mux control type %d: %s' % (t, raw.hex()))

    def recv(self, timeout=5):
        """Next event: ('update', vpdict) | ('depart', id) | ('close', chan)
        | ('data', chan, bytes) | ('go',)."""
        if self.backlog:
            return self.backlog.popleft()
        chan, payload, raw = self.recv_raw_frame(timeout)
        return self._decode(chan, payload, raw)

    def read_burst(self, timeout=5):
        """Read the initial burst: VP_UPDATEs until GO; returns the list
        of VP dicts.  Anything else before GO is an AssertionError."""
        deadline = time.monotonic() + timeout
        vps = []
        while True:
            rem = deadline - time.monotonic()
            if rem <= 0:
                raise TimeoutError('no GO within %.1fs' % timeout)
            chan, payload, raw = self.recv_raw_frame(rem)
            if chan != 0:
                raise AssertionError('data frame before GO: %s' % raw[:32].hex())
            ev = self._decode(chan, payload, raw)
            if ev[0] == 'go':
                return vps
            if ev[0] != 'update':
                raise AssertionError('unexpected %r before GO' % (ev,))
            vps.append(ev[1])

    def expect(self, kind, timeout=5):
        """Next event of the given kind; other events are kept in order in
        the backlog (data events are also appended to chan_data)."""
        deadline = time.monotonic() + timeout
        skipped = []
        try:
            while True:
                rem = deadline - time.monotonic()
                if rem <= 0:
                    raise TimeoutError('no %s event within %.1fs' % (kind,
                                                                     timeout))
                chan, payload, raw = self.recv_raw_frame(rem)
                ev = self._decode(chan, payload, raw)
                if ev[0] == kind:
                    return ev
                skipped.append(ev)
        finally:
            self.backlog.extend(skipped)

    def recv_channel_data(self, chan, nbytes, timeout=5):
        """Exactly nbytes of data on chan; other events go to the backlog."""
        deadline = time.monotonic() + timeout
        buf = self.chan_data[chan]
        # drain data events already in the backlog
        keep = collections.deque()
        for ev in self.backlog:
            if ev[0] == 'data' and ev[1] == chan:
                buf += ev[2]
            else:
                keep.append(ev)
        self.backlog = keep
        while len(buf) < nbytes:
            rem = deadline - time.monotonic()
            if rem <= 0:
                raise TimeoutError('got %d of %d bytes on mux channel %d'
                                   % (len(buf), nbytes, chan))
            c, payload, raw = self.recv_raw_frame(rem)
            ev = self._decode(c, payload, raw)
            if ev[0] == 'data' and ev[1] == chan:
                buf += ev[2]
            else:
                self.backlog.append(ev)
        out = bytes(buf[:nbytes])
        del buf[:nbytes]
        return out

    def expect_closed(self, timeout=5):
        """Assert remoted closes the mux connection within timeout."""
        if self.eof:
            return b''
        got = wait_closed(self.sock, timeout)
        self.eof = True
        return got

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


# ---------------------------------------------------------------------------
# scamper control text protocol helpers (PROTOCOL.md 3.4)
# ---------------------------------------------------------------------------

WARTS_MAGIC = 0x1205
WARTS_LIST = 1
WARTS_CYCLE_START = 2
WARTS_CYCLE_DEF = 3
WARTS_CYCLE_STOP = 4
WARTS_ADDR = 5
WARTS_TRACE = 6
WARTS_PING = 7


def uuencode(data):
    """uuencode as scamper does: 45-byte lines, backtick for zero, then a
    terminating "`\\n" line; no begin/end lines."""
    data = bytes(data)
    out = bytearray()
    for off in range(0, len(data), 45):
        out += binascii.b2a_uu(data[off:off + 45], backtick=True)
    out += b'`\n'
    return bytes(out)


def uudecode(text):
    """Decode scamper's uuencoding (inverse of uuencode)."""
    out = bytearray()
    for line in bytes(text).split(b'\n'):
        if not line:
            continue
        out += binascii.a2b_uu(line)
    return bytes(out)


def warts_records(data):
    """Split decoded warts bytes into a list of (type, body).  Raises
    ValueError on a bad magic or truncated record."""
    out = []
    off = 0
    data = bytes(data)
    while off < len(data):
        if len(data) - off < 8:
            raise ValueError('truncated warts header at %d' % off)
        magic, t, ln = struct.unpack_from('>HHI', data, off)
        if magic != WARTS_MAGIC:
            raise ValueError('bad warts magic 0x%04x at %d' % (magic, off))
        if len(data) - off - 8 < ln:
            raise ValueError('truncated warts record at %d' % off)
        out.append((t, data[off + 8:off + 8 + ln]))
        off += 8 + ln
    return out


class DataBlock(collections.namedtuple('DataBlock', 'header data')):
    """One DATA block: the header line (str, without newline) and the
    decoded bytes.  .types lists the warts record types, .type the first."""
    __slots__ = ()

    @property
    def types(self):
        return [t for t, _ in warts_records(self.data)]

    @property
    def type(self):
        ts = self.types
        return ts[0] if ts else None

    @property
    def task_id(self):
        m = re.search(r'\bid-(\d+)', self.header)
        return int(m.group(1)) if m else None


def parse_control_stream(stream, strict=False):
    """Split a scamper control text stream into items: ('line', text) for
    ordinary lines and ('data', DataBlock) for DATA blocks.  An incomplete
    trailing line or block is ignored unless strict (ValueError)."""
    s = bytes(stream)
    items = []
    off = 0
    while off < len(s):
        nl = s.find(b'\n', off)
        if nl < 0:
            if strict:
                raise ValueError('incomplete line at %d' % off)
            break
        line = s[off:nl].rstrip(b'\r').decode('ascii', 'replace')
        m = re.match(r'DATA (\d+)(\s.*)?$', line)
        if m:
            n = int(m.group(1))
            start = nl + 1
            if len(s) - start < n:
                if strict:
                    raise ValueError('incomplete DATA block at %d' % off)
                break
            items.append(('data', DataBlock(line, uudecode(s[start:start + n]))))
            off = start + n
        else:
            items.append(('line', line))
            off = nl + 1
    return items


def parse_data_blocks(stream, strict=False):
    """List of DataBlock(header_line, decoded_bytes) for each complete
    `DATA <len>[ id-N]` block in the stream."""
    return [it[1] for it in parse_control_stream(stream, strict)
            if it[0] == 'data']


def data_block(data, task_id=None):
    """Encode warts bytes as scamper would send them on a channel."""
    enc = uuencode(data)
    hdr = 'DATA %d' % len(enc)
    if task_id is not None:
        hdr += ' id-%d' % task_id
    return hdr.encode() + b'\n' + enc


def warts_record(rtype, body=b''):
    return struct.pack('>HHI', WARTS_MAGIC, rtype, len(body)) + bytes(body)


# ---------------------------------------------------------------------------
# HTTP (the -O metrics endpoint)
# ---------------------------------------------------------------------------

HttpResponse = collections.namedtuple('HttpResponse',
                                      'version status headers body raw')


class HttpConn:
    """A raw HTTP/1.x client connection: send bytes, read responses
    (Content-Length, chunked, or up to EOF), detect the close."""

    def __init__(self, port, host='127.0.0.1', timeout=5):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.buf = bytearray()
        self.eof = False

    def send(self, data):
        self.sock.sendall(data)

    def request(self, path, method='GET', version='1.1', headers=()):
        hdr = '%s %s HTTP/%s\r\nHost: localhost\r\n' % (method, path,
                                                         version)
        for h in headers:
            hdr += h + '\r\n'
        self.send((hdr + '\r\n').encode())

    def _fill(self, deadline):
        if self.eof:
            return False
        rem = deadline - time.monotonic()
        if rem <= 0:
            raise TimeoutError('no HTTP response in time; have %r'
                               % bytes(self.buf[:200]))
        self.sock.settimeout(rem)
        try:
            d = self.sock.recv(65536)
        except ConnectionResetError:
            d = b''
        if not d:
            self.eof = True
            return False
        self.buf += d
        return True

    def _until(self, sep, deadline):
        while True:
            i = self.buf.find(sep)
            if i >= 0:
                out = bytes(self.buf[:i])
                del self.buf[:i + len(sep)]
                return out
            if not self._fill(deadline):
                raise AssertionError('EOF before %r; have %r' %
                                     (sep, bytes(self.buf[:200])))

    def _exact(self, n, deadline):
        while len(self.buf) < n:
            if not self._fill(deadline):
                raise AssertionError('EOF after %d of %d bytes' %
                                     (len(self.buf), n))
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def response(self, head_only=False, timeout=10):
        deadline = time.monotonic() + timeout
        raw_head = self._until(b'\r\n\r\n', deadline)
        lines = raw_head.decode('latin-1').split('\r\n')
        version, status = lines[0].split(' ', 2)[:2]
        headers = {}
        for line in lines[1:]:
            k, v = line.split(':', 1)
            headers[k.strip().lower()] = v.strip()
        body = b''
        if head_only:
            pass
        elif 'content-length' in headers:
            body = self._exact(int(headers['content-length']), deadline)
        elif headers.get('transfer-encoding') == 'chunked':
            parts = []
            while True:
                n = int(self._until(b'\r\n', deadline), 16)
                if n == 0:
                    assert self._until(b'\r\n', deadline) == b''
                    break
                parts.append(self._exact(n, deadline))
                assert self._exact(2, deadline) == b'\r\n'
            body = b''.join(parts)
        else:
            while self._fill(deadline):
                pass
            body = bytes(self.buf)
            self.buf.clear()
        return HttpResponse(version, int(status), headers, body, raw_head)

    def closed(self, timeout=5):
        """True once the server closed (anything unread is an error)."""
        deadline = time.monotonic() + timeout
        while self._fill(deadline):
            pass
        return self.eof

    def close(self):
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def http_get(port, path, method='GET', host='127.0.0.1', timeout=10,
             headers=('Connection: close',)):
    """One request on a fresh connection; returns an HttpResponse."""
    with HttpConn(port, host, timeout) as c:
        c.request(path, method, headers=headers)
        return c.response(head_only=(method == 'HEAD'), timeout=timeout)


def parse_prom(text):
    """Prometheus text format -> {(name, ((label, value), ...)): float}
    (labels sorted); also checks every sample follows its TYPE line."""
    out = {}
    typed = set()
    for line in text.splitlines():
        if line.startswith('# TYPE '):
            typed.add(line.split()[2])
            continue
        if not line or line.startswith('#'):
            continue
        m = re.match(r'([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (\S+)$', line)
        assert m, 'bad sample line %r' % line
        labels = tuple(sorted(re.findall(r'(\w+)="([^"]*)"',
                                         m.group(3) or '')))
        assert m.group(1) in typed or m.group(1).rsplit('_', 1)[0] in typed, \
            line
        out[(m.group(1), labels)] = float(m.group(4))
    return out


def prom_value(metrics, name, **labels):
    """A sample's value, or None."""
    return metrics.get((name, tuple(sorted(labels.items()))))


# ---------------------------------------------------------------------------
# unittest helpers
# ---------------------------------------------------------------------------


def main():
    """unittest.main with verbosity 2; exit status non-zero on failure."""
    unittest.main(verbosity=2)


# ---------------------------------------------------------------------------
# Service manager and syslog receivers (issue 10)
# ---------------------------------------------------------------------------


class DgramReceiver:
    """A unix datagram socket bound at path, as a test-owned NOTIFY_SOCKET
    or /dev/log.  recv() returns one message as str, or None on timeout;
    wait_for(pred) collects messages until pred(msg) holds."""

    def __init__(self, path):
        self.path = path
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        os.chmod(path, 0o666)
        self.seen = []

    def recv(self, timeout=10):
        self.sock.settimeout(max(timeout, 0.001))
        try:
            data = self.sock.recv(65536)
        except socket.timeout:
            return None
        msg = data.decode('utf-8', 'replace')
        self.seen.append(msg)
        return msg

    def wait_for(self, pred, timeout=10, what='message'):
        """Receive until pred(msg); return msg.  Raises TimeoutError."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError('no %s within %.1fs; got %r'
                                   % (what, timeout, self.seen[-20:]))
            msg = self.recv(left)
            if msg is not None and pred(msg):
                return msg

    def close(self):
        self.sock.close()
        try:
            os.unlink(self.path)
        except OSError:
            pass


# one syslog datagram as syslog(3) writes it to /dev/log
SYSLOG_RX = re.compile(r'^<(\d+)>([A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d) '
                       r'([^\[:]+)\[(\d+)\]: (.*)$', re.S)


def parse_syslog(msg):
    """(facility, severity, ident, pid, text) of a syslog datagram, or
    None if it is not one."""
    m = SYSLOG_RX.match(msg)
    if not m:
        return None
    pri = int(m.group(1))
    return (pri >> 3, pri & 7, m.group(3), int(m.group(4)), m.group(5))


def read_pidfile(path):
    """The pid in a complete "<pid>\\n" pid file, or None."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    return int(text) if re.fullmatch(r'\d+\n', text) else None


# ---------------------------------------------------------------------------
# PROXY protocol headers (HAProxy's proxy-protocol.txt), as a balancer in
# front of sc_remoted -O proxy-from sends them
# ---------------------------------------------------------------------------

PROXY_V2_SIG = b'\r\n\r\n\x00\r\nQUIT\n'


def proxy_v1(src, dst):
    """'PROXY TCP4|TCP6 ...' line for (host, port) tuples src and dst."""
    fam = 'TCP6' if ':' in src[0] else 'TCP4'
    return ('PROXY %s %s %s %d %d\r\n' % (fam, src[0], dst[0], src[1],
                                          dst[1])).encode()


def proxy_v2(src=None, dst=None, local=False, tlvs=b'', fam=None):
    """A v2 header: PROXY over TCP for src/dst (host, port) tuples, or
    LOCAL (a health check) when local; tlvs is appended raw."""
    if local:
        return PROXY_V2_SIG + b'\x20\x00' + struct.pack('>H', len(tlvs)) + tlvs
    if ':' in src[0]:
        af, f = socket.AF_INET6, 0x21
    else:
        af, f = socket.AF_INET, 0x11
    body = (socket.inet_pton(af, src[0]) + socket.inet_pton(af, dst[0]) +
            struct.pack('>HH', src[1], dst[1]) + tlvs)
    return (PROXY_V2_SIG + bytes([0x21, f if fam is None else fam]) +
            struct.pack('>H', len(body)) + body)


def proxy_factory(host, port, header, source=None):
    """A FakeScamper sock_factory: connect (from source, if given) and
    send header first, as a balancer does."""
    def make():
        kw = {'source_address': (source, 0)} if source else {}
        s = socket.create_connection((host, port), timeout=5, **kw)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(header)
        return s
    return make


class ReconnectingVP(threading.Thread):
    """A fake scamper -R that stays connected the way scamper does, in a
    thread of its own: on losing its connection it waits `delay` seconds
    (a (lo, hi) range; scamper waits 30-61 s, tests scale it down),
    reconnects and sends MASTER_RES with its magic; on MASTER_OK it goes
    on, on MASTER_REJ it draws a new magic, drops its session, waits again
    and starts over with MASTER_NEW.  In GO it answers every line received
    on a channel with "echo NAME LINE\\n" and sends a KEEPALIVE every
    `keepalive` seconds.  source: local address to connect from.

    events: list of (time.monotonic(), kind, detail), kind one of 'go'
    (new session; detail the MASTER_ID alias), 'resumed', 'rej', 'lost'
    (detail: why).  connected: an Event set while in GO.  stop() ends the
    thread and closes the socket."""

    def __init__(self, host, port, name, source=None, delay=(0.2, 1.0),
                 keepalive=20):
        super().__init__(daemon=True, name='vp-%s' % name)
        self.source = source
        self.delay = delay
        self.keepalive = keepalive
        self.fs = FakeScamper(port, name=name, host=host,
                              sock_factory=self._connect)
        self.events = []
        self.lock = threading.Lock()
        self.connected = threading.Event()
        self.stopping = threading.Event()
        self.alias = None
        self.resumable = False

    def _connect(self):
        kw = {'source_address': (self.source, 0)} if self.source else {}
        s = socket.create_connection((self.fs.host, self.fs.port),
                                     timeout=5, **kw)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return s

    def _event(self, kind, detail=None):
        with self.lock:
            self.events.append((time.monotonic(), kind, detail))

    def events_since(self, t, kind=None):
        with self.lock:
            return [e for e in self.events
                    if e[0] >= t and (kind is None or e[1] == kind)]

    def _new_session(self):
        fs = self.fs
        fs.chan_data.clear()
        fs.new_channels.clear()
        fs.channels_seen = []
        fs.fins = set()
        fs.send_new()

    def _attempt(self):
        """One connection: MASTER_RES if there is a session to resume,
        else MASTER_NEW; then serve until the connection is lost."""
        fs = self.fs
        fs.close()
        fs.rejected = False
        fs.connect()
        if self.resumable:
            fs.send_res()
        else:
            self._new_session()
        f = fs.recv_frame(10)
        if f.type == MASTER_REJ:
            fs.magic = os.urandom(8)
            self.resumable = False
            self._event('rej')
            return
        if f.type == MASTER_OK:
            self._event('resumed')
        else:
            self.alias = fs.vp_alias
            self.resumable = True
            self._event('go', fs.vp_alias)
        self.connected.set()
        try:
            self._serve()
        finally:
            self.connected.clear()

    def _serve(self):
        fs = self.fs
        last_ka = time.monotonic()
        while not self.stopping.is_set():
            try:
                fs.recv_frame(0.3)
            except TimeoutError:
                pass
            for ch, buf in list(fs.chan_data.items()):
                while b'\n' in buf:
                    i = buf.index(b'\n')
                    line = bytes(buf[:i])
                    del buf[:i + 1]
                    fs.send_data(ch, b'echo %s %s\n' % (fs.name.encode(),
                                                        line))
            if time.monotonic() - last_ka >= self.keepalive:
                fs.send_keepalive()
                last_ka = time.monotonic()

    def run(self):
        while not self.stopping.is_set():
            try:
                self._attempt()
            except (OSError, EOFError, TimeoutError, AssertionError) as e:
                if not self.stopping.is_set():
                    self._event('lost', str(e)[:200])
            if self.stopping.wait(random.uniform(*self.delay)):
                break
        self.fs.close()

    def stop(self):
        self.stopping.set()
        self.join(10)
