//! TEMPORARY STUB, replaced by the real module.
use super::password::PasswordFile;
use std::sync::Arc;
pub struct ScramSha256;
impl ScramSha256 {
    pub fn new(_p: Arc<arc_swap::ArcSwapOption<PasswordFile>>) -> Self {
        ScramSha256
    }
}
impl super::AuthMethod for ScramSha256 {
    fn name(&self) -> &str {
        "SCRAM-SHA-256"
    }
    fn start(&self, _c: &str, _u: Option<&str>, _d: Option<&[u8]>) -> (Box<dyn super::AuthExchange>, super::AuthStep) {
        unimplemented!()
    }
}
