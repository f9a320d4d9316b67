//! A slow disk slows publishers down, it does not grow memory: while the store's commit
//! thread is stuck (a backend whose writes wait behind a gate), a flooding client is no
//! longer read once its held acknowledgements reach `limits.max_held_acks`, or once the work
//! waiting for the store reaches `storage.max_pending_bytes`; TCP then holds the client back.
//! What the broker already took is still delivered meanwhile, a client left unread is not cut
//! off for its silence, and once the disk answers again every message is acknowledged and
//! delivered, in order.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use common::*;
use tern::store::{Backend, MemoryBackend, Op, Recovered, StoreError};
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};

/// Messages each flood sends: far more than the bounds, and (with `PAYLOAD`) more bytes than
/// loopback socket buffers hold, so a writer that is not read must block.
const N: usize = 100_000;
/// Payload bytes per message: the message's index, padded.
const PAYLOAD: usize = 200;
/// Most input a connection puts aside while flow control holds it: up to 64 KiB
/// (`STASH_MAX` in `connection/flow.rs`), plus the read (up to 64 KiB) that crossed it.
const FLOW_STASH: u64 = 2 * 64 * 1024;
/// Longest wait for the flood to be acknowledged and delivered once the disk answers.
const DRAIN: Duration = Duration::from_secs(180);

/// A memory store whose writes wait while the gate is closed, as a disk that stopped answering.
#[derive(Clone, Default)]
struct Gated {
    inner: Arc<Mutex<MemoryBackend>>,
    closed: Arc<(Mutex<bool>, Condvar)>,
}

impl Gated {
    fn close(&self) {
        *self.closed.0.lock().unwrap() = true;
    }
    fn open(&self) {
        *self.closed.0.lock().unwrap_or_else(|e| e.into_inner()) = false;
        self.closed.1.notify_all();
    }
}

impl Backend for Gated {
    fn apply(&mut self, ops: &[Op]) -> Result<(), StoreError> {
        let mut closed = self.closed.0.lock().unwrap();
        while *closed {
            closed = self.closed.1.wait(closed).unwrap();
        }
        drop(closed);
        self.inner.lock().unwrap().apply(ops)
    }
    fn sync(&mut self) -> Result<(), StoreError> {
        Ok(())
    }
    fn load(&mut self) -> Result<Recovered, StoreError> {
        self.inner.lock().unwrap().load()
    }
}

/// Opens the gate when dropped: a failing test must not leave the store's close (run when
/// the runtime drops the broker) waiting for it for ever.
struct OpenAtEnd(Gated);

impl Drop for OpenAtEnd {
    fn drop(&mut self) {
        self.0.open();
    }
}

async fn start_gated(f: impl FnOnce(&mut tern::Config)) -> (tern::BrokerHandle, Gated) {
    let backend = Gated::default();
    let mut c = tern::Config::default();
    c.listener[0].bind = "127.0.0.1:0".into();
    f(&mut c);
    let handle = tern::server::start_with_backend(Arc::new(c), Box::new(backend.clone())).await.unwrap();
    (handle, backend)
}

fn payload(i: usize) -> Vec<u8> {
    let mut p = format!("{i:08}").into_bytes();
    p.resize(PAYLOAD, b'.');
    p
}

fn index_of(payload: &[u8]) -> usize {
    std::str::from_utf8(&payload[..8]).unwrap().parse().unwrap()
}

/// Whole packets from a read half, however the bytes arrive.
struct Packets {
    rd: ReadHalf<Box<dyn Stream>>,
    buf: Vec<u8>,
}

impl Packets {
    /// The next packet; None when the connection closes. Panics after `WAIT` of silence.
    async fn next(&mut self) -> Option<Vec<u8>> {
        loop {
            if self.buf.len() >= 2 {
                if let Some((len, used)) = read_varint(&self.buf[1..]) {
                    let total = 1 + used + len;
                    if self.buf.len() >= total {
                        return Some(self.buf.drain(..total).collect());
                    }
                }
            }
            let mut chunk = [0u8; 16 * 1024];
            let n = tokio::time::timeout(DRAIN, self.rd.read(&mut chunk)).await.expect("broker went silent");
            match n {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }
}

/// A client connected with `c`, split so that it can write and read at once.
async fn client(addr: std::net::SocketAddr, c: &Connect) -> (Packets, WriteHalf<Box<dyn Stream>>) {
    let mut raw = Raw::open(addr).await;
    let ack = raw.handshake(c).await;
    assert_eq!(ack.code, 0, "CONNACK");
    let (rd, wr) = tokio::io::split(raw.into_stream());
    (Packets { rd, buf: Vec::new() }, wr)
}

/// A subscriber that acknowledges what it gets (QoS 1) and checks it arrives in order.
/// `got` counts the messages received.
fn subscriber(
    mut rd: Packets,
    mut wr: WriteHalf<Box<dyn Stream>>,
    got: Arc<AtomicUsize>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while got.load(Ordering::SeqCst) < N {
            let Some(p) = rd.next().await else { panic!("subscriber disconnected") };
            let m = parse_publish(&p, false);
            let i = index_of(&m.payload);
            assert_eq!(i, got.load(Ordering::SeqCst), "message {i} out of order");
            got.fetch_add(1, Ordering::SeqCst);
            if let (1, Some(pid)) = (m.qos, m.pid) {
                wr.write_all(&puback(pid)).await.unwrap();
            }
        }
    })
}

/// Writes `N` publishes made by `make`, a batch at a time; `sent` counts those written.
fn flood(
    mut wr: WriteHalf<Box<dyn Stream>>,
    sent: Arc<AtomicUsize>,
    make: impl Fn(usize) -> Vec<u8> + Send + 'static,
) -> tokio::task::JoinHandle<WriteHalf<Box<dyn Stream>>> {
    tokio::spawn(async move {
        let mut batch = Vec::new();
        for i in 0..N {
            batch.extend(make(i));
            if batch.len() >= 16 * 1024 || i + 1 == N {
                wr.write_all(&batch).await.unwrap();
                batch.clear();
                sent.store(i + 1, Ordering::SeqCst);
            }
        }
        wr
    })
}

/// Checks `cond` every 20 ms for `dur`, failing with its error the first time it does not
/// hold: for what must stay true over a while (a bound, a client left unread), not for what
/// should happen.
async fn holds_for(dur: Duration, mut cond: impl FnMut() -> Result<(), String>) {
    let t0 = Instant::now();
    while t0.elapsed() < dur {
        if let Err(e) = cond() {
            panic!("after {:?}: {e}", t0.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Err when `task` ended although `done` says its work is not finished (its connection was
/// closed; awaiting it shows why).
fn running<T>(task: &tokio::task::JoinHandle<T>, done: bool, what: &str) -> Result<(), String> {
    if task.is_finished() && !done {
        return Err(format!("{what} ended early (its connection closed?)"));
    }
    Ok(())
}

/// A 3.1.1 client pipelining QoS 1 publishes without waiting for PUBACKs, to a persistent
/// subscriber (so each publish writes to the store and its PUBACK waits for the disk).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_311_qos1_flood_is_held_at_max_held_acks_while_the_disk_stalls() {
    let (broker, gate) = start_gated(|_| {}).await;
    let _open_at_end = OpenAtEnd(gate.clone());
    let max_held = tern::Config::default().limits.max_held_acks as u64;
    let addr = broker.local_addr();

    let mut sub = Raw::open(addr).await;
    sub.handshake(&Connect::v311("sub").clean(false)).await;
    sub.subscribe(1, "flood", 1).await;
    let (rd, wr) = tokio::io::split(sub.into_stream());
    let got = Arc::new(AtomicUsize::new(0));
    let sub_task = subscriber(Packets { rd, buf: Vec::new() }, wr, Arc::clone(&got));

    gate.close();
    // Keep-alive 1 s: left unread for longer than that, the publisher must not be cut off.
    let (mut acks_rd, pub_wr) = client(addr, &Connect::v311("pub").keep_alive(1)).await;
    let acked = Arc::new(AtomicUsize::new(0));
    let acks = {
        let acked = Arc::clone(&acked);
        tokio::spawn(async move {
            for i in 0..N {
                let Some(p) = acks_rd.next().await else { panic!("publisher disconnected after {i} PUBACKs") };
                let pid = (i % 65_535) as u16 + 1;
                assert_eq!(hex(&p), hex(&puback(pid)), "PUBACK {i} out of order");
                acked.store(i + 1, Ordering::SeqCst);
            }
        })
    };
    let sent = Arc::new(AtomicUsize::new(0));
    let writer = flood(pub_wr, Arc::clone(&sent), |i| publish("flood", &payload(i), 1, (i % 65_535) as u16 + 1));

    poll_until(Duration::from_secs(30), "held acknowledgements to reach the bound", || broker.acks_held() >= max_held)
        .await;
    // 2.5 s: past the publisher's keep-alive allowance (1.5 s) while it is left unread.
    let mut most_held = 0;
    holds_for(Duration::from_millis(2_500), || {
        let held = broker.acks_held();
        most_held = most_held.max(held);
        if held > max_held {
            return Err(format!("{held} acks held, bound {max_held}"));
        }
        if sent.load(Ordering::SeqCst) == N || acked.load(Ordering::SeqCst) > 0 {
            return Err("the publisher was read on although the disk is stalled".into());
        }
        running(&acks, false, "the publisher's PUBACK reader")
    })
    .await;
    let sent_while_stalled = sent.load(Ordering::SeqCst);
    poll_until(Duration::from_secs(10), "messages taken before the stall to be delivered", || {
        got.load(Ordering::SeqCst) as u64 >= max_held
    })
    .await;
    eprintln!(
        "disk stalled: {most_held} acks held (bound {max_held}), {sent_while_stalled} of {N} publishes written by \
         the client, {} delivered, {} store bytes pending",
        got.load(Ordering::SeqCst),
        broker.store_pending_bytes()
    );

    gate.open();
    let t0 = Instant::now();
    poll_until(DRAIN, "every publish acknowledged and delivered", || {
        most_held = most_held.max(broker.acks_held());
        let (acked, got) = (acked.load(Ordering::SeqCst), got.load(Ordering::SeqCst));
        running(&acks, acked == N, "the publisher's PUBACK reader").unwrap();
        running(&sub_task, got == N, "the subscriber").unwrap();
        acked == N && got == N
    })
    .await;
    eprintln!(
        "after the disk came back: all {N} acknowledged and delivered in {:?}; at most {most_held} acks held",
        t0.elapsed()
    );
    // Once the disk is back the subscriber is slower than the publisher, and flow control
    // takes turns with the bound: what it put aside is handled when it ends.
    let packet = publish("flood", &payload(0), 1, 1).len() as u64;
    let slack = FLOW_STASH / packet + 1;
    assert!(most_held <= max_held + slack, "{most_held} acks held, bound {max_held} (+{slack})");
    acks.await.unwrap();
    sub_task.await.unwrap();
    drop(writer.await.unwrap());
    poll_until(WAIT, "no acknowledgement held", || broker.acks_held() == 0).await;
    broker.shutdown().await.unwrap();
}

/// QoS 0 retained publishes never wait for the store, but each one writes to it: the work
/// waiting for a stalled disk stops at `storage.max_pending_bytes`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retained_qos0_flood_stops_at_max_pending_bytes_while_the_disk_stalls() {
    const BOUND: usize = 256 * 1024;
    let (broker, gate) = start_gated(|c| c.storage.max_pending_bytes = BOUND).await;
    let _open_at_end = OpenAtEnd(gate.clone());
    let addr = broker.local_addr();

    let mut sub = Raw::open(addr).await;
    sub.handshake(&Connect::v311("sub")).await;
    sub.subscribe(1, "r/#", 0).await;
    let (rd, wr) = tokio::io::split(sub.into_stream());
    let got = Arc::new(AtomicUsize::new(0));
    let sub_task = subscriber(Packets { rd, buf: Vec::new() }, wr, Arc::clone(&got));

    gate.close();
    let (_pub_rd, pub_wr) = client(addr, &Connect::v311("pub")).await;
    let sent = Arc::new(AtomicUsize::new(0));
    let retained = |i: usize| publish_full(b"r/x", &payload(i), 0, 0, true, false, None);
    let writer = flood(pub_wr, Arc::clone(&sent), retained);

    poll_until(Duration::from_secs(30), "the store backlog to reach its bound", || {
        broker.store_pending_bytes() >= BOUND
    })
    .await;
    // The backlog is checked before each packet: one publish's write may pass it.
    let op = 1024;
    let mut most = 0;
    holds_for(Duration::from_millis(1_000), || {
        let pending = broker.store_pending_bytes();
        most = most.max(pending);
        if pending > BOUND + op {
            return Err(format!("{pending} store bytes pending, bound {BOUND}"));
        }
        if sent.load(Ordering::SeqCst) == N {
            return Err("the publisher was read on although the disk is stalled".into());
        }
        running(&sub_task, false, "the subscriber")
    })
    .await;
    poll_until(Duration::from_secs(10), "messages taken before the stall to be delivered", || {
        got.load(Ordering::SeqCst) > 0
    })
    .await;
    eprintln!(
        "disk stalled: {most} store bytes pending (bound {BOUND}), {} of {N} publishes written by the client, {} \
         delivered",
        sent.load(Ordering::SeqCst),
        got.load(Ordering::SeqCst)
    );

    gate.open();
    let t0 = Instant::now();
    poll_until(DRAIN, "every publish delivered", || {
        most = most.max(broker.store_pending_bytes());
        let got = got.load(Ordering::SeqCst);
        running(&sub_task, got == N, "the subscriber").unwrap();
        got == N
    })
    .await;
    eprintln!("after the disk came back: all {N} delivered in {:?}; at most {most} store bytes pending", t0.elapsed());
    // As in the QoS 1 test, what flow control put aside is handled when it ends.
    let packet = retained(0).len();
    let slack = (FLOW_STASH as usize / packet + 1) * op;
    assert!(most <= BOUND + slack, "{most} store bytes pending, bound {BOUND} (+{slack})");
    sub_task.await.unwrap();
    drop(writer.await.unwrap());
    poll_until(WAIT, "the store to catch up", || broker.store_pending_bytes() == 0).await;
    assert_eq!(broker.retained_count(), 1);
    broker.shutdown().await.unwrap();
}
