//! The seam between the broker and durable storage.
//!
//! Owns the persisted shape of sessions, subscriptions and retained messages. Synchronous and
//! free of sockets and async: the broker calls it, an implementation decides where the bytes
//! go. `MemoryStore` keeps everything in process memory (nothing survives a restart); the
//! fjall implementation with group commit is the durable-state issue's work.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use bytes::Bytes;

use crate::protocol::{ProtocolVersion, SubscriptionOptions};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The underlying storage refused or failed the write.
    #[error("store write failed: {0}")]
    Write(String),
}

/// What survives of a session while its client is away.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRecord {
    pub protocol: ProtocolVersion,
    /// Seconds; u32::MAX = never expires.
    pub expiry_interval: u32,
}

/// A retained message as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetainedRecord {
    pub qos: u8,
    pub payload: Bytes,
}

pub trait Store: Send + Sync {
    fn put_session(&self, client_id: &str, record: &SessionRecord) -> Result<(), StoreError>;
    /// Removes the session and everything under its prefix (subscriptions, queue).
    fn delete_session(&self, client_id: &str) -> Result<(), StoreError>;
    fn put_subscription(
        &self,
        client_id: &str,
        filter: &str,
        options: SubscriptionOptions,
        id: Option<u32>,
    ) -> Result<(), StoreError>;
    fn delete_subscription(&self, client_id: &str, filter: &str) -> Result<(), StoreError>;
    fn put_retained(&self, topic: &str, record: &RetainedRecord) -> Result<(), StoreError>;
    fn delete_retained(&self, topic: &str) -> Result<(), StoreError>;
}

type StoredSubscription = (SubscriptionOptions, Option<u32>);

/// Keeps records in memory, with keys shaped like the durable store's (client id prefix), so
/// tests can look at what the broker asked to persist.
#[derive(Default)]
pub struct MemoryStore {
    sessions: Mutex<HashMap<String, SessionRecord>>,
    subscriptions: Mutex<BTreeMap<(String, String), StoredSubscription>>,
    retained: Mutex<HashMap<String, RetainedRecord>>,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn session_count(&self) -> usize {
        self.sessions.lock().map(|s| s.len()).unwrap_or(0)
    }

    pub fn subscription_count(&self) -> usize {
        self.subscriptions.lock().map(|s| s.len()).unwrap_or(0)
    }

    pub fn retained_count(&self) -> usize {
        self.retained.lock().map(|s| s.len()).unwrap_or(0)
    }
}

fn poisoned<T>(_: T) -> StoreError {
    StoreError::Write("memory store lock poisoned".into())
}

impl Store for MemoryStore {
    fn put_session(&self, client_id: &str, record: &SessionRecord) -> Result<(), StoreError> {
        self.sessions.lock().map_err(poisoned)?.insert(client_id.to_owned(), record.clone());
        Ok(())
    }

    fn delete_session(&self, client_id: &str) -> Result<(), StoreError> {
        self.sessions.lock().map_err(poisoned)?.remove(client_id);
        self.subscriptions.lock().map_err(poisoned)?.retain(|(c, _), _| c != client_id);
        Ok(())
    }

    fn put_subscription(
        &self,
        client_id: &str,
        filter: &str,
        options: SubscriptionOptions,
        id: Option<u32>,
    ) -> Result<(), StoreError> {
        self.subscriptions.lock().map_err(poisoned)?.insert((client_id.to_owned(), filter.to_owned()), (options, id));
        Ok(())
    }

    fn delete_subscription(&self, client_id: &str, filter: &str) -> Result<(), StoreError> {
        self.subscriptions.lock().map_err(poisoned)?.remove(&(client_id.to_owned(), filter.to_owned()));
        Ok(())
    }

    fn put_retained(&self, topic: &str, record: &RetainedRecord) -> Result<(), StoreError> {
        self.retained.lock().map_err(poisoned)?.insert(topic.to_owned(), record.clone());
        Ok(())
    }

    fn delete_retained(&self, topic: &str) -> Result<(), StoreError> {
        self.retained.lock().map_err(poisoned)?.remove(topic);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deleting_a_session_removes_its_prefix_only() {
        let s = MemoryStore::new();
        let rec = SessionRecord { protocol: ProtocolVersion::V5, expiry_interval: 10 };
        s.put_session("a", &rec).unwrap();
        s.put_session("ab", &rec).unwrap();
        s.put_subscription("a", "x/#", SubscriptionOptions::default(), None).unwrap();
        s.put_subscription("ab", "y", SubscriptionOptions::default(), Some(3)).unwrap();
        s.delete_session("a").unwrap();
        assert_eq!(s.session_count(), 1);
        assert_eq!(s.subscription_count(), 1);
    }
}
