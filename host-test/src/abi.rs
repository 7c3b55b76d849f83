//! Constants and wire formats of the proxy-wasm ABI 0.2.1, written from the
//! specification (`abi-versions/v0.2.1/README.md` of proxy-wasm/spec).

use serde::Serialize;

/// A header (or trailer, or metadata) map: lowercase names, raw byte values,
/// in order, duplicates allowed.
pub type Headers = Vec<(String, Vec<u8>)>;

/// `proxy_status_t`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(i32)]
pub enum Status {
    Ok = 0,
    NotFound = 1,
    BadArgument = 2,
    SerializationFailure = 3,
    ParseFailure = 4,
    InvalidMemoryAccess = 6,
    Empty = 7,
    CasMismatch = 8,
    InternalFailure = 10,
    /// Not in the 0.2.1 type list, but used by hosts (proxy-wasm-cpp-host) as
    /// the `proxy_get_status` code of a failed HTTP call.
    BrokenConnection = 11,
    Unimplemented = 12,
}

impl Status {
    pub fn code(self) -> i32 {
        self as i32
    }
}

/// `proxy_action_t`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Continue,
    Pause,
}

impl Action {
    pub fn from_raw(v: i32) -> anyhow::Result<Action> {
        match v {
            0 => Ok(Action::Continue),
            1 => Ok(Action::Pause),
            other => anyhow::bail!("module returned unknown proxy_action_t {other}"),
        }
    }
}

/// `proxy_log_level_t`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LogLevel {
    Trace = 0,
    Debug = 1,
    Info = 2,
    Warn = 3,
    Error = 4,
    Critical = 5,
}

impl LogLevel {
    pub fn from_raw(v: i32) -> Option<LogLevel> {
        Some(match v {
            0 => LogLevel::Trace,
            1 => LogLevel::Debug,
            2 => LogLevel::Info,
            3 => LogLevel::Warn,
            4 => LogLevel::Error,
            5 => LogLevel::Critical,
            _ => return None,
        })
    }
}

/// `proxy_map_type_t`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MapType {
    HttpRequestHeaders = 0,
    HttpRequestTrailers = 1,
    HttpResponseHeaders = 2,
    HttpResponseTrailers = 3,
    GrpcReceiveInitialMetadata = 4,
    GrpcReceiveTrailingMetadata = 5,
    HttpCallResponseHeaders = 6,
    HttpCallResponseTrailers = 7,
}

impl MapType {
    pub fn from_raw(v: i32) -> Option<MapType> {
        Some(match v {
            0 => MapType::HttpRequestHeaders,
            1 => MapType::HttpRequestTrailers,
            2 => MapType::HttpResponseHeaders,
            3 => MapType::HttpResponseTrailers,
            4 => MapType::GrpcReceiveInitialMetadata,
            5 => MapType::GrpcReceiveTrailingMetadata,
            6 => MapType::HttpCallResponseHeaders,
            7 => MapType::HttpCallResponseTrailers,
            _ => return None,
        })
    }
}

/// `proxy_buffer_type_t`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BufferType {
    HttpRequestBody = 0,
    HttpResponseBody = 1,
    DownstreamData = 2,
    UpstreamData = 3,
    HttpCallResponseBody = 4,
    GrpcReceiveBuffer = 5,
    VmConfiguration = 6,
    PluginConfiguration = 7,
    ForeignFunctionArguments = 8,
}

impl BufferType {
    pub fn from_raw(v: i32) -> Option<BufferType> {
        Some(match v {
            0 => BufferType::HttpRequestBody,
            1 => BufferType::HttpResponseBody,
            2 => BufferType::DownstreamData,
            3 => BufferType::UpstreamData,
            4 => BufferType::HttpCallResponseBody,
            5 => BufferType::GrpcReceiveBuffer,
            6 => BufferType::VmConfiguration,
            7 => BufferType::PluginConfiguration,
            8 => BufferType::ForeignFunctionArguments,
            _ => return None,
        })
    }
}

/// `proxy_stream_type_t`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamType {
    HttpRequest = 0,
    HttpResponse = 1,
    Downstream = 2,
    Upstream = 3,
}

impl StreamType {
    pub fn from_raw(v: i32) -> Option<StreamType> {
        Some(match v {
            0 => StreamType::HttpRequest,
            1 => StreamType::HttpResponse,
            2 => StreamType::Downstream,
            3 => StreamType::Upstream,
            _ => return None,
        })
    }
}

/// `proxy_metric_type_t`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MetricType {
    Counter = 0,
    Gauge = 1,
    Histogram = 2,
}

impl MetricType {
    pub fn from_raw(v: i32) -> Option<MetricType> {
        Some(match v {
            0 => MetricType::Counter,
            1 => MetricType::Gauge,
            2 => MetricType::Histogram,
            _ => return None,
        })
    }
}

/// WASI preview1 errno values used by this host.
pub mod errno {
    pub const SUCCESS: i32 = 0;
    pub const BADF: i32 = 8;
    pub const FAULT: i32 = 21;
    pub const INVAL: i32 = 28;
    pub const NOTSUP: i32 = 58;
    pub const SPIPE: i32 = 70;
}

/// Serializes a map: u32 count, then (u32 key_len, u32 value_len) per pair,
/// then per pair key bytes, NUL, value bytes, NUL. All little-endian.
pub fn serialize_map(map: &[(String, Vec<u8>)]) -> Vec<u8> {
    let data: usize = map.iter().map(|(k, v)| k.len() + v.len() + 2).sum();
    let mut out = Vec::with_capacity(4 + map.len() * 8 + data);
    out.extend_from_slice(&(map.len() as u32).to_le_bytes());
    for (k, v) in map {
        out.extend_from_slice(&(k.len() as u32).to_le_bytes());
        out.extend_from_slice(&(v.len() as u32).to_le_bytes());
    }
    for (k, v) in map {
        out.extend_from_slice(k.as_bytes());
        out.push(0);
        out.extend_from_slice(v);
        out.push(0);
    }
    out
}

/// Parses a serialized map. An empty input or a single NUL byte is the empty
/// map. Names are kept as given (lossily converted to UTF-8); callers
/// lowercase them where the proxy would.
pub fn deserialize_map(bytes: &[u8]) -> Result<Headers, String> {
    if bytes.is_empty() || bytes == [0] {
        return Ok(Vec::new());
    }
    let read_u32 = |at: usize| -> Result<usize, String> {
        bytes
            .get(at..at + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
            .ok_or_else(|| format!("map truncated at offset {at}"))
    };
    let count = read_u32(0)?;
    let sizes_end = count
        .checked_mul(8)
        .and_then(|n| n.checked_add(4))
        .ok_or("map pair count overflows")?;
    if sizes_end > bytes.len() {
        return Err(format!(
            "map declares {count} pairs but is only {} bytes",
            bytes.len()
        ));
    }
    let mut out = Vec::with_capacity(count);
    let mut at = sizes_end;
    for i in 0..count {
        let klen = read_u32(4 + i * 8)?;
        let vlen = read_u32(8 + i * 8)?;
        let key = bytes
            .get(at..at + klen)
            .ok_or_else(|| format!("map key {i} runs past the end"))?;
        if bytes.get(at + klen) != Some(&0) {
            return Err(format!("map key {i} is not NUL-terminated"));
        }
        at += klen + 1;
        let value = bytes
            .get(at..at + vlen)
            .ok_or_else(|| format!("map value {i} runs past the end"))?;
        if bytes.get(at + vlen) != Some(&0) {
            return Err(format!("map value {i} is not NUL-terminated"));
        }
        at += vlen + 1;
        out.push((String::from_utf8_lossy(key).into_owned(), value.to_vec()));
    }
    Ok(out)
}

/// Joins property path segments the way the SDK serializes them: each
/// segment followed by NUL, the last NUL dropped.
pub fn property_path(segments: &[&str]) -> Vec<u8> {
    segments.join("\0").into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_round_trip_matches_spec_example() {
        let map = vec![
            ("a".to_string(), b"1".to_vec()),
            ("b".to_string(), b"22".to_vec()),
        ];
        let bytes = serialize_map(&map);
        let expected: Vec<u8> = [
            &2u32.to_le_bytes()[..],
            &1u32.to_le_bytes(),
            &1u32.to_le_bytes(),
            &1u32.to_le_bytes(),
            &2u32.to_le_bytes(),
            b"a\x001\x00b\x0022\x00",
        ]
        .concat();
        assert_eq!(bytes, expected);
        assert_eq!(deserialize_map(&bytes).unwrap(), map);
    }

    #[test]
    fn map_non_utf8_values_and_empty_forms() {
        let map = vec![("x-bin".to_string(), vec![0xff, 0xfe, 0x00, 0x80])];
        assert_eq!(deserialize_map(&serialize_map(&map)).unwrap(), map);
        assert!(deserialize_map(&[]).unwrap().is_empty());
        assert!(deserialize_map(&[0]).unwrap().is_empty());
        assert!(deserialize_map(&[5, 0, 0, 0, 1]).is_err());
    }

    #[test]
    fn property_paths_join_with_nul() {
        assert_eq!(
            property_path(&["request", "headers"]),
            b"request\0headers".to_vec()
        );
    }
}
