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
    assert!(
        rig.vm.warnings().is_empty(),
        "host warnings: {:?}",
        rig.vm.warnings()
    );
}

// ------------------------------------------------------------------ the exchange

#[test]
fn allowed_request_pauses_and_posts_an_rfc8693_form_to_the_minter() {
    let Some(mut rig) = start("allowed_request_pauses_and_posts_an_rfc8693_form", minter()) else {
        return;
    };
    let svid = rig.svid();
    let s = rig.vm.new_stream().unwrap();
    let req = rig.tickets().task("T-1");
    let action = rig
        .vm
        .request_headers(
            s,
            req.headers.iter().map(|(k, v)| (k.as_str(), v.as_str())),
            true,
        )
        .unwrap();
    assert_eq!(
        action,
        Action::Pause,
        "the request waits for its credential"
    );
    assert!(rig.waiting(s));

    let call = rig.one_mint_call();
    assert_eq!(call.upstream, MINTER);
    assert_eq!(
        call.context_id, s.0,
        "dispatched by the request's own context"
    );
    assert_eq!(call.timeout_ms, 300);
    assert_eq!(header(&call.headers, ":method").as_deref(), Some("POST"));
    assert_eq!(header(&call.headers, ":path").as_deref(), Some("/token"));
    assert_eq!(
        header(&call.headers, ":authority").as_deref(),
        Some(MINTER),
        "authority defaults to the cluster"
    );
    assert_eq!(
        header(&call.headers, "content-type").as_deref(),
        Some("application/x-www-form-urlencoded")
    );
    assert_eq!(
        header(&call.headers, "accept").as_deref(),
        Some("application/json")
    );
    assert!(call.trailers.is_empty());

    let form = form(&call);
    let get = |name: &str| {
        let v: Vec<&String> = form
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v)
            .collect();
        assert!(v.len() <= 1, "{name} sent {} times", v.len());
        v.first().map(|s| s.as_str().to_string())
    };
    assert_eq!(
        get("grant_type").as_deref(),
        Some("urn:ietf:params:oauth:grant-type:token-exchange")
    );
    assert_eq!(
        get("subject_token").as_deref(),
        Some(svid.as_str()),
        "the caller's SVID, unchanged"
    );
    assert_eq!(get("subject_token_type").as_deref(), Some(JWT_TYPE));
    assert_eq!(
        get("audience").as_deref(),
        Some(TICKETS_AUD),
        "the resource's configured audience"
    );
    assert_eq!(
        get("scope").as_deref(),
        Some("tickets:read tickets:list"),
        "scopes space-separated"
    );
    assert_eq!(get("task").as_deref(), Some("T-1"));
    assert_eq!(get("intent").as_deref(), Some("ticket.read"));
    assert_eq!(
        get("requested_ttl").as_deref(),
        Some("120"),
        "the intent's ttl_s"
    );
    assert_eq!(form.len(), 8, "no other parameters: {form:?}");

    // Nothing is recorded until the request is finished.
    assert!(rig.records().is_empty(), "{:?}", rig.records());
    no_warnings(&rig);
}

#[test]
fn audience_defaults_to_the_resource_name_and_minter_settings_are_honoured() {
    let m = json!({"cluster": MINTER, "authority": "minter.internal", "path": "/oauth2/token", "timeout_ms": 750});
    let Some(mut rig) = start("audience_defaults_to_the_resource_name", m) else {
        return;
    };
    let req = Req::get("reports.internal", "/q3")
        .intent("report.read")
        .bearer(&rig.svid());
    let s = rig.send(&req);
    let calls = rig.vm.pending_calls_for(s);
    assert_eq!(calls.len(), 1, "{calls:?}");
    let call = &calls[0];
    assert_eq!((call.upstream.as_str(), call.timeout_ms), (MINTER, 750));
    assert_eq!(
        header(&call.headers, ":path").as_deref(),
        Some("/oauth2/token")
    );
    assert_eq!(
        header(&call.headers, ":authority").as_deref(),
        Some("minter.internal")
    );
    let form = form(call);
    let names: Vec<&str> = form.iter().map(|(k, _)| k.as_str()).collect();
    assert!(
        form.contains(&("audience".into(), "reports".into())),
        "{form:?}"
    );
    assert!(
        form.contains(&("scope".into(), "reports:read".into())),
        "{form:?}"
    );
    assert!(
        form.contains(&("requested_ttl".into(), "60".into())),
        "{form:?}"
    );
    assert!(
        !names.contains(&"task"),
        "no task declared, none sent: {form:?}"
    );
}

// ------------------------------------------------------------------ injection

#[test]
fn minted_token_is_injected_and_the_callers_credentials_are_stripped() {
    let Some(mut rig) = start("minted_token_is_injected", minter()) else {
        return;
    };
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
    rig.answer(&call, token_reply_for(&call, "jti-1", T0 + 120, T0));

    let up = rig.forwarded(s);
    assert_eq!(
        rig.vm.stream(s).request_continues,
        1,
        "resumed exactly once"
    );
    assert_eq!(
        header(&up, "authorization"),
        Some(format!(
            "Bearer {}",
            minted_jwt_for("jti-1", T0 + 120, TICKETS_AUD, Some("T-1"))
        ))
    );
    assert_eq!(
        up.iter().filter(|(k, _)| k == "authorization").count(),
        1,
        "one authorization header"
    );
    assert!(
        header(&up, "x-agent-intent-token").is_none(),
        "the intent token is a credential: stripped"
    );
    assert!(
        !up.iter()
            .any(|(_, v)| String::from_utf8_lossy(v).contains(&svid)),
        "the SVID never goes upstream"
    );
    assert_eq!(
        header(&up, "x-mandate-identity").as_deref(),
        Some(AGENT),
        "spoofed identity replaced"
    );
    let id = header(&up, "x-mandate-decision-id").expect("decision id upstream");
    assert_ne!(id, "forged");
    assert_eq!(
        up.iter()
            .filter(|(k, _)| k == "x-mandate-decision-id")
            .count(),
        1
    );
    assert_eq!(
        header(&up, "x-request-id").as_deref(),
        Some("req-1"),
        "unrelated headers pass"
    );

    let records = rig.records();
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0]["decision_id"], json!(id));
    assert_eq!(
        records[0]["credential"],
        json!({"jti": "jti-1", "exp": T0 + 120, "kind": "jwt"})
    );
    assert_eq!(
        rig.state_record(s).as_ref(),
        Some(&records[0]),
        "filter state carries the same record"
    );
    assert_eq!(
        (
            rig.metric("mandate.minter.calls"),
            rig.metric("mandate.minter.failures")
        ),
        (1, 0)
    );
    no_warnings(&rig);
}

#[test]
fn minted_jwt_exp_caps_expires_in() {
    // The token says it expires sooner than expires_in claims: the cache believes the token.
    let Some(mut rig) = start("minted_jwt_exp_caps_expires_in", minter()) else {
        return;
    };
    let s = rig.send(&rig.tickets());
    let body = json!({"access_token": minted_jwt("jti-short", T0 + 30), "issued_token_type": JWT_TYPE,
                      "token_type": "Bearer", "expires_in": 300});
    let call = rig.one_mint_call();
    rig.answer(&call, json_reply(200, &body));
    rig.forwarded(s);
    assert_eq!(rig.records()[0]["credential"]["exp"], json!(T0 + 30));
    rig.vm.advance(Duration::from_secs(20)).unwrap();
    let s2 = rig.send(&rig.tickets());
    assert!(
        rig.waiting(s2),
        "20 s + 10 s margin reaches the token's own exp: refreshed"
    );
    assert_eq!(rig.mint_calls().len(), 1);
}

// ------------------------------------------------------------------ cache

#[test]
fn credential_is_reused_until_the_refresh_margin() {
    let Some(mut rig) = start("credential_is_reused_until_the_refresh_margin", minter()) else {
        return;
    };
    let req = rig.tickets().task("T-1");
    let s1 = rig.send(&req);
    let call = rig.one_mint_call();
    rig.answer(&call, token_reply_for(&call, "jti-1", T0 + 60, T0));
    let first = header(&rig.forwarded(s1), "authorization").unwrap();

    // 49 s later (exp - 11 s, outside the 10 s margin): reused, no exchange. The revocation
    // feed answers meanwhile (a silent feed would make the filter stale after 30 s).
    rig.advance_with_feed(Duration::from_secs(49));
    let s2 = rig.send(&req);
    assert!(
        rig.mint_calls().is_empty(),
        "no exchange for a cached credential"
    );
    let up2 = rig.forwarded(s2);
    assert_eq!(header(&up2, "authorization").as_ref(), Some(&first));
    assert_ne!(
        header(&up2, "x-mandate-decision-id"),
        header(&rig.forwarded(s1), "x-mandate-decision-id"),
        "a new decision id each time"
    );
    let rec = rig.state_record(s2).unwrap();
    assert_eq!(rec["cache"]["credential"], json!(true));
    assert_eq!(rec["credential"]["jti"], json!("jti-1"));
    assert_eq!(
        (
            rig.metric("mandate.cache.credential.hit"),
            rig.metric("mandate.cache.credential.miss")
        ),
        (1, 1)
    );

    // A different audience, scopes or task is a different credential.
    let s3 = rig.send(
        &Req::get("reports.internal", "/x")
            .intent("report.read")
            .task("T-1")
            .bearer(&rig.svid()),
    );
    assert!(rig.waiting(s3));
    let c3 = rig.one_mint_call();
    rig.answer(
        &c3,
        token_reply_for(&c3, "jti-r", rig.now() + 60, rig.now()),
    );
    rig.forwarded(s3);

    // At exp - 10 s (inside the margin): a fresh exchange.
    rig.vm.advance(Duration::from_secs(1)).unwrap();
    assert_eq!(rig.now(), T0 + 50);
    let s4 = rig.send(&req);
    assert!(
        rig.waiting(s4),
        "inside the refresh margin the request waits for a new credential"
    );
    let call = rig.one_mint_call();
    rig.answer(&call, token_reply_for(&call, "jti-2", T0 + 170, T0 + 50));
    assert_eq!(
        header(&rig.forwarded(s4), "authorization"),
        Some(format!(
            "Bearer {}",
            minted_jwt_for("jti-2", T0 + 170, TICKETS_AUD, Some("T-1"))
        ))
    );
    assert_eq!(rig.metric("mandate.minter.calls"), 3);
    assert_eq!(
        (
            rig.metric("mandate.cache.credential.hit"),
            rig.metric("mandate.cache.credential.miss")
        ),
        (1, 3)
    );
    no_warnings(&rig);
}

#[test]
fn cache_disabled_means_an_exchange_per_request() {
    let m = json!({"cluster": MINTER, "cache_size": 0});
    let Some(mut rig) = start("cache_disabled_means_an_exchange_per_request", m) else {
        return;
    };
    for i in 0..3 {
        let s = rig.send(&rig.tickets());
        let call = rig.one_mint_call();
        rig.answer(
            &call,
            token_reply_for(&call, &format!("jti-{i}"), T0 + 300, T0),
        );
        rig.forwarded(s);
    }
    assert_eq!(rig.metric("mandate.minter.calls"), 3);
}

// ------------------------------------------------------------------ single flight

#[test]
fn single_flight_one_exchange_completes_every_waiter() {
    let Some(mut rig) = start(
        "single_flight_one_exchange_completes_every_waiter",
        minter(),
    ) else {
        return;
    };
    let req = rig.tickets().task("T-1");
    let s1 = rig.send(&req);
    let s2 = rig.send(&req);
    let s3 = rig.send(&req.clone().task("T-2"));
    let calls = rig.mint_calls();
    assert_eq!(calls.len(), 2, "one exchange per credential key: {calls:?}");
    let c1 = calls
        .iter()
        .find(|c| c.context_id == s1.0)
        .expect("the leader dispatched")
        .clone();
    let c3 = calls
        .iter()
        .find(|c| c.context_id == s3.0)
        .expect("another task, its own exchange")
        .clone();
    assert!(form(&c3).contains(&("task".into(), "T-2".into())));
    for s in [s1, s2, s3] {
        assert!(rig.waiting(s), "stream {} waits", s.0);
    }

    rig.vm.advance(Duration::from_millis(120)).unwrap();
    rig.answer(&c1, token_reply_for(&c1, "jti-1", T0 + 120, T0));
    let (up1, up2) = (rig.forwarded(s1), rig.forwarded(s2));
    let want = format!(
        "Bearer {}",
        minted_jwt_for("jti-1", T0 + 120, TICKETS_AUD, Some("T-1"))
    );
    assert_eq!(
        header(&up1, "authorization").as_deref(),
        Some(want.as_str())
    );
    assert_eq!(
        header(&up2, "authorization").as_deref(),
        Some(want.as_str()),
        "the waiter gets the same credential"
    );
    assert_eq!(rig.vm.stream(s2).request_continues, 1);
    assert!(rig.waiting(s3), "the other task's request still waits");
    let (id1, id2) = (
        header(&up1, "x-mandate-decision-id").unwrap(),
        header(&up2, "x-mandate-decision-id").unwrap(),
    );
    assert_ne!(id1, id2, "one decision each");
    // Each stream's filter state is its own record.
    assert_eq!(rig.state_record(s1).unwrap()["decision_id"], json!(id1));
    assert_eq!(rig.state_record(s2).unwrap()["decision_id"], json!(id2));
    assert_eq!(rig.records().len(), 2);
    assert_eq!(
        rig.metric("mandate.minter.calls"),
        1,
        "one exchange answered, counted once"
    );
    assert_eq!(
        rig.vm.host().histogram("mandate.minter.latency_ms"),
        Some(vec![120])
    );

    rig.answer(&c3, token_reply_for(&c3, "jti-3", T0 + 120, T0));
    assert_eq!(
        header(&rig.forwarded(s3), "authorization"),
        Some(format!(
            "Bearer {}",
            minted_jwt_for("jti-3", T0 + 120, TICKETS_AUD, Some("T-2"))
        ))
    );

    // Afterwards the same key is a cache hit.
    let s4 = rig.send(&req);
    assert!(rig.mint_calls().is_empty());
    assert_eq!(
        header(&rig.forwarded(s4), "authorization").as_deref(),
        Some(want.as_str())
    );
    assert_eq!(rig.records().len(), 4);
    no_warnings(&rig);
}

#[test]
fn single_flight_failure_fails_every_waiter_and_the_next_request_retries() {
    let Some(mut rig) = start("single_flight_failure_fails_every_waiter", minter()) else {
        return;
    };
    let req = rig.tickets();
    let streams: Vec<_> = (0..3).map(|_| rig.send(&req)).collect();
    let call = rig.one_mint_call();
    rig.answer(&call, CalloutReply::Failure);
    for s in &streams {
        rig.denied(*s, 503, "credential_unavailable");
    }
    assert_eq!(
        rig.metric("mandate.minter.failures"),
        1,
        "one failed exchange"
    );
    assert_eq!(
        rig.metric("mandate.decisions.deny.credential_unavailable"),
        3,
        "three denied requests"
    );
    // The failure is not cached: the next request asks again.
    let s = rig.send(&req);
    let call = rig.one_mint_call();
    rig.answer(&call, token_reply_for(&call, "jti-ok", T0 + 120, T0));
    rig.forwarded(s);
    no_warnings(&rig);
}

#[test]
fn leader_that_leaves_fails_its_waiters_closed() {
    let Some(mut rig) = start("leader_that_leaves_fails_its_waiters_closed", minter()) else {
        return;
    };
    let req = rig.tickets().task("T-1");
    let leader = rig.send(&req);
    let w1 = rig.send(&req);
    let w2 = rig.send(&req);
    assert_eq!(rig.mint_calls().len(), 1);

    // The client of the leading request goes away: Envoy cancels its call.
    rig.vm.finish_stream(leader).unwrap();
    assert!(
        rig.vm.pending_calls().is_empty(),
        "the leader's call is cancelled"
    );
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
    rig.answer(&call, token_reply_for(&call, "jti-1", T0 + 120, T0));
    rig.forwarded(s);
    no_warnings(&rig);
}

#[test]
fn waiter_that_leaves_is_dropped_from_the_flight() {
    let Some(mut rig) = start("waiter_that_leaves_is_dropped_from_the_flight", minter()) else {
        return;
    };
    let req = rig.tickets();
    let leader = rig.send(&req);
    let gone = rig.send(&req);
    let stays = rig.send(&req);
    rig.vm.finish_stream(gone).unwrap();
    let call = rig.one_mint_call();
    rig.answer(&call, token_reply_for(&call, "jti-1", T0 + 120, T0));
    rig.forwarded(leader);
    rig.forwarded(stays);
    assert!(
        rig.vm.stream(gone).upstream.headers.is_none()
            && rig.vm.stream(gone).local_response.is_none()
    );
    no_warnings(&rig);
}

// ------------------------------------------------------------------ failures

/// The secret-looking text the failing minter answers carry; it must never reach the caller.
const MINTER_SECRET: &str = "sk_fake_minter_internal_9f8e7d6c5b4a";

#[test]
fn unknown_minter_cluster_fails_closed() {
    let Some(mut rig) = start_with("unknown_minter_cluster_fails_closed", minter(), false) else {
        return;
    };
    let s = rig.send(&rig.tickets());
    assert!(rig.vm.pending_calls().is_empty());
    let r = rig.denied(s, 503, "credential_unavailable");
    assert_eq!(
        header(&r.headers, "cache-control").as_deref(),
        Some("no-store")
    );
    assert_eq!(rig.metric("mandate.minter.failures"), 1);
    assert!(
        rig.vm.logged("cannot call minter cluster `minter`"),
        "{:?}",
        rig.vm.logs()
    );
    let rec = rig.state_record(s).unwrap();
    assert_eq!(
        (rec["effect"].as_str(), rec["reason"].as_str()),
        (Some("deny"), Some("credential_unavailable"))
    );
    assert_eq!(rig.records().len(), 1);
}

/// Answers the minter may give that leave the filter without a credential. `true`: a
/// transport failure or a non-200 status (counted in `mandate.minter.failures` today).
fn failing_answers() -> Vec<(&'static str, bool, Option<CalloutReply>)> {
    let secret_body = json!({"error": "server_error", "error_description": format!("db password {MINTER_SECRET}")});
    vec![
        ("connection failure", true, Some(CalloutReply::Failure)),
        ("timeout", true, None),
        (
            "500 with a secret",
            true,
            Some(json_reply(500, &secret_body)),
        ),
        (
            "400 invalid_grant",
            true,
            Some(json_reply(
                400,
                &json!({"error": "invalid_grant", "error_description": format!("subject_token rejected {MINTER_SECRET}")}),
            )),
        ),
        (
            "Envoy's 504",
            true,
            Some(CalloutReply::envoy_timeout_reply()),
        ),
        (
            "no healthy upstream",
            true,
            Some(CalloutReply::no_healthy_upstream()),
        ),
        (
            "malformed JSON",
            false,
            Some(CalloutReply::ok(
                200,
                &[],
                format!("{{\"access_token\": \"{MINTER_SECRET}\""),
            )),
        ),
        (
            "missing access_token",
            false,
            Some(json_reply(
                200,
                &json!({"token_type": "Bearer", "expires_in": 60, "note": MINTER_SECRET}),
            )),
        ),
        (
            "missing expires_in",
            false,
            Some(json_reply(
                200,
                &json!({"access_token": MINTER_SECRET, "token_type": "Bearer"}),
            )),
        ),
        (
            "access_token not a header value",
            false,
            Some(json_reply(
                200,
                &json!({"access_token": format!("{MINTER_SECRET}\r\nx-evil: 1"), "expires_in": 60}),
            )),
        ),
        (
            "unexpected token type",
            false,
            Some(json_reply(
                200,
                &json!({"access_token": MINTER_SECRET, "issued_token_type": "urn:ietf:params:oauth:token-type:saml2", "expires_in": 60}),
            )),
        ),
        (
            "legacy with a bad header name",
            false,
            Some(json_reply(
                200,
                &json!({"access_token": MINTER_SECRET, "expires_in": 60, "issued_token_type": "urn:mandate:token-type:static-secret", "token_type": "N_A", "mandate_header": "bad header"}),
            )),
        ),
        (
            "legacy naming a pseudo-header",
            false,
            Some(json_reply(
                200,
                &json!({"access_token": MINTER_SECRET, "expires_in": 60, "issued_token_type": "urn:mandate:token-type:static-secret", "token_type": "N_A", "mandate_header": ":authority"}),
            )),
        ),
        (
            "legacy naming a mandate header",
            false,
            Some(json_reply(
                200,
                &json!({"access_token": MINTER_SECRET, "expires_in": 60, "issued_token_type": "urn:mandate:token-type:static-secret", "token_type": "N_A", "mandate_header": "x-mandate-identity"}),
            )),
        ),
        (
            "body over the limit",
            true,
            Some(CalloutReply::ok(200, &[], vec![b' '; 64 * 1024 + 1])),
        ),
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
    for leak in [
        MINTER_SECRET,
        "server_error",
        "invalid_grant",
        "db password",
        "no healthy upstream",
        "x-evil",
    ] {
        assert!(
            !body.contains(leak),
            "{what}: reply body leaks {leak:?}: {body}"
        );
        for (k, v) in r.headers.iter().chain(down.iter()) {
            assert!(
                !k.contains(leak) && !String::from_utf8_lossy(v).contains(leak),
                "{what}: reply header {k} leaks {leak:?}"
            );
        }
        assert!(
            !String::from_utf8_lossy(&st.downstream.body).contains(leak),
            "{what}: downstream body leaks"
        );
    }
    assert!(
        !rig.vm
            .logs()
            .iter()
            .any(|l| l.message.contains(MINTER_SECRET)),
        "{what}: a log line carries the minter's answer"
    );
    assert!(rig.mint_calls().is_empty(), "{what}");
    assert_eq!(
        rig.state_record(s).unwrap()["reason"],
        json!("credential_unavailable"),
        "{what}"
    );
}

#[test]
fn every_minter_failure_is_503_and_the_answer_never_reaches_the_caller() {
    let Some(mut rig) = start("every_minter_failure_is_503", minter()) else {
        return;
    };
    let answers = failing_answers();
    let n = answers.len() as i64;
    let mut counted = 0;
    for (what, _, reply) in answers {
        fail_one(&mut rig, what, reply);
        // Every failure, transport or unusable answer, is counted exactly once.
        counted += 1;
        assert_eq!(
            rig.metric("mandate.minter.failures"),
            counted,
            "{what}: counted once"
        );
    }
    assert_eq!(
        rig.metric("mandate.decisions.allow"),
        0,
        "nothing was allowed through"
    );
    assert_eq!(
        rig.metric("mandate.decisions.deny.credential_unavailable"),
        n
    );
    assert_eq!(
        rig.metric("mandate.minter.calls"),
        n,
        "every exchange answered (or timed out) is a call"
    );
    no_warnings(&rig);
}

#[test]
fn unusable_200_answer_is_counted_and_logged_as_a_minter_failure() {
    let Some(mut rig) = start("unusable_200_answer_is_counted_and_logged", minter()) else {
        return;
    };
    let mut failures = 0;
    for (what, _, reply) in failing_answers() {
        let warnings_before = rig
            .vm
            .logs()
            .iter()
            .filter(|l| l.message.contains("credential exchange"))
            .count();
        fail_one(&mut rig, what, reply);
        failures += 1;
        assert_eq!(
            rig.metric("mandate.minter.failures"),
            failures,
            "{what}: not counted as a minter failure"
        );
        let warnings = rig
            .vm
            .logs()
            .iter()
            .filter(|l| l.message.contains("credential exchange"))
            .count();
        assert_eq!(
            warnings,
            warnings_before + 1,
            "{what}: no log line says why the exchange failed"
        );
    }
}

// ------------------------------------------------------------------ revocations

fn revocation_minter() -> Value {
    json!({"cluster": MINTER, "timeout_ms": 300, "refresh_margin_s": 10, "revocations": {"interval_ms": 500}})
}

const LAG_GAUGE: &str = "mandate.revocations.lag_s.vm0";

fn feed_page(epoch: &str, cursor: u64, entries: &[(&str, &str)], more: bool) -> CalloutReply {
    let revs: Vec<Value> = entries
        .iter()
        .enumerate()
        .map(|(i, (kind, value))| json!({"seq": cursor - (entries.len() - 1 - i) as u64, "kind": kind, "value": value, "at": T0}))
        .collect();
    json_reply(
        200,
        &json!({"epoch": epoch, "cursor": cursor, "reset": false, "revocations": revs, "more": more}),
    )
}

fn feed(cursor: u64, entries: &[(&str, &str)]) -> CalloutReply {
    feed_page("E1", cursor, entries, false)
}

/// The query of a poll, as (name, value) pairs.
fn poll_query(p: &mandate_host_test::HttpCallout) -> Vec<(String, String)> {
    let path = header(&p.headers, ":path").unwrap();
    let (base, q) = path.split_once('?').expect("a query");
    assert_eq!(base, "/revocations");
    q.split('&')
        .map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .unwrap()
        })
        .collect()
}

/// The one outstanding poll; it asks from `since` in `epoch` (none before the first answer).
fn one_poll_in(rig: &Rig, since: u64, epoch: Option<&str>) -> mandate_host_test::HttpCallout {
    let polls = rig.polls();
    assert_eq!(polls.len(), 1, "outstanding polls: {polls:?}");
    let p = polls.into_iter().next().unwrap();
    assert_eq!(p.context_id, rig.vm.root_id(), "polled by the root context");
    assert_eq!(p.upstream, MINTER);
    assert_eq!(header(&p.headers, ":method").as_deref(), Some("GET"));
    assert_eq!(header(&p.headers, ":authority").as_deref(), Some(MINTER));
    assert!(p.body.is_empty());
    let mut want = vec![("since".to_string(), since.to_string())];
    if let Some(e) = epoch {
        want.push(("epoch".into(), e.into()));
    }
    want.push(("max_bytes".into(), "196608".into()));
    assert_eq!(poll_query(&p), want);
    p
}

fn one_poll(rig: &Rig, since: u64) -> mandate_host_test::HttpCallout {
    one_poll_in(rig, since, (since > 0).then_some("E1"))
}

/// Sends the request and answers its exchange (if any) with a fresh token.
fn mint(rig: &mut Rig, req: &Req, jti: &str) -> String {
    let s = rig.send_minted(req, jti);
    header(&rig.forwarded(s), "authorization").unwrap()
}

/// Serves one request (so the VM starts polling) and lets the first poll go out.
fn start_polling(rig: &mut Rig) -> mandate_host_test::HttpCallout {
    let s = rig.send_minted(&rig.tickets().task("T-0"), "jti-0");
    rig.forwarded(s);
    rig.vm.advance(Duration::from_millis(125)).unwrap();
    one_poll_in(rig, 0, None)
}

#[test]
fn revocation_feed_is_polled_and_purges_credentials() {
    let Some(mut rig) = start(
        "revocation_feed_is_polled_and_purges_credentials",
        revocation_minter(),
    ) else {
        return;
    };
    assert_eq!(
        rig.vm.tick_period_ms(),
        125,
        "ticks several times per poll interval"
    );
    let t7 = rig.tickets().task("T-7");
    let t8 = rig.tickets().task("T-8");
    let cred7 = mint(&mut rig, &t7, "jti-7");
    let cred8 = mint(&mut rig, &t8, "jti-8");
    assert_eq!(mint(&mut rig, &t7, "unused"), cred7, "cached");
    assert_eq!(rig.metric("mandate.minter.calls"), 2);
    // Polling started with the first request; ticks while the poll is in flight send no other.
    rig.vm.advance(Duration::from_millis(125)).unwrap();
    let p = one_poll_in(&rig, 0, None);
    rig.vm.advance(Duration::from_millis(500)).unwrap();
    assert_eq!(one_poll_in(&rig, 0, None).token, p.token);

    // Task T-7 ends.
    rig.answer(&p, feed(5, &[("task", "T-7")]));
    assert_eq!(
        (
            rig.metric("mandate.revocations.polls"),
            rig.metric("mandate.revocations.received")
        ),
        (1, 1)
    );
    assert!(
        rig.vm.logged("1 revocation(s) applied; cursor 5"),
        "{:?}",
        rig.vm.logs()
    );
    assert_eq!(rig.vm.metric(LAG_GAUGE), Some(0));
    let s = rig.send(&t7);
    rig.denied(s, 403, "task_revoked");
    assert!(
        rig.mint_calls().is_empty(),
        "a revoked task is never exchanged"
    );
    // A signed intent naming the task is refused the same way.
    let it = rig.intent_token(&["ticket.read"], Some("T-7"));
    let s = rig.send(&rig.tickets().with("x-agent-intent-token", &it));
    rig.denied(s, 403, "task_revoked");
    // Other tasks keep their credential.
    assert_eq!(mint(&mut rig, &t8, "unused"), cred8);

    // The next poll asks from the cursor in the feed's epoch; a jti revocation purges that credential.
    rig.vm.advance(Duration::from_millis(500)).unwrap();
    let p = one_poll(&rig, 5);
    rig.answer(&p, feed(6, &[("jti", "jti-8")]));
    let s = rig.send(&t8);
    assert!(
        rig.waiting(s),
        "the revoked credential is gone: a new exchange"
    );
    let c = rig.one_mint_call();
    rig.answer(&c, token_reply_for(&c, "jti-8b", T0 + 120, rig.now()));
    assert_ne!(header(&rig.forwarded(s), "authorization").unwrap(), cred8);

    // Failed polls are counted and polling goes on from the same cursor, backing off.
    rig.vm.advance(Duration::from_millis(500)).unwrap();
    let p = one_poll(&rig, 6);
    rig.answer(&p, json_reply(500, &json!({"error": "server_error"})));
    rig.vm.advance(Duration::from_millis(500)).unwrap();
    let p = one_poll(&rig, 6);
    rig.answer(&p, CalloutReply::Failure);
    rig.vm.advance(Duration::from_millis(500)).unwrap();
    assert!(
        rig.polls().is_empty(),
        "second failure: the retry waits 1 s"
    );
    rig.vm.advance(Duration::from_millis(500)).unwrap();
    let p = one_poll(&rig, 6);
    rig.answer(&p, CalloutReply::ok(200, &[], "not a feed"));
    assert_eq!(rig.metric("mandate.revocations.poll_failures"), 3);
    assert!(
        rig.vm.logged("revocation poll failed"),
        "{:?}",
        rig.vm.logs()
    );
    rig.vm.advance(Duration::from_millis(2000)).unwrap();
    let p = one_poll(&rig, 6);
    // A subject revocation refuses every request of that principal.
    rig.answer(&p, feed(7, &[("subject", AGENT)]));
    let s = rig.send(&t8);
    rig.denied(s, 403, "subject_revoked");
    assert_eq!(
        rig.metric("mandate.revocations.polls"),
        3,
        "successful polls; failures are counted apart"
    );
    assert_eq!(rig.metric("mandate.revocations.received"), 3);
    rig.vm.advance(Duration::from_millis(500)).unwrap();
    one_poll(&rig, 7);
    no_warnings(&rig);
}

#[test]
fn main_thread_vm_that_serves_no_requests_never_polls() {
    // Envoy's main-thread VM ticks like a worker but never serves a request.
    let Some(mut rig) = start(
        "main_thread_vm_that_serves_no_requests_never_polls",
        revocation_minter(),
    ) else {
        return;
    };
    assert_eq!(
        rig.vm.metric(LAG_GAUGE),
        Some(0),
        "the lag gauge exists from configuration on"
    );
    for _ in 0..20 {
        rig.vm.advance(Duration::from_millis(500)).unwrap();
    }
    assert!(rig.polls().is_empty(), "{:?}", rig.polls());
    assert_eq!(rig.metric("mandate.revocations.poll_failures"), 0);
    assert_eq!(
        rig.vm.metric(LAG_GAUGE),
        Some(0),
        "a VM that decides nothing is not stale"
    );
    // Its first request starts polling, and its staleness clock.
    start_polling(&mut rig);
    rig.vm.advance(Duration::from_millis(2000)).unwrap();
    assert_eq!(rig.vm.metric(LAG_GAUGE), Some(2));
}

#[test]
fn poll_that_times_out_is_retried() {
    let Some(mut rig) = start("poll_that_times_out_is_retried", revocation_minter()) else {
        return;
    };
    let p = start_polling(&mut rig);
    assert_eq!(p.timeout_ms, 1000, "polls get at least a second");
    rig.vm.advance(Duration::from_millis(1000)).unwrap();
    assert_eq!(rig.metric("mandate.revocations.poll_failures"), 1);
    rig.vm.advance(Duration::from_millis(500)).unwrap();
    let p2 = one_poll_in(&rig, 0, None);
    assert_ne!(p2.token, p.token);
}

#[test]
fn dead_feed_backs_off_and_its_lag_gauge_still_moves() {
    // The minter cluster is unknown to the host: every poll (and exchange) fails to dispatch.
    let Some(mut rig) = start_with(
        "dead_feed_backs_off_and_its_lag_gauge_still_moves",
        revocation_minter(),
        false,
    ) else {
        return;
    };
    let s = rig.send(&rig.tickets());
    rig.denied(s, 503, "credential_unavailable");
    rig.vm.advance(Duration::from_millis(125)).unwrap();
    assert_eq!(rig.metric("mandate.revocations.poll_failures"), 1);
    // Backoff: 0.5 s, 1 s, 2 s, 4 s, then 7.5 s (a quarter of max_stale_s) at most.
    let mut at = Vec::new();
    for step in 1..=(20_000 / 125) {
        let before = rig.metric("mandate.revocations.poll_failures");
        rig.vm.advance(Duration::from_millis(125)).unwrap();
        if rig.metric("mandate.revocations.poll_failures") > before {
            at.push(step * 125);
        }
    }
    let gaps: Vec<u64> = std::iter::once(at[0])
        .chain(at.windows(2).map(|w| w[1] - w[0]))
        .collect();
    assert_eq!(
        gaps,
        [500, 1000, 2000, 4000, 7500],
        "failure times (ms after the first): {at:?}"
    );
    // The gauge is updated on every tick even though no poll ever got out.
    assert_eq!(rig.vm.metric(LAG_GAUGE), Some(20));
    assert!(rig
        .vm
        .logged("cannot call minter cluster `minter` for revocations"));
}

/// A minter's feed over `entries` (seq = index + 1), paging as the contract says when the
/// client sends `max_bytes` (and `limit`). `honour_max_bytes: false` is an older minter: it
/// pages by `limit` only (default 1000 entries, whatever their size).
struct FeedServer {
    epoch: &'static str,
    entries: Vec<Value>,
    honour_max_bytes: bool,
    served: Vec<usize>,
}

impl FeedServer {
    fn new(epoch: &'static str, honour_max_bytes: bool) -> FeedServer {
        FeedServer {
            epoch,
            entries: Vec::new(),
            honour_max_bytes,
            served: Vec::new(),
        }
    }

    fn end_task(&mut self, task: &str) {
        let seq = self.entries.len() + 1;
        self.entries.push(
            json!({"seq": seq, "kind": "task", "value": task, "at": T0, "until": T0 + 86_400}),
        );
    }

    fn answer(&mut self, p: &mandate_host_test::HttpCallout) -> CalloutReply {
        let q = poll_query(p);
        let get = |name: &str| q.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
        // A client that sends no epoch (an older filter) is answered from its cursor.
        let reset = get("epoch").is_some_and(|e| e != self.epoch);
        let since: usize = if reset {
            0
        } else {
            get("since").unwrap().parse().unwrap()
        };
        let limit: usize = get("limit").map_or(1000, |l| l.parse().unwrap());
        let max_bytes = get("max_bytes")
            .filter(|_| self.honour_max_bytes)
            .map(|b| b.parse::<usize>().unwrap().min(196_608));
        let mut page = Vec::new();
        let mut size = 200;
        for e in self.entries.iter().skip(since) {
            let len = e.to_string().len() + 1;
            if page.len() == limit || max_bytes.is_some_and(|m| size + len > m) {
                break;
            }
            size += len;
            page.push(e.clone());
        }
        let cursor = since + page.len();
        let more = cursor < self.entries.len();
        self.served.push(page.len());
        json_reply(
            200,
            &json!({"epoch": self.epoch, "cursor": cursor, "reset": reset, "more": more, "revocations": page}),
        )
    }

    /// Answers outstanding polls (the plugin asks again at once while `more` is set).
    fn serve(&mut self, rig: &mut Rig) -> usize {
        let mut n = 0;
        while let Some(p) = rig.polls().into_iter().next() {
            let reply = self.answer(&p);
            rig.answer(&p, reply);
            n += 1;
            assert!(n < 100, "polling in a loop");
        }
        n
    }
}

/// ~1000 ended tasks with ~210-byte ids: one page of them is over the plugin's 256 KiB callout
/// limit (the failure seen in real Envoy). Then a short id last, which a request can name.
fn thousand_long_tasks(server: &mut FeedServer) {
    for i in 0..1000 {
        server.end_task(&format!("tsk_{i:0>206}"));
    }
    server.end_task("T-LAST");
}

#[test]
fn oversized_feed_page_cannot_freeze_revocations() {
    let Some(mut rig) = start(
        "oversized_feed_page_cannot_freeze_revocations",
        revocation_minter(),
    ) else {
        return;
    };
    let mut server = FeedServer::new("E1", true);
    thousand_long_tasks(&mut server);
    // (Written so that it runs against the filter before the fix too: there the page was
    // refused on every poll, forever, and T-LAST was minted for.)
    let s = rig.send_minted(&rig.tickets().task("T-0"), "jti-0");
    rig.forwarded(s);
    let mut pages = 0;
    for _ in 0..6 {
        rig.vm.advance(Duration::from_millis(500)).unwrap();
        pages += server.serve(&mut rig);
    }
    let s = rig.send(&rig.tickets().task("T-LAST"));
    rig.denied(s, 403, "task_revoked");
    assert!(pages >= 2, "paged by bytes: {:?}", server.served);
    assert_eq!(
        server.served.iter().sum::<usize>(),
        1001,
        "every entry fetched once: {:?}",
        server.served
    );
    assert_eq!(rig.metric("mandate.revocations.received"), 1001);
    assert_eq!(rig.metric("mandate.revocations.poll_failures"), 0);
    // A task ended afterwards is heard of on the next poll.
    server.end_task("T-AFTER");
    rig.vm.advance(Duration::from_millis(500)).unwrap();
    assert_eq!(server.serve(&mut rig), 1);
    let s = rig.send(&rig.tickets().task("T-AFTER"));
    rig.denied(s, 403, "task_revoked");
    no_warnings(&rig);
}

#[test]
fn feed_that_ignores_max_bytes_is_paged_down_by_limit() {
    let Some(mut rig) = start(
        "feed_that_ignores_max_bytes_is_paged_down_by_limit",
        revocation_minter(),
    ) else {
        return;
    };
    let mut server = FeedServer::new("E1", false);
    thousand_long_tasks(&mut server);
    start_polling(&mut rig);
    assert_eq!(server.serve(&mut rig), 1);
    assert_eq!(
        rig.metric("mandate.revocations.poll_failures"),
        1,
        "a page over 256 KiB is not read"
    );
    // The retry asks for fewer entries, and pages through.
    rig.vm.advance(Duration::from_millis(500)).unwrap();
    let p = rig.polls().into_iter().next().expect("retried");
    assert!(
        poll_query(&p).contains(&("limit".into(), "500".into())),
        "{:?}",
        poll_query(&p)
    );
    server.serve(&mut rig);
    assert_eq!(
        rig.metric("mandate.revocations.received"),
        1001,
        "{:?}",
        server.served
    );
    let s = rig.send(&rig.tickets().task("T-LAST"));
    rig.denied(s, 403, "task_revoked");
}

#[test]
fn unknown_revocation_kind_does_not_stall_the_cursor() {
    let Some(mut rig) = start(
        "unknown_revocation_kind_does_not_stall_the_cursor",
        revocation_minter(),
    ) else {
        return;
    };
    let p = start_polling(&mut rig);
    let page = json!({"epoch": "E1", "cursor": 3, "reset": true, "more": false, "revocations": [
        {"seq": 1, "kind": "audience", "value": "https://tickets.internal", "at": T0},
        {"seq": 2, "kind": "session", "value": {"id": 7}},
        {"seq": 3, "kind": "task", "value": "T-3", "at": T0}]});
    rig.answer(&p, json_reply(200, &page));
    assert_eq!(
        (
            rig.metric("mandate.revocations.received"),
            rig.metric("mandate.revocations.skipped")
        ),
        (1, 2)
    );
    assert!(
        rig.vm
            .logged("2 revocation(s) of unknown kinds skipped; cursor 3"),
        "{:?}",
        rig.vm.logs()
    );
    let s = rig.send(&rig.tickets().task("T-3"));
    rig.denied(s, 403, "task_revoked");
    rig.vm.advance(Duration::from_millis(500)).unwrap();
    one_poll(&rig, 3);
}

#[test]
fn restored_minter_epoch_resets_the_cursor() {
    let Some(mut rig) = start(
        "restored_minter_epoch_resets_the_cursor",
        revocation_minter(),
    ) else {
        return;
    };
    let p = start_polling(&mut rig);
    rig.answer(&p, feed(500, &[("task", "T-7")]));
    rig.vm.advance(Duration::from_millis(500)).unwrap();
    let p = one_poll(&rig, 500);
    // The minter's database is restored from last week's backup: a new epoch, seq from 1.
    let mut server = FeedServer::new("E2", true);
    server.end_task("T-1");
    server.end_task("T-2");
    rig.answer(&p, server.answer(&p));
    assert_eq!(
        rig.metric("mandate.revocations.resets"),
        1,
        "the restore (the first answer is no reset)"
    );
    assert!(
        rig.vm
            .logged("revocation feed epoch changed; resuming at cursor 2"),
        "{:?}",
        rig.vm.logs()
    );
    rig.vm.advance(Duration::from_millis(500)).unwrap();
    let p = one_poll_in(&rig, 2, Some("E2"));
    server.end_task("T-3");
    rig.answer(&p, server.answer(&p));
    // Ended after the restore, before it, and in the restored store: all refused.
    for t in ["T-3", "T-2", "T-7"] {
        let s = rig.send(&rig.tickets().task(t));
        rig.denied(s, 403, "task_revoked");
    }
}

#[test]
fn dead_feed_stops_cached_credentials_after_max_stale() {
    let m = json!({"cluster": MINTER, "timeout_ms": 300, "revocations": {"interval_ms": 500, "max_stale_s": 5}});
    let Some(mut rig) = start("dead_feed_stops_cached_credentials_after_max_stale", m) else {
        return;
    };
    let p = start_polling(&mut rig);
    rig.answer(&p, feed(1, &[]));
    let req = rig.tickets().task("T-1");
    let cred = mint(&mut rig, &req, "jti-1");
    // The feed dies: every poll from now on fails.
    for _ in 0..50 {
        rig.vm.advance(Duration::from_millis(100)).unwrap();
        for p in rig.polls() {
            rig.answer(&p, CalloutReply::Failure);
        }
    }
    assert_eq!(rig.now(), T0 + 5);
    assert_eq!(
        mint(&mut rig, &req, "unused"),
        cred,
        "5 s: at the bound, still served"
    );
    rig.vm.advance(Duration::from_millis(1000)).unwrap();
    for p in rig.polls() {
        rig.answer(&p, CalloutReply::Failure);
    }
    let s = rig.send(&req);
    let r = rig.denied(s, 503, "revocations_stale");
    assert!(header(&r.headers, "x-mandate-decision-id").is_some());
    assert!(rig.mint_calls().is_empty(), "no exchange either");
    let s = rig.send(&rig.tickets().task("T-2"));
    rig.denied(s, 503, "revocations_stale");
    assert_eq!(rig.metric("mandate.decisions.deny.revocations_stale"), 2);
    assert_eq!(
        rig.metric("mandate.revocations.stale.vm0"),
        2,
        "counted per worker"
    );
    assert_eq!(rig.vm.metric(LAG_GAUGE), Some(6));
    // The feed comes back: the cached credential is used again.
    rig.vm.advance(Duration::from_millis(2000)).unwrap();
    let p = one_poll(&rig, 1);
    rig.answer(&p, feed(1, &[]));
    assert_eq!(mint(&mut rig, &req, "unused"), cred);
    assert_eq!(rig.vm.metric(LAG_GAUGE), Some(0));
}

#[test]
fn lag_gauge_is_per_vm_not_shared_and_overwritten() {
    let Some(mut rig) = start(
        "lag_gauge_is_per_vm_not_shared_and_overwritten",
        revocation_minter(),
    ) else {
        return;
    };
    let cfg = config(&rig.key, &rig.intent_key, revocation_minter());
    let mut worker = rig.host.new_vm(b"", cfg.to_string().as_bytes()).unwrap();
    let p = start_polling(&mut rig);
    rig.answer(&p, feed(1, &[]));
    // The second VM serves a request too, but its feed never answers.
    let s = worker.new_stream().unwrap();
    let req = rig.tickets();
    worker
        .request_headers(
            s,
            req.headers.iter().map(|(k, v)| (k.as_str(), v.as_str())),
            true,
        )
        .unwrap();
    for _ in 0..8 {
        worker.advance(Duration::from_millis(500)).unwrap();
        rig.vm.tick().unwrap();
        for p in rig.polls() {
            rig.answer(&p, feed(1, &[]));
        }
    }
    assert_eq!(rig.vm.metric(LAG_GAUGE), Some(0), "{:?}", rig.vm.metrics());
    assert_eq!(
        rig.vm.metric("mandate.revocations.lag_s.vm1"),
        Some(4),
        "{:?}",
        rig.vm.metrics()
    );
}

#[test]
fn reconfiguration_keeps_revocations_and_does_not_replay_the_feed() {
    let Some(mut rig) = start(
        "reconfiguration_keeps_revocations_and_does_not_replay_the_feed",
        revocation_minter(),
    ) else {
        return;
    };
    let p = start_polling(&mut rig);
    rig.answer(&p, feed(42, &[("task", "T-7")]));
    let cfg = config(
        &rig.key,
        &rig.intent_key,
        json!({"cluster": MINTER, "timeout_ms": 400, "revocations": {"interval_ms": 600}}),
    );
    assert!(rig.vm.configure(cfg.to_string().as_bytes()).unwrap());
    let p = one_poll(&rig, 42);
    rig.answer(&p, feed(42, &[]));
    let s = rig.send(&rig.tickets().task("T-7"));
    rig.denied(s, 403, "task_revoked");
}

#[test]
fn revocation_received_during_an_exchange_is_honoured() {
    let Some(mut rig) = start(
        "revocation_received_during_an_exchange_is_honoured",
        revocation_minter(),
    ) else {
        return;
    };
    let p = start_polling(&mut rig);
    let t7 = rig.tickets().task("T-7");
    let s = rig.send(&t7);
    let c = rig.one_mint_call();
    // The feed reports T-7 ended while its exchange is under way (the minter's concurrency
    // note: such a token is still issued, and "proxies still catch it" by task and jti).
    rig.answer(&p, feed(1, &[("task", "T-7")]));
    rig.answer(&c, token_reply_for(&c, "jti-7", T0 + 120, T0));
    assert!(
        rig.vm.stream(s).upstream.headers.is_none(),
        "a request for a revoked task went upstream"
    );
    rig.denied(s, 403, "task_revoked");
}

#[test]
fn credential_revoked_by_jti_before_it_lands_is_not_used() {
    let Some(mut rig) = start(
        "credential_revoked_by_jti_before_it_lands_is_not_used",
        revocation_minter(),
    ) else {
        return;
    };
    let p = start_polling(&mut rig);
    let req = rig.tickets().task("T-1");
    let s = rig.send(&req);
    let c = rig.one_mint_call();
    rig.answer(&p, feed(1, &[("jti", "jti-1")]));
    rig.answer(&c, token_reply_for(&c, "jti-1", T0 + 120, T0));
    // Whatever happens to this request, the revoked credential must not be reused.
    let _ = s;
    let s2 = rig.send(&req);
    assert!(
        rig.vm.stream(s2).upstream.headers.is_none(),
        "the revoked credential was reused from the cache"
    );
}

// ------------------------------------------------------------------ minter refusals, token checks

#[test]
fn ended_task_refused_by_minter_is_403_not_503() {
    // A fresh proxy that has not heard of the revocation yet: the minter's refusal is the
    // caller's answer (403), not an outage that invites retries.
    let Some(mut rig) = start("ended_task_refused_by_minter_is_403_not_503", minter()) else {
        return;
    };
    for (minter_reason, reason) in [
        ("task_ended", "task_revoked"),
        ("task_unknown", "task_unregistered"),
        ("task_expired", "task_expired"),
        ("subject_revoked", "subject_revoked"),
    ] {
        let s = rig.send(&rig.tickets().task("T-1"));
        let call = rig.one_mint_call();
        let body = json!({"error": "invalid_grant", "error_description": format!("no {MINTER_SECRET}"), "mandate_reason": minter_reason});
        rig.answer(&call, json_reply(400, &body));
        let r = rig.denied(s, 403, reason);
        assert!(!String::from_utf8_lossy(&r.body).contains(MINTER_SECRET));
    }
    assert_eq!(
        rig.metric("mandate.minter.failures"),
        0,
        "refusals are not outages"
    );
    assert_eq!(rig.metric("mandate.minter.refusals"), 4);
    assert!(
        rig.vm
            .logged("the minter refused the exchange: task_revoked"),
        "{:?}",
        rig.vm.logs()
    );
    no_warnings(&rig);
}

#[test]
fn minted_token_for_another_audience_is_not_injected() {
    let Some(mut rig) = start(
        "minted_token_for_another_audience_is_not_injected",
        minter(),
    ) else {
        return;
    };
    let cases = [
        (
            "another audience",
            minted_jwt_for("jti-x", T0 + 120, "https://payments.internal", Some("T-1")),
        ),
        (
            "another task",
            minted_jwt_for("jti-x", T0 + 120, TICKETS_AUD, Some("T-2")),
        ),
        (
            "no task",
            minted_jwt_for("jti-x", T0 + 120, TICKETS_AUD, None),
        ),
    ];
    for (what, token) in cases {
        let s = rig.send(&rig.tickets().task("T-1"));
        let call = rig.one_mint_call();
        let body = json!({"access_token": token, "issued_token_type": JWT_TYPE, "token_type": "Bearer", "expires_in": 120});
        rig.answer(&call, json_reply(200, &body));
        rig.denied(s, 503, "credential_unavailable");
        assert!(
            rig.vm.logged("minted token refused"),
            "{what}: {:?}",
            rig.vm.logs()
        );
        assert!(
            !rig.vm
                .logs()
                .iter()
                .any(|l| l.message.contains(&token) || l.message.contains(MINTED_SIG)),
            "{what}: the token was logged"
        );
    }
    // Nothing was cached: the next request asks again.
    let s = rig.send(&rig.tickets().task("T-1"));
    assert!(rig.waiting(s));
    let call = rig.one_mint_call();
    rig.answer(&call, token_reply_for(&call, "jti-ok", T0 + 120, T0));
    rig.forwarded(s);
    assert_eq!(rig.metric("mandate.minter.failures"), 3);
}

// ------------------------------------------------------------------ legacy

#[test]
fn legacy_destination_gets_the_static_secret_and_is_marked_degraded() {
    let Some(mut rig) = start("legacy_destination_gets_the_static_secret", minter()) else {
        return;
    };
    let secret = "sk_live_legacy_4c1d2e3f4a5b6c7d8e9f";
    let req = Req::new("POST", "old-crm.internal", "/sync")
        .intent("crm.sync")
        .bearer(&rig.svid());
    let s = rig.send(&req);
    let call = rig.one_mint_call();
    assert!(
        form(&call).contains(&("audience".into(), "legacy-crm".into())),
        "audience = the resource's name"
    );
    let body = json!({"access_token": secret, "issued_token_type": "urn:mandate:token-type:static-secret", "token_type": "N_A",
                      "expires_in": 120, "mandate_header": "x-api-key", "mandate_scheme": "ApiKey"});
    rig.answer(&call, json_reply(200, &body));
    let up = rig.forwarded(s);
    assert_eq!(
        header(&up, "x-api-key").as_deref(),
        Some(secret),
        "the secret alone, no scheme"
    );
    assert!(
        header(&up, "authorization").is_none(),
        "the SVID is stripped and no bearer is set"
    );
    let rec = rig.state_record(s).unwrap();
    assert_eq!(rec["degraded"], json!("legacy_static_secret"));
    assert_eq!(
        rec["credential"],
        json!({"jti": null, "exp": T0 + 120, "kind": "legacy_static_secret"})
    );
    assert!(!rec.to_string().contains(secret));
    assert_eq!(rig.metric("mandate.degraded.legacy_static_secret"), 1);

    // Reused from the cache, still marked degraded.
    let s2 = rig.send(&req);
    assert_eq!(
        header(&rig.forwarded(s2), "x-api-key").as_deref(),
        Some(secret)
    );
    assert_eq!(
        rig.state_record(s2).unwrap()["degraded"],
        json!("legacy_static_secret")
    );
    assert_eq!(rig.metric("mandate.degraded.legacy_static_secret"), 2);
    assert!(
        !rig.vm.logs().iter().any(|l| l.message.contains(secret)),
        "the secret is never logged"
    );
    no_warnings(&rig);
}

#[test]
fn legacy_secret_for_authorization_keeps_its_scheme() {
    let Some(mut rig) = start("legacy_secret_for_authorization_keeps_its_scheme", minter()) else {
        return;
    };
    let req = Req::new("POST", "old-crm.internal", "/sync")
        .intent("crm.sync")
        .bearer(&rig.svid());
    let s = rig.send(&req);
    let call = rig.one_mint_call();
    let body = json!({"access_token": "c3ZjOnB3", "issued_token_type": "urn:mandate:token-type:static-secret",
                      "token_type": "N_A", "expires_in": 120, "mandate_header": "authorization", "mandate_scheme": "Basic"});
    rig.answer(&call, json_reply(200, &body));
    let up = rig.forwarded(s);
    assert_eq!(
        header(&up, "authorization").as_deref(),
        Some("Basic c3ZjOnB3")
    );
    assert_eq!(up.iter().filter(|(k, _)| k == "authorization").count(), 1);
}

// ------------------------------------------------------------------ issue 11: no confused deputy

#[test]
fn host_header_cannot_choose_the_credential_audience() {
    // A catch-all allow for service workloads: before, a request to an unmatched host was minted
    // a credential whose audience was the `:authority` the caller chose (say, the payments API).
    let Some(mut rig) = start_configured(
        "host_header_cannot_choose_the_credential_audience",
        minter(),
        true,
        |cfg| {
            cfg["policy"]["classes"]
                .as_array_mut()
                .unwrap()
                .push(json!({"name": "svc", "principals": ["spiffe://example.org/svc/*"]}));
            cfg["policy"]["rules"]
                .as_array_mut()
                .unwrap()
                .push(json!({"id": "services", "effect": "allow", "classes": ["svc"]}));
        },
    ) else {
        return;
    };
    let svc = rig.svid_for("spiffe://example.org/svc/billing");
    let s = rig.send(&Req::get("payments.internal", "/transfer").bearer(&svc));
    assert!(
        rig.mint_calls().is_empty(),
        "no exchange for an audience the caller chose"
    );
    rig.denied(s, 403, "no_resource_matched");
    // A matched resource without an explicit audience: its name, whatever the authority says.
    let s = rig.send(&Req::get("reports.internal:8443", "/q").bearer(&svc));
    let call = rig.one_mint_call();
    assert!(
        form(&call).contains(&("audience".into(), "reports".into())),
        "{:?}",
        form(&call)
    );
    rig.answer(&call, token_reply_for(&call, "jti-r", T0 + 60, T0));
    rig.forwarded(s);
    no_warnings(&rig);
}
