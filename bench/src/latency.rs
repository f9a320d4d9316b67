//! latency: open-loop Poisson arrivals. The schedule of *intended* send times is drawn up
//! front; each payload carries its intended time (ns since the run's start) and the subscriber
//! measures intended time -> receipt, so a sender or broker that falls behind shows up in the
//! figures instead of silently slowing the offered load (no coordinated omission).
//!
//! Runs on two plain threads with blocking sockets (publisher sleeps precisely between sends,
//! subscriber blocks in read) rather than on the async runtime, whose timer has 1 ms
//! granularity. With `--tls-ca` the sockets are blocking rustls streams; a TLS stream cannot be
//! read on a second thread, so at QoS 1 the publisher reads its PUBACKs itself after each
//! write (non-blocking) instead of on the PUBACK thread used for TCP.

use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};

use crate::mqtt;
use crate::net::{self, SyncStream};
use crate::stats::{quantile, CpuMeter, Report, Tracker};
use crate::{Args, Outcome};

const TOPIC: &str = "bench/lat";
/// Where probes go when publisher and subscriber are on different brokers (`await_path`).
const PROBE_TOPIC: &str = "bench/lat-probe";

/// xorshift64*: a tiny deterministic generator (no crate needed for exponential gaps).
struct Rng(u64);

impl Rng {
    fn unit(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let x = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D);
        // (0, 1]
        ((x >> 11) as f64 + 1.0) / (1u64 << 53) as f64
    }
}

/// Intended send times in ns: a Poisson process at `rate`/s over `secs`.
fn schedule(rate: f64, secs: f64, seed: u64) -> Vec<u64> {
    let mut rng = Rng(seed | 1);
    let mut t = 0.0f64;
    let mut v = Vec::with_capacity((rate * secs * 1.1) as usize + 16);
    loop {
        t += -rng.unit().ln() / rate;
        if t >= secs {
            return v;
        }
        v.push((t * 1e9) as u64);
    }
}

struct SyncConn {
    s: SyncStream,
    rbuf: BytesMut,
    wbuf: BytesMut,
    scratch: Vec<u8>,
}

impl SyncConn {
    fn open(a: &Args, ep: &net::Endpoint, id: &str, deadline: Instant) -> io::Result<SyncConn> {
        let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
        let s = SyncStream::connect(ep, left)?;
        s.tcp().set_read_timeout(Some(Duration::from_millis(100)))?;
        let mut c = SyncConn {
            s,
            rbuf: BytesMut::with_capacity(256 * 1024),
            wbuf: BytesMut::with_capacity(16 * 1024),
            scratch: vec![0; 128 * 1024],
        };
        mqtt::connect(&mut c.wbuf, id, true, 0, a.v5, 0);
        c.flush()?;
        let f = c.expect(mqtt::CONNACK, deadline)?;
        if f.get(1) != Some(&0) {
            return Err(mqtt::bad("CONNACK refused"));
        }
        Ok(c)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.s.write_all(&self.wbuf)?;
        self.s.flush()?;
        self.wbuf.clear();
        Ok(())
    }

    /// TLS publisher at QoS 1: reads what has arrived without blocking and counts the PUBACKs.
    fn drain_acks(&mut self) -> io::Result<u64> {
        self.s.tcp().set_nonblocking(true)?;
        let mut acks = 0;
        let r = loop {
            match self.s.read(&mut self.scratch) {
                Ok(0) => break Err(io::Error::new(io::ErrorKind::UnexpectedEof, "broker closed the connection")),
                Ok(n) => self.rbuf.extend_from_slice(&self.scratch[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break Ok(()),
                Err(e) => break Err(e),
            }
            while let Some((f, k)) = mqtt::frame(&self.rbuf)? {
                if f.kind == mqtt::PUBACK {
                    acks += 1;
                }
                self.rbuf.advance(k);
            }
        };
        self.s.tcp().set_nonblocking(false)?;
        r.map(|()| acks)
    }

    /// Reads whatever is available (up to the read timeout); Ok(false) on timeout.
    fn fill(&mut self) -> io::Result<bool> {
        match self.s.read(&mut self.scratch) {
            Ok(0) => Err(io::Error::new(io::ErrorKind::UnexpectedEof, "broker closed the connection")),
            Ok(n) => {
                self.rbuf.extend_from_slice(&self.scratch[..n]);
                Ok(true)
            }
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Waits for a packet of `kind` and returns its body.
    fn expect(&mut self, kind: u8, deadline: Instant) -> io::Result<Vec<u8>> {
        loop {
            if let Some((f, n)) = mqtt::frame(&self.rbuf)? {
                if f.kind != kind {
                    return Err(mqtt::bad(&format!("expected packet type {kind}, got {}", f.kind)));
                }
                let body = f.body.to_vec();
                self.rbuf.advance(n);
                return Ok(body);
            }
            if Instant::now() >= deadline {
                return Err(mqtt::timed_out());
            }
            self.fill()?;
        }
    }
}

/// Across brokers (a bridge, the nodes of a cluster) a new subscription takes a while to reach
/// the publisher's broker: a QoS 0 probe every 100 ms on a topic of its own until one gets
/// through, so that the run measures the path and not its set-up.
fn await_path(sub: &mut SyncConn, publ: &mut SyncConn, a: &Args, deadline: Instant) -> io::Result<f64> {
    let t0 = Instant::now();
    mqtt::subscribe(&mut sub.wbuf, 2, PROBE_TOPIC, 0, a.v5);
    sub.flush()?;
    sub.expect(mqtt::SUBACK, deadline)?;
    loop {
        mqtt::publish(&mut publ.wbuf, PROBE_TOPIC.as_bytes(), 0, false, 0, a.v5, a.size, (u32::MAX, 0, 0));
        publ.flush()?;
        let next = (Instant::now() + Duration::from_millis(100)).min(deadline);
        match sub.expect(mqtt::PUBLISH, next) {
            Ok(_) => return Ok(t0.elapsed().as_secs_f64()),
            Err(e) if e.kind() == io::ErrorKind::TimedOut && Instant::now() < deadline => {}
            Err(e) => return Err(e),
        }
    }
}

pub fn run(a: &Args) -> Outcome {
    let rates = if a.sweep.is_empty() { vec![a.rate] } else { a.sweep.clone() };
    let mut code = 0;
    for (i, &rate) in rates.iter().enumerate() {
        if i > 0 {
            thread::sleep(Duration::from_millis(500));
        }
        let (line, c) = one_rate(a, rate, i as u64);
        // Print as we go so a long sweep shows progress; main prints nothing more for us.
        println!("{line}");
        code = code.max(c);
    }
    Outcome { lines: Vec::new(), code }
}

struct SubOut {
    /// Latency (intended send time -> receipt) by sequence number; u64::MAX = not received.
    lat_ns: Vec<u64>,
    tracker: Tracker,
    timed_out: bool,
    err: Option<String>,
}

fn one_rate(a: &Args, rate: f64, run: u64) -> (String, u8) {
    let mut rep = Report::new("latency");
    rep.kv("qos", a.qos)
        .kv("rate", rate)
        .f("secs", a.secs, 1)
        .kv("size", a.size)
        .kv("v", if a.v5 { "5" } else { "3.1.1" });
    let deadline = Instant::now() + a.timeout;
    let sched = Arc::new(schedule(rate, a.secs, 0x9E37_79B9_7F4A_7C15 ^ (rate as u64) ^ (run << 32)));
    let n = sched.len() as u64;
    let fail = |mut rep: Report, what: &str, e: io::Error| {
        rep.kv("error", format!("{what}:{}", e.to_string().replace(char::is_whitespace, "_")));
        (rep.line(), if e.kind() == io::ErrorKind::TimedOut { 2 } else { 1 })
    };
    let mut sub = match SyncConn::open(a, &a.sub_eps[0], &format!("bench-lat-sub-{run}"), deadline) {
        Ok(c) => c,
        Err(e) => return fail(rep, "subscriber_connect", e),
    };
    mqtt::subscribe(&mut sub.wbuf, 1, TOPIC, a.qos, a.v5);
    if let Err(e) = sub.flush() {
        return fail(rep, "subscribe", e);
    }
    match sub.expect(mqtt::SUBACK, deadline) {
        Ok(b) if b.last().is_some_and(|&c| c < 0x80) => {}
        Ok(_) => return fail(rep, "suback", mqtt::bad("refused")),
        Err(e) => return fail(rep, "subscribe", e),
    }
    let mut publ = match SyncConn::open(a, &a.pub_eps[0], &format!("bench-lat-pub-{run}"), deadline) {
        Ok(c) => c,
        Err(e) => return fail(rep, "publisher_connect", e),
    };

    if a.sub_eps[0].addr != a.pub_eps[0].addr {
        match await_path(&mut sub, &mut publ, a, deadline) {
            Ok(secs) => {
                rep.f("path_ms", secs * 1e3, 0);
            }
            Err(e) => return fail(rep, "path_check", e),
        }
    }

    let cpu = CpuMeter::start(a.pid);
    let done = Arc::new(AtomicBool::new(false));
    let base = Instant::now();
    let (v5, qos, size, drain) = (a.v5, a.qos, a.size, a.drain);

    let sub_done = done.clone();
    let sub_thread = thread::spawn(move || {
        let mut o =
            SubOut { lat_ns: vec![u64::MAX; n as usize], tracker: Tracker::new(vec![n]), timed_out: false, err: None };
        let mut quiet_since = Instant::now();
        let r: io::Result<()> = (|| loop {
            let got = sub.fill()?;
            let now = Instant::now();
            let now_ns = now.duration_since(base).as_nanos() as u64;
            while let Some((f, len)) = mqtt::frame(&sub.rbuf)? {
                if f.kind == mqtt::PUBLISH {
                    let p = mqtt::parse_publish(f.flags, f.body, v5)?;
                    let st = p.stamp();
                    match st {
                        // A late probe of `await_path`.
                        Some((u32::MAX, _, _)) => {}
                        Some((_, seq, t)) => {
                            if let Some(slot) = o.lat_ns.get_mut(seq as usize) {
                                *slot = now_ns.saturating_sub(t);
                            }
                            o.tracker.record(st, p.retain);
                        }
                        None => o.tracker.record(st, p.retain),
                    }
                    if p.qos == 1 {
                        mqtt::puback(&mut sub.wbuf, p.packet_id);
                    }
                }
                sub.rbuf.advance(len);
            }
            if !sub.wbuf.is_empty() {
                sub.flush()?;
            }
            if got || !sub_done.load(Ordering::Relaxed) {
                quiet_since = now;
            }
            if o.tracker.complete() || now.duration_since(quiet_since) >= drain {
                return Ok(());
            }
            if now >= deadline {
                o.timed_out = true;
                return Ok(());
            }
        })();
        if let Err(e) = r {
            o.timed_out |= e.kind() == io::ErrorKind::TimedOut;
            o.err = Some(e.to_string().replace(char::is_whitespace, "_"));
        }
        o
    });

    // QoS 1: drain the PUBACKs on a second handle so the broker never blocks writing them.
    let acks = Arc::new(AtomicU64::new(0));
    let ack_thread = if qos == 1 && !publ.s.is_tls() {
        let mut rd = match publ.s.tcp().try_clone() {
            Ok(s) => s,
            Err(e) => return fail(rep, "clone", e),
        };
        let (acks, done) = (acks.clone(), done.clone());
        Some(thread::spawn(move || {
            let mut buf = BytesMut::with_capacity(64 * 1024);
            let mut scratch = vec![0u8; 64 * 1024];
            loop {
                match rd.read(&mut scratch) {
                    Ok(0) => return,
                    Ok(k) => buf.extend_from_slice(&scratch[..k]),
                    Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                        if done.load(Ordering::Relaxed) {
                            return;
                        }
                    }
                    Err(_) => return,
                }
                while let Ok(Some((f, k))) = mqtt::frame(&buf) {
                    if f.kind == mqtt::PUBACK {
                        acks.fetch_add(1, Ordering::Relaxed);
                    }
                    buf.advance(k);
                }
            }
        }))
    } else {
        None
    };

    // The publisher: this thread.
    let mut lag_ns: Vec<u64> = Vec::with_capacity(sched.len());
    let mut pid: u16 = 0;
    let mut i = 0usize;
    let mut pub_err = None;
    let mut pub_timeout = false;
    while i < sched.len() {
        let now = base.elapsed().as_nanos() as u64;
        let next = sched[i];
        if next > now {
            thread::sleep(Duration::from_nanos(next - now));
            continue;
        }
        while i < sched.len() && sched[i] <= now {
            pid = if pid == u16::MAX { 1 } else { pid + 1 };
            mqtt::publish(&mut publ.wbuf, TOPIC.as_bytes(), qos, false, pid, v5, size, (0, i as u64, sched[i]));
            lag_ns.push(now - sched[i]);
            i += 1;
        }
        if let Err(e) = publ.flush() {
            pub_err = Some(e.to_string().replace(char::is_whitespace, "_"));
            break;
        }
        if qos == 1 && ack_thread.is_none() {
            match publ.drain_acks() {
                Ok(n) => {
                    acks.fetch_add(n, Ordering::Relaxed);
                }
                Err(e) => {
                    pub_err = Some(e.to_string().replace(char::is_whitespace, "_"));
                    break;
                }
            }
        }
        if Instant::now() >= deadline {
            pub_timeout = true;
            break;
        }
    }
    let pub_end = base.elapsed().as_secs_f64();
    done.store(true, Ordering::Relaxed);
    let so = sub_thread.join().expect("subscriber thread");
    if let Some(t) = ack_thread {
        let _ = t.join();
    } else if qos == 1 && pub_err.is_none() {
        // TLS: the PUBACKs that arrived after the last write.
        if let Ok(n) = publ.drain_acks() {
            acks.fetch_add(n, Ordering::Relaxed);
        }
    }
    mqtt::disconnect(&mut publ.wbuf);
    let _ = publ.flush();

    let sent = i as u64;
    // `net`: from the moment the publish was actually handed to the socket (intended time plus
    // the generator's own lateness), i.e. the broker's and network's share alone.
    let mut net: Vec<u64> =
        so.lat_ns.iter().zip(&lag_ns).filter(|(l, _)| **l != u64::MAX).map(|(l, g)| l.saturating_sub(*g)).collect();
    let mut lat: Vec<u64> = so.lat_ns.into_iter().filter(|&l| l != u64::MAX).collect();
    lat.sort_unstable();
    net.sort_unstable();
    lag_ns.sort_unstable();
    let us = |ns: u64| ns as f64 / 1e3;
    let lost = sent.saturating_sub(so.tracker.distinct());
    rep.kv("sent", sent).kv("received", so.tracker.distinct()).kv("lost", lost).kv("dup", so.tracker.dup);
    rep.f("achieved_rate", sent as f64 / pub_end.max(1e-9), 0);
    rep.f("p50_us", us(quantile(&lat, 0.50)), 0)
        .f("p90_us", us(quantile(&lat, 0.90)), 0)
        .f("p99_us", us(quantile(&lat, 0.99)), 0)
        .f("p999_us", us(quantile(&lat, 0.999)), 0)
        .f("max_us", us(lat.last().copied().unwrap_or(0)), 0);
    let mean = if lat.is_empty() { 0.0 } else { lat.iter().map(|&x| x as f64).sum::<f64>() / lat.len() as f64 };
    rep.f("mean_us", mean / 1e3, 0);
    rep.f("net_p50_us", us(quantile(&net, 0.50)), 0).f("net_p99_us", us(quantile(&net, 0.99)), 0).f(
        "net_max_us",
        us(net.last().copied().unwrap_or(0)),
        0,
    );
    rep.f("send_lag_p99_us", us(quantile(&lag_ns, 0.99)), 0).f(
        "send_lag_max_us",
        us(lag_ns.last().copied().unwrap_or(0)),
        0,
    );
    if qos == 1 {
        rep.kv("acked", acks.load(Ordering::Relaxed));
    }
    cpu.finish(&mut rep);
    let timed_out = so.timed_out || pub_timeout;
    rep.kv("timeout", u8::from(timed_out));
    if let Some(e) = pub_err.or(so.err) {
        rep.kv("error", e);
    }
    let code = if timed_out {
        2
    } else if (qos >= 1 && lost > 0) || so.tracker.dup > 0 || so.tracker.bad > 0 {
        1
    } else {
        0
    };
    (rep.line(), code)
}
