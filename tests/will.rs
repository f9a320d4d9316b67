//! Last Will and Testament: when it is published and when it is not.

mod common;

use std::time::Duration;

use common::*;

/// A 3.1.1 watcher subscribed to `will/#` at QoS 1.
async fn watcher(b: &TestBroker) -> Raw {
    let mut w = connect_v311(b.addr, "watcher").await;
    w.subscribe(1, "will/#", 1).await;
    w
}

async fn expect_will(w: &mut Raw, topic: &str, payload: &[u8]) -> Pub {
    let m = w.recv_publish_ack().await;
    assert_eq!((m.topic.as_str(), m.payload.as_slice()), (topic, payload), "will message");
    m
}

#[tokio::test]
async fn will_published_when_socket_dropped() {
    let b = start().await;
    let mut w = watcher(&b).await;
    let (c, _) = connect_with(b.addr, &Connect::v311("dies").will(Will::new("will/dies", b"gone", 1))).await;
    drop(c);
    let m = expect_will(&mut w, "will/dies", b"gone").await;
    assert_eq!((m.qos, m.retain), (1, false));
    w.expect_silence(QUIET).await;
}

#[tokio::test]
async fn will_published_on_keep_alive_timeout() {
    let b = start().await;
    let mut w = watcher(&b).await;
    let (_c, _) =
        connect_with(b.addr, &Connect::v311("silent").keep_alive(1).will(Will::new("will/silent", b"ka", 0))).await;
    // Keep the socket open but say nothing: after 1.5 s the broker gives up.
    let m = expect_will(&mut w, "will/silent", b"ka").await;
    assert_eq!(m.qos, 0);
}

#[tokio::test]
async fn will_published_on_takeover() {
    let b = start().await;
    let mut w = watcher(&b).await;
    let (mut first, _) = connect_with(b.addr, &Connect::v311("twin").will(Will::new("will/twin", b"old", 1))).await;
    let _second = connect_v311(b.addr, "twin").await;
    first.expect_closed().await;
    expect_will(&mut w, "will/twin", b"old").await;
    w.expect_silence(QUIET).await;
}

#[tokio::test]
async fn no_will_after_disconnect() {
    let b = start().await;
    let mut w = watcher(&b).await;
    let (c, _) = connect_with(b.addr, &Connect::v311("polite").will(Will::new("will/polite", b"no", 1))).await;
    c.disconnect().await;
    w.expect_silence(Duration::from_millis(500)).await;
}

#[tokio::test]
async fn no_will_after_v5_normal_disconnect() {
    let b = start().await;
    let mut w = watcher(&b).await;
    let (mut c, _) = connect_with(b.addr, &Connect::v5("polite5").will(Will::new("will/polite5", b"no", 1))).await;
    c.send(&[0xE0, 0x01, 0x00]).await;
    c.expect_closed().await;
    w.expect_silence(Duration::from_millis(500)).await;
}

#[tokio::test]
async fn v5_disconnect_with_will_message_publishes_it() {
    let b = start().await;
    let mut w = watcher(&b).await;
    let (mut c, _) = connect_with(b.addr, &Connect::v5("leaver").will(Will::new("will/leaver", b"bye", 1))).await;
    c.send(&[0xE0, 0x01, 0x04]).await;
    c.expect_closed().await;
    expect_will(&mut w, "will/leaver", b"bye").await;
}

#[tokio::test]
async fn v5_will_published_on_protocol_error() {
    let b = start().await;
    let mut w = watcher(&b).await;
    let (mut c, _) = connect_with(b.addr, &Connect::v5("rude").will(Will::new("will/rude", b"err", 0))).await;
    c.send(&Connect::v5("rude").bytes()).await; // second CONNECT
    c.expect_disconnect(0x82).await;
    expect_will(&mut w, "will/rude", b"err").await;
}

#[tokio::test]
async fn will_with_retain_is_retained() {
    let b = start().await;
    let mut will = Will::new("will/kept", b"last", 1);
    will.retain = true;
    let mut w = watcher(&b).await;
    let (c, _) = connect_with(b.addr, &Connect::v311("keeper").will(will)).await;
    drop(c);
    // Live delivery to an existing subscriber (3.1.1: retain bit clear)...
    let m = expect_will(&mut w, "will/kept", b"last").await;
    assert!(!m.retain, "live delivery of a retained will has the retain bit set");
    // ...and a later subscriber gets it as a retained message.
    let mut late = connect_v311(b.addr, "late").await;
    late.subscribe(1, "will/kept", 1).await;
    let m = late.recv_publish_ack().await;
    assert_eq!((m.topic.as_str(), m.payload.as_slice(), m.retain, m.qos), ("will/kept", &b"last"[..], true, 1));
}

/// v5 CONNECT whose will has a Will Delay Interval.
fn delayed_will(id: &str, topic: &str, delay: u32, expiry: u32) -> Vec<u8> {
    // Build by hand: the helper writes empty will properties.
    let mut body = mqtt_str(b"MQTT");
    body.push(5);
    body.push(0x02 | 0x04 | (1 << 3)); // clean start, will, will QoS 1
    body.extend(30u16.to_be_bytes());
    body.extend(props(&prop_u32(PROP_SESSION_EXPIRY, expiry)));
    body.extend(mqtt_str(id.as_bytes()));
    body.extend(props(&prop_u32(PROP_WILL_DELAY, delay)));
    body.extend(mqtt_str(topic.as_bytes()));
    body.extend(mqtt_str(b"late"));
    packet(0x10, &body)
}

#[tokio::test]
async fn v5_will_delay_postpones_the_will() {
    let b = start().await;
    let mut w = watcher(&b).await;
    let mut c = Raw::open(b.addr).await;
    c.v5 = true;
    c.send(&delayed_will("slow", "will/slow", 1, 30)).await;
    assert_eq!(parse_connack(&c.read_packet().await, true).code, 0);
    drop(c);
    w.expect_silence(Duration::from_millis(500)).await;
    expect_will(&mut w, "will/slow", b"late").await;
}

#[tokio::test]
async fn v5_will_delay_cancelled_by_reconnect() {
    let b = start().await;
    let mut w = watcher(&b).await;
    let mut c = Raw::open(b.addr).await;
    c.v5 = true;
    c.send(&delayed_will("back", "will/back", 1, 30)).await;
    assert_eq!(parse_connack(&c.read_packet().await, true).code, 0);
    drop(c);
    let (_c, ack) = connect_with(b.addr, &Connect::v5("back").clean(false).expiry(30)).await;
    assert!(ack.session_present);
    w.expect_silence(Duration::from_millis(1500)).await;
}
