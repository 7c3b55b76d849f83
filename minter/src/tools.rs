//! The store subcommands: `migrate`, `check-store`, and `rotate-key` on the shared store.

use crate::config::MinterConfig;
use crate::pgstore;
use anyhow::{anyhow, Context, Result};

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread().enable_all().build()?)
}

async fn connect(config: &MinterConfig) -> Result<(tokio_postgres::Client, tokio::task::JoinHandle<()>)> {
    let cfg = config.store.postgres.as_ref().ok_or_else(|| anyhow!("no `store.postgres`"))?;
    let (client, conn) = pgstore::pg_config(cfg)?.connect(pgstore::tls(cfg)?).await.context("connecting to PostgreSQL (store.postgres)")?;
    let driver = tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok((client, driver))
}

/// `mandate-minter migrate`: the schema version reached.
pub fn migrate(config: &MinterConfig, new_epoch: bool) -> Result<serde_json::Value> {
    if config.store.postgres.is_none() {
        anyhow::ensure!(!new_epoch, "--new-epoch is for the PostgreSQL store (SQLite picks a new epoch at every start)");
        let store = crate::store::Store::open(&config.state_dir, config.longest_token_s(), None)?;
        store.close();
        return Ok(serde_json::json!({"store": "sqlite", "migrated": true}));
    }
    runtime()?.block_on(async {
        let (mut client, driver) = connect(config).await?;
        let version = pgstore::migrate(&mut client).await?;
        let epoch = if new_epoch { Some(pgstore::new_epoch(&client).await?) } else { None };
        drop(client);
        let _ = driver.await;
        Ok(serde_json::json!({"store": "postgres", "schema_version": version, "new_epoch": epoch.is_some()}))
    })
}

/// `mandate-minter check-store`: `ok` true when reachable and the schema is this binary's.
pub fn check_store(config: &MinterConfig) -> Result<serde_json::Value> {
    if config.store.postgres.is_none() {
        let path = config.state_dir.join(crate::store::DB_FILE);
        let conn = rusqlite::Connection::open_with_flags(&path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .with_context(|| format!("opening {}", path.display()))?;
        let count = |t: &str| conn.query_row(&format!("SELECT COUNT(*) FROM {t}"), [], |r| r.get::<_, i64>(0)).ok();
        let (revocations, tasks) = (count("revocations"), count("tasks"));
        return Ok(serde_json::json!({"store": "sqlite", "ok": revocations.is_some() && tasks.is_some(), "revocations": revocations, "tasks": tasks}));
    }
    runtime()?.block_on(async {
        let (client, driver) = match connect(config).await {
            Ok(c) => c,
            Err(e) => return Ok(serde_json::json!({"store": "postgres", "ok": false, "error": format!("{e:#}")})),
        };
        let version = pgstore::schema_version(&client).await?;
        let want = pgstore::MIGRATIONS.len();
        let mut report = serde_json::json!({"store": "postgres", "ok": version == want, "schema_version": version, "schema_wanted": want});
        if version == want {
            let count = |t: &'static str| {
                let c = &client;
                async move { c.query_one(&format!("SELECT COUNT(*) FROM {t}"), &[]).await.map(|r| r.get::<_, i64>(0)) }
            };
            report["revocations"] = count("revocations").await?.into();
            report["tasks"] = count("tasks").await?.into();
            report["signing_keys"] = count("signing_keys").await?.into();
            let max_seq: Option<i64> = client.query_one("SELECT MAX(seq) FROM revocations", &[]).await?.get(0);
            report["feed_seq"] = max_seq.unwrap_or(0).into();
        } else {
            report["error"] = format!("schema version {version}, this minter wants {want}: run `mandate-minter migrate`").into();
        }
        drop(client);
        let _ = driver.await;
        Ok(report)
    })
}

/// `mandate-minter rotate-key` with `store.postgres`: adds a pending key to the shared keys
/// (under the keys lock); every replica publishes it within `reload_check_s`.
pub fn rotate_shared(config: &MinterConfig) -> Result<crate::keys::Rotated> {
    let policy = crate::keys::Policy::from_config(config);
    let store = crate::store::Store::open_config(config)?;
    let pg = store.postgres().ok_or_else(|| anyhow!("no `store.postgres`"))?.clone();
    let r = pg.block_on(async {
        crate::server::pg_keys(&pg).await?;
        crate::server::rotate_pg_if(&pg, &policy, crate::now(), |_| true).await
    })??;
    store.close();
    r.ok_or_else(|| anyhow!("no rotation happened"))
}
