//! Semantic checks beyond validity: things that compile but are probably wrong.

use super::{Policy, RuleEffect};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub severity: Severity,
    pub subject: String,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Warning,
}

fn subset<T: PartialEq>(narrow: &[T], wide: &[T]) -> bool {
    // An empty constraint matches everything.
    wide.is_empty() || (!narrow.is_empty() && narrow.iter().all(|x| wide.contains(x)))
}

/// The checks that need no clock (review dates are [`lint_at`]'s).
pub fn lint(p: &Policy) -> Vec<Finding> {
    lint_at(p, None)
}

/// All checks; with `now` (Unix seconds) also reviews past their `review_by` date.
pub fn lint_at(p: &Policy, now: Option<u64>) -> Vec<Finding> {
    let mut out = Vec::new();
    let warn = |subject: String, message: String| Finding { severity: Severity::Warning, subject, message };

    // Ownership (OWASP NHI: unclear ownership of non-human identities). Each principal is
    // answered for by its class's owner or by the owner of every allow rule naming it directly.
    for c in p.classes.iter().filter(|c| c.owner.is_none()) {
        out.push(warn(format!("class `{}`", c.name), "no owner: nobody answers for what its principals are granted (set \"owner\")".into()));
    }
    for r in &p.rules {
        let classes_owned = !r.classes.is_empty() && r.classes.iter().all(|c| p.classes.get(*c).is_some_and(|c| c.owner.is_some()));
        if r.effect == RuleEffect::Allow && r.owner.is_none() && !classes_owned {
            out.push(warn(format!("rule `{}`", r.id), "grants principals no owner answers for (set \"owner\" on the rule or on its classes)".into()));
        }
    }
    if let Some(now) = now {
        let due = |what: String, date: &Option<String>, out: &mut Vec<Finding>| {
            let at = date.as_ref().and_then(|d| super::cases::parse_time(&format!("{d}T00:00:00Z")));
            if let Some(at) = at.filter(|at| *at <= now) {
                out.push(warn(what, format!("review past due ({} days since review_by)", (now - at) / 86_400)));
            }
        };
        for c in &p.classes {
            due(format!("class `{}`", c.name), &c.review_by, &mut out);
        }
        for r in &p.rules {
            due(format!("rule `{}`", r.id), &r.review_by, &mut out);
        }
    }

    // Intents no allow rule can grant.
    for (i, intent) in p.intents.iter().enumerate() {
        let reachable = p.rules.iter().any(|r| r.effect == RuleEffect::Allow && (r.intents.is_empty() || r.intents.contains(&i)));
        if !reachable {
            out.push(warn(format!("intent `{}`", intent.name), "no allow rule grants this intent".into()));
        }
    }
    // Classes never referenced and resources no intent or rule mentions.
    for (i, res) in p.resources.iter().enumerate() {
        let used = p.intents.iter().any(|it| it.operations.iter().any(|(r, _)| *r == i) || it.mcp_ops.iter().any(|(r, _)| *r == i))
            || p.rules.iter().any(|r| r.resources.contains(&i));
        if !used {
            out.push(warn(format!("resource `{}`", res.name), "no intent or rule refers to this resource".into()));
        }
    }

    // MCP: tools the server's sensitivity table lists that no intent can call; rules that
    // target MCP calls on resources that are not MCP servers.
    for (i, res) in p.resources.iter().enumerate() {
        let Some(m) = &res.mcp else { continue };
        for (tool, _) in &m.tools {
            let granted = p.intents.iter().any(|it| {
                it.mcp_ops.iter().any(|(r, op)| *r == i && op.tools.as_ref().is_some_and(|t| super::mcp::any_glob(t, tool)))
            });
            if !granted {
                out.push(warn(format!("resource `{}`", res.name), format!("no intent names tool `{tool}`: every call to it is refused")));
            }
        }
        if m.metadata.is_none() {
            out.push(warn(
                format!("resource `{}`", res.name),
                "MCP resource without `metadata`: clients get no RFC 9728 protected-resource metadata and no resource_metadata in 401s".into(),
            ));
        }
    }
    for rule in &p.rules {
        if (!rule.tools.is_empty() || !rule.mcp_methods.is_empty())
            && !rule.resources.is_empty()
            && rule.resources.iter().all(|r| p.resources.get(*r).is_some_and(|x| x.mcp.is_none()))
        {
            out.push(warn(format!("rule `{}`", rule.id), "names tools or mcp_methods but only resources without `mcp`: it never matches".into()));
        }
    }

    // Delegation.
    for res in p.resources.iter().filter(|r| r.txn_token == super::TxnTokenMode::Forward && r.workload.is_none()) {
        out.push(warn(
            format!("resource `{}`", res.name),
            "forwards the Txn-Token without `workload`: a token meant for another delegate (may_act) is forwarded too".into(),
        ));
    }
    for dr in &p.delegation_rules {
        for &i in &dr.intents {
            for &c in &dr.to {
                let granted = p.rules.iter().any(|r| {
                    r.effect == RuleEffect::Allow && (r.intents.is_empty() || r.intents.contains(&i)) && (r.classes.is_empty() || r.classes.contains(&c))
                });
                if !granted {
                    let (intent, class) = (p.intents.get(i).map_or("?", |x| x.name.as_str()), p.classes.get(c).map_or("?", |x| x.name.as_str()));
                    out.push(warn(
                        format!("delegation rule `{}`", dr.id),
                        format!("no allow rule grants intent `{intent}` to class `{class}`: the intersection refuses every chain through this edge"),
                    ));
                }
            }
        }
    }
    if p.max_delegations == Some(0) && !p.delegation_rules.is_empty() {
        out.push(warn("policy".into(), "max_delegations is 0: only root Txn-Tokens are accepted and no delegation rule ever applies".into()));
    }

    if p.tasks == super::TaskMode::Declared {
        out.push(warn(
            "policy".into(),
            "tasks: declared takes any x-agent-task the caller sends, so an agent can name a fresh task after its task ended; set \"tasks\": \"registered\"".into(),
        ));
    }
    if p.unclassified == super::Unclassified::Allow && !p.classes.is_empty() {
        out.push(warn("policy".into(), "callers matching no class skip every class limit (unclassified: allow)".into()));
    }
    for (i, rule) in p.rules.iter().enumerate() {
        // A rule shadowed by an earlier deny that covers everything it covers never decides.
        for earlier in p.rules.iter().take(i) {
            let covers = earlier.effect == RuleEffect::Deny
                && !earlier.dry_run
                && earlier.principals.is_empty()
                && earlier.window.is_none()
                && earlier.environments.is_empty()
                && earlier.max_sensitivity.is_none()
                && earlier.min_sensitivity.is_none()
                && earlier.tools.is_empty()
                && earlier.mcp_methods.is_empty()
                && subset(&rule.classes, &earlier.classes)
                && subset(&rule.intents, &earlier.intents)
                && subset(&rule.resources, &earlier.resources)
                && subset(&rule.methods, &earlier.methods);
            if covers && rule.effect == RuleEffect::Allow {
                out.push(warn(
                    format!("rule `{}`", rule.id),
                    format!("unreachable: deny rule `{}` matches every request it matches", earlier.id),
                ));
                break;
            }
        }
        // Allow and deny rules that overlap deserve a second look (deny wins).
        if rule.effect == RuleEffect::Allow {
            for other in p.rules.iter().filter(|o| o.effect == RuleEffect::Deny) {
                let overlap = |a: &[usize], b: &[usize]| a.is_empty() || b.is_empty() || a.iter().any(|x| b.contains(x));
                let methods_overlap = rule.methods.is_empty() || other.methods.is_empty() || rule.methods.iter().any(|m| other.methods.contains(m));
                if overlap(&rule.intents, &other.intents)
                    && overlap(&rule.resources, &other.resources)
                    && overlap(&rule.classes, &other.classes)
                    && methods_overlap
                    && !(rule.principals.is_empty() && other.principals.is_empty() && other.intents.is_empty() && other.resources.is_empty() && other.classes.is_empty())
                {
                    out.push(warn(
                        format!("rule `{}`", rule.id),
                        format!("overlaps deny rule `{}`; where both match, the deny wins", other.id),
                    ));
                }
            }
        }
    }
    out
}
