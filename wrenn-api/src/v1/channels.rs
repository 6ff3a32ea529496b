//! `/v1/channels`: a team's notification channels (user tokens only, as the
//! reference's), their deliveries, and a test send.

use crate::auth::{Auth, Principal};
use crate::channels::{self, Payload, Provider, SendResult, EVENT_TYPES};
use crate::error::{json_rejection, query_rejection, ApiError, ApiResult, ErrorBody};
use crate::state::AppState;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::sync::Arc;
use utoipa::{IntoParams, ToSchema};

type S = State<Arc<AppState>>;

/// Longest channel name.
const MAX_NAME: usize = 64;

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateChannel {
    /// Unique in the team.
    pub name: String,
    /// webhook, slack, discord, teams or googlechat.
    pub provider: String,
    /// `{"url": …}`, and for webhooks an optional signing `secret` (≥ 16 characters;
    /// one is made when it is missing, and shown once).
    #[schema(value_type = Object)]
    pub config: Value,
    /// Event types it receives: capsule.created, capsule.running, capsule.paused,
    /// capsule.destroyed, template.snapshot.created, template.snapshot.deleted, host.up,
    /// host.down (the team's own hosts).
    pub events: Vec<String>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateChannel {
    pub name: Option<String>,
    pub events: Option<Vec<String>>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChannelConfigBody {
    #[schema(value_type = Object)]
    pub config: Value,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TestChannel {
    pub provider: String,
    #[schema(value_type = Object)]
    pub config: Value,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ChannelView {
    pub id: String,
    pub name: String,
    pub provider: String,
    pub events: Vec<String>,
    /// The settings without their secrets: the URL's scheme and host.
    #[schema(value_type = Object)]
    pub config: Map<String, Value>,
    /// The webhook's signing secret: in the answer that set it, never again.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
    pub created_at: chrono::DateTime<chrono::Utc>,
    pub updated_at: chrono::DateTime<chrono::Utc>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct DeliveryView {
    pub id: String,
    pub event: String,
    /// pending (waiting for an attempt), delivered or failed (out of attempts).
    pub status: String,
    pub attempts: u32,
    /// The receiver's last HTTP status.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_status: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// When the next attempt is due (pending ones).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_attempt_at: Option<chrono::DateTime<chrono::Utc>>,
    /// What was sent.
    #[schema(value_type = Object)]
    pub payload: Value,
    pub created_at: chrono::DateTime<chrono::Utc>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delivered_at: Option<chrono::DateTime<chrono::Utc>>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct DeliveriesQuery {
    /// Newest first; default 50.
    #[param(minimum = 1, maximum = 200)]
    pub limit: Option<u32>,
}

/// Channels are managed with user tokens (API keys are for capsules).
fn user_only(who: &Principal) -> ApiResult<()> {
    who.user().map(|_| ())
}

fn check_name(name: &str) -> ApiResult<()> {
    if name.trim().is_empty() || name.len() > MAX_NAME || name.chars().any(char::is_control) {
        return Err(ApiError::invalid(format!(
            "name: 1-{MAX_NAME} printable characters"
        )));
    }
    Ok(())
}

fn check_events(events: &[String]) -> ApiResult<Vec<String>> {
    if events.is_empty() {
        return Err(ApiError::invalid(format!(
            "events: name at least one of {}",
            EVENT_TYPES.join(", ")
        )));
    }
    let mut out = Vec::new();
    for e in events {
        if !EVENT_TYPES.contains(&e.as_str()) {
            return Err(ApiError::invalid(format!(
                "events: unknown event type {e:?} (one of {})",
                EVENT_TYPES.join(", ")
            )));
        }
        if !out.contains(e) {
            out.push(e.clone());
        }
    }
    Ok(out)
}

fn provider(name: &str) -> ApiResult<Provider> {
    Provider::parse(name).map_err(|e| ApiError::invalid(format!("provider: {e}")))
}

fn view(st: &AppState, c: wrenn_db::Channel, secret: Option<String>) -> ChannelView {
    let config = match channels::open(st, &c) {
        Ok((_, s)) => match s.redacted() {
            Value::Object(m) => m,
            _ => Map::new(),
        },
        Err(_) => Map::new(),
    };
    ChannelView {
        id: c.id,
        name: c.name,
        provider: c.provider,
        events: c.event_types,
        config,
        secret,
        created_at: c.created_at,
        updated_at: c.updated_at,
    }
}

/// `config` checked for provider `p`, and sealed for channel `id`.
async fn sealed_settings(
    st: &AppState,
    p: Provider,
    config: &Value,
    id: &str,
) -> ApiResult<(channels::Settings, String)> {
    let settings = channels::prepare(st, p, config)
        .await
        .map_err(ApiError::invalid)?;
    let clear = serde_json::to_string(&settings).map_err(|e| ApiError::internal(e.to_string()))?;
    let sealed = st.channel_sealer.seal(id, &clear);
    Ok((settings, sealed))
}

fn channel_err(e: wrenn_db::DbError) -> ApiError {
    if e.is_conflict() {
        ApiError::conflict("channel_name_taken", "the team has a channel of that name")
    } else {
        e.into()
    }
}

#[utoipa::path(post, path = "/v1/channels", tag = "channels", request_body = CreateChannel,
    responses((status = 201, body = ChannelView), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 409, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn create(
    State(st): S,
    Auth(who): Auth,
    body: Result<Json<CreateChannel>, JsonRejection>,
) -> ApiResult<(StatusCode, Json<ChannelView>)> {
    user_only(&who)?;
    let Json(body) = body.map_err(json_rejection)?;
    check_name(&body.name)?;
    let events = check_events(&body.events)?;
    let p = provider(&body.provider)?;
    let id = wrenn_db::new_id(wrenn_db::prefix::CHANNEL);
    let (settings, sealed) = sealed_settings(&st, p, &body.config, &id).await?;
    let c = st
        .db
        .insert_channel(
            &who.team_id,
            wrenn_db::NewChannel {
                id: id.clone(),
                name: body.name.clone(),
                provider: p.as_str().into(),
                config: sealed,
                event_types: events,
                created_by: who.user.as_ref().map(|u| u.sub.clone()),
            },
        )
        .await
        .map_err(channel_err)?;
    st.audit(&who, "channel.create", "channel", Some(&c.id), true, None)
        .await;
    Ok((StatusCode::CREATED, Json(view(&st, c, settings.secret))))
}

#[utoipa::path(get, path = "/v1/channels", tag = "channels",
    responses((status = 200, body = Vec<ChannelView>), (status = 401, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn list(State(st): S, Auth(who): Auth) -> ApiResult<Json<Vec<ChannelView>>> {
    user_only(&who)?;
    let rows = st.db.list_channels(&who.team_id).await?;
    Ok(Json(rows.into_iter().map(|c| view(&st, c, None)).collect()))
}

#[utoipa::path(get, path = "/v1/channels/{id}", tag = "channels", params(("id" = String, Path)),
    responses((status = 200, body = ChannelView), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn get(
    State(st): S,
    Auth(who): Auth,
    Path(id): Path<String>,
) -> ApiResult<Json<ChannelView>> {
    user_only(&who)?;
    let c = st.db.get_channel(&who.team_id, &id).await?;
    Ok(Json(view(&st, c, None)))
}

#[utoipa::path(patch, path = "/v1/channels/{id}", tag = "channels", params(("id" = String, Path)),
    request_body = UpdateChannel,
    responses((status = 200, body = ChannelView), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn update(
    State(st): S,
    Auth(who): Auth,
    Path(id): Path<String>,
    body: Result<Json<UpdateChannel>, JsonRejection>,
) -> ApiResult<Json<ChannelView>> {
    user_only(&who)?;
    let Json(body) = body.map_err(json_rejection)?;
    if let Some(name) = &body.name {
        check_name(name)?;
    }
    let events = body.events.as_deref().map(check_events).transpose()?;
    let c = st
        .db
        .update_channel(
            &who.team_id,
            &id,
            wrenn_db::ChannelUpdate {
                name: body.name,
                config: None,
                event_types: events,
            },
        )
        .await
        .map_err(channel_err)?;
    st.audit(&who, "channel.update", "channel", Some(&c.id), true, None)
        .await;
    Ok(Json(view(&st, c, None)))
}

/// Replaces the channel's settings (a webhook without a `secret` gets a new one,
/// shown in this answer).
#[utoipa::path(put, path = "/v1/channels/{id}/config", tag = "channels", params(("id" = String, Path)),
    request_body = ChannelConfigBody,
    responses((status = 200, body = ChannelView), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn set_config(
    State(st): S,
    Auth(who): Auth,
    Path(id): Path<String>,
    body: Result<Json<ChannelConfigBody>, JsonRejection>,
) -> ApiResult<Json<ChannelView>> {
    user_only(&who)?;
    let Json(body) = body.map_err(json_rejection)?;
    let old = st.db.get_channel(&who.team_id, &id).await?;
    let p = provider(&old.provider)?;
    let (settings, sealed) = sealed_settings(&st, p, &body.config, &id).await?;
    let c = st
        .db
        .update_channel(
            &who.team_id,
            &id,
            wrenn_db::ChannelUpdate {
                config: Some(sealed),
                ..Default::default()
            },
        )
        .await?;
    st.audit(&who, "channel.config", "channel", Some(&c.id), true, None)
        .await;
    Ok(Json(view(&st, c, settings.secret)))
}

#[utoipa::path(delete, path = "/v1/channels/{id}", tag = "channels", params(("id" = String, Path)),
    responses((status = 204), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn delete(
    State(st): S,
    Auth(who): Auth,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    user_only(&who)?;
    st.db.delete_channel(&who.team_id, &id).await?;
    st.audit(&who, "channel.delete", "channel", Some(&id), true, None)
        .await;
    Ok(StatusCode::NO_CONTENT)
}

/// Sends a `channel.test` message with these settings now, once, and says how it went.
#[utoipa::path(post, path = "/v1/channels/test", tag = "channels", request_body = TestChannel,
    responses((status = 200, body = SendResult, description = "What the receiver answered (ok: a 2xx)"),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn test(
    State(st): S,
    Auth(who): Auth,
    body: Result<Json<TestChannel>, JsonRejection>,
) -> ApiResult<Json<SendResult>> {
    user_only(&who)?;
    let Json(body) = body.map_err(json_rejection)?;
    let p = provider(&body.provider)?;
    let settings = channels::prepare(&st, p, &body.config)
        .await
        .map_err(ApiError::invalid)?;
    let payload = serde_json::to_string(&Payload::test(&who.team_id))
        .map_err(|e| ApiError::internal(e.to_string()))?;
    let delivery = wrenn_db::new_id(wrenn_db::prefix::DELIVERY);
    let result = channels::send(p, &settings, &delivery, &payload, &st.config.channels).await;
    Ok(Json(result))
}

/// The channel's newest deliveries and how each went.
#[utoipa::path(get, path = "/v1/channels/{id}/deliveries", tag = "channels",
    params(("id" = String, Path), DeliveriesQuery),
    responses((status = 200, body = Vec<DeliveryView>), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn deliveries(
    State(st): S,
    Auth(who): Auth,
    Path(id): Path<String>,
    q: Result<Query<DeliveriesQuery>, QueryRejection>,
) -> ApiResult<Json<Vec<DeliveryView>>> {
    user_only(&who)?;
    let Query(q) = q.map_err(query_rejection)?;
    let limit = q.limit.unwrap_or(50);
    if !(1..=200).contains(&limit) {
        return Err(ApiError::invalid(format!(
            "limit must be between 1 and 200, got {limit}"
        )));
    }
    // 404 for another team's channel.
    st.db.get_channel(&who.team_id, &id).await?;
    let rows = st.db.list_deliveries(&who.team_id, &id, limit).await?;
    Ok(Json(
        rows.into_iter()
            .map(|d| DeliveryView {
                next_attempt_at: (d.status == wrenn_db::DeliveryStatus::Pending)
                    .then_some(d.next_at),
                id: d.id,
                event: d.event_type,
                status: d.status.as_str().into(),
                attempts: d.attempts,
                last_status: d.last_status,
                last_error: d.last_error,
                payload: serde_json::from_str(&d.payload).unwrap_or(Value::Null),
                created_at: d.created_at,
                delivered_at: d.delivered_at,
            })
            .collect(),
    ))
}
