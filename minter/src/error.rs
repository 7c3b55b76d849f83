//! OAuth 2.0 error responses (RFC 6749 §5.2): JSON `error` + `error_description`.
//! Descriptions never contain a token: at most a reason code or a short hash.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

#[derive(Debug, Clone)]
pub struct OAuthError {
    pub status: StatusCode,
    pub error: &'static str,
    pub description: String,
}

impl OAuthError {
    fn new(status: StatusCode, error: &'static str, description: impl Into<String>) -> OAuthError {
        OAuthError { status, error, description: description.into() }
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
    pub fn not_found(d: impl Into<String>) -> OAuthError {
        Self::new(StatusCode::NOT_FOUND, "not_found", d)
    }
    /// `invalid_request` with another 4xx status (405, 413, 415, ...): the request itself is wrong.
    pub fn invalid_request_status(status: StatusCode, d: impl Into<String>) -> OAuthError {
        Self::new(status, "invalid_request", d)
    }
}

impl IntoResponse for OAuthError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({"error": self.error, "error_description": self.description}).to_string();
        let mut resp = (self.status, body).into_response();
        let h = resp.headers_mut();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        h.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
        if self.status == StatusCode::UNAUTHORIZED {
            h.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Basic realm=\"mandate-minter\""));
        }
        resp
    }
}
