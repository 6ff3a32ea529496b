//! Bringing a capsule up: network slot, disk, VMM (booted or restored), and its
//! guest agent, healthy and initialised.

use super::*;

/// Bytes of fresh randomness every started guest gets at `/init`.
pub const INIT_ENTROPY_BYTES: usize = 64;

/// Fresh randomness for a guest's kernel RNG (from the host's CSPRNG).
pub(super) fn fresh_entropy() -> Vec<u8> {
    let bytes: [u8; INIT_ENTROPY_BYTES] = rand::random();
    bytes.to_vec()
}

/// How a VM gets its state: booted from a template, or restored.
pub(super) enum Start {
    Boot {
        template: Template,
    },
    Restore {
        kernel: PathBuf,
        cmdline: String,
        memory: MemoryBase,
        device_state: PathBuf,
        overlay: Arc<dyn PageOverlay>,
        disk_base: PathBuf,
        /// The token the restored guest's envd still holds.
        old_token: String,
    },
    /// A fresh boot from a saved disk (the memory was not kept).
    Reboot {
        kernel: PathBuf,
        cmdline: String,
        disk_base: PathBuf,
    },
}

impl Ctx {
    pub(super) fn kernel_cmdline(&self, template: &Template) -> String {
        // The VMM adds what its machine needs (console, root drive, panic policy).
        let mut cmdline = format!(
            "init={} quiet {}",
            self.config.guest_init,
            crate::net::guest_ip_kernel_arg()
        );
        if !template.kernel_args.is_empty() {
            cmdline.push(' ');
            cmdline.push_str(&template.kernel_args);
        }
        cmdline
    }

    /// Acquires a slot, a disk and a VM for `record`, then waits for and
    /// initialises its agent. Everything acquired is in `res`, for the caller to
    /// keep or release.
    pub(super) async fn bring_up(
        &self,
        record: &mut CapsuleRecord,
        res: &mut Resources,
        start: Start,
        dir: &Path,
    ) -> Result<Arc<dyn GuestAgent>, CapsuleError> {
        let _start = self
            .starts
            .acquire()
            .await
            .map_err(|_| CapsuleError::ShuttingDown)?;
        // The caller has saved the record; it is saved again as resources are acquired.
        let parts = &self.parts;
        let slot = parts.net.allocate(&record.spec.network).await?;
        res.slot = Some(slot.clone());
        record.slot = Some(slot.clone());

        let (disk_base, boot, memory) = match &start {
            Start::Boot { template } => {
                let base = parts
                    .templates
                    .pin(&template.rootfs, dir, Pin::RootDisk)
                    .await?;
                let boot = BootSource {
                    kernel: template.kernel.clone(),
                    cmdline: self.kernel_cmdline(template),
                };
                (base, boot, MemoryBase::Zero)
            }
            Start::Reboot {
                kernel,
                cmdline,
                disk_base,
            } => (
                disk_base.clone(),
                BootSource {
                    kernel: kernel.clone(),
                    cmdline: cmdline.clone(),
                },
                MemoryBase::Zero,
            ),
            Start::Restore {
                kernel,
                cmdline,
                memory,
                disk_base,
                ..
            } => (
                disk_base.clone(),
                BootSource {
                    kernel: kernel.clone(),
                    cmdline: cmdline.clone(),
                },
                memory.clone(),
            ),
        };
        let disk = parts
            .disks
            .create(&disk_base, &parts.disks.disk_path(dir), record.spec.disk_mb)
            .await?;
        res.disk = Some(disk.clone());
        record.disk = Some(disk.clone());
        record.memory_base = memory.clone();
        record.kernel = boot.kernel.clone();
        record.cmdline = boot.cmdline.clone();
        parts.state.save(record).await?;

        let vm = vm_spec(record, dir, &slot, &disk);
        let (handle, old_token, ready_timeout) = match &start {
            Start::Boot { .. } | Start::Reboot { .. } => {
                (parts.vmm.spawn(&vm).await?, None, self.config.ready_timeout)
            }
            Start::Restore {
                device_state,
                overlay,
                old_token,
                ..
            } => (
                parts
                    .vmm
                    .restore(&vm, device_state, overlay.clone())
                    .await?,
                Some(old_token.clone()),
                self.config.restore_ready_timeout,
            ),
        };
        record.vmm_pid = handle.pid();
        // Held before anything else can fail, so the caller's release stops it.
        let handle: &dyn VmmHandle = &**res.vmm.insert(handle);
        parts.state.save(record).await?;

        let addr = SocketAddr::new(slot.host_addr.into(), crate::ENVD_PORT);
        // A restored envd still holds the old token; it authorises setting the new one.
        let init_agent = parts.guests.connect(
            addr,
            old_token.or_else(|| Some(record.access_token.clone())),
        );
        let ready = tokio::select! {
            r = init_agent.wait_ready(ready_timeout) => r.map_err(CapsuleError::from),
            detail = handle.wait_exit() => Err(CapsuleError::VmmExited {
                id: record.id.clone(), phase: "start", detail,
            }),
        };
        ready?;
        tracing::debug!(capsule = %record.id, "agent ready");
        let (default_user, default_workdir) = record.spec.guest_defaults();
        init_agent
            .init(&GuestInit {
                access_token: Some(record.access_token.clone()),
                env_vars: record.spec.guest_env(&record.id),
                default_user,
                default_workdir,
                timestamp: Some(SystemTime::now()),
                entropy: Some(fresh_entropy()),
            })
            .await?;
        Ok(parts
            .guests
            .connect(addr, Some(record.access_token.clone())))
    }

    pub(super) fn meta(&self, rec: &CapsuleRecord) -> SnapshotMeta {
        SnapshotMeta {
            spec: rec.spec.clone(),
            accel: rec.accel,
            mem_bytes: u64::from(rec.spec.memory_mb) * 1024 * 1024,
            memory_base: rec.memory_base.clone(),
            access_token: rec.access_token.clone(),
            kernel: rec.kernel.clone(),
            cmdline: rec.cmdline.clone(),
            created_at: now_unix(),
            disk_only: false,
        }
    }
}

/// The VM of capsule `record` as it was brought up (kernel, command line and memory
/// base as recorded), in run directory `dir`, with its network slot and disk.
pub(super) fn vm_spec(
    record: &CapsuleRecord,
    dir: &Path,
    slot: &NetSlot,
    disk: &CowDisk,
) -> VmSpec {
    VmSpec {
        name: record.id.vmm_tag(),
        run_dir: dir.to_path_buf(),
        boot: BootSource {
            kernel: record.kernel.clone(),
            cmdline: record.cmdline.clone(),
        },
        machine: MachineConfig {
            vcpus: u8::try_from(record.spec.vcpus).unwrap_or(1),
            memory_mb: record.spec.memory_mb,
        },
        drives: vec![Drive {
            id: "rootfs".into(),
            path: disk.path.clone(),
            format: disk.format,
            read_only: false,
            root: true,
        }],
        nets: vec![NetIface {
            id: "eth0".into(),
            tap: TAP_NAME.into(),
            mac: GUEST_MAC.into(),
            netns_path: slot.netns_path.clone(),
        }],
        memory: record.memory_base.clone(),
    }
}
