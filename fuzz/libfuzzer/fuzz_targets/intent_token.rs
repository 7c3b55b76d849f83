#![no_main]
// The check and its invariants: mandate_fuzz::intent::intent_token (fuzz/src).
libfuzzer_sys::fuzz_target!(|data: &[u8]| mandate_fuzz::intent::intent_token(data));
