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
    /// Run one HTTP request through the proxy-wasm filter on the test host.
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
    /// The filter module (.wasm).
    #[arg(long)]
    plugin: PathBuf,
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
    let host = Host::from_file(&args.plugin)?;
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
