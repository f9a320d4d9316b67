//! MQTT over WebSocket (MQTT 5.0 section 6, the same for 3.1.1): the HTTP upgrade of an
//! accepted stream (TCP, or the TLS stream of a `wss` listener) under a deadline, and
//! `WsStream`, which turns the WebSocket's binary messages back into the byte stream
//! `connection::serve` reads and writes.
//!
//! The WebSocket protocol itself (framing, masking, ping/pong, the close handshake) is
//! tokio-tungstenite's, used without its TLS features: TLS is `transport::tls`'s. The adapter
//! between its message `Stream`/`Sink` and `AsyncRead`/`AsyncWrite` is ours, about a hundred
//! lines: the crate that offers one (ws_stream_tungstenite) is built on async-tungstenite and an
//! older tungstenite, which would put a second WebSocket implementation and a futures-io
//! compatibility layer under every connection, and it would decide for us what a text frame
//! or an oversized message does.
//!
//! Knows nothing of MQTT packets: a WebSocket message may hold part of a packet, one, or
//! several, and the bytes go through as they come.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use futures_util::{Sink, Stream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{header, HeaderValue, StatusCode};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;
use tracing::debug;

use crate::config::Listener;

/// Most bytes of an upgrade request (request line and headers) read before it is refused;
/// Node.js's HTTP server allows the same. tungstenite's own cap is 64 KiB.
pub const MAX_REQUEST_BYTES: usize = 16 * 1024;

/// Bytes a WebSocket message or frame may carry beyond `limits.max_packet_size`: a client may
/// put a few small packets (acknowledgements, PINGREQ) in the message of its largest one.
pub const MESSAGE_HEADROOM: usize = 64 * 1024;

/// Largest frame tern sends. A burst is sent as several frames (MQTT lets packets span
/// frames), so the WebSocket's write buffer, which keeps its size for the connection's life,
/// stays this small; and it is one TLS record.
const MAX_FRAME_OUT: usize = 16 * 1024;

/// The WebSocket's read buffer, allocated for each connection when it is upgraded. Small, as
/// an idle WebSocket connection keeps it. A larger frame grows it, and tungstenite keeps the
/// grown buffer for the connection's life: at most a frame's bound, `max_packet_size` plus
/// `MESSAGE_HEADROOM`.
const READ_BUFFER: usize = 4 * 1024;

/// The subprotocols tern speaks, in order of preference: `mqtt` (MQTT 3.1.1 and 5.0), and
/// `mqttv3.1`, the name older clients (Paho JavaScript with MQTT 3.1) offer.
const SUBPROTOCOLS: [&str; 2] = ["mqtt", "mqttv3.1"];

/// A WebSocket listener's upgrade rules: its path, the web origins allowed, and the size
/// bounds of what a client may send.
#[derive(Debug)]
pub struct WsAcceptor {
    path: Box<str>,
    /// Empty: any origin.
    origins: Box<[Box<str>]>,
    config: WebSocketConfig,
    timeout: Duration,
}

impl WsAcceptor {
    /// The rules of `listener` (a `ws` or `wss` one). A message or frame may be
    /// `max_packet_size` plus `MESSAGE_HEADROOM` bytes long; the upgrade must be done within
    /// `timeout` (after a `wss` listener's TLS handshake, which has its own).
    pub fn new(listener: &Listener, max_packet_size: u32, timeout: Duration) -> WsAcceptor {
        let max_message = usize::try_from(max_packet_size).unwrap_or(usize::MAX).saturating_add(MESSAGE_HEADROOM);
        let config = WebSocketConfig::default()
            .read_buffer_size(READ_BUFFER)
            // Frames go to the socket as they are made; the connection flushes after each batch.
            .write_buffer_size(0)
            .max_message_size(Some(max_message))
            .max_frame_size(Some(max_message));
        WsAcceptor {
            path: listener.ws_path().into(),
            origins: listener.allowed_origins.iter().map(|o| o.as_str().into()).collect(),
            config,
            // Validation refuses 0; should one slip through, a zero deadline would refuse every client.
            timeout: timeout.max(Duration::from_secs(1)),
        }
    }

    /// Reads the client's upgrade request and answers it: 101 with the subprotocol chosen, or
    /// 404 (another path), 403 (an origin not allowed), 400 (no subprotocol tern speaks); those
    /// end in an error, as do a request over `MAX_REQUEST_BYTES`, one that is not a WebSocket
    /// upgrade, and one not done within the deadline.
    pub async fn accept<S>(&self, stream: S) -> io::Result<WsStream<S>>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let metered = Metered { inner: stream, request_left: Some(MAX_REQUEST_BYTES) };
        #[allow(clippy::result_large_err)] // tungstenite's callback signature
        let callback = |request: &Request, response: Response| self.answer(request, response);
        let upgrade = tokio_tungstenite::accept_hdr_async_with_config(metered, callback, Some(self.config));
        let mut ws = match tokio::time::timeout(self.timeout, upgrade).await {
            Ok(Ok(ws)) => ws,
            Ok(Err(e)) => return Err(io_error(e)),
            Err(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("WebSocket upgrade not finished within {} s", self.timeout.as_secs()),
                ))
            }
        };
        ws.get_mut().request_left = None;
        Ok(WsStream { ws, pending: Bytes::new() })
    }

    /// The answer to an upgrade request tungstenite found well formed.
    #[allow(clippy::result_large_err)] // tungstenite's callback signature
    fn answer(&self, request: &Request, mut response: Response) -> Result<Response, ErrorResponse> {
        if request.uri().path() != &*self.path {
            return Err(refusal(StatusCode::NOT_FOUND, "no MQTT endpoint at this path"));
        }
        // Browsers always send Origin; other clients usually do not, and are not what the list
        // protects against (any program can send any Origin).
        if let Some(origin) = request.headers().get(header::ORIGIN) {
            let allowed = self.origins.is_empty()
                || origin.to_str().is_ok_and(|o| self.origins.iter().any(|a| a.eq_ignore_ascii_case(o)));
            if !allowed {
                return Err(refusal(StatusCode::FORBIDDEN, "this origin may not connect"));
            }
        }
        let mut offered = request.headers().get_all(header::SEC_WEBSOCKET_PROTOCOL).iter().peekable();
        if offered.peek().is_some() {
            match choose_subprotocol(offered) {
                // The client's own spelling: a browser fails the connection unless the answer
                // is one of the names it offered.
                Some(name) => {
                    response.headers_mut().insert(header::SEC_WEBSOCKET_PROTOCOL, name);
                }
                None => {
                    return Err(refusal(
                        StatusCode::BAD_REQUEST,
                        "no subprotocol this server speaks was offered; offer \"mqtt\"",
                    ))
                }
            }
        }
        Ok(response)
    }
}

/// The offered name (from one or several `Sec-WebSocket-Protocol` headers, each a
/// comma-separated list) of the most preferred of `SUBPROTOCOLS`, compared without case.
fn choose_subprotocol<'a>(offered: impl Iterator<Item = &'a HeaderValue>) -> Option<HeaderValue> {
    let names: Vec<&str> = offered.filter_map(|v| v.to_str().ok()).flat_map(|v| v.split(',')).map(str::trim).collect();
    SUBPROTOCOLS
        .iter()
        .find_map(|ours| names.iter().find(|n| n.eq_ignore_ascii_case(ours)))
        .and_then(|n| HeaderValue::from_str(n).ok())
}

/// A refused upgrade: the status, a one-line text body, and the connection closes.
fn refusal(status: StatusCode, text: &str) -> ErrorResponse {
    let body = format!("{text}\n");
    let mut response = ErrorResponse::new(Some(body.clone()));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

fn io_error(e: WsError) -> io::Error {
    match e {
        WsError::Io(e) => e,
        WsError::ConnectionClosed | WsError::AlreadyClosed => io::ErrorKind::NotConnected.into(),
        e => io::Error::new(io::ErrorKind::InvalidData, e.to_string()),
    }
}

/// The accepted stream, counting what the upgrade request reads: past `MAX_REQUEST_BYTES` the
/// read fails. Counts nothing once the upgrade is done.
#[derive(Debug)]
struct Metered<S> {
    inner: S,
    request_left: Option<usize>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Metered<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let Some(left) = this.request_left else { return Pin::new(&mut this.inner).poll_read(cx, buf) };
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
        let read = buf.filled().len() - before;
        match left.checked_sub(read) {
            Some(left) => {
                this.request_left = Some(left);
                Poll::Ready(Ok(()))
            }
            None => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("WebSocket upgrade request over {MAX_REQUEST_BYTES} bytes"),
            ))),
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Metered<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// An upgraded WebSocket as a byte stream. Reads yield the payloads of binary messages in
/// order (pings are answered, a close ends the stream, a text message fails it as MQTT
/// requires [MQTT-6.0.0-1]); each write is sent as binary frames. Writes must be flushed.
#[derive(Debug)]
pub struct WsStream<S> {
    ws: WebSocketStream<Metered<S>>,
    /// What is left of the binary message being read.
    pending: Bytes,
}

impl<S: AsyncRead + AsyncWrite + Unpin> WsStream<S> {
    /// Starts the close handshake with `code` (best effort: the connection is failing anyway,
    /// and its shutdown flushes the frame) and returns the error the read reports.
    fn fail(&mut self, code: CloseCode, why: &'static str) -> io::Error {
        debug!(why, "closing WebSocket");
        let frame = CloseFrame { code, reason: why.into() };
        let _ = Pin::new(&mut self.ws).start_send(Message::Close(Some(frame)));
        io::Error::new(io::ErrorKind::InvalidData, why)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for WsStream<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        while this.pending.is_empty() {
            let message = match ready!(Pin::new(&mut this.ws).poll_next(cx)) {
                // The peer closed (tungstenite has queued the answering close frame, which the
                // shutdown sends), or the connection is gone: the end of the stream.
                None | Some(Ok(Message::Close(_))) => return Poll::Ready(Ok(())),
                Some(Ok(m)) => m,
                Some(Err(WsError::Capacity(_))) => {
                    let why = "WebSocket message larger than limits.max_packet_size allows";
                    return Poll::Ready(Err(this.fail(CloseCode::Size, why)));
                }
                Some(Err(WsError::Protocol(e))) => {
                    debug!(error = %e, "WebSocket protocol error");
                    return Poll::Ready(Err(this.fail(CloseCode::Protocol, "WebSocket protocol error")));
                }
                Some(Err(e)) => return Poll::Ready(Err(io_error(e))),
            };
            match message {
                Message::Binary(payload) => this.pending = payload,
                Message::Text(_) => {
                    let why = "MQTT over WebSocket takes binary frames only";
                    return Poll::Ready(Err(this.fail(CloseCode::Unsupported, why)));
                }
                // Pings are answered by tungstenite as it reads; pongs need nothing.
                Message::Ping(_) | Message::Pong(_) | Message::Frame(_) | Message::Close(_) => {}
            }
        }
        let n = this.pending.len().min(buf.remaining());
        buf.put_slice(&this.pending[..n]);
        this.pending.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for WsStream<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let mut ws = Pin::new(&mut self.get_mut().ws);
        ready!(ws.as_mut().poll_ready(cx)).map_err(io_error)?;
        let n = buf.len().min(MAX_FRAME_OUT);
        ws.start_send(Message::Binary(Bytes::copy_from_slice(&buf[..n]))).map_err(io_error)?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().ws).poll_flush(cx).map_err(io_error)
    }

    /// Sends a close frame (or the answer to the client's), then shuts the stream below down
    /// (a TLS close_notify, a TCP FIN) without waiting for the client's answer.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        // A failure here (the client has gone) leaves nothing to say; the stream below is
        // still shut down.
        let _ = ready!(Pin::new(&mut this.ws).poll_close(cx));
        Pin::new(&mut this.ws.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(list: &[&str]) -> Vec<HeaderValue> {
        list.iter().map(|v| HeaderValue::from_str(v).unwrap()).collect()
    }

    fn chosen(list: &[&str]) -> Option<String> {
        choose_subprotocol(values(list).iter()).map(|v| v.to_str().unwrap().to_string())
    }

    #[test]
    fn subprotocol_prefers_mqtt_and_keeps_the_clients_spelling() {
        assert_eq!(chosen(&["mqtt, mqttv3.1"]).as_deref(), Some("mqtt"));
        assert_eq!(chosen(&["mqttv3.1,mqtt"]).as_deref(), Some("mqtt"));
        assert_eq!(chosen(&["mqttv3.1"]).as_deref(), Some("mqttv3.1"));
        assert_eq!(chosen(&["chat", "MQTT"]).as_deref(), Some("MQTT"));
        assert_eq!(chosen(&["chat, superchat"]), None);
        assert_eq!(chosen(&[""]), None);
    }
}
