//! Lifecycle events of a team, live: `GET /v1/events/stream` (server-sent events, as
//! the `wrenn` SDK's `events.stream()` reads them).
//!
//! Events are published by this server as it records them: the audited actions on
//! capsules (`capsule.create`, `.pause`, `.resume`, `.destroy`) and snapshot templates
//! (`template.snapshot.create`, `.delete`), capsule status changes
//! (`capsule.state.changed`, with `from` and `to`), and the team's own (BYOC) hosts
//! answering or going silent (`host.up`, `host.down`). Each subscriber sees its own team's
//! only. The bus is this process's: a subscriber sees what the server it is connected
//! to did (with several control planes, each streams its own).

use crate::auth::{Auth, Principal};
use crate::error::ErrorBody;
use crate::state::AppState;
use axum::extract::State;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use futures_util::Stream;
use serde::Serialize;
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::broadcast;
use utoipa::ToSchema;

/// Events kept for a subscriber that reads slowly; past this it skips the oldest.
const BACKLOG: usize = 1024;
/// A comment line at least this often, so proxies keep the connection open.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// Who did it.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct EventActor {
    /// user, api_key or system.
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// What it was done to.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct EventResource {
    pub id: String,
    /// capsule, snapshot or host.
    #[serde(rename = "type")]
    pub kind: String,
}

/// One event of a team.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct Event {
    #[serde(skip)]
    pub team_id: String,
    /// connected, capsule.create, capsule.pause, capsule.resume, capsule.destroy,
    /// capsule.state.changed, template.snapshot.create, template.snapshot.delete,
    /// host.up or host.down.
    pub event: String,
    /// success or error, for actions.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outcome: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resource: Option<EventResource>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub actor: Option<EventActor>,
    /// Event-specific context (`from` and `to` of a state change).
    pub metadata: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The capsule as it is when the event is sent (capsule events).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<crate::v1::capsules::CapsuleView>,
    pub timestamp: chrono::DateTime<chrono::Utc>,
}

impl Event {
    fn new(team_id: &str, event: &str) -> Self {
        Event {
            team_id: team_id.to_string(),
            event: event.to_string(),
            outcome: None,
            resource: None,
            actor: None,
            metadata: BTreeMap::new(),
            error: None,
            sandbox: None,
            timestamp: chrono::Utc::now(),
        }
    }
}

/// The event an audited action is, if it is one.
fn event_of(action: &str) -> Option<&'static str> {
    Some(match action {
        "capsule.create" => "capsule.create",
        "capsule.pause" => "capsule.pause",
        "capsule.resume" => "capsule.resume",
        "capsule.destroy" => "capsule.destroy",
        "snapshot.create" => "template.snapshot.create",
        "snapshot.delete" => "template.snapshot.delete",
        _ => return None,
    })
}

/// The server's events, to every subscriber.
#[derive(Debug)]
pub struct EventBus {
    tx: broadcast::Sender<Arc<Event>>,
    /// Set when the server shuts down: every stream ends (else a graceful shutdown
    /// would wait for them forever).
    closed: tokio::sync::watch::Sender<bool>,
}

impl Default for EventBus {
    fn default() -> Self {
        EventBus {
            tx: broadcast::channel(BACKLOG).0,
            closed: tokio::sync::watch::channel(false).0,
        }
    }
}

impl EventBus {
    /// Publishes an audited action of team `team_id` when it is an event.
    #[allow(clippy::too_many_arguments)]
    pub fn action(
        &self,
        team_id: &str,
        actor: &wrenn_db::Actor,
        actor_name: Option<&str>,
        action: &str,
        resource_type: &str,
        resource_id: Option<&str>,
        ok: bool,
        error: Option<&str>,
    ) {
        let Some(kind) = event_of(action) else {
            return;
        };
        let mut e = Event::new(team_id, kind);
        e.outcome = Some(if ok { "success" } else { "error" }.into());
        e.resource = resource_id.map(|id| EventResource {
            id: id.to_string(),
            kind: resource_type.to_string(),
        });
        e.actor = Some(EventActor {
            kind: actor.kind().into(),
            id: actor.id().map(str::to_string),
            name: actor_name.map(str::to_string),
        });
        e.error = error.filter(|_| !ok).map(str::to_string);
        self.publish(e);
    }

    /// Publishes a capsule's status change.
    pub fn state_changed(&self, team_id: &str, capsule: &str, from: &str, to: &str) {
        if from == to {
            return;
        }
        let mut e = Event::new(team_id, "capsule.state.changed");
        e.resource = Some(EventResource {
            id: capsule.to_string(),
            kind: "capsule".into(),
        });
        e.metadata.insert("from".into(), from.into());
        e.metadata.insert("to".into(), to.into());
        self.publish(e);
    }

    /// Publishes `event` (host.up: it answers, first or again; host.down: silent past
    /// the monitor's timeout) of team `team_id`'s own host `host`.
    pub fn host_changed(&self, team_id: &str, host: &str, event: &str) {
        let mut e = Event::new(team_id, event);
        e.resource = Some(EventResource {
            id: host.to_string(),
            kind: "host".into(),
        });
        self.publish(e);
    }

    fn publish(&self, e: Event) {
        // No subscriber is not an error: nobody is watching.
        let _ = self.tx.send(Arc::new(e));
    }

    /// A new subscriber (events from now on), and the signal that ends it.
    pub fn subscribe(
        &self,
    ) -> (
        broadcast::Receiver<Arc<Event>>,
        tokio::sync::watch::Receiver<bool>,
    ) {
        (self.tx.subscribe(), self.closed.subscribe())
    }

    /// Ends every stream (the server is shutting down).
    pub fn close(&self) {
        self.closed.send_replace(true);
    }
}

/// The frame of one event (`event:` its kind, `data:` its JSON).
fn frame(e: &Event) -> SseEvent {
    let data = serde_json::to_string(e).unwrap_or_else(|_| "{}".into());
    SseEvent::default().event(e.event.clone()).data(data)
}

/// Team `who`'s events, from `rx`, with the capsule each capsule event is about.
fn team_events(
    st: Arc<AppState>,
    who: Principal,
) -> impl Stream<Item = Result<SseEvent, Infallible>> {
    let (rx, closed) = st.events.subscribe();
    let connected = frame(&Event::new(&who.team_id, "connected"));
    let first = futures_util::stream::once(async move { Ok(connected) });
    let state = (st, who, rx, closed);
    let rest = futures_util::stream::unfold(state, |(st, who, mut rx, mut closed)| async move {
        loop {
            let received = tokio::select! {
                r = rx.recv() => r,
                _ = closed.wait_for(|c| *c) => return None,
            };
            let e = match received {
                Ok(e) => e,
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    tracing::warn!(team = %who.team_id, skipped = n, "event subscriber fell behind");
                    continue;
                }
                Err(broadcast::error::RecvError::Closed) => return None,
            };
            if e.team_id != who.team_id {
                continue;
            }
            let mut e = (*e).clone();
            if let Some(r) = e.resource.as_ref().filter(|r| r.kind == "capsule") {
                if let Ok(c) = st.db.get_capsule(&who.team_id, &r.id).await {
                    e.sandbox = Some(crate::v1::capsules::CapsuleView::of(&st, &c));
                }
            }
            return Some((Ok(frame(&e)), (st, who, rx, closed)));
        }
    });
    futures_util::StreamExt::chain(first, rest)
}

#[utoipa::path(get, path = "/v1/events/stream", tag = "capsules",
    responses((status = 200, content_type = "text/event-stream", body = Event,
        description = "Server-sent events: first `connected`, then the team's lifecycle events as they happen, with a keep-alive comment every 15 s"),
        (status = 401, body = ErrorBody)),
    security(("api_key" = []), ("bearer" = [])))]
pub async fn stream(
    State(st): State<Arc<AppState>>,
    Auth(who): Auth,
) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    Sse::new(team_events(st, who))
        .keep_alive(KeepAlive::new().interval(KEEP_ALIVE).text("keepalive"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn actions_become_events_and_others_do_not() {
        let bus = EventBus::default();
        let (mut rx, _) = bus.subscribe();
        let key = wrenn_db::Actor::ApiKey { id: "key-1".into() };
        bus.action(
            "t1",
            &key,
            None,
            "capsule.exec",
            "capsule",
            Some("cl-1"),
            true,
            None,
        );
        bus.action(
            "t1",
            &key,
            Some("ci"),
            "snapshot.create",
            "snapshot",
            Some("s"),
            false,
            Some("disk full"),
        );
        bus.state_changed("t1", "cl-1", "running", "running");
        bus.state_changed("t1", "cl-1", "running", "paused");
        let e = rx.try_recv().unwrap();
        assert_eq!(e.event, "template.snapshot.create");
        assert_eq!(e.outcome.as_deref(), Some("error"));
        assert_eq!(e.error.as_deref(), Some("disk full"));
        let v = serde_json::to_value(&*e).unwrap();
        assert_eq!(
            v["actor"],
            serde_json::json!({"type": "api_key", "id": "key-1", "name": "ci"})
        );
        assert!(v.get("team_id").is_none());
        let e = rx.try_recv().unwrap();
        assert_eq!(e.event, "capsule.state.changed");
        assert_eq!(e.metadata["from"], "running");
        assert_eq!(e.metadata["to"], "paused");
        assert!(rx.try_recv().is_err());
    }
}
