//! JWS compact serialization: strict split, decode and header/claims parsing.
//!
//! Nothing here is trusted yet: it only gives the verifier what it needs to
//! pick a key and to refuse cheap-to-detect bad tokens before any signature work.

use super::jwks::Alg;
use crate::reason::Reason;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use serde::Deserialize;

/// Largest JOSE header accepted (bytes, encoded).
pub const MAX_HEADER_B64: usize = 2048;

#[derive(Debug, Clone)]
pub struct Parsed<'t> {
    pub token: &'t str,
    pub alg: Alg,
    pub kid: String,
    /// `typ` as sent (already checked against the expected [`Kind`]), for the signature library.
    pub typ: Option<String>,
    pub claims: Claims,
    /// The decoded claims JSON, for callers that need more than the registered claims.
    pub claims_json: Vec<u8>,
}

#[derive(Deserialize)]
struct RawHeader {
    alg: Option<String>,
    kid: Option<String>,
    typ: Option<String>,
    // Any `crit` at all is refused; its value is irrelevant.
    crit: Option<serde_json::Value>,
    // `jku`, `x5u`, `jwk`, `x5c` are never read: keys come only from configured bundles.
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum Audience {
    One(String),
    Many(Vec<String>),
}

impl Audience {
    pub fn contains_any(&self, accepted: &[String]) -> bool {
        match self {
            Audience::One(a) => accepted.iter().any(|x| x == a),
            Audience::Many(list) => list.iter().any(|a| accepted.iter().any(|x| x == a)),
        }
    }
}

/// The registered claims mandate reads. Known fields appearing twice make
/// the JSON invalid (serde refuses duplicate fields), so a token cannot say
/// one `sub` to us and another to a laxer parser.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Claims {
    pub sub: Option<String>,
    pub iss: Option<String>,
    pub aud: Option<Audience>,
    pub exp: Option<u64>,
    pub nbf: Option<u64>,
    pub iat: Option<u64>,
    pub jti: Option<String>,
}

/// The kind of token a verifier expects, told apart by the JOSE `typ` header, so that a token
/// made for one purpose is never accepted for another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A JWT-SVID (or OIDC token): `typ` absent, `JWT` or `JOSE`, as the SPIFFE spec allows.
    /// An intent token (`intent+jwt`) is refused here.
    Svid,
    /// A signed intent token: `typ` must be `intent+jwt` (RFC 8725 §3.11 explicit typing;
    /// `application/intent+jwt` and any letter case are the same media type). An SVID, whose
    /// `typ` is absent or `JWT`, is refused here.
    Intent,
    /// A Transaction Token (issue 13): `typ` must be `txntoken+jwt` (same media-type rules as
    /// intent tokens). An SVID or an intent token is refused here, and a Txn-Token is refused
    /// as either of them.
    TxnToken,
}

/// The media type of signed intent tokens (JOSE `typ`).
pub const INTENT_TYP: &str = "intent+jwt";
/// The media type of Transaction Tokens (JOSE `typ`).
pub const TXN_TYP: &str = "txntoken+jwt";

fn media_type_is(typ: Option<&str>, want: &str) -> bool {
    typ.is_some_and(|t| {
        let t = t.get(..12).filter(|p| p.eq_ignore_ascii_case("application/")).map_or(t, |_| t.get(12..).unwrap_or(""));
        t.eq_ignore_ascii_case(want)
    })
}

fn typ_ok(kind: Kind, typ: Option<&str>) -> bool {
    match kind {
        Kind::Svid => matches!(typ, None | Some("JWT" | "JOSE")),
        Kind::Intent => media_type_is(typ, INTENT_TYP),
        Kind::TxnToken => media_type_is(typ, TXN_TYP),
    }
}

/// Splits, decodes and checks the header and claims of a JWT-SVID (see [`parse_as`]).
pub fn parse(token: &[u8], max_len: usize) -> Result<Parsed<'_>, Reason> {
    parse_as(token, max_len, Kind::Svid)
}

/// Splits, decodes and checks the header and claims. Header checks come first
/// (`alg` before anything else, then `typ` for the expected kind), then the claims are decoded.
pub fn parse_as(token: &[u8], max_len: usize, kind: Kind) -> Result<Parsed<'_>, Reason> {
    if token.len() > max_len {
        return Err(Reason::TokenMalformed);
    }
    let token = std::str::from_utf8(token).map_err(|_| Reason::TokenMalformed)?;
    let mut parts = token.split('.');
    let (Some(h64), Some(c64), Some(s64), None) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(Reason::TokenMalformed);
    };
    if h64.is_empty() || h64.len() > MAX_HEADER_B64 {
        return Err(Reason::TokenMalformed);
    }
    let header_json = URL_SAFE_NO_PAD.decode(h64).map_err(|_| Reason::TokenMalformed)?;
    let header: RawHeader = serde_json::from_slice(&header_json).map_err(|_| Reason::TokenMalformed)?;

    let alg = header.alg.as_deref().and_then(Alg::parse).ok_or(Reason::AlgNotAllowed)?;
    if !typ_ok(kind, header.typ.as_deref()) {
        return Err(Reason::TypNotAllowed);
    }
    if header.crit.is_some() {
        return Err(Reason::CritNotAllowed);
    }
    let kid = match header.kid {
        Some(k) if !k.is_empty() => k,
        _ => return Err(Reason::KidMissing),
    };
    if c64.is_empty() || s64.is_empty() {
        return Err(Reason::TokenMalformed);
    }
    // The signature must at least be valid base64url; its content is checked later.
    if !s64.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
        return Err(Reason::TokenMalformed);
    }
    let claims_json = URL_SAFE_NO_PAD.decode(c64).map_err(|_| Reason::TokenMalformed)?;
    let claims: Claims = serde_json::from_slice(&claims_json).map_err(|_| Reason::TokenMalformed)?;
    Ok(Parsed { token, alg, kid, typ: header.typ, claims, claims_json })
}
