//! mandate: zero-trust policy for workloads and AI agents, as a proxy-wasm filter.
//!
//! Everything except [`shell`] is host-independent and tested natively; the
//! shell is the only code that makes proxy-wasm host calls.
#![cfg_attr(
    test,
    allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)
)]

pub mod config;
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

#[cfg(target_arch = "wasm32")]
mod shell;

/// Version reported in logs and decision records.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
