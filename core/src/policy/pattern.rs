//! Compiled matchers for principals, hosts and path templates.
//!
//! Principal and path patterns work on `/`-separated segments: `*` (or a
//! `{var}` in paths) matches exactly one non-empty segment, a final `**`
//! matches the rest (zero or more segments). Everything else is literal.
//! Host patterns: exact, or `*.example.com` for exactly one more label.
//! Principal patterns know no other glob syntax: `[`, `]`, `?`, `{` and `}` (which never occur
//! in a SPIFFE ID) are refused, so `spiffe://td/[a-z]*` is an error, not a literal.

/// Principal patterns as a JSON Schema pattern: segments are literal (without `*`, `[`, `]`,
/// `?`, `{`, `}`), `*` or `**` (the parser also wants `**` last).
#[cfg(feature = "schema")]
pub const PRINCIPAL_PATTERN_SCHEMA: &str = r"^(?:[^*/\[\]?{}]*|\*|\*\*)(?:/(?:[^*/\[\]?{}]*|\*|\*\*))*$";

#[derive(Debug, Clone, PartialEq, Eq)]
enum Seg {
    Lit(String),
    One,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegPattern {
    segs: Vec<Seg>,
    rest: bool,
    source: String,
}

impl SegPattern {
    /// `templates` allows `{name}` segments (paths); principals use `*`.
    pub fn compile(p: &str, templates: bool) -> Result<SegPattern, String> {
        if p.is_empty() {
            return Err("pattern must not be empty".into());
        }
        let parts: Vec<&str> = p.split('/').collect();
        let mut segs = Vec::with_capacity(parts.len());
        let mut rest = false;
        let last = parts.len() - 1;
        for (i, part) in parts.iter().enumerate() {
            if *part == "**" {
                if i != last {
                    return Err(format!("`**` may only end a pattern: `{p}`"));
                }
                rest = true;
            } else if *part == "*" {
                segs.push(Seg::One);
            } else if templates && part.starts_with('{') && part.ends_with('}') && part.len() > 2 {
                let name = part.get(1..part.len() - 1).unwrap_or("");
                if !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
                    return Err(format!("bad variable `{part}` in `{p}`"));
                }
                segs.push(Seg::One);
            } else if !templates && part.contains(['[', ']', '?', '{', '}']) {
                return Err(format!(
                    "`{p}` is not a glob: principal patterns know only whole-segment `*` and a final `**` ([, ], ?, {{ and }} never occur in a SPIFFE ID)"
                ));
            } else if part.contains('*') || part.contains('{') || part.contains('}') {
                return Err(format!("wildcards must be whole segments: `{p}`"));
            } else {
                segs.push(Seg::Lit((*part).to_string()));
            }
        }
        Ok(SegPattern { segs, rest, source: p.to_string() })
    }

    pub fn matches(&self, s: &str) -> bool {
        // `/a/b/` is `/a/b` to most servers: a trailing slash must not dodge a pattern.
        let s = match s.strip_suffix('/') {
            Some(t) if !t.is_empty() => t,
            _ => s,
        };
        let mut parts = s.split('/');
        for seg in &self.segs {
            match (seg, parts.next()) {
                (Seg::Lit(l), Some(p)) if l == p => {}
                (Seg::One, Some(p)) if !p.is_empty() => {}
                _ => return false,
            }
        }
        self.rest || parts.next().is_none()
    }

    pub fn source(&self) -> &str {
        &self.source
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostPattern {
    Any,
    Exact(String),
    /// `*.example.com` → stored as `.example.com`.
    Subdomain(String),
}

impl HostPattern {
    pub fn compile(p: &str) -> Result<HostPattern, String> {
        if p == "*" {
            return Ok(HostPattern::Any);
        }
        let lower = p.to_ascii_lowercase();
        if lower != p {
            return Err(format!("host `{p}` must be lowercase"));
        }
        if let Some(suffix) = p.strip_prefix("*.") {
            if suffix.is_empty() || suffix.contains('*') {
                return Err(format!("bad host pattern `{p}`"));
            }
            return Ok(HostPattern::Subdomain(format!(".{suffix}")));
        }
        if p.is_empty() || p.contains('*') || p.contains('/') {
            return Err(format!("bad host pattern `{p}`"));
        }
        Ok(HostPattern::Exact(p.to_string()))
    }

    pub fn matches(&self, host: &str) -> bool {
        match self {
            HostPattern::Any => true,
            HostPattern::Exact(h) => h == host,
            HostPattern::Subdomain(suffix) => host
                .strip_suffix(suffix.as_str())
                .is_some_and(|label| !label.is_empty() && !label.contains('.')),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn principal_patterns() {
        let p = SegPattern::compile("spiffe://example.org/agent/*", false).unwrap();
        assert!(p.matches("spiffe://example.org/agent/a1"));
        assert!(!p.matches("spiffe://example.org/agent/a1/sub"));
        assert!(!p.matches("spiffe://example.org/agent"));
        assert!(!p.matches("spiffe://example.org/agentx/a1"));
        let p = SegPattern::compile("spiffe://example.org/agent/**", false).unwrap();
        assert!(p.matches("spiffe://example.org/agent/a1/sub"));
        assert!(p.matches("spiffe://example.org/agent"));
        assert!(!p.matches("spiffe://example.org/agents/x"));
        let p = SegPattern::compile("spiffe://*/agent/**", false).unwrap();
        assert!(p.matches("spiffe://partner.net/agent/x"));
    }

    #[test]
    fn path_templates() {
        let p = SegPattern::compile("/tickets/{id}/comments", true).unwrap();
        assert!(p.matches("/tickets/42/comments"));
        assert!(!p.matches("/tickets//comments"));
        assert!(!p.matches("/tickets/42/comments/1"));
        assert!(p.matches("/tickets/42/comments/"), "a trailing slash must not dodge a pattern");
        let p = SegPattern::compile("/repos/**", true).unwrap();
        assert!(p.matches("/repos/a/b/c"));
        assert!(p.matches("/repos"));
    }

    #[test]
    fn bad_patterns_are_refused() {
        assert!(SegPattern::compile("", false).is_err());
        assert!(SegPattern::compile("/a/**/b", true).is_err());
        assert!(SegPattern::compile("/a*b", true).is_err());
        assert!(SegPattern::compile("/{a-b}", true).is_err());
        assert!(SegPattern::compile("/{x}", false).is_err(), "no templates in principals");
        for bad in ["spiffe://td/[a-z", "spiffe://td/agent-[0-9]", "spiffe://td/a?", "spiffe://td/a]"] {
            let e = SegPattern::compile(bad, false).unwrap_err();
            assert!(e.contains("not a glob"), "{bad}: {e}");
        }
    }

    #[test]
    fn host_patterns() {
        let h = HostPattern::compile("*.example.com").unwrap();
        assert!(h.matches("api.example.com"));
        assert!(!h.matches("example.com"));
        assert!(!h.matches("a.b.example.com"));
        assert!(!h.matches("evilexample.com"));
        assert!(HostPattern::compile("API.example.com").is_err());
        assert!(HostPattern::compile("a*.example.com").is_err());
        assert!(HostPattern::compile("*").unwrap().matches("anything"));
    }
}
