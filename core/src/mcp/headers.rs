//! The MCP 2026-07-28 request headers: `MCP-Protocol-Version`, `Mcp-Method`, `Mcp-Name` and
//! `Mcp-Param-{Name}` (values outside visible ASCII travel as `=?base64?…?=`).

use crate::headers::Headers;
use crate::policy::mcp::{McpArgs, McpCall, McpSource};
use crate::reason::Reason;
use base64::alphabet::STANDARD;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use base64::Engine as _;

pub const VERSION_HEADER: &str = "mcp-protocol-version";
pub const METHOD_HEADER: &str = "mcp-method";
pub const NAME_HEADER: &str = "mcp-name";
pub const PARAM_PREFIX: &str = "mcp-param-";
/// The first revision that mirrors the call into headers.
pub const HEADER_VERSION: &str = "2026-07-28";
/// Most `Mcp-Param-*` headers read.
const MAX_PARAMS: usize = 64;
/// Longest decoded header value.
const MAX_VALUE: usize = 8192;

const B64: GeneralPurpose = GeneralPurpose::new(&STANDARD, GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent));

/// What the MCP headers of a request say.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct McpHeaders {
    pub version: Option<String>,
    pub method: Option<String>,
    pub name: Option<String>,
    /// (lowercased parameter name, decoded value), in header order.
    pub params: Vec<(String, String)>,
}

/// Decodes one header value: visible ASCII (and spaces) as is, or the `=?base64?…?=` form
/// (which must decode to UTF-8). Anything else is malformed.
pub fn decode_value(raw: &[u8]) -> Result<String, Reason> {
    if raw.len() > MAX_VALUE * 2 {
        return Err(Reason::McpMalformed);
    }
    let text = if let Some(inner) = raw.strip_prefix(b"=?base64?").and_then(|r| r.strip_suffix(b"?=")) {
        let bytes = B64.decode(inner).map_err(|_| Reason::McpMalformed)?;
        String::from_utf8(bytes).map_err(|_| Reason::McpMalformed)?
    } else if raw.get(..9).is_some_and(|p| p.eq_ignore_ascii_case(b"=?base64?")) {
        // `=?BASE64?…?=` and other spellings: a server may decode what the filter would judge
        // as literal text. Neither reading is safe to judge.
        return Err(Reason::McpMalformed);
    } else {
        if !raw.iter().all(|b| (0x20..0x7f).contains(b) || *b == b'\t') {
            return Err(Reason::McpMalformed);
        }
        String::from_utf8(raw.to_vec()).map_err(|_| Reason::McpMalformed)?
    };
    if text.len() > MAX_VALUE {
        return Err(Reason::McpMalformed);
    }
    Ok(text)
}

fn single(h: &Headers, name: &str) -> Result<Option<String>, Reason> {
    match h.single(name) {
        Ok(None) => Ok(None),
        Ok(Some(v)) => decode_value(v).map(Some),
        Err(_) => Err(Reason::McpMalformed),
    }
}

fn is_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= 4096 && !s.chars().any(char::is_control)
}

/// Reads the MCP headers. A duplicated or undecodable one is `mcp_malformed`.
pub fn read(h: &Headers) -> Result<McpHeaders, Reason> {
    let version = single(h, VERSION_HEADER)?;
    if let Some(v) = &version {
        let b = v.as_bytes();
        let date = b.len() == 10 && b.iter().enumerate().all(|(i, c)| if i == 4 || i == 7 { *c == b'-' } else { c.is_ascii_digit() });
        if !date {
            return Err(Reason::McpMalformed);
        }
    }
    let method = single(h, METHOD_HEADER)?;
    let name = single(h, NAME_HEADER)?;
    if method.as_deref().is_some_and(|m| !is_name(m) || m.len() > 128) || name.as_deref().is_some_and(|n| !is_name(n)) {
        return Err(Reason::McpMalformed);
    }
    let mut params: Vec<(String, String)> = Vec::new();
    let prefix = PARAM_PREFIX.as_bytes();
    for (k, v) in h.pairs() {
        let Some(p) = k.get(..prefix.len()) else { continue };
        if !p.eq_ignore_ascii_case(prefix) {
            continue;
        }
        let pname = k.get(prefix.len()..).unwrap_or_default();
        if pname.is_empty() || params.len() >= MAX_PARAMS {
            return Err(Reason::McpMalformed);
        }
        let pname = std::str::from_utf8(pname).map_err(|_| Reason::McpMalformed)?.to_ascii_lowercase();
        if params.iter().any(|(n, _)| *n == pname) {
            return Err(Reason::McpMalformed);
        }
        params.push((pname, decode_value(v)?));
    }
    Ok(McpHeaders { version, method, name, params })
}

impl McpHeaders {
    /// Whether any MCP header was sent.
    pub fn present(&self) -> bool {
        self.version.is_some() || self.method.is_some() || self.name.is_some() || !self.params.is_empty()
    }

    /// The 2026-07-28 fast path applies: a recent enough version and `Mcp-Method`.
    pub fn fast_path(&self) -> bool {
        self.version.as_deref().is_some_and(|v| v >= HEADER_VERSION) && self.method.is_some()
    }

    /// The call as the headers describe it, if they describe it completely (a method that
    /// names a tool, prompt or URI needs `Mcp-Name`).
    pub fn call(&self) -> Option<McpCall<'static>> {
        if !self.fast_path() {
            return None;
        }
        let method = self.method.clone()?;
        let (name, uri) = match method.as_str() {
            "tools/call" | "prompts/get" => (Some(self.name.clone()?), None),
            "resources/read" => (None, Some(self.name.clone()?)),
            _ => (None, None),
        };
        let arguments = if self.params.is_empty() { McpArgs::Headers(Vec::new()) } else { McpArgs::Headers(self.params.clone()) };
        Some(McpCall { method, name, uri, arguments, source: McpSource::Header })
    }
}

/// Whether headers and body agree (MCP requires a server to refuse a mismatch; so do we):
/// method, name (or URI) and every mirrored parameter must equal the body's.
pub fn agree(h: &McpHeaders, m: &super::jsonrpc::Message) -> bool {
    if h.method.as_deref().is_some_and(|x| x != m.method) {
        return false;
    }
    if let Some(n) = &h.name {
        let body_name = if m.method == "resources/read" { m.uri.as_deref() } else { m.name.as_deref() };
        if body_name != Some(n.as_str()) {
            return false;
        }
    }
    for (pname, value) in &h.params {
        let mut found = m.arguments.iter().flat_map(|a| a.members.iter()).filter(|(k, _)| k.eq_ignore_ascii_case(pname));
        let (Some((_, raw)), None) = (found.next(), found.next()) else { return false };
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(raw.get().as_bytes()) else { return false };
        let same = match &v {
            serde_json::Value::String(s) => s == value,
            serde_json::Value::Number(_) | serde_json::Value::Bool(_) | serde_json::Value::Null => value.as_str() == v.to_string().as_str(),
            _ => false,
        };
        if !same {
            return false;
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mcp::jsonrpc::parse;

    fn h(pairs: &[(&str, &[u8])]) -> Headers {
        Headers::new(pairs.iter().map(|(k, v)| (k.to_string(), v.to_vec())).collect())
    }

    #[test]
    fn headers_describe_a_tool_call() {
        let m = read(&h(&[("mcp-protocol-version", b"2026-07-28"), ("mcp-method", b"tools/call"), ("mcp-name", b"refund"), ("Mcp-Param-Amount", b"42")])).unwrap();
        assert!(m.fast_path());
        let c = m.call().unwrap();
        assert_eq!((c.method.as_str(), c.tool()), ("tools/call", Some("refund")));
        assert_eq!(c.arguments, McpArgs::Headers(vec![("amount".into(), "42".into())]));
    }

    #[test]
    fn base64_values_are_decoded() {
        let m = read(&h(&[("mcp-method", b"tools/call"), ("mcp-name", b"=?base64?cmVmdW5k?="), ("mcp-param-text", b"=?base64?w6nDqA==?=")])).unwrap();
        assert_eq!(m.name.as_deref(), Some("refund"));
        assert_eq!(m.params, vec![("text".to_string(), "éè".to_string())]);
    }

    #[test]
    fn malformed_base64_or_raw_non_ascii_is_refused() {
        for v in [&b"=?base64?***?="[..], b"=?base64?//79?=", b"caf\xc3\xa9", b"\x00", b"a\nb"] {
            assert_eq!(read(&h(&[("mcp-name", v)])), Err(Reason::McpMalformed), "{v:?}");
        }
    }

    #[test]
    fn encoded_value_in_another_case_cannot_be_judged_as_literal_text() {
        // A server that decodes `=?BASE64?…?=` would act on `/etc/passwd` while a literal
        // reading judged the wrapper: refused instead.
        for v in [&b"=?BASE64?L2V0Yy9wYXNzd2Q=?="[..], b"=?Base64?L2V0Yy9wYXNzd2Q=?=", b"=?BASE64?"] {
            assert_eq!(read(&h(&[("mcp-param-path", v)])), Err(Reason::McpMalformed), "{v:?}");
        }
        assert_eq!(read(&h(&[("mcp-param-path", b"=?base64?L2V0Yy9wYXNzd2Q=?=")])).map(|m| m.params), Ok(vec![("path".to_string(), "/etc/passwd".to_string())]));
    }

    #[test]
    fn duplicated_mcp_headers_cannot_pick_the_judged_tool() {
        assert_eq!(read(&h(&[("mcp-name", b"get_ticket"), ("mcp-name", b"delete_customer")])), Err(Reason::McpMalformed));
        assert_eq!(read(&h(&[("mcp-param-amount", b"1"), ("Mcp-Param-AMOUNT", b"1000")])), Err(Reason::McpMalformed));
        assert_eq!(read(&h(&[("mcp-param-", b"1")])), Err(Reason::McpMalformed));
    }

    #[test]
    fn old_or_missing_version_takes_the_body_path() {
        let m = read(&h(&[("mcp-protocol-version", b"2025-06-18"), ("mcp-method", b"tools/call"), ("mcp-name", b"x")])).unwrap();
        assert!(!m.fast_path() && m.call().is_none());
        let m = read(&h(&[("mcp-method", b"tools/call"), ("mcp-name", b"x")])).unwrap();
        assert!(m.call().is_none());
        assert_eq!(read(&h(&[("mcp-protocol-version", b"latest")])), Err(Reason::McpMalformed));
        let m = read(&h(&[("mcp-protocol-version", b"2026-07-28"), ("mcp-method", b"tools/call")])).unwrap();
        assert!(m.call().is_none(), "a tool call without Mcp-Name needs the body");
    }

    #[test]
    fn header_body_disagreement_is_detected() {
        let body = parse(br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"refund","arguments":{"amount":500,"ticket_id":"T-1"}}}"#).unwrap();
        let hd = |pairs: &[(&str, &[u8])]| read(&h(pairs)).unwrap();
        assert!(agree(&hd(&[("mcp-method", b"tools/call"), ("mcp-name", b"refund"), ("mcp-param-amount", b"500")]), &body));
        assert!(agree(&hd(&[("mcp-param-Ticket_Id", b"T-1")]), &body), "names match case-insensitively");
        assert!(!agree(&hd(&[("mcp-name", b"get_ticket")]), &body), "header names a harmless tool, body calls refund");
        assert!(!agree(&hd(&[("mcp-method", b"tools/list")]), &body));
        assert!(!agree(&hd(&[("mcp-param-amount", b"50")]), &body), "header shows 50, body pays 500");
        assert!(!agree(&hd(&[("mcp-param-missing", b"x")]), &body));
        let twice = parse(br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"refund","arguments":{"amount":5,"Amount":500}}}"#).unwrap();
        assert!(!agree(&hd(&[("mcp-param-amount", b"5")]), &twice), "two keys that differ only in case are ambiguous");
    }
}
