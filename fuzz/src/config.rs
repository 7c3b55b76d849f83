//! The plugin configuration with its policy, run by the engine; and the shipped policies
//! judging arbitrary requests.

use crate::headers::lines_to_pairs;
use crate::input::{replace, with_svid_key, Reader};
use crate::NOW;
use mandate_core::config;
use mandate_core::decision::Effect;
use mandate_core::engine::{Decision, Engine, Outcome, Request, Verdict};
use mandate_core::headers::Headers;
use mandate_core::mcp::jsonrpc;
use mandate_core::mint::MintError;
use mandate_core::policy::{Policy, PolicyConfig, PolicyInput, SignedIntent};
use serde_json::json;

/// The principal a request acts as when its lines name none (`@sub: ...`).
pub const DEFAULT_SUB: &str = "spiffe://example.org/agent/a";

fn answer(raw: &[u8]) -> Result<(u16, &[u8]), MintError> {
    let mut r = Reader::new(raw);
    match r.u16() {
        0 => Err(MintError::NoResponse),
        1 => Err(MintError::Dispatch("fuzz".into())),
        s => Ok((if s % 3 == 0 { 200 } else { s % 600 }, r.rest())),
    }
}

/// What any verdict must keep: a decision is always made, nothing goes upstream unless it
/// was allowed for a verified caller, and nothing the caller sent in mandate's reserved
/// namespace reaches the service.
fn check_verdict(v: &Verdict, d: &Decision, sent: &Headers, stage: &str) {
    let effect = d.effect.unwrap_or_else(|| panic!("{stage}: no decision made ({v:?})"));
    match v {
        Verdict::Forward(edits) => {
            assert_eq!(effect, Effect::Allow, "{stage}: forwarded a denied request");
            assert!(d.identity.is_some(), "{stage}: forwarded without a verified caller");
            for name in sent.reserved_names() {
                assert!(edits.remove.contains(&name) || edits.set.iter().any(|(k, _)| *k == name), "{stage}: reserved header {name} reaches upstream");
            }
        }
        Verdict::Reply(r) => {
            assert!((200..600).contains(&r.status), "{stage}: reply status {}", r.status);
            if r.status >= 400 {
                assert_eq!(effect, Effect::Deny, "{stage}: an error reply for an allowed request");
            }
        }
        Verdict::Mint(_) | Verdict::NeedBody(_) => {
            assert_eq!(effect, Effect::Allow, "{stage}: a denied request goes on");
            assert!(d.identity.is_some(), "{stage}: goes on without a verified caller");
        }
    }
}

fn finish(engine: &mut Engine, out: Outcome, sent: &Headers, body: &[u8], minted: &[u8]) {
    let Outcome { mut decision, verdict } = out;
    check_verdict(&verdict, &decision, sent, "headers");
    match verdict {
        Verdict::Mint(plan) => {
            let (v, _) = engine.finish_mint(&plan, answer(minted), NOW, &mut decision);
            check_verdict(&v, &decision, sent, "mint");
        }
        Verdict::NeedBody(mut plan) => {
            match plan.take_header_verdict() {
                Some(Verdict::Mint(m)) => {
                    let (v, _) = engine.finish_mint(&m, answer(minted), NOW, &mut decision);
                    check_verdict(&v, &decision, sent, "header mint");
                    if matches!(v, Verdict::Reply(_)) {
                        return;
                    }
                }
                Some(v) => {
                    check_verdict(&v, &decision, sent, "header phase");
                    if matches!(v, Verdict::Reply(_)) {
                        return;
                    }
                }
                None => {}
            }
            let v = if body.len() > plan.max_body_bytes {
                engine.body_too_large(&mut decision)
            } else {
                engine.on_request_body(&plan, body, NOW, &mut decision)
            };
            check_verdict(&v, &decision, sent, "body");
            if let Some(f) = engine.tools_filter(&decision) {
                let _ = engine.filter_tools(&f, body, false);
                let _ = engine.filter_tools(&f, body, true);
            }
        }
        _ => {}
    }
}

/// Input: configuration JSON, NUL, request lines (`name: value`; `@sub: id` picks the caller a
/// token is signed for), NUL, body, NUL, minter answer (two bytes of status, then the body).
/// `"@JWK"` in the configuration stands for the in-process key's JWK.
///
/// Whatever the configuration parser accepts, the engine starts with, and then judges any
/// request (twice: the second may come from the decision cache) to a decision, failing closed.
pub fn config(data: &[u8]) {
    let mut r = Reader::new(data);
    let raw = r.field();
    let request = r.field();
    let body = r.field();
    let minted = r.rest();
    let jwk = with_svid_key(|k| k.svid_jwk().to_string());
    let raw = replace(raw, b"\"@JWK\"", jwk.as_bytes());
    let parsed = config::parse(&raw);
    let Ok(cfg) = parsed else { return };
    let mut engine = match Engine::new(cfg.clone(), 7, None) {
        Ok(e) => e,
        Err(e) => panic!("the parser accepted a configuration the engine refuses: {e}"),
    };

    let mut pairs = lines_to_pairs(request);
    let sub = pairs.iter().find(|(k, _)| k == b"@sub").map(|(_, v)| String::from_utf8_lossy(v).into_owned());
    pairs.retain(|(k, _)| k != b"@sub");
    let id = &cfg.identity;
    if !pairs.iter().any(|(k, _)| k.eq_ignore_ascii_case(id.header.as_bytes())) {
        let aud = id.audiences.first().cloned().unwrap_or_default();
        let claims = json!({"sub": sub.as_deref().unwrap_or(DEFAULT_SUB), "aud": aud, "iat": NOW - 10, "exp": NOW + 300});
        let token = with_svid_key(|k| k.sign(&claims));
        let value = if id.scheme.is_empty() { token } else { format!("{} {token}", id.scheme) };
        pairs.push((id.header.as_bytes().to_vec(), value.into_bytes()));
    }
    let headers = Headers::new(pairs);
    for _ in 0..2 {
        let out = engine.on_request(&Request { headers: &headers, now: NOW });
        finish(&mut engine, out, &headers, body, minted);
    }
    // A revocation feed answer (the minter part, read as one) never breaks the engine.
    if let Ok(report) = engine.on_revocations(answer(minted), NOW * 1000) {
        let _ = report;
        let out = engine.on_request(&Request { headers: &headers, now: NOW });
        finish(&mut engine, out, &headers, body, minted);
    }
}

const POLICIES: &[&str] = &[
    include_str!("../../policies/coding-agent.policy.json"),
    include_str!("../../policies/delegation.policy.json"),
    include_str!("../../policies/legacy-service.policy.json"),
    include_str!("../../policies/mcp-support.policy.json"),
    include_str!("../../policies/nightly-batch.policy.json"),
    include_str!("../../policies/summariser-vs-tool-agent.policy.json"),
    include_str!("../../policies/support-agent.policy.json"),
];

thread_local! {
    static COMPILED: Vec<Policy> = POLICIES
        .iter()
        .map(|p| {
            let c: PolicyConfig = serde_json::from_str(p).unwrap_or_else(|e| panic!("shipped policy does not parse: {e}"));
            Policy::compile(&c, "policy").unwrap_or_else(|e| panic!("shipped policy does not compile: {e}"))
        })
        .collect();
}

/// Input: selector byte, then NUL-separated principal, intent, task, method, authority,
/// path, environment, signed-intent list (space-separated), MCP body. The shipped policies
/// judge it: always a decision, the same one twice, and `explain` agrees with `evaluate`.
pub fn policy(data: &[u8]) {
    let mut r = Reader::new(data);
    let sel = r.byte();
    let when = u64::from(r.u16()) * 60;
    let principal = r.text();
    let intent = r.text();
    let task = r.text();
    let method = r.text();
    let authority = r.text();
    let path = r.text();
    let environment = r.text();
    let signed = r.text();
    let mcp_body = r.rest();
    let call = jsonrpc::parse(mcp_body).ok().map(jsonrpc::Message::into_call);
    let signed = (sel & 8 != 0).then(|| SignedIntent {
        intents: signed.split(' ').filter(|s| !s.is_empty()).map(String::from).collect(),
        task: (!task.is_empty()).then(|| task.clone()),
        exp: NOW + 300,
        from_txn_token: sel & 16 != 0,
    });
    COMPILED.with(|policies| {
        let Some(p) = policies.get(usize::from(sel) % policies.len().max(1)) else { return };
        let input = PolicyInput {
            principal: &principal,
            iat: Some(NOW - 10),
            exp: NOW + 300,
            intent: (!intent.is_empty()).then_some(intent.as_str()),
            signed_intent: signed.as_ref(),
            task: (!task.is_empty()).then_some(task.as_str()),
            method: &method,
            authority: &authority,
            path: &path,
            now: NOW + when,
            environment: (!environment.is_empty()).then_some(environment.as_str()),
            standing_secret: sel & 32 != 0,
            minter: sel & 64 != 0,
            mcp: call.as_ref(),
        };
        let d = p.evaluate(&input);
        assert_eq!(d, p.evaluate(&input), "the same request judged twice differently");
        assert_eq!(p.explain(&input).decision, d, "explain disagrees with evaluate");
        if d.effect == Effect::Allow {
            assert!(d.resource.is_some(), "allowed without a matched resource: {d:?}");
        }
    });
}
