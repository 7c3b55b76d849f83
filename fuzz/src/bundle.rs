//! Trust bundles (SPIFFE bundle or JWKS), inline and fetched.

use crate::NOW;
use mandate_core::config;
use mandate_core::identity::bundles::BundleStore;
use mandate_core::identity::jwks::parse_bundle;

/// Any bytes as a bundle: parsed the same way twice; a fetched body installs a bundle exactly
/// when it parses (and does not roll the sequence back), and a refused fetch never replaces
/// the bundle held. (A bundle may hold no key: a trust domain with no JWT authority yet.)
pub fn bundle(data: &[u8]) {
    let parsed = parse_bundle(data);
    if let Ok(b) = &parsed {
        let again = parse_bundle(data).map(|a| a.digest);
        assert_eq!(again.ok(), Some(b.digest), "the same bundle parsed to another digest");
    }
    let Ok(cfg) = config::parse(br#"{"identity": {"audiences": ["a"], "trust_domains": [{"name": "example.org", "bundle": {"cluster": "spire"}}]}}"#) else {
        panic!("the fuzz bundle configuration is refused");
    };
    let Some(td) = cfg.identity.trust_domains.first() else { return };
    let mut store = BundleStore::default();
    let Ok(id) = store.add_trust_domain(&td.name, &td.bundle) else { panic!("no fetched source") };
    assert!(store.current(id, NOW).is_none(), "a bundle before any fetch");
    let _ = store.due_fetches(NOW);
    store.on_fetch(id, Ok(data), NOW);
    assert_eq!(store.current(id, NOW).is_some(), parsed.is_ok(), "fetched bundle installed: {:?}", parsed.as_ref().err());
    // A second fetch of the same body changes nothing; a refused one keeps what is held.
    let generation = store.generation(id);
    store.on_fetch(id, Ok(data), NOW + 1);
    assert_eq!(store.generation(id), generation, "the same bundle fetched again is a new generation");
    store.on_fetch(id, Ok(b"{"), NOW + 2);
    assert_eq!(store.generation(id), generation, "a refused fetch replaced the bundle");
    assert_eq!(store.current(id, NOW + 2).is_some(), parsed.is_ok());
}
