//! [`RemoteAgent`]: a [`HostAgent`] whose host is reached over gRPC.

use crate::convert as cv;
use crate::proto as pb;
use crate::proto::host_agent_client::HostAgentClient;
use async_trait::async_trait;
use std::collections::HashMap;
use std::time::Duration;
use tonic::transport::Channel;
use tonic::{Request, Status};
use wrenn_core::egress::EgressPolicy;
use wrenn_core::host::{
    CapsuleSpec, Endpoint, GuestStream, HostAgent, HostCapsule, HostError, HostErrorKind,
    HostImage, HostInfo, HostTemplate, HostVersions, ImageSpec, PoolStats,
};
use wrenn_core::id::CapsuleId;
use wrenn_core::metrics::{MetricPoint, TierSnapshot};
use wrenn_core::snapshot::{PauseMode, ResumeMode};

/// How long a call to the agent may take before it fails with `Timeout`: a slow or dead
/// agent holds up only the requests for its own capsules.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// Opening the connection.
    pub connect: Duration,
    /// Lookups, endpoints, metrics, settings.
    pub quick: Duration,
    /// Create, pause, resume, destroy, fork, snapshot (boots and restores).
    pub lifecycle: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: Duration::from_secs(3),
            quick: Duration::from_secs(30),
            lifecycle: Duration::from_secs(600),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("Invalid host agent address {url:?}")]
    Address {
        url: String,
        #[source]
        source: tonic::codegen::http::uri::InvalidUri,
    },
    #[error("Invalid host id {0:?} (not a DNS label)")]
    HostName(String),
    #[error("TLS settings")]
    Tls(#[source] wrenn_pki::PkiError),
}

/// A host agent reached over gRPC (`wrenn agent`, or [`crate::serve`] of any agent).
#[derive(Debug, Clone)]
pub struct RemoteAgent {
    client: HostAgentClient<Channel>,
    timeouts: Timeouts,
}

impl RemoteAgent {
    /// An agent at `url` (`http://host:port`); the connection opens on first use and
    /// reopens after failures.
    pub fn connect_lazy(url: &str, timeouts: Timeouts) -> Result<Self, ConnectError> {
        let endpoint = Channel::from_shared(url.to_string())
            .map_err(|source| ConnectError::Address {
                url: url.to_string(),
                source,
            })?
            .connect_timeout(timeouts.connect)
            .tcp_nodelay(true);
        Ok(RemoteAgent {
            client: HostAgentClient::new(endpoint.connect_lazy()),
            timeouts,
        })
    }

    /// Host `host_id`'s agent at `address` (`host:port`), over mutual TLS with the
    /// control plane's `identity`: the agent must present a host certificate for
    /// `host_id`. The connection opens on first use and reopens after failures.
    pub fn connect_tls(
        address: &str,
        host_id: &str,
        identity: &wrenn_pki::ControlPlaneIdentity,
        timeouts: Timeouts,
    ) -> Result<Self, ConnectError> {
        let url = format!("http://{address}");
        let endpoint = Channel::from_shared(url.clone())
            .map_err(|source| ConnectError::Address { url, source })?;
        let name =
            tokio_rustls::rustls::pki_types::ServerName::try_from(wrenn_pki::host_name(host_id))
                .map_err(|_| ConnectError::HostName(host_id.to_string()))?;
        let tls = identity.client_config().map_err(ConnectError::Tls)?;
        let connector = crate::tls::TlsConnector {
            tls: std::sync::Arc::new(tls),
            name,
            timeout: timeouts.connect,
        };
        Ok(RemoteAgent {
            client: HostAgentClient::new(endpoint.connect_with_connector_lazy(connector)),
            timeouts,
        })
    }

    fn quick<T>(&self, msg: T) -> Request<T> {
        with_timeout(msg, self.timeouts.quick)
    }

    fn lifecycle<T>(&self, msg: T) -> Request<T> {
        with_timeout(msg, self.timeouts.lifecycle)
    }
}

/// Sends a template's chunks as import frames; a failed source ends the upload with an
/// abort frame (the receiver keeps what it has) and nothing after it.
async fn forward_chunks(
    mut chunks: wrenn_core::host::TemplateChunks,
    tx: tokio::sync::mpsc::Sender<pb::ImportFrame>,
) {
    use futures_util::StreamExt;
    use pb::import_frame::Frame;
    while let Some(c) = chunks.next().await {
        let (frame, last) = match c {
            Ok(c) => (Frame::Chunk(cv::chunk_to(c)), false),
            Err(e) => (Frame::Abort(e.message), true),
        };
        if tx
            .send(pb::ImportFrame { frame: Some(frame) })
            .await
            .is_err()
            || last
        {
            return;
        }
    }
}

fn with_timeout<T>(msg: T, timeout: Duration) -> Request<T> {
    let mut r = Request::new(msg);
    r.set_timeout(timeout);
    r
}

fn err(s: Status) -> HostError {
    cv::host_error(&s)
}

fn cref(id: &CapsuleId) -> pb::CapsuleRef {
    pb::CapsuleRef { id: id.to_string() }
}

#[async_trait]
impl HostAgent for RemoteAgent {
    async fn versions(&self) -> Result<HostVersions, HostError> {
        let r = self.client.clone().versions(self.quick(pb::Empty {})).await;
        Ok(cv::versions_from(r.map_err(err)?.into_inner()))
    }

    async fn info(&self) -> Result<HostInfo, HostError> {
        let r = self.client.clone().info(self.quick(pb::Empty {})).await;
        Ok(cv::info_from(r.map_err(err)?.into_inner()))
    }

    async fn create(&self, spec: CapsuleSpec) -> Result<HostCapsule, HostError> {
        let r = self
            .client
            .clone()
            .create(self.lifecycle(cv::spec_to(spec)))
            .await;
        cv::capsule_from(r.map_err(err)?.into_inner())
    }

    async fn get(&self, id: &CapsuleId) -> Result<HostCapsule, HostError> {
        let r = self.client.clone().get(self.quick(cref(id))).await;
        cv::capsule_from(r.map_err(err)?.into_inner())
    }

    async fn list(&self) -> Result<Vec<HostCapsule>, HostError> {
        let r = self.client.clone().list(self.quick(pb::Empty {})).await;
        cv::capsules_from(r.map_err(err)?.into_inner())
    }

    async fn pause(&self, id: &CapsuleId, mode: PauseMode) -> Result<(), HostError> {
        let msg = pb::PauseRequest {
            id: id.to_string(),
            mode: cv::pause_mode_to(mode).into(),
        };
        self.client
            .clone()
            .pause(self.lifecycle(msg))
            .await
            .map_err(err)?;
        Ok(())
    }

    async fn resume(&self, id: &CapsuleId, mode: ResumeMode) -> Result<HostCapsule, HostError> {
        let msg = pb::ResumeRequest {
            id: id.to_string(),
            mode: cv::resume_mode_to(mode).into(),
        };
        let r = self.client.clone().resume(self.lifecycle(msg)).await;
        cv::capsule_from(r.map_err(err)?.into_inner())
    }

    async fn destroy(&self, id: &CapsuleId) -> Result<(), HostError> {
        self.client
            .clone()
            .destroy(self.lifecycle(cref(id)))
            .await
            .map_err(err)?;
        Ok(())
    }

    async fn ensure_space(&self, bytes: u64) -> Result<(), HostError> {
        self.client
            .clone()
            .ensure_space(self.quick(pb::SpaceRequest { bytes }))
            .await
            .map_err(err)?;
        Ok(())
    }

    async fn set_network(&self, id: &CapsuleId, policy: EgressPolicy) -> Result<(), HostError> {
        let msg = pb::NetworkRequest {
            id: id.to_string(),
            policy: Some(cv::policy_to(policy)),
        };
        self.client
            .clone()
            .set_network(self.lifecycle(msg))
            .await
            .map_err(err)?;
        Ok(())
    }

    async fn fork(
        &self,
        id: &CapsuleId,
        count: usize,
        labels: HashMap<String, String>,
    ) -> Result<Vec<HostCapsule>, HostError> {
        let msg = pb::ForkRequest {
            id: id.to_string(),
            count: count as u64,
            labels,
        };
        let r = self.client.clone().fork(self.lifecycle(msg)).await;
        cv::capsules_from(r.map_err(err)?.into_inner())
    }

    async fn snapshot(&self, id: &CapsuleId, name: &str) -> Result<HostTemplate, HostError> {
        let msg = pb::SnapshotRequest {
            id: id.to_string(),
            name: name.to_string(),
            disk_only: false,
        };
        let r = self.client.clone().snapshot(self.lifecycle(msg)).await;
        Ok(cv::template_from(r.map_err(err)?.into_inner()))
    }

    async fn snapshot_disk(&self, id: &CapsuleId, name: &str) -> Result<HostTemplate, HostError> {
        let msg = pb::SnapshotRequest {
            id: id.to_string(),
            name: name.to_string(),
            disk_only: true,
        };
        let r = self.client.clone().snapshot(self.lifecycle(msg)).await;
        Ok(cv::template_from(r.map_err(err)?.into_inner()))
    }

    async fn templates(&self) -> Result<Vec<HostTemplate>, HostError> {
        let r = self
            .client
            .clone()
            .templates(self.quick(pb::Empty {}))
            .await;
        Ok(r.map_err(err)?
            .into_inner()
            .templates
            .into_iter()
            .map(cv::template_from)
            .collect())
    }

    async fn template(&self, name: &str) -> Result<HostTemplate, HostError> {
        let msg = pb::TemplateRef {
            name: name.to_string(),
        };
        let r = self.client.clone().template(self.quick(msg)).await;
        Ok(cv::template_from(r.map_err(err)?.into_inner()))
    }

    async fn delete_template(&self, name: &str) -> Result<(), HostError> {
        let msg = pb::TemplateRef {
            name: name.to_string(),
        };
        self.client
            .clone()
            .delete_template(self.lifecycle(msg))
            .await
            .map_err(err)?;
        Ok(())
    }

    async fn envd(&self, id: &CapsuleId) -> Result<Endpoint, HostError> {
        let r = self.client.clone().envd(self.quick(cref(id))).await;
        cv::endpoint_from(r.map_err(err)?.into_inner())
    }

    async fn port(&self, id: &CapsuleId, port: u16) -> Result<Endpoint, HostError> {
        let msg = pb::PortRequest {
            id: id.to_string(),
            port: u32::from(port),
        };
        let r = self.client.clone().port(self.quick(msg)).await;
        cv::endpoint_from(r.map_err(err)?.into_inner())
    }

    async fn template_manifest(
        &self,
        name: &str,
    ) -> Result<wrenn_core::template::TemplateManifest, HostError> {
        let msg = pb::TemplateRef { name: name.into() };
        // Reading the files for their checksums takes a while on large templates.
        let r = self
            .client
            .clone()
            .template_manifest(self.lifecycle(msg))
            .await;
        cv::manifest_from(r.map_err(err)?.into_inner())
    }

    async fn export_template(
        &self,
        name: &str,
        from: std::collections::BTreeMap<String, u64>,
    ) -> Result<wrenn_core::host::TemplateChunks, HostError> {
        use futures_util::StreamExt;
        let msg = pb::ExportRequest {
            name: name.into(),
            from: from.into_iter().collect(),
        };
        let r = self
            .client
            .clone()
            .export_template(self.lifecycle(msg))
            .await;
        let chunks = r.map_err(err)?.into_inner();
        Ok(Box::pin(chunks.map(|c| c.map(cv::chunk_from).map_err(err))))
    }

    async fn import_state(
        &self,
        manifest: &wrenn_core::template::TemplateManifest,
    ) -> Result<std::collections::BTreeMap<String, u64>, HostError> {
        let r = self
            .client
            .clone()
            .import_state(self.lifecycle(cv::manifest_to(manifest)))
            .await;
        Ok(r.map_err(err)?.into_inner().have.into_iter().collect())
    }

    async fn import_template(
        &self,
        manifest: wrenn_core::template::TemplateManifest,
        chunks: wrenn_core::host::TemplateChunks,
    ) -> Result<HostTemplate, HostError> {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let first = pb::ImportFrame {
            frame: Some(pb::import_frame::Frame::Manifest(cv::manifest_to(
                &manifest,
            ))),
        };
        // The channel is new and has room.
        let _ = tx.try_send(first);
        tokio::spawn(forward_chunks(chunks, tx));
        let frames = tokio_stream::wrappers::ReceiverStream::new(rx);
        let r = self
            .client
            .clone()
            .import_template(self.lifecycle(frames))
            .await;
        Ok(cv::template_from(r.map_err(err)?.into_inner()))
    }

    async fn open(&self, id: &CapsuleId, port: u16) -> Result<GuestStream, HostError> {
        let mut client = self.client.clone();
        let wait = self.timeouts.quick;
        crate::tunnel::open(id, port, |frames| async move {
            // The deadline covers the opening only: the connection lives as long as
            // its users keep it.
            let r = tokio::time::timeout(wait, client.open(Request::new(frames)))
                .await
                .map_err(|_| {
                    HostError::new(
                        HostErrorKind::Timeout,
                        format!("the host agent did not connect to port {port} in {wait:?}"),
                    )
                })?;
            Ok(r.map_err(err)?.into_inner())
        })
        .await
    }

    async fn metrics(
        &self,
        id: &CapsuleId,
        range: Duration,
    ) -> Result<Vec<MetricPoint>, HostError> {
        let msg = pb::MetricsRequest {
            id: id.to_string(),
            range_ms: cv::duration_ms(range),
        };
        let r = self.client.clone().metrics(self.quick(msg)).await;
        Ok(cv::points_of(r.map_err(err)?.into_inner()))
    }

    async fn latest_metric(
        &self,
        id: &CapsuleId,
        within: Duration,
    ) -> Result<Option<MetricPoint>, HostError> {
        let msg = pb::MetricsRequest {
            id: id.to_string(),
            range_ms: cv::duration_ms(within),
        };
        let r = self.client.clone().latest_metric(self.quick(msg)).await;
        Ok(r.map_err(err)?.into_inner().point.map(cv::point_from))
    }

    async fn export_metrics(&self, id: &CapsuleId) -> Result<Option<TierSnapshot>, HostError> {
        let r = self
            .client
            .clone()
            .export_metrics(self.quick(cref(id)))
            .await;
        Ok(r.map_err(err)?.into_inner().history.map(cv::history_from))
    }

    async fn import_metrics(&self, id: &CapsuleId, saved: TierSnapshot) -> Result<(), HostError> {
        let msg = pb::ImportMetricsRequest {
            id: id.to_string(),
            history: Some(cv::history_to(saved)),
        };
        self.client
            .clone()
            .import_metrics(self.quick(msg))
            .await
            .map_err(err)?;
        Ok(())
    }

    async fn pools(&self) -> Result<Vec<PoolStats>, HostError> {
        let r = self.client.clone().pools(self.quick(pb::Empty {})).await;
        Ok(r.map_err(err)?
            .into_inner()
            .pools
            .into_iter()
            .map(cv::pool_from)
            .collect())
    }

    async fn inspect_image(&self, spec: ImageSpec) -> Result<HostImage, HostError> {
        let msg = cv::image_spec_to(spec);
        let r = self.client.clone().inspect_image(self.quick(msg)).await;
        Ok(cv::image_from(r.map_err(err)?.into_inner()))
    }

    async fn import_image(&self, spec: ImageSpec) -> Result<HostImage, HostError> {
        let msg = cv::image_spec_to(spec);
        let r = self.client.clone().import_image(self.lifecycle(msg)).await;
        Ok(cv::image_from(r.map_err(err)?.into_inner()))
    }

    async fn set_pool(&self, template: &str, size: usize) -> Result<(), HostError> {
        let msg = pb::SetPoolRequest {
            template: template.to_string(),
            size: size as u64,
        };
        self.client
            .clone()
            .set_pool(self.lifecycle(msg))
            .await
            .map_err(err)?;
        Ok(())
    }

    async fn drain(&self, draining: bool) -> Result<(), HostError> {
        let msg = pb::DrainRequest { draining };
        self.client
            .clone()
            .drain(self.quick(msg))
            .await
            .map_err(err)?;
        Ok(())
    }
}
