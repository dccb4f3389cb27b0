//! A throwaway PostgreSQL for the directory benches: initdb + pg_ctl, Unix socket only, with
//! fsync off (a bench's loads are not crash-tested; a registration figure with fsync on
//! needs `fsync = on` added to the cluster's postgresql.conf). As in the test harness,
//! tests/src/postgres.rs, which the benches of this crate cannot reach.

use std::path::{Path, PathBuf};
use std::process::Command;

pub struct Pg {
    dir: PathBuf,
    _temp: Option<tempfile::TempDir>,
    bin: PathBuf,
    root: bool,
}

impl Pg {
    /// Starts the cluster in `keep` (created there when new), or in a temporary directory;
    /// `memory` is the memory settings of a new cluster's postgresql.conf, one per line.
    pub fn start(keep: Option<&Path>, memory: &str) -> Self {
        let bin = std::env::var_os("CMS_TEST_PG_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                let mut v: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
                    .expect("PostgreSQL not installed (postgresql-15)")
                    .flatten()
                    .map(|e| e.path().join("bin"))
                    .filter(|b| b.join("initdb").is_file())
                    .collect();
                v.sort();
                v.pop().expect("no initdb under /usr/lib/postgresql/*/bin")
            });
        let root = Command::new("id")
            .arg("-u")
            .output()
            .map(|o| o.stdout.starts_with(b"0"))
            .unwrap_or(false);
        let (dir, _temp) = match keep {
            Some(dir) => {
                std::fs::create_dir_all(dir).expect("pg dir");
                (dir.to_owned(), None)
            }
            None => {
                let t = tempfile::Builder::new()
                    .prefix("cms-pgbench-")
                    .tempdir()
                    .expect("tmp");
                (t.path().to_owned(), Some(t))
            }
        };
        let pg = Self {
            dir,
            _temp,
            bin,
            root,
        };
        if root {
            pg.sh(Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&pg.dir));
        }
        let data = pg.dir.join("data");
        let fresh = !data.join("PG_VERSION").is_file();
        if fresh {
            pg.sh(pg.cmd("initdb").arg("-D").arg(&data).args([
                "-U",
                "cms",
                "--auth=trust",
                "--encoding=UTF8",
                "--no-locale",
                "--no-sync",
            ]));
            let conf = data.join("postgresql.conf");
            let mut text = std::fs::read_to_string(&conf).expect("conf");
            text.push_str(&format!(
                "\nlisten_addresses = ''\nunix_socket_directories = '{}'\nfsync = off\nsynchronous_commit = off\nfull_page_writes = off\n{memory}\nmax_wal_size = 4GB\n",
                pg.dir.display()
            ));
            std::fs::write(&conf, text).expect("conf");
        }
        pg.sh(pg
            .cmd("pg_ctl")
            .arg("-D")
            .arg(&data)
            .arg("-l")
            .arg(pg.dir.join("log"))
            .args(["-w", "start"]));
        if fresh {
            pg.sh(pg.cmd("psql").arg("-h").arg(&pg.dir).args([
                "-U",
                "cms",
                "-d",
                "postgres",
                "-c",
                "CREATE DATABASE bench",
            ]));
        }
        pg
    }

    fn cmd(&self, program: &str) -> Command {
        if self.root {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(self.bin.join(program));
            c
        } else {
            Command::new(self.bin.join(program))
        }
    }

    fn sh(&self, c: &mut Command) {
        let out = c.output().expect("run");
        assert!(
            out.status.success(),
            "{:?}: {}",
            c,
            String::from_utf8_lossy(&out.stderr)
        );
    }

    pub fn url(&self) -> String {
        format!("postgres://cms@localhost/bench?host={}", self.dir.display())
    }
}

impl Drop for Pg {
    fn drop(&mut self) {
        let data = self.dir.join("data");
        let _ = self
            .cmd("pg_ctl")
            .arg("-D")
            .arg(&data)
            .args(["-m", "immediate", "stop"])
            .output();
    }
}
