//! Signature checks delegated to the proxy's own crypto (Envoy's `verify_signature`
//! foreign function, BoringSSL), about 15x faster than pure-Rust P-256 in wasm.
//!
//! The core stays host-independent: it builds the request bytes and reads the answer; the
//! shell moves them. Every claim check still happens in the filter; only the signature
//! arithmetic moves. The shell enables this only after a self-test with a known-good and a
//! known-bad signature, and any unexpected answer falls back to the pure-Rust verifier.

/// Appends a length-delimited protobuf field.
fn field(out: &mut Vec<u8>, number: u8, value: &[u8]) {
    out.push((number << 3) | 2);
    let mut n = value.len();
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
    out.extend_from_slice(value);
}

/// `VerifySignatureArguments { hash_function, public_key (DER SPKI), signature, text }`.
pub fn request(hash: &str, spki: &[u8], signature: &[u8], text: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + spki.len() + signature.len() + text.len());
    field(&mut out, 1, hash.as_bytes());
    field(&mut out, 2, spki);
    field(&mut out, 3, signature);
    field(&mut out, 4, text);
    out
}

/// `VerifySignatureResult { result: bool = 1; error: string = 2 }`: valid only for `result = true`.
pub fn answer_is_valid(answer: &[u8]) -> bool {
    answer.starts_with(&[0x08, 0x01])
}

fn der_len(out: &mut Vec<u8>, n: usize) {
    if n < 0x80 {
        out.push(n as u8);
    } else if n < 0x100 {
        out.extend_from_slice(&[0x81, n as u8]);
    } else {
        out.extend_from_slice(&[0x82, (n >> 8) as u8, n as u8]);
    }
}

fn der(out: &mut Vec<u8>, tag: u8, body: &[u8]) {
    out.push(tag);
    der_len(out, body.len());
    out.extend_from_slice(body);
}

/// A DER INTEGER for an unsigned big-endian value (leading zeros trimmed, sign byte added).
fn der_uint(out: &mut Vec<u8>, v: &[u8]) {
    let start = v.iter().position(|b| *b != 0).unwrap_or(v.len().saturating_sub(1));
    let v = v.get(start..).unwrap_or(&[]);
    let mut body = Vec::with_capacity(v.len() + 1);
    if v.first().is_none_or(|b| b & 0x80 != 0) {
        body.push(0);
    }
    body.extend_from_slice(v);
    der(out, 0x02, &body);
}

/// SubjectPublicKeyInfo for an EC point: `SEQUENCE { SEQUENCE { id-ecPublicKey, curve },
/// BIT STRING (0x04 || x || y) }`, `alg` being the encoded inner SEQUENCE.
fn spki_ec(alg: &[u8], x: &[u8], y: &[u8]) -> Vec<u8> {
    let mut bits = Vec::with_capacity(2 + x.len() + y.len());
    bits.push(0);
    bits.push(0x04);
    bits.extend_from_slice(x);
    bits.extend_from_slice(y);
    let mut body = alg.to_vec();
    der(&mut body, 0x03, &bits);
    let mut out = Vec::with_capacity(body.len() + 4);
    der(&mut out, 0x30, &body);
    out
}

/// SubjectPublicKeyInfo for a P-256 point (`x`, `y` 32 bytes each).
pub fn spki_p256(x: &[u8], y: &[u8]) -> Vec<u8> {
    // { id-ecPublicKey 1.2.840.10045.2.1, prime256v1 1.2.840.10045.3.1.7 }
    const ALG: [u8; 21] = [
        0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce,
        0x3d, 0x03, 0x01, 0x07,
    ];
    spki_ec(&ALG, x, y)
}

/// SubjectPublicKeyInfo for a P-384 point (`x`, `y` 48 bytes each).
pub fn spki_p384(x: &[u8], y: &[u8]) -> Vec<u8> {
    // { id-ecPublicKey 1.2.840.10045.2.1, secp384r1 1.3.132.0.34 }
    const ALG: [u8; 18] =
        [0x30, 0x10, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22];
    spki_ec(&ALG, x, y)
}

/// SubjectPublicKeyInfo for an RSA key (`n`, `e` big-endian).
pub fn spki_rsa(n: &[u8], e: &[u8]) -> Vec<u8> {
    // SEQUENCE { SEQUENCE { rsaEncryption, NULL }, BIT STRING (RSAPublicKey) }
    const ALG: [u8; 15] = [0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01, 0x05, 0x00];
    let mut ints = Vec::with_capacity(n.len() + e.len() + 8);
    der_uint(&mut ints, n);
    der_uint(&mut ints, e);
    let mut rsa_key = Vec::with_capacity(ints.len() + 4);
    der(&mut rsa_key, 0x30, &ints);
    let mut bits = Vec::with_capacity(rsa_key.len() + 1);
    bits.push(0);
    bits.extend_from_slice(&rsa_key);
    let mut body = ALG.to_vec();
    der(&mut body, 0x03, &bits);
    let mut out = Vec::with_capacity(body.len() + 4);
    der(&mut out, 0x30, &body);
    out
}

/// JWS `r || s` (64 bytes for ES256, 96 for ES384) as a DER ECDSA-Sig-Value; `None` when
/// the length is not `2 * scalar_len`.
pub fn ecdsa_sig_der(raw: &[u8], scalar_len: usize) -> Option<Vec<u8>> {
    if raw.len() != 2 * scalar_len {
        return None;
    }
    let (r, s) = raw.split_at(scalar_len);
    let mut ints = Vec::with_capacity(2 * scalar_len + 8);
    der_uint(&mut ints, r);
    der_uint(&mut ints, s);
    let mut out = Vec::with_capacity(ints.len() + 2);
    der(&mut out, 0x30, &ints);
    Some(out)
}

const SELF_TEST_MESSAGE: &[u8] = b"mandate host crypto self-test";
// A P-256 key and an ES256 (r || s) signature of the message above, made with openssl.
const SELF_TEST_X: [u8; 32] = [0xcb, 0xad, 0x3e, 0xa5, 0xdf, 0x73, 0xf1, 0xcd, 0x1e, 0x97, 0x8a, 0xf4, 0x4d, 0xb7, 0x58, 0x86, 0x1d, 0x46, 0x4b, 0xdc, 0x71, 0x7f, 0x58, 0x8e, 0x60, 0x3d, 0xa6, 0xe2, 0x11, 0x97, 0x27, 0x39];
const SELF_TEST_Y: [u8; 32] = [0x5b, 0x39, 0xc6, 0x4e, 0x12, 0x9d, 0xd6, 0x1e, 0xfe, 0x8a, 0x29, 0x8f, 0x26, 0x61, 0xc7, 0xd4, 0xff, 0x67, 0x06, 0x06, 0xac, 0xd4, 0x09, 0x99, 0xc3, 0x0e, 0x6f, 0x0b, 0x36, 0xed, 0xdf, 0x52];
const SELF_TEST_SIG: [u8; 64] = [0x53, 0x43, 0x51, 0x38, 0x77, 0xfe, 0x97, 0xcc, 0x11, 0x1c, 0x2c, 0x23, 0x01, 0x38, 0x5c, 0xe4, 0x18, 0x8d, 0x11, 0xc1, 0x5d, 0x09, 0xd2, 0x71, 0x6f, 0x83, 0x5c, 0x9e, 0x5c, 0x16, 0x54, 0x02, 0x69, 0xf3, 0xf3, 0x1c, 0xa2, 0xe2, 0x80, 0x50, 0xf6, 0x65, 0xe0, 0xc1, 0xd8, 0xac, 0xb1, 0x29, 0xe7, 0x05, 0x85, 0x7a, 0x90, 0x82, 0x15, 0x9f, 0x38, 0xa9, 0xea, 0xa3, 0xca, 0xcf, 0x7f, 0x61];

/// True only if the host accepts a known-good signature and refuses the same signature with
/// one bit flipped: a host that says yes to everything (or cannot answer) is never trusted.
pub fn self_test(host: &dyn Fn(&[u8]) -> Option<Vec<u8>>) -> bool {
    let spki = spki_p256(&SELF_TEST_X, &SELF_TEST_Y);
    let Some(good) = ecdsa_sig_der(&SELF_TEST_SIG, 32) else { return false };
    let mut flipped = SELF_TEST_SIG;
    if let Some(b) = flipped.get_mut(40) {
        *b ^= 0x01;
    }
    let Some(bad) = ecdsa_sig_der(&flipped, 32) else { return false };
    let accepts = host(&request("sha256", &spki, &good, SELF_TEST_MESSAGE)).is_some_and(|a| answer_is_valid(&a));
    let refuses = host(&request("sha256", &spki, &bad, SELF_TEST_MESSAGE)).is_some_and(|a| !answer_is_valid(&a));
    accepts && refuses
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::testkit::TestKey;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine as _;
    use p256::pkcs8::DecodePublicKey;

    fn b64d(v: &serde_json::Value) -> Vec<u8> {
        URL_SAFE_NO_PAD.decode(v.as_str().unwrap()).unwrap()
    }

    #[test]
    fn p256_spki_is_what_a_der_parser_reads() {
        let k = TestKey::es256("k");
        let jwk = k.jwk();
        let spki = spki_p256(&b64d(&jwk["x"]), &b64d(&jwk["y"]));
        let parsed = p256::PublicKey::from_public_key_der(&spki).unwrap();
        assert_eq!(parsed.to_sec1_bytes().len(), 65);
    }

    #[test]
    fn rsa_spki_is_what_a_der_parser_reads() {
        let k = TestKey::rsa("r", 0);
        let jwk = k.jwk();
        let spki = spki_rsa(&b64d(&jwk["n"]), &b64d(&jwk["e"]));
        rsa::RsaPublicKey::from_public_key_der(&spki).unwrap();
    }

    #[test]
    fn ecdsa_signature_converts_to_der_that_verifies() {
        use p256::ecdsa::signature::Verifier as _;
        let k = TestKey::es256("k");
        let sig = k.signature("ES256", b"hello");
        let der = ecdsa_sig_der(&sig, 32).unwrap();
        let parsed = p256::ecdsa::Signature::from_der(&der).unwrap();
        let jwk = k.jwk();
        let spki = spki_p256(&b64d(&jwk["x"]), &b64d(&jwk["y"]));
        let vk = p256::ecdsa::VerifyingKey::from_public_key_der(&spki).unwrap();
        assert!(vk.verify(b"hello", &parsed).is_ok());
        assert!(ecdsa_sig_der(&sig[..63], 32).is_none(), "truncated signature");
        assert!(ecdsa_sig_der(&[0u8; 65], 32).is_none(), "overlong signature");
        assert!(ecdsa_sig_der(&sig, 48).is_none(), "an ES256 signature is not an ES384 one");
    }

    /// A stand-in for Envoy's `verify_signature`: decodes the request and verifies natively.
    pub(crate) fn fake_envoy(req: &[u8]) -> Option<Vec<u8>> {
        use p256::ecdsa::signature::Verifier as _;
        let mut fields: Vec<Vec<u8>> = Vec::new();
        let mut i = 0;
        while i < req.len() {
            i += 1;
            let (mut n, mut shift) = (0usize, 0);
            loop {
                let b = req[i];
                i += 1;
                n |= usize::from(b & 0x7f) << shift;
                shift += 7;
                if b < 0x80 {
                    break;
                }
            }
            fields.push(req[i..i + n].to_vec());
            i += n;
        }
        let [hash, spki, sig, text] = fields.as_slice() else { return None };
        let ok = if let Ok(vk) = p256::ecdsa::VerifyingKey::from_public_key_der(spki) {
            hash == b"sha256" && p256::ecdsa::Signature::from_der(sig).is_ok_and(|s| vk.verify(text, &s).is_ok())
        } else if let Ok(vk) = p384::ecdsa::VerifyingKey::from_public_key_der(spki) {
            use p384::ecdsa::signature::Verifier as _;
            hash == b"sha384" && p384::ecdsa::Signature::from_der(sig).is_ok_and(|s| vk.verify(text, &s).is_ok())
        } else {
            use rsa::signature::Verifier as _;
            let pk = rsa::RsaPublicKey::from_public_key_der(spki).ok()?;
            let sig = rsa::pkcs1v15::Signature::try_from(sig.as_slice()).ok()?;
            match hash.as_slice() {
                b"sha256" => rsa::pkcs1v15::VerifyingKey::<sha2::Sha256>::new(pk).verify(text, &sig).is_ok(),
                b"sha384" => rsa::pkcs1v15::VerifyingKey::<sha2::Sha384>::new(pk).verify(text, &sig).is_ok(),
                b"sha512" => rsa::pkcs1v15::VerifyingKey::<sha2::Sha512>::new(pk).verify(text, &sig).is_ok(),
                _ => return None,
            }
        };
        Some(vec![0x08, u8::from(ok)])
    }

    #[test]
    fn self_test_vector_is_genuine_and_the_check_is_strict() {
        assert!(self_test(&fake_envoy), "a correct host passes");
        assert!(!self_test(&|_| Some(vec![0x08, 0x01])), "a host that accepts everything fails");
        assert!(!self_test(&|_| None), "a host that cannot answer fails");
        assert!(!self_test(&|_| Some(vec![0x08, 0x00])), "a host that refuses everything fails");
    }

    #[test]
    fn request_encodes_four_length_delimited_fields() {
        let r = request("sha256", &[1, 2], &[3], &[0x55; 200]);
        assert_eq!(&r[..8], &[0x0a, 6, b's', b'h', b'a', b'2', b'5', b'6']);
        assert_eq!(&r[8..12], &[0x12, 2, 1, 2]);
        assert_eq!(&r[12..15], &[0x1a, 1, 3]);
        assert_eq!(&r[15..18], &[0x22, 0xc8, 0x01], "varint length 200");
        assert!(answer_is_valid(&[0x08, 0x01]));
        assert!(!answer_is_valid(&[0x08, 0x00]) && !answer_is_valid(&[]) && !answer_is_valid(&[0x12, 0x01, b'x']));
    }
}
