#!/usr/bin/env python3
"""MQTT side of the power-cut test (tests/powercut/run.sh): a raw-socket MQTT 3.1.1 client,
so that what counts as acknowledged is exactly what came back on the wire.

  powercut.py wait-ready --port P --timeout S
  powercut.py setup      --port P --prefix R
  powercut.py publish    --port P --prefix R --state FILE --kill-pid PID --kill-after N
  powercut.py check      --port P --prefix R --state FILE

setup: the persistent sessions R-sub-q1 (R/q1/# at QoS 1) and R-sub-q2 (R/q2/# at QoS 2),
MQTT 3.1.1 with clean session 0, and R-sub-v5q2 (R/q2/# at QoS 2), MQTT 5 with a Session
Expiry Interval of an hour, subscribe and go away.
publish: three publishers stream at once, each with up to WINDOW messages in flight: QoS 1 to
R/q1/0..3, QoS 2 to R/q2/0..3, retained QoS 1/2 to R/r/0..7. A message counts as acknowledged
when its PUBACK (QoS 1) or its PUBREC (QoS 2: from then on the broker owns it; a publisher
would never send it again) has been read. When N messages are acknowledged in all, the VM
(PID) gets SIGKILL; the publishers keep reading until their connections drop. The state file
records what was sent and what was acknowledged.
check: the sessions come back (session present must be 1) and take everything queued; a
fresh client subscribes to R/r/#. Every acknowledged message must be delivered, in publish
order per topic; QoS 2 messages at most once; every retained topic must hold its last
acknowledged value or a later one that was sent. Prints figures, exits 1 on any failure.
"""
import argparse
import json
import os
import random
import select
import signal
import socket
import struct
import sys
import time

CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, PINGREQ, PINGRESP, DISCONNECT = 8, 9, 12, 13, 14


class Closed(Exception):
    pass


def enc_str(s):
    b = s.encode()
    return struct.pack(">H", len(b)) + b


def enc_len(n):
    out = bytearray()
    while True:
        d = n % 128
        n //= 128
        out.append(d | (0x80 if n else 0))
        if not n:
            return bytes(out)


def skip_props(b):
    """b without the MQTT 5 properties (length-prefixed) at its start."""
    n, mult, i = 0, 1, 0
    while True:
        d = b[i]
        n += (d & 0x7F) * mult
        mult *= 128
        i += 1
        if not d & 0x80:
            return b[i + n:]


class Conn:
    """MQTT 3.1.1, or MQTT 5 (v5=True) with a Session Expiry Interval of an hour."""

    def __init__(self, port, client_id, clean, timeout=10.0, keepalive=120, v5=False):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""
        self.closed = False
        self.v5 = v5
        vh = enc_str("MQTT") + bytes([5 if v5 else 4, 0x02 if clean else 0x00]) + struct.pack(">H", keepalive)
        if v5:
            vh += bytes([5, 0x11]) + struct.pack(">I", 3600)
        self.send(CONNECT << 4, vh + enc_str(client_id))
        t, _, body = self.read(time.monotonic() + timeout)
        if t != CONNACK or len(body) < 2 or (not v5 and len(body) != 2):
            raise Closed(f"{client_id}: expected CONNACK, got type {t}")
        if body[1] != 0:
            raise Closed(f"{client_id}: CONNACK return code {body[1]}")
        self.session_present = bool(body[0] & 1)

    def send(self, first, body):
        self.sock.sendall(bytes([first]) + enc_len(len(body)) + body)

    def parse(self):
        """One packet from the buffer, or None."""
        b = self.buf
        if len(b) < 2:
            return None
        n, mult, i = 0, 1, 1
        while True:
            if i >= len(b):
                return None
            d = b[i]
            n += (d & 0x7F) * mult
            mult *= 128
            i += 1
            if not d & 0x80:
                break
        if len(b) < i + n:
            return None
        self.buf = b[i + n:]
        return b[0] >> 4, b[0] & 0x0F, b[i:i + n]

    def fill(self, timeout):
        """Reads what is there (waiting up to timeout); raises Closed at EOF or reset."""
        r, _, _ = select.select([self.sock], [], [], max(timeout, 0))
        if not r:
            return False
        try:
            data = self.sock.recv(65536)
        except OSError as e:
            self.closed = True
            raise Closed(str(e))
        if not data:
            self.closed = True
            raise Closed("EOF")
        self.buf += data
        return True

    def read(self, deadline):
        while True:
            p = self.parse()
            if p:
                return p
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no packet before the deadline")
            self.fill(left)

    def subscribe(self, topic, qos):
        props = b"\x00" if self.v5 else b""
        self.send((SUBSCRIBE << 4) | 2, struct.pack(">H", 1) + props + enc_str(topic) + bytes([qos]))
        deadline = time.monotonic() + 10
        while True:
            t, _, body = self.read(deadline)
            if t == SUBACK:
                codes = skip_props(body[2:]) if self.v5 else body[2:]
                if codes[0] != qos:
                    raise Closed(f"SUBACK granted {codes[0]} for {topic}, wanted {qos}")
                return

    def disconnect(self):
        try:
            self.send(DISCONNECT << 4, b"")
            self.sock.close()
        except OSError:
            pass


def wait_ready(a):
    deadline = time.monotonic() + a.timeout
    last = None
    while time.monotonic() < deadline:
        if a.pid:
            try:
                os.kill(a.pid, 0)
            except OSError:
                print(f"powercut: the VM (pid {a.pid}) is gone", file=sys.stderr)
                return 1
        try:
            c = Conn(a.port, "pc-probe", True, timeout=2)
            c.disconnect()
            return 0
        except (OSError, Closed, TimeoutError) as e:
            last = e
            time.sleep(0.2)
    print(f"powercut: broker not ready on port {a.port} after {a.timeout}s ({last})", file=sys.stderr)
    return 1


# The persistent sessions: (session name, stream, QoS, MQTT 5). The MQTT 5 session takes the
# QoS 2 stream too, with a Session Expiry Interval instead of clean session 0.
SESSIONS = (("q1", "q1", 1, False), ("q2", "q2", 2, False), ("v5q2", "q2", 2, True))


def setup(a):
    for sess, stream, qos, v5 in SESSIONS:
        c = Conn(a.port, f"{a.prefix}-sub-{sess}", False, v5=v5)
        c.subscribe(f"{a.prefix}/{stream}/#", qos)
        c.disconnect()
    return 0


class Stream:
    """One publisher: its connection, what it sent and what came back."""

    def __init__(self, name, port, prefix, topics, qos_of, retain, limit):
        self.name, self.prefix, self.topics, self.qos_of, self.retain = name, prefix, topics, qos_of, retain
        self.limit = limit
        self.conn = Conn(port, f"{prefix}-pub-{name}", True)
        self.seq = 0
        self.free = list(range(65535, 0, -1))
        self.pending = {}  # packet id -> (seq, qos) not yet PUBACK/PUBREC'd
        self.releasing = set()  # packet ids PUBREL'd, waiting for PUBCOMP
        self.sent = []  # [seq, topic index, qos]
        self.acked = []  # seqs in the order acknowledged
        self.completed = 0  # QoS 2 PUBCOMPs read
        self.error = None

    def topic(self, i):
        return f"{self.prefix}/{self.name}/{i}"

    def send_one(self):
        seq = self.seq
        self.seq += 1
        ti = seq % self.topics
        qos = self.qos_of(ti)
        pid = self.free.pop()
        payload = f"{self.name} {ti} {seq} ".encode().ljust(96, b".")
        first = (PUBLISH << 4) | (qos << 1) | (1 if self.retain else 0)
        self.pending[pid] = (seq, qos)
        self.sent.append([seq, ti, qos])
        self.conn.send(first, enc_str(self.topic(ti)) + struct.pack(">H", pid) + payload)

    def handle(self, t, body):
        pid = struct.unpack(">H", body[:2])[0]
        if t == PUBACK or t == PUBREC:
            seq, qos = self.pending.pop(pid)
            self.acked.append(seq)
            if t == PUBREC:
                self.releasing.add(pid)
                self.conn.send((PUBREL << 4) | 2, struct.pack(">H", pid))
            else:
                self.free.append(pid)
            return True
        if t == PUBCOMP:
            self.releasing.discard(pid)
            self.free.append(pid)
            self.completed += 1
        return False


def publish(a):
    rng = random.Random(a.seed)
    p = a.prefix
    streams = [
        Stream("q1", a.port, p, 4, lambda i: 1, False, a.limit),
        Stream("q2", a.port, p, 4, lambda i: 2, False, a.limit),
        Stream("r", a.port, p, 8, lambda i: 1 + (i % 2), True, a.limit),
    ]
    acked = 0
    killed_at = None
    t0 = time.monotonic()
    deadline = t0 + a.timeout
    while time.monotonic() < deadline:
        live = [s for s in streams if not s.conn.closed]
        if not live:
            break
        if killed_at is None:
            for s in live:
                # A little randomness in the window keeps the cut from always landing at the
                # same point of a burst.
                window = rng.randint(1, a.window)
                while len(s.pending) < window and s.seq < s.limit:
                    try:
                        s.send_one()
                    except OSError as e:
                        s.error = str(e)
                        s.conn.closed = True
                        break
        elif time.monotonic() - killed_at > 10:
            break
        live = [s for s in streams if not s.conn.closed]
        if not live:
            break
        ready, _, _ = select.select([s.conn.sock for s in live], [], [], 0.5)
        for s in live:
            if s.conn.sock not in ready:
                continue
            try:
                s.conn.fill(0)
                while True:
                    pkt = s.conn.parse()
                    if pkt is None:
                        break
                    if s.handle(pkt[0], pkt[2]):
                        acked += 1
                        if killed_at is None and acked >= a.kill_after:
                            os.kill(a.kill_pid, signal.SIGKILL)
                            killed_at = time.monotonic()
            except Closed as e:
                s.error = s.error or str(e)
        if killed_at is None and all(s.seq >= s.limit and not s.pending for s in streams):
            # Everything sent and acknowledged before the target: cut now.
            os.kill(a.kill_pid, signal.SIGKILL)
            killed_at = time.monotonic()
    if killed_at is None:
        print("powercut: publish phase timed out before the cut", file=sys.stderr)
        os.kill(a.kill_pid, signal.SIGKILL)
        killed_at = time.monotonic()
    state = {
        s.name: {"sent": s.sent, "acked": s.acked, "completed": s.completed, "in_flight": len(s.pending),
                 "error": s.error, "topics": s.topics, "retain": s.retain}
        for s in streams
    }
    state["_"] = {"cut_after_s": round(killed_at - t0, 3), "acked": acked, "kill_after": a.kill_after}
    with open(a.state, "w") as f:
        json.dump(state, f)
    total_sent = sum(len(s.sent) for s in streams)
    print(f"publish: {total_sent} sent, {acked} acknowledged "
          f"(q1 {len(streams[0].acked)}, q2 {len(streams[1].acked)} PUBREC/{streams[1].completed} PUBCOMP, "
          f"retained {len(streams[2].acked)}), {sum(len(s.pending) for s in streams)} unacknowledged "
          f"in flight at the cut, cut after {killed_at - t0:.2f}s")
    return 0


def drain(conn, quiet, deadline, expect=None, settle=1.0):
    """Takes every PUBLISH the broker sends until it has been quiet for `quiet` seconds (or
    for `settle` seconds once expect(got) is true, i.e. everything required has come):
    [(topic, payload, qos, dup)], acknowledging as a receiver does (QoS 2: PUBREC, then
    PUBCOMP for the PUBREL; a DUP re-send of an id still waiting for PUBREL is not a new
    message)."""
    got = []
    waiting_rel = set()
    last = time.monotonic()
    while True:
        now = time.monotonic()
        limit = settle if expect and expect(got) else quiet
        if now - last > limit or now > deadline:
            return got
        p = conn.parse()
        if p is None:
            conn.fill(0.2)
            continue
        t, flags, body = p
        last = time.monotonic()
        if t == PUBLISH:
            qos = (flags >> 1) & 3
            dup = bool(flags & 8)
            tl = struct.unpack(">H", body[:2])[0]
            topic = body[2:2 + tl].decode()
            rest = body[2 + tl:]
            pid = None
            if qos:
                pid = struct.unpack(">H", rest[:2])[0]
                rest = rest[2:]
            if conn.v5:
                rest = skip_props(rest)
            if qos == 2 and pid in waiting_rel:
                conn.send(PUBREC << 4, struct.pack(">H", pid))
                continue
            got.append((topic, rest, qos, dup))
            if qos == 1:
                conn.send(PUBACK << 4, struct.pack(">H", pid))
            elif qos == 2:
                waiting_rel.add(pid)
                conn.send(PUBREC << 4, struct.pack(">H", pid))
        elif t == PUBREL:
            pid = struct.unpack(">H", body[:2])[0]
            waiting_rel.discard(pid)
            conn.send(PUBCOMP << 4, struct.pack(">H", pid))


def parse_payload(payload):
    name, ti, seq = payload.split(b" ")[:3]
    return name.decode(), int(ti), int(seq)


def check(a):
    with open(a.state) as f:
        state = json.load(f)
    failures = []
    p = a.prefix
    figures = []
    t0 = time.monotonic()
    for sess, name, qos, v5 in SESSIONS:
        st = state[name]
        sent = {seq: ti for seq, ti, _ in st["sent"]}
        acked = set(st["acked"])
        c = Conn(a.port, f"{p}-sub-{sess}", False, v5=v5)
        if not c.session_present:
            failures.append(f"{sess}: session {p}-sub-{sess} not present after the cut")
        want = len(acked)
        got = drain(c, a.quiet, time.monotonic() + a.timeout,
                    lambda g: len(g) >= want and acked <= {parse_payload(m[1])[2] for m in g}, a.settle)
        c.disconnect()
        per_topic = {}
        counts = {}
        for topic, payload, dqos, dup in got:
            sname, ti, seq = parse_payload(payload)
            if sname != name or topic != f"{p}/{name}/{ti}" or sent.get(seq) != ti:
                failures.append(f"{sess}: delivered a message never sent: {topic} {payload[:30]!r}")
                continue
            counts[seq] = counts.get(seq, 0) + 1
            per_topic.setdefault(ti, []).append(seq)
        missing = sorted(acked - counts.keys())
        if missing:
            failures.append(f"{sess}: {len(missing)} acknowledged messages not delivered, first seqs {missing[:10]}")
        dups = sorted(s for s, n in counts.items() if n > 1)
        if qos == 2 and dups:
            failures.append(f"{sess}: {len(dups)} QoS 2 messages delivered more than once: {dups[:10]}")
        for ti, seqs in sorted(per_topic.items()):
            firsts = list(dict.fromkeys(seqs))
            if firsts != sorted(firsts):
                bad = next(i for i in range(1, len(firsts)) if firsts[i] < firsts[i - 1])
                failures.append(f"{sess}: topic {ti} out of order: ... {firsts[max(0, bad - 2):bad + 2]} ...")
        extra = len(counts.keys() - acked)
        figures.append(f"{sess}: {len(acked)} acknowledged, {len(acked & counts.keys())} recovered, "
                       f"{extra} unacknowledged also delivered, {len(got)} deliveries"
                       + (f" ({len(dups)} duplicates)" if dups else ""))

    st = state["r"]
    sent = {seq: ti for seq, ti, _ in st["sent"]}
    last_acked = {}
    for seq in st["acked"]:
        ti = sent[seq]
        last_acked[ti] = max(last_acked.get(ti, -1), seq)
    c = Conn(a.port, f"{p}-retained-check", True)
    c.subscribe(f"{p}/r/#", 2)
    got = drain(c, a.quiet, time.monotonic() + a.timeout, lambda g: len(g) >= st["topics"], a.settle)
    c.disconnect()
    retained = {}
    for topic, payload, _, _ in got:
        sname, ti, seq = parse_payload(payload)
        if sname != "r" or topic != f"{p}/r/{ti}" or sent.get(seq) != ti:
            failures.append(f"retained: a value never sent: {topic} {payload[:30]!r}")
            continue
        if ti in retained:
            failures.append(f"retained: topic {ti} delivered twice")
        retained[ti] = seq
    ok = 0
    for ti, want in sorted(last_acked.items()):
        have = retained.get(ti)
        if have is None:
            failures.append(f"retained: topic {ti} lost (last acknowledged seq {want})")
        elif have < want:
            failures.append(f"retained: topic {ti} holds seq {have}, older than acknowledged {want}")
        else:
            ok += 1
    figures.append(f"retained: {len(last_acked)} topics with an acknowledged value, {ok} hold it or a later one "
                   f"({len(st['acked'])} retained publishes acknowledged)")
    for line in figures:
        print(f"check: {line}")
    print(f"check: drained in {time.monotonic() - t0:.2f}s")
    for f in failures:
        print(f"check: FAIL {f}")
    summary = {
        "acked": sum(len(state[n]["acked"]) for n in ("q1", "q2", "r")),
        "failures": len(failures),
    }
    if a.summary:
        with open(a.summary, "w") as f:
            json.dump(summary, f)
    return 1 if failures else 0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("phase", choices=["wait-ready", "setup", "publish", "check"])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--prefix", default="pc")
    ap.add_argument("--state")
    ap.add_argument("--summary")
    ap.add_argument("--kill-pid", type=int)
    ap.add_argument("--pid", type=int, help="wait-ready: give up when this process is gone")
    ap.add_argument("--kill-after", type=int, default=1000)
    ap.add_argument("--window", type=int, default=32)
    ap.add_argument("--limit", type=int, default=8000, help="messages per publisher at most")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--quiet", type=float, default=3.0, help="seconds without a delivery that end a drain")
    ap.add_argument("--settle", type=float, default=1.0,
                    help="seconds without a delivery that end a drain once all that is required has come")
    ap.add_argument("--timeout", type=float, default=60.0)
    a = ap.parse_args()
    try:
        return {"wait-ready": wait_ready, "setup": setup, "publish": publish, "check": check}[a.phase](a)
    except (OSError, Closed, TimeoutError) as e:
        print(f"powercut: {a.phase}: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
