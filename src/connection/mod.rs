//! One task per client connection: the CONNECT handshake, then a loop that reads and answers
//! packets, drains the session's queue into the socket, and enforces keep-alive.
//!
//! Owns the socket and per-connection protocol state (topic aliases, the will, keep-alive).
//! Session state it reaches only through the broker's `SessionHandle`. Writes are batched:
//! everything produced by one read or one wake-up is encoded into one buffer and written with
//! one call.

mod aliases;

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use bytestring::ByteString;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;
use tracing::{debug, info};

use crate::auth::{AuthExchange, AuthMethod, AuthStep};
use crate::broker::{Attached, Broker, SessionHandle, EXPIRY_NEVER};
use crate::message::Message;
use crate::protocol::{
    self, reason, topic, Auth, ConnAck, Connect, DecodeError, Disconnect, LastWill, Packet, Properties,
    ProtocolVersion, PubResp, Publish, PublishOut, QoS, SubAck, Subscribe, UnsubAck, Unsubscribe,
};
use crate::session::{Ack, Delivery, OutState, Outgoing};
use crate::store::{InflightState, Op};
use crate::topics::level_count;

/// Encoded bytes gathered before a write; past this the loop writes and comes back for more,
/// so one busy subscriber cannot grow its buffer without bound.
const WRITE_BATCH: usize = 64 * 1024;
/// Read buffer space offered to the socket: small while a client is quiet (idle connections
/// should cost little memory), doubled each time a read fills it, up to the maximum.
const READ_MIN: usize = 64;
const READ_MAX: usize = 64 * 1024;

/// Why a connection ends.
#[derive(Debug)]
enum Close {
    /// Client sent DISCONNECT; `publish_will` for v5 reason 0x04.
    Client { publish_will: bool },
    /// Socket closed or failed without DISCONNECT.
    Lost(&'static str),
    /// Protocol violation or server decision: v5 gets DISCONNECT with this reason.
    Error { reason: u8, what: String },
    /// Taken over or server shutdown: DISCONNECT with reason, will per reason.
    Kicked(u8),
    /// Protocol violation answered by closing without a DISCONNECT: a bad DISCONNECT or
    /// PINGREQ (as mosquitto does; the spec's DISCONNECT there is a SHOULD), or a v5 CONNACK
    /// that would exceed the client's Maximum Packet Size.
    Silent(String),
}

/// Serves one client until it goes. Never panics on client input.
pub async fn serve<S>(mut stream: S, peer: SocketAddr, broker: Arc<Broker>, shutdown: watch::Receiver<bool>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let limits = &broker.config.limits;
    let max_packet = limits.max_packet_size as usize;
    let mut rbuf = BytesMut::new();
    let deadline = Duration::from_secs(limits.connect_timeout_secs);

    // The handshake and goodbye phases are boxed: an async fn's state is as large as its
    // largest phase, and these would otherwise inflate the memory every idle connection
    // keeps for its whole life.
    let first = Box::pin(tokio::time::timeout(deadline, read_connect(&mut stream, &mut rbuf, max_packet))).await;
    let connect = match first {
        Err(_) => {
            debug!(%peer, "no CONNECT within {}s, closing", deadline.as_secs());
            return;
        }
        Ok(Err(ConnectError::Io)) => return,
        Ok(Err(ConnectError::Decode(e))) => {
            debug!(%peer, error = %e, "bad first packet, closing");
            if let DecodeError::UnsupportedProtocol { level, name_is_mqtt } = e {
                // [MQTT-3.1.2-2]: answer 0x01 (v3) / 0x84 (v5) and close.
                let (version, code) = if level == 5 && name_is_mqtt {
                    (ProtocolVersion::V5, reason::UNSUPPORTED_PROTOCOL_VERSION)
                } else {
                    (ProtocolVersion::V311, reason::v3::UNACCEPTABLE_PROTOCOL_VERSION)
                };
                let mut w = BytesMut::new();
                let ack = ConnAck { session_present: false, code, properties: Properties::default() };
                protocol::encode(&Packet::ConnAck(ack), version, &mut w);
                let _ = stream.write_all(&w).await;
            }
            return;
        }
        Ok(Ok(c)) => c,
    };

    let mut conn = match Box::pin(Conn::accept(connect, peer, &broker, &mut stream, &mut rbuf)).await {
        Some(c) => c,
        None => return,
    };
    conn.rbuf = rbuf;
    let close = conn.run(&mut stream, shutdown).await;
    Box::pin(conn.finish(close, &mut stream)).await;
}

enum ConnectError {
    Io,
    Decode(DecodeError),
}

async fn read_connect<S: AsyncRead + Unpin>(
    stream: &mut S,
    rbuf: &mut BytesMut,
    max_packet: usize,
) -> Result<Box<Connect>, ConnectError> {
    match read_packet(stream, rbuf, None, max_packet).await? {
        Packet::Connect(c) => Ok(c),
        _ => Err(ConnectError::Decode(DecodeError::Protocol("first packet must be CONNECT"))),
    }
}

/// Reads one whole packet during the handshake (before the main loop owns the socket).
async fn read_packet<S: AsyncRead + Unpin>(
    stream: &mut S,
    rbuf: &mut BytesMut,
    version: Option<ProtocolVersion>,
    max_packet: usize,
) -> Result<Packet, ConnectError> {
    loop {
        match protocol::decode(rbuf, version, max_packet) {
            Ok(Some(p)) => return Ok(p),
            Ok(None) => {}
            Err(e) => return Err(ConnectError::Decode(e)),
        }
        rbuf.reserve(1024);
        match stream.read_buf(rbuf).await {
            Ok(0) | Err(_) => return Err(ConnectError::Io),
            Ok(_) => {}
        }
    }
}

struct Conn {
    broker: Arc<Broker>,
    handle: Arc<SessionHandle>,
    connection_id: u64,
    control: Arc<crate::broker::ConnControl>,
    version: ProtocolVersion,
    client_id: ByteString,
    peer: SocketAddr,
    /// Seconds granted; 0 = no keep-alive.
    keep_alive: u16,
    /// The enhanced-authentication method the client connected with (v5), for
    /// re-authentication.
    auth: Option<ConnAuth>,
    /// Boxed: a will with its properties is large, and most clients have none.
    will: Option<Box<LastWill>>,
    session_expiry: u32,
    /// Expiry asked for in CONNECT was 0: a DISCONNECT may not raise it [MQTT-3.14.2-2].
    connect_expiry_zero: bool,
    /// min(limits.max_inflight, client's Receive Maximum).
    window: usize,
    /// Largest packet the client accepts (v5 Maximum Packet Size).
    client_max_packet: usize,
    /// Topic aliases towards the client (v5, when it accepts some).
    out_aliases: aliases::OutboundAliases,
    inbound_aliases: HashMap<u16, ByteString>,
    rbuf: BytesMut,
    wbuf: BytesMut,
    /// Acknowledgements held until the store has made their effects durable, in the order
    /// they must go out [MQTT-4.6.0-2..4].
    held: VecDeque<HeldAck>,
    /// Changes when the store has processed more; wakes the loop to release `held`.
    durable: watch::Receiver<u64>,
    /// Store ticket the write buffer waits for: QoS 2 PUBLISHes of persistent sessions go out
    /// only once their packet id is durable. 0 = nothing to wait for.
    write_ticket: u64,
}

/// An acknowledgement waiting for a store ticket, and retained messages to queue after it
/// (a SUBACK precedes the retained messages of its subscription).
struct HeldAck {
    ticket: u64,
    packet: Packet,
    then: Vec<Delivery>,
}

impl Conn {
    /// Validates CONNECT, attaches the session and sends CONNACK. None when refused.
    async fn accept<S: AsyncRead + AsyncWrite + Unpin>(
        c: Box<Connect>,
        peer: SocketAddr,
        broker: &Arc<Broker>,
        stream: &mut S,
        rbuf: &mut BytesMut,
    ) -> Option<Conn> {
        let cfg = &broker.config;
        let v = c.protocol;
        let v5 = v.is_v5();
        let refuse = |v3code: u8, v5code: u8| if v5 { v5code } else { v3code };

        // Copied out of the packet: a slice would keep the whole CONNECT read buffer alive
        // for as long as the client stays connected.
        let mut client_id = ByteString::from(&*c.client_id);
        let mut assigned = None;
        let mut failure = None;
        if client_id.is_empty() {
            if v == ProtocolVersion::V31 || (v == ProtocolVersion::V311 && !c.clean_start) {
                // [MQTT-3.1.3-8]: empty id needs clean session in 3.1.1; 3.1 requires an id.
                failure = Some(refuse(reason::v3::IDENTIFIER_REJECTED, reason::CLIENT_IDENTIFIER_NOT_VALID));
            } else {
                let id: ByteString = format!("tern-{:016x}", random_u64()).into();
                client_id = id.clone();
                if v5 {
                    assigned = Some(id);
                }
            }
        } else if client_id.len() > cfg.limits.max_client_id_length {
            // MQTT 3.1 capped ids at 23 bytes; like mosquitto, tern accepts longer ones from
            // 3.1 clients too, limited only by limits.max_client_id_length.
            failure = Some(refuse(reason::v3::IDENTIFIER_REJECTED, reason::CLIENT_IDENTIFIER_NOT_VALID));
        }
        // Enhanced authentication [4.12]: settled before the session is touched.
        let mut auth: Option<ConnAuth> = None;
        let mut auth_data = None;
        if let (None, Some(name)) = (failure, &c.properties.authentication_method) {
            match broker.auth.find(name) {
                // No such method here [MQTT-4.12.0-1].
                None => failure = Some(reason::BAD_AUTHENTICATION_METHOD),
                Some(method) => {
                    let deadline = Duration::from_secs(cfg.limits.connect_timeout_secs);
                    let exchange = authenticate(&method, name, &c, stream, rbuf, cfg.limits.max_packet_size as usize);
                    match tokio::time::timeout(deadline, exchange).await {
                        Ok(Ok(data)) => {
                            auth_data = data;
                            auth = Some(ConnAuth { method, name: ByteString::from(&**name), exchange: None });
                        }
                        Ok(Err(Some(code))) => failure = Some(code),
                        Ok(Err(None)) | Err(_) => return None,
                    }
                }
            }
        }
        if failure.is_none() && auth.is_none() && !cfg.anonymous_allowed() {
            failure = Some(refuse(reason::v3::NOT_AUTHORIZED, reason::NOT_AUTHORIZED));
        }
        if let (None, Some(w)) = (failure, &c.will) {
            if (w.qos as u8) > cfg.mqtt.maximum_qos {
                failure = Some(refuse(reason::v3::NOT_AUTHORIZED, reason::QOS_NOT_SUPPORTED));
            } else if w.retain && !cfg.mqtt.retain_available {
                failure = Some(refuse(reason::v3::NOT_AUTHORIZED, reason::RETAIN_NOT_SUPPORTED));
            } else if !topic_within_limits(&w.topic, cfg) {
                failure = Some(refuse(reason::v3::NOT_AUTHORIZED, reason::TOPIC_NAME_INVALID));
            }
        }
        if let Some(code) = failure {
            info!(client_id = %c.client_id, %peer, protocol = v.name(), code, "connection refused");
            let mut w = BytesMut::new();
            let ack = ConnAck { session_present: false, code, properties: Properties::default() };
            protocol::encode(&Packet::ConnAck(ack), v, &mut w);
            let _ = stream.write_all(&w).await;
            return None;
        }

        let session_expiry = if v5 {
            c.properties.session_expiry_interval.unwrap_or(0)
        } else if c.clean_start {
            0
        } else {
            EXPIRY_NEVER
        };
        let Attached { handle, session_present, connection_id, control } =
            broker.attach(&client_id, c.clean_start, session_expiry, v);

        let mut keep_alive = c.keep_alive;
        let mut props = Properties::default();
        if v5 {
            let max_ka = cfg.limits.max_keepalive;
            if max_ka > 0 && (keep_alive == 0 || keep_alive > max_ka) {
                keep_alive = max_ka;
                props.server_keep_alive = Some(max_ka);
            }
            props.assigned_client_identifier = assigned;
            if let Some(a) = &auth {
                props.authentication_method = Some(a.name.clone());
                props.authentication_data = auth_data;
            }
            if cfg.mqtt.receive_maximum != u16::MAX {
                props.receive_maximum = Some(cfg.mqtt.receive_maximum);
            }
            if cfg.mqtt.maximum_qos < 2 {
                props.maximum_qos = Some(cfg.mqtt.maximum_qos);
            }
            if !cfg.mqtt.retain_available {
                props.retain_available = Some(0);
            }
            // Absent means the protocol maximum, so only a lower limit is announced.
            if cfg.limits.max_packet_size < 268_435_460 {
                props.maximum_packet_size = Some(cfg.limits.max_packet_size);
            }
            if cfg.mqtt.topic_alias_maximum > 0 {
                props.topic_alias_maximum = Some(cfg.mqtt.topic_alias_maximum);
            }
            if !cfg.mqtt.wildcard_subscriptions {
                props.wildcard_subscription_available = Some(0);
            }
            if !cfg.mqtt.subscription_identifiers {
                props.subscription_identifiers_available = Some(0);
            }
            if !cfg.mqtt.shared_subscriptions {
                props.shared_subscription_available = Some(0);
            }
        }
        let client_receive_max = c.properties.receive_maximum.unwrap_or(u16::MAX);
        let window = usize::from(cfg.limits.max_inflight.min(client_receive_max));
        let client_max_packet = c.properties.maximum_packet_size.map_or(usize::MAX, |m| m as usize);

        info!(
            client_id = %client_id,
            %peer,
            protocol = v.name(),
            clean_start = c.clean_start,
            keep_alive,
            session_present,
            "client connected"
        );

        let mut conn = Conn {
            broker: Arc::clone(broker),
            handle,
            connection_id,
            control,
            version: v,
            client_id,
            peer,
            keep_alive,
            auth,
            will: c.will.as_ref().map(|w| {
                // Same as the client id: own the bytes instead of pinning the read buffer.
                Box::new(LastWill {
                    topic: ByteString::from(&*w.topic),
                    payload: bytes::Bytes::copy_from_slice(&w.payload),
                    ..w.clone()
                })
            }),
            session_expiry,
            connect_expiry_zero: session_expiry == 0,
            window,
            client_max_packet,
            out_aliases: aliases::OutboundAliases::new(if v5 {
                c.properties.topic_alias_maximum.unwrap_or(0)
            } else {
                0
            }),
            inbound_aliases: HashMap::new(),
            rbuf: BytesMut::new(),
            wbuf: BytesMut::new(),
            held: VecDeque::new(),
            durable: broker.durable_watch(),
            write_ticket: 0,
        };
        // MQTT 3.1's CONNACK has no session present flag (the byte is reserved).
        let session_present = session_present && v != ProtocolVersion::V31;
        let ack = Packet::ConnAck(ConnAck { session_present, code: reason::SUCCESS, properties: props });
        let fits = protocol::encoded_len(&ack, v) <= conn.client_max_packet;
        if fits {
            protocol::encode(&ack, v, &mut conn.wbuf);
        }
        drop(ack);
        if !fits {
            // [MQTT-3.1.2-25]: not even CONNACK fits the client's limit; nothing can be sent.
            Box::pin(conn.finish(Close::Silent("client Maximum Packet Size below CONNACK size".into()), stream)).await;
            return None;
        }
        conn.resend_inflight();
        Some(conn)
    }

    /// On resuming a session, unacknowledged messages go out again first, in their original
    /// order: PUBLISH with DUP, or PUBREL [MQTT-4.4.0-1].
    fn resend_inflight(&mut self) {
        let handle = Arc::clone(&self.handle);
        let cell = handle.lock();
        let now = Instant::now();
        for f in cell.state.inflight() {
            match f.state {
                OutState::AwaitingAck => {
                    // A message too large for the client stays in flight until it goes away.
                    let _ = self.write_publish(&f.delivery, Some(f.packet_id), true, now);
                }
                OutState::AwaitingComp => {
                    protocol::encode(&Packet::PubRel(PubResp::new(f.packet_id)), self.version, &mut self.wbuf);
                }
            }
        }
    }

    async fn run<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        stream: &mut S,
        mut shutdown: watch::Receiver<bool>,
    ) -> Close {
        let control = Arc::clone(&self.control);
        let handle = Arc::clone(&self.handle);
        // [MQTT-3.1.2-24]: one and a half keep-alive periods without a packet closes.
        let ka = (self.keep_alive > 0).then(|| Duration::from_millis(u64::from(self.keep_alive) * 1500));
        // One timer for the connection's life: reads only record the time, and when the
        // timer fires early it is pushed to the real deadline (cheaper than resetting it on
        // every read).
        let far = tokio::time::Instant::now() + Duration::from_secs(86_400 * 365);
        let mut last_read = tokio::time::Instant::now();
        let sleep = tokio::time::sleep_until(ka.map_or(far, |d| last_read + d));
        tokio::pin!(sleep);
        let mut read_hint = READ_MIN;
        let mut more = true;
        loop {
            if let Err(close) = self.release_held() {
                let _ = self.flush(stream, &control).await;
                return close;
            }
            if (more || !self.wbuf.is_empty()) && self.write_ready() {
                more = self.drain();
                if self.write_ready() {
                    if let Err(close) = self.flush(stream, &control).await {
                        return close;
                    }
                }
                if more {
                    // Keep reading between big batches so acks are not starved.
                    tokio::task::yield_now().await;
                }
            }
            let can_write = self.write_ready();
            if *shutdown.borrow() {
                return Close::Kicked(reason::SERVER_SHUTTING_DOWN);
            }
            if self.rbuf.is_empty() && self.rbuf.capacity() > 2 * read_hint {
                // Quiet again after a burst: drop the big buffer (payloads still using it
                // keep their part alive).
                self.rbuf = BytesMut::new();
            }
            self.rbuf.reserve(read_hint);
            let offered = self.rbuf.capacity() - self.rbuf.len();
            tokio::select! {
                biased;
                _ = control.kicked.notified() => return Close::Kicked(control.reason()),
                _ = shutdown.changed() => return Close::Kicked(reason::SERVER_SHUTTING_DOWN),
                r = stream.read_buf(&mut self.rbuf) => {
                    match r {
                        Ok(0) => return Close::Lost("connection closed by client"),
                        Err(_) => return Close::Lost("socket error"),
                        Ok(n) => {
                            last_read = tokio::time::Instant::now();
                            if n == offered && read_hint < READ_MAX {
                                read_hint *= 2;
                            } else if n < offered / 4 && read_hint > READ_MIN {
                                read_hint /= 2;
                            }
                            if let Err(close) = self.process_input() {
                                // Flush acks produced before the failure, then close.
                                let _ = self.flush(stream, &control).await;
                                return close;
                            }
                            more = true;
                        }
                    }
                }
                _ = handle.notify.notified() => { more = true; }
                _ = self.durable.changed(), if !self.held.is_empty() || !can_write => {}
                // The last drain stopped at a full batch: come straight back for the rest
                // (the wake-up that announced those messages has been used).
                _ = std::future::ready(()), if more && can_write => {}
                _ = &mut sleep, if ka.is_some() => {
                    let due = last_read + ka.unwrap_or_default();
                    if due <= tokio::time::Instant::now() {
                        return Close::Error { reason: reason::KEEP_ALIVE_TIMEOUT, what: "keep-alive timeout".into() };
                    }
                    sleep.as_mut().reset(due);
                }
            }
        }
    }

    /// False while the write buffer holds QoS 2 PUBLISHes whose packet ids are not durable.
    fn write_ready(&mut self) -> bool {
        if self.write_ticket == 0 {
            return true;
        }
        if self.broker.outcome(self.write_ticket).is_some() {
            self.write_ticket = 0;
            return true;
        }
        false
    }

    /// Writes the buffer, giving up if the connection is kicked meanwhile (a client that stops
    /// reading must not keep its task alive after takeover).
    async fn flush<S: AsyncWrite + Unpin>(
        &mut self,
        stream: &mut S,
        control: &crate::broker::ConnControl,
    ) -> Result<(), Close> {
        if self.wbuf.is_empty() {
            return Ok(());
        }
        let result = tokio::select! {
            r = stream.write_all(&self.wbuf) => r,
            _ = control.kicked.notified() => return Err(Close::Kicked(control.reason())),
        };
        if self.wbuf.capacity() > 4 * WRITE_BATCH {
            // A burst grew the buffer; give the memory back rather than keep it per client.
            self.wbuf = BytesMut::new();
        } else {
            self.wbuf.clear();
        }
        result.map_err(|_| Close::Lost("write failed"))
    }

    fn process_input(&mut self) -> Result<(), Close> {
        let max = self.broker.config.limits.max_packet_size as usize;
        loop {
            let Some(&first) = self.rbuf.first() else { return Ok(()) };
            if let Some(close) = self.unexpected_packet_type(first) {
                return Err(close);
            }
            match protocol::decode(&mut self.rbuf, Some(self.version), max) {
                Ok(Some(p)) => self.handle_packet(p)?,
                Ok(None) => return Ok(()),
                Err(e) => {
                    let what = e.to_string();
                    // A PINGREQ with a body, or a DISCONNECT with an unknown reason code, ends
                    // the connection without a DISCONNECT of ours (as mosquitto; the spec's
                    // DISCONNECT before closing is a SHOULD).
                    let silent =
                        (first == 0xC0) || (first == 0xE0 && e == DecodeError::Protocol("invalid reason code"));
                    return Err(if silent {
                        Close::Silent(what)
                    } else {
                        Close::Error { reason: e.reason_code(), what }
                    });
                }
            }
        }
    }

    /// Packet types a client never sends are refused from their first byte, before their
    /// body is even read: CONNACK, SUBACK, UNSUBACK, PINGRESP, and AUTH when no
    /// authentication method was agreed (always, for now). Protocol Error (0x82), except a
    /// SUBACK/UNSUBACK with bad flag bits, which is malformed first.
    fn unexpected_packet_type(&self, first: u8) -> Option<Close> {
        let flags = first & 0x0F;
        let what = match first >> 4 {
            2 => "CONNACK from a client",
            9 | 11 if flags != 0 => {
                return Some(Close::Error { reason: reason::MALFORMED_PACKET, what: "bad fixed header flags".into() })
            }
            9 => "SUBACK from a client",
            11 => "UNSUBACK from a client",
            // A PINGRESP with a body is dropped without a word, as mosquitto does.
            13 if self.rbuf.get(1).is_some_and(|&len| len != 0) => {
                return Some(Close::Silent("PINGRESP from a client".into()))
            }
            13 => "PINGRESP from a client",
            15 if self.version.is_v5() && self.auth.is_none() => "AUTH without an authentication method",
            _ => return None,
        };
        Some(Self::protocol_error(what))
    }

    fn protocol_error(what: &str) -> Close {
        Close::Error { reason: reason::PROTOCOL_ERROR, what: what.into() }
    }

    fn handle_packet(&mut self, p: Packet) -> Result<(), Close> {
        match p {
            Packet::Publish(p) => self.on_publish(p),
            Packet::PubAck(r) => {
                let ack = self.handle.lock().state.puback(r.packet_id);
                self.forget_stored(ack);
                Self::check_ack(ack, "PUBACK")
            }
            Packet::PubRec(r) => {
                let ack = self.handle.lock().state.pubrec(r.packet_id, r.reason < 0x80);
                let mut ticket = 0;
                if let Ack::Done(Some(seq)) = ack {
                    let op = if r.reason < 0x80 {
                        Op::SetInflight {
                            client: self.client_id.clone(),
                            seq,
                            state: InflightState::Released(r.packet_id),
                        }
                    } else {
                        Op::DeleteQueued { client: self.client_id.clone(), seq }
                    };
                    ticket = self.broker.persist(vec![op]);
                }
                Self::check_ack(ack, "PUBREC")?;
                // PUBREL lets the receiver forget the id; after a crash we must then resend
                // PUBREL, never the PUBLISH, so it waits until "released" is durable.
                // An unknown id still gets PUBREL with success, as mosquitto answers (0x92
                // would also be allowed): the client then completes and forgets it.
                if r.reason < 0x80 {
                    self.respond(ticket, Packet::PubRel(PubResp::new(r.packet_id)), Vec::new());
                }
                Ok(())
            }
            Packet::PubRel(r) => {
                // PUBCOMP even for an unknown id (success, as mosquitto): the client may be
                // retrying after our PUBCOMP was lost.
                let (known, persistent) = {
                    let mut cell = self.handle.lock();
                    (cell.state.inbound_qos2_release(r.packet_id), cell.persistent())
                };
                // PUBCOMP lets the publisher reuse the id; were the id still stored after a
                // crash, its next message with that id would be taken for a duplicate and
                // lost. So PUBCOMP waits for the delete to be durable.
                let mut ticket = 0;
                if known && persistent {
                    ticket = self
                        .broker
                        .persist(vec![Op::DeleteInbound { client: self.client_id.clone(), packet_id: r.packet_id }]);
                }
                self.respond(ticket, Packet::PubComp(PubResp::new(r.packet_id)), Vec::new());
                Ok(())
            }
            Packet::PubComp(r) => {
                let ack = self.handle.lock().state.pubcomp(r.packet_id);
                self.forget_stored(ack);
                Self::check_ack(ack, "PUBCOMP")
            }
            Packet::Subscribe(s) => self.on_subscribe(s),
            Packet::Unsubscribe(u) => self.on_unsubscribe(u),
            Packet::PingReq => {
                self.encode(Packet::PingResp);
                Ok(())
            }
            Packet::Disconnect(d) => self.on_disconnect(d),
            Packet::Connect(_) => Err(Self::protocol_error("second CONNECT")),
            Packet::Auth(a) => self.on_auth(a),
            Packet::ConnAck(_) | Packet::SubAck(_) | Packet::UnsubAck(_) | Packet::PingResp => {
                Err(Self::protocol_error("server-to-client packet sent by client"))
            }
        }
    }

    /// An acknowledgement of the wrong kind for a message in flight (PUBREC for QoS 1,
    /// PUBACK for QoS 2...) is a Protocol Error [MQTT-4.3]; one for an unknown id is ignored.
    fn check_ack(ack: Ack, kind: &str) -> Result<(), Close> {
        match ack {
            Ack::Done(_) | Ack::Unknown => Ok(()),
            Ack::WrongType => Err(Close::Error {
                reason: reason::PROTOCOL_ERROR,
                what: format!("{kind} does not match the QoS flow of its packet id"),
            }),
        }
    }

    /// A delivery that ended deletes its stored copy.
    fn forget_stored(&self, ack: Ack) {
        if let Ack::Done(Some(seq)) = ack {
            self.broker.persist(vec![Op::DeleteQueued { client: self.client_id.clone(), seq }]);
        }
    }

    /// Sends an acknowledgement now, or holds it until `ticket` is durable (and behind any
    /// acknowledgement already held, to keep their order).
    fn respond(&mut self, ticket: u64, packet: Packet, then: Vec<Delivery>) {
        if ticket == 0 && self.held.is_empty() {
            self.encode(packet);
            self.broker.deliver_retained(&self.handle, then);
        } else {
            self.held.push_back(HeldAck { ticket, packet, then });
        }
    }

    /// Sends the held acknowledgements whose store work is done. A failed store write turns
    /// PUBACK/PUBREC/SUBACK into failures (v5 reason 0x80, 3.1.1 SUBACK 0x80); a 3.1.1
    /// publisher has no way to hear "not stored" but losing its connection, so it does.
    fn release_held(&mut self) -> Result<(), Close> {
        while let Some(front) = self.held.front() {
            let Some(ok) = self.broker.outcome(front.ticket) else { break };
            let Some(HeldAck { mut packet, then, .. }) = self.held.pop_front() else { break };
            if !ok {
                match &mut packet {
                    Packet::PubAck(r) | Packet::PubRec(r) => {
                        if !self.version.is_v5() {
                            return Err(Close::Error {
                                reason: reason::UNSPECIFIED_ERROR,
                                what: "message could not be stored".into(),
                            });
                        }
                        r.reason = reason::UNSPECIFIED_ERROR;
                    }
                    Packet::SubAck(a) => a.return_codes.iter_mut().for_each(|c| *c = reason::UNSPECIFIED_ERROR),
                    _ => {}
                }
            }
            self.encode(packet);
            self.broker.deliver_retained(&self.handle, then);
        }
        Ok(())
    }

    fn encode(&mut self, p: Packet) {
        protocol::encode(&p, self.version, &mut self.wbuf);
    }

    fn on_publish(&mut self, mut p: Publish) -> Result<(), Close> {
        let cfg = Arc::clone(&self.broker.config);
        let v5 = self.version.is_v5();
        if v5 {
            if !p.properties.subscription_identifiers.is_empty() {
                // [MQTT-3.3.4-6]
                return Err(Self::protocol_error("PUBLISH from a client with a Subscription Identifier"));
            }
            if let Some(alias) = p.properties.topic_alias.take() {
                if alias == 0 || alias > cfg.mqtt.topic_alias_maximum {
                    return Err(Close::Error {
                        reason: reason::TOPIC_ALIAS_INVALID,
                        what: format!("topic alias {alias}"),
                    });
                }
                if p.topic.is_empty() {
                    match self.inbound_aliases.get(&alias) {
                        Some(t) => p.topic = t.clone(),
                        None => return Err(Self::protocol_error("unknown topic alias")),
                    }
                } else {
                    self.inbound_aliases.insert(alias, p.topic.clone());
                }
            }
        }
        if p.topic.is_empty() {
            return Err(Self::protocol_error("empty topic"));
        }
        if !topic_within_limits(&p.topic, &cfg) {
            return Err(Close::Error {
                reason: reason::TOPIC_NAME_INVALID,
                what: "topic over the configured length or depth".into(),
            });
        }
        if (p.qos as u8) > cfg.mqtt.maximum_qos {
            return Err(Close::Error { reason: reason::QOS_NOT_SUPPORTED, what: "QoS above maximum".into() });
        }
        if p.retain && !cfg.mqtt.retain_available {
            return Err(Close::Error { reason: reason::RETAIN_NOT_SUPPORTED, what: "retain not available".into() });
        }
        let mut ack_reason = reason::SUCCESS;
        if v5 && p.properties.payload_format_indicator == Some(1) && std::str::from_utf8(&p.payload).is_err() {
            ack_reason = reason::PAYLOAD_FORMAT_INVALID;
        }
        let pid = p.packet_id.unwrap_or(0);
        match p.qos {
            QoS::AtMostOnce => {
                if ack_reason == reason::SUCCESS {
                    self.route(p, None);
                }
            }
            QoS::AtLeastOnce => {
                let mut ticket = 0;
                if ack_reason == reason::SUCCESS {
                    let (n, t) = self.route(p, None);
                    ticket = t;
                    if n == 0 && v5 {
                        ack_reason = reason::NO_MATCHING_SUBSCRIBERS;
                    }
                }
                let ack = PubResp { packet_id: pid, reason: ack_reason, properties: Properties::default() };
                self.respond(ticket, Packet::PubAck(ack), Vec::new());
            }
            QoS::ExactlyOnce => {
                let mut ticket = 0;
                if ack_reason == reason::SUCCESS {
                    let (first, pending, persistent) = {
                        let mut cell = self.handle.lock();
                        let first = cell.state.inbound_qos2_begin(pid);
                        (first, cell.state.inbound_qos2_len(), cell.persistent())
                    };
                    if first {
                        if v5 && pending > usize::from(cfg.mqtt.receive_maximum) {
                            return Err(Close::Error {
                                reason: reason::RECEIVE_MAXIMUM_EXCEEDED,
                                what: "more unreleased QoS 2 publishes than Receive Maximum".into(),
                            });
                        }
                        // The id is stored with the message's effects, so after a crash a
                        // resent PUBLISH is still recognised as a duplicate.
                        let extra =
                            persistent.then(|| Op::PutInbound { client: self.client_id.clone(), packet_id: pid });
                        // PUBREC stays 0x00 without subscribers (mosquitto sends 0x10 only
                        // in PUBACK).
                        ticket = self.route(p, extra).1;
                    }
                    // A duplicate (same id before PUBREL) is acknowledged again but not
                    // delivered again [MQTT-4.3.3-9].
                }
                let ack = PubResp { packet_id: pid, reason: ack_reason, properties: Properties::default() };
                self.respond(ticket, Packet::PubRec(ack), Vec::new());
            }
        }
        Ok(())
    }

    /// Hands a client's PUBLISH to the broker; returns how many sessions it reached and the
    /// store ticket its acknowledgement waits for.
    fn route(&mut self, p: Publish, extra: Option<Op>) -> (usize, u64) {
        let mut props = p.properties;
        props.topic_alias = None;
        let msg = Message::received(p.topic, p.payload, p.qos, p.retain, props, self.client_id.clone());
        self.broker.publish(Arc::new(msg), extra)
    }

    fn on_subscribe(&mut self, s: Subscribe) -> Result<(), Close> {
        let cfg = Arc::clone(&self.broker.config);
        let v5 = self.version.is_v5();
        let sub_id = s.properties.subscription_identifiers.first().copied();
        if sub_id.is_some() && !cfg.mqtt.subscription_identifiers {
            return Err(Close::Error {
                reason: reason::SUBSCRIPTION_IDENTIFIERS_NOT_SUPPORTED,
                what: "subscription identifiers are disabled".into(),
            });
        }
        let mut codes = Vec::with_capacity(s.filters.len());
        let mut retained = Vec::new();
        let mut ticket = 0;
        for (filter, mut opts) in s.filters {
            let shared = topic::is_shared(&filter);
            if shared && opts.no_local && v5 {
                // [MQTT-3.8.3-4]
                return Err(Self::protocol_error("No Local on a shared subscription"));
            }
            let plain = topic::parse_shared(&filter).map_or(&*filter, |(_, f)| f);
            let failure = if shared && topic::parse_shared(&filter).is_none() {
                Some(reason::TOPIC_FILTER_INVALID)
            } else if shared && !cfg.mqtt.shared_subscriptions {
                Some(reason::SHARED_SUBSCRIPTIONS_NOT_SUPPORTED)
            } else if !cfg.mqtt.wildcard_subscriptions && plain.contains(['+', '#']) {
                Some(reason::WILDCARD_SUBSCRIPTIONS_NOT_SUPPORTED)
            } else if !topic_within_limits(plain, &cfg) {
                Some(reason::TOPIC_FILTER_INVALID)
            } else {
                None
            };
            if let Some(code) = failure {
                codes.push(if v5 { code } else { reason::v3::SUBACK_FAILURE });
                continue;
            }
            opts.qos = opts.qos.min(QoS::from_u8(cfg.mqtt.maximum_qos).unwrap_or(QoS::ExactlyOnce));
            let result = self.broker.subscribe(&self.handle, &filter, opts, sub_id);
            ticket = ticket.max(result.ticket);
            codes.push(opts.qos as u8);
            // Retain Handling [MQTT-3.3.1-9..11]; never for shared subscriptions [MQTT-3.8.4-?].
            let send = !result.shared
                && match opts.retain_handling {
                    0 => true,
                    1 => !result.existed,
                    _ => false,
                };
            if send {
                for m in self.broker.retained_for(plain) {
                    retained.push(Delivery {
                        qos: m.qos.min(opts.qos),
                        msg: m,
                        retain: true,
                        subscription_ids: sub_id.into_iter().collect(),
                        store_seq: None,
                        shared: None,
                        maybe_sent: false,
                    });
                }
            }
        }
        let ack = SubAck { packet_id: s.packet_id, return_codes: codes, properties: Properties::default() };
        self.respond(ticket, Packet::SubAck(ack), retained);
        Ok(())
    }

    fn on_unsubscribe(&mut self, u: Unsubscribe) -> Result<(), Close> {
        let mut codes = Vec::with_capacity(u.filters.len());
        for f in &u.filters {
            let existed = self.broker.unsubscribe(&self.handle, f);
            codes.push(if existed { reason::SUCCESS } else { reason::NO_SUBSCRIPTION_EXISTED });
        }
        if !self.version.is_v5() {
            codes.clear();
        }
        self.encode(Packet::UnsubAck(UnsubAck {
            packet_id: u.packet_id,
            reason_codes: codes,
            properties: Properties::default(),
        }));
        Ok(())
    }

    /// Re-authentication (4.12.1): AUTH 0x19 starts a new exchange with the method of CONNECT,
    /// AUTH 0x18 continues it; success is answered with AUTH 0x00, failure with DISCONNECT.
    fn on_auth(&mut self, a: Auth) -> Result<(), Close> {
        let Some(auth) = self.auth.as_mut() else {
            return Err(Self::protocol_error("AUTH without an authentication method"));
        };
        if a.properties.authentication_method.as_deref() != Some(&*auth.name) {
            // [MQTT-4.12.1-1]: the method may not change.
            return Err(Self::protocol_error("AUTH names another authentication method"));
        }
        let data = a.properties.authentication_data.as_deref();
        let step = match (a.reason, auth.exchange.as_mut()) {
            (reason::REAUTHENTICATE, None) => {
                let (exchange, step) = auth.method.start(&self.client_id, None, data);
                auth.exchange = Some(exchange);
                step
            }
            (reason::CONTINUE_AUTHENTICATION, Some(exchange)) => exchange.next(data),
            _ => return Err(Self::protocol_error("AUTH out of sequence")),
        };
        let name = auth.name.clone();
        let (code, data) = match step {
            AuthStep::Continue(d) => (reason::CONTINUE_AUTHENTICATION, d),
            AuthStep::Success(d) => {
                auth.exchange = None;
                (reason::SUCCESS, d)
            }
            AuthStep::Fail(code) => {
                return Err(Close::Error { reason: code, what: "re-authentication failed".into() });
            }
        };
        let properties =
            Properties { authentication_method: Some(name), authentication_data: data, ..Default::default() };
        self.encode(Packet::Auth(Auth { reason: code, properties }));
        Ok(())
    }

    fn on_disconnect(&mut self, d: Disconnect) -> Result<(), Close> {
        if let Some(e) = d.properties.session_expiry_interval {
            if self.connect_expiry_zero && e != 0 {
                return Err(Self::protocol_error("DISCONNECT raised a zero Session Expiry Interval"));
            }
            self.session_expiry = e;
        }
        Err(Close::Client { publish_will: d.reason == reason::DISCONNECT_WITH_WILL })
    }

    /// Moves queued deliveries into the write buffer while the in-flight window allows.
    /// Returns true if it stopped because the buffer is full (more may be waiting).
    fn drain(&mut self) -> bool {
        let handle = Arc::clone(&self.handle);
        let mut cell = handle.lock();
        if cell.owner != self.connection_id {
            return false; // taken over; the kick will end this connection
        }
        let now = Instant::now();
        let mut sent = 0u64;
        let mut ops = Vec::new();
        let full = loop {
            if self.wbuf.len() >= WRITE_BATCH {
                break true;
            }
            let Some(out) = cell.state.next_outgoing(self.window, now) else { break false };
            let (d, pid) = match out {
                Outgoing::Unacked(d) => (d, None),
                Outgoing::Tracked(pid, d) => {
                    if let (Some(seq), QoS::ExactlyOnce) = (d.store_seq, d.qos) {
                        // A QoS 2 message must go out again with the same id after a crash,
                        // or the receiver would take it for a new one [MQTT-4.3.3]: its id is
                        // durable before the PUBLISH is written (see `write_ticket`).
                        ops.push(Op::SetInflight {
                            client: self.client_id.clone(),
                            seq,
                            state: InflightState::Sent(pid),
                        });
                    }
                    (d, Some(pid))
                }
            };
            if !self.write_publish(&d, pid, d.maybe_sent, now) {
                // [MQTT-3.1.2-25]: too large for this client; discard as if delivered.
                if let Some(seq) = pid.and_then(|pid| cell.state.discard(pid)) {
                    ops.push(Op::DeleteQueued { client: self.client_id.clone(), seq });
                }
                cell.state.dropped += 1;
                self.broker.metrics.messages_dropped.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            sent += 1;
        };
        for seq in cell.state.take_discarded() {
            ops.push(Op::DeleteQueued { client: self.client_id.clone(), seq });
        }
        drop(cell);
        let ticket = self.broker.persist(ops);
        self.write_ticket = self.write_ticket.max(ticket);
        if sent > 0 {
            self.broker.metrics.messages_sent.fetch_add(sent, Ordering::Relaxed);
        }
        full
    }

    /// Encodes one delivery into the write buffer, unless it exceeds the client's Maximum
    /// Packet Size (then false). Topic aliases are applied only to packets really written, or
    /// the client would miss a definition.
    fn write_publish(&mut self, d: &Delivery, packet_id: Option<u16>, dup: bool, now: Instant) -> bool {
        let v5 = self.version.is_v5();
        let m = &d.msg;
        let mut out = PublishOut {
            dup,
            qos: d.qos,
            retain: d.retain,
            topic: m.topic.as_bytes(),
            packet_id,
            payload: &m.payload,
            properties: if v5 { &m.props_v5[..] } else { &[] },
            message_expiry: if v5 { m.remaining_expiry(now) } else { None },
            subscription_ids: if v5 { &d.subscription_ids[..] } else { &[] },
            topic_alias: None,
        };
        if self.client_max_packet != usize::MAX && out.encoded_len(self.version) > self.client_max_packet {
            return false;
        }
        match self.out_aliases.apply(&m.topic) {
            aliases::AliasUse::None => {}
            aliases::AliasUse::Define(a) => out.topic_alias = Some(a),
            aliases::AliasUse::Reuse(a) => {
                out.topic_alias = Some(a);
                out.topic = b"";
            }
        }
        out.encode(self.version, &mut self.wbuf);
        true
    }

    /// Says goodbye as the close reason requires, publishes the will when due, and detaches.
    async fn finish<S: AsyncWrite + Unpin>(mut self, close: Close, stream: &mut S) {
        let v5 = self.version.is_v5();
        let (publish_will, why, reason_code) = match &close {
            Close::Client { publish_will } => (*publish_will, "client disconnected".to_string(), None),
            Close::Lost(what) => (true, (*what).to_string(), None),
            Close::Error { reason, what } => (true, what.clone(), Some(*reason)),
            Close::Kicked(reason) => {
                (*reason != reason::SERVER_SHUTTING_DOWN, kick_text(*reason).to_string(), Some(*reason))
            }
            Close::Silent(what) => (true, what.clone(), None),
        };
        if let (true, Some(code)) = (v5, reason_code) {
            self.wbuf.clear();
            self.encode(Packet::Disconnect(Disconnect { reason: code, properties: Properties::default() }));
            let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(&self.wbuf)).await;
        }
        let _ = tokio::time::timeout(Duration::from_secs(1), stream.shutdown()).await;
        info!(client_id = %self.client_id, peer = %self.peer, reason = %why, "client disconnected");
        let will = if publish_will { self.will.take() } else { None };
        self.broker.detach(&self.handle, self.connection_id, self.session_expiry);
        let Some(w) = will else { return };
        let delay = w.properties.will_delay_interval.unwrap_or(0).min(self.session_expiry);
        let msg = self.will_message(*w);
        if delay == 0 {
            self.broker.publish(msg, None);
            return;
        }
        // v5 Will Delay: published when the delay or the session ends, whichever is first,
        // unless the client has come back to the same session by then [MQTT-3.1.3-9].
        let broker = Arc::clone(&self.broker);
        let handle = Arc::clone(&self.handle);
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(u64::from(delay))).await;
            let resumed = {
                let cell = handle.lock();
                cell.owner != 0 && !cell.ended
            };
            if !resumed {
                broker.publish(msg, None);
            }
        });
    }

    fn will_message(&self, w: LastWill) -> Arc<Message> {
        let mut props = w.properties;
        props.will_delay_interval = None;
        Arc::new(Message::received(w.topic, w.payload, w.qos, w.retain, props, self.client_id.clone()))
    }
}

/// The enhanced-authentication state of a connection.
struct ConnAuth {
    method: Arc<dyn AuthMethod>,
    name: ByteString,
    /// A re-authentication in progress.
    exchange: Option<Box<dyn AuthExchange>>,
}

/// Runs the CONNECT-time exchange: AUTH 0x18 back and forth until the method decides.
/// Ok(data for CONNACK); Err(Some(code)) to refuse with CONNACK; Err(None) when the
/// connection is gone.
async fn authenticate<S: AsyncRead + AsyncWrite + Unpin>(
    method: &Arc<dyn AuthMethod>,
    name: &ByteString,
    c: &Connect,
    stream: &mut S,
    rbuf: &mut BytesMut,
    max_packet: usize,
) -> Result<Option<bytes::Bytes>, Option<u8>> {
    let data = c.properties.authentication_data.as_deref();
    let (mut exchange, mut step) = method.start(&c.client_id, c.username.as_deref(), data);
    loop {
        let challenge = match step {
            AuthStep::Success(d) => return Ok(d),
            AuthStep::Fail(code) => return Err(Some(code)),
            AuthStep::Continue(d) => d,
        };
        let properties = Properties {
            authentication_method: Some(name.clone()),
            authentication_data: challenge,
            ..Default::default()
        };
        let mut w = BytesMut::new();
        protocol::encode(
            &Packet::Auth(Auth { reason: reason::CONTINUE_AUTHENTICATION, properties }),
            ProtocolVersion::V5,
            &mut w,
        );
        stream.write_all(&w).await.map_err(|_| None)?;
        match read_packet(stream, rbuf, Some(ProtocolVersion::V5), max_packet).await {
            Ok(Packet::Auth(a))
                if a.reason == reason::CONTINUE_AUTHENTICATION
                    && a.properties.authentication_method.as_ref() == Some(name) =>
            {
                step = exchange.next(a.properties.authentication_data.as_deref());
            }
            // Anything else during the exchange is a Protocol Error [MQTT-4.12.0-4].
            Ok(_) => return Err(Some(reason::PROTOCOL_ERROR)),
            Err(ConnectError::Decode(e)) => return Err(Some(e.reason_code())),
            Err(ConnectError::Io) => return Err(None),
        }
    }
}

fn kick_text(reason: u8) -> &'static str {
    match reason {
        reason::SESSION_TAKEN_OVER => "session taken over",
        reason::SERVER_SHUTTING_DOWN => "server shutting down",
        _ => "closed by server",
    }
}

fn topic_within_limits(t: &str, cfg: &crate::config::Config) -> bool {
    t.len() <= cfg.limits.max_topic_length && level_count(t) <= cfg.limits.max_topic_levels
}

/// Unpredictable enough for assigned client ids, without a dependency: std's hasher is
/// seeded randomly per process, and mixing in the time and a counter keeps ids distinct.
fn random_u64() -> u64 {
    use std::collections::hash_map::RandomState;
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::AtomicU64;
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0));
    h.finish()
}
