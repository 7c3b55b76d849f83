//! `mandate`: command-line front end of the mandate test host.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand};
use mandate_host_test::{run_request, ConfigRejected, Host, RequestSpec};

mod config_cli;
mod policy_cli;
mod token_cli;

const REQUEST_HELP: &str = r#"REQUEST FILE FORMAT (JSON; every field optional):
  method, path, authority, scheme   request line (GET, /, example.com, http);
                                    sent as :method :path :authority :scheme
  headers      [["name","value"], ...] or {"name": "value" | ["v1","v2"]}
  body | body_base64                request body (UTF-8 text, or base64)
  trailers     like headers
  upstreams    clusters the filter may call (others get BadArgument)
  callouts     answers to the filter's HTTP calls, in order:
               {"status":200,"headers":[["content-type","application/json"]],"body":"..."}
               {"error":"failure"} | {"error":"timeout"}   (delivered with 0 headers)
  time         Unix seconds (number) or RFC 3339 ("2025-01-01T00:00:00Z")
  properties   {"source.address":"10.0.0.1:4000"} (path split on dots; strings are
               raw bytes, integers 8-byte little endian) or
               [{"path":["node","metadata","a.b"],"value":"x"}]
  response     the upstream's answer if forwarded: {"status":200,"headers":[],"body":""}
  envoy_headers  add x-forwarded-proto and x-request-id like Envoy (default true)

EXAMPLE:
  {"method":"GET","path":"/orders?id=7","authority":"api.internal",
   "headers":[["authorization","Bearer eyJ..."]],
   "upstreams":["jwks"],
   "callouts":[{"status":200,"body":"{\"keys\":[]}"}],
   "time":"2025-06-01T12:00:00Z"}

OUTPUT: JSON {"verdict": "local_reply"|"forwarded"|"paused"|"reset",
  "local_reply": {status, details, headers, body}?, "upstream_request": {headers, body}?,
  "response": {headers, body}?, "callouts": [...], "trace": [...], "logs": [...],
  "metrics": {...}, "warnings": [...]?}
EXIT: 0 ran, 1 error (trap, unimplemented hostcall, bad input), 2 configuration rejected."#;

#[derive(Parser)]
#[command(
    name = "mandate",
    version,
    about = "mandate: zero-trust policy filter tooling"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run one HTTP request through the proxy-wasm filter on the test host (or, with
    /// `--engine component`, through the decision core's WebAssembly component).
    #[command(after_long_help = REQUEST_HELP)]
    Run(RunArgs),
    /// Policy as code: lint, test case files, explain a decision.
    #[command(subcommand)]
    Policy(policy_cli::PolicyCommand),
    /// Plugin configuration: check a file as the filter would, print the JSON Schema.
    #[command(subcommand)]
    Config(config_cli::ConfigCommand),
    /// Tokens: decode one and say whether (and why not) the filter would accept it.
    #[command(subcommand)]
    Token(token_cli::TokenCommand),
}

#[derive(clap::Args)]
struct RunArgs {
    /// The filter module (.wasm); required with `--engine plugin`.
    #[arg(long)]
    plugin: Option<PathBuf>,
    /// `plugin`: the proxy-wasm filter on the test host (the full request path: callouts,
    /// upstream, reply). `component`: the decision core's component (wit/mandate.wit) decides
    /// the request read from the same file; prints the decision and its record.
    #[arg(long, value_enum, default_value_t = RunEngine::Plugin)]
    engine: RunEngine,
    /// The component (default: target/wasm32-wasip2/component/mandate_component.wasm).
    #[arg(long)]
    component: Option<PathBuf>,
    /// Plugin configuration: a file, or inline JSON (starts with '{' or '[').
    #[arg(long, default_value = "")]
    config: String,
    /// The request: a JSON file, inline JSON, or '-' for stdin. See --help.
    #[arg(long)]
    request: String,
    /// VM configuration: a file or inline text.
    #[arg(long, default_value = "")]
    vm_config: String,
    /// Extra upstream cluster the filter may call (repeatable).
    #[arg(long = "upstream")]
    upstreams: Vec<String>,
    /// Seed for WASI random_get (deterministic output).
    #[arg(long)]
    seed: Option<u64>,
    /// Print compact JSON.
    #[arg(long)]
    compact: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum RunEngine {
    Plugin,
    Component,
}

/// `mandate run --engine component`: one decision, printed as JSON. Exit 2 on a refused
/// configuration, 1 on a request the component cannot take (named).
fn run_component(args: &RunArgs, config: &[u8], spec: &RequestSpec) -> Result<ExitCode> {
    use mandate_host_test::component::{default_component_path, effect_code, core_reason, request_from_http, to_wit, ComponentHost};
    let parsed = match mandate_core::config::parse(config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("configuration rejected: {e}");
            return Ok(ExitCode::from(2));
        }
    };
    let req = match request_from_http(spec, &parsed) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: the component cannot take this request: {e}");
            return Ok(ExitCode::from(1));
        }
    };
    let path = args.component.clone().unwrap_or_else(default_component_path);
    let host = ComponentHost::from_file(&path)?;
    let mut d = host.instantiate()?;
    if let Err(e) = d.configure(std::str::from_utf8(config).context("the configuration is not UTF-8")?)? {
        eprintln!("configuration rejected: {}: {}", e.field, e.message);
        return Ok(ExitCode::from(2));
    }
    let out = d.decide(&to_wit(&req))?;
    let record: serde_json::Value = serde_json::from_str(&out.record).unwrap_or(serde_json::Value::Null);
    let json = serde_json::json!({
        "engine": "component",
        "effect": effect_code(out.effect),
        "reason": core_reason(out.reason).code(),
        "rule_id": out.rule_id,
        "dry_run_rule_id": out.dry_run_rule_id,
        "scopes": out.scopes,
        "ttl_s": out.ttl_s,
        "decision_id": out.decision_id,
        "record": record,
    });
    println!("{}", if args.compact { serde_json::to_string(&json)? } else { serde_json::to_string_pretty(&json)? });
    Ok(ExitCode::SUCCESS)
}

/// Inline text when it looks like JSON (or is empty), else a file's contents.
fn inline_or_file(arg: &str, what: &str) -> Result<Vec<u8>> {
    let t = arg.trim_start();
    if t.is_empty() || t.starts_with('{') || t.starts_with('[') {
        return Ok(arg.as_bytes().to_vec());
    }
    if arg == "-" {
        let mut buf = Vec::new();
        std::io::Read::read_to_end(&mut std::io::stdin(), &mut buf).context("reading stdin")?;
        return Ok(buf);
    }
    std::fs::read(Path::new(arg)).with_context(|| format!("reading {what} file {arg}"))
}

fn run(args: &RunArgs) -> Result<ExitCode> {
    let config = inline_or_file(&args.config, "config")?;
    let vm_config = inline_or_file(&args.vm_config, "vm config")?;
    let request = inline_or_file(&args.request, "request")?;
    let spec: RequestSpec = serde_json::from_slice(&request)
        .context("parsing the request (see `mandate run --help`)")?;
    if args.engine == RunEngine::Component {
        return run_component(args, &config, &spec);
    }
    let Some(plugin) = &args.plugin else {
        anyhow::bail!("--plugin is required with --engine plugin");
    };
    let host = Host::from_file(plugin)?;
    if let Some(seed) = args.seed {
        host.set_random_seed(seed);
    }
    for u in &args.upstreams {
        host.add_upstream(u);
    }
    if let Some(t) = &spec.time {
        host.set_time(t.unix_nanos()?);
    }
    let mut vm = match host.new_vm(&vm_config, &config) {
        Ok(vm) => vm,
        Err(e) => {
            if let Some(rej) = e.downcast_ref::<ConfigRejected>() {
                eprintln!("configuration rejected ({} returned false)", rej.stage);
                for l in &rej.logs {
                    eprintln!("[{:?}] {}", l.level, l.message);
                }
                return Ok(ExitCode::from(2));
            }
            return Err(e);
        }
    };
    let outcome = run_request(&host, &mut vm, &spec)?;
    let json = if args.compact {
        serde_json::to_string(&outcome)?
    } else {
        serde_json::to_string_pretty(&outcome)?
    };
    println!("{json}");
    Ok(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Run(args) => run(args),
        Command::Policy(cmd) => policy_cli::run(cmd),
        Command::Config(cmd) => config_cli::run(cmd),
        Command::Token(cmd) => token_cli::run(cmd),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
