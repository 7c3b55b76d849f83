//! The minter's answers: the revocation feed, and the token-exchange answer.

use crate::input::Reader;
use crate::NOW;
use mandate_core::config;
use mandate_core::mint::{self, parse_feed, Expected, Revocation, RevocationConfig, RevocationFeed, RevocationKind, RevokedSet};

fn revoked(set: &RevokedSet, r: &Revocation) -> bool {
    match (r.kind, &r.subject) {
        (RevocationKind::Jti, _) => set.jti_revoked(&r.value),
        (RevocationKind::Subject, _) => set.subject_revoked(&r.value),
        (RevocationKind::Task, Some(s)) => set.task_revoked(&r.value, s),
        (RevocationKind::Task, None) => set.task_revoked(&r.value, "spiffe://example.org/anyone"),
    }
}

/// Input: two feed pages separated by NUL (status from the first two bytes), then the same
/// bytes as a token-exchange answer. An accepted page is well formed, every entry in it is
/// then revoked, and a later page (another epoch, a reset) never forgets one.
pub fn revocation_feed(data: &[u8]) {
    let mut r = Reader::new(data);
    let status = match r.u16() {
        s if s % 4 == 0 => s % 600,
        _ => 200,
    };
    let first = r.field();
    let second = r.rest();
    let cfg = RevocationConfig::default();
    let mut feed = RevocationFeed::default();
    feed.activate(NOW);
    let mut all: Vec<Revocation> = Vec::new();
    for (i, page) in [first, second].into_iter().enumerate() {
        let parsed = parse_feed(status, page);
        let applied = feed.on_answer(&cfg, Ok((status, page)), NOW * 1000 + i as u64);
        assert_eq!(parsed, applied, "the page parsed and the page applied differ");
        if let Ok(p) = applied {
            assert_eq!(status, 200, "a page accepted with status {status}");
            if let Some(e) = &p.epoch {
                assert!((1..=128).contains(&e.len()) && e.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.~".contains(&b)), "epoch {e:?} accepted");
            }
            for rev in &p.revocations {
                assert!(!rev.value.is_empty(), "an empty revocation accepted");
                assert!(rev.subject.is_none() || rev.kind == RevocationKind::Task, "a subject kept on a {:?} entry", rev.kind);
            }
            assert!(feed.cursor >= p.cursor.min(feed.cursor), "cursor moved back");
            all.extend(p.revocations);
        }
        for rev in &all {
            assert!(revoked(&feed.revoked, rev), "revocation {rev:?} forgotten");
        }
    }
    // The same bytes as a token-exchange answer.
    let cfg = config::parse(br#"{"minter": {"cluster": "minter"}}"#).ok().and_then(|c| c.minter);
    if let Some(m) = cfg {
        let sub = "spiffe://example.org/agent/a";
        let expected = Expected { subject: sub, actor: None, txn: None };
        for body in [first, second] {
            let _ = mint::refusal(status, body);
            if let Ok(c) = mint::parse_response(&m, status, body, NOW, expected, Some("t-1"), "payments", None) {
                assert_eq!(status, 200);
                assert!(c.exp > NOW, "an expired credential accepted");
                assert_eq!(c.subject, sub);
                assert!(!c.value.is_empty() && c.value.bytes().all(|b| b == b' ' || b == b'\t' || (0x21..0x7f).contains(&b)), "credential value unsafe in a header");
            }
        }
    }
}
