//! The proxy-wasm shell: the only code that makes host calls.
//!
//! It gathers inputs with as few host calls as possible, hands them to the
//! core [`Engine`], and applies the verdict. Every host error on the decision
//! path denies; nothing here may panic (a panic traps the VM for all traffic).

use crate::config;
use crate::decision::{DecisionIds, LocalReply};
use crate::engine::{Engine, Request, Verdict};
use crate::identity::bundles::{FetchReport, SourceId};
use crate::identity::jwks::MAX_BUNDLE_BYTES;
use crate::headers::{serialize_pairs, Headers};
use crate::reason::Reason;
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, LogLevel, MapType, Status};
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::time::{Duration, UNIX_EPOCH};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root::new()) });
}}

type SharedEngine = Rc<RefCell<Option<Engine>>>;

fn log(level: LogLevel, message: &str) {
    // Logging must never take the filter down: ignore the status.
    let _ = hostcalls::log(level, message);
}

fn random_seed() -> u64 {
    let mut buf = [0u8; 8];
    if getrandom::getrandom(&mut buf).is_err() {
        // Ids stay unique per VM through the counter; only cross-VM uniqueness weakens.
        log(LogLevel::Warn, "mandate: no randomness for decision ids; using the clock");
        let now = hostcalls::get_current_time()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        return now;
    }
    u64::from_le_bytes(buf)
}

/// Host time in Unix seconds; `None` if the host cannot tell (callers fail closed).
fn now_secs() -> Option<u64> {
    hostcalls::get_current_time().ok()?.duration_since(UNIX_EPOCH).ok().map(|d| d.as_secs())
}

struct Root {
    engine: SharedEngine,
    seed: u64,
    /// Bundle fetches in flight: callout token → bundle source.
    fetches: HashMap<u32, SourceId>,
}

impl Root {
    fn new() -> Root {
        Root { engine: Rc::new(RefCell::new(None)), seed: random_seed(), fetches: HashMap::new() }
    }

    /// Dispatches every bundle fetch that is due.
    fn dispatch_fetches(&mut self) {
        let Some(now) = now_secs() else { return };
        let Ok(mut slot) = self.engine.try_borrow_mut() else { return };
        let Some(engine) = slot.as_mut() else { return };
        for plan in engine.identity.bundles.due_fetches(now) {
            let headers = vec![
                (":method", "GET"),
                (":path", plan.path.as_str()),
                (":authority", plan.authority.as_str()),
                ("accept", "application/json"),
            ];
            let timeout = Duration::from_millis(plan.timeout_ms);
            match hostcalls::dispatch_http_call(&plan.cluster, headers, None, vec![], timeout) {
                Ok(token) => {
                    self.fetches.insert(token, plan.source);
                }
                Err(status) => {
                    let error = format!("cannot call cluster `{}`: {status:?}", plan.cluster);
                    if let Some(report) = engine.identity.bundles.on_fetch(plan.source, Err(error), now) {
                        log_fetch(&report);
                    }
                }
            }
        }
    }
}

fn log_fetch(report: &FetchReport) {
    match report {
        FetchReport::Updated { label, keys, skipped } => {
            let skipped = if skipped.is_empty() { String::new() } else { format!(", skipped unusable keys {skipped:?}") };
            log(LogLevel::Info, &format!("mandate: bundle for `{label}` updated: {keys} key(s){skipped}"));
        }
        FetchReport::Unchanged { .. } => {}
        FetchReport::Failed { label, error, kept_previous } => {
            let consequence = if *kept_previous {
                "keeping the last good bundle"
            } else {
                "no bundle yet: its tokens are refused"
            };
            log(LogLevel::Warn, &format!("mandate: bundle fetch for `{label}` failed ({error}); {consequence}"));
        }
    }
}

impl Context for Root {
    fn on_http_call_response(&mut self, token_id: u32, num_headers: usize, body_size: usize, _num_trailers: usize) {
        let Some(source) = self.fetches.remove(&token_id) else { return };
        let Some(now) = now_secs() else { return };
        // Envoy answers a failed or timed-out callout with no headers at all.
        let result: Result<Vec<u8>, String> = if num_headers == 0 {
            Err("no response (timeout or connection failure)".into())
        } else {
            let status = hostcalls::get_map_value_bytes(MapType::HttpCallResponseHeaders, ":status")
                .ok()
                .flatten()
                .unwrap_or_default();
            if status != b"200" {
                Err(format!("HTTP status {}", String::from_utf8_lossy(&status)))
            } else if body_size > MAX_BUNDLE_BYTES {
                Err(format!("bundle of {body_size} bytes is too large"))
            } else {
                hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, body_size)
                    .map(Option::unwrap_or_default)
                    .map_err(|s| format!("cannot read body: {s:?}"))
            }
        };
        let Ok(mut slot) = self.engine.try_borrow_mut() else { return };
        let Some(engine) = slot.as_mut() else { return };
        let result = result.as_deref().map_err(String::clone);
        if let Some(report) = engine.identity.bundles.on_fetch(source, result, now) {
            log_fetch(&report);
        }
    }
}

impl RootContext for Root {
    fn on_vm_start(&mut self, _vm_configuration_size: usize) -> bool {
        true
    }

    fn on_configure(&mut self, plugin_configuration_size: usize) -> bool {
        let raw = match hostcalls::get_buffer(BufferType::PluginConfiguration, 0, plugin_configuration_size) {
            Ok(bytes) => bytes.unwrap_or_default(),
            Err(status) => {
                log(LogLevel::Error, &format!("mandate: cannot read plugin configuration: {status:?}"));
                return false;
            }
        };
        match config::parse(&raw) {
            Ok(config) => {
                self.seed = self.seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
                let host_env = config
                    .policy
                    .as_ref()
                    .and_then(|p| p.environment_from_node_metadata.as_deref())
                    .and_then(|key| hostcalls::get_property(vec!["node", "metadata", key]).ok().flatten())
                    .and_then(|v| String::from_utf8(v).ok());
                let engine = match Engine::new(config, self.seed, host_env) {
                    Ok(engine) => engine,
                    Err(e) => {
                        log(LogLevel::Error, &e.to_string());
                        return false;
                    }
                };
                let remote = engine.identity.bundles.has_remote();
                {
                    let Ok(mut slot) = self.engine.try_borrow_mut() else {
                        log(LogLevel::Error, "mandate: configuration update while a request is in flight");
                        return false;
                    };
                    *slot = Some(engine);
                }
                self.fetches.clear();
                if remote {
                    // Ticks drive bundle refresh; the first fetch goes out now.
                    if hostcalls::set_tick_period(Duration::from_secs(1)).is_err() {
                        log(LogLevel::Warn, "mandate: cannot set tick period; bundles will not refresh");
                    }
                    self.dispatch_fetches();
                }
                log(LogLevel::Info, &format!("mandate {}: configured", crate::VERSION));
                true
            }
            Err(e) => {
                log(LogLevel::Error, &e.to_string());
                false
            }
        }
    }

    fn on_tick(&mut self) {
        self.dispatch_fetches();
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Http { engine: self.engine.clone() }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Http {
    engine: SharedEngine,
}

impl Context for Http {}

impl HttpContext for Http {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let pairs = match hostcalls::get_map_bytes(MapType::HttpRequestHeaders) {
            Ok(pairs) => pairs,
            Err(_) => return fail_closed(Reason::InternalError),
        };
        let headers = Headers::new(pairs);
        let Some(now) = now_secs() else { return fail_closed(Reason::InternalError) };
        let outcome = {
            let Ok(mut slot) = self.engine.try_borrow_mut() else {
                return fail_closed(Reason::InternalError);
            };
            let Some(engine) = slot.as_mut() else {
                return fail_closed(Reason::NotConfigured);
            };
            engine.on_request(&Request { headers: &headers, now })
        };
        match outcome.verdict {
            Verdict::Forward(edits) => {
                for name in &edits.remove {
                    if hostcalls::set_map_value_bytes(MapType::HttpRequestHeaders, name, None).is_err() {
                        return fail_closed(Reason::InternalError);
                    }
                }
                for (name, value) in &edits.set {
                    if hostcalls::set_map_value_bytes(MapType::HttpRequestHeaders, name, Some(value)).is_err() {
                        return fail_closed(Reason::InternalError);
                    }
                }
                Action::Continue
            }
            Verdict::Reply(reply) => {
                send_reply(&reply);
                Action::Pause
            }
        }
    }
}

/// Denies when the filter itself cannot decide.
fn fail_closed(reason: Reason) -> Action {
    let id = DecisionIds::new(random_seed()).next_id();
    send_reply(&LocalReply::deny(reason, &id, "x-mandate-decision-id"));
    Action::Pause
}

#[link(wasm_import_module = "env")]
extern "C" {
    fn proxy_send_local_response(
        status_code: u32,
        status_code_details_data: *const u8,
        status_code_details_size: usize,
        body_data: *const u8,
        body_size: usize,
        headers_data: *const u8,
        headers_size: usize,
        grpc_status: i32,
    ) -> Status;
}

/// Sends a local reply. Unlike the SDK wrapper this never panics on an
/// unexpected status: it logs and leaves the stream paused (denied).
fn send_reply(reply: &LocalReply) {
    let headers = serialize_pairs(&reply.headers);
    let details = b"mandate_denied";
    // SAFETY: all pointers reference live buffers for the duration of the call.
    let status = unsafe {
        proxy_send_local_response(
            u32::from(reply.status),
            details.as_ptr(),
            details.len(),
            reply.body.as_ptr(),
            reply.body.len(),
            headers.as_ptr(),
            headers.len(),
            -1,
        )
    };
    if status != Status::Ok {
        log(LogLevel::Error, &format!("mandate: local reply failed: {status:?}"));
    }
}
