#!/usr/bin/env python3
"""Before/after of two sc_remoted builds on the stream and rtt rows of
bench/run, alternating (the order flips each pair), medians and ranges:
  SCBENCH=path/to/scbench [PAIRS=5] [ONLY=case] bench/ab.py BEFORE AFTER
Used for the issue 19 (conn_t) table in BENCHMARKS.md."""
import os, subprocess, sys, tempfile, time, statistics, socket
BIN = {"before": sys.argv[1], "after": sys.argv[2]}
SCB = os.environ.get("SCBENCH", "scbench")  # cc -O2 bench/scbench.c -lssl -lcrypto
PAIRS = int(os.environ.get("PAIRS", "5"))
NB = str(256 << 20)
CASES = [
    ("stream s2c -U 1 chan", ["stream", "-b", NB, "-d", "s2c", "-m", "u", "-n", "1", "-c", "1"]),
    ("stream c2s -U 1 chan", ["stream", "-b", NB, "-d", "c2s", "-m", "u", "-n", "1", "-c", "1"]),
    ("stream s2c -M 1 chan", ["stream", "-b", NB, "-d", "s2c", "-m", "m", "-n", "1", "-c", "1"]),
    ("stream c2s -M 1 chan", ["stream", "-b", NB, "-d", "c2s", "-m", "m", "-n", "1", "-c", "1"]),
    ("stream s2c -U 8 chans / 4 VPs", ["stream", "-b", NB, "-d", "s2c", "-m", "u", "-n", "4", "-c", "8"]),
    ("rtt delayed ACKs, c=1", ["rtt", "-t", "3", "-c", "1"]),
    ("rtt quick ACKs, c=8", ["rtt", "-t", "3", "-c", "8", "-q"]),
]
def port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p
def run(kind, args):
    d = tempfile.mkdtemp(prefix="i19b"); os.mkdir(d + "/u"); p = port()
    dm = subprocess.Popen(["taskset", "-c", "0", BIN[kind], "-P", "127.0.0.1:%d" % p,
                           "-U", d + "/u", "-M", d + "/mux", "-O", "notimes"],
                          stderr=open(d + "/log", "w"))
    for _ in range(500):
        if os.path.exists(d + "/mux"): break
        time.sleep(0.01)
    time.sleep(0.1)
    out = subprocess.run(["taskset", "-c", "1", SCB, "-P", "127.0.0.1:%d" % p, "-p", str(dm.pid),
                          "-U", d + "/u", "-M", d + "/mux"] + args, capture_output=True, text=True, timeout=300).stdout
    dm.terminate(); dm.wait()
    subprocess.run(["rm", "-rf", d])
    r = {}
    for l in out.splitlines():
        if l.startswith("RESULT "):
            _, k, v = l.split(); r[k] = float(v)
    if r.get("failures", 1) != 0 or r.get("daemon_alive", 0) != 1:
        print("FAILED", kind, args, out, file=sys.stderr)
    return r
rows = []
ONLY = os.environ.get("ONLY")
if ONLY: CASES = [c for c in CASES if c[0] == ONLY]
for name, args in CASES:
    res = {"before": [], "after": []}
    for i in range(PAIRS):
        for kind in (("before", "after") if i % 2 == 0 else ("after", "before")):
            res[kind].append(run(kind, args))
    if args[0] == "stream":
        keys = [("MB/s", lambda r: r["mb_per_s"]),
                ("daemon CPU µs/MiB", lambda r: r["daemon_cpu_pct"] / 100 * r["secs"] * 1e6 / (r["bytes"] / 1048576)),
                ("daemon syscalls/MiB", lambda r: (r["daemon_read_syscalls"] + r["daemon_write_syscalls"]) / (r["bytes"] / 1048576))]
    else:
        keys = [("p50 µs", lambda r: r["p50_us"]),
                ("daemon CPU µs/command", lambda r: r["daemon_cpu_pct"] / 100 / r["commands_per_s"] * 1e6),
                ("daemon syscalls/command", lambda r: (r["daemon_read_syscalls"] + r["daemon_write_syscalls"]) / r["commands"])]
    for kn, f in keys:
        b = [f(r) for r in res["before"]]; a = [f(r) for r in res["after"]]
        mb, ma = statistics.median(b), statistics.median(a)
        row = "| %s | %s | %.1f (%.1f–%.1f) | %.1f (%.1f–%.1f) | %.3f |" % (name, kn, mb, min(b), max(b), ma, min(a), max(a), ma / mb if mb else 0)
        rows.append(row); print(row, flush=True)
print()
print("| case | metric | before: main (median, min–max) | after: i19 | after/before |")
print("|---|---|---|---|---|")
for r in rows: print(r)
