//! MQTT 5 topic aliases in both directions (section 3.3.2.3.4).

mod common;

use std::time::Duration;

use common::*;

const TOPIC_ALIAS: u8 = 0x23;
const TOPIC_ALIAS_MAXIMUM: u8 = 0x22;

#[tokio::test]
async fn server_defines_then_reuses_aliases_for_a_client_that_accepts_them() {
    let b = start().await;
    let mut s = Raw::open(b.addr).await;
    let mut c = Connect::v5("alias-sub");
    c.properties.extend(prop_u16(TOPIC_ALIAS_MAXIMUM, 1));
    s.handshake(&c).await;
    s.subscribe(1, "al/#", 0).await;
    let mut p = Raw::open(b.addr).await;
    p.handshake(&Connect::v5("alias-pub")).await;
    for t in ["al/a", "al/a", "al/b", "al/a"] {
        p.publish(t, b"x", 0, 0).await;
    }
    let alias =
        |m: &Pub| m.props.iter().find(|(id, _)| *id == TOPIC_ALIAS).map(|(_, v)| u16::from_be_bytes([v[0], v[1]]));
    let m1 = s.recv_publish().await;
    assert_eq!((m1.topic.as_str(), alias(&m1)), ("al/a", Some(1)), "first use defines alias 1");
    let m2 = s.recv_publish().await;
    assert_eq!((m2.topic.as_str(), alias(&m2)), ("", Some(1)), "second use sends only the alias");
    let m3 = s.recv_publish().await;
    assert_eq!((m3.topic.as_str(), alias(&m3)), ("al/b", Some(1)), "one alias allowed: reassigned to al/b");
    let m4 = s.recv_publish().await;
    assert_eq!((m4.topic.as_str(), alias(&m4)), ("al/a", Some(1)), "al/a must be defined again");
}

#[tokio::test]
async fn no_aliases_for_a_client_that_accepts_none() {
    let b = start().await;
    let mut s = Raw::open(b.addr).await;
    s.handshake(&Connect::v5("plain-sub")).await;
    s.subscribe(1, "na", 0).await;
    let mut p = Raw::open(b.addr).await;
    p.handshake(&Connect::v5("plain-pub")).await;
    p.publish("na", b"1", 0, 0).await;
    p.publish("na", b"2", 0, 0).await;
    for _ in 0..2 {
        let m = s.recv_publish().await;
        assert_eq!(m.topic, "na");
        assert!(m.props.iter().all(|(id, _)| *id != TOPIC_ALIAS));
    }
}

#[tokio::test]
async fn client_aliases_resolve_and_misuse_is_refused() {
    let b = start().await;
    let mut s = Raw::open(b.addr).await;
    s.handshake(&Connect::v5("ca-sub")).await;
    s.subscribe(1, "ca/t", 0).await;
    let mut p = Raw::open(b.addr).await;
    p.handshake(&Connect::v5("ca-pub")).await;
    let alias1 = prop_u16(TOPIC_ALIAS, 1);
    p.send(&publish_full(b"ca/t", b"defined", 0, 0, false, false, Some(&alias1))).await;
    p.send(&publish_full(b"", b"by alias", 0, 0, false, false, Some(&alias1))).await;
    assert_eq!(s.recv_publish().await.payload, b"defined");
    let m = s.recv_publish().await;
    assert_eq!((m.topic.as_str(), m.payload.as_slice()), ("ca/t", &b"by alias"[..]));
    // The broker announced 10 aliases (config mqtt.topic_alias_maximum); 11 is refused.
    p.send(&publish_full(b"ca/t", b"x", 0, 0, false, false, Some(&prop_u16(TOPIC_ALIAS, 11)))).await;
    p.expect_disconnect(0x94).await;
    // Alias 0 is never valid [MQTT-3.3.2-8]: the same answer (mosquitto's too).
    let mut z = Raw::open(b.addr).await;
    z.handshake(&Connect::v5("ca-zero")).await;
    z.send(&publish_full(b"ca/t", b"x", 0, 0, false, false, Some(&prop_u16(TOPIC_ALIAS, 0)))).await;
    z.expect_disconnect(0x94).await;
    s.expect_silence(Duration::from_millis(200)).await;
}
