//! The no-op baseline filter for `scripts/bench` (configuration (b)): per request it reads one
//! header and sets one header, and nothing else. It measures what any Rust proxy-wasm filter
//! pays in Envoy (V8 entry, context creation, two host calls), so mandate's own cost can be
//! read as a ratio against it.
//!
//! With the `host-es256` feature it becomes a diagnostic probe (configuration (h)): it also
//! checks the bearer token's ES256 signature on every request through Envoy's `verify_signature`
//! foreign function (BoringSSL, in the host) and answers 401 when it fails. That prices the
//! cold path's signature check done by the host instead of by pure-Rust P-256 in wasm. The
//! plugin configuration is the trust key as hex SubjectPublicKeyInfo DER (`bench-fixture`
//! writes it as `spki.hex`).
//!
//! Built for `wasm32-wasip1` only (`cargo build -p mandate-bench --lib --no-default-features
//! --target wasm32-wasip1 --release`). Host-call errors are ignored: a baseline must never trap.

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel, MapType};
use std::rc::Rc;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Warn);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(NoopRoot { key: Rc::new(Vec::new()) }) });
}}

struct NoopRoot {
    /// The probe's trust key (SPKI DER); unused by the no-op.
    key: Rc<Vec<u8>>,
}

impl Context for NoopRoot {}

impl RootContext for NoopRoot {
    #[cfg(feature = "host-es256")]
    fn on_configure(&mut self, size: usize) -> bool {
        let raw =
            hostcalls::get_buffer(proxy_wasm::types::BufferType::PluginConfiguration, 0, size)
                .ok()
                .flatten()
                .unwrap_or_default();
        let hex: Vec<u8> = raw.into_iter().filter(u8::is_ascii_hexdigit).collect();
        let key: Option<Vec<u8>> = hex
            .chunks(2)
            .map(|c| {
                std::str::from_utf8(c)
                    .ok()
                    .and_then(|s| u8::from_str_radix(s, 16).ok())
            })
            .collect();
        match key {
            Some(k) if !k.is_empty() => {
                self.key = Rc::new(k);
                true
            }
            _ => false,
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Noop {
            key: self.key.clone(),
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Noop {
    #[cfg_attr(not(feature = "host-es256"), allow(dead_code))]
    key: Rc<Vec<u8>>,
}

impl Context for Noop {}

impl HttpContext for Noop {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        // One read (the caller's token, as a filter would) and one write.
        let auth = hostcalls::get_map_value_bytes(MapType::HttpRequestHeaders, "authorization")
            .ok()
            .flatten();
        #[cfg(feature = "host-es256")]
        if !auth.as_deref().is_some_and(|a| probe::verify(&self.key, a)) {
            let _ = hostcalls::send_http_response(401, vec![], Some(b"bad signature\n"));
            return Action::Pause;
        }
        #[cfg(feature = "host-calls")]
        calls::mandate_like();
        let seen: &[u8] = if auth.is_some() { b"1" } else { b"0" };
        let _ =
            hostcalls::set_map_value_bytes(MapType::HttpRequestHeaders, "x-bench-noop", Some(seen));
        Action::Continue
    }
}

#[cfg(feature = "host-calls")]
mod calls {
    use proxy_wasm::hostcalls;
    use proxy_wasm::types::{LogLevel, MapType, MetricType};
    use std::cell::RefCell;

    thread_local! {
        static METRICS: RefCell<Vec<u32>> = const { RefCell::new(Vec::new()) };
        static LINES: RefCell<String> = const { RefCell::new(String::new()) };
    }

    /// A decision record of the size mandate logs on the warm path (~800 bytes of JSON).
    fn record() -> String {
        let mut s = String::from(
            "{\"ts_ms\":1795632433000,\"decision_id\":\"0123456789abcdef\",\"effect\":\"allow\"",
        );
        while s.len() < 790 {
            s.push_str(",\"field\":\"value-value\"");
        }
        s.push('}');
        s
    }

    /// mandate's warm-path host calls, in its order, with its sizes: per request the clock, the
    /// header map, three header edits (replace the credential, set the decision id and the
    /// identity), the clock again and the filter state; the per-request counters and the record
    /// line are batched (one log call per ~32 KB of lines, the counters on the tick).
    pub fn mandate_like() {
        let _ = hostcalls::get_current_time();
        let _ = hostcalls::get_map_bytes(MapType::HttpRequestHeaders);
        let credential = [b'a'; 560];
        let _ = hostcalls::set_map_value_bytes(
            MapType::HttpRequestHeaders,
            "authorization",
            Some(&credential),
        );
        let _ = hostcalls::set_map_value_bytes(
            MapType::HttpRequestHeaders,
            "x-mandate-decision-id",
            Some(b"0123456789abcdef"),
        );
        let _ = hostcalls::set_map_value_bytes(
            MapType::HttpRequestHeaders,
            "x-mandate-identity",
            Some(b"spiffe://example.org/agent/bench"),
        );
        let _ = hostcalls::get_current_time();
        let rec = record();
        LINES.with(|l| {
            let mut l = l.borrow_mut();
            l.push_str("mandate.decision ");
            l.push_str(&rec);
            l.push('\n');
            if l.len() >= 32 * 1024 {
                let _ = hostcalls::log(LogLevel::Info, l.trim_end());
                l.clear();
                // The counters' flush, once per batch here (mandate: once per tick).
                METRICS.with(|m| {
                    let mut m = m.borrow_mut();
                    if m.is_empty() {
                        for name in ["probe.a", "probe.b", "probe.c", "probe.d", "probe.e"] {
                            if let Ok(id) = hostcalls::define_metric(MetricType::Counter, name) {
                                m.push(id);
                            }
                        }
                    }
                    for id in m.iter() {
                        let _ = hostcalls::increment_metric(*id, 40);
                    }
                });
            }
        });
        let _ = hostcalls::set_property(vec!["mandate.decision"], Some(rec.as_bytes()));
    }
}

#[cfg(feature = "host-es256")]
mod probe {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine as _;
    use proxy_wasm::hostcalls;

    /// `Bearer <jws>`: ES256 signature over `header.payload`, checked by the host.
    pub fn verify(spki: &[u8], authorization: &[u8]) -> bool {
        let Some(token) = authorization.strip_prefix(b"Bearer ") else {
            return false;
        };
        let Some(dot) = token.iter().rposition(|b| *b == b'.') else {
            return false;
        };
        let (text, sig) = (&token[..dot], &token[dot + 1..]);
        let Ok(raw) = URL_SAFE_NO_PAD.decode(sig) else {
            return false;
        };
        if raw.len() != 64 {
            return false;
        }
        let der = ecdsa_der(&raw[..32], &raw[32..]);
        // VerifySignatureArguments { hash_function = 1, public_key = 2, signature = 3, text = 4 }
        let mut args = Vec::with_capacity(16 + spki.len() + der.len() + text.len());
        field(&mut args, 1, b"sha256");
        field(&mut args, 2, spki);
        field(&mut args, 3, &der);
        field(&mut args, 4, text);
        // VerifySignatureResult { result = 1 (bool) }: `08 01` when valid.
        matches!(hostcalls::call_foreign_function("verify_signature", Some(&args)), Ok(Some(r)) if r.starts_with(&[0x08, 0x01]))
    }

    fn field(out: &mut Vec<u8>, number: u8, value: &[u8]) {
        out.push((number << 3) | 2);
        let mut n = value.len();
        while n >= 0x80 {
            out.push((n as u8) | 0x80);
            n >>= 7;
        }
        out.push(n as u8);
        out.extend_from_slice(value);
    }

    /// Raw `r || s` (JWS) to a DER ECDSA-Sig-Value (what BoringSSL's EVP_DigestVerify takes).
    fn ecdsa_der(r: &[u8], s: &[u8]) -> Vec<u8> {
        fn int(out: &mut Vec<u8>, v: &[u8]) {
            let v = &v[v.iter().position(|b| *b != 0).unwrap_or(v.len() - 1)..];
            let pad = v[0] & 0x80 != 0;
            out.push(0x02);
            out.push((v.len() + usize::from(pad)) as u8);
            if pad {
                out.push(0);
            }
            out.extend_from_slice(v);
        }
        let mut body = Vec::with_capacity(72);
        int(&mut body, r);
        int(&mut body, s);
        let mut out = Vec::with_capacity(body.len() + 2);
        out.push(0x30);
        out.push(body.len() as u8);
        out.extend_from_slice(&body);
        out
    }
}
