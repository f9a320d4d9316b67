//! Bridges between tern brokers in one process (each on its own port and data directory):
//! topic mapping in every direction, no echo, store-and-forward while the peer is down, a
//! full mesh delivering each message once, and the state topic.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use tern::config::{Bridge, BridgeDirection, BridgeProtocol, BridgeTopic};

struct Node {
    handle: Option<tern::BrokerHandle>,
    addr: SocketAddr,
    dir: tempfile::TempDir,
    bridges: Vec<Bridge>,
}

impl Node {
    async fn start(bridges: Vec<Bridge>) -> Node {
        let dir = tempfile::tempdir().expect("tempdir");
        let handle = tern::start(config(&dir, 0, bridges.clone())).await.expect("start");
        let addr = handle.local_addr();
        Node { handle: Some(handle), addr, dir, bridges }
    }

    async fn stop(&mut self) {
        if let Some(h) = self.handle.take() {
            h.shutdown().await.expect("clean stop");
        }
    }

    async fn restart(&mut self) {
        self.stop().await;
        let h = tern::start(config(&self.dir, self.addr.port(), self.bridges.clone())).await.expect("restart");
        self.handle = Some(h);
    }
}

fn config(dir: &tempfile::TempDir, port: u16, bridge: Vec<Bridge>) -> tern::Config {
    let mut c = tern::Config::default();
    c.listener[0].bind = format!("127.0.0.1:{port}");
    c.storage.dir = dir.path().to_path_buf();
    c.bridge = bridge;
    c
}

fn topic(pattern: &str, direction: BridgeDirection, local: &str, remote: &str) -> BridgeTopic {
    BridgeTopic { pattern: pattern.into(), direction, qos: 1, local_prefix: local.into(), remote_prefix: remote.into() }
}

fn bridge(name: &str, to: SocketAddr, protocol: BridgeProtocol, topics: Vec<BridgeTopic>) -> Bridge {
    Bridge::new(name, &to.to_string(), protocol, topics)
}

async fn subscriber(addr: SocketAddr, id: &str, filter: &str) -> Raw {
    let (mut s, _) = connect_with(addr, &Connect::v311(id).clean(false)).await;
    s.subscribe(1, filter, 1).await;
    s
}

/// Receives PUBLISHes (acknowledging them) until `quiet` passes without one.
async fn drain(s: &mut Raw, quiet: Duration) -> Vec<(String, Vec<u8>)> {
    let mut got = Vec::new();
    loop {
        match s.next_event(quiet).await {
            Event::Packet(p) if p[0] >> 4 == 3 => {
                let m = parse_publish(&p, false);
                s.ack(&m).await;
                got.push((m.topic, m.payload));
            }
            Event::Packet(_) => {}
            Event::Timeout => return got,
            Event::Closed => panic!("subscriber closed"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_in_and_both_with_prefixes_and_no_echo() {
    for protocol in [BridgeProtocol::V5, BridgeProtocol::V311] {
        let remote = Node::start(vec![]).await;
        let topics = vec![
            topic("sensors/#", BridgeDirection::Out, "site/", "cloud/site1/"),
            topic("cmd/#", BridgeDirection::In, "", "cloud/site1/"),
            topic("shared/#", BridgeDirection::Both, "", ""),
        ];
        let local = Node::start(vec![bridge("up", remote.addr, protocol, topics)]).await;
        bridge_connected(local.addr, "up").await;
        let mut at_remote = subscriber(remote.addr, "r-sub", "#").await;
        let mut at_local = subscriber(local.addr, "l-sub", "#").await;
        let mut lp = connect_v311(local.addr, "l-pub").await;
        let mut rp = connect_v311(remote.addr, "r-pub").await;

        lp.publish("site/sensors/t1", b"21.5", 1, 1).await;
        rp.publish("cloud/site1/cmd/lamp", b"on", 1, 1).await;
        lp.publish("shared/a", b"from-local", 1, 2).await;
        rp.publish("shared/b", b"from-remote", 1, 2).await;
        lp.publish("site/other", b"not bridged", 1, 3).await;

        let mut r: Vec<_> = drain(&mut at_remote, Duration::from_millis(800)).await;
        let mut l: Vec<_> = drain(&mut at_local, Duration::from_millis(800)).await;
        r.retain(|(t, _)| !t.starts_with('$'));
        l.retain(|(t, _)| !t.starts_with('$'));
        r.sort();
        l.sort();
        let s = |t: &str, p: &str| (t.to_string(), p.as_bytes().to_vec());
        assert_eq!(
            r,
            vec![
                s("cloud/site1/cmd/lamp", "on"),
                s("cloud/site1/sensors/t1", "21.5"),
                s("shared/a", "from-local"),
                s("shared/b", "from-remote")
            ],
            "{protocol:?}: at the remote, each once"
        );
        assert_eq!(
            l,
            vec![
                s("cmd/lamp", "on"),
                s("shared/a", "from-local"),
                s("shared/b", "from-remote"),
                s("site/other", "not bridged"),
                s("site/sensors/t1", "21.5")
            ],
            "{protocol:?}: at the local broker, each once (no echo)"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos1_published_while_the_peer_is_down_arrives_after_it_returns_and_after_a_local_restart() {
    let mut remote = Node::start(vec![]).await;
    let sub = subscriber(remote.addr, "far-sub", "fwd/#").await;
    sub.disconnect().await;
    let mut local = Node::start(vec![bridge(
        "fwd",
        remote.addr,
        BridgeProtocol::V5,
        vec![topic("fwd/#", BridgeDirection::Out, "", "")],
    )])
    .await;
    bridge_connected(local.addr, "fwd").await;
    remote.stop().await;

    const N: u16 = 200;
    let mut p = connect_v311(local.addr, "near-pub").await;
    for i in 0..N {
        p.publish("fwd/x", &i.to_be_bytes(), 1, i + 1).await;
    }
    p.disconnect().await;
    // The local broker restarts while the peer is still down: the queue is on its disk.
    local.restart().await;
    remote.restart().await;

    let (mut sub, _) = connect_with(remote.addr, &Connect::v311("far-sub").clean(false)).await;
    let mut got = Vec::new();
    while got.len() < N as usize {
        let m = sub.recv_publish_ack().await;
        got.push(u16::from_be_bytes([m.payload[0], m.payload[1]]));
    }
    assert_eq!(got, (0..N).collect::<Vec<_>>(), "every message, once, in order");
    sub.expect_silence(QUIET).await;
}

/// Messages queued for the peer while it is down do not cut the back-off short: each used to
/// end the wait, so a stream of them made as many connection attempts, and the back-off, grown
/// by them all, then kept the bridge away for a minute once the peer was back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishing_while_the_peer_is_down_keeps_the_back_off_short() {
    let mut remote = Node::start(vec![]).await;
    let sub = subscriber(remote.addr, "far-sub", "fwd/#").await;
    sub.disconnect().await;
    let local = Node::start(vec![bridge(
        "fwd",
        remote.addr,
        BridgeProtocol::V5,
        vec![topic("fwd/#", BridgeDirection::Out, "", "")],
    )])
    .await;
    bridge_connected(local.addr, "fwd").await;
    remote.stop().await;
    let mut p = connect_v311(local.addr, "near-pub").await;
    for i in 0..20u16 {
        p.publish("fwd/x", &i.to_be_bytes(), 1, i + 1).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    remote.restart().await;
    // The bridge's next try is at most 1.25 + 2.5 + 5 s after the loss.
    let (mut sub, _) = connect_with(remote.addr, &Connect::v311("far-sub").clean(false)).await;
    let mut got = Vec::new();
    while got.len() < 20 {
        let p = sub.read_packet_within(Duration::from_secs(15)).await;
        let m = parse_publish(&p, false);
        sub.ack(&m).await;
        got.push(u16::from_be_bytes([m.payload[0], m.payload[1]]));
    }
    assert_eq!(got, (0..20).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_mesh_of_three_delivers_each_message_once_per_subscriber() {
    let c = Node::start(vec![]).await;
    let b =
        Node::start(vec![bridge("bc", c.addr, BridgeProtocol::V5, vec![topic("#", BridgeDirection::Both, "", "")])])
            .await;
    let a = Node::start(vec![
        bridge("ab", b.addr, BridgeProtocol::V5, vec![topic("#", BridgeDirection::Both, "", "")]),
        bridge("ac", c.addr, BridgeProtocol::V5, vec![topic("#", BridgeDirection::Both, "", "")]),
    ])
    .await;
    bridge_connected(b.addr, "bc").await;
    bridge_connected(a.addr, "ab").await;
    bridge_connected(a.addr, "ac").await;
    let nodes = [("a", a.addr), ("b", b.addr), ("c", c.addr)];
    let mut subs = Vec::new();
    for (n, addr) in nodes {
        subs.push((n, subscriber(addr, &format!("mesh-sub-{n}"), "mesh/#").await));
    }
    for (n, addr) in nodes {
        let mut p = connect_v311(addr, &format!("mesh-pub-{n}")).await;
        p.publish(&format!("mesh/{n}"), n.as_bytes(), 1, 1).await;
    }
    for (n, s) in &mut subs {
        let got = drain(s, Duration::from_millis(1500)).await;
        let mut count: HashMap<String, usize> = HashMap::new();
        for (t, _) in got {
            *count.entry(t).or_default() += 1;
        }
        let want: HashMap<String, usize> = ["mesh/a", "mesh/b", "mesh/c"].iter().map(|t| (t.to_string(), 1)).collect();
        assert_eq!(count, want, "subscriber on {n}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_state_topic_shows_an_outage() {
    let mut remote = Node::start(vec![]).await;
    let local = Node::start(vec![bridge(
        "watch",
        remote.addr,
        BridgeProtocol::V311,
        vec![topic("w/#", BridgeDirection::Out, "", "")],
    )])
    .await;
    bridge_connected(local.addr, "watch").await;
    let mut s = connect_v311(local.addr, "state-sub").await;
    s.send(&subscribe_pkt(false, 1, &[("$SYS/broker/connection/watch/state", 0)])).await;
    remote.stop().await;
    let mut states = Vec::new();
    while states.last().map(Vec::as_slice) != Some(b"0".as_slice()) {
        let p = s.read_packet_within(Duration::from_secs(10)).await;
        if p[0] >> 4 == 3 {
            states.push(parse_publish(&p, false).payload);
        }
    }
    remote.restart().await;
    while states.last().map(Vec::as_slice) != Some(b"1".as_slice()) {
        let p = s.read_packet_within(Duration::from_secs(20)).await;
        if p[0] >> 4 == 3 {
            states.push(parse_publish(&p, false).payload);
        }
    }
}

/// A peer outage longer than the bridge's queue holds neither slows local publishers nor
/// stops the bridge: what is over the queue limit is dropped (and counted), the rest goes out
/// once the peer is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_over_the_queue_limit_neither_blocks_publishers_nor_stops_the_bridge() {
    let mut remote = Node::start(vec![]).await;
    let sub = subscriber(remote.addr, "far-sub", "fwd/#").await;
    sub.disconnect().await;
    let b = vec![bridge("small", remote.addr, BridgeProtocol::V5, vec![topic("fwd/#", BridgeDirection::Out, "", "")])];
    let dir = tempfile::tempdir().expect("tempdir");
    let mut c = config(&dir, 0, b);
    c.limits.max_queued_messages = 100;
    c.limits.slow_consumer_secs = 1;
    let local = tern::start(c).await.expect("start");
    bridge_connected(local.local_addr(), "small").await;
    remote.stop().await;
    let mut p = connect_v311(local.local_addr(), "fast-pub").await;
    let t0 = std::time::Instant::now();
    for i in 0..300u16 {
        p.publish("fwd/x", &i.to_be_bytes(), 1, i + 1).await;
    }
    assert!(
        t0.elapsed() < Duration::from_secs(3),
        "publisher slowed by a bridge whose peer is down: {:?}",
        t0.elapsed()
    );
    remote.restart().await;
    let (mut sub, _) = connect_with(remote.addr, &Connect::v311("far-sub").clean(false)).await;
    let mut got = Vec::new();
    while got.len() < 100 {
        let m = sub.recv_publish_ack().await;
        got.push(u16::from_be_bytes([m.payload[0], m.payload[1]]));
    }
    assert_eq!(got, (0..100).collect::<Vec<_>>(), "the first 100 (the queue limit), in order");
    sub.expect_silence(QUIET).await;
    local.shutdown().await.expect("stop");
}

/// A peer that accepts the bridge and then goes silent (a dead link): the bridge must give
/// it up 1.5 times its keep-alive after the peer's last packet, not only at its next ping.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_peer_is_given_up_after_one_and_a_half_keep_alives() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let peer = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let peer_addr = peer.local_addr().expect("addr");
    let mut b = bridge("mute", peer_addr, BridgeProtocol::V311, vec![topic("m/#", BridgeDirection::Out, "", "")]);
    b.keepalive = 2;
    let (acked_tx, acked_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (mut s, _) = peer.accept().await.expect("accept");
        let mut buf = [0u8; 1024];
        let _ = s.read(&mut buf).await; // CONNECT
        s.write_all(&[0x20, 0x02, 0x00, 0x00]).await.expect("CONNACK");
        let _ = acked_tx.send(std::time::Instant::now());
        // Reads (and ignores) the bridge's PINGREQs and never answers.
        while let Ok(n) = s.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    });
    let local = Node::start(vec![b]).await;
    let mut s = connect_v311(local.addr, "mute-state").await;
    s.send(&subscribe_pkt(false, 1, &[("$SYS/broker/connection/mute/state", 0)])).await;
    let acked_at = acked_rx.await.expect("the bridge connected");
    // Up (1), then down (0).
    let mut states = Vec::new();
    while !states.ends_with(&[b"1".to_vec(), b"0".to_vec()]) {
        let p = s.read_packet_within(Duration::from_secs(10)).await;
        if p[0] >> 4 == 3 {
            states.push(parse_publish(&p, false).payload);
        }
    }
    let after = acked_at.elapsed();
    // 3 s; checking only at ping times (every 2 s) gave it up after 4 s.
    assert!(after >= Duration::from_millis(2900) && after < Duration::from_millis(3700), "given up after {after:?}");
}

/// QoS 2 across the bridge while the peer restarts mid-stream (the bridge has messages in
/// flight at every stage of the handshake): each arrives exactly once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos2_across_a_peer_restart_mid_stream_arrives_exactly_once() {
    let mut remote = Node::start(vec![]).await;
    let (mut sub, _) = connect_with(remote.addr, &Connect::v311("q2-sub").clean(false)).await;
    sub.subscribe(1, "q2/#", 2).await;
    let mut t = topic("q2/#", BridgeDirection::Out, "", "");
    t.qos = 2;
    let local = Node::start(vec![bridge("q2", remote.addr, BridgeProtocol::V5, vec![t])]).await;
    bridge_connected(local.addr, "q2").await;

    const N: u16 = 400;
    let addr = local.addr;
    let publisher = tokio::spawn(async move {
        let mut p = connect_v311(addr, "q2-pub").await;
        for i in 0..N {
            p.publish("q2/x", &i.to_be_bytes(), 2, i + 1).await;
        }
        p.disconnect().await;
    });
    // A QoS 2 receiver as a client library is one: a PUBLISH whose id awaits PUBREL is
    // the same message again; the ids survive the reconnection.
    let mut got = Vec::new();
    let mut unreleased = std::collections::HashSet::new();
    async fn receive(s: &mut Raw, got: &mut Vec<u16>, unreleased: &mut std::collections::HashSet<u16>) {
        let p = s.read_packet_within(Duration::from_secs(20)).await;
        match p[0] >> 4 {
            3 => {
                let m = parse_publish(&p, false);
                let pid = m.pid.expect("QoS 2 has an id");
                if unreleased.insert(pid) {
                    got.push(u16::from_be_bytes([m.payload[0], m.payload[1]]));
                }
                s.send(&pubrec(pid)).await;
            }
            6 => {
                let pid = u16::from_be_bytes([p[2], p[3]]);
                unreleased.remove(&pid);
                s.send(&pubcomp(pid)).await;
            }
            _ => {}
        }
    }
    while got.len() < (N / 4) as usize {
        receive(&mut sub, &mut got, &mut unreleased).await;
    }
    drop(sub);
    remote.restart().await;
    publisher.await.expect("publisher");
    let (mut sub, _) = connect_with(remote.addr, &Connect::v311("q2-sub").clean(false)).await;
    while got.len() < N as usize || !unreleased.is_empty() {
        receive(&mut sub, &mut got, &mut unreleased).await;
    }
    assert_eq!(got, (0..N).collect::<Vec<_>>(), "every message exactly once, in order");
    sub.expect_silence(QUIET).await;
}

/// A bridge removed from the configuration leaves no session behind: nothing would ever drain
/// it, and it would keep queueing the bridge's topics up to the queue limits. A bridge still
/// configured keeps its session (and what waits in it) across the restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_bridge_leaves_no_session() {
    // A peer that is never there: the bridge only ever queues.
    let nowhere = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr")
    };
    let b = bridge("gone", nowhere, BridgeProtocol::V5, vec![topic("x/#", BridgeDirection::Out, "", "")]);
    let mut a = Node::start(vec![b]).await;
    let (mut p, _) = connect_with(a.addr, &Connect::v311("pub")).await;
    p.publish("x/1", b"for the peer", 1, 1).await;
    p.disconnect().await;
    // The publisher's clean session ends with its connection, a moment after the DISCONNECT.
    let running = a.handle.as_ref().expect("running");
    poll_until(WAIT, "only the bridge's session to be left", || running.session_count() == 1).await;
    a.restart().await;
    assert_eq!(a.handle.as_ref().expect("running").session_count(), 1, "kept while configured");

    a.bridges.clear();
    a.restart().await;
    assert_eq!(a.handle.as_ref().expect("running").session_count(), 0, "discarded once removed");
    a.restart().await;
    assert_eq!(a.handle.as_ref().expect("running").session_count(), 0, "and gone from the store");
    a.stop().await;
}

/// `$bridge/...` client ids are the bridges' own: a client may not take one (and with it a
/// bridge's session and messages).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bridge_client_ids_are_reserved() {
    let mut a = Node::start(Vec::new()).await;
    for (connect, code) in [(Connect::v5("$bridge/b1"), 0x85), (Connect::v311("$bridge/b1"), 0x02)] {
        let mut c = Raw::open(a.addr).await;
        let ack = c.handshake(&connect).await;
        assert_eq!(ack.code, code, "CONNACK of a $bridge/ id ({} is client identifier not valid / rejected)", code);
        c.expect_closed().await;
    }
    let (c, _) = connect_with(a.addr, &Connect::v311("$bridgeX")).await;
    c.disconnect().await;
    a.stop().await;
}
