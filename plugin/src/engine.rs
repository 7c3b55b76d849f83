//! The request path: identity → intent → policy → mint → inject → log.
//!
//! Host-independent: the proxy-wasm shell gathers the inputs (headers, time)
//! in as few host calls as it can, calls [`Engine::on_request`] and applies
//! the returned [`Verdict`].

use crate::config::{Config, ConfigError};
use crate::decision::{DecisionIds, Effect, LocalReply};
use crate::headers::Headers;
use crate::identity::{token_digest, Identity, Verifier};
use crate::policy::intent::{self, IntentVerifier};
use crate::policy::path::{normalize, normalize_authority};
use crate::policy::{Policy, PolicyDecision, PolicyInput, SignedIntent};
use crate::reason::Reason;
use lru::LruCache;
use sha2::{Digest, Sha256};
use std::num::NonZeroUsize;
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

/// What was decided about one request, and on what grounds.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Decision {
    pub id: String,
    pub effect: Option<Effect>,
    pub reason: Option<Reason>,
    pub identity: Option<Rc<Identity>>,
    pub intent: Option<String>,
    pub task: Option<String>,
    pub intent_signed: bool,
    pub method: Option<String>,
    pub authority: Option<String>,
    pub path: Option<String>,
    pub policy: Option<Rc<PolicyDecision>>,
    pub identity_cache_hit: bool,
    pub decision_cache_hit: bool,
}

impl Decision {
    pub fn effect(&self) -> Effect {
        self.effect.unwrap_or(Effect::Deny)
    }
    pub fn reason(&self) -> Reason {
        self.reason.unwrap_or(Reason::InternalError)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub decision: Decision,
    pub verdict: Verdict,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EngineStats {
    pub decision_cache_hits: u64,
    pub decision_cache_misses: u64,
}

struct CachedDecision {
    policy: Rc<PolicyDecision>,
    signed: Option<SignedIntent>,
    expires_at: u64,
}

pub struct Engine {
    config: Config,
    ids: DecisionIds,
    pub identity: Verifier,
    policy: Option<Policy>,
    intents: IntentVerifier,
    environment: Option<String>,
    decisions: Option<LruCache<[u8; 16], CachedDecision>>,
    pub stats: EngineStats,
}

/// Inputs gathered by the shell for one request.
pub struct Request<'a> {
    pub headers: &'a Headers,
    /// Unix time, seconds.
    pub now: u64,
}

type Step<T> = Result<T, Reason>;

impl Engine {
    /// `host_environment` is the environment read from the host (node metadata), if configured.
    pub fn new(config: Config, id_seed: u64, host_environment: Option<String>) -> Result<Engine, ConfigError> {
        let identity = Verifier::new(&config.identity).map_err(|e| ConfigError::new("identity", e))?;
        let (policy, intents) = match &config.policy {
            Some(p) => (
                Some(Policy::compile(p, "policy")?),
                IntentVerifier::new(&p.intent_issuers, config.identity.clock_skew_s, "policy.intent_issuers")?,
            ),
            None => (None, IntentVerifier::new(&[], 0, "policy.intent_issuers")?),
        };
        let environment = policy.as_ref().and_then(|p| p.environment.clone()).or(host_environment);
        let decisions = policy.as_ref().and_then(|p| NonZeroUsize::new(p.cache.size)).map(LruCache::new);
        Ok(Engine {
            config,
            ids: DecisionIds::new(id_seed),
            identity,
            policy,
            intents,
            environment,
            decisions,
            stats: EngineStats::default(),
        })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn policy(&self) -> Option<&Policy> {
        self.policy.as_ref()
    }

    /// The request path, top to bottom: identity → intent → policy → (mint) → inject → log.
    pub fn on_request(&mut self, req: &Request<'_>) -> Outcome {
        let mut d = Decision { id: self.ids.next_id(), ..Decision::default() };
        match self.decide(req, &mut d) {
            Ok(edits) => Outcome { verdict: Verdict::Forward(edits), decision: d },
            Err(reason) => self.deny(d, reason),
        }
    }

    fn decide(&mut self, req: &Request<'_>, d: &mut Decision) -> Step<HeaderEdits> {
        let h = req.headers;

        // 1. Identity: a token verified against the trust bundles.
        let token = bearer_token(h, &self.config)?;
        let hits_before = self.identity.stats.cache_hits;
        let identity = self.identity.verify(token, req.now)?;
        d.identity_cache_hit = self.identity.stats.cache_hits > hits_before;
        d.identity = Some(identity.clone());

        // 2. The operation and the declared intent, refused when ambiguous.
        let method = pseudo(h, ":method").ok_or(Reason::MethodInvalid)?;
        // Methods are case-sensitive tokens; `delete` must not slip past a `DELETE` rule.
        if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) {
            return Err(Reason::MethodInvalid);
        }
        let authority = pseudo(h, ":authority").and_then(|a| normalize_authority(a.as_bytes())).ok_or(Reason::AuthorityInvalid)?;
        let raw_path = h.single(":path").ok().flatten().ok_or(Reason::PathAmbiguous)?;
        let path = normalize(raw_path).map_err(|_| Reason::PathAmbiguous)?;
        d.method = Some(method.clone());
        d.authority = Some(authority.clone());
        d.path = Some(path.path.clone());
        let mut intent_name = intent::declared_intent(h)?;
        let mut task = intent::declared_task(h)?;
        let intent_token = match h.single(intent::INTENT_TOKEN_HEADER) {
            Ok(t) => t,
            Err(_) => return Err(Reason::IntentTokenInvalid),
        };
        let standing_secret = self.standing_secret_presented(h);
        d.intent = intent_name.clone();
        d.task = task.clone();

        // 3. Policy, reusing a recent decision for the very same request.
        let policy = self.policy.as_ref().ok_or(Reason::NoRuleMatched)?;
        let key = decision_key(token, &intent_name, intent_token, &task, &method, &authority, &path.path, standing_secret);
        let cached = self.decisions.as_mut().and_then(|c| c.get(&key)).filter(|c| c.expires_at > req.now);
        let (decision, signed) = if let Some(hit) = cached {
            self.stats.decision_cache_hits += 1;
            d.decision_cache_hit = true;
            (hit.policy.clone(), hit.signed.clone())
        } else {
            self.stats.decision_cache_misses += 1;
            let signed = match intent_token {
                Some(t) => {
                    let s = self.intents.verify(t, &identity.principal, req.now)?;
                    // A task named in the token binds the request to it.
                    match (&s.task, &task) {
                        (Some(st), Some(ht)) if st != ht => return Err(Reason::IntentTokenInvalid),
                        _ => {}
                    }
                    Some(s)
                }
                None => None,
            };
            if intent_name.is_none() {
                if let Some([only]) = signed.as_ref().map(|s| s.intents.as_slice()) {
                    intent_name = Some(only.clone());
                }
            }
            if task.is_none() {
                task = signed.as_ref().and_then(|s| s.task.clone());
            }
            let input = PolicyInput {
                principal: &identity.principal,
                iat: identity.iat,
                exp: identity.exp,
                intent: intent_name.as_deref(),
                signed_intent: signed.as_ref(),
                task: task.as_deref(),
                method: &method,
                authority: &authority,
                path: &path.path,
                now: req.now,
                environment: self.environment.as_deref(),
                standing_secret,
            };
            let decision = Rc::new(policy.evaluate(&input));
            let ttl_end = req.now.saturating_add(policy.cache.ttl_s);
            let expires_at = [ttl_end, identity.exp, decision.valid_until, signed.as_ref().map_or(u64::MAX, |s| s.exp)]
                .into_iter()
                .min()
                .unwrap_or(req.now);
            if let Some(c) = self.decisions.as_mut() {
                c.put(key, CachedDecision { policy: decision.clone(), signed: signed.clone(), expires_at });
            }
            (decision, signed)
        };
        d.intent = intent_name.or(d.intent.take());
        d.task = task.or(signed.as_ref().and_then(|s| s.task.clone()));
        d.intent_signed = signed.is_some();
        d.policy = Some(decision.clone());
        if decision.effect == Effect::Deny {
            return Err(decision.reason);
        }
        d.effect = Some(decision.effect);
        d.reason = Some(decision.reason);

        // 4. Inject: strip what the caller must not control, set what mandate vouches for.
        let mut edits = self.upstream_edits(h, &d.id, &identity);
        if self.config.upstream.rewrite_path {
            let target = path.target();
            if target.as_bytes() != raw_path {
                edits.set.push((":path".to_string(), target.into_bytes()));
            }
        }
        Ok(edits)
    }

    fn standing_secret_presented(&self, h: &Headers) -> bool {
        let Some(p) = &self.policy else { return false };
        p.standing_secret_headers.iter().any(|name| h.contains(name))
            || h.all("authorization").any(|v| v.len() >= 6 && v.get(..6).is_some_and(|s| s.eq_ignore_ascii_case(b"basic ")))
    }

    /// A denial for a request the filter could not judge (host failure).
    pub fn fail_closed(&mut self, reason: Reason) -> Outcome {
        let d = Decision { id: self.ids.next_id(), ..Decision::default() };
        self.deny(d, reason)
    }

    fn deny(&self, mut d: Decision, reason: Reason) -> Outcome {
        d.effect = Some(Effect::Deny);
        d.reason = Some(reason);
        let reply = LocalReply::deny(reason, &d.id, &self.config.upstream.decision_id_header);
        Outcome { decision: d, verdict: Verdict::Reply(reply) }
    }

    fn upstream_edits(&self, headers: &Headers, id: &str, identity: &Identity) -> HeaderEdits {
        let mut remove = headers.reserved_names();
        let mut set = Vec::with_capacity(3);
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
        // The intent token is a credential too: it never reaches the service.
        if headers.contains(intent::INTENT_TOKEN_HEADER) {
            remove.push(intent::INTENT_TOKEN_HEADER.to_string());
        }
        HeaderEdits { remove, set }
    }

    pub fn decision_cache_len(&self) -> usize {
        self.decisions.as_ref().map_or(0, LruCache::len)
    }
}

fn pseudo(h: &Headers, name: &str) -> Option<String> {
    h.single(name).ok().flatten().and_then(|v| std::str::from_utf8(v).ok()).map(str::to_string)
}

#[allow(clippy::too_many_arguments)]
fn decision_key(
    token: &[u8],
    intent: &Option<String>,
    intent_token: Option<&[u8]>,
    task: &Option<String>,
    method: &str,
    authority: &str,
    path: &str,
    standing_secret: bool,
) -> [u8; 16] {
    let mut h = Sha256::new();
    h.update(token_digest(token));
    for part in [intent.as_deref().unwrap_or(""), task.as_deref().unwrap_or(""), method, authority, path] {
        h.update((part.len() as u32).to_le_bytes());
        h.update(part.as_bytes());
    }
    h.update(intent_token.map_or([0u8; 16], token_digest));
    h.update([u8::from(intent_token.is_some()), u8::from(standing_secret)]);
    let full: [u8; 32] = h.finalize().into();
    let mut out = [0u8; 16];
    out.copy_from_slice(full.get(..16).unwrap_or(&[0u8; 16]));
    out
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
    use crate::testkit::{plain_jwks, spiffe_bundle, svid_claims, TestKey};
    use serde_json::json;

    // Wednesday 2026-11-25 10:00 UTC.
    const NOW: u64 = 1_795_564_800 + 10 * 3600;
    const AUD: &str = "spiffe://example.org/gw";
    const SUB: &str = "spiffe://example.org/agent/a1";

    fn headers(pairs: &[(&str, &str)]) -> Headers {
        Headers::new(pairs.iter().map(|(k, v)| (k.to_string(), v.as_bytes().to_vec())).collect())
    }

    fn policy() -> serde_json::Value {
        json!({
            "classes": [{"name": "agent", "principals": ["spiffe://example.org/agent/*"], "intent_required": true,
                         "refuse_standing_secrets": true, "max_token_lifetime_s": 600}],
            "resources": [
                {"name": "tickets", "hosts": ["tickets.internal"], "paths": ["/tickets/**"], "sensitivity": "internal"},
                {"name": "crm", "hosts": ["crm.internal"], "paths": ["/customers/**"], "sensitivity": "restricted"}
            ],
            "intents": [
                {"name": "ticket.read", "operations": [{"resource": "tickets", "methods": ["GET"]}], "scopes": ["tickets:read"]},
                {"name": "customer.lookup", "operations": [{"resource": "crm", "methods": ["GET"]}], "require_signed": true}
            ],
            "rules": [
                {"id": "agents", "effect": "allow", "classes": ["agent"], "intents": ["ticket.read"]},
                {"id": "crm-office-hours", "effect": "allow", "classes": ["agent"], "intents": ["customer.lookup"], "when": {"hours": ["08:00-10:30"]}}
            ]
        })
    }

    fn engine_with(key: &TestKey, identity_extra: serde_json::Value, policy: Option<serde_json::Value>) -> Engine {
        let mut identity = json!({"audiences": [AUD], "upstream_header": "x-mandate-identity",
            "trust_domains": [{"name": "example.org", "bundle": {"inline": spiffe_bundle(&[key], None)}}]});
        if let (Some(obj), Some(extra)) = (identity.as_object_mut(), identity_extra.as_object()) {
            obj.extend(extra.clone());
        }
        let mut cfg = json!({"identity": identity});
        if let Some(p) = policy {
            cfg["policy"] = p;
        }
        let cfg = config::parse(cfg.to_string().as_bytes()).unwrap();
        Engine::new(cfg, 7, None).unwrap()
    }

    fn engine(key: &TestKey) -> Engine {
        engine_with(key, json!({}), Some(policy()))
    }

    fn bearer(key: &TestKey) -> String {
        format!("Bearer {}", key.sign(&svid_claims(SUB, AUD, NOW, NOW + 300)))
    }

    fn get<'a>(extra: &[(&'a str, &'a str)], auth: &'a str) -> Vec<(&'a str, &'a str)> {
        let mut v = vec![(":method", "GET"), (":authority", "tickets.internal"), (":path", "/tickets/1"), ("authorization", auth), ("x-agent-intent", "ticket.read")];
        for (k, val) in extra {
            v.retain(|(n, _)| n != k);
            v.push((k, val));
        }
        v
    }

    fn run_at(e: &mut Engine, pairs: &[(&str, &str)], now: u64) -> Outcome {
        e.on_request(&Request { headers: &headers(pairs), now })
    }

    fn run(e: &mut Engine, pairs: &[(&str, &str)]) -> Outcome {
        run_at(e, pairs, NOW)
    }

    fn edits(out: Outcome) -> HeaderEdits {
        match out.verdict {
            Verdict::Forward(e) => e,
            Verdict::Reply(r) => panic!("expected forward, got {} {}", r.status, r.body),
        }
    }

    #[test]
    fn missing_token_is_denied_with_401() {
        let k = TestKey::es256("k");
        let out = run(&mut engine(&k), &[(":path", "/")]);
        assert_eq!(out.decision.reason(), Reason::TokenMissing);
        let Verdict::Reply(r) = out.verdict else { panic!() };
        assert_eq!(r.status, 401);
    }

    #[test]
    fn basic_auth_is_not_a_bearer_token() {
        let k = TestKey::es256("k");
        let out = run(&mut engine(&k), &get(&[], "Basic dXNlcjpwYXNz"));
        assert_eq!(out.decision.reason(), Reason::TokenMissing);
    }

    #[test]
    fn duplicate_authorization_is_malformed() {
        let k = TestKey::es256("k");
        let b = bearer(&k);
        let mut h = get(&[], &b);
        h.push(("authorization", &b));
        assert_eq!(run(&mut engine(&k), &h).decision.reason(), Reason::TokenMalformed);
    }

    #[test]
    fn empty_bearer_is_missing() {
        let k = TestKey::es256("k");
        assert_eq!(run(&mut engine(&k), &get(&[], "Bearer   ")).decision.reason(), Reason::TokenMissing);
    }

    #[test]
    fn allowed_request_strips_token_and_spoofed_headers() {
        let k = TestKey::es256("k");
        let b = bearer(&k).replace("Bearer", "bearer");
        let out = run(&mut engine(&k), &get(&[("x-mandate-identity", "spiffe://example.org/admin"), ("x-mandate-decision-id", "forged")], &b));
        assert_eq!(out.decision.effect(), Effect::Allow, "{:?}", out.decision);
        let id = out.decision.id.clone();
        let e = edits(out);
        for name in ["authorization", "x-mandate-identity", "x-mandate-decision-id"] {
            assert!(e.remove.contains(&name.to_string()), "{name} not removed");
        }
        assert_eq!(e.set[0], ("x-mandate-decision-id".to_string(), id.into_bytes()));
        assert_eq!(e.set[1], ("x-mandate-identity".to_string(), SUB.as_bytes().to_vec()));
    }

    #[test]
    fn no_policy_means_default_deny() {
        let k = TestKey::es256("k");
        let mut e = engine_with(&k, json!({}), None);
        let out = run(&mut e, &get(&[], &bearer(&k)));
        assert_eq!(out.decision.reason(), Reason::NoRuleMatched);
    }

    #[test]
    fn custom_identity_header_is_stripped_when_spoofed() {
        let k = TestKey::es256("k");
        let mut e = engine_with(&k, json!({"upstream_header": "x-caller"}), Some(policy()));
        let b = bearer(&k);
        let e = edits(run(&mut e, &get(&[("x-caller", "spiffe://example.org/admin")], &b)));
        assert!(e.remove.contains(&"x-caller".to_string()));
    }

    #[test]
    fn forward_token_keeps_authorization() {
        let k = TestKey::es256("k");
        let mut e = engine_with(&k, json!({"forward_token": true}), Some(policy()));
        let b = bearer(&k);
        assert!(!edits(run(&mut e, &get(&[], &b))).remove.contains(&"authorization".to_string()));
    }

    #[test]
    fn forged_token_is_denied_without_echo() {
        let k = TestKey::es256("k");
        let forger = TestKey::es256("k");
        let b = bearer(&forger);
        let out = run(&mut engine(&k), &get(&[], &b));
        assert_eq!(out.decision.reason(), Reason::SignatureInvalid);
        let Verdict::Reply(r) = out.verdict else { panic!() };
        let token = b.trim_start_matches("Bearer ");
        assert!(!r.body.contains(token) && !r.headers.iter().any(|(_, v)| v.contains(token)));
        assert!(!r.body.contains(&token[token.len() - 20..]), "no fragment of the signature either");
    }

    #[test]
    fn traversal_is_judged_normalised_and_forwarded_normalised() {
        let k = TestKey::es256("k");
        let b = bearer(&k);
        let e = edits(run(&mut engine(&k), &get(&[(":path", "/public/../tickets/%31?x=1")], &b)));
        assert!(e.set.contains(&(":path".to_string(), b"/tickets/1?x=1".to_vec())));
        // Escaping the resource by traversal is judged where it lands.
        let out = run(&mut engine(&k), &get(&[(":path", "/tickets/../admin")], &b));
        assert_eq!(out.decision.reason(), Reason::IntentMismatch);
    }

    #[test]
    fn ambiguous_path_is_400() {
        let k = TestKey::es256("k");
        let out = run(&mut engine(&k), &get(&[(":path", "/tickets/a%2F..%2Fadmin")], &bearer(&k)));
        assert_eq!(out.decision.reason(), Reason::PathAmbiguous);
        let Verdict::Reply(r) = out.verdict else { panic!() };
        assert_eq!(r.status, 400);
    }

    #[test]
    fn malformed_intent_is_400() {
        let k = TestKey::es256("k");
        let out = run(&mut engine(&k), &get(&[("x-agent-intent", "ticket.read, repo.write")], &bearer(&k)));
        assert_eq!(out.decision.reason(), Reason::IntentMalformed);
    }

    #[test]
    fn standing_secret_next_to_svid_is_refused() {
        let k = TestKey::es256("k");
        let out = run(&mut engine(&k), &get(&[("x-api-key", "sk_live_123")], &bearer(&k)));
        assert_eq!(out.decision.reason(), Reason::StandingSecretPresented);
    }

    #[test]
    fn decision_cache_hits_and_respects_window_boundary() {
        let k = TestKey::es256("k");
        let ik = TestKey::es256("intent-key");
        let mut p = policy();
        p["intent_issuers"] = json!([{"issuer": "https://intent", "jwks": plain_jwks(&[&ik])}]);
        let mut e = engine_with(&k, json!({}), Some(p));
        let b = format!("Bearer {}", k.sign(&svid_claims(SUB, AUD, NOW + 1700, NOW + 2200)));
        let it = ik.sign(&json!({"iss": "https://intent", "sub": SUB, "exp": NOW + 7200, "intents": ["customer.lookup"], "task": "T-9"}));
        let h = get(&[(":authority", "crm.internal"), (":path", "/customers/7"), ("x-agent-intent", "customer.lookup"), ("x-agent-intent-token", &it)], &b);
        // 10:29:50 — allowed, cached until the window closes at 10:30.
        let t = NOW + 29 * 60 + 50;
        let out = run_at(&mut e, &h, t);
        assert_eq!(out.decision.effect(), Effect::Allow, "{:?}", out.decision);
        assert_eq!(out.decision.task.as_deref(), Some("T-9"));
        assert!(out.decision.intent_signed);
        let e2 = edits(out);
        assert!(e2.remove.contains(&"x-agent-intent-token".to_string()));
        let out = run_at(&mut e, &h, t + 5);
        assert!(out.decision.decision_cache_hit);
        assert_eq!(out.decision.effect(), Effect::Allow);
        let out = run_at(&mut e, &h, t + 10);
        assert!(!out.decision.decision_cache_hit, "entry must expire at the window boundary");
        assert_eq!(out.decision.reason(), Reason::NoRuleMatched);
        assert_eq!(e.stats, EngineStats { decision_cache_hits: 1, decision_cache_misses: 2 });
    }

    #[test]
    fn cached_decision_does_not_cover_a_different_request() {
        let k = TestKey::es256("k");
        let mut e = engine(&k);
        let b = bearer(&k);
        assert_eq!(run(&mut e, &get(&[], &b)).decision.effect(), Effect::Allow);
        let out = run(&mut e, &get(&[(":method", "DELETE")], &b));
        assert_eq!(out.decision.reason(), Reason::IntentMismatch);
        let out = run(&mut e, &get(&[("x-api-key", "k")], &b));
        assert_eq!(out.decision.reason(), Reason::StandingSecretPresented);
    }

    #[test]
    fn signed_intent_task_conflict_is_refused() {
        let k = TestKey::es256("k");
        let ik = TestKey::es256("ik");
        let mut p = policy();
        p["intent_issuers"] = json!([{"issuer": "https://intent", "jwks": plain_jwks(&[&ik])}]);
        let mut e = engine_with(&k, json!({}), Some(p));
        let b = bearer(&k);
        let it = ik.sign(&json!({"iss": "https://intent", "sub": SUB, "exp": NOW + 60, "intents": ["ticket.read"], "task": "T-1"}));
        let out = run(&mut e, &get(&[("x-agent-intent-token", &it), ("x-agent-task", "T-2")], &b));
        assert_eq!(out.decision.reason(), Reason::IntentTokenInvalid);
    }
}
