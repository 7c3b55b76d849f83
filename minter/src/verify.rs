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

use mandate_plugin::config::IdentityConfig;
use mandate_plugin::identity::{Identity, Verifier};
use mandate_plugin::reason::Reason;
use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

/// Trust domain → (generation, bundle bytes).
type Fetched = HashMap<String, (u64, Arc<Vec<u8>>)>;

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

pub struct IdentitySource {
    id: u64,
    config: IdentityConfig,
    /// Trust domain → (generation, bundle bytes) from `bundle_url` fetches.
    fetched: RwLock<Fetched>,
    generation: AtomicU64,
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
    pub fn new(config: IdentityConfig) -> Result<IdentitySource, String> {
        // Fail at startup, not on the first request.
        Verifier::new(&config)?;
        Ok(IdentitySource {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            config,
            fetched: RwLock::new(HashMap::new()),
            generation: AtomicU64::new(0),
        })
    }

    /// Publishes a freshly fetched bundle for a trust domain.
    pub fn publish_bundle(&self, trust_domain: &str, body: Vec<u8>) {
        if let Ok(mut f) = self.fetched.write() {
            let gen = self.generation.fetch_add(1, Ordering::AcqRel) + 1;
            f.insert(trust_domain.to_string(), (gen, Arc::new(body)));
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

/// Fetches `http://` bundle URLs periodically and publishes them.
pub async fn fetch_loop(source: Arc<IdentitySource>, url: crate::config::BundleUrl, log: crate::Log) {
    let mut delay = std::time::Duration::from_secs(0);
    loop {
        tokio::time::sleep(delay).await;
        match tokio::time::timeout(std::time::Duration::from_secs(5), http_get(&url.url)).await {
            Ok(Ok(body)) => {
                // Validate before publishing: a bad body must not replace a good bundle.
                match mandate_plugin::identity::jwks::parse_bundle(&body) {
                    Ok(_) => {
                        source.publish_bundle(&url.trust_domain, body);
                        delay = std::time::Duration::from_secs(url.refresh_s);
                        log.debug(serde_json::json!({"msg": "bundle fetched", "trust_domain": url.trust_domain}));
                    }
                    Err(e) => {
                        log.error(serde_json::json!({"msg": "bundle rejected", "trust_domain": url.trust_domain, "error": e.to_string()}));
                        delay = std::time::Duration::from_secs(10);
                    }
                }
            }
            Ok(Err(e)) => {
                log.error(serde_json::json!({"msg": "bundle fetch failed", "trust_domain": url.trust_domain, "error": e.to_string()}));
                delay = std::time::Duration::from_secs(10);
            }
            Err(_) => {
                log.error(serde_json::json!({"msg": "bundle fetch timed out", "trust_domain": url.trust_domain}));
                delay = std::time::Duration::from_secs(10);
            }
        }
    }
}

async fn http_get(url: &str) -> anyhow::Result<Vec<u8>> {
    use http_body_util::BodyExt as _;
    let rest = url.strip_prefix("http://").ok_or_else(|| anyhow::anyhow!("not an http:// URL"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (rest.get(..i).unwrap_or(rest), rest.get(i..).unwrap_or("/")),
        None => (rest, "/"),
    };
    let addr = if authority.contains(':') { authority.to_string() } else { format!("{authority}:80") };
    let stream = tokio::net::TcpStream::connect(&addr).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
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
