#![no_main]
// The check and its invariants: mandate_fuzz::headers::headers (fuzz/src).
libfuzzer_sys::fuzz_target!(|data: &[u8]| mandate_fuzz::headers::headers(data));
