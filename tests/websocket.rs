//! WebSocket listeners end to end, with tokio-tungstenite as the client: MQTT at QoS 0, 1 and
//! 2 between WebSocket and TCP clients, packets split across frames and several in one frame,
//! text frames refused, ping answered, the upgrade's answers (subprotocol, path, origin), wss
//! with rcgen certificates and a client certificate, oversized frames and requests refused
//! without being buffered, and the connection limit.

mod common;

use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes};
use common::tls::{connect_tls, TestPki};
use common::*;
use futures_util::{Sink, SinkExt, Stream, StreamExt};
use tern::config::{Listener, ListenerKind};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{CloseCode, Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// A broker with its default TCP listener (`addr`, `local_addrs()[0]`) and one WebSocket
/// listener (`local_addrs()[1]`) set up by `ws`.
async fn ws_broker(ws: impl FnOnce(&mut Listener), f: impl FnOnce(&mut tern::Config)) -> TestBroker {
    start_with(|c| {
        let mut l = Listener { kind: ListenerKind::Ws, ..Listener::tcp("127.0.0.1:0") };
        ws(&mut l);
        c.listener.push(l);
        f(c);
    })
    .await
}

fn ws_addr(b: &TestBroker) -> SocketAddr {
    b.handle.local_addrs()[1]
}

/// What the client puts in its upgrade request.
#[derive(Clone, Copy)]
struct Upgrade<'a> {
    path: &'a str,
    /// `Sec-WebSocket-Protocol`, as one header; None: no such header.
    protocols: Option<&'a str>,
    origin: Option<&'a str>,
}

const MQTT: Upgrade<'static> = Upgrade { path: "/mqtt", protocols: Some("mqtt"), origin: None };

/// The upgrade over an open stream: the WebSocket and the subprotocol the server chose, or the
/// handshake's error (an HTTP refusal is `WsError::Http`).
async fn upgrade_over<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    u: Upgrade<'_>,
) -> Result<(WebSocketStream<S>, Option<String>), WsError> {
    let mut request = format!("ws://localhost{}", u.path).into_client_request()?;
    let headers = request.headers_mut();
    if let Some(p) = u.protocols {
        headers.insert("Sec-WebSocket-Protocol", p.parse().expect("header value"));
    }
    if let Some(o) = u.origin {
        headers.insert("Origin", o.parse().expect("header value"));
    }
    let (ws, response) = tokio::time::timeout(WAIT, tokio_tungstenite::client_async(request, stream))
        .await
        .expect("upgrade answered in time")?;
    let chosen = response.headers().get("Sec-WebSocket-Protocol").map(|v| v.to_str().expect("ASCII").to_string());
    Ok((ws, chosen))
}

async fn tcp(addr: SocketAddr) -> TcpStream {
    tokio::time::timeout(WAIT, TcpStream::connect(addr)).await.expect("connect timeout").expect("connect")
}

/// A WebSocket client of `addr` speaking `mqtt`.
async fn ws_client(addr: SocketAddr) -> WebSocketStream<TcpStream> {
    upgrade_over(tcp(addr).await, MQTT).await.expect("upgrade").0
}

/// The HTTP status the server answers an upgrade with (101 when it upgrades).
async fn upgrade_status(addr: SocketAddr, u: Upgrade<'_>) -> u16 {
    match upgrade_over(tcp(addr).await, u).await {
        Ok(_) => 101,
        Err(WsError::Http(response)) => response.status().as_u16(),
        Err(e) => panic!("upgrade failed without an HTTP answer: {e}"),
    }
}

/// A client WebSocket as a byte stream, so `Raw` speaks MQTT over it: each write is one
/// binary message; reads return binary payloads and end at a close.
struct WsBytes<S> {
    ws: WebSocketStream<S>,
    pending: Bytes,
}

fn ws_bytes<S>(ws: WebSocketStream<S>) -> WsBytes<S> {
    WsBytes { ws, pending: Bytes::new() }
}

fn io_err(e: WsError) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for WsBytes<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        while this.pending.is_empty() {
            match ready!(Pin::new(&mut this.ws).poll_next(cx)) {
                Some(Ok(Message::Binary(b))) => this.pending = b,
                Some(Ok(Message::Close(_))) | None => return Poll::Ready(Ok(())),
                Some(Ok(Message::Text(t))) => panic!("the broker sent a text frame: {t}"),
                Some(Ok(_)) => {}
                Some(Err(e)) => return Poll::Ready(Err(io_err(e))),
            }
        }
        let n = this.pending.len().min(buf.remaining());
        buf.put_slice(&this.pending[..n]);
        this.pending.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for WsBytes<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let mut ws = Pin::new(&mut self.get_mut().ws);
        ready!(ws.as_mut().poll_ready(cx)).map_err(io_err)?;
        ws.start_send(Message::Binary(Bytes::copy_from_slice(buf))).map_err(io_err)?;
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().ws).poll_flush(cx).map_err(io_err)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().ws).poll_close(cx).map_err(io_err)
    }
}

/// An MQTT client over WebSocket to `addr`, connected as `c` (accepted).
async fn ws_mqtt(addr: SocketAddr, c: &Connect) -> Raw {
    let mut raw = Raw::over(ws_bytes(ws_client(addr).await));
    let ack = raw.handshake(c).await;
    assert_eq!(ack.code, 0, "CONNECT over WebSocket refused: {ack:?}");
    raw
}

/// The next message that is not a ping or pong, within `WAIT`; None when the stream ends.
async fn next_message<S: AsyncRead + AsyncWrite + Unpin>(ws: &mut WebSocketStream<S>) -> Option<Message> {
    tokio::time::timeout(WAIT, async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                Some(Ok(m)) => return Some(m),
                Some(Err(_)) | None => return None,
            }
        }
    })
    .await
    .expect("a message or the end of the stream within WAIT")
}

/// The broker closes with a close frame carrying `code`, then ends the stream.
async fn expect_close<S: AsyncRead + AsyncWrite + Unpin>(ws: &mut WebSocketStream<S>, code: CloseCode) {
    match next_message(ws).await {
        Some(Message::Close(Some(frame))) => assert_eq!(frame.code, code, "close reason: {}", frame.reason),
        other => panic!("expected a close frame with {code:?}, got {other:?}"),
    }
    assert!(next_message(ws).await.is_none(), "the stream goes on after the close");
}

// ---------------------------------------------------------------------------------------------
// MQTT over WebSocket
// ---------------------------------------------------------------------------------------------

/// Messages at QoS 0, 1 and 2 go from a TCP publisher to a WebSocket subscriber and from a
/// WebSocket publisher to a TCP subscriber, with every acknowledgement on the way.
#[tokio::test]
async fn qos_0_1_2_between_websocket_and_tcp() {
    let b = ws_broker(|_| {}, |_| {}).await;
    let mut ws_sub = ws_mqtt(ws_addr(&b), &Connect::v311("ws-sub")).await;
    ws_sub.subscribe(1, "to-ws/#", 2).await;
    let mut tcp_sub = connect_v5(b.addr, "tcp-sub").await;
    tcp_sub.subscribe(1, "to-tcp/#", 2).await;
    let mut tcp_pub = connect_v311(b.addr, "tcp-pub").await;
    let mut ws_pub = ws_mqtt(ws_addr(&b), &Connect::v5("ws-pub")).await;

    for qos in 0..=2u8 {
        let payload = format!("tcp to ws at qos {qos}");
        tcp_pub.publish(&format!("to-ws/{qos}"), payload.as_bytes(), qos, 10 + u16::from(qos)).await;
        let got = ws_sub.recv_publish_ack().await;
        assert_eq!(
            (got.topic.as_str(), got.payload.as_slice(), got.qos),
            (&*format!("to-ws/{qos}"), payload.as_bytes(), qos)
        );

        let payload = format!("ws to tcp at qos {qos}");
        ws_pub.publish(&format!("to-tcp/{qos}"), payload.as_bytes(), qos, 20 + u16::from(qos)).await;
        let got = tcp_sub.recv_publish_ack().await;
        assert_eq!(
            (got.topic.as_str(), got.payload.as_slice(), got.qos),
            (&*format!("to-tcp/{qos}"), payload.as_bytes(), qos)
        );
    }
    ws_sub.disconnect().await;
}

/// A subscriber that is not reading while 16 MB are published to it: the broker's frames fill
/// the socket and the WebSocket keeps the rest. Every message must arrive once it reads, in
/// order, which needs each write to be flushed through the WebSocket.
#[tokio::test]
async fn burst_to_a_slow_websocket_reader_arrives_whole() {
    let b = ws_broker(|_| {}, |_| {}).await;
    let mut sub = ws_mqtt(ws_addr(&b), &Connect::v311("slow-ws")).await;
    sub.subscribe(1, "burst", 0).await;
    let mut publisher = connect_v311(b.addr, "fast").await;
    burst_to_a_slow_reader(&mut publisher, &mut sub, "burst", 1000).await;
}

/// [MQTT-6.0.0-2]: a packet may span frames. CONNECT comes as three binary messages, and a
/// PUBLISH as one message in three frames (two continuation frames).
#[tokio::test]
async fn a_packet_split_across_three_frames() {
    let b = ws_broker(|_| {}, |_| {}).await;
    let mut sub = connect_v311(b.addr, "split-sub").await;
    sub.subscribe(1, "split", 1).await;

    let mut client = ws_bytes(ws_client(ws_addr(&b)).await);
    let connect = Connect::v311("split").bytes();
    for part in [&connect[..1], &connect[1..5], &connect[5..]] {
        client.ws.send(Message::Binary(Bytes::copy_from_slice(part))).await.expect("send part");
    }
    let publish = publish("split", b"in three frames", 1, 7);
    let (a, rest) = publish.split_at(3);
    let (bb, c) = rest.split_at(rest.len() / 2);
    let frames = [
        Frame::message(a.to_vec(), OpCode::Data(Data::Binary), false),
        Frame::message(bb.to_vec(), OpCode::Data(Data::Continue), false),
        Frame::message(c.to_vec(), OpCode::Data(Data::Continue), true),
    ];
    for f in frames {
        client.ws.send(Message::Frame(f)).await.expect("send frame");
    }
    let mut raw = Raw::over(client);
    assert_eq!(parse_connack(&raw.read_packet().await, false).code, 0);
    raw.expect_ack(0x40, 7).await;
    let got = sub.recv_publish_ack().await;
    assert_eq!(got.payload, b"in three frames");
}

/// Several packets in one binary message: SUBSCRIBE, a PUBLISH to it and PINGREQ, each
/// answered (the acknowledgements in order; the delivery may come before or after PINGRESP).
#[tokio::test]
async fn three_packets_in_one_frame() {
    let b = ws_broker(|_| {}, |_| {}).await;
    let mut raw = ws_mqtt(ws_addr(&b), &Connect::v311("three")).await;
    let mut frame = subscribe_pkt(false, 1, &[("three/t", 1)]);
    frame.extend(publish("three/t", b"together", 1, 2));
    frame.extend(PINGREQ);
    raw.send(&frame).await; // one write: one binary message

    let suback = raw.read_packet().await;
    assert_eq!(hex(&suback), hex(&[0x90, 0x03, 0x00, 0x01, 0x01]));
    let mut answers = Vec::new();
    let mut delivered = false;
    while answers.len() < 2 || !delivered {
        let p = raw.read_packet().await;
        if p[0] >> 4 == 3 {
            let m = parse_publish(&p, false);
            assert_eq!((m.topic.as_str(), m.payload.as_slice()), ("three/t", &b"together"[..]));
            raw.ack(&m).await;
            delivered = true;
        } else {
            answers.push(hex(&p));
        }
    }
    assert_eq!(answers, vec![hex(&[0x40, 0x02, 0x00, 0x02]), hex(&PINGRESP)]);
}

/// [MQTT-6.0.0-1]: a text frame closes the connection (close code 1003, unsupported data);
/// a ping before it is answered.
#[tokio::test]
async fn text_frame_closes_the_connection() {
    let b = ws_broker(|_| {}, |_| {}).await;
    let mut ws = ws_client(ws_addr(&b)).await;
    ws.send(Message::Binary(Connect::v311("texter").bytes().into())).await.expect("send CONNECT");
    assert_eq!(next_message(&mut ws).await, Some(Message::Binary(Bytes::from_static(&[0x20, 0x02, 0x00, 0x00]))));

    ws.send(Message::Ping(Bytes::from_static(b"are you there"))).await.expect("send ping");
    let pong = tokio::time::timeout(WAIT, ws.next()).await.expect("pong in time");
    assert!(matches!(&pong, Some(Ok(Message::Pong(p))) if p.as_ref() == b"are you there"), "{pong:?}");

    ws.send(Message::Text("hello".into())).await.expect("send text");
    expect_close(&mut ws, CloseCode::Unsupported).await;
}

/// A client closing the WebSocket is a lost connection: its will is published, and the
/// broker answers the close frame.
#[tokio::test]
async fn client_close_frame_ends_the_session_with_its_will() {
    let b = ws_broker(|_| {}, |_| {}).await;
    let mut watcher = connect_v311(b.addr, "watcher").await;
    watcher.subscribe(1, "wills/#", 0).await;
    let mut ws = ws_client(ws_addr(&b)).await;
    let c = Connect::v311("closer").will(Will::new("wills/closer", b"gone", 0));
    ws.send(Message::Binary(c.bytes().into())).await.expect("send CONNECT");
    assert!(matches!(next_message(&mut ws).await, Some(Message::Binary(_))), "CONNACK");
    ws.close(None).await.expect("send close");
    assert!(matches!(next_message(&mut ws).await, Some(Message::Close(_)) | None), "the close is answered");
    let will = watcher.recv_publish().await;
    assert_eq!((will.topic.as_str(), will.payload.as_slice()), ("wills/closer", &b"gone"[..]));
}

// ---------------------------------------------------------------------------------------------
// The upgrade
// ---------------------------------------------------------------------------------------------

/// `mqtt` is chosen from a browser's list; `mqttv3.1` alone is accepted; a list without
/// either is refused with 400; no header at all is accepted with none chosen.
#[tokio::test]
async fn subprotocol_negotiation() {
    let b = ws_broker(|_| {}, |_| {}).await;
    let addr = ws_addr(&b);
    let chosen = |protocols| async move {
        let (ws, chosen) = upgrade_over(tcp(addr).await, Upgrade { protocols, ..MQTT }).await.expect("upgrade");
        drop(ws);
        chosen
    };
    assert_eq!(chosen(Some("mqtt, mqttv3.1")).await.as_deref(), Some("mqtt"));
    assert_eq!(chosen(Some("mqttv3.1, mqtt")).await.as_deref(), Some("mqtt"));
    assert_eq!(chosen(Some("mqttv3.1")).await.as_deref(), Some("mqttv3.1"));
    assert_eq!(chosen(None).await, None);
    assert_eq!(upgrade_status(addr, Upgrade { protocols: Some("chat, soap"), ..MQTT }).await, 400);

    // Without a subprotocol the connection still speaks MQTT.
    let (ws, _) = upgrade_over(tcp(addr).await, Upgrade { protocols: None, ..MQTT }).await.expect("upgrade");
    let mut raw = Raw::over(ws_bytes(ws));
    assert_eq!(raw.handshake(&Connect::v5("no-subprotocol")).await.code, 0);
    raw.assert_alive("plain/t").await;
}

/// Requests for any path but the listener's get 404.
#[tokio::test]
async fn wrong_path_gets_404() {
    let b = ws_broker(|_| {}, |_| {}).await;
    assert_eq!(upgrade_status(ws_addr(&b), Upgrade { path: "/", ..MQTT }).await, 404);
    assert_eq!(upgrade_status(ws_addr(&b), Upgrade { path: "/mqtt/x", ..MQTT }).await, 404);
    assert_eq!(upgrade_status(ws_addr(&b), MQTT).await, 101);

    let b = ws_broker(|l| l.path = Some("/broker/ws".into()), |_| {}).await;
    assert_eq!(upgrade_status(ws_addr(&b), MQTT).await, 404);
    assert_eq!(upgrade_status(ws_addr(&b), Upgrade { path: "/broker/ws", ..MQTT }).await, 101);
    assert_eq!(upgrade_status(ws_addr(&b), Upgrade { path: "/broker/ws?token=1", ..MQTT }).await, 101);
}

/// With `allowed_origins`, a browser page from another origin gets 403; a listed one, or a
/// client that sends no Origin (not a browser), is upgraded.
#[tokio::test]
async fn origins_not_allowed_get_403() {
    let b = ws_broker(|l| l.allowed_origins = vec!["https://app.example.com".into()], |_| {}).await;
    let addr = ws_addr(&b);
    assert_eq!(upgrade_status(addr, Upgrade { origin: Some("https://evil.example.com"), ..MQTT }).await, 403);
    assert_eq!(upgrade_status(addr, Upgrade { origin: Some("http://app.example.com"), ..MQTT }).await, 403);
    assert_eq!(upgrade_status(addr, Upgrade { origin: Some("https://app.example.com"), ..MQTT }).await, 101);
    assert_eq!(upgrade_status(addr, Upgrade { origin: Some("https://APP.example.com"), ..MQTT }).await, 101);
    assert_eq!(upgrade_status(addr, MQTT).await, 101);

    // Without the key, any origin.
    let b = ws_broker(|_| {}, |_| {}).await;
    assert_eq!(upgrade_status(ws_addr(&b), Upgrade { origin: Some("https://evil.example.com"), ..MQTT }).await, 101);
}

/// An upgrade request whose headers go past 16 KiB is not answered: the connection closes.
#[tokio::test]
async fn oversized_upgrade_request_is_refused() {
    let b = ws_broker(|_| {}, |_| {}).await;
    let mut s = tcp(ws_addr(&b)).await;
    let filler = "x".repeat(1000);
    let mut request = String::from("GET /mqtt HTTP/1.1\r\nHost: localhost\r\n");
    for i in 0..20 {
        request.push_str(&format!("X-Filler-{i}: {filler}\r\n"));
    }
    let _ = s.write_all(request.as_bytes()).await; // the broker may close while this is sent
    let mut answer = Vec::new();
    let read = tokio::time::timeout(WAIT, s.read_to_end(&mut answer)).await.expect("closed within WAIT");
    assert!(read.is_err() || answer.is_empty(), "answered: {}", String::from_utf8_lossy(&answer));

    // A well-formed request of ordinary size is still served.
    assert_eq!(upgrade_status(ws_addr(&b), MQTT).await, 101);
}

// ---------------------------------------------------------------------------------------------
// Bounds
// ---------------------------------------------------------------------------------------------

/// A frame announcing 100 MiB is refused on its header (close 1009) while the client has sent
/// 1 KiB of it: the broker does not wait to buffer it. The same for a message whose frames
/// add up past the bound. Other clients are not disturbed.
#[tokio::test]
async fn oversized_frame_is_refused_without_buffering() {
    let b = ws_broker(|_| {}, |c| c.limits.max_packet_size = 1024).await;
    let mut ws = ws_client(ws_addr(&b)).await;
    ws.send(Message::Binary(Connect::v311("big").bytes().into())).await.expect("send CONNECT");
    assert!(matches!(next_message(&mut ws).await, Some(Message::Binary(_))), "CONNACK");
    let mut s = ws.into_inner();
    // FIN + binary, masked, 64-bit length.
    let mut header = vec![0x82, 0x80 | 127];
    header.extend((100u64 << 20).to_be_bytes());
    header.extend([1, 2, 3, 4]);
    s.write_all(&header).await.expect("frame header");
    s.write_all(&[0u8; 1024]).await.expect("first KiB");
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(WAIT, s.read_to_end(&mut answer)).await.expect("closed within WAIT");
    // Close frame: 0x88, length, code 1009 (0x03F1), reason.
    assert!(answer.len() >= 4 && answer[0] == 0x88 && answer[2..4] == [0x03, 0xF1], "answer: {}", hex(&answer));

    // Many small frames of one message: refused once they pass the bound (1 KiB + 64 KiB).
    let mut ws = ws_client(ws_addr(&b)).await;
    ws.send(Message::Binary(Connect::v311("big2").bytes().into())).await.expect("send CONNECT");
    assert!(matches!(next_message(&mut ws).await, Some(Message::Binary(_))), "CONNACK");
    let chunk = vec![0u8; 8 * 1024];
    let _ = ws.send(Message::Frame(Frame::message(chunk.clone(), OpCode::Data(Data::Binary), false))).await;
    for _ in 0..12 {
        // 104 KiB in all: past the bound whatever the broker has read so far.
        if ws.send(Message::Frame(Frame::message(chunk.clone(), OpCode::Data(Data::Continue), false))).await.is_err() {
            break;
        }
    }
    expect_close(&mut ws, CloseCode::Size).await;

    let mut other = connect_v311(b.addr, "bystander").await;
    other.assert_alive("still/here").await;
}

/// At `limits.max_connections`, a WebSocket client is upgraded and told why with CONNACK
/// 0x03 (server unavailable), then closed, as a TCP client is.
#[tokio::test]
async fn connection_limit_answers_over_websocket() {
    let b = ws_broker(|_| {}, |c| c.limits.max_connections = 1).await;
    let mut first = connect_v311(b.addr, "first").await;
    let mut raw = Raw::over(ws_bytes(ws_client(ws_addr(&b)).await));
    let ack = raw.handshake(&Connect::v311("second")).await;
    assert_eq!(ack.code, 0x03, "{ack:?}");
    raw.expect_closed().await;
    first.assert_alive("first/t").await;
}

// ---------------------------------------------------------------------------------------------
// wss
// ---------------------------------------------------------------------------------------------

/// A `wss` listener with a certificate made by rcgen: MQTT over WebSocket over TLS, delivered
/// to and from TCP.
#[tokio::test]
async fn wss_carries_mqtt() {
    let pki = TestPki::new();
    let tls = pki.server_tls();
    let b = ws_broker(
        |l| {
            l.kind = ListenerKind::Wss;
            l.tls = Some(tls);
        },
        |_| {},
    )
    .await;
    let stream = connect_tls(ws_addr(&b), pki.client_config(None)).await.expect("TLS");
    let (ws, chosen) =
        upgrade_over(stream, Upgrade { protocols: Some("mqtt, mqttv3.1"), ..MQTT }).await.expect("upgrade");
    assert_eq!(chosen.as_deref(), Some("mqtt"));
    let mut raw = Raw::over(ws_bytes(ws));
    assert_eq!(raw.handshake(&Connect::v5("wss-client")).await.code, 0);
    raw.subscribe(1, "wss/in", 2).await;
    let mut tcp_client = connect_v311(b.addr, "tcp-peer").await;
    tcp_client.subscribe(1, "wss/out", 1).await;
    tcp_client.publish("wss/in", b"to the browser", 2, 5).await;
    let got = raw.recv_publish_ack().await;
    assert_eq!((got.payload.as_slice(), got.qos), (&b"to the browser"[..], 2));
    raw.publish("wss/out", b"from the browser", 1, 6).await;
    assert_eq!(tcp_client.recv_publish_ack().await.payload, b"from the browser");

    // Plain ws to a wss listener is not served.
    assert!(upgrade_over(tcp(ws_addr(&b)).await, MQTT).await.is_err());
}

/// Mutual TLS on a `wss` listener: the certificate's CN is the user the ACL sees, and a
/// client without a certificate does not get in.
#[tokio::test]
async fn wss_client_certificate_is_the_user() {
    let pki = TestPki::new();
    let acl = pki.dir.path().join("acl");
    std::fs::write(&acl, "user alice\ntopic readwrite alice/#\n").expect("write acl");
    let mut tls = pki.server_tls();
    tls.client_ca = Some(pki.ca_path());
    tls.require_client_cert = true;
    tls.use_identity_as_username = true;
    let b = ws_broker(
        |l| {
            l.kind = ListenerKind::Wss;
            l.tls = Some(tls);
        },
        |c| c.auth.acl_file = Some(acl.clone()),
    )
    .await;
    let (cert, key) = pki.client_cert("alice");
    let stream = connect_tls(ws_addr(&b), pki.client_config(Some((&cert, &key)))).await.expect("TLS");
    let (ws, _) = upgrade_over(stream, MQTT).await.expect("upgrade");
    let mut alice = Raw::over(ws_bytes(ws));
    assert_eq!(alice.handshake(&Connect::v5("c1").login("bob", "whatever")).await.code, 0);
    alice.assert_alive("alice/x").await;
    assert_eq!(alice.subscribe_many(2, &[("bob/#", 1)]).await, vec![0x87], "bob's tree is not alice's");

    // No certificate: TLS 1.3 reports the refusal on the client's first read, here the
    // upgrade's answer.
    let refused = match connect_tls(ws_addr(&b), pki.client_config(None)).await {
        Err(_) => true,
        Ok(stream) => upgrade_over(stream, MQTT).await.is_err(),
    };
    assert!(refused, "a client without a certificate was upgraded");
}
