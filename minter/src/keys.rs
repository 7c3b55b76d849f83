//! The minter's ES256 signing keys, kept in `<state_dir>/signing-keys.json`
//! (mode 0600). The last key is current; the one before it stays published
//! in the JWKS so tokens signed before a rotation still verify.

use anyhow::{anyhow, bail, Context, Result};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use jwt_simple::prelude::{ECDSAP256PublicKeyLike, ES256KeyPair};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

pub const KEY_FILE: &str = "signing-keys.json";
/// Keys kept (and published): the current one and its predecessor.
pub const KEYS_KEPT: usize = 2;

#[derive(Serialize, Deserialize)]
struct StoredKey {
    kid: String,
    /// Private scalar, base64url.
    d: String,
    created: u64,
}

#[derive(Serialize, Deserialize, Default)]
struct KeyFile {
    keys: Vec<StoredKey>,
}

/// Loaded keys: the signer and the published JWKS document.
pub struct KeySet {
    pub current: ES256KeyPair,
    pub current_kid: String,
    /// The same key for ring's (assembly) P-256 ECDSA: signing is the hot path.
    signer: ring::signature::EcdsaKeyPair,
    /// base64url of `{"alg":"ES256","typ":"JWT","kid":…}`.
    header_b64: String,
    pub kids: Vec<String>,
    /// `{"keys": [...]}`, serialized once.
    pub jwks: String,
    pub modified: Option<SystemTime>,
}

pub fn key_path(state_dir: &Path) -> PathBuf {
    state_dir.join(KEY_FILE)
}

/// RFC 7638 JWK thumbprint of a P-256 public key (base64url SHA-256).
pub fn thumbprint(x: &str, y: &str) -> String {
    let canonical = format!(r#"{{"crv":"P-256","kty":"EC","x":"{x}","y":"{y}"}}"#);
    URL_SAFE_NO_PAD.encode(Sha256::digest(canonical.as_bytes()))
}

/// The public JWK (x, y) of a key pair.
pub fn public_xy(kp: &ES256KeyPair) -> Result<(String, String)> {
    let raw = kp.public_key().public_key().to_bytes_uncompressed();
    if raw.len() != 65 {
        bail!("unexpected public key encoding");
    }
    let x = raw.get(1..33).ok_or_else(|| anyhow!("bad point"))?;
    let y = raw.get(33..65).ok_or_else(|| anyhow!("bad point"))?;
    Ok((URL_SAFE_NO_PAD.encode(x), URL_SAFE_NO_PAD.encode(y)))
}

fn new_stored() -> Result<StoredKey> {
    let kp = ES256KeyPair::generate();
    let (x, y) = public_xy(&kp)?;
    Ok(StoredKey { kid: thumbprint(&x, &y), d: URL_SAFE_NO_PAD.encode(kp.to_bytes()), created: crate::now() })
}

fn read_file(path: &Path) -> Result<KeyFile> {
    let meta = std::fs::metadata(path).with_context(|| format!("reading {}", path.display()))?;
    if meta.permissions().mode() & 0o077 != 0 {
        bail!("{} is readable by group or others (mode {:o}); chmod 600 it", path.display(), meta.permissions().mode() & 0o777);
    }
    let raw = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let kf: KeyFile = serde_json::from_slice(&raw).with_context(|| format!("parsing {}", path.display()))?;
    if kf.keys.is_empty() {
        bail!("{} holds no key", path.display());
    }
    Ok(kf)
}

/// Writes the key file atomically with mode 0600.
fn write_file(path: &Path, kf: &KeyFile) -> Result<()> {
    let tmp = path.with_extension("json.tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(&serde_json::to_vec_pretty(kf)?)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path).with_context(|| format!("installing {}", path.display()))?;
    Ok(())
}

fn ensure_dir(state_dir: &Path) -> Result<()> {
    std::fs::create_dir_all(state_dir).with_context(|| format!("creating state dir {}", state_dir.display()))?;
    let _ = std::fs::set_permissions(state_dir, std::fs::Permissions::from_mode(0o700));
    Ok(())
}

/// Loads the keys, generating the first one if there is none.
pub fn load_or_create(state_dir: &Path) -> Result<KeySet> {
    ensure_dir(state_dir)?;
    let path = key_path(state_dir);
    if !path.exists() {
        write_file(&path, &KeyFile { keys: vec![new_stored()?] })?;
    }
    load(state_dir)
}

pub fn load(state_dir: &Path) -> Result<KeySet> {
    let path = key_path(state_dir);
    let kf = read_file(&path)?;
    let modified = std::fs::metadata(&path).and_then(|m| m.modified()).ok();
    let mut jwk_list = Vec::new();
    let mut kids = Vec::new();
    let mut current = None;
    for k in kf.keys.iter().rev().take(KEYS_KEPT) {
        let d = URL_SAFE_NO_PAD.decode(&k.d).context("bad key encoding")?;
        let kp = ES256KeyPair::from_bytes(&d).map_err(|e| anyhow!("bad key {}: {e}", k.kid))?;
        let (x, y) = public_xy(&kp)?;
        jwk_list.push(serde_json::json!({"kty": "EC", "crv": "P-256", "kid": k.kid, "alg": "ES256", "use": "sig", "x": x, "y": y}));
        kids.push(k.kid.clone());
        if current.is_none() {
            current = Some((kp.with_key_id(&k.kid), k.kid.clone()));
        }
    }
    let (current, current_kid) = current.ok_or_else(|| anyhow!("no signing key"))?;
    let signer = ring::signature::EcdsaKeyPair::from_private_key_and_public_key(
        &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
        &current.to_bytes(),
        &current.public_key().public_key().to_bytes_uncompressed(),
        &ring::rand::SystemRandom::new(),
    )
    .map_err(|e| anyhow!("signing key rejected: {e}"))?;
    let header = serde_json::json!({"alg": "ES256", "typ": "JWT", "kid": current_kid});
    let header_b64 = URL_SAFE_NO_PAD.encode(header.to_string());
    Ok(KeySet { current, current_kid, signer, header_b64, kids, jwks: serde_json::json!({ "keys": jwk_list }).to_string(), modified })
}

impl KeySet {
    /// A compact JWS (ES256) over `claims` with the current key.
    pub fn sign_jwt<T: Serialize>(&self, claims: &T) -> Result<String> {
        let payload = serde_json::to_vec(claims)?;
        let mut out = String::with_capacity(self.header_b64.len() + payload.len() * 4 / 3 + 96);
        out.push_str(&self.header_b64);
        out.push('.');
        URL_SAFE_NO_PAD.encode_string(&payload, &mut out);
        let sig = self.signer.sign(&*SIGN_RNG, out.as_bytes()).map_err(|_| anyhow!("signing failed"))?;
        out.push('.');
        URL_SAFE_NO_PAD.encode_string(sig.as_ref(), &mut out);
        Ok(out)
    }
}

static SIGN_RNG: std::sync::LazyLock<ring::rand::SystemRandom> = std::sync::LazyLock::new(ring::rand::SystemRandom::new);

/// Adds a new current key; the previous one stays published. Returns the new kid.
pub fn rotate(state_dir: &Path) -> Result<String> {
    ensure_dir(state_dir)?;
    let path = key_path(state_dir);
    let mut kf = if path.exists() { read_file(&path)? } else { KeyFile::default() };
    let k = new_stored()?;
    let kid = k.kid.clone();
    kf.keys.push(k);
    let excess = kf.keys.len().saturating_sub(KEYS_KEPT);
    kf.keys.drain(..excess);
    write_file(&path, &kf)?;
    Ok(kid)
}

pub fn modified(state_dir: &Path) -> Option<SystemTime> {
    std::fs::metadata(key_path(state_dir)).and_then(|m| m.modified()).ok()
}
