//! WebSocket routes: streamed exec, re-attach to a process, interactive PTY.
//!
//! Credentials come from the upgrade request's headers or, when it has none, from a
//! first message `{"type":"auth","token":"<jwt or API key>"}` within 5 s.

use crate::auth::{authenticate, Principal};
use crate::error::ApiResult;
use crate::service;
use crate::state::AppState;
use crate::v1::capsules::{random_tag, select_process};
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use base64::Engine;
use bytes::Bytes;
use futures_util::SinkExt;
use serde::Deserialize;
use serde_json::json;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use wrenn_core::guest::{ExecEvent, ExecRequest, ExecStream, GuestAgent, PtySize};

type S = State<Arc<AppState>>;

/// Who is calling: from headers, or `None` when the request carries no credentials
/// (the socket then has to authenticate with its first message).
async fn header_principal(st: &AppState, headers: &HeaderMap) -> ApiResult<Option<Principal>> {
    let has = headers.contains_key("x-api-key") || headers.contains_key("authorization");
    if !has {
        return Ok(None);
    }
    authenticate(st, headers).await.map(Some)
}

async fn send_json(ws: &mut WebSocket, v: serde_json::Value) -> bool {
    ws.send(Message::Text(v.to_string().into())).await.is_ok()
}

async fn fail(mut ws: WebSocket, msg: &str) {
    let _ = send_json(
        &mut ws,
        json!({"type": "error", "data": msg, "fatal": true}),
    )
    .await;
    let _ = ws.close().await;
}

/// Reads the auth message when the upgrade had no credentials.
async fn socket_principal(
    st: &AppState,
    ws: &mut WebSocket,
    from_headers: Option<Principal>,
) -> Result<Principal, String> {
    if let Some(p) = from_headers {
        return Ok(p);
    }
    let first = tokio::time::timeout(Duration::from_secs(5), ws.recv()).await;
    let Ok(Some(Ok(Message::Text(t)))) = first else {
        return Err("unauthorized: expected {\"type\":\"auth\",\"token\":…} within 5 s".into());
    };
    #[derive(Debug, Deserialize)]
    struct AuthMsg {
        #[serde(rename = "type")]
        kind: String,
        token: String,
    }
    let m: AuthMsg =
        serde_json::from_str(&t).map_err(|_| "unauthorized: bad auth message".to_string())?;
    if m.kind != "auth" {
        return Err("unauthorized: expected an auth message".into());
    }
    let mut headers = HeaderMap::new();
    let name = if m.token.starts_with("wrn_") {
        "x-api-key"
    } else {
        "authorization"
    };
    let value = if name == "authorization" {
        format!("Bearer {}", m.token)
    } else {
        m.token
    };
    if let Ok(v) = value.parse() {
        headers.insert(name, v);
    }
    authenticate(st, &headers)
        .await
        .map_err(|e| format!("unauthorized: {}", e.message))
}

/// The socket's caller (see [`socket_principal`]) and its running capsule's guest agent.
async fn socket_guest(
    st: &AppState,
    ws: &mut WebSocket,
    from_headers: Option<Principal>,
    id: &str,
) -> Result<(Principal, wrenn_db::Capsule, Arc<dyn GuestAgent>), String> {
    let who = socket_principal(st, ws, from_headers).await?;
    let c = service::running(st, &who, id)
        .await
        .map_err(|e| e.message)?;
    service::touch(st, &c).await;
    let g = st.guest(&c).await.map_err(|e| e.message)?;
    Ok((who, c, g))
}

/// Pre-checks what can be answered with an HTTP status before upgrading.
async fn precheck(st: &AppState, headers: &HeaderMap, id: &str) -> ApiResult<Option<Principal>> {
    let who = header_principal(st, headers).await?;
    if let Some(p) = &who {
        service::get(st, p, id).await?;
    } else {
        service::parse_id(id)?;
    }
    Ok(who)
}

#[derive(Debug, Deserialize)]
struct StartMsg {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    cmd: String,
    #[serde(default)]
    args: Vec<String>,
    #[serde(default)]
    envs: HashMap<String, String>,
    cwd: Option<String>,
}

/// Forwards a process's events to the socket until it exits; `{"type":"stop"}` from
/// the client kills it.
async fn pump_exec(
    ws: &mut WebSocket,
    guest: &dyn GuestAgent,
    mut stream: ExecStream,
    send_start: bool,
) {
    if send_start && !send_json(ws, json!({"type": "start", "pid": stream.pid})).await {
        return;
    }
    loop {
        tokio::select! {
            ev = stream.events.recv() => {
                let msg = match ev {
                    None => json!({"type": "error", "data": "process stream ended"}),
                    Some(Err(e)) => json!({"type": "error", "data": e.to_string()}),
                    Some(Ok(ExecEvent::Started { .. })) => continue,
                    Some(Ok(ExecEvent::Stdout(b))) => json!({"type": "stdout", "data": String::from_utf8_lossy(&b)}),
                    Some(Ok(ExecEvent::Stderr(b))) => json!({"type": "stderr", "data": String::from_utf8_lossy(&b)}),
                    Some(Ok(ExecEvent::Exited(s))) => {
                        let _ = send_json(ws, json!({"type": "exit", "exit_code": s.code})).await;
                        break;
                    }
                };
                let end = msg["type"] == "error";
                if !send_json(ws, msg).await || end {
                    break;
                }
            }
            incoming = ws.recv() => match incoming {
                Some(Ok(Message::Text(t))) => {
                    if serde_json::from_str::<serde_json::Value>(&t).ok().and_then(|v| v.get("type").cloned()) == Some(json!("stop")) {
                        let _ = guest.signal(stream.pid, true).await;
                    }
                }
                Some(Ok(_)) => {}
                // The client left: the process keeps running (re-attach by pid or tag).
                None | Some(Err(_)) => return,
            }
        }
    }
    let _ = ws.close().await;
}

pub async fn exec_stream(
    State(st): S,
    Path(id): Path<String>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    let who = match precheck(&st, &headers, &id).await {
        Ok(w) => w,
        Err(e) => return e.into_response(),
    };
    ws.on_upgrade(move |mut ws| async move {
        let (who, c, guest) = match socket_guest(&st, &mut ws, who, &id).await {
            Ok(x) => x,
            Err(m) => return fail(ws, &m).await,
        };
        let start = tokio::time::timeout(Duration::from_secs(30), ws.recv()).await;
        let Ok(Some(Ok(Message::Text(t)))) = start else {
            return fail(ws, "expected a start message").await;
        };
        let Ok(m) = serde_json::from_str::<StartMsg>(&t) else {
            return fail(ws, "bad start message").await;
        };
        if m.kind != "start" || m.cmd.is_empty() {
            return fail(ws, "expected {\"type\":\"start\",\"cmd\":…}").await;
        }
        let req = ExecRequest {
            cmd: m.cmd,
            args: m.args,
            envs: m.envs,
            cwd: m.cwd,
            tag: Some(random_tag("proc")),
            ..Default::default()
        };
        let stream = match guest.exec(&req).await {
            Ok(s) => s,
            Err(e) => return fail(ws, &e.to_string()).await,
        };
        st.audit(
            &who,
            "capsule.exec",
            "capsule",
            Some(c.id.as_str()),
            true,
            Some(json!({"stream": true})),
        )
        .await;
        pump_exec(&mut ws, guest.as_ref(), stream, true).await;
    })
}

pub async fn process_stream(
    State(st): S,
    Path((id, selector)): Path<(String, String)>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    let who = match precheck(&st, &headers, &id).await {
        Ok(w) => w,
        Err(e) => return e.into_response(),
    };
    ws.on_upgrade(move |mut ws| async move {
        let (_, _, guest) = match socket_guest(&st, &mut ws, who, &id).await {
            Ok(x) => x,
            Err(m) => return fail(ws, &m).await,
        };
        let pid = match select_process(guest.as_ref(), &selector).await {
            Ok(p) => p,
            Err(e) => return fail(ws, &e.message).await,
        };
        let stream = match guest.connect(pid).await {
            Ok(s) => s,
            Err(e) => return fail(ws, &e.to_string()).await,
        };
        pump_exec(&mut ws, guest.as_ref(), stream, true).await;
    })
}

#[derive(Debug, Deserialize)]
struct PtyMsg {
    #[serde(rename = "type")]
    kind: String,
    cmd: Option<String>,
    args: Option<Vec<String>>,
    cols: Option<u16>,
    rows: Option<u16>,
    envs: Option<HashMap<String, String>>,
    cwd: Option<String>,
    user: Option<String>,
    tag: Option<String>,
    data: Option<String>,
}

fn pty_size(cols: Option<u16>, rows: Option<u16>) -> PtySize {
    PtySize {
        cols: cols.filter(|c| *c > 0).unwrap_or(80),
        rows: rows.filter(|r| *r > 0).unwrap_or(24),
    }
}

pub async fn pty(
    State(st): S,
    Path(id): Path<String>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    let who = match precheck(&st, &headers, &id).await {
        Ok(w) => w,
        Err(e) => return e.into_response(),
    };
    ws.on_upgrade(move |mut ws| async move {
        let (who, c, guest) = match socket_guest(&st, &mut ws, who, &id).await {
            Ok(x) => x,
            Err(m) => return fail(ws, &m).await,
        };
        let first = tokio::time::timeout(Duration::from_secs(30), ws.recv()).await;
        let Ok(Some(Ok(Message::Text(t)))) = first else {
            return fail(ws, "expected a start or connect message").await;
        };
        let Ok(m) = serde_json::from_str::<PtyMsg>(&t) else {
            return fail(ws, "bad first message").await;
        };
        let (tag, stream) = match m.kind.as_str() {
            "start" => {
                let tag = random_tag("pty");
                let req = ExecRequest {
                    cmd: m.cmd.unwrap_or_else(|| "/bin/bash".into()),
                    args: m.args.unwrap_or_default(),
                    envs: m.envs.unwrap_or_default(),
                    cwd: m.cwd,
                    user: m.user,
                    tag: Some(tag.clone()),
                    pty: Some(pty_size(m.cols, m.rows)),
                    ..Default::default()
                };
                match guest.exec(&req).await {
                    Ok(s) => (tag, s),
                    Err(e) => return fail(ws, &e.to_string()).await,
                }
            }
            "connect" => {
                let Some(tag) = m.tag else {
                    return fail(ws, "connect needs a tag").await;
                };
                let pid = match select_process(guest.as_ref(), &tag).await {
                    Ok(p) => p,
                    Err(e) => return fail(ws, &e.message).await,
                };
                match guest.connect(pid).await {
                    Ok(s) => (tag, s),
                    Err(e) => return fail(ws, &e.to_string()).await,
                }
            }
            _ => return fail(ws, "expected a start or connect message").await,
        };
        st.audit(
            &who,
            "capsule.pty",
            "capsule",
            Some(c.id.as_str()),
            true,
            Some(json!({"tag": tag})),
        )
        .await;
        pump_pty(&st, &c, ws, guest.as_ref(), stream, &tag).await;
    })
}

async fn pump_pty(
    st: &AppState,
    c: &wrenn_db::Capsule,
    mut ws: WebSocket,
    guest: &dyn GuestAgent,
    mut stream: ExecStream,
    tag: &str,
) {
    let pid = stream.pid;
    if !send_json(&mut ws, json!({"type": "started", "tag": tag, "pid": pid})).await {
        return;
    }
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut ping = tokio::time::interval(Duration::from_secs(30));
    ping.tick().await;
    loop {
        tokio::select! {
            ev = stream.events.recv() => match ev {
                Some(Ok(ExecEvent::Stdout(b))) | Some(Ok(ExecEvent::Stderr(b))) => {
                    if ws.send(Message::Binary(b)).await.is_err() {
                        return;
                    }
                }
                Some(Ok(ExecEvent::Started { .. })) => {}
                Some(Ok(ExecEvent::Exited(s))) => {
                    let _ = send_json(&mut ws, json!({"type": "exit", "exit_code": s.code})).await;
                    break;
                }
                Some(Err(e)) => {
                    let _ = send_json(&mut ws, json!({"type": "error", "data": e.to_string(), "fatal": true})).await;
                    break;
                }
                None => {
                    let _ = send_json(&mut ws, json!({"type": "error", "data": "terminal stream ended", "fatal": true})).await;
                    break;
                }
            },
            _ = ping.tick() => {
                if !send_json(&mut ws, json!({"type": "ping"})).await {
                    return;
                }
            }
            incoming = ws.recv() => {
                let input: Option<Bytes> = match incoming {
                    // The client left: the terminal keeps running (reconnect with its tag).
                    None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
                    Some(Ok(Message::Binary(b))) => Some(b),
                    Some(Ok(Message::Text(t))) => {
                        let Ok(m) = serde_json::from_str::<PtyMsg>(&t) else { continue };
                        match m.kind.as_str() {
                            "input" => m.data.and_then(|d| b64.decode(d).ok()).map(Bytes::from),
                            "resize" => {
                                let _ = guest.resize_pty(pid, pty_size(m.cols, m.rows)).await;
                                None
                            }
                            "kill" => {
                                let _ = guest.signal(pid, true).await;
                                None
                            }
                            _ => None,
                        }
                    }
                    Some(Ok(_)) => None,
                };
                if let Some(data) = input {
                    service::touch(st, c).await;
                    if let Err(e) = guest.send_pty_input(pid, data).await {
                        let _ = send_json(&mut ws, json!({"type": "error", "data": e.to_string(), "fatal": false})).await;
                    }
                }
            }
        }
    }
    let _ = ws.close().await;
}
