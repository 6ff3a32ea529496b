//! Wrenn control plane: the `/v1` REST API, the E2B-compatible API, the proxy into
//! capsules, background lifecycle jobs and the server's own metrics, over a
//! [`HostAgent`](agent::HostAgent) (in process: `wrenn_agent::LocalAgent`). It links
//! no host stack: no VMM, network or memory code.
//!
//! [`router`] builds the whole HTTP surface for an [`AppState`];
//! [`server::ControlPlane`] wires it to a database, a host agent and a listener, as
//! `wrenn serve` does.

pub mod agent;
pub mod auth;
pub mod builds;
pub mod cache;
pub mod channels;
pub mod cluster;
pub mod e2b;
pub mod error;
pub mod events;
pub mod hosts;
pub mod lifecycle;
pub mod metrics;
pub mod openapi;
pub mod proxy;
pub mod quota;
pub mod secrets;
pub mod server;
pub mod service;
pub mod state;
pub mod v1;

pub use state::{ApiConfig, AppState};
/// The `e2b_…` spelling of a Wrenn API key (for E2B SDKs that check the key's form).
pub use wrenn_db::e2b_spelling;

use axum::extract::DefaultBodyLimit;
use axum::routing::{delete, get, patch, post, put};
use axum::Router;
use std::sync::Arc;

/// The envd protocol version the guests of this build speak.
pub const ENVD_VERSION: &str = wrenn_envd::ENVD_VERSION;

/// Whether this binary serves the web dashboard at `/` (it was built before the binary).
pub fn dashboard_built() -> bool {
    wrenn_dashboard::built()
}

/// The whole HTTP surface.
pub fn router(state: Arc<AppState>) -> Router {
    use v1::{account, capsules, files, snapshots, ws};
    let uploads = Router::new()
        .route("/v1/capsules/{id}/files/write", post(files::write))
        .route(
            "/v1/capsules/{id}/files/stream/write",
            post(files::stream_write),
        )
        .layer(DefaultBodyLimit::disable());
    let v1 = Router::new()
        .route("/v1/auth/signup", post(account::signup))
        .route("/v1/auth/login", post(account::login))
        .route("/v1/auth/switch-team", post(account::switch_team))
        .route("/v1/me", get(account::me).patch(account::update_me))
        .route("/v1/me/password", post(account::change_password))
        .route(
            "/v1/teams",
            get(account::list_teams).post(account::create_team),
        )
        .route(
            "/v1/teams/{id}",
            get(account::get_team)
                .patch(account::rename_team)
                .delete(account::delete_team),
        )
        .route(
            "/v1/teams/{id}/members",
            get(account::list_members).post(account::add_member),
        )
        .route(
            "/v1/teams/{id}/members/{uid}",
            axum::routing::patch(account::set_role).delete(account::remove_member),
        )
        .route("/v1/teams/{id}/leave", post(account::leave_team))
        .route(
            "/v1/teams/{id}/invitations",
            get(account::list_invitations).post(account::create_invitation),
        )
        .route(
            "/v1/teams/{id}/invitations/{invitation}",
            delete(account::delete_invitation),
        )
        .route(
            "/v1/api-keys",
            get(account::list_keys).post(account::create_key),
        )
        .route("/v1/api-keys/{id}", delete(account::delete_key))
        .route("/v1/audit-logs", get(account::audit_logs))
        .route("/v1/capsules", get(capsules::list).post(capsules::create))
        .route("/v1/capsules/stats", get(v1::stats::stats))
        .route("/v1/capsules/usage", get(v1::stats::usage))
        .route(
            "/v1/capsules/{id}",
            get(capsules::get).delete(capsules::destroy),
        )
        .route("/v1/capsules/{id}/ping", post(capsules::ping))
        .route("/v1/capsules/{id}/network", patch(capsules::set_network))
        .route("/v1/capsules/{id}/pause", post(capsules::pause))
        .route("/v1/capsules/{id}/resume", post(capsules::resume))
        .route("/v1/capsules/{id}/exec", post(capsules::exec))
        .route("/v1/capsules/{id}/exec/stream", get(ws::exec_stream))
        .route("/v1/capsules/{id}/processes", get(capsules::processes))
        .route(
            "/v1/capsules/{id}/processes/{selector}",
            delete(capsules::kill_process),
        )
        .route(
            "/v1/capsules/{id}/processes/{selector}/stream",
            get(ws::process_stream),
        )
        .route("/v1/capsules/{id}/pty", get(ws::pty))
        .route("/v1/capsules/{id}/metrics", get(capsules::metrics))
        .route("/v1/capsules/{id}/files/read", post(files::read))
        .route(
            "/v1/capsules/{id}/files/stream/read",
            post(files::stream_read),
        )
        .route("/v1/capsules/{id}/files/list", post(files::list))
        .route("/v1/capsules/{id}/files/mkdir", post(files::mkdir))
        .route("/v1/capsules/{id}/files/remove", post(files::remove))
        .route(
            "/v1/snapshots",
            get(snapshots::list).post(snapshots::create),
        )
        .route("/v1/snapshots/{name}", delete(snapshots::delete))
        .route(
            "/v1/builds",
            get(v1::builds::list).post(v1::builds::create).layer(
                axum::extract::DefaultBodyLimit::max(
                    usize::try_from(state.config.upload_limit).unwrap_or(usize::MAX) + (1 << 20),
                ),
            ),
        )
        .route("/v1/builds/{id}", get(v1::builds::get))
        .route("/v1/builds/{id}/logs", get(v1::builds::logs))
        .route("/v1/builds/{id}/cancel", post(v1::builds::cancel))
        .route(
            "/v1/admin/builds",
            get(v1::builds::admin_list)
                .post(v1::builds::admin_create)
                .layer(axum::extract::DefaultBodyLimit::max(
                    usize::try_from(state.config.upload_limit).unwrap_or(usize::MAX) + (1 << 20),
                )),
        )
        .route("/v1/admin/builds/{id}", get(v1::builds::admin_get))
        .route(
            "/v1/admin/builds/{id}/cancel",
            post(v1::builds::admin_cancel),
        )
        .route(
            "/v1/channels",
            get(v1::channels::list).post(v1::channels::create),
        )
        .route("/v1/channels/test", post(v1::channels::test))
        .route(
            "/v1/channels/{id}",
            get(v1::channels::get)
                .patch(v1::channels::update)
                .delete(v1::channels::delete),
        )
        .route("/v1/channels/{id}/config", put(v1::channels::set_config))
        .route(
            "/v1/channels/{id}/deliveries",
            get(v1::channels::deliveries),
        )
        .route("/v1/hosts", get(v1::hosts::list).post(v1::hosts::create))
        .route("/v1/hosts/register", post(v1::hosts::register))
        .route("/v1/hosts/auth/refresh", post(v1::hosts::refresh))
        .route(
            "/v1/hosts/join-tokens",
            get(v1::hosts::join_tokens).post(v1::hosts::create_join_token),
        )
        .route(
            "/v1/hosts/join-tokens/{id}",
            delete(v1::hosts::delete_join_token),
        )
        .route(
            "/v1/hosts/{id}",
            get(v1::hosts::get).delete(v1::hosts::delete),
        )
        .route("/v1/hosts/{id}/token", post(v1::hosts::new_token))
        .route(
            "/v1/hosts/{id}/drain",
            post(v1::hosts::drain).delete(v1::hosts::undrain),
        )
        .route(
            "/v1/hosts/{id}/tags",
            get(v1::hosts::tags).post(v1::hosts::add_tag),
        )
        .route("/v1/hosts/{id}/tags/{tag}", delete(v1::hosts::remove_tag))
        .route(
            "/v1/hosts/{id}/delete-preview",
            get(v1::hosts::delete_preview),
        )
        .route("/v1/events/stream", get(events::stream))
        .route("/v1/admin/pools", get(v1::admin::pools))
        .route("/v1/admin/teams", get(v1::admin::teams))
        .route("/v1/admin/users", get(v1::admin::users))
        .route("/v1/admin/users/{id}/active", put(v1::admin::set_active))
        .route("/v1/admin/capsules", get(v1::admin::capsules))
        .route(
            "/v1/admin/capsules/{id}",
            get(v1::admin::capsule).delete(v1::admin::destroy_capsule),
        )
        .route("/v1/admin/templates", get(v1::admin::templates))
        .route("/v1/admin/audit-logs", get(v1::admin::audit_logs))
        .route("/v1/admin/pools/{template}", put(v1::admin::set_pool))
        .merge(uploads)
        .method_not_allowed_fallback(openapi::method_not_allowed);
    let e2b = Router::new()
        .route("/sandboxes", get(e2b::list_v1).post(e2b::create))
        .route("/v2/sandboxes", get(e2b::list_v2).post(e2b::create_v2))
        .route("/sandboxes/{id}", get(e2b::get).delete(e2b::kill))
        .route("/sandboxes/{id}/connect", post(e2b::connect))
        .route("/v2/sandboxes/{id}/connect", post(e2b::connect_v2))
        .route("/sandboxes/{id}/resume", post(e2b::resume))
        .route("/sandboxes/{id}/timeout", post(e2b::set_timeout))
        .route("/sandboxes/{id}/network", put(e2b::update_network))
        .route("/sandboxes/{id}/pause", post(e2b::pause))
        .route("/sandboxes/{id}/metrics", get(e2b::metrics))
        .route("/sandboxes/{id}/fork", post(e2b::fork))
        .route("/sandboxes/{id}/snapshots", post(e2b::create_snapshot))
        .route("/snapshots", get(e2b::list_snapshots))
        .route("/templates/{id}", delete(e2b::delete_template))
        .route("/v3/templates", post(e2b::templates::request_build))
        .route(
            "/templates/{id}/files/{hash}",
            get(e2b::templates::file_upload_link)
                .put(e2b::templates::upload_files)
                .layer(DefaultBodyLimit::max(
                    usize::try_from(state.config.upload_limit).unwrap_or(usize::MAX) + (1 << 20),
                )),
        )
        .route(
            "/v2/templates/{id}/builds/{build}",
            post(e2b::templates::start_build),
        )
        .route(
            "/templates/{id}/builds/{build}/status",
            get(e2b::templates::build_status),
        )
        .route("/templates/aliases/{alias}", get(e2b::templates::alias))
        .method_not_allowed_fallback(openapi::method_not_allowed);
    Router::new()
        .merge(v1)
        .merge(e2b)
        .merge(wrenn_dashboard::router())
        .route("/health", get(openapi::health))
        .route("/metrics", get(metrics::serve))
        .route("/openapi.json", get(openapi::spec))
        .route("/docs", get(openapi::docs))
        .fallback(openapi::not_found)
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            metrics::track,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            proxy::layer,
        ))
        .layer(tower_http::trace::TraceLayer::new_for_http())
        .with_state(state)
}
