//! Decisions: ids, effects and the local reply a denial turns into.

use crate::reason::Reason;
use serde::Serialize;

/// Generates decision ids: a per-VM random prefix and a counter. Unique across
/// workers with overwhelming probability, and costs no host call per request.
#[derive(Debug, Clone)]
pub struct DecisionIds {
    prefix: u64,
    counter: u64,
}

impl DecisionIds {
    pub fn new(seed: u64) -> Self {
        DecisionIds { prefix: seed, counter: 0 }
    }

    pub fn next_id(&mut self) -> String {
        self.counter = self.counter.wrapping_add(1);
        // Every request pays for this: hex by hand, no formatter machinery.
        let mut id = String::with_capacity(24);
        push_hex(&mut id, self.prefix, 16);
        push_hex(&mut id, self.counter & 0xffff_ffff, 8);
        id
    }
}

/// The low `digits` nibbles of `v`, lowercase hex, most significant first.
fn push_hex(out: &mut String, v: u64, digits: u32) {
    for i in (0..digits).rev() {
        let nibble = ((v >> (i * 4)) & 0xf) as u8;
        out.push(char::from(if nibble < 10 { b'0' + nibble } else { b'a' + nibble - 10 }));
    }
}

#[cfg(test)]
mod id_tests {
    use super::*;

    #[test]
    fn ids_are_the_prefix_and_counter_in_fixed_width_hex() {
        let mut ids = DecisionIds::new(0x0123_4567_89ab_cdef);
        assert_eq!(ids.next_id(), "0123456789abcdef00000001");
        let mut ids = DecisionIds { prefix: u64::MAX, counter: 0x1_ffff_fffe };
        assert_eq!(ids.next_id(), format!("{:016x}{:08x}", u64::MAX, 0xffff_ffffu64));
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Effect {
    Allow,
    Deny,
    /// A denial in dry-run mode: recorded, but the request continues.
    DryRunDeny,
}

/// A reply the filter sends instead of forwarding the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalReply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

#[derive(Serialize)]
struct ReplyBody<'a> {
    error: &'a str,
    reason: &'a str,
    decision_id: &'a str,
}

impl LocalReply {
    /// The JSON denial reply. Only fixed text, the reason code and the decision
    /// id go in it: never anything taken from the request.
    pub fn deny(reason: Reason, decision_id: &str, decision_header: &str) -> LocalReply {
        let body = serde_json::to_string(&ReplyBody {
            error: reason.message(),
            reason: reason.code(),
            decision_id,
        })
        .unwrap_or_else(|_| String::from("{\"error\":\"internal error\"}"));
        let mut headers = vec![
            ("content-type".to_string(), "application/json".to_string()),
            ("cache-control".to_string(), "no-store".to_string()),
            (decision_header.to_string(), decision_id.to_string()),
        ];
        if reason.http_status() == 401 {
            headers.push(("www-authenticate".to_string(), www_authenticate(reason)));
        }
        LocalReply { status: reason.http_status(), headers, body }
    }
}

fn www_authenticate(reason: Reason) -> String {
    if reason == Reason::TokenMissing {
        // RFC 6750 §3.1: no error code when the request carried no credentials.
        "Bearer".to_string()
    } else {
        format!("Bearer error=\"invalid_token\", error_description=\"{}\"", reason.code())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_distinct_and_fixed_width() {
        let mut ids = DecisionIds::new(0xdead_beef);
        let a = ids.next_id();
        let b = ids.next_id();
        assert_ne!(a, b);
        assert_eq!(a.len(), 24);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
    }

    #[test]
    fn deny_reply_has_reason_and_id() {
        let r = LocalReply::deny(Reason::TokenMissing, "abc", "x-mandate-decision-id");
        assert_eq!(r.status, 401);
        let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
        assert_eq!(v["reason"], "token_missing");
        assert_eq!(v["decision_id"], "abc");
        assert!(r.headers.iter().any(|(k, v)| k == "www-authenticate" && v == "Bearer"));
        let r = LocalReply::deny(Reason::SignatureInvalid, "abc", "x-mandate-decision-id");
        assert!(r.headers.iter().any(|(k, v)| k == "www-authenticate" && v.contains("invalid_token")));
        let r = LocalReply::deny(Reason::NoRuleMatched, "abc", "x-mandate-decision-id");
        assert_eq!(r.status, 403);
        assert!(!r.headers.iter().any(|(k, _)| k == "www-authenticate"));
    }
}
