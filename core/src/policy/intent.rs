//! Declared intent: the `x-agent-intent` / `x-agent-task` headers and signed
//! intent tokens (JWTs from a configured intent issuer, bound to the caller and
//! to this gateway by `aud`, and typed `intent+jwt` so that they are never
//! mistaken for an SVID, nor an SVID for them).

use super::{IntentIssuerConfig, SignedIntent};
use crate::config::ConfigError;
use crate::headers::Headers;
use crate::identity::jwks::{parse_bundle, Bundle};
use crate::identity::jws;
use crate::reason::Reason;
use serde::Deserialize;

pub const INTENT_HEADER: &str = "x-agent-intent";
pub const TASK_HEADER: &str = "x-agent-task";
pub const INTENT_TOKEN_HEADER: &str = "x-agent-intent-token";
const MAX_INTENT_TOKEN: usize = 8192;

pub(crate) fn valid_intent(v: &[u8]) -> bool {
    (1..=128).contains(&v.len()) && v.iter().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(b))
}

pub(crate) fn valid_task(v: &[u8]) -> bool {
    (1..=128).contains(&v.len()) && v.iter().all(|b| b.is_ascii_alphanumeric() || b"._:-".contains(b))
}

/// The declared intent name, if any. Several values (or a list) are malformed.
pub fn declared_intent(h: &Headers) -> Result<Option<String>, Reason> {
    match h.single(INTENT_HEADER) {
        Err(_) => Err(Reason::IntentMalformed),
        Ok(None) => Ok(None),
        Ok(Some(v)) if valid_intent(v) => Ok(Some(String::from_utf8_lossy(v).into_owned())),
        Ok(Some(_)) => Err(Reason::IntentMalformed),
    }
}

pub fn declared_task(h: &Headers) -> Result<Option<String>, Reason> {
    match h.single(TASK_HEADER) {
        Err(_) => Err(Reason::TaskMalformed),
        Ok(None) => Ok(None),
        Ok(Some(v)) if valid_task(v) => Ok(Some(String::from_utf8_lossy(v).into_owned())),
        Ok(Some(_)) => Err(Reason::TaskMalformed),
    }
}

struct Issuer {
    issuer: String,
    bundle: Bundle,
    audiences: Vec<String>,
}

pub struct IntentVerifier {
    issuers: Vec<Issuer>,
    skew: u64,
}

#[derive(Deserialize)]
struct IntentClaims {
    #[serde(default)]
    intents: Vec<String>,
    #[serde(default)]
    task: Option<String>,
}

impl IntentVerifier {
    pub fn new(cfg: &[IntentIssuerConfig], skew: u64, prefix: &str) -> Result<IntentVerifier, ConfigError> {
        let mut issuers = Vec::new();
        for (i, c) in cfg.iter().enumerate() {
            let field = format!("{prefix}[{i}]");
            if c.issuer.is_empty() {
                return Err(ConfigError::new(format!("{field}.issuer"), "must not be empty"));
            }
            // Without an audience, a token issued for any other gateway would be accepted here.
            if c.audiences.is_empty() {
                return Err(ConfigError::new(
                    format!("{field}.audiences"),
                    "at least one audience is required: intent tokens must name this gateway, or they replay across gateways",
                ));
            }
            for (j, a) in c.audiences.iter().enumerate() {
                if a.is_empty() {
                    return Err(ConfigError::new(format!("{field}.audiences[{j}]"), "must not be empty"));
                }
            }
            let raw = serde_json::to_vec(&c.jwks).map_err(|e| ConfigError::new(format!("{field}.jwks"), e.to_string()))?;
            let bundle = parse_bundle(&raw).map_err(|e| ConfigError::new(format!("{field}.jwks"), e.to_string()))?;
            issuers.push(Issuer { issuer: c.issuer.clone(), bundle, audiences: c.audiences.clone() });
        }
        Ok(IntentVerifier { issuers, skew })
    }

    pub fn is_empty(&self) -> bool {
        self.issuers.is_empty()
    }

    /// Verifies an intent token for `principal`. Any failure is `intent_token_invalid`.
    pub fn verify(&self, token: &[u8], principal: &str, now: u64) -> Result<SignedIntent, Reason> {
        let bad = Reason::IntentTokenInvalid;
        // `typ: intent+jwt` only: an SVID (typ absent or JWT) is never an intent token.
        let parsed = jws::parse_as(token, MAX_INTENT_TOKEN, jws::Kind::Intent).map_err(|_| bad)?;
        let c = &parsed.claims;
        let issuer = c.iss.as_deref().and_then(|iss| self.issuers.iter().find(|i| i.issuer == iss)).ok_or(bad)?;
        let key = issuer.bundle.key(&parsed.kid).ok_or(bad)?;
        if !key.accepts(parsed.alg) {
            return Err(bad);
        }
        // The token is bound to the caller: another workload's intent token is worthless.
        if c.sub.as_deref() != Some(principal) {
            return Err(bad);
        }
        let exp = c.exp.ok_or(bad)?;
        if now > exp.saturating_add(self.skew)
            || c.nbf.is_some_and(|t| t > now.saturating_add(self.skew))
            || c.iat.is_some_and(|t| t > now.saturating_add(self.skew))
        {
            return Err(bad);
        }
        // Bound to this gateway: a token for another one (or for none) is refused.
        if !c.aud.as_ref().is_some_and(|a| a.contains_any(&issuer.audiences)) {
            return Err(bad);
        }
        crate::identity::verify_signature(&parsed, key).map_err(|_| bad)?;
        let claims: IntentClaims = serde_json::from_slice(&parsed.claims_json).map_err(|_| bad)?;
        if claims.intents.is_empty() || !claims.intents.iter().all(|i| valid_intent(i.as_bytes())) {
            return Err(bad);
        }
        if claims.task.as_deref().is_some_and(|t| !valid_task(t.as_bytes())) {
            return Err(bad);
        }
        Ok(SignedIntent { intents: claims.intents, task: claims.task, exp, from_txn_token: false })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::{plain_jwks, TestKey};
    use serde_json::json;

    const NOW: u64 = 1_800_000_000;
    const ME: &str = "spiffe://example.org/agent/coder";

    fn verifier(key: &TestKey) -> IntentVerifier {
        let cfg: Vec<IntentIssuerConfig> = serde_json::from_value(json!([
            {"issuer": "https://intent.example.org", "jwks": plain_jwks(&[key]), "audiences": ["mandate"]}
        ]))
        .unwrap();
        IntentVerifier::new(&cfg, 30, "policy.intent_issuers").unwrap()
    }

    fn claims(sub: &str) -> serde_json::Value {
        json!({"iss": "https://intent.example.org", "sub": sub, "aud": "mandate", "exp": NOW + 60,
               "intents": ["repo.write"], "task": "PR-42"})
    }

    #[test]
    fn valid_intent_token() {
        let k = TestKey::es256("i1");
        let s = verifier(&k).verify(k.sign_intent(&claims(ME)).as_bytes(), ME, NOW).unwrap();
        assert_eq!(s.intents, vec!["repo.write"]);
        assert_eq!(s.task.as_deref(), Some("PR-42"));
    }

    #[test]
    fn intent_token_stolen_from_another_agent() {
        let k = TestKey::es256("i1");
        let t = k.sign_intent(&claims("spiffe://example.org/agent/other"));
        assert_eq!(verifier(&k).verify(t.as_bytes(), ME, NOW), Err(Reason::IntentTokenInvalid));
    }

    #[test]
    fn intent_token_forged_by_caller() {
        let k = TestKey::es256("i1");
        let forger = TestKey::es256("i1");
        assert_eq!(verifier(&k).verify(forger.sign_intent(&claims(ME)).as_bytes(), ME, NOW), Err(Reason::IntentTokenInvalid));
    }

    #[test]
    fn intent_token_expired() {
        let k = TestKey::es256("i1");
        assert_eq!(verifier(&k).verify(k.sign_intent(&claims(ME)).as_bytes(), ME, NOW + 91), Err(Reason::IntentTokenInvalid));
    }

    #[test]
    fn intent_token_from_unknown_issuer() {
        let k = TestKey::es256("i1");
        let mut c = claims(ME);
        c["iss"] = json!("https://evil");
        assert_eq!(verifier(&k).verify(k.sign_intent(&c).as_bytes(), ME, NOW), Err(Reason::IntentTokenInvalid));
    }

    #[test]
    fn intent_token_wrong_audience() {
        let k = TestKey::es256("i1");
        let mut c = claims(ME);
        c["aud"] = json!("other");
        assert_eq!(verifier(&k).verify(k.sign_intent(&c).as_bytes(), ME, NOW), Err(Reason::IntentTokenInvalid));
    }

    #[test]
    fn intent_token_with_malformed_intent_name() {
        let k = TestKey::es256("i1");
        let mut c = claims(ME);
        c["intents"] = json!(["Repo Write"]);
        assert_eq!(verifier(&k).verify(k.sign_intent(&c).as_bytes(), ME, NOW), Err(Reason::IntentTokenInvalid));
    }

    #[test]
    fn intent_token_for_another_gateway_is_refused() {
        let k = TestKey::es256("i1");
        // Before, an issuer without `audiences` (the default) took a token for any gateway:
        // such a configuration is now refused.
        let open: Vec<IntentIssuerConfig> =
            serde_json::from_value(json!([{"issuer": "https://intent.example.org", "jwks": plain_jwks(&[&k])}])).unwrap();
        assert!(IntentVerifier::new(&open, 30, "policy.intent_issuers").is_err(), "an issuer must name this gateway");
        let mut c = claims(ME);
        c["aud"] = json!("gateway-b");
        assert_eq!(verifier(&k).verify(k.sign_intent(&c).as_bytes(), ME, NOW), Err(Reason::IntentTokenInvalid));
        // No audience at all: issued for every gateway, accepted by none.
        let mut c = claims(ME);
        c.as_object_mut().unwrap().remove("aud");
        assert_eq!(verifier(&k).verify(k.sign_intent(&c).as_bytes(), ME, NOW), Err(Reason::IntentTokenInvalid));
        let mut c = claims(ME);
        c["aud"] = json!(["gateway-b", "mandate"]);
        assert!(verifier(&k).verify(k.sign_intent(&c).as_bytes(), ME, NOW).is_ok(), "one of several audiences names us");
    }

    #[test]
    fn intent_issuer_without_audiences_is_a_configuration_error() {
        let k = TestKey::es256("i1");
        for cfg in [
            json!([{"issuer": "https://intent.example.org", "jwks": plain_jwks(&[&k])}]),
            json!([{"issuer": "https://intent.example.org", "jwks": plain_jwks(&[&k]), "audiences": []}]),
        ] {
            let cfg: Vec<IntentIssuerConfig> = serde_json::from_value(cfg).unwrap();
            let e = IntentVerifier::new(&cfg, 30, "policy.intent_issuers").err().unwrap();
            assert_eq!(e.field, "policy.intent_issuers[0].audiences");
        }
        let cfg: Vec<IntentIssuerConfig> =
            serde_json::from_value(json!([{"issuer": "https://i", "jwks": plain_jwks(&[&k]), "audiences": [""]}])).unwrap();
        assert_eq!(IntentVerifier::new(&cfg, 30, "p").err().unwrap().field, "p[0].audiences[0]");
    }

    #[test]
    fn svid_replayed_as_intent_token_is_refused() {
        // One key signs both (an issuer that also mints SVIDs, or a shared key): a token typed
        // as a JWT, or untyped, is an SVID whatever its claims say.
        let k = TestKey::es256("i1");
        for header in [json!({"alg": "ES256", "kid": "i1", "typ": "JWT"}), json!({"alg": "ES256", "kid": "i1"}), json!({"alg": "ES256", "kid": "i1", "typ": "JOSE"})] {
            let t = k.sign_with_header("ES256", &header, &claims(ME));
            assert_eq!(verifier(&k).verify(t.as_bytes(), ME, NOW), Err(Reason::IntentTokenInvalid), "{header}");
        }
        for typ in ["at+jwt", "intent", "txntoken+jwt", "application/jwt"] {
            let t = k.sign_with_header("ES256", &json!({"alg": "ES256", "kid": "i1", "typ": typ}), &claims(ME));
            assert_eq!(verifier(&k).verify(t.as_bytes(), ME, NOW), Err(Reason::IntentTokenInvalid), "{typ}");
        }
        for typ in ["intent+jwt", "INTENT+JWT", "application/intent+jwt"] {
            let t = k.sign_with_header("ES256", &json!({"alg": "ES256", "kid": "i1", "typ": typ}), &claims(ME));
            assert!(verifier(&k).verify(t.as_bytes(), ME, NOW).is_ok(), "{typ}");
        }
    }

    fn h(pairs: &[(&str, &[u8])]) -> Headers {
        Headers::new(pairs.iter().map(|(k, v)| (k.to_string(), v.to_vec())).collect())
    }

    #[test]
    fn intent_header_attacks() {
        assert_eq!(declared_intent(&h(&[("x-agent-intent", b"ticket.read")])), Ok(Some("ticket.read".into())));
        assert_eq!(declared_intent(&h(&[])), Ok(None));
        for bad in [&b"Ticket.Read"[..], b"ticket read", b"ticket.read,repo.write", b"", b"\xff\xfe", &[b'a'; 129]] {
            assert_eq!(declared_intent(&h(&[("x-agent-intent", bad)])), Err(Reason::IntentMalformed), "{bad:?}");
        }
        let two = h(&[("x-agent-intent", b"a"), ("x-agent-intent", b"b")]);
        assert_eq!(declared_intent(&two), Err(Reason::IntentMalformed));
    }

    #[test]
    fn task_header_attacks() {
        assert_eq!(declared_task(&h(&[("x-agent-task", b"JIRA-1:sub.2")])), Ok(Some("JIRA-1:sub.2".into())));
        for bad in [&b"a/b"[..], b"a b", b"", b"x\r\ny", &[b'a'; 129]] {
            assert_eq!(declared_task(&h(&[("x-agent-task", bad)])), Err(Reason::TaskMalformed), "{bad:?}");
        }
    }
}
