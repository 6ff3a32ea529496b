//! How host-side clients open their connections: hyper's connector over any [`Dial`]
//! (a plain TCP connection, or one a host agent opens to a capsule's port).

use futures_util::future::BoxFuture;
use hyper::Uri;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::TokioIo;
use std::fmt::Debug;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use wrenn_core::host::GuestStream;

/// Opens a connection to what a request URI names.
pub trait Dial: Send + Sync + Debug {
    fn dial(&self, uri: &Uri) -> BoxFuture<'static, io::Result<GuestStream>>;
}

/// Connects over TCP to the URI's `address:port` (no name resolution).
#[derive(Clone, Copy, Debug)]
pub struct TcpDial {
    pub timeout: Duration,
}

impl Dial for TcpDial {
    fn dial(&self, uri: &Uri) -> BoxFuture<'static, io::Result<GuestStream>> {
        let addr = uri
            .authority()
            .and_then(|a| a.as_str().parse::<SocketAddr>().ok());
        let timeout = self.timeout;
        Box::pin(async move {
            let addr = addr.ok_or_else(|| {
                io::Error::new(io::ErrorKind::InvalidInput, "not an address:port URI")
            })?;
            let s = tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr))
                .await
                .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
            s.set_nodelay(true)?;
            Ok(Box::new(s) as GuestStream)
        })
    }
}

/// A connection a [`Dial`] opened, as hyper's client uses it.
pub struct Dialed(TokioIo<GuestStream>);

impl Debug for Dialed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Dialed")
    }
}

impl hyper::rt::Read for Dialed {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for Dialed {
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

impl Connection for Dialed {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl Dialed {
    /// The byte stream, for callers that speak over it themselves (upgrades).
    pub fn into_inner(self) -> GuestStream {
        self.0.into_inner()
    }
}

/// hyper's connector over a [`Dial`].
#[derive(Clone, Debug)]
pub struct DialConnector(Arc<dyn Dial>);

impl DialConnector {
    pub fn new(dial: Arc<dyn Dial>) -> Self {
        DialConnector(dial)
    }

    /// Opens a connection to `uri` outside any pool.
    pub async fn open(&self, uri: &Uri) -> io::Result<Dialed> {
        Ok(Dialed(TokioIo::new(self.0.dial(uri).await?)))
    }
}

impl tower_service::Service<Uri> for DialConnector {
    type Response = Dialed;
    type Error = io::Error;
    type Future = BoxFuture<'static, io::Result<Dialed>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let dialing = self.0.dial(&uri);
        Box::pin(async move { Ok(Dialed(TokioIo::new(dialing.await?))) })
    }
}
