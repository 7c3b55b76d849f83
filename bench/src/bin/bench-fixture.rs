//! `bench-fixture --dir D [--pool N] [--ttl S]`: everything `scripts/bench` needs, fresh per run.
//!
//! Writes into D:
//! * `bundle.json`: the trust domain's SPIFFE bundle (`use: jwt-svid`), `jwks.json`: the same key
//!   as a plain JWKS (for Envoy's `jwt_authn`). The ES256 signing key lives only in this process:
//!   it is generated per run and never written.
//! * `token.jwt`: one JWT-SVID (the warm path and the baselines send it on every request).
//! * `tokens.txt`: N distinct JWT-SVIDs, one per line (the cold path's pool, cycled in order by
//!   `scripts/bench_wrk.lua`; N must exceed the plugin's 4096-entry caches so LRU never hits).
//! * `plugin-warm.json`: mandate's config for (e) and (f): identity, intent-aware policy with its
//!   decision cache, minter with the credential cache, revocation feed.
//! * `plugin-mint-cold.json`: the same with `minter.cache_size: 0` for (g).
//! * `plugin-mcp-header.json`, `plugin-mcp-body.json`: (e)'s config plus an MCP server
//!   (`mcp.body` `when_needed` for (i), `always` for (j)); `mcp-body.json`: the 1 KB `tools/call`
//!   both send, with the headers listed in `fixture.json` (`mcp_request`). Written only when the
//!   plugin accepts them (a filter without MCP support refuses the `mcp` field): `fixture.json`
//!   then says `"mcp": null` and scripts/bench refuses (i) and (j).
//! * `minter.json`: the minter's config (loopback, port 0, one worker, quiet, same bundle).
//! * `spki.hex`: the same public key as hex SubjectPublicKeyInfo DER (the `host-es256` probe's
//!   configuration, diagnostic configuration (h)).
//! * `fixture.json`: a summary (audience, principal, the request to send).

#[path = "../common.rs"]
mod common;

fn main() -> anyhow::Result<()> {
    native::main()
}

mod native {
    use crate::common::{
        claims, mcp_request, minter_config, plugin_config, plugin_config_mcp, AUD, HOST, INTENT,
        MCP_HOST, MCP_INTENT, MCP_PATH, MCP_TOOL, PATH, POST_HOST, PRINCIPAL, TASK, DELEGATE_B, DELEGATE_D, TRUST_DOMAIN,
    };
    use anyhow::{Context, Result};
    use clap::Parser;
    use mandate_core::testkit::{plain_jwks, spiffe_bundle, TestKey};
    use serde_json::{json, Value};
    use std::io::Write;
    use std::path::{Path, PathBuf};
    use std::time::{SystemTime, UNIX_EPOCH};

    #[derive(Parser)]
    #[command(
        name = "bench-fixture",
        about = "keys, tokens and configs for scripts/bench"
    )]
    struct Cli {
        #[arg(long)]
        dir: PathBuf,
        /// Fresh tokens for the cold path (cycled; keep it above the plugin's 4096-entry caches).
        #[arg(long, default_value_t = 10_000)]
        pool: usize,
        /// Token lifetime, seconds (the whole bench must fit in it).
        #[arg(long, default_value_t = 7200)]
        ttl: u64,
    }

    fn write_json(dir: &Path, name: &str, v: &Value) -> Result<PathBuf> {
        let p = dir.join(name);
        std::fs::write(&p, serde_json::to_vec_pretty(v)?)
            .with_context(|| format!("writing {}", p.display()))?;
        Ok(p)
    }

    /// SubjectPublicKeyInfo DER of a P-256 JWK, hex.
    fn spki_hex(jwk: &Value) -> Result<String> {
        use base64::engine::general_purpose::URL_SAFE_NO_PAD;
        use base64::Engine as _;
        const PREFIX: &str = "3059301306072a8648ce3d020106082a8648ce3d03010703420004";
        let coord = |name: &str| -> Result<String> {
            let b = URL_SAFE_NO_PAD.decode(jwk[name].as_str().context("JWK coordinate")?)?;
            anyhow::ensure!(b.len() == 32, "P-256 coordinate of {} bytes", b.len());
            Ok(b.iter().map(|x| format!("{x:02x}")).collect())
        };
        Ok(format!("{PREFIX}{}{}", coord("x")?, coord("y")?))
    }

    pub fn main() -> Result<()> {
        let cli = Cli::parse();
        std::fs::create_dir_all(&cli.dir)
            .with_context(|| format!("creating {}", cli.dir.display()))?;
        let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
        let key = TestKey::es256("bench-es256-1");
        let bundle = spiffe_bundle(&[&key], None);
        write_json(&cli.dir, "bundle.json", &bundle)?;
        let jwks = plain_jwks(&[&key]);
        write_json(&cli.dir, "jwks.json", &jwks)?;
        std::fs::write(cli.dir.join("spki.hex"), spki_hex(&jwks["keys"][0])?)?;

        let (iat, exp) = (now.saturating_sub(5), now + cli.ttl);
        std::fs::write(cli.dir.join("token.jwt"), key.sign(&claims(iat, exp, None)))?;
        // (k): the delegates' own SVIDs (scripts/bench_run.py has the minter chain them).
        for (file, sub) in [("svid-b.jwt", DELEGATE_B), ("svid-d.jwt", DELEGATE_D)] {
            let mut c = claims(iat, exp, None);
            c["sub"] = json!(sub);
            std::fs::write(cli.dir.join(file), key.sign(&c))?;
        }
        let mut pool = std::io::BufWriter::new(std::fs::File::create(cli.dir.join("tokens.txt"))?);
        for i in 0..cli.pool {
            writeln!(
                pool,
                "{}",
                key.sign(&claims(iat, exp, Some(format!("pool-{i}"))))
            )?;
        }
        pool.flush()?;

        let warm = plugin_config(&bundle, cli.ttl + 60, 1024);
        let mint_cold = plugin_config(&bundle, cli.ttl + 60, 0);
        for (name, cfg) in [
            ("plugin-warm.json", &warm),
            ("plugin-mint-cold.json", &mint_cold),
        ] {
            // Never start Envoy with a config the plugin refuses.
            mandate_core::config::parse(cfg.to_string().as_bytes())
                .map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
            write_json(&cli.dir, name, cfg)?;
        }
        write_json(&cli.dir, "minter.json", &minter_config(&bundle))?;

        // MCP (i), (j): only with a filter that knows the `mcp` field.
        let mcp_header = plugin_config_mcp(&bundle, cli.ttl + 60, 1024, "when_needed");
        let mcp_body = plugin_config_mcp(&bundle, cli.ttl + 60, 1024, "always");
        let mcp_ok = [&mcp_header, &mcp_body].iter().all(|cfg| {
            match mandate_core::config::parse(cfg.to_string().as_bytes()) {
                Ok(_) => true,
                Err(e) => {
                    eprintln!("bench-fixture: no MCP configurations (i), (j): the plugin refuses them: {e}");
                    false
                }
            }
        });
        let mcp = if mcp_ok {
            write_json(&cli.dir, "plugin-mcp-header.json", &mcp_header)?;
            write_json(&cli.dir, "plugin-mcp-body.json", &mcp_body)?;
            let (body, headers) = mcp_request();
            std::fs::write(cli.dir.join("mcp-body.json"), &body)?;
            json!({"host": MCP_HOST, "path": MCP_PATH, "intent": MCP_INTENT, "task": TASK, "tool": MCP_TOOL, "plain_host": POST_HOST,
                   "body_file": "mcp-body.json", "body_bytes": body.len(),
                   "headers": headers.iter().map(|(k, v)| json!([k, v])).collect::<Vec<_>>()})
        } else {
            Value::Null
        };

        let summary = json!({
            "dir": cli.dir,
            "audience": AUD,
            "principal": PRINCIPAL,
            "pool": cli.pool,
            "token_exp": exp,
            "request": {"host": HOST, "path": PATH, "intent": INTENT, "task": TASK},
            "mcp": mcp,
            "delegation": {"b": DELEGATE_B, "d": DELEGATE_D, "svid_b": "svid-b.jwt", "svid_d": "svid-d.jwt",
                           "trust_domain": TRUST_DOMAIN},
        });
        write_json(&cli.dir, "fixture.json", &summary)?;
        println!("{summary}");
        Ok(())
    }
}
