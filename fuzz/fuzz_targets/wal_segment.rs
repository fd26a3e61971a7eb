#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| repblock::fuzzing::wal_segment(data));
