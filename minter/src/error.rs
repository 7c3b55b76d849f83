//! OAuth 2.0 error responses (RFC 6749 §5.2): JSON `error` + `error_description`.
//! Descriptions never contain a token: at most a reason code or a short hash.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

#[derive(Debug, Clone)]
pub struct OAuthError {
    pub status: StatusCode,
    pub error: &'static str,
    pub description: String,
    /// Extension member `mandate_reason` (task, revocation and delegation refusals), read by
    /// the plugin.
    pub mandate_reason: Option<&'static str>,
}

impl OAuthError {
    fn new(status: StatusCode, error: &'static str, description: impl Into<String>) -> OAuthError {
        OAuthError { status, error, description: description.into(), mandate_reason: None }
    }
    /// 400 `invalid_grant` with `mandate_reason` (task / revocation refusals).
    pub fn refused(reason: &'static str, d: impl Into<String>) -> OAuthError {
        OAuthError { mandate_reason: Some(reason), ..Self::new(StatusCode::BAD_REQUEST, "invalid_grant", d) }
    }
    /// 400 `invalid_scope` with `mandate_reason` (a delegated scope that would widen).
    pub fn refused_scope(reason: &'static str, d: impl Into<String>) -> OAuthError {
        OAuthError { mandate_reason: Some(reason), ..Self::new(StatusCode::BAD_REQUEST, "invalid_scope", d) }
    }
    /// 403 `access_denied`: the client is known but lacks the role (not `/token`).
    pub fn access_denied(d: impl Into<String>) -> OAuthError {
        Self::new(StatusCode::FORBIDDEN, "access_denied", d)
    }
    /// 404 `not_found` (an unknown task).
    pub fn not_found(d: impl Into<String>) -> OAuthError {
        Self::new(StatusCode::NOT_FOUND, "not_found", d)
    }
    pub fn invalid_request(d: impl Into<String>) -> OAuthError {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request", d)
    }
    pub fn invalid_grant(d: impl Into<String>) -> OAuthError {
        Self::new(StatusCode::BAD_REQUEST, "invalid_grant", d)
    }
    pub fn invalid_target(d: impl Into<String>) -> OAuthError {
        Self::new(StatusCode::BAD_REQUEST, "invalid_target", d)
    }
    pub fn invalid_scope(d: impl Into<String>) -> OAuthError {
        Self::new(StatusCode::BAD_REQUEST, "invalid_scope", d)
    }
    pub fn unsupported_grant_type(d: impl Into<String>) -> OAuthError {
        Self::new(StatusCode::BAD_REQUEST, "unsupported_grant_type", d)
    }
    pub fn invalid_client(d: impl Into<String>) -> OAuthError {
        Self::new(StatusCode::UNAUTHORIZED, "invalid_client", d)
    }
    pub fn unauthorized_client(d: impl Into<String>) -> OAuthError {
        // RFC 6749 §5.2: only invalid_client may be 401; the client is known but not allowed.
        Self::new(StatusCode::BAD_REQUEST, "unauthorized_client", d)
    }
    pub fn server_error(d: impl Into<String>) -> OAuthError {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", d)
    }
    /// 503 `temporarily_unavailable` with `mandate_reason` (the store could not record what
    /// the answer would acknowledge: `store_full`, `store_unavailable`). Nothing was issued or
    /// recorded; the client may retry.
    pub fn unavailable(reason: &'static str, d: impl Into<String>) -> OAuthError {
        OAuthError { mandate_reason: Some(reason), ..Self::new(StatusCode::SERVICE_UNAVAILABLE, "temporarily_unavailable", d) }
    }
    /// 503 for a store failure.
    pub fn store(e: &crate::store::StoreError, what: &str) -> OAuthError {
        Self::unavailable(e.reason(), format!("{what}: {}", match e {
            crate::store::StoreError::Full => "the store is full",
            crate::store::StoreError::Failed(_) => "the store failed",
        }))
    }
    /// `invalid_request` with another 4xx status (405, 413, 415, ...): the request itself is wrong.
    pub fn invalid_request_status(status: StatusCode, d: impl Into<String>) -> OAuthError {
        Self::new(status, "invalid_request", d)
    }
}

impl IntoResponse for OAuthError {
    fn into_response(self) -> Response {
        let mut body = serde_json::json!({"error": self.error, "error_description": self.description});
        if let (Some(r), Some(o)) = (self.mandate_reason, body.as_object_mut()) {
            o.insert("mandate_reason".into(), r.into());
        }
        let body = body.to_string();
        let mut resp = (self.status, body).into_response();
        let h = resp.headers_mut();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        h.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            h.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            h.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Basic realm=\"mandate-minter\""));
        }
        resp
    }
}
