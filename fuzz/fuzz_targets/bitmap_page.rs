#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| repblock::fuzzing::bitmap_page(data));
