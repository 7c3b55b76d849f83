//! `mandate policy lint|test|explain`: the policy engine's command-line face.
//! Same engine code as the filter (`mandate_core::policy`).

use anyhow::{bail, Context as _, Result};
use mandate_core::policy::cases::{self, CaseRequest};
use mandate_core::policy::lint;
use mandate_usage::{self as usage_mod, Model, Usage};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// Which build of the decision core answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Engine {
    Native,
    Component,
}

#[derive(clap::Subcommand)]
pub enum PolicyCommand {
    /// Check a policy (a `policy` object or a full plugin configuration): schema, references,
    /// unreachable rules, intents no rule grants, allow/deny overlaps. Exit 1 on error.
    Lint {
        file: PathBuf,
        /// Treat warnings as errors.
        #[arg(long)]
        deny_warnings: bool,
        /// The date reviews are due against (`YYYY-MM-DD`; default today, UTC).
        #[arg(long)]
        now: Option<String>,
    },
    /// Run policy case files (`*.cases.json`; directories are searched). Prints `N passed, N failed`.
    Test {
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// `native` (this binary's engine) or `component` (the WebAssembly component on wasmtime).
        #[arg(long, value_enum, default_value_t = Engine::Native)]
        engine: Engine,
        /// The component (default: target/wasm32-wasip2/component/mandate_component.wasm).
        #[arg(long)]
        component: Option<PathBuf>,
    },
    /// Show how a policy judges one request: the decision, then each rule and why it matched or not.
    Explain {
        #[arg(long)]
        policy: PathBuf,
        /// A request as in case files: principal, intent, task, signed_intent, method, authority,
        /// path, time, environment, standing_secret, token_lifetime_s, minter, mcp, delegation.
        #[arg(long)]
        request: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// What the policy grants against what the decision log shows was used, per owner and per
    /// principal pattern: grants used and unused, denials by reason, dry-run would-denials,
    /// intents claimed but never allowed, the broadest grants, delegation edges used.
    Usage {
        #[arg(long)]
        policy: PathBuf,
        /// Decision records: `mandate.decision` log lines (Envoy's log or bare JSON lines) or
        /// an Envoy JSON access log carrying `mandate_decision`; plain or gzip.
        #[arg(long)]
        log: PathBuf,
        /// Print JSON instead of text.
        #[arg(long, conflicts_with = "html")]
        json: bool,
        /// Write a self-contained HTML report (with a chart) to this file.
        #[arg(long)]
        html: Option<PathBuf>,
    },
    /// A tightened policy from the decision log (unused grants removed, wildcard principals
    /// narrowed to those seen, MCP tools to those called, credential TTLs to what was used),
    /// replayed against the same log: written only if it judges every reproduced record as
    /// the log did. Prints the changes and a diff. Exit 1 if the replay fails.
    Suggest {
        #[arg(long)]
        policy: PathBuf,
        #[arg(long)]
        log: PathBuf,
        /// Where to write the suggested policy (default: POLICY with `.suggested.json`).
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

pub fn run(cmd: &PolicyCommand) -> Result<ExitCode> {
    match cmd {
        PolicyCommand::Lint {
            file,
            deny_warnings,
            now,
        } => lint_file(file, *deny_warnings, now.as_deref()),
        PolicyCommand::Usage {
            policy,
            log,
            json,
            html,
        } => usage(policy, log, *json, html.as_deref()),
        PolicyCommand::Suggest { policy, log, out } => suggest(policy, log, out.as_deref()),
        PolicyCommand::Test { paths, engine, component } => test(paths, *engine, component.as_deref()),
        PolicyCommand::Explain {
            policy,
            request,
            json,
        } => explain(policy, request, *json),
    }
}

fn lint_file(file: &Path, deny_warnings: bool, now: Option<&str>) -> Result<ExitCode> {
    let now = match now {
        Some(d) => cases::parse_time(&format!("{d}T00:00:00Z"))
            .with_context(|| format!("--now `{d}` is not a date YYYY-MM-DD"))?,
        None => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    };
    let raw = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    let policy = match cases::parse_policy(&raw) {
        Ok(p) => p,
        Err(e) => {
            println!("error: {}: {e}", file.display());
            return Ok(ExitCode::from(1));
        }
    };
    let findings = lint::lint_at(&policy, Some(now));
    for f in &findings {
        println!("warning: {}: {}: {}", file.display(), f.subject, f.message);
    }
    println!(
        "{}: {} classes, {} resources, {} intents, {} rules; {} warning(s)",
        file.display(),
        policy.classes.len(),
        policy.resources.len(),
        policy.intents.len(),
        policy.rules.len(),
        findings.len()
    );
    Ok(if deny_warnings && !findings.is_empty() {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

fn collect(path: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    if path.is_dir() {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
            .with_context(|| format!("reading {}", path.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        entries.sort();
        for p in entries {
            if p.is_dir() || p.to_string_lossy().ends_with(".cases.json") {
                collect(&p, out)?;
            }
        }
    } else {
        out.push(path.to_path_buf());
    }
    Ok(())
}

fn test(paths: &[PathBuf], engine: Engine, component: Option<&Path>) -> Result<ExitCode> {
    let mut files = Vec::new();
    for p in paths {
        collect(p, &mut files)?;
    }
    if files.is_empty() {
        bail!("no *.cases.json files found");
    }
    let (mut passed, mut failed) = (0usize, 0usize);
    for f in &files {
        let (policy, results) = match engine {
            Engine::Native => cases::run_file(f).map_err(anyhow::Error::msg)?,
            Engine::Component => {
                let path = component.map_or_else(mandate_host_test::component::default_component_path, Path::to_path_buf);
                run_file_on_component(f, &path)?
            }
        };
        let bad: Vec<_> = results.iter().filter(|r| !r.passed).collect();
        println!(
            "{} ({}): {} cases, {} failed",
            f.display(),
            policy.display(),
            results.len(),
            bad.len()
        );
        for r in bad {
            println!("  FAIL {}: got {}, want {}", r.name, r.got, r.want);
        }
        passed += results.iter().filter(|r| r.passed).count();
        failed += results.iter().filter(|r| !r.passed).count();
    }
    println!("{passed} passed, {failed} failed");
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// A case file through the component: one instance per minter setting, the same checks.
fn run_file_on_component(path: &Path, component: &Path) -> Result<(PathBuf, Vec<cases::CaseResult>)> {
    use mandate_host_test::component::{core_reason, to_wit, wit, ComponentHost};
    use mandate_core::decide::DecideRequest;
    use mandate_core::decision::Effect;
    use mandate_core::policy::PolicyDecision;
    let raw = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let file: cases::CaseFile = serde_json::from_slice(&raw).with_context(|| format!("parsing {}", path.display()))?;
    let policy_path = path.parent().unwrap_or(Path::new(".")).join(&file.policy);
    let doc: serde_json::Value = serde_json::from_slice(&std::fs::read(&policy_path).with_context(|| format!("reading {}", policy_path.display()))?)
        .with_context(|| format!("parsing {}", policy_path.display()))?;
    let host = ComponentHost::from_file(component)?;
    let mut deciders = Vec::new();
    for minter in [false, true] {
        let mut d = host.instantiate()?;
        if let Err(e) = d.configure(&cases::case_config(&doc, minter).to_string())? {
            bail!("{}: {}: {}", policy_path.display(), e.field, e.message);
        }
        deciders.push(d);
    }
    let mut results = Vec::new();
    for case in &file.cases {
        let mut r = case.request.clone();
        let minter = r.minter.unwrap_or(file.minter);
        r.minter = Some(minter);
        let req = DecideRequest::from_case(&r).map_err(|e| anyhow::anyhow!("{}: case `{}`: {e}", path.display(), case.name))?;
        let Some(d) = deciders.get_mut(usize::from(minter)) else { bail!("no decider") };
        let out = d.decide(&to_wit(&req))?;
        let effect = match out.effect {
            wit::Effect::Allow => Effect::Allow,
            wit::Effect::Deny => Effect::Deny,
            wit::Effect::DryRunDeny => Effect::DryRunDeny,
        };
        let mut pd = PolicyDecision::with(effect, core_reason(out.reason));
        pd.rule_id = out.rule_id;
        pd.dry_run_rule_id = out.dry_run_rule_id;
        pd.scopes = out.scopes;
        results.push(cases::check(case, &pd));
    }
    Ok((policy_path, results))
}

fn explain(policy_path: &Path, request: &Path, json: bool) -> Result<ExitCode> {
    let policy = cases::load_policy(policy_path).map_err(anyhow::Error::msg)?;
    let raw = std::fs::read(request).with_context(|| format!("reading {}", request.display()))?;
    let req: CaseRequest = serde_json::from_slice(&raw).context("parsing the request")?;
    let mut signed = None;
    let explanation = cases::with_input(&policy, &req, &mut signed, |input, txn| {
        let mut e = policy.explain(input);
        if let Some(t) = txn {
            let (d, j) = cases::apply_delegation(&policy, t, input, e.decision.clone());
            e.decision = d;
            e.delegation = Some(j);
        }
        e
    })
    .map_err(anyhow::Error::msg)?;
    let explanation = match explanation {
        Ok(e) => e,
        Err(reason) => {
            println!(
                "refused before the policy: {} ({})",
                reason.code(),
                reason.message()
            );
            return Ok(ExitCode::SUCCESS);
        }
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&explanation)?);
        return Ok(ExitCode::SUCCESS);
    }
    let d = &explanation.decision;
    println!("decision: {:?} ({})", d.effect, d.reason.code());
    println!("  rule:        {}", d.rule_id.as_deref().unwrap_or("-"));
    println!(
        "  class:       {}",
        d.class.as_deref().unwrap_or("- (no class matched)")
    );
    println!(
        "  resource:    {}",
        d.resource
            .as_deref()
            .unwrap_or("- (unknown destination: treated as most sensitive)")
    );
    println!("  sensitivity: {}", d.sensitivity.as_deref().unwrap_or("-"));
    if !d.scopes.is_empty() {
        println!(
            "  scopes:      {} (ttl {}s)",
            d.scopes.join(" "),
            d.ttl_s.unwrap_or(0)
        );
    }
    for c in &d.mcp_checked {
        let value = c
            .value
            .as_ref()
            .map_or("(missing)".to_string(), |v| v.to_string());
        println!(
            "  argument:    {} = {value}: {}",
            c.pointer,
            if c.ok { "ok" } else { "REFUSED" }
        );
    }
    if !d.needed_scopes.is_empty() {
        println!(
            "  would need:  an intent with scope(s) {}",
            d.needed_scopes.join(" ")
        );
    }
    if let Some(j) = &explanation.delegation {
        println!("delegation chain (original principal first):");
        for p in &j.principals {
            println!(
                "  {} [{}]: {:?} ({}){}",
                p.principal,
                p.class.as_deref().unwrap_or("no class"),
                p.effect,
                p.reason.code(),
                p.rule
                    .as_deref()
                    .map_or(String::new(), |r| format!(" rule {r}"))
            );
        }
        for e in &j.edges {
            println!(
                "  edge {} -> {}: {}",
                e.from,
                e.to,
                e.rule
                    .as_deref()
                    .map_or("NOT ALLOWED (no delegation rule)".to_string(), |r| format!(
                        "delegation rule {r}"
                    ))
            );
        }
        if let Some((reason, f)) = &j.failure {
            println!(
                "  refused: {} at {} ({}{})",
                reason.code(),
                f.principal,
                f.reason.code(),
                f.exceeded.map_or(String::new(), |w| format!(", beyond the token: {w}"))
            );
        }
    }
    println!("rules:");
    for r in &explanation.rules {
        let mark = if r.matched { "MATCH" } else { "  -  " };
        let effect = format!(
            "{:?}{}",
            r.effect,
            if r.dry_run { " (dry run)" } else { "" }
        )
        .to_lowercase();
        match &r.why_not {
            None => println!("  {mark} {} [{effect}]", r.id),
            Some(why) => println!("  {mark} {} [{effect}]: {why}", r.id),
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Says what was skipped, by line number and reason only: a bad line's content is never shown.
fn report_skips(u: &Usage) {
    if u.skipped_total() == 0 {
        return;
    }
    for (line, skip) in &u.first_skips {
        eprintln!("skipped line {line}: {} ({})", skip.code(), skip.message());
    }
    let shown = u.first_skips.len() as u64;
    if u.skipped_total() > shown {
        eprintln!("... and {} more skipped lines", u.skipped_total() - shown);
    }
    let by: Vec<String> = u.skipped.iter().map(|(k, v)| format!("{k} {v}")).collect();
    eprintln!(
        "{} of {} lines skipped ({})",
        u.skipped_total(),
        u.lines,
        by.join(", ")
    );
}

fn usage(policy: &Path, log: &Path, json: bool, html: Option<&Path>) -> Result<ExitCode> {
    let m = Model::load(policy)?;
    let u = Usage::read(&m, log)?;
    report_skips(&u);
    let report = u.report(&m);
    if let Some(path) = html {
        let title = format!(
            "mandate usage: {}",
            policy.file_name().map_or(String::new(), |n| n.to_string_lossy().into_owned())
        );
        std::fs::write(path, usage_mod::html::render(&report, &title))
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else if html.is_none() {
        print!("{}", report.to_text());
    }
    Ok(ExitCode::SUCCESS)
}

fn suggest(policy: &Path, log: &Path, out: Option<&Path>) -> Result<ExitCode> {
    let m = Model::load(policy)?;
    let u = Usage::read(&m, log)?;
    report_skips(&u);
    let s = usage_mod::suggest::suggest(&m, &u)?;
    let text = serde_json::to_string_pretty(&s.document)? + "\n";
    let suggested = Model::from_slice(text.as_bytes()).context("the suggested policy does not compile (a bug: please report)")?;
    let replay = usage_mod::suggest::replay(&m, &suggested, log)?;
    let out_path = out.map(Path::to_path_buf).unwrap_or_else(|| {
        let name = policy.file_name().map_or("policy".into(), |n| n.to_string_lossy().into_owned());
        let stem = name.strip_suffix(".json").unwrap_or(&name).to_string();
        policy.with_file_name(format!("{stem}.suggested.json"))
    });
    if s.changes.is_empty() {
        println!("no change: every grant was used and nothing can be narrowed");
    }
    for c in &s.changes {
        println!("- {}: {}", c.subject, c.change);
    }
    let original = m.wrapped.clone().unwrap_or_else(|| m.raw.clone());
    print!(
        "{}",
        usage_mod::suggest::diff(
            &original,
            &s.document,
            &policy.display().to_string(),
            &out_path.display().to_string()
        )
    );
    println!(
        "replay: {} records, {} reproduced by the policy in force ({} allowed), {} not reproducible, {} judged differently by the suggestion",
        replay.records, replay.reproduced, replay.allowed, replay.unreproducible, replay.mismatches
    );
    for e in &replay.examples {
        println!("  {e}");
    }
    if !replay.passed() {
        println!("replay FAILED: the suggestion was not written");
        return Ok(ExitCode::from(1));
    }
    std::fs::write(&out_path, text).with_context(|| format!("writing {}", out_path.display()))?;
    println!("replay passed: wrote {}", out_path.display());
    Ok(ExitCode::SUCCESS)
}
