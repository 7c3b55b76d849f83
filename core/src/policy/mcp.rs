//! MCP in the policy model: MCP resources, the MCP operations of intents (tools, methods,
//! resource URIs, prompts, argument constraints) and the call being judged.
//!
//! Pure: the filter reads the call from headers or the JSON-RPC body (`crate::mcp`), the CLI
//! from a case file; both hand an [`McpCall`] to the policy.

use crate::config::ConfigError;
use serde::Serialize;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

/// Default `max_body_bytes`: 1 MiB.
pub const DEFAULT_MAX_BODY: usize = 1024 * 1024;
/// Bounds of `max_body_bytes`.
pub const MAX_BODY_RANGE: std::ops::RangeInclusive<usize> = 1024..=16 * 1024 * 1024;
/// Methods a verified caller may use without an intent (unless a deny rule matches).
/// `server/discover` is the 2026-07-28 revision's capability probe (the SDK's client sends it
/// first; refusing it makes the client fall back to an older revision and its headers).
pub const SESSION_METHODS: [&str; 7] =
    ["initialize", "server/discover", "ping", "tools/list", "resources/list", "resources/templates/list", "prompts/list"];
/// Longest name, URI or pattern judged; longer never matches.
const MAX_MATCH_LEN: usize = 4096;

/// How the filter reads an MCP call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BodyMode {
    /// Always buffer and parse the body, and check it agrees with the headers.
    #[default]
    Always,
    /// Decide from the 2026-07-28 headers when they carry everything the policy needs.
    WhenNeeded,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct McpMetadataConfig {
    pub resource: String,
    pub authorization_servers: Vec<String>,
    pub scopes_supported: Vec<String>,
}

// The MCP configuration is read by hand from the JSON value (strictly: unknown fields are
// refused, every error names its field): serde's derived code for it, instantiated for the
// path-tracking deserializer, cost the filter ~100 KB.

/// JSON Schemas of the hand-read MCP settings (`schema_with` on their `serde_json::Value` fields).
#[cfg(feature = "schema")]
pub mod schema {
    use schemars::{json_schema, Schema, SchemaGenerator};

    /// `resources[].mcp`: see [`super::McpConfig::from_value`].
    pub fn mcp(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "description": "The resource is an MCP server (Streamable HTTP); `{}` for the defaults.",
            "type": ["object", "null"],
            "additionalProperties": false,
            "properties": {
                "tools": {
                    "description": "Tool name -> its sensitivity (tools not listed have the resource's).",
                    "type": "object",
                    "propertyNames": {"minLength": 1, "maxLength": 128, "pattern": "^[!-~]+$"},
                    "additionalProperties": {
                        "type": "object",
                        "additionalProperties": false,
                        "properties": {"sensitivity": {"type": "string"}}
                    }
                },
                "body": {"enum": ["always", "when_needed"], "default": "always"},
                "max_body_bytes": {"type": "integer", "minimum": 1024, "maximum": 16777216},
                "filter_tools_list": {"type": "boolean", "default": false},
                "metadata": {
                    "type": "object",
                    "additionalProperties": false,
                    "required": ["resource"],
                    "properties": {
                        "resource": {"type": "string", "pattern": "^https?://[!-~]+$", "maxLength": 2048},
                        "authorization_servers": {"type": "array", "items": {"type": "string", "pattern": "^https?://[!-~]+$"}},
                        "scopes_supported": {"type": "array", "items": {"type": "string", "pattern": "^[!#-\\[\\]-~]+$"}}
                    }
                }
            }
        })
    }

    /// `mcp_methods`, `tools`, `uris`, `prompts` of an intent operation: lists of globs.
    pub fn globs(_: &mut SchemaGenerator) -> Schema {
        json_schema!({"type": ["array", "null"], "items": {"type": "string"}})
    }

    /// `arguments` of an intent operation: see [`super::ArgumentConfig::from_value`].
    pub fn arguments(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "description": "Constraints on params.arguments: each names a pointer and exactly one check.",
            "type": ["array", "null"],
            "minItems": 1,
            "items": {
                "type": "object",
                "additionalProperties": false,
                "required": ["pointer"],
                "properties": {
                    "pointer": {"type": "string", "description": "RFC 6901 pointer into params.arguments"},
                    "equals": true,
                    "pattern": {"type": "string"},
                    "prefix": {"type": "string", "minLength": 1},
                    "min": {"type": "number"},
                    "max": {"type": "number"},
                    "equals_context": {"enum": ["task", "principal", "intent"]},
                    "required": {"type": "boolean"},
                    "sensitive": {"type": "boolean"}
                },
                "oneOf": [
                    {"required": ["equals"]},
                    {"required": ["pattern"]},
                    {"required": ["prefix"]},
                    {"anyOf": [{"required": ["min"]}, {"required": ["max"]}]},
                    {"required": ["equals_context"]}
                ]
            }
        })
    }
}

fn cerr(field: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::new(field, message)
}

fn object<'v>(v: &'v Value, field: &str, allowed: &[&str]) -> Result<&'v Map<String, Value>, ConfigError> {
    let m = v.as_object().ok_or_else(|| cerr(field, "must be an object"))?;
    if let Some(k) = m.keys().find(|k| !allowed.contains(&k.as_str())) {
        return Err(cerr(&format!("{field}.{k}"), format!("unknown field `{k}`, expected one of {allowed:?}")));
    }
    Ok(m)
}

fn opt_str(m: &Map<String, Value>, key: &str, field: &str) -> Result<Option<String>, ConfigError> {
    match m.get(key) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(cerr(&format!("{field}.{key}"), "must be a string")),
    }
}

fn opt_bool(m: &Map<String, Value>, key: &str, field: &str) -> Result<Option<bool>, ConfigError> {
    match m.get(key) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(_) => Err(cerr(&format!("{field}.{key}"), "must be true or false")),
    }
}

fn opt_f64(m: &Map<String, Value>, key: &str, field: &str) -> Result<Option<f64>, ConfigError> {
    match m.get(key) {
        None => Ok(None),
        Some(Value::Number(n)) => n.as_f64().map(Some).ok_or_else(|| cerr(&format!("{field}.{key}"), "must be a number")),
        Some(_) => Err(cerr(&format!("{field}.{key}"), "must be a number")),
    }
}

/// A list of strings (`None` when absent).
pub fn opt_strings(v: Option<&Value>, field: &str) -> Result<Option<Vec<String>>, ConfigError> {
    match v {
        None => Ok(None),
        Some(Value::Array(a)) => a
            .iter()
            .enumerate()
            .map(|(i, x)| x.as_str().map(str::to_string).ok_or_else(|| cerr(&format!("{field}[{i}]"), "must be a string")))
            .collect::<Result<Vec<_>, _>>()
            .map(Some),
        Some(_) => Err(cerr(field, "must be a list of strings")),
    }
}

/// `mcp` on a resource: the resource is an MCP server (Streamable HTTP).
#[derive(Debug, Clone)]
pub struct McpConfig {
    /// Tool name → sensitivity (tools not listed have the resource's).
    pub tools: Vec<(String, Option<String>)>,
    pub body: BodyMode,
    pub max_body_bytes: usize,
    pub filter_tools_list: bool,
    pub metadata: Option<McpMetadataConfig>,
}

impl McpConfig {
    pub fn from_value(v: &Value, field: &str) -> Result<McpConfig, ConfigError> {
        let m = object(v, field, &["tools", "body", "max_body_bytes", "filter_tools_list", "metadata"])?;
        let mut tools = Vec::new();
        if let Some(t) = m.get("tools") {
            let tf = format!("{field}.tools");
            for (name, cfg) in t.as_object().ok_or_else(|| cerr(&tf, "must be an object of tool names"))? {
                let cf = format!("{tf}.{name}");
                let c = object(cfg, &cf, &["sensitivity"])?;
                tools.push((name.clone(), opt_str(c, "sensitivity", &cf)?));
            }
        }
        let body = match opt_str(m, "body", field)?.as_deref() {
            None | Some("always") => BodyMode::Always,
            Some("when_needed") => BodyMode::WhenNeeded,
            Some(_) => return Err(cerr(&format!("{field}.body"), "must be `always` or `when_needed`")),
        };
        let max_body_bytes = match m.get("max_body_bytes") {
            None => DEFAULT_MAX_BODY,
            Some(n) => n.as_u64().and_then(|n| usize::try_from(n).ok()).ok_or_else(|| cerr(&format!("{field}.max_body_bytes"), "must be a whole number"))?,
        };
        let metadata = match m.get("metadata") {
            None => None,
            Some(md) => {
                let mf = format!("{field}.metadata");
                let o = object(md, &mf, &["resource", "authorization_servers", "scopes_supported"])?;
                Some(McpMetadataConfig {
                    resource: opt_str(o, "resource", &mf)?.ok_or_else(|| cerr(&format!("{mf}.resource"), "is required"))?,
                    authorization_servers: opt_strings(o.get("authorization_servers"), &format!("{mf}.authorization_servers"))?.unwrap_or_default(),
                    scopes_supported: opt_strings(o.get("scopes_supported"), &format!("{mf}.scopes_supported"))?.unwrap_or_default(),
                })
            }
        };
        Ok(McpConfig { tools, body, max_body_bytes, filter_tools_list: opt_bool(m, "filter_tools_list", field)?.unwrap_or(false), metadata })
    }
}

/// One argument constraint of an intent operation.
#[derive(Debug, Clone)]
pub struct ArgumentConfig {
    /// RFC 6901 pointer into `params.arguments`.
    pub pointer: String,
    pub equals: Option<Value>,
    pub pattern: Option<String>,
    pub prefix: Option<String>,
    pub min: Option<f64>,
    pub max: Option<f64>,
    pub equals_context: Option<String>,
    pub required: Option<bool>,
    pub sensitive: bool,
}

impl ArgumentConfig {
    pub fn from_value(v: &Value, field: &str) -> Result<ArgumentConfig, ConfigError> {
        let m = object(v, field, &["pointer", "equals", "pattern", "prefix", "min", "max", "equals_context", "required", "sensitive"])?;
        Ok(ArgumentConfig {
            pointer: opt_str(m, "pointer", field)?.ok_or_else(|| cerr(&format!("{field}.pointer"), "is required"))?,
            // `"equals": null` is the literal null.
            equals: m.get("equals").cloned(),
            pattern: opt_str(m, "pattern", field)?,
            prefix: opt_str(m, "prefix", field)?,
            min: opt_f64(m, "min", field)?,
            max: opt_f64(m, "max", field)?,
            equals_context: opt_str(m, "equals_context", field)?,
            required: opt_bool(m, "required", field)?,
            sensitive: opt_bool(m, "sensitive", field)?.unwrap_or(false),
        })
    }
}

// ---------------------------------------------------------------- compiled

/// Per-resource MCP settings, compiled.
#[derive(Debug, Clone)]
pub struct McpResource {
    /// Tool name → sensitivity level (tools not listed have the resource's).
    pub tools: Vec<(String, usize)>,
    pub body: BodyMode,
    pub max_body_bytes: usize,
    pub filter_tools_list: bool,
    pub metadata: Option<McpMetadataConfig>,
}

impl McpResource {
    pub fn compile(c: &McpConfig, field: &str, level: impl Fn(&str, &Option<String>) -> Result<Option<usize>, ConfigError>, default: usize) -> Result<McpResource, ConfigError> {
        if !MAX_BODY_RANGE.contains(&c.max_body_bytes) {
            return Err(ConfigError::new(format!("{field}.max_body_bytes"), "must be between 1024 and 16777216"));
        }
        let mut tools = Vec::new();
        for (name, sens) in &c.tools {
            tool_name_ok(&format!("{field}.tools"), name)?;
            let lvl = level(&format!("{field}.tools.{name}.sensitivity"), sens)?.unwrap_or(default);
            tools.push((name.clone(), lvl));
        }
        if let Some(m) = &c.metadata {
            let mf = format!("{field}.metadata");
            if !(m.resource.starts_with("https://") || m.resource.starts_with("http://")) || m.resource.len() > 2048 || !visible(&m.resource) {
                return Err(ConfigError::new(format!("{mf}.resource"), "must be an http(s) URL"));
            }
            for (i, s) in m.authorization_servers.iter().enumerate() {
                if !(s.starts_with("https://") || s.starts_with("http://")) || !visible(s) {
                    return Err(ConfigError::new(format!("{mf}.authorization_servers[{i}]"), "must be an http(s) URL"));
                }
            }
            for (i, s) in m.scopes_supported.iter().enumerate() {
                if s.is_empty() || !visible(s) || s.contains(['"', '\\']) {
                    return Err(ConfigError::new(format!("{mf}.scopes_supported[{i}]"), "scopes are non-empty tokens without spaces or quotes"));
                }
            }
        }
        Ok(McpResource { tools, body: c.body, max_body_bytes: c.max_body_bytes, filter_tools_list: c.filter_tools_list, metadata: c.metadata.clone() })
    }

    /// The sensitivity of a tool (`default`: the resource's).
    pub fn tool_sensitivity(&self, tool: &str, default: usize) -> usize {
        self.tools.iter().find(|(n, _)| n == tool).map_or(default, |(_, l)| *l)
    }
}

fn visible(s: &str) -> bool {
    s.bytes().all(|b| (0x21..=0x7e).contains(&b))
}

fn tool_name_ok(field: &str, n: &str) -> Result<(), ConfigError> {
    if n.is_empty() || n.len() > 128 || !visible(n) {
        return Err(ConfigError::new(field, format!("tool `{n}` must be 1-128 visible ASCII characters")));
    }
    Ok(())
}

/// Whether an MCP method is a session method (allowed to a verified caller without an intent).
pub fn is_session_method(method: &str) -> bool {
    SESSION_METHODS.contains(&method) || method.starts_with("notifications/")
}

/// A `*` glob: `*` matches any run of characters. With `uri` set, `*` stops at `/` and `**`
/// matches any run including `/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Glob {
    source: String,
    uri: bool,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Tok {
    Byte(u8),
    Star,
    Any,
}

impl Glob {
    pub fn compile(p: &str, uri: bool) -> Result<Glob, String> {
        if p.is_empty() || p.len() > 512 {
            return Err("patterns are 1-512 characters".into());
        }
        if !uri && p.contains("**") {
            return Err(format!("`**` is for URI patterns only: `{p}`"));
        }
        if p.contains("***") {
            return Err(format!("bad pattern `{p}`"));
        }
        Ok(Glob { source: p.to_string(), uri })
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    fn tokens(&self) -> Vec<Tok> {
        let b = self.source.as_bytes();
        let mut out = Vec::with_capacity(b.len());
        let mut i = 0;
        while let Some(&c) = b.get(i) {
            if c == b'*' {
                if self.uri && b.get(i + 1) == Some(&b'*') {
                    out.push(Tok::Any);
                    i += 2;
                    continue;
                }
                out.push(if self.uri { Tok::Star } else { Tok::Any });
            } else {
                out.push(Tok::Byte(c));
            }
            i += 1;
        }
        out
    }

    /// Whole-string match (never by prefix). Runs in O(pattern × value), value ≤ 4096 bytes.
    pub fn matches(&self, s: &str) -> bool {
        if s.len() > MAX_MATCH_LEN {
            return false;
        }
        // Fast paths: a literal pattern; a literal prefix and one final `*` (`search_*`).
        match self.source.find('*') {
            None => return self.source == s,
            Some(i) if i + 1 == self.source.len() => {
                let prefix = self.source.get(..i).unwrap_or_default();
                return s.strip_prefix(prefix).is_some_and(|rest| !self.uri || !rest.contains('/'));
            }
            Some(_) => {}
        }
        let s = s.as_bytes();
        let toks = self.tokens();
        // row[j]: the tokens so far match s[..j].
        let mut row = vec![false; s.len() + 1];
        if let Some(r) = row.first_mut() {
            *r = true;
        }
        for t in toks {
            let mut next = vec![false; s.len() + 1];
            match t {
                Tok::Byte(c) => {
                    for j in 0..s.len() {
                        if row.get(j) == Some(&true) && s.get(j) == Some(&c) {
                            if let Some(n) = next.get_mut(j + 1) {
                                *n = true;
                            }
                        }
                    }
                }
                Tok::Any | Tok::Star => {
                    let mut on = false;
                    for j in 0..=s.len() {
                        if row.get(j) == Some(&true) {
                            on = true;
                        }
                        if on {
                            if let Some(n) = next.get_mut(j) {
                                *n = true;
                            }
                        }
                        // `*` in a URI pattern never crosses a `/`.
                        if t == Tok::Star && s.get(j) == Some(&b'/') {
                            on = false;
                        }
                    }
                }
            }
            row = next;
        }
        row.last() == Some(&true)
    }
}

fn globs(field: &str, list: &Option<Vec<String>>, uri: bool) -> Result<Option<Vec<Glob>>, ConfigError> {
    let Some(list) = list else { return Ok(None) };
    if list.is_empty() {
        return Err(ConfigError::new(field, "must not be an empty list (leave it out instead)"));
    }
    list.iter()
        .enumerate()
        .map(|(i, p)| {
            if !visible(p) {
                return Err(ConfigError::new(format!("{field}[{i}]"), "patterns are visible ASCII"));
            }
            Glob::compile(p, uri).map_err(|e| ConfigError::new(format!("{field}[{i}]"), e))
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

/// Compiles rule `tools` / `mcp_methods` lists (empty: the rule does not look at MCP).
pub fn rule_globs(field: &str, list: &[String]) -> Result<Vec<Glob>, ConfigError> {
    if list.is_empty() {
        return Ok(Vec::new());
    }
    Ok(globs(field, &Some(list.to_vec()), false)?.unwrap_or_default())
}

/// What an argument constraint requires of the value at its pointer.
#[derive(Debug, Clone, PartialEq)]
pub enum Check {
    Equals(Value),
    Pattern(Glob),
    Prefix(String),
    Range(Option<f64>, Option<f64>),
    Context(ContextField),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContextField {
    Task,
    Principal,
    Intent,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ArgConstraint {
    pub pointer: String,
    tokens: Vec<String>,
    pub check: Check,
    pub required: bool,
    pub sensitive: bool,
}

fn pointer_tokens(p: &str) -> Result<Vec<String>, String> {
    let Some(rest) = p.strip_prefix('/') else { return Err("a pointer starts with `/` (RFC 6901)".into()) };
    if p.len() > 512 {
        return Err("pointers are at most 512 characters".into());
    }
    rest.split('/')
        .map(|t| {
            let mut out = String::with_capacity(t.len());
            let mut chars = t.chars();
            while let Some(c) = chars.next() {
                if c == '~' {
                    match chars.next() {
                        Some('0') => out.push('~'),
                        Some('1') => out.push('/'),
                        _ => return Err(format!("bad escape in pointer `{p}`")),
                    }
                } else {
                    out.push(c);
                }
            }
            Ok(out)
        })
        .collect()
}

impl ArgConstraint {
    pub fn compile(c: &ArgumentConfig, field: &str) -> Result<ArgConstraint, ConfigError> {
        let tokens = pointer_tokens(&c.pointer).map_err(|e| ConfigError::new(format!("{field}.pointer"), e))?;
        let mut checks = Vec::new();
        if let Some(v) = &c.equals {
            checks.push(Check::Equals(v.clone()));
        }
        if let Some(p) = &c.pattern {
            checks.push(Check::Pattern(Glob::compile(p, false).map_err(|e| ConfigError::new(format!("{field}.pattern"), e))?));
        }
        if let Some(p) = &c.prefix {
            if p.is_empty() {
                return Err(ConfigError::new(format!("{field}.prefix"), "must not be empty"));
            }
            checks.push(Check::Prefix(p.clone()));
        }
        if c.min.is_some() || c.max.is_some() {
            if let (Some(a), Some(b)) = (c.min, c.max) {
                if a > b {
                    return Err(ConfigError::new(format!("{field}.min"), "min is above max"));
                }
            }
            if c.min.is_some_and(|x| !x.is_finite()) || c.max.is_some_and(|x| !x.is_finite()) {
                return Err(ConfigError::new(format!("{field}.min"), "bounds are finite numbers"));
            }
            checks.push(Check::Range(c.min, c.max));
        }
        if let Some(ctx) = &c.equals_context {
            let f = match ctx.as_str() {
                "task" => ContextField::Task,
                "principal" => ContextField::Principal,
                "intent" => ContextField::Intent,
                _ => return Err(ConfigError::new(format!("{field}.equals_context"), "must be `task`, `principal` or `intent`")),
            };
            checks.push(Check::Context(f));
        }
        if checks.len() != 1 {
            return Err(ConfigError::new(field, "exactly one of equals, pattern, prefix, min/max, equals_context is required"));
        }
        let check = checks.pop().ok_or_else(|| ConfigError::new(field, "no check"))?;
        Ok(ArgConstraint { pointer: c.pointer.clone(), tokens, check, required: c.required.unwrap_or(true), sensitive: c.sensitive })
    }

    /// The first pointer token: the top-level argument the headers may mirror.
    fn top(&self) -> Option<&str> {
        self.tokens.first().map(String::as_str)
    }
}

/// The MCP part of one intent operation.
#[derive(Debug, Clone)]
pub struct McpOp {
    pub methods: Option<Vec<Glob>>,
    pub tools: Option<Vec<Glob>>,
    pub uris: Option<Vec<Glob>>,
    pub prompts: Option<Vec<Glob>>,
    pub arguments: Vec<ArgConstraint>,
}

impl McpOp {
    /// `None` when the operation names no MCP field (a plain HTTP operation).
    pub fn compile(
        field: &str,
        methods: &Option<Vec<String>>,
        tools: &Option<Vec<String>>,
        uris: &Option<Vec<String>>,
        prompts: &Option<Vec<String>>,
        arguments: &Option<Value>,
    ) -> Result<Option<McpOp>, ConfigError> {
        if methods.is_none() && tools.is_none() && uris.is_none() && prompts.is_none() && arguments.is_none() {
            return Ok(None);
        }
        let m = globs(&format!("{field}.mcp_methods"), methods, false)?;
        if let Some(list) = &m {
            for (i, g) in list.iter().enumerate() {
                if g.matches("tools/call") && tools.is_none() {
                    return Err(ConfigError::new(format!("{field}.mcp_methods[{i}]"), "tools/call needs `tools`, the tools this operation may call"));
                }
            }
        }
        let args = match arguments {
            None => Vec::new(),
            Some(Value::Array(list)) if list.is_empty() => return Err(ConfigError::new(format!("{field}.arguments"), "must not be an empty list (leave it out instead)")),
            Some(Value::Array(list)) => list
                .iter()
                .enumerate()
                .map(|(i, a)| {
                    let af = format!("{field}.arguments[{i}]");
                    ArgConstraint::compile(&ArgumentConfig::from_value(a, &af)?, &af)
                })
                .collect::<Result<_, _>>()?,
            Some(_) => return Err(ConfigError::new(format!("{field}.arguments"), "must be a list of constraints")),
        };
        if arguments.is_some() && tools.is_none() && prompts.is_none() {
            return Err(ConfigError::new(format!("{field}.arguments"), "argument constraints apply to `tools` or `prompts`"));
        }
        let op = McpOp {
            methods: m,
            tools: globs(&format!("{field}.tools"), tools, false)?,
            uris: globs(&format!("{field}.uris"), uris, true)?,
            prompts: globs(&format!("{field}.prompts"), prompts, false)?,
            arguments: args,
        };
        for (i, t) in op.tools.iter().flatten().enumerate() {
            if !t.source().contains('*') {
                tool_name_ok(&format!("{field}.tools[{i}]"), t.source())?;
            }
        }
        Ok(Some(op))
    }

    fn method_listed(&self, m: &str) -> bool {
        self.methods.as_ref().is_some_and(|l| l.iter().any(|g| g.matches(m)))
    }

    /// Whether this operation names the call (method and tool / URI / prompt), arguments aside.
    /// `tools` implies `tools/call`, `uris` `resources/read`, `prompts` `prompts/get`; a
    /// `tools/call` is only ever covered by a tool name.
    pub fn covers(&self, call: &McpCall) -> bool {
        let any = |l: &Option<Vec<Glob>>, v: Option<&str>| l.as_ref().is_some_and(|l| v.is_some_and(|v| l.iter().any(|g| g.matches(v))));
        match call.method.as_str() {
            "tools/call" => any(&self.tools, call.name.as_deref()),
            "resources/read" => {
                // A URI that could mean another resource once a server decodes or resolves it
                // (`..`, `%2e%2e`, `\\`) never matches a glob.
                let uri = call.uri.as_deref().filter(|u| uri_safe(u));
                (self.uris.is_some() || self.method_listed("resources/read")) && (self.uris.is_none() || any(&self.uris, uri))
            }
            "prompts/get" => {
                (self.prompts.is_some() || self.method_listed("prompts/get")) && (self.prompts.is_none() || any(&self.prompts, call.name.as_deref()))
            }
            m => self.method_listed(m),
        }
    }

    /// Checks every argument constraint against the call.
    pub fn check_arguments(&self, call: &McpCall, ctx: &ArgContext<'_>) -> ArgOutcome {
        check_constraints(&mut self.arguments.iter(), call, ctx)
    }

    /// Whether an argument must equal the request's task (`equals_context: "task"`).
    pub fn binds_task(&self) -> bool {
        self.arguments.iter().any(|c| matches!(c.check, Check::Context(ContextField::Task)))
    }
}

/// Checks argument constraints against a call (an intent operation's, or a Txn-Token's).
pub fn check_constraints(constraints: &mut dyn Iterator<Item = &ArgConstraint>, call: &McpCall, ctx: &ArgContext<'_>) -> ArgOutcome {
    let mut checked = Vec::new();
    let mut need_body = false;
    let mut ok = true;
    for c in constraints {
        match check_one(c, call, ctx) {
            One::Ok(v) => checked.push(ArgCheck::new(c, true, v)),
            One::Fail(v) => {
                ok = false;
                checked.push(ArgCheck::new(c, false, v));
            }
            One::NeedBody => need_body = true,
        }
    }
    if !ok {
        ArgOutcome::Fail(checked)
    } else if need_body {
        ArgOutcome::NeedBody
    } else {
        ArgOutcome::Pass(checked)
    }
}

/// Request context an `equals_context` constraint compares with.
pub struct ArgContext<'a> {
    pub task: Option<&'a str>,
    pub principal: &'a str,
    pub intent: Option<&'a str>,
}

pub enum ArgOutcome {
    Pass(Vec<ArgCheck>),
    Fail(Vec<ArgCheck>),
    /// The headers do not carry what a constraint needs: read the body.
    NeedBody,
}

/// One checked argument, for the decision record (the value hashed when sensitive).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ArgCheck {
    pub pointer: String,
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value: Option<Value>,
}

/// Longest argument value copied into a record as is; longer ones are hashed.
const MAX_RECORDED_VALUE: usize = 128;

impl ArgCheck {
    fn new(c: &ArgConstraint, ok: bool, v: Option<Value>) -> ArgCheck {
        let value = v.map(|v| {
            let long = match &v {
                Value::String(s) => s.len() > MAX_RECORDED_VALUE,
                Value::Array(_) | Value::Object(_) => true,
                _ => false,
            };
            if c.sensitive || long {
                let text = v.to_string();
                let d: [u8; 32] = Sha256::digest(text.as_bytes()).into();
                Value::String(format!("sha256:{}", d.iter().map(|b| format!("{b:02x}")).collect::<String>()))
            } else {
                v
            }
        });
        ArgCheck { pointer: c.pointer.clone(), ok, value }
    }
}

enum One {
    Ok(Option<Value>),
    Fail(Option<Value>),
    NeedBody,
}

/// The arguments of a call: the object from the body (borrowed, as sent), an object from a
/// case file, or what the headers mirror.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum McpArgs<'a> {
    /// No arguments (`params.arguments` absent).
    #[default]
    None,
    /// A parsed object (case files, tests).
    Body(Map<String, Value>),
    /// The request body's `arguments`, read in place (see [`crate::mcp::jsonrpc::pointer`]).
    Raw(RawArgs<'a>),
    /// `Mcp-Param-{Name}` values: (lowercased name, decoded value). Only top-level arguments,
    /// as strings; anything else needs the body.
    Headers(Vec<(String, String)>),
}

/// A strict, duplicate-free JSON object from the request body: its top-level members, each
/// borrowed as sent (keys unescaped).
#[derive(Debug, Clone, Default)]
pub struct RawArgs<'a> {
    pub members: Vec<(std::borrow::Cow<'a, str>, &'a serde_json::value::RawValue)>,
}

impl<'a> RawArgs<'a> {
    /// The member named `key` (duplicates were refused when the body was read).
    pub fn get(&self, key: &str) -> Option<&'a serde_json::value::RawValue> {
        self.members.iter().find(|(k, _)| k == key).map(|(_, v)| *v)
    }
}

impl PartialEq for RawArgs<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.members.len() == other.members.len() && self.members.iter().zip(&other.members).all(|((k, v), (ok, ov))| k == ok && v.get() == ov.get())
    }
}

/// Where the call was read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum McpSource {
    Header,
    Body,
    /// The header phase of a call whose method is not known yet (no 2026-07-28 headers): the
    /// policy says only whether the caller could make *some* MCP call here (the body decides).
    Unknown,
}

/// One MCP call, as judged.
#[derive(Debug, Clone, PartialEq)]
pub struct McpCall<'a> {
    pub method: String,
    /// The tool (tools/call) or prompt (prompts/get).
    pub name: Option<String>,
    /// resources/read.
    pub uri: Option<String>,
    pub arguments: McpArgs<'a>,
    pub source: McpSource,
}

impl McpCall<'_> {
    /// The tool a tools/call names.
    pub fn tool(&self) -> Option<&str> {
        if self.method == "tools/call" {
            self.name.as_deref()
        } else {
            None
        }
    }
}

fn resolve<'v>(tokens: &[String], args: &'v Map<String, Value>) -> Option<&'v Value> {
    let (first, rest) = tokens.split_first()?;
    resolve_within(rest, args.get(first)?)
}

/// The value `tokens` (an RFC 6901 pointer's, past its first) name below `v`.
pub fn resolve_within<'v>(tokens: &[String], mut v: &'v Value) -> Option<&'v Value> {
    for t in tokens {
        v = match v {
            Value::Object(m) => m.get(t)?,
            Value::Array(a) => {
                if t.is_empty() || (t.len() > 1 && t.starts_with('0')) || !t.bytes().all(|b| b.is_ascii_digit()) {
                    return None;
                }
                a.get(t.parse::<usize>().ok()?)?
            }
            _ => return None,
        };
    }
    Some(v)
}

/// `s` is `prefix` or lies under it: a prefix that does not end in `/` ends at a segment
/// boundary, so `/srv/data` covers `/srv/data/x` but not `/srv/database`.
fn under_prefix(s: &str, prefix: &str) -> bool {
    match s.strip_prefix(prefix) {
        Some(rest) => prefix.ends_with('/') || rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

/// Whether a string may follow a prefix: no `.` or `..` segment, no `//`, no `\`, no `%`.
fn prefix_safe(s: &str) -> bool {
    !s.contains('\\') && !s.contains('%') && !s.contains("//") && !s.split('/').any(|seg| seg == "." || seg == "..") && !s.bytes().any(|b| b.is_ascii_control())
}

/// For `pattern` values, which may be free text: no backslash, control character, `.`/`..`
/// segment or percent-escape (`%` and two hex digits); a lone `%` ("50% off") is fine.
fn pattern_safe(s: &str) -> bool {
    let b = s.as_bytes();
    let escape = b.windows(3).any(|w| matches!(w, [b'%', x, y] if x.is_ascii_hexdigit() && y.is_ascii_hexdigit()));
    !escape && !s.contains('\\') && !s.split('/').any(|seg| seg == "." || seg == "..") && !s.bytes().any(|c| c.is_ascii_control())
}

/// `prefix_safe` for a URI: the `scheme://` separator aside, the same rules.
fn uri_safe(u: &str) -> bool {
    let rest = u.split_once("://").map_or(u, |(_, r)| r);
    prefix_safe(rest)
}

fn json_number(s: &str) -> Option<f64> {
    // Strict JSON number grammar (serde_json), never `NaN`, `inf` or `0x10`.
    match crate::mcp::jsonrpc::strict_value(s).ok()? {
        Value::Number(n) => n.as_f64(),
        _ => None,
    }
}

fn values_equal(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64().is_some() && x.as_f64() == y.as_f64(),
        _ => a == b,
    }
}

fn check_one(c: &ArgConstraint, call: &McpCall, ctx: &ArgContext<'_>) -> One {
    let value: Option<Value> = match &call.arguments {
        McpArgs::None => None,
        McpArgs::Body(m) => resolve(&c.tokens, m).cloned(),
        // Present but unreadable (never for a body the parser accepted): a failed check.
        McpArgs::Raw(r) => match crate::mcp::jsonrpc::pointer(r, &c.tokens) {
            Ok(v) => v,
            Err(crate::mcp::jsonrpc::Unreadable) => return One::Fail(None),
        },
        McpArgs::Headers(h) => {
            // Only a top-level argument can come from a header; its value is text.
            let found = match (c.tokens.len(), c.top()) {
                (1, Some(top)) => h.iter().find(|(n, _)| n.eq_ignore_ascii_case(top)).map(|(_, v)| v.as_str()),
                _ => None,
            };
            let Some(text) = found else { return One::NeedBody };
            match &c.check {
                Check::Range(..) => match json_number(text) {
                    Some(_) => crate::mcp::jsonrpc::strict_value(text).ok(),
                    None => return One::NeedBody,
                },
                Check::Equals(v) if !v.is_string() => match crate::mcp::jsonrpc::strict_value(text) {
                    Ok(parsed) if !parsed.is_string() => Some(parsed),
                    _ => return One::NeedBody,
                },
                _ => Some(Value::String(text.to_string())),
            }
        }
    };
    let Some(v) = value else {
        return if c.required { One::Fail(None) } else { One::Ok(None) };
    };
    let ok = match &c.check {
        Check::Equals(want) => values_equal(want, &v),
        // No dot segment, percent-escape or backslash can walk a path-like value out of it.
        Check::Pattern(g) => v.as_str().is_some_and(|s| g.matches(s) && pattern_safe(s)),
        Check::Prefix(p) => v.as_str().is_some_and(|s| under_prefix(s, p) && prefix_safe(s)),
        Check::Range(min, max) => match v.as_f64() {
            Some(x) if v.is_number() => min.is_none_or(|m| x >= m) && max.is_none_or(|m| x <= m),
            _ => false,
        },
        Check::Context(f) => {
            let want = match f {
                ContextField::Task => ctx.task,
                ContextField::Principal => Some(ctx.principal),
                ContextField::Intent => ctx.intent,
            };
            want.is_some_and(|w| v.as_str() == Some(w))
        }
    };
    if ok {
        One::Ok(Some(v))
    } else {
        One::Fail(Some(v))
    }
}

/// Compiled sensitivity of the call: the tool's for tools/call, else the resource's.
pub fn call_sensitivity(res: &McpResource, call: &McpCall, default: usize) -> usize {
    match call.tool() {
        Some(t) => res.tool_sensitivity(t, default),
        None => default,
    }
}

/// Glob helper for tests and tools/list filtering.
pub fn any_glob(list: &[Glob], v: &str) -> bool {
    list.iter().any(|g| g.matches(v))
}
