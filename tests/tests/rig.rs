//! The rig's extension points against a real Envoy: extra clusters, extra listeners, the access
//! log and the admin stats. Later issues (bundle server, minter) build on these.

use std::time::Duration;

use mandate_e2e::{http_get, prerequisites, Envoy, MockServer, Reply, SvidIssuer, Vars};

#[test]
fn extra_cluster_and_listener_are_wired_and_observable() {
    if !prerequisites("extra_cluster_and_listener_are_wired_and_observable") {
        return;
    }
    let issuer = SvidIssuer::new();
    let echo = MockServer::echo().unwrap();
    let bundle = issuer.bundle();
    let bundles = MockServer::start(move |_| Reply::json(200, &bundle)).unwrap();
    // A second listener without the filter, routing straight to the extra cluster.
    let side = r#"- name: side
  address:
    socket_address: { address: 127.0.0.1, port_value: 0 }
  filter_chains:
  - filters:
    - name: envoy.filters.network.http_connection_manager
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
        stat_prefix: side
        route_config:
          virtual_hosts:
          - name: all
            domains: ["*"]
            routes:
            - match: { prefix: "/" }
              route: { cluster: bundle_server }
        http_filters:
        - name: envoy.filters.http.router
          typed_config:
            "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
"#;
    let envoy = Envoy::start(
        "mandate.yaml",
        Vars::new()
            .plugin_config_json(&issuer.plugin_config())
            .upstream_port(echo.port())
            .cluster("bundle_server", bundles.port())
            .listener_yaml(side),
    )
    .unwrap();
    assert_eq!(envoy.listener_ports().len(), 2, "{:?}", envoy.listener_ports());
    let side_port = envoy.listener_port_named("side");
    assert_ne!(side_port, envoy.listener_port());

    let r = http_get(&format!("http://127.0.0.1:{side_port}/bundle"), &[]).unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json().unwrap(), issuer.bundle());
    assert_eq!(bundles.request_count(), 1);
    assert_eq!(echo.request_count(), 0);

    let bearer = format!("Bearer {}", issuer.svid("/ns/prod/sa/agent"));
    let r = http_get(&envoy.url("/x"), &[("authorization", &bearer)]).unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let entries = envoy.wait_access_log(1, Duration::from_secs(5)).unwrap();
    assert_eq!(entries[0]["listener"], "mandate");
    assert_eq!(entries[0]["path"], "/x");
    assert_eq!(entries[0]["status"], 200);
    assert!(entries[0]["decision_id_request"].as_str().is_some_and(|s| !s.is_empty()), "{}", entries[0]);

    let prom = envoy.stats_prometheus().unwrap();
    assert!(prom.contains("envoy_cluster_upstream_rq_total{envoy_cluster_name=\"bundle_server\"} 1"), "{prom}");
    assert_eq!(envoy.stat("cluster.upstream.upstream_rq_total").unwrap(), Some(1));
}

/// Set MANDATE_E2E_DEMO_FAILURE=1 to see what a failing test prints (Envoy's log).
#[test]
fn failing_test_prints_envoy_log() {
    if std::env::var_os("MANDATE_E2E_DEMO_FAILURE").is_none() || !prerequisites("failing_test_prints_envoy_log") {
        return;
    }
    let echo = MockServer::echo().unwrap();
    let envoy = Envoy::start("mandate.yaml", Vars::new().upstream_port(echo.port())).unwrap();
    assert_eq!(http_get(&envoy.url("/"), &[]).unwrap().status, 200, "deliberate failure");
}
