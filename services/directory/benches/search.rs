//! Helpdesk search benchmark: 1,000,000 users and 1,200,000 credentials on SQLite and on a
//! throwaway PostgreSQL (initdb + pg_ctl, Unix socket only), then p50/p99 of surname-prefix,
//! email-substring (within the local part, across the "@", and in the domain), exact-serial,
//! one- and two-character, absent-string and employee-id searches (first page of 20, through `Directory::search_users`, the code the gRPC handler
//! runs), one client at a time and 8 at once; card registrations one at a time and 16 in
//! flight; and the CSV import rate on SQLite with the process's RSS (all, and its own memory
//! without mapped files) before, during and after, measured before the search data is made.
//!
//!     cargo bench -p cms-directory --bench search                 # full size
//!     cargo bench -p cms-directory --bench search -- --users 100000 --credentials 120000 --no-postgres
//!
//! Options: --users N, --credentials N, --queries N (per kind), --import-users N,
//! --no-postgres, --no-sqlite, --query Q (only Q, repeatable), --data DIR (keep both databases in DIR, and on later runs with
//! the same --users/--credentials search them again instead of loading them anew).
//! PostgreSQL binaries: /usr/lib/postgresql/*/bin or $CMS_TEST_PG_BIN.

#[path = "common/pg.rs"]
mod pg;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cms_directory::entity::{credential, user};
use cms_directory::import::{self, Options};
use cms_directory::users::{UserFields, insert_users, new_row};
use cms_directory::{Directory, SelfServiceSettings, secrets::SecretKey};
use cms_proto::common::v1::{CardProfile, Flow, PageRequest};
use cms_proto::directory::v1::{CredentialStatus, SearchUsersRequest, UserSource};
use pg::Pg;
use sea_orm::ActiveValue::Set;
use sea_orm::{ConnectionTrait, DatabaseConnection, EntityTrait, TransactionTrait};

struct Args {
    data: Option<PathBuf>,
    users: usize,
    credentials: usize,
    queries: usize,
    import_users: usize,
    sqlite: bool,
    postgres: bool,
    registrations: usize,
    /// Only these queries, each timed (`--query Q`, repeatable): for looking into one.
    only: Vec<String>,
}

fn args() -> Args {
    let mut a = Args {
        data: None,
        users: 1_000_000,
        credentials: 1_200_000,
        queries: 1_000,
        import_users: 200_000,
        sqlite: true,
        postgres: true,
        registrations: 2_000,
        only: Vec::new(),
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
            "--credentials" => a.credentials = num("--credentials"),
            "--queries" => a.queries = num("--queries"),
            "--import-users" => a.import_users = num("--import-users"),
            "--no-postgres" => a.postgres = false,
            "--data" => a.data = it.next().map(PathBuf::from),
            "--no-sqlite" => a.sqlite = false,
            "--registrations" => a.registrations = num("--registrations"),
            "--query" => a.only.extend(it.next()),
            "--bench" => {}
            other => panic!("unknown argument {other:?}"),
        }
    }
    a
}

/// splitmix64: deterministic data without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

const FIRST: &[&str] = &[
    "James",
    "Mary",
    "John",
    "Patricia",
    "Robert",
    "Jennifer",
    "Michael",
    "Linda",
    "William",
    "Elizabeth",
    "David",
    "Barbara",
    "Richard",
    "Susan",
    "Joseph",
    "Jessica",
    "Thomas",
    "Sarah",
    "Charles",
    "Karen",
    "Christopher",
    "Nancy",
    "Daniel",
    "Lisa",
    "Matthew",
    "Betty",
    "Anthony",
    "Margaret",
    "Mark",
    "Sandra",
    "Donald",
    "Ashley",
    "Steven",
    "Kimberly",
    "Paul",
    "Emily",
    "Andrew",
    "Donna",
    "Joshua",
    "Michelle",
    "Zoë",
    "Chloé",
    "Jürgen",
    "Søren",
    "Agnès",
    "Łukasz",
    "Renée",
    "José",
    "François",
    "Björn",
    "Inés",
    "Ólafur",
    "Dörte",
    "Małgorzata",
    "Håkon",
    "Noémie",
    "Ana",
    "Li",
    "Wei",
    "Yuki",
    "Aarav",
    "Fatima",
    "Omar",
    "Ngozi",
    "Kwame",
    "Priya",
];
const SYLLABLES: &[&str] = &[
    "an", "ber", "ca", "dal", "en", "fer", "gar", "hol", "in", "jo", "kel", "lan", "mor", "nor",
    "os", "par", "quin", "ros", "sch", "tan", "ul", "van", "wil", "xa", "yor", "zim", "mül", "øst",
    "bré", "ström", "son", "mann", "berg", "ley", "ton", "ski", "ez", "ini", "ova", "dt",
];
const OUS: &[&str] = &[
    "Finance",
    "Finance/Payroll",
    "IT",
    "IT/Operations",
    "HR",
    "Sales/EMEA",
    "Sales/APAC",
    "R&D",
    "R&D/Lab",
    "Legal",
    "Facilities",
];
const DOMAINS: &[&str] = &["example.com", "corp.example.org", "mail.example.net"];

struct Person {
    fields: UserFields,
    surname: String,
    serials: Vec<String>,
}

fn surname(rng: &mut Rng) -> String {
    let parts = 2 + rng.below(2);
    let mut s = String::new();
    for _ in 0..parts {
        s.push_str(SYLLABLES[rng.below(SYLLABLES.len())]);
    }
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().chain(c).collect(),
        None => s,
    }
}

fn people(users: usize, credentials: usize, seed: u64) -> Vec<Person> {
    let mut rng = Rng(seed);
    let mut out = Vec::with_capacity(users);
    for i in 0..users {
        let first = FIRST[rng.below(FIRST.len())];
        let last = surname(&mut rng);
        let ascii = |s: &str| cms_directory::normalize::fold(s).replace(' ', "");
        let username = format!(
            "{}{}{}",
            ascii(first).chars().next().unwrap_or('x'),
            ascii(&last),
            i
        );
        let email = format!(
            "{}.{}{}@{}",
            ascii(first),
            ascii(&last),
            i % 1000,
            DOMAINS[rng.below(DOMAINS.len())]
        );
        out.push(Person {
            fields: UserFields {
                username,
                display_name: format!("{first} {last}"),
                email,
                phone: String::new(),
                org_unit: OUS[rng.below(OUS.len())].to_owned(),
                external_id: format!("HR{i:07}"),
            },
            surname: last,
            serials: Vec::new(),
        });
    }
    // Every user one card, some two: `credentials` cards in all, unique serials.
    for c in 0..credentials {
        let owner = if c < users { c } else { rng.below(users) };
        let serial = format!(
            "{}{:010}",
            ["SC", "YK", "ID", "GD"][c % 4],
            (c as u64).wrapping_mul(2_654_435_761) % 10_000_000_000
        );
        out[owner].serials.push(serial);
    }
    out
}

/// Loads `people` into `db`, unless `marker` says that this very data set is already there
/// (then `None`); marks it loaded afterwards.
async fn load_once(
    db: &DatabaseConnection,
    people: &[Person],
    marker: Option<PathBuf>,
    data_set: &str,
) -> Option<Duration> {
    if let Some(m) = &marker
        && std::fs::read_to_string(m).is_ok_and(|s| s == data_set)
    {
        return None;
    }
    let took = load(db, people).await;
    if let Some(m) = marker {
        std::fs::write(m, data_set).expect("marker");
    }
    Some(took)
}

fn describe_load(db: &str, took: Option<Duration>) -> String {
    match took {
        Some(t) => format!("{db} bulk load: {:.1} s", t.as_secs_f64()),
        None => format!("{db}: data set already loaded by an earlier run (--data)"),
    }
}

async fn load(db: &DatabaseConnection, people: &[Person]) -> Duration {
    let start = Instant::now();
    let now = 1_700_000_000_000_000i64;
    for chunk in people.chunks(50_000) {
        let txn = db.begin().await.expect("begin");
        if txn.get_database_backend() == sea_orm::DbBackend::Sqlite {
            txn.execute_unprepared("PRAGMA cache_size = -262144")
                .await
                .expect("cache");
        }
        let mut cards = Vec::new();
        let rows: Vec<user::ActiveModel> = chunk
            .iter()
            .map(|p| {
                let mut am = new_row(&p.fields, UserSource::Csv, now);
                p.fields.apply(&mut am, &p.serials);
                let sea_orm::ActiveValue::Set(id) = am.id.clone() else {
                    unreachable!("new rows have ids")
                };
                for s in &p.serials {
                    cards.push((id.clone(), s.clone()));
                }
                am
            })
            .collect();
        insert_users(&txn, rows, &mut |_| {})
            .await
            .expect("insert users");
        for batch in cards.chunks(700) {
            let rows: Vec<credential::ActiveModel> = batch
                .iter()
                .map(|(user_id, serial)| credential::ActiveModel {
                    id: Set(uuid::Uuid::now_v7().to_string()),
                    user_id: Set(user_id.clone()),
                    card_id: Set(serial.as_bytes().to_vec()),
                    serial: Set(serial.clone()),
                    serial_key: Set(cms_directory::normalize::serial(serial)),
                    atr: Set(vec![0x3b, 0x8f]),
                    profile: Set(CardProfile::Minidriver as i32),
                    template_id: Set("00000000-0000-4000-8000-000000000001".into()),
                    template_version: Set(1),
                    master_key_version: Set(1),
                    puk_version: Set(0),
                    puk_rotation_pending: Set(false),
                    status: Set(CredentialStatus::Active as i32),
                    status_reason: Set(String::new()),
                    issued_at: Set(now),
                    last_unblock_at: Set(None),
                    last_unblock_flow: Set(Flow::Unspecified as i32),
                    unblock_count: Set(0),
                    updated_at: Set(now),
                    label: Set(String::new()),
                })
                .collect();
            credential::Entity::insert_many(rows)
                .exec(&txn)
                .await
                .expect("insert credentials");
        }
        txn.commit().await.expect("commit");
    }
    db.execute_unprepared("ANALYZE").await.expect("analyze");
    start.elapsed()
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1_000.0
}

struct Row {
    db: &'static str,
    kind: &'static str,
    p50: f64,
    p99: f64,
    max: f64,
    hits: f64,
}

async fn measure(
    dir: &Directory,
    db: &'static str,
    kind: &'static str,
    queries: &[String],
    warm_up: &[String],
) -> Row {
    // Warm-up: other queries of the same kind, not measured, so that the database's caches
    // hold what they would in a server in use (PostgreSQL starts with empty shared buffers).
    for q in warm_up {
        let _ = dir
            .search_users(&SearchUsersRequest {
                query: q.clone(),
                ..Default::default()
            })
            .await;
    }
    let mut times = Vec::with_capacity(queries.len());
    let mut slowest: Vec<(Duration, &str)> = Vec::new();
    let mut hits = 0usize;
    for q in queries {
        let start = Instant::now();
        let r = dir
            .search_users(&SearchUsersRequest {
                query: q.clone(),
                page: Some(PageRequest {
                    page_size: 20,
                    page_token: String::new(),
                }),
                ..Default::default()
            })
            .await
            .expect("search");
        times.push(start.elapsed());
        slowest.push((start.elapsed(), q.as_str()));
        hits += r.results.len();
    }
    slowest.sort_by_key(|x| std::cmp::Reverse(x.0));
    let worst: Vec<String> = slowest
        .iter()
        .take(3)
        .map(|(d, q)| format!("{q:?} {:.1} ms", d.as_secs_f64() * 1_000.0))
        .collect();
    println!("    slowest {kind} on {db}: {}", worst.join(", "));
    times.sort();
    Row {
        db,
        kind,
        p50: percentile(&times, 0.50),
        p99: percentile(&times, 0.99),
        max: percentile(&times, 1.0),
        hits: hits as f64 / queries.len() as f64,
    }
}

fn query_sets(people: &[Person], n: usize, seed: u64) -> Vec<(&'static str, Vec<String>)> {
    let mut rng = Rng(seed);
    let mut prefix = Vec::new();
    let mut email = Vec::new();
    let mut across = Vec::new();
    let mut domain = Vec::new();
    let mut serial = Vec::new();
    while prefix.len() < n {
        let p = &people[rng.below(people.len())];
        prefix.push(p.surname.chars().take(4).collect());
        let local = p.fields.email.split('@').next().unwrap_or_default();
        let chars: Vec<char> = local.chars().collect();
        let from = chars.len().saturating_sub(9).min(3);
        email.push(chars[from..(from + 8).min(chars.len())].iter().collect());
        // Across the "@": one to four characters on each side ("u@eu.e", "berg@ex").
        let all: Vec<char> = p.fields.email.chars().collect();
        let at = all.iter().position(|c| *c == '@').unwrap_or(0);
        let (before, after) = (1 + rng.below(4), 1 + rng.below(4));
        let start = at.saturating_sub(before);
        across.push(all[start..(at + 1 + after).min(all.len())].iter().collect());
        // Within the domain: 4 to 8 characters from anywhere in it ("ample.co", "l.exam").
        let host: Vec<char> = all[at + 1..].to_vec();
        let len = (4 + rng.below(5)).min(host.len());
        let start = rng.below(host.len() - len + 1);
        domain.push(host[start..start + len].iter().collect());
        if let Some(s) = p.serials.first() {
            serial.push(s.clone());
        }
    }
    // Short queries as a helpdesk types them, rare and common; strings no user has; employee
    // ids as typed (some in lower case).
    const SHORT: &[char] = &[
        'a', 'e', 'q', 'x', 'z', 'w', '1', '0', '@', '.', '$', '+', '-', 'k', 'ö', 'y',
    ];
    let mut one = Vec::new();
    let mut two = Vec::new();
    let mut absent = Vec::new();
    let mut employee = Vec::new();
    while one.len() < n {
        one.push(SHORT[rng.below(SHORT.len())].to_string());
        two.push((0..2).map(|_| SHORT[rng.below(SHORT.len())]).collect());
        absent.push(format!(
            "{}q{}x{}",
            ["zz", "wq", "jx", "qv"][rng.below(4)],
            rng.below(100),
            ["k", "zq", "vv"][rng.below(3)]
        ));
        let id = people[rng.below(people.len())].fields.external_id.clone();
        employee.push(if rng.below(2) == 0 {
            id.to_lowercase()
        } else {
            id
        });
    }
    vec![
        ("surname prefix (4 chars)", prefix),
        ("email substring (8 chars)", email),
        ("email across \"@\"", across),
        ("email domain substring", domain),
        ("exact card serial", serial),
        ("1 char", one),
        ("2 chars", two),
        ("absent string", absent),
        ("employee id", employee),
    ]
}

/// Runs `queries` from 8 clients at once: (searches per second, p99 ms).
async fn concurrent(dir: &Directory, queries: &[String]) -> (f64, f64) {
    const CLIENTS: usize = 8;
    let start = Instant::now();
    let tasks: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let dir = dir.clone();
            let mine: Vec<String> = queries.iter().skip(c).step_by(CLIENTS).cloned().collect();
            tokio::spawn(async move {
                let mut times = Vec::with_capacity(mine.len());
                for q in mine {
                    let t = Instant::now();
                    dir.search_users(&SearchUsersRequest {
                        query: q,
                        page: Some(PageRequest {
                            page_size: 20,
                            page_token: String::new(),
                        }),
                        ..Default::default()
                    })
                    .await
                    .expect("search");
                    times.push(t.elapsed());
                }
                times
            })
        })
        .collect();
    let mut times = Vec::new();
    for t in tasks {
        times.extend(t.await.expect("client"));
    }
    let took = start.elapsed();
    times.sort();
    (
        times.len() as f64 / took.as_secs_f64(),
        percentile(&times, 0.99),
    )
}

/// Registers `n` new cards for random users of `people`, `in_flight` at a time: (cards per
/// second, p50 ms, p99 ms, errors, of them INTERNAL).
async fn registrations(
    dir: &Directory,
    people: &[Person],
    n: usize,
    in_flight: usize,
    seed: u64,
) -> (f64, f64, f64, usize, usize) {
    use cms_proto::directory::v1::Credential;
    // The users' ids, from their usernames.
    let mut rng = Rng(seed);
    let mut owners = Vec::with_capacity(n);
    for _ in 0..n.min(500) {
        let p = &people[rng.below(people.len())];
        let r = dir
            .search_users(&SearchUsersRequest {
                query: p.fields.external_id.clone(),
                ..Default::default()
            })
            .await
            .expect("owner");
        if let Some(u) = r.results.first().and_then(|x| x.user.as_ref()) {
            owners.push(u.id.clone());
        }
    }
    let owners = std::sync::Arc::new(owners);
    // Card ids new in every run (a kept --data set is registered into again).
    let run = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros());
    let start = Instant::now();
    let tasks: Vec<_> = (0..in_flight)
        .map(|t| {
            let (dir, owners) = (dir.clone(), owners.clone());
            tokio::spawn(async move {
                let (mut times, mut errors, mut internal) = (Vec::new(), 0, 0);
                for i in (t..n).step_by(in_flight) {
                    let card = Credential {
                        user_id: owners[i % owners.len()].clone(),
                        card_id: format!("bench-{run}-{seed}-{i}").into_bytes(),
                        serial: format!("RG{seed:02}{i:08}"),
                        profile: CardProfile::Minidriver as i32,
                        template_id: "00000000-0000-4000-8000-000000000001".into(),
                        template_version: 1,
                        master_key_version: 1,
                        ..Default::default()
                    };
                    let at = Instant::now();
                    match dir.register_credential(Some(card)).await {
                        Ok(_) => {}
                        Err(e) => {
                            errors += 1;
                            if tonic::Status::from(e).code() == tonic::Code::Internal {
                                internal += 1;
                            }
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

/// This process's resident memory, MiB (Linux): all of it (`VmRSS`), or only its own
/// (`RssAnon`: without the pages of mapped files, which SQLite's memory map of the database
/// adds and the system can take back at any time).
fn rss_mib() -> f64 {
    status_mib("VmRSS:")
}

fn own_mib() -> f64 {
    status_mib("RssAnon:")
}

fn status_mib(field: &str) -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Queries of each kind run before the measured ones (from another seed).
const WARM_UP_QUERIES: usize = 300;

fn warm_up<'a>(sets: &'a [(&'static str, Vec<String>)], kind: &str) -> &'a [String] {
    sets.iter()
        .find(|(k, _)| *k == kind)
        .map_or(&[], |(_, q)| q.as_slice())
}

fn directory(db: DatabaseConnection) -> Directory {
    Directory::new(
        db,
        SecretKey::from_bytes(&[9; 32]),
        SelfServiceSettings::default(),
    )
}

async fn sqlite_db(dir: &Path) -> DatabaseConnection {
    std::fs::create_dir_all(dir).expect("sqlite dir");
    let db = cms_kit::db::connect(&Default::default(), dir, "directory")
        .await
        .expect("sqlite");
    cms_directory::migration::run(&db).await.expect("migrate");
    db
}

/// Imports `n` users from CSV into a new SQLite database: (users per second, time taken, RSS
/// and own memory once the directory is open and idle).
async fn import_rate(n: usize) -> (f64, Duration, (f64, f64)) {
    let dir = tempfile::tempdir().expect("tmp");
    let d = directory(sqlite_db(dir.path()).await);
    let idle = (rss_mib(), own_mib());
    let mut csv = String::from("username,display_name,email,phone,org_unit,external_id\n");
    for p in people(n, 0, 7) {
        let f = &p.fields;
        csv.push_str(&format!(
            "{},{},{},{},\"{}\",{}\n",
            f.username, f.display_name, f.email, f.phone, f.org_unit, f.external_id
        ));
    }
    let start = Instant::now();
    let records = import::parse_csv(csv.as_bytes(), true, b',').expect("valid CSV");
    drop(csv);
    println!(
        "  CSV parse + validation of {n} users: {:.2} s",
        start.elapsed().as_secs_f64()
    );
    let report = d
        .apply_import(
            records,
            UserSource::Csv,
            Options {
                update_existing: true,
                disable_missing: false,
                dry_run: false,
                overwrite_ldap_users: false,
            },
            &mut |_| {},
        )
        .await
        .expect("import");
    let took = start.elapsed();
    assert_eq!(report.created as usize, n);
    (n as f64 / took.as_secs_f64(), took, idle)
}

/// The 8-client searches and the card registrations on database `db`, as notes.
async fn extra(
    d: &Directory,
    db: &str,
    sets: &[(&'static str, Vec<String>)],
    people: &[Person],
    registrations_n: usize,
    notes: &mut Vec<String>,
) {
    for (kind, queries) in sets.iter().filter(|(_, q)| !q.is_empty()) {
        let (rate, p99) = concurrent(d, queries).await;
        notes.push(format!(
            "{db} {kind}, 8 clients: {rate:.0} searches/s, p99 {p99:.2} ms"
        ));
        println!("{}", notes.last().map(String::as_str).unwrap_or_default());
    }
    if registrations_n == 0 {
        return;
    }
    for (in_flight, seed) in [(1, 1), (16, 2)] {
        let n = if in_flight == 1 {
            registrations_n / 4
        } else {
            registrations_n
        };
        let (rate, p50, p99, errors, internal) = registrations(d, people, n, in_flight, seed).await;
        notes.push(format!(
            "{db} card registration, {in_flight} in flight: {n} cards, {rate:.0}/s, p50 {p50:.2} ms, p99 {p99:.2} ms, {errors} errors ({internal} INTERNAL)"
        ));
        println!("{}", notes.last().map(String::as_str).unwrap_or_default());
    }
}

async fn run() {
    let a = args();
    println!(
        "directory search benchmark: {} users, {} credentials, {} queries per kind, page size 20",
        a.users, a.credentials, a.queries
    );
    let mut rows = Vec::new();
    let mut notes = Vec::new();
    // The import first, while the process holds nothing else.
    if a.sqlite && a.import_users > 0 {
        {
            let peak = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
            let sampling = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
            let sampler = {
                let (peak, sampling) = (peak.clone(), sampling.clone());
                std::thread::spawn(move || {
                    while sampling.load(std::sync::atomic::Ordering::Relaxed) {
                        peak.fetch_max(rss_mib() as u64, std::sync::atomic::Ordering::Relaxed);
                        std::thread::sleep(Duration::from_millis(100));
                    }
                })
            };
            let (rate, took, (idle, idle_own)) = import_rate(a.import_users).await;
            sampling.store(false, std::sync::atomic::Ordering::Relaxed);
            sampler.join().expect("sampler");
            notes.push(format!(
                "RSS of the bench process (the directory in-process) around the CSV import of {} users: {idle:.0} MiB idle (own {idle_own:.0}), {} MiB at most during, {:.0} MiB after (own {:.0})",
                a.import_users,
                peak.load(std::sync::atomic::Ordering::Relaxed),
                rss_mib(),
                own_mib()
            ));
            notes.push(format!(
                "CSV import on SQLite: {} users in {:.2} s = {:.0} users/s (parse + validate + match + insert + search index, one transaction)",
                a.import_users,
                took.as_secs_f64(),
                rate
            ));
            println!("{}", notes.last().map(String::as_str).unwrap_or_default());
        }
    }
    let t = Instant::now();
    let people = people(a.users, a.credentials, 1);
    println!("generated data in {:.1} s", t.elapsed().as_secs_f64());
    let sets = if a.only.is_empty() {
        query_sets(&people, a.queries, 42)
    } else {
        vec![("given", a.only.clone())]
    };
    // None when nothing is measured (an import-only run has no users to draw queries from).
    let warm_ups = query_sets(&people, WARM_UP_QUERIES.min(a.queries), 7);
    let data_set = format!("{} users, {} credentials", a.users, a.credentials);
    if a.sqlite {
        let dir = tempfile::tempdir().expect("tmp");
        let path = a
            .data
            .as_ref()
            .map(|d| d.join("sqlite"))
            .unwrap_or_else(|| dir.path().to_owned());
        let db = sqlite_db(&path).await;
        let marker = a.data.as_ref().map(|d| d.join("sqlite.loaded"));
        let took = load_once(&db, &people, marker, &data_set).await;
        notes.push(describe_load("SQLite", took));
        println!("{}", notes.last().map(String::as_str).unwrap_or_default());
        let d = directory(db);
        for (kind, queries) in sets.iter().filter(|(_, q)| !q.is_empty()) {
            let row = measure(&d, "SQLite", kind, queries, warm_up(&warm_ups, kind)).await;
            println!(
                "  {} {}: p50 {:.2} ms, p99 {:.2} ms",
                row.db, row.kind, row.p50, row.p99
            );
            rows.push(row);
        }
        extra(&d, "SQLite", &sets, &people, a.registrations, &mut notes).await;
    }
    if a.postgres {
        let pg = Pg::start(
            a.data.as_ref().map(|d| d.join("pg")).as_deref(),
            "shared_buffers = 1GB\nwork_mem = 32MB\nmaintenance_work_mem = 512MB",
        );
        let settings = cms_kit::db::DatabaseSettings {
            url: Some(pg.url()),
            max_connections: 8,
        };
        let db = cms_kit::db::connect(&settings, Path::new("/nonexistent"), "directory")
            .await
            .expect("postgres");
        cms_directory::migration::run(&db).await.expect("migrate");
        let marker = a.data.as_ref().map(|d| d.join("pg.loaded"));
        let took = load_once(&db, &people, marker, &data_set).await;
        notes.push(describe_load("PostgreSQL", took));
        println!("{}", notes.last().map(String::as_str).unwrap_or_default());
        let d = directory(db);
        for (kind, queries) in sets.iter().filter(|(_, q)| !q.is_empty()) {
            let row = measure(&d, "PostgreSQL", kind, queries, warm_up(&warm_ups, kind)).await;
            println!(
                "  {} {}: p50 {:.2} ms, p99 {:.2} ms",
                row.db, row.kind, row.p50, row.p99
            );
            rows.push(row);
        }
        extra(
            &d,
            "PostgreSQL",
            &sets,
            &people,
            a.registrations,
            &mut notes,
        )
        .await;
        drop(pg);
    }
    println!();
    println!(
        "| database   | search                     |  p50 ms |  p99 ms |  max ms | hits/page |"
    );
    println!(
        "|------------|----------------------------|--------:|--------:|--------:|----------:|"
    );
    for r in &rows {
        println!(
            "| {:<10} | {:<26} | {:>7.2} | {:>7.2} | {:>7.2} | {:>9.1} |",
            r.db, r.kind, r.p50, r.p99, r.max, r.hits
        );
    }
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
