//! SPIFFE IDs, against a second reading of the SPIFFE-ID specification written here.

use mandate_core::identity::spiffe_id::{validate_trust_domain, SpiffeId, MAX_ID_BYTES, MAX_TRUST_DOMAIN_BYTES};

/// The specification read again, byte by byte: `spiffe://`, a trust domain of 1..=255 bytes
/// of `[a-z0-9._-]`, then zero or more `/segment` with each segment non-empty, not `.` or
/// `..`, of `[a-zA-Z0-9._-]`; at most 2048 bytes in all.
fn reference(s: &str) -> bool {
    let b = s.as_bytes();
    if b.is_empty() || b.len() > MAX_ID_BYTES || !b.starts_with(b"spiffe://") {
        return false;
    }
    let rest = b.get(9..).unwrap_or_default();
    let td_len = rest.iter().take_while(|&&c| c != b'/').count();
    if td_len == 0 || td_len > MAX_TRUST_DOMAIN_BYTES {
        return false;
    }
    let (td, path) = rest.split_at(td_len);
    if !td.iter().all(|&c| matches!(c, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'_' | b'-')) {
        return false;
    }
    let mut seg_start = 0usize;
    let mut i = 0usize;
    // path is empty or starts with '/'
    while i < path.len() {
        let c = path.get(i).copied().unwrap_or(0);
        if c == b'/' {
            if i > 0 && !segment_ok(path.get(seg_start..i).unwrap_or_default()) {
                return false;
            }
            seg_start = i + 1;
        } else if !matches!(c, b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'.' | b'_' | b'-') {
            return false;
        }
        i += 1;
    }
    path.is_empty() || segment_ok(path.get(seg_start..).unwrap_or_default())
}

fn segment_ok(seg: &[u8]) -> bool {
    !seg.is_empty() && seg != b"." && seg != b".."
}

fn check(s: &str) {
    let parsed = SpiffeId::parse(s);
    assert_eq!(parsed.is_ok(), reference(s), "parser and specification disagree on {s:?}: {parsed:?}");
    if let Ok(id) = parsed {
        assert_eq!(id.as_str(), s);
        assert_eq!(format!("spiffe://{}{}", id.trust_domain(), id.path()), s, "trust domain and path do not make up the ID");
        assert!(validate_trust_domain(id.trust_domain()).is_ok());
        assert!(id.path().is_empty() || id.path().starts_with('/'));
        assert_eq!(SpiffeId::parse(&id.to_string()), Ok(id.clone()), "an accepted ID does not round-trip");
        // The minter holds delegation subjects to the same rule.
        assert!(mandate_minter::values::spiffe_id(s).is_ok(), "the minter refuses a SPIFFE ID the filter accepts: {s:?}");
    }
}

/// Any text, and the same text after `spiffe://`: accepted exactly when the reference accepts,
/// and an accepted ID round-trips into its trust domain and path.
pub fn spiffe_id(data: &[u8]) {
    let s = String::from_utf8_lossy(data);
    check(&s);
    check(&format!("spiffe://{s}"));
    check(&format!("spiffe://example.org/{s}"));
}
