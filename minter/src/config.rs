//! Minter configuration: one JSON or TOML file (`--config PATH`).
//!
//! Parsing is strict (unknown fields are refused). Relative paths are
//! resolved against the directory of the configuration file. The `identity`
//! section is the plugin's own identity configuration, validated by
//! `mandate_core::config::parse`, so the minter and the proxies read
//! trust bundles the same way; a trust domain may carry `bundle_url` (and
//! `refresh_s`) instead of an inline `bundle`, fetched by the minter itself.

use anyhow::{anyhow, bail, Context, Result};
use mandate_core::config::IdentityConfig;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

pub const GRANT_TOKEN_EXCHANGE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
pub const TOKEN_TYPE_JWT: &str = "urn:ietf:params:oauth:token-type:jwt";
pub const TOKEN_TYPE_ACCESS_TOKEN: &str = "urn:ietf:params:oauth:token-type:access_token";
pub const TOKEN_TYPE_STATIC_SECRET: &str = "urn:mandate:token-type:static-secret";
/// Transaction Tokens (draft-ietf-oauth-transaction-tokens): the delegation chain (issue 13).
pub const TOKEN_TYPE_TXN_TOKEN: &str = "urn:ietf:params:oauth:token-type:txn_token";

/// `identity`: the plugin's identity section, whose trust domains may also name `bundle_url`
/// (and `refresh_s`) instead of `bundle`; checked by the plugin's parser, not by this schema.
fn identity_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "description": "The plugin's identity section (plugin/config.schema.json, $defs/IdentityConfig); a trust domain may carry `bundle_url` and `refresh_s` instead of `bundle`. Validated by the plugin's parser.",
        "type": "object"
    })
}

/// The JSON Schema of the minter configuration (minter/config.schema.json), pretty, with a
/// final newline.
pub fn schema_text() -> String {
    let mut text = serde_json::to_string_pretty(&schemars::schema_for!(MinterConfig)).unwrap_or_default();
    text.push('\n');
    text
}

#[derive(Debug, Clone, Deserialize)]
#[derive(schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MinterConfig {
    /// Listen address; loopback by default. Port 0 picks a free port.
    #[serde(default = "default_listen")]
    pub listen: String,
    /// `iss` of issued tokens.
    pub issuer: String,
    /// Durable state: SQLite database and signing keys.
    pub state_dir: PathBuf,
    /// Tokio worker threads (default: available cores).
    #[serde(default)]
    pub workers: Option<usize>,
    /// The plugin's identity section (trust domains, bundles, accepted audiences).
    #[schemars(schema_with = "identity_schema")]
    pub identity: serde_json::Value,
    #[serde(default)]
    pub ttl: TtlConfig,
    /// Trust domain (or OIDC issuer, for OIDC principals without a SPIFFE
    /// template) → audiences its workloads may obtain tokens for. `*` allows any.
    #[serde(default)]
    pub audiences: BTreeMap<String, Vec<String>>,
    /// Audience → scopes that may be requested for it. An absent audience (or
    /// an empty list) allows no scope; `["*"]` is the explicit opt-in for any.
    #[serde(default)]
    pub scopes: BTreeMap<String, Vec<String>>,
    /// Development setup: allows `client_auth.mode = "none_loopback"`, whose
    /// implicit client `loopback` has every role.
    #[serde(default)]
    pub dev: bool,
    /// Registered tasks (`POST /tasks`).
    #[serde(default)]
    pub tasks: TasksConfig,
    /// Refuse exchanges without a `task` parameter.
    #[serde(default)]
    pub require_task: bool,
    #[serde(default)]
    pub client_auth: ClientAuthConfig,
    /// Serve HTTPS (required for `client_auth.mode = "mtls"`).
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    #[serde(default)]
    pub legacy: Option<LegacyConfig>,
    #[serde(default)]
    pub log_level: LogLevel,
    /// Largest accepted request body, bytes.
    #[serde(default = "default_max_body")]
    pub max_body_bytes: usize,
    /// How often the signing-key file and the legacy secret file are checked for changes, seconds.
    #[serde(default = "default_reload")]
    pub reload_check_s: u64,
    /// Signing-key publication and rotation.
    #[serde(default)]
    pub keys: KeysConfig,
    /// Transaction Tokens: delegation chains (`docs/delegation.md`).
    #[serde(default)]
    pub txn_tokens: TxnTokensConfig,
    /// Connection limits and read timeouts (slow clients).
    #[serde(default)]
    pub limits: LimitsConfig,
    /// The store: SQLite in `state_dir` (default), or PostgreSQL shared by replicas
    /// (`store.postgres`).
    #[serde(default)]
    pub store: StoreConfig,

    /// Parsed and validated `identity`, with bundle URLs split out (filled by `load`/`finish`).
    #[serde(skip)]
    pub identity_parsed: Option<IdentityConfig>,
    #[serde(skip)]
    pub bundle_urls: Vec<BundleUrl>,
}

#[derive(Debug, Clone, Deserialize)]
#[derive(schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TtlConfig {
    /// Lifetime when the request names none, seconds.
    #[serde(default = "default_ttl")]
    pub default_s: u64,
    /// Hard ceiling, seconds.
    #[serde(default = "default_max_ttl")]
    pub max_s: u64,
    /// Never let an issued token outlive the subject token that obtained it.
    #[serde(default = "default_true")]
    pub cap_to_subject_exp: bool,
}

impl Default for TtlConfig {
    fn default() -> Self {
        TtlConfig { default_s: default_ttl(), max_s: default_max_ttl(), cap_to_subject_exp: true }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[derive(schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TasksConfig {
    /// Refuse `/token` for a task the minter did not issue (`task_unknown`).
    #[serde(default = "default_true")]
    pub require_registered: bool,
    /// Lifetime of a task created without `ttl_s`, seconds.
    #[serde(default = "default_task_ttl")]
    pub default_ttl_s: u64,
    /// Longest `ttl_s` accepted by `POST /tasks`, seconds.
    #[serde(default = "default_task_max_ttl")]
    pub max_ttl_s: u64,
}

impl Default for TasksConfig {
    fn default() -> Self {
        TasksConfig { require_registered: true, default_ttl_s: default_task_ttl(), max_ttl_s: default_task_max_ttl() }
    }
}

/// What an authenticated client may do.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Hash)]
#[derive(schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// `POST /token` for non-legacy audiences.
    Mint,
    /// `POST /token` for legacy audiences (static secrets).
    MintLegacy,
    /// `POST /tasks/{id}/end`, `POST /revoke`.
    Revoke,
    /// `GET /revocations`.
    Feed,
    /// `POST /tasks`, `GET /tasks/{id}`.
    Tasks,
    /// `POST /token` for Transaction Tokens: a root Txn-Token, or a replacement naming the
    /// next actor (`requested_token_type=urn:ietf:params:oauth:token-type:txn_token`).
    Txn,
}

impl Role {
    pub const ALL: [Role; 6] = [Role::Mint, Role::MintLegacy, Role::Revoke, Role::Feed, Role::Tasks, Role::Txn];
    /// The names, for error messages.
    pub const NAMES: &'static str = "mint, mint_legacy, revoke, feed, tasks, txn";
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Mint => "mint",
            Role::MintLegacy => "mint_legacy",
            Role::Revoke => "revoke",
            Role::Feed => "feed",
            Role::Tasks => "tasks",
            Role::Txn => "txn",
        }
    }
}

/// Transaction Tokens (issue 13): limits of delegation chains.
#[derive(Debug, Clone, Deserialize)]
#[derive(schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TxnTokensConfig {
    /// Most `act` levels (delegations) a Txn-Token may carry, 1-8.
    #[serde(default = "default_max_delegations")]
    pub max_delegations: usize,
    /// Longest Txn-Token lifetime, seconds (1-86400).
    #[serde(default = "default_txn_max_ttl")]
    pub max_ttl_s: u64,
    /// `aud` of Txn-Tokens; default: the trust domain of the original principal.
    #[serde(default)]
    pub audience: Option<String>,
}

impl Default for TxnTokensConfig {
    fn default() -> Self {
        TxnTokensConfig { max_delegations: default_max_delegations(), max_ttl_s: default_txn_max_ttl(), audience: None }
    }
}

/// Connection limits and read timeouts: what a slow or idle client may hold.
#[derive(Debug, Clone, Deserialize)]
#[derive(schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Most connections open at once (TLS handshakes included). At the cap, a new connection
    /// closes the oldest one that has not yet sent a complete request head; when every open
    /// connection has, the new one is closed at once.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Time to receive a request head (and, with TLS, the handshake), milliseconds. It also
    /// closes a keep-alive connection idle for this long between requests.
    #[serde(default = "default_read_timeout_ms")]
    pub header_read_timeout_ms: u64,
    /// Time to receive a request's whole body once its head is in, milliseconds. Past it:
    /// 408 and the connection is closed.
    #[serde(default = "default_read_timeout_ms")]
    pub body_read_timeout_ms: u64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_connections: default_max_connections(),
            header_read_timeout_ms: default_read_timeout_ms(),
            body_read_timeout_ms: default_read_timeout_ms(),
        }
    }
}

/// The store.
#[derive(Debug, Clone, Default, Deserialize)]
#[derive(schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// SQLite, fault drills only: caps the database at this many pages (`PRAGMA
    /// max_page_count`, 4 KiB pages) to play a full disk. Never set in production.
    #[serde(default)]
    pub max_pages: Option<u64>,
    /// PostgreSQL shared by every replica (tasks, revocations, issued-token records, signing
    /// keys, the feed epoch). Absent: SQLite in `state_dir`.
    #[serde(default)]
    pub postgres: Option<PostgresConfig>,
}

/// `store.postgres`: where the shared database is and how to reach it.
#[derive(Debug, Clone, Deserialize)]
#[derive(schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PostgresConfig {
    /// A libpq connection string (`host=db port=5432 user=minter dbname=mandate sslmode=require`
    /// or `postgresql://minter@db/mandate?sslmode=require`). Absent: the libpq environment
    /// (`PGHOST`, `PGPORT`, `PGUSER`, `PGPASSWORD`, `PGDATABASE`, `PGSSLMODE`,
    /// `PGAPPNAME`). A host starting with `/` is a Unix socket directory. Prefer `PGPASSWORD`
    /// (or a socket with peer authentication) to a password written here.
    #[serde(default)]
    pub url: Option<String>,
    /// PEM file of the CA(s) that sign the database's certificate (with `sslmode=require`; the
    /// name in the certificate must match the host). Absent: the Mozilla roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Client certificate and key (PEM) for the database, if it asks for one.
    #[serde(default)]
    pub client_cert: Option<PathBuf>,
    #[serde(default)]
    pub client_key: Option<PathBuf>,
    /// Connections in this replica's pool.
    #[serde(default = "default_pg_pool")]
    #[schemars(range(min = 1, max = 1000))]
    pub pool_size: usize,
    /// Longest a store operation may take (getting a connection included); past it the request
    /// is answered 503 `store_unavailable`, and nothing is issued unrecorded.
    #[serde(default = "default_pg_timeout")]
    #[schemars(range(min = 100, max = 60000))]
    pub timeout_ms: u64,
}

fn default_pg_pool() -> usize {
    16
}

fn default_pg_timeout() -> u64 {
    2000
}

/// Bounds of `limits.*`.
pub const MAX_CONNECTIONS_LIMIT: usize = 1_000_000;
pub const READ_TIMEOUT_MS_RANGE: std::ops::RangeInclusive<u64> = 100..=600_000;

/// Largest accepted `txn_tokens.max_delegations`.
pub const MAX_DELEGATIONS_LIMIT: usize = 8;

#[derive(Debug, Clone, Deserialize)]
#[derive(schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct KeysConfig {
    /// `cache-control: public, max-age=…` of the JWKS, seconds: how long resource servers may
    /// cache it. Their own cache (e.g. jwt_authn's `cache_duration`) should not be longer.
    #[serde(default = "default_jwks_max_age")]
    pub jwks_max_age_s: u64,
    /// A new key is published this long before it signs (default and minimum: `jwks_max_age_s`).
    #[serde(default)]
    pub publish_before_use_s: Option<u64>,
    /// Keys kept and published (minimum 3: next, current, previous).
    #[serde(default = "default_keep")]
    pub keep: usize,
    /// Rotate on a schedule: a new pending key every this many seconds (≥ `publish_before_use_s`).
    #[serde(default)]
    pub rotate_every_s: Option<u64>,
}

impl Default for KeysConfig {
    fn default() -> Self {
        KeysConfig { jwks_max_age_s: default_jwks_max_age(), publish_before_use_s: None, keep: default_keep(), rotate_every_s: None }
    }
}

impl KeysConfig {
    pub fn publish_before_use_s(&self) -> u64 {
        self.publish_before_use_s.unwrap_or(self.jwks_max_age_s)
    }
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[derive(schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ClientAuthMode {
    /// Development only (`dev: true`): any peer on 127.0.0.0/8 or ::1; client_id
    /// `loopback`, with every role.
    #[default]
    NoneLoopback,
    /// HTTP Basic with client_id / client_secret; secrets stored as SHA-256 hex.
    SharedSecret,
    /// TLS client certificate chained to `tls.client_ca`.
    Mtls,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[derive(schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ClientAuthConfig {
    #[serde(default)]
    pub mode: ClientAuthMode,
    /// Named clients. For `shared_secret` every client needs `secret_sha256`;
    /// for `mtls` the list is required (a certificate from the CA alone is not
    /// enough) and `client_id` matches the certificate's identity (URI SAN,
    /// else DNS SAN, else CN).
    #[serde(default)]
    pub clients: Vec<ClientConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[derive(schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ClientConfig {
    pub client_id: String,
    /// Lowercase hex SHA-256 of the client secret (`mandate-minter hash-secret`).
    #[serde(default)]
    pub secret_sha256: Option<String>,
    /// What this client may do (required, non-empty).
    #[serde(default)]
    pub roles: Vec<Role>,
    /// If set, the audiences this client may obtain tokens for (else `unauthorized_client`).
    #[serde(default)]
    pub audiences: Option<Vec<String>>,
}

#[derive(Debug, Clone, Deserialize)]
#[derive(schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// Server certificate chain, PEM.
    pub cert: PathBuf,
    /// Server private key, PEM (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// CA bundle, PEM, that client certificates must chain to (mTLS).
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[derive(schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LegacyConfig {
    /// Audiences served with a static secret instead of a minted JWT.
    pub audiences: Vec<String>,
    /// JSON file: audience → `{"secret": "...", "header": "x-api-key", "scheme": "ApiKey"}`.
    pub secrets_file: PathBuf,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, PartialOrd, Ord, Default)]
#[derive(schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum LogLevel {
    Off,
    Error,
    #[default]
    Info,
    Debug,
}

/// A trust-domain bundle the minter fetches itself.
#[derive(Debug, Clone)]
pub struct BundleUrl {
    pub trust_domain: String,
    pub url: String,
    pub refresh_s: u64,
    /// PEM file of the only CA trusted for an `https://` URL (required for https).
    pub bundle_ca: Option<PathBuf>,
    /// How long the last good bundle is trusted once fetches fail, seconds.
    pub max_bundle_age_s: u64,
}

/// Default `max_bundle_age_s`.
pub const DEFAULT_MAX_BUNDLE_AGE_S: u64 = 3600;

fn default_listen() -> String {
    "127.0.0.1:8181".into()
}
fn default_ttl() -> u64 {
    120
}
fn default_max_ttl() -> u64 {
    300
}
fn default_task_ttl() -> u64 {
    3600
}
fn default_task_max_ttl() -> u64 {
    86400
}
fn default_true() -> bool {
    true
}
fn default_max_body() -> usize {
    64 * 1024
}
fn default_reload() -> u64 {
    2
}
fn default_jwks_max_age() -> u64 {
    300
}
fn default_max_delegations() -> usize {
    2
}
fn default_txn_max_ttl() -> u64 {
    300
}
fn default_max_connections() -> usize {
    1000
}
fn default_read_timeout_ms() -> u64 {
    10_000
}
fn default_keep() -> usize {
    crate::keys::MIN_KEYS_KEPT
}

impl MinterConfig {
    /// Reads a JSON (`.json`) or TOML (anything else that parses as TOML) file.
    pub fn load(path: &Path) -> Result<MinterConfig> {
        let raw = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let is_json = path.extension().is_some_and(|e| e == "json") || raw.trim_start().starts_with('{');
        let config: MinterConfig = if is_json {
            let mut de = serde_json::Deserializer::from_str(&raw);
            let c = serde_path_to_error_json(&mut de).with_context(|| format!("parsing {}", path.display()))?;
            de.end().context("trailing characters after the configuration")?;
            c
        } else {
            toml::from_str(&raw).map_err(|e| anyhow!("parsing {}: {e}", path.display()))?
        };
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        config.finish(&base)
    }

    /// Parses a JSON configuration held in memory (tests); relative paths stay as given.
    pub fn from_json(value: serde_json::Value) -> Result<MinterConfig> {
        let c: MinterConfig = serde_json::from_value(value).context("parsing configuration")?;
        c.finish(Path::new(""))
    }

    /// Resolves paths and validates everything; idempotent.
    pub fn finish(mut self, base: &Path) -> Result<MinterConfig> {
        let resolve = |p: &mut PathBuf| {
            if p.is_relative() && !base.as_os_str().is_empty() {
                *p = base.join(&*p);
            }
        };
        resolve(&mut self.state_dir);
        if let Some(t) = self.tls.as_mut() {
            resolve(&mut t.cert);
            resolve(&mut t.key);
            if let Some(ca) = t.client_ca.as_mut() {
                resolve(ca);
            }
        }
        if let Some(l) = self.legacy.as_mut() {
            resolve(&mut l.secrets_file);
        }
        if let Some(pg) = self.store.postgres.as_mut() {
            for p in [&mut pg.ca_file, &mut pg.client_cert, &mut pg.client_key].into_iter().flatten() {
                resolve(p);
            }
        }
        self.validate()?;
        for u in self.bundle_urls.iter_mut() {
            if let Some(ca) = u.bundle_ca.as_mut() {
                resolve(ca);
            }
        }
        Ok(self)
    }

    fn validate(&mut self) -> Result<()> {
        self.listen_addr()?;
        if self.issuer.trim().is_empty() {
            bail!("`issuer` must not be empty");
        }
        if self.ttl.default_s == 0 || self.ttl.max_s == 0 {
            bail!("`ttl.default_s` and `ttl.max_s` must be positive");
        }
        if self.ttl.default_s > self.ttl.max_s {
            bail!("`ttl.default_s` ({}) exceeds `ttl.max_s` ({})", self.ttl.default_s, self.ttl.max_s);
        }
        if self.workers == Some(0) {
            bail!("`workers` must be positive");
        }
        let (identity, urls) = split_bundle_urls(&self.identity)?;
        let wrapped = serde_json::json!({ "identity": identity });
        let raw = serde_json::to_vec(&wrapped)?;
        let parsed = mandate_core::config::parse(&raw).map_err(|e| anyhow!("{e}"))?;
        if parsed.identity.trust_domains.is_empty() && parsed.identity.oidc_issuers.is_empty() {
            bail!("`identity` names no trust domain and no OIDC issuer: nothing could be exchanged");
        }
        if parsed.identity.audiences.is_empty() && !parsed.identity.trust_domains.is_empty() {
            bail!("`identity.audiences` is empty: name the audience(s) subject tokens must carry for the minter");
        }
        self.identity_parsed = Some(parsed.identity);
        self.bundle_urls = urls;
        for (td, auds) in &self.audiences {
            for a in auds {
                if a != "*" {
                    crate::values::audience(a).map_err(|e| anyhow!("`audiences.{td}`: {e}"))?;
                }
            }
        }
        for (aud, scopes) in &self.scopes {
            crate::values::audience(aud).map_err(|e| anyhow!("`scopes`: {e}"))?;
            if scopes.iter().any(|s| s == "*") && scopes.len() > 1 {
                bail!("`scopes.{aud}`: `*` (any scope) must be the only entry");
            }
            if scopes.iter().any(|s| s.is_empty() || !s.bytes().all(|b| b == 0x21 || (0x23..=0x5b).contains(&b) || (0x5d..=0x7e).contains(&b))) {
                bail!("`scopes.{aud}` contains an empty or malformed scope");
            }
        }
        if self.tasks.default_ttl_s == 0 || self.tasks.max_ttl_s == 0 || self.tasks.default_ttl_s > self.tasks.max_ttl_s {
            bail!("`tasks.default_ttl_s` and `tasks.max_ttl_s` must be positive, default ≤ max");
        }
        let listen_ip = self.listen_addr()?.ip();
        match self.client_auth.mode {
            ClientAuthMode::SharedSecret => {
                if self.client_auth.clients.is_empty() {
                    bail!("`client_auth.mode = shared_secret` needs `client_auth.clients`");
                }
                for c in &self.client_auth.clients {
                    let ok = c.secret_sha256.as_deref().is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()));
                    if !ok {
                        bail!("client `{}`: `secret_sha256` must be 64 hex digits", c.client_id);
                    }
                }
                if self.tls.is_none() && !listen_ip.is_loopback() {
                    bail!("`client_auth.mode = shared_secret` sends secrets: it needs `tls` unless `listen` is a loopback address (got {listen_ip})");
                }
            }
            ClientAuthMode::Mtls => {
                if self.tls.as_ref().and_then(|t| t.client_ca.as_ref()).is_none() {
                    bail!("`client_auth.mode = mtls` needs `tls.cert`, `tls.key` and `tls.client_ca`");
                }
                if self.client_auth.clients.is_empty() {
                    bail!("`client_auth.mode = mtls` needs `client_auth.clients`: a certificate from the CA alone grants nothing");
                }
                if self.client_auth.clients.iter().any(|c| c.secret_sha256.is_some()) {
                    bail!("`client_auth.mode = mtls`: clients take no `secret_sha256`");
                }
            }
            ClientAuthMode::NoneLoopback => {
                if !self.dev {
                    bail!("`client_auth.mode = none_loopback` (the default) is for development only: set `\"dev\": true`, or use `mtls` or `shared_secret` with named clients");
                }
                if !listen_ip.is_loopback() {
                    bail!("`client_auth.mode = none_loopback` requires a loopback `listen` address, got {listen_ip}");
                }
                if !self.client_auth.clients.is_empty() {
                    bail!("`client_auth.clients` is not used with `client_auth.mode = none_loopback` (the loopback client has every role)");
                }
            }
        }
        let mut seen = std::collections::HashSet::new();
        for c in &self.client_auth.clients {
            if c.client_id.is_empty() || !seen.insert(c.client_id.clone()) {
                bail!("client ids must be non-empty and unique (`{}`)", c.client_id);
            }
            if c.roles.is_empty() {
                bail!("client `{}`: `roles` is required (one or more of {})", c.client_id, Role::NAMES);
            }
            if let Some(auds) = &c.audiences {
                for a in auds.iter().filter(|a| *a != "*") {
                    crate::values::audience(a).map_err(|e| anyhow!("client `{}`: `audiences`: {e}", c.client_id))?;
                }
            }
        }
        if let Some(l) = &self.legacy {
            if l.audiences.is_empty() {
                bail!("`legacy.audiences` is empty");
            }
        }
        if self.max_body_bytes < 1024 {
            bail!("`max_body_bytes` must be at least 1024");
        }
        let l = &self.limits;
        if !(1..=MAX_CONNECTIONS_LIMIT).contains(&l.max_connections) {
            bail!("`limits.max_connections` must be 1-{MAX_CONNECTIONS_LIMIT} (got {})", l.max_connections);
        }
        for (name, v) in [("header_read_timeout_ms", l.header_read_timeout_ms), ("body_read_timeout_ms", l.body_read_timeout_ms)] {
            if !READ_TIMEOUT_MS_RANGE.contains(&v) {
                bail!("`limits.{name}` must be {}-{} milliseconds (got {v})", READ_TIMEOUT_MS_RANGE.start(), READ_TIMEOUT_MS_RANGE.end());
            }
        }
        if self.store.max_pages == Some(0) || self.store.max_pages.is_some_and(|p| p > crate::store::SQLITE_MAX_PAGES) {
            bail!("`store.max_pages` must be 1-{}", crate::store::SQLITE_MAX_PAGES);
        }
        if let Some(pg) = &self.store.postgres {
            if self.store.max_pages.is_some() {
                bail!("`store.max_pages` is a SQLite knob: it cannot be set with `store.postgres`");
            }
            if !(1..=1000).contains(&pg.pool_size) {
                bail!("`store.postgres.pool_size` must be 1-1000 (got {})", pg.pool_size);
            }
            if !(100..=60_000).contains(&pg.timeout_ms) {
                bail!("`store.postgres.timeout_ms` must be 100-60000 milliseconds (got {})", pg.timeout_ms);
            }
            if pg.client_cert.is_some() != pg.client_key.is_some() {
                bail!("`store.postgres.client_cert` and `store.postgres.client_key` go together");
            }
            if let Some(url) = &pg.url {
                crate::pgstore::parse_url(url).map_err(|e| anyhow!("`store.postgres.url`: {e}"))?;
            }
        }
        let t = &self.txn_tokens;
        if !(1..=MAX_DELEGATIONS_LIMIT).contains(&t.max_delegations) {
            bail!("`txn_tokens.max_delegations` must be 1-{MAX_DELEGATIONS_LIMIT} (got {})", t.max_delegations);
        }
        if !(1..=86_400).contains(&t.max_ttl_s) {
            bail!("`txn_tokens.max_ttl_s` must be 1-86400 seconds (got {})", t.max_ttl_s);
        }
        if let Some(a) = &t.audience {
            crate::values::audience(a).map_err(|e| anyhow!("`txn_tokens.audience`: {e}"))?;
        }
        let k = &self.keys;
        if k.jwks_max_age_s == 0 || k.jwks_max_age_s > 86_400 {
            bail!("`keys.jwks_max_age_s` must be 1-86400");
        }
        if k.publish_before_use_s() < k.jwks_max_age_s {
            bail!(
                "`keys.publish_before_use_s` ({}) must be at least `keys.jwks_max_age_s` ({}): a key must be published for one JWKS cache period before it signs",
                k.publish_before_use_s(),
                k.jwks_max_age_s
            );
        }
        if k.keep < crate::keys::MIN_KEYS_KEPT {
            bail!("`keys.keep` must be at least {} (next, current, previous)", crate::keys::MIN_KEYS_KEPT);
        }
        if let Some(every) = k.rotate_every_s {
            if every == 0 || every < k.publish_before_use_s() {
                bail!("`keys.rotate_every_s` ({every}) must be at least `keys.publish_before_use_s` ({})", k.publish_before_use_s());
            }
        }
        Ok(())
    }

    pub fn listen_addr(&self) -> Result<SocketAddr> {
        self.listen.parse().map_err(|e| anyhow!("`listen` = {:?}: {e} (expected IP:PORT)", self.listen))
    }

    pub fn identity(&self) -> Result<&IdentityConfig> {
        self.identity_parsed.as_ref().ok_or_else(|| anyhow!("configuration not validated"))
    }

    /// The longest any token the minter signs may live (access tokens or Txn-Tokens), seconds:
    /// how long a retired key must stay published.
    pub fn longest_token_s(&self) -> u64 {
        self.ttl.max_s.max(self.txn_tokens.max_ttl_s)
    }

    pub fn is_legacy(&self, audience: &str) -> bool {
        self.legacy.as_ref().is_some_and(|l| l.audiences.iter().any(|a| a == audience))
    }
}

fn serde_path_to_error_json(de: &mut serde_json::Deserializer<serde_json::de::StrRead<'_>>) -> Result<MinterConfig> {
    MinterConfig::deserialize(de).map_err(|e| anyhow!("{e}"))
}

/// Takes `bundle_url`, `refresh_s`, `bundle_ca` and `max_bundle_age_s` out of
/// `identity.trust_domains[*]`, leaving a placeholder remote source the minter feeds itself.
/// `http://` is allowed only to a loopback host (127.0.0.0/8, ::1, `localhost`); `https://`
/// needs `bundle_ca`, the only CA trusted for that fetch.
pub fn split_bundle_urls(identity: &serde_json::Value) -> Result<(serde_json::Value, Vec<BundleUrl>)> {
    let mut identity = identity.clone();
    let mut urls = Vec::new();
    if let Some(tds) = identity.get_mut("trust_domains").and_then(|v| v.as_array_mut()) {
        for (i, td) in tds.iter_mut().enumerate() {
            let Some(obj) = td.as_object_mut() else { continue };
            let Some(url) = obj.remove("bundle_url") else {
                for k in ["refresh_s", "bundle_ca", "max_bundle_age_s"] {
                    if obj.contains_key(k) {
                        bail!("identity.trust_domains[{i}].{k} needs bundle_url");
                    }
                }
                continue;
            };
            let url = url.as_str().ok_or_else(|| anyhow!("identity.trust_domains[{i}].bundle_url must be a string"))?.to_string();
            let bundle_ca = match obj.remove("bundle_ca") {
                None => None,
                Some(v) => Some(PathBuf::from(v.as_str().filter(|s| !s.is_empty()).ok_or_else(|| anyhow!("identity.trust_domains[{i}].bundle_ca must be a PEM file path"))?)),
            };
            let target = BundleTarget::parse(&url).map_err(|e| anyhow!("identity.trust_domains[{i}].bundle_url: {e}"))?;
            match (target.tls, &bundle_ca) {
                (false, Some(_)) => bail!("identity.trust_domains[{i}].bundle_ca applies to https:// URLs only"),
                (true, None) => bail!("identity.trust_domains[{i}].bundle_url is https://: give `bundle_ca`, the PEM file of the CA that signs the bundle server's certificate (no system roots are trusted)"),
                _ => {}
            }
            let refresh_s = match obj.remove("refresh_s") {
                Some(v) => v.as_u64().filter(|s| *s >= 5).ok_or_else(|| anyhow!("identity.trust_domains[{i}].refresh_s must be an integer ≥ 5"))?,
                None => 300,
            };
            let max_bundle_age_s = match obj.remove("max_bundle_age_s") {
                Some(v) => v.as_u64().filter(|s| *s >= refresh_s).ok_or_else(|| anyhow!("identity.trust_domains[{i}].max_bundle_age_s must be an integer ≥ refresh_s ({refresh_s})"))?,
                None => DEFAULT_MAX_BUNDLE_AGE_S.max(refresh_s),
            };
            if obj.contains_key("bundle") {
                bail!("identity.trust_domains[{i}]: give either bundle or bundle_url, not both");
            }
            let name = obj.get("name").and_then(|n| n.as_str()).unwrap_or_default().to_string();
            obj.insert("bundle".into(), serde_json::json!({"cluster": "minter-bundle-url", "refresh_s": refresh_s, "retry_s": refresh_s.min(10)}));
            urls.push(BundleUrl { trust_domain: name, url, refresh_s, bundle_ca, max_bundle_age_s });
        }
    }
    Ok((identity, urls))
}

/// Where a bundle URL points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BundleTarget {
    pub tls: bool,
    /// Host as written (brackets removed from an IPv6 literal).
    pub host: String,
    pub port: u16,
    /// `host[:port]` for the Host header.
    pub authority: String,
    pub path: String,
}

impl BundleTarget {
    /// Parses `http://` or `https://` URLs; refuses userinfo, fragments, a missing host and
    /// `http://` to anything but a loopback host.
    pub fn parse(url: &str) -> Result<BundleTarget, String> {
        let (tls, rest) = if let Some(r) = url.strip_prefix("https://") {
            (true, r)
        } else if let Some(r) = url.strip_prefix("http://") {
            (false, r)
        } else {
            return Err("only http:// (loopback) and https:// URLs are supported".into());
        };
        if url.bytes().any(|b| !(0x21..=0x7e).contains(&b)) || url.contains('#') {
            return Err("the URL must be visible ASCII without a fragment".into());
        }
        let (authority, path) = match rest.find('/') {
            Some(i) => (rest.get(..i).unwrap_or(rest), rest.get(i..).unwrap_or("/")),
            None => (rest, "/"),
        };
        if authority.contains('@') {
            return Err("userinfo is not allowed in a bundle URL".into());
        }
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (h, after) = v6.split_once(']').ok_or("bad IPv6 literal")?;
            let port = match after.strip_prefix(':') {
                Some(p) => p.parse::<u16>().map_err(|_| "bad port")?,
                None if after.is_empty() => if tls { 443 } else { 80 },
                None => return Err("bad authority".into()),
            };
            (h.to_string(), port)
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h.to_string(), p.parse::<u16>().map_err(|_| "bad port")?),
                None => (authority.to_string(), if tls { 443 } else { 80 }),
            }
        };
        if host.is_empty() {
            return Err("the URL names no host".into());
        }
        if !tls && !is_loopback_host(&host) {
            return Err(format!(
                "plain http:// is allowed only to a loopback host (127.0.0.0/8, ::1, localhost), not `{host}`: use https:// with `bundle_ca`"
            ));
        }
        Ok(BundleTarget { tls, host, port, authority: authority.to_string(), path: path.to_string() })
    }
}

/// 127.0.0.0/8, ::1 (also as ::ffff:127.x) or `localhost`.
pub fn is_loopback_host(host: &str) -> bool {
    if host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    match host.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V4(v4)) => v4.is_loopback(),
        Ok(std::net::IpAddr::V6(v6)) => v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback()),
        Err(_) => false,
    }
}
