//! systemd's service notifications (sd_notify(3)) for a `Type=notify` unit
//! (`config/tern.service`): `READY=1` once recovery is done and every listener is bound,
//! `STOPPING=1` on the way out, `RELOADING=1` around a SIGHUP reload, `STATUS=` lines
//! systemctl shows, `WATCHDOG=1` pings, and start-timeout extensions while a long recovery
//! is still reading.
//!
//! Part of the binary, not the library: an embedding program has its own supervisor. Does
//! nothing unless `NOTIFY_SOCKET` is set, so tern run by hand or by another supervisor is
//! unaffected. The datagrams are written by the `sd-notify` crate (small, no dependencies
//! beyond libc, and the protocol details, abstract socket names included, are its job);
//! each send runs on the blocking pool, never on an async worker.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sd_notify::NotifyState;
use tern::store::LoadProgress;
use tracing::{debug, warn};

/// How often a starting tern tells systemd how far recovery has got.
const PROGRESS_EVERY: Duration = Duration::from_secs(2);

/// How much more start-up time systemd grants each time recovery has read more since the
/// last report. A recovery that stops reading gets no more, and `TimeoutStartSec=` ends it.
const EXTEND_BY: Duration = Duration::from_secs(30);

/// One notification, owned so it can move to the blocking pool.
enum Note {
    Ready,
    Stopping,
    /// `RELOADING=1` with the `MONOTONIC_USEC=` that `Type=notify-reload` units want too.
    Reloading,
    Watchdog,
    Status(String),
    ExtendTimeout(Duration),
}

/// Talks to the service manager named by `NOTIFY_SOCKET`, if any.
pub struct Notifier {
    enabled: bool,
    /// A failing socket is reported once, not at every watchdog ping.
    warned: AtomicBool,
}

impl Notifier {
    pub fn from_env() -> Arc<Notifier> {
        Arc::new(Notifier { enabled: std::env::var_os("NOTIFY_SOCKET").is_some(), warned: AtomicBool::new(false) })
    }

    pub async fn status(&self, status: String) {
        self.send(vec![Note::Status(status)]).await;
    }

    pub async fn ready(&self, status: String) {
        self.send(vec![Note::Ready, Note::Status(status)]).await;
    }

    pub async fn stopping(&self, status: String) {
        self.send(vec![Note::Stopping, Note::Status(status)]).await;
    }

    pub async fn reloading(&self) {
        self.send(vec![Note::Reloading, Note::Status("reloading password file, ACL file and certificates".into())])
            .await;
    }

    /// Pings systemd at half the interval it asked for (`WATCHDOG_USEC`, for this process
    /// per `WATCHDOG_PID`) for as long as the runtime runs. The pings come from an async
    /// task, so a runtime that stops making progress stops them and systemd restarts tern.
    pub fn start_watchdog(self: &Arc<Self>) {
        if !self.enabled {
            return;
        }
        let Some(limit) = sd_notify::watchdog_enabled() else { return };
        let every = (limit / 2).max(Duration::from_millis(1));
        debug!(?every, "systemd watchdog enabled");
        let me = Arc::clone(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                me.send(vec![Note::Watchdog]).await;
            }
        });
    }

    /// Runs `start` (which recovers the store, then binds the listeners), telling systemd
    /// every couple of seconds how far recovery has read, and asking for more start-up time
    /// while it keeps reading.
    pub async fn while_starting<F: std::future::Future>(&self, start: F, progress: &LoadProgress) -> F::Output {
        if !self.enabled {
            return start.await;
        }
        tokio::pin!(start);
        let began = Instant::now();
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + PROGRESS_EVERY, PROGRESS_EVERY);
        let mut last_records = 0;
        loop {
            tokio::select! {
                out = &mut start => return out,
                _ = tick.tick() => {
                    let records = progress.records();
                    let status = format!("recovering: {}, {:.0} s", progress.describe(), began.elapsed().as_secs_f64());
                    let mut notes = vec![Note::Status(status)];
                    if records > last_records {
                        notes.push(Note::ExtendTimeout(EXTEND_BY));
                        last_records = records;
                    }
                    self.send(notes).await;
                }
            }
        }
    }

    async fn send(&self, notes: Vec<Note>) {
        if !self.enabled {
            return;
        }
        let sent = tokio::task::spawn_blocking(move || {
            let mut notes = notes;
            for n in &mut notes {
                if let Note::Status(s) = n {
                    // One line of the datagram: text after a line break would read as another
                    // assignment.
                    *s = s.replace(['\n', '\r'], " ");
                }
            }
            let mut states = Vec::with_capacity(notes.len() + 1);
            for n in &notes {
                match n {
                    Note::Ready => states.push(NotifyState::Ready),
                    Note::Stopping => states.push(NotifyState::Stopping),
                    Note::Reloading => {
                        states.push(NotifyState::Reloading);
                        if let Ok(now) = NotifyState::monotonic_usec_now() {
                            states.push(now);
                        }
                    }
                    Note::Watchdog => states.push(NotifyState::Watchdog),
                    Note::Status(s) => states.push(NotifyState::Status(s)),
                    Note::ExtendTimeout(d) => {
                        states.push(NotifyState::ExtendTimeoutUsec(u32::try_from(d.as_micros()).unwrap_or(u32::MAX)))
                    }
                }
            }
            sd_notify::notify(&states)
        })
        .await;
        let error = match sent {
            Ok(Ok(())) => return,
            Ok(Err(e)) => e.to_string(),
            Err(e) => e.to_string(),
        };
        if !self.warned.swap(true, Ordering::Relaxed) {
            warn!(error, "cannot notify systemd (NOTIFY_SOCKET); further failures are not logged");
        }
    }
}
