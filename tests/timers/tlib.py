"""tlib -- helpers for the timer tests (tests/timers, issue 9).

The timer tests run the daemon AND themselves on one accelerated clock:
main() re-executes the test script under libfaketime (scr.faketime_env),
so inside it time.monotonic(), time.sleep() and every socket timeout run
SPEED times faster, and so does the daemon the script starts (it inherits
the environment).  All times in these tests are daemon seconds.

Bounds.  The daemon stamps last_rx / last_tx / last_progress with whole
ticks and fires a timer on the first wake-up in the tick it is due, so a
deadline of T seconds from a stamp lands within T +/- 1 tick of daemon
time.  A peer sees neither the stamp nor the firing, only its own
observations of them, and every real millisecond a process waits for a
CPU is SPEED milliseconds of daemon time (at x240 a 10 ms stall on a
loaded machine is 2.4 daemon seconds).  So Recorder.interval() accepts
T +/- (1 tick + SLACK), where SLACK is SC_TIMERS_SLACK_MS of real time
(default 80 ms, 19.2 daemon seconds at x240; loaded runs showed 40 ms),
and reports per timer kind how many observations fell within 1 tick;
the long-run test requires most of them to (check_precision).  So the
bounds pin down exactly-once -- a timer firing twice shows an interval
near 0, a missed one near 2T, a wheel wrap error near T +/- 1024 s --
and the share within one tick shows the precision.
"""

import json
import os
import re
import sys
import threading
import time
import traceback

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                '..', 'lib'))
import scr  # noqa: E402

SPEED = float(os.environ.get('SC_TIMERS_SPEED', '240'))
SLACK = float(os.environ.get('SC_TIMERS_SLACK_MS', '80')) / 1000 * SPEED
TICK = 1.0
INNER = 'SC_TIMERS_INNER'


def reexec_accelerated():
    """Run this script again under libfaketime unless already inside;
    exit 77 (skip) when libfaketime is missing."""
    if os.environ.get(INNER) == '1':
        return
    env = scr.faketime_env(SPEED)
    if env is None:
        print('SKIP: libfaketime is not installed (apt-get install '
              'libfaketime); the timer tests need an accelerated clock')
        sys.exit(77)
    env[INNER] = '1'
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable] + sys.argv, env)


class Clock:
    """Daemon-rate seconds since the test began."""

    def __init__(self):
        self.t0 = time.monotonic()
        self.real0 = real_time()

    def now(self):
        return time.monotonic() - self.t0

    def sleep_until(self, t):
        while True:
            d = t - self.now()
            if d <= 0:
                return
            time.sleep(min(d, 30))

    def real_elapsed(self):
        return real_time() - self.real0


def real_time():
    """Real seconds: libfaketime fakes every clock_gettime clock (even
    CLOCK_MONOTONIC_RAW), but not the kernel's /proc/uptime."""
    with open('/proc/uptime') as f:
        return float(f.read().split()[0])


class Recorder:
    """Timer observations and failures from every actor thread."""

    def __init__(self):
        self.lock = threading.Lock()
        self.events = []      # (kind, who, T, lo, hi, ok)
        self.failures = []
        self.counts = {}

    def count(self, what, n=1):
        with self.lock:
            self.counts[what] = self.counts.get(what, 0) + n

    def fail(self, msg):
        with self.lock:
            self.failures.append(msg)

    def interval(self, kind, who, T, earliest, latest):
        """A timer of T seconds was seen to take between earliest and
        latest seconds (the window the peer can see)."""
        early = earliest < T - TICK - SLACK - 0.001
        late = latest > T + TICK + SLACK
        with self.lock:
            self.events.append((kind, who, T, earliest, latest,
                                not early and not late))
            if early:
                self.failures.append('%s %s: early: %.3f s < %g - 1 - %g'
                                     % (kind, who, earliest, T, SLACK))
            if late:
                self.failures.append('%s %s: late: %.3f s > %g + 1 + %g'
                                     % (kind, who, latest, T, SLACK))

    def check_precision(self, min_n=30, share=0.5):
        """Record a failure for each timer kind with at least min_n
        observations of which fewer than share were within 1 tick."""
        for kind, s in sorted(self.summary().items()):
            if s['n'] >= min_n and s['within_1_tick'] < share * s['n']:
                self.fail('%s: only %d of %d within 1 tick'
                          % (kind, s['within_1_tick'], s['n']))

    def summary(self):
        """Per kind: count, min earliest, max latest, how many within
        1 tick on both sides."""
        out = {}
        for kind, who, T, lo, hi, ok in self.events:
            s = out.setdefault(kind, {'T': T, 'n': 0, 'min': None,
                                      'max': None, 'within_1_tick': 0})
            s['n'] += 1
            s['min'] = lo if s['min'] is None else min(s['min'], lo)
            s['max'] = hi if s['max'] is None else max(s['max'], hi)
            if lo >= T - TICK - 0.001 and hi <= T + TICK:
                s['within_1_tick'] += 1
        return out


class Actor(threading.Thread):
    """A thread running body(); an exception is a recorded failure."""

    def __init__(self, rec, name, body):
        super().__init__(daemon=True, name=name)
        self.rec = rec
        self.body = body

    def run(self):
        try:
            self.body()
        except Exception:
            self.rec.fail('%s: %s' % (self.name, traceback.format_exc()))


_TS = re.compile(r'^\[(\d\d):(\d\d):(\d\d):(\d\d\d)\] ')


def log_times(log, regex):
    """(daemon wall-clock seconds, match) for each log line matching regex;
    needs the daemon started with notimes=False.  Times are made
    monotonic across midnight."""
    out = []
    day = 0
    last = None
    rx = re.compile(regex)
    for line in log.splitlines():
        m = _TS.match(line)
        if m is None:
            continue
        t = int(m.group(1)) * 3600 + int(m.group(2)) * 60 + \
            int(m.group(3)) + int(m.group(4)) / 1000.0
        if last is not None and t + day < last - 43200:
            day += 86400
        last = t + day
        mm = rx.search(line)
        if mm:
            out.append((t + day, mm))
    return out


def proc_sample(pid):
    """(RSS KiB, open fds) of pid."""
    rss = None
    with open('/proc/%d/status' % pid) as f:
        for line in f:
            if line.startswith('VmRSS:'):
                rss = int(line.split()[1])
    return rss, len(os.listdir('/proc/%d/fd' % pid))


def is_asan():
    return scr.SC_REMOTED is not None and 'asan' in scr.SC_REMOTED


def dump(obj):
    return json.dumps(obj, indent=1, sort_keys=True)
