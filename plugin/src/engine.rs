//! The request path: identity → intent → policy → mint → inject → log.
//!
//! Host-independent: the proxy-wasm shell gathers the inputs (headers, time)
//! in as few host calls as it can, calls [`Engine::on_request`] and applies
//! the returned [`Verdict`].

use crate::config::Config;
use crate::decision::{DecisionIds, Effect, LocalReply};
use crate::headers::Headers;
use crate::identity::{Identity, Verifier};
use crate::reason::Reason;
use std::rc::Rc;

/// Header edits to apply before the request goes upstream.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeaderEdits {
    pub remove: Vec<String>,
    pub set: Vec<(String, Vec<u8>)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Forward upstream after applying these edits.
    Forward(HeaderEdits),
    /// Answer locally; the request never reaches the service.
    Reply(LocalReply),
}

/// What was decided about one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub id: String,
    pub effect: Effect,
    pub reason: Reason,
    pub identity: Option<Rc<Identity>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub decision: Decision,
    pub verdict: Verdict,
}

pub struct Engine {
    config: Config,
    ids: DecisionIds,
    pub identity: Verifier,
}

/// Inputs gathered by the shell for one request.
pub struct Request<'a> {
    pub headers: &'a Headers,
    /// Unix time, seconds.
    pub now: u64,
}

impl Engine {
    pub fn new(config: Config, id_seed: u64) -> Result<Engine, String> {
        let identity = Verifier::new(&config.identity)?;
        Ok(Engine { config, ids: DecisionIds::new(id_seed), identity })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The request path, top to bottom.
    pub fn on_request(&mut self, req: &Request<'_>) -> Outcome {
        let id = self.ids.next_id();

        // 1. Identity: who is calling, proven by a token verified against trust bundles.
        let token = match bearer_token(req.headers, &self.config) {
            Ok(t) => t,
            Err(reason) => return self.deny(id, reason, None),
        };
        let identity = match self.identity.verify(token, req.now) {
            Ok(identity) => identity,
            Err(reason) => return self.deny(id, reason, None),
        };

        // 2-5. Intent, policy, credentials: later stages slot in here.

        let edits = self.upstream_edits(req.headers, &id, &identity);
        Outcome {
            decision: Decision { id, effect: Effect::Allow, reason: Reason::Allowed, identity: Some(identity) },
            verdict: Verdict::Forward(edits),
        }
    }

    /// A denial for a request the filter could not judge (host failure).
    pub fn fail_closed(&mut self, reason: Reason) -> Outcome {
        let id = self.ids.next_id();
        self.deny(id, reason, None)
    }

    fn deny(&self, id: String, reason: Reason, identity: Option<Rc<Identity>>) -> Outcome {
        let reply = LocalReply::deny(reason, &id, &self.config.upstream.decision_id_header);
        Outcome {
            decision: Decision { id, effect: Effect::Deny, reason, identity },
            verdict: Verdict::Reply(reply),
        }
    }

    /// Strip what the caller must not control or the service must not see, then
    /// set what mandate vouches for.
    fn upstream_edits(&self, headers: &Headers, id: &str, identity: &Identity) -> HeaderEdits {
        let mut remove = headers.reserved_names();
        let mut set = Vec::with_capacity(2);
        let decision_header = &self.config.upstream.decision_id_header;
        set.push((decision_header.clone(), id.as_bytes().to_vec()));
        if let Some(h) = &self.config.identity.upstream_header {
            set.push((h.clone(), identity.principal.as_bytes().to_vec()));
        }
        // Anything we set is removed first, whatever its name: never merge with a spoofed copy.
        for (name, _) in &set {
            if headers.contains(name) && !remove.contains(name) {
                remove.push(name.clone());
            }
        }
        if !self.config.identity.forward_token && headers.contains(&self.config.identity.header) {
            remove.push(self.config.identity.header.clone());
        }
        HeaderEdits { remove, set }
    }
}

/// Extracts the caller's token from the configured header and scheme.
pub fn bearer_token<'h>(headers: &'h Headers, config: &Config) -> Result<&'h [u8], Reason> {
    let value = match headers.single(&config.identity.header) {
        Ok(Some(v)) => v,
        Ok(None) => return Err(Reason::TokenMissing),
        // Two credentials in one request is ambiguous: refuse rather than pick one.
        Err(_) => return Err(Reason::TokenMalformed),
    };
    let value = value.trim_ascii();
    let scheme = config.identity.scheme.as_bytes();
    let token = if scheme.is_empty() {
        value
    } else {
        match value.split_at_checked(scheme.len()) {
            Some((s, rest)) if s.eq_ignore_ascii_case(scheme) && rest.first() == Some(&b' ') => {
                rest.trim_ascii()
            }
            // Another scheme (e.g. Basic) is not a bearer token.
            _ => return Err(Reason::TokenMissing),
        }
    };
    if token.is_empty() {
        return Err(Reason::TokenMissing);
    }
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config;
    use crate::testkit::{spiffe_bundle, svid_claims, TestKey};
    use serde_json::json;

    const NOW: u64 = 1_800_000_000;
    const AUD: &str = "spiffe://example.org/gw";
    const SUB: &str = "spiffe://example.org/agent/a1";

    fn headers(pairs: &[(&str, &str)]) -> Headers {
        Headers::new(pairs.iter().map(|(k, v)| (k.to_string(), v.as_bytes().to_vec())).collect())
    }

    fn engine(key: &TestKey, extra: serde_json::Value) -> Engine {
        let mut identity = json!({"audiences": [AUD], "upstream_header": "x-mandate-identity",
            "trust_domains": [{"name": "example.org", "bundle": {"inline": spiffe_bundle(&[key], None)}}]});
        if let (Some(obj), Some(extra)) = (identity.as_object_mut(), extra.as_object()) {
            obj.extend(extra.clone());
        }
        let cfg = config::parse(json!({"identity": identity}).to_string().as_bytes()).unwrap();
        Engine::new(cfg, 7).unwrap()
    }

    fn run(e: &mut Engine, pairs: &[(&str, &str)]) -> Outcome {
        e.on_request(&Request { headers: &headers(pairs), now: NOW })
    }

    fn bearer(key: &TestKey) -> String {
        format!("Bearer {}", key.sign(&svid_claims(SUB, AUD, NOW, NOW + 60)))
    }

    #[test]
    fn missing_token_is_denied_with_401() {
        let k = TestKey::es256("k");
        let out = run(&mut engine(&k, json!({})), &[(":path", "/")]);
        assert_eq!(out.decision.reason, Reason::TokenMissing);
        match out.verdict {
            Verdict::Reply(r) => assert_eq!(r.status, 401),
            other => panic!("expected reply, got {other:?}"),
        }
    }

    #[test]
    fn basic_auth_is_not_a_bearer_token() {
        let k = TestKey::es256("k");
        let out = run(&mut engine(&k, json!({})), &[("authorization", "Basic dXNlcjpwYXNz")]);
        assert_eq!(out.decision.reason, Reason::TokenMissing);
    }

    #[test]
    fn duplicate_authorization_is_malformed() {
        let k = TestKey::es256("k");
        let b = bearer(&k);
        let out = run(&mut engine(&k, json!({})), &[("authorization", &b), ("authorization", &b)]);
        assert_eq!(out.decision.reason, Reason::TokenMalformed);
    }

    #[test]
    fn empty_bearer_is_missing() {
        let k = TestKey::es256("k");
        let out = run(&mut engine(&k, json!({})), &[("authorization", "Bearer   ")]);
        assert_eq!(out.decision.reason, Reason::TokenMissing);
    }

    #[test]
    fn forwarded_request_strips_token_and_spoofed_headers() {
        let k = TestKey::es256("k");
        let b = bearer(&k).replace("Bearer", "bearer");
        let out = run(&mut engine(&k, json!({})), &[
            ("authorization", &b),
            ("x-mandate-identity", "spiffe://example.org/admin"),
            ("x-mandate-decision-id", "forged"),
        ]);
        assert_eq!(out.decision.effect, Effect::Allow, "{:?}", out.decision);
        let Verdict::Forward(edits) = out.verdict else { panic!("expected forward") };
        assert!(edits.remove.contains(&"authorization".to_string()));
        assert!(edits.remove.contains(&"x-mandate-identity".to_string()));
        assert!(edits.remove.contains(&"x-mandate-decision-id".to_string()));
        assert_eq!(edits.set[0], ("x-mandate-decision-id".to_string(), out.decision.id.into_bytes()));
        assert_eq!(edits.set[1], ("x-mandate-identity".to_string(), SUB.as_bytes().to_vec()));
    }

    #[test]
    fn custom_identity_header_is_stripped_when_spoofed() {
        let k = TestKey::es256("k");
        let mut e = engine(&k, json!({"upstream_header": "x-caller"}));
        let b = bearer(&k);
        let out = run(&mut e, &[("authorization", &b), ("x-caller", "spiffe://example.org/admin")]);
        let Verdict::Forward(edits) = out.verdict else { panic!("expected forward") };
        assert!(edits.remove.contains(&"x-caller".to_string()));
    }

    #[test]
    fn forward_token_keeps_authorization() {
        let k = TestKey::es256("k");
        let mut e = engine(&k, json!({"forward_token": true}));
        let b = bearer(&k);
        let Verdict::Forward(edits) = run(&mut e, &[("authorization", &b)]).verdict else { panic!() };
        assert!(!edits.remove.contains(&"authorization".to_string()));
    }

    #[test]
    fn forged_token_is_denied_without_echo() {
        let k = TestKey::es256("k");
        let forger = TestKey::es256("k");
        let b = bearer(&forger);
        let out = run(&mut engine(&k, json!({})), &[("authorization", &b)]);
        assert_eq!(out.decision.reason, Reason::SignatureInvalid);
        let Verdict::Reply(r) = out.verdict else { panic!() };
        let token = b.trim_start_matches("Bearer ");
        assert!(!r.body.contains(token) && !r.headers.iter().any(|(_, v)| v.contains(token)));
        assert!(!r.body.contains(&token[token.len() - 20..]), "no fragment of the signature either");
    }
}
