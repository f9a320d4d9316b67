//! SUBSCRIBE / UNSUBSCRIBE: acknowledgements, wildcard matching and replacement.

mod common;

use std::time::Duration;

use common::*;

/// Publishes each topic at QoS 1 from `publisher`, then returns the topics `sub` received
/// (in arrival order) until it stays quiet.
async fn deliveries(publisher: &mut Raw, sub: &mut Raw, topics: &[&str]) -> Vec<String> {
    for (i, t) in topics.iter().enumerate() {
        publisher.publish(t, t.as_bytes(), 1, i as u16 + 1).await;
    }
    let mut got = Vec::new();
    loop {
        match sub.next_event(QUIET).await {
            Event::Packet(p) => {
                let m = parse_publish(&p, sub.v5);
                sub.ack(&m).await;
                got.push(m.topic);
            }
            Event::Timeout => return got,
            Event::Closed => panic!("subscriber disconnected"),
        }
    }
}

#[tokio::test]
async fn suback_bytes_grant_each_qos_v311() {
    let b = start().await;
    let mut c = connect_v311(b.addr, "sa").await;
    c.send(&subscribe_pkt(false, 0x1234, &[("q/0", 0), ("q/1", 1), ("q/2", 2)])).await;
    c.expect(&[0x90, 0x05, 0x12, 0x34, 0x00, 0x01, 0x02]).await;
}

#[tokio::test]
async fn suback_codes_v5() {
    let b = start().await;
    let mut c = connect_v5(b.addr, "sa5").await;
    let codes = c.subscribe_many(7, &[("q/0", 0), ("q/1", 1), ("q/2", 2)]).await;
    assert_eq!(codes, vec![0, 1, 2]);
}

#[tokio::test]
async fn suback_failure_for_filter_over_limits_v311() {
    let b = start_with(|c| c.limits.max_topic_levels = 3).await;
    let mut c = connect_v311(b.addr, "deep").await;
    c.send(&subscribe_pkt(false, 5, &[("a/b/c/d", 1), ("a/b", 1)])).await;
    c.expect(&[0x90, 0x04, 0x00, 0x05, 0x80, 0x01]).await;
    // The accepted filter works; the refused one does not exist.
    let mut publisher = connect_v311(b.addr, "pub").await;
    let got = deliveries(&mut publisher, &mut c, &["a/b/c", "a/b"]).await;
    assert_eq!(got, vec!["a/b"]);
}

#[tokio::test]
async fn suback_failure_for_filter_over_limits_v5() {
    let b = start_with(|c| c.limits.max_topic_levels = 3).await;
    let mut c = connect_v5(b.addr, "deep5").await;
    let codes = c.subscribe_many(5, &[("a/b/c/d", 1), ("a/b", 2)]).await;
    assert_eq!(codes, vec![0x8F, 0x02]);
    c.ping().await;
}

#[tokio::test]
async fn granted_qos_capped_by_maximum_qos() {
    let b = start_with(|c| c.mqtt.maximum_qos = 1).await;
    let mut c = connect_v311(b.addr, "cap").await;
    c.send(&subscribe_pkt(false, 1, &[("c/t", 2)])).await;
    c.expect(&[0x90, 0x03, 0x00, 0x01, 0x01]).await;
}

#[tokio::test]
async fn plus_matches_exactly_one_level() {
    let b = start().await;
    let mut sub = connect_v311(b.addr, "plus").await;
    sub.subscribe(1, "p/+/c", 1).await;
    let mut publisher = connect_v311(b.addr, "pub").await;
    let got = deliveries(&mut publisher, &mut sub, &["p/b/c", "p/b/d", "p/b/c/d", "p//c", "p/c", "x/b/c"]).await;
    assert_eq!(got, vec!["p/b/c", "p//c"]);
}

#[tokio::test]
async fn hash_matches_parent_and_all_children() {
    let b = start().await;
    let mut sub = connect_v311(b.addr, "hash").await;
    sub.subscribe(1, "h/#", 1).await;
    let mut publisher = connect_v311(b.addr, "pub").await;
    let got = deliveries(&mut publisher, &mut sub, &["h", "h/a", "h/a/b", "hx", "x/h", "h/"]).await;
    assert_eq!(got, vec!["h", "h/a", "h/a/b", "h/"]);
}

#[tokio::test]
async fn exact_filter_matches_only_itself() {
    let b = start().await;
    let mut sub = connect_v311(b.addr, "exact").await;
    sub.subscribe(1, "e/x", 1).await;
    let mut publisher = connect_v311(b.addr, "pub").await;
    let got = deliveries(&mut publisher, &mut sub, &["e/x", "e/x/y", "e", "E/x", "e/x/"]).await;
    assert_eq!(got, vec!["e/x"]);
}

#[tokio::test]
async fn sys_topics_not_matched_by_leading_wildcards() {
    let b = start().await;
    let mut sub = connect_v311(b.addr, "sys").await;
    assert_eq!(sub.subscribe_many(1, &[("#", 1), ("+/x", 1)]).await, vec![1, 1]);
    let mut publisher = connect_v311(b.addr, "pub").await;
    // Clients may not publish to $SYS itself; any other `$` topic follows the same rule.
    let got = deliveries(&mut publisher, &mut sub, &["$dev/x", "m/x"]).await;
    assert_eq!(got, vec!["m/x"], "one delivery of m/x (overlapping filters), none of $dev/x");

    let mut sys = connect_v311(b.addr, "sys2").await;
    sys.subscribe(1, "$dev/+", 1).await;
    let got = deliveries(&mut publisher, &mut sys, &["$dev/x"]).await;
    assert_eq!(got, vec!["$dev/x"]);
}

#[tokio::test]
async fn unsubscribe_stops_delivery_v311() {
    let b = start().await;
    let mut sub = connect_v311(b.addr, "un").await;
    sub.subscribe(1, "u/a", 1).await;
    sub.subscribe(2, "u/b", 1).await;
    let mut publisher = connect_v311(b.addr, "pub").await;
    assert_eq!(deliveries(&mut publisher, &mut sub, &["u/a", "u/b"]).await, vec!["u/a", "u/b"]);

    sub.send(&unsubscribe_pkt(false, 0x0102, &["u/a"])).await;
    sub.expect(&[0xB0, 0x02, 0x01, 0x02]).await;
    assert_eq!(deliveries(&mut publisher, &mut sub, &["u/a", "u/b"]).await, vec!["u/b"]);

    // Unsubscribing a filter that does not exist is still acknowledged.
    sub.send(&unsubscribe_pkt(false, 3, &["never/subscribed"])).await;
    sub.expect(&[0xB0, 0x02, 0x00, 0x03]).await;
}

#[tokio::test]
async fn unsuback_reason_codes_v5() {
    let b = start().await;
    let mut sub = connect_v5(b.addr, "un5").await;
    sub.subscribe(1, "u/a", 1).await;
    let codes = sub.unsubscribe(2, &["u/a", "u/none"]).await;
    assert_eq!(codes, vec![0x00, 0x11]);
    // Gone now: a second UNSUBSCRIBE reports it as not existing.
    let codes = sub.unsubscribe(3, &["u/a"]).await;
    assert_eq!(codes, vec![0x11]);
    let mut publisher = connect_v311(b.addr, "pub").await;
    assert!(deliveries(&mut publisher, &mut sub, &["u/a"]).await.is_empty());
}

#[tokio::test]
async fn resubscribing_replaces_qos_without_double_delivery() {
    let b = start().await;
    let mut sub = connect_v311(b.addr, "rep").await;
    sub.subscribe(1, "r/t", 0).await;
    sub.subscribe(2, "r/t", 1).await;
    let mut publisher = connect_v311(b.addr, "pub").await;
    publisher.publish("r/t", b"x", 1, 1).await;
    let m = sub.recv_publish_ack().await;
    assert_eq!(m.qos, 1, "QoS of the replaced subscription");
    sub.expect_silence(QUIET).await;

    // And back down to QoS 0.
    sub.subscribe(3, "r/t", 0).await;
    publisher.publish("r/t", b"y", 1, 2).await;
    let m = sub.recv_publish().await;
    assert_eq!((m.qos, m.payload.as_slice()), (0, &b"y"[..]));
    sub.expect_silence(QUIET).await;
}

#[tokio::test]
async fn subscriptions_of_two_clients_each_get_a_copy() {
    let b = start().await;
    let mut s1 = connect_v311(b.addr, "s1").await;
    let mut s2 = connect_v5(b.addr, "s2").await;
    s1.subscribe(1, "both/+", 1).await;
    s2.subscribe(1, "both/#", 1).await;
    let mut publisher = connect_v311(b.addr, "pub").await;
    publisher.publish("both/t", b"copy", 1, 1).await;
    assert_eq!(s1.recv_publish_ack().await.payload, b"copy");
    assert_eq!(s2.recv_publish_ack().await.payload, b"copy");
}

/// [MQTT-3.10.4-2]: once the server has an UNSUBSCRIBE it adds no messages for that filter,
/// even when the client does not wait for UNSUBACK and another client publishes at once
/// (seen with a public interop suite: subscribe to three topics at QoS 2, wait, unsubscribe
/// the first without waiting, a second client publishes QoS 1 to all three).
#[tokio::test]
async fn unsubscribe_not_waited_for_stops_delivery_at_once() {
    let b = start_with(|c| c.limits.max_keepalive = 60).await;
    for round in 0..20 {
        let mut sub = connect_v5(b.addr, &format!("unsub-{round}")).await;
        let topics = [format!("u{round}/a"), format!("u{round}/b"), format!("u{round}/c")];
        assert_eq!(sub.subscribe_many(1, &[(&topics[0], 2), (&topics[1], 2), (&topics[2], 2)]).await, vec![2, 2, 2]);
        sub.send(&unsubscribe_pkt(true, 2, &[&topics[0]])).await;
        let mut p = connect_v5(b.addr, &format!("unsub-pub-{round}")).await;
        for (i, t) in topics.iter().enumerate() {
            p.publish(t, b"m", 1, i as u16 + 1).await;
        }
        let mut got = Vec::new();
        while let Event::Packet(pk) = sub.next_event(Duration::from_millis(200)).await {
            if pk[0] >> 4 == 3 {
                let m = parse_publish(&pk, true);
                sub.ack(&m).await;
                got.push(m.topic);
            }
        }
        assert_eq!(got, vec![topics[1].clone(), topics[2].clone()], "round {round}");
    }
}

/// Input that reaches an idle broker is handled in the order it came, across connections:
/// a SUBSCRIBE, then at once another client's PUBLISH to that topic, is delivered; an
/// UNSUBSCRIBE, then at once another client's PUBLISH, is not [MQTT-3.10.4-2]. The Paho
/// interoperability suite does the first (`test_subscribe_options`, `test_request_response`
/// do not wait for the second subscriber's SUBACK), and one run of it saw the second.
/// Against the binary, whose runtime runs the task woken last first and lets a second worker
/// take the others: before `input_order`, with one worker, the publish overtook the SUBSCRIBE
/// in 22-30 of 30 rounds and the UNSUBSCRIBE in 29-30 of 30 (with two, 7 of 30 SUBSCRIBEs).
#[tokio::test]
async fn input_from_two_clients_is_handled_in_arrival_order() {
    for workers in ["1", "2"] {
        let mut p = common::process::TernProcess::new();
        p.start_async(&[("TOKIO_WORKER_THREADS", workers), ("RUST_LOG", "warn")]).await;
        let (mut overtaken_subscribe, mut overtaken_unsubscribe) = (Vec::new(), Vec::new());
        for round in 0..30 {
            let (topic, marker) = (format!("order/{round}"), format!("order/{round}/marker"));
            let mut a = connect_v5(p.addr(), &format!("order-a-{round}")).await;
            let mut b = connect_v5(p.addr(), &format!("order-b-{round}")).await;
            b.subscribe(1, &marker, 1).await;
            // Both connections idle, and so most likely the broker's workers.
            while let Event::Packet(_) = b.next_event(Duration::from_millis(20)).await {}
            b.send(&subscribe_pkt(true, 2, &[(&topic, 1)])).await;
            a.send(&publish_full(topic.as_bytes(), b"1", 1, 1, false, false, Some(&[]))).await;
            if delivered_before(&mut b, &topic, None).await.is_empty() {
                overtaken_subscribe.push(round);
            }
            while let Event::Packet(_) = b.next_event(Duration::from_millis(20)).await {}
            b.send(&unsubscribe_pkt(true, 3, &[&topic])).await;
            a.send(&publish_full(topic.as_bytes(), b"2", 1, 2, false, false, Some(&[]))).await;
            // Published after the second message on the same connection: once it arrives,
            // the second one has arrived too if it was delivered at all.
            a.send(&publish_full(marker.as_bytes(), b"m", 1, 3, false, false, Some(&[]))).await;
            if !delivered_before(&mut b, &topic, Some(&marker)).await.is_empty() {
                overtaken_unsubscribe.push(round);
            }
        }
        assert!(
            overtaken_subscribe.is_empty() && overtaken_unsubscribe.is_empty(),
            "{workers} worker(s): a publish overtook the SUBSCRIBE in rounds {overtaken_subscribe:?}, \
             the UNSUBSCRIBE in rounds {overtaken_unsubscribe:?}"
        );
        p.terminate_async().await;
    }
}

/// The PUBLISHes on `topic` that `sub` receives (acknowledged) before one on `until`, or
/// (None) until the first on `topic` or 500 ms of quiet.
async fn delivered_before(sub: &mut Raw, topic: &str, until: Option<&str>) -> Vec<Vec<u8>> {
    let mut got = Vec::new();
    while let Event::Packet(pk) = sub.next_event(Duration::from_millis(500)).await {
        if pk[0] >> 4 != 3 {
            continue;
        }
        let m = parse_publish(&pk, true);
        sub.ack(&m).await;
        if Some(m.topic.as_str()) == until {
            break;
        }
        if m.topic == topic {
            got.push(m.payload);
            if until.is_none() {
                break;
            }
        }
    }
    got
}
