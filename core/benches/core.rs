//! Native micro-benchmarks of the core: token verification per algorithm,
//! a verified-token cache hit, and an uncached evaluation over a 200-rule
//! policy. Prints ns/op; ratios against the in-run baseline (a cache hit)
//! are what to compare across machines.
//!
//!     cargo bench -p mandate-core --bench core

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use mandate_core::config;
use mandate_core::identity::Verifier;
use mandate_core::policy::{Policy, PolicyConfig, PolicyInput};
use mandate_core::testkit::{spiffe_bundle, svid_claims, TestKey};
use serde_json::json;
use std::hint::black_box;
use std::time::{Duration, Instant};

const NOW: u64 = 1_795_564_800 + 10 * 3600;
const AUD: &str = "spiffe://example.org/gw";
const SUB: &str = "spiffe://example.org/agent/a1";

fn bench(name: &str, min: Duration, mut f: impl FnMut()) -> f64 {
    // Warm up, then run in batches until `min` has elapsed.
    for _ in 0..10 {
        f();
    }
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < min {
        for _ in 0..10 {
            f();
        }
        n += 10;
    }
    let ns = start.elapsed().as_nanos() as f64 / n as f64;
    println!("{name:<44} {ns:>12.0} ns/op  {:>10.0} op/s", 1e9 / ns);
    ns
}

fn verifier(keys: &[&TestKey], cache: usize) -> Verifier {
    let cfg = config::parse(
        json!({"identity": {"audiences": [AUD], "cache_size": cache,
            "trust_domains": [{"name": "example.org", "bundle": {"inline": spiffe_bundle(keys, None)}}]}})
        .to_string()
        .as_bytes(),
    )
    .unwrap();
    Verifier::new(&cfg.identity).unwrap()
}

fn warm_engine(min: Duration) -> f64 {
    use mandate_core::engine::{Engine, Request, Verdict};
    use mandate_core::headers::{serialize_pairs, Headers};
    use mandate_core::record::DecisionRecord;
    let key = TestKey::es256("k");
    let cfg = json!({
        "identity": {"audiences": [AUD], "upstream_header": "x-mandate-identity",
            "trust_domains": [{"name": "example.org", "bundle": {"inline": spiffe_bundle(&[&key], None)}}]},
        "policy": {
            "classes": [{"name": "agent", "principals": ["spiffe://example.org/agent/*"], "intent_required": true}],
            "resources": [{"name": "tickets", "hosts": ["tickets.internal"], "paths": ["/tickets/**"]}],
            "intents": [{"name": "ticket.read", "operations": [{"resource": "tickets", "methods": ["GET"]}], "scopes": ["tickets:read"]}],
            "rules": [{"id": "r", "effect": "allow", "intents": ["ticket.read"]}]
        },
        "minter": {"cluster": "minter"}
    });
    let mut engine = Engine::new(config::parse(cfg.to_string().as_bytes()).unwrap(), 1, None).unwrap();
    let token = format!("Bearer {}", key.sign(&svid_claims(SUB, AUD, NOW, NOW + 300)));
    let pairs: Vec<(String, Vec<u8>)> = [
        (":method", "GET"), (":authority", "tickets.internal"), (":path", "/tickets/1"), (":scheme", "http"),
        ("authorization", token.as_str()), ("x-agent-intent", "ticket.read"), ("x-agent-task", "T-1"),
        ("user-agent", "wrk"), ("x-request-id", "0d8f4e8e-9a55-4b8e-8d0e-3c0b3b1c2d4e"), ("x-forwarded-proto", "http"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
    .collect();
    // Prime the caches: the first request plans an exchange; answer it.
    let headers = Headers::new(pairs.clone());
    let out = engine.on_request(&Request { headers: &headers, now: NOW });
    let Verdict::Mint(plan) = out.verdict else { panic!("expected a mint plan") };
    let mut d = out.decision;
    let body = json!({"access_token": "a.b.c", "issued_token_type": "urn:ietf:params:oauth:token-type:jwt", "expires_in": 300}).to_string();
    engine.finish_mint(&plan, Ok((200, body.as_bytes())), NOW, &mut d);
    // As the shell gets them: the host's serialized map, indexed in place.
    let map = serialize_pairs(&pairs);
    let engine_ns = bench("engine.on_request (all caches hit)", min, || {
        let headers = Headers::from_map(black_box(map.clone())).unwrap();
        let out = engine.on_request(&Request { headers: &headers, now: NOW });
        assert!(matches!(out.verdict, Verdict::Forward(_)));
        black_box(out);
    });
    let headers = Headers::new(pairs.clone());
    let out = engine.on_request(&Request { headers: &headers, now: NOW });
    bench("decision record to JSON", min, || {
        black_box(DecisionRecord::new(&out.decision, Some("prod"), "abcdef012345", 1, 2).to_json());
    });
    engine_ns
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let min = Duration::from_millis(if quick { 200 } else { 1000 });
    let es = TestKey::es256("es");
    let rsa = TestKey::rsa("rsa", 0);
    let claims = svid_claims(SUB, AUD, NOW, NOW + 300);

    let mut v = verifier(&[&es, &rsa], 0);
    let t_es = es.sign(&claims);
    let t_rs = rsa.sign_with_header("RS256", &json!({"alg": "RS256", "kid": "rsa"}), &claims);
    let t_ps = rsa.sign_with_header("PS256", &json!({"alg": "PS256", "kid": "rsa"}), &claims);
    println!("== identity (no cache)");
    let es_ns = bench("verify ES256", min, || assert!(v.verify(black_box(t_es.as_bytes()), NOW).is_ok()));
    bench("verify RS256 (2048)", min, || assert!(v.verify(black_box(t_rs.as_bytes()), NOW).is_ok()));
    bench("verify PS256 (2048)", min, || assert!(v.verify(black_box(t_ps.as_bytes()), NOW).is_ok()));
    let forged = TestKey::es256("es").sign(&claims);
    bench("reject forged ES256", min, || assert!(v.verify(black_box(forged.as_bytes()), NOW).is_err()));
    let expired = es.sign(&svid_claims(SUB, AUD, NOW - 900, NOW - 600));
    bench("reject expired ES256 (before signature)", min, || assert!(v.verify(black_box(expired.as_bytes()), NOW).is_err()));

    let mut cached = verifier(&[&es], 1024);
    cached.verify(t_es.as_bytes(), NOW).unwrap();
    println!("== identity (cache)");
    let hit_ns = bench("verified-token cache hit", min, || assert!(cached.verify(black_box(t_es.as_bytes()), NOW).is_ok()));

    println!("== policy (200 rules, uncached)");
    let mut resources = Vec::new();
    let mut intents = Vec::new();
    let mut rules = Vec::new();
    for i in 0..50 {
        resources.push(json!({"name": format!("svc{i}"), "hosts": [format!("svc{i}.internal")], "paths": ["/api/{v}/items/**"], "sensitivity": "internal"}));
        intents.push(json!({"name": format!("svc{i}.read"), "operations": [{"resource": format!("svc{i}"), "methods": ["GET"]}], "scopes": [format!("svc{i}:read")]}));
    }
    for i in 0..200 {
        let svc = i % 50;
        rules.push(if i % 4 == 3 {
            json!({"id": format!("deny{i}"), "effect": "deny", "principals": [format!("spiffe://example.org/blocked/{i}")]})
        } else {
            json!({"id": format!("allow{i}"), "effect": "allow", "classes": ["agent"], "intents": [format!("svc{svc}.read")],
                   "principals": [format!("spiffe://example.org/agent/*")], "when": {"days": ["mon","tue","wed","thu","fri"], "hours": ["06:00-22:00"]}})
        });
    }
    let pc: PolicyConfig = serde_json::from_value(json!({
        "classes": [{"name": "agent", "principals": ["spiffe://example.org/agent/*"], "intent_required": true}],
        "resources": resources, "intents": intents, "rules": rules
    }))
    .unwrap();
    let policy = Policy::compile(&pc, "policy").unwrap();
    let input = PolicyInput {
        principal: SUB,
        iat: Some(NOW),
        exp: NOW + 300,
        intent: Some("svc49.read"),
        signed_intent: None,
        task: None,
        method: "GET",
        authority: "svc49.internal",
        path: "/api/v1/items/42",
        now: NOW,
        environment: Some("prod"),
        standing_secret: false,
        minter: false,
        mcp: None,
    };
    assert_eq!(policy.evaluate(&input).effect, mandate_core::decision::Effect::Allow);
    let pol_ns = bench("evaluate (last resource, 200 rules)", min, || {
        black_box(policy.evaluate(black_box(&input)));
    });
    println!("== engine (warm path: identity, decision and credential caches hit)");
    let engine_ns = warm_engine(min);
    println!("== ratios (same run)");
    println!("warm engine request / cache hit  {:>8.1}x", engine_ns / hit_ns);
    println!("ES256 verify / cache hit        {:>8.1}x", es_ns / hit_ns);
    println!("200-rule evaluation / ES256     {:>8.4}x", pol_ns / es_ns);
}
