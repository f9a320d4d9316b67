//! MQTT 5 Message Expiry Interval (3.3.2.3.3): expired messages are not delivered, queued or
//! retained, and the interval forwarded is reduced by the time the message waited.

mod common;

use std::time::Duration;

use common::*;

const MESSAGE_EXPIRY: u8 = 0x02;

/// A persistent v5 subscriber to `filter` at QoS 1, then offline.
async fn offline_subscriber(b: &TestBroker, id: &str, filter: &str) {
    let (mut c, _) = connect_with(b.addr, &Connect::v5(id).expiry(60)).await;
    c.subscribe(1, filter, 1).await;
    c.disconnect().await;
    tokio::time::sleep(Duration::from_millis(100)).await;
}

/// Publishes at QoS 1 from a v5 client with the given properties; checks the PUBACK.
async fn publish_props(p: &mut Raw, topic: &str, payload: &[u8], pid: u16, retain: bool, properties: &[u8]) {
    p.send(&publish_full(topic.as_bytes(), payload, 1, pid, retain, false, Some(properties))).await;
    p.expect_ack(0x40, pid).await;
}

#[tokio::test]
async fn queued_message_expires_before_delivery() {
    let b = start().await;
    offline_subscriber(&b, "mx-sub", "mx/t").await;
    let mut p = connect_v5(b.addr, "mx-pub").await;
    publish_props(&mut p, "mx/t", b"short-lived", 1, false, &prop_u32(MESSAGE_EXPIRY, 1)).await;
    publish_props(&mut p, "mx/t", b"marker", 2, false, &[]).await;
    tokio::time::sleep(Duration::from_millis(2000)).await;

    let (mut c, ack) = connect_with(b.addr, &Connect::v5("mx-sub").clean(false).expiry(60)).await;
    assert!(ack.session_present);
    let m = c.recv_publish_ack().await;
    assert_eq!(m.payload, b"marker", "the message with expiry 1 s must not be delivered after 2 s");
    assert_eq!(m.prop(MESSAGE_EXPIRY), None, "no expiry was set on the marker: {m:?}");
    c.expect_silence(QUIET).await;
}

#[tokio::test]
async fn queued_message_expiry_is_reduced_by_the_wait() {
    let b = start().await;
    offline_subscriber(&b, "mr-sub", "mr/t").await;
    let mut p = connect_v5(b.addr, "mr-pub").await;
    publish_props(&mut p, "mr/t", b"long-lived", 1, false, &prop_u32(MESSAGE_EXPIRY, 10)).await;
    tokio::time::sleep(Duration::from_millis(2100)).await;

    let (mut c, _) = connect_with(b.addr, &Connect::v5("mr-sub").clean(false).expiry(60)).await;
    let m = c.recv_publish_ack().await;
    assert_eq!(m.payload, b"long-lived");
    let left = m.prop_u32(MESSAGE_EXPIRY).expect("Message Expiry Interval forwarded");
    assert!(left <= 8, "expiry 10 s after waiting 2 s must be forwarded as at most 8, got {left}");
    assert!(left >= 6, "expiry reduced by far more than the wait: {left}");
    c.expect_silence(QUIET).await;
}

#[tokio::test]
async fn live_delivery_forwards_the_expiry_interval() {
    let b = start().await;
    let mut s = connect_v5(b.addr, "ml-sub").await;
    s.subscribe(1, "ml/t", 1).await;
    let mut p = connect_v5(b.addr, "ml-pub").await;
    publish_props(&mut p, "ml/t", b"now", 1, false, &prop_u32(MESSAGE_EXPIRY, 30)).await;
    let m = s.recv_publish_ack().await;
    let left = m.prop_u32(MESSAGE_EXPIRY).expect("Message Expiry Interval forwarded");
    assert!((29..=30).contains(&left), "expiry 30 delivered at once as {left}");
}

#[tokio::test]
async fn expired_retained_message_not_sent_to_a_later_subscriber() {
    let b = start().await;
    let mut p = connect_v5(b.addr, "rx-pub").await;
    publish_props(&mut p, "rx/short", b"gone", 1, true, &prop_u32(MESSAGE_EXPIRY, 1)).await;
    publish_props(&mut p, "rx/long", b"stays", 2, true, &prop_u32(MESSAGE_EXPIRY, 60)).await;
    tokio::time::sleep(Duration::from_millis(2000)).await;

    let mut s = connect_v5(b.addr, "rx-sub").await;
    s.subscribe(1, "rx/#", 1).await;
    let m = s.recv_publish_ack().await;
    assert_eq!((m.topic.as_str(), m.payload.as_slice(), m.retain), ("rx/long", &b"stays"[..], true));
    let left = m.prop_u32(MESSAGE_EXPIRY).expect("retained message keeps its expiry");
    assert!(left <= 58, "retained expiry 60 after 2 s forwarded as {left}");
    s.expect_silence(QUIET).await;
}
