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

/// (k): the two agents a two-hop delegation chain hands the bench principal's task to
/// (bench principal → DELEGATE_B → DELEGATE_D; D makes the calls).
#[allow(dead_code)]
pub const DELEGATE_B: &str = "spiffe://example.org/agent/bench-b";
#[allow(dead_code)]
pub const DELEGATE_D: &str = "spiffe://example.org/agent/bench-d";

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
#[allow(dead_code)] // bench-fixture and soak-fixture
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

/// The MCP configurations (i) and (j): a `tools/call` to an MCP server behind the same filter.
#[allow(dead_code)] // bench-fixture only
pub const MCP_HOST: &str = "mcp.internal";
#[allow(dead_code)]
pub const MCP_PATH: &str = "/mcp";
#[allow(dead_code)]
pub const MCP_INTENT: &str = "ticket.triage";
#[allow(dead_code)]
pub const MCP_TOOL: &str = "get_ticket";
/// (q): the same POST to a plain (non-MCP) resource: what the warm path costs for (i)'s request.
#[allow(dead_code)]
pub const POST_HOST: &str = "post.internal";
/// Size of the JSON-RPC body both MCP configurations send.
#[allow(dead_code)]
pub const MCP_BODY_BYTES: usize = 1024;

/// The `tools/call` both MCP configurations send: a JSON-RPC body of exactly `MCP_BODY_BYTES`
/// (`arguments.ticket` is the task, `arguments.note` pads it), and the 2026-07-28 headers that
/// mirror it (`Mcp-Param-Ticket` carries the one argument the policy checks).
#[allow(dead_code)]
pub fn mcp_request() -> (String, Vec<(&'static str, String)>) {
    let body = |pad: usize| {
        json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
               "params": {"name": MCP_TOOL, "arguments": {"ticket": TASK, "note": "x".repeat(pad)}}})
        .to_string()
    };
    let empty = body(0).len();
    let text = body(MCP_BODY_BYTES.saturating_sub(empty));
    let headers = vec![
        ("content-type", "application/json".to_string()),
        ("accept", "application/json, text/event-stream".to_string()),
        ("mcp-protocol-version", "2026-07-28".to_string()),
        ("mcp-method", "tools/call".to_string()),
        ("mcp-name", MCP_TOOL.to_string()),
        ("mcp-param-ticket", TASK.to_string()),
    ];
    (text, headers)
}

/// `plugin_config` plus an MCP server: `body` is `"when_needed"` (configuration (i): the
/// 2026-07-28 headers carry the tool and the checked argument, so no body is read) or `"always"`
/// (configuration (j): the 1 KB body is buffered, parsed and checked against the headers).
#[allow(dead_code)]
pub fn plugin_config_mcp(bundle: &Value, max_lifetime_s: u64, credential_cache: usize, body: &str) -> Value {
    let mut cfg = plugin_config(bundle, max_lifetime_s, credential_cache);
    let policy = &mut cfg["policy"];
    if let Some(r) = policy["resources"].as_array_mut() {
        r.push(json!({"name": "tickets-mcp", "hosts": [MCP_HOST], "paths": [MCP_PATH], "methods": ["POST"],
                      "sensitivity": "internal", "audience": "tickets",
                      "mcp": {"body": body, "tools": {"refund": {"sensitivity": "confidential"}}}}));
        // (q): (i)'s request to a plain resource, decided like (e).
        r.push(json!({"name": "tickets-post", "hosts": [POST_HOST], "paths": [MCP_PATH], "methods": ["POST"],
                      "sensitivity": "internal", "audience": "tickets"}));
    }
    if let Some(i) = policy["intents"].as_array_mut() {
        i.push(json!({"name": MCP_INTENT, "operations": [
            {"resource": "tickets-mcp", "tools": [MCP_TOOL, "search_*"],
             "arguments": [{"pointer": "/ticket", "equals_context": "task"}]},
            {"resource": "tickets-post", "methods": ["POST"]}
        ], "scopes": ["tickets:read"], "ttl_s": 300}));
    }
    if let Some(r) = policy["rules"].as_array_mut() {
        r.push(json!({"id": "agents-triage-over-mcp", "effect": "allow", "classes": ["agent"], "intents": [MCP_INTENT]}));
    }
    cfg
}
