#!/usr/bin/env python3
"""MQTT side of the network-namespace bridge test (tests/netns/run.sh), with paho-mqtt 2.x.
Each command runs inside one namespace (`ip netns exec NS python3 netns.py ...`).

  netns.py wait-ready --host H --port P --timeout S [--pid PID]
  netns.py sub    --host H --port P --id ID --topic F --out FILE --ready FILE
  netns.py watch  --host H --port P --topic T --out FILE
  netns.py pub    --host H --port P --id ID --topic T --count N --rate R --acked FILE --timeout S
  netns.py check  --received FILE --acked FILE --count N --timeout S [--all-acked]
  netns.py state  --file FILE --cut T --restore T

wait-ready: until an MQTT CONNECT is answered with a CONNACK (PID, if given, must stay alive).
sub: a persistent MQTT 5 session (Session Expiry Interval one hour, clean start 0) subscribed
to F at QoS 1; appends each payload (a number) to FILE as one line, flushed; touches READY
once the subscription is acknowledged. Runs until SIGTERM.
watch: subscribes to T (the bridge state topic) and appends `<unix time> <payload>` lines to
FILE; reconnects when the broker goes away. Runs until SIGTERM.
pub: a persistent session (MQTT 5, or 3.1.1 with --v311) publishing 1..N at QoS 1 to T at R
messages a second; appends each number to FILE once its PUBACK is read with a success code
(a failure code is counted as refused: an error unless --allow-refused). When the broker goes
away paho reconnects and sends again what was not acknowledged (messages published meanwhile
wait in paho's queue). Exits 0 once all N are acknowledged, 1 at the deadline.
check: waits (up to S seconds) until every acknowledged number (all of 1..N with
--all-acked) has reached the subscriber; prints the figures (received, duplicates, out of
order) and exits 1 if any is missing.
state: the state topic's values around an outage: it must read 1 just before the cut (T, unix
time), 0 at some point between the cut and the restore, and 1 at the end, after the restore.
"""
import argparse
import os
import signal
import socket
import struct
import sys
import threading
import time

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties


def stop_on_term():
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))


def wait_ready(a):
    deadline = time.monotonic() + a.timeout
    connect = b"\x10\x13\x00\x04MQTT\x04\x02\x00\x3c\x00\x07netns-w"
    while time.monotonic() < deadline:
        if a.pid:
            try:
                os.kill(a.pid, 0)
            except ProcessLookupError:
                print(f"wait-ready: process {a.pid} exited", file=sys.stderr)
                return 1
        try:
            with socket.create_connection((a.host, a.port), timeout=1.0) as s:
                s.sendall(connect)
                if s.recv(4)[:1] == b"\x20":
                    return 0
        except OSError:
            pass
        time.sleep(0.1)
    print(f"wait-ready: no CONNACK from {a.host}:{a.port} in {a.timeout}s", file=sys.stderr)
    return 1


def client(client_id, v311=False):
    if v311:
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False,
                        protocol=mqtt.MQTTv311)
    else:
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    c.reconnect_delay_set(min_delay=0.2, max_delay=1)
    return c


def connect(c, a, v311=False):
    if v311:
        c.connect_async(a.host, a.port, keepalive=10)
    else:
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        c.connect_async(a.host, a.port, keepalive=10, clean_start=False, properties=props)


def sub(a):
    stop_on_term()
    out = open(a.out, "a", buffering=1)
    c = client(a.id)

    def on_connect(c, _u, _f, rc, _p):
        if not rc.is_failure:
            c.subscribe(a.topic, qos=1)

    def on_subscribe(_c, _u, _mid, codes, _p):
        if all(not rc.is_failure for rc in codes):
            open(a.ready, "w").close()

    def on_message(_c, _u, m):
        out.write(m.payload.decode() + "\n")

    c.on_connect, c.on_subscribe, c.on_message = on_connect, on_subscribe, on_message
    connect(c, a)
    c.loop_forever(retry_first_connection=True)


def watch(a):
    stop_on_term()
    out = open(a.out, "a", buffering=1)
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"netns-watch-{os.getpid()}")
    c.reconnect_delay_set(min_delay=0.2, max_delay=1)
    c.on_connect = lambda c, _u, _f, rc, _p: rc.is_failure or c.subscribe(a.topic, qos=1)
    c.on_message = lambda _c, _u, m: out.write(f"{time.time():.3f} {m.payload.decode()}\n")
    c.connect_async(a.host, a.port, keepalive=10)
    c.loop_forever(retry_first_connection=True)


def pub(a):
    stop_on_term()
    acked_out = open(a.acked, "a", buffering=1)
    c = client(a.id, a.v311)
    c.max_inflight_messages_set(100)
    c.max_queued_messages_set(0)
    connected = threading.Event()
    c.on_connect = lambda _c, _u, _f, rc, _p: rc.is_failure or connected.set()
    connect(c, a, a.v311)
    c.loop_start()
    if not connected.wait(10):
        print("pub: not connected in 10 s", file=sys.stderr)
        return 1
    # PUBACKs as the network thread reads them (mid, success); the numbers are matched here.
    # (MessageInfo.is_published() cannot be used: it raises for a message first published
    # while disconnected, even once it has gone out and been acknowledged.)
    acks = []
    c.on_publish = lambda _c, _u, mid, rc, _p: acks.append((mid, not rc.is_failure))
    pending = {}  # mid -> number, until its PUBACK
    acked = 0
    refused = 0

    def collect():
        nonlocal acked, refused
        while acks:
            mid, ok = acks.pop(0)
            n = pending.pop(mid, None)
            if n is None:
                continue
            if ok:
                acked_out.write(f"{n}\n")
                acked += 1
            else:
                refused += 1

    start = time.monotonic()
    deadline = start + a.timeout
    for n in range(1, a.count + 1):
        # Published while disconnected too: paho keeps QoS 1 messages until acknowledged.
        pending[c.publish(a.topic, str(n).encode(), qos=1).mid] = n
        due = start + n / a.rate
        if n % 50 == 0:
            collect()
        pause = due - time.monotonic()
        if pause > 0:
            time.sleep(pause)
    sent_in = time.monotonic() - start
    while pending and time.monotonic() < deadline:
        collect()
        time.sleep(0.05)
    collect()
    c.disconnect()
    c.loop_stop()
    print(f"pub: {a.count} published in {sent_in:.1f}s, {acked} acknowledged, {refused} refused")
    if pending or (refused and not a.allow_refused):
        print(f"pub: {len(pending)} never acknowledged (first {min(pending.values(), default=None)})", file=sys.stderr)
        return 1
    return 0


def read_numbers(path):
    try:
        with open(path) as f:
            return [int(line) for line in f if line.strip().isdigit()]
    except FileNotFoundError:
        return []


def check(a):
    acked = set(read_numbers(a.acked))
    want = set(range(1, a.count + 1)) if a.all_acked else acked
    if a.all_acked and acked != want:
        print(f"check: the publisher had only {len(acked)} of {a.count} acknowledged")
    deadline = time.monotonic() + a.timeout
    while True:
        got = read_numbers(a.received)
        missing = want - set(got)
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    # A little longer, so that late duplicates are counted too.
    time.sleep(0.5)
    got = read_numbers(a.received)
    seen, dups, late, top = set(), 0, 0, 0
    for n in got:
        if n in seen:
            dups += 1
            continue
        seen.add(n)
        if n < top:
            late += 1
        top = max(top, n)
    missing = sorted(want - seen)
    if a.summary:
        with open(a.summary, "w") as f:
            f.write(f"{len(seen & want)}/{len(want)} delivered, {dups} duplicates, {late} out of order, "
                    f"{len(missing)} missing\n")
    print(f"check: {len(acked)} acknowledged to the publisher, {len(got)} received ({len(seen)} distinct, "
          f"{dups} duplicates, {late} arrived after a higher number), {len(missing)} missing")
    if missing:
        print(f"check: MISSING {len(missing)}: {missing[:20]}{' ...' if len(missing) > 20 else ''}")
        return 1
    if a.all_acked and acked != want:
        return 1
    return 0


def state(a):
    lines = []
    with open(a.file) as f:
        for line in f:
            t, _, v = line.strip().partition(" ")
            lines.append((float(t), v))
    seq = " ".join(v for _, v in lines)
    before = [v for t, v in lines if t <= a.cut]
    during = [v for t, v in lines if a.cut < t <= a.restore]
    after = [v for t, v in lines if t > a.restore]
    zero_at = next((t for t, v in lines if t > a.cut and v == "0"), None)
    one_at = next((t for t, v in lines if t > a.restore and v == "1"), None)
    print(f"state: sequence {seq}; 0 seen {zero_at - a.cut:.1f}s after the cut" if zero_at else f"state: sequence {seq}",
          end="")
    print(f", 1 again {one_at - a.restore:.1f}s after the restore" if one_at else "")
    ok = before[-1:] == ["1"] and "0" in during and after[-1:] == ["1"]
    if not ok:
        print(f"state: expected 1 before the cut, 0 during the outage, 1 at the end "
              f"(before: {before}, during: {during}, after: {after})")
    return 0 if ok else 1


def main():
    p = argparse.ArgumentParser()
    sp = p.add_subparsers(dest="cmd", required=True)
    for name in ("wait-ready", "sub", "watch", "pub"):
        s = sp.add_parser(name)
        s.add_argument("--host", required=True)
        s.add_argument("--port", type=int, default=1883)
        if name == "wait-ready":
            s.add_argument("--timeout", type=float, default=20)
            s.add_argument("--pid", type=int)
        if name in ("sub", "pub"):
            s.add_argument("--id", required=True)
        if name in ("sub", "watch", "pub"):
            s.add_argument("--topic", required=True)
        if name in ("sub", "watch"):
            s.add_argument("--out", required=True)
        if name == "sub":
            s.add_argument("--ready", required=True)
        if name == "pub":
            s.add_argument("--count", type=int, required=True)
            s.add_argument("--rate", type=float, required=True)
            s.add_argument("--acked", required=True)
            s.add_argument("--timeout", type=float, default=60)
            s.add_argument("--v311", action="store_true")
            s.add_argument("--allow-refused", action="store_true",
                           help="a PUBACK with a failure reason code is an answer, not an error")
    s = sp.add_parser("check")
    s.add_argument("--received", required=True)
    s.add_argument("--acked", required=True)
    s.add_argument("--count", type=int, required=True)
    s.add_argument("--timeout", type=float, default=60)
    s.add_argument("--all-acked", action="store_true")
    s.add_argument("--summary")
    s = sp.add_parser("state")
    s.add_argument("--file", required=True)
    s.add_argument("--cut", type=float, required=True)
    s.add_argument("--restore", type=float, required=True)
    a = p.parse_args()
    fn = {"wait-ready": wait_ready, "sub": sub, "watch": watch, "pub": pub, "check": check, "state": state}[a.cmd]
    sys.exit(fn(a) or 0)


if __name__ == "__main__":
    main()
