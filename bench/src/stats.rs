//! Loss/duplicate accounting, /proc readings and the one-line `key=value` report.

use std::fmt::Display;
use std::time::Instant;

/// Per-publisher bitsets of received sequence numbers.
pub struct Tracker {
    bits: Vec<Vec<u64>>,
    expected: Vec<u64>,
    /// Every stamped PUBLISH seen.
    pub received: u64,
    /// Seen again after a first receipt.
    pub dup: u64,
    /// Unknown publisher id, sequence out of range, or no stamp.
    pub bad: u64,
    /// Retain flag set on receipt.
    pub retained: u64,
}

impl Tracker {
    /// `expected[p]` messages from publisher `p`, sequences `0..expected[p]`.
    pub fn new(expected: Vec<u64>) -> Tracker {
        let bits = expected.iter().map(|&n| vec![0u64; (n as usize).div_ceil(64)]).collect();
        Tracker { bits, expected, received: 0, dup: 0, bad: 0, retained: 0 }
    }

    pub fn record(&mut self, stamp: Option<(u32, u64, u64)>, retain: bool) {
        self.received += 1;
        if retain {
            self.retained += 1;
        }
        let Some((p, seq, _)) = stamp else {
            self.bad += 1;
            return;
        };
        let p = p as usize;
        if p >= self.bits.len() || seq >= self.expected[p] {
            self.bad += 1;
            return;
        }
        let (w, b) = ((seq / 64) as usize, seq % 64);
        if self.bits[p][w] & (1 << b) != 0 {
            self.dup += 1;
        } else {
            self.bits[p][w] |= 1 << b;
        }
    }

    /// The first (publisher, sequence) never received among the first `sent[p]` of each
    /// publisher, and how many distinct gaps (runs of missing sequences) there are.
    pub fn first_missing(&self, sent: &[u64]) -> (Option<(usize, u64)>, u64) {
        let mut first = None;
        let mut gaps = 0;
        for (p, bits) in self.bits.iter().enumerate() {
            let n = sent.get(p).copied().unwrap_or(0).min(self.expected[p]);
            let mut prev_missing = false;
            for seq in 0..n {
                let missing = bits[(seq / 64) as usize] & (1 << (seq % 64)) == 0;
                if missing && !prev_missing {
                    gaps += 1;
                    first.get_or_insert((p, seq));
                }
                prev_missing = missing;
            }
        }
        (first, gaps)
    }

    pub fn distinct(&self) -> u64 {
        self.received - self.dup - self.bad
    }

    pub fn expected_total(&self) -> u64 {
        self.expected.iter().sum()
    }

    pub fn complete(&self) -> bool {
        self.distinct() == self.expected_total()
    }
}

/// Clock ticks per second of /proc/*/stat times. USER_HZ is 100 on every Linux ABI in use.
const CLK_TCK: f64 = 100.0;

/// utime + stime of a process in seconds (`None` if unreadable).
pub fn cpu_secs(pid: Option<u32>) -> Option<f64> {
    let path = match pid {
        Some(p) => format!("/proc/{p}/stat"),
        None => "/proc/self/stat".to_string(),
    };
    let s = std::fs::read_to_string(path).ok()?;
    let rest = &s[s.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After the command: state(3) ... utime(14) stime(15); index 0 here is field 3.
    let ut: f64 = f.get(11)?.parse().ok()?;
    let st: f64 = f.get(12)?.parse().ok()?;
    Some((ut + st) / CLK_TCK)
}

/// VmRSS of a process in KiB.
pub fn rss_kb(pid: u32) -> Option<u64> {
    status_kb(pid, "VmRSS:")
}

/// VmHWM of a process in KiB: the peak of its resident set over its whole life.
pub fn rss_peak_kb(pid: u32) -> Option<u64> {
    status_kb(pid, "VmHWM:")
}

/// A `kB` field (e.g. `VmRSS:`) of /proc/PID/status.
fn status_kb(pid: u32, field: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Soft limit on open files, from /proc/self/limits.
pub fn nofile_limit() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = s.lines().find(|l| l.starts_with("Max open files"))?;
    let v = line["Max open files".len()..].split_whitespace().next()?;
    if v == "unlimited" {
        Some(u64::MAX)
    } else {
        v.parse().ok()
    }
}

/// CPU used by this process and (optionally) the broker between `start()` and `finish()`.
pub struct CpuMeter {
    wall: Instant,
    own: f64,
    broker_pid: Option<u32>,
    broker: Option<f64>,
    /// A second broker (`--pid2`) and its CPU seconds at the start.
    broker2: Option<(u32, f64)>,
}

impl CpuMeter {
    pub fn start(broker_pid: Option<u32>) -> CpuMeter {
        CpuMeter {
            wall: Instant::now(),
            own: cpu_secs(None).unwrap_or(0.0),
            broker_pid,
            broker: broker_pid.and_then(|p| cpu_secs(Some(p))),
            broker2: None,
        }
    }

    /// Also measures a second broker process (reported as broker2_cpu / broker2_cpu_pct).
    pub fn with_second(mut self, pid: Option<u32>) -> CpuMeter {
        self.broker2 = pid.and_then(|p| Some((p, cpu_secs(Some(p))?)));
        self
    }

    /// Adds gen_cpu (seconds), gen_cpu_pct (% of one core over the wall time) and, with a
    /// broker pid, broker_cpu / broker_cpu_pct.
    pub fn finish(&self, r: &mut Report) {
        let wall = self.wall.elapsed().as_secs_f64().max(1e-9);
        let own = cpu_secs(None).unwrap_or(0.0) - self.own;
        r.f("gen_cpu", own, 2);
        r.f("gen_cpu_pct", own / wall * 100.0, 0);
        if let (Some(pid), Some(b0)) = (self.broker_pid, self.broker) {
            if let Some(b1) = cpu_secs(Some(pid)) {
                r.f("broker_cpu", b1 - b0, 2);
                r.f("broker_cpu_pct", (b1 - b0) / wall * 100.0, 0);
            }
        }
        if let Some((pid, b0)) = self.broker2 {
            if let Some(b1) = cpu_secs(Some(pid)) {
                r.f("broker2_cpu", b1 - b0, 2);
                r.f("broker2_cpu_pct", (b1 - b0) / wall * 100.0, 0);
            }
        }
    }
}

/// One output line of `key=value` pairs.
#[derive(Default)]
pub struct Report {
    parts: Vec<String>,
}

impl Report {
    pub fn new(scenario: &str) -> Report {
        let mut r = Report::default();
        r.kv("scenario", scenario);
        r
    }

    pub fn kv(&mut self, k: &str, v: impl Display) -> &mut Self {
        self.parts.push(format!("{k}={v}"));
        self
    }

    pub fn f(&mut self, k: &str, v: f64, decimals: usize) -> &mut Self {
        self.parts.push(format!("{k}={v:.decimals$}"));
        self
    }

    pub fn line(&self) -> String {
        self.parts.join(" ")
    }
}

/// The value at quantile `q` (0..=1) of sorted `v`, nearest-rank.
pub fn quantile(v: &[u64], q: f64) -> u64 {
    if v.is_empty() {
        return 0;
    }
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}
