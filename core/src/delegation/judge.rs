//! Re-authorising a delegated request: the chain, the context, the edges, the intersection
//! (every principal of the chain judged by the policy with its own class), and the grants
//! within the token. Shared by the filter and by `mandate policy test|explain`.

use super::chain;
use super::token::TxnToken;
use super::Failed;
use crate::decision::Effect;
use crate::policy::mcp::{ArgContext, ArgOutcome};
use crate::policy::{Policy, PolicyDecision, PolicyInput, TxnTokenMode};
use crate::reason::Reason;
use serde::Serialize;

/// Step 2: no principal twice, at most `cap` delegations, and the current actor is the caller.
pub fn check_chain(t: &TxnToken, caller: &str, cap: u32) -> Result<(), Reason> {
    if t.has_loop {
        return Err(Reason::DelegationLoop);
    }
    if t.depth() > cap as usize {
        return Err(Reason::DelegationChainTooDeep);
    }
    if t.actor() != caller {
        return Err(Reason::DelegationActorMismatch);
    }
    Ok(())
}

/// Step 3: the declared intent is the token's; the declared task (if any) is the token's.
pub fn check_context(t: &TxnToken, intent: Option<&str>, task: Option<&str>) -> Result<(), Reason> {
    if intent != Some(t.ctx.intent.as_str()) {
        return Err(Reason::DelegationScopeExceeded);
    }
    if task.is_some_and(|x| x != t.ctx.task) {
        return Err(Reason::DelegationScopeExceeded);
    }
    Ok(())
}

/// One principal's judgement in the intersection.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct PrincipalVerdict {
    pub principal: String,
    pub class: Option<String>,
    pub effect: Effect,
    pub reason: Reason,
    pub rule: Option<String>,
}

/// One hop and the delegation rule allowing it (`None`: none does).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct EdgeVerdict {
    pub from: String,
    pub to: String,
    pub rule: Option<String>,
}

/// Steps 5 to 7 for one request.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Judgement {
    pub edges: Vec<EdgeVerdict>,
    pub principals: Vec<PrincipalVerdict>,
    /// The refusal (`delegation_not_allowed` or `delegation_scope_exceeded`) and where.
    pub failure: Option<(Reason, Failed)>,
    /// In dry run: a principal would have been refused.
    pub dry_run: Option<Failed>,
    /// The grants within the token need the MCP body (arguments not in the headers).
    #[serde(skip)]
    pub needs_body: bool,
}

/// Steps 5 (edges), 6 (intersection) and 7 (within the token) for the operation in `input`
/// (the caller's, judged as `caller`). The first failure in that order is the one reported.
#[inline(never)]
pub fn judge(policy: &Policy, t: &TxnToken, input: &PolicyInput<'_>, caller: &PolicyDecision) -> Judgement {
    let mut j = Judgement::default();
    let intent = t.ctx.intent.as_str();

    // 5. Every hop allowed by a delegation rule naming the intent.
    for (from, to) in chain::edges(&t.chain) {
        let rule = policy.delegation_rule(intent, from, to).map(|r| r.id.clone());
        if rule.is_none() && j.failure.is_none() {
            let f = Failed { principal: to.into(), from: Some(from.into()), reason: Reason::DelegationNotAllowed, rule: None, exceeded: None };
            j.failure = Some((Reason::DelegationNotAllowed, f));
        }
        j.edges.push(EdgeVerdict { from: from.into(), to: to.into(), rule });
    }

    // 6. The intersection: each principal with its own class. Principals other than the caller
    // hold no token here: the Txn-Token's lifetime stands for theirs, and the intent and task
    // the minter vouched for stand for a signed intent. That vouches for the task only: an
    // intent that must be signed (`require_signed`) is signed for the chain when the caller
    // brought an intent token from an intent issuer for it, never by the Txn-Token alone.
    let mut vouched = t.vouched_intent();
    vouched.from_txn_token = !input.signed_intent.is_some_and(|s| s.by_issuer());
    let last = t.chain.len().saturating_sub(1);
    for (i, p) in t.chain.iter().enumerate() {
        let owned;
        let d = if i == last && p == input.principal {
            caller
        } else {
            let inp = PolicyInput { principal: p, iat: Some(t.iat), exp: t.exp, signed_intent: Some(&vouched), ..input.clone() };
            owned = policy.evaluate(&inp);
            &owned
        };
        let failed = || Failed { principal: p.clone(), from: None, reason: d.dry_run_reason.unwrap_or(d.reason), rule: d.rule_id.clone().or(d.dry_run_rule_id.clone()), exceeded: None };
        match d.effect {
            Effect::Deny if j.failure.is_none() => j.failure = Some((Reason::DelegationNotAllowed, failed())),
            Effect::DryRunDeny if j.dry_run.is_none() && i != last => j.dry_run = Some(failed()),
            _ => {}
        }
        j.principals.push(PrincipalVerdict { principal: p.clone(), class: d.class.clone(), effect: d.effect, reason: d.reason, rule: d.rule_id.clone() });
    }

    // 7. Within the token.
    if j.failure.is_none() {
        if let Some(what) = exceeded(policy, t, input, caller, &mut j.needs_body) {
            let f = Failed { principal: input.principal.into(), from: None, reason: Reason::DelegationScopeExceeded, rule: None, exceeded: Some(what) };
            j.failure = Some((Reason::DelegationScopeExceeded, f));
        }
    }
    j
}

/// What the operation takes beyond the token, if anything.
fn exceeded(policy: &Policy, t: &TxnToken, input: &PolicyInput<'_>, caller: &PolicyDecision, needs_body: &mut bool) -> Option<&'static str> {
    if !t.ctx.resource_ok(caller.resource.as_deref()) {
        return Some("resource");
    }
    if let Some(call) = input.mcp {
        if call.source == crate::policy::mcp::McpSource::Unknown {
            // The call is not known from the headers: the body is judged against the token.
            if t.ctx.tools.is_some() || !t.ctx.arguments.is_empty() {
                *needs_body = true;
            }
        } else {
            if !t.ctx.tool_ok(call) {
                return Some("tool");
            }
            let ctx = ArgContext { task: input.task, principal: input.principal, intent: input.intent };
            match t.ctx.check_arguments(call, &ctx) {
                ArgOutcome::Pass(_) => {}
                ArgOutcome::NeedBody => *needs_body = true,
                ArgOutcome::Fail(_) => return Some("arguments"),
            }
        }
    }
    if !caller.scopes.iter().all(|s| t.scope.contains(s)) {
        return Some("scope");
    }
    let resource = caller.resource.as_deref().and_then(|name| policy.resources.iter().find(|r| r.name == name));
    if let Some(w) = resource.filter(|r| r.txn_token == TxnTokenMode::Forward).and_then(|r| r.workload.as_deref()) {
        if t.may_act.as_deref() != Some(w) {
            return Some("workload");
        }
    }
    None
}
