//! Bridges (`[[bridge]]`): tern connects to a peer broker as an MQTT client and forwards
//! messages both ways, with the meaning of mosquitto's `connection`/`address`/`topic` lines.
//!
//! Owns the peer connection (connect with fail-over and jittered back-off, keep-alive, the
//! QoS handshakes with the peer), the topic mapping, loop prevention and the bridge's state
//! topic. Its local side is an ordinary session (`$bridge/<name>`, persistent, never
//! expiring) driven through a session link while the peer is connected, and away (its
//! queue on disk, within the queue limits, local publishers not slowed) while it is not:
//! only the peer's acknowledgement removes a message, so QoS 1/2 messages for the peer
//! survive the peer being down and tern being restarted or killed. What comes in is
//! acknowledged to the peer only once stored here.
//!
//! Loops: the local subscriptions have No Local (what the bridge brings in never goes back
//! out through it); v5 peer subscriptions have No Local and Retain As Published; 3.1.1
//! bridges announce themselves (protocol level | 0x80) as mosquitto does. A message that
//! crossed a bridge is not passed over another (split horizon): it carries a user property
//! (`tern-hop`, set on what a bridge sends and on what it brings in, so v5 subscribers see
//! it), and locally its publisher is a bridge (`$bridge/...`); so a triangle or full mesh of
//! tern brokers delivers each message once per subscriber. A chain (A to B to C) therefore
//! does not relay from A to C: bridge A to C directly.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use bytestring::ByteString;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tracing::{debug, info, warn};

use crate::auth::Principal;
use crate::broker::{signal, Broker, Replicated, EXPIRY_NEVER};
use crate::config::{Bridge as BridgeConfig, BridgeProtocol};
use crate::link::{Link, Outbox, RetainedCollector, Routed, Written};
use crate::message::Message;
use crate::protocol::{
    self, reason, topic, Connect, Packet, Properties, ProtocolVersion, PubResp, Publish, PublishOut, QoS, Subscribe,
    SubscriptionOptions,
};
use crate::session::{Ack, Delivery};
use crate::transport::tls_client::TlsConnector;

/// User property a bridge puts on what it sends, so the peer's bridges do not pass it on.
const HOP_KEY: &str = "tern-hop";
/// The same property as encoded among a message's v5 properties.
const HOP_ENCODED: &[u8] = &[0x26, 0x00, 0x08, b't', b'e', b'r', b'n', b'-', b'h', b'o', b'p', 0x00, 0x01, b'1'];
/// Client ids of bridges' local sessions start with this.
use crate::broker::BRIDGE_SESSION_PREFIX as LOCAL_PREFIX;
/// Longest wait for the peer to accept the TCP connection or to answer CONNECT.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// While connected to a fail-over address, how often the first address is tried again.
const PRIMARY_PROBE: Duration = Duration::from_secs(60);
/// Largest packet taken from the peer.
const MAX_PACKET: usize = 256 * 1024 * 1024;

/// Starts every configured bridge; `tls` has each bridge's TLS client configuration, in
/// order (None: plain TCP).
pub(crate) fn start_all(broker: &Arc<Broker>, tls: Vec<Option<Arc<TlsConnector>>>) {
    let names: Vec<&str> = broker.config.bridge.iter().map(|b| b.name.as_str()).collect();
    broker.discard_stale_bridge_sessions(&names);
    for (cfg, tls) in broker.config.bridge.iter().zip(tls) {
        let broker = Arc::clone(broker);
        let cfg = cfg.clone();
        tokio::spawn(async move { run(broker, cfg, tls).await });
    }
}

/// The state topic mosquitto uses: `1` while connected, `0` otherwise (retained); also shown
/// by the broker's reporters (`tern_bridge_up`, the status page).
fn publish_state(broker: &Broker, name: &str, up: bool) {
    broker.metrics.set_bridge(name, up);
    let msg = Message::received(
        ByteString::from(format!("$SYS/broker/connection/{name}/state")),
        Bytes::from_static(if up { b"1" } else { b"0" }),
        QoS::AtLeastOnce,
        true,
        Properties::default(),
        ByteString::from(format!("{LOCAL_PREFIX}{name}")),
    );
    broker.publish(Arc::new(msg), None);
}

/// How a connection to the peer ended.
enum Ended {
    /// Lost, refused or timed out: try again after a back-off.
    Failed(String),
    /// The first address is reachable again: reconnect there now.
    BackToPrimary,
    /// The broker is stopping, or the local session was taken over: the bridge stops.
    Stop,
}

async fn run(broker: Arc<Broker>, cfg: BridgeConfig, tls: Option<Arc<TlsConnector>>) {
    let local = Local::new(&cfg);
    // What goes out: the local side of every `out`/`both` topic, No Local so that nothing
    // this bridge brought in goes back, retained as published (the peer keeps them retained).
    {
        let link = local.attach(&broker);
        let mut retained = RetainedCollector::new(None);
        for t in cfg.topics.iter().filter(|t| t.direction.outward()) {
            let filter = ByteString::from(format!("{}{}", t.local_prefix, t.pattern));
            let opts = SubscriptionOptions {
                qos: QoS::from_u8(t.qos).unwrap_or(QoS::AtMostOnce),
                no_local: true,
                retain_as_published: true,
                // Retained messages go out once, when the bridge is first set up.
                retain_handling: 1,
            };
            if let Err(code) = link.subscribe(&filter, opts, None, &mut retained) {
                warn!(bridge = %cfg.name, filter = %filter, code, "bridge may not subscribe here (ACL); topic not forwarded");
            }
        }
        if let Some(batch) = retained.finish() {
            link.queue_retained(*batch);
        }
        // While the peer is away the local session is away too: what is for the peer waits
        // on disk within the queue limits, and local publishers are not slowed by it.
        link.detach(EXPIRY_NEVER);
    }
    publish_state(&broker, &cfg.name, false);
    let mut private = cfg.try_private && cfg.protocol == BridgeProtocol::V311;
    let mut failures = 0u32;
    // A failed TLS handshake is a configuration problem more often than an outage: said once
    // at warn per outage, not at every retry.
    let mut tls_warned = false;
    'outer: while !broker.shutting_down() {
        for (i, addr) in cfg.addresses.iter().enumerate() {
            let started = Instant::now();
            let mut peer = Peer::new(&cfg, private, tls.as_deref());
            let ended = peer.session(&broker, &local, addr, i > 0 && cfg.addresses.len() > 1).await;
            if peer.up {
                publish_state(&broker, &cfg.name, false);
                tls_warned = false;
            }
            match ended {
                Ended::Stop => break 'outer,
                Ended::BackToPrimary => {
                    info!(bridge = %cfg.name, "first address reachable again; reconnecting there");
                    continue 'outer;
                }
                Ended::Failed(why) => {
                    if peer.refused_private {
                        // The peer does not know the bridge bit: connect as a plain client.
                        private = false;
                    }
                    if peer.up {
                        warn!(bridge = %cfg.name, %addr, reason = %why, "bridge connection lost");
                    } else if peer.tls_failed && !tls_warned {
                        tls_warned = true;
                        warn!(bridge = %cfg.name, %addr, reason = %why, "bridge TLS handshake failed; retrying with back-off");
                    } else if failures == 0 && i == 0 {
                        // Once per outage at warn: a wrong address must show at the default level.
                        warn!(bridge = %cfg.name, %addr, reason = %why, "bridge cannot connect; retrying with back-off");
                    } else {
                        debug!(bridge = %cfg.name, %addr, reason = %why, "bridge connection failed");
                    }
                    if started.elapsed() > Duration::from_secs(60) {
                        failures = 0;
                    }
                }
            }
            if broker.shutting_down() {
                break 'outer;
            }
        }
        failures = failures.saturating_add(1);
        // Slept in slices, so that a stopping broker is not kept waiting.
        let until = Instant::now() + backoff(failures);
        while Instant::now() < until && !broker.shutting_down() {
            tokio::time::sleep(until.saturating_duration_since(Instant::now()).min(Duration::from_millis(250))).await;
        }
    }
}

/// The bridge's local session: persistent and never expiring, attached only while the peer
/// is connected.
struct Local {
    client_id: ByteString,
    principal: Arc<Principal>,
}

impl Local {
    fn new(cfg: &BridgeConfig) -> Local {
        let client_id = ByteString::from(format!("{LOCAL_PREFIX}{}", cfg.name));
        let principal = Arc::new(Principal {
            client_id: client_id.clone(),
            // Its ACL user, should the ACL file restrict it.
            username: Some(client_id.clone()),
            cert_identity: None,
            listener: usize::MAX,
        });
        Local { client_id, principal }
    }

    fn attach(&self, broker: &Arc<Broker>) -> Link {
        let attached = broker.attach(&self.client_id, false, EXPIRY_NEVER, ProtocolVersion::V5, None);
        let window = usize::from(broker.config.limits.max_inflight);
        Link::new(Arc::clone(broker), attached, Arc::clone(&self.principal), window)
    }
}

/// Exponential back-off from 1 s to 60 s, with ±25 % jitter so that bridges cut off together
/// do not come back together.
fn backoff(failures: u32) -> Duration {
    use std::hash::{BuildHasher, Hasher};
    let base = 1000u64.saturating_mul(1 << failures.min(6).saturating_sub(1)).min(60_000);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(failures);
    let jitter = h.finish() % (base / 2 + 1);
    Duration::from_millis(base - base / 4 + jitter)
}

/// One connection to the peer.
struct Peer<'a> {
    cfg: &'a BridgeConfig,
    version: ProtocolVersion,
    private: bool,
    /// The peer refused the bridge bit in CONNECT.
    refused_private: bool,
    /// CONNACK was accepted.
    up: bool,
    /// Connect over TLS with this configuration.
    tls: Option<&'a TlsConnector>,
    /// The TLS handshake failed.
    tls_failed: bool,
    rbuf: BytesMut,
    wbuf: BytesMut,
    /// Acknowledgements to the peer waiting for a store ticket, in order.
    held: std::collections::VecDeque<(u64, Option<Arc<Replicated>>, Packet)>,
    /// Largest packet the peer accepts.
    peer_max_packet: usize,
}

impl<'a> Peer<'a> {
    fn new(cfg: &'a BridgeConfig, private: bool, tls: Option<&'a TlsConnector>) -> Self {
        let version = match cfg.protocol {
            BridgeProtocol::V5 => ProtocolVersion::V5,
            BridgeProtocol::V311 => ProtocolVersion::V311,
        };
        Peer {
            cfg,
            version,
            private,
            refused_private: false,
            up: false,
            tls,
            tls_failed: false,
            rbuf: BytesMut::new(),
            wbuf: BytesMut::new(),
            held: std::collections::VecDeque::new(),
            peer_max_packet: usize::MAX,
        }
    }

    async fn session(&mut self, broker: &Arc<Broker>, local: &Local, addr: &str, probe_primary: bool) -> Ended {
        let stream = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Ended::Failed(format!("connect: {e}")),
            Err(_) => return Ended::Failed("connect timed out".into()),
        };
        let _ = stream.set_nodelay(true);
        let Some(tls) = self.tls else { return self.session_over(stream, broker, local, addr, probe_primary).await };
        match tokio::time::timeout(CONNECT_TIMEOUT, tls.connect(addr, stream)).await {
            Ok(Ok(stream)) => self.session_over(stream, broker, local, addr, probe_primary).await,
            Ok(Err(e)) => {
                self.tls_failed = true;
                Ended::Failed(format!("TLS handshake: {e}"))
            }
            Err(_) => {
                self.tls_failed = true;
                Ended::Failed("TLS handshake timed out".into())
            }
        }
    }

    /// The MQTT session over a connected stream (TCP, or TLS over TCP).
    async fn session_over<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        mut stream: S,
        broker: &Arc<Broker>,
        local: &Local,
        addr: &str,
        probe_primary: bool,
    ) -> Ended {
        let peer_window = match self.handshake(&mut stream, broker).await {
            Ok(w) => w,
            Err(why) => return why,
        };
        let mut link = local.attach(broker);
        link.window = link.window.min(peer_window);
        self.up = true;
        info!(bridge = %self.cfg.name, %addr, protocol = self.version.name(), "bridge connected");
        publish_state(broker, &self.cfg.name, true);
        self.subscribe_peer();
        // What was sent before and not acknowledged goes again first (DUP / PUBREL).
        link.resend_inflight(&mut self.outbox());
        let ended = self.pump(&mut stream, &mut link, probe_primary).await;
        link.detach(EXPIRY_NEVER);
        ended
    }

    fn outbox(&mut self) -> PeerOut<'_> {
        PeerOut { cfg: self.cfg, version: self.version, wbuf: &mut self.wbuf, max_packet: self.peer_max_packet }
    }

    /// CONNECT and CONNACK; returns how many QoS 1/2 messages the peer takes in flight.
    async fn handshake<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        stream: &mut S,
        broker: &Broker,
    ) -> Result<usize, Ended> {
        let cfg = self.cfg;
        let v5 = self.version.is_v5();
        let mut properties = Properties::default();
        if v5 {
            // The peer keeps the bridge's session (and what is queued for it) while it is
            // down, unless a clean start is asked for.
            properties.session_expiry_interval = Some(if cfg.clean_start { 0 } else { u32::MAX });
            properties.receive_maximum = Some(broker.config.mqtt.receive_maximum);
        }
        let connect = Connect {
            protocol: self.version,
            bridge: self.private,
            clean_start: cfg.clean_start,
            keep_alive: cfg.keepalive,
            client_id: ByteString::from(cfg.client_id.clone().unwrap_or_else(|| format!("tern-bridge-{}", cfg.name))),
            will: None,
            username: cfg.username.as_deref().map(ByteString::from),
            password: cfg.password.as_ref().map(|p| Bytes::copy_from_slice(p.as_bytes())),
            properties,
        };
        protocol::encode(&Packet::Connect(Box::new(connect)), self.version, &mut self.wbuf);
        self.write(stream).await.map_err(Ended::Failed)?;
        let ack = tokio::time::timeout(CONNECT_TIMEOUT, self.read_packet(stream)).await;
        let ack = match ack {
            Ok(Ok(Packet::ConnAck(a))) => a,
            Ok(Ok(other)) => return Err(Ended::Failed(format!("expected CONNACK, got {other:?}"))),
            Ok(Err(e)) => {
                // mosquitto's advice for peers that do not know the bridge bit: they close
                // or refuse; try without it next time.
                self.refused_private = self.private;
                return Err(Ended::Failed(e));
            }
            Err(_) => return Err(Ended::Failed("no CONNACK".into())),
        };
        if ack.code != 0 {
            self.refused_private = self.private && ack.code == 1;
            return Err(Ended::Failed(format!("CONNACK refused with code 0x{:02X}", ack.code)));
        }
        let p = &ack.properties;
        self.peer_max_packet = p.maximum_packet_size.map_or(usize::MAX, |m| m as usize);
        Ok(p.receive_maximum.map_or(usize::from(u16::MAX), usize::from))
    }

    /// Subscribes at the peer to every `in`/`both` topic.
    fn subscribe_peer(&mut self) {
        let filters: Vec<(ByteString, SubscriptionOptions)> = self
            .cfg
            .topics
            .iter()
            .filter(|t| t.direction.inward())
            .map(|t| {
                let opts = SubscriptionOptions {
                    qos: QoS::from_u8(t.qos).unwrap_or(QoS::AtMostOnce),
                    no_local: self.version.is_v5(),
                    retain_as_published: self.version.is_v5(),
                    retain_handling: 0,
                };
                (ByteString::from(format!("{}{}", t.remote_prefix, t.pattern)), opts)
            })
            .collect();
        if filters.is_empty() {
            return;
        }
        let s = Subscribe { packet_id: 1, filters, properties: Properties::default() };
        protocol::encode(&Packet::Subscribe(s), self.version, &mut self.wbuf);
    }

    /// Writes and flushes `wbuf` (a TLS stream keeps what is written until flushed).
    async fn write<S: AsyncWrite + Unpin>(&mut self, stream: &mut S) -> Result<(), String> {
        if self.wbuf.is_empty() {
            return Ok(());
        }
        let ka = Duration::from_secs(u64::from(self.cfg.keepalive.max(10)));
        let write = async {
            stream.write_all(&self.wbuf).await?;
            stream.flush().await
        };
        match tokio::time::timeout(ka, write).await {
            Ok(Ok(())) => {
                self.wbuf.clear();
                Ok(())
            }
            Ok(Err(e)) => Err(format!("write: {e}")),
            Err(_) => Err("peer not reading".into()),
        }
    }

    async fn read_packet<S: AsyncRead + Unpin>(&mut self, stream: &mut S) -> Result<Packet, String> {
        loop {
            if let Some(p) = self.decode()? {
                return Ok(p);
            }
            match stream.read_buf(&mut self.rbuf).await {
                Ok(0) => return Err("closed by peer".into()),
                Ok(_) => {}
                Err(e) => return Err(format!("read: {e}")),
            }
        }
    }

    fn decode(&mut self) -> Result<Option<Packet>, String> {
        protocol::decode(&mut self.rbuf, Some(self.version), MAX_PACKET)
            .map_err(|e| format!("bad packet from peer: {e}"))
    }

    /// Runs the connection: the peer's packets, the local queue, keep-alive.
    async fn pump<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        stream: &mut S,
        link: &mut Link,
        probe_primary: bool,
    ) -> Ended {
        let ka = Duration::from_secs(u64::from(self.cfg.keepalive));
        // The peer is taken for gone after this long without a packet from it.
        let silent_limit = ka + ka / 2;
        let mut last_heard = tokio::time::Instant::now();
        let mut ping_at = tokio::time::Instant::now() + if ka.is_zero() { Duration::from_secs(3600) } else { ka };
        let mut probe_at = tokio::time::Instant::now() + PRIMARY_PROBE;
        loop {
            if let Err(e) = self.release_held(link) {
                return Ended::Failed(e);
            }
            if link.write_ready() {
                while link.drain(&mut self.outbox()) {
                    if let Err(e) = self.write(stream).await {
                        return Ended::Failed(e);
                    }
                }
            }
            if let Err(e) = self.write(stream).await {
                return Ended::Failed(e);
            }
            let durable = self.held.front().map(|(t, _, _)| *t).filter(|&t| t > 0);
            let durable = durable.into_iter().chain((!link.write_ready()).then(|| link.write_ticket())).min();
            if let Some(t) = durable {
                link.broker.wait_durable(t, &link.control);
                if link.broker.outcome(t).is_some() {
                    continue;
                }
            }
            tokio::select! {
                read = stream.read_buf(&mut self.rbuf) => match read {
                    Ok(0) => return Ended::Failed("closed by peer".into()),
                    Err(e) => return Ended::Failed(format!("read: {e}")),
                    Ok(_) => {
                        last_heard = tokio::time::Instant::now();
                        let mut full = Vec::new();
                        loop {
                            match self.decode() {
                                Ok(Some(p)) => {
                                    if let Err(e) = self.on_packet(p, link, &mut full) {
                                        return Ended::Failed(e);
                                    }
                                }
                                Ok(None) => break,
                                Err(e) => return Ended::Failed(e),
                            }
                        }
                        if !full.is_empty() {
                            // Local subscribers are full: the peer waits (it is not read).
                            link.wait_for_room(full).await;
                        }
                    }
                },
                bits = std::future::poll_fn(|cx| link.control.poll_signals(cx)) => {
                    if bits & signal::KICK != 0 {
                        let code = link.control.reason();
                        let _ = stream.shutdown().await;
                        if code == reason::SERVER_SHUTTING_DOWN {
                            return Ended::Stop;
                        }
                        // Cut off as a slow consumer (the peer stopped reading), or a client
                        // took the bridge's session: reconnect (and take it back).
                        return Ended::Failed(format!("local session closed (0x{code:02X})"));
                    }
                }
                // Wakes for the next PINGREQ and when the peer has been silent for 1.5 times
                // the keep-alive: checked only at ping times, a dead link was noticed up to
                // 2.5 times the keep-alive after the peer's last packet.
                _ = tokio::time::sleep_until(ping_at.min(last_heard + silent_limit)), if !ka.is_zero() => {
                    let now = tokio::time::Instant::now();
                    if now.duration_since(last_heard) >= silent_limit {
                        return Ended::Failed("keep-alive: peer silent".into());
                    }
                    if now >= ping_at {
                        self.wbuf.extend_from_slice(&[0xC0, 0x00]);
                        ping_at = now + ka;
                    }
                }
                _ = tokio::time::sleep_until(probe_at), if probe_primary => {
                    probe_at = tokio::time::Instant::now() + PRIMARY_PROBE;
                    if let Some(first) = self.cfg.addresses.first() {
                        if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(first)).await {
                            let _ = stream.shutdown().await;
                            return Ended::BackToPrimary;
                        }
                    }
                }
            }
        }
    }

    /// Sends the held acknowledgements whose store work (and cluster copy) is done; a failed
    /// write ends the connection (the peer then sends the message again).
    fn release_held(&mut self, link: &Link) -> Result<(), String> {
        while let Some((ticket, replicated, _)) = self.held.front() {
            match Routed::outcome(&link.broker, *ticket, replicated.as_deref()) {
                None => break,
                Some(false) => return Err("a message from the peer could not be stored".into()),
                Some(true) => {
                    if let Some((_, _, p)) = self.held.pop_front() {
                        protocol::encode(&p, self.version, &mut self.wbuf);
                    }
                }
            }
        }
        Ok(())
    }

    fn respond(&mut self, ticket: u64, replicated: Option<Arc<Replicated>>, p: Packet) {
        if ticket == 0 && replicated.is_none() && self.held.is_empty() {
            protocol::encode(&p, self.version, &mut self.wbuf);
        } else {
            self.held.push_back((ticket, replicated, p));
        }
    }

    fn on_packet(
        &mut self,
        p: Packet,
        link: &Link,
        full: &mut Vec<Arc<crate::broker::SessionHandle>>,
    ) -> Result<(), String> {
        match p {
            Packet::Publish(p) => self.on_publish(p, link, full),
            Packet::PubAck(r) => check(link.puback(r.packet_id)),
            Packet::PubRec(r) => {
                let success = r.reason < 0x80;
                let (ack, ticket, replicated) = link.pubrec(r.packet_id, success);
                check(ack)?;
                if success {
                    self.respond(ticket, replicated, Packet::PubRel(PubResp::new(r.packet_id)));
                }
                Ok(())
            }
            Packet::PubComp(r) => check(link.pubcomp(r.packet_id)),
            Packet::PubRel(r) => {
                let ticket = link.qos2_released(r.packet_id);
                self.respond(ticket, None, Packet::PubComp(PubResp::new(r.packet_id)));
                Ok(())
            }
            Packet::SubAck(a) => {
                for (code, t) in a.return_codes.iter().zip(self.cfg.topics.iter().filter(|t| t.direction.inward())) {
                    if *code >= 0x80 {
                        warn!(bridge = %self.cfg.name, pattern = %t.pattern, code, "peer refused the bridge's subscription");
                    }
                }
                Ok(())
            }
            Packet::PingResp | Packet::UnsubAck(_) => Ok(()),
            Packet::Disconnect(d) => Err(format!("peer disconnected (0x{:02X})", d.reason)),
            other => Err(format!("unexpected packet from peer: {other:?}")),
        }
    }

    /// A message from the peer: published here under its local topic, acknowledged to the
    /// peer once stored.
    fn on_publish(
        &mut self,
        mut p: Publish,
        link: &Link,
        full: &mut Vec<Arc<crate::broker::SessionHandle>>,
    ) -> Result<(), String> {
        let pid = p.packet_id.unwrap_or(0);
        let crossed = p.properties.user_properties.iter().any(|(k, _)| k == HOP_KEY);
        let local = map_topic(self.cfg, &p.topic, Side::Remote);
        let allowed = !crossed && local.as_deref().is_some_and(|t| link.may_publish(t));
        let (mut ticket, mut replicated) = (0, None);
        if let (true, Some(local)) = (allowed, local) {
            p.properties.topic_alias = None;
            p.properties.subscription_identifiers.clear();
            // Marked as having crossed a bridge, so that no bridge of another broker that
            // receives it from here passes it on (a 3.1.1 peer's messages included).
            p.properties.user_properties.push((ByteString::from_static(HOP_KEY), ByteString::from_static("1")));
            let qos = p.qos;
            let msg = Message::received(
                ByteString::from(local),
                p.payload,
                qos,
                p.retain,
                std::mem::take(&mut p.properties),
                link.client_id().clone(),
            );
            match qos {
                QoS::AtMostOnce => {
                    link.publish(msg, None, full);
                }
                QoS::AtLeastOnce => {
                    let routed = link.publish(msg, None, full);
                    (ticket, replicated) = (routed.ticket, routed.replicated);
                }
                QoS::ExactlyOnce => {
                    let r = link.qos2_received(pid);
                    if r.first {
                        let routed = link.publish(msg, r.record, full);
                        (ticket, replicated) = (routed.ticket, routed.replicated);
                    }
                }
            }
        } else if !crossed {
            debug!(bridge = %self.cfg.name, topic = %p.topic, "message from the peer outside the bridge's topics or the ACL: dropped");
        }
        match p.qos {
            QoS::AtMostOnce => {}
            QoS::AtLeastOnce => self.respond(ticket, replicated, Packet::PubAck(PubResp::new(pid))),
            QoS::ExactlyOnce => self.respond(ticket, replicated, Packet::PubRec(PubResp::new(pid))),
        }
        Ok(())
    }
}

fn check(ack: Ack) -> Result<(), String> {
    match ack {
        Ack::WrongType => Err("acknowledgement of the wrong kind from peer".into()),
        _ => Ok(()),
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    Local,
    Remote,
}

/// The topic on the other side for a message on `t` from `from`: the first topic entry (in
/// the direction away from `from`) whose filter matches gets its prefix swapped, as
/// mosquitto maps `topic` lines. None when no entry matches.
fn map_topic(cfg: &BridgeConfig, t: &str, from: Side) -> Option<String> {
    cfg.topics.iter().find_map(|e| {
        let (dir_ok, from_prefix, to_prefix) = match from {
            Side::Local => (e.direction.outward(), &e.local_prefix, &e.remote_prefix),
            Side::Remote => (e.direction.inward(), &e.remote_prefix, &e.local_prefix),
        };
        if !dir_ok || !topic::matches(&format!("{from_prefix}{}", e.pattern), t) {
            return None;
        }
        let rest = t.strip_prefix(from_prefix.as_str())?;
        Some(format!("{to_prefix}{rest}"))
    })
}

/// The local queue's deliveries written to the peer under their remote topics.
struct PeerOut<'a> {
    cfg: &'a BridgeConfig,
    version: ProtocolVersion,
    wbuf: &'a mut BytesMut,
    max_packet: usize,
}

impl Outbox for PeerOut<'_> {
    fn has_room(&self) -> bool {
        self.wbuf.len() < 64 * 1024
    }

    fn publish(&mut self, d: &Delivery, packet_id: Option<u16>, dup: bool, now: Instant) -> Written {
        let m = &d.msg;
        // Split horizon: what came over a bridge (to this broker, or to the one it came from)
        // is not passed over another.
        if m.origin.starts_with(LOCAL_PREFIX) || contains(&m.props_v5, HOP_ENCODED) {
            return Written::Skipped;
        }
        let Some(remote) = map_topic(self.cfg, &m.topic, Side::Local) else { return Written::Skipped };
        let v5 = self.version.is_v5();
        let mut props = Vec::new();
        if v5 {
            props.extend_from_slice(&m.props_v5);
            props.extend_from_slice(HOP_ENCODED);
        }
        let out = PublishOut {
            dup,
            qos: d.qos,
            retain: d.retain,
            topic: remote.as_bytes(),
            packet_id,
            payload: &m.payload,
            properties: &props,
            message_expiry: if v5 { m.remaining_expiry(now) } else { None },
            subscription_ids: &[],
            topic_alias: None,
        };
        if self.max_packet != usize::MAX && out.encoded_len(self.version) > self.max_packet {
            return Written::TooLarge;
        }
        out.encode(self.version, self.wbuf);
        Written::Yes
    }

    fn pubrel(&mut self, packet_id: u16) {
        protocol::encode(&Packet::PubRel(PubResp::new(packet_id)), self.version, self.wbuf);
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{BridgeDirection, BridgeTopic};

    fn cfg(topics: Vec<BridgeTopic>) -> BridgeConfig {
        BridgeConfig::new("b", "127.0.0.1:1", BridgeProtocol::V5, topics)
    }

    fn t(pattern: &str, direction: BridgeDirection, local: &str, remote: &str) -> BridgeTopic {
        BridgeTopic {
            pattern: pattern.into(),
            direction,
            qos: 1,
            local_prefix: local.into(),
            remote_prefix: remote.into(),
        }
    }

    #[test]
    fn topics_map_as_mosquitto_topic_lines() {
        // topic sensors/# out 1 site/ cloud/site1/
        let c = cfg(vec![
            t("sensors/#", BridgeDirection::Out, "site/", "cloud/site1/"),
            t("cmd/#", BridgeDirection::In, "", "cloud/site1/"),
            t("#", BridgeDirection::Both, "", ""),
        ]);
        assert_eq!(map_topic(&c, "site/sensors/t1", Side::Local).as_deref(), Some("cloud/site1/sensors/t1"));
        assert_eq!(map_topic(&c, "cloud/site1/cmd/lamp", Side::Remote).as_deref(), Some("cmd/lamp"));
        // Not covered by the first entries: the catch-all `both` keeps the topic.
        assert_eq!(map_topic(&c, "other/x", Side::Local).as_deref(), Some("other/x"));
        let strict = cfg(vec![t("sensors/#", BridgeDirection::Out, "site/", "")]);
        assert_eq!(map_topic(&strict, "site/other", Side::Local), None);
        assert_eq!(map_topic(&strict, "site/sensors/x", Side::Remote), None, "out only");
    }

    #[test]
    fn the_hop_marker_is_the_encoded_user_property() {
        let p = Properties { user_properties: vec![(HOP_KEY.into(), "1".into())], ..Properties::default() };
        assert_eq!(&protocol::encode_property_list(&p)[..], HOP_ENCODED);
    }

    #[test]
    fn backoff_grows_to_a_minute_with_jitter() {
        for n in 1..20 {
            let d = backoff(n).as_millis() as u64;
            let base = (1000u64 << (n.min(6) - 1)).min(60_000);
            assert!(d >= base * 3 / 4 && d <= base * 5 / 4, "{n}: {d} ms");
        }
    }
}
