//! The parity table: one list of scenarios (plugin config + request + expected verdict) run
//! through both hosts of the filter, the wasmtime test host (`mandate_host_test::run_request`)
//! and a real Envoy in front of the echo upstream. Both must agree with each other and with the
//! expectation.
//!
//! * A [`Table`] holds named plugin configs and [`Scenario`]s; each scenario names its config.
//!   Envoy is started once per config (scenarios are grouped by config, table order kept inside
//!   a group), the test host gets one VM per config, so caches behave the same on both.
//! * A [`Scenario`] is built fluently: `Scenario::new("name", "config").on("host", "/path")
//!   .bearer(&token).header(..)` then `.forwarded()` / `.denied(status, reason)` and upstream
//!   assertions (`upstream_eq`, `upstream_has`, `upstream_lacks`, `upstream_path`).
//! * [`run_on_host`] and [`run_on_envoy`] turn a table into one [`Observed`] per scenario;
//!   [`Observed::verdict`] projects what both hosts must agree on; [`check`] compares with the
//!   expectation and the invariants every verdict must satisfy.
//! * [`standard_table`] is the shared scenario list (identity, policy, request shape, dry run);
//!   extend it (or build another table) for minting and delegation scenarios. Configs that need
//!   extra Envoy clusters (a minter, a bundle server) can declare them with
//!   [`Table::config_with_clusters`]: Envoy gets a loopback cluster, the test host an upstream of
//!   that name.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};

use crate::testkit::{plain_jwks, spiffe_bundle, svid_claims, TestKey};
use crate::{raw_http, Envoy, MockServer, Vars};

/// The header the filter sets with the decision id (upstream and on local replies).
pub const DECISION_HEADER: &str = "x-mandate-decision-id";
/// The identity header the standard table's main config sends upstream.
pub const IDENTITY_HEADER: &str = "x-mandate-identity";
/// Decision ids differ per request and per host: verdicts compare their presence only.
const ID_PLACEHOLDER: &str = "<decision-id>";

// ---------------------------------------------------------------------------------------------
// Scenarios
// ---------------------------------------------------------------------------------------------

/// The request of a scenario. Header names are lowercase.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    pub authority: String,
    /// The request target exactly as sent (not normalised by the client).
    pub path: String,
    pub headers: Vec<(String, String)>,
}

/// What a scenario must produce.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expect {
    /// 200 when forwarded (the echo upstream answers 200), else the local reply's status.
    pub status: u16,
    /// The `reason` of the local reply's JSON body; `None` when forwarded.
    pub reason: Option<String>,
    /// Headers that must reach the upstream, with their exact (single) value if given.
    pub upstream_present: Vec<(String, Option<String>)>,
    /// Headers that must not reach the upstream.
    pub upstream_absent: Vec<String>,
    /// The `:path` the upstream must see.
    pub upstream_path: Option<String>,
}

/// One row of the table.
#[derive(Debug, Clone)]
pub struct Scenario {
    pub name: String,
    /// Name of the plugin config (see [`Table::config`]).
    pub config: String,
    pub request: Request,
    pub expect: Expect,
}

impl Scenario {
    /// A `GET /` to `api.internal`, expected to be forwarded; refine with the builders.
    pub fn new(name: &str, config: &str) -> Scenario {
        Scenario {
            name: name.to_string(),
            config: config.to_string(),
            request: Request {
                method: "GET".into(),
                authority: "api.internal".into(),
                path: "/".into(),
                headers: Vec::new(),
            },
            expect: Expect {
                status: 200,
                reason: None,
                upstream_present: Vec::new(),
                upstream_absent: Vec::new(),
                upstream_path: None,
            },
        }
    }

    pub fn method(mut self, method: &str) -> Self {
        self.request.method = method.to_string();
        self
    }

    /// Sets `:authority` and the request target.
    pub fn on(mut self, authority: &str, path: &str) -> Self {
        self.request.authority = authority.to_string();
        self.request.path = path.to_string();
        self
    }

    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.request.headers.push((name.to_ascii_lowercase(), value.to_string()));
        self
    }

    /// `authorization: Bearer <token>`.
    pub fn bearer(self, token: &str) -> Self {
        let v = format!("Bearer {token}");
        self.header("authorization", &v)
    }

    /// `x-agent-intent: <intent>`.
    pub fn intent(self, intent: &str) -> Self {
        self.header("x-agent-intent", intent)
    }

    /// Expect the request forwarded (200 from the echo upstream) with a decision id and without
    /// the caller's credentials (`authorization`, `x-agent-intent-token`).
    pub fn forwarded(mut self) -> Self {
        self.expect.status = 200;
        self.expect.reason = None;
        self = self.upstream_has(DECISION_HEADER);
        self.upstream_lacks("authorization").upstream_lacks("x-agent-intent-token")
    }

    /// Expect a local reply with this status and reason code.
    pub fn denied(mut self, status: u16, reason: &str) -> Self {
        self.expect.status = status;
        self.expect.reason = Some(reason.to_string());
        self
    }

    /// `name` must reach the upstream (any value).
    pub fn upstream_has(mut self, name: &str) -> Self {
        self.expect.upstream_absent.retain(|n| n != name);
        self.expect.upstream_present.retain(|(n, _)| n != name);
        self.expect.upstream_present.push((name.to_string(), None));
        self
    }

    /// `name` must reach the upstream exactly once, with this value.
    pub fn upstream_eq(mut self, name: &str, value: &str) -> Self {
        self.expect.upstream_absent.retain(|n| n != name);
        self.expect.upstream_present.retain(|(n, _)| n != name);
        self.expect.upstream_present.push((name.to_string(), Some(value.to_string())));
        self
    }

    /// `name` must not reach the upstream.
    pub fn upstream_lacks(mut self, name: &str) -> Self {
        self.expect.upstream_present.retain(|(n, _)| n != name);
        if !self.expect.upstream_absent.iter().any(|n| n == name) {
            self.expect.upstream_absent.push(name.to_string());
        }
        self
    }

    /// The path (and query) the upstream must see.
    pub fn upstream_path(mut self, path: &str) -> Self {
        self.expect.upstream_path = Some(path.to_string());
        self
    }
}

/// A plugin config of the table, and the loopback clusters it needs.
#[derive(Debug, Clone)]
pub struct TableConfig {
    pub name: String,
    pub plugin: Value,
    /// (cluster name, port) pairs: Envoy clusters to `127.0.0.1:port`; upstream names on the
    /// test host (whose callouts scenarios would have to script).
    pub clusters: Vec<(String, u16)>,
}

/// Named configs and the scenarios that use them.
#[derive(Debug, Clone, Default)]
pub struct Table {
    pub configs: Vec<TableConfig>,
    pub scenarios: Vec<Scenario>,
}

impl Table {
    pub fn new() -> Table {
        Table::default()
    }

    /// Adds (or replaces) a named plugin config.
    pub fn config(&mut self, name: &str, plugin: Value) -> &mut Self {
        self.config_with_clusters(name, plugin, &[])
    }

    /// Adds (or replaces) a named plugin config that calls loopback clusters.
    pub fn config_with_clusters(&mut self, name: &str, plugin: Value, clusters: &[(&str, u16)]) -> &mut Self {
        self.configs.retain(|c| c.name != name);
        self.configs.push(TableConfig {
            name: name.to_string(),
            plugin,
            clusters: clusters.iter().map(|(n, p)| (n.to_string(), *p)).collect(),
        });
        self
    }

    pub fn add(&mut self, s: Scenario) -> &mut Self {
        self.scenarios.push(s);
        self
    }

    /// Unique scenario names, every config referenced exists and is used.
    pub fn validate(&self) -> Result<()> {
        let mut names = std::collections::BTreeSet::new();
        for s in &self.scenarios {
            if !names.insert(s.name.as_str()) {
                bail!("scenario name {:?} is used twice", s.name);
            }
            if !self.configs.iter().any(|c| c.name == s.config) {
                bail!("scenario {:?} names unknown config {:?}", s.name, s.config);
            }
            if (s.expect.status == 200) != s.expect.reason.is_none() {
                bail!("scenario {:?}: a 200 is forwarded (no reason); a denial has a reason", s.name);
            }
        }
        for c in &self.configs {
            if !self.scenarios.iter().any(|s| s.config == c.name) {
                bail!("config {:?} is used by no scenario", c.name);
            }
        }
        Ok(())
    }

    /// Each config with the indices of its scenarios, in table order.
    pub fn groups(&self) -> Vec<(&TableConfig, Vec<usize>)> {
        self.configs
            .iter()
            .map(|c| {
                let idx = self.scenarios.iter().enumerate().filter(|(_, s)| s.config == c.name).map(|(i, _)| i).collect();
                (c, idx)
            })
            .filter(|(_, idx): &(&TableConfig, Vec<usize>)| !idx.is_empty())
            .collect()
    }
}

// ---------------------------------------------------------------------------------------------
// Observations and verdicts
// ---------------------------------------------------------------------------------------------

/// A local reply as the client received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplySeen {
    /// Names lowercase, in order.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl ReplySeen {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }
}

/// What reached the service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamSeen {
    /// `:path` (path and query).
    pub path: String,
    /// Regular headers (no pseudo headers) by lowercase name, values in order.
    pub headers: BTreeMap<String, Vec<String>>,
}

impl UpstreamSeen {
    fn from_pairs(path: String, pairs: impl IntoIterator<Item = (String, String)>) -> UpstreamSeen {
        let mut headers: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (n, v) in pairs {
            if !n.starts_with(':') {
                headers.entry(n.to_ascii_lowercase()).or_default().push(v);
            }
        }
        UpstreamSeen { path, headers }
    }

    pub fn values(&self, name: &str) -> &[String] {
        self.headers.get(name).map(Vec::as_slice).unwrap_or(&[])
    }
}

/// Everything one host did with one scenario's request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    /// 200 from the upstream, the local reply's status, or 0 if neither happened.
    pub status: u16,
    pub reply: Option<ReplySeen>,
    pub upstream: Option<UpstreamSeen>,
    /// Anything unexpected on the host side (paused stream, trap, host warnings).
    pub anomaly: Option<String>,
}

impl Observed {
    /// The `reason` of a local reply's JSON body.
    pub fn reason(&self) -> Option<String> {
        let body: Value = serde_json::from_str(&self.reply.as_ref()?.body).ok()?;
        body["reason"].as_str().map(str::to_string)
    }

    /// What both hosts must agree on: status, reason, the `www-authenticate` challenge, the path
    /// the upstream saw, and the upstream values of `watched` headers plus every `x-mandate-*` /
    /// `x-agent-*` header (decision ids reduced to their presence).
    pub fn verdict(&self, watched: &[String]) -> Verdict {
        let mut headers = BTreeMap::new();
        if let Some(u) = &self.upstream {
            for (name, values) in &u.headers {
                let interesting = watched.iter().any(|w| w == name)
                    || name.starts_with("x-mandate-")
                    || name.starts_with("x-agent-");
                if !interesting {
                    continue;
                }
                let values = if name == DECISION_HEADER {
                    values.iter().map(|_| ID_PLACEHOLDER.to_string()).collect()
                } else {
                    values.clone()
                };
                headers.insert(name.clone(), values);
            }
        }
        Verdict {
            status: self.status,
            reason: self.reason(),
            www_authenticate: self.reply.as_ref().and_then(|r| r.header("www-authenticate")).map(str::to_string),
            upstream_path: self.upstream.as_ref().map(|u| u.path.clone()),
            upstream_headers: headers,
        }
    }

    fn summary(&self) -> String {
        match (&self.upstream, self.reason()) {
            (Some(u), _) => format!("{} forwarded {}", self.status, u.path),
            (None, Some(r)) => format!("{} {r}", self.status),
            (None, None) => format!("{} {:?}", self.status, self.anomaly),
        }
    }
}

/// The comparable part of an [`Observed`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub status: u16,
    pub reason: Option<String>,
    pub www_authenticate: Option<String>,
    pub upstream_path: Option<String>,
    pub upstream_headers: BTreeMap<String, Vec<String>>,
}

/// Header names any scenario of the table mentions, plus the credentials the filter must strip.
pub fn watched_headers(table: &Table) -> Vec<String> {
    let mut w: Vec<String> = ["authorization", DECISION_HEADER, IDENTITY_HEADER, "x-agent-intent-token"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    for s in &table.scenarios {
        w.extend(s.expect.upstream_present.iter().map(|(n, _)| n.clone()));
        w.extend(s.expect.upstream_absent.iter().cloned());
    }
    w.sort();
    w.dedup();
    w
}

/// Differences between a scenario's expectation (and the invariants of every verdict) and what
/// one host did. Empty when it matches.
pub fn check(s: &Scenario, o: &Observed) -> Vec<String> {
    let mut out = Vec::new();
    let e = &s.expect;
    if let Some(a) = &o.anomaly {
        out.push(format!("host anomaly: {a}"));
    }
    if o.status != e.status {
        out.push(format!("status {} (want {})", o.status, e.status));
    }
    if o.reason() != e.reason {
        out.push(format!("reason {:?} (want {:?})", o.reason(), e.reason));
    }
    match (&o.reply, &o.upstream) {
        (Some(_), Some(_)) => out.push("both a local reply and an upstream request".into()),
        (None, None) => out.push("neither a local reply nor an upstream request".into()),
        (Some(r), None) => {
            // Every denial: JSON body {error, reason, decision_id}, the id also in the header.
            let body: Value = serde_json::from_str(&r.body).unwrap_or(Value::Null);
            if !r.header("content-type").is_some_and(|c| c.starts_with("application/json")) {
                out.push(format!("local reply content-type {:?}", r.header("content-type")));
            }
            let id = body["decision_id"].as_str().unwrap_or_default();
            if id.is_empty() || r.header(DECISION_HEADER) != Some(id) {
                out.push(format!("decision id: header {:?}, body {:?}", r.header(DECISION_HEADER), body["decision_id"]));
            }
            if body["error"].as_str().is_none_or(str::is_empty) {
                out.push(format!("no error message in {}", r.body));
            }
            let challenge = r.header("www-authenticate");
            match (o.status == 401, challenge) {
                (true, Some(c)) if c.starts_with("Bearer") => {}
                (false, None) => {}
                (_, c) => out.push(format!("www-authenticate {c:?} on a {}", o.status)),
            }
        }
        (None, Some(u)) => {
            let ids = u.values(DECISION_HEADER);
            let sent: Vec<&str> =
                s.request.headers.iter().filter(|(n, _)| n == DECISION_HEADER).map(|(_, v)| v.as_str()).collect();
            if ids.len() != 1 || ids[0].is_empty() || sent.contains(&ids[0].as_str()) {
                out.push(format!("upstream decision ids {ids:?} (want one, minted by the filter; client sent {sent:?})"));
            }
            for (name, value) in &e.upstream_present {
                let got = u.values(name);
                match value {
                    None if got.is_empty() => out.push(format!("upstream lacks {name}")),
                    Some(v) if got != std::slice::from_ref(v) => {
                        out.push(format!("upstream {name} = {got:?} (want exactly [{v:?}])"))
                    }
                    _ => {}
                }
            }
            for name in &e.upstream_absent {
                if !u.values(name).is_empty() {
                    out.push(format!("upstream got {name} = {:?}", u.values(name)));
                }
            }
            if let Some(p) = &e.upstream_path {
                if &u.path != p {
                    out.push(format!("upstream path {:?} (want {p:?})", u.path));
                }
            }
        }
    }
    out
}

/// Checks every scenario on every host against its expectation and the hosts against each
/// other. Returns a printable table of outcomes and the list of failures.
pub fn compare(table: &Table, runs: &[(&str, &[Observed])]) -> (String, Vec<String>) {
    let watched = watched_headers(table);
    let mut failures = Vec::new();
    let mut report = String::new();
    for (i, s) in table.scenarios.iter().enumerate() {
        let want = match &s.expect.reason {
            Some(r) => format!("{} {r}", s.expect.status),
            None => "200 forwarded".to_string(),
        };
        let _ = write!(report, "{:<44} {:<8} want {:<32}", s.name, s.config, want);
        let mut first: Option<(&str, Verdict)> = None;
        for (host, obs) in runs {
            let Some(o) = obs.get(i) else {
                failures.push(format!("{}: no result from {host}", s.name));
                continue;
            };
            let _ = write!(report, " | {host}: {}", o.summary());
            for problem in check(s, o) {
                failures.push(format!("{} [{}] on {host}: {problem}", s.name, s.config));
            }
            let v = o.verdict(&watched);
            match &first {
                None => first = Some((host, v)),
                Some((h0, v0)) if *v0 != v => {
                    failures.push(format!("{} [{}]: hosts disagree\n  {h0}: {v0:?}\n  {host}: {v:?}", s.name, s.config))
                }
                Some(_) => {}
            }
        }
        report.push('\n');
    }
    (report, failures)
}

// ---------------------------------------------------------------------------------------------
// Runners
// ---------------------------------------------------------------------------------------------

/// Runs the table on the wasmtime test host: one VM per config, wall clock set to `now`.
pub fn run_on_host(table: &Table, wasm: &Path, now: u64) -> Result<Vec<Observed>> {
    use mandate_host_test::runner::{HeaderList, TimeSpec};
    use mandate_host_test::{run_request, Host, RequestSpec, Verdict as HostVerdict};

    let base = Host::from_file(wasm)?;
    let mut out: Vec<Option<Observed>> = vec![None; table.scenarios.len()];
    for (cfg, idx) in table.groups() {
        let host = base.fresh()?;
        host.set_time_secs(now);
        for (cluster, _) in &cfg.clusters {
            host.add_upstream(cluster);
        }
        let mut vm = host
            .new_vm(b"", cfg.plugin.to_string().as_bytes())
            .with_context(|| format!("test host: config {:?}", cfg.name))?;
        for i in idx {
            let s = &table.scenarios[i];
            let mut spec = RequestSpec::get(&s.request.path);
            spec.method = s.request.method.clone();
            spec.authority = s.request.authority.clone();
            spec.headers = HeaderList::Pairs(s.request.headers.clone());
            spec.time = Some(TimeSpec::Seconds(now as f64));
            let o = match run_request(&host, &mut vm, &spec) {
                Err(e) => Observed { status: 0, reply: None, upstream: None, anomaly: Some(format!("{e:#}")) },
                Ok(r) => {
                    let mut anomaly = (!r.warnings.is_empty()).then(|| format!("host warnings: {:?}", r.warnings));
                    let reply =
                        r.local_reply.as_ref().map(|l| ReplySeen { headers: lower(&l.headers), body: l.body.clone() });
                    let upstream = match (r.verdict, &r.upstream_request) {
                        (HostVerdict::Forwarded, Some(u)) => {
                            let path = u.headers.iter().find(|(n, _)| n == ":path").map(|(_, v)| v.clone()).unwrap_or_default();
                            Some(UpstreamSeen::from_pairs(path, u.headers.clone()))
                        }
                        _ => None,
                    };
                    let status = match (&r.local_reply, &upstream) {
                        (Some(l), _) => u16::try_from(l.status).unwrap_or(0),
                        (None, Some(_)) => 200,
                        (None, None) => {
                            anomaly = Some(format!("verdict {:?}; trace {:?}", r.verdict, r.trace));
                            0
                        }
                    };
                    Observed { status, reply, upstream, anomaly }
                }
            };
            out[i] = Some(o);
        }
    }
    out.into_iter()
        .enumerate()
        .map(|(i, o)| o.ok_or_else(|| anyhow!("scenario {} was not run", table.scenarios[i].name)))
        .collect()
}

fn lower(h: &[(String, String)]) -> Vec<(String, String)> {
    h.iter().map(|(n, v)| (n.to_ascii_lowercase(), v.clone())).collect()
}

/// Timings of an Envoy run.
#[derive(Debug, Clone, Default)]
pub struct EnvoyRunStats {
    /// (config, startup time, time for its requests)
    pub per_config: Vec<(String, Duration, Duration)>,
}

/// Runs the table through real Envoy: one Envoy (and echo upstream) per config, requests sent as
/// raw HTTP/1.1 so the request target reaches Envoy byte for byte.
pub fn run_on_envoy(table: &Table) -> Result<(Vec<Observed>, EnvoyRunStats)> {
    let mut out: Vec<Option<Observed>> = vec![None; table.scenarios.len()];
    let mut stats = EnvoyRunStats::default();
    for (cfg, idx) in table.groups() {
        let echo = MockServer::echo()?;
        let mut vars = Vars::new().plugin_config_json(&cfg.plugin).upstream_port(echo.port());
        for (cluster, port) in &cfg.clusters {
            vars = vars.cluster(cluster, *port);
        }
        let t0 = Instant::now();
        let envoy = Envoy::start("mandate.yaml", vars).with_context(|| format!("Envoy for config {:?}", cfg.name))?;
        let started = t0.elapsed();
        let t1 = Instant::now();
        for i in idx {
            let s = &table.scenarios[i];
            let before = echo.request_count();
            let resp = raw_http(envoy.listener_port(), &raw_request(&s.request))
                .with_context(|| format!("scenario {:?}", s.name))?;
            let seen = echo.requests();
            let o = if seen.len() > before {
                let r = &seen[seen.len() - 1];
                let pairs = r.headers.iter().map(|(n, v)| (n.clone(), String::from_utf8_lossy(v).into_owned()));
                let anomaly = (seen.len() > before + 1).then(|| "more than one upstream request".to_string());
                Observed { status: resp.status, reply: None, upstream: Some(UpstreamSeen::from_pairs(r.path.clone(), pairs)), anomaly }
            } else {
                Observed {
                    status: resp.status,
                    reply: Some(ReplySeen { headers: lower(&resp.headers), body: resp.text() }),
                    upstream: None,
                    anomaly: None,
                }
            };
            out[i] = Some(o);
        }
        stats.per_config.push((cfg.name.clone(), started, t1.elapsed()));
    }
    let obs = out
        .into_iter()
        .enumerate()
        .map(|(i, o)| o.ok_or_else(|| anyhow!("scenario {} was not run", table.scenarios[i].name)))
        .collect::<Result<_>>()?;
    Ok((obs, stats))
}

/// The scenario's request as raw HTTP/1.1 bytes (`host` carries the authority).
pub fn raw_request(r: &Request) -> Vec<u8> {
    let mut s = format!("{} {} HTTP/1.1\r\nhost: {}\r\n", r.method, r.path, r.authority);
    for (n, v) in &r.headers {
        let _ = write!(s, "{n}: {v}\r\n");
    }
    if !matches!(r.method.as_str(), "GET" | "HEAD" | "DELETE" | "OPTIONS") {
        s.push_str("content-length: 0\r\n");
    }
    s.push_str("connection: close\r\n\r\n");
    s.into_bytes()
}

// ---------------------------------------------------------------------------------------------
// The standard table
// ---------------------------------------------------------------------------------------------

pub const TRUST_DOMAIN: &str = "example.org";
pub const AUDIENCE: &str = "spiffe://example.org/gateway";
/// A workload (class `workload`: any request allowed).
pub const WORKLOAD: &str = "spiffe://example.org/ns/prod/sa/web";
/// An AI agent (class `agent`: intent required, at most `confidential`, no standing secrets).
pub const AGENT: &str = "spiffe://example.org/agent/a1";
pub const OTHER_AGENT: &str = "spiffe://example.org/agent/a2";
pub const INTENT_ISSUER: &str = "https://intent.example.org";
pub const INTENT_AUDIENCE: &str = "mandate";

/// Keys and tokens of the standard table, minted for `now`.
pub struct Fixture {
    pub now: u64,
    /// Signs for `example.org` (kid `k1`), trusted through an inline bundle.
    pub key: TestKey,
    /// Signs for `other.org`, which no config trusts.
    pub foreign: TestKey,
    /// Another key claiming kid `k1`: its tokens carry a forged signature.
    pub forger: TestKey,
    /// Signs intent tokens (kid `i1`).
    pub intent_key: TestKey,
}

impl Fixture {
    pub fn new(now: u64) -> Fixture {
        Fixture {
            now,
            key: TestKey::es256("k1"),
            foreign: TestKey::es256("k1"),
            forger: TestKey::es256("k1"),
            intent_key: TestKey::es256("i1"),
        }
    }

    /// A JWT-SVID for `sub`, issued 5 s ago, valid 5 minutes.
    pub fn svid(&self, sub: &str) -> String {
        self.key.sign(&svid_claims(sub, AUDIENCE, self.now - 5, self.now + 300))
    }

    /// A signed intent token for `sub`.
    pub fn intent_token(&self, sub: &str, intents: &[&str]) -> String {
        self.intent_key.sign_intent(&json!({
            "iss": INTENT_ISSUER, "sub": sub, "aud": INTENT_AUDIENCE,
            "iat": self.now - 5, "exp": self.now + 120, "intents": intents,
        }))
    }

    /// The identity part of the configs: `example.org` trusted inline.
    pub fn identity(&self, upstream_header: Option<&str>) -> Value {
        let mut id = json!({
            "audiences": [AUDIENCE],
            "trust_domains": [{"name": TRUST_DOMAIN, "bundle": {"inline": spiffe_bundle(&[&self.key], None)}}],
        });
        if let Some(h) = upstream_header {
            id["upstream_header"] = json!(h);
        }
        id
    }

    /// The policy of the standard table. Rule windows are computed from `now`: `reports` is
    /// allowed only in a window starting an hour from now, `audit` in one around now.
    pub fn policy(&self, dry_run: bool) -> Value {
        let minute = (self.now % 86_400) / 60;
        let outside = format!("{}-{}", hhmm(minute + 60), hhmm(minute + 180));
        let inside = format!("{}-{}", hhmm(minute + 1440 - 60), hhmm(minute + 60));
        json!({
            "dry_run": dry_run,
            "classes": [
                {"name": "agent", "principals": ["spiffe://example.org/agent/*"], "intent_required": true,
                 "max_sensitivity": "confidential", "refuse_standing_secrets": true},
                {"name": "workload", "principals": ["spiffe://example.org/ns/*/sa/*"]}
            ],
            "resources": [
                {"name": "tickets", "hosts": ["tickets.internal"], "paths": ["/tickets/**"], "sensitivity": "internal"},
                {"name": "crm", "hosts": ["crm.internal"], "paths": ["/customers/**"], "sensitivity": "confidential"},
                {"name": "vault", "hosts": ["vault.internal"], "paths": ["/secrets/**"], "sensitivity": "restricted"},
                {"name": "reports", "hosts": ["reports.internal"], "paths": ["/reports/**"], "sensitivity": "internal"},
                {"name": "audit", "hosts": ["audit.internal"], "paths": ["/audit/**"], "sensitivity": "internal"}
            ],
            "intents": [
                {"name": "ticket.read", "operations": [{"resource": "tickets", "methods": ["GET"]}]},
                {"name": "customer.lookup", "operations": [{"resource": "crm", "methods": ["GET"]}], "require_signed": true},
                {"name": "secret.read", "operations": [{"resource": "vault", "methods": ["GET"]}]},
                {"name": "report.read", "operations": [{"resource": "reports", "methods": ["GET"]}]},
                {"name": "audit.read", "operations": [{"resource": "audit", "methods": ["GET"]}]}
            ],
            "intent_issuers": [
                {"issuer": INTENT_ISSUER, "jwks": plain_jwks(&[&self.intent_key]), "audiences": [INTENT_AUDIENCE]}
            ],
            "rules": [
                {"id": "workloads", "effect": "allow", "classes": ["workload"]},
                {"id": "agents", "effect": "allow", "classes": ["agent"],
                 "intents": ["ticket.read", "customer.lookup", "secret.read"]},
                {"id": "reports-later", "effect": "allow", "classes": ["agent"], "intents": ["report.read"],
                 "when": {"hours": [outside]}},
                {"id": "audit-now", "effect": "allow", "classes": ["agent"], "intents": ["audit.read"],
                 "when": {"hours": [inside]}}
            ]
        })
    }
}

/// `HH:MM` of a minute of the day (taken modulo one day).
pub fn hhmm(minute: u64) -> String {
    let m = minute % 1440;
    format!("{:02}:{:02}", m / 60, m % 60)
}

/// The shared scenario list: configs `main` (identity header upstream) and `dry_run` (policy in
/// dry-run mode, no identity header).
pub fn standard_table(f: &Fixture) -> Table {
    let now = f.now;
    let mut t = Table::new();
    t.config("main", json!({"identity": f.identity(Some(IDENTITY_HEADER)), "policy": f.policy(false)}));
    t.config("dry_run", json!({"identity": f.identity(None), "policy": f.policy(true)}));

    let workload = f.svid(WORKLOAD);
    let agent = f.svid(AGENT);
    let expired = f.key.sign(&svid_claims(WORKLOAD, AUDIENCE, now - 600, now - 120));
    let foreign = f.foreign.sign(&svid_claims("spiffe://other.org/ns/prod/sa/web", AUDIENCE, now - 5, now + 300));
    let forged = f.forger.sign(&svid_claims(WORKLOAD, AUDIENCE, now - 5, now + 300));
    let unknown_kid = TestKey::es256("k9").sign(&svid_claims(WORKLOAD, AUDIENCE, now - 5, now + 300));
    let wrong_aud = f.key.sign(&svid_claims(WORKLOAD, "spiffe://example.org/elsewhere", now - 5, now + 300));
    let alg_none = f.key.sign_with_header(
        "ES256",
        &json!({"alg": "none", "kid": "k1", "typ": "JWT"}),
        &svid_claims(WORKLOAD, AUDIENCE, now - 5, now + 300),
    );
    let signed_lookup = f.intent_token(AGENT, &["customer.lookup"]);
    let stolen_lookup = f.intent_token(OTHER_AGENT, &["customer.lookup"]);

    let m = "main";
    // --- identity ---
    t.add(Scenario::new("token_missing", m).denied(401, "token_missing"));
    t.add(Scenario::new("token_basic_scheme_is_missing", m).header("authorization", "Basic dXNlcjpwYXNz").denied(401, "token_missing"));
    t.add(Scenario::new("token_malformed", m).bearer("not-a-jwt").denied(401, "token_malformed"));
    t.add(
        Scenario::new("token_twice_is_malformed", m)
            .bearer(&workload)
            .bearer(&workload)
            .denied(401, "token_malformed"),
    );
    t.add(
        Scenario::new("svid_valid_allowed", m)
            .on("api.internal", "/orders/1?page=2")
            .bearer(&workload)
            .forwarded()
            .upstream_eq(IDENTITY_HEADER, WORKLOAD)
            .upstream_path("/orders/1?page=2"),
    );
    t.add(Scenario::new("svid_expired", m).bearer(&expired).denied(401, "token_expired"));
    t.add(Scenario::new("svid_foreign_trust_domain", m).bearer(&foreign).denied(401, "trust_domain_unknown"));
    t.add(Scenario::new("svid_forged_signature", m).bearer(&forged).denied(401, "signature_invalid"));
    t.add(Scenario::new("svid_unknown_kid", m).bearer(&unknown_kid).denied(401, "kid_unknown"));
    t.add(Scenario::new("svid_wrong_audience", m).bearer(&wrong_aud).denied(401, "audience_mismatch"));
    t.add(Scenario::new("svid_alg_none", m).bearer(&alg_none).denied(401, "alg_not_allowed"));
    t.add(
        Scenario::new("spoofed_mandate_headers_stripped", m)
            .bearer(&workload)
            .header(IDENTITY_HEADER, "spiffe://evil.example/admin")
            .header(DECISION_HEADER, "forged-decision")
            .header("x-mandate-anything", "x")
            .forwarded()
            .upstream_eq(IDENTITY_HEADER, WORKLOAD)
            .upstream_lacks("x-mandate-anything"),
    );
    // --- policy ---
    t.add(
        Scenario::new("agent_intent_allowed", m)
            .on("tickets.internal", "/tickets/1")
            .bearer(&agent)
            .intent("ticket.read")
            .forwarded()
            .upstream_eq(IDENTITY_HEADER, AGENT)
            .upstream_eq("x-agent-intent", "ticket.read"),
    );
    t.add(
        Scenario::new("intent_mismatch", m)
            .on("crm.internal", "/customers/1")
            .bearer(&agent)
            .intent("ticket.read")
            .denied(403, "intent_mismatch"),
    );
    t.add(
        Scenario::new("intent_mismatch_by_method", m)
            .method("DELETE")
            .on("tickets.internal", "/tickets/1")
            .bearer(&agent)
            .intent("ticket.read")
            .denied(403, "intent_mismatch"),
    );
    t.add(Scenario::new("agent_without_intent", m).on("tickets.internal", "/tickets/1").bearer(&agent).denied(403, "intent_required"));
    t.add(
        Scenario::new("intent_unknown", m)
            .on("tickets.internal", "/tickets/1")
            .bearer(&agent)
            .intent("payroll.run")
            .denied(403, "intent_unknown"),
    );
    t.add(
        Scenario::new("signed_intent_required_absent", m)
            .on("crm.internal", "/customers/7")
            .bearer(&agent)
            .intent("customer.lookup")
            .denied(403, "intent_token_required"),
    );
    t.add(
        Scenario::new("signed_intent_present_allowed", m)
            .on("crm.internal", "/customers/7")
            .bearer(&agent)
            .intent("customer.lookup")
            .header("x-agent-intent-token", &signed_lookup)
            .forwarded()
            .upstream_eq(IDENTITY_HEADER, AGENT),
    );
    t.add(
        Scenario::new("signed_intent_of_another_agent", m)
            .on("crm.internal", "/customers/7")
            .bearer(&agent)
            .intent("customer.lookup")
            .header("x-agent-intent-token", &stolen_lookup)
            .denied(403, "intent_token_invalid"),
    );
    t.add(
        Scenario::new("sensitivity_ceiling", m)
            .on("vault.internal", "/secrets/db")
            .bearer(&agent)
            .intent("secret.read")
            .denied(403, "sensitivity_exceeded"),
    );
    t.add(
        Scenario::new("standing_secret_from_agent", m)
            .on("tickets.internal", "/tickets/1")
            .bearer(&agent)
            .intent("ticket.read")
            .header("x-api-key", "static-secret")
            .denied(403, "standing_secret_presented"),
    );
    t.add(
        Scenario::new("time_window_outside_hours", m)
            .on("reports.internal", "/reports/q3")
            .bearer(&agent)
            .intent("report.read")
            .denied(403, "no_rule_matched"),
    );
    t.add(
        Scenario::new("time_window_inside_hours", m)
            .on("audit.internal", "/audit/log")
            .bearer(&agent)
            .intent("audit.read")
            .forwarded(),
    );
    // --- request shape ---
    t.add(
        Scenario::new("path_traversal_normalised", m)
            .on("tickets.internal", "/public/../tickets/1?x=1")
            .bearer(&agent)
            .intent("ticket.read")
            .forwarded()
            .upstream_path("/tickets/1?x=1"),
    );
    t.add(
        Scenario::new("path_merged_slashes_and_dots", m)
            .on("tickets.internal", "//tickets/./a/../1")
            .bearer(&agent)
            .intent("ticket.read")
            .forwarded()
            .upstream_path("/tickets/1"),
    );
    t.add(
        Scenario::new("path_encoded_dot_segments_judged_decoded", m)
            .on("tickets.internal", "/tickets/%2e%2e/customers/1")
            .bearer(&agent)
            .intent("ticket.read")
            .denied(403, "intent_mismatch"),
    );
    t.add(
        Scenario::new("path_encoded_slash_ambiguous", m)
            .on("tickets.internal", "/tickets/a%2Fb")
            .bearer(&agent)
            .intent("ticket.read")
            .denied(400, "path_ambiguous"),
    );
    t.add(
        Scenario::new("intent_malformed", m)
            .on("tickets.internal", "/tickets/1")
            .bearer(&agent)
            .intent("Ticket Read")
            .denied(400, "intent_malformed"),
    );
    // --- dry run: policy denials are recorded, not enforced; identity and shape still are ---
    let d = "dry_run";
    t.add(
        Scenario::new("dry_run_forwards_intent_required", d)
            .on("tickets.internal", "/tickets/1")
            .bearer(&agent)
            .forwarded()
            .upstream_lacks(IDENTITY_HEADER),
    );
    t.add(
        Scenario::new("dry_run_forwards_intent_mismatch", d)
            .on("crm.internal", "/customers/1")
            .bearer(&agent)
            .intent("ticket.read")
            .forwarded(),
    );
    t.add(Scenario::new("dry_run_enforces_identity", d).bearer(&expired).denied(401, "token_expired"));
    t.add(
        Scenario::new("dry_run_refuses_ambiguous_path", d)
            .on("tickets.internal", "/tickets/a%2Fb")
            .bearer(&agent)
            .denied(400, "path_ambiguous"),
    );
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standard_table_is_consistent() {
        let f = Fixture::new(1_800_000_000);
        let t = standard_table(&f);
        t.validate().unwrap();
        assert_eq!(t.groups().len(), 2, "Envoy starts once per config");
        // Both configs are valid plugin configurations.
        for c in &t.configs {
            mandate_core::config::parse(c.plugin.to_string().as_bytes()).unwrap();
        }
    }

    #[test]
    fn windows_exclude_and_include_now() {
        use mandate_core::policy::window::{Window, WindowConfig};
        for now in [1_800_000_000u64, 1_800_000_000 - 1_800_000_000 % 86_400, 1_800_000_000 - 1_800_000_000 % 86_400 + 86_399] {
            let p = Fixture::new(now).policy(false);
            let window = |rule: usize| {
                let c: WindowConfig = serde_json::from_value(p["rules"][rule]["when"].clone()).unwrap();
                Window::compile(&c).unwrap()
            };
            assert!(!window(2).contains(now), "outside window contains now at {now}");
            assert!(window(3).contains(now), "inside window misses now at {now}");
        }
    }

    #[test]
    fn check_flags_differences() {
        let s = Scenario::new("x", "c").forwarded().upstream_eq(IDENTITY_HEADER, "a");
        let good = Observed {
            status: 200,
            reply: None,
            upstream: Some(UpstreamSeen::from_pairs(
                "/".into(),
                [(DECISION_HEADER.to_string(), "id".to_string()), (IDENTITY_HEADER.to_string(), "a".to_string())],
            )),
            anomaly: None,
        };
        assert!(check(&s, &good).is_empty(), "{:?}", check(&s, &good));
        let mut bad = good.clone();
        bad.upstream.as_mut().unwrap().headers.insert("authorization".into(), vec!["Bearer x".into()]);
        assert_eq!(check(&s, &bad).len(), 1);
        let denied = Observed {
            status: 401,
            reply: Some(ReplySeen {
                headers: vec![
                    ("content-type".into(), "application/json".into()),
                    (DECISION_HEADER.into(), "i".into()),
                    ("www-authenticate".into(), "Bearer".into()),
                ],
                body: r#"{"error":"e","reason":"token_missing","decision_id":"i"}"#.into(),
            }),
            upstream: None,
            anomaly: None,
        };
        assert!(check(&Scenario::new("y", "c").denied(401, "token_missing"), &denied).is_empty());
        assert_eq!(check(&Scenario::new("y", "c").denied(401, "token_expired"), &denied).len(), 1);
    }

    #[test]
    fn raw_request_keeps_the_target_verbatim() {
        let s = Scenario::new("x", "c").on("h.internal", "/a/../b%2F").header("x-a", "1");
        let raw = String::from_utf8(raw_request(&s.request)).unwrap();
        assert!(raw.starts_with("GET /a/../b%2F HTTP/1.1\r\nhost: h.internal\r\nx-a: 1\r\n"), "{raw}");
    }
}
