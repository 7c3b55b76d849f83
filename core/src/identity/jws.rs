//! JWS compact serialization: strict split, decode and header/claims parsing.
//!
//! Nothing here is trusted yet: it only gives the verifier what it needs to
//! pick a key and to refuse cheap-to-detect bad tokens before any signature work.

use super::jwks::Alg;
use crate::reason::Reason;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use std::borrow::Cow;

/// Largest JOSE header accepted (bytes, encoded).
pub const MAX_HEADER_B64: usize = 2048;
/// Deepest nesting of arrays and objects accepted in a JOSE header or claims set (the top-level
/// object counts as 1). Envoy's `jwt_authn` stops at 100; a delegation chain needs about 10.
pub const MAX_JSON_DEPTH: u32 = 64;
/// Largest NumericDate accepted (`exp`, `nbf`, `iat`): 2^53 - 1, the largest integer every JSON
/// parser reads exactly (I-JSON, RFC 7493 §2.2). Beyond it a double-based reader (Envoy's
/// `jwt_authn`, JavaScript) sees another number, or none.
pub const MAX_NUMERIC_DATE: u64 = (1 << 53) - 1;

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

/// Registered header parameters and claims, when present, must have their registered type:
/// `null` is malformed, never read as the member being absent (`"nbf": null` is not "no nbf",
/// `"crit": null` is a `crit`).
#[derive(Deserialize)]
struct RawHeader {
    #[serde(default, deserialize_with = "present")]
    alg: Option<String>,
    #[serde(default, deserialize_with = "present")]
    kid: Option<String>,
    #[serde(default, deserialize_with = "present")]
    typ: Option<String>,
    // Any `crit` at all is refused; its value is irrelevant.
    #[serde(default, deserialize_with = "present")]
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

/// The registered claims mandate reads. A member name appearing twice anywhere makes the token
/// malformed ([`strict_json`]), so a token cannot say one `sub` to us and another to a parser
/// that keeps the other duplicate. `null` is not absent; NumericDates are integers up to
/// [`MAX_NUMERIC_DATE`].
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Claims {
    #[serde(default, deserialize_with = "present")]
    pub sub: Option<String>,
    #[serde(default, deserialize_with = "present")]
    pub iss: Option<String>,
    #[serde(default, deserialize_with = "present")]
    pub aud: Option<Audience>,
    #[serde(default, deserialize_with = "numeric_date")]
    pub exp: Option<u64>,
    #[serde(default, deserialize_with = "numeric_date")]
    pub nbf: Option<u64>,
    #[serde(default, deserialize_with = "numeric_date")]
    pub iat: Option<u64>,
    #[serde(default, deserialize_with = "present")]
    pub jti: Option<String>,
}

/// A member that is present has its type (`null` is an error, not `None`).
fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
}

/// An integer NumericDate in `0..=MAX_NUMERIC_DATE` (no fraction, exponent or `null`).
fn numeric_date<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    let v = u64::deserialize(d)?;
    if v > MAX_NUMERIC_DATE {
        return Err(de::Error::custom("NumericDate beyond 2^53 - 1"));
    }
    Ok(Some(v))
}

/// True when `json` is one RFC 8259 JSON object that every conforming parser reads the same way,
/// as RFC 7515 §5.2 and RFC 7519 §7.2 want of a JOSE header and a claims set: no member name
/// twice in any object at any depth (RFC 7515 §4, RFC 7519 §4: else parsers disagree on which
/// one counts), every string valid Unicode (no invalid UTF-8, no lone surrogate escape), every
/// number within a double's range, at most [`MAX_JSON_DEPTH`] levels. Members mandate never
/// reads are checked too: the token may be forwarded, and its next reader may read them.
pub fn strict_json(json: &[u8]) -> bool {
    // The top level is an object: serde's derived structs would also take an array, field by
    // field in declaration order (`["ES256","k1"]` as a header).
    if json.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return false;
    }
    let mut de = serde_json::Deserializer::from_slice(json);
    de::DeserializeSeed::deserialize(Strict(1), &mut de).is_ok() && de.end().is_ok()
}

/// Checks one value at depth `.0` (see [`strict_json`]).
#[derive(Clone, Copy)]
struct Strict(u32);

/// An object member name, borrowed from the input when it has no escapes.
struct MemberName<'de>(Cow<'de, str>);

impl<'de> Deserialize<'de> for MemberName<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = MemberName<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a member name")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(MemberName(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(MemberName(Cow::Owned(v.to_string())))
            }
        }
        d.deserialize_str(V)
    }
}

impl<'de> de::DeserializeSeed<'de> for Strict {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Strict {
    type Value = ();
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JSON")
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let inner = self.deeper()?;
        while seq.next_element_seed(inner)?.is_some() {}
        Ok(())
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let inner = self.deeper()?;
        let mut names: Vec<Cow<'de, str>> = Vec::new();
        while let Some(MemberName(name)) = map.next_key()? {
            map.next_value_seed(inner)?;
            names.push(name);
        }
        names.sort_unstable();
        if names.windows(2).any(|w| w.first() == w.get(1)) {
            return Err(de::Error::custom("duplicate member name"));
        }
        Ok(())
    }
}

impl Strict {
    fn deeper<E: de::Error>(self) -> Result<Strict, E> {
        if self.0 > MAX_JSON_DEPTH {
            return Err(E::custom("nested too deeply"));
        }
        Ok(Strict(self.0 + 1))
    }
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
    if !strict_json(&header_json) {
        return Err(Reason::TokenMalformed);
    }
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
    if !strict_json(&claims_json) {
        return Err(Reason::TokenMalformed);
    }
    let claims: Claims = serde_json::from_slice(&claims_json).map_err(|_| Reason::TokenMalformed)?;
    Ok(Parsed { token, alg, kid, typ: header.typ, claims, claims_json })
}
