//! The PostgreSQL store (`store.postgres`): the state every minter replica shares.
//!
//! - **Schema.** Versioned migrations ([`MIGRATIONS`]) run in one transaction under a
//!   transaction-level advisory lock: replicas starting at once apply each step exactly once,
//!   the others wait and find it done. A database newer than this binary is refused.
//! - **One global feed order, no outbox gap.** A reader that asks for `seq > cursor` skips
//!   for ever an entry whose seq was assigned before, but committed after, one it has read.
//!   Every revocation (and task) write therefore takes the advisory lock [`FEED_LOCK`] before
//!   it draws its seq, and holds it until its commit: seqs are assigned in commit order, and
//!   the rows with `seq ≤ n` are all visible once `n` is. (`tests/postgres.rs` shows the gap
//!   with the lock left out and its absence with it.)
//! - **Following the database.** Each replica keeps the in-memory view of the SQLite store
//!   (the hot path never waits for the network) and catches up on `seq > applied` whenever a
//!   `NOTIFY mandate_feed` arrives (sent by every such commit), and every second anyway (a
//!   lost listener connection costs latency, never an entry).
//! - **Signing keys** live in `signing_keys`; rotation takes [`KEYS_LOCK`], so exactly one
//!   replica rotates and the others load the new key on their next reload check.
//! - **Failures.** Every operation is bounded by `store.postgres.timeout_ms` (a connection
//!   from the pool included) and fails with [`StoreError`]: the caller answers 503, and a token
//!   whose record did not commit is never handed out.

use crate::config::PostgresConfig;
use crate::store::{bump, IssuedRecord, Kind, RevokeOutcome, RevokeRequest, Revocation, StoreError, Task, View, TASK_RETENTION_S};
use anyhow::{anyhow, bail, Context, Result};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tokio::sync::{watch, Notify};

/// Advisory lock (transaction-level) held while migrating.
pub const MIGRATE_LOCK: i64 = 0x6d61_6e64_6174_0001;
/// Advisory lock held from drawing a revocation's or a task's seq until its commit.
pub const FEED_LOCK: i64 = 0x6d61_6e64_6174_0002;
/// Advisory lock held while the signing keys change.
pub const KEYS_LOCK: i64 = 0x6d61_6e64_6174_0003;
/// The channel every feed commit notifies.
pub const CHANNEL: &str = "mandate_feed";
/// Issued-token records are kept this long past their expiry (as with SQLite).
const ISSUED_RETENTION_S: u64 = 3600;
/// Catch-up without a notification at least this often.
const SYNC_EVERY: Duration = Duration::from_secs(1);
/// Rows read per catch-up query.
const SYNC_PAGE: i64 = 5000;
/// Issued-token records share a commit (group commit): at most this many per statement.
const ISSUED_BATCH: usize = 512;
/// Tasks committing issued-token records concurrently, per replica.
const ISSUED_WRITERS: usize = 4;

type IssuedAck = tokio::sync::oneshot::Sender<Result<(), StoreError>>;
type IssuedQueue = Arc<tokio::sync::Mutex<tokio::sync::mpsc::Receiver<(IssuedRecord, IssuedAck)>>>;

/// The schema, one step per version; never edit a released step, add one.
pub const MIGRATIONS: &[&str] = &[
    // 1: the state of the SQLite store, plus the feed epoch and the signing keys.
    "CREATE TABLE mandate_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
     CREATE TABLE issued (
        jti TEXT PRIMARY KEY,
        sub TEXT NOT NULL,
        task TEXT,
        aud TEXT NOT NULL,
        client_id TEXT NOT NULL,
        iat BIGINT NOT NULL,
        exp BIGINT NOT NULL);
     CREATE INDEX issued_task ON issued(task);
     CREATE INDEX issued_sub ON issued(sub);
     CREATE INDEX issued_exp ON issued(exp);
     CREATE SEQUENCE tasks_seq;
     CREATE TABLE tasks (
        id TEXT PRIMARY KEY,
        seq BIGINT NOT NULL UNIQUE,
        subjects TEXT NOT NULL,
        intents TEXT NOT NULL,
        label TEXT,
        created_at BIGINT NOT NULL,
        expires_at BIGINT NOT NULL,
        ended_at BIGINT,
        client_id TEXT NOT NULL);
     CREATE SEQUENCE revocations_seq;
     CREATE TABLE revocations (
        seq BIGINT PRIMARY KEY,
        kind TEXT NOT NULL,
        value TEXT NOT NULL,
        subject TEXT NOT NULL DEFAULT '',
        at BIGINT NOT NULL,
        until BIGINT,
        client_id TEXT NOT NULL,
        UNIQUE (kind, value, subject));
     CREATE TABLE signing_keys (
        ord BIGSERIAL PRIMARY KEY,
        kid TEXT NOT NULL UNIQUE,
        d TEXT NOT NULL,
        created BIGINT NOT NULL,
        not_before BIGINT);",
];

/// Parses a libpq connection string (key=value or URL form).
pub fn parse_url(url: &str) -> Result<tokio_postgres::Config> {
    url.parse::<tokio_postgres::Config>().map_err(|e| anyhow!("not a PostgreSQL connection string: {e}"))
}

/// The connection settings: `url`, or the libpq environment variables.
pub fn pg_config(cfg: &PostgresConfig) -> Result<tokio_postgres::Config> {
    let mut c = match &cfg.url {
        Some(u) => parse_url(u)?,
        None => {
            let mut c = tokio_postgres::Config::new();
            let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
            let host = var("PGHOST").unwrap_or_else(|| "localhost".into());
            for h in host.split(',') {
                c.host(h);
            }
            if let Some(p) = var("PGPORT") {
                c.port(p.parse().with_context(|| format!("PGPORT={p:?} is not a port"))?);
            }
            c.user(var("PGUSER").unwrap_or_else(|| "postgres".into()));
            if let Some(p) = var("PGPASSWORD") {
                c.password(p);
            }
            if let Some(d) = var("PGDATABASE") {
                c.dbname(d);
            }
            if let Some(a) = var("PGAPPNAME") {
                c.application_name(a);
            }
            match var("PGSSLMODE").as_deref() {
                None | Some("prefer") => c.ssl_mode(tokio_postgres::config::SslMode::Prefer),
                Some("disable") => c.ssl_mode(tokio_postgres::config::SslMode::Disable),
                Some("require" | "verify-ca" | "verify-full") => c.ssl_mode(tokio_postgres::config::SslMode::Require),
                Some(m) => bail!("PGSSLMODE={m:?} is not supported (disable, prefer, require, verify-full)"),
            };
            c
        }
    };
    if c.get_application_name().is_none() {
        c.application_name("mandate-minter");
    }
    c.connect_timeout(Duration::from_millis(cfg.timeout_ms));
    Ok(c)
}

/// TLS to the database: rustls, verifying the server's certificate and name against
/// `ca_file` (or the Mozilla roots). Used when the connection string asks for TLS.
pub fn tls(cfg: &PostgresConfig) -> Result<tokio_postgres_rustls::MakeRustlsConnect> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    match &cfg.ca_file {
        Some(ca) => {
            for c in CertificateDer::pem_file_iter(ca).with_context(|| format!("reading {}", ca.display()))? {
                roots.add(c.with_context(|| format!("parsing {}", ca.display()))?)?;
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
    let config = match (&cfg.client_cert, &cfg.client_key) {
        (Some(cert), Some(key)) => {
            let chain = CertificateDer::pem_file_iter(cert)
                .with_context(|| format!("reading {}", cert.display()))?
                .collect::<Result<Vec<_>, _>>()
                .with_context(|| format!("parsing {}", cert.display()))?;
            let key = PrivateKeyDer::from_pem_file(key).with_context(|| format!("reading {}", key.display()))?;
            builder.with_client_auth_cert(chain, key)?
        }
        _ => builder.with_no_client_auth(),
    };
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

fn err(e: impl std::fmt::Display) -> StoreError {
    StoreError::Failed(format!("postgres: {e}"))
}

fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// Runs the missing migrations under [`MIGRATE_LOCK`]; returns the schema version.
pub async fn migrate(client: &mut tokio_postgres::Client) -> Result<usize> {
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATE_LOCK]).await?;
    tx.batch_execute("CREATE TABLE IF NOT EXISTS mandate_schema (version INT PRIMARY KEY, applied_at BIGINT NOT NULL)").await?;
    let have: i32 = tx.query_one("SELECT COALESCE(MAX(version), 0) FROM mandate_schema", &[]).await?.get(0);
    let have = usize::try_from(have).unwrap_or(0);
    if have > MIGRATIONS.len() {
        bail!("the database schema is version {have}, newer than this minter knows ({}): upgrade the minter", MIGRATIONS.len());
    }
    for (i, step) in MIGRATIONS.iter().enumerate().skip(have) {
        tx.batch_execute(step).await.with_context(|| format!("schema migration {}", i + 1))?;
        let v = i32::try_from(i + 1).unwrap_or(i32::MAX);
        tx.execute("INSERT INTO mandate_schema (version, applied_at) VALUES ($1, $2)", &[&v, &to_i64(crate::now())]).await?;
    }
    // The feed epoch: one per database, shared by every replica.
    tx.execute("INSERT INTO mandate_meta (key, value) VALUES ('epoch', $1) ON CONFLICT (key) DO NOTHING", &[&crate::exchange::random_id()])
        .await?;
    tx.commit().await?;
    Ok(MIGRATIONS.len())
}

/// The schema version of a database (0: none), without changing anything.
pub async fn schema_version(client: &tokio_postgres::Client) -> Result<usize> {
    let exists: bool = client.query_one("SELECT to_regclass('mandate_schema') IS NOT NULL", &[]).await?.get(0);
    if !exists {
        return Ok(0);
    }
    let v: i32 = client.query_one("SELECT COALESCE(MAX(version), 0) FROM mandate_schema", &[]).await?.get(0);
    Ok(usize::try_from(v).unwrap_or(0))
}

/// Gives the feed a new epoch: every proxy starts over from a snapshot. Run after restoring a
/// backup (its seqs may go back below cursors that proxies hold).
pub async fn new_epoch(client: &tokio_postgres::Client) -> Result<String> {
    let e = crate::exchange::random_id();
    client.execute("UPDATE mandate_meta SET value = $1 WHERE key = 'epoch'", &[&e]).await?;
    Ok(e)
}

/// Records one revocation in `tx`; with `serialize`, under [`FEED_LOCK`] (always, but for the
/// test that shows the gap without it). Also returns whether a registered task was ended.
pub async fn insert_revocation(
    tx: &tokio_postgres::Transaction<'_>,
    req: &RevokeRequest,
    at: u64,
    client_id: &str,
    now: u64,
    token_max_s: u64,
    serialize: bool,
) -> Result<RevokeOutcome, tokio_postgres::Error> {
    if serialize {
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&FEED_LOCK]).await?;
    }
    let kind = req.kind;
    let value = req.value.as_str();
    let subject_key = req.subject.as_deref().unwrap_or("");
    let until: Option<i64> = match kind {
        Kind::Task => match tx.query_opt("SELECT expires_at FROM tasks WHERE id = $1", &[&value]).await? {
            Some(row) => {
                if req.subject.is_none() {
                    tx.execute("UPDATE tasks SET ended_at = $1 WHERE id = $2 AND ended_at IS NULL", &[&to_i64(at), &value]).await?;
                }
                Some(to_i64(to_u64(row.get::<_, i64>(0)).saturating_add(token_max_s)))
            }
            None => None,
        },
        Kind::Jti => tx.query_opt("SELECT exp FROM issued WHERE jti = $1", &[&value]).await?.map(|r| r.get::<_, i64>(0)),
        Kind::Subject => None,
    };
    let inserted = tx
        .query_opt(
            "INSERT INTO revocations (seq, kind, value, subject, at, until, client_id)
             VALUES (nextval('revocations_seq'), $1, $2, $3, $4, $5, $6)
             ON CONFLICT (kind, value, subject) DO NOTHING RETURNING seq",
            &[&kind.as_str(), &value, &subject_key, &to_i64(at), &until, &client_id],
        )
        .await?;
    let created = inserted.is_some();
    let row = tx
        .query_one("SELECT seq, at, until FROM revocations WHERE kind = $1 AND value = $2 AND subject = $3", &[&kind.as_str(), &value, &subject_key])
        .await?;
    let (seq, at_db, until_db): (i64, i64, Option<i64>) = (row.get(0), row.get(1), row.get(2));
    if created {
        tx.execute("SELECT pg_notify($1, $2)", &[&CHANNEL, &seq.to_string()]).await?;
    }
    let now = to_i64(now);
    let rows = match (kind, req.subject.as_deref()) {
        (Kind::Jti, _) => Vec::new(),
        (Kind::Task, Some(sub)) => tx.query("SELECT jti FROM issued WHERE task = $1 AND sub = $2 AND exp >= $3 ORDER BY iat", &[&value, &sub, &now]).await?,
        (Kind::Task, None) => tx.query("SELECT jti FROM issued WHERE task = $1 AND exp >= $2 ORDER BY iat", &[&value, &now]).await?,
        (Kind::Subject, _) => tx.query("SELECT jti FROM issued WHERE sub = $1 AND exp >= $2 ORDER BY iat", &[&value, &now]).await?,
    };
    let jtis = if kind == Kind::Jti { vec![value.to_string()] } else { rows.iter().map(|r| r.get::<_, String>(0)).collect() };
    Ok(RevokeOutcome {
        revocation: Revocation { seq, kind, value: value.to_string(), subject: req.subject.clone(), at: to_u64(at_db), until: until_db.map(to_u64) },
        created,
        jtis,
    })
}

/// Revocations with `seq > after`, in seq order (at most `limit`).
pub async fn revocations_after(client: &tokio_postgres::Client, after: i64, limit: i64) -> Result<Vec<Revocation>, tokio_postgres::Error> {
    let rows = client.query("SELECT seq, kind, value, subject, at, until FROM revocations WHERE seq > $1 ORDER BY seq LIMIT $2", &[&after, &limit]).await?;
    let mut out = Vec::with_capacity(rows.len());
    for r in rows {
        let kind: String = r.get(1);
        // A kind this binary does not know (a newer replica wrote it) cannot be applied; it
        // is not skipped silently either: the catch-up stops below it and reports.
        let Some(kind) = Kind::parse(&kind) else { break };
        let subject: String = r.get(3);
        out.push(Revocation {
            seq: r.get(0),
            kind,
            value: r.get(2),
            subject: (!subject.is_empty()).then_some(subject),
            at: to_u64(r.get(4)),
            until: r.get::<_, Option<i64>>(5).map(to_u64),
        });
    }
    Ok(out)
}

fn task_from_row(r: &tokio_postgres::Row) -> Option<Task> {
    let subjects: String = r.get("subjects");
    let intents: String = r.get("intents");
    Some(Task {
        id: r.get("id"),
        subjects: serde_json::from_str(&subjects).ok()?,
        intents: serde_json::from_str(&intents).ok()?,
        label: r.get("label"),
        created_at: to_u64(r.get("created_at")),
        expires_at: to_u64(r.get("expires_at")),
        ended_at: r.get::<_, Option<i64>>("ended_at").map(to_u64),
        client_id: r.get("client_id"),
    })
}

const TASK_COLUMNS: &str = "id, seq, subjects, intents, label, created_at, expires_at, ended_at, client_id";

pub struct PgStore {
    pool: deadpool_postgres::Pool,
    pg: tokio_postgres::Config,
    tls: tokio_postgres_rustls::MakeRustlsConnect,
    timeout: Duration,
    token_max_s: u64,
    epoch: String,
    view: Arc<RwLock<View>>,
    changed: Arc<watch::Sender<u64>>,
    /// One catch-up at a time (they apply rows in seq order).
    sync_lock: tokio::sync::Mutex<()>,
    wake: Arc<Notify>,
    /// The runtime of the listener and the catch-up loop (and of startup).
    rt: Mutex<Option<tokio::runtime::Runtime>>,
    /// Whether the last operation reached the database (for logs on the transitions).
    up: AtomicBool,
    /// Issued-token records waiting for a group commit.
    issued: tokio::sync::mpsc::Sender<(IssuedRecord, IssuedAck)>,
    /// Why this replica can no longer follow the shared feed (the epoch changed under it, the
    /// sequence went back, a revocation of a kind it does not know): it then mints nothing and
    /// is not ready, until it is restarted (or upgraded). Sticky.
    blocked: Mutex<Option<String>>,
}

impl PgStore {
    /// Connects, migrates (under the advisory lock), loads the state into `view`, and starts
    /// following the database. Blocking: not from inside an async task.
    pub(crate) fn open(cfg: &PostgresConfig, token_max_s: u64, view: Arc<RwLock<View>>, changed: Arc<watch::Sender<u64>>) -> Result<Arc<PgStore>> {
        let pg = pg_config(cfg)?;
        let tls = tls(cfg)?;
        let timeout = Duration::from_millis(cfg.timeout_ms);
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).thread_name("minter-pg").enable_all().build()?;
        let mgr = deadpool_postgres::Manager::from_config(
            pg.clone(),
            tls.clone(),
            deadpool_postgres::ManagerConfig { recycling_method: deadpool_postgres::RecyclingMethod::Fast },
        );
        let pool = deadpool_postgres::Pool::builder(mgr)
            .max_size(cfg.pool_size)
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .wait_timeout(Some(timeout))
            .create_timeout(Some(timeout))
            .recycle_timeout(Some(timeout))
            .build()
            .context("building the PostgreSQL pool")?;
        let epoch = rt.block_on(async {
            let (mut client, conn) = pg.connect(tls.clone()).await.context("connecting to PostgreSQL (store.postgres)")?;
            let driver = tokio::spawn(conn);
            migrate(&mut client).await?;
            let epoch: String = client.query_one("SELECT value FROM mandate_meta WHERE key = 'epoch'", &[]).await?.get(0);
            drop(client);
            let _ = driver.await;
            Ok::<_, anyhow::Error>(epoch)
        })?;
        let (issued, issued_rx) = tokio::sync::mpsc::channel(ISSUED_BATCH * ISSUED_WRITERS * 4);
        let issued_rx: IssuedQueue = Arc::new(tokio::sync::Mutex::new(issued_rx));
        let store = Arc::new(PgStore {
            pool,
            pg,
            tls,
            timeout,
            token_max_s,
            epoch,
            view,
            changed,
            sync_lock: tokio::sync::Mutex::new(()),
            wake: Arc::new(Notify::new()),
            rt: Mutex::new(None),
            up: AtomicBool::new(true),
            issued,
            blocked: Mutex::new(None),
        });
        rt.block_on(async {
            // Everything committed so far, before serving (a restart loses nothing).
            let loaded = store.sync_once().await?;
            if !loaded {
                bail!("PostgreSQL: could not load the revocations and tasks");
            }
            Ok::<_, anyhow::Error>(())
        })?;
        rt.spawn(listen_loop(store.pg.clone(), store.tls.clone(), store.wake.clone()));
        rt.spawn(follow_loop(Arc::downgrade(&store)));
        for _ in 0..ISSUED_WRITERS {
            rt.spawn(issued_writer(Arc::downgrade(&store), issued_rx.clone()));
        }
        if let Ok(mut g) = store.rt.lock() {
            *g = Some(rt);
        }
        Ok(store)
    }

    pub fn epoch(&self) -> &str {
        &self.epoch
    }

    /// Runs `f` on the store's runtime and waits (startup and tools only).
    pub fn block_on<T>(&self, f: impl std::future::Future<Output = T>) -> Result<T> {
        let g = self.rt.lock().map_err(|_| anyhow!("store runtime poisoned"))?;
        let rt = g.as_ref().ok_or_else(|| anyhow!("store closed"))?;
        Ok(rt.block_on(f))
    }

    fn mark(&self, ok: bool) {
        let was = self.up.swap(ok, Ordering::Relaxed);
        if was != ok {
            let msg = if ok { "postgres reachable again" } else { "postgres unreachable; writes answer 503 store_unavailable" };
            eprintln!("{}", serde_json::json!({"ts": crate::now(), "level": if ok { "info" } else { "error" }, "msg": msg}));
        }
    }

    /// A pooled connection within the timeout.
    async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        match tokio::time::timeout(self.timeout, self.pool.get()).await {
            Ok(Ok(c)) => Ok(c),
            Ok(Err(e)) => {
                self.mark(false);
                Err(err(e))
            }
            Err(_) => {
                self.mark(false);
                Err(StoreError::Failed("postgres: no connection within store.postgres.timeout_ms".into()))
            }
        }
    }

    /// Bounds `f` by the timeout; records reachability.
    async fn bounded<T>(&self, f: impl std::future::Future<Output = Result<T, tokio_postgres::Error>>) -> Result<T, StoreError> {
        let r = match tokio::time::timeout(self.timeout, f).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(err(e)),
            Err(_) => Err(StoreError::Failed("postgres: no answer within store.postgres.timeout_ms".into())),
        };
        self.mark(r.is_ok());
        r
    }

    /// Why this replica stopped following the feed, if it did.
    pub fn blocked(&self) -> Option<String> {
        self.blocked.lock().ok().and_then(|g| g.clone())
    }

    /// Stops following the feed: not ready, nothing minted (a stale view could mint for a
    /// task another replica ended). Logged once.
    fn block(&self, why: String) {
        let Ok(mut g) = self.blocked.lock() else { return };
        if g.is_none() {
            eprintln!("{}", serde_json::json!({"ts": crate::now(), "level": "error", "msg": format!("revocation feed blocked: {why}; this replica mints nothing until it is restarted")}));
            *g = Some(why);
        }
    }

    pub async fn ping(&self) -> Result<(), StoreError> {
        if let Some(why) = self.blocked() {
            return Err(StoreError::Failed(format!("revocation feed blocked: {why}")));
        }
        let c = self.client().await?;
        self.bounded(async { c.simple_query("SELECT 1").await.map(|_| ()) }).await
    }

    /// Records an issued token; returns once its commit is durable (the group commit of
    /// whatever other records queued meanwhile: one statement, one fsync).
    pub async fn record_issued(&self, r: IssuedRecord) -> Result<(), StoreError> {
        if let Some(why) = self.blocked() {
            return Err(StoreError::Failed(format!("revocation feed blocked: {why}")));
        }
        let (ack, done) = tokio::sync::oneshot::channel();
        let queued = tokio::time::timeout(self.timeout, self.issued.send((r, ack))).await;
        if !matches!(queued, Ok(Ok(()))) {
            return Err(StoreError::Failed("postgres: the issued-record queue is full or closed".into()));
        }
        // Bounded twice over: a connection within `timeout`, then the statement within it.
        match tokio::time::timeout(self.timeout * 2 + Duration::from_millis(100), done).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(StoreError::Failed("postgres: the issued-record writer stopped".into())),
            Err(_) => Err(StoreError::Failed("postgres: no commit within store.postgres.timeout_ms".into())),
        }
    }

    /// One group commit of issued-token records.
    async fn insert_issued(&self, batch: &[(IssuedRecord, IssuedAck)]) -> Result<(), StoreError> {
        let c = self.client().await?;
        let (mut jti, mut sub, mut task, mut aud, mut client, mut iat, mut exp) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (r, _) in batch {
            jti.push(r.jti.as_str());
            sub.push(r.sub.as_str());
            task.push(r.task.as_deref());
            aud.push(r.aud.as_str());
            client.push(r.client_id.as_str());
            iat.push(to_i64(r.iat));
            exp.push(to_i64(r.exp));
        }
        self.bounded(async {
            let stmt = c
                .prepare_cached(
                    "INSERT INTO issued (jti, sub, task, aud, client_id, iat, exp)
                     SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::bigint[], $7::bigint[])
                     ON CONFLICT (jti) DO NOTHING",
                )
                .await?;
            c.execute(&stmt, &[&jti, &sub, &task, &aud, &client, &iat, &exp]).await.map(|_| ())
        })
        .await
    }

    pub async fn create_task(&self, t: &Task) -> Result<(), StoreError> {
        let mut c = self.client().await?;
        let subjects = serde_json::to_string(&t.subjects).unwrap_or_else(|_| "[]".into());
        let intents = serde_json::to_string(&t.intents).unwrap_or_else(|_| "[]".into());
        self.bounded(async {
            let tx = c.transaction().await?;
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&FEED_LOCK]).await?;
            tx.execute(
                "INSERT INTO tasks (id, seq, subjects, intents, label, created_at, expires_at, ended_at, client_id)
                 VALUES ($1, nextval('tasks_seq'), $2, $3, $4, $5, $6, NULL, $7)",
                &[&t.id, &subjects, &intents, &t.label, &to_i64(t.created_at), &to_i64(t.expires_at), &t.client_id],
            )
            .await?;
            tx.execute("SELECT pg_notify($1, 'task')", &[&CHANNEL]).await?;
            tx.commit().await
        })
        .await
    }

    pub async fn fetch_task(&self, id: &str) -> Result<Option<Task>, StoreError> {
        let c = self.client().await?;
        let row = self.bounded(async { c.query_opt(&format!("SELECT {TASK_COLUMNS} FROM tasks WHERE id = $1"), &[&id]).await }).await?;
        Ok(row.as_ref().and_then(task_from_row))
    }

    pub async fn revoke(&self, req: &RevokeRequest, at: u64, client_id: &str) -> Result<RevokeOutcome, StoreError> {
        let mut c = self.client().await?;
        let token_max_s = self.token_max_s;
        self.bounded(async {
            let tx = c.transaction().await?;
            let o = insert_revocation(&tx, req, at, client_id, crate::now(), token_max_s, true).await?;
            tx.commit().await?;
            Ok(o)
        })
        .await
    }

    /// Catches up now (after this replica's own write); a failure is retried by the loop.
    pub async fn catch_up(&self) {
        let _ = self.sync_once().await;
    }

    /// Applies every task and revocation committed past what the view has, in seq order.
    /// Returns whether it reached the database.
    async fn sync_once(&self) -> Result<bool> {
        let _serial = self.sync_lock.lock().await;
        let Ok(c) = self.client().await else { return Ok(false) };
        let mut grew = false;
        if self.blocked().is_some() {
            return Ok(false);
        }
        loop {
            let (task_after, rev_after) = match self.view.read() {
                Ok(v) => (v.task_seq, v.applied_seq),
                Err(_) => return Ok(false),
            };
            let fetched = self
                .bounded(async {
                    // Read first: every revocation up to `last` is committed (seq order is
                    // commit order), so the page below must reach it.
                    let meta = c
                        .query_one("SELECT (SELECT value FROM mandate_meta WHERE key = 'epoch'), (SELECT COALESCE(MAX(seq), 0) FROM revocations)", &[])
                        .await?;
                    let tasks = c.query(&format!("SELECT {TASK_COLUMNS} FROM tasks WHERE seq > $1 ORDER BY seq LIMIT $2"), &[&task_after, &SYNC_PAGE]).await?;
                    let revs = revocations_after(&c, rev_after, SYNC_PAGE).await?;
                    Ok((meta.get::<_, Option<String>>(0), meta.get::<_, i64>(1), tasks, revs))
                })
                .await;
            let Ok((epoch, last, tasks, revs)) = fetched else { return Ok(false) };
            if epoch.as_deref() != Some(self.epoch.as_str()) {
                self.block("the database's feed epoch changed (a restored backup, or `migrate --new-epoch`)".into());
                return Ok(false);
            }
            if last < rev_after {
                self.block(format!("the revocation sequence went back ({last} < {rev_after} applied): a restored backup? run `migrate --new-epoch`"));
                return Ok(false);
            }
            let full = tasks.len() as i64 >= SYNC_PAGE || revs.len() as i64 >= SYNC_PAGE;
            let Ok(mut v) = self.view.write() else { return Ok(false) };
            for row in &tasks {
                let seq: i64 = row.get("seq");
                if seq <= v.task_seq {
                    continue;
                }
                if let Some(t) = task_from_row(row) {
                    // A task ended here before the catch-up keeps its end.
                    let ended = v.task(&t.id).and_then(|k| k.ended_at);
                    v.register(Task { ended_at: t.ended_at.or(ended), ..t });
                }
                v.task_seq = seq;
            }
            for r in revs {
                if r.seq <= v.applied_seq {
                    continue;
                }
                v.applied_seq = r.seq;
                if r.kind == Kind::Task && r.subject.is_none() {
                    v.end_task(&r.value, r.at);
                }
                v.add(r);
                grew = true;
            }
            let applied = v.applied_seq;
            if !full && applied < last {
                // Rows up to `last` exist but the page stopped below them: a kind this binary
                // does not know (a newer replica wrote it). Never skipped, never silent.
                drop(v);
                self.block(format!("revocation {} is of a kind this version does not know: upgrade this replica", applied + 1));
                return Ok(false);
            }
            v.synced_ms = crate::now_ms();
            drop(v);
            if !full {
                break;
            }
        }
        if grew {
            bump(&self.changed);
        }
        Ok(true)
    }

    /// Drops expired issued records and long-expired tasks (any replica may; idempotent).
    async fn purge(&self) {
        let Ok(c) = self.client().await else { return };
        let now = crate::now();
        let horizon = now.saturating_sub(TASK_RETENTION_S);
        let _ = self
            .bounded(async {
                c.execute("DELETE FROM issued WHERE exp < $1", &[&to_i64(now.saturating_sub(ISSUED_RETENTION_S))]).await?;
                c.execute("DELETE FROM tasks WHERE expires_at < $1", &[&to_i64(horizon)]).await
            })
            .await;
        if let Ok(mut v) = self.view.write() {
            v.retain_tasks(horizon);
        }
    }

    /// The signing keys, oldest first: (kid, d, created, not_before).
    pub async fn keys(&self) -> Result<Vec<(String, String, u64, Option<u64>)>, StoreError> {
        let c = self.client().await?;
        let rows = self.bounded(async { c.query("SELECT kid, d, created, not_before FROM signing_keys ORDER BY ord", &[]).await }).await?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1), to_u64(r.get(2)), r.get::<_, Option<i64>>(3).map(to_u64))).collect())
    }

    /// Under [`KEYS_LOCK`]: reads the keys, lets `change` edit them (`None`: nothing to do), and
    /// writes the result. Exactly one replica changes them at a time, each seeing the last
    /// change.
    pub async fn change_keys<T>(
        &self,
        change: impl FnOnce(Vec<(String, String, u64, Option<u64>)>) -> Option<(Vec<(String, String, u64, Option<u64>)>, T)>,
    ) -> Result<Option<T>, StoreError> {
        let mut c = self.client().await?;
        self.bounded(async {
            let tx = c.transaction().await?;
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&KEYS_LOCK]).await?;
            let rows = tx.query("SELECT kid, d, created, not_before FROM signing_keys ORDER BY ord", &[]).await?;
            let keys = rows.iter().map(|r| (r.get(0), r.get(1), to_u64(r.get(2)), r.get::<_, Option<i64>>(3).map(to_u64))).collect();
            let Some((new, out)) = change(keys) else { return Ok(None) };
            let keep: Vec<&str> = new.iter().map(|k| k.0.as_str()).collect();
            tx.execute("DELETE FROM signing_keys WHERE NOT (kid = ANY($1))", &[&keep]).await?;
            for (kid, d, created, not_before) in &new {
                tx.execute(
                    "INSERT INTO signing_keys (kid, d, created, not_before) VALUES ($1, $2, $3, $4) ON CONFLICT (kid) DO NOTHING",
                    &[kid, d, &to_i64(*created), &not_before.map(to_i64)],
                )
                .await?;
            }
            tx.commit().await?;
            Ok(Some(out))
        })
        .await
    }

    /// Stops following the database. Blocking.
    pub fn close(&self) {
        self.pool.close();
        let rt = self.rt.lock().ok().and_then(|mut g| g.take());
        if let Some(rt) = rt {
            rt.shutdown_timeout(Duration::from_secs(1));
        }
    }
}

/// Holds a `LISTEN mandate_feed` connection open (reconnecting), and wakes the follower on
/// every notification (and after every reconnect: notifications sent meanwhile are lost).
async fn listen_loop(pg: tokio_postgres::Config, tls: tokio_postgres_rustls::MakeRustlsConnect, wake: Arc<Notify>) {
    let mut backoff = Duration::from_millis(100);
    loop {
        if let Ok((client, mut conn)) = pg.connect(tls.clone()).await {
            let notify = wake.clone();
            let driver = tokio::spawn(async move {
                while let Some(m) = std::future::poll_fn(|cx| conn.poll_message(cx)).await {
                    match m {
                        Ok(tokio_postgres::AsyncMessage::Notification(_)) => notify.notify_one(),
                        Ok(_) => {}
                        Err(_) => break,
                    }
                }
            });
            if client.batch_execute(&format!("LISTEN {CHANNEL}")).await.is_ok() {
                backoff = Duration::from_millis(100);
                wake.notify_one();
                let _ = driver.await;
            } else {
                driver.abort();
            }
            drop(client);
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

/// Takes what queued for the issued table (up to [`ISSUED_BATCH`]) and commits it at once;
/// every record's caller gets the commit's outcome.
async fn issued_writer(store: std::sync::Weak<PgStore>, queue: IssuedQueue) {
    loop {
        let mut batch = Vec::new();
        {
            let mut rx = queue.lock().await;
            match rx.recv().await {
                Some(first) => batch.push(first),
                None => return,
            }
            while batch.len() < ISSUED_BATCH {
                match rx.try_recv() {
                    Ok(next) => batch.push(next),
                    Err(_) => break,
                }
            }
        }
        let Some(s) = store.upgrade() else { return };
        let r = s.insert_issued(&batch).await;
        drop(s);
        for (_, ack) in batch {
            let _ = ack.send(r.clone());
        }
    }
}

/// Catches up on every wake-up and every [`SYNC_EVERY`]; purges once a minute.
async fn follow_loop(store: std::sync::Weak<PgStore>) {
    let Some(wake) = store.upgrade().map(|s| s.wake.clone()) else { return };
    let mut last_purge = 0;
    loop {
        tokio::select! {
            _ = wake.notified() => {}
            _ = tokio::time::sleep(SYNC_EVERY) => {}
        }
        let Some(s) = store.upgrade() else { return };
        let _ = s.sync_once().await;
        let now = crate::now();
        if now >= last_purge + 60 {
            last_purge = now;
            s.purge().await;
        }
    }
}
