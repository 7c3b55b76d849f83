//! JWT/JWS: the compact-serialisation parser, and the verifier against forgery.

use crate::input::{with_svid_key, Reader};
use crate::NOW;
use mandate_core::config;
use mandate_core::identity::jws::{self, Kind};
use mandate_core::identity::spiffe_id::SpiffeId;
use mandate_core::identity::Verifier;
use serde_json::{json, Value};

pub const AUD: &str = "spiffe://example.org/gateway";
pub const TD: &str = "example.org";

/// A verifier trusting the in-process key for `example.org`, audience [`AUD`].
pub fn verifier() -> Verifier {
    let bundle = with_svid_key(|k| json!({"keys": [k.svid_jwk()]}));
    let raw = json!({"identity": {"audiences": [AUD], "trust_domains": [{"name": TD, "bundle": {"inline": bundle}}]}});
    let parsed = config::parse(raw.to_string().as_bytes());
    match parsed.map(|c| Verifier::new(&c.identity)) {
        Ok(Ok(v)) => v,
        other => panic!("the fuzz verifier's own configuration is refused: {:?}", other.err()),
    }
}

/// Any bytes: the parser never panics, what it accepts is exactly three non-empty segments
/// with a key id, at most one token kind accepts a token (typ separates them), and bytes
/// from outside this process never verify against its key.
pub fn jws_parse(data: &[u8]) {
    let mut accepted = 0;
    for kind in [Kind::Svid, Kind::Intent, Kind::TxnToken] {
        if let Ok(p) = jws::parse_as(data, 65_536, kind) {
            accepted += 1;
            assert_eq!(p.token.as_bytes(), data, "parsed token is not the input");
            assert!(!p.kid.is_empty(), "accepted without a kid");
            let segments: Vec<&str> = p.token.split('.').collect();
            assert!(segments.len() == 3 && segments.iter().all(|s| !s.is_empty()), "accepted a token that is not three segments");
        }
    }
    assert!(accepted <= 1, "one token accepted as {accepted} kinds");
    // Short inputs never reach the limit; the limit itself is enforced.
    if data.len() > 64 {
        assert!(jws::parse(data, data.len() - 1).is_err(), "token over max_len accepted");
    }
    let mut v = verifier();
    assert!(v.verify(data, NOW).is_err(), "bytes not signed by this process verified");
}

fn subject(r: &mut Reader<'_>, sel: u8) -> String {
    let path = r.text();
    match sel & 3 {
        // A well-formed ID in the trusted domain.
        0 | 1 => {
            let clean: String = path.chars().filter(|c| c.is_ascii_alphanumeric() || "/._-".contains(*c)).collect();
            let segs: Vec<&str> = clean.split('/').filter(|s| !s.is_empty() && *s != "." && *s != "..").collect();
            if segs.is_empty() {
                format!("spiffe://{TD}/agent")
            } else {
                format!("spiffe://{TD}/{}", segs.join("/"))
            }
        }
        2 => format!("spiffe://{TD}{path}"),
        _ => path,
    }
}

/// Applies edits (position, operation, value) read from `ops` to `token`.
pub fn edit(token: &[u8], ops: &[u8]) -> Vec<u8> {
    let mut out = token.to_vec();
    for op in ops.chunks(4) {
        let (pos, kind, val) = match op {
            [a, b, k, v] => (usize::from(u16::from_le_bytes([*a, *b])), *k, *v),
            _ => break,
        };
        if out.is_empty() {
            out.push(val);
            continue;
        }
        let at = pos % out.len();
        match kind % 6 {
            0 => {
                if let Some(b) = out.get_mut(at) {
                    *b ^= val | 1;
                }
            }
            1 => out.insert(at, val),
            2 => {
                out.remove(at);
            }
            3 => {
                // Swap in another base64url character (the likeliest near-miss).
                const B64: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
                if let (Some(b), Some(c)) = (out.get_mut(at), B64.get(usize::from(val) % B64.len())) {
                    *b = *c;
                }
            }
            4 => out.truncate(at),
            _ => {
                // Duplicate a span (e.g. a segment) at the end.
                let end = (at + usize::from(val)).min(out.len());
                let span = out.get(at..end).unwrap_or_default().to_vec();
                out.extend_from_slice(&span);
            }
        }
    }
    out
}

/// A token built and signed here from the input's claims, then edited by the input: the
/// unedited token verifies exactly when its claims are acceptable, and no edit that changes
/// a byte ever verifies (with or without the verified-token cache).
pub fn jwt_forgery(data: &[u8]) {
    let mut r = Reader::new(data);
    let sel = r.byte();
    let sub = subject(&mut r, sel);
    let aud: Value = match (sel >> 2) & 3 {
        0 | 1 => json!(AUD),
        2 => json!(["other", AUD]),
        _ => json!(r.text()),
    };
    let exp = (NOW - 200).saturating_add(u64::from(r.u16()));
    let mut claims = json!({"sub": sub, "aud": aud, "exp": exp, "iat": NOW - 10});
    let extra = r.text();
    if !extra.is_empty() {
        claims["x"] = json!(extra);
    }
    let typ = match (sel >> 4) & 3 {
        0 => json!("JWT"),
        1 => Value::Null,
        2 => json!("JOSE"),
        _ => json!(r.text()),
    };
    let mut header = json!({"alg": "ES256", "kid": "fz-svid"});
    if !typ.is_null() {
        header["typ"] = typ.clone();
    }
    let token = with_svid_key(|k| k.sign_with_header("ES256", &header, &claims));
    let edited = edit(token.as_bytes(), r.rest());

    let mut v = verifier();
    let first = v.verify(token.as_bytes(), NOW);
    let acceptable = token.len() <= v.max_token_bytes()
        && SpiffeId::parse(&sub).is_ok_and(|id| id.trust_domain() == TD)
        && aud.as_str().map_or_else(|| aud.as_array().is_some_and(|a| a.iter().any(|x| x == AUD)), |a| a == AUD)
        && exp.saturating_add(v.skew()) >= NOW
        && matches!(typ.as_str(), None | Some("JWT" | "JOSE"));
    assert_eq!(first.is_ok(), acceptable, "signed token with sub={sub:?} aud={aud} exp={exp} typ={typ}: {:?}", first.err());
    if let Ok(id) = &first {
        assert_eq!(id.principal, sub);
        assert_eq!(id.exp, exp);
    }
    let second = v.verify(&edited, NOW);
    let fresh = verifier().verify(&edited, NOW);
    if edited == token.as_bytes() {
        assert_eq!(second.is_ok(), first.is_ok());
    } else {
        assert!(second.is_err(), "an edited token verified: {:?}", String::from_utf8_lossy(&edited));
    }
    assert_eq!(second.is_ok(), fresh.is_ok(), "the verified-token cache changed a verdict");
    // The original still verifies after the edited one was refused.
    assert_eq!(v.verify(token.as_bytes(), NOW).is_ok(), acceptable);
}
