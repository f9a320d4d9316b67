#!/usr/bin/env python3
"""MQTT 5 feature interop checks with paho-mqtt 2.x.

    python3 tests/interop/paho_v5_features.py HOST PORT [CHECK ...]

With no CHECK names every check runs; otherwise only the named ones (see CHECKS below):

  shared_balance    two members of $share/grp/<filter> at QoS 1 split 20 QoS 1 messages:
                    each gets some, together exactly the 20, no duplicates.
  shared_redeliver  member A of a shared group receives messages and never acknowledges them,
                    then its connection is reset (no DISCONNECT); member B must end up with
                    every message, each once.
  message_expiry    two QoS 1 messages are queued for an offline persistent session, X with
                    Message Expiry Interval 1, Y with 60; after 2.5 s the session resumes and
                    gets Y (its expiry interval reduced by the time waited) and not X.
  will_delay        a client with a will (Will Delay Interval 3, Session Expiry Interval 60)
                    loses its connection and reconnects within 1 s: no will for 5 s. Control:
                    a client with Will Delay Interval 1 that does not come back: its will
                    arrives after about a second, with its payload and properties.
  topic_alias       a publisher sends PUBLISH with topic + Topic Alias 1, then with an empty
                    topic + Topic Alias 1; a subscriber announcing Topic Alias Maximum 5 gets
                    both messages on the right topic (resolving any aliases tern assigns to it,
                    as paho does not) with the right payloads.
  request_response  a requester publishes requests with Response Topic and Correlation Data;
                    a responder answers on the Response Topic echoing the Correlation Data;
                    the requester gets each answer with its own correlation data.

Prints `ok NAME` or `FAIL NAME: why` per check; exits 1 if any check failed. Every wait is
bounded; clients are disconnected (or their sockets closed) whatever happens.
"""

import os
import socket
import struct
import sys
import threading
import time

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

TIMEOUT = 10.0  # seconds for any single step (CONNACK, SUBACK, PUBACK, a delivery)

HOST = "127.0.0.1"
PORT = 1883
TAG = f"{os.getpid()}-{int(time.time() * 1000) % 1000000}"


class CheckFailed(Exception):
    pass


def require(cond, msg):
    if not cond:
        raise CheckFailed(msg)


def props_of(packet_type, **values):
    p = Properties(packet_type)
    for k, v in values.items():
        setattr(p, k, v)
    return p


def prop(msg, name):
    p = getattr(msg, "properties", None)
    return getattr(p, name, None) if p is not None else None


class Peer:
    """A paho MQTT 5 client with events for CONNACK, SUBACK, DISCONNECT and a message list."""

    def __init__(self, registry, client_id, manual_ack=False):
        self.client_id = client_id
        self.connected = threading.Event()
        self.subscribed = threading.Event()
        self.disconnected = threading.Event()
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
        self.connack = None
        self.suback = None
        self.messages = []  # (arrival monotonic time, MQTTMessage)
        self.on_msg = None  # optional extra hook, called from the network thread
        self.running = False
        self.dropped = False
        self.c = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv5,
            manual_ack=manual_ack,
            reconnect_on_failure=False,  # never reconnect behind the check's back
        )
        self.c.on_connect = self._on_connect
        self.c.on_subscribe = self._on_subscribe
        self.c.on_message = self._on_message
        self.c.on_disconnect = self._on_disconnect
        registry.append(self)

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        self.connack = (flags.session_present, reason_code, properties)
        self.connected.set()

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties):
        self.suback = [int(rc.value) for rc in reason_codes]
        self.subscribed.set()

    def _on_message(self, client, userdata, msg):
        with self.cond:
            self.messages.append((time.monotonic(), msg))
            self.cond.notify_all()
        if self.on_msg is not None:
            self.on_msg(msg)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties):
        self.disconnected.set()

    def connect(self, clean_start=True, expiry=0, will=None, connect_props=None):
        """will: (topic, payload, Properties(WILLMESSAGE) or None)."""
        props = connect_props or Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = expiry
        if will is not None:
            topic, payload, wprops = will
            self.c.will_set(topic, payload, qos=1, retain=False, properties=wprops)
        self.connected.clear()
        try:
            self.c.connect(HOST, PORT, keepalive=30, clean_start=clean_start, properties=props)
        except OSError as e:
            raise CheckFailed(f"{self.client_id}: cannot connect to {HOST}:{PORT}: {e}")
        self.c.loop_start()
        self.running = True
        if not self.connected.wait(TIMEOUT):
            raise CheckFailed(f"{self.client_id}: no CONNACK within {TIMEOUT}s")
        if self.connack[1].is_failure:
            raise CheckFailed(f"{self.client_id}: connection refused: {self.connack[1]}")
        return self.connack

    def subscribe(self, topic_filter, qos=1):
        self.subscribed.clear()
        self.c.subscribe(topic_filter, options=SubscribeOptions(qos=qos))
        if not self.subscribed.wait(TIMEOUT):
            raise CheckFailed(f"{self.client_id}: no SUBACK for {topic_filter!r} within {TIMEOUT}s")
        require(self.suback == [qos],
                f"{self.client_id}: SUBACK for {topic_filter!r}: reason codes {self.suback}, expected [{qos}]")

    def publish(self, topic, payload, qos=1, properties=None, wait=True):
        info = self.c.publish(topic, payload, qos=qos, properties=properties)
        require(info.rc == mqtt.MQTT_ERR_SUCCESS,
                f"{self.client_id}: publish to {topic!r} returned rc={info.rc}")
        if wait:
            self.wait_published(info, topic)
        return info

    def wait_published(self, info, what=""):
        try:
            info.wait_for_publish(timeout=TIMEOUT)
        except (ValueError, RuntimeError) as e:
            raise CheckFailed(f"{self.client_id}: publish {what!r} failed: {e}")
        require(info.is_published(), f"{self.client_id}: publish {what!r}: no PUBACK within {TIMEOUT}s")

    def wait_messages(self, count, timeout=TIMEOUT):
        """Waits until at least `count` messages arrived; returns a copy of the list."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while len(self.messages) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.cond.wait(left)
            return list(self.messages)

    def snapshot(self):
        with self.cond:
            return list(self.messages)

    def disconnect(self, props=None):
        if self.running and not self.dropped:
            try:
                self.c.disconnect(properties=props)
            except Exception:
                pass
            self.disconnected.wait(TIMEOUT)
        self.stop()

    def stop(self):
        if self.running:
            self.running = False
            self.c.loop_stop()

    def drop(self):
        """Ends the connection abruptly: no DISCONNECT, the socket is reset (SO_LINGER 0)."""
        self.stop()  # the network thread stops without sending anything
        sock = self.c.socket()
        self.dropped = True
        if sock is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass
            sock.close()


def payloads(entries):
    return [m.payload.decode(errors="replace") for _, m in entries]


def summarize(entries):
    if not entries:
        return "(nothing)"
    return "; ".join(f"{m.topic!r} q{m.qos} {m.payload!r}" for _, m in entries)


# ---------------------------------------------------------------------------------------------
# Checks. Each takes a registry list to which every Peer it creates is added, so that main()
# can disconnect them whatever happens. Each returns a short note for the `ok` line.

def check_shared_balance(peers):
    count = 20
    base = f"interop/jobs/{TAG}"
    group_filter = f"$share/grp/{base}/#"
    a = Peer(peers, f"interop-share-a-{TAG}")
    b = Peer(peers, f"interop-share-b-{TAG}")
    for p in (a, b):
        p.connect()
        p.subscribe(group_filter, qos=1)
    pub = Peer(peers, f"interop-share-pub-{TAG}")
    pub.connect()
    infos = [pub.publish(f"{base}/{i % 3}", f"job {i}".encode(), qos=1, wait=False) for i in range(count)]
    for i, info in enumerate(infos):
        pub.wait_published(info, f"job {i}")
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline and len(a.snapshot()) + len(b.snapshot()) < count:
        time.sleep(0.05)
    time.sleep(0.5)  # grace period to catch duplicates or extras
    got_a, got_b = payloads(a.snapshot()), payloads(b.snapshot())
    want = {f"job {i}" for i in range(count)}
    everything = got_a + got_b
    problems = []
    if not got_a or not got_b:
        problems.append("one member got nothing")
    if len(everything) != count or set(everything) != want:
        missing = sorted(want - set(everything), key=lambda s: int(s.split()[1]))
        dups = sorted({x for x in everything if everything.count(x) > 1})
        problems.append(f"together {len(everything)} deliveries, expected exactly {count}; "
                        f"missing {missing}, duplicated {dups}")
    bad_qos = [(m.payload, m.qos) for _, m in a.snapshot() + b.snapshot() if m.qos != 1]
    if bad_qos:
        problems.append(f"deliveries not at QoS 1: {bad_qos}")
    require(not problems, "; ".join(problems) + f" (A got {got_a}, B got {got_b})")
    return f"A {len(got_a)}, B {len(got_b)}"


def check_shared_redeliver(peers):
    count = 10
    base = f"interop/work/{TAG}"
    group_filter = f"$share/redeliver/{base}/#"
    # A acknowledges nothing (manual_ack and never client.ack()).
    a = Peer(peers, f"interop-redeliver-a-{TAG}", manual_ack=True)
    b = Peer(peers, f"interop-redeliver-b-{TAG}")
    a.connect(clean_start=True, expiry=0)
    a.subscribe(group_filter, qos=1)
    b.connect(clean_start=True, expiry=0)
    b.subscribe(group_filter, qos=1)
    pub = Peer(peers, f"interop-redeliver-pub-{TAG}")
    pub.connect()
    infos = [pub.publish(f"{base}/task", f"task {i}".encode(), qos=1, wait=False) for i in range(count)]
    for i, info in enumerate(infos):
        pub.wait_published(info, f"task {i}")
    want = {f"task {i}" for i in range(count)}
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        if set(payloads(a.snapshot())) | set(payloads(b.snapshot())) == want:
            break
        time.sleep(0.05)
    got_a = payloads(a.snapshot())
    got_b_before = payloads(b.snapshot())
    require(set(got_a) | set(got_b_before) == want,
            f"before the drop: A (not acking) got {got_a}, B got {got_b_before}; expected the "
            f"{count} messages between them")
    require(got_a, f"A got none of the {count} messages (B got {got_b_before}), so nothing to redeliver")
    a.drop()
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline and not want <= set(payloads(b.snapshot())):
        time.sleep(0.05)
    time.sleep(0.5)  # grace period to catch duplicates
    got_b = payloads(b.snapshot())
    missing = sorted(want - set(got_b), key=lambda s: int(s.split()[1]))
    dups = sorted({x for x in got_b if got_b.count(x) > 1})
    require(not missing and not dups and len(got_b) == count,
            f"A received {got_a} without acknowledging, then its connection was reset; B then had "
            f"{got_b} (missing {missing}, duplicated {dups}); expected all {count}, each once")
    return f"{len(got_a)} unacknowledged by A redelivered to B"


def check_message_expiry(peers):
    topic = f"interop/expiry/{TAG}"
    sub_id = f"interop-expiry-sub-{TAG}"
    sub = Peer(peers, sub_id)
    sub.connect(clean_start=False, expiry=300)
    sub.subscribe(topic, qos=1)
    sub.disconnect()
    pub = Peer(peers, f"interop-expiry-pub-{TAG}")
    pub.connect()
    pub.publish(topic, b"X short-lived", qos=1,
                properties=props_of(PacketTypes.PUBLISH, MessageExpiryInterval=1))
    pub.publish(topic, b"Y long-lived", qos=1,
                properties=props_of(PacketTypes.PUBLISH, MessageExpiryInterval=60))
    published = time.monotonic()
    pub.disconnect()
    time.sleep(max(0.0, 2.5 - (time.monotonic() - published)))
    again = Peer(peers, sub_id)
    present = again.connect(clean_start=False, expiry=0)[0]  # expiry 0: session ends afterwards
    require(present, "reconnect with clean start off: CONNACK session_present=0, expected 1")
    again.wait_messages(1)
    time.sleep(1.0)  # anything else queued arrives right away; X must not
    got = again.snapshot()
    got_payloads = [m.payload for _, m in got]
    require(got_payloads == [b"Y long-lived"],
            f"after 2.5 s offline, expected only 'Y long-lived' (X had Message Expiry Interval 1); "
            f"got {summarize(got)}")
    expiry = prop(got[0][1], "MessageExpiryInterval")
    require(expiry is not None and 0 < expiry <= 58,
            f"Y was published with Message Expiry Interval 60 and waited 2.5 s; delivered with "
            f"{expiry!r}, expected 57 or 58 (60 minus the time waited)")
    require(got[0][1].qos == 1, f"Y delivered at QoS {got[0][1].qos}, expected 1")
    return f"Y delivered with Message Expiry Interval {expiry}"


def check_will_delay(peers):
    base = f"interop/will/{TAG}"
    watcher = Peer(peers, f"interop-will-watch-{TAG}")
    watcher.connect()
    watcher.subscribe(f"{base}/#", qos=1)

    # 1. Will Delay Interval 3, the client is back within 1 s: the will must not be sent.
    w_id = f"interop-will-w-{TAG}"
    w = Peer(peers, w_id)
    will_props = props_of(PacketTypes.WILLMESSAGE, WillDelayInterval=3)
    w.connect(clean_start=True, expiry=60, will=(f"{base}/w", b"w is gone", will_props))
    w.drop()
    dropped = time.monotonic()
    time.sleep(0.3)
    w2 = Peer(peers, w_id)
    present = w2.connect(clean_start=False, expiry=60)[0]
    reconnected = time.monotonic() - dropped
    require(reconnected < 3.0, f"reconnect took {reconnected:.1f}s, too slow for the check to mean anything")
    require(present, "W reconnected with clean start off within the session expiry interval: "
                     "CONNACK session_present=0, expected 1")
    time.sleep(max(0.0, 5.0 - (time.monotonic() - dropped)))
    got = watcher.snapshot()
    require(not got, f"W (Will Delay Interval 3) reconnected {reconnected:.1f}s after its connection "
                     f"was reset, yet the watcher received within 5 s: {summarize(got)}")
    # End W's session cleanly: DISCONNECT with Session Expiry Interval 0, normal reason: no will.
    w2.disconnect(props_of(PacketTypes.DISCONNECT, SessionExpiryInterval=0))

    # 2. Control: Will Delay Interval 1, the client does not come back: the will arrives.
    v_id = f"interop-will-v-{TAG}"
    v = Peer(peers, v_id)
    v_props = props_of(PacketTypes.WILLMESSAGE, WillDelayInterval=1, ContentType="text/plain",
                       UserProperty=[("who", "v")])
    v.connect(clean_start=True, expiry=60, will=(f"{base}/v", b"v is gone", v_props))
    v.drop()
    dropped = time.monotonic()
    got = watcher.wait_messages(1, timeout=3.5)
    try:
        require(got, f"V (Will Delay Interval 1, Session Expiry Interval 60) had its connection reset "
                     f"and did not come back; no will within 3.5 s")
        at, msg = got[0]
        after = at - dropped
        problems = []
        if msg.topic != f"{base}/v" or msg.payload != b"v is gone":
            problems.append(f"will {msg.topic!r} {msg.payload!r}, expected {base}/v 'v is gone'")
        if after < 0.5:
            problems.append(f"will arrived {after:.2f}s after the drop, before its 1 s delay")
        if prop(msg, "ContentType") != "text/plain" or prop(msg, "UserProperty") != [("who", "v")]:
            problems.append(f"will properties content type {prop(msg, 'ContentType')!r}, user properties "
                            f"{prop(msg, 'UserProperty')!r}; expected 'text/plain', [('who', 'v')]")
        time.sleep(0.3)
        if len(watcher.snapshot()) != 1:
            problems.append(f"watcher received {summarize(watcher.snapshot())}, expected only V's will")
        require(not problems, "; ".join(problems))
    finally:
        # Drop V's session (it would otherwise live on for 60 s).
        v2 = Peer(peers, v_id)
        v2.connect(clean_start=True, expiry=0)
        v2.disconnect()
    return f"no will after a reconnect within 1 s; control will after {after:.1f}s"


def check_topic_alias(peers):
    topic = f"interop/alias/{TAG}"
    sub = Peer(peers, f"interop-alias-sub-{TAG}")
    sub.connect(connect_props=props_of(PacketTypes.CONNECT, TopicAliasMaximum=5))
    sub.subscribe(topic, qos=1)
    pub = Peer(peers, f"interop-alias-pub-{TAG}")
    connack = pub.connect()
    server_max = getattr(connack[2], "TopicAliasMaximum", 0) if connack[2] is not None else 0
    require(server_max >= 1, f"CONNACK Topic Alias Maximum {server_max}: tern accepts no topic aliases")
    acks = []
    pub.c.on_publish = lambda client, userdata, mid, rc, props: acks.append((mid, int(rc.value)))
    i1 = pub.publish(topic, b"first, topic and alias", qos=1,
                     properties=props_of(PacketTypes.PUBLISH, TopicAlias=1))
    i2 = pub.publish("", b"second, alias only", qos=1,
                     properties=props_of(PacketTypes.PUBLISH, TopicAlias=1))
    bad = [(mid, rc) for mid, rc in acks if rc >= 0x80]
    require(not bad, f"PUBACK failure reason codes (mid, code): {bad} for mids {i1.mid}, {i2.mid}")
    sub.wait_messages(2)
    time.sleep(0.3)
    got = sub.snapshot()
    # paho does not resolve incoming topic aliases: do it here, checking what tern sent.
    aliases = {}
    resolved = []
    problems = []
    used = []
    for _, m in got:
        alias = prop(m, "TopicAlias")
        t = m.topic
        if alias is not None:
            used.append(alias)
            if not 1 <= alias <= 5:
                problems.append(f"tern sent Topic Alias {alias}, above the subscriber's maximum 5")
            if t:
                aliases[alias] = t
            elif alias in aliases:
                t = aliases[alias]
            else:
                problems.append(f"empty topic with Topic Alias {alias} never set up")
        elif not t:
            problems.append("PUBLISH with an empty topic and no Topic Alias")
        resolved.append((t, m.payload))
    want = [(topic, b"first, topic and alias"), (topic, b"second, alias only")]
    if resolved != want:
        problems.append(f"subscriber got (topic after alias resolution, payload) {resolved}, expected {want}")
    require(not problems, "; ".join(problems))
    empty = sum(1 for _, m in got if not m.topic)
    return f"aliases used towards the subscriber: {used or 'none'}, {empty} PUBLISH with an empty topic"


def check_request_response(peers):
    req_topic = f"interop/req/{TAG}/x"
    resp_topic = f"interop/resp/{TAG}/requester"
    responder = Peer(peers, f"interop-responder-{TAG}")
    responder.connect()
    responder_errors = []

    def answer(msg):
        rt = prop(msg, "ResponseTopic")
        cd = prop(msg, "CorrelationData")
        if rt is None or cd is None:
            responder_errors.append(f"request {msg.payload!r} arrived with response topic {rt!r}, "
                                    f"correlation data {cd!r}")
            return
        responder.c.publish(rt, b"answer to " + msg.payload, qos=1,
                            properties=props_of(PacketTypes.PUBLISH, CorrelationData=cd))

    responder.on_msg = answer
    responder.subscribe(f"interop/req/{TAG}/#", qos=1)
    requester = Peer(peers, f"interop-requester-{TAG}")
    requester.connect()
    requester.subscribe(resp_topic, qos=1)
    requests = [(b"question 1", b"\x00corr-1\xff"), (b"question 2", b"corr-2")]
    for body, corr in requests:
        requester.publish(req_topic, body, qos=1,
                          properties=props_of(PacketTypes.PUBLISH, ResponseTopic=resp_topic,
                                              CorrelationData=corr))
    requester.wait_messages(len(requests))
    time.sleep(0.3)
    got = requester.snapshot()
    require(not responder_errors, "; ".join(responder_errors))
    answers = sorted((m.topic, m.payload, prop(m, "CorrelationData")) for _, m in got)
    want = sorted((resp_topic, b"answer to " + body, corr) for body, corr in requests)
    require(answers == want, f"requester got (topic, payload, correlation data) {answers}, expected {want}")
    return f"{len(requests)} requests answered"


CHECKS = {
    "shared_balance": check_shared_balance,
    "shared_redeliver": check_shared_redeliver,
    "message_expiry": check_message_expiry,
    "will_delay": check_will_delay,
    "topic_alias": check_topic_alias,
    "request_response": check_request_response,
}


def main():
    global HOST, PORT
    if len(sys.argv) < 3:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    HOST, PORT = sys.argv[1], int(sys.argv[2])
    names = sys.argv[3:] or list(CHECKS)
    unknown = [n for n in names if n not in CHECKS]
    if unknown:
        print(f"unknown checks {unknown}; known: {list(CHECKS)}", file=sys.stderr)
        sys.exit(2)
    failed = 0
    for name in names:
        peers = []
        start = time.monotonic()
        try:
            note = CHECKS[name](peers)
            print(f"ok {name} ({note}; {time.monotonic() - start:.1f}s)", flush=True)
        except CheckFailed as e:
            failed += 1
            print(f"FAIL {name}: {e}", flush=True)
        except Exception as e:  # a bug in the check itself, or paho raising
            failed += 1
            print(f"FAIL {name}: unexpected {type(e).__name__}: {e}", flush=True)
        finally:
            for p in peers:
                try:
                    p.disconnect()
                except Exception:
                    pass
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
