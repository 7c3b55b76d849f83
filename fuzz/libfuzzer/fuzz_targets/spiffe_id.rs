#![no_main]
// The check and its invariants: mandate_fuzz::spiffe::spiffe_id (fuzz/src).
libfuzzer_sys::fuzz_target!(|data: &[u8]| mandate_fuzz::spiffe::spiffe_id(data));
