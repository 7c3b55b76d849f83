//! The fuzz smoke (stable toolchain): every target over its committed seeds in
//! `fuzz/corpus/<target>/`, then deterministic mutations of them.
//!
//! `fuzz-smoke [TARGET...]`; `FUZZ_SMOKE_SCALE` multiplies the mutation counts (default 1).
//! A failing input is written to `target/fuzz-smoke-failures/` and named in the output.

use mandate_fuzz::mutate::{mutate, Rng};
use mandate_fuzz::{Target, TARGETS};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::Instant;

fn seeds(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if let Ok(data) = std::fs::read(e.path()) {
                out.push((e.file_name().to_string_lossy().into_owned(), data));
            }
        }
    }
    out.sort();
    out
}

fn save(root: &Path, t: &Target, data: &[u8]) -> PathBuf {
    let dir = root.join("target").join("fuzz-smoke-failures").join(t.name);
    let _ = std::fs::create_dir_all(&dir);
    let digest = mandate_core::identity::token_digest(data);
    let name: String = digest.iter().take(8).map(|b| format!("{b:02x}")).collect();
    let path = dir.join(name);
    let _ = std::fs::write(&path, data);
    path
}

fn main() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let corpus = root.join("fuzz").join("corpus");
    let scale: usize = std::env::var("FUZZ_SMOKE_SCALE").ok().and_then(|s| s.parse().ok()).unwrap_or(1);
    let only: Vec<String> = std::env::args().skip(1).collect();
    // A check's panic is reported below; the default hook would print each one twice.
    std::panic::set_hook(Box::new(|_| {}));
    let started = Instant::now();
    let (mut passed, mut failed) = (0usize, 0usize);
    for t in TARGETS.iter().filter(|t| only.is_empty() || only.iter().any(|o| o == t.name)) {
        let seeds = seeds(&corpus.join(t.name));
        let t0 = Instant::now();
        let mut failures: Vec<(String, String)> = Vec::new();
        let mut run = |label: String, data: &[u8]| {
            if let Err(p) = catch_unwind(AssertUnwindSafe(|| (t.check)(data))) {
                let msg = p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_default();
                let path = save(&root, t, data);
                failures.push((format!("{label} (saved as {})", path.display()), msg));
            }
        };
        for (name, data) in &seeds {
            run(format!("seed {name}"), data);
        }
        let mut rng = Rng::new(0x006d_616e_6461_7465 ^ t.name.len() as u64);
        let n = if seeds.is_empty() { 0 } else { t.smoke_mutations * scale };
        for i in 0..n {
            let a = seeds.get(rng.below(seeds.len())).map(|(_, d)| d.as_slice()).unwrap_or_default();
            let b = seeds.get(rng.below(seeds.len())).map(|(_, d)| d.as_slice()).unwrap_or_default();
            let input = mutate(&mut rng, a, b);
            run(format!("mutation {i}"), &input);
        }
        let ms = t0.elapsed().as_millis();
        if seeds.is_empty() {
            failures.push(("corpus".into(), format!("no seeds in fuzz/corpus/{}", t.name)));
        }
        if failures.is_empty() {
            passed += 1;
            println!("fuzz smoke {:<16} ok: {} seeds + {n} mutations in {ms} ms", t.name, seeds.len());
        } else {
            failed += 1;
            println!("fuzz smoke {:<16} FAILED: {} of {} inputs", t.name, failures.len(), seeds.len() + n);
            for (what, msg) in failures.iter().take(5) {
                println!("    {what}: {msg}");
            }
        }
    }
    println!("fuzz smoke took {} ms", started.elapsed().as_millis());
    println!("fuzz-smoke: {passed} passed, {failed} failed");
    if failed > 0 {
        std::process::exit(1);
    }
}
