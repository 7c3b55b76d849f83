//! The promises under an adversarial agent (issue 11), end to end in a real Envoy with the real
//! minter and the plugin:
//!
//! - the intent policy is the only way to a credential: an agent holding a certificate from the
//!   minter's client CA cannot use the minter itself, and a proxy cannot end tasks;
//! - ending a task ends the agent's access: tasks are registered by an orchestrator, so a fresh
//!   task id of the agent's own making is refused, and so is a task bound to someone else;
//! - the revocation feed cannot be frozen by volume (a thousand long entries page through) and a
//!   freshly started proxy catches up from a compact snapshot; ending one agent's ad-hoc task
//!   does not end another agent's task of the same name;
//! - a feed that is down stops cached credentials after `max_stale_s` (`revocations_stale`).
//!
//! ```text
//! agent ──SVID──▶ Envoy (mandate, policy tasks: registered) ──minted──▶ echo
//!                      │ cluster `minter`: mTLS, client cert = the gateway (roles mint, feed)
//!                      ▼
//!                   mandate-minter (mtls, named clients: gateway, orchestrator)
//! orchestrator ──mTLS (roles tasks, revoke)──▶ minter      agent ──mTLS (agent cert)──▶ minter ✗
//! ```

use std::time::{Duration, Instant};

use mandate_e2e::{http, prerequisites, Envoy, HttpResponse, MockServer, SvidIssuer, TlsClient, Vars};
use mandate_minter::config::MinterConfig;
use serde_json::{json, Value};

mod orders_story;
use orders_story::*;

const POLL_MS: u64 = 500;
const GATEWAY: &str = "spiffe://example.org/proxy/envoy-1";
const ORCHESTRATOR: &str = "spiffe://example.org/orchestrator";

fn json_body(resp: &HttpResponse) -> Value {
    resp.json().unwrap_or(Value::Null)
}

fn post_json(client: &TlsClient, port: u16, path: &str, body: &Value) -> HttpResponse {
    client
        .request(port, "POST", path, &[("content-type", "application/json")], body.to_string().as_bytes())
        .expect("https request to the minter")
}

fn registered_policy_config(issuer: &SvidIssuer, minter: Value) -> Value {
    let mut c = plugin_config(issuer, minter);
    c["policy"]["tasks"] = json!("registered");
    c
}

#[test]
fn agent_cannot_use_the_minter_itself_cannot_invent_tasks_and_a_proxy_cannot_end_them() {
    if !prerequisites("agent_cannot_use_the_minter_itself_cannot_invent_tasks_and_a_proxy_cannot_end_them") {
        return;
    }
    let issuer = SvidIssuer::new();
    let dir = tempfile::tempdir().expect("temp dir");
    let pki = dir.path().join("pki");
    gen_test_certs(&pki, &[GATEWAY, &format!("orchestrator={ORCHESTRATOR}"), &format!("agent=spiffe://example.org{AGENT}")]);
    let p = |f: &str| pki.join(f);
    let minter = mandate_minter::spawn(
        MinterConfig::from_json(minter_config(
            &issuer,
            &dir.path().join("state"),
            json!({
                "tls": {"cert": p("server.pem"), "key": p("server.key"), "client_ca": p("ca.pem")},
                "client_auth": {"mode": "mtls", "clients": [
                    {"client_id": GATEWAY, "roles": ["mint", "feed"]},
                    {"client_id": ORCHESTRATOR, "roles": ["tasks", "revoke"]}
                ]},
                "require_task": true,
                "tasks": {"require_registered": true},
                "ttl": {"default_s": 120, "max_s": 300}
            }),
        ))
        .expect("minter config"),
    )
    .expect("minter starts");
    let mport = minter.addr.port();
    let orchestrator = TlsClient::new(&pki, Some("orchestrator")).expect("orchestrator TLS");
    let gateway = TlsClient::new(&pki, Some("client")).expect("gateway TLS");
    let agent_tls = TlsClient::new(&pki, Some("agent")).expect("agent TLS");
    let anonymous = TlsClient::new(&pki, None).expect("TLS without a client certificate");

    let echo = MockServer::echo().expect("echo upstream");
    let envoy = Envoy::start(
        "mandate.yaml",
        Vars::new()
            .plugin_config_json(&registered_policy_config(
                &issuer,
                json!({"cluster": "minter", "authority": "localhost", "timeout_ms": 1000,
                       "revocations": {"interval_ms": POLL_MS, "max_stale_s": 5}}),
            ))
            .upstream_port(echo.port())
            .cluster_yaml(&minter_tls_cluster_yaml(mport, &pki, true)),
    )
    .expect("envoy starts");
    let svid = agent_svid(&issuer);
    let subject = format!("spiffe://{}{AGENT}", issuer.trust_domain);

    // The orchestrator opens a task for the agent; the minter names it.
    let created = post_json(&orchestrator, mport, "/tasks", &json!({"subjects": [subject], "intents": [INTENT], "ttl_s": 600}));
    assert_eq!(created.status, 201, "{}", created.text());
    let task = json_body(&created)["task"].as_str().expect("task id").to_string();
    assert!(task.starts_with("tsk_"), "{task}");

    let ok = get_order(&envoy, &svid, &task);
    assert_eq!(ok.status, 200, "{}", ok.text());
    let minted = echo.requests().pop().and_then(|r| r.header("authorization")).expect("credential upstream");
    let claims = jwt_claims(minted.strip_prefix("Bearer ").expect("bearer"));
    assert_eq!((claims["task"].as_str(), claims["client_id"].as_str()), (Some(task.as_str()), Some(GATEWAY)), "{claims}");

    // ---- The agent goes around the proxy with its own certificate from the same CA.
    let exchange = form(&[
        ("grant_type", "urn:ietf:params:oauth:grant-type:token-exchange"),
        ("subject_token", &svid),
        ("subject_token_type", "urn:ietf:params:oauth:token-type:jwt"),
        ("audience", RESOURCE_AUDIENCE),
        ("scope", SCOPE),
        ("task", &task),
    ]);
    let form_ct = [("content-type", "application/x-www-form-urlencoded")];
    let direct = agent_tls.request(mport, "POST", "/token", &form_ct, exchange.as_bytes()).expect("agent → minter");
    assert_eq!((direct.status, json_body(&direct)["error"].as_str()), (401, Some("invalid_client")), "{}", direct.text());
    assert!(json_body(&direct).get("access_token").is_none());
    let bare = anonymous.request(mport, "POST", "/token", &form_ct, exchange.as_bytes()).expect("no cert → minter");
    assert_eq!(bare.status, 401, "{}", bare.text());
    // The agent cannot end or open tasks, nor read the feed.
    assert_eq!(agent_tls.request(mport, "POST", &format!("/tasks/{task}/end"), &[], b"").expect("agent end").status, 401);
    assert_eq!(agent_tls.request(mport, "GET", "/revocations", &[], b"").expect("agent feed").status, 401);

    // ---- The proxy may mint and read the feed, nothing else: it cannot end or open tasks.
    let proxy_end = gateway.request(mport, "POST", &format!("/tasks/{task}/end"), &[], b"").expect("proxy end");
    assert_eq!((proxy_end.status, json_body(&proxy_end)["error"].as_str()), (403, Some("access_denied")), "{}", proxy_end.text());
    let proxy_revoke = post_json(&gateway, mport, "/revoke", &json!({"subject": subject}));
    assert_eq!(proxy_revoke.status, 403, "{}", proxy_revoke.text());
    let proxy_task = post_json(&gateway, mport, "/tasks", &json!({"subjects": [subject]}));
    assert_eq!(proxy_task.status, 403, "{}", proxy_task.text());
    // The orchestrator may open and end tasks, but not mint.
    let orch_mint = orchestrator.request(mport, "POST", "/token", &form_ct, exchange.as_bytes()).expect("orchestrator mint");
    assert_eq!((orch_mint.status, json_body(&orch_mint)["error"].as_str()), (400, Some("unauthorized_client")), "{}", orch_mint.text());
    // Still served: none of that touched the task.
    assert_eq!(get_order(&envoy, &svid, &task).status, 200);

    // ---- A task the orchestrator bound to another agent is not the agent's.
    let other = post_json(&orchestrator, mport, "/tasks", &json!({"subjects": [format!("spiffe://{}/ns/agents/sa/other-bot", issuer.trust_domain)]}));
    assert_eq!(other.status, 201, "{}", other.text());
    let other_task = json_body(&other)["task"].as_str().expect("task id").to_string();
    let echo_before = echo.request_count();
    let borrowed = get_order(&envoy, &svid, &other_task);
    assert_eq!((borrowed.status, reason(&borrowed).as_str()), (403, "task_unregistered"), "{}", borrowed.text());
    assert_eq!(echo.request_count(), echo_before, "a borrowed task reached the service");

    // ---- The task ends; the agent then makes up a fresh task id of its own.
    let ended = orchestrator.request(mport, "POST", &format!("/tasks/{task}/end"), &[], b"").expect("end task");
    assert_eq!(ended.status, 200, "{}", ended.text());
    let (refused, took) = wait_for_refusal(&envoy, &svid, &task, Duration::from_secs(3));
    let refused = refused.expect("the ended task was still served after 3 s");
    eprintln!("ended task refused after {took:?}");
    assert_eq!((refused.status, reason(&refused).as_str()), (403, "task_revoked"), "{}", refused.text());
    let echo_before = echo.request_count();
    for made_up in ["tsk_AAAAAAAAAAAAAAAAAAAAAA", "T-8", &format!("{task}x")] {
        let r = get_order(&envoy, &svid, made_up);
        assert_eq!((r.status, reason(&r).as_str()), (403, "task_unregistered"), "{made_up}: {}", r.text());
        assert!(r.header("x-mandate-decision-id").is_some());
    }
    assert_eq!(echo.request_count(), echo_before, "a refused request reached the service");

    // ---- The feed goes dark: a cached credential stops being used after max_stale_s.
    let live = post_json(&orchestrator, mport, "/tasks", &json!({"subjects": [subject], "intents": [INTENT]}));
    let live_task = json_body(&live)["task"].as_str().expect("task id").to_string();
    assert_eq!(get_order(&envoy, &svid, &live_task).status, 200);
    minter.shutdown().expect("minter stops");
    let down_at = Instant::now();
    let cached = get_order(&envoy, &svid, &live_task);
    assert_eq!(cached.status, 200, "within max_stale_s the cached credential still serves: {}", cached.text());
    let (stale, took) = wait_for_refusal(&envoy, &svid, &live_task, Duration::from_secs(12));
    let stale = stale.expect("a cached credential was still used 12 s after the feed went down");
    eprintln!("revocations_stale {:?} after the minter stopped (max_stale_s 5)", down_at.elapsed());
    assert!(took >= Duration::from_secs(2), "refused too early ({took:?}): staleness counts from the last good poll");
    assert_eq!((stale.status, reason(&stale).as_str()), (503, "revocations_stale"), "{}", stale.text());
}

#[test]
fn a_thousand_long_revocations_page_through_and_a_fresh_proxy_catches_up() {
    if !prerequisites("a_thousand_long_revocations_page_through_and_a_fresh_proxy_catches_up") {
        return;
    }
    let issuer = SvidIssuer::new();
    let state = tempfile::tempdir().expect("state dir");
    // Development mode on loopback; ad-hoc (unregistered) task names, so that ending one is
    // scoped to one subject.
    let minter = mandate_minter::spawn(
        MinterConfig::from_json(minter_config(
            &issuer,
            &state.path().join("state"),
            json!({"dev": true, "require_task": true, "tasks": {"require_registered": false}}),
        ))
        .expect("minter config"),
    )
    .expect("minter starts");
    let murl = minter.base_url();
    let echo = MockServer::echo().expect("echo upstream");
    let config = plugin_config(&issuer, json!({"cluster": "minter", "timeout_ms": 1000, "revocations": {"interval_ms": POLL_MS}}));
    let start_envoy = || {
        Envoy::start(
            "mandate.yaml",
            Vars::new().plugin_config_json(&config).upstream_port(echo.port()).cluster("minter", minter.addr.port()),
        )
        .expect("envoy starts")
    };
    let envoy = start_envoy();
    let svid = agent_svid(&issuer);
    let subject = format!("spiffe://{}{AGENT}", issuer.trust_domain);
    let revoke = |body: Value| {
        let r = http("POST", &format!("{murl}/revoke"), &[("content-type", "application/json")], body.to_string().as_bytes()).expect("revoke");
        assert_eq!(r.status, 200, "{}", r.text());
    };
    assert_eq!(get_order(&envoy, &svid, "shared-name").status, 200);
    assert_eq!(get_order(&envoy, &svid, "live-task").status, 200);

    // Another agent's task of the same name ends: ours is unaffected.
    revoke(json!({"task": "shared-name", "subject": format!("spiffe://{}/ns/agents/sa/other-bot", issuer.trust_domain)}));

    // A thousand long entries, each scoped to a long subject: several pages' worth.
    let long_subject = format!("spiffe://{}/ns/{}/sa/bulk", issuer.trust_domain, "n".repeat(180));
    let t0 = Instant::now();
    for i in 0..1000 {
        revoke(json!({"task": format!("{i:04}-{}", "t".repeat(123)), "subject": long_subject}));
    }
    eprintln!("1000 revocations committed in {:?}", t0.elapsed());
    let page = http("GET", &format!("{murl}/revocations?since=0"), &[], b"").expect("feed");
    let page = page.json().expect("feed JSON");
    assert_eq!(page["more"], true, "1000 long entries fit one page? {}", page["cursor"]);

    // Then the agent's own task ends: the running proxy and a fresh one both refuse it.
    revoke(json!({"task": "live-task", "subject": subject}));
    let (refused, took) = wait_for_refusal(&envoy, &svid, "live-task", Duration::from_secs(10));
    let refused = refused.expect("the running proxy never learned of the task ended after 1000 long entries");
    eprintln!("running proxy refused the ended task after {took:?}");
    assert_eq!((refused.status, reason(&refused).as_str()), (403, "task_revoked"), "{}", refused.text());
    let ours = get_order(&envoy, &svid, "shared-name");
    assert_eq!(ours.status, 200, "another agent's task of the same name ended ours: {}", ours.text());

    drop(envoy);
    let fresh = start_envoy();
    let (refused, took) = wait_for_refusal(&fresh, &svid, "live-task", Duration::from_secs(10));
    let refused = refused.expect("a fresh proxy served a task ended before it started");
    eprintln!("fresh proxy: first refusal after {took:?}");
    assert_eq!(refused.status, 403, "{}", refused.text());
    assert!(["task_revoked"].contains(&reason(&refused).as_str()), "{}", refused.text());
    assert_eq!(get_order(&fresh, &svid, "shared-name").status, 200);
}
