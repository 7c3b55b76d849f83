//! mandate-core: the decision core of mandate, zero-trust policy for workloads and AI agents.
//!
//! Host-independent and tested natively: it makes no host calls. Its faces build on it:
//! the proxy-wasm filter (plugin/), the WebAssembly component (component/), the `mandate`
//! CLI (host-test/) and the minter's verification (minter/).
#![cfg_attr(
    test,
    allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)
)]

pub mod config;
pub mod decide;
pub mod decision;
pub mod delegation;
pub mod engine;
pub mod headers;
pub mod identity;
pub mod mcp;
pub mod mint;
pub mod policy;
pub mod reason;
pub mod record;
#[cfg(feature = "testkit")]
pub mod testkit;

/// Version reported in logs and decision records.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
