//! Request-target normalisation: what the policy matches is what the service sees.

use mandate_core::policy::path::{normalize, normalize_authority};

fn unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn check(raw: &[u8]) {
    let Ok(n) = normalize(raw) else { return };
    let p = n.path.as_str();
    assert!(p.starts_with('/'), "normalised path {p:?} does not start with /");
    let segments: Vec<&str> = p.split('/').skip(1).collect();
    let last = segments.len().saturating_sub(1);
    for (i, seg) in segments.iter().enumerate() {
        assert!(*seg != "." && *seg != "..", "dot segment left in {p:?} (from {:?})", String::from_utf8_lossy(raw));
        assert!(!seg.is_empty() || i == last, "empty segment (//) left in {p:?}");
        let before_params = seg.split(';').next().unwrap_or(seg);
        assert!(before_params != "." && before_params != "..", "dot segment with parameters left in {p:?}");
    }
    // Only visible ASCII; every escape is two uppercase hex digits of a byte that must stay
    // escaped (unreserved ones are decoded), never `/`, `\` or NUL.
    let b = p.as_bytes();
    let mut i = 0;
    while let Some(&c) = b.get(i) {
        assert!(c.is_ascii_graphic() && c != b'\\' && c != b'?' && c != b'#', "byte {c:#x} in normalised path {p:?}");
        if c == b'%' {
            let hex = b.get(i + 1..i + 3).unwrap_or_default();
            assert!(hex.len() == 2 && hex.iter().all(|h| h.is_ascii_digit() || (b'A'..=b'F').contains(h)), "bad escape in {p:?}");
            let v = u8::from_str_radix(std::str::from_utf8(hex).unwrap_or("00"), 16).unwrap_or(0);
            assert!(!unreserved(v) && v != b'/' && v != b'\\' && v != 0, "escape %{v:02X} kept in {p:?}");
            i += 3;
        } else {
            i += 1;
        }
    }
    // Idempotent: normalising again changes nothing, and so does the target sent upstream.
    let again = normalize(p.as_bytes());
    assert_eq!(again.as_ref().map(|a| a.path.as_str()), Ok(p), "normalising {p:?} again changed it");
    let target = normalize(n.target().as_bytes());
    assert_eq!(target.as_ref().map(|t| (t.path.as_str(), t.query.as_deref())), Ok((p, n.query.as_deref())), "the upstream target reads differently");
    // The query is kept as sent.
    let sent_query = raw.iter().position(|&c| c == b'?').map(|q| raw.get(q + 1..).unwrap_or_default());
    assert_eq!(n.query.as_deref().map(str::as_bytes), sent_query);
}

/// Any bytes as a request target (and after a leading `/`), and as an authority.
pub fn path(data: &[u8]) {
    check(data);
    let mut rooted = Vec::with_capacity(data.len() + 1);
    rooted.push(b'/');
    rooted.extend_from_slice(data);
    check(&rooted);
    if let Some(a) = normalize_authority(data) {
        assert!(!a.bytes().any(|c| c.is_ascii_uppercase()), "authority {a:?} not lowercased");
        assert_eq!(normalize_authority(a.as_bytes()).as_deref(), Some(a.as_str()), "normalising authority {a:?} again changed it");
    }
}
