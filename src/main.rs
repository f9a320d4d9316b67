//! The `tern` binary: parse `-c FILE`, set up logging, run until SIGINT or SIGTERM.

use std::path::PathBuf;
use std::process::ExitCode;

use tern::Config;
use tracing::{error, info};

/// jemalloc rather than glibc's malloc, measured with `bench/`: an idle connection costs
/// 1,550 B of RSS instead of 1,760-1,960 B (glibc's per-thread arenas keep the holes left by
/// each connection's short-lived handshake allocations, differently for each arrival
/// pattern), and fan-in/fan-out QoS 1 run 10-25 % faster. mimalloc was tried: 1,900-2,100 B.
#[cfg(feature = "jemalloc")]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn usage() -> &'static str {
    "usage: tern [-c|--config FILE]\n       tern passwd [-c] [-b] [-D] [--scram] FILE USER [PASSWORD]\n\nWith no FILE, the embedded default config is used (listen on 127.0.0.1:1883, data in ./data).\nEnvironment variables TERN__SECTION__KEY override keys, e.g. TERN__LIMITS__MAX_INFLIGHT=128.\nRUST_LOG sets the log filter (default: info).\nSIGHUP reads the password file, the ACL file and TLS certificates again.\n`tern passwd` writes a password file entry (argon2id; --scram for SCRAM-SHA-256), like mosquitto_passwd."
}

fn main() -> ExitCode {
    let all: Vec<String> = std::env::args().skip(1).collect();
    if all.first().map(String::as_str) == Some("passwd") {
        return match tern::auth::password::passwd_command(&all[1..]) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("tern passwd: {e}");
                ExitCode::from(2)
            }
        };
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
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("tern: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let handle = match tern::start(config).await {
            Ok(h) => h,
            Err(e) => {
                error!("{e}");
                return ExitCode::FAILURE;
            }
        };
        info!("tern {} ready", env!("CARGO_PKG_VERSION"));
        let store_failed = tokio::select! {
            () = wait_for_signal(&handle) => false,
            e = handle.failed() => {
                error!("exiting: the store failed ({e}); restart tern to recover what was committed");
                true
            }
        };
        info!("shutting down");
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
    })
}

/// Exit status when the store failed (sysexits.h EX_IOERR): at run time (the storage engine
/// refuses writes, the commit thread died) or in the final sync at shutdown.
const EX_IOERR: u8 = 74;

/// The longest a shutdown may take before the process exits anyway.
const SHUTDOWN_LIMIT: std::time::Duration = std::time::Duration::from_secs(30);

/// Returns on SIGINT or SIGTERM; on SIGHUP reloads passwords, ACLs and certificates.
async fn wait_for_signal(handle: &tern::BrokerHandle) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut hup)) = (signal(SignalKind::terminate()), signal(SignalKind::hangup())) else {
            let _ = tokio::signal::ctrl_c().await;
            return;
        };
        loop {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => return,
                _ = term.recv() => return,
                _ = hup.recv() => match handle.reload().await {
                    Ok(()) => info!("reloaded password file, ACL file and certificates"),
                    Err(errors) => {
                        for e in errors {
                            error!("reload failed, previous state kept: {e}");
                        }
                    }
                },
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = handle;
        let _ = tokio::signal::ctrl_c().await;
    }
}
