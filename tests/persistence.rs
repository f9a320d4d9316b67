//! Crash safety: the built `tern` binary is killed with SIGKILL (or stopped with SIGTERM)
//! in the middle of traffic and restarted on the same data directory and port; what it
//! acknowledged before dying must still be there afterwards.
//!
//! Each test runs its own broker process with `storage.durability = "sync"` (the default),
//! captures its output in the test's temporary directory and prints it when the test fails.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::process::TernProcess;
use common::{hex, puback, pubcomp, publish, publish_full, pubrec, pubrel, read_varint, Connect};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Longest wait for a single expected packet.
const WAIT: Duration = Duration::from_secs(5);

/// A `tern` process whose store commits every write before acknowledging it (the default,
/// written out because the tests depend on it).
fn broker() -> TernProcess {
    TernProcess::with_config("durability = \"sync\"\n")
}

// ---------------------------------------------------------------------------------------------
// A raw connection that survives the broker dying under it
// ---------------------------------------------------------------------------------------------

enum Ev {
    Packet(Vec<u8>),
    Closed,
    Timeout,
}

struct Wire {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Wire {
    async fn open(addr: SocketAddr) -> Wire {
        let stream =
            tokio::time::timeout(WAIT, TcpStream::connect(addr)).await.expect("connect timeout").expect("connect");
        stream.set_nodelay(true).expect("nodelay");
        Wire { stream, buf: Vec::new() }
    }

    /// Sends; false when the connection is gone.
    async fn send(&mut self, b: &[u8]) -> bool {
        matches!(tokio::time::timeout(WAIT, self.stream.write_all(b)).await, Ok(Ok(())))
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
        (self.buf.len() >= total).then(|| self.buf.drain(..total).collect())
    }

    /// The next whole packet, the end of the connection (a partial packet left when the
    /// broker died is dropped: the client never got it), or nothing within `dur`.
    async fn next(&mut self, dur: Duration) -> Ev {
        let deadline = tokio::time::Instant::now() + dur;
        loop {
            if let Some(p) = self.take_packet() {
                return Ev::Packet(p);
            }
            let mut chunk = [0u8; 16384];
            match tokio::time::timeout_at(deadline, self.stream.read(&mut chunk)).await {
                Err(_) => return Ev::Timeout,
                Ok(Ok(0)) | Ok(Err(_)) => return Ev::Closed,
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    async fn read(&mut self, what: &str) -> Vec<u8> {
        match self.next(WAIT).await {
            Ev::Packet(p) => p,
            Ev::Closed => panic!("connection closed while waiting for {what}"),
            Ev::Timeout => panic!("no {what} within {WAIT:?}"),
        }
    }

    /// 3.1.1 CONNECT; asserts success and the session-present flag.
    async fn connect(addr: SocketAddr, id: &str, clean: bool, expect_present: bool) -> Wire {
        let mut w = Wire::open(addr).await;
        assert!(w.send(&Connect::v311(id).clean(clean).bytes()).await, "send CONNECT of {id}");
        let p = w.read("CONNACK").await;
        assert_eq!(
            hex(&p),
            hex(&[0x20, 0x02, u8::from(expect_present), 0x00]),
            "CONNACK of {id} (clean={clean}): expected session present = {}",
            u8::from(expect_present)
        );
        w
    }

    async fn subscribe(&mut self, pid: u16, filter: &str, qos: u8) {
        assert!(self.send(&common::subscribe_pkt(false, pid, &[(filter, qos)])).await, "send SUBSCRIBE");
        let p = self.read("SUBACK").await;
        let [hi, lo] = pid.to_be_bytes();
        assert_eq!(hex(&p), hex(&[0x90, 0x03, hi, lo, qos]), "SUBACK for {filter}");
    }

    /// DISCONNECT and wait for the broker to close the socket.
    async fn disconnect(mut self) {
        assert!(self.send(&common::DISCONNECT).await, "send DISCONNECT");
        match self.next(WAIT).await {
            Ev::Closed => {}
            Ev::Packet(p) => panic!("packet after DISCONNECT: {}", hex(&p)),
            Ev::Timeout => panic!("connection still open {WAIT:?} after DISCONNECT"),
        }
    }
}

/// Packet id of an acknowledgement (PUBACK, PUBREC, PUBREL, PUBCOMP).
fn ack_id(p: &[u8]) -> u16 {
    assert!(p.len() >= 4, "short ack {}", hex(p));
    u16::from_be_bytes([p[2], p[3]])
}

/// "1-5, 8, 10-12"
fn ranges<'a>(nums: impl IntoIterator<Item = &'a u64>) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut run: Option<(u64, u64)> = None;
    let flush = |r: (u64, u64), out: &mut Vec<String>| {
        out.push(if r.0 == r.1 { r.0.to_string() } else { format!("{}-{}", r.0, r.1) })
    };
    for &n in nums {
        run = match run {
            Some((a, b)) if n == b + 1 => Some((a, n)),
            Some(r) => {
                flush(r, &mut out);
                Some((n, n))
            }
            None => Some((n, n)),
        };
    }
    if let Some(r) = run {
        flush(r, &mut out);
    }
    if out.is_empty() {
        "none".into()
    } else {
        out.join(", ")
    }
}

/// Polls `cond` every 10 ms until it holds; panics with `what` after `limit`.
async fn wait_until(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !cond() {
        assert!(t0.elapsed() < limit, "timed out after {limit:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Streaming publisher
// ---------------------------------------------------------------------------------------------

/// Publisher progress, shared with the test.
#[derive(Default)]
struct PubState {
    /// Numbers the broker acknowledged (PUBACK for QoS 1, PUBREC for QoS 2).
    acked: Mutex<BTreeSet<u64>>,
    acked_count: AtomicU64,
    sent: AtomicU64,
    /// Protocol surprises (wrong packet, unknown id).
    errors: Mutex<Vec<String>>,
}

/// Streams QoS `qos` messages numbered `first`, `first + 1`, ... to `topic`, at most
/// `window` unacknowledged, until the connection closes (the broker was killed) or `last` was
/// sent and everything acknowledged. Packet id = number, so numbers stay below 65,535.
async fn stream_publisher(
    addr: SocketAddr,
    id: String,
    topic: &'static str,
    qos: u8,
    window: usize,
    (first, last): (u64, u64),
    st: Arc<PubState>,
) {
    assert!(last < 65535, "packet id = sequence number");
    let mut w = Wire::connect(addr, &id, true, false).await;
    let mut unacked: HashMap<u16, u64> = HashMap::new();
    let mut next = first;
    loop {
        while unacked.len() < window && next <= last {
            let pid = next as u16;
            if !w.send(&publish(topic, next.to_string().as_bytes(), qos, pid)).await {
                return;
            }
            unacked.insert(pid, next);
            st.sent.store(next, Ordering::SeqCst);
            next += 1;
        }
        if unacked.is_empty() && next > last {
            return;
        }
        match w.next(Duration::from_secs(10)).await {
            Ev::Closed => return,
            Ev::Timeout => {
                st.errors.lock().unwrap().push(format!("no acknowledgement for 10 s; {} unacked", unacked.len()))
            }
            Ev::Packet(p) => match (p[0], qos) {
                (0x40, 1) | (0x50, 2) => {
                    let pid = ack_id(&p);
                    match unacked.remove(&pid) {
                        Some(n) => {
                            st.acked.lock().unwrap().insert(n);
                            st.acked_count.fetch_add(1, Ordering::SeqCst);
                        }
                        None => st.errors.lock().unwrap().push(format!("ack for unknown id: {}", hex(&p))),
                    }
                    if qos == 2 && !w.send(&pubrel(pid)).await {
                        return;
                    }
                }
                (0x70, 2) => {}
                _ => st.errors.lock().unwrap().push(format!("unexpected packet to the publisher: {}", hex(&p))),
            },
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Persistent subscriber with the receiver's side of the QoS rules
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy)]
struct Got {
    /// Connection number of the subscriber (1-based).
    run: u32,
    n: u64,
    dup: bool,
    pid: u16,
}

/// The subscriber's state across connections (and broker restarts), as a real client keeps
/// its session state.
#[derive(Default)]
struct SubState {
    /// PUBLISH packets received, in order (QoS 1: every one; QoS 2: only new deliveries).
    got: Vec<Got>,
    /// QoS 2: every PUBLISH packet received, deliveries and duplicates alike.
    raw: Vec<Got>,
    /// QoS 2 ids received and not yet released, with the number first delivered under each.
    unreleased: HashMap<u16, u64>,
    /// QoS 2 duplicates that were ignored: (packet, number held under that id).
    ignored: Vec<(Got, u64)>,
    /// PUBRELs received for ids not held.
    unknown_pubrel: Vec<(u32, u16)>,
    errors: Vec<String>,
}

/// Subscriber progress: PUBLISH packets received, and the number in the latest one.
#[derive(Default)]
struct Progress {
    count: AtomicU64,
    last: AtomicU64,
}

/// How a subscriber connection ended.
#[derive(Debug, PartialEq)]
enum End {
    Closed,
    Quiet,
}

/// Reads the subscriber's connection until it closes, or until nothing arrives for `quiet`
/// (when given), answering every message at once.
async fn subscriber_loop(
    mut w: Wire,
    run: u32,
    topic: &str,
    quiet: Option<Duration>,
    st: Arc<Mutex<SubState>>,
    progress: Arc<Progress>,
) -> End {
    let deadline_quiet = quiet.unwrap_or(Duration::from_secs(30));
    loop {
        let p = match w.next(deadline_quiet).await {
            Ev::Closed => return End::Closed,
            Ev::Timeout if quiet.is_some() => return End::Quiet,
            Ev::Timeout => {
                st.lock()
                    .unwrap()
                    .errors
                    .push(format!("connection {run}: nothing for {deadline_quiet:?} while streaming"));
                return End::Quiet;
            }
            Ev::Packet(p) => p,
        };
        let reply = {
            let mut s = st.lock().unwrap();
            match p[0] >> 4 {
                3 => {
                    let m = common::parse_publish(&p, false);
                    let n: u64 = match std::str::from_utf8(&m.payload).ok().and_then(|t| t.parse().ok()) {
                        Some(n) => n,
                        None => {
                            s.errors.push(format!("run {run}: bad payload {}", hex(&p)));
                            continue;
                        }
                    };
                    if m.topic != topic {
                        s.errors.push(format!("run {run}: unexpected topic {}", m.topic));
                    }
                    let pid = m.pid.unwrap_or(0);
                    let g = Got { run, n, dup: m.dup, pid };
                    progress.count.fetch_add(1, Ordering::SeqCst);
                    progress.last.store(n, Ordering::SeqCst);
                    match m.qos {
                        1 => {
                            s.got.push(g);
                            puback(pid)
                        }
                        2 => {
                            s.raw.push(g);
                            match s.unreleased.get(&pid) {
                                Some(&held) => s.ignored.push((g, held)),
                                None => {
                                    s.unreleased.insert(pid, n);
                                    s.got.push(g);
                                }
                            }
                            pubrec(pid)
                        }
                        q => {
                            s.errors.push(format!("run {run}: message {n} at QoS {q}"));
                            continue;
                        }
                    }
                }
                6 => {
                    let pid = ack_id(&p);
                    if s.unreleased.remove(&pid).is_none() {
                        s.unknown_pubrel.push((run, pid));
                    }
                    pubcomp(pid)
                }
                _ => {
                    s.errors.push(format!("run {run}: unexpected packet {}", hex(&p)));
                    continue;
                }
            }
        };
        if !w.send(&reply).await {
            return End::Closed;
        }
    }
}

/// Per-run checks: messages first sent on this connection come in increasing order; DUP=1
/// ones (redeliveries) only before them. Returns the violations.
fn order_violations(got: &[Got]) -> Vec<String> {
    let mut bad = Vec::new();
    let runs: BTreeSet<u32> = got.iter().map(|g| g.run).collect();
    for run in runs {
        let msgs: Vec<&Got> = got.iter().filter(|g| g.run == run).collect();
        let mut seen_fresh = false;
        let mut last_dup: Option<u64> = None;
        let mut last_fresh: Option<u64> = None;
        for g in msgs {
            if g.dup {
                if seen_fresh {
                    bad.push(format!("run {run}: {} with DUP=1 after messages without DUP", g.n));
                }
                if last_dup.is_some_and(|l| g.n <= l) {
                    bad.push(format!("run {run}: redelivery {} after redelivery {}", g.n, last_dup.unwrap_or(0)));
                }
                last_dup = Some(g.n);
            } else {
                seen_fresh = true;
                if last_fresh.is_some_and(|l| g.n <= l) {
                    bad.push(format!("run {run}: {} (DUP=0) after {}", g.n, last_fresh.unwrap_or(0)));
                }
                last_fresh = Some(g.n);
            }
        }
    }
    bad
}

/// How the first few of `nums` were received.
fn describe(copies: &BTreeMap<u64, Vec<Got>>, nums: &[u64]) -> String {
    let mut out: Vec<String> = nums
        .iter()
        .take(8)
        .map(|n| {
            let how: Vec<String> = copies[n]
                .iter()
                .map(|g| format!("connection {} id {} DUP={}", g.run, g.pid, u8::from(g.dup)))
                .collect();
            format!("{n} [{}]", how.join(", "))
        })
        .collect();
    if nums.len() > 8 {
        out.push("...".into());
    }
    out.join("; ")
}

fn run_summary(got: &[Got]) -> String {
    let mut per_run: BTreeMap<u32, (usize, usize, u64, u64)> = BTreeMap::new();
    for g in got {
        let e = per_run.entry(g.run).or_insert((0, 0, u64::MAX, 0));
        e.0 += 1;
        e.1 += usize::from(g.dup);
        e.2 = e.2.min(g.n);
        e.3 = e.3.max(g.n);
    }
    per_run
        .iter()
        .map(|(r, (c, d, lo, hi))| format!("connection {r}: {c} messages ({d} with DUP=1), numbers {lo}..={hi}"))
        .collect::<Vec<_>>()
        .join("; ")
}

/// The scenario of the two streaming tests. Returns (publisher state, subscriber state).
///
/// 1. The subscriber makes its session and goes offline; publisher A streams while it is away.
/// 2. The subscriber comes back (connection 2) and drains its backlog while A goes on;
///    SIGKILL in the middle of the backlog.
/// 3. Restart; the subscriber comes back (connection 3), publisher B continues the
///    numbering; SIGKILL once the subscriber has caught up with the live stream.
/// 4. Restart; the subscriber comes back (connection 4) and reads until quiet.
async fn stream_kill_restart(
    b: &mut TernProcess,
    qos: u8,
    topic: &'static str,
) -> (Arc<PubState>, Arc<Mutex<SubState>>) {
    /// Acknowledged messages queued for the offline subscriber before it returns.
    const OFFLINE: u64 = 2000;
    /// Messages the subscriber receives on connection 2 before the kill (within the backlog).
    const DRAINING: u64 = 800;
    /// How far past B's first number the subscriber gets before the second kill.
    const LIVE: u64 = 500;
    const WINDOW: usize = 20;
    let sub_id = format!("crash-sub-q{qos}");
    let ps = Arc::new(PubState::default());
    let ss = Arc::new(Mutex::new(SubState::default()));
    b.start_async(&[]).await;
    let addr = b.addr();

    // 1. Session made, subscriber away, stream starts.
    let mut w = Wire::connect(addr, &sub_id, false, false).await;
    w.subscribe(1, topic, qos).await;
    w.disconnect().await;
    // Not followed by an assertion: a moment for the broker to detach the session before the
    // stream starts (it does right after closing the socket; a message published before that
    // still reaches the session's queue). Nothing a client sees tells the two apart.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let t0 = Instant::now();
    let publisher = tokio::spawn(stream_publisher(
        addr,
        format!("crash-pub-a-q{qos}"),
        topic,
        qos,
        WINDOW,
        (1, 30_000),
        Arc::clone(&ps),
    ));
    wait_until(Duration::from_secs(20), "the publisher's first acknowledgements", || {
        ps.acked_count.load(Ordering::SeqCst) >= OFFLINE
    })
    .await;

    // 2. Back online, draining the backlog while the stream goes on; killed midway.
    let progress = Arc::new(Progress::default());
    let w = Wire::connect(addr, &sub_id, false, true).await;
    let online = tokio::spawn(subscriber_loop(w, 2, topic, None, Arc::clone(&ss), Arc::clone(&progress)));
    wait_until(Duration::from_secs(20), "the subscriber to receive part of its backlog", || {
        progress.count.load(Ordering::SeqCst) >= DRAINING
    })
    .await;
    let seen =
        (ps.sent.load(Ordering::SeqCst), ps.acked_count.load(Ordering::SeqCst), progress.last.load(Ordering::SeqCst));
    b.kill();
    println!(
        "q{qos}: kill 1 at {:?}: publisher A sent up to {}, {} acknowledged; subscriber at {} ({} packets)",
        t0.elapsed(),
        seen.0,
        seen.1,
        seen.2,
        progress.count.load(Ordering::SeqCst)
    );
    end_of_connections(publisher, online).await;
    let a_sent = ps.sent.load(Ordering::SeqCst);

    // 3. Restart; back online, publisher B continues; killed once the subscriber is live.
    b.start_async(&[]).await;
    let progress = Arc::new(Progress::default());
    let w = Wire::connect(addr, &sub_id, false, true).await;
    let online = tokio::spawn(subscriber_loop(w, 3, topic, None, Arc::clone(&ss), Arc::clone(&progress)));
    let first_b = a_sent + 1;
    let publisher = tokio::spawn(stream_publisher(
        addr,
        format!("crash-pub-b-q{qos}"),
        topic,
        qos,
        WINDOW,
        (first_b, first_b + 30_000),
        Arc::clone(&ps),
    ));
    wait_until(Duration::from_secs(20), "the subscriber to catch up with the live stream", || {
        progress.last.load(Ordering::SeqCst) >= first_b + LIVE
    })
    .await;
    let seen =
        (ps.sent.load(Ordering::SeqCst), ps.acked_count.load(Ordering::SeqCst), progress.last.load(Ordering::SeqCst));
    b.kill();
    println!(
        "q{qos}: kill 2: publisher B (from {first_b}) sent up to {}, {} acknowledged in all; subscriber at {} ({} packets)",
        seen.0,
        seen.1,
        seen.2,
        progress.count.load(Ordering::SeqCst)
    );
    end_of_connections(publisher, online).await;

    // 4. Restart; the rest is delivered.
    b.start_async(&[]).await;
    let w = Wire::connect(addr, &sub_id, false, true).await;
    let end = tokio::time::timeout(
        Duration::from_secs(30),
        subscriber_loop(w, 4, topic, Some(Duration::from_secs(2)), Arc::clone(&ss), Arc::new(Progress::default())),
    )
    .await;
    assert_eq!(end.ok(), Some(End::Quiet), "the subscriber's last connection should end by going quiet");
    (ps, ss)
}

/// After a kill: the publisher and the subscriber both see their connection end.
async fn end_of_connections(publisher: tokio::task::JoinHandle<()>, subscriber: tokio::task::JoinHandle<End>) {
    let p = tokio::time::timeout(Duration::from_secs(10), publisher).await;
    assert!(matches!(p, Ok(Ok(()))), "publisher did not end cleanly after the kill: {p:?}");
    let s = tokio::time::timeout(Duration::from_secs(10), subscriber).await;
    assert!(matches!(s, Ok(Ok(End::Closed))), "subscriber did not see the connection end: {s:?}");
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos1_stream_survives_kill() {
    let mut b = broker();
    let (ps, ss) = stream_kill_restart(&mut b, 1, "crash/q1").await;
    let acked = ps.acked.lock().unwrap().clone();
    let s = ss.lock().unwrap();
    let received: BTreeSet<u64> = s.got.iter().map(|g| g.n).collect();
    let missing: Vec<u64> = acked.difference(&received).copied().collect();
    let mut copies: BTreeMap<u64, Vec<Got>> = BTreeMap::new();
    for g in &s.got {
        copies.entry(g.n).or_default().push(*g);
    }
    let bad_dups: Vec<u64> =
        copies.iter().filter(|(_, c)| c.len() > 1 && c[1..].iter().any(|g| !g.dup)).map(|(n, _)| *n).collect();
    let redelivered = copies.values().filter(|c| c.len() > 1).count();
    let order = order_violations(&s.got);
    println!(
        "q1: publisher acked {} (max {}); subscriber: {}; {} numbers received more than once",
        acked.len(),
        acked.iter().next_back().copied().unwrap_or(0),
        run_summary(&s.got),
        redelivered
    );
    let perrs = ps.errors.lock().unwrap().clone();
    assert!(perrs.is_empty() && s.errors.is_empty(), "protocol errors: publisher {perrs:?}, subscriber {:?}", s.errors);
    assert!(missing.is_empty(), "{} acknowledged messages never delivered: {}", missing.len(), ranges(&missing));
    assert!(
        bad_dups.is_empty(),
        "{} messages delivered again without DUP=1: {}; first ones: {}",
        bad_dups.len(),
        ranges(&bad_dups),
        describe(&copies, &bad_dups)
    );
    assert!(order.is_empty(), "order violations: {}", order.join("; "));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos2_stream_survives_kill_exactly_once() {
    let mut b = broker();
    let (ps, ss) = stream_kill_restart(&mut b, 2, "crash/q2").await;
    let acked = ps.acked.lock().unwrap().clone();
    let s = ss.lock().unwrap();
    let received: BTreeSet<u64> = s.got.iter().map(|g| g.n).collect();
    let missing: Vec<u64> = acked.difference(&received).copied().collect();
    let mut copies: BTreeMap<u64, Vec<Got>> = BTreeMap::new();
    for g in &s.got {
        copies.entry(g.n).or_default().push(*g);
    }
    let twice: Vec<u64> = copies.iter().filter(|(_, c)| c.len() > 1).map(|(n, _)| *n).collect();
    // A duplicate ignored under an id that held another message: that message is lost to us.
    let swallowed: Vec<String> = s
        .ignored
        .iter()
        .filter(|(g, held)| g.n != *held)
        .map(|(g, held)| {
            format!("{} (run {}, id {}, DUP={}) ignored: id held {held}", g.n, g.run, g.pid, u8::from(g.dup))
        })
        .collect();
    let order = order_violations(&s.got);
    println!(
        "q2: publisher acked {} (max {}); deliveries: {}; {} PUBLISH packets in all, {} duplicates ignored, \
         {} PUBRELs for unknown ids, {} ids unreleased at the end",
        acked.len(),
        acked.iter().next_back().copied().unwrap_or(0),
        run_summary(&s.got),
        s.raw.len(),
        s.ignored.len(),
        s.unknown_pubrel.len(),
        s.unreleased.len()
    );
    let perrs = ps.errors.lock().unwrap().clone();
    assert!(perrs.is_empty() && s.errors.is_empty(), "protocol errors: publisher {perrs:?}, subscriber {:?}", s.errors);
    assert!(missing.is_empty(), "{} acknowledged messages never delivered: {}", missing.len(), ranges(&missing));
    assert!(
        twice.is_empty(),
        "{} messages delivered twice: {}; first ones: {}",
        twice.len(),
        ranges(&twice),
        describe(&copies, &twice)
    );
    assert!(swallowed.is_empty(), "packet ids reused while unreleased: {}", swallowed.join("; "));
    assert!(order.is_empty(), "order violations: {}", order.join("; "));
    assert!(s.unreleased.is_empty(), "ids never released by the broker: {:?}", s.unreleased);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_survives_kill() {
    let mut b = broker();
    b.start_async(&[]).await;
    let mut w = Wire::connect(b.addr(), "retainer", true, false).await;
    // 50 retained messages plus one that is set and then cleared, pipelined.
    let mut out = Vec::new();
    for i in 0..50u16 {
        out.extend(publish_full(
            format!("ret/{i}").as_bytes(),
            format!("value-{i}").as_bytes(),
            1,
            i + 1,
            true,
            false,
            None,
        ));
    }
    out.extend(publish_full(b"ret/cleared", b"soon gone", 1, 51, true, false, None));
    out.extend(publish_full(b"ret/cleared", b"", 1, 52, true, false, None));
    assert!(w.send(&out).await, "send the retained messages");
    let mut acks = BTreeSet::new();
    while acks.len() < 52 {
        let p = w.read("PUBACK").await;
        assert_eq!(p[0], 0x40, "expected PUBACK, got {}", hex(&p));
        acks.insert(ack_id(&p));
    }
    b.kill();

    b.start_async(&[]).await;
    let mut w = Wire::connect(b.addr(), "reader", true, false).await;
    assert!(w.send(&common::subscribe_pkt(false, 1, &[("#", 1)])).await);
    let mut got: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let mut suback = false;
    loop {
        match w.next(Duration::from_millis(1500)).await {
            Ev::Packet(p) if p[0] == 0x90 => {
                assert_eq!(hex(&p), hex(&[0x90, 0x03, 0x00, 0x01, 0x01]), "SUBACK");
                suback = true;
            }
            Ev::Packet(p) if p[0] >> 4 == 3 => {
                let m = common::parse_publish(&p, false);
                assert!(m.retain, "retained message {} without the retain flag", m.topic);
                if let Some(pid) = m.pid {
                    assert!(w.send(&puback(pid)).await);
                }
                assert!(got.insert(m.topic.clone(), m.payload).is_none(), "{} delivered twice", m.topic);
            }
            Ev::Packet(p) => panic!("unexpected packet {}", hex(&p)),
            Ev::Closed => panic!("connection closed"),
            Ev::Timeout => break,
        }
    }
    assert!(suback, "no SUBACK");
    assert!(!got.contains_key("ret/cleared"), "the cleared retained message came back: {:?}", got.get("ret/cleared"));
    let wrong: Vec<String> = (0..50)
        .filter(|i| got.get(&format!("ret/{i}")).map(Vec::as_slice) != Some(format!("value-{i}").as_bytes()))
        .map(|i| {
            format!("ret/{i}: {:?}", got.get(&format!("ret/{i}")).map(|v| String::from_utf8_lossy(v).into_owned()))
        })
        .collect();
    assert!(wrong.is_empty(), "retained messages missing or wrong after the kill: {}", wrong.join("; "));
    assert_eq!(got.len(), 50, "retained topics after restart: {:?}", got.keys().collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscription_made_just_before_kill_survives() {
    let mut b = broker();
    b.start_async(&[]).await;
    let mut w = Wire::connect(b.addr(), "late-sub", false, false).await;
    w.subscribe(7, "late/topic", 1).await;
    b.kill();
    drop(w);

    b.start_async(&[]).await;
    let mut w = Wire::connect(b.addr(), "late-sub", false, true).await;
    let mut p = Wire::connect(b.addr(), "late-pub", true, false).await;
    assert!(p.send(&publish("late/topic", b"after the crash", 1, 1)).await);
    let ack = p.read("PUBACK").await;
    assert_eq!(hex(&ack), hex(&puback(1)), "PUBACK");
    let m = common::parse_publish(&w.read("the message on the surviving subscription").await, false);
    assert_eq!((m.topic.as_str(), m.payload.as_slice(), m.qos), ("late/topic", &b"after the crash"[..], 1));
    assert!(w.send(&puback(m.pid.expect("packet id"))).await);
    w.disconnect().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clean_restart_keeps_10000_retained_and_1000_sessions() {
    const RETAINED: usize = 10_000;
    const SESSIONS: usize = 1_000;
    const CONCURRENCY: usize = 50;
    let mut b = broker();
    b.start_async(&[]).await;
    let addr = b.addr();
    let t0 = Instant::now();

    // 10,000 retained messages over one connection, QoS 1, pipelined in chunks of 1,000.
    let mut w = Wire::connect(addr, "bulk-retainer", true, false).await;
    for chunk in 0..RETAINED / 1000 {
        let mut out = Vec::new();
        for i in chunk * 1000..(chunk + 1) * 1000 {
            let pid = (i % 60_000 + 1) as u16;
            let topic = format!("bulk/{}/{i}", i / 100);
            out.extend(publish_full(topic.as_bytes(), format!("payload-{i}").as_bytes(), 1, pid, true, false, None));
        }
        assert!(w.send(&out).await, "send retained chunk {chunk}");
        for _ in 0..1000 {
            let p = w.read("PUBACK").await;
            assert_eq!(p[0], 0x40, "expected PUBACK, got {}", hex(&p));
        }
    }
    w.disconnect().await;
    println!("bulk: {RETAINED} retained stored in {:?}", t0.elapsed());

    // 1,000 persistent sessions, each with one subscription.
    let t1 = Instant::now();
    let sem = Arc::new(tokio::sync::Semaphore::new(CONCURRENCY));
    let mut set = tokio::task::JoinSet::new();
    for i in 0..SESSIONS {
        let sem = Arc::clone(&sem);
        set.spawn(async move {
            let _permit = sem.acquire_owned().await.expect("semaphore");
            let mut w = Wire::connect(addr, &format!("sess-{i}"), false, false).await;
            w.subscribe(1, &format!("s/{i}"), 1).await;
            w.disconnect().await;
        });
    }
    while let Some(r) = set.join_next().await {
        r.expect("session set-up task");
    }
    println!("bulk: {SESSIONS} sessions made in {:?}", t1.elapsed());

    let t2 = Instant::now();
    b.terminate_async().await;
    println!("bulk: graceful stop took {:?}", t2.elapsed());
    let t3 = Instant::now();
    b.start_async(&[]).await;
    println!("bulk: restart took {:?}", t3.elapsed());
    if let Some(line) = b.log().lines().rev().find(|l| l.contains("state recovered")) {
        println!("bulk: {line}");
    }

    // Every retained message comes back to a new `#` subscriber.
    let t4 = Instant::now();
    let mut r = Wire::connect(addr, "bulk-reader", true, false).await;
    assert!(r.send(&common::subscribe_pkt(false, 1, &[("#", 1)])).await);
    let mut got: HashMap<String, Vec<u8>> = HashMap::new();
    let mut not_retained = 0usize;
    let deadline = Instant::now() + Duration::from_secs(30);
    while got.len() < RETAINED {
        assert!(Instant::now() < deadline, "only {} of {RETAINED} retained messages within 30 s", got.len());
        match r.next(Duration::from_secs(3)).await {
            Ev::Packet(p) if p[0] == 0x90 => assert_eq!(hex(&p), hex(&[0x90, 0x03, 0x00, 0x01, 0x01]), "SUBACK"),
            Ev::Packet(p) if p[0] >> 4 == 3 => {
                let m = common::parse_publish(&p, false);
                not_retained += usize::from(!m.retain);
                if let Some(pid) = m.pid {
                    assert!(r.send(&puback(pid)).await);
                }
                got.insert(m.topic, m.payload);
            }
            Ev::Packet(p) => panic!("unexpected packet {}", hex(&p)),
            Ev::Closed => panic!("connection closed after {} retained messages", got.len()),
            Ev::Timeout => panic!("only {} of {RETAINED} retained messages (3 s without one)", got.len()),
        }
    }
    r.disconnect().await;
    assert_eq!(not_retained, 0, "messages without the retain flag");
    let wrong: Vec<usize> = (0..RETAINED)
        .filter(|i| {
            got.get(&format!("bulk/{}/{i}", i / 100)).map(Vec::as_slice) != Some(format!("payload-{i}").as_bytes())
        })
        .collect();
    assert!(
        wrong.is_empty(),
        "{} retained messages wrong or missing: {:?}",
        wrong.len(),
        &wrong[..wrong.len().min(20)]
    );
    println!("bulk: {RETAINED} retained received in {:?}", t4.elapsed());

    // Every session is still there; some are checked to still route.
    let t5 = Instant::now();
    let absent = Arc::new(Mutex::new(Vec::new()));
    let mut set = tokio::task::JoinSet::new();
    for i in 0..SESSIONS {
        let sem = Arc::clone(&sem);
        let absent = Arc::clone(&absent);
        set.spawn(async move {
            let _permit = sem.acquire_owned().await.expect("semaphore");
            let id = format!("sess-{i}");
            let mut w = Wire::open(addr).await;
            assert!(w.send(&Connect::v311(&id).clean(false).bytes()).await);
            let ack = w.read("CONNACK").await;
            if ack != [0x20, 0x02, 0x01, 0x00] {
                absent.lock().unwrap().push(format!("{id}: {}", hex(&ack)));
                return;
            }
            if i % 50 == 7 {
                let topic = format!("s/{i}");
                let mut p = Wire::connect(addr, &format!("bulk-pub-{i}"), true, false).await;
                assert!(p.send(&publish(&topic, b"still routed", 1, 1)).await);
                assert_eq!(hex(&p.read("PUBACK").await), hex(&puback(1)));
                p.disconnect().await;
                let m = common::parse_publish(&w.read(&format!("the message on {topic}")).await, false);
                assert_eq!((m.topic.as_str(), m.payload.as_slice()), (topic.as_str(), &b"still routed"[..]));
                assert!(w.send(&puback(m.pid.expect("packet id"))).await);
            }
            w.disconnect().await;
        });
    }
    while let Some(r) = set.join_next().await {
        r.expect("session check task");
    }
    let absent = absent.lock().unwrap();
    assert!(
        absent.is_empty(),
        "{} of {SESSIONS} sessions lost over the restart: {:?}",
        absent.len(),
        &absent[..absent.len().min(20)]
    );
    println!("bulk: {SESSIONS} sessions checked in {:?}", t5.elapsed());
}

/// A persistent client connected when the broker dies has lost its connection abnormally:
/// its will is stored with the session and published after the restart. A client that said
/// DISCONNECT before the crash has no will to publish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn will_of_a_client_connected_at_the_crash_is_published_after_restart() {
    let mut b = broker();
    b.start_async(&[]).await;
    let mut watcher = Wire::connect(b.addr(), "will-watcher", false, false).await;
    watcher.subscribe(1, "wills/#", 1).await;
    watcher.disconnect().await;

    let will =
        |id: &str| common::Connect::v311(id).clean(false).will(common::Will::new(&format!("wills/{id}"), b"gone", 1));
    let mut doomed = Wire::open(b.addr()).await;
    assert!(doomed.send(&will("doomed").bytes()).await);
    assert_eq!(hex(&doomed.read("CONNACK").await), "20 02 00 00");
    let mut polite = Wire::open(b.addr()).await;
    assert!(polite.send(&will("polite").bytes()).await);
    assert_eq!(hex(&polite.read("CONNACK").await), "20 02 00 00");
    assert!(polite.send(&[0xE0, 0x00]).await);
    // Make sure the DISCONNECT has been handled and stored before the crash: the broker closes
    // the connection once it has handled it (and records the will-less session right after,
    // in the same step); then a retained QoS 1 publish is acknowledged only once the store
    // has committed it (durability "sync"), and the store commits in submission order.
    match polite.next(WAIT).await {
        Ev::Closed => {}
        Ev::Packet(p) => panic!("packet after DISCONNECT: {}", hex(&p)),
        Ev::Timeout => panic!("connection still open {WAIT:?} after DISCONNECT"),
    }
    let mut probe = Wire::connect(b.addr(), "will-probe", true, false).await;
    assert!(probe.send(&publish_full(b"probe/t", b"committed", 1, 1, true, false, None)).await);
    let p = probe.read("PUBACK of the probe").await;
    assert_eq!(hex(&p), hex(&puback(1)), "PUBACK of the probe");
    probe.disconnect().await;
    b.kill();
    drop(doomed);

    b.start_async(&[]).await;
    let mut watcher = Wire::connect(b.addr(), "will-watcher", false, true).await;
    let m = common::parse_publish(&watcher.read("the will of the client connected at the crash").await, false);
    assert_eq!((m.topic.as_str(), m.payload.as_slice()), ("wills/doomed", &b"gone"[..]));
    assert!(watcher.send(&puback(m.pid.expect("packet id"))).await);
    if let Ev::Packet(p) = watcher.next(Duration::from_millis(700)).await {
        panic!("no other will expected, got {}", hex(&p));
    }
    watcher.disconnect().await;
}

/// A will recovered after a crash is published with its owner's rights under the ACL the
/// broker restarts with, as it would have been had the connection dropped without a restart:
/// of two wills accepted before the crash, the one the new ACL no longer allows stays unpublished.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovered_wills_keep_their_owners_rights() {
    let mut b = broker();
    let acl = b.dir.path().join("acl");
    let config = b.config_path();
    let text = std::fs::read_to_string(&config).expect("read config");
    std::fs::write(&config, format!("[auth]\nacl_file = \"{}\"\n{text}", acl.display())).expect("write config");
    std::fs::write(&acl, "user alice\ntopic readwrite wills/#\n\nuser watcher\ntopic read wills/#\n").expect("acl");
    b.start_async(&[]).await;
    let login = |id: &str| Connect::v311(id).clean(false);
    let mut watcher = Wire::open(b.addr()).await;
    assert!(watcher.send(&login("w").user("watcher").bytes()).await);
    assert_eq!(hex(&watcher.read("CONNACK").await), "20 02 00 00");
    watcher.subscribe(1, "wills/#", 1).await;
    watcher.disconnect().await;
    let mut doomed = Vec::new();
    for (id, topic) in [("a", "wills/ok/a"), ("b", "wills/no/b")] {
        let mut w = Wire::open(b.addr()).await;
        assert!(w.send(&login(id).user("alice").will(common::Will::new(topic, b"gone", 1)).bytes()).await);
        assert_eq!(hex(&w.read("CONNACK").await), "20 02 00 00", "will on {topic} accepted");
        doomed.push(w);
    }
    // Both sessions (and their wills) are committed before the crash: a QoS 1 publish is
    // acknowledged only after the store committed everything submitted before it.
    let mut probe = Wire::open(b.addr()).await;
    assert!(probe.send(&login("probe").user("alice").bytes()).await);
    assert_eq!(hex(&probe.read("CONNACK").await), "20 02 00 00");
    assert!(probe.send(&publish_full(b"wills/probe", b"x", 1, 1, false, false, None)).await);
    assert_eq!(hex(&probe.read("PUBACK of the probe").await), hex(&puback(1)));
    b.kill();
    drop(doomed);

    std::fs::write(&acl, "user alice\ntopic readwrite wills/ok/#\n\nuser watcher\ntopic read wills/#\n").expect("acl");
    b.start_async(&[]).await;
    let mut watcher = Wire::open(b.addr()).await;
    assert!(watcher.send(&login("w").user("watcher").bytes()).await);
    assert_eq!(hex(&watcher.read("CONNACK").await), "20 02 01 00");
    let mut got = Vec::new();
    while let Ev::Packet(p) = watcher.next(Duration::from_millis(1500)).await {
        let m = common::parse_publish(&p, false);
        assert!(watcher.send(&puback(m.pid.expect("packet id"))).await);
        got.push(m.topic);
    }
    assert_eq!(got, vec!["wills/probe".to_string(), "wills/ok/a".to_string()], "wills after the restart");
    watcher.disconnect().await;
}

/// The store holds other people's messages: its directory is the owner's only (0700) and
/// every file the broker writes in it is 0600, whatever the umask tern was started with.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_files_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let mut b = broker();
    b.start_async(&[]).await;
    let mut w = Wire::connect(b.addr(), "private", true, false).await;
    assert!(w.send(&publish_full(b"secret/t", b"not for others", 1, 1, true, false, None)).await);
    let p = w.read("PUBACK").await;
    assert_eq!(p[0], 0x40, "expected PUBACK, got {}", hex(&p));
    b.terminate_async().await;

    let data = b.dir.path().join("data");
    let mode = |p: &std::path::Path| std::fs::metadata(p).expect("metadata").permissions().mode() & 0o777;
    assert_eq!(mode(&data), 0o700, "store directory");
    let mut seen = 0;
    let mut stack = vec![data];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("read_dir") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                assert_eq!(mode(&path) & 0o077, 0, "{} is open to others", path.display());
                stack.push(path);
            } else {
                assert_eq!(mode(&path) & 0o077, 0, "{} is open to others", path.display());
                seen += 1;
            }
        }
    }
    assert!(seen > 0, "the store wrote no files");
}
