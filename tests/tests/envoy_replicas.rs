//! Three minter replicas on one PostgreSQL (a throwaway cluster), behind real Envoys with the
//! filter:
//!
//! ```text
//! proxy B  ── cluster `minter` = replica 2 only ──────────────┐
//! proxy LB ── cluster `minter` = replicas 1, 2, 3           ├── PostgreSQL (shared state)
//!             (outlier detection) ───────────────────────────┘
//! ```
//!
//! - a task registered on replica 1 mints through proxy B (replica 2), and its end on replica 1
//!   is refused through both proxies, heard through the long-polled feed (the propagation
//!   latency from `POST /tasks/{id}/end` to the first refusal is printed; `MANDATE_PROPAGATION_SAMPLES`
//!   sets how many ends are timed, default 10);
//! - replica 3 killed under load: traffic moves to the others, and no request reaches the
//!   upstream without a minted credential.
//!
//! Skipped without Envoy/the wasm module or PostgreSQL (failures with MANDATE_REQUIRE_ENVOY /
//! MANDATE_REQUIRE_POSTGRES).

use std::time::{Duration, Instant};

use mandate_e2e::{http, prerequisites, Envoy, MockServer, Reply, SeenRequest, SvidIssuer, Vars};
use mandate_minter::config::MinterConfig;
use mandate_minter::testpg::TestPg;
use serde_json::json;

mod orders_story;
use orders_story::*;

/// A `minter` cluster over `ports` with outlier detection: a replica whose connections fail is
/// ejected after one failure (for 30 s: longer than the rest of the test on a slow machine). (In Kubernetes, `/readyz` as the readiness probe takes a replica
/// whose database is unreachable out of the endpoints as well.)
fn replicas_cluster_yaml(ports: &[u16]) -> String {
    let endpoints: String = ports
        .iter()
        .map(|p| format!("      - endpoint:\n          address:\n            socket_address: {{ address: 127.0.0.1, port_value: {p} }}\n"))
        .collect();
    format!(
        "- name: minter\n  type: STATIC\n  connect_timeout: 0.5s\n  lb_policy: ROUND_ROBIN\n  \
         outlier_detection:\n    consecutive_5xx: 1\n    consecutive_local_origin_failure: 1\n    split_external_local_origin_errors: true\n    \
         interval: 0.2s\n    base_ejection_time: 30s\n    max_ejection_percent: 67\n  \
         load_assignment:\n    cluster_name: minter\n    endpoints:\n    - lb_endpoints:\n{endpoints}"
    )
}

fn create_task(minter: &mandate_minter::Handle, subject: &str) -> String {
    let r = http("POST", &format!("{}/tasks", minter.base_url()), &[("content-type", "application/json")], json!({"subjects": [subject]}).to_string().as_bytes())
        .expect("POST /tasks");
    assert_eq!(r.status, 201, "{}", r.text());
    r.json().unwrap()["task"].as_str().unwrap().to_string()
}

fn end_task(minter: &mandate_minter::Handle, task: &str) {
    let r = http("POST", &format!("{}/tasks/{task}/end", minter.base_url()), &[("content-type", "application/x-www-form-urlencoded")], b"").expect("end");
    assert_eq!(r.status, 200, "{}", r.text());
}

/// A relay to `target` that removes the long-poll offer from feed pages: a proxy behind it
/// polls plainly (the baseline of the propagation measurement).
fn plain_polling_relay(target: String) -> MockServer {
    MockServer::start(move |req: &SeenRequest| {
        let ct = req.header("content-type").unwrap_or_default();
        let headers: Vec<(&str, &str)> = if ct.is_empty() { vec![] } else { vec![("content-type", ct.as_str())] };
        match http(&req.method, &format!("{target}{}", req.path), &headers, &req.body) {
            Ok(r) => {
                let mut body: serde_json::Value = serde_json::from_slice(&r.body).unwrap_or_default();
                if let Some(o) = body.as_object_mut() {
                    o.remove("wait_max_ms");
                }
                Reply::json(r.status, &body)
            }
            Err(e) => Reply::text(502, &e.to_string()),
        }
    })
    .expect("relay starts")
}

/// Ends `n` fresh tasks on replica 1, each after `proxy` minted for it; the time from each end
/// to the first refusal through `proxy`, sorted.
fn propagation(replica1: &mandate_minter::Handle, proxy: &Envoy, svid: &str, subject: &str, n: usize) -> Vec<Duration> {
    let mut lat = Vec::with_capacity(n);
    for _ in 0..n {
        let task = create_task(replica1, subject);
        assert_eq!(get_order(proxy, svid, &task).status, 200);
        // Ends arrive at any point of the proxy's poll cycle.
        std::thread::sleep(Duration::from_millis(50 + (lat.len() as u64 * 37) % 400));
        let t0 = Instant::now();
        end_task(replica1, &task);
        loop {
            let r = get_order(proxy, svid, &task);
            if r.status != 200 {
                assert_eq!(reason(&r), "task_revoked", "{}", r.text());
                break;
            }
            assert!(t0.elapsed() < Duration::from_secs(10), "the end never reached the proxy");
            std::thread::sleep(Duration::from_millis(2));
        }
        lat.push(t0.elapsed());
    }
    lat.sort();
    lat
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(i).copied().unwrap_or_default()
}

#[test]
fn three_replicas_share_tasks_and_ends_and_survive_losing_one() {
    if !prerequisites("three_replicas_share_tasks_and_ends_and_survive_losing_one") {
        return;
    }
    let Some(pg) = TestPg::start().expect("PostgreSQL test cluster") else { return };
    pg.create_db("mandate").expect("createdb");
    let issuer = SvidIssuer::new();
    let state = tempfile::tempdir().expect("state dirs");
    let replicas: Vec<mandate_minter::Handle> = (1..=3)
        .map(|i| {
            let mut cfg = minter_config(&issuer, &state.path().join(format!("r{i}")), json!({"dev": true, "ttl": {"default_s": 120, "max_s": 300}}));
            cfg["tasks"] = json!({"require_registered": true});
            cfg["store"] = pg.store_config("mandate");
            mandate_minter::spawn(MinterConfig::from_json(cfg).expect("minter config")).expect("replica starts")
        })
        .collect();
    let ports: Vec<u16> = replicas.iter().map(|r| r.addr.port()).collect();
    let echo = MockServer::echo().expect("echo upstream");
    // The minter's timeout leaves room for a long poll (the filter waits ¾ of it). A plain poll
    // comes only every 10 s: every refusal below within 2 s shows the long poll at work.
    let minter = json!({"cluster": "minter", "timeout_ms": 2000, "revocations": {"interval_ms": 10000}});
    let proxy_b = Envoy::start(
        "mandate.yaml",
        Vars::new().plugin_config_json(&plugin_config(&issuer, minter.clone())).upstream_port(echo.port()).cluster("minter", ports[1]),
    )
    .expect("proxy B starts");
    let proxy_lb = Envoy::start(
        "mandate.yaml",
        Vars::new().plugin_config_json(&plugin_config(&issuer, minter)).upstream_port(echo.port()).cluster_yaml(&replicas_cluster_yaml(&ports)),
    )
    .expect("proxy LB starts");
    let svid = agent_svid(&issuer);
    let subject = format!("spiffe://{}{AGENT}", issuer.trust_domain);

    // ---- A task registered on replica 1 mints through replica 2 and through the balancer.
    let task = create_task(&replicas[0], &subject);
    let r = get_order(&proxy_b, &svid, &task);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(get_order(&proxy_lb, &svid, &task).status, 200);
    // ---- Ended on replica 1: refused through both proxies, well within one (10 s) poll interval.
    let ended = Instant::now();
    end_task(&replicas[0], &task);
    for proxy in [&proxy_b, &proxy_lb] {
        let (refused, _) = wait_for_refusal(proxy, &svid, &task, Duration::from_secs(3));
        let refused = refused.expect("the end reaches every proxy");
        assert_eq!(refused.status, 403, "{}", refused.text());
        assert_eq!(reason(&refused), "task_revoked", "{}", refused.text());
    }
    eprintln!("first end refused through both proxies after {:?}", ended.elapsed());

    // ---- Propagation: end on replica 1 → first refusal at proxy B (which polls replica 2), with
    // long polls, and the same through a relay that hides the offer (plain polling every
    // interval_ms): the baseline, same run.
    let samples: usize = std::env::var("MANDATE_PROPAGATION_SAMPLES").ok().and_then(|s| s.parse().ok()).unwrap_or(10);
    let lat = propagation(&replicas[0], &proxy_b, &svid, &subject, samples);
    let relay = plain_polling_relay(replicas[1].base_url());
    let proxy_plain = Envoy::start(
        "mandate.yaml",
        Vars::new()
            .plugin_config_json(&plugin_config(&issuer, json!({"cluster": "minter", "timeout_ms": 2000, "revocations": {"interval_ms": 1000}})))
            .upstream_port(echo.port())
            .cluster("minter", relay.port()),
    )
    .expect("plain-polling proxy starts");
    let base = propagation(&replicas[0], &proxy_plain, &svid, &subject, samples);
    drop(proxy_plain);
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    for (name, l) in [("long poll", &lat), ("plain poll (baseline)", &base)] {
        eprintln!(
            "propagation end@replica1 -> refusal@proxyB, {name}, {samples} samples: p50 {:.1} ms p99 {:.1} ms max {:.1} ms",
            ms(percentile(l, 0.5)),
            ms(percentile(l, 0.99)),
            ms(l.last().copied().unwrap_or_default())
        );
    }
    eprintln!(
        "propagation ratio long/plain: p50 {:.3} p99 {:.3}",
        ms(percentile(&lat, 0.5)) / ms(percentile(&base, 0.5)).max(1e-9),
        ms(percentile(&lat, 0.99)) / ms(percentile(&base, 0.99)).max(1e-9)
    );
    println!("PROPAGATION_MS {}", lat.iter().map(|d| format!("{:.1}", ms(*d))).collect::<Vec<_>>().join(" "));
    // proxy B plain-polls only every 10 s: most ends would take seconds without the long poll.
    let slowest = lat.last().copied().unwrap_or_default();
    assert!(slowest < Duration::from_secs(2), "an end took {slowest:?} to reach proxy B: not pushed by the long poll");

    // ---- Replica 3 killed under load through the balancer: each request a fresh task, so
    // each one mints. Traffic moves to replicas 1 and 2; nothing passes without a credential.
    let tasks: Vec<String> = (0..150).map(|_| create_task(&replicas[0], &subject)).collect();
    let echo_before = echo.request_count();
    let mut replicas = replicas;
    let mut third = replicas.pop();
    let mut statuses = Vec::new();
    for (i, t) in tasks.iter().enumerate() {
        if i == 50 {
            // Stops listening and drops its open connections at once.
            third.take().expect("replica 3").shutdown().expect("replica 3 stops");
            eprintln!("replica 3 stopped");
        }
        statuses.push(get_order(&proxy_lb, &svid, t).status);
    }
    let ok = statuses.iter().filter(|s| **s == 200).count();
    let refused: Vec<_> = statuses.iter().enumerate().filter(|(_, s)| **s != 200).collect();
    eprintln!("through the balancer: {ok}/{} minted; refusals {refused:?}", statuses.len());
    assert_eq!(proxy_lb.stat("cluster.minter.outlier_detection.ejections_active").unwrap(), Some(1), "the dead replica was ejected");
    assert!(refused.iter().all(|(_, s)| **s == 503), "only fail-closed 503s while the dead replica is ejected: {refused:?}");
    assert!(statuses[100..].iter().all(|s| *s == 200), "traffic moved to the live replicas: {:?}", &statuses[100..]);
    let seen = echo.requests();
    let upstream = &seen[echo_before..];
    assert_eq!(upstream.len(), ok, "exactly the minted requests reached the upstream");
    for req in upstream {
        let auth = req.header("authorization").expect("a credential upstream");
        let token = auth.strip_prefix("Bearer ").expect("bearer");
        assert_ne!(token, svid, "the SVID reached the upstream");
        assert_eq!(jwt_claims(token)["iss"], MINTER_ISSUER, "a minted credential");
    }
    drop(proxy_b);
    drop(proxy_lb);
    drop(replicas);
}
