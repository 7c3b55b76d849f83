//! `mandate policy suggest`: a tighter policy from the evidence, and the replay that proves it
//! allows exactly what the log shows was allowed and used.
//!
//! Every edit only narrows: allow rules lose intents, resources or principals (or go), MCP
//! operations lose tools, intents' credential lifetimes go down, unused delegation rules go.
//! Deny rules, classes, resources and everything else are left as written.

use super::log::{self, Line, LogReader, Next, Record};
use super::{Model, Usage, NO_OWNER};
use anyhow::{Context as _, Result};
use mandate_core::decision::Effect;
use mandate_core::policy::cases::{self, CaseDelegation, CaseMcp, CaseRequest, CaseSignedIntent};
use mandate_core::policy::{PolicyDecision, RuleEffect};
use serde::Serialize;
use serde_json::{json, Value};
use std::path::Path;

/// Most principals a rule is narrowed to; beyond this the wildcard stays (and is reported).
pub const MAX_NARROWED_PRINCIPALS: usize = 20;
/// Shortest credential lifetime suggested, seconds.
pub const MIN_TTL_S: u64 = 60;

#[derive(Debug, Clone, Serialize)]
pub struct Change {
    pub subject: String,
    pub change: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Suggestion {
    /// The tightened policy (a whole plugin configuration if the input was one).
    pub document: Value,
    pub changes: Vec<Change>,
}

fn names(v: &[String]) -> Value {
    Value::Array(v.iter().map(|s| Value::String(s.clone())).collect())
}

fn rule_matches_class_intent(r: &mandate_core::policy::RuleConfig, class: &str, intent: &str) -> bool {
    (r.classes.is_empty() || r.classes.iter().any(|c| c == class)) && (r.intents.is_empty() || r.intents.iter().any(|i| i == intent))
}

/// Builds the tightened policy. It is not yet checked: [`replay`] does that.
pub fn suggest(m: &Model, u: &Usage) -> Result<Suggestion> {
    let mut p = m.raw.clone();
    let mut changes = Vec::new();
    let mut ch = |subject: String, change: String| changes.push(Change { subject, change });
    let cfg = &m.cfg;

    // Rules: by index in the original, edited in place; removals applied last.
    let mut remove_rules = Vec::new();
    for (ri, rule) in cfg.rules.iter().enumerate() {
        if rule.effect != RuleEffect::Allow {
            continue;
        }
        let subject = format!("rule `{}`", rule.id);
        let grants: Vec<(usize, &super::Grant)> = m.grants.iter().enumerate().filter(|(_, g)| g.rule_index == ri).collect();
        let used: Vec<&super::Grant> = grants.iter().filter(|(gi, _)| u.grant_uses.get(*gi).copied().unwrap_or(0) > 0).map(|(_, g)| *g).collect();
        // A principal earlier in an allowed delegation chain was judged by the rules too, but
        // the record names only the caller's rule: keep every rule that could have been its.
        if u.chain_uses.iter().any(|(c, is)| is.iter().any(|i| rule_matches_class_intent(rule, c, i))) {
            if used.len() < grants.len() {
                ch(subject, "kept as is: it may have allowed principals earlier in a delegation chain (their rules are not recorded)".into());
            }
            continue;
        }
        if used.is_empty() {
            ch(subject, format!("removed: none of its {} grant(s) was used", grants.len()));
            remove_rules.push(ri);
            continue;
        }
        let Some(rv) = p.get_mut("rules").and_then(|r| r.get_mut(ri)) else { continue };
        // Intents: those used (identity-only grants, without an intent, keep the list open).
        if !used.iter().any(|g| g.intent.is_none()) {
            let effective: Vec<&String> = if rule.intents.is_empty() { cfg.intents.iter().map(|i| &i.name).collect() } else { rule.intents.iter().collect() };
            let kept: Vec<String> = effective.iter().filter(|i| used.iter().any(|g| g.intent.as_deref() == Some(i.as_str()))).map(|s| s.to_string()).collect();
            if kept.len() < effective.len() {
                let dropped: Vec<&str> = effective.iter().filter(|i| !kept.contains(i)).map(|s| s.as_str()).collect();
                ch(subject.clone(), format!("intents narrowed to {kept:?} (never used: {dropped:?})"));
                rv["intents"] = names(&kept);
            }
            // Resources: those used, when the kept intents reach more.
            if !used.iter().any(|g| g.resource.is_none()) {
                let mut reach: Vec<String> = Vec::new();
                for it in cfg.intents.iter().filter(|i| kept.contains(&i.name)) {
                    for op in &it.operations {
                        if (rule.resources.is_empty() || rule.resources.contains(&op.resource)) && !reach.contains(&op.resource) {
                            reach.push(op.resource.clone());
                        }
                    }
                }
                let used_res: Vec<String> = reach.iter().filter(|r| used.iter().any(|g| g.resource.as_deref() == Some(r.as_str()))).cloned().collect();
                if used_res.len() < reach.len() {
                    let dropped: Vec<&String> = reach.iter().filter(|r| !used_res.contains(r)).collect();
                    ch(subject.clone(), format!("resources narrowed to {used_res:?} (never used: {dropped:?})"));
                    rv["resources"] = names(&used_res);
                }
            }
        }
        // Wildcard principals (a `*` pattern, or a rule for anyone) → the principals seen.
        let wildcard = rule.principals.iter().any(|x| x.contains('*')) || (rule.principals.is_empty() && rule.classes.is_empty());
        if wildcard {
            let seen = u.rule_principals.get(ri).cloned().unwrap_or_default();
            if !seen.overflow && !seen.names.is_empty() && seen.names.len() <= MAX_NARROWED_PRINCIPALS && seen.names.iter().all(|s| !s.contains('*')) {
                let list = seen.sorted();
                ch(subject.clone(), format!("principals narrowed from {:?} to the {} seen", if rule.principals.is_empty() { vec!["anyone".to_string()] } else { rule.principals.clone() }, list.len()));
                rv["principals"] = names(&list);
            } else {
                ch(subject.clone(), format!("wildcard principals kept: {} distinct principals used it (narrowing stops at {MAX_NARROWED_PRINCIPALS})", if seen.overflow { "too many".to_string() } else { seen.names.len().to_string() }));
            }
        }
    }
    if let Some(rules) = p.get_mut("rules").and_then(Value::as_array_mut) {
        for ri in remove_rules.iter().rev() {
            if *ri < rules.len() {
                rules.remove(*ri);
            }
        }
    }

    // Intents: MCP tools narrowed to those called; credential lifetimes to what was used.
    for (ii, it) in cfg.intents.iter().enumerate() {
        let subject = format!("intent `{}`", it.name);
        for (oi, op) in it.operations.iter().enumerate() {
            let Some(globs) = op.tools.as_ref().and_then(|t| serde_json::from_value::<Vec<String>>(t.clone()).ok()) else { continue };
            let Some(called) = u.tools.get(&it.name).and_then(|r| r.get(&op.resource)) else { continue };
            if called.overflow {
                continue;
            }
            let compiled: Vec<_> = globs.iter().filter_map(|g| mandate_core::policy::mcp::Glob::compile(g, false).ok()).collect();
            let kept: Vec<String> = called.sorted().into_iter().filter(|t| !t.contains('*') && compiled.iter().any(|g| g.matches(t))).collect();
            if kept.is_empty() || kept == globs {
                continue;
            }
            ch(subject.clone(), format!("operation on `{}`: tools {:?} narrowed to those called, {:?}", op.resource, globs, kept));
            if let Some(o) = p.get_mut("intents").and_then(|i| i.get_mut(ii)).and_then(|i| i.get_mut("operations")).and_then(|o| o.get_mut(oi)) {
                o["tools"] = names(&kept);
            }
        }
        if !u.cred_overflow {
            if let Some(span) = u.cred_span.get(&it.name) {
                let needed = (span + 1).div_ceil(30) * 30;
                let ttl = needed.max(MIN_TTL_S);
                if ttl < it.ttl_s {
                    ch(subject.clone(), format!("ttl_s {} -> {ttl} (longest a credential was used: {span} s)", it.ttl_s));
                    if let Some(iv) = p.get_mut("intents").and_then(|i| i.get_mut(ii)) {
                        iv["ttl_s"] = json!(ttl);
                    }
                }
            }
        }
    }

    // Delegation rules no allowed chain used.
    let report = u.report(m);
    if !report.delegation_rules_unused.is_empty() && u.records > 0 {
        if let Some(drs) = p.get_mut("delegation_rules").and_then(Value::as_array_mut) {
            drs.retain(|d| {
                let id = d.get("id").and_then(Value::as_str).unwrap_or_default();
                !report.delegation_rules_unused.iter().any(|x| x == id)
            });
        }
        for r in &report.delegation_rules_unused {
            ch(format!("delegation rule `{r}`"), "removed: no allowed chain used this edge".into());
        }
    }
    let _ = NO_OWNER;
    let document = match &m.wrapped {
        Some(w) => {
            let mut w = w.clone();
            w["policy"] = p;
            w
        }
        None => p,
    };
    Ok(Suggestion { document, changes })
}

/// The replay: every record of the log judged again, by the policy in force and by the
/// suggestion. A record the policy in force does not reproduce (another policy version, an
/// argument recorded only as a hash, a refusal after the policy such as a revoked task) is
/// counted, not judged.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Replay {
    pub records: u64,
    pub reproduced: u64,
    pub unreproducible: u64,
    /// Reproduced records the suggestion judges differently (effect, or the allowing rule).
    pub mismatches: u64,
    /// Reproduced allows (what was allowed and used).
    pub allowed: u64,
    /// The first mismatches: line, logged effect/rule, suggested effect/rule (no values).
    pub examples: Vec<String>,
    /// The first records the policy in force did not reproduce: line, logged and replayed verdicts.
    pub unreproducible_examples: Vec<String>,
}

impl Replay {
    pub fn passed(&self) -> bool {
        self.mismatches == 0
    }
}

fn request_of(m: &Model, rec: &Record<'_>, minter: bool, signed_task: bool) -> Option<CaseRequest> {
    let principal = rec.identity.as_deref()?.to_string();
    let mcp = match &rec.mcp {
        Some(c) => {
            let method = c.method.as_deref()?.to_string();
            let tool = c.tool.as_deref().map(str::to_string);
            // Arguments: only those recorded as values; a hashed one cannot be replayed.
            let mut args = serde_json::Map::new();
            for chk in &c.checked {
                let Some(v) = &chk.value else { continue };
                if v.as_str().is_some_and(|s| s.starts_with("sha256:")) {
                    return None;
                }
                let ptr: Vec<&str> = chk.pointer.split('/').skip(1).collect();
                let mut cur = &mut args;
                for (i, seg) in ptr.iter().enumerate() {
                    let seg = seg.replace("~1", "/").replace("~0", "~");
                    if i + 1 == ptr.len() {
                        cur.insert(seg, v.clone());
                    } else {
                        let next = cur.entry(seg).or_insert_with(|| Value::Object(Default::default()));
                        cur = next.as_object_mut()?;
                    }
                }
            }
            Some(CaseMcp {
                name: tool.clone().filter(|_| method == "tools/call" || method == "prompts/get"),
                uri: tool.filter(|_| method == "resources/read"),
                arguments: if method == "tools/call" || method == "prompts/get" { Some(Value::Object(args)) } else { None },
                method,
                id: None,
                headers: None,
            })
        }
        None => None,
    };
    let delegation = rec.delegation.as_ref().filter(|d| !d.chain.is_empty()).map(|d| CaseDelegation {
        chain: d.chain.iter().map(|c| c.principal.to_string()).collect(),
        intent: None,
        task: None,
        scope: None,
        resources: None,
        tools: None,
        arguments: None,
        // The token named the workload serving a `forward` resource if the request passed.
        may_act: rec.resource.as_deref().and_then(|r| m.cfg.resources.iter().find(|x| x.name == r)).and_then(|x| x.workload.clone()),
    });
    let reason = rec.reason.as_ref();
    Some(CaseRequest {
        principal,
        token_lifetime_s: Some(if reason == "token_lifetime_exceeded" { 1_000_000 } else { 1 }),
        iat: None,
        exp: None,
        intent: rec.intent.as_deref().map(str::to_string),
        task: rec.task.as_deref().map(str::to_string),
        signed_intent: rec.intent_signed.then(|| CaseSignedIntent { intents: rec.intent.iter().map(|s| s.to_string()).collect(), task: rec.task.as_deref().filter(|_| signed_task).map(str::to_string) }),
        method: rec.method.as_deref()?.to_string(),
        authority: rec.authority.as_deref()?.to_string(),
        path: rec.path.as_deref()?.to_string(),
        time: (rec.ts_ms / 1000).to_string(),
        environment: rec.environment.as_deref().map(str::to_string),
        standing_secret: reason == "standing_secret_presented",
        minter: Some(minter),
        mcp,
        delegation,
    })
}

fn effect_code(e: Effect) -> &'static str {
    match e {
        Effect::Allow => "allow",
        Effect::Deny => "deny",
        Effect::DryRunDeny => "dry_run_deny",
    }
}

fn same_as_logged(d: &PolicyDecision, rec: &Record<'_>) -> bool {
    effect_code(d.effect) == rec.effect && d.reason.code() == rec.reason && d.rule_id.as_deref() == rec.rule_id.as_deref() && d.dry_run_rule_id.as_deref() == rec.dry_run_rule_id.as_deref()
}

fn verdict(d: &PolicyDecision) -> String {
    format!("{} {} (rule {})", effect_code(d.effect), d.reason.code(), d.rule_id.as_deref().or(d.dry_run_rule_id.as_deref()).unwrap_or("-"))
}

/// Judges one record by both policies: `Err` (what the policy in force said, if it could judge
/// it) when that policy does not reproduce the record.
fn judge(old: &Model, new: &Model, rec: &Record<'_>) -> Result<(PolicyDecision, PolicyDecision), String> {
    // Whether a minter was configured is not in the record: whichever reproduces it.
    let mut last = "not replayable (no identity, operation, or an argument recorded as a hash)".to_string();
    // Nor whether a signed intent token carried the task.
    let guesses = [(rec.credential.is_some() || rec.credential_withheld.is_some() || rec.effect != "allow", true), (false, true), (true, true), (true, false), (false, false)];
    for (minter, signed_task) in guesses {
        if !signed_task && !rec.intent_signed {
            continue;
        }
        let Some(req) = request_of(old, rec, minter, signed_task) else { return Err(last) };
        let d_old = cases::evaluate_request(&old.policy, &req)?;
        if same_as_logged(&d_old, rec) {
            let d_new = cases::evaluate_request(&new.policy, &req)?;
            return Ok((d_old, d_new));
        }
        last = verdict(&d_old);
    }
    Err(last)
}

/// Replays a log against the policy in force (`old`) and the suggestion (`new`).
pub fn replay(old: &Model, new: &Model, path: &Path) -> Result<Replay> {
    let mut r = LogReader::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut out = Replay::default();
    loop {
        let n = r.line_no + 1;
        let line = match r.next_line()? {
            Next::End => break,
            Next::TooLong => continue,
            Next::Line(l) => l,
        };
        let mut one = |rec: &Record<'_>| {
            out.records += 1;
            let d_new = match judge(old, new, rec) {
                Ok((_, d)) => d,
                Err(why) => {
                    out.unreproducible += 1;
                    if out.unreproducible_examples.len() < 10 {
                        out.unreproducible_examples.push(format!(
                            "line {n}: logged {} {} (rule {}), the policy in force now says {why}",
                            rec.effect,
                            rec.reason,
                            rec.rule_id.as_deref().or(rec.dry_run_rule_id.as_deref()).unwrap_or("-")
                        ));
                    }
                    return;
                }
            };
            out.reproduced += 1;
            if rec.effect == "allow" {
                out.allowed += 1;
            }
            let same = effect_code(d_new.effect) == rec.effect && (rec.effect == "deny" || d_new.rule_id.as_deref() == rec.rule_id.as_deref());
            if !same {
                out.mismatches += 1;
                if out.examples.len() < 10 {
                    out.examples.push(format!(
                        "line {n}: logged {} (rule {}), suggested {} {} (rule {})",
                        rec.effect,
                        rec.rule_id.as_deref().unwrap_or("-"),
                        effect_code(d_new.effect),
                        d_new.reason.code(),
                        d_new.rule_id.as_deref().unwrap_or("-")
                    ));
                }
            }
        };
        match log::parse_line(line) {
            Line::Record(rec) => one(&rec),
            Line::Nested(s) => {
                if let Line::Record(rec) = log::parse_record(s.as_bytes()) {
                    one(&rec)
                }
            }
            _ => {}
        }
    }
    Ok(out)
}

/// A readable unified diff of two JSON documents (pretty-printed, keys sorted).
pub fn diff(old: &Value, new: &Value, old_name: &str, new_name: &str) -> String {
    let a = serde_json::to_string_pretty(old).unwrap_or_default() + "\n";
    let b = serde_json::to_string_pretty(new).unwrap_or_default() + "\n";
    similar::TextDiff::from_lines(&a, &b).unified_diff().context_radius(3).header(old_name, new_name).to_string()
}
