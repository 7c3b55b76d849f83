#![no_main]
// The check and its invariants: mandate_fuzz::mcp::mcp_jsonrpc (fuzz/src).
libfuzzer_sys::fuzz_target!(|data: &[u8]| mandate_fuzz::mcp::mcp_jsonrpc(data));
