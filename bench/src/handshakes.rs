//! handshakes: new connections per second. `--concurrency` workers each open a connection
//! (TCP connect, TLS handshake with `--tls-ca`, CONNECT, CONNACK), send DISCONNECT, close it,
//! and start the next one, until `--conns` connections have been made.

use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::mqtt::{Conn, ConnectOpts};
use crate::stats::{quantile, CpuMeter, Report};
use crate::{Args, Outcome};

pub async fn run(a: &Args) -> Outcome {
    let mut rep = Report::new("handshakes");
    rep.kv("tls", u8::from(a.ep.tls.is_some()))
        .kv("conns", a.conns)
        .kv("concurrency", a.concurrency)
        .kv("v", if a.v5 { "5" } else { "3.1.1" });
    let deadline = Instant::now() + a.timeout;
    let cpu = CpuMeter::start(a.pid);
    let t0 = Instant::now();
    let mut set = JoinSet::new();
    let workers = a.concurrency.min(a.conns.max(1));
    for w in 0..workers {
        let (ep, v5) = (a.ep.clone(), a.v5);
        let mine: Vec<usize> = (w..a.conns).step_by(workers).collect();
        set.spawn(async move {
            let mut lat = Vec::with_capacity(mine.len());
            let mut info = None;
            let mut resumed = 0usize;
            for i in mine {
                let started = Instant::now();
                let id = format!("bench-hs-{i}");
                let o = ConnectOpts { client_id: &id, clean: true, keep_alive: 0, v5, session_expiry: 0 };
                match Conn::open(&ep, &o, deadline).await {
                    Ok(c) => {
                        lat.push(started.elapsed().as_micros() as u64);
                        if info.is_none() {
                            info = c.stream.tls_info();
                        }
                        resumed += usize::from(c.stream.tls_resumed());
                        c.close().await;
                    }
                    Err(e) => return (lat, info, resumed, Some(e)),
                }
            }
            (lat, info, resumed, None)
        });
    }
    let mut lat = Vec::with_capacity(a.conns);
    let mut info = None;
    let mut resumed = 0;
    let mut err = None;
    while let Some(r) = set.join_next().await {
        let (l, i, n, e) = r.expect("handshake worker");
        lat.extend(l);
        resumed += n;
        info = info.or(i);
        if err.is_none() {
            err = e;
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    if let Some(i) = info {
        rep.kv("tls_negotiated", i).kv("resumed", resumed);
    }
    rep.kv("made", lat.len()).f("secs", secs, 3).f("conn_rate", lat.len() as f64 / secs.max(1e-9), 0);
    // Connect → CONNACK per connection (TLS handshake included), `--concurrency` at once.
    lat.sort_unstable();
    rep.kv("connack_p50_us", quantile(&lat, 0.5))
        .kv("connack_p99_us", quantile(&lat, 0.99))
        .kv("connack_max_us", lat.last().copied().unwrap_or(0));
    cpu.finish(&mut rep);
    let timed_out = err.as_ref().is_some_and(|e| e.kind() == std::io::ErrorKind::TimedOut);
    rep.kv("timeout", u8::from(timed_out));
    if let Some(e) = &err {
        rep.kv("error", e.to_string().replace(char::is_whitespace, "_"));
    }
    let code = if timed_out {
        2
    } else if err.is_some() || lat.len() < a.conns {
        1
    } else {
        0
    };
    Outcome { lines: vec![rep.line()], code }
}
