"""e2e -- helpers for the end-to-end tests that drive the real scamper.

Python 3 standard library only.  Used by tests/e2e/test_scamper_*.py.

* require_env()   -- exit 77 (automake SKIP) unless scamper and friends are
                     installed and we are root (scamper needs raw sockets)
* start_daemon    -- scr.Daemon (tests/lib/scr.py) tied to a TestCase
* Scamper         -- a `scamper -R host:port` process in its own process
                     group; stop() always kills the whole group
* Relay           -- a TCP relay 127.0.0.1:port -> daemon port whose
                     connections can be cut on demand
* ControlClient   -- a raw client of a per-VP unix socket speaking the
                     scamper control text protocol
* run_tool / warts2text / blocks_to_text -- run sc_attach and friends;
                     turn DATA blocks into a warts file and its text
* run_main        -- unittest runner that exits 77 when everything skipped

Every process started here is killed by the TestCase cleanups, and also
at exit or on SIGTERM/SIGINT/SIGHUP of the test process.
"""

import atexit
import os
import re
import select
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, '..', 'lib'))

import scr  # noqa: E402  (path set up above)

SKIP = 77


def _tool(env, name):
    path = os.environ.get(env)
    if path:
        return path
    return shutil.which(name) or ''


SCAMPER = _tool('SCAMPER', 'scamper')
SC_ATTACH = _tool('SC_ATTACH', 'sc_attach')
SC_WARTS2TEXT = _tool('SC_WARTS2TEXT', 'sc_warts2text')
SC_WARTSDUMP = _tool('SC_WARTSDUMP', 'sc_wartsdump')


# the VP socket of a scamper started with -M NAME, connecting from 127.0.0.1
def vp_pattern(name):
    return '%s-127.0.0.1:*' % name


def vp_name_re(name):
    return re.compile(r'^%s-127\.0\.0\.1:(\d+)$' % re.escape(name))


_scamper_version = None


def scamper_version():
    """scamper's version as an int (e.g. 20211212), 0 if unknown."""
    global _scamper_version
    if _scamper_version is None:
        _scamper_version = 0
        try:
            p = subprocess.run([SCAMPER, '-v'], stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, timeout=10)
            m = re.search(rb'version (\d{8})', p.stdout)
            if m:
                _scamper_version = int(m.group(1))
        except (OSError, subprocess.TimeoutExpired):
            pass
    return _scamper_version


def require_env(tools=('scamper',)):
    """Exit with status 77 (SKIP) unless the listed tools are installed
    and we run as root.  Exit 99 (hard error) if the daemon binary under
    test does not exist."""
    paths = {'scamper': SCAMPER, 'sc_attach': SC_ATTACH,
             'sc_warts2text': SC_WARTS2TEXT, 'sc_wartsdump': SC_WARTSDUMP}
    reasons = []
    for t in tools:
        p = paths[t]
        if not p or not os.access(p, os.X_OK):
            reasons.append('%s is not installed' % t)
    if os.geteuid() != 0:
        reasons.append('not root (scamper needs raw sockets to ping)')
    if reasons:
        print('SKIP: ' + '; '.join(reasons))
        sys.stdout.flush()
        sys.exit(SKIP)
    if not os.access(scr.SC_REMOTED, os.X_OK):
        print('ERROR: daemon under test %r is not an executable '
              '(set SC_REMOTED)' % scr.SC_REMOTED)
        sys.stdout.flush()
        sys.exit(99)


def banner(title):
    print('\n===== %s =====' % title)
    sys.stdout.flush()


def show(title, text):
    banner(title)
    text = text if text.endswith('\n') or not text else text + '\n'
    sys.stdout.write(text if text else '(nothing)\n')
    sys.stdout.flush()


# ---------------------------------------------------------------------------
# process bookkeeping: nothing we start may outlive the test, even when the
# test process itself is terminated (SIGTERM/SIGINT/SIGHUP) or exits early
# ---------------------------------------------------------------------------

_live = []


def _kill_all():
    for obj in list(_live):
        try:
            obj.kill_now()
        except Exception:  # noqa: BLE001 -- best effort during teardown
            pass


def _on_signal(sig, frame):
    _kill_all()
    signal.signal(sig, signal.SIG_DFL)
    os.kill(os.getpid(), sig)


atexit.register(_kill_all)
for _sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    signal.signal(_sig, _on_signal)


class _DaemonGuard:
    def __init__(self, d):
        self.d = d

    def kill_now(self):
        if self.d.alive():
            self.d.proc.kill()


def start_daemon(test, **kw):
    """scr.Daemon(**kw), stopped by the TestCase cleanup (and on abnormal
    exit); the log tail is printed when it stops.

    The cleanup fails the test if the daemon died during the test, or (for
    this project's daemon, which handles SIGTERM) if it does not exit 0 on
    SIGTERM, or if its log shows a sanitizer report."""
    d = scr.Daemon(**kw)
    guard = _DaemonGuard(d)
    _live.append(guard)

    def stop():
        died = None if d.alive() else d.proc.returncode
        try:
            if died is None and not scr.is_legacy():
                rc = d.stop(timeout=10)
            else:
                d.kill()
                rc = 0
            log = d.log()
        finally:
            d.__exit__(None, None, None)
            _live.remove(guard)
        show('sc_remoted log (tail) for %s' % test.id(),
             '\n'.join(log.splitlines()[-30:]))
        if died is not None:
            raise AssertionError('sc_remoted died during the test (status '
                                 '%s); log:\n%s' % (died, log[-3000:]))
        if rc != 0:
            raise AssertionError('sc_remoted exited %s on SIGTERM; log:\n%s'
                                 % (rc, log[-3000:]))
        m = re.search(r'^.*(Sanitizer|runtime error).*$', log, re.M)
        if m:
            raise AssertionError('sanitizer report in the sc_remoted log: %s'
                                 '\n%s' % (m.group(0), log[-3000:]))
    test.addCleanup(stop)
    d.wait_listening()
    return d


# ---------------------------------------------------------------------------
# scamper
# ---------------------------------------------------------------------------


class Scamper:
    """scamper -R host:port [-M name] as its own session / process group.

    scamper forks a privilege-separation helper; both processes share the
    group, so stop() (SIGTERM, then SIGKILL, to the group) leaves nothing
    behind.  stdout and stderr go to a file: output()."""

    def __init__(self, port, name=None, host='127.0.0.1', extra=()):
        self.tmp = tempfile.mkdtemp(prefix='e2e-scamper-')
        self.out_path = os.path.join(self.tmp, 'scamper.out')
        self.args = [SCAMPER, '-R', '%s:%d' % (host, port)]
        if name:
            self.args += ['-M', name]
        self.args += list(extra)
        self._out = open(self.out_path, 'wb')
        self.proc = subprocess.Popen(self.args, stdin=subprocess.DEVNULL,
                                     stdout=self._out,
                                     stderr=subprocess.STDOUT,
                                     cwd=self.tmp, start_new_session=True)
        self.pgid = self.proc.pid
        _live.append(self)

    def kill_now(self):
        self._killpg(signal.SIGKILL)

    def alive(self):
        return self.proc.poll() is None

    def output(self):
        try:
            with open(self.out_path, 'rb') as f:
                return f.read().decode('utf-8', 'replace')
        except OSError:
            return ''

    def _killpg(self, sig):
        try:
            os.killpg(self.pgid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def stop(self):
        """Terminate the whole process group; idempotent."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self._killpg(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                pass
        # the helper may outlive the leader; SIGKILL whatever is left
        self._killpg(signal.SIGKILL)
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            pass
        try:
            self._out.close()
        except OSError:
            pass
        if self in _live:
            _live.remove(self)

    def cleanup(self):
        self.stop()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.cleanup()
        return False


def start_vp(test, daemon, name, port=None, timeout=20, extra=()):
    """Start scamper towards daemon (or towards port, e.g. a relay) with
    monitor name `name`; wait (bounded) for its per-VP socket; register
    the cleanup on the TestCase.  Returns (scamper, socket_path)."""
    sc = Scamper(port if port is not None else daemon.port, name,
                 extra=extra)
    test.addCleanup(sc.cleanup)
    path = None
    if daemon.udir:
        deadline = time.monotonic() + timeout
        while path is None:
            try:
                path = daemon.wait_socket(vp_pattern(name), timeout=0.5)
            except TimeoutError:
                pass
            if path is None:
                if not sc.alive():
                    test.fail('scamper exited (status %s) before its VP '
                              'socket appeared; scamper said:\n%s\n'
                              'daemon log:\n%s'
                              % (sc.proc.returncode, sc.output(),
                                 daemon.log()[-3000:]))
                if time.monotonic() >= deadline:
                    test.fail('no VP socket %r after %ds (have %r); scamper '
                              'said:\n%s\ndaemon log:\n%s'
                              % (vp_pattern(name), timeout,
                                 daemon.list_sockets(), sc.output(),
                                 daemon.log()[-3000:]))
    return sc, path


# ---------------------------------------------------------------------------
# TCP relay that can be cut
# ---------------------------------------------------------------------------


class Relay:
    """Listen on 127.0.0.1:<ephemeral>; relay each accepted connection to
    127.0.0.1:upstream_port.  cut() aborts every current connection (both
    sides); new connections are still accepted afterwards."""

    def __init__(self, upstream_port, host='127.0.0.1'):
        self.upstream = (host, upstream_port)
        self.ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.ls.bind((host, 0))
        self.ls.listen(16)
        self.port = self.ls.getsockname()[1]
        self.lock = threading.Lock()
        self.pairs = []
        self.accepted = 0
        self.events = []
        self.t0 = time.monotonic()
        self.closing = False
        self.threads = []
        t = threading.Thread(target=self._accept_loop, daemon=True)
        t.start()
        self.threads.append(t)

    def _event(self, msg):
        with self.lock:
            self.events.append('%7.2f %s' % (time.monotonic() - self.t0, msg))

    def _accept_loop(self):
        while not self.closing:
            try:
                c, addr = self.ls.accept()
            except OSError:
                return
            try:
                u = socket.create_connection(self.upstream, timeout=5)
                u.settimeout(None)
            except OSError as e:
                self._event('upstream connect failed: %s' % e)
                c.close()
                continue
            with self.lock:
                self.accepted += 1
                self.pairs.append((c, u))
            self._event('connection %d from %s:%d, upstream local port %d'
                        % (self.accepted, addr[0], addr[1],
                           u.getsockname()[1]))
            t = threading.Thread(target=self._pump, args=(c, u), daemon=True)
            t.start()
            self.threads.append(t)

    def _pump(self, a, b):
        sel = selectors.DefaultSelector()
        sel.register(a, selectors.EVENT_READ, b)
        sel.register(b, selectors.EVENT_READ, a)
        why = 'closed'
        try:
            while not self.closing:
                for key, _ in sel.select(0.5):
                    data = key.fileobj.recv(65536)
                    if not data:
                        raise EOFError('EOF from %s' %
                                       ('scamper' if key.fileobj is a
                                        else 'daemon'))
                    key.data.sendall(data)
        except (OSError, EOFError) as e:
            why = str(e)
        finally:
            sel.close()
            for s in (a, b):
                try:
                    s.close()
                except OSError:
                    pass
            with self.lock:
                if (a, b) in self.pairs:
                    self.pairs.remove((a, b))
            self._event('pair finished: %s' % why)

    def connections(self):
        with self.lock:
            return len(self.pairs)

    def cut(self):
        """Abort every current connection; return how many were cut."""
        with self.lock:
            pairs = list(self.pairs)
        for a, b in pairs:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        self._event('cut %d connection(s)' % len(pairs))
        return len(pairs)

    def close(self):
        self.closing = True
        try:
            self.ls.close()
        except OSError:
            pass
        self.cut()
        for t in self.threads:
            t.join(2)


# ---------------------------------------------------------------------------
# raw control-protocol client of a per-VP unix socket
# ---------------------------------------------------------------------------


class ControlClient:
    """A unix stream client that accumulates everything it receives."""

    def __init__(self, path, timeout=10):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.sock.setblocking(False)
        self.buf = bytearray()
        self.eof = False
        self.eof_at = None
        self.log = []          # (monotonic time, bytes) per recv
        self.t0 = time.monotonic()

    def send(self, data):
        self.sock.setblocking(True)
        try:
            self.sock.sendall(data)
        except OSError as e:
            raise AssertionError('sending %r on %s failed: %s; received so '
                                 'far:\n%s' % (data, self.path, e,
                                               self.text()))
        finally:
            self.sock.setblocking(False)

    def poll(self, timeout):
        """Read whatever arrives within timeout (stop early on data or
        EOF).  Returns the number of new bytes."""
        if self.eof:
            return 0
        r, _, _ = select_read(self.sock, timeout)
        if not r:
            return 0
        try:
            d = self.sock.recv(65536)
        except BlockingIOError:
            return 0
        except ConnectionResetError:
            d = b''
        if not d:
            self.eof = True
            self.eof_at = time.monotonic()
            return 0
        self.log.append((time.monotonic(), d))
        self.buf += d
        return len(d)

    def read_until(self, pred, timeout, what='condition'):
        """Read until pred(bytes(buf)) is true; AssertionError on timeout
        or on EOF first."""
        deadline = time.monotonic() + timeout
        while not pred(bytes(self.buf)):
            if self.eof:
                raise AssertionError('EOF before %s; received:\n%s'
                                     % (what, self.text()))
            rem = deadline - time.monotonic()
            if rem <= 0:
                raise AssertionError('no %s within %.0fs; received:\n%s'
                                     % (what, timeout, self.text()))
            self.poll(min(rem, 0.5))

    def read_to_eof(self, timeout):
        deadline = time.monotonic() + timeout
        while not self.eof:
            rem = deadline - time.monotonic()
            if rem <= 0:
                raise AssertionError('no EOF within %.0fs; received:\n%s'
                                     % (timeout, self.text()))
            self.poll(min(rem, 0.5))
        return bytes(self.buf)

    def text(self):
        return bytes(self.buf).decode('ascii', 'replace')

    def lines(self):
        """The non-DATA lines received so far, in order."""
        return [it[1] for it in scr.parse_control_stream(self.buf)
                if it[0] == 'line']

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


def select_read(sock, timeout):
    return select.select([sock], [], [], max(0.0, timeout))


def has_line(line):
    pat = re.compile(rb'(^|\n)' + re.escape(line.encode()) + rb'\n')
    return lambda buf: pat.search(buf) is not None


# ---------------------------------------------------------------------------
# results
# ---------------------------------------------------------------------------


def list_names(warts_bytes):
    """Names carried by the warts list records (type 1) in a byte string:
    body = list_id u32, list_id_human u32, name NUL-terminated, ..."""
    names = []
    for t, body in scr.warts_records(warts_bytes):
        if t == scr.WARTS_LIST:
            end = body.find(b'\0', 8)
            names.append(body[8:end].decode('ascii', 'replace'))
    return names


def run_tool(args, timeout, cwd=None):
    """Run a command with a timeout; returns CompletedProcess (text).
    On timeout the process is killed and AssertionError raised."""
    try:
        return subprocess.run(args, stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              timeout=timeout, cwd=cwd,
                              universal_newlines=True, errors='replace')
    except subprocess.TimeoutExpired as e:
        raise AssertionError('%s did not finish within %ds; stdout=%r '
                             'stderr=%r' % (' '.join(args), timeout,
                                            e.stdout, e.stderr))


def warts2text(path):
    """sc_warts2text output for a warts file (AssertionError on failure)."""
    p = run_tool([SC_WARTS2TEXT, path], 30)
    if p.returncode != 0:
        raise AssertionError('sc_warts2text %s failed (%d): %s'
                             % (path, p.returncode, p.stderr))
    return p.stdout


def blocks_to_text(blocks, tmpdir, name='blocks.warts'):
    """Write the decoded bytes of DATA blocks as a warts file; return the
    sc_warts2text rendering."""
    path = os.path.join(tmpdir, name)
    with open(path, 'wb') as f:
        for b in blocks:
            f.write(b.data)
    return warts2text(path)


PING_RE = r'^ping \S+ to %s: \d+ byte packets$'
PING_STATS_RE = (r'^--- %s ping statistics ---\n'
                 r'%d packets transmitted, %d packets received, '
                 r'0% packet loss$')
TRACE_RE = r'^traceroute from \S+ to %s\n\s*1\s+%s\s'


def assert_ping_text(test, text, dst='127.0.0.1', count=1):
    test.assertRegex(text, re.compile(PING_RE % re.escape(dst), re.M))
    test.assertRegex(text, re.compile(
        PING_STATS_RE.replace('%s', re.escape(dst)).replace('%d', str(count)),
        re.M))


def assert_trace_text(test, text, dst='127.0.0.1'):
    test.assertRegex(text, re.compile(
        TRACE_RE % (re.escape(dst), re.escape(dst)), re.M))


# ---------------------------------------------------------------------------
# runner
# ---------------------------------------------------------------------------


def run_main():
    """Run the unittest cases of __main__; exit 0 on success, 1 on
    failure, 77 if every test was skipped."""
    prog = unittest.main(verbosity=2, exit=False)
    res = prog.result
    sys.stdout.flush()
    sys.stderr.flush()
    if not res.wasSuccessful():
        sys.exit(1)
    if res.testsRun and len(res.skipped) == res.testsRun:
        sys.exit(SKIP)
    sys.exit(0)
