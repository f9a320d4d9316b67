//! Password files in mosquitto's format (`user:hash` lines), checking CONNECT passwords against
//! them, and editing them for `tern passwd`.
//!
//! Owns the hash schemes a line may use (mosquitto's `$7$` PBKDF2-SHA512 and `$6$` SHA-512,
//! argon2 PHC strings, RFC 5803 SCRAM-SHA-256 entries) and the SCRAM key derivation those
//! entries share with the SCRAM method. Knows nothing of connections, sessions or when a file is
//! reloaded: it parses text, answers whether a password matches, and hands out SCRAM secrets.

use std::collections::HashMap;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use argon2::{Argon2, PasswordHash, PasswordHasher, PasswordVerifier};
use base64::prelude::{Engine, BASE64_STANDARD};
use ring::rand::{SecureRandom, SystemRandom};
use sha2::{Digest, Sha256, Sha512};
use subtle::ConstantTimeEq;

use super::AuthFileError;

/// What `tern passwd --scram` uses, and RFC 7677's minimum.
pub const DEFAULT_SCRAM_ITERATIONS: u32 = 4096;

const SCRAM_PREFIX: &str = "SCRAM-SHA-256$";

/// A user's SCRAM-SHA-256 verifier (RFC 5802 section 3): enough to run an exchange, not enough
/// to recover the password.
#[derive(Clone, PartialEq, Eq)]
pub struct ScramSecrets {
    pub iterations: u32,
    pub salt: Vec<u8>,
    pub stored_key: [u8; 32],
    pub server_key: [u8; 32],
}

impl ScramSecrets {
    /// Derives the verifier a password yields under this salt and iteration count.
    pub fn derive(password: &[u8], salt: &[u8], iterations: u32) -> ScramSecrets {
        let salted = pbkdf2::pbkdf2_hmac_array::<Sha256, 32>(password, salt, iterations);
        let client_key = hmac_sha256(&salted, b"Client Key");
        ScramSecrets {
            iterations,
            salt: salt.to_vec(),
            stored_key: sha256(&client_key),
            server_key: hmac_sha256(&salted, b"Server Key"),
        }
    }

    /// The entry's hash field: `SCRAM-SHA-256$ITER:SALT$STOREDKEY:SERVERKEY`.
    pub fn to_entry(&self) -> String {
        format!(
            "{SCRAM_PREFIX}{}:{}${}:{}",
            self.iterations,
            BASE64_STANDARD.encode(&self.salt),
            BASE64_STANDARD.encode(self.stored_key),
            BASE64_STANDARD.encode(self.server_key)
        )
    }
}

// The keys let whoever holds them impersonate the server: keep them out of logs.
impl fmt::Debug for ScramSecrets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ScramSecrets").field("iterations", &self.iterations).finish_non_exhaustive()
    }
}

pub(crate) fn hmac_sha256(key: &[u8], data: &[u8]) -> [u8; 32] {
    // ring's HMAC cannot fail, unlike the hmac crate's `new_from_slice`, so no error arm that
    // could never run.
    let tag = ring::hmac::sign(&ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key), data);
    let mut out = [0u8; 32];
    out.copy_from_slice(tag.as_ref());
    out
}

pub(crate) fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

pub(crate) fn random_bytes<const N: usize>() -> Result<[u8; N], ring::error::Unspecified> {
    let mut out = [0u8; N];
    SystemRandom::new().fill(&mut out)?;
    Ok(out)
}

#[derive(Clone)]
enum Hash {
    /// mosquitto 2.x `$7$`: PBKDF2-HMAC-SHA512, 64-byte output.
    Pbkdf2Sha512 {
        iterations: u32,
        salt: Vec<u8>,
        hash: [u8; 64],
    },
    /// mosquitto 1.x `$6$`: one SHA-512 over password then salt.
    Sha512 {
        salt: Vec<u8>,
        hash: [u8; 64],
    },
    Argon2(PasswordHash),
    Scram(ScramSecrets),
}

/// Entries that cost the same to check; the dummy for unknown users is picked by this.
#[derive(PartialEq, Eq)]
enum Cost {
    Pbkdf2(u32),
    Sha512,
    Argon2(String),
    Scram(u32),
}

impl Hash {
    fn matches(&self, password: &[u8]) -> bool {
        match self {
            Hash::Pbkdf2Sha512 { iterations, salt, hash } => {
                let mut out = [0u8; 64];
                pbkdf2::pbkdf2_hmac::<Sha512>(password, salt, *iterations, &mut out);
                out.ct_eq(hash).into()
            }
            Hash::Sha512 { salt, hash } => {
                let out: [u8; 64] = Sha512::new().chain_update(password).chain_update(salt).finalize().into();
                out.ct_eq(hash).into()
            }
            // The crate compares outputs in constant time.
            Hash::Argon2(phc) => Argon2::default().verify_password(password, phc).is_ok(),
            Hash::Scram(s) => {
                let derived = ScramSecrets::derive(password, &s.salt, s.iterations);
                derived.stored_key.ct_eq(&s.stored_key).into()
            }
        }
    }

    fn cost(&self) -> Cost {
        match self {
            Hash::Pbkdf2Sha512 { iterations, .. } => Cost::Pbkdf2(*iterations),
            Hash::Sha512 { .. } => Cost::Sha512,
            Hash::Argon2(phc) => Cost::Argon2(format!("{}${:?}${}", phc.algorithm, phc.version, phc.params)),
            Hash::Scram(s) => Cost::Scram(s.iterations),
        }
    }
}

/// A parsed password file. Holds no plain text; every entry is checked by its own scheme.
pub struct PasswordFile {
    users: HashMap<String, Hash>,
    /// A copy of an entry using the file's most common scheme and parameters: checking an
    /// unknown user against it makes "no such user" cost what "wrong password" costs.
    dummy: Option<Hash>,
}

impl fmt::Debug for PasswordFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PasswordFile").field("users", &self.users.len()).finish_non_exhaustive()
    }
}

impl PasswordFile {
    /// Parses a whole file; `origin` names it in errors. Any bad line refuses the file.
    pub fn parse(text: &str, origin: &str) -> Result<PasswordFile, AuthFileError> {
        let error = |line: usize, message: String| AuthFileError::Line { origin: origin.to_owned(), line, message };
        let mut users: HashMap<String, (usize, Hash)> = HashMap::new();
        // (cost, how many entries share it, first entry with it) in file order, so ties go to
        // the earliest and the choice does not depend on hashing order.
        let mut costs: Vec<(Cost, usize, Hash)> = Vec::new();
        for (index, raw) in text.split('\n').enumerate() {
            let number = index + 1;
            let line = raw.strip_suffix('\r').unwrap_or(raw);
            if line.trim().is_empty() || line.starts_with('#') {
                continue;
            }
            let Some((user, hash_text)) = line.split_once(':') else {
                return Err(error(number, "no `:` between user name and password hash".into()));
            };
            if user.is_empty() {
                return Err(error(number, "empty user name".into()));
            }
            // mosquitto tolerates trailing blanks after the hash; a hash never contains one.
            let hash = parse_hash(hash_text.trim_end_matches([' ', '\t'])).map_err(|m| error(number, m))?;
            if let Some((first, _)) = users.get(user) {
                return Err(error(number, format!("user `{user}` is already defined on line {first}")));
            }
            let cost = hash.cost();
            match costs.iter_mut().find(|(c, _, _)| *c == cost) {
                Some((_, count, _)) => *count += 1,
                None => costs.push((cost, 1, hash.clone())),
            }
            users.insert(user.to_owned(), (number, hash));
        }
        let mut dummy: Option<(usize, Hash)> = None;
        for (_, count, hash) in costs {
            if dummy.as_ref().is_none_or(|(best, _)| count > *best) {
                dummy = Some((count, hash));
            }
        }
        Ok(PasswordFile {
            users: users.into_iter().map(|(user, (_, hash))| (user, hash)).collect(),
            dummy: dummy.map(|(_, hash)| hash),
        })
    }

    /// Reads and parses the file at `path`. Blocking.
    pub fn load(path: &Path) -> Result<PasswordFile, AuthFileError> {
        let text = fs::read_to_string(path).map_err(|source| AuthFileError::Io { path: path.to_owned(), source })?;
        PasswordFile::parse(&text, &path.display().to_string())
    }

    pub fn len(&self) -> usize {
        self.users.len()
    }

    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    pub fn contains(&self, username: &str) -> bool {
        self.users.contains_key(username)
    }

    /// Whether `password` is `username`'s. Blocking and deliberately slow (up to tens of
    /// milliseconds for argon2): run it off the async workers. An unknown user costs the same
    /// as a wrong password, checked against an entry with the file's most common parameters.
    pub fn verify(&self, username: &str, password: &[u8]) -> bool {
        match self.users.get(username) {
            Some(hash) => hash.matches(password),
            None => {
                if let Some(dummy) = &self.dummy {
                    // The dummy is a real user's entry: the work must be done, its answer never
                    // used.
                    std::hint::black_box(dummy.matches(std::hint::black_box(password)));
                }
                false
            }
        }
    }

    /// The SCRAM verifier of `username`, when their entry is a SCRAM-SHA-256 one.
    pub fn scram(&self, username: &str) -> Option<ScramSecrets> {
        match self.users.get(username) {
            Some(Hash::Scram(s)) => Some(s.clone()),
            _ => None,
        }
    }

    /// The iteration count most SCRAM entries use, so that a made-up answer for an unknown
    /// user looks like the real ones.
    pub fn common_scram_iterations(&self) -> Option<u32> {
        let mut counts: HashMap<u32, usize> = HashMap::new();
        for hash in self.users.values() {
            if let Hash::Scram(s) = hash {
                *counts.entry(s.iterations).or_default() += 1;
            }
        }
        // Ties go to the larger count of iterations, so the answer does not depend on map order.
        counts.into_iter().max_by_key(|&(iterations, n)| (n, iterations)).map(|(iterations, _)| iterations)
    }
}

fn parse_hash(text: &str) -> Result<Hash, String> {
    if let Some(rest) = text.strip_prefix("$7$") {
        let mut parts = rest.split('$');
        let (Some(iterations), Some(salt), Some(hash), None) = (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err("`$7$` hash must be `$7$ITERATIONS$SALT$HASH`".into());
        };
        let iterations = parse_iterations(iterations)?;
        let salt = decode_salt(salt)?;
        let hash = decode_fixed::<64>(hash, "hash")?;
        Ok(Hash::Pbkdf2Sha512 { iterations, salt, hash })
    } else if let Some(rest) = text.strip_prefix("$6$") {
        let mut parts = rest.split('$');
        let (Some(salt), Some(hash), None) = (parts.next(), parts.next(), parts.next()) else {
            return Err("`$6$` hash must be `$6$SALT$HASH`".into());
        };
        let salt = decode_salt(salt)?;
        let hash = decode_fixed::<64>(hash, "hash")?;
        Ok(Hash::Sha512 { salt, hash })
    } else if text.starts_with("$argon2") {
        parse_argon2(text).map(Hash::Argon2)
    } else if let Some(rest) = text.strip_prefix(SCRAM_PREFIX) {
        parse_scram(rest).map(Hash::Scram)
    } else if text.starts_with('$') {
        // The scheme id is not secret; the rest of the line may be.
        let scheme = text.split('$').nth(1).unwrap_or_default();
        Err(format!("unknown password hash scheme `${scheme}$`"))
    } else {
        Err("not a hashed password: hash it with `tern passwd` or `mosquitto_passwd -U`".into())
    }
}

fn parse_argon2(text: &str) -> Result<PasswordHash, String> {
    let phc = PasswordHash::new(text).map_err(|e| format!("bad argon2 hash: {e}"))?;
    argon2::Algorithm::new(phc.algorithm.as_str()).map_err(|e| format!("bad argon2 hash: {e}"))?;
    if let Some(version) = phc.version {
        argon2::Version::try_from(version).map_err(|e| format!("bad argon2 hash: {e}"))?;
    }
    argon2::Params::try_from(&phc).map_err(|e| format!("bad argon2 parameters: {e}"))?;
    if phc.salt.is_none() || phc.hash.is_none() {
        return Err("bad argon2 hash: no salt or no hash".into());
    }
    Ok(phc)
}

fn parse_scram(rest: &str) -> Result<ScramSecrets, String> {
    const SHAPE: &str = "SCRAM-SHA-256 entry must be `SCRAM-SHA-256$ITERATIONS:SALT$STOREDKEY:SERVERKEY`";
    let Some((params, keys)) = rest.split_once('$') else { return Err(SHAPE.into()) };
    let (Some((iterations, salt)), Some((stored_key, server_key))) = (params.split_once(':'), keys.split_once(':'))
    else {
        return Err(SHAPE.into());
    };
    Ok(ScramSecrets {
        iterations: parse_iterations(iterations)?,
        salt: decode_salt(salt)?,
        stored_key: decode_fixed::<32>(stored_key, "stored key")?,
        server_key: decode_fixed::<32>(server_key, "server key")?,
    })
}

fn parse_iterations(text: &str) -> Result<u32, String> {
    match text.parse::<u32>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(format!("bad iteration count `{text}`")),
    }
}

fn decode_salt(text: &str) -> Result<Vec<u8>, String> {
    let salt = BASE64_STANDARD.decode(text).map_err(|e| format!("bad base64 in salt: {e}"))?;
    if salt.is_empty() {
        return Err("empty salt".into());
    }
    Ok(salt)
}

fn decode_fixed<const N: usize>(text: &str, what: &str) -> Result<[u8; N], String> {
    let bytes = BASE64_STANDARD.decode(text).map_err(|e| format!("bad base64 in {what}: {e}"))?;
    <[u8; N]>::try_from(bytes.as_slice()).map_err(|_| format!("{what} is {} bytes, expected {N}", bytes.len()))
}

/// Panicking forms of the hash functions, for tests only.
#[cfg(test)]
pub(crate) fn hash_argon2id(password: &[u8]) -> String {
    try_hash_argon2id(password).unwrap_or_else(|e| panic!("{e}"))
}

#[cfg(test)]
pub(crate) fn hash_scram_sha256(password: &[u8], iterations: u32) -> String {
    try_hash_scram_sha256(password, iterations).unwrap_or_else(|e| panic!("{e}"))
}

/// An argon2id PHC string with the argon2 crate's defaults (v=19, m=19456, t=2, p=1) and a
/// random 16-byte salt. Fails only if the operating system's random generator does.
pub fn try_hash_argon2id(password: &[u8]) -> Result<String, String> {
    let salt = random_bytes::<16>().map_err(|_| "the system random generator failed".to_owned())?;
    let phc = Argon2::default()
        .hash_password_with_salt(password, &salt)
        .map_err(|e| format!("argon2 hashing failed: {e}"))?;
    Ok(phc.to_string())
}

/// A SCRAM-SHA-256 entry (`SCRAM-SHA-256$ITER:SALT$STOREDKEY:SERVERKEY`) with a random
/// 16-byte salt; [`DEFAULT_SCRAM_ITERATIONS`] is the usual count.
pub fn try_hash_scram_sha256(password: &[u8], iterations: u32) -> Result<String, String> {
    if iterations == 0 {
        return Err("iteration count must be at least 1".into());
    }
    let salt = random_bytes::<16>().map_err(|_| "the system random generator failed".to_owned())?;
    Ok(ScramSecrets::derive(password, &salt, iterations).to_entry())
}

fn bad_input(path: &Path, message: String) -> AuthFileError {
    AuthFileError::Io { path: path.to_owned(), source: io::Error::new(io::ErrorKind::InvalidInput, message) }
}

fn check_user_name(path: &Path, username: &str) -> Result<(), AuthFileError> {
    if username.is_empty() {
        return Err(bad_input(path, "empty user name".into()));
    }
    if username.contains([':', '\n', '\r']) || username.starts_with('#') || username.trim().is_empty() {
        return Err(bad_input(path, format!("user name {username:?} cannot be written to a password file")));
    }
    Ok(())
}

/// The user name of a line that has one, as `parse` reads it.
fn line_user(line: &str) -> Option<&str> {
    let line = line.strip_suffix('\n').unwrap_or(line);
    let line = line.strip_suffix('\r').unwrap_or(line);
    if line.trim().is_empty() || line.starts_with('#') {
        return None;
    }
    line.split_once(':').map(|(user, _)| user)
}

/// Adds `username` with `hash`, or replaces the hash of their line (dropping any later
/// duplicates of it); every other line is kept byte for byte. A missing file is created with
/// mode 0600. The new contents replace the file atomically.
pub fn set_user(path: &Path, username: &str, hash: &str) -> Result<(), AuthFileError> {
    check_user_name(path, username)?;
    if hash.contains(['\n', '\r']) {
        return Err(bad_input(path, "a hash cannot contain a line break".into()));
    }
    let target = resolve(path)?;
    let old = read_existing(&target)?;
    let mut out = String::with_capacity(old.as_deref().map_or(0, str::len) + username.len() + hash.len() + 2);
    let mut replaced = false;
    for line in old.as_deref().unwrap_or_default().split_inclusive('\n') {
        if line_user(line) != Some(username) {
            out.push_str(line);
        } else if !replaced {
            replaced = true;
            let ending = if line.ends_with("\r\n") { "\r\n" } else { "\n" };
            out.push_str(&format!("{username}:{hash}{ending}"));
        }
    }
    if !replaced {
        if !out.is_empty() && !out.ends_with('\n') {
            out.push('\n');
        }
        out.push_str(&format!("{username}:{hash}\n"));
    }
    replace_file(&target, out.as_bytes())
}

/// Removes `username`'s line(s); false when there were none (the file is then left alone).
pub fn delete_user(path: &Path, username: &str) -> Result<bool, AuthFileError> {
    let target = resolve(path)?;
    let old = fs::read_to_string(&target).map_err(|source| AuthFileError::Io { path: target.clone(), source })?;
    let mut out = String::with_capacity(old.len());
    let mut found = false;
    for line in old.split_inclusive('\n') {
        if line_user(line) == Some(username) {
            found = true;
        } else {
            out.push_str(line);
        }
    }
    if found {
        replace_file(&target, out.as_bytes())?;
    }
    Ok(found)
}

/// Writes a file holding only `username`'s line, replacing whatever was at `path`.
fn create_file(path: &Path, username: &str, hash: &str) -> Result<(), AuthFileError> {
    check_user_name(path, username)?;
    let target = resolve(path)?;
    replace_file(&target, format!("{username}:{hash}\n").as_bytes())
}

/// The file a symlink points to, so that replacing it keeps the link.
fn resolve(path: &Path) -> Result<PathBuf, AuthFileError> {
    match fs::canonicalize(path) {
        Ok(p) => Ok(p),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(path.to_owned()),
        Err(source) => Err(AuthFileError::Io { path: path.to_owned(), source }),
    }
}

fn read_existing(path: &Path) -> Result<Option<String>, AuthFileError> {
    match fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(AuthFileError::Io { path: path.to_owned(), source }),
    }
}

/// Temp file in the same directory, fsync, rename, fsync the directory: a crash leaves the old
/// file or the new one, never half of one. An existing file's mode is kept.
fn replace_file(path: &Path, contents: &[u8]) -> Result<(), AuthFileError> {
    let io_err = |source| AuthFileError::Io { path: path.to_owned(), source };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    };
    let name = path.file_name().ok_or_else(|| bad_input(path, "not a file name".into()))?;
    let mode = match fs::metadata(path) {
        Ok(m) => m.permissions().mode() & 0o7777,
        Err(e) if e.kind() == io::ErrorKind::NotFound => 0o600,
        Err(e) => return Err(io_err(e)),
    };
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".tmp{}", std::process::id()));
    let tmp = dir.join(tmp_name);
    let write = || -> io::Result<()> {
        let mut file = OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?;
        file.write_all(contents)?;
        // The umask may have narrowed a kept mode; set it exactly.
        file.set_permissions(fs::Permissions::from_mode(mode))?;
        file.sync_all()?;
        fs::rename(&tmp, path)?;
        File::open(&dir)?.sync_all()
    };
    write().map_err(|e| {
        let _ = fs::remove_file(&tmp);
        io_err(e)
    })
}

const USAGE: &str = "usage: tern passwd [-c] [--scram] FILE USER          (asks for the password)
       tern passwd -b [-c] [--scram] FILE USER PASSWORD
       tern passwd -D FILE USER
  -c       create FILE, replacing any file already there
  -b       take the password from the command line (it shows in the process list)
  -D       delete USER
  --scram  write a SCRAM-SHA-256 entry (usable with MQTT 5 enhanced authentication and
           with plain passwords) instead of argon2id";

/// `tern passwd`, given the arguments after `passwd`. An error is a message to print; a usage
/// error includes the usage.
pub fn passwd_command(args: &[String]) -> Result<(), String> {
    let usage = |why: &str| format!("{why}\n{USAGE}");
    let (mut create, mut batch, mut delete, mut scram) = (false, false, false, false);
    let mut positional = Vec::new();
    for arg in args {
        match arg.as_str() {
            "-c" => create = true,
            "-b" => batch = true,
            "-D" => delete = true,
            "--scram" => scram = true,
            "-h" | "--help" => return Err(USAGE.to_owned()),
            flag if flag.starts_with('-') && flag.len() > 1 => return Err(usage(&format!("unknown option {flag}"))),
            _ => positional.push(arg.as_str()),
        }
    }
    if delete {
        if create || batch || scram {
            return Err(usage("-D takes no other option"));
        }
        let [file, user] = positional[..] else { return Err(usage("-D needs FILE and USER")) };
        return match delete_user(Path::new(file), user) {
            Ok(true) => Ok(()),
            Ok(false) => Err(format!("{file}: no user `{user}`")),
            Err(e) => Err(e.to_string()),
        };
    }
    let (file, user, password) = match (batch, &positional[..]) {
        (true, [file, user, password]) => (*file, *user, password.as_bytes().to_vec()),
        (true, _) => return Err(usage("-b needs FILE, USER and PASSWORD")),
        (false, [file, user]) => (*file, *user, prompt_password()?),
        (false, _) => return Err(usage("needs FILE and USER")),
    };
    let hash =
        if scram { try_hash_scram_sha256(&password, DEFAULT_SCRAM_ITERATIONS)? } else { try_hash_argon2id(&password)? };
    let path = Path::new(file);
    let written = if create { create_file(path, user, &hash) } else { set_user(path, user, &hash) };
    written.map_err(|e| e.to_string())
}

fn prompt_password() -> Result<Vec<u8>, String> {
    let first = rpassword::prompt_password("Password: ").map_err(|e| format!("reading the password: {e}"))?;
    if first.is_empty() {
        return Err("empty password".into());
    }
    let second = rpassword::prompt_password("Reenter password: ").map_err(|e| format!("reading the password: {e}"))?;
    if first != second {
        return Err("passwords do not match".into());
    }
    Ok(first.into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    // Written by Debian 12's mosquitto_passwd 2.0.11: `-b -c f alice 'correct horse'`,
    // `-H sha512 -b f bob hunter2`, `-H sha512-pbkdf2 -I 1000 -b f carol 'p@ss:word'`,
    // `-b f 'us er' x`, and `-U` over `plain:plain`.
    const MOSQ_ALICE: &str = "alice:$7$101$SROzHdnDswAX4RsB$5ak0PoUzdDY1RSnqw29p6XOg/2e8JZwANMEXPbSV425r9mKUX9VsiVYtmqBthqP5FB3yvBn0mqTsgVDC9X6Elg==";
    const MOSQ_BOB: &str = "bob:$6$Wz6TQq9bCNu130DL$1oXZ8YAVbRW0JIK2MaZ+41uFmz7eCfjWIRAt1WSLlwTW6Ik/5et1F1GwXfPBghbJP4if5w0NkIC70dbQSl7LgQ==";
    const MOSQ_CAROL: &str = "carol:$7$1000$enZuwyZin3mkIL3J$RGrl7fum2s2nosvGrRyxqEA47h80rzgCHzefTrjmSakCHG2U81UHEpu7Jrj8VOa6I23vvHgET4ss+IZUr6aGNA==";
    const MOSQ_SPACE: &str = "us er:$7$101$1YXdETpOJPZtQg48$x0iSzBOyLyq+nwSfM6xPf+PzW9S+hfCIGrOt59/DN+k6s4VruqgQga2GwftfA5dDwJba+mywv+yobG6Oj7XeRQ==";
    const MOSQ_UPGRADED: &str = "plain:$7$101$XUaADmeqxcaSz3+8$w8S6AluQ1/YZQ/n7//aZPc8iBW/VYojCGoMFLPaMnYaPmpfuA6DleXkym02N0fmii+3wk8pX5F8IGOdTeBWh4Q==";
    // Written by the reference argon2 command line (Debian's `argon2` package):
    // `echo -n 'tern test' | argon2 saltsaltsalt16b -id -t 2 -k 19456 -p 1 -e` and
    // `... | argon2 saltysaltsalt -i -t 3 -m 12 -p 2 -e`.
    const REF_ARGON2ID: &str =
        "dan:$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHRzYWx0MTZi$FNFXyPNy7GwXREM33szeEvQKOT5fx/B7ZRhikioMGdc";
    const REF_ARGON2I: &str =
        "erin:$argon2i$v=19$m=4096,t=3,p=2$c2FsdHlzYWx0c2FsdA$kiyG20bGkPOnkd0aYKniZFknQjCzZLNrba7QN3j2caE";

    fn parse(text: &str) -> PasswordFile {
        PasswordFile::parse(text, "test").unwrap()
    }

    fn line_error(text: &str) -> (usize, String) {
        match PasswordFile::parse(text, "test") {
            Err(AuthFileError::Line { origin, line, message }) => {
                assert_eq!(origin, "test");
                (line, message)
            }
            other => panic!("expected a line error, got {other:?}"),
        }
    }

    #[test]
    fn mosquitto_passwd_fixtures() {
        let text = [MOSQ_ALICE, MOSQ_BOB, MOSQ_CAROL, MOSQ_SPACE, MOSQ_UPGRADED].join("\n");
        let file = parse(&text);
        assert_eq!(file.len(), 5);
        for (user, right) in
            [("alice", "correct horse"), ("bob", "hunter2"), ("carol", "p@ss:word"), ("us er", "x"), ("plain", "plain")]
        {
            assert!(file.verify(user, right.as_bytes()), "{user}");
            assert!(!file.verify(user, b"wrong"), "{user}");
            assert!(!file.verify(user, format!("{right} ").as_bytes()), "{user}");
            assert!(file.scram(user).is_none());
        }
        assert!(!file.verify("alice", b"hunter2"), "another user's password");
    }

    #[test]
    fn argon2_reference_fixtures() {
        let file = parse(&format!("{REF_ARGON2ID}\n{REF_ARGON2I}\n"));
        for user in ["dan", "erin"] {
            assert!(file.verify(user, b"tern test"), "{user}");
            assert!(!file.verify(user, b"tern test!"), "{user}");
        }
    }

    #[test]
    fn own_hashes_verify() {
        let argon = hash_argon2id(b"s3cret");
        assert!(argon.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{argon}");
        assert_ne!(argon, hash_argon2id(b"s3cret"), "salted");
        let scram = hash_scram_sha256(b"s3cret", 4096);
        assert!(scram.starts_with("SCRAM-SHA-256$4096:"), "{scram}");
        let file = parse(&format!("a:{argon}\ns:{scram}\n"));
        for user in ["a", "s"] {
            assert!(file.verify(user, b"s3cret"));
            assert!(!file.verify(user, b"s3cre"));
        }
        let secrets = file.scram("s").unwrap();
        assert_eq!(secrets.iterations, 4096);
        assert_eq!(secrets.salt.len(), 16);
        assert_eq!(secrets, ScramSecrets::derive(b"s3cret", &secrets.salt, 4096));
        assert!(file.scram("a").is_none());
        assert!(file.scram("nobody").is_none());
    }

    #[test]
    fn scram_entry_in_rfc5803_form() {
        // RFC 7677's vector: user "user", password "pencil".
        let salt = BASE64_STANDARD.decode("W22ZaJ0SNY7soEsUEjb6gQ==").unwrap();
        let entry = ScramSecrets::derive(b"pencil", &salt, 4096).to_entry();
        let file = parse(&format!("user:{entry}"));
        assert!(file.verify("user", b"pencil"));
        assert!(!file.verify("user", b"pencil2"));
        let parsed = file.scram("user").unwrap();
        assert_eq!((parsed.iterations, parsed.salt), (4096, salt));
    }

    #[test]
    fn comments_blank_lines_and_crlf() {
        let text = format!("# users\r\n\r\n{MOSQ_ALICE}\r\n   \n#{MOSQ_BOB}\n{MOSQ_CAROL}\r\n");
        let file = parse(&text);
        assert_eq!(file.len(), 2);
        assert!(file.verify("alice", b"correct horse"));
        assert!(file.verify("carol", b"p@ss:word"));
        assert!(!file.contains("#bob") && !file.contains("bob"));
        assert!(parse("").is_empty());
    }

    #[test]
    fn unknown_user_is_refused() {
        let file = parse(MOSQ_ALICE);
        assert!(!file.contains("mallory"));
        assert!(!file.verify("mallory", b"correct horse"));
        assert!(!parse("").verify("alice", b"correct horse"));
    }

    #[test]
    fn dummy_uses_the_most_common_parameters() {
        let text = [MOSQ_BOB, MOSQ_ALICE, MOSQ_CAROL, MOSQ_SPACE].join("\n");
        let file = parse(&text);
        assert!(matches!(file.dummy, Some(Hash::Pbkdf2Sha512 { iterations: 101, .. })));
        let file = parse(&[MOSQ_BOB, MOSQ_CAROL].join("\n"));
        assert!(matches!(file.dummy, Some(Hash::Sha512 { .. })), "a tie goes to the first");
    }

    #[test]
    fn every_bad_line_is_named() {
        let good = MOSQ_ALICE;
        let (hash_b64, _) = MOSQ_ALICE.rsplit_once('$').unwrap();
        let cases: &[(&str, &str)] = &[
            ("no colon here", "no `:`"),
            (":$6$Wz6TQq9bCNu130DL$1oXZ8YAVbRW0", "empty user name"),
            ("mallory:hunter2", "not a hashed password: hash it with `tern passwd` or `mosquitto_passwd -U`"),
            ("mallory:", "not a hashed password"),
            ("mallory:$2b$10$abcdefghijklmnopqrstuu", "unknown password hash scheme `$2b$`"),
            ("mallory:$7$101$SROzHdnDswAX4RsB", "`$7$ITERATIONS$SALT$HASH`"),
            ("mallory:$7$0$SROzHdnDswAX4RsB$AAAA", "bad iteration count"),
            ("mallory:$7$x$SROzHdnDswAX4RsB$AAAA", "bad iteration count"),
            ("mallory:$7$101$SROz*dnDswAX4RsB$AAAA", "bad base64 in salt"),
            ("mallory:$7$101$$AAAA", "empty salt"),
            ("mallory:$7$101$SROzHdnDswAX4RsB$AAAA", "hash is 3 bytes, expected 64"),
            ("mallory:$6$Wz6TQq9bCNu130DL$1oXZ8YAVbRW0", "hash is 9 bytes, expected 64"),
            ("mallory:$6$Wz6TQq9bCNu130DL", "`$6$SALT$HASH`"),
            ("mallory:$argon2id$v=19$m=19456,t=2,p=1$c2FsdA", "bad argon2 hash"),
            ("mallory:$argon2id$v=19$m=1,t=2,p=1$c2FsdHNhbHRzYWx0MTZi$FNFXyPNy7GwXREM33szeEvQKOT5fx/B7ZRhikioMGdc", "bad argon2"),
            ("mallory:$argon2x$v=19$m=19456,t=2,p=1$c2FsdHNhbHRzYWx0MTZi$FNFXyPNy7GwXREM33szeEvQKOT5fx/B7ZRhikioMGdc", "bad argon2"),
            ("mallory:SCRAM-SHA-256$4096:c2FsdA==", "SCRAM-SHA-256 entry must be"),
            ("mallory:SCRAM-SHA-256$4096:c2FsdA==$AAAA:AAAA", "stored key is 3 bytes, expected 32"),
            ("mallory:SCRAM-SHA-256$4096:c2FsdA=$AAAA:AAAA", "bad base64 in salt"),
        ];
        for (bad, expected) in cases {
            let (line, message) = line_error(&format!("# header\n{good}\n{bad}\n{MOSQ_BOB}\n"));
            assert_eq!(line, 3, "{bad}");
            assert!(message.contains(expected), "{bad}: {message}");
            assert!(!message.contains("hunter2"), "a plain password never shows in an error");
        }
        let (line, message) = line_error(&format!("{hash_b64}$AAAA"));
        assert_eq!(line, 1);
        assert!(message.contains("hash is 3 bytes"), "{message}");
    }

    #[test]
    fn duplicate_user_names_both_lines() {
        let text = format!("{MOSQ_ALICE}\n{MOSQ_BOB}\n\n{}\n", MOSQ_ALICE.replace("SROz", "AAAA"));
        let (line, message) = line_error(&text);
        assert_eq!(line, 4);
        assert!(message.contains("`alice`") && message.contains("line 1"), "{message}");
        let rendered = PasswordFile::parse(&text, "/etc/tern/passwd").unwrap_err().to_string();
        assert!(rendered.starts_with("/etc/tern/passwd:4: "), "{rendered}");
    }

    #[test]
    fn load_reports_io_errors() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing");
        assert!(matches!(PasswordFile::load(&missing), Err(AuthFileError::Io { path, .. }) if path == missing));
        let path = dir.path().join("passwd");
        fs::write(&path, format!("{MOSQ_ALICE}\nbroken\n")).unwrap();
        let err = PasswordFile::load(&path).unwrap_err().to_string();
        assert_eq!(err, format!("{}:2: no `:` between user name and password hash", path.display()));
    }

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn set_user_creates_replaces_and_keeps_other_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("passwd");
        set_user(&path, "alice", "$7$1$AAAA$BBBB").unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), "alice:$7$1$AAAA$BBBB\n");
        assert_eq!(mode(&path), 0o600);

        let others = format!("# keep me  \r\n{MOSQ_BOB}\r\n\n   \n{MOSQ_CAROL}");
        fs::write(&path, format!("{others}\n{MOSQ_ALICE}\r\n# tail")).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).unwrap();
        set_user(&path, "alice", "NEW").unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), format!("{others}\nalice:NEW\r\n# tail"));
        assert_eq!(mode(&path), 0o640, "an existing file keeps its mode");
        set_user(&path, "dave", "D").unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), format!("{others}\nalice:NEW\r\n# tail\ndave:D\n"));

        assert!(set_user(&path, "a:b", "x").is_err());
        assert!(set_user(&path, "", "x").is_err());
        assert!(set_user(&path, "eve", "x\ny:z").is_err());
        let leftovers: Vec<_> = fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(leftovers, ["passwd"], "no temp file left behind");
    }

    #[test]
    fn delete_user_keeps_other_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("passwd");
        assert!(delete_user(&path, "alice").is_err(), "missing file");
        let text = format!("# c\r\n{MOSQ_ALICE}\r\n{MOSQ_BOB}\n\n{MOSQ_CAROL}");
        fs::write(&path, &text).unwrap();
        assert!(!delete_user(&path, "mallory").unwrap());
        assert_eq!(fs::read_to_string(&path).unwrap(), text);
        assert!(delete_user(&path, "bob").unwrap());
        assert_eq!(fs::read_to_string(&path).unwrap(), format!("# c\r\n{MOSQ_ALICE}\r\n\n{MOSQ_CAROL}"));
        assert!(delete_user(&path, "carol").unwrap());
        assert_eq!(fs::read_to_string(&path).unwrap(), format!("# c\r\n{MOSQ_ALICE}\r\n\n"));
    }

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn passwd_command_batch_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("passwd");
        let file = path.to_str().unwrap();
        passwd_command(&args(&["-c", "-b", file, "alice", "one"])).unwrap();
        assert_eq!(mode(&path), 0o600);
        passwd_command(&args(&["-b", "--scram", file, "bob", "two"])).unwrap();
        passwd_command(&args(&["-b", file, "carol", "three"])).unwrap();
        let loaded = PasswordFile::load(&path).unwrap();
        assert_eq!(loaded.len(), 3);
        assert!(loaded.verify("alice", b"one") && loaded.verify("bob", b"two") && loaded.verify("carol", b"three"));
        assert!(!loaded.verify("alice", b"two"));
        assert!(loaded.scram("bob").is_some() && loaded.scram("alice").is_none());

        passwd_command(&args(&["-b", file, "alice", "uno"])).unwrap();
        passwd_command(&args(&["-D", file, "carol"])).unwrap();
        let loaded = PasswordFile::load(&path).unwrap();
        assert_eq!(loaded.len(), 2);
        assert!(loaded.verify("alice", b"uno") && !loaded.verify("alice", b"one"));
        assert!(passwd_command(&args(&["-D", file, "carol"])).unwrap_err().contains("no user `carol`"));

        passwd_command(&args(&["-b", "-c", file, "dave", "four"])).unwrap();
        let loaded = PasswordFile::load(&path).unwrap();
        assert_eq!(loaded.len(), 1, "-c starts afresh");
        assert!(loaded.verify("dave", b"four"));
    }

    #[test]
    fn passwd_command_usage_errors() {
        for bad in [&[][..], &["-b", "f", "u"], &["-x", "f", "u"], &["-D", "f"], &["-D", "-c", "f", "u"], &["f"]] {
            let err = passwd_command(&args(bad)).unwrap_err();
            assert!(err.contains("usage: tern passwd"), "{bad:?}: {err}");
        }
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("passwd");
        let err = passwd_command(&args(&["-b", file.to_str().unwrap(), "a:b", "pw"])).unwrap_err();
        assert!(err.contains("cannot be written"), "{err}");
    }
}
