//! The delegation chain: RFC 8693 `act` nesting (current actor outermost) read into a list,
//! original principal first and current actor last.

use crate::identity::spiffe_id::SpiffeId;
use serde::Deserialize;

/// Deepest `act` nesting read at all; deeper is a malformed (oversized) token, whatever the
/// configured cap (which is checked later, on a well-formed chain).
pub const MAX_ACT_LEVELS: usize = 16;

/// One `act` level: exactly `sub`, and optionally the previous level.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawAct {
    sub: String,
    #[serde(default)]
    act: Option<Box<RawAct>>,
}

/// `may_act`: exactly `sub`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawMayAct {
    pub sub: String,
}

pub(crate) fn spiffe_ok(id: &str) -> bool {
    SpiffeId::parse(id).is_ok_and(|p| p.as_str() == id)
}

/// The chain `[sub, first delegate, …, current actor]`. Every member is a valid SPIFFE ID.
pub(crate) fn extract(sub: &str, act: Option<&RawAct>) -> Result<Vec<String>, &'static str> {
    if !spiffe_ok(sub) {
        return Err("sub");
    }
    // Outermost (current actor) first, as nested.
    let mut nested: Vec<&str> = Vec::new();
    let mut level = act;
    while let Some(a) = level {
        if nested.len() >= MAX_ACT_LEVELS {
            return Err("act_oversized");
        }
        if !spiffe_ok(&a.sub) {
            return Err("act");
        }
        nested.push(&a.sub);
        level = a.act.as_deref();
    }
    let mut chain = Vec::with_capacity(nested.len() + 1);
    chain.push(sub.to_string());
    chain.extend(nested.iter().rev().map(|s| s.to_string()));
    Ok(chain)
}

/// Whether a principal appears twice.
pub fn has_loop(chain: &[String]) -> bool {
    chain.iter().enumerate().any(|(i, p)| chain.iter().skip(i + 1).any(|q| q == p))
}

/// Each hop of the chain: (delegator, delegate).
pub fn edges(chain: &[String]) -> impl Iterator<Item = (&str, &str)> {
    chain.iter().zip(chain.iter().skip(1)).map(|(a, b)| (a.as_str(), b.as_str()))
}
