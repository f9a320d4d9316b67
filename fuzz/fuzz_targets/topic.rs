//! Topic name and filter validation and the `$share` split (src/fuzzing.rs: topic).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        tern::fuzzing::topic(s);
    }
});
