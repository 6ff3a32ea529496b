//! End-to-end: real guests booted from the `minimal` template, driven through the
//! capsule manager. Each test checks that what it created is gone afterwards.

#![allow(clippy::tests_outside_test_module)] // integration tests are their own crate

mod common;

use bytes::Bytes;
use common::*;
use std::collections::HashMap;
use std::time::Duration;
use wrenn::guest::AgentError;
use wrenn::{CapsuleError, CapsuleStatus, CreateOptions, ExecRequest};

fn minimal() -> CreateOptions {
    CreateOptions {
        template: Some("minimal".into()),
        memory_mb: Some(256),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_files_envs_and_cwd() {
    let Some(host) = host().await else { return };
    let caps = host.capsules();
    let mut opts = minimal();
    opts.envs = HashMap::from([("CAPSULE_ENV".to_string(), "from-create".to_string())]);
    let info = caps.create(opts).await.expect("create");
    assert_eq!(info.status, CapsuleStatus::Running);
    let fp = footprint(&host, &info);
    let id = info.id.clone();

    // echo, exit code, stdout/stderr separation
    let (out, err, code) = run(&host, &id, "echo hello; echo oops >&2; exit 7").await;
    assert_eq!((out.as_str(), err.as_str(), code), ("hello\n", "oops\n", 7));
    assert_eq!(run(&host, &id, "true").await.2, 0);

    // stdin
    let cat = ExecRequest {
        cmd: "cat".into(),
        ..Default::default()
    };
    let out = caps
        .run(&id, &cat, Some(Bytes::from_static(b"line one\nline two\n")))
        .await
        .expect("cat");
    assert_eq!(out.stdout, b"line one\nline two\n");
    assert_eq!(out.exit.code, 0);

    // envs (capsule default + per command) and cwd
    let req = ExecRequest {
        cwd: Some("/tmp".into()),
        envs: HashMap::from([("REQ_ENV".to_string(), "from-exec".to_string())]),
        ..sh("echo \"$CAPSULE_ENV $REQ_ENV $(pwd) $(whoami)\"")
    };
    let out = caps.run(&id, &req, None).await.expect("env run");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "from-create from-exec /tmp user\n"
    );
    let root = ExecRequest {
        user: Some("root".into()),
        ..sh("whoami")
    };
    assert_eq!(
        caps.run(&id, &root, None).await.expect("root").stdout,
        b"root\n"
    );

    // a file written, then read back and listed; the guest sees it too
    let agent = caps.agent(&id).expect("agent");
    let content = Bytes::from(
        (0..200_000u32)
            .flat_map(|i| i.to_le_bytes())
            .collect::<Vec<u8>>(),
    );
    let body = content.clone();
    agent
        .write_file(
            "/home/user/data/blob.bin",
            Box::pin(futures_util::stream::once(async move { Ok(body) })),
        )
        .await
        .expect("write");
    let mut read = Vec::new();
    let mut stream = agent
        .read_file("/home/user/data/blob.bin")
        .await
        .expect("read");
    use futures_util::StreamExt;
    while let Some(chunk) = stream.next().await {
        read.extend_from_slice(&chunk.expect("chunk"));
    }
    assert_eq!(read, content);
    let listed = agent.list_dir("/home/user/data", 1).await.expect("list");
    assert_eq!(listed.len(), 1);
    assert_eq!(
        (
            listed[0].name.as_str(),
            listed[0].size,
            listed[0].owner.as_str()
        ),
        ("blob.bin", 800_000, "user")
    );
    let (sum, _, _) = run(&host, &id, "wc -c < /home/user/data/blob.bin").await;
    assert_eq!(sum.trim(), "800000");
    assert!(matches!(
        agent.read_file("/nope").await.map(|_| ()),
        Err(AgentError::NotFound(_))
    ));

    // a command that does not exist is an error from the guest, not a hang
    let missing = ExecRequest {
        cmd: "/no/such/binary".into(),
        ..Default::default()
    };
    assert!(caps.run(&id, &missing, None).await.is_err());

    // a timeout kills the command
    let slow = ExecRequest {
        timeout: Some(Duration::from_secs(1)),
        ..sh("sleep 30")
    };
    let started = std::time::Instant::now();
    let res = caps.run(&id, &slow, None).await;
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "timeout not enforced"
    );
    assert!(
        matches!(res, Err(CapsuleError::Agent(AgentError::Timeout(_)))),
        "{res:?}"
    );

    // Output beyond the cap is not collected: the command is stopped.
    let res = caps
        .run(&id, &sh("head -c 200000000 /dev/zero; echo finished"), None)
        .await;
    assert!(
        matches!(res, Err(CapsuleError::OutputTooLarge { limit }) if limit == wrenn::manager::MAX_COLLECTED_OUTPUT),
        "{res:?}"
    );
    let (out, _, _) = run(&host, &id, "pgrep -x head || echo stopped").await;
    assert_eq!(out, "stopped\n");

    caps.destroy(&id).await.expect("destroy");
    assert_gone(&fp).await;
    assert!(matches!(caps.get(&id), Err(CapsuleError::NotFound { .. })));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_capsules_share_the_guest_ip_and_cannot_reach_each_other() {
    let Some(host) = host().await else { return };
    let caps = host.capsules();
    let (a, b) = tokio::join!(caps.create(minimal()), caps.create(minimal()));
    let (a, b) = (a.expect("create a"), b.expect("create b"));
    let (fa, fb) = (footprint(&host, &a), footprint(&host, &b));
    assert_ne!(a.host_addr, b.host_addr);
    assert_ne!(fa.netns, fb.netns);
    for c in [&a, &b] {
        let (out, _, code) = run(&host, &c.id, "ip -4 -o addr show dev eth0").await;
        assert_eq!(code, 0);
        assert!(out.contains("169.254.0.21/30"), "guest address: {out}");
    }
    // From A, B's envd (reachable from the host) must be unreachable.
    let b_addr = b.host_addr.clone().expect("b address");
    let probe = format!(
        "timeout 5 bash -c 'echo > /dev/tcp/{b_addr}/49983' && echo reached || echo blocked"
    );
    let (out, _, _) = run(&host, &a.id, &probe).await;
    assert_eq!(out.trim(), "blocked", "capsule A reached capsule B");
    // and A's own traffic to B's guest address is just A's own gateway subnet: never B.
    caps.destroy(&a.id).await.expect("destroy a");
    caps.destroy(&b.id).await.expect("destroy b");
    assert_gone(&fa).await;
    assert_gone(&fb).await;
}

/// A TCP server in a namespace of the test's own, reachable from the host.
struct EgressServer {
    ns: String,
    veth: String,
    server: std::process::Child,
}

impl EgressServer {
    fn start() -> anyhow::Result<Self> {
        let id = std::process::id() % 10000;
        let ns = format!("wrenn-test-egress-{id}");
        let veth = format!("wrenn-te{id}");
        let ip = |args: &[&str]| -> anyhow::Result<()> {
            let st = std::process::Command::new("ip").args(args).status()?;
            anyhow::ensure!(st.success(), "ip {args:?} failed");
            Ok(())
        };
        ip(&["netns", "add", &ns])?;
        ip(&[
            "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns,
        ])?;
        ip(&["addr", "add", "198.19.252.1/30", "dev", &veth])?;
        ip(&["link", "set", &veth, "up"])?;
        ip(&["-n", &ns, "addr", "add", "198.19.252.2/30", "dev", "eth0"])?;
        ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
        ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        let server = std::process::Command::new("ip")
            .args(["netns", "exec", &ns, "python3", "-c"])
            .arg(
                "import socket\n\
                 s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
                 s.bind(('198.19.252.2', 8765)); s.listen(4)\n\
                 while True:\n\
                 \x20   c,a=s.accept(); c.sendall(('hello from outside, you are %s\\n' % a[0]).encode()); c.close()\n",
            )
            .spawn()?;
        std::thread::sleep(Duration::from_millis(500));
        Ok(EgressServer { ns, veth, server })
    }
}

impl Drop for EgressServer {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
        let _ = std::process::Command::new("ip")
            .args(["link", "del", &self.veth])
            .status();
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.ns])
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_egress_reaches_a_server_in_another_namespace() {
    let Some(host) = host().await else { return };
    let server = EgressServer::start().expect("egress server");
    let caps = host.capsules();
    let info = caps.create(minimal()).await.expect("create");
    let fp = footprint(&host, &info);
    let (out, err, code) = run(
        &host,
        &info.id,
        "timeout 10 bash -c 'exec 3<>/dev/tcp/198.19.252.2/8765; head -1 <&3'",
    )
    .await;
    assert_eq!(code, 0, "egress failed: {err}");
    assert!(
        out.starts_with("hello from outside, you are 198.19.252.1"),
        "{out}"
    );
    caps.destroy(&info.id).await.expect("destroy");
    drop(server);
    assert_gone(&fp).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_vmm_marks_the_capsule_failed_and_releases_everything() {
    let Some(host) = host().await else { return };
    let caps = host.capsules();
    let info = caps.create(minimal()).await.expect("create");
    let fp = footprint(&host, &info);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(fp.vmm_pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill qemu");
    let mut status = CapsuleStatus::Running;
    for _ in 0..200 {
        status = caps.get(&info.id).expect("get").status;
        if status == CapsuleStatus::Error {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(status, CapsuleStatus::Error);
    let got = caps.get(&info.id).expect("get");
    assert!(
        got.error.as_deref().unwrap_or("").contains("VMM exited"),
        "{got:?}"
    );
    assert!(!fp.netns.exists(), "namespace kept after the VMM died");
    assert!(!link_exists(&fp.host_veth));
    assert!(
        !fp.dir.join("disk.qcow2").exists(),
        "disk kept after the VMM died"
    );
    // exec on a failed capsule is a typed error
    assert!(matches!(
        caps.run(&info.id, &sh("true"), None).await,
        Err(CapsuleError::InvalidState {
            status: CapsuleStatus::Error,
            ..
        })
    ));
    caps.destroy(&info.id)
        .await
        .expect("destroy failed capsule");
    assert_gone(&fp).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_a_typed_error_and_creates_nothing() {
    // Its own data directory: the other tests of this binary create capsules meanwhile.
    let Some((host, _dir)) = isolated_host().await else {
        return;
    };
    let caps = host.capsules();
    let count = || {
        std::fs::read_dir(host.data_dir().capsules())
            .map(|d| d.count())
            .unwrap_or(0)
    };
    let before = count();
    let e = caps
        .create(CreateOptions {
            template: Some("no-such-template".into()),
            ..Default::default()
        })
        .await;
    assert!(
        matches!(
            e,
            Err(CapsuleError::Template(
                wrenn::template::TemplateError::Unknown { .. }
            ))
        ),
        "{e:?}"
    );
    for opts in [
        CreateOptions {
            vcpus: Some(0),
            ..minimal()
        },
        CreateOptions {
            vcpus: Some(64),
            ..minimal()
        },
        CreateOptions {
            memory_mb: Some(1),
            ..minimal()
        },
        CreateOptions {
            memory_mb: Some(10_000_000),
            ..minimal()
        },
        CreateOptions {
            disk_mb: Some(1),
            ..minimal()
        },
        CreateOptions {
            template: Some("../etc".into()),
            ..Default::default()
        },
    ] {
        let e = caps.create(opts.clone()).await;
        assert!(
            matches!(e, Err(CapsuleError::InvalidSpec(_))),
            "{opts:?}: {e:?}"
        );
    }
    assert_eq!(
        count(),
        before,
        "a rejected create left a capsule directory"
    );
    let bogus = wrenn::CapsuleId::random();
    assert!(matches!(
        caps.destroy(&bogus).await,
        Err(CapsuleError::NotFound { .. })
    ));
}
