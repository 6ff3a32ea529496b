//! Connections to capsule ports carried over the agent's gRPC connection (`Open`): the
//! control plane reaches a guest's envd and ports through the host's agent, over the
//! one authenticated connection it already has, wherever the host is.

use crate::convert::status;
use crate::proto as pb;
use crate::proto::tunnel_frame::Frame;
use bytes::{Bytes, BytesMut};
use futures_util::{Stream, StreamExt};
use std::pin::Pin;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tonic::{Status, Streaming};
use wrenn_core::host::{GuestStream, HostAgent, HostError, HostErrorKind};
use wrenn_core::id::CapsuleId;

/// Largest data frame: a read of the connection is sent as it comes, up to this.
const FRAME: usize = 64 * 1024;

/// Frames queued towards the agent before the writer waits.
const QUEUE: usize = 8;

pub(crate) type FrameStream = Pin<Box<dyn Stream<Item = Result<pb::TunnelFrame, Status>> + Send>>;

fn invalid(message: impl Into<String>) -> Status {
    status(HostError::new(HostErrorKind::InvalidArgument, message))
}

fn data(b: Bytes) -> pb::TunnelFrame {
    pb::TunnelFrame {
        frame: Some(Frame::Data(b)),
    }
}

/// The agent's side: reads the `open` frame, connects through `agent`, then copies
/// both ways until either side ends.
pub(crate) async fn serve(
    agent: &dyn HostAgent,
    mut inbound: Streaming<pb::TunnelFrame>,
    closing: Option<tokio::sync::watch::Receiver<bool>>,
) -> Result<FrameStream, Status> {
    let open = match inbound.message().await? {
        Some(pb::TunnelFrame {
            frame: Some(Frame::Open(open)),
        }) => open,
        _ => return Err(invalid("a tunnel starts with an open frame")),
    };
    let id = crate::convert::capsule_id(&open.id).map_err(status)?;
    let port = u16::try_from(open.port)
        .map_err(|_| invalid(format!("port {} is not a TCP port", open.port)))?;
    let conn = agent.open(&id, port).await.map_err(status)?;
    let (rd, mut wr) = tokio::io::split(conn);
    let closed = move || {
        let mut closing = closing.clone();
        async move {
            match closing.as_mut() {
                Some(c) => {
                    let _ = c.wait_for(|v| *v).await;
                }
                None => std::future::pending::<()>().await,
            }
        }
    };
    let until_closed = closed();
    tokio::spawn(async move {
        let closed = closed();
        tokio::pin!(closed);
        loop {
            let next = tokio::select! {
                m = inbound.message() => m,
                _ = &mut closed => return,
            };
            match next {
                Ok(Some(pb::TunnelFrame {
                    frame: Some(Frame::Data(b)),
                })) => {
                    if wr.write_all(&b).await.is_err() {
                        return;
                    }
                }
                // Unknown frames are skipped; only data is sent after `open`.
                Ok(Some(_)) => {}
                // The control plane finished sending: the guest sees end of input.
                Ok(None) => {
                    let _ = wr.shutdown().await;
                    return;
                }
                // Reset or broken: the connection goes with the read half.
                Err(_) => return,
            }
        }
    });
    let out = futures_util::stream::unfold(rd, |mut rd| async move {
        let mut buf = BytesMut::with_capacity(FRAME);
        match rd.read_buf(&mut buf).await {
            Ok(0) => None,
            Ok(_) => Some((Ok(data(buf.freeze())), rd)),
            Err(e) => Some((
                Err(Status::unavailable(format!("capsule connection: {e}"))),
                rd,
            )),
        }
    })
    // An error ends the stream after it is sent.
    .scan(false, |failed, item| {
        let next = if *failed { None } else { Some(item) };
        *failed = matches!(next, Some(Err(_)));
        std::future::ready(next)
    })
    .take_until(until_closed);
    Ok(Box::pin(out))
}

/// The control plane's side: opens a tunnel with `call` and gives it back as a byte
/// stream (a pipe pumped both ways by two tasks that end with it).
pub(crate) async fn open<F, Fut>(
    id: &CapsuleId,
    port: u16,
    call: F,
) -> Result<GuestStream, HostError>
where
    F: FnOnce(tokio_stream::wrappers::ReceiverStream<pb::TunnelFrame>) -> Fut,
    Fut: std::future::Future<Output = Result<Streaming<pb::TunnelFrame>, HostError>>,
{
    let (tx, rx) = mpsc::channel(QUEUE);
    let first = pb::TunnelFrame {
        frame: Some(Frame::Open(pb::TunnelOpen {
            id: id.to_string(),
            port: u32::from(port),
        })),
    };
    // The channel is new and has room: this cannot wait or fail.
    let _ = tx.try_send(first);
    let mut inbound = call(tokio_stream::wrappers::ReceiverStream::new(rx)).await?;
    let (near, far) = tokio::io::duplex(2 * FRAME);
    let (mut far_rd, mut far_wr) = tokio::io::split(far);
    tokio::spawn(async move {
        loop {
            let mut buf = BytesMut::with_capacity(FRAME);
            match far_rd.read_buf(&mut buf).await {
                // End of input (or the caller dropped the stream): dropping the sender
                // ends the request stream.
                Ok(0) | Err(_) => return,
                Ok(_) => {
                    if tx.send(data(buf.freeze())).await.is_err() {
                        return;
                    }
                }
            }
        }
    });
    tokio::spawn(async move {
        while let Some(Ok(frame)) = inbound.next().await {
            if let Some(Frame::Data(b)) = frame.frame {
                if far_wr.write_all(&b).await.is_err() {
                    // The caller is gone: dropping `inbound` cancels the call.
                    return;
                }
            }
        }
        let _ = far_wr.shutdown().await;
    });
    Ok(Box::new(near))
}
