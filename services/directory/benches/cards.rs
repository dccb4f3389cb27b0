//! Card registration benchmark, on SQLite and on a throwaway PostgreSQL (initdb + pg_ctl, Unix
//! socket only): `--users` users loaded first, then RegisterCredential one call at a time and
//! 16 in flight (through `Directory::register_credential`, the code the gRPC handler runs:
//! rate, p50, p99, errors and how many were INTERNAL), then the bulk card import of `--cards`
//! cards as a CSV stream (through `Directory::import_credentials`), and the same file again
//! (every line unchanged), with the process's RSS around the import.
//!
//!     cargo bench -p cms-directory --bench cards                  # 1,000,000 users, 1,200,000 cards
//!     cargo bench -p cms-directory --bench cards -- --users 100000 --cards 120000 --no-postgres
//!
//! Options: --users N, --cards N, --registrations N (16 in flight; a quarter of it one at a
//! time), --no-sqlite, --no-postgres. PostgreSQL binaries: /usr/lib/postgresql/*/bin or
//! $CMS_TEST_PG_BIN.

#[path = "common/pg.rs"]
mod pg;

use std::path::Path;
use std::time::{Duration, Instant};

use cms_directory::users::{UserFields, insert_new_users};
use cms_directory::{Directory, SelfServiceSettings, secrets::SecretKey};
use cms_proto::common::v1::CardProfile;
use cms_proto::directory::v1::{
    Credential, ImportCredentialsEnd, ImportCredentialsOptions, ImportCredentialsRequest,
    UserSource, import_credentials_request::Payload,
};
use pg::Pg;
use sea_orm::{ConnectionTrait, DatabaseConnection, TransactionTrait};

const TEMPLATE: &str = "00000000-0000-4000-8000-000000000001";

struct Args {
    users: usize,
    cards: usize,
    registrations: usize,
    sqlite: bool,
    postgres: bool,
}

fn args() -> Args {
    let mut a = Args {
        users: 1_000_000,
        cards: 1_200_000,
        registrations: 20_000,
        sqlite: true,
        postgres: true,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut num = |name: &str| -> usize {
            it.next()
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{name} needs a number"))
        };
        match arg.as_str() {
            "--users" => a.users = num("--users"),
            "--cards" => a.cards = num("--cards"),
            "--registrations" => a.registrations = num("--registrations"),
            "--no-sqlite" => a.sqlite = false,
            "--no-postgres" => a.postgres = false,
            "--bench" => {}
            other => panic!("unknown argument {other:?}"),
        }
    }
    a
}

fn user(i: usize) -> UserFields {
    UserFields {
        username: format!("holder{i}"),
        display_name: format!("Holder {i}"),
        email: format!("holder{i}@example.com"),
        phone: String::new(),
        org_unit: "IT".into(),
        external_id: format!("HR{i:07}"),
    }
}

async fn load_users(db: &DatabaseConnection, n: usize) -> Duration {
    let start = Instant::now();
    for from in (0..n).step_by(50_000) {
        let fields: Vec<UserFields> = (from..(from + 50_000).min(n)).map(user).collect();
        let refs: Vec<&UserFields> = fields.iter().collect();
        let txn = db.begin().await.expect("begin");
        insert_new_users(&txn, &refs, UserSource::Csv, 1, &mut |_| {})
            .await
            .expect("users");
        txn.commit().await.expect("commit");
    }
    db.execute_unprepared("ANALYZE").await.expect("analyze");
    start.elapsed()
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1_000.0
}

/// Registers `n` cards for the users `owners`, `in_flight` at a time: (per second, p50 ms,
/// p99 ms, errors, of them INTERNAL).
async fn registrations(
    dir: &Directory,
    owners: &std::sync::Arc<Vec<String>>,
    n: usize,
    in_flight: usize,
    tag: &str,
) -> (f64, f64, f64, usize, usize) {
    let start = Instant::now();
    let tasks: Vec<_> = (0..in_flight)
        .map(|t| {
            let (dir, owners, tag) = (dir.clone(), owners.clone(), tag.to_owned());
            tokio::spawn(async move {
                let (mut times, mut errors, mut internal) = (Vec::new(), 0, 0);
                for i in (t..n).step_by(in_flight) {
                    let card = Credential {
                        user_id: owners[(i * 7919) % owners.len()].clone(),
                        card_id: format!("reg-{tag}-{i}").into_bytes(),
                        serial: format!("RG{tag}{i:08}"),
                        profile: CardProfile::Minidriver as i32,
                        template_id: TEMPLATE.into(),
                        template_version: 1,
                        master_key_version: 1,
                        ..Default::default()
                    };
                    let at = Instant::now();
                    if let Err(e) = dir.register_credential(Some(card)).await {
                        errors += 1;
                        if tonic::Status::from(e).code() == tonic::Code::Internal {
                            internal += 1;
                        }
                    }
                    times.push(at.elapsed());
                }
                (times, errors, internal)
            })
        })
        .collect();
    let (mut times, mut errors, mut internal) = (Vec::new(), 0, 0);
    for t in tasks {
        let (ts, e, i) = t.await.expect("registrar");
        times.extend(ts);
        errors += e;
        internal += i;
    }
    let took = start.elapsed();
    times.sort();
    (
        n as f64 / took.as_secs_f64(),
        percentile(&times, 0.5),
        percentile(&times, 0.99),
        errors,
        internal,
    )
}

const HEADER: &str =
    "external_id,card_id,serial,profile,template_id,template_version,master_key_version,label\n";

/// Line `c` of the card CSV: every user one card, the rest to users spread over all.
fn line(c: usize, users: usize) -> String {
    let owner = if c < users { c } else { (c * 7919) % users };
    let serial = (c as u64).wrapping_mul(2_654_435_761) % 10_000_000_000;
    format!(
        "HR{owner:07},{:016X},{}{serial:010},minidriver,{TEMPLATE},1,1,inventory\n",
        0x4000_0000_0000_0000u64 + c as u64,
        ["SC", "YK", "ID", "GD"][c % 4],
    )
}

/// The import stream of a CSV of `cards` cards for `users` users, made chunk by chunk.
fn upload(
    cards: usize,
    users: usize,
) -> impl futures_util::Stream<Item = Result<ImportCredentialsRequest, tonic::Status>> + Unpin {
    let options = ImportCredentialsRequest {
        payload: Some(Payload::Options(ImportCredentialsOptions::default())),
        auth: None,
    };
    let chunks = (0..cards).step_by(10_000).map(move |from| {
        let mut text = if from == 0 {
            HEADER.to_owned()
        } else {
            String::new()
        };
        for c in from..(from + 10_000).min(cards) {
            text.push_str(&line(c, users));
        }
        Ok(ImportCredentialsRequest {
            payload: Some(Payload::CsvChunk(text.into_bytes())),
            auth: None,
        })
    });
    let total: u64 =
        (0..cards).map(|c| line(c, users).len() as u64).sum::<u64>() + HEADER.len() as u64;
    let end = ImportCredentialsRequest {
        payload: Some(Payload::End(ImportCredentialsEnd { total_bytes: total })),
        auth: None,
    };
    Box::pin(futures_util::stream::iter(
        std::iter::once(Ok(options))
            .chain(chunks)
            .chain(std::iter::once(Ok(end))),
    ))
}

/// This process's resident memory, MiB (Linux): all of it, and its own (anonymous) part,
/// without the database pages SQLite maps in.
fn rss_mib() -> String {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let get = |key: &str| {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<f64>().ok())
            .map_or(0.0, |kb| kb / 1024.0)
    };
    format!(
        "{:.0} MiB ({:.0} MiB anonymous)",
        get("VmRSS:"),
        get("RssAnon:")
    )
}

async fn run_on(db: DatabaseConnection, name: &str, a: &Args, notes: &mut Vec<String>) {
    let mut note = |text: String| {
        println!("{text}");
        notes.push(text);
    };
    let took = load_users(&db, a.users).await;
    note(format!(
        "{name}: {} users loaded in {:.1} s",
        a.users,
        took.as_secs_f64()
    ));
    let owners: Vec<String> = db
        .query_all_raw(sea_orm::Statement::from_string(
            db.get_database_backend(),
            "SELECT id FROM users ORDER BY num LIMIT 5000",
        ))
        .await
        .expect("owners")
        .iter()
        .map(|r| r.try_get("", "id").expect("id"))
        .collect();
    let owners = std::sync::Arc::new(owners);
    let d = Directory::new(
        db,
        SecretKey::from_bytes(&[9; 32]),
        SelfServiceSettings::default(),
    );
    if a.registrations > 0 {
        for (in_flight, n) in [(1, a.registrations / 4), (16, a.registrations)] {
            let (rate, p50, p99, errors, internal) =
                registrations(&d, &owners, n, in_flight, &format!("{in_flight}")).await;
            note(format!(
                "{name} card registration, {in_flight} in flight: {n} cards, {rate:.0}/s, p50 {p50:.2} ms, p99 {p99:.2} ms, {errors} errors ({internal} INTERNAL)"
            ));
        }
    }
    if a.cards > 0 {
        let idle = rss_mib();
        for pass in ["first import", "same file again"] {
            let start = Instant::now();
            let report = d
                .import_credentials(upload(a.cards, a.users.max(1)), &mut |_| {})
                .await
                .expect("import");
            let took = start.elapsed();
            note(format!(
                "{name} card import ({pass}): {} lines in {:.1} s = {:.0} cards/s; imported {}, unchanged {}, refused {}; RSS {idle} before, {} after",
                a.cards,
                took.as_secs_f64(),
                a.cards as f64 / took.as_secs_f64(),
                report.imported,
                report.unchanged,
                report.refused,
                rss_mib()
            ));
        }
    }
}

/// A throwaway PostgreSQL cluster on a Unix socket, stopped on drop.
async fn run() {
    let a = args();
    println!(
        "card benchmark: {} users, {} registrations (16 in flight; a quarter one at a time), {} cards imported",
        a.users, a.registrations, a.cards
    );
    let mut notes = Vec::new();
    if a.sqlite {
        let dir = tempfile::tempdir().expect("tmp");
        let db = cms_kit::db::connect(&Default::default(), dir.path(), "directory")
            .await
            .expect("sqlite");
        cms_directory::migration::run(&db).await.expect("migrate");
        run_on(db, "SQLite", &a, &mut notes).await;
    }
    if a.postgres {
        let pg = Pg::start(None, "shared_buffers = 512MB\nwork_mem = 32MB");
        let settings = cms_kit::db::DatabaseSettings {
            url: Some(pg.url()),
            max_connections: 8,
        };
        let db = cms_kit::db::connect(&settings, Path::new("/nonexistent"), "directory")
            .await
            .expect("postgres");
        cms_directory::migration::run(&db).await.expect("migrate");
        run_on(db, "PostgreSQL", &a, &mut notes).await;
        drop(pg);
    }
    println!();
    for n in notes {
        println!("{n}");
    }
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(run());
}
