//! Shared helpers of the integration tests: an in-process broker on port 0, a raw MQTT
//! client over `TcpStream` with hand-built packets, and thin wrappers around `rumqttc`.
//!
//! Every wait is bounded, so a broken broker fails a test instead of hanging it.
#![allow(dead_code)]

pub mod nats;
pub mod process;
pub mod tls;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// Longest wait for something that should happen.
pub const WAIT: Duration = Duration::from_secs(3);
/// Wait used to assert that something does not happen.
pub const QUIET: Duration = Duration::from_millis(400);

// ---------------------------------------------------------------------------------------------
// Broker
// ---------------------------------------------------------------------------------------------

pub struct TestBroker {
    pub handle: tern::BrokerHandle,
    pub addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl TestBroker {
    pub fn port(&self) -> u16 {
        self.addr.port()
    }
}

/// A broker with default settings on 127.0.0.1:0.
pub async fn start() -> TestBroker {
    start_with(|_| {}).await
}

/// A broker on 127.0.0.1:0 with settings tweaked by `f`.
pub async fn start_with(f: impl FnOnce(&mut tern::Config)) -> TestBroker {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut c = tern::Config::default();
    c.listener[0].bind = "127.0.0.1:0".into();
    c.storage.dir = dir.path().to_path_buf();
    f(&mut c);
    let handle = tern::start(c).await.expect("broker starts");
    let addr = handle.local_addr();
    TestBroker { handle, addr, _dir: dir }
}

/// Polls `cond` every 20 ms until it holds and returns how long that took (from the call);
/// panics naming `what` once `limit` has passed. For waiting on something that should happen,
/// instead of sleeping a fixed time and then asserting it.
pub async fn poll_until(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) -> Duration {
    let t0 = Instant::now();
    while !cond() {
        assert!(t0.elapsed() < limit, "timed out after {limit:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    t0.elapsed()
}

// ---------------------------------------------------------------------------------------------
// Packet building
// ---------------------------------------------------------------------------------------------

pub fn hex(b: &[u8]) -> String {
    let shown: Vec<String> = b.iter().take(64).map(|x| format!("{x:02X}")).collect();
    let more = if b.len() > 64 { format!(" ... ({} bytes)", b.len()) } else { String::new() };
    format!("{}{more}", shown.join(" "))
}

pub fn varint(mut n: usize) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let mut byte = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if n == 0 {
            return out;
        }
    }
}

/// A length-prefixed MQTT string or binary.
pub fn mqtt_str(s: &[u8]) -> Vec<u8> {
    let mut out = (s.len() as u16).to_be_bytes().to_vec();
    out.extend_from_slice(s);
    out
}

/// Fixed header byte + remaining length + body.
pub fn packet(header: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![header];
    out.extend(varint(body.len()));
    out.extend_from_slice(body);
    out
}

/// v5 property block: length + properties.
pub fn props(p: &[u8]) -> Vec<u8> {
    let mut out = varint(p.len());
    out.extend_from_slice(p);
    out
}

pub fn prop_u8(id: u8, v: u8) -> Vec<u8> {
    vec![id, v]
}

pub fn prop_u16(id: u8, v: u16) -> Vec<u8> {
    let mut out = vec![id];
    out.extend(v.to_be_bytes());
    out
}

pub fn prop_u32(id: u8, v: u32) -> Vec<u8> {
    let mut out = vec![id];
    out.extend(v.to_be_bytes());
    out
}

pub const PROP_PAYLOAD_FORMAT: u8 = 0x01;
pub const PROP_SESSION_EXPIRY: u8 = 0x11;
pub const PROP_ASSIGNED_CLIENT_ID: u8 = 0x12;
pub const PROP_RECEIVE_MAXIMUM: u8 = 0x21;
pub const PROP_WILL_DELAY: u8 = 0x18;

#[derive(Clone, Debug)]
pub struct Will {
    pub topic: String,
    pub payload: Vec<u8>,
    pub qos: u8,
    pub retain: bool,
}

impl Will {
    pub fn new(topic: &str, payload: &[u8], qos: u8) -> Will {
        Will { topic: topic.into(), payload: payload.to_vec(), qos, retain: false }
    }
}

/// A CONNECT packet under construction.
#[derive(Clone, Debug)]
pub struct Connect {
    pub protocol_name: &'static str,
    pub level: u8,
    pub client_id: String,
    pub clean: bool,
    pub keep_alive: u16,
    pub will: Option<Will>,
    /// v5 CONNECT properties (without the length).
    pub properties: Vec<u8>,
    pub username: Option<String>,
    pub password: Option<Vec<u8>>,
}

impl Connect {
    pub fn v311(client_id: &str) -> Connect {
        Connect {
            protocol_name: "MQTT",
            level: 4,
            client_id: client_id.into(),
            clean: true,
            keep_alive: 30,
            will: None,
            properties: Vec::new(),
            username: None,
            password: None,
        }
    }

    /// User Name and Password.
    pub fn login(mut self, username: &str, password: &str) -> Connect {
        self.username = Some(username.into());
        self.password = Some(password.as_bytes().to_vec());
        self
    }

    /// User Name without a password.
    pub fn user(mut self, username: &str) -> Connect {
        self.username = Some(username.into());
        self
    }

    pub fn v31(client_id: &str) -> Connect {
        Connect { protocol_name: "MQIsdp", level: 3, ..Connect::v311(client_id) }
    }

    pub fn v5(client_id: &str) -> Connect {
        Connect { level: 5, ..Connect::v311(client_id) }
    }

    pub fn clean(mut self, clean: bool) -> Connect {
        self.clean = clean;
        self
    }

    pub fn keep_alive(mut self, secs: u16) -> Connect {
        self.keep_alive = secs;
        self
    }

    pub fn will(mut self, w: Will) -> Connect {
        self.will = Some(w);
        self
    }

    /// v5 Session Expiry Interval.
    pub fn expiry(mut self, secs: u32) -> Connect {
        self.properties.extend(prop_u32(PROP_SESSION_EXPIRY, secs));
        self
    }

    pub fn is_v5(&self) -> bool {
        self.level == 5
    }

    pub fn bytes(&self) -> Vec<u8> {
        let mut body = mqtt_str(self.protocol_name.as_bytes());
        body.push(self.level);
        let mut flags = 0u8;
        if self.clean {
            flags |= 0x02;
        }
        if let Some(w) = &self.will {
            flags |= 0x04 | (w.qos << 3);
            if w.retain {
                flags |= 0x20;
            }
        }
        if self.username.is_some() {
            flags |= 0x80;
        }
        if self.password.is_some() {
            flags |= 0x40;
        }
        body.push(flags);
        body.extend(self.keep_alive.to_be_bytes());
        if self.is_v5() {
            body.extend(props(&self.properties));
        }
        body.extend(mqtt_str(self.client_id.as_bytes()));
        if let Some(w) = &self.will {
            if self.is_v5() {
                body.push(0); // no will properties
            }
            body.extend(mqtt_str(w.topic.as_bytes()));
            body.extend(mqtt_str(&w.payload));
        }
        if let Some(u) = &self.username {
            body.extend(mqtt_str(u.as_bytes()));
        }
        if let Some(p) = &self.password {
            body.extend(mqtt_str(p));
        }
        packet(0x10, &body)
    }
}

/// A PUBLISH packet; `props` only for v5 (`None` = 3.1.1 layout).
pub fn publish_full(
    topic: &[u8],
    payload: &[u8],
    qos: u8,
    pid: u16,
    retain: bool,
    dup: bool,
    v5_props: Option<&[u8]>,
) -> Vec<u8> {
    let mut header = 0x30 | (qos << 1);
    if retain {
        header |= 0x01;
    }
    if dup {
        header |= 0x08;
    }
    let mut body = mqtt_str(topic);
    if qos > 0 {
        body.extend(pid.to_be_bytes());
    }
    if let Some(p) = v5_props {
        body.extend(props(p));
    }
    body.extend_from_slice(payload);
    packet(header, &body)
}

/// A 3.1.1 PUBLISH without retain or DUP.
pub fn publish(topic: &str, payload: &[u8], qos: u8, pid: u16) -> Vec<u8> {
    publish_full(topic.as_bytes(), payload, qos, pid, false, false, None)
}

/// SUBSCRIBE; each filter with its options byte (the QoS, for 3.1.1).
pub fn subscribe_pkt(v5: bool, pid: u16, filters: &[(&str, u8)]) -> Vec<u8> {
    let mut body = pid.to_be_bytes().to_vec();
    if v5 {
        body.push(0);
    }
    for (f, o) in filters {
        body.extend(mqtt_str(f.as_bytes()));
        body.push(*o);
    }
    packet(0x82, &body)
}

pub fn unsubscribe_pkt(v5: bool, pid: u16, filters: &[&str]) -> Vec<u8> {
    let mut body = pid.to_be_bytes().to_vec();
    if v5 {
        body.push(0);
    }
    for f in filters {
        body.extend(mqtt_str(f.as_bytes()));
    }
    packet(0xA2, &body)
}

pub fn puback(pid: u16) -> Vec<u8> {
    packet(0x40, &pid.to_be_bytes())
}
pub fn pubrec(pid: u16) -> Vec<u8> {
    packet(0x50, &pid.to_be_bytes())
}
pub fn pubrel(pid: u16) -> Vec<u8> {
    packet(0x62, &pid.to_be_bytes())
}
pub fn pubcomp(pid: u16) -> Vec<u8> {
    packet(0x70, &pid.to_be_bytes())
}

pub const PINGREQ: [u8; 2] = [0xC0, 0x00];
pub const PINGRESP: [u8; 2] = [0xD0, 0x00];
pub const DISCONNECT: [u8; 2] = [0xE0, 0x00];

// ---------------------------------------------------------------------------------------------
// Packet parsing
// ---------------------------------------------------------------------------------------------

/// Reads a variable byte integer; returns (value, bytes used).
pub fn read_varint(b: &[u8]) -> Option<(usize, usize)> {
    let mut value = 0usize;
    for (i, byte) in b.iter().enumerate().take(4) {
        value |= usize::from(byte & 0x7F) << (7 * i);
        if byte & 0x80 == 0 {
            return Some((value, i + 1));
        }
    }
    None
}

/// Header byte and body (after the remaining length) of one whole packet.
pub fn split_packet(p: &[u8]) -> (u8, &[u8]) {
    let (len, used) = read_varint(&p[1..]).expect("valid remaining length");
    let body = &p[1 + used..];
    assert_eq!(body.len(), len, "remaining length of {}", hex(p));
    (p[0], body)
}

/// v5 properties as (identifier, value); strings and binaries without their length prefix.
pub fn parse_props(mut b: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut out = Vec::new();
    while !b.is_empty() {
        let id = b[0];
        b = &b[1..];
        let n = match id {
            0x01 | 0x17 | 0x19 | 0x24 | 0x25 | 0x28 | 0x29 | 0x2A => 1,
            0x13 | 0x21 | 0x22 | 0x23 => 2,
            0x02 | 0x11 | 0x18 | 0x27 => 4,
            0x0B => read_varint(b).expect("varint property").1,
            0x03 | 0x08 | 0x12 | 0x15 | 0x1A | 0x1C | 0x1F | 0x09 | 0x16 => {
                let l = usize::from(u16::from_be_bytes([b[0], b[1]]));
                out.push((id, b[2..2 + l].to_vec()));
                b = &b[2 + l..];
                continue;
            }
            0x26 => {
                let l1 = usize::from(u16::from_be_bytes([b[0], b[1]]));
                let l2 = usize::from(u16::from_be_bytes([b[2 + l1], b[3 + l1]]));
                let n = 4 + l1 + l2;
                out.push((id, b[..n].to_vec()));
                b = &b[n..];
                continue;
            }
            other => panic!("unknown property 0x{other:02X}"),
        };
        out.push((id, b[..n].to_vec()));
        b = &b[n..];
    }
    out
}

/// Reads a v5 property block at the start of `b`; returns the properties and the rest.
pub fn take_props(b: &[u8]) -> (Vec<(u8, Vec<u8>)>, &[u8]) {
    let (len, used) = read_varint(b).expect("property length");
    (parse_props(&b[used..used + len]), &b[used + len..])
}

#[derive(Debug)]
pub struct ConnAck {
    pub session_present: bool,
    pub code: u8,
    pub props: Vec<(u8, Vec<u8>)>,
}

impl ConnAck {
    pub fn prop(&self, id: u8) -> Option<&[u8]> {
        self.props.iter().find(|(i, _)| *i == id).map(|(_, v)| v.as_slice())
    }
}

pub fn parse_connack(p: &[u8], v5: bool) -> ConnAck {
    let (h, body) = split_packet(p);
    assert_eq!(h, 0x20, "expected CONNACK, got {}", hex(p));
    assert!(body.len() >= 2, "short CONNACK {}", hex(p));
    let props = if v5 && body.len() > 2 { take_props(&body[2..]).0 } else { Vec::new() };
    ConnAck { session_present: body[0] & 1 == 1, code: body[1], props }
}

/// A PUBLISH as a client sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Pub {
    pub dup: bool,
    pub qos: u8,
    pub retain: bool,
    pub topic: String,
    pub pid: Option<u16>,
    pub props: Vec<(u8, Vec<u8>)>,
    pub payload: Vec<u8>,
}

pub fn parse_publish(p: &[u8], v5: bool) -> Pub {
    let (h, body) = split_packet(p);
    assert_eq!(h >> 4, 3, "expected PUBLISH, got {}", hex(p));
    let qos = (h >> 1) & 3;
    let tl = usize::from(u16::from_be_bytes([body[0], body[1]]));
    let topic = String::from_utf8(body[2..2 + tl].to_vec()).expect("utf-8 topic");
    let mut rest = &body[2 + tl..];
    let pid = if qos > 0 {
        let id = u16::from_be_bytes([rest[0], rest[1]]);
        rest = &rest[2..];
        Some(id)
    } else {
        None
    };
    let mut props = Vec::new();
    if v5 {
        let (p, r) = take_props(rest);
        props = p;
        rest = r;
    }
    Pub { dup: h & 0x08 != 0, qos, retain: h & 1 == 1, topic, pid, props, payload: rest.to_vec() }
}

// ---------------------------------------------------------------------------------------------
// Raw client
// ---------------------------------------------------------------------------------------------

#[derive(Debug)]
pub enum Event {
    Packet(Vec<u8>),
    Closed,
    Timeout,
}

/// A hand-driven MQTT client: exact bytes out, whole packets in.
/// Any byte stream a test client speaks MQTT over (TCP, TLS).
pub trait Stream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin> Stream for T {}

pub struct Raw {
    stream: Box<dyn Stream>,
    buf: Vec<u8>,
    pub v5: bool,
}

impl Raw {
    pub async fn open(addr: SocketAddr) -> Raw {
        let stream =
            tokio::time::timeout(WAIT, TcpStream::connect(addr)).await.expect("connect timeout").expect("connect");
        stream.set_nodelay(true).expect("nodelay");
        Raw::over(stream)
    }

    /// The stream, for tests that drive it by hand from here on.
    pub fn into_stream(self) -> Box<dyn Stream> {
        assert!(self.buf.is_empty(), "unread bytes: {}", hex(&self.buf));
        self.stream
    }

    /// A client over an already open stream (a TLS session, say).
    pub fn over(stream: impl Stream + 'static) -> Raw {
        Raw { stream: Box::new(stream), buf: Vec::new(), v5: false }
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        let write = async {
            self.stream.write_all(bytes).await?;
            self.stream.flush().await
        };
        tokio::time::timeout(WAIT, write).await.expect("write timeout").expect("write");
    }

    /// Sends, ignoring failures (the broker may already have closed the socket).
    pub async fn send_lossy(&mut self, bytes: &[u8]) {
        let write = async {
            self.stream.write_all(bytes).await?;
            self.stream.flush().await
        };
        let _ = tokio::time::timeout(WAIT, write).await;
    }

    fn take_packet(&mut self) -> Option<Vec<u8>> {
        if self.buf.len() < 2 {
            return None;
        }
        let (len, used) = match read_varint(&self.buf[1..]) {
            Some(v) => v,
            None if self.buf.len() >= 5 => panic!("broker sent a bad remaining length: {}", hex(&self.buf)),
            None => return None,
        };
        let total = 1 + used + len;
        if self.buf.len() < total {
            return None;
        }
        Some(self.buf.drain(..total).collect())
    }

    /// The next whole packet, the close of the connection, or nothing within `dur`.
    pub async fn next_event(&mut self, dur: Duration) -> Event {
        let deadline = tokio::time::Instant::now() + dur;
        loop {
            if let Some(p) = self.take_packet() {
                return Event::Packet(p);
            }
            let mut chunk = [0u8; 8192];
            match tokio::time::timeout_at(deadline, self.stream.read(&mut chunk)).await {
                Err(_) => return Event::Timeout,
                Ok(Ok(0)) | Ok(Err(_)) => {
                    assert!(self.buf.is_empty(), "connection closed after a partial packet: {}", hex(&self.buf));
                    return Event::Closed;
                }
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// The next packet within `dur` (for waits longer than `WAIT`).
    pub async fn read_packet_within(&mut self, dur: Duration) -> Vec<u8> {
        match self.next_event(dur).await {
            Event::Packet(p) => p,
            Event::Closed => panic!("connection closed while waiting for a packet"),
            Event::Timeout => panic!("no packet within {dur:?}"),
        }
    }

    pub async fn read_packet(&mut self) -> Vec<u8> {
        match self.next_event(WAIT).await {
            Event::Packet(p) => p,
            Event::Closed => panic!("connection closed while waiting for a packet"),
            Event::Timeout => panic!("no packet within {WAIT:?}"),
        }
    }

    /// Reads one packet and checks its exact bytes.
    pub async fn expect(&mut self, expected: &[u8]) {
        let got = self.read_packet().await;
        assert_eq!(hex(&got), hex(expected), "unexpected packet from broker");
    }

    /// Asserts that nothing arrives (and the connection stays open) for `dur`.
    pub async fn expect_silence(&mut self, dur: Duration) {
        match self.next_event(dur).await {
            Event::Timeout => {}
            Event::Packet(p) => panic!("expected silence, got {}", hex(&p)),
            Event::Closed => panic!("expected silence, but the connection was closed"),
        }
    }

    /// Asserts the broker closes the connection within `dur` without sending anything more.
    /// Returns the time it took.
    pub async fn expect_closed_within(&mut self, dur: Duration) -> Duration {
        let t0 = Instant::now();
        match self.next_event(dur).await {
            Event::Closed => t0.elapsed(),
            Event::Packet(p) => panic!("expected the connection to close, got {}", hex(&p)),
            Event::Timeout => panic!("connection still open after {dur:?}"),
        }
    }

    pub async fn expect_closed(&mut self) {
        self.expect_closed_within(Duration::from_secs(2)).await;
    }

    /// v5: DISCONNECT with `reason`, then the connection closes. (Exactly one reason: tern
    /// sends one code for each case, and the tests say which.)
    pub async fn expect_disconnect(&mut self, expected: u8) {
        let p = match self.next_event(WAIT).await {
            Event::Packet(p) => p,
            Event::Closed => panic!("connection closed without DISCONNECT (expected reason 0x{expected:02X})"),
            Event::Timeout => panic!("no DISCONNECT within {WAIT:?} (expected reason 0x{expected:02X})"),
        };
        let (h, body) = split_packet(&p);
        assert_eq!(h, 0xE0, "expected DISCONNECT with reason 0x{expected:02X}, got {}", hex(&p));
        let reason = body.first().copied().unwrap_or(0);
        assert_eq!(reason, expected, "DISCONNECT reason 0x{reason:02X}, expected 0x{expected:02X}: {}", hex(&p));
        if body.len() > 1 {
            let _ = take_props(&body[1..]);
        }
        self.expect_closed().await;
    }

    /// Sends CONNECT and returns the CONNACK.
    pub async fn handshake(&mut self, c: &Connect) -> ConnAck {
        self.v5 = c.is_v5();
        self.send(&c.bytes()).await;
        // A CONNACK waits for the password check, which in a debug build on a loaded machine
        // (argon2 is memory-hard) can take longer than `WAIT`.
        let p = self.read_packet_within(Duration::from_secs(30)).await;
        parse_connack(&p, self.v5)
    }

    pub async fn ping(&mut self) {
        self.send(&PINGREQ).await;
        self.expect(&PINGRESP).await;
    }

    /// Sends DISCONNECT and waits for the broker to close the socket.
    pub async fn disconnect(mut self) {
        self.send(&DISCONNECT).await;
        self.expect_closed().await;
    }

    /// SUBSCRIBE one filter and check the SUBACK grants `expect_code`.
    pub async fn subscribe_expect(&mut self, pid: u16, filter: &str, opts: u8, expect_code: u8) {
        let codes = self.subscribe_many(pid, &[(filter, opts)]).await;
        assert_eq!(codes, vec![expect_code], "SUBACK codes for {filter}");
    }

    /// SUBSCRIBE one filter at `qos` and check it is granted.
    pub async fn subscribe(&mut self, pid: u16, filter: &str, qos: u8) {
        self.subscribe_expect(pid, filter, qos, qos).await;
    }

    /// SUBSCRIBE several filters; returns the SUBACK codes.
    pub async fn subscribe_many(&mut self, pid: u16, filters: &[(&str, u8)]) -> Vec<u8> {
        self.send(&subscribe_pkt(self.v5, pid, filters)).await;
        let p = self.read_packet().await;
        let (h, body) = split_packet(&p);
        assert_eq!(h, 0x90, "expected SUBACK, got {}", hex(&p));
        assert_eq!(u16::from_be_bytes([body[0], body[1]]), pid, "SUBACK packet id: {}", hex(&p));
        let codes = if self.v5 { take_props(&body[2..]).1 } else { &body[2..] };
        codes.to_vec()
    }

    /// UNSUBSCRIBE; returns the v5 reason codes (empty for 3.1.1, whose UNSUBACK is checked
    /// to be exactly `B0 02 id`).
    pub async fn unsubscribe(&mut self, pid: u16, filters: &[&str]) -> Vec<u8> {
        self.send(&unsubscribe_pkt(self.v5, pid, filters)).await;
        let p = self.read_packet().await;
        if !self.v5 {
            let [hi, lo] = pid.to_be_bytes();
            assert_eq!(hex(&p), hex(&[0xB0, 0x02, hi, lo]), "UNSUBACK");
            return Vec::new();
        }
        let (h, body) = split_packet(&p);
        assert_eq!(h, 0xB0, "expected UNSUBACK, got {}", hex(&p));
        assert_eq!(u16::from_be_bytes([body[0], body[1]]), pid);
        take_props(&body[2..]).1.to_vec()
    }

    /// Publishes (3.1.1 or v5 layout per the connection) and completes the QoS handshake.
    pub async fn publish(&mut self, topic: &str, payload: &[u8], qos: u8, pid: u16) {
        self.publish_retain(topic, payload, qos, pid, false).await;
    }

    pub async fn publish_retain(&mut self, topic: &str, payload: &[u8], qos: u8, pid: u16, retain: bool) {
        let props: &[u8] = &[];
        let v5 = self.v5.then_some(props);
        self.send(&publish_full(topic.as_bytes(), payload, qos, pid, retain, false, v5)).await;
        match qos {
            0 => {}
            1 => {
                self.expect_ack(0x40, pid).await;
            }
            _ => {
                self.expect_ack(0x50, pid).await;
                self.send(&pubrel(pid)).await;
                self.expect_ack(0x70, pid).await;
            }
        }
    }

    /// Reads an acknowledgement of `kind` (fixed header byte) for `pid`; for v5 a reason code
    /// below 0x80 is accepted. Returns the reason code (0 when absent).
    pub async fn expect_ack(&mut self, kind: u8, pid: u16) -> u8 {
        let p = self.read_packet().await;
        let (h, body) = split_packet(&p);
        assert_eq!(h, kind, "expected ack 0x{kind:02X} for id {pid}, got {}", hex(&p));
        assert_eq!(u16::from_be_bytes([body[0], body[1]]), pid, "ack packet id: {}", hex(&p));
        if !self.v5 {
            assert_eq!(body.len(), 2, "3.1.1 ack must be 2 bytes: {}", hex(&p));
        }
        let reason = body.get(2).copied().unwrap_or(0);
        assert!(reason < 0x80, "ack with failure reason 0x{reason:02X}: {}", hex(&p));
        reason
    }

    /// The next packet, which must be a PUBLISH.
    pub async fn recv_publish(&mut self) -> Pub {
        let p = self.read_packet().await;
        parse_publish(&p, self.v5)
    }

    /// Receives a PUBLISH and acknowledges it (PUBACK, or PUBREC/PUBREL/PUBCOMP).
    pub async fn recv_publish_ack(&mut self) -> Pub {
        let p = self.recv_publish().await;
        self.ack(&p).await;
        p
    }

    pub async fn ack(&mut self, p: &Pub) {
        match (p.qos, p.pid) {
            (1, Some(id)) => self.send(&puback(id)).await,
            (2, Some(id)) => {
                self.send(&pubrec(id)).await;
                self.expect_ack(0x62, id).await;
                self.send(&pubcomp(id)).await;
            }
            _ => {}
        }
    }

    /// Checks that this connection still publishes and receives: subscribes `topic` (once per
    /// connection is enough; re-subscribing is harmless) and gets its own QoS 1 message back.
    pub async fn assert_alive(&mut self, topic: &str) {
        self.subscribe(901, topic, 1).await;
        let props: &[u8] = &[];
        self.send(&publish_full(topic.as_bytes(), b"alive", 1, 902, false, false, self.v5.then_some(props))).await;
        // PUBACK and the delivery may come in either order.
        let mut got_ack = false;
        let mut got_msg = false;
        while !(got_ack && got_msg) {
            let p = self.read_packet().await;
            match p[0] >> 4 {
                4 => {
                    assert_eq!(&p[2..4], &902u16.to_be_bytes(), "PUBACK id: {}", hex(&p));
                    got_ack = true;
                }
                3 => {
                    let m = parse_publish(&p, self.v5);
                    assert_eq!((m.topic.as_str(), m.payload.as_slice()), (topic, &b"alive"[..]));
                    self.ack(&m).await;
                    got_msg = true;
                }
                _ => panic!("unexpected packet while checking liveness: {}", hex(&p)),
            }
        }
    }
}

/// Opens a socket, sends CONNECT and checks the CONNACK accepts it.
pub async fn connect_with(addr: SocketAddr, c: &Connect) -> (Raw, ConnAck) {
    let mut raw = Raw::open(addr).await;
    let ack = raw.handshake(c).await;
    assert_eq!(ack.code, 0, "CONNECT of {} refused: {ack:?}", c.client_id);
    (raw, ack)
}

/// 3.1.1 client, clean session.
pub async fn connect_v311(addr: SocketAddr, client_id: &str) -> Raw {
    connect_with(addr, &Connect::v311(client_id)).await.0
}

/// v5 client, clean start, session expiry 0.
pub async fn connect_v5(addr: SocketAddr, client_id: &str) -> Raw {
    connect_with(addr, &Connect::v5(client_id)).await.0
}

// ---------------------------------------------------------------------------------------------
// rumqttc wrappers
// ---------------------------------------------------------------------------------------------

/// A rumqttc 3.1.1 client whose event loop runs in a task, forwarding incoming packets.
pub struct V4 {
    pub client: rumqttc::AsyncClient,
    rx: mpsc::UnboundedReceiver<rumqttc::Packet>,
    task: JoinHandle<()>,
}

impl V4 {
    pub async fn connect(addr: SocketAddr, id: &str, clean: bool) -> V4 {
        let mut opts = rumqttc::MqttOptions::new(id, addr.ip().to_string(), addr.port());
        opts.set_clean_session(clean);
        opts.set_keep_alive(Duration::from_secs(10));
        opts.set_max_packet_size(1 << 20, 1 << 20);
        let (client, mut el) = rumqttc::AsyncClient::new(opts, 1000);
        let (tx, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            loop {
                match el.poll().await {
                    Ok(rumqttc::Event::Incoming(p)) => {
                        if tx.send(p).is_err() {
                            break;
                        }
                    }
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
        });
        let mut c = V4 { client, rx, task };
        c.wait_for(|p| matches!(p, rumqttc::Packet::ConnAck(_)).then_some(())).await;
        c
    }

    /// Waits for the first incoming packet `f` accepts, skipping the others.
    pub async fn wait_for<T>(&mut self, mut f: impl FnMut(&rumqttc::Packet) -> Option<T>) -> T {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Err(_) => panic!("rumqttc v4 client: expected packet not received within {WAIT:?}"),
                Ok(None) => panic!("rumqttc v4 client: connection ended"),
                Ok(Some(p)) => {
                    if let Some(t) = f(&p) {
                        return t;
                    }
                }
            }
        }
    }

    pub async fn subscribe(&mut self, filter: &str, qos: rumqttc::QoS) {
        self.client.subscribe(filter, qos).await.expect("subscribe request");
        self.wait_for(|p| matches!(p, rumqttc::Packet::SubAck(_)).then_some(())).await;
    }

    pub async fn recv_publish(&mut self) -> rumqttc::Publish {
        self.wait_for(|p| match p {
            rumqttc::Packet::Publish(p) => Some(p.clone()),
            _ => None,
        })
        .await
    }

    pub async fn expect_no_publish(&mut self, dur: Duration) {
        let deadline = tokio::time::Instant::now() + dur;
        while let Ok(Some(p)) = tokio::time::timeout_at(deadline, self.rx.recv()).await {
            if let rumqttc::Packet::Publish(p) = p {
                panic!("unexpected PUBLISH {p:?}");
            }
        }
    }
}

impl Drop for V4 {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A rumqttc v5 client whose event loop runs in a task, forwarding incoming packets.
pub struct V5 {
    pub client: rumqttc::v5::AsyncClient,
    rx: mpsc::UnboundedReceiver<rumqttc::v5::mqttbytes::v5::Packet>,
    task: JoinHandle<()>,
}

impl V5 {
    pub async fn connect(addr: SocketAddr, id: &str) -> V5 {
        let mut opts = rumqttc::v5::MqttOptions::new(id, addr.ip().to_string(), addr.port());
        opts.set_keep_alive(Duration::from_secs(10));
        let (client, mut el) = rumqttc::v5::AsyncClient::new(opts, 1000);
        let (tx, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            loop {
                match el.poll().await {
                    Ok(rumqttc::v5::Event::Incoming(p)) => {
                        if tx.send(p).is_err() {
                            break;
                        }
                    }
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
        });
        let mut c = V5 { client, rx, task };
        c.wait_for(|p| matches!(p, rumqttc::v5::mqttbytes::v5::Packet::ConnAck(_)).then_some(())).await;
        c
    }

    pub async fn wait_for<T>(&mut self, mut f: impl FnMut(&rumqttc::v5::mqttbytes::v5::Packet) -> Option<T>) -> T {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Err(_) => panic!("rumqttc v5 client: expected packet not received within {WAIT:?}"),
                Ok(None) => panic!("rumqttc v5 client: connection ended"),
                Ok(Some(p)) => {
                    if let Some(t) = f(&p) {
                        return t;
                    }
                }
            }
        }
    }

    pub async fn subscribe(&mut self, filter: &str, qos: rumqttc::v5::mqttbytes::QoS) {
        self.client.subscribe(filter, qos).await.expect("subscribe request");
        self.wait_for(|p| matches!(p, rumqttc::v5::mqttbytes::v5::Packet::SubAck(_)).then_some(())).await;
    }

    pub async fn recv_publish(&mut self) -> rumqttc::v5::mqttbytes::v5::Publish {
        self.wait_for(|p| match p {
            rumqttc::v5::mqttbytes::v5::Packet::Publish(p) => Some(p.clone()),
            _ => None,
        })
        .await
    }
}

impl Drop for V5 {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// ---------------------------------------------------------------------------------------------
// v5 property and packet helpers (the tests/v5_*.rs feature tests)
// ---------------------------------------------------------------------------------------------

/// A v5 string or binary property: identifier, then the length-prefixed value.
pub fn prop_bin(id: u8, v: &[u8]) -> Vec<u8> {
    let mut out = vec![id];
    out.extend(mqtt_str(v));
    out
}

/// A v5 variable byte integer property (Subscription Identifier).
pub fn prop_varint(id: u8, n: usize) -> Vec<u8> {
    let mut out = vec![id];
    out.extend(varint(n));
    out
}

/// A v5 User Property (0x26) `key` = `value`.
pub fn prop_user(key: &str, value: &str) -> Vec<u8> {
    let mut out = vec![0x26];
    out.extend(mqtt_str(key.as_bytes()));
    out.extend(mqtt_str(value.as_bytes()));
    out
}

/// v5 SUBSCRIBE with a property block; each filter with its options byte.
pub fn subscribe_props_pkt(pid: u16, properties: &[u8], filters: &[(&str, u8)]) -> Vec<u8> {
    let mut body = pid.to_be_bytes().to_vec();
    body.extend(props(properties));
    for (f, o) in filters {
        body.extend(mqtt_str(f.as_bytes()));
        body.push(*o);
    }
    packet(0x82, &body)
}

/// v5 DISCONNECT with a reason code and properties.
pub fn disconnect_v5(reason: u8, properties: &[u8]) -> Vec<u8> {
    let mut body = vec![reason];
    body.extend(props(properties));
    packet(0xE0, &body)
}

impl Pub {
    /// The first property `id`, as `parse_props` returns it.
    pub fn prop(&self, id: u8) -> Option<&[u8]> {
        self.props.iter().find(|(i, _)| *i == id).map(|(_, v)| v.as_slice())
    }

    /// A four-byte integer property (Message Expiry Interval).
    pub fn prop_u32(&self, id: u8) -> Option<u32> {
        self.prop(id).map(|v| u32::from_be_bytes([v[0], v[1], v[2], v[3]]))
    }

    /// Every Subscription Identifier (0x0B), in order.
    pub fn subscription_ids(&self) -> Vec<usize> {
        self.props.iter().filter(|(i, _)| *i == 0x0B).map(|(_, v)| read_varint(v).expect("varint").0).collect()
    }
}

impl Raw {
    /// v5 SUBSCRIBE with properties; returns the SUBACK reason codes.
    pub async fn subscribe_props(&mut self, pid: u16, properties: &[u8], filters: &[(&str, u8)]) -> Vec<u8> {
        self.send(&subscribe_props_pkt(pid, properties, filters)).await;
        let p = self.read_packet().await;
        let (h, body) = split_packet(&p);
        assert_eq!(h, 0x90, "expected SUBACK, got {}", hex(&p));
        assert_eq!(u16::from_be_bytes([body[0], body[1]]), pid, "SUBACK packet id: {}", hex(&p));
        take_props(&body[2..]).1.to_vec()
    }

    /// Reads an acknowledgement of `kind` for `pid` and returns its reason code (0 when
    /// absent), failures included.
    pub async fn read_ack_reason(&mut self, kind: u8, pid: u16) -> u8 {
        let p = self.read_packet().await;
        let (h, body) = split_packet(&p);
        assert_eq!(h, kind, "expected ack 0x{kind:02X} for id {pid}, got {}", hex(&p));
        assert_eq!(u16::from_be_bytes([body[0], body[1]]), pid, "ack packet id: {}", hex(&p));
        body.get(2).copied().unwrap_or(0)
    }
}

/// `n` QoS 0 messages of 16 KiB from `publisher` on `topic` (subscribed to by `sub` at QoS 0),
/// numbered in their first 8 bytes, sent while `sub` is not reading: the broker's writes to
/// `sub` fill its socket and the layer in between (TLS, WebSocket) keeps the rest. Every
/// message must still arrive once `sub` reads, in order, which needs the broker to flush that
/// layer on every write, not just write to it.
pub async fn burst_to_a_slow_reader(publisher: &mut Raw, sub: &mut Raw, topic: &str, n: usize) {
    let payload = vec![b'x'; 16 * 1024];
    for i in 0..n {
        let mut p = payload.clone();
        p[..8].copy_from_slice(&(i as u64).to_be_bytes());
        publisher.publish(topic, &p, 0, 0).await;
    }
    publisher.ping().await; // the broker has read them all
    for i in 0..n {
        let m = sub.recv_publish().await;
        assert_eq!(&m.payload[..8], &(i as u64).to_be_bytes(), "message {i} of {n}");
    }
}

/// Subscribes to the state topic of the bridge `name` of the broker at `addr`.
pub async fn bridge_state_watch(addr: SocketAddr, name: &str) -> Raw {
    let mut s = connect_v311(addr, &format!("state-watch-{name}")).await;
    s.subscribe(1, &format!("$SYS/broker/connection/{name}/state"), 0).await;
    s
}

/// Waits until the bridge `name` of the broker at `addr` says it is connected.
pub async fn bridge_connected(addr: SocketAddr, name: &str) {
    let mut s = bridge_state_watch(addr, name).await;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        assert!(Instant::now() < deadline, "bridge {name} never connected");
        let p = s.read_packet_within(Duration::from_secs(15)).await;
        if p[0] >> 4 == 3 && parse_publish(&p, false).payload == b"1" {
            return;
        }
    }
}
