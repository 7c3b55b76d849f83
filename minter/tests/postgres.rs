//! The PostgreSQL store against a real, throwaway PostgreSQL (`mandate_minter::testpg`):
//! replicas sharing tasks, revocations, keys and the feed; the outbox gap; long polls woken
//! by NOTIFY; the database restarted under load; racing migrations and rotations.
//! Skipped when PostgreSQL is not installed, unless `MANDATE_REQUIRE_POSTGRES=1` (scripts/test).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use mandate_minter::pgstore;
use mandate_minter::store::{Kind, RevokeRequest};
use mandate_minter::testpg::TestPg;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

const GRANT: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
const JWT: &str = "urn:ietf:params:oauth:token-type:jwt";

fn cluster() -> Option<TestPg> {
    TestPg::start().unwrap()
}

/// A replica's configuration: dev mode, its own state dir, the shared database `db`.
fn replica(env: &Env, pg: &TestPg, db: &str, name: &str) -> Value {
    let mut c = env.dev();
    c["state_dir"] = json!(env.dir.path().join(name));
    c["reload_check_s"] = json!(1);
    c["tasks"] = json!({"require_registered": true});
    c["store"] = pg.store_config(db);
    c
}

fn post_json(h: &mandate_minter::Handle, path: &str, v: Value) -> (u16, Value) {
    let a = request(h, "POST", path, Body::Json(v), None);
    (a.status, a.body)
}

fn get(h: &mandate_minter::Handle, path: &str) -> (u16, Value) {
    let a = request(h, "GET", path, Body::None, None);
    (a.status, a.body)
}

fn exchange(h: &mandate_minter::Handle, svid: &str, task: &str) -> (u16, Value) {
    let pairs = [("grant_type", GRANT), ("subject_token", svid), ("subject_token_type", JWT), ("audience", "payments-api"), ("task", task), ("intent", "pay")];
    let a = request(h, "POST", "/token", Body::Form(&pairs), None);
    (a.status, a.body)
}

fn create_task(h: &mandate_minter::Handle) -> String {
    let (s, v) = post_json(h, "/tasks", json!({"subjects": [SUB]}));
    assert_eq!(s, 201, "{v}");
    v["task"].as_str().unwrap().to_string()
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

async fn connect(pg: &TestPg, db: &str) -> tokio_postgres::Client {
    let (c, conn) = tokio_postgres::connect(&pg.url(db), tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    c
}

#[test]
fn replicas_share_tasks_keys_and_the_feed_and_a_long_poll_hears_an_end_at_once() {
    let Some(pg) = cluster() else { return };
    pg.create_db("shared").unwrap();
    let env = Env::new();
    let a = start(replica(&env, &pg, "shared", "a"));
    let b = start(replica(&env, &pg, "shared", "b"));
    // One signing key, one JWKS, one feed epoch.
    assert_eq!(get(&a, "/.well-known/jwks.json").1, get(&b, "/.well-known/jwks.json").1);
    let (_, fa) = get(&a, "/revocations?since=0");
    let (_, fb) = get(&b, "/revocations?since=0");
    assert_eq!(fa["epoch"], fb["epoch"]);
    assert_eq!(fa["wait_max_ms"], 25_000, "the feed offers long polls");
    let epoch = fa["epoch"].as_str().unwrap().to_string();
    assert_eq!(get(&a, "/readyz").0, 200);

    // A task registered on A mints on B at once, signed with the shared kid.
    let task = create_task(&a);
    let svid = env.svid(SUB, 600);
    let (s, v) = exchange(&b, &svid, &task);
    assert_eq!(s, 200, "{v}");
    let kid = header_of(v["access_token"].as_str().unwrap())["kid"].clone();
    let (s, v) = exchange(&a, &svid, &task);
    assert_eq!((s, header_of(v["access_token"].as_str().unwrap())["kid"].clone()), (200, kid));

    // A long poll on B returns as soon as A ends the task.
    let cursor = fb["cursor"].as_i64().unwrap();
    let url = format!("{}/revocations?since={cursor}&epoch={epoch}&wait_ms=10000", b.base_url());
    let poll = std::thread::spawn(move || {
        let started = Instant::now();
        let mut r = agent().get(&url).call().unwrap();
        let v: Value = serde_json::from_str(&r.body_mut().read_to_string().unwrap()).unwrap();
        (v, started.elapsed())
    });
    std::thread::sleep(Duration::from_millis(300));
    let ended_at = Instant::now();
    let a_end = request(&a, "POST", &format!("/tasks/{task}/end"), Body::None, None);
    assert_eq!(a_end.status, 200, "{}", a_end.raw);
    let (page, waited) = poll.join().unwrap();
    assert!(waited >= Duration::from_millis(250), "the poll was held until the end: {waited:?}");
    assert!(ended_at.elapsed() < Duration::from_secs(2), "heard within the poll, not at its timeout");
    let entries = page["revocations"].as_array().unwrap();
    assert_eq!(entries.len(), 1, "{page}");
    assert_eq!((entries[0]["kind"].as_str(), entries[0]["value"].as_str()), (Some("task"), Some(task.as_str())));
    // B refuses the task now, and shows it ended.
    let (s, v) = exchange(&b, &svid, &task);
    assert_eq!((s, v["mandate_reason"].as_str()), (400, Some("task_ended")), "{v}");
    assert_eq!(get(&b, &format!("/tasks/{task}")).1["state"], "ended");
    // A long poll with nothing new returns at its (capped) wait, with the cursor unchanged.
    let cursor = page["cursor"].as_i64().unwrap();
    let started = Instant::now();
    let (_, v) = get(&b, &format!("/revocations?since={cursor}&epoch={epoch}&wait_ms=400"));
    assert!(started.elapsed() >= Duration::from_millis(400));
    assert_eq!((v["cursor"].as_i64(), v["revocations"].as_array().map(Vec::len)), (Some(cursor), Some(0)));
    // Metrics in Prometheus text.
    let m = request(&b, "GET", "/metrics", Body::None, None);
    assert!(m.content_type.starts_with("text/plain"), "{}", m.content_type);
    assert!(m.raw.contains("mandate_minter_exchanges_total{outcome=\"issued\"} 1"), "{}", m.raw);
    assert!(m.raw.contains("mandate_minter_refusals_total{error=\"invalid_grant\",reason=\"task_ended\"} 1"), "{}", m.raw);
    assert!(!m.raw.contains(&svid), "no token in metrics");
    drop(a);
    drop(b);
    // Nothing lost across a restart of every replica.
    let c = start(replica(&env, &pg, "shared", "c"));
    assert_eq!(exchange(&c, &svid, &task).1["mandate_reason"], "task_ended");
    assert_eq!(get(&c, "/revocations?since=0").1["epoch"], epoch.as_str());
}

/// A replica that can no longer follow the shared feed would mint from a stale view (for a
/// task another replica ended). Each way it can lose the feed makes it not ready and makes it
/// refuse to mint, until restarted: a revocation of a kind it does not know (a newer replica
/// wrote it), and the feed's epoch changed under it (a restored backup, `migrate --new-epoch`).
#[test]
fn a_replica_that_loses_the_feed_stops_minting_and_is_not_ready() {
    let Some(pg) = cluster() else { return };
    let env = Env::new();
    let svid = env.svid(SUB, 600);
    let until_blocked = |h: &mandate_minter::Handle| {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (s, v) = get(h, "/readyz");
            if s == 503 {
                return v;
            }
            assert!(Instant::now() < deadline, "still ready: {v}");
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let rt = rt();

    // A revocation of a kind from the future.
    pg.create_db("unknown_kind").unwrap();
    let a = start(replica(&env, &pg, "unknown_kind", "a"));
    let task = create_task(&a);
    assert_eq!(exchange(&a, &svid, &task).0, 200);
    rt.block_on(async {
        let c = connect(&pg, "unknown_kind").await;
        c.execute(
            "INSERT INTO revocations (seq, kind, value, subject, at, until, client_id) VALUES (nextval('revocations_seq'), 'quantum', 'x', '', 1, NULL, 'newer')",
            &[],
        )
        .await
        .unwrap();
        c.execute("NOTIFY mandate_feed", &[]).await.unwrap();
    });
    let v = until_blocked(&a);
    assert_eq!(v["status"], "not_ready", "{v}");
    let (s, v) = exchange(&a, &svid, &task);
    assert_eq!(s, 503, "a replica that cannot follow the feed mints nothing: {v}");
    assert!(v.get("access_token").is_none());
    drop(a);

    // The epoch changed under a running replica.
    pg.create_db("new_epoch").unwrap();
    let b = start(replica(&env, &pg, "new_epoch", "b"));
    let task = create_task(&b);
    assert_eq!(exchange(&b, &svid, &task).0, 200);
    rt.block_on(async {
        let c = connect(&pg, "new_epoch").await;
        pgstore::new_epoch(&c).await.unwrap();
        c.execute("NOTIFY mandate_feed", &[]).await.unwrap();
    });
    until_blocked(&b);
    assert_eq!(exchange(&b, &svid, &task).0, 503);
    drop(b);
    // Restarted, it follows the new epoch and mints again.
    let b2 = start(replica(&env, &pg, "new_epoch", "b2"));
    assert_eq!(get(&b2, "/readyz").0, 200);
    assert_eq!(exchange(&b2, &svid, &task).0, 200);
}

/// The outbox gap: writer 1 draws seq n and commits late; writer 2 draws n+1 and commits at
/// once; a reader at n+1 would skip n for ever. Without the feed lock the gap is real (shown
/// here, so this test can fail); with it, writer 2 waits, and the reader never skips.
#[test]
fn the_outbox_gap_exists_without_the_feed_lock_and_never_with_it() {
    let Some(pg) = cluster() else { return };
    pg.create_db("gap").unwrap();
    rt().block_on(async {
        let mut setup = connect(&pg, "gap").await;
        pgstore::migrate(&mut setup).await.unwrap();
        for serialize in [false, true] {
            let mut w1 = connect(&pg, "gap").await;
            let mut w2 = connect(&pg, "gap").await;
            let reader = connect(&pg, "gap").await;
            let start = pgstore::revocations_after(&reader, 0, 100_000).await.unwrap().last().map_or(0, |r| r.seq);
            let req = move |v: &str| RevokeRequest { kind: Kind::Subject, value: format!("spiffe://example.org/{v}-{serialize}"), subject: None };
            let tx1 = w1.transaction().await.unwrap();
            let r1 = pgstore::insert_revocation(&tx1, &req("slow"), 1, "c", 1, 300, serialize).await.unwrap();
            let mut w2_task = tokio::spawn(async move {
                let tx2 = w2.transaction().await.unwrap();
                let r2 = pgstore::insert_revocation(&tx2, &req("fast"), 1, "c", 1, 300, serialize).await.unwrap();
                tx2.commit().await.unwrap();
                r2.revocation.seq
            });
            // Without the lock writer 2 commits while writer 1 is open (waited for, however
            // slow the machine); with it, writer 2 is still waiting for writer 1 after 300 ms.
            let early = tokio::time::timeout(Duration::from_millis(if serialize { 300 } else { 30_000 }), &mut w2_task).await;
            let early_seq = match early {
                Ok(done) => Some(done.unwrap()),
                Err(_) => None,
            };
            assert_eq!(early_seq.is_none(), serialize, "writer 2 waits for writer 1 only under the lock");
            // The reader tails the feed while writer 1 is still open.
            let seen_early = pgstore::revocations_after(&reader, start, 100).await.unwrap();
            let cursor = seen_early.last().map_or(start, |r| r.seq);
            tx1.commit().await.unwrap();
            let s2 = match early_seq {
                Some(s) => s,
                None => w2_task.await.unwrap(),
            };
            let seen_late = pgstore::revocations_after(&reader, cursor, 100).await.unwrap();
            let mut seen: Vec<i64> = seen_early.iter().chain(&seen_late).map(|r| r.seq).collect();
            seen.sort();
            let mut committed = vec![r1.revocation.seq, s2];
            committed.sort();
            if serialize {
                assert!(seen_early.is_empty(), "writer 2 waited for writer 1");
                assert_eq!(seen, committed, "the reader saw every committed entry");
                assert!(r1.revocation.seq < s2, "seq order is commit order");
            } else {
                assert_eq!(seen_early.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![s2], "without the lock the later seq shows first");
                assert!(!seen.contains(&r1.revocation.seq), "and the reader skips writer 1's entry: the gap");
            }
        }
    });
}

/// Many writers on several connections, a reader tailing `seq > cursor` throughout: every
/// committed entry is read, in seq order.
#[test]
fn concurrent_writers_never_make_a_tailing_reader_skip() {
    let Some(pg) = cluster() else { return };
    pg.create_db("tail").unwrap();
    rt().block_on(async {
        let mut setup = connect(&pg, "tail").await;
        pgstore::migrate(&mut setup).await.unwrap();
        let mut writers = Vec::new();
        for w in 0..6 {
            let mut c = connect(&pg, "tail").await;
            writers.push(tokio::spawn(async move {
                let mut seqs = Vec::new();
                for i in 0..40 {
                    let tx = c.transaction().await.unwrap();
                    let req = RevokeRequest { kind: Kind::Jti, value: format!("j{w}x{i}"), subject: None };
                    let o = pgstore::insert_revocation(&tx, &req, 1, "c", 1, 300, true).await.unwrap();
                    // Hold some transactions open a while after drawing the seq.
                    if i % 3 == w % 3 {
                        tokio::time::sleep(Duration::from_millis(7)).await;
                    }
                    tx.commit().await.unwrap();
                    seqs.push(o.revocation.seq);
                }
                seqs
            }));
        }
        let reader = connect(&pg, "tail").await;
        let mut cursor = 0;
        let mut read = Vec::new();
        let done = |ws: &Vec<tokio::task::JoinHandle<Vec<i64>>>| ws.iter().all(|w| w.is_finished());
        loop {
            let finished = done(&writers);
            for r in pgstore::revocations_after(&reader, cursor, 1000).await.unwrap() {
                cursor = r.seq;
                read.push(r.seq);
            }
            if finished {
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let mut committed = Vec::new();
        for w in writers {
            committed.extend(w.await.unwrap());
        }
        committed.sort();
        assert_eq!(read.len(), 240);
        assert_eq!(read, committed, "the tail read every committed seq, in order");
    });
}

#[test]
fn replicas_racing_migrations_and_rotation_migrate_once_and_rotate_once() {
    let Some(pg) = cluster() else { return };
    pg.create_db("race").unwrap();
    let env = Env::new();
    // Two replicas start at once on an empty database: one migrates, both serve the same key.
    let cfgs: Vec<Value> = ["r1", "r2", "r3"].iter().map(|n| replica(&env, &pg, "race", n)).collect();
    let handles: Vec<_> = cfgs.iter().cloned().map(|c| std::thread::spawn(move || start(c))).collect();
    let replicas: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let jwks: Vec<Value> = replicas.iter().map(|r| get(r, "/.well-known/jwks.json").1).collect();
    assert!(jwks.iter().all(|j| *j == jwks[0]), "{jwks:?}");
    assert_eq!(jwks[0]["keys"].as_array().unwrap().len(), 1, "exactly one first key");
    let rt = rt();
    rt.block_on(async {
        let c = connect(&pg, "race").await;
        let n: i64 = c.query_one("SELECT COUNT(*) FROM mandate_schema", &[]).await.unwrap().get(0);
        assert_eq!(n as usize, pgstore::MIGRATIONS.len(), "each step applied once");
    });
    // Three replicas rotate at once when rotation is due (an hour past the newest key):
    // exactly one adds a key; the others find the rule no longer holds under the lock.
    let policy = mandate_minter::keys::Policy { publish_before_use_s: 300, keep: 3, retire_after_s: 600, notice_slack_s: 1 };
    let later = mandate_minter::now() + 3600;
    let threads: Vec<_> = replicas
        .iter()
        .map(|r| {
            let st = r.state.clone();
            std::thread::spawn(move || {
                let pg = st.store.postgres().unwrap().clone();
                pg.block_on(mandate_minter::server::rotate_pg_if(&pg, &policy, later, |newest| newest + 3600 <= later)).unwrap().unwrap()
            })
        })
        .collect();
    let rotated: Vec<_> = threads.into_iter().filter_map(|t| t.join().unwrap()).collect();
    assert_eq!(rotated.len(), 1, "exactly one replica rotated");
    rt.block_on(async {
        let c = connect(&pg, "race").await;
        let n: i64 = c.query_one("SELECT COUNT(*) FROM signing_keys", &[]).await.unwrap().get(0);
        assert_eq!(n, 2);
    });
    // Every replica picks the shared keys up within its reload check.
    std::thread::sleep(Duration::from_millis(2500));
    let jwks: Vec<Value> = replicas.iter().map(|r| get(r, "/.well-known/jwks.json").1).collect();
    assert!(jwks.iter().all(|j| *j == jwks[0]), "{jwks:?}");
    assert_eq!(jwks[0]["keys"].as_array().unwrap().len(), 2, "the pending key is published everywhere");
    assert_eq!(jwks[0]["keys"][0]["kid"], rotated[0].kid.as_str());
}

#[test]
fn the_database_restarted_under_load_pauses_minting_with_503_and_loses_nothing() {
    let Some(pg) = cluster() else { return };
    pg.create_db("restart").unwrap();
    let env = Env::new();
    let mut cfg = replica(&env, &pg, "restart", "a");
    cfg["store"]["postgres"]["timeout_ms"] = json!(500);
    let a = start(cfg);
    let task = create_task(&a);
    let svid = env.svid(SUB, 600);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let base = a.base_url();
    let load = {
        let (stop, svid, task) = (stop.clone(), svid.clone(), task.clone());
        std::thread::spawn(move || {
            let (mut issued, mut unavailable, mut other) = (Vec::new(), 0, Vec::new());
            let agent = agent();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let body = serde_urlencoded::to_string([
                    ("grant_type", GRANT),
                    ("subject_token", svid.as_str()),
                    ("subject_token_type", JWT),
                    ("audience", "payments-api"),
                    ("task", task.as_str()),
                    ("intent", "pay"),
                ])
                .unwrap();
                let a = answer(agent.post(format!("{base}/token")).header("content-type", "application/x-www-form-urlencoded").send(body));
                match a.status {
                    200 => issued.push(claims_of(a.body["access_token"].as_str().unwrap())["jti"].as_str().unwrap().to_string()),
                    503 => {
                        assert_eq!(a.body["mandate_reason"], "store_unavailable", "{}", a.raw);
                        unavailable += 1
                    }
                    s => other.push((s, a.raw)),
                }
            }
            (issued, unavailable, other)
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    pg.stop().unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(get(&a, "/readyz").0, 503, "not ready while the database is down");
    assert_eq!(get(&a, "/healthz").0, 200, "but alive");
    pg.start_again().unwrap();
    let back = Instant::now();
    while get(&a, "/readyz").0 != 200 {
        assert!(back.elapsed() < Duration::from_secs(15), "ready again");
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(700));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (issued, unavailable, other) = load.join().unwrap();
    assert!(other.is_empty(), "{other:?}");
    assert!(unavailable > 0, "minting paused with 503 while the database was down");
    assert!(issued.len() > 5, "minted before and after: {}", issued.len());
    // Every token handed out is recorded.
    rt().block_on(async {
        let c = connect(&pg, "restart").await;
        let rows = c.query("SELECT jti FROM issued", &[]).await.unwrap();
        let recorded: std::collections::HashSet<String> = rows.iter().map(|r| r.get(0)).collect();
        let missing: Vec<_> = issued.iter().filter(|j| !recorded.contains(*j)).collect();
        assert!(missing.is_empty(), "issued but unrecorded: {missing:?}");
    });
    // And the replica works on.
    assert_eq!(exchange(&a, &svid, &task).0, 200);
}

/// TLS to the database: the server's certificate and name are verified against `ca_file`; a
/// certificate from another CA is refused at startup (never a silent plaintext fallback).
#[test]
fn tls_to_the_database_verifies_the_server_certificate() {
    let Some(mut pg) = cluster() else { return };
    let pki = pki();
    let port = pg.enable_tls(&pki.server_cert_pem, &pki.server_key_pem).unwrap();
    let env = Env::new();
    let ca = env.file("pg-ca.pem", &pki.ca_pem);
    let mut cfg = replica(&env, &pg, "postgres", "a");
    cfg["store"] = json!({"postgres": {"url": format!("host=localhost port={port} user=mandate dbname=postgres sslmode=require"), "ca_file": ca}});
    let a = start(cfg.clone());
    assert_eq!(get(&a, "/readyz").0, 200);
    let task = create_task(&a);
    assert!(task.starts_with("tsk_"));
    drop(a);
    let other = pki_other_ca();
    cfg["store"]["postgres"]["ca_file"] = json!(env.file("other-ca.pem", &other));
    cfg["state_dir"] = json!(env.dir.path().join("b"));
    let err = mandate_minter::spawn(mandate_minter::config::MinterConfig::from_json(cfg).unwrap()).err().expect("an unknown CA is refused");
    assert!(format!("{err:#}").to_lowercase().contains("certificate"), "{err:#}");
}

fn pki_other_ca() -> String {
    pki().ca_pem
}

/// Bad `store.postgres` values are refused at startup with the field named (no cluster needed).
#[test]
fn bad_store_postgres_settings_are_refused_naming_the_field() {
    let env = Env::new();
    for (pg, field) in [
        (json!({"pool_size": 0}), "store.postgres.pool_size"),
        (json!({"pool_size": 1001}), "store.postgres.pool_size"),
        (json!({"timeout_ms": 10}), "store.postgres.timeout_ms"),
        (json!({"url": "host=/tmp port=notaport"}), "store.postgres.url"),
        (json!({"url": "postgresql://h/db?sslmode=sometimes"}), "store.postgres.url"),
        (json!({"client_cert": "c.pem"}), "store.postgres.client_cert"),
        (json!({"url": "host=/tmp", "passwrd": "x"}), "passwrd"),
    ] {
        let mut cfg = env.dev();
        cfg["store"] = json!({"postgres": pg});
        let err = mandate_minter::config::MinterConfig::from_json(cfg).expect_err("refused");
        assert!(format!("{err:#}").contains(field), "{field}: {err:#}");
    }
    let mut cfg = env.dev();
    cfg["store"] = json!({"postgres": {}, "max_pages": 10});
    let err = mandate_minter::config::MinterConfig::from_json(cfg).expect_err("refused");
    assert!(format!("{err:#}").contains("store.max_pages"), "{err:#}");
}

/// `mandate-minter migrate`, `check-store` and `rotate-key` on the shared store, as an operator
/// runs them.
#[test]
fn migrate_check_store_and_rotate_key_subcommands() {
    let Some(pg) = cluster() else { return };
    pg.create_db("ops").unwrap();
    let env = Env::new();
    let run = |cfg: &Value, args: &[&str]| {
        let path = env.file("ops.json", &cfg.to_string());
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_mandate-minter")).arg("--config").arg(&path).args(args).output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        (out.status.success(), serde_json::from_str::<Value>(stdout.lines().last().unwrap_or("null")).unwrap_or(Value::Null), stdout)
    };
    let cfg = replica(&env, &pg, "ops", "ops");
    let (ok, v, _) = run(&cfg, &["check-store"]);
    assert!(!ok, "an empty database is not ready");
    assert_eq!((v["ok"].as_bool(), v["schema_version"].as_u64()), (Some(false), Some(0)), "{v}");
    let (ok, v, out) = run(&cfg, &["migrate"]);
    assert!(ok, "{out}");
    assert_eq!(v["schema_version"].as_u64(), Some(pgstore::MIGRATIONS.len() as u64));
    let (ok, v, out) = run(&cfg, &["check-store"]);
    assert!(ok, "{out}");
    assert_eq!((v["ok"].as_bool(), v["revocations"].as_i64(), v["signing_keys"].as_i64()), (Some(true), Some(0), Some(0)), "{v}");
    // A replica started now serves the epoch that `migrate --new-epoch` then replaces.
    let a = start(cfg.clone());
    let before = get(&a, "/revocations?since=0").1["epoch"].clone();
    drop(a);
    let (ok, _, out) = run(&cfg, &["migrate", "--new-epoch"]);
    assert!(ok, "{out}");
    let a = start(cfg.clone());
    assert_ne!(get(&a, "/revocations?since=0").1["epoch"], before, "a new epoch");
    drop(a);
    let (ok, v, out) = run(&cfg, &["rotate-key"]);
    assert!(ok, "{out}");
    assert!(v["rotated"].as_str().is_some_and(|k| !k.is_empty()), "{v}");
    assert_eq!(run(&cfg, &["check-store"]).1["signing_keys"].as_i64(), Some(2));
    // Unreachable: reported, exit non-zero, no password or URL echoed.
    let mut gone = cfg.clone();
    gone["store"]["postgres"]["url"] = json!("host=/nonexistent/socket/dir user=mandate password=hunter2 dbname=ops");
    let (ok, v, out) = run(&gone, &["check-store"]);
    assert!(!ok);
    assert_eq!(v["ok"], false, "{out}");
    assert!(!out.contains("hunter2"), "{out}");
}
