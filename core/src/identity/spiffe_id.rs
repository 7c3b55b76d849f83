//! SPIFFE ID parsing, to the SPIFFE-ID specification.
//!
//! `spiffe://` + trust domain (`[a-z0-9._-]`, 1..=255 bytes) + optional path of
//! `/segment`s (`[a-zA-Z0-9._-]`, no empty, `.` or `..` segment, no trailing
//! `/`). No percent-encoding, port, userinfo, query or fragment. ≤ 2048 bytes.

const SCHEME: &str = "spiffe://";
pub const MAX_ID_BYTES: usize = 2048;
pub const MAX_TRUST_DOMAIN_BYTES: usize = 255;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpiffeIdError {
    Empty,
    TooLong,
    WrongScheme,
    EmptyTrustDomain,
    TrustDomainTooLong,
    BadTrustDomainChar,
    EmptySegment,
    DotSegment,
    BadPathChar,
    TrailingSlash,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SpiffeId {
    id: String,
    td_end: usize,
}

impl SpiffeId {
    pub fn parse(s: &str) -> Result<SpiffeId, SpiffeIdError> {
        if s.is_empty() {
            return Err(SpiffeIdError::Empty);
        }
        if s.len() > MAX_ID_BYTES {
            return Err(SpiffeIdError::TooLong);
        }
        // The scheme is matched exactly: `SPIFFE://` is not a SPIFFE ID.
        let rest = s.strip_prefix(SCHEME).ok_or(SpiffeIdError::WrongScheme)?;
        let (td, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        validate_trust_domain(td)?;
        validate_path(path)?;
        Ok(SpiffeId { id: s.to_string(), td_end: SCHEME.len() + td.len() })
    }

    pub fn as_str(&self) -> &str {
        &self.id
    }

    pub fn trust_domain(&self) -> &str {
        self.id.get(SCHEME.len()..self.td_end).unwrap_or("")
    }

    /// The path, starting with `/`, or empty.
    pub fn path(&self) -> &str {
        self.id.get(self.td_end..).unwrap_or("")
    }
}

impl std::fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.id)
    }
}

pub fn validate_trust_domain(td: &str) -> Result<(), SpiffeIdError> {
    if td.is_empty() {
        return Err(SpiffeIdError::EmptyTrustDomain);
    }
    if td.len() > MAX_TRUST_DOMAIN_BYTES {
        return Err(SpiffeIdError::TrustDomainTooLong);
    }
    // This also rejects `:` (port), `@` (userinfo), `%`, `?`, `#` and uppercase.
    if !td.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b)) {
        return Err(SpiffeIdError::BadTrustDomainChar);
    }
    Ok(())
}

fn validate_path(path: &str) -> Result<(), SpiffeIdError> {
    if path.is_empty() {
        return Ok(());
    }
    if path.ends_with('/') {
        return Err(SpiffeIdError::TrailingSlash);
    }
    // `path` starts with '/', so the first split item is empty and skipped.
    for segment in path.split('/').skip(1) {
        if segment.is_empty() {
            return Err(SpiffeIdError::EmptySegment);
        }
        if segment == "." || segment == ".." {
            return Err(SpiffeIdError::DotSegment);
        }
        if !segment.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)) {
            return Err(SpiffeIdError::BadPathChar);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use SpiffeIdError::*;

    #[test]
    fn valid_ids() {
        let id = SpiffeId::parse("spiffe://example.org/ns/prod/sa/agent-1").unwrap();
        assert_eq!(id.trust_domain(), "example.org");
        assert_eq!(id.path(), "/ns/prod/sa/agent-1");
        let id = SpiffeId::parse("spiffe://td_1-x.y").unwrap();
        assert_eq!(id.trust_domain(), "td_1-x.y");
        assert_eq!(id.path(), "");
        assert!(SpiffeId::parse("spiffe://a/B.c_d-E/...x").is_ok());
    }

    #[test]
    fn attacks_are_refused() {
        let cases: &[(&str, SpiffeIdError)] = &[
            ("", Empty),
            ("https://example.org/x", WrongScheme),
            ("SPIFFE://example.org/x", WrongScheme),
            ("spiffe:/example.org/x", WrongScheme),
            ("spiffe://", EmptyTrustDomain),
            ("spiffe:///path", EmptyTrustDomain),
            ("spiffe://Example.org/x", BadTrustDomainChar),
            ("spiffe://example.org:8443/x", BadTrustDomainChar),
            ("spiffe://user@example.org/x", BadTrustDomainChar),
            ("spiffe://exa%6dple.org/x", BadTrustDomainChar),
            ("spiffe://example.org?x=1", BadTrustDomainChar),
            ("spiffe://example.org#frag", BadTrustDomainChar),
            ("spiffe://example.org/", TrailingSlash),
            ("spiffe://example.org/a/", TrailingSlash),
            ("spiffe://example.org//a", EmptySegment),
            ("spiffe://example.org/a//b", EmptySegment),
            ("spiffe://example.org/./a", DotSegment),
            ("spiffe://example.org/a/..", DotSegment),
            ("spiffe://example.org/a/../admin", DotSegment),
            ("spiffe://example.org/a%2Fb", BadPathChar),
            ("spiffe://example.org/a?q=1", BadPathChar),
            ("spiffe://example.org/a#f", BadPathChar),
            ("spiffe://example.org/caf\u{e9}", BadPathChar),
            ("spiffe://example.org/a b", BadPathChar),
            ("spiffe://example.org/a\0b", BadPathChar),
        ];
        for (input, want) in cases {
            assert_eq!(SpiffeId::parse(input), Err(*want), "{input:?}");
        }
    }

    #[test]
    fn length_limits() {
        let td = "a".repeat(255);
        assert!(SpiffeId::parse(&format!("spiffe://{td}/x")).is_ok());
        let td = "a".repeat(256);
        assert_eq!(SpiffeId::parse(&format!("spiffe://{td}/x")), Err(TrustDomainTooLong));
        let base = "spiffe://example.org/";
        let exact = format!("{base}{}", "p".repeat(MAX_ID_BYTES - base.len()));
        assert_eq!(exact.len(), 2048);
        assert!(SpiffeId::parse(&exact).is_ok());
        let over = format!("{exact}p");
        assert_eq!(over.len(), 2049);
        assert_eq!(SpiffeId::parse(&over), Err(TooLong));
    }
}
