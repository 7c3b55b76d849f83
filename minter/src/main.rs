//! `mandate-minter`: the RFC 8693 token-exchange service.

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use mandate_minter::config::MinterConfig;
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Parser)]
#[command(name = "mandate-minter", version, about = "mandate token-exchange service (RFC 8693)")]
struct Cli {
    /// Configuration file (JSON or TOML).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// Listen address override (port 0: any free port; the bound address is printed on stdout).
    #[arg(long, global = true)]
    listen: Option<SocketAddr>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve (the default).
    Serve,
    /// Add a pending signing key: published at once, signing after `keys.publish_before_use_s`.
    RotateKey,
    /// Validate the configuration and exit.
    CheckConfig,
    /// Print the JSON Schema of the configuration (minter/config.schema.json).
    ConfigSchema,
    /// Print the SHA-256 (hex) of a client secret read from stdin, for `secret_sha256`.
    HashSecret,
    /// Create or upgrade the store's schema (PostgreSQL: under an advisory lock, safe while
    /// replicas start) and exit.
    Migrate {
        /// PostgreSQL: give the feed a new epoch (after restoring a backup), so every proxy
        /// starts over from a snapshot.
        #[arg(long)]
        new_epoch: bool,
    },
    /// Check that the store is reachable and its schema current; print what it holds. Exits
    /// non-zero otherwise.
    CheckStore,
}

fn load(cli: &Cli) -> Result<MinterConfig> {
    let path = cli.config.as_ref().context("--config PATH is required")?;
    MinterConfig::load(path)
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command.as_ref().unwrap_or(&Command::Serve) {
        Command::Serve => serve(&cli),
        Command::Migrate { new_epoch } => {
            let config = load(&cli)?;
            println!("{}", mandate_minter::tools::migrate(&config, *new_epoch)?);
            Ok(())
        }
        Command::CheckStore => {
            let config = load(&cli)?;
            let report = mandate_minter::tools::check_store(&config)?;
            println!("{report}");
            anyhow::ensure!(report["ok"] == true, "the store is not ready");
            Ok(())
        }
        Command::RotateKey => {
            let config = load(&cli)?;
            let policy = mandate_minter::keys::Policy::from_config(&config);
            let r = match &config.store.postgres {
                None => mandate_minter::keys::rotate(&config.state_dir, &policy)?,
                Some(_) => mandate_minter::tools::rotate_shared(&config)?,
            };
            println!(
                "{}",
                serde_json::json!({"rotated": r.kid, "signs_from": r.not_before, "published": r.published, "dropped": r.dropped,
                                   "note": "a running minter publishes the new key within reload_check_s and signs with it from signs_from"})
            );
            Ok(())
        }
        Command::CheckConfig => {
            let config = load(&cli)?;
            println!("{}", serde_json::json!({"ok": true, "issuer": config.issuer, "listen": config.listen}));
            Ok(())
        }
        Command::ConfigSchema => {
            print!("{}", mandate_minter::config::schema_text());
            Ok(())
        }
        Command::HashSecret => {
            let mut secret = String::new();
            std::io::stdin().read_line(&mut secret)?;
            let secret = secret.trim_end_matches(['\r', '\n']);
            anyhow::ensure!(!secret.is_empty(), "empty secret on stdin");
            println!("{}", mandate_minter::auth::hash_secret(secret));
            Ok(())
        }
    }
}

fn serve(cli: &Cli) -> Result<()> {
    mandate_minter::run(load(cli)?, cli.listen)
}
