//! Public ids: a kind prefix and 25 base36 digits of 16 random bytes.

use wrenn_core::id::base36;

/// The prefixes of the ids this crate makes (capsule ids come from `wrenn_core::CapsuleId`).
pub mod prefix {
    pub const USER: &str = "usr-";
    pub const TEAM: &str = "team-";
    pub const API_KEY: &str = "key-";
    pub const TEMPLATE: &str = "tpl-";
    pub const AUDIT_LOG: &str = "log-";
    pub const HOST: &str = "host-";
    pub const HOST_TOKEN: &str = "htok-";
    pub const HOST_REFRESH: &str = "hrt-";
    pub const HOST_JOIN: &str = "hjoin-";
    pub const BUILD: &str = "bld-";
    pub const CHANNEL: &str = "ch-";
    pub const DELIVERY: &str = "dlv-";
}

/// A new random id with `prefix`, e.g. `new_id(prefix::USER)` → `usr-0k3…`.
pub fn new_id(prefix: &str) -> String {
    format!("{prefix}{}", base36(rand::random::<u128>()))
}

/// `n` random bytes as lowercase hex.
pub(crate) fn random_hex(n: usize) -> String {
    let bytes: Vec<u8> = (0..n).map(|_| rand::random::<u8>()).collect();
    hex(&bytes)
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_have_prefix_and_25_base36_digits() {
        let id = new_id(prefix::USER);
        let digits = id.strip_prefix("usr-").unwrap();
        assert_eq!(digits.len(), 25);
        assert!(wrenn_core::id::parse_base36(digits).is_some());
        assert_ne!(new_id(prefix::USER), id);
    }

    #[test]
    fn hex_is_lowercase_and_padded() {
        assert_eq!(hex(&[0, 0xab, 0x0f]), "00ab0f");
        assert_eq!(random_hex(6).len(), 12);
    }
}
