#![no_main]
// The check and its invariants: mandate_fuzz::config::policy (fuzz/src).
libfuzzer_sys::fuzz_target!(|data: &[u8]| mandate_fuzz::config::policy(data));
