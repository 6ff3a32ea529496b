//! Deciding between KVM and TCG by measurement.
//!
//! `/dev/kvm` existing proves nothing: on some hosts it is backed by a
//! paravirtual implementation on which ordinary guests run ~1000× slower, or
//! cannot run our kernel at all. The probe boots the real guest kernel (no root
//! filesystem, so it panics and QEMU exits at the end of kernel init) under TCG
//! and under KVM, side by side, and uses KVM only when that boot finished and was
//! clearly faster. The result is cached per host boot, kernel and QEMU binary.

use crate::qemu::process::run_to_exit;
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::time::Duration;
use wrenn_core::vmm::Accel;

/// KVM must boot at least this many times faster than TCG to count as real.
const MIN_SPEEDUP: f64 = 3.0;
/// Upper bound of one probe boot under TCG.
const TCG_LIMIT: Duration = Duration::from_secs(60);

/// The decision and the measurements behind it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AccelProbe {
    pub accel: Accel,
    pub reason: String,
    /// `/dev/kvm` exists and opens read-write.
    pub kvm_device: bool,
    pub kvm_boot_ms: Option<u64>,
    pub tcg_boot_ms: Option<u64>,
    /// Set by `WRENN_ACCEL`, not measured.
    pub forced: bool,
}

fn kvm_device_usable() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

fn probe_args(kernel: &Path, accel: Accel) -> Vec<String> {
    let (accel, cpu) = match accel {
        Accel::Kvm => ("kvm", "host"),
        Accel::Tcg => ("tcg", "max"),
    };
    let mut append = "console=ttyS0 panic=-1 quiet loglevel=0".to_string();
    if let Some(khz) = host_tsc_khz() {
        append.push_str(&format!(" tsc_early_khz={khz}"));
    }
    [
        "-machine",
        "microvm,rtc=on",
        "-accel",
        accel,
        "-cpu",
        cpu,
        "-m",
        "128M",
        "-smp",
        "1",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
        "-serial",
        "none",
        "-kernel",
        &kernel.display().to_string(),
        "-append",
        &append,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn cache_key(binary: &Path, kernel: &Path) -> String {
    let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
    let mtime = std::fs::metadata(kernel)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_secs())
        .unwrap_or(0);
    format!(
        "{}|{}|{}|{}",
        boot_id.trim(),
        kernel.display(),
        mtime,
        binary.display()
    )
}

#[derive(Serialize, Deserialize)]
struct Cached {
    key: String,
    probe: AccelProbe,
}

/// Decides the acceleration. `WRENN_ACCEL=kvm|tcg` overrides the measurement.
/// `cache_dir` (e.g. `/run/wrenn`) keeps the result for this host boot.
pub async fn probe(binary: &Path, kernel: &Path, cache_dir: Option<&Path>) -> AccelProbe {
    let kvm_device = kvm_device_usable();
    match std::env::var("WRENN_ACCEL").ok().as_deref().map(str::trim) {
        Some("kvm") => {
            return AccelProbe {
                accel: Accel::Kvm,
                reason: "forced by WRENN_ACCEL=kvm".into(),
                kvm_device,
                kvm_boot_ms: None,
                tcg_boot_ms: None,
                forced: true,
            }
        }
        Some("tcg") => {
            return AccelProbe {
                accel: Accel::Tcg,
                reason: "forced by WRENN_ACCEL=tcg".into(),
                kvm_device,
                kvm_boot_ms: None,
                tcg_boot_ms: None,
                forced: true,
            }
        }
        Some(other) if !other.is_empty() => {
            tracing::warn!(value = other, "ignoring WRENN_ACCEL (expected kvm or tcg)");
        }
        _ => {}
    }
    if !kvm_device {
        return AccelProbe {
            accel: Accel::Tcg,
            reason: "/dev/kvm is missing or not accessible".into(),
            kvm_device,
            kvm_boot_ms: None,
            tcg_boot_ms: None,
            forced: false,
        };
    }
    let key = cache_key(binary, kernel);
    let cache_file = cache_dir.map(|d| d.join("accel-probe.json"));
    if let Some(f) = &cache_file {
        if let Ok(text) = std::fs::read_to_string(f) {
            if let Ok(c) = serde_json::from_str::<Cached>(&text) {
                if c.key == key {
                    return c.probe;
                }
            }
        }
    }
    let result = measure(binary, kernel).await;
    tracing::info!(accel = %result.accel, reason = %result.reason, "acceleration probed");
    if let (Some(f), Some(dir)) = (&cache_file, cache_dir) {
        let _ = std::fs::create_dir_all(dir);
        if let Ok(text) = serde_json::to_string(&Cached {
            key,
            probe: result.clone(),
        }) {
            let _ = wrenn_core::fsutil::write_atomic(f, text.as_bytes());
        }
    }
    result
}

async fn measure(binary: &Path, kernel: &Path) -> AccelProbe {
    let tcg = run_to_exit(binary, probe_args(kernel, Accel::Tcg), TCG_LIMIT).await;
    let tcg_ms = tcg.as_ref().map(|(d, _)| d.as_millis() as u64);
    // KVM gets as long as TCG took (at least 3 s): a real KVM boot takes a fraction of it.
    let kvm_limit = Duration::from_millis(tcg_ms.unwrap_or(10_000).max(3_000));
    let kvm = run_to_exit(binary, probe_args(kernel, Accel::Kvm), kvm_limit).await;
    let kvm_ms = kvm.as_ref().map(|(d, _)| d.as_millis() as u64);
    let (accel, reason) = match (kvm.as_ref(), tcg_ms) {
        (None, _) => (
            Accel::Tcg,
            format!(
                "/dev/kvm is present but a guest boot under KVM did not finish within {} ms \
                 (TCG: {}): not usable hardware virtualization",
                kvm_limit.as_millis(),
                tcg_ms
                    .map(|m| format!("{m} ms"))
                    .unwrap_or_else(|| "did not finish".into())
            ),
        ),
        (Some((_, status)), _) if status != "exit code 0" => (
            Accel::Tcg,
            format!("a guest boot under KVM failed ({status})"),
        ),
        (Some((d, _)), Some(t)) => {
            let k = d.as_millis() as u64;
            let speedup = t as f64 / k.max(1) as f64;
            if speedup >= MIN_SPEEDUP {
                (
                    Accel::Kvm,
                    format!("guest boot: KVM {k} ms vs TCG {t} ms ({speedup:.1}x faster)"),
                )
            } else {
                (
                    Accel::Tcg,
                    format!(
                        "guest boot under KVM ({k} ms) is not clearly faster than TCG ({t} ms)"
                    ),
                )
            }
        }
        (Some((d, _)), None) => (
            Accel::Kvm,
            format!(
                "guest boot under KVM took {} ms; TCG did not finish",
                d.as_millis()
            ),
        ),
    };
    AccelProbe {
        accel,
        reason,
        kvm_device: true,
        kvm_boot_ms: kvm_ms,
        tcg_boot_ms: tcg_ms,
        forced: false,
    }
}

/// The host's TSC frequency in kHz. Under TCG the guest's TSC is the host's, and
/// the guest kernel cannot calibrate it reliably against the emulated PIT on a busy
/// host; passing `tsc_early_khz` avoids a hang before init. Measured once.
pub fn host_tsc_khz() -> Option<u64> {
    static KHZ: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    *KHZ.get_or_init(measure_tsc_khz)
}

#[cfg(target_arch = "x86_64")]
fn measure_tsc_khz() -> Option<u64> {
    use std::time::Instant;
    let mut best: Option<u64> = None;
    for _ in 0..2 {
        let t0 = Instant::now();
        // SAFETY: RDTSC only reads the time-stamp counter, present on every x86_64 CPU.
        let c0 = unsafe { core::arch::x86_64::_rdtsc() };
        std::thread::sleep(Duration::from_millis(10));
        // SAFETY: as above.
        let c1 = unsafe { core::arch::x86_64::_rdtsc() };
        let ns = t0.elapsed().as_nanos() as u64;
        if ns == 0 || c1 <= c0 {
            continue;
        }
        let khz = (c1 - c0) * 1_000_000 / ns;
        // Round to a whole MHz: the kernel wants a stable figure, not jitter.
        let khz = (khz + 500) / 1000 * 1000;
        best = Some(best.map_or(khz, |b: u64| b.max(khz)));
    }
    best
}

#[cfg(not(target_arch = "x86_64"))]
fn measure_tsc_khz() -> Option<u64> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_boots_without_a_root_disk_and_exits_on_panic() {
        let a = probe_args(Path::new("/k"), Accel::Tcg).join(" ");
        assert!(a.contains("-no-reboot"));
        assert!(a.contains("panic=-1"));
        assert!(!a.contains("-drive"));
    }
}
