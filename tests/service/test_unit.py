#!/usr/bin/env python3
"""The systemd unit (issue 10): `make install DESTDIR=...` installs
sc_remoted.service into the configured unit directory and the commented
options file into $sysconfdir/default; `systemd-analyze verify` accepts the
installed unit (with ExecStart pointed into the DESTDIR, since verify
wants the binary to exist); the unit has Type=notify, the reload command,
the RuntimeDirectory and the hardening of the issue; the default options
spool to the unit's CacheDirectory (and the daemon starts with them, which
test-writes a spool file).  Exits 77 when the
build has no unit (--with-systemdsystemunitdir=no, no systemd.pc) or
systemd-analyze is missing."""

import os
import re
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                '..', 'lib'))
import scr  # noqa: E402

HARDENING = ['NoNewPrivileges=yes', 'ProtectSystem=strict', 'ProtectHome=yes',
             'PrivateTmp=yes',
             'RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX',
             'CapabilityBoundingSet=', 'DynamicUser=yes']


def make_var(build, name):
    with open(os.path.join(build, 'Makefile')) as f:
        for line in f:
            m = re.match(r'^%s = (.*)$' % name, line)
            if m:
                return m.group(1).strip()
    return None


def main():
    build = os.environ.get('SC_TOP_BUILDDIR')
    if not build or not os.path.exists(os.path.join(build, 'Makefile')):
        print('SKIP: SC_TOP_BUILDDIR has no Makefile')
        return 77
    unitdir = make_var(build, 'systemdsystemunitdir')
    if not unitdir or unitdir == 'no':
        print('SKIP: configured without a systemd unit')
        return 77
    if shutil.which('systemd-analyze') is None:
        print('SKIP: systemd-analyze not installed')
        return 77
    tmp = tempfile.mkdtemp(prefix='scr-unit-')
    try:
        env = {k: v for k, v in os.environ.items()
               if k not in ('MAKEFLAGS', 'MFLAGS', 'MAKELEVEL')}
        p = subprocess.run(['make', '-C', build, 'install', 'DESTDIR=' + tmp],
                           env=env, stdin=subprocess.DEVNULL,
                           capture_output=True, text=True, timeout=300)
        if p.returncode != 0:
            print(p.stdout[-3000:], p.stderr[-3000:])
            return 1
        units = [os.path.join(dp, 'sc_remoted.service')
                 for dp, dn, fn in os.walk(tmp) if 'sc_remoted.service' in fn]
        assert len(units) == 1, 'installed units: %r' % units
        unit = units[0]
        print('installed %s' % unit[len(tmp):])
        text = open(unit).read()
        m = re.search(r'(?m)^ExecStart=(\S+) \$SC_REMOTED_OPTS$', text)
        assert m, 'no ExecStart with $SC_REMOTED_OPTS'
        binary = m.group(1)
        assert os.access(tmp + binary, os.X_OK), binary + ' not installed'
        m = re.search(r'(?m)^EnvironmentFile=-(\S+)$', text)
        assert m, 'no optional EnvironmentFile'
        defaults = open(tmp + m.group(1)).read()
        assert re.search(r'(?m)^SC_REMOTED_OPTS="-P 31337 -U /run/sc_remoted '
                         r'-M /run/sc_remoted/mux -O allowgroup '
                         r'-O spool-dir=/var/cache/sc_remoted '
                         r'-O spool-max=256m -O spool-total=1g"$',
                         defaults), defaults
        # the spool goes where the unit lets it write: its CacheDirectory
        m = re.search(r'(?m)^CacheDirectory=(\S+)$', text)
        assert m and '-O spool-dir=/var/cache/%s ' % m.group(1) in defaults, \
            'spool-dir is not the CacheDirectory'
        assert re.search(r'(?m)^CacheDirectoryMode=0700$', text), \
            'CacheDirectoryMode=0700'
        m = re.search(r'(?m)^Environment="SC_REMOTED_OPTS=(.*)"$', text)
        assert m and ('SC_REMOTED_OPTS="%s"' % m.group(1)) in defaults, \
            'the unit\'s fallback options differ from the options file'
        assert len(re.findall(r'(?m)^#', defaults)) > 10, 'not commented'
        for want in ['Type=notify', 'RuntimeDirectory=sc_remoted',
                     'ExecReload=/bin/kill -HUP $MAINPID'] + HARDENING:
            assert re.search(r'(?m)^%s$' % re.escape(want), text), want
        assert not re.search(r'@[A-Za-z_]+@', re.sub(r'(?m)^#.*$', '', text)), \
            'unsubstituted @VAR@'
        # verify, with ExecStart pointed at the staged binary
        staged = os.path.join(tmp, 'sc_remoted.service')
        with open(staged, 'w') as f:
            f.write(text.replace('ExecStart=' + binary,
                                 'ExecStart=' + tmp + binary))
        p = subprocess.run(['systemd-analyze', 'verify', '--man=no', staged],
                           capture_output=True, text=True, timeout=60)
        print('systemd-analyze verify: exit %d\n%s%s' % (p.returncode,
                                                         p.stdout, p.stderr))
        if p.returncode != 0 or p.stderr.strip():
            return 1
        # the daemon accepts the default options (paths moved into tmp)
        opts = re.search(r'(?m)^SC_REMOTED_OPTS="(.*)"$', defaults).group(1)
        rund = os.path.join(tmp, 'run')
        os.mkdir(rund)
        cached = os.path.join(tmp, 'cache')
        os.mkdir(cached, 0o700)
        port = scr.free_port()
        args = opts.replace('/run/sc_remoted', rund).replace(
            '/var/cache/sc_remoted', cached).replace(
            '31337', '127.0.0.1:%d' % port).split()
        d = subprocess.Popen([tmp + binary] + args, stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
        try:
            scr.wait_until(lambda: os.path.exists(os.path.join(rund, 'mux'))
                           or d.poll() is not None, 10, what='mux socket')
            assert d.poll() is None, 'the default options did not start'
        finally:
            d.kill()
            d.wait(10)
        print('installed unit and options file: OK')
        return 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == '__main__':
    sys.exit(main())
