#![no_main]
// The check and its invariants: mandate_fuzz::bundle::bundle (fuzz/src).
libfuzzer_sys::fuzz_target!(|data: &[u8]| mandate_fuzz::bundle::bundle(data));
