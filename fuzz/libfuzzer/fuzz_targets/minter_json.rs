#![no_main]
// The check and its invariants: mandate_fuzz::minter::minter_json (fuzz/src).
libfuzzer_sys::fuzz_target!(|data: &[u8]| mandate_fuzz::minter::minter_json(data));
