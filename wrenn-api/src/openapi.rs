//! The OpenAPI document (generated from the handlers), a self-contained docs page,
//! health and the fallback.

use crate::error::{ApiError, ErrorBody};
use crate::state::AppState;
use crate::{e2b, v1};
use axum::extract::State;
use axum::http::{header, Method, StatusCode, Uri};
use axum::response::{Html, IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use std::sync::Arc;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi, ToSchema};

struct Security;

impl Modify for Security {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        let c = doc.components.get_or_insert_with(Default::default);
        c.add_security_scheme(
            "api_key",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::new("X-API-Key"))),
        );
        c.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .build(),
            ),
        );
    }
}

/// Answers every operation can give without its handler saying so: 401 when it needs
/// credentials, 400 when it takes a body or query parameters (malformed ones are
/// rejected before the handler runs), in the error shape of its API.
struct CommonErrors;

impl Modify for CommonErrors {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::path::ParameterIn;
        use utoipa::openapi::{ContentBuilder, Ref, ResponseBuilder};
        for item in doc.paths.paths.values_mut() {
            let ops = [
                &mut item.get,
                &mut item.put,
                &mut item.post,
                &mut item.delete,
                &mut item.patch,
            ];
            for op in ops.into_iter().flatten() {
                let e2b = op
                    .tags
                    .as_ref()
                    .is_some_and(|t| t.iter().any(|t| t == "e2b"));
                let schema = if e2b { "E2bErrorBody" } else { "ErrorBody" };
                let error = |description: &str| {
                    ResponseBuilder::new()
                        .description(description)
                        .content(
                            "application/json",
                            ContentBuilder::new()
                                .schema(Some(Ref::from_schema_name(schema)))
                                .build(),
                        )
                        .build()
                        .into()
                };
                let query = op
                    .parameters
                    .as_ref()
                    .is_some_and(|ps| ps.iter().any(|p| p.parameter_in == ParameterIn::Query));
                let responses = &mut op.responses.responses;
                if op.request_body.is_some() || query {
                    responses
                        .entry("400".into())
                        .or_insert_with(|| error("Malformed request"));
                }
                if op.security.as_ref().is_some_and(|s| !s.is_empty()) {
                    responses
                        .entry("401".into())
                        .or_insert_with(|| error("Missing or invalid credentials"));
                }
            }
        }
    }
}

#[derive(Debug, OpenApi)]
#[openapi(
    info(title = "Wrenn API", description = "Capsules (microVMs) over REST: the Wrenn /v1 API and the E2B-compatible /sandboxes API."),
    modifiers(&Security, &CommonErrors),
    paths(
        health,
        v1::account::signup, v1::account::login, v1::account::switch_team,
        v1::account::me, v1::account::update_me, v1::account::change_password,
        v1::account::list_teams, v1::account::create_team, v1::account::get_team,
        v1::account::rename_team, v1::account::delete_team, v1::account::list_members,
        v1::account::add_member, v1::account::set_role, v1::account::remove_member,
        v1::account::leave_team, v1::account::create_key, v1::account::list_keys,
        v1::account::create_invitation, v1::account::list_invitations, v1::account::delete_invitation,
        v1::account::delete_key, v1::account::audit_logs,
        v1::capsules::create, v1::capsules::list, v1::capsules::get, v1::capsules::destroy,
        v1::capsules::ping, v1::capsules::set_network, v1::capsules::pause, v1::capsules::resume, v1::capsules::exec,
        v1::capsules::processes, v1::capsules::kill_process, v1::capsules::metrics,
        v1::stats::stats, v1::stats::usage,
        v1::files::read, v1::files::stream_read, v1::files::write, v1::files::stream_write,
        v1::files::list, v1::files::mkdir, v1::files::remove,
        v1::snapshots::create, v1::snapshots::list, v1::snapshots::delete,
        v1::builds::create, v1::builds::list, v1::builds::get, v1::builds::logs, v1::builds::cancel,
        v1::builds::admin_list, v1::builds::admin_create, v1::builds::admin_get, v1::builds::admin_cancel,
        v1::admin::pools, v1::admin::set_pool, v1::admin::audit_logs, crate::events::stream,
        v1::admin::teams, v1::admin::users, v1::admin::set_active, v1::admin::capsules,
        v1::admin::capsule, v1::admin::destroy_capsule, v1::admin::templates,
        v1::channels::create, v1::channels::list, v1::channels::get, v1::channels::update,
        v1::channels::set_config, v1::channels::delete, v1::channels::test, v1::channels::deliveries,
        v1::hosts::list, v1::hosts::get, v1::hosts::delete_preview, v1::hosts::create,
        v1::hosts::new_token, v1::hosts::delete, v1::hosts::tags, v1::hosts::add_tag,
        v1::hosts::remove_tag, v1::hosts::register, v1::hosts::refresh, v1::hosts::drain,
        v1::hosts::create_join_token, v1::hosts::join_tokens, v1::hosts::delete_join_token, v1::hosts::undrain,
        e2b::create, e2b::create_v2, e2b::connect, e2b::connect_v2, e2b::resume, e2b::get, e2b::kill, e2b::set_timeout,
        e2b::pause, e2b::list_v2, e2b::list_v1, e2b::metrics, e2b::fork, e2b::update_network,
        e2b::create_snapshot, e2b::list_snapshots, e2b::delete_template,
        e2b::templates::request_build, e2b::templates::file_upload_link, e2b::templates::upload_files,
        e2b::templates::start_build, e2b::templates::build_status, e2b::templates::alias,
    ),
    components(schemas(ErrorBody, Health)),
    tags(
        (name = "capsules", description = "Capsule lifecycle"),
        (name = "exec", description = "Commands and processes (WebSockets: GET /v1/capsules/{id}/exec/stream, /processes/{selector}/stream, /pty)"),
        (name = "files", description = "Files inside a capsule"),
        (name = "snapshots", description = "Snapshot templates"),
        (name = "builds", description = "Template builds from recipes"),
        (name = "channels", description = "Notification channels: lifecycle events to webhooks and chat services (user tokens)"),
        (name = "hosts", description = "Hosts that run capsules (platform admins)"),
        (name = "admin", description = "Every team's teams, accounts, capsules and templates (platform admins)"),
        (name = "e2b", description = "E2B-compatible API (errors as {code, message})"),
    )
)]
pub struct ApiDoc;

#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    pub status: String,
    pub version: String,
    /// kvm or tcg: how this host runs guests.
    pub accel: String,
}

#[utoipa::path(get, path = "/health", tag = "capsules", responses((status = 200, body = Health)))]
pub async fn health(State(st): State<Arc<AppState>>) -> Json<Health> {
    Json(Health {
        status: "ok".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        accel: match st.hosts.any() {
            Ok(h) => h
                .versions()
                .await
                .map(|v| v.accel.clone())
                .unwrap_or_default(),
            Err(_) => String::new(),
        },
    })
}

pub async fn spec() -> Response {
    match ApiDoc::openapi().to_json() {
        Ok(s) => ([(header::CONTENT_TYPE, "application/json")], s).into_response(),
        Err(e) => ApiError::internal(format!("openapi: {e}")).into_response(),
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A plain HTML reference of every operation, built from the same document (works
/// offline: no scripts).
pub async fn docs() -> Html<String> {
    let doc = ApiDoc::openapi();
    let mut out = String::from(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>Wrenn API</title>\
         <style>body{font-family:system-ui,sans-serif;max-width:60em;margin:2em auto;padding:0 1em}\
         code{background:#f3f3f3;padding:0 .3em}h3{margin-bottom:.2em}.m{font-weight:bold;display:inline-block;width:5em}\
         </style></head><body><h1>Wrenn API</h1><p>Machine-readable: <a href=\"/openapi.json\">/openapi.json</a>. \
         Authenticate with <code>X-API-Key: wrn_…</code> or <code>Authorization: Bearer &lt;jwt&gt;</code>.</p>",
    );
    for (path, item) in &doc.paths.paths {
        let ops = [
            ("GET", &item.get),
            ("POST", &item.post),
            ("PUT", &item.put),
            ("PATCH", &item.patch),
            ("DELETE", &item.delete),
        ];
        for (method, op) in ops {
            let Some(op) = op else { continue };
            out.push_str(&format!(
                "<h3><span class=\"m\">{method}</span><code>{}</code></h3>",
                escape(path)
            ));
            if let Some(d) = op.description.as_deref().or(op.summary.as_deref()) {
                out.push_str(&format!("<p>{}</p>", escape(d)));
            }
            let codes: Vec<&str> = op.responses.responses.keys().map(String::as_str).collect();
            out.push_str(&format!("<p>Responses: {}</p>", escape(&codes.join(", "))));
        }
    }
    out.push_str("</body></html>");
    Html(out)
}

/// Unknown routes: E2B's `{code, message}` under the E2B API's paths (so its SDK raises
/// its own typed errors), the Wrenn body everywhere else.
pub async fn not_found(method: Method, uri: Uri) -> Response {
    shaped_for(
        &uri,
        ApiError::not_found(&format!("route {method} {}", uri.path())),
    )
}

/// A known route called with a method it does not have (axum's default is an empty 405).
pub async fn method_not_allowed(method: Method, uri: Uri) -> Response {
    shaped_for(
        &uri,
        ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            format!("method {method} is not allowed on {}", uri.path()),
        ),
    )
}

/// `e` in the body shape of the API that `uri` belongs to.
fn shaped_for(uri: &Uri, e: ApiError) -> Response {
    if crate::e2b::is_e2b_path(uri.path()) {
        crate::error::E2bError(e).into_response()
    } else {
        e.into_response()
    }
}
