//! One validation for every value the minter signs, stores or publishes.
//!
//! `/token` (audience, task, intent, tool; for Transaction Tokens also SPIFFE
//! IDs, resource names and JSON pointers), `POST /tasks` (subjects, intents,
//! label), `POST /tasks/{id}/end` and `POST /revoke` (task, jti, subject) all
//! check their values here, so nothing reaches a token, the database or the
//! revocation feed that another endpoint would refuse. The limits keep every
//! feed entry small (a task entry scoped to a subject is at most about 2.5 KB
//! serialised), so a page of the feed always holds many entries.

use mandate_core::identity::spiffe_id::SpiffeId;

/// Task ids (issued, `tsk_…`) and ad-hoc task names: 1..=128 visible ASCII.
pub const MAX_TASK: usize = 128;
/// Intents: 1..=128 visible ASCII.
pub const MAX_INTENT: usize = 128;
/// Audiences: 1..=256 visible ASCII.
pub const MAX_AUDIENCE: usize = 256;
/// Subjects (principals): 1..=2048 bytes.
pub const MAX_SUBJECT: usize = 2048;
/// jtis: 1..=64 base64url characters.
pub const MAX_JTI: usize = 64;
/// Task labels (for people, never an id): 1..=128 visible ASCII.
pub const MAX_LABEL: usize = 128;

/// Prefix of task ids the minter issues; never accepted as an ad-hoc task name.
pub const TASK_ID_PREFIX: &str = "tsk_";

/// Why a value was refused (safe to echo: it never contains the value).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid(pub String);

impl std::fmt::Display for Invalid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn visible_ascii(v: &str) -> bool {
    v.bytes().all(|b| (0x21..=0x7e).contains(&b))
}

fn bounded_visible(name: &str, v: &str, max: usize) -> Result<(), Invalid> {
    if v.is_empty() || v.len() > max || !visible_ascii(v) {
        return Err(Invalid(format!("`{name}` must be 1-{max} visible ASCII characters")));
    }
    Ok(())
}

/// A task id or an ad-hoc task name.
pub fn task(v: &str) -> Result<(), Invalid> {
    bounded_visible("task", v, MAX_TASK)
}

pub fn intent(v: &str) -> Result<(), Invalid> {
    bounded_visible("intent", v, MAX_INTENT)
}

/// MCP tool names (the `tool` exchange parameter and claim): the rules of intents.
pub fn tool(v: &str) -> Result<(), Invalid> {
    bounded_visible("tool", v, MAX_INTENT)
}

pub fn audience(v: &str) -> Result<(), Invalid> {
    bounded_visible("audience", v, MAX_AUDIENCE)
}

pub fn label(v: &str) -> Result<(), Invalid> {
    bounded_visible("label", v, MAX_LABEL)
}

/// A principal: 1..=2048 bytes of visible ASCII without `"` or `\` (so its
/// JSON form is never longer than itself), a valid SPIFFE ID when it starts
/// with `spiffe://`.
pub fn subject(v: &str) -> Result<(), Invalid> {
    if v.is_empty() || v.len() > MAX_SUBJECT || !visible_ascii(v) || v.contains(['"', '\\']) {
        return Err(Invalid(format!("`subject` must be 1-{MAX_SUBJECT} visible ASCII characters (no `\"` or `\\`)")));
    }
    if v.starts_with("spiffe://") && SpiffeId::parse(v).is_err() {
        return Err(Invalid("`subject` is not a valid SPIFFE ID".into()));
    }
    Ok(())
}

/// A SPIFFE ID (a `subject` that must be one): `delegate`, `sub`, `act.sub`, `may_act.sub`.
pub fn spiffe_id(v: &str) -> Result<(), Invalid> {
    if !v.starts_with("spiffe://") || subject(v).is_err() {
        return Err(Invalid("expected a SPIFFE ID (spiffe://trust-domain/path)".into()));
    }
    Ok(())
}

/// Most bytes of a resource name (as policies spell them: `[a-z0-9._-]`).
pub const MAX_RESOURCE: usize = 128;

/// A policy resource name (`tctx.resources`): 1-128 of `[a-z0-9._-]`.
pub fn resource_name(v: &str) -> Result<(), Invalid> {
    if v.is_empty() || v.len() > MAX_RESOURCE || !v.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b)) {
        return Err(Invalid(format!("resource names must be 1-{MAX_RESOURCE} characters of [a-z0-9._-]")));
    }
    Ok(())
}

/// Most bytes of a JSON pointer (`tctx.arguments[].pointer`).
pub const MAX_POINTER: usize = 256;

/// An RFC 6901 JSON pointer into a tool call's arguments: `/`-prefixed, `~` only as `~0` or
/// `~1`, 1-256 bytes, no control characters.
pub fn json_pointer(v: &str) -> Result<(), Invalid> {
    let b = v.as_bytes();
    let escapes_ok = b.iter().enumerate().all(|(i, c)| *c != b'~' || matches!(b.get(i + 1), Some(b'0' | b'1')));
    if !v.starts_with('/') || v.len() > MAX_POINTER || v.chars().any(char::is_control) || !escapes_ok {
        return Err(Invalid(format!("a pointer must be an RFC 6901 JSON pointer starting with `/`, at most {MAX_POINTER} bytes")));
    }
    Ok(())
}

pub fn jti(v: &str) -> Result<(), Invalid> {
    if v.is_empty() || v.len() > MAX_JTI || !v.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
        return Err(Invalid(format!("`jti` must be 1-{MAX_JTI} base64url characters")));
    }
    Ok(())
}

/// Whether `v` has the shape of a task id this minter issues (`tsk_` + 22 base64url).
pub fn is_issued_task_id(v: &str) -> bool {
    v.strip_prefix(TASK_ID_PREFIX).is_some_and(|r| r.len() == 22 && r.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn audience_with_control_chars_non_ascii_or_60kb_is_refused() {
        assert!(audience("payments-api").is_ok());
        for bad in ["", "pay\nments", "pay\u{0}", "pay ments", "pay\tments", "paymënts", "\u{7f}x"] {
            assert!(audience(bad).is_err(), "{bad:?}");
        }
        assert!(audience(&"a".repeat(60 * 1024)).is_err());
        assert!(audience(&"a".repeat(MAX_AUDIENCE)).is_ok());
        assert!(audience(&"a".repeat(MAX_AUDIENCE + 1)).is_err());
    }

    #[test]
    fn task_and_intent_names_with_newline_nul_space_non_ascii_or_2kb_are_refused() {
        assert!(task("CASE-7:x/y").is_ok());
        assert!(intent("ticket.read").is_ok());
        for bad in ["", "a\nb", "a\u{0}b", "a b", "tâche", "a\r", "\u{1b}[31m"] {
            assert!(task(bad).is_err(), "{bad:?}");
            assert!(intent(bad).is_err(), "{bad:?}");
            assert!(label(bad).is_err(), "{bad:?}");
        }
        assert!(task(&"t".repeat(2048)).is_err());
        assert!(task(&"t".repeat(MAX_TASK)).is_ok());
        assert!(task(&"t".repeat(MAX_TASK + 1)).is_err());
        assert!(intent(&"i".repeat(MAX_INTENT + 1)).is_err());
    }

    #[test]
    fn forged_subjects_are_refused() {
        assert!(subject("spiffe://example.org/agent/a1").is_ok());
        assert!(subject("https://issuer.example#user-1").is_ok());
        for bad in [
            "",
            "spiffe://example.org/agent/a1\n",
            "spiffe://example.org/a\u{0}",
            "spiffe://example.org/a b",
            "spiffe://exämple.org/a",
            "spiffe://example.org/../admin",
            "spiffe://example.org/a/",
            "spiffe://Example.org/a",
            "x\"y",
            "x\\y",
        ] {
            assert!(subject(bad).is_err(), "{bad:?}");
        }
        let long = format!("spiffe://example.org/{}", "a".repeat(MAX_SUBJECT));
        assert!(subject(&long).is_err());
    }

    #[test]
    fn jtis_outside_base64url_are_refused() {
        assert!(jti("AbC-_09").is_ok());
        for bad in ["", "a b", "a\n", "a=b", "a+b", "é"] {
            assert!(jti(bad).is_err(), "{bad:?}");
        }
        assert!(jti(&"a".repeat(MAX_JTI + 1)).is_err());
        assert!(jti(&"a".repeat(2048)).is_err());
    }

    #[test]
    fn spiffe_ids_resource_names_and_pointers() {
        assert!(spiffe_id("spiffe://example.org/agent/b").is_ok());
        for bad in ["", "bob", "https://x/y", "spiffe://example.org/../b", "spiffe://example.org/b\n", "spiffe://Example.org/b"] {
            assert!(spiffe_id(bad).is_err(), "{bad:?}");
        }
        assert!(resource_name("billing-api.v2_x").is_ok());
        for bad in ["", "Billing", "a b", "a/b", "é", &"a".repeat(MAX_RESOURCE + 1)] {
            assert!(resource_name(bad).is_err(), "{bad:?}");
        }
        assert!(json_pointer("/a/b~0c/~1").is_ok());
        for bad in ["", "a", "/a~", "/a~x", "/a\n", "/a\u{7f}", &format!("/{}", "a".repeat(MAX_POINTER))] {
            assert!(json_pointer(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn issued_task_id_shape() {
        assert!(is_issued_task_id("tsk_AAAAAAAAAAAAAAAAAAAAAA"));
        assert!(!is_issued_task_id("tsk_short"));
        assert!(!is_issued_task_id("CASE-7"));
    }
}
