//! Subject- and actor-token verification with the plugin's `Verifier`.
//!
//! Why thread-locals: `Verifier` is not `Send` (it hands out `Rc<Identity>`
//! and keeps an LRU of verified tokens), and a `Mutex<Verifier>` would
//! serialize every exchange on one lock. So each Tokio worker thread builds its
//! own `Verifier` from the shared, validated `IdentityConfig` the first time it
//! needs one, and keeps it in a thread-local map keyed by the minter instance
//! (several minters can share threads, e.g. in tests). Verification is
//! synchronous and never held across an `.await`, so the `Rc` never leaves the
//! thread. Bundles fetched from `bundle_url`s are published here with a
//! generation number; each thread feeds the new bytes into its own Verifier
//! (whose cache is tied to the bundle generation) on its next use.
//!
//! Fetched bundles are bounded here, before the plugin's Verifier sees them:
//! a bundle whose `spiffe_sequence` is lower than the current one is refused
//! (rollback), and once the last good bundle of a trust domain is older than
//! its `max_bundle_age_s`, every token of that domain is refused with
//! `bundle_unavailable` until a fetch succeeds again.

use crate::config::{BundleTarget, BundleUrl};
use anyhow::{anyhow, bail, Context as _};
use mandate_core::config::IdentityConfig;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::CertificateDer;
use mandate_core::identity::{Identity, Verifier};
use mandate_core::reason::Reason;
use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

/// Trust domain → (generation, bundle bytes).
type Fetched = HashMap<String, (u64, Arc<Vec<u8>>)>;

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// Freshness of one fetched trust domain.
struct Freshness {
    max_age_s: u64,
    /// Unix time of the last good fetch (0: never).
    last_good: AtomicU64,
    /// `spiffe_sequence` of the current bundle (None: none yet, or the bundle has none).
    sequence: Mutex<Option<u64>>,
}

/// Why a fetched bundle was not published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    /// Its `spiffe_sequence` is lower than the current bundle's.
    Rollback { current: u64, offered: Option<u64> },
    /// The trust domain has no `bundle_url`.
    NotFetched,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refused::Rollback { current, offered: Some(o) } => write!(f, "spiffe_sequence {o} is lower than the current {current} (rollback)"),
            Refused::Rollback { current, offered: None } => write!(f, "bundle has no spiffe_sequence while the current one has {current} (rollback)"),
            Refused::NotFetched => write!(f, "trust domain has no bundle_url"),
        }
    }
}

pub struct IdentitySource {
    id: u64,
    config: IdentityConfig,
    /// Trust domain → (generation, bundle bytes) from `bundle_url` fetches.
    fetched: RwLock<Fetched>,
    generation: AtomicU64,
    /// Trust domains fed from `bundle_url`s (fixed at start).
    freshness: HashMap<String, Freshness>,
}

struct Local {
    verifier: Verifier,
    generation: u64,
    applied: HashMap<String, u64>,
}

thread_local! {
    static VERIFIERS: RefCell<HashMap<u64, Local>> = RefCell::new(HashMap::new());
}

impl IdentitySource {
    /// `fetched` lists the trust domains fed from `bundle_url`s, with their `max_bundle_age_s`.
    pub fn new(config: IdentityConfig, fetched: &[(String, u64)]) -> Result<IdentitySource, String> {
        // Fail at startup, not on the first request.
        Verifier::new(&config)?;
        let freshness = fetched
            .iter()
            .map(|(td, max_age_s)| {
                let f = Freshness { max_age_s: *max_age_s, last_good: AtomicU64::new(0), sequence: Mutex::new(None) };
                (td.clone(), f)
            })
            .collect();
        Ok(IdentitySource {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            config,
            fetched: RwLock::new(HashMap::new()),
            generation: AtomicU64::new(0),
            freshness,
        })
    }

    /// Publishes a freshly fetched (already parsed) bundle for a trust domain, fetched at `now`.
    /// A lower `spiffe_sequence` than the current bundle's is refused and changes nothing: the
    /// last good bundle keeps ageing.
    pub fn publish_bundle(&self, trust_domain: &str, body: Vec<u8>, sequence: Option<u64>, now: u64) -> Result<(), Refused> {
        let fresh = self.freshness.get(trust_domain).ok_or(Refused::NotFetched)?;
        let mut seq = fresh.sequence.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(current) = *seq {
            if sequence.is_none_or(|offered| offered < current) {
                return Err(Refused::Rollback { current, offered: sequence });
            }
        }
        *seq = sequence;
        // Every good fetch reaches each thread's Verifier (an unchanged bundle keeps its
        // verification cache there), so a verifier-side age bound sees the fetch too.
        if let Ok(mut f) = self.fetched.write() {
            let gen = self.generation.fetch_add(1, Ordering::AcqRel) + 1;
            f.insert(trust_domain.to_string(), (gen, Arc::new(body)));
        }
        fresh.last_good.store(now.max(1), Ordering::Release);
        Ok(())
    }

    /// True when a fetched trust domain's last good bundle is older than its `max_bundle_age_s`
    /// (or it never had one).
    pub fn is_stale(&self, trust_domain: &str, now: u64) -> bool {
        match self.freshness.get(trust_domain) {
            None => false,
            Some(f) => {
                let last = f.last_good.load(Ordering::Acquire);
                last == 0 || now.saturating_sub(last) > f.max_age_s
            }
        }
    }

    /// Verifies `token` on this thread's Verifier and maps the identity with `f`.
    pub fn verify<R>(&self, token: &[u8], now: u64, f: impl FnOnce(&Identity) -> R) -> Result<R, Reason> {
        VERIFIERS.with(|cell| {
            let mut map = cell.borrow_mut();
            let local = match map.entry(self.id) {
                std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::hash_map::Entry::Vacant(v) => {
                    let verifier = Verifier::new(&self.config).map_err(|_| Reason::NotConfigured)?;
                    v.insert(Local { verifier, generation: 0, applied: HashMap::new() })
                }
            };
            let gen = self.generation.load(Ordering::Acquire);
            if gen != local.generation {
                self.apply_fetched(local, now);
                local.generation = gen;
            }
            let identity = local.verifier.verify(token, now)?;
            // A fetched bundle past its age bound no longer vouches for anything.
            if identity.trust_domain.as_deref().is_some_and(|td| self.is_stale(td, now)) {
                return Err(Reason::BundleUnavailable);
            }
            Ok(f(&identity))
        })
    }

    fn apply_fetched(&self, local: &mut Local, now: u64) {
        let Ok(fetched) = self.fetched.read() else { return };
        for (td, (gen, body)) in fetched.iter() {
            if local.applied.get(td) == Some(gen) {
                continue;
            }
            if let Some(id) = local.verifier.bundles.trust_domain(td) {
                let _ = local.verifier.bundles.on_fetch(id, Ok(body.as_slice()), now);
            }
            local.applied.insert(td.clone(), *gen);
        }
    }

    /// Drops this instance's Verifier on the calling thread (best effort; others go with their threads).
    pub fn forget_on_this_thread(&self) {
        let _ = VERIFIERS.try_with(|cell| cell.borrow_mut().remove(&self.id));
    }
}

impl Drop for IdentitySource {
    fn drop(&mut self) {
        self.forget_on_this_thread();
    }
}

/// Fetches one trust domain's bundle: plain HTTP to a loopback host, or HTTPS trusting only
/// the configured CA. Built at startup, so a bad URL or CA file stops the minter there.
pub struct BundleFetcher {
    pub url: BundleUrl,
    target: BundleTarget,
    tls: Option<tokio_rustls::TlsConnector>,
}

impl BundleFetcher {
    pub fn new(url: &BundleUrl) -> anyhow::Result<BundleFetcher> {
        let target = BundleTarget::parse(&url.url).map_err(|e| anyhow!("bundle_url of `{}`: {e}", url.trust_domain))?;
        let tls = match (target.tls, &url.bundle_ca) {
            (false, _) => None,
            (true, None) => bail!("bundle_url of `{}` is https:// but names no bundle_ca", url.trust_domain),
            (true, Some(ca)) => {
                let mut roots = rustls::RootCertStore::empty();
                for c in CertificateDer::pem_file_iter(ca).with_context(|| format!("reading bundle_ca {}", ca.display()))? {
                    roots.add(c.with_context(|| format!("parsing bundle_ca {}", ca.display()))?)?;
                }
                if roots.is_empty() {
                    bail!("bundle_ca {} holds no certificate", ca.display());
                }
                let provider = Arc::new(rustls::crypto::ring::default_provider());
                let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
                    .with_safe_default_protocol_versions()?
                    .with_root_certificates(roots)
                    .with_no_client_auth();
                cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
                Some(tokio_rustls::TlsConnector::from(Arc::new(cfg)))
            }
        };
        Ok(BundleFetcher { url: url.clone(), target, tls })
    }

    /// One GET of the bundle (body at most 1 MiB).
    pub async fn fetch(&self) -> anyhow::Result<Vec<u8>> {
        let t = &self.target;
        let stream = if t.tls {
            tokio::net::TcpStream::connect((t.host.as_str(), t.port)).await?
        } else {
            // Plain HTTP: connect only to loopback addresses, whatever `localhost` resolves to.
            let addrs: Vec<std::net::SocketAddr> =
                tokio::net::lookup_host((t.host.as_str(), t.port)).await?.filter(|a| crate::config::is_loopback_host(&a.ip().to_string())).collect();
            let addr = addrs.first().ok_or_else(|| anyhow!("`{}` resolves to no loopback address", t.host))?;
            tokio::net::TcpStream::connect(addr).await?
        };
        match &self.tls {
            None => get(stream, &t.authority, &t.path).await,
            Some(connector) => {
                let name = rustls::pki_types::ServerName::try_from(t.host.clone()).map_err(|e| anyhow!("bad server name: {e}"))?;
                let tls = connector.connect(name, stream).await?;
                get(tls, &t.authority, &t.path).await
            }
        }
    }
}

/// Fetches a bundle periodically and publishes it (refusing rollbacks; logging staleness).
pub async fn fetch_loop(source: Arc<IdentitySource>, fetcher: BundleFetcher, log: crate::Log) {
    let url = fetcher.url.clone();
    let retry = std::time::Duration::from_secs(url.refresh_s.min(10));
    let mut delay = std::time::Duration::from_secs(0);
    let mut stale_logged = false;
    loop {
        tokio::time::sleep(delay).await;
        delay = retry;
        match tokio::time::timeout(std::time::Duration::from_secs(5), fetcher.fetch()).await {
            Ok(Ok(body)) => {
                // Validate before publishing: a bad body must not replace a good bundle.
                match mandate_core::identity::jwks::parse_bundle(&body) {
                    Ok(bundle) => match source.publish_bundle(&url.trust_domain, body, bundle.sequence, crate::now()) {
                        Ok(()) => {
                            delay = std::time::Duration::from_secs(url.refresh_s);
                            stale_logged = false;
                            log.debug(serde_json::json!({"msg": "bundle fetched", "trust_domain": url.trust_domain, "spiffe_sequence": bundle.sequence}));
                        }
                        Err(e) => log.error(serde_json::json!({"msg": "bundle refused", "trust_domain": url.trust_domain, "error": e.to_string()})),
                    },
                    Err(e) => log.error(serde_json::json!({"msg": "bundle rejected", "trust_domain": url.trust_domain, "error": e.to_string()})),
                }
            }
            Ok(Err(e)) => log.error(serde_json::json!({"msg": "bundle fetch failed", "trust_domain": url.trust_domain, "error": e.to_string()})),
            Err(_) => log.error(serde_json::json!({"msg": "bundle fetch timed out", "trust_domain": url.trust_domain})),
        }
        if source.is_stale(&url.trust_domain, crate::now()) && !stale_logged {
            stale_logged = true;
            log.error(serde_json::json!({"msg": "no bundle younger than max_bundle_age_s: tokens of this trust domain are refused (bundle_unavailable)", "trust_domain": url.trust_domain, "max_bundle_age_s": url.max_bundle_age_s}));
        }
    }
}

async fn get<I>(io: I, authority: &str, path: &str) -> anyhow::Result<Vec<u8>>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    use http_body_util::BodyExt as _;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(io)).await?;
    let task = tokio::spawn(conn);
    let req = hyper::Request::get(path)
        .header(hyper::header::HOST, authority)
        .header(hyper::header::ACCEPT, "application/json")
        .body(http_body_util::Empty::<axum::body::Bytes>::new())?;
    let resp = sender.send_request(req).await?;
    if !resp.status().is_success() {
        task.abort();
        anyhow::bail!("HTTP {}", resp.status());
    }
    let body = http_body_util::Limited::new(resp.into_body(), 1 << 20).collect().await.map_err(|e| anyhow::anyhow!("{e}"))?;
    task.abort();
    Ok(body.to_bytes().to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(max_age: u64) -> Result<IdentitySource, String> {
        let cfg = serde_json::json!({"identity": {"audiences": ["m"], "trust_domains": [{"name": "td.test", "bundle": {"cluster": "x", "refresh_s": 5, "retry_s": 5}}]}});
        let parsed = mandate_core::config::parse(cfg.to_string().as_bytes()).map_err(|e| e.to_string())?;
        IdentitySource::new(parsed.identity, &[("td.test".to_string(), max_age)])
    }

    #[test]
    fn bundle_rollback_to_older_sequence_is_refused() {
        let s = source(3600).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(s.publish_bundle("td.test", b"{\"keys\":[],\"spiffe_sequence\":7}".to_vec(), Some(7), 1000), Ok(()));
        let gen = s.generation.load(Ordering::Acquire);
        let r = s.publish_bundle("td.test", b"{\"keys\":[],\"spiffe_sequence\":6}".to_vec(), Some(6), 1001);
        assert_eq!(r, Err(Refused::Rollback { current: 7, offered: Some(6) }));
        let r = s.publish_bundle("td.test", b"{\"keys\":[]}".to_vec(), None, 1001);
        assert!(matches!(r, Err(Refused::Rollback { .. })), "dropping the sequence is a rollback too");
        assert_eq!(s.generation.load(Ordering::Acquire), gen, "a refused bundle reached the verifiers");
        // The same or a newer sequence is fine.
        assert_eq!(s.publish_bundle("td.test", b"{\"keys\":[],\"spiffe_sequence\":7}".to_vec(), Some(7), 1002), Ok(()));
        assert_eq!(s.publish_bundle("td.test", b"{\"keys\":[],\"spiffe_sequence\":8}".to_vec(), Some(8), 1003), Ok(()));
    }

    #[test]
    fn last_good_bundle_is_trusted_only_for_max_bundle_age() {
        let s = source(100).unwrap_or_else(|e| panic!("{e}"));
        assert!(s.is_stale("td.test", 1000), "no bundle yet");
        assert_eq!(s.publish_bundle("td.test", b"{\"keys\":[]}".to_vec(), None, 1000), Ok(()));
        assert!(!s.is_stale("td.test", 1100));
        assert!(s.is_stale("td.test", 1101), "trusted forever while fetches fail");
        // A refused rollback does not refresh the age.
        assert_eq!(s.publish_bundle("td.test", b"{\"keys\":[],\"spiffe_sequence\":3}".to_vec(), Some(3), 1050), Ok(()));
        assert!(s.publish_bundle("td.test", b"{\"keys\":[],\"spiffe_sequence\":2}".to_vec(), Some(2), 1140).is_err());
        assert!(s.is_stale("td.test", 1151));
        assert!(!s.is_stale("inline.test", 1_000_000), "inline bundles do not age");
    }
}
