//! MCP policy semantics: tools, methods, URIs, prompts and argument constraints, each test
//! named after the attack it models.

use super::mcp::{Glob, McpArgs, McpCall, McpSource};
use super::*;
use crate::decision::Effect;
use serde_json::{json, Value};

const NOW: u64 = 1_795_564_800 + 10 * 3600;
const AGENT: &str = "spiffe://example.org/agent/support/a1";
const HOST: &str = "mcp.acme.internal";

fn support() -> Value {
    json!({
        "classes": [{"name": "agent", "principals": ["spiffe://example.org/agent/**"], "intent_required": true, "max_sensitivity": "confidential"}],
        "resources": [
            {"name": "support-mcp", "hosts": [HOST], "paths": ["/mcp"], "sensitivity": "internal", "audience": "support-mcp",
             "mcp": {"tools": {"delete_customer": {"sensitivity": "restricted"}, "refund": {"sensitivity": "confidential"}},
                     "metadata": {"resource": "https://mcp.acme.internal/mcp", "authorization_servers": ["https://auth.acme.internal"]}}},
            {"name": "tickets", "hosts": ["tickets.internal"], "paths": ["/tickets/**"], "sensitivity": "internal"}
        ],
        "intents": [
            {"name": "support.read", "operations": [{"resource": "support-mcp", "tools": ["get_ticket", "search_*"]}], "scopes": ["tickets:read"]},
            {"name": "support.refund", "operations": [
                {"resource": "support-mcp", "tools": ["get_ticket"]},
                {"resource": "support-mcp", "tools": ["refund"], "arguments": [
                    {"pointer": "/amount", "max": 100, "min": 0},
                    {"pointer": "/ticket_id", "equals_context": "task"}]}],
             "scopes": ["tickets:read", "refunds:write"]},
            {"name": "support.files", "operations": [
                {"resource": "support-mcp", "tools": ["read_file"], "arguments": [{"pointer": "/path", "prefix": "/srv/tickets/"}]},
                {"resource": "support-mcp", "mcp_methods": ["resources/read"], "uris": ["tickets://*"]},
                {"resource": "support-mcp", "mcp_methods": ["prompts/get"], "prompts": ["summarise_*"]}],
             "scopes": ["files:read"]},
            {"name": "support.comment", "operations": [
                {"resource": "support-mcp", "tools": ["add_comment"], "arguments": [
                    {"pointer": "/ticket_id", "pattern": "T-*"},
                    {"pointer": "/visibility", "equals": "internal", "required": false},
                    {"pointer": "/meta/channel", "equals": "agent"},
                    {"pointer": "/secret_note", "pattern": "*", "sensitive": true, "required": false}]}],
             "scopes": ["tickets:comment"]},
            {"name": "support.admin", "operations": [{"resource": "support-mcp", "tools": ["delete_customer"]}], "scopes": ["crm:admin"]},
            {"name": "ticket.read", "operations": [{"resource": "tickets", "methods": ["GET"]}]}
        ],
        "rules": [
            {"id": "no-search-at-night", "effect": "deny", "tools": ["search_*"], "when": {"hours": ["00:00-06:00"]}},
            {"id": "no-sampling", "effect": "deny", "mcp_methods": ["sampling/*"]},
            {"id": "blocked-lists", "effect": "deny", "principals": ["spiffe://example.org/agent/blocked"], "mcp_methods": ["tools/list"]},
            {"id": "agents", "effect": "allow", "classes": ["agent"]}
        ]
    })
}

fn policy(v: Value) -> Policy {
    let c: PolicyConfig = serde_json::from_value(v).unwrap();
    Policy::compile(&c, "policy").unwrap()
}

fn compile_err(v: Value) -> String {
    let c: PolicyConfig = match serde_json::from_value(v) {
        Ok(c) => c,
        Err(e) => return e.to_string(),
    };
    Policy::compile(&c, "policy").unwrap_err().to_string()
}

fn body_call(method: &str, name: Option<&str>, args: Value) -> McpCall<'static> {
    McpCall {
        method: method.into(),
        name: name.map(str::to_string),
        uri: None,
        arguments: match args {
            Value::Object(m) => McpArgs::Body(m),
            _ => McpArgs::None,
        },
        source: McpSource::Body,
    }
}

fn tool(name: &str, args: Value) -> McpCall<'static> {
    body_call("tools/call", Some(name), args)
}

fn judge(p: &Policy, intent: Option<&str>, task: Option<&str>, call: &McpCall) -> PolicyDecision {
    judge_as(p, AGENT, intent, task, call)
}

fn judge_as(p: &Policy, principal: &str, intent: Option<&str>, task: Option<&str>, call: &McpCall) -> PolicyDecision {
    p.evaluate(&PolicyInput { principal, intent, task, minter: true, ..mcp_input(call, "") })
}

fn reason(d: &PolicyDecision) -> Reason {
    d.reason
}

/// The reason the support policy gives for a call of `name` (no arguments) under `intent`.
fn reason_for(intent: &str, name: &str) -> Reason {
    reason(&judge(&policy(support()), Some(intent), None, &tool(name, json!({}))))
}

#[test]
fn named_tool_is_allowed_with_scopes() {
    let p = policy(support());
    let d = judge(&p, Some("support.read"), None, &tool("get_ticket", json!({"ticket_id": "T-1"})));
    assert_eq!((d.effect, d.reason), (Effect::Allow, Reason::Allowed), "{d:?}");
    assert_eq!(d.scopes, vec!["tickets:read"]);
    assert_eq!(d.audience.as_deref(), Some("support-mcp"));
    assert!(judge(&p, Some("support.read"), None, &tool("search_tickets", json!({}))).effect == Effect::Allow);
}

#[test]
fn tool_no_intent_names_is_refused_with_the_scopes_that_would_allow_it() {
    let p = policy(support());
    let d = judge(&p, Some("support.read"), None, &tool("delete_customer", json!({"customer_id": "C-1"})));
    assert_eq!(reason(&d), Reason::ToolNotAllowed);
    assert_eq!(d.needed_scopes, vec!["crm:admin"]);
    let d = judge(&p, Some("support.read"), None, &tool("drop_database", json!({})));
    assert_eq!(reason(&d), Reason::ToolNotAllowed);
    assert!(d.needed_scopes.is_empty(), "no intent allows it: nothing to ask for");
}

#[test]
fn tool_glob_does_not_match_a_longer_name_by_prefix() {
    for name in ["get_ticket_and_delete_customer", "get_tickets", "xget_ticket"] {
        assert_eq!(reason_for("support.read", name), Reason::ToolNotAllowed, "{name}");
    }
    let g = Glob::compile("search_*", false).unwrap();
    assert!(g.matches("search_") && g.matches("search_x/y") && !g.matches("searc_x") && !g.matches("re_search_x"));
    let g = Glob::compile("*_ticket", false).unwrap();
    assert!(g.matches("get_ticket") && !g.matches("get_ticket_admin") && !g.matches("get_tickets"));
    let g = Glob::compile("a*b*c", false).unwrap();
    assert!(g.matches("abc") && g.matches("axxbyyc") && !g.matches("axxbyycd") && !g.matches("acb"));
    let g = Glob::compile("tickets://*", true).unwrap();
    assert!(g.matches("tickets://T-1") && !g.matches("tickets://T-1/x") && !g.matches("tickets:/"));
}

#[test]
fn tool_name_case_variant_is_another_tool() {
    assert_eq!(reason_for("support.read", "Get_Ticket"), Reason::ToolNotAllowed);
}

#[test]
fn refund_above_limit_is_refused() {
    let p = policy(support());
    let d = judge(&p, Some("support.refund"), Some("T-42"), &tool("refund", json!({"ticket_id": "T-42", "amount": 500})));
    assert_eq!(reason(&d), Reason::ArgumentNotAllowed);
    assert_eq!(d.mcp_checked.iter().find(|c| c.pointer == "/amount").map(|c| (c.ok, c.value.clone())), Some((false, Some(json!(500)))));
    let d = judge(&p, Some("support.refund"), Some("T-42"), &tool("refund", json!({"ticket_id": "T-42", "amount": 100})));
    assert_eq!(d.effect, Effect::Allow, "{d:?}");
    assert_eq!(d.mcp_checked.len(), 2);
    assert!(d.mcp_checked.iter().all(|c| c.ok));
    assert_eq!(d.sensitivity.as_deref(), Some("confidential"), "the tool's own sensitivity");
}

#[test]
fn refund_amount_as_a_string_is_not_a_number() {
    let p = policy(support());
    for amount in [json!("50"), json!(null), json!([50]), json!({"value": 50}), json!(true), json!(-1), json!(100.0001)] {
        let d = judge(&p, Some("support.refund"), Some("T-42"), &tool("refund", json!({"ticket_id": "T-42", "amount": amount})));
        assert_eq!(reason(&d), Reason::ArgumentNotAllowed, "{amount}");
    }
}

#[test]
fn refund_without_the_amount_is_refused() {
    let p = policy(support());
    let d = judge(&p, Some("support.refund"), Some("T-42"), &tool("refund", json!({"ticket_id": "T-42"})));
    assert_eq!(reason(&d), Reason::ArgumentNotAllowed);
    let d = judge(&p, Some("support.refund"), Some("T-42"), &body_call("tools/call", Some("refund"), Value::Null));
    assert_eq!(reason(&d), Reason::ArgumentNotAllowed, "no arguments at all");
}

#[test]
fn ticket_id_must_equal_the_task() {
    let p = policy(support());
    let d = judge(&p, Some("support.refund"), Some("T-42"), &tool("refund", json!({"ticket_id": "T-43", "amount": 10})));
    assert_eq!(reason(&d), Reason::ArgumentNotAllowed);
    let d = judge(&p, Some("support.refund"), None, &tool("refund", json!({"ticket_id": "T-43", "amount": 10})));
    assert_eq!(reason(&d), Reason::TaskRequired, "no task: the argument bound to it names what is missing");
    let d = judge(&p, Some("support.refund"), Some("42"), &tool("refund", json!({"ticket_id": 42, "amount": 10})));
    assert_eq!(reason(&d), Reason::ArgumentNotAllowed, "a number is not the task's string");
}

#[test]
fn prefix_constraint_cannot_be_escaped_with_dot_dot() {
    let p = policy(support());
    let ok = judge(&p, Some("support.files"), None, &tool("read_file", json!({"path": "/srv/tickets/T-1/notes.txt"})));
    assert_eq!(ok.effect, Effect::Allow, "{ok:?}");
    for path in [
        "/srv/tickets/../../etc/passwd",
        "/srv/tickets/./../secrets",
        "/srv/tickets/..",
        "/srv/tickets//etc/passwd",
        "/srv/tickets/%2e%2e/etc",
        "/srv/tickets/..\\..\\etc",
        "/srv/ticketsX/other",
        "/srv/other",
    ] {
        assert_eq!(reason(&judge(&p, Some("support.files"), None, &tool("read_file", json!({"path": path})))), Reason::ArgumentNotAllowed, "{path}");
    }
}

#[test]
fn prefix_without_a_trailing_slash_cannot_reach_a_sibling_directory() {
    // `/srv/tickets` must not cover `/srv/tickets-archive` or `/srv/ticketsX`.
    let mut cfg = support();
    cfg["intents"][2]["operations"][0]["arguments"][0]["prefix"] = json!("/srv/tickets");
    let p = policy(cfg);
    for ok in ["/srv/tickets", "/srv/tickets/T-1/notes.txt"] {
        let d = judge(&p, Some("support.files"), None, &tool("read_file", json!({"path": ok})));
        assert_eq!(d.effect, Effect::Allow, "{ok}: {d:?}");
    }
    for sibling in ["/srv/tickets-archive/T-1", "/srv/ticketsX", "/srv/tickets.bak"] {
        let d = judge(&p, Some("support.files"), None, &tool("read_file", json!({"path": sibling})));
        assert_eq!(reason(&d), Reason::ArgumentNotAllowed, "{sibling}");
    }
}

#[test]
fn pattern_and_equals_constraints_hold_on_nested_pointers() {
    let p = policy(support());
    let good = json!({"ticket_id": "T-1", "text": "hi", "meta": {"channel": "agent"}});
    assert_eq!(judge(&p, Some("support.comment"), None, &tool("add_comment", good.clone())).effect, Effect::Allow);
    let mut public = good.clone();
    public["visibility"] = json!("public");
    assert_eq!(reason(&judge(&p, Some("support.comment"), None, &tool("add_comment", public))), Reason::ArgumentNotAllowed, "optional, but checked when present");
    let mut other = good.clone();
    other["meta"]["channel"] = json!("customer");
    assert_eq!(reason(&judge(&p, Some("support.comment"), None, &tool("add_comment", other))), Reason::ArgumentNotAllowed);
    let mut not_ticket = good.clone();
    not_ticket["ticket_id"] = json!("C-1");
    assert_eq!(reason(&judge(&p, Some("support.comment"), None, &tool("add_comment", not_ticket))), Reason::ArgumentNotAllowed);
}

#[test]
fn sensitive_argument_values_are_hashed_in_the_record() {
    let p = policy(support());
    let args = json!({"ticket_id": "T-1", "meta": {"channel": "agent"}, "secret_note": "card 4111 1111 1111 1111"});
    let d = judge(&p, Some("support.comment"), None, &tool("add_comment", args));
    let note = d.mcp_checked.iter().find(|c| c.pointer == "/secret_note").unwrap();
    let v = note.value.as_ref().unwrap().as_str().unwrap();
    assert!(v.starts_with("sha256:") && !v.contains("4111"), "{v}");
}

#[test]
fn resource_uri_outside_the_pattern_is_refused() {
    let p = policy(support());
    let read = |uri: &str| McpCall { uri: Some(uri.into()), ..body_call("resources/read", None, Value::Null) };
    assert_eq!(judge(&p, Some("support.files"), None, &read("tickets://T-1")).effect, Effect::Allow);
    assert_eq!(reason(&judge(&p, Some("support.files"), None, &read("tickets://T-1/../../customers/1"))), Reason::ToolNotAllowed, "`*` never crosses `/`");
    assert_eq!(reason(&judge(&p, Some("support.files"), None, &read("customers://1"))), Reason::ToolNotAllowed);
    let g = Glob::compile("file:///srv/**", true).unwrap();
    assert!(g.matches("file:///srv/a/b") && !g.matches("file:///etc/srv/a"));
}

#[test]
fn resource_uri_cannot_escape_its_glob_with_dot_segments_or_escapes() {
    let p = policy(support());
    let read = |uri: &str| McpCall { uri: Some(uri.into()), ..body_call("resources/read", None, Value::Null) };
    for uri in ["tickets://..", "tickets://%2e%2e%2fcustomers%2f1", "tickets://T-1\\..\\c", "tickets://."] {
        assert_eq!(reason(&judge(&p, Some("support.files"), None, &read(uri))), Reason::ToolNotAllowed, "{uri}");
    }
}

#[test]
fn pattern_constraint_cannot_be_escaped_with_dot_dot_or_escapes() {
    let p = policy(support());
    let base = json!({"ticket_id": "T-1", "text": "hi", "meta": {"channel": "agent"}});
    for id in ["T-1/../../C-9", "T-%2e%2e", "T-1\\..", "T-/./x"] {
        let mut a = base.clone();
        a["ticket_id"] = json!(id);
        assert_eq!(reason(&judge(&p, Some("support.comment"), None, &tool("add_comment", a))), Reason::ArgumentNotAllowed, "{id}");
    }
    // Free text under a `*` pattern keeps working: a lone `%` is not an escape.
    let mut note = base.clone();
    note["secret_note"] = json!("refund 50% of order 5512");
    assert_eq!(judge(&p, Some("support.comment"), None, &tool("add_comment", note)).effect, Effect::Allow);
}

#[test]
fn prompt_outside_the_pattern_is_refused() {
    let p = policy(support());
    let get = |n: &str| body_call("prompts/get", Some(n), json!({}));
    assert_eq!(judge(&p, Some("support.files"), None, &get("summarise_ticket")).effect, Effect::Allow);
    assert_eq!(reason(&judge(&p, Some("support.files"), None, &get("exfiltrate_all"))), Reason::ToolNotAllowed);
}

#[test]
fn session_methods_need_no_intent_but_a_deny_rule_still_wins() {
    let p = policy(support());
    for m in ["initialize", "ping", "tools/list", "resources/list", "resources/templates/list", "prompts/list", "notifications/initialized"] {
        let d = judge(&p, None, None, &body_call(m, None, Value::Null));
        assert_eq!(d.effect, Effect::Allow, "{m}: {d:?}");
    }
    let d = judge_as(&p, "spiffe://example.org/agent/blocked", None, None, &body_call("tools/list", None, Value::Null));
    assert_eq!((d.reason, d.rule_id.as_deref()), (Reason::DeniedByRule, Some("blocked-lists")));
}

#[test]
fn unknown_method_without_an_intent_is_refused() {
    let p = policy(support());
    assert_eq!(reason(&judge(&p, None, None, &tool("get_ticket", json!({})))), Reason::IntentRequired);
    let d = judge(&p, Some("support.read"), None, &body_call("sampling/createMessage", None, Value::Null));
    assert_eq!(reason(&d), Reason::ToolNotAllowed);
    let d = judge(&p, Some("support.read"), None, &body_call("completion/complete", None, Value::Null));
    assert_eq!(reason(&d), Reason::ToolNotAllowed);
}

#[test]
fn intent_for_another_resource_cannot_call_tools() {
    assert_eq!(reason_for("ticket.read", "get_ticket"), Reason::IntentMismatch);
}

#[test]
fn deny_rule_on_a_tool_glob_wins_over_the_intent() {
    let p = policy(support());
    let call = tool("search_tickets", json!({}));
    let at = |now| p.evaluate(&PolicyInput { now, ..mcp_input(&call, "support.read") });
    assert_eq!(at(1_795_564_800 + 3 * 3600).rule_id.as_deref(), Some("no-search-at-night"));
    assert_eq!(at(NOW).effect, Effect::Allow);
}

fn mcp_input<'a>(call: &'a McpCall, intent: &'a str) -> PolicyInput<'a> {
    PolicyInput {
        principal: AGENT,
        iat: Some(NOW - 10),
        exp: NOW + 290,
        intent: Some(intent),
        signed_intent: None,
        task: None,
        method: "POST",
        authority: HOST,
        path: "/mcp",
        now: NOW,
        environment: None,
        standing_secret: false,
        minter: false,
        mcp: Some(call),
    }
}

#[test]
fn restricted_tool_is_refused_to_a_class_capped_below_it() {
    let p = policy(support());
    let d = judge(&p, Some("support.admin"), None, &tool("delete_customer", json!({"customer_id": "C-1"})));
    assert_eq!(reason(&d), Reason::SensitivityExceeded, "the class caps agents at confidential");
}

#[test]
fn post_to_an_mcp_resource_without_a_call_is_malformed() {
    let p = policy(support());
    let d = p.evaluate(&PolicyInput { mcp: None, ..mcp_input(&tool("x", json!({})), "support.read") });
    assert_eq!(reason(&d), Reason::McpMalformed);
}

#[test]
fn header_arguments_that_do_not_say_enough_ask_for_the_body() {
    let p = policy(support());
    let hdr = |params: Vec<(&str, &str)>| McpCall {
        arguments: McpArgs::Headers(params.into_iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()),
        source: McpSource::Header,
        ..tool("refund", Value::Null)
    };
    // Nothing mirrored: undecided, read the body.
    let d = judge(&p, Some("support.refund"), Some("T-42"), &hdr(vec![]));
    assert!(d.needs_body, "{d:?}");
    // Both mirrored and within limits: decided from the headers.
    let d = judge(&p, Some("support.refund"), Some("T-42"), &hdr(vec![("amount", "42"), ("ticket_id", "T-42")]));
    assert_eq!(d.effect, Effect::Allow, "{d:?}");
    assert!(!d.needs_body);
    // Mirrored and over the limit: refused without the body.
    let d = judge(&p, Some("support.refund"), Some("T-42"), &hdr(vec![("amount", "500"), ("ticket_id", "T-42")]));
    assert_eq!((d.reason, d.needs_body), (Reason::ArgumentNotAllowed, false));
    // A header that is not a JSON number cannot be judged against a range: read the body.
    let d = judge(&p, Some("support.refund"), Some("T-42"), &hdr(vec![("amount", "0x10"), ("ticket_id", "T-42")]));
    assert!(d.needs_body);
    // A tool without constraints never needs the body.
    let d = judge(&p, Some("support.read"), None, &McpCall { name: Some("get_ticket".into()), ..hdr(vec![]) });
    assert_eq!((d.effect, d.needs_body), (Effect::Allow, false));
}

#[test]
fn mcp_config_mistakes_are_refused() {
    let with_op = |op: Value| {
        let mut v = support();
        v["intents"][0]["operations"] = json!([op]);
        compile_err(v)
    };
    assert!(with_op(json!({"resource": "support-mcp", "tools": []})).contains("empty"));
    assert!(with_op(json!({"resource": "support-mcp", "mcp_methods": ["tools/call"]})).contains("tools"));
    assert!(with_op(json!({"resource": "support-mcp", "mcp_methods": ["*"]})).contains("tools"), "a glob covering tools/call needs tools too");
    assert!(with_op(json!({"resource": "tickets", "tools": ["x"]})).contains("not an MCP resource"));
    assert!(with_op(json!({"resource": "support-mcp", "tools": ["x"], "methods": ["POST"]})).contains("mcp_methods"));
    assert!(with_op(json!({"resource": "support-mcp", "uris": ["a"], "arguments": [{"pointer": "/a", "equals": 1}]})).contains("arguments"));
    let arg = |a: Value| with_op(json!({"resource": "support-mcp", "tools": ["x"], "arguments": [a]}));
    assert!(arg(json!({"pointer": "a", "equals": 1})).contains("pointer"));
    assert!(arg(json!({"pointer": "/a~2", "equals": 1})).contains("escape"));
    assert!(arg(json!({"pointer": "/a", "equals": 1, "pattern": "x"})).contains("exactly one"));
    assert!(arg(json!({"pointer": "/a"})).contains("exactly one"));
    assert!(arg(json!({"pointer": "/a", "min": 5, "max": 1})).contains("min"));
    assert!(arg(json!({"pointer": "/a", "equals_context": "header"})).contains("equals_context"));
    assert!(arg(json!({"pointer": "/a", "prefix": ""})).contains("empty"));
    assert!(arg(json!({"pointer": "/a", "nope": 1})).contains("unknown field"));
    let mut v = support();
    v["resources"][0]["mcp"]["max_body_bytes"] = json!(100);
    assert!(compile_err(v).contains("max_body_bytes"));
    let mut v = support();
    v["resources"][0]["mcp"]["tools"]["x"] = json!({"sensitivity": "galactic"});
    assert!(compile_err(v).contains("galactic"));
    let mut v = support();
    v["rules"][0]["tools"] = json!([]);
    assert!(!policy(v).rules.is_empty(), "an empty rule list means: any");
}

#[test]
fn equals_null_is_a_literal() {
    let mut v = support();
    v["intents"][0]["operations"] = json!([{"resource": "support-mcp", "tools": ["get_ticket"], "arguments": [{"pointer": "/cursor", "equals": null}]}]);
    let p = policy(v);
    assert_eq!(judge(&p, Some("support.read"), None, &tool("get_ticket", json!({"cursor": null}))).effect, Effect::Allow);
    assert_eq!(reason(&judge(&p, Some("support.read"), None, &tool("get_ticket", json!({"cursor": "x"})))), Reason::ArgumentNotAllowed);
}

#[test]
fn lint_knows_mcp_fields() {
    let mut v = support();
    v["resources"][0]["mcp"]["tools"]["wipe_all"] = json!({"sensitivity": "restricted"});
    v["rules"].as_array_mut().unwrap().insert(0, json!({"id": "x", "effect": "deny", "resources": ["tickets"], "tools": ["a"]}));
    let f = lint::lint(&policy(v));
    assert!(f.iter().any(|f| f.message.contains("wipe_all")), "{f:?}");
    assert!(f.iter().any(|f| f.subject == "rule `x`" && f.message.contains("never matches")), "{f:?}");
    // A deny rule limited to some tools does not shadow the allow rule.
    assert!(!f.iter().any(|f| f.subject == "rule `agents`" && f.message.contains("unreachable")), "{f:?}");
}

#[test]
fn plain_http_to_an_mcp_resource_is_judged_as_before() {
    let p = policy(support());
    // A GET (server-to-client stream) carries no call: the MCP operations do not bind it.
    let d = p.evaluate(&PolicyInput { method: "GET", mcp: None, ..mcp_input(&tool("x", json!({})), "support.read") });
    assert_eq!(reason(&d), Reason::IntentMismatch);
}
