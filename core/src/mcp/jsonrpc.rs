//! A strict JSON-RPC 2.0 request parser for MCP bodies.
//!
//! Refuses what a lenient parser would let through and a server might read differently:
//! duplicate keys (which one wins differs between parsers), nesting deeper than
//! [`MAX_DEPTH`], batches, a wrong `jsonrpc`, a missing or non-string `method`, non-object
//! `params` or `arguments`, a non-string tool name or URI, and unknown top-level members.
//!
//! Nothing is built that grows with the body: the envelope is read into a few short strings,
//! and `arguments` stays a borrowed slice of the body ([`RawValue`]), checked for duplicates
//! and depth in place. A constraint reads the one value it points at ([`pointer`]).

use crate::policy::mcp::{McpArgs, McpCall, McpSource, RawArgs};
use crate::reason::Reason;
use serde::de::{DeserializeSeed, Deserializer, Error as _, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use std::borrow::Cow;
use std::collections::BTreeSet;
use std::fmt;

/// Deepest nesting accepted (objects and arrays), the message itself being level 1.
pub const MAX_DEPTH: usize = 32;
/// Longest method, tool or prompt name accepted.
const MAX_NAME: usize = 128;
/// Longest resource URI accepted.
const MAX_URI: usize = 4096;

/// A JSON-RPC request (or notification) as the policy needs it; `arguments` borrows the body.
#[derive(Debug, Clone, PartialEq)]
pub struct Message<'b> {
    /// `None`: absent (a notification); `Some(Null)`: `"id": null`.
    pub id: Option<Value>,
    pub method: String,
    pub name: Option<String>,
    /// The `arguments` object as sent (already checked: strict JSON, an object).
    pub arguments: Option<RawArgs<'b>>,
    pub uri: Option<String>,
}

impl<'b> Message<'b> {
    pub fn into_call(self) -> McpCall<'b> {
        McpCall {
            method: self.method,
            name: self.name,
            uri: self.uri,
            arguments: self.arguments.map_or(McpArgs::None, McpArgs::Raw),
            source: McpSource::Body,
        }
    }

    /// The arguments as a JSON object (tests, tools): built on demand, never on the request path.
    pub fn arguments_map(&self) -> Option<Map<String, Value>> {
        let args = self.arguments.as_ref()?;
        args.members.iter().map(|(k, v)| Some((k.to_string(), serde_json::from_slice(v.get().as_bytes()).ok()?))).collect()
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

/// An object key, borrowed from the body unless it holds escapes.
struct Key;

impl<'de> DeserializeSeed<'de> for Key {
    type Value = Cow<'de, str>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for Key {
    type Value = Cow<'de, str>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a key")
    }
    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(Cow::Borrowed(v))
    }
    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Cow::Owned(v.to_string()))
    }
    fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
        Ok(Cow::Owned(v))
    }
}

/// The keys of one object seen so far: a duplicate is refused the moment it is read.
#[derive(Default)]
struct SeenKeys<'de> {
    few: Vec<Cow<'de, str>>,
    many: BTreeSet<Cow<'de, str>>,
}

impl<'de> SeenKeys<'de> {
    /// Short objects are scanned; long ones (an attacker's) use a set: never quadratic.
    const SCAN: usize = 16;

    fn fresh(&mut self, k: Cow<'de, str>) -> bool {
        if self.many.is_empty() && self.few.len() < Self::SCAN {
            if self.few.contains(&k) {
                return false;
            }
            self.few.push(k);
            return true;
        }
        if self.many.is_empty() {
            self.many.extend(self.few.drain(..));
        }
        self.many.insert(k)
    }
}

/// How deep a value sits and whether duplicate keys are tolerated (only when looking for an
/// `id` to echo in a refusal: the last wins).
#[derive(Clone, Copy)]
struct Strict {
    depth: usize,
    lenient: bool,
}

impl Strict {
    fn inner<E: serde::de::Error>(self) -> Result<Strict, E> {
        if self.depth >= MAX_DEPTH {
            return Err(E::custom(TOO_DEEP));
        }
        Ok(Strict { depth: self.depth + 1, ..self })
    }
}

/// What a value is read for.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Role {
    /// Checked (duplicate keys, depth, strings that decode), nothing kept.
    Check,
    /// Checked; a scalar is kept, a container's shape noted.
    Member,
    /// The message.
    Envelope,
    /// `params`.
    Params,
    /// `params.arguments`: members kept as the body's own bytes.
    Arguments,
}

/// One visitor for every role: one copy of the JSON reader in the module, not five.
#[derive(Clone, Copy)]
struct Read {
    at: Strict,
    role: Role,
}

/// A value as read for its [`Role`].
#[derive(Debug, Default)]
enum Node<'de> {
    /// Not present.
    #[default]
    Absent,
    /// Checked and dropped ([`Role::Check`]).
    Checked,
    Str(Cow<'de, str>),
    /// A number, `true`/`false` or `null` (kept: it may be the `id`).
    Scalar(Value),
    Object,
    Array,
    Envelope(Box<Envelope<'de>>),
    Params(Box<Params<'de>>),
    Arguments(RawArgs<'de>),
    /// Not an object where one was wanted (message, params, arguments).
    NotObject,
}

/// The message's members, as far as the policy reads them.
#[derive(Debug, Default)]
struct Envelope<'de> {
    id: Node<'de>,
    jsonrpc: Node<'de>,
    method: Node<'de>,
    params: Node<'de>,
    /// A member that does not belong in a request.
    unknown: bool,
}

/// `params`, as far as the policy reads it.
#[derive(Debug, Default)]
struct Params<'de> {
    name: Node<'de>,
    uri: Node<'de>,
    arguments: Node<'de>,
}

impl Read {
    fn child(self, role: Role) -> Read {
        Read { role, ..self }
    }

    fn scalar<'de>(self, v: impl FnOnce() -> Value) -> Node<'de> {
        match self.role {
            Role::Check => Node::Checked,
            Role::Member => Node::Scalar(v()),
            _ => Node::NotObject,
        }
    }

    fn string<'de>(self, v: impl FnOnce() -> Cow<'de, str>) -> Node<'de> {
        match self.role {
            Role::Check => Node::Checked,
            Role::Member => Node::Str(v()),
            _ => Node::NotObject,
        }
    }
}

impl<'de> DeserializeSeed<'de> for Read {
    type Value = Node<'de>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Node<'de>, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Read {
    type Value = Node<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Node<'de>, E> {
        Ok(self.scalar(|| Value::Bool(v)))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Node<'de>, E> {
        Ok(self.scalar(|| Value::from(v)))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Node<'de>, E> {
        Ok(self.scalar(|| Value::from(v)))
    }
    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Node<'de>, E> {
        let n = serde_json::Number::from_f64(v).ok_or_else(|| E::custom("number out of range"))?;
        Ok(self.scalar(|| Value::Number(n)))
    }
    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Node<'de>, E> {
        Ok(self.string(|| Cow::Borrowed(v)))
    }
    fn visit_str<E>(self, v: &str) -> Result<Node<'de>, E> {
        Ok(self.string(|| Cow::Owned(v.to_string())))
    }
    fn visit_unit<E>(self) -> Result<Node<'de>, E> {
        Ok(self.scalar(|| Value::Null))
    }
    fn visit_none<E>(self) -> Result<Node<'de>, E> {
        Ok(self.scalar(|| Value::Null))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Node<'de>, A::Error> {
        let inner = Read { at: self.at.inner::<A::Error>()?, role: Role::Check };
        while seq.next_element_seed(inner)?.is_some() {}
        Ok(match self.role {
            Role::Check => Node::Checked,
            Role::Member => Node::Array,
            _ => Node::NotObject,
        })
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Node<'de>, A::Error> {
        let inner = Read { at: self.at.inner::<A::Error>()?, role: Role::Check };
        let mut seen = SeenKeys::default();
        let mut envelope = Envelope::default();
        let mut params = Params::default();
        let mut members = Vec::new();
        while let Some(k) = map.next_key_seed(Key)? {
            match (self.role, k.as_ref()) {
                (Role::Envelope, "id") => envelope.id = map.next_value_seed(inner.child(Role::Member))?,
                (Role::Envelope, "jsonrpc") => envelope.jsonrpc = map.next_value_seed(inner.child(Role::Member))?,
                (Role::Envelope, "method") => envelope.method = map.next_value_seed(inner.child(Role::Member))?,
                (Role::Envelope, "params") => envelope.params = map.next_value_seed(inner.child(Role::Params))?,
                (Role::Envelope, _) => {
                    map.next_value_seed(inner)?;
                    envelope.unknown = true;
                }
                (Role::Params, "name") => params.name = map.next_value_seed(inner.child(Role::Member))?,
                (Role::Params, "uri") => params.uri = map.next_value_seed(inner.child(Role::Member))?,
                (Role::Params, "arguments") => params.arguments = map.next_value_seed(inner.child(Role::Arguments))?,
                (Role::Arguments, _) => {
                    let raw: &'de RawValue = map.next_value()?;
                    // Capturing a value checks only its form: a number out of range (`1e400`)
                    // or an escape that decodes to nothing (a lone surrogate) would pass. So
                    // every member is read as a value, but for a string without escapes.
                    let text = raw.get();
                    if !text.starts_with('"') || text.contains('\\') {
                        let mut de = serde_json::Deserializer::from_str(text);
                        inner.deserialize(&mut de).map_err(A::Error::custom)?;
                    }
                    members.push((k.clone(), raw));
                }
                _ => {
                    map.next_value_seed(inner)?;
                }
            }
            if !seen.fresh(k) && !self.at.lenient {
                return Err(A::Error::custom(DUPLICATE));
            }
        }
        Ok(match self.role {
            Role::Check => Node::Checked,
            Role::Member => Node::Object,
            Role::Envelope => Node::Envelope(Box::new(envelope)),
            Role::Params => Node::Params(Box::new(params)),
            Role::Arguments => Node::Arguments(RawArgs { members }),
        })
    }
}

impl Node<'_> {
    /// A string member that is a name (or URI) of at most `max` bytes.
    fn name(&self, max: usize) -> Option<String> {
        match self {
            Node::Str(s) if name_ok(s, max) => Some(s.to_string()),
            _ => None,
        }
    }
}

fn read_envelope(body: &str, lenient: bool) -> Result<Node<'_>, serde_json::Error> {
    let mut de = serde_json::Deserializer::from_str(body);
    let e = Read { at: Strict { depth: 0, lenient }, role: Role::Envelope }.deserialize(&mut de)?;
    de.end()?;
    Ok(e)
}

/// Checks a whole text as strict JSON (no trailing data, no duplicate key, bounded depth).
pub fn check_strict(body: &str) -> Result<(), serde_json::Error> {
    let mut de = serde_json::Deserializer::from_str(body);
    Read { at: Strict { depth: 0, lenient: false }, role: Role::Check }.deserialize(&mut de)?;
    de.end()
}

/// Parses a whole text as strict JSON (no trailing data) into a value: for short texts
/// (header values, tools/list answers), never for a request body.
pub fn strict_value(body: &str) -> Result<Value, serde_json::Error> {
    check_strict(body)?;
    serde_json::from_slice(body.as_bytes())
}

fn scalar_id(m: &Node<'_>) -> Result<Option<Value>, ()> {
    match m {
        Node::Absent => Ok(None),
        Node::Str(s) => Ok(Some(Value::String(s.to_string()))),
        Node::Scalar(v @ (Value::Number(_) | Value::Null)) => Ok(Some(v.clone())),
        _ => Err(()),
    }
}

fn lenient_id(body: &str) -> Option<Value> {
    match read_envelope(body, true).ok()? {
        Node::Envelope(e) => scalar_id(&e.id).ok().flatten(),
        _ => None,
    }
}

fn name_ok(s: &str, max: usize) -> bool {
    !s.is_empty() && s.len() <= max && !s.chars().any(char::is_control)
}

/// Parses one MCP JSON-RPC request from a buffered body; the arguments borrow it.
pub fn parse(body: &[u8]) -> Result<Message<'_>, ParseError> {
    match body.iter().find(|b| !b.is_ascii_whitespace()) {
        // Batches are refused (documented): one message, one decision.
        Some(b'[') => return Err(ParseError { reason: Reason::McpBatchRefused, id: None, not_json: false }),
        None => return Err(ParseError { reason: Reason::McpMalformed, id: None, not_json: true }),
        _ => {}
    }
    // One UTF-8 check of the whole body; every later read is of text.
    let Ok(body) = std::str::from_utf8(body) else { return Err(ParseError { reason: Reason::McpMalformed, id: None, not_json: true }) };
    let e = match read_envelope(body, false) {
        Ok(Node::Envelope(e)) => e,
        Ok(_) => return Err(ParseError::malformed(None)),
        Err(err) => {
            let not_json = matches!(err.classify(), serde_json::error::Category::Syntax | serde_json::error::Category::Eof);
            // JSON, but refused (duplicate keys, too deep): the id, if a lenient reading finds
            // one, is still echoed so the client can match the error.
            let id = if not_json { None } else { lenient_id(body) };
            return Err(ParseError { reason: Reason::McpMalformed, id, not_json });
        }
    };
    // The id first, so every later refusal can keep it.
    let Ok(id) = scalar_id(&e.id) else { return Err(ParseError::malformed(None)) };
    let bad = || ParseError::malformed(id.clone());
    // Nothing else belongs in a request (`result`/`error` would make it a response).
    if e.unknown || !matches!(&e.jsonrpc, Node::Str(v) if v.as_ref() == "2.0") {
        return Err(bad());
    }
    let Some(method) = e.method.name(MAX_NAME) else { return Err(bad()) };
    let params = match e.params {
        Node::Absent => None,
        Node::Params(p) => Some(p),
        _ => return Err(bad()),
    };
    let named = matches!(method.as_str(), "tools/call" | "prompts/get");
    let mut msg = Message { id: id.clone(), method, name: None, arguments: None, uri: None };
    if let Some(p) = params {
        msg.arguments = match p.arguments {
            Node::Absent => None,
            Node::Arguments(args) => Some(args),
            _ => return Err(bad()),
        };
        msg.name = match &p.name {
            Node::Absent => None,
            // A tool name that is not a string (or not a name) is never judged.
            m => match m.name(MAX_NAME) {
                Some(n) => Some(n),
                None if named => return Err(bad()),
                None => None,
            },
        };
        msg.uri = match &p.uri {
            Node::Absent => None,
            m => match m.name(MAX_URI) {
                Some(u) => Some(u),
                None if msg.method == "resources/read" => return Err(bad()),
                None => None,
            },
        };
    }
    if (named && msg.name.is_none()) || (msg.method == "resources/read" && msg.uri.is_none()) {
        return Err(bad());
    }
    Ok(msg)
}

/// The value a JSON pointer's tokens name inside the arguments: the top-level member is
/// found in place, and only it is built.
/// An argument that is present but cannot be read as a value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unreadable;

/// `Err`: the member is there but cannot be read as a value. Never the case for arguments
/// [`parse`] accepted; a caller treats it as a failed check, never as an absent argument.
pub fn pointer(args: &RawArgs<'_>, tokens: &[String]) -> Result<Option<Value>, Unreadable> {
    let Some((first, rest)) = tokens.split_first() else { return Ok(None) };
    let Some(raw) = args.get(first) else { return Ok(None) };
    let member: Value = serde_json::from_slice(raw.get().as_bytes()).map_err(|_| Unreadable)?;
    if rest.is_empty() {
        return Ok(Some(member));
    }
    Ok(crate::policy::mcp::resolve_within(rest, &member).cloned())
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
        assert_eq!(m.arguments_map().unwrap()["amount"], json!(42));
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
    fn arguments_are_read_in_place_not_copied() {
        let body = format!(r#"{{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{{"name":"x","arguments":{{"note":"{}","ticket":"T-1"}}}}}}"#, "n".repeat(4096));
        let m = parse(body.as_bytes()).unwrap();
        let args = m.arguments.as_ref().unwrap();
        let range = body.as_bytes().as_ptr_range();
        assert!(args.members.iter().all(|(_, v)| range.contains(&v.get().as_ptr())), "the arguments borrow the body");
        assert_eq!(pointer(args, &["ticket".into()]), Ok(Some(json!("T-1"))));
    }

    #[test]
    fn escaped_duplicate_key_smuggling_is_refused() {
        // `\u0061mount` is `amount`: one parser sees two keys, another one overwritten.
        assert_eq!(reason(r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"x","arguments":{"amount":1,"\u0061mount":1000}}}"#), Reason::McpMalformed);
        assert_eq!(reason(r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"x","n\u0061me":"y"}}"#), Reason::McpMalformed);
        assert_eq!(reason(r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"x","arguments":{"a":{"b":1,"\u0062":2}}}}"#), Reason::McpMalformed);
        assert_eq!(reason(r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","\u0070arams":{},"params":{"name":"x"}}"#), Reason::McpMalformed);
    }

    #[test]
    fn long_argument_objects_are_checked_for_duplicates_without_quadratic_work() {
        let keys: Vec<String> = (0..5000).map(|i| format!(r#""k{i}":{i}"#)).collect();
        let ok = format!(r#"{{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{{"name":"x","arguments":{{{}}}}}}}"#, keys.join(","));
        assert!(parse(ok.as_bytes()).is_ok());
        let dup = format!(r#"{{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{{"name":"x","arguments":{{{},"k4321":0}}}}}}"#, keys.join(","));
        assert_eq!(reason(&dup), Reason::McpMalformed);
        let early = format!(r#"{{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{{"name":"x","arguments":{{"k3":0,{}}}}}}}"#, keys.join(","));
        assert_eq!(reason(&early), Reason::McpMalformed, "a duplicate of a key seen before the set took over");
    }

    #[test]
    fn pointer_escaped_keys_and_array_index_tricks() {
        let body = br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"x","arguments":{"a\u0062":{"list":[10,{"deep":"v"}]},"n":null}}}"#;
        let args = parse(body).unwrap().arguments.unwrap();
        let p = |t: &[&str]| pointer(&args, &t.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        assert_eq!(p(&["ab", "list", "1", "deep"]), Some(json!("v")), "an escaped key is its unescaped name");
        assert_eq!(p(&["ab", "list", "0"]), Some(json!(10)));
        assert_eq!(p(&["ab", "list", "01"]), None, "a leading zero is not an index");
        assert_eq!(p(&["ab", "list", "-1"]), None);
        assert_eq!(p(&["ab", "list", "2"]), None, "past the end");
        assert_eq!(p(&["ab", "list", "1", "deep", "x"]), None, "below a string");
        assert_eq!(p(&["n"]), Some(json!(null)), "present and null is not absent");
        assert_eq!(p(&["missing"]), None);
        assert_eq!(p(&["ab", "0"]), None, "an object is not indexed by position");
    }

    #[test]
    fn out_of_range_number_skips_optional_cap() {
        // `1e400` is infinite to a server's parser (Python reads `inf`): refused, never read as
        // an absent (so unchecked) argument.
        for body in [
            r#"{"jsonrpc":"2.0","id":4,"method":"tools/call","params":{"name":"refund","arguments":{"amount":1e400}}}"#,
            r#"{"jsonrpc":"2.0","id":4,"method":"tools/call","params":{"name":"refund","arguments":{"amount":-1e400}}}"#,
            r#"{"jsonrpc":"2.0","id":4,"method":"tools/call","params":{"name":"refund","arguments":{"x":{"amount":1e999}}}}"#,
        ] {
            assert_eq!(parse(body.as_bytes()).unwrap_err().reason, Reason::McpMalformed, "{body}");
        }
        // A member that somehow cannot be read is an error, not an absence.
        let raw: &RawValue = serde_json::from_str("\"\\ud800\"").unwrap();
        let args = RawArgs { members: vec![(Cow::Borrowed("amount"), raw)] };
        assert_eq!(pointer(&args, &["amount".into()]), Err(Unreadable));
        assert_eq!(pointer(&args, &["other".into()]), Ok(None));
    }

    #[test]
    fn lone_surrogate_in_arguments_is_refused() {
        for body in [
            r#"{"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":"x","arguments":{"a":"\ud800"}}}"#,
            r#"{"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":"x","arguments":{"a":{"b":["\udc00x"]}}}}"#,
            r#"{"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":"x","arguments":{"\ud800":1}}}"#,
            r#"{"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":"x","_meta":{"k":"\ud800"}}}"#,
        ] {
            assert_eq!(parse(body.as_bytes()).unwrap_err().reason, Reason::McpMalformed, "{body}");
        }
    }

    #[test]
    fn control_characters_in_a_tool_name_are_refused() {
        assert_eq!(reason(r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"get_ticket\n"}}"#), Reason::McpMalformed);
        let long = format!(r#"{{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{{"name":"{}"}}}}"#, "a".repeat(129));
        assert_eq!(reason(&long), Reason::McpMalformed);
    }
}
