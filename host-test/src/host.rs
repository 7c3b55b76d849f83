//! `Host`: the engine, the compiled module and the state shared by every VM
//! made from it (clock, shared data, queues, metrics, logs, properties,
//! upstream clusters), like the workers of one Envoy.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::num::NonZeroUsize;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, Result};
use serde::Serialize;
use wasmtime::{Config, Engine, ExternType, Linker, Module, WasmBacktraceDetails};

use crate::abi::{LogLevel, MetricType, Status};
use crate::vm::{Vm, VmState};

/// One log line from a VM: `proxy_log`, or a line the module wrote to
/// stdout (info) or stderr (error) through WASI `fd_write`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LogEntry {
    pub level: LogLevel,
    pub message: String,
    /// `proxy_log`, `stdout` or `stderr`.
    pub source: &'static str,
    /// The effective context when the line was written.
    pub context_id: u32,
    /// Which VM of the host wrote it (1, 2, ...).
    pub vm: u32,
}

/// A metric's current value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum MetricValue {
    Counter(u64),
    Gauge(i64),
    /// Every recorded sample, in order.
    Histogram(Vec<u64>),
}

#[derive(Debug, Clone)]
pub(crate) struct Metric {
    pub name: String,
    pub kind: MetricType,
    pub value: i64,
    pub samples: Vec<u64>,
}

impl Metric {
    pub fn value(&self) -> MetricValue {
        match self.kind {
            MetricType::Counter => MetricValue::Counter(self.value.max(0) as u64),
            MetricType::Gauge => MetricValue::Gauge(self.value),
            MetricType::Histogram => MetricValue::Histogram(self.samples.clone()),
        }
    }
}

#[derive(Debug, Clone)]
pub(crate) struct Queue {
    pub name: String,
    pub owner_vm: u32,
    pub items: VecDeque<Vec<u8>>,
}

/// splitmix64: small, deterministic when seeded.
#[derive(Debug, Clone)]
pub(crate) struct Rng(u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let r = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&r[..chunk.len()]);
        }
    }
}

fn entropy_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    h.write_u64(now);
    h.finish()
}

/// State shared by all VMs of a host.
pub(crate) struct Shared {
    /// Wall clock, Unix nanoseconds.
    pub realtime: u64,
    /// Monotonic clock, nanoseconds; moves only with `advance`.
    pub monotonic: u64,
    pub upstreams: BTreeSet<String>,
    pub properties: BTreeMap<Vec<u8>, Vec<u8>>,
    pub shared_data: BTreeMap<Vec<u8>, (Vec<u8>, u32)>,
    pub next_cas: u32,
    pub queues: Vec<Queue>,
    /// (owner vm, queue id) notifications not yet delivered.
    pub queue_ready: Vec<(u32, u32)>,
    pub metrics: Vec<Metric>,
    pub logs: Vec<LogEntry>,
    pub log_level: LogLevel,
    pub rng: Rng,
    pub env: Vec<(String, String)>,
    pub unimplemented_calls: Vec<String>,
    pub next_vm: u32,
    pub local_replies_through_filter: bool,
    /// Injected hostcall failures by import name (see [`Host::fail_call`]).
    pub faults: BTreeMap<String, Fault>,
    /// Injected failures that fired, in order.
    pub faults_fired: Vec<(String, Status)>,
}

/// An injected hostcall failure: the call answers `status` without doing anything, after
/// `skip` calls that go through, for `times` calls (`None`: until cleared).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Fault {
    pub status: Status,
    pub skip: u32,
    pub times: Option<u32>,
}

impl Shared {
    fn new(realtime: u64) -> Shared {
        Shared {
            realtime,
            monotonic: 1_000_000_000,
            upstreams: BTreeSet::new(),
            properties: BTreeMap::new(),
            shared_data: BTreeMap::new(),
            next_cas: 1,
            queues: Vec::new(),
            queue_ready: Vec::new(),
            metrics: Vec::new(),
            logs: Vec::new(),
            log_level: LogLevel::Trace,
            rng: Rng(entropy_seed()),
            env: Vec::new(),
            unimplemented_calls: Vec::new(),
            next_vm: 1,
            local_replies_through_filter: true,
            faults: BTreeMap::new(),
            faults_fired: Vec::new(),
        }
    }

    pub fn next_cas(&mut self) -> u32 {
        let cas = self.next_cas;
        self.next_cas = self.next_cas.wrapping_add(1);
        if self.next_cas == 0 {
            self.next_cas = 1;
        }
        cas
    }
}

/// The process-wide engine: one engine lets compiled modules be shared.
fn shared_engine() -> Result<Engine> {
    static ENGINE: OnceLock<Engine> = OnceLock::new();
    if let Some(e) = ENGINE.get() {
        return Ok(e.clone());
    }
    let mut config = Config::new();
    config.wasm_backtrace_max_frames(NonZeroUsize::new(64));
    config.wasm_backtrace_details(WasmBacktraceDetails::Enable);
    // Proxy-wasm modules (Rust, C++, TinyGo) use no GC proposals; the
    // workspace enables the `gc` feature without a collector.
    config.gc_support(false);
    let engine = Engine::new(&config).map_err(anyhow::Error::from)?;
    Ok(ENGINE.get_or_init(|| engine).clone())
}

type ModuleCache = Mutex<Vec<(Arc<Vec<u8>>, Module)>>;

fn compile_cached(engine: &Engine, wasm: &[u8]) -> Result<Module> {
    static CACHE: OnceLock<ModuleCache> = OnceLock::new();
    let cache = CACHE.get_or_init(|| Mutex::new(Vec::new()));
    {
        let c = cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, m)) = c.iter().find(|(b, _)| b.as_slice() == wasm) {
            return Ok(m.clone());
        }
    }
    let module = Module::new(engine, wasm)
        .map_err(anyhow::Error::from)
        .context("compiling the wasm module")?;
    let mut c = cache.lock().unwrap_or_else(|e| e.into_inner());
    if c.len() >= 32 {
        c.remove(0);
    }
    c.push((Arc::new(wasm.to_vec()), module.clone()));
    Ok(module)
}

/// Every hostcall this harness implements, by (module, name).
pub(crate) type Implemented = BTreeSet<(String, String)>;

/// Engine + compiled module + shared state. Cheap to clone: clones share
/// everything (module and state). Use [`Host::fresh`] for a new, empty state
/// over the same compiled module.
#[derive(Clone)]
pub struct Host {
    pub(crate) engine: Engine,
    pub(crate) module: Module,
    pub(crate) linker: Arc<Linker<VmState>>,
    pub(crate) shared: Arc<Mutex<Shared>>,
    unimplemented_imports: Arc<Vec<String>>,
}

impl Host {
    /// Loads a `.wasm` (or `.wat`) file.
    pub fn from_file(path: &Path) -> Result<Host> {
        let bytes = std::fs::read(path)
            .with_context(|| format!("reading wasm module {}", path.display()))?;
        Host::from_bytes(&bytes).with_context(|| format!("loading {}", path.display()))
    }

    /// Compiles a module from binary wasm or WAT text. Compiled modules are
    /// cached for the life of the process (same bytes → no recompilation), so
    /// creating many hosts from one plugin in a test binary is cheap.
    pub fn from_bytes(wasm: &[u8]) -> Result<Host> {
        let engine = shared_engine()?;
        let module = compile_cached(&engine, wasm)?;
        let mut linker: Linker<VmState> = Linker::new(&engine);
        let mut implemented = Implemented::new();
        crate::hostcalls::define(&mut linker, &mut implemented)?;
        crate::wasi::define(&mut linker, &mut implemented)?;
        let mut unimplemented = Vec::new();
        for import in module.imports() {
            let key = (import.module().to_string(), import.name().to_string());
            if implemented.contains(&key) {
                continue;
            }
            let full = format!("{}.{}", key.0, key.1);
            match import.ty() {
                ExternType::Func(ty) => {
                    let name = full.clone();
                    linker
                        .func_new(
                            &key.0,
                            &key.1,
                            ty.clone(),
                            move |caller, _params, _results| {
                                let msg = format!("unimplemented hostcall: {name}");
                                let st: &VmState = caller.data();
                                st.lock().unimplemented_calls.push(name.clone());
                                Err(wasmtime::Error::msg(msg))
                            },
                        )
                        .map_err(anyhow::Error::from)?;
                    unimplemented.push(full);
                }
                other => anyhow::bail!(
                    "module imports {full} as {other:?}; this host provides no such import"
                ),
            }
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        let shared = Shared::new(now);
        Ok(Host {
            engine,
            module,
            linker: Arc::new(linker),
            shared: Arc::new(Mutex::new(shared)),
            unimplemented_imports: Arc::new(unimplemented),
        })
    }

    /// A host over the same compiled module with new, empty shared state
    /// (clock, shared data, metrics, logs, upstreams, properties reset).
    pub fn fresh(&self) -> Result<Host> {
        let shared = Shared::new(self.now_nanos());
        Ok(Host {
            engine: self.engine.clone(),
            module: self.module.clone(),
            linker: self.linker.clone(),
            shared: Arc::new(Mutex::new(shared)),
            unimplemented_imports: self.unimplemented_imports.clone(),
        })
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Imports of the module that this host does not implement. Each is
    /// linked to a function that fails with `unimplemented hostcall: <name>`.
    pub fn unimplemented_imports(&self) -> &[String] {
        &self.unimplemented_imports
    }

    /// Unimplemented hostcalls the module actually called, in order.
    pub fn unimplemented_calls(&self) -> Vec<String> {
        self.lock().unimplemented_calls.clone()
    }

    // ---- fault injection ----

    /// Makes the host answer every later call of the hostcall `name` (for example
    /// `"proxy_http_call"`) with `status`, without doing anything, until
    /// [`Host::clear_faults`]. Applies to every VM of this host. Models a host that refuses
    /// a call (Envoy answers BadArgument when a header map is gone, for example).
    pub fn fail_call(&self, name: &str, status: Status) {
        self.fail_calls(name, status, 0, None);
    }

    /// Like [`Host::fail_call`], but only the `nth` call from now (1-based) fails; the others
    /// go through.
    pub fn fail_nth_call(&self, name: &str, nth: u32, status: Status) {
        self.fail_calls(name, status, nth.saturating_sub(1), Some(1));
    }

    /// The general form: after `skip` calls that go through, `times` calls (`None`: all) of
    /// `name` answer `status`.
    pub fn fail_calls(&self, name: &str, status: Status, skip: u32, times: Option<u32>) {
        self.lock().faults.insert(name.to_string(), Fault { status, skip, times });
    }

    /// Removes every injected failure.
    pub fn clear_faults(&self) {
        self.lock().faults.clear();
    }

    /// The injected failures that fired so far (hostcall, status), in order.
    pub fn faults_fired(&self) -> Vec<(String, Status)> {
        self.lock().faults_fired.clone()
    }

    // ---- clock ----

    /// Sets the wall clock (Unix nanoseconds). The monotonic clock is not moved.
    pub fn set_time(&self, unix_nanos: u64) {
        self.lock().realtime = unix_nanos;
    }

    /// Sets the wall clock to whole Unix seconds.
    pub fn set_time_secs(&self, unix_secs: u64) {
        self.set_time(unix_secs.saturating_mul(1_000_000_000));
    }

    /// Moves both clocks forward. Does not run any callback: see
    /// [`Vm::advance`] to also fire due ticks and call timeouts.
    pub fn advance(&self, d: Duration) {
        let mut s = self.lock();
        let n = d.as_nanos().min(u64::MAX as u128) as u64;
        s.realtime = s.realtime.saturating_add(n);
        s.monotonic = s.monotonic.saturating_add(n);
    }

    /// Wall clock, Unix nanoseconds.
    pub fn now_nanos(&self) -> u64 {
        self.lock().realtime
    }

    /// Monotonic clock, nanoseconds.
    pub fn monotonic_nanos(&self) -> u64 {
        self.lock().monotonic
    }

    // ---- configuration of the environment ----

    /// Declares a cluster that `proxy_http_call` may name; others get BadArgument.
    pub fn add_upstream(&self, cluster: &str) {
        self.lock().upstreams.insert(cluster.to_string());
    }

    /// Sets a host-wide property, e.g. `&["source", "address"]`. VM- and
    /// stream-level properties take precedence.
    pub fn set_property(&self, path: &[&str], value: &[u8]) {
        self.lock()
            .properties
            .insert(crate::abi::property_path(path), value.to_vec());
    }

    /// Removes a host-wide property.
    pub fn remove_property(&self, path: &[&str]) {
        self.lock()
            .properties
            .remove(&crate::abi::property_path(path));
    }

    /// The level below which `proxy_log` lines are dropped; also what
    /// `proxy_get_log_level` answers. Default: trace (keep everything).
    pub fn set_log_level(&self, level: LogLevel) {
        self.lock().log_level = level;
    }

    /// Makes `random_get` deterministic from now on.
    pub fn set_random_seed(&self, seed: u64) {
        self.lock().rng = Rng(seed);
    }

    /// Environment variables the module sees through WASI `environ_get`.
    pub fn set_env(&self, key: &str, value: &str) {
        let mut s = self.lock();
        s.env.retain(|(k, _)| k != key);
        s.env.push((key.to_string(), value.to_string()));
    }

    /// Whether a local response sent by the filter is passed back through the
    /// filter's own response callbacks (as Envoy does). Default: true.
    pub fn set_local_replies_through_filter(&self, on: bool) {
        self.lock().local_replies_through_filter = on;
    }

    // ---- shared state readers ----

    /// Shared data value and its CAS, as any VM would read it.
    pub fn shared_data(&self, key: &str) -> Option<(Vec<u8>, u32)> {
        self.lock().shared_data.get(key.as_bytes()).cloned()
    }

    /// Writes shared data from outside (new CAS).
    pub fn set_shared_data(&self, key: &str, value: &[u8]) {
        let mut s = self.lock();
        let cas = s.next_cas();
        s.shared_data
            .insert(key.as_bytes().to_vec(), (value.to_vec(), cas));
    }

    /// Every shared data key, sorted.
    pub fn shared_data_keys(&self) -> Vec<String> {
        self.lock()
            .shared_data
            .keys()
            .map(|k| String::from_utf8_lossy(k).into_owned())
            .collect()
    }

    /// A counter's or gauge's value (None for histograms and unknown names).
    pub fn metric(&self, name: &str) -> Option<i64> {
        self.lock()
            .metrics
            .iter()
            .find(|m| m.name == name && m.kind != MetricType::Histogram)
            .map(|m| m.value)
    }

    /// A histogram's samples.
    pub fn histogram(&self, name: &str) -> Option<Vec<u64>> {
        self.lock()
            .metrics
            .iter()
            .find(|m| m.name == name && m.kind == MetricType::Histogram)
            .map(|m| m.samples.clone())
    }

    /// All metrics by name.
    pub fn metrics(&self) -> BTreeMap<String, MetricValue> {
        self.lock()
            .metrics
            .iter()
            .map(|m| (m.name.clone(), m.value()))
            .collect()
    }

    /// Every log line of every VM, in order.
    pub fn logs(&self) -> Vec<LogEntry> {
        self.lock().logs.clone()
    }

    /// Takes every log line of every VM.
    pub fn take_logs(&self) -> Vec<LogEntry> {
        std::mem::take(&mut self.lock().logs)
    }

    /// Items waiting in a shared queue, by name.
    pub fn queue_items(&self, name: &str) -> Option<Vec<Vec<u8>>> {
        self.lock()
            .queues
            .iter()
            .find(|q| q.name == name)
            .map(|q| q.items.iter().cloned().collect())
    }

    /// Creates a VM: instantiates the module, runs `_initialize` (or
    /// `_start`), `proxy_on_vm_start` and `proxy_on_configure` on a new root
    /// context. A `false` from either is an error of type
    /// [`ConfigRejected`] (downcast it to read the logs); see
    /// [`Host::new_vm_lenient`] to get the VM anyway.
    pub fn new_vm(&self, vm_config: &[u8], plugin_config: &[u8]) -> Result<Vm> {
        let vm = self.new_vm_lenient(vm_config, plugin_config)?;
        if let Some(stage) = vm.rejected_at() {
            return Err(anyhow::Error::new(ConfigRejected {
                stage,
                logs: vm.logs(),
            }));
        }
        Ok(vm)
    }

    /// Like [`Host::new_vm`] but returns the VM even when the module rejected
    /// its configuration: check [`Vm::configured`].
    pub fn new_vm_lenient(&self, vm_config: &[u8], plugin_config: &[u8]) -> Result<Vm> {
        Vm::create(self, vm_config, plugin_config)
    }
}

/// `proxy_on_vm_start` or `proxy_on_configure` returned false.
#[derive(Debug, Clone)]
pub struct ConfigRejected {
    /// `proxy_on_vm_start` or `proxy_on_configure`.
    pub stage: &'static str,
    /// The VM's logs up to the rejection.
    pub logs: Vec<LogEntry>,
}

impl std::fmt::Display for ConfigRejected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the module rejected its configuration ({} returned false)",
            self.stage
        )?;
        for l in &self.logs {
            write!(f, "\n  [{:?}] {}", l.level, l.message)?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigRejected {}
