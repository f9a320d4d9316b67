//! A minimal hand-rolled MQTT 3.1.1 / 5.0 client wire layer for the load generator.
//!
//! Deliberately independent of tern's own codec, so a codec bug in the broker cannot hide
//! itself in the measurements, and allocation-free on the hot path: packets are appended to a
//! reused `BytesMut`, received frames are parsed in place.

use std::io;

use bytes::{Buf, BufMut, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::{timeout_at, Instant};

use crate::net::{Endpoint, Stream};

pub const CONNACK: u8 = 2;
pub const PUBLISH: u8 = 3;
pub const PUBACK: u8 = 4;
pub const SUBACK: u8 = 9;
pub const PINGRESP: u8 = 13;

/// Bytes of our own payload header: publisher id (u32), sequence (u64), intended time (u64).
pub const STAMP_LEN: usize = 20;

pub fn put_varint(buf: &mut BytesMut, mut n: usize) {
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        buf.put_u8(b);
        if n == 0 {
            break;
        }
    }
}

fn put_str(buf: &mut BytesMut, s: &[u8]) {
    buf.put_u16(s.len() as u16);
    buf.put_slice(s);
}

/// CONNECT. `session_expiry` is only sent for v5 (0x11 property).
pub fn connect(buf: &mut BytesMut, client_id: &str, clean: bool, keep_alive: u16, v5: bool, session_expiry: u32) {
    let props_len = if v5 && session_expiry > 0 { 5 } else { 0 };
    let mut rl = 6 + 1 + 1 + 2 + 2 + client_id.len();
    if v5 {
        rl += 1 + props_len;
    }
    buf.put_u8(0x10);
    put_varint(buf, rl);
    put_str(buf, b"MQTT");
    buf.put_u8(if v5 { 5 } else { 4 });
    buf.put_u8(if clean { 0x02 } else { 0x00 });
    buf.put_u16(keep_alive);
    if v5 {
        put_varint(buf, props_len);
        if props_len > 0 {
            buf.put_u8(0x11);
            buf.put_u32(session_expiry);
        }
    }
    put_str(buf, client_id.as_bytes());
}

pub fn subscribe(buf: &mut BytesMut, packet_id: u16, filter: &str, qos: u8, v5: bool) {
    let rl = 2 + usize::from(v5) + 2 + filter.len() + 1;
    buf.put_u8(0x82);
    put_varint(buf, rl);
    buf.put_u16(packet_id);
    if v5 {
        buf.put_u8(0);
    }
    put_str(buf, filter.as_bytes());
    buf.put_u8(qos);
}

/// Appends a PUBLISH whose payload is our stamp followed by zero padding up to `size` bytes.
#[allow(clippy::too_many_arguments)]
pub fn publish(
    buf: &mut BytesMut,
    topic: &[u8],
    qos: u8,
    retain: bool,
    packet_id: u16,
    v5: bool,
    size: usize,
    stamp: (u32, u64, u64),
) {
    let size = size.max(STAMP_LEN);
    let rl = 2 + topic.len() + if qos > 0 { 2 } else { 0 } + usize::from(v5) + size;
    buf.put_u8(0x30 | (qos << 1) | u8::from(retain));
    put_varint(buf, rl);
    put_str(buf, topic);
    if qos > 0 {
        buf.put_u16(packet_id);
    }
    if v5 {
        buf.put_u8(0);
    }
    buf.put_u32(stamp.0);
    buf.put_u64(stamp.1);
    buf.put_u64(stamp.2);
    buf.put_bytes(0, size - STAMP_LEN);
}

/// PUBACK: the 2-byte form is valid in both 3.1.1 and 5.0 (reason 0 implied).
pub fn puback(buf: &mut BytesMut, packet_id: u16) {
    buf.put_slice(&[0x40, 0x02]);
    buf.put_u16(packet_id);
}

pub fn pingreq(buf: &mut BytesMut) {
    buf.put_slice(&[0xC0, 0x00]);
}

pub fn disconnect(buf: &mut BytesMut) {
    buf.put_slice(&[0xE0, 0x00]);
}

/// One complete packet found at the start of a buffer.
pub struct Frame<'a> {
    pub kind: u8,
    pub flags: u8,
    pub body: &'a [u8],
}

/// Finds the first complete packet in `buf`: `Ok(Some((frame, total_len)))`, `Ok(None)` when
/// more bytes are needed.
pub fn frame(buf: &[u8]) -> io::Result<Option<(Frame<'_>, usize)>> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let mut rl: usize = 0;
    let mut i = 1;
    loop {
        if i > 4 {
            return Err(bad("malformed remaining length"));
        }
        let Some(&b) = buf.get(i) else { return Ok(None) };
        rl |= usize::from(b & 0x7F) << (7 * (i - 1));
        i += 1;
        if b & 0x80 == 0 {
            break;
        }
    }
    let total = i + rl;
    if buf.len() < total {
        return Ok(None);
    }
    Ok(Some((Frame { kind: buf[0] >> 4, flags: buf[0] & 0x0F, body: &buf[i..total] }, total)))
}

/// The parts of a received PUBLISH that the bench looks at.
pub struct PublishView<'a> {
    pub qos: u8,
    pub retain: bool,
    pub packet_id: u16,
    pub payload: &'a [u8],
}

impl PublishView<'_> {
    /// (publisher id, sequence, intended time ns) if the payload carries our stamp.
    pub fn stamp(&self) -> Option<(u32, u64, u64)> {
        let mut p = self.payload;
        if p.len() < STAMP_LEN {
            return None;
        }
        Some((p.get_u32(), p.get_u64(), p.get_u64()))
    }
}

pub fn parse_publish(flags: u8, body: &[u8], v5: bool) -> io::Result<PublishView<'_>> {
    let qos = (flags >> 1) & 0x03;
    let retain = flags & 1 == 1;
    let mut p = body;
    if p.len() < 2 {
        return Err(bad("short PUBLISH"));
    }
    let tl = usize::from(p.get_u16());
    if p.len() < tl {
        return Err(bad("short PUBLISH topic"));
    }
    p = &p[tl..];
    let mut packet_id = 0;
    if qos > 0 {
        if p.len() < 2 {
            return Err(bad("short PUBLISH id"));
        }
        packet_id = p.get_u16();
    }
    if v5 {
        let (plen, n) = varint(p)?;
        if p.len() < n + plen {
            return Err(bad("short PUBLISH properties"));
        }
        p = &p[n + plen..];
    }
    Ok(PublishView { qos, retain, packet_id, payload: p })
}

fn varint(p: &[u8]) -> io::Result<(usize, usize)> {
    let mut v = 0usize;
    for (i, &b) in p.iter().take(4).enumerate() {
        v |= usize::from(b & 0x7F) << (7 * i);
        if b & 0x80 == 0 {
            return Ok((v, i + 1));
        }
    }
    Err(bad("malformed varint"))
}

pub fn bad(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.to_string())
}

pub fn timed_out() -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, "deadline reached")
}

/// A client connection: the socket (TCP or TLS) plus reused read and write buffers.
pub struct Conn {
    pub stream: Stream,
    pub rbuf: BytesMut,
    pub wbuf: BytesMut,
    pub v5: bool,
    pub session_present: bool,
}

pub struct ConnectOpts<'a> {
    pub client_id: &'a str,
    pub clean: bool,
    pub keep_alive: u16,
    pub v5: bool,
    pub session_expiry: u32,
}

impl Conn {
    /// TCP connect (and TLS handshake), CONNECT, wait for CONNACK (which must accept).
    pub async fn open(ep: &Endpoint, o: &ConnectOpts<'_>, deadline: Instant) -> io::Result<Conn> {
        let stream = Stream::connect(ep, deadline).await?;
        let mut c = Conn {
            stream,
            rbuf: BytesMut::with_capacity(64 * 1024),
            wbuf: BytesMut::with_capacity(16 * 1024),
            v5: o.v5,
            session_present: false,
        };
        connect(&mut c.wbuf, o.client_id, o.clean, o.keep_alive, o.v5, o.session_expiry);
        c.flush(deadline).await?;
        loop {
            if let Some((f, n)) = frame(&c.rbuf)? {
                if f.kind != CONNACK || f.body.len() < 2 {
                    return Err(bad("expected CONNACK"));
                }
                if f.body[1] != 0 {
                    return Err(bad(&format!("CONNACK refused with code 0x{:02x}", f.body[1])));
                }
                c.session_present = f.body[0] & 1 == 1;
                c.rbuf.advance(n);
                return Ok(c);
            }
            c.fill(deadline).await?;
        }
    }

    /// Writes and clears the write buffer. A TLS stream is flushed too (a no-op for TCP), so
    /// nothing stays in its buffer.
    pub async fn flush(&mut self, deadline: Instant) -> io::Result<()> {
        if self.wbuf.is_empty() {
            return Ok(());
        }
        timeout_at(deadline, async {
            self.stream.write_all(&self.wbuf).await?;
            self.stream.flush().await
        })
        .await
        .map_err(|_| timed_out())??;
        self.wbuf.clear();
        Ok(())
    }

    /// Reads more bytes into the read buffer; EOF is an error.
    pub async fn fill(&mut self, deadline: Instant) -> io::Result<usize> {
        if self.rbuf.capacity() - self.rbuf.len() < 16 * 1024 {
            self.rbuf.reserve(64 * 1024);
        }
        let n = timeout_at(deadline, self.stream.read_buf(&mut self.rbuf)).await.map_err(|_| timed_out())??;
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "broker closed the connection"));
        }
        Ok(n)
    }

    /// SUBSCRIBE and wait for its SUBACK; returns the granted code.
    pub async fn subscribe(&mut self, filter: &str, qos: u8, deadline: Instant) -> io::Result<u8> {
        subscribe(&mut self.wbuf, 1, filter, qos, self.v5);
        self.flush(deadline).await?;
        loop {
            if let Some((f, n)) = frame(&self.rbuf)? {
                if f.kind != SUBACK {
                    return Err(bad(&format!("expected SUBACK, got packet type {}", f.kind)));
                }
                // v3: id(2) code; v5: id(2) props-len(varint) props codes.
                let code = *f.body.last().ok_or_else(|| bad("empty SUBACK"))?;
                self.rbuf.advance(n);
                return Ok(code);
            }
            self.fill(deadline).await?;
        }
    }

    /// PINGREQ and wait for PINGRESP, ignoring (but counting) PUBACKs on the way. Since the
    /// broker handles a connection's packets in order, the answer proves everything sent
    /// before it was processed.
    pub async fn ping(&mut self, deadline: Instant) -> io::Result<u64> {
        pingreq(&mut self.wbuf);
        self.flush(deadline).await?;
        let mut acks = 0;
        loop {
            while let Some((f, n)) = frame(&self.rbuf)? {
                let kind = f.kind;
                self.rbuf.advance(n);
                match kind {
                    PINGRESP => return Ok(acks),
                    PUBACK => acks += 1,
                    _ => {}
                }
            }
            self.fill(deadline).await?;
        }
    }

    /// DISCONNECT and close (errors ignored: this is the end of the run).
    pub async fn close(mut self) {
        disconnect(&mut self.wbuf);
        let _ = tokio::time::timeout(std::time::Duration::from_secs(1), async {
            self.stream.write_all(&self.wbuf).await?;
            self.stream.flush().await
        })
        .await;
        // TLS: close_notify, then FIN; TCP: FIN.
        let _ = tokio::time::timeout(std::time::Duration::from_secs(1), self.stream.shutdown()).await;
    }
}
