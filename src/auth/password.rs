//! TEMPORARY STUB, replaced by the real module.
use super::AuthFileError;
use std::path::Path;
pub struct PasswordFile;
impl PasswordFile {
    pub fn load(path: &Path) -> Result<PasswordFile, AuthFileError> {
        Err(AuthFileError::Io { path: path.into(), source: std::io::Error::other("stub") })
    }
    pub fn verify(&self, _u: &str, _p: &[u8]) -> bool {
        false
    }
}
pub fn passwd_command(_args: &[String]) -> Result<(), String> {
    Err("stub".into())
}
