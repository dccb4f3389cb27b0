//! `cms-<service> --config <file> --migrate-only`: what a deployment's migration job runs. It
//! applies the migrations and exits 0 without serving; a second run changes nothing; and
//! replicas migrating one fresh PostgreSQL database at the same moment both succeed (they take
//! the service's advisory lock in turn).

use std::net::SocketAddr;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use cms_launcher::layout::{Layout, Peers, Ports};
use cms_tests::pki::{TRUST_DOMAIN, TestPki};
use cms_tests::postgres::Postgres;

/// The services with a database, and the table each keeps its applied migrations in.
const WITH_DATABASE: [(&str, &str); 4] = [
    ("template", "seaql_migrations"),
    ("directory", "seaql_migrations"),
    ("custody", "custody_migrations"),
    ("gateway", "seaql_migrations"),
];

/// A fresh dev layout (PKI included) under a temp dir.
fn layout() -> (tempfile::TempDir, Layout) {
    let dir = tempfile::tempdir().unwrap();
    TestPki::new(dir.path());
    let layout = Layout::new(dir.path(), TRUST_DOMAIN).unwrap();
    layout.create_dirs().unwrap();
    (dir, layout)
}

/// Writes the config of `service`, with `extra` TOML appended; returns its path.
fn write_config(layout: &Layout, service: &'static str, extra: &str) -> std::path::PathBuf {
    // Ports that nobody listens on: a run that tried to serve would bind them and never exit.
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let peer = Some("127.0.0.1:1".parse().unwrap());
    let peers = Peers {
        template: peer,
        directory: peer,
        custody: peer,
        gateway: peer,
    };
    let text = layout
        .service_config(
            service,
            Ports {
                grpc: any,
                ops: any,
            },
            &peers,
            extra,
        )
        .unwrap();
    let path = layout.config_path(service);
    std::fs::write(&path, text).unwrap();
    path
}

fn migrate_only(service: &str, config: &std::path::Path) -> std::process::Child {
    Command::new(cms_tests::binary(&format!("cms-{service}")))
        .arg("--config")
        .arg(config)
        .arg("--migrate-only")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits for `child` (which must exit on its own: it does not serve).
fn finished(mut child: std::process::Child, what: &str) -> Output {
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            child.kill().unwrap();
            let out = child.wait_with_output().unwrap();
            panic!(
                "{what}: still running (serving?) after 60 s: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

fn assert_success(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what}: exit {:?}: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn migrate_only_on_sqlite_migrates_once_and_exits() {
    let (_dir, layout) = layout();
    for (service, _) in WITH_DATABASE {
        let config = write_config(&layout, service, "");
        let first = finished(migrate_only(service, &config), service);
        assert_success(&first, service);
        let file = layout
            .service_dir(service)
            .join(format!("{service}.sqlite3"));
        assert!(file.is_file(), "{service}: no {}", file.display());
        let size = std::fs::metadata(&file).unwrap().len();
        let second = finished(migrate_only(service, &config), service);
        assert_success(&second, &format!("{service} (second run)"));
        assert_eq!(
            std::fs::metadata(&file).unwrap().len(),
            size,
            "{service}: the second run changed the database"
        );
        // It did not serve: nothing was announced.
        assert!(!layout.announce_path(service).exists(), "{service}");
    }
}

#[test]
fn replicas_migrating_one_fresh_postgres_database_together_both_succeed() {
    let pg = Postgres::shared();
    let (_dir, layout) = layout();
    for (service, table) in WITH_DATABASE {
        let url = pg.create_database();
        // postgres://cms@localhost/<db>?host=<socket dir>
        let db = url
            .split_once("@localhost/")
            .and_then(|(_, rest)| rest.split_once('?'))
            .map(|(name, _)| name.to_owned())
            .unwrap();
        let config = write_config(&layout, service, &format!("[database]\nurl = {url:?}\n"));
        let replicas: Vec<_> = (0..2).map(|_| migrate_only(service, &config)).collect();
        for (i, child) in replicas.into_iter().enumerate() {
            let out = finished(child, service);
            assert_success(&out, &format!("{service} replica {i}"));
        }
        let count = || pg.psql(&db, &format!("SELECT count(*) FROM {table}"));
        let applied = count();
        assert!(applied.parse::<u32>().unwrap() > 0, "{service}: {applied}");
        let again = finished(migrate_only(service, &config), service);
        assert_success(&again, &format!("{service} (second run)"));
        assert_eq!(count(), applied, "{service}: the second run applied more");
    }
}
