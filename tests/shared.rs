//! Shared subscriptions `$share/{group}/{filter}` (MQTT 5.0 section 4.8.2).

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::*;

async fn member(addr: std::net::SocketAddr, id: &str, filter: &str) -> Raw {
    let mut m = Raw::open(addr).await;
    m.handshake(&Connect::v5(id)).await;
    m.subscribe(1, filter, 1).await;
    m
}

/// Reads PUBLISHes until `quiet` passes without one; acks them when `ack`.
async fn collect(m: &mut Raw, ack: bool, quiet: Duration) -> Vec<Pub> {
    let mut got = Vec::new();
    while let Event::Packet(p) = m.next_event(quiet).await {
        let p = parse_publish(&p, true);
        if ack {
            m.ack(&p).await;
        }
        got.push(p);
    }
    got
}

fn numbers(ps: &[Pub]) -> Vec<u32> {
    ps.iter().map(|p| String::from_utf8_lossy(&p.payload).parse().unwrap()).collect()
}

#[tokio::test]
async fn each_message_goes_to_one_member_in_turn() {
    let b = start().await;
    let mut a = member(b.addr, "share-a", "$share/g/work/+").await;
    let mut c = member(b.addr, "share-c", "$share/g/work/+").await;
    let mut plain = member(b.addr, "plain", "work/+").await;
    let mut p = Raw::open(b.addr).await;
    p.handshake(&Connect::v5("producer")).await;
    for i in 0..10u32 {
        p.publish(&format!("work/{i}"), i.to_string().as_bytes(), 1, i as u16 + 1).await;
    }
    let quiet = Duration::from_millis(400);
    let (ga, gc, gp) = (
        collect(&mut a, true, quiet).await,
        collect(&mut c, true, quiet).await,
        collect(&mut plain, true, quiet).await,
    );
    let (na, nc) = (numbers(&ga), numbers(&gc));
    assert_eq!(na.len() + nc.len(), 10, "every message to exactly one member: {na:?} {nc:?}");
    let all: BTreeSet<u32> = na.iter().chain(&nc).copied().collect();
    assert_eq!(all.len(), 10, "no message to both members");
    assert_eq!(na.len(), 5, "round-robin between two members: {na:?} {nc:?}");
    assert_eq!(numbers(&gp).len(), 10, "a plain subscription beside the group gets everything");
}

#[tokio::test]
async fn unacknowledged_messages_of_a_departing_member_go_to_another() {
    let b = start().await;
    let mut lazy = member(b.addr, "lazy", "$share/g2/jobs").await;
    let mut busy = member(b.addr, "busy", "$share/g2/jobs").await;
    let mut p = Raw::open(b.addr).await;
    p.handshake(&Connect::v5("producer2")).await;
    for i in 0..6u32 {
        p.publish("jobs", i.to_string().as_bytes(), 1, i as u16 + 1).await;
    }
    let quiet = Duration::from_millis(400);
    let unacked = numbers(&collect(&mut lazy, false, quiet).await);
    let first = numbers(&collect(&mut busy, true, quiet).await);
    assert!(!unacked.is_empty(), "the lazy member got its share");
    drop(lazy); // connection lost without acknowledging
    let moved = numbers(&collect(&mut busy, true, Duration::from_millis(1000)).await);
    let mut all: Vec<u32> = first.iter().chain(&moved).copied().collect();
    all.sort();
    assert_eq!(all, (0..6).collect::<Vec<_>>(), "busy ends up with every message (lazy had {unacked:?})");
}

#[tokio::test]
async fn no_retained_messages_on_a_shared_subscribe() {
    let b = start().await;
    let mut p = Raw::open(b.addr).await;
    p.handshake(&Connect::v5("retainer")).await;
    p.publish_retain("state/x", b"on", 1, 1, true).await;
    let mut plain = member(b.addr, "plain-r", "state/#").await;
    assert!(plain.recv_publish_ack().await.retain, "a plain subscriber gets the retained message");
    let mut m = member(b.addr, "shared-r", "$share/g3/state/#").await;
    m.expect_silence(Duration::from_millis(400)).await;
}

#[tokio::test]
async fn no_local_on_a_shared_subscription_is_a_protocol_error() {
    let b = start().await;
    let mut m = Raw::open(b.addr).await;
    m.handshake(&Connect::v5("nolocal")).await;
    // options: QoS 1 + No Local (bit 2)
    m.send(&subscribe_pkt(true, 1, &[("$share/g/t", 0x05)])).await;
    m.expect_disconnect(0x82).await;
}
