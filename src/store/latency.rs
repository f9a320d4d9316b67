//! How long the commit thread's group commits take (write the batch, sync it): a histogram
//! of fixed buckets, recorded once per batch by the commit thread and read by whoever reports
//! on the store (`$SYS`, Prometheus, the status page).
//!
//! Atomics in fixed arrays: recording a commit allocates nothing and takes no lock.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds of the buckets, in microseconds (Prometheus's `le`); one more bucket counts
/// everything slower. From a cached write (tens of µs) to a disk that has stopped (seconds).
pub const BUCKETS_US: [u64; 16] = [
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000, 2_500_000,
    5_000_000, 10_000_000,
];

/// Cumulative counts of commit durations.
#[derive(Debug, Default)]
pub struct CommitLatency {
    /// Per bucket (not cumulative); the last one is above every bound.
    buckets: [AtomicU64; BUCKETS_US.len() + 1],
    sum_us: AtomicU64,
    count: AtomicU64,
    /// Slowest commit since `take_max` last looked.
    max_us: AtomicU64,
}

/// The histogram at one moment: counts per bucket (not cumulative), their sum and number.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LatencySnapshot {
    pub buckets: [u64; BUCKETS_US.len() + 1],
    pub sum_us: u64,
    pub count: u64,
}

impl CommitLatency {
    /// Counts one commit that took `took`.
    pub fn record(&self, took: Duration) {
        let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        let i = BUCKETS_US.iter().position(|&b| us <= b).unwrap_or(BUCKETS_US.len());
        if let Some(b) = self.buckets.get(i) {
            b.fetch_add(1, Ordering::Relaxed);
        }
        self.sum_us.fetch_add(us, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
        self.max_us.fetch_max(us, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> LatencySnapshot {
        let mut s = LatencySnapshot {
            sum_us: self.sum_us.load(Ordering::Relaxed),
            count: self.count.load(Ordering::Relaxed),
            ..LatencySnapshot::default()
        };
        for (to, from) in s.buckets.iter_mut().zip(&self.buckets) {
            *to = from.load(Ordering::Relaxed);
        }
        s
    }

    /// The slowest commit since the last call (0 if none), and starts over. For one reader
    /// only (the `$SYS` interval's maximum).
    pub fn take_max(&self) -> Duration {
        Duration::from_micros(self.max_us.swap(0, Ordering::Relaxed))
    }
}

impl LatencySnapshot {
    /// What was recorded between `earlier` and this snapshot.
    pub fn since(&self, earlier: &LatencySnapshot) -> LatencySnapshot {
        let mut d = LatencySnapshot {
            sum_us: self.sum_us.saturating_sub(earlier.sum_us),
            count: self.count.saturating_sub(earlier.count),
            ..LatencySnapshot::default()
        };
        for ((to, now), then) in d.buckets.iter_mut().zip(&self.buckets).zip(&earlier.buckets) {
            *to = now.saturating_sub(*then);
        }
        d
    }

    /// The `q` quantile (0..=1) as Prometheus's `histogram_quantile` estimates it: linear
    /// within the bucket it falls in; the top bucket answers with the highest bound. None
    /// when nothing was recorded.
    pub fn quantile(&self, q: f64) -> Option<Duration> {
        if self.count == 0 {
            return None;
        }
        let rank = q.clamp(0.0, 1.0) * self.count as f64;
        let mut below = 0u64;
        for (i, &n) in self.buckets.iter().enumerate() {
            if n > 0 && (below + n) as f64 >= rank {
                let Some(&upper) = BUCKETS_US.get(i) else {
                    return Some(Duration::from_micros(BUCKETS_US[BUCKETS_US.len() - 1]));
                };
                let lower = if i == 0 { 0 } else { BUCKETS_US[i - 1] };
                let within = ((rank - below as f64) / n as f64).clamp(0.0, 1.0);
                let us = lower as f64 + (upper - lower) as f64 * within;
                return Some(Duration::from_micros(us as u64));
            }
            below += n;
        }
        Some(Duration::from_micros(BUCKETS_US[BUCKETS_US.len() - 1]))
    }

    /// Cumulative counts per upper bound in seconds, for a Prometheus histogram (`+Inf`
    /// last).
    pub fn cumulative(&self) -> Vec<(f64, u64)> {
        let mut total = 0;
        let mut out = Vec::with_capacity(self.buckets.len());
        for (i, &n) in self.buckets.iter().enumerate() {
            total += n;
            let le = BUCKETS_US.get(i).map_or(f64::INFINITY, |&us| us as f64 / 1e6);
            out.push((le, total));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commits_fall_in_their_buckets_and_quantiles_follow() {
        let h = CommitLatency::default();
        for _ in 0..90 {
            h.record(Duration::from_micros(80)); // first bucket
        }
        for _ in 0..10 {
            h.record(Duration::from_millis(20)); // (10 ms, 25 ms]
        }
        let s = h.snapshot();
        assert_eq!((s.count, s.buckets[0], s.buckets[7]), (100, 90, 10));
        let p50 = s.quantile(0.5).unwrap();
        assert!(p50 <= Duration::from_micros(100), "{p50:?}");
        let p99 = s.quantile(0.99).unwrap();
        assert!(p99 > Duration::from_millis(10) && p99 <= Duration::from_millis(25), "{p99:?}");
        assert_eq!(h.take_max(), Duration::from_millis(20));
        assert_eq!(h.take_max(), Duration::ZERO);
        let later = {
            h.record(Duration::from_secs(30)); // above every bound
            h.snapshot()
        };
        let d = later.since(&s);
        assert_eq!((d.count, d.buckets[BUCKETS_US.len()]), (1, 1));
        assert_eq!(d.quantile(0.5), Some(Duration::from_secs(10)));
        let c = later.cumulative();
        assert_eq!(c.last(), Some(&(f64::INFINITY, 101)));
        assert_eq!(LatencySnapshot::default().quantile(0.5), None);
    }
}
