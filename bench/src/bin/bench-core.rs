//! `bench-core [--quick] [--only warm|cold]`: where the filter's time goes, natively.
//!
//! Drives mandate's host-independent core (`Engine`) the way the proxy-wasm shell does for one
//! request, stage by stage, with the bench's own configuration (`common.rs`): building the header
//! list (what `get_map_bytes` hands over), `Engine::on_request` (identity, intent, policy,
//! credential), the decision record's JSON, the per-request metric names, and the log line.
//! Native code, so absolute figures are lower than in V8; the split is what matters. `--only`
//! runs one path in a loop for `perf record`.

#[path = "../common.rs"]
mod common;

fn main() {
    native::main()
}

#[allow(clippy::unwrap_used, clippy::expect_used)]
mod native {
    use crate::common::{
        claims, mcp_request, plugin_config, plugin_config_mcp, AUD, HOST, INTENT, MCP_HOST,
        MCP_INTENT, MCP_PATH, PATH, TASK,
    };
    use mandate_core::config;
    use mandate_core::engine::{Engine, Request, Verdict};
    use mandate_core::headers::{serialize_pairs, Headers};
    use mandate_core::identity::token_digest;
    use mandate_core::record::{DecisionRecord, LOG_PREFIX};
    use mandate_core::testkit::{spiffe_bundle, TestKey};
    use serde_json::json;
    use std::collections::HashMap;
    use std::hint::black_box;
    use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

    fn bench(name: &str, min: Duration, mut f: impl FnMut()) -> f64 {
        for _ in 0..100 {
            f();
        }
        let start = Instant::now();
        let mut n = 0u64;
        while start.elapsed() < min {
            for _ in 0..100 {
                f();
            }
            n += 100;
        }
        let ns = start.elapsed().as_nanos() as f64 / n as f64;
        println!("{name:<52} {ns:>10.0} ns/op");
        ns
    }

    /// What Envoy hands the filter for a wrk request (pseudo-headers, wrk's, Envoy's own).
    fn pairs(token: &str, task: &str) -> Vec<(String, Vec<u8>)> {
        [
            (":authority", HOST),
            (":path", PATH),
            (":method", "GET"),
            (":scheme", "http"),
            ("authorization", &format!("Bearer {token}")),
            ("x-agent-intent", INTENT),
            ("x-agent-task", task),
            ("x-forwarded-proto", "http"),
            ("x-request-id", "6a1f8a2e-3d55-4c1e-9b8e-2f7f3c1d9a10"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
        .collect()
    }

    fn minted(now: u64) -> Vec<u8> {
        minted_for(now, INTENT, None)
    }

    fn minted_for(now: u64, intent: &str, tool: Option<&str>) -> Vec<u8> {
        use mandate_core::testkit::b64;
        let jwt = format!(
            "{}.{}.{}",
            b64(br#"{"alg":"ES256","typ":"JWT","kid":"m"}"#),
            b64(json!({"iss": "https://minter.bench.test", "sub": crate::common::PRINCIPAL, "aud": "tickets", "exp": now + 300,
                       "iat": now, "jti": "AAAAAAAAAAAAAAAAAAAAAA", "scope": "tickets:read", "task": TASK, "intent": intent,
                       "tool": tool, "client_id": "loopback"}).to_string().as_bytes()),
            b64(&[7u8; 64])
        );
        json!({"access_token": jwt, "issued_token_type": "urn:ietf:params:oauth:token-type:jwt", "token_type": "Bearer",
               "expires_in": 300, "scope": "tickets:read"})
        .to_string()
        .into_bytes()
    }

    type IdPair = (Option<u32>, Option<u32>);

    /// The shell's per-request metric bookkeeping: ids looked up by (effect, reason) and by
    /// static name (the host calls themselves are not here).
    fn metrics(
        ids: &mut HashMap<String, Option<u32>>,
        decisions: &mut HashMap<(u8, &'static str), IdPair>,
        reason: &'static str,
    ) {
        let d = *decisions.entry((0, reason)).or_insert((Some(1), Some(2)));
        black_box(d);
        for name in [
            "mandate.cache.identity.hit",
            "mandate.cache.decision.hit",
            "mandate.cache.credential.hit",
        ] {
            let id = match ids.get(name) {
                Some(i) => *i,
                None => {
                    ids.insert(name.to_string(), Some(3));
                    Some(3)
                }
            };
            black_box(id);
        }
    }

    /// One warm request the way the shell handles it: index the host's header map, run the
    /// engine, write the record line into the reused buffer, look up the metric ids.
    fn shell_request(
        engine: &mut Engine,
        map: &[u8],
        now: u64,
        line: &mut Vec<u8>,
        ids: &mut HashMap<String, Option<u32>>,
        decs: &mut HashMap<(u8, &'static str), IdPair>,
    ) {
        let h = Headers::from_map(map.to_vec()).unwrap();
        let out = engine.on_request(&Request { headers: &h, now });
        line.clear();
        line.extend_from_slice(LOG_PREFIX.as_bytes());
        DecisionRecord::new(&out.decision, Some("bench"), "0123456789ab", now * 1000, 42)
            .write_json(line);
        metrics(ids, decs, out.decision.reason().code());
        black_box(&*line);
    }

    pub fn main() {
        let args: Vec<String> = std::env::args().collect();
        let quick = args.iter().any(|a| a == "--quick");
        let only = args
            .iter()
            .position(|a| a == "--only")
            .and_then(|i| args.get(i + 1))
            .cloned();
        let min = Duration::from_millis(if quick { 300 } else { 1500 });
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let key = TestKey::es256("bench-es256-1");
        let bundle = spiffe_bundle(&[&key], None);
        let cfg = plugin_config(&bundle, 7260, 1024);
        let mut engine =
            Engine::new(config::parse(cfg.to_string().as_bytes()).unwrap(), 7, None).unwrap();
        let token = key.sign(&claims(now - 5, now + 7200, None));
        let warm_pairs = pairs(&token, TASK);
        // What the host hands over: the whole map, serialized, in one buffer.
        let warm_map = serialize_pairs(&warm_pairs);

        // First request: mints; answer it so the credential is cached (the warm path's state).
        let out = engine.on_request(&Request {
            headers: &Headers::new(warm_pairs.clone()),
            now,
        });
        let Verdict::Mint(plan) = out.verdict else {
            panic!("expected a mint plan: {:?}", out.decision)
        };
        let mut d = out.decision;
        let (v, failure) = engine.finish_mint(&plan, Ok((200, &minted(now))), now, &mut d);
        assert!(
            failure.is_none() && matches!(v, Verdict::Forward(_)),
            "{v:?}"
        );
        let out = engine.on_request(&Request {
            headers: &Headers::new(warm_pairs.clone()),
            now,
        });
        assert!(
            out.decision.identity_cache_hit
                && out.decision.decision_cache_hit
                && out.decision.credential_cache_hit
        );
        let json_len =
            DecisionRecord::new(&out.decision, Some("bench"), "0123456789ab", now * 1000, 42)
                .to_json()
                .len();

        if only.as_deref() == Some("mcp-body") {
            mcp(&key, now, Duration::from_secs(10));
            return;
        }
        if only.as_deref() == Some("warm") {
            let mut ids = HashMap::new();
            let mut decs = HashMap::new();
            let t0 = Instant::now();
            let mut line = Vec::with_capacity(2048);
            while t0.elapsed() < Duration::from_secs(10) {
                shell_request(&mut engine, &warm_map, now, &mut line, &mut ids, &mut decs);
            }
            return;
        }

        let pool: Vec<Vec<(String, Vec<u8>)>> = (0..5000)
            .map(|i| {
                pairs(
                    &key.sign(&claims(now - 5, now + 7200, Some(format!("pool-{i}")))),
                    TASK,
                )
            })
            .collect();
        if only.as_deref() == Some("cold") {
            let t0 = Instant::now();
            let mut i = 0;
            while t0.elapsed() < Duration::from_secs(10) {
                i = (i + 1) % pool.len();
                black_box(engine.on_request(&Request {
                    headers: &Headers::new(pool[i].clone()),
                    now,
                }));
            }
            return;
        }

        println!("== warm path, per request (identity, decision and credential caches hit)");
        let t_pairs = bench(
            "headers: the host's map (one buffer), indexed in place",
            min,
            || {
                black_box(Headers::from_map(black_box(warm_map.clone())).unwrap());
            },
        );
        let h = Headers::new(warm_pairs.clone());
        let t_engine = bench("Engine::on_request (warm)", min, || {
            black_box(engine.on_request(&Request { headers: &h, now }));
        });
        bench(
            "  for scale: SHA-256 of the token (no longer on the warm path)",
            min,
            || {
                black_box(token_digest(black_box(token.as_bytes())));
            },
        );
        let out = engine.on_request(&Request { headers: &h, now });
        let mut line = Vec::with_capacity(2048);
        let t_record = bench(
            &format!("record line: prefix + JSON ({json_len} bytes) into a reused buffer"),
            min,
            || {
                line.clear();
                line.extend_from_slice(LOG_PREFIX.as_bytes());
                DecisionRecord::new(&out.decision, Some("bench"), "0123456789ab", now * 1000, 42)
                    .write_json(&mut line);
                black_box(&line);
            },
        );
        let mut ids = HashMap::new();
        let mut decs = HashMap::new();
        let reason = out.decision.reason().code();
        let t_metrics = bench("metric ids: 5 map lookups", min, || {
            metrics(&mut ids, &mut decs, reason)
        });
        let mut ids2 = HashMap::new();
        let mut decs2 = HashMap::new();
        let t_all = bench("all of the above, as the shell does it", min, || {
            shell_request(&mut engine, &warm_map, now, &mut line, &mut ids2, &mut decs2)
        });
        println!(
            "split of the warm total: headers {:.0}%, engine {:.0}%, record line {:.0}%, metrics {:.0}%",
            t_pairs / t_all * 100.0,
            t_engine / t_all * 100.0,
            t_record / t_all * 100.0,
            t_metrics / t_all * 100.0,
        );

        println!("== cold path, per request (a fresh token: verification, policy, caches filled; credential cached)");
        let mut i = 0;
        let t_cold = bench("Engine::on_request (fresh ES256 token)", min, || {
            i = (i + 1) % pool.len();
            black_box(engine.on_request(&Request {
                headers: &Headers::new(pool[i].clone()),
                now,
            }));
        });
        let mut cfg_nocache = cfg.clone();
        cfg_nocache["identity"]["cache_size"] = json!(0);
        let mut v = mandate_core::identity::Verifier::new(
            &config::parse(cfg_nocache.to_string().as_bytes())
                .unwrap()
                .identity,
        )
        .unwrap();
        let t_verify = bench(
            "  of which: Verifier::verify (ES256, no cache)",
            min,
            || {
                black_box(v.verify(black_box(token.as_bytes()), now).unwrap());
            },
        );
        println!(
            "cold total / warm engine: {:.0}x; signature check share of cold: {:.0}%",
            t_cold / t_engine,
            t_verify / t_cold * 100.0
        );
        mcp(&key, now, min);
        let _ = AUD;
    }

    /// (i) and (j): an MCP `tools/call` decided from its 2026-07-28 headers, and the same call
    /// with its 1 KB body buffered and judged.
    fn mcp(key: &TestKey, now: u64, min: Duration) {
        let bundle = spiffe_bundle(&[key], None);
        let token = key.sign(&claims(now - 5, now + 7200, None));
        let (body, mcp_headers) = mcp_request();
        let mut pairs: Vec<(String, Vec<u8>)> = [
            (":authority", MCP_HOST),
            (":path", MCP_PATH),
            (":method", "POST"),
            (":scheme", "http"),
            ("authorization", &format!("Bearer {token}")),
            ("x-agent-intent", MCP_INTENT),
            ("x-agent-task", TASK),
            ("x-forwarded-proto", "http"),
            ("x-request-id", "6a1f8a2e-3d55-4c1e-9b8e-2f7f3c1d9a10"),
            ("content-length", &body.len().to_string()),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
        .collect();
        pairs.extend(mcp_headers.iter().map(|(k, v)| (k.to_string(), v.as_bytes().to_vec())));
        let map = serialize_pairs(&pairs);
        let only_body = min >= Duration::from_secs(10);
        for (label, mode) in [("(i) header path", "when_needed"), ("(j) body path, 1 KB", "always")] {
            if only_body && mode != "always" {
                continue;
            }
            let cfg = plugin_config_mcp(&bundle, 7260, 1024, mode);
            let mut engine = Engine::new(config::parse(cfg.to_string().as_bytes()).unwrap(), 7, None).unwrap();
            // Warm it: mint once, then every later request hits the caches.
            let h = Headers::new(pairs.clone());
            let run = |engine: &mut Engine| -> mandate_core::engine::Outcome {
                let mut out = engine.on_request(&Request { headers: &h, now });
                if let Verdict::NeedBody(plan) = &mut out.verdict {
                    let header = plan.take_header_verdict();
                    if let Some(Verdict::Mint(m)) = header {
                        let (_, f) = engine.finish_mint(&m, Ok((200, &minted_for(now, MCP_INTENT, m.request.tool.as_deref()))), now, &mut out.decision);
                        assert!(f.is_none());
                    }
                    let v = engine.on_request_body(plan, body.as_bytes(), now, &mut out.decision);
                    out.verdict = v;
                } else if let Verdict::Mint(m) = &out.verdict {
                    let (v, f) = engine.finish_mint(m, Ok((200, &minted_for(now, MCP_INTENT, m.request.tool.as_deref()))), now, &mut out.decision);
                    assert!(f.is_none());
                    out.verdict = v;
                }
                out
            };
            let _ = run(&mut engine);
            let out = run(&mut engine);
            assert!(matches!(out.verdict, Verdict::Forward(_)), "{label}: {:?}", out.decision);
            assert!(out.decision.credential_cache_hit, "{label}");
            println!("== MCP {label}");
            if only_body {
                let t0 = Instant::now();
                while t0.elapsed() < min {
                    black_box(run(&mut engine));
                }
                return;
            }
            let mut line = Vec::with_capacity(2048);
            let t_engine = bench("Engine (headers, body if any)", min, || {
                black_box(run(&mut engine));
            });
            let t_record = bench("record line", min, || {
                line.clear();
                line.extend_from_slice(LOG_PREFIX.as_bytes());
                DecisionRecord::new(&out.decision, Some("bench"), "0123456789ab", now * 1000, 42).write_json(&mut line);
                black_box(&line);
            });
            let t_headers = bench("headers: the host's map", min, || {
                black_box(Headers::from_map(black_box(map.clone())).unwrap());
            });
            println!("total {:.0} ns (engine {:.0}, record {:.0}, headers {:.0})", t_engine + t_record + t_headers, t_engine, t_record, t_headers);
        }
    }
}
