//! Embedded migrations, one directory per backend, applied with sqlx's migrator
//! (which records versions and checksums in `_sqlx_migrations`, so reruns are no-ops).

use crate::{Backend, Db, DbError};
use sqlx::migrate::{Migration, MigrationType, Migrator};
use std::borrow::Cow;

/// (version, description, SQLite script, PostgreSQL script). Append only; never edit
/// an applied script (the checksum would refuse it).
const MIGRATIONS: &[(i64, &str, &str, &str)] = &[
    (
        1,
        "initial",
        include_str!("../migrations/sqlite/0001_initial.sql"),
        include_str!("../migrations/postgres/0001_initial.sql"),
    ),
    (
        2,
        "lifecycle",
        include_str!("../migrations/sqlite/0002_lifecycle.sql"),
        include_str!("../migrations/postgres/0002_lifecycle.sql"),
    ),
    (
        3,
        "deadline",
        include_str!("../migrations/sqlite/0003_deadline.sql"),
        include_str!("../migrations/postgres/0003_deadline.sql"),
    ),
    (
        4,
        "team rules",
        include_str!("../migrations/sqlite/0004_team_rules.sql"),
        include_str!("../migrations/postgres/0004_team_rules.sql"),
    ),
    (
        5,
        "settings",
        include_str!("../migrations/sqlite/0005_settings.sql"),
        include_str!("../migrations/postgres/0005_settings.sql"),
    ),
    (
        6,
        "auto_resume",
        include_str!("../migrations/sqlite/0006_auto_resume.sql"),
        include_str!("../migrations/postgres/0006_auto_resume.sql"),
    ),
    (
        7,
        "network",
        include_str!("../migrations/sqlite/0007_network.sql"),
        include_str!("../migrations/postgres/0007_network.sql"),
    ),
    (
        8,
        "hosts",
        include_str!("../migrations/sqlite/0008_hosts.sql"),
        include_str!("../migrations/postgres/0008_hosts.sql"),
    ),
    (
        9,
        "host credentials",
        include_str!("../migrations/sqlite/0009_host_credentials.sql"),
        include_str!("../migrations/postgres/0009_host_credentials.sql"),
    ),
    (
        10,
        "host refresh and join tokens, platform audit log",
        include_str!("../migrations/sqlite/0010_host_refresh.sql"),
        include_str!("../migrations/postgres/0010_host_refresh.sql"),
    ),
    (
        11,
        "template builds",
        include_str!("../migrations/sqlite/0011_template_builds.sql"),
        include_str!("../migrations/postgres/0011_template_builds.sql"),
    ),
    (
        12,
        "template build requests and uploads",
        include_str!("../migrations/sqlite/0012_template_uploads.sql"),
        include_str!("../migrations/postgres/0012_template_uploads.sql"),
    ),
    (
        13,
        "notification channels and their deliveries",
        include_str!("../migrations/sqlite/0013_channels.sql"),
        include_str!("../migrations/postgres/0013_channels.sql"),
    ),
    (
        14,
        "team load samples and daily usage",
        include_str!("../migrations/sqlite/0014_team_usage.sql"),
        include_str!("../migrations/postgres/0014_team_usage.sql"),
    ),
    (
        15,
        "disabled accounts",
        include_str!("../migrations/sqlite/0015_user_disabled.sql"),
        include_str!("../migrations/postgres/0015_user_disabled.sql"),
    ),
];

pub(crate) async fn run(db: &Db) -> Result<(), DbError> {
    let migrations = MIGRATIONS
        .iter()
        .map(|&(version, description, sqlite, postgres)| {
            let sql = match db.backend() {
                Backend::Sqlite => sqlite,
                Backend::Postgres => postgres,
            };
            Migration::new(
                version,
                Cow::Borrowed(description),
                MigrationType::Simple,
                Cow::Borrowed(sql),
                false,
            )
        })
        .collect::<Vec<_>>();
    let migrator = Migrator {
        migrations: Cow::Owned(migrations),
        ..Migrator::DEFAULT
    };
    migrator
        .run(db.pool())
        .await
        .map_err(|e| DbError::backend("migrate", e))
}
