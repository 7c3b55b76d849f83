//! `minter-load`: fires N token exchanges over C keep-alive connections at a
//! running minter and prints `{"exchanges_per_s", "p50_ms", "p99_ms", ...}`.
//!
//! `minter-load fixture --dir D` writes a self-contained setup for it: a
//! signing key and its SPIFFE bundle inlined in `D/minter.json` (state in
//! `D/state`, port 0, logging off), and a matching JWT-SVID in `D/subject.jwt`.
//! Only talks to the URL it is given; every run is bounded by `-n`.
//!
//! `--url` may list several minters (comma-separated): connection i goes to minter i mod k
//! (replicas behind no balancer). `minter-load replicas` measures, in one run, one SQLite
//! minter against three replicas on a throwaway PostgreSQL (`fsync` on) and prints both and
//! their ratio.

use anyhow::{bail, Context, Result};
use axum::body::Bytes;
use clap::{Parser, Subcommand};
use http_body_util::{BodyExt as _, Full};
use jwt_simple::prelude::{Claims, Duration as JDuration, ECDSAP256KeyPairLike, ES256KeyPair};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Parser)]
#[command(name = "minter-load", about = "load generator for mandate-minter")]
struct Cli {
    #[command(subcommand)]
    command: Option<Cmd>,
    /// Minter base URL (http only); several, comma-separated, share the connections.
    #[arg(long, default_value = "http://127.0.0.1:8181")]
    url: String,
    /// Subject token (a JWT-SVID the minter trusts).
    #[arg(long)]
    subject_token: Option<String>,
    /// File holding the subject token.
    #[arg(long)]
    subject_token_file: Option<PathBuf>,
    #[arg(long, default_value = "payments-api")]
    audience: String,
    #[arg(long, default_value = "payments:read")]
    scope: String,
    #[arg(long, default_value = "load-task")]
    task: String,
    /// Exchanges to send (after warm-up).
    #[arg(short = 'n', long, default_value_t = 20000)]
    requests: u64,
    /// Concurrent connections.
    #[arg(short = 'c', long, default_value_t = 8)]
    connections: usize,
    /// Warm-up exchanges, not measured.
    #[arg(long, default_value_t = 200)]
    warmup: u64,
    /// Client threads.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// HTTP Basic credentials `client_id:secret` (shared_secret mode).
    #[arg(long)]
    basic: Option<String>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Write a minter config, its trust bundle and a subject token into DIR.
    Fixture {
        #[arg(long)]
        dir: PathBuf,
    },
    /// One SQLite minter (2 workers) against three PostgreSQL replicas (1 worker each), same
    /// run, same load (-n, -c); in-process, on a throwaway cluster.
    Replicas,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    if let Some(Cmd::Fixture { dir }) = &cli.command {
        return fixture(dir);
    }
    if let Some(Cmd::Replicas) = &cli.command {
        return replicas(&cli);
    }
    let token = match (&cli.subject_token, &cli.subject_token_file) {
        (Some(t), _) => t.clone(),
        (None, Some(f)) => std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?.trim().to_string(),
        (None, None) => bail!("--subject-token or --subject-token-file is required"),
    };
    if cli.connections == 0 || cli.requests == 0 {
        bail!("-n and -c must be positive");
    }
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(cli.threads.max(1)).enable_all().build()?;
    rt.block_on(run(cli, token))
}

fn fixture(dir: &std::path::Path) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let kid = "load-fixture-1";
    let kp = ES256KeyPair::generate().with_key_id(kid);
    let (x, y) = mandate_minter::keys::public_xy(&kp)?;
    let bundle = serde_json::json!({"keys": [{"kty": "EC", "crv": "P-256", "kid": kid, "use": "jwt-svid", "x": x, "y": y}]});
    let config = serde_json::json!({
        "listen": "127.0.0.1:0",
        "issuer": "https://minter.load.test",
        "state_dir": "state",
        "log_level": "error",
        "dev": true,
        "tasks": {"require_registered": false},
        "identity": {"audiences": ["mandate-minter"], "trust_domains": [{"name": "example.org", "bundle": {"inline": bundle}}]},
        "audiences": {"example.org": ["payments-api", "crm"]},
        "scopes": {"payments-api": ["payments:read", "payments:write"]},
        "ttl": {"default_s": 120, "max_s": 300}
    });
    let claims = Claims::create(JDuration::from_hours(24))
        .with_subject("spiffe://example.org/agent/load")
        .with_audience("mandate-minter");
    let token = kp.sign(claims).map_err(|e| anyhow::anyhow!("{e}"))?;
    let cfg_path = dir.join("minter.json");
    std::fs::write(&cfg_path, serde_json::to_vec_pretty(&config)?)?;
    let tok_path = dir.join("subject.jwt");
    std::fs::write(&tok_path, &token)?;
    println!("{}", serde_json::json!({"config": cfg_path, "subject_token_file": tok_path, "audience": "payments-api", "scope": "payments:read"}));
    Ok(())
}

/// Starts the fixture's minter in-process with `store`, `workers` threads.
fn start_fixture(dir: &std::path::Path, name: &str, store: serde_json::Value, workers: usize) -> Result<mandate_minter::Handle> {
    let raw = std::fs::read(dir.join("minter.json"))?;
    let mut cfg: serde_json::Value = serde_json::from_slice(&raw)?;
    cfg["state_dir"] = serde_json::json!(dir.join(name));
    cfg["store"] = store;
    cfg["workers"] = serde_json::json!(workers);
    mandate_minter::spawn(mandate_minter::config::MinterConfig::from_json(cfg)?)
}

fn replicas(cli: &Cli) -> Result<()> {
    let dir = tempfile_dir()?;
    fixture_quiet(&dir)?;
    let token = std::fs::read_to_string(dir.join("subject.jwt"))?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(cli.threads.max(1)).enable_all().build()?;
    let measure = |urls: String| -> Result<serde_json::Value> {
        let c = Cli { url: urls, command: None, subject_token: Some(token.clone()), subject_token_file: None, audience: cli.audience.clone(),
                      scope: cli.scope.clone(), task: cli.task.clone(), requests: cli.requests, connections: cli.connections, warmup: cli.warmup,
                      threads: cli.threads, basic: None };
        rt.block_on(measure(&c, token.clone()))
    };
    let single = start_fixture(&dir, "sqlite", serde_json::json!({}), 2)?;
    let sqlite = measure(single.base_url())?;
    single.shutdown()?;
    let pg = mandate_minter::testpg::TestPg::start_durable()?.context("PostgreSQL binaries not found (scripts/setup)")?;
    pg.create_db("bench")?;
    let mut store = pg.store_config("bench");
    store["postgres"]["pool_size"] = serde_json::json!(8);
    let reps = (1..=3).map(|i| start_fixture(&dir, &format!("r{i}"), store.clone(), 1)).collect::<Result<Vec<_>>>()?;
    let urls = reps.iter().map(|r| r.base_url()).collect::<Vec<_>>().join(",");
    let postgres = measure(urls)?;
    drop(reps);
    let ratio = postgres["exchanges_per_s"].as_f64().unwrap_or(0.0) / sqlite["exchanges_per_s"].as_f64().unwrap_or(1.0).max(1e-9);
    println!("{}", serde_json::json!({"sqlite_1_minter": sqlite, "postgres_3_replicas": postgres, "throughput_ratio_pg_over_sqlite": (ratio * 100.0).round() / 100.0}));
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

fn tempfile_dir() -> Result<PathBuf> {
    let d = std::env::temp_dir().join(format!("minter-load-{}", mandate_minter::exchange::random_id().replace(['-', '_'], "x")));
    std::fs::create_dir_all(&d)?;
    Ok(d)
}

fn fixture_quiet(dir: &std::path::Path) -> Result<()> {
    fixture(dir)
}

struct Target {
    authority: String,
    addr: String,
    body: Bytes,
    basic: Option<String>,
}

async fn run(cli: Cli, token: String) -> Result<()> {
    let out = measure(&cli, token).await?;
    println!("{out}");
    if out["errors"].as_u64().unwrap_or(0) > 0 {
        bail!("{} exchanges failed", out["errors"]);
    }
    Ok(())
}

async fn measure(cli: &Cli, token: String) -> Result<serde_json::Value> {
    use base64::engine::general_purpose::STANDARD;
    use base64::Engine as _;
    let mut targets = Vec::new();
    for url in cli.url.split(',') {
        let rest = url.strip_prefix("http://").context("--url must be http://HOST:PORT")?;
        targets.push(rest.trim_end_matches('/').to_string());
    }
    let body = serde_urlencoded::to_string([
        ("grant_type", mandate_minter::config::GRANT_TOKEN_EXCHANGE),
        ("subject_token", token.as_str()),
        ("subject_token_type", mandate_minter::config::TOKEN_TYPE_JWT),
        ("audience", cli.audience.as_str()),
        ("scope", cli.scope.as_str()),
        ("task", cli.task.as_str()),
        ("intent", "load-test"),
        ("requested_ttl", "60"),
    ])?;
    let body = Bytes::from(body);
    let basic = cli.basic.as_ref().map(|b| format!("Basic {}", STANDARD.encode(b)));
    let target: Vec<Arc<Target>> =
        targets.into_iter().map(|a| Arc::new(Target { addr: a.clone(), authority: a, body: body.clone(), basic: basic.clone() })).collect();

    // Warm-up (connections, caches), then the measured run.
    if cli.warmup > 0 {
        blast(&target, cli.warmup, cli.connections).await?;
    }
    let started = Instant::now();
    let (mut lat, errors) = blast(&target, cli.requests, cli.connections).await?;
    let elapsed = started.elapsed().as_secs_f64();
    lat.sort_unstable();
    let pct = |p: f64| -> f64 {
        if lat.is_empty() {
            return 0.0;
        }
        let i = ((lat.len() as f64 - 1.0) * p).round() as usize;
        lat.get(i).map_or(0.0, |d| d.as_secs_f64() * 1000.0)
    };
    let out = serde_json::json!({
        "exchanges_per_s": ((cli.requests as f64 - errors as f64) / elapsed * 10.0).round() / 10.0,
        "p50_ms": (pct(0.50) * 1000.0).round() / 1000.0,
        "p99_ms": (pct(0.99) * 1000.0).round() / 1000.0,
        "max_ms": (pct(1.0) * 1000.0).round() / 1000.0,
        "requests": cli.requests,
        "errors": errors,
        "connections": cli.connections,
        "minters": target.len(),
        "seconds": (elapsed * 1000.0).round() / 1000.0,
    });
    Ok(out)
}

async fn blast(targets: &[Arc<Target>], n: u64, c: usize) -> Result<(Vec<Duration>, u64)> {
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for i in 0..c {
        let target = targets.get(i % targets.len().max(1)).context("no minter URL")?.clone();
        let next = next.clone();
        tasks.push(tokio::spawn(async move { worker(target, next, n).await }));
    }
    let mut all = Vec::with_capacity(n as usize);
    let mut errors = 0;
    for t in tasks {
        let (lat, e) = t.await??;
        all.extend(lat);
        errors += e;
    }
    Ok((all, errors))
}

async fn worker(target: Arc<Target>, next: Arc<AtomicU64>, n: u64) -> Result<(Vec<Duration>, u64)> {
    let stream = tokio::net::TcpStream::connect(&target.addr).await.with_context(|| format!("connecting {}", target.addr))?;
    stream.set_nodelay(true)?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    let driver = tokio::spawn(conn);
    let mut lat = Vec::new();
    let mut errors = 0u64;
    let mut first_error: Option<String> = None;
    while next.fetch_add(1, Ordering::Relaxed) < n {
        let mut req = hyper::Request::post("/token")
            .header(hyper::header::HOST, &target.authority)
            .header(hyper::header::CONTENT_TYPE, "application/x-www-form-urlencoded");
        if let Some(b) = &target.basic {
            req = req.header(hyper::header::AUTHORIZATION, b);
        }
        let req = req.body(Full::new(target.body.clone()))?;
        let t0 = Instant::now();
        sender.ready().await?;
        let resp = sender.send_request(req).await?;
        let status = resp.status();
        let body = resp.into_body().collect().await?.to_bytes();
        lat.push(t0.elapsed());
        if status != hyper::StatusCode::OK {
            errors += 1;
            if first_error.is_none() {
                first_error = Some(format!("HTTP {status}: {}", String::from_utf8_lossy(&body)));
            }
        }
    }
    driver.abort();
    if let Some(e) = first_error {
        eprintln!("first error: {e}");
    }
    Ok((lat, errors))
}
