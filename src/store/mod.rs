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

mod fjall_backend;
mod memory;
pub mod records;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::Bytes;
use bytestring::ByteString;
use tracing::{error, info};

pub use fjall_backend::FjallBackend;
pub use memory::MemoryBackend;
pub use records::{InflightState, QueuedRecord, SessionRecord, StoredWill};

use crate::config::Durability;
use crate::message::Message;
use crate::protocol::SubscriptionOptions;

#[derive(Debug, thiserror::Error)]
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
    /// The storage engine failed (I/O error, disk full...).
    #[error("storage engine error: {0}")]
    Engine(String),
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

/// Everything loaded at start-up.
#[derive(Debug, Default)]
pub struct Recovered {
    pub sessions: Vec<(ByteString, SessionRecord)>,
    pub subscriptions: Vec<(ByteString, ByteString, SubscriptionOptions, Option<u32>)>,
    /// In (client, seq) order.
    pub queued: Vec<(ByteString, u64, QueuedRecord, Option<InflightState>)>,
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
}

struct Pending {
    ops: Vec<Op>,
    last_seq: u64,
}

struct Shared {
    pending: Mutex<Pending>,
    wake: Condvar,
    processed: AtomicU64,
    /// Sequence ranges whose batch failed; small (failures are rare) and pruned as read.
    failed: Mutex<Vec<(u64, u64)>>,
    stop: AtomicBool,
    notify: Box<dyn Fn(u64) + Send + Sync>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Handle to the commit thread. Dropping it flushes, syncs and stops the thread.
pub struct Store {
    shared: Arc<Shared>,
    reader: Option<Arc<dyn RetainedReader>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    durability: Durability,
}

impl Store {
    /// Loads the backend's state and starts the commit thread. `notify` is called from that
    /// thread with the highest sequence number processed (committed or failed).
    pub fn open(
        mut backend: Box<dyn Backend>,
        durability: Durability,
        sync_interval: Duration,
        notify: Box<dyn Fn(u64) + Send + Sync>,
    ) -> Result<(Store, Recovered), StoreError> {
        let recovered = backend.load()?;
        let reader = backend.retained_reader();
        let shared = Arc::new(Shared {
            pending: Mutex::new(Pending { ops: Vec::new(), last_seq: 0 }),
            wake: Condvar::new(),
            processed: AtomicU64::new(0),
            failed: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
            notify,
        });
        let s2 = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("tern-store".into())
            .spawn(move || commit_loop(backend, s2, durability, sync_interval))
            .map_err(|e| StoreError::Engine(format!("cannot start the store thread: {e}")))?;
        Ok((Store { shared, reader, thread: Mutex::new(Some(thread)), durability }, recovered))
    }

    /// Reads a retained message that was recovered as `Indexed`.
    pub fn read_retained(&self, topic: &str) -> Result<Option<Arc<Message>>, StoreError> {
        match &self.reader {
            Some(r) => r.get(topic),
            None => Ok(None),
        }
    }

    /// True when acknowledgements must wait for `outcome` (durability "sync").
    pub fn acks_wait(&self) -> bool {
        self.durability == Durability::Sync
    }

    /// Queues operations for the next commit; returns their sequence number.
    pub fn submit(&self, ops: impl IntoIterator<Item = Op>) -> u64 {
        let mut p = lock(&self.shared.pending);
        let before = p.ops.len();
        p.ops.extend(ops);
        if p.ops.len() == before {
            return 0; // nothing to wait for
        }
        p.last_seq += 1;
        let seq = p.last_seq;
        drop(p);
        self.shared.wake.notify_one();
        seq
    }

    /// Highest sequence number processed so far.
    pub fn processed(&self) -> u64 {
        self.shared.processed.load(Ordering::Acquire)
    }

    /// None while `seq` is not processed yet; Some(true) once durable, Some(false) if its
    /// batch failed.
    pub fn outcome(&self, seq: u64) -> Option<bool> {
        if seq > self.processed() {
            return None;
        }
        let failed = lock(&self.shared.failed);
        Some(!failed.iter().any(|&(lo, hi)| lo <= seq && seq <= hi))
    }

    /// Flushes what is pending, syncs, and stops the commit thread.
    pub fn close(&self) {
        self.shared.stop.store(true, Ordering::Release);
        self.shared.wake.notify_one();
        if let Some(t) = lock(&self.thread).take() {
            let _ = t.join();
        }
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        self.close();
    }
}

fn commit_loop(mut backend: Box<dyn Backend>, shared: Arc<Shared>, durability: Durability, interval: Duration) {
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
                        let _ = backend.sync();
                    }
                    return;
                }
                if durability == Durability::Periodic && dirty {
                    let (guard, timeout) = shared.wake.wait_timeout(p, interval).unwrap_or_else(|e| e.into_inner());
                    p = guard;
                    if timeout.timed_out() && p.ops.is_empty() {
                        drop(p);
                        if let Err(e) = backend.sync() {
                            error!(error = %e, "periodic store sync failed");
                        }
                        dirty = false;
                        p = lock(&shared.pending);
                    }
                } else {
                    p = shared.wake.wait(p).unwrap_or_else(|e| e.into_inner());
                }
            }
            (std::mem::take(&mut p.ops), p.last_seq)
        };
        let mut result = backend.apply(&ops);
        if result.is_ok() {
            if durability == Durability::Sync {
                result = backend.sync();
            } else {
                dirty = true;
            }
        }
        match result {
            Ok(()) => {
                if failing {
                    info!("store writes succeed again");
                    failing = false;
                }
            }
            Err(e) => {
                if !failing {
                    error!(error = %e, "store write failed; affected messages are not acknowledged");
                    failing = true;
                }
                let mut f = lock(&shared.failed);
                // Keep the list short: old ranges have been read by everyone who waited.
                if f.len() > 1024 {
                    f.drain(..512);
                }
                f.push((low, high));
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
                return Err(StoreError::Engine("disk full".into()));
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
        for _ in 0..500 {
            if let Some(ok) = store.outcome(seq) {
                return ok;
            }
            std::thread::sleep(Duration::from_millis(2));
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
}
