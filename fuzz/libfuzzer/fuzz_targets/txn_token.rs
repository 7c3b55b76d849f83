#![no_main]
// The check and its invariants: mandate_fuzz::txn::txn_token (fuzz/src).
libfuzzer_sys::fuzz_target!(|data: &[u8]| mandate_fuzz::txn::txn_token(data));
