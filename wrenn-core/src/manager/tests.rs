//! The manager over in-memory fakes ([`crate::testing`]): every failure path
//! releases what it took, and lifecycle calls on one capsule serialise.

use super::*;
use crate::testing::{injected, Fakes, Held, Point, World};

fn manager() -> (Arc<Capsules>, Arc<World>) {
    let fakes = Fakes::new();
    let config = ManagerConfig {
        pool_memory_budget_mb: 0,
        ..ManagerConfig::default()
    };
    (Capsules::new(fakes.parts(), config), fakes.world)
}

fn minimal() -> CreateOptions {
    CreateOptions {
        template: Some("minimal".into()),
        ..CreateOptions::default()
    }
}

/// What one running capsule holds.
fn one_running() -> Held {
    Held {
        slots: 1,
        disks: 1,
        vmms: 1,
        dirs: 1,
        records: 1,
        snapshots: 0,
    }
}

fn status(caps: &Capsules, id: &CapsuleId) -> Option<CapsuleStatus> {
    caps.get(id).ok().map(|c| c.status)
}

async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    for _ in 0..500 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for: {what}");
}

fn vmm_pid(world: &World, caps: &Capsules, id: &CapsuleId) -> u32 {
    let pid = caps
        .running_vmms()
        .into_iter()
        .find(|v| &v.id == id)
        .map(|v| v.pid)
        .expect("a running VMM");
    assert!(world.vmm_running(pid));
    pid
}

#[tokio::test]
async fn a_create_failing_at_any_step_leaves_nothing() {
    let steps: &[(Point, u32)] = &[
        (Point::StateCreateDir, 1),
        (Point::StateSave, 1),
        (Point::NetAllocate, 1),
        (Point::DiskCreate, 1),
        (Point::StateSave, 2),
        (Point::VmmSpawn, 1),
        (Point::StateSave, 3),
        (Point::AgentReady, 1),
        (Point::AgentInit, 1),
        (Point::StateSave, 4),
    ];
    for &(point, nth) in steps {
        let (caps, world) = manager();
        world.fail_nth(point, nth);
        let err = caps.create(minimal()).await.expect_err("create must fail");
        assert!(
            injected(&err) || matches!(err, CapsuleError::Agent(_)),
            "{point:?} #{nth}: unexpected error {err:?}"
        );
        assert_eq!(world.held(), Held::nothing(), "{point:?} #{nth} leaked");
        assert!(caps.list().is_empty(), "{point:?} #{nth}: listed");
        assert_eq!(
            world.calls(point),
            nth,
            "{point:?} reached once more than expected"
        );
    }
    // And without a fault, the same create succeeds.
    let (caps, world) = manager();
    let info = caps.create(minimal()).await.expect("create");
    assert_eq!(info.status, CapsuleStatus::Running);
    assert_eq!(world.held(), one_running());
    caps.destroy(&info.id).await.expect("destroy");
    assert_eq!(world.held(), Held::nothing());
}

#[tokio::test]
async fn a_failed_pause_leaves_the_capsule_running() {
    for point in [Point::VmmPause, Point::VmmSave, Point::CommitPause] {
        let (caps, world) = manager();
        let id = caps.create(minimal()).await.expect("create").id;
        world.fail(point, 1);
        let err = caps.pause(&id).await.expect_err("pause must fail");
        assert!(injected(&err), "{point:?}: {err:?}");
        assert_eq!(
            status(&caps, &id),
            Some(CapsuleStatus::Running),
            "{point:?}"
        );
        vmm_pid(&world, &caps, &id);
        assert_eq!(world.held(), one_running(), "{point:?}");
        assert!(!world.has_snapshot(&id));
        // It still works: a pause now succeeds, and a resume brings it back.
        caps.pause(&id).await.expect("second pause");
        assert_eq!(status(&caps, &id), Some(CapsuleStatus::Paused));
        let paused = Held {
            slots: 0,
            disks: 0,
            vmms: 0,
            snapshots: 1,
            ..one_running()
        };
        assert_eq!(world.held(), paused, "{point:?}");
        caps.resume(&id).await.expect("resume");
        assert_eq!(status(&caps, &id), Some(CapsuleStatus::Running));
        caps.destroy(&id).await.expect("destroy");
        assert_eq!(world.held(), Held::nothing(), "{point:?}");
    }
}

#[tokio::test]
async fn a_failed_resume_leaves_the_capsule_paused() {
    for (point, nth) in [
        (Point::SnapshotOpen, 1),
        (Point::StateCreateDir, 1),
        (Point::NetAllocate, 1),
        (Point::VmmRestore, 1),
        (Point::AgentReady, 1),
    ] {
        let (caps, world) = manager();
        let id = caps.create(minimal()).await.expect("create").id;
        caps.pause(&id).await.expect("pause");
        let paused = world.held();
        world.fail_nth(point, nth);
        let err = caps.resume(&id).await.expect_err("resume must fail");
        assert!(
            injected(&err) || matches!(err, CapsuleError::Agent(_)),
            "{point:?}: {err:?}"
        );
        assert_eq!(status(&caps, &id), Some(CapsuleStatus::Paused), "{point:?}");
        assert_eq!(world.held(), paused, "{point:?} leaked");
        caps.resume(&id).await.expect("second resume");
        caps.destroy(&id).await.expect("destroy");
        assert_eq!(world.held(), Held::nothing(), "{point:?}");
    }
}

#[tokio::test]
async fn a_destroy_waits_behind_a_pause_in_progress() {
    let (caps, world) = manager();
    let id = caps.create(minimal()).await.expect("create").id;
    let gate = world.hold(Point::VmmSave);
    let pausing = tokio::spawn({
        let (caps, id) = (caps.clone(), id.clone());
        async move { caps.pause(&id).await }
    });
    gate.reached().await;
    assert_eq!(status(&caps, &id), Some(CapsuleStatus::Pausing));
    let destroying = tokio::spawn({
        let (caps, id) = (caps.clone(), id.clone());
        async move { caps.destroy(&id).await }
    });
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
    assert!(!destroying.is_finished(), "destroy overtook the pause");
    assert_eq!(status(&caps, &id), Some(CapsuleStatus::Pausing));
    gate.open();
    pausing.await.expect("join").expect("pause");
    destroying.await.expect("join").expect("destroy");
    assert!(caps.get(&id).is_err());
    assert_eq!(
        world.held(),
        Held::nothing(),
        "the snapshot went with the capsule"
    );
}

#[tokio::test]
async fn a_vmm_dying_mid_pause_fails_it_and_releases_the_capsule() {
    let (caps, world) = manager();
    let id = caps.create(minimal()).await.expect("create").id;
    let pid = vmm_pid(&world, &caps, &id);
    let gate = world.hold(Point::VmmSave);
    let pausing = tokio::spawn({
        let (caps, id) = (caps.clone(), id.clone());
        async move { caps.pause(&id).await }
    });
    gate.reached().await;
    world.kill_vmm(pid);
    gate.open();
    let err = pausing
        .await
        .expect("join")
        .expect_err("pause of a dead VM");
    assert!(matches!(err, CapsuleError::Vmm(_)), "{err:?}");
    eventually("the capsule is marked failed", || {
        status(&caps, &id) == Some(CapsuleStatus::Error)
    })
    .await;
    let failed = Held {
        slots: 0,
        disks: 0,
        vmms: 0,
        ..one_running()
    };
    eventually("its resources are released", || world.held() == failed).await;
    assert!(caps
        .get(&id)
        .is_ok_and(|c| c.error.is_some_and(|e| e.contains("VMM exited"))));
    let err = caps
        .resume(&id)
        .await
        .expect_err("a failed capsule does not resume");
    assert_eq!(err.kind(), "invalid_state");
    caps.destroy(&id).await.expect("destroy");
    assert_eq!(world.held(), Held::nothing());
}

#[tokio::test]
async fn a_vmm_dying_while_idle_is_noticed() {
    let (caps, world) = manager();
    let id = caps.create(minimal()).await.expect("create").id;
    world.kill_vmm(vmm_pid(&world, &caps, &id));
    eventually("the capsule is marked failed", || {
        status(&caps, &id) == Some(CapsuleStatus::Error)
    })
    .await;
    eventually("its slot and disk are released", || {
        world.held().slots == 0 && world.held().disks == 0
    })
    .await;
    assert_eq!(
        world.record(&id).map(|r| r.status),
        Some(CapsuleStatus::Error)
    );
    caps.destroy(&id).await.expect("destroy");
    assert_eq!(world.held(), Held::nothing());
}

#[tokio::test]
async fn a_fork_failing_midway_destroys_the_children_it_made() {
    let (caps, world) = manager();
    let parent = caps.create(minimal()).await.expect("create").id;
    world.fail_nth(Point::VmmRestore, 2);
    let err = caps.fork(&parent, 3).await.expect_err("fork must fail");
    assert!(injected(&err), "{err:?}");
    let ids: Vec<CapsuleId> = caps.list().into_iter().map(|c| c.id).collect();
    assert_eq!(
        ids,
        vec![parent.clone()],
        "children outlived the failed fork"
    );
    assert_eq!(world.held(), one_running());
    assert_eq!(status(&caps, &parent), Some(CapsuleStatus::Running));
    vmm_pid(&world, &caps, &parent);

    // A failed copy of the disk leaves the parent running too.
    world.fail(Point::DiskFlatten, 1);
    assert!(caps.fork(&parent, 1).await.is_err());
    vmm_pid(&world, &caps, &parent);
    assert_eq!(world.held(), one_running());

    let children = caps.fork(&parent, 2).await.expect("fork");
    assert_eq!(children.len(), 2);
    for c in &children {
        assert_eq!(c.metadata.get("forked_from"), Some(&parent.to_string()));
    }
    assert_eq!(world.held().vmms, 3);
    assert!(caps.destroy_all().await.is_empty());
    assert_eq!(world.held(), Held::nothing());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_lifecycle_calls_on_one_capsule_serialise() {
    let (caps, world) = manager();
    let id = caps.create(minimal()).await.expect("create").id;
    let mut tasks = Vec::new();
    for i in 0..24 {
        let (caps, id) = (caps.clone(), id.clone());
        tasks.push(tokio::spawn(async move {
            match i % 4 {
                0 => caps.pause(&id).await.map(drop),
                1 => caps.resume(&id).await.map(drop),
                2 => caps
                    .snapshot(&id, &format!("snap-{i}"), false)
                    .await
                    .map(drop),
                _ if i == 23 => caps.destroy(&id).await,
                _ => caps.run(&id, &ExecRequest::default(), None).await.map(drop),
            }
        }));
    }
    for t in tasks {
        match t.await.expect("join") {
            Ok(()) => {}
            Err(e) => assert!(
                matches!(e.kind(), "invalid_state" | "not_found"),
                "unexpected error {e:?}"
            ),
        }
    }
    // Whatever ran, the capsule is destroyed or in a settled state; nothing is half-done.
    if let Ok(c) = caps.get(&id) {
        assert!(
            matches!(c.status, CapsuleStatus::Running | CapsuleStatus::Paused),
            "left {:?}",
            c.status
        );
        caps.destroy(&id).await.expect("destroy");
    }
    assert_eq!(world.held(), Held::nothing());
}

#[tokio::test]
async fn recovery_keeps_paused_capsules_of_dead_owners_and_removes_the_rest() {
    let (caps, world) = manager();
    let kept = caps.create(minimal()).await.expect("create").id;
    caps.pause(&kept).await.expect("pause");
    let gone = caps.create(minimal()).await.expect("create").id;
    // Another manager takes over after this one's process "died" mid-run.
    let dead = crate::record::Owner {
        pid: 9,
        start_time: 9,
    };
    for id in [&kept, &gone] {
        let mut rec = world.record(id).expect("record");
        rec.owner = dead.clone();
        if id == &kept {
            // It died while resuming: the record says so, the snapshot is intact.
            rec.status = CapsuleStatus::Resuming;
        }
        world.put_record(rec);
    }
    world.bury(dead);
    let fresh = Capsules::new(
        Fakes {
            world: world.clone(),
        }
        .parts(),
        ManagerConfig::default(),
    );
    let report = fresh.recover().await.expect("recover");
    assert_eq!(
        (report.paused, report.removed_capsules),
        (1, 1),
        "{report:?}"
    );
    assert!(world.record(&gone).is_none());
    let rec = world.record(&kept).expect("kept");
    assert_eq!(rec.status, CapsuleStatus::Paused);
    assert!(rec.slot.is_none() && rec.disk.is_none() && rec.vmm_pid.is_none());
    let info = fresh.resume(&kept).await.expect("adopted and resumed");
    assert_eq!(info.status, CapsuleStatus::Running);
    fresh.destroy(&kept).await.expect("destroy");
    drop(caps);
}

#[test]
fn illegal_transitions_change_nothing() {
    let mut rec = CapsuleRecord {
        status: CapsuleStatus::Stopped,
        ..crate::testing::record("minimal")
    };
    let err = rec
        .transition(CapsuleStatus::Running)
        .expect_err("stopped is final");
    assert_eq!(err.kind(), "invalid_state");
    assert_eq!(rec.status, CapsuleStatus::Stopped);
    let mut rec = crate::testing::record("minimal");
    rec.transition(CapsuleStatus::Running)
        .expect("starting → running");
    assert!(rec.transition(CapsuleStatus::Resuming).is_err());
    assert_eq!(rec.status, CapsuleStatus::Running);
}

#[tokio::test]
async fn vm_starts_beyond_the_limit_wait_their_turn() {
    let fakes = Fakes::new();
    let config = ManagerConfig {
        pool_memory_budget_mb: 0,
        max_concurrent_starts: 1,
        ..ManagerConfig::default()
    };
    let (caps, world) = (Capsules::new(fakes.parts(), config), fakes.world);
    let gate = world.hold(Point::AgentReady);
    let first = tokio::spawn({
        let caps = caps.clone();
        async move { caps.create(minimal()).await }
    });
    gate.reached().await;
    let second = tokio::spawn({
        let caps = caps.clone();
        async move { caps.create(minimal()).await }
    });
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
    assert_eq!(
        world.calls(Point::NetAllocate),
        1,
        "the second start did not wait"
    );
    gate.open();
    first.await.expect("join").expect("first create");
    second.await.expect("join").expect("second create");
    assert_eq!(world.calls(Point::NetAllocate), 2);
    assert!(caps.destroy_all().await.is_empty());
    assert_eq!(world.held(), Held::nothing());
}
