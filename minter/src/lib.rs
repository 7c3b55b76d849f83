//! mandate-minter: the reference RFC 8693 token-exchange service for mandate.
//!
//! Proxies (the mandate filter) exchange a workload's JWT-SVID for a short-lived,
//! audience-bound ES256 JWT (or, for legacy destinations, a static secret that
//! only the proxy ever sees). See `README.md` for the configuration and the wire
//! format.
//!
//! Starting a minter in-process (tests, benches):
//! ```no_run
//! let config = mandate_minter::config::MinterConfig::load(std::path::Path::new("minter.json"))?;
//! let handle = mandate_minter::spawn(config)?;   // own thread + Tokio runtime
//! println!("{}", handle.base_url());             // e.g. http://127.0.0.1:40123
//! handle.shutdown()?;                            // flushes SQLite
//! # Ok::<(), anyhow::Error>(())
//! ```

pub mod auth;
pub mod config;
pub mod conns;
pub mod error;
pub mod exchange;
pub mod keys;
pub mod legacy;
pub mod metrics;
pub mod pgstore;
pub mod server;
pub mod store;
pub mod tasks;
pub mod testpg;
pub mod tls;
pub mod tools;
pub mod txn;
pub mod values;
pub mod verify;

pub use server::{prepare, spawn, Handle, Prepared};

use config::LogLevel;

/// Serves `config` (with an optional listen override) until SIGTERM or Ctrl-C, as the
/// `mandate-minter` binary does: prints `{"listening": ADDR, "tls": BOOL}` on stdout once bound.
pub fn run(config: config::MinterConfig, listen: Option<std::net::SocketAddr>) -> anyhow::Result<()> {
    use std::io::Write as _;
    let workers = config.workers.unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()));
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(workers).enable_all().build()?;
    let prepared = server::prepare_on(config, listen)?;
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "{}", serde_json::json!({"listening": prepared.local_addr().to_string(), "tls": prepared.is_tls()}))?;
        out.flush()?;
    }
    rt.block_on(prepared.serve(async {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
                return;
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }))
}

/// Unix time, seconds.
pub fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Unix time, milliseconds.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)).unwrap_or(0)
}

/// Short SHA-256 hash of a secret value for logs (`sha256:` + 12 hex digits).
pub fn short_hash(value: &[u8]) -> String {
    let d = mandate_core::identity::token_digest(value);
    mandate_core::identity::short_hash(&d)
}

/// JSON-lines logger on stderr.
#[derive(Debug, Clone, Copy)]
pub struct Log {
    pub level: LogLevel,
}

impl Log {
    fn emit(&self, level: LogLevel, name: &str, mut v: serde_json::Value) {
        if level > self.level || self.level == LogLevel::Off {
            return;
        }
        if let Some(o) = v.as_object_mut() {
            o.insert("ts".into(), now().into());
            o.insert("level".into(), name.into());
        }
        eprintln!("{v}");
    }
    pub fn error(&self, v: serde_json::Value) {
        self.emit(LogLevel::Error, "error", v)
    }
    pub fn info(&self, v: serde_json::Value) {
        self.emit(LogLevel::Info, "info", v)
    }
    pub fn debug(&self, v: serde_json::Value) {
        self.emit(LogLevel::Debug, "debug", v)
    }
}
