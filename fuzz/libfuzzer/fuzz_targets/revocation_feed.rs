#![no_main]
// The check and its invariants: mandate_fuzz::feed::revocation_feed (fuzz/src).
libfuzzer_sys::fuzz_target!(|data: &[u8]| mandate_fuzz::feed::revocation_feed(data));
