#![no_main]
// The check and its invariants: mandate_fuzz::decision_log::decision_log (fuzz/src).
libfuzzer_sys::fuzz_target!(|data: &[u8]| mandate_fuzz::decision_log::decision_log(data));
