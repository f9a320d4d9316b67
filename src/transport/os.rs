//! Process-wide operating-system settings the broker's files and sockets rely on.

/// Makes every file and directory the process creates from now on private to its user
/// (umask 077): the store holds other people's messages, and fjall creates its files with
/// the default mode.
#[allow(unsafe_code)]
pub fn private_files() {
    // SAFETY: umask only replaces the process's file-creation mask and cannot fail; it
    // touches no memory of ours.
    unsafe {
        libc::umask(0o077);
    }
}
