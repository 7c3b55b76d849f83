//! mandate-e2e: the real-Envoy test rig.
//!
//! * [`MockServer`]: a loopback HTTP server (tokio + axum on `127.0.0.1:0`) that records every
//!   request it receives and answers through a handler; [`MockServer::echo`] answers with JSON of
//!   the method, path, headers and body it saw, so tests assert what reached the service.
//!   The same type serves as a bundle server or credential minter in later tests.
//! * [`Envoy`]: renders a YAML template from `envoy/` ([`Vars`] fills `{{NAME}}` placeholders),
//!   starts Envoy on loopback with ephemeral ports, waits for readiness, exposes the listener and
//!   admin ports, the access log and stats, and kills the process on drop (printing Envoy's log
//!   when the test is failing).
//! * [`http`], [`http_get`], [`raw_http`]: small blocking HTTP/1.1 clients.
//! * [`SvidIssuer`]: a trust domain with a signing key, its plugin config and JWT-SVIDs.
//! * [`prerequisites`]: skip (or, with `MANDATE_REQUIRE_ENVOY` set, fail) when Envoy or the
//!   wasm module is missing; [`wasm_prerequisite`] likewise for tests needing only the module.
//! * [`parity`]: the scenario table run through both the wasmtime test host and Envoy.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};

pub mod mcp;
pub mod parity;

/// Name of the listener defined by `envoy/mandate.yaml`.
pub const MAIN_LISTENER: &str = "mandate";
/// Environment variable that turns a missing Envoy or wasm module into a test failure.
pub const REQUIRE_ENV: &str = "MANDATE_REQUIRE_ENVOY";

// ---------------------------------------------------------------------------------------------
// Paths and prerequisites
// ---------------------------------------------------------------------------------------------

/// The workspace root (the directory holding the root `Cargo.toml`).
pub fn workspace_root() -> PathBuf {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    here.parent().unwrap_or(here).to_path_buf()
}

/// Directory of the Envoy templates (`envoy/`).
pub fn envoy_dir() -> PathBuf {
    workspace_root().join("envoy")
}

/// The built filter: `$MANDATE_PLUGIN_WASM` or
/// `target/wasm32-wasip1/release/mandate_plugin.wasm` (honouring `$CARGO_TARGET_DIR`).
pub fn plugin_wasm() -> Result<PathBuf> {
    let path = match std::env::var_os("MANDATE_PLUGIN_WASM") {
        Some(p) => PathBuf::from(p),
        None => {
            let target = std::env::var_os("CARGO_TARGET_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| workspace_root().join("target"));
            let target = if target.is_absolute() { target } else { workspace_root().join(target) };
            target.join("wasm32-wasip1/release/mandate_plugin.wasm")
        }
    };
    if !path.is_file() {
        bail!(
            "the mandate wasm filter is not built: {} does not exist; run scripts/test \
             (or `cargo build -p mandate-plugin --target wasm32-wasip1 --release`)",
            path.display()
        );
    }
    Ok(path)
}

/// The Envoy binary: `$MANDATE_ENVOY` or `.venv/bin/envoy` under the workspace root.
pub fn envoy_bin() -> PathBuf {
    match std::env::var_os("MANDATE_ENVOY") {
        Some(p) => PathBuf::from(p),
        None => workspace_root().join(".venv/bin/envoy"),
    }
}

/// Checks that Envoy and the wasm module exist. When one is missing: with `MANDATE_REQUIRE_ENVOY`
/// set (scripts/test, CI) this panics; otherwise it prints why the test is skipped and returns
/// false. Use as `if !mandate_e2e::prerequisites("name") { return; }`.
pub fn prerequisites(test: &str) -> bool {
    let mut missing: Vec<String> = envoy_missing().into_iter().collect();
    if let Err(e) = plugin_wasm() {
        missing.push(e.to_string());
    }
    run_or_skip(test, &missing)
}

/// Like [`prerequisites`] for tests that need only Envoy, not the wasm module.
pub fn envoy_prerequisite(test: &str) -> bool {
    run_or_skip(test, &envoy_missing().into_iter().collect::<Vec<_>>())
}

fn envoy_missing() -> Option<String> {
    let envoy = envoy_bin();
    (!envoy.is_file()).then(|| format!("Envoy not found at {} (run scripts/setup, or set MANDATE_ENVOY)", envoy.display()))
}

/// True when nothing is `missing`; otherwise skips the test (false), or panics when
/// `MANDATE_REQUIRE_ENVOY` is set.
fn run_or_skip(test: &str, missing: &[String]) -> bool {
    if missing.is_empty() {
        return true;
    }
    let why = missing.join("; ");
    if std::env::var_os(REQUIRE_ENV).is_some_and(|v| !v.is_empty()) {
        panic!("{test}: {REQUIRE_ENV} is set but prerequisites are missing: {why}");
    }
    eprintln!("SKIPPED {test}: {why}. Set {REQUIRE_ENV}=1 to make this a failure.");
    false
}

/// Like [`prerequisites`] for tests that need only the wasm module (the wasmtime test host):
/// its path, or `None` (test skipped) when it is missing and `MANDATE_REQUIRE_ENVOY` is unset.
pub fn wasm_prerequisite(test: &str) -> Option<PathBuf> {
    match plugin_wasm() {
        Ok(p) => Some(p),
        Err(e) => {
            if std::env::var_os(REQUIRE_ENV).is_some_and(|v| !v.is_empty()) {
                panic!("{test}: {REQUIRE_ENV} is set but the wasm module is missing: {e}");
            }
            eprintln!("SKIPPED {test}: {e}. Set {REQUIRE_ENV}=1 to make this a failure.");
            None
        }
    }
}

/// Quotes `s` as a YAML double-quoted scalar (JSON string syntax is valid YAML).
pub fn yaml_quote(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".to_string())
}

/// A STATIC cluster named `name` with one endpoint `127.0.0.1:port`, as a YAML list item
/// (for [`Vars::cluster_yaml`]; [`Vars::cluster`] uses it).
pub fn loopback_cluster_yaml(name: &str, port: u16, timeout: Duration) -> String {
    format!(
        "- name: {name}\n  type: STATIC\n  connect_timeout: {}s\n  load_assignment:\n    cluster_name: {name}\n    endpoints:\n    - lb_endpoints:\n      - endpoint:\n          address:\n            socket_address: {{ address: 127.0.0.1, port_value: {port} }}\n",
        timeout.as_secs_f64()
    )
}

// ---------------------------------------------------------------------------------------------
// Templates
// ---------------------------------------------------------------------------------------------

/// Variables for an Envoy template. Every value is inserted verbatim: use the typed setters,
/// which quote strings for YAML. Defaults: `ADMIN_PORT` and `LISTENER_PORT` = 0,
/// `PLUGIN_WASM` = [`plugin_wasm`], `PLUGIN_CONFIG` = `{}`, `ACCESS_LOG` = `<workdir>/access.log`,
/// `EXTRA_LISTENERS` / `EXTRA_CLUSTERS` / `HTTP_FILTERS_AFTER_MANDATE` = what was added,
/// `WORK_DIR` = the temp dir.
#[derive(Debug, Clone)]
pub struct Vars {
    vars: BTreeMap<String, String>,
    plugin_config: String,
    clusters: Vec<String>,
    listeners: Vec<String>,
    filters_after: Vec<String>,
    log_level: String,
    component_log_level: Option<String>,
    ready_timeout: Duration,
}

impl Default for Vars {
    fn default() -> Self {
        Self::new()
    }
}

impl Vars {
    pub fn new() -> Self {
        Vars {
            vars: BTreeMap::new(),
            plugin_config: "{}".to_string(),
            clusters: Vec::new(),
            listeners: Vec::new(),
            filters_after: Vec::new(),
            log_level: std::env::var("MANDATE_ENVOY_LOG_LEVEL").unwrap_or_else(|_| "info".into()),
            component_log_level: None,
            ready_timeout: Duration::from_secs(
                std::env::var("MANDATE_ENVOY_START_TIMEOUT")
                    .ok()
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(20),
            ),
        }
    }

    /// The plugin's JSON configuration, verbatim (may be invalid on purpose).
    pub fn plugin_config(mut self, json: &str) -> Self {
        self.plugin_config = json.to_string();
        self
    }

    /// The plugin's JSON configuration from a value.
    pub fn plugin_config_json(self, value: &Value) -> Self {
        let s = value.to_string();
        self.plugin_config(&s)
    }

    /// Port of the service behind the filter (cluster `upstream`).
    pub fn upstream_port(self, port: u16) -> Self {
        self.raw("UPSTREAM_PORT", &port.to_string())
    }

    /// Adds a loopback cluster `name` → `127.0.0.1:port` (e.g. a bundle server or a minter).
    pub fn cluster(mut self, name: &str, port: u16) -> Self {
        self.clusters.push(loopback_cluster_yaml(name, port, Duration::from_secs(1)));
        self
    }

    /// Adds a cluster given as a YAML list item written at column 0 (`- name: ...`).
    pub fn cluster_yaml(mut self, yaml: &str) -> Self {
        self.clusters.push(yaml.to_string());
        self
    }

    /// Adds a listener given as a YAML list item written at column 0 (`- name: ...`). Use
    /// `port_value: 0`; its bound port is then available from [`Envoy::listener_port_named`].
    pub fn listener_yaml(mut self, yaml: &str) -> Self {
        self.listeners.push(yaml.to_string());
        self
    }

    /// Adds an HTTP filter between mandate and the router (`HTTP_FILTERS_AFTER_MANDATE`), given
    /// as a YAML list item written at column 0 (`- name: ...`).
    pub fn http_filter_after_mandate(mut self, yaml: &str) -> Self {
        self.filters_after.push(yaml.to_string());
        self
    }

    /// Sets `{{name}}` to a YAML-quoted string.
    pub fn string(self, name: &str, value: &str) -> Self {
        let q = yaml_quote(value);
        self.raw(name, &q)
    }

    /// Sets `{{name}}` to `value` verbatim (numbers, YAML fragments).
    pub fn raw(mut self, name: &str, value: &str) -> Self {
        self.vars.insert(name.to_string(), value.to_string());
        self
    }

    /// Envoy's `--log-level` (default `info`, or `$MANDATE_ENVOY_LOG_LEVEL`).
    pub fn log_level(mut self, level: &str) -> Self {
        self.log_level = level.to_string();
        self
    }

    /// Envoy's `--component-log-level`, e.g. `wasm:debug,http:debug`.
    pub fn component_log_level(mut self, levels: &str) -> Self {
        self.component_log_level = Some(levels.to_string());
        self
    }

    /// How long [`Envoy::start`] waits for readiness (default 20 s, or
    /// `$MANDATE_ENVOY_START_TIMEOUT` seconds).
    pub fn ready_timeout(mut self, timeout: Duration) -> Self {
        self.ready_timeout = timeout;
        self
    }

    fn resolved(&self, work_dir: &Path) -> Result<BTreeMap<String, String>> {
        let mut all = BTreeMap::new();
        all.insert("ADMIN_PORT".to_string(), "0".to_string());
        all.insert("LISTENER_PORT".to_string(), "0".to_string());
        all.insert("PLUGIN_CONFIG".to_string(), yaml_quote(&self.plugin_config));
        all.insert(
            "ACCESS_LOG".to_string(),
            yaml_quote(&work_dir.join("access.log").to_string_lossy()),
        );
        all.insert("WORK_DIR".to_string(), yaml_quote(&work_dir.to_string_lossy()));
        all.insert("EXTRA_CLUSTERS".to_string(), self.clusters.concat());
        all.insert("EXTRA_LISTENERS".to_string(), self.listeners.concat());
        all.insert("HTTP_FILTERS_AFTER_MANDATE".to_string(), self.filters_after.concat());
        if !self.vars.contains_key("PLUGIN_WASM") {
            if let Ok(p) = plugin_wasm() {
                all.insert("PLUGIN_WASM".to_string(), yaml_quote(&p.to_string_lossy()));
            }
        }
        for (k, v) in &self.vars {
            all.insert(k.clone(), v.clone());
        }
        Ok(all)
    }
}

/// Renders `{{NAME}}` placeholders. A placeholder alone on its line takes a multi-line value,
/// indented to the placeholder's column (an empty value drops the line); inline placeholders
/// take single-line values. Unknown placeholders are an error. Comment lines (`#`) are copied
/// unchanged.
pub fn render_template(template: &str, vars: &BTreeMap<String, String>) -> Result<String> {
    let mut out = String::with_capacity(template.len() + 256);
    let mut missing = Vec::new();
    for line in template.lines() {
        let trimmed = line.trim();
        let indent = &line[..line.len() - line.trim_start().len()];
        if trimmed.starts_with('#') {
            // YAML comments may mention placeholders; they are left alone.
            out.push_str(line);
            out.push('\n');
            continue;
        }
        if let Some(name) = trimmed.strip_prefix("{{").and_then(|r| r.strip_suffix("}}")) {
            if is_placeholder_name(name) {
                match vars.get(name) {
                    Some(value) => {
                        for l in value.lines() {
                            if l.is_empty() {
                                out.push('\n');
                            } else {
                                let _ = writeln!(out, "{indent}{l}");
                            }
                        }
                    }
                    None => missing.push(name.to_string()),
                }
                continue;
            }
        }
        let mut rest = line;
        while let Some(start) = rest.find("{{") {
            out.push_str(&rest[..start]);
            let after = &rest[start + 2..];
            match after.find("}}") {
                Some(end) if is_placeholder_name(&after[..end]) => {
                    let name = &after[..end];
                    match vars.get(name) {
                        Some(v) if v.contains('\n') => {
                            bail!("template variable {name} is multi-line but used inline")
                        }
                        Some(v) => out.push_str(v),
                        None => missing.push(name.to_string()),
                    }
                    rest = &after[end + 2..];
                }
                _ => {
                    out.push_str("{{");
                    rest = after;
                }
            }
        }
        out.push_str(rest);
        out.push('\n');
    }
    if !missing.is_empty() {
        missing.sort();
        missing.dedup();
        bail!("template placeholders without a value: {}", missing.join(", "));
    }
    Ok(out)
}

fn is_placeholder_name(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
}

// ---------------------------------------------------------------------------------------------
// Envoy
// ---------------------------------------------------------------------------------------------

static ENVOY_SEQ: AtomicU32 = AtomicU32::new(0);

/// A running Envoy. Dropping it kills the process; if the thread is panicking, Envoy's log is
/// printed to stderr first.
pub struct Envoy {
    child: Option<Child>,
    dir: Option<tempfile::TempDir>,
    dir_path: PathBuf,
    log_path: PathBuf,
    stdout_path: PathBuf,
    admin_port: Option<u16>,
    listeners: BTreeMap<String, u16>,
    base_id: u32,
    started_in: Duration,
    exit: Option<ExitStatus>,
}

impl Envoy {
    /// Renders `template` (a file name under `envoy/`, or a path), starts Envoy and waits until it
    /// is ready (admin `/ready` is 200 and every listener has its port). Fails with Envoy's log if
    /// Envoy exits or is not ready within the timeout.
    pub fn start(template: &str, vars: Vars) -> Result<Envoy> {
        let timeout = vars.ready_timeout;
        let mut envoy = Envoy::spawn(template, vars)?;
        match envoy.wait_ready(timeout) {
            Ok(()) => Ok(envoy),
            Err(e) => {
                let log = envoy.log();
                Err(e.context(format!(
                    "Envoy did not become ready; its log:\n{}",
                    tail(&without_startup_listing(&log), 120)
                )))
            }
        }
    }

    /// Renders `template` and starts Envoy without waiting for readiness (use
    /// [`Envoy::wait_ready`] or [`Envoy::wait_exit`]).
    pub fn spawn(template: &str, vars: Vars) -> Result<Envoy> {
        let bin = envoy_bin();
        if !bin.is_file() {
            bail!("Envoy not found at {}: run scripts/setup or set MANDATE_ENVOY", bin.display());
        }
        let tpl_path = {
            let p = Path::new(template);
            if p.is_absolute() || p.exists() { p.to_path_buf() } else { envoy_dir().join(p) }
        };
        let tpl = std::fs::read_to_string(&tpl_path)
            .with_context(|| format!("reading Envoy template {}", tpl_path.display()))?;
        let dir = tempfile::Builder::new().prefix("mandate-envoy-").tempdir()?;
        let values = vars.resolved(dir.path())?;
        if tpl.contains("{{PLUGIN_WASM}}") && !values.contains_key("PLUGIN_WASM") {
            plugin_wasm()?; // the descriptive "not built" error
        }
        let rendered = render_template(&tpl, &values)
            .with_context(|| format!("rendering {}", tpl_path.display()))?;
        let config = dir.path().join("envoy.yaml");
        std::fs::write(&config, &rendered)?;
        let log_path = dir.path().join("envoy.log");
        let stdout_path = dir.path().join("envoy.stdout");
        let admin_path = dir.path().join("admin.address");
        // Unique per process and per Envoy in it. Hot restart is disabled, so no shared memory
        // is left behind when a test kills Envoy; the distinct base id keeps any other Envoy on
        // this machine (the demo, a developer's own) out of our way regardless.
        let seq = ENVOY_SEQ.fetch_add(1, Ordering::Relaxed);
        let base_id = (std::process::id() % 1_000_000) * 100 + 1000 + (seq % 100);
        let out = std::fs::File::create(&stdout_path)?;
        let err = out.try_clone()?;
        let mut cmd = Command::new(&bin);
        cmd.arg("-c")
            .arg(&config)
            .arg("--base-id")
            .arg(base_id.to_string())
            .arg("--disable-hot-restart")
            .args(["--concurrency", "1"])
            .arg("--log-level")
            .arg(&vars.log_level)
            .arg("--log-path")
            .arg(&log_path)
            .arg("--admin-address-path")
            .arg(&admin_path)
            .args(["--file-flush-interval-msec", "100"])
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err));
        if let Some(c) = &vars.component_log_level {
            cmd.arg("--component-log-level").arg(c);
        }
        kill_with_parent(&mut cmd);
        let t0 = Instant::now();
        let child = cmd.spawn().with_context(|| format!("starting {}", bin.display()))?;
        Ok(Envoy {
            child: Some(child),
            dir_path: dir.path().to_path_buf(),
            dir: Some(dir),
            log_path,
            stdout_path,
            admin_port: None,
            listeners: BTreeMap::new(),
            base_id,
            started_in: t0.elapsed(),
            exit: None,
        })
    }

    /// Waits until the admin API answers `/ready` with 200 and every listener reports a port.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let t0 = Instant::now();
        let deadline = t0 + timeout;
        let admin_path = self.dir_path.as_path().join("admin.address");
        loop {
            if let Some(status) = self.try_wait()? {
                bail!("Envoy exited during startup: {status}");
            }
            if self.admin_port.is_none() {
                if let Ok(s) = std::fs::read_to_string(&admin_path) {
                    if let Some(port) = s.trim().rsplit(':').next().and_then(|p| p.parse().ok()) {
                        self.admin_port = Some(port);
                    }
                }
            }
            if let Some(port) = self.admin_port {
                let ready = http_get(&format!("http://127.0.0.1:{port}/ready"), &[])
                    .map(|r| r.status == 200)
                    .unwrap_or(false);
                if ready {
                    if let Ok(listeners) = self.read_listeners() {
                        if !listeners.is_empty() && listeners.values().all(|p| *p != 0) {
                            self.listeners = listeners;
                            self.started_in += t0.elapsed();
                            return Ok(());
                        }
                    }
                }
            }
            if Instant::now() >= deadline {
                bail!("Envoy not ready after {:?}", timeout);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for Envoy to exit on its own; `None` if it is still running after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.try_wait()? {
                return Ok(Some(s));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The exit status if Envoy has exited.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        if self.exit.is_none() {
            if let Some(child) = self.child.as_mut() {
                self.exit = child.try_wait()?;
            }
        }
        Ok(self.exit)
    }

    fn read_listeners(&self) -> Result<BTreeMap<String, u16>> {
        let resp = self.admin_get("/listeners?format=json")?;
        let v: Value = resp.json()?;
        let mut out = BTreeMap::new();
        for l in v["listener_statuses"].as_array().into_iter().flatten() {
            let name = l["name"].as_str().unwrap_or_default().to_string();
            let port = l["local_address"]["socket_address"]["port_value"].as_u64().unwrap_or(0);
            out.insert(name, u16::try_from(port).unwrap_or(0));
        }
        Ok(out)
    }

    /// Port of the main listener (`mandate`).
    pub fn listener_port(&self) -> u16 {
        self.listener_port_named(MAIN_LISTENER)
    }

    /// Port of the listener `name`; panics if there is none.
    pub fn listener_port_named(&self, name: &str) -> u16 {
        match self.listeners.get(name) {
            Some(p) => *p,
            None => panic!("Envoy has no listener named {name:?}; it has {:?}", self.listeners),
        }
    }

    /// All listeners by name with their bound ports.
    pub fn listener_ports(&self) -> &BTreeMap<String, u16> {
        &self.listeners
    }

    /// `http://127.0.0.1:<main listener port><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{}", self.listener_port(), path)
    }

    /// The admin port; panics before readiness.
    pub fn admin_port(&self) -> u16 {
        match self.admin_port {
            Some(p) => p,
            None => panic!("Envoy's admin port is not known yet"),
        }
    }

    /// GET on the admin API.
    pub fn admin_get(&self, path_and_query: &str) -> Result<HttpResponse> {
        let port = self.admin_port.ok_or_else(|| anyhow!("admin port not known yet"))?;
        http_get(&format!("http://127.0.0.1:{port}{path_and_query}"), &[])
    }

    /// POST on the admin API (e.g. `/reset_counters`, `/logging?wasm=debug`).
    pub fn admin_post(&self, path_and_query: &str) -> Result<HttpResponse> {
        let port = self.admin_port.ok_or_else(|| anyhow!("admin port not known yet"))?;
        http("POST", &format!("http://127.0.0.1:{port}{path_and_query}"), &[], b"")
    }

    /// `/stats/prometheus` as text.
    pub fn stats_prometheus(&self) -> Result<String> {
        Ok(self.admin_get("/stats/prometheus")?.text())
    }

    /// Counters and gauges from `/stats?format=json` by name (histograms are skipped).
    pub fn stats(&self) -> Result<BTreeMap<String, i64>> {
        let v: Value = self.admin_get("/stats?format=json")?.json()?;
        let mut out = BTreeMap::new();
        for s in v["stats"].as_array().into_iter().flatten() {
            if let (Some(name), Some(value)) = (s["name"].as_str(), s["value"].as_i64()) {
                out.insert(name.to_string(), value);
            }
        }
        Ok(out)
    }

    /// One counter or gauge by exact name.
    pub fn stat(&self, name: &str) -> Result<Option<i64>> {
        Ok(self.stats()?.get(name).copied())
    }

    /// Envoy's log so far (`--log-path`, then anything it printed on stdout/stderr).
    pub fn log(&self) -> String {
        let mut s = std::fs::read_to_string(&self.log_path).unwrap_or_default();
        let out = std::fs::read_to_string(&self.stdout_path).unwrap_or_default();
        if !out.trim().is_empty() {
            s.push_str("\n--- envoy stdout/stderr ---\n");
            s.push_str(&out);
        }
        s
    }

    /// Lines of Envoy's log containing `needle`.
    pub fn log_lines_containing(&self, needle: &str) -> Vec<String> {
        self.log().lines().filter(|l| l.contains(needle)).map(str::to_string).collect()
    }

    /// Waits until a log line contains `needle`; returns it.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(l) = self.log_lines_containing(needle).into_iter().next() {
                return Ok(l);
            }
            if Instant::now() >= deadline {
                bail!("no Envoy log line containing {needle:?} within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The JSON access log written by the template's `ACCESS_LOG`.
    pub fn access_log_path(&self) -> PathBuf {
        self.dir_path.as_path().join("access.log")
    }

    /// Parsed access log entries so far (Envoy flushes every 100 ms here).
    pub fn access_log(&self) -> Vec<Value> {
        std::fs::read_to_string(self.access_log_path())
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Waits until the access log has at least `n` entries.
    pub fn wait_access_log(&self, n: usize, timeout: Duration) -> Result<Vec<Value>> {
        let deadline = Instant::now() + timeout;
        loop {
            let entries = self.access_log();
            if entries.len() >= n {
                return Ok(entries);
            }
            if Instant::now() >= deadline {
                bail!("access log has {} entries, wanted {n}, after {timeout:?}", entries.len());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The temp dir holding the rendered config, logs and access log (removed on drop).
    pub fn work_dir(&self) -> &Path {
        self.dir_path.as_path()
    }

    /// The rendered configuration.
    pub fn rendered_config(&self) -> String {
        std::fs::read_to_string(self.dir_path.as_path().join("envoy.yaml")).unwrap_or_default()
    }

    /// The `--base-id` this Envoy was given.
    pub fn base_id(&self) -> u32 {
        self.base_id
    }

    /// Time from spawn to readiness (spawn time only if not waited for).
    pub fn startup_time(&self) -> Duration {
        self.started_in
    }

    /// Kills Envoy now (also done on drop).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if self.exit.is_none() {
                // SIGTERM first so Envoy flushes logs; SIGKILL if it lingers.
                if let Ok(pid) = i32::try_from(child.id()) {
                    // SAFETY: plain kill(2) on our own child's pid.
                    unsafe { libc::kill(pid, libc::SIGTERM) };
                }
                let deadline = Instant::now() + Duration::from_secs(3);
                loop {
                    match child.try_wait() {
                        Ok(Some(s)) => {
                            self.exit = Some(s);
                            break;
                        }
                        Ok(None) if Instant::now() < deadline => {
                            std::thread::sleep(Duration::from_millis(20))
                        }
                        _ => {
                            let _ = child.kill();
                            self.exit = child.wait().ok();
                            break;
                        }
                    }
                }
            }
        }
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            let log = self.log();
            eprintln!(
                "===== Envoy log ({}; base id {}; last 200 lines) =====\n{}\n===== end of Envoy log =====",
                self.log_path.display(),
                self.base_id,
                tail(&without_startup_listing(&log), 200)
            );
            if std::env::var_os("MANDATE_KEEP_ENVOY_DIR").is_some() {
                if let Some(dir) = self.dir.take() {
                    eprintln!("keeping {}", dir.keep().display());
                }
            }
        }
    }
}

/// Drops Envoy's startup listing of extensions and header maps (indented info lines), which
/// would otherwise fill most of a failing test's output.
fn without_startup_listing(log: &str) -> String {
    log.lines().filter(|l| !l.contains("]   ")).collect::<Vec<_>>().join("\n")
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    let start = lines.len().saturating_sub(n);
    lines[start..].join("\n")
}

/// On Linux, makes the child die with the thread that spawned it (so a killed test binary does
/// not leave Envoy behind).
pub fn kill_with_parent(cmd: &mut Command) {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::process::CommandExt;
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = cmd;
}

// ---------------------------------------------------------------------------------------------
// Mock / echo upstream
// ---------------------------------------------------------------------------------------------

/// A request as received by a [`MockServer`].
#[derive(Debug, Clone)]
pub struct SeenRequest {
    pub method: String,
    /// Path and query.
    pub path: String,
    /// Headers in arrival order, names lowercase, values as raw bytes.
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Vec<u8>,
}

impl SeenRequest {
    /// The first value of header `name` (lossy UTF-8).
    pub fn header(&self, name: &str) -> Option<String> {
        self.header_all(name).into_iter().next()
    }

    /// Every value of header `name` (lossy UTF-8).
    pub fn header_all(&self, name: &str) -> Vec<String> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .filter(|(n, _)| *n == name)
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
            .collect()
    }

    /// Whether any header name starts with `prefix` (lowercase).
    pub fn has_header_prefix(&self, prefix: &str) -> bool {
        self.headers.iter().any(|(n, _)| n.starts_with(prefix))
    }

    /// The echo JSON: `{"method", "path", "headers": {name: value}, "header_list": [[n, v]],
    /// "body"}`; repeated headers are joined with ", "; values are lossy UTF-8.
    pub fn to_json(&self) -> Value {
        let mut map = serde_json::Map::new();
        let mut list = Vec::new();
        for (n, v) in &self.headers {
            let v = String::from_utf8_lossy(v).into_owned();
            list.push(json!([n, v]));
            match map.get_mut(n) {
                Some(Value::String(existing)) => {
                    existing.push_str(", ");
                    existing.push_str(&v);
                }
                _ => {
                    map.insert(n.clone(), Value::String(v));
                }
            }
        }
        json!({
            "method": self.method,
            "path": self.path,
            "headers": map,
            "header_list": list,
            "body": String::from_utf8_lossy(&self.body),
        })
    }
}

/// A response from a [`MockServer`] handler.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn json(status: u16, body: &Value) -> Reply {
        Reply {
            status,
            headers: vec![("content-type".into(), "application/json".into())],
            body: body.to_string().into_bytes(),
        }
    }

    pub fn text(status: u16, body: &str) -> Reply {
        Reply {
            status,
            headers: vec![("content-type".into(), "text/plain".into())],
            body: body.as_bytes().to_vec(),
        }
    }

    pub fn with_header(mut self, name: &str, value: &str) -> Reply {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }
}

type Handler = dyn Fn(&SeenRequest) -> Reply + Send + Sync + 'static;

/// A loopback HTTP/1.1 server on `127.0.0.1:<ephemeral>` running on its own thread and tokio
/// runtime. Records every request. Stops on drop.
pub struct MockServer {
    port: u16,
    seen: Arc<Mutex<Vec<SeenRequest>>>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl MockServer {
    /// The echo upstream: answers every request with 200 and [`SeenRequest::to_json`].
    pub fn echo() -> Result<MockServer> {
        MockServer::start(|req| Reply::json(200, &req.to_json()))
    }

    /// A server answering through `handler` (called on the server thread).
    pub fn start<F>(handler: F) -> Result<MockServer>
    where
        F: Fn(&SeenRequest) -> Reply + Send + Sync + 'static,
    {
        MockServer::start_on(std::net::TcpListener::bind("127.0.0.1:0")?, handler)
    }

    /// Like [`MockServer::start`] on a listening socket the caller made (say, one whose port
    /// was refusing connections until now, to play a server that comes back).
    pub fn start_on<F>(std_listener: std::net::TcpListener, handler: F) -> Result<MockServer>
    where
        F: Fn(&SeenRequest) -> Reply + Send + Sync + 'static,
    {
        std_listener.set_nonblocking(true)?;
        let port = std_listener.local_addr()?.port();
        let seen: Arc<Mutex<Vec<SeenRequest>>> = Arc::new(Mutex::new(Vec::new()));
        let handler: Arc<Handler> = Arc::new(handler);
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<std::result::Result<(), String>>();
        let seen2 = seen.clone();
        let thread = std::thread::Builder::new()
            .name(format!("mock-server-{port}"))
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e.to_string()));
                        return;
                    }
                };
                rt.block_on(async move {
                    let listener = match tokio::net::TcpListener::from_std(std_listener) {
                        Ok(l) => l,
                        Err(e) => {
                            let _ = ready_tx.send(Err(e.to_string()));
                            return;
                        }
                    };
                    let app = axum::Router::new().fallback(move |req: axum::extract::Request| {
                        let handler = handler.clone();
                        let seen = seen2.clone();
                        async move { serve_one(req, handler, seen).await }
                    });
                    let _ = ready_tx.send(Ok(()));
                    let _ = axum::serve(listener, app)
                        .with_graceful_shutdown(async move {
                            let _ = rx.await;
                        })
                        .await;
                });
            })?;
        match ready_rx.recv_timeout(Duration::from_secs(10)) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => bail!("mock server failed to start: {e}"),
            Err(_) => bail!("mock server did not start"),
        }
        Ok(MockServer { port, seen, shutdown: Some(tx), thread: Some(thread) })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{}", self.port, path)
    }

    /// Every request received so far.
    pub fn requests(&self) -> Vec<SeenRequest> {
        self.seen.lock().map(|v| v.clone()).unwrap_or_default()
    }

    pub fn request_count(&self) -> usize {
        self.seen.lock().map(|v| v.len()).unwrap_or_default()
    }

    /// Forgets the requests received so far.
    pub fn clear(&self) {
        if let Ok(mut v) = self.seen.lock() {
            v.clear();
        }
    }
}

async fn serve_one(
    req: axum::extract::Request,
    handler: Arc<Handler>,
    seen: Arc<Mutex<Vec<SeenRequest>>>,
) -> axum::response::Response {
    let (parts, body) = req.into_parts();
    let body = axum::body::to_bytes(body, 16 << 20).await.map(|b| b.to_vec()).unwrap_or_default();
    let seen_req = SeenRequest {
        method: parts.method.to_string(),
        path: parts.uri.path_and_query().map(|p| p.to_string()).unwrap_or_else(|| "/".into()),
        headers: parts
            .headers
            .iter()
            .map(|(n, v)| (n.as_str().to_string(), v.as_bytes().to_vec()))
            .collect(),
        body,
    };
    let reply = handler(&seen_req);
    if let Ok(mut v) = seen.lock() {
        v.push(seen_req);
    }
    let mut builder = axum::http::Response::builder().status(reply.status);
    for (n, v) in &reply.headers {
        builder = builder.header(n.as_str(), v.as_str());
    }
    builder.body(axum::body::Body::from(reply.body)).unwrap_or_else(|e| {
        let mut r = axum::response::Response::new(axum::body::Body::from(e.to_string()));
        *r.status_mut() = axum::http::StatusCode::INTERNAL_SERVER_ERROR;
        r
    })
}

impl Drop for MockServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP client
// ---------------------------------------------------------------------------------------------

/// A response: status, headers (names lowercase, values lossy UTF-8, in order) and body.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    /// First value of header `name`.
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers.iter().find(|(n, _)| *n == name).map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> Result<Value> {
        serde_json::from_slice(&self.body)
            .with_context(|| format!("response body is not JSON: {:?}", self.text()))
    }
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .proxy(None)
        .max_redirects(0)
        .timeout_global(Some(Duration::from_secs(30)))
        .build()
        .into()
}

/// A blocking request. 4xx/5xx are returned, not errors; errors are transport failures.
/// An empty body on GET/HEAD/DELETE/OPTIONS sends no body at all.
pub fn http(method: &str, url: &str, headers: &[(&str, &str)], body: &[u8]) -> Result<HttpResponse> {
    let mut req = ureq::http::Request::builder().method(method).uri(url);
    for (n, v) in headers {
        req = req.header(*n, *v);
    }
    let bodyless = body.is_empty() && matches!(method, "GET" | "HEAD" | "DELETE" | "OPTIONS");
    let resp = if bodyless {
        agent().run(req.body(())?)
    } else {
        agent().run(req.body(body.to_vec())?)
    }
    .with_context(|| format!("{method} {url}"))?;
    let status = resp.status().as_u16();
    let headers = resp
        .headers()
        .iter()
        .map(|(n, v)| (n.as_str().to_string(), String::from_utf8_lossy(v.as_bytes()).into_owned()))
        .collect();
    let body = resp.into_body().read_to_vec().with_context(|| format!("reading body of {url}"))?;
    Ok(HttpResponse { status, headers, body })
}

/// A blocking GET.
pub fn http_get(url: &str, headers: &[(&str, &str)]) -> Result<HttpResponse> {
    http("GET", url, headers, b"")
}

/// Sends `request` (raw HTTP/1.1 bytes, any header bytes at all) to `127.0.0.1:port` and reads
/// one response: until its `content-length` or final chunk has arrived, else until the server
/// closes the connection. Add `connection: close` to the request. Handles `content-length` and
/// chunked bodies.
///
/// Returning at the end of the body matters with Envoy: after a `connection: close` response it
/// waits up to `delayed_close_timeout` (1 s) for the client to close first.
pub fn raw_http(port: u16, request: &[u8]) -> Result<HttpResponse> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    s.write_all(request)?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        let n = match s.read(&mut chunk) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        };
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        if response_complete(&buf) {
            break;
        }
    }
    parse_response(&buf)
}

/// A TLS client identity for [`https`]: the CA that signed the server, and optionally a client
/// certificate (`NAME.pem` / `NAME.key` from `scripts/gen-test-certs`).
pub struct TlsClient {
    config: std::sync::Arc<rustls::ClientConfig>,
}

impl TlsClient {
    /// Trusts `pki/ca.pem`; presents `pki/{name}.pem` when `name` is given.
    pub fn new(pki: &Path, name: Option<&str>) -> Result<TlsClient> {
        use rustls_pki_types::pem::PemObject;
        use rustls_pki_types::{CertificateDer, PrivateKeyDer};
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(pki.join("ca.pem"))? {
            roots.add(cert?)?;
        }
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots);
        let config = match name {
            Some(n) => {
                let chain = CertificateDer::pem_file_iter(pki.join(format!("{n}.pem")))?.collect::<Result<Vec<_>, _>>()?;
                let key = PrivateKeyDer::from_pem_file(pki.join(format!("{n}.key")))?;
                builder.with_client_auth_cert(chain, key)?
            }
            None => builder.with_no_client_auth(),
        };
        Ok(TlsClient { config: std::sync::Arc::new(config) })
    }

    /// One HTTPS request to `127.0.0.1:port` (server name `localhost`), `connection: close`.
    /// A TLS-level refusal (say, a client certificate the server rejects) is an `Err`.
    pub fn request(&self, port: u16, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Result<HttpResponse> {
        let name = rustls_pki_types::ServerName::try_from("localhost")?;
        let conn = rustls::ClientConnection::new(self.config.clone(), name)?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let sock = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        sock.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut tls = rustls::StreamOwned::new(conn, sock);
        let mut req = format!("{method} {path} HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\ncontent-length: {}\r\n", body.len());
        for (n, v) in headers {
            let _ = write!(req, "{n}: {v}\r\n");
        }
        req.push_str("\r\n");
        tls.write_all(req.as_bytes())?;
        tls.write_all(body)?;
        tls.flush()?;
        let mut buf = Vec::new();
        let mut chunk = [0u8; 16 * 1024];
        loop {
            match tls.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                // Servers often close without close_notify after `connection: close`.
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !buf.is_empty() => break,
                Err(e) => return Err(e.into()),
            }
            if response_complete(&buf) {
                break;
            }
        }
        parse_response(&buf)
    }
}

/// Whether `buf` holds a whole response whose end is known without the connection closing.
fn response_complete(buf: &[u8]) -> bool {
    let Ok((status, headers, head_end)) = parse_head(buf) else { return false };
    if status < 200 || status == 204 || status == 304 {
        return status >= 200;
    }
    let rest = &buf[head_end + 4..];
    if headers.iter().any(|(n, v)| n == "transfer-encoding" && v.to_ascii_lowercase().contains("chunked")) {
        return rest.ends_with(b"\r\n\r\n") && decode_chunked(rest).is_ok();
    }
    match headers.iter().find(|(n, _)| n == "content-length").and_then(|(_, v)| v.parse::<usize>().ok()) {
        Some(len) => rest.len() >= len,
        None => false,
    }
}

/// A response head: status, headers (names lowercase), offset of the blank line ending it.
type Head = (u16, Vec<(String, String)>, usize);

/// Parses the head of a response.
fn parse_head(buf: &[u8]) -> Result<Head> {
    let head_end = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| anyhow!("no complete response head in {} bytes", buf.len()))?;
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("bad status line {status_line:?}"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Ok((status, headers, head_end))
}

fn parse_response(buf: &[u8]) -> Result<HttpResponse> {
    let (status, headers, head_end) = parse_head(buf)?;
    let rest = &buf[head_end + 4..];
    let chunked = headers
        .iter()
        .any(|(n, v)| n == "transfer-encoding" && v.to_ascii_lowercase().contains("chunked"));
    let body = if chunked {
        decode_chunked(rest)?
    } else if let Some(len) = headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .and_then(|(_, v)| v.parse::<usize>().ok())
    {
        rest.get(..len).ok_or_else(|| anyhow!("body shorter than content-length"))?.to_vec()
    } else {
        rest.to_vec()
    };
    Ok(HttpResponse { status, headers, body })
}

fn decode_chunked(mut data: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = data
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or_else(|| anyhow!("truncated chunk size"))?;
        let size_str = String::from_utf8_lossy(&data[..line_end]);
        let size_str = size_str.split(';').next().unwrap_or_default().trim().to_string();
        let size = usize::from_str_radix(&size_str, 16)
            .with_context(|| format!("bad chunk size {size_str:?}"))?;
        data = &data[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        out.extend_from_slice(data.get(..size).ok_or_else(|| anyhow!("truncated chunk"))?);
        data = data.get(size + 2..).ok_or_else(|| anyhow!("truncated chunk end"))?;
    }
}

// ---------------------------------------------------------------------------------------------
// Identities
// ---------------------------------------------------------------------------------------------

/// The plugin's test kit (keys, bundles, hand-built JWTs), re-exported for tests.
pub use mandate_core::testkit;

/// A trust domain with one ES256 signing key, an accepted audience, and the plugin config that
/// trusts it through an inline bundle.
pub struct SvidIssuer {
    pub key: testkit::TestKey,
    pub trust_domain: String,
    pub audience: String,
}

impl SvidIssuer {
    /// Trust domain `example.org`, audience `spiffe://example.org/gateway`, key id `k1`.
    pub fn new() -> SvidIssuer {
        SvidIssuer::with("example.org", "spiffe://example.org/gateway")
    }

    pub fn with(trust_domain: &str, audience: &str) -> SvidIssuer {
        SvidIssuer {
            key: testkit::TestKey::es256("k1"),
            trust_domain: trust_domain.to_string(),
            audience: audience.to_string(),
        }
    }

    /// The SPIFFE bundle (JWKS with `use: jwt-svid`) of this trust domain.
    pub fn bundle(&self) -> Value {
        testkit::spiffe_bundle(&[&self.key], None)
    }

    /// Plugin config trusting this domain with an inline bundle, and a policy that allows
    /// any verified caller (identity-only tests; policy tests bring their own).
    pub fn plugin_config(&self) -> Value {
        json!({"identity": {
            "audiences": [self.audience],
            "trust_domains": [{"name": self.trust_domain, "bundle": {"inline": self.bundle()}}],
        }, "policy": open_policy()})
    }

    /// Plugin config trusting this domain with the bundle fetched from Envoy cluster `cluster`.
    pub fn plugin_config_with_cluster(&self, cluster: &str, path: &str) -> Value {
        json!({"identity": {
            "audiences": [self.audience],
            "trust_domains": [{"name": self.trust_domain, "bundle": {"cluster": cluster, "path": path, "refresh_s": 5, "retry_s": 1}}],
        }, "policy": open_policy()})
    }

    /// A JWT-SVID for `spiffe://<trust domain><path>` valid for five minutes.
    pub fn svid(&self, path: &str) -> String {
        let now = unix_now();
        let sub = format!("spiffe://{}{}", self.trust_domain, path);
        self.key.sign(&testkit::svid_claims(&sub, &self.audience, now.saturating_sub(5), now + 300))
    }
}

impl Default for SvidIssuer {
    fn default() -> Self {
        SvidIssuer::new()
    }
}

/// A policy with one rule allowing every verified caller.
pub fn open_policy() -> Value {
    json!({"rules": [{"id": "any-verified-caller", "effect": "allow"}]})
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Calls `f` every 50 ms until it returns `Some` or `timeout` passes (`f` runs at least once);
/// also returns the time taken.
pub fn wait_until<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> (Option<T>, Duration) {
    let t0 = Instant::now();
    loop {
        if let Some(v) = f() {
            return (Some(v), t0.elapsed());
        }
        if t0.elapsed() > timeout {
            return (None, t0.elapsed());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_inline_and_block_placeholders() {
        let mut vars = BTreeMap::new();
        vars.insert("A".to_string(), "1".to_string());
        vars.insert("LIST".to_string(), "- x: 1\n  y: 2\n".to_string());
        vars.insert("EMPTY".to_string(), String::new());
        let out = render_template("a: {{A}}\nl:\n  {{LIST}}\n  {{EMPTY}}\nz: {{ {not} }}\n", &vars)
            .unwrap();
        assert_eq!(out, "a: 1\nl:\n  - x: 1\n    y: 2\nz: {{ {not} }}\n");
        let err = render_template("a: {{NOPE}}\n", &vars).unwrap_err().to_string();
        assert!(err.contains("NOPE"), "{err}");
    }

    #[test]
    fn yaml_quote_round_trips_json() {
        let cfg = r#"{"identity": {"header": "authorization"}, "x": "a'b\"c\\d: #e"}"#;
        let q = yaml_quote(cfg);
        let back: String = serde_json::from_str(&q).unwrap();
        assert_eq!(back, cfg);
    }

    #[test]
    fn parses_chunked_and_plain_responses() {
        let r = parse_response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")
            .unwrap();
        assert_eq!((r.status, r.body.as_slice()), (200, &b"abcde"[..]));
        let r = parse_response(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 2\r\nX-A: b\r\n\r\nhi")
            .unwrap();
        assert_eq!((r.status, r.text().as_str(), r.header("x-a")), (401, "hi", Some("b")));
    }

    #[test]
    fn echo_server_reports_what_it_saw() {
        let echo = MockServer::echo().unwrap();
        let r = http_get(&echo.url("/p?q=1"), &[("x-test", "v")]).unwrap();
        assert_eq!(r.status, 200);
        let v = r.json().unwrap();
        assert_eq!(v["method"], "GET");
        assert_eq!(v["path"], "/p?q=1");
        assert_eq!(v["headers"]["x-test"], "v");
        let raw = raw_http(
            echo.port(),
            b"GET /raw HTTP/1.1\r\nhost: x\r\nx-bin: a\xffb\r\nconnection: close\r\n\r\n",
        )
        .unwrap();
        assert_eq!(raw.status, 200);
        assert_eq!(echo.request_count(), 2);
        assert_eq!(echo.requests()[1].header("x-bin").as_deref(), Some("a\u{fffd}b"));
    }
}
