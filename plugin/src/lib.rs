//! mandate's proxy-wasm filter: the thin shell around [`mandate_core`].
//!
//! Every decision is made by mandate-core (core/); this crate only gathers a request's
//! inputs through proxy-wasm host calls, hands them to the engine and applies the verdict.
//! Native builds are empty: the shell exists only on wasm32.

#[cfg(target_arch = "wasm32")]
mod shell;
