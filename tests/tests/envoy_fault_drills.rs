//! Fault drills in a real Envoy (issue 14, item 4): what the caller, the service and the rest of
//! Envoy see when the filter's dependencies fail. Every drill asserts the same five things:
//!
//! 1. the caller gets the documented status and `reason`, and a decision id (header = body);
//! 2. the service behind the credential step receives nothing;
//! 3. Envoy keeps serving other routes: listener `other` (the same filter, in the same VM, with a
//!    policy that needs no credential) and listener `plain` (no filter at all);
//! 4. the filter recorded one decision for the refusal: one access-log entry carrying the record
//!    (filter state), and one `mandate.decision` log line with its id;
//! 5. the wasm VM never failed (no trap) — Envoy logs any VM failure as `Wasm VM failed`.
//!
//! ```text
//! agent ──SVID──▶ listener `mandate` (plugin + minter) ──minted──▶ service (echo)
//!                      │ cluster `minter`: the real minter process, or a fake one, or none
//! agent ──SVID──▶ listener `other` (plugin, no minter) ─┐
//!        ──────▶ listener `plain` (no filter) ─────────┴──▶ other service (echo)
//! ```
//!
//! Each drill first shows the path working (a control request that gets a credential), then the
//! fault. The real minter binary (`target/<profile>/mandate-minter`, or `$MANDATE_MINTER_BIN`)
//! plays the minter that is killed or frozen; a fake minter on the rig's mock server plays the
//! misbehaving ones. The minter's own drills (slow clients, disk full) are in `minter_faults.rs`.
//! Summary table: `docs/reliability.md`, "Fault drills in real Envoy".

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use mandate_e2e::{
    http_get, plugin_wasm, prerequisites, unix_now, wait_until, Envoy, HttpResponse, MockServer, Reply, SeenRequest, SvidIssuer, Vars,
    REQUIRE_ENV,
};
use serde_json::{json, Value};

mod orders_story;
use orders_story::*;

/// A marker in every body the fake minter sends: it must never reach the caller.
const FAKE_MARKER: &str = "fake-minter-body";
/// Generous bound on "no hang": an answer that the configured timeout should produce arrives
/// within the timeout plus this (a loaded 2-core CI machine, Envoy and the test in parallel).
const MARGIN: Duration = Duration::from_secs(4);

// ---------------------------------------------------------------------------------------------
// Envoy pieces
// ---------------------------------------------------------------------------------------------

/// One line of YAML (a flow list item, as JSON) for `Vars::listener_yaml` / `Vars::cluster_yaml`.
fn item(v: &Value) -> String {
    format!("- {v}\n")
}

/// The mandate wasm filter (same module and `vm_id` as the template's) with `config`.
fn wasm_filter(plugin_name: &str, config: &Value) -> Value {
    json!({
        "name": "envoy.filters.http.wasm",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
            "config": {
                "name": plugin_name,
                "root_id": "mandate",
                "configuration": {"@type": "type.googleapis.com/google.protobuf.StringValue", "value": config.to_string()},
                "failure_policy": "FAIL_CLOSED",
                "vm_config": {
                    "vm_id": "mandate",
                    "runtime": "envoy.wasm.runtime.v8",
                    "code": {"local": {"filename": plugin_wasm().expect("wasm module").to_string_lossy()}}
                }
            }
        }
    })
}

/// A listener on an ephemeral loopback port routing everything to `cluster`, with `filters`
/// before the router and, optionally, the JSON access log of `envoy/mandate.yaml` at `access_log`.
fn listener(name: &str, cluster: &str, filters: Vec<Value>, access_log: Option<&Path>) -> Value {
    let mut http_filters = filters;
    http_filters.push(json!({
        "name": "envoy.filters.http.router",
        "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}
    }));
    let mut hcm = json!({
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": name,
        "route_config": {"name": name, "virtual_hosts": [{"name": "all", "domains": ["*"],
            "routes": [{"match": {"prefix": "/"}, "route": {"cluster": cluster, "timeout": "10s"}}]}]},
        "http_filters": http_filters
    });
    if let Some(path) = access_log {
        hcm["access_log"] = json!([{
            "name": "envoy.access_loggers.file",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
                "path": path.to_string_lossy(),
                "log_format": {"json_format": {
                    "status": "%RESPONSE_CODE%",
                    "decision_id_response": "%RESP(X-MANDATE-DECISION-ID)%",
                    "decision_id_request": "%REQ(X-MANDATE-DECISION-ID)%",
                    "mandate_decision": "%FILTER_STATE(wasm.mandate.decision:PLAIN)%"
                }}
            }
        }]);
    }
    json!({
        "name": name,
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
        "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}]
    })
}

/// A STATIC cluster with one loopback endpoint; `unhealthy` marks it so (with a panic threshold
/// of 0, so Envoy does not route to it anyway).
fn cluster(name: &str, port: Option<u16>, unhealthy: bool) -> Value {
    let endpoints = match port {
        Some(port) => {
            let mut ep = json!({"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}});
            if unhealthy {
                ep["health_status"] = json!("UNHEALTHY");
            }
            json!([{"lb_endpoints": [ep]}])
        }
        None => json!([]),
    };
    json!({
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "common_lb_config": {"healthy_panic_threshold": {"value": 0.0}},
        "load_assignment": {"cluster_name": name, "endpoints": endpoints}
    })
}

/// The bound port of listener `name` now (listeners may be replaced at run time).
fn port_of(envoy: &Envoy, name: &str) -> u16 {
    let v: Value = envoy.admin_get("/listeners?format=json").expect("admin /listeners").json().expect("listeners JSON");
    v["listener_statuses"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|l| l["name"] == name)
        .and_then(|l| l["local_address"]["socket_address"]["port_value"].as_u64())
        .and_then(|p| u16::try_from(p).ok())
        .unwrap_or_else(|| panic!("no listener {name:?}: {v}"))
}

fn counter(envoy: &Envoy, name: &str) -> i64 {
    envoy.stat(name).expect("admin /stats").unwrap_or(0)
}

// ---------------------------------------------------------------------------------------------
// The drill rig
// ---------------------------------------------------------------------------------------------

/// One request to the guarded route and what it did.
struct Outcome {
    resp: HttpResponse,
    took: Duration,
    /// Requests the service received while this one ran.
    reached_service: usize,
}

struct Drill {
    envoy: Envoy,
    service: MockServer,
    other: MockServer,
    issuer: SvidIssuer,
    svid: String,
    access_log: PathBuf,
    /// Decision ids of the refusals, checked against the decision log at the end.
    refusals: Mutex<Vec<String>>,
}

/// How a drill's Envoy is made.
enum Boot<'a> {
    /// `envoy/mandate.yaml` with `config` on listener `mandate`; `extra` adds clusters.
    Template { config: Value, extra: Box<dyn FnOnce(Vars) -> Vars + 'a> },
    /// A bootstrap file whose listener `mandate` comes from a watched LDS file; `access_log` is
    /// where that listener logs.
    Bootstrap { path: &'a Path, vars: Vars, access_log: PathBuf },
}

impl Drill {
    fn start(issuer: SvidIssuer, service: MockServer, boot: Boot<'_>) -> Drill {
        let other = MockServer::echo().expect("other service");
        let t0 = Instant::now();
        let (envoy, access_log) = match boot {
            Boot::Template { config, extra } => {
                let vars = Vars::new().plugin_config_json(&config).upstream_port(service.port());
                let envoy = Envoy::start("mandate.yaml", Drill::others(extra(vars), &issuer, other.port())).expect("envoy starts");
                let log = envoy.access_log_path();
                (envoy, log)
            }
            Boot::Bootstrap { path, vars, access_log } => {
                let vars = vars.upstream_port(service.port());
                let envoy = Envoy::start(&path.to_string_lossy(), Drill::others(vars, &issuer, other.port())).expect("envoy starts");
                (envoy, access_log)
            }
        };
        eprintln!("envoy ready in {:?}", t0.elapsed());
        let svid = agent_svid(&issuer);
        Drill { envoy, service, other, issuer, svid, access_log, refusals: Mutex::new(Vec::new()) }
    }

    /// Listener `other` (the filter without a credential step) and `plain` (no filter), both to
    /// the other service.
    fn others(vars: Vars, issuer: &SvidIssuer, other_port: u16) -> Vars {
        vars.cluster_yaml(&item(&cluster("other_service", Some(other_port), false)))
            .listener_yaml(&item(&listener("other", "other_service", vec![wasm_filter("mandate-other", &issuer.plugin_config())], None)))
            .listener_yaml(&item(&listener("plain", "other_service", vec![], None)))
    }

    fn subject(&self) -> String {
        format!("spiffe://{}{AGENT}", self.issuer.trust_domain)
    }

    /// GET /orders/42 for `task` on listener `mandate`, as the agent.
    fn order(&self, task: &str) -> Outcome {
        let bearer = format!("Bearer {}", self.svid);
        self.get("/orders/42", &[("authorization", &bearer), ("x-agent-intent", INTENT), ("x-agent-task", task)])
    }

    /// GET `path` on listener `mandate`.
    fn get(&self, path: &str, headers: &[(&str, &str)]) -> Outcome {
        let before = self.service.request_count();
        let url = format!("http://127.0.0.1:{}{path}", port_of(&self.envoy, "mandate"));
        let t0 = Instant::now();
        let resp = http_get(&url, headers).expect("request through listener mandate");
        let took = t0.elapsed();
        Outcome { resp, took, reached_service: self.service.request_count() - before }
    }

    /// Asserts the request was served with a minted credential for `task`.
    fn assert_served(&self, what: &str, o: &Outcome, task: &str) {
        assert_eq!(o.resp.status, 200, "{what}: {}", o.resp.text());
        assert_eq!(o.reached_service, 1, "{what}");
        let seen = self.service.requests().pop().expect("the service got it");
        let auth = seen.header("authorization").expect("a credential reached the service");
        let claims = jwt_claims(auth.strip_prefix("Bearer ").expect("bearer"));
        assert_eq!((claims["task"].as_str(), claims["aud"].as_str()), (Some(task), Some(RESOURCE_AUDIENCE)), "{what}: {claims}");
        assert_eq!(claims["sub"], self.subject(), "{what}: {claims}");
    }

    /// Promises 1 to 4 of a drill (module docs) for one refused request; returns its
    /// decision id.
    fn assert_refused(&self, fault: &str, o: &Outcome, status: u16, reason: &str) -> String {
        let body = o.resp.json().unwrap_or(Value::Null);
        assert_eq!((o.resp.status, body["reason"].as_str()), (status, Some(reason)), "{fault}: {}", o.resp.text());
        let id = o.resp.header("x-mandate-decision-id").unwrap_or_else(|| panic!("{fault}: no decision id")).to_string();
        assert!(!id.is_empty(), "{fault}");
        assert_eq!(body["decision_id"].as_str(), Some(id.as_str()), "{fault}: {body}");
        assert!(!o.resp.text().contains(FAKE_MARKER), "{fault}: the minter's answer leaked: {}", o.resp.text());
        assert_eq!(o.reached_service, 0, "{fault}: the service received the refused request");
        self.assert_other_routes_serve(fault);
        // One access-log entry for it, carrying the record (filter state).
        let (entries, _) = wait_until(Duration::from_secs(5), || {
            let e: Vec<Value> = self.access_log_entries().into_iter().filter(|e| e["decision_id_response"] == id.as_str()).collect();
            (!e.is_empty()).then_some(e)
        });
        let entries = entries.unwrap_or_else(|| panic!("{fault}: no access-log entry for decision {id}"));
        assert_eq!(entries.len(), 1, "{fault}: {entries:?}");
        assert_eq!(entries[0]["status"], status, "{fault}: {entries:?}");
        let raw = entries[0]["mandate_decision"].as_str().unwrap_or_default();
        let record: Value = serde_json::from_str(raw).unwrap_or_else(|e| panic!("{fault}: record is not JSON ({e}): {raw:?}"));
        assert_eq!((record["decision_id"].as_str(), record["effect"].as_str(), record["reason"].as_str()), (Some(id.as_str()), Some("deny"), Some(reason)), "{fault}: {record}");
        self.refusals.lock().expect("refusals").push(id.clone());
        id
    }

    /// Listener `other` (the same filter and VM, no credential step) and `plain` (no filter)
    /// both serve.
    fn assert_other_routes_serve(&self, fault: &str) {
        let before = self.other.request_count();
        let bearer = format!("Bearer {}", self.issuer.svid("/ns/prod/sa/web"));
        let r = http_get(&format!("http://127.0.0.1:{}/status", port_of(&self.envoy, "other")), &[("authorization", &bearer)])
            .expect("request through listener other");
        assert_eq!(r.status, 200, "{fault}: listener other: {}", r.text());
        let seen = r.json().expect("echo JSON");
        assert!(seen["headers"]["x-mandate-decision-id"].as_str().is_some_and(|s| !s.is_empty()), "{fault}: {seen}");
        assert!(seen["headers"].get("authorization").is_none(), "{fault}: {seen}");
        let r = http_get(&format!("http://127.0.0.1:{}/status", port_of(&self.envoy, "plain")), &[]).expect("request through listener plain");
        assert_eq!(r.status, 200, "{fault}: listener plain: {}", r.text());
        assert_eq!(self.other.request_count(), before + 2, "{fault}");
    }

    fn access_log_entries(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.access_log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Each refusal has exactly one `mandate.decision` log line (lines are batched: waits for
    /// the flush), and the VM never trapped. Call at the end of a drill.
    fn finish(&self) {
        let ids = self.refusals.lock().expect("refusals").clone();
        assert!(!ids.is_empty(), "no refusal was checked");
        let lines_with = |id: &str| {
            let needle = format!("\"decision_id\":\"{id}\"");
            self.envoy.log().lines().filter(|l| l.contains("mandate.decision") && l.contains(&needle)).count()
        };
        for id in &ids {
            let (found, _) = wait_until(Duration::from_secs(5), || (lines_with(id) > 0).then_some(()));
            assert!(found.is_some(), "no mandate.decision log line for {id}");
        }
        for id in &ids {
            assert_eq!(lines_with(id), 1, "decision {id} logged more than once");
        }
        let log = self.envoy.log();
        for l in log.lines().filter(|l| l.contains("mandate: ") && (l.contains("[warning]") || l.contains("[error]"))) {
            eprintln!("  filter warning: {}", l.split("mandate: ").last().unwrap_or(l));
        }
        // No trap: the VM never failed at run time (only a refused configuration may fail it).
        let failed: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("Uncaught") || (l.contains("Wasm VM failed") && !l.contains("Failed to configure")))
            .collect();
        assert!(failed.is_empty(), "the wasm VM failed: {failed:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// Minters
// ---------------------------------------------------------------------------------------------

/// What the fake minter answers to `/token`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Answer {
    /// A proper token response: a JWT for the asked audience, the subject and the task.
    Good,
    /// 500 whose body is nevertheless a good token response.
    Status500,
    /// 200 with a form-encoded body holding a good token (not JSON).
    NotJson,
    /// 200 JSON with every field but `access_token`.
    NoToken,
    /// 200 with a good token response padded to 10 MB.
    TenMegabytes,
    /// 200 with a good token response for another audience.
    OtherAudience,
}

/// A stand-in minter: `/token` answers per [`Answer`], `/revocations` an empty feed (or 503
/// while the feed is "down").
struct FakeMinter {
    server: MockServer,
    answer: Arc<Mutex<Answer>>,
    feed_up: Arc<AtomicBool>,
}

static JTI: AtomicU64 = AtomicU64::new(0);

/// An (unsigned-looking) JWT with `claims`: the filter reads the minter's tokens, it does not
/// verify them (they come over the authenticated channel).
fn fake_jwt(claims: &Value) -> String {
    format!(
        "{}.{}.{}",
        URL_SAFE_NO_PAD.encode(br#"{"alg":"ES256","typ":"JWT"}"#),
        URL_SAFE_NO_PAD.encode(claims.to_string()),
        URL_SAFE_NO_PAD.encode(b"not-a-signature")
    )
}

/// `application/x-www-form-urlencoded` value of `name` in `body`.
fn form_value(body: &[u8], name: &str) -> Option<String> {
    let text = String::from_utf8_lossy(body);
    text.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (k == name).then(|| percent_decode(v))
    })
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = b.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok()).and_then(|h| u8::from_str_radix(h, 16).ok());
        match (b[i], hex) {
            (b'%', Some(v)) => {
                out.push(v);
                i += 3;
            }
            (b'+', _) => {
                out.push(b' ');
                i += 1;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl FakeMinter {
    fn start(subject: String) -> FakeMinter {
        let answer = Arc::new(Mutex::new(Answer::Good));
        let feed_up = Arc::new(AtomicBool::new(true));
        let (a, f) = (answer.clone(), feed_up.clone());
        let padding = "x".repeat(10 << 20);
        let server = MockServer::start(move |req: &SeenRequest| {
            if req.path.starts_with("/revocations") {
                return if f.load(Ordering::SeqCst) {
                    Reply::json(200, &json!({"epoch": "fake", "cursor": 0, "revocations": [], "more": false}))
                } else {
                    Reply::text(503, FAKE_MARKER)
                };
            }
            let answer = *a.lock().expect("answer");
            let audience = match answer {
                Answer::OtherAudience => "https://billing.internal".to_string(),
                _ => form_value(&req.body, "audience").unwrap_or_default(),
            };
            let now = unix_now();
            let token = fake_jwt(&json!({
                "iss": MINTER_ISSUER, "sub": subject, "aud": audience, "task": form_value(&req.body, "task"),
                "scope": SCOPE, "iat": now, "exp": now + 60, "jti": format!("fake-{}", JTI.fetch_add(1, Ordering::Relaxed)),
            }));
            let mut good = json!({"access_token": token, "issued_token_type": "urn:ietf:params:oauth:token-type:jwt",
                                  "token_type": "Bearer", "expires_in": 60, "note": FAKE_MARKER});
            match answer {
                Answer::Good | Answer::OtherAudience => Reply::json(200, &good),
                Answer::Status500 => Reply::json(500, &good),
                Answer::NotJson => Reply::text(200, &format!("access_token={token}&token_type=Bearer&expires_in=60&note={FAKE_MARKER}")),
                Answer::NoToken => {
                    good.as_object_mut().expect("object").remove("access_token");
                    Reply::json(200, &good)
                }
                Answer::TenMegabytes => {
                    // Spliced, not serialised: building 10 MB of JSON in a debug build could
                    // outlast the exchange timeout and turn this into a timeout drill.
                    let head = good.to_string();
                    let mut body = Vec::with_capacity(padding.len() + head.len() + 16);
                    body.extend_from_slice(&head.as_bytes()[..head.len() - 1]);
                    body.extend_from_slice(b",\"padding\":\"");
                    body.extend_from_slice(padding.as_bytes());
                    body.extend_from_slice(b"\"}");
                    Reply { status: 200, headers: vec![("content-type".into(), "application/json".into())], body }
                }
            }
        })
        .expect("fake minter");
        FakeMinter { server, answer, feed_up }
    }

    fn set(&self, answer: Answer) {
        *self.answer.lock().expect("answer") = answer;
    }

    fn token_calls(&self) -> usize {
        self.server.requests().iter().filter(|r| r.path.starts_with("/token")).count()
    }
}

/// The real minter binary in its own process (so it can be killed and frozen), development
/// mode on loopback.
struct MinterProcess {
    child: Child,
    port: u16,
    _state: tempfile::TempDir,
}

fn minter_bin() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("MANDATE_MINTER_BIN") {
        return Some(PathBuf::from(p));
    }
    // target/<profile>/deps/<this test> → target/<profile>/mandate-minter
    let exe = std::env::current_exe().ok()?;
    let bin = exe.parent()?.parent()?.join("mandate-minter");
    bin.is_file().then_some(bin)
}

/// Whether the minter binary is there; like [`prerequisites`], skips (or with
/// `MANDATE_REQUIRE_ENVOY`, fails) when it is not.
fn minter_prerequisite(test: &str) -> bool {
    if minter_bin().is_some() {
        return true;
    }
    let why = "the mandate-minter binary is not built (cargo build -p mandate-minter, or set MANDATE_MINTER_BIN)";
    if std::env::var_os(REQUIRE_ENV).is_some_and(|v| !v.is_empty()) {
        panic!("{test}: {REQUIRE_ENV} is set but {why}");
    }
    eprintln!("SKIPPED {test}: {why}");
    false
}

impl MinterProcess {
    fn start(issuer: &SvidIssuer) -> MinterProcess {
        let bin = minter_bin().expect("minter binary");
        let state = tempfile::tempdir().expect("minter state dir");
        let config = minter_config(issuer, &state.path().join("state"), json!({"dev": true, "require_task": true, "ttl": {"default_s": 120, "max_s": 300}}));
        let config_path = state.path().join("minter.json");
        std::fs::write(&config_path, config.to_string()).expect("write minter config");
        let mut cmd = Command::new(&bin);
        cmd.arg("--config").arg(&config_path).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::inherit());
        mandate_e2e::kill_with_parent(&mut cmd);
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("starting {}: {e}", bin.display()));
        // It prints {"listening": "127.0.0.1:PORT", ...} once bound.
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx.recv_timeout(Duration::from_secs(15)).expect("the minter printed its address");
        let listening: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("minter said {line:?}: {e}"));
        let port = listening["listening"]
            .as_str()
            .and_then(|a| a.rsplit(':').next())
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("minter said {line:?}"));
        MinterProcess { child, port, _state: state }
    }

    fn signal(&self, sig: i32) {
        let pid = i32::try_from(self.child.id()).expect("pid");
        // SAFETY: kill(2) on our own child's pid.
        let rc = unsafe { libc::kill(pid, sig) };
        assert_eq!(rc, 0, "kill({pid}, {sig})");
    }

    /// SIGKILL, and wait until it is gone.
    fn kill(&mut self) {
        self.signal(libc::SIGKILL);
        let status = self.child.wait().expect("wait for the minter");
        eprintln!("minter killed: {status}");
    }
}

impl Drop for MinterProcess {
    fn drop(&mut self) {
        if let Ok(pid) = i32::try_from(self.child.id()) {
            // SAFETY: our own child; a stopped process must be continued to die promptly.
            unsafe {
                libc::kill(pid, libc::SIGCONT);
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A loopback port that refuses connections (a socket bound, not listening) until
/// [`RefusingPort::listen`]: a server that is down, then comes back on the same address.
struct RefusingPort {
    fd: OwnedFd,
    port: u16,
}

impl RefusingPort {
    fn new() -> RefusingPort {
        // SAFETY: plain socket(2)/bind(2)/getsockname(2) on a fresh descriptor we own.
        unsafe {
            let raw = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
            assert!(raw >= 0, "socket: {}", std::io::Error::last_os_error());
            let fd = OwnedFd::from_raw_fd(raw);
            let mut addr: libc::sockaddr_in = std::mem::zeroed();
            addr.sin_family = libc::AF_INET as libc::sa_family_t;
            addr.sin_addr.s_addr = u32::from(std::net::Ipv4Addr::LOCALHOST).to_be();
            addr.sin_port = 0;
            let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            let rc = libc::bind(fd.as_raw_fd(), std::ptr::addr_of!(addr).cast(), len);
            assert_eq!(rc, 0, "bind: {}", std::io::Error::last_os_error());
            let mut out: libc::sockaddr_in = std::mem::zeroed();
            let mut out_len = len;
            let rc = libc::getsockname(fd.as_raw_fd(), std::ptr::addr_of_mut!(out).cast(), &mut out_len);
            assert_eq!(rc, 0, "getsockname: {}", std::io::Error::last_os_error());
            RefusingPort { fd, port: u16::from_be(out.sin_port) }
        }
    }

    /// Starts listening on the same port.
    fn listen(self) -> TcpListener {
        // SAFETY: listen(2) on the bound socket we own.
        let rc = unsafe { libc::listen(self.fd.as_raw_fd(), 128) };
        assert_eq!(rc, 0, "listen: {}", std::io::Error::last_os_error());
        TcpListener::from(self.fd)
    }
}

fn minter_section(cluster: &str, timeout_ms: u64) -> Value {
    json!({"cluster": cluster, "timeout_ms": timeout_ms, "revocations": {"interval_ms": 500}})
}

// ---------------------------------------------------------------------------------------------
// Drills
// ---------------------------------------------------------------------------------------------


/// The minter answers, but wrongly: a 500, a body that is not JSON, JSON without a token, a
/// 10 MB body, a token for another audience. One Envoy; each row first gets a good answer
/// (control), then the fault, for a task of its own (so no cached credential stands in).
#[test]
fn misbehaving_minter_answers_fail_closed() {
    if !prerequisites("misbehaving_minter_answers_fail_closed") {
        return;
    }
    const TIMEOUT_MS: u64 = 1000;
    let issuer = SvidIssuer::new();
    let fake = FakeMinter::start(format!("spiffe://{}{AGENT}", issuer.trust_domain));
    let fake_port = fake.server.port();
    let config = plugin_config(&issuer, minter_section("minter", TIMEOUT_MS));
    let drill = Drill::start(
        issuer,
        MockServer::echo().expect("service"),
        Boot::Template { config, extra: Box::new(move |v| v.cluster("minter", fake_port)) },
    );
    // Each row, and the failure the filter must have found (its warning), so that a row cannot
    // pass for another reason (a timeout, say).
    let rows = [
        ("minter-answers-500", Answer::Status500, "minter answered HTTP 500"),
        ("minter-answers-non-json", Answer::NotJson, "malformed minter answer: not a token response"),
        ("minter-answers-json-without-token", Answer::NoToken, "malformed minter answer: access_token missing"),
        ("minter-answers-10mb-body", Answer::TenMegabytes, "minter answer too large"),
        ("minter-answers-token-for-another-audience", Answer::OtherAudience, "minted token refused: the minted token is for another audience"),
    ];
    for (fault, answer, failure) in rows {
        fake.set(Answer::Good);
        let control = format!("ok-{fault}");
        drill.assert_served(&format!("{fault} (control)"), &drill.order(&control), &control);
        fake.set(answer);
        let calls = fake.token_calls();
        let o = drill.order(fault);
        eprintln!("{fault}: {} {} in {:?}", o.resp.status, o.resp.json().map(|b| b["reason"].clone()).unwrap_or_default(), o.took);
        drill.assert_refused(fault, &o, 503, "credential_unavailable");
        assert_eq!(fake.token_calls(), calls + 1, "{fault}: the exchange was not made");
        assert!(o.took < Duration::from_millis(TIMEOUT_MS) + MARGIN, "{fault}: answered after {:?}", o.took);
        let warning = format!("credential exchange failed: {failure}");
        drill.envoy.wait_for_log(&warning, Duration::from_secs(5)).unwrap_or_else(|e| panic!("{fault}: {e}"));
    }
    for (_, _, failure) in rows {
        let lines = drill.envoy.log_lines_containing(&format!("credential exchange failed: {failure}"));
        assert_eq!(lines.len(), 1, "{failure}: {lines:?}");
    }
    // A failed exchange is not cached: the same task is exchanged again once the minter mends.
    fake.set(Answer::Good);
    drill.assert_served("after the faults", &drill.order("minter-answers-500"), "minter-answers-500");
    let (failures, _) = wait_until(Duration::from_secs(5), || {
        let n = counter(&drill.envoy, "wasmcustom.mandate.minter.failures");
        (n >= rows.len() as i64).then_some(n)
    });
    assert_eq!(failures, Some(rows.len() as i64), "mandate.minter.failures");
    drill.finish();
}

/// The real minter process is killed (SIGKILL) in the middle of an exchange (it was stopped
/// with the request read, unanswered): that request is refused 503 `credential_unavailable`
/// when the connection dies, not at the timeout. After that every new exchange is refused at
/// once (connection refused); a credential cached before stays usable (until `max_stale_s`,
/// the revocation-feed bound; see `revocation_feed_down_past_max_stale_s`).
#[test]
fn minter_killed() {
    if !prerequisites("minter_killed") || !minter_prerequisite("minter_killed") {
        return;
    }
    const TIMEOUT_MS: u64 = 3000;
    let timeout = Duration::from_millis(TIMEOUT_MS);
    let issuer = SvidIssuer::new();
    let mut minter = MinterProcess::start(&issuer);
    let port = minter.port;
    let config = plugin_config(&issuer, minter_section("minter", TIMEOUT_MS));
    let drill = Drill::start(issuer, MockServer::echo().expect("service"), Boot::Template { config, extra: Box::new(move |v| v.cluster("minter", port)) });
    let o = drill.order("live");
    drill.assert_served("control", &o, "live");
    let minted = drill.service.requests().pop().and_then(|r| r.header("authorization")).expect("credential");
    assert_eq!(jwt_claims(minted.strip_prefix("Bearer ").expect("bearer"))["iss"], MINTER_ISSUER, "minted by the real minter");

    // Killed mid-exchange.
    minter.signal(libc::SIGSTOP);
    let (o, answered_at, killed_at) = std::thread::scope(|s| {
        let drill = &drill;
        let h = s.spawn(move || (drill.order("in-flight"), Instant::now()));
        std::thread::sleep(Duration::from_millis(300));
        let killed_at = Instant::now();
        minter.kill();
        let (o, answered_at) = h.join().expect("request thread");
        (o, answered_at, killed_at)
    });
    drill.assert_refused("minter killed mid-exchange", &o, 503, "credential_unavailable");
    let after_kill = answered_at.checked_duration_since(killed_at).expect("answered before the minter was killed");
    assert!(o.took < timeout, "answered after {:?}: by the {timeout:?} timeout, not when the minter died", o.took);
    eprintln!("minter killed mid-exchange: 503 credential_unavailable {after_kill:?} after the kill");
    let (line, _) = wait_until(Duration::from_secs(5), || drill.envoy.log_lines_containing("credential exchange failed").into_iter().next());
    let line = line.expect("the failure is logged");
    assert!(!line.contains("HTTP 504"), "the exchange ended by timeout: {line}");

    // Dead: refused at once.
    let o = drill.order("after-kill");
    drill.assert_refused("minter killed", &o, 503, "credential_unavailable");
    assert!(o.took < timeout, "answered after {:?}", o.took);
    eprintln!("minter killed: {} credential_unavailable in {:?}", o.resp.status, o.took);
    let failures = drill.envoy.log_lines_containing("credential exchange failed");
    eprintln!("  exchange failures: {:?}", failures.iter().map(|l| l.split("mandate: ").last().unwrap_or(l)).collect::<Vec<_>>());
    // The cached credential of a running task is still used (documented: until max_stale_s).
    drill.assert_served("cached credential", &drill.order("live"), "live");
    drill.finish();
}

/// The real minter is frozen (SIGSTOP): connections are accepted, nothing is answered. Three
/// requests for one task (one exchange, two waiting on it) are all refused 503
/// `credential_unavailable` once `timeout_ms` passes, well before any hang, and the other routes
/// are served meanwhile. Then the first of three callers hangs up: the two waiting on its
/// exchange are refused at once. After SIGCONT the minter serves again.
#[test]
fn minter_frozen_past_the_timeout() {
    if !prerequisites("minter_frozen_past_the_timeout") || !minter_prerequisite("minter_frozen_past_the_timeout") {
        return;
    }
    const TIMEOUT_MS: u64 = 2000;
    let issuer = SvidIssuer::new();
    let minter = MinterProcess::start(&issuer);
    let port = minter.port;
    let config = plugin_config(&issuer, minter_section("minter", TIMEOUT_MS));
    let drill = Drill::start(issuer, MockServer::echo().expect("service"), Boot::Template { config, extra: Box::new(move |v| v.cluster("minter", port)) });
    drill.assert_served("control", &drill.order("live"), "live");

    minter.signal(libc::SIGSTOP);
    let (outcomes, others_served_at) = std::thread::scope(|s| {
        let handles: Vec<_> = (0..3u64)
            .map(|i| {
                let drill = &drill;
                s.spawn(move || {
                    std::thread::sleep(Duration::from_millis(20 * i));
                    let o = drill.order("frozen");
                    (o, Instant::now())
                })
            })
            .collect();
        // While those wait on the frozen minter, the other routes are served.
        std::thread::sleep(Duration::from_millis(200));
        drill.assert_other_routes_serve("minter frozen (meanwhile)");
        let others_served_at = Instant::now();
        let outcomes: Vec<(Outcome, Instant)> = handles.into_iter().map(|h| h.join().expect("request thread")).collect();
        (outcomes, others_served_at)
    });
    let first_answer = outcomes.iter().map(|(_, at)| *at).min().expect("answers");
    assert!(others_served_at < first_answer, "the other routes were served only after the frozen exchange ended");
    let outcomes: Vec<Outcome> = outcomes.into_iter().map(|(o, _)| o).collect();
    let timeout = Duration::from_millis(TIMEOUT_MS);
    let mut ids = Vec::new();
    for (i, o) in outcomes.iter().enumerate() {
        ids.push(drill.assert_refused(&format!("minter frozen (request {i})"), o, 503, "credential_unavailable"));
        assert!(o.took < timeout + MARGIN, "request {i} answered after {:?} (timeout {timeout:?})", o.took);
    }
    let longest = outcomes.iter().map(|o| o.took).max().unwrap_or_default();
    // It waited for the frozen minter, rather than being refused for another reason at once.
    assert!(longest + Duration::from_millis(50) >= timeout, "answered after {longest:?}, before the {timeout:?} timeout");
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 3, "each request has its own decision id");
    eprintln!("minter frozen: 503 credential_unavailable after {:?}", outcomes.iter().map(|o| o.took).collect::<Vec<_>>());
    // Envoy's timeout answered the exchange (504); one exchange for the three requests.
    drill.envoy.wait_for_log("credential exchange failed: minter answered HTTP 504", Duration::from_secs(5)).expect("the timeout is logged");
    assert_eq!(drill.envoy.log_lines_containing("credential exchange failed").len(), 1, "one exchange, its failure logged once");

    // The first caller hangs up while two others wait on its exchange (Envoy cancels the
    // exchange with the caller's stream): the two are refused then, not left hanging.
    let request = format!(
        "GET /orders/42 HTTP/1.1\r\nhost: drill\r\nauthorization: Bearer {}\r\nx-agent-intent: {INTENT}\r\nx-agent-task: leader-leaves\r\n\r\n",
        drill.svid
    );
    let mut leader = TcpStream::connect(("127.0.0.1", port_of(&drill.envoy, "mandate"))).expect("connect");
    leader.write_all(request.as_bytes()).expect("send the leader's request");
    std::thread::sleep(Duration::from_millis(100));
    let (waiters, left_at) = std::thread::scope(|s| {
        let handles: Vec<_> = (0..2)
            .map(|_| {
                let drill = &drill;
                s.spawn(move || (drill.order("leader-leaves"), Instant::now()))
            })
            .collect();
        std::thread::sleep(Duration::from_millis(300));
        let left_at = Instant::now();
        drop(leader);
        let waiters: Vec<(Outcome, Instant)> = handles.into_iter().map(|h| h.join().expect("request thread")).collect();
        (waiters, left_at)
    });
    for (i, (o, at)) in waiters.iter().enumerate() {
        drill.assert_refused(&format!("minter frozen, the leader's caller left (waiter {i})"), o, 503, "credential_unavailable");
        let after = at.checked_duration_since(left_at).unwrap_or_else(|| panic!("waiter {i} answered before the leader left"));
        assert!(o.took < timeout, "waiter {i} answered after {:?}, by the timeout", o.took);
        eprintln!("minter frozen, leader left: waiter {i} refused {after:?} after");
    }
    // The leader has its record too (in the log: its caller is gone).
    let leader_records = || drill.envoy.log().lines().filter(|l| l.contains("mandate.decision") && l.contains("\"task\":\"leader-leaves\"")).count();
    let (three, _) = wait_until(Duration::from_secs(5), || (leader_records() >= 3).then_some(()));
    assert!(three.is_some() && leader_records() == 3, "records for the leader and its two waiters: {}", leader_records());

    minter.signal(libc::SIGCONT);
    let thawed_at = Instant::now();
    let (served, took) = wait_until(Duration::from_secs(10), || {
        let o = drill.order("thawed");
        (o.resp.status == 200).then_some(o)
    });
    let served = served.expect("the minter did not recover within 10 s of SIGCONT");
    drill.assert_served("after SIGCONT", &served, "thawed");
    eprintln!("minter thawed: served again {:?} after SIGCONT ({took:?} of retries)", thawed_at.elapsed());
    drill.finish();
}

/// A minter that sends its answer's headers and the first bytes of its body, then nothing (the
/// connection stays open). Every exchange and feed poll gets that.
fn stalling_minter() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            std::thread::spawn(move || {
                // Read the request's head; then answer in part, and hold the connection until the
                // peer gives up on it.
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match std::io::Read::read(&mut stream, &mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let partial = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 4096\r\n\r\n{\"access_token\":\"eyJ";
                if stream.write_all(partial.as_bytes()).is_err() {
                    return;
                }
                while matches!(std::io::Read::read(&mut stream, &mut buf), Ok(n) if n > 0) {}
            });
        }
    });
    port
}

/// The minter starts answering, then stalls mid-body: refused 503 `credential_unavailable` when
/// `timeout_ms` passes (the answer never completes), not hung.
#[test]
fn minter_stalls_mid_answer() {
    if !prerequisites("minter_stalls_mid_answer") {
        return;
    }
    const TIMEOUT_MS: u64 = 1000;
    let timeout = Duration::from_millis(TIMEOUT_MS);
    let issuer = SvidIssuer::new();
    let port = stalling_minter();
    let config = plugin_config(&issuer, minter_section("minter", TIMEOUT_MS));
    let drill = Drill::start(issuer, MockServer::echo().expect("service"), Boot::Template { config, extra: Box::new(move |v| v.cluster("minter", port)) });
    let o = drill.order("stalled");
    drill.assert_refused("minter stalls mid-answer", &o, 503, "credential_unavailable");
    assert!(o.took < timeout + MARGIN, "answered after {:?} (timeout {timeout:?})", o.took);
    assert!(o.took + Duration::from_millis(50) >= timeout, "answered after {:?}, before the timeout: not the stall", o.took);
    let (line, _) = wait_until(Duration::from_secs(5), || drill.envoy.log_lines_containing("credential exchange failed").into_iter().next());
    let line = line.expect("the failure is logged");
    // Envoy resets the exchange whose answer had begun: the filter sees no answer at all.
    assert!(line.contains("no response"), "{line}");
    eprintln!("minter stalls mid-answer: 503 credential_unavailable after {:?}; {}", o.took, line.split("mandate: ").last().unwrap_or(&line));
    drill.finish();
}

/// The minter's cluster has no healthy endpoint: its only host is marked unhealthy (with a panic
/// threshold of 0, so Envoy does not use it anyway), or it has no host at all. The refusal
/// comes within the configured timeout, without a hang; the (working) minter behind the
/// unhealthy host is never called.
#[test]
fn minter_cluster_without_a_healthy_endpoint() {
    if !prerequisites("minter_cluster_without_a_healthy_endpoint") {
        return;
    }
    const TIMEOUT_MS: u64 = 3000;
    for (fault, unhealthy) in [("only endpoint unhealthy", true), ("no endpoint at all", false)] {
        let issuer = SvidIssuer::new();
        let fake = FakeMinter::start(format!("spiffe://{}{AGENT}", issuer.trust_domain));
        let endpoint = unhealthy.then(|| fake.server.port());
        let config = plugin_config(&issuer, minter_section("minter", TIMEOUT_MS));
        let drill = Drill::start(
            issuer,
            MockServer::echo().expect("service"),
            Boot::Template { config, extra: Box::new(move |v| v.cluster_yaml(&item(&cluster("minter", endpoint, unhealthy)))) },
        );
        let clusters = drill.envoy.admin_get("/clusters").expect("admin /clusters").text();
        if let Some(port) = endpoint {
            let flags = format!("minter::127.0.0.1:{port}::health_flags::");
            let line = clusters.lines().find(|l| l.starts_with(&flags)).unwrap_or_else(|| panic!("{fault}: no {flags} in\n{clusters}"));
            assert!(line.contains("eds_health"), "{fault}: the host is not unhealthy: {line}");
        } else {
            assert!(!clusters.lines().any(|l| l.starts_with("minter::127.0.0.1:")), "{fault}: {clusters}");
        }
        let o = drill.order("no-healthy-endpoint");
        drill.assert_refused(fault, &o, 503, "credential_unavailable");
        assert!(o.took < Duration::from_millis(TIMEOUT_MS), "{fault}: answered after {:?} (timeout {TIMEOUT_MS} ms)", o.took);
        // Again, now that the feed's polls fail too: still at once.
        let o = drill.order("no-healthy-endpoint-2");
        drill.assert_refused(fault, &o, 503, "credential_unavailable");
        assert!(o.took < Duration::from_millis(TIMEOUT_MS), "{fault}: answered after {:?}", o.took);
        assert_eq!(fake.token_calls(), 0, "{fault}: the minter behind the cluster was called");
        eprintln!("{fault}: 503 credential_unavailable in {:?}", o.took);
        drill.finish();
    }
}

/// The configuration names a minter cluster Envoy does not have: Envoy starts (the filter cannot
/// know its clusters), and every exchange is refused at dispatch, at once.
#[test]
fn unknown_minter_cluster() {
    if !prerequisites("unknown_minter_cluster") {
        return;
    }
    let issuer = SvidIssuer::new();
    const TIMEOUT_MS: u64 = 3000;
    let config = plugin_config(&issuer, minter_section("no_such_cluster", TIMEOUT_MS));
    let drill = Drill::start(issuer, MockServer::echo().expect("service"), Boot::Template { config, extra: Box::new(|v| v) });
    let o = drill.order("unknown-cluster");
    drill.assert_refused("unknown minter cluster", &o, 503, "credential_unavailable");
    assert!(o.took < Duration::from_millis(TIMEOUT_MS), "answered after {:?} (timeout {TIMEOUT_MS} ms)", o.took);
    let line = drill.envoy.wait_for_log("cannot call minter cluster `no_such_cluster`", Duration::from_secs(5)).expect("the dispatch failure is logged");
    eprintln!("unknown cluster: 503 credential_unavailable in {:?}; {line}", o.took);
    drill.finish();
}

/// The trust bundle's endpoint refuses connections from the start: the domain's tokens are
/// refused 401 `bundle_unavailable` (nothing minted); when the endpoint comes back on the same
/// address, the next retry (`retry_s` 1) fetches the bundle and requests are served. (A bundle
/// endpoint that fails after a good fetch keeps the last good bundle: envoy_identity.rs.)
#[test]
fn bundle_endpoint_down_then_back() {
    if !prerequisites("bundle_endpoint_down_then_back") {
        return;
    }
    let issuer = SvidIssuer::new();
    let fake = FakeMinter::start(format!("spiffe://{}{AGENT}", issuer.trust_domain));
    let fake_port = fake.server.port();
    let down = RefusingPort::new();
    let bundle_port = down.port;
    let mut config = plugin_config(&issuer, minter_section("minter", 1000));
    config["identity"]["trust_domains"][0]["bundle"] = json!({"cluster": "bundles", "path": "/bundle", "refresh_s": 5, "retry_s": 1});
    let drill = Drill::start(
        issuer,
        MockServer::echo().expect("service"),
        Boot::Template { config, extra: Box::new(move |v| v.cluster("minter", fake_port).cluster("bundles", bundle_port)) },
    );
    let line = drill.envoy.wait_for_log("bundle fetch for `example.org` failed", Duration::from_secs(5)).expect("a failed fetch is logged");
    eprintln!("bundle endpoint down: {line}");
    let o = drill.order("bundle-down");
    drill.assert_refused("bundle endpoint down", &o, 401, "bundle_unavailable");
    assert!(o.resp.header("www-authenticate").unwrap_or_default().contains("bundle_unavailable"), "{:?}", o.resp.headers);
    assert_eq!(fake.token_calls(), 0, "a credential was asked for an unverified caller");

    let bundle = drill.issuer.bundle();
    let bundles = MockServer::start_on(down.listen(), move |_| Reply::json(200, &bundle)).expect("bundle server back");
    let back_at = Instant::now();
    let (served, _) = wait_until(Duration::from_secs(10), || {
        let o = drill.order("bundle-back");
        (o.resp.status == 200).then_some(o)
    });
    let served = served.expect("not served within 10 s of the bundle endpoint coming back");
    drill.assert_served("bundle endpoint back", &served, "bundle-back");
    assert!(bundles.request_count() >= 1);
    eprintln!("bundle endpoint back: served after {:?}", back_at.elapsed());
    drill.finish();
}

/// The revocation feed fails (503) while the minter still mints: a cached credential serves
/// until `max_stale_s` (5 s here) after the last good poll, then the filter neither uses cached
/// credentials nor mints: 503 `revocations_stale`. When the feed answers again, requests are
/// served within the backoff cap (`max_stale_s` / 4) and a poll. (The whole minter down past
/// `max_stale_s`, mutual TLS: envoy_trust_gaps.rs.)
#[test]
fn revocation_feed_down_past_max_stale_s() {
    if !prerequisites("revocation_feed_down_past_max_stale_s") {
        return;
    }
    const MAX_STALE_S: u64 = 5;
    let issuer = SvidIssuer::new();
    let fake = FakeMinter::start(format!("spiffe://{}{AGENT}", issuer.trust_domain));
    let fake_port = fake.server.port();
    let config = plugin_config(&issuer, json!({"cluster": "minter", "timeout_ms": 1000, "revocations": {"interval_ms": 500, "max_stale_s": MAX_STALE_S}}));
    let drill = Drill::start(issuer, MockServer::echo().expect("service"), Boot::Template { config, extra: Box::new(move |v| v.cluster("minter", fake_port)) });
    drill.assert_served("control", &drill.order("cached"), "cached");
    let polls = || fake.server.requests().iter().filter(|r| r.path.starts_with("/revocations")).count();
    let (polled, _) = wait_until(Duration::from_secs(5), || (polls() >= 1).then_some(()));
    assert!(polled.is_some(), "the feed was never polled");

    fake.feed_up.store(false, Ordering::SeqCst);
    let down_at = Instant::now();
    let mut served_while_down = 0;
    let (stale, _) = wait_until(Duration::from_secs(MAX_STALE_S) + MARGIN, || {
        let o = drill.order("cached");
        if o.resp.status == 200 {
            served_while_down += 1;
            return None;
        }
        Some(o)
    });
    let stale = stale.expect("a cached credential was still used max_stale_s + margin after the feed went down");
    let took = down_at.elapsed();
    drill.assert_refused("revocation feed down past max_stale_s", &stale, 503, "revocations_stale");
    assert!(served_while_down > 0 && took >= Duration::from_secs(MAX_STALE_S - 2), "refused after {took:?}: staleness counts from the last good poll");
    eprintln!("feed down: revocations_stale after {took:?} ({served_while_down} served from the cache before)");
    // A new task is not minted either.
    let calls = fake.token_calls();
    let o = drill.order("new-while-stale");
    drill.assert_refused("revocation feed down past max_stale_s (new task)", &o, 503, "revocations_stale");
    assert_eq!(fake.token_calls(), calls, "exchanged while stale");
    assert!(counter(&drill.envoy, "wasmcustom.mandate.revocations.poll_failures") >= 1);

    fake.feed_up.store(true, Ordering::SeqCst);
    let up_at = Instant::now();
    let (served, _) = wait_until(Duration::from_secs(10), || {
        let o = drill.order("after-feed-back");
        (o.resp.status == 200).then_some(o)
    });
    let served = served.expect("not served within 10 s of the feed coming back");
    drill.assert_served("feed back", &served, "after-feed-back");
    eprintln!("feed back: served after {:?}", up_at.elapsed());
    drill.finish();
}

/// Envoy bootstrap whose listener `mandate` comes from a watched LDS file.
const LDS_BOOTSTRAP: &str = r#"admin:
  address:
    socket_address: { address: 127.0.0.1, port_value: {{ADMIN_PORT}} }
node: { id: fault-drills, cluster: fault-drills }
dynamic_resources:
  lds_config:
    resource_api_version: V3
    path_config_source:
      path: {{LDS_PATH}}
      watched_directory: { path: {{LDS_DIR}} }
static_resources:
  listeners:
  {{EXTRA_LISTENERS}}
  clusters:
  - name: upstream
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: upstream
      endpoints:
      - lb_endpoints:
        - endpoint:
            address:
              socket_address: { address: 127.0.0.1, port_value: {{UPSTREAM_PORT}} }
  {{EXTRA_CLUSTERS}}
"#;

/// Writes listener `mandate` with `config` as the LDS file, atomically (write, then rename into
/// the watched directory, as a config-management tool or a Kubernetes ConfigMap does).
fn write_lds(dir: &Path, config: &Value, access_log: &Path) {
    let doc = json!({"resources": [{
        "@type": "type.googleapis.com/envoy.config.listener.v3.Listener",
        "name": "mandate",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
        "filter_chains": listener("mandate", "upstream", vec![wasm_filter("mandate", config)], Some(access_log))["filter_chains"].clone()
    }]});
    let tmp = dir.join(".lds.json.tmp");
    std::fs::write(&tmp, doc.to_string()).expect("write LDS");
    std::fs::rename(&tmp, dir.join("lds.json")).expect("rename LDS");
}

fn record_of(drill: &Drill, decision_id: &str) -> Value {
    let (entry, _) = wait_until(Duration::from_secs(5), || {
        drill.access_log_entries().into_iter().find(|e| e["decision_id_request"] == decision_id || e["decision_id_response"] == decision_id)
    });
    let entry = entry.unwrap_or_else(|| panic!("no access-log entry for {decision_id}"));
    serde_json::from_str(entry["mandate_decision"].as_str().unwrap_or_default()).expect("record JSON")
}

/// A configuration update with an invalid policy (an unknown intent, as a typo would make) is
/// pushed through LDS: Envoy rejects it (`listener_manager.lds.update_rejected`), the filter
/// logs the field, and requests are still judged by the old policy (same `policy_hash`). A
/// valid update after it is taken.
#[test]
fn invalid_config_update_keeps_the_old_policy() {
    if !prerequisites("invalid_config_update_keeps_the_old_policy") {
        return;
    }
    let issuer = SvidIssuer::new();
    let fake = FakeMinter::start(format!("spiffe://{}{AGENT}", issuer.trust_domain));
    let dir = tempfile::tempdir().expect("temp dir");
    let lds_dir = dir.path().join("lds");
    std::fs::create_dir(&lds_dir).expect("lds dir");
    let access_log = dir.path().join("access.log");
    let bootstrap = dir.path().join("bootstrap.yaml");
    std::fs::write(&bootstrap, LDS_BOOTSTRAP).expect("bootstrap");
    let v1 = plugin_config(&issuer, minter_section("minter", 1000));
    write_lds(&lds_dir, &v1, &access_log);
    let vars = Vars::new()
        .string("LDS_PATH", &lds_dir.join("lds.json").to_string_lossy())
        .string("LDS_DIR", &lds_dir.to_string_lossy())
        .cluster("minter", fake.server.port());
    let drill = Drill::start(issuer, MockServer::echo().expect("service"), Boot::Bootstrap { path: &bootstrap, vars, access_log });

    // The old policy: orders.read on /orders/**, nothing else.
    let o = drill.order("v1");
    drill.assert_served("v1", &o, "v1");
    let id = drill.service.requests().pop().and_then(|r| r.header("x-mandate-decision-id")).expect("decision id");
    let v1_hash = record_of(&drill, &id)["policy_hash"].as_str().expect("policy_hash").to_string();
    let bearer = format!("Bearer {}", drill.svid);
    // Without an intent no rule of the old policy matches.
    let no_intent = drill.get("/orders/42", &[("authorization", &bearer), ("x-agent-task", "v1")]);
    drill.assert_refused("v1 refusal", &no_intent, 403, "no_rule_matched");

    // The invalid update.
    let rejected = counter(&drill.envoy, "listener_manager.lds.update_rejected");
    let success = counter(&drill.envoy, "listener_manager.lds.update_success");
    let mut bad = v1.clone();
    bad["policy"]["rules"][0]["intents"] = json!(["orders.raed"]);
    write_lds(&lds_dir, &bad, &drill.access_log);
    let (seen, took) = wait_until(Duration::from_secs(10), || (counter(&drill.envoy, "listener_manager.lds.update_rejected") > rejected).then_some(()));
    assert!(seen.is_some(), "the invalid update was not rejected within 10 s");
    eprintln!("invalid update rejected after {took:?}");
    assert_eq!(counter(&drill.envoy, "listener_manager.lds.update_success"), success, "the invalid update was taken");
    let lines = drill.envoy.log_lines_containing("invalid configuration at");
    assert!(!lines.is_empty() && lines.iter().all(|l| l.contains("policy.rules[0].intents[0]")), "{lines:?}");
    // Still the old policy, in force and on the record.
    let o = drill.order("v1-after-invalid");
    drill.assert_served("after the invalid update", &o, "v1-after-invalid");
    let id = drill.service.requests().pop().and_then(|r| r.header("x-mandate-decision-id")).expect("decision id");
    assert_eq!(record_of(&drill, &id)["policy_hash"], v1_hash.as_str(), "another policy judged it");
    let o = drill.get("/orders/42", &[("authorization", &bearer), ("x-agent-task", "v1")]);
    let id = drill.assert_refused("invalid config update", &o, 403, "no_rule_matched");
    assert_eq!(record_of(&drill, &id)["policy_hash"], v1_hash.as_str());

    // A valid update (the rule now denies) is taken.
    let mut v2 = v1.clone();
    v2["policy"]["rules"][0]["effect"] = json!("deny");
    write_lds(&lds_dir, &v2, &drill.access_log);
    let (seen, took) = wait_until(Duration::from_secs(10), || (counter(&drill.envoy, "listener_manager.lds.update_success") > success).then_some(()));
    assert!(seen.is_some(), "the valid update was not taken within 10 s");
    let (denied, _) = wait_until(Duration::from_secs(10), || {
        let o = drill.order("v2");
        (o.resp.status != 200).then_some(o)
    });
    let denied = denied.expect("the valid update never took effect");
    let id = drill.assert_refused("valid update", &denied, 403, "denied_by_rule");
    assert_ne!(record_of(&drill, &id)["policy_hash"], v1_hash.as_str());
    eprintln!("valid update taken after {took:?}");
    drill.finish();
}
