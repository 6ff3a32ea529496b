//! Opens a fresh database per test on either backend and runs one suite on both.
//!
//! SQLite: a file in a temp dir. PostgreSQL: a new database on the cluster named by
//! `WRENN_TEST_POSTGRES_URL` (or one started with `scripts/postgres.sh`), dropped at the end.

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

    /// A new database on the cluster named by `WRENN_TEST_POSTGRES_URL`, or on one
    /// this test run starts with `scripts/postgres.sh` (PostgreSQL is installable on
    /// every host the tests run on, so it is never skipped).
    pub async fn postgres() -> Option<TestDb> {
        let admin_url = postgres_url();
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

/// The cluster URL: from the environment, else from starting one (once per run).
fn postgres_url() -> String {
    static URL: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    URL.get_or_init(|| {
        if let Ok(url) = std::env::var(PG_ENV) {
            return url;
        }
        let script =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/postgres.sh");
        let out = std::process::Command::new("bash")
            .arg(&script)
            .output()
            .expect("run scripts/postgres.sh");
        assert!(
            out.status.success(),
            "scripts/postgres.sh failed (PostgreSQL is needed by these tests): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    })
    .clone()
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
