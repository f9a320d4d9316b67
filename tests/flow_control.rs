//! Flow control: publishers faster than a subscriber are slowed down instead of having their
//! messages dropped; a subscriber that stops reading is cut off after
//! `limits.slow_consumer_secs` while others keep receiving; clients publishing into each
//! other's queues neither lose messages nor stall.

mod common;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Payload: publisher number and sequence number, padded to `size` bytes.
fn payload(publisher: u32, seq: u32, size: usize) -> Vec<u8> {
    let mut p = Vec::with_capacity(size.max(8));
    p.extend(publisher.to_be_bytes());
    p.extend(seq.to_be_bytes());
    p.resize(size.max(8), b'.');
    p
}

/// Connects as a 3.1.1 client, sends every PUBLISH in one stream of writes (as fast as the
/// broker lets it), then a PINGREQ, and reads until the PINGRESP: the broker has then taken
/// every message. Acknowledgements are read and counted along the way.
async fn flood(addr: SocketAddr, id: u32, topic: &str, qos: u8, count: u32, size: usize) -> u32 {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&Connect::v311(&format!("flood-{id}")).bytes()).await.unwrap();
    let mut ack = [0u8; 4];
    s.read_exact(&mut ack).await.unwrap();
    assert_eq!(ack, [0x20, 0x02, 0x00, 0x00], "CONNACK");
    let mut out = Vec::new();
    for seq in 0..count {
        let pid = if qos > 0 { (seq % 65_000) as u16 + 1 } else { 0 };
        out.extend(publish(topic, &payload(id, seq, size), qos, pid));
    }
    out.extend(PINGREQ);
    let (mut r, mut w) = s.into_split();
    let writer = tokio::spawn(async move { w.write_all(&out).await.map(|_| w) });
    // Every packet from the broker is 2 or 4 bytes here (PUBACK, PINGRESP).
    let mut acks = 0;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n =
            tokio::time::timeout(Duration::from_secs(30), r.read(&mut chunk)).await.expect("flood stalled").unwrap();
        assert!(n > 0, "broker closed publisher {id}");
        buf.extend_from_slice(&chunk[..n]);
        while buf.len() >= 2 && buf.len() >= 2 + buf[1] as usize {
            let len = 2 + buf[1] as usize;
            let p: Vec<u8> = buf.drain(..len).collect();
            match p[0] {
                0x40 => acks += 1,
                0xD0 => {
                    let _w = writer.await.unwrap().unwrap();
                    return acks;
                }
                other => panic!("unexpected packet 0x{other:02X} to publisher {id}"),
            }
        }
    }
}

/// Receives until every (publisher, seq) of `expected` arrived or `limit` passes; returns what
/// was missing and how many duplicates came.
async fn collect(sub: &mut Raw, publishers: u32, count: u32, limit: Duration) -> (usize, usize) {
    let mut seen = HashSet::new();
    let mut dups = 0;
    let deadline = Instant::now() + limit;
    let expected = (publishers * count) as usize;
    while seen.len() < expected && Instant::now() < deadline {
        match sub.next_event(Duration::from_secs(5)).await {
            Event::Packet(p) if p[0] >> 4 == 3 => {
                let m = parse_publish(&p, sub.v5);
                sub.ack(&m).await;
                let key = (
                    u32::from_be_bytes(m.payload[0..4].try_into().unwrap()),
                    u32::from_be_bytes(m.payload[4..8].try_into().unwrap()),
                );
                if !seen.insert(key) {
                    dups += 1;
                }
            }
            Event::Packet(p) => panic!("unexpected packet {}", hex(&p)),
            Event::Closed => panic!("subscriber disconnected"),
            Event::Timeout => break,
        }
    }
    (expected - seen.len(), dups)
}

/// Eight publishers flood one subscriber whose queue holds 100 messages: every message arrives,
/// at QoS 0 as at QoS 1 (without flow control, all but about 100 per burst were dropped).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fan_in_flood_loses_nothing_while_the_subscriber_reads() {
    let b = start_with(|c| c.limits.max_queued_messages = 100).await;
    const PUBS: u32 = 8;
    const COUNT: u32 = 2_000;
    for qos in [0u8, 1] {
        let mut sub = connect_v311(b.addr, &format!("reader-{qos}")).await;
        sub.subscribe(1, &format!("flood/{qos}/+"), qos).await;
        let floods: Vec<_> = (0..PUBS)
            .map(|id| {
                let (addr, topic) = (b.addr, format!("flood/{qos}/{id}"));
                tokio::spawn(async move { flood(addr, id, &topic, qos, COUNT, 64).await })
            })
            .collect();
        let (missing, dups) = collect(&mut sub, PUBS, COUNT, Duration::from_secs(60)).await;
        assert_eq!((missing, dups), (0, 0), "QoS {qos}: messages missing, duplicated");
        for f in floods {
            let acks = f.await.unwrap();
            assert_eq!(acks, if qos == 1 { COUNT } else { 0 }, "QoS {qos} acknowledgements");
        }
    }
}

/// A subscriber that never reads fills its queue; its publisher waits, then after
/// `slow_consumer_secs` without progress the subscriber is disconnected and the publisher goes
/// on, while a second subscriber of the same topic receives everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_that_never_reads_is_cut_off_and_others_keep_receiving() {
    let b = start_with(|c| {
        c.limits.max_queued_messages = 50;
        c.limits.slow_consumer_secs = 1;
    })
    .await;
    // Connects and subscribes, then never reads again.
    let mut dead = TcpStream::connect(b.addr).await.unwrap();
    dead.write_all(&Connect::v5("dead").bytes()).await.unwrap();
    dead.write_all(&subscribe_pkt(true, 1, &[("news", 0)])).await.unwrap();
    let mut live = connect_v311(b.addr, "live").await;
    live.subscribe(1, "news", 0).await;

    // 16 KiB messages: enough to fill the dead reader's socket buffers and then its queue.
    const COUNT: u32 = 3_000;
    let addr = b.addr;
    let publisher = tokio::spawn(async move { flood(addr, 0, "news", 0, COUNT, 16 * 1024).await });
    let (missing, dups) = collect(&mut live, 1, COUNT, Duration::from_secs(60)).await;
    assert_eq!((missing, dups), (0, 0), "the reading subscriber lost or repeated messages");
    publisher.await.unwrap();

    // The dead reader was disconnected: its stream ends.
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(20), dead.read_to_end(&mut rest)).await;
    assert!(read.is_ok(), "the stalled subscriber is still connected");
}

/// One client of two that each subscribe to the other's topic and publish to it as fast as
/// their in-flight window allows (as client libraries do), reading and acknowledging deliveries
/// on the side. Returns (messages received, acknowledgements received).
async fn cross_publisher(
    addr: SocketAddr,
    me: &'static str,
    other: &'static str,
    count: u32,
    both_subscribed: std::sync::Arc<tokio::sync::Barrier>,
) -> (usize, u32) {
    let mut c = connect_v311(addr, me).await;
    c.subscribe(1, &format!("to/{me}"), 1).await;
    // Nothing may be published before the other side's subscription exists.
    both_subscribed.wait().await;
    let stream = c.into_stream();
    let (mut r, mut w) = tokio::io::split(stream);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Vec<u8>>();
    let window = std::sync::Arc::new(tokio::sync::Semaphore::new(16));
    let permits = window.clone();
    let writer = tokio::spawn(async move {
        let mut seq = 0;
        loop {
            tokio::select! {
                ack = rx.recv() => match ack {
                    Some(bytes) => w.write_all(&bytes).await.unwrap(),
                    None => return,
                },
                permit = permits.acquire(), if seq < count => {
                    permit.unwrap().forget();
                    let pid = (seq % 60_000) as u16 + 1;
                    w.write_all(&publish(&format!("to/{other}"), &payload(0, seq, 32), 1, pid)).await.unwrap();
                    seq += 1;
                }
            }
        }
    });
    let mut got = HashSet::new();
    let mut acks = 0;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    while got.len() < count as usize || acks < count {
        let n = match tokio::time::timeout(Duration::from_secs(10), r.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => n,
            other => panic!("{me}: stream ended or stalled ({other:?}) with {} received, {acks} acks", got.len()),
        };
        buf.extend_from_slice(&chunk[..n]);
        while let Some((len, used)) = read_varint(buf.get(1..).unwrap_or(&[])) {
            if buf.len() < 1 + used + len {
                break;
            }
            let p: Vec<u8> = buf.drain(..1 + used + len).collect();
            match p[0] >> 4 {
                3 => {
                    let m = parse_publish(&p, false);
                    got.insert(u32::from_be_bytes(m.payload[4..8].try_into().unwrap()));
                    tx.send(puback(m.pid.unwrap())).unwrap();
                }
                4 => {
                    acks += 1;
                    window.add_permits(1);
                }
                _ => panic!("{me}: unexpected {}", hex(&p)),
            }
        }
    }
    drop(tx);
    writer.await.unwrap();
    (got.len(), acks)
}

/// Two clients publishing into each other's small queues: the acknowledgements they keep
/// sending let both queues drain, so everything arrives and nobody is cut off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_publishing_into_each_others_queues_finish() {
    let b = start_with(|c| {
        c.limits.max_queued_messages = 20;
        c.limits.slow_consumer_secs = 5;
    })
    .await;
    const COUNT: u32 = 3_000;
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(2));
    let a = tokio::spawn(cross_publisher(b.addr, "a", "b", COUNT, barrier.clone()));
    let bb = tokio::spawn(cross_publisher(b.addr, "b", "a", COUNT, barrier));
    assert_eq!(a.await.unwrap(), (COUNT as usize, COUNT), "client a: received, acknowledged");
    assert_eq!(bb.await.unwrap(), (COUNT as usize, COUNT), "client b: received, acknowledged");
}

/// Two clients that publish into each other's queues and never read: both stall, and the
/// broker resolves it by cutting them off within `slow_consumer_secs` (plus a margin), after
/// which it serves others as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cycle_of_stalled_clients_is_resolved_by_the_timeout() {
    let b = start_with(|c| {
        c.limits.max_queued_messages = 20;
        c.limits.slow_consumer_secs = 1;
    })
    .await;
    let mut ends = Vec::new();
    for (me, other) in [("x", "y"), ("y", "x")] {
        let mut s = TcpStream::connect(b.addr).await.unwrap();
        s.write_all(&Connect::v311(me).bytes()).await.unwrap();
        s.write_all(&subscribe_pkt(false, 1, &[(&format!("to/{me}"), 0)])).await.unwrap();
        let mut out = Vec::new();
        for seq in 0..2_000u32 {
            out.extend(publish(&format!("to/{other}"), &payload(0, seq, 4096), 0, 0));
        }
        let (mut r, mut w) = s.into_split();
        // Writes as much as the broker takes; never reads until the end.
        tokio::spawn(async move {
            let _ = w.write_all(&out).await;
        });
        ends.push(tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(3)).await;
            let mut sink = Vec::new();
            tokio::time::timeout(Duration::from_secs(20), r.read_to_end(&mut sink)).await.is_ok()
        }));
    }
    let started = Instant::now();
    for e in ends {
        assert!(e.await.unwrap(), "a stalled client is still connected");
    }
    assert!(started.elapsed() < Duration::from_secs(20));
    let mut c = connect_v311(b.addr, "after").await;
    c.assert_alive("after/t").await;
}

/// Reads `dead`'s stream to its end: the broker must close it within `limit`.
async fn cut_off_within(dead: &mut TcpStream, limit: Duration) {
    let mut rest = Vec::new();
    let read = tokio::time::timeout(limit, dead.read_to_end(&mut rest)).await;
    assert!(read.is_ok(), "the stalled subscriber is still connected");
}

/// Large messages to a subscriber that never reads: what the broker holds for it stays within
/// its byte bound (soft at `max_queued_bytes`, hard at twice it) until it is cut off, and the
/// publisher gets every acknowledgement.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_messages_to_a_reader_that_never_reads_stay_within_its_byte_bound() {
    const BOUND: usize = 2 * 1024 * 1024;
    let b = start_with(|c| {
        c.limits.max_queued_bytes = BOUND;
        c.limits.slow_consumer_secs = 1;
    })
    .await;
    let mut dead = TcpStream::connect(b.addr).await.unwrap();
    dead.write_all(&Connect::v5("dead-big").bytes()).await.unwrap();
    dead.write_all(&subscribe_pkt(true, 1, &[("big", 1)])).await.unwrap();
    let mut sub = connect_v311(b.addr, "sub-check").await;
    sub.subscribe(1, "big", 0).await;
    drop(sub);
    // 200 messages of 256 KiB: 50 MiB, 25 times the bound.
    let addr = b.addr;
    let publisher = tokio::spawn(async move { flood(addr, 0, "big", 1, 200, 256 * 1024).await });
    let mut peak = 0;
    while !publisher.is_finished() {
        peak = peak.max(b.handle.queued_memory());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(publisher.await.unwrap(), 200, "every QoS 1 publish acknowledged");
    // Counted beyond the queue's free 64 KiB, in 64 KiB steps.
    assert!(peak <= 2 * BOUND, "held {peak} bytes for one subscriber, bound {BOUND} (hard {})", 2 * BOUND);
    cut_off_within(&mut dead, Duration::from_secs(20)).await;
}

/// Several subscribers that never read, each without a byte bound of its own: together they
/// hold no more than twice the broker's memory budget, they are cut off once stalled, and a
/// subscriber that reads loses nothing meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_memory_budget_bounds_many_stalled_readers_and_spares_a_reading_one() {
    const BUDGET: usize = 2 * 1024 * 1024;
    let b = start_with(|c| {
        c.limits.max_queued_bytes = 0;
        c.limits.max_queued_messages = 1_000_000;
        c.limits.max_queued_memory = BUDGET;
        c.limits.slow_consumer_secs = 1;
    })
    .await;
    let mut dead = Vec::new();
    for i in 0..4 {
        let mut s = TcpStream::connect(b.addr).await.unwrap();
        s.write_all(&Connect::v5(&format!("stalled-{i}")).bytes()).await.unwrap();
        s.write_all(&subscribe_pkt(true, 1, &[("feed", 0)])).await.unwrap();
        dead.push(s);
    }
    let mut live = connect_v311(b.addr, "reader").await;
    live.subscribe(1, "feed", 0).await;
    const COUNT: u32 = 600; // 600 × 32 KiB = 19 MiB per subscriber
    let addr = b.addr;
    let publisher = tokio::spawn(async move { flood(addr, 0, "feed", 0, COUNT, 32 * 1024).await });
    let done = std::sync::atomic::AtomicBool::new(false);
    let sample = async {
        let mut peak = 0;
        while !done.load(std::sync::atomic::Ordering::Relaxed) {
            peak = peak.max(b.handle.queued_memory());
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        peak
    };
    let receive = async {
        let r = collect(&mut live, 1, COUNT, Duration::from_secs(60)).await;
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        r
    };
    let ((missing, dups), peak) = tokio::join!(receive, sample);
    assert_eq!((missing, dups), (0, 0), "the reading subscriber lost or repeated messages");
    publisher.await.unwrap();
    // Hard at twice the budget, plus at most one 64 KiB step per queue.
    assert!(peak <= 2 * BUDGET + 4 * 64 * 1024, "queues held {peak} bytes, budget {BUDGET}");
    for s in &mut dead {
        cut_off_within(s, Duration::from_secs(20)).await;
    }
    assert_eq!(b.handle.queued_memory(), 0, "memory of the cut-off readers given back");
}
