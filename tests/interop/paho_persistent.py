#!/usr/bin/env python3
"""Persistent-session interop check with paho-mqtt 2.x over MQTT 3.1.1.

    python3 tests/interop/paho_persistent.py HOST PORT

1. A subscriber connects with clean_session=False, subscribes at QoS 1, disconnects cleanly.
2. A publisher sends 10 numbered QoS 1 messages and waits until each is acknowledged.
3. The subscriber reconnects with clean_session=False: the broker must report the session as
   present and deliver all 10 messages, in order, at QoS 1, with no extras.

Exits 0 on success; on any deviation prints what happened and exits 1. Every wait is bounded.
"""

import os
import sys
import threading
import time

import paho.mqtt.client as mqtt

TIMEOUT = 15.0  # seconds for any single step
COUNT = 10


def fail(msg):
    print(f"paho_persistent: FAIL: {msg}", file=sys.stderr)
    sys.exit(1)


class Peer:
    """A paho client with events for CONNACK, SUBACK, DISCONNECT and a message list."""

    def __init__(self, client_id, clean_session):
        self.client_id = client_id
        self.connected = threading.Event()
        self.subscribed = threading.Event()
        self.disconnected = threading.Event()
        self.connack = None
        self.suback = None
        self.messages = []
        self.lock = threading.Lock()
        self.got_all = threading.Event()
        self.c = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=clean_session,
            protocol=mqtt.MQTTv311,
        )
        self.c.on_connect = self._on_connect
        self.c.on_subscribe = self._on_subscribe
        self.c.on_message = self._on_message
        self.c.on_disconnect = self._on_disconnect

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        self.connack = (flags.session_present, reason_code)
        self.connected.set()

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties):
        self.suback = list(reason_codes)
        self.subscribed.set()

    def _on_message(self, client, userdata, msg):
        with self.lock:
            self.messages.append((msg.topic, msg.qos, msg.payload, msg.retain))
            if len(self.messages) >= COUNT:
                self.got_all.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties):
        self.disconnected.set()

    def connect(self, host, port):
        try:
            self.c.connect(host, port, keepalive=30)
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
    sub_id = f"interop-persist-sub-{tag}"
    topic = f"interop/persistent/{tag}"

    # 1. Subscriber: persistent session, QoS 1 subscription, clean disconnect.
    sub = Peer(sub_id, clean_session=False)
    sub.connect(host, port)
    if sub.connack[0]:
        fail("first connect of a new client id reported session_present=1")
    sub.c.subscribe(topic, qos=1)
    if not sub.subscribed.wait(TIMEOUT):
        sub.stop()
        fail(f"no SUBACK within {TIMEOUT}s")
    granted = [int(rc.value) for rc in sub.suback]
    if granted != [1]:
        sub.stop()
        fail(f"SUBACK granted {granted}, expected [1]")
    sub.disconnect()

    # 2. Publisher: 10 numbered QoS 1 messages, each acknowledged.
    pub = Peer(f"interop-persist-pub-{tag}", clean_session=True)
    pub.connect(host, port)
    infos = []
    for i in range(COUNT):
        info = pub.c.publish(topic, f"message {i}".encode(), qos=1)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            pub.stop()
            fail(f"publish {i} returned rc={info.rc}")
        infos.append(info)
    for i, info in enumerate(infos):
        try:
            info.wait_for_publish(timeout=TIMEOUT)
        except (ValueError, RuntimeError) as e:
            pub.stop()
            fail(f"publish {i} failed: {e}")
        if not info.is_published():
            pub.stop()
            fail(f"publish {i}: no PUBACK within {TIMEOUT}s")
    pub.disconnect()

    # 3. Subscriber reconnects to its session and must receive all 10, in order.
    sub2 = Peer(sub_id, clean_session=False)
    sub2.connect(host, port)
    if not sub2.connack[0]:
        sub2.stop()
        fail("reconnect with clean_session=False: CONNACK session_present=0, expected 1")
    sub2.got_all.wait(TIMEOUT)
    # A short grace period to catch duplicates or extras after the tenth message.
    time.sleep(1.0)
    with sub2.lock:
        got = list(sub2.messages)
    sub2.disconnect()

    want = [(topic, 1, f"message {i}".encode(), False) for i in range(COUNT)]
    if got != want:
        lines = "\n".join(f"    {m}" for m in got) or "    (nothing)"
        fail(f"expected {COUNT} queued messages 'message 0'..'message 9' at QoS 1 in order; got {len(got)}:\n{lines}")

    # Leave nothing behind: connect once more with a clean session to drop the stored one.
    clean = Peer(sub_id, clean_session=True)
    clean.connect(host, port)
    clean.disconnect()
    print(f"paho_persistent: ok ({COUNT} messages queued while offline, delivered in order)")


if __name__ == "__main__":
    main()
