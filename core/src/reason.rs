//! Reason codes: one enum for local replies, decision records and metrics.
//!
//! The string codes are a stable public contract: dashboards, alerts and
//! policy test cases refer to them. Add new variants; never rename old ones.

use serde::Serialize;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// Every check passed.
    Allowed,

    // --- identity (401) ---
    TokenMissing,
    TokenMalformed,
    AlgNotAllowed,
    TypNotAllowed,
    CritNotAllowed,
    KidMissing,
    KidUnknown,
    SignatureInvalid,
    TokenExpired,
    TokenNotYetValid,
    IssuedInFuture,
    AudienceMismatch,
    AudienceMissing,
    ExpMissing,
    SubjectMissing,
    SpiffeIdInvalid,
    TrustDomainUnknown,
    IssuerUnknown,
    BundleUnavailable,

    // --- request shape (400) ---
    IntentMalformed,
    TaskMalformed,
    PathAmbiguous,
    AuthorityInvalid,
    MethodInvalid,

    // --- policy (403) ---
    IntentRequired,
    TaskRequired,
    UnclassifiedPrincipal,
    IntentUnknown,
    IntentMismatch,
    IntentTokenRequired,
    IntentTokenInvalid,
    SensitivityExceeded,
    TokenLifetimeExceeded,
    StandingSecretPresented,
    DeniedByRule,
    NoRuleMatched,
    TaskRevoked,
    SubjectRevoked,
    /// The policy requires registered tasks and nothing vouches for this one.
    TaskUnregistered,
    /// A minter is configured but the request matched no resource: there is no audience to
    /// mint for (the caller's `:authority` never chooses one).
    NoResourceMatched,
    TaskExpired,

    // --- MCP (issue 12) ---
    /// 403: the intent does not name this tool, MCP method, resource URI or prompt.
    ToolNotAllowed,
    /// 403: an argument constraint of the intent failed.
    ArgumentNotAllowed,
    /// 400: the JSON-RPC message or the MCP headers are malformed.
    McpMalformed,
    /// 400: a JSON-RPC batch (batches are refused).
    McpBatchRefused,
    /// 400: the MCP headers and the body disagree.
    McpHeaderMismatch,
    /// 413: the body is over the resource's `max_body_bytes`.
    McpBodyTooLarge,

    // --- delegation (issue 13) ---
    /// 401: the Txn-Token failed verification (signature, typ, iss, aud, time, claim shapes),
    /// or the header was sent twice.
    DelegationTokenInvalid,
    /// 403: a chain edge no `delegation_rules` entry allows, or a principal of the chain that
    /// the policy would not allow the operation (the intersection).
    DelegationNotAllowed,
    /// 403: more delegations than `max_delegations`.
    DelegationChainTooDeep,
    /// 403: the token's current actor is not the caller.
    DelegationActorMismatch,
    /// 403: the request goes beyond the token (intent, task, resource, tool, arguments, scope,
    /// or the receiving workload).
    DelegationScopeExceeded,
    /// 403: a principal appears twice in the chain.
    DelegationLoop,

    // --- availability (503) ---
    CredentialUnavailable,
    NotConfigured,
    InternalError,
    /// The revocation feed has not been heard from for `max_stale_s`.
    RevocationsStale,
}

/// Calls `$m!` with every [`Reason`] variant, in declaration order: for the faces that mirror
/// the enum (the component's WIT `reason`), so that a mapping names every variant once, here.
#[macro_export]
macro_rules! with_reason_variants {
    ($m:ident) => {
        $m!(
            Allowed,
            TokenMissing,
            TokenMalformed,
            AlgNotAllowed,
            TypNotAllowed,
            CritNotAllowed,
            KidMissing,
            KidUnknown,
            SignatureInvalid,
            TokenExpired,
            TokenNotYetValid,
            IssuedInFuture,
            AudienceMismatch,
            AudienceMissing,
            ExpMissing,
            SubjectMissing,
            SpiffeIdInvalid,
            TrustDomainUnknown,
            IssuerUnknown,
            BundleUnavailable,
            IntentMalformed,
            TaskMalformed,
            PathAmbiguous,
            AuthorityInvalid,
            MethodInvalid,
            IntentRequired,
            TaskRequired,
            UnclassifiedPrincipal,
            IntentUnknown,
            IntentMismatch,
            IntentTokenRequired,
            IntentTokenInvalid,
            SensitivityExceeded,
            TokenLifetimeExceeded,
            StandingSecretPresented,
            DeniedByRule,
            NoRuleMatched,
            TaskRevoked,
            SubjectRevoked,
            TaskUnregistered,
            NoResourceMatched,
            TaskExpired,
            ToolNotAllowed,
            ArgumentNotAllowed,
            McpMalformed,
            McpBatchRefused,
            McpHeaderMismatch,
            McpBodyTooLarge,
            DelegationTokenInvalid,
            DelegationNotAllowed,
            DelegationChainTooDeep,
            DelegationActorMismatch,
            DelegationScopeExceeded,
            DelegationLoop,
            CredentialUnavailable,
            NotConfigured,
            InternalError,
            RevocationsStale,
        )
    };
}

/// Compile-time check that [`with_reason_variants!`] names every variant: a variant added to
/// the enum but not to the list makes this match non-exhaustive.
#[allow(dead_code)]
fn every_variant_is_listed(r: Reason) {
    macro_rules! exhaustive {
        ($($v:ident),* $(,)?) => {
            match r {
                $(Reason::$v => {})*
            }
        };
    }
    with_reason_variants!(exhaustive)
}

/// The broad family a reason belongs to; used for the HTTP status and metric grouping.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Family {
    Allow,
    Identity,
    BadRequest,
    Policy,
    Unavailable,
}

impl Reason {
    /// Every reason, in declaration order (the one list: [`with_reason_variants!`]).
    pub const ALL: &'static [Reason] = {
        macro_rules! all {
            ($($v:ident),* $(,)?) => {
                &[$(Reason::$v),*]
            };
        }
        crate::with_reason_variants!(all)
    };

    /// Stable snake_case code, identical to the serde form.
    pub fn code(self) -> &'static str {
        match self {
            Reason::Allowed => "allowed",
            Reason::TokenMissing => "token_missing",
            Reason::TokenMalformed => "token_malformed",
            Reason::AlgNotAllowed => "alg_not_allowed",
            Reason::TypNotAllowed => "typ_not_allowed",
            Reason::CritNotAllowed => "crit_not_allowed",
            Reason::KidMissing => "kid_missing",
            Reason::KidUnknown => "kid_unknown",
            Reason::SignatureInvalid => "signature_invalid",
            Reason::TokenExpired => "token_expired",
            Reason::TokenNotYetValid => "token_not_yet_valid",
            Reason::IssuedInFuture => "issued_in_future",
            Reason::AudienceMismatch => "audience_mismatch",
            Reason::AudienceMissing => "audience_missing",
            Reason::ExpMissing => "exp_missing",
            Reason::SubjectMissing => "subject_missing",
            Reason::SpiffeIdInvalid => "spiffe_id_invalid",
            Reason::TrustDomainUnknown => "trust_domain_unknown",
            Reason::IssuerUnknown => "issuer_unknown",
            Reason::BundleUnavailable => "bundle_unavailable",
            Reason::IntentMalformed => "intent_malformed",
            Reason::TaskMalformed => "task_malformed",
            Reason::PathAmbiguous => "path_ambiguous",
            Reason::AuthorityInvalid => "authority_invalid",
            Reason::MethodInvalid => "method_invalid",
            Reason::IntentRequired => "intent_required",
            Reason::TaskRequired => "task_required",
            Reason::UnclassifiedPrincipal => "unclassified_principal",
            Reason::IntentUnknown => "intent_unknown",
            Reason::IntentMismatch => "intent_mismatch",
            Reason::IntentTokenRequired => "intent_token_required",
            Reason::IntentTokenInvalid => "intent_token_invalid",
            Reason::SensitivityExceeded => "sensitivity_exceeded",
            Reason::TokenLifetimeExceeded => "token_lifetime_exceeded",
            Reason::StandingSecretPresented => "standing_secret_presented",
            Reason::DeniedByRule => "denied_by_rule",
            Reason::NoRuleMatched => "no_rule_matched",
            Reason::TaskRevoked => "task_revoked",
            Reason::SubjectRevoked => "subject_revoked",
            Reason::TaskUnregistered => "task_unregistered",
            Reason::NoResourceMatched => "no_resource_matched",
            Reason::TaskExpired => "task_expired",
            Reason::ToolNotAllowed => "tool_not_allowed",
            Reason::ArgumentNotAllowed => "argument_not_allowed",
            Reason::McpMalformed => "mcp_malformed",
            Reason::McpBatchRefused => "mcp_batch_refused",
            Reason::McpHeaderMismatch => "mcp_header_mismatch",
            Reason::McpBodyTooLarge => "mcp_body_too_large",
            Reason::DelegationTokenInvalid => "delegation_token_invalid",
            Reason::DelegationNotAllowed => "delegation_not_allowed",
            Reason::DelegationChainTooDeep => "delegation_chain_too_deep",
            Reason::DelegationActorMismatch => "delegation_actor_mismatch",
            Reason::DelegationScopeExceeded => "delegation_scope_exceeded",
            Reason::DelegationLoop => "delegation_loop",
            Reason::CredentialUnavailable => "credential_unavailable",
            Reason::NotConfigured => "not_configured",
            Reason::InternalError => "internal_error",
            Reason::RevocationsStale => "revocations_stale",
        }
    }

    pub fn from_code(code: &str) -> Option<Reason> {
        Reason::ALL.iter().copied().find(|r| r.code() == code)
    }

    pub fn family(self) -> Family {
        use Reason::*;
        match self {
            Allowed => Family::Allow,
            TokenMissing | TokenMalformed | AlgNotAllowed | TypNotAllowed | CritNotAllowed
            | KidMissing | KidUnknown | SignatureInvalid | TokenExpired | TokenNotYetValid
            | IssuedInFuture | AudienceMismatch | AudienceMissing | ExpMissing | SubjectMissing | SpiffeIdInvalid
            | TrustDomainUnknown | IssuerUnknown | BundleUnavailable | DelegationTokenInvalid => Family::Identity,
            IntentMalformed | TaskMalformed | PathAmbiguous | AuthorityInvalid | MethodInvalid | McpMalformed | McpBatchRefused
            | McpHeaderMismatch | McpBodyTooLarge => Family::BadRequest,
            IntentRequired | TaskRequired | UnclassifiedPrincipal | IntentUnknown | IntentMismatch | IntentTokenRequired
            | IntentTokenInvalid | SensitivityExceeded | TokenLifetimeExceeded
            | StandingSecretPresented | DeniedByRule | NoRuleMatched | TaskRevoked | SubjectRevoked
            | TaskUnregistered | TaskExpired | NoResourceMatched | ToolNotAllowed | ArgumentNotAllowed
            | DelegationNotAllowed | DelegationChainTooDeep | DelegationActorMismatch | DelegationScopeExceeded
            | DelegationLoop => Family::Policy,
            CredentialUnavailable | NotConfigured | InternalError | RevocationsStale => Family::Unavailable,
        }
    }

    /// HTTP status of the local reply for a denial with this reason.
    pub fn http_status(self) -> u16 {
        if self == Reason::McpBodyTooLarge {
            return 413;
        }
        match self.family() {
            Family::Allow => 200,
            Family::Identity => 401,
            Family::BadRequest => 400,
            Family::Policy => 403,
            Family::Unavailable => 503,
        }
    }

    /// Human-readable message for reply bodies. Never contains request data.
    pub fn message(self) -> &'static str {
        use Reason::*;
        match self {
            Allowed => "allowed",
            TokenMissing => "a bearer token is required",
            TokenMalformed => "the token is not a well-formed compact JWS",
            AlgNotAllowed => "the token's signature algorithm is not allowed",
            TypNotAllowed => "the token's typ header is not allowed",
            CritNotAllowed => "the token carries critical header extensions",
            KidMissing => "the token header has no key id",
            KidUnknown => "no trusted key matches the token's key id",
            SignatureInvalid => "the token signature is invalid",
            TokenExpired => "the token has expired",
            TokenNotYetValid => "the token is not valid yet",
            IssuedInFuture => "the token was issued in the future",
            AudienceMismatch => "the token audience is not accepted here",
            AudienceMissing => "the token has no audience",
            ExpMissing => "the token has no expiry",
            SubjectMissing => "the token has no subject",
            SpiffeIdInvalid => "the token subject is not a valid SPIFFE ID",
            TrustDomainUnknown => "the token's trust domain is not trusted",
            IssuerUnknown => "the token issuer is not trusted",
            BundleUnavailable => "no trust bundle is available to verify the token",
            IntentMalformed => "the x-agent-intent header is malformed",
            TaskMalformed => "the x-agent-task header is malformed",
            PathAmbiguous => "the request path is ambiguous",
            AuthorityInvalid => "the request authority is invalid",
            MethodInvalid => "the request method is not a canonical uppercase token",
            IntentRequired => "an intent is required for this workload",
            TaskRequired => "a task is required for this intent",
            UnclassifiedPrincipal => "the caller matches no workload class",
            IntentUnknown => "the declared intent is not defined",
            IntentMismatch => "the operation is not permitted for the declared intent",
            IntentTokenRequired => "a signed intent token is required",
            IntentTokenInvalid => "the signed intent token is invalid",
            SensitivityExceeded => "the resource is more sensitive than permitted",
            TokenLifetimeExceeded => "the token lifetime exceeds what this workload class allows",
            StandingSecretPresented => "static credentials are not accepted from this workload",
            DeniedByRule => "denied by policy",
            NoRuleMatched => "no policy rule allows this request",
            TaskRevoked => "the task has ended or was revoked",
            SubjectRevoked => "the caller's credentials were revoked",
            TaskUnregistered => "the task is not registered for this caller",
            TaskExpired => "the task has expired",
            ToolNotAllowed => "the declared intent does not allow this tool, method, resource or prompt",
            ArgumentNotAllowed => "an argument is outside what the declared intent allows",
            McpMalformed => "the MCP request is malformed",
            McpBatchRefused => "JSON-RPC batches are not accepted",
            McpHeaderMismatch => "the MCP headers do not match the request body",
            McpBodyTooLarge => "the MCP request body is too large",
            DelegationTokenInvalid => "the transaction token is invalid",
            DelegationNotAllowed => "the delegation chain is not allowed this operation",
            DelegationChainTooDeep => "the delegation chain is too deep",
            DelegationActorMismatch => "the transaction token was issued to another actor",
            DelegationScopeExceeded => "the request goes beyond what the transaction token grants",
            DelegationLoop => "the delegation chain contains a loop",
            NoResourceMatched => "the destination matches no resource, so no credential can be issued for it",
            CredentialUnavailable => "a credential for the destination could not be obtained",
            NotConfigured => "the filter is not configured",
            InternalError => "internal error",
            RevocationsStale => "revocation data is out of date; no credential is issued",
        }
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.code())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_unique_and_round_trip() {
        let mut seen = std::collections::HashSet::new();
        for r in Reason::ALL {
            assert!(seen.insert(r.code()), "duplicate code {}", r.code());
            assert_eq!(Reason::from_code(r.code()), Some(*r));
            let json = serde_json::to_string(r).unwrap();
            assert_eq!(json, format!("\"{}\"", r.code()));
        }
    }

    #[test]
    fn statuses_follow_families() {
        assert_eq!(Reason::TokenMissing.http_status(), 401);
        assert_eq!(Reason::PathAmbiguous.http_status(), 400);
        assert_eq!(Reason::IntentMismatch.http_status(), 403);
        assert_eq!(Reason::CredentialUnavailable.http_status(), 503);
        assert_eq!(Reason::Allowed.http_status(), 200);
        assert_eq!(Reason::RevocationsStale.http_status(), 503);
        assert_eq!(Reason::TaskUnregistered.http_status(), 403);
        assert_eq!(Reason::TaskExpired.http_status(), 403);
        assert_eq!(Reason::McpBodyTooLarge.http_status(), 413);
        assert_eq!(Reason::McpHeaderMismatch.http_status(), 400);
        assert_eq!(Reason::ToolNotAllowed.http_status(), 403);
        assert_eq!(Reason::ArgumentNotAllowed.http_status(), 403);
        assert_eq!(Reason::DelegationTokenInvalid.http_status(), 401);
        for code in ["delegation_not_allowed", "delegation_chain_too_deep", "delegation_actor_mismatch", "delegation_scope_exceeded", "delegation_loop"] {
            assert_eq!(Reason::from_code(code).map(Reason::http_status), Some(403), "{code}");
        }
        for code in ["revocations_stale", "task_unregistered", "task_expired", "tool_not_allowed", "argument_not_allowed", "mcp_malformed", "mcp_batch_refused", "mcp_header_mismatch", "mcp_body_too_large"] {
            assert!(Reason::from_code(code).is_some(), "{code}");
        }
    }
}
