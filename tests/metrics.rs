//! The `[metrics] bind` HTTP listener: `/metrics` after a known workload (every counter
//! exact, bytes and packets counted against what the clients' sockets carried), the whole body
//! parsed as Prometheus text, `/api/status`, the status page, 404/405, and the listener's
//! bounds (connections, request time).

mod common;

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

async fn metrics_broker(f: impl FnOnce(&mut tern::Config)) -> (TestBroker, SocketAddr) {
    let b = start_with(|c| {
        c.metrics.bind = "127.0.0.1:0".into();
        // No $SYS: its deliveries would count as sent.
        c.metrics.sys_interval = 0;
        f(c);
    })
    .await;
    let http = b.handle.metrics_addr().expect("metrics listener bound");
    (b, http)
}

/// One HTTP/1.1 request; (status, headers in lower case, body).
async fn http(addr: SocketAddr, method: &str, path: &str) -> (u16, BTreeMap<String, String>, String) {
    let mut s = tokio::time::timeout(WAIT, TcpStream::connect(addr)).await.expect("connect timeout").expect("connect");
    let req = format!("{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.expect("write");
    let mut raw = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut raw)).await.expect("response timeout").expect("read");
    let text = String::from_utf8(raw).expect("utf-8 response");
    let (head, body) = text.split_once("\r\n\r\n").expect("a response head");
    let mut lines = head.lines();
    let status = lines.next().and_then(|l| l.split(' ').nth(1)).and_then(|c| c.parse().ok()).expect("status line");
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    (status, headers, body.to_string())
}

/// The samples of a Prometheus text body (format 0.0.4), parsed strictly: every line is
/// `# HELP name text`, `# TYPE name type`, or `name{label="value",...} number`; names and
/// label names are valid; each metric is declared once, before its samples. Panics on
/// anything else. Keys are `name` or `name{labels}` as written.
fn parse_prometheus(body: &str) -> BTreeMap<String, f64> {
    let valid_name = |n: &str| {
        !n.is_empty()
            && n.chars()
                .enumerate()
                .all(|(i, c)| c.is_ascii_alphabetic() || c == '_' || c == ':' || (i > 0 && c.is_ascii_digit()))
    };
    let mut typed: BTreeMap<String, String> = BTreeMap::new();
    let mut helped = HashSet::new();
    let mut samples = BTreeMap::new();
    assert!(body.ends_with('\n'), "body does not end with a newline");
    for line in body.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, text) = rest.split_once(' ').unwrap_or_else(|| panic!("HELP without text: {line}"));
            assert!(valid_name(name) && !text.is_empty(), "bad HELP: {line}");
            assert!(helped.insert(name.to_string()), "HELP twice for {name}");
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or_else(|| panic!("TYPE without type: {line}"));
            assert!(valid_name(name), "bad TYPE name: {line}");
            assert!(["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind), "bad TYPE: {line}");
            assert!(typed.insert(name.to_string(), kind.to_string()).is_none(), "TYPE twice for {name}");
            continue;
        }
        assert!(!line.starts_with('#') && !line.is_empty(), "unexpected line: {line:?}");
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("sample without value: {line}"));
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().unwrap_or_else(|_| panic!("bad value in {line}")),
        };
        let name = match series.split_once('{') {
            None => series,
            Some((name, labels)) => {
                let labels = labels.strip_suffix('}').unwrap_or_else(|| panic!("unclosed labels: {line}"));
                for pair in labels.split(',') {
                    let (k, v) = pair.split_once('=').unwrap_or_else(|| panic!("bad label {pair:?} in {line}"));
                    assert!(valid_name(k) && !k.contains(':'), "bad label name {k:?} in {line}");
                    assert!(v.len() >= 2 && v.starts_with('"') && v.ends_with('"'), "unquoted label value in {line}");
                }
                name
            }
        };
        assert!(valid_name(name), "bad metric name in {line}");
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s).filter(|b| typed.get(*b).map(String::as_str) == Some("histogram")))
            .unwrap_or(name);
        assert!(typed.contains_key(base), "sample before (or without) its TYPE: {line}");
        assert!(samples.insert(series.to_string(), value).is_none(), "sample twice: {line}");
    }
    samples
}

/// A client socket that records every byte written and read, to check the broker's byte and
/// packet counts against what really crossed the wire.
struct Counted {
    inner: TcpStream,
    log: Arc<Mutex<Wire>>,
}

#[derive(Default)]
struct Wire {
    written: Vec<u8>,
    read: Vec<u8>,
}

impl AsyncRead for Counted {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let new = buf.filled()[before..].to_vec();
        self.log.lock().unwrap().read.extend(new);
        r
    }
}

impl AsyncWrite for Counted {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, data);
        if let Poll::Ready(Ok(n)) = r {
            self.log.lock().unwrap().written.extend_from_slice(&data[..n]);
        }
        r
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

async fn counted(addr: SocketAddr, log: &Arc<Mutex<Wire>>, c: &Connect) -> Raw {
    let inner = TcpStream::connect(addr).await.expect("connect");
    inner.set_nodelay(true).expect("nodelay");
    let mut raw = Raw::over(Counted { inner, log: Arc::clone(log) });
    let ack = raw.handshake(c).await;
    assert_eq!(ack.code, 0);
    raw
}

/// Whole MQTT packets in a byte log.
fn packets(mut b: &[u8]) -> u64 {
    let mut n = 0;
    while !b.is_empty() {
        let (len, used) = read_varint(&b[1..]).expect("whole packets");
        b = &b[1 + used + len..];
        n += 1;
    }
    n
}

/// Scrapes until every `(series, value)` of `want` is in the body, or panics after 5 s with
/// the differences. Returns the last scrape.
async fn scrape_until(http_addr: SocketAddr, want: &[(String, f64)]) -> BTreeMap<String, f64> {
    let until = Instant::now() + Duration::from_secs(5);
    loop {
        let (status, headers, body) = http(http_addr, "GET", "/metrics").await;
        assert_eq!(status, 200);
        assert!(headers.get("content-type").is_some_and(|t| t.starts_with("text/plain; version=0.0.4")), "{headers:?}");
        let got = parse_prometheus(&body);
        let wrong: Vec<_> =
            want.iter().filter(|(k, v)| got.get(k) != Some(v)).map(|(k, v)| (k, v, got.get(k))).collect();
        if wrong.is_empty() {
            return got;
        }
        assert!(Instant::now() < until, "metrics never matched (series, wanted, got): {wrong:?}\n{body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Receives `publishes` PUBLISHes, `qos2` of them at QoS 2, completing every handshake
/// whatever order the packets come in (several may be in flight).
async fn receive_all(s: &mut Raw, publishes: usize, qos2: usize) {
    let (mut got, mut released) = (0, 0);
    while got < publishes || released < qos2 {
        let p = s.read_packet().await;
        match p[0] >> 4 {
            3 => {
                let m = parse_publish(&p, s.v5);
                match (m.qos, m.pid) {
                    (1, Some(id)) => s.send(&puback(id)).await,
                    (2, Some(id)) => s.send(&pubrec(id)).await,
                    _ => {}
                }
                got += 1;
            }
            6 => {
                s.send(&pubcomp(u16::from_be_bytes([p[2], p[3]]))).await;
                released += 1;
            }
            _ => panic!("unexpected packet {}", hex(&p)),
        }
    }
}

fn w(series: &str, v: u64) -> (String, f64) {
    (series.to_string(), v as f64)
}

#[tokio::test]
async fn a_known_workload_gives_exact_counters() {
    let (b, http_addr) = metrics_broker(|_| {}).await;
    let log = Arc::new(Mutex::new(Wire::default()));
    // Three subscribers (v5 and 3.1.1) at QoS 2, one publisher.
    let mut subs = Vec::new();
    for (i, c) in [Connect::v5("s1"), Connect::v311("s2"), Connect::v5("s3")].iter().enumerate() {
        let mut s = counted(b.addr, &log, c).await;
        s.subscribe(1 + i as u16, "load/#", 2).await;
        subs.push(s);
    }
    let mut p = counted(b.addr, &log, &Connect::v311("pub")).await;
    // 4 x QoS 0 of 10 bytes, 3 x QoS 1 of 100 bytes, 2 x QoS 2 of 1000 bytes.
    let plan: [(u8, usize, u64); 3] = [(0, 10, 4), (1, 100, 3), (2, 1000, 2)];
    let mut pid = 1;
    for (qos, size, n) in plan {
        for _ in 0..n {
            p.publish("load/x", &vec![b'x'; size], qos, pid).await;
            pid += 1;
        }
    }
    for s in &mut subs {
        receive_all(s, 9, 2).await;
    }
    // The broker has the last acknowledgements once it answered a ping behind them.
    for s in &mut subs {
        s.ping().await;
    }
    p.ping().await;

    let (written, read) = {
        let wire = log.lock().unwrap();
        (wire.written.clone(), wire.read.clone())
    };
    let mut want = vec![
        w("tern_clients_connected", 4),
        w("tern_connections_total", 4),
        w("tern_sessions", 4),
        w("tern_subscriptions", 3),
        w("tern_retained_messages", 0),
        w("tern_bytes_received_total", written.len() as u64),
        w("tern_bytes_sent_total", read.len() as u64),
        w("tern_packets_received_total", packets(&written)),
        w("tern_packets_sent_total", packets(&read)),
        w("tern_queued_messages", 0),
        w("tern_inflight_messages", 0),
        w("tern_acks_held", 0),
        w("tern_publishers_waiting", 0),
        w("tern_store_failed", 0),
    ];
    for (qos, size, n) in plan {
        want.push(w(&format!("tern_messages_received_total{{qos=\"{qos}\"}}"), n));
        want.push(w(&format!("tern_messages_sent_total{{qos=\"{qos}\"}}"), 3 * n));
        want.push(w(&format!("tern_publish_payload_bytes_received_total{{qos=\"{qos}\"}}"), n * size as u64));
        want.push(w(&format!("tern_publish_payload_bytes_sent_total{{qos=\"{qos}\"}}"), 3 * n * size as u64));
    }
    for cause in ["queue_full", "memory", "offline", "expired", "not_authorized", "too_large"] {
        want.push(w(&format!("tern_messages_dropped_total{{cause=\"{cause}\"}}"), 0));
    }
    let got = scrape_until(http_addr, &want).await;
    // The commit-latency histogram: cumulative buckets ending in +Inf = count.
    let buckets: Vec<f64> =
        got.iter().filter(|(k, _)| k.starts_with("tern_store_commit_seconds_bucket")).map(|(_, v)| *v).collect();
    assert_eq!(buckets.len(), 17, "{got:?}");
    let inf = got["tern_store_commit_seconds_bucket{le=\"+Inf\"}"];
    assert_eq!(inf, got["tern_store_commit_seconds_count"]);
    assert!(buckets.iter().all(|&v| v <= inf));
    assert!(got.contains_key("tern_uptime_seconds"));
    assert!(got.contains_key(&format!("tern_build_info{{version=\"{}\"}}", env!("CARGO_PKG_VERSION"))));

    // The status JSON agrees.
    let (status, headers, body) = http(http_addr, "GET", "/api/status").await;
    assert_eq!((status, headers.get("content-type").map(String::as_str)), (200, Some("application/json")));
    let s: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(s["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(s["clients"]["connected"], 4);
    assert_eq!(s["sessions"], 4);
    assert_eq!(s["subscriptions"], 3);
    assert_eq!(s["messages"]["received"], 9);
    assert_eq!(s["messages"]["sent"], 27);
    assert_eq!(s["messages"]["dropped"], 0);
    assert_eq!(s["store"]["ok"], true);
    assert!(s["history"]["interval_secs"].as_u64().is_some_and(|n| n > 0));
    assert!(s["history"]["samples"].is_array());
    drop((subs, p));
    poll_until(WAIT, "the clients' connections to end", || b.handle.session_count() == 0).await;
    scrape_until(http_addr, &[w("tern_clients_connected", 0), w("tern_sessions", 0)]).await;
}

#[tokio::test]
async fn drops_are_counted_by_cause_and_retained_without_sys() {
    let (b, http_addr) = metrics_broker(|c| c.metrics.sys_interval = 1).await;
    // A v5 subscriber that takes packets of at most 64 bytes.
    let mut small = Connect::v5("small");
    small.properties.extend(prop_u32(0x27, 64));
    let (mut sub, _) = connect_with(b.addr, &small).await;
    sub.subscribe(1, "d/#", 0).await;
    let mut p = connect_v311(b.addr, "p").await;
    p.publish("d/big", &[0u8; 200], 0, 0).await;
    p.publish("d/small", b"ok", 0, 0).await;
    assert_eq!(sub.recv_publish().await.topic, "d/small");
    for (i, t) in ["r/1", "r/2", "r/3"].iter().enumerate() {
        p.publish_retain(t, b"kept", 1, 1 + i as u16, true).await;
    }
    // The $SYS tree is retained too, and is not counted.
    scrape_until(
        http_addr,
        &[w("tern_messages_dropped_total{cause=\"too_large\"}", 1), w("tern_retained_messages", 3)],
    )
    .await;
    assert_eq!(b.handle.retained_count(), 3);
}

#[tokio::test]
async fn the_listener_answers_only_its_paths_and_serves_the_page() {
    let (_b, http_addr) = metrics_broker(|_| {}).await;
    let (status, _, body) = http(http_addr, "GET", "/nope").await;
    assert_eq!(status, 404, "{body}");
    let (status, headers, _) = http(http_addr, "POST", "/metrics").await;
    assert_eq!((status, headers.get("allow").map(String::as_str)), (405, Some("GET, HEAD")));
    let (status, headers, body) = http(http_addr, "GET", "/").await;
    assert_eq!(status, 200);
    assert_eq!(headers.get("content-type").map(String::as_str), Some("text/html; charset=utf-8"));
    // Self-contained: nothing fetched from elsewhere.
    for id in ["clients-connected", "retained-count", "sessions-count", "store-state", "rates-chart", "version"] {
        assert!(body.contains(&format!("id=\"{id}\"")), "no #{id}");
    }
    assert!(!body.contains("http://") || !body.contains("src=\"http"), "external asset");
    assert!(!body.contains("<script src") && !body.contains("<link"), "external asset");
    assert!(headers.get("content-security-policy").is_some_and(|p| p.contains("default-src 'none'")));
}

#[tokio::test]
async fn the_listener_is_bounded() {
    let (_b, http_addr) = metrics_broker(|c| {
        c.metrics.max_connections = 2;
        c.metrics.request_timeout_secs = 1;
    })
    .await;
    // Two silent connections take both slots; a third is closed unanswered.
    let mut a = TcpStream::connect(http_addr).await.unwrap();
    let mut b2 = TcpStream::connect(http_addr).await.unwrap();
    let mut c = TcpStream::connect(http_addr).await.unwrap();
    c.write_all(b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n").await.ok();
    let mut buf = Vec::new();
    let n = tokio::time::timeout(WAIT, c.read_to_end(&mut buf)).await.expect("third connection not closed");
    assert!(n.is_err() || buf.is_empty(), "third connection answered: {}", String::from_utf8_lossy(&buf));
    // The silent ones are closed once the request time is up.
    let t0 = Instant::now();
    for s in [&mut a, &mut b2] {
        let mut buf = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
            .await
            .expect("silent connection kept");
    }
    assert!(t0.elapsed() < Duration::from_secs(4), "took {:?}", t0.elapsed());
    // Then the listener serves again (once the closed connections' tasks gave their slots
    // back); a request head over 16 KiB is refused.
    let until = Instant::now() + WAIT;
    loop {
        let mut s = TcpStream::connect(http_addr).await.unwrap();
        let _ = s.write_all(b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n").await;
        let mut buf = Vec::new();
        let _ = tokio::time::timeout(WAIT, s.read_to_end(&mut buf)).await;
        if buf.starts_with(b"HTTP/1.1 200") {
            break;
        }
        assert!(Instant::now() < until, "no slot came free");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut big = TcpStream::connect(http_addr).await.unwrap();
    let head = format!("GET /metrics HTTP/1.1\r\nHost: t\r\nX-Big: {}\r\n\r\n", "a".repeat(40_000));
    let _ = big.write_all(head.as_bytes()).await;
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(WAIT, big.read_to_end(&mut buf)).await.expect("oversized request kept open");
    let text = String::from_utf8_lossy(&buf);
    assert!(buf.is_empty() || text.starts_with("HTTP/1.1 431"), "oversized request answered: {text}");
}

#[tokio::test]
async fn a_bad_bind_names_the_key() {
    let mut c = tern::Config::default();
    let dir = tempfile::tempdir().unwrap();
    c.listener[0].bind = "127.0.0.1:0".into();
    c.storage.dir = dir.path().to_path_buf();
    // Taken: a listener is already there.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    c.metrics.bind = taken.local_addr().unwrap().to_string();
    let err = tern::start(c).await.err().expect("start must fail").to_string();
    assert!(err.contains("metrics.bind"), "{err}");
}

#[tokio::test]
async fn the_grafana_dashboard_uses_only_exported_metrics() {
    let (_b, http_addr) = metrics_broker(|c| {
        // A bridge to nowhere, so that its state gauge is exported too.
        let topic = tern::config::BridgeTopic {
            pattern: "x/#".into(),
            direction: Default::default(),
            qos: 0,
            local_prefix: String::new(),
            remote_prefix: String::new(),
        };
        c.bridge.push(tern::config::Bridge::new("nowhere", "127.0.0.1:1", Default::default(), vec![topic]));
    })
    .await;
    let (_, _, body) = http(http_addr, "GET", "/metrics").await;
    let samples = parse_prometheus(&body);
    assert_eq!(samples.get("tern_bridge_up{bridge=\"nowhere\"}"), Some(&0.0));
    let exported: HashSet<String> = body
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .flat_map(|l| {
            let (name, kind) = l.split_once(' ').unwrap();
            let mut names = vec![name.to_string()];
            if kind == "histogram" {
                names.extend(["_bucket", "_sum", "_count"].map(|s| format!("{name}{s}")));
            }
            names
        })
        .collect();

    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/grafana-tern.json");
    let dashboard: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let vars: Vec<&str> =
        dashboard["templating"]["list"].as_array().unwrap().iter().map(|v| v["type"].as_str().unwrap()).collect();
    assert!(vars.contains(&"datasource"), "no datasource variable: {vars:?}");
    let mut used = HashSet::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            let mut rest = expr;
            while let Some(at) = rest.find("tern_") {
                let name: String = rest[at..]
                    .chars()
                    .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
                    .collect();
                rest = &rest[at + name.len()..];
                assert!(exported.contains(&name), "the dashboard uses {name}, which /metrics does not export ({expr})");
                used.insert(name);
            }
        }
    }
    for wanted in [
        "tern_clients_connected",
        "tern_messages_received_total",
        "tern_bytes_sent_total",
        "tern_messages_dropped_total",
        "tern_queued_messages",
        "tern_store_commit_seconds_bucket",
        "tern_bridge_up",
    ] {
        assert!(used.contains(wanted), "no panel shows {wanted}");
    }
    assert!(dashboard.to_string().contains("histogram_quantile(0.99"), "no commit latency quantiles");
}
