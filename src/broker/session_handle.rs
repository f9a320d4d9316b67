//! The shared handle of one session: its state behind a short-held lock, the wake-up of the
//! connection that serves it, and the control channel used to close that connection.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytestring::ByteString;
use tokio::sync::Notify;

use crate::protocol::{ProtocolVersion, QoS, SubscriptionOptions};
use crate::session::{Delivery, QueueLimits, SessionState};

/// Lets the broker close a connection from outside its task (takeover, shutdown).
#[derive(Debug, Default)]
pub struct ConnControl {
    pub kicked: Notify,
    reason: AtomicU8,
}

impl ConnControl {
    /// Asks the connection to send DISCONNECT with `reason` (v5) and close.
    pub fn kick(&self, reason: u8) {
        self.reason.store(reason, Ordering::Relaxed);
        self.kicked.notify_one();
    }

    pub fn reason(&self) -> u8 {
        self.reason.load(Ordering::Relaxed)
    }
}

/// Session data guarded by the handle's lock. Never held across an `.await`.
pub struct SessionCell {
    pub state: SessionState,
    /// Connection currently serving the session; 0 when the client is away.
    pub owner: u64,
    /// The connection that served it last, so timers armed at its close can tell whether the
    /// client came back in between.
    pub last_owner: u64,
    pub control: Option<Arc<ConnControl>>,
    /// Seconds; 0 = ends with the connection, `EXPIRY_NEVER` = never.
    pub expiry_interval: u32,
    pub protocol: ProtocolVersion,
    /// Full filter (with any `$share/group/` prefix) -> options and subscription id.
    pub subscriptions: HashMap<ByteString, (SubscriptionOptions, Option<u32>)>,
    /// The session was discarded; nothing may be queued to it any more.
    pub ended: bool,
    /// Something of this session is in the store (so ending it must delete it there).
    pub persisted: bool,
    /// Next key in the session's durable queue.
    pub next_store_seq: u64,
}

impl SessionCell {
    /// Persistent sessions keep their state in the store; clean ones never touch the disk.
    pub fn persistent(&self) -> bool {
        self.expiry_interval > 0 && !self.ended
    }
}

pub struct SessionHandle {
    pub client_id: ByteString,
    cell: Mutex<SessionCell>,
    /// Wakes the serving connection when deliveries are queued.
    pub notify: Notify,
}

impl SessionHandle {
    pub fn new(
        client_id: ByteString,
        limits: QueueLimits,
        owner: u64,
        control: Option<Arc<ConnControl>>,
        expiry_interval: u32,
        protocol: ProtocolVersion,
    ) -> Self {
        SessionHandle {
            client_id,
            cell: Mutex::new(SessionCell {
                state: SessionState::new(limits),
                owner,
                last_owner: 0,
                control,
                expiry_interval,
                protocol,
                subscriptions: HashMap::new(),
                ended: false,
                persisted: false,
                next_store_seq: 1,
            }),
            notify: Notify::new(),
        }
    }

    /// Locks the session. A panic while it was held cannot leave it half-updated in a way
    /// worse than losing that one operation, so poisoning is ignored.
    pub fn lock(&self) -> MutexGuard<'_, SessionCell> {
        self.cell.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a delivery and wakes the connection. False when it was dropped: the session
    /// ended, the queue is full, or it is QoS 0 for a client that is away (not queued, as
    /// mosquitto does by default).
    pub fn deliver(&self, d: Delivery) -> bool {
        let online = {
            let mut cell = self.lock();
            if cell.ended || (cell.owner == 0 && d.qos == QoS::AtMostOnce) {
                return false;
            }
            if cell.state.enqueue(d).is_err() {
                if cell.state.dropped.is_power_of_two() {
                    tracing::warn!(client_id = %self.client_id, dropped = cell.state.dropped, "session queue full, message dropped");
                }
                return false;
            }
            cell.owner != 0
        };
        if online {
            self.notify.notify_one();
        }
        true
    }

    /// Queues retained messages sent on subscribe, outside the queue limits.
    pub fn deliver_retained(&self, ds: Vec<Delivery>) {
        if ds.is_empty() {
            return;
        }
        {
            let mut cell = self.lock();
            if cell.ended {
                return;
            }
            for d in ds {
                cell.state.enqueue_unbounded(d);
            }
        }
        self.notify.notify_one();
    }
}
