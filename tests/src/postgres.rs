//! A throwaway PostgreSQL cluster for tests, made with PostgreSQL's own `initdb` and `pg_ctl`
//! (Debian's postgresql-15 package; the binaries are found under /usr/lib/postgresql/*/bin, or
//! in `$CMS_TEST_PG_BIN`).
//!
//! The cluster listens on no TCP port at all (`listen_addresses = ''`): only on a Unix socket
//! in its own temp directory, so clusters of parallel tests never collide and no port has to be
//! guessed. Clients connect with `postgres://cms@localhost/<db>?host=<socket dir>` (the
//! `host` parameter wins over the URL host), trust auth.
//! PostgreSQL refuses to run as root: when the tests run as root, every PostgreSQL command runs
//! as the `postgres` system user (`runuser -u postgres --`) and the temp directory is handed to
//! it with `chown`. Dropping the cluster stops it (`pg_ctl stop -m immediate`); if a test
//! process dies first, the postmaster notices its data directory vanished and exits by itself.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};

use cms_kit::db::DatabaseSettings;
use tempfile::TempDir;

pub struct Postgres {
    dir: TempDir,
    bin: PathBuf,
    as_postgres_user: bool,
    next_db: AtomicU32,
}

/// The directory holding `initdb`, `pg_ctl` and `postgres`.
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("CMS_TEST_PG_BIN") {
        return PathBuf::from(dir);
    }
    let mut candidates: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").is_file().then_some((version, bin))
        })
        .collect();
    candidates.sort();
    candidates
        .pop()
        .map(|(_, bin)| bin)
        .expect("PostgreSQL server binaries not found under /usr/lib/postgresql/*/bin: install postgresql-15 (tests/run.sh does), or set CMS_TEST_PG_BIN")
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

impl Postgres {
    /// initdb + pg_ctl start in a new temp directory; blocks until the server accepts.
    pub fn start() -> Self {
        let bin = bin_dir();
        let as_postgres_user = is_root();
        let dir = tempfile::Builder::new()
            .prefix("cms-pg-")
            .tempdir()
            .expect("temp dir");
        let pg = Self {
            dir,
            bin,
            as_postgres_user,
            next_db: AtomicU32::new(0),
        };
        if as_postgres_user {
            let out = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(pg.dir.path())
                .output()
                .expect("chown");
            assert!(
                out.status.success(),
                "chown: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let data = pg.data_dir();
        pg.run(
            "initdb",
            &[
                "-D",
                path_str(&data),
                "-U",
                "cms",
                "--auth=trust",
                "--encoding=UTF8",
                "--no-locale",
                "--no-sync",
            ],
        );
        let conf = format!(
            "\nlisten_addresses = ''\nunix_socket_directories = '{}'\nfsync = off\nsynchronous_commit = off\nfull_page_writes = off\nmax_connections = 200\nshared_buffers = 128MB\n",
            pg.socket_dir().display()
        );
        let mut text =
            std::fs::read_to_string(data.join("postgresql.conf")).expect("postgresql.conf");
        text.push_str(&conf);
        std::fs::write(data.join("postgresql.conf"), text).expect("write postgresql.conf");
        let log = pg.dir.path().join("postgres.log");
        pg.run(
            "pg_ctl",
            &[
                "-D",
                path_str(&data),
                "-l",
                path_str(&log),
                "-w",
                "-t",
                "60",
                "start",
            ],
        );
        pg
    }

    /// A cluster shared by the tests of this process while any of them holds it.
    pub fn shared() -> Arc<Self> {
        static SHARED: OnceLock<Mutex<Weak<Postgres>>> = OnceLock::new();
        let slot = SHARED.get_or_init(|| Mutex::new(Weak::new()));
        let mut guard = slot.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(pg) = guard.upgrade() {
            return pg;
        }
        let pg = Arc::new(Self::start());
        *guard = Arc::downgrade(&pg);
        pg
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn socket_dir(&self) -> PathBuf {
        self.dir.path().to_owned()
    }

    fn command(&self, program: &str) -> Command {
        let exe = self.bin.join(program);
        if self.as_postgres_user {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(exe);
            c
        } else {
            Command::new(exe)
        }
    }

    fn run(&self, program: &str, args: &[&str]) -> Output {
        let out = self
            .command(program)
            .args(args)
            .current_dir(self.dir.path())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
        if !out.status.success() {
            let log =
                std::fs::read_to_string(self.dir.path().join("postgres.log")).unwrap_or_default();
            panic!(
                "{program} failed: {}\n{}\n{log}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        out
    }

    /// The URL of database `db` (over the Unix socket).
    pub fn url(&self, db: &str) -> String {
        format!(
            "postgres://cms@localhost/{db}?host={}",
            self.socket_dir().display()
        )
    }

    /// Runs one SQL command against database `db` with psql.
    pub fn psql(&self, db: &str, sql: &str) -> String {
        let out = self.run(
            "psql",
            &[
                "-h",
                path_str(&self.socket_dir()),
                "-U",
                "cms",
                "-d",
                db,
                "-v",
                "ON_ERROR_STOP=1",
                "-At",
                "-c",
                sql,
            ],
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// A new empty database; returns its URL.
    pub fn create_database(&self) -> String {
        let n = self.next_db.fetch_add(1, Ordering::SeqCst);
        let name = format!("t{}_{n}", std::process::id());
        self.psql("postgres", &format!("CREATE DATABASE {name}"));
        self.url(&name)
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = self
            .command("pg_ctl")
            .args([
                "-D",
                path_str(&self.data_dir()),
                "-m",
                "immediate",
                "-w",
                "stop",
            ])
            .output();
    }
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

/// Where a test's service keeps its data: an SQLite file (the default) or a fresh database in
/// a throwaway PostgreSQL cluster.
#[derive(Clone)]
pub enum Backend {
    Sqlite,
    Postgres(Arc<Postgres>),
}

impl Backend {
    pub fn name(&self) -> &'static str {
        match self {
            Self::Sqlite => "sqlite",
            Self::Postgres(_) => "postgres",
        }
    }

    /// The `[database]` settings of one service: SQLite in its data dir, or a new database.
    pub fn database(&self) -> DatabaseSettings {
        match self {
            Self::Sqlite => DatabaseSettings::default(),
            Self::Postgres(pg) => DatabaseSettings {
                url: Some(pg.create_database()),
                ..DatabaseSettings::default()
            },
        }
    }
}
