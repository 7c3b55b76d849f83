//! Reading MCP calls (Streamable HTTP): the 2026-07-28 headers and the JSON-RPC body, and
//! the JSON-RPC error answers an MCP client understands. Pure and host-independent.

pub mod headers;
pub mod jsonrpc;

use crate::reason::Reason;
use serde_json::Value;

/// JSON-RPC error code of a denial.
pub fn error_code(reason: Reason, not_json: bool) -> i64 {
    use crate::reason::Family;
    match reason {
        Reason::McpMalformed if not_json => -32700,
        Reason::McpHeaderMismatch => -32020,
        // mcp_malformed, mcp_batch_refused, mcp_body_too_large and other malformed requests.
        r if r.family() == Family::BadRequest => -32600,
        r if r.family() == Family::Identity => -32001,
        // The filter could not decide (a credential, revocations, configuration): internal.
        r if r.family() == Family::Unavailable => -32603,
        _ => -32003,
    }
}

/// The JSON-RPC error body of a denied MCP call: keeps the request's `id` (`null` when
/// unknown), the reason code and the decision id; never anything else from the request.
pub fn error_body(reason: Reason, not_json: bool, id: Option<&Value>, decision_id: &str) -> String {
    // Written by hand (every piece is a fixed code, a number, or JSON-escaped): no generic
    // JSON building on the denial path. The id is a string, a number or null (the parser
    // accepts nothing else).
    let id = match id {
        Some(v @ (Value::String(_) | Value::Number(_))) => v.to_string(),
        _ => "null".to_string(),
    };
    let esc = |s: &str| serde_json::to_string(s).unwrap_or_else(|_| "\"\"".to_string());
    format!(
        "{{\"jsonrpc\":\"2.0\",\"id\":{id},\"error\":{{\"code\":{},\"message\":{},\"data\":{{\"reason\":\"{}\",\"decision_id\":{}}}}}}}",
        error_code(reason, not_json),
        esc(reason.message()),
        reason.code(),
        esc(decision_id)
    )
}

/// Largest `tools/list` answer the filter rewrites; a larger one is refused (502).
pub const MAX_TOOLS_LIST_BYTES: usize = 4 * 1024 * 1024;

/// Why a `tools/list` answer could not be filtered (it is then refused, never passed on).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unfilterable {
    NotJson,
    NotAToolsList,
    TooLarge,
}

/// Rewrites a JSON `tools/list` answer to the tools `allowed` accepts. A JSON-RPC error answer
/// passes unchanged; anything that is not a well-formed list (duplicate keys, a tool without a
/// string name, no `result.tools` array) cannot be filtered safely.
pub fn filter_tools_list(body: &[u8], allowed: impl Fn(&str) -> bool) -> Result<Vec<u8>, Unfilterable> {
    if body.len() > MAX_TOOLS_LIST_BYTES {
        return Err(Unfilterable::TooLarge);
    }
    let Ok(Value::Object(mut m)) = std::str::from_utf8(body).map_err(|_| ()).and_then(|t| jsonrpc::strict_value(t).map_err(|_| ())) else { return Err(Unfilterable::NotJson) };
    if m.get("error").is_some() && m.get("result").is_none() {
        return Ok(body.to_vec());
    }
    let tools = m
        .get_mut("result")
        .and_then(Value::as_object_mut)
        .and_then(|r| r.get_mut("tools"))
        .and_then(Value::as_array_mut)
        .ok_or(Unfilterable::NotAToolsList)?;
    if !tools.iter().all(|t| t.get("name").is_some_and(Value::is_string)) {
        return Err(Unfilterable::NotAToolsList);
    }
    tools.retain(|t| t.get("name").and_then(Value::as_str).is_some_and(&allowed));
    serde_json::to_vec(&Value::Object(m)).map_err(|_| Unfilterable::NotJson)
}

/// Rewrites a complete `text/event-stream` answer: every event whose data is a JSON-RPC answer
/// with `result.tools` is narrowed (and re-sent as one `data:` line); other events (notifications,
/// errors) pass unchanged. An event whose data is not JSON, or a stream that does not end with a
/// blank line (cut short), cannot be filtered.
pub fn filter_tools_list_sse(body: &[u8], allowed: impl Fn(&str) -> bool) -> Result<Vec<u8>, Unfilterable> {
    if body.len() > MAX_TOOLS_LIST_BYTES {
        return Err(Unfilterable::TooLarge);
    }
    let text = std::str::from_utf8(body).map_err(|_| Unfilterable::NotJson)?;
    let text = text.replace("\r\n", "\n");
    if text.contains('\r') {
        return Err(Unfilterable::NotAToolsList);
    }
    let Some(events) = text.strip_suffix("\n\n").or_else(|| text.is_empty().then_some("")) else { return Err(Unfilterable::NotAToolsList) };
    let mut out = Vec::with_capacity(body.len());
    for event in events.split("\n\n").filter(|e| !e.is_empty()) {
        let mut data: Vec<&str> = Vec::new();
        let mut other: Vec<&str> = Vec::new();
        for line in event.split('\n') {
            match line.strip_prefix("data:") {
                Some(d) => data.push(d.strip_prefix(' ').unwrap_or(d)),
                None => other.push(line),
            }
        }
        let joined = data.join("\n");
        let is_list = !data.is_empty() && {
            let v = jsonrpc::strict_value(&joined).map_err(|_| Unfilterable::NotJson)?;
            v.get("result").and_then(|r| r.get("tools")).is_some()
        };
        for line in &other {
            out.extend_from_slice(line.as_bytes());
            out.push(b'\n');
        }
        if is_list {
            out.extend_from_slice(b"data: ");
            out.extend_from_slice(&filter_tools_list(joined.as_bytes(), &allowed)?);
            out.push(b'\n');
        } else {
            for d in &data {
                out.extend_from_slice(b"data: ");
                out.extend_from_slice(d.as_bytes());
                out.push(b'\n');
            }
        }
        out.push(b'\n');
    }
    Ok(out)
}

/// The answer that replaces a `tools/list` answer that could not be filtered.
pub fn unfilterable_body(decision_id: &str) -> String {
    let esc = serde_json::to_string(decision_id).unwrap_or_else(|_| "\"\"".to_string());
    format!(
        "{{\"jsonrpc\":\"2.0\",\"id\":null,\"error\":{{\"code\":-32603,\"message\":\"the tool list could not be filtered for this caller\",\"data\":{{\"decision_id\":{esc}}}}}}}"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::headers::Headers;
    use serde_json::json;

    #[test]
    fn error_bodies_keep_the_id_and_the_reason() {
        let v: Value = serde_json::from_str(&error_body(Reason::ToolNotAllowed, false, Some(&json!(7)), "d1")).unwrap();
        assert_eq!(v["id"], json!(7));
        assert_eq!(v["error"]["code"], json!(-32003));
        assert_eq!(v["error"]["data"]["reason"], json!("tool_not_allowed"));
        assert_eq!(v["error"]["data"]["decision_id"], json!("d1"));
        let v: Value = serde_json::from_str(&error_body(Reason::McpMalformed, true, None, "d1")).unwrap();
        assert_eq!((v["id"].clone(), v["error"]["code"].clone()), (Value::Null, json!(-32700)));
        assert_eq!(error_code(Reason::McpHeaderMismatch, false), -32020);
        assert_eq!(error_code(Reason::SignatureInvalid, false), -32001);
        assert_eq!(error_code(Reason::McpBodyTooLarge, false), -32600);
        assert_eq!(error_code(Reason::IntentMalformed, false), -32600);
        assert_eq!(error_code(Reason::CredentialUnavailable, false), -32603);
        assert_eq!(error_code(Reason::ArgumentNotAllowed, false), -32003);
    }

    #[test]
    fn tools_list_is_narrowed_to_what_the_intent_allows() {
        let body = br#"{"jsonrpc":"2.0","id":3,"result":{"tools":[{"name":"get_ticket","description":"read"},{"name":"delete_customer"},{"name":"search_x"}],"nextCursor":"c"}}"#;
        let out = filter_tools_list(body, |n| n == "get_ticket" || n.starts_with("search_")).unwrap();
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["result"]["tools"], json!([{"name": "get_ticket", "description": "read"}, {"name": "search_x"}]));
        assert_eq!((v["id"].clone(), v["result"]["nextCursor"].clone()), (json!(3), json!("c")));
        let err = br#"{"jsonrpc":"2.0","id":3,"error":{"code":-1,"message":"x"}}"#;
        assert_eq!(filter_tools_list(err, |_| false).unwrap(), err.to_vec());
    }

    #[test]
    fn tools_list_that_cannot_be_filtered_is_never_passed_on() {
        for body in [
            &b"event: message\ndata: {}\n\n"[..],
            br#"{"jsonrpc":"2.0","id":1,"result":{"tools":[{"name":"a"}],"tools":[{"name":"delete_customer"}]}}"#,
            br#"{"jsonrpc":"2.0","id":1,"result":{"tools":[{"name":7}]}}"#,
            br#"{"jsonrpc":"2.0","id":1,"result":{}}"#,
            br#"{"jsonrpc":"2.0","id":1,"result":{"tools":{"name":"a"}}}"#,
        ] {
            assert!(filter_tools_list(body, |_| true).is_err(), "{}", String::from_utf8_lossy(body));
        }
        let big = vec![b' '; MAX_TOOLS_LIST_BYTES + 1];
        assert_eq!(filter_tools_list(&big, |_| true), Err(Unfilterable::TooLarge));
        let v: Value = serde_json::from_str(&unfilterable_body("d\"1")).unwrap();
        assert_eq!(v["error"]["data"]["decision_id"], json!("d\"1"));
    }

    #[test]
    fn sse_tools_list_is_narrowed_event_by_event() {
        let body = b"event: message\r\ndata: {\"jsonrpc\":\"2.0\",\"method\":\"notifications/progress\"}\r\n\r\n: comment\nid: 7\ndata: {\"jsonrpc\":\"2.0\",\"id\":2,\n\
data: \"result\":{\"tools\":[{\"name\":\"get_ticket\"},{\"name\":\"delete_customer\"}]}}\n\n";
        let out = String::from_utf8(filter_tools_list_sse(body, |n| n == "get_ticket").unwrap()).unwrap();
        assert!(!out.contains("delete_customer"), "{out}");
        assert!(out.contains("notifications/progress") && out.contains("id: 7\n") && out.contains("\"get_ticket\""), "{out}");
        assert!(out.ends_with("\n\n"));
        for bad in [&b"data: {\"result\":{\"tools\":[{\"name\":\"x\"}]}}\n"[..], b"data: not json\n\n", b"data: {\"result\":{\"tools\":[{\"name\":\"a\"}],\"tools\":[]}}\n\n", b"data: x\rdata: y\n\n"] {
            assert!(filter_tools_list_sse(bad, |_| true).is_err(), "{}", String::from_utf8_lossy(bad));
        }
    }

    /// xorshift: reproducible pseudo-random bytes without a dependency.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n.max(1) as u64) as usize
        }
    }

    const SEEDS: [&str; 6] = [
        r#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"refund","arguments":{"amount":42,"ticket_id":"T-1","n":{"a":[1,2,{"b":null}]}}}}"#,
        r#"{"jsonrpc":"2.0","id":"x","method":"resources/read","params":{"uri":"tickets://1"}}"#,
        r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#,
        r#"[{"jsonrpc":"2.0","id":1,"method":"ping"}]"#,
        r#"{"jsonrpc":"2.0","id":1e400,"method":"ping"}"#,
        "{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"tools/call\",\"params\":{\"name\":\"\\ud800\"}}",
    ];

    /// Random and mutated bodies and headers: the parsers never panic, and whatever they
    /// accept is a well-formed call.
    #[test]
    fn random_and_mutated_inputs_never_panic() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let alphabet = b"{}[]\":,0123456789.eE+-truefalsnl \\/u\x00\xff\xc3\xa9abc";
        for round in 0..20_000 {
            let mut body: Vec<u8> = SEEDS[round % SEEDS.len()].as_bytes().to_vec();
            for _ in 0..=rng.below(6) {
                let at = rng.below(body.len() + 1);
                match rng.below(4) {
                    0 if !body.is_empty() => {
                        body.remove(at.min(body.len() - 1));
                    }
                    1 => body.insert(at, alphabet[rng.below(alphabet.len())]),
                    2 if at < body.len() => body[at] = rng.next() as u8,
                    _ => {
                        let from = rng.below(body.len());
                        let to = (from + rng.below(16)).min(body.len());
                        let chunk = body[from..to].to_vec();
                        body.splice(at..at, chunk);
                    }
                }
            }
            if round % 7 == 0 {
                body = (0..rng.below(64)).map(|_| alphabet[rng.below(alphabet.len())]).collect();
            }
            if let Ok(m) = jsonrpc::parse(&body) {
                assert!(!m.method.is_empty());
                if m.method == "tools/call" {
                    assert!(m.name.is_some());
                }
            }
            let value: Vec<u8> = (0..rng.below(24)).map(|_| rng.next() as u8).collect();
            let mut b64 = b"=?base64?".to_vec();
            b64.extend_from_slice(&value);
            b64.extend_from_slice(b"?=");
            let hs = Headers::new(vec![
                ("mcp-protocol-version".to_string(), value.clone()),
                ("mcp-name".to_string(), b64),
                (format!("mcp-param-{}", rng.below(3)), value.clone()),
                ("mcp-method".to_string(), value),
            ]);
            if let Ok(h) = headers::read(&hs) {
                let _ = h.call();
                if let Ok(m) = jsonrpc::parse(&body) {
                    let _ = headers::agree(&h, &m);
                }
            }
        }
    }
}
