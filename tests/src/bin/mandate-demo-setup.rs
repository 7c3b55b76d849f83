//! Writes everything scripts/demo needs into OUTDIR, generated fresh per run:
//!   plugin.json    plugin config: trust domain acme.example (inline bundle), the
//!                  support-agent policy from policies/, an intent issuer, the minter cluster
//!   minter.json    minter config trusting the same bundle (state in OUTDIR/minter-state)
//!   agent.svid     JWT-SVID of spiffe://acme.example/agent/support/a1 (5 minutes)
//!   rogue.svid     the same claims signed by a key the trust domain does not hold
//!   intent.jwt     a signed intent token: customer.lookup for task CASE-7, bound to the agent

use anyhow::{Context, Result};
use mandate_e2e::{testkit, unix_now, workspace_root};
use serde_json::{json, Value};
use std::path::PathBuf;

const AUDIENCE: &str = "spiffe://acme.example/gateway";
const AGENT: &str = "spiffe://acme.example/agent/support/a1";

fn main() -> Result<()> {
    let out = PathBuf::from(std::env::args().nth(1).context("usage: mandate-demo-setup OUTDIR")?);
    std::fs::create_dir_all(&out)?;
    let now = unix_now();
    let spire = testkit::TestKey::es256("spire-1");
    let intents = testkit::TestKey::es256("intents-1");
    let bundle = testkit::spiffe_bundle(&[&spire], Some(300));

    let policy_path = workspace_root().join("policies/support-agent.policy.json");
    let raw = std::fs::read(&policy_path).with_context(|| policy_path.display().to_string())?;
    let mut policy: Value = serde_json::from_slice(&raw)?;
    policy["intent_issuers"] =
        json!([{"issuer": "https://intents.acme.example", "jwks": testkit::plain_jwks(&[&intents]), "audiences": [AUDIENCE]}]);

    let plugin = json!({
        "identity": {
            "audiences": [AUDIENCE],
            "upstream_header": "x-mandate-identity",
            "trust_domains": [{"name": "acme.example", "bundle": {"inline": bundle}}]
        },
        "policy": policy,
        "minter": {"cluster": "minter", "timeout_ms": 1000, "revocations": {"interval_ms": 500}}
    });
    std::fs::write(out.join("plugin.json"), plugin.to_string())?;

    let minter = json!({
        "listen": "127.0.0.1:0",
        "issuer": "https://minter.acme.example",
        "state_dir": out.join("minter-state"),
        "workers": 1,
        "log_level": "error",
        "identity": {"audiences": [AUDIENCE], "trust_domains": [{"name": "acme.example", "bundle": {"inline": bundle}}]},
        "audiences": {"acme.example": ["*"]},
        "ttl": {"default_s": 120, "max_s": 300}
    });
    std::fs::write(out.join("minter.json"), minter.to_string())?;

    let claims = json!({"sub": AGENT, "aud": AUDIENCE, "iat": now.saturating_sub(5), "exp": now + 300});
    std::fs::write(out.join("agent.svid"), spire.sign(&claims))?;
    std::fs::write(out.join("rogue.svid"), testkit::TestKey::es256("spire-1").sign(&claims))?;
    let intent = json!({"iss": "https://intents.acme.example", "sub": AGENT, "aud": AUDIENCE, "exp": now + 600, "iat": now,
                        "intents": ["customer.lookup"], "task": "CASE-7"});
    std::fs::write(out.join("intent.jwt"), intents.sign_intent(&intent))?;
    Ok(())
}
