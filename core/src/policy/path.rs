//! Request target normalisation: what the policy matches is exactly what the
//! service will see, or the request is refused.
//!
//! RFC 3986: percent-decode unreserved characters only, uppercase remaining
//! escapes, merge slashes, remove dot segments (§5.2.4), drop the query for
//! matching. Anything a backend might read differently from us — an encoded
//! `/` or `\`, NUL, invalid escapes, invalid or overlong UTF-8 — is refused.

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NormalizedPath {
    /// Normalised path, always starting with `/`.
    pub path: String,
    /// Query string without the `?`, as received.
    pub query: Option<String>,
}

impl NormalizedPath {
    /// The request target to send upstream.
    pub fn target(&self) -> String {
        match &self.query {
            Some(q) => format!("{}?{q}", self.path),
            None => self.path.clone(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathError {
    NotOriginForm,
    EncodedSlash,
    Backslash,
    Nul,
    InvalidEscape,
    InvalidUtf8,
    ControlOrNonAscii,
    Fragment,
    /// `..;x` is `..` to servers that strip path parameters.
    DotSegmentParameter,
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hex_digit(n: u8) -> char {
    char::from_digit(u32::from(n), 16).map_or('0', |c| c.to_ascii_uppercase())
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

pub fn normalize(raw: &[u8]) -> Result<NormalizedPath, PathError> {
    let (path, query) = match raw.iter().position(|&b| b == b'?') {
        Some(i) => (raw.get(..i).unwrap_or(&[]), raw.get(i + 1..)),
        None => (raw, None),
    };
    if path.first() != Some(&b'/') {
        return Err(PathError::NotOriginForm);
    }
    if path.contains(&b'#') {
        return Err(PathError::Fragment);
    }
    let query = match query {
        Some(q) => {
            if q.iter().any(|&b| b == 0 || b.is_ascii_control() || !b.is_ascii()) {
                return Err(PathError::ControlOrNonAscii);
            }
            Some(String::from_utf8_lossy(q).into_owned())
        }
        None => None,
    };

    // Pass 1: decode unreserved escapes, keep the others (uppercased), refuse the dangerous.
    let mut decoded = String::with_capacity(path.len());
    let mut escaped_run: Vec<u8> = Vec::new();
    let mut i = 0;
    while let Some(&b) = path.get(i) {
        if b == b'%' {
            let (Some(h), Some(l)) = (path.get(i + 1).and_then(|&c| hex(c)), path.get(i + 2).and_then(|&c| hex(c)))
            else {
                return Err(PathError::InvalidEscape);
            };
            let v = h * 16 + l;
            match v {
                b'/' => return Err(PathError::EncodedSlash),
                b'\\' => return Err(PathError::Backslash),
                0 => return Err(PathError::Nul),
                _ => {}
            }
            if is_unreserved(v) {
                check_utf8_run(&mut escaped_run)?;
                decoded.push(char::from(v));
            } else {
                escaped_run.push(v);
                decoded.push('%');
                decoded.push(hex_digit(v >> 4));
                decoded.push(hex_digit(v & 15));
            }
            i += 3;
            continue;
        }
        check_utf8_run(&mut escaped_run)?;
        match b {
            0 => return Err(PathError::Nul),
            b'\\' => return Err(PathError::Backslash),
            _ if b.is_ascii_control() || !b.is_ascii() || b == b' ' => return Err(PathError::ControlOrNonAscii),
            _ => decoded.push(char::from(b)),
        }
        i += 1;
    }
    check_utf8_run(&mut escaped_run)?;

    // Pass 2: merge slashes and remove dot segments.
    let mut out: Vec<&str> = Vec::new();
    let segments: Vec<&str> = decoded.split('/').skip(1).collect();
    let last = segments.len().saturating_sub(1);
    let mut trailing_slash = false;
    for (n, seg) in segments.iter().enumerate() {
        match *seg {
            "" => {
                if n == last {
                    trailing_slash = true;
                }
            }
            "." => {
                if n == last {
                    trailing_slash = true;
                }
            }
            ".." => {
                out.pop();
                if n == last {
                    trailing_slash = true;
                }
            }
            s => {
                let before_params = s.split(';').next().unwrap_or(s);
                if s.contains(';') && (before_params == "." || before_params == "..") {
                    return Err(PathError::DotSegmentParameter);
                }
                out.push(s)
            }
        }
    }
    let mut path = String::with_capacity(decoded.len());
    for seg in &out {
        path.push('/');
        path.push_str(seg);
    }
    if trailing_slash || path.is_empty() {
        path.push('/');
    }
    Ok(NormalizedPath { path, query })
}

/// Percent-encoded bytes ≥ 0x80 must form valid, shortest-form UTF-8: an
/// overlong `%C0%AE` is a `.` to some decoders and garbage to others.
fn check_utf8_run(run: &mut Vec<u8>) -> Result<(), PathError> {
    if run.is_empty() {
        return Ok(());
    }
    let ok = std::str::from_utf8(run).is_ok();
    run.clear();
    if ok {
        Ok(())
    } else {
        Err(PathError::InvalidUtf8)
    }
}

/// Lowercases the authority and strips the port (IPv6 literals keep their brackets).
///
/// Only a host the policy can name comes out: a registered name of letters, digits, `-`, `.`,
/// `_` and `~` (trailing dots dropped), or a bracketed IPv6 literal; then at most a port of
/// digits. Anything else (a second port, a `:` or `%` in the name, bytes after the literal's
/// `]`) is refused rather than judged as a host some backend would read differently.
/// Normalising a normalised authority changes nothing.
pub fn normalize_authority(raw: &[u8]) -> Option<String> {
    let s = std::str::from_utf8(raw).ok()?;
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (literal, after) = rest.split_once(']')?;
        if literal.is_empty() || !literal.bytes().all(|b| b.is_ascii_hexdigit() || b == b':' || b == b'.') {
            return None;
        }
        let port = if after.is_empty() { after } else { after.strip_prefix(':')? };
        (format!("[{literal}]"), port)
    } else {
        let (name, port) = s.rsplit_once(':').unwrap_or((s, ""));
        if !name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._~".contains(&b)) {
            return None;
        }
        (name.trim_end_matches('.').to_string(), port)
    };
    if host.is_empty() || port.len() > 5 || !port.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(host.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(p: &str) -> Result<String, PathError> {
        normalize(p.as_bytes()).map(|x| x.path)
    }

    #[test]
    fn plain_paths_are_unchanged() {
        assert_eq!(n("/tickets/42"), Ok("/tickets/42".into()));
        assert_eq!(n("/"), Ok("/".into()));
        assert_eq!(n("/a/b/"), Ok("/a/b/".into()));
    }

    #[test]
    fn query_is_split_off() {
        let p = normalize(b"/search?q=a/../b&x=%2F").unwrap();
        assert_eq!(p.path, "/search");
        assert_eq!(p.query.as_deref(), Some("q=a/../b&x=%2F"));
        assert_eq!(p.target(), "/search?q=a/../b&x=%2F");
    }

    // Attacks, each named for what it tries.
    #[test]
    fn traversal_to_admin() {
        assert_eq!(n("/a/../admin"), Ok("/admin".into()));
    }
    #[test]
    fn traversal_above_root() {
        assert_eq!(n("/../../etc/passwd"), Ok("/etc/passwd".into()));
    }
    #[test]
    fn double_slash_prefix() {
        assert_eq!(n("//admin"), Ok("/admin".into()));
    }
    #[test]
    fn slashes_in_the_middle() {
        assert_eq!(n("/public///..//admin"), Ok("/admin".into()));
    }
    #[test]
    fn encoded_dot_dot_lowercase() {
        assert_eq!(n("/a/%2e%2e/admin"), Ok("/admin".into()));
    }
    #[test]
    fn encoded_dot_dot_mixed_case() {
        assert_eq!(n("/a/%2E%2e/admin"), Ok("/admin".into()));
    }
    #[test]
    fn half_encoded_dot_dot() {
        assert_eq!(n("/a/.%2e/admin"), Ok("/admin".into()));
    }
    #[test]
    fn single_dot_segments() {
        assert_eq!(n("/./a/./b/."), Ok("/a/b/".into()));
    }
    #[test]
    fn encoded_slash_refused() {
        assert_eq!(n("/a%2Fb"), Err(PathError::EncodedSlash));
        assert_eq!(n("/a%2fb"), Err(PathError::EncodedSlash));
    }
    #[test]
    fn encoded_dot_dot_slash_refused() {
        assert_eq!(n("/a/..%2Fadmin"), Err(PathError::EncodedSlash));
    }
    #[test]
    fn backslash_refused() {
        assert_eq!(n("/a\\..\\admin"), Err(PathError::Backslash));
        assert_eq!(n("/a%5C..%5cadmin"), Err(PathError::Backslash));
    }
    #[test]
    fn nul_refused() {
        assert_eq!(n("/a%00.json"), Err(PathError::Nul));
        assert_eq!(normalize(b"/a\0b").map(|p| p.path), Err(PathError::Nul));
    }
    #[test]
    fn invalid_escapes_refused() {
        assert_eq!(n("/a%G1"), Err(PathError::InvalidEscape));
        assert_eq!(n("/a%4"), Err(PathError::InvalidEscape));
        assert_eq!(n("/a%"), Err(PathError::InvalidEscape));
    }
    #[test]
    fn overlong_utf8_dot_refused() {
        assert_eq!(n("/a/%C0%AE%C0%AE/admin"), Err(PathError::InvalidUtf8));
    }
    #[test]
    fn overlong_utf8_slash_refused() {
        assert_eq!(n("/a%C0%AFadmin"), Err(PathError::InvalidUtf8));
    }
    #[test]
    fn truncated_utf8_refused() {
        assert_eq!(n("/caf%C3"), Err(PathError::InvalidUtf8));
    }
    #[test]
    fn valid_utf8_escape_kept_encoded() {
        assert_eq!(n("/caf%c3%a9"), Ok("/caf%C3%A9".into()));
    }
    #[test]
    fn unreserved_escapes_decoded() {
        assert_eq!(n("/%61dmin/%7Euser"), Ok("/admin/~user".into()));
    }
    #[test]
    fn reserved_escapes_kept_uppercase() {
        assert_eq!(n("/a%3bb%3D"), Ok("/a%3Bb%3D".into()));
    }
    #[test]
    fn raw_non_ascii_refused() {
        assert_eq!(normalize("/café".as_bytes()).map(|p| p.path), Err(PathError::ControlOrNonAscii));
    }
    #[test]
    fn control_characters_refused() {
        assert_eq!(n("/a\r\nx"), Err(PathError::ControlOrNonAscii));
        assert_eq!(n("/a b"), Err(PathError::ControlOrNonAscii));
    }
    #[test]
    fn absolute_form_and_asterisk_refused() {
        assert_eq!(n("http://evil/admin"), Err(PathError::NotOriginForm));
        assert_eq!(n("*"), Err(PathError::NotOriginForm));
        assert_eq!(n(""), Err(PathError::NotOriginForm));
    }
    #[test]
    fn fragment_refused() {
        assert_eq!(n("/a#/../admin"), Err(PathError::Fragment));
    }
    #[test]
    fn dot_segment_with_path_parameter_refused() {
        // Tomcat-style servers read `..;/` as `..`: refuse rather than guess.
        assert_eq!(n("/public/..;/admin"), Err(PathError::DotSegmentParameter));
        assert_eq!(n("/public/.;x/admin"), Err(PathError::DotSegmentParameter));
        assert_eq!(n("/a;v=1/b"), Ok("/a;v=1/b".into()));
    }

    // Found by fuzzing (fuzz target `path`): the port was split off at the last `:` only, so a
    // second port, or any byte at all in the name, stayed in the "host" the policy matched.
    #[test]
    fn authority_with_a_second_port_is_refused() {
        assert_eq!(normalize_authority(b"Example.ORG:8443:8443"), None);
        assert_eq!(normalize_authority(b"a6:b:"), None);
        assert_eq!(normalize_authority(b"::"), None);
    }
    #[test]
    fn authority_with_bytes_outside_a_host_name_is_refused() {
        assert_eq!(normalize_authority(b"Ex%amp,e.ORG:8443"), None);
        assert_eq!(normalize_authority(b"evil.com;.acme.internal"), None);
        assert_eq!(normalize_authority(b"a\\b"), None);
        assert_eq!(normalize_authority(b"A[::1]:80"), None);
    }
    #[test]
    fn authority_ipv6_literal_with_trailing_bytes_is_refused() {
        assert_eq!(normalize_authority(b"[::1]evil.example"), None);
        assert_eq!(normalize_authority(b"[::1]:80:80"), None);
        assert_eq!(normalize_authority(b"[fe80::1"), None);
        assert_eq!(normalize_authority(b"[evil.example]:80"), None);
        assert_eq!(normalize_authority(b"[FE80::1]:8443").as_deref(), Some("[fe80::1]"));
    }
    #[test]
    fn authority_normalisation_is_idempotent() {
        for a in ["API.Example.com:8443", "api.example.com.", "[::1]:80", "host:", "x_y.internal"] {
            let once = normalize_authority(a.as_bytes()).unwrap();
            assert_eq!(normalize_authority(once.as_bytes()).as_deref(), Some(once.as_str()), "{a}");
        }
    }

    #[test]
    fn authority_normalisation() {
        assert_eq!(normalize_authority(b"API.Example.com:8443").as_deref(), Some("api.example.com"));
        assert_eq!(normalize_authority(b"api.example.com.").as_deref(), Some("api.example.com"));
        assert_eq!(normalize_authority(b"[::1]:80").as_deref(), Some("[::1]"));
        assert_eq!(normalize_authority(b"user@host"), None);
        assert_eq!(normalize_authority(b"host:abc"), None);
        assert_eq!(normalize_authority(b""), None);
    }
}
