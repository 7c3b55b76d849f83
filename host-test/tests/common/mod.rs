//! Shared rig for the plugin tests on the wasmtime host: the built filter, one policy with a
//! minter, signed SVIDs and intent tokens, and helpers to drive streams and read what the
//! filter decided. Nothing sleeps: the clock only moves when a test moves it.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use mandate_host_test::{
    header_value, CalloutReply, Headers, Host, HttpCallout, LocalResponse, StreamId, Vm,
};
pub use mandate_core::testkit::{b64, plain_jwks, spiffe_bundle, svid_claims, TestKey};
use serde_json::{json, Value};

/// A fixed instant (2027-01-15 08:00 UTC): every test is reproducible.
pub const T0: u64 = 1_800_000_000;
pub const TD: &str = "example.org";
pub const AUD: &str = "spiffe://example.org/gateway";
pub const AGENT: &str = "spiffe://example.org/agent/a1";
/// An agent a deny rule names (403 `denied_by_rule`, rule `blocked-agent`).
pub const BLOCKED: &str = "spiffe://example.org/agent/blocked";
pub const MINTER: &str = "minter";
pub const INTENT_ISS: &str = "https://intents.example.org";
pub const TICKETS_AUD: &str = "https://tickets.internal";
pub const DECISION_PREFIX: &str = "mandate.decision ";

/// Decision records in the VM's log so far: one per line, several lines per batched log call.
pub fn logged_records(vm: &Vm) -> Vec<Value> {
    vm.logs()
        .iter()
        .flat_map(|l| l.message.lines())
        .filter_map(|l| l.strip_prefix(DECISION_PREFIX))
        .map(|j| {
            serde_json::from_str(j)
                .unwrap_or_else(|e| panic!("decision record is not JSON ({e}): {j}"))
        })
        .collect()
}
const REQUIRE_ENV: &str = "MANDATE_REQUIRE_ENVOY";

/// The built filter: `$MANDATE_PLUGIN_WASM` or `target/wasm32-wasip1/release/mandate_plugin.wasm`.
pub fn wasm_path() -> PathBuf {
    if let Some(p) = std::env::var_os("MANDATE_PLUGIN_WASM") {
        return PathBuf::from(p);
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let target = if target.is_absolute() {
        target
    } else {
        root.join(target)
    };
    target.join("wasm32-wasip1/release/mandate_plugin.wasm")
}

/// A host over the built filter with fresh state at `T0`, or `None` (test skipped) when the
/// filter is not built and `MANDATE_REQUIRE_ENVOY` is unset (the e2e rig's convention).
pub fn host(test: &str) -> Option<Host> {
    // One compilation per test binary: the first caller compiles, the others wait and then
    // hit the host's module cache (parallel first loads would each compile ~700 KB).
    static COMPILE: Mutex<()> = Mutex::new(());
    let path = wasm_path();
    if !path.is_file() {
        let why = format!("{} does not exist (run scripts/build-wasm)", path.display());
        if std::env::var_os(REQUIRE_ENV).is_some_and(|v| !v.is_empty()) {
            panic!("{test}: {REQUIRE_ENV} is set but the filter is missing: {why}");
        }
        eprintln!("SKIPPED {test}: {why}. Set {REQUIRE_ENV}=1 to make this a failure.");
        return None;
    }
    let host = {
        let _once = COMPILE.lock().unwrap_or_else(|e| e.into_inner());
        Host::from_file(&path).expect("load the filter")
    };
    host.set_time_secs(T0);
    Some(host)
}

/// The policy every test uses. Resources: `tickets` (audience `https://tickets.internal`),
/// `reports` (no audience: its name is used), `wiki` (a dry-run deny rule covers it) and the
/// legacy `legacy-crm`.
pub fn policy(intent_key: &TestKey) -> Value {
    json!({
        "classes": [{"name": "agent", "principals": ["spiffe://example.org/agent/*"], "owner": "support-ops",
                     "intent_required": true, "refuse_standing_secrets": true}],
        "resources": [
            {"name": "tickets", "hosts": ["tickets.internal"], "paths": ["/tickets/**"],
             "sensitivity": "internal", "audience": TICKETS_AUD},
            {"name": "reports", "hosts": ["reports.internal"], "sensitivity": "confidential"},
            {"name": "wiki", "hosts": ["wiki.internal"], "sensitivity": "public"},
            {"name": "legacy-crm", "hosts": ["old-crm.internal"], "legacy": true}
        ],
        "intents": [
            {"name": "ticket.read", "operations": [{"resource": "tickets", "methods": ["GET"]}],
             "scopes": ["tickets:read", "tickets:list"], "ttl_s": 120},
            {"name": "report.read", "operations": [{"resource": "reports", "methods": ["GET"]}],
             "scopes": ["reports:read"], "ttl_s": 60},
            {"name": "wiki.read", "operations": [{"resource": "wiki"}], "scopes": ["wiki:read"]},
            {"name": "crm.sync", "operations": [{"resource": "legacy-crm"}], "scopes": ["crm"]}
        ],
        "intent_issuers": [{"issuer": INTENT_ISS, "jwks": plain_jwks(&[intent_key]), "audiences": [AUD]}],
        "rules": [
            {"id": "blocked-agent", "effect": "deny", "principals": [BLOCKED]},
            {"id": "wiki-freeze", "effect": "deny", "intents": ["wiki.read"], "dry_run": true},
            {"id": "agents", "effect": "allow", "classes": ["agent"],
             "intents": ["ticket.read", "report.read", "wiki.read", "crm.sync"]}
        ]
    })
}

/// The full plugin configuration with this `minter` section (`null`: no minter).
pub fn config(key: &TestKey, intent_key: &TestKey, minter: Value) -> Value {
    let mut c = json!({
        "identity": {"audiences": [AUD], "upstream_header": "x-mandate-identity",
                     "trust_domains": [{"name": TD, "bundle": {"inline": spiffe_bundle(&[key], None)}}]},
        "policy": policy(intent_key),
    });
    if !minter.is_null() {
        c["minter"] = minter;
    }
    c
}

/// The default minter section: cluster `minter`, 300 ms timeout, 10 s refresh margin.
pub fn minter() -> Value {
    json!({"cluster": MINTER, "timeout_ms": 300, "refresh_margin_s": 10})
}

pub struct Rig {
    pub host: Host,
    pub vm: Vm,
    pub key: TestKey,
    pub intent_key: TestKey,
}

/// A host at `T0` with the minter cluster declared and a VM configured with the shared policy
/// and this minter section. `None` when the filter is not built (skipped).
pub fn start(test: &str, minter: Value) -> Option<Rig> {
    start_with(test, minter, true)
}

/// Like [`start`]; `declare_minter: false` leaves the minter cluster unknown to the host.
pub fn start_with(test: &str, minter: Value, declare_minter: bool) -> Option<Rig> {
    start_configured(test, minter, declare_minter, |_| {})
}

/// Like [`start_with`], with a last say on the plugin configuration.
pub fn start_configured(
    test: &str,
    minter: Value,
    declare_minter: bool,
    edit: impl FnOnce(&mut Value),
) -> Option<Rig> {
    let host = host(test)?;
    if declare_minter {
        host.add_upstream(MINTER);
    }
    let key = TestKey::es256("svid-k1");
    let intent_key = TestKey::es256("intent-k1");
    let mut cfg = config(&key, &intent_key, minter);
    edit(&mut cfg);
    let vm = host
        .new_vm(b"", cfg.to_string().as_bytes())
        .expect("configuration accepted");
    Some(Rig {
        host,
        vm,
        key,
        intent_key,
    })
}

impl Rig {
    pub fn svid_for(&self, sub: &str) -> String {
        self.key.sign(&svid_claims(sub, AUD, T0, T0 + 3600))
    }

    pub fn svid(&self) -> String {
        self.svid_for(AGENT)
    }

    /// A signed intent token for `AGENT`.
    pub fn intent_token(&self, intents: &[&str], task: Option<&str>) -> String {
        let mut claims = json!({"iss": INTENT_ISS, "sub": AGENT, "aud": AUD, "iat": T0, "exp": T0 + 3600, "intents": intents});
        if let Some(t) = task {
            claims["task"] = json!(t);
        }
        self.intent_key.sign_intent(&claims)
    }

    /// `GET https://tickets.internal/tickets/1` with intent `ticket.read` and the agent's SVID.
    pub fn tickets(&self) -> Req {
        Req::get("tickets.internal", "/tickets/1")
            .intent("ticket.read")
            .bearer(&self.svid())
    }

    /// Opens a stream and delivers the request headers (end of stream).
    pub fn send(&mut self, req: &Req) -> StreamId {
        let s = self.vm.new_stream().expect("new stream");
        self.vm
            .request_headers(
                s,
                req.headers.iter().map(|(k, v)| (k.as_str(), v.as_str())),
                true,
            )
            .expect("request headers");
        s
    }

    /// Wall clock, Unix seconds.
    pub fn now(&self) -> u64 {
        self.host.now_nanos() / 1_000_000_000
    }

    /// Outstanding credential exchanges (POSTs to the minter's token path).
    pub fn mint_calls(&self) -> Vec<HttpCallout> {
        self.vm
            .pending_calls()
            .into_iter()
            .filter(|c| c.header(":path").as_deref() == Some(&b"/token"[..]))
            .collect()
    }

    /// The single outstanding exchange (panics unless exactly one).
    pub fn one_mint_call(&self) -> HttpCallout {
        let calls = self.mint_calls();
        assert_eq!(calls.len(), 1, "outstanding exchanges: {calls:?}");
        calls.into_iter().next().expect("one call")
    }

    /// Outstanding revocation polls.
    pub fn polls(&self) -> Vec<HttpCallout> {
        self.vm
            .pending_calls()
            .into_iter()
            .filter(|c| {
                c.header(":path")
                    .is_some_and(|p| p.starts_with(b"/revocations"))
            })
            .collect()
    }

    pub fn answer(&mut self, call: &HttpCallout, reply: CalloutReply) {
        self.vm
            .answer_call(call.token, reply)
            .expect("answer the call");
    }

    /// Sends the request; if it waits on an exchange, answers it with a fresh token.
    pub fn send_minted(&mut self, req: &Req, jti: &str) -> StreamId {
        let s = self.send(req);
        if let Some(call) = self.vm.pending_calls_for(s).into_iter().next() {
            let now = self.now();
            self.answer(&call, token_reply_for(&call, jti, now + 120, now));
        }
        s
    }

    /// Hands over what the filter batches (record lines, per-request counters), as its next
    /// tick would. Background work is time-gated, so an extra tick starts nothing early.
    pub fn flush(&mut self) {
        self.vm.force_tick().expect("tick");
    }

    /// Every decision record logged so far (after a flush), parsed (panics on invalid JSON).
    pub fn records(&mut self) -> Vec<Value> {
        self.flush();
        logged_records(&self.vm)
    }

    /// The record set as the stream's filter state (`mandate.decision`).
    pub fn state_record(&self, s: StreamId) -> Option<Value> {
        self.vm.stream_property(s, &["mandate.decision"]).map(|v| {
            serde_json::from_slice(&v).unwrap_or_else(|e| panic!("filter state is not JSON ({e})"))
        })
    }

    /// A counter's value after a flush.
    pub fn metric(&mut self, name: &str) -> i64 {
        self.flush();
        self.vm.metric(name).unwrap_or(0)
    }

    /// Advances the clock in 100 ms steps, answering every revocation poll with an empty page
    /// (epoch `E1`, cursor 0): the feed is alive, so the filter never goes stale.
    pub fn advance_with_feed(&mut self, d: Duration) {
        let steps = d.as_millis() / 100;
        for _ in 0..steps {
            self.vm
                .advance(Duration::from_millis(100))
                .expect("advance");
            for p in self.polls() {
                self.answer(
                    &p,
                    json_reply(
                        200,
                        &json!({"epoch": "E1", "cursor": 0, "more": false, "revocations": []}),
                    ),
                );
            }
        }
    }

    /// The stream went upstream: the headers as forwarded.
    pub fn forwarded(&self, s: StreamId) -> Headers {
        let st = self.vm.stream(s);
        assert!(
            st.local_response.is_none(),
            "stream {} was answered locally: {:?}",
            s.0,
            st.local_response.as_ref().map(reply_text)
        );
        assert!(!st.request_paused, "stream {} is still paused", s.0);
        st.upstream
            .headers
            .clone()
            .unwrap_or_else(|| panic!("stream {} was not forwarded", s.0))
    }

    /// The stream was answered locally with this status and reason; returns the reply.
    pub fn denied(&self, s: StreamId, status: u32, reason: &str) -> LocalResponse {
        let st = self.vm.stream(s);
        assert!(
            st.upstream.headers.is_none(),
            "stream {} was forwarded upstream",
            s.0
        );
        let r = st.local_response.clone().unwrap_or_else(|| {
            panic!(
                "stream {} has no local reply (paused: {})",
                s.0, st.request_paused
            )
        });
        let body: Value = serde_json::from_slice(&r.body).expect("JSON reply body");
        assert_eq!(
            (r.status, body["reason"].as_str()),
            (status, Some(reason)),
            "reply: {}",
            reply_text(&r)
        );
        assert_eq!(st.local_response_calls, 1, "one local reply per stream");
        r
    }

    /// Whether the stream is still waiting (paused, neither forwarded nor answered).
    pub fn waiting(&self, s: StreamId) -> bool {
        let st = self.vm.stream(s);
        st.request_paused && st.upstream.headers.is_none() && st.local_response.is_none()
    }
}

pub fn reply_text(r: &LocalResponse) -> String {
    format!("{} {}", r.status, String::from_utf8_lossy(&r.body))
}

pub fn header(h: &Headers, name: &str) -> Option<String> {
    header_value(h, name).map(|v| String::from_utf8_lossy(&v).into_owned())
}

/// A request under construction: pseudo-headers first, then the rest in order.
#[derive(Clone, Debug)]
pub struct Req {
    pub headers: Vec<(String, String)>,
}

impl Req {
    pub fn new(method: &str, authority: &str, path: &str) -> Req {
        let h = [
            (":method", method),
            (":scheme", "https"),
            (":authority", authority),
            (":path", path),
        ];
        Req {
            headers: h
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }
    pub fn get(authority: &str, path: &str) -> Req {
        Req::new("GET", authority, path)
    }
    /// Adds a header (replacing none).
    pub fn with(mut self, name: &str, value: &str) -> Req {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }
    /// Sets a header, replacing every existing value.
    pub fn set(mut self, name: &str, value: &str) -> Req {
        self.headers.retain(|(k, _)| k != name);
        self.with(name, value)
    }
    pub fn without(mut self, name: &str) -> Req {
        self.headers.retain(|(k, _)| k != name);
        self
    }
    pub fn bearer(self, token: &str) -> Req {
        self.set("authorization", &format!("Bearer {token}"))
    }
    pub fn intent(self, intent: &str) -> Req {
        self.set("x-agent-intent", intent)
    }
    pub fn task(self, task: &str) -> Req {
        self.set("x-agent-task", task)
    }
}

/// The signature segment of minted test JWTs: unique, so a leak of the token's tail is visible.
pub const MINTED_SIG: &str = "bWludGVkLXNpZ25hdHVyZS1RN3hWcTJ6TGs5UHdSNHQ";

/// A JWT-looking minted token for `AGENT` at `aud`, for `task`, with this `jti` and `exp` (its
/// signature is not verified by the filter; its `aud`, `sub` and `task` are checked).
pub fn minted_jwt_for(jti: &str, exp: u64, aud: &str, task: Option<&str>) -> String {
    minted_jwt_as(AGENT, jti, exp, aud, task)
}

/// A minted JWT for subject `sub` (as a minter that echoes the exchange would issue it).
pub fn minted_jwt_as(sub: &str, jti: &str, exp: u64, aud: &str, task: Option<&str>) -> String {
    let header = b64(br#"{"alg":"ES256","typ":"JWT","kid":"minter-k1"}"#);
    let mut claims =
        json!({"iss": "https://minter", "sub": sub, "aud": aud, "jti": jti, "exp": exp});
    if let Some(t) = task {
        claims["task"] = json!(t);
    }
    let claims = b64(claims.to_string().as_bytes());
    format!("{header}.{claims}.{MINTED_SIG}")
}

/// [`minted_jwt_for`] the tickets audience, no task.
pub fn minted_jwt(jti: &str, exp: u64) -> String {
    minted_jwt_for(jti, exp, TICKETS_AUD, None)
}

/// A 200 answer to this exchange, as the minter gives it: the token names the audience and
/// task the exchange asked for.
pub fn token_reply_for(call: &HttpCallout, jti: &str, exp: u64, now: u64) -> CalloutReply {
    let form = form(call);
    let get = |name: &str| form.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
    let aud = get("audience").unwrap_or_default();
    // The subject the exchange names: the `sub` of its subject token (unverified; a test rig).
    let sub = get("subject_token")
        .and_then(|t| t.split('.').nth(1).map(str::to_string))
        .and_then(|p| {
            base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, p).ok()
        })
        .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
        .and_then(|c| c["sub"].as_str().map(str::to_string))
        .unwrap_or_else(|| AGENT.to_string());
    let token = minted_jwt_as(&sub, jti, exp, &aud, get("task").as_deref());
    let body = json!({"access_token": token, "issued_token_type": "urn:ietf:params:oauth:token-type:jwt",
                      "token_type": "Bearer", "expires_in": exp.saturating_sub(now)});
    json_reply(200, &body)
}

/// A 200 RFC 8693 answer carrying `minted_jwt(jti, exp)`, `expires_in = exp - now`.
pub fn token_reply(jti: &str, exp: u64, now: u64) -> CalloutReply {
    let body = json!({"access_token": minted_jwt(jti, exp), "issued_token_type": "urn:ietf:params:oauth:token-type:jwt",
                      "token_type": "Bearer", "expires_in": exp.saturating_sub(now)});
    json_reply(200, &body)
}

pub fn json_reply(status: u16, body: &Value) -> CalloutReply {
    CalloutReply::ok(
        status,
        &[
            ("content-type", "application/json"),
            ("cache-control", "no-store"),
        ],
        body.to_string(),
    )
}

/// The form body of an exchange, as (name, value) pairs in order.
pub fn form(call: &HttpCallout) -> Vec<(String, String)> {
    let body = String::from_utf8(call.body.clone()).expect("UTF-8 form");
    body.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (url_decode(k), url_decode(v))
        })
        .collect()
}

/// `application/x-www-form-urlencoded` decoding (`+` is a space).
pub fn url_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).expect("hex");
                out.push(u8::from_str_radix(hex, 16).expect("percent escape"));
                i += 2;
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8(out).expect("UTF-8 after decoding")
}
