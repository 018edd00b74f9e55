#!/usr/bin/env python3
"""Test-time generation of the certificates used by the sc_remoted TLS tests.

Everything is created in a fresh directory with the openssl command line
tool each time the tests run; no key material is kept in the repository.

    certs = CertSet(directory)   # directory must exist and be empty-ish

Attributes of a CertSet (all absolute paths):

    ca_cert, ca_key              the trusted test CA
    server_cert, server_key      CN=localhost, SAN DNS:localhost, IP:127.0.0.1
    server_key_enc               server_key encrypted with PASSPHRASE (AES-256)
    server2_cert, server2_key    a second server identity for reload tests
                                 (CN=reload.localhost, other serial, other key)
    server2_key_enc              server2_key encrypted with PASSPHRASE
    clients[name] = (cert, key)  client certificates, see CLIENTS below
    rogue_ca_cert                the untrusted second CA

Run this file directly to generate a set in a temporary directory and
check it with `openssl verify`.
"""

import os
import ssl
import subprocess
import sys
import tempfile

PASSPHRASE = 'secret'

# Serial numbers, kept distinct so tests can tell certificates apart.
SERIAL_SERVER = 0x5C01
SERIAL_SERVER2 = 0x5C02

# name -> (subject CN or None, list of SAN DNS entries, issuing CA, validity)
# validity is 'ok' (now-1d .. now+30d) or 'expired' (2020-01-01 .. 2020-01-02)
CLIENTS = {
    # exact DNS SAN; the CN is deliberately not a host name so that only
    # the SAN can produce a match.
    'vp1':      ('vp1 client', ['vp1.example.org'], 'ca', 'ok'),
    # single-label wildcard in the SAN
    'wild':     ('wildcard client', ['*.example.net'], 'ca', 'ok'),
    # CN only, no subjectAltName extension at all
    'cnonly':   ('cnonly.example', [], 'ca', 'ok'),
    # SAN and CN carry different names: both are acceptable
    'sancn':    ('cn.example.com', ['san.example.com'], 'ca', 'ok'),
    # right CA and name, but expired
    'expired':  ('vp1.example.org', ['vp1.example.org'], 'ca', 'expired'),
    # right name, issued by a CA the daemon does not trust
    'rogue':    ('vp1.example.org', ['vp1.example.org'], 'rogue', 'ok'),
}

_REQ_CNF = """\
[ req ]
distinguished_name = dn
prompt = no
[ dn ]
CN = placeholder
[ ca_ext ]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
"""

_EXT_CNF = """\
[ server_ext ]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
subjectAltName = DNS:localhost, IP:127.0.0.1
"""

# Minimal `openssl ca` configuration, used only to issue a certificate
# whose validity lies in the past (openssl x509 -req in OpenSSL 3.0 cannot
# set explicit dates, `openssl ca` can with -startdate/-enddate).
_CA_CNF = """\
[ ca ]
default_ca = testca
[ testca ]
dir = {dir}
database = $dir/index.txt
new_certs_dir = $dir/newcerts
serial = $dir/serial
certificate = {cert}
private_key = {key}
default_md = sha256
policy = pol
unique_subject = no
email_in_dn = no
copy_extensions = none
[ pol ]
commonName = supplied
[ ext ]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = clientAuth
{san}
"""


class CertError(Exception):
    pass


def _run(args, cwd, input_data=None):
    env = dict(os.environ)
    env.pop('OPENSSL_CONF', None)
    p = subprocess.run(['openssl'] + list(args), cwd=cwd, input=input_data,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       env=env, timeout=60)
    if p.returncode != 0:
        raise CertError('openssl %s failed (%d): %s' %
                        (' '.join(args), p.returncode,
                         p.stderr.decode(errors='replace')))
    return p.stdout


class CertSet:
    def __init__(self, directory):
        self.dir = os.path.abspath(directory)
        os.makedirs(self.dir, exist_ok=True)
        self._req_cnf = self._write('req.cnf', _REQ_CNF)
        self._ext_cnf = self._write('ext.cnf', _EXT_CNF)
        self._serial = 0x1000

        self.ca_cert, self.ca_key = self._make_ca('ca', 'sc_remoted test CA')
        self.rogue_ca_cert, self.rogue_ca_key = \
            self._make_ca('rogue-ca', 'sc_remoted untrusted CA')

        self.server_key = self._genkey('server.key', 'rsa')
        self.server_cert = self._sign('server.pem', self.server_key,
                                      'localhost', 'server_ext',
                                      self.ca_cert, self.ca_key,
                                      serial=SERIAL_SERVER)
        self.server_key_enc = self.path('server-enc.key')
        _run(['pkey', '-in', self.server_key, '-out', self.server_key_enc,
              '-aes256', '-passout', 'pass:' + PASSPHRASE], self.dir)

        self.server2_key = self._genkey('server2.key', 'rsa')
        self.server2_cert = self._sign('server2.pem', self.server2_key,
                                       'reload.localhost', 'server_ext',
                                       self.ca_cert, self.ca_key,
                                       serial=SERIAL_SERVER2)
        self.server2_key_enc = self.path('server2-enc.key')
        _run(['pkey', '-in', self.server2_key, '-out', self.server2_key_enc,
              '-aes256', '-passout', 'pass:' + PASSPHRASE], self.dir)

        self.clients = {}
        for name, (cn, sans, issuer, validity) in CLIENTS.items():
            key = self._genkey('client-%s.key' % name, 'ec')
            if issuer == 'ca':
                ca_cert, ca_key = self.ca_cert, self.ca_key
            else:
                ca_cert, ca_key = self.rogue_ca_cert, self.rogue_ca_key
            if validity == 'ok':
                section = self._client_section(name, sans)
                cert = self._sign('client-%s.pem' % name, key, cn, section,
                                  ca_cert, ca_key)
            else:
                cert = self._sign_expired('client-%s.pem' % name, key, cn,
                                          sans, ca_cert, ca_key)
            self.clients[name] = (cert, key)

    # -- helpers -----------------------------------------------------------

    def path(self, name):
        return os.path.join(self.dir, name)

    def _write(self, name, text):
        p = self.path(name)
        with open(p, 'w') as f:
            f.write(text)
        return p

    def _next_serial(self):
        self._serial += 1
        return self._serial

    def _genkey(self, name, kind):
        out = self.path(name)
        if kind == 'rsa':
            _run(['genpkey', '-algorithm', 'RSA', '-pkeyopt',
                  'rsa_keygen_bits:2048', '-out', out], self.dir)
        else:
            _run(['genpkey', '-algorithm', 'EC', '-pkeyopt',
                  'ec_paramgen_curve:P-256', '-out', out], self.dir)
        os.chmod(out, 0o600)
        return out

    def _make_ca(self, base, cn):
        key = self._genkey(base + '.key', 'ec')
        cert = self.path(base + '.pem')
        _run(['req', '-new', '-x509', '-config', self._req_cnf,
              '-key', key, '-subj', '/CN=' + cn, '-days', '30',
              '-set_serial', str(self._next_serial()),
              '-extensions', 'ca_ext',
              '-out', cert], self.dir)
        return cert, key

    def _client_section(self, name, sans):
        # one extension section per client, so each gets its own SAN list
        section = 'client_%s' % name
        lines = ['', '[ %s ]' % section,
                 'basicConstraints = critical, CA:FALSE',
                 'keyUsage = critical, digitalSignature, keyEncipherment',
                 'extendedKeyUsage = clientAuth',
                 'subjectKeyIdentifier = hash',
                 'authorityKeyIdentifier = keyid']
        if sans:
            lines.append('subjectAltName = ' +
                         ', '.join('DNS:' + s for s in sans))
        with open(self._ext_cnf, 'a') as f:
            f.write('\n'.join(lines) + '\n')
        return section

    def _csr(self, key, cn):
        csr = key + '.csr'
        _run(['req', '-new', '-config', self._req_cnf, '-key', key,
              '-subj', '/CN=' + cn, '-out', csr], self.dir)
        return csr

    def _sign(self, name, key, cn, section, ca_cert, ca_key, serial=None):
        csr = self._csr(key, cn)
        out = self.path(name)
        if serial is None:
            serial = self._next_serial()
        _run(['x509', '-req', '-in', csr, '-CA', ca_cert, '-CAkey', ca_key,
              '-set_serial', str(serial), '-days', '30', '-sha256',
              '-extfile', self._ext_cnf, '-extensions', section,
              '-out', out], self.dir)
        return out

    def _sign_expired(self, name, key, cn, sans, ca_cert, ca_key):
        csr = self._csr(key, cn)
        cadir = self.path('ca-db-' + os.path.splitext(name)[0])
        os.makedirs(os.path.join(cadir, 'newcerts'), exist_ok=True)
        open(os.path.join(cadir, 'index.txt'), 'w').close()
        with open(os.path.join(cadir, 'serial'), 'w') as f:
            f.write('%04X\n' % self._next_serial())
        san = ''
        if sans:
            san = 'subjectAltName = ' + ', '.join('DNS:' + s for s in sans)
        cnf = os.path.join(cadir, 'ca.cnf')
        with open(cnf, 'w') as f:
            f.write(_CA_CNF.format(dir=cadir, cert=ca_cert, key=ca_key,
                                   san=san))
        out = self.path(name)
        _run(['ca', '-batch', '-config', cnf, '-notext', '-extensions', 'ext',
              '-startdate', '200101000000Z', '-enddate', '200102000000Z',
              '-in', csr, '-out', out], self.dir)
        return out


_PEM_BEGIN = '-----BEGIN CERTIFICATE-----'
_PEM_END = '-----END CERTIFICATE-----'


def cert_der(pem_path):
    """DER bytes of the (first) certificate in a PEM file."""
    with open(pem_path) as f:
        text = f.read()
    begin = text.index(_PEM_BEGIN)
    end = text.index(_PEM_END) + len(_PEM_END)
    return ssl.PEM_cert_to_DER_cert(text[begin:end])


def _selfcheck():
    with tempfile.TemporaryDirectory(prefix='sc-certs-') as d:
        c = CertSet(d)
        ok = True

        def verify(cert, ca, purpose, expect_ok, expect_text=None):
            nonlocal ok
            p = subprocess.run(['openssl', 'verify', '-purpose', purpose,
                                '-CAfile', ca, cert],
                               stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT)
            text = p.stdout.decode(errors='replace')
            good = (p.returncode == 0) == expect_ok
            if expect_text and expect_text not in text:
                good = False
            print('%-4s %s' % ('ok' if good else 'FAIL',
                               text.strip().replace('\n', ' | ')))
            ok = ok and good

        verify(c.server_cert, c.ca_cert, 'sslserver', True)
        verify(c.server2_cert, c.ca_cert, 'sslserver', True)
        for name, (cert, _key) in c.clients.items():
            if name == 'expired':
                verify(cert, c.ca_cert, 'sslclient', False, 'expired')
            elif name == 'rogue':
                verify(cert, c.ca_cert, 'sslclient', False)
                verify(cert, c.rogue_ca_cert, 'sslclient', True)
            else:
                verify(cert, c.ca_cert, 'sslclient', True)
        p = subprocess.run(['openssl', 'pkey', '-in', c.server_key_enc,
                            '-passin', 'pass:' + PASSPHRASE, '-noout'])
        print('%-4s encrypted key opens with the passphrase' %
              ('ok' if p.returncode == 0 else 'FAIL'))
        ok = ok and p.returncode == 0
        p = subprocess.run(['openssl', 'pkey', '-in', c.server_key_enc,
                            '-passin', 'pass:wrong', '-noout'],
                           stderr=subprocess.DEVNULL)
        print('%-4s encrypted key refuses a wrong passphrase' %
              ('ok' if p.returncode != 0 else 'FAIL'))
        ok = ok and p.returncode != 0
        return 0 if ok else 1


if __name__ == '__main__':
    sys.exit(_selfcheck())
