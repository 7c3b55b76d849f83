//! `Vm`: one instance of the module (one Envoy worker's VM) with its root
//! context, its HTTP streams and its outstanding HTTP calls.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, LazyLock, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _, Result};
use serde::Serialize;
use wasmtime::{Instance, Store, Trap, Val, WasmBacktrace};

use crate::abi::{Action, Headers, LogLevel, MapType, StreamType};
use crate::host::{Host, LogEntry, MetricValue, Shared};

/// An HTTP stream (its context id).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct StreamId(pub u32);

/// What went past the filter in one direction.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Forwarded {
    /// Headers as they were when the filter let them through.
    pub headers: Option<Headers>,
    pub body: Vec<u8>,
    pub trailers: Option<Headers>,
}

/// A `proxy_send_local_response` call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalResponse {
    pub status: u32,
    pub details: String,
    pub body: Vec<u8>,
    /// The additional headers the module passed.
    pub headers: Headers,
    /// -1 when none.
    pub grpc_status: i32,
}

/// Everything the host knows about one HTTP stream.
#[derive(Debug, Clone, Default)]
pub struct StreamState {
    pub context_id: u32,
    /// The request header map (as the filter left it).
    pub request_headers: Option<Headers>,
    /// Request body buffered in the filter and not yet forwarded.
    pub request_body: Vec<u8>,
    pub request_trailers: Option<Headers>,
    pub response_headers: Option<Headers>,
    /// Response body buffered in the filter and not yet forwarded.
    pub response_body: Vec<u8>,
    pub response_trailers: Option<Headers>,
    /// What was forwarded upstream (headers snapshot taken when released).
    pub upstream: Forwarded,
    /// What was forwarded downstream to the client.
    pub downstream: Forwarded,
    /// The first local response the module sent.
    pub local_response: Option<LocalResponse>,
    /// How many times `proxy_send_local_response` was called (more than one
    /// is a bug: Envoy can hang such streams).
    pub local_response_calls: u32,
    pub request_paused: bool,
    /// The filter paused in `on_request_headers` and has not resumed: as in Envoy
    /// (`StopAllIterationAndWatermark`), no body reaches it until it does.
    pub headers_paused: bool,
    /// Body data that arrived while the headers were paused (`Some(end_of_stream)`): buffered
    /// by the host and delivered to the filter only once it resumes the request.
    pub held_body: Option<bool>,
    pub response_paused: bool,
    /// The same for the response: paused in `on_response_headers`, not yet resumed.
    pub response_headers_paused: bool,
    /// Response body data held while the response headers were paused.
    pub held_response_body: Option<bool>,
    /// `proxy_continue_stream` calls, per direction.
    pub request_continues: u32,
    pub response_continues: u32,
    /// `proxy_close_stream` was called (the stream is reset).
    pub closed: bool,
    /// on_done/on_log/on_delete ran.
    pub finished: bool,
    pub(crate) properties: BTreeMap<Vec<u8>, Vec<u8>>,
    pub(crate) local_delivered: bool,
    pub(crate) in_request_body: bool,
    pub(crate) in_response_body: bool,
}

impl StreamState {
    /// The stream ended without reaching upstream: local reply or reset.
    pub fn ended_early(&self) -> bool {
        self.local_response.is_some() || self.closed
    }

    /// A header of the current request map, values joined by ",".
    pub fn request_header(&self, name: &str) -> Option<Vec<u8>> {
        self.request_headers
            .as_ref()
            .and_then(|h| header_value(h, name))
    }

    /// A header of what was forwarded upstream.
    pub fn upstream_header(&self, name: &str) -> Option<Vec<u8>> {
        self.upstream
            .headers
            .as_ref()
            .and_then(|h| header_value(h, name))
    }
}

/// Values of `name` in `headers` joined by "," (as Envoy answers
/// `proxy_get_header_map_value`).
pub fn header_value(headers: &[(String, Vec<u8>)], name: &str) -> Option<Vec<u8>> {
    let name = name.to_ascii_lowercase();
    let mut out: Option<Vec<u8>> = None;
    for (k, v) in headers {
        if *k == name {
            match out.as_mut() {
                Some(o) => {
                    o.push(b',');
                    o.extend_from_slice(v);
                }
                None => out = Some(v.clone()),
            }
        }
    }
    out
}

static EMPTY_STREAM: LazyLock<StreamState> = LazyLock::new(StreamState::default);

/// An outbound `proxy_http_call`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpCallout {
    pub token: u32,
    /// The context that dispatched the call (the response goes to it).
    pub context_id: u32,
    pub upstream: String,
    /// Includes `:method`, `:path`, `:authority`.
    pub headers: Headers,
    pub body: Vec<u8>,
    pub trailers: Headers,
    pub timeout_ms: u32,
    /// Monotonic nanoseconds when the call times out.
    pub deadline: u64,
}

impl HttpCallout {
    pub fn header(&self, name: &str) -> Option<Vec<u8>> {
        header_value(&self.headers, name)
    }
}

/// How the test answers an outbound call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CalloutReply {
    /// A response; `headers` should contain `:status` (see [`CalloutReply::ok`]).
    Response {
        headers: Headers,
        body: Vec<u8>,
        trailers: Headers,
    },
    /// Connection failure/reset: delivered with 0 headers.
    Failure,
    /// Timeout: delivered with 0 headers.
    Timeout,
}

impl CalloutReply {
    /// A response with `:status` and the given headers and body.
    pub fn ok(status: u16, headers: &[(&str, &str)], body: impl Into<Vec<u8>>) -> CalloutReply {
        let mut h: Headers = vec![(":status".to_string(), status.to_string().into_bytes())];
        h.extend(
            headers
                .iter()
                .map(|(k, v)| (k.to_ascii_lowercase(), v.as_bytes().to_vec())),
        );
        CalloutReply::Response {
            headers: h,
            body: body.into(),
            trailers: Vec::new(),
        }
    }

    /// What Envoy's async client delivers when its per-request timeout fires
    /// (the router's local reply), as opposed to [`CalloutReply::Timeout`].
    pub fn envoy_timeout_reply() -> CalloutReply {
        CalloutReply::ok(
            504,
            &[("content-type", "text/plain")],
            "upstream request timeout",
        )
    }

    /// What Envoy's async client delivers when the cluster has no healthy
    /// endpoint.
    pub fn no_healthy_upstream() -> CalloutReply {
        CalloutReply::ok(
            503,
            &[("content-type", "text/plain")],
            "no healthy upstream",
        )
    }
}

/// The HTTP call response visible during `proxy_on_http_call_response`.
#[derive(Debug, Clone, Default)]
pub(crate) struct CallResponse {
    pub headers: Headers,
    pub body: Vec<u8>,
    pub trailers: Headers,
}

/// Store data of one VM; what hostcalls see.
pub struct VmState {
    pub(crate) shared: Arc<Mutex<Shared>>,
    pub(crate) vm: u32,
    pub(crate) root_id: u32,
    pub(crate) next_ctx: u32,
    pub(crate) effective: u32,
    pub(crate) current_callback: &'static str,
    pub(crate) streams: BTreeMap<u32, StreamState>,
    pub(crate) vm_config: Vec<u8>,
    /// Readable only during `proxy_on_configure`, as in Envoy.
    pub(crate) plugin_config: Option<Vec<u8>>,
    pub(crate) call_response: Option<CallResponse>,
    pub(crate) calls: BTreeMap<u32, HttpCallout>,
    pub(crate) next_token: u32,
    pub(crate) tick_period_ms: u32,
    pub(crate) next_tick: Option<u64>,
    pub(crate) status: (u32, Vec<u8>),
    pub(crate) stdout: Vec<u8>,
    pub(crate) stderr: Vec<u8>,
    /// stderr lines written during the current callback (for error reports).
    pub(crate) callback_stderr: Vec<String>,
    pub(crate) warnings: Vec<String>,
    pub(crate) pending_done: BTreeSet<u32>,
    pub(crate) done_requested: BTreeSet<u32>,
    pub(crate) vm_properties: BTreeMap<Vec<u8>, Vec<u8>>,
}

impl VmState {
    pub(crate) fn lock(&self) -> MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn log(&mut self, level: LogLevel, source: &'static str, message: String) {
        let (ctx, vm) = (self.effective, self.vm);
        if source == "stderr" {
            self.callback_stderr.push(message.clone());
        }
        let mut s = self.lock();
        if source == "proxy_log" && level < s.log_level {
            return;
        }
        s.logs.push(LogEntry {
            level,
            message,
            source,
            context_id: ctx,
            vm,
        });
    }

    pub(crate) fn warn(&mut self, msg: String) {
        let msg = format!(
            "[context {}, {}] {msg}",
            self.effective, self.current_callback
        );
        self.warnings.push(msg);
    }

    /// Splits complete lines out of a std stream buffer into logs.
    pub(crate) fn drain_lines(&mut self, fd: i32, flush: bool) {
        loop {
            let buf = if fd == 1 {
                &mut self.stdout
            } else {
                &mut self.stderr
            };
            let line = match buf.iter().position(|b| *b == b'\n') {
                Some(i) => {
                    let mut l: Vec<u8> = buf.drain(..=i).collect();
                    l.pop();
                    l
                }
                None if flush && !buf.is_empty() => std::mem::take(buf),
                None => break,
            };
            let (level, source) = if fd == 1 {
                (LogLevel::Info, "stdout")
            } else {
                (LogLevel::Error, "stderr")
            };
            self.log(level, source, String::from_utf8_lossy(&line).into_owned());
        }
    }

    pub(crate) fn effective_stream(&self) -> Option<&StreamState> {
        self.streams.get(&self.effective).filter(|s| !s.finished)
    }

    pub(crate) fn effective_stream_mut(&mut self) -> Option<&mut StreamState> {
        self.streams
            .get_mut(&self.effective)
            .filter(|s| !s.finished)
    }

    pub(crate) fn map(&self, mt: MapType) -> Option<&Headers> {
        match mt {
            MapType::HttpCallResponseHeaders => self.call_response.as_ref().map(|c| &c.headers),
            MapType::HttpCallResponseTrailers => self.call_response.as_ref().map(|c| &c.trailers),
            MapType::HttpRequestHeaders => self.effective_stream()?.request_headers.as_ref(),
            MapType::HttpRequestTrailers => self.effective_stream()?.request_trailers.as_ref(),
            MapType::HttpResponseHeaders => self.effective_stream()?.response_headers.as_ref(),
            MapType::HttpResponseTrailers => self.effective_stream()?.response_trailers.as_ref(),
            MapType::GrpcReceiveInitialMetadata | MapType::GrpcReceiveTrailingMetadata => None,
        }
    }

    /// A writable map, with warnings for writes Envoy would not honour.
    pub(crate) fn map_mut(&mut self, mt: MapType, op: &str) -> Option<&mut Headers> {
        let eff = self.effective;
        let warning = {
            let s = self.streams.get(&eff).filter(|s| !s.finished)?;
            match mt {
                MapType::HttpRequestHeaders if s.upstream.headers.is_some() => Some(format!(
                    "{op} on request headers after they were forwarded upstream: no effect in Envoy"
                )),
                MapType::HttpResponseHeaders if s.downstream.headers.is_some() => Some(format!(
                    "{op} on response headers after they were forwarded downstream: no effect in Envoy"
                )),
                _ => None,
            }
        };
        if let Some(w) = warning {
            self.warn(w);
        }
        let s = self.streams.get_mut(&eff).filter(|s| !s.finished)?;
        match mt {
            MapType::HttpRequestHeaders => s.request_headers.as_mut(),
            MapType::HttpResponseHeaders => s.response_headers.as_mut(),
            MapType::HttpRequestTrailers => {
                if s.request_trailers.is_none() && s.in_request_body {
                    s.request_trailers = Some(Vec::new());
                }
                s.request_trailers.as_mut()
            }
            MapType::HttpResponseTrailers => {
                if s.response_trailers.is_none() && s.in_response_body {
                    s.response_trailers = Some(Vec::new());
                }
                s.response_trailers.as_mut()
            }
            _ => None,
        }
    }

    pub(crate) fn get_property(&self, path: &[u8]) -> Option<Vec<u8>> {
        if let Some(s) = self.effective_stream() {
            if let Some(v) = s.properties.get(path) {
                return Some(v.clone());
            }
            let segs: Vec<&[u8]> = path.split(|b| *b == 0).collect();
            let headers = match segs.first().copied() {
                Some(b"request") => s.request_headers.as_ref(),
                Some(b"response") => s.response_headers.as_ref(),
                _ => None,
            };
            if segs.get(1).copied() == Some(&b"headers"[..]) {
                if let Some(h) = headers {
                    match segs.len() {
                        2 => return Some(crate::abi::serialize_map(h)),
                        3 => {
                            let name = String::from_utf8_lossy(segs[2]);
                            return header_value(h, &name);
                        }
                        _ => {}
                    }
                }
            }
        }
        if let Some(v) = self.vm_properties.get(path) {
            return Some(v.clone());
        }
        self.lock().properties.get(path).cloned()
    }

    pub(crate) fn set_property(&mut self, path: Vec<u8>, value: Vec<u8>) {
        let eff = self.effective;
        match self.streams.get_mut(&eff).filter(|s| !s.finished) {
            Some(s) => {
                s.properties.insert(path, value);
            }
            None => {
                self.vm_properties.insert(path, value);
            }
        }
    }

    /// Releases what the filter holds in the request direction.
    pub(crate) fn forward_request(&mut self, ctx: u32) {
        let Some(s) = self.streams.get_mut(&ctx) else {
            return;
        };
        if s.ended_early() {
            return;
        }
        if s.upstream.headers.is_none() {
            s.upstream.headers = s.request_headers.clone();
        }
        if s.headers_paused && s.held_body.is_some() {
            // Resumed from the header phase with a body waiting: Envoy hands the buffered
            // body to the filter now (after this callback), it does not forward it past it.
            s.headers_paused = false;
            s.request_paused = false;
            return;
        }
        s.headers_paused = false;
        let body = std::mem::take(&mut s.request_body);
        s.upstream.body.extend_from_slice(&body);
        if s.upstream.trailers.is_none() && s.request_trailers.is_some() {
            s.upstream.trailers = s.request_trailers.clone();
        }
        s.request_paused = false;
    }

    /// Releases what the filter holds in the response direction.
    pub(crate) fn forward_response(&mut self, ctx: u32) {
        let Some(s) = self.streams.get_mut(&ctx) else {
            return;
        };
        if s.closed {
            return;
        }
        if s.downstream.headers.is_none() {
            s.downstream.headers = s.response_headers.clone();
        }
        if s.response_headers_paused && s.held_response_body.is_some() {
            // As for requests: the held body goes to the filter after this callback.
            s.response_headers_paused = false;
            s.response_paused = false;
            return;
        }
        s.response_headers_paused = false;
        let body = std::mem::take(&mut s.response_body);
        s.downstream.body.extend_from_slice(&body);
        if s.downstream.trailers.is_none() && s.response_trailers.is_some() {
            s.downstream.trailers = s.response_trailers.clone();
        }
        s.response_paused = false;
    }

    pub(crate) fn continue_stream(&mut self, st: StreamType) -> crate::abi::Status {
        use crate::abi::Status;
        let eff = self.effective;
        let Some(s) = self.streams.get_mut(&eff).filter(|s| !s.finished) else {
            return Status::BadArgument;
        };
        match st {
            StreamType::HttpRequest => {
                s.request_continues += 1;
                let (paused, early) = (s.request_paused, s.ended_early());
                if early {
                    self.warn("continue_stream(HttpRequest) after the stream ended (local reply or reset)".into());
                } else if !paused {
                    self.warn(
                        "continue_stream(HttpRequest) while the request was not paused".into(),
                    );
                } else {
                    self.forward_request(eff);
                }
                Status::Ok
            }
            StreamType::HttpResponse => {
                s.response_continues += 1;
                if !s.response_paused {
                    self.warn(
                        "continue_stream(HttpResponse) while the response was not paused".into(),
                    );
                } else {
                    self.forward_response(eff);
                }
                Status::Ok
            }
            StreamType::Downstream | StreamType::Upstream => Status::BadArgument,
        }
    }
}

/// One VM made from a [`Host`].
pub struct Vm {
    host: Host,
    store: Store<VmState>,
    instance: Instance,
    broken: Option<String>,
    rejected_at: Option<&'static str>,
}

const MAX_TICKS_PER_CALL: u32 = 100_000;

impl Vm {
    pub(crate) fn create(host: &Host, vm_config: &[u8], plugin_config: &[u8]) -> Result<Vm> {
        let vm_index = {
            let mut s = host.lock();
            let n = s.next_vm;
            s.next_vm += 1;
            n
        };
        let state = VmState {
            shared: host.shared.clone(),
            vm: vm_index,
            root_id: 1,
            next_ctx: 2,
            effective: 1,
            current_callback: "instantiation",
            streams: BTreeMap::new(),
            vm_config: vm_config.to_vec(),
            plugin_config: None,
            call_response: None,
            calls: BTreeMap::new(),
            next_token: 1,
            tick_period_ms: 0,
            next_tick: None,
            status: (0, Vec::new()),
            stdout: Vec::new(),
            stderr: Vec::new(),
            callback_stderr: Vec::new(),
            warnings: Vec::new(),
            pending_done: BTreeSet::new(),
            done_requested: BTreeSet::new(),
            vm_properties: BTreeMap::new(),
        };
        let mut store = Store::new(&host.engine, state);
        let instance = host
            .linker
            .instantiate(&mut store, &host.module)
            .map_err(anyhow::Error::from)
            .context("instantiating the module")?;
        let mut vm = Vm {
            host: host.clone(),
            store,
            instance,
            broken: None,
            rejected_at: None,
        };
        let root = vm.root_id();
        if vm.has_export("_initialize") {
            vm.call("_initialize", root, &[])?;
            if vm.has_export("main") {
                vm.call("main", root, &[0, 0])?;
            }
        } else if vm.has_export("_start") {
            vm.call("_start", root, &[])?;
        }
        vm.call("proxy_on_context_create", root, &[root as i32, 0])?;
        let ok = vm
            .call(
                "proxy_on_vm_start",
                root,
                &[root as i32, vm_config.len() as i32],
            )?
            .unwrap_or(1);
        if ok == 0 {
            vm.rejected_at = Some("proxy_on_vm_start");
            return Ok(vm);
        }
        if !vm.configure(plugin_config)? {
            vm.rejected_at = Some("proxy_on_configure");
        }
        Ok(vm)
    }

    /// The host this VM belongs to.
    pub fn host(&self) -> &Host {
        &self.host
    }

    /// 1, 2, ... in creation order within the host.
    pub fn index(&self) -> u32 {
        self.store.data().vm
    }

    pub fn root_id(&self) -> u32 {
        self.store.data().root_id
    }

    /// Whether vm start and the last configuration were accepted.
    pub fn configured(&self) -> bool {
        self.rejected_at.is_none()
    }

    /// Which callback rejected the configuration, if any.
    pub fn rejected_at(&self) -> Option<&'static str> {
        self.rejected_at
    }

    /// Set after a trap or a failed hostcall: the VM refuses further work,
    /// as a crashed VM does in Envoy.
    pub fn broken(&self) -> Option<&str> {
        self.broken.as_deref()
    }

    fn check_usable(&self) -> Result<()> {
        match &self.broken {
            Some(b) => bail!(
                "VM {} is unusable after an earlier failure: {b}",
                self.index()
            ),
            None => Ok(()),
        }
    }

    fn has_export(&mut self, name: &str) -> bool {
        self.instance.get_func(&mut self.store, name).is_some()
    }

    /// Calls an export if the module has it; `Ok(None)` if it does not or
    /// returns nothing. Traps and hostcall errors become errors carrying the
    /// wasm backtrace and whatever the module wrote to stderr, and break the VM.
    pub fn call(&mut self, name: &'static str, ctx: u32, args: &[i32]) -> Result<Option<i32>> {
        self.check_usable()?;
        let Some(func) = self.instance.get_func(&mut self.store, name) else {
            return Ok(None);
        };
        let ty = func.ty(&self.store);
        if ty.params().len() != args.len() {
            bail!(
                "export {name} has signature {ty:?}, expected {} i32 parameters",
                args.len()
            );
        }
        let params: Vec<Val> = args.iter().map(|a| Val::I32(*a)).collect();
        let mut results = vec![Val::I32(0); ty.results().len()];
        let (prev_eff, prev_cb) = {
            let st = self.store.data_mut();
            let prev = (st.effective, st.current_callback);
            st.effective = ctx;
            st.current_callback = name;
            st.callback_stderr.clear();
            prev
        };
        let r = func.call(&mut self.store, &params, &mut results);
        let st = self.store.data_mut();
        st.drain_lines(1, true);
        st.drain_lines(2, true);
        st.effective = prev_eff;
        st.current_callback = prev_cb;
        match r {
            Ok(()) => Ok(results.first().and_then(|v| v.i32())),
            Err(e)
                if name == "_start"
                    && e.downcast_ref::<crate::wasi::ProcExit>().map(|x| x.0) == Some(0) =>
            {
                Ok(None)
            }
            Err(e) => {
                let stderr = std::mem::take(&mut self.store.data_mut().callback_stderr);
                let msg = describe_failure(name, ctx, &e, &stderr);
                self.broken = Some(msg.clone());
                Err(anyhow!(msg))
            }
        }
    }

    fn post_callback(&mut self, ctx: u32) -> Result<()> {
        let deliver = {
            let st = self.store.data();
            st.streams
                .get(&ctx)
                .map(|s| s.local_response.is_some() && !s.local_delivered && !s.finished)
                .unwrap_or(false)
        };
        if deliver {
            self.deliver_local_response(ctx)?;
        }
        let done: Vec<u32> = {
            let st = self.store.data_mut();
            let ready: Vec<u32> = st
                .done_requested
                .intersection(&st.pending_done)
                .copied()
                .collect();
            for c in &ready {
                st.pending_done.remove(c);
                st.done_requested.remove(c);
            }
            ready
        };
        for c in done {
            self.log_and_delete(c)?;
        }
        // Bodies held while the headers were paused go to the filter once it resumed them.
        let resumed: Vec<(u32, bool, usize)> = {
            let st = self.store.data_mut();
            st.streams
                .iter_mut()
                .filter(|(_, s)| !s.headers_paused && !s.finished && !s.ended_early())
                .filter_map(|(c, s)| {
                    s.held_body
                        .take()
                        .map(|eos| (*c, eos, s.request_body.len()))
                })
                .collect()
        };
        let resumed_responses: Vec<(u32, bool, usize)> = {
            let st = self.store.data_mut();
            st.streams
                .iter_mut()
                .filter(|(_, s)| !s.response_headers_paused && !s.finished && !s.closed)
                .filter_map(|(c, s)| {
                    s.held_response_body
                        .take()
                        .map(|eos| (*c, eos, s.response_body.len()))
                })
                .collect()
        };
        for (c, eos, size) in resumed_responses {
            if let Some(stream) = self.store.data_mut().streams.get_mut(&c) {
                stream.in_response_body = true;
            }
            let r = self.action(
                "proxy_on_response_body",
                c,
                &[c as i32, size as i32, eos as i32],
            );
            if let Some(stream) = self.store.data_mut().streams.get_mut(&c) {
                stream.in_response_body = false;
            }
            let a = r?;
            self.after_response_action(c, a);
            self.post_callback(c)?;
        }
        for (c, eos, size) in resumed {
            if let Some(stream) = self.store.data_mut().streams.get_mut(&c) {
                stream.in_request_body = true;
            }
            let r = self.action(
                "proxy_on_request_body",
                c,
                &[c as i32, size as i32, eos as i32],
            );
            if let Some(stream) = self.store.data_mut().streams.get_mut(&c) {
                stream.in_request_body = false;
            }
            let a = r?;
            self.after_request_action(c, a);
            self.post_callback(c)?;
        }
        Ok(())
    }

    fn deliver_local_response(&mut self, ctx: u32) -> Result<()> {
        let (lr, through) = {
            let through = self.host.lock().local_replies_through_filter;
            let st = self.store.data_mut();
            let Some(s) = st.streams.get_mut(&ctx) else {
                return Ok(());
            };
            s.local_delivered = true;
            let Some(lr) = s.local_response.clone() else {
                return Ok(());
            };
            (lr, through)
        };
        let mut headers: Headers = vec![(":status".into(), lr.status.to_string().into_bytes())];
        headers.extend(lr.headers.iter().cloned());
        if !lr.body.is_empty() {
            if header_value(&headers, "content-type").is_none() {
                headers.push(("content-type".into(), b"text/plain".to_vec()));
            }
            headers.push((
                "content-length".into(),
                lr.body.len().to_string().into_bytes(),
            ));
        }
        if !through {
            let st = self.store.data_mut();
            if let Some(s) = st.streams.get_mut(&ctx) {
                s.downstream = Forwarded {
                    headers: Some(headers),
                    body: lr.body,
                    trailers: None,
                };
            }
            return Ok(());
        }
        let eos = lr.body.is_empty();
        self.response_headers_inner(ctx, headers, eos)?;
        if !eos {
            self.response_body_inner(ctx, &lr.body, true)?;
        }
        Ok(())
    }

    fn log_and_delete(&mut self, ctx: u32) -> Result<()> {
        self.call("proxy_on_log", ctx, &[ctx as i32])?;
        self.call("proxy_on_delete", ctx, &[ctx as i32])?;
        let st = self.store.data_mut();
        if let Some(s) = st.streams.get_mut(&ctx) {
            s.finished = true;
        }
        st.calls.retain(|_, c| c.context_id != ctx);
        Ok(())
    }

    fn stream_ctx(&self, s: StreamId, what: &str) -> Result<u32> {
        let st = self.store.data();
        let Some(stream) = st.streams.get(&s.0) else {
            bail!("{what}: unknown stream {}", s.0);
        };
        if stream.finished {
            bail!("{what}: stream {} is finished", s.0);
        }
        Ok(s.0)
    }

    fn request_open(&self, s: StreamId, what: &str) -> Result<u32> {
        let ctx = self.stream_ctx(s, what)?;
        let stream = self.stream(s);
        if stream.local_response.is_some() {
            bail!("{what}: stream {} already ended with a local response", s.0);
        }
        if stream.closed {
            bail!("{what}: stream {} was closed by the module", s.0);
        }
        Ok(ctx)
    }

    /// Re-runs `proxy_on_configure` with a new plugin configuration.
    pub fn configure(&mut self, plugin_config: &[u8]) -> Result<bool> {
        let root = self.root_id();
        self.store.data_mut().plugin_config = Some(plugin_config.to_vec());
        let r = self.call(
            "proxy_on_configure",
            root,
            &[root as i32, plugin_config.len() as i32],
        );
        self.store.data_mut().plugin_config = None;
        let ok = r?.unwrap_or(1) != 0;
        self.rejected_at = if ok { None } else { Some("proxy_on_configure") };
        Ok(ok)
    }

    // ---- timers ----

    /// The tick period the module set (0 = none).
    pub fn tick_period_ms(&self) -> u32 {
        self.store.data().tick_period_ms
    }

    /// Fires `proxy_on_tick` once per period that is due by the monotonic
    /// clock; returns how many ticks fired. Also delivers queue-ready
    /// notifications for queues this VM registered.
    pub fn tick(&mut self) -> Result<u32> {
        self.deliver_queue_ready()?;
        let mut fired = 0;
        loop {
            let now = self.host.monotonic_nanos();
            let due = match self.store.data().next_tick {
                Some(t) if t <= now => t,
                _ => break,
            };
            fired += 1;
            if fired > MAX_TICKS_PER_CALL {
                bail!("more than {MAX_TICKS_PER_CALL} ticks due at once");
            }
            let period_ns = u64::from(self.store.data().tick_period_ms) * 1_000_000;
            self.store.data_mut().next_tick = Some(due + period_ns);
            self.force_tick()?;
        }
        Ok(fired)
    }

    /// Fires `proxy_on_tick` now, due or not.
    pub fn force_tick(&mut self) -> Result<()> {
        let root = self.root_id();
        self.call("proxy_on_tick", root, &[root as i32])?;
        self.post_callback(root)
    }

    /// Advances the host clock, times out due HTTP calls (0 headers) and
    /// fires due ticks.
    pub fn advance(&mut self, d: Duration) -> Result<u32> {
        self.host.advance(d);
        let now = self.host.monotonic_nanos();
        let due: Vec<u32> = self
            .store
            .data()
            .calls
            .values()
            .filter(|c| c.deadline <= now)
            .map(|c| c.token)
            .collect();
        // Envoy's async client answers a timed-out call with its own 504 response.
        for t in due {
            self.answer_call(t, CalloutReply::envoy_timeout_reply())?;
        }
        self.tick()
    }

    /// Calls `proxy_on_queue_ready` for items enqueued on queues this VM
    /// registered.
    pub fn deliver_queue_ready(&mut self) -> Result<()> {
        let vm = self.index();
        let mine: Vec<u32> = {
            let mut s = self.host.lock();
            let (mine, rest): (Vec<_>, Vec<_>) =
                s.queue_ready.drain(..).partition(|(o, _)| *o == vm);
            s.queue_ready = rest;
            mine.into_iter().map(|(_, q)| q).collect()
        };
        let root = self.root_id();
        for q in mine {
            self.call("proxy_on_queue_ready", root, &[root as i32, q as i32])?;
            self.post_callback(root)?;
        }
        Ok(())
    }

    // ---- streams ----

    /// Creates an HTTP context (`proxy_on_context_create(id, root)`).
    pub fn new_stream(&mut self) -> Result<StreamId> {
        let root = self.root_id();
        self.check_usable()?;
        let id = {
            let st = self.store.data_mut();
            let id = st.next_ctx;
            st.next_ctx += 1;
            st.streams.insert(
                id,
                StreamState {
                    context_id: id,
                    ..StreamState::default()
                },
            );
            id
        };
        self.call("proxy_on_context_create", root, &[id as i32, root as i32])?;
        Ok(StreamId(id))
    }

    /// Sets a property visible only to this stream.
    pub fn set_stream_property(&mut self, s: StreamId, path: &[&str], value: &[u8]) -> Result<()> {
        let ctx = self.stream_ctx(s, "set_stream_property")?;
        if let Some(st) = self.store.data_mut().streams.get_mut(&ctx) {
            st.properties
                .insert(crate::abi::property_path(path), value.to_vec());
        }
        Ok(())
    }

    /// Sets a property for this VM (over the host-wide ones).
    pub fn set_property(&mut self, path: &[&str], value: &[u8]) {
        self.store
            .data_mut()
            .vm_properties
            .insert(crate::abi::property_path(path), value.to_vec());
    }

    /// A property as the module would read it from the root context.
    pub fn property(&self, path: &[&str]) -> Option<Vec<u8>> {
        let key = crate::abi::property_path(path);
        self.store
            .data()
            .vm_properties
            .get(&key)
            .cloned()
            .or_else(|| self.host.lock().properties.get(&key).cloned())
    }

    /// A property as set on the stream (by the test or `proxy_set_property`).
    pub fn stream_property(&self, s: StreamId, path: &[&str]) -> Option<Vec<u8>> {
        self.stream(s)
            .properties
            .get(&crate::abi::property_path(path))
            .cloned()
    }

    /// Delivers request headers (names are lowercased). Returns the filter's action.
    pub fn request_headers<K: AsRef<str>, V: AsRef<[u8]>>(
        &mut self,
        s: StreamId,
        headers: impl IntoIterator<Item = (K, V)>,
        end_of_stream: bool,
    ) -> Result<Action> {
        let ctx = self.request_open(s, "request_headers")?;
        let headers = to_headers(headers);
        let n = headers.len();
        if let Some(st) = self.store.data_mut().streams.get_mut(&ctx) {
            if st.request_headers.is_some() {
                bail!(
                    "request_headers: stream {} already has request headers",
                    s.0
                );
            }
            st.request_headers = Some(headers);
        }
        let a = self.action(
            "proxy_on_request_headers",
            ctx,
            &[ctx as i32, n as i32, end_of_stream as i32],
        )?;
        self.after_request_action(ctx, a);
        if a == Action::Pause {
            if let Some(st) = self.store.data_mut().streams.get_mut(&ctx) {
                st.headers_paused = !st.ended_early() && st.request_paused;
            }
        }
        self.post_callback(ctx)?;
        Ok(a)
    }

    /// Delivers a request body chunk. The filter sees everything buffered so
    /// far (it is buffered while the filter pauses, as Envoy does).
    pub fn request_body(
        &mut self,
        s: StreamId,
        chunk: &[u8],
        end_of_stream: bool,
    ) -> Result<Action> {
        let ctx = self.request_open(s, "request_body")?;
        if let Some(stream) = self.store.data_mut().streams.get_mut(&ctx) {
            if stream.headers_paused {
                // Envoy holds the body back from a filter that paused its headers: buffered
                // here, delivered when the filter resumes the request (never before).
                stream.request_body.extend_from_slice(chunk);
                stream.held_body = Some(end_of_stream || stream.held_body == Some(true));
                return Ok(Action::Pause);
            }
        }
        let size = {
            let st = self.store.data_mut();
            let Some(stream) = st.streams.get_mut(&ctx) else {
                bail!("request_body: no stream")
            };
            stream.request_body.extend_from_slice(chunk);
            stream.in_request_body = true;
            stream.request_body.len()
        };
        let r = self.action(
            "proxy_on_request_body",
            ctx,
            &[ctx as i32, size as i32, end_of_stream as i32],
        );
        if let Some(stream) = self.store.data_mut().streams.get_mut(&ctx) {
            stream.in_request_body = false;
        }
        let a = r?;
        let headers_held = self.stream(s).upstream.headers.is_none();
        if a == Action::Continue && headers_held && self.stream(s).request_paused {
            let st = self.store.data_mut();
            st.effective = ctx;
            st.current_callback = "proxy_on_request_body";
            st.warn(
                "Continue from on_request_body released request headers paused in on_request_headers \
                 (Envoy resumes the stream here)"
                    .into(),
            );
        }
        self.after_request_action(ctx, a);
        self.post_callback(ctx)?;
        Ok(a)
    }

    /// Delivers request trailers.
    pub fn request_trailers<K: AsRef<str>, V: AsRef<[u8]>>(
        &mut self,
        s: StreamId,
        trailers: impl IntoIterator<Item = (K, V)>,
    ) -> Result<Action> {
        let ctx = self.request_open(s, "request_trailers")?;
        let trailers = to_headers(trailers);
        let n = trailers.len();
        if let Some(st) = self.store.data_mut().streams.get_mut(&ctx) {
            st.request_trailers = Some(trailers);
        }
        let a = self.action("proxy_on_request_trailers", ctx, &[ctx as i32, n as i32])?;
        self.after_request_action(ctx, a);
        self.post_callback(ctx)?;
        Ok(a)
    }

    /// Delivers response headers (include `:status`).
    pub fn response_headers<K: AsRef<str>, V: AsRef<[u8]>>(
        &mut self,
        s: StreamId,
        headers: impl IntoIterator<Item = (K, V)>,
        end_of_stream: bool,
    ) -> Result<Action> {
        let ctx = self.stream_ctx(s, "response_headers")?;
        if self.stream(s).closed {
            bail!("response_headers: stream {} was closed by the module", s.0);
        }
        let a = self.response_headers_inner(ctx, to_headers(headers), end_of_stream)?;
        self.post_callback(ctx)?;
        Ok(a)
    }

    fn response_headers_inner(&mut self, ctx: u32, headers: Headers, eos: bool) -> Result<Action> {
        let n = headers.len();
        if let Some(st) = self.store.data_mut().streams.get_mut(&ctx) {
            st.response_headers = Some(headers);
        }
        let a = self.action(
            "proxy_on_response_headers",
            ctx,
            &[ctx as i32, n as i32, eos as i32],
        )?;
        self.after_response_action(ctx, a);
        if a == Action::Pause {
            if let Some(st) = self.store.data_mut().streams.get_mut(&ctx) {
                st.response_headers_paused = !st.closed && st.response_paused;
            }
        }
        Ok(a)
    }

    /// Delivers a response body chunk (buffered while the filter pauses).
    pub fn response_body(
        &mut self,
        s: StreamId,
        chunk: &[u8],
        end_of_stream: bool,
    ) -> Result<Action> {
        let ctx = self.stream_ctx(s, "response_body")?;
        let a = self.response_body_inner(ctx, chunk, end_of_stream)?;
        self.post_callback(ctx)?;
        Ok(a)
    }

    fn response_body_inner(&mut self, ctx: u32, chunk: &[u8], eos: bool) -> Result<Action> {
        if let Some(stream) = self.store.data_mut().streams.get_mut(&ctx) {
            if stream.response_headers_paused {
                // Envoy holds the body back from a filter that paused the response headers.
                stream.response_body.extend_from_slice(chunk);
                stream.held_response_body = Some(eos || stream.held_response_body == Some(true));
                return Ok(Action::Pause);
            }
        }
        let size = {
            let st = self.store.data_mut();
            let Some(stream) = st.streams.get_mut(&ctx) else {
                bail!("response_body: no stream")
            };
            stream.response_body.extend_from_slice(chunk);
            stream.in_response_body = true;
            stream.response_body.len()
        };
        let r = self.action(
            "proxy_on_response_body",
            ctx,
            &[ctx as i32, size as i32, eos as i32],
        );
        if let Some(stream) = self.store.data_mut().streams.get_mut(&ctx) {
            stream.in_response_body = false;
        }
        let a = r?;
        self.after_response_action(ctx, a);
        Ok(a)
    }

    /// Delivers response trailers.
    pub fn response_trailers<K: AsRef<str>, V: AsRef<[u8]>>(
        &mut self,
        s: StreamId,
        trailers: impl IntoIterator<Item = (K, V)>,
    ) -> Result<Action> {
        let ctx = self.stream_ctx(s, "response_trailers")?;
        let trailers = to_headers(trailers);
        let n = trailers.len();
        if let Some(st) = self.store.data_mut().streams.get_mut(&ctx) {
            st.response_trailers = Some(trailers);
        }
        let a = self.action("proxy_on_response_trailers", ctx, &[ctx as i32, n as i32])?;
        self.after_response_action(ctx, a);
        self.post_callback(ctx)?;
        Ok(a)
    }

    fn action(&mut self, name: &'static str, ctx: u32, args: &[i32]) -> Result<Action> {
        match self.call(name, ctx, args)? {
            Some(v) => Action::from_raw(v).with_context(|| format!("{name}(context {ctx})")),
            None => Ok(Action::Continue),
        }
    }

    fn after_request_action(&mut self, ctx: u32, a: Action) {
        let st = self.store.data_mut();
        match a {
            Action::Continue => st.forward_request(ctx),
            Action::Pause => {
                if let Some(s) = st.streams.get_mut(&ctx) {
                    if !s.ended_early() {
                        s.request_paused = true;
                    }
                }
            }
        }
    }

    fn after_response_action(&mut self, ctx: u32, a: Action) {
        let st = self.store.data_mut();
        match a {
            Action::Continue => st.forward_response(ctx),
            Action::Pause => {
                if let Some(s) = st.streams.get_mut(&ctx) {
                    s.response_paused = true;
                }
            }
        }
    }

    /// Ends the stream: `proxy_on_done`, then (if it returned true)
    /// `proxy_on_log` and `proxy_on_delete`. Outstanding calls of the stream
    /// are cancelled, as Envoy does.
    pub fn finish_stream(&mut self, s: StreamId) -> Result<()> {
        let ctx = self.stream_ctx(s, "finish_stream")?;
        let done = self.call("proxy_on_done", ctx, &[ctx as i32])?.unwrap_or(1) != 0;
        if done {
            self.log_and_delete(ctx)?;
        } else {
            self.store.data_mut().pending_done.insert(ctx);
        }
        self.post_callback(ctx)
    }

    /// `proxy_on_done` on the root context (and on_delete if it agrees).
    pub fn shutdown(&mut self) -> Result<bool> {
        let root = self.root_id();
        let done = self
            .call("proxy_on_done", root, &[root as i32])?
            .unwrap_or(1)
            != 0;
        if done {
            self.call("proxy_on_delete", root, &[root as i32])?;
        } else {
            self.store.data_mut().pending_done.insert(root);
        }
        Ok(done)
    }

    /// The state of a stream (an empty state for unknown ids).
    pub fn stream(&self, s: StreamId) -> &StreamState {
        self.store.data().streams.get(&s.0).unwrap_or(&EMPTY_STREAM)
    }

    /// Every stream created so far.
    pub fn streams(&self) -> Vec<StreamId> {
        self.store
            .data()
            .streams
            .keys()
            .map(|k| StreamId(*k))
            .collect()
    }

    // ---- HTTP calls ----

    /// Outstanding HTTP calls, by token.
    pub fn pending_calls(&self) -> Vec<HttpCallout> {
        self.store.data().calls.values().cloned().collect()
    }

    /// Outstanding HTTP calls dispatched by one stream.
    pub fn pending_calls_for(&self, s: StreamId) -> Vec<HttpCallout> {
        self.store
            .data()
            .calls
            .values()
            .filter(|c| c.context_id == s.0)
            .cloned()
            .collect()
    }

    /// Answers an outstanding call: `proxy_on_http_call_response` runs on
    /// the dispatching context with (0 headers) for failure and timeout.
    pub fn answer_call(&mut self, token: u32, reply: CalloutReply) -> Result<()> {
        let call =
            self.store.data_mut().calls.remove(&token).ok_or_else(|| {
                anyhow!("answer_call: no outstanding HTTP call with token {token}")
            })?;
        let ctx = call.context_id;
        let (resp, status) = match reply {
            CalloutReply::Response {
                headers,
                body,
                trailers,
            } => (
                CallResponse {
                    headers: headers
                        .into_iter()
                        .map(|(k, v)| (k.to_ascii_lowercase(), v))
                        .collect(),
                    body,
                    trailers,
                },
                (0, Vec::new()),
            ),
            CalloutReply::Failure => (CallResponse::default(), (11, b"reset".to_vec())),
            CalloutReply::Timeout => (CallResponse::default(), (11, b"timeout".to_vec())),
        };
        let args = [
            ctx as i32,
            token as i32,
            resp.headers.len() as i32,
            resp.body.len() as i32,
            resp.trailers.len() as i32,
        ];
        {
            let st = self.store.data_mut();
            st.call_response = Some(resp);
            st.status = status;
        }
        let r = self.call("proxy_on_http_call_response", ctx, &args);
        self.store.data_mut().call_response = None;
        r?;
        self.post_callback(ctx)
    }

    // ---- observations ----

    /// This VM's log lines.
    pub fn logs(&self) -> Vec<LogEntry> {
        let vm = self.index();
        self.host
            .lock()
            .logs
            .iter()
            .filter(|l| l.vm == vm)
            .cloned()
            .collect()
    }

    /// Takes this VM's log lines.
    pub fn take_logs(&mut self) -> Vec<LogEntry> {
        let vm = self.index();
        let mut s = self.host.lock();
        let (mine, rest): (Vec<_>, Vec<_>) = s.logs.drain(..).partition(|l| l.vm == vm);
        s.logs = rest;
        mine
    }

    /// Whether any log line of this VM contains `needle`.
    pub fn logged(&self, needle: &str) -> bool {
        self.logs().iter().any(|l| l.message.contains(needle))
    }

    /// Host-side anomalies: writes Envoy would ignore, continues of streams
    /// that were not paused, repeated local responses, malformed maps, ...
    pub fn warnings(&self) -> &[String] {
        &self.store.data().warnings
    }

    pub fn metric(&self, name: &str) -> Option<i64> {
        self.host.metric(name)
    }

    pub fn metrics(&self) -> BTreeMap<String, MetricValue> {
        self.host.metrics()
    }

    pub fn shared_data(&self, key: &str) -> Option<(Vec<u8>, u32)> {
        self.host.shared_data(key)
    }

    /// Copies bytes out of the module's exported memory (for tests).
    pub fn read_memory(&mut self, ptr: u32, len: u32) -> Result<Vec<u8>> {
        let mem = self
            .instance
            .get_memory(&mut self.store, "memory")
            .ok_or_else(|| anyhow!("the module exports no memory"))?;
        let (p, l) = (ptr as usize, len as usize);
        mem.data(&self.store)
            .get(p..p.saturating_add(l))
            .map(<[u8]>::to_vec)
            .ok_or_else(|| anyhow!("read_memory({ptr}, {len}) is out of bounds"))
    }

    /// The (code, message) `proxy_get_status` would answer.
    pub fn last_status(&self) -> (u32, Vec<u8>) {
        self.store.data().status.clone()
    }
}

fn to_headers<K: AsRef<str>, V: AsRef<[u8]>>(it: impl IntoIterator<Item = (K, V)>) -> Headers {
    it.into_iter()
        .map(|(k, v)| (k.as_ref().to_ascii_lowercase(), v.as_ref().to_vec()))
        .collect()
}

fn describe_failure(name: &str, ctx: u32, e: &wasmtime::Error, stderr: &[String]) -> String {
    let mut msg = format!("{name}(context {ctx}) failed: ");
    if let Some(trap) = e.downcast_ref::<Trap>() {
        msg.push_str(&format!("wasm trap: {trap}"));
    } else if let Some(exit) = e.downcast_ref::<crate::wasi::ProcExit>() {
        msg.push_str(&exit.to_string());
    } else {
        msg.push_str(&e.root_cause().to_string());
    }
    if !stderr.is_empty() {
        msg.push_str("\nmodule stderr:\n  ");
        msg.push_str(&stderr.join("\n  "));
    }
    match e.downcast_ref::<WasmBacktrace>() {
        Some(bt) => msg.push_str(&format!("\nwasm backtrace:\n{bt}")),
        None => msg.push_str("\n(no wasm backtrace)"),
    }
    msg
}
