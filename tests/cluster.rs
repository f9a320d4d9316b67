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
    let mut out = Vec::new();
    for i in 0..3 {
        let list: Vec<String> = urls(i).iter().map(|u| format!("\"{u}\"")).collect();
        let mut t = TernProcess::with_config(&format!(
            "\n[cluster]\nnats = [{}]\nnode = \"n{}\"\nname = \"{name}\"\nack_timeout_ms = 2000\n\
             replicas = 3\nmax_bytes = 67108864\n",
            list.join(", "),
            i + 1
        ));
        t.spawn(&[]);
        out.push(t);
    }
    // Started together: each waits for NATS and JetStream before it accepts.
    let t0 = Instant::now();
    for t in &out {
        while !t.accepts() {
            assert!(t0.elapsed() < Duration::from_secs(40), "tern node not accepting:\n{}", t.log());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    out
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
        pid += 1;
        assert!(t0.elapsed() < Duration::from_secs(40), "acks did not resume after NATS came back");
    }
    assert!(tern[0].log().contains("disconnected from NATS"), "the loss of NATS is logged");
    drop(tern);
}
