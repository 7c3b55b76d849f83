//! The JSON Schema of the plugin configuration, generated from the Rust types
//! (`mandate_core::config::Config` with mandate-core's `schema` feature) and committed as
//! `plugin/config.schema.json` (`mandate config schema > plugin/config.schema.json`).

/// The schema as JSON (draft 2020-12), with a stable key order.
pub fn plugin_config_schema() -> serde_json::Value {
    let schema = schemars::schema_for!(mandate_core::config::Config);
    schema.to_value()
}

/// The schema as the committed file holds it: pretty JSON and a final newline.
pub fn plugin_config_schema_text() -> String {
    let mut text = serde_json::to_string_pretty(&plugin_config_schema()).unwrap_or_default();
    text.push('\n');
    text
}
