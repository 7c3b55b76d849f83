//! Durable state in SQLite (WAL): revocations (committed with
//! `synchronous=FULL`) and the record of issued tokens (`NORMAL`).
//!
//! One dedicated writer thread owns the connection. Issued-token records are
//! write-behind: the hot path only queues them, and the writer commits them in
//! batches. Revocations go through the same queue (so they are ordered after
//! every record queued before them) but the caller waits for the commit, and
//! the in-memory view that the hot path checks is updated only after it.
//! Startup loads every revocation back into memory: a restart loses nothing.

use anyhow::{anyhow, Context, Result};
use rusqlite::{params, Connection};
use serde::Serialize;
use std::collections::HashSet;
use std::path::Path;
use std::sync::mpsc;
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;

pub const DB_FILE: &str = "minter.sqlite3";
const BATCH_MAX: usize = 4096;
/// How long issued-token records may wait for company before a commit.
const WRITE_BEHIND: Duration = Duration::from_millis(10);
/// Issued-token records are kept this long past their expiry.
const ISSUED_RETENTION_S: u64 = 3600;

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

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Revocation {
    pub seq: i64,
    pub kind: Kind,
    pub value: String,
    pub at: u64,
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

type Reply = tokio::sync::oneshot::Sender<Result<RevokeOutcome, String>>;

enum Cmd {
    Issued(IssuedRecord),
    Revoke { kind: Kind, value: String, at: u64, client_id: String, reply: Reply },
    Flush(tokio::sync::oneshot::Sender<()>),
}

#[derive(Default)]
struct View {
    tasks: HashSet<String>,
    jtis: HashSet<String>,
    subjects: HashSet<String>,
    feed: Vec<Revocation>,
}

impl View {
    fn set(&self, kind: Kind) -> &HashSet<String> {
        match kind {
            Kind::Task => &self.tasks,
            Kind::Jti => &self.jtis,
            Kind::Subject => &self.subjects,
        }
    }
    fn add(&mut self, r: Revocation) {
        let set = match r.kind {
            Kind::Task => &mut self.tasks,
            Kind::Jti => &mut self.jtis,
            Kind::Subject => &mut self.subjects,
        };
        set.insert(r.value.clone());
        self.feed.push(r);
    }
}

pub struct Store {
    tx: Mutex<Option<mpsc::Sender<Cmd>>>,
    view: Arc<RwLock<View>>,
    writer: Mutex<Option<JoinHandle<()>>>,
}

fn open_db(path: &Path) -> Result<Connection> {
    let conn = Connection::open(path).with_context(|| format!("opening {}", path.display()))?;
    conn.busy_timeout(Duration::from_secs(5))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS revocations (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            kind TEXT NOT NULL,
            value TEXT NOT NULL,
            at INTEGER NOT NULL,
            client_id TEXT NOT NULL,
            UNIQUE(kind, value));
         CREATE TABLE IF NOT EXISTS issued (
            jti TEXT PRIMARY KEY,
            sub TEXT NOT NULL,
            task TEXT,
            aud TEXT NOT NULL,
            client_id TEXT NOT NULL,
            iat INTEGER NOT NULL,
            exp INTEGER NOT NULL);
         CREATE INDEX IF NOT EXISTS issued_task ON issued(task);
         CREATE INDEX IF NOT EXISTS issued_sub ON issued(sub);
         CREATE INDEX IF NOT EXISTS issued_exp ON issued(exp);",
    )?;
    Ok(conn)
}

impl Store {
    pub fn open(state_dir: &Path) -> Result<Store> {
        std::fs::create_dir_all(state_dir)?;
        let conn = open_db(&state_dir.join(DB_FILE))?;
        let mut view = View::default();
        {
            let mut stmt = conn.prepare("SELECT seq, kind, value, at FROM revocations ORDER BY seq")?;
            let rows = stmt.query_map([], |r| {
                Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?, r.get::<_, String>(2)?, r.get::<_, i64>(3)?))
            })?;
            for row in rows {
                let (seq, kind, value, at) = row?;
                let kind = Kind::parse(&kind).ok_or_else(|| anyhow!("unknown revocation kind {kind:?} in database"))?;
                view.add(Revocation { seq, kind, value, at: u64::try_from(at).unwrap_or(0) });
            }
        }
        let view = Arc::new(RwLock::new(view));
        let (tx, rx) = mpsc::channel();
        let writer_view = view.clone();
        let writer = std::thread::Builder::new()
            .name("minter-sqlite".into())
            .spawn(move || writer_loop(conn, rx, writer_view))
            .context("starting the SQLite writer")?;
        Ok(Store { tx: Mutex::new(Some(tx)), view, writer: Mutex::new(Some(writer)) })
    }

    fn send(&self, cmd: Cmd) -> bool {
        match self.tx.lock() {
            Ok(g) => g.as_ref().is_some_and(|tx| tx.send(cmd).is_ok()),
            Err(_) => false,
        }
    }

    pub fn is_revoked(&self, kind: Kind, value: &str) -> bool {
        match self.view.read() {
            Ok(v) => v.set(kind).contains(value),
            Err(_) => true, // poisoned: fail closed
        }
    }

    /// Queues an issued-token record (write-behind). False if the store is closed.
    pub fn record_issued(&self, rec: IssuedRecord) -> bool {
        self.send(Cmd::Issued(rec))
    }

    /// Records a revocation durably, then makes it visible to the hot path.
    pub async fn revoke(&self, kind: Kind, value: &str, client_id: &str) -> Result<RevokeOutcome> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        let cmd = Cmd::Revoke { kind, value: value.to_string(), at: crate::now(), client_id: client_id.to_string(), reply };
        if !self.send(cmd) {
            return Err(anyhow!("store closed"));
        }
        rx.await.map_err(|_| anyhow!("store writer stopped"))?.map_err(|e| anyhow!(e))
    }

    /// Waits until everything queued so far is committed.
    pub async fn flush(&self) -> Result<()> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        if !self.send(Cmd::Flush(reply)) {
            return Err(anyhow!("store closed"));
        }
        rx.await.map_err(|_| anyhow!("store writer stopped"))
    }

    /// Revocations with `seq > since`, at most `limit`; the cursor to poll with next, and whether more remain.
    pub fn feed(&self, since: i64, limit: usize) -> (i64, Vec<Revocation>, bool) {
        let Ok(v) = self.view.read() else { return (since, Vec::new(), false) };
        let start = v.feed.partition_point(|r| r.seq <= since);
        let rest = v.feed.get(start..).unwrap_or(&[]);
        let page: Vec<Revocation> = rest.iter().take(limit).cloned().collect();
        let more = rest.len() > page.len();
        let cursor = page.last().map_or(since, |r| r.seq);
        (cursor, page, more)
    }

    pub fn revocation_count(&self) -> usize {
        self.view.read().map_or(0, |v| v.feed.len())
    }

    /// Commits what is queued and stops the writer. Blocking.
    pub fn close(&self) {
        if let Ok(mut g) = self.tx.lock() {
            g.take();
        }
        let handle = self.writer.lock().ok().and_then(|mut g| g.take());
        if let Some(h) = handle {
            let _ = h.join();
        }
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        self.close();
    }
}

fn writer_loop(mut conn: Connection, rx: mpsc::Receiver<Cmd>, view: Arc<RwLock<View>>) {
    lower_priority();
    let mut last_purge = 0u64;
    loop {
        let first = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(c) => Some(c),
            Err(mpsc::RecvTimeoutError::Timeout) => None,
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        };
        // Issued-token records can wait a few milliseconds to share a commit;
        // a revocation or a flush is committed at once.
        if matches!(first, Some(Cmd::Issued(_))) {
            std::thread::sleep(WRITE_BEHIND);
        }
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
        }
        if batch.is_empty() {
            continue;
        }
        process(&mut conn, batch, &view, now);
    }
}

fn process(conn: &mut Connection, batch: Vec<Cmd>, view: &RwLock<View>, now: u64) {
    let mut replies: Vec<(Reply, Result<RevokeOutcome, String>)> = Vec::new();
    let mut flushes = Vec::new();
    // Revocations must survive power loss: fsync the WAL on their commits
    // (FULL); batches of issued-token records only need to survive a crash of
    // the process (NORMAL still checkpoints safely).
    let durable = batch.iter().any(|c| matches!(c, Cmd::Revoke { .. }));
    let _ = conn.pragma_update(None, "synchronous", if durable { "FULL" } else { "NORMAL" });
    let result = (|| -> rusqlite::Result<Vec<Revocation>> {
        let tx = conn.transaction()?;
        let mut added = Vec::new();
        {
            let mut ins = tx.prepare_cached(
                "INSERT OR IGNORE INTO issued (jti, sub, task, aud, client_id, iat, exp) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )?;
            for cmd in batch {
                match cmd {
                    Cmd::Issued(r) => {
                        ins.execute(params![r.jti, r.sub, r.task, r.aud, r.client_id, r.iat as i64, r.exp as i64])?;
                    }
                    Cmd::Flush(reply) => flushes.push(reply),
                    Cmd::Revoke { kind, value, at, client_id, reply } => {
                        let outcome = revoke_one(&tx, kind, &value, at, &client_id, now);
                        if let Ok(o) = &outcome {
                            if o.created {
                                added.push(o.revocation.clone());
                            }
                        }
                        replies.push((reply, outcome.map_err(|e| e.to_string())));
                    }
                }
            }
        }
        tx.commit()?;
        Ok(added)
    })();
    match result {
        Ok(added) => {
            if let Ok(mut v) = view.write() {
                for r in added {
                    v.add(r);
                }
            }
            for (reply, outcome) in replies {
                let _ = reply.send(outcome);
            }
        }
        Err(e) => {
            eprintln!("{}", serde_json::json!({"level": "error", "msg": "sqlite write failed", "error": e.to_string()}));
            for (reply, _) in replies {
                let _ = reply.send(Err(format!("storage error: {e}")));
            }
        }
    }
    for f in flushes {
        let _ = f.send(());
    }
}

fn revoke_one(tx: &rusqlite::Transaction<'_>, kind: Kind, value: &str, at: u64, client_id: &str, now: u64) -> rusqlite::Result<RevokeOutcome> {
    let inserted = tx.execute(
        "INSERT OR IGNORE INTO revocations (kind, value, at, client_id) VALUES (?1, ?2, ?3, ?4)",
        params![kind.as_str(), value, at as i64, client_id],
    )?;
    let (seq, at_db): (i64, i64) = tx.query_row(
        "SELECT seq, at FROM revocations WHERE kind = ?1 AND value = ?2",
        params![kind.as_str(), value],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    let jtis = match kind {
        Kind::Jti => vec![value.to_string()],
        Kind::Task | Kind::Subject => {
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
    Ok(RevokeOutcome {
        revocation: Revocation { seq, kind, value: value.to_string(), at: u64::try_from(at_db).unwrap_or(0) },
        created: inserted > 0,
        jtis,
    })
}

/// Used by tests and tools: whether a jti was recorded (opens its own read connection).
pub fn issued_exists(state_dir: &Path, jti: &str) -> Result<bool> {
    let conn = Connection::open(state_dir.join(DB_FILE))?;
    let n: i64 = conn.query_row("SELECT COUNT(*) FROM issued WHERE jti = ?1", params![jti], |r| r.get(0))?;
    Ok(n > 0)
}

/// The writer yields the CPU to request handling (best effort, Linux): on a
/// small machine a batch commit must not delay exchanges.
fn lower_priority() {
    #[cfg(target_os = "linux")]
    // SAFETY: plain syscalls on the calling thread; no memory is shared.
    unsafe {
        let tid = libc::gettid();
        let _ = libc::setpriority(libc::PRIO_PROCESS as _, tid as libc::id_t, 10);
    }
}
