//! Messages a session holds without holding them in memory: a persistent session's QoS 1/2
//! messages kept only in the store (its *backlog*), and the retained messages a SUBSCRIBE
//! is still to send (the *retained cursor*). Both are read into the queue as it drains, a
//! chunk at a time, so what waits costs little memory however much waits.
//!
//! The session only keeps the bookkeeping here; reading is the caller's (`Load`).

use std::collections::VecDeque;
use std::sync::Arc;

use bytestring::ByteString;

use crate::message::Message;
use crate::protocol::QoS;

/// A persistent session's messages that are in the store and not in memory: every message
/// of the session's durable queue with a key from `next` to `last` that is not in flight.
/// Newer than everything in the in-memory queue (while it is not empty, new QoS 1/2
/// messages join it, not the queue), so reading it in key order keeps the order.
#[derive(Debug)]
pub(super) struct Backlog {
    pub(super) count: usize,
    pub(super) bytes: usize,
    pub(super) next: u64,
    pub(super) last: u64,
    /// Keys up to this one were found in the store at start-up: they may have been sent
    /// before a crash (QoS 1 sends are not recorded), so they go out flagged DUP.
    pub(super) recovered_through: u64,
}

/// A retained message still to be sent for a SUBSCRIBE.
#[derive(Debug)]
pub(super) struct PendingRetained {
    pub(super) item: RetainedItem,
    pub(super) qos: QoS,
    pub(super) subscription_id: Option<u32>,
}

#[derive(Debug)]
pub(super) enum RetainedItem {
    /// In memory (shared with the retained index).
    Loaded(Arc<Message>),
    /// Only in the store: read before it can be sent.
    Stored(ByteString),
}

/// Retained messages a SUBSCRIBE is still to send. They go out after the `ahead` messages
/// that were queued before the SUBSCRIBE (as if queued behind them then) and before any
/// queued after.
#[derive(Debug, Default)]
pub(super) struct RetainedCursor {
    pub(super) pending: VecDeque<PendingRetained>,
    pub(super) ahead: usize,
}

/// The parts of a session's state that most sessions never need, boxed so that an idle
/// session does not carry them (the backlog, the retained cursor, a budget reservation).
#[derive(Debug, Default)]
pub(super) struct Lazy {
    /// QoS 1/2 messages in the store only (persistent sessions): see `Backlog`.
    pub(super) backlog: Option<Backlog>,
    /// Retained messages still to send for SUBSCRIBEs.
    pub(super) retained: RetainedCursor,
    /// A `Load` handed out is not back yet.
    pub(super) loading: bool,
    /// The queue's share of the broker's memory budget (only when it is past its free part).
    pub(super) reservation: super::budget::Reservation,
}

impl Lazy {
    /// Holds nothing: the box can go.
    pub(super) fn idle(&self) -> bool {
        self.backlog.is_none() && self.retained.pending.is_empty() && !self.loading && self.reservation.is_zero()
    }
}

/// A read the caller should make for the session (`SessionState::wants_load`); its result
/// goes back with `backlog_loaded` / `retained_loaded`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Load {
    /// Backlog messages with keys from `from` to `to`, in key order, until `max` messages
    /// or `max_bytes` bytes of records are read (at least one). Those with keys up to
    /// `recovered_through` may have been sent before a restart.
    Backlog { from: u64, to: u64, max: usize, max_bytes: usize, recovered_through: u64 },
    /// These retained messages, by topic.
    Retained(Vec<ByteString>),
}

/// Messages read per load: enough to keep a fast client busy between reads, few enough
/// that a chunk of large messages stays small.
pub const LOAD_CHUNK: usize = 256;
/// Bytes of records read per backlog load, at most (one message more if it is larger).
pub const LOAD_BYTES: usize = 1024 * 1024;
/// A backlog read starts when the queue is down to this.
pub(super) const LOW_WATER: usize = 64;
