//! The MCP request path through the engine: header fast path, body path, answers, credentials.

use crate::config;
use crate::decision::Effect;
use crate::engine::*;
use crate::headers::Headers;
use crate::mint::{self, MintError};
use crate::reason::Reason;
use crate::testkit::{spiffe_bundle, svid_claims, TestKey};
use serde_json::{json, Value};

const NOW: u64 = 1_795_564_800 + 10 * 3600;
const AUD: &str = "spiffe://example.org/gw";
const SUB: &str = "spiffe://example.org/agent/a1";
const HOST: &str = "mcp.acme.internal";

fn policy(body: &str) -> Value {
    json!({
        "classes": [{"name": "agent", "principals": ["spiffe://example.org/agent/*"], "intent_required": true}],
        "resources": [
            {"name": "support-mcp", "hosts": [HOST], "paths": ["/mcp"], "sensitivity": "internal", "audience": "support-mcp",
             "mcp": {"body": body, "max_body_bytes": 2048, "tools": {"delete_customer": {"sensitivity": "restricted"}},
                     "metadata": {"resource": "https://mcp.acme.internal/mcp", "authorization_servers": ["https://auth.acme.internal"],
                                  "scopes_supported": ["tickets:read"]}}},
            {"name": "tickets", "hosts": ["tickets.internal"], "paths": ["/tickets/**"]}
        ],
        "intents": [
            {"name": "support.read", "operations": [{"resource": "support-mcp", "tools": ["get_ticket"]}], "scopes": ["tickets:read"]},
            {"name": "support.refund", "operations": [{"resource": "support-mcp", "tools": ["refund"], "arguments": [
                {"pointer": "/amount", "max": 100}, {"pointer": "/ticket_id", "equals_context": "task"}]}], "scopes": ["refunds:write"]},
            {"name": "support.admin", "operations": [{"resource": "support-mcp", "tools": ["delete_customer"]}], "scopes": ["crm:admin"]},
            {"name": "ticket.read", "operations": [{"resource": "tickets", "methods": ["GET"]}]}
        ],
        "rules": [{"id": "agents", "effect": "allow", "classes": ["agent"]}]
    })
}

fn engine(key: &TestKey, body: &str, minter: bool) -> Engine {
    let identity = json!({"audiences": [AUD], "trust_domains": [{"name": "example.org", "bundle": {"inline": spiffe_bundle(&[key], None)}}]});
    let mut cfg = json!({"identity": identity, "policy": policy(body)});
    if minter {
        cfg["minter"] = json!({"cluster": "minter", "timeout_ms": 300});
    }
    Engine::new(config::parse(cfg.to_string().as_bytes()).unwrap(), 7, None).unwrap()
}

fn bearer(key: &TestKey) -> String {
    format!("Bearer {}", key.sign(&svid_claims(SUB, AUD, NOW, NOW + 300)))
}

/// A `POST /mcp` with these extra headers.
fn post(auth: &str, extra: &[(&str, &str)]) -> Headers {
    let mut v: Vec<(String, String)> = vec![(":method".into(), "POST".into()), (":authority".into(), HOST.into()), (":path".into(), "/mcp".into())];
    if !auth.is_empty() {
        v.push(("authorization".into(), auth.into()));
    }
    v.extend(extra.iter().map(|(k, val)| (k.to_string(), val.to_string())));
    Headers::new(v)
}

fn mirrored<'a>(tool: &'a str, params: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    let mut v = vec![("mcp-protocol-version", "2026-07-28"), ("mcp-method", "tools/call"), ("mcp-name", tool)];
    v.extend_from_slice(params);
    v
}

fn call_body(id: Value, tool: &str, args: Value) -> Vec<u8> {
    json!({"jsonrpc": "2.0", "id": id, "method": "tools/call", "params": {"name": tool, "arguments": args}}).to_string().into_bytes()
}

fn run(e: &mut Engine, h: &Headers) -> Outcome {
    e.on_request(&Request { headers: h, now: NOW })
}

fn body_plan(out: Outcome) -> (Box<BodyPlan>, Decision) {
    match out.verdict {
        Verdict::NeedBody(p) => (p, out.decision),
        other => panic!("expected a body request, got {other:?} / {:?}", out.decision.reason()),
    }
}

fn reply(v: Verdict) -> crate::decision::LocalReply {
    match v {
        Verdict::Reply(r) => r,
        other => panic!("expected a reply, got {other:?}"),
    }
}

fn jsonrpc(r: &crate::decision::LocalReply) -> Value {
    serde_json::from_str(&r.body).unwrap()
}

fn header<'a>(r: &'a crate::decision::LocalReply, name: &str) -> Option<&'a str> {
    r.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

#[test]
fn mirrored_headers_decide_without_the_body() {
    let k = TestKey::es256("k");
    let mut e = engine(&k, "when_needed", false);
    let h = post(&bearer(&k), &[&[("x-agent-intent", "support.read")][..], &mirrored("get_ticket", &[])].concat());
    let out = run(&mut e, &h);
    assert!(matches!(out.verdict, Verdict::Forward(_)), "{:?}", out.decision.reason());
    let m = out.decision.mcp.as_deref().unwrap();
    assert_eq!((m.method.as_deref(), m.tool.as_deref(), m.path), (Some("tools/call"), Some("get_ticket"), Some("header")));
    // Served from the cache the second time, and the cache keys on the MCP headers.
    assert!(run(&mut e, &h).decision.decision_cache_hit);
    let other = post(&bearer(&k), &[&[("x-agent-intent", "support.read")][..], &mirrored("delete_customer", &[])].concat());
    let out = run(&mut e, &other);
    assert!(!out.decision.decision_cache_hit, "a cached get_ticket never covers delete_customer");
    assert_eq!(out.decision.reason(), Reason::ToolNotAllowed);
}

#[test]
fn always_mode_reads_the_body_and_refuses_a_header_body_mismatch() {
    let k = TestKey::es256("k");
    let mut e = engine(&k, "always", false);
    let h = post(&bearer(&k), &[&[("x-agent-intent", "support.read")][..], &mirrored("get_ticket", &[])].concat());
    let (p, mut d) = body_plan(run(&mut e, &h));
    // The headers name a harmless tool; the body calls another.
    let v = e.on_request_body(&p, &call_body(json!(9), "delete_customer", json!({"customer_id": "C-1"})), NOW, &mut d);
    let r = reply(v);
    assert_eq!((r.status, d.reason()), (400, Reason::McpHeaderMismatch));
    let body = jsonrpc(&r);
    assert_eq!((body["id"].clone(), body["error"]["code"].clone()), (json!(9), json!(-32020)));
    assert_eq!(body["error"]["data"]["decision_id"], json!(d.id));
    // The same headers with the matching body: forwarded, decided on the body path.
    let (p, mut d) = body_plan(run(&mut e, &h));
    let v = e.on_request_body(&p, &call_body(json!(10), "get_ticket", json!({"ticket_id": "T-1"})), NOW, &mut d);
    assert!(matches!(v, Verdict::Forward(_)), "{:?}", d.reason());
    assert_eq!(d.mcp.as_deref().unwrap().path, Some("body"));
}

#[test]
fn old_protocol_version_takes_the_body_path() {
    let k = TestKey::es256("k");
    let mut e = engine(&k, "when_needed", false);
    let h = post(&bearer(&k), &[("x-agent-intent", "support.read"), ("mcp-protocol-version", "2025-06-18")]);
    let (p, mut d) = body_plan(run(&mut e, &h));
    assert!(matches!(e.on_request_body(&p, &call_body(json!(1), "get_ticket", json!({})), NOW, &mut d), Verdict::Forward(_)));
    let (p, mut d) = body_plan(run(&mut e, &h));
    let r = reply(e.on_request_body(&p, &call_body(json!("a-1"), "delete_customer", json!({})), NOW, &mut d));
    assert_eq!((r.status, d.reason()), (403, Reason::ToolNotAllowed));
    assert_eq!(jsonrpc(&r)["id"], json!("a-1"));
    assert_eq!(jsonrpc(&r)["error"]["code"], json!(-32003));
    assert_eq!(header(&r, "www-authenticate"), Some("Bearer error=\"insufficient_scope\", scope=\"crm:admin\", resource_metadata=\"https://mcp.acme.internal/.well-known/oauth-protected-resource/mcp\""));
}

#[test]
fn argument_constraint_needs_the_body_when_headers_do_not_mirror_it() {
    let k = TestKey::es256("k");
    let mut e = engine(&k, "when_needed", false);
    let h = post(&bearer(&k), &[&[("x-agent-intent", "support.refund"), ("x-agent-task", "T-42")][..], &mirrored("refund", &[])].concat());
    let (p, mut d) = body_plan(run(&mut e, &h));
    let r = reply(e.on_request_body(&p, &call_body(json!(3), "refund", json!({"amount": 500, "ticket_id": "T-42"})), NOW, &mut d));
    assert_eq!((r.status, d.reason()), (403, Reason::ArgumentNotAllowed));
    assert!(header(&r, "www-authenticate").is_none(), "the tool is allowed; its argument is not");
    // Mirrored and within the limits: decided from the headers.
    let h = post(&bearer(&k), &[&[("x-agent-intent", "support.refund"), ("x-agent-task", "T-42")][..], &mirrored("refund", &[("mcp-param-amount", "42"), ("mcp-param-ticket_id", "T-42")])].concat());
    assert!(matches!(run(&mut e, &h).verdict, Verdict::Forward(_)));
    // Mirrored over the limit: refused without the body.
    let h = post(&bearer(&k), &[&[("x-agent-intent", "support.refund"), ("x-agent-task", "T-42")][..], &mirrored("refund", &[("mcp-param-amount", "500"), ("mcp-param-ticket_id", "T-42")])].concat());
    let out = run(&mut e, &h);
    assert_eq!(out.decision.reason(), Reason::ArgumentNotAllowed);
    let r = reply(out.verdict);
    assert_eq!(jsonrpc(&r)["id"], Value::Null, "no body read: the id is unknown");
}

#[test]
fn malformed_bodies_are_400_with_the_id_kept() {
    let k = TestKey::es256("k");
    let mut e = engine(&k, "always", false);
    let h = post(&bearer(&k), &[("x-agent-intent", "support.read")]);
    for (body, code, id) in [
        (&b"{not json"[..], -32700, Value::Null),
        (br#"{"jsonrpc":"2.0","id":4,"method":"tools/call","params":{"name":"get_ticket","name":"delete_customer"}}"#, -32600, json!(4)),
        (br#"{"jsonrpc":"1.0","id":5,"method":"tools/call","params":{"name":"get_ticket"}}"#, -32600, json!(5)),
        (br#"{"jsonrpc":"2.0","id":6,"method":"tools/call","params":{"name":7}}"#, -32600, json!(6)),
        (br#"[{"jsonrpc":"2.0","id":7,"method":"ping"}]"#, -32600, Value::Null),
        (b"", -32700, Value::Null),
    ] {
        let (p, mut d) = body_plan(run(&mut e, &h));
        let r = reply(e.on_request_body(&p, body, NOW, &mut d));
        assert_eq!(r.status, 400, "{}", String::from_utf8_lossy(body));
        let v = jsonrpc(&r);
        assert_eq!((v["error"]["code"].clone(), v["id"].clone()), (json!(code), id), "{}", String::from_utf8_lossy(body));
    }
}

#[test]
fn body_over_the_limit_is_413() {
    let k = TestKey::es256("k");
    let mut e = engine(&k, "always", false);
    let (p, mut d) = body_plan(run(&mut e, &post(&bearer(&k), &[("x-agent-intent", "support.read")])));
    assert_eq!(p.max_body_bytes, 2048);
    let big = call_body(json!(1), "get_ticket", json!({"pad": "x".repeat(4096)}));
    let r = reply(e.on_request_body(&p, &big, NOW, &mut d));
    assert_eq!((r.status, d.reason()), (413, Reason::McpBodyTooLarge));
    let r = reply(e.body_too_large(&mut d));
    assert_eq!(jsonrpc(&r)["error"]["code"], json!(-32600));
}

#[test]
fn unauthenticated_mcp_call_gets_the_resource_metadata() {
    let k = TestKey::es256("k");
    let mut e = engine(&k, "always", false);
    let out = run(&mut e, &post("", &[]));
    let r = reply(out.verdict);
    assert_eq!(r.status, 401);
    assert_eq!(header(&r, "www-authenticate"), Some("Bearer resource_metadata=\"https://mcp.acme.internal/.well-known/oauth-protected-resource/mcp\""));
    assert_eq!(jsonrpc(&r)["error"]["code"], json!(-32001));
    let forged = TestKey::es256("k");
    let r = reply(run(&mut e, &post(&bearer(&forged), &[])).verdict);
    let v = header(&r, "www-authenticate").unwrap();
    assert!(v.starts_with("Bearer resource_metadata=\"https://mcp.acme.internal/") && v.contains("error=\"invalid_token\""), "{v}");
    // Not an MCP resource: as before.
    let h = Headers::new(vec![(":method", "GET"), (":authority", "tickets.internal"), (":path", "/tickets/1")]);
    let r = reply(run(&mut e, &h).verdict);
    assert_eq!(header(&r, "www-authenticate"), Some("Bearer"));
}

#[test]
fn metadata_is_served_without_a_token() {
    let k = TestKey::es256("k");
    let mut e = engine(&k, "always", false);
    let h = Headers::new(vec![(":method", "GET"), (":authority", HOST), (":path", "/.well-known/oauth-protected-resource/mcp")]);
    let out = run(&mut e, &h);
    let r = reply(out.verdict);
    assert_eq!(r.status, 200);
    assert_eq!(header(&r, "cache-control"), Some("max-age=300"));
    let v: Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(v["resource"], json!("https://mcp.acme.internal/mcp"));
    assert_eq!(v["bearer_methods_supported"], json!(["header"]));
    assert_eq!(v["scopes_supported"], json!(["tickets:read"]));
    assert_eq!(out.decision.effect(), Effect::Allow);
    // Another path or host: not served (and then refused as usual, without a token).
    for (host, path) in [(HOST, "/.well-known/oauth-protected-resource/other"), ("evil.example", "/.well-known/oauth-protected-resource/mcp")] {
        let h = Headers::new(vec![(":method", "GET"), (":authority", host), (":path", path)]);
        assert_eq!(reply(run(&mut e, &h).verdict).status, 401, "{host}{path}");
    }
}

#[test]
fn session_methods_need_no_intent() {
    let k = TestKey::es256("k");
    let mut e = engine(&k, "when_needed", false);
    let h = post(&bearer(&k), &[("mcp-protocol-version", "2026-07-28"), ("mcp-method", "tools/list")]);
    assert!(matches!(run(&mut e, &h).verdict, Verdict::Forward(_)));
    let h = post(&bearer(&k), &mirrored("get_ticket", &[]));
    let out = run(&mut e, &h);
    assert_eq!(out.decision.reason(), Reason::IntentRequired);
    let r = reply(out.verdict);
    assert!(header(&r, "www-authenticate").unwrap().contains("scope=\"tickets:read\""));
}

#[test]
fn credential_is_scoped_to_the_tool() {
    let k = TestKey::es256("k");
    let mut e = engine(&k, "when_needed", true);
    let h = post(&bearer(&k), &[&[("x-agent-intent", "support.read")][..], &mirrored("get_ticket", &[])].concat());
    let out = run(&mut e, &h);
    let Verdict::Mint(plan) = out.verdict else { panic!("{:?}", out.decision.reason()) };
    let form = String::from_utf8(plan.body()).unwrap();
    assert!(form.contains("tool=get_ticket"), "{form}");
    assert_eq!(plan.request.tool.as_deref(), Some("get_ticket"));
    let mut d = out.decision;
    // A minted token for another tool (or none) is not injected.
    let b64 = crate::testkit::b64;
    for claims in [json!({"jti": "j", "exp": NOW + 100, "aud": "support-mcp", "sub": SUB, "tool": "delete_customer"}), json!({"jti": "j", "exp": NOW + 100, "aud": "support-mcp", "sub": SUB})] {
        let token = format!("{}.{}.sig", b64(br#"{"alg":"ES256","kid":"m"}"#), b64(claims.to_string().as_bytes()));
        let answer = json!({"access_token": token, "issued_token_type": mint::JWT_TOKEN_TYPE, "token_type": "Bearer", "expires_in": 100}).to_string();
        let (v, failure) = e.finish_mint(&plan, Ok((200, answer.as_bytes())), NOW, &mut d);
        assert!(matches!(v, Verdict::Reply(_)), "{claims}");
        assert!(matches!(failure, Some(MintError::Mismatch(_))), "{failure:?}");
    }
    let token = format!("{}.{}.sig", b64(br#"{"alg":"ES256","kid":"m"}"#), b64(json!({"jti": "j", "exp": NOW + 100, "aud": "support-mcp", "sub": SUB, "tool": "get_ticket"}).to_string().as_bytes()));
    let answer = json!({"access_token": token, "issued_token_type": mint::JWT_TOKEN_TYPE, "token_type": "Bearer", "expires_in": 100}).to_string();
    assert!(matches!(e.finish_mint(&plan, Ok((200, answer.as_bytes())), NOW, &mut d).0, Verdict::Forward(_)));
    // The credential key includes the tool: the same caller, intent and task, another tool.
    let a = mint::credential_key(SUB, "support-mcp", &[], None, Some("support.read"), Some("get_ticket"), None);
    let b = mint::credential_key(SUB, "support-mcp", &[], None, Some("support.read"), Some("refund"), None);
    let c = mint::credential_key(SUB, "support-mcp", &[], None, Some("support.read"), None, None);
    assert!(a != b && a != c && b != c);
}

#[test]
fn non_mcp_requests_take_the_old_path() {
    let k = TestKey::es256("k");
    let mut e = engine(&k, "always", false);
    let h = Headers::new(vec![(":method", "GET"), (":authority", "tickets.internal"), (":path", "/tickets/1"), ("authorization", &bearer(&k)), ("x-agent-intent", "ticket.read")]);
    let out = run(&mut e, &h);
    assert!(matches!(out.verdict, Verdict::Forward(_)));
    assert!(out.decision.mcp.is_none());
}

/// The header phase of a body-path call: what to do with the headers now.
fn header_verdict(p: &mut BodyPlan) -> Verdict {
    p.take_header_verdict().expect("a header verdict")
}

#[test]
fn body_path_header_phase_lets_the_headers_go_on_and_refuses_what_they_decide() {
    let k = TestKey::es256("k");
    let mut e = engine(&k, "always", false);
    // Headers mirroring an allowed tool: forwarded now (edits applied), the body judged later.
    let h = post(&bearer(&k), &[&[("x-agent-intent", "support.read")][..], &mirrored("get_ticket", &[])].concat());
    let (mut p, d) = body_plan(run(&mut e, &h));
    match header_verdict(&mut p) {
        Verdict::Forward(edits) => assert!(edits.remove.iter().any(|n| n == "authorization"), "{edits:?}"),
        other => panic!("{other:?}"),
    }
    assert!(p.take_header_verdict().is_none(), "taken once");
    assert_eq!(d.mcp.as_deref().unwrap().path, Some("body"));
    // Headers mirroring a tool the intent does not name: refused from the headers.
    let h = post(&bearer(&k), &[&[("x-agent-intent", "support.read")][..], &mirrored("delete_customer", &[])].concat());
    let out = run(&mut e, &h);
    assert_eq!(out.decision.reason(), Reason::ToolNotAllowed);
    assert_eq!(reply(out.verdict).status, 403);
    // No MCP headers: an intent without any operation on this server is refused from the headers.
    let h = post(&bearer(&k), &[("x-agent-intent", "ticket.read")]);
    let out = run(&mut e, &h);
    assert_eq!(out.decision.reason(), Reason::IntentMismatch);
    // No MCP headers and no intent: only a session method can pass, the body decides.
    let h = post(&bearer(&k), &[]);
    let (mut p, mut d) = body_plan(run(&mut e, &h));
    assert!(matches!(header_verdict(&mut p), Verdict::Forward(_)));
    let ping = br#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#;
    assert!(matches!(e.on_request_body(&p, ping, NOW, &mut d), Verdict::Forward(_)), "{:?}", d.reason());
    let (p, mut d) = body_plan(run(&mut e, &h));
    let r = reply(e.on_request_body(&p, &call_body(json!(2), "get_ticket", json!({})), NOW, &mut d));
    assert_eq!((r.status, d.reason()), (403, Reason::IntentRequired));
}

#[test]
fn body_path_mints_for_the_header_tool_or_for_the_intent() {
    let k = TestKey::es256("k");
    let mut e = engine(&k, "always", true);
    // With Mcp-Name: the exchange names the tool, and a body calling another tool is a mismatch.
    let h = post(&bearer(&k), &[&[("x-agent-intent", "support.read")][..], &mirrored("get_ticket", &[])].concat());
    let (mut p, mut d) = body_plan(run(&mut e, &h));
    match header_verdict(&mut p) {
        Verdict::Mint(m) => assert_eq!(m.request.tool.as_deref(), Some("get_ticket")),
        other => panic!("{other:?}"),
    }
    assert_eq!(d.mcp.as_deref().unwrap().credential_scope, Some("tool"));
    let r = reply(e.on_request_body(&p, &call_body(json!(3), "delete_customer", json!({})), NOW, &mut d));
    assert_eq!(d.reason(), Reason::McpHeaderMismatch);
    assert_eq!(r.status, 400);
    // Without MCP headers: minted for the intent (no tool); the body is then judged in full.
    let h = post(&bearer(&k), &[("x-agent-intent", "support.read")]);
    let (mut p, mut d) = body_plan(run(&mut e, &h));
    match header_verdict(&mut p) {
        Verdict::Mint(m) => assert_eq!(m.request.tool, None),
        other => panic!("{other:?}"),
    }
    assert_eq!(d.mcp.as_deref().unwrap().credential_scope, Some("intent"));
    let v = e.on_request_body(&p, &call_body(json!(4), "get_ticket", json!({})), NOW, &mut d);
    assert_eq!(v, Verdict::Forward(HeaderEdits::default()), "the body follows the headers unchanged");
    let m = d.mcp.as_deref().unwrap();
    assert_eq!((m.tool.as_deref(), m.path, m.credential_scope), (Some("get_ticket"), Some("body"), Some("intent")));
    let (mut p, mut d) = body_plan(run(&mut e, &h));
    let _ = header_verdict(&mut p);
    let r = reply(e.on_request_body(&p, &call_body(json!(5), "delete_customer", json!({})), NOW, &mut d));
    assert_eq!((r.status, d.reason()), (403, Reason::ToolNotAllowed));
}

#[test]
fn cached_header_phase_never_lets_a_later_body_through_unjudged() {
    // The header phase of a body-path call is cached like any judgement; the body is judged on
    // every request: a harmless first call cannot vouch for a second one's arguments.
    let k = TestKey::es256("k");
    let mut e = engine(&k, "when_needed", false);
    let h = post(&bearer(&k), &[&[("x-agent-intent", "support.refund"), ("x-agent-task", "T-42")][..], &mirrored("refund", &[])].concat());
    let (p, mut d) = body_plan(run(&mut e, &h));
    assert!(!d.decision_cache_hit);
    let v = e.on_request_body(&p, &call_body(json!(1), "refund", json!({"amount": 20, "ticket_id": "T-42"})), NOW, &mut d);
    assert!(matches!(v, Verdict::Forward(_)), "{:?}", d.reason());
    let (p, mut d) = body_plan(run(&mut e, &h));
    assert!(d.decision_cache_hit, "the same headers: the header phase comes from the cache");
    let r = reply(e.on_request_body(&p, &call_body(json!(2), "refund", json!({"amount": 5000, "ticket_id": "T-42"})), NOW, &mut d));
    assert_eq!((r.status, d.reason()), (403, Reason::ArgumentNotAllowed));
    let (p, mut d) = body_plan(run(&mut e, &h));
    let r = reply(e.on_request_body(&p, &call_body(json!(3), "delete_customer", json!({})), NOW, &mut d));
    assert_eq!((r.status, d.reason()), (400, Reason::McpHeaderMismatch));
}
