//! The request path: identity → intent → policy → mint → inject → log.
//!
//! Host-independent: the proxy-wasm shell gathers the inputs (headers, time)
//! in as few host calls as it can, calls [`Engine::on_request`] and applies
//! the returned [`Verdict`].

use crate::config::Config;
use crate::decision::{DecisionIds, Effect, LocalReply};
use crate::headers::Headers;
use crate::reason::Reason;

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
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub decision: Decision,
    pub verdict: Verdict,
}

pub struct Engine {
    config: Config,
    ids: DecisionIds,
}

impl Engine {
    pub fn new(config: Config, id_seed: u64) -> Engine {
        Engine { config, ids: DecisionIds::new(id_seed) }
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn on_request(&mut self, headers: &Headers) -> Outcome {
        let id = self.ids.next_id();

        // Identity: for now, a bearer token must be present.
        if let Err(reason) = bearer_token(headers, &self.config) {
            return self.deny(id, reason);
        }

        let edits = self.upstream_edits(headers, &id);
        Outcome {
            decision: Decision { id, effect: Effect::Allow, reason: Reason::Allowed },
            verdict: Verdict::Forward(edits),
        }
    }

    fn deny(&self, id: String, reason: Reason) -> Outcome {
        let reply = LocalReply::deny(reason, &id, &self.config.upstream.decision_id_header);
        Outcome {
            decision: Decision { id, effect: Effect::Deny, reason },
            verdict: Verdict::Reply(reply),
        }
    }

    /// Strip what the caller must not control or the service must not see, then
    /// set what mandate vouches for.
    fn upstream_edits(&self, headers: &Headers, id: &str) -> HeaderEdits {
        let mut remove = headers.reserved_names();
        let decision_header = &self.config.upstream.decision_id_header;
        if headers.contains(decision_header) && !remove.iter().any(|n| n == decision_header) {
            remove.push(decision_header.clone());
        }
        if !self.config.identity.forward_token && headers.contains(&self.config.identity.header) {
            remove.push(self.config.identity.header.clone());
        }
        HeaderEdits { remove, set: vec![(decision_header.clone(), id.as_bytes().to_vec())] }
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

    fn headers(pairs: &[(&str, &str)]) -> Headers {
        Headers::new(pairs.iter().map(|(k, v)| (k.to_string(), v.as_bytes().to_vec())).collect())
    }

    fn engine() -> Engine {
        Engine::new(config::parse(b"{}").unwrap(), 7)
    }

    #[test]
    fn missing_token_is_denied_with_401() {
        let out = engine().on_request(&headers(&[(":path", "/")]));
        assert_eq!(out.decision.reason, Reason::TokenMissing);
        match out.verdict {
            Verdict::Reply(r) => assert_eq!(r.status, 401),
            other => panic!("expected reply, got {other:?}"),
        }
    }

    #[test]
    fn basic_auth_is_not_a_bearer_token() {
        let out = engine().on_request(&headers(&[("authorization", "Basic dXNlcjpwYXNz")]));
        assert_eq!(out.decision.reason, Reason::TokenMissing);
    }

    #[test]
    fn duplicate_authorization_is_malformed() {
        let out = engine().on_request(&headers(&[("authorization", "Bearer a"), ("authorization", "Bearer b")]));
        assert_eq!(out.decision.reason, Reason::TokenMalformed);
    }

    #[test]
    fn empty_bearer_is_missing() {
        let out = engine().on_request(&headers(&[("authorization", "Bearer   ")]));
        assert_eq!(out.decision.reason, Reason::TokenMissing);
    }

    #[test]
    fn forwarded_request_strips_token_and_spoofed_headers() {
        let out = engine().on_request(&headers(&[
            ("authorization", "bearer abc"),
            ("x-mandate-identity", "spiffe://evil/x"),
            ("x-mandate-decision-id", "forged"),
        ]));
        assert_eq!(out.decision.effect, Effect::Allow);
        let Verdict::Forward(edits) = out.verdict else { panic!("expected forward") };
        assert!(edits.remove.contains(&"authorization".to_string()));
        assert!(edits.remove.contains(&"x-mandate-identity".to_string()));
        assert!(edits.remove.contains(&"x-mandate-decision-id".to_string()));
        assert_eq!(edits.set, vec![("x-mandate-decision-id".to_string(), out.decision.id.into_bytes())]);
    }
}
