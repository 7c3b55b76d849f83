//! A Txn-Token's claims, read strictly: every claim of the profile present with its shape,
//! `tctx` and `act` with no unknown members. Claims outside the profile grant nothing and are
//! not read.

use super::chain::{self, RawAct, RawMayAct};
use super::context::{RawContext, TxnContext};
use super::DelegationInfo;
use crate::policy::SignedIntent;
use serde::Deserialize;
use std::rc::Rc;

/// The registered claims of the profile. serde refuses a known claim given twice.
#[derive(Deserialize)]
pub(crate) struct RawClaims {
    pub iss: String,
    pub aud: String,
    pub iat: u64,
    pub exp: u64,
    #[serde(default, deserialize_with = "super::non_null")]
    pub nbf: Option<u64>,
    jti: String,
    txn: String,
    sub: String,
    scope: String,
    req_wl: String,
    tctx: RawContext,
    #[serde(default, deserialize_with = "super::non_null")]
    act: Option<RawAct>,
    #[serde(default, deserialize_with = "super::non_null")]
    may_act: Option<RawMayAct>,
}

/// A verified Transaction Token.
#[derive(Clone)]
pub struct TxnToken {
    /// The token as received: sent to the minter as the subject token, never logged.
    pub raw: Vec<u8>,
    /// First 16 bytes of the token's SHA-256 (credential cache keys).
    pub digest: [u8; 16],
    /// Unique per successful verification in this VM (decision cache keys).
    pub serial: u64,
    pub txn: String,
    pub sub: String,
    pub jti: String,
    pub iat: u64,
    pub exp: u64,
    pub scope: Vec<String>,
    pub req_wl: String,
    pub ctx: TxnContext,
    /// `[sub, …, current actor]`.
    pub chain: Vec<String>,
    pub may_act: Option<String>,
    pub has_loop: bool,
    /// What the decision record says (classes filled in at verification).
    pub info: Rc<DelegationInfo>,
}

impl std::fmt::Debug for TxnToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the token.
        write!(f, "TxnToken(token={}, depth={}, serial={})", self.info.token_hash, self.depth(), self.serial)
    }
}

impl PartialEq for TxnToken {
    fn eq(&self, other: &Self) -> bool {
        self.digest == other.digest && self.serial == other.serial
    }
}
impl Eq for TxnToken {}

fn b64url_id(s: &str) -> bool {
    (1..=128).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

fn scope_tokens(s: &str) -> Option<Vec<String>> {
    if s.is_empty() || s.len() > 4096 {
        return None;
    }
    let tokens: Vec<String> = s.split(' ').map(str::to_string).collect();
    let ok = tokens.iter().all(|t| !t.is_empty() && t.bytes().all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\'));
    ok.then_some(tokens)
}

impl TxnToken {
    /// Builds the token from claims already decoded (shape checks here; signature, issuer,
    /// audience and times are the verifier's).
    pub(crate) fn from_claims(c: RawClaims) -> Result<TxnToken, &'static str> {
        if !b64url_id(&c.jti) {
            return Err("jti");
        }
        if !b64url_id(&c.txn) {
            return Err("txn");
        }
        if c.exp < c.iat {
            return Err("exp_before_iat");
        }
        let scope = scope_tokens(&c.scope).ok_or("scope")?;
        let ctx = TxnContext::from_raw(c.tctx)?;
        let chain = chain::extract(&c.sub, c.act.as_ref())?;
        if !chain::spiffe_ok(&c.req_wl) {
            return Err("req_wl");
        }
        // The requesting workload is the current actor (the root's: the subject itself).
        if chain.last() != Some(&c.req_wl) {
            return Err("req_wl");
        }
        let may_act = match c.may_act {
            Some(m) if chain::spiffe_ok(&m.sub) => Some(m.sub),
            Some(_) => return Err("may_act"),
            None => None,
        };
        Ok(TxnToken {
            raw: Vec::new(),
            digest: [0; 16],
            serial: 0,
            has_loop: chain::has_loop(&chain),
            txn: c.txn,
            sub: c.sub,
            jti: c.jti,
            iat: c.iat,
            exp: c.exp,
            scope,
            req_wl: c.req_wl,
            ctx,
            chain,
            may_act,
            info: Rc::new(DelegationInfo::default()),
        })
    }

    /// A token described in plain terms (policy case files, tests): no signature behind it.
    pub fn described(chain: Vec<String>, ctx: TxnContext, scope: Vec<String>, may_act: Option<String>, iat: u64, exp: u64) -> TxnToken {
        let sub = chain.first().cloned().unwrap_or_default();
        TxnToken {
            raw: Vec::new(),
            digest: [0; 16],
            serial: 0,
            txn: "described".into(),
            req_wl: chain.last().cloned().unwrap_or_default(),
            has_loop: chain::has_loop(&chain),
            sub,
            jti: "described".into(),
            iat,
            exp,
            scope,
            ctx,
            chain,
            may_act,
            info: Rc::new(DelegationInfo::default()),
        }
    }

    /// Number of delegations (`act` levels).
    pub fn depth(&self) -> usize {
        self.chain.len().saturating_sub(1)
    }

    /// The current actor: outermost `act.sub`, else `sub`.
    pub fn actor(&self) -> &str {
        self.chain.last().map_or(self.sub.as_str(), String::as_str)
    }

    /// The intent and task the minter vouched for when it issued the token (it checked the
    /// task's registration for the subject), as a signed intent.
    pub fn vouched_intent(&self) -> SignedIntent {
        SignedIntent { intents: vec![self.ctx.intent.clone()], task: Some(self.ctx.task.clone()), exp: self.exp, from_txn_token: true }
    }

    /// Parses the claims JSON of a token (shape checks only).
    pub(crate) fn parse(claims_json: &[u8]) -> Result<(RawTimes, TxnToken), &'static str> {
        // The tree reader the configuration uses (duplicate keys refused too): no text
        // deserializer instantiated for these types, which keeps the module small.
        let c: RawClaims = crate::config::from_json(claims_json, "").map_err(|_| "claims")?;
        let times = RawTimes { iss: c.iss.clone(), aud: c.aud.clone(), iat: c.iat, exp: c.exp, nbf: c.nbf };
        Ok((times, TxnToken::from_claims(c)?))
    }
}

/// The claims the verifier checks against configuration and the clock.
pub(crate) struct RawTimes {
    pub iss: String,
    pub aud: String,
    pub iat: u64,
    pub exp: u64,
    pub nbf: Option<u64>,
}
