//! The parity table (see `mandate_e2e::parity`): every scenario through the wasmtime test host
//! and through real Envoy; both must match the expectation and each other.

use std::time::Instant;

use mandate_e2e::parity::{compare, run_on_envoy, run_on_host, standard_table, Fixture};
use mandate_e2e::{prerequisites, unix_now, wasm_prerequisite};

/// The table on the test host alone: needs only the wasm module.
#[test]
fn parity_table_on_test_host() {
    let Some(wasm) = wasm_prerequisite("parity_table_on_test_host") else { return };
    let fixture = Fixture::new(unix_now());
    let table = standard_table(&fixture);
    table.validate().expect("table");
    let t0 = Instant::now();
    let host = run_on_host(&table, &wasm, fixture.now).expect("test host run");
    eprintln!("test host: {} scenarios in {:?}", table.scenarios.len(), t0.elapsed());
    let (report, failures) = compare(&table, &[("host", &host)]);
    eprintln!("{report}");
    assert!(failures.is_empty(), "{} failure(s):\n{}", failures.len(), failures.join("\n"));
}

/// The same table on the test host and on Envoy: identical verdicts, both as expected.
#[test]
fn parity_table_envoy_agrees_with_test_host() {
    if !prerequisites("parity_table_envoy_agrees_with_test_host") {
        return;
    }
    let Some(wasm) = wasm_prerequisite("parity_table_envoy_agrees_with_test_host") else { return };
    let fixture = Fixture::new(unix_now());
    let table = standard_table(&fixture);
    table.validate().expect("table");
    let host = run_on_host(&table, &wasm, fixture.now).expect("test host run");
    let t0 = Instant::now();
    let (envoy, stats) = run_on_envoy(&table).expect("Envoy run");
    eprintln!("envoy: {} scenarios in {:?}; per config (start, requests): {:?}", table.scenarios.len(), t0.elapsed(), stats.per_config);
    let (report, failures) = compare(&table, &[("host", &host), ("envoy", &envoy)]);
    eprintln!("{report}");
    assert!(failures.is_empty(), "{} failure(s):\n{}", failures.len(), failures.join("\n"));
}
