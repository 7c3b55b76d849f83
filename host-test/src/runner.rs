//! One-shot request runner: a JSON request spec in, a JSON outcome out.

use std::collections::BTreeMap;

use anyhow::{bail, Context as _, Result};
use base64::Engine as _;
use serde::{Deserialize, Serialize};

use crate::abi::{Action, Headers};
use crate::host::{Host, LogEntry, MetricValue};
use crate::vm::{header_value, CalloutReply, StreamId, Vm};

/// Headers in a spec: `[["name", "value"], ...]` or `{"name": "value" | ["v1", "v2"]}`.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(untagged)]
pub enum HeaderList {
    #[default]
    #[serde(skip)]
    None,
    Pairs(Vec<(String, String)>),
    Map(BTreeMap<String, OneOrMany>),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl HeaderList {
    pub fn to_headers(&self) -> Headers {
        match self {
            HeaderList::None => Vec::new(),
            HeaderList::Pairs(p) => p
                .iter()
                .map(|(k, v)| (k.to_ascii_lowercase(), v.as_bytes().to_vec()))
                .collect(),
            HeaderList::Map(m) => m
                .iter()
                .flat_map(|(k, v)| {
                    let vals = match v {
                        OneOrMany::One(s) => vec![s.clone()],
                        OneOrMany::Many(l) => l.clone(),
                    };
                    vals.into_iter()
                        .map(move |s| (k.to_ascii_lowercase(), s.into_bytes()))
                })
                .collect(),
        }
    }
}

/// The clock: Unix seconds (may be fractional) or an RFC 3339 timestamp.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum TimeSpec {
    Seconds(f64),
    Rfc3339(String),
}

impl TimeSpec {
    pub fn unix_nanos(&self) -> Result<u64> {
        match self {
            TimeSpec::Seconds(s) if *s >= 0.0 => Ok((*s * 1e9) as u64),
            TimeSpec::Seconds(s) => bail!("time {s} is before 1970"),
            TimeSpec::Rfc3339(s) => parse_rfc3339(s),
        }
    }
}

/// A property value: a string (raw bytes), an integer (8 bytes little
/// endian, as Envoy serializes integers) or `{"base64": "..."}`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum PropertyValue {
    Str(String),
    Int(i64),
    Bytes { base64: String },
}

impl PropertyValue {
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        Ok(match self {
            PropertyValue::Str(s) => s.as_bytes().to_vec(),
            PropertyValue::Int(i) => i.to_le_bytes().to_vec(),
            PropertyValue::Bytes { base64 } => base64::engine::general_purpose::STANDARD
                .decode(base64)
                .context("property value base64")?,
        })
    }
}

/// Properties: `{"source.address": "10.0.0.1:5000"}` (path split on dots) or
/// `[{"path": ["node", "metadata", "a.b"], "value": "x"}]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Properties {
    Dotted(BTreeMap<String, PropertyValue>),
    Listed(Vec<PropertyEntry>),
}

#[derive(Debug, Clone, Deserialize)]
pub struct PropertyEntry {
    pub path: Vec<String>,
    pub value: PropertyValue,
}

impl Properties {
    pub fn entries(&self) -> Result<Vec<(Vec<String>, Vec<u8>)>> {
        match self {
            Properties::Dotted(m) => m
                .iter()
                .map(|(k, v)| Ok((k.split('.').map(str::to_string).collect(), v.to_bytes()?)))
                .collect(),
            Properties::Listed(l) => l
                .iter()
                .map(|e| Ok((e.path.clone(), e.value.to_bytes()?)))
                .collect(),
        }
    }
}

/// A scripted answer to an outbound call: `{"status": 200, "headers": [...],
/// "body": "..."}` or `{"error": "failure" | "timeout"}`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum CalloutScript {
    Error {
        error: CalloutError,
    },
    Response {
        status: u16,
        #[serde(default)]
        headers: HeaderList,
        #[serde(default)]
        body: Option<String>,
        #[serde(default)]
        trailers: HeaderList,
    },
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum CalloutError {
    Failure,
    Timeout,
}

impl CalloutScript {
    pub fn to_reply(&self) -> CalloutReply {
        match self {
            CalloutScript::Error {
                error: CalloutError::Failure,
            } => CalloutReply::Failure,
            CalloutScript::Error {
                error: CalloutError::Timeout,
            } => CalloutReply::Timeout,
            CalloutScript::Response {
                status,
                headers,
                body,
                trailers,
            } => {
                let mut h: Headers = vec![(":status".into(), status.to_string().into_bytes())];
                h.extend(headers.to_headers());
                CalloutReply::Response {
                    headers: h,
                    body: body.clone().unwrap_or_default().into_bytes(),
                    trailers: trailers.to_headers(),
                }
            }
        }
    }
}

/// The upstream's response, when the request gets there.
#[derive(Debug, Clone, Deserialize)]
pub struct ResponseSpec {
    #[serde(default = "default_status")]
    pub status: u16,
    #[serde(default)]
    pub headers: HeaderList,
    #[serde(default)]
    pub body: Option<String>,
}

fn default_status() -> u16 {
    200
}

/// One request to run through the filter.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestSpec {
    #[serde(default = "default_method")]
    pub method: String,
    #[serde(default = "default_path")]
    pub path: String,
    #[serde(default = "default_authority")]
    pub authority: String,
    #[serde(default = "default_scheme")]
    pub scheme: String,
    #[serde(default)]
    pub headers: HeaderList,
    /// Request body (UTF-8); or `body_base64`.
    #[serde(default)]
    pub body: Option<String>,
    #[serde(default)]
    pub body_base64: Option<String>,
    #[serde(default)]
    pub trailers: HeaderList,
    /// Answers to outbound calls, used in order.
    #[serde(default)]
    pub callouts: Vec<CalloutScript>,
    /// Clusters `dispatch_http_call` may use (added to the host).
    #[serde(default)]
    pub upstreams: Vec<String>,
    #[serde(default)]
    pub time: Option<TimeSpec>,
    #[serde(default)]
    pub properties: Option<Properties>,
    /// The upstream response (default 200, no body) if the request is forwarded.
    #[serde(default)]
    pub response: Option<ResponseSpec>,
    /// Add `x-forwarded-proto` and `x-request-id` as Envoy's connection
    /// manager does before filters run (default true).
    #[serde(default = "default_true")]
    pub envoy_headers: bool,
}

fn default_method() -> String {
    "GET".into()
}
fn default_path() -> String {
    "/".into()
}
fn default_authority() -> String {
    "example.com".into()
}
fn default_scheme() -> String {
    "http".into()
}
fn default_true() -> bool {
    true
}

impl RequestSpec {
    /// A GET of `path` with defaults everywhere else.
    pub fn get(path: &str) -> RequestSpec {
        RequestSpec {
            method: default_method(),
            path: path.into(),
            authority: default_authority(),
            scheme: default_scheme(),
            headers: HeaderList::None,
            body: None,
            body_base64: None,
            trailers: HeaderList::None,
            callouts: Vec::new(),
            upstreams: Vec::new(),
            time: None,
            properties: None,
            response: None,
            envoy_headers: true,
        }
    }

    pub fn body_bytes(&self) -> Result<Option<Vec<u8>>> {
        match (&self.body, &self.body_base64) {
            (Some(_), Some(_)) => bail!("give body or body_base64, not both"),
            (Some(b), None) => Ok(Some(b.as_bytes().to_vec())),
            (None, Some(b)) => Ok(Some(
                base64::engine::general_purpose::STANDARD
                    .decode(b)
                    .context("body_base64")?,
            )),
            (None, None) => Ok(None),
        }
    }
}

/// How the request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// The filter answered with `proxy_send_local_response`.
    LocalReply,
    /// The request went upstream.
    Forwarded,
    /// The filter still holds the request (e.g. a callout nobody answered).
    Paused,
    /// The filter reset the stream (`proxy_close_stream`).
    Reset,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct LocalReplyOut {
    pub status: u32,
    pub details: String,
    pub headers: Vec<(String, String)>,
    pub body: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grpc_status: Option<i32>,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct MessageOut {
    pub headers: Vec<(String, String)>,
    pub body: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trailers: Option<Vec<(String, String)>>,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct CalloutOut {
    pub token: u32,
    /// The dispatching context (1 = root context).
    pub context_id: u32,
    pub upstream: String,
    pub headers: Vec<(String, String)>,
    pub body: String,
    pub timeout_ms: u32,
    /// `"status 200"`, `"failure"`, `"timeout"` or `"unanswered"`.
    pub reply: String,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct LogOut {
    pub level: crate::abi::LogLevel,
    pub message: String,
}

/// The result of [`run_request`].
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    pub verdict: Verdict,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub local_reply: Option<LocalReplyOut>,
    /// What went upstream (headers as the filter left them).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream_request: Option<MessageOut>,
    /// What the client received (local reply or upstream response, after the
    /// filter's response callbacks).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub response: Option<MessageOut>,
    pub callouts: Vec<CalloutOut>,
    /// Callbacks run and their results, in order.
    pub trace: Vec<String>,
    pub logs: Vec<LogOut>,
    pub metrics: BTreeMap<String, MetricValue>,
    /// Host-side anomalies (see `Vm::warnings`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

fn text(v: &[u8]) -> String {
    String::from_utf8_lossy(v).into_owned()
}

fn text_headers(h: &[(String, Vec<u8>)]) -> Vec<(String, String)> {
    h.iter().map(|(k, v)| (k.clone(), text(v))).collect()
}

/// The request header map Envoy hands a filter for this spec: pseudo headers
/// first, then the spec's headers (names lowercased), then (unless disabled)
/// `x-forwarded-proto` and `x-request-id` when absent.
pub fn request_header_map(host: &Host, spec: &RequestSpec) -> Headers {
    let mut h: Headers = vec![
        (":authority".into(), spec.authority.as_bytes().to_vec()),
        (":path".into(), spec.path.as_bytes().to_vec()),
        (":method".into(), spec.method.as_bytes().to_vec()),
        (":scheme".into(), spec.scheme.as_bytes().to_vec()),
    ];
    h.extend(spec.headers.to_headers());
    if spec.envoy_headers {
        if header_value(&h, "x-forwarded-proto").is_none() {
            h.push(("x-forwarded-proto".into(), spec.scheme.as_bytes().to_vec()));
        }
        if header_value(&h, "x-request-id").is_none() {
            let mut b = [0u8; 16];
            host.lock().rng.fill(&mut b);
            b[6] = (b[6] & 0x0f) | 0x40;
            b[8] = (b[8] & 0x3f) | 0x80;
            let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
            let id = format!(
                "{}-{}-{}-{}-{}",
                &hex[0..8],
                &hex[8..12],
                &hex[12..16],
                &hex[16..20],
                &hex[20..32]
            );
            h.push(("x-request-id".into(), id.into_bytes()));
        }
    }
    h
}

struct Run<'a> {
    vm: &'a mut Vm,
    s: StreamId,
    script: std::vec::IntoIter<CalloutScript>,
    replies: BTreeMap<u32, String>,
    seen: BTreeMap<u32, crate::vm::HttpCallout>,
    trace: Vec<String>,
}

impl Run<'_> {
    fn note_calls(&mut self) {
        for c in self.vm.pending_calls() {
            self.seen.entry(c.token).or_insert(c);
        }
    }

    /// Answers outstanding calls (of any context: the stream's, or the root
    /// context's such as a key fetch) from the script, oldest first, until
    /// none is left or the script runs out.
    fn answer(&mut self) -> Result<()> {
        loop {
            self.note_calls();
            let Some(call) = self.vm.pending_calls().into_iter().next() else {
                return Ok(());
            };
            let Some(next) = self.script.next() else {
                return Ok(());
            };
            let reply = next.to_reply();
            let label = match &reply {
                CalloutReply::Response { headers, .. } => {
                    format!(
                        "status {}",
                        text(&header_value(headers, ":status").unwrap_or_default())
                    )
                }
                CalloutReply::Failure => "failure".into(),
                CalloutReply::Timeout => "timeout".into(),
            };
            self.trace
                .push(format!("http_call_response(token {}, {label})", call.token));
            self.replies.insert(call.token, label);
            self.vm.answer_call(call.token, reply)?;
        }
    }

    fn step(&mut self, what: &str, a: Action) -> Result<()> {
        self.trace.push(format!("{what}: {a:?}").to_lowercase());
        self.answer()
    }

    fn ended(&self) -> bool {
        self.vm.stream(self.s).ended_early()
    }
}

/// Runs one request through a fresh stream of `vm`: request headers (with
/// pseudo headers), scripted callout answers, body, trailers, the upstream
/// response when forwarded, then on_done/on_log/on_delete.
pub fn run_request(host: &Host, vm: &mut Vm, spec: &RequestSpec) -> Result<Outcome> {
    if let Some(t) = &spec.time {
        host.set_time(t.unix_nanos()?);
    }
    for u in &spec.upstreams {
        host.add_upstream(u);
    }
    let log_mark = vm.logs().len();
    let warn_mark = vm.warnings().len();
    let body = spec.body_bytes()?;
    let trailers = spec.trailers.to_headers();
    let s = vm.new_stream()?;
    let url_path = spec.path.split('?').next().unwrap_or("").to_string();
    let query = spec
        .path
        .split_once('?')
        .map(|(_, q)| q.to_string())
        .unwrap_or_default();
    for (path, value) in [
        (["request", "path"], spec.path.clone()),
        (["request", "url_path"], url_path),
        (["request", "query"], query),
        (["request", "host"], spec.authority.clone()),
        (["request", "method"], spec.method.clone()),
        (["request", "scheme"], spec.scheme.clone()),
        (["request", "protocol"], "HTTP/1.1".to_string()),
    ] {
        vm.set_stream_property(s, &path, value.as_bytes())?;
    }
    if let Some(props) = &spec.properties {
        for (path, value) in props.entries()? {
            let segs: Vec<&str> = path.iter().map(String::as_str).collect();
            vm.set_stream_property(s, &segs, &value)?;
        }
    }
    let headers = request_header_map(host, spec);
    let mut run = Run {
        vm,
        s,
        script: spec.callouts.clone().into_iter(),
        replies: BTreeMap::new(),
        seen: BTreeMap::new(),
        trace: Vec::new(),
    };
    run.answer()?;
    let only_headers = body.is_none() && trailers.is_empty();
    let a = run.vm.request_headers(s, headers, only_headers)?;
    run.step("request_headers", a)?;
    if let Some(b) = &body {
        if !run.ended() {
            let a = run.vm.request_body(s, b, trailers.is_empty())?;
            run.step("request_body", a)?;
        }
    }
    if !trailers.is_empty() && !run.ended() {
        let a = run.vm.request_trailers(s, trailers)?;
        run.step("request_trailers", a)?;
    }
    let forwarded = {
        let st = run.vm.stream(s);
        !st.ended_early() && !st.request_paused && st.upstream.headers.is_some()
    };
    if forwarded {
        let resp = spec.response.clone().unwrap_or(ResponseSpec {
            status: 200,
            headers: HeaderList::None,
            body: None,
        });
        let mut h: Headers = vec![(":status".into(), resp.status.to_string().into_bytes())];
        h.extend(resp.headers.to_headers());
        let rbody = resp.body.clone().unwrap_or_default();
        if !rbody.is_empty() {
            h.push((
                "content-length".into(),
                rbody.len().to_string().into_bytes(),
            ));
        }
        let a = run.vm.response_headers(s, h, rbody.is_empty())?;
        run.step("response_headers", a)?;
        if !rbody.is_empty() && !run.vm.stream(s).closed {
            let a = run.vm.response_body(s, rbody.as_bytes(), true)?;
            run.step("response_body", a)?;
        }
    }
    run.note_calls();
    let Run {
        vm,
        replies,
        seen,
        mut trace,
        ..
    } = run;
    let st = vm.stream(s).clone();
    vm.finish_stream(s)?;
    trace.push("done".into());

    let verdict = if st.local_response.is_some() {
        Verdict::LocalReply
    } else if st.closed {
        Verdict::Reset
    } else if st.upstream.headers.is_some() && !st.request_paused {
        Verdict::Forwarded
    } else {
        Verdict::Paused
    };
    let callouts = seen
        .values()
        .map(|c| CalloutOut {
            token: c.token,
            context_id: c.context_id,
            upstream: c.upstream.clone(),
            headers: text_headers(&c.headers),
            body: text(&c.body),
            timeout_ms: c.timeout_ms,
            reply: replies
                .get(&c.token)
                .cloned()
                .unwrap_or_else(|| "unanswered".into()),
        })
        .collect();
    let logs: Vec<LogEntry> = vm.logs().into_iter().skip(log_mark).collect();
    Ok(Outcome {
        verdict,
        local_reply: st.local_response.as_ref().map(|l| LocalReplyOut {
            status: l.status,
            details: l.details.clone(),
            headers: text_headers(&l.headers),
            body: text(&l.body),
            grpc_status: (l.grpc_status >= 0).then_some(l.grpc_status),
        }),
        upstream_request: st.upstream.headers.as_ref().map(|h| MessageOut {
            headers: text_headers(h),
            body: text(&st.upstream.body),
            trailers: st.upstream.trailers.as_ref().map(|t| text_headers(t)),
        }),
        response: st.downstream.headers.as_ref().map(|h| MessageOut {
            headers: text_headers(h),
            body: text(&st.downstream.body),
            trailers: st.downstream.trailers.as_ref().map(|t| text_headers(t)),
        }),
        callouts,
        trace,
        logs: logs
            .into_iter()
            .map(|l| LogOut {
                level: l.level,
                message: l.message,
            })
            .collect(),
        metrics: host.metrics(),
        warnings: vm.warnings().iter().skip(warn_mark).cloned().collect(),
    })
}

/// Parses `YYYY-MM-DDTHH:MM:SS[.frac](Z|±HH:MM)` to Unix nanoseconds.
pub fn parse_rfc3339(s: &str) -> Result<u64> {
    let bad = || anyhow::anyhow!("not an RFC 3339 timestamp: {s:?}");
    let b = s.as_bytes();
    if b.len() < 20
        || b[4] != b'-'
        || b[7] != b'-'
        || !matches!(b[10], b'T' | b't' | b' ')
        || b[13] != b':'
        || b[16] != b':'
    {
        return Err(bad());
    }
    let num = |r: std::ops::Range<usize>| -> Result<i64> {
        s.get(r).and_then(|x| x.parse::<i64>().ok()).ok_or_else(bad)
    };
    let (y, mo, d, h, mi, sec) = (
        num(0..4)?,
        num(5..7)?,
        num(8..10)?,
        num(11..13)?,
        num(14..16)?,
        num(17..19)?,
    );
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || sec > 60 {
        return Err(bad());
    }
    let mut i = 19;
    let mut nanos: i64 = 0;
    if b.get(i) == Some(&b'.') {
        i += 1;
        let start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        let frac = s.get(start..i).ok_or_else(bad)?;
        if frac.is_empty() {
            return Err(bad());
        }
        let digits: String = frac.chars().chain(std::iter::repeat('0')).take(9).collect();
        nanos = digits.parse().map_err(|_| bad())?;
    }
    let offset_secs = match b.get(i) {
        Some(b'Z') | Some(b'z') if i + 1 == b.len() => 0,
        Some(sign @ (b'+' | b'-')) if i + 6 == b.len() && b[i + 3] == b':' => {
            let oh = num(i + 1..i + 3)?;
            let om = num(i + 4..i + 6)?;
            let o = oh * 3600 + om * 60;
            if *sign == b'+' {
                o
            } else {
                -o
            }
        }
        _ => return Err(bad()),
    };
    // Days from civil (Howard Hinnant's algorithm).
    let (yy, mm) = if mo <= 2 {
        (y - 1, mo + 9)
    } else {
        (y, mo - 3)
    };
    let era = yy.div_euclid(400);
    let yoe = yy - era * 400;
    let doy = (153 * mm + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + h * 3600 + mi * 60 + sec - offset_secs;
    if secs < 0 {
        bail!("{s} is before 1970");
    }
    Ok(secs as u64 * 1_000_000_000 + nanos as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339() {
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z").unwrap(), 0);
        assert_eq!(
            parse_rfc3339("2024-02-29T12:00:00Z").unwrap(),
            1_709_208_000 * 1_000_000_000
        );
        assert_eq!(
            parse_rfc3339("2024-02-29T13:30:00.5+01:30").unwrap(),
            1_709_208_000 * 1_000_000_000 + 500_000_000
        );
        assert!(parse_rfc3339("2024-13-01T00:00:00Z").is_err());
        assert!(parse_rfc3339("yesterday").is_err());
    }

    #[test]
    fn spec_parses_both_header_forms() {
        let a: RequestSpec = serde_json::from_str(
            r#"{"path":"/x","headers":[["Authorization","Bearer x"]],
                "callouts":[{"status":200,"body":"{}"},{"error":"timeout"}],
                "time":"2024-01-01T00:00:00Z","properties":{"source.address":"10.0.0.1:1"}}"#,
        )
        .unwrap();
        assert_eq!(
            a.headers.to_headers(),
            vec![("authorization".to_string(), b"Bearer x".to_vec())]
        );
        assert_eq!(a.callouts.len(), 2);
        assert_eq!(a.callouts[1].to_reply(), CalloutReply::Timeout);
        let b: RequestSpec =
            serde_json::from_str(r#"{"headers":{"x-a":["1","2"]},"time":1700000000}"#).unwrap();
        assert_eq!(b.headers.to_headers().len(), 2);
        assert_eq!(
            b.time.unwrap().unix_nanos().unwrap(),
            1_700_000_000_000_000_000
        );
        assert!(serde_json::from_str::<RequestSpec>(r#"{"bogus":1}"#).is_err());
    }
}
