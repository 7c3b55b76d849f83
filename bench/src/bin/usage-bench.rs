//! `usage-bench [--records N] [--rounds R] [--keep] [--reuse] [--dir DIR]`: `mandate policy usage`'s
//! throughput over a generated decision log, against baselines measured in the same run on the
//! same file:
//!
//! * `scan`: the line reader alone (lines split, nothing parsed) — the I/O floor;
//! * `parse`: the line reader + `serde_json` reading each record (to `IgnoredAny`): what any
//!   tool that reads this log pays;
//! * `usage`: the whole analysis (records parsed into borrowed fields, every grant, denial,
//!   principal, intent, edge and credential counted).
//!
//! The log is written from `policies/delegation.cases.json` (delegation chains, MCP calls,
//! credentials, allows and denials), 1M records by default (about 0.9 GB, removed afterwards
//! unless --keep). Single-threaded: one core. The goal (issue 18) is ≥ 200k records/s for
//! `usage`; the ratio to `parse` says how much the analysis adds to merely reading the log.

use anyhow::{Context as _, Result};
use clap::Parser;
use mandate_usage::log::{LogReader, Next};
use mandate_usage::{synth, Model, Usage};
use std::io::Write as _;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 1_000_000)]
    records: u64,
    #[arg(long, default_value_t = 3)]
    rounds: u32,
    #[arg(long, default_value = "target/bench-usage")]
    dir: PathBuf,
    #[arg(long)]
    keep: bool,
    /// Use the log a previous `--keep` run left (same --records), not a fresh one.
    #[arg(long)]
    reuse: bool,
}

fn scan(path: &std::path::Path) -> Result<u64> {
    let mut r = LogReader::open(path)?;
    let mut n = 0u64;
    loop {
        match r.next_line()? {
            Next::End => break,
            Next::TooLong => {}
            Next::Line(l) => n += u64::from(!l.is_empty()),
        }
    }
    Ok(n)
}

fn parse(path: &std::path::Path) -> Result<u64> {
    let prefix = mandate_core::record::LOG_PREFIX.as_bytes();
    let mut r = LogReader::open(path)?;
    let mut n = 0u64;
    loop {
        match r.next_line()? {
            Next::End => break,
            Next::TooLong => {}
            Next::Line(l) => {
                let json = l.strip_prefix(prefix).unwrap_or(l);
                if serde_json::from_slice::<serde::de::IgnoredAny>(json).is_ok() {
                    n += 1;
                }
            }
        }
    }
    Ok(n)
}

fn main() -> Result<()> {
    let a = Args::parse();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    std::fs::create_dir_all(&a.dir)?;
    let log = a.dir.join("decisions.log");
    let t = Instant::now();
    if !(a.reuse && log.exists()) {
        let mut f = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(&log)?);
        synth::generate(&root.join("policies/delegation.cases.json"), a.records, &[], true, &mut f)?;
        f.flush()?;
    }
    let bytes = std::fs::metadata(&log)?.len();
    println!("[usage-bench] generated {} records ({:.0} MB) in {:.1} s", a.records, bytes as f64 / 1e6, t.elapsed().as_secs_f64());
    let m = Model::load(&root.join("policies/delegation.policy.json")).context("policy")?;

    let mut best = [f64::MAX; 3];
    for round in 0..a.rounds {
        let t = Instant::now();
        let n = scan(&log)?;
        let s0 = t.elapsed().as_secs_f64();
        anyhow::ensure!(n == a.records, "scan saw {n} lines");
        let t = Instant::now();
        let n = parse(&log)?;
        let s1 = t.elapsed().as_secs_f64();
        anyhow::ensure!(n == a.records, "parse read {n} records");
        let t = Instant::now();
        let u = Usage::read(&m, &log)?;
        let s2 = t.elapsed().as_secs_f64();
        anyhow::ensure!(u.records == a.records && u.skipped_total() == 0, "usage read {} records, skipped {}", u.records, u.skipped_total());
        let r = u.report(&m);
        std::hint::black_box(&r);
        println!(
            "[usage-bench] round {}: scan {:.2} s, parse {:.2} s, usage {:.2} s",
            round + 1,
            s0,
            s1,
            s2
        );
        best = [best[0].min(s0), best[1].min(s1), best[2].min(s2)];
    }
    let rate = |s: f64| a.records as f64 / s;
    let usage_rate = rate(best[2]);
    println!("records/s (best of {} rounds, one thread):", a.rounds);
    println!("  scan  (lines only)            {:>10.0}   {:>6.0} MB/s", rate(best[0]), bytes as f64 / best[0] / 1e6);
    println!("  parse (lines + serde_json)    {:>10.0}   {:>6.0} MB/s", rate(best[1]), bytes as f64 / best[1] / 1e6);
    println!("  usage (mandate policy usage)  {:>10.0}   {:>6.0} MB/s", usage_rate, bytes as f64 / best[2] / 1e6);
    println!("usage / parse = {:.2}   usage / scan = {:.2}", usage_rate / rate(best[1]), usage_rate / rate(best[0]));
    println!("goal >= 200000 records/s: {}", if usage_rate >= 200_000.0 { "met" } else { "NOT met" });
    let summary = serde_json::json!({
        "records": a.records, "bytes": bytes,
        "scan_rps": rate(best[0]), "parse_rps": rate(best[1]), "usage_rps": usage_rate,
        "usage_over_parse": usage_rate / rate(best[1]), "goal_rps": 200_000, "goal_met": usage_rate >= 200_000.0,
    });
    std::fs::write(a.dir.join("summary.json"), serde_json::to_string_pretty(&summary)?)?;
    if !a.keep {
        std::fs::remove_file(&log)?;
    }
    Ok(())
}
