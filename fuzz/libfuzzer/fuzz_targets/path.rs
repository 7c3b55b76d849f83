#![no_main]
// The check and its invariants: mandate_fuzz::path::path (fuzz/src).
libfuzzer_sys::fuzz_target!(|data: &[u8]| mandate_fuzz::path::path(data));
