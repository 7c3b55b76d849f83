//! Writes a demo trust domain for scripts/demo into OUTDIR:
//!   config.json   plugin config trusting `example.org` (inline bundle)
//!   token         a JWT-SVID for spiffe://example.org/ns/shop/sa/checkout-agent
//!   rogue_token   the same claims signed by a key the bundle does not hold

use anyhow::{Context, Result};
use mandate_e2e::{testkit, unix_now, SvidIssuer};
use std::path::PathBuf;

fn main() -> Result<()> {
    let out = PathBuf::from(std::env::args().nth(1).context("usage: mandate-demo-identity OUTDIR")?);
    std::fs::create_dir_all(&out)?;
    let issuer = SvidIssuer::new();
    let workload = "/ns/shop/sa/checkout-agent";
    std::fs::write(out.join("config.json"), issuer.plugin_config().to_string())?;
    std::fs::write(out.join("token"), issuer.svid(workload))?;
    let rogue = testkit::TestKey::es256("k1");
    let now = unix_now();
    let sub = format!("spiffe://{}{}", issuer.trust_domain, workload);
    let claims = testkit::svid_claims(&sub, &issuer.audience, now.saturating_sub(5), now + 300);
    std::fs::write(out.join("rogue_token"), rogue.sign(&claims))?;
    Ok(())
}
