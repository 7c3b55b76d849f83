//! Writes everything scripts/demo needs into OUTDIR, generated fresh per run:
//!   plugin.json    plugin config: trust domain acme.example (inline bundle), the
//!                  support-agent policy from policies/ (registered tasks), an intent issuer,
//!                  the minter cluster
//!   plugin-mcp.json  the same, with the MCP chapter's policy (the support desk's MCP server)
//!   minter.json    minter config as production runs it: HTTPS, mutual TLS with named clients
//!                  (the gateway may mint and read the feed; the orchestrator may create and
//!                  end tasks; nobody else, not even an agent holding a certificate from the
//!                  same CA), registered tasks only; state in OUTDIR/minter-state
//!   plugin-delegation.json  the delegation chapter's filter: the billing API, where the support
//!                  agent may hand refunds to a billing sub-agent (`delegation.keys` is filled
//!                  in by scripts/demo from the running minter's JWKS)
//!   agent.svid     JWT-SVID of spiffe://acme.example/agent/support/a1 (5 minutes)
//!   billing.svid   JWT-SVID of spiffe://acme.example/agent/billing/b1, the sub-agent
//!   rogue.svid     the same claims signed by a key the trust domain does not hold
//!
//! `mandate-demo-setup intent OUTDIR TASK` writes OUTDIR/intent.jwt: a signed intent token
//! (`typ: intent+jwt`) for customer.lookup, bound to the agent, this gateway and TASK (the id
//! the minter gave the task when the orchestrator registered it).
//!
//! The PKI (CA, minter server certificate, client certificates) comes from
//! scripts/gen-test-certs in OUTDIR/pki.

use anyhow::{bail, Context, Result};
use mandate_e2e::{testkit, unix_now, workspace_root};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

const AUDIENCE: &str = "spiffe://acme.example/gateway";
const AGENT: &str = "spiffe://acme.example/agent/support/a1";
const BILLING_AGENT: &str = "spiffe://acme.example/agent/billing/b1";
const MINTER_ISSUER: &str = "https://minter.acme.example";
const INTENT_ISSUER: &str = "https://intents.acme.example";
/// The proxy's identity at the minter (its client certificate's URI SAN).
pub const GATEWAY_CLIENT: &str = "spiffe://acme.example/gateway/envoy";
/// The orchestrator's identity at the minter.
pub const ORCHESTRATOR_CLIENT: &str = "spiffe://acme.example/orchestrator";

/// The intent issuer's key: a fixed test key, so that the `intent` step signs with the key
/// whose public half `plugin.json` trusts.
fn intent_key() -> testkit::TestKey {
    testkit::TestKey::rsa("intents-1", 0)
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.as_slice() {
        [out] => setup(Path::new(out)),
        [cmd, out, task] if cmd == "intent" => intent(Path::new(out), task),
        _ => bail!("usage: mandate-demo-setup OUTDIR | mandate-demo-setup intent OUTDIR TASK"),
    }
}

fn setup(out: &Path) -> Result<()> {
    std::fs::create_dir_all(out)?;
    let now = unix_now();
    let spire = testkit::TestKey::es256("spire-1");
    let bundle = testkit::spiffe_bundle(&[&spire], Some(300));

    let policy_path = workspace_root().join("policies/support-agent.policy.json");
    let raw = std::fs::read(&policy_path).with_context(|| policy_path.display().to_string())?;
    let mut policy: Value = serde_json::from_slice(&raw)?;
    policy["intent_issuers"] =
        json!([{"issuer": INTENT_ISSUER, "audiences": [AUDIENCE], "jwks": testkit::plain_jwks(&[&intent_key()])}]);

    let plugin = json!({
        "identity": {
            "audiences": [AUDIENCE],
            "upstream_header": "x-mandate-identity",
            "trust_domains": [{"name": "acme.example", "bundle": {"inline": bundle}}]
        },
        "policy": policy,
        "minter": {"cluster": "minter", "authority": "localhost", "timeout_ms": 1000, "revocations": {"interval_ms": 500}}
    });
    std::fs::write(out.join("plugin.json"), plugin.to_string())?;

    // The MCP chapter: the same identity and minter, a policy for the support desk's MCP server.
    let mut plugin_mcp = plugin.clone();
    plugin_mcp["policy"] = mcp_policy();
    std::fs::write(out.join("plugin-mcp.json"), plugin_mcp.to_string())?;

    // The delegation chapter: the billing API, Txn-Tokens from the minter.
    let mut plugin_delegation = plugin.clone();
    plugin_delegation["policy"] = delegation_policy();
    plugin_delegation["delegation"] =
        json!({"issuer": MINTER_ISSUER, "audience": "acme.example", "keys": {"inline": {"keys": []}}, "max_delegations": 2});
    std::fs::write(out.join("plugin-delegation.json"), plugin_delegation.to_string())?;

    let pki: PathBuf = out.join("pki");
    let minter = json!({
        "listen": "127.0.0.1:0",
        "issuer": MINTER_ISSUER,
        "state_dir": out.join("minter-state"),
        "workers": 1,
        "log_level": "error",
        "identity": {"audiences": [AUDIENCE], "trust_domains": [{"name": "acme.example", "bundle": {"inline": bundle}}]},
        "tls": {"cert": pki.join("server.pem"), "key": pki.join("server.key"), "client_ca": pki.join("ca.pem")},
        "client_auth": {"mode": "mtls", "clients": [
            {"client_id": GATEWAY_CLIENT, "roles": ["mint", "feed"]},
            {"client_id": ORCHESTRATOR_CLIENT, "roles": ["tasks", "revoke"]},
            // Agents may ask for Txn-Tokens (delegation evidence), never for a credential.
            {"client_id": AGENT, "roles": ["txn"]},
            {"client_id": BILLING_AGENT, "roles": ["txn"]}
        ]},
        // Destinations are the policy's resources (their `audience`, else their name);
        // `support-mcp` is the MCP chapter's support desk (plugin-mcp.json).
        "audiences": {"acme.example": ["tickets", "ticket-comments", "kb-articles", "customer-db", "support-mcp", "billing-api"]},
        "scopes": {
            "tickets": ["tickets:read", "kb:read"],
            "ticket-comments": ["tickets:read", "kb:read", "tickets:comment"],
            "kb-articles": ["tickets:read", "kb:read"],
            "customer-db": ["customers:read", "customers:write"],
            "support-mcp": ["tickets:read", "tickets:comment", "refunds:small"],
            "billing-api": ["refunds:write"]
        },
        "txn_tokens": {"max_delegations": 2, "max_ttl_s": 600},
        "require_task": true,
        "tasks": {"require_registered": true, "default_ttl_s": 900, "max_ttl_s": 3600},
        "ttl": {"default_s": 120, "max_s": 300}
    });
    std::fs::write(out.join("minter.json"), minter.to_string())?;

    let claims = json!({"sub": AGENT, "aud": AUDIENCE, "iat": now.saturating_sub(5), "exp": now + 300});
    std::fs::write(out.join("agent.svid"), spire.sign(&claims))?;
    std::fs::write(out.join("rogue.svid"), testkit::TestKey::es256("spire-1").sign(&claims))?;
    let billing = json!({"sub": BILLING_AGENT, "aud": AUDIENCE, "iat": now.saturating_sub(5), "exp": now + 300});
    std::fs::write(out.join("billing.svid"), spire.sign(&billing))?;
    Ok(())
}

/// The delegation chapter's policy: the billing API. Support agents may hand `case.refund` work
/// to billing agents; both may post refunds, only support agents read the ledger.
fn delegation_policy() -> Value {
    json!({
        "tasks": "registered",
        "classes": [
            {"name": "support-agent", "principals": ["spiffe://acme.example/agent/support/*"], "intent_required": true},
            {"name": "billing-agent", "principals": ["spiffe://acme.example/agent/billing/*"], "intent_required": true}
        ],
        "resources": [
            {"name": "billing-refunds", "hosts": ["billing.acme.internal"], "paths": ["/refunds/**"], "methods": ["POST"], "audience": "billing-api"},
            {"name": "billing-ledger", "hosts": ["billing.acme.internal"], "paths": ["/ledger/**"], "methods": ["GET"], "audience": "billing-api"}
        ],
        "intents": [{"name": "case.refund", "scopes": ["refunds:write"], "ttl_s": 120, "operations": [
            {"resource": "billing-refunds", "methods": ["POST"]},
            {"resource": "billing-ledger", "methods": ["GET"]}
        ]}],
        "rules": [
            {"id": "agents-refund-cases", "effect": "allow", "classes": ["support-agent", "billing-agent"], "intents": ["case.refund"], "resources": ["billing-refunds"]},
            {"id": "support-reads-ledger", "effect": "allow", "classes": ["support-agent"], "intents": ["case.refund"], "resources": ["billing-ledger"]}
        ],
        "delegation_rules": [{"id": "support-hands-billing", "intents": ["case.refund"], "from": ["support-agent"], "to": ["billing-agent"]}]
    })
}

/// The MCP chapter's policy: the support desk's MCP server (tests/mcp/server.py) as resource
/// `support-mcp`; intent `support.case` may read tickets, comment, and refund up to 100;
/// nothing else (delete_customer is named by no intent). Registered tasks, like the main story;
/// the calls are judged from the 2026-07-28 headers (`body: when_needed`).
fn mcp_policy() -> Value {
    json!({
        "tasks": "registered",
        "resources": [{
            "name": "support-mcp", "paths": ["/mcp"], "sensitivity": "internal", "audience": "support-mcp",
            // `when_needed`: MCP 2026-07-28 mirrors the tool and the marked arguments (refund's
            // `amount`) into headers, so the filter decides without buffering the body; the
            // server rejects a body that disagrees with them.
            "mcp": {"tools": {"refund": {"sensitivity": "confidential"}, "delete_customer": {"sensitivity": "restricted"}},
                    "body": "when_needed"}
        }],
        "intents": [{
            "name": "support.case",
            "operations": [
                {"resource": "support-mcp", "tools": ["get_ticket", "add_comment"]},
                {"resource": "support-mcp", "tools": ["refund"], "arguments": [{"pointer": "/amount", "min": 0, "max": 100}]}
            ],
            "scopes": ["tickets:read", "tickets:comment", "refunds:small"],
            "ttl_s": 300
        }],
        "rules": [{"id": "support-agents-work-cases", "effect": "allow", "intents": ["support.case"], "resources": ["support-mcp"]}]
    })
}

fn intent(out: &Path, task: &str) -> Result<()> {
    let now = unix_now();
    let key = intent_key();
    let header = json!({"alg": key.alg(), "kid": key.kid, "typ": "intent+jwt"});
    let claims = json!({"iss": INTENT_ISSUER, "sub": AGENT, "aud": AUDIENCE, "exp": now + 600, "iat": now,
                        "intents": ["customer.lookup"], "task": task});
    std::fs::write(out.join("intent.jwt"), key.sign_raw(key.alg(), &header.to_string(), &claims.to_string()))?;
    Ok(())
}
