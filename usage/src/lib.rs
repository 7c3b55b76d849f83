//! Least privilege from evidence (issue 18): what a policy grants against what the decision
//! log shows was used (`mandate policy usage`), and a tighter policy that still allows exactly
//! what was allowed and used (`mandate policy suggest`, checked by replaying the log).
//!
//! Native only: this is host-side analysis and never lands in the filter's wasm. The policy
//! engine it replays with is the filter's own (`mandate_core::policy`).

pub mod html;
pub mod log;
pub mod suggest;
pub mod synth;

use anyhow::{Context as _, Result};
use log::{Line, LogReader, Next, Record, Skip};
use mandate_core::policy::mcp::Glob;
use mandate_core::policy::{Policy, PolicyConfig, RuleEffect};
use serde::Serialize;
use hashbrown::{HashMap, HashSet};
use std::collections::BTreeMap;
use std::path::Path;

/// Distinct keys kept per map (intents claimed, reasons, classes ...): a log full of made-up
/// names cannot grow memory; the rest is counted under `(other)`.
pub const KEY_CAP: usize = 4096;
/// Distinct principals remembered per rule and class (for narrowing wildcards).
pub const PRINCIPAL_CAP: usize = 64;
/// Credential ids tracked at once (for the lifetimes credentials were used over).
const JTI_CAP: usize = 100_000;
pub const NO_OWNER: &str = "(no owner)";
const NONE: &str = "(none)";
const OTHER: &str = "(other)";

/// The policy under study: its configuration (as written), the compiled engine, its grants.
pub struct Model {
    /// The policy object as written (suggestions edit a copy).
    pub raw: serde_json::Value,
    /// Whether `raw` sat under `policy` in a whole plugin configuration.
    pub wrapped: Option<serde_json::Value>,
    pub cfg: PolicyConfig,
    pub policy: Policy,
    pub grants: Vec<Grant>,
    /// rule index → intent → resource → grants.
    index: Vec<HashMap<String, HashMap<String, Vec<usize>>>>,
    rule_idx: HashMap<String, usize>,
    class_owner: HashMap<String, String>,
}

/// One thing the policy grants: an allow rule × an intent × a resource (× an MCP tool glob).
#[derive(Debug, Clone, Serialize)]
pub struct Grant {
    pub rule: String,
    #[serde(skip)]
    pub rule_index: usize,
    pub intent: Option<String>,
    pub resource: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool: Option<String>,
    #[serde(skip)]
    tool_glob: Option<Glob>,
    pub owners: Vec<String>,
    /// Whom it grants to: `class NAME (patterns)` or principal patterns; `anyone` for none.
    pub principals: Vec<String>,
    pub sensitivity: String,
}

impl Model {
    pub fn load(path: &Path) -> Result<Model> {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        Model::from_slice(&bytes).with_context(|| format!("policy {}", path.display()))
    }

    pub fn from_slice(bytes: &[u8]) -> Result<Model> {
        let policy = mandate_core::policy::cases::parse_policy(bytes).map_err(|e| anyhow::anyhow!("{e}"))?;
        let v: serde_json::Value = serde_json::from_slice(bytes)?;
        // The same rule as `parse_policy`: a plugin configuration holds the policy under `policy`.
        let (raw, wrapped) = match v.get("policy") {
            Some(p) if v.get("identity").is_some() || v.as_object().is_some_and(|o| o.len() <= 3) => (p.clone(), Some(v.clone())),
            _ => (v, None),
        };
        let cfg: PolicyConfig = serde_json::from_value(raw.clone())?;
        Ok(Model::build(raw, wrapped, cfg, policy))
    }

    fn build(raw: serde_json::Value, wrapped: Option<serde_json::Value>, cfg: PolicyConfig, policy: Policy) -> Model {
        let class_owner: HashMap<String, String> = cfg.classes.iter().filter_map(|c| c.owner.clone().map(|o| (c.name.clone(), o))).collect();
        let mut grants = Vec::new();
        let mut index = vec![HashMap::<String, HashMap<String, Vec<usize>>>::new(); cfg.rules.len()];
        let sens = |res: Option<&str>| -> String {
            let lvl = res.and_then(|n| cfg.resources.iter().find(|r| r.name == n)).and_then(|r| r.sensitivity.clone());
            lvl.unwrap_or_else(|| if res.is_some() { policy.levels.first().cloned().unwrap_or_default() } else { policy.levels.last().cloned().unwrap_or_default() })
        };
        for (ri, rule) in cfg.rules.iter().enumerate() {
            if rule.effect != RuleEffect::Allow {
                continue;
            }
            let mut owners: Vec<String> = Vec::new();
            if let Some(o) = &rule.owner {
                owners.push(o.clone());
            } else {
                for c in &rule.classes {
                    let o = class_owner.get(c).cloned().unwrap_or_else(|| NO_OWNER.to_string());
                    if !owners.contains(&o) {
                        owners.push(o);
                    }
                }
                if owners.is_empty() {
                    owners.push(NO_OWNER.to_string());
                }
            }
            let mut principals: Vec<String> = rule
                .classes
                .iter()
                .map(|c| {
                    let pats = cfg.classes.iter().find(|x| &x.name == c).map(|x| x.principals.join(" ")).unwrap_or_default();
                    format!("class {c} ({pats})")
                })
                .collect();
            principals.extend(rule.principals.iter().cloned());
            if principals.is_empty() {
                principals.push("anyone".into());
            }
            let mut push = |intent: Option<&str>, resource: Option<&str>, tool: Option<&str>| {
                let g = Grant {
                    rule: rule.id.clone(),
                    rule_index: ri,
                    intent: intent.map(str::to_string),
                    resource: resource.map(str::to_string),
                    tool: tool.map(str::to_string),
                    tool_glob: tool.and_then(|t| Glob::compile(t, false).ok()),
                    owners: owners.clone(),
                    principals: principals.clone(),
                    sensitivity: sens(resource),
                };
                if let Some(slot) = index.get_mut(ri) {
                    slot.entry(intent.unwrap_or(NONE).to_string()).or_default().entry(resource.unwrap_or(NONE).to_string()).or_default().push(grants.len());
                }
                grants.push(g);
            };
            let intents: Vec<&mandate_core::policy::IntentConfig> =
                if rule.intents.is_empty() { cfg.intents.iter().collect() } else { cfg.intents.iter().filter(|i| rule.intents.contains(&i.name)).collect() };
            if rule.intents.is_empty() {
                // Requests without an intent (identity-only rules): the resources the rule names, or any.
                if rule.resources.is_empty() {
                    push(None, None, None);
                } else {
                    for r in &rule.resources {
                        push(None, Some(r), None);
                    }
                }
            }
            for it in intents {
                let mut seen_res: Vec<(&str, Option<String>)> = Vec::new();
                for op in &it.operations {
                    if !rule.resources.is_empty() && !rule.resources.contains(&op.resource) {
                        continue;
                    }
                    let tools: Vec<String> = op.tools.as_ref().and_then(|t| serde_json::from_value::<Vec<String>>(t.clone()).ok()).unwrap_or_default();
                    if tools.is_empty() {
                        if !seen_res.iter().any(|(r, t)| *r == op.resource && t.is_none()) {
                            seen_res.push((&op.resource, None));
                            push(Some(&it.name), Some(&op.resource), None);
                        }
                    } else {
                        for t in tools {
                            if !seen_res.iter().any(|(r, x)| *r == op.resource && x.as_deref() == Some(t.as_str())) {
                                push(Some(&it.name), Some(&op.resource), Some(&t));
                                seen_res.push((&op.resource, Some(t)));
                            }
                        }
                    }
                }
            }
        }
        let rule_idx = cfg.rules.iter().enumerate().map(|(i, r)| (r.id.clone(), i)).collect();
        Model { raw, wrapped, cfg, policy, grants, index, rule_idx, class_owner }
    }

    /// The grant an allowed record used, if its rule is an allow rule of this policy.
    fn grant_of(&self, rule: &str, intent: Option<&str>, resource: Option<&str>, tool: Option<&str>) -> Option<usize> {
        let ri = *self.rule_idx.get(rule)?;
        let by_res = self.index.get(ri)?.get(intent.unwrap_or(NONE))?;
        let cands = by_res.get(resource.unwrap_or(NONE)).or_else(|| by_res.get(NONE))?;
        let pick = match tool {
            Some(t) => cands.iter().find(|g| self.grants.get(**g).and_then(|g| g.tool_glob.as_ref()).is_some_and(|gl| gl.matches(t))),
            None => None,
        };
        pick.or_else(|| cands.iter().find(|g| self.grants.get(**g).is_some_and(|g| g.tool.is_none()))).or(cands.first()).copied()
    }

    /// Who answers for a record: the owner it names, else its class's owner.
    fn owner_of<'a>(&'a self, rec: &'a Record<'_>) -> &'a str {
        if let Some(o) = rec.owner.as_deref() {
            return o;
        }
        rec.class.as_deref().and_then(|c| self.class_owner.get(c)).map_or(NO_OWNER, String::as_str)
    }
}

/// A bounded set of names: stops growing at its cap and says so.
#[derive(Debug, Clone, Default)]
pub struct Seen {
    pub names: HashSet<String>,
    pub overflow: bool,
}

impl Seen {
    fn add(&mut self, v: &str, cap: usize) {
        if self.names.contains(v) {
            return;
        }
        if self.names.len() >= cap {
            self.overflow = true;
        } else {
            self.names.insert(v.to_string());
        }
    }
    pub fn sorted(&self) -> Vec<String> {
        let mut v: Vec<String> = self.names.iter().cloned().collect();
        v.sort();
        v
    }
}

fn slot<'m, V: Default>(m: &'m mut HashMap<String, V>, k: &str) -> &'m mut V {
    let k = if m.len() < KEY_CAP || m.contains_key(k) { k } else { OTHER };
    m.entry_ref(k).or_default()
}

#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct ClassCounts {
    pub allowed: u64,
    pub denied: u64,
    pub dry_run_denied: u64,
}

/// Everything counted from a log, in memory bounded by the policy's size and the caps above.
#[derive(Default)]
pub struct Usage {
    pub lines: u64,
    pub records: u64,
    pub other_lines: u64,
    pub skipped: BTreeMap<&'static str, u64>,
    /// The first few skipped lines: (line number, reason). Never their content.
    pub first_skips: Vec<(u64, Skip)>,
    pub from_ms: Option<u64>,
    pub to_ms: Option<u64>,
    pub allowed: u64,
    pub denied: u64,
    pub dry_run_denied: u64,
    pub grant_uses: Vec<u64>,
    /// Principals seen using each rule (by rule index).
    pub rule_principals: Vec<Seen>,
    /// owner → class → reason → count (enforced denials).
    pub denials: HashMap<String, HashMap<String, HashMap<String, u64>>>,
    /// owner → reason → dry-run rule → count.
    pub dry_run: HashMap<String, HashMap<String, HashMap<String, u64>>>,
    /// intent claimed → (requests, allowed).
    pub intents: HashMap<String, (u64, u64)>,
    /// intent → from class → to class → uses (allowed delegated requests).
    pub edges: HashMap<String, HashMap<String, HashMap<String, u64>>>,
    /// (class, intent) of principals earlier in an allowed chain than the caller.
    pub chain_uses: HashMap<String, HashSet<String>>,
    /// class → counts and principals seen.
    pub classes: HashMap<String, (ClassCounts, Seen)>,
    /// intent → resource → tools called (allowed).
    pub tools: HashMap<String, HashMap<String, Seen>>,
    /// credential id → (first use s, last use s).
    jtis: HashMap<String, (u64, u64)>,
    jti_pruned_s: u64,
    /// intent → longest a credential was used for, seconds (`None`: no credential seen).
    pub cred_span: HashMap<String, u64>,
    /// Some credential spans were lost to the tracking cap (TTL suggestions are then withheld).
    pub cred_overflow: bool,
}

impl Usage {
    pub fn new(m: &Model) -> Usage {
        Usage { grant_uses: vec![0; m.grants.len()], rule_principals: vec![Seen::default(); m.cfg.rules.len()], ..Usage::default() }
    }

    pub fn skip(&mut self, line: u64, s: Skip) {
        *self.skipped.entry(s.code()).or_default() += 1;
        if self.first_skips.len() < 20 {
            self.first_skips.push((line, s));
        }
    }

    pub fn skipped_total(&self) -> u64 {
        self.skipped.values().sum()
    }

    /// Reads a whole log.
    pub fn read(m: &Model, path: &Path) -> Result<Usage> {
        let mut u = Usage::new(m);
        let mut r = LogReader::open(path).with_context(|| format!("opening {}", path.display()))?;
        u.read_from(m, &mut r).with_context(|| format!("reading {}", path.display()))?;
        Ok(u)
    }

    pub fn read_from(&mut self, m: &Model, r: &mut LogReader) -> std::io::Result<()> {
        loop {
            let n = r.line_no + 1;
            match r.next_line()? {
                Next::End => break,
                Next::TooLong => {
                    self.lines += 1;
                    self.skip(n, Skip::LineTooLong);
                }
                Next::Line(l) => {
                    self.lines += 1;
                    match log::parse_line(l) {
                        Line::Record(rec) => self.add(m, &rec),
                        Line::Nested(s) => match log::parse_record(s.as_bytes()) {
                            Line::Record(rec) => self.add(m, &rec),
                            Line::Skipped(k) => self.skip(n, k),
                            _ => self.other_lines += 1,
                        },
                        Line::Other => self.other_lines += 1,
                        Line::Skipped(k) => self.skip(n, k),
                    }
                }
            }
        }
        Ok(())
    }

    /// Counts one record.
    pub fn add(&mut self, m: &Model, rec: &Record<'_>) {
        self.records += 1;
        self.from_ms = Some(self.from_ms.map_or(rec.ts_ms, |f| f.min(rec.ts_ms)));
        self.to_ms = Some(self.to_ms.map_or(rec.ts_ms, |t| t.max(rec.ts_ms)));
        let owner = m.owner_of(rec);
        let class = rec.class.as_deref().unwrap_or(NONE);
        let through = match rec.effect.as_ref() {
            "allow" => {
                self.allowed += 1;
                true
            }
            "dry_run_deny" => {
                self.dry_run_denied += 1;
                let reasons = slot(slot(&mut self.dry_run, owner), &rec.reason);
                *slot(reasons, rec.dry_run_rule_id.as_deref().unwrap_or(NONE)) += 1;
                true
            }
            _ => {
                self.denied += 1;
                *slot(slot(slot(&mut self.denials, owner), class), &rec.reason) += 1;
                false
            }
        };
        let cc = slot(&mut self.classes, class);
        match rec.effect.as_ref() {
            "allow" => cc.0.allowed += 1,
            "dry_run_deny" => cc.0.dry_run_denied += 1,
            _ => cc.0.denied += 1,
        }
        if let Some(p) = rec.identity.as_deref() {
            cc.1.add(p, PRINCIPAL_CAP);
        }
        if let Some(i) = rec.intent.as_deref() {
            let e = slot(&mut self.intents, i);
            e.0 += 1;
            if through {
                e.1 += 1;
            }
        }
        if !through {
            return;
        }
        let tool = rec.mcp.as_ref().and_then(|c| c.tool.as_deref());
        if let Some(rule) = rec.rule_id.as_deref() {
            if let Some(g) = m.grant_of(rule, rec.intent.as_deref(), rec.resource.as_deref(), tool) {
                if let Some(n) = self.grant_uses.get_mut(g) {
                    *n += 1;
                }
                let ri = m.grants.get(g).map_or(usize::MAX, |g| g.rule_index);
                if let (Some(s), Some(p)) = (self.rule_principals.get_mut(ri), rec.identity.as_deref()) {
                    s.add(p, PRINCIPAL_CAP);
                }
            }
        }
        if let (Some(i), Some(r), Some(t)) = (rec.intent.as_deref(), rec.resource.as_deref(), tool) {
            if rec.mcp.as_ref().and_then(|c| c.method.as_deref()) == Some("tools/call") {
                slot(slot(&mut self.tools, i), r).add(t, 256);
            }
        }
        if let Some(d) = &rec.delegation {
            let intent = rec.intent.as_deref().unwrap_or(NONE);
            for w in d.chain.windows(2) {
                if let [a, b] = w {
                    let (fa, fb) = (a.class.as_deref().unwrap_or(NONE), b.class.as_deref().unwrap_or(NONE));
                    *slot(slot(slot(&mut self.edges, intent), fa), fb) += 1;
                }
            }
            for c in d.chain.iter().rev().skip(1) {
                let intents = slot(&mut self.chain_uses, c.class.as_deref().unwrap_or(NONE));
                if intents.len() < KEY_CAP {
                    intents.get_or_insert_with(intent, str::to_string);
                }
            }
        }
        if let (Some(jti), Some(intent)) = (rec.credential.as_ref().and_then(|c| c.jti.as_deref()), rec.intent.as_deref()) {
            let now = rec.ts_ms / 1000;
            if let Some(e) = self.jtis.get_mut(jti) {
                e.0 = e.0.min(now);
                e.1 = e.1.max(now);
                let span = e.1 - e.0;
                let s = slot(&mut self.cred_span, intent);
                *s = (*s).max(span);
            } else {
                if self.jtis.len() >= JTI_CAP && now >= self.jti_pruned_s + 60 {
                    // Credentials live at most an hour: forget those first used over an hour
                    // ago (at most once a minute of log time, so a full map costs no rescans).
                    self.jti_pruned_s = now;
                    self.jtis.retain(|_, e| e.0 + 3600 >= now);
                }
                if self.jtis.len() >= JTI_CAP {
                    self.cred_overflow = true;
                } else {
                    self.jtis.insert(jti.to_string(), (now, now));
                    slot(&mut self.cred_span, intent);
                }
            }
        }
    }

    /// Renders the report.
    pub fn report(&self, m: &Model) -> Report {
        report(self, m)
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct GrantUse {
    #[serde(flatten)]
    pub grant: Grant,
    pub uses: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct OwnerReport {
    pub owner: String,
    pub granted: usize,
    pub used: usize,
    pub grants_used: Vec<GrantUse>,
    pub grants_unused: Vec<Grant>,
    pub denials: BTreeMap<String, u64>,
    pub dry_run_would_deny: Vec<DryRun>,
}

#[derive(Debug, Clone, Serialize)]
pub struct DryRun {
    pub reason: String,
    pub rule: String,
    pub count: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ClassReport {
    pub class: String,
    pub owner: String,
    pub patterns: Vec<String>,
    #[serde(flatten)]
    pub counts: ClassCounts,
    pub principals_seen: usize,
    pub denials: BTreeMap<String, u64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct IntentNeverAllowed {
    pub intent: String,
    pub claimed: u64,
    pub defined: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct BroadGrant {
    #[serde(flatten)]
    pub grant: Grant,
    pub why: String,
    pub uses: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct EdgeUse {
    pub intent: String,
    pub from: String,
    pub to: String,
    pub rule: Option<String>,
    pub uses: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct LogSummary {
    pub lines: u64,
    pub records: u64,
    pub other_lines: u64,
    pub skipped: BTreeMap<&'static str, u64>,
    pub from_ms: Option<u64>,
    pub to_ms: Option<u64>,
    pub allowed: u64,
    pub denied: u64,
    pub dry_run_denied: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub log: LogSummary,
    pub owners: Vec<OwnerReport>,
    pub principals: Vec<ClassReport>,
    pub intents_never_allowed: Vec<IntentNeverAllowed>,
    pub broadest_grants: Vec<BroadGrant>,
    pub delegation_edges: Vec<EdgeUse>,
    pub delegation_rules_unused: Vec<String>,
}

fn sorted_counts(m: Option<&HashMap<String, u64>>) -> BTreeMap<String, u64> {
    m.map(|m| m.iter().map(|(k, v)| (k.clone(), *v)).collect()).unwrap_or_default()
}

fn report(u: &Usage, m: &Model) -> Report {
    let mut owners: BTreeMap<String, OwnerReport> = BTreeMap::new();
    let blank = |o: &str| OwnerReport {
        owner: o.to_string(),
        granted: 0,
        used: 0,
        grants_used: Vec::new(),
        grants_unused: Vec::new(),
        denials: BTreeMap::new(),
        dry_run_would_deny: Vec::new(),
    };
    for c in &m.cfg.classes {
        let o = c.owner.clone().unwrap_or_else(|| NO_OWNER.to_string());
        owners.entry(o.clone()).or_insert_with(|| blank(&o));
    }
    for (gi, g) in m.grants.iter().enumerate() {
        let uses = u.grant_uses.get(gi).copied().unwrap_or(0);
        for o in &g.owners {
            let r = owners.entry(o.clone()).or_insert_with(|| blank(o));
            r.granted += 1;
            if uses > 0 {
                r.used += 1;
                r.grants_used.push(GrantUse { grant: g.clone(), uses });
            } else {
                r.grants_unused.push(g.clone());
            }
        }
    }
    for (o, by_class) in &u.denials {
        let r = owners.entry(o.clone()).or_insert_with(|| blank(o));
        for reasons in by_class.values() {
            for (reason, n) in reasons {
                *r.denials.entry(reason.clone()).or_default() += n;
            }
        }
    }
    for (o, by_reason) in &u.dry_run {
        let r = owners.entry(o.clone()).or_insert_with(|| blank(o));
        for (reason, rules) in by_reason {
            for (rule, n) in rules {
                r.dry_run_would_deny.push(DryRun { reason: reason.clone(), rule: rule.clone(), count: *n });
            }
        }
        r.dry_run_would_deny.sort_by(|a, b| b.count.cmp(&a.count).then(a.reason.cmp(&b.reason)));
    }

    let mut principals: Vec<ClassReport> = m
        .cfg
        .classes
        .iter()
        .map(|c| {
            let (counts, seen) = u.classes.get(&c.name).cloned().unwrap_or_default();
            let mut denials = BTreeMap::new();
            for by_class in u.denials.values() {
                for (k, v) in sorted_counts(by_class.get(&c.name)) {
                    *denials.entry(k).or_default() += v;
                }
            }
            ClassReport {
                class: c.name.clone(),
                owner: c.owner.clone().unwrap_or_else(|| NO_OWNER.into()),
                patterns: c.principals.clone(),
                counts,
                principals_seen: seen.names.len(),
                denials,
            }
        })
        .collect();
    // Callers in no class of the policy (unclassified, or a class since removed).
    for (name, (counts, seen)) in &u.classes {
        if !m.cfg.classes.iter().any(|c| &c.name == name) {
            let mut denials = BTreeMap::new();
            for by_class in u.denials.values() {
                for (k, v) in sorted_counts(by_class.get(name)) {
                    *denials.entry(k).or_default() += v;
                }
            }
            principals.push(ClassReport { class: name.clone(), owner: NO_OWNER.into(), patterns: Vec::new(), counts: *counts, principals_seen: seen.names.len(), denials });
        }
    }

    let mut never: Vec<IntentNeverAllowed> = u
        .intents
        .iter()
        .filter(|(_, (_, allowed))| *allowed == 0)
        .map(|(i, (claimed, _))| IntentNeverAllowed { intent: i.clone(), claimed: *claimed, defined: m.cfg.intents.iter().any(|x| &x.name == i) })
        .collect();
    never.sort_by(|a, b| b.claimed.cmp(&a.claimed).then(a.intent.cmp(&b.intent)));

    // Broadest grants: who may (anyone, a `**` pattern, a wildcard class) times how sensitive.
    let levels = &m.policy.levels;
    let mut broad: Vec<(usize, BroadGrant)> = Vec::new();
    for (gi, g) in m.grants.iter().enumerate() {
        let Some(rule) = m.cfg.rules.get(g.rule_index) else { continue };
        let level = levels.iter().position(|l| *l == g.sensitivity).unwrap_or(0);
        let mut why = Vec::new();
        let mut score = 0usize;
        if rule.classes.is_empty() && rule.principals.is_empty() {
            why.push("any principal".to_string());
            score += 4;
        } else if rule.principals.iter().any(|p| p.ends_with("/**")) {
            why.push("a `**` principal pattern".to_string());
            score += 3;
        } else if rule.principals.iter().any(|p| p.contains('*')) || !rule.classes.is_empty() {
            why.push("wildcard principals".to_string());
            score += 1;
        }
        if g.intent.is_none() {
            why.push("no intent needed".into());
            score += 2;
        }
        if g.resource.is_none() {
            why.push("any destination".into());
            score += 2;
        }
        if g.tool.as_deref().is_some_and(|t| t.contains('*')) {
            why.push(format!("tool glob `{}`", g.tool.as_deref().unwrap_or_default()));
            score += 1;
        }
        if level + 2 >= levels.len() {
            why.push(format!("{} resource", g.sensitivity));
        }
        let total = score * (level + 1);
        if score > 0 {
            broad.push((total, BroadGrant { grant: g.clone(), why: why.join(", "), uses: u.grant_uses.get(gi).copied().unwrap_or(0) }));
        }
    }
    broad.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.grant.rule.cmp(&b.1.grant.rule)));
    let broadest_grants: Vec<BroadGrant> = broad.into_iter().take(10).map(|(_, b)| b).collect();

    let mut edges = Vec::new();
    let mut used_rules = HashSet::new();
    for (intent, froms) in &u.edges {
        for (from, tos) in froms {
            for (to, n) in tos {
                let rule = m
                    .cfg
                    .delegation_rules
                    .iter()
                    .find(|r| r.intents.contains(intent) && r.from.contains(from) && r.to.contains(to))
                    .map(|r| r.id.clone());
                if let Some(r) = &rule {
                    used_rules.insert(r.clone());
                }
                edges.push(EdgeUse { intent: intent.clone(), from: from.clone(), to: to.clone(), rule, uses: *n });
            }
        }
    }
    edges.sort_by(|a, b| b.uses.cmp(&a.uses).then(a.intent.cmp(&b.intent)).then(a.from.cmp(&b.from)).then(a.to.cmp(&b.to)));
    let delegation_rules_unused = m.cfg.delegation_rules.iter().filter(|r| !used_rules.contains(&r.id)).map(|r| r.id.clone()).collect();

    Report {
        log: LogSummary {
            lines: u.lines,
            records: u.records,
            other_lines: u.other_lines,
            skipped: u.skipped.clone(),
            from_ms: u.from_ms,
            to_ms: u.to_ms,
            allowed: u.allowed,
            denied: u.denied,
            dry_run_denied: u.dry_run_denied,
        },
        owners: owners.into_values().collect(),
        principals,
        intents_never_allowed: never,
        broadest_grants,
        delegation_edges: edges,
        delegation_rules_unused,
    }
}

fn grant_label(g: &Grant) -> String {
    let mut s = format!("{} × {} × {}", g.rule, g.intent.as_deref().unwrap_or("(no intent)"), g.resource.as_deref().unwrap_or("(any)"));
    if let Some(t) = &g.tool {
        s.push_str(&format!(" tool {t}"));
    }
    s
}

impl Report {
    /// The report for people: a table per section.
    pub fn to_text(&self) -> String {
        use std::fmt::Write as _;
        let mut o = String::new();
        let l = &self.log;
        let _ = writeln!(o, "decision log: {} lines, {} records ({} allowed, {} denied, {} dry-run would-deny), {} other lines, {} skipped",
            l.lines, l.records, l.allowed, l.denied, l.dry_run_denied, l.other_lines, l.skipped.values().sum::<u64>());
        for (k, v) in &l.skipped {
            let _ = writeln!(o, "  skipped {k}: {v}");
        }
        let _ = writeln!(o, "\ngrants used against granted, per owner:");
        let _ = writeln!(o, "  {:<28} {:>8} {:>6} {:>7}", "OWNER", "GRANTED", "USED", "UNUSED");
        for r in &self.owners {
            let _ = writeln!(o, "  {:<28} {:>8} {:>6} {:>7}", r.owner, r.granted, r.used, r.granted - r.used);
        }
        for r in &self.owners {
            let _ = writeln!(o, "\nowner {}:", r.owner);
            for g in &r.grants_used {
                let _ = writeln!(o, "  used    {:>8}  {}", g.uses, grant_label(&g.grant));
            }
            for g in &r.grants_unused {
                let _ = writeln!(o, "  UNUSED  {:>8}  {}", 0, grant_label(g));
            }
            for (reason, n) in &r.denials {
                let _ = writeln!(o, "  denied  {n:>8}  {reason}");
            }
            for d in &r.dry_run_would_deny {
                let _ = writeln!(o, "  dry-run {:>8}  would deny: {} (rule {})", d.count, d.reason, d.rule);
            }
        }
        let _ = writeln!(o, "\nper principal pattern (class):");
        let _ = writeln!(o, "  {:<24} {:<22} {:>8} {:>8} {:>8} {:>6}  PATTERNS", "CLASS", "OWNER", "ALLOWED", "DENIED", "DRY-RUN", "SEEN");
        for c in &self.principals {
            let _ = writeln!(o, "  {:<24} {:<22} {:>8} {:>8} {:>8} {:>6}  {}", c.class, c.owner, c.counts.allowed, c.counts.denied, c.counts.dry_run_denied, c.principals_seen, c.patterns.join(" "));
        }
        if !self.intents_never_allowed.is_empty() {
            let _ = writeln!(o, "\nintents claimed but never allowed:");
            for i in &self.intents_never_allowed {
                let _ = writeln!(o, "  {:>8}  {}{}", i.claimed, i.intent, if i.defined { "" } else { " (not in the policy)" });
            }
        }
        if !self.broadest_grants.is_empty() {
            let _ = writeln!(o, "\nbroadest grants:");
            for b in &self.broadest_grants {
                let _ = writeln!(o, "  {}: {} (used {}x)", grant_label(&b.grant), b.why, b.uses);
            }
        }
        if !self.delegation_edges.is_empty() || !self.delegation_rules_unused.is_empty() {
            let _ = writeln!(o, "\ndelegation edges used:");
            for e in &self.delegation_edges {
                let _ = writeln!(o, "  {:>8}  {} -> {} for {} ({})", e.uses, e.from, e.to, e.intent, e.rule.as_deref().map_or("no delegation rule".to_string(), |r| format!("rule {r}")));
            }
            for r in &self.delegation_rules_unused {
                let _ = writeln!(o, "  UNUSED    delegation rule {r}");
            }
        }
        // Names come from the log: no control character (a terminal escape) reaches the screen.
        o.chars().map(|c| if c.is_control() && c != '\n' { '?' } else { c }).collect()
    }

    /// Every unused grant, as `rule × intent × resource [tool]` labels (deduplicated).
    pub fn unused_labels(&self) -> Vec<String> {
        let mut v: Vec<String> = self.owners.iter().flat_map(|o| o.grants_unused.iter().map(grant_label)).collect();
        v.sort();
        v.dedup();
        v
    }
}
