//! Durable state in SQLite (WAL): registered tasks and revocations (committed
//! with `synchronous=FULL`) and the record of issued tokens (`NORMAL`).
//!
//! One dedicated writer thread owns the connection and group-commits: each
//! transaction takes everything queued while the previous one committed.
//! Every caller waits for the commit of its own command: an issued token is
//! answered only once its record is committed (a token that could not be
//! recorded is never handed out), and a revocation or a task is acknowledged
//! only once it is durable. Revocations go through the same queue (so they are
//! ordered after every record queued before them), and the in-memory view that
//! the hot path checks is updated only after the commit. A failed commit (the
//! disk is full, an I/O error) fails every command of its batch: nothing of it
//! is acknowledged, and the callers answer 503. A second thread checkpoints the WAL (its
//! fsync stays off the commit path).
//! Startup loads every revocation and registered task back into memory: a
//! restart loses nothing. Each open picks a new random feed `epoch`, so a
//! restored database (or any restart) makes every proxy start over from a
//! snapshot instead of trusting a cursor from another history.
//!
//! With `store.postgres` the same [`Store`] fronts a database shared by every replica
//! ([`crate::pgstore`]): writes go to PostgreSQL, and the in-memory view (the hot path and the
//! feed) follows the database's revocations and tasks, woken by `LISTEN/NOTIFY`. The feed
//! epoch then lives in the database, so every replica serves the same feed.
//!
//! Either backend signals every change of the feed ([`Store::subscribe`]): the long poll of
//! `GET /revocations?wait_ms=` answers as soon as an entry past its cursor is visible.

use anyhow::{anyhow, Context, Result};
use rusqlite::{params, Connection};
use serde::Serialize;
use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::mpsc;
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;

pub const DB_FILE: &str = "minter.sqlite3";
const BATCH_MAX: usize = 4096;
/// SQLite's own default (and largest) `max_page_count`.
pub const SQLITE_MAX_PAGES: u64 = 4_294_967_294;
/// Issued-token records are kept this long past their expiry.
const ISSUED_RETENTION_S: u64 = 3600;
/// Registered tasks are kept (and answered by `GET /tasks/{id}`) this long past their expiry.
pub const TASK_RETENTION_S: u64 = 7 * 86400;
/// Largest feed page body, bytes, whatever the client asks for.
pub const FEED_MAX_BYTES: usize = 196_608;
/// Smallest `max_bytes` a client may ask for.
pub const FEED_MIN_BYTES: usize = 4096;
/// Longest long poll (`wait_ms`) the feed holds a request, whatever the client asks for; every
/// page offers it (`wait_max_ms`), so a client knows it may long-poll.
pub const FEED_MAX_WAIT_MS: u64 = 25_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Task,
    Jti,
    Subject,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Task => "task",
            Kind::Jti => "jti",
            Kind::Subject => "subject",
        }
    }
    pub fn parse(s: &str) -> Option<Kind> {
        match s {
            "task" => Some(Kind::Task),
            "jti" => Some(Kind::Jti),
            "subject" => Some(Kind::Subject),
            _ => None,
        }
    }
}

/// One entry of the revocation feed.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Revocation {
    pub seq: i64,
    pub kind: Kind,
    pub value: String,
    /// Task entries scoped to one subject (ad-hoc task names are not globally unique).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    pub at: u64,
    /// After this (unix s) no credential the entry covers can be live: the feed stops listing it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub until: Option<u64>,
}

impl Revocation {
    /// Whether the values pass today's validation (entries recorded by older
    /// versions may not; they still block, but are not published).
    fn publishable(&self) -> bool {
        let value_ok = match self.kind {
            Kind::Task => crate::values::task(&self.value).is_ok(),
            Kind::Jti => crate::values::jti(&self.value).is_ok(),
            Kind::Subject => crate::values::subject(&self.value).is_ok(),
        };
        value_ok && self.subject.as_deref().is_none_or(|s| crate::values::subject(s).is_ok())
    }
}

/// What to revoke.
#[derive(Debug, Clone)]
pub struct RevokeRequest {
    pub kind: Kind,
    pub value: String,
    /// With `kind = task`: only for this subject.
    pub subject: Option<String>,
}

/// A task registered with `POST /tasks`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Task {
    pub id: String,
    pub subjects: Vec<String>,
    /// Empty: any intent.
    pub intents: Vec<String>,
    pub label: Option<String>,
    pub created_at: u64,
    pub expires_at: u64,
    pub ended_at: Option<u64>,
    pub client_id: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskState {
    Active,
    Ended,
    Expired,
}

impl TaskState {
    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::Active => "active",
            TaskState::Ended => "ended",
            TaskState::Expired => "expired",
        }
    }
}

impl Task {
    pub fn state(&self, now: u64) -> TaskState {
        if self.ended_at.is_some() {
            TaskState::Ended
        } else if self.expires_at <= now {
            TaskState::Expired
        } else {
            TaskState::Active
        }
    }

    /// The wire form (`POST /tasks`, `GET /tasks/{id}`).
    pub fn to_json(&self, now: u64) -> serde_json::Value {
        let mut v = serde_json::json!({
            "task": self.id,
            "subjects": self.subjects,
            "intents": self.intents,
            "created_at": self.created_at,
            "expires_at": self.expires_at,
            "state": self.state(now).as_str(),
        });
        if let (Some(l), Some(o)) = (&self.label, v.as_object_mut()) {
            o.insert("label".into(), l.clone().into());
        }
        v
    }
}

#[derive(Debug, Clone)]
pub struct IssuedRecord {
    pub jti: String,
    pub sub: String,
    pub task: Option<String>,
    pub aud: String,
    pub client_id: String,
    pub iat: u64,
    pub exp: u64,
}

/// What a revocation did: the entry (new, or the existing one) and the
/// still-live tokens it covers.
#[derive(Debug, Clone, Serialize)]
pub struct RevokeOutcome {
    #[serde(flatten)]
    pub revocation: Revocation,
    /// False when the same revocation already existed.
    pub created: bool,
    /// jtis of unexpired tokens issued for this task / subject (or the jti itself).
    pub jtis: Vec<String>,
}

/// Why the store could not record something. Nothing of the failed batch was committed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreError {
    /// The database cannot grow: the disk (or `store.max_pages`) is full.
    Full,
    /// Any other storage failure (I/O error, the writer stopped).
    Failed(String),
}

impl StoreError {
    /// The stable reason code answered with the 503 (`mandate_reason`).
    pub fn reason(&self) -> &'static str {
        match self {
            StoreError::Full => "store_full",
            StoreError::Failed(_) => "store_unavailable",
        }
    }

    fn from_sqlite(e: &rusqlite::Error) -> StoreError {
        match e.sqlite_error_code() {
            Some(rusqlite::ErrorCode::DiskFull) => StoreError::Full,
            _ => StoreError::Failed(e.to_string()),
        }
    }
}

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreError::Full => f.write_str("the database is full"),
            StoreError::Failed(e) => write!(f, "storage error: {e}"),
        }
    }
}

impl std::error::Error for StoreError {}

type Reply = tokio::sync::oneshot::Sender<Result<RevokeOutcome, StoreError>>;
type Ack = tokio::sync::oneshot::Sender<Result<(), StoreError>>;

enum Cmd {
    Issued { rec: IssuedRecord, reply: Ack },
    Revoke { req: RevokeRequest, at: u64, client_id: String, reply: Reply },
    CreateTask { task: Task, reply: Ack },
    Flush(tokio::sync::oneshot::Sender<()>),
    /// Readiness: answered with the outcome of the writer's last commit.
    Probe(Ack),
    /// `PRAGMA max_page_count` (fault drills: a full disk, then space again).
    MaxPages { pages: u64, reply: Ack },
}

#[derive(Default)]
pub(crate) struct View {
    /// Tasks revoked for every subject.
    tasks: HashSet<String>,
    /// Tasks revoked for some subjects: task → subjects.
    task_subjects: HashMap<String, HashSet<String>>,
    jtis: HashSet<String>,
    subjects: HashSet<String>,
    /// Publishable entries, by seq.
    feed: Vec<Revocation>,
    registered: HashMap<String, Arc<Task>>,
    count: usize,
    /// PostgreSQL: the highest revocation seq applied (every lower committed one is too).
    pub(crate) applied_seq: i64,
    /// PostgreSQL: the highest task seq applied.
    pub(crate) task_seq: i64,
    /// Unix ms of the last successful catch-up with the shared store (0: never).
    pub(crate) synced_ms: u64,
}

impl View {
    fn set(&self, kind: Kind) -> &HashSet<String> {
        match kind {
            Kind::Task => &self.tasks,
            Kind::Jti => &self.jtis,
            Kind::Subject => &self.subjects,
        }
    }
    /// Blocks what `r` covers on the hot path, without publishing it (PostgreSQL: a replica's
    /// own revocation, before the catch-up puts it in the feed in seq order).
    pub(crate) fn block(&mut self, r: &Revocation) {
        match (r.kind, &r.subject) {
            (Kind::Task, Some(sub)) => {
                self.task_subjects.entry(r.value.clone()).or_default().insert(sub.clone());
            }
            (Kind::Task, None) => {
                self.tasks.insert(r.value.clone());
            }
            (Kind::Jti, _) => {
                self.jtis.insert(r.value.clone());
            }
            (Kind::Subject, _) => {
                self.subjects.insert(r.value.clone());
            }
        }
    }

    /// Marks a registered task ended at `at` (a task revoked for every subject).
    pub(crate) fn end_task(&mut self, id: &str, at: u64) {
        if let Some(t) = self.registered.get_mut(id) {
            if t.ended_at.is_none() {
                let mut ended = (**t).clone();
                ended.ended_at = Some(at);
                *t = Arc::new(ended);
            }
        }
    }

    pub(crate) fn task(&self, id: &str) -> Option<Arc<Task>> {
        self.registered.get(id).cloned()
    }

    pub(crate) fn retain_tasks(&mut self, horizon: u64) {
        self.registered.retain(|_, t| t.expires_at >= horizon);
    }

    pub(crate) fn register(&mut self, t: Task) {
        self.registered.insert(t.id.clone(), Arc::new(t));
    }

    pub(crate) fn add(&mut self, r: Revocation) {
        self.count += 1;
        self.block(&r);
        if r.publishable() {
            self.feed.push(r);
        }
    }
}

/// One page of the revocation feed.
#[derive(Debug, Clone)]
pub struct FeedPage {
    pub epoch: String,
    pub cursor: i64,
    pub reset: bool,
    pub more: bool,
    pub revocations: Vec<Revocation>,
    /// The serialised page (what `GET /revocations` answers).
    pub body: String,
}

pub struct Store {
    view: Arc<RwLock<View>>,
    /// Bumped whenever the feed may have grown (long polls wait on it).
    changed: Arc<tokio::sync::watch::Sender<u64>>,
    epoch: String,
    backend: Backend,
}

enum Backend {
    Sqlite { tx: Mutex<Option<mpsc::Sender<Cmd>>>, writer: Mutex<Option<JoinHandle<()>>> },
    Postgres(Arc<crate::pgstore::PgStore>),
}

/// Tells long polls that the feed may have grown.
pub(crate) fn bump(changed: &tokio::sync::watch::Sender<u64>) {
    changed.send_modify(|n| *n = n.wrapping_add(1));
}

fn open_db(path: &Path, max_pages: Option<u64>) -> Result<Connection> {
    let mut conn = Connection::open(path).with_context(|| format!("opening {}", path.display()))?;
    conn.busy_timeout(Duration::from_secs(5))?;
    // Durability. WAL: a commit appends to the log, and readers (a restarted minter, the
    // tests) never see half a transaction. `synchronous` is set per commit by `process`:
    // FULL (the WAL is fsynced before the commit returns) for revocations and tasks, which
    // must survive power loss once acknowledged; NORMAL for batches of issued-token records
    // only, which are in the WAL (the OS page cache) when the commit returns, so they
    // survive a crash or kill -9 of the minter, the promise made for them, without an fsync
    // per batch; a power loss can roll back the last such batches (their tokens live at
    // most `ttl.max_s`, and a task's revocation matches them by their `task` claim).
    // Both are set here so that the schema and the migration are committed FULL.
    let mode: String = conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        anyhow::bail!("{}: journal_mode is {mode}, not wal", path.display());
    }
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS issued (
            jti TEXT PRIMARY KEY,
            sub TEXT NOT NULL,
            task TEXT,
            aud TEXT NOT NULL,
            client_id TEXT NOT NULL,
            iat INTEGER NOT NULL,
            exp INTEGER NOT NULL);
         CREATE INDEX IF NOT EXISTS issued_task ON issued(task);
         CREATE INDEX IF NOT EXISTS issued_sub ON issued(sub);
         CREATE INDEX IF NOT EXISTS issued_exp ON issued(exp);
         CREATE TABLE IF NOT EXISTS tasks (
            id TEXT PRIMARY KEY,
            subjects TEXT NOT NULL,
            intents TEXT NOT NULL,
            label TEXT,
            created_at INTEGER NOT NULL,
            expires_at INTEGER NOT NULL,
            ended_at INTEGER,
            client_id TEXT NOT NULL);",
    )?;
    migrate_revocations(&mut conn)?;
    // After the schema: a cap below the current size means "no growth from here".
    if let Some(pages) = max_pages {
        conn.pragma_update(None, "max_page_count", pages)?;
    }
    Ok(conn)
}

const REVOCATIONS_V2: &str = "CREATE TABLE revocations (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    value TEXT NOT NULL,
    subject TEXT NOT NULL DEFAULT '',
    at INTEGER NOT NULL,
    until INTEGER,
    client_id TEXT NOT NULL,
    UNIQUE(kind, value, subject))";

/// Creates the revocations table, or rebuilds one from before subject-scoped
/// entries (UNIQUE(kind, value), no `subject`/`until`), keeping every seq.
fn migrate_revocations(conn: &mut Connection) -> Result<()> {
    let columns: Vec<String> = {
        let mut stmt = conn.prepare("PRAGMA table_info(revocations)")?;
        let rows = stmt.query_map([], |r| r.get::<_, String>(1))?;
        rows.collect::<rusqlite::Result<_>>()?
    };
    if columns.is_empty() {
        conn.execute_batch(REVOCATIONS_V2)?;
    } else if !columns.iter().any(|c| c == "subject") {
        let tx = conn.transaction()?;
        tx.execute_batch(&format!(
            "ALTER TABLE revocations RENAME TO revocations_v1;
             {REVOCATIONS_V2};
             INSERT INTO revocations (seq, kind, value, subject, at, until, client_id)
                SELECT seq, kind, value, '', at,
                       CASE WHEN kind = 'jti' THEN (SELECT exp FROM issued WHERE issued.jti = revocations_v1.value) END,
                       client_id
                FROM revocations_v1 ORDER BY seq;
             DROP TABLE revocations_v1;"
        ))?;
        tx.commit()?;
    }
    Ok(())
}

fn load_tasks(conn: &Connection, now: u64) -> Result<HashMap<String, Arc<Task>>> {
    let mut out = HashMap::new();
    let mut stmt = conn.prepare(
        "SELECT id, subjects, intents, label, created_at, expires_at, ended_at, client_id FROM tasks WHERE expires_at >= ?1",
    )?;
    let rows = stmt.query_map(params![now.saturating_sub(TASK_RETENTION_S) as i64], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, String>(2)?,
            r.get::<_, Option<String>>(3)?,
            r.get::<_, i64>(4)?,
            r.get::<_, i64>(5)?,
            r.get::<_, Option<i64>>(6)?,
            r.get::<_, String>(7)?,
        ))
    })?;
    for row in rows {
        let (id, subjects, intents, label, created_at, expires_at, ended_at, client_id) = row?;
        let subjects: Vec<String> = serde_json::from_str(&subjects).with_context(|| format!("task {id}: subjects"))?;
        let intents: Vec<String> = serde_json::from_str(&intents).with_context(|| format!("task {id}: intents"))?;
        let task = Task {
            id: id.clone(),
            subjects,
            intents,
            label,
            created_at: u64::try_from(created_at).unwrap_or(0),
            expires_at: u64::try_from(expires_at).unwrap_or(0),
            ended_at: ended_at.map(|e| u64::try_from(e).unwrap_or(0)),
            client_id,
        };
        out.insert(id, Arc::new(task));
    }
    Ok(out)
}

impl Store {
    /// Opens (creating or migrating) the database in `state_dir`.
    /// `token_max_s` (`ttl.max_s`) bounds how long a task's credentials can
    /// outlive the task: a task entry's `until` is the task's expiry plus it.
    /// `max_pages`: `store.max_pages` (fault drills only), a cap on the database's size.
    pub fn open(state_dir: &Path, token_max_s: u64, max_pages: Option<u64>) -> Result<Store> {
        std::fs::create_dir_all(state_dir)?;
        let conn = open_db(&state_dir.join(DB_FILE), max_pages)?;
        let mut view = View::default();
        {
            let mut stmt = conn.prepare("SELECT seq, kind, value, subject, at, until FROM revocations ORDER BY seq")?;
            let rows = stmt.query_map([], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, i64>(4)?,
                    r.get::<_, Option<i64>>(5)?,
                ))
            })?;
            for row in rows {
                let (seq, kind, value, subject, at, until) = row?;
                let kind = Kind::parse(&kind).ok_or_else(|| anyhow!("unknown revocation kind {kind:?} in database"))?;
                view.add(Revocation {
                    seq,
                    kind,
                    value,
                    subject: (!subject.is_empty()).then_some(subject),
                    at: u64::try_from(at).unwrap_or(0),
                    until: until.map(|u| u64::try_from(u).unwrap_or(0)),
                });
            }
        }
        view.registered = load_tasks(&conn, crate::now())?;
        let view = Arc::new(RwLock::new(view));
        let changed = Arc::new(tokio::sync::watch::Sender::new(0u64));
        let (tx, rx) = mpsc::channel();
        let writer_view = view.clone();
        let writer_changed = changed.clone();
        let writer = std::thread::Builder::new()
            .name("minter-sqlite".into())
            .spawn(move || writer_loop(conn, rx, writer_view, writer_changed, token_max_s))
            .context("starting the SQLite writer")?;
        Ok(Store {
            view,
            changed,
            epoch: crate::exchange::random_id(),
            backend: Backend::Sqlite { tx: Mutex::new(Some(tx)), writer: Mutex::new(Some(writer)) },
        })
    }

    /// The store the configuration names: PostgreSQL with `store.postgres` (migrating it under
    /// an advisory lock, loading its state, following it), else SQLite in `state_dir`.
    pub fn open_config(config: &crate::config::MinterConfig) -> Result<Store> {
        match &config.store.postgres {
            None => Store::open(&config.state_dir, config.longest_token_s(), config.store.max_pages),
            Some(pg) => {
                let view = Arc::new(RwLock::new(View::default()));
                let changed = Arc::new(tokio::sync::watch::Sender::new(0u64));
                let store = crate::pgstore::PgStore::open(pg, config.longest_token_s(), view.clone(), changed.clone())?;
                let epoch = store.epoch().to_string();
                Ok(Store { view, changed, epoch, backend: Backend::Postgres(store) })
            }
        }
    }

    /// The PostgreSQL backend, if that is the store.
    pub fn postgres(&self) -> Option<&Arc<crate::pgstore::PgStore>> {
        match &self.backend {
            Backend::Postgres(p) => Some(p),
            Backend::Sqlite { .. } => None,
        }
    }

    /// `sqlite` or `postgres`.
    pub fn backend_name(&self) -> &'static str {
        match &self.backend {
            Backend::Postgres(_) => "postgres",
            Backend::Sqlite { .. } => "sqlite",
        }
    }

    /// This store's feed epoch (SQLite: new at every open; PostgreSQL: the database's).
    pub fn epoch(&self) -> &str {
        &self.epoch
    }

    /// A receiver woken whenever the feed may have grown. Subscribe before reading the feed:
    /// a change after that is never missed.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Seconds since this replica last caught up with the shared store (0 for SQLite, whose
    /// view is the store).
    pub fn feed_lag_s(&self) -> u64 {
        match &self.backend {
            Backend::Sqlite { .. } => 0,
            Backend::Postgres(_) => {
                let synced = self.view.read().map_or(0, |v| v.synced_ms);
                let now_ms = crate::now_ms();
                now_ms.saturating_sub(synced) / 1000
            }
        }
    }

    /// Whether the store takes writes now: SQLite's writer commits (an empty batch), PostgreSQL
    /// answers within `store.postgres.timeout_ms`.
    pub async fn ready(&self) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Postgres(p) => p.ping().await,
            Backend::Sqlite { .. } => {
                let (reply, rx) = tokio::sync::oneshot::channel();
                if !self.send(Cmd::Probe(reply)) {
                    return Err(StoreError::Failed("store closed".into()));
                }
                match tokio::time::timeout(Duration::from_secs(2), rx).await {
                    Ok(Ok(r)) => r,
                    Ok(Err(_)) => Err(StoreError::Failed("store writer stopped".into())),
                    Err(_) => Err(StoreError::Failed("store writer busy for over 2 s".into())),
                }
            }
        }
    }

    fn send(&self, cmd: Cmd) -> bool {
        let Backend::Sqlite { tx, .. } = &self.backend else { return false };
        match tx.lock() {
            Ok(g) => g.as_ref().is_some_and(|tx| tx.send(cmd).is_ok()),
            Err(_) => false,
        }
    }

    /// Revoked for everyone (a task: globally; a jti; a subject).
    pub fn is_revoked(&self, kind: Kind, value: &str) -> bool {
        match self.view.read() {
            Ok(v) => v.set(kind).contains(value),
            Err(_) => true, // poisoned: fail closed
        }
    }

    /// Whether `task` is revoked globally or for `subject`.
    pub fn task_revoked_for(&self, task: &str, subject: &str) -> bool {
        match self.view.read() {
            Ok(v) => v.tasks.contains(task) || v.task_subjects.get(task).is_some_and(|s| s.contains(subject)),
            Err(_) => true,
        }
    }

    /// A registered task.
    pub fn task(&self, id: &str) -> Option<Arc<Task>> {
        self.view.read().ok()?.registered.get(id).cloned()
    }

    /// A registered task, asking the shared store when this replica has not seen it yet (a
    /// task created on another replica a moment ago). SQLite: the view is the store.
    pub async fn task_fresh(&self, id: &str) -> Option<Arc<Task>> {
        if let Some(t) = self.task(id) {
            return Some(t);
        }
        match &self.backend {
            Backend::Sqlite { .. } => None,
            Backend::Postgres(p) => {
                let t = p.fetch_task(id).await.ok()??;
                let mut v = self.view.write().ok()?;
                let t = v.registered.entry(t.id.clone()).or_insert_with(|| Arc::new(t)).clone();
                Some(t)
            }
        }
    }

    /// Sends a command and waits for the writer's answer.
    async fn ask<T>(&self, cmd: impl FnOnce(tokio::sync::oneshot::Sender<Result<T, StoreError>>) -> Cmd) -> Result<T, StoreError> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        if !self.send(cmd(reply)) {
            return Err(StoreError::Failed("store closed".into()));
        }
        rx.await.map_err(|_| StoreError::Failed("store writer stopped".into()))?
    }

    /// Records a new task durably (FULL), then makes it visible.
    pub async fn create_task(&self, task: Task) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Sqlite { .. } => self.ask(|reply| Cmd::CreateTask { task, reply }).await,
            Backend::Postgres(p) => {
                p.create_task(&task).await?;
                if let Ok(mut v) = self.view.write() {
                    v.register(task);
                }
                Ok(())
            }
        }
    }

    /// Records an issued token and waits for the commit: the token may be handed out only
    /// after this returns `Ok`.
    pub async fn record_issued(&self, rec: IssuedRecord) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Sqlite { .. } => self.ask(|reply| Cmd::Issued { rec, reply }).await,
            Backend::Postgres(p) => p.record_issued(rec).await,
        }
    }

    /// Records a revocation durably (FULL), then makes it visible to the hot path.
    /// A registered task revoked without a subject is ended (its state becomes `ended`).
    pub async fn revoke(&self, req: RevokeRequest, client_id: &str) -> Result<RevokeOutcome, StoreError> {
        let client_id = client_id.to_string();
        match &self.backend {
            Backend::Sqlite { .. } => self.ask(|reply| Cmd::Revoke { req, at: crate::now(), client_id, reply }).await,
            Backend::Postgres(p) => {
                let outcome = p.revoke(&req, crate::now(), &client_id).await?;
                // Refused here at once; published by the catch-up, in seq order (never ahead of
                // an entry committed earlier by another replica).
                if let Ok(mut v) = self.view.write() {
                    v.block(&outcome.revocation);
                    if outcome.revocation.kind == Kind::Task && outcome.revocation.subject.is_none() {
                        v.end_task(&outcome.revocation.value, outcome.revocation.at);
                    }
                }
                p.catch_up().await;
                Ok(outcome)
            }
        }
    }

    /// Sets `PRAGMA max_page_count` on the writer's connection (fault drills: the disk fills,
    /// then space returns). SQLite never sets it below the database's current size. Blocking:
    /// not from inside an async task.
    pub fn set_max_pages(&self, pages: u64) -> Result<(), StoreError> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        if !self.send(Cmd::MaxPages { pages, reply }) {
            return Err(StoreError::Failed("store closed".into()));
        }
        rx.blocking_recv().map_err(|_| StoreError::Failed("store writer stopped".into()))?
    }

    /// Waits until everything queued so far is committed.
    pub async fn flush(&self) -> Result<()> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        if !self.send(Cmd::Flush(reply)) {
            return Err(anyhow!("store closed"));
        }
        rx.await.map_err(|_| anyhow!("store writer stopped"))
    }

    /// One page of the feed. `epoch` absent or not this store's: from the
    /// beginning, `reset: true`. Entries past their `until` are skipped (the
    /// cursor still moves past them). At most `limit` entries and a body of at
    /// most `max_bytes` (capped at `FEED_MAX_BYTES`).
    pub fn feed(&self, since: i64, epoch: Option<&str>, limit: usize, max_bytes: usize, now: u64) -> FeedPage {
        let reset = epoch != Some(self.epoch.as_str());
        let since = if reset { 0 } else { since };
        let budget = max_bytes.min(FEED_MAX_BYTES);
        let epoch_json = serde_json::Value::String(self.epoch.clone()).to_string();
        // Upper bound of the envelope: the widest cursor and booleans.
        let envelope =
            format!(r#"{{"epoch":{epoch_json},"cursor":{},"reset":false,"more":false,"wait_max_ms":{FEED_MAX_WAIT_MS},"revocations":[]}}"#, i64::MIN)
                .len();
        let mut cursor = since;
        let mut more = false;
        let mut parts: Vec<String> = Vec::new();
        let mut list = Vec::new();
        let mut size = envelope;
        if let Ok(v) = self.view.read() {
            let start = v.feed.partition_point(|r| r.seq <= since);
            for r in v.feed.get(start..).unwrap_or(&[]) {
                if r.until.is_some_and(|u| u <= now) {
                    cursor = r.seq;
                    continue;
                }
                if parts.len() >= limit {
                    more = true;
                    break;
                }
                let Ok(s) = serde_json::to_string(r) else { continue };
                let add = s.len() + usize::from(!parts.is_empty());
                // Value limits keep every entry far below the smallest budget;
                // an empty page would never advance, so one entry always goes.
                if size + add > budget && !parts.is_empty() {
                    more = true;
                    break;
                }
                size += add;
                cursor = r.seq;
                parts.push(s);
                list.push(r.clone());
            }
        }
        let body = format!(
            r#"{{"epoch":{epoch_json},"cursor":{cursor},"reset":{reset},"more":{more},"wait_max_ms":{FEED_MAX_WAIT_MS},"revocations":[{}]}}"#,
            parts.join(",")
        );
        FeedPage { epoch: self.epoch.clone(), cursor, reset, more, revocations: list, body }
    }

    pub fn revocation_count(&self) -> usize {
        self.view.read().map_or(0, |v| v.count)
    }

    /// Commits what is queued and stops the writer (PostgreSQL: stops following the
    /// database). Blocking.
    pub fn close(&self) {
        match &self.backend {
            Backend::Sqlite { tx, writer } => {
                if let Ok(mut g) = tx.lock() {
                    g.take();
                }
                let handle = writer.lock().ok().and_then(|mut g| g.take());
                if let Some(h) = handle {
                    let _ = h.join();
                }
            }
            Backend::Postgres(p) => p.close(),
        }
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        self.close();
    }
}

/// How often the checkpointer copies the WAL back into the database.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(250);

/// Checkpoints the WAL on its own connection until `stop` disconnects. A checkpoint fsyncs
/// the database; run by the writer (SQLite's auto-checkpoint, every 1000 pages) it would
/// stall every exchange waiting for a commit behind it.
fn checkpoint_loop(path: std::path::PathBuf, stop: mpsc::Receiver<()>) {
    let Ok(conn) = Connection::open(&path) else { return };
    let _ = conn.busy_timeout(Duration::from_secs(5));
    loop {
        let last = matches!(stop.recv_timeout(CHECKPOINT_EVERY), Err(mpsc::RecvTimeoutError::Disconnected));
        let _ = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()));
        if last {
            return;
        }
    }
}

fn writer_loop(mut conn: Connection, rx: mpsc::Receiver<Cmd>, view: Arc<RwLock<View>>, changed: Arc<tokio::sync::watch::Sender<u64>>, token_max_s: u64) {
    // Not niced: every exchange waits for this thread's commit. Checkpoints run on their
    // own thread (`checkpoint_loop`), off the commit path.
    let checkpointer = conn.path().map(std::path::PathBuf::from).and_then(|path| {
        let (stop, stopped) = mpsc::channel::<()>();
        let _ = conn.pragma_update(None, "wal_autocheckpoint", 0);
        match std::thread::Builder::new().name("minter-sqlite-ckpt".into()).spawn(move || checkpoint_loop(path, stopped)) {
            Ok(h) => Some((stop, h)),
            Err(_) => {
                let _ = conn.pragma_update(None, "wal_autocheckpoint", 1000);
                None
            }
        }
    });
    let mut last_purge = 0u64;
    let mut failing = false;
    loop {
        let first = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(c) => Some(c),
            Err(mpsc::RecvTimeoutError::Timeout) => None,
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        };
        // Group commit: whatever queued up during the previous commit shares this one.
        let mut batch: Vec<Cmd> = first.into_iter().collect();
        while batch.len() < BATCH_MAX {
            match rx.try_recv() {
                Ok(c) => batch.push(c),
                Err(_) => break,
            }
        }
        let now = crate::now();
        if now >= last_purge + 60 {
            last_purge = now;
            let _ = conn.execute("DELETE FROM issued WHERE exp < ?1", params![now.saturating_sub(ISSUED_RETENTION_S) as i64]);
            let horizon = now.saturating_sub(TASK_RETENTION_S);
            if conn.execute("DELETE FROM tasks WHERE expires_at < ?1", params![horizon as i64]).is_ok() {
                if let Ok(mut v) = view.write() {
                    v.registered.retain(|_, t| t.expires_at >= horizon);
                }
            }
        }
        if batch.is_empty() {
            continue;
        }
        process(&mut conn, batch, &view, &changed, now, token_max_s, &mut failing);
    }
    if let Some((stop, h)) = checkpointer {
        drop(stop);
        let _ = h.join();
    }
}

/// What a committed batch changes in the in-memory view.
#[derive(Default)]
struct Changes {
    added: Vec<Revocation>,
    created: Vec<Task>,
    ended: Vec<(String, u64)>,
}

fn process(
    conn: &mut Connection,
    batch: Vec<Cmd>,
    view: &RwLock<View>,
    changed: &tokio::sync::watch::Sender<u64>,
    now: u64,
    token_max_s: u64,
    failing: &mut bool,
) {
    let mut issued: Vec<(IssuedRecord, Ack)> = Vec::new();
    let mut revokes: Vec<(RevokeRequest, u64, String, Reply)> = Vec::new();
    let mut tasks: Vec<(Task, Ack)> = Vec::new();
    let mut flushes = Vec::new();
    let mut probes = Vec::new();
    // Commands in queue order. Issued records, revocations and tasks are independent rows, so
    // one transaction applies them by kind; a revocation still covers every record queued
    // before it, since they are in the same (or an earlier) commit.
    for cmd in batch {
        match cmd {
            Cmd::Issued { rec, reply } => issued.push((rec, reply)),
            Cmd::Revoke { req, at, client_id, reply } => revokes.push((req, at, client_id, reply)),
            Cmd::CreateTask { task, reply } => tasks.push((task, reply)),
            Cmd::Flush(reply) => flushes.push(reply),
            Cmd::Probe(reply) => probes.push(reply),
            Cmd::MaxPages { pages, reply } => {
                let r = conn.pragma_update(None, "max_page_count", pages).map_err(|e| StoreError::from_sqlite(&e));
                let _ = reply.send(r);
            }
        }
    }
    // Revocations and tasks must survive power loss once acknowledged: fsync the WAL on
    // their commits (FULL). Batches of issued-token records only: NORMAL (see `open_db`).
    let durable = !revokes.is_empty() || !tasks.is_empty();
    let _ = conn.pragma_update(None, "synchronous", if durable { "FULL" } else { "NORMAL" });
    let result = (|| -> rusqlite::Result<(Changes, Vec<RevokeOutcome>)> {
        let tx = conn.transaction()?;
        let mut changes = Changes::default();
        let mut outcomes = Vec::with_capacity(revokes.len());
        {
            let mut ins = tx.prepare_cached(
                "INSERT OR IGNORE INTO issued (jti, sub, task, aud, client_id, iat, exp) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )?;
            for (r, _) in &issued {
                ins.execute(params![r.jti, r.sub, r.task, r.aud, r.client_id, r.iat as i64, r.exp as i64])?;
            }
        }
        for (task, _) in &tasks {
            insert_task(&tx, task)?;
            changes.created.push(task.clone());
        }
        for (req, at, client_id, _) in &revokes {
            let (o, ended) = revoke_one(&tx, req, *at, client_id, now, token_max_s)?;
            if o.created {
                changes.added.push(o.revocation.clone());
            }
            if let Some(e) = ended {
                changes.ended.push((req.value.clone(), e));
            }
            outcomes.push(o);
        }
        tx.commit()?;
        Ok((changes, outcomes))
    })();
    match result {
        Ok((changes, outcomes)) => {
            let grew = !changes.added.is_empty();
            if std::mem::take(failing) {
                eprintln!("{}", serde_json::json!({"ts": crate::now(), "level": "info", "msg": "sqlite writes succeed again"}));
            }
            if let Ok(mut v) = view.write() {
                for r in changes.added {
                    v.add(r);
                }
                for t in changes.created {
                    v.registered.insert(t.id.clone(), Arc::new(t));
                }
                for (id, at) in changes.ended {
                    if let Some(t) = v.registered.get_mut(&id) {
                        let mut ended = (**t).clone();
                        ended.ended_at = Some(at);
                        *t = Arc::new(ended);
                    }
                }
            }
            if grew {
                bump(changed);
            }
            for p in probes.drain(..) {
                let _ = p.send(Ok(()));
            }
            for ((_, _, _, reply), outcome) in revokes.into_iter().zip(outcomes) {
                let _ = reply.send(Ok(outcome));
            }
            for (_, reply) in tasks {
                let _ = reply.send(Ok(()));
            }
            for (_, reply) in issued {
                let _ = reply.send(Ok(()));
            }
        }
        Err(e) => {
            let err = StoreError::from_sqlite(&e);
            // Logged when writes start failing, not for every batch while they do.
            if !std::mem::replace(failing, true) {
                eprintln!("{}", serde_json::json!({"ts": crate::now(), "level": "error", "msg": "sqlite write failed; nothing of the batch is acknowledged", "reason": err.reason(), "error": e.to_string()}));
            }
            for (_, _, _, reply) in revokes {
                let _ = reply.send(Err(err.clone()));
            }
            for (_, reply) in tasks {
                let _ = reply.send(Err(err.clone()));
            }
            for (_, reply) in issued {
                let _ = reply.send(Err(err.clone()));
            }
            for p in probes.drain(..) {
                let _ = p.send(Err(err.clone()));
            }
        }
    }
    for f in flushes {
        let _ = f.send(());
    }
}

fn insert_task(tx: &rusqlite::Transaction<'_>, t: &Task) -> rusqlite::Result<()> {
    let subjects = serde_json::to_string(&t.subjects).unwrap_or_else(|_| "[]".into());
    let intents = serde_json::to_string(&t.intents).unwrap_or_else(|_| "[]".into());
    tx.execute(
        "INSERT INTO tasks (id, subjects, intents, label, created_at, expires_at, ended_at, client_id) VALUES (?1, ?2, ?3, ?4, ?5, ?6, NULL, ?7)",
        params![t.id, subjects, intents, t.label, t.created_at as i64, t.expires_at as i64, t.client_id],
    )?;
    Ok(())
}

/// Records one revocation; also returns when a registered task was ended by it.
fn revoke_one(
    tx: &rusqlite::Transaction<'_>,
    req: &RevokeRequest,
    at: u64,
    client_id: &str,
    now: u64,
    token_max_s: u64,
) -> rusqlite::Result<(RevokeOutcome, Option<u64>)> {
    let kind = req.kind;
    let value = req.value.as_str();
    let subject_key = req.subject.as_deref().unwrap_or("");
    let mut ended = None;
    let until: Option<u64> = match kind {
        Kind::Task => {
            let registered: Option<i64> = tx
                .query_row("SELECT expires_at FROM tasks WHERE id = ?1", params![value], |r| r.get(0))
                .map(Some)
                .or_else(|e| if e == rusqlite::Error::QueryReturnedNoRows { Ok(None) } else { Err(e) })?;
            match registered {
                Some(exp) => {
                    if req.subject.is_none() {
                        let n = tx.execute("UPDATE tasks SET ended_at = ?1 WHERE id = ?2 AND ended_at IS NULL", params![at as i64, value])?;
                        if n > 0 {
                            ended = Some(at);
                        }
                    }
                    Some(u64::try_from(exp).unwrap_or(0).saturating_add(token_max_s))
                }
                None => None, // an ad-hoc task has no expiry: the entry is permanent
            }
        }
        Kind::Jti => tx
            .query_row("SELECT exp FROM issued WHERE jti = ?1", params![value], |r| r.get::<_, i64>(0))
            .map(|e| Some(u64::try_from(e).unwrap_or(0)))
            .or_else(|e| if e == rusqlite::Error::QueryReturnedNoRows { Ok(None) } else { Err(e) })?,
        Kind::Subject => None,
    };
    let inserted = tx.execute(
        "INSERT OR IGNORE INTO revocations (kind, value, subject, at, until, client_id) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![kind.as_str(), value, subject_key, at as i64, until.map(|u| u as i64), client_id],
    )?;
    let (seq, at_db, until_db): (i64, i64, Option<i64>) = tx.query_row(
        "SELECT seq, at, until FROM revocations WHERE kind = ?1 AND value = ?2 AND subject = ?3",
        params![kind.as_str(), value, subject_key],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
    )?;
    let jtis = match (kind, req.subject.as_deref()) {
        (Kind::Jti, _) => vec![value.to_string()],
        (Kind::Task, Some(sub)) => {
            let mut stmt = tx.prepare_cached("SELECT jti FROM issued WHERE task = ?1 AND sub = ?2 AND exp >= ?3 ORDER BY iat")?;
            let rows = stmt.query_map(params![value, sub, now as i64], |r| r.get::<_, String>(0))?;
            rows.collect::<rusqlite::Result<Vec<_>>>()?
        }
        (Kind::Task, None) | (Kind::Subject, _) => {
            let sql = if kind == Kind::Task {
                "SELECT jti FROM issued WHERE task = ?1 AND exp >= ?2 ORDER BY iat"
            } else {
                "SELECT jti FROM issued WHERE sub = ?1 AND exp >= ?2 ORDER BY iat"
            };
            let mut stmt = tx.prepare_cached(sql)?;
            let rows = stmt.query_map(params![value, now as i64], |r| r.get::<_, String>(0))?;
            rows.collect::<rusqlite::Result<Vec<_>>>()?
        }
    };
    let outcome = RevokeOutcome {
        revocation: Revocation {
            seq,
            kind,
            value: value.to_string(),
            subject: req.subject.clone(),
            at: u64::try_from(at_db).unwrap_or(0),
            until: until_db.map(|u| u64::try_from(u).unwrap_or(0)),
        },
        created: inserted > 0,
        jtis,
    };
    Ok((outcome, ended))
}

/// Used by tests and tools: every recorded jti (opens its own read connection).
pub fn issued_jtis(state_dir: &Path) -> Result<HashSet<String>> {
    let conn = Connection::open(state_dir.join(DB_FILE))?;
    let mut stmt = conn.prepare("SELECT jti FROM issued")?;
    let rows = stmt.query_map([], |r| r.get::<_, String>(0))?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// Used by tests and tools: whether a jti was recorded (opens its own read connection).
pub fn issued_exists(state_dir: &Path, jti: &str) -> Result<bool> {
    let conn = Connection::open(state_dir.join(DB_FILE))?;
    let n: i64 = conn.query_row("SELECT COUNT(*) FROM issued WHERE jti = ?1", params![jti], |r| r.get(0))?;
    Ok(n > 0)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn largest_possible_entry_fits_the_smallest_page() {
        // The widest values the validation allows: a task name that JSON escapes
        // to twice its length, scoped to the longest subject.
        let r = Revocation {
            seq: i64::MAX,
            kind: Kind::Task,
            value: "\"".repeat(crate::values::MAX_TASK),
            subject: Some(format!("spiffe://example.org/{}", "a".repeat(crate::values::MAX_SUBJECT - 21))),
            at: u64::MAX,
            until: Some(u64::MAX),
        };
        assert!(crate::values::task(&r.value).is_ok());
        assert!(r.subject.as_deref().is_some_and(|s| crate::values::subject(s).is_ok()));
        let entry = serde_json::to_string(&r).unwrap().len();
        let envelope = format!(
            r#"{{"epoch":"{}","cursor":{},"reset":false,"more":false,"wait_max_ms":{FEED_MAX_WAIT_MS},"revocations":[]}}"#,
            "A".repeat(22),
            i64::MIN
        )
        .len();
        assert!(entry + envelope <= FEED_MIN_BYTES, "{entry} + {envelope}");
        assert!(entry <= 2600, "{entry}");
    }

    fn record(i: usize) -> IssuedRecord {
        IssuedRecord { jti: format!("jti-{i:06}"), sub: "spiffe://example.org/a".into(), task: Some("T".into()), aud: "aud".into(), client_id: "c".into(), iat: 1, exp: u64::MAX / 4 }
    }

    #[test]
    fn a_full_store_acknowledges_nothing_and_works_again_when_space_returns() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 300, Some(1)).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let mut acked = Vec::new();
        let err = rt.block_on(async {
            for i in 0..10_000 {
                match store.record_issued(record(i)).await {
                    Ok(()) => acked.push(format!("jti-{i:06}")),
                    Err(e) => return Some(e),
                }
            }
            None
        });
        assert_eq!(err, Some(StoreError::Full));
        assert_eq!(StoreError::Full.reason(), "store_full");
        let recorded = issued_jtis(dir.path()).unwrap();
        assert_eq!(recorded.len(), acked.len(), "only what was acknowledged is recorded");
        assert!(acked.iter().all(|j| recorded.contains(j)));
        store.set_max_pages(SQLITE_MAX_PAGES).unwrap();
        rt.block_on(store.record_issued(record(999_999))).unwrap();
        assert!(issued_exists(dir.path(), "jti-999999").unwrap());
        // The journal mode is persistent: WAL for every later connection too.
        let conn = Connection::open(dir.path().join(DB_FILE)).unwrap();
        let mode: String = conn.query_row("PRAGMA journal_mode", [], |r| r.get(0)).unwrap();
        assert_eq!(mode, "wal");
    }

    #[test]
    fn feed_page_never_exceeds_the_budget_and_always_advances() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 300, None).unwrap();
        {
            let mut v = store.view.write().unwrap();
            for seq in 1..=200 {
                v.add(Revocation { seq, kind: Kind::Subject, value: format!("spiffe://example.org/{}", "s".repeat(2000)), subject: None, at: 1, until: None });
            }
        }
        let (mut since, mut seen) = (0, 0);
        let epoch = store.epoch().to_string();
        loop {
            let p = store.feed(since, Some(&epoch), 1000, FEED_MIN_BYTES, 10);
            assert!(p.body.len() <= FEED_MIN_BYTES);
            assert!(!p.revocations.is_empty());
            seen += p.revocations.len();
            assert!(p.cursor > since);
            since = p.cursor;
            if !p.more {
                break;
            }
        }
        assert_eq!(seen, 200);
    }
}
