//! Txn-Token verification: the JWS against the minter's keys (held in the identity bundle
//! store, so fetched key sets refresh like trust bundles, and checked with the same host
//! crypto), `typ: txntoken+jwt`, `iss`, `aud`, the times with the usual skew, and the claim
//! shapes. A verified token is cached by its exact bytes (as SVIDs are), tied to the key-set
//! generation that verified it, until its `exp`; each verification gets a serial that the
//! decision cache keys on, so a warm delegated call re-parses nothing.

use super::token::TxnToken;
use super::{ChainEntry, DelegationConfig, DelegationInfo};
use crate::identity::bundles::{BundleStore, SourceId};
use crate::identity::jws::{self, Kind};
use crate::identity::{short_hash, token_digest, Verifier};
use crate::reason::Reason;
use lru::LruCache;
use std::num::NonZeroUsize;
use std::rc::Rc;

struct Cached {
    token: Rc<TxnToken>,
    generation: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DelegationStats {
    pub cache_hits: u64,
    pub cache_misses: u64,
}

pub struct DelegationVerifier {
    pub header: String,
    issuer: String,
    audience: String,
    pub max_delegations: u32,
    source: SourceId,
    cache: Option<LruCache<Box<[u8]>, Cached>>,
    serials: u64,
    pub stats: DelegationStats,
}

/// A verification failure: a fixed word for the record (never token content). The request
/// is refused with `delegation_token_invalid` whatever the word.
pub type Invalid = &'static str;

fn header_word(r: Reason) -> Invalid {
    match r {
        Reason::TypNotAllowed => "typ",
        Reason::AlgNotAllowed => "alg",
        Reason::CritNotAllowed => "crit",
        Reason::KidMissing => "kid",
        _ => "malformed",
    }
}

impl DelegationVerifier {
    /// Registers the key source in `bundles` (the identity verifier's store).
    pub fn new(cfg: &DelegationConfig, bundles: &mut BundleStore) -> Result<DelegationVerifier, String> {
        let source = bundles.add_issuer(&format!("txn-token issuer {}", cfg.issuer), &cfg.keys)?;
        Ok(DelegationVerifier {
            header: cfg.header.clone(),
            issuer: cfg.issuer.clone(),
            audience: cfg.audience.clone(),
            max_delegations: cfg.max_delegations,
            source,
            cache: NonZeroUsize::new(cfg.cache_size).map(LruCache::new),
            serials: 0,
            stats: DelegationStats::default(),
        })
    }

    /// Verifies a Txn-Token at `now`. `classify` names each chain principal's workload class
    /// (for the record; computed once per verification).
    #[inline(never)]
    pub fn verify(&mut self, ids: &Verifier, token: &[u8], now: u64, classify: &dyn Fn(&str) -> Option<String>) -> Result<Rc<TxnToken>, Invalid> {
        if token.is_empty() || token.len() > ids.max_token_bytes() {
            return Err("size");
        }
        let skew = ids.skew();
        if let Some(cache) = self.cache.as_mut() {
            if let Some(entry) = cache.get(token) {
                let current = ids.bundles.generation(self.source) == Some(entry.generation);
                let expired = now > entry.token.exp.saturating_add(skew);
                if current && ids.bundles.usable(self.source, now) && !expired {
                    self.stats.cache_hits += 1;
                    return Ok(entry.token.clone());
                }
                // Rotated keys: verify again; expired or keys gone stale: refused below.
                cache.pop(token);
            }
        }
        self.stats.cache_misses += 1;

        let parsed = jws::parse_as(token, ids.max_token_bytes(), Kind::TxnToken).map_err(header_word)?;
        let (bundle, generation) = ids.bundles.current(self.source, now).ok_or("keys_unavailable")?;
        let key = bundle.key(&parsed.kid).ok_or("kid_unknown")?;
        if !key.accepts(parsed.alg) {
            return Err("alg");
        }
        let (times, mut t) = TxnToken::parse(&parsed.claims_json)?;
        if times.iss != self.issuer {
            return Err("iss");
        }
        if times.aud != self.audience {
            return Err("aud");
        }
        if now > times.exp.saturating_add(skew) {
            return Err("expired");
        }
        if times.iat > now.saturating_add(skew) || times.nbf.is_some_and(|n| n > now.saturating_add(skew)) {
            return Err("not_yet_valid");
        }
        ids.check_signature(&parsed, key).map_err(|_| "signature")?;

        let digest = token_digest(token);
        t.raw = token.to_vec();
        t.digest = digest;
        t.serial = self.serials;
        self.serials = self.serials.wrapping_add(1);
        t.info = Rc::new(DelegationInfo {
            txn: Some(short_hash(&token_digest(t.txn.as_bytes()))),
            token_hash: short_hash(&digest),
            depth: Some(t.depth()),
            chain: t.chain.iter().map(|p| ChainEntry { principal: p.clone(), class: classify(p) }).collect(),
            failed: None,
            invalid: None,
        });
        let t = Rc::new(t);
        if let Some(cache) = self.cache.as_mut() {
            cache.put(token.into(), Cached { token: t.clone(), generation });
        }
        Ok(t)
    }

    pub fn cache_len(&self) -> usize {
        self.cache.as_ref().map_or(0, LruCache::len)
    }
}
