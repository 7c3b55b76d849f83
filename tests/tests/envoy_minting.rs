//! Just-in-time credentials end to end, in a real Envoy with the real minter:
//!
//! ```text
//! agent ──SVID──▶ listener `mandate` (plugin) ──Bearer <minted>──▶ listener `rs` (stock jwt_authn) ──▶ echo
//!                      │  ▲ RFC 8693 /token, GET /revocations (cluster `minter`)
//!                      ▼  │
//!                   mandate-minter (in-process, loopback)
//! ```
//!
//! `rs` is a second listener in the same Envoy: `envoy.filters.http.jwt_authn` with the minter's
//! issuer, the resource audience and the minter's JWKS (fetched from `/.well-known/jwks.json`
//! before rendering, as `local_jwks`), so the minted token is verified by stock Envoy, not by us.
//! One Envoy start covers: minting and injection, jwt_authn really checking, the task revocation
//! feed, and the minter being down. Skipped like the other Envoy tests when Envoy or the wasm
//! module is missing (a failure with MANDATE_REQUIRE_ENVOY set).

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use mandate_e2e::{http, http_get, prerequisites, testkit, unix_now, wait_until, Envoy, MockServer, SvidIssuer, Vars};
use mandate_minter::config::MinterConfig;
use serde_json::{json, Value};

mod orders_story;
use orders_story::*;

const POLL_MS: u64 = 500;

/// A free loopback port, for the `rs` listener: the plugin's `upstream` cluster must name it
/// when the configuration is rendered.
fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    l.local_addr().expect("local addr").port()
}

fn counter(envoy: &Envoy, name: &str) -> i64 {
    envoy.stat(name).expect("admin /stats").unwrap_or(0)
}

#[test]
fn minted_credential_is_verified_by_stock_jwt_authn_revoked_by_task_and_fails_closed() {
    if !prerequisites("minted_credential_is_verified_by_stock_jwt_authn_revoked_by_task_and_fails_closed") {
        return;
    }
    let t_start = Instant::now();
    let issuer = SvidIssuer::new();
    let state = tempfile::tempdir().expect("minter state dir");
    let minter = mandate_minter::spawn(
        MinterConfig::from_json(minter_config(&issuer, &state.path().join("state"), json!({"dev": true, "require_task": true, "ttl": {"default_s": 120, "max_s": 300}}))).expect("minter config"),
    )
    .expect("minter starts");
    let minter_url = minter.base_url();
    let jwks = http_get(&format!("{minter_url}/.well-known/jwks.json"), &[]).expect("JWKS");
    assert_eq!(jwks.status, 200, "{}", jwks.text());
    assert!(jwks.json().unwrap()["keys"].as_array().is_some_and(|k| !k.is_empty()), "{}", jwks.text());

    let echo = MockServer::echo().expect("echo upstream");
    let rs_port = free_port();
    let envoy = Envoy::start(
        "mandate.yaml",
        Vars::new()
            .plugin_config_json(&plugin_config(&issuer, json!({"cluster": "minter", "timeout_ms": 1000, "revocations": {"interval_ms": POLL_MS}})))
            // The plugin's route goes to listener `rs`; `rs` routes to the echo.
            .upstream_port(rs_port)
            .cluster("minter", minter.addr.port())
            .cluster("echo", echo.port())
            .listener_yaml(&resource_listener_yaml(rs_port, Jwks::Inline(&jwks.text()), Some("echo"))),
    )
    .expect("envoy starts");
    assert_eq!(envoy.listener_port_named("rs"), rs_port);
    eprintln!("minter + envoy ready in {:?}", t_start.elapsed());
    let svid = agent_svid(&issuer);
    let subject = format!("spiffe://{}{AGENT}", issuer.trust_domain);

    // ---- 1. Allowed: the plugin mints, injects, and stock jwt_authn accepts the credential.
    let before = unix_now();
    let resp = get_order(&envoy, &svid, "T-1");
    let after = unix_now();
    assert_eq!(resp.status, 200, "body: {}", resp.text());
    let seen = echo.requests().pop().expect("the echo upstream got the request");
    let auth = seen.header("authorization").expect("a credential reached the upstream");
    let minted = auth.strip_prefix("Bearer ").expect("Bearer scheme").to_string();
    assert_ne!(minted, svid, "the agent's SVID reached the upstream");
    assert!(!seen.to_json().to_string().contains(&svid), "the SVID reached the upstream: {:?}", seen.headers);
    assert_eq!(seen.header_all("authorization").len(), 1, "{:?}", seen.headers);
    let claims = jwt_claims(&minted);
    assert_eq!(claims["iss"], MINTER_ISSUER, "{claims}");
    assert_eq!(claims["sub"], subject.as_str(), "{claims}");
    assert_eq!(claims["aud"], RESOURCE_AUDIENCE, "{claims}");
    assert_eq!(claims["scope"], SCOPE, "{claims}");
    assert_eq!(claims["task"], "T-1", "{claims}");
    assert_eq!(claims["intent"], INTENT, "{claims}");
    assert_eq!(claims["client_id"], "loopback", "{claims}");
    let jti = claims["jti"].as_str().filter(|j| !j.is_empty()).expect("jti").to_string();
    let exp = claims["exp"].as_u64().expect("exp");
    assert!(exp <= after + TTL_S && exp + 2 >= before + TTL_S, "exp {exp} not now+{TTL_S} ({before}..{after})");
    // jwt_authn verified it: the claims it extracted, and its counter.
    assert_eq!(seen.header("x-verified-sub").as_deref(), Some(subject.as_str()), "{:?}", seen.headers);
    assert_eq!(seen.header("x-verified-task").as_deref(), Some("T-1"), "{:?}", seen.headers);
    assert_eq!(counter(&envoy, "http.rs.jwt_authn.allowed"), 1);
    let decision_id = seen.header("x-mandate-decision-id").expect("decision id upstream");

    // The same task again: the cached credential, no second exchange.
    let again = get_order(&envoy, &svid, "T-1");
    assert_eq!(again.status, 200, "body: {}", again.text());
    let seen2 = echo.requests().pop().unwrap();
    assert_eq!(seen2.header("authorization").as_deref(), Some(auth.as_str()), "credential not reused");
    // Warm, the caller's token is overwritten in place (one replace): still exactly one value.
    assert_eq!(seen2.header_all("authorization").len(), 1, "{:?}", seen2.headers);
    assert_eq!(counter(&envoy, "wasmcustom.mandate.minter.calls"), 1);
    // Per-request counters reach Envoy on the filter's next tick (1 s by default).
    let (hit, _) = wait_until(Duration::from_secs(5), || (counter(&envoy, "wasmcustom.mandate.cache.credential.hit") == 1).then_some(()));
    assert!(hit.is_some(), "credential cache hit counted");

    // The decision record names the credential by jti, never by value.
    let entries = envoy.wait_access_log(2, Duration::from_secs(5)).expect("access log");
    let record: Value = serde_json::from_str(entries[0]["mandate_decision"].as_str().expect("record in the access log"))
        .expect("record is JSON");
    assert_eq!(record["decision_id"], decision_id.as_str(), "{record}");
    assert_eq!(record["credential"]["jti"], jti.as_str(), "{record}");
    assert_eq!(record["task"], "T-1", "{record}");
    let log_text = std::fs::read_to_string(envoy.access_log_path()).unwrap_or_default() + &envoy.log();
    assert!(!log_text.contains(&minted), "the minted token was logged");
    assert!(!log_text.contains(&svid), "the SVID was logged");

    // ---- 2. jwt_authn really checks: absent, tampered, and foreign tokens are refused at `rs`.
    let rs = |auth: Option<&str>| {
        let headers: Vec<(&str, &str)> = auth.map(|a| vec![("authorization", a)]).unwrap_or_default();
        http_get(&format!("http://127.0.0.1:{rs_port}/orders/42"), &headers).expect("request to rs")
    };
    let echo_before = echo.request_count();
    assert_eq!(rs(None).status, 401, "no token");
    let (head, rest) = minted.split_once('.').unwrap();
    let (_, sig) = rest.split_once('.').unwrap();
    let mut forged = claims.clone();
    forged["sub"] = json!("spiffe://example.org/ns/agents/sa/admin");
    let tampered = format!("{head}.{}.{sig}", URL_SAFE_NO_PAD.encode(forged.to_string()));
    assert_eq!(rs(Some(&format!("Bearer {tampered}"))).status, 401, "tampered claims");
    let mut sig_bytes = URL_SAFE_NO_PAD.decode(sig).unwrap();
    sig_bytes[5] ^= 1;
    let bad_sig = format!("{head}.{}.{}", rest.split_once('.').unwrap().0, URL_SAFE_NO_PAD.encode(sig_bytes));
    assert_eq!(rs(Some(&format!("Bearer {bad_sig}"))).status, 401, "bad signature");
    assert_eq!(rs(Some(&format!("Bearer {svid}"))).status, 401, "the agent's SVID (another issuer)");
    assert_eq!(echo.request_count(), echo_before, "jwt_authn let a bad token through");
    // The genuine token is accepted directly too (so the 401s are about the token).
    assert_eq!(rs(Some(&auth)).status, 200);
    assert!(counter(&envoy, "http.rs.jwt_authn.denied") >= 4);

    // ---- 3. The task ends at the minter: the feed refuses it within about one poll interval.
    // T-1 is an ad-hoc task name (not registered): it ends for this agent only.
    let ended = http(
        "POST",
        &format!("{minter_url}/revoke"),
        &[("content-type", "application/json")],
        json!({"task": "T-1", "subject": subject}).to_string().as_bytes(),
    )
    .expect("end task");
    assert_eq!(ended.status, 200, "{}", ended.text());
    let ended = ended.json().unwrap();
    assert!(ended["jtis"].as_array().is_some_and(|j| j.iter().any(|x| x == jti.as_str())), "{ended}");
    let (refused, revoked_after) = wait_for_refusal(&envoy, &svid, "T-1", Duration::from_secs(3));
    let refused = refused.expect("task T-1 was still served 3 s after it ended");
    eprintln!("task_revoked after {revoked_after:?} (poll interval {POLL_MS} ms)");
    assert_eq!(refused.status, 403, "body: {}", refused.text());
    assert_eq!(reason(&refused), "task_revoked", "body: {}", refused.text());
    // One interval is the goal; polls currently slip to two (see revocation_polls_keep_their_interval).
    assert!(revoked_after <= Duration::from_millis(4 * POLL_MS), "revocation took {revoked_after:?}");
    assert!(counter(&envoy, "wasmcustom.mandate.revocations.received") >= 1);
    // Other tasks are unaffected: a new task gets its own credential.
    let other = get_order(&envoy, &svid, "T-3");
    assert_eq!(other.status, 200, "body: {}", other.text());
    let other_auth = echo.requests().pop().unwrap().header("authorization").unwrap();
    assert_ne!(other_auth, auth, "task T-3 reused task T-1's credential");
    assert_eq!(jwt_claims(other_auth.strip_prefix("Bearer ").unwrap())["task"], "T-3");

    // A revoked jti: the plugin drops that credential and mints a fresh one for the task.
    let other_jti = jwt_claims(other_auth.strip_prefix("Bearer ").unwrap())["jti"].as_str().unwrap().to_string();
    let revoked = http(
        "POST",
        &format!("{minter_url}/revoke"),
        &[("content-type", "application/json")],
        json!({"jti": other_jti}).to_string().as_bytes(),
    )
    .expect("revoke jti");
    assert_eq!(revoked.status, 200, "{}", revoked.text());
    let (renewed, took) = wait_until(Duration::from_secs(3), || {
        let r = get_order(&envoy, &svid, "T-3");
        assert_eq!(r.status, 200, "body: {}", r.text());
        let a = echo.requests().pop().unwrap().header("authorization").unwrap();
        (a != other_auth).then_some(a)
    });
    let renewed = renewed.expect("a revoked jti was still injected after 3 s");
    eprintln!("revoked jti replaced after {took:?}");
    assert_eq!(jwt_claims(renewed.strip_prefix("Bearer ").unwrap())["task"], "T-3");

    // A revoked subject: every request of that workload is refused.
    let other_agent = issuer.key.sign(&{
        let now = unix_now();
        let mut c = testkit::svid_claims(
            &format!("spiffe://{}/ns/agents/sa/other-bot", issuer.trust_domain),
            &issuer.audience,
            now.saturating_sub(5),
            now + 300,
        );
        c["aud"] = json!([issuer.audience, MINTER_AUDIENCE]);
        c
    });
    assert_eq!(get_order(&envoy, &other_agent, "T-5").status, 200);
    let revoked = http(
        "POST",
        &format!("{minter_url}/revoke"),
        &[("content-type", "application/json")],
        json!({"subject": format!("spiffe://{}/ns/agents/sa/other-bot", issuer.trust_domain)}).to_string().as_bytes(),
    )
    .expect("revoke subject");
    assert_eq!(revoked.status, 200, "{}", revoked.text());
    let (refused, took) = wait_for_refusal(&envoy, &other_agent, "T-5", Duration::from_secs(3));
    let refused = refused.expect("a revoked subject was still served after 3 s");
    eprintln!("subject_revoked after {took:?}");
    assert_eq!((refused.status, reason(&refused).as_str()), (403, "subject_revoked"), "{}", refused.text());
    // The first agent is unaffected.
    assert_eq!(get_order(&envoy, &svid, "T-3").status, 200);

    // The minter's own limits: it requires a task, so an exchange without one is refused, and
    // the plugin fails closed without passing on the minter's answer.
    let echo_before = echo.request_count();
    let bearer = format!("Bearer {svid}");
    let no_task = http_get(&envoy.url("/orders/42"), &[("authorization", &bearer), ("x-agent-intent", INTENT)])
        .expect("request without a task");
    assert_eq!((no_task.status, reason(&no_task).as_str()), (503, "credential_unavailable"), "{}", no_task.text());
    assert!(!no_task.text().contains("invalid_request"), "the minter's error leaked: {}", no_task.text());
    assert_eq!(echo.request_count(), echo_before);

    // ---- 4. The minter is down: 503 credential_unavailable, nothing reaches the upstream.
    minter.shutdown().expect("minter stops");
    let echo_before = echo.request_count();
    let rs_before = counter(&envoy, "http.rs.downstream_rq_total");
    let failures_before = counter(&envoy, "wasmcustom.mandate.minter.failures");
    let t_down = Instant::now();
    let down = get_order(&envoy, &svid, "T-2");
    eprintln!("minter down: answered in {:?}", t_down.elapsed());
    assert_eq!(down.status, 503, "body: {}", down.text());
    assert_eq!(reason(&down), "credential_unavailable", "body: {}", down.text());
    assert!(down.header("x-mandate-decision-id").is_some());
    assert!(!down.text().contains("minter"), "the minter's details leaked: {}", down.text());
    assert_eq!(echo.request_count(), echo_before, "a request went upstream without a credential");
    assert_eq!(counter(&envoy, "http.rs.downstream_rq_total"), rs_before);
    assert_eq!(counter(&envoy, "wasmcustom.mandate.minter.failures"), failures_before + 1);

    // The minting metrics, by their Prometheus names (see envoy/README.md).
    let prom = envoy.stats_prometheus().expect("prometheus scrape");
    for name in [
        "mandate_minter_calls",
        "mandate_minter_failures",
        "mandate_minter_latency_ms_bucket",
        "mandate_cache_credential_hit",
        "mandate_cache_credential_miss",
        "mandate_revocations_polls",
        "mandate_revocations_received",
        "mandate_revocations_lag_s",
    ] {
        assert!(prom.lines().any(|l| l.starts_with(name)), "{name} is not in the Prometheus scrape");
    }
    eprintln!("total {:?}", t_start.elapsed());
}

/// A stand-in revocation feed that records when each poll arrives and on which TCP connection:
/// Envoy keeps one keep-alive connection per thread, so each connection is one VM's poller.
struct FeedRecorder {
    port: u16,
    polls: std::sync::Arc<std::sync::Mutex<Vec<(usize, Instant)>>>,
}

impl FeedRecorder {
    fn start() -> FeedRecorder {
        use std::io::{BufRead, BufReader, Write};
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().unwrap().port();
        let polls = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = polls.clone();
        std::thread::spawn(move || {
            for (conn, stream) in listener.incoming().enumerate() {
                let Ok(stream) = stream else { return };
                let sink = sink.clone();
                std::thread::spawn(move || {
                    let mut writer = stream.try_clone().expect("clone stream");
                    let mut reader = BufReader::new(stream);
                    loop {
                        let mut line = String::new();
                        // Request line and headers (GET: no body).
                        let mut first = true;
                        loop {
                            line.clear();
                            match reader.read_line(&mut line) {
                                Ok(0) | Err(_) => return,
                                Ok(_) => {}
                            }
                            if first {
                                sink.lock().unwrap().push((conn, Instant::now()));
                                first = false;
                            }
                            if line == "\r\n" {
                                break;
                            }
                        }
                        let body = r#"{"cursor":0,"revocations":[],"more":false}"#;
                        let resp = format!(
                            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                            body.len()
                        );
                        if writer.write_all(resp.as_bytes()).is_err() {
                            return;
                        }
                    }
                });
            }
        });
        FeedRecorder { port, polls }
    }

    /// Per connection, the gaps between consecutive polls.
    fn gaps(&self) -> BTreeMap<usize, Vec<Duration>> {
        let polls = self.polls.lock().unwrap().clone();
        let mut by_conn: BTreeMap<usize, Vec<Instant>> = BTreeMap::new();
        for (c, t) in polls {
            by_conn.entry(c).or_default().push(t);
        }
        by_conn.into_iter().map(|(c, ts)| (c, ts.windows(2).map(|w| w[1] - w[0]).collect())).collect()
    }
}

/// `revocations.interval_ms` should bound how stale a worker's revocation set can get ("a
/// revocation takes effect in each worker within one poll interval", docs/threat-model.md).
/// The filter ticks with period `interval_ms` and polls when `now_ms >= next_poll_at`
/// (`next_poll_at = poll time + interval_ms`, core/src/engine.rs `due_poll`); Envoy's timer
/// often fires a little (< 1 ms to a few ms) before `interval_ms` of wall-clock time has
/// passed, so that tick finds the poll not yet due and the poll waits a whole extra tick:
/// gaps of 2 × interval_ms between polls, and revocations taking up to twice the interval.
#[test]
fn revocation_polls_keep_their_interval() {
    if !prerequisites("revocation_polls_keep_their_interval") {
        return;
    }
    let issuer = SvidIssuer::new();
    let feed = FeedRecorder::start();
    let echo = MockServer::echo().expect("echo upstream");
    let mut config = issuer.plugin_config();
    config["minter"] = json!({"cluster": "minter", "revocations": {"interval_ms": POLL_MS}});
    let envoy = Envoy::start(
        "mandate.yaml",
        Vars::new().plugin_config_json(&config).upstream_port(echo.port()).cluster("minter", feed.port),
    )
    .expect("envoy starts");
    // A VM polls once it serves requests (the main-thread VM never does): one request, even a
    // refused one, starts the worker's poller.
    let first = http_get(&envoy.url("/orders/42"), &[]).expect("a request");
    assert_eq!(first.status, 401, "{}", first.text());
    std::thread::sleep(Duration::from_millis(8 * POLL_MS + 100));
    drop(envoy);
    let gaps = feed.gaps();
    eprintln!("poll gaps per connection (ms): {:?}", gaps.iter().map(|(c, g)| (c, g.iter().map(Duration::as_millis).collect::<Vec<_>>())).collect::<Vec<_>>());
    assert!(!gaps.is_empty() && gaps.values().all(|g| g.len() >= 4), "too few polls: {gaps:?}");
    let limit = Duration::from_millis(POLL_MS * 3 / 2);
    for (conn, g) in &gaps {
        let worst = g.iter().max().copied().unwrap_or_default();
        assert!(worst <= limit, "connection {conn}: a poll gap of {worst:?} with interval_ms {POLL_MS}: {g:?}");
    }
}
