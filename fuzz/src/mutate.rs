//! A small deterministic mutator for the stable-toolchain smoke: the same seeds give the same
//! inputs on every machine, so a smoke failure reproduces.

/// xorshift64*: deterministic, no dependencies.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next_u64() % n as u64) as usize
        }
    }
}

/// Bytes a parser is likely to care about.
const INTERESTING: &[&[u8]] = &[
    b"\0", b"\xff", b"%", b"%2e", b"%2F", b"%00", b"%C0%AE", b"/", b"//", b"/..", b"/./", b"..;", b"\\", b"?", b"#",
    b".", b"\"", b"{", b"}", b"[", b"]", b":", b",", b"null", b"true", b"-1", b"0", b"18446744073709551616",
    b"1e309", b"\"\\u0000\"", b"spiffe://", b"=?base64?", b"?=", b"\n", b"\r\n", b"data: ", b" ", b"\t", b"=", b"&",
];

/// One mutated input from `seed` (and sometimes a second seed spliced in).
pub fn mutate(rng: &mut Rng, seed: &[u8], other: &[u8]) -> Vec<u8> {
    let mut out = seed.to_vec();
    let rounds = 1 + rng.below(4);
    for _ in 0..rounds {
        let len = out.len();
        let at = rng.below(len + 1);
        match rng.below(9) {
            0 => {
                if let Some(b) = out.get_mut(at) {
                    *b ^= 1 << rng.below(8);
                }
            }
            1 => {
                if let Some(b) = out.get_mut(at) {
                    *b = rng.next_u64() as u8;
                }
            }
            2 => {
                let n = 1 + rng.below(8);
                let end = (at + n).min(len);
                out.drain(at.min(len)..end);
            }
            3 => {
                let ins = INTERESTING.get(rng.below(INTERESTING.len())).copied().unwrap_or_default();
                out.splice(at..at, ins.iter().copied());
            }
            4 => {
                let ins = INTERESTING.get(rng.below(INTERESTING.len())).copied().unwrap_or_default();
                let end = (at + ins.len()).min(len);
                out.splice(at..end, ins.iter().copied());
            }
            5 => {
                // Repeat a span.
                let n = rng.below(32);
                let end = (at + n).min(len);
                let span = out.get(at..end).unwrap_or_default().to_vec();
                out.splice(at..at, span);
            }
            6 => {
                // Splice in part of another seed.
                let from = rng.below(other.len() + 1);
                let n = rng.below(64);
                let part = other.get(from..(from + n).min(other.len())).unwrap_or_default().to_vec();
                out.splice(at..at, part);
            }
            7 => out.truncate(at),
            _ => {
                // A byte from the printable range where parsers branch most.
                out.insert(at, b' ' + (rng.next_u64() % 95) as u8);
            }
        }
    }
    out
}
