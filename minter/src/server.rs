//! HTTP(S) server: state, routes, connection handling, lifecycle.

use crate::auth::{Client, ClientAuth, Peer};
use crate::config::{MinterConfig, Role};
use crate::conns::{Conns, Slot};
use crate::error::OAuthError;
use crate::keys::{self, KeySet};
use crate::legacy::{self, SecretFile};
use crate::store::{Kind, RevokeRequest, Store};
use crate::verify::IdentitySource;
use crate::Log;
use anyhow::{anyhow, Context, Result};
use axum::body::Bytes;
use axum::extract::rejection::PathRejection;
use axum::extract::{DefaultBodyLimit, Extension, Path as UrlPath, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tokio::task::JoinSet;
use tower_service::Service as _;

pub struct AppState {
    pub config: MinterConfig,
    pub identity: Arc<IdentitySource>,
    pub auth: ClientAuth,
    pub store: Store,
    pub log: Log,
    pub allowed_audiences: HashMap<String, HashSet<String>>,
    pub scopes: HashMap<String, HashSet<String>>,
    keys: RwLock<Arc<KeySet>>,
    /// Rotation policy (from `keys` and `ttl`).
    pub key_policy: keys::Policy,
    /// kid → when this process first published it.
    keys_seen: Mutex<HashMap<String, u64>>,
    legacy: RwLock<Arc<SecretFile>>,
    /// `public, max-age=<keys.jwks_max_age_s>`.
    jwks_cache_control: HeaderValue,
    /// Open connections, the cap and the read timeouts.
    pub conns: Arc<Conns>,
    /// Prometheus metrics (`GET /metrics`).
    pub metrics: crate::metrics::Metrics,
}

impl AppState {
    pub fn new(config: MinterConfig) -> Result<AppState> {
        let log = Log { level: config.log_level };
        let fetched: Vec<(String, u64)> = config.bundle_urls.iter().map(|u| (u.trust_domain.clone(), u.max_bundle_age_s)).collect();
        let identity = IdentitySource::new(config.identity()?.clone(), &fetched).map_err(|e| anyhow!("identity: {e}"))?;
        let key_policy = keys::Policy::from_config(&config);
        let store = Store::open_config(&config)?;
        let mut keys_seen = HashMap::new();
        let keyset = match store.postgres() {
            None => {
                keys::ensure_created(&config.state_dir)?;
                keys::load(&config.state_dir, &key_policy, &mut keys_seen, crate::now())?
            }
            Some(pg) => {
                let rows = pg.block_on(pg_keys(pg))??;
                keys::load_rows(rows, &key_policy, &mut keys_seen, crate::now())?
            }
        };
        let jwks_cache_control = HeaderValue::from_str(&format!("public, max-age={}", config.keys.jwks_max_age_s))?;
        let legacy = match &config.legacy {
            Some(l) => {
                let f = legacy::load(&l.secrets_file)?;
                if f.loose_permissions {
                    log.error(serde_json::json!({"msg": "legacy secrets file is readable by group or others; chmod 600 it", "path": l.secrets_file}));
                }
                for a in &l.audiences {
                    if !f.secrets.contains_key(a) {
                        log.error(serde_json::json!({"msg": "legacy audience has no secret in the secrets file", "audience": a}));
                    }
                }
                f
            }
            None => SecretFile::default(),
        };
        let allowed_audiences = config.audiences.iter().map(|(k, v)| (k.clone(), v.iter().cloned().collect())).collect();
        let scopes = config.scopes.iter().map(|(k, v)| (k.clone(), v.iter().cloned().collect())).collect();
        Ok(AppState {
            auth: ClientAuth::new(&config.client_auth),
            identity: Arc::new(identity),
            store,
            log,
            allowed_audiences,
            scopes,
            keys: RwLock::new(Arc::new(keyset)),
            key_policy,
            keys_seen: Mutex::new(keys_seen),
            legacy: RwLock::new(Arc::new(legacy)),
            jwks_cache_control,
            conns: Arc::new(Conns::new(&config)),
            metrics: crate::metrics::Metrics::new(),
            config,
        })
    }

    /// PostgreSQL: rotates on schedule (exactly one replica: the others find it done under the
    /// lock), and loads the shared keys when they changed or a pending key's time came.
    async fn reload_pg_keys(&self, pg: &crate::pgstore::PgStore) {
        let now = crate::now();
        if let Some(every) = self.config.keys.rotate_every_s {
            match rotate_pg_if(pg, &self.key_policy, now, |newest| newest.saturating_add(every) <= now).await {
                Ok(Some(r)) => self.log.info(serde_json::json!({"msg": "scheduled key rotation", "pending_kid": r.kid, "signs_from": r.not_before, "dropped": r.dropped})),
                Ok(None) => {}
                Err(e) => self.log.error(serde_json::json!({"msg": "scheduled key rotation failed", "error": e.to_string()})),
            }
        }
        let rows = match pg.keys().await {
            Ok(r) => r,
            Err(e) => {
                self.log.error(serde_json::json!({"msg": "signing key reload failed; keeping the loaded keys", "error": e.to_string()}));
                return;
            }
        };
        let loaded = self.current_keys();
        let due = loaded.next_change.is_some_and(|t| t <= now);
        let mut kids: Vec<String> = rows.iter().map(|r| r.0.clone()).collect();
        kids.reverse();
        if !due && kids == loaded.kids {
            return;
        }
        let mut seen = self.keys_seen.lock().unwrap_or_else(|p| p.into_inner());
        match keys::load_rows(rows, &self.key_policy, &mut seen, now) {
            Ok(k) => {
                if k.kids != loaded.kids || k.current_kid != loaded.current_kid {
                    self.log.info(serde_json::json!({"msg": "signing keys reloaded", "current_kid": k.current_kid, "published": k.kids, "next_change": k.next_change}));
                }
                if let Ok(mut g) = self.keys.write() {
                    *g = Arc::new(k);
                }
            }
            Err(e) => self.log.error(serde_json::json!({"msg": "signing key reload failed; keeping the loaded keys", "error": e.to_string()})),
        }
    }

    pub fn current_keys(&self) -> Arc<KeySet> {
        match self.keys.read() {
            Ok(k) => k.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    pub fn legacy_secrets(&self) -> Arc<SecretFile> {
        match self.legacy.read() {
            Ok(k) => k.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Rotates on schedule, publishes a new key file at once, switches the signer when a pending
    /// key's time comes, and picks up an edited legacy secret file.
    pub async fn reload_if_changed(&self) {
        if let Some(pg) = self.store.postgres() {
            self.reload_pg_keys(pg).await;
        } else {
            self.reload_file_keys();
        }
        self.reload_legacy();
    }

    fn reload_file_keys(&self) {
        let dir = &self.config.state_dir;
        let now = crate::now();
        if let Some(every) = self.config.keys.rotate_every_s {
            if self.current_keys().newest_created.saturating_add(every) <= now {
                match keys::rotate_at(dir, &self.key_policy, now) {
                    Ok(r) => self.log.info(serde_json::json!({"msg": "scheduled key rotation", "pending_kid": r.kid, "signs_from": r.not_before, "dropped": r.dropped})),
                    Err(e) => self.log.error(serde_json::json!({"msg": "scheduled key rotation failed", "error": e.to_string()})),
                }
            }
        }
        let loaded = self.current_keys();
        let due = loaded.next_change.is_some_and(|t| t <= now);
        if due || keys::modified(dir) != loaded.modified {
            let mut seen = self.keys_seen.lock().unwrap_or_else(|p| p.into_inner());
            match keys::load(dir, &self.key_policy, &mut seen, now) {
                Ok(k) => {
                    if k.kids != loaded.kids || k.current_kid != loaded.current_kid {
                        self.log.info(serde_json::json!({"msg": "signing keys reloaded", "current_kid": k.current_kid, "published": k.kids, "next_change": k.next_change}));
                    }
                    if let Ok(mut g) = self.keys.write() {
                        *g = Arc::new(k);
                    }
                }
                Err(e) => self.log.error(serde_json::json!({"msg": "signing key reload failed; keeping the loaded keys", "error": e.to_string()})),
            }
        }
    }

    fn reload_legacy(&self) {
        if let Some(l) = &self.config.legacy {
            if legacy::modified(&l.secrets_file) != self.legacy_secrets().modified {
                match legacy::load(&l.secrets_file) {
                    Ok(f) => {
                        self.log.info(serde_json::json!({"msg": "legacy secrets reloaded", "entries": f.secrets.len()}));
                        if let Ok(mut g) = self.legacy.write() {
                            *g = Arc::new(f);
                        }
                    }
                    Err(e) => self.log.error(serde_json::json!({"msg": "legacy secrets reload failed; keeping the loaded ones", "error": e.to_string()})),
                }
            }
        }
    }
}

/// The shared signing keys; an empty store gets a first key (by exactly one replica).
pub async fn pg_keys(pg: &crate::pgstore::PgStore) -> Result<Vec<keys::KeyRow>> {
    let now = crate::now();
    pg.change_keys(|rows| if rows.is_empty() { keys::first_row(now).ok().map(|r| (vec![r], ())) } else { None }).await?;
    Ok(pg.keys().await?)
}

/// Rotates the shared keys under the lock when `due(newest created)` holds there.
pub async fn rotate_pg_if(pg: &crate::pgstore::PgStore, policy: &keys::Policy, now: u64, due: impl FnOnce(u64) -> bool) -> Result<Option<keys::Rotated>> {
    let mut failure = None;
    let r = pg
        .change_keys(|rows| {
            let newest = rows.last().map_or(0, |r| r.2);
            if !rows.is_empty() && !due(newest) {
                return None;
            }
            match keys::rotate_rows(rows, policy, now) {
                Ok(x) => Some(x),
                Err(e) => {
                    failure = Some(e);
                    None
                }
            }
        })
        .await?;
    match failure {
        Some(e) => Err(e),
        None => Ok(r),
    }
}

type St = State<Arc<AppState>>;

pub fn router(state: Arc<AppState>) -> Router {
    let limit = state.config.max_body_bytes;
    Router::new()
        .route("/token", post(token))
        .route("/tasks", post(create_task))
        .route("/tasks/{task}", get(get_task))
        .route("/tasks/{task}/end", post(end_task))
        .route("/revoke", post(revoke))
        .route("/revocations", get(revocations))
        .route("/.well-known/jwks.json", get(jwks))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(limit))
        .layer(axum::middleware::map_response(json_errors))
        .with_state(state)
}

async fn not_found() -> Response {
    OAuthError::not_found("no such endpoint").into_response()
}

/// Every error answer is JSON (RFC 6749 §5.2 shape) with `cache-control: no-store`, including
/// axum's own: the empty 404 and 405, the plain-text 413 of the body limit, the plain-text 400
/// of a path that does not decode (a non-UTF-8 task id), a bad query string.
async fn json_errors(resp: Response) -> Response {
    let status = resp.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return resp;
    }
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(';').next().is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json")));
    if is_json {
        return resp;
    }
    let err = match status {
        StatusCode::NOT_FOUND => OAuthError::not_found("no such endpoint"),
        StatusCode::METHOD_NOT_ALLOWED => OAuthError::invalid_request_status(status, "method not allowed on this endpoint"),
        StatusCode::PAYLOAD_TOO_LARGE => OAuthError::invalid_request_status(status, "request body too large"),
        StatusCode::UNSUPPORTED_MEDIA_TYPE => OAuthError::invalid_request_status(status, "unsupported content type"),
        s if s.is_server_error() => OAuthError::server_error("internal error"),
        s => OAuthError::invalid_request_status(s, "malformed request"),
    };
    let mut out = err.into_response();
    *out.status_mut() = status;
    if let Some(allow) = resp.headers().get(header::ALLOW) {
        out.headers_mut().insert(header::ALLOW, allow.clone());
    }
    out
}

fn json_response(status: StatusCode, body: String, cache: &'static str) -> Response {
    let mut resp = (status, body).into_response();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static(cache));
    if cache == "no-store" {
        h.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    }
    resp
}

fn content_type_is(headers: &HeaderMap, want: &str) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case(want))
}

const FORM: &str = "application/x-www-form-urlencoded";

fn authenticate(st: &AppState, peer: &Peer, headers: &HeaderMap, path: &str) -> Result<Client, OAuthError> {
    st.auth.authenticate(peer, headers).inspect_err(|e| {
        st.log.info(serde_json::json!({"msg": "client refused", "path": path, "peer": peer.addr.to_string(), "error": e.error, "why": e.description}));
    })
}

async fn token(State(st): St, Extension(peer): Extension<Peer>, headers: HeaderMap, body: Bytes) -> Response {
    let client = match authenticate(&st, &peer, &headers, "/token") {
        Ok(c) => c,
        Err(e) => return e.into_response(),
    };
    if !content_type_is(&headers, FORM) {
        return OAuthError::invalid_request(format!("content-type must be {FORM}")).into_response();
    }
    if st.store.postgres().is_some() {
        // A task registered on another replica a moment ago: fetched before the checks.
        if let Some(task) = form_task(&body) {
            st.store.task_fresh(&task).await;
        }
    }
    match crate::exchange::exchange(&st, &client, &body, crate::now()) {
        Ok(x) => {
            // The token leaves only once its record is committed: a token the store could
            // not record is never handed out.
            let started = std::time::Instant::now();
            let recorded = st.store.record_issued(x.record).await;
            st.metrics.store_op("record_issued", started);
            if let Err(e) = recorded {
                st.log.error(serde_json::json!({"msg": "exchange refused: the issued token could not be recorded", "client_id": client.client_id, "reason": e.reason(), "jti": x.jti}));
                st.metrics.exchange("store_unavailable");
                st.metrics.refusal("temporarily_unavailable", Some(e.reason()));
                return OAuthError::store(&e, "the token could not be recorded").into_response();
            }
            st.metrics.exchange("issued");
            st.log.debug(serde_json::json!({"msg": "issued", "client_id": client.client_id, "sub": x.sub, "aud": x.aud, "jti": x.jti, "subject_token": x.subject_hash}));
            json_response(StatusCode::OK, x.body.to_string(), "no-store")
        }
        Err(e) => {
            // Log a hash of the subject token, never the token itself.
            let subject_hash = serde_urlencoded::from_bytes::<Vec<(String, String)>>(&body)
                .ok()
                .and_then(|pairs| pairs.into_iter().find(|(k, _)| k == "subject_token"))
                .map(|(_, v)| crate::short_hash(v.as_bytes()));
            st.log.info(serde_json::json!({"msg": "exchange refused", "client_id": client.client_id, "error": e.error, "why": e.description, "subject_token": subject_hash}));
            st.metrics.exchange("refused");
            st.metrics.refusal(e.error, e.mandate_reason);
            e.into_response()
        }
    }
}

/// The `task` form parameter of a token request, if there is exactly one and it is valid.
fn form_task(body: &[u8]) -> Option<String> {
    let mut tasks = form_urlencoded_pairs(body).into_iter().filter(|(k, _)| k == "task").map(|(_, v)| v);
    let t = tasks.next()?;
    (tasks.next().is_none() && crate::values::task(&t).is_ok()).then_some(t)
}

fn form_urlencoded_pairs(body: &[u8]) -> Vec<(String, String)> {
    serde_urlencoded::from_bytes::<Vec<(String, String)>>(body).unwrap_or_default()
}

fn outcome_response(st: &AppState, client: &Client, outcome: Result<crate::store::RevokeOutcome, crate::store::StoreError>) -> Response {
    match outcome {
        Ok(outcome) => {
            let r = &outcome.revocation;
            st.log.info(serde_json::json!({"msg": "revoked", "client_id": client.client_id, "kind": r.kind, "value": r.value, "subject": r.subject, "seq": r.seq, "created": outcome.created, "live_tokens": outcome.jtis.len()}));
            match serde_json::to_string(&outcome) {
                Ok(s) => json_response(StatusCode::OK, s, "no-store"),
                Err(_) => OAuthError::server_error("encoding failed").into_response(),
            }
        }
        Err(e) => {
            // Never acknowledged unless durable: 503, and the caller retries.
            st.log.error(serde_json::json!({"msg": "revocation failed", "reason": e.reason(), "error": e.to_string()}));
            OAuthError::store(&e, "the revocation could not be recorded").into_response()
        }
    }
}

/// Authenticates and checks the client has one of `roles` (else 403 `access_denied`,
/// naming the first).
fn authorize(st: &AppState, peer: &Peer, headers: &HeaderMap, path: &str, roles: &[Role]) -> Result<Client, OAuthError> {
    let client = authenticate(st, peer, headers, path)?;
    if roles.iter().any(|r| client.roles.has(*r)) {
        return Ok(client);
    }
    let name = roles.first().map_or("?", |r| r.as_str());
    let e = OAuthError::access_denied(format!("client lacks role `{name}`"));
    st.log.info(serde_json::json!({"msg": "client refused", "path": path, "client_id": client.client_id, "error": e.error, "why": e.description}));
    Err(e)
}

/// The task id of a `/tasks/{task}…` path, validated like every task id.
fn task_path(task: Result<UrlPath<String>, PathRejection>) -> Result<String, OAuthError> {
    let UrlPath(task) = task.map_err(|_| OAuthError::invalid_request("the task id in the path is not valid UTF-8"))?;
    crate::values::task(&task).map_err(|e| OAuthError::invalid_request(e.0))?;
    Ok(task)
}

async fn create_task(State(st): St, Extension(peer): Extension<Peer>, headers: HeaderMap, body: Bytes) -> Response {
    let client = match authorize(&st, &peer, &headers, "/tasks", &[Role::Tasks]) {
        Ok(c) => c,
        Err(e) => return e.into_response(),
    };
    if !content_type_is(&headers, "application/json") {
        return OAuthError::invalid_request("content-type must be application/json").into_response();
    }
    let new = match crate::tasks::parse_create(&body, &st.config.tasks) {
        Ok(n) => n,
        Err(e) => return e.into_response(),
    };
    let now = crate::now();
    let task = crate::tasks::build(new, &client.client_id, now);
    let body = task.to_json(now);
    let started = std::time::Instant::now();
    let created = st.store.create_task(task.clone()).await;
    st.metrics.store_op("create_task", started);
    match created {
        Ok(()) => {
            st.log.info(serde_json::json!({"msg": "task created", "client_id": client.client_id, "task": task.id, "subjects": task.subjects.len(), "expires_at": task.expires_at}));
            json_response(StatusCode::CREATED, body.to_string(), "no-store")
        }
        Err(e) => {
            st.log.error(serde_json::json!({"msg": "task creation failed", "reason": e.reason(), "error": e.to_string()}));
            OAuthError::store(&e, "the task could not be recorded").into_response()
        }
    }
}

async fn get_task(State(st): St, Extension(peer): Extension<Peer>, headers: HeaderMap, task: Result<UrlPath<String>, PathRejection>) -> Response {
    if let Err(e) = authorize(&st, &peer, &headers, "/tasks/{task}", &[Role::Tasks, Role::Revoke]) {
        return e.into_response();
    }
    let id = match task_path(task) {
        Ok(t) => t,
        Err(e) => return e.into_response(),
    };
    match st.store.task_fresh(&id).await {
        Some(t) => json_response(StatusCode::OK, t.to_json(crate::now()).to_string(), "no-store"),
        None => OAuthError::not_found("no such task").into_response(),
    }
}

async fn end_task(State(st): St, Extension(peer): Extension<Peer>, headers: HeaderMap, task: Result<UrlPath<String>, PathRejection>) -> Response {
    let client = match authorize(&st, &peer, &headers, "/tasks/{task}/end", &[Role::Revoke]) {
        Ok(c) => c,
        Err(e) => return e.into_response(),
    };
    let id = match task_path(task) {
        Ok(t) => t,
        Err(e) => return e.into_response(),
    };
    // Only registered tasks: an ad-hoc task name is not globally unique (use
    // `POST /revoke` with `task` and `subject`).
    if st.store.task_fresh(&id).await.is_none() {
        return OAuthError::not_found("no such task").into_response();
    }
    let started = std::time::Instant::now();
    let outcome = st.store.revoke(RevokeRequest { kind: Kind::Task, value: id, subject: None }, &client.client_id).await;
    st.metrics.store_op("revoke", started);
    outcome_response(&st, &client, outcome)
}

/// The fields of a `/revoke` body (JSON object of strings, or a form).
pub fn revoke_fields(headers: &HeaderMap, body: &[u8]) -> Result<Vec<(String, String)>, OAuthError> {
    if content_type_is(headers, "application/json") {
        let m = serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(body)
            .map_err(|_| OAuthError::invalid_request("malformed JSON body"))?;
        let mut out = Vec::new();
        for (k, v) in m {
            match v {
                serde_json::Value::String(s) => out.push((k, s)),
                _ if Kind::parse(&k).is_some() => return Err(OAuthError::invalid_request(format!("`{k}` must be a string"))),
                _ => {}
            }
        }
        Ok(out)
    } else if content_type_is(headers, FORM) {
        serde_urlencoded::from_bytes(body).map_err(|_| OAuthError::invalid_request("malformed form body"))
    } else {
        Err(OAuthError::invalid_request("content-type must be application/json or application/x-www-form-urlencoded"))
    }
}

/// Validates a `/revoke` request: exactly one of `task`, `jti`, `subject`,
/// except that `task` may come with a `subject` that scopes it.
pub fn revoke_request(st: &AppState, fields: &[(String, String)]) -> Result<RevokeRequest, OAuthError> {
    let mut task = None;
    let mut jti = None;
    let mut subject = None;
    for (k, v) in fields {
        let slot = match k.as_str() {
            "task" => &mut task,
            "jti" => &mut jti,
            "subject" => &mut subject,
            _ => continue,
        };
        if slot.is_some() {
            return Err(OAuthError::invalid_request(format!("parameter `{k}` repeated")));
        }
        *slot = Some(v.clone());
    }
    let invalid = |e: crate::values::Invalid| OAuthError::invalid_request(e.0);
    match (task, jti, subject) {
        (Some(task), None, subject) => {
            crate::values::task(&task).map_err(invalid)?;
            if let Some(s) = &subject {
                crate::values::subject(s).map_err(invalid)?;
            }
            if subject.is_none() && st.store.task(&task).is_none() {
                return Err(OAuthError::invalid_request(
                    "an unregistered task name is not globally unique: name the `subject` whose task ends",
                ));
            }
            Ok(RevokeRequest { kind: Kind::Task, value: task, subject })
        }
        (None, Some(jti), None) => {
            crate::values::jti(&jti).map_err(invalid)?;
            Ok(RevokeRequest { kind: Kind::Jti, value: jti, subject: None })
        }
        (None, None, Some(subject)) => {
            crate::values::subject(&subject).map_err(invalid)?;
            Ok(RevokeRequest { kind: Kind::Subject, value: subject, subject: None })
        }
        _ => Err(OAuthError::invalid_request("name exactly one of `task` (optionally with `subject`), `jti` or `subject`")),
    }
}

async fn revoke(State(st): St, Extension(peer): Extension<Peer>, headers: HeaderMap, body: Bytes) -> Response {
    let client = match authorize(&st, &peer, &headers, "/revoke", &[Role::Revoke]) {
        Ok(c) => c,
        Err(e) => return e.into_response(),
    };
    let fields = match revoke_fields(&headers, &body) {
        Ok(f) => f,
        Err(e) => return e.into_response(),
    };
    if let Some((_, task)) = fields.iter().find(|(k, _)| k == "task") {
        if crate::values::task(task).is_ok() {
            st.store.task_fresh(task).await;
        }
    }
    let req = match revoke_request(&st, &fields) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    let started = std::time::Instant::now();
    let outcome = st.store.revoke(req, &client.client_id).await;
    st.metrics.store_op("revoke", started);
    outcome_response(&st, &client, outcome)
}

async fn revocations(State(st): St, Extension(peer): Extension<Peer>, headers: HeaderMap, Query(q): Query<HashMap<String, String>>) -> Response {
    if let Err(e) = authorize(&st, &peer, &headers, "/revocations", &[Role::Feed]) {
        return e.into_response();
    }
    let since = match q.get("since").map(|s| s.parse::<i64>()) {
        None => 0,
        Some(Ok(n)) if n >= 0 => n,
        _ => return OAuthError::invalid_request("`since` must be a non-negative integer").into_response(),
    };
    let limit = match q.get("limit").map(|s| s.parse::<usize>()) {
        None => 1000,
        Some(Ok(n)) if (1..=10_000).contains(&n) => n,
        _ => return OAuthError::invalid_request("`limit` must be 1-10000").into_response(),
    };
    let max_bytes = match q.get("max_bytes").map(|s| s.parse::<usize>()) {
        None => crate::store::FEED_MAX_BYTES,
        Some(Ok(n)) if n >= crate::store::FEED_MIN_BYTES => n,
        _ => return OAuthError::invalid_request(format!("`max_bytes` must be an integer ≥ {}", crate::store::FEED_MIN_BYTES)).into_response(),
    };
    let wait_ms = match q.get("wait_ms").map(|s| s.parse::<u64>()) {
        None => 0,
        // Capped, not refused: every page says how long the minter holds a poll (`wait_max_ms`).
        Some(Ok(n)) => n.min(crate::store::FEED_MAX_WAIT_MS),
        _ => return OAuthError::invalid_request("`wait_ms` must be a non-negative integer").into_response(),
    };
    let epoch = q.get("epoch").map(String::as_str);
    let deadline = tokio::time::Instant::now() + Duration::from_millis(wait_ms);
    loop {
        // Subscribed before reading: a commit after this read wakes the wait below.
        let mut changed = st.store.subscribe();
        let page = st.store.feed(since, epoch, limit, max_bytes, crate::now());
        // Answer at once with news (or a reset); else hold the poll until an entry past the
        // cursor is visible or the wait is over.
        let news = page.reset || page.cursor != since || !page.revocations.is_empty();
        if news || tokio::time::Instant::now() >= deadline {
            return json_response(StatusCode::OK, page.body, "no-store");
        }
        if tokio::time::timeout_at(deadline, changed.changed()).await.is_err() {
            let page = st.store.feed(since, epoch, limit, max_bytes, crate::now());
            return json_response(StatusCode::OK, page.body, "no-store");
        }
    }
}

async fn jwks(State(st): St) -> Response {
    let mut resp = json_response(StatusCode::OK, st.current_keys().jwks.clone(), "no-store");
    resp.headers_mut().insert(header::CACHE_CONTROL, st.jwks_cache_control.clone());
    resp.headers_mut().remove(header::PRAGMA);
    resp
}

/// Liveness: the process serves. Reports the store's state without failing on it (a
/// restart would not bring the database back).
async fn healthz(State(st): St) -> Response {
    let body = serde_json::json!({"status": "ok", "kid": st.current_keys().current_kid, "revocations": st.store.revocation_count(),
                                  "store": st.store.backend_name(), "feed_lag_s": st.store.feed_lag_s(), "connections": st.conns.to_json()});
    json_response(StatusCode::OK, body.to_string(), "no-store")
}

/// Readiness: 200 only while the store takes writes (else 503 with the reason code), so a load
/// balancer sends exchanges elsewhere while this replica's database is unreachable.
async fn readyz(State(st): St) -> Response {
    match st.store.ready().await {
        Ok(()) => {
            st.metrics.store_up.set(1);
            let body = serde_json::json!({"status": "ready", "store": st.store.backend_name(), "feed_lag_s": st.store.feed_lag_s()});
            json_response(StatusCode::OK, body.to_string(), "no-store")
        }
        Err(e) => {
            st.metrics.store_up.set(0);
            let body = serde_json::json!({"status": "not_ready", "store": st.store.backend_name(), "mandate_reason": e.reason()});
            json_response(StatusCode::SERVICE_UNAVAILABLE, body.to_string(), "no-store")
        }
    }
}

async fn metrics(State(st): St) -> Response {
    st.metrics.feed_lag_seconds.set(i64::try_from(st.store.feed_lag_s()).unwrap_or(i64::MAX));
    st.metrics.revocations.set(i64::try_from(st.store.revocation_count()).unwrap_or(i64::MAX));
    let mut resp = (StatusCode::OK, st.metrics.encode()).into_response();
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"));
    resp.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// A configured, bound, not yet serving minter.
pub struct Prepared {
    pub state: Arc<AppState>,
    fetchers: Vec<crate::verify::BundleFetcher>,
    listener: std::net::TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    addr: SocketAddr,
}

/// Opens the state (keys, SQLite), loads TLS material and binds the listener.
pub fn prepare(config: MinterConfig) -> Result<Prepared> {
    prepare_on(config, None)
}

/// Like `prepare`, with an optional listen override (`--listen`).
pub fn prepare_on(mut config: MinterConfig, listen: Option<SocketAddr>) -> Result<Prepared> {
    if let Some(a) = listen {
        // The rules that depend on the address (dev mode and shared secrets
        // without TLS stay on loopback) apply to the override too.
        config.listen = a.to_string();
        config = config.finish(std::path::Path::new(""))?;
    }
    let addr = config.listen_addr()?;
    let tls = match &config.tls {
        Some(t) => Some(tokio_rustls::TlsAcceptor::from(crate::tls::server_config(t)?)),
        None => None,
    };
    let fetchers = config.bundle_urls.iter().map(crate::verify::BundleFetcher::new).collect::<Result<Vec<_>>>()?;
    let state = Arc::new(AppState::new(config)?);
    let listener = std::net::TcpListener::bind(addr).with_context(|| format!("binding {addr}"))?;
    widen_backlog(&listener, state.config.limits.max_connections);
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    Ok(Prepared { state, fetchers, listener, tls, addr })
}

/// The standard library listens with a backlog of 128: a burst of connections (a proxy's pool
/// filling up, a flood) overflows it, and each dropped SYN costs its client a whole
/// retransmission timeout (1 s). Listening again on the bound socket raises it (the kernel
/// caps it at `net.core.somaxconn`).
fn widen_backlog(listener: &std::net::TcpListener, max_connections: usize) {
    use std::os::fd::AsRawFd as _;
    let backlog = libc::c_int::try_from(max_connections.clamp(128, 65_535)).unwrap_or(128);
    // SAFETY: listen(2) on a socket this function borrows; it only changes the queue length.
    unsafe {
        libc::listen(listener.as_raw_fd(), backlog);
    }
}

impl Prepared {
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// Serves until `shutdown` completes, then closes connections and flushes SQLite.
    pub async fn serve(self, shutdown: impl Future<Output = ()>) -> Result<()> {
        let Prepared { state, fetchers, listener, tls, addr } = self;
        let listener = tokio::net::TcpListener::from_std(listener)?;
        let app = router(state.clone());
        let mut background = JoinSet::new();
        {
            let st = state.clone();
            let every = Duration::from_secs(st.config.reload_check_s.max(1));
            background.spawn(async move {
                loop {
                    tokio::time::sleep(every).await;
                    st.reload_if_changed().await;
                }
            });
        }
        {
            // After a flood of connections, hand the memory they freed back to the OS.
            let conns = state.conns.clone();
            background.spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    if conns.should_trim() {
                        let _ = tokio::task::spawn_blocking(crate::conns::release_freed_memory).await;
                    }
                }
            });
        }
        for fetcher in fetchers {
            background.spawn(crate::verify::fetch_loop(state.identity.clone(), fetcher, state.log));
        }
        state.log.info(serde_json::json!({"msg": "listening", "addr": addr.to_string(), "tls": tls.is_some(), "client_auth": format!("{:?}", state.auth.mode()), "dev": state.config.dev, "tasks_require_registered": state.config.tasks.require_registered, "kid": state.current_keys().current_kid}));
        let mut conns = JoinSet::new();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        // Past the cap with no pending connection to evict: closed at once.
                        let Some(slot) = state.conns.admit() else {
                            drop(stream);
                            continue;
                        };
                        let _ = stream.set_nodelay(true);
                        conns.spawn(connection(stream, peer, app.clone(), tls.clone(), slot, state.conns.clone()));
                    }
                    Err(e) => {
                        state.log.error(serde_json::json!({"msg": "accept failed", "error": e.to_string()}));
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
            }
        }
        drop(listener);
        conns.abort_all();
        background.abort_all();
        while conns.join_next().await.is_some() {}
        while background.join_next().await.is_some() {}
        drop(app);
        let st = state.clone();
        tokio::task::spawn_blocking(move || st.store.close()).await.map_err(|e| anyhow!("closing store: {e}"))?;
        state.log.info(serde_json::json!({"msg": "stopped"}));
        Ok(())
    }
}

async fn connection(stream: tokio::net::TcpStream, addr: SocketAddr, app: Router, tls: Option<tokio_rustls::TlsAcceptor>, slot: Slot, conns: Arc<Conns>) {
    let slot = Arc::new(slot);
    let serve = async {
        match tls {
            None => serve_io(TokioIo::new(stream), Peer { addr, cert_identity: None }, app, slot.clone(), conns).await,
            Some(acceptor) => {
                // The handshake counts as reading the first request head.
                let Ok(Ok(tls_stream)) = tokio::time::timeout(conns.header_read_timeout, acceptor.accept(stream)).await else {
                    return;
                };
                let cert_identity = tls_stream
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|chain| chain.first())
                    .and_then(|c| crate::tls::cert_identity(c.as_ref()))
                    .map(Arc::from);
                serve_io(TokioIo::new(tls_stream), Peer { addr, cert_identity }, app, slot.clone(), conns).await
            }
        }
    };
    // Dropping the connection's future closes the socket.
    tokio::select! {
        _ = serve => {}
        _ = slot.evicted() => {}
    }
}

async fn serve_io<I>(io: TokioIo<I>, peer: Peer, app: Router, slot: Arc<Slot>, conns: Arc<Conns>)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let started = std::sync::atomic::AtomicBool::new(false);
    let body_conns = conns.clone();
    let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
        if !started.swap(true, std::sync::atomic::Ordering::Relaxed) {
            slot.started();
        }
        let mut app = app.clone();
        let peer = peer.clone();
        let conns = body_conns.clone();
        async move {
            let (mut parts, body) = req.into_parts();
            parts.extensions.insert(peer);
            let body = match read_body(body, &conns).await {
                Ok(b) => b,
                Err(resp) => return Ok(resp),
            };
            app.call(hyper::Request::from_parts(parts, axum::body::Body::from(body))).await
        }
    });
    let served = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(conns.header_read_timeout)
        .serve_connection(io, service)
        .await;
    if served.is_err_and(|e| e.is_timeout()) {
        conns.header_timed_out();
    }
}

/// The whole request body, within `limits.body_read_timeout_ms` and `max_body_bytes`; else
/// the error answer (408 or 413), after which the connection is closed.
async fn read_body(body: hyper::body::Incoming, conns: &Conns) -> Result<Bytes, Response> {
    use http_body_util::BodyExt as _;
    let limited = http_body_util::Limited::new(body, conns.max_body_bytes);
    let err = match tokio::time::timeout(conns.body_read_timeout, limited.collect()).await {
        Ok(Ok(collected)) => return Ok(collected.to_bytes()),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => OAuthError::invalid_request_status(StatusCode::PAYLOAD_TOO_LARGE, "request body too large"),
        Ok(Err(_)) => OAuthError::invalid_request("the request body could not be read"),
        Err(_) => {
            conns.body_timed_out();
            OAuthError::invalid_request_status(StatusCode::REQUEST_TIMEOUT, "request body not received in time")
        }
    };
    let mut resp = err.into_response();
    resp.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    Err(resp)
}

/// A minter running on its own thread and Tokio runtime.
pub struct Handle {
    pub addr: SocketAddr,
    pub tls: bool,
    pub state: Arc<AppState>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<Result<()>>>,
}

impl Handle {
    /// `http://127.0.0.1:PORT` (or `https://…`).
    pub fn base_url(&self) -> String {
        format!("{}://{}", if self.tls { "https" } else { "http" }, self.addr)
    }

    /// Stops serving and waits until the state is flushed to disk.
    pub fn shutdown(mut self) -> Result<()> {
        self.stop_and_join()
    }

    fn stop_and_join(&mut self) -> Result<()> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        match self.thread.take() {
            Some(t) => t.join().map_err(|_| anyhow!("minter thread panicked"))?,
            None => Ok(()),
        }
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        let _ = self.stop_and_join();
    }
}

/// Starts a minter on a new thread with its own runtime (`workers` threads, default 2).
pub fn spawn(config: MinterConfig) -> Result<Handle> {
    let workers = config.workers.unwrap_or(2);
    let prepared = prepare(config)?;
    let addr = prepared.local_addr();
    let tls = prepared.is_tls();
    let state = prepared.state.clone();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(workers).thread_name("minter-worker").enable_all().build()?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::Builder::new().name("minter".into()).spawn(move || {
        rt.block_on(prepared.serve(async {
            let _ = stopped.await;
        }))
    })?;
    Ok(Handle { addr, tls, state, stop: Some(stop), thread: Some(thread) })
}
