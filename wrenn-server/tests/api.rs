//! The control plane over the host agent (in process, or over gRPC with
//! `WRENN_TEST_AGENT=grpc`), on both database backends: accounts, teams, keys,
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
use wrenn_agent::{LocalAgent, LocalAgentOptions};
use wrenn_api::agent::{CapsuleSpec, HostAgent};
use wrenn_api::hosts::HostConn;
use wrenn_api::{router, ApiConfig, AppState};
use wrenn_core::status::CapsuleStatus;

const IMAGES: &str = "/var/lib/wrenn";
const KEY: &str = "wrn_00112233445566778899aabbccddeeff";

/// A data directory whose platform templates are the built images.
fn data_dir() -> tempfile::TempDir {
    std::fs::create_dir_all("/var/lib/wrenn-test").expect("test root");
    let dir = tempfile::tempdir_in("/var/lib/wrenn-test").expect("temp data dir");
    populate(dir.path());
    dir
}

/// Links the built images and the `minimal` template into the data directory `root`.
fn populate(root: &Path) {
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
}

struct Api {
    state: Arc<AppState>,
    app: axum::Router,
    _agent_server: Option<AbortOnDrop>,
    _dir: tempfile::TempDir,
}

/// Stops the host agent's gRPC server with the test's `Api`.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The host agent the suite runs over: the in-process `LocalAgent`, or with
/// `WRENN_TEST_AGENT=grpc` the same agent served by `wrenn_rpc` on loopback and reached
/// through a `RemoteAgent` (the seam a control plane uses for remote hosts).
async fn agent_over(local: LocalAgent) -> (Arc<dyn HostAgent>, Option<AbortOnDrop>) {
    match std::env::var("WRENN_TEST_AGENT").as_deref() {
        Ok("grpc") => {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind the agent's port");
            let addr = listener.local_addr().expect("agent address");
            let served: Arc<dyn HostAgent> = Arc::new(local);
            let server = tokio::spawn(async move {
                if let Err(e) = wrenn_rpc::serve(served, listener, std::future::pending()).await {
                    eprintln!("agent gRPC server failed: {e}");
                }
            });
            let remote = wrenn_rpc::RemoteAgent::connect_lazy(
                &format!("http://{addr}"),
                wrenn_rpc::Timeouts::default(),
            )
            .expect("agent client");
            (Arc::new(remote), Some(AbortOnDrop(server)))
        }
        Ok("local") | Err(_) => (Arc::new(local), None),
        Ok(other) => panic!("WRENN_TEST_AGENT={other}: expected local or grpc"),
    }
}

async fn api(t: &TestDb, config: ApiConfig) -> Api {
    api_in(t, config, data_dir()).await
}

async fn api_in(t: &TestDb, config: ApiConfig, dir: tempfile::TempDir) -> Api {
    let host = wrenn::Host::local(wrenn::HostOptions {
        data_dir: wrenn::DataDir::new(dir.path()),
        ..Default::default()
    })
    .await
    .expect("host");
    let (agent, agent_server) =
        agent_over(LocalAgent::new(host, LocalAgentOptions::default())).await;
    wrenn_db::ensure_bootstrap(&t.db, Some(KEY))
        .await
        .expect("bootstrap");
    let state = Arc::new(AppState::new(
        t.db.clone(),
        Default::default(),
        config,
        b"test-secret-test-secret-test-secret!",
    ));
    let conn = HostConn::connect(agent, None).await.expect("host agent");
    state.hosts.add(conn).expect("host");
    Api {
        app: router(state.clone()),
        state,
        _agent_server: agent_server,
        _dir: dir,
    }
}

/// The agent of the suite's one host.
fn agent(a: &Api) -> Arc<dyn HostAgent> {
    a.state.hosts.any().expect("the host").agent.clone()
}

/// The host's warm pool of `template` (empty if it has none).
async fn pool_of(a: &Api, template: &str) -> wrenn_api::agent::PoolStats {
    agent(a)
        .pools()
        .await
        .expect("pools")
        .into_iter()
        .find(|p| p.template == template)
        .unwrap_or_default()
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
        (Method::GET, "/volumes", StatusCode::NOT_FOUND),
        (Method::POST, "/v3/templates/x/tags", StatusCode::NOT_FOUND),
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

    // Both spellings of a key are one key (keys are made by the team's owner: an API
    // key cannot make keys).
    let r = a.get("/v2/sandboxes", Some(&e2b_key)).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let owner = admin_token(&a).await;
    let r = a
        .post("/v1/api-keys", Some(&owner), json!({"name": "k"}))
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
            Some(&owner),
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

    // Reconciliation: a row the host does not know becomes stopped; a running capsule
    // the database does not know is destroyed, a paused one quarantined.
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
                auto_resume: false,
                network: Default::default(),
                public_traffic: true,
                traffic_access_token: None,
                host_id: wrenn_core::scheduler::HostId(wrenn_db::LOCAL_HOST.into()),
            },
        )
        .await
        .expect("ghost row");
    let orphan = agent(&a)
        .create(CapsuleSpec {
            template: "minimal".into(),
            ..Default::default()
        })
        .await
        .expect("orphan capsule");
    // A paused capsule no row knows (e.g. `wrenn run --keep` in this data dir).
    let kept = agent(&a)
        .create(CapsuleSpec {
            template: "minimal".into(),
            ..Default::default()
        })
        .await
        .expect("kept capsule");
    agent(&a)
        .pause(&kept.id, wrenn_api::agent::PauseMode::Full)
        .await
        .expect("pause kept capsule");
    let report = wrenn_api::lifecycle::reconcile(&a.state)
        .await
        .expect("reconcile");
    assert_eq!(report.quarantined, [kept.id.to_string()], "{report:?}");
    let host = agent(&a).get(&kept.id).await.expect("kept on the host");
    assert_eq!(host.status, CapsuleStatus::Paused);
    agent(&a).destroy(&kept.id).await.expect("destroy kept");
    assert_eq!(
        (report.lost, report.orphans_destroyed),
        (1, 1),
        "{report:?}"
    );
    let r = a.get(&format!("/v1/capsules/{ghost}"), Some(KEY)).await;
    assert_eq!(r.body["status"], "stopped");
    assert!(
        agent(&a).get(&orphan.id).await.is_err(),
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

/// Makes a directory unwritable even for root (`chattr +i`), as a full or failing disk
/// would make it for the snapshot writer; undone when dropped.
struct Immutable(std::path::PathBuf);

impl Immutable {
    fn set(dir: &Path) -> Immutable {
        let status = std::process::Command::new("chattr")
            .arg("+i")
            .arg(dir)
            .status()
            .expect("run chattr (e2fsprogs)");
        assert!(status.success(), "chattr +i {}", dir.display());
        Immutable(dir.to_path_buf())
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        let _ = std::process::Command::new("chattr")
            .arg("-i")
            .arg(&self.0)
            .status();
    }
}

async fn exec_out(a: &Api, id: &str, script: &str) -> Resp {
    a.post(
        &format!("/v1/capsules/{id}/exec"),
        Some(KEY),
        json!({"cmd": "/bin/sh", "args": ["-c", script]}),
    )
    .await
}

async fn capsule_status(a: &Api, id: &str) -> String {
    let r = a.get(&format!("/v1/capsules/{id}"), Some(KEY)).await;
    r.body["status"].as_str().unwrap_or("<none>").to_string()
}

/// A timed-out capsule whose pause fails is kept (running, its state intact) and the
/// pause is retried later; a pause that lost a race with another one changes nothing.
async fn failed_pause_keeps_capsule(t: &TestDb) {
    let dir = data_dir();
    let snapshots = dir.path().join("snapshots");
    let a = api_in(
        t,
        ApiConfig {
            min_idle_timeout: 1,
            ..Default::default()
        },
        dir,
    )
    .await;
    let r = a
        .post(
            "/v1/capsules",
            Some(KEY),
            json!({"template": "minimal", "timeout_sec": 1}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let id = r.body["id"].as_str().expect("id").to_string();
    let r = exec_out(&a, &id, "echo kept > /tmp/state").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);

    // The reaper read the row as running; a user's pause gets there first.
    let stale = a
        .state
        .db
        .system_get_capsule(&id)
        .await
        .expect("capsule row");
    let r = a
        .post(&format!("/v1/capsules/{id}/pause"), Some(KEY), json!({}))
        .await;
    assert_eq!(r.body["status"], "paused", "{}", r.text);
    let lost = wrenn_api::service::pause_with(
        &a.state,
        &wrenn_db::Actor::System,
        None,
        &stale,
        wrenn_api::agent::PauseMode::Full,
    )
    .await
    .expect_err("a second pause of a paused capsule");
    assert_eq!(lost.code, "invalid_state", "{lost:?}");
    assert_eq!(capsule_status(&a, &id).await, "paused");
    let r = a
        .post(&format!("/v1/capsules/{id}/resume"), Some(KEY), json!({}))
        .await;
    assert_eq!(r.body["status"], "running", "{}", r.text);

    // The snapshot cannot be written: the timeout's pause fails, the capsule runs on.
    let stuck = Immutable::set(&snapshots.join(&id));
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    wrenn_api::lifecycle::reap_once(&a.state).await;
    assert_eq!(a.state.reaper_backoff.failures(&id), 1, "the pause failed");
    assert_eq!(capsule_status(&a, &id).await, "running");
    drop(stuck);
    let r = exec_out(&a, &id, "cat /tmp/state").await;
    assert_eq!(r.body["stdout"], "kept\n", "{}", r.text);
    let r = a
        .get("/v1/audit-logs?resource_type=capsule", Some(KEY))
        .await;
    let failed_pauses = r.body["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter(|i| i["resource_id"] == id.as_str() && i["action"] == "capsule.pause")
        .filter(|i| i["status"] == "failure")
        .count();
    assert_eq!(failed_pauses, 1, "{}", r.text);

    // Not retried before its backoff ends, then paused.
    wrenn_api::lifecycle::reap_once(&a.state).await;
    assert_eq!(capsule_status(&a, &id).await, "running", "backing off");
    tokio::time::sleep(std::time::Duration::from_secs(6)).await;
    wrenn_api::lifecycle::reap_once(&a.state).await;
    assert_eq!(capsule_status(&a, &id).await, "paused");
    assert_eq!(a.state.reaper_backoff.failures(&id), 0);
    let r = a
        .post(&format!("/v1/capsules/{id}/resume"), Some(KEY), json!({}))
        .await;
    assert_eq!(r.body["status"], "running", "{}", r.text);
    let r = exec_out(&a, &id, "cat /tmp/state").await;
    assert_eq!(r.body["stdout"], "kept\n", "{}", r.text);
    let r = a
        .call(
            Method::DELETE,
            &format!("/v1/capsules/{id}"),
            Some(KEY),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
}

/// What `/tmp/v` holds in a new capsule of template `name` (destroyed after).
async fn read_v_from(a: &Api, name: &str) -> String {
    let r = a
        .post("/v1/capsules", Some(KEY), json!({"template": name}))
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let cid = r.body["id"].as_str().expect("id").to_string();
    let out = exec_out(a, &cid, "cat /tmp/v").await;
    assert_eq!(out.status, StatusCode::OK, "{}", out.text);
    a.call(
        Method::DELETE,
        &format!("/v1/capsules/{cid}"),
        Some(KEY),
        None,
    )
    .await;
    format!(
        "{}{}",
        out.body["stdout"].as_str().unwrap_or(""),
        out.body["stderr"].as_str().unwrap_or("")
    )
}

/// `?overwrite=true` writes the new snapshot before the old one goes: a failed
/// overwrite leaves the old snapshot usable.
async fn snapshot_overwrite_keeps_old_until_new(t: &TestDb) {
    let a = api(t, ApiConfig::default()).await;
    let r = a
        .post("/v1/capsules", Some(KEY), json!({"template": "minimal"}))
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let id = r.body["id"].as_str().expect("id").to_string();
    let r = exec_out(&a, &id, "echo one > /tmp/v").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let r = a
        .post(
            "/v1/snapshots",
            Some(KEY),
            json!({"sandbox_id": id, "name": "keep"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    // The rows name the host that holds the capsule and the snapshot's files.
    let team = a
        .state
        .db
        .api_key_by_hash(&wrenn_db::hash_api_key(KEY))
        .await
        .expect("key")
        .team_id;
    let local = wrenn_core::scheduler::HostId(wrenn_db::LOCAL_HOST.into());
    let row = a.state.db.get_capsule(&team, &id).await.expect("row");
    assert_eq!(row.host_id, local);
    let tpl = a
        .state
        .db
        .get_template(&team, "keep")
        .await
        .expect("template");
    assert_eq!(tpl.host_id, Some(local));

    // A paused capsule cannot be snapshotted: the overwrite fails, "keep" stays.
    let r = a
        .post(&format!("/v1/capsules/{id}/pause"), Some(KEY), json!({}))
        .await;
    assert_eq!(r.body["status"], "paused", "{}", r.text);
    let r = a
        .post(
            "/v1/snapshots?overwrite=true",
            Some(KEY),
            json!({"sandbox_id": id, "name": "keep"}),
        )
        .await;
    assert_eq!(
        (r.status, error_code(&r)),
        (StatusCode::CONFLICT, "invalid_state"),
        "{}",
        r.text
    );
    assert_eq!(
        read_v_from(&a, "keep").await,
        "one\n",
        "the old snapshot survives"
    );

    // A successful overwrite replaces it.
    let r = a
        .post(&format!("/v1/capsules/{id}/resume"), Some(KEY), json!({}))
        .await;
    assert_eq!(r.body["status"], "running", "{}", r.text);
    let r = exec_out(&a, &id, "echo two > /tmp/v").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let r = a
        .post(
            "/v1/snapshots?overwrite=true",
            Some(KEY),
            json!({"sandbox_id": id, "name": "keep"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    assert_eq!(
        read_v_from(&a, "keep").await,
        "two\n",
        "the new snapshot replaced it"
    );
    let r = a.get("/v1/snapshots?type=snapshot", Some(KEY)).await;
    let names: Vec<&str> = r
        .body
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|t| t["name"].as_str())
        .collect();
    assert_eq!(names, ["keep"], "{}", r.text);
    a.call(
        Method::DELETE,
        &format!("/v1/capsules/{id}"),
        Some(KEY),
        None,
    )
    .await;
}

/// The database and the data directory are paired on the first start; a mismatch is
/// refused unless adopting is asked for.
async fn data_dir_pairing(t: &TestDb) {
    use wrenn_api::server::pair_data_dir;
    let one = tempfile::tempdir().expect("dir");
    let two = tempfile::tempdir().expect("dir");
    pair_data_dir(&t.db, one.path(), false)
        .await
        .expect("first start pairs");
    pair_data_dir(&t.db, one.path(), false)
        .await
        .expect("same pair again");
    let id = std::fs::read_to_string(one.path().join("data-dir.id")).expect("id file");
    let mode = std::fs::metadata(one.path().join("data-dir.id"))
        .expect("id file")
        .permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
        0o600
    );
    let err = pair_data_dir(&t.db, two.path(), false)
        .await
        .expect_err("the database belongs to another data dir");
    assert!(err.to_string().contains("--adopt-data-dir"), "{err}");
    // A fresh database meeting a data dir another database served.
    t.db.system_set_setting("data_dir_id", "dir-other")
        .await
        .expect("set");
    let err = pair_data_dir(&t.db, one.path(), false)
        .await
        .expect_err("mismatch");
    assert!(err.to_string().contains("another data directory"), "{err}");
    pair_data_dir(&t.db, one.path(), true)
        .await
        .expect("adopting pairs them anew");
    assert_eq!(
        t.db.system_setting("data_dir_id").await.expect("get"),
        Some(id.trim().to_string())
    );
    pair_data_dir(&t.db, one.path(), false)
        .await
        .expect("paired now");
}

/// Per-team limits: 403 when a request alone is over a limit, 429 when the team's
/// usage is; creates in flight count, so concurrent creates cannot pass a limit.
async fn team_limits(t: &TestDb) {
    let a = api(
        t,
        ApiConfig {
            team_limits: wrenn_api::quota::TeamLimits {
                capsules: 2,
                vcpus: 2,
                memory_mb: 0,
                disk_mb: 0,
                snapshots: 1,
                fork_count: 1,
            },
            ..Default::default()
        },
    )
    .await;
    let create = |body: Value| a.post("/v1/capsules", Some(KEY), body);
    let r = create(json!({"template": "minimal", "vcpus": 3})).await;
    assert_eq!(
        (r.status, error_code(&r)),
        (StatusCode::FORBIDDEN, "quota_exceeded"),
        "{}",
        r.text
    );
    let r = create(json!({"template": "minimal"})).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let first = r.body["id"].as_str().expect("id").to_string();
    // Two creates at once for the one place left: one gets it.
    let (r1, r2) = tokio::join!(
        create(json!({"template": "minimal"})),
        create(json!({"template": "minimal"}))
    );
    let mut statuses = [r1.status, r2.status];
    statuses.sort();
    assert_eq!(
        statuses,
        [StatusCode::CREATED, StatusCode::TOO_MANY_REQUESTS],
        "{} / {}",
        r1.text,
        r2.text
    );
    let loser = if r1.status == StatusCode::CREATED {
        &r2
    } else {
        &r1
    };
    assert_eq!(error_code(loser), "quota_exceeded", "{}", loser.text);
    assert!(
        loser.body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("2 capsules")),
        "{}",
        loser.text
    );
    let second = [&r1, &r2]
        .iter()
        .find(|r| r.status == StatusCode::CREATED)
        .and_then(|r| r.body["id"].as_str())
        .expect("second id")
        .to_string();
    // The E2B API answers in its own error shape, with the same status.
    let r = a
        .post("/sandboxes", Some(KEY), json!({"templateID": "minimal"}))
        .await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS, "{}", r.text);
    assert_eq!(r.body["code"], 429, "{}", r.text);

    let r = a
        .post(
            &format!("/sandboxes/{first}/fork"),
            Some(KEY),
            json!({"count": 2}),
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.text);
    assert_eq!(r.body["code"], 403, "{}", r.text);
    let r = a
        .post(
            &format!("/sandboxes/{first}/fork"),
            Some(KEY),
            json!({"count": 1}),
        )
        .await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS, "{}", r.text);

    // Snapshots: one allowed; replacing it is not another.
    let snap = |name: &str, overwrite: bool| {
        let path = if overwrite {
            "/v1/snapshots?overwrite=true"
        } else {
            "/v1/snapshots"
        };
        a.post(path, Some(KEY), json!({"sandbox_id": first, "name": name}))
    };
    assert_eq!(snap("lim-one", false).await.status, StatusCode::CREATED);
    let r = snap("lim-two", false).await;
    assert_eq!(
        (r.status, error_code(&r)),
        (StatusCode::TOO_MANY_REQUESTS, "quota_exceeded"),
        "{}",
        r.text
    );
    assert_eq!(snap("lim-one", true).await.status, StatusCode::CREATED);

    // A paused capsule frees its vCPUs until it resumes.
    let r = a
        .post(
            &format!("/v1/capsules/{second}/pause"),
            Some(KEY),
            json!({}),
        )
        .await;
    assert_eq!(r.body["status"], "paused", "{}", r.text);
    let r = a
        .post(
            &format!("/v1/capsules/{second}/resume"),
            Some(KEY),
            json!({}),
        )
        .await;
    assert_eq!(r.body["status"], "running", "{}", r.text);
    for id in [&first, &second] {
        a.call(
            Method::DELETE,
            &format!("/v1/capsules/{id}"),
            Some(KEY),
            None,
        )
        .await;
    }
    a.call(Method::DELETE, "/v1/snapshots/lim-one", Some(KEY), None)
        .await;
    let r = create(json!({"template": "minimal"})).await;
    assert_eq!(r.status, StatusCode::CREATED, "freed again: {}", r.text);
    let id = r.body["id"].as_str().expect("id").to_string();
    a.call(
        Method::DELETE,
        &format!("/v1/capsules/{id}"),
        Some(KEY),
        None,
    )
    .await;
}

/// Warm pools through the admin API: platform admins only; creates are served from the
/// pool; pool entries are nobody's capsules; /metrics reports the pool.
async fn pool_admin(t: &TestDb) {
    let a = api(t, ApiConfig::default()).await;
    let admin = admin_token(&a).await;
    let (user, _) = a.user("pool-user@example.com").await;
    let set = |who: &str, template: &str, size: Value| {
        let (who, path) = (who.to_string(), format!("/v1/admin/pools/{template}"));
        let a = &a;
        async move {
            a.call(
                Method::PUT,
                &path,
                Some(&who),
                Some(json!({ "size": size })),
            )
            .await
        }
    };
    let r = set(&user, "minimal", json!(1)).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.text);
    let r = set(KEY, "minimal", json!(1)).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{}", r.text);
    let r = set(&admin, "minimal", json!(65)).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text);
    let r = set(&admin, "no-such-template", json!(1)).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.text);
    let r = set(&admin, "minimal", json!(1)).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while pool_of(&a, "minimal").await.ready < 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "{:?}",
            pool_of(&a, "minimal").await
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let r = a.get("/v1/capsules", Some(KEY)).await;
    assert_eq!(
        r.body.as_array().map(Vec::len),
        Some(0),
        "pool entries are nobody's"
    );
    let r = a
        .post("/v1/capsules", Some(KEY), json!({"template": "minimal"}))
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let id = r.body["id"].as_str().expect("id").to_string();
    let out = exec_out(&a, &id, "echo from-pool").await;
    assert_eq!(out.body["stdout"], "from-pool\n", "{}", out.text);
    let r = a.get("/v1/admin/pools", Some(&admin)).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let minimal = r
        .body
        .as_array()
        .and_then(|l| l.iter().find(|p| p["template"] == "minimal"))
        .cloned()
        .unwrap_or_default();
    assert_eq!(
        (minimal["target"].as_u64(), minimal["hits"].as_u64()),
        (Some(1), Some(1)),
        "{minimal}"
    );
    let r = a.get("/metrics", None).await;
    assert!(
        r.text
            .contains(r#"wrenn_pool{template="minimal",what="hits"} 1"#),
        "{}",
        r.text
    );
    let r = set(&admin, "minimal", json!(0)).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(pool_of(&a, "minimal").await.ready, 0);

    // A team snapshot's pool (by its host name) is drained when the snapshot goes.
    let r = a
        .post(
            "/v1/snapshots",
            Some(KEY),
            json!({"sandbox_id": id, "name": "pooled-snap"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let host_name = a
        .state
        .db
        .get_template(&team_of_key(&a).await, "pooled-snap")
        .await
        .expect("snapshot row")
        .metadata
        .get(wrenn_api::service::HOST_TEMPLATE_KEY)
        .and_then(Value::as_str)
        .expect("host template name")
        .to_string();
    let r = set(&admin, &host_name, json!(1)).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    while pool_of(&a, &host_name).await.ready < 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "{:?}",
            pool_of(&a, &host_name).await
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let r = a
        .call(Method::DELETE, "/v1/snapshots/pooled-snap", Some(KEY), None)
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text);
    let p = pool_of(&a, &host_name).await;
    assert_eq!((p.target, p.ready), (0, 0), "{p:?}");

    // A drained host keeps its capsules and refuses new ones itself (here it is the
    // only host, so nothing else could take them): forks too. The drain ends.
    // Recorded in the hosts table as `wrenn serve` does at start.
    let conn = a.state.hosts.any().expect("the host");
    wrenn_api::lifecycle::record_online(&a.state.db, &conn)
        .await
        .expect("host row");
    let drain = format!("/v1/hosts/{}/drain", conn.id);
    let r = a.post(&drain, Some(&admin), json!({})).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let r = a
        .post("/v1/capsules", Some(KEY), json!({"template": "minimal"}))
        .await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.text);
    assert!(r.text.contains("draining"), "{}", r.text);
    let out = exec_out(&a, &id, "echo still-here").await;
    assert_eq!(out.body["stdout"], "still-here\n", "{}", out.text);
    let r = a.call(Method::DELETE, &drain, Some(&admin), None).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let r = a
        .post("/v1/capsules", Some(KEY), json!({"template": "minimal"}))
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let second = r.body["id"].as_str().expect("id").to_string();
    for c in [&id, &second] {
        a.call(
            Method::DELETE,
            &format!("/v1/capsules/{c}"),
            Some(KEY),
            None,
        )
        .await;
    }
}

async fn team_of_key(a: &Api) -> String {
    a.state
        .db
        .api_key_by_hash(&wrenn_db::hash_api_key(KEY))
        .await
        .expect("key")
        .team_id
}

on_both_backends!(
    accounts_teams_and_keys,
    validation_and_limits,
    e2b_error_shapes_and_key_spellings,
    capsule_lifecycle_and_reconcile,
    failed_pause_keeps_capsule,
    snapshot_overwrite_keeps_old_until_new,
    data_dir_pairing,
    team_limits,
    pool_admin
);

/// The bootstrap admin's password in these tests (as `--bootstrap-admin-password`).
const ADMIN_PASSWORD: &str = "bootstrap admin pw";

/// A user token of the bootstrap admin, the owner of [`KEY`]'s team.
async fn admin_token(a: &Api) -> String {
    wrenn_db::ensure_bootstrap_admin_password(&a.state.db, ADMIN_PASSWORD)
        .await
        .expect("admin password");
    let r = a
        .post(
            "/v1/auth/login",
            None,
            json!({"email": wrenn_db::BOOTSTRAP_ADMIN_EMAIL, "password": ADMIN_PASSWORD}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    r.body["token"].as_str().expect("token").to_string()
}

/// Who may manage keys and members, what a user token is worth once its membership
/// changes, the owner's rules, sign-up and invitations, and the throttling of sign-in.
/// None of these boots a capsule.
mod auth_rules {
    use super::*;
    use axum::extract::ConnectInfo;
    use std::net::{IpAddr, SocketAddr};
    use std::time::{Duration, Instant};

    on_both_backends!(
        api_keys_need_an_owner_or_admin,
        memberships_are_checked_on_every_request,
        owner_rules,
        signup_closed_and_invitations,
        login_and_signup_are_throttled,
        forwarded_for_counts_only_from_trusted_proxies,
    );

    /// Sign-in throttling off, for the tests that sign many people in.
    fn unthrottled() -> ApiConfig {
        ApiConfig {
            auth_ip_rate: 0,
            auth_account_rate: 0,
            ..Default::default()
        }
    }

    /// A `/v1` error: this status and code, a message, as JSON.
    #[track_caller]
    fn assert_error(r: &Resp, status: StatusCode, code: &str) {
        assert_eq!((r.status, error_code(r)), (status, code), "{}", r.text);
        let msg = r.body["error"]["message"].as_str().unwrap_or("");
        assert!(!msg.is_empty(), "{}", r.text);
        let ct = r.headers.get(header::CONTENT_TYPE).expect("content type");
        assert!(ct.to_str().unwrap_or("").starts_with("application/json"));
    }

    async fn home_team(a: &Api, token: &str) -> String {
        let r = a.get("/v1/teams", Some(token)).await;
        r.body[0]["id"].as_str().expect("team id").to_string()
    }

    /// `token`'s user acting for `team` (a new token from switch-team).
    async fn switch(a: &Api, token: &str, team: &str) -> String {
        let r = a
            .post(
                "/v1/auth/switch-team",
                Some(token),
                json!({"team_id": team}),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        r.body["token"].as_str().expect("token").to_string()
    }

    /// Signs `email` up, adds them to `team` (by its owner `owner`) with `role`, and
    /// returns their token for `team` and their id.
    async fn join(a: &Api, owner: &str, team: &str, email: &str, role: &str) -> (String, String) {
        let (own, id) = a.user(email).await;
        let r = a
            .post(
                &format!("/v1/teams/{team}/members"),
                Some(owner),
                json!({"email": email, "role": role}),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
        (switch(a, &own, team).await, id)
    }

    async fn patch_role(a: &Api, who: &str, team: &str, uid: &str, role: &str) -> Resp {
        a.call(
            Method::PATCH,
            &format!("/v1/teams/{team}/members/{uid}"),
            Some(who),
            Some(json!({"role": role})),
        )
        .await
    }

    async fn remove(a: &Api, who: &str, team: &str, uid: &str) -> Resp {
        a.call(
            Method::DELETE,
            &format!("/v1/teams/{team}/members/{uid}"),
            Some(who),
            None,
        )
        .await
    }

    async fn members(a: &Api, who: &str, team: &str) -> Vec<(String, String)> {
        let r = a.get(&format!("/v1/teams/{team}/members"), Some(who)).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        r.body
            .as_array()
            .expect("members")
            .iter()
            .map(|m| {
                (
                    m["user_id"].as_str().unwrap_or("").to_string(),
                    m["role"].as_str().unwrap_or("").to_string(),
                )
            })
            .collect()
    }

    /// Only the owner and admins, with their user token, create and delete keys; API
    /// keys (member rights) never do; another team's key is 404, not 403.
    async fn api_keys_need_an_owner_or_admin(t: &TestDb) {
        let a = api(t, unthrottled()).await;
        let (alice, _) = a.user("alice@example.com").await;
        let home = home_team(&a, &alice).await;
        let (bob, bob_id) = join(&a, &alice, &home, "bob@example.com", "member").await;

        let r = a
            .post("/v1/api-keys", Some(&bob), json!({"name": "b"}))
            .await;
        assert_error(&r, StatusCode::FORBIDDEN, "forbidden");
        assert!(r.text.contains("owner or admins"), "{}", r.text);
        let r = a
            .post("/v1/api-keys", Some(&alice), json!({"name": "ci"}))
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
        let (key, key_id) = (
            r.body["key"].as_str().expect("key").to_string(),
            r.body["id"].as_str().expect("id").to_string(),
        );
        let del = |who: String, id: String| {
            let a = &a;
            async move {
                a.call(
                    Method::DELETE,
                    &format!("/v1/api-keys/{id}"),
                    Some(&who),
                    None,
                )
                .await
            }
        };
        assert_error(
            &del(bob.clone(), key_id.clone()).await,
            StatusCode::FORBIDDEN,
            "forbidden",
        );

        // An API key acts with member rights: it lists keys, but neither makes nor
        // deletes any (not even itself), in either spelling.
        for k in [key.clone(), format!("e2b_{}", &key[4..])] {
            let r = a.post("/v1/api-keys", Some(&k), json!({"name": "x"})).await;
            assert_error(&r, StatusCode::FORBIDDEN, "forbidden");
            assert!(r.text.contains("API keys cannot"), "{}", r.text);
            assert_error(
                &del(k.clone(), key_id.clone()).await,
                StatusCode::FORBIDDEN,
                "forbidden",
            );
        }
        assert_eq!(
            a.get("/v1/api-keys", Some(&key)).await.status,
            StatusCode::OK
        );
        assert_eq!(
            a.get("/v1/api-keys", Some(&bob)).await.status,
            StatusCode::OK
        );
        // The bootstrap key too (it was the only way to make keys for its team).
        let r = a.post("/v1/api-keys", Some(KEY), json!({})).await;
        assert_error(&r, StatusCode::FORBIDDEN, "forbidden");

        // Another team's key is not found, whoever asks.
        let (carol, _) = a.user("carol@example.com").await;
        let r = a
            .post("/v1/api-keys", Some(&carol), json!({"name": "c"}))
            .await;
        let carol_key = r.body["key"].as_str().expect("key").to_string();
        for who in [carol.clone(), carol_key] {
            assert_error(
                &del(who, key_id.clone()).await,
                StatusCode::NOT_FOUND,
                "not_found",
            );
        }
        assert_eq!(
            a.get("/v1/capsules", Some(&key)).await.status,
            StatusCode::OK
        );

        // Made an admin, bob may (with the same token: the role is read afresh).
        let r = patch_role(&a, &alice, &home, &bob_id, "admin").await;
        assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text);
        let r = a
            .post("/v1/api-keys", Some(&bob), json!({"name": "b"}))
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
        assert_eq!(r.body["created_by"], bob_id.as_str());
        let r = del(bob.clone(), key_id.clone()).await;
        assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text);
        assert_eq!(
            a.get("/v1/capsules", Some(&key)).await.status,
            StatusCode::UNAUTHORIZED
        );
    }

    /// A user token is only as good as the membership it names, now: removal, leaving,
    /// a role change and a deleted team take effect on the next request; a change made
    /// behind this server's back within [`wrenn_api::auth::MEMBER_CACHE_TTL`].
    async fn memberships_are_checked_on_every_request(t: &TestDb) {
        let a = api(t, unthrottled()).await;
        let (alice, _) = a.user("alice@example.com").await;
        let home = home_team(&a, &alice).await;
        let (bob, bob_id) = join(&a, &alice, &home, "bob@example.com", "admin").await;
        assert_eq!(
            a.get("/v1/capsules", Some(&bob)).await.status,
            StatusCode::OK
        );
        let r = a
            .post("/v1/api-keys", Some(&bob), json!({"name": "b"}))
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);

        // Demoted: the token still says admin; the server goes by the database.
        let r = patch_role(&a, &alice, &home, &bob_id, "member").await;
        assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text);
        let r = a
            .post("/v1/api-keys", Some(&bob), json!({"name": "b"}))
            .await;
        assert_error(&r, StatusCode::FORBIDDEN, "forbidden");
        assert_eq!(a.get("/v1/me", Some(&bob)).await.body["role"], "member");

        // Removed: the token is dead at once, for everything.
        let r = remove(&a, &alice, &home, &bob_id).await;
        assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text);
        for (m, path) in [
            (Method::GET, "/v1/capsules"),
            (Method::POST, "/v1/api-keys"),
            (Method::GET, "/v1/api-keys"),
            (Method::GET, "/v1/me"),
            (Method::GET, "/v1/audit-logs"),
            (Method::GET, "/v2/sandboxes"),
        ] {
            let body = (m == Method::POST).then(|| json!({"name": "x"}));
            let r = a.call(m.clone(), path, Some(&bob), body).await;
            assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{m} {path}: {}", r.text);
        }
        let r = a.get(&format!("/v1/teams/{home}"), Some(&bob)).await;
        assert_error(&r, StatusCode::UNAUTHORIZED, "unauthorized");
        // Bob's token for his own team is unaffected; he can log in again there.
        let r = a
            .post(
                "/v1/auth/login",
                None,
                json!({"email": "bob@example.com", "password": "long enough pw"}),
            )
            .await;
        let bob_own = r.body["token"].as_str().expect("token").to_string();
        assert_eq!(
            a.get("/v1/capsules", Some(&bob_own)).await.status,
            StatusCode::OK
        );
        assert_error(
            &a.post(
                "/v1/auth/switch-team",
                Some(&bob_own),
                json!({"team_id": home}),
            )
            .await,
            StatusCode::NOT_FOUND,
            "not_found",
        );

        // Leaving.
        let (carol, _) = join(&a, &alice, &home, "carol@example.com", "member").await;
        let r = a
            .post(&format!("/v1/teams/{home}/leave"), Some(&carol), json!({}))
            .await;
        assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text);
        assert_eq!(
            a.get("/v1/capsules", Some(&carol)).await.status,
            StatusCode::UNAUTHORIZED
        );

        // A deleted team.
        let r = a
            .post("/v1/teams", Some(&alice), json!({"name": "Side"}))
            .await;
        let side = r.body["id"].as_str().expect("id").to_string();
        let alice_side = switch(&a, &alice, &side).await;
        let r = a
            .post("/v1/api-keys", Some(&alice_side), json!({"name": "side"}))
            .await;
        let side_key = r.body["key"].as_str().expect("key").to_string();
        assert_eq!(
            a.get("/v1/capsules", Some(&alice_side)).await.status,
            StatusCode::OK
        );
        assert_eq!(
            a.get("/v1/capsules", Some(&side_key)).await.status,
            StatusCode::OK
        );
        let r = a
            .call(
                Method::DELETE,
                &format!("/v1/teams/{side}"),
                Some(&alice),
                None,
            )
            .await;
        assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text);
        for k in [&alice_side, &side_key] {
            assert_eq!(
                a.get("/v1/capsules", Some(k)).await.status,
                StatusCode::UNAUTHORIZED
            );
        }
        assert_eq!(
            a.get("/v1/capsules", Some(&alice)).await.status,
            StatusCode::OK
        );

        // Removed by another server on the same database: seen within the cache's TTL.
        let (dave, dave_id) = join(&a, &alice, &home, "dave@example.com", "member").await;
        assert_eq!(
            a.get("/v1/capsules", Some(&dave)).await.status,
            StatusCode::OK
        );
        t.db.remove_member(&home, &dave_id).await.expect("removed");
        tokio::time::sleep(wrenn_api::auth::MEMBER_CACHE_TTL + Duration::from_millis(300)).await;
        assert_eq!(
            a.get("/v1/capsules", Some(&dave)).await.status,
            StatusCode::UNAUTHORIZED
        );
    }

    /// One owner, always: admins manage members, only the owner manages admins and
    /// hands ownership over; the owner can be neither removed nor demoted, and leaves
    /// only after handing ownership over.
    async fn owner_rules(t: &TestDb) {
        let a = api(t, unthrottled()).await;
        let (alice, alice_id) = a.user("alice@example.com").await;
        let home = home_team(&a, &alice).await;
        let (bob, bob_id) = join(&a, &alice, &home, "bob@example.com", "admin").await;
        let (_erin, erin_id) = join(&a, &alice, &home, "erin@example.com", "admin").await;
        let (carol, carol_id) = join(&a, &alice, &home, "carol@example.com", "member").await;
        a.user("frank@example.com").await;

        // What an admin may not do.
        for (r, what) in [
            (
                patch_role(&a, &bob, &home, &alice_id, "member").await,
                "demote the owner",
            ),
            (
                patch_role(&a, &bob, &home, &alice_id, "admin").await,
                "demote the owner",
            ),
            (remove(&a, &bob, &home, &alice_id).await, "remove the owner"),
            (
                patch_role(&a, &bob, &home, &bob_id, "owner").await,
                "take ownership",
            ),
            (
                patch_role(&a, &bob, &home, &carol_id, "admin").await,
                "make an admin",
            ),
            (
                patch_role(&a, &bob, &home, &erin_id, "member").await,
                "demote an admin",
            ),
            (remove(&a, &bob, &home, &erin_id).await, "remove an admin"),
            (
                a.post(
                    &format!("/v1/teams/{home}/members"),
                    Some(&bob),
                    json!({"email": "frank@example.com", "role": "admin"}),
                )
                .await,
                "add an admin",
            ),
            (
                remove(&a, &carol, &home, &bob_id).await,
                "(a member) remove an admin",
            ),
        ] {
            assert_eq!(r.status, StatusCode::FORBIDDEN, "{what}: {}", r.text);
            assert_error(&r, StatusCode::FORBIDDEN, "forbidden");
        }
        // The owner cannot demote themselves or leave: ownership is handed over first.
        let r = patch_role(&a, &alice, &home, &alice_id, "admin").await;
        assert_error(&r, StatusCode::FORBIDDEN, "forbidden");
        for r in [
            a.post(&format!("/v1/teams/{home}/leave"), Some(&alice), json!({}))
                .await,
            remove(&a, &alice, &home, &alice_id).await,
        ] {
            assert_error(&r, StatusCode::CONFLICT, "owner_cannot_leave");
        }
        let roles = members(&a, &alice, &home).await;
        assert!(
            roles.contains(&(alice_id.clone(), "owner".into())),
            "{roles:?}"
        );
        assert_eq!(roles.iter().filter(|(_, r)| r == "owner").count(), 1);

        // What an admin may do: manage members.
        let r = remove(&a, &bob, &home, &carol_id).await;
        assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text);
        let r = a
            .post(
                &format!("/v1/teams/{home}/members"),
                Some(&bob),
                json!({"email": "frank@example.com"}),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);

        // The owner hands ownership to bob: one owner after it, alice an admin.
        let r = patch_role(&a, &alice, &home, &bob_id, "owner").await;
        assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text);
        let roles = members(&a, &bob, &home).await;
        let owners: Vec<_> = roles.iter().filter(|(_, r)| r == "owner").collect();
        assert_eq!(
            owners,
            [&(bob_id.clone(), "owner".to_string())],
            "{roles:?}"
        );
        assert!(
            roles.contains(&(alice_id.clone(), "admin".into())),
            "{roles:?}"
        );
        // Alice (an admin now, same token) cannot undo it nor remove bob; she can leave.
        assert_error(
            &patch_role(&a, &alice, &home, &alice_id, "owner").await,
            StatusCode::FORBIDDEN,
            "forbidden",
        );
        assert_error(
            &remove(&a, &alice, &home, &bob_id).await,
            StatusCode::FORBIDDEN,
            "forbidden",
        );
        let r = a
            .post(&format!("/v1/teams/{home}/leave"), Some(&alice), json!({}))
            .await;
        assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text);
        let r = a
            .post(&format!("/v1/teams/{home}/leave"), Some(&bob), json!({}))
            .await;
        assert_error(&r, StatusCode::CONFLICT, "owner_cannot_leave");
        // Only the owner deletes the team.
        let (erin_tok, _) = {
            let r = a
                .post(
                    "/v1/auth/login",
                    None,
                    json!({"email": "erin@example.com", "password": "long enough pw"}),
                )
                .await;
            let own = r.body["token"].as_str().expect("token").to_string();
            (switch(&a, &own, &home).await, ())
        };
        let r = a
            .call(
                Method::DELETE,
                &format!("/v1/teams/{home}"),
                Some(&erin_tok),
                None,
            )
            .await;
        assert_error(&r, StatusCode::FORBIDDEN, "forbidden");
        let r = a
            .call(
                Method::DELETE,
                &format!("/v1/teams/{home}"),
                Some(&bob),
                None,
            )
            .await;
        assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text);
    }

    /// Closed sign-up takes invitations: an owner or admin invites one e-mail, which
    /// signs up once and joins the team.
    async fn signup_closed_and_invitations(t: &TestDb) {
        let a = api(
            t,
            ApiConfig {
                open_signup: false,
                ..unthrottled()
            },
        )
        .await;
        let signup = |email: &str, invitation: Option<&str>| {
            let mut body = json!({"email": email, "password": "long enough pw", "name": "N"});
            if let Some(i) = invitation {
                body["invitation"] = json!(i);
            }
            let a = &a;
            async move { a.post("/v1/auth/signup", None, body).await }
        };
        let r = signup("new@example.com", None).await;
        assert_error(&r, StatusCode::FORBIDDEN, "forbidden");
        assert!(r.text.contains("invitation"), "{}", r.text);

        // The bootstrap admin owns the first team and invites.
        let owner = admin_token(&a).await;
        let team = a.get("/v1/me", Some(&owner)).await.body["team_id"]
            .as_str()
            .expect("team")
            .to_string();
        let invite = |who: String, email: &str, role: &str| {
            let a = &a;
            let body = json!({"email": email, "role": role});
            let path = format!("/v1/teams/{team}/invitations");
            async move { a.post(&path, Some(&who), body).await }
        };
        let r = invite(owner.clone(), "new@example.com", "member").await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
        let token = r.body["token"].as_str().expect("token").to_string();
        let inv_id = r.body["id"].as_str().expect("id").to_string();
        assert!(
            token.starts_with(wrenn_db::INVITATION_TOKEN_PREFIX),
            "{token}"
        );
        assert_eq!(r.body["role"], "member");
        let r = a
            .get(&format!("/v1/teams/{team}/invitations"), Some(&owner))
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        assert_eq!(r.body[0]["id"], inv_id.as_str());
        assert!(r.body[0].get("token").is_none(), "the token is shown once");
        // Not with an API key, not for an existing account, never an owner.
        let r = a
            .post(
                &format!("/v1/teams/{team}/invitations"),
                Some(KEY),
                json!({"email": "x@example.com"}),
            )
            .await;
        assert_error(&r, StatusCode::UNAUTHORIZED, "unauthorized");
        assert_error(
            &invite(owner.clone(), wrenn_db::BOOTSTRAP_ADMIN_EMAIL, "member").await,
            StatusCode::CONFLICT,
            "email_taken",
        );
        assert_error(
            &invite(owner.clone(), "x@example.com", "owner").await,
            StatusCode::BAD_REQUEST,
            "invalid_request",
        );

        // The wrong address, a made-up token: refused, nothing created.
        assert_error(
            &signup("other@example.com", Some(&token)).await,
            StatusCode::FORBIDDEN,
            "invalid_invitation",
        );
        assert_error(
            &signup(
                "new@example.com",
                Some("wrninv_00000000000000000000000000000000"),
            )
            .await,
            StatusCode::FORBIDDEN,
            "invalid_invitation",
        );
        assert!(t.db.get_user_by_email("other@example.com").await.is_err());

        // The invited address signs up, once, and lands in the team as a member.
        let r = signup("New@Example.com", Some(&token)).await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
        assert_error(
            &signup("new@example.com", Some(&token)).await,
            StatusCode::FORBIDDEN,
            "invalid_invitation",
        );
        let r = a
            .post(
                "/v1/auth/login",
                None,
                json!({"email": "new@example.com", "password": "long enough pw"}),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        assert_eq!(r.body["team_id"], team.as_str());
        let newbie = r.body["token"].as_str().expect("token").to_string();
        assert_eq!(a.get("/v1/me", Some(&newbie)).await.body["role"], "member");
        assert_eq!(
            a.get("/v1/teams", Some(&newbie))
                .await
                .body
                .as_array()
                .map(Vec::len),
            Some(1)
        );
        // A member does not invite; the owner deletes an invitation, which then fails.
        assert_error(
            &invite(newbie.clone(), "y@example.com", "member").await,
            StatusCode::FORBIDDEN,
            "forbidden",
        );
        let r = invite(owner.clone(), "late@example.com", "admin").await;
        let (late_token, late_id) = (
            r.body["token"].as_str().expect("token").to_string(),
            r.body["id"].as_str().expect("id").to_string(),
        );
        let r = a
            .call(
                Method::DELETE,
                &format!("/v1/teams/{team}/invitations/{late_id}"),
                Some(&owner),
                None,
            )
            .await;
        assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text);
        assert_error(
            &signup("late@example.com", Some(&late_token)).await,
            StatusCode::FORBIDDEN,
            "invalid_invitation",
        );
        let r = a
            .get(&format!("/v1/teams/{team}/invitations"), Some(&owner))
            .await;
        assert_eq!(r.body, json!([]));
    }

    /// A request as if from `ip` (the peer address `wrenn serve` records).
    async fn call_from(a: &Api, ip: &str, path: &str, body: Value) -> Resp {
        call_from_with(a, ip, &[], path, body).await
    }

    /// The same with extra headers.
    async fn call_from_with(
        a: &Api,
        ip: &str,
        headers: &[(&str, &str)],
        path: &str,
        body: Value,
    ) -> Resp {
        let mut req = Request::builder()
            .method(Method::POST)
            .uri(path)
            .header(header::CONTENT_TYPE, "application/json");
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let mut req = req.body(Body::from(body.to_string())).expect("request");
        let ip: IpAddr = ip.parse().expect("ip");
        req.extensions_mut()
            .insert(ConnectInfo(SocketAddr::new(ip, 40000)));
        let resp = a.app.clone().oneshot(req).await.expect("infallible");
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = resp.into_body().collect().await.expect("body").to_bytes();
        Resp {
            status,
            headers,
            body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
            text: String::from_utf8_lossy(&bytes).into_owned(),
        }
    }

    /// Behind a trusted reverse proxy, the address it puts last in `X-Forwarded-For` is
    /// the client; anyone else's `X-Forwarded-For` is ignored.
    async fn forwarded_for_counts_only_from_trusted_proxies(t: &TestDb) {
        let a = api(
            t,
            ApiConfig {
                auth_ip_rate: 2,
                auth_account_rate: 0,
                trusted_proxies: vec!["10.9.9.9".parse().expect("ip")],
                ..Default::default()
            },
        )
        .await;
        let login = |peer: &'static str, xff: String| {
            let a = &a;
            async move {
                call_from_with(
                    a,
                    peer,
                    &[("x-forwarded-for", &xff)],
                    "/v1/auth/login",
                    login_body("nobody@example.com", "wrong"),
                )
                .await
            }
        };
        for client in ["192.0.2.1", "192.0.2.2"] {
            for _ in 0..2 {
                let r = login("10.9.9.9", format!("198.51.100.7, {client}")).await;
                assert_error(&r, StatusCode::UNAUTHORIZED, "wrong_password");
            }
            assert_throttled(&login("10.9.9.9", format!("198.51.100.7, {client}")).await);
        }
        for i in 0..2 {
            let r = login("10.8.8.8", format!("192.0.2.{}", 10 + i)).await;
            assert_error(&r, StatusCode::UNAUTHORIZED, "wrong_password");
        }
        assert_throttled(&login("10.8.8.8", "192.0.2.99".into()).await);
    }

    fn login_body(email: &str, password: &str) -> Value {
        json!({"email": email, "password": password})
    }

    #[track_caller]
    fn assert_throttled(r: &Resp) {
        assert_error(r, StatusCode::TOO_MANY_REQUESTS, "rate_limited");
        let after: u64 = r.headers[header::RETRY_AFTER]
            .to_str()
            .expect("retry-after")
            .parse()
            .expect("seconds");
        assert!((1..=60).contains(&after), "Retry-After {after}");
    }

    /// Login and sign-up are throttled per client address and per account before any
    /// password is hashed; successful logins do not count against the account.
    async fn login_and_signup_are_throttled(t: &TestDb) {
        let a = api(
            t,
            ApiConfig {
                auth_ip_rate: 5,
                auth_account_rate: 3,
                ..Default::default()
            },
        )
        .await;
        t.db.create_user("victim@example.com", "V", Some("right password"), false)
            .await
            .expect("victim");
        let hashed = || a.state.auth_throttle.stats().admitted;

        // Per account: three failures, then refused without hashing, from anywhere,
        // even with the right password.
        for _ in 0..3 {
            let r = call_from(
                &a,
                "10.0.0.1",
                "/v1/auth/login",
                login_body("victim@example.com", "wrong"),
            )
            .await;
            assert_error(&r, StatusCode::UNAUTHORIZED, "wrong_password");
        }
        let before = hashed();
        let r = call_from(
            &a,
            "10.0.0.1",
            "/v1/auth/login",
            login_body("Victim@example.com", "wrong"),
        )
        .await;
        assert_throttled(&r);
        assert!(r.text.contains("account"), "{}", r.text);
        let r = call_from(
            &a,
            "10.0.0.2",
            "/v1/auth/login",
            login_body("victim@example.com", "right password"),
        )
        .await;
        assert_throttled(&r);
        assert_eq!(hashed(), before, "a refused attempt hashed a password");

        // Successful logins do not count against the account.
        t.db.create_user("regular@example.com", "R", Some("right password"), false)
            .await
            .expect("user");
        t.db.create_team(
            "R",
            &t.db
                .get_user_by_email("regular@example.com")
                .await
                .expect("u")
                .id,
        )
        .await
        .expect("team");
        for i in 0..5 {
            let r = call_from(
                &a,
                &format!("10.0.1.{i}"),
                "/v1/auth/login",
                login_body("regular@example.com", "right password"),
            )
            .await;
            assert_eq!(r.status, StatusCode::OK, "login {i}: {}", r.text);
        }

        // Per address: five attempts a minute, whatever the accounts; sign-up shares it.
        for i in 0..5 {
            let r = call_from(
                &a,
                "10.0.2.1",
                "/v1/auth/login",
                login_body(&format!("nobody{i}@example.com"), "wrong"),
            )
            .await;
            assert_error(&r, StatusCode::UNAUTHORIZED, "wrong_password");
        }
        let before = hashed();
        let r = call_from(
            &a,
            "10.0.2.1",
            "/v1/auth/login",
            login_body("nobody9@example.com", "wrong"),
        )
        .await;
        assert_throttled(&r);
        assert!(r.text.contains("address"), "{}", r.text);
        let r = call_from(
            &a,
            "10.0.2.1",
            "/v1/auth/signup",
            json!({"email": "fresh@example.com", "password": "long enough pw"}),
        )
        .await;
        assert_throttled(&r);
        assert_eq!(hashed(), before);
        assert!(t.db.get_user_by_email("fresh@example.com").await.is_err());
        // Another address is not affected; an IPv6 /64 is one address.
        let r = call_from(
            &a,
            "10.0.2.2",
            "/v1/auth/signup",
            json!({"email": "fresh@example.com", "password": "long enough pw"}),
        )
        .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
        for i in 0..5 {
            let r = call_from(
                &a,
                &format!("2001:db8::{:x}", i + 1),
                "/v1/auth/login",
                login_body(&format!("v6-{i}@example.com"), "wrong"),
            )
            .await;
            assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{}", r.text);
        }
        let r = call_from(
            &a,
            "2001:db8::ffff",
            "/v1/auth/login",
            login_body("v6-x@example.com", "wrong"),
        )
        .await;
        assert_throttled(&r);
        let r = call_from(
            &a,
            "2001:db8:0:1::1",
            "/v1/auth/login",
            login_body("v6-y@example.com", "wrong"),
        )
        .await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{}", r.text);

        // Without a peer address (in-process callers) everyone shares one bucket.
        for i in 0..5 {
            let r = a
                .post(
                    "/v1/auth/login",
                    None,
                    login_body(&format!("anon{i}@example.com"), "wrong"),
                )
                .await;
            assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{}", r.text);
        }
        assert_throttled(
            &a.post(
                "/v1/auth/login",
                None,
                login_body("anon9@example.com", "wrong"),
            )
            .await,
        );
    }

    /// Resident and peak resident memory of this process, in KiB.
    fn vm_kib(field: &str) -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").expect("status");
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("no {field} in /proc/self/status"))
    }

    fn median(mut v: Vec<Duration>) -> Duration {
        v.sort();
        v[v.len() / 2]
    }

    /// `n` health requests, each timed, while `busy` says the server is loaded.
    async fn health_latencies(
        a: &Api,
        n: usize,
        busy: impl Fn() -> bool,
    ) -> (Vec<Duration>, usize) {
        let mut times = Vec::new();
        let mut loaded = 0;
        for _ in 0..n {
            let start = Instant::now();
            let r = a.get("/health", None).await;
            times.push(start.elapsed());
            assert_eq!(r.status, StatusCode::OK);
            loaded += usize::from(busy());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        (times, loaded)
    }

    /// 1,000 concurrent logins (from 1,000 addresses, so the per-address limit does not
    /// stop them) hash at most `hash_concurrency` at a time; those beyond the queue are
    /// answered 503 at once. The process's peak RSS grows by less than 200 MiB (without
    /// the bound every attempt allocates Argon2's 19 MiB on its own blocking thread:
    /// gigabytes), and /health answers during the flood within 5x of its latency under
    /// the same hashing load without the flood (the median of 20 requests each; the
    /// baseline floored at 1 ms, below which timer noise dominates).
    ///
    /// The test runs in a process of its own (this test binary, run again for this test
    /// only), so that the memory of tests running beside it does not count.
    #[test]
    fn login_flood_is_bounded() {
        const CHILD: &str = "WRENN_TEST_LOGIN_FLOOD_CHILD";
        if std::env::var_os(CHILD).is_some() {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("runtime")
                .block_on(login_flood());
            return;
        }
        let out = std::process::Command::new(std::env::current_exe().expect("test binary"))
            .args([
                "--exact",
                "auth_rules::login_flood_is_bounded",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD, "1")
            .output()
            .expect("run the flood test in a process of its own");
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        eprintln!("{stderr}");
        assert!(
            out.status.success(),
            "flood test failed:\n{stdout}\n{stderr}"
        );
        assert!(
            stderr.contains("flood: "),
            "the flood did not run:\n{stdout}\n{stderr}"
        );
    }

    async fn login_flood() {
        const FLOOD: usize = 1000;
        const RSS_GROWTH_MAX_KIB: u64 = 200 * 1024;
        let t = TestDb::sqlite().await;
        let a = api(
            &t,
            ApiConfig {
                hash_concurrency: 2,
                hash_queue: 16,
                ..Default::default()
            },
        )
        .await;
        let throttle = || a.state.auth_throttle.stats();

        // Baseline: /health while two logins at a time keep both hash slots busy.
        let background: Vec<_> = (0..2)
            .map(|i| {
                let app = a.app.clone();
                tokio::spawn(async move {
                    for j in 0..4 {
                        let mut req = Request::builder()
                            .method(Method::POST)
                            .uri("/v1/auth/login")
                            .header(header::CONTENT_TYPE, "application/json")
                            .body(Body::from(
                                login_body(&format!("base{i}-{j}@example.com"), "wrong")
                                    .to_string(),
                            ))
                            .expect("request");
                        req.extensions_mut()
                            .insert(ConnectInfo(SocketAddr::from(([10, 1, i, j], 40000))));
                        let _ = app.clone().oneshot(req).await;
                    }
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let (base, loaded) = health_latencies(&a, 20, || throttle().running > 0).await;
        for b in background {
            b.await.expect("background logins");
        }
        assert!(
            loaded >= 10,
            "the baseline ran without hashing load ({loaded}/20)"
        );
        let baseline = median(base).max(Duration::from_millis(1));

        // The flood.
        let rss_before = vm_kib("VmRSS:");
        // Reset VmHWM to the current RSS, so that it measures the flood's peak.
        std::fs::write("/proc/self/clear_refs", "5").expect("reset VmHWM");
        let admitted_before = throttle().admitted;
        let started = Instant::now();
        let flood: Vec<_> = (0..FLOOD)
            .map(|i| {
                let app = a.app.clone();
                tokio::spawn(async move {
                    let mut req = Request::builder()
                        .method(Method::POST)
                        .uri("/v1/auth/login")
                        .header(header::CONTENT_TYPE, "application/json")
                        .body(Body::from(
                            login_body(&format!("flood{i}@example.com"), "wrong password")
                                .to_string(),
                        ))
                        .expect("request");
                    let ip = SocketAddr::from(([10, 2, (i / 256) as u8, (i % 256) as u8], 40000));
                    req.extensions_mut().insert(ConnectInfo(ip));
                    let resp = app.oneshot(req).await.expect("infallible");
                    let status = resp.status();
                    let retry = resp.headers().contains_key(header::RETRY_AFTER);
                    let bytes = resp.into_body().collect().await.expect("body").to_bytes();
                    let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
                    (
                        status,
                        retry,
                        body["error"]["code"].as_str().unwrap_or("").to_string(),
                    )
                })
            })
            .collect();
        let (during, loaded) = health_latencies(&a, 20, || {
            let s = throttle();
            s.running + s.waiting > 0
        })
        .await;
        let mut statuses = std::collections::BTreeMap::<u16, usize>::new();
        for f in flood {
            let (status, retry, code) = f.await.expect("login task");
            *statuses.entry(status.as_u16()).or_default() += 1;
            match status {
                StatusCode::UNAUTHORIZED => assert_eq!(code, "wrong_password"),
                StatusCode::SERVICE_UNAVAILABLE => {
                    assert_eq!(code, "overloaded");
                    assert!(retry, "503 without Retry-After");
                }
                s => panic!("unexpected {s} ({code})"),
            }
        }
        let elapsed = started.elapsed();
        let peak_growth = vm_kib("VmHWM:").saturating_sub(rss_before);
        let stats = throttle();
        let hashed = stats.admitted - admitted_before;
        eprintln!(
            "flood: {statuses:?} in {elapsed:?}; hashed {hashed}, peak concurrency {}; \
             RSS {rss_before} KiB, peak growth {peak_growth} KiB; /health median {:?} \
             during vs {baseline:?} baseline ({loaded}/20 under load)",
            stats.peak_concurrent,
            median(during.clone())
        );
        assert_eq!(statuses.values().sum::<usize>(), FLOOD);
        assert!(stats.peak_concurrent <= 2, "{stats:?}");
        assert!(
            statuses.get(&503).copied().unwrap_or(0) >= FLOOD / 2,
            "the queue bound did not turn callers away: {statuses:?}"
        );
        assert_eq!(hashed as usize, statuses.get(&401).copied().unwrap_or(0));
        assert!(
            peak_growth < RSS_GROWTH_MAX_KIB,
            "peak RSS grew by {peak_growth} KiB (bound {RSS_GROWTH_MAX_KIB} KiB)"
        );
        assert!(
            loaded >= 5,
            "the flood was over before /health was measured"
        );
        let during = median(during);
        assert!(
            during <= baseline * 5,
            "/health took {during:?} (median) during the flood, {baseline:?} without"
        );
        t.finish().await;
    }
}
