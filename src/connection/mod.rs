//! One task per client connection: the CONNECT handshake, then a loop that reads and answers
//! packets, drains the session's queue into the socket, and enforces keep-alive.
//!
//! Owns the socket and per-connection protocol state (topic aliases, the will, keep-alive).
//! Session state it reaches only through the broker's `SessionHandle`. Writes are batched:
//! everything produced by one read or one wake-up is encoded into one buffer and written with
//! one call.

mod aliases;
mod handshake;
mod inbound;
mod outbound;

use handshake::{read_connect, ConnAuth, ConnectError};

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
/// Answers a connection the server has no room for: reads its CONNECT (briefly) and sends
/// CONNACK 0x03 Server unavailable (3.x) or 0x97 Quota exceeded (v5), then closes.
pub async fn refuse<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S, max_packet: usize) {
    let mut rbuf = BytesMut::new();
    let read = tokio::time::timeout(Duration::from_secs(2), read_connect(&mut stream, &mut rbuf, max_packet));
    if let Ok(Ok(c)) = read.await {
        let code = if c.protocol.is_v5() { reason::QUOTA_EXCEEDED } else { reason::v3::SERVER_UNAVAILABLE };
        let mut w = BytesMut::new();
        let ack = ConnAck { session_present: false, code, properties: Properties::default() };
        protocol::encode(&Packet::ConnAck(ack), c.protocol, &mut w);
        let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(&w)).await;
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), stream.shutdown()).await;
}

/// `rbuf` holds whatever the transport already read of the client's first bytes.
pub async fn serve<S>(
    mut stream: S,
    peer: SocketAddr,
    broker: Arc<Broker>,
    shutdown: watch::Receiver<bool>,
    mut rbuf: BytesMut,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let limits = &broker.config.limits;
    let max_packet = limits.max_packet_size as usize;
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
        // v5 Will Delay: published when the delay or the session ends, whichever is first,
        // unless the client has come back to the same session by then.
        self.broker.publish_will(&self.handle, msg, delay);
    }

    pub(super) fn will_message(&self, w: LastWill) -> Arc<Message> {
        let mut props = w.properties;
        props.will_delay_interval = None;
        Arc::new(Message::received(w.topic, w.payload, w.qos, w.retain, props, self.client_id.clone()))
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
