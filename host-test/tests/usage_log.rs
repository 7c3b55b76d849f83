//! `mandate policy usage` and `suggest` (issue 18) over synthetic decision logs generated from
//! the `policies/` examples (allowed, denied and dry-run decisions), and over bad log lines.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use mandate_usage::log::{self, Line, LogReader, Next, Skip};
use mandate_usage::{self as usage, suggest, synth, Model, Usage};
use mandate_core::decision::Effect;
use mandate_core::policy::cases;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("mandate-usage-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d.join(name)
}

/// A synthetic log of `n` records from a `policies/` case file.
fn gen(name: &str, n: u64, drop: &[&str]) -> PathBuf {
    let path = tmp(&format!("{name}-{n}.log"));
    let mut f = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
    synth::generate(&root().join(format!("policies/{name}.cases.json")), n, drop, true, &mut f).unwrap();
    f.flush().unwrap();
    path
}

fn model(name: &str) -> Model {
    Model::load(&root().join(format!("policies/{name}.policy.json"))).unwrap()
}

fn mandate(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_mandate")).args(args).current_dir(root()).output().unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn hundred_thousand_record_log_names_exactly_the_unused_grants() {
    // legacy-service has allows, denials and a dry-run deny rule. The cases the rules
    // `reports` and `legacy-billing-staging` allow are left out: exactly their grants go unused.
    let log = gen("legacy-service", 100_000, &["reports", "legacy-billing-staging"]);
    let m = model("legacy-service");
    let u = Usage::read(&m, &log).unwrap();
    assert_eq!((u.records, u.skipped_total()), (100_000, 0));
    assert!(u.allowed > 10_000 && u.denied > 10_000 && u.dry_run_denied > 1_000, "{} {} {}", u.allowed, u.denied, u.dry_run_denied);
    let r = u.report(&m);
    assert_eq!(
        r.unused_labels(),
        ["legacy-billing-staging × invoice.fetch × billing-legacy", "reports × report.read × reports"],
        "{}",
        r.to_text()
    );
    let owner = r.owners.iter().find(|o| o.owner == "finance-eng").unwrap();
    assert_eq!((owner.granted, owner.used), (4, 2));
    // Dry-run would-denials by reason and rule; intents claimed but never allowed.
    assert!(owner.dry_run_would_deny.iter().any(|d| d.reason == "denied_by_rule" && d.rule == "agents-stop-voiding" && d.count > 0), "{owner:?}");
    assert!(owner.denials.contains_key("intent_mismatch"), "{owner:?}");
    assert!(r.intents_never_allowed.iter().any(|i| i.intent == "invoice.refund" && !i.defined));
    assert!(!r.intents_never_allowed.iter().any(|i| i.intent == "invoice.fetch"));
    // The same through the CLI, as JSON.
    let (code, out, err) = mandate(&["policy", "usage", "--policy", "policies/legacy-service.policy.json", "--log", log.to_str().unwrap(), "--json"]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["log"]["records"], 100_000);
    let unused: Vec<&str> = v["owners"].as_array().unwrap().iter().flat_map(|o| o["grants_unused"].as_array().unwrap()).map(|g| g["rule"].as_str().unwrap()).collect();
    assert_eq!(unused, ["legacy-billing-staging", "reports"]);

    // The suggestion removes exactly those rules and passes the replay of all 100k records.
    let s = suggest::suggest(&m, &u).unwrap();
    let removed: Vec<&str> = s.changes.iter().filter(|c| c.change.starts_with("removed")).map(|c| c.subject.as_str()).collect();
    assert_eq!(removed, ["rule `legacy-billing-staging`", "rule `reports`"]);
    let new = Model::from_slice(serde_json::to_string(&s.document).unwrap().as_bytes()).unwrap();
    let rp = suggest::replay(&m, &new, &log).unwrap();
    assert!(rp.passed(), "{rp:?}");
    assert_eq!(rp.records, 100_000);
    assert_eq!(rp.allowed, u.allowed, "every allowed record was reproduced and is still allowed: {rp:?}");
    std::fs::remove_file(&log).unwrap();
}

/// Every `policies/` example: the suggestion from its log passes the replay, still passes every
/// case whose behaviour the log shows used, and still refuses every case the policy refused.
#[test]
fn suggestions_pass_the_replay_and_the_case_files() {
    let mut files: Vec<PathBuf> = std::fs::read_dir(root().join("policies")).unwrap().map(|e| e.unwrap().path()).filter(|p| p.to_string_lossy().ends_with(".cases.json")).collect();
    files.sort();
    assert!(files.len() >= 7);
    for cf in files {
        let name = cf.file_name().unwrap().to_string_lossy().trim_end_matches(".cases.json").to_string();
        let log = gen(&name, 3_000, &[]);
        let m = model(&name);
        let u = Usage::read(&m, &log).unwrap();
        let s = suggest::suggest(&m, &u).unwrap();
        let text = serde_json::to_string_pretty(&s.document).unwrap();
        let new = Model::from_slice(text.as_bytes()).unwrap();
        let rp = suggest::replay(&m, &new, &log).unwrap();
        assert!(rp.passed(), "{name}: {rp:?}");
        assert_eq!(rp.allowed, u.allowed, "{name}: every allow reproduced: {rp:?}");
        // The case files: same verdict for everything the log used; no refusal turned allow.
        let (_, reqs) = synth::load_cases(&cf).unwrap();
        let (mut same, mut denied) = (0, 0);
        for r in &reqs {
            let before = cases::evaluate_request(&m.policy, r).unwrap();
            let after = cases::evaluate_request(&new.policy, r).unwrap();
            if before.effect == Effect::Deny {
                assert_eq!(after.effect, Effect::Deny, "{name}: the suggestion widened {r:?}");
                denied += 1;
            } else {
                assert_eq!((after.effect, &after.rule_id, &after.dry_run_rule_id), (before.effect, &before.rule_id, &before.dry_run_rule_id), "{name}: {r:?}");
                same += 1;
            }
        }
        assert!(same > 0 && denied > 0, "{name}");
        // And the case runner agrees: the suggested policy in place of the original, on the
        // cases that describe used behaviour (allowed, dry-run). Refusals stay refusals (above),
        // though some now for an earlier reason (a tool no longer listed, say).
        let dir = tmp(&format!("cases-{name}"));
        std::fs::create_dir_all(&dir).unwrap();
        let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&cf).unwrap()).unwrap();
        v["cases"].as_array_mut().unwrap().retain(|c| c["expect"]["effect"] != "deny");
        let orig_policy = v["policy"].as_str().unwrap().to_string();
        std::fs::write(dir.join(&orig_policy), &text).unwrap();
        std::fs::write(dir.join(cf.file_name().unwrap()), v.to_string()).unwrap();
        let (_, results) = cases::run_file(&dir.join(cf.file_name().unwrap())).unwrap();
        assert!(!results.is_empty(), "{name}");
        let failed: Vec<_> = results.iter().filter(|r| !r.passed).map(|r| format!("{}: got {}", r.name, r.got)).collect();
        assert!(failed.is_empty(), "{name}: cases fail on the suggestion: {failed:?}");
        std::fs::remove_file(&log).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

#[test]
fn the_replay_refuses_a_suggestion_that_drops_a_used_grant() {
    let log = gen("support-agent", 2_000, &[]);
    let m = model("support-agent");
    // A "suggestion" without the rule that allowed the ticket reads.
    let mut bad = m.raw.clone();
    bad["rules"].as_array_mut().unwrap().retain(|r| r["id"] != "support-tickets");
    let bad = Model::from_slice(bad.to_string().as_bytes()).unwrap();
    let rp = suggest::replay(&m, &bad, &log).unwrap();
    assert!(!rp.passed());
    assert!(rp.mismatches > 100, "{rp:?}");
    assert!(rp.examples[0].contains("logged allow (rule support-tickets), suggested deny no_rule_matched"), "{rp:?}");
}

#[test]
fn suggest_narrows_tools_and_ttl_and_the_cli_writes_the_checked_file() {
    let log = gen("mcp-support", 3_000, &[]);
    let out = tmp("mcp-support.suggested.json");
    let (code, stdout, err) = mandate(&["policy", "suggest", "--policy", "policies/mcp-support.policy.json", "--log", log.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    assert_eq!(code, 0, "{stdout}{err}");
    assert!(stdout.contains("intent `ticket.supervise`: operation on `support-mcp`: tools [\"*\"] narrowed to those called, [\"get_ticket\", \"refund\"]"), "{stdout}");
    assert!(stdout.contains("intent `ticket.triage`: ttl_s 300 -> 60"), "{stdout}");
    assert!(stdout.contains("0 judged differently by the suggestion") && stdout.contains("replay passed"), "{stdout}");
    // The readable diff shows the narrowed tools.
    assert!(stdout.contains("-            \"*\"") && stdout.contains("+            \"get_ticket\","), "{stdout}");
    let written: serde_json::Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    let sup = written["intents"].as_array().unwrap().iter().find(|i| i["name"] == "ticket.supervise").unwrap();
    assert_eq!(sup["operations"][0]["tools"], serde_json::json!(["get_ticket", "refund"]));
    // The written file passes lint (it compiles) and the case files of used behaviour (above).
    let (code, lint, _) = mandate(&["policy", "lint", out.to_str().unwrap()]);
    assert_eq!(code, 0, "{lint}");
}

#[test]
fn delegation_edges_used_are_reported_with_their_rules() {
    let log = gen("delegation", 3_000, &[]);
    let m = model("delegation");
    let r = Usage::read(&m, &log).unwrap().report(&m);
    let edges: Vec<(String, String, Option<String>)> = r.delegation_edges.iter().map(|e| (e.from.clone(), e.to.clone(), e.rule.clone())).collect();
    assert!(edges.contains(&("triage".into(), "billing-agent".into(), Some("triage-hands-billing".into()))), "{edges:?}");
    assert!(edges.contains(&("triage".into(), "notifier".into(), Some("triage-hands-notifier".into()))), "{edges:?}");
    assert!(r.to_text().contains("delegation edges used:"));
}

#[test]
fn wildcard_principals_are_narrowed_to_those_seen() {
    // A rule for anyone on the reports resource, used by two principals.
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(root().join("policies/nightly-batch.policy.json")).unwrap()).unwrap();
    v["unclassified"] = serde_json::json!("allow");
    v["rules"].as_array_mut().unwrap().push(serde_json::json!({"id": "anyone-metrics", "effect": "allow", "owner": "sre", "resources": ["metrics"]}));
    let m = Model::from_slice(v.to_string().as_bytes()).unwrap();
    let mut u = Usage::new(&m);
    for (i, who) in ["spiffe://acme.example/ops/a", "spiffe://acme.example/ops/b", "spiffe://acme.example/ops/a"].iter().enumerate() {
        let line = format!(
            r#"{{"ts_ms":{},"decision_id":"x","effect":"allow","reason":"allowed","dry_run":false,"rule_id":"anyone-metrics","identity":"{who}","class":null,"owner":"sre","intent":null,"task":"t1","intent_signed":false,"delegation":null,"method":"GET","authority":"metrics.acme.internal","path":"/metrics","resource":"metrics","scopes":[],"ttl_s":null,"credential":null}}"#,
            1_780_000_000_000u64 + i as u64
        );
        match log::parse_line(line.as_bytes()) {
            Line::Record(rec) => u.add(&m, &rec),
            _ => panic!("not a record: {line}"),
        }
    }
    let r = u.report(&m);
    let b = r.broadest_grants.first().unwrap();
    assert_eq!((b.grant.rule.as_str(), b.why.contains("any principal")), ("anyone-metrics", true), "{:?}", r.broadest_grants);
    let s = suggest::suggest(&m, &u).unwrap();
    let rule = s.document["rules"].as_array().unwrap().iter().find(|r| r["id"] == "anyone-metrics").unwrap();
    assert_eq!(rule["principals"], serde_json::json!(["spiffe://acme.example/ops/a", "spiffe://acme.example/ops/b"]));
}

// ---------------------------------------------------------------- bad lines

const JWT: &str = "eyJhbGciOiJFUzI1NiIsImtpZCI6ImsxIn0.eyJzdWIiOiJzcGlmZmU6Ly9hY21lLmV4YW1wbGUvYWdlbnQvYSJ9.c2lnbmF0dXJlc2lnbmF0dXJlc2lnbmF0dXJl";

fn good_line() -> String {
    let log = gen("support-agent", 1, &[]);
    std::fs::read_to_string(log).unwrap().trim_end().to_string()
}

fn read_lines(bytes: &[u8]) -> (Usage, Model) {
    let m = model("support-agent");
    let mut u = Usage::new(&m);
    let mut r = LogReader::from_reader(std::io::Cursor::new(bytes.to_vec()));
    u.read_from(&m, &mut r).unwrap();
    (u, m)
}

#[test]
fn truncated_json_line_is_counted_and_skipped() {
    let good = good_line();
    let cut = &good[..good.len() / 2];
    let (u, _) = read_lines(format!("{good}\n{cut}\n{good}\n").as_bytes());
    assert_eq!((u.records, u.skipped.get("truncated_json").copied()), (2, Some(1)));
    assert_eq!(u.first_skips, [(2, Skip::TruncatedJson)]);
}

#[test]
fn unknown_field_smuggled_into_a_record_is_refused() {
    let good = good_line();
    let extra = good.replacen("{\"", "{\"shadow_grant\":true,\"", 1);
    let (u, _) = read_lines(format!("{extra}\n{good}\n").as_bytes());
    assert_eq!((u.records, u.skipped.get("unknown_field").copied()), (1, Some(1)));
}

#[test]
fn token_in_a_log_line_is_counted_and_never_echoed() {
    let good = good_line();
    let leaked = good.replacen("\"task\":\"", &format!("\"task\":\"{JWT}"), 1);
    assert_ne!(leaked, good);
    let (u, _) = read_lines(format!("{leaked}\n{good}\n").as_bytes());
    assert_eq!((u.records, u.skipped.get("token_like_value").copied()), (1, Some(1)));
    // The CLI says which line and why, and neither the token nor a piece of it appears.
    let path = tmp("token.log");
    std::fs::write(&path, format!("{good}\n{leaked}\nnot json {JWT}\n{{\"identity\": \"{JWT}\"\n")).unwrap();
    for extra in [&[][..], &["--json"][..]] {
        let mut args = vec!["policy", "usage", "--policy", "policies/support-agent.policy.json", "--log", path.to_str().unwrap()];
        args.extend_from_slice(extra);
        let (code, out, err) = mandate(&args);
        assert_eq!(code, 0, "{err}");
        assert!(err.contains("skipped line 2: token_like_value"), "{err}");
        assert!(err.contains("skipped line 4: token_like_value"), "{err}");
        for piece in JWT.split('.') {
            assert!(!out.contains(&piece[..16]) && !err.contains(&piece[..16]), "token piece echoed:\n{out}\n{err}");
        }
    }
    let (code, out, err) = mandate(&["policy", "suggest", "--policy", "policies/support-agent.policy.json", "--log", path.to_str().unwrap(), "--out", tmp("token.suggested.json").to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(!out.contains(&JWT[..16]) && !err.contains(&JWT[..16]));
}

#[test]
fn terminal_escape_in_a_logged_intent_never_reaches_the_screen() {
    let good = good_line();
    // A refused request: the intent is listed among those claimed but never allowed.
    let evil = good.replacen("\"intent\":\"ticket.read\"", "\"intent\":\"x\\u001b]0;pwned\\u0007\"", 1).replacen("\"effect\":\"allow\"", "\"effect\":\"deny\"", 1);
    assert_ne!(evil, good);
    let (u, m) = read_lines(format!("{evil}\n").as_bytes());
    assert_eq!(u.records, 1);
    let text = u.report(&m).to_text();
    assert!(text.contains("x?]0;pwned?") && !text.contains('\u{1b}') && !text.contains('\u{7}'), "{text}");
}

#[test]
fn ten_megabyte_line_is_skipped_in_flat_memory() {
    let good = good_line();
    let mut bytes = format!("{good}\n").into_bytes();
    bytes.extend_from_slice(b"mandate.decision {\"ts_ms\":1,\"pad\":\"");
    bytes.extend(std::iter::repeat_n(b'A', 10 << 20));
    bytes.extend_from_slice(b"\"}\n");
    bytes.extend_from_slice(format!("{good}\n").as_bytes());
    let mut r = LogReader::from_reader(std::io::Cursor::new(bytes.clone()));
    let mut kinds = Vec::new();
    loop {
        match r.next_line().unwrap() {
            Next::End => break,
            Next::TooLong => kinds.push("too_long"),
            Next::Line(_) => kinds.push("line"),
        }
        assert!(r.buffer_capacity() <= 2 * log::MAX_LINE, "the line buffer grew to {}", r.buffer_capacity());
    }
    assert_eq!(kinds, ["line", "too_long", "line"]);
    let (u, _) = read_lines(&bytes);
    assert_eq!((u.records, u.skipped.get("line_too_long").copied(), u.first_skips.clone()), (2, Some(1), vec![(2, Skip::LineTooLong)]));
}

#[test]
fn envoy_log_lines_access_log_entries_and_gzip_are_read() {
    let good = good_line();
    let record = good.strip_prefix("mandate.decision ").unwrap();
    let envoy = format!("[2026-11-25 10:00:00.000][12][info][wasm] [source/extensions/common/wasm/context.cc:1198] wasm log mandate_filter mandate_root: {good}");
    let access = serde_json::json!({"time": "2026-11-25T10:00:00Z", "status": "200", "mandate_decision": record}).to_string();
    let no_record = serde_json::json!({"time": "2026-11-25T10:00:00Z", "status": "200", "mandate_decision": "-"}).to_string();
    let other = "[2026-11-25 10:00:00.000][1][info][main] starting main dispatch loop";
    let text = format!("{envoy}\n{access}\n{no_record}\n{other}\n{record}\r\n");
    let (u, _) = read_lines(text.as_bytes());
    assert_eq!((u.records, u.other_lines, u.skipped_total()), (3, 2, 0));
    let gz = tmp("log.gz");
    let mut enc = flate2::write::GzEncoder::new(std::fs::File::create(&gz).unwrap(), flate2::Compression::fast());
    enc.write_all(text.as_bytes()).unwrap();
    enc.finish().unwrap();
    let m = model("support-agent");
    let u = Usage::read(&m, &gz).unwrap();
    assert_eq!((u.records, u.other_lines, u.skipped_total()), (3, 2, 0));
}

/// The parser knows every field the filter writes: a record built from the plugin's own type.
#[test]
fn a_record_as_the_filter_writes_it_is_read() {
    use mandate_core::record::{CacheHits, CredentialInfo, DecisionRecord, McpRecord};
    let chain = mandate_core::delegation::DelegationInfo {
        txn: Some("sha256:aaaaaaaaaaaa".into()),
        token_hash: "sha256:bbbbbbbbbbbb".into(),
        depth: Some(1),
        chain: vec![
            mandate_core::delegation::ChainEntry { principal: "spiffe://acme.example/agent/triage/t1".into(), class: Some("triage".into()) },
            mandate_core::delegation::ChainEntry { principal: "spiffe://acme.example/agent/billing/b1".into(), class: Some("billing-agent".into()) },
        ],
        failed: None,
        invalid: None,
    };
    let cred = CredentialInfo { jti: Some("j1".into()), exp: Some(1_780_000_300), kind: Some("minted") };
    let scopes = vec!["cases:read".to_string()];
    let rec = DecisionRecord {
        ts_ms: 1_780_000_000_000,
        decision_id: "0123456789abcdef01234567",
        effect: Effect::Allow,
        reason: "allowed",
        dry_run: false,
        rule_id: Some("billing-works-cases"),
        dry_run_rule_id: None,
        identity: Some("spiffe://acme.example/agent/billing/b1"),
        trust_domain: Some("acme.example"),
        class: Some("billing-agent"),
        owner: Some("billing-team"),
        token_hash: Some("sha256:cccccccccccc"),
        intent: Some("case.resolve"),
        task: Some("tsk_1"),
        intent_signed: false,
        delegation: Some(&chain),
        method: Some("POST"),
        authority: Some("billing-mcp.acme.internal"),
        path: Some("/mcp"),
        resource: Some("billing-mcp"),
        sensitivity: Some("confidential"),
        environment: Some("prod"),
        scopes: &scopes,
        ttl_s: Some(120),
        credential: Some(&cred),
        mcp: Some(McpRecord { method: Some("tools/call"), tool: Some("refund"), path: Some("body"), credential_scope: Some("tool"), checked: &[] }),
        credential_withheld: Some("dry_run"),
        degraded: Some("legacy_static_secret"),
        cache: CacheHits::default(),
        duration_us: 42,
        request_id: Some("r-1"),
        traceparent: None,
        plugin_version: "0.1.0",
        policy_hash: "sha256:dddddddddddd",
    };
    let line = format!("{}{}", mandate_core::record::LOG_PREFIX, rec.to_json());
    match log::parse_line(line.as_bytes()) {
        Line::Record(r) => {
            assert_eq!((r.owner.as_deref(), r.rule_id.as_deref(), r.delegation.as_ref().map(|d| d.chain.len())), (Some("billing-team"), Some("billing-works-cases"), Some(2)));
            assert_eq!(r.mcp.as_ref().and_then(|m| m.tool.as_deref()), Some("refund"));
        }
        Line::Skipped(s) => panic!("skipped: {s:?}: {line}"),
        _ => panic!("not a record"),
    }
    let _ = usage::KEY_CAP;
}
