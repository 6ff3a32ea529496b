//! Connect RPC glue for axum: request extraction (both codecs, unary and
//! server-stream requests), unary replies, error responses and response streams.

use crate::connect::{
    decode_single_envelope, encode_end_stream, encode_envelope, CallKind, Codec, ConnectError,
};
use axum::body::Body;
use axum::extract::{FromRequest, Request};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde::{de::DeserializeOwned, Serialize};
use std::time::Duration;
use tokio::sync::mpsc;

/// Largest unary request body accepted.
const MAX_REQUEST: usize = 16 * 1024 * 1024;

/// A Connect error answered as a unary error response.
#[derive(Debug)]
pub struct RpcError(pub ConnectError);

impl From<ConnectError> for RpcError {
    fn from(e: ConnectError) -> Self {
        RpcError(e)
    }
}

impl IntoResponse for RpcError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.0.code.http_status())
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let body = serde_json::to_vec(&self.0).unwrap_or_default();
        (
            status,
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            body,
        )
            .into_response()
    }
}

/// A decoded Connect request.
#[derive(Debug)]
pub struct Rpc<M> {
    pub msg: M,
    pub codec: Codec,
    pub headers: HeaderMap,
}

/// Why a request could not be decoded; streaming calls report it in-stream.
#[derive(Debug)]
pub struct RpcRejection {
    error: ConnectError,
    codec: Codec,
    kind: Option<CallKind>,
}

impl IntoResponse for RpcRejection {
    fn into_response(self) -> Response {
        match self.kind {
            None => (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                [("accept-post", "application/json, application/proto, application/connect+json, application/connect+proto")],
                self.error.message,
            )
                .into_response(),
            Some(CallKind::Unary) => RpcError(self.error).into_response(),
            Some(CallKind::Stream) => stream_error_response(self.codec, self.error),
        }
    }
}

impl<S, M> FromRequest<S> for Rpc<M>
where
    S: Send + Sync,
    M: prost::Message + DeserializeOwned + Default,
{
    type Rejection = RpcRejection;

    async fn from_request(req: Request, _state: &S) -> Result<Self, Self::Rejection> {
        let ct = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let Some((codec, kind)) = Codec::from_content_type(ct) else {
            return Err(RpcRejection {
                error: ConnectError::invalid_argument(format!("unsupported content type {ct:?}")),
                codec: Codec::Json,
                kind: None,
            });
        };
        let reject = |error| RpcRejection {
            error,
            codec,
            kind: Some(kind),
        };
        let headers = req.headers().clone();
        let body = axum::body::to_bytes(req.into_body(), MAX_REQUEST)
            .await
            .map_err(|e| {
                reject(ConnectError::invalid_argument(format!(
                    "reading request body: {e}"
                )))
            })?;
        let payload = match kind {
            CallKind::Unary => body,
            CallKind::Stream => decode_single_envelope(&body).map_err(reject)?,
        };
        let msg = codec.decode(&payload).map_err(reject)?;
        Ok(Rpc {
            msg,
            codec,
            headers,
        })
    }
}

impl<M> Rpc<M> {
    /// A unary reply in the request's codec.
    pub fn reply<R: prost::Message + Serialize>(&self, msg: &R) -> Response {
        let ct = self.codec.content_type(CallKind::Unary);
        (
            StatusCode::OK,
            [(header::CONTENT_TYPE, ct)],
            self.codec.encode(msg),
        )
            .into_response()
    }

    /// Keepalive interval requested by the client (`Keepalive-Ping-Interval`, seconds).
    pub fn keepalive_interval(&self) -> Duration {
        self.headers
            .get("keepalive-ping-interval")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .filter(|s| *s > 0)
            .map(Duration::from_secs)
            .unwrap_or(Duration::from_secs(90))
    }
}

/// A full streaming response that holds only an end-of-stream error.
pub fn stream_error_response(codec: Codec, error: ConnectError) -> Response {
    let ct = codec.content_type(CallKind::Stream);
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, ct)],
        encode_end_stream(Some(error)),
    )
        .into_response()
}

/// The sending half of a streaming response.
#[derive(Debug)]
pub struct StreamSender {
    codec: Codec,
    tx: mpsc::Sender<Result<Bytes, std::io::Error>>,
}

/// The client went away; stop producing.
#[derive(Debug)]
pub struct Disconnected;

impl StreamSender {
    pub async fn send<M: prost::Message + Serialize>(&self, msg: &M) -> Result<(), Disconnected> {
        let frame = encode_envelope(0, &self.codec.encode(msg));
        self.tx.send(Ok(frame)).await.map_err(|_| Disconnected)
    }

    /// Sends the end-of-stream message and closes the stream.
    pub async fn finish(self, error: Option<ConnectError>) {
        let _ = self.tx.send(Ok(encode_end_stream(error))).await;
    }

    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }

    /// Resolves when the client has gone away.
    pub async fn closed(&self) {
        self.tx.closed().await
    }
}

/// Opens a streaming response; frames sent on the returned sender reach the client in order.
pub fn open_stream(codec: Codec) -> (StreamSender, Response) {
    let (tx, mut rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(16);
    let stream = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx));
    let ct = codec.content_type(CallKind::Stream);
    let resp = Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, ct)
        .header(header::CACHE_CONTROL, "no-store")
        .header("x-accel-buffering", "no")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response());
    (StreamSender { codec, tx }, resp)
}
