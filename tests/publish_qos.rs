//! QoS 0/1/2 delivery end to end, exactly-once, the in-flight window and ordering.

mod common;

use std::time::Duration;

use common::*;
use rumqttc::QoS;

fn v4_qos(q: u8) -> QoS {
    match q {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

fn v5_qos(q: u8) -> rumqttc::v5::mqttbytes::QoS {
    use rumqttc::v5::mqttbytes::QoS as Q;
    match q {
        0 => Q::AtMostOnce,
        1 => Q::AtLeastOnce,
        _ => Q::ExactlyOnce,
    }
}

#[tokio::test]
async fn qos_matrix_v311_rumqttc() {
    let b = start().await;
    let mut sub = V4::connect(b.addr, "m-sub", true).await;
    let publisher = V4::connect(b.addr, "m-pub", true).await;
    for s in 0..=2u8 {
        sub.subscribe(&format!("m/{s}"), v4_qos(s)).await;
    }
    for s in 0..=2u8 {
        for p in 0..=2u8 {
            let payload = format!("sub{s}-pub{p}");
            publisher.client.publish(format!("m/{s}"), v4_qos(p), false, payload.clone()).await.expect("publish");
            let got = sub.recv_publish().await;
            assert_eq!(got.topic, format!("m/{s}"));
            assert_eq!(got.payload.as_ref(), payload.as_bytes());
            assert_eq!(got.qos, v4_qos(s.min(p)), "sub QoS {s}, pub QoS {p}");
            assert!(!got.retain);
        }
    }
    sub.expect_no_publish(QUIET).await;
}

#[tokio::test]
async fn qos_matrix_v5_rumqttc() {
    let b = start().await;
    let mut sub = V5::connect(b.addr, "m5-sub").await;
    let publisher = V5::connect(b.addr, "m5-pub").await;
    for s in 0..=2u8 {
        sub.subscribe(&format!("m5/{s}"), v5_qos(s)).await;
    }
    for s in 0..=2u8 {
        for p in 0..=2u8 {
            let payload = format!("sub{s}-pub{p}");
            publisher.client.publish(format!("m5/{s}"), v5_qos(p), false, payload.clone()).await.expect("publish");
            let got = sub.recv_publish().await;
            assert_eq!(got.topic.as_ref(), format!("m5/{s}").as_bytes());
            assert_eq!(got.payload.as_ref(), payload.as_bytes());
            assert_eq!(got.qos, v5_qos(s.min(p)), "sub QoS {s}, pub QoS {p}");
        }
    }
}

#[tokio::test]
async fn binary_and_large_payloads_intact() {
    let b = start().await;
    let mut sub = connect_v311(b.addr, "bin-sub").await;
    sub.subscribe(1, "bin", 1).await;
    let mut publisher = connect_v311(b.addr, "bin-pub").await;
    let all_bytes: Vec<u8> = (0..=255u8).collect();
    let large: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let empty: Vec<u8> = Vec::new();
    for (i, payload) in [&all_bytes, &large, &empty].into_iter().enumerate() {
        publisher.publish("bin", payload, 1, i as u16 + 1).await;
        let got = sub.recv_publish_ack().await;
        assert_eq!(got.payload.len(), payload.len());
        assert!(got.payload == *payload, "payload {i} corrupted");
    }
}

#[tokio::test]
async fn qos2_inbound_exactly_once_with_duplicate() {
    let b = start().await;
    let mut sub = connect_v311(b.addr, "x-sub").await;
    sub.subscribe(1, "x/t", 2).await;
    let mut publisher = connect_v311(b.addr, "x-pub").await;

    publisher.send(&publish_full(b"x/t", b"once", 2, 1, false, false, None)).await;
    publisher.expect(&[0x50, 0x02, 0x00, 0x01]).await;
    // The same packet again, flagged DUP, before PUBREL: acknowledged again, not re-delivered.
    publisher.send(&publish_full(b"x/t", b"once", 2, 1, false, true, None)).await;
    publisher.expect(&[0x50, 0x02, 0x00, 0x01]).await;
    publisher.send(&pubrel(1)).await;
    publisher.expect(&[0x70, 0x02, 0x00, 0x01]).await;

    let got = sub.recv_publish_ack().await;
    assert_eq!((got.topic.as_str(), got.payload.as_slice(), got.qos), ("x/t", &b"once"[..], 2));
    sub.expect_silence(QUIET).await;

    // After PUBREL the id is free again: a new message with id 1 is a new message.
    publisher.publish("x/t", b"again", 2, 1).await;
    let got = sub.recv_publish_ack().await;
    assert_eq!(got.payload, b"again");
}

#[tokio::test]
async fn qos2_outbound_flow_to_raw_subscriber() {
    let b = start().await;
    let mut sub = connect_v311(b.addr, "o-sub").await;
    sub.subscribe(1, "o/t", 2).await;
    let mut publisher = connect_v311(b.addr, "o-pub").await;
    publisher.publish("o/t", b"q2", 2, 7).await;

    let got = sub.recv_publish().await;
    assert_eq!((got.qos, got.dup, got.retain), (2, false, false));
    assert_eq!(got.payload, b"q2");
    let id = got.pid.expect("QoS 2 has a packet id");
    assert_ne!(id, 0);
    sub.send(&pubrec(id)).await;
    let [hi, lo] = id.to_be_bytes();
    sub.expect(&[0x62, 0x02, hi, lo]).await;
    sub.send(&pubcomp(id)).await;
    sub.expect_silence(QUIET).await;
    sub.ping().await;
}

#[tokio::test]
async fn inflight_window_limits_unacked_publishes() {
    let b = start_with(|c| c.limits.max_inflight = 2).await;
    let mut sub = connect_v311(b.addr, "w-sub").await;
    sub.subscribe(1, "w/t", 1).await;
    let mut publisher = connect_v311(b.addr, "w-pub").await;
    for i in 1..=5u16 {
        publisher.publish("w/t", format!("m{i}").as_bytes(), 1, i).await;
    }
    let first = sub.recv_publish().await;
    let second = sub.recv_publish().await;
    assert_eq!((first.payload.as_slice(), second.payload.as_slice()), (&b"m1"[..], &b"m2"[..]));
    sub.expect_silence(QUIET).await;

    sub.send(&puback(first.pid.expect("pid"))).await;
    let third = sub.recv_publish().await;
    assert_eq!(third.payload, b"m3");
    sub.expect_silence(QUIET).await;

    sub.send(&puback(second.pid.expect("pid"))).await;
    sub.send(&puback(third.pid.expect("pid"))).await;
    let fourth = sub.recv_publish_ack().await;
    let fifth = sub.recv_publish_ack().await;
    assert_eq!((fourth.payload.as_slice(), fifth.payload.as_slice()), (&b"m4"[..], &b"m5"[..]));
}

#[tokio::test]
async fn qos1_order_is_kept() {
    let b = start().await;
    let mut sub = V4::connect(b.addr, "ord-sub", true).await;
    sub.subscribe("ord/t", QoS::AtLeastOnce).await;
    let publisher = V4::connect(b.addr, "ord-pub", true).await;
    let sender = tokio::spawn(async move {
        for i in 0..200u32 {
            publisher
                .client
                .publish("ord/t", QoS::AtLeastOnce, false, i.to_be_bytes().to_vec())
                .await
                .expect("publish");
        }
        publisher
    });
    for i in 0..200u32 {
        let got = sub.recv_publish().await;
        assert_eq!(got.payload.as_ref(), i.to_be_bytes(), "message {i} out of order");
    }
    let _publisher = tokio::time::timeout(WAIT, sender).await.expect("publisher done").expect("publisher task");
}

#[tokio::test]
async fn overlapping_subscriptions_deliver_once_at_highest_qos() {
    let b = start().await;
    let mut sub = connect_v311(b.addr, "ov-sub").await;
    let codes = sub.subscribe_many(1, &[("a/+", 1), ("a/#", 2)]).await;
    assert_eq!(codes, vec![1, 2]);
    let mut publisher = connect_v311(b.addr, "ov-pub").await;

    publisher.publish("a/b", b"two", 2, 1).await;
    let got = sub.recv_publish_ack().await;
    assert_eq!((got.payload.as_slice(), got.qos), (&b"two"[..], 2));
    sub.expect_silence(QUIET).await;

    publisher.publish("a/b", b"one", 1, 2).await;
    let got = sub.recv_publish_ack().await;
    assert_eq!((got.payload.as_slice(), got.qos), (&b"one"[..], 1));
    sub.expect_silence(QUIET).await;

    // Only `a/#` matches `a/b/c`.
    publisher.publish("a/b/c", b"deep", 2, 3).await;
    let got = sub.recv_publish_ack().await;
    assert_eq!((got.topic.as_str(), got.qos), ("a/b/c", 2));
    sub.expect_silence(QUIET).await;
}

#[tokio::test]
async fn v5_puback_reports_no_matching_subscribers() {
    let b = start().await;
    let mut c = connect_v5(b.addr, "nms").await;
    c.send(&publish_full(b"nobody/here", b"x", 1, 3, false, false, Some(&[]))).await;
    let reason = c.expect_ack(0x40, 3).await;
    assert_eq!(reason, 0x10, "PUBACK reason for a topic nobody subscribes to");
    c.subscribe(4, "nobody/here", 1).await;
    c.send(&publish_full(b"nobody/here", b"x", 1, 5, false, false, Some(&[]))).await;
    // Now there is a subscriber (ourselves): success, and the message arrives.
    let mut acked = false;
    let mut delivered = false;
    while !(acked && delivered) {
        let p = c.read_packet().await;
        match p[0] >> 4 {
            4 => {
                let (_, body) = split_packet(&p);
                assert_eq!(body.get(2).copied().unwrap_or(0), 0x00, "PUBACK reason: {}", hex(&p));
                acked = true;
            }
            3 => {
                let m = parse_publish(&p, true);
                c.ack(&m).await;
                delivered = true;
            }
            _ => panic!("unexpected {}", hex(&p)),
        }
    }
    c.expect_silence(Duration::from_millis(200)).await;
}

/// A backlog larger than one write batch (64 KiB) must all go out, not only the first batch:
/// nothing else wakes a QoS 0 subscriber's connection once the publisher has stopped.
#[tokio::test]
async fn qos0_backlog_larger_than_a_write_batch_is_fully_delivered() {
    let b = start().await;
    let mut s = Raw::open(b.addr).await;
    s.handshake(&Connect::v311("bulk-sub")).await;
    s.subscribe(1, "bulk", 0).await;
    let mut p = Raw::open(b.addr).await;
    p.handshake(&Connect::v311("bulk-pub")).await;
    let mut burst = Vec::new();
    for i in 0..5000u32 {
        burst.extend(publish("bulk", format!("{i:08}-padding-padding").as_bytes(), 0, 0));
    }
    p.send(&burst).await;
    p.ping().await;
    for i in 0..5000u32 {
        let m = s.recv_publish().await;
        assert_eq!(m.payload, format!("{i:08}-padding-padding").as_bytes(), "message {i}");
    }
}

/// Publishes that arrive together are handled together (QoS 0 ones are delivered as one
/// batch per read): each subscriber must still get them in the order they were sent
/// [MQTT-4.6.0-6], across QoS levels, topics with different subscribers, and a client whose
/// shared subscription matches beside its plain one (two copies of each message, never one
/// overtaking the next message's).
#[tokio::test]
async fn pipelined_publishes_keep_their_order_for_every_subscriber() {
    let b = start().await;
    let mut both = connect_v5(b.addr, "ord-both").await;
    both.subscribe(1, "b/#", 1).await;
    both.subscribe(2, "$share/g/b/x", 1).await;
    let mut x = connect_v5(b.addr, "ord-x").await;
    x.subscribe(1, "b/x", 0).await;
    let mut y = connect_v311(b.addr, "ord-y").await;
    y.subscribe(1, "b/y", 1).await;
    let mut publ = connect_v311(b.addr, "ord-pub").await;
    // Mixed topics and QoS, then a run on one topic at QoS 0 (the same subscribers for every
    // message), then mixed again; all in one write.
    let sent: Vec<(&str, u8)> = (0..300u16)
        .map(|i| match i {
            100..=199 => ("b/x", 0),
            _ => (if i % 3 == 0 { "b/y" } else { "b/x" }, u8::from(i % 7 == 0)),
        })
        .collect();
    let mut bytes = Vec::new();
    for (i, (topic, qos)) in sent.iter().enumerate() {
        bytes.extend(publish(topic, i.to_string().as_bytes(), *qos, i as u16 + 1));
    }
    publ.send(&bytes).await;
    let numbers = |topic: &str| -> Vec<usize> { (0..sent.len()).filter(|&i| sent[i].0 == topic).collect() };
    assert_eq!(received_numbers(&mut x, numbers("b/x").len()).await, numbers("b/x"), "b/x subscriber");
    assert_eq!(received_numbers(&mut y, numbers("b/y").len()).await, numbers("b/y"), "b/y subscriber");
    // Every b/x message twice (plain and shared subscription), every b/y once, each message's
    // copies before the next message's.
    let expected: Vec<usize> =
        (0..sent.len()).flat_map(|i| std::iter::repeat_n(i, if sent[i].0 == "b/x" { 2 } else { 1 })).collect();
    let got = received_numbers(&mut both, expected.len()).await;
    assert_eq!(got, expected, "subscriber with a plain and a shared subscription: copies out of order");
    both.expect_silence(Duration::from_millis(200)).await;
}

/// The payloads (decimal numbers) of the next `n` PUBLISHes, each acknowledged.
async fn received_numbers(c: &mut Raw, n: usize) -> Vec<usize> {
    let mut got = Vec::with_capacity(n);
    for _ in 0..n {
        let p = c.recv_publish_ack().await;
        got.push(String::from_utf8_lossy(&p.payload).parse::<usize>().unwrap_or(usize::MAX));
    }
    got
}
