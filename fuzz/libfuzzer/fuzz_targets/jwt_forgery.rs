#![no_main]
// The check and its invariants: mandate_fuzz::jwt::jwt_forgery (fuzz/src).
libfuzzer_sys::fuzz_target!(|data: &[u8]| mandate_fuzz::jwt::jwt_forgery(data));
