//! Host refusals on the request path (issue 14, item 1) and the one-record guarantee (item 2).
//!
//! The wasmtime host answers one hostcall with an error status (`Host::fail_call`); for each
//! call site the filter must not trap (a following normal request is still served), must deny
//! the request it was serving (status and reason) with exactly one decision record, and must
//! send nothing upstream. Config-time refusals reject the configuration or degrade, never trap.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use mandate_host_test::{header_value, LocalResponse, Status, StreamId};
use serde_json::{json, Value};

/// Statuses a host may answer for a refused call, including codes the proxy-wasm SDK's `Status`
/// type does not even know (`InvalidMemoryAccess`, `BrokenConnection`): none may trap the VM.
const REFUSALS: [Status; 6] = [
    Status::BadArgument,
    Status::NotFound,
    Status::InternalFailure,
    Status::Unimplemented,
    Status::InvalidMemoryAccess,
    Status::BrokenConnection,
];

fn decision_id(r: &LocalResponse) -> String {
    let id = header_value(&r.headers, "x-mandate-decision-id").expect("the reply names its decision");
    String::from_utf8(id).unwrap()
}

/// Logged records with this decision id (after a flush with no fault active).
fn records_for(rig: &mut Rig, id: &str) -> Vec<Value> {
    rig.host.clear_faults();
    rig.records().into_iter().filter(|r| r["decision_id"] == json!(id)).collect()
}

/// Stream `s` was denied with `status`/`reason`, nothing went upstream, and exactly one record
/// carries the reply's decision id (the same one as its filter state, when `state`).
fn denied_once(rig: &mut Rig, s: StreamId, status: u32, reason: &str, state: bool) -> Value {
    let r = rig.denied(s, status, reason);
    let id = decision_id(&r);
    let recs = records_for(rig, &id);
    assert_eq!(recs.len(), 1, "one record for {id}: {recs:?}");
    assert_eq!(recs[0]["reason"], json!(reason));
    assert_eq!(recs[0]["effect"], json!("deny"));
    if state {
        let st = rig.state_record(s).expect("the record is the stream's filter state");
        assert_eq!(st["decision_id"], json!(id), "filter state and reply name the same decision");
    }
    recs[0].clone()
}

/// The VM did not trap and still serves: with every fault cleared, a request is minted for
/// and forwarded.
fn still_serves(rig: &mut Rig, what: &str) {
    rig.host.clear_faults();
    assert!(rig.vm.broken().is_none(), "{what}: the VM trapped: {:?}", rig.vm.broken());
    let req = rig.tickets();
    let s = rig.send_minted(&req, "jti-after");
    let up = rig.forwarded(s);
    assert!(header(&up, "authorization").is_some(), "{what}: served with a credential");
}

fn fired(rig: &Rig, call: &str) -> bool {
    rig.host.faults_fired().iter().any(|(c, _)| c == call)
}

fn rig(test: &str) -> Option<Rig> {
    start(test, minter())
}

// ------------------------------------------------------------------ request headers

#[test]
fn clock_refused_on_request_headers_fails_closed() {
    for status in REFUSALS {
        let Some(mut rig) = rig("clock_refused_on_request_headers") else { return };
        rig.host.fail_call("proxy_get_current_time_nanoseconds", status);
        let s = rig.send(&rig.tickets());
        assert!(fired(&rig, "proxy_get_current_time_nanoseconds"));
        denied_once(&mut rig, s, 503, "internal_error", true);
        assert!(rig.vm.pending_calls().is_empty(), "{status:?}: nothing dispatched");
        still_serves(&mut rig, &format!("{status:?}"));
    }
}

#[test]
fn request_header_map_refused_fails_closed() {
    for status in REFUSALS {
        let Some(mut rig) = rig("request_header_map_refused") else { return };
        rig.host.fail_call("proxy_get_header_map_pairs", status);
        let s = rig.send(&rig.tickets());
        denied_once(&mut rig, s, 503, "internal_error", true);
        still_serves(&mut rig, &format!("{status:?}"));
    }
}

#[test]
fn header_edit_refused_denies_the_allowed_request_with_one_record() {
    // Before this fix a refused edit wrote a second record under a second decision id.
    for call in ["proxy_replace_header_map_value", "proxy_remove_header_map_value"] {
        for status in REFUSALS {
            let Some(mut rig) = start("header_edit_refused", serde_json::Value::Null) else { return };
            rig.host.fail_call(call, status);
            let req = Req::get("wiki.internal", "/page").intent("wiki.read").bearer(&rig.svid());
            let s = rig.send(&req);
            assert!(fired(&rig, call), "{call} {status:?}");
            let rec = denied_once(&mut rig, s, 503, "internal_error", true);
            assert_eq!(rec["identity"], json!(AGENT), "the decision's own record, refused");
            assert_eq!(rig.records().len(), 1, "{call} {status:?}: one record in all");
            rig.host.clear_faults();
            assert!(rig.vm.broken().is_none());
            let ok = rig.send(&req);
            rig.forwarded(ok);
        }
    }
}

#[test]
fn filter_state_refused_denies_the_allowed_request() {
    for status in REFUSALS {
        let Some(mut rig) = rig("filter_state_refused") else { return };
        rig.host.fail_call("proxy_set_property", status);
        let req = rig.tickets();
        let s = rig.send_minted(&req, "jti-1");
        let r = rig.denied(s, 503, "internal_error");
        let id = decision_id(&r);
        assert_eq!(records_for(&mut rig, &id).len(), 1, "{status:?}");
        assert!(rig.state_record(s).is_none(), "the host refused it");
        assert_eq!(rig.records().len(), 1);
        still_serves(&mut rig, &format!("{status:?}"));
    }
}

#[test]
fn local_reply_refused_leaves_the_denied_request_paused_and_recorded() {
    for status in REFUSALS {
        let Some(mut rig) = rig("local_reply_refused") else { return };
        rig.host.fail_call("proxy_send_local_response", status);
        let s = rig.send(&Req::get("tickets.internal", "/tickets/1").intent("ticket.read"));
        let st = rig.vm.stream(s);
        assert!(st.upstream.headers.is_none() && st.local_response.is_none() && st.request_paused, "{status:?}");
        let recs = rig.records();
        assert_eq!(recs.len(), 1, "{recs:?}");
        assert_eq!((recs[0]["effect"].as_str(), recs[0]["reason"].as_str()), (Some("deny"), Some("token_missing")));
        assert_eq!(rig.state_record(s).unwrap()["decision_id"], recs[0]["decision_id"]);
        still_serves(&mut rig, &format!("{status:?}"));
    }
}

// ------------------------------------------------------------------ the credential exchange

#[test]
fn http_call_refused_denies_the_exchange() {
    // The SDK wrapper panicked on any status but BadArgument and InternalFailure.
    for status in REFUSALS {
        let Some(mut rig) = rig("http_call_refused") else { return };
        rig.host.fail_call("proxy_http_call", status);
        let s = rig.send(&rig.tickets());
        assert!(rig.vm.pending_calls().is_empty());
        denied_once(&mut rig, s, 503, "credential_unavailable", true);
        still_serves(&mut rig, &format!("{status:?}"));
    }
}

#[test]
fn callout_answer_reads_refused_deny_every_waiter_once() {
    for call in ["proxy_get_header_map_value", "proxy_get_buffer_bytes"] {
        for status in REFUSALS {
            let Some(mut rig) = rig("callout_answer_reads_refused") else { return };
            let req = rig.tickets();
            let (a, b) = (rig.send(&req), rig.send(&req));
            let call_ = rig.one_mint_call();
            rig.host.fail_call(call, status);
            let now = rig.now();
            rig.answer(&call_, token_reply_for(&call_, "jti-1", now + 120, now));
            assert!(fired(&rig, call), "{call} {status:?}");
            denied_once(&mut rig, a, 503, "credential_unavailable", true);
            denied_once(&mut rig, b, 503, "credential_unavailable", true);
            assert_eq!(rig.records().len(), 2, "{call} {status:?}");
            still_serves(&mut rig, &format!("{call} {status:?}"));
        }
    }
}

#[test]
fn resume_refused_after_the_exchange_denies_with_one_record() {
    // `resume_http_request` in the SDK panicked; the ignored status let a request hang unrecorded.
    for status in REFUSALS {
        let Some(mut rig) = rig("resume_refused") else { return };
        rig.host.fail_call("proxy_continue_stream", status);
        let req = rig.tickets();
        let s = rig.send_minted(&req, "jti-1");
        let rec = denied_once(&mut rig, s, 503, "internal_error", true);
        assert_eq!(rig.records().len(), 1, "{status:?}: {rec}");
        still_serves(&mut rig, &format!("{status:?}"));
    }
}

#[test]
fn effective_context_refused_records_every_waiter_and_forwards_none() {
    // `set_effective_context` in the SDK's dispatcher was unwrapped: the VM trapped.
    for status in REFUSALS {
        let Some(mut rig) = rig("effective_context_refused") else { return };
        let req = rig.tickets();
        let streams: Vec<StreamId> = (0..3).map(|_| rig.send(&req)).collect();
        let call = rig.one_mint_call();
        rig.host.fail_call("proxy_set_effective_context", status);
        let now = rig.now();
        rig.answer(&call, token_reply_for(&call, "jti-1", now + 120, now));
        for &s in &streams {
            let st = rig.vm.stream(s);
            assert!(st.upstream.headers.is_none(), "{status:?}: stream {} went upstream", s.0);
        }
        let recs = rig.records();
        assert_eq!(recs.len(), 3, "{status:?}: {recs:?}");
        assert!(recs.iter().all(|r| r["effect"] == json!("deny") && r["reason"] == json!("internal_error")), "{recs:?}");
        for s in streams {
            rig.vm.finish_stream(s).unwrap();
        }
        assert_eq!(rig.records().len(), 3, "ending the streams adds no record");
        still_serves(&mut rig, &format!("{status:?}"));
    }
}

#[test]
fn effective_context_refused_for_one_waiter_refuses_only_that_waiter() {
    for status in REFUSALS {
        let Some(mut rig) = rig("effective_context_refused_for_one_waiter") else { return };
        let req = rig.tickets();
        let (leader, w1, w2) = (rig.send(&req), rig.send(&req), rig.send(&req));
        let call = rig.one_mint_call();
        // The 1st switch is to the leader (the answer's own stream), the 2nd to the first waiter.
        rig.host.fail_nth_call("proxy_set_effective_context", 2, status);
        let now = rig.now();
        rig.answer(&call, token_reply_for(&call, "jti-1", now + 120, now));
        rig.forwarded(leader);
        rig.forwarded(w2);
        assert!(rig.vm.stream(w1).upstream.headers.is_none(), "{status:?}");
        let recs = rig.records();
        assert_eq!(recs.len(), 3, "{recs:?}");
        let refused: Vec<&Value> = recs.iter().filter(|r| r["effect"] == json!("deny")).collect();
        assert_eq!(refused.len(), 1, "{recs:?}");
        assert_eq!(refused[0]["reason"], json!("internal_error"));
        still_serves(&mut rig, &format!("{status:?}"));
    }
}

// ------------------------------------------------------------------ best effort: logs, metrics

#[test]
fn log_refused_keeps_deciding_and_the_record_stays_in_filter_state() {
    for status in REFUSALS {
        let Some(mut rig) = rig("log_refused") else { return };
        rig.host.fail_call("proxy_log", status);
        let req = rig.tickets();
        let s = rig.send_minted(&req, "jti-1");
        rig.forwarded(s);
        rig.flush(); // the batched line is refused too
        assert!(rig.state_record(s).is_some(), "{status:?}");
        still_serves(&mut rig, &format!("{status:?}"));
    }
}

#[test]
fn metric_calls_refused_change_no_decision() {
    for call in ["proxy_define_metric", "proxy_increment_metric", "proxy_record_metric"] {
        for status in REFUSALS {
            let Some(mut rig) = rig("metric_calls_refused") else { return };
            rig.host.fail_call(call, status);
            let req = rig.tickets();
            let s = rig.send_minted(&req, "jti-1");
            rig.forwarded(s);
            let denied = rig.send(&Req::get("tickets.internal", "/tickets/1").intent("ticket.read"));
            rig.vm.force_tick().unwrap();
            let id = decision_id(&rig.denied(denied, 401, "token_missing"));
            assert_eq!(records_for(&mut rig, &id).len(), 1);
            assert_eq!(rig.records().len(), 2, "{call} {status:?}");
            still_serves(&mut rig, &format!("{call} {status:?}"));
        }
    }
}

#[test]
fn host_crypto_refused_falls_back_to_the_filters_own_check() {
    for status in REFUSALS {
        let Some(mut rig) = rig("host_crypto_refused") else { return };
        rig.host.fail_call("proxy_call_foreign_function", status);
        let req = rig.tickets();
        let s = rig.send_minted(&req, "jti-1");
        rig.forwarded(s);
        let bad = rig.send(&Req::get("tickets.internal", "/tickets/1").intent("ticket.read").bearer(&format!("{}x", rig.svid())));
        denied_once(&mut rig, bad, 401, "signature_invalid", true);
        still_serves(&mut rig, &format!("{status:?}"));
    }
}

// ------------------------------------------------------------------ configuration time

#[test]
fn plugin_configuration_refused_rejects_the_configuration_without_a_trap() {
    for status in REFUSALS {
        let Some(host) = host("plugin_configuration_refused") else { return };
        host.fail_call("proxy_get_buffer_bytes", status);
        let key = TestKey::es256("svid-k1");
        let cfg = config(&key, &TestKey::es256("intent-k1"), minter());
        let vm = host.new_vm(b"", cfg.to_string().as_bytes());
        match vm {
            Ok(vm) => {
                assert!(!vm.configured(), "{status:?}");
                assert!(vm.broken().is_none(), "{status:?}");
            }
            Err(e) => {
                let msg = format!("{e:#}");
                assert!(!msg.contains("wasm trap") && !msg.contains("unreachable"), "{status:?}: trapped: {msg}");
            }
        }
    }
}

#[test]
fn tick_period_and_shared_data_refused_at_configuration_still_serve() {
    for call in ["proxy_set_tick_period_milliseconds", "proxy_get_shared_data", "proxy_set_shared_data", "proxy_get_property"] {
        for status in REFUSALS {
            let Some(host) = host("config_time_refusals") else { return };
            host.add_upstream(MINTER);
            host.fail_call(call, status);
            let key = TestKey::es256("svid-k1");
            let intent_key = TestKey::es256("intent-k1");
            let cfg = config(&key, &intent_key, minter());
            let vm = host.new_vm(b"", cfg.to_string().as_bytes()).expect("no trap");
            assert!(vm.configured(), "{call} {status:?}");
            let mut rig = Rig { host, vm, key, intent_key };
            still_serves(&mut rig, &format!("{call} {status:?}"));
        }
    }
}

// ------------------------------------------------------------------ one record per request

/// Item 2: a mixed run on one VM. Every request that reached the filter has exactly one record,
/// under the decision id of its reply (denied) and of its filter state (answerable streams).
#[test]
fn mixed_run_has_exactly_one_record_per_request() {
    let Some(mut rig) = rig("mixed_run_has_exactly_one_record_per_request") else { return };
    let svid = rig.svid();
    let tickets = rig.tickets();
    let reports = Req::get("reports.internal", "/q3").intent("report.read").bearer(&svid);
    let mut sent: Vec<StreamId> = Vec::new();
    let mut send = |rig: &mut Rig, req: &Req| {
        let s = rig.send(req);
        sent.push(s);
        s
    };

    // Single flight: a leader and three waiters, answered.
    let lead = send(&mut rig, &tickets);
    for _ in 0..3 {
        send(&mut rig, &tickets);
    }
    // A second flight whose leader's client leaves (its waiters fail closed), plus a waiter
    // that leaves before the answer.
    let gone_leader = send(&mut rig, &reports);
    let w_stays = send(&mut rig, &reports);
    let w_leaves = send(&mut rig, &reports);
    rig.vm.finish_stream(w_leaves).unwrap();
    rig.vm.finish_stream(gone_leader).unwrap();
    assert!(rig.vm.stream(w_stays).local_response.is_some(), "the waiter was failed closed");
    let call = rig.vm.pending_calls_for(lead).into_iter().next().expect("lead's exchange");
    let now = rig.now();
    rig.answer(&call, token_reply_for(&call, "jti-1", now + 120, now));
    // Cached credential, plain denials, a dry run, a blocked agent.
    send(&mut rig, &tickets);
    send(&mut rig, &Req::get("tickets.internal", "/tickets/1").intent("ticket.read"));
    send(&mut rig, &tickets.clone().bearer("not.a.jwt"));
    send(&mut rig, &Req::get("wiki.internal", "/p").intent("wiki.read").bearer(&svid));
    let blocked = rig.svid_for(BLOCKED);
    send(&mut rig, &tickets.clone().bearer(&blocked));
    // Fail-closed paths: host refusals.
    rig.host.fail_call("proxy_get_header_map_pairs", Status::BadArgument);
    send(&mut rig, &tickets);
    rig.host.clear_faults();
    rig.host.fail_call("proxy_http_call", Status::InternalFailure);
    send(&mut rig, &Req::get("reports.internal", "/q4").intent("report.read").bearer(&svid));
    rig.host.clear_faults();
    rig.host.fail_nth_call("proxy_continue_stream", 1, Status::BadArgument);
    let a2 = rig.svid_for("spiffe://example.org/agent/a2");
    let fresh = Req::get("reports.internal", "/q5").intent("report.read").bearer(&a2);
    let s = send(&mut rig, &fresh);
    let c = rig.vm.pending_calls_for(s).into_iter().next().expect("exchange");
    let now = rig.now();
    rig.answer(&c, token_reply_for(&c, "jti-2", now + 120, now));
    rig.host.clear_faults();

    let recs = rig.records();
    assert_eq!(recs.len(), sent.len(), "one record per request: {recs:#?}");
    let mut ids: Vec<&str> = recs.iter().map(|r| r["decision_id"].as_str().unwrap()).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), sent.len(), "distinct decision ids");
    for &s in &sent {
        let st = rig.vm.stream(s);
        if st.finished {
            continue; // its client left: log only
        }
        let state = rig.state_record(s).unwrap_or_else(|| panic!("stream {} has no filter state", s.0));
        let id = state["decision_id"].as_str().unwrap();
        assert!(ids.contains(&id), "stream {}: filter state names a logged decision", s.0);
        if let Some(r) = &st.local_response {
            assert_eq!(decision_id(r), id, "stream {}: reply and record agree", s.0);
        }
    }
    assert!(rig.vm.broken().is_none());
}

/// ES384 (SPIRE's `ec-p384`) in the default build: the host's `verify_signature` checks it. A
/// host that refuses the call leaves no P-384 verifier in the module: refused, never accepted.
#[test]
fn es384_svid_is_checked_by_the_host_and_refused_without_it() {
    let p384 = TestKey::es384("svid-p384");
    for refused in [None, Some(Status::NotFound), Some(Status::Unimplemented)] {
        let Some(host) = common::host("es384_host_crypto") else { return };
        host.add_upstream(MINTER);
        if let Some(status) = refused {
            host.fail_call("proxy_call_foreign_function", status);
        }
        let es256 = TestKey::es256("svid-k1");
        let intent_key = TestKey::es256("intent-k1");
        let mut cfg = common::config(&es256, &intent_key, minter());
        cfg["identity"]["trust_domains"][0]["bundle"]["inline"] = spiffe_bundle(&[&es256, &p384], None);
        let vm = host.new_vm(b"", cfg.to_string().as_bytes()).expect("configuration accepted");
        let mut rig = Rig { host, vm, key: es256, intent_key };
        let svid = p384.sign(&svid_claims(AGENT, AUD, T0, T0 + 3600));
        let req = Req::get("tickets.internal", "/tickets/1").intent("ticket.read").bearer(&svid);
        match refused {
            None => {
                let s = rig.send_minted(&req, "jti-p384");
                rig.forwarded(s);
            }
            Some(status) => {
                let s = rig.send(&req);
                denied_once(&mut rig, s, 401, "signature_invalid", true);
                // ES256 still has the filter's own verifier.
                rig.host.fail_call("proxy_call_foreign_function", status);
                let s = rig.send_minted(&rig.tickets(), "jti-p256");
                rig.forwarded(s);
            }
        }
    }
}
