//! Secrets the server keeps in its database but must not keep in clear: a capsule's envd
//! access token (the key to its guest agent) is stored sealed with ChaCha20-Poly1305,
//! under a key derived from the server's secret and bound to the capsule's id, so a
//! copy of the database alone opens no guest; notification channels' settings (their
//! URLs and signing secrets) are sealed the same way with AES-256-GCM.

use base64::Engine;
use ring::aead::{
    Aad, Algorithm, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, CHACHA20_POLY1305, NONCE_LEN,
};
use sha2::{Digest, Sha256};

/// A 32-byte key for `purpose`, derived from the server's secret.
fn derive(purpose: &[u8], server_secret: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(purpose);
    h.update(server_secret);
    h.finalize().into()
}

fn aead_key(alg: &'static Algorithm, bytes: &[u8; 32]) -> LessSafeKey {
    UnboundKey::new(alg, bytes)
        .map(LessSafeKey::new)
        .unwrap_or_else(|_| unreachable!("a 32-byte key fits ChaCha20-Poly1305 and AES-256-GCM"))
}

/// `clear` sealed under `key` for `aad`: a fresh random nonce, then the ciphertext and
/// its tag, as URL-safe base64.
fn seal_bytes(key: &LessSafeKey, aad: &str, clear: &[u8]) -> String {
    let nonce_bytes: [u8; NONCE_LEN] = rand::random();
    let mut data = clear.to_vec();
    let sealed = key.seal_in_place_append_tag(
        Nonce::assume_unique_for_key(nonce_bytes),
        Aad::from(aad.as_bytes()),
        &mut data,
    );
    if sealed.is_err() {
        // Only a message beyond the algorithms' limits (GiBs) fails; these are tiny.
        unreachable!("sealing a small value cannot fail");
    }
    let mut out = nonce_bytes.to_vec();
    out.extend_from_slice(&data);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(out)
}

/// The clear bytes of what [`seal_bytes`] made with the same key and `aad`.
fn open_bytes(key: &LessSafeKey, aad: &str, b64: &str) -> Result<Vec<u8>, SealError> {
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(b64)
        .map_err(|_| SealError)?;
    if raw.len() < NONCE_LEN {
        return Err(SealError);
    }
    let (nonce, rest) = raw.split_at(NONCE_LEN);
    let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| SealError)?;
    let mut data = rest.to_vec();
    let clear = key
        .open_in_place(nonce, Aad::from(aad.as_bytes()), &mut data)
        .map_err(|_| SealError)?;
    Ok(clear.to_vec())
}

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
#[error("a sealed value does not open with this server's secret")]
pub struct SealError;

impl TokenSealer {
    /// The key is derived from `server_secret` (the JWT secret every control plane of
    /// the deployment shares) and a purpose label.
    pub fn new(server_secret: &[u8]) -> Self {
        let bytes = derive(b"wrenn envd-token sealing v1\0", server_secret);
        TokenSealer {
            key: aead_key(&CHACHA20_POLY1305, &bytes),
        }
    }

    /// `token` sealed for capsule `capsule_id`.
    pub fn seal(&self, capsule_id: &str, token: &str) -> String {
        format!(
            "{SEALED_V1}{}",
            seal_bytes(&self.key, capsule_id, token.as_bytes())
        )
    }

    /// The clear token of a stored value (sealed, or clear from an older server).
    pub fn open(&self, capsule_id: &str, stored: &str) -> Result<String, SealError> {
        let Some(b64) = stored.strip_prefix(SEALED_V1) else {
            return Ok(stored.to_owned());
        };
        let clear = open_bytes(&self.key, capsule_id, b64)?;
        String::from_utf8(clear).map_err(|_| SealError)
    }
}

/// Seals the settings of notification channels (webhook URLs and signing secrets,
/// chat services' tokens) before they are stored: AES-256-GCM under a key derived from
/// the server's secret, bound to the channel's id.
pub struct ConfigSealer {
    key: LessSafeKey,
}

impl std::fmt::Debug for ConfigSealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ConfigSealer(<redacted>)")
    }
}

/// Prefix of a sealed channel config.
const CONFIG_V1: &str = "gcm1:";

impl ConfigSealer {
    pub fn new(server_secret: &[u8]) -> Self {
        let bytes = derive(b"wrenn channel config sealing v1\0", server_secret);
        ConfigSealer {
            key: aead_key(&AES_256_GCM, &bytes),
        }
    }

    /// `config` sealed for channel `channel_id`.
    pub fn seal(&self, channel_id: &str, config: &str) -> String {
        format!(
            "{CONFIG_V1}{}",
            seal_bytes(&self.key, channel_id, config.as_bytes())
        )
    }

    /// The clear config of channel `channel_id`.
    pub fn open(&self, channel_id: &str, stored: &str) -> Result<String, SealError> {
        let b64 = stored.strip_prefix(CONFIG_V1).ok_or(SealError)?;
        let clear = open_bytes(&self.key, channel_id, b64)?;
        String::from_utf8(clear).map_err(|_| SealError)
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
        let bytes = derive(b"wrenn url signing v1\0", server_secret);
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
    fn sealed_channel_configs_open_only_for_their_channel_and_secret() {
        let s = ConfigSealer::new(b"secret-one");
        let sealed = s.seal("ch-1", r#"{"url":"https://x"}"#);
        assert!(sealed.starts_with(CONFIG_V1) && !sealed.contains("https"));
        assert_eq!(
            s.open("ch-1", &sealed).expect("opens"),
            r#"{"url":"https://x"}"#
        );
        assert!(s.open("ch-2", &sealed).is_err(), "bound to the channel");
        assert!(ConfigSealer::new(b"secret-two")
            .open("ch-1", &sealed)
            .is_err());
        assert!(s.open("ch-1", "{}").is_err(), "never stored in clear");
        // Not interchangeable with envd tokens.
        let t = TokenSealer::new(b"secret-one").seal("ch-1", "x");
        assert!(s.open("ch-1", &t).is_err());
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
