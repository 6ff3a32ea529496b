//! The wrenn-db suite, run against a real SQLite file and a real PostgreSQL database.

#![allow(clippy::tests_outside_test_module)] // integration tests are their own crate

mod harness;

use harness::TestDb;
use serde_json::{json, Map};
use std::collections::HashSet;
use wrenn_core::id::CapsuleId;
use wrenn_core::scheduler::HostId;
use wrenn_core::status::CapsuleStatus;
use wrenn_core::template::TemplateName;
use wrenn_db::*;

on_both_backends!(
    migrations_apply_twice,
    users_crud_and_passwords,
    teams_and_memberships,
    api_keys_create_lookup_last_used,
    capsules_lifecycle,
    deadline_timeouts_ignore_activity,
    templates_unique_per_team,
    tenancy_isolation,
    audit_keyset_pagination,
    bootstrap_is_idempotent,
    bootstrap_with_random_key,
    hosts_and_where_things_live,
    platform_audit_is_apart_from_teams,
    host_refresh_tokens_are_single_use,
    join_tokens_register_up_to_their_limit,
    template_builds_queue_log_and_end,
    template_build_requests_and_uploads,
    channels_and_their_delivery_outbox,
    team_samples_peaks_and_daily_usage,
);

/// Team load samples: running capsules count vCPUs and memory, paused ones half their
/// memory; one row per team and slot (a second recorder's is a no-op); peaks and the
/// daily roll-up come from them, per team.
async fn team_samples_peaks_and_daily_usage(t: &TestDb) {
    let db = &t.db;
    let (_, a) = team_of(db, "sa@example.com").await;
    let (_, b) = team_of(db, "sb@example.com").await;
    // a: one running (2 vCPUs, 512 MiB) and one paused (512 MiB); b: one paused.
    db.insert_capsule(&a.id, new_capsule(CapsuleStatus::Running))
        .await
        .unwrap();
    db.insert_capsule(&a.id, new_capsule(CapsuleStatus::Paused))
        .await
        .unwrap();
    db.insert_capsule(&a.id, new_capsule(CapsuleStatus::Stopped))
        .await
        .unwrap();
    db.insert_capsule(&b.id, new_capsule(CapsuleStatus::Paused))
        .await
        .unwrap();
    let since = now() - chrono::Duration::minutes(1);
    assert!(db.record_team_samples().await.unwrap() >= 2);
    // The same slot again: nothing new (unless the clock crossed into the next slot).
    db.record_team_samples().await.unwrap();
    let sa = db.team_samples(&a.id, since).await.unwrap();
    assert!(!sa.is_empty() && sa.len() <= 2, "{sa:?}");
    let want_a = Load {
        running_count: 1,
        vcpus: 2,
        memory_mb: 512 + 256,
    };
    assert_eq!(sa[0].load, want_a);
    assert_eq!(sa[0].at, slot_of(sa[0].at));
    let sb = db.team_samples(&b.id, since).await.unwrap();
    assert_eq!(
        sb[0].load,
        Load {
            running_count: 0,
            vcpus: 0,
            memory_mb: 256
        }
    );
    assert_eq!(db.team_peaks(&a.id, since).await.unwrap(), want_a);
    let (_, c) = team_of(db, "sc@example.com").await;
    assert_eq!(db.team_peaks(&c.id, since).await.unwrap(), Load::default());
    assert!(db.team_samples(&c.id, since).await.unwrap().is_empty());

    // Usage: today from the samples, a sample being 10 s.
    let today = now().date_naive();
    let usage = db.team_daily_usage(&a.id, today, today).await.unwrap();
    assert_eq!(usage.len(), 1);
    let n = sa.len() as f64;
    assert!(
        (usage[0].cpu_minutes - n * 2.0 * 10.0 / 60.0).abs() < 1e-3,
        "{usage:?}"
    );
    assert!((usage[0].ram_mb_minutes - n * 768.0 * 10.0 / 60.0).abs() < 1e-3);
    // A rolled-up day is read back from daily_usage (rolling twice replaces it).
    assert!(db.roll_up_usage(today).await.unwrap() >= 2);
    assert!(db.roll_up_usage(today).await.unwrap() >= 2);
    let yesterday = today.pred_opt().unwrap();
    assert!(db
        .team_daily_usage(&a.id, yesterday, yesterday)
        .await
        .unwrap()
        .is_empty());
    let ub = db.team_daily_usage(&b.id, today, today).await.unwrap();
    assert_eq!(ub.len(), 1);
    assert_eq!(ub[0].cpu_minutes, 0.0);
    // Old samples go.
    assert_eq!(db.prune_team_samples(since).await.unwrap(), 0);
    assert!(
        db.prune_team_samples(now() + chrono::Duration::minutes(1))
            .await
            .unwrap()
            >= 2
    );
    assert!(db.team_samples(&a.id, since).await.unwrap().is_empty());
}

/// Channels are per team with unique names; an event is queued for the channels that
/// take its type; a claimed delivery is leased (nobody else takes it), attempts are
/// counted, a retry comes due later, and deleting the channel takes its deliveries.
async fn channels_and_their_delivery_outbox(t: &TestDb) {
    let db = &t.db;
    let (_, a) = team_of(db, "cha@example.com").await;
    let (_, b) = team_of(db, "chb@example.com").await;
    let new = |name: &str, types: &[&str]| NewChannel {
        id: new_id(prefix::CHANNEL),
        name: name.into(),
        provider: "webhook".into(),
        config: "sealed".into(),
        event_types: types.iter().map(|s| s.to_string()).collect(),
        created_by: None,
    };
    let paused = db
        .insert_channel(&a.id, new("ops", &["capsule.paused"]))
        .await
        .unwrap();
    assert!(paused.id.starts_with("ch-"));
    assert!(db
        .insert_channel(&a.id, new("ops", &["capsule.paused"]))
        .await
        .unwrap_err()
        .is_conflict());
    // Names are per team.
    db.insert_channel(&b.id, new("ops", &["capsule.paused"]))
        .await
        .unwrap();
    let all = db
        .insert_channel(&a.id, new("all", &["capsule.paused", "capsule.created"]))
        .await
        .unwrap();
    assert!(db
        .get_channel(&b.id, &paused.id)
        .await
        .unwrap_err()
        .is_not_found());
    assert_eq!(db.list_channels(&a.id).await.unwrap().len(), 2);
    let renamed = db
        .update_channel(
            &a.id,
            &all.id,
            ChannelUpdate {
                name: Some("everything".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(renamed.name, "everything");
    assert_eq!(renamed.event_types, all.event_types);
    assert!(db
        .update_channel(&b.id, &all.id, ChannelUpdate::default())
        .await
        .unwrap_err()
        .is_not_found());

    // Queued for the channels that take the type, in the team only.
    let q = db
        .queue_deliveries(&a.id, "capsule.created", "{}")
        .await
        .unwrap();
    assert_eq!(q.len(), 1);
    assert_eq!(q[0].channel_id, all.id);
    let q = db
        .queue_deliveries(&a.id, "capsule.paused", r#"{"n":2}"#)
        .await
        .unwrap();
    assert_eq!(q.len(), 2);

    // Claims: each delivery once while leased.
    let lease = std::time::Duration::from_secs(60);
    let mut claimed = HashSet::new();
    while let Some((d, c)) = db.claim_delivery(lease).await.unwrap() {
        assert_eq!(c.id, d.channel_id);
        assert_eq!(d.status, DeliveryStatus::Pending);
        assert!(claimed.insert(d.id.clone()), "claimed twice: {}", d.id);
    }
    assert_eq!(claimed.len(), 3);
    // A failed attempt with a retry: pending again, due later (not claimable now).
    let first = q[0].id.clone();
    let later = now() + chrono::Duration::seconds(30);
    let d = db
        .record_attempt(
            &first,
            Attempt {
                ok: false,
                status: Some(500),
                error: Some("the receiver answered 500".into()),
                retry_at: Some(later),
            },
        )
        .await
        .unwrap();
    assert_eq!(
        (d.status, d.attempts, d.last_status),
        (DeliveryStatus::Pending, 1, Some(500))
    );
    assert!(db.claim_delivery(lease).await.unwrap().is_none());
    // Due now: claimable again; then delivered.
    db.record_attempt(
        &first,
        Attempt {
            ok: false,
            status: None,
            error: Some("timeout".into()),
            retry_at: Some(now()),
        },
    )
    .await
    .unwrap();
    let (again, _) = db.claim_delivery(lease).await.unwrap().expect("due again");
    assert_eq!((again.id.as_str(), again.attempts), (first.as_str(), 2));
    let done = db
        .record_attempt(
            &first,
            Attempt {
                ok: true,
                status: Some(204),
                error: None,
                retry_at: None,
            },
        )
        .await
        .unwrap();
    assert_eq!(done.status, DeliveryStatus::Delivered);
    assert_eq!(done.attempts, 3);
    assert!(done.delivered_at.is_some());
    // Out of attempts: failed.
    let failed = db
        .record_attempt(
            &q[1].id,
            Attempt {
                ok: false,
                status: Some(502),
                error: Some("bad gateway".into()),
                retry_at: None,
            },
        )
        .await
        .unwrap();
    assert_eq!(failed.status, DeliveryStatus::Failed);

    let listed = db.list_deliveries(&a.id, &paused.id, 10).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert!(db
        .list_deliveries(&b.id, &paused.id, 10)
        .await
        .unwrap()
        .is_empty());
    // Finished ones expire; pending ones stay.
    assert_eq!(
        db.expire_deliveries(now() + chrono::Duration::seconds(1))
            .await
            .unwrap(),
        2
    );
    // Deleting a channel takes its deliveries; another team cannot.
    assert!(db
        .delete_channel(&b.id, &all.id)
        .await
        .unwrap_err()
        .is_not_found());
    db.delete_channel(&a.id, &all.id).await.unwrap();
    assert!(db
        .get_channel(&a.id, &all.id)
        .await
        .unwrap_err()
        .is_not_found());
    assert!(db
        .list_deliveries(&a.id, &all.id, 10)
        .await
        .unwrap()
        .is_empty());
}

/// Builds requested in two phases: a request reserves the id, uploads are the team's
/// and replaced whole, the steps queue it once under that id; old ones expire.
async fn template_build_requests_and_uploads(t: &TestDb) {
    let db = &t.db;
    let (_, a) = team_of(db, "ua@example.com").await;
    let (_, b) = team_of(db, "ub@example.com").await;
    let req = db
        .insert_build_request(&a.id, "env", 2, 512, None)
        .await
        .unwrap();
    assert!(req.id.starts_with("bld-"));
    assert_eq!(db.get_build_request(&a.id, &req.id).await.unwrap(), req);
    assert!(db
        .get_build_request(&b.id, &req.id)
        .await
        .unwrap_err()
        .is_not_found());

    let f = |path: &str, data: &[u8]| BuildFile {
        path: path.into(),
        mode: 0o755,
        data: data.to_vec(),
    };
    assert!(!db.template_upload_present(&a.id, "h1").await.unwrap());
    db.put_template_upload(&a.id, "h1", vec![f("x", b"1"), f("d/y", b"2")])
        .await
        .unwrap();
    db.put_template_upload(&a.id, "h1", vec![f("x", b"one")])
        .await
        .unwrap();
    assert!(db.template_upload_present(&a.id, "h1").await.unwrap());
    assert!(!db.template_upload_present(&b.id, "h1").await.unwrap());
    assert_eq!(
        db.template_upload_files(&a.id, "h1").await.unwrap(),
        vec![f("x", b"one")]
    );
    assert!(db
        .template_upload_files(&b.id, "h1")
        .await
        .unwrap()
        .is_empty());

    let new = NewBuild {
        name: "env".into(),
        base_template: "base".into(),
        recipe: vec!["COPY h1/x /x".into()],
        healthcheck: None,
        vcpus: 2,
        memory_mb: 512,
        skip_pre_post: false,
        timeout_sec: 3600,
        metadata: Map::new(),
        created_by: None,
    };
    assert!(db
        .start_build_request(&b.id, &req.id, new.clone(), vec![])
        .await
        .unwrap_err()
        .is_not_found());
    let build = db
        .start_build_request(&a.id, &req.id, new.clone(), vec![f("h1/x", b"one")])
        .await
        .unwrap();
    assert_eq!(
        (build.id.as_str(), build.status),
        (req.id.as_str(), BuildStatus::Pending)
    );
    assert_eq!(
        db.build_files(&build.id).await.unwrap(),
        vec![f("h1/x", b"one")]
    );
    assert!(db
        .start_build_request(&a.id, &req.id, new, vec![])
        .await
        .unwrap_err()
        .is_not_found());
    assert!(db
        .get_build_request(&a.id, &req.id)
        .await
        .unwrap_err()
        .is_not_found());

    let waiting = db
        .insert_build_request(&a.id, "other", 1, 256, None)
        .await
        .unwrap();
    assert_eq!(
        db.expire_template_uploads(now() - std::time::Duration::from_secs(60))
            .await
            .unwrap(),
        0
    );
    let later = now() + std::time::Duration::from_secs(60);
    assert_eq!(db.expire_template_uploads(later).await.unwrap(), 2);
    assert!(!db.template_upload_present(&a.id, "h1").await.unwrap());
    assert!(db
        .get_build_request(&a.id, &waiting.id)
        .await
        .unwrap_err()
        .is_not_found());
    // The queued build keeps its own copy of the files.
    assert_eq!(db.build_files(&build.id).await.unwrap().len(), 1);
}

/// Builds: queued with their files, claimed by exactly one of racing workers, logged
/// in order, cancelled, ended once, seen only by their team.
async fn template_builds_queue_log_and_end(t: &TestDb) {
    let db = &t.db;
    let (_, a) = team_of(db, "ba@example.com").await;
    let (_, b) = team_of(db, "bb@example.com").await;
    let new = |name: &str| NewBuild {
        name: name.into(),
        base_template: "minimal".into(),
        recipe: vec!["RUN true".into(), "COPY a.txt /a.txt".into()],
        healthcheck: None,
        vcpus: 1,
        memory_mb: 512,
        skip_pre_post: true,
        timeout_sec: 600,
        metadata: Map::new(),
        created_by: None,
    };
    let file = BuildFile {
        path: "a.txt".into(),
        mode: 0o640,
        data: vec![0, 1, 2, 255],
    };
    let first = db
        .insert_build(&a.id, new("one"), vec![file.clone()])
        .await
        .unwrap();
    assert!(first.id.starts_with("bld-"));
    assert_eq!(first.status, BuildStatus::Pending);
    assert_eq!((first.current_step, first.total_steps), (0, 2));
    assert_eq!(first.recipe[1], "COPY a.txt /a.txt");
    let second = db.insert_build(&a.id, new("two"), vec![]).await.unwrap();
    assert!(db
        .get_build(Some(&b.id), &first.id)
        .await
        .unwrap_err()
        .is_not_found());
    assert!(db.list_builds(Some(&b.id), 10).await.unwrap().is_empty());
    assert_eq!(db.list_builds(None, 10).await.unwrap().len(), 2);
    assert_eq!(db.build_files(&first.id).await.unwrap(), vec![file]);

    // Three racing workers: each build goes to one of them, the oldest first.
    let (x, y, z) = tokio::join!(db.claim_build(), db.claim_build(), db.claim_build());
    let mut got: Vec<String> = [x, y, z]
        .into_iter()
        .filter_map(|r| r.unwrap().map(|b| b.id))
        .collect();
    got.sort();
    let mut want = vec![first.id.clone(), second.id.clone()];
    want.sort();
    assert_eq!(got, want);
    assert!(db.claim_build().await.unwrap().is_none());

    db.build_progress(&first.id, 1, Some(("cl-x", "local")))
        .await
        .unwrap();
    let lines: Vec<_> = (0..5)
        .map(|i| (1, LogStream::Stdout, format!("line {i}")))
        .collect();
    db.append_build_logs(&first.id, 0, &lines[..3])
        .await
        .unwrap();
    db.append_build_logs(&first.id, 3, &lines[3..])
        .await
        .unwrap();
    let tail = db.build_logs(&first.id, 2, 100).await.unwrap();
    assert_eq!(
        tail.iter().map(|l| l.line.as_str()).collect::<Vec<_>>(),
        ["line 2", "line 3", "line 4"]
    );
    assert_eq!(tail[0].seq, 2);
    let last = db.build_log_tail(&first.id, 2).await.unwrap();
    assert_eq!(
        last.iter().map(|l| l.line.as_str()).collect::<Vec<_>>(),
        ["line 3", "line 4"]
    );

    // A running build is cancelled by asking its worker; an ended one stays ended.
    let asked = db.cancel_build(Some(&a.id), &second.id).await.unwrap();
    assert!(asked.cancel_requested);
    assert_eq!(asked.status, BuildStatus::Running);
    let end = |status| BuildEnd {
        status,
        error: None,
        template_id: Some("tpl-x".into()),
        default_user: Some("user".into()),
        default_env: json!({"A": "1"}).as_object().cloned().unwrap(),
    };
    assert!(db
        .finish_build(&first.id, end(BuildStatus::Success))
        .await
        .unwrap());
    assert!(!db
        .finish_build(&first.id, end(BuildStatus::Failed))
        .await
        .unwrap());
    let done = db.get_build(Some(&a.id), &first.id).await.unwrap();
    assert_eq!(done.status, BuildStatus::Success);
    assert_eq!(done.capsule_id, None);
    assert_eq!(done.host_id.as_deref(), Some("local"));
    assert_eq!(done.default_env["A"], "1");
    assert!(db.build_files(&first.id).await.unwrap().is_empty());

    // A worker that went silent: its running build is stale.
    let later = now() + std::time::Duration::from_secs(120);
    let stale: Vec<_> = db
        .stale_builds(later)
        .await
        .unwrap()
        .into_iter()
        .map(|b| b.id)
        .collect();
    assert_eq!(stale, vec![second.id.clone()]);

    // A queued build is cancelled at once.
    let third = db.insert_build(&a.id, new("three"), vec![]).await.unwrap();
    let c = db.cancel_build(None, &third.id).await.unwrap();
    assert_eq!(c.status, BuildStatus::Cancelled);
    assert!(db.claim_build().await.unwrap().is_none());
}

/// A join token creates hosts up to its limit (racing registrations included), a taken
/// host id is a conflict that uses nothing up, and revoked or expired tokens fail.
async fn join_tokens_register_up_to_their_limit(t: &TestDb) {
    let db = &t.db;
    let specs = HostSpecs {
        arch: "x86_64".into(),
        cpu_cores: 4,
        memory_mb: 8192,
        disk_gb: 50,
    };
    let hour = std::time::Duration::from_secs(3600);
    let (row, token) = db.create_join_token(Some(2), hour, None).await.unwrap();
    assert!(token.starts_with("hjoin-") && row.used == 0 && row.max_hosts == Some(2));
    let first = db
        .join_host(&token, "node-a", "10.0.0.1:7070", &specs)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first.id.0, "node-a");
    assert!(matches!(
        db.join_host(&token, "node-a", "10.0.0.9:7070", &specs)
            .await,
        Err(DbError::Conflict { .. })
    ));
    let (b, c) = tokio::join!(
        db.join_host(&token, "node-b", "10.0.0.2:7070", &specs),
        db.join_host(&token, "node-c", "10.0.0.3:7070", &specs)
    );
    let (b, c) = (b.unwrap(), c.unwrap());
    assert!(
        b.is_ok() != c.is_ok(),
        "the limit holds under a race: {b:?} {c:?}"
    );
    let listed = db.join_tokens().await.unwrap();
    assert_eq!(
        listed.iter().find(|j| j.id == row.id).map(|j| j.used),
        Some(2)
    );

    let (other, other_token) = db.create_join_token(None, hour, None).await.unwrap();
    assert!(db.delete_join_token(&other.id).await.unwrap());
    assert!(!db.delete_join_token(&other.id).await.unwrap());
    assert_eq!(
        db.join_host(&other_token, "node-d", "10.0.0.4:7070", &specs)
            .await
            .unwrap(),
        Err(BadHostToken)
    );
    let (_, expired) = db
        .create_join_token(None, std::time::Duration::ZERO, None)
        .await
        .unwrap();
    assert_eq!(
        db.join_host(&expired, "node-e", "10.0.0.5:7070", &specs)
            .await
            .unwrap(),
        Err(BadHostToken)
    );
    for id in ["node-a", "node-b", "node-c"] {
        let _ = db.delete_host(id).await;
    }
}

/// Platform events are read by scope: never in a team's log, all of them with the
/// teams' in the global one.
async fn platform_audit_is_apart_from_teams(t: &TestDb) {
    let db = &t.db;
    let (_, a) = team_of(db, "paudit@example.com").await;
    let at = now();
    let team_row = db
        .insert_audit(&a.id, audit("capsule.create", Some(at)))
        .await
        .unwrap();
    let platform_row = db
        .insert_platform_audit(NewAuditEntry {
            actor: Actor::System,
            actor_name: None,
            result: AuditResult::Failure,
            resource_type: "host".into(),
            metadata: Some(json!({"address": "10.0.0.1:7070"})),
            ..audit(
                "host.register",
                Some(at + chrono::Duration::microseconds(1)),
            )
        })
        .await
        .unwrap();
    assert_eq!(platform_row.team_id, None);
    assert_eq!(platform_row.result, AuditResult::Failure);
    let q = AuditQuery::default();
    let team = db.list_audit(&a.id, &q).await.unwrap().items;
    assert_eq!(team, vec![team_row.clone()]);
    let platform = db.list_audit_in(AuditScope::Platform, &q).await.unwrap();
    assert_eq!(platform.items, vec![platform_row.clone()]);
    let all = db.list_audit_in(AuditScope::All, &q).await.unwrap().items;
    assert_eq!(
        all,
        vec![platform_row, team_row],
        "newest first across both"
    );
    let by_action = AuditQuery {
        action: Some("host.register".into()),
        ..AuditQuery::default()
    };
    assert_eq!(
        db.list_audit_in(AuditScope::All, &by_action)
            .await
            .unwrap()
            .items
            .len(),
        1
    );
}

/// A refresh token works once (racing uses: one wins) and its successor works next.
async fn host_refresh_tokens_are_single_use(t: &TestDb) {
    let db = &t.db;
    let (h, _) = db
        .create_host(&NewHost {
            team_id: None,
            provider: None,
            availability_zone: None,
            created_by: None,
        })
        .await
        .unwrap();
    assert!(matches!(
        db.new_host_refresh_token("host-none").await,
        Err(DbError::NotFound { .. })
    ));
    let first = db.new_host_refresh_token(&h.id.0).await.unwrap();
    let (a, b) = tokio::join!(
        db.redeem_host_refresh_token(&first),
        db.redeem_host_refresh_token(&first)
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    assert!(
        a.is_ok() != b.is_ok(),
        "exactly one of two racing uses wins"
    );
    let (host, second) = a.or(b).unwrap();
    assert_eq!(host.id, h.id);
    assert_ne!(second, first);
    assert_eq!(
        db.redeem_host_refresh_token(&first).await.unwrap(),
        Err(BadRefreshToken)
    );
    assert!(db.redeem_host_refresh_token(&second).await.unwrap().is_ok());
    assert_eq!(
        db.redeem_host_refresh_token("hrt-unknown").await.unwrap(),
        Err(BadRefreshToken)
    );
    assert!(db.delete_host(&h.id.0).await.unwrap());
}

/// Hosts are recorded (specs kept when a start reports none), and capsule and snapshot
/// rows name the host that holds them.
async fn hosts_and_where_things_live(t: &TestDb) {
    let db = &t.db;
    assert!(db.system_hosts().await.unwrap().is_empty());
    let local = HostId(LOCAL_HOST.into());
    let specs = HostSpecs {
        arch: "x86_64".into(),
        cpu_cores: 2,
        memory_mb: 24_576,
        disk_gb: 250,
    };
    let h = db
        .system_host_online(&local, None, Some(&specs))
        .await
        .unwrap();
    assert_eq!(
        (
            h.id.clone(),
            h.status,
            h.arch.as_deref(),
            h.cpu_cores,
            h.memory_mb,
            h.disk_gb
        ),
        (
            local.clone(),
            HostStatus::Online,
            Some("x86_64"),
            Some(2),
            Some(24_576),
            Some(250)
        )
    );
    assert!(h.last_heartbeat_at.is_some() && h.address.is_none() && h.team_id.is_none());
    // A restart that does not report specs keeps the known ones.
    std::thread::sleep(std::time::Duration::from_millis(5));
    let again = db.system_host_online(&local, None, None).await.unwrap();
    assert_eq!((again.arch, again.memory_mb), (h.arch.clone(), h.memory_mb));
    assert!(again.updated_at > h.updated_at);
    assert_eq!(again.created_at, h.created_at);
    let other = HostId("host-b".into());
    db.system_host_online(&other, Some("http://10.0.0.2:50051"), None)
        .await
        .unwrap();
    // Silent: unreachable (once); heard from again: online, address kept.
    assert!(db.system_host_unreachable(&other).await.unwrap());
    assert!(!db.system_host_unreachable(&other).await.unwrap());
    let b = db.system_host("host-b").await.unwrap();
    assert_eq!(
        (b.status, b.address.as_deref()),
        (HostStatus::Unreachable, Some("http://10.0.0.2:50051"))
    );
    let back = db.system_host_online(&other, None, None).await.unwrap();
    assert_eq!(
        (back.status, back.address.as_deref()),
        (HostStatus::Online, Some("http://10.0.0.2:50051"))
    );
    assert!(db
        .system_host("host-nope")
        .await
        .expect_err("unknown host")
        .is_not_found());
    let ids: Vec<HostId> = db
        .system_hosts()
        .await
        .unwrap()
        .into_iter()
        .map(|h| h.id)
        .collect();
    assert_eq!(ids, vec![other.clone(), local.clone()]);

    let (_, team) = team_of(db, "hosts@example.com").await;
    let on_b = db
        .insert_capsule(
            &team.id,
            NewCapsule {
                host_id: other.clone(),
                ..new_capsule(CapsuleStatus::Running)
            },
        )
        .await
        .unwrap();
    assert_eq!(on_b.host_id, other);
    let read = db.get_capsule(&team.id, on_b.id.as_str()).await.unwrap();
    assert_eq!(read.host_id, other);
    assert_eq!(
        db.system_host_capsules("host-b").await.unwrap(),
        vec![on_b.id.to_string()]
    );
    assert!(db.system_host_capsules("local").await.unwrap().is_empty());
    let listed = db.system_live_capsules().await.unwrap();
    assert_eq!(
        listed
            .iter()
            .find(|c| c.id == on_b.id)
            .map(|c| c.host_id.clone()),
        Some(other)
    );

    let snap = db
        .insert_template(&team.id, new_template("snap-one"))
        .await
        .unwrap();
    assert_eq!(snap.host_id, Some(HostId("host-a".into())));
    let (old, new) = db
        .replace_template(
            &team.id,
            NewTemplate {
                host_id: Some(local.clone()),
                ..new_template("snap-one")
            },
        )
        .await
        .unwrap();
    assert_eq!(
        (old.host_id, new.host_id),
        (Some(HostId("host-a".into())), Some(local))
    );
}

async fn user(db: &Db, email: &str) -> User {
    db.create_user(email, "Someone", None, false).await.unwrap()
}

async fn team_of(db: &Db, email: &str) -> (User, Team) {
    let u = user(db, email).await;
    let t = db.create_team("Team", &u.id).await.unwrap();
    (u, t)
}

fn new_capsule(status: CapsuleStatus) -> NewCapsule {
    let mut metadata = Map::new();
    metadata.insert("envd_version".into(), json!("0.1.0"));
    NewCapsule {
        id: CapsuleId::random(),
        status,
        template: "minimal".into(),
        vcpus: 2,
        memory_mb: 512,
        timeout_sec: 300,
        metadata,
        envd_access_token: Some("secret-token".into()),
        pause_on_timeout: true,
        disk_mb: 2048,
        deadline: false,
        timeout_pause_memory: true,
        auto_resume: false,
        network: Default::default(),
        public_traffic: true,
        traffic_access_token: None,
        host_id: HostId(wrenn_db::LOCAL_HOST.into()),
    }
}

fn new_template(name: &str) -> NewTemplate {
    NewTemplate {
        name: TemplateName::parse(name).unwrap(),
        kind: TemplateKind::Snapshot,
        source_capsule: None,
        vcpus: Some(1),
        memory_mb: Some(512),
        size_bytes: 5 << 30,
        metadata: Map::new(),
        host_id: Some(HostId("host-a".into())),
    }
}

fn audit(action: &str, at: Option<Timestamp>) -> NewAuditEntry {
    NewAuditEntry {
        actor: Actor::ApiKey { id: "key-x".into() },
        actor_name: Some("ci".into()),
        action: action.into(),
        resource_type: "capsule".into(),
        resource_id: Some("cl-x".into()),
        result: AuditResult::Success,
        metadata: Some(json!({"n": 1})),
        created_at: at,
    }
}

async fn migrations_apply_twice(t: &TestDb) {
    t.db.migrate().await.unwrap();
    let again = Db::open(&t.url).await.unwrap();
    again.migrate().await.unwrap();
    let n: i64 = sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM _sqlx_migrations")
        .fetch_one(&raw_pool(&t.url).await)
        .await
        .unwrap();
    // Each embedded migration is recorded once, however often `migrate` runs.
    let scripts = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations/sqlite"))
        .unwrap()
        .count();
    assert_eq!(n, scripts as i64);
    if t.db.backend() == Backend::Sqlite {
        let mode: String = sqlx::query_scalar::<_, String>("PRAGMA journal_mode")
            .fetch_one(&raw_pool(&t.url).await)
            .await
            .unwrap();
        assert_eq!(mode, "wal");
    }
    // Data written through one handle is seen through the other.
    user(&t.db, "a@example.com").await;
    assert_eq!(
        again
            .get_user_by_email("a@example.com")
            .await
            .unwrap()
            .email,
        "a@example.com"
    );
    again.close().await;
}

async fn raw_pool(url: &str) -> sqlx::AnyPool {
    sqlx::any::install_default_drivers();
    sqlx::any::AnyPoolOptions::new()
        .max_connections(1)
        .connect(url)
        .await
        .unwrap()
}

async fn users_crud_and_passwords(t: &TestDb) {
    let db = &t.db;
    let u = db
        .create_user(" Alice@Example.COM ", "Alice", Some("correct horse"), false)
        .await
        .unwrap();
    assert!(u.id.starts_with("usr-") && u.id.len() == 4 + 25);
    assert_eq!(u.email, "alice@example.com");
    assert!(u.has_password && !u.is_admin);
    assert_eq!(db.get_user(&u.id).await.unwrap(), u);
    assert_eq!(
        db.get_user_by_email("ALICE@example.com").await.unwrap().id,
        u.id
    );

    let err = db
        .create_user("alice@EXAMPLE.com", "Other", None, false)
        .await
        .unwrap_err();
    assert!(
        matches!(err, DbError::Conflict { what: "email" }),
        "{err:?}"
    );
    let err = db
        .create_user("not-an-email", "X", None, false)
        .await
        .unwrap_err();
    assert!(matches!(err, DbError::InvalidInput { .. }), "{err:?}");

    assert_eq!(
        db.verify_password("alice@example.com", "correct horse")
            .await
            .unwrap()
            .map(|u| u.id),
        Some(u.id.clone())
    );
    assert_eq!(
        db.verify_password("alice@example.com", "wrong")
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        db.verify_password("nobody@example.com", "correct horse")
            .await
            .unwrap(),
        None
    );

    db.set_password(&u.id, "battery staple").await.unwrap();
    assert!(db
        .verify_password("alice@example.com", "correct horse")
        .await
        .unwrap()
        .is_none());
    assert!(db
        .verify_password("alice@example.com", "battery staple")
        .await
        .unwrap()
        .is_some());

    let renamed = db.rename_user(&u.id, "Alice B.").await.unwrap();
    assert_eq!(renamed.name, "Alice B.");
    assert!(renamed.updated_at >= u.updated_at);

    let found = db.search_users_by_email("ali", 10).await.unwrap();
    assert_eq!(found.len(), 1);
    assert!(db.search_users_by_email("a%", 10).await.unwrap().is_empty());

    db.delete_user(&u.id).await.unwrap();
    assert!(db.get_user(&u.id).await.unwrap_err().is_not_found());
    assert!(db.delete_user(&u.id).await.unwrap_err().is_not_found());
    assert!(db
        .set_password(&u.id, "x")
        .await
        .unwrap_err()
        .is_not_found());
}

async fn teams_and_memberships(t: &TestDb) {
    let db = &t.db;
    let (owner, team) = team_of(db, "owner@example.com").await;
    assert!(team.id.starts_with("team-"));
    let (a, b) = team.slug.split_once('-').unwrap();
    assert!(a.len() == 6 && b.len() == 6);
    assert!(team
        .slug
        .bytes()
        .all(|c| c == b'-' || c.is_ascii_hexdigit()));

    let teams = db.teams_of_user(&owner.id).await.unwrap();
    assert_eq!(teams.len(), 1);
    assert_eq!(teams[0].role, Role::Owner);
    assert!(teams[0].is_default);
    let second = db.create_team("Second", &owner.id).await.unwrap();
    let teams = db.teams_of_user(&owner.id).await.unwrap();
    assert_eq!(teams.len(), 2);
    assert_eq!(teams.iter().filter(|t| t.is_default).count(), 1);
    assert_eq!(
        db.default_team(&owner.id).await.unwrap().unwrap().team.id,
        team.id
    );

    let m = user(db, "member@example.com").await;
    db.add_member(&team.id, &m.id, Role::Member).await.unwrap();
    let err = db
        .add_member(&team.id, &m.id, Role::Admin)
        .await
        .unwrap_err();
    assert!(
        matches!(err, DbError::Conflict { what: "membership" }),
        "{err:?}"
    );
    let err = db
        .add_member(&team.id, "usr-nobody", Role::Admin)
        .await
        .unwrap_err();
    assert!(err.is_not_found(), "{err:?}");
    assert_eq!(db.member_role(&team.id, &m.id).await.unwrap(), Role::Member);
    db.set_member_role(&team.id, &m.id, Role::Admin)
        .await
        .unwrap();
    assert_eq!(db.member_role(&team.id, &m.id).await.unwrap(), Role::Admin);

    let members = db.list_members(&team.id).await.unwrap();
    assert_eq!(
        members.iter().map(|m| m.email.as_str()).collect::<Vec<_>>(),
        ["owner@example.com", "member@example.com"]
    );

    assert_eq!(
        db.get_team_for_member(&team.id, &m.id).await.unwrap().role,
        Role::Admin
    );
    assert!(db
        .get_team_for_member(&second.id, &m.id)
        .await
        .unwrap_err()
        .is_not_found());
    assert!(db
        .member_role(&second.id, &m.id)
        .await
        .unwrap_err()
        .is_not_found());

    assert_eq!(
        db.rename_team(&team.id, "Renamed").await.unwrap().name,
        "Renamed"
    );
    assert!(matches!(
        db.rename_team(&team.id, " ").await.unwrap_err(),
        DbError::InvalidInput { .. }
    ));

    db.remove_member(&team.id, &m.id).await.unwrap();
    assert!(db
        .remove_member(&team.id, &m.id)
        .await
        .unwrap_err()
        .is_not_found());

    db.delete_team(&second.id).await.unwrap();
    assert!(db.get_team(&second.id).await.unwrap_err().is_not_found());
    assert_eq!(db.teams_of_user(&owner.id).await.unwrap().len(), 1);
}

async fn api_keys_create_lookup_last_used(t: &TestDb) {
    let db = &t.db;
    let (owner, team) = team_of(db, "keys@example.com").await;
    let created = db
        .create_api_key(&team.id, "ci", Some(&owner.id))
        .await
        .unwrap();
    assert!(validate_api_key(&created.key).is_ok());
    assert!(created.api_key.id.starts_with("key-"));
    assert_eq!(created.api_key.key_prefix, created.key[..10]);
    assert_eq!(
        created.api_key.creator_email.as_deref(),
        Some("keys@example.com")
    );
    assert_eq!(created.api_key.last_used, None);
    assert!(!format!("{created:?}").contains(&created.key));

    let by_hash = db
        .api_key_by_hash(&hash_api_key(&created.key))
        .await
        .unwrap();
    assert_eq!(by_hash, created.api_key);
    assert_eq!(
        by_hash.last_used, None,
        "lookup alone does not count as use"
    );

    let before = now();
    let used = db.authenticate_api_key(&created.key).await.unwrap();
    assert_eq!(used.team_id, team.id);
    let last = used.last_used.expect("last_used set");
    assert!(last >= before);
    assert_eq!(
        db.get_api_key(&team.id, &used.id).await.unwrap().last_used,
        Some(last)
    );

    // The key with its last hex digit changed (to a digit it surely is not).
    let last_digit = if created.key.ends_with('0') { '1' } else { '0' };
    let altered = format!("{}{last_digit}", &created.key[..35]);
    for bad in ["", "wrn_0000", &created.key.to_uppercase(), &altered] {
        assert!(
            db.authenticate_api_key(bad)
                .await
                .unwrap_err()
                .is_not_found(),
            "{bad:?}"
        );
    }

    let given = "wrn_0123456789abcdef0123456789abcdef".to_string();
    db.insert_api_key(&team.id, "given", None, given.clone())
        .await
        .unwrap();
    let err = db
        .insert_api_key(&team.id, "again", None, given)
        .await
        .unwrap_err();
    assert!(
        matches!(err, DbError::Conflict { what: "API key" }),
        "{err:?}"
    );
    assert!(matches!(
        db.insert_api_key(&team.id, "bad", None, "wrn_XYZ".into())
            .await
            .unwrap_err(),
        DbError::InvalidInput { .. }
    ));
    assert!(db
        .create_api_key("team-nope", "x", None)
        .await
        .unwrap_err()
        .is_not_found());

    let list = db.list_api_keys(&team.id).await.unwrap();
    assert_eq!(list.len(), 2);
    db.delete_api_key(&team.id, &created.api_key.id)
        .await
        .unwrap();
    assert!(db
        .authenticate_api_key(&created.key)
        .await
        .unwrap_err()
        .is_not_found());
    assert_eq!(db.list_api_keys(&team.id).await.unwrap().len(), 1);

    // Deleting the creator keeps the key, without a creator.
    db.delete_user(&owner.id).await.unwrap();
    let kept = db.list_api_keys(&team.id).await.unwrap();
    assert_eq!(kept.len(), 1);
    assert_eq!(kept[0].created_by, None);
}

/// A deadline (E2B) capsule's end time is moved by set-timeout only, never by activity;
/// an idle-timeout (Wrenn) capsule's by activity too.
async fn deadline_timeouts_ignore_activity(t: &TestDb) {
    let db = &t.db;
    let (_, team) = team_of(db, "deadline@example.com").await;
    let idle = db
        .insert_capsule(&team.id, new_capsule(CapsuleStatus::Running))
        .await
        .unwrap();
    let deadline = db
        .insert_capsule(
            &team.id,
            NewCapsule {
                deadline: true,
                timeout_pause_memory: false,
                ..new_capsule(CapsuleStatus::Running)
            },
        )
        .await
        .unwrap();
    assert!(!idle.deadline && idle.timeout_pause_memory);
    assert!(deadline.deadline && !deadline.timeout_pause_memory);
    std::thread::sleep(std::time::Duration::from_millis(5));
    let touched = db.touch_capsule(&team.id, idle.id.as_str()).await.unwrap();
    db.touch_capsule(&team.id, deadline.id.as_str())
        .await
        .unwrap();
    let idle_now = db.get_capsule(&team.id, idle.id.as_str()).await.unwrap();
    let deadline_now = db
        .get_capsule(&team.id, deadline.id.as_str())
        .await
        .unwrap();
    assert_eq!(idle_now.last_active_at, Some(touched));
    assert_ne!(idle_now.last_active_at, idle.last_active_at);
    assert_eq!(deadline_now.last_active_at, deadline.last_active_at);
    assert!(deadline_now.deadline);
    let moved = db
        .set_capsule_timeout(&team.id, deadline.id.as_str(), 60)
        .await
        .unwrap();
    assert!(moved.last_active_at > deadline.last_active_at);
    assert_eq!(moved.timeout_sec, 60);
}

async fn capsules_lifecycle(t: &TestDb) {
    let db = &t.db;
    let (_, team) = team_of(db, "caps@example.com").await;
    let new = new_capsule(CapsuleStatus::Starting);
    let id = new.id.clone();
    let c = db.insert_capsule(&team.id, new.clone()).await.unwrap();
    assert_eq!(c.id, id);
    assert_eq!((c.vcpus, c.memory_mb, c.timeout_sec), (2, 512, 300));
    assert_eq!(c.status, CapsuleStatus::Starting);
    assert_eq!(c.started_at, None);
    assert_eq!(c.metadata["envd_version"], "0.1.0");
    assert_eq!(db.get_capsule(&team.id, id.as_str()).await.unwrap(), c);
    assert!(matches!(
        db.insert_capsule(&team.id, new).await.unwrap_err(),
        DbError::Conflict { what: "capsule" }
    ));
    assert!(!format!("{c:?}").contains("secret-token"));
    assert_eq!(
        db.capsule_envd_token(&team.id, id.as_str())
            .await
            .unwrap()
            .as_deref(),
        Some("secret-token")
    );

    let running = db
        .set_capsule_status(&team.id, id.as_str(), CapsuleStatus::Running)
        .await
        .unwrap();
    let started = running.started_at.expect("started_at");
    assert_eq!(running.last_active_at, Some(started));
    db.set_capsule_status(&team.id, id.as_str(), CapsuleStatus::Paused)
        .await
        .unwrap();
    let again = db
        .set_capsule_status(&team.id, id.as_str(), CapsuleStatus::Running)
        .await
        .unwrap();
    assert_eq!(
        again.started_at,
        Some(started),
        "started_at is the first start"
    );

    let touched = db.touch_capsule(&team.id, id.as_str()).await.unwrap();
    assert_eq!(
        db.get_capsule(&team.id, id.as_str())
            .await
            .unwrap()
            .last_active_at,
        Some(touched)
    );
    assert_eq!(
        db.set_capsule_timeout(&team.id, id.as_str(), 60)
            .await
            .unwrap()
            .timeout_sec,
        60
    );
    let mut md = Map::new();
    md.insert("k".into(), json!("v"));
    assert_eq!(
        db.set_capsule_metadata(&team.id, id.as_str(), md.clone())
            .await
            .unwrap()
            .metadata,
        md
    );

    // Idle: not yet at its TTL, then past it.
    assert!(db.system_idle_capsules(now()).await.unwrap().is_empty());
    let later = now() + chrono::Duration::seconds(61);
    let idle = db.system_idle_capsules(later).await.unwrap();
    assert_eq!(
        idle.iter().map(|c| c.id.clone()).collect::<Vec<_>>(),
        std::slice::from_ref(&id)
    );

    let other = db
        .insert_capsule(&team.id, new_capsule(CapsuleStatus::Running))
        .await
        .unwrap();
    assert!(other.started_at.is_some());
    assert_eq!(db.list_capsules(&team.id, false).await.unwrap().len(), 2);
    assert_eq!(db.count_live_capsules(&team.id).await.unwrap(), 2);
    db.system_set_capsule_status(other.id.as_str(), CapsuleStatus::Stopped)
        .await
        .unwrap();
    let listed = db.list_capsules(&team.id, false).await.unwrap();
    assert_eq!(
        listed.iter().map(|c| c.id.clone()).collect::<Vec<_>>(),
        std::slice::from_ref(&id)
    );
    assert_eq!(db.list_capsules(&team.id, true).await.unwrap().len(), 2);
    assert_eq!(db.system_live_capsules().await.unwrap().len(), 1);
    assert_eq!(
        db.system_get_capsule(id.as_str()).await.unwrap().team_id,
        team.id
    );

    db.delete_capsule(&team.id, other.id.as_str())
        .await
        .unwrap();
    assert!(db
        .get_capsule(&team.id, other.id.as_str())
        .await
        .unwrap_err()
        .is_not_found());
    assert!(db
        .insert_capsule("team-nope", new_capsule(CapsuleStatus::Starting))
        .await
        .unwrap_err()
        .is_not_found());
}

async fn templates_unique_per_team(t: &TestDb) {
    let db = &t.db;
    let (_, a) = team_of(db, "ta@example.com").await;
    let (_, b) = team_of(db, "tb@example.com").await;
    let tpl = db
        .insert_template(&a.id, new_template("my-snap"))
        .await
        .unwrap();
    assert!(tpl.id.starts_with("tpl-"));
    assert_eq!(tpl.size_bytes, 5 << 30);
    let err = db
        .insert_template(&a.id, new_template("my-snap"))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            DbError::Conflict {
                what: "template name"
            }
        ),
        "{err:?}"
    );
    db.insert_template(&b.id, new_template("my-snap"))
        .await
        .unwrap();
    let mut base = new_template("base-one");
    base.kind = TemplateKind::Base;
    db.insert_template(&a.id, base).await.unwrap();

    assert_eq!(db.list_templates(&a.id, None).await.unwrap().len(), 2);
    let snaps = db
        .list_templates(&a.id, Some(TemplateKind::Snapshot))
        .await
        .unwrap();
    assert_eq!(
        snaps.iter().map(|t| t.name.as_str()).collect::<Vec<_>>(),
        ["my-snap"]
    );
    assert_eq!(db.get_template(&a.id, "my-snap").await.unwrap(), tpl);
    assert_eq!(db.delete_template(&a.id, "my-snap").await.unwrap(), tpl);
    assert!(db
        .get_template(&a.id, "my-snap")
        .await
        .unwrap_err()
        .is_not_found());
    assert!(db.get_template(&b.id, "my-snap").await.is_ok());
}

async fn tenancy_isolation(t: &TestDb) {
    let db = &t.db;
    let (ua, a) = team_of(db, "a@example.com").await;
    let (_, b) = team_of(db, "b@example.com").await;
    let cap = db
        .insert_capsule(&a.id, new_capsule(CapsuleStatus::Running))
        .await
        .unwrap();
    let cid = cap.id.as_str();
    let tpl = db
        .insert_template(&a.id, new_template("secret-snap"))
        .await
        .unwrap();
    let key = db
        .create_api_key(&a.id, "a-key", Some(&ua.id))
        .await
        .unwrap();
    db.insert_audit(&a.id, audit("capsule.create", None))
        .await
        .unwrap();

    // Team B sees nothing of team A.
    assert!(db.get_capsule(&b.id, cid).await.unwrap_err().is_not_found());
    assert!(db.list_capsules(&b.id, true).await.unwrap().is_empty());
    assert!(db
        .set_capsule_status(&b.id, cid, CapsuleStatus::Stopped)
        .await
        .unwrap_err()
        .is_not_found());
    assert!(db
        .touch_capsule(&b.id, cid)
        .await
        .unwrap_err()
        .is_not_found());
    assert!(db
        .set_capsule_timeout(&b.id, cid, 1)
        .await
        .unwrap_err()
        .is_not_found());
    assert!(db
        .set_capsule_metadata(&b.id, cid, Map::new())
        .await
        .unwrap_err()
        .is_not_found());
    assert!(db
        .capsule_envd_token(&b.id, cid)
        .await
        .unwrap_err()
        .is_not_found());
    assert!(db
        .delete_capsule(&b.id, cid)
        .await
        .unwrap_err()
        .is_not_found());
    assert_eq!(db.count_live_capsules(&b.id).await.unwrap(), 0);

    assert!(db
        .get_template(&b.id, "secret-snap")
        .await
        .unwrap_err()
        .is_not_found());
    assert!(db.list_templates(&b.id, None).await.unwrap().is_empty());
    assert!(db
        .delete_template(&b.id, "secret-snap")
        .await
        .unwrap_err()
        .is_not_found());

    assert!(db
        .get_api_key(&b.id, &key.api_key.id)
        .await
        .unwrap_err()
        .is_not_found());
    assert!(db
        .delete_api_key(&b.id, &key.api_key.id)
        .await
        .unwrap_err()
        .is_not_found());
    assert_eq!(db.list_api_keys(&b.id).await.unwrap().len(), 0);

    let page = db.list_audit(&b.id, &AuditQuery::default()).await.unwrap();
    assert!(page.items.is_empty() && page.next.is_none());

    // Team A's rows are untouched.
    let still = db.get_capsule(&a.id, cid).await.unwrap();
    assert_eq!(still, cap);
    assert_eq!(db.get_template(&a.id, "secret-snap").await.unwrap(), tpl);
    assert!(db.authenticate_api_key(&key.key).await.is_ok());
    assert_eq!(
        db.list_audit(&a.id, &AuditQuery::default())
            .await
            .unwrap()
            .items
            .len(),
        1
    );
}

async fn audit_keyset_pagination(t: &TestDb) {
    let db = &t.db;
    let (_, a) = team_of(db, "audit-a@example.com").await;
    let (_, b) = team_of(db, "audit-b@example.com").await;
    let base = now();
    // 25 rows of team A over 5 distinct timestamps (5 rows share each), and noise from B.
    let mut ids = Vec::new();
    for i in 0..25i64 {
        let at = base + chrono::Duration::microseconds(i / 5);
        let action = if i % 2 == 0 {
            "capsule.create"
        } else {
            "capsule.destroy"
        };
        ids.push(
            db.insert_audit(&a.id, audit(action, Some(at)))
                .await
                .unwrap(),
        );
        db.insert_audit(&b.id, audit(action, Some(at)))
            .await
            .unwrap();
    }
    let mut expected = ids.clone();
    expected.sort_by(|x, y| (y.created_at, &y.id).cmp(&(x.created_at, &x.id)));

    let mut seen = Vec::new();
    let mut query = AuditQuery {
        limit: Some(10),
        ..AuditQuery::default()
    };
    let mut sizes = Vec::new();
    loop {
        let page = db.list_audit(&a.id, &query).await.unwrap();
        sizes.push(page.items.len());
        seen.extend(page.items);
        match page.next {
            Some(cursor) => query.before = Some(cursor),
            None => break,
        }
    }
    assert_eq!(sizes, [10, 10, 5]);
    assert_eq!(
        seen, expected,
        "pages are newest first, with no gap or repeat"
    );
    assert_eq!(seen.iter().map(|e| &e.id).collect::<HashSet<_>>().len(), 25);
    assert!(seen
        .iter()
        .all(|e| e.team_id.as_deref() == Some(a.id.as_str())));

    // Exactly one full page: no cursor pointing at an empty page.
    let q = AuditQuery {
        limit: Some(25),
        ..AuditQuery::default()
    };
    assert!(db.list_audit(&a.id, &q).await.unwrap().next.is_none());

    // Filters combine with the cursor.
    let mut q = AuditQuery {
        limit: Some(4),
        action: Some("capsule.create".into()),
        ..AuditQuery::default()
    };
    let mut creates = Vec::new();
    loop {
        let page = db.list_audit(&a.id, &q).await.unwrap();
        creates.extend(page.items);
        match page.next {
            Some(c) => q.before = Some(c),
            None => break,
        }
    }
    assert_eq!(creates.len(), 13);
    assert!(creates.iter().all(|e| e.action == "capsule.create"));

    // Limits are clamped; the default is 50.
    let q = AuditQuery {
        limit: Some(0),
        ..AuditQuery::default()
    };
    assert_eq!(db.list_audit(&a.id, &q).await.unwrap().items.len(), 1);
    assert_eq!(
        db.list_audit(&a.id, &AuditQuery::default())
            .await
            .unwrap()
            .items
            .len(),
        25
    );

    let first = &expected[0];
    assert_eq!(first.actor, Actor::ApiKey { id: "key-x".into() });
    assert_eq!(first.metadata, Some(json!({"n": 1})));
    let sys = db
        .insert_audit(
            &a.id,
            NewAuditEntry {
                actor: Actor::System,
                actor_name: None,
                metadata: None,
                ..audit("capsule.pause", None)
            },
        )
        .await
        .unwrap();
    assert_eq!(sys.actor, Actor::System);
    assert!(sys.id.starts_with("log-"));
}

async fn bootstrap_is_idempotent(t: &TestDb) {
    let db = &t.db;
    let given = "wrn_00112233445566778899aabbccddeeff";
    assert!(matches!(
        ensure_bootstrap(db, Some("wrn_NOTHEX")).await.unwrap_err(),
        DbError::InvalidInput { .. }
    ));
    assert_eq!(
        ensure_bootstrap(db, Some(given)).await.unwrap().as_deref(),
        Some(given)
    );
    let key = db.authenticate_api_key(given).await.unwrap();
    let admin = db.get_user_by_email(BOOTSTRAP_ADMIN_EMAIL).await.unwrap();
    assert!(admin.is_admin && !admin.has_password);
    assert_eq!(
        db.member_role(&key.team_id, &admin.id).await.unwrap(),
        Role::Owner
    );

    assert_eq!(ensure_bootstrap(db, Some(given)).await.unwrap(), None);
    assert_eq!(ensure_bootstrap(db, None).await.unwrap(), None);
    let reopened = Db::open(&t.url).await.unwrap();
    assert_eq!(
        ensure_bootstrap(&reopened, Some(given)).await.unwrap(),
        None
    );
    reopened.close().await;
    assert_eq!(db.list_api_keys(&key.team_id).await.unwrap().len(), 1);
    assert_eq!(db.teams_of_user(&admin.id).await.unwrap().len(), 1);
}

async fn bootstrap_with_random_key(t: &TestDb) {
    let db = &t.db;
    let key = ensure_bootstrap(db, None)
        .await
        .unwrap()
        .expect("bootstrapped");
    assert!(validate_api_key(&key).is_ok());
    assert!(db.authenticate_api_key(&key).await.is_ok());
    assert_eq!(ensure_bootstrap(db, None).await.unwrap(), None);
}

/// Team rules (one owner, who manages admins), invitations and the bootstrap admin's
/// password.
mod team_rules {
    use super::*;
    use std::time::Duration;

    on_both_backends!(
        owner_rules_are_enforced,
        owner_rules_hold_under_races,
        invitations_sign_up_once,
        bootstrap_admin_password_is_set_once,
    );

    fn refused(r: Result<(), MemberError>) -> MemberRule {
        match r {
            Err(MemberError::Refused(rule)) => rule,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    async fn owners(db: &Db, team: &str) -> Vec<String> {
        db.list_members(team)
            .await
            .unwrap()
            .into_iter()
            .filter(|m| m.role == Role::Owner)
            .map(|m| m.user_id)
            .collect()
    }

    async fn owner_rules_are_enforced(t: &TestDb) {
        let db = &t.db;
        let url = t.url.clone();
        let (o, team) = team_of(db, "owner@example.com").await;
        let a = user(db, "admin@example.com").await;
        let a2 = user(db, "admin2@example.com").await;
        let m = user(db, "member@example.com").await;
        db.add_member(&team.id, &a.id, Role::Admin).await.unwrap();
        db.add_member(&team.id, &a2.id, Role::Admin).await.unwrap();
        db.add_member(&team.id, &m.id, Role::Member).await.unwrap();
        let t = team.id.as_str();

        // An admin can neither demote nor remove the owner, nor manage admins.
        assert_eq!(
            refused(db.change_member_role(t, &a.id, &o.id, Role::Member).await),
            MemberRule::OwnerRoleFixed
        );
        assert_eq!(
            refused(db.remove_member_by(t, &a.id, &o.id).await),
            MemberRule::OwnerNotRemovable
        );
        assert_eq!(
            refused(db.change_member_role(t, &a.id, &m.id, Role::Admin).await),
            MemberRule::NeedsOwner
        );
        assert_eq!(
            refused(db.change_member_role(t, &a.id, &a2.id, Role::Member).await),
            MemberRule::NeedsOwner
        );
        assert_eq!(
            refused(db.remove_member_by(t, &a.id, &a2.id).await),
            MemberRule::NeedsOwner
        );
        assert_eq!(
            refused(db.change_member_role(t, &a.id, &a.id, Role::Owner).await),
            MemberRule::NeedsOwner
        );
        assert_eq!(
            refused(db.remove_member_by(t, &m.id, &a.id).await),
            MemberRule::NeedsManager
        );
        // Nor can the owner demote themselves or leave.
        assert_eq!(
            refused(db.change_member_role(t, &o.id, &o.id, Role::Admin).await),
            MemberRule::OwnerRoleFixed
        );
        assert_eq!(
            refused(db.leave_team(t, &o.id).await),
            MemberRule::OwnerCannotLeave
        );
        assert_eq!(
            refused(db.remove_member_by(t, &o.id, &o.id).await),
            MemberRule::OwnerCannotLeave
        );
        // The unchecked functions keep the owner too.
        assert!(matches!(
            db.set_member_role(t, &o.id, Role::Member).await,
            Err(DbError::InvalidInput { .. })
        ));
        assert!(matches!(
            db.set_member_role(t, &m.id, Role::Owner).await,
            Err(DbError::InvalidInput { .. })
        ));
        assert!(matches!(
            db.remove_member(t, &o.id).await,
            Err(DbError::InvalidInput { .. })
        ));
        // Nor can a second owner be written behind the functions' backs.
        let raw = raw_pool(&url).await;
        let second_owner = sqlx::query("UPDATE memberships SET role = 'owner' WHERE user_id = $1")
            .bind(&m.id)
            .execute(&raw)
            .await;
        assert!(second_owner.is_err(), "a second owner was written");
        raw.close().await;
        assert_eq!(owners(db, t).await, std::slice::from_ref(&o.id));
        assert!(matches!(
            db.delete_user(&o.id).await,
            Err(DbError::InvalidInput { .. })
        ));
        // Missing people are NotFound.
        let e = db
            .remove_member_by(t, &o.id, "usr-nobody")
            .await
            .unwrap_err();
        assert!(
            matches!(e, MemberError::Db(ref d) if d.is_not_found()),
            "{e:?}"
        );
        let e = db
            .remove_member_by(t, "usr-nobody", &m.id)
            .await
            .unwrap_err();
        assert!(
            matches!(e, MemberError::Db(ref d) if d.is_not_found()),
            "{e:?}"
        );

        // What is allowed: admins remove members; the owner manages admins.
        db.remove_member_by(t, &a.id, &m.id).await.unwrap();
        db.change_member_role(t, &o.id, &a2.id, Role::Member)
            .await
            .unwrap();
        assert_eq!(db.member_role(t, &a2.id).await.unwrap(), Role::Member);
        db.remove_member_by(t, &o.id, &a.id).await.unwrap();
        db.leave_team(t, &a2.id).await.unwrap();
        db.add_member(t, &a.id, Role::Member).await.unwrap();

        // Handing ownership over: one statement's worth of change, one owner after it.
        assert_eq!(
            refused(db.transfer_ownership(t, &a.id, &a.id).await),
            MemberRule::NeedsOwner
        );
        let e = db
            .transfer_ownership(t, &o.id, "usr-nobody")
            .await
            .unwrap_err();
        assert!(
            matches!(e, MemberError::Db(ref d) if d.is_not_found()),
            "{e:?}"
        );
        assert_eq!(
            owners(db, t).await,
            std::slice::from_ref(&o.id),
            "a failed hand-over changes nothing"
        );
        db.change_member_role(t, &o.id, &a.id, Role::Owner)
            .await
            .unwrap();
        assert_eq!(owners(db, t).await, std::slice::from_ref(&a.id));
        assert_eq!(db.member_role(t, &o.id).await.unwrap(), Role::Admin);
        assert_eq!(
            refused(db.transfer_ownership(t, &o.id, &o.id).await),
            MemberRule::NeedsOwner
        );
        db.leave_team(t, &o.id).await.unwrap();

        // Only the owner deletes the team.
        db.add_member(t, &m.id, Role::Admin).await.unwrap();
        assert_eq!(
            refused(db.delete_team_by_owner(t, &m.id).await),
            MemberRule::NeedsOwner
        );
        db.delete_team_by_owner(t, &a.id).await.unwrap();
        assert!(db.get_team(t).await.unwrap_err().is_not_found());
    }

    /// Concurrent hand-overs, demotions, removals and leaving never leave a team with
    /// no owner or two.
    async fn owner_rules_hold_under_races(t: &TestDb) {
        let db = &t.db;
        for round in 0..8 {
            let (o, team) = team_of(db, &format!("o{round}@example.com")).await;
            let x = user(db, &format!("x{round}@example.com")).await;
            let y = user(db, &format!("y{round}@example.com")).await;
            db.add_member(&team.id, &x.id, Role::Admin).await.unwrap();
            db.add_member(&team.id, &y.id, Role::Member).await.unwrap();
            let tid = team.id.as_str();
            let (r1, r2, r3, r4, r5, r6) = tokio::join!(
                db.transfer_ownership(tid, &o.id, &x.id),
                db.transfer_ownership(tid, &o.id, &y.id),
                db.change_member_role(tid, &o.id, &x.id, Role::Member),
                db.remove_member_by(tid, &o.id, &y.id),
                db.leave_team(tid, &o.id),
                db.remove_member_by(tid, &x.id, &o.id),
            );
            for r in [r1, r2, r3, r4, r5, r6] {
                if let Err(MemberError::Db(e)) = r {
                    assert!(e.is_not_found(), "round {round}: {e:?}");
                }
            }
            let members = db.list_members(tid).await.unwrap();
            let owners: Vec<_> = members.iter().filter(|m| m.role == Role::Owner).collect();
            assert_eq!(owners.len(), 1, "round {round}: {members:?}");
        }
    }

    async fn invitations_sign_up_once(t: &TestDb) {
        let db = &t.db;
        let (o, team) = team_of(db, "inviter@example.com").await;
        let week = Duration::from_secs(7 * 86400);
        assert!(matches!(
            db.create_invitation(&team.id, "x@example.com", Role::Owner, Some(&o.id), week)
                .await,
            Err(DbError::InvalidInput { .. })
        ));
        let inv = db
            .create_invitation(
                &team.id,
                " New@Example.com ",
                Role::Admin,
                Some(&o.id),
                week,
            )
            .await
            .unwrap();
        assert!(inv.token.starts_with(INVITATION_TOKEN_PREFIX));
        assert!(
            !format!("{inv:?}").contains(&inv.token),
            "the token is not logged"
        );
        assert_eq!(inv.invitation.email, "new@example.com");
        assert_eq!(
            db.list_invitations(&team.id).await.unwrap(),
            std::slice::from_ref(&inv.invitation)
        );

        // Another address, a wrong token: NotFound before any account is made.
        for (token, email) in [
            (inv.token.as_str(), "other@example.com"),
            ("wrninv_00000000000000000000000000000000", "new@example.com"),
        ] {
            let e = db
                .create_user_from_invitation(token, email, "N", "long enough pw")
                .await
                .unwrap_err();
            assert!(e.is_not_found(), "{e:?}");
        }
        assert!(db.get_user_by_email("other@example.com").await.is_err());

        let (u, used) = db
            .create_user_from_invitation(&inv.token, "NEW@example.com", "New", "long enough pw")
            .await
            .unwrap();
        assert_eq!(used.id, inv.invitation.id);
        assert_eq!(db.member_role(&team.id, &u.id).await.unwrap(), Role::Admin);
        assert_eq!(
            db.default_team(&u.id).await.unwrap().unwrap().team.id,
            team.id
        );
        assert!(db
            .verify_password("new@example.com", "long enough pw")
            .await
            .unwrap()
            .is_some());
        // Single use.
        let e = db
            .create_user_from_invitation(&inv.token, "new@example.com", "New", "long enough pw")
            .await
            .unwrap_err();
        assert!(e.is_not_found(), "{e:?}");
        assert!(db.list_invitations(&team.id).await.unwrap().is_empty());

        // Expired, and deleted, invitations are no good.
        let expired = db
            .create_invitation(
                &team.id,
                "late@example.com",
                Role::Member,
                None,
                Duration::ZERO,
            )
            .await
            .unwrap();
        let e = db
            .create_user_from_invitation(&expired.token, "late@example.com", "L", "long enough pw")
            .await
            .unwrap_err();
        assert!(e.is_not_found(), "{e:?}");
        let gone = db
            .create_invitation(&team.id, "gone@example.com", Role::Member, None, week)
            .await
            .unwrap();
        db.delete_invitation(&team.id, &gone.invitation.id)
            .await
            .unwrap();
        assert!(db
            .delete_invitation(&team.id, &gone.invitation.id)
            .await
            .unwrap_err()
            .is_not_found());
        assert!(db
            .invitation_for(&gone.token, "gone@example.com")
            .await
            .unwrap_err()
            .is_not_found());
        // An invitation for an address that has an account: Conflict, and not used up.
        let taken = db
            .create_invitation(&team.id, "inviter@example.com", Role::Member, None, week)
            .await
            .unwrap();
        let e = db
            .create_user_from_invitation(&taken.token, "inviter@example.com", "I", "long enough pw")
            .await
            .unwrap_err();
        assert!(e.is_conflict(), "{e:?}");
        assert!(db
            .invitation_for(&taken.token, "inviter@example.com")
            .await
            .is_ok());
    }

    async fn bootstrap_admin_password_is_set_once(t: &TestDb) {
        let db = &t.db;
        // Before bootstrap there is no admin to give a password to.
        assert!(!ensure_bootstrap_admin_password(db, "first password")
            .await
            .unwrap());
        ensure_bootstrap(db, None)
            .await
            .unwrap()
            .expect("bootstrapped");
        assert!(matches!(
            ensure_bootstrap_admin_password(db, "short").await,
            Err(DbError::InvalidInput { .. })
        ));
        assert!(ensure_bootstrap_admin_password(db, "first password")
            .await
            .unwrap());
        assert!(db
            .verify_password(BOOTSTRAP_ADMIN_EMAIL, "first password")
            .await
            .unwrap()
            .is_some());
        // Never replaced.
        assert!(!ensure_bootstrap_admin_password(db, "second password")
            .await
            .unwrap());
        assert!(db
            .verify_password(BOOTSTRAP_ADMIN_EMAIL, "second password")
            .await
            .unwrap()
            .is_none());
    }
}
