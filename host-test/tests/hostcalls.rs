//! Hostcall families exercised with small WAT modules.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use mandate_host_test::abi::serialize_map;
use mandate_host_test::{
    header_value, run_request, Action, CalloutReply, ConfigRejected, Host, LogLevel, RequestSpec,
    Verdict,
};

const IMPORTS: &str = r#"
  (import "env" "proxy_log" (func $log (param i32 i32 i32) (result i32)))
  (import "env" "proxy_get_log_level" (func $get_log_level (param i32) (result i32)))
  (import "env" "proxy_get_header_map_value" (func $get_hv (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_add_header_map_value" (func $add_hv (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_replace_header_map_value" (func $replace_hv (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_remove_header_map_value" (func $remove_hv (param i32 i32 i32) (result i32)))
  (import "env" "proxy_get_header_map_pairs" (func $get_pairs (param i32 i32 i32) (result i32)))
  (import "env" "proxy_set_header_map_pairs" (func $set_pairs (param i32 i32 i32) (result i32)))
  (import "env" "proxy_send_local_response" (func $send_local (param i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_http_call" (func $http_call (param i32 i32 i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_continue_stream" (func $continue (param i32) (result i32)))
  (import "env" "proxy_set_effective_context" (func $set_eff (param i32) (result i32)))
  (import "env" "proxy_get_status" (func $get_status (param i32 i32 i32) (result i32)))
  (import "env" "proxy_get_property" (func $get_prop (param i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_set_property" (func $set_prop (param i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_get_shared_data" (func $get_sd (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_set_shared_data" (func $set_sd (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_define_metric" (func $def_metric (param i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_increment_metric" (func $inc_metric (param i32 i64) (result i32)))
  (import "env" "proxy_record_metric" (func $rec_metric (param i32 i64) (result i32)))
  (import "env" "proxy_get_metric" (func $get_metric (param i32 i32) (result i32)))
  (import "env" "proxy_get_buffer_bytes" (func $get_buf (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_set_buffer_bytes" (func $set_buf (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_set_tick_period_milliseconds" (func $set_tick (param i32) (result i32)))
  (import "env" "proxy_get_current_time_nanoseconds" (func $now (param i32) (result i32)))
  (import "env" "proxy_register_shared_queue" (func $reg_q (param i32 i32 i32) (result i32)))
  (import "env" "proxy_resolve_shared_queue" (func $resolve_q (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_enqueue_shared_queue" (func $enq (param i32 i32 i32) (result i32)))
  (import "env" "proxy_dequeue_shared_queue" (func $deq (param i32 i32 i32) (result i32)))
  (import "env" "proxy_done" (func $done (result i32)))
  (import "wasi_snapshot_preview1" "clock_time_get" (func $clock_time_get (param i32 i64 i32) (result i32)))
  (import "wasi_snapshot_preview1" "random_get" (func $random_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))
"#;

const PRELUDE: &str = r#"
  (memory (export "memory") 2)
  (global $bump (mut i32) (i32.const 65536))
  (func (export "proxy_on_memory_allocate") (param $n i32) (result i32) (local $p i32)
    (local.set $p (global.get $bump))
    (global.set $bump (i32.add (global.get $bump) (local.get $n)))
    (local.get $p))
"#;

/// A WAT string literal for arbitrary bytes.
fn lit(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("\\{b:02x}")).collect()
}

/// A module: the standard imports, memory and allocator, data segments at
/// fixed offsets, then `body`.
fn module(data: &[(u32, &[u8])], body: &str) -> Vec<u8> {
    let segments: String = data
        .iter()
        .map(|(at, bytes)| format!("(data (i32.const {at}) \"{}\")\n", lit(bytes)))
        .collect();
    format!("(module {IMPORTS} {PRELUDE} {segments} {body})").into_bytes()
}

fn iov(ptr: u32, len: u32) -> Vec<u8> {
    [ptr.to_le_bytes(), len.to_le_bytes()].concat()
}

fn map(pairs: &[(&str, &str)]) -> Vec<u8> {
    serialize_map(
        &pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
            .collect::<Vec<_>>(),
    )
}

fn messages(vm: &mandate_host_test::Vm) -> Vec<(LogLevel, String)> {
    vm.logs()
        .into_iter()
        .map(|l| (l.level, l.message))
        .collect()
}

#[test]
fn logs_log_level_and_std_streams() {
    let stdout_iov = iov(1200, 18);
    let stderr_iov = iov(1400, 6);
    let wasm = module(
        &[
            (1024, b"configured"),
            (1100, &stdout_iov),
            (1200, b"hello from stdout\n"),
            (1300, &stderr_iov),
            (1400, b"oops\nx"),
        ],
        r#"
        (func (export "proxy_on_configure") (param i32 i32) (result i32)
          (drop (call $log (i32.const 2) (i32.const 1024) (i32.const 10)))
          (drop (call $log (i32.const 0) (i32.const 1024) (i32.const 10)))
          (drop (call $fd_write (i32.const 1) (i32.const 1100) (i32.const 1) (i32.const 8)))
          (drop (call $fd_write (i32.const 2) (i32.const 1300) (i32.const 1) (i32.const 8)))
          (i32.const 1))
        (func (export "level") (result i32)
          (drop (call $get_log_level (i32.const 16)))
          (i32.load (i32.const 16)))
        (func (export "bad_level") (result i32)
          (call $log (i32.const 9) (i32.const 1024) (i32.const 10)))
        "#,
    );
    let host = Host::from_bytes(&wasm).unwrap();
    let mut vm = host.new_vm(b"", b"").unwrap();
    assert_eq!(
        messages(&vm),
        vec![
            (LogLevel::Info, "configured".into()),
            (LogLevel::Trace, "configured".into()),
            (LogLevel::Info, "hello from stdout".into()),
            (LogLevel::Error, "oops".into()),
            (LogLevel::Error, "x".into()),
        ]
    );
    assert_eq!(vm.logs()[2].source, "stdout");
    assert_eq!(vm.call("level", 1, &[]).unwrap(), Some(0));
    assert_eq!(vm.call("bad_level", 1, &[]).unwrap(), Some(2));
    assert_eq!(vm.take_logs().len(), 5);
    assert!(vm.logs().is_empty());

    let quiet = host.fresh().unwrap();
    quiet.set_log_level(LogLevel::Info);
    let mut vm = quiet.new_vm(b"", b"").unwrap();
    assert_eq!(vm.call("level", 1, &[]).unwrap(), Some(2));
    assert!(!messages(&vm).contains(&(LogLevel::Trace, "configured".into())));
    assert!(vm.logged("hello from stdout"));
}

#[test]
fn header_maps_with_binary_values() {
    let wasm = module(
        &[
            (1024, b"x-bin"),
            (1040, b"x-copy"),
            (1056, b":path"),
            (1072, b"/new"),
            (1088, b"x-remove"),
            (1104, b"x-missing"),
            (1120, b"X-DUP"),
        ],
        r#"
        (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
          (if (i32.ne (call $get_hv (i32.const 0) (i32.const 1024) (i32.const 5) (i32.const 16) (i32.const 20)) (i32.const 0))
            (then unreachable))
          (drop (call $add_hv (i32.const 0) (i32.const 1040) (i32.const 6) (i32.load (i32.const 16)) (i32.load (i32.const 20))))
          (drop (call $replace_hv (i32.const 0) (i32.const 1056) (i32.const 5) (i32.const 1072) (i32.const 4)))
          (drop (call $remove_hv (i32.const 0) (i32.const 1088) (i32.const 8)))
          (drop (call $replace_hv (i32.const 0) (i32.const 1120) (i32.const 5) (i32.const 1072) (i32.const 4)))
          (i32.const 0))
        (func (export "missing") (result i32)
          (call $get_hv (i32.const 0) (i32.const 1104) (i32.const 9) (i32.const 16) (i32.const 20)))
        (func (export "resp_in_req") (result i32)
          (call $get_pairs (i32.const 2) (i32.const 16) (i32.const 20)))
        (func (export "roundtrip") (result i32)
          (drop (call $get_pairs (i32.const 0) (i32.const 16) (i32.const 20)))
          (call $set_pairs (i32.const 0) (i32.load (i32.const 16)) (i32.load (i32.const 20))))
        "#,
    );
    let host = Host::from_bytes(&wasm).unwrap();
    let mut vm = host.new_vm(b"", b"").unwrap();
    let s = vm.new_stream().unwrap();
    let bin: &[u8] = &[0xff, 0xfe, 0x80];
    let headers: Vec<(&str, &[u8])> = vec![
        (":path", b"/old"),
        ("X-Bin", bin),
        ("x-remove", b"a"),
        ("x-remove", b"b"),
        ("x-dup", b"1"),
        ("x-dup", b"2"),
    ];
    let a = vm.request_headers(s, headers, true).unwrap();
    assert_eq!(a, Action::Continue);
    let st = vm.stream(s);
    assert_eq!(st.upstream_header("x-copy").unwrap(), bin);
    assert_eq!(st.upstream_header(":path").unwrap(), b"/new");
    assert_eq!(st.upstream_header("x-remove"), None);
    assert_eq!(st.upstream_header("x-dup").unwrap(), b"/new");
    assert_eq!(
        st.upstream
            .headers
            .as_ref()
            .unwrap()
            .iter()
            .filter(|(k, _)| k == "x-dup")
            .count(),
        1
    );
    let ctx = s.0;
    assert_eq!(vm.call("missing", ctx, &[]).unwrap(), Some(1), "NotFound");
    assert_eq!(
        vm.call("resp_in_req", ctx, &[]).unwrap(),
        Some(2),
        "BadArgument"
    );
    assert_eq!(vm.call("roundtrip", ctx, &[]).unwrap(), Some(0));
    assert_eq!(vm.stream(s).request_headers, vm.stream(s).upstream.headers);
    assert!(vm
        .warnings()
        .iter()
        .any(|w| w.contains("after they were forwarded upstream")));
    assert_eq!(
        vm.call("missing", 1, &[]).unwrap(),
        Some(2),
        "no request map on the root context"
    );
}

#[test]
fn local_response_passes_back_through_the_filter() {
    let why = map(&[("x-why", "jwt")]);
    let body = format!(
        r#"
        (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
          (if (i32.eqz (call $get_hv (i32.const 0) (i32.const 1200) (i32.const 13) (i32.const 16) (i32.const 20)))
            (then (return (i32.const 0))))
          (drop (call $send_local (i32.const 403) (i32.const 1024) (i32.const 6) (i32.const 1040) (i32.const 2)
                                  (i32.const 1056) (i32.const {}) (i32.const -1)))
          (i32.const 1))
        (func (export "proxy_on_response_headers") (param i32 i32 i32) (result i32)
          (drop (call $add_hv (i32.const 2) (i32.const 1300) (i32.const 8) (i32.const 1320) (i32.const 4)))
          (i32.const 0))
        (func (export "again") (result i32)
          (call $send_local (i32.const 500) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const -1)))
        "#,
        why.len()
    );
    let wasm = module(
        &[
            (1024, b"denied"),
            (1040, b"no"),
            (1056, &why),
            (1200, b"authorization"),
            (1300, b"x-filter"),
            (1320, b"seen"),
        ],
        &body,
    );
    let host = Host::from_bytes(&wasm).unwrap();
    let mut vm = host.new_vm(b"", b"").unwrap();

    let out = run_request(&host, &mut vm, &RequestSpec::get("/x")).unwrap();
    assert_eq!(out.verdict, Verdict::LocalReply);
    let lr = out.local_reply.clone().unwrap();
    assert_eq!(
        (lr.status, lr.details.as_str(), lr.body.as_str()),
        (403, "denied", "no")
    );
    assert_eq!(lr.headers, vec![("x-why".to_string(), "jwt".to_string())]);
    assert!(out.upstream_request.is_none());
    let resp = out.response.unwrap();
    assert!(resp.headers.contains(&(":status".into(), "403".into())));
    assert!(resp.headers.contains(&("x-why".into(), "jwt".into())));
    assert!(resp.headers.contains(&("x-filter".into(), "seen".into())));
    assert_eq!(resp.body, "no");

    let spec: RequestSpec =
        serde_json::from_str(r#"{"path":"/x","headers":[["Authorization","Bearer x"]]}"#).unwrap();
    let out = run_request(&host, &mut vm, &spec).unwrap();
    assert_eq!(out.verdict, Verdict::Forwarded);
    let up = out.upstream_request.unwrap();
    for (k, v) in [
        (":method", "GET"),
        (":path", "/x"),
        (":authority", "example.com"),
        (":scheme", "http"),
    ] {
        assert!(up.headers.contains(&(k.to_string(), v.to_string())), "{k}");
    }
    assert!(up.headers.iter().any(|(k, _)| k == "x-request-id"));
    assert!(out
        .response
        .unwrap()
        .headers
        .contains(&("x-filter".into(), "seen".into())));

    // A second local response on one stream is recorded and flagged.
    let s = vm.new_stream().unwrap();
    vm.request_headers(s, [(":path", "/")], true).unwrap();
    assert_eq!(vm.stream(s).local_response.as_ref().unwrap().status, 403);
    assert_eq!(vm.call("again", s.0, &[]).unwrap(), Some(0));
    assert_eq!(vm.stream(s).local_response_calls, 2);
    assert_eq!(vm.stream(s).local_response.as_ref().unwrap().status, 403);
    assert!(vm.warnings().iter().any(|w| w.contains("called 2 times")));
    assert!(
        vm.request_body(s, b"x", true).is_err(),
        "stream already answered"
    );
}

fn callout_module() -> Vec<u8> {
    let call_headers = map(&[
        (":method", "GET"),
        (":path", "/check"),
        (":authority", "authz"),
    ]);
    let bad_headers = map(&[(":method", "GET"), (":path", "/check")]);
    let body = format!(
        r#"
        (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
          (drop (call $http_call (i32.const 1024) (i32.const 5) (i32.const 1040) (i32.const {hl})
                                 (i32.const 1500) (i32.const 4) (i32.const 0) (i32.const 0) (i32.const 500) (i32.const 24)))
          (i32.const 1))
        (func (export "proxy_on_http_call_response") (param $ctx i32) (param $token i32) (param $nh i32) (param $bs i32) (param $nt i32)
          (if (i32.ne (call $set_eff (local.get $ctx)) (i32.const 0)) (then unreachable))
          (if (i32.eqz (local.get $nh)) (then
            (drop (call $send_local (i32.const 503) (i32.const 1232) (i32.const 11) (i32.const 0) (i32.const 0)
                                    (i32.const 0) (i32.const 0) (i32.const -1)))
            (return)))
          (drop (call $get_buf (i32.const 4) (i32.const 0) (local.get $bs) (i32.const 16) (i32.const 20)))
          (drop (call $log (i32.const 2) (i32.load (i32.const 16)) (i32.load (i32.const 20))))
          (drop (call $get_hv (i32.const 6) (i32.const 1400) (i32.const 7) (i32.const 16) (i32.const 20)))
          (drop (call $log (i32.const 2) (i32.load (i32.const 16)) (i32.load (i32.const 20))))
          (drop (call $add_hv (i32.const 0) (i32.const 1200) (i32.const 7) (i32.const 1216) (i32.const 2)))
          (drop (call $continue (i32.const 0))))
        (func (export "call_unknown") (result i32)
          (call $http_call (i32.const 1300) (i32.const 4) (i32.const 1040) (i32.const {hl})
                           (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 500) (i32.const 24)))
        (func (export "call_no_authority") (result i32)
          (call $http_call (i32.const 1024) (i32.const 5) (i32.const 1600) (i32.const {bl})
                           (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 500) (i32.const 24)))
        (func (export "status_code") (result i32)
          (drop (call $get_status (i32.const 32) (i32.const 16) (i32.const 20)))
          (i32.load (i32.const 32)))
        "#,
        hl = call_headers.len(),
        bl = bad_headers.len(),
    );
    module(
        &[
            (1024, b"authz"),
            (1040, &call_headers),
            (1200, b"x-authz"),
            (1216, b"ok"),
            (1232, b"unavailable"),
            (1300, b"nope"),
            (1400, b":status"),
            (1500, b"ping"),
            (1600, &bad_headers),
        ],
        &body,
    )
}

#[test]
fn http_call_response_failure_and_timeout() {
    let host = Host::from_bytes(&callout_module()).unwrap();
    host.add_upstream("authz");
    let mut vm = host.new_vm(b"", b"").unwrap();

    // Answered: the response is read on the stream's context, which continues.
    let s = vm.new_stream().unwrap();
    assert_eq!(
        vm.request_headers(s, [(":path", "/a")], true).unwrap(),
        Action::Pause
    );
    assert!(vm.stream(s).request_paused);
    assert!(vm.stream(s).upstream.headers.is_none());
    let calls = vm.pending_calls();
    assert_eq!(calls.len(), 1);
    let c = &calls[0];
    assert_eq!(
        (c.upstream.as_str(), c.timeout_ms, c.context_id),
        ("authz", 500, s.0)
    );
    assert_eq!(c.header(":authority").unwrap(), b"authz");
    assert_eq!(c.body, b"ping");
    vm.answer_call(c.token, CalloutReply::ok(200, &[("x-a", "1")], "allowed"))
        .unwrap();
    assert!(vm.logged("allowed"));
    assert!(vm.logged("200"));
    let st = vm.stream(s);
    assert!(!st.request_paused);
    assert_eq!(st.upstream_header("x-authz").unwrap(), b"ok");
    assert_eq!(st.request_continues, 1);
    assert!(vm.pending_calls().is_empty());
    assert!(
        vm.answer_call(c.token, CalloutReply::Failure).is_err(),
        "already answered"
    );

    // Failure: 0 headers, the filter answers 503.
    let s = vm.new_stream().unwrap();
    vm.request_headers(s, [(":path", "/b")], true).unwrap();
    let token = vm.pending_calls_for(s)[0].token;
    vm.answer_call(token, CalloutReply::Failure).unwrap();
    assert_eq!(vm.stream(s).local_response.as_ref().unwrap().status, 503);
    assert!(vm.stream(s).upstream.headers.is_none());

    // Timeout by the clock: past the deadline the host answers as Envoy's async client
    // does, with its own 504 response.
    let s = vm.new_stream().unwrap();
    vm.request_headers(s, [(":path", "/c")], true).unwrap();
    vm.advance(Duration::from_millis(499)).unwrap();
    assert_eq!(vm.pending_calls().len(), 1);
    vm.advance(Duration::from_millis(1)).unwrap();
    assert!(vm.pending_calls().is_empty());
    assert!(vm.logged("504"), "{:?}", vm.logs());

    // Unknown cluster and missing :authority: BadArgument, like Envoy.
    assert_eq!(vm.call("call_unknown", 1, &[]).unwrap(), Some(2));
    assert_eq!(vm.call("call_no_authority", 1, &[]).unwrap(), Some(2));
    assert!(vm
        .warnings()
        .iter()
        .any(|w| w.contains("unknown upstream cluster \"nope\"")));

    // Finishing a stream cancels its outstanding calls.
    let s = vm.new_stream().unwrap();
    vm.request_headers(s, [(":path", "/d")], true).unwrap();
    let token = vm.pending_calls_for(s)[0].token;
    vm.finish_stream(s).unwrap();
    assert!(vm.answer_call(token, CalloutReply::Timeout).is_err());
    assert!(vm.stream(s).finished);
}

#[test]
fn run_request_scripts_callouts() {
    let host = Host::from_bytes(&callout_module()).unwrap();
    let mut vm = host.new_vm(b"", b"").unwrap();
    let spec: RequestSpec = serde_json::from_str(
        r#"{"path":"/a","upstreams":["authz"],
            "callouts":[{"status":200,"headers":[["x-a","1"]],"body":"allowed"}]}"#,
    )
    .unwrap();
    let out = run_request(&host, &mut vm, &spec).unwrap();
    assert_eq!(out.verdict, Verdict::Forwarded);
    assert_eq!(out.callouts.len(), 1);
    assert_eq!(out.callouts[0].reply, "status 200");
    assert_eq!(out.callouts[0].upstream, "authz");
    let json = serde_json::to_value(&out).unwrap();
    assert_eq!(json["verdict"], "forwarded");
    assert!(json["upstream_request"]["headers"]
        .as_array()
        .unwrap()
        .iter()
        .any(|h| h[0] == "x-authz" && h[1] == "ok"));

    let spec: RequestSpec = serde_json::from_str(r#"{"callouts":[{"error":"timeout"}]}"#).unwrap();
    let out = run_request(&host, &mut vm, &spec).unwrap();
    assert_eq!(out.verdict, Verdict::LocalReply);
    assert_eq!(out.local_reply.unwrap().status, 503);

    let out = run_request(&host, &mut vm, &RequestSpec::get("/")).unwrap();
    assert_eq!(out.verdict, Verdict::Paused);
    assert_eq!(out.callouts[0].reply, "unanswered");
}

#[test]
fn properties_by_segment_path() {
    let wasm = module(
        &[
            (1024, b"source\0address"),
            (1100, b"my\0prop"),
            (1120, b"v"),
            (1200, b"request\0headers\0x-a"),
        ],
        r#"
        (func $get_and_log (param $p i32) (param $l i32) (result i32) (local $r i32)
          (local.set $r (call $get_prop (local.get $p) (local.get $l) (i32.const 16) (i32.const 20)))
          (if (i32.eqz (local.get $r))
            (then (drop (call $log (i32.const 2) (i32.load (i32.const 16)) (i32.load (i32.const 20))))))
          (local.get $r))
        (func (export "get_src") (result i32) (call $get_and_log (i32.const 1024) (i32.const 14)))
        (func (export "get_my") (result i32) (call $get_and_log (i32.const 1100) (i32.const 7)))
        (func (export "get_hdr") (result i32) (call $get_and_log (i32.const 1200) (i32.const 19)))
        (func (export "set_my") (result i32) (call $set_prop (i32.const 1100) (i32.const 7) (i32.const 1120) (i32.const 1)))
        "#,
    );
    let host = Host::from_bytes(&wasm).unwrap();
    let mut vm = host.new_vm(b"", b"").unwrap();
    assert_eq!(vm.call("get_src", 1, &[]).unwrap(), Some(1));
    host.set_property(&["source", "address"], b"10.1.2.3:80");
    assert_eq!(vm.call("get_src", 1, &[]).unwrap(), Some(0));
    assert!(vm.logged("10.1.2.3:80"));

    let s = vm.new_stream().unwrap();
    vm.request_headers(s, [("x-a", "hdr-value")], true).unwrap();
    assert_eq!(vm.call("get_hdr", s.0, &[]).unwrap(), Some(0));
    assert!(vm.logged("hdr-value"));
    assert_eq!(vm.call("get_my", s.0, &[]).unwrap(), Some(1));
    assert_eq!(vm.call("set_my", s.0, &[]).unwrap(), Some(0));
    assert_eq!(vm.stream_property(s, &["my", "prop"]).unwrap(), b"v");
    assert_eq!(vm.call("get_my", s.0, &[]).unwrap(), Some(0));
    assert_eq!(
        vm.call("get_my", 1, &[]).unwrap(),
        Some(1),
        "stream property is not on the root"
    );
    vm.set_stream_property(s, &["source", "address"], b"stream-level")
        .unwrap();
    vm.call("get_src", s.0, &[]).unwrap();
    assert!(vm.logged("stream-level"));
}

#[test]
fn shared_data_cas_across_vms() {
    let wasm = module(
        &[(1024, b"k"), (1040, b"v1"), (1050, b"v2")],
        r#"
        (func (export "set1") (param $cas i32) (result i32)
          (call $set_sd (i32.const 1024) (i32.const 1) (i32.const 1040) (i32.const 2) (local.get $cas)))
        (func (export "set2") (param $cas i32) (result i32)
          (call $set_sd (i32.const 1024) (i32.const 1) (i32.const 1050) (i32.const 2) (local.get $cas)))
        (func (export "get") (result i32) (local $r i32)
          (local.set $r (call $get_sd (i32.const 1024) (i32.const 1) (i32.const 16) (i32.const 20) (i32.const 24)))
          (if (i32.eqz (local.get $r)) (then (return (i32.load (i32.const 24)))))
          (i32.sub (i32.const 0) (local.get $r)))
        "#,
    );
    let host = Host::from_bytes(&wasm).unwrap();
    let mut w1 = host.new_vm(b"", b"").unwrap();
    let mut w2 = host.new_vm(b"", b"").unwrap();
    assert_eq!(w2.call("get", 1, &[]).unwrap(), Some(-1), "NotFound");
    assert_eq!(w1.call("set1", 1, &[0]).unwrap(), Some(0));
    let cas = w2.call("get", 1, &[]).unwrap().unwrap();
    assert!(cas > 0);
    assert_eq!(w2.call("set2", 1, &[cas]).unwrap(), Some(0));
    assert_eq!(w1.call("set1", 1, &[cas]).unwrap(), Some(8), "CasMismatch");
    let (value, new_cas) = host.shared_data("k").unwrap();
    assert_eq!(value, b"v2");
    assert_ne!(new_cas as i32, cas);
    assert_eq!(w1.call("get", 1, &[]).unwrap(), Some(new_cas as i32));
    assert_eq!(
        w1.call("set1", 1, &[0]).unwrap(),
        Some(0),
        "cas 0 always writes"
    );
    let other = host.fresh().unwrap();
    assert!(other.shared_data("k").is_none());
}

#[test]
fn metrics_counter_gauge_histogram() {
    let wasm = module(
        &[(1024, b"reqs"), (1040, b"inflight"), (1060, b"latency")],
        r#"
        (global $c (mut i32) (i32.const 0))
        (global $g (mut i32) (i32.const 0))
        (global $h (mut i32) (i32.const 0))
        (func (export "setup") (result i32)
          (drop (call $def_metric (i32.const 0) (i32.const 1024) (i32.const 4) (i32.const 24)))
          (global.set $c (i32.load (i32.const 24)))
          (drop (call $def_metric (i32.const 1) (i32.const 1040) (i32.const 8) (i32.const 24)))
          (global.set $g (i32.load (i32.const 24)))
          (drop (call $def_metric (i32.const 2) (i32.const 1060) (i32.const 7) (i32.const 24)))
          (global.set $h (i32.load (i32.const 24)))
          (drop (call $inc_metric (global.get $c) (i64.const 2)))
          (drop (call $inc_metric (global.get $g) (i64.const -3)))
          (drop (call $rec_metric (global.get $h) (i64.const 42)))
          (drop (call $rec_metric (global.get $h) (i64.const 7)))
          (drop (call $get_metric (global.get $c) (i32.const 32)))
          (i32.wrap_i64 (i64.load (i32.const 32))))
        (func (export "dec_counter") (result i32) (call $inc_metric (global.get $c) (i64.const -1)))
        (func (export "bad_id") (result i32) (call $inc_metric (i32.const 999) (i64.const 1)))
        (func (export "bad_type") (result i32) (call $def_metric (i32.const 7) (i32.const 1024) (i32.const 4) (i32.const 24)))
        (func (export "redefine_as_gauge") (result i32) (call $def_metric (i32.const 1) (i32.const 1024) (i32.const 4) (i32.const 24)))
        "#,
    );
    let host = Host::from_bytes(&wasm).unwrap();
    let mut vm = host.new_vm(b"", b"").unwrap();
    assert_eq!(vm.call("setup", 1, &[]).unwrap(), Some(2));
    assert_eq!(vm.metric("reqs"), Some(2));
    assert_eq!(vm.metric("inflight"), Some(-3));
    assert_eq!(host.histogram("latency"), Some(vec![42, 7]));
    assert_eq!(vm.call("dec_counter", 1, &[]).unwrap(), Some(2));
    assert_eq!(vm.call("bad_id", 1, &[]).unwrap(), Some(1));
    assert_eq!(vm.call("bad_type", 1, &[]).unwrap(), Some(2));
    assert_eq!(vm.call("redefine_as_gauge", 1, &[]).unwrap(), Some(2));
    // A second worker defining the same name shares the stat.
    let mut w2 = host.new_vm(b"", b"").unwrap();
    w2.call("setup", 1, &[]).unwrap();
    assert_eq!(host.metric("reqs"), Some(4));
    let json = serde_json::to_value(host.metrics()).unwrap();
    assert_eq!(json["reqs"], 4);
    assert_eq!(json["latency"], serde_json::json!([42, 7, 42, 7]));
}

#[test]
fn ticks_follow_the_clock_and_wasi_reads_it() {
    let wasm = module(
        &[],
        r#"
        (global $ticks (mut i32) (i32.const 0))
        (func (export "proxy_on_configure") (param i32 i32) (result i32)
          (drop (call $set_tick (i32.const 1000)))
          (i32.const 1))
        (func (export "proxy_on_tick") (param i32)
          (global.set $ticks (i32.add (global.get $ticks) (i32.const 1))))
        (func (export "ticks") (result i32) (global.get $ticks))
        (func (export "clocks") (result i32)
          (drop (call $clock_time_get (i32.const 0) (i64.const 1) (i32.const 32)))
          (drop (call $clock_time_get (i32.const 1) (i64.const 1) (i32.const 40)))
          (drop (call $now (i32.const 48)))
          (call $clock_time_get (i32.const 2) (i64.const 1) (i32.const 56)))
        (func (export "rand") (result i32) (call $random_get (i32.const 64) (i32.const 16)))
        "#,
    );
    let host = Host::from_bytes(&wasm).unwrap();
    host.set_time_secs(1_700_000_000);
    let mut vm = host.new_vm(b"", b"").unwrap();
    assert_eq!(vm.tick_period_ms(), 1000);

    let read_u64 = |vm: &mut mandate_host_test::Vm, at: u32| {
        u64::from_le_bytes(vm.read_memory(at, 8).unwrap().try_into().unwrap())
    };
    assert_eq!(
        vm.call("clocks", 1, &[]).unwrap(),
        Some(58),
        "other clocks: NOTSUP"
    );
    assert_eq!(read_u64(&mut vm, 32), 1_700_000_000_000_000_000);
    assert_eq!(read_u64(&mut vm, 48), 1_700_000_000_000_000_000);
    let mono = read_u64(&mut vm, 40);

    assert_eq!(vm.tick().unwrap(), 0);
    assert_eq!(vm.advance(Duration::from_millis(999)).unwrap(), 0);
    assert_eq!(vm.advance(Duration::from_millis(1)).unwrap(), 1);
    assert_eq!(vm.advance(Duration::from_secs(3)).unwrap(), 3);
    assert_eq!(vm.call("ticks", 1, &[]).unwrap(), Some(4));
    vm.force_tick().unwrap();
    assert_eq!(vm.call("ticks", 1, &[]).unwrap(), Some(5));

    vm.call("clocks", 1, &[]).unwrap();
    assert_eq!(read_u64(&mut vm, 32), 1_700_000_004_000_000_000);
    assert_eq!(read_u64(&mut vm, 40), mono + 4_000_000_000);
    host.set_time_secs(1_600_000_000);
    vm.call("clocks", 1, &[]).unwrap();
    assert_eq!(read_u64(&mut vm, 32), 1_600_000_000_000_000_000);
    assert_eq!(
        read_u64(&mut vm, 40),
        mono + 4_000_000_000,
        "monotonic does not jump back"
    );

    // Seeded random_get is deterministic.
    let draw = |seed: u64| {
        let h = host.fresh().unwrap();
        h.set_random_seed(seed);
        let mut vm = h.new_vm(b"", b"").unwrap();
        assert_eq!(vm.call("rand", 1, &[]).unwrap(), Some(0));
        vm.read_memory(64, 16).unwrap()
    };
    assert_eq!(draw(7), draw(7));
    assert_ne!(draw(7), draw(8));
}

#[test]
fn unimplemented_import_fails_by_name() {
    let wasm = br#"(module
        (import "env" "proxy_grpc_call" (func $g (param i32 i32 i32 i32 i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
        (import "env" "made_up_call" (func $m (param i32)))
        (memory (export "memory") 1)
        (func (export "proxy_on_configure") (param i32 i32) (result i32)
          (call $m (i32.const 1))
          (i32.const 1)))"#;
    let host = Host::from_bytes(wasm).unwrap();
    assert_eq!(
        host.unimplemented_imports(),
        ["env.proxy_grpc_call", "env.made_up_call"]
    );
    let err = host.new_vm(b"", b"").err().unwrap().to_string();
    assert!(
        err.contains("unimplemented hostcall: env.made_up_call"),
        "{err}"
    );
    assert_eq!(host.unimplemented_calls(), ["env.made_up_call"]);
}

#[test]
fn trap_reports_backtrace_and_breaks_the_vm() {
    let wasm = module(
        &[
            (1100, &iov(1200, 28)),
            (1200, b"panicked at src/lib.rs:1:1:\n"),
        ],
        r#"
        (func $boom
          (drop (call $fd_write (i32.const 2) (i32.const 1100) (i32.const 1) (i32.const 8)))
          unreachable)
        (func $middle (call $boom))
        (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
          (call $middle)
          (i32.const 0))
        "#,
    );
    let host = Host::from_bytes(&wasm).unwrap();
    let mut vm = host.new_vm(b"", b"").unwrap();
    let s = vm.new_stream().unwrap();
    let err = vm
        .request_headers(s, [(":path", "/")], true)
        .unwrap_err()
        .to_string();
    assert!(err.contains("proxy_on_request_headers"), "{err}");
    assert!(err.contains("unreachable"), "{err}");
    assert!(err.contains("wasm backtrace"), "{err}");
    assert!(err.contains("boom") && err.contains("middle"), "{err}");
    assert!(err.contains("panicked at src/lib.rs"), "{err}");
    assert!(vm.broken().is_some());
    assert!(vm
        .new_stream()
        .unwrap_err()
        .to_string()
        .contains("unusable"));
}

#[test]
fn configuration_buffers_and_rejection() {
    let wasm = module(
        &[(1024, b"reject")],
        r#"
        (func (export "proxy_on_vm_start") (param i32) (param $size i32) (result i32)
          (drop (call $get_buf (i32.const 6) (i32.const 0) (local.get $size) (i32.const 16) (i32.const 20)))
          (drop (call $log (i32.const 2) (i32.load (i32.const 16)) (i32.load (i32.const 20))))
          (i32.const 1))
        (func (export "proxy_on_configure") (param i32) (param $size i32) (result i32)
          (drop (call $get_buf (i32.const 7) (i32.const 0) (local.get $size) (i32.const 16) (i32.const 20)))
          (drop (call $log (i32.const 2) (i32.load (i32.const 16)) (i32.load (i32.const 20))))
          ;; reject when the config is exactly "reject"
          (i32.eqz (i32.and (i32.eq (local.get $size) (i32.const 6))
                            (i64.eq (i64.load32_u (i32.load (i32.const 16))) (i64.load32_u (i32.const 1024))))))
        (func (export "plugin_config_later") (result i32)
          (call $get_buf (i32.const 7) (i32.const 0) (i32.const 100) (i32.const 16) (i32.const 20)))
        "#,
    );
    let host = Host::from_bytes(&wasm).unwrap();
    let mut vm = host.new_vm(b"vm-conf", br#"{"a":1}"#).unwrap();
    assert!(vm.configured());
    assert!(vm.logged("vm-conf"));
    assert!(vm.logged(r#"{"a":1}"#));
    assert_eq!(
        vm.call("plugin_config_later", 1, &[]).unwrap(),
        Some(1),
        "NotFound outside on_configure"
    );
    assert!(!vm.configure(b"reject").unwrap());
    assert!(vm.configure(b"fine").unwrap());

    let err = host.new_vm(b"", b"reject").err().unwrap();
    let rej = err.downcast_ref::<ConfigRejected>().unwrap();
    assert_eq!(rej.stage, "proxy_on_configure");
    assert!(rej.logs.iter().any(|l| l.message == "reject"));
    let lenient = host.new_vm_lenient(b"", b"reject").unwrap();
    assert!(!lenient.configured());
}

#[test]
fn bodies_are_buffered_while_paused_and_replaceable() {
    let wasm = module(
        &[(1024, b"REPLACED")],
        r#"
        (func (export "proxy_on_request_body") (param $ctx i32) (param $size i32) (param $eos i32) (result i32)
          (if (i32.eqz (local.get $eos)) (then (return (i32.const 1))))
          (drop (call $get_buf (i32.const 0) (i32.const 0) (local.get $size) (i32.const 16) (i32.const 20)))
          (drop (call $log (i32.const 2) (i32.load (i32.const 16)) (i32.load (i32.const 20))))
          (drop (call $set_buf (i32.const 0) (i32.const 0) (local.get $size) (i32.const 1024) (i32.const 8)))
          (i32.const 0))
        (func (export "proxy_on_response_body") (param $ctx i32) (param $size i32) (param $eos i32) (result i32)
          ;; append
          (drop (call $set_buf (i32.const 1) (i32.const -1) (i32.const 0) (i32.const 1024) (i32.const 3)))
          (i32.const 0))
        "#,
    );
    let host = Host::from_bytes(&wasm).unwrap();
    let mut vm = host.new_vm(b"", b"").unwrap();
    let s = vm.new_stream().unwrap();
    assert_eq!(
        vm.request_headers(s, [(":path", "/")], false).unwrap(),
        Action::Continue
    );
    assert_eq!(vm.request_body(s, b"hello ", false).unwrap(), Action::Pause);
    assert_eq!(
        vm.request_body(s, b"world", true).unwrap(),
        Action::Continue
    );
    assert!(vm.logged("hello world"));
    assert_eq!(vm.stream(s).upstream.body, b"REPLACED");
    vm.response_headers(s, [(":status", "200")], false).unwrap();
    vm.response_body(s, b"body:", true).unwrap();
    assert_eq!(vm.stream(s).downstream.body, b"body:REP");
    vm.finish_stream(s).unwrap();
}

#[test]
fn body_is_held_from_a_filter_that_paused_its_headers() {
    // As in Envoy (StopAllIterationAndWatermark): after `Pause` from on_request_headers the
    // filter sees no body until it resumes the request; then it gets the buffered body.
    let call_headers = map(&[
        (":method", "GET"),
        (":path", "/check"),
        (":authority", "authz"),
    ]);
    let body = format!(
        r#"
        (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
          (drop (call $http_call (i32.const 1024) (i32.const 5) (i32.const 1040) (i32.const {hl})
                                 (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 500) (i32.const 24)))
          (i32.const 1))
        (func (export "proxy_on_http_call_response") (param $ctx i32) (param $token i32) (param $nh i32) (param $bs i32) (param $nt i32)
          (drop (call $set_eff (local.get $ctx)))
          (drop (call $continue (i32.const 0))))
        (func (export "proxy_on_request_body") (param $ctx i32) (param $size i32) (param $eos i32) (result i32)
          (drop (call $get_buf (i32.const 0) (i32.const 0) (local.get $size) (i32.const 16) (i32.const 20)))
          (drop (call $log (i32.const 2) (i32.load (i32.const 16)) (i32.load (i32.const 20))))
          (if (i32.eqz (local.get $eos)) (then (return (i32.const 1))))
          (i32.const 0))
        "#,
        hl = call_headers.len(),
    );
    let wasm = module(&[(1024, b"authz"), (1040, &call_headers)], &body);
    let host = Host::from_bytes(&wasm).unwrap();
    host.add_upstream("authz");
    let mut vm = host.new_vm(b"", b"").unwrap();
    let s = vm.new_stream().unwrap();
    assert_eq!(
        vm.request_headers(s, [(":path", "/")], false).unwrap(),
        Action::Pause
    );
    // The body arrives while the headers are paused: held by the host, not delivered.
    assert_eq!(vm.request_body(s, b"held ", false).unwrap(), Action::Pause);
    assert_eq!(vm.request_body(s, b"body", true).unwrap(), Action::Pause);
    assert!(!vm.logged("held"), "{:?}", vm.logs());
    assert!(vm.stream(s).upstream.headers.is_none());
    assert!(vm.stream(s).upstream.body.is_empty());
    // The filter resumes (from its callout answer): headers go upstream, then the filter
    // gets the whole buffered body, and its Continue forwards it.
    let token = vm.pending_calls_for(s)[0].token;
    vm.answer_call(
        token,
        CalloutReply::Response {
            headers: vec![(":status".into(), b"200".to_vec())],
            body: vec![],
            trailers: vec![],
        },
    )
    .unwrap();
    assert!(vm.logged("held body"), "{:?}", vm.logs());
    assert!(vm.stream(s).upstream.headers.is_some());
    assert_eq!(vm.stream(s).upstream.body, b"held body");
    assert!(!vm.stream(s).request_paused);

    // A filter that never resumes never sees the body (the deadlock Envoy shows).
    let wasm = module(
        &[],
        r#"(func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32) (i32.const 1))
           (func (export "proxy_on_request_body") (param i32 i32 i32) (result i32) unreachable)"#,
    );
    let host = Host::from_bytes(&wasm).unwrap();
    let mut vm = host.new_vm(b"", b"").unwrap();
    let s = vm.new_stream().unwrap();
    assert_eq!(
        vm.request_headers(s, [(":path", "/")], false).unwrap(),
        Action::Pause
    );
    assert_eq!(vm.request_body(s, b"x", true).unwrap(), Action::Pause);
    assert!(vm.stream(s).upstream.headers.is_none());
    assert!(vm.stream(s).request_paused);
    vm.finish_stream(s).unwrap();
}

#[test]
fn start_with_proc_exit_zero_is_fine() {
    let wasm = module(
        &[],
        r#"(func (export "_start") (call $proc_exit (i32.const 0)))
           (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32) (i32.const 0))"#,
    );
    let host = Host::from_bytes(&wasm).unwrap();
    let mut vm = host.new_vm(b"", b"").unwrap();
    let out = run_request(&host, &mut vm, &RequestSpec::get("/")).unwrap();
    assert_eq!(out.verdict, Verdict::Forwarded);
    assert_eq!(
        header_value(
            &vm.stream(vm.streams()[0]).upstream.headers.clone().unwrap(),
            ":method"
        )
        .unwrap(),
        b"GET"
    );
}

#[test]
fn cli_runs_a_request_and_flags_rejection() {
    let dir = std::env::temp_dir().join(format!("mandate-host-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let plugin = dir.join("p.wat");
    let wasm = module(
        &[(1200, b"authorization")],
        r#"
        (func (export "proxy_on_configure") (param i32 i32) (result i32) (i32.ne (local.get 1) (i32.const 0)))
        (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
          (if (i32.eqz (call $get_hv (i32.const 0) (i32.const 1200) (i32.const 13) (i32.const 16) (i32.const 20)))
            (then (return (i32.const 0))))
          (drop (call $send_local (i32.const 401) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const -1)))
          (i32.const 1))
        "#,
    );
    std::fs::write(&plugin, wasm).unwrap();
    let exe = env!("CARGO_BIN_EXE_mandate");
    let run = |config: &str, request: &str| {
        std::process::Command::new(exe)
            .args([
                "run",
                "--plugin",
                plugin.to_str().unwrap(),
                "--config",
                config,
                "--request",
                request,
            ])
            .output()
            .unwrap()
    };
    let out = run("{}", r#"{"headers":{"authorization":"Bearer x"}}"#);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["verdict"], "forwarded");
    let out = run("{}", "{}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["verdict"], "local_reply");
    assert_eq!(v["local_reply"]["status"], 401);
    let out = run("", "{}");
    assert_eq!(out.status.code(), Some(2));
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn shared_queue_notifies_the_registering_vm() {
    let wasm = module(
        &[(1024, b"jobs"), (1040, b"job-1")],
        r#"
        (func (export "register") (result i32)
          (drop (call $reg_q (i32.const 1024) (i32.const 4) (i32.const 24)))
          (i32.load (i32.const 24)))
        (func (export "push") (result i32)
          (if (i32.ne (call $resolve_q (i32.const 0) (i32.const 0) (i32.const 1024) (i32.const 4) (i32.const 24)) (i32.const 0))
            (then (return (i32.const -1))))
          (call $enq (i32.load (i32.const 24)) (i32.const 1040) (i32.const 5)))
        (func (export "proxy_on_queue_ready") (param i32) (param $q i32)
          (drop (call $deq (local.get $q) (i32.const 16) (i32.const 20)))
          (drop (call $log (i32.const 2) (i32.load (i32.const 16)) (i32.load (i32.const 20)))))
        (func (export "pop") (result i32) (call $deq (i32.const 1) (i32.const 16) (i32.const 20)))
        (func (export "proxy_on_done") (param i32) (result i32) (i32.const 0))
        (func (export "done_now") (result i32) (call $done))
        "#,
    );
    let host = Host::from_bytes(&wasm).unwrap();
    let mut owner = host.new_vm(b"", b"").unwrap();
    let mut other = host.new_vm(b"", b"").unwrap();
    assert_eq!(
        other.call("push", 1, &[]).unwrap(),
        Some(-1),
        "not registered yet"
    );
    assert_eq!(owner.call("register", 1, &[]).unwrap(), Some(1));
    assert_eq!(other.call("push", 1, &[]).unwrap(), Some(0));
    assert_eq!(host.queue_items("jobs").unwrap(), vec![b"job-1".to_vec()]);
    other.deliver_queue_ready().unwrap();
    assert!(
        !other.logged("job-1"),
        "only the registering VM is notified"
    );
    owner.tick().unwrap();
    assert!(owner.logged("job-1"));
    assert_eq!(owner.call("pop", 1, &[]).unwrap(), Some(7), "Empty");

    // proxy_on_done returning false defers on_log/on_delete until proxy_done.
    let s = owner.new_stream().unwrap();
    owner.finish_stream(s).unwrap();
    assert!(!owner.stream(s).finished);
    assert_eq!(
        owner.call("done_now", 1, &[]).unwrap(),
        Some(1),
        "root is not pending"
    );
    owner.call("done_now", s.0, &[]).unwrap();
    owner.force_tick().unwrap();
    assert!(owner.stream(s).finished);
}
