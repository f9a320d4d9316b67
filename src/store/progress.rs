//! How far a recovery has read the store: counted while a backend's `load` decodes records,
//! logged every couple of seconds when it takes that long, and readable from other threads
//! (the binary reports it to systemd while it waits).
//!
//! Counts records and bytes only: what the records mean is the broker's business.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tracing::info;

/// Records and bytes a recovery has read so far. Shared: the loading thread adds, anyone reads.
#[derive(Debug, Default)]
pub struct LoadProgress {
    records: AtomicU64,
    bytes: AtomicU64,
}

impl LoadProgress {
    /// Records (keys with their values) read so far.
    pub fn records(&self) -> u64 {
        self.records.load(Ordering::Relaxed)
    }

    /// Bytes of keys and values read so far.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// "read 1,200,000 records, 3.1 GB".
    pub fn describe(&self) -> String {
        describe(self.records(), self.bytes())
    }
}

fn describe(records: u64, bytes: u64) -> String {
    let noun = if records == 1 { "record" } else { "records" };
    format!("read {} {noun}, {}", thousands(records), human_bytes(bytes))
}

/// "1,200,000".
pub(crate) fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// "3.1 GB", "812 kB", "17 B" (decimal units, as disk sizes are quoted).
pub(crate) fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["kB", "MB", "GB", "TB"];
    if n < 1000 {
        return format!("{n} B");
    }
    let mut value = n as f64 / 1000.0;
    let mut unit = UNITS[0];
    for u in &UNITS[1..] {
        if value < 1000.0 {
            break;
        }
        value /= 1000.0;
        unit = u;
    }
    if value < 10.0 {
        format!("{value:.1} {unit}")
    } else {
        format!("{value:.0} {unit}")
    }
}

/// Records between two looks at the clock (and two updates of the shared counters): reading
/// one record takes a microsecond or so, so the clock is read every few milliseconds.
const CHECK_EVERY: u64 = 1024;

/// How often a long recovery says how far it got.
pub(crate) const REPORT_EVERY: Duration = Duration::from_secs(2);

/// The loading thread's own count, published to a `LoadProgress` in steps of `CHECK_EVERY`
/// records so the shared counters are not touched per record.
pub(crate) struct Tally<'a> {
    shared: &'a LoadProgress,
    records: u64,
    bytes: u64,
    started: Instant,
    next_report: Instant,
    every: Duration,
    /// Progress lines logged (tests).
    reports: u32,
}

impl<'a> Tally<'a> {
    pub(crate) fn new(shared: &'a LoadProgress, every: Duration) -> Tally<'a> {
        let started = Instant::now();
        Tally {
            shared,
            records: shared.records(),
            bytes: shared.bytes(),
            started,
            next_report: started + every,
            every,
            reports: 0,
        }
    }

    /// One record of `bytes` bytes read.
    pub(crate) fn add(&mut self, bytes: usize) {
        self.records += 1;
        self.bytes += bytes as u64;
        if self.records % CHECK_EVERY == 0 {
            self.publish();
            let now = Instant::now();
            if now >= self.next_report {
                self.reports += 1;
                self.next_report = now + self.every;
                info!(
                    "recovery: {} so far, {:.0} s",
                    describe(self.records, self.bytes),
                    self.started.elapsed().as_secs_f64()
                );
            }
        }
    }

    fn publish(&self) {
        self.shared.records.store(self.records, Ordering::Relaxed);
        self.shared.bytes.store(self.bytes, Ordering::Relaxed);
    }
}

impl Drop for Tally<'_> {
    /// The last partial step too, however loading ended.
    fn drop(&mut self) {
        self.publish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_read_as_people_write_them() {
        let cases = [(0, "0"), (999, "999"), (1000, "1,000"), (1_200_000, "1,200,000"), (12_345_678, "12,345,678")];
        for (n, s) in cases {
            assert_eq!(thousands(n), s);
        }
        let sizes = [(17, "17 B"), (812_000, "812 kB"), (3_100_000_000, "3.1 GB"), (45_600_000, "46 MB")];
        for (n, s) in sizes {
            assert_eq!(human_bytes(n), s);
        }
        assert_eq!(describe(1, 10), "read 1 record, 10 B");
    }

    #[test]
    fn a_long_load_reports_and_publishes_its_counts() {
        let shared = LoadProgress::default();
        {
            let mut t = Tally::new(&shared, Duration::ZERO);
            for _ in 0..3 * CHECK_EVERY + 5 {
                t.add(100);
            }
            assert_eq!(t.reports, 3, "one line per check once the interval has passed");
            assert_eq!(shared.records(), 3 * CHECK_EVERY, "published in steps");
        }
        assert_eq!((shared.records(), shared.bytes()), (3 * CHECK_EVERY + 5, (3 * CHECK_EVERY + 5) * 100));
        assert_eq!(shared.describe(), "read 3,077 records, 308 kB");

        let quiet = LoadProgress::default();
        let mut t = Tally::new(&quiet, REPORT_EVERY);
        for _ in 0..2 * CHECK_EVERY {
            t.add(1);
        }
        assert_eq!(t.reports, 0, "a quick load logs nothing");
    }
}
