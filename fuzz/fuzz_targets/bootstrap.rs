//! Arbitrary bytes as a YAML and a JSON bootstrap (and as a `resources:` file): parse and lower, never panic.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| remora::fuzzing::bootstrap(data));
