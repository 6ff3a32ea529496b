//! Wrenn's host agent: the capsules of this machine, served to a control plane through
//! the [`HostAgent`](wrenn_core::host::HostAgent) seam. [`LocalAgent`] implements it in
//! process over the capsule manager (`wrenn serve` on one machine).

mod local;

pub use local::{
    host_error, machine_specs, LocalAgent, LocalAgentOptions, MachineSpecs, TemplateCopies,
    LOCAL_HOST,
};
