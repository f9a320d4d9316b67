//! Bridges over TLS between two tern brokers in one process: the peer's certificate verified
//! against `tls.ca_file` (by the address's IP, or by `server_name`), QoS 1 both ways, a client
//! certificate for a peer that requires one, `insecure`, and the refusals: a certificate from
//! another CA, a name that does not match, no client certificate. A refused bridge's attempts
//! are seen through a TCP relay in front of the peer, so no test sleeps for a fixed time.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::tls::TestPki;
use common::*;
use tern::config::{Bridge, BridgeDirection, BridgeProtocol, BridgeTls, BridgeTopic, Listener, ListenerKind, Tls};
use tokio::sync::mpsc;

/// A broker with a plain listener (for the test's clients) and a TLS one (for bridges).
struct Remote {
    _handle: tern::BrokerHandle,
    plain: SocketAddr,
    tls: SocketAddr,
    _dir: tempfile::TempDir,
}

async fn remote(tls: Tls) -> Remote {
    let dir = tempfile::tempdir().expect("tempdir");
    let listener = vec![Listener::tcp("127.0.0.1:0"), Listener::with_tls("127.0.0.1:0", ListenerKind::Tls, tls)];
    let storage = tern::config::Storage { dir: dir.path().to_path_buf(), ..Default::default() };
    let c = tern::Config { listener, storage, ..Default::default() };
    let handle = tern::start(c).await.expect("start the remote broker");
    let (plain, tls) = (handle.local_addrs()[0], handle.local_addrs()[1]);
    Remote { _handle: handle, plain, tls, _dir: dir }
}

fn local_config(dir: &tempfile::TempDir, bridge: Bridge) -> tern::Config {
    let mut c = tern::Config::default();
    c.listener[0].bind = "127.0.0.1:0".into();
    c.storage.dir = dir.path().to_path_buf();
    c.bridge = vec![bridge];
    c
}

/// A broker with `bridge`.
async fn local(bridge: Bridge) -> (tern::BrokerHandle, SocketAddr, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let handle = tern::start(local_config(&dir, bridge)).await.expect("start the local broker");
    let addr = handle.local_addr();
    (handle, addr, dir)
}

fn topic(pattern: &str, direction: BridgeDirection) -> BridgeTopic {
    BridgeTopic {
        pattern: pattern.into(),
        direction,
        qos: 1,
        local_prefix: String::new(),
        remote_prefix: String::new(),
    }
}

fn ca_only(ca_file: std::path::PathBuf) -> BridgeTls {
    BridgeTls { ca_file, cert_file: None, key_file: None, server_name: None, insecure: false }
}

/// Bridge `name` to `to` over TLS: `up/#` goes out, `down/#` comes in, QoS 1.
fn bridge(name: &str, to: SocketAddr, tls: BridgeTls) -> Bridge {
    Bridge {
        name: name.into(),
        addresses: vec![to.to_string()],
        protocol: BridgeProtocol::V5,
        client_id: None,
        clean_start: false,
        keepalive: 60,
        username: None,
        password: None,
        try_private: true,
        topics: vec![topic("up/#", BridgeDirection::Out), topic("down/#", BridgeDirection::In)],
        tls: Some(tls),
    }
}

/// A TCP relay to `to`: each connection through it is reported on the channel when it ends.
async fn relay(to: SocketAddr) -> (SocketAddr, mpsc::UnboundedReceiver<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("relay bind");
    let addr = listener.local_addr().expect("relay address");
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                if let Ok(mut outbound) = tokio::net::TcpStream::connect(to).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
                let _ = tx.send(());
            });
        }
    });
    (addr, rx)
}

/// Starts a broker with `bridge` (whose address is a relay in front of `to`) and checks that
/// its first `attempts` connections end without the bridge ever saying it is connected.
async fn never_connects(mut bridge: Bridge, to: SocketAddr, attempts: usize) {
    let (via, mut ended) = relay(to).await;
    bridge.addresses = vec![via.to_string()];
    let name = bridge.name.clone();
    let (_handle, addr, _dir) = local(bridge).await;
    let mut state = bridge_state_watch(addr, &name).await;
    assert_eq!(state.recv_publish().await.payload, b"0", "the bridge starts down");
    for n in 0..attempts {
        // Back-off: 1 s (±25 %) after the first failure, 2 s after the second.
        let ok = tokio::time::timeout(Duration::from_secs(10), ended.recv()).await;
        assert!(matches!(ok, Ok(Some(()))), "attempt {n} of bridge {name} did not end");
    }
    // Connected, it would have said `1` before its connection ended. (A second `0` may come:
    // the subscription can see the retained `0` and its live publish both.)
    loop {
        match state.next_event(QUIET).await {
            Event::Timeout => break,
            Event::Packet(p) => assert_ne!(parse_publish(&p, false).payload, b"1", "bridge {name} connected"),
            Event::Closed => panic!("state watcher closed"),
        }
    }
}

/// One QoS 1 message each way over the bridge `name` of the broker at `local`.
async fn forwards_both_ways(local: SocketAddr, remote: SocketAddr, name: &str) {
    bridge_connected(local, name).await;
    let mut at_remote = connect_v311(remote, &format!("{name}-r-sub")).await;
    at_remote.subscribe(1, "up/#", 1).await;
    let mut at_local = connect_v311(local, &format!("{name}-l-sub")).await;
    at_local.subscribe(1, "down/#", 1).await;
    let mut lp = connect_v311(local, &format!("{name}-l-pub")).await;
    let mut rp = connect_v311(remote, &format!("{name}-r-pub")).await;

    lp.publish("up/t", b"from local", 1, 1).await;
    let m = at_remote.recv_publish_ack().await;
    assert_eq!((m.topic.as_str(), &m.payload[..], m.qos), ("up/t", &b"from local"[..], 1));
    rp.publish("down/t", b"from remote", 1, 1).await;
    let m = at_local.recv_publish_ack().await;
    assert_eq!((m.topic.as_str(), &m.payload[..], m.qos), ("down/t", &b"from remote"[..], 1));
    at_remote.expect_silence(QUIET).await;
}

/// The peer's certificate names 127.0.0.1 (an IP SAN), the address connected to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos1_both_ways_with_the_peer_verified_by_ca_file() {
    let pki = TestPki::new();
    let r = remote(pki.server_tls()).await;
    let (_handle, addr, _dir) = local(bridge("tls", r.tls, ca_only(pki.ca_path()))).await;
    forwards_both_ways(addr, r.plain, "tls").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_certificate_from_another_ca_is_refused_and_retried() {
    let pki = TestPki::new();
    let other = TestPki::new();
    let r = remote(pki.server_tls()).await;
    // Two attempts: the first refused, the next after the back-off, refused again.
    never_connects(bridge("wrong-ca", r.tls, ca_only(other.ca_path())), r.tls, 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_requiring_a_client_certificate_gets_the_bridges() {
    let pki = TestPki::new();
    let mut server = pki.server_tls();
    server.client_ca = Some(pki.ca_path());
    server.require_client_cert = true;
    let r = remote(server).await;

    never_connects(bridge("no-cert", r.tls, ca_only(pki.ca_path())), r.tls, 1).await;

    let (cert, key) = pki.client_cert("bridge-mtls");
    let tls = BridgeTls { cert_file: Some(cert), key_file: Some(key), ..ca_only(pki.ca_path()) };
    let (_handle, addr, _dir) = local(bridge("mtls", r.tls, tls)).await;
    forwards_both_ways(addr, r.plain, "mtls").await;
}

/// The peer's certificate is for `localhost` only; the bridge connects to 127.0.0.1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_name_is_checked_instead_of_the_address() {
    let pki = TestPki::new();
    let r = remote(pki.server_tls_for("localhost")).await;

    never_connects(bridge("by-ip", r.tls, ca_only(pki.ca_path())), r.tls, 1).await;

    let named = BridgeTls { server_name: Some("localhost".into()), ..ca_only(pki.ca_path()) };
    let (_h1, addr, _d1) = local(bridge("named", r.tls, named)).await;
    forwards_both_ways(addr, r.plain, "named").await;

    // insecure: any name, but still a certificate from the CA.
    let insecure = BridgeTls { insecure: true, ..ca_only(pki.ca_path()) };
    let (_h2, addr, _d2) = local(bridge("insecure", r.tls, insecure)).await;
    bridge_connected(addr, "insecure").await;
    let other = TestPki::new();
    let insecure_other_ca = BridgeTls { insecure: true, ..ca_only(other.ca_path()) };
    never_connects(bridge("insecure-other-ca", r.tls, insecure_other_ca), r.tls, 1).await;
}

#[tokio::test]
async fn unusable_bridge_certificates_stop_the_start() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let to: SocketAddr = "127.0.0.1:8883".parse().expect("address");

    let missing = pki.dir.path().join("no-such-ca.crt");
    let err = tern::start(local_config(&dir, bridge("b", to, ca_only(missing)))).await.err().expect("refused");
    let msg = err.to_string();
    assert!(msg.contains("no-such-ca.crt") && msg.contains("bridge[0].tls.ca_file"), "{msg}");

    let (cert, _) = pki.client_cert("half");
    let half = BridgeTls { cert_file: Some(cert), ..ca_only(pki.ca_path()) };
    let err = tern::start(local_config(&dir, bridge("b", to, half))).await.err().expect("refused");
    let msg = err.to_string();
    assert!(msg.contains("bridge[0].tls.key_file") && msg.contains("cert_file"), "{msg}");

    let key_as_ca = ca_only(pki.server_key_path());
    let err = tern::start(local_config(&dir, bridge("b", to, key_as_ca))).await.err().expect("refused");
    let msg = err.to_string();
    assert!(msg.contains("server.key") && msg.contains("bridge[0].tls.ca_file"), "{msg}");
}
