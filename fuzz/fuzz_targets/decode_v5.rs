//! The packet decoder at protocol level 5, on a stream of packets (src/fuzzing.rs: decode).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    tern::fuzzing::decode(5, data);
});
