//! A tern cluster on NATS JetStream, end to end: three real `nats-server`s in one JetStream
//! cluster and three tern processes with `[cluster]`, seen only through MQTT clients.
//! Skips (with a printed reason) when nats-server is not installed, except in CI.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::nats::NatsCluster;
use common::process::TernProcess;
use common::*;

/// Longest wait for a message to cross the cluster.
const CROSS: Duration = Duration::from_secs(15);

/// Three tern nodes `n1..n3` on `nats`; node i lists the NATS urls `urls(i)`.
async fn nodes(name: &str, urls: impl Fn(usize) -> Vec<String>) -> Vec<TernProcess> {
    nodes_with(name, urls, "").await
}

/// `nodes` with more `[cluster]` keys.
async fn nodes_with(name: &str, urls: impl Fn(usize) -> Vec<String>, extra: &str) -> Vec<TernProcess> {
    common::nats::tern_nodes(name, 3, urls, &format!("ack_timeout_ms = 2000\n{extra}")).await
}

async fn client(addr: SocketAddr, id: &str, v5: bool) -> Raw {
    let mut c = Raw::open(addr).await;
    let connect = if v5 { Connect::v5(id) } else { Connect::v311(id) };
    let ack = c.handshake(&connect).await;
    assert_eq!(ack.code, 0, "CONNACK of {id}");
    c
}

async fn subscriber(addr: SocketAddr, id: &str, v5: bool, filters: &[(&str, u8)]) -> Raw {
    let mut c = client(addr, id, v5).await;
    c.send(&subscribe_pkt(v5, 1, filters)).await;
    let p = c.read_packet().await;
    assert_eq!(p[0], 0x90, "SUBACK expected: {}", hex(&p));
    c
}

/// Reads publishes (acknowledging QoS 1 and 2 as a client does) until `done` says enough,
/// within `limit`.
async fn collect(c: &mut Raw, v5: bool, limit: Duration, done: impl Fn(&[Pub]) -> bool) -> Vec<Pub> {
    let deadline = Instant::now() + limit;
    let mut got = Vec::new();
    while !done(&got) {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "not all messages arrived within {limit:?}; got {:?}", summary(&got));
        match c.next_event(left).await {
            Event::Packet(p) if p[0] >> 4 == 3 => {
                let m = parse_publish(&p, v5);
                match (m.qos, m.pid) {
                    (1, Some(id)) => c.send(&puback(id)).await,
                    (2, Some(id)) => c.send(&pubrec(id)).await,
                    _ => {}
                }
                got.push(m);
            }
            Event::Packet(p) if p[0] == 0x62 => {
                let id = u16::from_be_bytes([p[2], p[3]]);
                c.send(&pubcomp(id)).await;
            }
            Event::Packet(_) => {}
            Event::Closed => panic!("subscriber connection closed"),
            Event::Timeout => {}
        }
    }
    got
}

fn summary(got: &[Pub]) -> Vec<(String, String, u8)> {
    got.iter().map(|m| (m.topic.clone(), String::from_utf8_lossy(&m.payload).into_owned(), m.qos)).collect()
}

fn has(got: &[Pub], payload: &str) -> bool {
    got.iter().any(|m| m.payload == payload.as_bytes())
}

/// Payload -> times received.
fn counts(got: &[Pub]) -> BTreeMap<String, usize> {
    let mut c = BTreeMap::new();
    for m in got {
        *c.entry(String::from_utf8_lossy(&m.payload).into_owned()).or_default() += 1;
    }
    c
}

/// Publishes at QoS 1 or 2 (v5) and returns the reason code of PUBACK / PUBREC (completing
/// QoS 2 with PUBREL/PUBCOMP on success), within `limit`.
async fn publish_v5(c: &mut Raw, topic: &str, payload: &[u8], qos: u8, pid: u16, retain: bool, limit: Duration) -> u8 {
    publish_v5_props(c, (topic, payload), qos, pid, retain, &[], limit).await
}

async fn publish_v5_props(
    c: &mut Raw,
    (topic, payload): (&str, &[u8]),
    qos: u8,
    pid: u16,
    retain: bool,
    props: &[u8],
    limit: Duration,
) -> u8 {
    c.send(&publish_full(topic.as_bytes(), payload, qos, pid, retain, false, Some(props))).await;
    loop {
        let p = c.read_packet_within(limit).await;
        let want = if qos == 1 { 0x40 } else { 0x50 };
        if p[0] != want {
            continue;
        }
        let reason = p.get(4).copied().unwrap_or(0);
        if qos == 2 && reason < 0x80 {
            c.send(&pubrel(pid)).await;
            let comp = c.read_packet_within(limit).await;
            assert_eq!(comp[0], 0x70, "PUBCOMP expected: {}", hex(&comp));
        }
        return reason;
    }
}

/// A user property (0x26) and a content type (0x03), as v5 PUBLISH properties.
fn v5_props() -> Vec<u8> {
    let mut p = vec![0x26];
    p.extend(mqtt_str(b"k"));
    p.extend(mqtt_str(b"v"));
    p.push(0x03);
    p.extend(mqtt_str(b"text/plain"));
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_and_retained_cross_the_cluster_once() {
    let Some(nats) = NatsCluster::start(3) else { return };
    let urls = nats.urls();
    let tern = nodes("route", |i| vec![urls[i].clone()]).await;
    let (a1, a2, a3) = (tern[0].addr(), tern[1].addr(), tern[2].addr());

    // Overlapping filters on one node (each message once), a 3.1.1 subscriber, `#` that must
    // not see `$` topics, and a subscriber on the publishing node itself.
    let mut s2 = subscriber(a2, "s2", true, &[("t/#", 2), ("t/+/x", 2), ("t/a/+", 1)]).await;
    let mut s3 = subscriber(a3, "s3", false, &[("#", 2)]).await;
    let mut s1 = subscriber(a1, "s1", true, &[("t/#", 2)]).await;
    let mut p1 = client(a1, "p1", true).await;
    let mut p1v3 = client(a1, "p1v3", false).await;

    // Interest travels to the other nodes asynchronously: QoS 0 probes until they arrive.
    let t0 = Instant::now();
    let mut n = 0;
    let mut seen2 = Vec::new();
    let mut seen3 = Vec::new();
    loop {
        n += 1;
        p1.send(&publish_full(b"t/probe", format!("probe{n}").as_bytes(), 0, 0, false, false, Some(&[]))).await;
        let probe = format!("probe{n}");
        let quick = Duration::from_millis(300);
        let r2 = tokio::time::timeout(quick, collect(&mut s2, true, CROSS, |g| has(g, &probe))).await;
        let r3 = tokio::time::timeout(quick, collect(&mut s3, false, CROSS, |g| has(g, &probe))).await;
        if let (Ok(a), Ok(b)) = (r2, r3) {
            seen2.extend(a);
            seen3.extend(b);
            break;
        }
        assert!(t0.elapsed() < CROSS, "QoS 0 never crossed the cluster\n{}", tern[1].log());
    }

    let props = v5_props();
    p1.send(&publish_full(b"t/a/x", b"q0", 0, 0, false, false, Some(&props))).await;
    assert_eq!(publish_v5(&mut p1, "t/a/x", b"q1", 1, 10, false, WAIT).await, 0);
    assert_eq!(publish_v5_props(&mut p1, ("t/a/x", b"q2"), 2, 11, false, &props, WAIT).await, 0);
    assert_eq!(publish_v5(&mut p1, "$x/y", b"dollar", 1, 12, false, WAIT).await, 0);
    p1v3.send(&publish("t/b", b"v3q1", 1, 1)).await;
    p1v3.expect(&puback(1)).await;
    // Last on each path: once they are in, anything sent twice would be too.
    p1.send(&publish_full(b"t/end", b"end0", 0, 0, false, false, Some(&[]))).await;
    assert_eq!(publish_v5(&mut p1, "t/end", b"end1", 1, 13, false, WAIT).await, 0);

    let all = ["q0", "q1", "q2", "v3q1", "end0", "end1"];
    let done = |g: &[Pub]| all.iter().all(|p| has(g, p));
    for (name, sub, v5, seen) in [("n2", &mut s2, true, seen2), ("n3", &mut s3, false, seen3)] {
        let got = collect(sub, v5, CROSS, done).await;
        let c = counts(&got);
        for p in all {
            assert_eq!(c.get(p), Some(&1), "{name}: {p} not received exactly once: {:?}", summary(&got));
        }
        assert!(!has(&got, "dollar") && !has(&seen, "dollar"), "{name}: `#` matched a $ topic");
        let q = |p: &str| got.iter().find(|m| m.payload == p.as_bytes()).map(|m| m.qos);
        assert_eq!((q("q0"), q("q1"), q("q2")), (Some(0), Some(1), Some(2)), "{name}");
        if v5 {
            let m = got.iter().find(|m| m.payload == b"q2").unwrap();
            let user = m.props.iter().find(|(id, _)| *id == 0x26).map(|(_, v)| v.clone());
            assert_eq!(user, Some([mqtt_str(b"k"), mqtt_str(b"v")].concat()), "{name}: user property lost");
            let ct = m.props.iter().find(|(id, _)| *id == 0x03).map(|(_, v)| v.clone());
            assert_eq!(ct.as_deref(), Some(&b"text/plain"[..]), "{name}: content type lost");
        }
    }
    // The publishing node's own subscriber: once, not a second time back from NATS.
    let got = collect(&mut s1, true, CROSS, done).await;
    for p in all {
        assert_eq!(counts(&got).get(p), Some(&1), "n1: {p}: {:?}", summary(&got));
    }

    // Retained: set on node 2, seen by a new subscriber on node 3; cleared on node 1, gone
    // everywhere.
    let mut p2 = client(a2, "p2", true).await;
    assert_eq!(publish_v5(&mut p2, "r/1", b"kept", 1, 1, true, WAIT).await, 0);
    let retained_on = |addr: SocketAddr, id: String| async move {
        let mut c = subscriber(addr, &id, true, &[("r/#", 1)]).await;
        let got =
            tokio::time::timeout(Duration::from_millis(400), collect(&mut c, true, CROSS, |g| !g.is_empty())).await;
        got.ok().and_then(|g| g.into_iter().next())
    };
    let t0 = Instant::now();
    let mut i = 0;
    loop {
        i += 1;
        if let Some(m) = retained_on(a3, format!("r3-{i}")).await {
            assert!(m.retain && m.payload == b"kept", "{m:?}");
            break;
        }
        assert!(t0.elapsed() < CROSS, "retained message never reached node 3");
    }
    assert_eq!(publish_v5(&mut p1, "r/1", b"", 1, 20, true, WAIT).await, 0);
    for addr in [a1, a2, a3] {
        let t0 = Instant::now();
        while retained_on(addr, format!("gone-{i}")).await.is_some() {
            i += 1;
            assert!(t0.elapsed() < CROSS, "cleared retained message still on {addr}");
        }
        i += 1;
    }
    drop(tern);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos1_survives_a_nats_server_and_acks_stop_without_nats() {
    let Some(mut nats) = NatsCluster::start(3) else { return };
    let urls = nats.urls();
    // Node 1 may use servers 1 and 2, node 2 only server 3: killing node 1's server leaves
    // node 2's subscriber where it is.
    let tern = nodes("fail", |i| match i {
        0 => vec![urls[0].clone(), urls[1].clone()],
        1 => vec![urls[2].clone()],
        _ => vec![urls[1].clone()],
    })
    .await;
    let (a1, a2) = (tern[0].addr(), tern[1].addr());
    let mut sub = subscriber(a2, "sub", true, &[("k/#", 1)]).await;
    let mut p = client(a1, "pub", true).await;

    // Which server node 1 is on: its log says.
    let log = tern[0].log();
    let on = (0..2).find(|&i| log.contains(&format!("nats{} (", i + 1))).expect("node 1 logs its NATS server");

    let mut acked = BTreeSet::new();
    let mut refused = 0;
    let mut pid = 0u16;
    let mut n = 0;
    let t0 = Instant::now();
    while acked.len() < 200 {
        assert!(
            t0.elapsed() < Duration::from_secs(40),
            "{} acknowledged, {refused} refused by then; node 1:\n{}",
            acked.len(),
            tern[0].log()
        );
        if acked.len() == 50 && nats.servers[on].running() {
            nats.kill(on);
        }
        n += 1;
        pid = pid % 60_000 + 1;
        let payload = format!("m{n}");
        match publish_v5(&mut p, "k/1", payload.as_bytes(), 1, pid, false, Duration::from_secs(10)).await {
            0 => {
                acked.insert(payload);
            }
            _ => refused += 1, // the client sends it again as a new message
        }
    }
    let got = collect(&mut sub, true, Duration::from_secs(30), |g| {
        let have: BTreeSet<_> = g.iter().map(|m| String::from_utf8_lossy(&m.payload).into_owned()).collect();
        acked.iter().all(|a| have.contains(a))
    })
    .await;
    eprintln!("{} acknowledged, {refused} refused (sent again), {} received", acked.len(), got.len());

    // Every NATS server gone: a v5 QoS 1 publish is answered 0x80, not success.
    for i in 0..3 {
        if nats.servers[i].running() {
            nats.kill(i);
        }
    }
    let t0 = Instant::now();
    assert_eq!(publish_v5(&mut p, "k/1", b"lost", 1, 60_001, false, Duration::from_secs(10)).await, 0x80);
    assert!(t0.elapsed() < Duration::from_secs(8), "refusal took {:?}", t0.elapsed());
    // Back: acknowledgements resume.
    nats.restart_all_async().await;
    let t0 = Instant::now();
    let mut pid = 60_100;
    while publish_v5(&mut p, "k/1", b"back", 1, pid, false, Duration::from_secs(10)).await != 0 {
        // Refusals come fast while the streams are not back: poll, do not spin.
        pid = if pid == u16::MAX { 60_100 } else { pid + 1 };
        assert!(t0.elapsed() < Duration::from_secs(40), "acks did not resume after NATS came back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(tern[0].log().contains("disconnected from NATS"), "the loss of NATS is logged");
    drop(tern);
}

/// The next PUBLISH `c` receives within `dur` (acknowledged as a client does), if any.
async fn next_pub(c: &mut Raw, v5: bool, dur: Duration) -> Option<Pub> {
    let deadline = Instant::now() + dur;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        match c.next_event(left).await {
            Event::Packet(p) if p[0] >> 4 == 3 => {
                let m = parse_publish(&p, v5);
                match (m.qos, m.pid) {
                    (1, Some(id)) => c.send(&puback(id)).await,
                    (2, Some(id)) => c.send(&pubrec(id)).await,
                    _ => {}
                }
                return Some(m);
            }
            Event::Packet(p) if p[0] == 0x62 => {
                let id = u16::from_be_bytes([p[2], p[3]]);
                c.send(&pubcomp(id)).await;
            }
            Event::Packet(_) => {}
            Event::Closed => panic!("member connection closed"),
            Event::Timeout => return None,
        }
    }
}

/// Reads every member in turn into `got` (one list per member) until `done` says enough,
/// within `limit`; then for `QUIET` more, so that a copy too many would be seen.
async fn gather(
    members: &mut [(Raw, bool)],
    got: &mut [Vec<Pub>],
    limit: Duration,
    done: impl Fn(&[Vec<Pub>]) -> bool,
) {
    let deadline = Instant::now() + limit;
    while !done(got) {
        let tallies: Vec<usize> = got.iter().map(Vec::len).collect();
        assert!(Instant::now() < deadline, "not everything arrived within {limit:?}; received per member: {tallies:?}");
        for ((c, v5), out) in members.iter_mut().zip(got.iter_mut()) {
            while let Some(m) = next_pub(c, *v5, Duration::from_millis(20)).await {
                out.push(m);
            }
        }
    }
    let quiet = Instant::now() + QUIET;
    while Instant::now() < quiet {
        for ((c, v5), out) in members.iter_mut().zip(got.iter_mut()) {
            while let Some(m) = next_pub(c, *v5, Duration::from_millis(20)).await {
                out.push(m);
            }
        }
    }
}

/// How many of `got` carry a payload starting with `prefix`.
fn tally(got: &[Pub], prefix: &str) -> usize {
    got.iter().filter(|m| m.payload.starts_with(prefix.as_bytes())).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_subscription_members_on_different_nodes_share_the_load() {
    let Some(nats) = NatsCluster::start(3) else { return };
    let urls = nats.urls();
    let tern = nodes("share", |i| vec![urls[i].clone()]).await;
    let addrs = [tern[0].addr(), tern[1].addr(), tern[2].addr()];
    let shape = [("m1", true), ("m2", false), ("m3", true)];
    let mut members = Vec::new();
    for (addr, (id, v5)) in addrs.iter().zip(shape) {
        members.push((subscriber(*addr, id, v5, &[("$share/g/t/#", 1)]).await, v5));
    }
    // A plain subscriber beside the group: it still gets every message.
    let mut plain = subscriber(addrs[2], "plain", true, &[("t/#", 1)]).await;
    let mut p = client(addrs[0], "pub", true).await;
    let mut got: Vec<Vec<Pub>> = vec![Vec::new(); 3];

    // Members' interest reaches NATS asynchronously: QoS 1 probes until every node takes its
    // turn, QoS 0 probes until they reach the group.
    let mut pid = 0u16;
    let mut n = 0;
    let t0 = Instant::now();
    while got.iter().any(|g| tally(g, "probe1-") == 0) {
        assert!(
            t0.elapsed() < CROSS,
            "not every node took a QoS 1 probe: {:?}\nnode 2:\n{}",
            got.iter().map(Vec::len).collect::<Vec<_>>(),
            tern[1].log()
        );
        n += 1;
        pid += 1;
        assert_eq!(publish_v5(&mut p, "t/probe", format!("probe1-{n}").as_bytes(), 1, pid, false, WAIT).await, 0);
        for ((c, v5), out) in members.iter_mut().zip(got.iter_mut()) {
            while let Some(m) = next_pub(c, *v5, Duration::from_millis(30)).await {
                out.push(m);
            }
        }
    }
    while got.iter().all(|g| tally(g, "probe0-") == 0) {
        assert!(t0.elapsed() < CROSS * 2, "no QoS 0 probe reached the group");
        n += 1;
        p.send(&publish_full(b"t/probe", format!("probe0-{n}").as_bytes(), 0, 0, false, false, Some(&[]))).await;
        for ((c, v5), out) in members.iter_mut().zip(got.iter_mut()) {
            while let Some(m) = next_pub(c, *v5, Duration::from_millis(30)).await {
                out.push(m);
            }
        }
    }
    let probes: usize = got.iter().map(|g| tally(g, "probe1-")).sum();
    assert!(probes <= n, "a QoS 1 probe was delivered twice: {probes} deliveries of at most {n} probes");

    const N: usize = 300;
    for i in 0..N {
        pid = pid % 60_000 + 1;
        assert_eq!(
            publish_v5(&mut p, &format!("t/{}", i % 7), format!("a{i}").as_bytes(), 1, pid, false, WAIT).await,
            0
        );
    }
    for i in 0..N {
        p.send(&publish_full(
            format!("t/{}", i % 7).as_bytes(),
            format!("b{i}").as_bytes(),
            0,
            0,
            false,
            false,
            Some(&[]),
        ))
        .await;
    }
    let all = |prefix: &'static str| {
        move |g: &[Vec<Pub>]| {
            let have: BTreeSet<&[u8]> = g
                .iter()
                .flatten()
                .filter(|m| m.payload.starts_with(prefix.as_bytes()))
                .map(|m| &m.payload[..])
                .collect();
            have.len() == N
        }
    };
    let (all_a, all_b) = (all("a"), all("b"));
    gather(&mut members, &mut got, CROSS * 2, |g| all_a(g) && all_b(g)).await;
    let shares: Vec<(usize, usize)> = got.iter().map(|g| (tally(g, "a"), tally(g, "b"))).collect();
    eprintln!("shares per member (QoS 1, QoS 0): {shares:?}");
    let mut union: Vec<Pub> = got.iter().flatten().cloned().collect();
    union.retain(|m| !m.payload.starts_with(b"probe"));
    for (payload, times) in counts(&union) {
        assert_eq!(times, 1, "{payload} delivered {times} times in the group; shares {shares:?}");
    }
    for (i, (a, b)) in shares.iter().enumerate() {
        assert!(*a > N / 10 && *b > N / 10, "member on node {} got too small a share: {shares:?}", i + 1);
    }
    assert!(got
        .iter()
        .flatten()
        .all(|m| m.qos == 1 || m.payload.starts_with(b"b") || m.payload.starts_with(b"probe0")));
    let plain_got = collect(&mut plain, true, CROSS, |g| tally(g, "a") == N && tally(g, "b") == N).await;
    assert_eq!(plain_got.len(), counts(&plain_got).len(), "the plain subscriber got a message twice");

    // The member on node 2 leaves: the others get every QoS 1 message from then on.
    let (mut m2, _) = members.remove(1);
    m2.send(&[0xE0, 0x00]).await;
    drop(m2);
    got.remove(1);
    for g in got.iter_mut() {
        g.clear();
    }
    for i in 0..100 {
        pid = pid % 60_000 + 1;
        assert_eq!(publish_v5(&mut p, "t/after", format!("c{i}").as_bytes(), 1, pid, false, WAIT).await, 0);
    }
    let all_c = |g: &[Vec<Pub>]| g.iter().map(|g| tally(g, "c")).sum::<usize>() >= 100;
    gather(&mut members, &mut got, CROSS * 2, all_c).await;
    let union: Vec<Pub> = got.iter().flatten().cloned().collect();
    let c = counts(&union);
    assert!((0..100).all(|i| c.get(&format!("c{i}")) == Some(&1)), "after node 2's member left: {c:?}");
    eprintln!("after the leave (node 1, node 3): {:?}", got.iter().map(|g| tally(g, "c")).collect::<Vec<_>>());
    drop(tern);
}

/// Reads `sub` until `payload` has arrived, then for `settle` more: how many times it came.
async fn times_received(sub: &mut Raw, payload: &str, limit: Duration, settle: Duration) -> usize {
    let got = collect(sub, true, limit, |g| has(g, payload)).await;
    let mut n = counts(&got).get(payload).copied().unwrap_or(0);
    let end = Instant::now() + settle;
    while let Some(m) = next_pub(sub, true, end.saturating_duration_since(Instant::now())).await {
        n += usize::from(m.payload == payload.as_bytes());
    }
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wills_are_published_once_by_whichever_node_sees_the_end() {
    let Some(nats) = NatsCluster::start(3) else { return };
    let urls = nats.urls();
    let mut tern = nodes_with("wills", |i| vec![urls[i].clone()], "heartbeat_ms = 300\nnode_timeout_ms = 2000\n").await;
    let (a1, a2) = (tern[0].addr(), tern[1].addr());
    let mut sub = subscriber(a2, "watcher", true, &[("will/#", 1)]).await;
    let settle = Duration::from_secs(2);

    // A client of node 1 whose socket is closed abruptly: its will, once, on node 2.
    let mut c = Raw::open(a1).await;
    assert_eq!(c.handshake(&Connect::v5("gone").will(Will::new("will/gone", b"gone", 1))).await.code, 0);
    drop(c);
    assert_eq!(times_received(&mut sub, "gone", CROSS, settle).await, 1, "abrupt close");

    // Taken over from node 1 by a CONNECT on node 2: as on one node, the old connection's
    // will is published (MQTT 5 publishes a will when a connection ends other than by a
    // normal DISCONNECT, a takeover included), once.
    let mut old = Raw::open(a1).await;
    assert_eq!(old.handshake(&Connect::v311("moving").will(Will::new("will/moving", b"moving", 1))).await.code, 0);
    let mut new = Raw::open(a2).await;
    assert_eq!(new.handshake(&Connect::v311("moving")).await.code, 0);
    assert_eq!(times_received(&mut sub, "moving", CROSS, settle).await, 1, "takeover");
    drop(old);
    drop(new);

    // Node 1 killed while a v5 and a 3.1.1 client with wills are connected to it: a
    // surviving node publishes each, once, within node_timeout_ms and a few seconds.
    let mut v5 = Raw::open(a1).await;
    assert_eq!(v5.handshake(&Connect::v5("dies5").will(Will::new("will/dies5", b"dies5", 1))).await.code, 0);
    let mut v3 = Raw::open(a1).await;
    assert_eq!(v3.handshake(&Connect::v311("dies3").will(Will::new("will/dies3", b"dies3", 1))).await.code, 0);
    let t0 = Instant::now();
    tern[0].kill();
    let got = collect(&mut sub, true, Duration::from_secs(10), |g| has(g, "dies5") && has(g, "dies3")).await;
    eprintln!("wills of the killed node received after {:?}", t0.elapsed());
    let mut c = counts(&got);
    let end = Instant::now() + settle;
    while let Some(m) = next_pub(&mut sub, true, end.saturating_duration_since(Instant::now())).await {
        *c.entry(String::from_utf8_lossy(&m.payload).into_owned()).or_default() += 1;
    }
    assert_eq!((c.get("dies5"), c.get("dies3")), (Some(&1), Some(&1)), "{c:?}");
    drop(v5);
    drop(v3);
    drop(tern);
}

/// A QoS 0 burst from publishers on one node to a subscriber on another that reads: nothing
/// is lost. The sending node pauses its publishers' input while too much waits for NATS, and
/// the receiving node waits for room in the subscriber's queue (reading on from NATS) instead
/// of dropping what no one there can slow down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qos0_burst_across_nodes_is_slowed_down_not_dropped() {
    let Some(nats) = tokio::task::spawn_blocking(|| NatsCluster::start(3)).await.expect("nats start") else { return };
    let urls = nats.urls();
    let tern = nodes("burst", |_| urls.clone()).await;
    let (n1, n2) = (tern[0].addr(), tern[1].addr());
    let mut sub = subscriber(n2, "burst-sub", false, &[("burst/#", 0)]).await;
    // Until node 1 knows of the subscription (NATS interest travels between servers).
    let mut probe = client(n1, "burst-probe", false).await;
    let t0 = Instant::now();
    loop {
        probe.send(&publish("burst/probe", b"probe", 0, 0)).await;
        if next_pub(&mut sub, false, Duration::from_millis(200)).await.is_some() {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(20), "node 2's subscription never reached node 1");
    }
    while next_pub(&mut sub, false, Duration::from_millis(300)).await.is_some() {}

    const PUBS: usize = 4;
    const EACH: usize = 10_000;
    let mut senders = Vec::new();
    for p in 0..PUBS {
        let mut c = client(n1, &format!("burst-pub-{p}"), false).await;
        senders.push(tokio::spawn(async move {
            // As fast as the socket takes it: 500 publishes per write.
            for chunk in (0..EACH).collect::<Vec<_>>().chunks(500) {
                let mut bytes = Vec::new();
                for i in chunk {
                    bytes.extend(publish(&format!("burst/{p}"), format!("{i}").as_bytes(), 0, 0));
                }
                c.send(&bytes).await;
            }
            c
        }));
    }
    let mut next = [0usize; PUBS];
    let mut received = 0;
    let deadline = Instant::now() + Duration::from_secs(90);
    while received < PUBS * EACH {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "{received} of {} received; next expected per publisher {next:?}", PUBS * EACH);
        let Some(m) = next_pub(&mut sub, false, left.min(Duration::from_secs(5))).await else { continue };
        let Some(p) = m.topic.strip_prefix("burst/").and_then(|p| p.parse::<usize>().ok()) else { continue };
        let i: usize = String::from_utf8_lossy(&m.payload).parse().expect("payload is a number");
        assert_eq!(i, next[p], "publisher {p}: a message lost or out of order after {received} received");
        next[p] += 1;
        received += 1;
    }
    for s in senders {
        s.await.expect("sender");
    }
    drop(tern);
}
