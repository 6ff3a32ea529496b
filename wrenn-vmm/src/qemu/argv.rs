//! Typed VM spec → QEMU command line. Pure, so it is tested without QEMU.

use std::path::Path;
use wrenn_core::vmm::{Accel, VmSpec};

/// File names inside a VM's run directory.
pub const QMP_SOCKET: &str = "qmp.sock";
/// The device state a save writes (the migration stream without guest RAM), in the
/// directory the caller gives.
pub const DEVICE_STATE: &str = "device.state";
pub use super::console::CONSOLE_PIPE;

/// QEMU option values are comma-separated; a literal comma is doubled.
fn escape(v: &str) -> String {
    v.replace(',', ",,")
}

fn path(p: &Path) -> String {
    escape(&p.display().to_string())
}

/// The RAM block name, as it appears in migration streams.
pub const RAM_BLOCK: &str = "mem";
/// File descriptor of the first tap, opened for QEMU before it runs (QEMU itself
/// has no capabilities to attach a tap by name). Tap `i` is `TAP_FD + i`.
pub const TAP_FD: i32 = 100;
/// File descriptor of QMP's listening socket, made by the host at
/// `<run_dir>/qmp.sock` (QEMU creates no files).
pub const QMP_FD: i32 = 99;
/// File descriptor of a jailed VMM's sealed memory image (`/proc/self/fd/98`).
pub const MEM_FD: i32 = 98;
/// QEMU's own seccomp filter: no obsolete syscalls, no privilege changes, no new
/// processes or executables, no scheduler or resource controls.
pub const SANDBOX: &str = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";

/// How the VM starts: booting, or paused waiting for incoming device state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StartMode {
    Boot,
    Incoming,
}

/// Builds the argument vector (without the binary) for one microvm whose RAM is a
/// private mapping of `mem_path`.
pub fn build_argv(
    spec: &VmSpec,
    accel: Accel,
    tb_size_mb: Option<u32>,
    mem_path: &Path,
    mode: StartMode,
) -> Vec<String> {
    let mut a: Vec<String> = Vec::new();
    let mut push = |xs: &[&str]| a.extend(xs.iter().map(|s| s.to_string()));
    push(&[
        "-name",
        &format!("{},debug-threads=off", escape(&spec.name)),
    ]);
    push(&[
        "-machine",
        &format!("microvm,rtc=on,memory-backend={RAM_BLOCK}"),
    ]);
    push(&[
        "-object",
        &format!(
            "memory-backend-file,id={RAM_BLOCK},size={}M,mem-path={},share=off",
            spec.machine.memory_mb,
            path(mem_path)
        ),
    ]);
    // Streams start straight with sections: simpler to filter (see migstream).
    push(&["-global", "migration.send-configuration=off"]);
    match accel {
        Accel::Kvm => push(&["-accel", "kvm", "-cpu", "host"]),
        Accel::Tcg => {
            let accel = match tb_size_mb {
                Some(mb) => format!("tcg,tb-size={mb}"),
                None => "tcg".to_string(),
            };
            push(&["-accel", &accel, "-cpu", "max"]);
        }
    }
    push(&["-m", &format!("{}M", spec.machine.memory_mb)]);
    push(&["-smp", &spec.machine.vcpus.to_string()]);
    push(&[
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
    ]);
    push(&["-sandbox", SANDBOX]);
    push(&["-kernel", &spec.boot.kernel.display().to_string()]);
    push(&["-append", &kernel_cmdline(spec)]);
    push(&[
        "-chardev",
        &format!(
            "file,id=console,path={}",
            path(&spec.run_dir.join(CONSOLE_PIPE))
        ),
    ]);
    push(&["-serial", "chardev:console"]);
    for d in &spec.drives {
        let mut drive = format!(
            "id={},file={},format={},if=none,discard=unmap",
            escape(&d.id),
            path(&d.path),
            d.format.as_str()
        );
        if d.read_only {
            drive.push_str(",readonly=on");
        }
        push(&["-drive", &drive]);
        push(&[
            "-device",
            &format!("virtio-blk-device,drive={}", escape(&d.id)),
        ]);
    }
    for (i, n) in spec.nets.iter().enumerate() {
        push(&[
            "-netdev",
            &format!("tap,id={},fd={}", escape(&n.id), TAP_FD + i as i32),
        ]);
        push(&[
            "-device",
            &format!("virtio-net-device,netdev={},mac={}", escape(&n.id), n.mac),
        ]);
    }
    push(&[
        "-chardev",
        &format!("socket,id=qmp,fd={QMP_FD},server=on,wait=off"),
    ]);
    push(&["-mon", "chardev=qmp,mode=control"]);
    // Stopped until the host has put the VMM in its cgroup (and, when restoring,
    // loaded its state).
    push(&["-S"]);
    if mode == StartMode::Incoming {
        push(&["-incoming", "defer"]);
    }
    a
}

/// The kernel command line: what this machine needs (its serial console, reboot
/// and panic behaviour, the root drive: the first, `vda`, read-write unless marked
/// read-only), then the caller's (`spec.boot.cmdline`: init, network, template).
fn kernel_cmdline(spec: &VmSpec) -> String {
    let mut c = String::from("console=ttyS0 reboot=k panic=1");
    if let Some(root) = spec.drives.iter().find(|d| d.root) {
        c.push_str(if root.read_only {
            " root=/dev/vda ro"
        } else {
            " root=/dev/vda rw"
        });
    }
    if !spec.boot.cmdline.is_empty() {
        c.push(' ');
        c.push_str(&spec.boot.cmdline);
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;
    use wrenn_core::storage::DiskFormat;
    use wrenn_core::vmm::{BootSource, Drive, MachineConfig, NetIface};

    fn spec() -> VmSpec {
        VmSpec {
            name: "wrenn-cl-1".into(),
            run_dir: PathBuf::from("/run/c1"),
            boot: BootSource {
                kernel: "/k/vmlinux".into(),
                cmdline: "init=/sbin/init".into(),
            },
            machine: MachineConfig {
                vcpus: 2,
                memory_mb: 512,
            },
            drives: vec![Drive {
                id: "rootfs".into(),
                path: "/d/disk,1.qcow2".into(),
                format: DiskFormat::Qcow2,
                read_only: false,
                root: true,
            }],
            nets: vec![NetIface {
                id: "eth0".into(),
                tap: "tap0".into(),
                mac: "02:fc:00:00:00:05".into(),
                netns_path: "/run/netns/wrenn-ns-1".into(),
            }],
            memory: wrenn_core::vmm::MemoryBase::Zero,
        }
    }

    #[test]
    fn golden_tcg_argv() {
        let a = build_argv(
            &spec(),
            Accel::Tcg,
            Some(64),
            Path::new("/run/c1/memory"),
            StartMode::Boot,
        )
        .join(" ");
        assert_eq!(
            a,
            "-name wrenn-cl-1,debug-threads=off -machine microvm,rtc=on,memory-backend=mem \
             -object memory-backend-file,id=mem,size=512M,mem-path=/run/c1/memory,share=off \
             -global migration.send-configuration=off -accel tcg,tb-size=64 -cpu max \
             -m 512M -smp 2 -nodefaults -no-user-config -display none -no-reboot \
             -sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny \
             -kernel /k/vmlinux \
             -append console=ttyS0 reboot=k panic=1 root=/dev/vda rw init=/sbin/init -chardev file,id=console,path=/run/c1/console.pipe \
             -serial chardev:console \
             -drive id=rootfs,file=/d/disk,,1.qcow2,format=qcow2,if=none,discard=unmap \
             -device virtio-blk-device,drive=rootfs \
             -netdev tap,id=eth0,fd=100 \
             -device virtio-net-device,netdev=eth0,mac=02:fc:00:00:00:05 \
             -chardev socket,id=qmp,fd=99,server=on,wait=off -mon chardev=qmp,mode=control -S"
        );
    }

    #[test]
    fn kvm_uses_host_cpu() {
        let a = build_argv(&spec(), Accel::Kvm, None, Path::new("/m"), StartMode::Boot);
        let i = a.iter().position(|x| x == "-accel").unwrap();
        assert_eq!((a[i + 1].as_str(), a[i + 3].as_str()), ("kvm", "host"));
        assert!(!a.contains(&"-incoming".to_string()));
        let a = build_argv(
            &spec(),
            Accel::Kvm,
            None,
            Path::new("/m"),
            StartMode::Incoming,
        );
        assert!(a.ends_with(&[
            "-S".to_string(),
            "-incoming".to_string(),
            "defer".to_string()
        ]));
    }
}
