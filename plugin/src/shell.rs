//! The proxy-wasm shell: the only code that makes host calls.
//!
//! It gathers inputs with as few host calls as possible, hands them to the
//! core [`Engine`], and applies the verdict. Every host error on the decision
//! path denies; nothing here may panic (a panic traps the VM for all traffic).
//!
//! Credential exchanges are single-flight per worker: the first request for a
//! credential key dispatches the call, later ones wait on it, and the answer
//! completes them all (switching the effective context to each waiter).

use mandate_core::config;
use mandate_core::decision::{DecisionIds, Effect, LocalReply};
use mandate_core::engine::{BodyPlan, Decision, Engine, MintPlan, Request, ToolsFilter, Verdict};
use mandate_core::headers::{serialize_pairs, Headers};
use mandate_core::identity::bundles::{FetchReport, SourceId};
use mandate_core::identity::jwks::MAX_BUNDLE_BYTES;
use mandate_core::mint::{MintError, MAX_FEED_BYTES, MAX_RESPONSE_BYTES};
use mandate_core::reason::Reason;
use mandate_core::record::{DecisionRecord, FILTER_STATE_KEY, LOG_PREFIX};
use host::{Action, BufferType, LogLevel, MapType, MetricType, Status, StreamType};
use sha2::{Digest, Sha256};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::time::Duration;

mod abi;
mod host;

fn log(level: LogLevel, message: &str) {
    // Logging must never take the filter down: ignore the status.
    let _ = host::log(level, message.as_bytes());
}

fn now_nanos() -> Option<u64> {
    host::now_nanos()
}

fn random_seed() -> u64 {
    let mut buf = [0u8; 8];
    if getrandom::getrandom(&mut buf).is_err() {
        // Ids stay unique per VM through the counter; only cross-VM uniqueness weakens.
        log(LogLevel::Warn, "mandate: no randomness for decision ids; using the clock");
        return now_nanos().unwrap_or(0);
    }
    u64::from_le_bytes(buf)
}

// ------------------------------------------------------------------ metrics

// ------------------------------------------------------------------ per-VM names

/// Shared-data key of the VM counter: each VM takes the next number once.
const VM_SEQ_KEY: &str = "mandate.vm_seq";

thread_local! {
    /// This VM's number, for the lifetime of the VM (the module's memory): a new root context
    /// after a configuration push keeps it.
    static VM_INDEX: Cell<Option<u32>> = const { Cell::new(None) };
}

/// This VM's number among the plugin's VMs: a counter in shared data (which every VM of the
/// plugin sees), incremented with compare-and-swap so no two VMs take the same number. Envoy
/// configures the main-thread VM before it starts the workers, so the counter's creation does
/// not race. Without shared data, a random number stands in.
fn vm_index() -> u32 {
    if let Some(i) = VM_INDEX.with(Cell::get) {
        return i;
    }
    let mut taken = None;
    for _ in 0..32 {
        let Ok((value, cas)) = host::shared_get(VM_SEQ_KEY) else { break };
        let current = value.and_then(|v| <[u8; 4]>::try_from(v.as_slice()).ok()).map_or(0, u32::from_le_bytes);
        let next = current.wrapping_add(1).to_le_bytes();
        match host::shared_set(VM_SEQ_KEY, &next, cas) {
            Ok(()) => {
                taken = Some(current);
                break;
            }
            Err(Status::CasMismatch) => continue,
            Err(_) => break,
        }
    }
    let index = taken.unwrap_or_else(|| {
        log(LogLevel::Warn, "mandate: no shared data for a VM number; per-VM metrics use a random one");
        (random_seed() >> 32) as u32
    });
    VM_INDEX.with(|c| c.set(Some(index)));
    index
}

/// Metrics defined lazily by name. Unlike the SDK wrappers these never panic:
/// a metric the host refuses is simply not recorded.
///
/// Per-request counters (decisions, cache hits) can be batched: counted here and handed to the
/// host once per flush, one call per counter, instead of several host calls per request.
#[derive(Default)]
struct Metrics {
    ids: HashMap<String, Option<u32>>,
    /// Hot-path counters by (effect, reason): no string building per request.
    decisions: HashMap<(u8, Reason), (Option<u32>, Option<u32>)>,
    /// Cache hit/miss counter ids by slot (see [`Metrics::hit`]), defined on first use.
    hits: [Option<Option<u32>>; 7],
    /// Counts waiting for the next flush, by metric id (a handful of distinct ids).
    pending: Vec<(u32, i64)>,
    /// `mandate.mcp.<method>.<allow|deny>` ids by (method, allowed).
    mcp: HashMap<(&'static str, bool), Option<u32>>,
    batched: bool,
}

const HIT_NAMES: [&str; 7] = [
    "mandate.cache.identity.hit",
    "mandate.cache.identity.miss",
    "mandate.cache.decision.hit",
    "mandate.cache.decision.miss",
    "mandate.cache.credential.hit",
    "mandate.cache.credential.miss",
    "mandate.degraded.legacy_static_secret",
];

/// Slots in [`HIT_NAMES`].
#[derive(Clone, Copy)]
enum Cache {
    Identity = 0,
    Decision = 2,
    Credential = 4,
}
const DEGRADED_SLOT: usize = 6;

fn increment(id: u32, n: i64) {
    let _ = host::increment_metric(id, n);
}

impl Metrics {
    fn decision(&mut self, effect: Effect, reason: Reason) {
        let (name, idx) = match effect {
            Effect::Allow => ("allow", 0u8),
            Effect::Deny => ("deny", 1),
            Effect::DryRunDeny => ("dry_run_deny", 2),
        };
        let ids = match self.decisions.get(&(idx, reason)) {
            Some(ids) => *ids,
            None => {
                let ids = (
                    self.id(MetricType::Counter, &format!("mandate.decisions.{name}")),
                    self.id(MetricType::Counter, &format!("mandate.decisions.{name}.{}", reason.code())),
                );
                self.decisions.insert((idx, reason), ids);
                ids
            }
        };
        for id in [ids.0, ids.1].into_iter().flatten() {
            self.count(id);
        }
    }

    /// One more MCP call of this method (a fixed name: see [`mcp_metric_method`]).
    fn mcp(&mut self, method: &'static str, allowed: bool) {
        let id = match self.mcp.get(&(method, allowed)) {
            Some(id) => *id,
            None => {
                let id = self.id(MetricType::Counter, &format!("mandate.mcp.{method}.{}", if allowed { "allow" } else { "deny" }));
                self.mcp.insert((method, allowed), id);
                id
            }
        };
        if let Some(id) = id {
            self.count(id);
        }
    }

    /// One more for a per-request counter: now, or at the next flush when batched.
    fn count(&mut self, id: u32) {
        if !self.batched {
            return increment(id, 1);
        }
        match self.pending.iter_mut().find(|(i, _)| *i == id) {
            Some((_, n)) => *n += 1,
            None => self.pending.push((id, 1)),
        }
    }

    fn flush(&mut self) {
        for (id, n) in self.pending.drain(..) {
            increment(id, n);
        }
    }

    fn slot(&mut self, slot: usize) {
        let id = match self.hits.get(slot).copied().flatten() {
            Some(id) => id,
            None => {
                let id = HIT_NAMES.get(slot).and_then(|name| self.id(MetricType::Counter, name));
                if let Some(s) = self.hits.get_mut(slot) {
                    *s = Some(id);
                }
                id
            }
        };
        if let Some(id) = id {
            self.count(id);
        }
    }

    fn hit(&mut self, cache: Cache, hit: bool) {
        self.slot(cache as usize + usize::from(!hit));
    }

    fn id(&mut self, kind: MetricType, name: &str) -> Option<u32> {
        if let Some(id) = self.ids.get(name) {
            return *id;
        }
        let id = host::define_metric(kind, name).ok();
        self.ids.insert(name.to_string(), id);
        id
    }

    /// Rare counters (minter, revocations, bundles) always go to the host at once.
    fn inc(&mut self, name: &str) {
        self.add(name, 1);
    }

    fn add(&mut self, name: &str, n: i64) {
        if let Some(id) = self.id(MetricType::Counter, name) {
            increment(id, n);
        }
    }

    fn record(&mut self, kind: MetricType, name: &str, value: u64) {
        if let Some(id) = self.id(kind, name) {
            let _ = host::record_metric(id, value);
        }
    }
}

/// Buffered record lines are handed over before they reach this size.
const LINES_LIMIT: usize = 32 * 1024;

/// The request headers in one host call, indexed in place (see [`Headers::from_map`]).
fn request_headers() -> Option<Headers> {
    match host::header_pairs(MapType::HttpRequestHeaders) {
        Ok(Some(buf)) if !buf.is_empty() => Headers::from_map(buf).ok(),
        Ok(_) => Some(Headers::default()),
        Err(_) => None,
    }
}

/// The buffered request body (at most `max` bytes) in one host call; `None` on a host error.
/// Unlike the SDK wrapper, a bad status is a per-request denial, never a panic.
fn request_body(size: usize, max: usize) -> Option<Vec<u8>> {
    buffer(BufferType::HttpRequestBody, size, max)
}

/// A buffer's bytes (at most `max`) by the raw host call; `None` on a host error.
fn buffer(kind: BufferType, size: usize, max: usize) -> Option<Vec<u8>> {
    if size == 0 {
        return Some(Vec::new());
    }
    host::buffer(kind, 0, size.min(max.saturating_add(1))).ok().map(Option::unwrap_or_default)
}

/// A response header's value by the raw host call (`None`: absent or a host error).
fn response_header(name: &str) -> Option<Vec<u8>> {
    header_value(MapType::HttpResponseHeaders, name)
}

/// A header's value in a map by the raw host call (`None`: absent or a host error).
fn header_value(map: MapType, name: &str) -> Option<Vec<u8>> {
    host::header_value(map, name).ok().flatten()
}

/// Sets (`Some`) or removes a response header; false on a host error.
fn set_response_header(name: &str, value: Option<&[u8]>) -> bool {
    set_header(MapType::HttpResponseHeaders, name, value)
}

/// Sets (`Some`, replacing) or removes a header: a bad status (e.g. the map is gone) is a
/// `false`.
fn set_header(map: MapType, name: &str, value: Option<&[u8]>) -> bool {
    host::set_header(map, name, value).is_ok()
}

/// Dispatches an HTTP callout; its answer comes to the context running now (see
/// [`abi::register_callout`]). Any refusal is an `Err` (Envoy: BadArgument for an unknown
/// cluster), never a panic.
fn http_call(cluster: &str, headers: &[(&str, &str)], body: &[u8], timeout: Duration) -> Result<u32, Status> {
    let timeout_ms = u32::try_from(timeout.as_millis()).unwrap_or(u32::MAX);
    let token = host::http_call(cluster, &serialize_pairs(headers), body, timeout_ms)?;
    abi::register_callout(token);
    Ok(token)
}

/// Resumes the current request; false when the host refuses.
fn resume_request() -> bool {
    host::continue_stream(StreamType::HttpRequest).is_ok()
}

/// Switches the effective context; false when the host refuses (e.g. that stream is gone).
fn set_effective_context(id: u32) -> bool {
    host::set_effective_context(id).is_ok()
}

/// Replaces the whole buffered response body; false on a host error.
fn replace_response_body(size: usize, body: &[u8]) -> bool {
    host::set_buffer(BufferType::HttpResponseBody, 0, size, body).is_ok()
}

/// Metric name part of an MCP method: known methods only (a caller cannot create metrics).
fn mcp_metric_method(method: Option<&str>) -> &'static str {
    const KNOWN: [(&str, &str); 14] = [
        ("initialize", "initialize"),
        ("ping", "ping"),
        ("tools/list", "tools_list"),
        ("tools/call", "tools_call"),
        ("resources/list", "resources_list"),
        ("resources/read", "resources_read"),
        ("resources/templates/list", "resources_templates_list"),
        ("resources/subscribe", "resources_subscribe"),
        ("resources/unsubscribe", "resources_unsubscribe"),
        ("prompts/list", "prompts_list"),
        ("prompts/get", "prompts_get"),
        ("completion/complete", "completion_complete"),
        ("logging/setLevel", "logging_setLevel"),
        ("elicitation/create", "elicitation_create"),
    ];
    match method {
        None => "unknown",
        Some(m) if m.starts_with("notifications/") => "notifications",
        Some(m) => KNOWN.iter().find(|(k, _)| *k == m).map_or("other", |(_, v)| v),
    }
}

/// Writes record lines to the proxy's log (bytes: no UTF-8 re-check, no copy).
fn log_record_line(line: &[u8]) {
    let _ = host::log(LogLevel::Info, line);
}

/// Sets the record as filter state (Envoy: `wasm.mandate.decision`, for access logs); false
/// when the host refuses.
fn set_record_state(json: &[u8]) -> bool {
    host::set_property(FILTER_STATE_KEY.as_bytes(), json).is_ok()
}

// ------------------------------------------------------------------ shared state

/// A request paused on a credential exchange.
struct Pending {
    plan: Box<MintPlan>,
    decision: Decision,
    started_ns: u64,
    /// MCP body path: once the credential is in, the headers go on and the body is judged.
    body: Option<Box<BodyPlan>>,
}

/// MCP body path: a request whose headers went on and whose body is being buffered and will
/// be judged at its end. Its decision record is written then (or when the stream ends first).
struct BodyWait {
    plan: Box<BodyPlan>,
    decision: Decision,
    started_ns: u64,
}

/// One in-flight exchange and the requests waiting on it.
struct Flight {
    leader: u32,
    waiters: Vec<u32>,
    dispatched_ns: u64,
}

/// Per-VM state shared by the root and every HTTP context.
struct Shared {
    engine: Option<Engine>,
    metrics: Metrics,
    policy_hash: String,
    flights: HashMap<[u8; 16], Flight>,
    pending: HashMap<u32, Pending>,
    /// The record line, reused: `LOG_PREFIX` then the JSON.
    line: Vec<u8>,
    /// Record lines waiting for the next flush (batched mode), newline-separated.
    lines: Vec<u8>,
    /// Per-VM metric names (`…vm<N>`), set at the first configuration with a minter:
    /// the revocation lag gauge and the count of `revocations_stale` refusals.
    lag_gauge: Option<String>,
    stale_counter: Option<String>,
    /// This VM's linear memory gauge (`mandate.memory.linear_bytes.vm<N>`) and the last value
    /// handed to the host (recorded on configuration and on ticks when it changed).
    memory_gauge: Option<String>,
    memory_recorded: u64,
    /// Streams whose `tools/list` answer must be narrowed (by context id).
    tool_filters: HashMap<u32, ToolsFilter>,
    /// MCP streams whose body is pending (by context id).
    bodies: HashMap<u32, BodyWait>,
}

type SharedRef = Rc<RefCell<Shared>>;

/// Every request that reaches the filter gets exactly one decision record: one log line (or
/// one line of a batched log call), and for a stream that can still be addressed the same
/// record as its filter state, under the decision id its reply carries. The shell's paths
/// end in [`Shared::conclude`] (the stream is answered or goes on), in [`Shared::record`] with
/// `set_filter_state: false` (the stream is gone or the host will not switch to it), or in
/// [`fail_closed`] (nothing to decide with).
impl Shared {
    /// Renders the record of `d` into `self.line` (`LOG_PREFIX` then the JSON).
    fn render(&mut self, d: &Decision, started_ns: u64) {
        let now = now_nanos().unwrap_or(started_ns);
        let env = self.engine.as_ref().and_then(Engine::environment);
        let rec = DecisionRecord::new(d, env, &self.policy_hash, now / 1_000_000, now.saturating_sub(started_ns) / 1000);
        self.line.clear();
        self.line.extend_from_slice(LOG_PREFIX.as_bytes());
        rec.write_json(&mut self.line);
    }

    /// The rendered record's JSON.
    fn json(&self) -> &[u8] {
        self.line.get(LOG_PREFIX.len()..).unwrap_or_default()
    }

    /// Whether records go to the log and to filter state.
    fn outputs(&self) -> (bool, bool) {
        self.engine.as_ref().map_or((true, true), |e| (e.config().records.log, e.config().records.filter_state))
    }

    /// Records a decision: metrics, the log line, and (for the current stream) filter state.
    fn record(&mut self, d: &Decision, started_ns: u64, set_filter_state: bool) {
        self.render(d, started_ns);
        self.emit(d, set_filter_state, set_filter_state);
    }

    /// Ends the current (addressable) stream's decision and records it once. A request that
    /// goes on (`Continue`) first gets its record attached as filter state and, with `resume`,
    /// is resumed; if the host refuses either, it is denied instead (`internal_error`, same
    /// decision id) and that denial is the record.
    fn conclude(&mut self, d: &mut Decision, started_ns: u64, action: Action, resume: bool) -> Action {
        self.render(d, started_ns);
        if action == Action::Continue {
            let (_, to_state) = self.outputs();
            let attached = !to_state || set_record_state(self.json());
            if attached && (!resume || resume_request()) {
                self.emit(d, true, false);
                return Action::Continue;
            }
            log(LogLevel::Warn, "mandate: the proxy refused to attach the decision or resume the request; denied");
            let action = deny(self.engine.as_ref(), d, Reason::InternalError);
            self.render(d, started_ns);
            self.emit(d, true, true);
            return action;
        }
        self.emit(d, true, true);
        action
    }

    /// Counts and writes the rendered record. `addressable`: the stream can still be reached
    /// (otherwise the log line is written even when records go to filter state only);
    /// `set_state`: attach it as the stream's filter state now.
    fn emit(&mut self, d: &Decision, addressable: bool, set_state: bool) {
        let (to_log, to_state) = self.outputs();
        self.metrics.decision(d.effect(), d.reason());
        if let Some(m) = d.mcp.as_deref() {
            self.metrics.mcp(mcp_metric_method(m.method.as_deref()), d.effect() == Effect::Allow);
        }
        if d.reason == Some(Reason::RevocationsStale) {
            if let Some(name) = self.stale_counter.as_deref() {
                self.metrics.inc(name);
            }
        }
        if d.identity_checked {
            self.metrics.hit(Cache::Identity, d.identity_cache_hit);
        }
        if d.policy.is_some() {
            self.metrics.hit(Cache::Decision, d.decision_cache_hit);
        }
        if d.credential.is_some() {
            self.metrics.hit(Cache::Credential, d.credential_cache_hit);
        }
        if d.degraded.is_some() {
            self.metrics.slot(DEGRADED_SLOT);
        }
        // A stream without filter state (its client left) still gets its log line.
        if to_log || !addressable {
            if self.metrics.batched {
                self.lines.extend_from_slice(&self.line);
                self.lines.push(b'\n');
                if self.lines.len() >= LINES_LIMIT {
                    self.flush_lines();
                }
            } else {
                log_record_line(&self.line);
            }
        }
        if addressable && set_state && to_state {
            let _ = set_record_state(self.json());
        }
    }
}

impl Shared {
    /// A forwarded `tools/list` whose answer must be narrowed for its caller.
    fn note_filter(&mut self, ctx: u32, d: &Decision) {
        if let Some(f) = self.engine.as_ref().and_then(|e| e.tools_filter(d)) {
            self.tool_filters.insert(ctx, f);
        }
    }

    /// Hands buffered record lines and counts to the host: one log call, one call per counter.
    fn flush(&mut self) {
        self.flush_lines();
        self.metrics.flush();
    }

    fn flush_lines(&mut self) {
        if self.lines.last() == Some(&b'\n') {
            self.lines.pop();
        }
        if !self.lines.is_empty() {
            log_record_line(&self.lines);
        }
        self.lines.clear();
    }
}

// ------------------------------------------------------------------ verdicts

/// Applies a verdict to the current stream. A header edit the host refuses turns it into a
/// denial of the same decision (`internal_error`): the caller records `d` once, either way.
fn apply(engine: &Engine, verdict: &Verdict, d: &mut Decision) -> Action {
    match verdict {
        Verdict::Forward(edits) => {
            let removed = edits.remove.iter().all(|name| set_header(MapType::HttpRequestHeaders, name, None));
            let set = removed && edits.set.iter().all(|(name, value)| set_header(MapType::HttpRequestHeaders, name, Some(value)));
            if set {
                return Action::Continue;
            }
            log(LogLevel::Warn, "mandate: the proxy refused a request header edit; denied");
            deny(Some(engine), d, Reason::InternalError)
        }
        Verdict::Reply(reply) => {
            send_reply(reply);
            Action::Pause
        }
        // Never reached: mint and body verdicts are resolved before they are applied.
        Verdict::Mint(_) | Verdict::NeedBody(_) => deny(Some(engine), d, Reason::InternalError),
    }
}

/// Turns `d` into a denial for `reason` and answers the current stream with it (the engine's
/// reply: JSON-RPC for an MCP call).
fn deny(engine: Option<&Engine>, d: &mut Decision, reason: Reason) -> Action {
    match engine.map(|e| e.refuse_body(d, reason)) {
        Some(Verdict::Reply(reply)) => send_reply(&reply),
        _ => {
            d.effect = Some(Effect::Deny);
            d.reason = Some(reason);
            send_reply(&LocalReply::deny(reason, &d.id, "x-mandate-decision-id"));
        }
    }
    Action::Pause
}

/// A stream that cannot be answered (the host will not switch to it) does not go on: if its
/// decision would have let it, it is on the record as refused (`internal_error`).
fn unreachable_refused(d: &mut Decision) {
    if d.effect() != Effect::Deny {
        d.effect = Some(Effect::Deny);
        d.reason = Some(Reason::InternalError);
    }
}

/// Denies when the filter itself cannot decide (host failure, no context, not configured).
/// The request still gets its one decision record: in the log and as filter state, under the
/// id its reply carries.
fn fail_closed(reason: Reason) -> Action {
    let d = Decision {
        id: DecisionIds::new(random_seed()).next_id(),
        effect: Some(Effect::Deny),
        reason: Some(reason),
        ..Decision::default()
    };
    let now_ms = now_nanos().unwrap_or(0) / 1_000_000;
    let json = DecisionRecord::new(&d, None, "", now_ms, 0).to_json();
    log(LogLevel::Info, &format!("{LOG_PREFIX}{json}"));
    let _ = set_record_state(json.as_bytes());
    send_reply(&LocalReply::deny(reason, &d.id, "x-mandate-decision-id"));
    Action::Pause
}

/// Sends a local reply. A refusal is logged and leaves the stream paused (denied: nothing
/// goes upstream).
fn send_reply(reply: &LocalReply) {
    let headers = serialize_pairs(&reply.headers);
    if let Err(status) = host::send_local_response(u32::from(reply.status), b"mandate_denied", reply.body.as_bytes(), &headers) {
        log(LogLevel::Error, &format!("mandate: local reply failed: {status:?}"));
    }
}

/// Reads a callout answer. Envoy delivers a reset as no headers (`Err`); a timeout or an
/// unreachable cluster arrives as a 504/503 answer from Envoy itself.
fn callout_answer(num_headers: usize, body_size: usize, limit: usize) -> Result<(u16, Vec<u8>), MintError> {
    if num_headers == 0 {
        return Err(MintError::NoResponse);
    }
    // Raw host calls: a bad status is a failed exchange, never a panic.
    let status = header_value(MapType::HttpCallResponseHeaders, ":status")
        .and_then(|s| std::str::from_utf8(&s).ok().and_then(|s| s.parse::<u16>().ok()))
        .ok_or(MintError::Malformed("no :status"))?;
    if body_size > limit {
        return Err(MintError::TooLarge);
    }
    let body = buffer(BufferType::HttpCallResponseBody, body_size, body_size).ok_or(MintError::Malformed("unreadable body"))?;
    Ok((status, body))
}

// ------------------------------------------------------------------ root

enum RootCall {
    Bundle(SourceId),
    Revocations,
}

struct Root {
    shared: SharedRef,
    seed: u64,
    calls: HashMap<u32, RootCall>,
}

impl Root {
    fn new() -> Root {
        let shared = Shared {
            engine: None,
            metrics: Metrics::default(),
            policy_hash: String::new(),
            flights: HashMap::new(),
            pending: HashMap::new(),
            line: Vec::with_capacity(2048),
            lines: Vec::new(),
            lag_gauge: None,
            stale_counter: None,
            memory_gauge: None,
            memory_recorded: 0,
            tool_filters: HashMap::new(),
            bodies: HashMap::new(),
        };
        Root { shared: Rc::new(RefCell::new(shared)), seed: random_seed(), calls: HashMap::new() }
    }

    /// Dispatches due bundle fetches and the revocation poll.
    fn background(&mut self) {
        let Some(now_ns) = now_nanos() else { return };
        let now = now_ns / 1_000_000_000;
        let Ok(mut shared) = self.shared.try_borrow_mut() else { return };
        let shared = &mut *shared;
        let Some(engine) = shared.engine.as_mut() else { return };
        for plan in engine.identity.bundles.due_fetches(now) {
            let headers = vec![(":method", "GET"), (":path", plan.path.as_str()), (":authority", plan.authority.as_str()), ("accept", "application/json")];
            match http_call(&plan.cluster, &headers, &[], Duration::from_millis(plan.timeout_ms)) {
                Ok(token) => {
                    self.calls.insert(token, RootCall::Bundle(plan.source));
                }
                Err(status) => {
                    let error = format!("cannot call cluster `{}`: {status:?}", plan.cluster);
                    if let Some(report) = engine.identity.bundles.on_fetch(plan.source, Err(error), now) {
                        log_fetch(&report, &mut shared.metrics);
                    }
                }
            }
        }
        poll_revocations(engine, &mut shared.metrics, &mut self.calls, now_ns);
        // Every tick, whatever the poll's outcome: a feed that cannot even be dispatched shows.
        record_lag(engine, &mut shared.metrics, shared.lag_gauge.as_deref(), now);
    }
}

/// Dispatches the revocation poll if one is due (a VM that serves no requests never polls).
fn poll_revocations(engine: &mut Engine, metrics: &mut Metrics, calls: &mut HashMap<u32, RootCall>, now_ns: u64) {
    let now_ms = now_ns / 1_000_000;
    let Some(poll) = engine.due_poll(now_ms) else { return };
    let headers = vec![(":method", "GET"), (":path", poll.path.as_str()), (":authority", poll.authority.as_str()), ("accept", "application/json")];
    match http_call(&poll.cluster, &headers, &[], Duration::from_millis(poll.timeout_ms)) {
        Ok(token) => {
            calls.insert(token, RootCall::Revocations);
        }
        Err(status) => {
            let _ = engine.on_revocations(Err(MintError::Dispatch(format!("{status:?}"))), now_ms);
            metrics.inc("mandate.revocations.poll_failures");
            log(LogLevel::Warn, &format!("mandate: cannot call minter cluster `{}` for revocations: {status:?}", poll.cluster));
        }
    }
}

/// Size of this VM's linear memory in bytes (wasm pages of 64 KiB). It only grows: a value
/// that keeps rising under steady traffic is a leak or an unbounded cache.
fn linear_memory_bytes() -> u64 {
    (core::arch::wasm32::memory_size::<0>() as u64).saturating_mul(65_536)
}

impl Shared {
    /// This VM's linear memory gauge, when it changed since the last record (one host call).
    fn record_memory(&mut self) {
        let bytes = linear_memory_bytes();
        if bytes == self.memory_recorded {
            return;
        }
        if let Some(name) = self.memory_gauge.as_deref() {
            if let Some(id) = self.metrics.id(MetricType::Gauge, name) {
                if host::record_metric(id, bytes).is_ok() {
                    self.memory_recorded = bytes;
                }
            }
        }
    }
}

/// This VM's revocation lag gauge (seconds since the feed was last heard from).
fn record_lag(engine: &Engine, metrics: &mut Metrics, gauge: Option<&str>, now_s: u64) {
    if let (Some(name), Some(_)) = (gauge, engine.config().minter.as_ref()) {
        metrics.record(MetricType::Gauge, name, engine.feed_lag_s(now_s));
    }
}

fn log_fetch(report: &FetchReport, metrics: &mut Metrics) {
    match report {
        FetchReport::Updated { label, keys, skipped } => {
            metrics.inc("mandate.bundles.refresh_ok");
            let skipped = if skipped.is_empty() { String::new() } else { format!(", skipped unusable keys {skipped:?}") };
            log(LogLevel::Info, &format!("mandate: bundle for `{label}` updated: {keys} key(s){skipped}"));
        }
        FetchReport::Unchanged { .. } => metrics.inc("mandate.bundles.refresh_ok"),
        FetchReport::Failed { label, error, kept_previous } => {
            metrics.inc("mandate.bundles.refresh_failed");
            let consequence = if *kept_previous { "keeping the last good bundle" } else { "no usable bundle (none yet, or older than max_bundle_age_s): its tokens are refused" };
            log(LogLevel::Warn, &format!("mandate: bundle fetch for `{label}` failed ({error}); {consequence}"));
        }
    }
}

impl Root {
    fn on_done(&mut self) -> bool {
        // The plugin is stopping: nothing buffered may be lost, and no tick will come for
        // records of streams that finish later, so those go out at once.
        if let Ok(mut shared) = self.shared.try_borrow_mut() {
            shared.flush();
            shared.metrics.batched = false;
        }
        true
    }

    fn on_http_call_response(&mut self, token_id: u32, num_headers: usize, body_size: usize, _num_trailers: usize) {
        let Some(call) = self.calls.remove(&token_id) else { return };
        let Some(now_ns) = now_nanos() else { return };
        let now = now_ns / 1_000_000_000;
        let Ok(mut shared) = self.shared.try_borrow_mut() else { return };
        let shared = &mut *shared;
        let Some(engine) = shared.engine.as_mut() else { return };
        match call {
            RootCall::Bundle(source) => {
                let answer = callout_answer(num_headers, body_size, MAX_BUNDLE_BYTES);
                let result = match &answer {
                    Ok((200, body)) => Ok(body.as_slice()),
                    Ok((status, _)) => Err(format!("HTTP status {status}")),
                    Err(e) => Err(e.to_string()),
                };
                if let Some(report) = engine.identity.bundles.on_fetch(source, result, now) {
                    log_fetch(&report, &mut shared.metrics);
                }
            }
            RootCall::Revocations => {
                // Never more than the callout limit is read; the plugin asks for pages below it.
                let answer = callout_answer(num_headers, body_size, MAX_FEED_BYTES);
                let metrics = &mut shared.metrics;
                match engine.on_revocations(answer.as_ref().map(|(s, b)| (*s, b.as_slice())).map_err(Clone::clone), now_ns / 1_000_000) {
                    Ok(r) => {
                        metrics.inc("mandate.revocations.polls");
                        if r.reset {
                            metrics.inc("mandate.revocations.resets");
                            log(LogLevel::Info, &format!("mandate: revocation feed epoch changed; resuming at cursor {} (known revocations kept)", r.cursor));
                        }
                        if r.received > 0 {
                            metrics.add("mandate.revocations.received", i64::try_from(r.received).unwrap_or(i64::MAX));
                            log(LogLevel::Info, &format!("mandate: {} revocation(s) applied; cursor {}", r.received, r.cursor));
                        }
                        if r.skipped > 0 {
                            metrics.add("mandate.revocations.skipped", i64::try_from(r.skipped).unwrap_or(i64::MAX));
                            log(LogLevel::Warn, &format!("mandate: {} revocation(s) of unknown kinds skipped; cursor {}", r.skipped, r.cursor));
                        }
                    }
                    Err(e) => {
                        metrics.inc("mandate.revocations.poll_failures");
                        log(LogLevel::Warn, &format!("mandate: revocation poll failed: {e} ({} in a row)", engine.feed.failures));
                    }
                }
                // `more`: the next page at once (otherwise not due yet, and nothing goes out).
                poll_revocations(engine, metrics, &mut self.calls, now_ns);
                record_lag(engine, metrics, shared.lag_gauge.as_deref(), now);
            }
        }
    }
}

impl Root {
    fn on_vm_start(&mut self, _vm_configuration_size: usize) -> bool {
        true
    }

    fn on_configure(&mut self, plugin_configuration_size: usize) -> bool {
        // A configuration the host announced but will not hand over is an error, never the
        // (empty) default configuration.
        let read = host::buffer(BufferType::PluginConfiguration, 0, plugin_configuration_size)
            .and_then(|b| b.or_else(|| (plugin_configuration_size == 0).then(Vec::new)).ok_or(Status::NotFound));
        let raw = match read {
            Ok(bytes) => bytes,
            Err(status) => {
                log(LogLevel::Error, &format!("cannot read plugin configuration: {status:?}"));
                return false;
            }
        };
        let config = match config::parse(&raw) {
            Ok(c) => c,
            Err(e) => {
                log(LogLevel::Error, &e.to_string());
                return false;
            }
        };
        let host_env = config
            .policy
            .as_ref()
            .and_then(|p| p.environment_from_node_metadata.as_deref())
            .and_then(|key| host::property(&["node", "metadata", key]).ok().flatten())
            .and_then(|v| String::from_utf8(v).ok());
        self.seed = self.seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let background = config.identity.trust_domains.iter().any(|t| t.bundle.cluster.is_some())
            || config.identity.oidc_issuers.iter().any(|o| o.jwks.cluster.is_some());
        // Tick several times per poll interval so a poll is never a whole tick late.
        let tick_ms = config.minter.as_ref().map(|m| (m.revocations.interval_ms / 4).clamp(50, 1000));
        let minter = config.minter.is_some();
        // Batched records and counters are flushed on the tick.
        let flush_ms = config.records.flush_ms;
        let tick_ms = match (tick_ms, flush_ms) {
            (t, 0) => t,
            (Some(t), f) => Some(t.min(f)),
            (None, f) => Some(f),
        };
        let now_s = now_nanos().unwrap_or(0) / 1_000_000_000;
        let mut engine = match Engine::new(config, self.seed, host_env) {
            Ok(engine) => engine,
            Err(e) => {
                log(LogLevel::Error, &e.to_string());
                return false;
            }
        };
        // Signature arithmetic by the proxy's own crypto when it proves itself; else pure Rust.
        let host_verify = |args: &[u8]| host::call_foreign_function("verify_signature", args).ok().flatten();
        if mandate_core::identity::host_crypto::self_test(&host_verify) {
            engine.identity.set_host_verify(Some(Rc::new(host_verify)));
            log(LogLevel::Info, "mandate: ES256/RS* signatures checked by the host's crypto (self-test passed)");
        } else {
            log(LogLevel::Info, "mandate: signatures checked in the filter (host crypto unavailable)");
        }
        let digest: [u8; 32] = Sha256::digest(&raw).into();
        {
            let Ok(mut shared) = self.shared.try_borrow_mut() else {
                log(LogLevel::Error, "configuration update while a request is in flight");
                return false;
            };
            let shared = &mut *shared;
            // What the previous configuration buffered goes out under it.
            shared.flush();
            shared.metrics.batched = flush_ms > 0;
            // The revocation feed's knowledge survives the push: no replay, nothing forgotten.
            if let Some(old) = shared.engine.take() {
                engine.take_feed_from(old);
            }
            if minter && shared.lag_gauge.is_none() {
                let vm = vm_index();
                shared.lag_gauge = Some(format!("mandate.revocations.lag_s.vm{vm}"));
                shared.stale_counter = Some(format!("mandate.revocations.stale.vm{vm}"));
            }
            // The lag gauge exists from configuration on (0 until this VM serves requests).
            record_lag(&engine, &mut shared.metrics, shared.lag_gauge.as_deref(), now_s);
            if shared.memory_gauge.is_none() {
                shared.memory_gauge = Some(format!("mandate.memory.linear_bytes.vm{}", vm_index()));
            }
            shared.record_memory();
            shared.engine = Some(engine);
            shared.policy_hash = digest.iter().take(6).map(|b| format!("{b:02x}")).collect();
        }
        self.calls.clear();
        if background || tick_ms.is_some() {
            // Ticks drive bundle refresh, revocation polls and flushes; the first round goes out now.
            let period = Duration::from_millis(tick_ms.unwrap_or(1000).min(1000));
            if host::set_tick_period_ms(u32::try_from(period.as_millis()).unwrap_or(1000)).is_err() {
                log(LogLevel::Warn, "cannot set tick period; bundles and revocations will not refresh, records are not batched");
                if let Ok(mut shared) = self.shared.try_borrow_mut() {
                    shared.metrics.batched = false;
                }
            }
            self.background();
        }
        log(LogLevel::Info, &format!("mandate {}: configured", mandate_core::VERSION));
        true
    }

    fn on_tick(&mut self) {
        if let Ok(mut shared) = self.shared.try_borrow_mut() {
            shared.flush();
            shared.record_memory();
        }
        self.background();
    }

    fn create_http_context(&self, context_id: u32) -> Http {
        Http { id: context_id, shared: self.shared.clone(), started_ns: 0, body_pending: false, filtering: None, refusal_written: false, sse: false, response_body_seen: 0 }
    }
}

// ------------------------------------------------------------------ http

struct Http {
    id: u32,
    shared: SharedRef,
    started_ns: u64,
    /// MCP: the header phase let the headers go on (or is minting first) and the body is
    /// still to be judged (its state: `Shared::bodies`, or `Shared::pending` while minting).
    body_pending: bool,
    /// MCP: this stream's `tools/list` answer is being narrowed (`Some(false)`: it cannot be,
    /// and is replaced by an error).
    filtering: Option<bool>,
    /// The refusal's error body is in place.
    refusal_written: bool,
    /// Bytes of the answer held so far while narrowing (for trailers that end it).
    response_body_seen: usize,
    /// The answer being narrowed is an event stream.
    sse: bool,
}

impl Http {
    /// The answer to this stream's exchange. `addressable`: the host switched to this stream
    /// (when it refused, the stream cannot be answered, only recorded).
    fn on_http_call_response(&mut self, _token_id: u32, num_headers: usize, body_size: usize, _num_trailers: usize, addressable: bool) {
        let answer = callout_answer(num_headers, body_size, MAX_RESPONSE_BYTES);
        self.complete_flight(answer, addressable);
    }
}

impl Http {
    /// A `tools/list` answer that cannot be narrowed safely: a JSON-RPC error instead. Refused
    /// from its headers (a content type that cannot be narrowed): 502. Refused from its body,
    /// the headers are already on their way (a proxy delivers a response body to a filter only
    /// after it let the headers go on): the body is replaced by the error (an event for an event
    /// stream), never passed unfiltered.
    fn refuse_tools_list(&mut self, body_size: usize, in_headers: bool) {
        let Ok(mut shared) = self.shared.try_borrow_mut() else { return };
        let id = shared.tool_filters.get(&self.id).map(|f| f.decision_id.clone()).unwrap_or_default();
        shared.metrics.inc("mandate.mcp.tools_list.unfilterable");
        drop(shared);
        log(LogLevel::Warn, "mandate: a tools/list answer could not be filtered for its caller; refused");
        let mut body = mandate_core::mcp::unfilterable_body(&id);
        if in_headers {
            let _ = set_response_header(":status", Some(b"502"));
            let _ = set_response_header("content-type", Some(b"application/json"));
            self.sse = false;
        } else if self.sse {
            body = format!("event: message\ndata: {body}\n\n");
        }
        self.refusal_written = replace_response_body(body_size, body.as_bytes());
    }

    /// Applies a verdict: forwards, answers, or dispatches (or joins) the credential exchange.
    /// Records the decision unless the request now waits on an exchange.
    /// `body`: the MCP body path; once the headers go on, the body is awaited and the record
    /// waits for its judgement.
    fn run(&mut self, shared: &mut Shared, verdict: Verdict, decision: Decision, now: u64, body: Option<Box<BodyPlan>>) -> Action {
        let Some(engine) = shared.engine.as_mut() else { return fail_closed(Reason::NotConfigured) };
        match verdict {
            Verdict::Mint(plan) => {
                let key = plan.key;
                if let Some(flight) = shared.flights.get_mut(&key) {
                    // Single flight: wait on the exchange already under way.
                    flight.waiters.push(self.id);
                    shared.pending.insert(self.id, Pending { plan, decision, started_ns: self.started_ns, body });
                    return Action::Pause;
                }
                let form = plan.body();
                let headers = [
                    (":method", "POST"),
                    (":path", plan.path.as_str()),
                    (":authority", plan.authority.as_str()),
                    ("content-type", "application/x-www-form-urlencoded"),
                    ("accept", "application/json"),
                ];
                match http_call(&plan.cluster, &headers, &form, Duration::from_millis(plan.timeout_ms)) {
                    Ok(_) => {
                        shared.flights.insert(key, Flight { leader: self.id, waiters: Vec::new(), dispatched_ns: self.started_ns });
                        shared.pending.insert(self.id, Pending { plan, decision, started_ns: self.started_ns, body });
                        Action::Pause
                    }
                    Err(status) => {
                        // Unknown cluster or no capacity: fail closed, never pass the request through.
                        let mut d = decision;
                        let (verdict, _) = engine.finish_mint(&plan, Err(MintError::Dispatch(format!("{status:?}"))), now, &mut d);
                        shared.metrics.inc("mandate.minter.failures");
                        log(LogLevel::Warn, &format!("mandate: cannot call minter cluster `{}`: {status:?}", plan.cluster));
                        let action = apply(engine, &verdict, &mut d);
                        shared.conclude(&mut d, self.started_ns, action, false)
                    }
                }
            }
            verdict => {
                let mut decision = decision;
                let action = apply(engine, &verdict, &mut decision);
                if action == Action::Continue {
                    if let Some(plan) = body {
                        // The headers go on; the body is judged at its end (and recorded then).
                        shared.bodies.insert(self.id, BodyWait { plan, decision, started_ns: self.started_ns });
                        return action;
                    }
                }
                let action = shared.conclude(&mut decision, self.started_ns, action, false);
                if action == Action::Continue {
                    shared.note_filter(self.id, &decision);
                }
                action
            }
        }
    }

    /// Completes this context's exchange for itself and every waiter on it: each gets its
    /// one record. `addressable`: the host switched to this (the leader's) stream.
    fn complete_flight(&mut self, answer: Result<(u16, Vec<u8>), MintError>, addressable: bool) {
        let now_ns = now_nanos().unwrap_or(0);
        let Ok(mut shared) = self.shared.try_borrow_mut() else { return };
        let shared = &mut *shared;
        let Some(key) = shared.pending.get(&self.id).map(|p| p.plan.key) else { return };
        let Some(flight) = shared.flights.remove(&key) else { return };
        shared.metrics.inc("mandate.minter.calls");
        shared.metrics.record(MetricType::Histogram, "mandate.minter.latency_ms", now_ns.saturating_sub(flight.dispatched_ns) / 1_000_000);
        let mut reported = false;
        for member in std::iter::once(flight.leader).chain(flight.waiters) {
            let Some(mut p) = shared.pending.remove(&member) else { continue };
            let addressable = if member == self.id { addressable } else { set_effective_context(member) };
            let Some(engine) = shared.engine.as_mut() else {
                p.decision.effect = Some(Effect::Deny);
                p.decision.reason = Some(Reason::NotConfigured);
                shared.record(&p.decision, p.started_ns, false);
                continue;
            };
            let (verdict, failure) = engine.finish_mint(&p.plan, answer.as_ref().map(|(s, b)| (*s, b.as_slice())).map_err(Clone::clone), now_ns / 1_000_000_000, &mut p.decision);
            // Every member shares the answer: count and log its failure once. The minter's
            // error body stays here; it never reaches the caller.
            if let (Some(e), false) = (failure, reported) {
                reported = true;
                if let MintError::Refused(reason) = e {
                    // A refusal the caller hears (403), not an outage.
                    shared.metrics.inc("mandate.minter.refusals");
                    log(LogLevel::Info, &format!("mandate: the minter refused the exchange: {}", reason.code()));
                } else {
                    shared.metrics.inc("mandate.minter.failures");
                    log(LogLevel::Warn, &format!("mandate: credential exchange failed: {e}"));
                }
            }
            if !addressable {
                // The host will not let this stream be answered (gone, or refused): it cannot
                // go on; it is on the record (log only).
                unreachable_refused(&mut p.decision);
                shared.record(&p.decision, p.started_ns, false);
                continue;
            }
            let action = apply(engine, &verdict, &mut p.decision);
            if action == Action::Continue {
                if let Some(plan) = p.body {
                    if resume_request() {
                        // The headers went on with the credential; the body is judged at its end.
                        shared.bodies.insert(member, BodyWait { plan, decision: p.decision, started_ns: p.started_ns });
                        continue;
                    }
                    let action = deny(Some(engine), &mut p.decision, Reason::InternalError);
                    shared.conclude(&mut p.decision, p.started_ns, action, false);
                    continue;
                }
            }
            if shared.conclude(&mut p.decision, p.started_ns, action, true) == Action::Continue {
                shared.note_filter(member, &p.decision);
            }
        }
        let _ = set_effective_context(self.id);
    }
}

impl Http {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        self.started_ns = now_nanos().unwrap_or(0);
        let Some(headers) = request_headers() else { return fail_closed(Reason::InternalError) };
        let now = self.started_ns / 1_000_000_000;
        if now == 0 {
            return fail_closed(Reason::InternalError);
        }
        let shared_ref = self.shared.clone();
        let Ok(mut shared) = shared_ref.try_borrow_mut() else { return fail_closed(Reason::InternalError) };
        let shared = &mut *shared;
        let Some(engine) = shared.engine.as_mut() else { return fail_closed(Reason::NotConfigured) };

        // identity → MCP call → intent → policy → (credential) → inject → record
        let outcome = engine.on_request(&Request { headers: &headers, now });
        match outcome.verdict {
            Verdict::NeedBody(plan) if end_of_stream => {
                // No body will come: judge the empty one (a malformed call), nothing minted.
                let mut d = outcome.decision;
                let verdict = engine.on_request_body(&plan, &[], now, &mut d);
                self.run(shared, verdict, d, now, None)
            }
            Verdict::NeedBody(mut plan) => {
                // The headers go on (after the credential, if one is minted): a proxy holds the
                // body back from a filter that paused its headers, so the body can only be
                // judged after they continue. It is held in `on_http_request_body` until
                // complete, then judged; nothing reaches the server as a complete call first.
                let Some(header) = plan.take_header_verdict() else { return fail_closed(Reason::InternalError) };
                self.body_pending = true;
                self.run(shared, header, outcome.decision, now, Some(plan))
            }
            verdict => self.run(shared, verdict, outcome.decision, now, None),
        }
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        // Every other stream: untouched.
        if !self.body_pending {
            return Action::Continue;
        }
        let shared_ref = self.shared.clone();
        let Ok(mut shared) = shared_ref.try_borrow_mut() else { return fail_closed(Reason::InternalError) };
        let shared = &mut *shared;
        let Some(max) = shared.bodies.get(&self.id).map(|w| w.plan.max_body_bytes) else {
            // Still minting (a proxy delivers no body then): hold it. Otherwise the header
            // phase already answered.
            return if shared.pending.contains_key(&self.id) { Action::Pause } else { Action::Continue };
        };
        if body_size <= max && !end_of_stream {
            // The proxy buffers until the end of the stream.
            return Action::Pause;
        }
        let Some(BodyWait { plan, decision: mut d, started_ns }) = shared.bodies.remove(&self.id) else { return Action::Continue };
        self.body_pending = false;
        let now = now_nanos().unwrap_or(started_ns) / 1_000_000_000;
        let Some(engine) = shared.engine.as_mut() else {
            let action = deny(None, &mut d, Reason::NotConfigured);
            return shared.conclude(&mut d, started_ns, action, false);
        };
        let verdict = if body_size > max {
            engine.body_too_large(&mut d)
        } else {
            match request_body(body_size, max) {
                Some(body) => engine.on_request_body(&plan, &body, now, &mut d),
                None => engine.refuse_body(&mut d, Reason::InternalError),
            }
        };
        // Allowed: the body follows the headers. Refused: a local reply (the proxy resets the
        // upstream stream, which never got a complete call).
        let action = apply(engine, &verdict, &mut d);
        let action = shared.conclude(&mut d, started_ns, action, false);
        if action == Action::Continue {
            shared.note_filter(self.id, &d);
        }
        action
    }

    fn on_http_request_trailers(&mut self, _num_trailers: usize) -> Action {
        if !self.body_pending {
            return Action::Continue;
        }
        // Trailers end the stream without a body callback that says so: the held body would go
        // upstream unjudged. MCP's HTTP transport sends no trailers: refuse the call.
        let shared_ref = self.shared.clone();
        let Ok(mut shared) = shared_ref.try_borrow_mut() else { return fail_closed(Reason::InternalError) };
        let shared = &mut *shared;
        let Some(BodyWait { decision: mut d, started_ns, .. }) = shared.bodies.remove(&self.id) else {
            // Still minting (the proxy holds everything then), or already answered.
            return if shared.pending.contains_key(&self.id) { Action::Pause } else { Action::Continue };
        };
        self.body_pending = false;
        let action = deny(shared.engine.as_ref(), &mut d, Reason::McpMalformed);
        shared.conclude(&mut d, started_ns, action, false)
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let Ok(shared) = self.shared.try_borrow() else { return Action::Continue };
        // Almost always empty: no hashing on the way out for other streams.
        if shared.tool_filters.is_empty() || !shared.tool_filters.contains_key(&self.id) {
            return Action::Continue;
        }
        drop(shared);
        // Only a JSON answer or a (complete) event stream can be narrowed; anything else is
        // refused (502) rather than passed unfiltered.
        let ct = response_header("content-type").unwrap_or_default();
        let ct = ct.trim_ascii_start();
        let is = |t: &[u8]| ct.get(..t.len()).is_some_and(|p| p.eq_ignore_ascii_case(t));
        self.sse = is(b"text/event-stream");
        let json = is(b"application/json") || self.sse;
        let ok = set_response_header("content-length", None);
        self.filtering = Some(json && ok);
        if !(json && ok) {
            self.refuse_tools_list(0, true);
        }
        // Never `Pause` here: a proxy would then hold the body back from this filter too
        // (Envoy: StopAllIterationAndWatermark). The headers go on; the body is held in
        // `on_http_response_body` until complete, then narrowed.
        Action::Continue
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        let Some(filtering) = self.filtering else { return Action::Continue };
        if !filtering {
            // Refused: the error body once, then whatever else comes is dropped.
            if self.refusal_written {
                let _ = replace_response_body(body_size, b"");
            } else {
                self.refuse_tools_list(body_size, false);
            }
            return Action::Continue;
        }
        if body_size > mandate_core::mcp::MAX_TOOLS_LIST_BYTES {
            self.refuse_tools_list(body_size, false);
            self.filtering = Some(false);
            return Action::Continue;
        }
        if !end_of_stream {
            self.response_body_seen = body_size;
            return Action::Pause;
        }
        let Ok(shared) = self.shared.try_borrow() else { return Action::Continue };
        let filtered = match (shared.tool_filters.get(&self.id), shared.engine.as_ref(), buffer(BufferType::HttpResponseBody, body_size, mandate_core::mcp::MAX_TOOLS_LIST_BYTES)) {
            (Some(f), Some(e), Some(body)) => e.filter_tools(f, &body, self.sse).ok(),
            _ => None,
        };
        drop(shared);
        match filtered {
            Some(new) if replace_response_body(body_size, &new) => {}
            _ => {
                self.refuse_tools_list(body_size, false);
                self.filtering = Some(false);
            }
        }
        Action::Continue
    }

    fn on_http_response_trailers(&mut self, _num_trailers: usize) -> Action {
        // A `tools/list` answer still being narrowed ends here, not in a body callback: replace
        // what was held by the error rather than let it go out unfiltered.
        if self.filtering == Some(true) {
            self.refuse_tools_list(self.response_body_seen, false);
            self.filtering = Some(false);
        }
        Action::Continue
    }

    fn on_log(&mut self) {
        // A stream that ends while waiting: drop its state; if it led an exchange, the host
        // cancels the call, so fail its waiters closed now rather than leave them hanging.
        let Ok(mut shared) = self.shared.try_borrow_mut() else { return };
        let shared = &mut *shared;
        if !shared.tool_filters.is_empty() {
            shared.tool_filters.remove(&self.id);
        }
        // A request that ended while its body was awaited: refused, and on the record (once).
        if self.body_pending {
            self.body_pending = false;
            if let Some(mut w) = shared.bodies.remove(&self.id) {
                w.decision.effect = Some(Effect::Deny);
                w.decision.reason = Some(Reason::McpMalformed);
                shared.record(&w.decision, w.started_ns, false);
                return;
            }
        }
        let Some(mut p) = shared.pending.remove(&self.id) else { return };
        let key = p.plan.key;
        // The request reached the filter: it gets its record even though its client left.
        if let Some(engine) = shared.engine.as_mut() {
            let _ = engine.finish_mint(&p.plan, Err(MintError::NoResponse), 0, &mut p.decision);
        }
        shared.record(&p.decision, p.started_ns, false);
        let led = shared.flights.get(&key).is_some_and(|f| f.leader == self.id);
        if let Some(flight) = shared.flights.get_mut(&key) {
            flight.waiters.retain(|w| *w != self.id);
        }
        if !led {
            return;
        }
        let Some(flight) = shared.flights.remove(&key) else { return };
        for w in flight.waiters {
            let Some(mut wp) = shared.pending.remove(&w) else { continue };
            let addressable = set_effective_context(w);
            match shared.engine.as_mut() {
                Some(engine) => {
                    let (verdict, _) = engine.finish_mint(&wp.plan, Err(MintError::NoResponse), 0, &mut wp.decision);
                    if addressable {
                        let action = apply(engine, &verdict, &mut wp.decision);
                        shared.conclude(&mut wp.decision, wp.started_ns, action, false);
                        continue;
                    }
                }
                None => {
                    wp.decision.effect = Some(Effect::Deny);
                    wp.decision.reason = Some(Reason::NotConfigured);
                }
            }
            unreachable_refused(&mut wp.decision);
            shared.record(&wp.decision, wp.started_ns, false);
        }
        let _ = set_effective_context(self.id);
    }
}
