//! Decision records and metrics on the wasmtime test host: one `mandate.decision ` log line
//! per request, its fields for each kind of outcome, the counters that move with it, and
//! that no secret a request or the minter carried ever shows up in logs, records, replies
//! or metric names.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use mandate_host_test::{MetricValue, StreamId};
use serde_json::{json, Value};

/// Every field a record always carries (`rule_id`, `dry_run_rule_id`, `degraded`: when set).
const FIELDS: &[&str] = &[
    "ts_ms",
    "decision_id",
    "effect",
    "reason",
    "dry_run",
    "identity",
    "trust_domain",
    "class",
    "owner",
    "token_hash",
    "intent",
    "task",
    "intent_signed",
    "delegation",
    "method",
    "authority",
    "path",
    "resource",
    "sensitivity",
    "environment",
    "scopes",
    "ttl_s",
    "credential",
    "cache",
    "duration_us",
    "request_id",
    "traceparent",
    "plugin_version",
    "policy_hash",
];

fn counters(rig: &Rig) -> BTreeMap<String, i64> {
    rig.vm
        .metrics()
        .into_iter()
        .filter_map(|(k, v)| match v {
            MetricValue::Counter(n) => Some((k, n as i64)),
            _ => None,
        })
        .collect()
}

/// Counters under `prefix` that moved since `before`, with how much.
fn moved(rig: &Rig, before: &BTreeMap<String, i64>, prefix: &str) -> BTreeMap<String, i64> {
    counters(rig)
        .into_iter()
        .filter(|(k, _)| k.starts_with(prefix))
        .filter_map(|(k, v)| {
            let d = v - before.get(&k).copied().unwrap_or(0);
            (d != 0).then_some((k, d))
        })
        .collect()
}

fn expect(pairs: &[(&str, i64)]) -> BTreeMap<String, i64> {
    pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
}

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len
        && s.bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

/// Runs `f` (one request), checks it produced exactly one decision log line, valid JSON with
/// every field, equal to the stream's filter state and carrying the stream's decision id
/// (from the local reply or from what went upstream). Returns the record.
fn one_record(rig: &mut Rig, f: impl FnOnce(&mut Rig) -> StreamId) -> Value {
    let before = rig.records().len();
    let s = f(rig);
    let records = rig.records();
    assert_eq!(
        records.len(),
        before + 1,
        "exactly one record per request: {:?}",
        &records[before..]
    );
    let rec = records[before].clone();
    for f in FIELDS {
        assert!(rec.get(f).is_some(), "record lacks `{f}`: {rec}");
    }
    assert_eq!(
        rig.state_record(s).as_ref(),
        Some(&rec),
        "filter state = the logged record"
    );
    let st = rig.vm.stream(s);
    let id = match (&st.local_response, &st.upstream.headers) {
        (Some(r), None) => {
            let body: Value = serde_json::from_slice(&r.body).unwrap();
            assert_eq!(
                body["decision_id"], rec["decision_id"],
                "reply body names the decision"
            );
            header(&r.headers, "x-mandate-decision-id")
        }
        (None, Some(up)) => header(up, "x-mandate-decision-id"),
        other => panic!("stream neither answered nor forwarded: {other:?}"),
    };
    assert_eq!(
        id.map(Value::from),
        Some(rec["decision_id"].clone()),
        "decision id header = record"
    );
    assert!(is_hex(rec["decision_id"].as_str().unwrap(), 24), "{rec}");
    assert_eq!(rec["plugin_version"], json!(mandate_core::VERSION));
    assert!(is_hex(rec["policy_hash"].as_str().unwrap(), 12), "{rec}");
    assert_eq!(rec["delegation"], json!(null), "no Txn-Token, no chain");
    rec
}

// ------------------------------------------------------------------ allow

#[test]
fn allow_record_carries_the_whole_decision() {
    let Some(mut rig) = start("allow_record_carries_the_whole_decision", minter()) else {
        return;
    };
    let before = counters(&rig);
    let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let rec = one_record(&mut rig, |rig| {
        let req = rig
            .tickets()
            .task("T-42")
            .with("x-request-id", "req-abc-123")
            .with("traceparent", tp);
        let s = rig.send(&req);
        let call = rig.one_mint_call();
        // The decision's duration spans the exchange: 7 ms on the host clock.
        rig.vm.advance(Duration::from_millis(7)).unwrap();
        rig.answer(&call, token_reply_for(&call, "jti-42", T0 + 120, T0));
        s
    });
    let token_hash = rec["token_hash"].as_str().unwrap();
    assert!(
        token_hash.starts_with("sha256:") && is_hex(&token_hash[7..], 12),
        "{token_hash}"
    );
    let want = json!({
        "ts_ms": T0 * 1000 + 7, "effect": "allow", "reason": "allowed", "dry_run": false, "rule_id": "agents",
        "identity": AGENT, "trust_domain": TD, "class": "agent", "owner": "support-ops", "token_hash": token_hash,
        "intent": "ticket.read", "task": "T-42", "intent_signed": false, "delegation": null,
        "method": "GET", "authority": "tickets.internal", "path": "/tickets/1",
        "resource": "tickets", "sensitivity": "internal", "environment": null,
        "scopes": ["tickets:read", "tickets:list"], "ttl_s": 120,
        "credential": {"jti": "jti-42", "exp": T0 + 120, "kind": "jwt"},
        "cache": {"identity": false, "decision": false, "credential": false},
        "duration_us": 7000, "request_id": "req-abc-123", "traceparent": tp,
        "plugin_version": mandate_core::VERSION, "policy_hash": rec["policy_hash"], "decision_id": rec["decision_id"],
    });
    assert_eq!(rec, want);
    assert_eq!(
        moved(&rig, &before, "mandate."),
        expect(&[
            ("mandate.decisions.allow", 1),
            ("mandate.decisions.allow.allowed", 1),
            ("mandate.cache.identity.miss", 1),
            ("mandate.cache.decision.miss", 1),
            ("mandate.cache.credential.miss", 1),
            ("mandate.minter.calls", 1),
        ])
    );
    assert_eq!(
        rig.vm.host().histogram("mandate.minter.latency_ms"),
        Some(vec![7])
    );

    // The same request again: every cache hits, no exchange, a record of its own.
    let before = counters(&rig);
    let rec2 = one_record(&mut rig, |rig| rig.send(&rig.tickets().task("T-42")));
    assert_ne!(rec2["decision_id"], rec["decision_id"]);
    assert_eq!(
        rec2["cache"],
        json!({"identity": true, "decision": true, "credential": true})
    );
    assert_eq!(rec2["credential"], rec["credential"]);
    assert_eq!(
        (rec2["request_id"].clone(), rec2["duration_us"].clone()),
        (Value::Null, json!(0))
    );
    assert_eq!(rec2["policy_hash"], rec["policy_hash"]);
    assert_eq!(
        moved(&rig, &before, "mandate."),
        expect(&[
            ("mandate.decisions.allow", 1),
            ("mandate.decisions.allow.allowed", 1),
            ("mandate.cache.identity.hit", 1),
            ("mandate.cache.decision.hit", 1),
            ("mandate.cache.credential.hit", 1),
        ])
    );
}

#[test]
fn signed_intent_is_recorded() {
    let Some(mut rig) = start("signed_intent_is_recorded", minter()) else {
        return;
    };
    let it = rig.intent_token(&["ticket.read"], Some("T-5"));
    let rec = one_record(&mut rig, |rig| {
        let req = rig
            .tickets()
            .without("x-agent-intent")
            .with("x-agent-intent-token", &it);
        rig.send_minted(&req, "jti-5")
    });
    assert_eq!(
        (
            rec["intent"].as_str(),
            rec["task"].as_str(),
            rec["intent_signed"].as_bool()
        ),
        (Some("ticket.read"), Some("T-5"), Some(true))
    );
}

#[test]
fn policy_hash_follows_the_configuration() {
    let Some(mut rig) = start("policy_hash_follows_the_configuration", minter()) else {
        return;
    };
    let a = one_record(&mut rig, |rig| rig.send_minted(&rig.tickets(), "j1"));
    let cfg = config(
        &rig.key,
        &rig.intent_key,
        json!({"cluster": MINTER, "timeout_ms": 301}),
    );
    assert!(rig.vm.configure(cfg.to_string().as_bytes()).unwrap());
    let b = one_record(&mut rig, |rig| rig.send_minted(&rig.tickets(), "j2"));
    assert_ne!(
        a["policy_hash"], b["policy_hash"],
        "a new configuration, a new hash"
    );
}

#[test]
fn unsafe_correlation_ids_are_not_copied() {
    let Some(mut rig) = start("unsafe_correlation_ids_are_not_copied", minter()) else {
        return;
    };
    for bad in ["has space", &"x".repeat(129), "tab\there"] {
        let rec = one_record(&mut rig, |rig| {
            rig.send_minted(&rig.tickets().with("x-request-id", bad), "j")
        });
        assert_eq!(rec["request_id"], Value::Null, "{bad:?}");
    }
    let rec = one_record(&mut rig, |rig| {
        rig.send_minted(&rig.tickets().with("x-request-id", &"r".repeat(128)), "j")
    });
    assert_eq!(rec["request_id"], json!("r".repeat(128)));
}

// ------------------------------------------------------------------ denials

#[test]
fn each_deny_family_has_one_record_and_exact_metrics() {
    let Some(mut rig) = start("each_deny_family_has_one_record", minter()) else {
        return;
    };
    let forged = TestKey::es256("svid-k1").sign(&svid_claims(AGENT, AUD, T0, T0 + 3600));
    let blocked = rig.svid_for(BLOCKED);

    // (request, status, reason, rule_id)
    let cases: Vec<(Req, u32, &str, Option<&str>)> = vec![
        // 401: identity
        (
            rig.tickets().without("authorization"),
            401,
            "token_missing",
            None,
        ),
        (
            rig.tickets().bearer(&forged),
            401,
            "signature_invalid",
            None,
        ),
        // 400: request shape
        (
            rig.tickets().intent("Ticket Read!"),
            400,
            "intent_malformed",
            None,
        ),
        (
            rig.tickets().set(":path", "/tickets/a%2F..%2Fadmin"),
            400,
            "path_ambiguous",
            None,
        ),
        // 403: policy
        (
            rig.tickets().bearer(&blocked),
            403,
            "denied_by_rule",
            Some("blocked-agent"),
        ),
        (
            rig.tickets().set(":method", "DELETE"),
            403,
            "intent_mismatch",
            None,
        ),
        (
            rig.tickets().without("x-agent-intent"),
            403,
            "intent_required",
            None,
        ),
        (
            rig.tickets().with("x-api-key", "sk_live_abc"),
            403,
            "standing_secret_presented",
            None,
        ),
    ];
    for (req, status, reason, rule) in cases {
        let before = counters(&rig);
        let rec = one_record(&mut rig, |rig| {
            let s = rig.send(&req);
            rig.denied(s, status, reason);
            s
        });
        assert!(
            rig.mint_calls().is_empty(),
            "{reason}: a denial never asks the minter"
        );
        assert_eq!(
            (
                rec["effect"].as_str(),
                rec["reason"].as_str(),
                rec["dry_run"].as_bool()
            ),
            (Some("deny"), Some(reason), Some(false))
        );
        assert_eq!(
            rec.get("rule_id").and_then(Value::as_str),
            rule,
            "{reason}: {rec}"
        );
        assert_eq!(rec["credential"], Value::Null);
        assert_eq!(
            rec["scopes"],
            json!([]),
            "{reason}: a denial grants no scope"
        );
        if status == 401 {
            assert_eq!(
                (rec["identity"].clone(), rec["token_hash"].clone()),
                (Value::Null, Value::Null),
                "{reason}"
            );
        } else {
            let principal = if reason == "denied_by_rule" {
                BLOCKED
            } else {
                AGENT
            };
            assert_eq!(rec["identity"], json!(principal), "{reason}");
            assert!(rec["token_hash"].as_str().unwrap().starts_with("sha256:"));
            if reason == "path_ambiguous" {
                // The operation is recorded only once the path normalises: none of it here.
                assert_eq!(
                    (
                        rec["method"].clone(),
                        rec["authority"].clone(),
                        rec["path"].clone()
                    ),
                    (Value::Null, Value::Null, Value::Null)
                );
            } else {
                assert_eq!(rec["authority"], json!("tickets.internal"), "{reason}");
                assert_eq!(
                    rec["method"],
                    json!(req.headers.iter().find(|(k, _)| k == ":method").unwrap().1),
                    "{reason}"
                );
            }
        }
        if status == 403 {
            assert_eq!(rec["path"], json!("/tickets/1"));
        }
        if ["denied_by_rule", "intent_mismatch"].contains(&reason) {
            // Decided after the destination was classified (class and intent checks come first).
            assert_eq!(
                (rec["resource"].as_str(), rec["sensitivity"].as_str()),
                (Some("tickets"), Some("internal")),
                "{reason}"
            );
        }
        let m = moved(&rig, &before, "mandate.decisions.");
        assert_eq!(
            m,
            expect(&[
                ("mandate.decisions.deny", 1),
                (&format!("mandate.decisions.deny.{reason}"), 1)
            ]),
            "{reason}"
        );
    }
}

#[test]
fn dry_run_denial_forwards_without_any_credential() {
    // A would-be denial goes upstream to be observed, never armed: before, it was minted a
    // credential (with the allow rule's scopes) like any allow.
    let Some(mut rig) = start("dry_run_denial_forwards_without_any_credential", minter()) else {
        return;
    };
    let before = counters(&rig);
    let rec = one_record(&mut rig, |rig| {
        let req = Req::get("wiki.internal", "/page")
            .intent("wiki.read")
            .bearer(&rig.svid());
        let s = rig.send(&req);
        assert!(
            rig.mint_calls().is_empty(),
            "no exchange for a would-be denial"
        );
        let up = rig.forwarded(s);
        assert!(
            header(&up, "authorization").is_none(),
            "neither a minted credential nor the caller's token"
        );
        s
    });
    assert_eq!(
        (
            rec["effect"].as_str(),
            rec["reason"].as_str(),
            rec["dry_run"].as_bool()
        ),
        (Some("dry_run_deny"), Some("denied_by_rule"), Some(true))
    );
    assert_eq!(
        (rec["rule_id"].as_str(), rec["dry_run_rule_id"].as_str()),
        (Some("agents"), Some("wiki-freeze"))
    );
    assert_eq!(rec["credential"], Value::Null);
    assert_eq!(rec["credential_withheld"], json!("dry_run"));
    assert_eq!(
        (rec["resource"].as_str(), rec["sensitivity"].as_str()),
        (Some("wiki"), Some("public"))
    );
    assert_eq!(
        moved(&rig, &before, "mandate.decisions."),
        expect(&[
            ("mandate.decisions.dry_run_deny", 1),
            ("mandate.decisions.dry_run_deny.denied_by_rule", 1)
        ])
    );
    assert_eq!(
        rig.metric("mandate.cache.credential.miss"),
        0,
        "no credential was looked for"
    );
}

#[test]
fn minter_failure_is_recorded_as_a_deny() {
    let Some(mut rig) = start("minter_failure_is_recorded_as_a_deny", minter()) else {
        return;
    };
    let before = counters(&rig);
    let rec = one_record(&mut rig, |rig| {
        let s = rig.send(&rig.tickets().task("T-1"));
        let call = rig.one_mint_call();
        rig.answer(&call, json_reply(400, &json!({"error": "invalid_grant"})));
        rig.denied(s, 503, "credential_unavailable");
        s
    });
    assert_eq!(
        (rec["effect"].as_str(), rec["reason"].as_str()),
        (Some("deny"), Some("credential_unavailable"))
    );
    // What the policy decided is kept: who, what, which rule allowed it.
    assert_eq!(
        (
            rec["identity"].as_str(),
            rec["rule_id"].as_str(),
            rec["task"].as_str()
        ),
        (Some(AGENT), Some("agents"), Some("T-1"))
    );
    assert_eq!(rec["credential"], Value::Null);
    assert_eq!(
        moved(&rig, &before, "mandate.decisions."),
        expect(&[
            ("mandate.decisions.deny", 1),
            ("mandate.decisions.deny.credential_unavailable", 1)
        ])
    );
    assert_eq!(
        moved(&rig, &before, "mandate.minter."),
        expect(&[("mandate.minter.calls", 1), ("mandate.minter.failures", 1)])
    );
    // Unknown cluster: recorded the same way.
    let Some(mut rig) = start_with(
        "minter_failure_is_recorded_as_a_deny/unknown",
        minter(),
        false,
    ) else {
        return;
    };
    let rec = one_record(&mut rig, |rig| rig.send(&rig.tickets()));
    assert_eq!(rec["reason"], json!("credential_unavailable"));
}

#[test]
fn waiters_each_get_their_own_record() {
    let Some(mut rig) = start("waiters_each_get_their_own_record", minter()) else {
        return;
    };
    let req = rig.tickets().task("T-1");
    let streams: Vec<_> = (0..3)
        .map(|i| rig.send(&req.clone().with("x-request-id", &format!("r{i}"))))
        .collect();
    assert!(rig.records().is_empty(), "nothing recorded while waiting");
    let call = rig.one_mint_call();
    rig.vm.advance(Duration::from_millis(3)).unwrap();
    rig.answer(&call, token_reply_for(&call, "jti-1", T0 + 120, T0));
    let records = rig.records();
    assert_eq!(records.len(), 3);
    for (i, s) in streams.iter().enumerate() {
        let up = rig.forwarded(*s);
        let rec = rig.state_record(*s).unwrap();
        assert_eq!(
            rec["decision_id"].as_str(),
            header(&up, "x-mandate-decision-id").as_deref()
        );
        assert_eq!(
            rec["request_id"],
            json!(format!("r{i}")),
            "each stream's own record"
        );
        assert_eq!(rec["duration_us"], json!(3000));
        assert!(records.contains(&rec));
    }
    assert_eq!(rig.metric("mandate.decisions.allow"), 3);
    assert_eq!(
        rig.metric("mandate.cache.credential.miss"),
        3,
        "each waiter missed the cache"
    );
}

#[test]
fn request_abandoned_while_minting_still_gets_one_record() {
    let Some(mut rig) = start(
        "request_abandoned_while_minting_still_gets_one_record",
        minter(),
    ) else {
        return;
    };
    let leader = rig.send(&rig.tickets().with("x-request-id", "leader"));
    let waiter = rig.send(&rig.tickets().with("x-request-id", "waiter"));
    rig.vm.finish_stream(leader).unwrap();
    rig.denied(waiter, 503, "credential_unavailable");
    let ids: Vec<Value> = rig
        .records()
        .iter()
        .map(|r| r["request_id"].clone())
        .collect();
    assert!(ids.contains(&json!("waiter")), "{ids:?}");
    assert!(
        ids.contains(&json!("leader")),
        "the abandoned leader has no record: {ids:?}"
    );
    assert_eq!(ids.len(), 2);
}

// ------------------------------------------------------------------ redaction

#[test]
fn secrets_never_reach_logs_records_replies_or_metric_names() {
    let Some(mut rig) = start(
        "secrets_never_reach_logs_records_replies_or_metric_names",
        minter(),
    ) else {
        return;
    };
    let svid = rig.svid();
    let intent = rig.intent_token(&["ticket.read"], Some("T-9"));
    let bad_intent = TestKey::es256("intent-k1").sign_intent(&json!({"iss": INTENT_ISS, "sub": AGENT, "aud": AUD, "exp": T0 + 60, "intents": ["ticket.read"]}));
    let forged = TestKey::es256("svid-k1").sign(&svid_claims(AGENT, AUD, T0, T0 + 3600));
    let expired = rig.key.sign(&svid_claims(AGENT, AUD, T0 - 7200, T0 - 3600));
    let api_key = "sk_live_51HqLyjWDarjtT1zdp7dcXfZq2Lm9";
    let cookie = "session=s%3AeyJ1c2VyIjoiYWxpY2UifQ.Zk3nq8TQ1yX2wB7mR4pL";
    let basic_password = "hunter2-Pa55w0rd-Qz8rT1vY";
    let basic = format!(
        "Basic {}",
        b64(format!("svc-user:{basic_password}").as_bytes())
    );
    let minted = minted_jwt_for("jti-red", T0 + 120, TICKETS_AUD, Some("T-9"));
    let legacy = "sk_live_legacy_Zr8Qm2Wn5Tb7Yc1Xd4Ve";
    let minter_secret = "minter-internal-Jq3Lw9Ks2Hd6Fg8P";

    let mut streams = Vec::new();
    // Allowed: SVID, signed intent, cookie; the minted token comes back from the minter.
    let req = rig
        .tickets()
        .task("T-9")
        .with("x-agent-intent-token", &intent)
        .with("cookie", cookie);
    let s = rig.send(&req);
    let call = rig.one_mint_call();
    rig.answer(&call, token_reply_for(&call, "jti-red", T0 + 120, T0));
    assert_eq!(
        header(&rig.forwarded(s), "authorization"),
        Some(format!("Bearer {minted}"))
    );
    streams.push(s);
    // From the cache.
    streams.push(rig.send(&req));
    // Denied ones.
    for (req, status, reason) in [
        (
            rig.tickets()
                .with("x-api-key", api_key)
                .with("cookie", cookie),
            403,
            "standing_secret_presented",
        ),
        (
            rig.tickets().set("authorization", &basic),
            401,
            "token_missing",
        ),
        (
            rig.tickets().with("proxy-authorization", &basic),
            403,
            "standing_secret_presented",
        ),
        (rig.tickets().bearer(&forged), 401, "signature_invalid"),
        (rig.tickets().bearer(&expired), 401, "token_expired"),
        (
            rig.tickets().with("x-agent-intent-token", &bad_intent),
            403,
            "intent_token_invalid",
        ),
    ] {
        let s = rig.send(&req);
        rig.denied(s, status, reason);
        streams.push(s);
    }
    // The minter fails with a secret in its body.
    let s = rig.send(&rig.tickets().task("T-10"));
    let call = rig.one_mint_call();
    rig.answer(
        &call,
        json_reply(
            500,
            &json!({"error": "server_error", "error_description": minter_secret}),
        ),
    );
    rig.denied(s, 503, "credential_unavailable");
    streams.push(s);
    // A legacy secret.
    let s = rig.send(
        &Req::new("POST", "old-crm.internal", "/sync")
            .intent("crm.sync")
            .bearer(&svid),
    );
    let call = rig.one_mint_call();
    rig.answer(&call, json_reply(200, &json!({"access_token": legacy, "expires_in": 60, "issued_token_type": "urn:mandate:token-type:static-secret", "token_type": "N_A", "mandate_header": "x-api-key"})));
    assert_eq!(
        header(&rig.forwarded(s), "x-api-key").as_deref(),
        Some(legacy)
    );
    streams.push(s);
    assert_eq!(rig.records().len(), streams.len(), "one record per request");

    // Everything observable that is not the upstream request.
    let mut seen: Vec<(String, String)> = Vec::new();
    for l in rig.host.logs() {
        seen.push((format!("log[{}]", l.source), l.message));
    }
    for (name, _) in rig.vm.metrics() {
        seen.push(("metric name".into(), name));
    }
    for w in rig.vm.warnings() {
        seen.push(("host warning".into(), w.clone()));
    }
    for s in &streams {
        let st = rig.vm.stream(*s);
        if let Some(rec) = rig.state_record(*s) {
            seen.push((format!("filter state {}", s.0), rec.to_string()));
        }
        if let Some(r) = &st.local_response {
            seen.push((
                format!("reply body {}", s.0),
                String::from_utf8_lossy(&r.body).into_owned(),
            ));
            seen.push((format!("reply details {}", s.0), r.details.clone()));
            for (k, v) in &r.headers {
                seen.push((
                    format!("reply header {}", s.0),
                    format!("{k}: {}", String::from_utf8_lossy(v)),
                ));
            }
        }
        for (k, v) in st.downstream.headers.iter().flatten() {
            seen.push((
                format!("downstream header {}", s.0),
                format!("{k}: {}", String::from_utf8_lossy(v)),
            ));
        }
        seen.push((
            format!("downstream body {}", s.0),
            String::from_utf8_lossy(&st.downstream.body).into_owned(),
        ));
    }
    assert!(
        seen.iter().any(|(w, _)| w.starts_with("log"))
            && seen.iter().any(|(w, _)| w.starts_with("reply body"))
    );

    let cookie_value = cookie.trim_start_matches("session=");
    let secrets: Vec<(&str, &str)> = vec![
        ("SVID", &svid),
        ("intent token", &intent),
        ("invalid intent token", &bad_intent),
        ("forged SVID", &forged),
        ("expired SVID", &expired),
        ("API key", api_key),
        ("cookie", cookie_value),
        ("Basic credentials", basic.trim_start_matches("Basic ")),
        ("Basic password", basic_password),
        ("minted token", &minted),
        ("legacy secret", legacy),
        ("minter error body", minter_secret),
    ];
    for (what, secret) in secrets {
        let tail = &secret[secret.len() - 16..];
        for (where_, text) in &seen {
            assert!(!text.contains(secret), "{what} appears in {where_}: {text}");
            assert!(
                !text.contains(tail),
                "the last 16 characters of the {what} appear in {where_}: {text}"
            );
        }
    }
    // The minted token's payload (claims in base64) is as secret as the token.
    let payload = minted.split('.').nth(1).unwrap();
    assert!(
        !seen.iter().any(|(_, t)| t.contains(payload)),
        "the minted token's payload leaked"
    );
}

/// What the proxy has been handed so far, without flushing: (record lines, allow counter).
fn handed_over(rig: &Rig) -> (usize, i64) {
    (
        logged_records(&rig.vm).len(),
        rig.vm.metric("mandate.decisions.allow").unwrap_or(0),
    )
}

#[test]
fn records_and_counters_wait_for_the_tick_by_default_and_nothing_is_lost() {
    let Some(mut rig) = start(
        "records_and_counters_wait_for_the_tick_by_default_and_nothing_is_lost",
        minter(),
    ) else {
        return;
    };
    // With a minter the revocation feed is always polled: its tick (a quarter of the 1 s
    // interval) comes sooner than the default flush period, and flushes too.
    assert_eq!(
        rig.vm.tick_period_ms(),
        250,
        "the feed's tick drives the flush"
    );
    let req = rig.tickets();
    for i in 0..3 {
        let s = rig.send_minted(&req, &format!("jti-{i}"));
        let _ = rig.forwarded(s);
        assert!(
            rig.state_record(s).is_some(),
            "filter state is set per request, never batched"
        );
    }
    assert_eq!(
        handed_over(&rig),
        (0, 0),
        "nothing handed over before the tick"
    );
    rig.vm.advance(Duration::from_millis(1000)).unwrap();
    assert_eq!(
        handed_over(&rig),
        (3, 3),
        "one tick hands over every record and count"
    );
    let batch = rig
        .vm
        .logs()
        .iter()
        .filter(|l| l.message.contains(DECISION_PREFIX))
        .count();
    assert_eq!(batch, 1, "three records in one log call");
}

#[test]
fn a_full_record_buffer_is_handed_over_without_waiting() {
    let Some(mut rig) = start(
        "a_full_record_buffer_is_handed_over_without_waiting",
        Value::Null,
    ) else {
        return;
    };
    let req = rig.tickets();
    for _ in 0..60 {
        let s = rig.send(&req);
        let _ = rig.forwarded(s);
    }
    let (lines, _) = handed_over(&rig);
    assert!(
        lines >= 30,
        "32 KB of ~800-byte records must have been handed over, got {lines}"
    );
    assert_eq!(rig.records().len(), 60, "and the rest at the tick");
}

#[test]
fn flush_ms_zero_hands_over_each_record_and_count_at_once() {
    let Some(mut rig) = start_configured(
        "flush_ms_zero_hands_over_each_record_and_count_at_once",
        Value::Null,
        true,
        |c| {
            c["records"] = json!({"flush_ms": 0});
        },
    ) else {
        return;
    };
    let req = rig.tickets();
    for n in 1..=2 {
        let s = rig.send(&req);
        let _ = rig.forwarded(s);
        assert_eq!(handed_over(&rig), (n, n as i64));
    }
    assert_eq!(
        rig.vm.tick_period_ms(),
        0,
        "no minter, no fetched bundles, no batching: no tick"
    );
}

#[test]
fn records_buffered_under_the_old_configuration_survive_a_reconfiguration() {
    let Some(mut rig) = start(
        "records_buffered_under_the_old_configuration_survive_a_reconfiguration",
        Value::Null,
    ) else {
        return;
    };
    let req = rig.tickets();
    let s = rig.send(&req);
    let _ = rig.forwarded(s);
    assert_eq!(handed_over(&rig), (0, 0));
    let mut cfg = config(&rig.key, &rig.intent_key, Value::Null);
    cfg["records"] = json!({"flush_ms": 0});
    rig.vm
        .configure(cfg.to_string().as_bytes())
        .expect("reconfigured");
    assert_eq!(
        handed_over(&rig),
        (1, 1),
        "flushed before the new configuration took over"
    );
}

#[test]
fn records_buffered_when_the_plugin_stops_are_handed_over() {
    let Some(mut rig) = start(
        "records_buffered_when_the_plugin_stops_are_handed_over",
        Value::Null,
    ) else {
        return;
    };
    let req = rig.tickets();
    let s = rig.send(&req);
    let _ = rig.forwarded(s);
    assert_eq!(handed_over(&rig), (0, 0));
    assert!(
        rig.vm.shutdown().expect("proxy_on_done"),
        "the root agrees to stop"
    );
    assert_eq!(handed_over(&rig), (1, 1), "flushed in on_done");
}

#[test]
fn each_vm_reports_its_linear_memory() {
    let Some(mut rig) = start("each_vm_reports_its_linear_memory", minter()) else {
        return;
    };
    let gauge = "mandate.memory.linear_bytes.vm0";
    let at_start = rig.vm.metric(gauge).expect("the gauge exists from configuration on");
    assert!(at_start >= 65_536 && at_start % 65_536 == 0, "whole 64 KiB pages: {at_start}");
    rig.vm.advance(Duration::from_millis(1000)).unwrap();
    rig.vm.tick().unwrap();
    let after_tick = rig.vm.metric(gauge).unwrap();
    assert!(after_tick >= at_start, "linear memory never shrinks: {at_start} -> {after_tick}");
}

// ------------------------------------------------------------------ read back (issue 18)

/// The filter's own log lines, as the proxy received them, read by `mandate policy usage` and
/// replayed by `suggest`: every record parsed (none skipped), grants and owner attributed, and
/// each record with a verified caller reproduced by the policy engine.
#[test]
fn the_filters_own_log_is_read_back_by_policy_usage() {
    let Some(mut rig) = start("the_filters_own_log_is_read_back", minter()) else {
        return;
    };
    let forged = TestKey::es256("svid-k1").sign(&svid_claims(AGENT, AUD, T0, T0 + 3600));
    let blocked = rig.svid_for(BLOCKED);
    rig.send_minted(&rig.tickets().task("T-42"), "jti-1");
    let wiki = Req::get("wiki.internal", "/page").intent("wiki.read").bearer(&rig.svid());
    rig.send(&wiki);
    rig.send(&rig.tickets().bearer(&blocked));
    rig.send(&rig.tickets().bearer(&forged));
    assert_eq!(rig.records().len(), 4);
    let mut text = String::new();
    for l in rig.vm.logs() {
        text.push_str(&l.message);
        text.push('\n');
    }
    let dir = std::env::temp_dir().join(format!("mandate-readback-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let log = dir.join("filter.log");
    std::fs::write(&log, &text).unwrap();

    let policy = common::policy(&rig.intent_key);
    let m = mandate_usage::Model::from_slice(policy.to_string().as_bytes()).unwrap();
    let u = mandate_usage::Usage::read(&m, &log).unwrap();
    assert_eq!(
        (u.records, u.skipped_total(), u.allowed, u.dry_run_denied, u.denied),
        (4, 0, 1, 1, 2)
    );
    let r = u.report(&m);
    let owner = r.owners.iter().find(|o| o.owner == "support-ops").unwrap();
    let used: Vec<String> = owner
        .grants_used
        .iter()
        .map(|g| format!("{} {:?} {:?} {}", g.grant.rule, g.grant.intent, g.grant.resource, g.uses))
        .collect();
    assert_eq!(
        used,
        [
            "agents Some(\"ticket.read\") Some(\"tickets\") 1",
            "agents Some(\"wiki.read\") Some(\"wiki\") 1"
        ]
    );
    assert_eq!(owner.denials.get("denied_by_rule"), Some(&1));
    assert!(owner
        .dry_run_would_deny
        .iter()
        .any(|d| d.rule == "wiki-freeze" && d.count == 1));
    let rp = mandate_usage::suggest::replay(&m, &m, &log).unwrap();
    assert_eq!(
        (rp.records, rp.reproduced, rp.allowed, rp.unreproducible, rp.mismatches),
        (4, 3, 1, 1, 0),
        "{rp:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
