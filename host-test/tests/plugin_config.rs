//! The filter itself (on the wasmtime host) refuses what `mandate config check` refuses, with
//! the same field-naming log line: a non-object configuration, a principal pattern with glob
//! syntax it does not have.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use mandate_host_test::ConfigRejected;

#[test]
fn the_filter_log_names_the_field_of_a_refused_configuration() {
    let Some(host) = common::host("the_filter_log_names_the_field_of_a_refused_configuration") else { return };
    for (raw, line) in [
        ("[]", "invalid configuration at `.`"),
        (r#"{"policy": {"classes": [{"name": "a", "principals": ["spiffe://td/agent-[a-z"]}]}}"#, "invalid configuration at `policy.classes[0].principals[0]`"),
        (r#"{"policy": {"rules": [{"id": "r", "effect": "allow", "principals": ["spiffe://td/a?"]}]}}"#, "invalid configuration at `policy.rules[0].principals[0]`"),
    ] {
        let err = host.new_vm(b"", raw.as_bytes()).err().unwrap_or_else(|| panic!("the filter accepted {raw}"));
        let rej = err.downcast_ref::<ConfigRejected>().unwrap();
        let expected = mandate_core::config::parse(raw.as_bytes()).unwrap_err().to_string();
        assert!(expected.starts_with(line), "{expected}");
        assert!(rej.logs.iter().any(|l| l.message == expected), "{raw}: {:?}", rej.logs);
    }
    assert!(host.new_vm(b"", br#"{"$schema": "plugin/config.schema.json"}"#).is_ok(), "$schema is accepted for editors");
}
