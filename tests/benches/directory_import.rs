//! Memory of the real directory process around a bulk CSV import: `cms serve directory` over
//! mutual TLS (SQLite by default, as `cms up` runs it), its /proc/<pid>/status read idle, every
//! 100 ms while N generated users stream in through the ImportUsers RPC (as `cmsctl users
//! import` sends them, in 64 KiB chunks), right after the import returned and 5 s later.
//!
//! ```text
//! cargo build --release -p cms-launcher --bin cms
//! CMS_BIN_DIR=target/release cargo bench -p cms-tests --bench directory_import --profile dev -- --users 200000
//! ```
//! `--users N` (default 1,000,000); `--postgres` runs it again with the directory on a
//! throwaway PostgreSQL cluster (tests/src/postgres.rs). `CMS_BIN_DIR` picks the service
//! binaries, as for the helpdesk_offline bench; `CMS_BENCH_SAMPLES=1` prints every 100 ms
//! sample, `CMS_BENCH_HOLD=<secs>` keeps the process up afterwards (to look inside with
//! `gdb -p`: `call (void)malloc_stats()`). The target (issue 12): after the import the
//! process holds at most 2x its idle memory. `RssAnon` is the measure: the process's own
//! memory. `VmRSS` also counts the pages of SQLite's memory map of the database file
//! (`RssFile`), which are the kernel's page cache and are given back under memory pressure.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cms_proto::directory::v1::{
    ImportUsersOptions, ImportUsersRequest, SearchUsersRequest, import_users_request::Payload,
};
use cms_tests::directory_process::{self, Memory};
use cms_tests::postgres::Postgres;

/// Bytes per CSV chunk, as cmsctl sends them.
const CHUNK: usize = 64 * 1024;

struct Args {
    users: usize,
    postgres: bool,
}

fn args() -> Args {
    let mut a = Args {
        users: 1_000_000,
        postgres: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--users" => {
                a.users = it
                    .next()
                    .and_then(|v| v.replace('_', "").parse().ok())
                    .expect("--users N")
            }
            "--postgres" => a.postgres = true,
            "--bench" => {}
            other => panic!("unknown argument {other:?} (known: --users N, --postgres)"),
        }
    }
    a
}

/// One line of the table: MiB, and own memory against idle.
fn row(what: &str, m: &Memory, idle: &Memory) {
    let mib = |kib: u64| kib as f64 / 1024.0;
    println!(
        "{what:<10} {:>9.1} {:>9.1} {:>9.1} {:>8.2}x",
        mib(m.vm_rss),
        mib(m.rss_anon),
        mib(m.rss_file),
        m.rss_anon as f64 / idle.rss_anon.max(1) as f64,
    );
}

/// The largest of each field over `samples` (not necessarily one sample).
fn peak(samples: &[Memory]) -> Memory {
    samples.iter().fold(Memory::default(), |p, m| Memory {
        vm_rss: p.vm_rss.max(m.vm_rss),
        rss_anon: p.rss_anon.max(m.rss_anon),
        rss_file: p.rss_file.max(m.rss_file),
    })
}

/// User + system CPU time of a process, s (/proc/<pid>/stat, in USER_HZ = 100 per second).
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The fields after the command name (in parentheses, may hold spaces): utime and stime
    // are the 12th and 13th.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let fields: Vec<u64> = rest
        .split_whitespace()
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    (fields.get(11).unwrap_or(&0) + fields.get(12).unwrap_or(&0)) as f64 / 100.0
}

fn file_size(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

async fn run(backend: &str, extra: &str, csv: Arc<Vec<u8>>, users: usize) {
    let dir = tempfile::tempdir().expect("temp dir");
    let (layout, mut service) = directory_process::start(dir.path(), extra).await;
    let pid = service.process.id().expect("directory pid");
    let mut client =
        cms_launcher::bootstrap::directory_client(&layout, service.grpc).expect("client");
    // One call first, so that "idle" includes the connection and a first query.
    client
        .search_users(SearchUsersRequest {
            query: "x".into(),
            ..Default::default()
        })
        .await
        .expect("search");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle = Memory::of(pid);
    let cpu_before = cpu_secs(pid);

    let samples = Arc::new(Mutex::new(Vec::new()));
    let sampler = {
        let samples = samples.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            loop {
                tick.tick().await;
                let m = Memory::of(pid);
                samples.lock().expect("samples").push(m);
            }
        })
    };
    let options = ImportUsersRequest {
        payload: Some(Payload::Options(ImportUsersOptions {
            update_existing: true,
            has_header: true,
            ..Default::default()
        })),
        auth: None,
    };
    let chunks = (0..csv.len().div_ceil(CHUNK)).map(move |i| ImportUsersRequest {
        payload: Some(Payload::CsvChunk(
            csv[i * CHUNK..((i + 1) * CHUNK).min(csv.len())].to_vec(),
        )),
        auth: None,
    });
    let started = Instant::now();
    let report = client
        .import_users(tokio_stream::iter(std::iter::once(options).chain(chunks)))
        .await
        .expect("import")
        .into_inner()
        .report
        .expect("report");
    let took = started.elapsed();
    sampler.abort();
    let after = Memory::of(pid);
    let cpu = cpu_secs(pid) - cpu_before;
    assert_eq!(report.created as usize, users, "{report:?}");
    let wal = layout
        .service_dir("directory")
        .join("directory.sqlite3-wal");
    let wal_after = file_size(&wal);
    tokio::time::sleep(Duration::from_secs(5)).await;
    let later = Memory::of(pid);
    let during = peak(&samples.lock().expect("samples"));

    println!(
        "\n{backend}: {users} users imported in {:.1} s = {:.0} users/s, directory CPU {cpu:.1} s (load average {})",
        took.as_secs_f64(),
        users as f64 / took.as_secs_f64(),
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!("           VmRSS MiB RssAnon MiB RssFile MiB  RssAnon/idle");
    row("idle", &idle, &idle);
    row("peak", &during, &idle);
    row("after", &after, &idle);
    row("after+5s", &later, &idle);
    if backend == "sqlite" {
        println!(
            "WAL after the import: {:.1} MiB; database {:.1} MiB",
            wal_after as f64 / (1 << 20) as f64,
            file_size(&layout.service_dir("directory").join("directory.sqlite3")) as f64
                / (1 << 20) as f64
        );
    }
    if std::env::var_os("CMS_BENCH_SAMPLES").is_some() {
        for (i, m) in samples.lock().expect("samples").iter().enumerate() {
            println!(
                "  {:>6.1} s RssAnon {:>7.1} MiB",
                i as f64 / 10.0,
                m.rss_anon as f64 / 1024.0
            );
        }
    }
    if let Some(secs) = std::env::var("CMS_BENCH_HOLD")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        // Time to look inside (gdb -p, heaptrack) before it stops.
        println!("holding the directory (pid {pid}) for {secs} s");
        tokio::time::sleep(Duration::from_secs(secs)).await;
    }
    service.stop(Duration::from_secs(30)).await;
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let a = args();
    let t = Instant::now();
    let csv = Arc::new(directory_process::users_csv(a.users));
    println!(
        "directory import benchmark: {} users, CSV {:.1} MiB (generated in {:.1} s), binaries {}",
        a.users,
        csv.len() as f64 / (1 << 20) as f64,
        t.elapsed().as_secs_f64(),
        cms_tests::binary("cms")
            .parent()
            .map(PathBuf::from)
            .unwrap_or_default()
            .display()
    );
    run("sqlite", "", csv.clone(), a.users).await;
    if a.postgres {
        let pg = Postgres::start();
        let extra = format!("[database]\nurl = \"{}\"\n", pg.create_database());
        run("postgres", &extra, csv, a.users).await;
    }
}
