//! mandate's fuzz checks: one function per parser, each asserting the parser's invariants.
//!
//! The same checks run two ways: as coverage-guided libFuzzer targets (`fuzz/libfuzzer`,
//! `scripts/fuzz`), and as a deterministic smoke on the stable toolchain (`fuzz-smoke`, run by
//! `scripts/test`) over the committed seeds in `fuzz/corpus/<target>/` plus mutations of them.
//! A check panics when an invariant breaks; an input a parser refuses is never a failure.
//!
//! Inputs that need a signature (the token targets, the engine, the minter) are signed here,
//! with a key made in this process: the fuzzer drives what is signed, and a token the fuzzer
//! changed afterwards must never verify.
#![allow(clippy::panic)]

pub mod bundle;
pub mod config;
pub mod decision_log;
pub mod feed;
pub mod headers;
pub mod input;
pub mod intent;
pub mod jwt;
pub mod mcp;
pub mod minter;
pub mod mutate;
pub mod path;
pub mod spiffe;
pub mod txn;

/// One fuzz target: its name (the corpus folder and the libFuzzer binary) and its check.
pub struct Target {
    pub name: &'static str,
    pub check: fn(&[u8]),
    /// Mutated inputs the smoke runs (signing targets are slower and get fewer).
    pub smoke_mutations: usize,
}

/// Every target, in the order the smoke and `scripts/fuzz` run them.
pub const TARGETS: &[Target] = &[
    Target { name: "jws_parse", check: jwt::jws_parse, smoke_mutations: 3000 },
    Target { name: "jwt_forgery", check: jwt::jwt_forgery, smoke_mutations: 400 },
    Target { name: "spiffe_id", check: spiffe::spiffe_id, smoke_mutations: 4000 },
    Target { name: "path", check: path::path, smoke_mutations: 4000 },
    Target { name: "headers", check: headers::headers, smoke_mutations: 3000 },
    Target { name: "intent_token", check: intent::intent_token, smoke_mutations: 400 },
    Target { name: "config", check: config::config, smoke_mutations: 400 },
    Target { name: "policy", check: config::policy, smoke_mutations: 2000 },
    Target { name: "bundle", check: bundle::bundle, smoke_mutations: 2000 },
    Target { name: "revocation_feed", check: feed::revocation_feed, smoke_mutations: 3000 },
    Target { name: "mcp_jsonrpc", check: mcp::mcp_jsonrpc, smoke_mutations: 3000 },
    Target { name: "txn_token", check: txn::txn_token, smoke_mutations: 400 },
    Target { name: "minter_form", check: minter::minter_form, smoke_mutations: 400 },
    Target { name: "minter_json", check: minter::minter_json, smoke_mutations: 2000 },
    Target { name: "decision_log", check: decision_log::decision_log, smoke_mutations: 2000 },
];

/// The target called `name`.
pub fn target(name: &str) -> Option<&'static Target> {
    TARGETS.iter().find(|t| t.name == name)
}

/// The time every check judges tokens at (Unix seconds).
pub const NOW: u64 = 1_800_000_000;
