//! The gRPC seam carries every host operation unchanged: a host agent served by
//! `wrenn_rpc::serve` on loopback and called through `RemoteAgent` gives the caller
//! what the agent gave, errors keep their kind and message, and an unreachable or
//! slow agent fails its own calls with `Unavailable` or `Timeout`. (The API suite runs
//! over this seam with real guests: `WRENN_TEST_AGENT=grpc` in wrenn-server's tests.)

#![allow(clippy::tests_outside_test_module)] // integration tests are their own crate

use async_trait::async_trait;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use wrenn_core::egress::EgressPolicy;
use wrenn_core::host::{
    CapsuleSpec, Endpoint, GuestStream, HostAgent, HostCapsule, HostError, HostErrorKind, HostInfo,
    HostTemplate, HostVersions, PoolStats,
};
use wrenn_core::id::CapsuleId;
use wrenn_core::metrics::{MetricPoint, PendingWindow, TierSnapshot};
use wrenn_core::scheduler::{HostId, Usage};
use wrenn_core::snapshot::{PauseMode, ResumeMode};
use wrenn_core::status::CapsuleStatus;
use wrenn_rpc::{RemoteAgent, Timeouts};

/// A host agent that answers from what it was asked and records it.
#[derive(Debug, Default)]
struct Echo {
    calls: Mutex<Vec<String>>,
    imported: Mutex<Option<TierSnapshot>>,
    network: Mutex<Option<EgressPolicy>>,
}

impl Echo {
    fn call(&self, what: String) {
        if let Ok(mut c) = self.calls.lock() {
            c.push(what);
        }
    }
}

fn capsule(id: &CapsuleId, status: CapsuleStatus) -> HostCapsule {
    HostCapsule {
        id: id.clone(),
        status,
        template: "minimal".into(),
        vcpus: 2,
        memory_mb: 512,
        disk_mb: 2048,
        labels: HashMap::from([("team".into(), "t-1".into())]),
    }
}

fn template(name: &str) -> HostTemplate {
    HostTemplate {
        name: name.into(),
        snapshot: true,
        vcpus: Some(1),
        memory_mb: Some(256),
        size_bytes: 123_456_789,
        created_at: Some(UNIX_EPOCH + Duration::from_millis(1_733_000_000_123)),
    }
}

fn history() -> TierSnapshot {
    let p = |t: i64| MetricPoint {
        timestamp_unix: t,
        cpu_pct: 12.5,
        mem_bytes: 1 << 28,
        disk_bytes: 3 << 20,
    };
    TierSnapshot {
        fine: vec![p(100), p(101)],
        mid: vec![p(60)],
        coarse: vec![],
        mid_open: Some(PendingWindow {
            index: 7,
            count: 3,
            cpu_sum: 30.5,
            mem_sum: 3 << 28,
            disk_last: 3 << 20,
        }),
        coarse_open: None,
        last_unix_ms: Some(101_500),
    }
}

const KINDS: [HostErrorKind; 9] = [
    HostErrorKind::NotFound,
    HostErrorKind::InvalidArgument,
    HostErrorKind::InvalidState,
    HostErrorKind::Conflict,
    HostErrorKind::Unavailable,
    HostErrorKind::InsufficientStorage,
    HostErrorKind::Timeout,
    HostErrorKind::Guest,
    HostErrorKind::Internal,
];

#[async_trait]
impl HostAgent for Echo {
    async fn versions(&self) -> Result<HostVersions, HostError> {
        Ok(HostVersions {
            envd_version: "0.6.4".into(),
            kernel_version: "6.1".into(),
            vmm_version: "qemu".into(),
            agent_version: "0.1.0".into(),
            accel: "tcg".into(),
            instance: "i-1".into(),
        })
    }
    async fn info(&self) -> Result<HostInfo, HostError> {
        Ok(HostInfo {
            id: HostId("host-a".into()),
            arch: "x86_64".into(),
            cpu_cores: 64,
            memory_mb: 256 * 1024,
            disk_mb: 2_000_000,
            disk_room_mb: 1_500_000,
            used: Usage {
                running_vcpus: 12,
                running_memory_mb: 6144,
                paused_memory_mb: 2048,
                disk_mb: 40_000,
            },
            running: 6,
            paused: 2,
            snapshot_templates: vec!["python".into(), "team-x-snap".into()],
            pool_ready: [("python".to_string(), 3)].into_iter().collect(),
            draining: true,
        })
    }
    async fn create(&self, spec: CapsuleSpec) -> Result<HostCapsule, HostError> {
        self.call(format!(
            "create {} {:?} {:?} {:?} {:?} {}",
            spec.template,
            spec.vcpus,
            spec.memory_mb,
            spec.envs.get("A"),
            spec.labels.get("team"),
            spec.cold_boot
        ));
        if let Ok(mut n) = self.network.lock() {
            *n = Some(spec.network);
        }
        Ok(HostCapsule {
            template: spec.template,
            vcpus: spec.vcpus.unwrap_or(1),
            memory_mb: spec.memory_mb.unwrap_or(256),
            labels: spec.labels,
            ..capsule(&CapsuleId::random(), CapsuleStatus::Running)
        })
    }
    async fn get(&self, id: &CapsuleId) -> Result<HostCapsule, HostError> {
        Err(HostError::not_found(id))
    }
    async fn list(&self) -> Result<Vec<HostCapsule>, HostError> {
        Ok(CapsuleStatus::ALL
            .iter()
            .map(|s| capsule(&CapsuleId::random(), *s))
            .collect())
    }
    async fn pause(&self, id: &CapsuleId, mode: PauseMode) -> Result<(), HostError> {
        self.call(format!("pause {id} {mode:?}"));
        Ok(())
    }
    async fn resume(&self, id: &CapsuleId, mode: ResumeMode) -> Result<HostCapsule, HostError> {
        self.call(format!("resume {id} {mode:?}"));
        Ok(capsule(id, CapsuleStatus::Running))
    }
    async fn destroy(&self, id: &CapsuleId) -> Result<(), HostError> {
        self.call(format!("destroy {id}"));
        Ok(())
    }
    async fn ensure_space(&self, bytes: u64) -> Result<(), HostError> {
        if bytes == u64::MAX {
            // A host that hangs.
            tokio::time::sleep(Duration::from_secs(30)).await;
        }
        Err(HostError::new(
            HostErrorKind::InsufficientStorage,
            format!("{bytes} bytes do not fit"),
        ))
    }
    async fn set_network(&self, id: &CapsuleId, policy: EgressPolicy) -> Result<(), HostError> {
        self.call(format!("set_network {id}"));
        if let Ok(mut n) = self.network.lock() {
            *n = Some(policy);
        }
        Ok(())
    }
    async fn fork(
        &self,
        id: &CapsuleId,
        count: usize,
        labels: HashMap<String, String>,
    ) -> Result<Vec<HostCapsule>, HostError> {
        self.call(format!("fork {id} {count} {:?}", labels.get("k")));
        Ok((0..count)
            .map(|_| capsule(&CapsuleId::random(), CapsuleStatus::Running))
            .collect())
    }
    async fn snapshot(&self, id: &CapsuleId, name: &str) -> Result<HostTemplate, HostError> {
        self.call(format!("snapshot {id} {name}"));
        Ok(template(name))
    }
    async fn templates(&self) -> Result<Vec<HostTemplate>, HostError> {
        Ok(vec![
            template("a"),
            HostTemplate {
                snapshot: false,
                vcpus: None,
                memory_mb: None,
                created_at: None,
                ..template("b")
            },
        ])
    }
    async fn template(&self, name: &str) -> Result<HostTemplate, HostError> {
        Ok(template(name))
    }
    async fn delete_template(&self, name: &str) -> Result<(), HostError> {
        // `kind-N` fails with the N-th kind, to see each one cross.
        let n: usize = name
            .strip_prefix("kind-")
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        Err(HostError::new(KINDS[n], format!("failed: {name} ✗")))
    }
    async fn envd(&self, _: &CapsuleId) -> Result<Endpoint, HostError> {
        Ok(Endpoint {
            addr: "10.11.0.2:49983".parse().expect("addr"),
            access_token: Some("tok".into()),
        })
    }
    async fn port(&self, _: &CapsuleId, port: u16) -> Result<Endpoint, HostError> {
        Ok(Endpoint {
            addr: SocketAddr::from(([10, 11, 0, 2], port)),
            access_token: None,
        })
    }
    /// Port 7 is an echo service (upper-casing what it reads, to tell the two
    /// directions apart); every other port refuses.
    async fn open(&self, id: &CapsuleId, port: u16) -> Result<GuestStream, HostError> {
        if port != 7 {
            return Err(HostError::new(
                HostErrorKind::Guest,
                format!("capsule {id} port {port} did not answer: connection refused"),
            ));
        }
        let (near, mut far) = tokio::io::duplex(1024);
        tokio::spawn(async move {
            let mut buf = [0u8; 4096];
            loop {
                match far.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        let up = buf[..n].to_ascii_uppercase();
                        if far.write_all(&up).await.is_err() {
                            return;
                        }
                    }
                }
            }
            // End of input: answer once more, then close.
            let _ = far.write_all(b"<eof>").await;
        });
        Ok(Box::new(near))
    }
    async fn metrics(&self, _: &CapsuleId, range: Duration) -> Result<Vec<MetricPoint>, HostError> {
        Ok(history()
            .fine
            .into_iter()
            .take(usize::try_from(range.as_secs()).unwrap_or(0))
            .collect())
    }
    async fn latest_metric(
        &self,
        _: &CapsuleId,
        within: Duration,
    ) -> Result<Option<MetricPoint>, HostError> {
        Ok((within > Duration::from_secs(1)).then(|| history().fine[1]))
    }
    async fn export_metrics(&self, _: &CapsuleId) -> Result<Option<TierSnapshot>, HostError> {
        Ok(Some(history()))
    }
    async fn import_metrics(&self, _: &CapsuleId, saved: TierSnapshot) -> Result<(), HostError> {
        if let Ok(mut i) = self.imported.lock() {
            *i = Some(saved);
        }
        Ok(())
    }
    async fn pools(&self) -> Result<Vec<PoolStats>, HostError> {
        Ok(vec![PoolStats {
            template: "minimal".into(),
            target: 2,
            ready: 1,
            filling: 1,
            hits: 5,
            misses: 3,
            last_refill_ms: Some(850),
            memory_mb: 512,
        }])
    }
    async fn set_pool(&self, template: &str, size: usize) -> Result<(), HostError> {
        self.call(format!("set_pool {template} {size}"));
        Ok(())
    }
    async fn drain(&self, draining: bool) -> Result<(), HostError> {
        self.call(format!("drain {draining}"));
        Ok(())
    }
}

/// `agent` served on loopback, and a client of it.
async fn over_grpc(agent: Arc<Echo>, timeouts: Timeouts) -> RemoteAgent {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(wrenn_rpc::serve(agent, listener, std::future::pending()));
    RemoteAgent::connect_lazy(&format!("http://{addr}"), timeouts).expect("client")
}

#[tokio::test]
async fn every_operation_crosses_unchanged() {
    let echo = Arc::new(Echo::default());
    let remote = over_grpc(echo.clone(), Timeouts::default()).await;
    let id = CapsuleId::random();

    assert_eq!(
        remote.versions().await.expect("versions"),
        echo.versions().await.expect("versions")
    );
    assert_eq!(
        remote.info().await.expect("info"),
        echo.info().await.expect("info")
    );
    let policy = EgressPolicy::new(
        &["10.0.0.0/8", "*.example.com"],
        &["0.0.0.0/0"],
        Some(&["9.9.9.9"]),
    )
    .expect("policy");
    let spec = CapsuleSpec {
        template: "python".into(),
        vcpus: Some(2),
        memory_mb: None,
        envs: HashMap::from([("A".into(), "1 2".into())]),
        labels: HashMap::from([("team".into(), "t-9".into())]),
        cold_boot: true,
        network: policy.clone(),
    };
    let created = remote.create(spec).await.expect("create");
    assert_eq!(
        (created.template.as_str(), created.vcpus, created.memory_mb),
        ("python", 2, 256)
    );
    assert_eq!(created.labels.get("team").map(String::as_str), Some("t-9"));
    assert_eq!(echo.network.lock().expect("lock").clone(), Some(policy));

    let listed = remote.list().await.expect("list");
    let statuses: Vec<CapsuleStatus> = listed.iter().map(|c| c.status).collect();
    assert_eq!(
        statuses,
        CapsuleStatus::ALL.to_vec(),
        "every status crosses"
    );

    remote.pause(&id, PauseMode::DiskOnly).await.expect("pause");
    let resumed = remote
        .resume(&id, ResumeMode::Reboot)
        .await
        .expect("resume");
    assert_eq!(resumed, capsule(&id, CapsuleStatus::Running));
    remote
        .set_network(&id, EgressPolicy::default())
        .await
        .expect("set network");
    assert_eq!(
        echo.network.lock().expect("lock").clone(),
        Some(EgressPolicy::default())
    );
    let forks = remote
        .fork(&id, 3, HashMap::from([("k".into(), "v".into())]))
        .await
        .expect("fork");
    assert_eq!(forks.len(), 3);
    assert_eq!(
        remote.snapshot(&id, "snap").await.expect("snapshot"),
        template("snap")
    );
    assert_eq!(
        remote.templates().await.expect("templates"),
        echo.templates().await.expect("templates")
    );
    assert_eq!(remote.template("x").await.expect("template"), template("x"));
    remote.set_pool("minimal", 4).await.expect("set pool");
    remote.drain(true).await.expect("drain");
    remote.destroy(&id).await.expect("destroy");
    let calls = echo.calls.lock().expect("lock").clone();
    assert_eq!(
        calls,
        vec![
            "create python Some(2) None Some(\"1 2\") Some(\"t-9\") true".to_string(),
            format!("pause {id} DiskOnly"),
            format!("resume {id} Reboot"),
            format!("set_network {id}"),
            format!("fork {id} 3 Some(\"v\")"),
            format!("snapshot {id} snap"),
            "set_pool minimal 4".to_string(),
            "drain true".to_string(),
            format!("destroy {id}"),
        ]
    );

    let envd = remote.envd(&id).await.expect("envd");
    assert_eq!(envd, echo.envd(&id).await.expect("envd"));
    assert_eq!(
        remote.port(&id, 8888).await.expect("port").addr,
        SocketAddr::from(([10, 11, 0, 2], 8888))
    );
    assert_eq!(
        remote
            .metrics(&id, Duration::from_secs(2))
            .await
            .expect("metrics"),
        history().fine
    );
    assert_eq!(
        remote
            .latest_metric(&id, Duration::from_secs(5))
            .await
            .expect("latest"),
        Some(history().fine[1])
    );
    assert_eq!(
        remote
            .latest_metric(&id, Duration::from_millis(500))
            .await
            .expect("latest"),
        None
    );
    assert_eq!(
        remote.export_metrics(&id).await.expect("export"),
        Some(history())
    );
    remote.import_metrics(&id, history()).await.expect("import");
    assert_eq!(echo.imported.lock().expect("lock").clone(), Some(history()));
    assert_eq!(
        remote.pools().await.expect("pools"),
        echo.pools().await.expect("pools")
    );
}

#[tokio::test]
async fn errors_keep_their_kind_and_message() {
    let remote = over_grpc(Arc::new(Echo::default()), Timeouts::default()).await;
    for (n, kind) in KINDS.iter().enumerate() {
        let e = remote
            .delete_template(&format!("kind-{n}"))
            .await
            .expect_err("fails");
        assert_eq!(
            (e.kind, e.message.as_str()),
            (*kind, format!("failed: kind-{n} ✗").as_str())
        );
    }
    let id = CapsuleId::random();
    assert_eq!(
        remote.get(&id).await.expect_err("missing"),
        HostError::not_found(&id)
    );
    let e = remote.ensure_space(10).await.expect_err("no space");
    assert_eq!(e.kind, HostErrorKind::InsufficientStorage);
    assert_eq!(e.message, "10 bytes do not fit");
}

#[tokio::test]
async fn an_unreachable_agent_is_unavailable() {
    // A port that was free a moment ago: nothing listens there.
    let addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr")
    };
    let remote =
        RemoteAgent::connect_lazy(&format!("http://{addr}"), Timeouts::default()).expect("client");
    let e = remote.list().await.expect_err("nothing listens");
    assert_eq!(e.kind, HostErrorKind::Unavailable, "{e}");
    assert!(e.message.starts_with("host agent"), "{e}");

    let e = RemoteAgent::connect_lazy("not a url", Timeouts::default()).expect_err("bad url");
    assert!(e.to_string().contains("not a url"), "{e}");
}

#[tokio::test]
async fn a_slow_agent_times_out_its_own_calls_only() {
    let timeouts = Timeouts {
        quick: Duration::from_millis(300),
        ..Timeouts::default()
    };
    let remote = over_grpc(Arc::new(Echo::default()), timeouts).await;
    let hung = {
        let remote = remote.clone();
        tokio::spawn(async move { remote.ensure_space(u64::MAX).await })
    };
    // Other calls on the same connection are answered while one hangs.
    remote.pools().await.expect("pools while a call hangs");
    assert!(!hung.is_finished(), "the hung call ended before the others");
    let e = hung.await.expect("join").expect_err("times out");
    assert_eq!(e.kind, HostErrorKind::Timeout, "{e}");
}

#[tokio::test]
async fn a_capsule_connection_carries_bytes_both_ways_and_ends() {
    let remote = over_grpc(Arc::new(Echo::default()), Timeouts::default()).await;
    let id = CapsuleId::random();
    let mut conn = remote.open(&id, 7).await.expect("open");
    // More than one frame each way.
    let big = vec![b'a'; 300 * 1024];
    let (mut rd, mut wr) = tokio::io::split(&mut conn);
    let writer = async {
        wr.write_all(b"hello ").await.expect("write");
        wr.write_all(&big).await.expect("write");
        wr.shutdown().await.expect("end of input");
    };
    let mut got = Vec::new();
    let reader = rd.read_to_end(&mut got);
    let ((), n) = tokio::join!(writer, reader);
    n.expect("read to the end");
    let mut want = b"HELLO ".to_vec();
    want.extend(std::iter::repeat_n(b'A', big.len()));
    want.extend_from_slice(b"<eof>");
    assert_eq!(got.len(), want.len());
    assert!(
        got == want,
        "the bytes came back in order and changed as the service does"
    );

    let e = match remote.open(&id, 8).await {
        Ok(_) => panic!("port 8 refuses"),
        Err(e) => e,
    };
    assert_eq!(e.kind, HostErrorKind::Guest, "{e}");
    assert!(e.message.contains("port 8"), "{e}");
}

#[tokio::test]
async fn over_mutual_tls_only_the_control_plane_reaches_only_the_host_it_means() {
    use wrenn_pki::{AgentIdentity, Ca, CaKind, ControlPlaneIdentity};
    let day = Duration::from_secs(86_400);
    let hosts = Ca::generate(CaKind::Hosts).expect("host CA");
    let cps = Ca::generate(CaKind::ControlPlane).expect("control-plane CA");
    let host_a = hosts.issue_host("host-a", day).expect("host cert");
    let (agent_tls, agent_slot) = AgentIdentity {
        cert_pem: host_a.cert_pem.clone(),
        key_pem: host_a.key_pem.clone(),
        client_ca_pem: cps.cert_pem().into(),
    }
    .rotating_server_config()
    .expect("server settings");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    tokio::spawn(wrenn_rpc::serve_tls(
        Arc::new(Echo::default()),
        listener,
        Arc::new(agent_tls),
        std::future::pending(),
    ));
    let client = cps.issue_control_plane(day).expect("client cert");
    let cp = ControlPlaneIdentity::new(hosts.cert_pem(), &client.cert_pem, &client.key_pem)
        .expect("identity");
    let quick = Timeouts {
        connect: Duration::from_secs(3),
        quick: Duration::from_secs(5),
        ..Timeouts::default()
    };

    // The control plane, expecting host-a: served, tunnels included.
    let remote = RemoteAgent::connect_tls(&addr, "host-a", &cp, quick).expect("client");
    remote.versions().await.expect("versions over mTLS");
    let mut conn = remote.open(&CapsuleId::random(), 7).await.expect("open");
    conn.write_all(b"tls").await.expect("write");
    let mut got = [0u8; 3];
    conn.read_exact(&mut got).await.expect("read");
    assert_eq!(&got, b"TLS");

    // Expecting another host at that address: host-a's certificate does not pass.
    let wrong = RemoteAgent::connect_tls(&addr, "host-b", &cp, quick).expect("client");
    let e = wrong.versions().await.expect_err("not host-b");
    assert_eq!(e.kind, HostErrorKind::Unavailable, "{e}");

    // A host's certificate is not the control plane's: the agent refuses it.
    let host_b = hosts.issue_host("host-b", day).expect("host cert");
    let posing = ControlPlaneIdentity::new(hosts.cert_pem(), &host_b.cert_pem, &host_b.key_pem)
        .expect("identity");
    let e = RemoteAgent::connect_tls(&addr, "host-a", &posing, quick)
        .expect("client")
        .versions()
        .await
        .expect_err("a host certificate is no control plane");
    assert_eq!(e.kind, HostErrorKind::Unavailable, "{e}");

    // No TLS at all: refused.
    let plain = RemoteAgent::connect_lazy(&format!("http://{addr}"), quick).expect("client");
    assert!(plain.versions().await.is_err(), "plaintext is refused");

    // Rotation: what is in the slots is what new handshakes present. The agent
    // renewed: reached, also by the connection made before.
    let renewed = hosts.issue_host("host-a", day).expect("host cert");
    agent_slot
        .replace(&renewed.cert_pem, &renewed.key_pem)
        .expect("renewed");
    let after = RemoteAgent::connect_tls(&addr, "host-a", &cp, quick).expect("client");
    after.versions().await.expect("renewed host certificate");
    remote.versions().await.expect("the earlier connection");
    // The slot, not the certificate at start, is what the agent presents.
    agent_slot
        .replace(&host_b.cert_pem, &host_b.key_pem)
        .expect("replaced");
    let e = RemoteAgent::connect_tls(&addr, "host-a", &cp, quick)
        .expect("client")
        .versions()
        .await
        .expect_err("now presenting host-b's certificate");
    assert_eq!(e.kind, HostErrorKind::Unavailable, "{e}");
    agent_slot
        .replace(&renewed.cert_pem, &renewed.key_pem)
        .expect("back");
    // Likewise the control plane's client certificate.
    cp.cert
        .replace(&host_b.cert_pem, &host_b.key_pem)
        .expect("replaced");
    assert!(RemoteAgent::connect_tls(&addr, "host-a", &cp, quick)
        .expect("client")
        .versions()
        .await
        .is_err());
    let next = cps.issue_control_plane(day).expect("client cert");
    cp.cert
        .replace(&next.cert_pem, &next.key_pem)
        .expect("renewed");
    RemoteAgent::connect_tls(&addr, "host-a", &cp, quick)
        .expect("client")
        .versions()
        .await
        .expect("renewed control-plane certificate");
}
