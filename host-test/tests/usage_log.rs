//! `mandate policy usage` and `suggest` (issue 18) over synthetic decision logs generated from
//! the `policies/` examples, and over bad log lines.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use mandate_host_test::usage::{self, log, synth, Model, Usage};
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("mandate-usage-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d.join(name)
}

fn gen(cases: &str, n: u64, drop: &[&str], file: &str) -> PathBuf {
    let path = tmp(file);
    let mut f = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
    synth::generate(&root().join("policies").join(cases), n, drop, true, &mut f).unwrap();
    drop_writer(f);
    path
}

fn drop_writer(f: std::io::BufWriter<std::fs::File>) {
    f.into_inner().unwrap().sync_all().unwrap();
}

#[test]
fn explore() {
    let log = gen("support-agent.cases.json", 2000, &["escalation-customer-update"], "explore.log");
    let m = Model::load(&root().join("policies/support-agent.policy.json")).unwrap();
    let u = Usage::read(&m, &log).unwrap();
    let r = u.report(&m);
    println!("{}", r.to_text());
    let s = usage::suggest::suggest(&m, &u).unwrap();
    for c in &s.changes {
        println!("{} {}", c.subject, c.change);
    }
    let text = serde_json::to_string_pretty(&s.document).unwrap();
    let new = Model::from_slice(text.as_bytes()).unwrap();
    let rp = usage::suggest::replay(&m, &new, &log).unwrap();
    println!("{rp:#?}");
    let _ = log::MAX_LINE;
}
