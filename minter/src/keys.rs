//! The minter's ES256 signing keys, kept in `<state_dir>/signing-keys.json`
//! (mode 0600), oldest first.
//!
//! Rotation never breaks a resource server that caches the JWKS:
//! - a new key is *pending* first: it is published in the JWKS at once, but it
//!   signs only from its `not_before`, at least `keys.publish_before_use_s`
//!   (≥ `keys.jwks_max_age_s`, one JWKS cache period) after this process first
//!   published it;
//! - the signer is the newest key whose activation time has passed;
//! - at least `keys.keep` (≥ 3) keys stay published: next, current, previous.
//!   A key is dropped only once its successor has signed for longer than any
//!   token lives plus one JWKS cache period, so every token still verifies.
//!
//! Signing goes through the [`Signer`] trait; only the file signer ships.

use anyhow::{anyhow, bail, Context, Result};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use jwt_simple::prelude::{ECDSAP256PublicKeyLike, ES256KeyPair};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

pub const KEY_FILE: &str = "signing-keys.json";
/// Fewest keys kept (and published): next, current, previous.
pub const MIN_KEYS_KEPT: usize = 3;

#[derive(Serialize, Deserialize)]
struct StoredKey {
    kid: String,
    /// Private scalar, base64url.
    d: String,
    created: u64,
    /// Unix time from which the key may sign (absent: from `created`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    not_before: Option<u64>,
}

impl StoredKey {
    fn not_before(&self) -> u64 {
        self.not_before.unwrap_or(self.created)
    }
}

#[derive(Serialize, Deserialize, Default)]
struct KeyFile {
    keys: Vec<StoredKey>,
}

/// How keys are rotated (from the `keys` configuration section).
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    /// A new key is published this long before it signs (≥ the JWKS max-age).
    pub publish_before_use_s: u64,
    /// Keys kept and published (≥ 3).
    pub keep: usize,
    /// A key is dropped only when its successor's `not_before` is this long past: the
    /// successor may start signing up to one publication period after `not_before` (a key
    /// first seen late is held back again), the old key's last tokens live `ttl.max_s` (or
    /// `txn_tokens.max_ttl_s`, whichever is longer) after
    /// that, and resource servers may cache the JWKS one more period.
    pub retire_after_s: u64,
    /// Added to `not_before` by `rotate`: a running minter notices a new key
    /// file within this many seconds (`reload_check_s`).
    pub notice_slack_s: u64,
}

impl Policy {
    pub fn from_config(c: &crate::config::MinterConfig) -> Policy {
        let pbu = c.keys.publish_before_use_s();
        Policy {
            publish_before_use_s: pbu,
            keep: c.keys.keep.max(MIN_KEYS_KEPT),
            retire_after_s: pbu
                .saturating_add(c.longest_token_s())
                .saturating_add(c.keys.jwks_max_age_s)
                .saturating_add(c.reload_check_s.max(1)),
            notice_slack_s: c.reload_check_s.max(1),
        }
    }
}

/// Produces JWS signatures. This is the extension point for an external signer
/// (a PKCS#11 token, a cloud KMS, a command): implement it and build the
/// [`KeySet`] with [`KeySet::with_signer`]. Only [`FileSigner`] ships.
pub trait Signer: Send + Sync {
    /// The JWS `kid`; must be published in the JWKS.
    fn kid(&self) -> &str;
    /// The JWS `alg` (the JWKS publishes ES256 keys).
    fn alg(&self) -> &'static str;
    /// Signs `signing_input` (`base64url(header) "." base64url(payload)`) and returns the JWS
    /// signature bytes (ES256: `r || s`, 64 bytes).
    fn sign(&self, signing_input: &[u8]) -> Result<Vec<u8>>;
}

/// An ES256 key held in the key file, signed with ring's P-256 ECDSA.
pub struct FileSigner {
    kid: String,
    key: ring::signature::EcdsaKeyPair,
}

impl FileSigner {
    fn new(kid: &str, kp: &ES256KeyPair) -> Result<FileSigner> {
        let key = ring::signature::EcdsaKeyPair::from_private_key_and_public_key(
            &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            &kp.to_bytes(),
            &kp.public_key().public_key().to_bytes_uncompressed(),
            &*SIGN_RNG,
        )
        .map_err(|e| anyhow!("signing key rejected: {e}"))?;
        Ok(FileSigner { kid: kid.to_string(), key })
    }
}

impl Signer for FileSigner {
    fn kid(&self) -> &str {
        &self.kid
    }
    fn alg(&self) -> &'static str {
        "ES256"
    }
    fn sign(&self, signing_input: &[u8]) -> Result<Vec<u8>> {
        let sig = self.key.sign(&*SIGN_RNG, signing_input).map_err(|_| anyhow!("signing failed"))?;
        Ok(sig.as_ref().to_vec())
    }
}

/// Loaded keys: the signer and the published JWKS document.
pub struct KeySet {
    pub current_kid: String,
    signer: Arc<dyn Signer>,
    /// base64url of `{"alg":"ES256","typ":"JWT","kid":…}`.
    header_b64: String,
    /// Published kids, newest first.
    pub kids: Vec<String>,
    /// (kid, activation time in this process), newest first.
    pub schedule: Vec<(String, u64)>,
    /// When the signer changes next (a pending key's activation), if a key is pending.
    pub next_change: Option<u64>,
    /// `created` of the newest key (for scheduled rotation).
    pub newest_created: u64,
    /// `{"keys": [...]}`, serialized once.
    pub jwks: String,
    /// Published P-256 public keys (kid → uncompressed point), for verifying the minter's own
    /// tokens (Txn-Tokens) with any key still in the JWKS.
    verify_keys: HashMap<String, Vec<u8>>,
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

fn new_stored(now: u64, not_before: u64) -> Result<StoredKey> {
    let kp = ES256KeyPair::generate();
    let (x, y) = public_xy(&kp)?;
    Ok(StoredKey { kid: thumbprint(&x, &y), d: URL_SAFE_NO_PAD.encode(kp.to_bytes()), created: now, not_before: Some(not_before) })
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

/// Creates the key file with a first key (signing at once: nothing can have cached a JWKS yet)
/// if there is none.
pub fn ensure_created(state_dir: &Path) -> Result<()> {
    ensure_dir(state_dir)?;
    let path = key_path(state_dir);
    if !path.exists() {
        let now = crate::now();
        write_file(&path, &KeyFile { keys: vec![new_stored(now, now)?] })?;
    }
    Ok(())
}

/// When `kid` may sign in a process that first published it at `first_seen`:
/// its `not_before`, but never less than `publish_before_use_s` after `first_seen` unless it
/// was already signing that long before (a restart does not re-delay a settled key).
fn activation(not_before: u64, first_seen: u64, publish_before_use_s: u64) -> u64 {
    if not_before.saturating_add(publish_before_use_s) <= first_seen {
        not_before
    } else {
        not_before.max(first_seen.saturating_add(publish_before_use_s))
    }
}

/// Loads the key file. `seen` maps kid → when this process first published it (updated here);
/// activation times follow [`activation`].
pub fn load(state_dir: &Path, policy: &Policy, seen: &mut HashMap<String, u64>, now: u64) -> Result<KeySet> {
    let path = key_path(state_dir);
    let kf = read_file(&path)?;
    let modified = std::fs::metadata(&path).and_then(|m| m.modified()).ok();
    build(&kf, modified, policy, seen, now)
}

/// A stored key as a row of the shared store: (kid, d, created, not_before).
pub type KeyRow = (String, String, u64, Option<u64>);

fn from_rows(rows: Vec<KeyRow>) -> KeyFile {
    KeyFile { keys: rows.into_iter().map(|(kid, d, created, not_before)| StoredKey { kid, d, created, not_before }).collect() }
}

fn to_rows(kf: KeyFile) -> Vec<KeyRow> {
    kf.keys.into_iter().map(|k| (k.kid, k.d, k.created, k.not_before)).collect()
}

/// Loads keys held in the shared store (oldest first), like [`load`] does the key file.
pub fn load_rows(rows: Vec<KeyRow>, policy: &Policy, seen: &mut HashMap<String, u64>, now: u64) -> Result<KeySet> {
    if rows.is_empty() {
        bail!("the store holds no signing key");
    }
    build(&from_rows(rows), None, policy, seen, now)
}

/// A first key for an empty shared store (signing at once, like [`ensure_created`]).
pub fn first_row(now: u64) -> Result<KeyRow> {
    let k = new_stored(now, now)?;
    Ok((k.kid, k.d, k.created, k.not_before))
}

/// [`rotate_at`] on keys held in the shared store: the new rows and what was done.
pub fn rotate_rows(rows: Vec<KeyRow>, policy: &Policy, now: u64) -> Result<(Vec<KeyRow>, Rotated)> {
    let mut kf = from_rows(rows);
    let r = rotate_kf(&mut kf, policy, now)?;
    Ok((to_rows(kf), r))
}

fn build(kf: &KeyFile, modified: Option<SystemTime>, policy: &Policy, seen: &mut HashMap<String, u64>, now: u64) -> Result<KeySet> {
    let mut jwk_list = Vec::new();
    let mut kids = Vec::new();
    let mut schedule = Vec::new();
    let mut pairs = Vec::new();
    for k in kf.keys.iter().rev() {
        let d = URL_SAFE_NO_PAD.decode(&k.d).context("bad key encoding")?;
        let kp = ES256KeyPair::from_bytes(&d).map_err(|e| anyhow!("bad key {}: {e}", k.kid))?;
        let (x, y) = public_xy(&kp)?;
        jwk_list.push(serde_json::json!({"kty": "EC", "crv": "P-256", "kid": k.kid, "alg": "ES256", "use": "sig", "x": x, "y": y}));
        kids.push(k.kid.clone());
        // `now` is whole seconds, rounded down: count publication from the next second, so a
        // key is never published for less than `publish_before_use_s` of real time.
        let first_seen = *seen.entry(k.kid.clone()).or_insert(now.saturating_add(1));
        schedule.push((k.kid.clone(), activation(k.not_before(), first_seen, policy.publish_before_use_s)));
        pairs.push(kp);
    }
    seen.retain(|kid, _| kids.contains(kid));
    // Newest active key; with none active (a first key, or a restart right after one was
    // generated) the one that activates first.
    let chosen = schedule
        .iter()
        .position(|(_, at)| *at <= now)
        .or_else(|| schedule.iter().enumerate().min_by_key(|(i, (_, at))| (*at, *i)).map(|(i, _)| i))
        .ok_or_else(|| anyhow!("no signing key"))?;
    let next_change = schedule.iter().take(chosen).map(|(_, at)| *at).filter(|at| *at > now).min();
    let (kid, kp) = schedule.get(chosen).map(|(k, _)| k.clone()).zip(pairs.get(chosen)).ok_or_else(|| anyhow!("no signing key"))?;
    let signer: Arc<dyn Signer> = Arc::new(FileSigner::new(&kid, kp)?);
    let newest_created = kf.keys.last().map_or(0, |k| k.created);
    let mut set = KeySet::with_signer(signer, jwk_list, modified);
    set.kids = kids;
    set.schedule = schedule;
    set.next_change = next_change;
    set.newest_created = newest_created;
    Ok(set)
}

impl KeySet {
    /// A key set around any [`Signer`] (an external one, for instance): `jwks` are the public
    /// keys to publish, which must include the signer's `kid`.
    pub fn with_signer(signer: Arc<dyn Signer>, jwks: Vec<serde_json::Value>, modified: Option<SystemTime>) -> KeySet {
        let current_kid = signer.kid().to_string();
        let header = serde_json::json!({"alg": signer.alg(), "typ": "JWT", "kid": current_kid});
        let header_b64 = URL_SAFE_NO_PAD.encode(header.to_string());
        let kids = jwks.iter().filter_map(|k| k.get("kid").and_then(|v| v.as_str()).map(str::to_string)).collect();
        let verify_keys = jwks.iter().filter_map(p256_point).collect();
        KeySet {
            current_kid,
            signer,
            header_b64,
            kids,
            schedule: Vec::new(),
            next_change: None,
            newest_created: 0,
            jwks: serde_json::json!({ "keys": jwks }).to_string(),
            verify_keys,
            modified,
        }
    }

    /// A compact JWS over `claims` with the current key and the JOSE `typ` given
    /// (e.g. `txntoken+jwt`).
    pub fn sign_typed<T: Serialize>(&self, claims: &T, typ: &str) -> Result<String> {
        let header = serde_json::json!({"alg": self.signer.alg(), "typ": typ, "kid": self.current_kid});
        let mut out = URL_SAFE_NO_PAD.encode(header.to_string());
        out.push('.');
        URL_SAFE_NO_PAD.encode_string(serde_json::to_vec(claims)?, &mut out);
        let sig = self.signer.sign(out.as_bytes())?;
        out.push('.');
        URL_SAFE_NO_PAD.encode_string(&sig, &mut out);
        Ok(out)
    }

    /// Whether `signature` (ES256, `r || s`) over `signing_input` verifies with the published
    /// key `kid`. Unknown kids and non-P-256 keys never verify.
    pub fn verify_es256(&self, kid: &str, signing_input: &[u8], signature: &[u8]) -> bool {
        self.verify_keys.get(kid).is_some_and(|point| {
            ring::signature::UnparsedPublicKey::new(&ring::signature::ECDSA_P256_SHA256_FIXED, point)
                .verify(signing_input, signature)
                .is_ok()
        })
    }

    /// A compact JWS over `claims` with the current key.
    pub fn sign_jwt<T: Serialize>(&self, claims: &T) -> Result<String> {
        let payload = serde_json::to_vec(claims)?;
        let mut out = String::with_capacity(self.header_b64.len() + payload.len() * 4 / 3 + 96);
        out.push_str(&self.header_b64);
        out.push('.');
        URL_SAFE_NO_PAD.encode_string(&payload, &mut out);
        let sig = self.signer.sign(out.as_bytes())?;
        out.push('.');
        URL_SAFE_NO_PAD.encode_string(&sig, &mut out);
        Ok(out)
    }
}

/// (kid, uncompressed point) of a published P-256 JWK.
fn p256_point(jwk: &serde_json::Value) -> Option<(String, Vec<u8>)> {
    let s = |k: &str| jwk.get(k).and_then(|v| v.as_str());
    if s("kty") != Some("EC") || s("crv") != Some("P-256") {
        return None;
    }
    let x = URL_SAFE_NO_PAD.decode(s("x")?).ok().filter(|x| x.len() == 32)?;
    let y = URL_SAFE_NO_PAD.decode(s("y")?).ok().filter(|y| y.len() == 32)?;
    let mut point = Vec::with_capacity(65);
    point.push(4);
    point.extend_from_slice(&x);
    point.extend_from_slice(&y);
    Some((s("kid")?.to_string(), point))
}

static SIGN_RNG: std::sync::LazyLock<ring::rand::SystemRandom> = std::sync::LazyLock::new(ring::rand::SystemRandom::new);

/// What `rotate` did.
#[derive(Debug, Clone, Serialize)]
pub struct Rotated {
    /// The new (pending) key.
    pub kid: String,
    /// Unix time from which it signs.
    pub not_before: u64,
    /// Every key now in the file (published), newest first.
    pub published: Vec<String>,
    /// Keys dropped because their successors have signed long enough.
    pub dropped: Vec<String>,
}

/// Adds a new pending key: published at once, signing from
/// `now + publish_before_use_s + notice_slack_s`. Drops the oldest keys beyond `keep` whose
/// successor has signed for `retire_after_s`; never fewer than `keep` keys, never a key a
/// live token may still need.
pub fn rotate(state_dir: &Path, policy: &Policy) -> Result<Rotated> {
    rotate_at(state_dir, policy, crate::now())
}

pub fn rotate_at(state_dir: &Path, policy: &Policy, now: u64) -> Result<Rotated> {
    ensure_dir(state_dir)?;
    let path = key_path(state_dir);
    let mut kf = if path.exists() { read_file(&path)? } else { KeyFile::default() };
    let r = rotate_kf(&mut kf, policy, now)?;
    write_file(&path, &kf)?;
    Ok(r)
}

fn rotate_kf(kf: &mut KeyFile, policy: &Policy, now: u64) -> Result<Rotated> {
    let not_before = now.saturating_add(policy.publish_before_use_s).saturating_add(policy.notice_slack_s);
    let k = new_stored(now, not_before)?;
    let kid = k.kid.clone();
    kf.keys.push(k);
    let mut dropped = Vec::new();
    while kf.keys.len() > policy.keep.max(MIN_KEYS_KEPT) {
        let successor_settled =
            kf.keys.get(1).is_some_and(|s| s.not_before().saturating_add(policy.retire_after_s) <= now);
        if !successor_settled {
            break;
        }
        dropped.push(kf.keys.remove(0).kid);
    }
    Ok(Rotated { kid, not_before, published: kf.keys.iter().rev().map(|k| k.kid.clone()).collect(), dropped })
}

pub fn modified(state_dir: &Path) -> Option<SystemTime> {
    std::fs::metadata(key_path(state_dir)).and_then(|m| m.modified()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        Policy { publish_before_use_s: 300, keep: 3, retire_after_s: 600, notice_slack_s: 2 }
    }

    #[test]
    fn a_new_key_signs_only_after_one_publication_period() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        ensure_created(dir.path()).unwrap_or_else(|e| panic!("{e}"));
        let p = policy();
        let t0 = crate::now();
        let mut seen = HashMap::new();
        let first = load(dir.path(), &p, &mut seen, t0).unwrap_or_else(|e| panic!("{e}"));
        let r = rotate_at(dir.path(), &p, t0).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(r.not_before, t0 + 302);
        let ks = load(dir.path(), &p, &mut seen, t0 + 1).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(ks.kids.first(), Some(&r.kid), "published at once");
        assert_eq!(ks.current_kid, first.current_kid, "but not signing yet");
        assert_eq!(ks.next_change, Some(t0 + 302));
        let later = load(dir.path(), &p, &mut seen, t0 + 302).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(later.current_kid, r.kid);
    }

    #[test]
    fn typed_tokens_verify_with_any_published_key_only() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        ensure_created(dir.path()).unwrap_or_else(|e| panic!("{e}"));
        let ks = load(dir.path(), &policy(), &mut HashMap::new(), crate::now()).unwrap_or_else(|e| panic!("{e}"));
        let tok = ks.sign_typed(&serde_json::json!({"a": 1}), "txntoken+jwt").unwrap_or_else(|e| panic!("{e}"));
        let (input, sig) = tok.rsplit_once('.').unwrap_or_else(|| panic!("{tok}"));
        let sig = URL_SAFE_NO_PAD.decode(sig).unwrap_or_else(|e| panic!("{e}"));
        let header: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(tok.split('.').next().unwrap_or("")).unwrap_or_default()).unwrap_or_default();
        assert_eq!(header, serde_json::json!({"alg": "ES256", "typ": "txntoken+jwt", "kid": ks.current_kid}));
        assert!(ks.verify_es256(&ks.current_kid, input.as_bytes(), &sig));
        assert!(!ks.verify_es256("other", input.as_bytes(), &sig), "unknown kid");
        assert!(!ks.verify_es256(&ks.current_kid, b"x.y", &sig), "other input");
        assert!(!ks.verify_es256(&ks.current_kid, input.as_bytes(), &sig[..63]), "short signature");
    }

    #[test]
    fn a_key_first_seen_late_is_still_published_for_a_full_period() {
        // Someone installs a key file whose pending key is due now: this process has not
        // published it yet, so it waits one publication period from now.
        assert_eq!(activation(100, 100, 300), 400);
        assert_eq!(activation(100, 90, 300), 390);
        assert_eq!(activation(100, 500, 300), 100, "settled keys are not re-delayed");
    }

    #[test]
    fn keys_are_dropped_only_after_their_successor_settled() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        ensure_created(dir.path()).unwrap_or_else(|e| panic!("{e}"));
        let p = policy();
        let t0 = crate::now();
        for i in 0..4 {
            let r = rotate_at(dir.path(), &p, t0 + i).unwrap_or_else(|e| panic!("{e}"));
            assert!(r.dropped.is_empty(), "a key dropped while its successor is pending");
        }
        let r = rotate_at(dir.path(), &p, t0 + 10_000).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(r.published.len(), 3);
        assert_eq!(r.dropped.len(), 3);
    }
}
