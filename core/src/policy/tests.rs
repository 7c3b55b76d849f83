//! Policy semantics, driven directly (no tokens).

use super::*;
use crate::decision::Effect;
use serde_json::json;

const WED_1000: u64 = 1_795_564_800 + 10 * 3600;

fn policy(v: serde_json::Value) -> Policy {
    let c: PolicyConfig = serde_json::from_value(v).unwrap();
    Policy::compile(&c, "policy").unwrap()
}

fn base() -> serde_json::Value {
    json!({
        "environment": "prod",
        "require_signed_intent_above": "confidential",
        "classes": [
            {"name": "agent", "principals": ["spiffe://example.org/agent/**"], "max_token_lifetime_s": 900,
             "intent_required": true, "max_sensitivity": "restricted", "refuse_standing_secrets": true},
            {"name": "batch", "principals": ["spiffe://example.org/batch/*"], "max_token_lifetime_s": 86400, "max_sensitivity": "internal"}
        ],
        "resources": [
            {"name": "tickets", "hosts": ["tickets.internal"], "paths": ["/tickets/**"], "sensitivity": "internal"},
            {"name": "customers", "hosts": ["crm.internal"], "paths": ["/customers/{id}"], "sensitivity": "restricted"},
            {"name": "reports", "hosts": ["reports.internal"], "paths": ["/reports/**"], "methods": ["GET"], "sensitivity": "public"}
        ],
        "intents": [
            {"name": "ticket.read", "operations": [{"resource": "tickets", "methods": ["GET"]}], "scopes": ["tickets:read"], "ttl_s": 60},
            {"name": "ticket.comment", "operations": [{"resource": "tickets", "methods": ["POST"]}], "scopes": ["tickets:comment"]},
            {"name": "customer.lookup", "operations": [{"resource": "customers", "methods": ["GET"]}], "scopes": ["crm:read"]}
        ],
        "rules": [
            {"id": "agents-tickets", "effect": "allow", "classes": ["agent"], "intents": ["ticket.read", "ticket.comment"]},
            {"id": "agents-crm", "effect": "allow", "classes": ["agent"], "intents": ["customer.lookup"], "when": {"hours": ["08:00-20:00"]}},
            {"id": "batch-reports", "effect": "allow", "classes": ["batch"], "resources": ["reports"]},
            {"id": "no-deletes", "effect": "deny", "methods": ["DELETE"]}
        ]
    })
}

fn input<'a>(principal: &'a str, intent: Option<&'a str>, method: &'a str, host: &'a str, path: &'a str) -> PolicyInput<'a> {
    PolicyInput {
        principal,
        iat: Some(WED_1000 - 60),
        exp: WED_1000 + 240,
        intent,
        signed_intent: None,
        task: None,
        method,
        authority: host,
        path,
        now: WED_1000,
        environment: Some("prod"),
        standing_secret: false,
        minter: false,
        mcp: None,
    }
}

const AGENT: &str = "spiffe://example.org/agent/support/a1";

#[test]
fn allow_carries_rule_scopes_and_ttl() {
    let p = policy(base());
    let d = p.evaluate(&input(AGENT, Some("ticket.read"), "GET", "tickets.internal", "/tickets/1"));
    assert_eq!((d.effect, d.reason), (Effect::Allow, Reason::Allowed));
    assert_eq!(d.rule_id.as_deref(), Some("agents-tickets"));
    assert_eq!(d.scopes, vec!["tickets:read"]);
    assert_eq!(d.ttl_s, Some(60));
    assert_eq!(d.class.as_deref(), Some("agent"));
    assert_eq!(d.resource.as_deref(), Some("tickets"));
    assert_eq!(d.sensitivity.as_deref(), Some("internal"));
}

#[test]
fn intent_mismatch_even_if_another_intent_would_allow() {
    let p = policy(base());
    let d = p.evaluate(&input(AGENT, Some("ticket.read"), "POST", "tickets.internal", "/tickets/1"));
    assert_eq!(d.reason, Reason::IntentMismatch);
    assert_eq!(d.effect, Effect::Deny);
    assert!(d.scopes.is_empty());
}

#[test]
fn agent_without_intent_refused() {
    let p = policy(base());
    assert_eq!(p.evaluate(&input(AGENT, None, "GET", "tickets.internal", "/tickets/1")).reason, Reason::IntentRequired);
}

#[test]
fn unknown_intent_refused() {
    let p = policy(base());
    assert_eq!(p.evaluate(&input(AGENT, Some("ticket.delete"), "GET", "tickets.internal", "/tickets/1")).reason, Reason::IntentUnknown);
}

#[test]
fn signed_intent_required_above_confidential() {
    let p = policy(base());
    let i = input(AGENT, Some("customer.lookup"), "GET", "crm.internal", "/customers/7");
    assert_eq!(p.evaluate(&i).reason, Reason::IntentTokenRequired);
    let signed = SignedIntent { intents: vec!["customer.lookup".into()], task: Some("T-1".into()), exp: WED_1000 + 60, from_txn_token: false };
    let d = p.evaluate(&PolicyInput { signed_intent: Some(&signed), ..i.clone() });
    assert_eq!(d.effect, Effect::Allow, "{d:?}");
    let other = SignedIntent { intents: vec!["ticket.read".into()], task: None, exp: WED_1000 + 60, from_txn_token: false };
    assert_eq!(p.evaluate(&PolicyInput { signed_intent: Some(&other), ..i }).reason, Reason::IntentTokenInvalid);
}

#[test]
fn time_window_and_its_boundary() {
    let p = policy(base());
    let signed = SignedIntent { intents: vec!["customer.lookup".into()], task: None, exp: u64::MAX, from_txn_token: false };
    let at = |now| PolicyInput { now, signed_intent: Some(&signed), ..input(AGENT, Some("customer.lookup"), "GET", "crm.internal", "/customers/7") };
    let wed_1959 = 1_795_564_800 + 20 * 3600 - 1;
    let d = p.evaluate(&at(wed_1959));
    assert_eq!(d.effect, Effect::Allow);
    assert_eq!(d.valid_until, 1_795_564_800 + 20 * 3600, "an allow at 19:59:59 expires at 20:00");
    assert_eq!(p.evaluate(&at(wed_1959 + 1)).reason, Reason::NoRuleMatched);
}

#[test]
fn class_sensitivity_ceiling() {
    let p = policy(base());
    let batch = "spiffe://example.org/batch/nightly";
    let mut i = input(batch, None, "GET", "crm.internal", "/customers/1");
    i.iat = Some(WED_1000 - 3600);
    assert_eq!(p.evaluate(&i).reason, Reason::SensitivityExceeded);
    i.authority = "reports.internal";
    i.path = "/reports/daily";
    assert_eq!(p.evaluate(&i).effect, Effect::Allow);
}

#[test]
fn unknown_destination_is_treated_as_most_sensitive() {
    let p = policy(base());
    let mut i = input("spiffe://example.org/batch/nightly", None, "GET", "unknown.internal", "/x");
    i.iat = Some(WED_1000 - 60);
    assert_eq!(p.evaluate(&i).reason, Reason::SensitivityExceeded);
}

#[test]
fn long_lived_token_refused_for_agents() {
    let p = policy(base());
    let mut i = input(AGENT, Some("ticket.read"), "GET", "tickets.internal", "/tickets/1");
    i.iat = Some(WED_1000 - 3600);
    assert_eq!(p.evaluate(&i).reason, Reason::TokenLifetimeExceeded);
    i.iat = None;
    assert_eq!(p.evaluate(&i).reason, Reason::TokenLifetimeExceeded, "unknown lifetime fails closed");
}

#[test]
fn standing_secret_refused_for_agent_class() {
    let p = policy(base());
    let i = PolicyInput { standing_secret: true, ..input(AGENT, Some("ticket.read"), "GET", "tickets.internal", "/tickets/1") };
    assert_eq!(p.evaluate(&i).reason, Reason::StandingSecretPresented);
}

#[test]
fn deny_rule_wins() {
    let mut v = base();
    v["intents"][0]["operations"][0]["methods"] = json!(["GET", "DELETE"]);
    let p = policy(v);
    let d = p.evaluate(&input(AGENT, Some("ticket.read"), "DELETE", "tickets.internal", "/tickets/1"));
    assert_eq!((d.reason, d.rule_id.as_deref()), (Reason::DeniedByRule, Some("no-deletes")));
}

#[test]
fn default_deny_without_rules() {
    let mut v = base();
    v["rules"] = json!([]);
    let p = policy(v);
    assert_eq!(p.evaluate(&input(AGENT, Some("ticket.read"), "GET", "tickets.internal", "/tickets/1")).reason, Reason::NoRuleMatched);
}

#[test]
fn global_dry_run_records_but_allows() {
    let mut v = base();
    v["dry_run"] = json!(true);
    let p = policy(v);
    let d = p.evaluate(&input(AGENT, Some("ticket.read"), "POST", "tickets.internal", "/tickets/1"));
    assert_eq!(d.effect, Effect::DryRunDeny);
    assert_eq!(d.dry_run_reason, Some(Reason::IntentMismatch));
}

#[test]
fn dry_run_deny_rule_is_recorded_not_enforced() {
    let mut v = base();
    v["rules"] = json!([
        {"id": "trial-deny", "effect": "deny", "intents": ["ticket.comment"], "dry_run": true},
        {"id": "agents-tickets", "effect": "allow", "classes": ["agent"], "intents": ["ticket.read", "ticket.comment"]}
    ]);
    let p = policy(v);
    let d = p.evaluate(&input(AGENT, Some("ticket.comment"), "POST", "tickets.internal", "/tickets/1"));
    assert_eq!(d.effect, Effect::DryRunDeny);
    assert_eq!(d.dry_run_rule_id.as_deref(), Some("trial-deny"));
    assert_eq!(d.rule_id.as_deref(), Some("agents-tickets"), "the allow rule that let it through is kept");
}

#[test]
fn environment_condition() {
    let mut v = base();
    v["rules"] = json!([{"id": "staging-only", "effect": "allow", "intents": ["ticket.read"], "environments": ["staging"]}]);
    let p = policy(v);
    let i = input(AGENT, Some("ticket.read"), "GET", "tickets.internal", "/tickets/1");
    assert_eq!(p.evaluate(&i).reason, Reason::NoRuleMatched);
    assert_eq!(p.evaluate(&PolicyInput { environment: Some("staging"), ..i }).effect, Effect::Allow);
}

fn compile_err(v: serde_json::Value) -> ConfigError {
    let c: PolicyConfig = serde_json::from_value(v).unwrap();
    Policy::compile(&c, "policy").unwrap_err()
}

#[test]
fn invalid_policies_are_refused_naming_the_field() {
    let mut v = base();
    v["rules"][0]["intents"] = json!(["ticket.read", "nope"]);
    assert_eq!(compile_err(v).field, "policy.rules[0].intents[1]");
    let mut v = base();
    v["intents"][0]["operations"][0]["resource"] = json!("ghost");
    assert_eq!(compile_err(v).field, "policy.intents[0].operations[0].resource");
    let mut v = base();
    v["classes"][0]["principals"] = json!([""]);
    assert_eq!(compile_err(v).field, "policy.classes[0].principals[0]");
    let mut v = base();
    v["rules"][1]["when"] = json!({"hours": ["8-20"]});
    assert_eq!(compile_err(v).field, "policy.rules[1].when");
    let mut v = base();
    v["resources"][0]["sensitivity"] = json!("top-secret");
    assert_eq!(compile_err(v).field, "policy.resources[0].sensitivity");
    let mut v = base();
    v["rules"][0]["dry_run"] = json!(true);
    assert_eq!(compile_err(v).field, "policy.rules[0].dry_run");
}

#[test]
fn lint_finds_unreachable_and_ungranted() {
    let mut v = base();
    v["intents"].as_array_mut().unwrap().push(json!({"name": "orphan", "operations": [{"resource": "tickets"}]}));
    v["rules"] = json!([
        {"id": "deny-all-tickets", "effect": "deny", "resources": ["tickets"]},
        {"id": "allow-tickets", "effect": "allow", "resources": ["tickets"], "intents": ["ticket.read"]}
    ]);
    let p = policy(v);
    let findings = lint::lint(&p);
    let text: Vec<String> = findings.iter().map(|f| format!("{} {}", f.subject, f.message)).collect();
    assert!(text.iter().any(|t| t.contains("allow-tickets") && t.contains("unreachable")), "{text:?}");
    assert!(text.iter().any(|t| t.contains("`orphan`") && t.contains("no allow rule")), "{text:?}");
}

#[test]
fn unclassified_principal_is_refused_when_classes_exist() {
    let p = policy(base());
    let d = p.evaluate(&input("spiffe://example.org/unknown/x", None, "GET", "reports.internal", "/reports/1"));
    assert_eq!(d.reason, Reason::UnclassifiedPrincipal);
    let mut v = base();
    v["unclassified"] = json!("allow");
    v["rules"].as_array_mut().unwrap().push(json!({"id": "anyone-reports", "effect": "allow", "resources": ["reports"]}));
    let p = policy(v);
    assert_eq!(p.evaluate(&input("spiffe://example.org/unknown/x", None, "GET", "reports.internal", "/reports/1")).effect, Effect::Allow);
}

#[test]
fn signed_token_listing_several_intents_needs_a_declared_one() {
    let mut v = base();
    v["classes"][1]["max_sensitivity"] = json!("restricted");
    v["rules"].as_array_mut().unwrap().push(json!({"id": "batch-anything", "effect": "allow", "classes": ["batch"]}));
    let p = policy(v);
    let signed = SignedIntent { intents: vec!["ticket.read".into(), "ticket.comment".into()], task: None, exp: WED_1000 + 60, from_txn_token: false };
    let mut i = input("spiffe://example.org/batch/nightly", None, "GET", "crm.internal", "/customers/1");
    i.signed_intent = Some(&signed);
    assert_eq!(p.evaluate(&i).reason, Reason::IntentRequired);
}

#[test]
fn require_task_binds_the_task_to_the_signed_token() {
    let mut v = base();
    v["intents"][2]["require_signed"] = json!(true);
    v["intents"][2]["require_task"] = json!(true);
    let p = policy(v);
    let no_task = SignedIntent { intents: vec!["customer.lookup".into()], task: None, exp: WED_1000 + 60, from_txn_token: false };
    let with_task = SignedIntent { intents: vec!["customer.lookup".into()], task: Some("CASE-7".into()), exp: WED_1000 + 60, from_txn_token: false };
    let base_in = input(AGENT, Some("customer.lookup"), "GET", "crm.internal", "/customers/7");
    let claimed_only = PolicyInput { signed_intent: Some(&no_task), task: Some("CASE-7"), ..base_in.clone() };
    assert_eq!(p.evaluate(&claimed_only).reason, Reason::TaskRequired, "a header task is not bound");
    let bound = PolicyInput { signed_intent: Some(&with_task), task: Some("CASE-7"), ..base_in };
    assert_eq!(p.evaluate(&bound).effect, Effect::Allow);
}

// ---------------- registered tasks (issue 11, gap 2) ----------------

fn registered() -> Policy {
    let mut v = base();
    v["tasks"] = json!("registered");
    policy(v)
}

#[test]
fn task_mode_defaults_to_declared_and_parses_registered() {
    assert_eq!(policy(base()).tasks, TaskMode::Declared);
    assert_eq!(registered().tasks, TaskMode::Registered);
    let mut v = base();
    v["tasks"] = json!("whatever-the-agent-says");
    assert!(serde_json::from_value::<PolicyConfig>(v).is_err(), "an unknown mode is a configuration error");
}

#[test]
fn registered_mode_requires_a_task() {
    let p = registered();
    let i = PolicyInput { minter: true, ..input(AGENT, Some("ticket.read"), "GET", "tickets.internal", "/tickets/1") };
    assert_eq!(p.evaluate(&i).reason, Reason::TaskRequired);
    let d = p.evaluate(&PolicyInput { task: Some("tsk_1"), ..i });
    assert_eq!(d.effect, Effect::Allow, "{d:?}");
}

#[test]
fn declared_task_without_minter_is_unregistered() {
    // Without a minter nothing checks the task: an agent whose task ended names a fresh one.
    let p = registered();
    let i = PolicyInput { task: Some("T-8"), ..input(AGENT, Some("ticket.read"), "GET", "tickets.internal", "/tickets/1") };
    let d = p.evaluate(&i);
    assert_eq!((d.effect, d.reason), (Effect::Deny, Reason::TaskUnregistered));
    assert!(d.scopes.is_empty());
    // Declared mode keeps the old behaviour, for those who opt into it.
    assert_eq!(policy(base()).evaluate(&i).effect, Effect::Allow);
}

#[test]
fn task_from_a_verified_signed_intent_is_registered_without_a_minter() {
    let p = registered();
    let signed = SignedIntent { intents: vec!["ticket.read".into()], task: Some("CASE-7".into()), exp: WED_1000 + 60, from_txn_token: false };
    let base_in = input(AGENT, Some("ticket.read"), "GET", "tickets.internal", "/tickets/1");
    let bound = PolicyInput { signed_intent: Some(&signed), task: Some("CASE-7"), ..base_in.clone() };
    assert_eq!(p.evaluate(&bound).effect, Effect::Allow);
    // A signed token without a task does not vouch for a header task.
    let taskless = SignedIntent { task: None, ..signed.clone() };
    let header_only = PolicyInput { signed_intent: Some(&taskless), task: Some("CASE-7"), ..base_in };
    assert_eq!(p.evaluate(&header_only).reason, Reason::TaskUnregistered);
}

#[test]
fn registered_mode_lets_an_explicit_deny_speak_first() {
    let p = registered();
    let mut v = base();
    v["tasks"] = json!("registered");
    v["intents"][0]["operations"][0]["methods"] = json!(["GET", "DELETE"]);
    let p2 = policy(v);
    let i = input(AGENT, Some("ticket.read"), "DELETE", "tickets.internal", "/tickets/1");
    assert_eq!(p2.evaluate(&i).reason, Reason::DeniedByRule);
    assert_eq!(p.evaluate(&input(AGENT, Some("ticket.read"), "POST", "tickets.internal", "/tickets/1")).reason, Reason::IntentMismatch);
}

#[test]
fn lint_warns_on_declared_tasks() {
    let text = |p: &Policy| lint::lint(p).iter().map(|f| format!("{} {}", f.subject, f.message)).collect::<Vec<_>>();
    assert!(text(&policy(base())).iter().any(|t| t.contains("tasks") && t.contains("declared")));
    assert!(!text(&registered()).iter().any(|t| t.contains("declared")));
}

// ---------------- no confused deputy (issue 11, gap 4) ----------------

#[test]
fn host_header_cannot_choose_the_credential_audience() {
    // A catch-all allow (no intent, no resource) for unclassified callers: with a minter, the
    // old filter minted for whatever `:authority` was sent. Now: no resource, no credential.
    let mut v = base();
    v["unclassified"] = json!("allow");
    v["rules"].as_array_mut().unwrap().push(json!({"id": "anyone", "effect": "allow", "principals": ["spiffe://example.org/svc/*"]}));
    v["require_signed_intent_above"] = serde_json::Value::Null;
    let p = policy(v);
    let i = input("spiffe://example.org/svc/x", None, "GET", "payments.internal", "/transfer");
    assert_eq!(p.evaluate(&i).effect, Effect::Allow, "without a minter nothing is minted: the allow stands");
    let d = p.evaluate(&PolicyInput { minter: true, ..i });
    assert_eq!((d.effect, d.reason), (Effect::Deny, Reason::NoResourceMatched));
    assert_eq!(d.audience, None);
    let matched = PolicyInput { minter: true, ..input("spiffe://example.org/svc/x", None, "GET", "reports.internal", "/reports/1") };
    let d = p.evaluate(&matched);
    assert_eq!((d.effect, d.audience.as_deref()), (Effect::Allow, Some("reports")), "the resource's name is the audience");
}

// ---------------- owners and review dates (issue 18) ----------------

#[test]
fn the_deciding_rules_owner_else_the_class_owner_is_on_the_decision() {
    let mut v = base();
    v["classes"][0]["owner"] = json!("support-ops");
    v["rules"][0]["owner"] = json!("ticketing-team");
    let p = policy(v);
    let allowed = p.evaluate(&input("spiffe://example.org/agent/a1", Some("ticket.read"), "GET", "tickets.internal", "/tickets/1"));
    assert_eq!((allowed.effect, allowed.owner.as_deref()), (Effect::Allow, Some("ticketing-team")));
    // Refused before any rule: the class's owner answers for it.
    let refused = p.evaluate(&input("spiffe://example.org/agent/a1", Some("ticket.read"), "PUT", "tickets.internal", "/tickets/1"));
    assert_eq!((refused.reason, refused.owner.as_deref()), (Reason::IntentMismatch, Some("support-ops")));
    // A class without an owner, no rule owner: nobody.
    let batch = p.evaluate(&input("spiffe://example.org/batch/b1", None, "GET", "reports.internal", "/reports/1"));
    assert_eq!((batch.effect, batch.owner), (Effect::Allow, None));
}

#[test]
fn bad_owner_and_review_date_are_refused_naming_the_field() {
    for (field, value, want) in [
        ("owner", json!(""), "policy.classes[0].owner"),
        ("owner", json!("a\u{7}b"), "policy.classes[0].owner"),
        ("review_by", json!("2027-13-01"), "policy.classes[0].review_by"),
        ("review_by", json!("2027-02-30"), "policy.classes[0].review_by"),
        ("review_by", json!("1700000000"), "policy.classes[0].review_by"),
        ("review_by", json!("2027-+1-01"), "policy.classes[0].review_by"),
        ("review_by", json!("27-01-01"), "policy.classes[0].review_by"),
        ("review_by", json!("2027-01-01T00:00:00Z"), "policy.classes[0].review_by"),
    ] {
        let mut v = base();
        v["classes"][0][field] = value;
        let c: PolicyConfig = serde_json::from_value(v).unwrap();
        let e = Policy::compile(&c, "policy").unwrap_err();
        assert_eq!(e.field, want, "{e:?}");
    }
    let mut v = base();
    v["rules"][1]["review_by"] = json!("2027-02-30x");
    let c: PolicyConfig = serde_json::from_value(v).unwrap();
    assert_eq!(Policy::compile(&c, "policy").unwrap_err().field, "policy.rules[1].review_by");
}

#[test]
fn lint_warns_about_principals_without_owner_and_reviews_past_due() {
    let text = |p: &Policy, now| lint::lint_at(p, now).iter().map(|f| format!("{} {}", f.subject, f.message)).collect::<Vec<_>>();
    let t = text(&policy(base()), None);
    assert!(t.iter().any(|x| x.starts_with("class `agent` no owner")), "{t:?}");
    assert!(t.iter().any(|x| x.starts_with("rule `batch-reports` grants principals no owner")), "{t:?}");
    let mut v = base();
    v["classes"][0]["owner"] = json!("support-ops");
    v["classes"][1]["owner"] = json!("data-platform");
    v["classes"][1]["review_by"] = json!("2026-11-01");
    v["rules"][0]["review_by"] = json!("2027-01-01");
    let p = policy(v);
    let t = text(&p, Some(WED_1000));
    assert!(!t.iter().any(|x| x.contains("owner")), "every principal has an owner: {t:?}");
    assert!(t.iter().any(|x| x.starts_with("class `batch` review past due")), "{t:?}");
    assert!(!t.iter().any(|x| x.starts_with("rule `agents-tickets` review")), "not due yet: {t:?}");
    // Without a clock, no review findings.
    assert!(!text(&p, None).iter().any(|x| x.contains("review")));
}
