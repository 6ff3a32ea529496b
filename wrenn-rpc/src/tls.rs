//! The agent connection over mutual TLS (see `wrenn_pki`): the agent accepts only
//! clients with a control-plane certificate; the control plane accepts only the
//! certificate of the host it meant to reach.

use futures_util::future::BoxFuture;
use hyper_util::rt::TokioIo;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::rustls::{ClientConfig, ServerConfig};
use wrenn_core::host::HostAgent;

/// Longest a TLS handshake may take before the connection is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A client connection the agent accepted.
struct Accepted(tokio_rustls::server::TlsStream<TcpStream>);

impl tonic::transport::server::Connected for Accepted {
    type ConnectInfo = ();

    fn connect_info(&self) -> Self::ConnectInfo {}
}

impl AsyncRead for Accepted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for Accepted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// Serves `agent` on `listener` over mutual TLS until `shutdown` completes. Handshakes
/// run beside the accept loop; a client without a control-plane certificate is
/// refused and logged.
pub async fn serve_tls(
    agent: Arc<dyn HostAgent>,
    listener: tokio::net::TcpListener,
    tls: Arc<ServerConfig>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), crate::ServeError> {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let (tx, rx) = tokio::sync::mpsc::channel::<io::Result<Accepted>>(64);
    let accepting = tokio::spawn(async move {
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(Ok(Accepted(tls))).await;
                    }
                    Ok(Err(e)) => tracing::warn!(%peer, error = %e,
                        "refused a connection: no valid control-plane certificate"),
                    Err(_) => {
                        tracing::warn!(%peer, "refused a connection: TLS handshake timed out")
                    }
                }
            });
        }
    });
    let (service, shutdown) = crate::server::closing_with(agent, shutdown);
    let served = tonic::transport::Server::builder()
        .add_service(service.into_server())
        .serve_with_incoming_shutdown(tokio_stream::wrappers::ReceiverStream::new(rx), shutdown)
        .await
        .map_err(crate::ServeError::Transport);
    accepting.abort();
    served
}

/// Opens TLS connections to one agent, checking that its certificate names `host`.
#[derive(Clone)]
pub(crate) struct TlsConnector {
    pub tls: Arc<ClientConfig>,
    pub name: ServerName<'static>,
    pub timeout: Duration,
}

impl tower_service::Service<http::Uri> for TlsConnector {
    type Response = TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;
    type Error = io::Error;
    type Future = BoxFuture<'static, io::Result<Self::Response>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let c = self.clone();
        Box::pin(async move {
            let authority = uri
                .authority()
                .map(|a| a.as_str().to_string())
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no address"))?;
            let connect = async {
                let tcp = TcpStream::connect(authority.as_str()).await?;
                tcp.set_nodelay(true)?;
                tokio_rustls::TlsConnector::from(c.tls)
                    .connect(c.name, tcp)
                    .await
            };
            let tls = tokio::time::timeout(c.timeout, connect)
                .await
                .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
            Ok(TokioIo::new(tls))
        })
    }
}
