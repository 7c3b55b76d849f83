//! The `env.proxy_*` hostcalls of ABI 0.2.1.

use wasmtime::Linker;

use crate::abi::{self, BufferType, LogLevel, MapType, MetricType, Status, StreamType};
use crate::host::{Implemented, Metric, Queue};
use crate::mem::{give, read, write_u32, write_u64, C};
use crate::vm::{header_value, HttpCallout, LocalResponse, VmState};

type R = wasmtime::Result<i32>;

const OK: i32 = Status::Ok as i32;
const NOT_FOUND: i32 = Status::NotFound as i32;
const BAD_ARGUMENT: i32 = Status::BadArgument as i32;
const OOB: i32 = Status::InvalidMemoryAccess as i32;

/// Reads guest memory or returns INVALID_MEMORY_ACCESS from the hostcall.
macro_rules! rd {
    ($c:expr, $p:expr, $l:expr) => {
        match read($c, $p, $l) {
            Some(v) => v,
            None => return Ok(OOB),
        }
    };
}

pub(crate) fn define(
    linker: &mut Linker<VmState>,
    implemented: &mut Implemented,
) -> anyhow::Result<()> {
    // Each hostcall first consults the injected faults (`Host::fail_call`).
    macro_rules! def {
        ($name:literal, $f:ident ($($a:ident: $t:ty),*)) => {{
            linker
                .func_wrap("env", $name, |c: C<'_> $(, $a: $t)*| {
                    if let Some(status) = injected_fault(&c, $name) {
                        return Ok(status);
                    }
                    $f(c $(, $a)*)
                })
                .map_err(anyhow::Error::from)?;
            implemented.insert(("env".to_string(), $name.to_string()));
        }};
    }
    def!("proxy_log", proxy_log(a0: i32, a1: i32, a2: i32));
    def!("proxy_get_log_level", proxy_get_log_level(a0: i32));
    def!("proxy_get_current_time_nanoseconds", proxy_get_current_time_nanoseconds(a0: i32));
    def!("proxy_set_tick_period_milliseconds", proxy_set_tick_period_milliseconds(a0: i32));
    def!("proxy_get_buffer_bytes", proxy_get_buffer_bytes(a0: i32, a1: i32, a2: i32, a3: i32, a4: i32));
    def!("proxy_set_buffer_bytes", proxy_set_buffer_bytes(a0: i32, a1: i32, a2: i32, a3: i32, a4: i32));
    def!("proxy_get_buffer_status", proxy_get_buffer_status(a0: i32, a1: i32, a2: i32));
    def!("proxy_get_header_map_pairs", proxy_get_header_map_pairs(a0: i32, a1: i32, a2: i32));
    def!("proxy_set_header_map_pairs", proxy_set_header_map_pairs(a0: i32, a1: i32, a2: i32));
    def!("proxy_get_header_map_size", proxy_get_header_map_size(a0: i32, a1: i32));
    def!("proxy_get_header_map_value", proxy_get_header_map_value(a0: i32, a1: i32, a2: i32, a3: i32, a4: i32));
    def!("proxy_replace_header_map_value", proxy_replace_header_map_value(a0: i32, a1: i32, a2: i32, a3: i32, a4: i32));
    def!("proxy_remove_header_map_value", proxy_remove_header_map_value(a0: i32, a1: i32, a2: i32));
    def!("proxy_add_header_map_value", proxy_add_header_map_value(a0: i32, a1: i32, a2: i32, a3: i32, a4: i32));
    def!("proxy_get_property", proxy_get_property(a0: i32, a1: i32, a2: i32, a3: i32));
    def!("proxy_set_property", proxy_set_property(a0: i32, a1: i32, a2: i32, a3: i32));
    def!("proxy_get_shared_data", proxy_get_shared_data(a0: i32, a1: i32, a2: i32, a3: i32, a4: i32));
    def!("proxy_set_shared_data", proxy_set_shared_data(a0: i32, a1: i32, a2: i32, a3: i32, a4: i32));
    def!("proxy_register_shared_queue", proxy_register_shared_queue(a0: i32, a1: i32, a2: i32));
    def!("proxy_resolve_shared_queue", proxy_resolve_shared_queue(a0: i32, a1: i32, a2: i32, a3: i32, a4: i32));
    def!("proxy_dequeue_shared_queue", proxy_dequeue_shared_queue(a0: i32, a1: i32, a2: i32));
    def!("proxy_enqueue_shared_queue", proxy_enqueue_shared_queue(a0: i32, a1: i32, a2: i32));
    def!("proxy_continue_stream", proxy_continue_stream(a0: i32));
    def!("proxy_close_stream", proxy_close_stream(a0: i32));
    def!("proxy_send_local_response", proxy_send_local_response(a0: i32, a1: i32, a2: i32, a3: i32, a4: i32, a5: i32, a6: i32, a7: i32));
    def!("proxy_http_call", proxy_http_call(a0: i32, a1: i32, a2: i32, a3: i32, a4: i32, a5: i32, a6: i32, a7: i32, a8: i32, a9: i32));
    def!("proxy_set_effective_context", proxy_set_effective_context(a0: i32));
    def!("proxy_done", proxy_done());
    def!("proxy_get_status", proxy_get_status(a0: i32, a1: i32, a2: i32));
    def!("proxy_define_metric", proxy_define_metric(a0: i32, a1: i32, a2: i32, a3: i32));
    def!("proxy_increment_metric", proxy_increment_metric(a0: i32, a1: i64));
    def!("proxy_record_metric", proxy_record_metric(a0: i32, a1: i64));
    def!("proxy_get_metric", proxy_get_metric(a0: i32, a1: i32));
    def!("proxy_call_foreign_function", proxy_call_foreign_function(a0: i32, a1: i32, a2: i32, a3: i32, a4: i32, a5: i32));
    Ok(())
}

/// An injected failure for this call of `name` (see [`crate::Host::fail_call`]), counted.
fn injected_fault(c: &C<'_>, name: &str) -> Option<i32> {
    let status = {
        let st: &VmState = c.data();
        let mut shared = st.lock();
        let fault = shared.faults.get_mut(name)?;
        if fault.skip > 0 {
            fault.skip -= 1;
            return None;
        }
        match &mut fault.times {
            Some(0) => return None,
            Some(n) => *n -= 1,
            None => {}
        }
        let status = fault.status;
        shared.faults_fired.push((name.to_string(), status));
        status
    };
    Some(status.code())
}

// ---- logging and time ----

fn proxy_log(mut c: C<'_>, level: i32, ptr: i32, len: i32) -> R {
    let Some(level) = LogLevel::from_raw(level) else {
        return Ok(BAD_ARGUMENT);
    };
    let msg = rd!(&mut c, ptr, len);
    c.data_mut().log(
        level,
        "proxy_log",
        String::from_utf8_lossy(&msg).into_owned(),
    );
    Ok(OK)
}

fn proxy_get_log_level(mut c: C<'_>, ret: i32) -> R {
    let level = c.data().lock().log_level as u32;
    Ok(if write_u32(&mut c, ret, level) {
        OK
    } else {
        OOB
    })
}

fn proxy_get_current_time_nanoseconds(mut c: C<'_>, ret: i32) -> R {
    let now = c.data().lock().realtime;
    Ok(if write_u64(&mut c, ret, now) { OK } else { OOB })
}

fn proxy_set_tick_period_milliseconds(mut c: C<'_>, period: i32) -> R {
    let now = c.data().lock().monotonic;
    let st = c.data_mut();
    let period = period as u32;
    st.tick_period_ms = period;
    st.next_tick = (period > 0).then(|| now + u64::from(period) * 1_000_000);
    Ok(OK)
}

// ---- buffers ----

fn buffer(st: &VmState, bt: BufferType) -> Option<Vec<u8>> {
    match bt {
        BufferType::HttpRequestBody => st.effective_stream().map(|s| s.request_body.clone()),
        BufferType::HttpResponseBody => st.effective_stream().map(|s| s.response_body.clone()),
        BufferType::HttpCallResponseBody => st.call_response.as_ref().map(|r| r.body.clone()),
        BufferType::VmConfiguration => Some(st.vm_config.clone()),
        BufferType::PluginConfiguration => st.plugin_config.clone(),
        _ => None,
    }
}

fn proxy_get_buffer_bytes(
    mut c: C<'_>,
    bt: i32,
    start: i32,
    max: i32,
    ret_ptr: i32,
    ret_size: i32,
) -> R {
    let Some(bt) = BufferType::from_raw(bt) else {
        return Ok(BAD_ARGUMENT);
    };
    let Some(buf) = buffer(c.data(), bt) else {
        return Ok(NOT_FOUND);
    };
    let (start, max) = (start as u32 as usize, max as u32 as usize);
    if start > buf.len() {
        return Ok(BAD_ARGUMENT);
    }
    let end = start.saturating_add(max).min(buf.len());
    give(&mut c, &buf[start..end], ret_ptr, ret_size)
}

fn proxy_get_buffer_status(mut c: C<'_>, bt: i32, ret_size: i32, ret_flags: i32) -> R {
    let Some(bt) = BufferType::from_raw(bt) else {
        return Ok(BAD_ARGUMENT);
    };
    let Some(buf) = buffer(c.data(), bt) else {
        return Ok(NOT_FOUND);
    };
    if !write_u32(&mut c, ret_size, buf.len() as u32) || !write_u32(&mut c, ret_flags, 0) {
        return Ok(OOB);
    }
    Ok(OK)
}

fn proxy_set_buffer_bytes(mut c: C<'_>, bt: i32, start: i32, size: i32, ptr: i32, len: i32) -> R {
    let Some(bt) = BufferType::from_raw(bt) else {
        return Ok(BAD_ARGUMENT);
    };
    let data = rd!(&mut c, ptr, len);
    let st = c.data_mut();
    let target = match bt {
        BufferType::HttpRequestBody => st.effective_stream_mut().map(|s| &mut s.request_body),
        BufferType::HttpResponseBody => st.effective_stream_mut().map(|s| &mut s.response_body),
        _ => return Ok(NOT_FOUND),
    };
    let Some(buf) = target else {
        return Ok(NOT_FOUND);
    };
    // Replace `size` bytes at `start`: prepend (0, 0), append (start >= len),
    // replace or inject otherwise.
    let start = (start as u32 as usize).min(buf.len());
    let end = start.saturating_add(size as u32 as usize).min(buf.len());
    buf.splice(start..end, data);
    Ok(OK)
}

// ---- header maps ----

fn proxy_get_header_map_pairs(mut c: C<'_>, mt: i32, ret_ptr: i32, ret_size: i32) -> R {
    let Some(mt) = MapType::from_raw(mt) else {
        return Ok(BAD_ARGUMENT);
    };
    let Some(map) = c.data().map(mt) else {
        return Ok(BAD_ARGUMENT);
    };
    let bytes = abi::serialize_map(map);
    give(&mut c, &bytes, ret_ptr, ret_size)
}

fn proxy_get_header_map_size(mut c: C<'_>, mt: i32, ret_size: i32) -> R {
    let Some(mt) = MapType::from_raw(mt) else {
        return Ok(BAD_ARGUMENT);
    };
    let Some(map) = c.data().map(mt) else {
        return Ok(BAD_ARGUMENT);
    };
    let n = abi::serialize_map(map).len() as u32;
    Ok(if write_u32(&mut c, ret_size, n) {
        OK
    } else {
        OOB
    })
}

fn proxy_set_header_map_pairs(mut c: C<'_>, mt: i32, ptr: i32, len: i32) -> R {
    let Some(mt) = MapType::from_raw(mt) else {
        return Ok(BAD_ARGUMENT);
    };
    let bytes = rd!(&mut c, ptr, len);
    let st = c.data_mut();
    let pairs = match abi::deserialize_map(&bytes) {
        Ok(p) => p,
        Err(e) => {
            st.warn(format!("set_header_map_pairs: malformed map: {e}"));
            return Ok(BAD_ARGUMENT);
        }
    };
    let Some(map) = st.map_mut(mt, "set_header_map_pairs") else {
        return Ok(BAD_ARGUMENT);
    };
    *map = pairs
        .into_iter()
        .map(|(k, v)| (k.to_ascii_lowercase(), v))
        .collect();
    Ok(OK)
}

fn proxy_get_header_map_value(
    mut c: C<'_>,
    mt: i32,
    kp: i32,
    kl: i32,
    ret_ptr: i32,
    ret_size: i32,
) -> R {
    let Some(mt) = MapType::from_raw(mt) else {
        return Ok(BAD_ARGUMENT);
    };
    let key = rd!(&mut c, kp, kl);
    let key = String::from_utf8_lossy(&key).to_ascii_lowercase();
    let Some(map) = c.data().map(mt) else {
        return Ok(BAD_ARGUMENT);
    };
    match header_value(map, &key) {
        Some(v) => give(&mut c, &v, ret_ptr, ret_size),
        None => Ok(NOT_FOUND),
    }
}

fn proxy_replace_header_map_value(mut c: C<'_>, mt: i32, kp: i32, kl: i32, vp: i32, vl: i32) -> R {
    let Some(mt) = MapType::from_raw(mt) else {
        return Ok(BAD_ARGUMENT);
    };
    let key = rd!(&mut c, kp, kl);
    let value = rd!(&mut c, vp, vl);
    let key = String::from_utf8_lossy(&key).to_ascii_lowercase();
    let Some(map) = c.data_mut().map_mut(mt, "replace_header_map_value") else {
        return Ok(BAD_ARGUMENT);
    };
    match map.iter().position(|(k, _)| *k == key) {
        Some(i) => {
            map[i].1 = value;
            let mut seen = 0;
            map.retain(|(k, _)| {
                if *k == key {
                    seen += 1;
                    seen == 1
                } else {
                    true
                }
            });
        }
        None => map.push((key, value)),
    }
    Ok(OK)
}

fn proxy_remove_header_map_value(mut c: C<'_>, mt: i32, kp: i32, kl: i32) -> R {
    let Some(mt) = MapType::from_raw(mt) else {
        return Ok(BAD_ARGUMENT);
    };
    let key = rd!(&mut c, kp, kl);
    let key = String::from_utf8_lossy(&key).to_ascii_lowercase();
    let Some(map) = c.data_mut().map_mut(mt, "remove_header_map_value") else {
        return Ok(BAD_ARGUMENT);
    };
    map.retain(|(k, _)| *k != key);
    Ok(OK)
}

fn proxy_add_header_map_value(mut c: C<'_>, mt: i32, kp: i32, kl: i32, vp: i32, vl: i32) -> R {
    let Some(mt) = MapType::from_raw(mt) else {
        return Ok(BAD_ARGUMENT);
    };
    let key = rd!(&mut c, kp, kl);
    let value = rd!(&mut c, vp, vl);
    let key = String::from_utf8_lossy(&key).to_ascii_lowercase();
    let Some(map) = c.data_mut().map_mut(mt, "add_header_map_value") else {
        return Ok(BAD_ARGUMENT);
    };
    map.push((key, value));
    Ok(OK)
}

// ---- properties ----

fn trim_path(mut p: Vec<u8>) -> Vec<u8> {
    if p.last() == Some(&0) {
        p.pop();
    }
    p
}

fn proxy_get_property(mut c: C<'_>, pp: i32, pl: i32, ret_ptr: i32, ret_size: i32) -> R {
    let path = trim_path(rd!(&mut c, pp, pl));
    match c.data().get_property(&path) {
        Some(v) => give(&mut c, &v, ret_ptr, ret_size),
        None => Ok(NOT_FOUND),
    }
}

fn proxy_set_property(mut c: C<'_>, pp: i32, pl: i32, vp: i32, vl: i32) -> R {
    let path = trim_path(rd!(&mut c, pp, pl));
    let value = rd!(&mut c, vp, vl);
    c.data_mut().set_property(path, value);
    Ok(OK)
}

// ---- shared data and queues ----

fn proxy_get_shared_data(
    mut c: C<'_>,
    kp: i32,
    kl: i32,
    ret_ptr: i32,
    ret_size: i32,
    ret_cas: i32,
) -> R {
    let key = rd!(&mut c, kp, kl);
    let entry = c.data().lock().shared_data.get(&key).cloned();
    let Some((value, cas)) = entry else {
        return Ok(NOT_FOUND);
    };
    if !write_u32(&mut c, ret_cas, cas) {
        return Ok(OOB);
    }
    give(&mut c, &value, ret_ptr, ret_size)
}

fn proxy_set_shared_data(mut c: C<'_>, kp: i32, kl: i32, vp: i32, vl: i32, cas: i32) -> R {
    let key = rd!(&mut c, kp, kl);
    let value = rd!(&mut c, vp, vl);
    let cas = cas as u32;
    let mut s = c.data().lock();
    if let Some((_, current)) = s.shared_data.get(&key) {
        if cas != 0 && cas != *current {
            return Ok(Status::CasMismatch.code());
        }
    }
    let next = s.next_cas();
    s.shared_data.insert(key, (value, next));
    Ok(OK)
}

fn proxy_register_shared_queue(mut c: C<'_>, np: i32, nl: i32, ret_id: i32) -> R {
    let name = String::from_utf8_lossy(&rd!(&mut c, np, nl)).into_owned();
    let vm = c.data().vm;
    let id = {
        let mut s = c.data().lock();
        match s.queues.iter().position(|q| q.name == name) {
            Some(i) => i + 1,
            None => {
                s.queues.push(Queue {
                    name,
                    owner_vm: vm,
                    items: Default::default(),
                });
                s.queues.len()
            }
        }
    };
    Ok(if write_u32(&mut c, ret_id, id as u32) {
        OK
    } else {
        OOB
    })
}

fn proxy_resolve_shared_queue(
    mut c: C<'_>,
    _vp: i32,
    _vl: i32,
    np: i32,
    nl: i32,
    ret_id: i32,
) -> R {
    let name = String::from_utf8_lossy(&rd!(&mut c, np, nl)).into_owned();
    let found = c.data().lock().queues.iter().position(|q| q.name == name);
    let Some(i) = found else { return Ok(NOT_FOUND) };
    Ok(if write_u32(&mut c, ret_id, i as u32 + 1) {
        OK
    } else {
        OOB
    })
}

fn proxy_enqueue_shared_queue(mut c: C<'_>, id: i32, vp: i32, vl: i32) -> R {
    let value = rd!(&mut c, vp, vl);
    let mut s = c.data().lock();
    let idx = (id as u32 as usize).wrapping_sub(1);
    let Some(q) = s.queues.get_mut(idx) else {
        return Ok(NOT_FOUND);
    };
    q.items.push_back(value);
    let owner = q.owner_vm;
    s.queue_ready.push((owner, id as u32));
    Ok(OK)
}

fn proxy_dequeue_shared_queue(mut c: C<'_>, id: i32, ret_ptr: i32, ret_size: i32) -> R {
    let item = {
        let mut s = c.data().lock();
        let idx = (id as u32 as usize).wrapping_sub(1);
        let Some(q) = s.queues.get_mut(idx) else {
            return Ok(NOT_FOUND);
        };
        match q.items.pop_front() {
            Some(v) => v,
            None => return Ok(Status::Empty.code()),
        }
    };
    give(&mut c, &item, ret_ptr, ret_size)
}

// ---- stream control ----

fn proxy_continue_stream(mut c: C<'_>, st: i32) -> R {
    let Some(st) = StreamType::from_raw(st) else {
        return Ok(BAD_ARGUMENT);
    };
    Ok(c.data_mut().continue_stream(st).code())
}

fn proxy_close_stream(mut c: C<'_>, st: i32) -> R {
    let Some(st) = StreamType::from_raw(st) else {
        return Ok(BAD_ARGUMENT);
    };
    if !matches!(st, StreamType::HttpRequest | StreamType::HttpResponse) {
        return Ok(BAD_ARGUMENT);
    }
    let Some(s) = c.data_mut().effective_stream_mut() else {
        return Ok(BAD_ARGUMENT);
    };
    s.closed = true;
    s.request_paused = false;
    s.response_paused = false;
    Ok(OK)
}

#[allow(clippy::too_many_arguments)]
fn proxy_send_local_response(
    mut c: C<'_>,
    status: i32,
    dp: i32,
    dl: i32,
    bp: i32,
    bl: i32,
    hp: i32,
    hl: i32,
    grpc: i32,
) -> R {
    let details = String::from_utf8_lossy(&rd!(&mut c, dp, dl)).into_owned();
    let body = rd!(&mut c, bp, bl);
    let headers_raw = rd!(&mut c, hp, hl);
    let st = c.data_mut();
    let headers = match abi::deserialize_map(&headers_raw) {
        Ok(h) => h
            .into_iter()
            .map(|(k, v)| (k.to_ascii_lowercase(), v))
            .collect(),
        Err(e) => {
            st.warn(format!("send_local_response: malformed header map: {e}"));
            return Ok(BAD_ARGUMENT);
        }
    };
    let Some(s) = st.effective_stream_mut() else {
        st.warn("send_local_response outside an HTTP stream context".into());
        return Ok(BAD_ARGUMENT);
    };
    s.local_response_calls += 1;
    let calls = s.local_response_calls;
    let already_sent = s.downstream.headers.is_some();
    if s.local_response.is_none() {
        s.local_response = Some(LocalResponse {
            status: status as u32,
            details,
            body,
            headers,
            grpc_status: grpc,
        });
        s.request_paused = false;
    }
    if calls > 1 {
        st.warn(format!(
            "send_local_response called {calls} times on one stream (Envoy can hang such streams); later calls ignored"
        ));
    } else if already_sent {
        st.warn("send_local_response after response headers went downstream".into());
    }
    Ok(OK)
}

#[allow(clippy::too_many_arguments)]
fn proxy_http_call(
    mut c: C<'_>,
    up: i32,
    ul: i32,
    hp: i32,
    hl: i32,
    bp: i32,
    bl: i32,
    tp: i32,
    tl: i32,
    timeout: i32,
    ret_token: i32,
) -> R {
    let upstream = String::from_utf8_lossy(&rd!(&mut c, up, ul)).into_owned();
    let headers_raw = rd!(&mut c, hp, hl);
    let body = rd!(&mut c, bp, bl);
    let trailers_raw = rd!(&mut c, tp, tl);
    let (known, now) = {
        let s = c.data().lock();
        (s.upstreams.contains(&upstream), s.monotonic)
    };
    let st = c.data_mut();
    if !known {
        st.warn(format!(
            "http_call to unknown upstream cluster {upstream:?}: BadArgument"
        ));
        return Ok(BAD_ARGUMENT);
    }
    let (headers, trailers) = match (
        abi::deserialize_map(&headers_raw),
        abi::deserialize_map(&trailers_raw),
    ) {
        (Ok(h), Ok(t)) => (h, t),
        (Err(e), _) | (_, Err(e)) => {
            st.warn(format!("http_call: malformed map: {e}"));
            return Ok(BAD_ARGUMENT);
        }
    };
    let headers: Vec<(String, Vec<u8>)> = headers
        .into_iter()
        .map(|(k, v)| (k.to_ascii_lowercase(), v))
        .collect();
    for required in [":method", ":path", ":authority"] {
        if header_value(&headers, required).is_none_or(|v| v.is_empty()) {
            st.warn(format!(
                "http_call to {upstream:?} without {required}: BadArgument"
            ));
            return Ok(BAD_ARGUMENT);
        }
    }
    let token = st.next_token;
    st.next_token = st.next_token.wrapping_add(1).max(1);
    let timeout_ms = timeout as u32;
    st.calls.insert(
        token,
        HttpCallout {
            token,
            context_id: st.effective,
            upstream,
            headers,
            body,
            trailers,
            timeout_ms,
            deadline: now.saturating_add(u64::from(timeout_ms) * 1_000_000),
        },
    );
    Ok(if write_u32(&mut c, ret_token, token) {
        OK
    } else {
        OOB
    })
}

fn proxy_set_effective_context(mut c: C<'_>, ctx: i32) -> R {
    let st = c.data_mut();
    let ctx = ctx as u32;
    let known = ctx == st.root_id || st.streams.get(&ctx).is_some_and(|s| !s.finished);
    if !known {
        st.warn(format!("set_effective_context({ctx}): unknown context"));
        return Ok(BAD_ARGUMENT);
    }
    st.effective = ctx;
    Ok(OK)
}

fn proxy_done(mut c: C<'_>) -> R {
    let st = c.data_mut();
    let ctx = st.effective;
    if st.pending_done.contains(&ctx) {
        st.done_requested.insert(ctx);
        Ok(OK)
    } else {
        Ok(NOT_FOUND)
    }
}

fn proxy_get_status(mut c: C<'_>, ret_code: i32, ret_ptr: i32, ret_size: i32) -> R {
    let (code, msg) = c.data().status.clone();
    if !write_u32(&mut c, ret_code, code) {
        return Ok(OOB);
    }
    give(&mut c, &msg, ret_ptr, ret_size)
}

// ---- metrics ----

fn proxy_define_metric(mut c: C<'_>, kind: i32, np: i32, nl: i32, ret_id: i32) -> R {
    let Some(kind) = MetricType::from_raw(kind) else {
        return Ok(BAD_ARGUMENT);
    };
    let name = String::from_utf8_lossy(&rd!(&mut c, np, nl)).into_owned();
    let id = {
        let mut s = c.data().lock();
        match s.metrics.iter().position(|m| m.name == name) {
            Some(i) if s.metrics[i].kind == kind => i + 1,
            Some(_) => return Ok(BAD_ARGUMENT),
            None => {
                s.metrics.push(Metric {
                    name,
                    kind,
                    value: 0,
                    samples: Vec::new(),
                });
                s.metrics.len()
            }
        }
    };
    Ok(if write_u32(&mut c, ret_id, id as u32) {
        OK
    } else {
        OOB
    })
}

fn proxy_increment_metric(c: C<'_>, id: i32, delta: i64) -> R {
    let mut s = c.data().lock();
    let Some(m) = s.metrics.get_mut((id as u32 as usize).wrapping_sub(1)) else {
        return Ok(NOT_FOUND);
    };
    match m.kind {
        MetricType::Counter if delta < 0 => Ok(BAD_ARGUMENT),
        MetricType::Counter | MetricType::Gauge => {
            m.value = m.value.saturating_add(delta);
            Ok(OK)
        }
        MetricType::Histogram => Ok(BAD_ARGUMENT),
    }
}

fn proxy_record_metric(c: C<'_>, id: i32, value: i64) -> R {
    let mut s = c.data().lock();
    let Some(m) = s.metrics.get_mut((id as u32 as usize).wrapping_sub(1)) else {
        return Ok(NOT_FOUND);
    };
    match m.kind {
        MetricType::Counter if value < m.value => Ok(BAD_ARGUMENT),
        MetricType::Counter | MetricType::Gauge => {
            m.value = value;
            Ok(OK)
        }
        MetricType::Histogram => {
            m.samples.push(value as u64);
            Ok(OK)
        }
    }
}

fn proxy_get_metric(mut c: C<'_>, id: i32, ret: i32) -> R {
    let value = {
        let s = c.data().lock();
        let Some(m) = s.metrics.get((id as u32 as usize).wrapping_sub(1)) else {
            return Ok(NOT_FOUND);
        };
        if m.kind == MetricType::Histogram {
            return Ok(BAD_ARGUMENT);
        }
        m.value as u64
    };
    Ok(if write_u64(&mut c, ret, value) {
        OK
    } else {
        OOB
    })
}

fn proxy_call_foreign_function(
    mut c: C<'_>,
    np: i32,
    nl: i32,
    ap: i32,
    al: i32,
    rp: i32,
    rs: i32,
) -> R {
    let name = String::from_utf8_lossy(&rd!(&mut c, np, nl)).into_owned();
    if name == "verify_signature" {
        let args = rd!(&mut c, ap, al);
        return match crate::foreign::verify_signature(&args) {
            Some(answer) => give(&mut c, &answer, rp, rs),
            None => Ok(BAD_ARGUMENT),
        };
    }
    c.data_mut().warn(format!(
        "call_foreign_function({name:?}): no foreign functions in this host: NotFound"
    ));
    Ok(NOT_FOUND)
}
