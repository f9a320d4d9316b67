//! One task per client connection: the CONNECT handshake, then a loop that reads and answers
//! packets and drains the session's queue into the socket. It waits on exactly two things,
//! the socket and its `ConnControl` (deliveries, store progress, kicks — keep-alive expiry
//! arrives as a kick from the broker's sweep), because whatever it waits on is kept in memory
//! by every idle connection.
//!
//! Owns the socket and per-connection protocol state (topic aliases, the will, the keep-alive
//! granted). Session state it reaches only through the broker's `SessionHandle`. Writes are batched:
//! everything produced by one read or one wake-up is encoded into one buffer and written with
//! one call.

mod aliases;
mod flow;
mod handshake;
mod inbound;
mod outbound;

use handshake::{read_connect, ConnAuth, ConnectError};

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use bytestring::ByteString;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tracing::{debug, info};

use crate::auth::{AuthExchange, AuthMethod, AuthStep, Login, Principal, Refusal};
use crate::broker::{input_order, signal, Broker, Replicated, RetainedBatch, SessionHandle, EXPIRY_NEVER};
use crate::link::{Link, Outbox, Qos2Received, RetainedCollector, Routed, Written};
use crate::message::Message;
use crate::protocol::{
    self, reason, topic, Auth, ConnAck, Connect, DecodeError, Disconnect, LastWill, Packet, Properties,
    ProtocolVersion, PubResp, Publish, PublishOut, QoS, SubAck, Subscribe, UnsubAck, Unsubscribe,
};
use crate::session::{Ack, Delivery};
use crate::store::Op;
use crate::topics::level_count;
use crate::transport::ConnInfo;

/// Encoded bytes gathered before a write; past this the loop writes and comes back for more,
/// so one busy subscriber cannot grow its buffer without bound.
const WRITE_BATCH: usize = 64 * 1024;
/// Read buffer space offered to the socket: small while a client is quiet (idle connections
/// should cost little memory), doubled each time a read fills it, up to the maximum.
const READ_MIN: usize = 64;
const READ_MAX: usize = 64 * 1024;
/// Write buffers up to this size are released when the connection goes idle.
const IDLE_WRITE_BUFFER: usize = 8 * 1024;

/// What ended a connection's wait (the keep-alive deadline arrives as a kick).
enum Woke {
    Signals(u8),
    /// The read's result, and the buffer space it was offered.
    Read(std::io::Result<usize>, usize),
}

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

/// Answers a connection the server has no room for: reads its CONNECT (briefly) and sends
/// CONNACK 0x03 Server unavailable (3.x) or 0x97 Quota exceeded (v5), then closes.
pub async fn refuse<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S, max_packet: usize) {
    let mut rbuf = BytesMut::new();
    let mut read = 0;
    let read =
        tokio::time::timeout(Duration::from_secs(2), read_connect(&mut stream, &mut rbuf, max_packet, &mut read));
    if let Ok(Ok(c)) = read.await {
        let code = if c.protocol.is_v5() { reason::QUOTA_EXCEEDED } else { reason::v3::SERVER_UNAVAILABLE };
        let w = refusal(c.protocol, code);
        let _ = tokio::time::timeout(Duration::from_secs(1), send(&mut stream, &w)).await;
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), stream.shutdown()).await;
}

/// Writes `bytes` and flushes them: TLS (and later WebSocket) streams keep written bytes in
/// their own buffer until flushed, so a write that is not flushed may never be sent.
async fn send<S: AsyncWrite + Unpin>(stream: &mut S, bytes: &[u8]) -> std::io::Result<()> {
    stream.write_all(bytes).await?;
    stream.flush().await
}

/// How long a connection the broker closed with a DISCONNECT reads (and discards) what its
/// client still sends, waiting for the client to close its side (`Conn::finish`).
const LINGER: Duration = Duration::from_secs(2);

/// Reads and discards until the peer closes, the stream fails, or `LINGER` has passed.
async fn drain_until_closed<S: AsyncRead + Unpin>(stream: &mut S) {
    let mut sink = [0u8; 512];
    let _ = tokio::time::timeout(LINGER, async {
        while let Ok(n) = stream.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
}

/// Serves one client over `stream` (plain TCP, TLS...) until it goes. `info` is what the
/// listener learnt of the peer; `rbuf` holds whatever the transport already read of the
/// client's first bytes; `on_end` is dropped when the connection is over.
///
/// Not an `async fn`: its arguments would be stored twice in the future (as arguments and
/// as locals), and this future is what every idle connection costs.
#[allow(clippy::manual_async_fn)]
pub fn serve<S, G>(
    mut stream: S,
    info: ConnInfo,
    broker: Arc<Broker>,
    rbuf: BytesMut,
    on_end: G,
) -> impl Future<Output = ()> + Send
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    G: Send + 'static,
{
    // What only the handshake needs travels in one box, freed when it is done: the future
    // keeps every captured value for the connection's life.
    let start = Box::new(Start { info, broker, rbuf });
    async move {
        // The handshake and goodbye phases are boxed too: a future is as large as its
        // largest phase.
        // (A `match`, not `if let`: the temporary `Option<Conn>` of an `if let` would stay in
        // the future next to `conn`.)
        let mut conn = match Box::pin(handshake(&mut stream, start)).await {
            Some(conn) => conn,
            None => return drop(on_end),
        };
        let close = conn.run(&mut stream).await;
        Box::pin(conn.finish(close, &mut stream)).await;
        // Named here so the future owns it (until now, or until it is dropped unfinished);
        // moving it into a local first would store it twice.
        drop(on_end);
    }
}

struct Start {
    info: ConnInfo,
    broker: Arc<Broker>,
    rbuf: BytesMut,
}

/// Reads CONNECT (within `limits.connect_timeout_secs`) and attaches the session. None when
/// the connection ends there.
async fn handshake<S: AsyncRead + AsyncWrite + Unpin>(stream: &mut S, start: Box<Start>) -> Option<Conn> {
    let Start { info, broker, mut rbuf } = *start;
    let peer = info.peer;
    let max_packet = broker.config.limits.max_packet_size as usize;
    let deadline = Duration::from_secs(broker.config.limits.connect_timeout_secs);
    // What the listener read before this task, and what the handshake reads (counted once
    // the client is in).
    let early = rbuf.len();
    let mut read = 0;
    let connect = match tokio::time::timeout(deadline, read_connect(stream, &mut rbuf, max_packet, &mut read)).await {
        Err(_) => {
            debug!(%peer, "no CONNECT within {}s, closing", deadline.as_secs());
            return None;
        }
        Ok(Err(ConnectError::Io)) => return None,
        Ok(Err(ConnectError::Decode(e))) => {
            refuse_version(stream, peer, e).await;
            return None;
        }
        Ok(Ok(c)) => c,
    };
    let mut conn = Conn::accept(connect, info, &broker, stream, &mut rbuf).await?;
    let m = &broker.metrics;
    m.bytes_received.fetch_add(read.saturating_add(early) as u64, Ordering::Relaxed);
    m.packets_received.fetch_add(1, Ordering::Relaxed);
    conn.rbuf = rbuf;
    Some(conn)
}

/// A first packet that is not a usable CONNECT: [MQTT-3.1.2-2] answers an unsupported
/// protocol version with CONNACK 0x01 (v3) / 0x84 (v5); anything else just closes.
async fn refuse_version<S: AsyncWrite + Unpin>(stream: &mut S, peer: SocketAddr, e: DecodeError) {
    debug!(%peer, error = %e, "bad first packet, closing");
    if let DecodeError::UnsupportedProtocol { level, name_is_mqtt } = e {
        let (version, code) = if level == 5 && name_is_mqtt {
            (ProtocolVersion::V5, reason::UNSUPPORTED_PROTOCOL_VERSION)
        } else {
            (ProtocolVersion::V311, reason::v3::UNACCEPTABLE_PROTOCOL_VERSION)
        };
        let _ = send(stream, &refusal(version, code)).await;
    }
}

/// The CONNACK refusing a CONNECT with `code` (no session, no properties).
fn refusal(version: ProtocolVersion, code: u8) -> BytesMut {
    let mut w = BytesMut::new();
    let ack = ConnAck { session_present: false, code, properties: Properties::default() };
    protocol::encode(&Packet::ConnAck(ack), version, &mut w);
    w
}

struct Conn {
    /// The session this connection serves, and everything about it that is not MQTT bytes.
    link: Link,
    version: ProtocolVersion,
    peer: SocketAddr,
    /// Seconds granted; 0 = no keep-alive.
    keep_alive: u16,
    /// The enhanced-authentication method the client connected with (v5), for
    /// re-authentication.
    auth: Option<Box<ConnAuth>>,
    /// Boxed: a will with its properties is large, and most clients have none.
    will: Option<Box<LastWill>>,
    session_expiry: u32,
    /// The client said it is a bridge (3.x protocol level | 0x80): it never gets back its own
    /// publishes, as if every subscription had No Local, so two brokers bridged both ways do
    /// not echo messages.
    bridge_peer: bool,
    /// Expiry asked for in CONNECT was 0: a DISCONNECT may not raise it [MQTT-3.14.2-2].
    connect_expiry_zero: bool,
    /// Largest packet the client accepts (v5 Maximum Packet Size).
    client_max_packet: usize,
    /// Topic aliases towards the client (v5, when it accepts some).
    /// Boxed and absent unless used: most clients have no aliases.
    out_aliases: Option<Box<aliases::OutboundAliases>>,
    // Boxed on purpose: an empty HashMap is still 48 bytes in every connection's task.
    #[allow(clippy::box_collection)]
    inbound_aliases: Option<Box<HashMap<u16, ByteString>>>,
    rbuf: BytesMut,
    wbuf: BytesMut,
    /// Acknowledgements held until the store has made their effects durable, in the order
    /// they must go out [MQTT-4.6.0-2..4].
    held: VecDeque<HeldAck>,
    /// The store ticket this connection asked to be woken for (`Broker::wait_durable`).
    durable_wait: u64,
    /// Signals taken from `control` while writing, for the main loop to act on.
    signals: u8,
    /// Subscribers whose full queues this connection's publishes wait on (flow control);
    /// None while it may publish freely. Boxed: most connections never wait.
    flow: Option<Box<flow::Flow>>,
    /// A write was cut off mid-packet (kicked while the client was not reading): no DISCONNECT
    /// may follow, the stream just ends.
    broken_stream: bool,
    /// Input waits for a bound to clear (`input_blocked`): the socket is not read, whole
    /// packets may wait in `rbuf`, and the keep-alive is not watched (the client's silence
    /// is ours).
    paused: bool,
    /// The cluster claim of this connection's client id (`ClusterOwners`), given back when
    /// the connection is dropped, after its session is detached; 0 = none (a single node).
    claim: u64,
    /// The revision of this connection's will as the cluster keeps it (`ClusterWills`),
    /// dropped once the will is dealt with; 0 = none.
    will_rev: u64,
}

/// An acknowledgement waiting for a store ticket, and retained messages to queue after it
/// (a SUBACK precedes the retained messages of its subscription).
struct HeldAck {
    ticket: u64,
    /// In a cluster: the other nodes' copy of the publish this acknowledges.
    replicated: Option<Arc<Replicated>>,
    packet: Packet,
    /// Retained messages of a SUBSCRIBE, queued once its SUBACK is sent.
    then: Option<Box<RetainedBatch>>,
}

impl Conn {
    async fn run<S: AsyncRead + AsyncWrite + Unpin>(&mut self, stream: &mut S) -> Close {
        // Server shutdown sets the flag, then kicks every attached connection; one that
        // attached after the kicks went out sees the flag here, once.
        if self.link.broker.shutting_down() {
            return Close::Kicked(reason::SERVER_SHUTTING_DOWN);
        }
        if self.keep_alive > 0 {
            // [MQTT-3.1.2-24]: the broker's keep-alive sweep kicks a silent connection.
            self.link.broker.watch_keep_alive(&self.link.control, self.keep_alive);
        }
        // Packets that came in the same read as CONNECT: nothing would wake the loop for them.
        if !self.rbuf.is_empty() {
            if let Err(close) = self.process_input() {
                // The flushes on the way out are boxed: this future is part of every idle
                // connection's task, and the state of an inline flush held next to a
                // `Close` made it 64 bytes larger, past tokio's next task size.
                let _ = Box::pin(self.flush(stream)).await;
                return close;
            }
        }
        let mut read_hint = READ_MIN;
        let mut more = true;
        loop {
            if let Err(close) = self.release_held() {
                let _ = Box::pin(self.flush(stream)).await;
                return close;
            }
            if (more || !self.wbuf.is_empty()) && self.write_ready() {
                more = self.drain();
                if self.write_ready() {
                    if let Err(close) = self.flush(stream).await {
                        return close;
                    }
                }
                if more {
                    // Keep reading between big batches so acks are not starved.
                    tokio::task::yield_now().await;
                }
            }
            let can_write = self.write_ready();
            // A bound reached stops the reading; once it clears, what waits in the read buffer
            // is handled before anything more is read.
            let backlog = self.link.broker.store_backlog();
            let cluster_backlog = self.link.broker.cluster_backlogged();
            if backlog.is_some() || self.held_full() || cluster_backlog {
                self.pause_input();
                if cluster_backlog {
                    self.link.broker.wait_cluster_drained(&self.link.control);
                }
            } else if self.paused {
                if let Err(close) = self.resume_input() {
                    let _ = Box::pin(self.flush(stream)).await;
                    return close;
                }
                more = true;
                continue;
            }
            if let Some(ticket) = self.durable_needed(can_write, backlog) {
                if ticket != self.durable_wait {
                    self.durable_wait = ticket;
                    self.link.broker.wait_durable(ticket, &self.link.control);
                    // Done before the wait was registered: go round again.
                    if self.link.broker.outcome(ticket).is_some() {
                        continue;
                    }
                }
            }
            if self.rbuf.is_empty() && self.rbuf.capacity() > 2 * read_hint {
                // Quiet again after a burst: drop the big buffer (payloads still using it
                // keep their part alive).
                self.rbuf = BytesMut::new();
            }
            // Whatever comes first: a signal or bytes from the client.
            // Polled by hand rather than with `select!`, whose branch futures every waiting
            // connection would carry.
            let control = &self.link.control;
            let signals = &mut self.signals;
            let rbuf = &mut self.rbuf;
            let wbuf = &mut self.wbuf;
            let flow = &mut self.flow;
            let paused = self.paused;
            let woke = std::future::poll_fn(|cx| {
                let mut bits = std::mem::take(signals);
                if let Poll::Ready(b) = control.poll_signals(cx) {
                    bits |= b;
                }
                if let Some(f) = flow.as_mut() {
                    if f.poll_deadline(cx).is_ready() {
                        bits |= signal::FLOW;
                    }
                }
                if bits != 0 {
                    return Poll::Ready(Woke::Signals(bits));
                }
                if more && can_write {
                    // The last drain stopped at a full batch: come straight back for the rest
                    // (the signal that announced those messages has been used).
                    return Poll::Ready(Woke::Signals(0));
                }
                if paused {
                    // Deliveries still go out (a signal ends this wait); the client's input
                    // waits for the store (DURABLE), so TCP slows the client down.
                    return Poll::Pending;
                }
                if flow.as_ref().is_some_and(|f| f.stop_reading()) {
                    // Waiting for room with as much input put aside as allowed: the client
                    // is slowed down by TCP until the subscribers catch up.
                    return Poll::Pending;
                }
                rbuf.reserve(read_hint);
                let offered = rbuf.capacity() - rbuf.len();
                // The socket wakes the task through its control block, which notes the order
                // in which input reached an idle broker (`input_order`); `poll_signals` above
                // stored the waker it wakes.
                let waker = Waker::from(Arc::clone(control));
                let mut read_cx = Context::from_waker(&waker);
                // A fresh read future each poll: it holds nothing between polls.
                if let Poll::Ready(r) = std::pin::pin!(stream.read_buf(&mut *rbuf)).poll(&mut read_cx) {
                    return Poll::Ready(Woke::Read(r, offered));
                }
                // Going to sleep: an idle connection keeps no buffers (a large write buffer
                // stays, as its client is likely busy again soon).
                if rbuf.is_empty() {
                    *rbuf = BytesMut::new();
                }
                if wbuf.is_empty() && wbuf.capacity() <= IDLE_WRITE_BUFFER {
                    *wbuf = BytesMut::new();
                }
                Poll::Pending
            })
            .await;
            // Input that reached an idle broker is handled in the order it came, across
            // connections: wait for the connections woken before this one.
            let mut ticket = self.link.control.take_ticket();
            if ticket != 0 {
                if matches!(woke, Woke::Read(Ok(n), _) if n > 0) {
                    input_order::wait_turn(ticket).await;
                } else {
                    // Nothing read: nothing for later connections to wait for.
                    input_order::done(std::mem::take(&mut ticket));
                }
            }
            match woke {
                Woke::Signals(bits) => {
                    if bits & signal::KICK != 0 {
                        return Close::Kicked(self.link.control.reason());
                    }
                    if bits & signal::DELIVERY != 0 {
                        more = true;
                    }
                    if bits & signal::FLOW != 0 {
                        if let Err(close) = self.check_flow() {
                            let _ = Box::pin(self.flush(stream)).await;
                            return close;
                        }
                        more = true;
                    }
                }
                Woke::Read(Ok(0), _) => match self.flow.as_mut() {
                    // What was put aside is still handled, in order, once there is room.
                    Some(f) if f.has_stash() => f.client_closed(),
                    _ => return Close::Lost("connection closed by client"),
                },
                Woke::Read(Err(_), _) => return Close::Lost("socket error"),
                Woke::Read(Ok(n), offered) => {
                    self.link.control.seen(self.link.broker.tick());
                    self.link.broker.metrics.bytes_received.fetch_add(n as u64, Ordering::Relaxed);
                    if n == offered && read_hint < READ_MAX {
                        read_hint *= 2;
                    } else if n < offered / 4 && read_hint > READ_MIN {
                        read_hint /= 2;
                    }
                    let processed = self.process_input();
                    input_order::done(ticket);
                    if let Err(close) = processed {
                        // Flush acks produced before the failure, then close.
                        let _ = Box::pin(self.flush(stream)).await;
                        return close;
                    }
                    more = true;
                }
            }
        }
    }

    /// The store ticket the loop must be woken for: the oldest held acknowledgement's, the
    /// write buffer's when it may not be written yet, or the store backlog's.
    fn durable_needed(&self, can_write: bool, backlog: Option<u64>) -> Option<u64> {
        let held = self.held.front().map(|h| h.ticket).filter(|&t| t > 0);
        let write = (!can_write).then_some(self.link.write_ticket());
        held.into_iter().chain(write).chain(backlog).min()
    }

    /// This connection holds `limits.max_held_acks` acknowledgements. Counted during flow
    /// control too, which holds every acknowledgement back: a subscriber that is always a
    /// little slower than its publisher keeps flow control on nearly all the time, and the
    /// held acknowledgements would grow without bound.
    fn held_full(&self) -> bool {
        self.held.len() >= self.link.broker.config.limits.max_held_acks
    }

    /// Whether the client's input must wait: this connection holds as many acknowledgements
    /// as allowed, the store's backlog is over `storage.max_pending_bytes` (a slow disk
    /// then slows publishers down, through TCP, instead of growing memory), or, in a
    /// cluster, too many messages wait for NATS (a burst is slowed down rather than dropped
    /// on its way to the other nodes). Checked before
    /// every packet, so one read cannot go past either bound by more than a packet; what flow
    /// control put aside (at most 128 KiB of input) is still handled when it ends.
    ///
    /// Nothing the loop does while paused waits for the client: the commit thread drains the
    /// store by itself (the cluster's publishing task its queue), held acknowledgements go out as it does (or once flow control ends),
    /// and deliveries are still written. Like a full flow-control stash, a pause leaves the
    /// acknowledgements of the client's own deliveries unread too; two clients publishing
    /// into each other's full queues while both are paused are untangled by
    /// `limits.slow_consumer_secs`, as with flow control.
    pub(super) fn input_blocked(&self) -> bool {
        self.held_full() || self.link.broker.store_backlog().is_some() || self.link.broker.cluster_backlogged()
    }

    /// Stops taking input until `resume_input`.
    pub(super) fn pause_input(&mut self) {
        if self.paused {
            return;
        }
        self.paused = true;
        self.link.broker.metrics.inputs_paused.fetch_add(1, Ordering::Relaxed);
        if self.keep_alive > 0 {
            // Unread by our choice, the client must not be cut off for its silence; watched
            // again from the moment reading resumes.
            self.link.broker.forget_keep_alive(&self.link.control);
        }
    }

    /// The bound has cleared: the keep-alive is watched again (from now), and the packets
    /// left in the read buffer are handled (they may pause the input again).
    fn resume_input(&mut self) -> Result<(), Close> {
        self.paused = false;
        self.link.broker.metrics.inputs_paused.fetch_sub(1, Ordering::Relaxed);
        if self.keep_alive > 0 {
            self.link.broker.watch_keep_alive(&self.link.control, self.keep_alive);
        }
        self.process_input()
    }

    /// Writes the buffer, giving up if the connection is kicked meanwhile (a client that stops
    /// reading must not keep its task alive after takeover). Other signals that arrive while
    /// writing are kept for the main loop.
    async fn flush<S: AsyncWrite + Unpin>(&mut self, stream: &mut S) -> Result<(), Close> {
        if self.wbuf.is_empty() {
            return Ok(());
        }
        let mut written = 0;
        let control = &self.link.control;
        let signals = &mut self.signals;
        let wbuf = &self.wbuf;
        let result = std::future::poll_fn(|cx| {
            // Written, then flushed: a TLS stream holds records until it is flushed.
            let progress = loop {
                if written < wbuf.len() {
                    match Pin::new(&mut *stream).poll_write(cx, &wbuf[written..]) {
                        Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => {
                            return Poll::Ready(Err(Close::Lost("write failed")))
                        }
                        Poll::Ready(Ok(n)) => written += n,
                        Poll::Pending => break Poll::Pending,
                    }
                } else {
                    break Pin::new(&mut *stream).poll_flush(cx);
                }
            };
            match progress {
                Poll::Ready(Ok(())) => Poll::Ready(Ok(())),
                Poll::Ready(Err(_)) => Poll::Ready(Err(Close::Lost("write failed"))),
                Poll::Pending => {
                    while let Poll::Ready(bits) = control.poll_signals(cx) {
                        *signals |= bits;
                        if bits & signal::KICK != 0 {
                            return Poll::Ready(Err(Close::Kicked(control.reason())));
                        }
                    }
                    Poll::Pending
                }
            }
        })
        .await;
        if result.is_err() && written > 0 && written < self.wbuf.len() {
            // Cut off mid-packet: anything more would be read as the rest of that packet.
            self.broken_stream = true;
        }
        if result.is_ok() {
            let m = &self.link.broker.metrics;
            m.bytes_sent.fetch_add(written as u64, Ordering::Relaxed);
            m.packets_sent.fetch_add(count_packets(&self.wbuf), Ordering::Relaxed);
        }
        if self.wbuf.capacity() > 4 * WRITE_BATCH {
            // A burst grew the buffer; give the memory back rather than keep it per client.
            self.wbuf = BytesMut::new();
        } else {
            self.wbuf.clear();
        }
        result
    }

    /// Says goodbye as the close reason requires, publishes the will when due, and detaches.
    async fn finish<S: AsyncRead + AsyncWrite + Unpin>(mut self, close: Close, stream: &mut S) {
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
        let mut said = false;
        if let (true, Some(code), false) = (v5, reason_code, self.broken_stream) {
            self.wbuf.clear();
            self.encode(Packet::Disconnect(Disconnect { reason: code, properties: Properties::default() }));
            said = matches!(tokio::time::timeout(Duration::from_secs(1), send(stream, &self.wbuf)).await, Ok(Ok(())));
        }
        let _ = tokio::time::timeout(Duration::from_secs(1), stream.shutdown()).await;
        // After telling a client why, read what it still sends until it closes too (or for
        // LINGER): closing with its bytes unread would answer them with a reset, which makes
        // its next write fail and can discard our DISCONNECT from its receive buffer before
        // it reads the reason (a client that keeps publishing, say past Receive Maximum).
        // Not at shutdown, which must not wait for clients.
        let linger = said && reason_code != Some(reason::SERVER_SHUTTING_DOWN);
        info!(client_id = %self.link.client_id(), peer = %self.peer, reason = %why, "client disconnected");
        let will = if publish_will { self.will.take() } else { None };
        self.link.detach(self.session_expiry);
        if let Some(w) = will {
            let delay = w.properties.will_delay_interval.unwrap_or(0).min(self.session_expiry);
            let msg = self.will_message(*w);
            // v5 Will Delay: published when the delay or the session ends, whichever is first,
            // unless the client has come back to the same session by then; with its owner's
            // rights at that moment.
            self.link.broker.publish_will(&self.link.handle, msg, delay, Some(Arc::clone(&self.link.principal)));
        }
        if let (true, Some(wills)) = (self.will_rev != 0, self.link.broker.cluster_wills()) {
            wills.done(self.link.client_id(), self.will_rev).await;
        }
        if linger {
            drop(self); // its buffers are not needed while lingering
            drain_until_closed(stream).await;
        }
    }

    pub(super) fn will_message(&self, w: LastWill) -> Arc<Message> {
        let mut props = w.properties;
        props.will_delay_interval = None;
        Arc::new(Message::received(w.topic, w.payload, w.qos, w.retain, props, self.link.client_id().clone()))
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        // A place in the order of input taken since the last read is given back.
        input_order::done(self.link.control.take_ticket());
        // Acknowledgements still held die with the connection; the gauge must forget them.
        if !self.held.is_empty() {
            let n = u64::try_from(self.held.len()).unwrap_or(u64::MAX);
            self.link.broker.metrics.acks_held.fetch_sub(n, Ordering::Relaxed);
        }
        if self.paused {
            self.link.broker.metrics.inputs_paused.fetch_sub(1, Ordering::Relaxed);
        }
        // Here rather than in `finish`, so that a connection that never gets there (its
        // task dropped) still gives its claim back: the id must not look served for ever.
        if let (true, Some(owners)) = (self.claim != 0, self.link.broker.owners()) {
            owners.released(self.link.client_id(), self.claim);
        }
    }
}

/// Packets in `buf`, which holds whole encoded packets: counted by walking their fixed
/// headers (type byte, remaining length), without decoding them.
fn count_packets(buf: &[u8]) -> u64 {
    let mut n = 0;
    let mut at = 0usize;
    while at < buf.len() {
        let mut len = 0usize;
        let mut shift = 0;
        let mut i = at + 1;
        loop {
            let Some(&b) = buf.get(i) else { return n + 1 };
            len |= usize::from(b & 0x7F) << shift;
            i += 1;
            if b & 0x80 == 0 || shift >= 21 {
                break;
            }
            shift += 7;
        }
        n += 1;
        at = i.saturating_add(len);
    }
    n
}

fn kick_text(reason: u8) -> &'static str {
    match reason {
        reason::SESSION_TAKEN_OVER => "session taken over",
        reason::SERVER_SHUTTING_DOWN => "server shutting down",
        reason::KEEP_ALIVE_TIMEOUT => "keep-alive timeout",
        _ => "closed by server",
    }
}

fn topic_within_limits(t: &str, cfg: &crate::config::Config) -> bool {
    t.len() <= cfg.limits.max_topic_length && level_count(t) <= cfg.limits.max_topic_levels
}
