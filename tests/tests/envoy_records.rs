//! Decision records and metrics as Envoy exposes them: one record per request in the JSON access
//! log (field `mandate_decision`, from filter state `wasm.mandate.decision`, which the filter sets
//! with `proxy_set_property("mandate.decision")`), joined to the request by decision id, and the
//! filter's counters in a Prometheus scrape (`/stats/prometheus`: `mandate_...`, no `envoy_`
//! prefix; `/stats`: `wasmcustom.mandate....`). One Envoy start. Skipped like the other Envoy
//! tests when Envoy or the wasm module is missing (a failure with MANDATE_REQUIRE_ENVOY set).

use std::collections::BTreeMap;
use std::time::Duration;

use mandate_e2e::{envoy_dir, http, http_get, prerequisites, Envoy, MockServer, SvidIssuer, Vars};
use serde_json::{json, Value};

const AGENT: &str = "/ns/agents/sa/reporter";
/// The access-log field carrying the record, as shipped in `envoy/`.
const RECORD_FIELD: &str = r#"mandate_decision: "%FILTER_STATE(wasm.mandate.decision:PLAIN)%""#;

/// `/stats/prometheus` samples by metric name (labels dropped; the mandate metrics have none).
fn prometheus(envoy: &Envoy) -> BTreeMap<String, f64> {
    let text = envoy.stats_prometheus().expect("prometheus scrape");
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            let name = name.split('{').next()?.to_string();
            Some((name, value.parse().ok()?))
        })
        .collect()
}

fn delta(before: &BTreeMap<String, f64>, after: &BTreeMap<String, f64>, name: &str) -> f64 {
    after.get(name).copied().unwrap_or(0.0) - before.get(name).copied().unwrap_or(0.0)
}

fn record_of(entry: &Value) -> Value {
    let raw = entry["mandate_decision"].as_str().unwrap_or_else(|| panic!("no decision record in {entry}"));
    serde_json::from_str(raw).unwrap_or_else(|e| panic!("record is not JSON ({e}): {raw}"))
}

#[test]
fn shipped_access_log_configs_carry_the_decision_record() {
    for file in ["mandate.yaml", "access-log-json.yaml"] {
        let text = std::fs::read_to_string(envoy_dir().join(file)).expect("read envoy/ file");
        assert!(text.contains(RECORD_FIELD), "envoy/{file} lacks `{RECORD_FIELD}`");
    }
}

#[test]
fn access_log_and_prometheus_carry_every_decision() {
    if !prerequisites("access_log_and_prometheus_carry_every_decision") {
        return;
    }
    let issuer = SvidIssuer::new();
    let mut config = issuer.plugin_config();
    config["policy"] = json!({
        "resources": [{"name": "orders", "paths": ["/orders/**"]}, {"name": "admin", "paths": ["/admin/**"]}],
        "rules": [
            {"id": "read-orders", "effect": "allow", "resources": ["orders"], "methods": ["GET"]},
            {"id": "no-admin", "effect": "deny", "resources": ["admin"]}
        ]
    });
    let echo = MockServer::echo().expect("echo upstream");
    let envoy = Envoy::start("mandate.yaml", Vars::new().plugin_config_json(&config).upstream_port(echo.port()))
        .expect("envoy starts");
    let before = prometheus(&envoy);
    let svid = issuer.svid(AGENT);
    let bearer = format!("Bearer {svid}");
    let auth = [("authorization", bearer.as_str())];

    // N = 3 allowed (the third repeats the first: a decision-cache hit), M = 3 denied.
    let mut allowed = Vec::new();
    for path in ["/orders/1", "/orders/2", "/orders/1"] {
        let r = http_get(&envoy.url(path), &auth).expect("request");
        assert_eq!(r.status, 200, "{path}: {}", r.text());
        let seen = echo.requests().pop().expect("upstream got it");
        allowed.push((path, seen.header("x-mandate-decision-id").expect("decision id upstream")));
    }
    let mut denied = Vec::new();
    for (method, path, headers, status, reason) in [
        ("GET", "/admin/users", &auth[..], 403, "denied_by_rule"),
        ("POST", "/orders/1", &auth[..], 403, "no_rule_matched"),
        ("GET", "/orders/1", &[][..], 401, "token_missing"),
    ] {
        let r = http(method, &envoy.url(path), headers, b"").expect("request");
        assert_eq!(r.status, status, "{method} {path}: {}", r.text());
        assert_eq!(r.json().unwrap()["reason"], reason);
        let id = r.header("x-mandate-decision-id").expect("decision id in the reply").to_string();
        denied.push((path, id, status, reason));
    }
    assert_eq!(echo.request_count(), 3, "a denied request reached the upstream");

    // The access log: one entry per request, each with its record, joined by decision id.
    let entries = envoy.wait_access_log(6, Duration::from_secs(5)).expect("access log");
    assert_eq!(entries.len(), 6, "{entries:#?}");
    for (entry, (path, id)) in entries[..3].iter().zip(&allowed) {
        let rec = record_of(entry);
        assert_eq!(entry["status"], 200, "{entry}");
        assert_eq!(entry["decision_id_request"], id.as_str(), "{entry}");
        assert_eq!(rec["decision_id"], id.as_str(), "{rec}");
        assert_eq!((rec["effect"].as_str(), rec["reason"].as_str()), (Some("allow"), Some("allowed")), "{rec}");
        assert_eq!(rec["rule_id"], "read-orders", "{rec}");
        assert_eq!(rec["identity"], format!("spiffe://example.org{AGENT}"), "{rec}");
        assert_eq!(rec["path"], *path, "{rec}");
        assert_eq!(rec["request_id"], entry["request_id"], "{rec}");
        assert!(rec["token_hash"].as_str().is_some_and(|h| h.starts_with("sha256:")), "{rec}");
    }
    assert_eq!(record_of(&entries[2])["cache"]["decision"], true, "the repeat was not a cache hit");
    for (entry, (path, id, status, reason)) in entries[3..].iter().zip(&denied) {
        let rec = record_of(entry);
        assert_eq!(entry["status"], *status, "{entry}");
        assert_eq!(entry["details"], "mandate_denied", "{entry}");
        assert_eq!(entry["decision_id_response"], id.as_str(), "{entry}");
        assert_eq!(rec["decision_id"], id.as_str(), "{rec}");
        assert_eq!((rec["effect"].as_str(), rec["reason"].as_str()), (Some("deny"), Some(*reason)), "{rec}");
        assert_eq!(entry["path"], *path, "{entry}");
    }
    assert_eq!(record_of(&entries[3])["rule_id"], "no-admin");
    let raw_log = std::fs::read_to_string(envoy.access_log_path()).unwrap_or_default();
    assert!(!raw_log.contains(&svid), "the caller's token is in the access log");

    // The same six records in Envoy's own log, as `mandate.decision {json}` lines: batched by the
    // filter (several per log call) and handed over on its next tick.
    let mut ids: Vec<String> = allowed.iter().map(|(_, id)| id.clone()).chain(denied.iter().map(|(_, id, _, _)| id.clone())).collect();
    ids.sort();
    let t0 = std::time::Instant::now();
    let logged = loop {
        let mut logged: Vec<String> = envoy
            .log()
            .lines()
            .filter_map(|l| l.find("mandate.decision ").map(|i| &l[i + "mandate.decision ".len()..]))
            .map(|j| serde_json::from_str::<Value>(j).unwrap_or_else(|e| panic!("record line is not JSON ({e}): {j}")))
            .filter_map(|r| r["decision_id"].as_str().map(str::to_string))
            .collect();
        logged.sort();
        if logged == ids || t0.elapsed() > std::time::Duration::from_secs(5) {
            break logged;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    assert_eq!(logged, ids, "every decision has exactly one line in Envoy's log");
    assert!(!envoy.log().contains(&svid), "the caller's token is in Envoy's log");

    // Prometheus: the counters moved by exactly N and M, per effect and per reason. Per-request
    // counters reach Envoy on the filter's next tick (records.flush_ms, 1 s by default).
    let expect = [
        ("mandate_decisions_allow", 3.0),
        ("mandate_decisions_allow_allowed", 3.0),
        ("mandate_decisions_deny", 3.0),
        ("mandate_decisions_deny_denied_by_rule", 1.0),
        ("mandate_decisions_deny_no_rule_matched", 1.0),
        ("mandate_decisions_deny_token_missing", 1.0),
        // Identity checked for the 5 requests with a token: first a miss, then hits.
        ("mandate_cache_identity_miss", 1.0),
        ("mandate_cache_identity_hit", 4.0),
        // Policy evaluated 5 times; the repeated GET /orders/1 was served from the cache.
        ("mandate_cache_decision_miss", 4.0),
        ("mandate_cache_decision_hit", 1.0),
    ];
    let t0 = std::time::Instant::now();
    let moved = loop {
        let after = prometheus(&envoy);
        let moved: Vec<(&str, f64)> = expect.iter().map(|(n, _)| (*n, delta(&before, &after, n))).collect();
        if moved == expect.to_vec() || t0.elapsed() > std::time::Duration::from_secs(5) {
            break moved;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    eprintln!("counters handed over {:?} after the last request", t0.elapsed());
    assert_eq!(moved, expect.to_vec(), "prometheus deltas (name, got) vs expected");
    let text = envoy.stats_prometheus().unwrap();
    assert!(text.contains("# TYPE mandate_decisions_allow counter"), "no counter type line");
    assert!(!text.contains("envoy_wasmcustom_mandate"), "mandate metrics under an envoy_ prefix");
    // The same counters in /stats, under Envoy's custom-stat namespace.
    assert_eq!(envoy.stat("wasmcustom.mandate.decisions.allow").unwrap(), Some(3));
    assert_eq!(envoy.stat("wasmcustom.mandate.decisions.deny.token_missing").unwrap(), Some(1));
}
