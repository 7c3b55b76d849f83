//! MCP JSON-RPC bodies, and the `tools/list` answers the filter rewrites.

use mandate_core::mcp::jsonrpc::{parse, pointer, strict_value};
use mandate_core::mcp::{error_body, filter_tools_list, filter_tools_list_sse};
use mandate_core::policy::cases::mcp_message;
use mandate_core::reason::Reason;
use serde_json::Value;

fn allowed(name: &str) -> bool {
    name.len().is_multiple_of(2)
}

fn tools_of(v: &Value) -> Vec<String> {
    v.pointer("/result/tools")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(|t| t.get("name").and_then(Value::as_str).map(String::from)).collect())
        .unwrap_or_default()
}

/// Any bytes as a request body: an accepted message is a JSON-RPC 2.0 request with a method
/// and object params (the same text read strictly); as an answer to `tools/list`, what the
/// filter passes on is JSON naming only allowed tools.
pub fn mcp_jsonrpc(data: &[u8]) {
    match parse(data) {
        Ok(m) => {
            let text = std::str::from_utf8(data).unwrap_or_else(|e| panic!("accepted a body that is not UTF-8: {e}"));
            let v = strict_value(text).unwrap_or_else(|e| panic!("accepted a body the strict reader refuses: {e}"));
            assert_eq!(v.get("jsonrpc").and_then(Value::as_str), Some("2.0"), "accepted without jsonrpc 2.0");
            assert_eq!(v.get("method").and_then(Value::as_str), Some(m.method.as_str()), "method is not the body's");
            assert!(!m.method.is_empty(), "accepted an empty method");
            match v.get("params") {
                None => {}
                Some(p) => assert!(p.is_object(), "accepted non-object params"),
            }
            assert_eq!(m.id, v.get("id").cloned(), "id is not the body's");
            if let Some(args) = &m.arguments {
                let whole = v.pointer("/params/arguments").and_then(Value::as_object);
                assert_eq!(whole, m.arguments_map().as_ref(), "arguments are not the body's");
                // Read in place, each member is what a full parse finds.
                for (k, want) in whole.into_iter().flatten() {
                    assert_eq!(pointer(args, std::slice::from_ref(k)), Ok(Some(want.clone())), "pointer /{k} is not the body's");
                }
            }
            if let Some(n) = &m.name {
                assert_eq!(v.pointer("/params/name").and_then(Value::as_str), Some(n.as_str()), "name is not the body's");
            }
            let e = error_body(Reason::ToolNotAllowed, false, m.id.as_ref(), "d-1");
            assert!(serde_json::from_str::<Value>(&e).is_ok(), "error body is not JSON");
        }
        Err(e) => {
            let body = error_body(e.reason, e.not_json, e.id.as_ref(), "d-1");
            assert!(serde_json::from_str::<Value>(&body).is_ok(), "error body is not JSON");
        }
    }
    described_call(data);
    if let Ok(out) = filter_tools_list(data, allowed) {
        let v: Value = serde_json::from_slice(&out).unwrap_or_else(|e| panic!("filtered tools/list is not JSON: {e}"));
        assert!(tools_of(&v).iter().all(|t| allowed(t)), "a refused tool passed the filter");
    }
    if let Ok(out) = filter_tools_list_sse(data, allowed) {
        let text = String::from_utf8(out).unwrap_or_else(|e| panic!("filtered SSE is not UTF-8: {e}"));
        for line in text.lines() {
            if let Some(d) = line.strip_prefix("data:") {
                if let Ok(v) = serde_json::from_str::<Value>(d.trim_start()) {
                    assert!(tools_of(&v).iter().all(|t| allowed(t)), "a refused tool passed the SSE filter");
                }
            }
        }
    }
}

/// The same bytes as the parts of a described call (the embedded face's `decide`): whatever the
/// text, the message the core writes around it reads back as that call or not at all; as
/// arguments it never adds a member (another `name`, another `method`), as a name or URI it
/// stays one string.
fn described_call(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Some(msg) = mcp_message("tools/call", Some("get_ticket"), None, Some(text)) {
        if let Ok(m) = parse(msg.as_bytes()) {
            assert_eq!((m.method.as_str(), m.name.as_deref(), m.uri.as_deref(), m.id.clone()), ("tools/call", Some("get_ticket"), None, Some(Value::from(1))), "arguments text rewrote the message: {msg}");
            let args = strict_value(text).unwrap_or_else(|e| panic!("accepted arguments the strict reader refuses: {e}"));
            assert_eq!(args.as_object(), m.arguments_map().as_ref(), "arguments are not the text's");
        }
    }
    if let Some(msg) = mcp_message("resources/read", Some(text), Some(text), None) {
        if let Ok(m) = parse(msg.as_bytes()) {
            assert_eq!(m.method, "resources/read", "a name or URI rewrote the method: {msg}");
            assert!(m.arguments.is_none(), "a name or URI added arguments: {msg}");
            assert!(m.name.as_deref().is_none_or(|n| n == text), "the name is not the text: {msg}");
            assert_eq!(m.uri.as_deref(), Some(text), "the URI is not the text: {msg}");
        }
    }
}
