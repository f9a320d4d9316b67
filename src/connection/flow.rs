//! Flow control towards publishers: when a message fills a connected subscriber's queue, the
//! publishing connection stops taking new work from its client (TCP then slows the client
//! down) and holds its acknowledgements until every such subscriber has room again, instead
//! of the broker dropping what it acknowledged. A subscriber that makes no progress for
//! `limits.slow_consumer_secs` is disconnected, so one dead reader cannot stop its publishers
//! for ever, and two clients publishing into each other's full queues cannot stall for ever
//! either.
//!
//! While waiting, the connection still reads a bounded amount (`STASH_MAX`): acknowledgements
//! of its own deliveries and PINGREQ are handled at once (without them its own queue could
//! not drain), everything else is put aside and handled in order once the wait is over.

use super::*;

/// Input put aside while waiting, in bytes: past this the socket is not read.
const STASH_MAX: usize = 64 * 1024;

pub(super) struct Flow {
    targets: Vec<Waited>,
    /// Packets read while waiting, with their size on the wire, to be handled in order.
    stash: VecDeque<(Packet, usize)>,
    stashed: usize,
    /// When the next stalled subscriber is due to be cut off.
    deadline: Pin<Box<tokio::time::Sleep>>,
    /// The client closed its end; the connection ends once what was put aside is handled.
    closed: bool,
    /// Counts this wait in `publishers_waiting` while it lasts.
    _waiting: Waiting,
}

/// A connection counted in `publishers_waiting` until this is dropped.
struct Waiting(Arc<Broker>);

impl Waiting {
    fn new(broker: &Arc<Broker>) -> Waiting {
        broker.metrics.publishers_waiting.fetch_add(1, Ordering::Relaxed);
        broker.metrics.flow_waits.fetch_add(1, Ordering::Relaxed);
        Waiting(Arc::clone(broker))
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.metrics.publishers_waiting.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A subscriber waited on, with its progress count when it last moved, and since when.
struct Waited {
    handle: Arc<SessionHandle>,
    progress: u64,
    since: Instant,
}

impl Flow {
    pub(super) fn poll_deadline(&mut self, cx: &mut std::task::Context<'_>) -> Poll<()> {
        self.deadline.as_mut().poll(cx)
    }

    /// Whether the socket is left unread: enough is put aside, or the client has closed.
    pub(super) fn stop_reading(&self) -> bool {
        self.closed || self.stashed >= STASH_MAX
    }

    pub(super) fn has_stash(&self) -> bool {
        !self.stash.is_empty()
    }

    pub(super) fn client_closed(&mut self) {
        self.closed = true;
    }

    pub(super) fn put_aside(&mut self, p: Packet, size: usize) {
        self.stashed += size;
        self.stash.push_back((p, size));
    }
}

impl Conn {
    /// A publish filled the queues of `full`: wait until each has room.
    pub(super) fn wait_for_room(&mut self, full: Vec<Arc<SessionHandle>>) {
        let now = Instant::now();
        for handle in full {
            // A client feeding its own queue is not held up by it: it could not read the acks
            // that would let its queue drain.
            if Arc::ptr_eq(&handle, &self.link.handle) {
                continue;
            }
            let Some(progress) = handle.wait_for_room(&self.link.control) else { continue };
            let broker = &self.link.broker;
            let flow = self.flow.get_or_insert_with(|| {
                Box::new(Flow {
                    targets: Vec::new(),
                    stash: VecDeque::new(),
                    stashed: 0,
                    deadline: Box::pin(tokio::time::sleep(Duration::ZERO)),
                    closed: false,
                    _waiting: Waiting::new(broker),
                })
            });
            if !flow.targets.iter().any(|w| Arc::ptr_eq(&w.handle, &handle)) {
                debug!(client_id = %self.link.client_id(), subscriber = %handle.client_id, "publishes wait for room");
                flow.targets.push(Waited { handle, progress, since: now });
            }
        }
        self.arm_deadline();
    }

    /// Sets the timer to the moment the longest-stalled subscriber is due to be cut off, or
    /// to a second from now if that is sooner: while this connection leaves its client
    /// unread, it counts the client as heard from (its silence is ours), so the keep-alive
    /// sweep must see that at least every second.
    fn arm_deadline(&mut self) {
        let limit = Duration::from_secs(self.link.broker.config.limits.slow_consumer_secs);
        self.link.control.seen(self.link.broker.tick());
        if let Some(flow) = self.flow.as_mut() {
            if let Some(first) = flow.targets.iter().map(|w| w.since).min() {
                let at = (first + limit).min(Instant::now() + Duration::from_secs(1));
                flow.deadline.as_mut().reset(tokio::time::Instant::from_std(at));
            }
        }
    }

    /// Looks again at the subscribers waited on (woken by FLOW or the deadline): forgets those
    /// with room, cuts off those stalled too long, and once none is left handles what was put
    /// aside.
    pub(super) fn check_flow(&mut self) -> Result<(), Close> {
        let Some(flow) = self.flow.as_mut() else { return Ok(()) };
        let now = Instant::now();
        let limit = Duration::from_secs(self.link.broker.config.limits.slow_consumer_secs);
        let control = &self.link.control;
        let broker = &self.link.broker;
        flow.targets.retain_mut(|w| {
            let Some(progress) = w.handle.wait_for_room(control) else { return false };
            if progress != w.progress {
                w.progress = progress;
                w.since = now;
                return true;
            }
            if now.duration_since(w.since) < limit {
                return true;
            }
            // Stalled: its queue is full (its own bound, or big while the broker is at its
            // memory budget) and nothing has left it for the whole limit.
            let cell = w.handle.lock();
            if let Some(c) = &cell.control {
                tracing::warn!(
                    client_id = %w.handle.client_id,
                    secs = limit.as_secs(),
                    "slow consumer: queue full without progress, disconnecting it (limits.slow_consumer_secs)"
                );
                broker.metrics.slow_consumers.fetch_add(1, Ordering::Relaxed);
                c.kick(reason::QUOTA_EXCEEDED);
            }
            false
        });
        if !flow.targets.is_empty() {
            self.arm_deadline();
            return Ok(());
        }
        // Room everywhere: handle what was put aside, in order. A publish among it may fill a
        // queue again; the rest then waits again.
        let Some(flow) = self.flow.take() else { return Ok(()) };
        debug!(client_id = %self.link.client_id(), put_aside = flow.stash.len(), "publishes go on");
        let (stash, closed) = (flow.stash, flow.closed);
        let replayed = self.replay(stash, closed);
        self.flush_publishes();
        if !replayed? {
            return Ok(());
        }
        if closed {
            return Err(Close::Lost("connection closed by client"));
        }
        if self.flow.is_none() {
            self.process_input()?;
        }
        Ok(())
    }

    /// Handles put-aside packets in order until one fills a queue again (then the rest is put
    /// aside again and it returns false).
    fn replay(&mut self, mut stash: VecDeque<(Packet, usize)>, closed: bool) -> Result<bool, Close> {
        while let Some((p, size)) = stash.pop_front() {
            if let Some(f) = self.flow.as_mut() {
                stash.push_front((p, size));
                f.stashed = stash.iter().map(|(_, s)| s).sum();
                f.stash = stash;
                f.closed = closed;
                return Ok(false);
            }
            self.handle_packet(p)?;
        }
        Ok(true)
    }
}
