//! Client (proxy, orchestrator) authentication: loopback (dev only), HTTP
//! Basic shared secret, or mTLS; every client is named and has roles.

use crate::config::{ClientAuthConfig, ClientAuthMode, Role};
use crate::error::OAuthError;
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

/// Who is on the other end of a connection (a request extension).
#[derive(Debug, Clone)]
pub struct Peer {
    pub addr: SocketAddr,
    /// Identity of a verified TLS client certificate (URI SAN, else DNS SAN, else CN).
    pub cert_identity: Option<Arc<str>>,
}

/// A set of roles.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Roles(u8);

impl Roles {
    fn bit(r: Role) -> u8 {
        match r {
            Role::Mint => 1,
            Role::MintLegacy => 2,
            Role::Revoke => 4,
            Role::Feed => 8,
            Role::Tasks => 16,
            Role::Txn => 32,
        }
    }
    pub fn all() -> Roles {
        Roles::from_slice(&Role::ALL)
    }
    pub fn from_slice(roles: &[Role]) -> Roles {
        Roles(roles.iter().fold(0, |acc, r| acc | Roles::bit(*r)))
    }
    pub fn has(self, r: Role) -> bool {
        self.0 & Roles::bit(r) != 0
    }
}

/// An authenticated client.
#[derive(Debug, Clone)]
pub struct Client {
    pub client_id: String,
    pub roles: Roles,
    /// Audiences this client may obtain tokens for (None: any allowed by policy).
    pub audiences: Option<Arc<Vec<String>>>,
}

struct Known {
    secret_sha256: Option<[u8; 32]>,
    roles: Roles,
    audiences: Option<Arc<Vec<String>>>,
}

pub struct ClientAuth {
    mode: ClientAuthMode,
    clients: HashMap<String, Known>,
}

fn hex32(s: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    if s.len() != 64 {
        return None;
    }
    for (i, chunk) in s.as_bytes().chunks(2).enumerate() {
        let hi = (*chunk.first()? as char).to_digit(16)?;
        let lo = (*chunk.get(1)? as char).to_digit(16)?;
        *out.get_mut(i)? = (hi * 16 + lo) as u8;
    }
    Some(out)
}

/// Lowercase hex SHA-256, as stored in `secret_sha256`.
pub fn hash_secret(secret: &str) -> String {
    Sha256::digest(secret.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

fn ct_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b.iter()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// `application/x-www-form-urlencoded` decoding of a client id or secret (RFC 6749 §2.3.1).
fn form_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        match b {
            b'+' => out.push(b' '),
            b'%' => {
                let h = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(h, 16).ok()?);
                i += 2;
            }
            _ => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).ok()
}

fn parse_basic(headers: &axum::http::HeaderMap) -> Option<Result<(String, String), ()>> {
    let value = headers.get(axum::http::header::AUTHORIZATION)?;
    let parse = || -> Option<(String, String)> {
        let v = value.to_str().ok()?;
        let (scheme, rest) = v.split_once(' ')?;
        if !scheme.eq_ignore_ascii_case("basic") {
            return None;
        }
        let decoded = STANDARD.decode(rest.trim()).ok()?;
        let decoded = String::from_utf8(decoded).ok()?;
        let (id, secret) = decoded.split_once(':')?;
        Some((form_decode(id)?, form_decode(secret)?))
    };
    Some(parse().ok_or(()))
}

impl ClientAuth {
    pub fn new(cfg: &ClientAuthConfig) -> ClientAuth {
        let clients = cfg
            .clients
            .iter()
            .map(|c| {
                let known = Known {
                    secret_sha256: c.secret_sha256.as_deref().and_then(hex32),
                    roles: Roles::from_slice(&c.roles),
                    audiences: c.audiences.clone().map(Arc::new),
                };
                (c.client_id.clone(), known)
            })
            .collect();
        ClientAuth { mode: cfg.mode, clients }
    }

    pub fn mode(&self) -> ClientAuthMode {
        self.mode
    }

    pub fn authenticate(&self, peer: &Peer, headers: &axum::http::HeaderMap) -> Result<Client, OAuthError> {
        match self.mode {
            ClientAuthMode::NoneLoopback => {
                let ip = match peer.addr.ip() {
                    std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map(std::net::IpAddr::V4).unwrap_or(std::net::IpAddr::V6(v6)),
                    ip => ip,
                };
                if ip.is_loopback() {
                    Ok(Client { client_id: "loopback".into(), roles: Roles::all(), audiences: None })
                } else {
                    Err(OAuthError::invalid_client("only loopback clients are accepted in none_loopback mode"))
                }
            }
            ClientAuthMode::SharedSecret => {
                let (id, secret) = match parse_basic(headers) {
                    None => return Err(OAuthError::invalid_client("client authentication required (HTTP Basic)")),
                    Some(Err(())) => return Err(OAuthError::invalid_client("malformed Basic credentials")),
                    Some(Ok(pair)) => pair,
                };
                let presented: [u8; 32] = Sha256::digest(secret.as_bytes()).into();
                let known = self.clients.get(&id);
                let ok = known.and_then(|k| k.secret_sha256.as_ref()).is_some_and(|h| ct_eq(h, &presented));
                match (ok, known) {
                    (true, Some(k)) => Ok(Client { client_id: id, roles: k.roles, audiences: k.audiences.clone() }),
                    _ => Err(OAuthError::invalid_client("client authentication failed")),
                }
            }
            ClientAuthMode::Mtls => {
                let Some(identity) = peer.cert_identity.as_deref() else {
                    return Err(OAuthError::invalid_client("a client certificate is required"));
                };
                // Only named clients: a certificate from the CA alone grants nothing
                // (an agent may hold an X.509-SVID from the same CA).
                match self.clients.get(identity) {
                    Some(k) => Ok(Client { client_id: identity.to_string(), roles: k.roles, audiences: k.audiences.clone() }),
                    None => Err(OAuthError::invalid_client("client certificate identity not registered")),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn form_decoding() {
        assert_eq!(form_decode("a%3Ab+c").as_deref(), Some("a:b c"));
        assert_eq!(form_decode("%zz"), None);
        assert_eq!(form_decode("%4"), None);
    }

    #[test]
    fn role_sets() {
        let r = Roles::from_slice(&[Role::Mint, Role::Feed]);
        assert!(r.has(Role::Mint) && r.has(Role::Feed));
        assert!(!r.has(Role::MintLegacy) && !r.has(Role::Revoke) && !r.has(Role::Tasks));
        assert!(Role::ALL.iter().all(|x| Roles::all().has(*x)));
        assert!(!Roles::default().has(Role::Mint));
    }

    #[test]
    fn hex_parsing() {
        let h = hash_secret("s3cret");
        assert_eq!(hex32(&h).map(|b| b.to_vec()), Some(Sha256::digest(b"s3cret").to_vec()));
        assert_eq!(hex32("zz"), None);
    }
}
