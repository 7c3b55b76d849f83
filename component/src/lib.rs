//! mandate's decision core as a WebAssembly component (`wit/mandate.wit`, world `decider`).
//!
//! A thin face over [`mandate_core::decide`]: it converts the WIT types to the core's and back,
//! and holds the one configured [`Decider`] of this instance. No clock is read (requests carry
//! `now`); std's random hash keys seed the decision ids. Native builds are empty.

#[cfg(target_arch = "wasm32")]
mod face {
    use std::cell::RefCell;

    use mandate_core::decide::{self, Decider};
    use mandate_core::decision::Effect as CoreEffect;
    use mandate_core::policy::cases::CaseDelegation;
    use mandate_core::reason::Reason as CoreReason;

    wit_bindgen::generate!({ world: "decider", path: "../wit" });

    use mandate::decision::types::{
        Caller, Delegation, Effect, IntentProof, McpCall, Reason,
    };

    thread_local! {
        // A component instance is single-threaded; the host creates one per decider it needs.
        static DECIDER: RefCell<Option<Decider>> = const { RefCell::new(None) };
    }

    struct Component;
    export!(Component);

    impl Guest for Component {
        fn configure(config: String) -> Result<(), ConfigError> {
            let d = Decider::configure(config.as_bytes()).map_err(|e| ConfigError { field: e.field.clone(), message: e.message.clone() })?;
            DECIDER.with(|cell| *cell.borrow_mut() = Some(d));
            Ok(())
        }

        fn verify(token: String, now: u64) -> Result<Identity, Refusal> {
            let refusal = |r: CoreReason| Refusal { reason: reason(r), code: r.code().to_string() };
            DECIDER.with(|cell| match cell.borrow_mut().as_mut() {
                None => Err(refusal(CoreReason::NotConfigured)),
                Some(d) => d.verify(&token, now).map(identity).map_err(refusal),
            })
        }

        fn decide(request: Request) -> Decision {
            let core_req = match to_core(request) {
                Ok(r) => r,
                Err(e) => return refused(e, String::new()),
            };
            DECIDER.with(|cell| match cell.borrow_mut().as_mut() {
                None => refused(CoreReason::NotConfigured, String::new()),
                Some(d) => {
                    let out = d.decide(&core_req);
                    Decision {
                        effect: match out.effect {
                            CoreEffect::Allow => Effect::Allow,
                            CoreEffect::Deny => Effect::Deny,
                            CoreEffect::DryRunDeny => Effect::DryRunDeny,
                        },
                        reason: reason(out.reason),
                        rule_id: out.rule_id,
                        dry_run_rule_id: out.dry_run_rule_id,
                        scopes: out.scopes,
                        ttl_s: out.ttl_s,
                        decision_id: out.decision_id,
                        record: out.record,
                    }
                }
            })
        }
    }

    /// A denial decided before the core could judge (no configuration, unreadable JSON).
    fn refused(r: CoreReason, record: String) -> Decision {
        Decision {
            effect: Effect::Deny,
            reason: reason(r),
            rule_id: None,
            dry_run_rule_id: None,
            scopes: Vec::new(),
            ttl_s: None,
            decision_id: String::new(),
            record,
        }
    }

    fn identity(i: decide::CallerIdentity) -> Identity {
        Identity {
            principal: i.principal,
            trust_domain: i.trust_domain,
            issued_at: i.issued_at,
            expires_at: i.expires_at,
            token_hash: i.token_hash,
        }
    }

    /// `tctx.arguments` must be strict JSON, as the filter reads a body (no duplicate key, escaped
    /// spellings included; bounded depth), or the request is malformed: a lenient parse would
    /// merge `{"amount":1,"amount":5000}` where the filter refuses. (Tool arguments go to the
    /// core as text, whose body parser is as strict.)
    fn json(v: Option<String>, bad: CoreReason) -> Result<Option<serde_json::Value>, CoreReason> {
        v.map(|s| {
            mandate_core::mcp::jsonrpc::check_strict(&s).map_err(|_| bad)?;
            serde_json::from_str(&s).map_err(|_| bad)
        })
        .transpose()
    }

    fn to_core(r: Request) -> Result<decide::DecideRequest, CoreReason> {
        // The arguments stay text: the core reads them with the filter's strict body parser.
        let mcp = r.mcp.map(|McpCall { method, name, uri, arguments }| decide::McpRequest { method, name, uri, arguments });
        let delegation = match r.delegation {
            None => None,
            Some(Delegation { chain, intent, task, scope, resources, tools, arguments, may_act }) => Some(CaseDelegation {
                chain,
                intent,
                task,
                scope,
                resources,
                tools,
                arguments: json(arguments, CoreReason::DelegationTokenInvalid)?,
                may_act,
            }),
        };
        Ok(decide::DecideRequest {
            caller: match r.caller {
                Caller::Verified(i) => decide::Caller::Verified(decide::CallerIdentity {
                    principal: i.principal,
                    trust_domain: i.trust_domain,
                    issued_at: i.issued_at,
                    expires_at: i.expires_at,
                    token_hash: i.token_hash,
                }),
                Caller::Token(t) => decide::Caller::Token(t),
            },
            intent: r.intent,
            task: r.task,
            intent_proof: r.intent_proof.map(|p| match p {
                IntentProof::Claims(c) => decide::IntentProof::Claims { intents: c.intents, task: c.task },
                IntentProof::Token(t) => decide::IntentProof::Token(t),
            }),
            method: r.method,
            authority: r.authority,
            path: r.path,
            mcp,
            delegation,
            now: r.now,
            environment: r.environment,
            standing_secret: r.standing_secret,
        })
    }

    /// Every core reason has its WIT case of the same name: a reason added to the core without
    /// one fails to compile here.
    fn reason(r: CoreReason) -> Reason {
        macro_rules! same {
            ($($v:ident),* $(,)?) => {
                match r {
                    $(CoreReason::$v => Reason::$v,)*
                }
            };
        }
        mandate_core::with_reason_variants!(same)
    }
}
