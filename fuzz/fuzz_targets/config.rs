//! The config loader, `Config::from_toml`, on any UTF-8 text (src/fuzzing.rs: config).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        tern::fuzzing::config(s);
    }
});
