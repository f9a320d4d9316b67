//! MQTT 5 CONNACK properties (3.2.2.3) and the behaviour behind the capabilities announced.

mod common;

use std::time::Duration;

use common::*;

const SERVER_KEEP_ALIVE: u8 = 0x13;
const TOPIC_ALIAS_MAXIMUM: u8 = 0x22;
const MAXIMUM_QOS: u8 = 0x24;
const RETAIN_AVAILABLE: u8 = 0x25;
const WILDCARD_AVAILABLE: u8 = 0x28;
const SUB_IDS_AVAILABLE: u8 = 0x29;
const SHARED_AVAILABLE: u8 = 0x2A;

#[tokio::test]
async fn assigned_client_identifier_for_an_empty_id_names_a_usable_session() {
    let b = start().await;
    let (c, ack) = connect_with(b.addr, &Connect::v5("").expiry(60)).await;
    let id = String::from_utf8(ack.prop(PROP_ASSIGNED_CLIENT_ID).expect("Assigned Client Identifier").to_vec())
        .expect("utf-8 identifier");
    assert!(!id.is_empty(), "{ack:?}");
    let (_c2, ack2) = connect_with(b.addr, &Connect::v5("").expiry(60)).await;
    let id2 = ack2.prop(PROP_ASSIGNED_CLIENT_ID).expect("Assigned Client Identifier");
    assert_ne!(id.as_bytes(), id2, "two clients got the same assigned identifier");
    // A client that names itself is not assigned one.
    let (_c3, ack3) = connect_with(b.addr, &Connect::v5("named")).await;
    assert_eq!(ack3.prop(PROP_ASSIGNED_CLIENT_ID), None, "{ack3:?}");
    // The assigned identifier is the session's name: resuming with it finds the session.
    c.disconnect().await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (_c, ack) = connect_with(b.addr, &Connect::v5(&id).clean(false).expiry(60)).await;
    assert!(ack.session_present, "session of assigned id {id} not found: {ack:?}");
}

#[tokio::test]
async fn server_keep_alive_when_the_limit_is_lower() {
    let b = start_with(|c| c.limits.max_keepalive = 5).await;
    let (_c, ack) = connect_with(b.addr, &Connect::v5("ka60").keep_alive(60)).await;
    assert_eq!(ack.prop(SERVER_KEEP_ALIVE), Some(&[0x00, 0x05][..]), "asked 60, limit 5: {ack:?}");
    let (_c, ack) = connect_with(b.addr, &Connect::v5("ka0").keep_alive(0)).await;
    assert_eq!(ack.prop(SERVER_KEEP_ALIVE), Some(&[0x00, 0x05][..]), "asked none, limit 5: {ack:?}");
    let (_c, ack) = connect_with(b.addr, &Connect::v5("ka3").keep_alive(3)).await;
    assert_eq!(ack.prop(SERVER_KEEP_ALIVE), None, "asked 3, within the limit: {ack:?}");
}

#[tokio::test]
async fn server_keep_alive_is_enforced() {
    let b = start_with(|c| c.limits.max_keepalive = 1).await;
    let (mut c, ack) = connect_with(b.addr, &Connect::v5("ka-enf").keep_alive(60)).await;
    assert_eq!(ack.prop(SERVER_KEEP_ALIVE), Some(&[0x00, 0x01][..]), "{ack:?}");
    // Silent client: closed after 1.5 x the granted 1 s, not the 60 s it asked for.
    let t0 = std::time::Instant::now();
    c.expect(&[0xE0, 0x01, 0x8D]).await;
    let took = t0.elapsed();
    assert!(took >= Duration::from_millis(1200), "closed too early: {took:?}");
    assert!(took <= Duration::from_millis(2900), "closed too late: {took:?}");
    c.expect_closed().await;
}

#[tokio::test]
async fn defaults_announce_topic_alias_maximum_receive_maximum_and_nothing_unneeded() {
    let b = start().await;
    let (_c, ack) = connect_with(b.addr, &Connect::v5("defaults")).await;
    assert_eq!(ack.code, 0x00);
    assert_eq!(ack.prop(TOPIC_ALIAS_MAXIMUM), Some(&[0x00, 0x0A][..]), "{ack:?}");
    // A finite Receive Maximum (mosquitto's 20): clients then hold at most 20 unreleased
    // QoS 2 messages instead of 65,535 before expecting DISCONNECT 0x93.
    assert_eq!(ack.prop(PROP_RECEIVE_MAXIMUM), Some(&[0x00, 0x14][..]), "{ack:?}");
    for (id, what) in [
        (MAXIMUM_QOS, "Maximum QoS"),
        (RETAIN_AVAILABLE, "Retain Available"),
        (WILDCARD_AVAILABLE, "Wildcard Subscription Available"),
        (SUB_IDS_AVAILABLE, "Subscription Identifiers Available"),
        (SHARED_AVAILABLE, "Shared Subscription Available"),
        (SERVER_KEEP_ALIVE, "Server Keep Alive"),
        (PROP_ASSIGNED_CLIENT_ID, "Assigned Client Identifier"),
    ] {
        assert_eq!(ack.prop(id), None, "{what} announced with default settings: {ack:?}");
    }
}

#[tokio::test]
async fn no_topic_alias_maximum_when_aliases_are_off() {
    let b = start_with(|c| c.mqtt.topic_alias_maximum = 0).await;
    let (_c, ack) = connect_with(b.addr, &Connect::v5("no-alias")).await;
    assert_eq!(ack.prop(TOPIC_ALIAS_MAXIMUM), None, "{ack:?}");
}

#[tokio::test]
async fn capabilities_turned_off_are_announced() {
    let b = start_with(|c| {
        c.mqtt.retain_available = false;
        c.mqtt.maximum_qos = 1;
        c.mqtt.wildcard_subscriptions = false;
        c.mqtt.shared_subscriptions = false;
        c.mqtt.subscription_identifiers = false;
    })
    .await;
    let (_c, ack) = connect_with(b.addr, &Connect::v5("caps")).await;
    assert_eq!(ack.prop(RETAIN_AVAILABLE), Some(&[0][..]), "{ack:?}");
    assert_eq!(ack.prop(MAXIMUM_QOS), Some(&[1][..]), "{ack:?}");
    assert_eq!(ack.prop(WILDCARD_AVAILABLE), Some(&[0][..]), "{ack:?}");
    assert_eq!(ack.prop(SHARED_AVAILABLE), Some(&[0][..]), "{ack:?}");
    assert_eq!(ack.prop(SUB_IDS_AVAILABLE), Some(&[0][..]), "{ack:?}");
}

#[tokio::test]
async fn maximum_qos_0_is_announced() {
    let b = start_with(|c| c.mqtt.maximum_qos = 0).await;
    let (_c, ack) = connect_with(b.addr, &Connect::v5("qos0")).await;
    assert_eq!(ack.prop(MAXIMUM_QOS), Some(&[0][..]), "{ack:?}");
}

#[tokio::test]
async fn publish_above_maximum_qos_gets_disconnect_0x9b() {
    let b = start_with(|c| c.mqtt.maximum_qos = 1).await;
    let mut s = connect_v5(b.addr, "mq-watch").await;
    s.subscribe(1, "mq/t", 1).await;
    let mut c = connect_v5(b.addr, "mq-pub").await;
    c.publish("mq/t", b"qos1 ok", 1, 1).await;
    assert_eq!(s.recv_publish_ack().await.payload, b"qos1 ok");
    c.send(&publish_full(b"mq/t", b"qos2", 2, 2, false, false, Some(&[]))).await;
    c.expect(&[0xE0, 0x01, 0x9B]).await;
    c.expect_closed().await;
    s.expect_silence(QUIET).await;
}

#[tokio::test]
async fn retain_when_unavailable_gets_disconnect_0x9a() {
    let b = start_with(|c| c.mqtt.retain_available = false).await;
    let mut s = connect_v5(b.addr, "ra-watch").await;
    s.subscribe(1, "ra/t", 1).await;
    let mut c = connect_v5(b.addr, "ra-pub").await;
    c.send(&publish_full(b"ra/t", b"keep me", 1, 1, true, false, Some(&[]))).await;
    c.expect(&[0xE0, 0x01, 0x9A]).await;
    c.expect_closed().await;
    s.expect_silence(QUIET).await;
    // Nothing was retained either.
    let mut late = connect_v5(b.addr, "ra-late").await;
    late.subscribe(1, "ra/t", 1).await;
    late.expect_silence(QUIET).await;
}

#[tokio::test]
async fn wildcard_subscribe_refused_with_0xa2_when_wildcards_are_off() {
    let b = start_with(|c| c.mqtt.wildcard_subscriptions = false).await;
    let mut s = connect_v5(b.addr, "wc").await;
    let codes = s.subscribe_many(1, &[("wc/+", 1), ("wc/#", 1), ("wc/t", 1)]).await;
    assert_eq!(codes, vec![0xA2, 0xA2, 0x01]);
    // Only the plain filter took effect.
    let mut p = connect_v5(b.addr, "wc-pub").await;
    p.publish("wc/t", b"exact", 1, 1).await;
    p.publish("wc/other", b"wild", 1, 2).await;
    assert_eq!(s.recv_publish_ack().await.payload, b"exact");
    s.expect_silence(QUIET).await;
}

#[tokio::test]
async fn shared_subscribe_refused_with_0x9e_when_shared_is_off() {
    let b = start_with(|c| c.mqtt.shared_subscriptions = false).await;
    let mut s = connect_v5(b.addr, "sh").await;
    let codes = s.subscribe_many(1, &[("$share/g/sh/t", 1), ("sh/t", 1)]).await;
    assert_eq!(codes, vec![0x9E, 0x01]);
    let mut p = connect_v5(b.addr, "sh-pub").await;
    p.publish("sh/t", b"once", 1, 1).await;
    assert_eq!(s.recv_publish_ack().await.payload, b"once");
    s.expect_silence(QUIET).await;
}
