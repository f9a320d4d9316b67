//! Throughput scenarios: fanin, fanout, durable (QoS 1 fan-in to a persistent session),
//! overload (fanin's flood against a broker at its defaults: loss and memory are the result)
//! and retained (bulk retained store, then one `#` subscriber).

use std::io::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Buf;
use tokio::time::Instant;

use crate::mqtt::{self, Conn, ConnectOpts};
use crate::stats::{rss_kb, rss_peak_kb, CpuMeter, Report, Tracker};
use crate::{Args, Outcome};

/// Publishes between write syscalls for QoS 0.
const QOS0_BATCH: u64 = 64;

/// Publisher id of the probe messages that check the path between two brokers (`--pub-addr`
/// / `--sub-addr`) before a run; subscribers ignore them.
const PROBE_ID: u32 = u32::MAX;

fn clean_err(e: &std::io::Error) -> String {
    e.to_string().replace(char::is_whitespace, "_")
}

pub struct SubResult {
    pub tracker: Tracker,
    pub first_rx: Option<Instant>,
    pub last_rx: Option<Instant>,
    pub err: Option<String>,
    pub timed_out: bool,
}

/// Reads PUBLISHes until every expected message arrived, or (once `done` is set) nothing came
/// for `drain`, or the deadline. Acknowledges QoS 1 deliveries in batches.
pub async fn sub_loop(
    mut c: Conn,
    mut t: Tracker,
    done: Arc<AtomicBool>,
    drain: Duration,
    deadline: Instant,
) -> SubResult {
    let mut r = SubResult { tracker: Tracker::new(vec![]), first_rx: None, last_rx: None, err: None, timed_out: false };
    let step = Duration::from_millis(100);
    let mut quiet_since = Instant::now();
    let res: std::io::Result<()> = async {
        loop {
            let mut got = false;
            while let Some((f, n)) = mqtt::frame(&c.rbuf)? {
                if f.kind == mqtt::PUBLISH {
                    let p = mqtt::parse_publish(f.flags, f.body, c.v5)?;
                    let stamp = p.stamp();
                    if stamp.is_none_or(|s| s.0 != PROBE_ID) {
                        t.record(stamp, p.retain);
                    }
                    if p.qos == 1 {
                        mqtt::puback(&mut c.wbuf, p.packet_id);
                    }
                    got = true;
                }
                c.rbuf.advance(n);
            }
            let now = Instant::now();
            if got {
                r.first_rx.get_or_insert(now);
                r.last_rx = Some(now);
                quiet_since = now;
            }
            c.flush(deadline).await?;
            if t.complete() {
                return Ok(());
            }
            if now >= deadline {
                r.timed_out = true;
                return Ok(());
            }
            if done.load(Ordering::Relaxed) && now.duration_since(quiet_since) >= drain {
                return Ok(());
            }
            if c.rbuf.capacity() - c.rbuf.len() < 16 * 1024 {
                c.rbuf.reserve(64 * 1024);
            }
            let wait = step.min(deadline.saturating_duration_since(now)).max(Duration::from_millis(1));
            match tokio::time::timeout(wait, tokio::io::AsyncReadExt::read_buf(&mut c.stream, &mut c.rbuf)).await {
                Ok(Ok(0)) => {
                    return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "broker closed the connection"))
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(e),
                Err(_) => {
                    if !done.load(Ordering::Relaxed) {
                        // Still publishing: quiet time only counts once the publishers are done.
                        quiet_since = Instant::now();
                    }
                }
            }
        }
    }
    .await;
    if let Err(e) = res {
        r.timed_out |= e.kind() == std::io::ErrorKind::TimedOut;
        r.err = Some(clean_err(&e));
    }
    r.tracker = t;
    tokio::spawn(c.close());
    r
}

pub struct PubResult {
    pub sent: u64,
    pub acked: u64,
    pub rejected: u64,
    pub finished: Instant,
    pub err: Option<String>,
    pub timed_out: bool,
}

pub struct PubSpec {
    pub id: u32,
    pub count: u64,
    pub qos: u8,
    pub window: usize,
    pub size: usize,
    /// Fixed topic, or for `retained_topics` the prefix of `PREFIX<seq>`.
    pub topic: Vec<u8>,
    pub retain: bool,
    pub retained_topics: bool,
}

/// Sends `count` stamped publishes. QoS 0: batches, then PINGREQ/PINGRESP so the broker has
/// provably read them all. QoS 1: at most `window` unacknowledged at a time.
pub async fn pub_loop(mut c: Conn, s: PubSpec, deadline: Instant) -> PubResult {
    let mut r = PubResult { sent: 0, acked: 0, rejected: 0, finished: Instant::now(), err: None, timed_out: false };
    let mut topic = s.topic.clone();
    let plen = topic.len();
    topic.reserve(24);
    let mut pid: u16 = 0;
    let res: std::io::Result<()> = async {
        if s.qos == 0 {
            while r.sent < s.count {
                let end = (r.sent + QOS0_BATCH).min(s.count);
                for seq in r.sent..end {
                    mqtt::publish(&mut c.wbuf, &topic, 0, s.retain, 0, c.v5, s.size, (s.id, seq, 0));
                }
                r.sent = end;
                c.flush(deadline).await?;
            }
            c.ping(deadline).await?;
            return Ok(());
        }
        let mut inflight = 0usize;
        while r.acked < s.count {
            while inflight < s.window && r.sent < s.count {
                pid = if pid == u16::MAX { 1 } else { pid + 1 };
                if s.retained_topics {
                    topic.truncate(plen);
                    let _ = write!(topic, "{}", r.sent);
                }
                mqtt::publish(&mut c.wbuf, &topic, 1, s.retain, pid, c.v5, s.size, (s.id, r.sent, 0));
                r.sent += 1;
                inflight += 1;
            }
            c.flush(deadline).await?;
            c.fill(deadline).await?;
            while let Some((f, n)) = mqtt::frame(&c.rbuf)? {
                if f.kind == mqtt::PUBACK {
                    if c.v5 && f.body.len() > 2 && f.body[2] >= 0x80 {
                        r.rejected += 1;
                    }
                    r.acked += 1;
                    inflight = inflight.saturating_sub(1);
                }
                c.rbuf.advance(n);
            }
        }
        Ok(())
    }
    .await;
    r.finished = Instant::now();
    if let Err(e) = res {
        r.timed_out = e.kind() == std::io::ErrorKind::TimedOut;
        r.err = Some(clean_err(&e));
    }
    tokio::spawn(c.close());
    r
}

/// Publishers and subscribers on two brokers (e.g. across a bridge): sends a QoS 0 probe
/// (publisher id `PROBE_ID`) from `p` on `topic` every 100 ms until one reaches `s`, so that
/// the run starts once the path is up. Probes that arrive later are ignored by `sub_loop`.
async fn await_path(p: &mut Conn, s: &mut Conn, topic: &[u8], size: usize, deadline: Instant) -> std::io::Result<f64> {
    let t0 = Instant::now();
    let limit = (t0 + Duration::from_secs(30)).min(deadline);
    for seq in 0u64.. {
        mqtt::publish(&mut p.wbuf, topic, 0, false, 0, p.v5, size, (PROBE_ID, seq, 0));
        p.flush(deadline).await?;
        let next = (Instant::now() + Duration::from_millis(100)).min(limit);
        loop {
            while let Some((f, n)) = mqtt::frame(&s.rbuf)? {
                let mut hit = false;
                if f.kind == mqtt::PUBLISH {
                    let v = mqtt::parse_publish(f.flags, f.body, s.v5)?;
                    if v.qos == 1 {
                        mqtt::puback(&mut s.wbuf, v.packet_id);
                    }
                    hit = v.stamp().is_some_and(|st| st.0 == PROBE_ID);
                }
                s.rbuf.advance(n);
                if hit {
                    s.flush(deadline).await?;
                    return Ok(t0.elapsed().as_secs_f64());
                }
            }
            s.flush(deadline).await?;
            if Instant::now() >= limit {
                return Err(mqtt::timed_out());
            }
            if tokio::time::timeout_at(next, s.fill(deadline)).await.is_err() {
                break;
            }
        }
    }
    unreachable!("the probe sequence is endless")
}

fn first_err<'a>(errs: impl Iterator<Item = &'a Option<String>>) -> Option<String> {
    errs.flatten().next().cloned()
}

/// fanin, fanout, durable, overload.
///
/// `overload` is fanin on `bench/+` with another verdict: it is meant for a broker at its
/// default configuration, where a flood larger than the subscriber's queue shows what the
/// broker does with it (drop, slow the publishers, grow). QoS 0 loss is the measurement, not
/// a failure; QoS 1 loss (acknowledged, never delivered) is reported as `lost_acked` and fails
/// the run, as do errors (e.g. the broker disconnecting the subscriber). With `--pid` it adds
/// the broker's RSS before the flood, at its peak (VmHWM, the whole process life) and at the end.
pub async fn throughput(a: &Args) -> Outcome {
    let deadline = Instant::now() + a.timeout;
    let (pubs, subs) = match a.scenario.as_str() {
        "fanout" => (1, a.subs),
        "fanin" | "durable" | "overload" => (a.pubs, 1),
        _ => unreachable!(),
    };
    let durable = a.scenario == "durable";
    let overload = a.scenario == "overload";
    let (filter, topic_of): (&str, fn(usize) -> String) = match a.scenario.as_str() {
        "fanout" => ("bench/o", |_| "bench/o".to_string()),
        "durable" => ("bench/d/+", |p| format!("bench/d/{p}")),
        "overload" => ("bench/+", |p| format!("bench/{p}")),
        _ => ("bench/f/+", |p| format!("bench/f/{p}")),
    };
    let per_pub = a.messages / pubs as u64;
    let mut rep = Report::new(&a.scenario);
    rep.kv("qos", a.qos).kv("pubs", pubs).kv("subs", subs).kv("size", a.size).kv("v", if a.v5 { "5" } else { "3.1.1" });
    if a.qos == 1 {
        rep.kv("window", a.window);
    }
    let fail = |mut rep: Report, what: &str, e: std::io::Error| {
        let code = if e.kind() == std::io::ErrorKind::TimedOut { 2 } else { 1 };
        rep.kv("error", format!("{what}:{}", clean_err(&e)));
        Outcome { lines: vec![rep.line()], code }
    };

    // Subscribers first, each confirmed by its SUBACK.
    let mut sub_conns = Vec::with_capacity(subs);
    for i in 0..subs {
        let id = if durable { "bench-durable-sub".to_string() } else { format!("bench-sub-{i}") };
        let o = ConnectOpts { client_id: &id, clean: !durable, keep_alive: 0, v5: a.v5, session_expiry: 3600 };
        let mut c = match Conn::open(&a.sub_eps[i % a.sub_eps.len()], &o, deadline).await {
            Ok(c) => c,
            Err(e) => return fail(rep, "subscriber_connect", e),
        };
        if durable {
            rep.kv("session_present", u8::from(c.session_present));
        }
        match c.subscribe(filter, a.qos, deadline).await {
            Ok(code) if code < 0x80 => {}
            Ok(code) => return fail(rep, "suback", mqtt::bad(&format!("refused_0x{code:02x}"))),
            Err(e) => return fail(rep, "subscribe", e),
        }
        sub_conns.push(c);
    }
    let mut pub_conns = Vec::with_capacity(pubs);
    for p in 0..pubs {
        let id = format!("bench-pub-{p}");
        let o = ConnectOpts { client_id: &id, clean: true, keep_alive: 0, v5: a.v5, session_expiry: 0 };
        match Conn::open(&a.pub_eps[p % a.pub_eps.len()], &o, deadline).await {
            Ok(c) => pub_conns.push(c),
            Err(e) => return fail(rep, "publisher_connect", e),
        }
    }
    if a.sub_eps.iter().chain(&a.pub_eps).any(|ep| ep.addr != a.pub_eps[0].addr) {
        // Several brokers: wait until a message gets from the first publisher to the first
        // subscriber on each subscriber address.
        let topic = topic_of(0).into_bytes();
        let mut slowest: f64 = 0.0;
        for j in 0..a.sub_eps.len().min(sub_conns.len()) {
            match await_path(&mut pub_conns[0], &mut sub_conns[j], &topic, a.size, deadline).await {
                Ok(secs) => slowest = slowest.max(secs),
                Err(e) => return fail(rep, "path_check", e),
            }
        }
        rep.f("path_ms", slowest * 1e3, 0);
    }

    let rss_start = if overload { a.pid.and_then(rss_kb) } else { None };
    let cpu = CpuMeter::start(a.pid).with_second(a.pid2);
    let done = Arc::new(AtomicBool::new(false));
    let t0 = Instant::now();
    let mut sub_tasks = Vec::new();
    for c in sub_conns {
        let t = Tracker::new(vec![per_pub; pubs]);
        sub_tasks.push(tokio::spawn(sub_loop(c, t, done.clone(), a.drain, deadline)));
    }
    let mut pub_tasks = Vec::new();
    for (p, c) in pub_conns.into_iter().enumerate() {
        let spec = PubSpec {
            id: p as u32,
            count: per_pub,
            qos: a.qos,
            window: a.window,
            size: a.size,
            topic: topic_of(p).into_bytes(),
            retain: false,
            retained_topics: false,
        };
        pub_tasks.push(tokio::spawn(pub_loop(c, spec, deadline)));
    }
    let mut pr = Vec::new();
    for t in pub_tasks {
        pr.push(t.await.expect("publisher task"));
    }
    done.store(true, Ordering::Relaxed);
    let mut sr = Vec::new();
    for t in sub_tasks {
        sr.push(t.await.expect("subscriber task"));
    }

    let sent: u64 = pr.iter().map(|r| r.sent).sum();
    let expected = sent * subs as u64;
    let distinct: u64 = sr.iter().map(|r| r.tracker.distinct()).sum();
    let dup: u64 = sr.iter().map(|r| r.tracker.dup).sum();
    let bad: u64 = sr.iter().map(|r| r.tracker.bad).sum();
    let lost = expected.saturating_sub(distinct);
    let last = sr.iter().filter_map(|r| r.last_rx).max();
    let secs = last.map(|l| l.duration_since(t0).as_secs_f64()).unwrap_or(0.0);
    let pub_secs = pr.iter().map(|r| r.finished.duration_since(t0).as_secs_f64()).fold(0.0, f64::max);
    let timed_out = sr.iter().any(|r| r.timed_out) || pr.iter().any(|r| r.timed_out);
    rep.kv("sent", sent).kv("expected", expected).kv("received", distinct).kv("lost", lost).kv("dup", dup);
    if bad > 0 {
        rep.kv("bad", bad);
    }
    if lost > 0 {
        // Where the loss starts helps tell a dropping queue from a lost batch.
        let per: Vec<u64> = pr.iter().map(|r| r.sent).collect();
        let (first, gaps) = sr.iter().fold((None, 0), |(f, g), r| {
            let (f2, g2) = r.tracker.first_missing(&per);
            (f.or(f2), g + g2)
        });
        if let Some((p, seq)) = first {
            rep.kv("first_lost", format!("pub{p}:seq{seq}")).kv("gaps", gaps);
        }
    }
    rep.f("secs", secs, 3)
        .f("rate", if secs > 0.0 { distinct as f64 / secs } else { 0.0 }, 0)
        .f("pub_secs", pub_secs, 3);
    let acked: u64 = pr.iter().map(|r| r.acked).sum();
    // Messages the broker acknowledged and never delivered (a publish that was sent but not
    // acknowledged when a publisher stopped on an error is not counted).
    let lost_acked = lost.saturating_sub(sent - acked.min(sent));
    if a.qos == 1 {
        let rejected: u64 = pr.iter().map(|r| r.rejected).sum();
        rep.kv("acked", acked);
        if rejected > 0 {
            rep.kv("rejected", rejected);
        }
    }
    if overload {
        rep.f("lost_pct", if expected > 0 { lost as f64 * 100.0 / expected as f64 } else { 0.0 }, 1);
        if a.qos == 1 {
            rep.kv("lost_acked", lost_acked);
        }
        rep.f("pub_rate", if pub_secs > 0.0 { sent as f64 / pub_secs } else { 0.0 }, 0);
        if let Some(pid) = a.pid {
            if let Some(r) = rss_start {
                rep.kv("rss_start_kb", r);
            }
            if let Some(r) = rss_peak_kb(pid) {
                rep.kv("rss_peak_kb", r);
            }
            if let Some(r) = rss_kb(pid) {
                rep.kv("rss_end_kb", r);
            }
        }
    }
    cpu.finish(&mut rep);
    rep.kv("timeout", u8::from(timed_out));
    let err = first_err(pr.iter().map(|r| &r.err).chain(sr.iter().map(|r| &r.err)));
    let errored = err.is_some();
    if let Some(e) = err {
        rep.kv("error", e);
    }
    let code = if timed_out {
        2
    } else if overload {
        // Loss at QoS 0 is what overload measures; everything else is still a failure.
        u8::from(lost_acked > 0 || dup > 0 || bad > 0 || errored || sent < per_pub * pubs as u64)
    } else if (a.qos >= 1 && lost > 0) || dup > 0 || bad > 0 || sent < per_pub * pubs as u64 {
        1
    } else {
        0
    };
    Outcome { lines: vec![rep.line()], code }
}

/// retained: store `messages` retained messages on `r/<i>` (QoS 1, windowed), then time a
/// new subscriber to `#` at QoS 1 until all have arrived.
pub async fn retained(a: &Args) -> Outcome {
    let deadline = Instant::now() + a.timeout;
    let n = a.messages;
    let mut rep = Report::new("retained");
    rep.kv("qos", 1).kv("size", a.size).kv("window", a.window).kv("v", if a.v5 { "5" } else { "3.1.1" });
    let fail = |mut rep: Report, what: &str, e: std::io::Error| {
        let code = if e.kind() == std::io::ErrorKind::TimedOut { 2 } else { 1 };
        rep.kv("error", format!("{what}:{}", clean_err(&e)));
        Outcome { lines: vec![rep.line()], code }
    };
    let cpu = CpuMeter::start(a.pid);
    let o = ConnectOpts { client_id: "bench-ret-pub", clean: true, keep_alive: 0, v5: a.v5, session_expiry: 0 };
    let c = match Conn::open(&a.ep, &o, deadline).await {
        Ok(c) => c,
        Err(e) => return fail(rep, "publisher_connect", e),
    };
    let t0 = Instant::now();
    let spec = PubSpec {
        id: 0,
        count: n,
        qos: 1,
        window: a.window,
        size: a.size,
        topic: b"r/".to_vec(),
        retain: true,
        retained_topics: true,
    };
    let pr = pub_loop(c, spec, deadline).await;
    let pub_secs = pr.finished.duration_since(t0).as_secs_f64();
    rep.kv("stored", pr.acked).f("pub_secs", pub_secs, 3).f("pub_rate", pr.acked as f64 / pub_secs.max(1e-9), 0);
    if let Some(e) = &pr.err {
        rep.kv("error", format!("publish:{e}")).kv("timeout", u8::from(pr.timed_out));
        cpu.finish(&mut rep);
        return Outcome { lines: vec![rep.line()], code: if pr.timed_out { 2 } else { 1 } };
    }

    let o = ConnectOpts { client_id: "bench-ret-sub", clean: true, keep_alive: 0, v5: a.v5, session_expiry: 0 };
    let mut c = match Conn::open(&a.ep, &o, deadline).await {
        Ok(c) => c,
        Err(e) => return fail(rep, "subscriber_connect", e),
    };
    // The SUBACK and the retained messages are read by the same loop (it skips the SUBACK).
    mqtt::subscribe(&mut c.wbuf, 1, "#", 1, a.v5);
    let t1 = Instant::now();
    if let Err(e) = c.flush(deadline).await {
        return fail(rep, "subscribe", e);
    }
    let done = Arc::new(AtomicBool::new(true));
    let sr = sub_loop(c, Tracker::new(vec![n]), done, a.drain, deadline).await;
    let t = &sr.tracker;
    let secs = sr.last_rx.map(|l| l.duration_since(t1).as_secs_f64()).unwrap_or(0.0);
    let lost = n - t.distinct().min(n);
    rep.kv("expected", n).kv("received", t.distinct()).kv("lost", lost).kv("dup", t.dup);
    if t.bad > 0 {
        rep.kv("bad", t.bad);
    }
    if lost > 0 {
        if let (Some((_, seq)), gaps) = t.first_missing(&[n]) {
            rep.kv("first_lost", format!("r/{seq}")).kv("gaps", gaps);
        }
    }
    rep.kv("retain_flag", t.retained);
    rep.f("first_ms", sr.first_rx.map(|f| f.duration_since(t1).as_secs_f64() * 1e3).unwrap_or(0.0), 1);
    rep.f("secs", secs, 3).f("rate", if secs > 0.0 { t.distinct() as f64 / secs } else { 0.0 }, 0);
    cpu.finish(&mut rep);
    rep.kv("timeout", u8::from(sr.timed_out));
    if let Some(e) = &sr.err {
        rep.kv("error", format!("subscriber:{e}"));
    }
    let code = if sr.timed_out {
        2
    } else if lost > 0 || t.dup > 0 || t.bad > 0 || sr.err.is_some() {
        1
    } else {
        0
    };
    Outcome { lines: vec![rep.line()], code }
}
