//! The module's exports (ABI 0.2.1): the host calls these, and they route each callback to the
//! root or HTTP context it is for.
//!
//! This replaces the SDK's dispatcher, which `unwrap`s a refused `proxy_set_effective_context`
//! and `expect`s every callout token to have been registered by its own (panicking)
//! `dispatch_http_call`: either would trap the VM. Here an unknown context or token is ignored
//! (a request callback without its context is denied), a context that is busy (re-entered) is
//! not touched, and a stream the host will not switch to is told so, never unwrapped.

use super::host::{self, Action, LogLevel};
use super::{fail_closed, Http, Root};
use mandate_core::reason::Reason;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::mem::MaybeUninit;
use std::rc::Rc;

thread_local! {
    static ROOTS: RefCell<HashMap<u32, Rc<RefCell<Root>>>> = RefCell::new(HashMap::new());
    static STREAMS: RefCell<HashMap<u32, Rc<RefCell<Http>>>> = RefCell::new(HashMap::new());
    /// Outstanding HTTP calls: token → the context that dispatched it.
    static CALLOUTS: RefCell<HashMap<u32, u32>> = RefCell::new(HashMap::new());
    /// The context of the callback being run.
    static ACTIVE: Cell<u32> = const { Cell::new(0) };
}

/// Routes the answer of the call `token` to the context running now (the dispatcher).
pub(super) fn register_callout(token: u32) {
    let ctx = ACTIVE.with(Cell::get);
    CALLOUTS.with(|c| c.try_borrow_mut().map(|mut c| c.insert(token, ctx)).ok());
}

fn root(ctx: u32) -> Option<Rc<RefCell<Root>>> {
    ROOTS.with(|r| r.try_borrow().ok().and_then(|r| r.get(&ctx).cloned()))
}

fn stream(ctx: u32) -> Option<Rc<RefCell<Http>>> {
    STREAMS.with(|s| s.try_borrow().ok().and_then(|s| s.get(&ctx).cloned()))
}

/// Runs `f` on the root context `ctx`, or returns `default`.
fn on_root<R>(ctx: u32, default: R, f: impl FnOnce(&mut Root) -> R) -> R {
    ACTIVE.with(|a| a.set(ctx));
    match root(ctx) {
        Some(r) => r.try_borrow_mut().map_or(default, |mut r| f(&mut r)),
        None => default,
    }
}

/// Runs `f` on the HTTP context `ctx`, or `default()`.
fn on_stream<R>(ctx: u32, default: impl FnOnce() -> R, f: impl FnOnce(&mut Http) -> R) -> R {
    ACTIVE.with(|a| a.set(ctx));
    match stream(ctx).as_ref().and_then(|s| s.try_borrow_mut().ok()) {
        Some(mut h) => f(&mut h),
        None => default(),
    }
}

fn action(a: Action) -> u32 {
    a as u32
}

#[no_mangle]
pub extern "C" fn proxy_abi_version_0_2_1() {}

/// Memory the host fills for us (header maps, buffers): a boxed `[u8]` of exactly `size`,
/// taken back by `Vec::from_raw_parts(ptr, size, size)` in [`host`].
#[no_mangle]
pub extern "C" fn proxy_on_memory_allocate(size: usize) -> *mut u8 {
    Box::into_raw(Box::<[MaybeUninit<u8>]>::new_uninit_slice(size)).cast::<u8>()
}

#[cfg(target_os = "wasi")]
extern "C" {
    fn __wasm_call_ctors();
}

#[no_mangle]
pub extern "C" fn _initialize() {
    // SAFETY: the reactor's static constructors, run once by the host before any callback.
    #[cfg(target_os = "wasi")]
    unsafe {
        __wasm_call_ctors();
    }
    // A panic (none is expected: clippy denies them) traps the VM; at least say why.
    std::panic::set_hook(Box::new(|info| {
        let _ = host::log(LogLevel::Critical, info.to_string().as_bytes());
    }));
}

#[no_mangle]
pub extern "C" fn proxy_on_context_create(ctx: u32, parent: u32) {
    if parent == 0 {
        ROOTS.with(|r| r.try_borrow_mut().map(|mut r| r.insert(ctx, Rc::new(RefCell::new(Root::new())))).ok());
        return;
    }
    let Some(http) = on_root(parent, None, |r| Some(r.create_http_context(ctx))) else { return };
    STREAMS.with(|s| s.try_borrow_mut().map(|mut s| s.insert(ctx, Rc::new(RefCell::new(http)))).ok());
}

#[no_mangle]
pub extern "C" fn proxy_on_vm_start(ctx: u32, size: usize) -> u32 {
    u32::from(on_root(ctx, false, |r| r.on_vm_start(size)))
}

#[no_mangle]
pub extern "C" fn proxy_on_configure(ctx: u32, size: usize) -> u32 {
    u32::from(on_root(ctx, false, |r| r.on_configure(size)))
}

#[no_mangle]
pub extern "C" fn proxy_on_tick(ctx: u32) {
    on_root(ctx, (), Root::on_tick);
}

#[no_mangle]
pub extern "C" fn proxy_on_done(ctx: u32) -> u32 {
    if root(ctx).is_some() {
        return u32::from(on_root(ctx, true, Root::on_done));
    }
    1
}

#[no_mangle]
pub extern "C" fn proxy_on_log(ctx: u32) {
    on_stream(ctx, || (), Http::on_log);
}

#[no_mangle]
pub extern "C" fn proxy_on_delete(ctx: u32) {
    STREAMS.with(|s| s.try_borrow_mut().map(|mut s| s.remove(&ctx)).ok());
    ROOTS.with(|r| r.try_borrow_mut().map(|mut r| r.remove(&ctx)).ok());
    // The host cancels a deleted context's calls: forget their tokens.
    CALLOUTS.with(|c| c.try_borrow_mut().map(|mut c| c.retain(|_, owner| *owner != ctx)).ok());
}

#[no_mangle]
pub extern "C" fn proxy_on_request_headers(ctx: u32, num_headers: usize, end_of_stream: u32) -> u32 {
    // No context to decide with: the request is refused (and recorded), never passed.
    action(on_stream(ctx, || fail_closed(Reason::InternalError), |h| h.on_http_request_headers(num_headers, end_of_stream != 0)))
}

#[no_mangle]
pub extern "C" fn proxy_on_request_body(ctx: u32, body_size: usize, end_of_stream: u32) -> u32 {
    action(on_stream(ctx, || Action::Continue, |h| h.on_http_request_body(body_size, end_of_stream != 0)))
}

#[no_mangle]
pub extern "C" fn proxy_on_request_trailers(ctx: u32, num_trailers: usize) -> u32 {
    action(on_stream(ctx, || Action::Continue, |h| h.on_http_request_trailers(num_trailers)))
}

#[no_mangle]
pub extern "C" fn proxy_on_response_headers(ctx: u32, num_headers: usize, end_of_stream: u32) -> u32 {
    action(on_stream(ctx, || Action::Continue, |h| h.on_http_response_headers(num_headers, end_of_stream != 0)))
}

#[no_mangle]
pub extern "C" fn proxy_on_response_body(ctx: u32, body_size: usize, end_of_stream: u32) -> u32 {
    action(on_stream(ctx, || Action::Continue, |h| h.on_http_response_body(body_size, end_of_stream != 0)))
}

#[no_mangle]
pub extern "C" fn proxy_on_response_trailers(ctx: u32, num_trailers: usize) -> u32 {
    action(on_stream(ctx, || Action::Continue, |h| h.on_http_response_trailers(num_trailers)))
}

#[no_mangle]
pub extern "C" fn proxy_on_http_call_response(_ctx: u32, token: u32, num_headers: usize, body_size: usize, num_trailers: usize) {
    let Some(owner) = CALLOUTS.with(|c| c.try_borrow_mut().ok().and_then(|mut c| c.remove(&token))) else { return };
    if stream(owner).is_some() {
        // A stream the host will not switch to cannot be answered: the handler is told so.
        let addressable = host::set_effective_context(owner).is_ok();
        on_stream(owner, || (), |h| h.on_http_call_response(token, num_headers, body_size, num_trailers, addressable));
    } else if root(owner).is_some() {
        // Root work (bundles, revocations) touches no stream: a refusal changes nothing.
        let _ = host::set_effective_context(owner);
        on_root(owner, (), |r| r.on_http_call_response(token, num_headers, body_size, num_trailers));
    }
}
