//! Persistent sessions: subscriptions and queued messages across reconnects, queue limits,
//! redelivery with DUP, and v5 session expiry.

mod common;

use std::time::Duration;

use common::*;

/// Connects `id` with a persistent session, checks the session-present flag, returns the client.
async fn persistent(b: &TestBroker, id: &str, expect_present: bool) -> Raw {
    let mut c = Raw::open(b.addr).await;
    c.send(&Connect::v311(id).clean(false).bytes()).await;
    c.expect(&[0x20, 0x02, u8::from(expect_present), 0x00]).await;
    c
}

/// Disconnects cleanly. `disconnect` returns once the broker has closed the socket; the broker
/// detaches the session right after that close, in the same step of the connection's task, so
/// by the time the test runs again the session is detached. (For a session with an expiry
/// nothing a client sees tells the two apart anyway: a reconnect resumes it or takes it over,
/// session present 1 both ways, and a publish reaches its queue both ways.) Tests that depend
/// on the detach having ended a session poll `session_count` instead.
async fn go_offline(c: Raw) {
    c.disconnect().await;
}

#[tokio::test]
async fn persistent_session_keeps_subscriptions_and_queues_qos1() {
    let b = start().await;
    let mut c = persistent(&b, "keep", false).await;
    c.subscribe(1, "p/t", 1).await;
    go_offline(c).await;

    let mut publisher = connect_v311(b.addr, "pub").await;
    for i in 1..=3u16 {
        publisher.publish("p/t", format!("offline{i}").as_bytes(), 1, i).await;
    }

    let mut c = persistent(&b, "keep", true).await;
    for i in 1..=3 {
        let m = c.recv_publish_ack().await;
        assert_eq!(m.payload, format!("offline{i}").as_bytes());
        assert_eq!(m.qos, 1);
    }
    c.expect_silence(QUIET).await;
    // The subscription is still there for live messages, without subscribing again.
    publisher.publish("p/t", b"live", 1, 9).await;
    assert_eq!(c.recv_publish_ack().await.payload, b"live");
}

#[tokio::test]
async fn qos0_not_queued_while_offline() {
    let b = start().await;
    let mut c = persistent(&b, "q0", false).await;
    c.subscribe(1, "z/t", 1).await;
    go_offline(c).await;

    let mut publisher = connect_v311(b.addr, "pub").await;
    publisher.publish("z/t", b"qos0", 0, 0).await;
    publisher.publish("z/t", b"qos1", 1, 1).await;

    let mut c = persistent(&b, "q0", true).await;
    let m = c.recv_publish_ack().await;
    assert_eq!((m.payload.as_slice(), m.qos), (&b"qos1"[..], 1), "QoS 0 message must not be queued offline");
    c.expect_silence(QUIET).await;
}

#[tokio::test]
async fn clean_session_discards_previous_session() {
    let b = start().await;
    let mut c = persistent(&b, "cs", false).await;
    c.subscribe(1, "cs/t", 1).await;
    go_offline(c).await;

    let mut publisher = connect_v311(b.addr, "pub").await;
    publisher.publish("cs/t", b"queued", 1, 1).await;

    let mut c = Raw::open(b.addr).await;
    c.send(&Connect::v311("cs").bytes()).await;
    c.expect(&[0x20, 0x02, 0x00, 0x00]).await;
    c.expect_silence(QUIET).await; // nothing queued is delivered
    publisher.publish("cs/t", b"live", 1, 2).await;
    c.expect_silence(QUIET).await; // and the old subscription is gone
}

#[tokio::test]
async fn offline_queue_is_bounded() {
    let b = start_with(|c| c.limits.max_queued_messages = 5).await;
    let mut c = persistent(&b, "bounded", false).await;
    c.subscribe(1, "b/t", 1).await;
    go_offline(c).await;

    let mut publisher = connect_v311(b.addr, "pub").await;
    for i in 1..=10u16 {
        publisher.publish("b/t", &i.to_be_bytes(), 1, i).await;
    }

    let mut c = persistent(&b, "bounded", true).await;
    let mut got = Vec::new();
    for _ in 0..5 {
        let m = c.recv_publish_ack().await;
        got.push(u16::from_be_bytes([m.payload[0], m.payload[1]]));
    }
    c.expect_silence(QUIET).await;
    assert!(got.windows(2).all(|w| w[0] < w[1]), "queued messages out of order: {got:?}");
}

#[tokio::test]
async fn unacked_qos1_redelivered_with_dup_after_reconnect() {
    let b = start().await;
    let mut c = persistent(&b, "dup", false).await;
    c.subscribe(1, "d/t", 1).await;
    let mut publisher = connect_v311(b.addr, "pub").await;
    publisher.publish("d/t", b"unacked", 1, 1).await;

    let first = c.recv_publish().await;
    assert!(!first.dup);
    let pid = first.pid.expect("pid");
    drop(c); // no PUBACK, no DISCONNECT

    let mut c = Raw::open(b.addr).await;
    c.send(&Connect::v311("dup").clean(false).bytes()).await;
    c.expect(&[0x20, 0x02, 0x01, 0x00]).await;
    let p = c.read_packet().await;
    assert_eq!(p[0], 0x3A, "redelivery must be QoS 1 with DUP: {}", hex(&p));
    let again = parse_publish(&p, false);
    assert_eq!((again.pid, again.topic.as_str(), again.payload.as_slice()), (Some(pid), "d/t", &b"unacked"[..]));
    c.send(&puback(pid)).await;
    c.expect_silence(QUIET).await;
    go_offline(c).await;

    // Acknowledged now: not sent a third time.
    let mut c = persistent(&b, "dup", true).await;
    c.expect_silence(QUIET).await;
}

#[tokio::test]
async fn unreleased_qos2_gets_pubrel_again_after_reconnect() {
    let b = start().await;
    let mut c = persistent(&b, "rel", false).await;
    c.subscribe(1, "rel/t", 2).await;
    let mut publisher = connect_v311(b.addr, "pub").await;
    publisher.publish("rel/t", b"two", 2, 1).await;

    let m = c.recv_publish().await;
    let pid = m.pid.expect("pid");
    let [hi, lo] = pid.to_be_bytes();
    c.send(&pubrec(pid)).await;
    c.expect(&[0x62, 0x02, hi, lo]).await;
    drop(c); // no PUBCOMP

    let mut c = Raw::open(b.addr).await;
    c.send(&Connect::v311("rel").clean(false).bytes()).await;
    c.expect(&[0x20, 0x02, 0x01, 0x00]).await;
    c.expect(&[0x62, 0x02, hi, lo]).await;
    c.send(&pubcomp(pid)).await;
    c.expect_silence(QUIET).await;
}

#[tokio::test]
async fn v5_session_with_expiry_queues_messages() {
    let b = start().await;
    let (mut c, ack) = connect_with(b.addr, &Connect::v5("v5keep").expiry(30)).await;
    assert!(!ack.session_present);
    c.subscribe(1, "v5/t", 1).await;
    go_offline(c).await;

    let mut publisher = connect_v311(b.addr, "pub").await;
    publisher.publish("v5/t", b"waiting", 1, 1).await;

    let (mut c, ack) = connect_with(b.addr, &Connect::v5("v5keep").clean(false).expiry(30)).await;
    assert!(ack.session_present, "{ack:?}");
    let m = c.recv_publish_ack().await;
    assert_eq!(m.payload, b"waiting");
}

#[tokio::test]
async fn v5_session_expires() {
    let b = start().await;
    let (mut c, _) = connect_with(b.addr, &Connect::v5("brief").expiry(1)).await;
    c.subscribe(1, "e/t", 1).await;
    let t0 = std::time::Instant::now();
    go_offline(c).await;
    // The broker's only session: it ends when its 1 s runs out (counted from the disconnect,
    // which is after t0), not before.
    poll_until(Duration::from_secs(1) + WAIT, "the session with expiry 1 s to end", || b.handle.session_count() == 0)
        .await;
    let took = t0.elapsed();
    assert!(took >= Duration::from_millis(950), "session with expiry 1 s ended after {took:?}");

    let mut publisher = connect_v311(b.addr, "pub").await;
    publisher.publish("e/t", b"too late", 1, 1).await;

    let (mut c, ack) = connect_with(b.addr, &Connect::v5("brief").clean(false).expiry(1)).await;
    assert!(!ack.session_present, "session with expiry 1 s present after it ended ({took:?}): {ack:?}");
    c.expect_silence(QUIET).await;
}

#[tokio::test]
async fn v5_expiry_zero_ends_session_at_disconnect() {
    let b = start().await;
    let (mut c, _) = connect_with(b.addr, &Connect::v5("zero")).await;
    c.subscribe(1, "zero/t", 1).await;
    go_offline(c).await;
    poll_until(WAIT, "the session with expiry 0 to end with its connection", || b.handle.session_count() == 0).await;
    let (_c, ack) = connect_with(b.addr, &Connect::v5("zero").clean(false)).await;
    assert!(!ack.session_present, "{ack:?}");
}

#[tokio::test]
async fn v5_disconnect_can_shorten_expiry() {
    let b = start().await;
    let (mut c, _) = connect_with(b.addr, &Connect::v5("shorten").expiry(60)).await;
    // DISCONNECT with Session Expiry Interval 0: the session ends now.
    let mut body = vec![0x00];
    body.extend(props(&prop_u32(PROP_SESSION_EXPIRY, 0)));
    c.send(&packet(0xE0, &body)).await;
    c.expect_closed().await;
    poll_until(WAIT, "the session to end at the DISCONNECT", || b.handle.session_count() == 0).await;
    let (_c, ack) = connect_with(b.addr, &Connect::v5("shorten").clean(false).expiry(60)).await;
    assert!(!ack.session_present, "{ack:?}");
}
