//! Foreign functions the host offers, as Envoy does. Only `verify_signature` (Envoy's
//! BoringSSL-backed check, which mandate delegates ES256/RS* signatures to): a request
//! `VerifySignatureArguments { hash_function, public_key (DER SPKI), signature, text }`
//! answered with `VerifySignatureResult { result, error }`. ECDSA signatures are DER,
//! RSA is PKCS#1 v1.5, as with `EVP_DigestVerify`.

use p256::pkcs8::DecodePublicKey;
use rsa::signature::Verifier as _;

fn fields(req: &[u8]) -> Option<Vec<(u8, &[u8])>> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < req.len() {
        let tag = *req.get(i)?;
        i += 1;
        if tag & 7 != 2 {
            return None;
        }
        let (mut n, mut shift) = (0usize, 0u32);
        loop {
            let b = *req.get(i)?;
            i += 1;
            n |= usize::from(b & 0x7f).checked_shl(shift)?;
            shift += 7;
            if b < 0x80 {
                break;
            }
        }
        out.push((tag >> 3, req.get(i..i.checked_add(n)?)?));
        i += n;
    }
    Some(out)
}

fn result(ok: bool, error: &str) -> Vec<u8> {
    let mut out = vec![0x08, u8::from(ok)];
    if !error.is_empty() {
        out.push(0x12);
        out.push(error.len().min(127) as u8);
        out.extend_from_slice(&error.as_bytes()[..error.len().min(127)]);
    }
    out
}

/// `None` for a malformed request (Envoy answers with an error status then).
pub fn verify_signature(req: &[u8]) -> Option<Vec<u8>> {
    let f = fields(req)?;
    let get = |n: u8| f.iter().find(|(k, _)| *k == n).map(|(_, v)| *v);
    let (hash, key, sig, text) = (get(1)?, get(2)?, get(3)?, get(4)?);
    if let Ok(vk) = p256::ecdsa::VerifyingKey::from_public_key_der(key) {
        if hash != b"sha256" {
            return Some(result(false, "unsupported hash for P-256"));
        }
        let ok = p256::ecdsa::Signature::from_der(sig).is_ok_and(|s| {
            use p256::ecdsa::signature::Verifier as _;
            vk.verify(text, &s).is_ok()
        });
        return Some(verdict(ok));
    }
    if let Ok(vk) = p384::ecdsa::VerifyingKey::from_public_key_der(key) {
        if hash != b"sha384" {
            return Some(result(false, "unsupported hash for P-384"));
        }
        let ok = p384::ecdsa::Signature::from_der(sig).is_ok_and(|s| {
            use p384::ecdsa::signature::Verifier as _;
            vk.verify(text, &s).is_ok()
        });
        return Some(verdict(ok));
    }
    let pk = match rsa::RsaPublicKey::from_public_key_der(key) {
        Ok(pk) => pk,
        Err(_) => return Some(result(false, "Failed to initialize digest verify.")),
    };
    let Ok(sig) = rsa::pkcs1v15::Signature::try_from(sig) else {
        return Some(result(false, "bad signature"));
    };
    let ok = match hash {
        b"sha256" => rsa::pkcs1v15::VerifyingKey::<sha2::Sha256>::new(pk)
            .verify(text, &sig)
            .is_ok(),
        b"sha384" => rsa::pkcs1v15::VerifyingKey::<sha2::Sha384>::new(pk)
            .verify(text, &sig)
            .is_ok(),
        b"sha512" => rsa::pkcs1v15::VerifyingKey::<sha2::Sha512>::new(pk)
            .verify(text, &sig)
            .is_ok(),
        _ => return Some(result(false, "unknown is not supported.")),
    };
    Some(verdict(ok))
}

/// Envoy's answer for a completed check (its error text when the signature is wrong).
fn verdict(ok: bool) -> Vec<u8> {
    result(ok, if ok { "" } else { "Failed to verify digest. Error code: 0" })
}
