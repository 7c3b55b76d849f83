//! Reading decision logs: the filter's `mandate.decision ` log lines (as Envoy prints them, or
//! bare JSON lines), or an Envoy JSON access log whose `mandate_decision` field carries the
//! record, plain or gzip. Streamed line by line with a bounded line buffer: memory stays flat
//! whatever the log's size, and a line longer than [`MAX_LINE`] is skipped, never buffered.
//!
//! A bad line is counted under a stable reason and skipped. Nothing from a bad line is ever
//! printed: serde's messages can quote field names and values, and a value may be a token.

use serde::de::IgnoredAny;
use serde::Deserialize;
use std::borrow::Cow;
use std::io::{BufRead, BufReader, Read};
use memchr::memmem;
use std::path::Path;
use std::sync::LazyLock;

/// Longest line read (1 MiB); records are about 1 KB.
pub const MAX_LINE: usize = 1 << 20;
const PREFIX: &[u8] = mandate_core::record::LOG_PREFIX.as_bytes();

/// Substring searchers, built once (building one per line was a measurable share of the time).
struct Finders {
    prefix: memmem::Finder<'static>,
    jwt: memmem::Finder<'static>,
    access: memmem::Finder<'static>,
    record: memmem::Finder<'static>,
}

static FINDERS: LazyLock<Finders> = LazyLock::new(|| Finders {
    prefix: memmem::Finder::new(PREFIX),
    jwt: memmem::Finder::new(b"eyJ"),
    access: memmem::Finder::new(b"\"mandate_decision\""),
    record: memmem::Finder::new(b"\"decision_id\":"),
});

/// Why a line was skipped (stable codes, used in reports).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Skip {
    /// Longer than [`MAX_LINE`].
    LineTooLong,
    /// The JSON ends early (a cut line).
    TruncatedJson,
    /// Not JSON.
    MalformedJson,
    /// A field the decision record does not have.
    UnknownField,
    /// JSON, but not a decision record (missing or mistyped fields).
    InvalidRecord,
    /// A value shaped like a bearer token (a JWT): refused unread, never echoed.
    TokenLikeValue,
}

impl Skip {
    pub const ALL: [Skip; 6] = [Skip::LineTooLong, Skip::TruncatedJson, Skip::MalformedJson, Skip::UnknownField, Skip::InvalidRecord, Skip::TokenLikeValue];

    pub fn code(self) -> &'static str {
        match self {
            Skip::LineTooLong => "line_too_long",
            Skip::TruncatedJson => "truncated_json",
            Skip::MalformedJson => "malformed_json",
            Skip::UnknownField => "unknown_field",
            Skip::InvalidRecord => "invalid_record",
            Skip::TokenLikeValue => "token_like_value",
        }
    }

    pub fn message(self) -> &'static str {
        match self {
            Skip::LineTooLong => "line longer than 1 MiB",
            Skip::TruncatedJson => "the JSON is cut short",
            Skip::MalformedJson => "not valid JSON",
            Skip::UnknownField => "a field decision records do not have",
            Skip::InvalidRecord => "not a decision record (a field is missing or of the wrong type)",
            Skip::TokenLikeValue => "a value that looks like a token (not shown)",
        }
    }
}

/// One line of a log, classified.
// Returned by value once per line: boxing the record would allocate per record.
#[allow(clippy::large_enum_variant)]
pub enum Line<'a> {
    /// A decision record.
    Record(Record<'a>),
    /// An access-log entry: the record JSON it carried (unescaped); read it with [`parse_record`].
    Nested(String),
    /// A line that carries no record (other Envoy output, an access-log entry without one).
    Other,
    Skipped(Skip),
}

#[derive(Debug, Deserialize)]
pub struct ChainEntry<'a> {
    #[serde(borrow)]
    pub principal: Cow<'a, str>,
    #[serde(borrow, default)]
    pub class: Option<Cow<'a, str>>,
}

#[derive(Debug, Deserialize)]
pub struct Delegation<'a> {
    #[serde(borrow, default)]
    pub chain: Vec<ChainEntry<'a>>,
    #[serde(default)]
    pub failed: Option<IgnoredAny>,
    #[serde(default)]
    pub invalid: Option<IgnoredAny>,
}

#[derive(Debug, Deserialize)]
pub struct Credential<'a> {
    #[serde(borrow, default)]
    pub jti: Option<Cow<'a, str>>,
    #[serde(default)]
    pub exp: Option<u64>,
}

#[derive(Debug, Deserialize)]
pub struct ArgCheck<'a> {
    #[serde(borrow)]
    pub pointer: Cow<'a, str>,
    pub ok: bool,
    #[serde(default)]
    pub value: Option<serde_json::Value>,
}

#[derive(Debug, Deserialize)]
pub struct Mcp<'a> {
    #[serde(borrow, default)]
    pub method: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub tool: Option<Cow<'a, str>>,
    #[serde(default)]
    pub path: Option<IgnoredAny>,
    #[serde(default)]
    pub credential_scope: Option<IgnoredAny>,
    #[serde(borrow, default)]
    pub checked: Vec<ArgCheck<'a>>,
}

/// The fields of a decision record (`plugin/src/record.rs`); any other field refuses the line.
/// Fields this analysis does not use are skipped unread.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Record<'a> {
    pub ts_ms: u64,
    #[serde(default)]
    pub decision_id: IgnoredAny,
    #[serde(borrow)]
    pub effect: Cow<'a, str>,
    #[serde(borrow)]
    pub reason: Cow<'a, str>,
    #[serde(default)]
    pub dry_run: bool,
    #[serde(borrow, default)]
    pub rule_id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub dry_run_rule_id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub identity: Option<Cow<'a, str>>,
    #[serde(default)]
    pub trust_domain: IgnoredAny,
    #[serde(borrow, default)]
    pub class: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub owner: Option<Cow<'a, str>>,
    #[serde(default)]
    pub token_hash: IgnoredAny,
    #[serde(borrow, default)]
    pub intent: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub task: Option<Cow<'a, str>>,
    #[serde(default)]
    pub intent_signed: bool,
    #[serde(borrow, default)]
    pub delegation: Option<Delegation<'a>>,
    #[serde(borrow, default)]
    pub method: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub authority: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub path: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub resource: Option<Cow<'a, str>>,
    #[serde(default)]
    pub sensitivity: IgnoredAny,
    #[serde(borrow, default)]
    pub environment: Option<Cow<'a, str>>,
    #[serde(default)]
    pub scopes: IgnoredAny,
    #[serde(default)]
    pub ttl_s: Option<u64>,
    #[serde(borrow, default)]
    pub credential: Option<Credential<'a>>,
    #[serde(borrow, default)]
    pub mcp: Option<Mcp<'a>>,
    #[serde(borrow, default)]
    pub credential_withheld: Option<Cow<'a, str>>,
    #[serde(default)]
    pub degraded: IgnoredAny,
    #[serde(default)]
    pub cache: IgnoredAny,
    #[serde(default)]
    pub duration_us: IgnoredAny,
    #[serde(default)]
    pub request_id: IgnoredAny,
    #[serde(default)]
    pub traceparent: IgnoredAny,
    #[serde(default)]
    pub plugin_version: IgnoredAny,
    #[serde(default)]
    pub policy_hash: IgnoredAny,
}

/// An Envoy JSON access-log entry: only the field carrying the record is read.
#[derive(Deserialize)]
struct AccessLogEntry<'a> {
    #[serde(borrow, default)]
    mandate_decision: Option<Cow<'a, str>>,
}

fn classify(e: &serde_json::Error) -> Skip {
    use serde_json::error::Category;
    match e.classify() {
        Category::Eof => Skip::TruncatedJson,
        Category::Syntax | Category::Io => Skip::MalformedJson,
        // The message is only inspected, never shown.
        Category::Data if e.to_string().starts_with("unknown field") => Skip::UnknownField,
        Category::Data => Skip::InvalidRecord,
    }
}

fn b64url(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'-' || b == b'_'
}

/// A JWT-shaped run (`eyJ…` base64url, a dot, base64url, a dot): a bearer token, an SVID, an
/// intent or Txn-Token. Records carry hashes only, so such a value means a leak or a forgery.
pub fn has_token_like(s: &[u8]) -> bool {
    for start in FINDERS.jwt.find_iter(s) {
        let mut i = start;
        let mut dots = 0;
        let mut seg = 0usize;
        while let Some(&b) = s.get(i) {
            if b64url(b) {
                seg += 1;
            } else if b == b'.' && seg >= 8 {
                dots += 1;
                seg = 0;
            } else {
                break;
            }
            i += 1;
        }
        if dots >= 2 || (dots == 1 && seg >= 8) {
            return true;
        }
    }
    false
}

/// Classifies one line (without its newline).
pub fn parse_line(line: &[u8]) -> Line<'_> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let f = &*FINDERS;
    let json: &[u8] = if let Some(at) = f.prefix.find(line) {
        line.get(at + PREFIX.len()..).unwrap_or_default()
    } else {
        let t = line.trim_ascii_start();
        if !t.starts_with(b"{") {
            return Line::Other;
        }
        t
    };
    if has_token_like(json) {
        return Line::Skipped(Skip::TokenLikeValue);
    }
    // An access-log entry carries the record as a string field.
    if f.access.find(json).is_some() && f.record.find(json).is_none() {
        return match serde_json::from_slice::<AccessLogEntry>(json) {
            Ok(AccessLogEntry { mandate_decision: Some(inner) }) if inner.starts_with('{') => Line::Nested(inner.into_owned()),
            Ok(_) => Line::Other,
            Err(e) => Line::Skipped(classify(&e)),
        };
    }
    parse_record(json)
}

/// Reads one record's JSON.
pub fn parse_record(json: &[u8]) -> Line<'_> {
    match serde_json::from_slice::<Record>(json) {
        Ok(r) => Line::Record(r),
        Err(e) => Line::Skipped(classify(&e)),
    }
}

/// Bounded line reader over a (possibly gzip) log.
pub struct LogReader {
    r: Box<dyn BufRead>,
    buf: Vec<u8>,
    pub line_no: u64,
}

pub enum Next<'a> {
    Line(&'a [u8]),
    TooLong,
    End,
}

impl LogReader {
    /// Opens a file; gzip is recognised by its magic bytes, not the name.
    pub fn open(path: &Path) -> std::io::Result<LogReader> {
        let f = std::fs::File::open(path)?;
        let mut r = BufReader::with_capacity(256 * 1024, f);
        let gz = r.fill_buf()?.starts_with(&[0x1f, 0x8b]);
        let r: Box<dyn BufRead> = if gz { Box::new(BufReader::with_capacity(256 * 1024, flate2::bufread::MultiGzDecoder::new(r))) } else { Box::new(r) };
        Ok(LogReader { r, buf: Vec::with_capacity(8192), line_no: 0 })
    }

    pub fn from_reader(r: impl Read + 'static) -> LogReader {
        LogReader { r: Box::new(BufReader::with_capacity(256 * 1024, r)), buf: Vec::with_capacity(8192), line_no: 0 }
    }

    /// What the line buffer holds at most so far (bounded by [`MAX_LINE`] and what one read adds).
    pub fn buffer_capacity(&self) -> usize {
        self.buf.capacity()
    }

    /// The next line, without its newline. A line over [`MAX_LINE`] is consumed and dropped.
    pub fn next_line(&mut self) -> std::io::Result<Next<'_>> {
        self.buf.clear();
        let mut too_long = false;
        let mut any = false;
        loop {
            let avail = self.r.fill_buf()?;
            if avail.is_empty() {
                break;
            }
            any = true;
            let (take, done) = match memchr::memchr(b'\n', avail) {
                Some(i) => (i, true),
                None => (avail.len(), false),
            };
            if !too_long {
                if self.buf.len() + take > MAX_LINE {
                    too_long = true;
                    self.buf.clear();
                } else {
                    self.buf.extend_from_slice(avail.get(..take).unwrap_or_default());
                }
            }
            self.r.consume(if done { take + 1 } else { take });
            if done {
                break;
            }
        }
        if !any {
            return Ok(Next::End);
        }
        self.line_no += 1;
        Ok(if too_long { Next::TooLong } else { Next::Line(&self.buf) })
    }
}
