//! Secrets the server keeps in its database but must not keep in clear: a capsule's envd
//! access token (the key to its guest agent) is stored sealed with ChaCha20-Poly1305,
//! under a key derived from the server's secret and bound to the capsule's id, so a
//! copy of the database alone opens no guest.

use base64::Engine;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305, NONCE_LEN};
use sha2::{Digest, Sha256};

/// Prefix of a sealed value (a value without it is a clear token from an older server).
const SEALED_V1: &str = "sealed1:";

/// Seals and opens envd tokens for their capsules.
pub struct TokenSealer {
    key: LessSafeKey,
}

impl std::fmt::Debug for TokenSealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenSealer(<redacted>)")
    }
}

/// A sealed value that does not open: another server secret, or tampering.
#[derive(Debug, thiserror::Error)]
#[error("a sealed envd token does not open with this server's secret")]
pub struct SealError;

impl TokenSealer {
    /// The key is derived from `server_secret` (the JWT secret every control plane of
    /// the deployment shares) and a purpose label.
    pub fn new(server_secret: &[u8]) -> Self {
        let mut h = Sha256::new();
        h.update(b"wrenn envd-token sealing v1\0");
        h.update(server_secret);
        let bytes: [u8; 32] = h.finalize().into();
        let key = UnboundKey::new(&CHACHA20_POLY1305, &bytes)
            .map(LessSafeKey::new)
            .unwrap_or_else(|_| unreachable!("a 32-byte key fits ChaCha20-Poly1305"));
        TokenSealer { key }
    }

    /// `token` sealed for capsule `capsule_id`.
    pub fn seal(&self, capsule_id: &str, token: &str) -> String {
        let nonce_bytes: [u8; NONCE_LEN] = rand::random();
        let mut data = token.as_bytes().to_vec();
        let sealed = self.key.seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce_bytes),
            Aad::from(capsule_id.as_bytes()),
            &mut data,
        );
        if sealed.is_err() {
            // Only a message beyond ChaCha20's 256 GiB limit fails; a token is tiny.
            unreachable!("sealing a token cannot fail");
        }
        let mut out = nonce_bytes.to_vec();
        out.extend_from_slice(&data);
        format!(
            "{SEALED_V1}{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(out)
        )
    }

    /// The clear token of a stored value (sealed, or clear from an older server).
    pub fn open(&self, capsule_id: &str, stored: &str) -> Result<String, SealError> {
        let Some(b64) = stored.strip_prefix(SEALED_V1) else {
            return Ok(stored.to_owned());
        };
        let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(b64)
            .map_err(|_| SealError)?;
        if raw.len() < NONCE_LEN {
            return Err(SealError);
        }
        let (nonce, rest) = raw.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| SealError)?;
        let mut data = rest.to_vec();
        let clear = self
            .key
            .open_in_place(nonce, Aad::from(capsule_id.as_bytes()), &mut data)
            .map_err(|_| SealError)?;
        String::from_utf8(clear.to_vec()).map_err(|_| SealError)
    }
}

/// Signs the short-lived URLs the server hands out for uploads it takes without an API
/// key (E2B's template files): HMAC-SHA256 under a key derived from the server's secret,
/// so every control plane of a deployment accepts what another signed.
pub struct UrlSigner {
    key: ring::hmac::Key,
}

impl std::fmt::Debug for UrlSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("UrlSigner(<redacted>)")
    }
}

impl UrlSigner {
    pub fn new(server_secret: &[u8]) -> Self {
        let mut h = Sha256::new();
        h.update(b"wrenn url signing v1\0");
        h.update(server_secret);
        let bytes: [u8; 32] = h.finalize().into();
        UrlSigner {
            key: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &bytes),
        }
    }

    /// The signature of `message` (URL-safe base64).
    pub fn sign(&self, message: &str) -> String {
        let tag = ring::hmac::sign(&self.key, message.as_bytes());
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(tag.as_ref())
    }

    /// Whether `signature` is this server's for `message` (compared in constant time).
    pub fn verify(&self, message: &str, signature: &str) -> bool {
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(signature)
            .is_ok_and(|tag| ring::hmac::verify(&self.key, message.as_bytes(), &tag).is_ok())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_tokens_open_only_for_their_capsule_and_secret() {
        let s = TokenSealer::new(b"secret-one-secret-one-secret-one");
        let sealed = s.seal("cl-1", "tok-abc");
        assert!(sealed.starts_with(SEALED_V1) && !sealed.contains("tok-abc"));
        assert_ne!(sealed, s.seal("cl-1", "tok-abc"), "fresh nonce each time");
        assert_eq!(s.open("cl-1", &sealed).expect("opens"), "tok-abc");
        assert!(s.open("cl-2", &sealed).is_err(), "bound to the capsule");
        let other = TokenSealer::new(b"secret-two-secret-two-secret-two");
        assert!(other.open("cl-1", &sealed).is_err(), "bound to the secret");
        assert_eq!(
            s.open("cl-1", "legacy-clear").expect("clear"),
            "legacy-clear"
        );
        assert!(s.open("cl-1", "sealed1:!!").is_err());
    }

    #[test]
    fn signed_urls_verify_only_unchanged_and_under_the_same_secret() {
        let a = UrlSigner::new(b"secret one");
        let sig = a.sign("team|hash|100");
        assert!(a.verify("team|hash|100", &sig));
        assert!(!a.verify("team|hash|101", &sig));
        assert!(!a.verify("team|hash|100", "not base64 !"));
        assert!(!UrlSigner::new(b"secret two").verify("team|hash|100", &sig));
    }
}
