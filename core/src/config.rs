//! Plugin configuration: JSON from Envoy's `StringValue` or Istio's `pluginConfig`.
//!
//! Parsing is strict: unknown fields are refused and every invalid value is
//! reported with the dotted path of the field, so an operator can fix it
//! from one log line.

use serde::Deserialize;

/// A configuration error naming the offending field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Dotted path of the field, e.g. `identity.trust_domains[0].name`; `.` for the root.
    pub field: String,
    pub message: String,
}

impl ConfigError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError { field: field.into(), message: message.into() }
    }
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "invalid configuration at `{}`: {}", self.field, self.message)
    }
}

impl std::error::Error for ConfigError {}

#[derive(Debug, Clone, Deserialize, Default)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Ignored by the filter: where editors find this JSON Schema (plugin/config.schema.json).
    #[serde(default, rename = "$schema")]
    pub schema: Option<String>,
    #[serde(default)]
    pub identity: IdentityConfig,
    #[serde(default)]
    pub upstream: UpstreamConfig,
    /// Request-time policy. Without one, every request is denied (`no_rule_matched`).
    #[serde(default)]
    pub policy: Option<crate::policy::PolicyConfig>,
    /// Just-in-time credentials: without a minter, allowed requests go upstream with no credential.
    #[serde(default)]
    pub minter: Option<crate::mint::MinterConfig>,
    #[serde(default)]
    pub records: RecordsConfig,
    /// Delegation (issue 13): Transaction Tokens from the minter, verified and enforced.
    #[serde(default)]
    pub delegation: Option<crate::delegation::DelegationConfig>,
}

/// Where decision records go. At least one delivery must stay on: every decision is recorded.
#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[cfg_attr(feature = "schema", schemars(extend("not" = {"properties": {"log": {"const": false}, "filter_state": {"const": false}}, "required": ["log", "filter_state"]})))]
#[serde(deny_unknown_fields)]
pub struct RecordsConfig {
    /// One `mandate.decision {json}` line per request through the proxy's log.
    #[serde(default = "default_true")]
    pub log: bool,
    /// The record as filter state `wasm.mandate.decision`, for Envoy access logs.
    #[serde(default = "default_true")]
    pub filter_state: bool,
    /// How long log lines and the per-request counters may wait in the filter before they are
    /// handed to the proxy in one call (as Envoy's own file access log buffers). 0: every
    /// record and counter at once.
    #[serde(default = "default_flush_ms")]
    #[cfg_attr(feature = "schema", schemars(range(max = 10000)))]
    #[cfg_attr(feature = "schema", schemars(extend("not" = {"exclusiveMinimum": 0, "exclusiveMaximum": 50})))]
    pub flush_ms: u64,
}

/// Longest a buffered record may wait.
pub const MAX_FLUSH_MS: u64 = 10_000;
/// Shortest batching period (the host's timer granularity is coarse; below this, don't batch).
pub const MIN_FLUSH_MS: u64 = 50;

fn default_flush_ms() -> u64 {
    1000
}

impl Default for RecordsConfig {
    fn default() -> Self {
        RecordsConfig { log: true, filter_state: true, flush_ms: default_flush_ms() }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct IdentityConfig {
    /// Request header carrying the caller's token.
    #[serde(default = "default_token_header")]
    #[cfg_attr(feature = "schema", schemars(pattern(crate::config::HEADER_NAME_PATTERN)))]
    pub header: String,
    /// Auth scheme expected before the token (case-insensitive); empty = the whole value is the token.
    #[serde(default = "default_scheme")]
    #[cfg_attr(feature = "schema", schemars(pattern(r"^[A-Za-z0-9-]*$")))]
    pub scheme: String,
    /// Forward the caller's token upstream. Off by default: the service never sees it.
    #[serde(default)]
    pub forward_token: bool,
    /// Audiences accepted in JWT-SVIDs (the token must name at least one).
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(inner(length(min = 1))))]
    pub audiences: Vec<String>,
    /// Tolerated clock skew for `exp`, `nbf` and `iat`, seconds.
    #[serde(default = "default_skew")]
    #[cfg_attr(feature = "schema", schemars(range(max = 600)))]
    pub clock_skew_s: u64,
    /// Longest token accepted, bytes.
    #[serde(default = "default_max_token")]
    #[cfg_attr(feature = "schema", schemars(range(min = 64, max = 65536)))]
    pub max_token_bytes: usize,
    /// Verified-token cache entries per worker (0 disables the cache).
    #[serde(default = "default_cache_size")]
    #[cfg_attr(feature = "schema", schemars(range(max = 1000000)))]
    pub cache_size: usize,
    /// Trust domains whose JWT-SVIDs are accepted, each with its own bundle.
    #[serde(default)]
    pub trust_domains: Vec<TrustDomainConfig>,
    /// OIDC issuers whose tokens are accepted (e.g. Kubernetes service-account tokens).
    #[serde(default)]
    pub oidc_issuers: Vec<OidcIssuerConfig>,
    /// If set, the verified identity is sent upstream in this header.
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(pattern(crate::config::HEADER_NAME_PATTERN)))]
    pub upstream_header: Option<String>,
}

impl Default for IdentityConfig {
    fn default() -> Self {
        IdentityConfig {
            header: default_token_header(),
            scheme: default_scheme(),
            forward_token: false,
            audiences: Vec::new(),
            clock_skew_s: default_skew(),
            max_token_bytes: default_max_token(),
            cache_size: default_cache_size(),
            trust_domains: Vec::new(),
            oidc_issuers: Vec::new(),
            upstream_header: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct TrustDomainConfig {
    /// Trust domain name, e.g. `example.org`.
    #[cfg_attr(feature = "schema", schemars(pattern(r"^[a-z0-9._-]+$")))]
    #[cfg_attr(feature = "schema", schemars(length(max = 255)))]
    pub name: String,
    pub bundle: BundleSourceConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct OidcIssuerConfig {
    /// Exact `iss` value.
    #[cfg_attr(feature = "schema", schemars(length(min = 1)))]
    pub issuer: String,
    /// Audiences accepted from this issuer.
    #[cfg_attr(feature = "schema", schemars(length(min = 1)))]
    #[cfg_attr(feature = "schema", schemars(inner(length(min = 1))))]
    pub audiences: Vec<String>,
    pub jwks: BundleSourceConfig,
    /// Maps the token to a SPIFFE-style ID: `{sub}` is the subject, `{sub:N}` its
    /// N-th `:`-separated part (0-based). E.g. `spiffe://cluster.local/ns/{sub:2}/sa/{sub:3}`.
    #[serde(default)]
    pub spiffe_template: Option<String>,
}

/// Where a bundle comes from: inline JSON, or fetched through an Envoy cluster.
#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[cfg_attr(feature = "schema", schemars(extend("oneOf" = [{"required": ["inline"]}, {"required": ["cluster"]}])))]
#[serde(deny_unknown_fields)]
pub struct BundleSourceConfig {
    /// The bundle itself (SPIFFE bundle or plain JWKS).
    #[serde(default)]
    pub inline: Option<serde_json::Value>,
    /// Envoy cluster serving the bundle over HTTP.
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(length(min = 1)))]
    pub cluster: Option<String>,
    #[serde(default = "default_bundle_path")]
    #[cfg_attr(feature = "schema", schemars(pattern(r"^/")))]
    pub path: String,
    /// `:authority` of the fetch; defaults to the cluster name.
    #[serde(default)]
    pub authority: Option<String>,
    /// Refresh interval when the bundle carries no `spiffe_refresh_hint`, seconds.
    #[serde(default = "default_refresh")]
    #[cfg_attr(feature = "schema", schemars(range(min = 5, max = 86400)))]
    pub refresh_s: u64,
    /// Retry interval after a failed fetch, seconds.
    #[serde(default = "default_retry")]
    #[cfg_attr(feature = "schema", schemars(range(min = 1, max = 86400)))]
    pub retry_s: u64,
    #[serde(default = "default_fetch_timeout")]
    #[cfg_attr(feature = "schema", schemars(range(min = 10, max = 60000)))]
    pub timeout_ms: u64,
    /// Fetched bundles only: how long after the last good fetch the bundle still verifies
    /// tokens while fetches fail, seconds (default 3600, 60..=604800). Past it, tokens of
    /// this trust domain or issuer get `bundle_unavailable`. Inline bundles never age.
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(range(min = 60, max = 604800)))]
    pub max_bundle_age_s: Option<u64>,
}

/// Default `max_bundle_age_s` of fetched bundles, seconds.
pub const DEFAULT_MAX_BUNDLE_AGE_S: u64 = 3600;
/// Bounds of `max_bundle_age_s`, seconds.
pub const MAX_BUNDLE_AGE_RANGE: std::ops::RangeInclusive<u64> = 60..=604_800;

#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// Header that carries the decision id upstream (and in local replies).
    #[serde(default = "default_decision_header")]
    #[cfg_attr(feature = "schema", schemars(pattern(crate::config::HEADER_NAME_PATTERN)))]
    pub decision_id_header: String,
    /// Send the normalised path upstream, so the service sees what the policy judged.
    #[serde(default = "default_true")]
    pub rewrite_path: bool,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig { decision_id_header: default_decision_header(), rewrite_path: true }
    }
}

fn default_true() -> bool {
    true
}

fn default_token_header() -> String {
    "authorization".into()
}
fn default_scheme() -> String {
    "Bearer".into()
}
fn default_skew() -> u64 {
    30
}
fn default_max_token() -> usize {
    8192
}
fn default_cache_size() -> usize {
    4096
}
fn default_bundle_path() -> String {
    "/".into()
}
fn default_refresh() -> u64 {
    300
}
fn default_retry() -> u64 {
    10
}
fn default_fetch_timeout() -> u64 {
    1000
}
fn default_decision_header() -> String {
    "x-mandate-decision-id".into()
}

/// Parses and validates the plugin configuration. Empty input means all defaults.
pub fn parse(raw: &[u8]) -> Result<Config, ConfigError> {
    let trimmed = raw.iter().all(|b| b.is_ascii_whitespace());
    let config: Config = if trimmed {
        Config::default()
    } else {
        from_json(raw, "")?
    };
    validate(&config)?;
    Ok(config)
}

/// Deserialises `raw` (strict JSON, nothing after the value, no key twice in an object),
/// naming the failing field on error, with `prefix` as the path of the root (`""`: none).
///
/// The text is parsed into a `serde_json::Value` first (syntax errors are located by where
/// serde_json stopped, see [`scan`]), then `T` is read from the tree by [`tree::Node`], which
/// knows the path of every value it hands out. Reading the config types from the tree with
/// that small deserializer takes far less code than serde_json's text deserializer (or
/// serde_path_to_error around it) instantiated for every config type.
pub(crate) fn from_json<T: serde::de::DeserializeOwned>(raw: &[u8], prefix: &str) -> Result<T, ConfigError> {
    let value = json_tree(raw, prefix)?;
    let failed = std::cell::RefCell::new(None);
    let root = tree::At { parent: None, seg: tree::Seg::Root(prefix) };
    T::deserialize(tree::Node { v: &value, at: &root, failed: &failed }).map_err(|e| {
        let field = match failed.into_inner() {
            Some(field) if !field.is_empty() => field,
            _ => prefixed(prefix, String::new()),
        };
        ConfigError::new(field, e.to_string())
    })
}

/// The JSON text as a tree, refusing a key repeated in an object. Not generic: one copy
/// whatever `from_json` reads.
#[inline(never)]
fn json_tree(raw: &[u8], prefix: &str) -> Result<serde_json::Value, ConfigError> {
    let value: serde_json::Value = serde_json::from_slice(raw).map_err(|e| json_error(raw, prefix, &e))?;
    // The tree keeps the last of repeated keys; the text deserializer refused them.
    if let (field, true) = scan(raw, true) {
        return Err(ConfigError::new(prefixed(prefix, field), "duplicate field"));
    }
    Ok(value)
}

/// A deserializer over a parsed JSON tree that knows where it is, so the first failing value
/// can be named. Every type is read through one small `deserialize_any`; the path is only
/// rendered when something fails.
mod tree {
    use serde::de::{self, value::BorrowedStrDeserializer, DeserializeSeed, IntoDeserializer, Visitor};
    use serde_json::{Error, Value};
    use std::cell::RefCell;

    pub(super) enum Seg<'a> {
        Root(&'a str),
        Key(&'a str),
        Index(usize),
    }

    /// One step of the path, linked to its parent on the stack.
    pub(super) struct At<'a> {
        pub parent: Option<&'a At<'a>>,
        pub seg: Seg<'a>,
    }

    pub(super) struct Node<'a, 'de> {
        pub v: &'de Value,
        pub at: &'a At<'a>,
        /// The path of the innermost value that failed (set once, by the first to fail).
        pub failed: &'a RefCell<Option<String>>,
    }

    #[cold]
    #[inline(never)]
    fn record(failed: &RefCell<Option<String>>, at: &At<'_>) {
        let mut slot = failed.borrow_mut();
        if slot.is_some() {
            return;
        }
        let mut segs = Vec::new();
        let mut cur = Some(at);
        while let Some(a) = cur {
            segs.push(&a.seg);
            cur = a.parent;
        }
        let mut path = String::new();
        for seg in segs.iter().rev() {
            match seg {
                Seg::Root(p) => path.push_str(p),
                Seg::Key(k) => {
                    if !path.is_empty() {
                        path.push('.');
                    }
                    path.push_str(k);
                }
                Seg::Index(i) => path.push_str(&format!("[{i}]")),
            }
        }
        *slot = Some(path);
    }

    impl<'a, 'de> de::Deserializer<'de> for Node<'a, 'de> {
        type Error = Error;

        fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
            match self.v {
                Value::Null => visitor.visit_unit(),
                Value::Bool(b) => visitor.visit_bool(*b),
                Value::Number(n) => match (n.as_u64(), n.as_i64()) {
                    (Some(u), _) => visitor.visit_u64(u),
                    (None, Some(i)) => visitor.visit_i64(i),
                    (None, None) => visitor.visit_f64(n.as_f64().unwrap_or(f64::NAN)),
                },
                Value::String(s) => visitor.visit_borrowed_str(s),
                Value::Array(items) => {
                    let mut seq = Seq { items, next: 0, at: self.at, failed: self.failed };
                    let out = visitor.visit_seq(&mut seq)?;
                    if seq.next < items.len() {
                        return Err(de::Error::invalid_length(items.len(), &"fewer elements"));
                    }
                    Ok(out)
                }
                Value::Object(map) => {
                    visitor.visit_map(Map { iter: map.iter(), value: None, at: self.at, failed: self.failed })
                }
            }
        }

        fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
            match self.v {
                Value::Null => visitor.visit_none(),
                _ => visitor.visit_some(self),
            }
        }

        fn deserialize_enum<V: Visitor<'de>>(
            self,
            _name: &'static str,
            _variants: &'static [&'static str],
            visitor: V,
        ) -> Result<V::Value, Error> {
            match self.v {
                // Configuration enums are unit variants, written as strings.
                Value::String(s) => visitor.visit_enum(IntoDeserializer::<Error>::into_deserializer(s.as_str())),
                other => Err(wrong(other, &visitor)),
            }
        }

        fn deserialize_newtype_struct<V: Visitor<'de>>(self, _name: &'static str, visitor: V) -> Result<V::Value, Error> {
            visitor.visit_newtype_struct(self)
        }

        fn deserialize_bool<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
            match self.v {
                Value::Bool(b) => visitor.visit_bool(*b),
                other => Err(wrong(other, &visitor)),
            }
        }

        fn deserialize_u64<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
            match self.v {
                Value::Number(n) => match (n.as_u64(), n.as_i64()) {
                    (Some(u), _) => visitor.visit_u64(u),
                    (None, Some(i)) => visitor.visit_i64(i),
                    (None, None) => visitor.visit_f64(n.as_f64().unwrap_or(f64::NAN)),
                },
                other => Err(wrong(other, &visitor)),
            }
        }

        fn deserialize_str<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
            match self.v {
                Value::String(s) => visitor.visit_borrowed_str(s),
                other => Err(wrong(other, &visitor)),
            }
        }

        fn deserialize_string<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
            self.deserialize_str(visitor)
        }

        fn deserialize_identifier<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
            self.deserialize_str(visitor)
        }

        fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
            match self.v {
                Value::Array(_) => self.deserialize_any(visitor),
                other => Err(wrong(other, &visitor)),
            }
        }

        fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
            match self.v {
                Value::Object(map) => {
                    visitor.visit_map(Map { iter: map.iter(), value: None, at: self.at, failed: self.failed })
                }
                other => Err(wrong(other, &visitor)),
            }
        }

        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _name: &'static str,
            _fields: &'static [&'static str],
            visitor: V,
        ) -> Result<V::Value, Error> {
            self.deserialize_map(visitor)
        }

        fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
            visitor.visit_unit()
        }

        serde::forward_to_deserialize_any! {
            i8 i16 i32 i64 i128 u8 u16 u32 u128 f32 f64 char
            bytes byte_buf unit unit_struct tuple tuple_struct
        }
    }

    #[cold]
    #[inline(never)]
    fn wrong(v: &Value, expected: &dyn de::Expected) -> Error {
        de::Error::invalid_type(unexpected(v), expected)
    }

    fn unexpected(v: &Value) -> de::Unexpected<'_> {
        match v {
            Value::Null => de::Unexpected::Unit,
            Value::Bool(b) => de::Unexpected::Bool(*b),
            Value::Number(n) => match (n.as_u64(), n.as_i64()) {
                (Some(u), _) => de::Unexpected::Unsigned(u),
                (None, Some(i)) => de::Unexpected::Signed(i),
                (None, None) => de::Unexpected::Float(n.as_f64().unwrap_or(f64::NAN)),
            },
            Value::String(s) => de::Unexpected::Str(s),
            Value::Array(_) => de::Unexpected::Seq,
            Value::Object(_) => de::Unexpected::Map,
        }
    }

    struct Seq<'a, 'de> {
        items: &'de [Value],
        next: usize,
        at: &'a At<'a>,
        failed: &'a RefCell<Option<String>>,
    }

    impl<'de> de::SeqAccess<'de> for Seq<'_, 'de> {
        type Error = Error;

        fn next_element_seed<T: DeserializeSeed<'de>>(&mut self, seed: T) -> Result<Option<T::Value>, Error> {
            let Some(v) = self.items.get(self.next) else { return Ok(None) };
            let at = At { parent: Some(self.at), seg: Seg::Index(self.next) };
            self.next += 1;
            match seed.deserialize(Node { v, at: &at, failed: self.failed }) {
                Ok(out) => Ok(Some(out)),
                Err(e) => {
                    record(self.failed, &at);
                    Err(e)
                }
            }
        }

        fn size_hint(&self) -> Option<usize> {
            Some(self.items.len().saturating_sub(self.next))
        }
    }

    struct Map<'a, 'de> {
        iter: serde_json::map::Iter<'de>,
        value: Option<(&'de str, &'de Value)>,
        at: &'a At<'a>,
        failed: &'a RefCell<Option<String>>,
    }

    impl<'de> de::MapAccess<'de> for Map<'_, 'de> {
        type Error = Error;

        fn next_key_seed<K: DeserializeSeed<'de>>(&mut self, seed: K) -> Result<Option<K::Value>, Error> {
            let Some((k, v)) = self.iter.next() else { return Ok(None) };
            self.value = Some((k.as_str(), v));
            match seed.deserialize(BorrowedStrDeserializer::<Error>::new(k)) {
                Ok(out) => Ok(Some(out)),
                Err(e) => {
                    record(self.failed, &At { parent: Some(self.at), seg: Seg::Key(k) });
                    Err(e)
                }
            }
        }

        fn next_value_seed<S: DeserializeSeed<'de>>(&mut self, seed: S) -> Result<S::Value, Error> {
            let Some((k, v)) = self.value.take() else {
                return Err(de::Error::custom("value requested before its key"));
            };
            let at = At { parent: Some(self.at), seg: Seg::Key(k) };
            seed.deserialize(Node { v, at: &at, failed: self.failed }).inspect_err(|_| record(self.failed, &at))
        }

        fn size_hint(&self) -> Option<usize> {
            Some(self.iter.len())
        }
    }
}

#[cold]
#[inline(never)]
fn json_error(raw: &[u8], prefix: &str, e: &serde_json::Error) -> ConfigError {
    // serde_json reports the line and the byte column where it stopped (0: nothing read yet).
    let line_start = if e.line() <= 1 {
        0
    } else {
        raw.iter().enumerate().filter(|(_, b)| **b == b'\n').nth(e.line() - 2).map_or(raw.len(), |(i, _)| i + 1)
    };
    let end = line_start.saturating_add(e.column()).min(raw.len());
    let (field, _) = scan(raw.get(..end).unwrap_or(raw), false);
    ConfigError::new(prefixed(prefix, field), e.to_string())
}

/// `field` (relative, empty for the root) under `prefix`; `.` for an empty path.
fn prefixed(prefix: &str, field: String) -> String {
    match (prefix.is_empty(), field.is_empty()) {
        (true, true) => ".".to_string(),
        (true, false) => field,
        (false, _) => format!("{prefix}{}{field}", if field.starts_with('[') || field.is_empty() { "" } else { "." }),
    }
}

/// Reads JSON text up to its end, or up to the first key repeated in an object if
/// `stop_at_duplicate`, and returns the dotted path (`a.b[2].c`; empty for the root) of the
/// value a reader was in there (the key or element being read), and whether it stopped at a
/// repeated key.
#[cold]
#[inline(never)]
fn scan(text: &[u8], stop_at_duplicate: bool) -> (String, bool) {
    enum Frame {
        /// An object, the key whose value is being (or was last) read, and the keys read.
        Object(Option<String>, Vec<String>),
        /// An array and the index of the element being read, once one has started.
        Array(Option<usize>),
    }
    let mut stack: Vec<Frame> = Vec::new();
    let mut expect_key = false;
    let mut i = 0;
    // A value (scalar, string, object or array) starts: in an array, that is the next element.
    let value_starts = |stack: &mut Vec<Frame>| {
        if let Some(Frame::Array(idx)) = stack.last_mut() {
            if idx.is_none() {
                *idx = Some(0);
            }
        }
    };
    let mut duplicate = false;
    while let Some(&b) = text.get(i) {
        match b {
            b'{' => {
                value_starts(&mut stack);
                stack.push(Frame::Object(None, Vec::new()));
                expect_key = true;
            }
            b'[' => {
                value_starts(&mut stack);
                stack.push(Frame::Array(None));
            }
            b'}' | b']' => {
                stack.pop();
                expect_key = false;
            }
            b',' => match stack.last_mut() {
                Some(Frame::Object(key, _)) => {
                    *key = None;
                    expect_key = true;
                }
                Some(Frame::Array(idx)) => *idx = Some(idx.map_or(0, |n| n + 1)),
                None => {}
            },
            b'"' => {
                let start = i + 1;
                i = start;
                while let Some(&c) = text.get(i) {
                    match c {
                        b'\\' => i += 2,
                        b'"' => break,
                        _ => i += 1,
                    }
                }
                if expect_key {
                    let key = String::from_utf8_lossy(text.get(start..i).unwrap_or_default()).into_owned();
                    if let Some(Frame::Object(k, seen)) = stack.last_mut() {
                        if stop_at_duplicate {
                            if seen.contains(&key) {
                                duplicate = true;
                                *k = Some(key);
                                break;
                            }
                            seen.push(key.clone());
                        }
                        *k = Some(key);
                    }
                    expect_key = false;
                } else {
                    value_starts(&mut stack);
                }
            }
            b':' => {}
            b if b.is_ascii_whitespace() => {}
            _ => value_starts(&mut stack),
        }
        i += 1;
    }
    let mut path = String::new();
    for frame in &stack {
        match frame {
            Frame::Object(Some(key), _) => {
                if !path.is_empty() {
                    path.push('.');
                }
                path.push_str(key);
            }
            Frame::Array(Some(idx)) => path.push_str(&format!("[{idx}]")),
            Frame::Object(None, _) | Frame::Array(None) => {}
        }
    }
    (path, duplicate)
}

fn validate(c: &Config) -> Result<(), ConfigError> {
    let id = &c.identity;
    check_header_name("identity.header", &id.header)?;
    if id.scheme.chars().any(|ch| !ch.is_ascii_alphanumeric() && ch != '-') {
        return Err(ConfigError::new("identity.scheme", "must be an auth scheme token such as `Bearer`"));
    }
    if let Some(h) = &id.upstream_header {
        check_header_name("identity.upstream_header", h)?;
        if h == &id.header {
            return Err(ConfigError::new("identity.upstream_header", "must differ from identity.header"));
        }
    }
    if id.clock_skew_s > 600 {
        return Err(ConfigError::new("identity.clock_skew_s", "must be at most 600 seconds"));
    }
    if !(64..=65536).contains(&id.max_token_bytes) {
        return Err(ConfigError::new("identity.max_token_bytes", "must be between 64 and 65536"));
    }
    if id.cache_size > 1_000_000 {
        return Err(ConfigError::new("identity.cache_size", "must be at most 1000000"));
    }
    if !id.trust_domains.is_empty() && id.audiences.is_empty() {
        return Err(ConfigError::new("identity.audiences", "at least one audience is required to accept JWT-SVIDs"));
    }
    for (i, a) in id.audiences.iter().enumerate() {
        if a.is_empty() {
            return Err(ConfigError::new(format!("identity.audiences[{i}]"), "must not be empty"));
        }
    }
    let mut seen = std::collections::HashSet::new();
    for (i, td) in id.trust_domains.iter().enumerate() {
        let field = format!("identity.trust_domains[{i}]");
        if crate::identity::spiffe_id::validate_trust_domain(&td.name).is_err() {
            return Err(ConfigError::new(format!("{field}.name"), format!("`{}` is not a valid trust domain name", td.name)));
        }
        if !seen.insert(td.name.as_str()) {
            return Err(ConfigError::new(format!("{field}.name"), format!("trust domain `{}` is listed twice", td.name)));
        }
        validate_source(&format!("{field}.bundle"), &td.bundle)?;
    }
    let mut seen = std::collections::HashSet::new();
    for (i, o) in id.oidc_issuers.iter().enumerate() {
        let field = format!("identity.oidc_issuers[{i}]");
        if o.issuer.is_empty() {
            return Err(ConfigError::new(format!("{field}.issuer"), "must not be empty"));
        }
        if !seen.insert(o.issuer.as_str()) {
            return Err(ConfigError::new(format!("{field}.issuer"), "issuer is listed twice"));
        }
        if o.audiences.is_empty() || o.audiences.iter().any(String::is_empty) {
            return Err(ConfigError::new(format!("{field}.audiences"), "at least one non-empty audience is required"));
        }
        if let Some(t) = &o.spiffe_template {
            crate::identity::check_template(t)
                .map_err(|m| ConfigError::new(format!("{field}.spiffe_template"), m))?;
        }
        validate_source(&format!("{field}.jwks"), &o.jwks)?;
    }
    check_header_name("upstream.decision_id_header", &c.upstream.decision_id_header)?;
    if !c.records.log && !c.records.filter_state {
        return Err(ConfigError::new("records", "at least one of `log` and `filter_state` must be true"));
    }
    if c.records.flush_ms != 0 && !(MIN_FLUSH_MS..=MAX_FLUSH_MS).contains(&c.records.flush_ms) {
        return Err(ConfigError::new("records.flush_ms", format!("must be 0 (no batching) or {MIN_FLUSH_MS}..={MAX_FLUSH_MS}")));
    }
    if let Some(m) = &c.minter {
        if m.cluster.is_empty() {
            return Err(ConfigError::new("minter.cluster", "must not be empty"));
        }
        if !m.path.starts_with('/') {
            return Err(ConfigError::new("minter.path", "must start with `/`"));
        }
        if !(10..=60_000).contains(&m.timeout_ms) {
            return Err(ConfigError::new("minter.timeout_ms", "must be between 10 and 60000"));
        }
        check_header_name("minter.header", &m.header)?;
        if m.header.starts_with(crate::headers::RESERVED_PREFIX) {
            return Err(ConfigError::new("minter.header", "must not be in the x-mandate- namespace"));
        }
        if m.scheme.chars().any(|ch| !ch.is_ascii_alphanumeric() && ch != '-') {
            return Err(ConfigError::new("minter.scheme", "must be an auth scheme token such as `Bearer`"));
        }
        if m.refresh_margin_s > 300 {
            return Err(ConfigError::new("minter.refresh_margin_s", "must be at most 300"));
        }
        if m.cache_size > 1_000_000 {
            return Err(ConfigError::new("minter.cache_size", "must be at most 1000000"));
        }
        let r = &m.revocations;
        if !r.path.starts_with('/') || r.path.contains(['?', '#']) {
            return Err(ConfigError::new("minter.revocations.path", "must start with `/` and carry no query or fragment"));
        }
        if !(5..=3600).contains(&r.max_stale_s) {
            return Err(ConfigError::new("minter.revocations.max_stale_s", "must be between 5 and 3600"));
        }
        if !(100..=3_600_000).contains(&r.interval_ms) {
            return Err(ConfigError::new("minter.revocations.interval_ms", "must be between 100 and 3600000"));
        }
        // Several polls must fit in the staleness bound, or one slow poll makes the filter stale.
        if r.interval_ms.saturating_mul(3) > r.max_stale_s.saturating_mul(1000) {
            return Err(ConfigError::new("minter.revocations.interval_ms", "must be at most a third of max_stale_s"));
        }
        if !(crate::mint::MIN_FEED_PAGE_BYTES..=crate::mint::MAX_FEED_PAGE_BYTES).contains(&r.max_bytes) {
            return Err(ConfigError::new(
                "minter.revocations.max_bytes",
                format!("must be between {} and {}", crate::mint::MIN_FEED_PAGE_BYTES, crate::mint::MAX_FEED_PAGE_BYTES),
            ));
        }
    }
    if let Some(dl) = &c.delegation {
        validate_delegation(c, dl)?;
    }
    if let Some(p) = &c.policy {
        crate::policy::Policy::compile(p, "policy")?;
        crate::policy::intent::IntentVerifier::new(&p.intent_issuers, id.clock_skew_s, "policy.intent_issuers")?;
        if let (Some(pm), Some(dl)) = (p.max_delegations, &c.delegation) {
            if pm > dl.max_delegations {
                return Err(ConfigError::new("policy.max_delegations", format!("must be at most delegation.max_delegations ({})", dl.max_delegations)));
            }
        }
        if c.delegation.is_none() {
            if let Some(i) = p.resources.iter().position(|r| r.txn_token == crate::policy::TxnTokenMode::Forward) {
                return Err(ConfigError::new(format!("policy.resources[{i}].txn_token"), "`forward` needs the `delegation` section (only a verified token is ever forwarded)"));
            }
        }
    }
    Ok(())
}

fn validate_delegation(c: &Config, dl: &crate::delegation::DelegationConfig) -> Result<(), ConfigError> {
    check_header_name("delegation.header", &dl.header)?;
    if dl.header.starts_with(crate::headers::RESERVED_PREFIX) {
        return Err(ConfigError::new("delegation.header", "must not be in the x-mandate- namespace"));
    }
    let taken = [
        Some(c.identity.header.as_str()),
        c.identity.upstream_header.as_deref(),
        Some(c.upstream.decision_id_header.as_str()),
        c.minter.as_ref().map(|m| m.header.as_str()),
        Some(crate::policy::intent::INTENT_HEADER),
        Some(crate::policy::intent::TASK_HEADER),
        Some(crate::policy::intent::INTENT_TOKEN_HEADER),
    ];
    if taken.iter().flatten().any(|h| *h == dl.header) || dl.header.starts_with(':') {
        return Err(ConfigError::new("delegation.header", format!("`{}` is already used by the filter", dl.header)));
    }
    if dl.issuer.is_empty() {
        return Err(ConfigError::new("delegation.issuer", "must not be empty"));
    }
    if dl.audience.is_empty() {
        return Err(ConfigError::new("delegation.audience", "must not be empty (the trust domain the minter issues Txn-Tokens for)"));
    }
    if dl.max_delegations > crate::delegation::MAX_DELEGATIONS_CAP {
        return Err(ConfigError::new("delegation.max_delegations", format!("must be at most {}", crate::delegation::MAX_DELEGATIONS_CAP)));
    }
    if dl.cache_size > 1_000_000 {
        return Err(ConfigError::new("delegation.cache_size", "must be at most 1000000"));
    }
    validate_source("delegation.keys", &dl.keys)
}

fn validate_source(field: &str, s: &BundleSourceConfig) -> Result<(), ConfigError> {
    match (&s.inline, &s.cluster) {
        (Some(_), Some(_)) => Err(ConfigError::new(field, "set either `inline` or `cluster`, not both")),
        (None, None) => Err(ConfigError::new(field, "one of `inline` or `cluster` is required")),
        (Some(_), None) if s.max_bundle_age_s.is_some() => {
            Err(ConfigError::new(format!("{field}.max_bundle_age_s"), "applies to fetched (`cluster`) bundles only: inline bundles never age"))
        }
        (Some(v), None) => {
            let raw = serde_json::to_vec(v).map_err(|e| ConfigError::new(format!("{field}.inline"), e.to_string()))?;
            crate::identity::jwks::parse_bundle(&raw)
                .map(|_| ())
                .map_err(|e| ConfigError::new(format!("{field}.inline"), e.to_string()))
        }
        (None, Some(cluster)) => {
            if cluster.is_empty() {
                return Err(ConfigError::new(format!("{field}.cluster"), "must not be empty"));
            }
            if !s.path.starts_with('/') {
                return Err(ConfigError::new(format!("{field}.path"), "must start with `/`"));
            }
            if s.refresh_s < 5 || s.refresh_s > 86_400 {
                return Err(ConfigError::new(format!("{field}.refresh_s"), "must be between 5 and 86400"));
            }
            if s.retry_s < 1 || s.retry_s > s.refresh_s {
                return Err(ConfigError::new(format!("{field}.retry_s"), "must be between 1 and refresh_s"));
            }
            if s.timeout_ms < 10 || s.timeout_ms > 60_000 {
                return Err(ConfigError::new(format!("{field}.timeout_ms"), "must be between 10 and 60000"));
            }
            let max_age = s.max_bundle_age_s.unwrap_or(DEFAULT_MAX_BUNDLE_AGE_S);
            if !MAX_BUNDLE_AGE_RANGE.contains(&max_age) {
                return Err(ConfigError::new(format!("{field}.max_bundle_age_s"), "must be between 60 and 604800"));
            }
            if max_age <= s.refresh_s {
                return Err(ConfigError::new(
                    format!("{field}.max_bundle_age_s"),
                    format!("must exceed refresh_s ({}), or the bundle goes stale before its next refresh (default 3600)", s.refresh_s),
                ));
            }
            Ok(())
        }
    }
}

/// [`check_header_name`] as a JSON Schema pattern (plugin/config.schema.json).
#[cfg(feature = "schema")]
pub const HEADER_NAME_PATTERN: &str = r"^[a-z0-9!#$%&'*+^`|~._-]+$";

/// Header names must be lowercase HTTP tokens: Envoy hands names to filters in lowercase.
pub(crate) fn check_header_name(field: &str, name: &str) -> Result<(), ConfigError> {
    if name.is_empty() {
        return Err(ConfigError::new(field, "must not be empty"));
    }
    let ok = name.bytes().all(|b| {
        b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.!#$%&'*+^`|~".contains(&b)
    });
    if !ok {
        return Err(ConfigError::new(field, format!("`{name}` is not a lowercase header name")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_config_uses_defaults() {
        let c = parse(b"").unwrap();
        assert_eq!(c.identity.header, "authorization");
        let c = parse(b" {} ").unwrap();
        assert_eq!(c.upstream.decision_id_header, "x-mandate-decision-id");
    }

    #[test]
    fn a_non_object_configuration_is_refused_naming_the_root() {
        for raw in ["[]", "[{}]", "5", "\"{}\"", "null", "true"] {
            let e = parse(raw.as_bytes()).unwrap_err();
            assert_eq!(e.field, ".", "{raw}: {e}");
        }
    }

    #[test]
    fn dollar_schema_is_accepted_for_editors_and_must_be_a_string() {
        let c = parse(br#"{"$schema": "./plugin/config.schema.json"}"#).unwrap();
        assert_eq!(c.schema.as_deref(), Some("./plugin/config.schema.json"));
        assert_eq!(parse(br#"{"$schema": 1}"#).unwrap_err().field, "$schema");
    }

    #[test]
    fn unknown_field_is_refused_naming_it() {
        let e = parse(br#"{"identity": {"header": "authorization", "bogus": 1}}"#).unwrap_err();
        assert!(e.message.contains("bogus"), "{e}");
        assert!(e.to_string().contains("identity"), "{e}");
        let e = parse(br#"{"surprise": true}"#).unwrap_err();
        assert!(e.message.contains("surprise"), "{e}");
    }

    #[test]
    fn wrong_type_names_the_field() {
        let e = parse(br#"{"identity": {"forward_token": "yes"}}"#).unwrap_err();
        assert_eq!(e.field, "identity.forward_token");
    }

    #[test]
    fn invalid_header_name_is_refused() {
        let e = parse(br#"{"identity": {"header": "Authorization"}}"#).unwrap_err();
        assert_eq!(e.field, "identity.header");
        let e = parse(br#"{"upstream": {"decision_id_header": ""}}"#).unwrap_err();
        assert_eq!(e.field, "upstream.decision_id_header");
    }

    #[test]
    fn record_flush_period_out_of_range_is_refused_naming_it() {
        assert_eq!(parse(b"{}").unwrap().records.flush_ms, 1000);
        assert_eq!(parse(br#"{"records": {"flush_ms": 0}}"#).unwrap().records.flush_ms, 0);
        for bad in [1, 49, 10_001, u64::MAX] {
            let e = parse(format!(r#"{{"records": {{"flush_ms": {bad}}}}}"#).as_bytes()).unwrap_err();
            assert_eq!(e.field, "records.flush_ms", "{bad}: {e}");
        }
    }

    #[test]
    fn revocation_feed_is_on_with_defaults_whenever_a_minter_is_configured() {
        let c = parse(br#"{"minter": {"cluster": "minter"}}"#).unwrap();
        let r = &c.minter.unwrap().revocations;
        assert_eq!((r.path.as_str(), r.interval_ms, r.max_stale_s, r.max_bytes), ("/revocations", 1000, 30, 196_608));
        assert_eq!(r.max_backoff_ms(), 7500, "failed polls back off to a quarter of max_stale_s at most");
    }

    #[test]
    fn revocation_settings_out_of_range_are_refused_naming_them() {
        for (bad, field) in [
            (r#"{"max_stale_s": 4}"#, "minter.revocations.max_stale_s"),
            (r#"{"max_stale_s": 3601}"#, "minter.revocations.max_stale_s"),
            (r#"{"interval_ms": 99}"#, "minter.revocations.interval_ms"),
            (r#"{"interval_ms": 10001, "max_stale_s": 30}"#, "minter.revocations.interval_ms"),
            (r#"{"max_bytes": 4095}"#, "minter.revocations.max_bytes"),
            (r#"{"max_bytes": 262144}"#, "minter.revocations.max_bytes"),
            (r#"{"path": "/revocations?since=9"}"#, "minter.revocations.path"),
            (r#"{"path": "revocations"}"#, "minter.revocations.path"),
        ] {
            let raw = format!(r#"{{"minter": {{"cluster": "minter", "revocations": {bad}}}}}"#);
            let e = parse(raw.as_bytes()).unwrap_err();
            assert_eq!(e.field, field, "{bad}: {e}");
        }
        let e = parse(br#"{"minter": {"cluster": "m", "revocations": {"enabled": false}}}"#).unwrap_err();
        assert!(e.message.contains("enabled"), "polling cannot be switched off: {e}");
    }

    #[test]
    fn every_deserialisation_error_names_the_dotted_field() {
        for (raw, field) in [
            // Wrong types, at every depth and inside arrays.
            (r#"{"identity": {"clock_skew_s": "30"}}"#, "identity.clock_skew_s"),
            (r#"{"identity": {"audiences": ["a", 7]}}"#, "identity.audiences[1]"),
            (r#"{"identity": {"audiences": "a"}}"#, "identity.audiences"),
            (r#"{"identity": {"trust_domains": [{"name": "a.org", "bundle": {"cluster": "c"}}, {"name": 1}]}}"#, "identity.trust_domains[1].name"),
            (
                "{\n  \"identity\": {\n    \"trust_domains\": [\n      {\"name\": \"a.org\", \"bundle\": {\"cluster\": \"c\", \"refresh_s\": -1}}\n    ]\n  }\n}",
                "identity.trust_domains[0].bundle.refresh_s",
            ),
            (r#"{"policy": 5}"#, "policy"),
            (r#"{"identity": {"header": null}}"#, "identity.header"),
            (r#"{"identity": {"header": 5}}"#, "identity.header"),
            (r#"{"records": {"log": true, "flush_ms": 1.5}}"#, "records.flush_ms"),
            (r#"{"minter": {"cluster": "m", "revocations": {"max_stale_s": "x"}}}"#, "minter.revocations.max_stale_s"),
            // Unknown fields name themselves; missing ones name the object that lacks them.
            (r#"{"identity": {"header": "authorization", "bogus": 1}}"#, "identity.bogus"),
            (r#"{"surprise": true}"#, "surprise"),
            (r#"{"identity": {"trust_domains": [{"name": "a.org"}]}}"#, "identity.trust_domains[0]"),
            (r#"{"identity": {"trust_domains": [{}]}}"#, "identity.trust_domains[0]"),
            (r#"{"identity": {"oidc_issuers": [{"issuer": "i", "audiences": ["a"], "jwks": {"cluster": "c", "path\"x": 1}}]}}"#, "identity.oidc_issuers[0].jwks.path\"x"),
            // A key given twice is refused, naming it.
            (r#"{"identity": {"trust_domains": [{"name": "a.org", "name": "b.org"}]}}"#, "identity.trust_domains[0].name"),
            (r#"{"records": {"log": true}, "records": {"log": false}}"#, "records"),
            // Syntax errors: the field being read when the text went wrong.
            (r#"{"identity": {"header": "authorization",, }}"#, "identity"),
            ("true", "."),
        ] {
            let e = parse(raw.as_bytes()).unwrap_err();
            assert_eq!(e.field, field, "{raw}: {e}");
        }
    }

    #[test]
    fn type_errors_say_what_was_found() {
        let e = parse(br#"{"identity": {"header": 5}}"#).unwrap_err();
        assert_eq!(e.message, "invalid type: integer `5`, expected a string");
        let e = parse(br#"{"identity": {"header": null}}"#).unwrap_err();
        assert_eq!(e.message, "invalid type: null, expected a string");
        let e = parse(br#"{"identity": {"forward_token": "yes"}}"#).unwrap_err();
        assert_eq!(e.message, "invalid type: string \"yes\", expected a boolean");
        let e = parse(br#"{"policy": {"tasks": "sometimes"}}"#).unwrap_err();
        assert_eq!(e.field, "policy.tasks", "{e}");
        assert!(e.message.starts_with("unknown variant `sometimes`"), "{e}");
    }

    #[test]
    fn policy_deserialisation_errors_name_the_field_under_policy() {
        let raw = br#"{"policy": {"resources": [{"name": "a", "paths": ["/a"]}, {"name": "b", "paths": ["/b"]}, {"name": "c", "paths": ["/c"], "mcp": {"max_body_bytes": "x"}}]}}"#;
        let e = parse(raw).unwrap_err();
        assert_eq!(e.field, "policy.resources[2].mcp.max_body_bytes", "{e}");
        let e = crate::policy::cases::parse_policy(br#"{"resources": [{"name": "a", "paths": "/a"}]}"#).unwrap_err();
        assert_eq!(e.field, "policy.resources[0].paths", "{e}");
        let e = crate::policy::cases::parse_policy(b"5").unwrap_err();
        assert_eq!(e.field, "policy", "the root under a prefix is named by the prefix: {e}");
    }

    #[test]
    fn trailing_garbage_is_refused() {
        assert!(parse(br#"{} {}"#).is_err());
        assert!(parse(br#"not json"#).is_err());
    }
}
