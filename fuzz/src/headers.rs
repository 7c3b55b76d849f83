//! Header maps (the proxy-wasm wire layout), the declared intent and task, MCP headers.

use mandate_core::headers::{serialize_pairs, Headers};
use mandate_core::mcp::headers::{decode_value, read};
use mandate_core::policy::intent::{declared_intent, declared_task, INTENT_HEADER, TASK_HEADER};

/// `name: value` lines (or the whole line as a name), the way the smoke and seeds spell
/// requests. Names keep their case; values their bytes.
pub fn lines_to_pairs(data: &[u8]) -> Vec<(Vec<u8>, Vec<u8>)> {
    data.split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| {
            // A leading `:` belongs to the name (`:path: /x`).
            let from = usize::from(l.first() == Some(&b':'));
            match l.iter().skip(from).position(|&b| b == b':') {
                Some(i) => {
                    let (k, v) = l.split_at(i + from);
                    let v = v.get(1..).unwrap_or_default();
                    (k.to_vec(), v.strip_prefix(b" ").unwrap_or(v).to_vec())
                }
                None => (l.to_vec(), Vec::new()),
            }
        })
        .collect()
}

fn check_headers(h: &Headers) {
    let pairs: Vec<(Vec<u8>, Vec<u8>)> = h.pairs().map(|(k, v)| (k.to_vec(), v.to_vec())).collect();
    // The map the filter would hand back to the host reads the same.
    let again = Headers::from_map(serialize_pairs(&pairs));
    let again_pairs: Option<Vec<(Vec<u8>, Vec<u8>)>> = again.ok().map(|a| a.pairs().map(|(k, v)| (k.to_vec(), v.to_vec())).collect());
    assert_eq!(again_pairs.as_ref(), Some(&pairs), "a header map does not survive serialisation");

    let count = |name: &str| pairs.iter().filter(|(k, _)| k.eq_ignore_ascii_case(name.as_bytes())).count();
    match declared_intent(h) {
        Ok(Some(v)) => {
            assert_eq!(count(INTENT_HEADER), 1);
            assert!((1..=128).contains(&v.len()) && v.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b)), "intent {v:?} accepted");
        }
        Ok(None) => assert_eq!(count(INTENT_HEADER), 0),
        Err(_) => {}
    }
    match declared_task(h) {
        Ok(Some(v)) => {
            assert_eq!(count(TASK_HEADER), 1);
            assert!((1..=128).contains(&v.len()) && v.bytes().all(|b| b.is_ascii_alphanumeric() || b"._:-".contains(&b)), "task {v:?} accepted");
        }
        Ok(None) => assert_eq!(count(TASK_HEADER), 0),
        Err(_) => {}
    }
    if let Ok(m) = read(h) {
        if let Some(v) = &m.version {
            assert_eq!(v.len(), 10, "MCP version {v:?} accepted");
        }
        let mut names: Vec<&str> = m.params.iter().map(|(n, _)| n.as_str()).collect();
        let n = names.len();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), n, "a parameter header accepted twice");
        if let Some(call) = m.call() {
            assert!(m.fast_path() && call.method == m.method.clone().unwrap_or_default());
        }
    }
    for (_, v) in &pairs {
        if let Ok(text) = decode_value(v) {
            assert!(text.len() <= 8192, "decoded header value of {} bytes", text.len());
        }
    }
    let reserved = h.reserved_names();
    assert!(reserved.iter().all(|n| n.starts_with("x-mandate-")), "reserved names {reserved:?}");
}

/// Any bytes as a host's header map (refused or read within bounds), and as header lines.
pub fn headers(data: &[u8]) {
    if let Ok(h) = Headers::from_map(data.to_vec()) {
        check_headers(&h);
    }
    check_headers(&Headers::new(lines_to_pairs(data)));
}
