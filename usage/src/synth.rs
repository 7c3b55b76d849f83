//! Synthetic decision logs from policy case files: each case judged by the engine and written
//! as the record the filter would log, repeated round-robin up to the wanted size. For the
//! tests and the bench of `mandate policy usage` / `suggest`.

use anyhow::{Context as _, Result};
use mandate_core::decision::Effect;
use mandate_core::policy::cases::{self, CaseFile, CaseRequest};
use mandate_core::policy::{Policy, PolicyDecision};
use serde_json::{json, Value};
use std::io::Write;
use std::path::{Path, PathBuf};

/// A case file's requests, each with the case file's `minter` default applied.
pub fn load_cases(case_file: &Path) -> Result<(PathBuf, Vec<CaseRequest>)> {
    let raw = std::fs::read(case_file).with_context(|| format!("reading {}", case_file.display()))?;
    let file: CaseFile = serde_json::from_slice(&raw).with_context(|| format!("parsing {}", case_file.display()))?;
    let policy = case_file.parent().unwrap_or(Path::new(".")).join(&file.policy);
    let reqs = file
        .cases
        .into_iter()
        .map(|c| {
            let mut r = c.request;
            r.minter = r.minter.or(Some(file.minter));
            r
        })
        .collect();
    Ok((policy, reqs))
}

fn effect_code(e: Effect) -> &'static str {
    match e {
        Effect::Allow => "allow",
        Effect::Deny => "deny",
        Effect::DryRunDeny => "dry_run_deny",
    }
}

/// The record the filter would write for this request and decision.
pub fn record(policy: &Policy, r: &CaseRequest, d: &PolicyDecision, ts_ms: u64, seq: u64, jti: Option<&str>) -> Value {
    let td = r.principal.strip_prefix("spiffe://").and_then(|s| s.split('/').next());
    let minter = r.minter.unwrap_or(false);
    let through = d.effect != Effect::Deny;
    let mcp = r.mcp.as_ref().map(|m| {
        json!({
            "method": m.method,
            "tool": m.name.clone().or_else(|| m.uri.clone()),
            "path": "header",
            "checked": d.mcp_checked,
        })
    });
    let delegation = r.delegation.as_ref().map(|dl| {
        json!({
            "txn": format!("sha256:{:012x}", seq / 7),
            "token_hash": format!("sha256:{:012x}", seq),
            "depth": dl.chain.len().saturating_sub(1),
            "chain": dl.chain.iter().map(|p| json!({"principal": p, "class": policy.class_name(p)})).collect::<Vec<_>>(),
        })
    });
    // As the filter records them: the intent a lone signed intent names, the task it carries.
    let intent = r.intent.clone().or_else(|| match r.signed_intent.as_ref().map(|s| s.intents.as_slice()) {
        Some([only]) => Some(only.clone()),
        _ => None,
    });
    let task = r.task.clone().or_else(|| r.signed_intent.as_ref().and_then(|s| s.task.clone()));
    let mut v = json!({
        "ts_ms": ts_ms,
        "decision_id": format!("{seq:024x}"),
        "effect": effect_code(d.effect),
        "reason": d.reason.code(),
        "dry_run": d.effect == Effect::DryRunDeny,
        "identity": r.principal,
        "trust_domain": td,
        "class": d.class,
        "owner": d.owner,
        "token_hash": format!("sha256:{:012x}", seq % 4096),
        "intent": intent,
        "task": task,
        "intent_signed": r.signed_intent.is_some(),
        "delegation": delegation,
        "method": if r.mcp.is_some() && r.method == "GET" { "POST" } else { r.method.as_str() },
        "authority": r.authority,
        "path": r.path,
        "resource": d.resource,
        "sensitivity": d.sensitivity,
        "environment": r.environment.clone().or_else(|| policy.environment.clone()),
        "scopes": d.scopes,
        "ttl_s": d.ttl_s,
        "credential": if d.effect == Effect::Allow && minter { json!({"jti": jti, "exp": ts_ms / 1000 + d.ttl_s.unwrap_or(60), "kind": "minted"}) } else { Value::Null },
        "cache": {"identity": false, "decision": false, "credential": false},
        "duration_us": 40 + seq % 50,
        "request_id": null,
        "traceparent": null,
        "plugin_version": mandate_core::VERSION,
        "policy_hash": "sha256:5ynth5ynth5y",
    });
    if let Some(o) = v.as_object_mut() {
        if let Some(id) = &d.rule_id {
            o.insert("rule_id".into(), json!(id));
        }
        if let Some(id) = &d.dry_run_rule_id {
            o.insert("dry_run_rule_id".into(), json!(id));
        }
        if let Some(m) = mcp {
            o.insert("mcp".into(), m);
        }
        if through && d.effect == Effect::DryRunDeny && minter {
            o.insert("credential_withheld".into(), json!("dry_run"));
        }
    }
    v
}

/// What [`generate`] wrote.
#[derive(Debug, Clone, Default)]
pub struct Generated {
    pub records: u64,
    pub cases: usize,
    pub dropped_cases: usize,
}

/// Writes `n` records (one JSON line each, with the `mandate.decision ` prefix when
/// `prefixed`) from the cases of `case_file`, round-robin. Cases the policy allows under one
/// of `drop_rules` are left out, so those grants go unused. Every 5th use of a case's
/// credential is a new credential (its uses are milliseconds apart).
pub fn generate(case_file: &Path, n: u64, drop_rules: &[&str], prefixed: bool, out: &mut impl Write) -> Result<Generated> {
    let (policy_path, reqs) = load_cases(case_file)?;
    let policy = cases::load_policy(&policy_path).map_err(anyhow::Error::msg)?;
    let mut judged = Vec::new();
    let mut dropped = 0;
    for r in reqs {
        let d = cases::evaluate_request(&policy, &r).map_err(anyhow::Error::msg)?;
        if d.effect != Effect::Deny && d.rule_id.as_deref().is_some_and(|id| drop_rules.contains(&id)) {
            dropped += 1;
            continue;
        }
        judged.push((r, d));
    }
    anyhow::ensure!(!judged.is_empty(), "{}: no cases left", case_file.display());
    let mut buf = Vec::with_capacity(2048);
    for seq in 0..n {
        let k = (seq % judged.len() as u64) as usize;
        let round = seq / judged.len() as u64;
        let Some((r, d)) = judged.get(k) else { continue };
        let base = cases::parse_time(&r.time).unwrap_or(0) * 1000;
        // Within the case's own second (time windows stay as the case says).
        let ts = base + round % 1000;
        let jti = format!("j{k}-{}", round / 5);
        buf.clear();
        if prefixed {
            buf.extend_from_slice(mandate_core::record::LOG_PREFIX.as_bytes());
        }
        serde_json::to_writer(&mut buf, &record(&policy, r, d, ts, seq, Some(&jti)))?;
        buf.push(b'\n');
        out.write_all(&buf)?;
    }
    Ok(Generated { records: n, cases: judged.len(), dropped_cases: dropped })
}
