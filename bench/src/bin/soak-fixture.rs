//! `soak-fixture --dir D [--tokens K] [--subjects S] [--ttl S]`: everything `scripts/soak` needs,
//! fresh per run.
//!
//! Writes into D:
//! * `bundle.json`: the trust domain's SPIFFE bundle. The ES256 signing key lives only in this
//!   process: it is generated per run and never written.
//! * `tokens.txt`: K distinct JWT-SVIDs, one per line as `<subject index> <token>`; token `i`
//!   belongs to agent `i mod S` (`spiffe://example.org/agent/soak-<n>`) and has its own `jti`.
//!   `scripts/soak_wrk.lua` cycles through them, so with K above the filter's identity cache
//!   (4096 per worker) every request is a fresh verification.
//! * `bad.jwt`: one more SVID of agent 0, expired (the share of requests refused at identity).
//! * `svid-b.jwt`, `svid-d.jwt`: the two delegates of the delegation traffic (agent 0 → B → D).
//! * `plugin.json`: mandate's configuration: registered tasks, a GET resource, two MCP servers
//!   (`mcp.body` `when_needed` and `always`), credential minting with its cache and the
//!   revocation feed. `scripts/soak_run.py` adds the `delegation` section (it needs the
//!   minter's keys) and `delegation_rules`.
//! * `minter.json`: the minter (loopback, port 0, development mode, tasks must be registered).
//! * `fixture.json`: a summary (subjects, hosts, paths, intents, tools).

#[path = "../common.rs"]
#[allow(dead_code)]
mod common;

use anyhow::{Context, Result};
use clap::Parser;
use common::{AUD, TRUST_DOMAIN};
use mandate_core::testkit::{spiffe_bundle, TestKey};
use serde_json::{json, Value};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

const HOST: &str = "tickets.internal";
const MCP_HOST: &str = "mcp.internal";
const MCP_BODY_HOST: &str = "mcp-body.internal";
const MCP_PATH: &str = "/mcp";
const INTENT: &str = "ticket.read";
const MCP_INTENT: &str = "ticket.triage";
const MCP_TOOL: &str = "get_ticket";
const DENIED_TOOL: &str = "delete_ticket";
const WRONG_INTENT: &str = "customer.lookup";
const DELEGATE_B: &str = "spiffe://example.org/agent/soak-b";
const DELEGATE_D: &str = "spiffe://example.org/agent/soak-d";

#[derive(Parser)]
#[command(name = "soak-fixture", about = "keys, tokens and configs for scripts/soak")]
struct Cli {
    #[arg(long)]
    dir: PathBuf,
    /// Distinct valid JWT-SVIDs.
    #[arg(long, default_value_t = 100_000)]
    tokens: usize,
    /// Distinct agents the tokens belong to (tasks bind at most 16 each).
    #[arg(long, default_value_t = 256)]
    subjects: usize,
    /// Token lifetime, seconds (the whole soak must fit in it).
    #[arg(long, default_value_t = 4 * 3600)]
    ttl: u64,
}

fn subject(i: usize) -> String {
    format!("spiffe://example.org/agent/soak-{i}")
}

fn write_json(dir: &Path, name: &str, v: &Value) -> Result<()> {
    let p = dir.join(name);
    std::fs::write(&p, serde_json::to_vec_pretty(v)?).with_context(|| format!("writing {}", p.display()))
}

fn plugin_config(bundle: &Value) -> Value {
    let mcp = |name: &str, host: &str, body: &str| {
        json!({"name": name, "hosts": [host], "paths": [MCP_PATH], "methods": ["POST"], "sensitivity": "internal",
               "audience": "tickets", "mcp": {"body": body}})
    };
    let mcp_op = |resource: &str| {
        json!({"resource": resource, "tools": [MCP_TOOL, "search_*"],
               "arguments": [{"pointer": "/ticket", "equals_context": "task"}]})
    };
    json!({
        "identity": {
            "audiences": [AUD],
            "upstream_header": "x-mandate-identity",
            "trust_domains": [{"name": TRUST_DOMAIN, "bundle": {"inline": bundle}}]
        },
        "policy": {
            "environment": "soak",
            "tasks": "registered",
            "classes": [{"name": "agent", "principals": ["spiffe://example.org/agent/*"], "intent_required": true,
                         "refuse_standing_secrets": true}],
            "resources": [
                {"name": "tickets", "hosts": [HOST], "paths": ["/tickets/**"], "methods": ["GET"], "sensitivity": "internal"},
                mcp("tickets-mcp", MCP_HOST, "when_needed"),
                mcp("tickets-mcp-body", MCP_BODY_HOST, "always"),
                {"name": "crm", "hosts": ["crm.internal"], "paths": ["/customers/**"], "sensitivity": "restricted"}
            ],
            "intents": [
                {"name": INTENT, "operations": [{"resource": "tickets", "methods": ["GET"]}], "scopes": ["tickets:read"], "ttl_s": 300},
                {"name": MCP_INTENT, "operations": [mcp_op("tickets-mcp"), mcp_op("tickets-mcp-body")],
                 "scopes": ["tickets:read"], "ttl_s": 300},
                {"name": WRONG_INTENT, "operations": [{"resource": "crm", "methods": ["GET"]}], "require_signed": true}
            ],
            "rules": [
                {"id": "agents-read-tickets", "effect": "allow", "classes": ["agent"], "intents": [INTENT, MCP_INTENT]}
            ]
        },
        "minter": {"cluster": "minter", "authority": "minter", "timeout_ms": 2000, "refresh_margin_s": 10,
                   "revocations": {"interval_ms": 1000}}
    })
}

/// The bench's minter, but every task must be registered (the soak churns real tasks).
fn minter_config(bundle: &Value) -> Value {
    let mut cfg = common::minter_config(bundle);
    cfg["issuer"] = json!("https://minter.soak.test");
    cfg["tasks"] = json!({"require_registered": true, "default_ttl_s": 3600});
    cfg
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    anyhow::ensure!(cli.subjects > 0 && cli.tokens >= cli.subjects, "--tokens must be at least --subjects (> 0)");
    std::fs::create_dir_all(&cli.dir).with_context(|| format!("creating {}", cli.dir.display()))?;
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let (iat, exp) = (now.saturating_sub(5), now + cli.ttl);
    let key = TestKey::es256("soak-es256-1");
    let bundle = spiffe_bundle(&[&key], None);
    write_json(&cli.dir, "bundle.json", &bundle)?;
    let svid = |sub: &str, iat: u64, exp: u64, jti: Option<String>| {
        let mut c = json!({"sub": sub, "aud": AUD, "iat": iat, "exp": exp});
        if let Some(j) = jti {
            c["jti"] = json!(j);
        }
        key.sign(&c)
    };

    let mut out = std::io::BufWriter::new(std::fs::File::create(cli.dir.join("tokens.txt"))?);
    for i in 0..cli.tokens {
        let s = i % cli.subjects;
        writeln!(out, "{s} {}", svid(&subject(s), iat, exp, Some(format!("soak-{i}"))))?;
    }
    out.flush()?;
    std::fs::write(cli.dir.join("bad.jwt"), svid(&subject(0), now - 7200, now - 3600, Some("soak-expired".into())))?;
    std::fs::write(cli.dir.join("svid-b.jwt"), svid(DELEGATE_B, iat, exp, None))?;
    std::fs::write(cli.dir.join("svid-d.jwt"), svid(DELEGATE_D, iat, exp, None))?;

    let plugin = plugin_config(&bundle);
    // Never start Envoy with a configuration the filter refuses.
    mandate_core::config::parse(plugin.to_string().as_bytes()).map_err(|e| anyhow::anyhow!("plugin.json: {e}"))?;
    write_json(&cli.dir, "plugin.json", &plugin)?;
    write_json(&cli.dir, "minter.json", &minter_config(&bundle))?;

    let summary = json!({
        "dir": cli.dir,
        "tokens": cli.tokens,
        "subjects": (0..cli.subjects).map(subject).collect::<Vec<_>>(),
        "token_exp": exp,
        "trust_domain": TRUST_DOMAIN,
        "host": HOST, "path_prefix": "/tickets/",
        "mcp_host": MCP_HOST, "mcp_body_host": MCP_BODY_HOST, "mcp_path": MCP_PATH,
        "intent": INTENT, "mcp_intent": MCP_INTENT, "wrong_intent": WRONG_INTENT,
        "tool": MCP_TOOL, "denied_tool": DENIED_TOOL,
        "delegation": {"b": DELEGATE_B, "d": DELEGATE_D, "svid_b": "svid-b.jwt", "svid_d": "svid-d.jwt"},
    });
    write_json(&cli.dir, "fixture.json", &summary)?;
    println!("{summary}");
    Ok(())
}
