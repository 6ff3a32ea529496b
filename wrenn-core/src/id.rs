//! Identifiers.

use serde::{Deserialize, Serialize};
use std::fmt;

const ALPHABET: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
const ENCODED_LEN: usize = 25;

/// 16 bytes as 25 base36 digits (big-endian, zero-padded): Wrenn's public id form.
pub fn base36(value: u128) -> String {
    let mut digits = [b'0'; ENCODED_LEN];
    let mut v = value;
    for d in digits.iter_mut().rev() {
        *d = ALPHABET[(v % 36) as usize];
        v /= 36;
    }
    digits.iter().map(|&b| b as char).collect()
}

/// A fresh secret: 128 random bits as 32 hex digits (envd access tokens,
/// traffic access tokens).
pub fn random_token() -> String {
    let v: u128 = rand::random();
    format!("{v:032x}")
}

/// Parses 25 base36 digits back to 16 bytes.
pub fn parse_base36(s: &str) -> Option<u128> {
    if s.len() != ENCODED_LEN {
        return None;
    }
    s.bytes().try_fold(0u128, |acc, b| {
        let d = ALPHABET.iter().position(|&a| a == b)? as u128;
        acc.checked_mul(36)?.checked_add(d)
    })
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("Invalid {kind} id {value:?}: expected {prefix} followed by 25 base36 characters")]
pub struct ParseIdError {
    pub kind: &'static str,
    pub prefix: &'static str,
    pub value: String,
}

/// A capsule id: `cl-` + 25 base36 characters.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct CapsuleId(String);

impl CapsuleId {
    pub const PREFIX: &'static str = "cl-";

    /// A new random id.
    pub fn random() -> Self {
        CapsuleId(format!(
            "{}{}",
            Self::PREFIX,
            base36(rand::random::<u128>())
        ))
    }

    pub fn parse(s: &str) -> Result<Self, ParseIdError> {
        let ok = s
            .strip_prefix(Self::PREFIX)
            .and_then(parse_base36)
            .is_some();
        if ok {
            Ok(CapsuleId(s.to_string()))
        } else {
            Err(ParseIdError {
                kind: "capsule",
                prefix: Self::PREFIX,
                value: s.to_string(),
            })
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Tag carried by this capsule's VMM process and host objects.
    pub fn vmm_tag(&self) -> String {
        format!("wrenn-{}", self.0)
    }
}

impl TryFrom<String> for CapsuleId {
    type Error = ParseIdError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        CapsuleId::parse(&s)
    }
}

impl From<CapsuleId> for String {
    fn from(id: CapsuleId) -> String {
        id.0
    }
}

impl fmt::Display for CapsuleId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for CapsuleId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base36_round_trips_and_pads() {
        assert_eq!(base36(0), "0".repeat(25));
        assert_eq!(base36(35), format!("{}z", "0".repeat(24)));
        for v in [0u128, 1, 36, u64::MAX as u128, u128::MAX] {
            assert_eq!(parse_base36(&base36(v)), Some(v));
        }
        assert_eq!(base36(u128::MAX).len(), 25);
    }

    #[test]
    fn capsule_ids_parse_strictly() {
        let id = CapsuleId::random();
        assert!(id.as_str().starts_with("cl-"));
        assert_eq!(CapsuleId::parse(id.as_str()).unwrap(), id);
        assert!(CapsuleId::parse("cl-short").is_err());
        assert!(CapsuleId::parse(&format!("xx-{}", "0".repeat(25))).is_err());
        assert!(CapsuleId::parse(&format!("cl-{}", "A".repeat(25))).is_err());
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(serde_json::from_str::<CapsuleId>(&json).unwrap(), id);
        assert!(serde_json::from_str::<CapsuleId>("\"nope\"").is_err());
    }
}
