//! A strict JSON-RPC 2.0 request parser for MCP bodies.
//!
//! Refuses what a lenient parser would let through and a server might read differently:
//! duplicate keys (which one wins differs between parsers), nesting deeper than
//! [`MAX_DEPTH`], batches, a wrong `jsonrpc`, a missing or non-string `method`, non-object
//! `params` or `arguments`, a non-string tool name or URI, and unknown top-level members.

use crate::policy::mcp::{McpArgs, McpCall, McpSource};
use crate::reason::Reason;
use serde::de::{DeserializeSeed, Deserializer, Error as _, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};
use std::fmt;

/// Deepest nesting accepted (objects and arrays), the message itself being level 1.
pub const MAX_DEPTH: usize = 32;
/// Longest method, tool or prompt name accepted.
const MAX_NAME: usize = 128;
/// Longest resource URI accepted.
const MAX_URI: usize = 4096;

/// A JSON-RPC request (or notification) as the policy needs it.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    /// `None`: absent (a notification); `Some(Null)`: `"id": null`.
    pub id: Option<Value>,
    pub method: String,
    pub name: Option<String>,
    pub arguments: Option<Map<String, Value>>,
    pub uri: Option<String>,
}

impl Message {
    pub fn into_call(self) -> McpCall {
        McpCall {
            method: self.method,
            name: self.name,
            uri: self.uri,
            arguments: self.arguments.map_or(McpArgs::None, McpArgs::Body),
            source: McpSource::Body,
        }
    }
}

/// Why a body was refused, with the request's `id` when it could be read.
#[derive(Debug, Clone, PartialEq)]
pub struct ParseError {
    pub reason: Reason,
    pub id: Option<Value>,
    /// The body is not JSON at all (JSON-RPC -32700 rather than -32600).
    pub not_json: bool,
}

impl ParseError {
    fn malformed(id: Option<Value>) -> ParseError {
        ParseError { reason: Reason::McpMalformed, id, not_json: false }
    }
}

const DUPLICATE: &str = "mandate: duplicate key";
const TOO_DEEP: &str = "mandate: nesting too deep";

/// Builds a `Value`, refusing duplicate keys and deep nesting.
struct Strict {
    depth: usize,
    /// Duplicate keys: the last wins (only to find an `id` to echo in a refusal).
    lenient: bool,
}

impl<'de> DeserializeSeed<'de> for Strict {
    type Value = Value;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Strict {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Value, E> {
        serde_json::Number::from_f64(v).map(Value::Number).ok_or_else(|| E::custom("number out of range"))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_string()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        if self.depth >= MAX_DEPTH {
            return Err(A::Error::custom(TOO_DEEP));
        }
        let mut out = Vec::new();
        while let Some(v) = seq.next_element_seed(Strict { depth: self.depth + 1, lenient: self.lenient })? {
            out.push(v);
        }
        Ok(Value::Array(out))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        if self.depth >= MAX_DEPTH {
            return Err(A::Error::custom(TOO_DEEP));
        }
        let mut out = Map::new();
        while let Some(k) = map.next_key::<String>()? {
            let v = map.next_value_seed(Strict { depth: self.depth + 1, lenient: self.lenient })?;
            if !self.lenient && out.contains_key(&k) {
                return Err(A::Error::custom(DUPLICATE));
            }
            out.insert(k, v);
        }
        Ok(Value::Object(out))
    }
}

/// Parses a whole body as strict JSON (no trailing data).
pub fn strict_value(body: &[u8]) -> Result<Value, serde_json::Error> {
    read_value(body, false)
}

fn read_value(body: &[u8], lenient: bool) -> Result<Value, serde_json::Error> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let v = Strict { depth: 0, lenient }.deserialize(&mut de)?;
    de.end()?;
    Ok(v)
}

fn lenient_id(body: &[u8]) -> Option<Value> {
    match read_value(body, true).ok()? {
        Value::Object(m) => match m.get("id")? {
            v @ (Value::String(_) | Value::Number(_) | Value::Null) => Some(v.clone()),
            _ => None,
        },
        _ => None,
    }
}

fn name_ok(s: &str, max: usize) -> bool {
    !s.is_empty() && s.len() <= max && !s.chars().any(char::is_control)
}

/// Parses one MCP JSON-RPC request from a buffered body.
pub fn parse(body: &[u8]) -> Result<Message, ParseError> {
    match body.iter().find(|b| !b.is_ascii_whitespace()) {
        // Batches are refused (documented): one message, one decision.
        Some(b'[') => return Err(ParseError { reason: Reason::McpBatchRefused, id: None, not_json: false }),
        None => return Err(ParseError { reason: Reason::McpMalformed, id: None, not_json: true }),
        _ => {}
    }
    let v = match strict_value(body) {
        Ok(v) => v,
        Err(e) => {
            let not_json = matches!(e.classify(), serde_json::error::Category::Syntax | serde_json::error::Category::Eof);
            // JSON, but refused (duplicate keys, too deep): the id, if a lenient reading finds
            // one, is still echoed so the client can match the error (serde_json bounds its
            // own recursion).
            let id = if not_json { None } else { lenient_id(body) };
            return Err(ParseError { reason: Reason::McpMalformed, id, not_json });
        }
    };
    let Value::Object(m) = v else { return Err(ParseError::malformed(None)) };
    // The id first, so every later refusal can keep it.
    let id = match m.get("id") {
        None => None,
        Some(v @ (Value::String(_) | Value::Number(_) | Value::Null)) => Some(v.clone()),
        Some(_) => return Err(ParseError::malformed(None)),
    };
    let bad = || ParseError::malformed(id.clone());
    let (mut jsonrpc, mut method, mut params) = (None, None, None);
    for (k, v) in m {
        match k.as_str() {
            "jsonrpc" => jsonrpc = Some(v),
            "method" => method = Some(v),
            "params" => params = Some(v),
            "id" => {}
            // Nothing else belongs in a request (`result`/`error` would make it a response).
            _ => return Err(bad()),
        }
    }
    if jsonrpc.as_ref().and_then(Value::as_str) != Some("2.0") {
        return Err(bad());
    }
    let method = match method {
        Some(Value::String(s)) if name_ok(&s, MAX_NAME) => s,
        _ => return Err(bad()),
    };
    let params = match params {
        None => None,
        Some(Value::Object(p)) => Some(p),
        Some(_) => return Err(bad()),
    };
    let mut msg = Message { id: id.clone(), method, name: None, arguments: None, uri: None };
    let named = matches!(msg.method.as_str(), "tools/call" | "prompts/get");
    for (k, v) in params.into_iter().flatten() {
        match (k.as_str(), v) {
            ("arguments", Value::Object(a)) => msg.arguments = Some(a),
            ("arguments", _) => return Err(bad()),
            ("name", Value::String(s)) if name_ok(&s, MAX_NAME) => msg.name = Some(s),
            // A tool name that is not a string (or not a name) is never judged.
            ("name", _) if named => return Err(bad()),
            ("uri", Value::String(s)) if name_ok(&s, MAX_URI) => msg.uri = Some(s),
            ("uri", _) if msg.method == "resources/read" => return Err(bad()),
            _ => {}
        }
    }
    let needs_name = matches!(msg.method.as_str(), "tools/call" | "prompts/get");
    if (needs_name && msg.name.is_none()) || (msg.method == "resources/read" && msg.uri.is_none()) {
        return Err(bad());
    }
    Ok(msg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn reason(body: &str) -> Reason {
        parse(body.as_bytes()).unwrap_err().reason
    }

    #[test]
    fn a_tool_call_is_read() {
        let m = parse(br#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"refund","arguments":{"amount":42}}}"#).unwrap();
        assert_eq!(m.id, Some(json!(7)));
        assert_eq!((m.method.as_str(), m.name.as_deref()), ("tools/call", Some("refund")));
        assert_eq!(m.arguments.unwrap()["amount"], json!(42));
        let m = parse(br#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#).unwrap();
        assert_eq!(m.id, None);
        let m = parse(br#"{"jsonrpc":"2.0","id":"a","method":"resources/read","params":{"uri":"tickets://1"}}"#).unwrap();
        assert_eq!(m.uri.as_deref(), Some("tickets://1"));
    }

    #[test]
    fn duplicate_tool_name_smuggling_is_refused() {
        // One parser takes the first `name`, another the last: never judge either.
        let e = parse(br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"get_ticket","name":"delete_customer"}}"#).unwrap_err();
        assert_eq!(e.reason, Reason::McpMalformed);
        assert!(!e.not_json);
        assert_eq!(reason(r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","method":"ping","params":{"name":"x"}}"#), Reason::McpMalformed);
        assert_eq!(reason(r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"x","arguments":{"amount":1,"amount":1000}}}"#), Reason::McpMalformed);
    }

    #[test]
    fn deep_nesting_bomb_is_refused_without_recursing_forever() {
        let deep = format!(r#"{{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{{"name":"x","arguments":{{"a":{}1{}}}}}}}"#, "[".repeat(100_000), "]".repeat(100_000));
        assert_eq!(reason(&deep), Reason::McpMalformed);
        let ok_depth = format!(r#"{{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{{"name":"x","arguments":{{"a":{}1{}}}}}}}"#, "[".repeat(29), "]".repeat(29));
        assert!(parse(ok_depth.as_bytes()).is_ok(), "32 levels: message, params, arguments and 29 arrays");
        let too_deep = format!(r#"{{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{{"name":"x","arguments":{{"a":{}1{}}}}}}}"#, "[".repeat(30), "]".repeat(30));
        assert_eq!(reason(&too_deep), Reason::McpMalformed);
    }

    #[test]
    fn batch_smuggling_a_second_call_is_refused() {
        assert_eq!(reason(r#" [{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"get_ticket"}},{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"delete_customer"}}]"#), Reason::McpBatchRefused);
    }

    #[test]
    fn wrong_shapes_keep_the_id() {
        for body in [
            r#"{"jsonrpc":"1.0","id":5,"method":"ping"}"#,
            r#"{"id":5,"method":"ping"}"#,
            r#"{"jsonrpc":"2.0","id":5}"#,
            r#"{"jsonrpc":"2.0","id":5,"method":7}"#,
            r#"{"jsonrpc":"2.0","id":5,"method":"tools/call","params":[1,2]}"#,
            r#"{"jsonrpc":"2.0","id":5,"method":"tools/call","params":{"name":"x","arguments":[1]}}"#,
            r#"{"jsonrpc":"2.0","id":5,"method":"tools/call","params":{"name":{"x":1}}}"#,
            r#"{"jsonrpc":"2.0","id":5,"method":"tools/call","params":{"name":["refund"]}}"#,
            r#"{"jsonrpc":"2.0","id":5,"method":"tools/call","params":{"arguments":{}}}"#,
            r#"{"jsonrpc":"2.0","id":5,"method":"resources/read","params":{"uri":5}}"#,
            r#"{"jsonrpc":"2.0","id":5,"method":"tools/call","params":{"name":"x"},"result":{}}"#,
            r#"{"jsonrpc":"2.0","id":5,"method":""}"#,
        ] {
            let e = parse(body.as_bytes()).unwrap_err();
            assert_eq!((e.reason, e.id.clone(), e.not_json), (Reason::McpMalformed, Some(json!(5)), false), "{body}");
        }
    }

    #[test]
    fn not_json_is_a_parse_error() {
        for body in ["", "   ", "{", "{\"jsonrpc\":\"2.0\",}", "nope", "{\"a\":1} trailing", "\u{feff}{}"] {
            let e = parse(body.as_bytes()).unwrap_err();
            assert_eq!(e.reason, Reason::McpMalformed, "{body:?}");
            assert!(e.not_json, "{body:?}");
        }
        let e = parse(b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"ping\",\"x\":\"\xff\"}").unwrap_err();
        assert!(e.not_json, "invalid UTF-8 in a string");
    }

    #[test]
    fn an_object_as_id_is_not_echoed() {
        let e = parse(br#"{"jsonrpc":"2.0","id":{"inject":1},"method":"ping"}"#).unwrap_err();
        assert_eq!(e.id, None);
    }

    #[test]
    fn control_characters_in_a_tool_name_are_refused() {
        assert_eq!(reason(r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"get_ticket\n"}}"#), Reason::McpMalformed);
        let long = format!(r#"{{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{{"name":"{}"}}}}"#, "a".repeat(129));
        assert_eq!(reason(&long), Reason::McpMalformed);
    }
}
