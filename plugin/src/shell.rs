//! The proxy-wasm shell: the only code that makes host calls.
//!
//! It gathers inputs with as few host calls as possible, hands them to the
//! core [`Engine`], and applies the verdict. Every host error on the decision
//! path denies; nothing here may panic (a panic traps the VM for all traffic).

use crate::config;
use crate::decision::{DecisionIds, LocalReply};
use crate::engine::{Engine, Verdict};
use crate::headers::{serialize_pairs, Headers};
use crate::reason::Reason;
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, LogLevel, MapType, Status};
use std::cell::RefCell;
use std::rc::Rc;

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

struct Root {
    engine: SharedEngine,
    seed: u64,
}

impl Root {
    fn new() -> Root {
        Root { engine: Rc::new(RefCell::new(None)), seed: random_seed() }
    }
}

impl Context for Root {}

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
                let Ok(mut slot) = self.engine.try_borrow_mut() else {
                    log(LogLevel::Error, "mandate: configuration update while a request is in flight");
                    return false;
                };
                *slot = Some(Engine::new(config, self.seed));
                log(LogLevel::Info, &format!("mandate {}: configured", crate::VERSION));
                true
            }
            Err(e) => {
                log(LogLevel::Error, &format!("mandate: {e}"));
                false
            }
        }
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
        let outcome = {
            let Ok(mut slot) = self.engine.try_borrow_mut() else {
                return fail_closed(Reason::InternalError);
            };
            let Some(engine) = slot.as_mut() else {
                return fail_closed(Reason::NotConfigured);
            };
            engine.on_request(&headers)
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
