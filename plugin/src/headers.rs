//! Request header access for the core, independent of the host.
//!
//! Values are raw bytes: non-UTF-8 header values exist in the wild and must
//! never crash or confuse the filter.

/// The request headers as the host handed them (names lowercase in Envoy).
#[derive(Debug, Clone, Default)]
pub struct Headers {
    pairs: Vec<(String, Vec<u8>)>,
}

/// Prefix of every header mandate sets upstream; incoming copies are spoofing.
pub const RESERVED_PREFIX: &str = "x-mandate-";

impl Headers {
    pub fn new(pairs: Vec<(String, Vec<u8>)>) -> Self {
        Headers { pairs }
    }

    pub fn pairs(&self) -> &[(String, Vec<u8>)] {
        &self.pairs
    }

    /// All values of a header (case-insensitive name match).
    pub fn all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.pairs
            .iter()
            .filter(move |(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_slice())
    }

    /// The single value of a header; `Err(Duplicate)` when it appears more than once.
    pub fn single(&self, name: &str) -> Result<Option<&[u8]>, Duplicate> {
        let mut found: Option<&[u8]> = None;
        for (k, v) in &self.pairs {
            if k.eq_ignore_ascii_case(name) {
                if found.is_some() {
                    return Err(Duplicate);
                }
                found = Some(v.as_slice());
            }
        }
        Ok(found)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.all(name).next().is_some()
    }

    /// Names of incoming headers in mandate's reserved namespace.
    pub fn reserved_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .pairs
            .iter()
            .filter(|(k, _)| {
                k.len() >= RESERVED_PREFIX.len()
                    && k.get(..RESERVED_PREFIX.len())
                        .is_some_and(|p| p.eq_ignore_ascii_case(RESERVED_PREFIX))
            })
            .map(|(k, _)| k.to_ascii_lowercase())
            .collect();
        names.sort();
        names.dedup();
        names
    }
}

/// A header that must appear at most once appeared several times.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Duplicate;

#[cfg(test)]
mod tests {
    use super::*;

    fn h(pairs: &[(&str, &[u8])]) -> Headers {
        Headers::new(pairs.iter().map(|(k, v)| (k.to_string(), v.to_vec())).collect())
    }

    #[test]
    fn single_detects_duplicates() {
        let hs = h(&[("a", b"1"), ("A", b"2"), ("b", b"3")]);
        assert_eq!(hs.single("a"), Err(Duplicate));
        assert_eq!(hs.single("b"), Ok(Some(&b"3"[..])));
        assert_eq!(hs.single("c"), Ok(None));
    }

    #[test]
    fn reserved_names_catch_spoofing_in_any_case() {
        let hs = h(&[("X-Mandate-Identity", b"spiffe://evil"), ("x-mandate-decision-id", b"1"), ("x-other", b"")]);
        assert_eq!(hs.reserved_names(), vec!["x-mandate-decision-id", "x-mandate-identity"]);
    }

    #[test]
    fn non_utf8_values_are_kept_as_bytes() {
        let hs = h(&[("x", &[0xff, 0xfe])]);
        assert_eq!(hs.single("x"), Ok(Some(&[0xff, 0xfe][..])));
    }
}

/// Serializes header pairs in the proxy-wasm map format (u32 count, u32 key and
/// value lengths per pair, then NUL-terminated keys and values).
pub fn serialize_pairs<K: AsRef<[u8]>, V: AsRef<[u8]>>(pairs: &[(K, V)]) -> Vec<u8> {
    let data: usize = pairs.iter().map(|(k, v)| k.as_ref().len() + v.as_ref().len() + 2).sum();
    let mut out = Vec::with_capacity(4 + pairs.len() * 8 + data);
    out.extend_from_slice(&(pairs.len() as u32).to_le_bytes());
    for (k, v) in pairs {
        out.extend_from_slice(&(k.as_ref().len() as u32).to_le_bytes());
        out.extend_from_slice(&(v.as_ref().len() as u32).to_le_bytes());
    }
    for (k, v) in pairs {
        out.extend_from_slice(k.as_ref());
        out.push(0);
        out.extend_from_slice(v.as_ref());
        out.push(0);
    }
    out
}

#[cfg(test)]
mod serialize_tests {
    use super::serialize_pairs;

    #[test]
    fn serializes_in_abi_layout() {
        let out = serialize_pairs(&[("ab", "c")]);
        assert_eq!(out, vec![1, 0, 0, 0, 2, 0, 0, 0, 1, 0, 0, 0, b'a', b'b', 0, b'c', 0]);
        assert_eq!(serialize_pairs::<&str, &str>(&[]), vec![0, 0, 0, 0]);
    }
}
