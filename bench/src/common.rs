//! Shared by the native bench tools (`bench-fixture`, `bench-core`): the bench trust domain, the
//! request the policy allows, and mandate's configuration for the bench.

use serde_json::{json, Value};

/// Audience the SVIDs carry and mandate (and jwt_authn, and the minter) require.
pub const AUD: &str = "spiffe://example.org/bench-gw";
pub const TRUST_DOMAIN: &str = "example.org";
pub const PRINCIPAL: &str = "spiffe://example.org/agent/bench";
/// What the wrk requests look like (the policy allows exactly this).
pub const HOST: &str = "tickets.internal";
pub const PATH: &str = "/tickets/42";
pub const INTENT: &str = "ticket.read";
pub const TASK: &str = "T-bench";

/// SVID claims for the bench principal; `jti` makes pool tokens distinct.
pub fn claims(iat: u64, exp: u64, jti: Option<String>) -> Value {
    let mut c = json!({"sub": PRINCIPAL, "aud": AUD, "iat": iat, "exp": exp});
    if let Some(j) = jti {
        c["jti"] = json!(j);
    }
    c
}

/// mandate's configuration: identity (inline bundle), an intent-aware policy with its decision
/// cache, and the minter with a credential cache of `credential_cache` entries.
pub fn plugin_config(bundle: &Value, max_lifetime_s: u64, credential_cache: usize) -> Value {
    let identity = json!({
        "audiences": [AUD],
        "upstream_header": "x-mandate-identity",
        "trust_domains": [{"name": TRUST_DOMAIN, "bundle": {"inline": bundle}}]
    });
    let policy = json!({
        "environment": "bench",
        "classes": [{"name": "agent", "principals": ["spiffe://example.org/agent/*"], "intent_required": true,
                     "refuse_standing_secrets": true, "max_token_lifetime_s": max_lifetime_s}],
        "resources": [
            {"name": "tickets", "hosts": [HOST], "paths": ["/tickets/**"], "methods": ["GET"], "sensitivity": "internal"},
            {"name": "crm", "hosts": ["crm.internal"], "paths": ["/customers/**"], "sensitivity": "restricted"}
        ],
        "intents": [
            {"name": INTENT, "operations": [{"resource": "tickets", "methods": ["GET"]}], "scopes": ["tickets:read"], "ttl_s": 300},
            {"name": "customer.lookup", "operations": [{"resource": "crm", "methods": ["GET"]}], "require_signed": true}
        ],
        "rules": [
            {"id": "agents-read-tickets", "effect": "allow", "classes": ["agent"], "intents": [INTENT]},
            {"id": "no-blocked", "effect": "deny", "principals": ["spiffe://example.org/agent/blocked/*"]}
        ]
    });
    let minter = json!({"cluster": "minter", "authority": "minter", "timeout_ms": 2000, "cache_size": credential_cache,
                        "refresh_margin_s": 10, "revocations": {"interval_ms": 1000}});
    json!({"identity": identity, "policy": policy, "minter": minter})
}

/// The minter's configuration: loopback, port 0, one worker, quiet, the same bundle.
#[allow(dead_code)] // bench-fixture only
pub fn minter_config(bundle: &Value) -> Value {
    json!({
        "listen": "127.0.0.1:0",
        "issuer": "https://minter.bench.test",
        "state_dir": "minter-state",
        "workers": 1,
        "log_level": "error",
        "identity": {"audiences": [AUD], "trust_domains": [{"name": TRUST_DOMAIN, "bundle": {"inline": bundle}}]},
        "audiences": {TRUST_DOMAIN: ["tickets"]},
        "scopes": {"tickets": ["tickets:read"]},
        "ttl": {"default_s": 300, "max_s": 300},
        "dev": true,
        "tasks": {"require_registered": false}
    })
}
