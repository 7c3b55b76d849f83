//! Just-in-time credentials on the wasmtime test host: the RFC 8693 exchange the filter sends,
//! injection, the credential cache, single flight, fail-closed failures, the revocation feed
//! and legacy static secrets. The clock only moves when a test moves it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;
use mandate_host_test::{Action, CalloutReply};
use serde_json::{json, Value};

const JWT_TYPE: &str = "urn:ietf:params:oauth:token-type:jwt";

fn no_warnings(rig: &Rig) {
    assert!(rig.vm.warnings().is_empty(), "host warnings: {:?}", rig.vm.warnings());
}

// ------------------------------------------------------------------ the exchange

#[test]
fn allowed_request_pauses_and_posts_an_rfc8693_form_to_the_minter() {
    let Some(mut rig) = start("allowed_request_pauses_and_posts_an_rfc8693_form", minter()) else { return };
    let svid = rig.svid();
    let s = rig.vm.new_stream().unwrap();
    let req = rig.tickets().task("T-1");
    let action = rig.vm.request_headers(s, req.headers.iter().map(|(k, v)| (k.as_str(), v.as_str())), true).unwrap();
    assert_eq!(action, Action::Pause, "the request waits for its credential");
    assert!(rig.waiting(s));

    let call = rig.one_mint_call();
    assert_eq!(call.upstream, MINTER);
    assert_eq!(call.context_id, s.0, "dispatched by the request's own context");
    assert_eq!(call.timeout_ms, 300);
    assert_eq!(header(&call.headers, ":method").as_deref(), Some("POST"));
    assert_eq!(header(&call.headers, ":path").as_deref(), Some("/token"));
    assert_eq!(header(&call.headers, ":authority").as_deref(), Some(MINTER), "authority defaults to the cluster");
    assert_eq!(header(&call.headers, "content-type").as_deref(), Some("application/x-www-form-urlencoded"));
    assert_eq!(header(&call.headers, "accept").as_deref(), Some("application/json"));
    assert!(call.trailers.is_empty());

    let form = form(&call);
    let get = |name: &str| {
        let v: Vec<&String> = form.iter().filter(|(k, _)| k == name).map(|(_, v)| v).collect();
        assert!(v.len() <= 1, "{name} sent {} times", v.len());
        v.first().map(|s| s.as_str().to_string())
    };
    assert_eq!(get("grant_type").as_deref(), Some("urn:ietf:params:oauth:grant-type:token-exchange"));
    assert_eq!(get("subject_token").as_deref(), Some(svid.as_str()), "the caller's SVID, unchanged");
    assert_eq!(get("subject_token_type").as_deref(), Some(JWT_TYPE));
    assert_eq!(get("audience").as_deref(), Some(TICKETS_AUD), "the resource's configured audience");
    assert_eq!(get("scope").as_deref(), Some("tickets:read tickets:list"), "scopes space-separated");
    assert_eq!(get("task").as_deref(), Some("T-1"));
    assert_eq!(get("intent").as_deref(), Some("ticket.read"));
    assert_eq!(get("requested_ttl").as_deref(), Some("120"), "the intent's ttl_s");
    assert_eq!(form.len(), 8, "no other parameters: {form:?}");

    // Nothing is recorded until the request is finished.
    assert!(rig.records().is_empty(), "{:?}", rig.records());
    no_warnings(&rig);
}

#[test]
fn audience_defaults_to_the_resource_name_and_minter_settings_are_honoured() {
    let m = json!({"cluster": MINTER, "authority": "minter.internal", "path": "/oauth2/token", "timeout_ms": 750});
    let Some(mut rig) = start("audience_defaults_to_the_resource_name", m) else { return };
    let req = Req::get("reports.internal", "/q3").intent("report.read").bearer(&rig.svid());
    let s = rig.send(&req);
    let calls = rig.vm.pending_calls_for(s);
    assert_eq!(calls.len(), 1, "{calls:?}");
    let call = &calls[0];
    assert_eq!((call.upstream.as_str(), call.timeout_ms), (MINTER, 750));
    assert_eq!(header(&call.headers, ":path").as_deref(), Some("/oauth2/token"));
    assert_eq!(header(&call.headers, ":authority").as_deref(), Some("minter.internal"));
    let form = form(call);
    let names: Vec<&str> = form.iter().map(|(k, _)| k.as_str()).collect();
    assert!(form.contains(&("audience".into(), "reports".into())), "{form:?}");
    assert!(form.contains(&("scope".into(), "reports:read".into())), "{form:?}");
    assert!(form.contains(&("requested_ttl".into(), "60".into())), "{form:?}");
    assert!(!names.contains(&"task"), "no task declared, none sent: {form:?}");
}

// ------------------------------------------------------------------ injection

#[test]
fn minted_token_is_injected_and_the_callers_credentials_are_stripped() {
    let Some(mut rig) = start("minted_token_is_injected", minter()) else { return };
    let svid = rig.svid();
    let intent = rig.intent_token(&["ticket.read"], Some("T-1"));
    let req = rig
        .tickets()
        .task("T-1")
        .with("x-agent-intent-token", &intent)
        .with("x-mandate-identity", "spiffe://example.org/admin")
        .with("x-mandate-decision-id", "forged")
        .with("x-request-id", "req-1");
    let s = rig.send(&req);
    let call = rig.one_mint_call();
    rig.answer(&call, token_reply("jti-1", T0 + 120, T0));

    let up = rig.forwarded(s);
    assert_eq!(rig.vm.stream(s).request_continues, 1, "resumed exactly once");
    assert_eq!(header(&up, "authorization"), Some(format!("Bearer {}", minted_jwt("jti-1", T0 + 120))));
    assert_eq!(up.iter().filter(|(k, _)| k == "authorization").count(), 1, "one authorization header");
    assert!(header(&up, "x-agent-intent-token").is_none(), "the intent token is a credential: stripped");
    assert!(!up.iter().any(|(_, v)| String::from_utf8_lossy(v).contains(&svid)), "the SVID never goes upstream");
    assert_eq!(header(&up, "x-mandate-identity").as_deref(), Some(AGENT), "spoofed identity replaced");
    let id = header(&up, "x-mandate-decision-id").expect("decision id upstream");
    assert_ne!(id, "forged");
    assert_eq!(up.iter().filter(|(k, _)| k == "x-mandate-decision-id").count(), 1);
    assert_eq!(header(&up, "x-request-id").as_deref(), Some("req-1"), "unrelated headers pass");

    let records = rig.records();
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0]["decision_id"], json!(id));
    assert_eq!(records[0]["credential"], json!({"jti": "jti-1", "exp": T0 + 120, "kind": "jwt"}));
    assert_eq!(rig.state_record(s).as_ref(), Some(&records[0]), "filter state carries the same record");
    assert_eq!((rig.metric("mandate.minter.calls"), rig.metric("mandate.minter.failures")), (1, 0));
    no_warnings(&rig);
}

#[test]
fn minted_jwt_exp_caps_expires_in() {
    // The token says it expires sooner than expires_in claims: the cache believes the token.
    let Some(mut rig) = start("minted_jwt_exp_caps_expires_in", minter()) else { return };
    let s = rig.send(&rig.tickets());
    let body = json!({"access_token": minted_jwt("jti-short", T0 + 30), "issued_token_type": JWT_TYPE,
                      "token_type": "Bearer", "expires_in": 300});
    let call = rig.one_mint_call();
    rig.answer(&call, json_reply(200, &body));
    rig.forwarded(s);
    assert_eq!(rig.records()[0]["credential"]["exp"], json!(T0 + 30));
    rig.vm.advance(Duration::from_secs(20)).unwrap();
    let s2 = rig.send(&rig.tickets());
    assert!(rig.waiting(s2), "20 s + 10 s margin reaches the token's own exp: refreshed");
    assert_eq!(rig.mint_calls().len(), 1);
}

// ------------------------------------------------------------------ cache

#[test]
fn credential_is_reused_until_the_refresh_margin() {
    let Some(mut rig) = start("credential_is_reused_until_the_refresh_margin", minter()) else { return };
    let req = rig.tickets().task("T-1");
    let s1 = rig.send(&req);
    let call = rig.one_mint_call();
    rig.answer(&call, token_reply("jti-1", T0 + 60, T0));
    let first = header(&rig.forwarded(s1), "authorization").unwrap();

    // 49 s later (exp - 11 s, outside the 10 s margin): reused, no exchange.
    rig.vm.advance(Duration::from_secs(49)).unwrap();
    let s2 = rig.send(&req);
    assert!(rig.mint_calls().is_empty(), "no exchange for a cached credential");
    let up2 = rig.forwarded(s2);
    assert_eq!(header(&up2, "authorization").as_ref(), Some(&first));
    assert_ne!(header(&up2, "x-mandate-decision-id"), header(&rig.forwarded(s1), "x-mandate-decision-id"), "a new decision id each time");
    let rec = rig.state_record(s2).unwrap();
    assert_eq!(rec["cache"]["credential"], json!(true));
    assert_eq!(rec["credential"]["jti"], json!("jti-1"));
    assert_eq!((rig.metric("mandate.cache.credential.hit"), rig.metric("mandate.cache.credential.miss")), (1, 1));

    // A different audience, scopes or task is a different credential.
    let s3 = rig.send(&Req::get("reports.internal", "/x").intent("report.read").task("T-1").bearer(&rig.svid()));
    assert!(rig.waiting(s3));
    let c3 = rig.one_mint_call();
    rig.answer(&c3, token_reply("jti-r", rig.now() + 60, rig.now()));
    rig.forwarded(s3);

    // At exp - 10 s (inside the margin): a fresh exchange.
    rig.vm.advance(Duration::from_secs(1)).unwrap();
    assert_eq!(rig.now(), T0 + 50);
    let s4 = rig.send(&req);
    assert!(rig.waiting(s4), "inside the refresh margin the request waits for a new credential");
    let call = rig.one_mint_call();
    rig.answer(&call, token_reply("jti-2", T0 + 170, T0 + 50));
    assert_eq!(header(&rig.forwarded(s4), "authorization"), Some(format!("Bearer {}", minted_jwt("jti-2", T0 + 170))));
    assert_eq!(rig.metric("mandate.minter.calls"), 3);
    assert_eq!((rig.metric("mandate.cache.credential.hit"), rig.metric("mandate.cache.credential.miss")), (1, 3));
    no_warnings(&rig);
}

#[test]
fn cache_disabled_means_an_exchange_per_request() {
    let m = json!({"cluster": MINTER, "cache_size": 0});
    let Some(mut rig) = start("cache_disabled_means_an_exchange_per_request", m) else { return };
    for i in 0..3 {
        let s = rig.send(&rig.tickets());
        let call = rig.one_mint_call();
        rig.answer(&call, token_reply(&format!("jti-{i}"), T0 + 300, T0));
        rig.forwarded(s);
    }
    assert_eq!(rig.metric("mandate.minter.calls"), 3);
}

// ------------------------------------------------------------------ single flight

#[test]
fn single_flight_one_exchange_completes_every_waiter() {
    let Some(mut rig) = start("single_flight_one_exchange_completes_every_waiter", minter()) else { return };
    let req = rig.tickets().task("T-1");
    let s1 = rig.send(&req);
    let s2 = rig.send(&req);
    let s3 = rig.send(&req.clone().task("T-2"));
    let calls = rig.mint_calls();
    assert_eq!(calls.len(), 2, "one exchange per credential key: {calls:?}");
    let c1 = calls.iter().find(|c| c.context_id == s1.0).expect("the leader dispatched").clone();
    let c3 = calls.iter().find(|c| c.context_id == s3.0).expect("another task, its own exchange").clone();
    assert!(form(&c3).contains(&("task".into(), "T-2".into())));
    for s in [s1, s2, s3] {
        assert!(rig.waiting(s), "stream {} waits", s.0);
    }

    rig.vm.advance(Duration::from_millis(120)).unwrap();
    rig.answer(&c1, token_reply("jti-1", T0 + 120, T0));
    let (up1, up2) = (rig.forwarded(s1), rig.forwarded(s2));
    let want = format!("Bearer {}", minted_jwt("jti-1", T0 + 120));
    assert_eq!(header(&up1, "authorization").as_deref(), Some(want.as_str()));
    assert_eq!(header(&up2, "authorization").as_deref(), Some(want.as_str()), "the waiter gets the same credential");
    assert_eq!(rig.vm.stream(s2).request_continues, 1);
    assert!(rig.waiting(s3), "the other task's request still waits");
    let (id1, id2) = (header(&up1, "x-mandate-decision-id").unwrap(), header(&up2, "x-mandate-decision-id").unwrap());
    assert_ne!(id1, id2, "one decision each");
    // Each stream's filter state is its own record.
    assert_eq!(rig.state_record(s1).unwrap()["decision_id"], json!(id1));
    assert_eq!(rig.state_record(s2).unwrap()["decision_id"], json!(id2));
    assert_eq!(rig.records().len(), 2);
    assert_eq!(rig.metric("mandate.minter.calls"), 1, "one exchange answered, counted once");
    assert_eq!(rig.vm.host().histogram("mandate.minter.latency_ms"), Some(vec![120]));

    rig.answer(&c3, token_reply("jti-3", T0 + 120, T0));
    assert_eq!(header(&rig.forwarded(s3), "authorization"), Some(format!("Bearer {}", minted_jwt("jti-3", T0 + 120))));

    // Afterwards the same key is a cache hit.
    let s4 = rig.send(&req);
    assert!(rig.mint_calls().is_empty());
    assert_eq!(header(&rig.forwarded(s4), "authorization").as_deref(), Some(want.as_str()));
    assert_eq!(rig.records().len(), 4);
    no_warnings(&rig);
}

#[test]
fn single_flight_failure_fails_every_waiter_and_the_next_request_retries() {
    let Some(mut rig) = start("single_flight_failure_fails_every_waiter", minter()) else { return };
    let req = rig.tickets();
    let streams: Vec<_> = (0..3).map(|_| rig.send(&req)).collect();
    let call = rig.one_mint_call();
    rig.answer(&call, CalloutReply::Failure);
    for s in &streams {
        rig.denied(*s, 503, "credential_unavailable");
    }
    assert_eq!(rig.metric("mandate.minter.failures"), 1, "one failed exchange");
    assert_eq!(rig.metric("mandate.decisions.deny.credential_unavailable"), 3, "three denied requests");
    // The failure is not cached: the next request asks again.
    let s = rig.send(&req);
    let call = rig.one_mint_call();
    rig.answer(&call, token_reply("jti-ok", T0 + 120, T0));
    rig.forwarded(s);
    no_warnings(&rig);
}

#[test]
fn leader_that_leaves_fails_its_waiters_closed() {
    let Some(mut rig) = start("leader_that_leaves_fails_its_waiters_closed", minter()) else { return };
    let req = rig.tickets().task("T-1");
    let leader = rig.send(&req);
    let w1 = rig.send(&req);
    let w2 = rig.send(&req);
    assert_eq!(rig.mint_calls().len(), 1);

    // The client of the leading request goes away: Envoy cancels its call.
    rig.vm.finish_stream(leader).unwrap();
    assert!(rig.vm.pending_calls().is_empty(), "the leader's call is cancelled");
    for w in [w1, w2] {
        let r = rig.denied(w, 503, "credential_unavailable");
        assert!(!rig.waiting(w), "a waiter never hangs");
        let id = header(&r.headers, "x-mandate-decision-id").unwrap();
        assert_eq!(rig.state_record(w).unwrap()["decision_id"], json!(id));
    }
    // No stale flight: the next request leads a new exchange.
    let s = rig.send(&req);
    let call = rig.one_mint_call();
    assert_eq!(call.context_id, s.0);
    rig.answer(&call, token_reply("jti-1", T0 + 120, T0));
    rig.forwarded(s);
    no_warnings(&rig);
}

#[test]
fn waiter_that_leaves_is_dropped_from_the_flight() {
    let Some(mut rig) = start("waiter_that_leaves_is_dropped_from_the_flight", minter()) else { return };
    let req = rig.tickets();
    let leader = rig.send(&req);
    let gone = rig.send(&req);
    let stays = rig.send(&req);
    rig.vm.finish_stream(gone).unwrap();
    let call = rig.one_mint_call();
    rig.answer(&call, token_reply("jti-1", T0 + 120, T0));
    rig.forwarded(leader);
    rig.forwarded(stays);
    assert!(rig.vm.stream(gone).upstream.headers.is_none() && rig.vm.stream(gone).local_response.is_none());
    no_warnings(&rig);
}

// ------------------------------------------------------------------ failures

/// The secret-looking text the failing minter answers carry; it must never reach the caller.
const MINTER_SECRET: &str = "sk_fake_minter_internal_9f8e7d6c5b4a";

#[test]
fn unknown_minter_cluster_fails_closed() {
    let Some(mut rig) = start_with("unknown_minter_cluster_fails_closed", minter(), false) else { return };
    let s = rig.send(&rig.tickets());
    assert!(rig.vm.pending_calls().is_empty());
    let r = rig.denied(s, 503, "credential_unavailable");
    assert_eq!(header(&r.headers, "cache-control").as_deref(), Some("no-store"));
    assert_eq!(rig.metric("mandate.minter.failures"), 1);
    assert!(rig.vm.logged("cannot call minter cluster `minter`"), "{:?}", rig.vm.logs());
    let rec = rig.state_record(s).unwrap();
    assert_eq!((rec["effect"].as_str(), rec["reason"].as_str()), (Some("deny"), Some("credential_unavailable")));
    assert_eq!(rig.records().len(), 1);
}

/// Answers the minter may give that leave the filter without a credential. `true`: a
/// transport failure or a non-200 status (counted in `mandate.minter.failures` today).
fn failing_answers() -> Vec<(&'static str, bool, Option<CalloutReply>)> {
    let secret_body = json!({"error": "server_error", "error_description": format!("db password {MINTER_SECRET}")});
    vec![
        ("connection failure", true, Some(CalloutReply::Failure)),
        ("timeout", true, None),
        ("500 with a secret", true, Some(json_reply(500, &secret_body))),
        ("400 invalid_grant", true, Some(json_reply(400, &json!({"error": "invalid_grant", "error_description": format!("subject_token rejected {MINTER_SECRET}")})))),
        ("Envoy's 504", true, Some(CalloutReply::envoy_timeout_reply())),
        ("no healthy upstream", true, Some(CalloutReply::no_healthy_upstream())),
        ("malformed JSON", false, Some(CalloutReply::ok(200, &[], format!("{{\"access_token\": \"{MINTER_SECRET}\"")))),
        ("missing access_token", false, Some(json_reply(200, &json!({"token_type": "Bearer", "expires_in": 60, "note": MINTER_SECRET})))),
        ("missing expires_in", false, Some(json_reply(200, &json!({"access_token": MINTER_SECRET, "token_type": "Bearer"})))),
        ("access_token not a header value", false, Some(json_reply(200, &json!({"access_token": format!("{MINTER_SECRET}\r\nx-evil: 1"), "expires_in": 60})))),
        ("unexpected token type", false, Some(json_reply(200, &json!({"access_token": MINTER_SECRET, "issued_token_type": "urn:ietf:params:oauth:token-type:saml2", "expires_in": 60})))),
        ("legacy with a bad header name", false, Some(json_reply(200, &json!({"access_token": MINTER_SECRET, "expires_in": 60, "issued_token_type": "urn:mandate:token-type:static-secret", "token_type": "N_A", "mandate_header": "bad header"})))),
        ("legacy naming a pseudo-header", false, Some(json_reply(200, &json!({"access_token": MINTER_SECRET, "expires_in": 60, "issued_token_type": "urn:mandate:token-type:static-secret", "token_type": "N_A", "mandate_header": ":authority"})))),
        ("legacy naming a mandate header", false, Some(json_reply(200, &json!({"access_token": MINTER_SECRET, "expires_in": 60, "issued_token_type": "urn:mandate:token-type:static-secret", "token_type": "N_A", "mandate_header": "x-mandate-identity"})))),
        ("body over the limit", true, Some(CalloutReply::ok(200, &[], vec![b' '; 64 * 1024 + 1]))),
    ]
}

/// Sends a request, fails its exchange with `reply` (`None`: let it time out) and checks the
/// caller got a bare 503 `credential_unavailable` with nothing of the minter's answer in it.
fn fail_one(rig: &mut Rig, what: &str, reply: Option<CalloutReply>) {
    let s = rig.send(&rig.tickets());
    let call = rig.one_mint_call();
    match reply {
        Some(r) => rig.answer(&call, r),
        None => {
            rig.vm.advance(Duration::from_millis(299)).unwrap();
            assert!(rig.waiting(s), "{what}: not timed out before timeout_ms");
            rig.vm.advance(Duration::from_millis(1)).unwrap();
        }
    }
    let r = rig.denied(s, 503, "credential_unavailable");
    let st = rig.vm.stream(s);
    let body = String::from_utf8_lossy(&r.body).into_owned();
    let down = st.downstream.headers.clone().unwrap_or_default();
    for leak in [MINTER_SECRET, "server_error", "invalid_grant", "db password", "no healthy upstream", "x-evil"] {
        assert!(!body.contains(leak), "{what}: reply body leaks {leak:?}: {body}");
        for (k, v) in r.headers.iter().chain(down.iter()) {
            assert!(!k.contains(leak) && !String::from_utf8_lossy(v).contains(leak), "{what}: reply header {k} leaks {leak:?}");
        }
        assert!(!String::from_utf8_lossy(&st.downstream.body).contains(leak), "{what}: downstream body leaks");
    }
    assert!(!rig.vm.logs().iter().any(|l| l.message.contains(MINTER_SECRET)), "{what}: a log line carries the minter's answer");
    assert!(rig.mint_calls().is_empty(), "{what}");
    assert_eq!(rig.state_record(s).unwrap()["reason"], json!("credential_unavailable"), "{what}");
}

#[test]
fn every_minter_failure_is_503_and_the_answer_never_reaches_the_caller() {
    let Some(mut rig) = start("every_minter_failure_is_503", minter()) else { return };
    let answers = failing_answers();
    let n = answers.len() as i64;
    let mut counted = 0;
    for (what, _, reply) in answers {
        fail_one(&mut rig, what, reply);
        // Every failure, transport or unusable answer, is counted exactly once.
        counted += 1;
        assert_eq!(rig.metric("mandate.minter.failures"), counted, "{what}: counted once");
    }
    assert_eq!(rig.metric("mandate.decisions.allow"), 0, "nothing was allowed through");
    assert_eq!(rig.metric("mandate.decisions.deny.credential_unavailable"), n);
    assert_eq!(rig.metric("mandate.minter.calls"), n, "every exchange answered (or timed out) is a call");
    no_warnings(&rig);
}

#[test]
fn unusable_200_answer_is_counted_and_logged_as_a_minter_failure() {
    let Some(mut rig) = start("unusable_200_answer_is_counted_and_logged", minter()) else { return };
    let mut failures = 0;
    for (what, _, reply) in failing_answers() {
        let warnings_before = rig.vm.logs().iter().filter(|l| l.message.contains("credential exchange")).count();
        fail_one(&mut rig, what, reply);
        failures += 1;
        assert_eq!(rig.metric("mandate.minter.failures"), failures, "{what}: not counted as a minter failure");
        let warnings = rig.vm.logs().iter().filter(|l| l.message.contains("credential exchange")).count();
        assert_eq!(warnings, warnings_before + 1, "{what}: no log line says why the exchange failed");
    }
}

// ------------------------------------------------------------------ revocations

fn revocation_minter() -> Value {
    json!({"cluster": MINTER, "timeout_ms": 300, "refresh_margin_s": 10, "revocations": {"interval_ms": 500}})
}

fn feed(cursor: u64, entries: &[(&str, &str)]) -> CalloutReply {
    let revs: Vec<Value> = entries
        .iter()
        .enumerate()
        .map(|(i, (kind, value))| json!({"seq": cursor - (entries.len() - 1 - i) as u64, "kind": kind, "value": value, "at": T0}))
        .collect();
    json_reply(200, &json!({"cursor": cursor, "revocations": revs, "more": false}))
}

fn one_poll(rig: &Rig, since: u64) -> mandate_host_test::HttpCallout {
    let polls = rig.polls();
    assert_eq!(polls.len(), 1, "outstanding polls: {polls:?}");
    let p = polls.into_iter().next().unwrap();
    assert_eq!(p.context_id, rig.vm.root_id(), "polled by the root context");
    assert_eq!(p.upstream, MINTER);
    assert_eq!(header(&p.headers, ":method").as_deref(), Some("GET"));
    assert_eq!(header(&p.headers, ":path"), Some(format!("/revocations?since={since}")));
    assert_eq!(header(&p.headers, ":authority").as_deref(), Some(MINTER));
    assert!(p.body.is_empty());
    p
}

/// Sends the request and answers its exchange (if any) with a fresh token.
fn mint(rig: &mut Rig, req: &Req, jti: &str) -> String {
    let s = rig.send_minted(req, jti);
    header(&rig.forwarded(s), "authorization").unwrap()
}

#[test]
fn revocation_feed_is_polled_and_purges_credentials() {
    let Some(mut rig) = start("revocation_feed_is_polled_and_purges_credentials", revocation_minter()) else { return };
    assert_eq!(rig.vm.tick_period_ms(), 125, "ticks several times per poll interval");
    // The first poll goes out at configuration; ticks while it is in flight send no other.
    let p = one_poll(&rig, 0);
    rig.vm.advance(Duration::from_millis(500)).unwrap();
    assert_eq!(one_poll(&rig, 0).token, p.token);

    let t7 = rig.tickets().task("T-7");
    let t8 = rig.tickets().task("T-8");
    let cred7 = mint(&mut rig, &t7, "jti-7");
    let cred8 = mint(&mut rig, &t8, "jti-8");
    assert_eq!(mint(&mut rig, &t7, "unused"), cred7, "cached");
    assert_eq!(rig.metric("mandate.minter.calls"), 2);

    // Task T-7 ends.
    rig.answer(&p, feed(5, &[("task", "T-7")]));
    assert_eq!((rig.metric("mandate.revocations.polls"), rig.metric("mandate.revocations.received")), (1, 1));
    assert!(rig.vm.logged("1 revocation(s) applied; cursor 5"), "{:?}", rig.vm.logs());
    assert_eq!(rig.vm.metric("mandate.revocations.lag_s"), Some(0));
    let s = rig.send(&t7);
    rig.denied(s, 403, "task_revoked");
    assert!(rig.mint_calls().is_empty(), "a revoked task is never exchanged");
    // A signed intent naming the task is refused the same way.
    let it = rig.intent_token(&["ticket.read"], Some("T-7"));
    let s = rig.send(&rig.tickets().with("x-agent-intent-token", &it));
    rig.denied(s, 403, "task_revoked");
    // Other tasks keep their credential.
    assert_eq!(mint(&mut rig, &t8, "unused"), cred8);

    // The next poll asks from the cursor; a jti revocation purges that credential.
    rig.vm.advance(Duration::from_millis(500)).unwrap();
    let p = one_poll(&rig, 5);
    rig.answer(&p, feed(6, &[("jti", "jti-8")]));
    let s = rig.send(&t8);
    assert!(rig.waiting(s), "the revoked credential is gone: a new exchange");
    let c = rig.one_mint_call();
    rig.answer(&c, token_reply("jti-8b", T0 + 120, rig.now()));
    assert_ne!(header(&rig.forwarded(s), "authorization").unwrap(), cred8);

    // Failed polls are counted and polling goes on from the same cursor.
    rig.vm.advance(Duration::from_millis(500)).unwrap();
    let p = one_poll(&rig, 6);
    rig.answer(&p, json_reply(500, &json!({"error": "server_error"})));
    rig.vm.advance(Duration::from_millis(500)).unwrap();
    let p = one_poll(&rig, 6);
    rig.answer(&p, CalloutReply::Failure);
    rig.vm.advance(Duration::from_millis(500)).unwrap();
    let p = one_poll(&rig, 6);
    rig.answer(&p, CalloutReply::ok(200, &[], "not a feed"));
    assert_eq!(rig.metric("mandate.revocations.poll_failures"), 3);
    assert!(rig.vm.logged("revocation poll failed"), "{:?}", rig.vm.logs());
    rig.vm.advance(Duration::from_millis(500)).unwrap();
    let p = one_poll(&rig, 6);
    // A subject revocation refuses every request of that principal.
    rig.answer(&p, feed(7, &[("subject", AGENT)]));
    let s = rig.send(&t8);
    rig.denied(s, 403, "subject_revoked");
    assert_eq!(rig.metric("mandate.revocations.polls"), 3, "successful polls; failures are counted apart");
    assert_eq!(rig.metric("mandate.revocations.received"), 3);
    rig.vm.advance(Duration::from_millis(500)).unwrap();
    one_poll(&rig, 7);
    no_warnings(&rig);
}

#[test]
fn poll_that_times_out_is_retried() {
    let Some(mut rig) = start("poll_that_times_out_is_retried", revocation_minter()) else { return };
    let p = one_poll(&rig, 0);
    assert_eq!(p.timeout_ms, 1000, "polls get at least a second");
    rig.vm.advance(Duration::from_millis(1000)).unwrap();
    assert_eq!(rig.metric("mandate.revocations.poll_failures"), 1);
    // The timeout and the tick fall on the same instant; a new poll goes out at once or on the next tick.
    rig.vm.advance(Duration::from_millis(500)).unwrap();
    let p2 = one_poll(&rig, 0);
    assert_ne!(p2.token, p.token);
}

#[test]
fn poll_dispatch_failure_is_counted_and_retried() {
    // The minter cluster is unknown to the host: every poll fails to dispatch.
    let Some(mut rig) = start_with("poll_dispatch_failure_is_counted_and_retried", revocation_minter(), false) else { return };
    assert!(rig.vm.pending_calls().is_empty());
    assert_eq!(rig.metric("mandate.revocations.poll_failures"), 1);
    rig.vm.advance(Duration::from_millis(500)).unwrap();
    rig.vm.advance(Duration::from_millis(500)).unwrap();
    assert_eq!(rig.metric("mandate.revocations.poll_failures"), 3);
}

#[test]
fn revocation_received_during_an_exchange_is_honoured() {
    let Some(mut rig) = start("revocation_received_during_an_exchange_is_honoured", revocation_minter()) else { return };
    let p = one_poll(&rig, 0);
    let t7 = rig.tickets().task("T-7");
    let s = rig.send(&t7);
    let c = rig.one_mint_call();
    // The feed reports T-7 ended while its exchange is under way (the minter's concurrency
    // note: such a token is still issued, and "proxies still catch it" by task and jti).
    rig.answer(&p, feed(1, &[("task", "T-7")]));
    rig.answer(&c, token_reply("jti-7", T0 + 120, T0));
    assert!(rig.vm.stream(s).upstream.headers.is_none(), "a request for a revoked task went upstream");
    rig.denied(s, 403, "task_revoked");
}

#[test]
fn credential_revoked_by_jti_before_it_lands_is_not_used() {
    let Some(mut rig) = start("credential_revoked_by_jti_before_it_lands_is_not_used", revocation_minter()) else { return };
    let p = one_poll(&rig, 0);
    let req = rig.tickets().task("T-1");
    let s = rig.send(&req);
    let c = rig.one_mint_call();
    rig.answer(&p, feed(1, &[("jti", "jti-1")]));
    rig.answer(&c, token_reply("jti-1", T0 + 120, T0));
    // Whatever happens to this request, the revoked credential must not be reused.
    let _ = s;
    let s2 = rig.send(&req);
    assert!(rig.vm.stream(s2).upstream.headers.is_none(), "the revoked credential was reused from the cache");
}

// ------------------------------------------------------------------ legacy

#[test]
fn legacy_destination_gets_the_static_secret_and_is_marked_degraded() {
    let Some(mut rig) = start("legacy_destination_gets_the_static_secret", minter()) else { return };
    let secret = "sk_live_legacy_4c1d2e3f4a5b6c7d8e9f";
    let req = Req::new("POST", "old-crm.internal", "/sync").intent("crm.sync").bearer(&rig.svid());
    let s = rig.send(&req);
    let call = rig.one_mint_call();
    assert!(form(&call).contains(&("audience".into(), "legacy-crm".into())), "audience = the resource's name");
    let body = json!({"access_token": secret, "issued_token_type": "urn:mandate:token-type:static-secret", "token_type": "N_A",
                      "expires_in": 120, "mandate_header": "x-api-key", "mandate_scheme": "ApiKey"});
    rig.answer(&call, json_reply(200, &body));
    let up = rig.forwarded(s);
    assert_eq!(header(&up, "x-api-key").as_deref(), Some(secret), "the secret alone, no scheme");
    assert!(header(&up, "authorization").is_none(), "the SVID is stripped and no bearer is set");
    let rec = rig.state_record(s).unwrap();
    assert_eq!(rec["degraded"], json!("legacy_static_secret"));
    assert_eq!(rec["credential"], json!({"jti": null, "exp": T0 + 120, "kind": "legacy_static_secret"}));
    assert!(!rec.to_string().contains(secret));
    assert_eq!(rig.metric("mandate.degraded.legacy_static_secret"), 1);

    // Reused from the cache, still marked degraded.
    let s2 = rig.send(&req);
    assert_eq!(header(&rig.forwarded(s2), "x-api-key").as_deref(), Some(secret));
    assert_eq!(rig.state_record(s2).unwrap()["degraded"], json!("legacy_static_secret"));
    assert_eq!(rig.metric("mandate.degraded.legacy_static_secret"), 2);
    assert!(!rig.vm.logs().iter().any(|l| l.message.contains(secret)), "the secret is never logged");
    no_warnings(&rig);
}

#[test]
fn legacy_secret_for_authorization_keeps_its_scheme() {
    let Some(mut rig) = start("legacy_secret_for_authorization_keeps_its_scheme", minter()) else { return };
    let req = Req::new("POST", "old-crm.internal", "/sync").intent("crm.sync").bearer(&rig.svid());
    let s = rig.send(&req);
    let call = rig.one_mint_call();
    let body = json!({"access_token": "c3ZjOnB3", "issued_token_type": "urn:mandate:token-type:static-secret",
                      "token_type": "N_A", "expires_in": 120, "mandate_header": "authorization", "mandate_scheme": "Basic"});
    rig.answer(&call, json_reply(200, &body));
    let up = rig.forwarded(s);
    assert_eq!(header(&up, "authorization").as_deref(), Some("Basic c3ZjOnB3"));
    assert_eq!(up.iter().filter(|(k, _)| k == "authorization").count(), 1);
}

// ------------------------------------------------------------------ issue 11: no confused deputy

#[test]
fn host_header_cannot_choose_the_credential_audience() {
    // A catch-all allow for service workloads: before, a request to an unmatched host was minted
    // a credential whose audience was the `:authority` the caller chose (say, the payments API).
    let Some(mut rig) = start_configured("host_header_cannot_choose_the_credential_audience", minter(), true, |cfg| {
        cfg["policy"]["classes"].as_array_mut().unwrap().push(json!({"name": "svc", "principals": ["spiffe://example.org/svc/*"]}));
        cfg["policy"]["rules"].as_array_mut().unwrap().push(json!({"id": "services", "effect": "allow", "classes": ["svc"]}));
    }) else {
        return;
    };
    let svc = rig.svid_for("spiffe://example.org/svc/billing");
    let s = rig.send(&Req::get("payments.internal", "/transfer").bearer(&svc));
    assert!(rig.mint_calls().is_empty(), "no exchange for an audience the caller chose");
    rig.denied(s, 403, "no_resource_matched");
    // A matched resource without an explicit audience: its name, whatever the authority says.
    let s = rig.send(&Req::get("reports.internal:8443", "/q").bearer(&svc));
    let call = rig.one_mint_call();
    assert!(form(&call).contains(&("audience".into(), "reports".into())), "{:?}", form(&call));
    rig.answer(&call, token_reply("jti-r", T0 + 60, T0));
    rig.forwarded(s);
    no_warnings(&rig);
}
