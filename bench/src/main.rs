//! `tern-bench`: a small, bounded MQTT load generator for comparing brokers.
//!
//! Every scenario is bounded in message count and wall time, checks per-publisher sequence
//! numbers for loss and duplication, and prints one line of `key=value` figures. Exit status:
//! 0 = clean, 1 = loss (QoS >= 1), duplicates or an error, 2 = hard timeout, 64 = bad usage.
//! See bench/README.md.

mod conns;
mod flow;
mod handshakes;
mod latency;
mod mqtt;
mod net;
mod stats;

use std::net::ToSocketAddrs;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

const USAGE: &str = "usage: tern-bench SCENARIO [options]

scenarios:
  fanin     N publishers -> 1 subscriber on a wildcard (rate = messages received/s)
  overload  fanin's flood (publishers as fast as they can) to 1 subscriber on `bench/+`, meant
            for a broker at its default configuration: loss is measured, not a failure at
            QoS 0; with --pid the broker's peak and final RSS
  fanout    1 publisher -> M subscribers (rate = deliveries/s)
  latency   open-loop Poisson arrivals at --rate for --secs (or --sweep R1,R2,...)
  conns     open --conns idle connections; connection rate and broker RSS per connection
            (--subscribe: each also subscribes to dev/<i>/cmd at QoS 1, like an idle device)
  handshakes  open and close --conns connections, --concurrency at a time: connections/s
            (TCP connect + TLS handshake with --tls-ca + CONNECT/CONNACK + DISCONNECT)
  retained  publish --messages retained messages, then time a new `#` QoS 1 subscriber
  durable   QoS 1 fan-in to a persistent-session (clean session false) QoS 1 subscriber

options (defaults in brackets):
  --host H [127.0.0.1]   --port P [1883]     --v5 (MQTT 5.0; default 3.1.1)
  --qos 0|1 [0; retained and durable always 1]
  --pubs N [fanin/overload/durable 8]   --subs M [fanout 16]
  --messages N  total publishes [fanin, overload 400000, fanout 50000, retained 100000,
                durable 200000]
  --size B [64] payload bytes (min 20)   --window W [64] unacked QoS 1 publishes per publisher
  --rate R [2000] msg/s   --secs S [10]   --sweep R1,R2,...   (latency)
  --conns N [conns 10000, handshakes 2000]  --keepalive S [0]  --subscribe (conns)
  --concurrency C [conns 64, handshakes 32]
  --tls-ca FILE  connect with TLS, trusting the CA certificate(s) in this PEM file (every
                 scenario; without it plain TCP)
  --tls-server-name NAME [localhost]  name the broker's certificate must be valid for
  --tls-resume   allow TLS session resumption (default: off, every handshake is a full one)
  --pid PID  broker process: its CPU (and for conns and overload its RSS) is reported
  --pub-addr H:P[,H:P...]  --sub-addr H:P[,H:P...]  fanin/fanout/overload/durable/latency:
             publishers connect to one broker, subscribers to another (default: both to
             --host/--port), e.g. across a bridge or between cluster nodes; with a list,
             publisher/subscriber i takes address i modulo its length. fanin/fanout start once a
             probe message got from the first publisher to a subscriber on each address
  --pid2 PID  a second broker process (with --sub-addr: the subscribers'): broker2_cpu
  --timeout S [60] hard limit on the run   --drain-ms MS [2000] QoS 0 quiet time before giving up";

#[derive(Clone, Debug)]
pub struct Args {
    pub scenario: String,
    /// The broker's address and, with `--tls-ca`, the TLS client settings.
    pub ep: net::Endpoint,
    /// Where publishers and subscribers connect: `ep`, unless `--pub-addr` / `--sub-addr`
    /// split them between brokers (across a bridge, or the nodes of a cluster: publisher or
    /// subscriber i takes address i modulo the list's length).
    pub pub_eps: Vec<net::Endpoint>,
    pub sub_eps: Vec<net::Endpoint>,
    pub v5: bool,
    pub qos: u8,
    pub pubs: usize,
    pub subs: usize,
    pub messages: u64,
    pub size: usize,
    pub window: usize,
    pub rate: f64,
    pub secs: f64,
    pub sweep: Vec<f64>,
    pub conns: usize,
    pub keepalive: u16,
    /// conns: subscribe each connection to `dev/<i>/cmd` (QoS 1) after its CONNACK.
    pub subscribe: bool,
    pub concurrency: usize,
    pub pid: Option<u32>,
    /// A second broker (the subscribers' with `--sub-addr`): its CPU is reported too.
    pub pid2: Option<u32>,
    pub timeout: Duration,
    pub drain: Duration,
}

fn num<T: std::str::FromStr>(k: &str, v: &str) -> Result<T, String> {
    v.parse().map_err(|_| format!("bad value `{v}` for {k}"))
}

fn parse_args() -> Result<Args, String> {
    let mut it = std::env::args().skip(1);
    let scenario = it.next().ok_or("missing SCENARIO")?;
    if scenario == "-h" || scenario == "--help" {
        return Err(String::new());
    }
    let (def_pubs, def_subs, def_msgs) = match scenario.as_str() {
        "fanin" | "overload" => (8, 1, 400_000),
        "fanout" => (1, 16, 50_000),
        "retained" => (1, 1, 100_000),
        "durable" => (8, 1, 200_000),
        "latency" | "conns" | "handshakes" => (1, 1, 0),
        other => return Err(format!("unknown scenario `{other}`")),
    };
    let (def_conns, def_concurrency) = if scenario == "handshakes" { (2_000, 32) } else { (10_000, 64) };
    let mut host = "127.0.0.1".to_string();
    let mut port: u16 = 1883;
    let mut tls_ca: Option<PathBuf> = None;
    let mut tls_name = "localhost".to_string();
    let mut tls_resume = false;
    let (mut pub_addr, mut sub_addr): (Option<String>, Option<String>) = (None, None);
    let mut a = Args {
        scenario,
        ep: net::Endpoint { addr: "127.0.0.1:1883".parse().unwrap(), tls: None },
        pub_eps: Vec::new(),
        sub_eps: Vec::new(),
        v5: false,
        qos: 0,
        pubs: def_pubs,
        subs: def_subs,
        messages: def_msgs,
        size: 64,
        window: 64,
        rate: 2000.0,
        secs: 10.0,
        sweep: Vec::new(),
        conns: def_conns,
        keepalive: 0,
        subscribe: false,
        concurrency: def_concurrency,
        pid: None,
        pid2: None,
        timeout: Duration::from_secs(60),
        drain: Duration::from_millis(2000),
    };
    while let Some(k) = it.next() {
        if k == "--v5" {
            a.v5 = true;
            continue;
        }
        if k == "--tls-resume" {
            tls_resume = true;
            continue;
        }
        if k == "--subscribe" {
            a.subscribe = true;
            continue;
        }
        let v = it.next().ok_or_else(|| format!("{k} needs a value"))?;
        match k.as_str() {
            "--host" => host = v.clone(),
            "--port" => port = num(&k, &v)?,
            "--qos" => a.qos = num(&k, &v)?,
            "--pubs" => a.pubs = num(&k, &v)?,
            "--subs" => a.subs = num(&k, &v)?,
            "--messages" => a.messages = num(&k, &v)?,
            "--size" => a.size = num(&k, &v)?,
            "--window" => a.window = num(&k, &v)?,
            "--rate" => a.rate = num(&k, &v)?,
            "--secs" => a.secs = num(&k, &v)?,
            "--sweep" => a.sweep = v.split(',').map(|s| num(&k, s.trim())).collect::<Result<_, _>>()?,
            "--conns" => a.conns = num(&k, &v)?,
            "--keepalive" => a.keepalive = num(&k, &v)?,
            "--concurrency" => a.concurrency = num(&k, &v)?,
            "--pid" => a.pid = Some(num(&k, &v)?),
            "--pid2" => a.pid2 = Some(num(&k, &v)?),
            "--pub-addr" => pub_addr = Some(v),
            "--sub-addr" => sub_addr = Some(v),
            "--timeout" => a.timeout = Duration::from_secs_f64(num::<f64>(&k, &v)?),
            "--drain-ms" => a.drain = Duration::from_millis(num(&k, &v)?),
            "--tls-ca" => tls_ca = Some(PathBuf::from(v)),
            "--tls-server-name" => tls_name = v,
            _ => return Err(format!("unknown option `{k}`")),
        }
    }
    if a.qos > 1 {
        return Err("--qos must be 0 or 1".into());
    }
    if a.scenario == "retained" || a.scenario == "durable" {
        a.qos = 1;
    }
    if a.pubs == 0 || a.subs == 0 || a.window == 0 || a.window > 60_000 || a.concurrency == 0 {
        return Err("--pubs, --subs, --window (<= 60000) and --concurrency must be positive".into());
    }
    if a.size < mqtt::STAMP_LEN {
        return Err(format!("--size must be at least {}", mqtt::STAMP_LEN));
    }
    if a.rate <= 0.0 || a.secs <= 0.0 || a.sweep.iter().any(|&r| r <= 0.0) {
        return Err("--rate, --secs and --sweep rates must be positive".into());
    }
    a.ep.addr = (host.as_str(), port)
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {host}:{port}: {e}"))?
        .next()
        .ok_or_else(|| format!("{host} has no address"))?;
    if let Some(ca) = &tls_ca {
        a.ep.tls = Some(net::TlsClient::new(ca, &tls_name, tls_resume)?);
    }
    let resolve = |k: &str, list: &Option<String>| -> Result<Vec<net::Endpoint>, String> {
        let Some(list) = list else { return Ok(vec![a.ep.clone()]) };
        list.split(',')
            .map(|hp| {
                let mut ep = a.ep.clone();
                ep.addr = hp
                    .to_socket_addrs()
                    .map_err(|e| format!("{k} {hp}: {e}"))?
                    .next()
                    .ok_or_else(|| format!("{k} {hp}: no address"))?;
                Ok(ep)
            })
            .collect()
    };
    a.pub_eps = resolve("--pub-addr", &pub_addr)?;
    a.sub_eps = resolve("--sub-addr", &sub_addr)?;
    Ok(a)
}

/// What a scenario hands back: its output lines and exit status.
pub struct Outcome {
    pub lines: Vec<String>,
    pub code: u8,
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("tern-bench: {e}\n");
            }
            eprintln!("{USAGE}");
            return ExitCode::from(64);
        }
    };
    // The load generator shares the machine's cores with the broker: one thread does all
    // socket work (the latency scenario uses two plain threads for exact timing instead).
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("tern-bench: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // The scenarios stop themselves at `--timeout`; this is the backstop if one hangs anyway.
    let backstop = args.timeout * args.sweep.len().max(1) as u32 + Duration::from_secs(15);
    let a = args.clone();
    let res = rt.block_on(async move {
        tokio::time::timeout(backstop, async move {
            match a.scenario.as_str() {
                "fanin" | "fanout" | "durable" | "overload" => flow::throughput(&a).await,
                "retained" => flow::retained(&a).await,
                "conns" => conns::run(&a).await,
                "handshakes" => handshakes::run(&a).await,
                "latency" => {
                    let a2 = a.clone();
                    tokio::task::spawn_blocking(move || latency::run(&a2)).await.unwrap_or_else(|e| Outcome {
                        lines: vec![format!("scenario=latency error=panic:{e}")],
                        code: 1,
                    })
                }
                _ => unreachable!(),
            }
        })
        .await
    });
    let out = res.unwrap_or_else(|_| Outcome {
        lines: vec![format!(
            "scenario={} timeout=1 error=backstop_timeout_after_{}s",
            args.scenario,
            backstop.as_secs()
        )],
        code: 2,
    });
    for l in &out.lines {
        println!("{l}");
    }
    // Don't wait for lingering sockets/tasks: the result is printed.
    std::process::exit(i32::from(out.code));
}
