//! Decision logs as `mandate policy usage` reads them (issue 18): any bytes as a log.

use mandate_usage::log::{parse_line, Line, LogReader, Next, MAX_LINE};
use mandate_usage::{Model, Usage};
use std::sync::LazyLock;

static MODEL: LazyLock<Option<Model>> = LazyLock::new(|| {
    let policy = include_bytes!("../../policies/delegation.policy.json");
    Model::from_slice(policy).ok()
});

/// A JWT-shaped run anywhere in the input.
fn jwt_like(s: &[u8]) -> bool {
    mandate_usage::log::has_token_like(s)
}

/// Never panics; a line with a token-shaped value is never read as a record; lines are bounded;
/// every line is counted exactly once (a record, another line, or a skip).
pub fn decision_log(data: &[u8]) {
    let Some(m) = MODEL.as_ref() else { panic!("the delegation policy does not load") };
    let mut r = LogReader::from_reader(std::io::Cursor::new(data.to_vec()));
    let mut lines = 0u64;
    loop {
        match r.next_line() {
            Ok(Next::End) => break,
            Ok(Next::TooLong) => lines += 1,
            Ok(Next::Line(l)) => {
                lines += 1;
                assert!(l.len() <= MAX_LINE, "a line over the cap was returned");
                if let Line::Record(_) = parse_line(l) {
                    assert!(!jwt_like(l), "a line with a token-shaped value was read as a record");
                }
            }
            Err(e) => panic!("reading from memory failed: {e}"),
        }
    }
    let mut u = Usage::new(m);
    let mut r = LogReader::from_reader(std::io::Cursor::new(data.to_vec()));
    if let Err(e) = u.read_from(m, &mut r) {
        panic!("reading from memory failed: {e}");
    }
    assert_eq!(u.records + u.other_lines + u.skipped_total(), lines, "a line was lost or counted twice");
    let report = u.report(m);
    let _ = report.to_text();
    let _ = mandate_usage::html::render(&report, "fuzz");
}
