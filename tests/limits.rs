//! Configured limits as a client meets them.

mod common;

use std::time::Duration;

use common::*;

#[tokio::test]
async fn connections_over_the_limit_are_told_why_and_room_frees_up() {
    let b = start_with(|c| c.limits.max_connections = 1).await;
    let mut first = Raw::open(b.addr).await;
    first.handshake(&Connect::v311("only-one")).await;

    let mut v3 = Raw::open(b.addr).await;
    v3.send(&Connect::v311("too-many").bytes()).await;
    v3.expect(&[0x20, 0x02, 0x00, 0x03]).await; // Server unavailable
    v3.expect_closed().await;

    let mut v5 = Raw::open(b.addr).await;
    v5.send(&Connect::v5("too-many-5").bytes()).await;
    let ack = parse_connack(&v5.read_packet().await, true);
    assert_eq!(ack.code, 0x97, "v5: Quota exceeded");
    v5.expect_closed().await;

    first.disconnect().await;
    // The slot is released when the first connection's task ends.
    let mut again = None;
    for _ in 0..50 {
        let mut c = Raw::open(b.addr).await;
        c.send(&Connect::v311("next").bytes()).await;
        let p = c.read_packet().await;
        if p == [0x20, 0x02, 0x00, 0x00] {
            again = Some(c);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    again.expect("a new connection is accepted once the first has gone").ping().await;
}

#[tokio::test]
async fn queued_bytes_limit_drops_what_does_not_fit() {
    // Each message holds 6 bytes of payload, 5 of topic and ~128 of bookkeeping: one fits.
    let b = start_with(|c| c.limits.max_queued_bytes = 200).await;
    let mut s = Raw::open(b.addr).await;
    s.handshake(&Connect::v311("byte-limited").clean(false)).await;
    s.subscribe(1, "bytes", 1).await;
    s.disconnect().await;

    let mut p = Raw::open(b.addr).await;
    p.handshake(&Connect::v311("byte-pub")).await;
    for (i, payload) in [b"aaaaaa", b"bbbbbb", b"cccccc"].iter().enumerate() {
        p.publish("bytes", *payload, 1, i as u16 + 1).await;
    }
    let mut s = Raw::open(b.addr).await;
    assert!(s.handshake(&Connect::v311("byte-limited").clean(false)).await.session_present);
    assert_eq!(s.recv_publish_ack().await.payload, b"aaaaaa");
    s.expect_silence(Duration::from_millis(400)).await;
}

#[tokio::test]
async fn subscriptions_per_client_are_bounded() {
    let b = start_with(|c| c.limits.max_subscriptions = 3).await;
    let mut c = connect_v5(b.addr, "many-subs").await;
    assert_eq!(c.subscribe_many(1, &[("a", 0), ("b", 0), ("c", 0), ("d", 0)]).await, vec![0, 0, 0, 0x97]);
    // Replacing a subscription the session holds is not a new one.
    assert_eq!(c.subscribe_many(2, &[("a", 1)]).await, vec![1]);
    let mut v3 = connect_v311(b.addr, "many-subs-3").await;
    assert_eq!(v3.subscribe_many(1, &[("a", 0), ("b", 0), ("c", 0), ("d", 0)]).await, vec![0, 0, 0, 0x80]);
    // Unsubscribing makes room again.
    v3.unsubscribe(2, &["a"]).await;
    assert_eq!(v3.subscribe_many(3, &[("d", 0)]).await, vec![0]);
}

fn user_props(n: usize) -> Vec<u8> {
    let mut p = Vec::new();
    for i in 0..n {
        p.push(0x26);
        p.extend(mqtt_str(format!("k{i}").as_bytes()));
        p.extend(mqtt_str(b"v"));
    }
    p
}

#[tokio::test]
async fn user_properties_per_message_are_bounded() {
    let b = start_with(|c| c.limits.max_user_properties = 2).await;
    let mut sub = connect_v5(b.addr, "props-sub").await;
    sub.subscribe(1, "props", 1).await;
    let mut p = connect_v5(b.addr, "props-pub").await;
    p.send(&publish_full(b"props", b"too many", 1, 1, false, false, Some(&user_props(3)))).await;
    let ack = p.read_packet().await;
    assert_eq!(hex(&ack), hex(&[0x40, 0x03, 0x00, 0x01, 0x97]), "PUBACK Quota exceeded");
    p.send(&publish_full(b"props", b"fine", 1, 2, false, false, Some(&user_props(2)))).await;
    p.expect_ack(0x40, 2).await;
    assert_eq!(sub.recv_publish_ack().await.payload, b"fine");
    sub.expect_silence(QUIET).await;
}

#[tokio::test]
async fn unreleased_qos2_of_a_v311_client_are_bounded() {
    let b = start_with(|c| c.limits.max_awaiting_pubrel = 3).await;
    let mut c = connect_v311(b.addr, "no-pubrel").await;
    for pid in 1..=3u16 {
        c.send(&publish("q2", b"x", 2, pid)).await;
        c.expect(&[0x50, 0x02, 0x00, pid as u8]).await;
    }
    c.send(&publish("q2", b"x", 2, 4)).await;
    c.expect_closed().await;
}

/// A SUBSCRIBE whose filters overlap gets each retained message once, not once per filter.
#[tokio::test]
async fn overlapping_filters_of_one_subscribe_get_each_retained_message_once() {
    let b = start().await;
    let mut p = connect_v311(b.addr, "ret-pub").await;
    for t in ["r/1", "r/2", "r/3"] {
        p.publish_retain(t, t.as_bytes(), 1, 1, true).await;
    }
    let mut s = connect_v311(b.addr, "ret-sub").await;
    assert_eq!(s.subscribe_many(1, &[("#", 1), ("r/#", 1), ("r/+", 0), ("r/1", 1)]).await, vec![1, 1, 0, 1]);
    let mut got = Vec::new();
    while let Event::Packet(pk) = s.next_event(QUIET).await {
        let m = parse_publish(&pk, false);
        assert_eq!(m.qos, 1, "highest QoS of the matching filters");
        s.ack(&m).await;
        got.push(m.topic);
    }
    got.sort();
    assert_eq!(got, vec!["r/1", "r/2", "r/3"]);
}

/// The first filter's retained messages are gathered without an index (one filter matches
/// each topic once); a later filter must still find them, merge, and raise their QoS.
#[tokio::test]
async fn a_later_filter_raises_the_qos_of_retained_messages_an_earlier_one_matched() {
    let b = start().await;
    let mut p = connect_v311(b.addr, "ret-pub2").await;
    for t in ["r/1", "r/2", "s/1"] {
        p.publish_retain(t, t.as_bytes(), 1, 1, true).await;
    }
    let mut s = connect_v311(b.addr, "ret-sub2").await;
    assert_eq!(s.subscribe_many(1, &[("r/+", 0), ("#", 1)]).await, vec![0, 1]);
    let mut got = Vec::new();
    while let Event::Packet(pk) = s.next_event(QUIET).await {
        let m = parse_publish(&pk, false);
        assert_eq!(m.qos, 1, "{}: highest QoS of the matching filters", m.topic);
        s.ack(&m).await;
        got.push(m.topic);
    }
    got.sort();
    assert_eq!(got, vec!["r/1", "r/2", "s/1"]);
}
