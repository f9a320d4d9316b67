//! Client id ownership across cluster nodes (issue 15): two in-process brokers, each one node
//! with its own NATS connection to a real `nats-server` (JetStream), claiming client ids in
//! the owners bucket. A CONNECT on node B for a client connected to node A takes it over: A's
//! client is closed (v5: DISCONNECT 0x8E) before B's CONNACK is sent.
//!
//! Skipped (with a message) when nats-server is not installed, except in CI.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::nats::NatsCluster;
use common::*;
use tern::ClusterOwners;
use tern::{Owner, Owners};

struct Node {
    broker: TestBroker,
    owners: Arc<Owners>,
    nats: async_nats::Client,
}

/// One nats-server and `n` tern nodes named a, b, c... None = skip.
async fn cluster(n: usize) -> Option<(NatsCluster, Vec<Node>)> {
    cluster_with(n, 1024).await
}

async fn cluster_with(n: usize, max_pending_claims: usize) -> Option<(NatsCluster, Vec<Node>)> {
    let nats = tokio::task::spawn_blocking(|| NatsCluster::start(1)).await.expect("nats start")?;
    let url = nats.urls()[0].clone();
    let mut nodes = Vec::new();
    for i in 0..n {
        let broker = start().await;
        let client = async_nats::connect(url.as_str()).await.expect("NATS connection");
        let node = ((b'a' + i as u8) as char).to_string();
        let owners = broker
            .handle
            .start_cluster_owners(client.clone(), &node, "tern", 1, max_pending_claims)
            .await
            .expect("owners start");
        nodes.push(Node { broker, owners, nats: client });
    }
    Some((nats, nodes))
}

async fn owner_of(node: &Node, id: &str) -> Option<Owner> {
    node.owners.owner_of(id).await.expect("owners bucket readable")
}

/// Polls the bucket until `id`'s owner is `node` (None: nobody), within `WAIT`.
async fn wait_owner(reader: &Node, id: &str, node: Option<&str>) -> Option<Owner> {
    let t0 = Instant::now();
    loop {
        let o = owner_of(reader, id).await;
        if o.as_ref().map(|o| o.node.as_str()) == node {
            return o;
        }
        assert!(t0.elapsed() < WAIT, "owner of {id} is {o:?}, expected node {node:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn connect_on_another_node_takes_a_v5_client_over_with_0x8e_first() {
    let Some((_nats, nodes)) = cluster(2).await else { return };
    let (a, b) = (&nodes[0], &nodes[1]);
    let (mut first, _) = connect_with(a.broker.addr, &Connect::v5("dev-1").expiry(0)).await;
    first.ping().await;
    wait_owner(a, "dev-1", Some("a")).await;

    let (_second, ack) = connect_with(b.broker.addr, &Connect::v5("dev-1")).await;
    assert_eq!(ack.code, 0);
    // Node a writes the DISCONNECT before it answers b, and b sends CONNACK only after that
    // answer: over loopback, the DISCONNECT is in the first client's socket already.
    let t0 = Instant::now();
    first.expect_disconnect(0x8E).await;
    assert!(t0.elapsed() < Duration::from_millis(200), "DISCONNECT came {:?} after the CONNACK", t0.elapsed());
    let o = wait_owner(b, "dev-1", Some("b")).await.expect("owner");
    assert_ne!(o.nonce, 0);
}

#[tokio::test]
async fn connect_on_another_node_closes_a_v311_client_first() {
    let Some((_nats, nodes)) = cluster(2).await else { return };
    let (a, b) = (&nodes[0], &nodes[1]);
    let mut first = connect_v311(a.broker.addr, "dev-311").await;
    first.ping().await;

    let mut second = connect_v311(b.broker.addr, "dev-311").await;
    // 3.1.1 has no DISCONNECT from the server: the first client's connection just closes,
    // before the second's CONNACK.
    let took = first.expect_closed_within(Duration::from_millis(200)).await;
    assert!(took < Duration::from_millis(200));
    second.ping().await;
    wait_owner(a, "dev-311", Some("b")).await;
}

#[tokio::test]
async fn reconnect_on_the_same_node_keeps_ownership_and_disconnect_frees_it() {
    let Some((_nats, nodes)) = cluster(1).await else { return };
    let a = &nodes[0];
    let (mut first, _) = connect_with(a.broker.addr, &Connect::v5("dev-2")).await;
    let n1 = wait_owner(a, "dev-2", Some("a")).await.expect("owner").nonce;
    let (second, _) = connect_with(a.broker.addr, &Connect::v5("dev-2")).await;
    first.expect_disconnect(0x8E).await;
    let t0 = Instant::now();
    let n2 = loop {
        let o = owner_of(a, "dev-2").await.expect("still owned");
        if o.nonce != n1 {
            break o.nonce;
        }
        assert!(t0.elapsed() < WAIT, "nonce not renewed by the reconnect");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(owner_of(a, "dev-2").await.map(|o| (o.node, o.nonce)), Some(("a".into(), n2)));
    // The first connection's end (after the takeover) must not have freed the second's key.
    second.disconnect().await;
    wait_owner(a, "dev-2", None).await;
}

#[tokio::test]
async fn concurrent_connects_on_two_nodes_leave_exactly_one_client() {
    let Some((_nats, nodes)) = cluster(2).await else { return };
    for round in 0..5 {
        let id = format!("race-{round}");
        let c = Connect::v5(&id);
        let (mut ra, mut rb) = (Raw::open(nodes[0].broker.addr).await, Raw::open(nodes[1].broker.addr).await);
        let (ack_a, ack_b) = tokio::join!(ra.handshake(&c), rb.handshake(&c));
        for ack in [&ack_a, &ack_b] {
            assert!(ack.code == 0 || ack.code == 0x88, "CONNACK {ack:?}");
        }
        assert!(ack_a.code == 0 || ack_b.code == 0, "both refused");
        // The loser (if it was accepted at all) is closed with 0x8E; the winner stays.
        let mut alive = Vec::new();
        for (name, raw, ack) in [("a", &mut ra, &ack_a), ("b", &mut rb, &ack_b)] {
            if ack.code != 0 {
                continue;
            }
            raw.send(&common::PINGREQ).await;
            match raw.next_event(WAIT).await {
                Event::Packet(p) if p == common::PINGRESP => alive.push(name),
                Event::Packet(p) => {
                    let (h, body) = split_packet(&p);
                    assert_eq!((h, body.first().copied()), (0xE0, Some(0x8E)), "{}", hex(&p));
                }
                Event::Closed => {}
                Event::Timeout => panic!("no answer from node {name}"),
            }
        }
        assert_eq!(alive.len(), 1, "round {round}: clients alive on {alive:?}");
        wait_owner(&nodes[0], &id, Some(alive[0])).await;
    }
}

#[tokio::test]
async fn a_dead_owner_is_taken_over_within_the_bound() {
    let Some((_nats, nodes)) = cluster(2).await else { return };
    let (a, b) = (&nodes[0], &nodes[1]);
    let _first = connect_v5(a.broker.addr, "orphan").await;
    wait_owner(b, "orphan", Some("a")).await;
    // Node a loses NATS: nobody answers its release subject any more.
    a.nats.drain().await.expect("drain");
    let t0 = Instant::now();
    let (mut second, _) = connect_with(b.broker.addr, &Connect::v5("orphan")).await;
    assert!(t0.elapsed() < Duration::from_secs(5), "takeover from a dead node took {:?}", t0.elapsed());
    second.ping().await;
    wait_owner(b, "orphan", Some("b")).await;
}

#[tokio::test]
async fn a_stale_release_does_not_delete_a_newer_owner() {
    let Some((_nats, nodes)) = cluster(2).await else { return };
    let (a, b) = (&nodes[0], &nodes[1]);
    // Node a holds the id without a connection (as between claim and attach).
    let n1 = a.owners.claim("shared-id").await.expect("claim on a");
    let claim_b = {
        let owners = Arc::clone(&b.owners);
        tokio::spawn(async move { owners.claim("shared-id").await })
    };
    // b's request revokes a's claim; a lets go as its connection would.
    poll_until(WAIT, "a's claim revoked", || !a.owners.holds("shared-id", n1)).await;
    let t0 = Instant::now();
    a.owners.released("shared-id", n1);
    let n2 = claim_b.await.expect("join").expect("claim on b");
    assert!(t0.elapsed() < Duration::from_secs(1), "b waited {:?} after a released", t0.elapsed());
    // a's release came from a revoked claim, and again late: b's key stays.
    a.owners.released("shared-id", n1);
    tokio::time::sleep(QUIET).await;
    assert_eq!(owner_of(a, "shared-id").await, Some(Owner { node: "b".into(), nonce: n2, id: None }));

    // On one node: a second claim replaces the first; the first's release leaves the key.
    let m1 = a.owners.claim("local-id").await.expect("first claim");
    let m2 = a.owners.claim("local-id").await.expect("second claim");
    a.owners.released("local-id", m1);
    tokio::time::sleep(QUIET).await;
    assert_eq!(owner_of(a, "local-id").await.map(|o| o.nonce), Some(m2));
    a.owners.released("local-id", m2);
    wait_owner(a, "local-id", None).await;
}

#[tokio::test]
async fn long_client_ids_are_owned_by_their_hash() {
    let Some((_nats, nodes)) = cluster(2).await else { return };
    let id = "L".repeat(5_000);
    let mut first = connect_with(nodes[0].broker.addr, &Connect::v311(&id)).await.0;
    let o = wait_owner(&nodes[1], &id, Some("a")).await.expect("owner");
    assert_eq!(o.id.as_deref(), Some(id.as_str()), "a hashed key keeps the whole id in its value");
    let _second = connect_with(nodes[1].broker.addr, &Connect::v311(&id)).await;
    first.expect_closed().await;
    wait_owner(&nodes[0], &id, Some("b")).await;
}

#[tokio::test]
async fn claims_past_max_pending_are_refused_with_server_unavailable() {
    let Some((_nats, nodes)) = cluster_with(2, 1).await else { return };
    let (a, b) = (&nodes[0], &nodes[1]);
    // Node a holds "slow" without a connection: b's claim of it waits for a's answer, which
    // comes only when a lets go (here, after its bound).
    let n1 = a.owners.claim("slow").await.expect("claim on a");
    let mut slow = Raw::open(b.broker.addr).await;
    slow.send(&Connect::v5("slow").bytes()).await;
    poll_until(WAIT, "b's claim reached a", || !a.owners.holds("slow", n1)).await;
    // The one claim b may have in progress is taken: another CONNECT is refused at once.
    let mut v5 = Raw::open(b.broker.addr).await;
    assert_eq!(v5.handshake(&Connect::v5("other")).await.code, 0x88, "v5: Server unavailable");
    let mut v3 = Raw::open(b.broker.addr).await;
    assert_eq!(v3.handshake(&Connect::v311("other")).await.code, 0x03, "3.1.1: Server unavailable");
    assert_eq!(b.owners.stats.refused_busy.load(std::sync::atomic::Ordering::Relaxed), 2);
    a.owners.released("slow", n1);
    let ack = parse_connack(&slow.read_packet().await, true);
    assert_eq!(ack.code, 0);
    // With the claim done, b accepts again.
    connect_v5(b.broker.addr, "other").await.ping().await;
}

#[tokio::test]
async fn connect_is_refused_while_nats_is_unreachable() {
    let Some((mut nats, nodes)) = cluster(1).await else { return };
    let a = &nodes[0];
    connect_v5(a.broker.addr, "before").await.ping().await;
    nats.kill(0);
    // Ownership cannot be checked: serving the client could serve it twice in the cluster.
    let t0 = Instant::now();
    let mut v5 = Raw::open(a.broker.addr).await;
    assert_eq!(v5.handshake(&Connect::v5("during")).await.code, 0x88);
    let mut v3 = Raw::open(a.broker.addr).await;
    assert_eq!(v3.handshake(&Connect::v311("during")).await.code, 0x03);
    assert!(t0.elapsed() < Duration::from_secs(8), "refusals took {:?}", t0.elapsed());
    assert!(a.owners.stats.refused_unavailable.load(std::sync::atomic::Ordering::Relaxed) >= 2);
}
