//! MQTT 5 flow control (4.9): the client's Receive Maximum caps what tern has in flight to
//! it, and tern's own Receive Maximum caps the client's unreleased QoS 2 publishes.

mod common;

use std::time::Duration;

use common::*;
use tokio::io::AsyncWriteExt;

#[tokio::test]
async fn client_receive_maximum_limits_unacknowledged_deliveries() {
    let b = start().await;
    let mut s = Raw::open(b.addr).await;
    let mut c = Connect::v5("rm-sub");
    c.properties.extend(prop_u16(PROP_RECEIVE_MAXIMUM, 2));
    s.handshake(&c).await;
    s.subscribe(1, "rm/t", 1).await;

    let mut p = connect_v5(b.addr, "rm-pub").await;
    for i in 1..=5u16 {
        p.publish("rm/t", format!("m{i}").as_bytes(), 1, i).await;
    }
    // Five are queued, none acknowledged: exactly two arrive.
    let first = s.recv_publish().await;
    let second = s.recv_publish().await;
    assert_eq!((first.payload.as_slice(), second.payload.as_slice()), (&b"m1"[..], &b"m2"[..]));
    s.expect_silence(QUIET).await;

    // Acknowledging one frees one slot: the third arrives, and nothing more.
    s.ack(&first).await;
    let third = s.recv_publish().await;
    assert_eq!(third.payload, b"m3");
    s.expect_silence(QUIET).await;

    s.ack(&second).await;
    s.ack(&third).await;
    let rest = [s.recv_publish_ack().await, s.recv_publish_ack().await];
    assert_eq!((rest[0].payload.as_slice(), rest[1].payload.as_slice()), (&b"m4"[..], &b"m5"[..]));
    s.expect_silence(QUIET).await;
}

#[tokio::test]
async fn connack_announces_the_server_receive_maximum() {
    let b = start_with(|c| c.mqtt.receive_maximum = 2).await;
    let (_c, ack) = connect_with(b.addr, &Connect::v5("rm-ann")).await;
    assert_eq!(ack.prop(PROP_RECEIVE_MAXIMUM), Some(&[0x00, 0x02][..]), "{ack:?}");
}

#[tokio::test]
async fn exceeding_the_server_receive_maximum_gets_disconnect_0x93() {
    let b = start_with(|c| c.mqtt.receive_maximum = 2).await;
    let mut s = connect_v5(b.addr, "rx-watch").await;
    s.subscribe(1, "rx/t", 0).await;
    let mut c = connect_v5(b.addr, "rx-pub").await;
    let mut bytes = Vec::new();
    for pid in 1..=3u16 {
        bytes.extend(publish_full(b"rx/t", format!("q{pid}").as_bytes(), 2, pid, false, false, Some(&[])));
    }
    c.send_lossy(&bytes).await;
    // PUBREC for the first two may come before the DISCONNECT; never one for the third.
    let reason = loop {
        let p = c.read_packet().await;
        let (h, body) = split_packet(&p);
        match h {
            0x50 => {
                let pid = u16::from_be_bytes([body[0], body[1]]);
                assert!(pid == 1 || pid == 2, "PUBREC for the publish over Receive Maximum: {}", hex(&p));
            }
            0xE0 => break body.first().copied().unwrap_or(0),
            _ => panic!("expected PUBREC or DISCONNECT, got {}", hex(&p)),
        }
    };
    assert_eq!(reason, 0x93, "DISCONNECT reason (Receive Maximum exceeded)");
    c.expect_closed().await;
    // The third message was never accepted.
    let mut got = Vec::new();
    while let Event::Packet(p) = s.next_event(QUIET).await {
        let m = parse_publish(&p, true);
        s.ack(&m).await;
        got.push(m.payload);
    }
    assert!(!got.contains(&b"q3".to_vec()), "publish over Receive Maximum was delivered: {got:?}");
}

#[tokio::test]
async fn releasing_a_qos2_publish_frees_a_slot() {
    let b = start_with(|c| c.mqtt.receive_maximum = 2).await;
    let mut c = connect_v5(b.addr, "rel-pub").await;
    for pid in 1..=2u16 {
        c.send(&publish_full(b"rel/t", b"x", 2, pid, false, false, Some(&[]))).await;
        c.expect_ack(0x50, pid).await;
    }
    c.send(&pubrel(1)).await;
    c.expect_ack(0x70, 1).await;
    // One unreleased again: a new QoS 2 publish is within the limit.
    c.send(&publish_full(b"rel/t", b"x", 2, 3, false, false, Some(&[]))).await;
    c.expect_ack(0x50, 3).await;
    c.expect_silence(QUIET).await;
}

#[tokio::test]
async fn client_receive_maximum_applies_to_a_resumed_session_queue() {
    let b = start().await;
    let connect = || {
        let mut c = Connect::v5("rq-sub").clean(false).expiry(60);
        c.properties.extend(prop_u16(PROP_RECEIVE_MAXIMUM, 2));
        c
    };
    let (mut s, _) = connect_with(b.addr, &connect()).await;
    s.subscribe(1, "rq/t", 1).await;
    s.disconnect().await;
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;

    let mut p = connect_v5(b.addr, "rq-pub").await;
    for i in 1..=5u16 {
        p.publish("rq/t", format!("m{i}").as_bytes(), 1, i).await;
    }
    let (mut s, ack) = connect_with(b.addr, &connect()).await;
    assert!(ack.session_present);
    let first = s.recv_publish().await;
    let second = s.recv_publish().await;
    assert_eq!((first.payload.as_slice(), second.payload.as_slice()), (&b"m1"[..], &b"m2"[..]));
    s.expect_silence(QUIET).await;
    s.ack(&first).await;
    assert_eq!(s.recv_publish().await.payload, b"m3");
    s.expect_silence(QUIET).await;
}

/// A client that goes on sending after tern disconnects it (the Paho interop suite's flow
/// control test answers each PUBREC with a PUBREL) still reads the reason: tern closes its
/// side and reads what the client sends until the client closes, instead of resetting the
/// connection under it (a reset fails the client's writes and may discard the DISCONNECT
/// before the client reads it).
#[tokio::test]
async fn a_client_still_sending_after_its_disconnect_reads_the_reason() {
    let b = start_with(|c| c.mqtt.receive_maximum = 2).await;
    let mut c = connect_v5(b.addr, "rx-chatty").await;
    let mut bytes = Vec::new();
    for pid in 1..=3u16 {
        bytes.extend(publish_full(b"rx/t", b"m", 2, pid, false, false, Some(&[])));
    }
    // More behind the publish over the limit, unread when tern decides to disconnect.
    for pid in 1..=2u16 {
        bytes.extend(pubrel(pid));
    }
    bytes.extend(std::iter::repeat_n([0xC0u8, 0x00], 200).flatten());
    c.send(&bytes).await;
    let reason = loop {
        match c.next_event(WAIT).await {
            Event::Packet(p) if p[0] == 0x50 => {}
            Event::Packet(p) if p[0] == 0xE0 => break split_packet(&p).1.first().copied().unwrap_or(0),
            other => panic!("expected PUBREC or DISCONNECT, got {other:?}"),
        }
    };
    assert_eq!(reason, 0x93, "DISCONNECT reason (Receive Maximum exceeded)");
    c.expect_closed().await;
    // tern's side is closed (EOF above) but not torn down: the client's writes keep
    // succeeding while it has not closed its own side.
    let mut stream = c.into_stream();
    for i in 0..10 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let wrote = async {
            stream.write_all(&pubrel(1)).await?;
            stream.flush().await
        };
        assert!(wrote.await.is_ok(), "write {i} after the DISCONNECT failed: tern reset the connection");
    }
}
