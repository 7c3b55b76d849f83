//! rustls server configuration (ring provider) and client-certificate identity.

use crate::config::TlsConfig;
use anyhow::{anyhow, Context, Result};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use std::sync::Arc;

pub fn server_config(tls: &TlsConfig) -> Result<Arc<ServerConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&tls.cert)
        .with_context(|| format!("reading {}", tls.cert.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("parsing {}", tls.cert.display()))?;
    if certs.is_empty() {
        return Err(anyhow!("{} holds no certificate", tls.cert.display()));
    }
    let key = PrivateKeyDer::from_pem_file(&tls.key).with_context(|| format!("reading key {}", tls.key.display()))?;
    let builder = ServerConfig::builder_with_provider(provider.clone()).with_safe_default_protocol_versions()?;
    let builder = match &tls.client_ca {
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for c in CertificateDer::pem_file_iter(ca).with_context(|| format!("reading {}", ca.display()))? {
                roots.add(c.with_context(|| format!("parsing {}", ca.display()))?)?;
            }
            // Certificates are verified in the handshake when presented; a
            // connection without one is let through to HTTP, where every
            // authenticated endpoint answers 401 `invalid_client` (the JWKS and
            // health endpoints stay reachable for resource servers).
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .allow_unauthenticated()
                .build()
                .map_err(|e| anyhow!("client CA: {e}"))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut cfg = builder.with_single_cert(certs, key).map_err(|e| anyhow!("server certificate/key: {e}"))?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// The identity in a (verified) client certificate: first URI SAN (e.g. a
/// SPIFFE ID), else first DNS SAN, else the subject CN.
pub fn cert_identity(der: &[u8]) -> Option<String> {
    use x509_parser::extensions::GeneralName;
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        let names = &san.value.general_names;
        if let Some(uri) = names.iter().find_map(|n| if let GeneralName::URI(u) = n { Some(*u) } else { None }) {
            return Some(uri.to_string());
        }
        if let Some(dns) = names.iter().find_map(|n| if let GeneralName::DNSName(d) = n { Some(*d) } else { None }) {
            return Some(dns.to_string());
        }
    }
    let cn = cert.subject().iter_common_name().next()?.as_str().ok()?.to_string();
    Some(cn)
}
