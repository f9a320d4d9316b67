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
    let b = start_with(|c| c.limits.max_queued_bytes = 10).await;
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
