//! MCP tool- and argument-level authorization (issue 12), end to end: the official MCP Python
//! SDK's client and server, real Envoy with the mandate filter, the real minter.
//!
//! ```text
//! tests/mcp/client.py ──SVID, x-agent-intent, x-agent-task──▶ Envoy (mandate, MCP resource) ──Bearer <minted, tool claim>──▶ tests/mcp/server.py
//!   (mcp.Client, 2026-07-28 or the older handshake)               │ RFC 8693 /token (tool=…), GET /revocations
//!                                                                ▼
//!                                                             mandate-minter (in-process, dev mode, ad-hoc tasks)
//! ```
//!
//! The policy: resource `support-mcp` (`/mcp`, audience `support-mcp`, `refund` confidential,
//! `delete_customer` restricted); intent `support.read` = `get_ticket`; intent `support.work` =
//! `get_ticket`, `add_comment`, and `refund` with `/amount` ≤ 100 and `/ticket_id` equal to the
//! task. The agent works task `T-1001` (the ticket's id). The server marks `refund`'s
//! `ticket_id` and `amount` with `x-mcp-header`, so 2026-07-28 calls mirror them into
//! `Mcp-Param-ticket_id` / `Mcp-Param-amount`.
//!
//! Skipped like the other Envoy tests when Envoy, the wasm module or the `mcp` package is missing
//! (a failure with MANDATE_REQUIRE_ENVOY set).

use std::time::{Duration, Instant};

use mandate_e2e::mcp::{
    mcp_prerequisite, step_call, step_call_until_error, step_exchange, step_list_tools, step_reason, step_status,
    step_wait_for_file, ClientReport, McpClient, McpServer, Protocol,
};
use mandate_e2e::{http, prerequisites, Envoy, HttpResponse, SvidIssuer, Vars};
use mandate_minter::config::MinterConfig;
use serde_json::{json, Value};

mod orders_story;
use orders_story::{agent_svid, jwt_claims, minter_config, AGENT};

const POLL_MS: u64 = 500;
const MCP_AUDIENCE: &str = "support-mcp";
const TASK: &str = "T-1001";
const READ: &str = "support.read";
const WORK: &str = "support.work";
const MODERN: &str = "2026-07-28";
/// JSON-RPC error codes of the spec's answers.
const POLICY_REFUSAL: i64 = -32003;
const INVALID_REQUEST: i64 = -32600;
const PARSE_ERROR: i64 = -32700;
const HEADER_MISMATCH: i64 = -32020;

/// Envoy's buffer filter after mandate: it holds the request until its body is complete, so an
/// MCP call the filter refuses once it has read the body never reaches the server at all, not
/// even its headers. (Under proxy-wasm in Envoy a filter sees the body only after it lets the
/// headers go on: `Pause` in `on_http_request_headers` stops the body too.) Its limit is above
/// every `max_body_bytes` here, so the 413s are the filter's own.
const BUFFER_AFTER_MANDATE: &str = r#"- name: envoy.filters.http.buffer
  typed_config:
    "@type": type.googleapis.com/envoy.extensions.filters.http.buffer.v3.Buffer
    max_request_bytes: 16777216
"#;

fn policy(mcp: Value) -> Value {
    json!({
        "resources": [{
            "name": "support-mcp", "paths": ["/mcp"], "sensitivity": "internal", "audience": MCP_AUDIENCE,
            "mcp": mcp
        }],
        "intents": [
            {"name": READ, "operations": [{"resource": "support-mcp", "tools": ["get_ticket"]}],
             "scopes": ["tickets:read"], "ttl_s": 60},
            {"name": WORK, "operations": [
                {"resource": "support-mcp", "tools": ["get_ticket", "add_comment"]},
                {"resource": "support-mcp", "tools": ["refund"], "arguments": [
                    {"pointer": "/amount", "max": 100},
                    {"pointer": "/ticket_id", "equals_context": "task"}
                ]}
             ],
             "scopes": ["tickets:read", "tickets:comment", "refunds:small"], "ttl_s": 60}
        ],
        "rules": [{"id": "support-agents-use-the-desk", "effect": "allow", "intents": [READ, WORK], "resources": ["support-mcp"]}]
    })
}

/// The support-desk story: the minter, the SDK's server, Envoy with the MCP policy.
struct Rig {
    envoy: Envoy,
    server: McpServer,
    minter: mandate_minter::Handle,
    svid: String,
    subject: String,
    _state: tempfile::TempDir,
}

impl Rig {
    /// `mcp` is the resource's `mcp` object (`{}` for the defaults).
    fn start(mcp: Value) -> Rig {
        let t0 = Instant::now();
        let issuer = SvidIssuer::new();
        let state = tempfile::tempdir().expect("minter state dir");
        let minter = mandate_minter::spawn(
            MinterConfig::from_json(minter_config(
                &issuer,
                &state.path().join("state"),
                json!({
                    "dev": true, "require_task": true, "ttl": {"default_s": 120, "max_s": 300},
                    "audiences": {issuer.trust_domain.as_str(): [MCP_AUDIENCE]},
                    "scopes": {MCP_AUDIENCE: ["tickets:read", "tickets:comment", "refunds:small"]}
                }),
            ))
            .expect("minter config"),
        )
        .expect("minter starts");
        let server = McpServer::start().expect("MCP server starts");
        let config = json!({
            "identity": {
                "audiences": [issuer.audience],
                "trust_domains": [{"name": issuer.trust_domain, "bundle": {"inline": issuer.bundle()}}]
            },
            "policy": policy(mcp),
            "minter": {"cluster": "minter", "timeout_ms": 1000, "revocations": {"interval_ms": POLL_MS}}
        });
        let envoy = Envoy::start(
            "mandate.yaml",
            Vars::new()
                .plugin_config_json(&config)
                .upstream_port(server.port())
                .cluster("minter", minter.addr.port())
                .http_filter_after_mandate(BUFFER_AFTER_MANDATE),
        )
        .expect("envoy starts");
        eprintln!("minter + MCP server + envoy ready in {:?}", t0.elapsed());
        Rig {
            svid: agent_svid(&issuer),
            subject: format!("spiffe://{}{AGENT}", issuer.trust_domain),
            envoy,
            server,
            minter,
            _state: state,
        }
    }

    fn mcp_url(&self) -> String {
        self.envoy.url("/mcp")
    }

    /// The SDK's client through Envoy as the agent, with `intent` and task [`TASK`].
    fn client(&self, intent: &str) -> McpClient {
        McpClient::new(&self.mcp_url())
            .header("authorization", &format!("Bearer {}", self.svid))
            .header("x-agent-intent", intent)
            .header("x-agent-task", TASK)
    }

    /// A raw POST to `/mcp` as the agent (intent `intent`, task [`TASK`]) with `extra` headers.
    fn post(&self, intent: &str, extra: &[(&str, &str)], body: &[u8]) -> HttpResponse {
        let bearer = format!("Bearer {}", self.svid);
        let mut headers = vec![
            ("authorization", bearer.as_str()),
            ("x-agent-intent", intent),
            ("x-agent-task", TASK),
            ("content-type", "application/json"),
            ("accept", "application/json, text/event-stream"),
        ];
        headers.extend_from_slice(extra);
        http("POST", &self.mcp_url(), &headers, body).expect("POST /mcp through Envoy")
    }

    /// The decision records so far (from the access log), in order.
    fn records(&self) -> Vec<Value> {
        self.envoy
            .access_log()
            .iter()
            .filter_map(|e| e["mandate_decision"].as_str().and_then(|s| serde_json::from_str(s).ok()))
            .collect()
    }

    /// Waits for the decision record with `decision_id`.
    fn record(&self, decision_id: &str) -> Value {
        let t0 = Instant::now();
        loop {
            if let Some(r) = self.records().into_iter().find(|r| r["decision_id"] == decision_id) {
                return r;
            }
            assert!(t0.elapsed() < Duration::from_secs(5), "no decision record {decision_id}; records: {:?}", self.records());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The minted credential a tool ran with (the `authorization` the server received).
    fn minted_for(&self, call: &Value) -> String {
        let auth = call["headers"]["authorization"].as_str().expect("the tool received an authorization header");
        let token = auth.strip_prefix("Bearer ").expect("Bearer scheme").to_string();
        assert_ne!(token, self.svid, "the agent's SVID reached the MCP server");
        token
    }
}

fn run(client: &McpClient, script: Value) -> ClientReport {
    let report = client.run(&script).expect("the MCP client ran");
    eprintln!("client report: {report}");
    assert!(report.connected(), "the client could not connect: {report}");
    report
}

/// One session of the SDK's client: `tools/list` (step 0), then each call in turn (steps 1…).
fn session(client: &McpClient, calls: &[(&str, Value)]) -> ClientReport {
    let steps = std::iter::once(step_list_tools()).chain(calls.iter().map(|(tool, args)| step_call(tool, args.clone())));
    run(client, Value::Array(steps.collect()))
}

/// Asserts a step succeeded.
fn ok(report: &ClientReport, i: usize) -> &Value {
    let s = report.step(i);
    assert_eq!(s["ok"], true, "step {i} failed: {report}");
    if s["op"] == "call_tool" {
        assert_eq!(s["result"]["is_error"], false, "step {i}: the tool reported an error: {report}");
    }
    &s["result"]
}

/// Asserts step `i` was refused by the proxy with `status`, JSON-RPC `code` and `reason`;
/// returns the decision id from the error data.
fn refused(report: &ClientReport, i: usize, status: u64, code: i64, reason: &str) -> String {
    let s = report.step(i);
    assert_eq!(s["ok"], false, "step {i} was not refused: {report}");
    assert_eq!(step_reason(s), reason, "step {i}: {report}");
    assert_eq!(s["error"]["code"], code, "step {i}: {report}");
    assert_eq!(step_status(s), status, "step {i}: {report}");
    let id = s["error"]["data"]["decision_id"].as_str().filter(|d| !d.is_empty()).expect("decision_id in error.data");
    let last = s["http"].as_array().and_then(|h| h.last()).cloned().unwrap_or(Value::Null);
    assert_eq!(last["decision_id"], id, "x-mandate-decision-id differs from error.data.decision_id: {report}");
    id.to_string()
}

/// A JSON-RPC refusal from a raw request: status, code, reason, and the `id` kept.
fn assert_jsonrpc_refusal(resp: &HttpResponse, status: u16, code: i64, reason: &str, id: &Value) -> Value {
    let what = format!("{} {}", resp.status, resp.text());
    assert_eq!(resp.status, status, "{what}");
    assert!(resp.header("content-type").is_some_and(|c| c.starts_with("application/json")), "{:?} {what}", resp.headers);
    let body = resp.json().unwrap_or_else(|e| panic!("{e}: {what}"));
    assert_eq!(body["jsonrpc"], "2.0", "{what}");
    assert_eq!(&body["id"], id, "the JSON-RPC id: {what}");
    assert_eq!(body["error"]["code"], code, "{what}");
    assert_eq!(body["error"]["data"]["reason"], reason, "{what}");
    assert!(body["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{what}");
    let decision = resp.header("x-mandate-decision-id").expect("x-mandate-decision-id on the refusal");
    assert_eq!(body["error"]["data"]["decision_id"], decision, "{what}");
    assert!(body.get("result").is_none(), "{what}");
    body
}

/// The 2026-07-28 headers of a `tools/call` of `name` (what the SDK mirrors).
fn call_headers(name: &str) -> Vec<(&str, &str)> {
    vec![("mcp-protocol-version", MODERN), ("mcp-method", "tools/call"), ("mcp-name", name)]
}

fn tools_call(id: Value, name: &str, arguments: Value) -> Vec<u8> {
    json!({"jsonrpc": "2.0", "id": id, "method": "tools/call", "params": {"name": name, "arguments": arguments,
           "_meta": {"io.modelcontextprotocol/protocolVersion": MODERN, "io.modelcontextprotocol/clientCapabilities": {}}}})
    .to_string()
    .into_bytes()
}

/// Waits until `f` returns `Some` (every 50 ms, at most `timeout`).
fn wait_until<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let t0 = Instant::now();
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if t0.elapsed() > timeout {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The rig for `test` (see [`Rig::start`]), or `None` (skipped) when Envoy, the wasm module or
/// the `mcp` package is missing.
fn start(test: &str, mcp: Value) -> Option<Rig> {
    (prerequisites(test) && mcp_prerequisite(test)).then(|| Rig::start(mcp))
}

/// The SDK's tool calls the server saw, by tool name.
fn ran(server: &McpServer, tool: &str) -> Vec<Value> {
    server.tool_calls().into_iter().filter(|c| c["tool"] == tool).collect()
}

/// The HTTP requests that reached the server carrying a `tools/call` of `tool`.
fn reached(server: &McpServer, tool: &str) -> usize {
    server
        .http_requests()
        .iter()
        .filter(|r| r["body"]["method"] == "tools/call" && r["body"]["params"]["name"] == tool)
        .count()
}

// ---------------------------------------------------------------------------------------------

#[test]
fn allowed_tool_call_reaches_the_server_with_a_minted_tool_scoped_credential() {
    // `when_needed`: get_ticket needs no argument, so the 2026-07-28 headers decide it.
    let Some(rig) = start("allowed_tool_call_reaches_the_server_with_a_minted_tool_scoped_credential", json!({"body": "when_needed"})) else { return };
    let report = session(
        &rig.client(WORK),
        &[
            ("get_ticket", json!({"ticket_id": TASK})),
            ("refund", json!({"ticket_id": TASK, "amount": 42})),
            // Refused from the headers alone (the arguments are mirrored in Mcp-Param-*).
            ("refund", json!({"ticket_id": TASK, "amount": 500})),
            ("delete_customer", json!({"customer_id": "C-77"})),
        ],
    );
    assert_eq!(report.protocol_version(), Some(MODERN), "{report}");
    let over = refused(&report, 3, 403, POLICY_REFUSAL, "argument_not_allowed");
    let other_tool = refused(&report, 4, 403, POLICY_REFUSAL, "tool_not_allowed");
    assert_eq!(reached(&rig.server, "delete_customer"), 0);
    assert_eq!(ran(&rig.server, "refund").len(), 1, "the refund over the limit ran");
    ok(&report, 0);
    assert_eq!(ok(&report, 1)["structured"]["ticket_id"], TASK, "{report}");
    assert_eq!(ok(&report, 2)["structured"]["refunded"], 42, "{report}");
    // The SDK mirrored the call into headers (what the fast path reads).
    let call = step_exchange(report.step(2), "tools/call").expect("refund's exchange");
    assert_eq!((call["mcp_method"].as_str(), call["mcp_name"].as_str()), (Some("tools/call"), Some("refund")), "{call}");
    assert_eq!(call["mcp_params"]["mcp-param-amount"], "42", "{call}");

    // The server ran the tools with a minted credential: the tool's audience, task and name.
    let get = ran(&rig.server, "get_ticket");
    assert_eq!(get.len(), 1, "{get:?}");
    let minted = rig.minted_for(&get[0]);
    let claims = jwt_claims(&minted);
    assert_eq!(claims["aud"], MCP_AUDIENCE, "{claims}");
    assert_eq!(claims["sub"], rig.subject.as_str(), "{claims}");
    assert_eq!(claims["task"], TASK, "{claims}");
    assert_eq!(claims["intent"], WORK, "{claims}");
    assert_eq!(claims["tool"], "get_ticket", "the credential is not scoped to the tool: {claims}");
    let refund = ran(&rig.server, "refund");
    assert_eq!(refund.len(), 1, "{refund:?}");
    assert_eq!(refund[0]["arguments"], json!({"ticket_id": TASK, "amount": 42}));
    let refund_claims = jwt_claims(&rig.minted_for(&refund[0]));
    assert_eq!(refund_claims["tool"], "refund", "{refund_claims}");
    assert_ne!(refund_claims["jti"], claims["jti"], "one credential served two tools");
    // The SVID reached the server nowhere (no header of any request).
    for r in rig.server.records() {
        assert!(!r.to_string().contains(&rig.svid), "the SVID reached the MCP server: {r}");
    }

    // Decision records: the MCP call, the path that decided, the arguments checked.
    let decision = get[0]["headers"]["x-mandate-decision-id"].as_str().expect("decision id upstream");
    let rec = rig.record(decision);
    assert_eq!(rec["effect"], "allow", "{rec}");
    assert_eq!(rec["mcp"]["method"], "tools/call", "{rec}");
    assert_eq!(rec["mcp"]["tool"], "get_ticket", "{rec}");
    assert_eq!(rec["mcp"]["path"], "header", "get_ticket needs no argument: the headers decide: {rec}");
    let decision = refund[0]["headers"]["x-mandate-decision-id"].as_str().expect("decision id upstream");
    let rec = rig.record(decision);
    assert_eq!(rec["mcp"]["tool"], "refund", "{rec}");
    let checked = rec["mcp"]["checked"].as_array().cloned().unwrap_or_default();
    let amount = checked.iter().find(|c| c["pointer"] == "/amount").unwrap_or_else(|| panic!("/amount not recorded: {rec}"));
    assert_eq!((amount["ok"].as_bool(), amount["value"].as_f64()), (Some(true), Some(42.0)), "{rec}");
    assert!(checked.iter().any(|c| c["pointer"] == "/ticket_id" && c["ok"] == true), "{rec}");
    assert!(!rec.to_string().contains(&minted), "a credential in the record");
    let rec = rig.record(&over);
    assert_eq!((rec["reason"].as_str(), rec["mcp"]["path"].as_str()), (Some("argument_not_allowed"), Some("header")), "{rec}");
    let rec = rig.record(&other_tool);
    assert_eq!((rec["mcp"]["tool"].as_str(), rec["mcp"]["path"].as_str()), (Some("delete_customer"), Some("header")), "{rec}");

    // Metrics per MCP method and decision.
    let allowed = wait_until(Duration::from_secs(5), || {
        let n = rig.envoy.stat("wasmcustom.mandate.mcp.tools_call.allow").ok().flatten().unwrap_or(0);
        (n >= 2).then_some(n)
    });
    assert!(allowed.is_some(), "mandate.mcp.tools_call.allow not counted; stats: {:?}", rig.envoy.stats().map(|s| s.into_iter().filter(|(k, _)| k.contains("mcp")).collect::<Vec<_>>()));
}

#[test]
fn the_sdks_default_client_stays_on_the_current_protocol_through_the_filter() {
    // The SDK's default client (`mode="auto"`) probes `server/discover` first and silently falls
    // back to the old handshake (no MCP headers, so no fast path and no header/body check) on
    // any refusal of the probe: the filter must let a verified caller discover.
    let Some(rig) = start("the_sdks_default_client_stays_on_the_current_protocol_through_the_filter", json!({"body": "when_needed"})) else { return };
    let auto = run(&rig.client(WORK).protocol(Protocol::Auto), json!([step_call("get_ticket", json!({"ticket_id": TASK}))]));
    let probe = auto.raw["connect"]["http"].as_array().and_then(|h| h.first()).cloned().unwrap_or_default();
    assert_eq!((probe["rpc"].as_str(), probe["status"].as_u64()), (Some("server/discover"), Some(200)), "{auto}");
    assert_eq!(auto.protocol_version(), Some(MODERN), "server/discover was refused: the SDK fell back to the old protocol: {auto}");
    ok(&auto, 0);
}

#[test]
fn tool_outside_the_intent_is_refused_and_never_reaches_the_server() {
    let Some(rig) = start("tool_outside_the_intent_is_refused_and_never_reaches_the_server", json!({})) else { return };
    // support.read names get_ticket only.
    let report = session(
        &rig.client(READ),
        &[
            ("add_comment", json!({"ticket_id": TASK, "text": "refund on its way"})),
            ("delete_customer", json!({"customer_id": "C-77"})),
            ("get_ticket", json!({"ticket_id": TASK})),
        ],
    );
    ok(&report, 0);
    let decision = refused(&report, 1, 403, POLICY_REFUSAL, "tool_not_allowed");
    refused(&report, 2, 403, POLICY_REFUSAL, "tool_not_allowed");
    ok(&report, 3);
    // insufficient_scope names the scopes of the intents that would allow the tool.
    let www = step_exchange(report.step(1), "tools/call").map(|e| e["www_authenticate"].clone()).unwrap_or_default();
    let www = www.as_str().unwrap_or_default().to_string();
    assert!(www.starts_with("Bearer") && www.contains("error=\"insufficient_scope\"") && www.contains("tickets:comment"), "WWW-Authenticate: {www:?}");
    let rec = rig.record(&decision);
    assert_eq!((rec["effect"].as_str(), rec["reason"].as_str()), (Some("deny"), Some("tool_not_allowed")), "{rec}");
    assert_eq!(rec["mcp"]["tool"], "add_comment", "{rec}");
    assert!(rec["credential"].is_null(), "a credential was minted for a refused call: {rec}");
    assert_eq!(reached(&rig.server, "add_comment"), 0, "a refused call reached the server");
    assert_eq!(reached(&rig.server, "delete_customer"), 0, "a refused call reached the server");
    assert!(ran(&rig.server, "add_comment").is_empty() && ran(&rig.server, "delete_customer").is_empty());
    assert_eq!(ran(&rig.server, "get_ticket").len(), 1);

    // A call refused from its 2026-07-28 headers is answered before its body is read (Envoy
    // hands a filter the body only once the headers go on, and a refused call's headers never
    // do): its JSON-RPC id is unknown, so the error carries `id: null` (the SDK rewrites ids,
    // so ask directly).
    let before = rig.server.http_requests().len();
    let resp = rig.post(
        READ,
        &call_headers("delete_customer"),
        &tools_call(json!(77), "delete_customer", json!({"customer_id": "C-77"})),
    );
    assert_jsonrpc_refusal(&resp, 403, POLICY_REFUSAL, "tool_not_allowed", &Value::Null);
    // Refused after its body was read (no MCP headers): the answer keeps the request's id.
    let resp = rig.post(READ, &[], &tools_call(json!("req-7"), "add_comment", json!({"ticket_id": TASK, "text": "x"})));
    assert_jsonrpc_refusal(&resp, 403, POLICY_REFUSAL, "tool_not_allowed", &json!("req-7"));
    assert_eq!(rig.server.http_requests().len(), before, "a refused call reached the server");
}

#[test]
fn argument_outside_its_constraint_is_refused() {
    let Some(rig) = start("argument_outside_its_constraint_is_refused", json!({})) else { return };
    let report = session(
        &rig.client(WORK),
        &[
            ("refund", json!({"ticket_id": TASK, "amount": 500})),
            ("refund", json!({"ticket_id": "T-1002", "amount": 10})),
            ("refund", json!({"ticket_id": TASK, "amount": 100})),
        ],
    );
    let over = refused(&report, 1, 403, POLICY_REFUSAL, "argument_not_allowed");
    let other_ticket = refused(&report, 2, 403, POLICY_REFUSAL, "argument_not_allowed");
    assert_eq!(ok(&report, 3)["structured"]["refunded"], 100, "the limit itself is allowed: {report}");
    let refunds = ran(&rig.server, "refund");
    assert_eq!(refunds.len(), 1, "{refunds:?}");
    assert_eq!(refunds[0]["arguments"]["amount"], 100);
    assert_eq!(reached(&rig.server, "refund"), 1, "a refused refund reached the server");

    let rec = rig.record(&over);
    assert_eq!((rec["reason"].as_str(), rec["mcp"]["tool"].as_str()), (Some("argument_not_allowed"), Some("refund")), "{rec}");
    let checked = rec["mcp"]["checked"].as_array().cloned().unwrap_or_default();
    assert!(
        checked.iter().any(|c| c["pointer"] == "/amount" && c["ok"] == false && c["value"].as_f64() == Some(500.0)),
        "the failed /amount check is recorded: {rec}"
    );
    let rec = rig.record(&other_ticket);
    let checked = rec["mcp"]["checked"].as_array().cloned().unwrap_or_default();
    assert!(checked.iter().any(|c| c["pointer"] == "/ticket_id" && c["ok"] == false), "the failed /ticket_id check is recorded: {rec}");

    // A number where the constraint needs one, not a string that looks like one.
    let resp = rig.post(WORK, &[], &tools_call(json!(31), "refund", json!({"ticket_id": TASK, "amount": "50"})));
    assert_jsonrpc_refusal(&resp, 403, POLICY_REFUSAL, "argument_not_allowed", &json!(31));
    // A missing argument fails its constraint (required by default).
    let resp = rig.post(WORK, &[], &tools_call(json!(32), "refund", json!({"ticket_id": TASK})));
    assert_jsonrpc_refusal(&resp, 403, POLICY_REFUSAL, "argument_not_allowed", &json!(32));
    assert_eq!(reached(&rig.server, "refund"), 1, "a refused refund reached the server");
}

#[test]
fn header_body_mismatch_is_refused() {
    let Some(rig) = start("header_body_mismatch_is_refused", json!({})) else { return };
    // The headers name a harmless tool, the body deletes a customer.
    let resp = rig.post(
        WORK,
        &call_headers("get_ticket"),
        &tools_call(json!(9), "delete_customer", json!({"customer_id": "C-77"})),
    );
    let body = assert_jsonrpc_refusal(&resp, 400, HEADER_MISMATCH, "mcp_header_mismatch", &json!(9));
    let rec = rig.record(body["error"]["data"]["decision_id"].as_str().unwrap_or_default());
    assert_eq!((rec["effect"].as_str(), rec["reason"].as_str()), (Some("deny"), Some("mcp_header_mismatch")), "{rec}");
    // A mirrored argument that says 5 while the body refunds 500.
    let resp = rig.post(
        WORK,
        &[call_headers("refund"), vec![("mcp-param-amount", "5")]].concat(),
        &tools_call(json!(10), "refund", json!({"ticket_id": TASK, "amount": 500})),
    );
    assert_jsonrpc_refusal(&resp, 400, HEADER_MISMATCH, "mcp_header_mismatch", &json!(10));
    // The method header says tools/list, the body calls a tool.
    let resp = rig.post(
        WORK,
        &[("mcp-protocol-version", MODERN), ("mcp-method", "tools/list")],
        &tools_call(json!(11), "get_ticket", json!({"ticket_id": TASK})),
    );
    assert_jsonrpc_refusal(&resp, 400, HEADER_MISMATCH, "mcp_header_mismatch", &json!(11));
    // A base64-encoded name that decodes to another tool.
    let resp = rig.post(
        WORK,
        &call_headers("=?base64?Z2V0X3RpY2tldA==?="),
        &tools_call(json!(12), "delete_customer", json!({"customer_id": "C-77"})),
    );
    assert_jsonrpc_refusal(&resp, 400, HEADER_MISMATCH, "mcp_header_mismatch", &json!(12));
    assert!(rig.server.http_requests().is_empty(), "a mismatched call reached the server: {:?}", rig.server.http_requests());
    // Headers and body agreeing (the base64 form included) pass.
    let resp = rig.post(
        WORK,
        &call_headers("=?base64?Z2V0X3RpY2tldA==?="),
        &tools_call(json!(13), "get_ticket", json!({"ticket_id": TASK})),
    );
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.json().expect("JSON answer")["id"], 13, "{}", resp.text());
    assert_eq!(ran(&rig.server, "get_ticket").len(), 1);
}

#[test]
fn an_older_protocol_takes_the_body_path_and_is_judged_the_same() {
    // `when_needed` would decide from headers if there were any: the old handshake sends none.
    let Some(rig) = start("an_older_protocol_takes_the_body_path_and_is_judged_the_same", json!({"body": "when_needed", "filter_tools_list": true})) else { return };
    let report = session(
        &rig.client(WORK).protocol(Protocol::Legacy),
        &[
            ("get_ticket", json!({"ticket_id": TASK})),
            ("refund", json!({"ticket_id": TASK, "amount": 42})),
            ("refund", json!({"ticket_id": TASK, "amount": 500})),
            ("delete_customer", json!({"customer_id": "C-77"})),
        ],
    );
    let version = report.protocol_version().unwrap_or_default().to_string();
    assert!(!version.is_empty() && version.as_str() < MODERN, "the client did not fall back to an older revision: {report}");
    for step in report.steps() {
        for e in step["http"].as_array().into_iter().flatten() {
            assert!(e.get("mcp_method").is_none(), "the old protocol sent Mcp-Method: {report}");
        }
    }
    // tools/list read from the body and filtered to the intent's tools.
    let mut listed: Vec<String> =
        ok(&report, 0)["tools"].as_array().into_iter().flatten().filter_map(|t| t.as_str().map(String::from)).collect();
    listed.sort();
    assert_eq!(listed, ["add_comment", "get_ticket", "refund"], "{report}");
    ok(&report, 1);
    ok(&report, 2);
    let denied = refused(&report, 3, 403, POLICY_REFUSAL, "argument_not_allowed");
    refused(&report, 4, 403, POLICY_REFUSAL, "tool_not_allowed");
    assert_eq!(ran(&rig.server, "refund").len(), 1);
    assert_eq!(reached(&rig.server, "delete_customer"), 0);

    let get = ran(&rig.server, "get_ticket");
    assert_eq!(get.len(), 1, "{get:?}");
    // No MCP headers: the tool is known only from the body, which the filter sees after the
    // headers (and the credential) went on, so the credential is scoped to the intent on this
    // server, not to a tool; the record says so.
    let claims = jwt_claims(&rig.minted_for(&get[0]));
    assert!(claims.get("tool").is_none(), "{claims}");
    assert_eq!(claims["intent"], WORK, "{claims}");
    let rec = rig.record(get[0]["headers"]["x-mandate-decision-id"].as_str().expect("decision id upstream"));
    assert_eq!((rec["mcp"]["tool"].as_str(), rec["mcp"]["path"].as_str()), (Some("get_ticket"), Some("body")), "{rec}");
    assert_eq!(rec["mcp"]["credential_scope"], "intent", "{rec}");
    let rec = rig.record(&denied);
    assert_eq!(rec["mcp"]["path"], "body", "{rec}");
}

#[test]
fn tools_list_is_filtered_per_caller() {
    // `when_needed`: tools/list is decided from the headers; the answer is what gets rewritten.
    let Some(rig) = start("tools_list_is_filtered_per_caller", json!({"filter_tools_list": true, "body": "when_needed"})) else { return };
    // Straight to the server: all four tools.
    let direct = McpClient::new(&format!("http://127.0.0.1:{}/mcp", rig.server.port())).run(&json!([step_list_tools()])).expect("direct client");
    let all = &direct.step(0)["result"]["tools"];
    assert_eq!(all.as_array().map(Vec::len), Some(4), "{direct}");

    let names = |report: &ClientReport| -> Vec<String> {
        let mut v: Vec<String> = report.step(0)["result"]["tools"]
            .as_array()
            .unwrap_or_else(|| panic!("no tools/list result: {report}"))
            .iter()
            .filter_map(|t| t.as_str().map(String::from))
            .collect();
        v.sort();
        v
    };
    let read = run(&rig.client(READ), json!([step_list_tools()]));
    assert_eq!(names(&read), ["get_ticket"], "{read}");
    let work = run(&rig.client(WORK), json!([step_list_tools()]));
    assert_eq!(names(&work), ["add_comment", "get_ticket", "refund"], "{work}");
    // (The older protocol's tools/list, read from the body: an_older_protocol_takes_the_body_path...)
}

#[test]
fn a_body_over_the_limit_is_refused_with_413() {
    let Some(rig) = start("a_body_over_the_limit_is_refused_with_413", json!({"max_body_bytes": 4096})) else { return };
    let report = session(
        &rig.client(WORK),
        &[
            ("add_comment", json!({"ticket_id": TASK, "text": "x".repeat(10_000)})),
            ("add_comment", json!({"ticket_id": TASK, "text": "y".repeat(2_000)})),
        ],
    );
    let decision = refused(&report, 1, 413, INVALID_REQUEST, "mcp_body_too_large");
    let comments = ran(&rig.server, "add_comment");
    assert_eq!(comments.len(), 1, "{comments:?}");
    assert_eq!(comments[0]["arguments"]["text"].as_str().map(str::len), Some(2_000), "the call under the limit passes");
    let rec = rig.record(&decision);
    assert_eq!((rec["effect"].as_str(), rec["reason"].as_str()), (Some("deny"), Some("mcp_body_too_large")), "{rec}");

    // Raw: far over the limit, the id is unknown (the body was never parsed).
    let before = rig.server.http_requests().len();
    let big = tools_call(json!(5), "add_comment", json!({"ticket_id": TASK, "text": "z".repeat(20_000)}));
    let resp = rig.post(WORK, &[], &big);
    assert_eq!(resp.status, 413, "{}", resp.text());
    let body = resp.json().expect("a JSON-RPC body");
    assert_eq!((body["error"]["code"].as_i64(), body["error"]["data"]["reason"].as_str()), (Some(INVALID_REQUEST), Some("mcp_body_too_large")), "{body}");
    assert!(body["id"].is_null() || body["id"] == 5, "{body}");
    assert_eq!(rig.server.http_requests().len(), before, "an oversized body reached the server");
}

#[test]
fn malformed_json_rpc_is_refused_with_400_keeping_the_id() {
    let Some(rig) = start("malformed_json_rpc_is_refused_with_400_keeping_the_id", json!({})) else { return };
    let post = |body: &str| rig.post(WORK, &[], body.as_bytes());
    let deep = format!("{}1{}", "[".repeat(40), "]".repeat(40));

    assert_jsonrpc_refusal(&post("{\"jsonrpc\": \"2.0\", \"id\": 1, "), 400, PARSE_ERROR, "mcp_malformed", &Value::Null);
    assert_jsonrpc_refusal(&post("not json at all"), 400, PARSE_ERROR, "mcp_malformed", &Value::Null);
    // Valid JSON, not valid JSON-RPC: the id is kept.
    let cases: Vec<(Value, String)> = vec![
        (json!(5), r#"{"jsonrpc":"1.0","id":5,"method":"tools/call","params":{"name":"get_ticket","arguments":{}}}"#.into()),
        (json!(6), r#"{"jsonrpc":"2.0","id":6,"params":{"name":"get_ticket","arguments":{}}}"#.into()),
        (json!(7), r#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":[1,2]}"#.into()),
        (json!(8), r#"{"jsonrpc":"2.0","id":8,"method":"tools/call","params":{"name":"get_ticket","arguments":"T-1001"}}"#.into()),
        (json!("eleven"), r#"{"jsonrpc":"2.0","id":"eleven","method":"tools/call","params":{"name":42,"arguments":{}}}"#.into()),
        (json!(12), r#"{"id":12,"method":"tools/call","params":{"name":"get_ticket","arguments":{}}}"#.into()),
    ];
    for (id, body) in &cases {
        let resp = post(body);
        assert_jsonrpc_refusal(&resp, 400, INVALID_REQUEST, "mcp_malformed", id);
    }
    // Duplicate keys and deep nesting: refused; the id is kept when the parser got that far.
    let tricky = [
        (json!(9), r#"{"jsonrpc":"2.0","id":9,"method":"tools/call","params":{"name":"get_ticket","name":"delete_customer","arguments":{}}}"#.to_string()),
        (json!(10), format!(r#"{{"jsonrpc":"2.0","id":10,"method":"tools/call","params":{{"name":"get_ticket","arguments":{{"ticket_id":"T-1001","x":{deep}}}}}}}"#)),
    ];
    for (id, body) in &tricky {
        let resp = post(body);
        let what = format!("{} {}", resp.status, resp.text());
        assert_eq!(resp.status, 400, "{what}");
        let v = resp.json().unwrap_or_else(|e| panic!("{e}: {what}"));
        assert_eq!(v["error"]["data"]["reason"], "mcp_malformed", "{what}");
        assert!(v["error"]["code"] == INVALID_REQUEST || v["error"]["code"] == PARSE_ERROR, "{what}");
        assert!(v["id"] == *id || v["id"].is_null(), "{what}");
    }
    // A batch is refused as a whole (documented: batches are not judged element by element).
    let resp = post(
        r#"[{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"get_ticket","arguments":{"ticket_id":"T-1001"}}},
            {"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"delete_customer","arguments":{"customer_id":"C-77"}}}]"#,
    );
    let what = format!("{} {}", resp.status, resp.text());
    assert_eq!(resp.status, 400, "{what}");
    assert_eq!(resp.json().map(|v| v["error"]["data"]["reason"].clone()).ok(), Some(json!("mcp_batch_refused")), "{what}");
    // An empty body is not a call either.
    let resp = post("");
    assert_eq!((resp.status, resp.json().ok().map(|v| v["error"]["data"]["reason"].clone())), (400, Some(json!("mcp_malformed"))), "{}", resp.text());

    assert!(rig.server.http_requests().is_empty(), "a malformed request reached the server: {:?}", rig.server.http_requests());
    // Envoy and the filter are still fine: a good call passes.
    let resp = post(std::str::from_utf8(&tools_call(json!(99), "get_ticket", json!({"ticket_id": TASK}))).unwrap_or_default());
    assert_eq!(resp.status, 200, "{}", resp.text());
    let refusals = wait_until(Duration::from_secs(5), || {
        let n = rig.records().iter().filter(|r| r["reason"] == "mcp_malformed" || r["reason"] == "mcp_batch_refused").count();
        (n >= 12).then_some(n)
    });
    assert!(refusals.is_some(), "one decision record per malformed request: {:?}", rig.records());
}

#[test]
fn the_task_ended_mid_session_refuses_the_next_call() {
    let Some(rig) = start("the_task_ended_mid_session_refuses_the_next_call", json!({})) else { return };
    let dir = tempfile::tempdir().expect("temp dir");
    let go = dir.path().join("task-ended");
    // One client session: a call, then (once the test has ended the task) the same call again
    // every 100 ms until it is refused.
    let client = rig
        .client(WORK)
        .spawn(&json!([
            step_list_tools(),
            step_call("get_ticket", json!({"ticket_id": TASK})),
            step_wait_for_file(&go, 30.0),
            step_call_until_error("get_ticket", json!({"ticket_id": TASK}), 5.0)
        ]))
        .expect("client starts");
    let first = wait_until(Duration::from_secs(30), || ran(&rig.server, "get_ticket").first().cloned())
        .expect("the first call reached the server");
    let jti = jwt_claims(&rig.minted_for(&first))["jti"].as_str().unwrap_or_default().to_string();

    // The orchestrator ends ad-hoc task T-1001 for this agent at the minter.
    let ended = http(
        "POST",
        &format!("{}/revoke", rig.minter.base_url()),
        &[("content-type", "application/json")],
        json!({"task": TASK, "subject": rig.subject}).to_string().as_bytes(),
    )
    .expect("end the task");
    assert_eq!(ended.status, 200, "{}", ended.text());
    assert!(ended.json().ok().is_some_and(|v| v["jtis"].as_array().is_some_and(|j| j.iter().any(|x| x == jti.as_str()))), "{}", ended.text());
    let t_end = Instant::now();
    std::fs::write(&go, b"ended").expect("signal the client");

    let report = client.finish(Duration::from_secs(60)).expect("the client finished");
    eprintln!("client report: {report}; refused {:?} after the task ended", t_end.elapsed());
    assert!(report.connected(), "{report}");
    ok(&report, 1);
    let decision = refused(&report, 3, 403, POLICY_REFUSAL, "task_revoked");
    let attempts = report.step(3)["attempts"].as_u64().unwrap_or(0);
    assert!(attempts >= 1, "{report}");
    // Only the calls before the feed arrived ran (each with the credential minted before).
    let calls = ran(&rig.server, "get_ticket");
    assert_eq!(calls.len() as u64, attempts, "calls after the task ended: {calls:?}");
    assert!(attempts <= 40, "the refusal took {attempts} calls (~100 ms apart); the feed polls every {POLL_MS} ms");
    let rec = rig.record(&decision);
    assert_eq!((rec["reason"].as_str(), rec["task"].as_str()), (Some("task_revoked"), Some(TASK)), "{rec}");
}

#[test]
fn identity_failures_answer_401_pointing_at_the_protected_resource_metadata() {
    let metadata = json!({
        "resource": "https://mcp.acme.internal/mcp",
        "authorization_servers": ["https://auth.acme.internal"],
        "scopes_supported": ["tickets:read"]
    });
    let Some(rig) = start("identity_failures_answer_401_pointing_at_the_protected_resource_metadata", json!({"metadata": metadata})) else {
        return;
    };
    // The SDK's client without an SVID: refused before anything is read.
    let report = McpClient::new(&rig.mcp_url())
        .header("x-agent-intent", WORK)
        .run(&json!([step_call("get_ticket", json!({"ticket_id": TASK}))]))
        .expect("the MCP client ran");
    eprintln!("client report: {report}");
    let step = report.step(0);
    assert_eq!((step["ok"].as_bool(), step_status(step)), (Some(false), 401), "{report}");
    assert_eq!(step["error"]["code"], -32001, "{report}");
    assert_eq!(step_reason(step), "token_missing", "{report}");
    let www = step_exchange(step, "tools/call").and_then(|e| e["www_authenticate"].as_str()).unwrap_or_default().to_string();
    // RFC 9728 §3.1: the metadata URL derives from the configured resource identifier, never
    // from the Host header the caller chose.
    assert_eq!(
        www,
        "Bearer resource_metadata=\"https://mcp.acme.internal/.well-known/oauth-protected-resource/mcp\"",
        "{report}"
    );
    // The metadata itself, without a token.
    let meta = mandate_e2e::http_get(&rig.envoy.url("/.well-known/oauth-protected-resource/mcp"), &[]).expect("metadata");
    assert_eq!(meta.status, 200, "{}", meta.text());
    assert!(meta.header("cache-control").is_some_and(|c| c.contains("max-age=300")), "{:?}", meta.headers);
    let v = meta.json().expect("JSON metadata");
    assert_eq!(v["resource"], "https://mcp.acme.internal/mcp", "{v}");
    assert_eq!(v["authorization_servers"], json!(["https://auth.acme.internal"]), "{v}");
    assert_eq!(v["scopes_supported"], json!(["tickets:read"]), "{v}");
    assert_eq!(v["bearer_methods_supported"], json!(["header"]), "{v}");
    assert!(rig.server.http_requests().is_empty(), "{:?}", rig.server.http_requests());
}
