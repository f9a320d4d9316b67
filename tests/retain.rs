//! Retained messages: set, replace, clear, delivery on subscribe and wildcard matching.

mod common;

use common::*;

/// Publishes retained messages (QoS 1, so each is stored before the PUBACK) from a fresh client.
async fn retain_all(b: &TestBroker, msgs: &[(&str, &[u8])]) {
    let mut p = connect_v311(b.addr, "retainer").await;
    for (i, (topic, payload)) in msgs.iter().enumerate() {
        p.publish_retain(topic, payload, 1, i as u16 + 1, true).await;
    }
    p.disconnect().await;
}

/// Subscribes `filter` from a fresh client and collects the retained messages it is sent.
async fn retained_on_subscribe(b: &TestBroker, id: &str, filter: &str, qos: u8) -> Vec<Pub> {
    let mut c = connect_v311(b.addr, id).await;
    c.subscribe(1, filter, qos).await;
    let mut out = Vec::new();
    loop {
        match c.next_event(QUIET).await {
            Event::Packet(p) => {
                let m = parse_publish(&p, false);
                c.ack(&m).await;
                out.push(m);
            }
            Event::Timeout => break,
            Event::Closed => panic!("connection closed"),
        }
    }
    out.sort_by(|a, b| a.topic.cmp(&b.topic));
    out
}

#[tokio::test]
async fn retained_message_delivered_on_subscribe_with_retain_flag() {
    let b = start().await;
    retain_all(&b, &[("r/1", b"hello")]).await;
    assert_eq!(b.handle.retained_count(), 1);
    let mut c = connect_v311(b.addr, "late").await;
    c.subscribe(1, "r/1", 0).await;
    // QoS 0 with the retain bit: 31, topic "r/1", payload "hello".
    c.expect(&[0x31, 0x0A, 0x00, 0x03, b'r', b'/', b'1', b'h', b'e', b'l', b'l', b'o']).await;
    c.expect_silence(QUIET).await;
}

#[tokio::test]
async fn retained_qos_is_capped_by_subscription() {
    let b = start().await;
    retain_all(&b, &[("rq/t", b"q")]).await;
    let got = retained_on_subscribe(&b, "q0", "rq/t", 0).await;
    assert_eq!(got.len(), 1);
    assert_eq!((got[0].qos, got[0].retain), (0, true));
    let got = retained_on_subscribe(&b, "q2", "rq/t", 2).await;
    assert_eq!(got.len(), 1);
    assert_eq!((got[0].qos, got[0].retain), (1, true));
}

#[tokio::test]
async fn retained_message_is_replaced() {
    let b = start().await;
    retain_all(&b, &[("r/x", b"first"), ("r/x", b"second")]).await;
    assert_eq!(b.handle.retained_count(), 1);
    let got = retained_on_subscribe(&b, "s", "r/x", 1).await;
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].payload, b"second");
    assert!(got[0].retain);
}

#[tokio::test]
async fn empty_payload_clears_retained_message() {
    let b = start().await;
    retain_all(&b, &[("r/c", b"keep"), ("r/d", b"other")]).await;
    assert_eq!(b.handle.retained_count(), 2);
    retain_all(&b, &[("r/c", b"")]).await;
    assert_eq!(b.handle.retained_count(), 1);
    let got = retained_on_subscribe(&b, "s", "r/+", 1).await;
    let topics: Vec<&str> = got.iter().map(|m| m.topic.as_str()).collect();
    assert_eq!(topics, vec!["r/d"]);
}

#[tokio::test]
async fn retained_matched_by_plus_and_hash() {
    let b = start().await;
    retain_all(&b, &[("s/a/x", b"1"), ("s/b/x", b"2"), ("s/a/y", b"3"), ("other", b"4")]).await;
    let plus: Vec<String> = retained_on_subscribe(&b, "p", "s/+/x", 1).await.into_iter().map(|m| m.topic).collect();
    assert_eq!(plus, vec!["s/a/x", "s/b/x"]);
    let hash: Vec<String> = retained_on_subscribe(&b, "h", "s/#", 1).await.into_iter().map(|m| m.topic).collect();
    assert_eq!(hash, vec!["s/a/x", "s/a/y", "s/b/x"]);
    let all: Vec<String> = retained_on_subscribe(&b, "a", "#", 1).await.into_iter().map(|m| m.topic).collect();
    assert_eq!(all, vec!["other", "s/a/x", "s/a/y", "s/b/x"]);
}

#[tokio::test]
async fn dollar_topics_not_matched_by_leading_wildcard() {
    let b = start().await;
    retain_all(&b, &[("$x/info", b"d"), ("plain", b"p")]).await;
    let all: Vec<String> = retained_on_subscribe(&b, "a", "#", 1).await.into_iter().map(|m| m.topic).collect();
    assert_eq!(all, vec!["plain"]);
    let plus: Vec<String> = retained_on_subscribe(&b, "p", "+/info", 1).await.into_iter().map(|m| m.topic).collect();
    assert!(plus.is_empty(), "{plus:?}");
    let explicit: Vec<String> = retained_on_subscribe(&b, "e", "$x/#", 1).await.into_iter().map(|m| m.topic).collect();
    assert_eq!(explicit, vec!["$x/info"]);
}

#[tokio::test]
async fn live_delivery_has_retain_flag_clear_v311() {
    let b = start().await;
    let mut sub = connect_v311(b.addr, "live").await;
    sub.subscribe(1, "l/t", 0).await;
    let mut publisher = connect_v311(b.addr, "pub").await;
    publisher.publish_retain("l/t", b"now", 1, 1, true).await;
    // QoS 0 to an existing subscriber: 30 (no retain bit).
    sub.expect(&[0x30, 0x08, 0x00, 0x03, b'l', b'/', b't', b'n', b'o', b'w']).await;
    // ...but a new subscriber gets it as retained.
    let got = retained_on_subscribe(&b, "new", "l/t", 0).await;
    assert_eq!(got.len(), 1);
    assert!(got[0].retain);
}

#[tokio::test]
async fn resubscribing_sends_retained_again_v311() {
    let b = start().await;
    retain_all(&b, &[("rs/t", b"v")]).await;
    let mut c = connect_v311(b.addr, "re").await;
    c.subscribe(1, "rs/t", 0).await;
    assert!(c.recv_publish().await.retain);
    // 3.1.1: a repeated SUBSCRIBE re-sends retained messages [MQTT-3.8.4-3].
    c.subscribe(2, "rs/t", 0).await;
    let again = c.recv_publish().await;
    assert_eq!((again.payload.as_slice(), again.retain), (&b"v"[..], true));
}

/// Past `limits.max_retained_in_memory`, older retained messages keep only their topic in
/// memory and are read back from the store when a subscription matches them.
#[tokio::test]
async fn retained_beyond_the_memory_limit_are_served_from_the_store() {
    let b = start_with(|c| c.limits.max_retained_in_memory = 1).await;
    let mut p = Raw::open(b.addr).await;
    p.handshake(&Connect::v311("many-retained")).await;
    for i in 1..=3u16 {
        // QoS 1 under durability "sync": the PUBACK means the message is on disk.
        p.publish_retain(&format!("mem/{i}"), format!("value {i}").as_bytes(), 1, i, true).await;
    }
    assert_eq!(b.handle.retained_in_memory(), 1, "only the newest stays whole in memory");
    assert_eq!(b.handle.retained_count(), 3);
    let mut s = Raw::open(b.addr).await;
    s.handshake(&Connect::v311("mem-reader")).await;
    s.subscribe(1, "mem/#", 1).await;
    let mut got = Vec::new();
    for _ in 0..3 {
        let m = s.recv_publish_ack().await;
        assert!(m.retain);
        got.push((m.topic, String::from_utf8(m.payload).unwrap()));
    }
    got.sort();
    assert_eq!(
        got,
        (1..=3).map(|i| (format!("mem/{i}"), format!("value {i}"))).collect::<Vec<_>>(),
        "every retained message, whether in memory or only on disk"
    );
}

/// Republishing one retained topic keeps one message in memory, not every version of it
/// (each 64 KiB here: 200 versions pinned would be 12.5 MiB).
#[tokio::test]
async fn republishing_a_retained_topic_keeps_only_the_latest_in_memory() {
    let b = start().await;
    let mut p = connect_v311(b.addr, "republisher").await;
    let payload = vec![7u8; 64 * 1024];
    for i in 0..200u16 {
        p.publish_retain("state/big", &payload, 1, i + 1, true).await;
    }
    assert_eq!(b.handle.retained_count(), 1);
    assert_eq!(b.handle.retained_in_memory(), 1, "replaced retained messages still held");
}
