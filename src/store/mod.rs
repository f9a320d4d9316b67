//! Durable state: sessions, subscriptions, queued and in-flight outbound messages, inbound
//! QoS 2 packet ids and retained messages, written through one group-commit thread.
//!
//! Owns the persisted shape of that state and when it reaches the disk. Synchronous and free
//! of sockets and async: callers `submit` operations and get a sequence number; the commit
//! thread gathers everything submitted meanwhile into one atomic batch, syncs once
//! (`storage.durability = "sync"`), then reports the highest sequence number processed
//! through a callback. Callers hold acknowledgements until their number is reported.
//!
//! Backends: `fjall` (the real one) and `MemoryBackend` (tests of the machinery).
//! Loading counts the records and bytes it reads (`LoadProgress`) and logs them every two
//! seconds while it runs, so a long recovery is visibly moving.
//!
//! ## When the disk is slow
//! Submitting never blocks (callers run on async workers), so work waiting for the commit
//! thread is counted instead (`pending_bytes`, approximate): while it is over
//! `storage.max_pending_bytes`, connections stop reading their sockets (`backlog_over` gives
//! the number to wait for) and TCP slows the publishers down. Memory held for the store is
//! then about that bound plus the batch being written.
//!
//! ## When writes fail
//! - A failed batch is reported failed to everyone holding one of its numbers (`outcome`),
//!   however many batches fail (`failures` proves it never forgets). Its acknowledgements go
//!   out as failures (v5 PUBACK/PUBREC/SUBACK 0x80; a 3.1.1 publisher is disconnected).
//! - *Transient* failures (an error the engine survives): the commit thread goes on with the
//!   next batch, so tern resumes by itself once writes succeed again.
//! - *Fatal* failures (`StoreError::is_fatal`): the engine refuses every further write (fjall
//!   poisons itself when a journal write or fsync fails, disk full included, since it cannot
//!   know what reached the disk), or the commit thread panicked. From then on every number
//!   not committed, and every later submission, is reported failed; submissions are dropped
//!   rather than piled up; `fatal()` returns the error and the `on_fatal` hooks run (the
//!   server logs the store directory and the cause, and the binary exits with status 74 so a
//!   supervisor restarts it). QoS 0 traffic, which never waits for the store, is served
//!   until the exit.
//! - In-flight work at a fatal exit: acknowledgements held for uncommitted work are sent as
//!   failures while the broker still runs, or never (the connection closes at exit); either
//!   way the client still owns the message and resends it after reconnecting (QoS 1/2
//!   resend unacknowledged PUBLISHes, SUBSCRIBE is repeated). Recovery at the next start
//!   replays exactly what was committed, so nothing acknowledged as stored is lost.

mod failures;
mod fjall_backend;
pub mod latency;
mod memory;
mod progress;
pub mod records;

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use bytestring::ByteString;
use tracing::{error, info};

use failures::Failures;

pub use fjall_backend::FjallBackend;
pub use latency::{CommitLatency, LatencySnapshot};
pub use memory::MemoryBackend;
pub use progress::LoadProgress;
pub use records::{InflightState, QueuedRecord, SessionRecord, StoredWill, WillOwner};

use crate::config::Durability;
use crate::message::Message;
use crate::protocol::SubscriptionOptions;

/// Why the store could not do something. Engine errors keep fjall's error as their source.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The store directory is held by another tern process.
    #[error("store directory {0} is in use by another process (only one broker may use a data directory)")]
    Locked(String),
    /// The directory holds data of another store version or not ours.
    #[error("store directory {dir} is not usable: {why}; move it away or point storage.dir elsewhere")]
    Incompatible { dir: String, why: String },
    /// A stored record could not be decoded.
    #[error("corrupt record in store: {0}")]
    Corrupt(String),
    /// The storage engine failed (I/O error, disk full...) and still accepts writes: the
    /// writes of this batch are lost, later ones may succeed.
    #[error("storage engine error: {0}")]
    Engine(#[source] fjall::Error),
    /// An I/O error outside the engine (the commit thread could not start; test backends
    /// report their failures with it). Not fatal by itself.
    #[error("store I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// The engine refuses every further write: a journal write or sync failed and fjall,
    /// which cannot know what reached the disk, poisoned itself. `source` is the failure
    /// that did it when known. Fatal.
    #[error("store directory {dir} refuses every further write after a failed write or sync: {source}")]
    Poisoned {
        dir: String,
        #[source]
        source: fjall::Error,
    },
    /// The commit thread panicked: nothing submitted from then on can be committed. Fatal.
    #[error("the store's commit thread died: {0}")]
    CommitThread(String),
}

impl StoreError {
    /// True when the store cannot make progress any more: acknowledgements stop for good and
    /// the broker must exit (a supervisor restarts it, and recovery replays what was
    /// committed).
    pub fn is_fatal(&self) -> bool {
        matches!(
            self,
            StoreError::Poisoned { .. } | StoreError::CommitThread(_) | StoreError::Engine(fjall::Error::Poisoned)
        )
    }
}

/// One change to the durable state.
#[derive(Debug, Clone)]
pub enum Op {
    PutSession {
        client: ByteString,
        record: SessionRecord,
    },
    /// Removes the session and everything under its prefix.
    DeleteSession {
        client: ByteString,
    },
    PutSubscription {
        client: ByteString,
        filter: ByteString,
        options: SubscriptionOptions,
        id: Option<u32>,
    },
    DeleteSubscription {
        client: ByteString,
        filter: ByteString,
    },
    /// An outbound message for the session, value from `records::encode_queued`.
    PutQueued {
        client: ByteString,
        seq: u64,
        value: Bytes,
    },
    SetInflight {
        client: ByteString,
        seq: u64,
        state: InflightState,
    },
    /// Removes the queued message and its in-flight state.
    DeleteQueued {
        client: ByteString,
        seq: u64,
    },
    PutInbound {
        client: ByteString,
        packet_id: u16,
    },
    DeleteInbound {
        client: ByteString,
        packet_id: u16,
    },
    /// Value from `records::encode_message`.
    PutRetained {
        topic: ByteString,
        value: Bytes,
    },
    DeleteRetained {
        topic: ByteString,
    },
}

/// What every operation costs while it waits for the commit thread besides its keys and
/// values: its slot in the pending list, the headers of its strings and buffers.
const OP_OVERHEAD: usize = std::mem::size_of::<Op>() + 32;

impl Op {
    /// Approximate memory the operation holds while pending: keys and values, plus a fixed
    /// overhead. Counts what grows with the client's input (payloads, topics, client ids),
    /// which is what a bound on pending work must see; exact allocator sizes do not matter.
    pub fn approx_size(&self) -> usize {
        let heap = match self {
            Op::PutSession { client, record } => client.len() + record.will.as_ref().map_or(0, |w| w.message.len()),
            Op::DeleteSession { client } => client.len(),
            Op::PutSubscription { client, filter, .. } | Op::DeleteSubscription { client, filter } => {
                client.len() + filter.len()
            }
            Op::PutQueued { client, value, .. } => client.len() + value.len(),
            Op::SetInflight { client, .. }
            | Op::DeleteQueued { client, .. }
            | Op::PutInbound { client, .. }
            | Op::DeleteInbound { client, .. } => client.len(),
            Op::PutRetained { topic, value } => topic.len() + value.len(),
            Op::DeleteRetained { topic } => topic.len(),
        };
        OP_OVERHEAD + heap
    }
}

/// Everything loaded at start-up.
#[derive(Debug, Default)]
pub struct Recovered {
    pub sessions: Vec<(ByteString, SessionRecord)>,
    pub subscriptions: Vec<(ByteString, ByteString, SubscriptionOptions, Option<u32>)>,
    /// In (client, seq) order. With a backend that has a `QueueReader`, only the messages
    /// in flight: the others are in `backlogs`.
    pub queued: Vec<(ByteString, u64, QueuedRecord, Option<InflightState>)>,
    /// Per client, the queued messages left in the store (not in flight), to be read with
    /// the `QueueReader` when the client returns.
    pub backlogs: Vec<(ByteString, QueueSummary)>,
    pub inbound: Vec<(ByteString, u16)>,
    pub retained: Vec<RecoveredRetained>,
}

/// A retained message found at start-up: whole, or (when the backend can serve it later)
/// only its topic and expiry, so a large retained set does not have to sit in memory.
#[derive(Debug)]
pub enum RecoveredRetained {
    Loaded(Arc<Message>),
    Indexed { topic: ByteString, expires_at_ms: Option<u64> },
}

/// Messages of one session's durable queue that stay in the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueSummary {
    pub count: usize,
    /// Bytes their messages hold once in memory (`Message::held_bytes`).
    pub bytes: usize,
    pub first: u64,
    pub last: u64,
}

/// One entry of a session's durable queue as read back: key, record, in-flight state.
pub type QueuedEntry = (u64, QueuedRecord, Option<InflightState>);

/// Reads sessions' durable queues on demand, from any thread.
pub trait QueueReader: Send + Sync {
    /// `client`'s queue entries with keys from `from` to `to`, in key order, until `max`
    /// entries or `max_bytes` bytes of records are read (at least one entry). Also returns
    /// the key read through: `to` when the range was read to its end, else the last key
    /// returned.
    fn read(
        &self,
        client: &str,
        from: u64,
        to: u64,
        max: usize,
        max_bytes: usize,
    ) -> Result<(Vec<QueuedEntry>, u64), StoreError>;
}

/// Reads retained messages on demand, from any thread.
pub trait RetainedReader: Send + Sync {
    fn get(&self, topic: &str) -> Result<Option<Arc<Message>>, StoreError>;
}

/// A place the state can be written to. Implementations are driven by one thread at a time.
pub trait Backend: Send + 'static {
    /// Applies the operations atomically where the engine allows.
    fn apply(&mut self, ops: &[Op]) -> Result<(), StoreError>;
    /// Makes everything applied so far durable.
    fn sync(&mut self) -> Result<(), StoreError>;
    fn load(&mut self) -> Result<Recovered, StoreError>;
    /// A reader for retained messages recovered as `Indexed`; None when `load` returns them
    /// all `Loaded`.
    fn retained_reader(&self) -> Option<Arc<dyn RetainedReader>> {
        None
    }
    /// A reader for the queued messages recovered into `Recovered::backlogs`, and for
    /// backlogs made later (offline sessions); None when `load` returns every queued
    /// message (sessions then keep their queues in memory).
    fn queue_reader(&self) -> Option<Arc<dyn QueueReader>> {
        None
    }
}

struct Pending {
    ops: Vec<Op>,
    last_seq: u64,
    /// The store is fatal: submissions are numbered (and reported failed) but not kept, so
    /// pending work cannot grow behind a store that will never write it.
    fatal: bool,
}

/// Called once with the error when the store becomes fatal.
pub type FatalHook = Box<dyn FnOnce(Arc<StoreError>) + Send>;

struct Shared {
    pending: Mutex<Pending>,
    /// `approx_size` of `pending.ops`, written under the `pending` lock and read without it
    /// (every connection looks at it before reading its socket).
    pending_bytes: AtomicUsize,
    wake: Condvar,
    processed: AtomicU64,
    /// What must never be reported durable; see `failures` for why it never forgets.
    failures: Mutex<Failures>,
    /// Set once, when the store cannot make progress any more.
    fatal: OnceLock<Arc<StoreError>>,
    fatal_hooks: Mutex<Vec<FatalHook>>,
    stop: AtomicBool,
    notify: Box<dyn Fn(u64) + Send + Sync>,
    /// How long each batch took to write and sync.
    latency: CommitLatency,
}

impl Shared {
    /// Makes the store fatal: everything not processed yet, and everything submitted from
    /// now on, is reported failed; pending work is dropped; waiters are woken (they will
    /// find their tickets failed) and the fatal hooks are called. Idempotent.
    fn declare_fatal(&self, err: StoreError) {
        let since = self.processed.load(Ordering::Acquire) + 1;
        lock(&self.failures).set_fatal(since);
        {
            let mut p = lock(&self.pending);
            p.fatal = true;
            p.ops = Vec::new();
            self.pending_bytes.store(0, Ordering::Release);
        }
        let err = Arc::new(err);
        if self.fatal.set(Arc::clone(&err)).is_ok() {
            error!(
                error = %err,
                since_seq = since,
                "store failed for good: nothing more is acknowledged as stored (QoS 0 is still served)"
            );
            let hooks = std::mem::take(&mut *lock(&self.fatal_hooks));
            for h in hooks {
                h(Arc::clone(&err));
            }
        }
        (self.notify)(u64::MAX);
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Handle to the commit thread. Dropping it flushes, syncs and stops the thread.
pub struct Store {
    shared: Arc<Shared>,
    /// Taken at `close`: the reader keeps the engine open (and its directory locked), and a
    /// closed store must let a new one open the directory.
    reader: RwLock<Option<Arc<dyn RetainedReader>>>,
    queue_reader: RwLock<Option<Arc<dyn QueueReader>>>,
    thread: Mutex<Option<JoinHandle<Result<(), StoreError>>>>,
    durability: Durability,
}

impl Store {
    /// Loads the backend's state and starts the commit thread. `notify` is called from that
    /// thread with the highest sequence number processed (committed or failed), and with
    /// `u64::MAX` when the store becomes fatal. Blocking: call it off the async workers.
    pub fn open(
        mut backend: Box<dyn Backend>,
        durability: Durability,
        sync_interval: Duration,
        notify: Box<dyn Fn(u64) + Send + Sync>,
    ) -> Result<(Store, Recovered), StoreError> {
        let recovered = backend.load()?;
        let reader = backend.retained_reader();
        let queue_reader = backend.queue_reader();
        let shared = Arc::new(Shared {
            pending: Mutex::new(Pending { ops: Vec::new(), last_seq: 0, fatal: false }),
            pending_bytes: AtomicUsize::new(0),
            wake: Condvar::new(),
            processed: AtomicU64::new(0),
            failures: Mutex::new(Failures::default()),
            fatal: OnceLock::new(),
            fatal_hooks: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
            notify,
            latency: CommitLatency::default(),
        });
        let s2 = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("tern-store".into())
            .spawn(move || {
                // A panic anywhere in the loop (a backend bug, an engine assertion) must not
                // leave acknowledgements waiting forever: it makes the store fatal.
                let run =
                    std::panic::catch_unwind(AssertUnwindSafe(|| commit_loop(backend, &s2, durability, sync_interval)));
                match run {
                    Ok(r) => r,
                    Err(panic) => {
                        let what = panic
                            .downcast_ref::<&str>()
                            .map(|s| (*s).to_owned())
                            .or_else(|| panic.downcast_ref::<String>().cloned())
                            .unwrap_or_else(|| "panic".into());
                        s2.declare_fatal(StoreError::CommitThread(what));
                        Ok(())
                    }
                }
            })
            .map_err(StoreError::Io)?;
        Ok((
            Store {
                shared,
                reader: RwLock::new(reader),
                queue_reader: RwLock::new(queue_reader),
                thread: Mutex::new(Some(thread)),
                durability,
            },
            recovered,
        ))
    }

    /// A reader for retained messages recovered as `Indexed`, to use off the caller's thread.
    pub fn retained_reader(&self) -> Option<Arc<dyn RetainedReader>> {
        self.reader.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// A reader for sessions' durable queues, to use off the caller's thread; None when
    /// sessions keep their queues in memory.
    pub fn queue_reader(&self) -> Option<Arc<dyn QueueReader>> {
        self.queue_reader.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The sequence number of the latest submission.
    pub fn last_submitted(&self) -> u64 {
        lock(&self.shared.pending).last_seq
    }

    /// True when acknowledgements must wait for `outcome` (durability "sync").
    pub fn acks_wait(&self) -> bool {
        self.durability == Durability::Sync
    }

    /// Queues operations for the next commit; returns their sequence number. Once the store
    /// is fatal the operations are dropped and the number is reported failed.
    pub fn submit(&self, ops: impl IntoIterator<Item = Op>) -> u64 {
        let mut p = lock(&self.shared.pending);
        let before = p.ops.len();
        p.ops.extend(ops);
        if p.ops.len() == before {
            return 0; // nothing to wait for
        }
        p.last_seq += 1;
        let seq = p.last_seq;
        if p.fatal {
            p.ops.clear();
            return seq;
        }
        let added: usize = p.ops.iter().skip(before).map(Op::approx_size).sum();
        let total = self.shared.pending_bytes.load(Ordering::Relaxed).saturating_add(added);
        self.shared.pending_bytes.store(total, Ordering::Release);
        drop(p);
        self.shared.wake.notify_one();
        seq
    }

    /// Approximate bytes of the operations submitted and not yet taken by the commit thread
    /// (`Op::approx_size`). Grows while the disk is slower than the work coming in.
    pub fn pending_bytes(&self) -> usize {
        self.shared.pending_bytes.load(Ordering::Acquire)
    }

    /// While more than `max` bytes of operations wait for the commit thread: the sequence
    /// number of the last one submitted, once processed the commit thread has taken (and
    /// written) all of them. None while the backlog is within `max`. Callers stop taking new
    /// work (connections stop reading their sockets) and wait for that number.
    pub fn backlog_over(&self, max: usize) -> Option<u64> {
        if self.pending_bytes() <= max {
            return None; // the common case, without the lock
        }
        let p = lock(&self.shared.pending);
        // Under the lock: bytes are only counted for operations still in `ops`, so a
        // backlog over `max` always has a last number not processed yet.
        (self.shared.pending_bytes.load(Ordering::Acquire) > max).then_some(p.last_seq)
    }

    /// Highest sequence number processed so far.
    pub fn processed(&self) -> u64 {
        self.shared.processed.load(Ordering::Acquire)
    }

    /// None while `seq` is not processed yet; Some(true) once durable, Some(false) if its
    /// batch failed or the store became fatal before committing it. A failed write is never
    /// reported durable, however many fail (see `failures`).
    pub fn outcome(&self, seq: u64) -> Option<bool> {
        // `processed` first: a failure is recorded before `processed` passes its batch.
        let processed = self.processed();
        if lock(&self.shared.failures).failed(seq) {
            return Some(false);
        }
        (seq <= processed).then_some(true)
    }

    /// How long the group commits take (write and sync of one batch).
    pub fn commit_latency(&self) -> &CommitLatency {
        &self.shared.latency
    }

    /// The error that made the store fatal, if it is.
    pub fn fatal(&self) -> Option<Arc<StoreError>> {
        self.shared.fatal.get().cloned()
    }

    /// Calls `hook` once when the store becomes fatal (at once if it already is), from the
    /// thread that found out (the commit thread): it must not block.
    pub fn on_fatal(&self, hook: FatalHook) {
        let mut hooks = lock(&self.shared.fatal_hooks);
        // Checked under the hooks lock: `declare_fatal` sets `fatal` before taking the hooks.
        match self.shared.fatal.get() {
            Some(e) => {
                let e = Arc::clone(e);
                drop(hooks);
                hook(e);
            }
            None => hooks.push(hook),
        }
    }

    /// Flushes what is pending, syncs, and stops the commit thread. Err when the final sync
    /// failed or the store was fatal: then not everything submitted is on disk. Blocking.
    pub fn close(&self) -> Result<(), Arc<StoreError>> {
        self.shared.stop.store(true, Ordering::Release);
        self.shared.wake.notify_one();
        let ended = match lock(&self.thread).take() {
            Some(t) => t.join().unwrap_or(Ok(())),
            None => Ok(()),
        };
        self.reader.write().unwrap_or_else(|e| e.into_inner()).take();
        self.queue_reader.write().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(e) = self.fatal() {
            return Err(e);
        }
        ended.map_err(Arc::new)
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        let _ = self.close();
    }
}

/// Writes batches until stopped (Ok after a successful final sync) or until the store is
/// fatal (Ok: the error is in `shared.fatal`).
fn commit_loop(
    mut backend: Box<dyn Backend>,
    shared: &Shared,
    durability: Durability,
    interval: Duration,
) -> Result<(), StoreError> {
    let mut failing = false;
    let mut dirty = false;
    let mut low = 1u64;
    loop {
        let (ops, high) = {
            let mut p = lock(&shared.pending);
            loop {
                if !p.ops.is_empty() {
                    break;
                }
                if shared.stop.load(Ordering::Acquire) {
                    drop(p);
                    if dirty || durability != Durability::Sync {
                        // A failed final sync means something acknowledged (periodic, none) or
                        // written may not be on disk: the caller must hear of it.
                        backend.sync()?;
                    }
                    return Ok(());
                }
                if durability == Durability::Periodic && dirty {
                    let (guard, timeout) = shared.wake.wait_timeout(p, interval).unwrap_or_else(|e| e.into_inner());
                    p = guard;
                    if timeout.timed_out() && p.ops.is_empty() {
                        drop(p);
                        if let Err(e) = backend.sync() {
                            if e.is_fatal() {
                                shared.declare_fatal(e);
                                return Ok(());
                            }
                            error!(error = %e, "periodic store sync failed");
                        }
                        dirty = false;
                        p = lock(&shared.pending);
                    }
                } else {
                    p = shared.wake.wait(p).unwrap_or_else(|e| e.into_inner());
                }
            }
            shared.pending_bytes.store(0, Ordering::Release);
            (std::mem::take(&mut p.ops), p.last_seq)
        };
        let started = Instant::now();
        let mut result = backend.apply(&ops);
        if result.is_ok() {
            if durability == Durability::Sync {
                result = backend.sync();
            } else {
                dirty = true;
            }
        }
        shared.latency.record(started.elapsed());
        match result {
            Ok(()) => {
                if failing {
                    info!("store writes succeed again");
                    failing = false;
                }
            }
            Err(e) if e.is_fatal() => {
                // `processed` stays below `low`: this batch and everything after it fail.
                shared.declare_fatal(e);
                return Ok(());
            }
            Err(e) => {
                if !failing {
                    error!(error = %e, "store write failed; affected messages are not acknowledged");
                    failing = true;
                }
                lock(&shared.failures).record(low, high);
            }
        }
        low = high + 1;
        shared.processed.store(high, Ordering::Release);
        (shared.notify)(high);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    #[derive(Default, Clone)]
    struct Flaky {
        inner: Arc<Mutex<MemoryBackend>>,
        fail: Arc<AtomicBool>,
        syncs: Arc<AtomicUsize>,
    }

    impl Backend for Flaky {
        fn apply(&mut self, ops: &[Op]) -> Result<(), StoreError> {
            if self.fail.load(Ordering::SeqCst) {
                return Err(StoreError::Io(std::io::Error::other("disk full")));
            }
            lock(&self.inner).apply(ops)
        }
        fn sync(&mut self) -> Result<(), StoreError> {
            // As slow as a real fsync, so submissions pile up behind it.
            std::thread::sleep(Duration::from_millis(1));
            self.syncs.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
        fn load(&mut self) -> Result<Recovered, StoreError> {
            lock(&self.inner).load()
        }
    }

    fn wait_for(store: &Store, seq: u64) -> bool {
        for _ in 0..20_000 {
            if let Some(ok) = store.outcome(seq) {
                return ok;
            }
            std::thread::sleep(Duration::from_micros(50));
        }
        panic!("seq {seq} never processed");
    }

    fn session(c: &str) -> Op {
        Op::PutSession {
            client: c.into(),
            record: SessionRecord {
                protocol: crate::protocol::ProtocolVersion::V5,
                expiry_interval: 60,
                disconnected_at: None,
                will: None,
            },
        }
    }

    #[test]
    fn failed_batches_are_reported_and_recovery_follows() {
        let backend = Flaky::default();
        let (store, _) =
            Store::open(Box::new(backend.clone()), Durability::Sync, Duration::from_millis(10), Box::new(|_| {}))
                .unwrap();
        let a = store.submit([session("a")]);
        assert!(wait_for(&store, a));
        backend.fail.store(true, Ordering::SeqCst);
        let b = store.submit([session("b")]);
        assert!(!wait_for(&store, b), "a failed write is not reported durable");
        backend.fail.store(false, Ordering::SeqCst);
        let c = store.submit([session("c")]);
        assert!(wait_for(&store, c), "the store recovers by itself");
        let names: Vec<String> =
            lock(&backend.inner).load().unwrap().sessions.into_iter().map(|(c, _)| c.to_string()).collect();
        assert_eq!(names, ["a", "c"]);
    }

    #[test]
    fn group_commit_syncs_once_per_batch() {
        let backend = Flaky::default();
        let (store, _) =
            Store::open(Box::new(backend.clone()), Durability::Sync, Duration::from_millis(10), Box::new(|_| {}))
                .unwrap();
        let store = Arc::new(store);
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let s = Arc::clone(&store);
                std::thread::spawn(move || {
                    let mut last = 0;
                    for i in 0..200 {
                        last = s.submit([session(&format!("c{t}-{i}"))]);
                    }
                    last
                })
            })
            .map(|h| h.join().unwrap())
            .collect();
        for seq in threads {
            assert!(wait_for(&store, seq));
        }
        let syncs = backend.syncs.load(Ordering::SeqCst);
        assert!(syncs < 400, "{syncs} syncs for 1600 submissions: commits are not grouped");
        assert_eq!(lock(&backend.inner).load().unwrap().sessions.len(), 1600);
    }
    /// Fails, panics or fails its sync on command; no delay.
    #[derive(Default, Clone)]
    struct Scripted {
        inner: Arc<Mutex<MemoryBackend>>,
        fail: Arc<AtomicBool>,
        panic: Arc<AtomicBool>,
        fail_sync: Arc<AtomicBool>,
    }

    impl Backend for Scripted {
        fn apply(&mut self, ops: &[Op]) -> Result<(), StoreError> {
            assert!(!self.panic.load(Ordering::SeqCst), "backend bug");
            if self.fail.load(Ordering::SeqCst) {
                return Err(StoreError::Io(std::io::Error::other("transient")));
            }
            lock(&self.inner).apply(ops)
        }
        fn sync(&mut self) -> Result<(), StoreError> {
            if self.fail_sync.load(Ordering::SeqCst) {
                return Err(StoreError::Io(std::io::Error::other("fsync failed")));
            }
            Ok(())
        }
        fn load(&mut self) -> Result<Recovered, StoreError> {
            lock(&self.inner).load()
        }
    }

    fn open(backend: &Scripted, durability: Durability) -> Store {
        Store::open(Box::new(backend.clone()), durability, Duration::from_millis(10), Box::new(|_| {})).unwrap().0
    }

    #[test]
    fn five_thousand_failed_batches_are_all_still_reported_failed() {
        let backend = Scripted::default();
        let store = open(&backend, Durability::Sync);
        let (mut failed, mut committed) = (Vec::new(), Vec::new());
        for i in 0..10_000 {
            let fail = i % 2 == 0;
            backend.fail.store(fail, Ordering::SeqCst);
            let seq = store.submit([session(&format!("c{i}"))]);
            assert_eq!(wait_for(&store, seq), !fail);
            if fail {
                failed.push(seq)
            } else {
                committed.push(seq)
            }
        }
        assert_eq!(failed.len(), 5_000);
        for seq in &failed {
            assert_eq!(store.outcome(*seq), Some(false), "failed batch {seq} reported durable");
        }
        // The latest successes keep their answer (only the oldest may be merged away).
        for seq in &committed[committed.len() - 1_000..] {
            assert_eq!(store.outcome(*seq), Some(true));
        }
        assert!(store.fatal().is_none(), "transient failures are not fatal");
    }

    #[test]
    fn a_panicking_commit_thread_makes_the_store_fatal() {
        let backend = Scripted::default();
        let notified = Arc::new(AtomicU64::new(0));
        let n2 = Arc::clone(&notified);
        let (store, _) = Store::open(
            Box::new(backend.clone()),
            Durability::Sync,
            Duration::from_millis(10),
            Box::new(move |s| n2.store(s, Ordering::SeqCst)),
        )
        .unwrap();
        let hooked = Arc::new(Mutex::new(None));
        let h2 = Arc::clone(&hooked);
        store.on_fatal(Box::new(move |e| *lock(&h2) = Some(e.to_string())));
        let a = store.submit([session("a")]);
        assert!(wait_for(&store, a));
        backend.panic.store(true, Ordering::SeqCst);
        let b = store.submit([session("b")]);
        assert!(!wait_for(&store, b), "the batch the thread died on is not durable");
        // `declare_fatal` marks the numbers failed before it records the error: poll for the
        // error, with a deadline (it raced under load).
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while store.fatal().is_none() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        let err = store.fatal().expect("fatal");
        assert!(matches!(*err, StoreError::CommitThread(_)), "{err}");
        assert!(err.to_string().contains("backend bug"), "{err}");
        // The hooks run after the error is recorded: poll for them too.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while lock(&hooked).is_none() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(lock(&hooked).as_deref().is_some_and(|m| m.contains("backend bug")));
        // The waiters are told after the hooks run: poll for it, with a deadline.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while notified.load(Ordering::SeqCst) != u64::MAX && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(notified.load(Ordering::SeqCst), u64::MAX, "waiters are woken");
        // Later submissions are answered at once, failed, and not kept.
        backend.panic.store(false, Ordering::SeqCst);
        let c = store.submit([session("c")]);
        assert_eq!(store.outcome(c), Some(false));
        assert!(lock(&store.shared.pending).ops.is_empty());
        assert_eq!(store.outcome(a), Some(true), "what was committed stays committed");
        // A hook registered late is called at once.
        let late = Arc::new(AtomicBool::new(false));
        let l2 = Arc::clone(&late);
        store.on_fatal(Box::new(move |_| l2.store(true, Ordering::SeqCst)));
        assert!(late.load(Ordering::SeqCst));
        assert!(store.close().is_err());
    }

    /// Blocks every `apply` while the gate is closed, as a disk that stopped answering.
    #[derive(Default, Clone)]
    struct Gated {
        inner: Arc<Mutex<MemoryBackend>>,
        closed: Arc<(Mutex<bool>, Condvar)>,
    }

    impl Gated {
        fn set(&self, closed: bool) {
            *lock(&self.closed.0) = closed;
            self.closed.1.notify_all();
        }
    }

    struct OpenAtEnd(Gated);

    impl Drop for OpenAtEnd {
        fn drop(&mut self) {
            self.0.set(false);
        }
    }

    impl Backend for Gated {
        fn apply(&mut self, ops: &[Op]) -> Result<(), StoreError> {
            let mut closed = lock(&self.closed.0);
            while *closed {
                closed = self.closed.1.wait(closed).unwrap_or_else(|e| e.into_inner());
            }
            lock(&self.inner).apply(ops)
        }
        fn sync(&mut self) -> Result<(), StoreError> {
            Ok(())
        }
        fn load(&mut self) -> Result<Recovered, StoreError> {
            lock(&self.inner).load()
        }
    }

    #[test]
    fn pending_bytes_count_what_waits_for_the_commit_thread() {
        let backend = Gated::default();
        let (store, _) =
            Store::open(Box::new(backend.clone()), Durability::Sync, Duration::from_millis(10), Box::new(|_| {}))
                .unwrap();
        backend.set(true);
        // Declared after the store, so dropped before it: a failed assertion must not leave
        // the store's close waiting for the gate.
        let _open_at_end = OpenAtEnd(backend.clone());
        // The first batch is taken (and blocks in `apply`); what follows waits.
        let first = store.submit([session("first")]);
        let t0 = std::time::Instant::now();
        while store.pending_bytes() > 0 {
            assert!(t0.elapsed() < Duration::from_secs(5), "the commit thread never took the first batch");
            std::thread::sleep(Duration::from_millis(1));
        }
        let retained =
            |i: usize| Op::PutRetained { topic: format!("t/{i:02}").into(), value: Bytes::from(vec![0u8; 1000]) };
        let mut last = 0;
        for i in 0..100 {
            last = store.submit([retained(i)]);
        }
        let one = retained(0).approx_size();
        assert!(one > 1003 && one < 1200, "size of a 1000-byte retained message: {one}");
        assert_eq!(store.pending_bytes(), 100 * one);
        assert_eq!(store.backlog_over(100 * one), None, "at the bound is not over it");
        assert_eq!(store.backlog_over(50 * one), Some(last), "over: wait for the last submitted");
        assert_eq!(store.outcome(first), None);
        backend.set(false);
        assert!(wait_for(&store, last));
        assert_eq!(store.pending_bytes(), 0);
        assert_eq!(store.backlog_over(0), None);
    }

    #[test]
    fn a_fatal_store_keeps_no_backlog() {
        let backend = Scripted::default();
        let store = open(&backend, Durability::Sync);
        backend.panic.store(true, Ordering::SeqCst);
        let a = store.submit([session("a")]);
        assert!(!wait_for(&store, a));
        store.submit([session("b")]);
        assert_eq!(store.pending_bytes(), 0, "nothing waits behind a store that will never write");
        assert_eq!(store.backlog_over(0), None);
    }

    #[test]
    fn a_failed_final_sync_is_an_error() {
        let backend = Scripted::default();
        let store = open(&backend, Durability::Periodic);
        let a = store.submit([session("a")]);
        assert!(wait_for(&store, a));
        backend.fail_sync.store(true, Ordering::SeqCst);
        let err = store.close().expect_err("the final sync failed");
        assert!(err.to_string().contains("fsync failed"), "{err}");
        let clean = open(&Scripted::default(), Durability::Sync);
        assert!(clean.close().is_ok());
    }
}
