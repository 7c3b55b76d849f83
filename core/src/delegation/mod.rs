//! Delegation, the proxy side (issue 13): the mandate Transaction Token profile.
//!
//! A caller that acts for someone else presents its own SVID (`authorization`) and a
//! Transaction Token (`txn-token`, `typ: txntoken+jwt`, issued by the minter) that carries the
//! chain: the original principal (`sub`) and every delegate since (`act`, current actor
//! outermost). The filter verifies the token ([`verify`], with the claim shapes of [`token`]
//! and [`context`]), reads the chain ([`chain`]) and re-authorises the request for every
//! principal in it ([`judge`]): nothing is inherited, rights only narrow.
//!
//! Check order (each failure denies): the token (401 `delegation_token_invalid`); the chain
//! (`delegation_loop`, `delegation_chain_too_deep`, `delegation_actor_mismatch`); the context
//! (intent and task, `delegation_scope_exceeded`); revocations (`task_revoked`,
//! `subject_revoked`); the edges (`delegation_not_allowed`); the intersection
//! (`delegation_not_allowed`); the grants within the token (`delegation_scope_exceeded`).

pub mod chain;
pub mod context;
pub mod judge;
pub mod token;
pub mod verify;

use crate::config::BundleSourceConfig;
use crate::reason::Reason;
use serde::{Deserialize, Serialize};

pub use token::TxnToken;
pub use verify::DelegationVerifier;

/// RFC 8693 token type of Transaction Tokens (the minter's `TOKEN_TYPE_TXN_TOKEN`).
pub const TXN_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:txn_token";
/// Default request header carrying the Txn-Token.
pub const DEFAULT_HEADER: &str = "txn-token";
/// Default (and the minter's) cap on the number of delegations.
pub const DEFAULT_MAX_DELEGATIONS: u32 = 2;
/// Highest `max_delegations` accepted in configuration or policy.
pub const MAX_DELEGATIONS_CAP: u32 = 8;

/// An optional member that, when present, must have its type: the profile has no `null`, and a
/// `null` grant (`"tools": null`) is malformed, never read as the member being absent (no
/// constraint). Use with `#[serde(default, deserialize_with = "non_null")]`.
pub(crate) fn non_null<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    T::deserialize(d).map(Some)
}

fn default_header() -> String {
    DEFAULT_HEADER.into()
}
fn default_max() -> u32 {
    DEFAULT_MAX_DELEGATIONS
}
fn default_cache() -> usize {
    1024
}

/// The `delegation` section of the plugin configuration.
#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct DelegationConfig {
    /// Request header carrying the Txn-Token (lowercase).
    #[serde(default = "default_header")]
    #[cfg_attr(feature = "schema", schemars(pattern(crate::config::HEADER_NAME_PATTERN), extend("not" = {"pattern": "^x-mandate-"})))]
    pub header: String,
    /// The minter's issuer (`iss` of every Txn-Token).
    #[cfg_attr(feature = "schema", schemars(length(min = 1)))]
    pub issuer: String,
    /// The trust domain Txn-Tokens are issued for (`aud`).
    #[cfg_attr(feature = "schema", schemars(length(min = 1)))]
    pub audience: String,
    /// The minter's Txn-Token signing keys: the same sources a trust domain bundle accepts
    /// (inline JWKS, or fetched through a cluster).
    pub keys: BundleSourceConfig,
    /// At most this many delegations (`act` levels) in a chain.
    #[serde(default = "default_max")]
    #[cfg_attr(feature = "schema", schemars(range(max = 8)))]
    pub max_delegations: u32,
    /// Verified Txn-Tokens kept per worker (0 disables the cache).
    #[serde(default = "default_cache")]
    #[cfg_attr(feature = "schema", schemars(range(max = 1000000)))]
    pub cache_size: usize,
}

/// What a decision record says about a delegated request. Tokens appear as short hashes only.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct DelegationInfo {
    /// Short hash of the transaction id (`txn`): the same on every hop of one transaction.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub txn: Option<String>,
    /// Short hash of the Txn-Token itself.
    pub token_hash: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub depth: Option<usize>,
    /// Original principal first, current actor last.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub chain: Vec<ChainEntry>,
    /// The principal (or edge) that refused, and its own reason.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failed: Option<Failed>,
    /// Why the token did not verify (a fixed word, never token content).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub invalid: Option<&'static str>,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ChainEntry {
    pub principal: String,
    pub class: Option<String>,
}

/// Where a delegated request was refused (or, in dry run, would have been).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Failed {
    /// The principal refused (for an edge: the delegate).
    pub principal: String,
    /// For an edge: the delegator.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    /// The principal's own reason (an edge: `delegation_not_allowed`).
    pub reason: Reason,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    /// Within-token refusals: what went beyond the token (`resource`, `tool`, `arguments`,
    /// `scope`, `workload`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exceeded: Option<&'static str>,
}

#[cfg(test)]
mod tests;
