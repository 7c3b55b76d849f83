//! Reading structured values out of fuzz bytes, and the in-process signing key.

use mandate_core::testkit::TestKey;

/// Takes values from the front of the input; past the end every read is empty or zero.
pub struct Reader<'a> {
    data: &'a [u8],
}

impl<'a> Reader<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Reader { data }
    }

    pub fn byte(&mut self) -> u8 {
        match self.data.split_first() {
            Some((b, rest)) => {
                self.data = rest;
                *b
            }
            None => 0,
        }
    }

    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.byte(), self.byte()])
    }

    pub fn take(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.data.len());
        let (head, rest) = self.data.split_at(n);
        self.data = rest;
        head
    }

    /// Up to the next NUL (consumed), or the rest.
    pub fn field(&mut self) -> &'a [u8] {
        match self.data.iter().position(|&b| b == 0) {
            Some(i) => {
                let (head, rest) = self.data.split_at(i);
                self.data = rest.get(1..).unwrap_or_default();
                head
            }
            None => self.rest(),
        }
    }

    /// [`Reader::field`] as text (invalid UTF-8 replaced).
    pub fn text(&mut self) -> String {
        String::from_utf8_lossy(self.field()).into_owned()
    }

    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.data)
    }
}

/// Replaces every `from` in `data` by `to`.
pub fn replace(data: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len());
    let mut i = 0;
    while i < data.len() {
        if data.get(i..i + from.len()) == Some(from) {
            out.extend_from_slice(to);
            i += from.len();
        } else {
            out.extend_from_slice(data.get(i..=i).unwrap_or_default());
            i += 1;
        }
    }
    out
}

thread_local! {
    /// The identity key (JWT-SVIDs, intent tokens): made once per process, never on disk.
    static SVID_KEY: TestKey = TestKey::es256("fz-svid");
    /// The minter's key (Txn-Tokens).
    static TXN_KEY: TestKey = TestKey::es256("fz-txn");
}

pub fn with_svid_key<R>(f: impl FnOnce(&TestKey) -> R) -> R {
    SVID_KEY.with(f)
}

pub fn with_txn_key<R>(f: impl FnOnce(&TestKey) -> R) -> R {
    TXN_KEY.with(f)
}
