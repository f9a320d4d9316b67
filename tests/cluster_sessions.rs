//! Persistent sessions that survive their node (issue 15): three real `nats-server`s in one
//! JetStream cluster and tern processes with `[cluster]`, seen only through MQTT clients. A
//! session made on node 1 is resumed on node 2 after node 1 is killed (`kill -9`) mid-stream:
//! every message arrives, in order, none twice at QoS 2. Skips (with a printed reason) when
//! nats-server is not installed, except in CI.

mod common;

use std::collections::{BTreeSet, HashSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::nats::NatsCluster;
use common::process::TernProcess;
use common::*;
use sha2::Digest;

/// Longest wait for messages to cross the cluster.
const CROSS: Duration = Duration::from_secs(20);

async fn nodes(nats: &NatsCluster, name: &str, n: usize) -> Vec<TernProcess> {
    // The default ack timeout (JetStream's request timeout too): nothing here waits for one
    // to pass, and a loaded CI machine can take seconds to answer a KV write.
    common::nats::tern_nodes(name, n, |_| nats.urls(), "ack_timeout_ms = 5000\n").await
}

fn persistent(id: &str, v5: bool) -> Connect {
    if v5 {
        Connect::v5(id).clean(false).expiry(300)
    } else {
        Connect::v311(id).clean(false)
    }
}

/// A subscriber as a spec-following client: it delivers a QoS 2 message once, on its first
/// PUBLISH, and keeps its packet id until PUBREL (a PUBLISH with that id meanwhile is
/// answered, not delivered again). It acknowledges only what `ack` allows.
struct Sub {
    c: Raw,
    v5: bool,
    /// Payloads delivered, in order.
    got: Vec<String>,
    awaiting_rel: HashSet<u16>,
    /// Received since the last connect.
    this_connection: Vec<String>,
}

impl Sub {
    async fn connect(addr: SocketAddr, id: &str, v5: bool) -> (Sub, bool) {
        let (c, ack) = connect_with(addr, &persistent(id, v5)).await;
        let s = Sub { c, v5, got: Vec::new(), awaiting_rel: HashSet::new(), this_connection: Vec::new() };
        (s, ack.session_present)
    }

    async fn reconnect(&mut self, addr: SocketAddr, id: &str) -> bool {
        let (c, ack) = connect_with(addr, &persistent(id, self.v5)).await;
        self.c = c;
        self.this_connection.clear();
        ack.session_present
    }

    /// Reads until `n` distinct messages were delivered in all, acknowledging while `ack`
    /// (given the number delivered) says so.
    async fn read_until(&mut self, n: usize, ack: impl Fn(usize) -> bool) {
        let deadline = Instant::now() + CROSS;
        while self.got.iter().collect::<HashSet<_>>().len() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "{} of {n} messages within {CROSS:?}: {:?}", self.got.len(), self.got);
            match self.c.next_event(left).await {
                Event::Packet(p) if p[0] >> 4 == 3 => {
                    let m = parse_publish(&p, self.v5);
                    let payload = String::from_utf8_lossy(&m.payload).into_owned();
                    self.this_connection.push(payload.clone());
                    let first = match (m.qos, m.pid) {
                        (2, Some(id)) => self.awaiting_rel.insert(id),
                        _ => true,
                    };
                    if first {
                        self.got.push(payload);
                    }
                    let allowed = ack(self.got.len());
                    match (m.qos, m.pid) {
                        (1, Some(id)) if allowed => self.c.send(&puback(id)).await,
                        (2, Some(id)) if allowed => self.c.send(&pubrec(id)).await,
                        _ => {}
                    }
                }
                Event::Packet(p) if p[0] == 0x62 => {
                    let id = u16::from_be_bytes([p[2], p[3]]);
                    self.awaiting_rel.remove(&id);
                    self.c.send(&pubcomp(id)).await;
                }
                Event::Packet(_) | Event::Timeout => {}
                Event::Closed => panic!("subscriber connection closed"),
            }
        }
    }
}

async fn publish_all(c: &mut Raw, topic: &str, qos: u8, range: std::ops::Range<usize>) {
    for i in range {
        let pid = (i + 1) as u16;
        c.send(&publish_full(topic.as_bytes(), format!("m{i:03}").as_bytes(), qos, pid, false, false, Some(&[]))).await;
        if qos == 1 {
            c.expect_ack(0x40, pid).await;
        } else {
            c.expect_ack(0x50, pid).await;
            c.send(&pubrel(pid)).await;
            c.expect_ack(0x70, pid).await;
        }
    }
}

fn expected(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("m{i:03}")).collect()
}

/// Every message once in `got` in order; duplicates (QoS 1 only) removed and counted.
fn check(what: &str, got: &[String], n: usize, qos: u8) -> usize {
    let mut seen = BTreeSet::new();
    let firsts: Vec<String> = got.iter().filter(|p| seen.insert((*p).clone())).cloned().collect();
    assert_eq!(firsts, expected(n), "{what}: not every message, in order");
    let dups = got.len() - firsts.len();
    if qos == 2 {
        assert_eq!(dups, 0, "{what}: a QoS 2 message delivered twice: {got:?}");
    }
    dups
}

#[tokio::test]
async fn a_session_resumes_on_another_node_after_its_node_is_killed() {
    let Some(nats) = tokio::task::spawn_blocking(|| NatsCluster::start(3)).await.expect("nats start") else { return };
    let mut tern = nodes(&nats, "sess", 3).await;
    let (n1, n2, n3) = (tern[0].addr(), tern[1].addr(), tern[2].addr());
    const N: usize = 40;
    // (client id, v5, topic, QoS)
    let cases = [("sess-q1", true, "s/q1", 1u8), ("sess-q2", true, "s/q2", 2), ("sess-v4", false, "s/v4", 1)];
    let mut subs = Vec::new();
    for (id, v5, topic, qos) in cases {
        let (mut s, present) = Sub::connect(n1, id, v5).await;
        assert!(!present, "{id}: a new session");
        s.c.send(&subscribe_pkt(v5, 1, &[(topic, qos)])).await;
        let p = s.c.read_packet().await;
        assert_eq!(p[0], 0x90, "SUBACK expected: {}", hex(&p));
        assert!(p.last().is_some_and(|&c| c < 0x80), "SUBACK refused: {}", hex(&p));
        subs.push(s);
    }
    let mut publisher = connect_v5(n3, "sess-pub").await;
    for (_, _, topic, qos) in cases {
        publish_all(&mut publisher, topic, qos, 0..N / 2).await;
    }
    // Mid-stream: some delivered and acknowledged, the last few delivered but not (QoS 2:
    // one PUBREC'd whose PUBCOMP is not sent, one not even PUBREC'd).
    for s in subs.iter_mut() {
        s.read_until(12, |n| n <= 10).await;
        // QoS 2: until the PUBRELs of the 10 PUBREC'd have come (and been completed); the
        // last 2 stay delivered, with their ids kept, and not acknowledged at all.
        let t0 = Instant::now();
        while s.awaiting_rel.len() > 2 {
            assert!(t0.elapsed() < CROSS, "PUBRELs did not come");
            if let Event::Packet(p) = s.c.next_event(Duration::from_millis(100)).await {
                if p[0] == 0x62 {
                    let id = u16::from_be_bytes([p[2], p[3]]);
                    s.awaiting_rel.remove(&id);
                    s.c.send(&pubcomp(id)).await;
                }
            }
        }
    }
    // The kill comes once node 1 has passed the client's acknowledgements on to JetStream
    // (each session's consumer holds its 20 messages so far: at least 8 of the 10 the client
    // acknowledged are no longer pending; a QoS 2 message ends at PUBCOMP, and the last
    // PUBRELs may still be on their way).
    let js = async_nats::jetstream::new(async_nats::connect(nats.urls()[1].as_str()).await.expect("NATS"));
    let stream = js.get_stream("SESS_MSGS").await.expect("messages stream");
    for (id, ..) in cases {
        let name = format!("s-{}", hex(&sha2::Sha256::digest(id.as_bytes())[..16]).replace(' ', "").to_lowercase());
        let t0 = Instant::now();
        loop {
            let info = stream.consumer_info(&name).await.expect("session consumer");
            if info.num_ack_pending <= 12 {
                break;
            }
            assert!(t0.elapsed() < CROSS, "{id}: acknowledgements not passed on: {info:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    tern[0].kill();
    for (_, _, topic, qos) in cases {
        publish_all(&mut publisher, topic, qos, N / 2..N).await;
    }
    for ((id, _, _, qos), s) in cases.iter().zip(subs.iter_mut()) {
        let t0 = Instant::now();
        assert!(s.reconnect(n2, id).await, "{id}: session present on node 2");
        s.read_until(N, |_| true).await;
        let dups = check(id, &s.got, N, *qos);
        // Received on node 2: what was not acknowledged on node 1, then the rest, in order.
        let again = &s.this_connection;
        let mut sorted = again.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(&sorted, again, "{id}: node 2 sent out of order or twice: {again:?}");
        println!(
            "{id}: {N} messages, {dups} duplicate(s) at QoS {qos}; node 2 resent from {:?}, all in {:?}",
            again.first(),
            t0.elapsed()
        );
    }
    tern.clear();
}

#[tokio::test]
async fn an_offline_session_gets_its_backlog_on_another_node_and_an_expired_one_is_gone() {
    let Some(nats) = tokio::task::spawn_blocking(|| NatsCluster::start(3)).await.expect("nats start") else { return };
    let tern = nodes(&nats, "back", 2).await;
    let (n1, n2) = (tern[0].addr(), tern[1].addr());
    let (mut away, _) = connect_with(n1, &Connect::v5("back-away").clean(false).expiry(300)).await;
    away.subscribe(1, "b/#", 1).await;
    away.disconnect().await;
    let (mut brief, _) = connect_with(n1, &Connect::v5("back-brief").clean(false).expiry(2)).await;
    brief.subscribe(1, "e/#", 1).await;

    let js = async_nats::jetstream::new(async_nats::connect(nats.urls()[0].as_str()).await.expect("NATS"));
    let mut stream = js.get_stream("BACK_MSGS").await.expect("messages stream");
    let consumers = stream.info().await.expect("stream info").state.consumer_count;
    brief.disconnect().await;

    let mut publisher = connect_v5(n2, "back-pub").await;
    publish_all(&mut publisher, "b/x", 1, 0..10).await;
    publish_all(&mut publisher, "e/x", 1, 0..3).await;

    let (mut back, ack) = connect_with(n2, &Connect::v5("back-away").clean(false).expiry(300)).await;
    assert!(ack.session_present, "the session is found on node 2");
    let mut got = Vec::new();
    for _ in 0..10 {
        let p = back.recv_publish_ack().await;
        assert_eq!(p.topic, "b/x");
        got.push(String::from_utf8_lossy(&p.payload).into_owned());
    }
    assert_eq!(got, expected(10), "the backlog, in order");

    // The expired session's consumer goes away by itself (inactive threshold = its expiry).
    let t0 = Instant::now();
    loop {
        let now = stream.info().await.expect("stream info").state.consumer_count;
        if now < consumers {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(20), "the expired session's consumer is still there");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (mut gone, ack) = connect_with(n2, &Connect::v5("back-brief").clean(false).expiry(300)).await;
    assert!(!ack.session_present, "an expired session does not come back");
    gone.expect_silence(Duration::from_millis(500)).await;
}

/// A QoS 2 delivery the client PUBREC'd is "released" for every node: after its node dies,
/// the node that takes the session on sends its PUBREL again, never its PUBLISH, whether the
/// client had completed it (and forgotten the id: a PUBLISH would be a new message to it)
/// or not.
#[tokio::test]
async fn a_released_qos2_delivery_comes_back_as_pubrel_never_as_publish() {
    let Some(nats) = tokio::task::spawn_blocking(|| NatsCluster::start(3)).await.expect("nats start") else { return };
    let mut tern = nodes(&nats, "rel", 2).await;
    let (n1, n2) = (tern[0].addr(), tern[1].addr());
    let cases = [("rel-v5", true, "r/v5"), ("rel-v4", false, "r/v4")];
    let mut publisher = connect_v5(n2, "rel-pub").await;
    let mut subs = Vec::new();
    for (id, v5, topic) in cases {
        let (mut c, _) = connect_with(n1, &persistent(id, v5)).await;
        c.send(&subscribe_pkt(v5, 1, &[(topic, 2)])).await;
        let p = c.read_packet().await;
        assert!(p[0] == 0x90 && p.last().is_some_and(|&q| q == 2), "SUBACK granting QoS 2: {}", hex(&p));
        publish_all(&mut publisher, topic, 2, 0..2).await;
        // m000: PUBREC'd, PUBREL received, PUBCOMP never sent. m001: completed.
        let mut ids: Vec<u16> = Vec::new();
        let mut rels = 0;
        let deadline = Instant::now() + CROSS;
        while rels < 2 {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "{id}: PUBLISH/PUBREL of m000 and m001 within {CROSS:?} ({ids:?}, {rels})");
            match c.next_event(left).await {
                Event::Packet(p) if p[0] >> 4 == 3 => {
                    let m = parse_publish(&p, v5);
                    let want = format!("m{:03}", ids.len());
                    assert_eq!(String::from_utf8_lossy(&m.payload), want, "{id}: in order");
                    let pid = m.pid.expect("QoS 2 has a packet id");
                    ids.push(pid);
                    c.send(&pubrec(pid)).await;
                }
                Event::Packet(p) if p[0] == 0x62 => {
                    let pid = u16::from_be_bytes([p[2], p[3]]);
                    assert!(ids.contains(&pid), "{id}: PUBREL for an id never PUBREC'd: {}", hex(&p));
                    rels += 1;
                    if ids.get(1) == Some(&pid) {
                        c.send(&pubcomp(pid)).await;
                    }
                }
                Event::Packet(p) => panic!("{id}: unexpected {}", hex(&p)),
                Event::Timeout => {}
                Event::Closed => panic!("{id}: closed by node 1"),
            }
        }
        subs.push((c, ids));
    }
    tern[0].kill();

    for ((id, v5, topic), (_, ids)) in cases.iter().zip(&subs) {
        let (mut c, ack) = connect_with(n2, &persistent(id, *v5)).await;
        assert!(ack.session_present, "{id}: session present on node 2");
        publish_all(&mut publisher, topic, 2, 2..3).await;
        // Until the next message: PUBRELs (answered), and no PUBLISH but m002's.
        let mut pubrels = Vec::new();
        let deadline = Instant::now() + CROSS;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "{id}: m002 did not come on node 2");
            match c.next_event(left).await {
                Event::Packet(p) if p[0] == 0x62 => {
                    let pid = u16::from_be_bytes([p[2], p[3]]);
                    pubrels.push(pid);
                    c.send(&pubcomp(pid)).await;
                }
                Event::Packet(p) if p[0] >> 4 == 3 => {
                    let m = parse_publish(&p, *v5);
                    assert_eq!(
                        String::from_utf8_lossy(&m.payload),
                        "m002",
                        "{id}: a released message was sent again as a PUBLISH (a duplicate to the client)"
                    );
                    break;
                }
                Event::Packet(_) | Event::Timeout => {}
                Event::Closed => panic!("{id}: closed by node 2"),
            }
        }
        assert!(pubrels.contains(&ids[0]), "{id}: the PUBREL of the uncompleted m000 ({}) again: {pubrels:?}", ids[0]);
        println!("{id}: PUBRELs sent again by node 2: {pubrels:?} (m000 {}, m001 {})", ids[0], ids[1]);
    }
    tern.clear();
}
