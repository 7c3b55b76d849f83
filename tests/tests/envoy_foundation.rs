//! Foundation: the mandate filter inside a real Envoy (V8, FAIL_CLOSED) in front of the echo
//! upstream. Skipped with a message when Envoy or the wasm module is missing, unless
//! MANDATE_REQUIRE_ENVOY is set (scripts/test, CI), in which case that is a failure.

use std::time::{Duration, Instant};

use mandate_e2e::{http_get, prerequisites, raw_http, Envoy, MockServer, SvidIssuer, Vars};
use serde_json::Value;

const WORKLOAD: &str = "/ns/prod/sa/agent";

/// Starts the echo upstream and Envoy with `mandate.yaml` and the given plugin config.
fn rig(plugin_config: &str) -> (MockServer, Envoy) {
    let echo = MockServer::echo().expect("echo upstream");
    let t0 = Instant::now();
    let envoy = Envoy::start(
        "mandate.yaml",
        Vars::new().plugin_config(plugin_config).upstream_port(echo.port()),
    )
    .expect("envoy starts");
    eprintln!("envoy ready in {:?} (base id {})", t0.elapsed(), envoy.base_id());
    (echo, envoy)
}

fn seen_json(body: &[u8]) -> Value {
    serde_json::from_slice(body).expect("echo body is JSON")
}

#[test]
fn missing_token_is_denied_with_401_json() {
    if !prerequisites("missing_token_is_denied_with_401_json") {
        return;
    }
    let (echo, envoy) = rig("{}");
    let resp = http_get(&envoy.url("/orders/42"), &[]).expect("request");
    assert_eq!(resp.status, 401, "body: {}", resp.text());
    assert!(
        resp.header("content-type").unwrap_or_default().starts_with("application/json"),
        "content-type: {:?}",
        resp.header("content-type")
    );
    let challenge = resp.header("www-authenticate").unwrap_or_default();
    assert!(challenge.starts_with("Bearer"), "www-authenticate: {challenge:?}");
    let decision = resp.header("x-mandate-decision-id").expect("decision id header").to_string();
    assert!(!decision.is_empty());
    let body = resp.json().expect("JSON body");
    assert_eq!(body["reason"], "token_missing", "body: {body}");
    assert!(body["error"].as_str().is_some_and(|s| !s.is_empty()), "body: {body}");
    assert_eq!(body["decision_id"].as_str(), Some(decision.as_str()), "body: {body}");

    // A non-bearer authorization is just as missing.
    let resp = http_get(&envoy.url("/"), &[("authorization", "Basic dXNlcjpwYXNz")]).unwrap();
    assert_eq!(resp.status, 401, "body: {}", resp.text());
    assert_eq!(resp.json().unwrap()["reason"], "token_missing");

    // A bearer that is not a JWT is refused as malformed.
    let resp = http_get(&envoy.url("/"), &[("authorization", "Bearer abc.def")]).unwrap();
    assert_eq!(resp.status, 401, "body: {}", resp.text());
    assert_eq!(resp.json().unwrap()["reason"], "token_malformed");

    assert_eq!(echo.request_count(), 0, "a denied request reached the upstream");

    // The access log records the local reply with its decision id.
    let entries = envoy.wait_access_log(2, Duration::from_secs(5)).expect("access log");
    assert_eq!(entries[0]["status"], 401, "{:?}", entries[0]);
    assert_eq!(entries[0]["decision_id_response"], decision.as_str(), "{:?}", entries[0]);
}

#[test]
fn bearer_token_is_forwarded_with_decision_id() {
    if !prerequisites("bearer_token_is_forwarded_with_decision_id") {
        return;
    }
    let issuer = SvidIssuer::new();
    let mut config = issuer.plugin_config();
    config["identity"]["header"] = "authorization".into();
    let (echo, envoy) = rig(&config.to_string());
    let bearer = format!("Bearer {}", issuer.svid(WORKLOAD));
    let resp = http_get(&envoy.url("/orders/42?x=1"), &[("authorization", &bearer)]).expect("request");
    assert_eq!(resp.status, 200, "body: {}", resp.text());
    let seen = seen_json(&resp.body);
    assert_eq!(seen["method"], "GET");
    assert_eq!(seen["path"], "/orders/42?x=1");
    let id = seen["headers"]["x-mandate-decision-id"].as_str().unwrap_or_default();
    assert!(!id.is_empty(), "upstream saw no decision id: {seen}");
    assert!(seen["headers"].get("authorization").is_none(), "token forwarded by default: {seen}");
    assert_eq!(echo.request_count(), 1);

    // Decision ids are distinct per request.
    let again = http_get(&envoy.url("/"), &[("authorization", &bearer)]).unwrap();
    let id2 = seen_json(&again.body)["headers"]["x-mandate-decision-id"].as_str().map(String::from);
    assert_ne!(id2.as_deref(), Some(id), "decision id reused");
}

#[test]
fn spoofed_mandate_headers_never_reach_the_upstream() {
    if !prerequisites("spoofed_mandate_headers_never_reach_the_upstream") {
        return;
    }
    let issuer = SvidIssuer::new();
    let (echo, envoy) = rig(&issuer.plugin_config().to_string());
    let bearer = format!("Bearer {}", issuer.svid(WORKLOAD));
    let resp = http_get(
        &envoy.url("/"),
        &[
            ("authorization", &bearer),
            ("x-mandate-identity", "spiffe://evil.example/admin"),
            ("X-Mandate-Identity", "spiffe://evil.example/second"),
            ("x-mandate-decision-id", "forged-id"),
            ("x-mandate-anything", "x"),
        ],
    )
    .expect("request");
    assert_eq!(resp.status, 200, "body: {}", resp.text());
    let req = echo.requests().pop().expect("upstream got the request");
    assert!(req.header("x-mandate-identity").is_none(), "spoofed identity forwarded: {:?}", req.headers);
    assert!(req.header("x-mandate-anything").is_none(), "x-mandate-* forwarded: {:?}", req.headers);
    let ids = req.header_all("x-mandate-decision-id");
    assert_eq!(ids.len(), 1, "decision ids upstream: {ids:?}");
    assert_ne!(ids[0], "forged-id");
}

#[test]
fn non_utf8_header_values_do_not_break_the_filter() {
    if !prerequisites("non_utf8_header_values_do_not_break_the_filter") {
        return;
    }
    let issuer = SvidIssuer::new();
    let (echo, envoy) = rig(&issuer.plugin_config().to_string());
    let token = issuer.svid(WORKLOAD);
    let port = envoy.listener_port();
    // obs-text bytes (0x80-0xFF) are legal in HTTP/1.1 field values; Envoy passes them on.
    let mut request = format!("GET /bin HTTP/1.1\r\nhost: test\r\nauthorization: Bearer {token}\r\n")
        .into_bytes();
    request.extend_from_slice(
        b"x-binary: caf\xe9\xff\r\nx-mandate-identity: \xc3\x28spoof\r\nconnection: close\r\n\r\n",
    );
    let allowed = raw_http(port, &request).expect("raw request with a valid token");
    assert_eq!(allowed.status, 200, "body: {}", allowed.text());
    let req = echo.requests().pop().expect("upstream got it");
    assert_eq!(req.header("x-binary").map(|v| v.into_bytes()), Some("caf\u{fffd}\u{fffd}".into()));
    assert!(req.header("x-mandate-identity").is_none(), "spoofed header forwarded: {:?}", req.headers);

    let denied = raw_http(
        port,
        b"GET /bin HTTP/1.1\r\nhost: test\r\nauthorization: Bearer \xff\xfe\r\nconnection: close\r\n\r\n",
    )
    .expect("raw request with a non-UTF-8 token");
    assert_eq!(denied.status, 401, "body: {}", denied.text());

    let denied = raw_http(
        port,
        b"GET /bin HTTP/1.1\r\nhost: test\r\nauthorization: \xff\xfe\r\nconnection: close\r\n\r\n",
    )
    .expect("raw request with a non-UTF-8 authorization");
    assert_eq!(denied.status, 401, "body: {}", denied.text());

    // The VM is still healthy afterwards: a normal request works.
    let ok = http_get(&envoy.url("/after"), &[("authorization", &format!("Bearer {token}"))]).unwrap();
    assert_eq!(ok.status, 200, "body: {}", ok.text());
}

/// Starts Envoy with an invalid plugin config and checks how it is refused.
///
/// Envoy 1.40 with a static listener and `failure_policy: FAIL_CLOSED`: `on_configure` returns
/// false, Envoy logs "Wasm VM failed Failed to configure base Wasm plugin", "Plugin configured to
/// fail closed failed to load" and "error `Unable to create Wasm plugin mandate` initializing
/// config", then exits with status 1 before any listener opens (~0.2 s).
fn assert_config_refused(plugin_config: &str, field: &str) {
    let echo = MockServer::echo().expect("echo upstream");
    let mut envoy = Envoy::spawn(
        "mandate.yaml",
        Vars::new().plugin_config(plugin_config).upstream_port(echo.port()),
    )
    .expect("envoy spawns");
    let exit = envoy.wait_exit(Duration::from_secs(20)).expect("wait");
    let log = envoy.log();
    let status = exit.unwrap_or_else(|| {
        // Still running would mean the refusal manifests differently: it must not serve.
        let served = envoy
            .wait_ready(Duration::from_secs(5))
            .ok()
            .and_then(|_| http_get(&envoy.url("/"), &[("authorization", "Bearer tok")]).ok());
        panic!("Envoy kept running with a refused config (served: {served:?}); log:\n{log}")
    });
    assert!(!status.success(), "Envoy exited successfully: {status}");
    let lines: Vec<&str> = log.lines().filter(|l| l.contains("invalid configuration")).collect();
    assert_eq!(lines.len(), 1, "want one `invalid configuration` line; log:\n{log}");
    assert!(lines[0].contains(field), "log line does not name `{field}`: {}", lines[0]);
    assert!(log.contains("Unable to create Wasm plugin"), "no plugin-creation failure; log:\n{log}");
    assert_eq!(echo.request_count(), 0, "a request reached the upstream");
}

#[test]
fn unknown_config_field_is_refused_and_nothing_reaches_upstream() {
    if !prerequisites("unknown_config_field_is_refused_and_nothing_reaches_upstream") {
        return;
    }
    assert_config_refused(r#"{"identity": {"header": "authorization", "bogus_field": 1}}"#, "bogus_field");
}

#[test]
fn invalid_config_value_is_refused_naming_the_field() {
    if !prerequisites("invalid_config_value_is_refused_naming_the_field") {
        return;
    }
    assert_config_refused(r#"{"identity": {"forward_token": "yes"}}"#, "identity.forward_token");
}
