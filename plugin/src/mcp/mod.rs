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
        Reason::McpMalformed | Reason::McpBatchRefused | Reason::McpBodyTooLarge => -32600,
        Reason::McpHeaderMismatch => -32020,
        r if r.family() == Family::Identity => -32001,
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
