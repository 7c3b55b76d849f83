//! Non-panicking proxy-wasm host calls (ABI 0.2.1): the only `extern "C"` imports of the filter.
//!
//! The proxy-wasm Rust SDK's `hostcalls::*` wrappers `panic!` on any status they do not expect,
//! and a panic traps the VM (every later request of the worker fails). Here every call returns
//! the host's status as a value, and the caller decides: on the request path a refusal denies
//! that one request (fail closed); best-effort calls (logs, metrics) ignore it.
//!
//! Statuses cross the ABI as `u32` and are decoded by [`Status::from_raw`]: a code this module
//! does not know is kept as [`Status::Other`], never transmuted into an enum.

use std::ptr::null_mut;

/// `proxy_status_t`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Ok,
    NotFound,
    BadArgument,
    SerializationFailure,
    ParseFailure,
    BadExpression,
    InvalidMemoryAccess,
    Empty,
    CasMismatch,
    ResultMismatch,
    InternalFailure,
    BrokenConnection,
    Unimplemented,
    /// A code outside ABI 0.2.1.
    Other(u32),
}

impl Status {
    pub fn from_raw(code: u32) -> Status {
        match code {
            0 => Status::Ok,
            1 => Status::NotFound,
            2 => Status::BadArgument,
            3 => Status::SerializationFailure,
            4 => Status::ParseFailure,
            5 => Status::BadExpression,
            6 => Status::InvalidMemoryAccess,
            7 => Status::Empty,
            8 => Status::CasMismatch,
            9 => Status::ResultMismatch,
            10 => Status::InternalFailure,
            11 => Status::BrokenConnection,
            12 => Status::Unimplemented,
            other => Status::Other(other),
        }
    }

    /// `Ok(())` for `Ok`, the status as the error otherwise.
    fn result(code: u32) -> Result<(), Status> {
        match Status::from_raw(code) {
            Status::Ok => Ok(()),
            other => Err(other),
        }
    }
}

/// `proxy_action_t`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Action {
    Continue = 0,
    Pause = 1,
}

/// `proxy_log_level_t`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum LogLevel {
    Info = 2,
    Warn = 3,
    Error = 4,
    Critical = 5,
}

/// `proxy_map_type_t` (the maps the filter uses).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
#[allow(clippy::enum_variant_names)] // the ABI's names
pub enum MapType {
    HttpRequestHeaders = 0,
    HttpResponseHeaders = 2,
    HttpCallResponseHeaders = 6,
}

/// `proxy_buffer_type_t` (the buffers the filter uses).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum BufferType {
    HttpRequestBody = 0,
    HttpResponseBody = 1,
    HttpCallResponseBody = 4,
    PluginConfiguration = 7,
}

/// `proxy_metric_type_t`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum MetricType {
    Counter = 0,
    Gauge = 1,
    Histogram = 2,
}

/// `proxy_stream_type_t` (the stream the filter resumes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum StreamType {
    HttpRequest = 0,
}

#[link(wasm_import_module = "env")]
extern "C" {
    fn proxy_log(level: u32, message_data: *const u8, message_size: usize) -> u32;
    fn proxy_get_current_time_nanoseconds(return_time: *mut u64) -> u32;
    fn proxy_set_tick_period_milliseconds(period: u32) -> u32;
    fn proxy_get_buffer_bytes(buffer_type: u32, start: usize, max_size: usize, return_data: *mut *mut u8, return_size: *mut usize) -> u32;
    fn proxy_set_buffer_bytes(buffer_type: u32, start: usize, size: usize, data: *const u8, data_size: usize) -> u32;
    fn proxy_get_header_map_pairs(map_type: u32, return_data: *mut *mut u8, return_size: *mut usize) -> u32;
    fn proxy_get_header_map_value(map_type: u32, key_data: *const u8, key_size: usize, return_data: *mut *mut u8, return_size: *mut usize) -> u32;
    fn proxy_replace_header_map_value(map_type: u32, key_data: *const u8, key_size: usize, value_data: *const u8, value_size: usize) -> u32;
    fn proxy_remove_header_map_value(map_type: u32, key_data: *const u8, key_size: usize) -> u32;
    fn proxy_get_property(path_data: *const u8, path_size: usize, return_data: *mut *mut u8, return_size: *mut usize) -> u32;
    fn proxy_set_property(path_data: *const u8, path_size: usize, value_data: *const u8, value_size: usize) -> u32;
    fn proxy_get_shared_data(key_data: *const u8, key_size: usize, return_data: *mut *mut u8, return_size: *mut usize, return_cas: *mut u32) -> u32;
    fn proxy_set_shared_data(key_data: *const u8, key_size: usize, value_data: *const u8, value_size: usize, cas: u32) -> u32;
    fn proxy_continue_stream(stream_type: u32) -> u32;
    fn proxy_set_effective_context(context_id: u32) -> u32;
    fn proxy_send_local_response(
        status_code: u32,
        details_data: *const u8,
        details_size: usize,
        body_data: *const u8,
        body_size: usize,
        headers_data: *const u8,
        headers_size: usize,
        grpc_status: i32,
    ) -> u32;
    fn proxy_http_call(
        upstream_data: *const u8,
        upstream_size: usize,
        headers_data: *const u8,
        headers_size: usize,
        body_data: *const u8,
        body_size: usize,
        trailers_data: *const u8,
        trailers_size: usize,
        timeout_ms: u32,
        return_token: *mut u32,
    ) -> u32;
    fn proxy_define_metric(metric_type: u32, name_data: *const u8, name_size: usize, return_id: *mut u32) -> u32;
    fn proxy_increment_metric(metric_id: u32, offset: i64) -> u32;
    fn proxy_record_metric(metric_id: u32, value: u64) -> u32;
    fn proxy_call_foreign_function(name_data: *const u8, name_size: usize, args_data: *const u8, args_size: usize, return_data: *mut *mut u8, return_size: *mut usize) -> u32;
}

/// Takes ownership of bytes the host returned through out-pointers.
///
/// # Safety
/// `data` must be null or a buffer of exactly `size` bytes the host allocated through this
/// module's `proxy_on_memory_allocate` (a boxed `[u8]` of that size), not owned elsewhere.
unsafe fn owned(data: *mut u8, size: usize) -> Option<Vec<u8>> {
    if data.is_null() {
        return None;
    }
    // SAFETY: per the contract above; a zero-sized allocation is a valid empty Vec.
    Some(unsafe { Vec::from_raw_parts(data, size, size) })
}

/// Runs a host call that returns bytes through out-pointers: `Ok(None)` when the host says
/// `NotFound` or returns nothing.
fn fetch(call: impl FnOnce(*mut *mut u8, *mut usize) -> u32) -> Result<Option<Vec<u8>>, Status> {
    let mut data: *mut u8 = null_mut();
    let mut size: usize = 0;
    let status = call(&mut data, &mut size);
    match Status::from_raw(status) {
        // SAFETY: on Ok the host filled the out-pointers with memory it allocated from us.
        Status::Ok => Ok(unsafe { owned(data, size) }),
        Status::NotFound => Ok(None),
        other => Err(other),
    }
}

// ------------------------------------------------------------------ logging, time, ticks

pub fn log(level: LogLevel, message: &[u8]) -> Result<(), Status> {
    // SAFETY: the pointer references a live buffer for the duration of the call.
    Status::result(unsafe { proxy_log(level as u32, message.as_ptr(), message.len()) })
}

/// Wall clock, Unix nanoseconds; `None` when the host refuses.
pub fn now_nanos() -> Option<u64> {
    let mut t: u64 = 0;
    // SAFETY: the host writes one u64 through a pointer to a live local.
    Status::result(unsafe { proxy_get_current_time_nanoseconds(&mut t) }).ok().map(|()| t)
}

pub fn set_tick_period_ms(period_ms: u32) -> Result<(), Status> {
    // SAFETY: plain value call.
    Status::result(unsafe { proxy_set_tick_period_milliseconds(period_ms) })
}

// ------------------------------------------------------------------ buffers and headers

/// Up to `max` bytes of a buffer from `start`.
pub fn buffer(kind: BufferType, start: usize, max: usize) -> Result<Option<Vec<u8>>, Status> {
    // SAFETY: the out-pointers reference live locals inside `fetch`.
    fetch(|data, size| unsafe { proxy_get_buffer_bytes(kind as u32, start, max, data, size) })
}

/// Replaces `size` bytes of a buffer from `start` with `value`.
pub fn set_buffer(kind: BufferType, start: usize, size: usize, value: &[u8]) -> Result<(), Status> {
    // SAFETY: the pointer references a live buffer for the duration of the call.
    Status::result(unsafe { proxy_set_buffer_bytes(kind as u32, start, size, value.as_ptr(), value.len()) })
}

/// A whole header map, serialized in the ABI's pair layout (`None`: empty). A map the host
/// says it does not have (`NotFound`) is an error, not an empty map.
pub fn header_pairs(map: MapType) -> Result<Option<Vec<u8>>, Status> {
    let mut data: *mut u8 = null_mut();
    let mut size: usize = 0;
    // SAFETY: the out-pointers reference live locals.
    let status = unsafe { proxy_get_header_map_pairs(map as u32, &mut data, &mut size) };
    // SAFETY: on Ok the host filled the out-pointers with memory it allocated from us.
    Status::result(status).map(|()| unsafe { owned(data, size) })
}

/// One header's value (`None`: absent).
pub fn header_value(map: MapType, name: &str) -> Result<Option<Vec<u8>>, Status> {
    // SAFETY: the key references a live buffer; the out-pointers live locals inside `fetch`.
    fetch(|data, size| unsafe { proxy_get_header_map_value(map as u32, name.as_ptr(), name.len(), data, size) })
}

/// Sets (replacing every value) or, with `None`, removes a header.
pub fn set_header(map: MapType, name: &str, value: Option<&[u8]>) -> Result<(), Status> {
    // SAFETY: the pointers reference live buffers for the duration of the call.
    Status::result(unsafe {
        match value {
            Some(v) => proxy_replace_header_map_value(map as u32, name.as_ptr(), name.len(), v.as_ptr(), v.len()),
            None => proxy_remove_header_map_value(map as u32, name.as_ptr(), name.len()),
        }
    })
}

// ------------------------------------------------------------------ properties, shared data

/// A property by path segments (joined with NUL, as the ABI wants).
pub fn property(path: &[&str]) -> Result<Option<Vec<u8>>, Status> {
    let joined = path.join("\0");
    // SAFETY: the path references a live buffer; the out-pointers live locals inside `fetch`.
    fetch(|data, size| unsafe { proxy_get_property(joined.as_ptr(), joined.len(), data, size) })
}

/// Sets a property (Envoy: a filter-state entry under `wasm.<path>`).
pub fn set_property(path: &[u8], value: &[u8]) -> Result<(), Status> {
    // SAFETY: the pointers reference live buffers for the duration of the call.
    Status::result(unsafe { proxy_set_property(path.as_ptr(), path.len(), value.as_ptr(), value.len()) })
}

/// A shared-data value and its CAS token (`None` value: absent).
pub fn shared_get(key: &str) -> Result<(Option<Vec<u8>>, u32), Status> {
    let mut data: *mut u8 = null_mut();
    let mut size: usize = 0;
    let mut cas: u32 = 0;
    // SAFETY: the key references a live buffer; the out-pointers live locals.
    let status = unsafe { proxy_get_shared_data(key.as_ptr(), key.len(), &mut data, &mut size, &mut cas) };
    match Status::from_raw(status) {
        // SAFETY: on Ok the host filled the out-pointers with memory it allocated from us.
        Status::Ok => Ok((unsafe { owned(data, size) }.filter(|v| !v.is_empty()), cas)),
        Status::NotFound => Ok((None, 0)),
        other => Err(other),
    }
}

/// Writes a shared-data value if its CAS token is still `cas` (0: unconditionally).
pub fn shared_set(key: &str, value: &[u8], cas: u32) -> Result<(), Status> {
    // SAFETY: the pointers reference live buffers for the duration of the call.
    Status::result(unsafe { proxy_set_shared_data(key.as_ptr(), key.len(), value.as_ptr(), value.len(), cas) })
}

// ------------------------------------------------------------------ streams and contexts

/// Resumes a paused stream of the effective context.
pub fn continue_stream(stream: StreamType) -> Result<(), Status> {
    // SAFETY: plain value call.
    Status::result(unsafe { proxy_continue_stream(stream as u32) })
}

/// Makes `context_id` the context later calls act on (fails when that stream is gone).
pub fn set_effective_context(context_id: u32) -> Result<(), Status> {
    // SAFETY: plain value call.
    Status::result(unsafe { proxy_set_effective_context(context_id) })
}

/// Answers the effective stream locally (`headers` serialized in the ABI's pair layout).
pub fn send_local_response(status: u32, details: &[u8], body: &[u8], headers: &[u8]) -> Result<(), Status> {
    // SAFETY: all pointers reference live buffers for the duration of the call.
    Status::result(unsafe {
        proxy_send_local_response(status, details.as_ptr(), details.len(), body.as_ptr(), body.len(), headers.as_ptr(), headers.len(), -1)
    })
}

/// Dispatches an HTTP call (`headers` serialized in the ABI's pair layout); its token.
pub fn http_call(cluster: &str, headers: &[u8], body: &[u8], timeout_ms: u32) -> Result<u32, Status> {
    let trailers = 0u32.to_le_bytes();
    let mut token: u32 = 0;
    // SAFETY: all pointers reference live buffers (or a live local) for the duration of the call.
    let status = unsafe {
        proxy_http_call(
            cluster.as_ptr(),
            cluster.len(),
            headers.as_ptr(),
            headers.len(),
            body.as_ptr(),
            body.len(),
            trailers.as_ptr(),
            trailers.len(),
            timeout_ms,
            &mut token,
        )
    };
    Status::result(status).map(|()| token)
}

// ------------------------------------------------------------------ metrics, foreign functions

pub fn define_metric(kind: MetricType, name: &str) -> Result<u32, Status> {
    let mut id: u32 = 0;
    // SAFETY: the name references a live buffer; the out-pointer a live local.
    Status::result(unsafe { proxy_define_metric(kind as u32, name.as_ptr(), name.len(), &mut id) }).map(|()| id)
}

pub fn increment_metric(id: u32, offset: i64) -> Result<(), Status> {
    // SAFETY: plain value call.
    Status::result(unsafe { proxy_increment_metric(id, offset) })
}

pub fn record_metric(id: u32, value: u64) -> Result<(), Status> {
    // SAFETY: plain value call.
    Status::result(unsafe { proxy_record_metric(id, value) })
}

/// Calls a host function by name (Envoy: `verify_signature`, ...); its result bytes (`None`:
/// no result, or no such function).
pub fn call_foreign_function(name: &str, args: &[u8]) -> Result<Option<Vec<u8>>, Status> {
    // SAFETY: the name and arguments reference live buffers; the out-pointers live locals.
    fetch(|data, size| unsafe { proxy_call_foreign_function(name.as_ptr(), name.len(), args.as_ptr(), args.len(), data, size) })
}
