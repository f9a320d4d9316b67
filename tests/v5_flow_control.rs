//! MQTT 5 flow control (4.9): the client's Receive Maximum caps what tern has in flight to
//! it, and tern's own Receive Maximum caps the client's unreleased QoS 2 publishes.

mod common;

use common::*;

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
