//! TCP specifics: deferred accept, reading a client's first bytes without a trip through the
//! event loop, and sizing the process's descriptor table before connections arrive.

use std::io::Read;
use std::os::fd::AsRawFd;

use bytes::BytesMut;
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info};

/// Bytes offered to a new connection's first read: a typical CONNECT fits.
const FIRST_READ: usize = 1024;

/// Asks the kernel to hand over connections only once the client has sent something
/// (TCP_DEFER_ACCEPT), for at most `secs`. MQTT clients always speak first (CONNECT), so
/// an accepted socket usually has its CONNECT waiting; a client that never sends anything
/// never costs a task.
#[allow(unsafe_code)]
pub fn defer_accept(listener: &TcpListener, secs: u64) {
    let value = libc::c_int::try_from(secs.clamp(1, 3600)).unwrap_or(10);
    // SAFETY: setsockopt reads exactly `optlen` bytes from `optval`, which points to a live
    // c_int on this stack frame of that size; the descriptor is owned by `listener`, which
    // outlives the call. No memory is written.
    let r = unsafe {
        libc::setsockopt(
            listener.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_DEFER_ACCEPT,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r != 0 {
        // Only an optimisation: connections work the same without it.
        debug!(error = %std::io::Error::last_os_error(), "TCP_DEFER_ACCEPT not available");
    }
}

/// The client's first bytes, read straight from the socket. tokio learns that a new socket
/// is readable only from its next poll of the kernel; with deferred accept the CONNECT is
/// usually already here, and reading it now saves that round.
pub fn early_read(stream: &TcpStream) -> BytesMut {
    let mut buf = BytesMut::zeroed(FIRST_READ);
    let sock = socket2::SockRef::from(stream);
    match (&*sock).read(&mut buf) {
        Ok(n) => buf.truncate(n),
        // WouldBlock (nothing yet) or an error the next read will report again.
        Err(_) => buf.clear(),
    }
    buf
}

/// Makes room for `connections` sockets before any thread but the caller's exists: raises
/// the soft open-file limit towards the hard one, and grows the descriptor table once.
///
/// Why: Linux grows a process's descriptor table by doubling, and in a multi-threaded
/// process each growth waits for an RCU grace period (`expand_files` → `synchronize_rcu`),
/// 8-20 ms during which `accept` blocks the whole runtime thread. Growing it here, while
/// the process has one thread, costs nothing; measured, it removed stalls at 128, 256 …
/// 8192 connections that held 64 connecting clients for 8-20 ms each.
#[allow(unsafe_code)]
pub fn prepare_descriptors(connections: usize) {
    // Sockets, plus listeners, the store's files and stdio.
    let wanted = (connections as u64).saturating_add(256);
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes one `rlimit` into the struct we pass, which is live and of
    // the right type.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return;
    }
    if lim.rlim_cur < wanted && lim.rlim_max > lim.rlim_cur {
        let raised = libc::rlimit { rlim_cur: wanted.min(lim.rlim_max), rlim_max: lim.rlim_max };
        // SAFETY: setrlimit only reads the struct we pass.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            lim.rlim_cur = raised.rlim_cur;
        }
    }
    if lim.rlim_cur < wanted {
        info!(
            limit = lim.rlim_cur,
            "the open-file limit allows fewer connections than limits.max_connections; `ulimit -n` raises it"
        );
    }
    // The table only needs to cover what the limit allows; past 64k entries, the few
    // doublings left cost less than the memory of a huge table up front.
    let top = wanted.min(lim.rlim_cur).min(65_536);
    let Ok(top) = libc::c_int::try_from(top.saturating_sub(1)) else { return };
    if top < 64 {
        return;
    }
    // SAFETY: F_DUPFD duplicates descriptor 2 (stderr, or nothing: then it fails and we stop)
    // to the lowest free number >= `top`, which makes the kernel size the table to cover
    // `top`. The new descriptor is ours alone and closed at once; no Rust object owns it.
    let fd = unsafe { libc::fcntl(2, libc::F_DUPFD_CLOEXEC, top) };
    if fd >= 0 {
        // SAFETY: `fd` was just created above and nothing else refers to it.
        unsafe { libc::close(fd) };
    }
}
