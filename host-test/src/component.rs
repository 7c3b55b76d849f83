//! The component face on wasmtime: loads `mandate_component.wasm` (world `decider` of
//! `wit/mandate.wit`) with bindings from `wasmtime::component::bindgen!`.
//!
//! The component reads no clock (requests carry `now`). The only host function it calls is
//! `wasi:random/insecure-seed` (std's hash-map keys, which also seed decision ids); the other
//! WASI imports std's adapter declares (stdio, environment, exit) are linked to traps, so a
//! build that started using one would fail loudly here rather than behave differently.

use std::hash::BuildHasher;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};
use mandate_core::decide::{Caller as CoreCaller, DecideRequest, IntentProof as CoreProof};
use mandate_core::reason::Reason as CoreReason;
use wasmtime::component::{Component, Linker};
use wasmtime::{Config, Engine, Store};

wasmtime::component::bindgen!({ world: "decider", path: "../wit" });

pub use mandate::decision::types as wit;

/// Where `scripts/build-component` puts the component.
pub fn default_component_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/wasm32-wasip2/component/mandate_component.wasm")
}

/// A compiled component and its linker: instantiate as many deciders as needed.
pub struct ComponentHost {
    engine: Engine,
    component: Component,
    linker: Linker<()>,
}

impl ComponentHost {
    pub fn from_file(path: &Path) -> Result<ComponentHost> {
        let mut config = Config::new();
        config.wasm_component_model(true);
        // No collector is compiled in (the workspace's wasmtime features); the component needs none.
        config.gc_support(false);
        if std::env::var_os("MANDATE_PERFMAP").is_some() {
            config.profiler(wasmtime::ProfilingStrategy::PerfMap);
        }
        let engine = Engine::new(&config)?;
        let component = Component::from_file(&engine, path)
            .map_err(anyhow::Error::from)
            .with_context(|| format!("loading the component {} (build it with scripts/build-component)", path.display()))?;
        let mut linker = Linker::new(&engine);
        let seed_iface = component
            .component_type()
            .imports(&engine)
            .map(|(name, _)| name.to_string())
            .find(|n| n.starts_with("wasi:random/insecure-seed@"));
        if let Some(name) = seed_iface {
            linker.instance(&name)?.func_wrap("insecure-seed", |_, (): ()| {
                let s = std::collections::hash_map::RandomState::new();
                Ok(((s.hash_one(1u8), s.hash_one(2u8)),))
            })?;
        }
        linker.define_unknown_imports_as_traps(&component)?;
        Ok(ComponentHost { engine, component, linker })
    }

    pub fn instantiate(&self) -> Result<ComponentDecider> {
        let mut store = Store::new(&self.engine, ());
        let api = Decider::instantiate(&mut store, &self.component, &self.linker)?;
        Ok(ComponentDecider { store, api })
    }
}

/// One instance of the component, holding one configuration.
pub struct ComponentDecider {
    store: Store<()>,
    api: Decider,
}

impl ComponentDecider {
    /// `Err` is a trap (a broken component); `Ok(Err)` a refused configuration.
    pub fn configure(&mut self, config: &str) -> Result<Result<(), wit::ConfigError>> {
        Ok(self.api.call_configure(&mut self.store, config)?)
    }

    pub fn verify(&mut self, token: &str, now: u64) -> Result<Result<wit::Identity, wit::Refusal>> {
        Ok(self.api.call_verify(&mut self.store, token, now)?)
    }

    pub fn decide(&mut self, request: &wit::Request) -> Result<wit::Decision> {
        Ok(self.api.call_decide(&mut self.store, request)?)
    }
}

/// A core request (e.g. a policy case, [`DecideRequest::from_case`]) as the WIT request.
pub fn to_wit(r: &DecideRequest) -> wit::Request {
    let json = |v: &Option<serde_json::Value>| v.as_ref().map(|v| v.to_string());
    wit::Request {
        caller: match &r.caller {
            CoreCaller::Verified(i) => wit::Caller::Verified(wit::Identity {
                principal: i.principal.clone(),
                trust_domain: i.trust_domain.clone(),
                issued_at: i.issued_at,
                expires_at: i.expires_at,
                token_hash: i.token_hash.clone(),
            }),
            CoreCaller::Token(t) => wit::Caller::Token(t.clone()),
        },
        intent: r.intent.clone(),
        task: r.task.clone(),
        intent_proof: r.intent_proof.as_ref().map(|p| match p {
            CoreProof::Claims { intents, task } => wit::IntentProof::Claims(wit::SignedIntent { intents: intents.clone(), task: task.clone() }),
            CoreProof::Token(t) => wit::IntentProof::Token(t.clone()),
        }),
        method: r.method.clone(),
        authority: r.authority.clone(),
        path: r.path.clone(),
        mcp: r.mcp.as_ref().map(|m| wit::McpCall { method: m.method.clone(), name: m.name.clone(), uri: m.uri.clone(), arguments: m.arguments.clone() }),
        delegation: r.delegation.as_ref().map(|d| wit::Delegation {
            chain: d.chain.clone(),
            intent: d.intent.clone(),
            task: d.task.clone(),
            scope: d.scope.clone(),
            resources: d.resources.clone(),
            tools: d.tools.clone(),
            arguments: json(&d.arguments),
            may_act: d.may_act.clone(),
        }),
        now: r.now,
        environment: r.environment.clone(),
        standing_secret: r.standing_secret,
    }
}

pub fn effect_code(e: wit::Effect) -> &'static str {
    match e {
        wit::Effect::Allow => "allow",
        wit::Effect::Deny => "deny",
        wit::Effect::DryRunDeny => "dry_run_deny",
    }
}

/// The WIT reason as the core's (every WIT case has its core reason of the same name: a case
/// added to the WIT alone fails to compile here).
pub fn core_reason(r: wit::Reason) -> CoreReason {
    macro_rules! same {
        ($($v:ident),* $(,)?) => {
            match r {
                $(wit::Reason::$v => CoreReason::$v,)*
            }
        };
    }
    mandate_core::with_reason_variants!(same)
}

/// An HTTP request of `mandate run` (a [`RequestSpec`](crate::RequestSpec)) as the component's
/// request, read the way the filter reads it: the bearer token from the configured identity
/// header, the intent, task and intent token from their headers, a standing secret from the
/// policy's headers or Basic auth, an MCP call from a JSON-RPC body (the filter's strict parser
/// first: `Err` is its reason). A Txn-Token is refused: the component takes delegation as a
/// verified token described, not raw.
pub fn request_from_http(spec: &crate::RequestSpec, config: &mandate_core::config::Config) -> Result<DecideRequest, String> {
    use mandate_core::headers::Headers;
    use mandate_core::policy::intent::{INTENT_HEADER, INTENT_TOKEN_HEADER, TASK_HEADER};
    let headers = Headers::new(spec.headers.to_headers());
    let text = |name: &str| -> Result<Option<String>, String> {
        match headers.single(name) {
            Ok(v) => Ok(v.map(|b| String::from_utf8_lossy(b).into_owned())),
            Err(_) => Err(format!("header {name} appears more than once")),
        }
    };
    if let Some(d) = &config.delegation {
        if headers.contains(&d.header) {
            return Err(format!("a delegated request ({} header): the component takes the verified Txn-Token described (request.delegation), not the raw token", d.header));
        }
    }
    let token = mandate_core::engine::bearer_token(&headers, config).map_err(|r| r.code().to_string())?;
    let standing_secret = config.policy.as_ref().is_some_and(|p| p.standing_secret_headers.iter().any(|n| headers.contains(n)))
        || headers.all("authorization").any(|v| v.get(..6).is_some_and(|s| s.eq_ignore_ascii_case(b"basic ")));
    let body = spec.body_bytes().map_err(|e| e.to_string())?;
    let mcp = match body.as_deref().filter(|b| !b.is_empty() && spec.method == "POST") {
        None => None,
        Some(b) => {
            mandate_core::mcp::jsonrpc::parse(b).map_err(|e| e.reason.code().to_string())?;
            let v: serde_json::Value = serde_json::from_slice(b).map_err(|e| e.to_string())?;
            let s = |k: &str| v.pointer(k).and_then(|x| x.as_str()).map(str::to_string);
            Some(mandate_core::decide::McpRequest {
                method: s("/method").unwrap_or_default(),
                name: s("/params/name"),
                uri: s("/params/uri"),
                arguments: v.pointer("/params/arguments").map(|a| a.to_string()),
            })
        }
    };
    let now = match &spec.time {
        Some(t) => t.unix_nanos().map_err(|e| e.to_string())? / 1_000_000_000,
        None => std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_err(|e| e.to_string())?.as_secs(),
    };
    Ok(DecideRequest {
        caller: CoreCaller::Token(String::from_utf8_lossy(token).into_owned()),
        intent: text(INTENT_HEADER)?,
        task: text(TASK_HEADER)?,
        intent_proof: text(INTENT_TOKEN_HEADER)?.map(CoreProof::Token),
        method: spec.method.clone(),
        authority: spec.authority.clone(),
        path: spec.path.clone(),
        mcp,
        delegation: None,
        now,
        environment: None,
        standing_secret,
    })
}
