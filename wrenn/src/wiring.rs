//! `Host::local`: the default wiring on this machine.

use crate::paths::DataDir;
use crate::state::FsStateStore;
use crate::templates::FsTemplates;
use std::sync::Arc;
use std::time::Duration;
use wrenn_core::manager::{Capsules, DiskOvercommit, HostParts, ManagerConfig, SweepReport};
use wrenn_core::spec::Limits;
use wrenn_core::CapsuleError;
use wrenn_envd::client::EnvdConnector;
use wrenn_net::{NetConfig, NetnsNetwork};
use wrenn_storage::{FsSnapshotStore, Qcow2Store};
use wrenn_vmm::{AccelProbe, QemuConfig, QemuVmm};

/// Settings of a local host.
#[derive(Clone, Debug)]
pub struct HostOptions {
    pub data_dir: DataDir,
    pub limits: Limits,
    pub ready_timeout: Duration,
    /// Run the startup sweep (remove what crashed processes left behind).
    pub sweep: bool,
    /// Memory generations kept before a pause merges them.
    pub generation_cap: usize,
    /// Warm pools to keep: ready capsules per template.
    pub pools: Vec<(String, usize)>,
    /// Guest memory all warm pools together may hold, in MiB (0 = no cap).
    pub pool_memory_budget_mb: u64,
    /// Disk space (MiB) capsules may never take from the data directory's filesystem.
    pub disk_reserve_mb: u64,
    /// Thin provisioning of writable disks (see [`DiskOvercommit`]).
    pub disk_overcommit: DiskOvercommit,
    /// VMs brought up at once (0: one per CPU); see `ManagerConfig::max_concurrent_starts`.
    pub max_concurrent_starts: usize,
    /// Resolver the capsules' filtering resolvers forward allowed names to
    /// (`None`: the host's first IPv4 nameserver, else 8.8.8.8).
    pub dns_upstream: Option<std::net::SocketAddr>,
    /// Run every VMM jailed: a uid of this range, its own mount namespace (see
    /// `wrenn_vmm::jail`). Needs root.
    pub jail: Option<wrenn_vmm::jail::JailConfig>,
    /// VMMs keep running when this process dies, and the next start takes them over
    /// (a host agent: its crash or restart does not stop its capsules). Otherwise they
    /// die with it and the next start cleans up.
    pub vmms_outlive_host: bool,
}

impl Default for HostOptions {
    fn default() -> Self {
        HostOptions {
            data_dir: DataDir::from_env(),
            limits: Limits::default(),
            ready_timeout: Duration::from_secs(120),
            sweep: true,
            generation_cap: wrenn_storage::capsnap::DEFAULT_GENERATION_CAP,
            pools: Vec::new(),
            pool_memory_budget_mb: ManagerConfig::default().pool_memory_budget_mb,
            dns_upstream: None,
            disk_reserve_mb: ManagerConfig::default().disk_reserve_mb,
            disk_overcommit: DiskOvercommit::NONE,
            max_concurrent_starts: 0,
            jail: Some(wrenn_vmm::jail::JailConfig::default()),
            vmms_outlive_host: false,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("No guest kernel under {dir}: run `wrenn image build` first")]
    NoKernel { dir: String },
    #[error("Cannot create the data directory {dir}")]
    DataDir {
        dir: String,
        #[source]
        source: std::io::Error,
    },
    #[error("Startup sweep failed")]
    Sweep(#[source] CapsuleError),
    #[error("Cannot confine VMMs: no usable cgroup hierarchy")]
    Cgroups(#[source] wrenn_vmm::cgroup::CgroupError),
    #[error("Cannot jail VMMs")]
    Jail(#[source] wrenn_vmm::jail::JailError),
    #[error("Cannot keep a warm pool of template {template}")]
    Pool {
        template: String,
        #[source]
        source: CapsuleError,
    },
}

/// Capsules on this machine.
#[derive(Debug, Clone)]
pub struct Host {
    capsules: Arc<Capsules>,
    probe: AccelProbe,
    data: DataDir,
    sweep: SweepReport,
}

impl Host {
    /// Wires QEMU, network namespaces, qcow2 disks and envd; probes the acceleration
    /// (cached per host boot) and sweeps leftovers of crashed processes.
    pub async fn local(opts: HostOptions) -> Result<Host, HostError> {
        let data = opts.data_dir.clone();
        for dir in [
            data.capsules(),
            data.templates(),
            data.kernels(),
            data.snapshots(),
        ] {
            std::fs::create_dir_all(&dir).map_err(|source| HostError::DataDir {
                dir: dir.display().to_string(),
                source,
            })?;
        }
        // Guest data (disks, memory, snapshot templates) is the host's alone.
        for dir in [data.capsules(), data.templates(), data.snapshots()] {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).map_err(
                |source| HostError::DataDir {
                    dir: dir.display().to_string(),
                    source,
                },
            )?;
        }
        let kernel = data.kernel().ok_or_else(|| HostError::NoKernel {
            dir: data.kernels().display().to_string(),
        })?;
        let binary = wrenn_vmm::qemu::process::default_binary();
        let probe = wrenn_vmm::probe(&binary, &kernel, Some(&data.run_dir())).await;
        tracing::info!(accel = %probe.accel, reason = %probe.reason, "acceleration");
        let cgroups = wrenn_vmm::cgroup::Layout::detect().map_err(HostError::Cgroups)?;
        tracing::info!(layout = %cgroups.describe(), "VMM cgroups");
        let mut qemu = QemuConfig::new(probe.accel);
        qemu.outlive_owner = opts.vmms_outlive_host;
        qemu.cgroups = Some(wrenn_vmm::cgroup::Pool::new(cgroups.clone()));
        if let Some(config) = &opts.jail {
            let jail = wrenn_vmm::jail::Jail::new(config.clone(), &data.vmm_input_roots())
                .map_err(HostError::Jail)?;
            tracing::info!(jail = %jail.describe(), "VMM jail");
            qemu.jail = Some(jail);
        } else {
            tracing::warn!("VMMs run without the jail (same user as wrenn, host mount namespace)");
        }
        // Templates are flattened from paused VMs, whose QEMU keeps its disk open.
        let snapshots = Arc::new(
            FsSnapshotStore::new(
                data.snapshots(),
                data.templates(),
                Arc::new(Qcow2Store::new().force_share(true)),
            )
            .with_generation_cap(opts.generation_cap),
        );
        let parts = HostParts {
            vmm: Arc::new(QemuVmm::new(qemu)),
            net: Arc::new(NetnsNetwork::new({
                let mut net = NetConfig::default();
                if let Some(upstream) = opts.dns_upstream {
                    net.dns_upstream = upstream;
                }
                tracing::info!(upstream = %net.dns_upstream, "DNS filter upstream");
                net
            })),
            disks: Arc::new(Qcow2Store::new()),
            templates: Arc::new(FsTemplates::new(data.clone())),
            guests: Arc::new(EnvdConnector::default()),
            state: Arc::new(FsStateStore::new(data.clone())),
            snapshots: snapshots.clone(),
        };
        let config = ManagerConfig {
            limits: opts.limits,
            ready_timeout: opts.ready_timeout,
            pool_memory_budget_mb: opts.pool_memory_budget_mb,
            disk_reserve_mb: opts.disk_reserve_mb,
            disk_overcommit: opts.disk_overcommit,
            max_concurrent_starts: opts.max_concurrent_starts,
            ..Default::default()
        };
        let capsules = Capsules::new(parts, config);
        let sweep = if opts.sweep {
            let report = capsules.recover().await.map_err(HostError::Sweep)?;
            let groups = cgroups.sweep();
            if groups > 0 {
                tracing::info!(groups, "removed the cgroups of VMMs that are gone");
            }
            let stages = snapshots.remove_unfinished_templates();
            if stages > 0 {
                tracing::info!(stages, "removed unfinished template writes");
            }
            report
        } else {
            SweepReport::default()
        };
        for (template, size) in &opts.pools {
            capsules
                .set_pool(template, *size)
                .await
                .map_err(|source| HostError::Pool {
                    template: template.clone(),
                    source,
                })?;
        }
        Ok(Host {
            capsules,
            probe,
            data,
            sweep,
        })
    }

    pub fn capsules(&self) -> &Arc<Capsules> {
        &self.capsules
    }

    /// How the acceleration was decided.
    pub fn accel_probe(&self) -> &AccelProbe {
        &self.probe
    }

    pub fn data_dir(&self) -> &DataDir {
        &self.data
    }

    /// What the startup sweep removed.
    pub fn sweep_report(&self) -> &SweepReport {
        &self.sweep
    }
}
