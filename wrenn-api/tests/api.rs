//! The control plane in process on both database backends: accounts, teams, keys,
//! audit, validation, rate limiting, OpenAPI, and a real capsule's lifecycle plus
//! reconciliation with the host. Needs root and the built images.

#![allow(clippy::tests_outside_test_module)] // integration tests are their own crate

#[path = "../../wrenn-db/tests/harness/mod.rs"]
#[allow(dead_code)]
mod harness;

use axum::body::Body;
use axum::http::{header, Method, Request, StatusCode};
use harness::TestDb;
use http_body_util::BodyExt;
use serde_json::{json, Value};
use std::path::Path;
use std::sync::Arc;
use tower::ServiceExt;
use wrenn_api::agent::{CapsuleSpec, HostAgent, LocalAgent, LocalAgentOptions};
use wrenn_api::{router, ApiConfig, AppState};
use wrenn_core::status::CapsuleStatus;

const IMAGES: &str = "/var/lib/wrenn";
const KEY: &str = "wrn_00112233445566778899aabbccddeeff";

/// A data directory whose platform templates are the built images.
fn data_dir() -> tempfile::TempDir {
    std::fs::create_dir_all("/var/lib/wrenn-test").expect("test root");
    let dir = tempfile::tempdir_in("/var/lib/wrenn-test").expect("temp data dir");
    let root = dir.path();
    std::os::unix::fs::symlink(Path::new(IMAGES).join("images"), root.join("images"))
        .expect("link images");
    std::fs::create_dir_all(root.join("templates")).expect("templates dir");
    let tpl = Path::new(IMAGES).join("templates/minimal");
    assert!(
        tpl.join("rootfs.img").exists(),
        "no template 'minimal' under {IMAGES}: run `wrenn image build` first"
    );
    std::os::unix::fs::symlink(&tpl, root.join("templates/minimal")).expect("link template");
    // Same boot, same host: reuse the acceleration probe of the default data dir.
    if let Ok(probe) = std::fs::read("/run/wrenn/accel-probe.json") {
        let _ = std::fs::create_dir_all(root.join("run"));
        let _ = std::fs::write(root.join("run/accel-probe.json"), probe);
    }
    dir
}

struct Api {
    state: Arc<AppState>,
    app: axum::Router,
    _dir: tempfile::TempDir,
}

async fn api(t: &TestDb, config: ApiConfig) -> Api {
    let dir = data_dir();
    let host = wrenn::Host::local(wrenn::HostOptions {
        data_dir: wrenn::DataDir::new(dir.path()),
        ..Default::default()
    })
    .await
    .expect("host");
    let agent: Arc<dyn HostAgent> = Arc::new(LocalAgent::new(host, LocalAgentOptions::default()));
    wrenn_db::ensure_bootstrap(&t.db, Some(KEY))
        .await
        .expect("bootstrap");
    let state = Arc::new(AppState::new(
        t.db.clone(),
        agent,
        config,
        b"test-secret-test-secret-test-secret!",
    ));
    Api {
        app: router(state.clone()),
        state,
        _dir: dir,
    }
}

#[derive(Debug)]
struct Resp {
    status: StatusCode,
    headers: axum::http::HeaderMap,
    body: Value,
    text: String,
}

impl Api {
    async fn call(
        &self,
        method: Method,
        path: &str,
        auth: Option<&str>,
        body: Option<Value>,
    ) -> Resp {
        let mut req = Request::builder().method(method).uri(path);
        match auth {
            Some(k) if k.starts_with("wrn_") || k.starts_with("e2b_") => {
                req = req.header("x-api-key", k)
            }
            Some(t) => req = req.header(header::AUTHORIZATION, format!("Bearer {t}")),
            None => {}
        }
        let body = match body {
            Some(v) => {
                req = req.header(header::CONTENT_TYPE, "application/json");
                Body::from(v.to_string())
            }
            None => Body::empty(),
        };
        let resp = self
            .app
            .clone()
            .oneshot(req.body(body).expect("request"))
            .await
            .expect("infallible");
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = resp.into_body().collect().await.expect("body").to_bytes();
        let text = String::from_utf8_lossy(&bytes).into_owned();
        Resp {
            status,
            headers,
            body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
            text,
        }
    }

    async fn get(&self, path: &str, auth: Option<&str>) -> Resp {
        self.call(Method::GET, path, auth, None).await
    }

    async fn post(&self, path: &str, auth: Option<&str>, body: Value) -> Resp {
        self.call(Method::POST, path, auth, Some(body)).await
    }

    /// Signs up and logs in; returns the JWT and user id.
    async fn user(&self, email: &str) -> (String, String) {
        let r = self
            .post(
                "/v1/auth/signup",
                None,
                json!({"email": email, "password": "long enough pw", "name": "U"}),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
        let r = self
            .post(
                "/v1/auth/login",
                None,
                json!({"email": email, "password": "long enough pw"}),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        (
            r.body["token"].as_str().expect("token").to_string(),
            r.body["user_id"].as_str().expect("user id").to_string(),
        )
    }
}

fn error_code(r: &Resp) -> &str {
    r.body["error"]["code"]
        .as_str()
        .unwrap_or("<no error code>")
}

async fn accounts_teams_and_keys(t: &TestDb) {
    let a = api(t, ApiConfig::default()).await;
    let (alice, alice_id) = a.user("alice@example.com").await;

    // Sign-up validation and login failures.
    let r = a
        .post(
            "/v1/auth/signup",
            None,
            json!({"email": "alice@example.com", "password": "long enough pw"}),
        )
        .await;
    assert_eq!(
        (r.status, error_code(&r)),
        (StatusCode::CONFLICT, "email_taken")
    );
    let r = a
        .post(
            "/v1/auth/signup",
            None,
            json!({"email": "bob@example.com", "password": "short"}),
        )
        .await;
    assert_eq!(
        (r.status, error_code(&r)),
        (StatusCode::BAD_REQUEST, "invalid_request")
    );
    let r = a
        .post(
            "/v1/auth/login",
            None,
            json!({"email": "alice@example.com", "password": "wrong password"}),
        )
        .await;
    assert_eq!(
        (r.status, error_code(&r)),
        (StatusCode::UNAUTHORIZED, "wrong_password")
    );

    // /v1/me takes a user token, not an API key.
    let r = a.get("/v1/me", Some(&alice)).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.body["email"], "alice@example.com");
    assert_eq!(r.body["has_password"], true);
    let r = a.get("/v1/me", Some(KEY)).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    let r = a.get("/v1/me", Some("not.a.jwt")).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);

    // Teams: alice owns her default team; a second team; switching.
    let r = a.get("/v1/teams", Some(&alice)).await;
    let teams = r.body.as_array().expect("teams").clone();
    assert_eq!(teams.len(), 1);
    assert_eq!(teams[0]["role"], "owner");
    let home = teams[0]["id"].as_str().expect("id").to_string();
    let r = a
        .post("/v1/teams", Some(&alice), json!({"name": "Side"}))
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let side = r.body["id"].as_str().expect("id").to_string();
    let r = a
        .post(
            "/v1/auth/switch-team",
            Some(&alice),
            json!({"team_id": side}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body["team_id"], side.as_str());

    // Members: bob joins as member; members cannot manage; outsiders get 404.
    let (bob, bob_id) = a.user("bob@example.com").await;
    let r = a.get(&format!("/v1/teams/{home}"), Some(&bob)).await;
    assert_eq!(
        r.status,
        StatusCode::NOT_FOUND,
        "non-members must not see the team"
    );
    let r = a
        .post(
            &format!("/v1/teams/{home}/members"),
            Some(&alice),
            json!({"email": "bob@example.com"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    assert_eq!(r.body["role"], "member");
    let r = a
        .call(
            Method::PATCH,
            &format!("/v1/teams/{home}"),
            Some(&bob),
            Some(json!({"name": "Mine"})),
        )
        .await;
    assert_eq!(
        (r.status, error_code(&r)),
        (StatusCode::FORBIDDEN, "forbidden")
    );
    let r = a
        .call(
            Method::PATCH,
            &format!("/v1/teams/{home}/members/{bob_id}"),
            Some(&alice),
            Some(json!({"role": "admin"})),
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text);
    let r = a.get(&format!("/v1/teams/{home}"), Some(&alice)).await;
    let members = r.body["members"].as_array().expect("members");
    assert!(members
        .iter()
        .any(|m| m["user_id"] == bob_id.as_str() && m["role"] == "admin"));
    assert!(members.iter().any(|m| m["user_id"] == alice_id.as_str()));

    // API keys: shown once, work at once, stop working at once when deleted.
    let r = a
        .post("/v1/api-keys", Some(&alice), json!({"name": "ci"}))
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let key = r.body["key"].as_str().expect("key").to_string();
    let key_id = r.body["id"].as_str().expect("id").to_string();
    assert!(key.starts_with("wrn_") && key.len() == 36);
    assert_eq!(r.body["key_prefix"], &key[..10]);
    let r = a.get("/v1/api-keys", Some(&alice)).await;
    let listed = r.body.as_array().expect("keys");
    assert!(
        listed.iter().all(|k| k.get("key").is_none()),
        "keys are never listed in plaintext"
    );
    assert!(listed.iter().any(|k| k["id"] == key_id.as_str()));
    let r = a.get("/v1/capsules", Some(&key)).await;
    assert_eq!(r.status, StatusCode::OK);
    let r = a
        .call(
            Method::DELETE,
            &format!("/v1/api-keys/{key_id}"),
            Some(&alice),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    let r = a.get("/v1/capsules", Some(&key)).await;
    assert_eq!(
        (r.status, error_code(&r)),
        (StatusCode::UNAUTHORIZED, "unauthorized")
    );

    // Audit: the key's creation and deletion, by alice, newest first.
    let r = a
        .get("/v1/audit-logs?resource_type=api_key", Some(&alice))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let items = r.body["items"].as_array().expect("items");
    let actions: Vec<&str> = items.iter().filter_map(|i| i["action"].as_str()).collect();
    assert_eq!(actions, ["api_key.delete", "api_key.create"]);
    assert!(items.iter().all(|i| i["actor_type"] == "user"
        && i["actor_id"] == alice_id.as_str()
        && i["status"] == "success"));
    // Bob's view of the audit log of his own team does not show alice's team's rows.
    let r = a.get("/v1/audit-logs", Some(&bob)).await;
    let items = r.body["items"].as_array().expect("items");
    assert!(items.iter().all(|i| i["action"] != "api_key.create"));
    drop(a.state);
}

async fn validation_and_limits(t: &TestDb) {
    let a = api(
        t,
        ApiConfig {
            rate_limit: 2,
            rate_burst: 3,
            ..Default::default()
        },
    )
    .await;
    // The bucket holds 3: the fourth request in a burst is refused with Retry-After.
    let mut statuses = Vec::new();
    let mut last = None;
    for _ in 0..5 {
        let r = a.get("/v1/capsules", Some(KEY)).await;
        statuses.push(r.status);
        last = Some(r);
    }
    assert_eq!(&statuses[..3], &[StatusCode::OK; 3]);
    let last = last.expect("response");
    assert_eq!(
        (last.status, error_code(&last)),
        (StatusCode::TOO_MANY_REQUESTS, "rate_limited")
    );
    assert!(last.headers.contains_key(header::RETRY_AFTER));
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;

    let cases = [
        (
            Method::POST,
            "/v1/capsules",
            Some(json!({"template": "minimal", "bogus": 1})),
        ),
        (
            Method::POST,
            "/v1/capsules",
            Some(json!({"template": "../etc"})),
        ),
        (
            Method::POST,
            "/v1/capsules",
            Some(json!({"metadata": {"envd_version": "x"}})),
        ),
        (
            Method::POST,
            "/v1/snapshots",
            Some(json!({"sandbox_id": "cl-x", "name": "-bad name"})),
        ),
    ];
    for (m, path, body) in cases {
        let r = a.call(m, path, Some(KEY), body).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{path}: {}", r.text);
        assert_eq!(error_code(&r), "invalid_request");
        assert!(!r.body["error"]["message"].as_str().unwrap_or("").is_empty());
        tokio::time::sleep(std::time::Duration::from_millis(600)).await;
    }
    let r = a.get("/v1/audit-logs?limit=0", Some(KEY)).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    tokio::time::sleep(std::time::Duration::from_millis(600)).await;
    let r = a.get("/v1/capsules/cl-doesnotexist", Some(KEY)).await;
    assert_eq!(
        (r.status, error_code(&r)),
        (StatusCode::NOT_FOUND, "not_found")
    );
    let r = a.get("/v1/nothing-here", Some(KEY)).await;
    assert_eq!(
        (r.status, error_code(&r)),
        (StatusCode::NOT_FOUND, "not_found")
    );
    // E2B routes answer in E2B's shape.
    let r = a.get("/sandboxes/cl-doesnotexist", Some(KEY)).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.body["code"], 404);

    // The OpenAPI document and the docs page come from the handlers.
    let r = a.get("/openapi.json", None).await;
    assert_eq!(r.status, StatusCode::OK);
    for p in [
        "/v1/capsules",
        "/v1/capsules/{id}/exec",
        "/sandboxes",
        "/v2/sandboxes",
        "/v1/audit-logs",
    ] {
        assert!(r.body["paths"].get(p).is_some(), "openapi lacks {p}");
    }
    let r = a.get("/docs", None).await;
    assert!(r.text.contains("/v1/capsules/{id}/files/write"));
    let r = a.get("/metrics", None).await;
    assert!(r.text.contains("wrenn_http_requests_total"), "{}", r.text);
}

/// Every path of the E2B API answers E2B's `{code, message}`, unknown routes and methods
/// included; `/v1` keeps Wrenn's body. Keys work in both spellings.
async fn e2b_error_shapes_and_key_spellings(t: &TestDb) {
    let a = api(t, ApiConfig::default()).await;
    let e2b_key = format!("e2b_{}", &KEY[4..]);
    for (m, path, status) in [
        (Method::GET, "/sandboxes/cl-x/logs", StatusCode::NOT_FOUND),
        (
            Method::PUT,
            "/sandboxes/cl-x/network",
            StatusCode::NOT_FOUND,
        ),
        (Method::POST, "/v3/templates", StatusCode::NOT_FOUND),
        (Method::GET, "/templates/t/tags", StatusCode::NOT_FOUND),
        (
            Method::GET,
            "/v2/sandboxes/cl-x/logs",
            StatusCode::NOT_FOUND,
        ),
        (Method::PUT, "/sandboxes", StatusCode::METHOD_NOT_ALLOWED),
        (
            Method::DELETE,
            "/v2/sandboxes",
            StatusCode::METHOD_NOT_ALLOWED,
        ),
        (
            Method::GET,
            "/sandboxes/cl-x/pause",
            StatusCode::METHOD_NOT_ALLOWED,
        ),
    ] {
        let r = a.call(m.clone(), path, Some(&e2b_key), None).await;
        assert_eq!(r.status, status, "{m} {path}: {}", r.text);
        assert_eq!(r.body["code"], status.as_u16(), "{m} {path}: {}", r.text);
        let msg = r.body["message"].as_str().unwrap_or("");
        assert!(msg.contains(path), "{m} {path}: {msg}");
        assert_eq!(r.body.as_object().map(|o| o.len()), Some(2), "{}", r.text);
        if status == StatusCode::METHOD_NOT_ALLOWED {
            assert!(
                r.headers.contains_key(header::ALLOW),
                "{m} {path}: no Allow"
            );
        }
    }
    let r = a.call(Method::PUT, "/v1/capsules", Some(KEY), None).await;
    assert_eq!(
        (r.status, error_code(&r)),
        (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed")
    );
    // "/sandboxesx" is not under the E2B API.
    let r = a.get("/sandboxesx", Some(KEY)).await;
    assert_eq!(
        (r.status, error_code(&r)),
        (StatusCode::NOT_FOUND, "not_found")
    );

    // Both spellings of a key are one key.
    let r = a.get("/v2/sandboxes", Some(&e2b_key)).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let r = a
        .post("/v1/api-keys", Some(&e2b_key), json!({"name": "k"}))
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let (id, key, alias) = (
        r.body["id"].as_str().expect("id").to_string(),
        r.body["key"].as_str().expect("key").to_string(),
        r.body["e2b_key"].as_str().expect("e2b key").to_string(),
    );
    assert_eq!(alias, format!("e2b_{}", &key[4..]));
    assert_eq!(
        a.get("/v1/capsules", Some(&alias)).await.status,
        StatusCode::OK
    );
    let r = a
        .call(
            Method::DELETE,
            &format!("/v1/api-keys/{id}"),
            Some(KEY),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    for k in [&key, &alias] {
        assert_eq!(
            a.get("/v1/capsules", Some(k)).await.status,
            StatusCode::UNAUTHORIZED
        );
    }
    let r = a.get("/v2/sandboxes", Some(&alias)).await;
    assert_eq!(
        (r.status, r.body["code"].clone()),
        (StatusCode::UNAUTHORIZED, json!(401))
    );
}

async fn capsule_lifecycle_and_reconcile(t: &TestDb) {
    let a = api(t, ApiConfig::default()).await;
    let r = a
        .post("/v1/capsules", Some(KEY), json!({"template": "minimal"}))
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    assert_eq!(r.body["status"], "running");
    let id = r.body["id"].as_str().expect("id").to_string();
    let r = a
        .post(
            &format!("/v1/capsules/{id}/exec"),
            Some(KEY),
            json!({"cmd": "/bin/sh", "args": ["-c", "echo hi > /tmp/f; printf '\\377'"]}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.body["encoding"], "base64", "non-UTF-8 output is base64");
    assert_eq!(r.body["stdout"], "/w==");
    let r = a
        .post(&format!("/v1/capsules/{id}/pause"), Some(KEY), json!({}))
        .await;
    assert_eq!(r.body["status"], "paused", "{}", r.text);
    let r = a
        .post(
            &format!("/v1/capsules/{id}/exec"),
            Some(KEY),
            json!({"cmd": "/bin/true"}),
        )
        .await;
    assert_eq!(
        (r.status, error_code(&r)),
        (StatusCode::CONFLICT, "invalid_state")
    );
    let r = a
        .post(&format!("/v1/capsules/{id}/resume"), Some(KEY), json!({}))
        .await;
    assert_eq!(r.body["status"], "running", "{}", r.text);
    let r = a
        .post(
            &format!("/v1/capsules/{id}/exec"),
            Some(KEY),
            json!({"cmd": "/bin/cat", "args": ["/tmp/f"]}),
        )
        .await;
    assert_eq!(r.body["stdout"], "hi\n", "{}", r.text);

    // Sizes other than the pre-booted template's boot it with those sizes.
    let r = a
        .post(
            "/v1/capsules",
            Some(KEY),
            json!({"vcpus": 2, "memory_mb": 768}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    assert_eq!(
        (r.body["vcpus"].as_u64(), r.body["memory_mb"].as_u64()),
        (Some(2), Some(768))
    );
    let big = r.body["id"].as_str().expect("id").to_string();
    let r = a
        .post(
            &format!("/v1/capsules/{big}/exec"),
            Some(KEY),
            json!({"cmd": "/bin/sh", "args": ["-c", "nproc; awk '/MemTotal/ {print int($2/1024)}' /proc/meminfo"]}),
        )
        .await;
    let out = r.body["stdout"].as_str().unwrap_or("").to_string();
    let mut lines = out.lines();
    assert_eq!(lines.next(), Some("2"), "{}", r.text);
    let mem: u64 = lines.next().and_then(|l| l.parse().ok()).expect("MemTotal");
    assert!((600..=768).contains(&mem), "guest sees {mem} MiB");
    let r = a
        .call(
            Method::DELETE,
            &format!("/v1/capsules/{big}"),
            Some(KEY),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);

    // Reconciliation: a row the host does not know becomes stopped; a capsule the
    // database does not know is destroyed.
    let ghost = wrenn_core::id::CapsuleId::random();
    let team = a
        .state
        .db
        .api_key_by_hash(&wrenn_db::hash_api_key(KEY))
        .await
        .expect("key")
        .team_id;
    a.state
        .db
        .insert_capsule(
            &team,
            wrenn_db::NewCapsule {
                id: ghost.clone(),
                status: CapsuleStatus::Running,
                template: "minimal".into(),
                vcpus: 1,
                memory_mb: 512,
                timeout_sec: 0,
                metadata: Default::default(),
                envd_access_token: None,
                pause_on_timeout: true,
                disk_mb: 0,
                deadline: false,
                timeout_pause_memory: true,
            },
        )
        .await
        .expect("ghost row");
    let orphan = a
        .state
        .agent
        .create(CapsuleSpec {
            template: "minimal".into(),
            ..Default::default()
        })
        .await
        .expect("orphan capsule");
    let report = wrenn_api::lifecycle::reconcile(&a.state)
        .await
        .expect("reconcile");
    assert_eq!(
        (report.lost, report.orphans_destroyed),
        (1, 1),
        "{report:?}"
    );
    let r = a.get(&format!("/v1/capsules/{ghost}"), Some(KEY)).await;
    assert_eq!(r.body["status"], "stopped");
    assert!(
        a.state.agent.get(&orphan.id).await.is_err(),
        "orphan still on the host"
    );
    let r = a.get(&format!("/v1/capsules/{id}"), Some(KEY)).await;
    assert_eq!(r.body["status"], "running", "a known capsule is left alone");

    let r = a
        .call(
            Method::DELETE,
            &format!("/v1/capsules/{id}"),
            Some(KEY),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    let r = a.get(&format!("/v1/capsules/{id}"), Some(KEY)).await;
    assert_eq!(r.body["status"], "stopped");
    let r = a
        .get("/v1/audit-logs?resource_type=capsule", Some(KEY))
        .await;
    let actions: Vec<&str> = r.body["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter(|i| i["resource_id"] == id.as_str())
        .filter_map(|i| i["action"].as_str())
        .collect();
    assert_eq!(
        actions,
        [
            "capsule.destroy",
            "capsule.exec",
            "capsule.resume",
            "capsule.pause",
            "capsule.exec",
            "capsule.create"
        ]
    );
}

on_both_backends!(
    accounts_teams_and_keys,
    validation_and_limits,
    e2b_error_shapes_and_key_spellings,
    capsule_lifecycle_and_reconcile
);
