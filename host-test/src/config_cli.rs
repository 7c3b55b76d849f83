//! `mandate config check|schema`: the plugin configuration as the filter reads it.

use anyhow::{Context as _, Result};
use mandate_core::config::{self, ConfigError};
use mandate_core::policy::{lint, Policy};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(clap::Subcommand)]
pub enum ConfigCommand {
    /// Validate a plugin configuration exactly as the filter does (the same parser): exit 0 if
    /// it would be accepted, 2 if refused (the message names the field), 1 if unreadable.
    /// Policy lint findings (and suspicious settings) are printed as warnings.
    Check {
        /// The configuration (JSON), or '-' for stdin.
        file: PathBuf,
        /// Print one JSON object: {"file", "valid", "error": {"field", "message"}?, "warnings"}.
        #[arg(long)]
        json: bool,
        /// Exit 2 on warnings too.
        #[arg(long)]
        deny_warnings: bool,
    },
    /// Print the JSON Schema of the plugin configuration (plugin/config.schema.json).
    Schema,
}

pub fn run(cmd: &ConfigCommand) -> Result<ExitCode> {
    match cmd {
        ConfigCommand::Check { file, json, deny_warnings } => check(file, *json, *deny_warnings),
        ConfigCommand::Schema => {
            print!("{}", mandate_host_test::schema::plugin_config_schema_text());
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn read(file: &Path) -> Result<Vec<u8>> {
    if file == Path::new("-") {
        let mut buf = Vec::new();
        std::io::Read::read_to_end(&mut std::io::stdin(), &mut buf).context("reading stdin")?;
        return Ok(buf);
    }
    std::fs::read(file).with_context(|| format!("reading {}", file.display()))
}

/// Warnings for an accepted configuration: the policy linter's findings, and a configuration
/// that denies every request.
pub fn warnings(c: &config::Config) -> Vec<String> {
    let mut out = Vec::new();
    match &c.policy {
        None => out.push("policy: no policy: every request is denied (`no_rule_matched`)".to_string()),
        Some(p) => {
            if let Ok(policy) = Policy::compile(p, "policy") {
                for f in lint::lint(&policy) {
                    out.push(format!("policy: {}: {}", f.subject, f.message));
                }
            }
        }
    }
    out
}

fn check(file: &Path, json: bool, deny_warnings: bool) -> Result<ExitCode> {
    let raw = read(file)?;
    let name = file.display().to_string();
    let (error, warns): (Option<ConfigError>, Vec<String>) = match config::parse(&raw) {
        Ok(c) => (None, warnings(&c)),
        Err(e) => (Some(e), Vec::new()),
    };
    if json {
        let out = serde_json::json!({
            "file": name,
            "valid": error.is_none(),
            "error": error.as_ref().map(|e| serde_json::json!({"field": e.field, "message": e.message})),
            "warnings": warns,
        });
        println!("{out}");
    } else {
        match &error {
            Some(e) => println!("error: {name}: {e}"),
            None => {
                for w in &warns {
                    println!("warning: {name}: {w}");
                }
                println!("{name}: valid; {} warning(s)", warns.len());
            }
        }
    }
    Ok(if error.is_some() || (deny_warnings && !warns.is_empty()) { ExitCode::from(2) } else { ExitCode::SUCCESS })
}
