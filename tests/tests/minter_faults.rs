//! The minter's own fault drills (issue 14, item 4), against the real minter:
//!
//! 1. slow clients: thousands of connections that send part of a request and stall are cut
//!    off by the read timeouts, held to `limits.max_connections` while a well-behaved client
//!    is still served, and the memory they took is given back;
//! 2. a full disk (`store.max_pages`): minting stops with 503 `store_full`, through Envoy and
//!    the plugin too (the service receives nothing), a task end is not acknowledged, and
//!    everything works again once space returns; every token ever issued is in the store;
//! 3. `kill -9` during a burst of exchanges and task ends: after the restart, every
//!    acknowledged task end is there and in the revocation feed, and every acknowledged
//!    credential is recorded.
//!
//! Drills 1 and 3 run the minter as its own process (`minter-under-test`, the same
//! `mandate_minter::run` as the `mandate-minter` binary): they measure its memory and kill it.
//! Drill 2 runs it in-process, to give the disk space back, behind a real Envoy.

use std::collections::HashSet;
use std::io::{BufRead as _, BufReader, ErrorKind, Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mandate_e2e::{http, http_get, prerequisites, wait_until, Envoy, HttpResponse, MockServer, SvidIssuer, Vars};
use mandate_minter::config::MinterConfig;
use serde_json::{json, Value};

mod orders_story;
use orders_story::*;

// ---------------------------------------------------------------------------------------
// Helpers

/// The minter as a child process, killed (SIGKILL) when dropped.
struct MinterProc {
    child: Child,
    addr: SocketAddr,
}

impl MinterProc {
    fn start(config: &Path) -> MinterProc {
        let mut child = Command::new(env!("CARGO_BIN_EXE_minter-under-test"))
            .arg(config)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start minter-under-test");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut line).expect("the minter's first line");
        let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"));
        let addr = v["listening"].as_str().expect("listening").parse().expect("address");
        MinterProc { child, addr }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Resident set size, KiB (`VmRSS`).
    fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).expect("/proc/PID/status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS")
    }

    /// `kill -9`, and reap it.
    fn kill9(mut self) {
        self.child.kill().expect("SIGKILL");
        self.child.wait().expect("reap");
    }
}

impl Drop for MinterProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Writes the minter's configuration for `issuer` (state in `dir/state`) to `dir/minter.json`.
fn write_config(dir: &Path, issuer: &SvidIssuer, extra: Value) -> PathBuf {
    let path = dir.join("minter.json");
    let mut config = minter_config(issuer, &dir.join("state"), json!({"dev": true}));
    if let (Some(c), Value::Object(extra)) = (config.as_object_mut(), extra) {
        c.extend(extra);
    }
    std::fs::write(&path, serde_json::to_vec_pretty(&config).expect("JSON")).expect("write minter.json");
    path
}

/// `application/x-www-form-urlencoded` value.
fn form_value(v: &str) -> String {
    v.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// An RFC 8693 exchange of `svid` for the orders audience, for `task`, straight at the minter.
fn exchange(base: &str, svid: &str, task: &str) -> anyhow::Result<HttpResponse> {
    let body = [
        ("grant_type", "urn:ietf:params:oauth:grant-type:token-exchange"),
        ("subject_token", svid),
        ("subject_token_type", "urn:ietf:params:oauth:token-type:jwt"),
        ("audience", RESOURCE_AUDIENCE),
        ("scope", SCOPE),
        ("intent", INTENT),
        ("task", task),
    ]
    .iter()
    .map(|(k, v)| format!("{k}={}", form_value(v)))
    .collect::<Vec<_>>()
    .join("&");
    http("POST", &format!("{base}/token"), &[("content-type", "application/x-www-form-urlencoded")], body.as_bytes())
}

/// The jti of a 200 `/token` answer.
fn jti_of(resp: &HttpResponse) -> String {
    let v = resp.json().expect("token answer");
    let token = v["access_token"].as_str().expect("access_token");
    jwt_claims(token)["jti"].as_str().expect("jti").to_string()
}

/// Registers a task for the order-bot (`POST /tasks`): its id.
fn create_task(base: &str, issuer: &SvidIssuer) -> String {
    let subject = format!("spiffe://{}{AGENT}", issuer.trust_domain);
    let body = json!({"subjects": [subject], "intents": [INTENT]}).to_string();
    let r = http("POST", &format!("{base}/tasks"), &[("content-type", "application/json")], body.as_bytes()).expect("POST /tasks");
    assert_eq!(r.status, 201, "{}", r.text());
    r.json().expect("task")["task"].as_str().expect("task id").to_string()
}

fn end_task(base: &str, task: &str) -> anyhow::Result<HttpResponse> {
    http("POST", &format!("{base}/tasks/{task}/end"), &[], b"")
}

/// Every entry of the revocation feed, paged from the start.
fn whole_feed(base: &str) -> Vec<Value> {
    let mut out = Vec::new();
    let (mut since, mut epoch) = (0i64, String::new());
    loop {
        let r = http_get(&format!("{base}/revocations?since={since}&epoch={epoch}"), &[]).expect("GET /revocations");
        assert_eq!(r.status, 200, "{}", r.text());
        let v = r.json().expect("feed page");
        out.extend(v["revocations"].as_array().expect("revocations").iter().cloned());
        since = v["cursor"].as_i64().expect("cursor");
        epoch = v["epoch"].as_str().expect("epoch").to_string();
        if v["more"] != json!(true) {
            return out;
        }
    }
}

fn ended_in_feed(base: &str) -> HashSet<String> {
    whole_feed(base).into_iter().filter(|e| e["kind"] == "task").filter_map(|e| e["value"].as_str().map(String::from)).collect()
}

fn healthz(base: &str) -> Value {
    let r = http_get(&format!("{base}/healthz"), &[]).expect("GET /healthz");
    assert_eq!(r.status, 200, "{}", r.text());
    r.json().expect("healthz")
}

/// A 503 from the minter for a store that cannot record: the documented reason, no token.
fn assert_store_full(r: &HttpResponse, what: &str) {
    assert_eq!(r.status, 503, "{what}: {}", r.text());
    let v = r.json().expect("error JSON");
    assert_eq!(v["error"], "temporarily_unavailable", "{what}: {v}");
    assert_eq!(v["mandate_reason"], "store_full", "{what}: {v}");
    assert!(v.get("access_token").is_none(), "{what}: a token came with the 503: {v}");
    assert_eq!(r.header("retry-after"), Some("1"), "{what}");
}

/// Raises this process's open-files limit (inherited by the minter it starts) to `want`: past
/// the hard limit too when allowed (root), else up to it. The limit it got.
fn raise_nofile(want: u64) -> u64 {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit with a valid, owned struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 0;
        }
        if lim.rlim_cur < want {
            let raised = libc::rlimit { rlim_cur: want, rlim_max: lim.rlim_max.max(want) };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) != 0 {
                lim.rlim_cur = want.min(lim.rlim_max);
                libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
            }
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        }
    }
    lim.rlim_cur
}

/// Whether the peer closed `s` (EOF or reset); reads and keeps what it sent.
fn closed_by_peer(s: &mut TcpStream, got: &mut Vec<u8>) -> bool {
    let mut buf = [0u8; 512];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::TimedOut => return false,
            Err(_) => return true,
        }
    }
}

// ---------------------------------------------------------------------------------------
// 1. Slow clients

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Slow {
    /// Connects and sends nothing.
    Silent,
    /// Sends half a request head.
    Head,
    /// Sends a whole head announcing 4096 bytes of body, then 20 of them.
    Body,
}

#[test]
fn slow_clients_are_cut_off_capped_and_their_memory_is_given_back() {
    const MAX: usize = 1000;
    const TIMEOUT_MS: u64 = 5000;
    let (n_silent, n_head, n_body) = (1000usize, 1000usize, 500usize);
    let total = n_silent + n_head + n_body;
    let nofile = raise_nofile(total as u64 + 512);
    assert!(nofile >= total as u64 + 256, "open-files limit {nofile} is too low for {total} slow clients");

    let issuer = SvidIssuer::new();
    let dir = tempfile::tempdir().expect("temp dir");
    let cfg = write_config(
        dir.path(),
        &issuer,
        json!({"workers": 2, "limits": {"max_connections": MAX, "header_read_timeout_ms": TIMEOUT_MS, "body_read_timeout_ms": TIMEOUT_MS}}),
    );
    let minter = MinterProc::start(&cfg);
    let base = minter.url("");
    let svid = agent_svid(&issuer);

    // Baseline: after ordinary traffic (one connection per exchange), settled.
    for i in 0..400 {
        let r = exchange(&base, &svid, &format!("warm-{}", i % 8)).expect("exchange");
        assert_eq!(r.status, 200, "{}", r.text());
    }
    std::thread::sleep(Duration::from_millis(2500));
    let baseline = minter.rss_kib();

    // The flood: body stallers first (they complete a head, so they cannot be evicted), then
    // silent and half-head connections interleaved.
    let t0 = Instant::now();
    let mut kinds: Vec<Slow> = vec![Slow::Body; n_body];
    for i in 0..(n_silent + n_head) {
        kinds.push(if i % 2 == 0 { Slow::Silent } else { Slow::Head });
    }
    // Four threads connect, so that the flood is in before the first timeout even on a busy
    // machine; the body stallers go first.
    let addr = minter.addr;
    let open_one = move |kind: Slow| -> Option<(Slow, TcpStream, Vec<u8>)> {
        let mut s = TcpStream::connect(addr).ok()?; // refused at connect: not held
        let _ = match kind {
            Slow::Silent => Ok(()),
            Slow::Head => s.write_all(b"POST /token HTTP/1.1\r\nhost: minter\r\ncontent-type: applica"),
            Slow::Body => s.write_all(
                b"POST /token HTTP/1.1\r\nhost: minter\r\ncontent-type: application/x-www-form-urlencoded\r\ncontent-length: 4096\r\n\r\ngrant_type=urn%3Aietf",
            ),
        }; // a connection the minter already closed may refuse the write
        s.set_nonblocking(true).expect("nonblocking");
        Some((kind, s, Vec::new()))
    };
    let mut socks: Vec<(Slow, TcpStream, Vec<u8>)> = Vec::with_capacity(total);
    for batch in [&kinds[..n_body], &kinds[n_body..]] {
        let chunk = batch.len().div_ceil(4);
        let parts: Vec<Vec<_>> = std::thread::scope(|s| {
            let handles: Vec<_> = batch.chunks(chunk).map(|c| s.spawn(move || c.iter().filter_map(|k| open_one(*k)).collect::<Vec<_>>())).collect();
            handles.into_iter().map(|h| h.join().expect("connect thread")).collect()
        });
        socks.extend(parts.into_iter().flatten());
    }
    let opened = t0.elapsed();

    // While the flood holds every place: a well-behaved client is still served.
    let during = exchange(&base, &svid, "legit").expect("exchange during the flood");
    assert_eq!(during.status, 200, "a well-behaved client was starved: {}", during.text());
    let h = healthz(&base);
    let peak = minter.rss_kib();
    let c = &h["connections"];
    eprintln!("flood of {total} opened in {opened:?}; minter {c}; RSS {baseline} KiB → {peak} KiB");
    assert!(c["open"].as_u64().expect("open") <= MAX as u64, "{c}");
    assert!(c["accepted"].as_u64().expect("accepted") + c["refused"].as_u64().expect("refused") >= (400 + total) as u64, "{c}");

    // The cap, seen from the clients: at most MAX of the slow sockets are still open.
    let (settled, _) = wait_until(Duration::from_secs(10), || {
        let mut open = 0;
        for (_, s, got) in socks.iter_mut() {
            if !closed_by_peer(s, got) {
                open += 1;
            }
        }
        (open <= MAX).then_some(open)
    });
    let still_open = settled.unwrap_or_else(|| panic!("more than {MAX} slow connections stayed open"));
    eprintln!("{still_open} of {total} slow sockets open after the flood (cap {MAX})");

    // The timeouts: every slow socket is closed, without a response or with a 408 for a body
    // that did not arrive.
    let (all_closed, took) = wait_until(Duration::from_secs(30), || {
        let mut open = 0;
        for (_, s, got) in socks.iter_mut() {
            if !closed_by_peer(s, got) {
                open += 1;
            }
        }
        (open == 0).then_some(())
    });
    assert!(all_closed.is_some(), "slow connections still open after the timeouts");
    eprintln!("all slow sockets closed {took:?} after the last check ({:?} after the flood began)", t0.elapsed());
    let mut got_408 = 0;
    for (kind, _, got) in &socks {
        let text = String::from_utf8_lossy(got);
        if !got.is_empty() {
            assert!(text.starts_with("HTTP/1.1 408"), "{kind:?} got {text:?}");
            assert!(text.contains("\"error\":\"invalid_request\""), "{text}");
            assert_eq!(*kind, Slow::Body, "{text}");
            got_408 += 1;
        }
    }
    let h = healthz(&base);
    let c = &h["connections"];
    eprintln!("after: minter {c}; {got_408} body stallers got 408");
    assert!(c["open"].as_u64().expect("open") <= 2, "{c}");
    assert!(c["body_timeouts"].as_u64().expect("body_timeouts") >= 1, "{c}");
    assert!(c["header_timeouts"].as_u64().expect("header_timeouts") + c["evicted"].as_u64().expect("evicted") >= 1, "{c}");
    drop(socks);

    // The memory comes back: within 16 MiB of the baseline (one trim tick after the last close).
    let bound = baseline + 16 * 1024;
    let (after, _) = wait_until(Duration::from_secs(10), || {
        let rss = minter.rss_kib();
        (rss <= bound).then_some(rss)
    });
    let now = minter.rss_kib();
    eprintln!("RSS: baseline {baseline} KiB, during the flood {peak} KiB, after {now} KiB");
    assert!(after.is_some(), "RSS {now} KiB did not return within 16 MiB of the baseline {baseline} KiB (peak {peak} KiB)");
    // And the minter still serves.
    let r = exchange(&base, &svid, "after").expect("exchange after the flood");
    assert_eq!(r.status, 200, "{}", r.text());
}

// ---------------------------------------------------------------------------------------
// 2. A full disk

#[test]
fn full_disk_stops_minting_with_503_and_acknowledges_nothing_unrecorded() {
    if !prerequisites("full_disk_stops_minting_with_503_and_acknowledges_nothing_unrecorded") {
        return;
    }
    let issuer = SvidIssuer::new();
    let state = tempfile::tempdir().expect("minter state dir");
    let state_dir = state.path().join("state");
    // `store.max_pages: 1`: the database may not grow past its schema (SQLite never caps it
    // below its current size): every table has the one page it was created with.
    let minter = mandate_minter::spawn(
        MinterConfig::from_json(minter_config(
            &issuer,
            &state_dir,
            json!({"dev": true, "tasks": {"require_registered": true}, "store": {"max_pages": 1}}),
        ))
        .expect("minter config"),
    )
    .expect("minter starts");
    let base = minter.base_url();
    let echo = MockServer::echo().expect("echo upstream");
    let envoy = Envoy::start(
        "mandate.yaml",
        Vars::new()
            .plugin_config_json(&plugin_config(&issuer, json!({"cluster": "minter", "timeout_ms": 2000, "revocations": {"interval_ms": 300}})))
            .upstream_port(echo.port())
            .cluster("minter", minter.addr.port()),
    )
    .expect("envoy starts");
    let svid = agent_svid(&issuer);
    let mut handed_out: Vec<String> = Vec::new();
    let upstream_jti = |echo: &MockServer| -> String {
        let seen = echo.requests().pop().expect("the service got the request");
        let auth = seen.header("authorization").expect("credential upstream");
        jwt_claims(auth.strip_prefix("Bearer ").expect("Bearer"))["jti"].as_str().expect("jti").to_string()
    };

    // Two tasks while there is room; through Envoy, the first one is minted and served.
    let task = create_task(&base, &issuer);
    let task2 = create_task(&base, &issuer);
    let r = get_order(&envoy, &svid, &task);
    assert_eq!(r.status, 200, "{}", r.text());
    handed_out.push(upstream_jti(&echo));

    // The disk fills: exchanges succeed while their records fit, then 503 store_full.
    let mut refused = None;
    for _ in 0..2000 {
        let r = exchange(&base, &svid, &task).expect("exchange");
        match r.status {
            200 => handed_out.push(jti_of(&r)),
            _ => {
                refused = Some(r);
                break;
            }
        }
    }
    let refused = refused.expect("the store never filled up");
    assert_store_full(&refused, "exchange on a full disk");
    eprintln!("{} tokens issued before the store was full", handed_out.len());
    // It stays refused, and nothing was issued unrecorded.
    assert_store_full(&exchange(&base, &svid, &task).expect("exchange"), "exchange on a full disk, again");

    // Through the proxy: 503 with the documented reason code, and the service receives nothing.
    let served_before = echo.request_count();
    let r = get_order(&envoy, &svid, &task2);
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(reason(&r), "credential_unavailable", "{}", r.text());
    assert_eq!(echo.request_count(), served_before, "the service received a request without a recorded credential");

    // Fill what is left for revocations, then a task end is not acknowledged.
    let mut filled = false;
    for i in 0..2000 {
        let r = http("POST", &format!("{base}/revoke"), &[("content-type", "application/json")], json!({"jti": format!("filler{i:05}")}).to_string().as_bytes())
            .expect("POST /revoke");
        if r.status != 200 {
            assert_store_full(&r, "revocation on a full disk");
            filled = true;
            break;
        }
    }
    assert!(filled, "the revocations never filled up");
    let r = end_task(&base, &task).expect("end task");
    assert_store_full(&r, "task end on a full disk");
    let t = http_get(&format!("{base}/tasks/{task}"), &[]).expect("GET /tasks");
    assert_eq!(t.json().expect("task")["state"], "active", "an unacknowledged end took effect: {}", t.text());
    assert!(!ended_in_feed(&base).contains(&task), "the feed lists a task end that was refused");

    // Space returns: everything works again.
    minter.state.store.set_max_pages(mandate_minter::store::SQLITE_MAX_PAGES).expect("space returns");
    let r = exchange(&base, &svid, &task).expect("exchange");
    assert_eq!(r.status, 200, "{}", r.text());
    handed_out.push(jti_of(&r));
    let r = get_order(&envoy, &svid, &task2);
    assert_eq!(r.status, 200, "{}", r.text());
    handed_out.push(upstream_jti(&echo));
    let r = end_task(&base, &task).expect("end task");
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(ended_in_feed(&base).contains(&task), "the acknowledged task end is not in the feed");
    let (refusal, _) = wait_for_refusal(&envoy, &svid, &task, Duration::from_secs(5));
    let refusal = refusal.expect("the ended task is refused by the proxy");
    assert_eq!((refusal.status, reason(&refusal).as_str()), (403, "task_revoked"), "{}", refusal.text());

    // Every token the minter ever handed out is in its store.
    let recorded = mandate_minter::store::issued_jtis(&state_dir).expect("read the store");
    let missing: Vec<&String> = handed_out.iter().filter(|j| !recorded.contains(*j)).collect();
    assert!(missing.is_empty(), "issued but not recorded: {missing:?}");
    drop(envoy);
    minter.shutdown().expect("minter stops");
}

// ---------------------------------------------------------------------------------------
// 3. kill -9 during a burst

#[test]
fn kill_9_during_a_burst_loses_no_acknowledged_revocation_or_credential() {
    const TASKS: usize = 200;
    let issuer = SvidIssuer::new();
    let dir = tempfile::tempdir().expect("temp dir");
    let cfg = write_config(dir.path(), &issuer, json!({"workers": 2, "tasks": {"require_registered": true}}));
    let state_dir = dir.path().join("state");
    let minter = MinterProc::start(&cfg);
    let base = minter.url("");
    let svid = agent_svid(&issuer);

    let tasks: Vec<String> = {
        let out = Mutex::new(Vec::new());
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..TASKS / 4 {
                        let t = create_task(&base, &issuer);
                        out.lock().expect("lock").push(t);
                    }
                });
            }
        });
        out.into_inner().expect("tasks")
    };

    // The burst: 4 threads exchanging for any task, 2 ending tasks, until the minter dies.
    let acked_ends = Arc::new(Mutex::new(Vec::<String>::new()));
    let acked_jtis = Arc::new(Mutex::new(Vec::<String>::new()));
    let stop = AtomicBool::new(false);
    let t0 = Instant::now();
    let kill_at = std::thread::scope(|s| {
        for w in 0..4usize {
            let (tasks, acked_jtis, stop, base, svid) = (&tasks, &acked_jtis, &stop, &base, &svid);
            s.spawn(move || {
                let mut i = w * 7;
                while !stop.load(Ordering::Relaxed) {
                    let Ok(r) = exchange(base, svid, &tasks[i % TASKS]) else { break };
                    match r.status {
                        200 => acked_jtis.lock().expect("lock").push(jti_of(&r)),
                        400 => {} // the task ended meanwhile
                        s => panic!("exchange answered {s}: {}", r.text()),
                    }
                    i += 13;
                }
            });
        }
        for w in 0..2usize {
            let (tasks, acked_ends, stop, base) = (&tasks, &acked_ends, &stop, &base);
            s.spawn(move || {
                for t in tasks.iter().skip(w).step_by(2) {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let Ok(r) = end_task(base, t) else { break };
                    assert_eq!(r.status, 200, "{}", r.text());
                    acked_ends.lock().expect("lock").push(t.clone());
                }
            });
        }
        // Mid-burst: once some of each are acknowledged.
        let (ready, _) = wait_until(Duration::from_secs(30), || {
            (acked_ends.lock().expect("lock").len() >= 20 && acked_jtis.lock().expect("lock").len() >= 100).then_some(())
        });
        let at = t0.elapsed();
        minter.kill9();
        stop.store(true, Ordering::Relaxed);
        assert!(ready.is_some(), "the burst did not get going");
        at
    });
    let acked_ends = acked_ends.lock().expect("lock").clone();
    let acked_jtis = acked_jtis.lock().expect("lock").clone();
    eprintln!("killed {kill_at:?} into the burst: {} task ends and {} credentials acknowledged", acked_ends.len(), acked_jtis.len());
    assert!(acked_ends.len() < TASKS, "the kill came after the burst: every task had ended");

    // Restarted on the same state: everything acknowledged is there.
    let minter = MinterProc::start(&cfg);
    let base = minter.url("");
    let feed = ended_in_feed(&base);
    for t in &acked_ends {
        assert!(feed.contains(t), "acknowledged task end {t} is not in the revocation feed after kill -9");
        let r = http_get(&format!("{base}/tasks/{t}"), &[]).expect("GET /tasks");
        assert_eq!(r.json().expect("task")["state"], "ended", "{}", r.text());
    }
    let r = exchange(&base, &svid, &acked_ends[0]).expect("exchange");
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(r.json().expect("error")["mandate_reason"], "task_ended", "{}", r.text());
    let recorded = mandate_minter::store::issued_jtis(&state_dir).expect("read the store");
    let missing: Vec<&String> = acked_jtis.iter().filter(|j| !recorded.contains(*j)).collect();
    assert!(missing.is_empty(), "{} acknowledged credentials not recorded after kill -9: {:?}", missing.len(), &missing[..missing.len().min(5)]);
    eprintln!("after restart: {} task ends in the feed, {} credentials recorded", feed.len(), recorded.len());
}
