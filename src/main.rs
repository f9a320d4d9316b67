//! The `tern` binary: parse `-c FILE`, set up logging, run until SIGINT or SIGTERM, telling
//! systemd how it goes (`systemd`). `tern check-config` runs start-up's checks and stops
//! before the store; `tern passwd` edits password files.

mod systemd;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use tern::store::LoadProgress;
use tern::{BrokerHandle, Config, Extensions, StartError};
use tracing::{error, info};

use systemd::Notifier;

/// jemalloc rather than glibc's malloc, measured with `bench/`: an idle connection costs
/// 1,550 B of RSS instead of 1,760-1,960 B (glibc's per-thread arenas keep the holes left by
/// each connection's short-lived handshake allocations, differently for each arrival
/// pattern), and fan-in/fan-out QoS 1 run 10-25 % faster. mimalloc was tried: 1,900-2,100 B.
#[cfg(feature = "jemalloc")]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn usage() -> &'static str {
    "usage: tern [-c|--config FILE]\n       tern check-config [FILE]\n       tern passwd [-c] [-b] [-D] [--scram] FILE USER [PASSWORD]\n\nWith no FILE, the embedded default config is used (listen on 127.0.0.1:1883, data in ./data).\n`tern check-config` checks FILE and every file it names (TLS certificates and keys, password and ACL files) as start-up would, without opening the store or binding ports; exit status 0 if tern would start with it, 1 if not.\nEnvironment variables TERN__SECTION__KEY override keys, e.g. TERN__LIMITS__MAX_INFLIGHT=128.\nRUST_LOG sets the log filter (default: info).\nSIGHUP reads the password file, the ACL file and TLS certificates again.\n`tern passwd` writes a password file entry (argon2id; --scram for SCRAM-SHA-256), like mosquitto_passwd."
}

fn main() -> ExitCode {
    let all: Vec<String> = std::env::args().skip(1).collect();
    match all.first().map(String::as_str) {
        Some("passwd") => {
            return match tern::auth::password::passwd_command(&all[1..]) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("tern passwd: {e}");
                    ExitCode::from(2)
                }
            }
        }
        Some("check-config") => return check_config(&all[1..]),
        _ => {}
    }
    let mut args = all.into_iter();
    let mut file: Option<PathBuf> = None;
    while let Some(a) = args.next() {
        match a.as_str() {
            "-c" | "--config" => match args.next() {
                Some(f) => file = Some(PathBuf::from(f)),
                None => {
                    eprintln!("tern: -c needs a file name\n\n{}", usage());
                    return ExitCode::from(2);
                }
            },
            "-h" | "--help" => {
                println!("{}", usage());
                return ExitCode::SUCCESS;
            }
            "-V" | "--version" => {
                println!("tern {}", env!("CARGO_PKG_VERSION"));
                return ExitCode::SUCCESS;
            }
            other => {
                eprintln!("tern: unknown argument `{other}`\n\n{}", usage());
                return ExitCode::from(2);
            }
        }
    }
    init_logging();
    let config = match Config::load(file.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("tern: configuration error: {e}");
            return ExitCode::from(78);
        }
    };
    // Before the runtime starts its threads: see prepare_descriptors.
    tern::transport::tcp::prepare_descriptors(config.limits.max_connections);
    tern::transport::os::private_files();
    let runtime = match tern::server::runtime() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("tern: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let origin = origin(file.as_deref());
    runtime.block_on(serve(config, origin))
}

/// Runs the broker until a signal or a store failure, and shuts it down.
async fn serve(config: Config, origin: String) -> ExitCode {
    let notifier = Notifier::from_env();
    notifier.start_watchdog();
    notifier.status(format!("recovering state from {}", config.storage.dir.display())).await;
    let progress = Arc::new(LoadProgress::default());
    let ext = Extensions { recovery_progress: Some(Arc::clone(&progress)), ..Extensions::default() };
    let handle = match notifier.while_starting(tern::start_with(config, ext), &progress).await {
        Ok(h) => h,
        Err(e) => {
            let e = in_file(&origin, &e);
            error!("{e}");
            notifier.status(format!("failed to start: {e}")).await;
            return ExitCode::FAILURE;
        }
    };
    let signals = Signals::catch();
    info!("tern {} ready", env!("CARGO_PKG_VERSION"));
    notifier.ready(ready_status(&handle)).await;
    let store_failed = tokio::select! {
        () = signals.wait(&handle, &notifier) => false,
        e = handle.failed() => {
            error!("exiting: the store failed ({e}); restart tern to recover what was committed");
            true
        }
    };
    info!("shutting down");
    notifier.stopping(if store_failed { "stopping: the store failed" } else { "stopping" }.into()).await;
    // Bounded: connections get a few seconds, and a store hung in a sync does not keep a
    // supervisor from restarting us.
    match tokio::time::timeout(SHUTDOWN_LIMIT, handle.shutdown()).await {
        Ok(Ok(())) if !store_failed => ExitCode::SUCCESS,
        Ok(Ok(())) => ExitCode::from(EX_IOERR),
        Ok(Err(e)) => {
            error!("not everything was written to the store: {e}");
            ExitCode::from(EX_IOERR)
        }
        Err(_) => {
            error!("shutdown did not finish within {SHUTDOWN_LIMIT:?}; the store may not be synced");
            ExitCode::from(EX_IOERR)
        }
    }
}

/// systemd's status line once tern is serving, e.g. "ready: 127.0.0.1:1883; recovered 2
/// sessions, 40 queued and 3 retained messages in 0.2 s".
fn ready_status(handle: &BrokerHandle) -> String {
    let addrs: Vec<String> = handle.local_addrs().iter().map(ToString::to_string).collect();
    let r = handle.recovery();
    format!(
        "ready: {}; recovered {} sessions, {} queued and {} retained messages in {:.1} s",
        addrs.join(", "),
        r.sessions,
        r.queued,
        r.retained,
        r.took.as_secs_f64()
    )
}

/// `tern check-config [FILE]`: loads FILE as `tern -c FILE` does (defaults, the file, then
/// `TERN__…` variables, then validation) and reads every file it names, with start-up's own
/// code; stops before the store and the ports.
fn check_config(args: &[String]) -> ExitCode {
    let file = match args {
        [] => None,
        [h] if h == "-h" || h == "--help" => {
            println!("{}", usage());
            return ExitCode::SUCCESS;
        }
        [f] if !f.starts_with('-') => Some(PathBuf::from(f)),
        _ => {
            eprintln!("tern check-config: expected at most one FILE\n\n{}", usage());
            return ExitCode::from(2);
        }
    };
    // Loading the files may log (a password file's warnings): on stderr, as when tern starts.
    init_logging();
    let origin = origin(file.as_deref());
    let config = match Config::load(file.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("tern check-config: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Err(e) = tern::server::check(&config, &origin) {
        eprintln!("tern check-config: {}", in_file(&origin, &e));
        return ExitCode::FAILURE;
    }
    println!("{origin}: OK");
    println!("{}", summary(&config));
    ExitCode::SUCCESS
}

/// How errors and `check-config` name the configuration.
fn origin(file: Option<&Path>) -> String {
    file.map_or_else(|| "embedded default config".to_string(), |p| p.display().to_string())
}

/// A start-up error with the configuration file it comes from: every one names a key of
/// that file (configuration errors name the file already).
fn in_file(origin: &str, e: &StartError) -> String {
    match e {
        StartError::Config(_) => e.to_string(),
        _ => format!("{origin}: {e}"),
    }
}

/// One line saying what tern would run: listeners, store, authentication, bridges.
fn summary(c: &Config) -> String {
    let listeners: Vec<String> = c.listener.iter().map(|l| format!("{} {}", l.kind.name(), l.bind)).collect();
    let durability = match c.storage.durability {
        tern::config::Durability::Sync => "sync",
        tern::config::Durability::Periodic => "periodic",
        tern::config::Durability::None => "none",
    };
    let mut auth = Vec::new();
    if let Some(p) = &c.auth.password_file {
        auth.push(format!("password file {}", p.display()));
    }
    if let Some(p) = &c.auth.acl_file {
        auth.push(format!("ACL file {}", p.display()));
    }
    auth.push(if c.anonymous_allowed() { "anonymous clients allowed" } else { "no anonymous clients" }.to_string());
    let bridges: Vec<&str> = c.bridge.iter().map(|b| b.name.as_str()).collect();
    format!(
        "listeners: {}; storage dir: {} (durability {durability}); auth: {}; bridges: {}",
        listeners.join(", "),
        c.storage.dir.display(),
        auth.join(", "),
        if bridges.is_empty() { "none".to_string() } else { bridges.join(", ") }
    )
}

fn init_logging() {
    // Quiet by default: tern's own info lines (one per connect/disconnect), the storage
    // engine's only when something is wrong, rustls's only for errors (it warns once per
    // connection of clients that send an IP address as the TLS server name, as
    // mosquitto_pub -h 127.0.0.1 does). Logs go to stderr, coloured only on a terminal.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,fjall=warn,lsm_tree=warn,rustls=error"));
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr()) && std::env::var_os("NO_COLOR").is_none();
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(colour)
        .with_writer(std::io::stderr)
        .init();
}

/// Exit status when the store failed (sysexits.h EX_IOERR): at run time (the storage engine
/// refuses writes, the commit thread died) or in the final sync at shutdown.
const EX_IOERR: u8 = 74;

/// The longest a shutdown may take before the process exits anyway.
const SHUTDOWN_LIMIT: std::time::Duration = std::time::Duration::from_secs(30);

/// SIGINT and SIGTERM (stop) and SIGHUP (reload), handled by tern from the moment this is
/// made instead of by their default action, which ends the process at once. Made before
/// READY=1 is sent: a supervisor may stop tern the moment it is ready, and that must be a clean
/// shutdown. (Before then, during recovery, the default action stands: the store is
/// crash-safe and there is nothing to flush.)
struct Signals {
    #[cfg(unix)]
    unix: Option<[tokio::signal::unix::Signal; 3]>,
}

impl Signals {
    fn catch() -> Signals {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            let caught =
                (signal(SignalKind::interrupt()), signal(SignalKind::terminate()), signal(SignalKind::hangup()));
            let unix = match caught {
                (Ok(int), Ok(term), Ok(hup)) => Some([int, term, hup]),
                _ => None,
            };
            Signals { unix }
        }
        #[cfg(not(unix))]
        Signals {}
    }

    /// Returns on SIGINT or SIGTERM; on SIGHUP reloads passwords, ACLs and certificates.
    async fn wait(self, handle: &BrokerHandle, notifier: &Notifier) {
        #[cfg(unix)]
        if let Some([mut int, mut term, mut hup]) = self.unix {
            loop {
                tokio::select! {
                    _ = int.recv() => return,
                    _ = term.recv() => return,
                    _ = hup.recv() => reload(handle, notifier).await,
                }
            }
        }
        let _ = (handle, notifier);
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// SIGHUP: the password file, the ACL file and the certificates again, with systemd told
/// (RELOADING=1, then READY=1 with how it went).
async fn reload(handle: &BrokerHandle, notifier: &Notifier) {
    notifier.reloading().await;
    let status = match handle.reload().await {
        Ok(()) => {
            info!("reloaded password file, ACL file and certificates");
            ready_status(handle)
        }
        Err(errors) => {
            for e in &errors {
                error!("reload failed, previous state kept: {e}");
            }
            format!("reload failed, previous state kept: {}", errors.join("; "))
        }
    };
    notifier.ready(status).await;
}
