//! MQTT 5 subscription options (3.8.3.1) and Subscription Identifiers (3.8.2.1.2): No Local,
//! Retain As Published, Retain Handling, and the identifiers attached to deliveries.

mod common;

use common::*;

const NO_LOCAL: u8 = 0x04;
const RETAIN_AS_PUBLISHED: u8 = 0x08;
const RETAIN_HANDLING_1: u8 = 0x10;
const RETAIN_HANDLING_2: u8 = 0x20;
const SUBSCRIPTION_ID: u8 = 0x0B;

/// Publishes a retained QoS 1 message from a throwaway v5 client.
async fn retain(b: &TestBroker, topic: &str, payload: &[u8]) {
    let mut p = connect_v5(b.addr, "retainer").await;
    p.publish_retain(topic, payload, 1, 1, true).await;
    p.disconnect().await;
}

#[tokio::test]
async fn no_local_keeps_own_messages_from_coming_back() {
    let b = start().await;
    let mut a = connect_v5(b.addr, "nl-a").await;
    a.subscribe_expect(1, "nl/t", NO_LOCAL | 1, 1).await;
    let mut other = connect_v5(b.addr, "nl-b").await;
    other.subscribe(1, "nl/t", 1).await;

    a.publish("nl/t", b"from-a", 1, 1).await;
    let m = other.recv_publish_ack().await;
    assert_eq!(m.payload, b"from-a");
    a.expect_silence(QUIET).await;

    other.publish("nl/t", b"from-b", 1, 2).await;
    let m = a.recv_publish_ack().await;
    assert_eq!(m.payload, b"from-b", "No Local only excludes the client's own messages");
    // `other` did not ask for No Local: it gets its own message back.
    assert_eq!(other.recv_publish_ack().await.payload, b"from-b");
    a.expect_silence(QUIET).await;
}

#[tokio::test]
async fn no_local_on_one_of_two_overlapping_subscriptions() {
    let b = start().await;
    let mut a = connect_v5(b.addr, "nl2").await;
    a.subscribe_expect(1, "nl2/t", NO_LOCAL | 1, 1).await;
    a.subscribe(2, "nl2/#", 0).await;
    a.publish("nl2/t", b"own", 1, 1).await;
    // Delivered once, through the subscription without No Local (QoS 0).
    let m = a.recv_publish().await;
    assert_eq!((m.payload.as_slice(), m.qos), (&b"own"[..], 0));
    a.expect_silence(QUIET).await;
}

#[tokio::test]
async fn retain_as_published_keeps_the_retain_flag_on_live_delivery() {
    let b = start().await;
    let mut rap = connect_v5(b.addr, "rap-1").await;
    rap.subscribe_expect(1, "rap/t", RETAIN_AS_PUBLISHED | 1, 1).await;
    let mut plain = connect_v5(b.addr, "rap-0").await;
    plain.subscribe(1, "rap/t", 1).await;

    let mut p = connect_v5(b.addr, "rap-pub").await;
    p.publish_retain("rap/t", b"retained", 1, 1, true).await;
    p.publish_retain("rap/t", b"not retained", 1, 2, false).await;

    let m = rap.recv_publish_ack().await;
    assert_eq!((m.payload.as_slice(), m.retain), (&b"retained"[..], true), "Retain As Published keeps the flag");
    let m = rap.recv_publish_ack().await;
    assert_eq!((m.payload.as_slice(), m.retain), (&b"not retained"[..], false));
    let m = plain.recv_publish_ack().await;
    assert_eq!((m.payload.as_slice(), m.retain), (&b"retained"[..], false), "live delivery clears the flag");
    let m = plain.recv_publish_ack().await;
    assert_eq!((m.payload.as_slice(), m.retain), (&b"not retained"[..], false));
}

#[tokio::test]
async fn retain_handling_0_sends_retained_on_every_subscribe() {
    let b = start().await;
    retain(&b, "rh0/t", b"r0").await;
    let mut s = connect_v5(b.addr, "rh0").await;
    for pid in 1..=2u16 {
        s.subscribe(pid, "rh0/t", 1).await;
        let m = s.recv_publish_ack().await;
        assert_eq!((m.payload.as_slice(), m.retain), (&b"r0"[..], true), "subscribe #{pid}");
    }
    s.expect_silence(QUIET).await;
}

#[tokio::test]
async fn retain_handling_1_sends_retained_only_for_a_new_subscription() {
    let b = start().await;
    retain(&b, "rh1/t", b"r1").await;
    let mut s = connect_v5(b.addr, "rh1").await;
    s.subscribe_expect(1, "rh1/t", RETAIN_HANDLING_1 | 1, 1).await;
    let m = s.recv_publish_ack().await;
    assert_eq!((m.payload.as_slice(), m.retain), (&b"r1"[..], true));
    // Re-subscribing an existing subscription: no retained message.
    s.subscribe_expect(2, "rh1/t", RETAIN_HANDLING_1 | 1, 1).await;
    s.expect_silence(QUIET).await;
    // After unsubscribing it is new again.
    assert_eq!(s.unsubscribe(3, &["rh1/t"]).await, vec![0x00]);
    s.subscribe_expect(4, "rh1/t", RETAIN_HANDLING_1 | 1, 1).await;
    assert_eq!(s.recv_publish_ack().await.payload, b"r1");
    s.expect_silence(QUIET).await;
}

#[tokio::test]
async fn retain_handling_2_never_sends_retained() {
    let b = start().await;
    retain(&b, "rh2/t", b"r2").await;
    let mut s = connect_v5(b.addr, "rh2").await;
    s.subscribe_expect(1, "rh2/t", RETAIN_HANDLING_2 | 1, 1).await;
    s.expect_silence(QUIET).await;
    s.subscribe_expect(2, "rh2/#", RETAIN_HANDLING_2 | 1, 1).await;
    s.expect_silence(QUIET).await;
    // Live messages still arrive.
    let mut p = connect_v5(b.addr, "rh2-pub").await;
    p.publish("rh2/t", b"live", 1, 1).await;
    let m = s.recv_publish_ack().await;
    assert_eq!((m.payload.as_slice(), m.retain), (&b"live"[..], false));
    s.expect_silence(QUIET).await;
}

#[tokio::test]
async fn subscription_identifier_is_attached_to_deliveries() {
    let b = start().await;
    retain(&b, "sid/t", b"old").await;
    let mut s = connect_v5(b.addr, "sid").await;
    // 300 takes two bytes as a variable byte integer.
    let codes = s.subscribe_props(1, &prop_varint(SUBSCRIPTION_ID, 300), &[("sid/t", 1)]).await;
    assert_eq!(codes, vec![1]);
    let m = s.recv_publish_ack().await;
    assert_eq!((m.payload.as_slice(), m.subscription_ids()), (&b"old"[..], vec![300]), "retained: {m:?}");
    assert_eq!(m.prop(SUBSCRIPTION_ID), Some(&[0xAC, 0x02][..]));
    s.subscribe(2, "noid/t", 1).await;

    let mut p = connect_v5(b.addr, "sid-pub").await;
    p.publish("sid/t", b"live", 1, 1).await;
    p.publish("noid/t", b"plain", 1, 2).await;
    let m = s.recv_publish_ack().await;
    assert_eq!((m.payload.as_slice(), m.subscription_ids()), (&b"live"[..], vec![300]));
    let m = s.recv_publish_ack().await;
    assert_eq!((m.payload.as_slice(), m.subscription_ids()), (&b"plain"[..], vec![]), "{m:?}");
}

#[tokio::test]
async fn overlapping_subscriptions_give_one_publish_with_every_identifier() {
    let b = start().await;
    let mut s = connect_v5(b.addr, "ov").await;
    assert_eq!(s.subscribe_props(1, &prop_varint(SUBSCRIPTION_ID, 1), &[("ov/#", 1)]).await, vec![1]);
    assert_eq!(s.subscribe_props(2, &prop_varint(SUBSCRIPTION_ID, 2), &[("ov/+", 1)]).await, vec![1]);
    let mut p = connect_v5(b.addr, "ov-pub").await;
    p.publish("ov/x", b"both", 1, 1).await;
    let m = s.recv_publish_ack().await;
    let mut ids = m.subscription_ids();
    ids.sort_unstable();
    assert_eq!((m.payload.as_slice(), ids), (&b"both"[..], vec![1, 2]), "{m:?}");
    s.expect_silence(QUIET).await;
}

#[tokio::test]
async fn subscription_identifier_refused_when_disabled() {
    let b = start_with(|c| c.mqtt.subscription_identifiers = false).await;
    let (mut s, ack) = connect_with(b.addr, &Connect::v5("sid-off")).await;
    assert_eq!(ack.prop(0x29), Some(&[0x00][..]), "Subscription Identifier Available 0: {ack:?}");
    // Without an identifier, subscribing works.
    s.subscribe(1, "sid-off/t", 1).await;
    s.send(&subscribe_props_pkt(2, &prop_varint(SUBSCRIPTION_ID, 5), &[("sid-off/u", 1)])).await;
    // 3.2.2.3.12: DISCONNECT 0xA1, Subscription Identifiers not supported.
    s.expect(&[0xE0, 0x01, 0xA1]).await;
    s.expect_closed().await;
}

#[tokio::test]
async fn resubscribing_replaces_the_subscription_identifier() {
    let b = start().await;
    let mut s = connect_v5(b.addr, "rsid").await;
    let mut p = connect_v5(b.addr, "rsid-pub").await;
    assert_eq!(s.subscribe_props(1, &prop_varint(SUBSCRIPTION_ID, 5), &[("rsid/t", 1)]).await, vec![1]);
    p.publish("rsid/t", b"first", 1, 1).await;
    assert_eq!(s.recv_publish_ack().await.subscription_ids(), vec![5]);

    assert_eq!(s.subscribe_props(2, &prop_varint(SUBSCRIPTION_ID, 6), &[("rsid/t", 1)]).await, vec![1]);
    p.publish("rsid/t", b"second", 1, 2).await;
    let m = s.recv_publish_ack().await;
    assert_eq!((m.payload.as_slice(), m.subscription_ids()), (&b"second"[..], vec![6]), "{m:?}");

    // Re-subscribing without an identifier removes it.
    s.subscribe(3, "rsid/t", 1).await;
    p.publish("rsid/t", b"third", 1, 3).await;
    let m = s.recv_publish_ack().await;
    assert_eq!((m.payload.as_slice(), m.subscription_ids()), (&b"third"[..], vec![]), "{m:?}");
    s.expect_silence(QUIET).await;
}

#[tokio::test]
async fn subscription_identifier_zero_is_refused() {
    let b = start().await;
    let mut s = connect_v5(b.addr, "sid0").await;
    s.send(&subscribe_props_pkt(1, &prop_varint(SUBSCRIPTION_ID, 0), &[("sid0/t", 1)])).await;
    // 3.8.2.1.2 calls it a Protocol Error (0x82); tern answers 0x81 as mosquitto does.
    s.expect_disconnect(0x81).await;
}
