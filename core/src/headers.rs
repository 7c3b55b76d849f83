//! Request header access for the core, independent of the host.
//!
//! Values are raw bytes: non-UTF-8 header values exist in the wild and must
//! never crash or confuse the filter.

/// The request headers as the host handed them (names lowercase in Envoy): the host's
/// serialized map, kept as one buffer and indexed in place, so reading them costs one
/// allocation rather than two per pair.
#[derive(Debug, Clone, Default)]
pub struct Headers {
    buf: Vec<u8>,
    /// Per pair: name start, name end, value start, value end (offsets into `buf`).
    index: Vec<[u32; 4]>,
}

/// Prefix of every header mandate sets upstream; incoming copies are spoofing.
pub const RESERVED_PREFIX: &str = "x-mandate-";

/// The host's header map is not in the proxy-wasm layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MalformedMap;

impl Headers {
    pub fn new<K: AsRef<[u8]>, V: AsRef<[u8]>>(pairs: Vec<(K, V)>) -> Self {
        Headers::from_map(serialize_pairs(&pairs)).unwrap_or_default()
    }

    /// Indexes a map in the proxy-wasm layout (u32 count; u32 name and value sizes per
    /// pair; then each name and value followed by a NUL). Every size is checked against
    /// the buffer: a short or inconsistent map is refused, never read past.
    pub fn from_map(buf: Vec<u8>) -> Result<Self, MalformedMap> {
        let word = |at: usize| -> Result<usize, MalformedMap> {
            let bytes = buf.get(at..at.checked_add(4).ok_or(MalformedMap)?).ok_or(MalformedMap)?;
            let mut w = [0u8; 4];
            w.copy_from_slice(bytes);
            Ok(u32::from_le_bytes(w) as usize)
        };
        if buf.is_empty() {
            return Ok(Headers::default());
        }
        let count = word(0)?;
        // Each pair needs 8 bytes of sizes and 2 NULs: a count the buffer cannot hold is a lie.
        if count > buf.len() / 10 {
            return Err(MalformedMap);
        }
        let mut index = Vec::with_capacity(count);
        let mut data = 4 + count * 8;
        for i in 0..count {
            let name_len = word(4 + i * 8)?;
            let value_len = word(8 + i * 8)?;
            let name_end = data.checked_add(name_len).ok_or(MalformedMap)?;
            let value_start = name_end.checked_add(1).ok_or(MalformedMap)?;
            let value_end = value_start.checked_add(value_len).ok_or(MalformedMap)?;
            if buf.get(name_end) != Some(&0) || buf.get(value_end) != Some(&0) {
                return Err(MalformedMap);
            }
            let offsets = [data, name_end, value_start, value_end].map(|o| u32::try_from(o).map_err(|_| MalformedMap));
            let [a, b, c, d] = offsets;
            index.push([a?, b?, c?, d?]);
            data = value_end + 1;
        }
        Ok(Headers { buf, index })
    }

    fn slice(&self, start: u32, end: u32) -> &[u8] {
        self.buf.get(start as usize..end as usize).unwrap_or_default()
    }

    /// Every (name, value) pair, in the host's order.
    pub fn pairs(&self) -> impl Iterator<Item = (&[u8], &[u8])> + '_ {
        self.index.iter().map(|[a, b, c, d]| (self.slice(*a, *b), self.slice(*c, *d)))
    }

    /// All values of a header (case-insensitive name match).
    pub fn all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.pairs().filter(move |(k, _)| k.eq_ignore_ascii_case(name.as_bytes())).map(|(_, v)| v)
    }

    /// The single value of a header; `Err(Duplicate)` when it appears more than once.
    pub fn single(&self, name: &str) -> Result<Option<&[u8]>, Duplicate> {
        let mut found: Option<&[u8]> = None;
        for (k, v) in self.pairs() {
            if k.eq_ignore_ascii_case(name.as_bytes()) {
                if found.is_some() {
                    return Err(Duplicate);
                }
                found = Some(v);
            }
        }
        Ok(found)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.all(name).next().is_some()
    }

    /// Whether a header in mandate's reserved namespace has a name that is not UTF-8: it could
    /// not be named for removal (Envoy's codecs never produce one; another filter might).
    pub fn reserved_name_unreadable(&self) -> bool {
        let prefix = RESERVED_PREFIX.as_bytes();
        self.pairs().any(|(k, _)| k.get(..prefix.len()).is_some_and(|p| p.eq_ignore_ascii_case(prefix)) && std::str::from_utf8(k).is_err())
    }

    /// Names of incoming headers in mandate's reserved namespace.
    pub fn reserved_names(&self) -> Vec<String> {
        let prefix = RESERVED_PREFIX.as_bytes();
        let mut names: Vec<String> = self
            .pairs()
            .filter(|(k, _)| k.get(..prefix.len()).is_some_and(|p| p.eq_ignore_ascii_case(prefix)))
            .map(|(k, _)| String::from_utf8_lossy(k).to_ascii_lowercase())
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
    fn map_round_trips_in_host_order() {
        let pairs = vec![(":path", &b"/a"[..]), ("x", &b""[..]), ("", &b"v"[..])];
        let hs = Headers::from_map(serialize_pairs(&pairs)).unwrap();
        let back: Vec<(&[u8], &[u8])> = hs.pairs().collect();
        assert_eq!(back, vec![(&b":path"[..], &b"/a"[..]), (&b"x"[..], &b""[..]), (&b""[..], &b"v"[..])]);
        assert_eq!(Headers::from_map(Vec::new()).unwrap().pairs().count(), 0);
    }

    #[test]
    fn truncated_map_from_a_confused_host_is_refused() {
        let full = serialize_pairs(&[("authorization", "Bearer abc")]);
        for cut in 1..full.len() {
            let short = full.get(..cut).unwrap().to_vec();
            assert_eq!(Headers::from_map(short).map(|_| ()), Err(MalformedMap), "cut at {cut}");
        }
    }

    #[test]
    fn value_length_reaching_past_the_buffer_is_refused() {
        let mut buf = serialize_pairs(&[("a", "b")]);
        buf[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(Headers::from_map(buf).map(|_| ()), Err(MalformedMap));
    }

    #[test]
    fn huge_pair_count_does_not_allocate_or_read_past() {
        let mut buf = serialize_pairs(&[("a", "b")]);
        buf[0..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(Headers::from_map(buf).map(|_| ()), Err(MalformedMap));
    }

    #[test]
    fn missing_nul_terminator_shifts_nothing() {
        let mut buf = serialize_pairs(&[("ab", "cd"), ("x", "y")]);
        let nul = 4 + 16 + 2; // after the first name
        buf[nul] = b'=';
        assert_eq!(Headers::from_map(buf).map(|_| ()), Err(MalformedMap));
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
