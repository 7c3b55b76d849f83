//! `mandate token inspect`: decode a JWT (JWT-SVID, OIDC token, minted credential, Txn-Token)
//! and, given a plugin configuration, say what the filter's identity stage would make of it.
//! The signature is never printed, and the token itself only by its short hash.

use anyhow::{bail, Context as _, Result};
use base64::Engine as _;
use mandate_core::config;
use mandate_core::identity::{short_hash, token_digest, Verifier};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(clap::Subcommand)]
pub enum TokenCommand {
    /// Decode a token's header and claims. With --config, verify it as the filter's identity
    /// stage would (inline bundles only) at --now, and print the reason code. Exit 0: decoded
    /// (and, with --config, accepted); 2: it would be refused; 1: not a JWT or bad input.
    Inspect {
        /// The token (optionally `Bearer ...`), or '-' for stdin.
        token: String,
        /// A plugin configuration (JSON file): verify against its identity section.
        #[arg(long)]
        config: Option<PathBuf>,
        /// The clock: Unix seconds or RFC 3339 (default: now).
        #[arg(long)]
        now: Option<String>,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
}

pub fn run(cmd: &TokenCommand) -> Result<ExitCode> {
    match cmd {
        TokenCommand::Inspect { token, config, now, json } => inspect(token, config.as_ref(), now.as_deref(), *json),
    }
}

fn read_token(arg: &str) -> Result<String> {
    let raw = if arg == "-" {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut s).context("reading stdin")?;
        s
    } else {
        arg.to_string()
    };
    let t = raw.trim();
    let t = t.strip_prefix("Bearer ").or_else(|| t.strip_prefix("bearer ")).unwrap_or(t);
    Ok(t.trim().to_string())
}

fn part(token: &str, i: usize, what: &str) -> Result<Value> {
    let seg = token.split('.').nth(i).with_context(|| format!("not a JWT: no {what}"))?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(seg)
        .with_context(|| format!("not a JWT: the {what} is not base64url"))?;
    serde_json::from_slice(&bytes).with_context(|| format!("not a JWT: the {what} is not JSON"))
}

fn parse_now(now: Option<&str>) -> Result<u64> {
    match now {
        None => Ok(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs()),
        Some(s) => match s.parse::<u64>() {
            Ok(n) => Ok(n),
            Err(_) => Ok(mandate_host_test::runner::parse_rfc3339(s)? / 1_000_000_000),
        },
    }
}

fn inspect(arg: &str, config: Option<&PathBuf>, now: Option<&str>, as_json: bool) -> Result<ExitCode> {
    let token = read_token(arg)?;
    if token.split('.').count() != 3 {
        bail!("not a JWT: expected three dot-separated parts");
    }
    let hash = short_hash(&token_digest(token.as_bytes()));
    let header = part(&token, 0, "header")?;
    let claims = part(&token, 1, "claims")?;
    let now_s = parse_now(now)?;
    let mut notes = Vec::new();
    if let Some(exp) = claims.get("exp").and_then(Value::as_u64) {
        if exp <= now_s {
            notes.push(format!("expired {}s before --now", now_s - exp));
        }
    }
    if let Some(nbf) = claims.get("nbf").and_then(Value::as_u64) {
        if nbf > now_s {
            notes.push(format!("not valid for another {}s", nbf - now_s));
        }
    }
    let mut out = json!({"token": hash, "header": header, "claims": claims, "now": now_s});
    let mut refused = false;
    if let Some(path) = config {
        let raw = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let cfg = match config::parse(&raw) {
            Ok(c) => c,
            Err(e) => bail!("{}: {e}", path.display()),
        };
        let fetched = cfg.identity.trust_domains.iter().any(|t| t.bundle.cluster.is_some())
            || cfg.identity.oidc_issuers.iter().any(|o| o.jwks.cluster.is_some());
        if fetched {
            notes.push("bundles fetched through a cluster are not fetched here: their tokens get bundle_unavailable".into());
        }
        let mut verifier = Verifier::new(&cfg.identity).map_err(anyhow::Error::msg)?;
        let verdict = match verifier.verify(token.as_bytes(), now_s) {
            Ok(id) => json!({"accepted": true, "principal": id.principal, "exp": id.exp}),
            Err(reason) => {
                refused = true;
                json!({"accepted": false, "reason": reason.code(), "status": reason.http_status(), "message": reason.message()})
            }
        };
        out["verification"] = verdict;
    }
    out["notes"] = json!(notes);
    if as_json {
        println!("{out}");
    } else {
        println!("token {hash} (signature not shown)");
        println!("header: {}", out["header"]);
        println!("claims: {}", serde_json::to_string_pretty(&out["claims"])?);
        for n in &notes {
            println!("note: {n}");
        }
        if let Some(v) = out.get("verification") {
            if v["accepted"] == json!(true) {
                println!("accepted: principal {} (at {now_s})", v["principal"]);
            } else {
                println!("refused: {} ({}): {}", v["reason"].as_str().unwrap_or(""), v["status"], v["message"].as_str().unwrap_or(""));
            }
        }
    }
    Ok(if refused { ExitCode::from(2) } else { ExitCode::SUCCESS })
}
