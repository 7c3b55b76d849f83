//! MCP through the built filter on the wasmtime host: the header fast path, the body path,
//! JSON-RPC refusals, the RFC 9728 metadata endpoint and tool-scoped credentials.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use mandate_host_test::{Action, HttpCallout, StreamId};
use serde_json::{json, Value};

const MCP_HOST: &str = "mcp.acme.internal";

/// The shared policy plus an MCP server (`support-mcp`) and intents for it.
fn add_mcp(cfg: &mut Value, body: &str) {
    let p = &mut cfg["policy"];
    p["resources"].as_array_mut().unwrap().push(json!({
        "name": "support-mcp", "hosts": [MCP_HOST], "paths": ["/mcp"], "sensitivity": "internal", "audience": "support-mcp",
        "mcp": {"body": body, "max_body_bytes": 4096,
                "metadata": {"resource": "https://mcp.acme.internal/mcp", "authorization_servers": ["https://auth.acme.internal"],
                             "scopes_supported": ["tickets:read", "refunds:write"]}}
    }));
    p["intents"].as_array_mut().unwrap().extend([
        json!({"name": "support.read", "operations": [{"resource": "support-mcp", "tools": ["get_ticket"]}], "scopes": ["tickets:read"]}),
        json!({"name": "support.refund", "operations": [{"resource": "support-mcp", "tools": ["refund"], "arguments": [
            {"pointer": "/amount", "max": 100}, {"pointer": "/ticket_id", "equals_context": "task"}]}], "scopes": ["refunds:write"]}),
    ]);
    p["rules"].as_array_mut().unwrap().push(json!({"id": "mcp-agents", "effect": "allow", "classes": ["agent"], "intents": ["support.read", "support.refund"]}));
}

/// The name of the running test (libtest runs each test on a thread named after it), for the
/// skip notice.
fn test_name() -> String {
    std::thread::current()
        .name()
        .unwrap_or("plugin_mcp")
        .to_string()
}

/// The rig with the MCP server's `body` mode and this minter section (and, optionally, a last
/// edit of the configuration); returns from the test when the filter is not built (skipped).
macro_rules! rig {
    ($body:expr, $minter:expr) => {
        rig!($body, $minter, |_: &mut Value| {})
    };
    ($body:expr, $minter:expr, $edit:expr) => {
        match start_configured(&test_name(), $minter, true, |c| {
            add_mcp(c, $body);
            ($edit)(c)
        }) {
            Some(r) => r,
            None => return,
        }
    };
}

fn post(r: &Rig) -> Req {
    Req::new("POST", MCP_HOST, "/mcp")
        .bearer(&r.svid())
        .with("content-type", "application/json")
}

fn mirrored(req: Req, method: &str, name: Option<&str>) -> Req {
    let req = req
        .with("mcp-protocol-version", "2026-07-28")
        .with("mcp-method", method);
    match name {
        Some(n) => req.with("mcp-name", n),
        None => req,
    }
}

/// A 2026-07-28 `tools/call` of `tool` under `intent`, mirrored into the MCP headers.
fn tool_call(r: &Rig, intent: &str, tool: &str) -> Req {
    mirrored(post(r).intent(intent), "tools/call", Some(tool))
}

fn call(id: Value, tool: &str, args: Value) -> Vec<u8> {
    json!({"jsonrpc": "2.0", "id": id, "method": "tools/call", "params": {"name": tool, "arguments": args}}).to_string().into_bytes()
}

/// Opens a stream and delivers the request headers (not the end of the stream).
fn headers(r: &mut Rig, req: &Req) -> (StreamId, Action) {
    let s = r.vm.new_stream().unwrap();
    let a =
        r.vm.request_headers(
            s,
            req.headers.iter().map(|(k, v)| (k.as_str(), v.as_str())),
            false,
        )
        .unwrap();
    (s, a)
}

/// Like [`headers`], asserting the action of the header phase.
fn open(r: &mut Rig, req: &Req, want: Action) -> StreamId {
    let (s, a) = headers(r, req);
    assert_eq!(a, want, "the action on the request headers");
    s
}

/// Delivers a chunk of the request body.
fn body(r: &mut Rig, s: StreamId, chunk: &[u8], end: bool) -> Action {
    r.vm.request_body(s, chunk, end).unwrap()
}

/// Headers (not the end of the stream), then the body in one chunk: the actions of both.
fn send_with_body(r: &mut Rig, req: &Req, chunk: &[u8]) -> (StreamId, Action, Option<Action>) {
    let (s, a) = headers(r, req);
    // A stream already answered locally gets no body.
    if r.vm.stream(s).local_response.is_some() {
        return (s, a, None);
    }
    let b = body(r, s, chunk, true);
    (s, a, Some(b))
}

/// A minted token for `support-mcp`, with a `tool` claim when `tool` is given.
fn mcp_token(r: &Rig, jti: &str, task: Option<&str>, tool: Option<&str>) -> String {
    let token = minted_jwt_for(jti, r.now() + 120, "support-mcp", task);
    let Some(tool) = tool else {
        return token;
    };
    let mut claims: Value = serde_json::from_slice(
        &base64::Engine::decode(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD,
            token.split('.').nth(1).unwrap(),
        )
        .unwrap(),
    )
    .unwrap();
    claims["tool"] = json!(tool);
    format!(
        "{}.{}.{}",
        token.split('.').next().unwrap(),
        b64(claims.to_string().as_bytes()),
        MINTED_SIG
    )
}

/// Answers the mint call `c` with `token`.
fn answer_token(r: &mut Rig, c: &HttpCallout, token: &str) {
    r.answer(c, json_reply(200, &json!({"access_token": token, "issued_token_type": "urn:ietf:params:oauth:token-type:jwt", "token_type": "Bearer", "expires_in": 120})));
}

/// The JSON-RPC refusal of a stream: (HTTP status, error code, id, reason). A call refused
/// in the body phase may have sent its headers upstream (Envoy then resets that stream), but
/// never its body: the server never gets a complete call.
fn refusal(r: &Rig, s: StreamId) -> (u32, i64, Value, String) {
    let st = r.vm.stream(s);
    assert!(
        st.upstream.body.is_empty(),
        "stream {} sent its body upstream",
        s.0
    );
    assert_eq!(st.local_response_calls, 1, "one local reply per stream");
    let lr = st.local_response.clone().expect("a local reply");
    let v: Value = serde_json::from_slice(&lr.body)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", reply_text(&lr)));
    assert_eq!(v["jsonrpc"], json!("2.0"), "{v}");
    (
        lr.status,
        v["error"]["code"].as_i64().unwrap(),
        v["id"].clone(),
        v["error"]["data"]["reason"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
    )
}

fn reply_header(r: &Rig, s: StreamId, name: &str) -> Option<String> {
    r.vm.stream(s)
        .local_response
        .as_ref()
        .and_then(|lr| header(&lr.headers, name))
}

#[test]
fn allowed_call_by_headers_only_buffers_no_body() {
    let mut r = rig!("when_needed", Value::Null);
    let req = tool_call(&r, "support.read", "get_ticket");
    let s = open(&mut r, &req, Action::Continue); // decided in on_http_request_headers
    let b = body(
        &mut r,
        s,
        &call(json!(1), "get_ticket", json!({"ticket_id": "T-1"})),
        true,
    );
    assert_eq!(b, Action::Continue, "the body streams through unbuffered");
    let fwd = r.forwarded(s);
    assert_eq!(
        header(&fwd, "mcp-name").as_deref(),
        Some("get_ticket"),
        "the MCP headers reach the server"
    );
    assert!(header(&fwd, "authorization").is_none());
    let rec = r.records().pop().unwrap();
    assert_eq!(
        rec["mcp"],
        json!({"method": "tools/call", "tool": "get_ticket", "path": "header", "checked": []})
    );
    assert_eq!(r.metric("mandate.mcp.tools_call.allow"), 1);
}

#[test]
fn old_protocol_version_takes_the_body_path() {
    let mut r = rig!("when_needed", Value::Null);
    let old = |r: &Rig, intent: &str| {
        post(r)
            .intent(intent)
            .with("mcp-protocol-version", "2025-06-18")
    };
    let req = old(&r, "support.read");
    let get = call(json!(2), "get_ticket", json!({"ticket_id": "T-1"}));
    let (s, a, b) = send_with_body(&mut r, &req, &get);
    // Envoy's sequence: the headers go on at once (nothing decided them yet but the intent's
    // grant on the resource); the body is held until complete, then judged and forwarded.
    assert_eq!((a, b), (Action::Continue, Some(Action::Continue)));
    r.forwarded(s);
    assert_eq!(
        r.vm.stream(s).upstream.body,
        get,
        "the body goes upstream unchanged"
    );
    // A tool the intent does not name: 403 in JSON-RPC, id kept, insufficient_scope.
    let delete = call(
        json!("x-9"),
        "delete_customer",
        json!({"customer_id": "C-1"}),
    );
    let (s, _, _) = send_with_body(&mut r, &req, &delete);
    assert_eq!(
        refusal(&r, s),
        (403, -32003, json!("x-9"), "tool_not_allowed".to_string())
    );
    let www = reply_header(&r, s, "www-authenticate").unwrap();
    // No intent would allow delete_customer: no `scope` to name.
    assert!(
        www.starts_with("Bearer error=\"insufficient_scope\"") && !www.contains("scope=\""),
        "{www}"
    );
    let records = r.records();
    assert_eq!(records.len(), 2, "exactly one record per request");
    assert_eq!(records[1]["mcp"]["path"], json!("body"));
    assert_eq!(records[1]["reason"], json!("tool_not_allowed"));
    assert_eq!(r.metric("mandate.mcp.tools_call.deny"), 1);
    // An intent with no operation on this MCP server: refused by the headers, no body read.
    let other = old(&r, "ticket.read");
    let (s, a, b) = send_with_body(&mut r, &other, &call(json!(3), "get_ticket", json!({})));
    assert_eq!((a, b), (Action::Pause, None));
    assert_eq!(refusal(&r, s).3, "intent_mismatch");
    assert!(r.vm.stream(s).upstream.headers.is_none());
}

#[test]
fn header_body_mismatch_is_refused() {
    let mut r = rig!("always", Value::Null);
    let req = tool_call(&r, "support.read", "get_ticket");
    let delete = call(json!(3), "delete_customer", json!({"customer_id": "C-1"}));
    let (s, a, b) = send_with_body(&mut r, &req, &delete);
    // `body: always`: the headers allow get_ticket and go on; the body names another tool.
    assert_eq!((a, b), (Action::Continue, Some(Action::Pause)));
    assert_eq!(
        refusal(&r, s),
        (400, -32020, json!(3), "mcp_header_mismatch".to_string())
    );
    assert!(reply_header(&r, s, "x-mandate-decision-id").is_some());
    assert_eq!(r.records().len(), 1);
}

#[test]
fn body_over_the_limit_is_413_with_a_record() {
    let mut r = rig!("always", Value::Null);
    let req = post(&r).intent("support.read");
    let s = open(&mut r, &req, Action::Continue);
    assert_eq!(
        body(&mut r, s, &[b' '; 3000], false),
        Action::Pause,
        "buffering"
    );
    body(&mut r, s, &[b' '; 3000], false);
    let (status, code, id, reason) = refusal(&r, s);
    assert_eq!(
        (status, code, id, reason.as_str()),
        (413, -32600, Value::Null, "mcp_body_too_large"),
        "refused before the end of the stream"
    );
    let rec = r.records().pop().unwrap();
    assert_eq!(rec["reason"], json!("mcp_body_too_large"));
    r.vm.finish_stream(s).unwrap();
    assert_eq!(r.records().len(), 1, "exactly one record");
}

#[test]
fn trailers_cannot_carry_a_held_body_upstream_unjudged() {
    // The body callback never says end_of_stream when trailers end the stream: without a
    // trailers handler the held body (any tool, any arguments) would go upstream unjudged.
    let mut r = rig!("always", Value::Null);
    let req = post(&r).intent("support.read");
    let s = open(&mut r, &req, Action::Continue);
    let smuggled = call(json!(9), "delete_customer", json!({"customer_id": "C-1"}));
    assert_eq!(body(&mut r, s, &smuggled, false), Action::Pause, "held");
    assert_eq!(r.vm.request_trailers(s, [("x-trailer", "1")]).unwrap(), Action::Pause);
    let (status, _, _, reason) = refusal(&r, s);
    assert_eq!((status, reason.as_str()), (400, "mcp_malformed"));
    r.vm.finish_stream(s).unwrap();
    assert_eq!(r.records().len(), 1, "exactly one record");
    assert_eq!(r.records()[0]["reason"], json!("mcp_malformed"));
}

#[test]
fn malformed_json_rpc_is_400_with_the_id_kept() {
    let mut r = rig!("always", Value::Null);
    let req = post(&r).intent("support.read");
    for (body, want) in [
        (&b"{\"jsonrpc\":\"2.0\",\"id\":4,"[..], (400, -32700, Value::Null, "mcp_malformed")),
        (br#"{"jsonrpc":"2.0","id":5,"method":"tools/call","params":{"name":"get_ticket","name":"delete_customer"}}"#, (400, -32600, json!(5), "mcp_malformed")),
        (br#"{"jsonrpc":"2.0","id":6,"method":"tools/call","params":["get_ticket"]}"#, (400, -32600, json!(6), "mcp_malformed")),
        (br#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":{"n":"get_ticket"}}}"#, (400, -32600, json!(7), "mcp_malformed")),
        (br#"[{"jsonrpc":"2.0","id":8,"method":"tools/call","params":{"name":"get_ticket"}}]"#, (400, -32600, Value::Null, "mcp_batch_refused")),
        (b"\xff\xfe", (400, -32700, Value::Null, "mcp_malformed")),
    ] {
        let (s, _, _) = send_with_body(&mut r, &req, body);
        let got = refusal(&r, s);
        assert_eq!((got.0, got.1, got.2, got.3.as_str()), want, "{}", String::from_utf8_lossy(body));
    }
    // A POST with no body at all (headers end the stream).
    let s = r.send(&req);
    assert_eq!(refusal(&r, s).3, "mcp_malformed");
    assert_eq!(r.records().len(), 7);
    assert!(r.vm.broken().is_none(), "no input trapped the VM");
}

#[test]
fn metadata_endpoint_is_served_without_a_token() {
    let mut r = rig!("always", Value::Null);
    let s = r.send(&Req::get(
        MCP_HOST,
        "/.well-known/oauth-protected-resource/mcp",
    ));
    let lr = r.vm.stream(s).local_response.clone().unwrap();
    assert_eq!(lr.status, 200);
    assert_eq!(
        header(&lr.headers, "cache-control").as_deref(),
        Some("max-age=300")
    );
    let v: Value = serde_json::from_slice(&lr.body).unwrap();
    assert_eq!(
        v,
        json!({"resource": "https://mcp.acme.internal/mcp", "authorization_servers": ["https://auth.acme.internal"],
                         "scopes_supported": ["tickets:read", "refunds:write"], "bearer_methods_supported": ["header"]})
    );
    assert_eq!(r.records().len(), 1);
}

#[test]
fn unauthenticated_call_gets_401_with_resource_metadata() {
    let mut r = rig!("always", Value::Null);
    let req = Req::new("POST", MCP_HOST, "/mcp");
    let (s, _, _) = send_with_body(&mut r, &req, &call(json!(1), "get_ticket", json!({})));
    assert_eq!(
        refusal(&r, s),
        (401, -32001, Value::Null, "token_missing".to_string())
    );
    assert_eq!(
        reply_header(&r, s, "www-authenticate").as_deref(),
        Some("Bearer resource_metadata=\"https://mcp.acme.internal/.well-known/oauth-protected-resource/mcp\"")
    );
}

#[test]
fn credential_is_scoped_to_the_tool() {
    let mut r = rig!("when_needed", minter());
    let refund = |r: &Rig, amount: &str| {
        tool_call(r, "support.refund", "refund")
            .task("T-42")
            .with("mcp-param-amount", amount)
            .with("mcp-param-ticket_id", "T-42")
    };
    let req = refund(&r, "42");
    let s = r.send(&req);
    let c = r.one_mint_call();
    let f = form(&c);
    assert!(
        f.contains(&("tool".to_string(), "refund".to_string())),
        "{f:?}"
    );
    // The minter's answer names the tool asked for: injected.
    let with_tool = mcp_token(&r, "jti-1", Some("T-42"), Some("refund"));
    answer_token(&mut r, &c, &with_tool);
    let fwd = r.forwarded(s);
    assert!(header(&fwd, "authorization").unwrap().ends_with(MINTED_SIG));
    // Another tool for the same caller, intent and task: its own exchange. A token without the
    // tool claim is refused (503), never injected.
    let over = refund(&r, "500");
    let s2 = r.send(&over);
    assert_eq!(
        refusal(&r, s2),
        (403, -32003, Value::Null, "argument_not_allowed".to_string())
    );
    let rec = r.records().pop().unwrap();
    assert_eq!(
        rec["mcp"]["checked"][0],
        json!({"pointer": "/amount", "ok": false, "value": 500})
    );
}

fn filter_tools_list(c: &mut Value) {
    c["policy"]["resources"][4]["mcp"]["filter_tools_list"] = json!(true);
}

fn list_request(r: &mut Rig) -> StreamId {
    let req = mirrored(post(r).intent("support.read"), "tools/list", None);
    let s = r.send(&req);
    r.forwarded(s);
    s
}

/// Delivers the response headers: status 200, `content_type` and `extra`.
fn respond(r: &mut Rig, s: StreamId, content_type: &str, extra: &[(&str, &str)]) -> Action {
    let mut h = vec![(":status", "200"), ("content-type", content_type)];
    h.extend_from_slice(extra);
    r.vm.response_headers(s, h, false).unwrap()
}

/// What went downstream: the `:status` and the body.
fn downstream(r: &Rig, s: StreamId) -> (Option<String>, String) {
    let st = r.vm.stream(s);
    (
        header(st.downstream.headers.as_ref().unwrap(), ":status"),
        String::from_utf8_lossy(&st.downstream.body).to_string(),
    )
}

#[test]
fn tools_list_answer_is_narrowed_to_the_intent() {
    let mut r = rig!("when_needed", Value::Null, filter_tools_list);
    let s = list_request(&mut r);
    let answer = json!({"jsonrpc": "2.0", "id": 2, "result": {"tools": [{"name": "get_ticket"}, {"name": "refund"}, {"name": "delete_customer"}]}});
    let a = respond(&mut r, s, "application/json", &[("content-length", "120")]);
    // The headers go on (a pause would keep the body from the filter, as in Envoy); the body
    // is held until complete.
    assert_eq!(a, Action::Continue);
    r.vm.response_body(s, answer.to_string().as_bytes(), true)
        .unwrap();
    let st = r.vm.stream(s);
    let v: Value = serde_json::from_slice(&st.downstream.body).unwrap();
    assert_eq!(v["result"]["tools"], json!([{"name": "get_ticket"}]));
    assert!(header(st.downstream.headers.as_ref().unwrap(), "content-length").is_none());
}

#[test]
fn tools_list_over_sse_is_narrowed_too() {
    let mut r = rig!("when_needed", Value::Null, filter_tools_list);
    let s = list_request(&mut r);
    assert_eq!(
        respond(&mut r, s, "text/event-stream", &[]),
        Action::Continue
    );
    r.vm.response_body(
        s,
        b"event: message\ndata: {\"jsonrpc\":\"2.0\",\"id\":2,",
        false,
    )
    .unwrap();
    r.vm.response_body(
        s,
        b"\"result\":{\"tools\":[{\"name\":\"get_ticket\"},{\"name\":\"delete_customer\"}]}}\n\n",
        true,
    )
    .unwrap();
    let (status, body) = downstream(&r, s);
    assert_eq!(status.as_deref(), Some("200"));
    assert!(
        body.starts_with("event: message\ndata: ")
            && body.contains("get_ticket")
            && !body.contains("delete_customer"),
        "{body}"
    );
}

#[test]
fn tools_list_that_cannot_be_parsed_is_refused_not_passed_unfiltered() {
    let mut r = rig!("when_needed", Value::Null, filter_tools_list);
    let s = list_request(&mut r);
    respond(&mut r, s, "text/event-stream", &[]);
    // Cut short: no blank line ends the event.
    r.vm.response_body(s, b"event: message\ndata: {\"jsonrpc\":\"2.0\",\"id\":2,\"result\":{\"tools\":[{\"name\":\"delete_customer\"}]}}\n", true).unwrap();
    // The headers went on before the body could be read: the event stream's one event is
    // replaced by the JSON-RPC error.
    let (status, body) = downstream(&r, s);
    assert_eq!(status.as_deref(), Some("200"));
    assert!(!body.contains("delete_customer"), "{body}");
    let data = body
        .strip_prefix("event: message\ndata: ")
        .and_then(|b| b.strip_suffix("\n\n"))
        .unwrap_or_else(|| panic!("{body}"));
    let v: Value = serde_json::from_str(data).unwrap();
    assert_eq!(v["error"]["code"], json!(-32603));
    assert_eq!(r.metric("mandate.mcp.tools_list.unfilterable"), 1);
    // A content type that is neither JSON nor an event stream: refused at once.
    let s = list_request(&mut r);
    respond(&mut r, s, "text/plain", &[]);
    r.vm.response_body(s, b"delete_customer", true).unwrap();
    let (status, body) = downstream(&r, s);
    assert_eq!(status.as_deref(), Some("502"));
    assert!(!body.contains("delete_customer"));
}

#[test]
fn body_path_call_is_minted_for_its_intent_and_forwarded_with_its_body() {
    let mut r = rig!("always", minter());
    // No 2026-07-28 headers: the tool is not known until the body, so the header phase mints
    // for the intent on this resource (no `tool`), and the body is judged after.
    let req = post(&r).intent("support.read");
    let get = call(json!(11), "get_ticket", json!({"ticket_id": "T-1"}));
    let (s, a, b) = send_with_body(&mut r, &req, &get);
    assert_eq!(
        (a, b),
        (Action::Pause, Some(Action::Pause)),
        "waiting on the exchange; the body is held by the host meanwhile"
    );
    assert!(r.vm.stream(s).upstream.headers.is_none());
    let c = r.one_mint_call();
    assert!(!form(&c).iter().any(|(k, _)| k == "tool"), "{:?}", form(&c));
    let token = mcp_token(&r, "jti-b", None, None);
    answer_token(&mut r, &c, &token);
    // Resumed: headers upstream with the credential, then the held body judged and forwarded.
    let fwd = r.forwarded(s);
    assert!(header(&fwd, "authorization").unwrap().ends_with(MINTED_SIG));
    assert_eq!(r.vm.stream(s).upstream.body, get);
    let recs = r.records();
    assert_eq!(recs.len(), 1);
    assert_eq!(recs[0]["mcp"]["path"], json!("body"));
    assert_eq!(recs[0]["mcp"]["tool"], json!("get_ticket"));
    assert_eq!(recs[0]["mcp"]["credential_scope"], json!("intent"));
    assert_eq!(recs[0]["effect"], json!("allow"));

    // The same intent-scoped credential (cached) cannot carry a tool the intent does not
    // name: the body is refused, never forwarded.
    let delete = call(json!(12), "delete_customer", json!({"customer_id": "C-1"}));
    let (s, a, b) = send_with_body(&mut r, &req, &delete);
    assert_eq!((a, b), (Action::Continue, Some(Action::Pause)));
    assert_eq!(refusal(&r, s).3, "tool_not_allowed");
    assert_eq!(r.records().len(), 2);
}

#[test]
fn body_path_with_headers_mints_for_the_header_tool_and_checks_the_body_against_it() {
    let mut r = rig!("always", minter());
    let req = tool_call(&r, "support.read", "get_ticket");
    let get = call(json!(13), "get_ticket", json!({"ticket_id": "T-1"}));
    let (s, a, _) = send_with_body(&mut r, &req, &get);
    assert_eq!(a, Action::Pause, "minting");
    let c = r.one_mint_call();
    assert!(form(&c).contains(&("tool".to_string(), "get_ticket".to_string())));
    let token = mcp_token(&r, "jti-h", None, Some("get_ticket"));
    answer_token(&mut r, &c, &token);
    assert_eq!(r.vm.stream(s).upstream.body, get);
    let rec = r.records().pop().unwrap();
    assert_eq!(rec["mcp"]["credential_scope"], json!("tool"));
    assert_eq!(rec["effect"], json!("allow"));
    // A body naming another tool than the one the credential was minted for: mismatch.
    let (s, a, b) = send_with_body(&mut r, &req, &call(json!(14), "delete_customer", json!({})));
    assert_eq!((a, b), (Action::Continue, Some(Action::Pause)));
    assert_eq!(refusal(&r, s).3, "mcp_header_mismatch");
    assert_eq!(r.records().len(), 2);
}

#[test]
fn stream_that_ends_while_its_body_is_awaited_is_on_the_record_once() {
    let mut r = rig!("always", Value::Null);
    let req = post(&r).intent("support.read");
    let s = open(&mut r, &req, Action::Continue);
    body(&mut r, s, b"{\"jsonrpc\":", false);
    r.vm.finish_stream(s).unwrap();
    let recs = r.records();
    assert_eq!(recs.len(), 1);
    assert_eq!(
        (recs[0]["effect"].clone(), recs[0]["reason"].clone()),
        (json!("deny"), json!("mcp_malformed"))
    );
}
