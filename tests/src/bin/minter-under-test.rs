//! The minter as its own process, for tests that kill it (`kill -9`) or measure its memory
//! (tests/tests/minter_faults.rs): `minter-under-test CONFIG` serves like `mandate-minter
//! --config CONFIG`, through the same `mandate_minter::run`.

fn main() -> anyhow::Result<()> {
    let path = std::env::args_os().nth(1).ok_or_else(|| anyhow::anyhow!("usage: minter-under-test CONFIG"))?;
    let config = mandate_minter::config::MinterConfig::load(std::path::Path::new(&path))?;
    mandate_minter::run(config, None)
}
