//! Bundle store: the current bundle of every trust domain and OIDC issuer,
//! with refresh scheduling for bundles fetched through an Envoy cluster.
//!
//! The store plans fetches and takes their results; the shell does the I/O.
//! A failed fetch keeps the last good bundle, but only for `max_bundle_age_s`
//! after it was fetched: past that, or with no bundle yet, tokens of that
//! domain are refused (`bundle_unavailable`). A fetched bundle whose
//! `spiffe_sequence` is lower than the held one's is a rollback: refused, and
//! the held bundle stays. Inline bundles never age.

use super::jwks::{parse_bundle, Bundle};
use crate::config::BundleSourceConfig;
use std::collections::HashMap;

pub type SourceId = usize;

/// Shortest refresh honoured from a bundle's `spiffe_refresh_hint`, seconds.
pub const MIN_REFRESH_HINT_S: u64 = 5;

#[derive(Debug, Clone)]
pub struct Remote {
    pub cluster: String,
    pub path: String,
    pub authority: String,
    pub refresh_s: u64,
    pub retry_s: u64,
    pub timeout_ms: u64,
    /// The last good bundle verifies tokens for this long after it was fetched, seconds.
    pub max_age_s: u64,
}

#[derive(Debug)]
pub struct Source {
    /// Trust domain name or issuer URL.
    pub label: String,
    pub remote: Option<Remote>,
    bundle: Option<Bundle>,
    /// Bumped whenever the accepted key material changes.
    generation: u64,
    next_fetch_at: u64,
    in_flight: bool,
    /// When the held bundle was last fetched (or confirmed unchanged), for remote sources.
    good_at: u64,
    pub fetches_ok: u64,
    pub fetches_failed: u64,
    pub last_error: Option<String>,
}

/// A fetch the shell should dispatch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchPlan {
    pub source: SourceId,
    pub cluster: String,
    pub path: String,
    pub authority: String,
    pub timeout_ms: u64,
}

impl Source {
    fn usable(&self, now: u64) -> bool {
        match &self.remote {
            None => self.bundle.is_some(),
            Some(r) => self.bundle.is_some() && now.saturating_sub(self.good_at) <= r.max_age_s,
        }
    }
}

/// What a fetch result did, for logs and metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FetchReport {
    Updated { label: String, keys: usize, skipped: Vec<String> },
    Unchanged { label: String },
    /// `kept_previous`: a bundle that may still verify tokens is kept (it exists and is not
    /// older than `max_bundle_age_s`).
    Failed { label: String, error: String, kept_previous: bool },
}

#[derive(Debug, Default)]
pub struct BundleStore {
    sources: Vec<Source>,
    by_trust_domain: HashMap<String, SourceId>,
}

impl BundleStore {
    fn add(&mut self, label: &str, cfg: &BundleSourceConfig) -> Result<SourceId, String> {
        let (bundle, remote) = match (&cfg.inline, &cfg.cluster) {
            (Some(v), None) => {
                let raw = serde_json::to_vec(v).map_err(|e| e.to_string())?;
                (Some(parse_bundle(&raw).map_err(|e| e.to_string())?), None)
            }
            (None, Some(cluster)) => (
                None,
                Some(Remote {
                    cluster: cluster.clone(),
                    path: cfg.path.clone(),
                    authority: cfg.authority.clone().unwrap_or_else(|| cluster.clone()),
                    refresh_s: cfg.refresh_s,
                    retry_s: cfg.retry_s,
                    timeout_ms: cfg.timeout_ms,
                    max_age_s: cfg.max_bundle_age_s.unwrap_or(crate::config::DEFAULT_MAX_BUNDLE_AGE_S),
                }),
            ),
            _ => return Err(format!("bundle source for `{label}` needs exactly one of inline or cluster")),
        };
        let id = self.sources.len();
        self.sources.push(Source {
            label: label.to_string(),
            remote,
            generation: u64::from(bundle.is_some()),
            bundle,
            next_fetch_at: 0,
            in_flight: false,
            good_at: 0,
            fetches_ok: 0,
            fetches_failed: 0,
            last_error: None,
        });
        Ok(id)
    }

    pub fn add_trust_domain(&mut self, name: &str, cfg: &BundleSourceConfig) -> Result<SourceId, String> {
        let id = self.add(name, cfg)?;
        self.by_trust_domain.insert(name.to_string(), id);
        Ok(id)
    }

    pub fn add_issuer(&mut self, issuer: &str, cfg: &BundleSourceConfig) -> Result<SourceId, String> {
        self.add(issuer, cfg)
    }

    pub fn trust_domain(&self, name: &str) -> Option<SourceId> {
        self.by_trust_domain.get(name).copied()
    }

    /// The bundle that may verify tokens at `now`: none before the first good fetch, and none
    /// once the last good fetch is older than the source's `max_bundle_age_s`.
    pub fn current(&self, id: SourceId, now: u64) -> Option<(&Bundle, u64)> {
        let s = self.sources.get(id)?;
        if !s.usable(now) {
            return None;
        }
        s.bundle.as_ref().map(|b| (b, s.generation))
    }

    /// Whether the source's bundle may verify tokens at `now`.
    pub fn usable(&self, id: SourceId, now: u64) -> bool {
        self.sources.get(id).is_some_and(|s| s.usable(now))
    }

    pub fn generation(&self, id: SourceId) -> Option<u64> {
        self.sources.get(id).map(|s| s.generation)
    }

    pub fn sources(&self) -> &[Source] {
        &self.sources
    }

    pub fn has_remote(&self) -> bool {
        self.sources.iter().any(|s| s.remote.is_some())
    }

    /// Fetches due at `now`; each is marked in flight until its result arrives.
    pub fn due_fetches(&mut self, now: u64) -> Vec<FetchPlan> {
        let mut plans = Vec::new();
        for (id, s) in self.sources.iter_mut().enumerate() {
            let Some(r) = &s.remote else { continue };
            if s.in_flight || now < s.next_fetch_at {
                continue;
            }
            s.in_flight = true;
            plans.push(FetchPlan {
                source: id,
                cluster: r.cluster.clone(),
                path: r.path.clone(),
                authority: r.authority.clone(),
                timeout_ms: r.timeout_ms,
            });
        }
        plans
    }

    /// Takes a fetch result: `Ok(body)` for a 200 answer, else a description.
    pub fn on_fetch(&mut self, id: SourceId, result: Result<&[u8], String>, now: u64) -> Option<FetchReport> {
        let s = self.sources.get_mut(id)?;
        let r = s.remote.clone()?;
        s.in_flight = false;
        let parsed = result.and_then(|body| parse_bundle(body).map_err(|e| e.to_string())).and_then(|bundle| {
            match (s.bundle.as_ref().and_then(|b| b.sequence), bundle.sequence) {
                // SPIFFE bundles only move forward: an older sequence is a replayed (or
                // restored) bundle that may still hold withdrawn keys.
                (Some(held), Some(new)) if new < held => {
                    Err(format!("spiffe_sequence {new} is lower than the held bundle's {held}: rollback refused"))
                }
                (Some(held), None) => Err(format!("bundle has no spiffe_sequence while the held one has {held}: rollback refused")),
                _ => Ok(bundle),
            }
        });
        match parsed {
            Ok(bundle) => {
                s.fetches_ok += 1;
                s.last_error = None;
                // The hint may shorten the interval, never stretch it past the operator's
                // `refresh_s`: a huge hint must not freeze a bundle with withdrawn keys.
                let refresh = bundle.refresh_hint.map_or(r.refresh_s, |h| h.clamp(MIN_REFRESH_HINT_S, r.refresh_s));
                s.next_fetch_at = now.saturating_add(refresh);
                s.good_at = now;
                let changed = s.bundle.as_ref().is_none_or(|b| b.digest != bundle.digest);
                let report = if changed {
                    s.generation += 1;
                    FetchReport::Updated { label: s.label.clone(), keys: bundle.len(), skipped: bundle.skipped.clone() }
                } else {
                    FetchReport::Unchanged { label: s.label.clone() }
                };
                s.bundle = Some(bundle);
                Some(report)
            }
            Err(error) => {
                s.fetches_failed += 1;
                s.last_error = Some(error.clone());
                s.next_fetch_at = now.saturating_add(r.retry_s);
                Some(FetchReport::Failed { label: s.label.clone(), error, kept_previous: s.usable(now) })
            }
        }
    }
}
