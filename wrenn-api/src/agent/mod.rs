//! The seam between the control plane and a host: [`HostAgent`] and its types, defined
//! by `wrenn-core` (`wrenn_core::host`) so that host agents implement it without this
//! crate. The control plane makes its own guest agent clients from the endpoints a host
//! hands out (`AppState::guest`).

pub use wrenn_core::egress::EgressPolicy;
pub use wrenn_core::host::*;
pub use wrenn_core::metrics::{MetricPoint, TierSnapshot};
pub use wrenn_core::snapshot::{PauseMode, ResumeMode};
