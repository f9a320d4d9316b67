//! conns: open many idle connections, each confirmed by its CONNACK; report the connection
//! rate and, with `--pid`, the broker's RSS growth per connection. With `--subscribe` each
//! connection is an idle device: it also subscribes to `dev/<i>/cmd` at QoS 1 and waits for
//! its SUBACK (which must grant it) before it counts as open.

use std::time::Duration;

use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::mqtt::{bad, Conn, ConnectOpts};
use crate::stats::{nofile_limit, quantile, rss_kb, CpuMeter, Report};
use crate::{Args, Outcome};

pub async fn run(a: &Args) -> Outcome {
    let mut rep = Report::new("conns");
    rep.kv("conns", a.conns)
        .kv("keepalive", a.keepalive)
        .kv("subscribe", u8::from(a.subscribe))
        .kv("concurrency", a.concurrency)
        .kv("v", if a.v5 { "5" } else { "3.1.1" });
    let need = a.conns as u64 + 64;
    match nofile_limit() {
        Some(l) if l < need => {
            rep.kv("error", format!("open-file_limit_{l}_below_{need}:_run_`ulimit_-n_{}`_first", need + 1000));
            return Outcome { lines: vec![rep.line()], code: 1 };
        }
        _ => {}
    }
    let deadline = Instant::now() + a.timeout;
    let rss0 = a.pid.and_then(rss_kb);
    let cpu = CpuMeter::start(a.pid);
    let t0 = Instant::now();
    let mut set = JoinSet::new();
    let workers = a.concurrency.min(a.conns.max(1));
    for w in 0..workers {
        let (ep, v5, ka, sub) = (a.ep.clone(), a.v5, a.keepalive, a.subscribe);
        let mine: Vec<usize> = (w..a.conns).step_by(workers).collect();
        set.spawn(async move {
            let mut held = Vec::with_capacity(mine.len());
            let mut lat = Vec::with_capacity(mine.len());
            for i in mine {
                let started = Instant::now();
                let id = format!("bench-idle-{i}");
                let o = ConnectOpts { client_id: &id, clean: true, keep_alive: ka, v5, session_expiry: 0 };
                let opened = async {
                    let mut c = Conn::open(&ep, &o, deadline).await?;
                    if sub {
                        let code = c.subscribe(&format!("dev/{i}/cmd"), 1, deadline).await?;
                        if code >= 0x80 {
                            return Err(bad(&format!("SUBACK refused with code 0x{code:02x}")));
                        }
                    }
                    Ok(c)
                };
                match opened.await {
                    Ok(mut c) => {
                        // Idle from here on: give the buffers back so only the socket remains.
                        c.rbuf = Default::default();
                        c.wbuf = Default::default();
                        held.push(c);
                        lat.push(started.elapsed().as_micros() as u64);
                    }
                    Err(e) => return (held, lat, Some(e)),
                }
            }
            (held, lat, None)
        });
    }
    let mut held = Vec::with_capacity(a.conns);
    let mut lat = Vec::with_capacity(a.conns);
    let mut err = None;
    while let Some(r) = set.join_next().await {
        let (h, l, e) = r.expect("connect worker");
        held.extend(h);
        lat.extend(l);
        if err.is_none() {
            err = e;
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    rep.kv("opened", held.len()).f("secs", secs, 3).f("conn_rate", held.len() as f64 / secs.max(1e-9), 0);
    // Connect → CONNACK (with --subscribe: → SUBACK) per connection, with `--concurrency` of them under way at once.
    lat.sort_unstable();
    rep.kv("connack_p50_us", quantile(&lat, 0.5))
        .kv("connack_p99_us", quantile(&lat, 0.99))
        .kv("connack_max_us", lat.last().copied().unwrap_or(0));
    // Let the broker settle (allocators, lazily created state) before reading its RSS.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    if let (Some(pid), Some(r0)) = (a.pid, rss0) {
        if let Some(r1) = rss_kb(pid) {
            rep.kv("rss_before_kb", r0).kv("rss_after_kb", r1);
            let per = (r1 as f64 - r0 as f64) * 1024.0 / held.len().max(1) as f64;
            rep.f("bytes_per_conn", per, 0);
        }
    }
    // Are they all still there? A broker that dropped idle connections would show up here.
    let mut closed = 0;
    for c in &held {
        let mut b = [0u8; 1];
        // For TLS this peeks under the TLS layer; the connections are not used again.
        if let Ok(0) = c.stream.tcp().try_read(&mut b) {
            closed += 1;
        }
    }
    rep.kv("closed_by_broker", closed);
    cpu.finish(&mut rep);
    let timed_out = err.as_ref().is_some_and(|e| e.kind() == std::io::ErrorKind::TimedOut);
    rep.kv("timeout", u8::from(timed_out));
    if let Some(e) = &err {
        rep.kv("error", e.to_string().replace(char::is_whitespace, "_"));
    }
    let code = if timed_out {
        2
    } else if err.is_some() || held.len() < a.conns || closed > 0 {
        1
    } else {
        0
    };
    drop(held);
    Outcome { lines: vec![rep.line()], code }
}
