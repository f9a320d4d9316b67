//! The status page's data (`/api/status`, JSON) and the reporter the HTTP handlers share: the
//! latest `Stats` (gathered at most once a second however often pages and scrapers ask) and
//! the history of samples.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::broker::{Broker, DropCause, Stats};
use crate::store::LatencySnapshot;

/// Seconds between two samples of the status page's history.
pub(super) const SAMPLE_SECS: u64 = 2;
/// Samples kept: ten minutes.
const SAMPLES: usize = 300;
/// Stats younger than this are served again instead of walking the sessions anew.
const FRESH: Duration = Duration::from_secs(1);
/// The commit latency on the page is over this much history.
const LATENCY_WINDOW: usize = 30;

/// One sample: when, and the counters the chart shows rates of.
#[derive(Debug, Clone, Copy)]
pub(super) struct Sample {
    unix_ms: u64,
    received: u64,
    sent: u64,
    bytes_received: u64,
    bytes_sent: u64,
    dropped: u64,
    connected: u64,
    commits: LatencySnapshot,
}

pub(super) struct Reporter {
    pub(super) broker: Arc<Broker>,
    latest: Mutex<Option<(Instant, Arc<Stats>)>>,
    history: Mutex<VecDeque<Sample>>,
}

impl Reporter {
    pub(super) fn new(broker: Arc<Broker>) -> Reporter {
        Reporter { broker, latest: Mutex::new(None), history: Mutex::new(VecDeque::with_capacity(SAMPLES)) }
    }

    /// The broker's stats, at most `FRESH` old. O(sessions) when they are gathered anew: call
    /// it off the async workers.
    pub(super) fn stats(&self) -> Arc<Stats> {
        let mut latest = self.latest.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((at, s)) = latest.as_ref() {
            if at.elapsed() < FRESH {
                return Arc::clone(s);
            }
        }
        let s = Arc::new(self.broker.stats());
        *latest = Some((Instant::now(), Arc::clone(&s)));
        s
    }

    /// Adds a sample of the stats now to the history (the oldest goes past `SAMPLES`).
    pub(super) fn sample(&self) {
        let s = self.stats();
        let sample = Sample {
            unix_ms: unix_ms(),
            received: s.publish_received.iter().sum(),
            sent: s.publish_sent.iter().sum(),
            bytes_received: s.bytes_received,
            bytes_sent: s.bytes_sent,
            dropped: s.dropped_total(),
            connected: s.connected,
            commits: s.commit_latency,
        };
        let mut h = self.history.lock().unwrap_or_else(|e| e.into_inner());
        if h.len() >= SAMPLES {
            h.pop_front();
        }
        h.push_back(sample);
    }

    /// `/api/status` as JSON.
    pub(super) fn status_json(&self) -> String {
        let s = self.stats();
        let history: Vec<Sample> = self.history.lock().unwrap_or_else(|e| e.into_inner()).iter().copied().collect();
        let status = status(&s, &history);
        serde_json::to_string(&status).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }
}

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[derive(Serialize)]
struct Status {
    version: &'static str,
    uptime_secs: u64,
    clients: Clients,
    sessions: u64,
    subscriptions: u64,
    retained: u64,
    messages: Messages,
    bytes: InOut,
    queued: Queued,
    flow: Flow,
    store: StoreStatus,
    bridges: Vec<BridgeStatus>,
    /// Rates per second between consecutive samples, oldest first.
    history: History,
}

#[derive(Serialize)]
struct Clients {
    connected: u64,
    disconnected: u64,
    connections_total: u64,
    expired: u64,
}

#[derive(Serialize)]
struct Messages {
    received: u64,
    sent: u64,
    dropped: u64,
    dropped_by_cause: std::collections::BTreeMap<&'static str, u64>,
}

#[derive(Serialize)]
struct InOut {
    received: u64,
    sent: u64,
}

#[derive(Serialize)]
struct Queued {
    messages: u64,
    bytes: u64,
    inflight: u64,
    memory_bytes: u64,
}

#[derive(Serialize)]
struct Flow {
    publishers_waiting: u64,
    inputs_paused: u64,
    acks_held: u64,
    slow_consumers_disconnected: u64,
}

#[derive(Serialize)]
struct StoreStatus {
    ok: bool,
    error: Option<String>,
    pending_bytes: u64,
    commits: u64,
    /// Over the last minute of samples; null without commits.
    commit_p50_ms: Option<f64>,
    commit_p99_ms: Option<f64>,
}

#[derive(Serialize)]
struct BridgeStatus {
    name: String,
    connected: bool,
}

#[derive(Serialize)]
struct History {
    interval_secs: u64,
    samples: Vec<Point>,
}

#[derive(Serialize)]
struct Point {
    /// Unix time of the sample, in milliseconds.
    t: u64,
    received_per_sec: f64,
    sent_per_sec: f64,
    bytes_received_per_sec: f64,
    bytes_sent_per_sec: f64,
    dropped_per_sec: f64,
    connected: u64,
}

fn status(s: &Stats, history: &[Sample]) -> Status {
    let ms = |d: Option<Duration>| d.map(|d| (d.as_secs_f64() * 1e6).round() / 1e3);
    let window = history.len().saturating_sub(LATENCY_WINDOW);
    let commits = match (history.get(window), history.last()) {
        (Some(first), Some(_)) => s.commit_latency.since(&first.commits),
        _ => s.commit_latency,
    };
    let samples = history
        .windows(2)
        .filter_map(|w| {
            let [a, b] = w else { return None };
            let secs = b.unix_ms.saturating_sub(a.unix_ms) as f64 / 1000.0;
            if secs <= 0.0 {
                return None;
            }
            let rate = |x: u64, y: u64| ((y.saturating_sub(x)) as f64 / secs * 100.0).round() / 100.0;
            Some(Point {
                t: b.unix_ms,
                received_per_sec: rate(a.received, b.received),
                sent_per_sec: rate(a.sent, b.sent),
                bytes_received_per_sec: rate(a.bytes_received, b.bytes_received),
                bytes_sent_per_sec: rate(a.bytes_sent, b.bytes_sent),
                dropped_per_sec: rate(a.dropped, b.dropped),
                connected: b.connected,
            })
        })
        .collect();
    Status {
        version: env!("CARGO_PKG_VERSION"),
        uptime_secs: s.uptime_secs,
        clients: Clients {
            connected: s.connected,
            disconnected: s.sessions.saturating_sub(s.connected),
            connections_total: s.connections_total,
            expired: s.sessions_expired,
        },
        sessions: s.sessions,
        subscriptions: s.subscriptions,
        retained: s.retained,
        messages: Messages {
            received: s.publish_received.iter().sum(),
            sent: s.publish_sent.iter().sum(),
            dropped: s.dropped_total(),
            dropped_by_cause: DropCause::ALL.iter().map(|c| c.name()).zip(s.dropped).collect(),
        },
        bytes: InOut { received: s.bytes_received, sent: s.bytes_sent },
        queued: Queued {
            messages: s.queued_messages,
            bytes: s.queued_bytes,
            inflight: s.inflight,
            memory_bytes: s.queued_memory,
        },
        flow: Flow {
            publishers_waiting: s.publishers_waiting,
            inputs_paused: s.inputs_paused,
            acks_held: s.acks_held,
            slow_consumers_disconnected: s.slow_consumers,
        },
        store: StoreStatus {
            ok: s.store_failure.is_none(),
            error: s.store_failure.clone(),
            pending_bytes: s.store_pending_bytes,
            commits: s.commit_latency.count,
            commit_p50_ms: ms(commits.quantile(0.5)),
            commit_p99_ms: ms(commits.quantile(0.99)),
        },
        bridges: s.bridges.iter().map(|(name, up)| BridgeStatus { name: name.clone(), connected: *up }).collect(),
        history: History { interval_secs: SAMPLE_SECS, samples },
    }
}
