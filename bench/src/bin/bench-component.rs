//! `bench-component [--quick] [--component PATH]`: `decide` through the WebAssembly component
//! (wit/mandate.wit on wasmtime, `wasmtime::component::bindgen!`) against the same call into
//! mandate-core natively, warm (configured once, caches hot), measured in the same run.
//!
//! Requests: the warm allow of the MCP support policy (a tool call with argument constraints),
//! by a host-verified identity and by a raw JWT-SVID (verification cache hit), and a denial.
//! Native and component run in alternating slices (21 rounds of 100 ms each); printed are the
//! median ns/op of each, the component's decisions/s, the median per-round ratio
//! native-ns / component-ns (the component's speed relative to native; goal >= 0.5) and the
//! component's size.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use mandate_core::decide::{Caller, CallerIdentity, DecideRequest, Decider, McpRequest};
use mandate_core::policy::cases::case_config;
use mandate_core::testkit::{spiffe_bundle, svid_claims, TestKey};
use mandate_host_test::component::{default_component_path, to_wit, ComponentHost};
use serde_json::{json, Value};

const NOW: u64 = 1_795_600_800; // 2026-11-25T10:00:00Z
const AUD: &str = "spiffe://acme.example/gw";
const SUB: &str = "spiffe://acme.example/agent/support/a1";
const TASK: &str = "tsk_7Qm2xL9pV4cR8nB1sK3wJd";

/// ns/op of `f` over one slice of `dur` (after a short warm-up).
fn slice(dur: Duration, f: &mut impl FnMut()) -> f64 {
    for _ in 0..20 {
        f();
    }
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < dur {
        for _ in 0..20 {
            f();
        }
        n += 20;
    }
    start.elapsed().as_nanos() as f64 / n as f64
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Native and component in alternating slices, so a busy machine slows both alike: the
/// medians of each and the median of the per-round ratios.
fn compare(rounds: usize, dur: Duration, mut native: impl FnMut(), mut comp: impl FnMut()) -> (f64, f64, f64) {
    let (mut ns, mut cs, mut rs) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds {
        let n = slice(dur, &mut native);
        let c = slice(dur, &mut comp);
        ns.push(n);
        cs.push(c);
        rs.push(n / c);
    }
    (median(&mut ns), median(&mut cs), median(&mut rs))
}

fn request(caller: Caller, tool: &str, amount: f64) -> DecideRequest {
    DecideRequest {
        caller,
        intent: Some("refund.small".into()),
        task: Some(TASK.into()),
        intent_proof: None,
        method: "POST".into(),
        authority: "mcp.acme.internal".into(),
        path: "/mcp".into(),
        mcp: Some(McpRequest {
            method: "tools/call".into(),
            name: Some(tool.into()),
            uri: None,
            arguments: Some(json!({"ticket_id": TASK, "amount": amount}).to_string()),
        }),
        delegation: None,
        now: NOW,
        environment: None,
        standing_secret: false,
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let path = args.iter().position(|a| a == "--component").and_then(|i| args.get(i + 1)).map(PathBuf::from).unwrap_or_else(default_component_path);
    let (rounds, dur) = if quick { (5, Duration::from_millis(50)) } else { (21, Duration::from_millis(100)) };

    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let doc: Value = serde_json::from_slice(&std::fs::read(root.join("policies/mcp-support.policy.json")).unwrap()).unwrap();
    let key = TestKey::es256("k1");
    let mut cfg = case_config(&doc, true);
    cfg["identity"] = json!({"audiences": [AUD], "trust_domains": [{"name": "acme.example", "bundle": {"inline": spiffe_bundle(&[&key], None)}}]});
    let cfg = cfg.to_string();
    let token = key.sign(&svid_claims(SUB, AUD, NOW - 10, NOW + 290));
    let verified = Caller::Verified(CallerIdentity {
        principal: SUB.into(),
        trust_domain: Some("acme.example".into()),
        issued_at: Some(NOW - 10),
        expires_at: NOW + 290,
        token_hash: String::new(),
    });

    let mut native = Decider::configure(cfg.as_bytes()).unwrap();
    let host = ComponentHost::from_file(&path).unwrap();
    let mut comp = host.instantiate().unwrap();
    comp.configure(&cfg).unwrap().unwrap();

    let size = std::fs::metadata(&path).unwrap().len();
    println!("component: {} {} bytes ({:.0} KB)", path.display(), size, size as f64 / 1000.0);
    println!("{:<44} {:>12} {:>12} {:>14} {:>8}", "decide (warm)", "native ns", "component ns", "component /s", "ratio");
    let mut worst = f64::INFINITY;
    for (name, req, want) in [
        ("allow, host-verified identity", request(verified.clone(), "refund", 42.5), "allowed"),
        ("allow, raw JWT-SVID (verification cached)", request(Caller::Token(token.clone()), "refund", 42.5), "allowed"),
        ("deny, argument above the limit", request(verified.clone(), "refund", 5000.0), "argument_not_allowed"),
    ] {
        let wit_req = to_wit(&req);
        // Both faces must give the same answer before their speed means anything.
        let a = native.decide(&req);
        let b = comp.decide(&wit_req).unwrap();
        assert_eq!(a.reason.code(), want, "{name}: native");
        assert_eq!(mandate_host_test::component::core_reason(b.reason), a.reason, "{name}: component");
        let (n, c, ratio) = compare(
            rounds,
            dur,
            || {
                black_box(native.decide(black_box(&req)));
            },
            || {
                black_box(comp.decide(black_box(&wit_req)).unwrap());
            },
        );
        worst = worst.min(ratio);
        println!("{name:<44} {n:>12.0} {c:>12.0} {:>14.0} {ratio:>8.2}", 1e9 / c);
    }
    println!("worst ratio component/native: {worst:.2} (goal >= 0.50)");
}
