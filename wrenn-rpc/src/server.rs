//! Serves any [`HostAgent`] over gRPC: what `wrenn agent` runs in front of its host.

use crate::convert::{self as cv, capsule_id, status};
use crate::proto as pb;
use crate::proto::host_agent_server::{HostAgent as Rpc, HostAgentServer};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tonic::{Request, Response, Status};
use wrenn_core::host::HostAgent;

/// The gRPC service over one host agent.
#[derive(Debug, Clone)]
pub struct AgentService {
    agent: Arc<dyn HostAgent>,
    /// Turns true when the server shuts down: open capsule connections end then
    /// (they would otherwise hold a graceful shutdown for as long as they last).
    closing: Option<tokio::sync::watch::Receiver<bool>>,
}

impl AgentService {
    pub fn new(agent: Arc<dyn HostAgent>) -> Self {
        AgentService {
            agent,
            closing: None,
        }
    }

    /// A service whose capsule connections end when `closing` turns true.
    pub fn closing_on(
        agent: Arc<dyn HostAgent>,
        closing: tokio::sync::watch::Receiver<bool>,
    ) -> Self {
        AgentService {
            agent,
            closing: Some(closing),
        }
    }

    /// The tonic service, to add to a server.
    pub fn into_server(self) -> HostAgentServer<AgentService> {
        HostAgentServer::new(self)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("gRPC server failed")]
    Transport(#[source] tonic::transport::Error),
}

/// Serves `agent` on `listener` until `shutdown` completes.
pub async fn serve(
    agent: Arc<dyn HostAgent>,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    // Small frames (replies, tunnel bytes, streamed chunks) go out at once: tonic's
    // own `tcp_nodelay` applies only to sockets it accepts itself, not to a stream of
    // connections given to it, where Nagle's algorithm held each chunk of a template
    // copy for a delayed ACK (~40 ms).
    let incoming = tokio_stream::StreamExt::map(
        tokio_stream::wrappers::TcpListenerStream::new(listener),
        |conn| {
            conn.inspect(|tcp| {
                let _ = tcp.set_nodelay(true);
            })
        },
    );
    let (service, shutdown) = closing_with(agent, shutdown);
    tonic::transport::Server::builder()
        .add_service(service.into_server())
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
        .map_err(ServeError::Transport)
}

/// The service over `agent`, and a shutdown that first ends its capsule connections.
pub(crate) fn closing_with(
    agent: Arc<dyn HostAgent>,
    shutdown: impl Future<Output = ()> + Send,
) -> (AgentService, impl Future<Output = ()> + Send) {
    let (tx, rx) = tokio::sync::watch::channel(false);
    let shutdown = async move {
        shutdown.await;
        let _ = tx.send(true);
    };
    (AgentService::closing_on(agent, rx), shutdown)
}

type Reply<T> = Result<Response<T>, Status>;

// The tonic service trait fixes this result type.
#[allow(clippy::result_large_err)]
fn ok<T>(v: T) -> Reply<T> {
    Ok(Response::new(v))
}

#[tonic::async_trait]
impl Rpc for AgentService {
    async fn versions(&self, _: Request<pb::Empty>) -> Reply<pb::Versions> {
        ok(cv::versions_to(
            self.agent.versions().await.map_err(status)?,
        ))
    }

    async fn info(&self, _: Request<pb::Empty>) -> Reply<pb::HostInfo> {
        ok(cv::info_to(self.agent.info().await.map_err(status)?))
    }

    async fn create(&self, req: Request<pb::CapsuleSpec>) -> Reply<pb::Capsule> {
        let spec = cv::spec_from(req.into_inner()).map_err(status)?;
        ok(cv::capsule_to(
            self.agent.create(spec).await.map_err(status)?,
        ))
    }

    async fn get(&self, req: Request<pb::CapsuleRef>) -> Reply<pb::Capsule> {
        let id = capsule_id(&req.into_inner().id).map_err(status)?;
        ok(cv::capsule_to(self.agent.get(&id).await.map_err(status)?))
    }

    async fn list(&self, _: Request<pb::Empty>) -> Reply<pb::CapsuleList> {
        let list = self.agent.list().await.map_err(status)?;
        ok(pb::CapsuleList {
            capsules: list.into_iter().map(cv::capsule_to).collect(),
        })
    }

    async fn pause(&self, req: Request<pb::PauseRequest>) -> Reply<pb::Empty> {
        let r = req.into_inner();
        let id = capsule_id(&r.id).map_err(status)?;
        let mode = cv::pause_mode_from(r.mode).map_err(status)?;
        self.agent.pause(&id, mode).await.map_err(status)?;
        ok(pb::Empty {})
    }

    async fn resume(&self, req: Request<pb::ResumeRequest>) -> Reply<pb::Capsule> {
        let r = req.into_inner();
        let id = capsule_id(&r.id).map_err(status)?;
        let mode = cv::resume_mode_from(r.mode).map_err(status)?;
        ok(cv::capsule_to(
            self.agent.resume(&id, mode).await.map_err(status)?,
        ))
    }

    async fn destroy(&self, req: Request<pb::CapsuleRef>) -> Reply<pb::Empty> {
        let id = capsule_id(&req.into_inner().id).map_err(status)?;
        self.agent.destroy(&id).await.map_err(status)?;
        ok(pb::Empty {})
    }

    async fn ensure_space(&self, req: Request<pb::SpaceRequest>) -> Reply<pb::Empty> {
        let bytes = req.into_inner().bytes;
        self.agent.ensure_space(bytes).await.map_err(status)?;
        ok(pb::Empty {})
    }

    async fn set_network(&self, req: Request<pb::NetworkRequest>) -> Reply<pb::Empty> {
        let r = req.into_inner();
        let id = capsule_id(&r.id).map_err(status)?;
        let policy = cv::policy_from(r.policy).map_err(status)?;
        self.agent.set_network(&id, policy).await.map_err(status)?;
        ok(pb::Empty {})
    }

    async fn fork(&self, req: Request<pb::ForkRequest>) -> Reply<pb::CapsuleList> {
        let r = req.into_inner();
        let id = capsule_id(&r.id).map_err(status)?;
        let count = usize::try_from(r.count).unwrap_or(usize::MAX);
        let forks = self
            .agent
            .fork(&id, count, r.labels)
            .await
            .map_err(status)?;
        ok(pb::CapsuleList {
            capsules: forks.into_iter().map(cv::capsule_to).collect(),
        })
    }

    async fn snapshot(&self, req: Request<pb::SnapshotRequest>) -> Reply<pb::Template> {
        let r = req.into_inner();
        let id = capsule_id(&r.id).map_err(status)?;
        let saved = if r.disk_only {
            self.agent.snapshot_disk(&id, &r.name).await
        } else {
            self.agent.snapshot(&id, &r.name).await
        };
        ok(cv::template_to(saved.map_err(status)?))
    }

    async fn templates(&self, _: Request<pb::Empty>) -> Reply<pb::TemplateList> {
        let list = self.agent.templates().await.map_err(status)?;
        ok(pb::TemplateList {
            templates: list.into_iter().map(cv::template_to).collect(),
        })
    }

    async fn template(&self, req: Request<pb::TemplateRef>) -> Reply<pb::Template> {
        let name = req.into_inner().name;
        ok(cv::template_to(
            self.agent.template(&name).await.map_err(status)?,
        ))
    }

    async fn delete_template(&self, req: Request<pb::TemplateRef>) -> Reply<pb::Empty> {
        let name = req.into_inner().name;
        self.agent.delete_template(&name).await.map_err(status)?;
        ok(pb::Empty {})
    }

    async fn envd(&self, req: Request<pb::CapsuleRef>) -> Reply<pb::Endpoint> {
        let id = capsule_id(&req.into_inner().id).map_err(status)?;
        ok(cv::endpoint_to(self.agent.envd(&id).await.map_err(status)?))
    }

    type ExportTemplateStream = std::pin::Pin<
        Box<dyn futures_util::Stream<Item = Result<pb::TemplateChunk, Status>> + Send>,
    >;

    async fn template_manifest(&self, req: Request<pb::TemplateRef>) -> Reply<pb::Manifest> {
        let m = self
            .agent
            .template_manifest(&req.into_inner().name)
            .await
            .map_err(status)?;
        ok(cv::manifest_to(&m))
    }

    async fn export_template(
        &self,
        req: Request<pb::ExportRequest>,
    ) -> Reply<Self::ExportTemplateStream> {
        use futures_util::StreamExt;
        let r = req.into_inner();
        let from = r.from.into_iter().collect();
        let chunks = self
            .agent
            .export_template(&r.name, from)
            .await
            .map_err(status)?;
        // The stream's item type is tonic's.
        #[allow(clippy::result_large_err)]
        let to_wire = |c: Result<
            wrenn_core::template::TemplateChunk,
            wrenn_core::host::HostError,
        >| { c.map(cv::chunk_to).map_err(status) };
        ok(Box::pin(chunks.map(to_wire)))
    }

    async fn import_state(&self, req: Request<pb::Manifest>) -> Reply<pb::ImportProgress> {
        let m = cv::manifest_from(req.into_inner()).map_err(status)?;
        let have = self.agent.import_state(&m).await.map_err(status)?;
        ok(pb::ImportProgress {
            have: have.into_iter().collect(),
        })
    }

    async fn import_template(
        &self,
        req: Request<tonic::Streaming<pb::ImportFrame>>,
    ) -> Reply<pb::Template> {
        use futures_util::StreamExt;
        use pb::import_frame::Frame;
        let mut inbound = req.into_inner();
        let manifest = match inbound.message().await? {
            Some(pb::ImportFrame {
                frame: Some(Frame::Manifest(m)),
            }) => cv::manifest_from(m).map_err(status)?,
            _ => {
                return Err(status(wrenn_core::host::HostError::new(
                    wrenn_core::host::HostErrorKind::InvalidArgument,
                    "a template import starts with its manifest",
                )))
            }
        };
        let chunks = inbound.map(|f| match f {
            Ok(pb::ImportFrame {
                frame: Some(Frame::Chunk(c)),
            }) => Ok(cv::chunk_from(c)),
            Ok(pb::ImportFrame {
                frame: Some(Frame::Abort(why)),
            }) => Err(wrenn_core::host::HostError::new(
                wrenn_core::host::HostErrorKind::Unavailable,
                format!("the copy's source failed: {why}"),
            )),
            Ok(_) => Err(wrenn_core::host::HostError::new(
                wrenn_core::host::HostErrorKind::InvalidArgument,
                "only chunks follow a template import's manifest",
            )),
            Err(s) => Err(cv::host_error(&s)),
        });
        let t = self
            .agent
            .import_template(manifest, Box::pin(chunks))
            .await
            .map_err(status)?;
        ok(cv::template_to(t))
    }

    type OpenStream = crate::tunnel::FrameStream;

    async fn open(
        &self,
        req: Request<tonic::Streaming<pb::TunnelFrame>>,
    ) -> Reply<Self::OpenStream> {
        ok(
            crate::tunnel::serve(self.agent.as_ref(), req.into_inner(), self.closing.clone())
                .await?,
        )
    }

    async fn port(&self, req: Request<pb::PortRequest>) -> Reply<pb::Endpoint> {
        let r = req.into_inner();
        let id = capsule_id(&r.id).map_err(status)?;
        let port = u16::try_from(r.port).map_err(|_| {
            status(wrenn_core::host::HostError::new(
                wrenn_core::host::HostErrorKind::InvalidArgument,
                format!("port {} is not a TCP port", r.port),
            ))
        })?;
        ok(cv::endpoint_to(
            self.agent.port(&id, port).await.map_err(status)?,
        ))
    }

    async fn metrics(&self, req: Request<pb::MetricsRequest>) -> Reply<pb::MetricPoints> {
        let r = req.into_inner();
        let id = capsule_id(&r.id).map_err(status)?;
        let range = Duration::from_millis(r.range_ms);
        ok(cv::points_msg(
            self.agent.metrics(&id, range).await.map_err(status)?,
        ))
    }

    async fn latest_metric(&self, req: Request<pb::MetricsRequest>) -> Reply<pb::LatestMetric> {
        let r = req.into_inner();
        let id = capsule_id(&r.id).map_err(status)?;
        let within = Duration::from_millis(r.range_ms);
        let point = self
            .agent
            .latest_metric(&id, within)
            .await
            .map_err(status)?;
        ok(pb::LatestMetric {
            point: point.map(cv::point_to),
        })
    }

    async fn export_metrics(&self, req: Request<pb::CapsuleRef>) -> Reply<pb::ExportedMetrics> {
        let id = capsule_id(&req.into_inner().id).map_err(status)?;
        let history = self.agent.export_metrics(&id).await.map_err(status)?;
        ok(pb::ExportedMetrics {
            history: history.map(cv::history_to),
        })
    }

    async fn import_metrics(&self, req: Request<pb::ImportMetricsRequest>) -> Reply<pb::Empty> {
        let r = req.into_inner();
        let id = capsule_id(&r.id).map_err(status)?;
        let history = cv::history_from(r.history.unwrap_or_default());
        self.agent
            .import_metrics(&id, history)
            .await
            .map_err(status)?;
        ok(pb::Empty {})
    }

    async fn pools(&self, _: Request<pb::Empty>) -> Reply<pb::PoolList> {
        let pools = self.agent.pools().await.map_err(status)?;
        ok(pb::PoolList {
            pools: pools.into_iter().map(cv::pool_to).collect(),
        })
    }

    async fn inspect_image(&self, req: Request<pb::ImageRequest>) -> Reply<pb::Image> {
        let spec = cv::image_spec_from(req.into_inner());
        ok(cv::image_to(
            self.agent.inspect_image(spec).await.map_err(status)?,
        ))
    }

    async fn import_image(&self, req: Request<pb::ImageRequest>) -> Reply<pb::Image> {
        let spec = cv::image_spec_from(req.into_inner());
        ok(cv::image_to(
            self.agent.import_image(spec).await.map_err(status)?,
        ))
    }

    async fn set_pool(&self, req: Request<pb::SetPoolRequest>) -> Reply<pb::Empty> {
        let r = req.into_inner();
        let size = usize::try_from(r.size).unwrap_or(usize::MAX);
        self.agent
            .set_pool(&r.template, size)
            .await
            .map_err(status)?;
        ok(pb::Empty {})
    }

    async fn drain(&self, req: Request<pb::DrainRequest>) -> Reply<pb::Empty> {
        self.agent
            .drain(req.into_inner().draining)
            .await
            .map_err(status)?;
        ok(pb::Empty {})
    }
}
