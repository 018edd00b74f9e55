#!/usr/bin/env python3
"""Write the seed corpora of the sc_remoted libFuzzer targets.

    python3 tests/fuzz/make-seeds.py [corpus-dir]

The default corpus-dir is tests/fuzz/corpus next to this script; one
subdirectory per target.  Seeds are hand-made valid inputs in the layouts
described at the top of fuzz_remote.c, fuzz_mux.c, fuzz_meta.c and
fuzz_certname.c (fuzz_state's come from the daemon's own saver: see
state_seeds below).  The DER certificates for fuzz_certname are made with the
openssl command (skipped, with a note, when it is missing).
"""

import os
import shutil
import struct
import subprocess
import sys
import tempfile

# ---- remote protocol (PROTOCOL.md 2) ---------------------------------------

MASTER_NEW, CHANNEL_NEW, CHANNEL_FIN, KEEPALIVE, ACK, MASTER_RES = 0, 2, 3, 4, 5, 6
MAGIC = b"FUZZMAGC"  # the first session's magic in fuzz_remote.c


def rp(seq, chan, body):
    return struct.pack(">IIH", seq, chan, len(body)) + body


def master_new(magic, name=None):
    b = bytes([MASTER_NEW, len(magic)]) + magic
    if name is not None:
        n = name.encode() + b"\0"
        b += bytes([len(n)]) + n
    return rp(0, 0, b)


def master_res(magic, rcv_nxt, snd_una, snd_nxt):
    return rp(0, 0, bytes([MASTER_RES, len(magic)]) + magic +
              struct.pack(">III", rcv_nxt, snd_una, snd_nxt))


def ack(seq, acked):
    return rp(seq, 0, bytes([ACK]) + struct.pack(">I", acked))


def keepalive(seq):
    return rp(seq, 0, bytes([KEEPALIVE]))


def fin(seq, chan):
    return rp(seq, 0, bytes([CHANNEL_FIN]) + struct.pack(">I", chan))


def data(seq, chan, payload):
    return rp(seq, chan, payload)


# ---- mux protocol (PROTOCOL.md 5) ------------------------------------------

MUX_CHANNEL_OPEN, MUX_CHANNEL_CLOSE = 3, 4


def mux(chan, payload):
    return struct.pack(">II", chan, len(payload)) + payload


def mux_open(vpid, chan):
    return mux(0, struct.pack(">HII", MUX_CHANNEL_OPEN, vpid, chan))


def mux_ctl(type_, body=b""):
    return mux(0, struct.pack(">H", type_) + body)


# ---- the op/chunk layout shared by fuzz_remote and fuzz_mux ----------------

# chunk lengths selected by the low 4 bits of an op (fz_chunk_len)
CHUNK_LEN = [0, 1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 16, 24, 64, 256, 1024]

# setup2 bits (FZ_S2_* in fuzz_common.h)
S2_LIMITS, S2_SMALLBUF, S2_SELECT = 0x01, 0x02, 0x04


def split(n):
    """Chunk-length indexes whose lengths add up to n (greedy); [0] (an
    empty chunk) for 0."""
    out = []
    while n > 0:
        i = max(j for j, v in enumerate(CHUNK_LEN) if v <= n)
        out.append(i)
        n -= CHUNK_LEN[i]
    return out or [0]


def remote_plan(action, n):
    """fuzz_remote: -U client writes (4, 12), byte-wise writes (14) and
    bursts (15) span chunks; other actions happen after the last chunk, earlier
    chunks being plain writes."""
    if action in (4, 14, 15):
        return [action] * n
    if action == 12:
        return [4] * (n - 1) + [12]
    return [0] * (n - 1) + [action]


def mux_plan(action, n):
    """fuzz_mux: writes span chunks; a synthesized frame or cut must be
    one chunk; connect-then-write actions come first."""
    if action in (0, 1, 2, 13, 14, 15):
        return [action] * n
    assert action not in (3, 5) or n == 1, "op %d needs one chunk" % action
    if action == 6:
        return [6] + [1] * (n - 1)
    if action == 7:
        return [7] + [0] * (n - 1)
    if action == 11:
        return [1] * (n - 1) + [11]
    return [0] * (n - 1) + [action]


def layout(setup, setup2, steps, rest=b"", plan=remote_plan):
    """The setup bytes, the ops and the stream for (action, bytes) steps;
    each step is cut into chunks of the lengths an op can select."""
    ops, stream = [], b""
    for action, b in steps:
        idx = split(len(b))
        for a, i in zip(plan(action, len(idx)), idx):
            ops.append((a << 4) | i)
        stream += b
    assert len(ops) < 64, "too many ops"
    return bytes([setup, setup2, len(ops)]) + bytes(ops) + stream + rest


def plain(setup, stream, setup2=0):
    """No ops: the whole stream in one write."""
    return bytes([setup, setup2, 0]) + stream


# ---- seeds -----------------------------------------------------------------

def remote_seeds():
    s = {}
    # mode 0: the whole handshake in the stream
    s["handshake-new"] = plain(0x00, (
        master_new(b"SEEDMAGC", "seed.mon") + keepalive(0) +
        data(0, 7, b"unknown channel\n") + fin(1, 7) + keepalive(2)))
    # mode 0, the same split at every byte of the first frame (op 14)
    s["handshake-split"] = layout(
        0x00, 0, [(14, master_new(b"SEEDMAGC")[:24])],
        master_new(b"SEEDMAGC")[24:] + keepalive(0))
    # mode 0 on the select backend, the frame split across reads
    s["handshake-select"] = layout(
        0x00, S2_SELECT, [(0, master_new(b"SEEDMAGC")[:7]),
                          (0, master_new(b"SEEDMAGC")[7:13])],
        master_new(b"SEEDMAGC")[13:] + keepalive(0))
    # mode 1 with two -U clients: CHANNEL_NEW 1 and 2 are seqs 0 and 1
    setup = 0x01 | (2 << 2) | 0x40
    s["go-channels"] = layout(setup, 0, [
        (0, ack(0, 0) + ack(0, 1)),
        (0, data(0, 1, b"MORE\n")),
        (4, b"done\n"),                   # client 1 -> scamper: seq 2
        (0, ack(1, 2)),
        (0, data(1, 2, b"OK id-1\n")),
        (5, fin(2, 1)),                   # then a client half-closes
    ], keepalive(3) + data(3, 2, b"DATA 5 id-1\nbegin\n") + fin(4, 2))
    # mode 1, one client; it half-closes and remoted sends FIN (seq 1)
    setup = 0x01 | (1 << 2) | 0x40
    s["go-client-eof"] = layout(setup, 0, [
        (5, ack(0, 0)),
    ], fin(0, 1) + ack(1, 1))
    # mode 1: a client connects later (op 7), then the link times out
    s["go-new-client"] = layout(0x01 | 0x10, 0, [
        (7, keepalive(0)),
        (2, ack(0, 0)),
        (0, data(0, 1, b"MORE\n")),
        (3, keepalive(1)),                 # 61 s: rx_abort, zombie, -Z 60
    ])
    # mode 1, small limits and buffers: the client stops reading while
    # scamper sends 24 x 512 bytes (op 15), over buffer-high, so the VP
    # is paused; 61 s pass (rx_abort does not apply while paused), then 61
    # more (the stall timeout is 90), then it reads again
    setup = 0x01 | (1 << 2) | 0x40
    s["go-backpressure"] = layout(setup, S2_LIMITS | S2_SMALLBUF, [
        (9, ack(0, 0)),                    # clients stop reading
        (15, bytes([0x00] * 24)),
        (3, b""),
        (3, b""),
        (9, b""),                          # clients read again
    ], b"")
    # as above, but the client reads again before the stall timeout
    s["go-backpressure-resume"] = layout(setup, S2_LIMITS | S2_SMALLBUF, [
        (9, ack(0, 0)),
        (15, bytes([0x00] * 24)),
        (1, b""),
        (9, b""),
        (15, bytes([0x00] * 4 + [0x03, 0x01])),
    ], b"")
    # mode 1, small limits: the client writes more than unacked-max
    s["go-unacked-full"] = layout(setup, S2_LIMITS, [
        (10, ack(0, 0)),                   # scamper stops reading
        (4, b"x" * 1500),
        (4, b"y" * 1500),
        (10, b""),                         # scamper reads again
        (15, bytes([0x03])),               # and ACKs everything
    ], b"")
    # mode 2: resume a zombie that has one unacked CHANNEL_NEW (seq 0)
    setup = 0x02 | (1 << 2) | 0x40
    s["resume-zombie"] = plain(setup, (
        master_res(MAGIC, 0, 0, 0) + ack(0, 0) + data(0, 1, b"MORE\n") +
        fin(1, 1)))
    # mode 2: scamper already has the CHANNEL_NEW (rcv_nxt 1)
    s["resume-acked"] = plain(setup, (
        master_res(MAGIC, 1, 0, 0) + keepalive(0) + data(0, 1, b"MORE\n")))
    # mode 3: take a live session over
    setup = 0x03 | (1 << 2) | 0x40
    s["takeover-live"] = plain(setup, (
        master_res(MAGIC, 0, 0, 0) + ack(0, 0) + keepalive(0)))
    # mode 2 rejections: unknown magic, inconsistent rcv_nxt
    s["resume-unknown"] = plain(0x02, master_res(b"NOSUCHMG", 0, 0, 0))
    s["resume-badseq"] = plain(0x02 | (1 << 2), master_res(MAGIC, 5, 0, 0))
    # mode 1: cut the connection (op 8), resume on the next one
    setup = 0x01 | (1 << 2) | 0x40
    s["cut-resume"] = layout(setup, 0, [
        (2, ack(0, 0)),                    # then 31 s: keepalive
        (8, keepalive(0)),                 # then the connection is cut
    ], master_res(MAGIC, 1, 0, 0) + data(0, 1, b"MORE\n") + fin(1, 1))
    # mode 1: a parallel connection (op 13) takes the live session over
    s["parallel-takeover"] = layout(setup, 0, [
        (13, ack(0, 0)),
    ], master_res(MAGIC, 1, 0, 0) + data(0, 1, b"MORE\n"))
    # mode 1, -Z 1: cut, the zombie expires, a resume is rejected
    s["zombie-expired"] = layout(0x01 | (2 << 4) | 0x40, 0, [
        (8, keepalive(0)),
        (3, b""),
    ], master_res(MAGIC, 0, 0, 0))
    return s


def mux_seeds():
    s = {}
    s["open-data"] = plain(0x00, (
        mux_open(1, 1) + mux(1, b"ping -c 1 127.0.0.1\n") +
        mux_ctl(9, b"ignored") + mux_ctl(MUX_CHANNEL_CLOSE, b"\0\0\0\1") +
        mux(1, b"done\n")))
    # two VPs, metadata, a -U client on VP 1 (remote channel 1), and a
    # second mux client; scamper answers on the channels
    setup = 0x01 | 0x08 | 0x10 | 0x40
    s["two-vps"] = layout(setup, 0, [
        (0, mux_open(1, 1) + mux_open(2, 2)),
        (3, bytes([0x04]) + b"MORE\n"),         # VP 1, remote channel 2
        (3, bytes([0x03])),                     # VP 1: ACK everything
        (3, bytes([0x80]) + b"MORE\n"),         # VP 2, remote channel 1
        (3, bytes([0x05])),                     # VP 1: FIN channel 2
        (1, mux_open(2, 5) + mux(5, b"done\n")),
        (5, bytes([0x81, 0])),                  # VP 2 cut and resumed
        (3, bytes([0x83])),                     # VP 2: ACK everything
    ], mux(1, b"late\n") + mux(2, b"to vp2\n"), mux_plan)
    # a channel opened on a zombie, which then expires (-Z 1)
    s["zombie-expiry"] = layout(0x02 << 1, 0, [
        (0, mux_open(1, 1)),
        (5, bytes([0x00])),                     # VP 1 cut, no resume
        (0, mux_open(1, 2) + mux(2, b"queued\n")),
        (4, mux(1, b"x")),                      # then 61 s
    ], mux(2, b"after depart\n"), mux_plan)
    # a rejected resume, then the session is still a zombie
    s["resume-rejected"] = layout(0x00, 0, [
        (0, mux_open(1, 1)),
        (5, bytes([0x03, 0])),
        (3, bytes([0x02])),
    ], mux(1, b"hello\n"), mux_plan)
    # mux client 1 connects early, disconnects, and a new one connects
    s["reconnect"] = layout(0x20 | 0x80, 0, [
        (0, mux_open(1, 1) + mux(1, b"MORE\n")),
        (7, mux_open(1, 1)),
        (3, bytes([0x04]) + b"OK\n"),
    ], mux(1, b"done\n"), mux_plan)
    # small limits and buffers: mux client 1 stops reading while scamper
    # bursts data at it (the VP is paused), then the stall timer (90 s)
    # fires
    s["backpressure"] = layout(0x00, S2_LIMITS | S2_SMALLBUF, [
        (10, mux_open(1, 1)),                   # client 1 stops reading
        (14, bytes([0x00] * 24)),               # 24 x 512 bytes on ch 1
        (4, b""),                               # 61 s
        (4, b""),                               # 122 s: stalled
    ], mux(1, b"gone\n"), mux_plan)
    # small limits: scamper stops reading and ACKing while the client
    # writes more than unacked-max, on the select backend
    s["unacked-full"] = layout(0x00, S2_LIMITS | S2_SELECT, [
        (12, mux_open(1, 1)),                   # scamper stops reading
        (0, mux(1, b"z" * 1500)),
        (0, mux(1, b"w" * 1500)),
        (12, mux(1, b"more\n")),                # scamper reads again
        (3, bytes([0x03])),                     # and ACKs everything
    ], mux(1, b"done\n"), mux_plan)
    # errors that close the client
    s["short-ctl"] = plain(0x00, mux(0, b"\3"))
    s["reused-chan"] = plain(0x00, mux_open(1, 1) + mux_open(1, 1))
    s["unknown-vp"] = plain(0x00, mux_open(9999, 1))
    return s


def meta_seeds():
    return {
        "full": (b"# sc_remoted metadata\n"
                 b"vp1.example asn4 64496\n"
                 b"vp1.example asn6 64497\n"
                 b"vp1.example latlong -37.78,175.28\n"
                 b"vp1.example cc NZ\n"
                 b"vp1.example st WKO\n"
                 b"vp1.example place Hamilton, New Zealand  \n"
                 b"vp1.example shortname ham\n"
                 b"vp1.example iata HLZ\n"
                 b"vp1.example tag one\n"
                 b"vp1.example TAG two\n"
                 b"\n"
                 b"vp2 CC us\r\n"
                 b"vp2 colour blue\n"
                 b"vp2 cc ca"),
        "first-unknown-key": b"a unknown value\nb cc nz\n",
        "bad-novalue": b"vp1 cc\n",
        "bad-blank": b"vp1 cc nz\n \n",
        "indented": b"  cc nz\n#comment\n",
    }


def certname_seeds(tmp):
    s = {}

    def nm(pat, name):
        return bytes([len(pat)]) + pat + name

    s["exact"] = nm(b"vp1.example.org", b"VP1.Example.ORG")
    s["wildcard"] = nm(b"*.example.org", b"vp1.example.org")
    s["wildcard-two-labels"] = nm(b"*.example.org", b"a.b.example.org")
    s["partial-wildcard"] = nm(b"f*.x", b"fa.x")
    if shutil.which("openssl") is None:
        print("make-seeds: no openssl command; no DER certificate seeds",
              file=sys.stderr)
        return s
    certs = {
        "cert-san": ("/CN=other.example.org",
                     "subjectAltName=DNS:vp1.example.org,DNS:*.example.net,"
                     "email:ops@example.org"),
        "cert-cn": ("/CN=vp1.example.org", None),
        "cert-wildcard-cn": ("/O=Example/CN=*.example.org", None),
    }
    key = os.path.join(tmp, "key.pem")
    subprocess.run(["openssl", "ecparam", "-name", "prime256v1", "-genkey",
                    "-noout", "-out", key], check=True)
    for name, (subj, ext) in certs.items():
        der = os.path.join(tmp, name + ".der")
        cmd = ["openssl", "req", "-x509", "-new", "-key", key, "-days",
               "3650", "-subj", subj, "-outform", "DER", "-out", der]
        if ext is not None:
            cmd += ["-addext", ext]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        with open(der, "rb") as f:
            s[name] = f.read()
    return s


def svc_seeds():
    """fuzz_svc: JOURNAL_STREAM values and syslog messages, then
    (site, clock step) pairs for the rate limiter."""
    s = {}
    s["journal"] = b"2049:123456"
    s["journal-junk"] = b"2049:123456x"
    s["message"] = b"vp_set_state: 192.0.2.1:4000: vp 1 vp1: arrived"
    s["flood-one-site"] = bytes([7, 0] * 40)
    s["flood-sites"] = bytes(b for i in range(60) for b in (i, i % 3))
    s["flood-expire"] = bytes([1, 0] * 10 + [1, 255] + [2, 2] * 8 + [3, 255])
    return s


# ---- CIDR networks (fuzz_cidr.c: 16 address bytes, then the text) ---------

def cidr_seeds():
    v4 = bytes([10, 1, 2, 3]) + bytes(12)
    v6 = bytes.fromhex("20010db8000000010000000000000009")
    mapped = bytes(10) + b"\xff\xff" + bytes([127, 0, 0, 2])
    texts = {
        "v4_host": (v4, "10.1.2.3"),
        "v4_net": (v4, "10.0.0.0/8"),
        "v4_hostbits": (v4, "10.1.2.3/14"),
        "v4_zero": (v4, "0.0.0.0/0"),
        "v4_miss": (v4, "192.168.0.0/16"),
        "v6_host": (v6, "2001:db8:0:1::9"),
        "v6_64": (v6, "2001:db8:0:1::/64"),
        "v6_odd": (v6, "2001:db8::/33"),
        "v6_loop": (v6, "::1"),
        "mapped_v4rule": (mapped, "127.0.0.0/8"),
        "mapped_v6rule": (mapped, "::ffff:127.0.0.2/128"),
        "bad_len": (v4, "10.0.0.0/33"),
        "bad_sign": (v4, "10.0.0.0/+8"),
        "bad_name": (v4, "example.org/8"),
        "bad_empty": (v4, "/8"),
        "bad_two": (v4, "10.0.0.0/8/8"),
    }
    return {k: a + t.encode() for k, (a, t) in texts.items()}

# ---- live-upgrade state (sc_remoted.c, section "Live upgrade") -------------
#
# The fuzz_state seeds state-* are written by the daemon's own saver:
# tests/upgrade/state_seeds (built by `make check`) builds real objects and
# saves them; run it with the corpus directory as its argument.  This
# script runs it when it finds it (STATE_SEEDS in the environment, or a
# build/ directory next to the sources).  The v1-state-* seeds are states
# of the previous, positional layout (UPG_VERSION 1), which the loader
# still reads; they are kept as they are.


def state_seeds(out):
    here = os.path.dirname(os.path.abspath(__file__))
    prog = os.environ.get("STATE_SEEDS") or os.path.join(
        here, "..", "..", "build", "tests", "upgrade", "state_seeds")
    d = os.path.join(out, "fuzz_state")
    if not os.access(prog, os.X_OK):
        print("fuzz_state: %s not built; state seeds left as they are" % prog)
        return
    os.makedirs(d, exist_ok=True)
    subprocess.run([prog, d], check=True, stdout=subprocess.DEVNULL)
    print("fuzz_state: seeds written by %s into %s" % (prog, d))


def http_seeds():
    return {
        "get_metrics": b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n",
        "head_vps_10": b"HEAD /vps?x=1 HTTP/1.0\nConnection: keep-alive\n\n",
        "pipelined": (b"GET /vps HTTP/1.1\r\n\r\n"
                      b"GET /metrics HTTP/1.1\r\nConnection: close\r\n\r\n"),
        "post_len0": b"POST / HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
        "body": b"POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello",
        "fold": b"GET / HTTP/1.1\r\nA: b\r\n c\r\n\r\n",
        "utf8": "GET /\u00e9 HTTP/1.1\r\nX: \u20ac\xff\r\n\r\n".encode(
            "utf-8", "surrogateescape"),
        "binary": bytes(range(256)),
        "json": b'name "quoted" \\ back\x01\x7f \xc3\xa9 \xed\xa0\x80 \xf4\x90',
    }


# ---- PROXY protocol headers (fuzz_proxy.c: the connection's first bytes) --

def proxy_seeds():
    sig = b"\r\n\r\n\x00\r\nQUIT\n"

    def v2(vercmd, fam, body):
        return sig + bytes([vercmd, fam]) + struct.pack(">H", len(body)) + body

    a4 = bytes([127, 0, 0, 5, 127, 0, 0, 1]) + struct.pack(">HH", 4242, 8000)
    a6 = bytes(15) + b"\x01" + bytes(15) + b"\x02" + struct.pack(">HH", 1, 2)
    tlvs = b"\x04\x00\x02xy" + b"\x20\x00\x05\x01\x00\x00\x00\x00"
    crc_hdr = v2(0x21, 0x11, a4 + b"\x03\x00\x04" + bytes(4))
    return {
        "v1_tcp4": b"PROXY TCP4 192.0.2.7 198.51.100.1 40000 2000\r\n\x00",
        "v1_tcp6": b"PROXY TCP6 2001:db8::1 ::1 0 65535\r\nrest",
        "v1_unknown": b"PROXY UNKNOWN\r\n",
        "v1_unknown_addr": b"PROXY UNKNOWN ::1 ::1 1 2\r\n",
        "v1_lf_only": b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n",
        "v1_long": b"PROXY TCP4 " + b"1" * 120 + b"\r\n",
        "v2_tcp4": v2(0x21, 0x11, a4) + b"\x00\x00\x00\x0a",
        "v2_tcp6": v2(0x21, 0x21, a6),
        "v2_tlvs": v2(0x21, 0x11, a4 + tlvs),
        "v2_crc_zero": crc_hdr,
        "v2_local": v2(0x20, 0x00, b""),
        "v2_local_addr": v2(0x20, 0x11, a4),
        "v2_unix": v2(0x21, 0x31, bytes(216)),
        "v2_udp": v2(0x21, 0x12, a4),
        "v2_short": v2(0x21, 0x21, a4),
        "v2_bad_tlv": v2(0x21, 0x11, a4 + b"\x04\x00\x09x"),
        "v2_long": sig + b"\x21\x11\x04\x00",
        "not_proxy": b"\x00\x00\x00\x00\x00\x00\x00\x00\x00\x0a",
    }


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(here, "corpus")
    with tempfile.TemporaryDirectory() as tmp:
        targets = {
            "fuzz_remote": remote_seeds(),
            "fuzz_mux": mux_seeds(),
            "fuzz_meta": meta_seeds(),
            "fuzz_certname": certname_seeds(tmp),
            "fuzz_svc": svc_seeds(),
            "fuzz_cidr": cidr_seeds(),
            "fuzz_http": http_seeds(),
            "fuzz_proxy": proxy_seeds(),
        }
        for target, seeds in targets.items():
            d = os.path.join(out, target)
            os.makedirs(d, exist_ok=True)
            for name, blob in seeds.items():
                assert len(blob) < 4096, (target, name, len(blob))
                with open(os.path.join(d, name), "wb") as f:
                    f.write(blob)
            print("%s: %d seeds in %s" % (target, len(seeds), d))
    state_seeds(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
