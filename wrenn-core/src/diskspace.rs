//! Disk space policy shared by the capsule manager and its configuration.

use serde::{Deserialize, Serialize};

/// Thin provisioning of capsules' writable disks: 1 (the default) keeps room for
/// every running capsule to fill its whole disk at once; 4 keeps room for a quarter
/// of it, trusting that guests seldom fill their disks. Memory images and snapshots
/// are always counted in full. Between 1 and 100.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "f64", into = "f64")]
pub struct DiskOvercommit(f64);

/// A disk overcommit ratio outside 1..=100 (or not a number).
#[derive(Debug, thiserror::Error)]
#[error("disk overcommit must be a number from 1 to 100, not {0:?}")]
pub struct InvalidOvercommit(String);

impl DiskOvercommit {
    pub const NONE: DiskOvercommit = DiskOvercommit(1.0);

    pub fn new(ratio: f64) -> Result<Self, InvalidOvercommit> {
        if ratio.is_finite() && (1.0..=100.0).contains(&ratio) {
            Ok(DiskOvercommit(ratio))
        } else {
            Err(InvalidOvercommit(ratio.to_string()))
        }
    }

    pub fn ratio(self) -> f64 {
        self.0
    }

    /// The share of `bytes` of possible disk growth the host keeps room for.
    pub fn provisioned(self, bytes: u64) -> u64 {
        // Exact for the ratio 1; otherwise rounded up to the next whole byte.
        if self.0 == 1.0 {
            bytes
        } else {
            (bytes as f64 / self.0).ceil() as u64
        }
    }
}

impl Default for DiskOvercommit {
    fn default() -> Self {
        DiskOvercommit::NONE
    }
}

impl std::fmt::Display for DiskOvercommit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::str::FromStr for DiskOvercommit {
    type Err = InvalidOvercommit;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let ratio = s
            .trim()
            .parse::<f64>()
            .map_err(|_| InvalidOvercommit(s.to_string()))?;
        DiskOvercommit::new(ratio).map_err(|_| InvalidOvercommit(s.to_string()))
    }
}

impl TryFrom<f64> for DiskOvercommit {
    type Error = InvalidOvercommit;

    fn try_from(ratio: f64) -> Result<Self, Self::Error> {
        DiskOvercommit::new(ratio)
    }
}

impl From<DiskOvercommit> for f64 {
    fn from(o: DiskOvercommit) -> f64 {
        o.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratios_outside_1_to_100_are_refused() {
        for bad in ["0.5", "0", "-1", "101", "NaN", "inf", "four", ""] {
            let err = bad.parse::<DiskOvercommit>().expect_err(bad);
            assert!(err.to_string().contains("from 1 to 100"), "{err}");
        }
        assert!(DiskOvercommit::new(f64::NAN).is_err());
        assert_eq!(
            "2.5".parse::<DiskOvercommit>().map(|o| o.ratio()).ok(),
            Some(2.5)
        );
        assert_eq!(
            " 1 ".parse::<DiskOvercommit>().ok(),
            Some(DiskOvercommit::NONE)
        );
    }

    #[test]
    fn provisioned_share_rounds_up_and_is_exact_at_one() {
        assert_eq!(DiskOvercommit::NONE.provisioned(u64::MAX), u64::MAX);
        let four = DiskOvercommit::new(4.0).expect("ratio");
        assert_eq!(four.provisioned(2048 << 20), 512 << 20);
        assert_eq!(four.provisioned(5), 2);
        assert_eq!(four.provisioned(0), 0);
        let three = DiskOvercommit::new(3.0).expect("ratio");
        assert_eq!(three.provisioned(10), 4);
    }

    #[test]
    fn serde_refuses_what_new_refuses() {
        let ok: DiskOvercommit = serde_json::from_str("1.5").expect("1.5");
        assert_eq!(ok.ratio(), 1.5);
        assert!(serde_json::from_str::<DiskOvercommit>("0.9").is_err());
        assert_eq!(serde_json::to_string(&ok).ok().as_deref(), Some("1.5"));
    }
}
