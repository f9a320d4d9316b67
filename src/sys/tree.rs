//! The `$SYS/broker/...` tree, as mosquitto publishes it (`mosquitto(8)`, "BROKER STATUS"),
//! plus tern's own under `$SYS/broker/tern/`: every `metrics.sys_interval` seconds, each value
//! that changed since it was last published is published again, retained, QoS 0.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::broker::{Broker, DropCause, Stats};
use crate::store::LatencySnapshot;

/// The counters mosquitto keeps load averages of, with their topics under
/// `$SYS/broker/load/`.
const LOADS: [&str; 8] = [
    "messages/received",
    "messages/sent",
    "bytes/received",
    "bytes/sent",
    "publish/received",
    "publish/sent",
    "publish/dropped",
    "connections",
];

/// The load averages' windows, in minutes.
const WINDOWS: [(u32, &str); 3] = [(1, "1min"), (5, "5min"), (15, "15min")];

fn load_counters(s: &Stats) -> [u64; 8] {
    [
        s.packets_received,
        s.packets_sent,
        s.bytes_received,
        s.bytes_sent,
        s.publish_received.iter().sum(),
        s.publish_sent.iter().sum(),
        dropped(s),
        s.connections_total,
    ]
}

/// Messages dropped as mosquitto counts them: QoS 0 for a client that is away is not queued
/// there either, but not counted (tern counts it under its own cause, `offline`).
fn dropped(s: &Stats) -> u64 {
    DropCause::ALL.iter().zip(s.dropped).filter(|(c, _)| **c != DropCause::Offline).map(|(_, n)| n).sum()
}

/// What the tree remembers between two updates.
#[derive(Default)]
pub(super) struct Tree {
    /// The payload last published on each topic.
    published: HashMap<String, String>,
    /// The counters of `LOADS` at the last update, and when.
    previous: Option<(Instant, [u64; 8])>,
    /// Per counter, per window: events per minute, decaying.
    loads: [[f64; 3]; 8],
    /// Most sessions seen at once (mosquitto's `clients/maximum`, sampled at each update).
    maximum: u64,
    commits: LatencySnapshot,
}

impl Tree {
    /// The values due at `now`: every topic with its payload.
    pub(super) fn values(&mut self, s: &Stats, now: Instant, max_commit: Duration) -> Vec<(String, String)> {
        let mut v: Vec<(String, String)> = Vec::with_capacity(64);
        let mut put = |topic: &str, value: String| v.push((format!("$SYS/broker/{topic}"), value));
        put("version", format!("tern version {}", env!("CARGO_PKG_VERSION")));
        put("uptime", format!("{} seconds", s.uptime_secs));
        self.maximum = self.maximum.max(s.sessions);
        put("clients/connected", s.connected.to_string());
        put("clients/disconnected", s.sessions.saturating_sub(s.connected).to_string());
        put("clients/total", s.sessions.to_string());
        put("clients/maximum", self.maximum.to_string());
        put("clients/expired", s.sessions_expired.to_string());
        put("messages/received", s.packets_received.to_string());
        put("messages/sent", s.packets_sent.to_string());
        put("messages/inflight", s.inflight.to_string());
        let stored = (s.queued_messages + s.inflight + s.retained).to_string();
        put("messages/stored", stored.clone());
        put("store/messages/count", stored);
        put("subscriptions/count", s.subscriptions.to_string());
        put("retained messages/count", s.retained.to_string());
        put("bytes/received", s.bytes_received.to_string());
        put("bytes/sent", s.bytes_sent.to_string());
        put("publish/messages/received", s.publish_received.iter().sum::<u64>().to_string());
        put("publish/messages/sent", s.publish_sent.iter().sum::<u64>().to_string());
        put("publish/messages/dropped", dropped(s).to_string());

        // Load averages as mosquitto computes them: the rate per minute since the last
        // update, folded into each window's average with weight exp(-elapsed / window).
        let counters = load_counters(s);
        if let Some((then, before)) = self.previous {
            let secs = now.duration_since(then).as_secs_f64();
            if secs > 0.0 {
                for ((avg, now_n), before_n) in self.loads.iter_mut().zip(counters).zip(before) {
                    let per_minute = now_n.saturating_sub(before_n) as f64 * 60.0 / secs;
                    for (a, (minutes, _)) in avg.iter_mut().zip(WINDOWS) {
                        let keep = (-secs / (60.0 * f64::from(minutes))).exp();
                        *a = keep * *a + (1.0 - keep) * per_minute;
                    }
                }
            }
        }
        self.previous = Some((now, counters));
        for (name, avg) in LOADS.iter().zip(&self.loads) {
            for (a, (_, window)) in avg.iter().zip(WINDOWS) {
                put(&format!("load/{name}/{window}"), format!("{a:.2}"));
            }
        }

        // tern's own: the store's commit latency over the interval, its backlog and health,
        // and drops by cause.
        let commits = s.commit_latency.since(&self.commits);
        self.commits = s.commit_latency;
        let ms = |d: Option<Duration>| format!("{:.3}", d.unwrap_or_default().as_secs_f64() * 1000.0);
        put("tern/store/commit latency/p50", ms(commits.quantile(0.5)));
        put("tern/store/commit latency/p99", ms(commits.quantile(0.99)));
        put("tern/store/commit latency/max", ms(Some(max_commit)));
        put("tern/store/commits", s.commit_latency.count.to_string());
        put("tern/store/pending bytes", s.store_pending_bytes.to_string());
        put("tern/store/state", if s.store_failure.is_some() { "failed" } else { "ok" }.to_string());
        for (cause, n) in DropCause::ALL.iter().zip(s.dropped) {
            put(&format!("tern/dropped/{}", cause.name()), n.to_string());
        }
        put("tern/queued/messages", s.queued_messages.to_string());
        put("tern/queued/bytes", s.queued_bytes.to_string());
        if let Some(c) = &s.cluster {
            put("tern/cluster/state", if c.connected { "connected" } else { "disconnected" }.to_string());
            put("tern/cluster/forwarded", c.forwarded.to_string());
            put("tern/cluster/received", c.received.to_string());
            put("tern/cluster/ack failures", c.ack_failures.to_string());
            put("tern/cluster/publish errors", c.publish_errors.to_string());
            put("tern/cluster/takeovers", c.takeovers.to_string());
            put("tern/cluster/claims refused", c.claims_refused.to_string());
        }
        v
    }

    /// Of `values`, those whose payload differs from the one last published; remembered as
    /// published.
    pub(super) fn changed(&mut self, values: Vec<(String, String)>) -> Vec<(String, String)> {
        values
            .into_iter()
            .filter(|(topic, value)| {
                if self.published.get(topic) == Some(value) {
                    return false;
                }
                self.published.insert(topic.clone(), value.clone());
                true
            })
            .collect()
    }
}

/// Publishes the tree every `metrics.sys_interval` seconds until shutdown.
pub(super) async fn run(broker: Arc<Broker>, mut shutdown: watch::Receiver<bool>) {
    let every = Duration::from_secs(broker.config.metrics.sys_interval);
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut tree = Tree::default();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = super::stopped(&mut shutdown) => return,
        }
        if broker.shutting_down() {
            return;
        }
        // Walking the sessions is O(sessions): off the async workers.
        let b = Arc::clone(&broker);
        let Ok(stats) = tokio::task::spawn_blocking(move || b.stats()).await else { continue };
        let max_commit = broker.commit_latency().take_max();
        let values = tree.values(&stats, Instant::now(), max_commit);
        for (topic, payload) in tree.changed(values) {
            broker.publish_sys(&topic, payload);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_changed_values_are_published_again() {
        let mut t = Tree::default();
        let now = Instant::now();
        let mut s = Stats { connected: 2, sessions: 3, ..Stats::default() };
        let values = t_values(&mut t, &s, now);
        let first = t.changed(values);
        assert!(first.iter().any(|(k, v)| k == "$SYS/broker/clients/connected" && v == "2"));
        assert!(first.iter().any(|(k, v)| k == "$SYS/broker/clients/disconnected" && v == "1"));
        assert!(first.iter().any(|(k, _)| k == "$SYS/broker/load/connections/15min"));
        s.connected = 3;
        let values = t_values(&mut t, &s, now + Duration::from_secs(10));
        let second = t.changed(values);
        let topics: Vec<&str> = second.iter().map(|(k, _)| k.as_str()).collect();
        assert!(topics.contains(&"$SYS/broker/clients/connected"), "{topics:?}");
        assert!(topics.contains(&"$SYS/broker/clients/disconnected"), "{topics:?}");
        assert!(!topics.contains(&"$SYS/broker/clients/total"), "{topics:?}");
        assert!(!topics.contains(&"$SYS/broker/version"), "{topics:?}");
    }

    #[test]
    fn load_averages_decay_towards_the_rate_per_minute() {
        let mut t = Tree::default();
        let t0 = Instant::now();
        let mut s = Stats::default();
        t_values(&mut t, &s, t0);
        // 600 publishes received in 60 s: 600 per minute.
        s.publish_received = [600, 0, 0];
        let v = t_values(&mut t, &s, t0 + Duration::from_secs(60));
        let get = |k: &str| v.iter().find(|(t, _)| t == k).map(|(_, v)| v.parse::<f64>().unwrap()).unwrap();
        let one = get("$SYS/broker/load/publish/received/1min");
        let fifteen = get("$SYS/broker/load/publish/received/15min");
        // 600 * (1 - e^-1) = 379.27; 600 * (1 - e^-(1/15)) = 38.696, published as 38.70
        assert!((one - 379.27).abs() < 0.01, "{one}");
        assert!((fifteen - 38.70).abs() < 0.001, "{fifteen}");
    }

    fn t_values(t: &mut Tree, s: &Stats, now: Instant) -> Vec<(String, String)> {
        t.values(s, now, Duration::ZERO)
    }
}
