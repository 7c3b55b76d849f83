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
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub identity: IdentityConfig,
    #[serde(default)]
    pub upstream: UpstreamConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityConfig {
    /// Request header carrying the caller's token.
    #[serde(default = "default_token_header")]
    pub header: String,
    /// Auth scheme expected before the token (case-insensitive); empty = the whole value is the token.
    #[serde(default = "default_scheme")]
    pub scheme: String,
    /// Forward the caller's token upstream. Off by default: the service never sees it.
    #[serde(default)]
    pub forward_token: bool,
}

impl Default for IdentityConfig {
    fn default() -> Self {
        IdentityConfig { header: default_token_header(), scheme: default_scheme(), forward_token: false }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// Header that carries the decision id upstream (and in local replies).
    #[serde(default = "default_decision_header")]
    pub decision_id_header: String,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig { decision_id_header: default_decision_header() }
    }
}

fn default_token_header() -> String {
    "authorization".into()
}
fn default_scheme() -> String {
    "Bearer".into()
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
        let mut de = serde_json::Deserializer::from_slice(raw);
        let parsed: Result<Config, _> = serde_path_to_error::deserialize(&mut de);
        let config = parsed.map_err(|e| {
            let path = e.path().to_string();
            ConfigError::new(path, e.into_inner().to_string())
        })?;
        de.end().map_err(|e| ConfigError::new(".", e.to_string()))?;
        config
    };
    validate(&config)?;
    Ok(config)
}

fn validate(c: &Config) -> Result<(), ConfigError> {
    check_header_name("identity.header", &c.identity.header)?;
    if c.identity.scheme.chars().any(|ch| !ch.is_ascii_alphanumeric() && ch != '-') {
        return Err(ConfigError::new("identity.scheme", "must be an auth scheme token such as `Bearer`"));
    }
    check_header_name("upstream.decision_id_header", &c.upstream.decision_id_header)?;
    Ok(())
}

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
    fn trailing_garbage_is_refused() {
        assert!(parse(br#"{} {}"#).is_err());
        assert!(parse(br#"not json"#).is_err());
    }
}
