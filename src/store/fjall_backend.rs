//! The durable backend: one fjall database in `storage.dir`, one keyspace per kind of
//! record, every commit round one atomic `OwnedWriteBatch`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};

use super::memory::decode_all;
use super::progress::LoadProgress;
use super::records::*;
use super::{Backend, Op, QueueReader, QueuedEntry, Recovered, RetainedReader, StoreError};
use crate::message::Message;

/// Retained messages read straight from their keyspace (fjall is safe to read from any
/// thread while the commit thread writes).
struct FjallRetained(Keyspace);

impl RetainedReader for FjallRetained {
    fn get(&self, topic: &str) -> Result<Option<Arc<Message>>, StoreError> {
        match self.0.get(topic).map_err(engine)? {
            Some(v) => Ok(Some(Arc::new(decode_message(&v)?))),
            None => Ok(None),
        }
    }
}

/// Sessions' durable queues read back by key range (fjall reads are safe from any thread
/// while the commit thread writes).
struct FjallQueue {
    queue: Keyspace,
    inflight: Keyspace,
}

impl QueueReader for FjallQueue {
    fn read(
        &self,
        client: &str,
        from: u64,
        to: u64,
        max: usize,
        max_bytes: usize,
    ) -> Result<(Vec<QueuedEntry>, u64), StoreError> {
        let lo = client_key(client, &from.to_be_bytes());
        let hi = client_key(client, &to.to_be_bytes());
        let mut out = Vec::new();
        let mut bytes = 0usize;
        for g in self.queue.range(lo..=hi) {
            let (k, v) = g.into_inner().map_err(engine)?;
            let Some((_, suffix)) = split_client_key(&k) else { continue };
            let Ok(seq) = <[u8; 8]>::try_from(suffix).map(u64::from_be_bytes) else { continue };
            let state = self.inflight.get(&k).map_err(engine)?.map(|s| decode_inflight(&s)).transpose()?;
            bytes += v.len();
            out.push((seq, decode_queued(&v)?, state));
            if out.len() >= max || bytes >= max_bytes {
                return Ok((out, seq));
            }
        }
        Ok((out, to))
    }
}

const VERSION_KEY: &str = "store_version";

/// Memtable size (fjall's count: keys, values and ~60 bytes per entry; the memory is ~2.3×
/// that) of the keyspaces written a few times per session, not per message: sessions and
/// subscriptions. Why not fjall's 64 MiB: a memtable keeps every write, deletes included,
/// until it is full and flushed, so 64 MiB per keyspace is memory that sessions already
/// discarded never give back (measured, tests/memory.rs: 10,000 persistent sessions created
/// and discarded left ~5.5 MiB a round in memtables; 1 MiB memtables cut that to ~3 MiB of
/// live heap, 256 KiB to ~1.2 MiB). The price is a small flush to disk every few thousand
/// session changes, done by fjall's background workers.
const SESSION_MEMTABLE: u64 = 256 << 10;
/// Memtable size of the keyspaces written per message (queue; in-flight states, from which
/// every acknowledged message deletes its entry; inbound QoS 2 ids; retained): larger
/// memtables mean fewer flushes and fewer tables to compact, and at message rate that is
/// throughput. Measured with `tern-bench durable` (release, same loaded machine, runs
/// alternated): with 256 KiB for the in-flight states, 31-38k msg/s against 57-98k with
/// fjall's 64 MiB; with 8 MiB (the low end of what fjall recommends), 116-253k (median 207k)
/// against 113-260k (median 244k), level within the noise, at half the peak RSS (44-50 MB
/// against 81-101 MB). 8 MiB bounds what these four hold to 32 MiB instead of 256.
const MESSAGE_MEMTABLE: u64 = 8 << 20;
/// fjall's block cache, shared by all keyspaces (fjall's default: 32 MiB). tern keeps its
/// state in memory and reads the store at recovery (once, front to back: a cache does not
/// help), to delete a session's records (recent writes, mostly still in memtables) and for
/// retained messages past `limits.max_retained_in_memory`. Blocks read stay cached until
/// evicted, deleted data included, so the cache is memory held after the data is gone.
const BLOCK_CACHE: u64 = 8 << 20;

pub struct FjallBackend {
    dir: PathBuf,
    db: Database,
    sessions: Keyspace,
    subscriptions: Keyspace,
    queue: Keyspace,
    inflight: Keyspace,
    inbound: Keyspace,
    retained: Keyspace,
    /// What `load` has read, for whoever watches a long recovery.
    progress: Arc<LoadProgress>,
}

fn engine(e: fjall::Error) -> StoreError {
    StoreError::Engine(e)
}

impl FjallBackend {
    /// Opens (or creates) the store in `dir`. Refuses a directory locked by another process
    /// or written by an incompatible version, rather than starting empty.
    pub fn open(dir: &Path) -> Result<FjallBackend, StoreError> {
        let shown = dir.display().to_string();
        let incompatible = |why: String| StoreError::Incompatible { dir: shown.clone(), why };
        std::fs::create_dir_all(dir).map_err(|e| incompatible(format!("cannot create it: {e}")))?;
        // Messages and sessions are nobody else's business: the directory is the owner's
        // only (the binary also sets umask 077, so the files are 0600).
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                .map_err(|e| incompatible(format!("cannot make it private (mode 0700): {e}")))?;
        }
        let db = Database::builder(dir).cache_size(BLOCK_CACHE).open().map_err(|e| match e {
            fjall::Error::Locked => StoreError::Locked(shown.clone()),
            other => incompatible(format!("cannot open it: {other}")),
        })?;
        // The memtable size is kept with a keyspace when it is created: a store created by an
        // earlier tern keeps fjall's 64 MiB.
        let ks = |name: &str| {
            let memtable = match name {
                "meta" | "sessions" | "subscriptions" => SESSION_MEMTABLE,
                _ => MESSAGE_MEMTABLE,
            };
            db.keyspace(name, || KeyspaceCreateOptions::default().max_memtable_size(memtable)).map_err(engine)
        };
        let meta = ks("meta")?;
        match meta.get(VERSION_KEY).map_err(engine)? {
            Some(v) => {
                let found = <[u8; 4]>::try_from(&v[..]).map(u32::from_be_bytes).ok();
                if found != Some(STORE_VERSION) {
                    return Err(incompatible(format!(
                        "store version {found:?}, this tern reads version {STORE_VERSION}"
                    )));
                }
            }
            None => {
                meta.insert(VERSION_KEY, STORE_VERSION.to_be_bytes()).map_err(engine)?;
                db.persist(PersistMode::SyncAll).map_err(engine)?;
            }
        }
        Ok(FjallBackend {
            dir: dir.to_path_buf(),
            sessions: ks("sessions")?,
            subscriptions: ks("subscriptions")?,
            queue: ks("queue")?,
            inflight: ks("inflight")?,
            inbound: ks("inbound")?,
            retained: ks("retained")?,
            db,
            progress: Arc::default(),
        })
    }

    /// Counts what `load` reads into `progress`, so another thread can follow a long recovery.
    pub fn with_progress(mut self, progress: Arc<LoadProgress>) -> FjallBackend {
        self.progress = progress;
        self
    }

    /// Classifies a failed write or sync. fjall 3 poisons its database when a journal write
    /// or fsync fails (disk full included) and answers `Poisoned` to every write after that;
    /// it returns the original I/O error only the first time. `persist(Buffer)` checks the
    /// poison flag first, so it tells whether the failure was the fatal kind.
    fn failed(&self, e: fjall::Error) -> StoreError {
        let dir = self.dir.display().to_string();
        if matches!(e, fjall::Error::Poisoned) {
            return StoreError::Poisoned { dir, source: e };
        }
        // Twice: if the probe itself flushes into a failing disk, that poisons, and the
        // second call reports it.
        for _ in 0..2 {
            if let Err(fjall::Error::Poisoned) = self.db.persist(PersistMode::Buffer) {
                return StoreError::Poisoned { dir, source: e };
            }
        }
        StoreError::Engine(e)
    }

    fn prefix_keys(ks: &Keyspace, prefix: &[u8]) -> Result<Vec<Vec<u8>>, StoreError> {
        ks.prefix(prefix).map(|g| g.key().map(|k| k.to_vec()).map_err(engine)).collect()
    }
}

impl Backend for FjallBackend {
    fn apply(&mut self, ops: &[Op]) -> Result<(), StoreError> {
        let mut batch = self.db.batch();
        for op in ops {
            match op {
                Op::PutSession { client, record } => {
                    batch.insert(&self.sessions, &client.as_bytes()[..], encode_session(record));
                }
                Op::DeleteSession { client } => {
                    // Prefix deletes read committed data, so what this batch has put so far
                    // must be committed first.
                    std::mem::replace(&mut batch, self.db.batch()).commit().map_err(|e| self.failed(e))?;
                    batch.remove(&self.sessions, &client.as_bytes()[..]);
                    let p = client_prefix(client);
                    for ks in [&self.subscriptions, &self.queue, &self.inflight, &self.inbound] {
                        for k in Self::prefix_keys(ks, &p).map_err(|e| match e {
                            StoreError::Engine(e) => self.failed(e),
                            other => other,
                        })? {
                            batch.remove(ks, k);
                        }
                    }
                }
                Op::PutSubscription { client, filter, options, id } => {
                    batch.insert(
                        &self.subscriptions,
                        client_key(client, filter.as_bytes()),
                        encode_subscription(*options, *id).to_vec(),
                    );
                }
                Op::DeleteSubscription { client, filter } => {
                    batch.remove(&self.subscriptions, client_key(client, filter.as_bytes()));
                }
                Op::PutQueued { client, seq, value } => {
                    batch.insert(&self.queue, client_key(client, &seq.to_be_bytes()), &value[..]);
                }
                Op::SetInflight { client, seq, state } => {
                    batch.insert(
                        &self.inflight,
                        client_key(client, &seq.to_be_bytes()),
                        encode_inflight(*state).to_vec(),
                    );
                }
                Op::DeleteQueued { client, seq } => {
                    let k = client_key(client, &seq.to_be_bytes());
                    batch.remove(&self.queue, k.clone());
                    batch.remove(&self.inflight, k);
                }
                Op::PutInbound { client, packet_id } => {
                    batch.insert(&self.inbound, client_key(client, &packet_id.to_be_bytes()), Vec::<u8>::new());
                }
                Op::DeleteInbound { client, packet_id } => {
                    batch.remove(&self.inbound, client_key(client, &packet_id.to_be_bytes()));
                }
                Op::PutRetained { topic, value } => {
                    batch.insert(&self.retained, &topic.as_bytes()[..], &value[..]);
                }
                Op::DeleteRetained { topic } => {
                    batch.remove(&self.retained, &topic.as_bytes()[..]);
                }
            }
        }
        batch.commit().map_err(|e| self.failed(e))
    }

    fn retained_reader(&self) -> Option<Arc<dyn RetainedReader>> {
        Some(Arc::new(FjallRetained(self.retained.clone())))
    }

    fn queue_reader(&self) -> Option<Arc<dyn QueueReader>> {
        Some(Arc::new(FjallQueue { queue: self.queue.clone(), inflight: self.inflight.clone() }))
    }

    fn sync(&mut self) -> Result<(), StoreError> {
        // fdatasync: the journal is appended to, and its data (with the size that makes it
        // reachable) is what must survive; other metadata need not be flushed each round.
        self.db.persist(PersistMode::SyncData).map_err(|e| self.failed(e))
    }

    fn load(&mut self) -> Result<Recovered, StoreError> {
        let kv = |g: fjall::Guard| g.into_inner().map(|(k, v)| (k.to_vec(), v.to_vec())).map_err(engine);
        let inflight = &self.inflight;
        decode_all(
            self.sessions.iter().map(kv),
            self.subscriptions.iter().map(kv),
            self.queue.iter().map(kv),
            |k| inflight.get(k).map(|v| v.map(|v| v.to_vec())).map_err(engine),
            self.inbound.iter().map(kv),
            self.retained.iter().map(kv),
            true,
            &self.progress,
        )
        .map_err(|e| StoreError::Incompatible { dir: self.dir.display().to_string(), why: e.to_string() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::ProtocolVersion;

    fn session(c: &str) -> Op {
        Op::PutSession {
            client: c.into(),
            record: SessionRecord {
                protocol: ProtocolVersion::V311,
                expiry_interval: u32::MAX,
                disconnected_at: None,
                will: None,
            },
        }
    }

    #[test]
    fn data_survives_reopen_and_prefix_delete_is_exact() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut b = FjallBackend::open(dir.path()).unwrap();
            b.apply(&[
                session("a"),
                session("ab"),
                Op::PutInbound { client: "a".into(), packet_id: 7 },
                Op::PutInbound { client: "ab".into(), packet_id: 8 },
            ])
            .unwrap();
            b.apply(&[Op::DeleteSession { client: "a".into() }]).unwrap();
            b.sync().unwrap();
        }
        let mut b = FjallBackend::open(dir.path()).unwrap();
        let r = b.load().unwrap();
        assert_eq!(r.sessions.len(), 1);
        assert_eq!(r.sessions[0].0, "ab");
        assert_eq!(r.inbound, vec![("ab".into(), 8)]);
    }

    #[test]
    fn second_opener_is_refused_with_the_directory_named() {
        let dir = tempfile::tempdir().unwrap();
        let _first = FjallBackend::open(dir.path()).unwrap();
        let Err(err) = FjallBackend::open(dir.path()) else { panic!("second open succeeded") };
        assert!(err.to_string().contains(&dir.path().display().to_string()), "{err}");
    }

    #[test]
    fn other_versions_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        {
            let b = FjallBackend::open(dir.path()).unwrap();
            let meta = b.db.keyspace("meta", KeyspaceCreateOptions::default).unwrap();
            meta.insert(VERSION_KEY, 99u32.to_be_bytes()).unwrap();
            b.db.persist(PersistMode::SyncAll).unwrap();
        }
        let Err(err) = FjallBackend::open(dir.path()) else { panic!("opened a version 99 store") };
        assert!(err.to_string().contains("version"), "{err}");
    }
}
