//! File-backed static secrets for legacy destinations.
//!
//! The file maps audience → `{"secret": "...", "header": "x-api-key", "scheme": "ApiKey"}`
//! (`header` defaults to `authorization`; `scheme` is optional). It is re-read
//! when its modification time changes. Only the proxy ever receives the secret.

use anyhow::{Context, Result};
use serde::Deserialize;
use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::SystemTime;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LegacySecret {
    pub secret: String,
    #[serde(default = "default_header")]
    pub header: String,
    #[serde(default)]
    pub scheme: Option<String>,
}

fn default_header() -> String {
    "authorization".into()
}

#[derive(Default)]
pub struct SecretFile {
    pub secrets: HashMap<String, LegacySecret>,
    pub modified: Option<SystemTime>,
    /// True if group or others may read the file (logged as a warning).
    pub loose_permissions: bool,
}

pub fn load(path: &Path) -> Result<SecretFile> {
    let meta = std::fs::metadata(path).with_context(|| format!("reading {}", path.display()))?;
    let raw = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let secrets: HashMap<String, LegacySecret> =
        serde_json::from_slice(&raw).with_context(|| format!("parsing {} (audience → {{secret, header, scheme}})", path.display()))?;
    for (aud, s) in &secrets {
        if s.secret.is_empty() || s.header.is_empty() || !s.header.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
            anyhow::bail!("{}: entry `{aud}` needs a non-empty secret and a valid header name", path.display());
        }
    }
    Ok(SecretFile { secrets, modified: meta.modified().ok(), loose_permissions: meta.permissions().mode() & 0o077 != 0 })
}

pub fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}
