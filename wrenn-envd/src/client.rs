//! Host-side envd client: implements `wrenn_core::guest::GuestAgent` over HTTP/1.1
//! with the Connect JSON codec, sharing the wire types with the guest daemon.

use crate::connect::{encode_envelope, Code, ConnectError, EndStream, EnvelopeDecoder};
use crate::dial::{Dial, DialConnector, TcpDial};
use crate::proto::filesystem::{
    EntryInfo, FileType, ListDirRequest, ListDirResponse, MakeDirRequest, MakeDirResponse,
    RemoveRequest, StatRequest, StatResponse,
};
use crate::proto::process::process_event::{data_event::Output, Event};
use crate::proto::process::process_input::Input;
use crate::proto::process::pty::Size as WirePtySize;
use crate::proto::process::{
    CloseStdinRequest, ConnectRequest, ListRequest, ListResponse, ProcessConfig, ProcessInput,
    ProcessSelector, Pty, SendInputRequest, SendSignalRequest, Signal, StartRequest, StartResponse,
    UpdateRequest,
};
use crate::proto::InitRequest;
use async_trait::async_trait;
use base64::Engine;
use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::{de::DeserializeOwned, Serialize};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use wrenn_core::guest::{
    AgentError, ByteStream, EntryKind, ExecEvent, ExecRequest, ExecStream, ExitStatus, FileEntry,
    GuestAgent, GuestConnector, GuestInit, ProcessEntry, PtySize,
};

type Body = UnsyncBoxBody<Bytes, std::io::Error>;

/// Deadline of unary calls (streams have none).
const UNARY_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest wait for a process stream's `start` event (a frozen or dead guest
/// must not hold a caller forever).
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// Keepalive interval asked of envd on process streams; a stream silent for
/// [`STREAM_SILENCE`] is dead.
const KEEPALIVE_SECS: u64 = 30;
const STREAM_SILENCE: Duration = Duration::from_secs(3 * KEEPALIVE_SECS);
/// Largest whole response body read from a guest (unary answers, errors); file contents
/// and process output are streamed, not read whole.
pub const MAX_RESPONSE_BODY: usize = 64 * 1024 * 1024;

fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// A client for one capsule's envd.
#[derive(Clone, Debug)]
pub struct EnvdClient {
    base: String,
    token: Option<String>,
    http: Client<DialConnector, Body>,
}

/// Makes [`EnvdClient`]s; shares one connection pool.
#[derive(Clone, Debug)]
pub struct EnvdConnector {
    http: Client<DialConnector, Body>,
}

impl Default for EnvdConnector {
    /// Connects over TCP to the address given to [`GuestConnector::connect`].
    fn default() -> Self {
        Self::dialing(Arc::new(TcpDial {
            timeout: Duration::from_secs(2),
        }))
    }
}

impl EnvdConnector {
    /// Opens its connections with `dial` (given `http://address:port` URIs).
    pub fn dialing(dial: Arc<dyn Dial>) -> Self {
        let http = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(DialConnector::new(dial));
        EnvdConnector { http }
    }
}

impl GuestConnector for EnvdConnector {
    fn connect(&self, addr: SocketAddr, access_token: Option<String>) -> Arc<dyn GuestAgent> {
        Arc::new(EnvdClient {
            base: format!("http://{addr}"),
            token: access_token,
            http: self.http.clone(),
        })
    }
}

fn connect_error(e: ConnectError) -> AgentError {
    match e.code {
        Code::NotFound => AgentError::NotFound(e.message),
        Code::InvalidArgument
        | Code::FailedPrecondition
        | Code::AlreadyExists
        | Code::OutOfRange => AgentError::InvalidArgument(e.message),
        Code::Unauthenticated => AgentError::Unauthenticated(e.message),
        Code::PermissionDenied => AgentError::PermissionDenied(e.message),
        Code::DeadlineExceeded => AgentError::Timeout(e.message),
        Code::Unavailable => AgentError::Unreachable(e.message),
        _ => AgentError::Remote {
            code: e.code.to_string(),
            message: e.message,
        },
    }
}

fn http_status_error(status: StatusCode, body: &[u8]) -> AgentError {
    let message = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| {
            v.get("message")
                .and_then(|m| m.as_str())
                .map(str::to_string)
        })
        .unwrap_or_else(|| String::from_utf8_lossy(body).into_owned());
    connect_error(ConnectError::new(
        Code::from_http_status(status.as_u16()),
        message,
    ))
}

fn entry(e: EntryInfo) -> FileEntry {
    let kind = if e.is_symlink {
        EntryKind::Symlink
    } else {
        match FileType::try_from(e.r#type) {
            Ok(FileType::File) => EntryKind::File,
            Ok(FileType::Directory) => EntryKind::Dir,
            Ok(FileType::Symlink) => EntryKind::Symlink,
            _ => EntryKind::Other,
        }
    };
    FileEntry {
        name: e.name,
        path: e.path,
        kind,
        size: u64::try_from(e.size).unwrap_or(0),
        mode: e.mode,
        permissions: e.permissions,
        owner: e.owner,
        group: e.group,
        modified: e.modified_time.map(|t| t.seconds).unwrap_or(0),
        symlink_target: e.symlink_target,
    }
}

impl EnvdClient {
    /// A client for envd at `addr` (tests and tools; capsules use [`EnvdConnector`]).
    pub fn new(addr: SocketAddr, token: Option<String>) -> Self {
        let c = EnvdConnector::default();
        EnvdClient {
            base: format!("http://{addr}"),
            token,
            http: c.http,
        }
    }

    fn request(
        &self,
        method: Method,
        path_and_query: &str,
        user: Option<&str>,
    ) -> hyper::http::request::Builder {
        let mut b = Request::builder()
            .method(method)
            .uri(format!("{}{}", self.base, path_and_query));
        if let Some(t) = &self.token {
            b = b.header("x-access-token", t);
        }
        if let Some(u) = user {
            let creds = base64::engine::general_purpose::STANDARD.encode(format!("{u}:"));
            b = b.header("authorization", format!("Basic {creds}"));
        }
        b
    }

    async fn send(&self, req: Request<Body>) -> Result<Response<Incoming>, AgentError> {
        self.http
            .request(req)
            .await
            .map_err(|e| AgentError::Unreachable(format!("{}: {e}", self.base)))
    }

    /// Reads a whole (unary, error) response body, refusing more than
    /// [`MAX_RESPONSE_BODY`]: the guest is not trusted to keep its answers small.
    async fn read_body(resp: Response<Incoming>) -> Result<Bytes, AgentError> {
        http_body_util::Limited::new(resp.into_body(), MAX_RESPONSE_BODY)
            .collect()
            .await
            .map(|c| c.to_bytes())
            .map_err(|e| {
                if e.is::<http_body_util::LengthLimitError>() {
                    AgentError::Protocol(format!(
                        "the guest's response exceeds {MAX_RESPONSE_BODY} bytes"
                    ))
                } else {
                    AgentError::Protocol(format!("reading response: {e}"))
                }
            })
    }

    async fn unary<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        method: &str,
        msg: &Req,
        user: Option<&str>,
    ) -> Result<Resp, AgentError> {
        let body = serde_json::to_vec(msg).map_err(|e| AgentError::Protocol(e.to_string()))?;
        let req = self
            .request(Method::POST, &format!("/{method}"), user)
            .header("content-type", "application/json")
            .header("connect-protocol-version", "1")
            .body(full(body))
            .map_err(|e| AgentError::Protocol(e.to_string()))?;
        let call = async {
            let resp = self.send(req).await?;
            let status = resp.status();
            let bytes = Self::read_body(resp).await?;
            if status != StatusCode::OK {
                return Err(match serde_json::from_slice::<ConnectError>(&bytes) {
                    Ok(e) => connect_error(e),
                    Err(_) => http_status_error(status, &bytes),
                });
            }
            serde_json::from_slice(&bytes)
                .map_err(|e| AgentError::Protocol(format!("{method}: {e}")))
        };
        tokio::time::timeout(UNARY_TIMEOUT, call)
            .await
            .map_err(|_| {
                AgentError::Timeout(format!(
                    "{method} took longer than {} s",
                    UNARY_TIMEOUT.as_secs()
                ))
            })?
    }

    /// Opens a process event stream (Start or Connect) and waits for its `start` event.
    async fn process_stream(
        &self,
        method: &str,
        msg: Vec<u8>,
        req_headers: &[(&str, String)],
        user: Option<&str>,
    ) -> Result<ExecStream, AgentError> {
        let mut b = self
            .request(Method::POST, &format!("/{method}"), user)
            .header("content-type", "application/connect+json")
            .header("connect-protocol-version", "1")
            .header("keepalive-ping-interval", KEEPALIVE_SECS.to_string());
        for (k, v) in req_headers {
            b = b.header(*k, v);
        }
        let req = b
            .body(full(encode_envelope(0, &msg)))
            .map_err(|e| AgentError::Protocol(e.to_string()))?;
        let started = async {
            let resp = self.send(req).await?;
            if resp.status() != StatusCode::OK {
                let status = resp.status();
                let bytes = Self::read_body(resp).await?;
                return Err(http_status_error(status, &bytes));
            }
            let (tx, mut rx) = mpsc::channel::<Result<ExecEvent, AgentError>>(64);
            tokio::spawn(pump_events(resp.into_body(), tx));
            match rx.recv().await {
                Some(Ok(ExecEvent::Started { pid })) => Ok(ExecStream { pid, events: rx }),
                Some(Err(e)) => Err(e),
                Some(Ok(other)) => Err(AgentError::Protocol(format!(
                    "first event was {other:?}, not start"
                ))),
                None => Err(AgentError::Protocol(
                    "stream ended before the start event".into(),
                )),
            }
        };
        tokio::time::timeout(START_TIMEOUT, started)
            .await
            .unwrap_or_else(|_| {
                Err(AgentError::Timeout(format!(
                    "the guest agent did not start the process within {} s",
                    START_TIMEOUT.as_secs()
                )))
            })
    }
}

/// Decodes a process event stream into `tx` until its end.
async fn pump_events(mut body: Incoming, tx: mpsc::Sender<Result<ExecEvent, AgentError>>) {
    let mut dec = EnvelopeDecoder::new();
    loop {
        let frame = match tokio::time::timeout(STREAM_SILENCE, body.frame()).await {
            Err(_) => {
                let _ = tx
                    .send(Err(AgentError::Unreachable(format!(
                        "no output or keepalive from the guest for {} s",
                        STREAM_SILENCE.as_secs()
                    ))))
                    .await;
                return;
            }
            Ok(Some(Ok(f))) => f,
            Ok(Some(Err(e))) => {
                let _ = tx
                    .send(Err(AgentError::Unreachable(format!("stream broke: {e}"))))
                    .await;
                return;
            }
            Ok(None) => {
                let _ = tx
                    .send(Err(AgentError::Protocol(
                        "stream ended without end-of-stream".into(),
                    )))
                    .await;
                return;
            }
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        dec.push(&data);
        loop {
            let env = match dec.next_envelope() {
                Ok(Some(env)) => env,
                Ok(None) => break,
                Err(e) => {
                    let _ = tx.send(Err(connect_error(e))).await;
                    return;
                }
            };
            if env.is_end_stream() {
                let end: EndStream = serde_json::from_slice(&env.data).unwrap_or_default();
                if let Some(e) = end.error {
                    let _ = tx.send(Err(connect_error(e))).await;
                }
                return;
            }
            // `Start` and `Connect` answer with the same message shape.
            let msg: StartResponse = match serde_json::from_slice(&env.data) {
                Ok(m) => m,
                Err(e) => {
                    let _ = tx
                        .send(Err(AgentError::Protocol(format!("bad event: {e}"))))
                        .await;
                    return;
                }
            };
            let ev = match msg.event.and_then(|e| e.event) {
                Some(Event::Start(s)) => ExecEvent::Started { pid: s.pid },
                Some(Event::Data(d)) => match d.output {
                    Some(Output::Stdout(b)) | Some(Output::Pty(b)) => ExecEvent::Stdout(b),
                    Some(Output::Stderr(b)) => ExecEvent::Stderr(b),
                    None => continue,
                },
                Some(Event::End(e)) => ExecEvent::Exited(ExitStatus {
                    code: e.exit_code,
                    exited: e.exited,
                    status: e.status,
                }),
                Some(Event::Keepalive(_)) | None => continue,
            };
            if tx.send(Ok(ev)).await.is_err() {
                return; // nobody listens; the process keeps running in the guest
            }
        }
    }
}

fn wire_pty(size: PtySize) -> Pty {
    Pty {
        size: Some(WirePtySize {
            cols: u32::from(size.cols),
            rows: u32::from(size.rows),
        }),
    }
}

fn query_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~' | b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[async_trait]
impl GuestAgent for EnvdClient {
    async fn health(&self) -> Result<(), AgentError> {
        let req = self
            .request(Method::GET, "/health", None)
            .body(full(Bytes::new()))
            .map_err(|e| AgentError::Protocol(e.to_string()))?;
        let resp = self.send(req).await?;
        if resp.status().is_success() {
            Ok(())
        } else {
            Err(AgentError::Unreachable(format!(
                "health answered {}",
                resp.status()
            )))
        }
    }

    async fn init(&self, init: &GuestInit) -> Result<(), AgentError> {
        let body = InitRequest {
            env_vars: Some(init.env_vars.clone()),
            access_token: init.access_token.clone(),
            timestamp: init
                .timestamp
                .map(|t| serde_json::Value::String(humantime::format_rfc3339_nanos(t).to_string())),
            default_user: init.default_user.clone(),
            default_workdir: init.default_workdir.clone(),
            entropy: init.entropy.as_ref().map(|b| {
                use base64::Engine as _;
                base64::engine::general_purpose::STANDARD.encode(b)
            }),
        };
        let bytes = serde_json::to_vec(&body).map_err(|e| AgentError::Protocol(e.to_string()))?;
        let req = self
            .request(Method::POST, "/init", None)
            .header("content-type", "application/json")
            .body(full(bytes))
            .map_err(|e| AgentError::Protocol(e.to_string()))?;
        let resp = self.send(req).await?;
        let status = resp.status();
        if status.is_success() {
            return Ok(());
        }
        let bytes = Self::read_body(resp).await?;
        Err(http_status_error(status, &bytes))
    }

    async fn exec(&self, req: &ExecRequest) -> Result<ExecStream, AgentError> {
        let start = StartRequest {
            process: Some(ProcessConfig {
                cmd: req.cmd.clone(),
                args: req.args.clone(),
                envs: req.envs.clone(),
                cwd: req.cwd.clone(),
            }),
            pty: req.pty.map(wire_pty),
            tag: req.tag.clone(),
            stdin: Some(req.stdin),
        };
        let msg = serde_json::to_vec(&start).map_err(|e| AgentError::Protocol(e.to_string()))?;
        let mut headers = Vec::new();
        if let Some(t) = req.timeout {
            headers.push(("connect-timeout-ms", t.as_millis().to_string()));
        }
        self.process_stream("process.Process/Start", msg, &headers, req.user.as_deref())
            .await
    }

    async fn connect(&self, pid: u32) -> Result<ExecStream, AgentError> {
        let msg = serde_json::to_vec(&ConnectRequest {
            process: Some(ProcessSelector::pid(pid)),
        })
        .map_err(|e| AgentError::Protocol(e.to_string()))?;
        self.process_stream("process.Process/Connect", msg, &[], None)
            .await
    }

    async fn list_processes(&self) -> Result<Vec<ProcessEntry>, AgentError> {
        let r: ListResponse = self
            .unary("process.Process/List", &ListRequest {}, None)
            .await?;
        Ok(r.processes
            .into_iter()
            .map(|p| {
                let cfg = p.config.unwrap_or_default();
                ProcessEntry {
                    pid: p.pid,
                    tag: p.tag,
                    cmd: cfg.cmd,
                    args: cfg.args,
                }
            })
            .collect())
    }

    async fn send_stdin(&self, pid: u32, data: Bytes) -> Result<(), AgentError> {
        let req = SendInputRequest {
            process: Some(ProcessSelector::pid(pid)),
            input: Some(ProcessInput {
                input: Some(Input::Stdin(data)),
            }),
        };
        let _: serde_json::Value = self.unary("process.Process/SendInput", &req, None).await?;
        Ok(())
    }

    async fn send_pty_input(&self, pid: u32, data: Bytes) -> Result<(), AgentError> {
        let req = SendInputRequest {
            process: Some(ProcessSelector::pid(pid)),
            input: Some(ProcessInput {
                input: Some(Input::Pty(data)),
            }),
        };
        let _: serde_json::Value = self.unary("process.Process/SendInput", &req, None).await?;
        Ok(())
    }

    async fn resize_pty(&self, pid: u32, size: PtySize) -> Result<(), AgentError> {
        let req = UpdateRequest {
            process: Some(ProcessSelector::pid(pid)),
            pty: Some(wire_pty(size)),
        };
        let _: serde_json::Value = self.unary("process.Process/Update", &req, None).await?;
        Ok(())
    }

    async fn close_stdin(&self, pid: u32) -> Result<(), AgentError> {
        let req = CloseStdinRequest {
            process: Some(ProcessSelector::pid(pid)),
        };
        let _: serde_json::Value = self.unary("process.Process/CloseStdin", &req, None).await?;
        Ok(())
    }

    async fn signal(&self, pid: u32, kill: bool) -> Result<(), AgentError> {
        let signal = if kill {
            Signal::Sigkill
        } else {
            Signal::Sigterm
        };
        let req = SendSignalRequest {
            process: Some(ProcessSelector::pid(pid)),
            signal: signal as i32,
        };
        let _: serde_json::Value = self.unary("process.Process/SendSignal", &req, None).await?;
        Ok(())
    }

    async fn read_file(&self, path: &str) -> Result<ByteStream, AgentError> {
        let req = self
            .request(
                Method::GET,
                &format!("/files?path={}", query_escape(path)),
                None,
            )
            .body(full(Bytes::new()))
            .map_err(|e| AgentError::Protocol(e.to_string()))?;
        let resp = self.send(req).await?;
        let status = resp.status();
        if status != StatusCode::OK {
            let bytes = Self::read_body(resp).await?;
            return Err(http_status_error(status, &bytes));
        }
        let stream = resp
            .into_body()
            .into_data_stream()
            .map(|r| r.map_err(|e| AgentError::Unreachable(e.to_string())));
        Ok(Box::pin(stream))
    }

    async fn write_file(&self, path: &str, data: ByteStream) -> Result<(), AgentError> {
        let frames = data.map(|r| {
            r.map(Frame::data)
                .map_err(|e| std::io::Error::other(e.to_string()))
        });
        let body: Body = BodyExt::boxed_unsync(StreamBody::new(frames));
        let req = self
            .request(
                Method::POST,
                &format!("/files?path={}", query_escape(path)),
                None,
            )
            .header("content-type", "application/octet-stream")
            .body(body)
            .map_err(|e| AgentError::Protocol(e.to_string()))?;
        let resp = self.send(req).await?;
        let status = resp.status();
        let bytes = Self::read_body(resp).await?;
        if status.is_success() {
            Ok(())
        } else {
            Err(http_status_error(status, &bytes))
        }
    }

    async fn list_dir(&self, path: &str, depth: u32) -> Result<Vec<FileEntry>, AgentError> {
        let req = ListDirRequest {
            path: path.to_string(),
            depth,
        };
        let r: ListDirResponse = self
            .unary("filesystem.Filesystem/ListDir", &req, None)
            .await?;
        Ok(r.entries.into_iter().map(entry).collect())
    }

    async fn stat(&self, path: &str) -> Result<FileEntry, AgentError> {
        let r: StatResponse = self
            .unary(
                "filesystem.Filesystem/Stat",
                &StatRequest {
                    path: path.to_string(),
                },
                None,
            )
            .await?;
        r.entry
            .map(entry)
            .ok_or_else(|| AgentError::Protocol("Stat returned no entry".into()))
    }

    async fn make_dir(&self, path: &str) -> Result<FileEntry, AgentError> {
        let r: MakeDirResponse = self
            .unary(
                "filesystem.Filesystem/MakeDir",
                &MakeDirRequest {
                    path: path.to_string(),
                },
                None,
            )
            .await?;
        r.entry
            .map(entry)
            .ok_or_else(|| AgentError::Protocol("MakeDir returned no entry".into()))
    }

    async fn remove(&self, path: &str) -> Result<(), AgentError> {
        let _: serde_json::Value = self
            .unary(
                "filesystem.Filesystem/Remove",
                &RemoveRequest {
                    path: path.to_string(),
                },
                None,
            )
            .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A guest answering a unary call with an endless body: the client gives up at
    /// [`MAX_RESPONSE_BODY`] with an error instead of buffering it all.
    #[tokio::test]
    async fn endless_unary_answer_is_refused() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let sent = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = sent.clone();
        tokio::spawn(async move {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            let mut head = vec![0u8; 4096];
            let _ = sock.read(&mut head).await;
            let _ = sock
                .write_all(
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\
                      transfer-encoding: chunked\r\n\r\n",
                )
                .await;
            let chunk = vec![b' '; 1 << 20];
            let mut framed = format!("{:x}\r\n", chunk.len()).into_bytes();
            framed.extend_from_slice(&chunk);
            framed.extend_from_slice(b"\r\n");
            while sock.write_all(&framed).await.is_ok() {
                counter.fetch_add(chunk.len(), std::sync::atomic::Ordering::Relaxed);
            }
        });
        let client = EnvdClient::new(addr, None);
        let err = client.list_processes().await.expect_err("refused");
        assert!(err.to_string().contains("exceeds"), "{err}");
        let total = sent.load(std::sync::atomic::Ordering::Relaxed);
        assert!(
            total < MAX_RESPONSE_BODY + (16 << 20),
            "read {total} bytes of an endless body"
        );
    }
}
