//! Opens a fresh database per test on either backend and runs one suite on both.
//!
//! SQLite: a file in a temp dir. PostgreSQL: a new database on the cluster named by
//! `WRENN_TEST_POSTGRES_URL` (start one with `scripts/postgres.sh`), dropped at the end.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use wrenn_db::Db;

pub const PG_ENV: &str = "WRENN_TEST_POSTGRES_URL";

#[derive(Debug)]
pub struct TestDb {
    pub db: Db,
    pub url: String,
    _dir: Option<tempfile::TempDir>,
    pg: Option<(String, String)>,
}

impl TestDb {
    pub async fn sqlite() -> TestDb {
        let dir = tempfile::tempdir().expect("temp dir");
        let url = Db::sqlite_url(&dir.path().join("wrenn.db"));
        let db = Db::open(&url).await.expect("open sqlite");
        TestDb {
            db,
            url,
            _dir: Some(dir),
            pg: None,
        }
    }

    /// `None` (after a loud notice) when no PostgreSQL was started.
    pub async fn postgres() -> Option<TestDb> {
        let Ok(admin_url) = std::env::var(PG_ENV) else {
            static SAID: AtomicBool = AtomicBool::new(false);
            if !SAID.swap(true, Ordering::SeqCst) {
                // Written to the real stderr, past the test harness's output capture.
                let _ = std::io::stderr().write_all(
                    b"\n*** SKIPPED: PostgreSQL not started (run scripts/postgres.sh) ***\n\
                      *** set WRENN_TEST_POSTGRES_URL=$(scripts/postgres.sh) to run the PostgreSQL half of the wrenn-db tests ***\n\n",
                );
            }
            return None;
        };
        let name = format!("wrenn_test_{}", rand_hex());
        let admin = admin_pool(&admin_url).await;
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&admin)
            .await
            .expect("create test database");
        admin.close().await;
        let url = with_database(&admin_url, &name);
        let db = Db::open(&url).await.expect("open postgres");
        Some(TestDb {
            db,
            url,
            _dir: None,
            pg: Some((admin_url, name)),
        })
    }

    /// Closes the pool and drops the PostgreSQL test database.
    pub async fn finish(self) {
        self.db.close().await;
        if let Some((admin_url, name)) = self.pg {
            let admin = admin_pool(&admin_url).await;
            let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                .execute(&admin)
                .await;
            admin.close().await;
        }
    }
}

async fn admin_pool(url: &str) -> sqlx::PgPool {
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(url)
        .await
        .expect("connect to WRENN_TEST_POSTGRES_URL")
}

/// `url` with its database name replaced by `name`.
fn with_database(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    let host_part = match base[scheme_end..].find('/') {
        Some(i) => &base[..scheme_end + i],
        None => base,
    };
    match query {
        Some(q) => format!("{host_part}/{name}?{q}"),
        None => format!("{host_part}/{name}"),
    }
}

fn rand_hex() -> String {
    (0..8)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect()
}

/// Generates `sqlite::NAME` and `postgres::NAME` tests calling `NAME(&TestDb)`.
#[macro_export]
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let t = $crate::harness::TestDb::sqlite().await;
                    super::$name(&t).await;
                    t.finish().await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let Some(t) = $crate::harness::TestDb::postgres().await else { return };
                    super::$name(&t).await;
                    t.finish().await;
                }
            )*
        }
    };
}
