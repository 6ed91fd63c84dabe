//! Requests derived from the bytes matched against a fixed or a fuzz-derived route table: never panic, and the
//! virtual host does not depend on the authority's case. The input layout is in `remora::fuzzing::route_match`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| remora::fuzzing::route_match(data));
