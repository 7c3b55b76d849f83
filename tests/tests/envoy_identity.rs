//! Identity in a real Envoy: inline bundles (valid, expired, foreign trust domain), an OIDC
//! issuer mapped to a SPIFFE ID, and a bundle served over HTTP by a loopback server through an
//! Envoy cluster (first fetch, failures keep the last good bundle, rotation).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mandate_e2e::testkit::{plain_jwks, svid_claims, TestKey};
use mandate_e2e::{http_get, prerequisites, unix_now, Envoy, HttpResponse, MockServer, Reply, SvidIssuer, Vars};
use serde_json::{json, Value};

const WORKLOAD: &str = "/ns/prod/sa/web";
const OIDC_ISSUER: &str = "https://oidc.example.test";

fn start(config: &Value, echo: &MockServer, extra: impl FnOnce(Vars) -> Vars) -> Envoy {
    let t0 = Instant::now();
    let envoy = Envoy::start("mandate.yaml", extra(Vars::new().plugin_config_json(config).upstream_port(echo.port())))
        .expect("envoy starts");
    eprintln!("envoy ready in {:?}", t0.elapsed());
    envoy
}

fn get(envoy: &Envoy, token: &str) -> HttpResponse {
    http_get(&envoy.url("/orders/1"), &[("authorization", &format!("Bearer {token}"))]).expect("request")
}

fn reason(r: &HttpResponse) -> Option<String> {
    r.json().ok().and_then(|v| v["reason"].as_str().map(str::to_string))
}

fn assert_denied(r: &HttpResponse, status: u16, want: &str) {
    assert_eq!((r.status, reason(r).as_deref()), (status, Some(want)), "body: {}", r.text());
    if status == 401 {
        let challenge = r.header("www-authenticate").unwrap_or_default();
        assert!(challenge.contains(want), "www-authenticate {challenge:?}");
    }
}

/// Asserts the request was forwarded and returns the echo's view of it.
fn assert_forwarded(r: &HttpResponse) -> Value {
    assert_eq!(r.status, 200, "body: {}", r.text());
    let seen: Value = r.json().expect("echo JSON");
    assert!(seen["headers"].get("authorization").is_none(), "token forwarded: {seen}");
    assert!(seen["headers"]["x-mandate-decision-id"].as_str().is_some_and(|s| !s.is_empty()), "{seen}");
    seen
}

#[test]
fn inline_bundle_and_oidc_issuer() {
    if !prerequisites("inline_bundle_and_oidc_issuer") {
        return;
    }
    let issuer = SvidIssuer::new();
    let rsa = TestKey::rsa("oidc-1", 0);
    let mut config = issuer.plugin_config();
    config["identity"]["upstream_header"] = json!("x-mandate-identity");
    config["identity"]["oidc_issuers"] = json!([{
        "issuer": OIDC_ISSUER, "audiences": ["mandate"], "jwks": {"inline": plain_jwks(&[&rsa])},
        "spiffe_template": "spiffe://cluster.local/ns/{sub:2}/sa/{sub:3}",
    }]);
    let echo = MockServer::echo().unwrap();
    let envoy = start(&config, &echo, |v| v);
    let now = unix_now();

    let seen = assert_forwarded(&get(&envoy, &issuer.svid(WORKLOAD)));
    assert_eq!(seen["headers"]["x-mandate-identity"], "spiffe://example.org/ns/prod/sa/web");

    let expired = issuer.key.sign(&svid_claims("spiffe://example.org/ns/prod/sa/web", &issuer.audience, now - 600, now - 120));
    assert_denied(&get(&envoy, &expired), 401, "token_expired");

    let foreign = TestKey::es256("k1").sign(&svid_claims("spiffe://other.org/ns/prod/sa/web", &issuer.audience, now - 5, now + 300));
    assert_denied(&get(&envoy, &foreign), 401, "trust_domain_unknown");

    // OIDC (a Kubernetes service-account token): RS256, mapped to a SPIFFE ID by the template.
    let oidc = |sub: &str, aud: &str| {
        rsa.sign(&json!({"iss": OIDC_ISSUER, "sub": sub, "aud": aud, "iat": now - 5, "exp": now + 300}))
    };
    let seen = assert_forwarded(&get(&envoy, &oidc("system:serviceaccount:prod:agent", "mandate")));
    assert_eq!(seen["headers"]["x-mandate-identity"], "spiffe://cluster.local/ns/prod/sa/agent");
    assert_denied(&get(&envoy, &oidc("system:serviceaccount:prod:agent", "other")), 401, "audience_mismatch");
    // A subject part that would add path segments to the SPIFFE ID is refused.
    assert_denied(&get(&envoy, &oidc("system:serviceaccount:prod/../admin:agent", "mandate")), 401, "spiffe_id_invalid");
    assert_eq!(echo.request_count(), 2, "only the two valid tokens reached the upstream");
}

/// What the bundle server answers.
enum Serve {
    Bundle(Value),
    Status(u16),
}

/// Polls `f` every 50 ms until it returns `Some`, or panics after `timeout` describing `what`.
fn poll<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn bundle_served_through_a_cluster_survives_failures_and_rotates() {
    if !prerequisites("bundle_served_through_a_cluster_survives_failures_and_rotates") {
        return;
    }
    let t0 = Instant::now();
    let issuer = SvidIssuer::new(); // kid k1
    let k2 = TestKey::es256("k2");
    let serve = Arc::new(Mutex::new(Serve::Bundle(issuer.bundle())));
    let served = serve.clone();
    let bundles = MockServer::start(move |_| match &*served.lock().unwrap() {
        Serve::Bundle(b) => Reply::json(200, b),
        Serve::Status(s) => Reply::text(*s, "bundle server unavailable"),
    })
    .unwrap();
    // refresh_s 5 (no hint in the bundle), retry_s 1.
    let config = issuer.plugin_config_with_cluster("bundle_server", "/bundle");
    let echo = MockServer::echo().unwrap();
    let envoy = start(&config, &echo, |v| v.cluster("bundle_server", bundles.port()));
    let old = issuer.svid(WORKLOAD);
    let now = unix_now();
    let new = k2.sign(&svid_claims("spiffe://example.org/ns/prod/sa/web", &issuer.audience, now - 5, now + 300));

    // Until the first fetch lands, the domain's tokens are refused as unavailable; then accepted.
    let mut unavailable = 0;
    poll(Duration::from_secs(5), "the first bundle fetch", || {
        let r = get(&envoy, &old);
        if r.status == 200 {
            return Some(());
        }
        assert_denied(&r, 401, "bundle_unavailable");
        unavailable += 1;
        None
    });
    eprintln!("first 200 after {:?} ({unavailable} bundle_unavailable before)", t0.elapsed());
    let fetch = bundles.requests().into_iter().next().expect("the bundle server was called");
    assert_eq!((fetch.method.as_str(), fetch.path.as_str()), ("GET", "/bundle"));
    assert_eq!(fetch.header("host").as_deref(), Some("bundle_server"), "authority defaults to the cluster name");
    assert_eq!(fetch.header("accept").as_deref(), Some("application/json"));

    // The server fails: the next refresh (<= 5 s) fails and the last good bundle stays in use.
    *serve.lock().unwrap() = Serve::Status(500);
    let line = envoy
        .wait_for_log("keeping the last good bundle", Duration::from_secs(8))
        .expect("a failed refresh is logged");
    assert!(line.contains("HTTP status 500"), "{line}");
    assert_forwarded(&get(&envoy, &old));
    eprintln!("refresh failed and the bundle was kept after {:?}", t0.elapsed());

    // Rotation (old key withdrawn): within a retry (1 s) the old token is refused, the new accepted.
    *serve.lock().unwrap() = Serve::Bundle(mandate_e2e::testkit::spiffe_bundle(&[&k2], None));
    poll(Duration::from_secs(4), "the rotated bundle", || (get(&envoy, &old).status == 401).then_some(()));
    assert_denied(&get(&envoy, &old), 401, "kid_unknown");
    assert_forwarded(&get(&envoy, &new));
    eprintln!("rotated after {:?}", t0.elapsed());

    // The server goes away entirely: connection failures, the last good bundle keeps working.
    let failures_before = envoy.log_lines_containing("keeping the last good bundle").len();
    drop(bundles);
    let line = poll(Duration::from_secs(8), "a failed fetch after the server stopped", || {
        envoy.log_lines_containing("keeping the last good bundle").into_iter().nth(failures_before)
    });
    eprintln!("after the server stopped: {line}");
    assert_forwarded(&get(&envoy, &new));
    assert_denied(&get(&envoy, &old), 401, "kid_unknown");
    eprintln!("done in {:?}", t0.elapsed());
}

/// How Envoy reports bundle fetch failures the test host simulates: a fetch that outlives
/// `timeout_ms` comes back as a 504 response (not as a header-less failure), and a cluster Envoy
/// does not know cannot be called at all. Either way the domain's tokens are refused as
/// `bundle_unavailable`, never accepted.
#[test]
fn bundle_fetch_timeout_and_unknown_cluster() {
    if !prerequisites("bundle_fetch_timeout_and_unknown_cluster") {
        return;
    }
    let issuer = SvidIssuer::new();
    let other = SvidIssuer::with("other.org", &issuer.audience);
    let bundle = issuer.bundle();
    let slow = MockServer::start(move |_| {
        std::thread::sleep(Duration::from_millis(300));
        Reply::json(200, &bundle)
    })
    .unwrap();
    let mut config = issuer.plugin_config_with_cluster("slow_bundles", "/bundle");
    config["identity"]["trust_domains"][0]["bundle"]["timeout_ms"] = json!(50);
    config["identity"]["trust_domains"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": "other.org", "bundle": {"cluster": "nowhere", "refresh_s": 5, "retry_s": 1}}));
    let echo = MockServer::echo().unwrap();
    let envoy = start(&config, &echo, |v| v.cluster("slow_bundles", slow.port()));

    let timeout = envoy.wait_for_log("bundle fetch for `example.org` failed", Duration::from_secs(5)).unwrap();
    assert!(timeout.contains("HTTP status 504"), "{timeout}");
    let missing = envoy.wait_for_log("bundle fetch for `other.org` failed", Duration::from_secs(5)).unwrap();
    assert!(missing.contains("cannot call cluster `nowhere`"), "{missing}");
    assert_denied(&get(&envoy, &issuer.svid(WORKLOAD)), 401, "bundle_unavailable");
    assert_denied(&get(&envoy, &other.svid(WORKLOAD)), 401, "bundle_unavailable");
    assert_eq!(echo.request_count(), 0);
}
