//! mandate-host-test: a proxy-wasm ABI 0.2.1 host on wasmtime, written from
//! the specification, for testing proxy-wasm filters without Envoy.
//!
//! * [`Host`]: engine, compiled module and the state shared by its VMs
//!   (clock, shared data, queues, metrics, logs, properties, upstreams).
//! * [`Vm`]: one instance (one Envoy worker) with its root context; drive
//!   HTTP streams through it and answer the filter's HTTP calls.
//! * [`run_request`]: one request from a JSON [`RequestSpec`] to an [`Outcome`].
//! * Fault injection: [`Host::fail_call`] makes the host answer a hostcall with an error
//!   status (every call, or only the nth: [`Host::fail_nth_call`]) to test that a module
//!   survives a host that refuses it.
//!
//! Every import the module declares that this host does not implement is
//! linked to a function that fails with `unimplemented hostcall: <name>`;
//! traps are errors with the wasm backtrace, and break the VM.
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod abi;
mod foreign;
mod host;
mod hostcalls;
mod mem;
pub mod runner;
pub mod schema;
mod vm;
mod wasi;

pub use abi::{Action, BufferType, Headers, LogLevel, MapType, MetricType, Status, StreamType};
pub use host::{ConfigRejected, Host, LogEntry, MetricValue};
pub use runner::{run_request, Outcome, RequestSpec, Verdict};
pub use vm::{
    header_value, CalloutReply, Forwarded, HttpCallout, LocalResponse, StreamId, StreamState, Vm,
};
pub use wasi::ProcExit;
