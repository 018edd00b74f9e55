#!/usr/bin/env python3
"""TLS tests for sc_remoted (-c cert -p key [-C ca] [-O skipnameverification]).

Run:  SC_REMOTED=./sc_remoted PYTHONPATH=tests/lib \\
          python3 tests/tls/test_tls.py -v

Exit status 77 (skip) if the binary was built without OpenSSL.
Certificates are generated at test time by certs.py with the openssl CLI.
The client never sends SNI, like the real scamper.
Set SC_TESTS_QUICK=1 to skip the 30-second accept-timeout test.
"""

import fcntl
import os
import re
import select
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import termios
import threading
import time
import unittest
import warnings

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)
sys.path.insert(1, os.path.join(os.path.dirname(_HERE), 'lib'))

import scr  # noqa: E402
from scr import (Daemon, FakeScamper, UnixClient, MASTER_ID,  # noqa: E402
                 MASTER_REJ, free_port, run_cli, slow)
import certs as certmod  # noqa: E402

CERTS = None           # certmod.CertSet, created in setUpModule
_CERT_TMP = None
BIG = 256 * 1024       # bytes relayed each way in the integrity tests
T = 5                  # default bound for one expected event


# ---------------------------------------------------------------------------
# capability detection
# ---------------------------------------------------------------------------

def tls_support():
    """(True, '') if SC_REMOTED accepts -c/-p, (False, reason) if it was
    built without OpenSSL, (None, reason) if it cannot be run."""
    if os.environ.get('SC_HAVE_OPENSSL') == '0':
        return False, 'built without OpenSSL (SC_HAVE_OPENSSL=0)'
    if not os.path.exists(scr.SC_REMOTED):
        return None, 'sc_remoted binary %r not found' % scr.SC_REMOTED
    try:
        p = subprocess.run([scr.SC_REMOTED, '-?'], stdin=subprocess.DEVNULL,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           timeout=10)
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, 'cannot run %s -?: %s' % (scr.SC_REMOTED, e)
    text = (p.stdout + p.stderr).decode('utf-8', 'replace')
    if not re.search(r'(^|[\s\[])-c[\s\]]', text):
        return False, 'sc_remoted built without TLS (no -c in usage)'
    return True, ''


# ---------------------------------------------------------------------------
# TLS client helpers
# ---------------------------------------------------------------------------

def client_context(client=None, minv=None, maxv=None, verify_server=True,
                   legacy=False):
    """An SSLContext for a scamper-like client.

    client: key of certs.CLIENTS whose certificate/key to present.
    minv/maxv: ssl.TLSVersion bounds.  legacy: allow TLS < 1.2 locally
    (security level 0)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    if verify_server:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(CERTS.ca_cert)
    else:
        ctx.verify_mode = ssl.CERT_NONE
    if legacy:
        ctx.set_ciphers('DEFAULT:@SECLEVEL=0')
    with warnings.catch_warnings():
        # TLS 1.0/1.1 are deprecated in Python >= 3.10
        warnings.simplefilter('ignore', DeprecationWarning)
        if minv is not None:
            ctx.minimum_version = minv
        if maxv is not None:
            ctx.maximum_version = maxv
    if client is not None:
        cert, key = CERTS.clients[client]
        ctx.load_cert_chain(cert, key)
    return ctx


def tls_connect(port, ctx, timeout=T, host='127.0.0.1'):
    """TCP connect + TLS handshake without SNI.  Returns the SSLSocket.
    Handshake failures raise ssl.SSLError / OSError."""
    raw = socket.create_connection((host, port), timeout=timeout)
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s = None
    try:
        s = ctx.wrap_socket(raw, server_hostname=None,
                            do_handshake_on_connect=False)
        s.settimeout(timeout)
        s.do_handshake()
    except BaseException:
        (s or raw).close()
        raise
    return s


def read_until_closed(sock, timeout):
    """Read until the peer closes (EOF, reset or a TLS alert/error).
    Returns the bytes read; AssertionError if still open after timeout."""
    deadline = time.monotonic() + timeout
    got = bytearray()
    while True:
        rem = deadline - time.monotonic()
        if rem <= 0:
            raise AssertionError('connection still open after %.1fs (read %d'
                                 ' bytes: %r)' % (timeout, len(got),
                                                  bytes(got[:32])))
        sock.settimeout(rem)
        try:
            d = sock.recv(65536)
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            continue
        except socket.timeout:
            continue
        except (ssl.SSLError, ConnectionError):
            return bytes(got)
        if not d:
            return bytes(got)
        got += d


def peer_der(sock):
    return sock.getpeercert(binary_form=True)


class Outcome:
    HANDSHAKE_FAILED = 'handshake failed'
    CLOSED = 'closed without reply'
    ACCEPTED = 'accepted (MASTER_ID)'


def try_session(daemon, client=None, name=None, maxv=None, minv=None,
                timeout=T):
    """One TLS connection + MASTER_NEW.  Returns (outcome, detail).

    outcome is Outcome.HANDSHAKE_FAILED, CLOSED or ACCEPTED; a REJ, another
    frame, or a connection that stays open without answering for timeout
    seconds is an AssertionError (no outcome a test may accept)."""
    ctx = client_context(client, minv=minv, maxv=maxv)
    try:
        s = tls_connect(daemon.port, ctx, timeout)
    except (ssl.SSLError, OSError) as e:
        if isinstance(e, socket.timeout):
            raise AssertionError('TLS handshake did not finish within %.1fs'
                                 % timeout)
        return Outcome.HANDSHAKE_FAILED, repr(e)
    fs = FakeScamper(daemon.port, name=name, sock=s)
    try:
        try:
            fs.send_new()
        except (ssl.SSLError, OSError) as e:
            # the server may already have closed (TLS 1.3 alert after the
            # client's Finished)
            return Outcome.CLOSED, 'send failed: %r' % (e,)
        try:
            f = fs.recv_frame(timeout)
        except EOFError as e:
            return Outcome.CLOSED, str(e)
        except TimeoutError:
            raise AssertionError('sc_remoted neither answered MASTER_NEW nor '
                                 'closed within %.1fs (client=%s name=%r)'
                                 % (timeout, client, name))
        if f.type == MASTER_REJ:
            raise AssertionError('MASTER_REJ sent for a MASTER_NEW; failures '
                                 'must close without REJ')
        if f.type != MASTER_ID:
            raise AssertionError('unexpected reply %r' % (f,))
        return Outcome.ACCEPTED, fs.vp_alias
    finally:
        fs.close()


def relay_both_ways(testcase, daemon, fs, uc, chan, nbytes, timeout=20):
    """Send nbytes of random data local->scamper and scamper->local on an
    established channel and check them byte for byte."""
    up = os.urandom(nbytes)
    down = os.urandom(nbytes)

    # local client -> remoted -> fake scamper.  The unix side sends from a
    # thread; the TLS socket is only used from this thread.
    err = []

    def sender():
        try:
            uc.sock.settimeout(timeout)
            uc.sock.sendall(up)
        except Exception as e:  # reported below
            err.append(e)
    th = threading.Thread(target=sender, daemon=True)
    th.start()
    got = fs.recv_channel_data(chan, nbytes, timeout)
    th.join(timeout)
    testcase.assertFalse(th.is_alive(), 'local client send did not finish')
    testcase.assertEqual(err, [])
    testcase.assertTrue(got == up, 'local->scamper data corrupted over TLS')
    fs.wait_acked(timeout)

    # fake scamper -> remoted -> local client.  Read on the unix side from a
    # thread while this thread writes TLS and collects the ACKs.
    result = {}

    def reader():
        try:
            result['data'] = uc.recv_exact(nbytes, timeout)
        except Exception as e:
            result['err'] = e
    th = threading.Thread(target=reader, daemon=True)
    th.start()
    fs.send_data(chan, down)
    fs.wait_acked(timeout)
    th.join(timeout)
    testcase.assertFalse(th.is_alive(), 'local client read did not finish')
    testcase.assertNotIn('err', result, 'local client: %r' %
                         (result.get('err'),))
    testcase.assertTrue(result['data'] == down,
                        'scamper->local data corrupted over TLS')


def open_channel(testcase, daemon, fs, timeout=T):
    """Connect a -U client to fs's socket; return (UnixClient, chan)."""
    path = os.path.join(daemon.udir, fs.expected_socket_name())
    daemon.wait_socket(os.path.basename(path), timeout)
    uc = UnixClient(path, timeout)
    testcase.addCleanup(uc.close)
    chan = fs.wait_channel_new(timeout)
    return uc, chan


_legacy_capable = {}


def local_legacy_capable(version):
    """True if this Python/OpenSSL can complete a handshake at exactly
    `version` (checked against an in-process server)."""
    if version in _legacy_capable:
        return _legacy_capable[version]
    sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ok = False
    try:
        sctx.set_ciphers('DEFAULT:@SECLEVEL=0')
        with warnings.catch_warnings():
            warnings.simplefilter('ignore', DeprecationWarning)
            sctx.minimum_version = version
            sctx.maximum_version = version
        sctx.load_cert_chain(CERTS.server_cert, CERTS.server_key)
        cctx = client_context(minv=version, maxv=version, legacy=True)
    except (ssl.SSLError, ValueError):
        _legacy_capable[version] = False
        return False
    ls = socket.socket()
    ls.bind(('127.0.0.1', 0))
    ls.listen(1)
    ls.settimeout(T)

    def serve():
        try:
            c, _ = ls.accept()
            c.settimeout(T)
            with sctx.wrap_socket(c, server_side=True) as sc:
                sc.recv(1)
        except (OSError, ssl.SSLError):
            pass
    th = threading.Thread(target=serve, daemon=True)
    th.start()
    try:
        s = tls_connect(ls.getsockname()[1], cctx)
        ok = s.version() == {ssl.TLSVersion.TLSv1: 'TLSv1',
                             ssl.TLSVersion.TLSv1_1: 'TLSv1.1'}[version]
        s.close()
    except (ssl.SSLError, OSError):
        ok = False
    th.join(T)
    ls.close()
    _legacy_capable[version] = ok
    return ok


def start_without_tty(d):
    """Start a scr.Daemon in a new session, without a controlling
    terminal, so that a daemon that would prompt on /dev/tty for a key
    passphrase cannot block on the developer's terminal."""
    orig = subprocess.Popen

    def popen(*args, **kw):
        kw.setdefault('start_new_session', True)
        return orig(*args, **kw)
    scr.subprocess.Popen = popen
    try:
        d.start()
    finally:
        scr.subprocess.Popen = orig


# ---------------------------------------------------------------------------
# base class
# ---------------------------------------------------------------------------

class TLSTestCase(unittest.TestCase):
    maxDiff = None

    def tmpdir(self):
        d = tempfile.mkdtemp(prefix='scr-tls-')
        self.addCleanup(shutil.rmtree, d, True)
        return d

    def daemon(self, client_ca=False, extra_args=(), cert=None, key=None,
               **kw):
        tls = {'cert': cert or CERTS.server_cert,
               'key': key or CERTS.server_key}
        if client_ca:
            tls['ca'] = CERTS.ca_cert
        d = Daemon(tls=tls, extra_args=extra_args, start=False, **kw)
        self.addCleanup(d.__exit__, None, None, None)
        start_without_tty(d)
        d.wait_listening()
        return d

    def assert_alive(self, d):
        self.assertTrue(d.alive(), 'sc_remoted died; log:\n%s'
                        % d.log()[-3000:])

    def session(self, d, client=None, name=None, maxv=None, timeout=T):
        """An established session: returns a FakeScamper after MASTER_ID.
        Reconnects (for resume) reuse the same client certificate."""
        def factory():
            return tls_connect(d.port, client_context(client, maxv=maxv),
                               timeout)
        fs = FakeScamper(d.port, name=name, sock_factory=factory)
        self.addCleanup(fs.close)
        fs.handshake(timeout)
        return fs

    def assert_accepted(self, d, client, name, **kw):
        out, detail = try_session(d, client, name, **kw)
        self.assertEqual(out, Outcome.ACCEPTED,
                         'client cert %s, name %r: %s (%s); log:\n%s'
                         % (client, name, out, detail, d.log()[-2000:]))

    def assert_refused(self, d, client, name, **kw):
        before = set(d.list_sockets())
        out, detail = try_session(d, client, name, **kw)
        self.assertNotEqual(out, Outcome.ACCEPTED,
                            'client cert %s, name %r was accepted (alias %s)'
                            % (client, name, detail))
        self.assert_alive(d)
        # no -U socket may have been created for the refused connection
        time.sleep(0.05)
        self.assertEqual(set(d.list_sockets()) - before, set())
        return out


# ---------------------------------------------------------------------------
# -c/-p without client certificates
# ---------------------------------------------------------------------------

class TestServerTLS(TLSTestCase):

    def test_protocol_and_data_integrity(self):
        """MASTER_NEW/ID, CHANNEL_NEW and 256 KiB each way inside TLS,
        with TLS 1.3 (default) and with TLS 1.2."""
        d = self.daemon()
        want = certmod.cert_der(CERTS.server_cert)
        for label, maxv in (('default', None),
                            ('TLS1.2', ssl.TLSVersion.TLSv1_2)):
            with self.subTest(version=label):
                fs = self.session(d, name='vp-%s' % label.replace('.', ''),
                                  maxv=maxv)
                self.assertIn(fs.sock.version(), ('TLSv1.2', 'TLSv1.3'))
                if maxv is not None:
                    self.assertEqual(fs.sock.version(), 'TLSv1.2')
                self.assertEqual(peer_der(fs.sock), want,
                                 'server did not present the -c certificate')
                self.assertEqual(fs.vp_alias, fs.peer_id)
                uc, chan = open_channel(self, d, fs)
                relay_both_ways(self, d, fs, uc, chan, BIG)
                # a second channel on the same TLS session
                uc2 = UnixClient(uc.path, T)
                self.addCleanup(uc2.close)
                chan2 = fs.wait_channel_new()
                self.assertNotEqual(chan2, chan)
                relay_both_ways(self, d, fs, uc2, chan2, 4096)
                fs.close()
        self.assert_alive(d)

    def test_old_protocol_versions_refused(self):
        """TLS 1.0 and 1.1 clients fail the handshake."""
        d = self.daemon()
        tried = 0
        for version in (ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1):
            with self.subTest(version=version.name):
                if not local_legacy_capable(version):
                    continue
                tried += 1
                ctx = client_context(minv=version, maxv=version, legacy=True)
                try:
                    s = tls_connect(d.port, ctx)
                except socket.timeout:
                    self.fail('%s handshake neither completed nor failed'
                              % version.name)
                except (ssl.SSLError, OSError):
                    pass
                else:
                    v = s.version()
                    s.close()
                    self.fail('sc_remoted negotiated %s' % v)
                self.assert_alive(d)
        if not tried:
            self.skipTest('local OpenSSL cannot speak TLS 1.0/1.1 at all')
        # and the daemon still serves a modern client
        self.assert_accepted(d, None, 'after.old')

    def test_plaintext_client_refused(self):
        """A plaintext scamper (MASTER_NEW without TLS) is closed, gets no
        remote-protocol reply, and the daemon keeps serving TLS."""
        d = self.daemon()
        before = set(d.list_sockets())
        fs = FakeScamper(d.port, name='plain.vp')
        self.addCleanup(fs.close)
        fs.connect()
        fs.send_new()
        got = fs.expect_closed(T)
        self.assertFalse(got[:8] == b'\0' * 8,
                         'daemon answered a plaintext MASTER_NEW with a '
                         'frame: %s' % got[:32].hex())
        self.assertEqual(set(d.list_sockets()) - before, set())
        self.assert_alive(d)
        self.assert_accepted(d, None, 'after.plain')

    def test_handshake_is_non_blocking(self):
        """Stalled peers (silent, or half a ClientHello, or a finished
        handshake with no MASTER_NEW) do not stop other connections."""
        d = self.daemon()
        silent = socket.create_connection(('127.0.0.1', d.port), timeout=T)
        self.addCleanup(silent.close)
        partial = socket.create_connection(('127.0.0.1', d.port), timeout=T)
        self.addCleanup(partial.close)
        # a TLS record header announcing a 512-byte handshake record, then
        # the first bytes of a ClientHello, then nothing
        partial.sendall(bytes.fromhex('160301020001'))
        idle = tls_connect(d.port, client_context())
        self.addCleanup(idle.close)
        time.sleep(0.2)
        t0 = time.monotonic()
        fs = self.session(d, name='busy.vp', timeout=3)
        uc, chan = open_channel(self, d, fs, 3)
        relay_both_ways(self, d, fs, uc, chan, 8192, timeout=3)
        self.assertLess(time.monotonic() - t0, 3)
        self.assert_alive(d)

    @slow
    def test_silent_connections_cut_by_accept_timeout(self):
        """A connection that never completes the handshake, and one that
        completes it but never sends MASTER_NEW, are closed after ~30 s."""
        d = self.daemon()
        start = time.monotonic()
        silent = socket.create_connection(('127.0.0.1', d.port), timeout=T)
        self.addCleanup(silent.close)
        partial = socket.create_connection(('127.0.0.1', d.port), timeout=T)
        self.addCleanup(partial.close)
        partial.sendall(bytes.fromhex('160301020001'))
        idle = tls_connect(d.port, client_context())
        self.addCleanup(idle.close)
        closed = {}

        def watch(label, sock):
            deadline = start + 45
            try:
                read_until_closed(sock, max(deadline - time.monotonic(), 0.1))
                closed[label] = time.monotonic() - start
            except AssertionError:
                closed[label] = None
        ths = [threading.Thread(target=watch, args=a, daemon=True)
               for a in (('silent', silent), ('partial', partial),
                         ('idle-tls', idle))]
        for th in ths:
            th.start()
        # meanwhile, normal service continues
        self.assert_accepted(d, None, 'during.wait')
        for th in ths:
            th.join(50)
        for label in ('silent', 'partial', 'idle-tls'):
            with self.subTest(conn=label):
                t = closed.get(label)
                self.assertIsNotNone(t, '%s connection not closed within 45 s'
                                     % label)
                self.assertGreaterEqual(t, 25, '%s closed too early (%.1fs)'
                                        % (label, t))
                self.assertLessEqual(t, 40)
        self.assert_alive(d)


# ---------------------------------------------------------------------------
# -C: client certificates and monitor-name check
# ---------------------------------------------------------------------------

V12 = ssl.TLSVersion.TLSv1_2


class TestClientCertificates(TLSTestCase):

    def test_no_client_certificate(self):
        """Without a client certificate the connection is closed right
        after the handshake, without waiting for MASTER_NEW."""
        d = self.daemon(client_ca=True)
        for label, maxv in (('default', None), ('TLS1.2', V12)):
            with self.subTest(version=label):
                try:
                    s = tls_connect(d.port, client_context(None, maxv=maxv))
                except (ssl.SSLError, OSError) as e:
                    if isinstance(e, socket.timeout):
                        self.fail('handshake timed out')
                    continue    # refused inside the handshake: fine
                t0 = time.monotonic()
                try:
                    got = read_until_closed(s, T)
                finally:
                    s.close()
                self.assertEqual(got, b'')
                self.assertLess(time.monotonic() - t0, T)
                self.assert_refused(d, None, 'vp1.example.org', maxv=maxv)
        self.assert_accepted(d, 'vp1', 'vp1.example.org')

    def test_untrusted_ca(self):
        d = self.daemon(client_ca=True)
        for label, maxv in (('default', None), ('TLS1.2', V12)):
            with self.subTest(version=label):
                self.assert_refused(d, 'rogue', 'vp1.example.org', maxv=maxv)
        self.assert_accepted(d, 'vp1', 'vp1.example.org')

    def test_expired_certificate(self):
        d = self.daemon(client_ca=True)
        for label, maxv in (('default', None), ('TLS1.2', V12)):
            with self.subTest(version=label):
                self.assert_refused(d, 'expired', 'vp1.example.org',
                                    maxv=maxv)
        self.assert_accepted(d, 'vp1', 'vp1.example.org')

    def test_exact_name(self):
        """SAN DNS:vp1.example.org: exact and case-insensitive match
        accepted; other names and a missing name refused."""
        d = self.daemon(client_ca=True)
        for name in ('vp1.example.org', 'VP1.Example.ORG'):
            with self.subTest(name=name):
                self.assert_accepted(d, 'vp1', name)
        for name in ('other.name', 'vp1.example.org.evil', 'xvp1.example.org',
                     'vp1.example', 'a.vp1.example.org', 'vp1'):
            with self.subTest(name=name):
                self.assert_refused(d, 'vp1', name)
        with self.subTest(name=None):
            self.assert_refused(d, 'vp1', None)
        with self.subTest(name=''):
            self.assert_refused(d, 'vp1', '')
        self.assert_alive(d)

    def test_wildcard_name(self):
        """SAN DNS:*.example.net matches exactly one extra label."""
        d = self.daemon(client_ca=True)
        for name in ('a.example.net', 'A.Example.NET', 'vp-7.example.net'):
            with self.subTest(name=name):
                self.assert_accepted(d, 'wild', name)
        for name in ('x.b.example.net', 'example.net', '.example.net',
                     'aexample.net', 'a.example.net.org', 'a.example.com'):
            with self.subTest(name=name):
                self.assert_refused(d, 'wild', name)
        with self.subTest(name=None):
            self.assert_refused(d, 'wild', None)

    def test_cn_only_certificate(self):
        d = self.daemon(client_ca=True)
        for name in ('cnonly.example', 'CNONLY.example'):
            with self.subTest(name=name):
                self.assert_accepted(d, 'cnonly', name)
        for name in ('other.example', 'x.cnonly.example'):
            with self.subTest(name=name):
                self.assert_refused(d, 'cnonly', name)

    def test_san_then_cn(self):
        """A name matching either a SAN DNS entry or, failing that, the CN
        is accepted."""
        d = self.daemon(client_ca=True)
        for name in ('san.example.com', 'cn.example.com'):
            with self.subTest(name=name):
                self.assert_accepted(d, 'sancn', name)
        self.assert_refused(d, 'sancn', 'other.example.com')

    def test_skipnameverification(self):
        """-O skipnameverification: any (or no) name with a valid
        certificate; the chain is still verified."""
        d = self.daemon(client_ca=True,
                        extra_args=('-O', 'skipnameverification'))
        for client, name in (('vp1', 'other.name'), ('vp1', None),
                             ('cnonly', 'vp1.example.org'),
                             ('vp1', 'vp1.example.org')):
            with self.subTest(client=client, name=name):
                self.assert_accepted(d, client, name)
        for client in ('rogue', 'expired', None):
            with self.subTest(client=client):
                self.assert_refused(d, client, 'vp1.example.org')

    def test_no_ca_means_no_client_verification(self):
        """Without -C, client certificates are neither required nor
        checked, and no name check applies."""
        d = self.daemon()
        for client, name in ((None, 'any.name'), ('rogue', 'other.name'),
                             ('vp1', 'mismatch.example')):
            with self.subTest(client=client, name=name):
                self.assert_accepted(d, client, name)


# ---------------------------------------------------------------------------
# resumption over TLS
# ---------------------------------------------------------------------------

class TestResume(TLSTestCase):

    def _disconnect_and_queue(self, d, fs, uc, chan, how='abrupt'):
        """Drop fs's connection, wait for ZOMBIE, queue data both ways.

        how: 'abrupt' (close the fd, no close_notify: a crashed or timed
        out scamper), 'close_notify' (TLS shutdown first) or 'reset'
        (TCP RST)."""
        old_sock = os.path.join(d.udir, fs.expected_socket_name())
        if how == 'close_notify':
            fs.sock.settimeout(2)
            try:
                fs.sock.unwrap().close()
                fs.sock = None
            except (ssl.SSLError, OSError):
                pass
        elif how == 'reset':
            fs.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                               struct.pack('ii', 1, 0))
        fs.close()
        d.wait_socket_gone(old_sock, T)
        self.assert_alive(d)
        up = b'queued by local client while zombie\n' * 50
        down = b'queued by scamper while disconnected\n' * 50
        delivered = fs.snd_nxt      # remoted has received all of these
        uc.send(up)
        fs.send_data(chan, down)     # not connected: only queued
        time.sleep(0.2)
        return up, down, delivered

    def test_resume_over_tls(self):
        """After the TLS connection drops (without close_notify, with
        close_notify, or by RST), a new TLS connection with MASTER_RES gets
        MASTER_OK and the queued data is retransmitted both ways."""
        d = self.daemon(client_ca=True)
        for how in ('abrupt', 'close_notify', 'reset'):
            with self.subTest(disconnect=how):
                fs = self.session(d, 'vp1', 'vp1.example.org')
                first_sock = fs.expected_socket_name()
                uc, chan = open_channel(self, d, fs)
                relay_both_ways(self, d, fs, uc, chan, 16384)
                up, down, delivered = self._disconnect_and_queue(
                    d, fs, uc, chan, how)

                ok = fs.resume()
                self.assertEqual(ok, delivered, 'MASTER_OK rcv_nxt')
                self.assertIsInstance(fs.sock, ssl.SSLSocket)
                self.assertEqual(fs.recv_channel_data(chan, len(up), T), up)
                self.assertEqual(uc.recv_exact(len(down), T), down)
                fs.wait_acked(T)
                # new -U socket for the new source port; the local client
                # connected before the disconnect is still relayed
                d.wait_socket(fs.expected_socket_name(), T)
                self.assertNotEqual(fs.expected_socket_name(), first_sock)
                relay_both_ways(self, d, fs, uc, chan, BIG)
                fs.close()
        self.assert_alive(d)

    def test_resume_name_not_rechecked(self):
        """On resume only the certificate chain is checked: a valid
        certificate for another name resumes, an untrusted one does not."""
        d = self.daemon(client_ca=True)
        fs = self.session(d, 'vp1', 'vp1.example.org')
        uc, chan = open_channel(self, d, fs)
        up, down, _ = self._disconnect_and_queue(d, fs, uc, chan)

        # untrusted CA: the resume must fail, the session must survive
        try:
            s = tls_connect(d.port, client_context('rogue'))
        except (ssl.SSLError, OSError) as e:
            if isinstance(e, socket.timeout):
                self.fail('handshake timed out')
            s = None
        if s is not None:
            probe = FakeScamper(d.port, magic=fs.magic, sock=s)
            self.addCleanup(probe.close)
            try:
                probe.send_res(fs.rcv_nxt, None, fs.snd_nxt)
                f = probe.recv_frame(T)
            except (EOFError, OSError, ssl.SSLError):
                f = None
            self.assertIsNone(f, 'rogue certificate got a reply to '
                              'MASTER_RES: %r' % (f,))
            probe.close()

        # a trusted certificate for a different name may resume
        fs.sock_factory = lambda: tls_connect(d.port,
                                              client_context('cnonly'))
        fs.resume()
        self.assertEqual(fs.recv_channel_data(chan, len(up), T), up)
        self.assertEqual(uc.recv_exact(len(down), T), down)
        relay_both_ways(self, d, fs, uc, chan, 4096)
        self.assert_alive(d)

    def test_reject_unknown_magic_over_tls(self):
        """MASTER_RES for an unknown session gets MASTER_REJ inside TLS."""
        d = self.daemon(client_ca=True)
        s = tls_connect(d.port, client_context('vp1'))
        fs = FakeScamper(d.port, sock=s)
        self.addCleanup(fs.close)
        fs.send_res(0, 0, 0)
        f = fs.recv_frame(T)
        self.assertEqual(f.type, MASTER_REJ)
        fs.expect_closed(T)


# ---------------------------------------------------------------------------
# SIGHUP reload
# ---------------------------------------------------------------------------

ERROR_RX = re.compile(r'(?i)(err|fail|unable|cannot|can\'t|could not|'
                      r'invalid|mismatch|no such|bad)')


class TestReload(TLSTestCase):

    def _setup(self, **kw):
        tmp = self.tmpdir()
        cert = os.path.join(tmp, 'cert.pem')
        key = os.path.join(tmp, 'key.pem')
        shutil.copy(CERTS.server_cert, cert)
        shutil.copy(CERTS.server_key, key)
        d = self.daemon(cert=cert, key=key, **kw)
        return d, cert, key

    def _new_conn_der(self, d):
        s = tls_connect(d.port, client_context())
        try:
            return peer_der(s)
        finally:
            s.close()

    def test_sighup_loads_new_certificate(self):
        d, cert, key = self._setup()
        old = certmod.cert_der(CERTS.server_cert)
        new = certmod.cert_der(CERTS.server2_cert)
        fs = self.session(d, name='before.hup')
        uc, chan = open_channel(self, d, fs)
        self.assertEqual(peer_der(fs.sock), old)

        shutil.copy(CERTS.server2_cert, cert)
        shutil.copy(CERTS.server2_key, key)
        d.signal(signal.SIGHUP)
        scr.wait_until(lambda: self._new_conn_der(d) == new, T,
                       interval=0.1, what='new certificate after SIGHUP')
        self.assert_alive(d)

        # the new certificate carries the serial and CN we generated
        s = tls_connect(d.port, client_context())
        info = s.getpeercert()
        s.close()
        self.assertEqual(int(info['serialNumber'], 16),
                         certmod.SERIAL_SERVER2)
        self.assertIn((('commonName', 'reload.localhost'),), info['subject'])

        # a new session works with the new certificate
        fs2 = self.session(d, name='after.hup')
        self.assertEqual(peer_der(fs2.sock), new)
        uc2, chan2 = open_channel(self, d, fs2)
        relay_both_ways(self, d, fs2, uc2, chan2, 16384)

        # the session from before the SIGHUP is untouched
        relay_both_ways(self, d, fs, uc, chan, BIG)
        self.assertEqual(peer_der(fs.sock), old)
        self.assert_alive(d)

    def test_sighup_with_broken_files_keeps_old_context(self):
        d, cert, key = self._setup(debug=False)
        old = certmod.cert_der(CERTS.server_cert)
        fs = self.session(d, name='before.hup')
        uc, chan = open_channel(self, d, fs)

        def garbage(path):
            with open(path, 'wb') as f:
                f.write(b'this is not a PEM file\n' + os.urandom(64))

        def restore():
            shutil.copy(CERTS.server_cert, cert)
            shutil.copy(CERTS.server_key, key)

        cases = [
            ('garbage certificate', lambda: garbage(cert)),
            ('garbage key', lambda: garbage(key)),
            ('key does not match certificate',
             lambda: shutil.copy(CERTS.server2_key, key)),
            ('certificate file missing', lambda: os.unlink(cert)),
            ('encrypted key on reload',
             lambda: shutil.copy(CERTS.server_key_enc, key)),
        ]
        for n, (label, breakit) in enumerate(cases):
            with self.subTest(case=label):
                restore()
                breakit()
                pos = len(d.log())
                d.signal(signal.SIGHUP)
                try:
                    scr.wait_until(lambda: d.log()[pos:].strip() or
                                   not d.alive(), T, what='error log line')
                except TimeoutError:
                    self.fail('nothing logged after SIGHUP with %s' % label)
                self.assert_alive(d)
                time.sleep(0.3)
                self.assert_alive(d)
                self.assertRegex(d.log()[pos:], ERROR_RX)
                # old certificate still served to new connections
                self.assertEqual(self._new_conn_der(d), old)
                fs2 = self.session(d, name='during.broken%d' % n)
                self.assertEqual(peer_der(fs2.sock), old)
                fs2.close()
                # existing session keeps relaying
                relay_both_ways(self, d, fs, uc, chan, 16384)

        # a later good reload still works
        shutil.copy(CERTS.server2_cert, cert)
        shutil.copy(CERTS.server2_key, key)
        d.signal(signal.SIGHUP)
        new = certmod.cert_der(CERTS.server2_cert)
        scr.wait_until(lambda: self._new_conn_der(d) == new, T,
                       interval=0.1, what='new certificate after repair')
        relay_both_ways(self, d, fs, uc, chan, BIG)
        self.assert_alive(d)


    def test_sighup_reloads_client_ca(self):
        """-C is reloaded too; a broken CA file keeps the old context with
        client verification still in force."""
        tmp = self.tmpdir()
        ca = os.path.join(tmp, 'ca.pem')
        shutil.copy(CERTS.ca_cert, ca)
        d = Daemon(tls={'cert': CERTS.server_cert, 'key': CERTS.server_key,
                        'ca': ca}, start=False, debug=False)
        self.addCleanup(d.__exit__, None, None, None)
        start_without_tty(d)
        d.wait_listening()
        fs = self.session(d, 'vp1', 'vp1.example.org')
        uc, chan = open_channel(self, d, fs)

        with open(ca, 'wb') as f:
            f.write(b'garbage instead of a CA\n')
        pos = len(d.log())
        d.signal(signal.SIGHUP)
        scr.wait_until(lambda: d.log()[pos:].strip() or not d.alive(), T,
                       what='error log line')
        self.assert_alive(d)
        self.assertRegex(d.log()[pos:], ERROR_RX)
        self.assert_accepted(d, 'vp1', 'vp1.example.org')
        self.assert_refused(d, None, 'vp1.example.org')
        self.assert_refused(d, 'rogue', 'vp1.example.org')
        relay_both_ways(self, d, fs, uc, chan, 16384)

        # now trust the other CA instead
        shutil.copy(CERTS.rogue_ca_cert, ca)
        d.signal(signal.SIGHUP)

        def switched():
            out, _ = try_session(d, 'rogue', 'vp1.example.org')
            return out == Outcome.ACCEPTED
        try:
            scr.wait_until(switched, T, interval=0.1, what='CA reload')
        except TimeoutError:
            self.fail('certificate from the new CA not accepted after '
                      'SIGHUP; log:\n%s' % d.log()[-2000:])
        self.assert_refused(d, 'vp1', 'vp1.example.org')
        self.assert_refused(d, None, 'vp1.example.org')
        # the session verified against the old CA is not disturbed
        relay_both_ways(self, d, fs, uc, chan, BIG)
        self.assert_alive(d)


# ---------------------------------------------------------------------------
# private key passphrase and startup errors
# ---------------------------------------------------------------------------

class RawDaemon:
    """sc_remoted started without a controlling terminal, with stdin a
    pipe, so that a passphrase can only come from stdin."""

    def __init__(self, tls_args, stdin_data=None, keep_stdin_open=False):
        self.tmp = tempfile.mkdtemp(prefix='scr-tlsraw-')
        self.udir = os.path.join(self.tmp, 'u')
        os.mkdir(self.udir)
        self.port = free_port()
        self.errpath = os.path.join(self.tmp, 'stderr')
        self.errfh = open(self.errpath, 'wb')
        self.args = [scr.SC_REMOTED, '-P', '127.0.0.1:%d' % self.port,
                     '-U', self.udir, '-O', 'notimes'] + list(tls_args)
        self.proc = subprocess.Popen(self.args, stdin=subprocess.PIPE,
                                     stdout=self.errfh, stderr=self.errfh,
                                     start_new_session=True)
        if stdin_data:
            self.proc.stdin.write(stdin_data)
            self.proc.stdin.flush()
        if not keep_stdin_open:
            self.proc.stdin.close()

    def log(self):
        with open(self.errpath, 'rb') as f:
            return f.read().decode('utf-8', 'replace')

    def wait_exit(self, timeout):
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def listening(self):
        try:
            socket.create_connection(('127.0.0.1', self.port), 1).close()
            return True
        except OSError:
            return False

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        for fh in (self.proc.stdin, self.errfh):
            try:
                fh.close()
            except (OSError, ValueError):
                pass
        shutil.rmtree(self.tmp, ignore_errors=True)


class TestPassphrase(TLSTestCase):

    def raw(self, tls_args, **kw):
        r = RawDaemon(tls_args, **kw)
        self.addCleanup(r.close)
        return r

    def serve_check(self, r, cert=None, name='enc.key'):
        scr.wait_until(lambda: r.listening() or r.proc.poll() is not None,
                       T, what='listening')
        self.assertIsNone(r.proc.poll(), 'daemon exited: %s' % r.log())
        s = tls_connect(r.port, client_context())
        self.assertEqual(peer_der(s),
                         certmod.cert_der(cert or CERTS.server_cert))
        fs = FakeScamper(r.port, name=name, sock=s)
        self.addCleanup(fs.close)
        fs.handshake()
        self.assertTrue(os.path.exists(os.path.join(
            r.udir, fs.expected_socket_name())))

    def test_passphrase_on_stdin(self):
        """First line of stdin is the passphrase; later lines ignored."""
        r = self.raw(['-c', CERTS.server_cert, '-p', CERTS.server_key_enc],
                     stdin_data=certmod.PASSPHRASE.encode() +
                     b'\nnot the passphrase\n')
        self.serve_check(r)

    def test_passphrase_without_newline(self):
        r = self.raw(['-c', CERTS.server_cert, '-p', CERTS.server_key_enc],
                     stdin_data=certmod.PASSPHRASE.encode())
        self.serve_check(r)

    def test_wrong_passphrase(self):
        for label, data in (('wrong', b'wrong\n'), ('empty stdin', b''),
                            ('passphrase on line 2', b'\n' +
                             certmod.PASSPHRASE.encode() + b'\n')):
            with self.subTest(case=label):
                r = self.raw(['-c', CERTS.server_cert,
                              '-p', CERTS.server_key_enc], stdin_data=data)
                rc = r.wait_exit(T)
                self.assertEqual(rc, 255, 'exit status %r; log:\n%s'
                                 % (rc, r.log()))
                self.assertRegex(r.log(), r'(?i)(pass|key|decrypt|pem)',
                                 'no clear error message')
                self.assertFalse(r.listening())

    def test_sighup_reuses_startup_passphrase(self):
        """The passphrase is read once: a SIGHUP reload of an encrypted key
        (same passphrase) succeeds without reading stdin again."""
        tmp = self.tmpdir()
        cert = os.path.join(tmp, 'cert.pem')
        key = os.path.join(tmp, 'key.pem')
        shutil.copy(CERTS.server_cert, cert)
        shutil.copy(CERTS.server_key_enc, key)
        r = self.raw(['-c', cert, '-p', key],
                     stdin_data=certmod.PASSPHRASE.encode() + b'\n')
        self.serve_check(r, name='enc.before')
        shutil.copy(CERTS.server2_cert, cert)
        shutil.copy(CERTS.server2_key_enc, key)
        r.proc.send_signal(signal.SIGHUP)
        new = certmod.cert_der(CERTS.server2_cert)

        def reloaded():
            if r.proc.poll() is not None:
                return True
            s = tls_connect(r.port, client_context())
            try:
                return peer_der(s) == new
            finally:
                s.close()
        try:
            scr.wait_until(reloaded, T, interval=0.1, what='reload')
        except TimeoutError:
            self.fail('encrypted key not reloaded on SIGHUP; log:\n%s'
                      % r.log())
        self.assertIsNone(r.proc.poll(), 'daemon exited: %s' % r.log())
        self.serve_check(r, cert=CERTS.server2_cert, name='enc.after')

    def test_passphrase_from_terminal(self):
        """With a terminal on stdin (also the controlling terminal) the
        passphrase is read from it, and not echoed."""
        master, slave = os.openpty()
        self.addCleanup(os.close, master)
        tmp = self.tmpdir()
        udir = os.path.join(tmp, 'u')
        os.mkdir(udir)
        errpath = os.path.join(tmp, 'stderr')
        port = free_port()

        def ctty():
            os.setsid()
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)
        with open(errpath, 'wb') as err:
            proc = subprocess.Popen(
                [scr.SC_REMOTED, '-P', '127.0.0.1:%d' % port, '-U', udir,
                 '-O', 'notimes', '-c', CERTS.server_cert,
                 '-p', CERTS.server_key_enc],
                stdin=slave, stdout=err, stderr=err, preexec_fn=ctty)
        os.close(slave)

        def cleanup():
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)
        self.addCleanup(cleanup)

        def read_master():
            out = b''
            while select.select([master], [], [], 0)[0]:
                try:
                    d = os.read(master, 4096)
                except OSError:
                    break
                if not d:
                    break
                out += d
            return out

        # wait for the prompt (on stderr or on the terminal) before typing,
        # so that the daemon has had the chance to turn echo off
        seen = bytearray()

        def prompted():
            seen.extend(read_master())
            with open(errpath, 'rb') as f:
                text = f.read() + bytes(seen)
            return re.search(rb'(?i)pass', text) or proc.poll() is not None
        try:
            scr.wait_until(prompted, T, what='passphrase prompt')
        except TimeoutError:
            pass        # no prompt: type anyway
        self.assertIsNone(proc.poll(), 'daemon exited before the passphrase')
        os.write(master, certmod.PASSPHRASE.encode() + b'\n')

        def up():
            try:
                socket.create_connection(('127.0.0.1', port), 1).close()
                return True
            except OSError:
                return proc.poll() is not None
        scr.wait_until(up, T, what='listening')
        with open(errpath, 'rb') as f:
            errtext = f.read().decode('utf-8', 'replace')
        self.assertIsNone(proc.poll(), 'daemon exited: %s' % errtext)
        s = tls_connect(port, client_context())
        self.assertEqual(peer_der(s), certmod.cert_der(CERTS.server_cert))
        fs = FakeScamper(port, name='tty.key', sock=s)
        self.addCleanup(fs.close)
        fs.handshake()
        seen.extend(read_master())
        self.assertNotIn(certmod.PASSPHRASE.encode(), bytes(seen),
                         'passphrase echoed on the terminal')

    def test_plain_key_needs_no_passphrase(self):
        """An unencrypted key loads while stdin stays open and silent."""
        r = self.raw(['-c', CERTS.server_cert, '-p', CERTS.server_key],
                     keep_stdin_open=True)
        self.serve_check(r)


class TestStartupErrors(TLSTestCase):

    def cli(self, tls_args):
        tmp = self.tmpdir()
        udir = os.path.join(tmp, 'u')
        os.mkdir(udir)
        args = ['-P', '127.0.0.1:%d' % free_port(), '-U', udir] + tls_args
        try:
            return run_cli(args, timeout=T)
        except subprocess.TimeoutExpired:
            self.fail('sc_remoted %s did not exit' % ' '.join(args))

    def test_option_combinations(self):
        c, k, ca = CERTS.server_cert, CERTS.server_key, CERTS.ca_cert
        for args in (['-c', c], ['-p', k], ['-C', ca], ['-C', ca, '-c', c],
                     ['-C', ca, '-p', k]):
            with self.subTest(args=' '.join(os.path.basename(a)
                                            for a in args)):
                rc, out, err = self.cli(args)
                self.assertEqual(rc, 255, err)
                self.assertTrue(err.strip())

    def test_bad_files(self):
        tmp = self.tmpdir()
        junk = os.path.join(tmp, 'junk.pem')
        with open(junk, 'w') as f:
            f.write('junk\n')
        missing = os.path.join(tmp, 'missing.pem')
        c, k = CERTS.server_cert, CERTS.server_key
        for label, args in (
                ('missing cert', ['-c', missing, '-p', k]),
                ('missing key', ['-c', c, '-p', missing]),
                ('junk cert', ['-c', junk, '-p', k]),
                ('junk key', ['-c', c, '-p', junk]),
                ('mismatched key', ['-c', c, '-p', CERTS.server2_key]),
                ('missing CA', ['-c', c, '-p', k, '-C', missing]),
                ('junk CA', ['-c', c, '-p', k, '-C', junk])):
            with self.subTest(case=label):
                rc, out, err = self.cli(args)
                self.assertEqual(rc, 255, err)
                self.assertTrue(err.strip())


# ---------------------------------------------------------------------------

def setUpModule():
    global CERTS, _CERT_TMP
    ok, why = tls_support()
    if ok is None:
        raise RuntimeError(why)
    if not ok:
        raise unittest.SkipTest(why)
    _CERT_TMP = tempfile.mkdtemp(prefix='scr-tlscerts-')
    CERTS = certmod.CertSet(_CERT_TMP)


def tearDownModule():
    if _CERT_TMP:
        shutil.rmtree(_CERT_TMP, ignore_errors=True)


if __name__ == '__main__':
    _ok, _why = tls_support()
    if _ok is False:
        sys.stderr.write('SKIP: %s\n' % _why)
        sys.exit(77)
    unittest.main(verbosity=2)
