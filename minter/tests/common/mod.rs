//! Shared setup for the minter's HTTP tests (`http.rs`, `trust.rs`, `conformance.rs`): a temp
//! state dir with a trust-domain key and the base configuration, a started minter, plain HTTP
//! requests with their answers, JWT decoding, and a test PKI with HTTPS requests for the
//! mutual-TLS cases. Each test file uses what it needs.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use mandate_minter::config::MinterConfig;
use mandate_minter::Handle;
use mandate_core::testkit::{spiffe_bundle, svid_claims, TestKey};
use rcgen::{Issuer, KeyPair};
use serde_json::{json, Value};

pub const SUB: &str = "spiffe://example.org/agent/alice";
pub const ACTOR: &str = "spiffe://example.org/orchestrator/o1";

pub fn now() -> u64 {
    mandate_minter::now()
}

/// A temp state dir and the `example.org` trust domain's signing key.
pub struct Env {
    pub dir: tempfile::TempDir,
    pub key: TestKey,
}

impl Env {
    pub fn new() -> Env {
        Env { dir: tempfile::tempdir().unwrap(), key: TestKey::es256("td-key-1") }
    }

    /// A production-shaped configuration: registered tasks required; no client auth yet.
    pub fn base(&self) -> Value {
        json!({
            "listen": "127.0.0.1:0",
            "issuer": "https://minter.test",
            "state_dir": self.dir.path().join("state"),
            "workers": 1,
            "log_level": "off",
            "identity": {
                "audiences": ["mandate-minter"],
                "trust_domains": [{"name": "example.org", "bundle": {"inline": spiffe_bundle(&[&self.key], None)}}]
            },
            "audiences": {"example.org": ["payments-api", "crm", "legacy-crm"]},
            "scopes": {"payments-api": ["payments:read"]},
            "ttl": {"default_s": 120, "max_s": 300}
        })
    }

    /// Dev mode: the loopback client has every role.
    pub fn dev(&self) -> Value {
        let mut c = self.base();
        c["dev"] = json!(true);
        c
    }

    /// Writes `contents` to `name` in the temp dir; returns its path.
    pub fn file(&self, name: &str, contents: &str) -> std::path::PathBuf {
        let p = self.dir.path().join(name);
        std::fs::write(&p, contents).unwrap();
        p
    }

    /// The `tls` section serving `pki`'s server certificate and asking for client
    /// certificates from its CA (files written to the temp dir).
    pub fn tls(&self, pki: &Pki) -> Value {
        json!({
            "cert": self.file("server.pem", &pki.server_cert_pem),
            "key": self.file("server.key", &pki.server_key_pem),
            "client_ca": self.file("ca.pem", &pki.ca_pem)
        })
    }

    /// A JWT-SVID for `sub`, addressed to the minter, valid for `ttl` seconds.
    pub fn svid(&self, sub: &str, ttl: u64) -> String {
        let n = now();
        self.key.sign(&svid_claims(sub, "mandate-minter", n, n + ttl))
    }
}

pub fn start(config: Value) -> Handle {
    mandate_minter::spawn(MinterConfig::from_json(config).unwrap()).unwrap()
}

pub fn agent() -> ureq::Agent {
    ureq::Agent::config_builder().http_status_as_error(false).build().into()
}

/// `Authorization: Basic` for a shared-secret client; both parts form-encoded (RFC 6749 §2.3.1).
pub fn basic(id: &str, secret: &str) -> String {
    use base64::engine::general_purpose::STANDARD;
    let enc = |s: &str| serde_urlencoded::to_string([("", s)]).unwrap().trim_start_matches('=').to_string();
    format!("Basic {}", STANDARD.encode(format!("{}:{}", enc(id), enc(secret))))
}

/// Status, JSON body (`Null` if not JSON), raw text and the headers the tests look at.
pub struct Answer {
    pub status: u16,
    pub body: Value,
    pub raw: String,
    pub content_type: String,
    pub cache: String,
    pub allow: Option<String>,
}

pub fn answer(resp: Result<ureq::http::Response<ureq::Body>, ureq::Error>) -> Answer {
    let mut resp = resp.unwrap();
    let h = |name: &str| resp.headers().get(name).map(|v| v.to_str().unwrap().to_string());
    let content_type = h("content-type").unwrap_or_default();
    let cache = h("cache-control").unwrap_or_default();
    let allow = h("allow");
    let status = resp.status().as_u16();
    let raw = resp.body_mut().read_to_string().unwrap_or_default();
    Answer { status, body: serde_json::from_str(&raw).unwrap_or(Value::Null), raw, content_type, cache, allow }
}

/// A request body: none (an empty form), form pairs, JSON, or raw bytes of a content type.
pub enum Body<'a> {
    None,
    Form(&'a [(&'a str, &'a str)]),
    Json(Value),
    Raw(&'a str, Vec<u8>),
}

/// One plain-HTTP request (`GET` sends no body; anything else is a POST) with an optional
/// `authorization` header.
pub fn request(h: &Handle, method: &str, path: &str, body: Body<'_>, auth: Option<&str>) -> Answer {
    let url = format!("{}{path}", h.base_url());
    if method == "GET" {
        let mut req = agent().get(&url);
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        return answer(req.call());
    }
    let mut req = agent().post(&url);
    if let Some(a) = auth {
        req = req.header("authorization", a);
    }
    const FORM: &str = "application/x-www-form-urlencoded";
    answer(match body {
        Body::None => req.header("content-type", FORM).send(""),
        Body::Form(pairs) => req.header("content-type", FORM).send(serde_urlencoded::to_string(pairs).unwrap()),
        Body::Json(v) => req.header("content-type", "application/json").send(v.to_string()),
        Body::Raw(content_type, bytes) => req.header("content-type", content_type).send(bytes),
    })
}

fn jwt_part(jwt: &str, i: usize) -> Value {
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(jwt.split('.').nth(i).unwrap()).unwrap()).unwrap()
}

/// The claims of a JWT (no verification).
pub fn claims_of(jwt: &str) -> Value {
    jwt_part(jwt, 1)
}

/// The JOSE header of a JWT.
pub fn header_of(jwt: &str) -> Value {
    jwt_part(jwt, 0)
}

/// A CA, a server certificate for `localhost` and 127.0.0.1, and the CA's issuer for client
/// certificates.
pub struct Pki {
    pub ca_pem: String,
    pub server_cert_pem: String,
    pub server_key_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

pub fn pki() -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyUsagePurpose, SanType};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, "mandate test CA");
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);

    let srv_key = KeyPair::generate().unwrap();
    let mut srv = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    srv.subject_alt_names.push(SanType::IpAddress(std::net::IpAddr::from([127, 0, 0, 1])));
    srv.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let srv_cert = srv.signed_by(&srv_key, &issuer).unwrap();
    Pki { ca_pem: ca_cert.pem(), server_cert_pem: srv_cert.pem(), server_key_pem: srv_key.serialize_pem(), issuer }
}

/// A client certificate and its key (DER).
pub type ClientCert = (Vec<u8>, Vec<u8>);

impl Pki {
    /// A client certificate from the CA with the URI SAN `uri`.
    pub fn client(&self, uri: &str) -> ClientCert {
        use rcgen::{CertificateParams, ExtendedKeyUsagePurpose, SanType};
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.subject_alt_names.push(SanType::URI(uri.try_into().unwrap()));
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let cert = p.signed_by(&key, &self.issuer).unwrap();
        (cert.der().to_vec(), key.serialize_der())
    }
}

/// One HTTPS request trusting only `pki`'s CA, presenting `client` if given; Err if the TLS
/// handshake or I/O fails.
pub fn https(h: &Handle, pki: &Pki, client: Option<&ClientCert>, method: &str, path: &str, content_type: &str, body: String) -> Result<(u16, Value), String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        roots.add(CertificateDer::from_pem_slice(pki.ca_pem.as_bytes()).unwrap()).unwrap();
        let b = rustls::ClientConfig::builder_with_provider(provider).with_safe_default_protocol_versions().unwrap().with_root_certificates(roots);
        let cfg = match client {
            Some((cert, key)) => b
                .with_client_auth_cert(vec![CertificateDer::from(cert.clone())], PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.clone())))
                .unwrap(),
            None => b.with_no_client_auth(),
        };
        let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg));
        let tcp = tokio::net::TcpStream::connect(h.addr).await.map_err(|e| e.to_string())?;
        let tls = connector.connect(ServerName::try_from("localhost").unwrap(), tcp).await.map_err(|e| e.to_string())?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls)).await.map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header("host", "localhost")
            .header("content-type", content_type)
            .body(http_body_util::Full::new(axum::body::Bytes::from(body)))
            .unwrap();
        let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status().as_u16();
        use http_body_util::BodyExt as _;
        let bytes = resp.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
        Ok((status, serde_json::from_slice(&bytes).unwrap_or(Value::Null)))
    })
}
