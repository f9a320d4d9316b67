//! What waits for a client costs little memory however much waits:
//! - a persistent session that is away keeps its QoS 1/2 messages on disk, not in memory,
//!   gets them back in order when it returns (also after a broker restart), and drops what
//!   is over its limits with a count;
//! - retained messages sent on SUBSCRIBE are streamed as the subscriber reads, so subscribers
//!   that do not read hold no queued copies, while one that reads gets every one, once;
//! - a SUBSCRIBE repeating one filter 260,000 times queues each retained message once.
//!
//! Memory is checked with the broker's own count of queued bytes held in memory
//! (`BrokerHandle::queued_memory`, what `limits.max_queued_memory` bounds), not process RSS,
//! which the test's own clients would blur.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::*;

const BIG: usize = 256 * 1024;

fn numbered(i: u32, size: usize) -> Vec<u8> {
    let mut p = i.to_be_bytes().to_vec();
    p.resize(size, b'x');
    p
}

/// Publishes `n` QoS 1 messages of `size` bytes to `topic` and waits for every PUBACK.
async fn publish_n(addr: std::net::SocketAddr, topic: &str, n: u32, size: usize) {
    let mut p = connect_v311(addr, "offline-publisher").await;
    for i in 0..n {
        p.send(&publish(topic, &numbered(i, size), 1, (i + 1) as u16)).await;
    }
    for i in 0..n {
        p.expect_ack(0x40, (i + 1) as u16).await;
    }
    p.disconnect().await;
}

/// Receives `n` PUBLISHes, acknowledging each, and returns their numbers in arrival order.
/// With `first_attempt`, none may carry DUP: they were never sent before [MQTT-3.3.1-1].
async fn receive_n(c: &mut Raw, n: usize, first_attempt: bool) -> Vec<u32> {
    let mut got = Vec::with_capacity(n);
    for _ in 0..n {
        let m = c.recv_publish_ack().await;
        assert!(!(first_attempt && m.dup), "DUP set on a first delivery");
        got.push(u32::from_be_bytes(m.payload[..4].try_into().expect("numbered payload")));
    }
    got
}

async fn away_subscriber(addr: std::net::SocketAddr, id: &str, filter: &str) {
    let (mut s, _) = connect_with(addr, &Connect::v311(id).clean(false)).await;
    s.subscribe(1, filter, 1).await;
    s.disconnect().await;
}

#[tokio::test]
async fn an_away_session_queues_on_disk_and_gets_everything_back_in_order() {
    let b = start().await;
    away_subscriber(b.addr, "away-dev", "big/#").await;
    const N: u32 = 120; // 30 MiB
    publish_n(b.addr, "big/data", N, BIG).await;
    // Held in memory, 30 MiB would show here (before: the offline queue lived in RAM).
    assert_eq!(b.handle.queued_memory(), 0, "queued messages of an away session are held in memory");

    let (mut s, ack) = connect_with(b.addr, &Connect::v311("away-dev").clean(false)).await;
    assert!(ack.session_present);
    let got = receive_n(&mut s, N as usize, true).await;
    assert_eq!(got, (0..N).collect::<Vec<_>>(), "every message, in order");
    s.expect_silence(QUIET).await;
}

#[tokio::test]
async fn the_backlog_survives_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = |port: u16| {
        let mut c = tern::Config::default();
        c.listener[0].bind = format!("127.0.0.1:{port}");
        c.storage.dir = dir.path().to_path_buf();
        c
    };
    let h = tern::start(config(0)).await.expect("start");
    let addr = h.local_addr();
    away_subscriber(addr, "restart-dev", "r/#").await;
    const N: u32 = 600;
    publish_n(addr, "r/x", N, 2000).await;
    h.shutdown().await.expect("clean stop");

    let h = tern::start(config(addr.port())).await.expect("restart");
    assert_eq!(h.queued_memory(), 0, "recovery read the backlog into memory");
    let (mut s, ack) = connect_with(addr, &Connect::v311("restart-dev").clean(false)).await;
    assert!(ack.session_present);
    let got = receive_n(&mut s, N as usize, false).await;
    assert_eq!(got, (0..N).collect::<Vec<_>>(), "every message, in order, after the restart");
    s.expect_silence(QUIET).await;
    drop(s);
    h.shutdown().await.expect("clean stop");
}

#[tokio::test]
async fn an_away_session_drops_what_is_over_its_byte_limit() {
    let b = start_with(|c| c.limits.max_queued_bytes = 1024 * 1024).await;
    away_subscriber(b.addr, "small-dev", "big/#").await;
    publish_n(b.addr, "big/data", 10, BIG).await;
    let (mut s, _) = connect_with(b.addr, &Connect::v311("small-dev").clean(false)).await;
    // 1 MiB holds three messages of 256 KiB and their bookkeeping, not four.
    let got = receive_n(&mut s, 3, true).await;
    assert_eq!(got, [0, 1, 2], "the oldest are kept");
    s.expect_silence(QUIET).await;
}

/// Publishes `n` retained messages `ret/<i>` of `size` bytes at QoS 1.
async fn retain_n(addr: std::net::SocketAddr, n: u32, size: usize) {
    let mut p = connect_v311(addr, "retainer").await;
    for chunk in 0..n.div_ceil(1000) {
        let ids = chunk * 1000..((chunk + 1) * 1000).min(n);
        for i in ids.clone() {
            let pid = (i % 60_000 + 1) as u16;
            p.send(&publish_full(format!("ret/{i}").as_bytes(), &numbered(i, size), 1, pid, true, false, None)).await;
        }
        for i in ids {
            p.expect_ack(0x40, (i % 60_000 + 1) as u16).await;
        }
    }
    p.disconnect().await;
}

#[tokio::test]
async fn retained_messages_stream_as_the_subscriber_reads() {
    // Most of them only on disk (the index keeps 2,000 whole), to stream those reads too.
    let b = start_with(|c| c.limits.max_retained_in_memory = 2_000).await;
    const N: u32 = 12_000;
    retain_n(b.addr, N, 1024).await;

    // Ten subscribers that never read: what waits for them is not copied into queues.
    let mut idle = Vec::new();
    for i in 0..10 {
        let mut s = connect_v311(b.addr, &format!("idle-{i}")).await;
        s.send(&subscribe_pkt(false, 1, &[("#", 1)])).await;
        idle.push(s);
    }
    // A reader gets every retained message exactly once.
    let mut r = connect_v311(b.addr, "reader").await;
    r.send(&subscribe_pkt(false, 1, &[("#", 1)])).await;
    let mut seen = HashSet::new();
    let mut peak = 0;
    while seen.len() < N as usize {
        let p = r.read_packet().await;
        if p[0] >> 4 == 9 {
            continue; // SUBACK
        }
        let m = parse_publish(&p, false);
        assert!(m.retain, "sent for a new subscription: retain flag set");
        r.ack(&m).await;
        let i = u32::from_be_bytes(m.payload[..4].try_into().expect("numbered"));
        assert!(seen.insert(i), "retained message {i} twice");
        peak = peak.max(b.handle.queued_memory());
    }
    r.expect_silence(QUIET).await;
    // 12,000 messages of 1 KiB are 12 MiB for each idle subscriber if they were queued.
    assert!(peak <= 2 * 1024 * 1024, "queues held {peak} bytes for retained messages");
    drop(idle);
}

#[tokio::test]
async fn a_subscribe_repeating_one_filter_queues_each_retained_message_once() {
    let b = start().await;
    const N: u32 = 10_000;
    retain_n(b.addr, N, 16).await;
    // 260,000 × "#" at QoS 1: just under the 1 MiB packet limit.
    const FILTERS: usize = 260_000;
    let mut body = vec![0x00, 0x01];
    for _ in 0..FILTERS {
        body.extend([0x00, 0x01, b'#', 0x01]);
    }
    let mut s = connect_v311(b.addr, "many-filters").await;
    s.send(&packet(0x82, &body)).await;
    let suback = s.read_packet().await;
    let (h, sb) = split_packet(&suback);
    assert_eq!(h, 0x90);
    assert_eq!(sb.len(), 2 + FILTERS, "one return code per filter");
    assert!(sb[2..].iter().all(|&c| c == 1), "every filter granted QoS 1");
    let mut seen = HashSet::new();
    while seen.len() < N as usize {
        let m = s.recv_publish_ack().await;
        let i = u32::from_be_bytes(m.payload[..4].try_into().expect("numbered"));
        assert!(seen.insert(i), "retained message {i} twice");
    }
    s.expect_silence(Duration::from_millis(500)).await;
}
