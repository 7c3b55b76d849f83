//! `mandate policy usage --html` in a real browser: headless Chromium (Debian's, installed by
//! scripts/setup) loads the page from file://, runs its script, and takes a screenshot. The DOM
//! must say the chart was drawn, and the screenshot must show both bar colours.
//! Skipped when Chromium is missing, unless MANDATE_REQUIRE_CHROMIUM=1 (scripts/test sets it).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use mandate_usage::{html, synth};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn chromium() -> Option<PathBuf> {
    for c in ["chromium", "chromium-browser", "google-chrome"] {
        if let Ok(out) = Command::new("which").arg(c).output() {
            if out.status.success() {
                return Some(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()));
            }
        }
    }
    assert!(std::env::var("MANDATE_REQUIRE_CHROMIUM").is_err(), "MANDATE_REQUIRE_CHROMIUM is set but chromium is missing (scripts/setup installs it)");
    None
}

fn headless(bin: &Path, profile: &Path, extra: &[String], url: &str) -> std::process::Output {
    let mut cmd = Command::new(bin);
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--hide-scrollbars",
        "--window-size=1000,900",
        "--virtual-time-budget=5000",
    ]);
    cmd.arg(format!("--user-data-dir={}", profile.display()));
    cmd.args(extra);
    cmd.arg(url);
    cmd.output().unwrap()
}

#[test]
fn html_report_renders_its_chart_in_headless_chromium() {
    let Some(bin) = chromium() else {
        eprintln!("chromium not installed: skipped");
        return;
    };
    let dir = std::env::temp_dir().join(format!("mandate-usage-html-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let log = dir.join("delegation.log");
    let mut f = std::io::BufWriter::new(std::fs::File::create(&log).unwrap());
    synth::generate(&root().join("policies/delegation.cases.json"), 5_000, &[], true, &mut f).unwrap();
    f.flush().unwrap();
    drop(f);
    let page = dir.join("report.html");
    let out = Command::new(env!("CARGO_BIN_EXE_mandate"))
        .args(["policy", "usage", "--policy", "policies/delegation.policy.json", "--log", log.to_str().unwrap(), "--html", page.to_str().unwrap()])
        .current_dir(root())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = std::fs::read_to_string(&page).unwrap();
    for fetch in [" src=", " href=", "url(", "@import", "fetch(", "XMLHttpRequest"] {
        assert!(!text.contains(fetch), "self-contained: no external fetches ({fetch})");
    }
    let url = format!("file://{}", page.display());

    // The script ran: the DOM after it says so, with one pair of bars per owner (three owners, and the callers no owner answers for).
    let dom = headless(&bin, &dir.join("profile-dom"), &["--dump-dom".into()], &url);
    let dom_text = String::from_utf8_lossy(&dom.stdout);
    assert!(dom_text.contains("data-chart=\"drawn\""), "chart not drawn; stderr: {}", String::from_utf8_lossy(&dom.stderr));
    assert!(dom_text.contains("chart drawn: 4 owners, 8 bars"), "{dom_text}");

    // The screenshot: not blank, and both bar colours are on it.
    let shot = dir.join("report.png");
    let res = headless(&bin, &dir.join("profile-shot"), &[format!("--screenshot={}", shot.display())], &url);
    assert!(shot.exists(), "no screenshot; stderr: {}", String::from_utf8_lossy(&res.stderr));
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&shot).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    let px = match info.color_type {
        png::ColorType::Rgba => 4,
        png::ColorType::Rgb => 3,
        other => panic!("unexpected colour type {other:?}"),
    };
    let bytes = &buf[..info.buffer_size()];
    let near = |p: &[u8], c: (u8, u8, u8)| p[0].abs_diff(c.0) <= 6 && p[1].abs_diff(c.1) <= 6 && p[2].abs_diff(c.2) <= 6;
    let (mut granted, mut used, mut non_white) = (0usize, 0usize, 0usize);
    for p in bytes.chunks_exact(px) {
        if near(p, html::GRANTED_RGB) {
            granted += 1;
        }
        if near(p, html::USED_RGB) {
            used += 1;
        }
        if p[0] < 240 || p[1] < 240 || p[2] < 240 {
            non_white += 1;
        }
    }
    let total = bytes.len() / px;
    assert!(non_white > total / 100, "the screenshot is blank ({non_white} of {total} pixels not white)");
    // Bars are 12 px tall and hundreds wide; the legend swatches alone are 144 px each.
    assert!(granted > 2_000 && used > 1_000, "bars not on the screenshot: granted {granted}, used {used} pixels");
    let _ = std::fs::remove_dir_all(&dir);
}
