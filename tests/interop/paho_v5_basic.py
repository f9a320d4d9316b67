#!/usr/bin/env python3
"""MQTT 5 interop check with paho-mqtt 2.x.

    python3 tests/interop/paho_v5_basic.py HOST PORT

1. A subscriber connects with MQTT 5, clean start and Session Expiry Interval 300, and
   subscribes at QoS 1.
2. A publisher (MQTT 5) publishes at QoS 1 with user properties (order matters, a key appears
   twice), a content type, a payload format indicator, a response topic and correlation data.
3. The subscriber must receive the message with the payload, QoS and every one of those
   properties unchanged.
4. The subscriber disconnects and reconnects with clean start off: because its session
   expiry interval has not elapsed, CONNACK must say the session is present.

Exits 0 on success; on any deviation prints what happened and exits 1. Every wait is bounded.
"""

import os
import sys
import threading
import time

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

TIMEOUT = 15.0


def fail(msg):
    print(f"paho_v5_basic: FAIL: {msg}", file=sys.stderr)
    sys.exit(1)


class Peer:
    def __init__(self, client_id):
        self.client_id = client_id
        self.connected = threading.Event()
        self.subscribed = threading.Event()
        self.disconnected = threading.Event()
        self.received = threading.Event()
        self.connack = None
        self.suback = None
        self.messages = []
        self.c = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv5,
        )
        self.c.on_connect = self._on_connect
        self.c.on_subscribe = self._on_subscribe
        self.c.on_message = self._on_message
        self.c.on_disconnect = self._on_disconnect

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        self.connack = (flags.session_present, reason_code, properties)
        self.connected.set()

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties):
        self.suback = list(reason_codes)
        self.subscribed.set()

    def _on_message(self, client, userdata, msg):
        self.messages.append(msg)
        self.received.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties):
        self.disconnected.set()

    def connect(self, host, port, clean_start, expiry):
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = expiry
        try:
            self.c.connect(host, port, keepalive=30, clean_start=clean_start, properties=props)
        except OSError as e:
            fail(f"{self.client_id}: cannot connect to {host}:{port}: {e}")
        self.c.loop_start()
        if not self.connected.wait(TIMEOUT):
            self.stop()
            fail(f"{self.client_id}: no CONNACK within {TIMEOUT}s")
        if self.connack[1].is_failure:
            self.stop()
            fail(f"{self.client_id}: connection refused: {self.connack[1]}")

    def disconnect(self):
        self.c.disconnect()
        self.disconnected.wait(TIMEOUT)
        self.stop()

    def stop(self):
        self.c.loop_stop()


def main():
    if len(sys.argv) != 3:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    host, port = sys.argv[1], int(sys.argv[2])
    tag = f"{os.getpid()}-{int(time.time() * 1000) % 1000000}"
    topic = f"interop/v5/{tag}"
    sub_id = f"interop-v5-sub-{tag}"

    sub = Peer(sub_id)
    sub.connect(host, port, clean_start=True, expiry=300)
    if sub.connack[0]:
        sub.stop()
        fail("clean start: CONNACK session_present=1, expected 0")
    sub.c.subscribe(topic, options=SubscribeOptions(qos=1))
    if not sub.subscribed.wait(TIMEOUT):
        sub.stop()
        fail(f"no SUBACK within {TIMEOUT}s")
    codes = [int(rc.value) for rc in sub.suback]
    if codes != [1]:
        sub.stop()
        fail(f"SUBACK reason codes {codes}, expected [1] (granted QoS 1)")

    pub = Peer(f"interop-v5-pub-{tag}")
    pub.connect(host, port, clean_start=True, expiry=0)
    user_props = [("origin", "interop"), ("unit", "celsius"), ("origin", "again")]
    props = Properties(PacketTypes.PUBLISH)
    props.UserProperty = user_props
    props.ContentType = "application/json"
    props.PayloadFormatIndicator = 1
    props.ResponseTopic = f"interop/v5/{tag}/reply"
    props.CorrelationData = b"\x00\x01corr"
    payload = b'{"temperature": 21.5}'
    info = pub.c.publish(topic, payload, qos=1, properties=props)
    try:
        info.wait_for_publish(timeout=TIMEOUT)
    except (ValueError, RuntimeError) as e:
        pub.stop()
        sub.stop()
        fail(f"publish failed: {e}")
    if not info.is_published():
        pub.stop()
        sub.stop()
        fail(f"no PUBACK within {TIMEOUT}s")
    pub.disconnect()

    if not sub.received.wait(TIMEOUT):
        sub.stop()
        fail(f"subscriber received nothing within {TIMEOUT}s")
    msg = sub.messages[0]
    p = msg.properties
    problems = []
    if msg.topic != topic:
        problems.append(f"topic {msg.topic!r}, expected {topic!r}")
    if msg.payload != payload:
        problems.append(f"payload {msg.payload!r}, expected {payload!r}")
    if msg.qos != 1:
        problems.append(f"QoS {msg.qos}, expected 1")
    got_user = getattr(p, "UserProperty", None)
    if got_user != user_props:
        problems.append(f"user properties {got_user!r}, expected {user_props!r} (same order)")
    if getattr(p, "ContentType", None) != "application/json":
        problems.append(f"content type {getattr(p, 'ContentType', None)!r}, expected 'application/json'")
    if getattr(p, "PayloadFormatIndicator", None) != 1:
        problems.append(f"payload format indicator {getattr(p, 'PayloadFormatIndicator', None)!r}, expected 1")
    if getattr(p, "ResponseTopic", None) != f"interop/v5/{tag}/reply":
        problems.append(f"response topic {getattr(p, 'ResponseTopic', None)!r}")
    if getattr(p, "CorrelationData", None) != b"\x00\x01corr":
        problems.append(f"correlation data {getattr(p, 'CorrelationData', None)!r}")
    if len(sub.messages) != 1:
        problems.append(f"{len(sub.messages)} messages received, expected 1")
    sub.disconnect()
    if problems:
        fail("; ".join(problems))

    # The session outlives the connection for SessionExpiryInterval seconds.
    again = Peer(sub_id)
    again.connect(host, port, clean_start=False, expiry=0)
    present = again.connack[0]
    again.disconnect()
    if not present:
        fail("reconnect with clean start off within the session expiry interval: session_present=0, expected 1")
    print("paho_v5_basic: ok (properties forwarded, session kept across reconnect)")


if __name__ == "__main__":
    main()
