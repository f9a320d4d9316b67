//! MQTT 5 Clean Start and Session Expiry Interval (3.1.2.4, 3.1.2.11.2, 3.14.2.2.2), as a
//! client sees them: the session present flag, which subscriptions survive, and which queued
//! messages arrive.

mod common;

use std::time::Duration;

use common::*;

/// Disconnects cleanly. `disconnect` returns once the broker has closed the socket; the broker
/// detaches the session right after that close, in the same step of the connection's task, so
/// by the time the test runs again the session is detached. (For a session with an expiry
/// nothing a client sees tells the two apart anyway: a reconnect resumes it or takes it over,
/// session present 1 both ways, and a publish reaches its queue both ways.) Tests that depend
/// on the detach having ended a session poll `session_count` instead.
async fn go_offline(c: Raw) {
    c.disconnect().await;
}

/// Publishes QoS 1 from a v5 client and returns the PUBACK reason code.
async fn publish_v5(p: &mut Raw, topic: &str, payload: &[u8], pid: u16) -> u8 {
    p.send(&publish_full(topic.as_bytes(), payload, 1, pid, false, false, Some(&[]))).await;
    p.read_ack_reason(0x40, pid).await
}

#[tokio::test]
async fn clean_start_discards_the_existing_session() {
    let b = start().await;
    let (mut c, ack) = connect_with(b.addr, &Connect::v5("cs").expiry(60)).await;
    assert!(!ack.session_present);
    c.subscribe(1, "cs/t", 1).await;
    go_offline(c).await;

    let mut p = connect_v5(b.addr, "cs-pub").await;
    assert_eq!(publish_v5(&mut p, "cs/t", b"queued", 1).await, 0x00, "the offline session is subscribed");

    // Clean Start 1 with an existing session: a new session, nothing of the old one.
    let (mut c, ack) = connect_with(b.addr, &Connect::v5("cs").clean(true).expiry(60)).await;
    assert!(!ack.session_present, "Clean Start must give session present 0: {ack:?}");
    c.expect_silence(QUIET).await;
    assert_eq!(publish_v5(&mut p, "cs/t", b"after", 2).await, 0x10, "old subscription must be gone");
    c.expect_silence(QUIET).await;
}

#[tokio::test]
async fn expiry_zero_ends_the_session_at_disconnect() {
    let b = start().await;
    // No Session Expiry Interval property: 0.
    let (mut c, _) = connect_with(b.addr, &Connect::v5("ez").clean(false)).await;
    c.subscribe(1, "ez/t", 1).await;
    go_offline(c).await;
    poll_until(WAIT, "the session with expiry 0 to end with its connection", || b.handle.session_count() == 0).await;

    let mut p = connect_v5(b.addr, "ez-pub").await;
    assert_eq!(publish_v5(&mut p, "ez/t", b"nobody", 1).await, 0x10, "the session ended with its connection");
    let (mut c, ack) = connect_with(b.addr, &Connect::v5("ez").clean(false)).await;
    assert!(!ack.session_present, "{ack:?}");
    c.expect_silence(QUIET).await;
}

#[tokio::test]
async fn session_kept_within_expiry_and_gone_after_it() {
    let b = start().await;
    let (mut c, _) = connect_with(b.addr, &Connect::v5("se").expiry(2)).await;
    c.subscribe(1, "se/t", 1).await;
    go_offline(c).await;

    let mut p = connect_v5(b.addr, "se-pub").await;
    assert_eq!(publish_v5(&mut p, "se/t", b"kept", 1).await, 0x00);
    // Inherent wait: that the session is still there some time into its interval shows only
    // by letting that time pass.
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Within the interval: the session, its subscription and its queue are there.
    let (mut c, ack) = connect_with(b.addr, &Connect::v5("se").clean(false).expiry(2)).await;
    assert!(ack.session_present, "session with expiry 2 s gone after 0.5 s: {ack:?}");
    let m = c.recv_publish_ack().await;
    assert_eq!((m.topic.as_str(), m.payload.as_slice(), m.qos), ("se/t", &b"kept"[..], 1));
    c.expect_silence(QUIET).await;
    let t0 = std::time::Instant::now();
    go_offline(c).await;

    // Past the interval (counted from the last disconnect, after t0): gone, and not before.
    // Left then: the publisher's session only.
    poll_until(Duration::from_secs(2) + WAIT, "the session with expiry 2 s to end", || b.handle.session_count() == 1)
        .await;
    let took = t0.elapsed();
    assert!(took >= Duration::from_millis(1950), "session with expiry 2 s ended after {took:?}");
    assert_eq!(publish_v5(&mut p, "se/t", b"late", 2).await, 0x10, "expired session still subscribed");
    let (mut c, ack) = connect_with(b.addr, &Connect::v5("se").clean(false).expiry(2)).await;
    assert!(!ack.session_present, "session with expiry 2 s present after it ended ({took:?}): {ack:?}");
    c.expect_silence(QUIET).await;
}

#[tokio::test]
async fn disconnect_can_raise_a_nonzero_expiry() {
    let b = start().await;
    let (mut c, _) = connect_with(b.addr, &Connect::v5("raise").expiry(1)).await;
    c.subscribe(1, "raise/t", 1).await;
    c.send(&disconnect_v5(0x00, &prop_u32(PROP_SESSION_EXPIRY, 60))).await;
    c.expect_closed().await;

    let mut p = connect_v5(b.addr, "raise-pub").await;
    assert_eq!(publish_v5(&mut p, "raise/t", b"still here", 1).await, 0x00);
    // Past the 1 s given in CONNECT, within the 60 s given in DISCONNECT. Inherent wait: that
    // the session does not end at 1 s shows only by waiting past that, with a margin.
    tokio::time::sleep(Duration::from_millis(2000)).await;
    let (mut c, ack) = connect_with(b.addr, &Connect::v5("raise").clean(false).expiry(60)).await;
    assert!(ack.session_present, "DISCONNECT raised the expiry to 60 s: {ack:?}");
    let m = c.recv_publish_ack().await;
    assert_eq!(m.payload, b"still here");
}

#[tokio::test]
async fn disconnect_cannot_raise_a_zero_expiry() {
    let b = start().await;
    let (mut c, _) = connect_with(b.addr, &Connect::v5("zr").clean(false)).await;
    c.subscribe(1, "zr/t", 1).await;
    c.send(&disconnect_v5(0x00, &prop_u32(PROP_SESSION_EXPIRY, 60))).await;
    // [MQTT-3.14.2-2]: a Protocol Error, answered with DISCONNECT 0x82.
    c.expect(&[0xE0, 0x01, 0x82]).await;
    c.expect_closed().await;
    // The expiry stayed 0: the session ended with the connection.
    poll_until(WAIT, "the session with expiry 0 to end with its connection", || b.handle.session_count() == 0).await;
    let (_c, ack) = connect_with(b.addr, &Connect::v5("zr").clean(false)).await;
    assert!(!ack.session_present, "{ack:?}");
}
