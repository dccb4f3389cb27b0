//! Custody replicas on one database.
//!
//! PostgreSQL: two custody processes run active/standby. The second one started is a standby:
//! not ready, and it refuses cryptograms with UNAVAILABLE and a retry hint. A master key version
//! is retired on the active one while the standby is already up; then the active one is
//! SIGKILLed, several times over, under a load of cryptograms: each time the standby takes over
//! within 5 s, and the first one to take over refuses the retired version. Afterwards the chain
//! verifies, no sequence number or request is recorded twice, and every acknowledged cryptogram
//! has its record.
//!
//! SQLite: a second custody on the same database file refuses to start, naming the lock file.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cms_kit::client::Channel;
use cms_launcher::layout::{Layout, Peers, Ports};
use cms_launcher::supervise::{self, SuperviseError};
use cms_proto::common::v1::{ActorKind, AuthContext, DiversificationScheme, KeyAlgorithm};
use cms_proto::custody::v1::custody_service_client::CustodyServiceClient;
use cms_proto::custody::v1::*;
use cms_tests::inproc;
use cms_tests::pki::{TRUST_DOMAIN, TestPki};
use cms_tests::postgres::Postgres;
use tokio::process::{Child, Command};
use tonic::Code;

const FAILOVERS: usize = 4;
const WORKERS: usize = 4;
const FAILOVER_TARGET: Duration = Duration::from_secs(5);

type Client = CustodyServiceClient<Channel>;

/// One custody process and where it listens.
struct Instance {
    layout: Layout,
    process: Child,
    grpc: SocketAddr,
    ops: SocketAddr,
}

/// Starts `cms serve custody` with `layout`'s config and waits until it has announced its
/// addresses (a standby never becomes ready, so readiness is checked by the caller).
async fn spawn(layout: &Layout) -> Instance {
    let announce = layout.announce_path("custody");
    let _ = std::fs::remove_file(&announce);
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(layout.log_path("custody"))
        .unwrap();
    let mut process = Command::new(cms_tests::binary("cms"))
        .arg("serve")
        .arg("custody")
        .arg("--config")
        .arg(layout.config_path("custody"))
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = process.try_wait().unwrap() {
            panic!(
                "custody exited ({status}):\n{}",
                supervise::tail(&layout.log_path("custody"), 20)
            );
        }
        if let Some((grpc, ops)) = cms_kit::server::read_announce(&announce) {
            return Instance {
                layout: layout.clone(),
                process,
                grpc,
                ops,
            };
        }
        assert!(Instant::now() < deadline, "custody did not announce itself");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn readyz(instance: &Instance) -> (u16, String) {
    cms_kit::ops::http_get(instance.ops, "/readyz")
        .await
        .unwrap_or((0, String::new()))
}

/// Waits until `instance` is ready; how long that took.
async fn ready_within(instance: &Instance, limit: Duration) -> Duration {
    let started = Instant::now();
    while readyz(instance).await.0 != 200 {
        assert!(
            started.elapsed() < limit,
            "not ready within {limit:?}: {:?}\n{}",
            readyz(instance).await,
            supervise::tail(&instance.layout.log_path("custody"), 20)
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    started.elapsed()
}

/// Makes the next start of `layout`'s custody listen where `instance` does now, so that its
/// clients reach it again.
fn pin(instance: &Instance) {
    let path = instance.layout.config_path("custody");
    let config = std::fs::read_to_string(&path).unwrap();
    let pinned = config.replacen(
        "\nlisten = \"127.0.0.1:0\"",
        &format!("\nlisten = \"{}\"", instance.grpc),
        1,
    );
    std::fs::write(path, pinned).unwrap();
}

fn auth(request_id: &str) -> Option<AuthContext> {
    Some(AuthContext {
        actor_kind: ActorKind::Service as i32,
        request_id: request_id.into(),
        ..Default::default()
    })
}

fn cryptogram(request_id: &str, version: u32, n: u32) -> ComputeCryptogramRequest {
    let mut challenge = [0u8; 16];
    challenge[..4].copy_from_slice(&n.to_be_bytes());
    challenge[4..8].copy_from_slice(&version.to_be_bytes());
    ComputeCryptogramRequest {
        card_id: request_id.as_bytes().to_vec(),
        challenge: challenge.to_vec(),
        master_key_reference: "mk".into(),
        master_key_version: version,
        scheme: DiversificationScheme::Sp800108Cmac as i32,
        admin_key_algorithm: KeyAlgorithm::Aes128 as i32,
        auth: auth(request_id),
        challenge_code: None,
    }
}

/// Every cryptogram record: request id -> (sequence, outcome); asserts none is recorded twice
/// and no sequence number appears twice.
async fn cryptogram_records(client: &mut Client) -> HashMap<String, (u64, i32)> {
    let mut recorded = HashMap::new();
    let mut sequences = std::collections::HashSet::new();
    let mut token = String::new();
    loop {
        let page = client
            .query_audit(QueryAuditRequest {
                page: Some(cms_proto::common::v1::PageRequest {
                    page_size: 1000,
                    page_token: token.clone(),
                }),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        for r in page.records {
            assert!(
                sequences.insert(r.sequence),
                "sequence {} twice",
                r.sequence
            );
            let ctx = r.context.unwrap_or_default();
            if r.event == AuditEvent::Cryptogram as i32 && !ctx.request_id.is_empty() {
                let previous = recorded.insert(ctx.request_id.clone(), (r.sequence, r.outcome));
                assert!(previous.is_none(), "{} recorded twice", ctx.request_id);
            }
        }
        token = page.page.unwrap_or_default().next_page_token;
        if token.is_empty() {
            return recorded;
        }
    }
}

/// Two custody layouts on one new PostgreSQL database, with one PKI (copied from the first
/// layout to the second).
struct Pair {
    _dir: tempfile::TempDir,
    pki: TestPki,
    first: Layout,
    second: Layout,
    /// The database's name.
    database: String,
}

/// Two layouts under a new temp dir, the second with a copy of the first one's PKI.
fn layouts() -> (tempfile::TempDir, TestPki, Layout, Layout) {
    let dir = tempfile::tempdir().unwrap();
    let first = Layout::new(&dir.path().join("a"), TRUST_DOMAIN).unwrap();
    let second = Layout::new(&dir.path().join("b"), TRUST_DOMAIN).unwrap();
    let pki = TestPki::new(&first.data_dir);
    first.create_dirs().unwrap();
    second.create_dirs().unwrap();
    let copy = second.data_dir.join("pki");
    std::fs::create_dir_all(&copy).unwrap();
    for entry in std::fs::read_dir(first.data_dir.join("pki")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), copy.join(entry.file_name())).unwrap();
    }
    (dir, pki, first, second)
}

fn write_config(layout: &Layout, extra: &str) {
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let ports = Ports {
        grpc: any,
        ops: any,
    };
    let config = layout
        .service_config("custody", ports, &Peers::default(), extra)
        .unwrap();
    std::fs::write(layout.config_path("custody"), config).unwrap();
}

fn pair(pg: &Postgres) -> Pair {
    let url = pg.create_database();
    // postgres://cms@localhost/<database>?host=<socket dir>
    let database = url
        .split('?')
        .next()
        .and_then(|base| base.rsplit('/').next())
        .unwrap()
        .to_owned();
    let (dir, pki, first, second) = layouts();
    let extra = format!(
        "[guards]\ncaller_rate_per_sec = 100000.0\ncaller_burst = 100000\n\n[database]\nurl = {url:?}\n"
    );
    write_config(&first, &extra);
    write_config(&second, &extra);
    Pair {
        _dir: dir,
        pki,
        first,
        second,
        database,
    }
}

/// Gives the second layout the dev seal file the first one's custody made at its first start
/// (the one key-encryption key of the database).
fn share_seal(first: &Layout, second: &Layout) {
    let file = |layout: &Layout| layout.service_dir("custody").join("dev-seal.key");
    std::fs::create_dir_all(second.service_dir("custody")).unwrap();
    std::fs::copy(file(first), file(second)).unwrap();
}

fn connect(pki: &TestPki, instance: &Instance) -> Client {
    CustodyServiceClient::new(inproc::channel(
        pki.tls("gateway"),
        instance.grpc,
        pki.id("custody"),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_standby_takes_over_with_the_database_key_state_and_chain() {
    let pg = Postgres::shared();
    let Pair {
        pki, first, second, ..
    } = &pair(&pg);
    let a = spawn(first).await;
    ready_within(&a, Duration::from_secs(30)).await;
    pin(&a);
    let mut client_a = connect(pki, &a);
    client_a
        .generate_master_key(GenerateMasterKeyRequest {
            reference: "mk".into(),
            algorithm: KeyAlgorithm::Aes128 as i32,
            ..Default::default()
        })
        .await
        .unwrap();
    client_a
        .compute_cryptogram(cryptogram("before-standby", 1, 0))
        .await
        .unwrap();

    // The second one stands by: not ready, refusing with a retry hint, status still answered.
    share_seal(first, second);
    let b = spawn(second).await;
    pin(&b);
    let mut client_b = connect(pki, &b);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let (code, body) = readyz(&b).await;
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("standby"), "{body}");
    let refused = client_b
        .compute_cryptogram(cryptogram("to-standby", 1, 1))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    let detail = cms_custody::error::detail(&refused).expect("error detail");
    assert!(detail.retry_after_seconds >= 1, "{detail:?}");
    let status = client_b
        .get_status(GetStatusRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(status.detail.contains("standby"), "{status:?}");
    assert_eq!(readyz(&a).await.0, 200);

    // Key state changes on the active one while the standby is up.
    let rotated = client_a
        .rotate_master_key(RotateMasterKeyRequest {
            reference: "mk".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .key
        .unwrap();
    assert_eq!(rotated.version, 2);
    client_a
        .retire_master_key_version(RetireMasterKeyVersionRequest {
            reference: "mk".into(),
            version: 1,
            reason: "compromised".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let retired = client_a
        .compute_cryptogram(cryptogram("retired-on-a", 1, 2))
        .await
        .unwrap_err();
    assert_eq!(retired.code(), Code::FailedPrecondition, "{retired:?}");

    let clients = [client_a.clone(), client_b.clone()];
    let mut instances = [a, b];
    let mut active = 0;
    let answered: Arc<Mutex<HashMap<String, u64>>> = Arc::default();
    let mut failovers = Vec::new();
    for round in 0..FAILOVERS {
        let stop = Arc::new(AtomicBool::new(false));
        let mut workers = Vec::new();
        for worker in 0..WORKERS {
            let clients = clients.clone();
            let answered = answered.clone();
            let stop = stop.clone();
            workers.push(tokio::spawn(async move {
                let mut n = 0u32;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let request_id = format!("r{round}-w{worker}-{n}");
                    // Whichever answers: the other is dead or standing by.
                    let mut client = clients[n as usize % 2].clone();
                    match client
                        .compute_cryptogram(cryptogram(&request_id, 2, n))
                        .await
                    {
                        Ok(r) => {
                            let seq = r.into_inner().audit_sequence;
                            assert!(answered.lock().unwrap().insert(request_id, seq).is_none());
                        }
                        Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
                    }
                }
            }));
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let killed = &mut instances[active];
        killed.process.start_kill().unwrap();
        killed.process.wait().await.unwrap();
        let standby = 1 - active;
        let took = ready_within(&instances[standby], Duration::from_secs(20)).await;
        failovers.push(took);
        if round == 0 {
            // The version retired before the failover stays retired after it.
            let mut client = clients[standby].clone();
            let refused = client
                .compute_cryptogram(cryptogram("retired-after-failover", 1, 3))
                .await
                .unwrap_err();
            assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
            assert!(refused.message().contains("retired"), "{refused:?}");
        }
        // The killed one comes back, as a standby.
        let layout = instances[active].layout.clone();
        instances[active] = spawn(&layout).await;
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert_eq!(readyz(&instances[active]).await.0, 503);
        active = standby;
        tokio::time::sleep(Duration::from_millis(300)).await;
        stop.store(true, Ordering::Relaxed);
        for w in workers {
            w.await.unwrap();
        }
    }

    let mut client = clients[active].clone();
    let recorded = cryptogram_records(&mut client).await;
    let answered = answered.lock().unwrap().clone();
    assert!(
        answered.len() > FAILOVERS * 10,
        "too little load: {}",
        answered.len()
    );
    for (request_id, seq) in &answered {
        let (recorded_seq, outcome) = recorded
            .get(request_id)
            .unwrap_or_else(|| panic!("acknowledged {request_id} has no audit record"));
        assert_eq!(recorded_seq, seq, "{request_id}");
        assert_eq!(*outcome, AuditOutcome::Success as i32);
    }
    let verdict = client
        .verify_audit(VerifyAuditRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(verdict.ok, "{verdict:?}");
    let slowest = failovers.iter().max().copied().unwrap_or_default();
    let mut sorted = failovers.clone();
    sorted.sort();
    println!(
        "failovers (SIGKILL of the active to the standby ready): {failovers:?}; p50 {:?}, max {slowest:?}; {} acknowledged cryptograms, {} audit records",
        sorted[sorted.len() / 2],
        answered.len(),
        verdict.records_checked
    );
    assert!(slowest < FAILOVER_TARGET, "slowest failover {slowest:?}");
}

/// The active instance's lease session is ended from the database side (as when its network
/// or database connection breaks) while the process lives on: it stops answering and stands
/// by; one instance serves again within 5 s and the chain goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_active_instance_that_loses_its_lease_session_stands_by() {
    let pg = Postgres::shared();
    let Pair {
        pki,
        first,
        second,
        database,
        ..
    } = &pair(&pg);
    let a = spawn(first).await;
    ready_within(&a, Duration::from_secs(30)).await;
    let mut client_a = connect(pki, &a);
    client_a
        .generate_master_key(GenerateMasterKeyRequest {
            reference: "mk".into(),
            algorithm: KeyAlgorithm::Aes128 as i32,
            ..Default::default()
        })
        .await
        .unwrap();
    share_seal(first, second);
    let b = spawn(second).await;
    let client_b = connect(pki, &b);
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(readyz(&b).await.0, 503);

    let ended = pg.psql(
        database,
        "SELECT count(pg_terminate_backend(pid, 5000)) FROM pg_locks WHERE locktype = 'advisory' \
         AND granted AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
    );
    assert_eq!(ended.trim(), "1", "one lease session");
    let cut = Instant::now();
    // The session is gone (the termination waited for it): the very next cryptogram on the
    // first one is refused, whether or not it has noticed yet, since its audit appends are
    // fenced by the lease session. Then it notices and stands by.
    let refused = client_a
        .compute_cryptogram(cryptogram("after-cut", 1, 1))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    let stood_down = cut.elapsed();
    while !std::fs::read_to_string(first.log_path("custody"))
        .unwrap()
        .contains("custody lease lost")
    {
        assert!(
            cut.elapsed() < Duration::from_secs(3),
            "the first instance did not notice its lease was lost"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // One of them serves again, and the chain goes on.
    let deadline = Instant::now() + FAILOVER_TARGET;
    let mut serving = loop {
        let ready = [readyz(&a).await.0 == 200, readyz(&b).await.0 == 200];
        match ready {
            [true, true] => panic!("both instances are ready"),
            [true, false] => break client_a.clone(),
            [false, true] => break client_b.clone(),
            [false, false] => {}
        }
        assert!(Instant::now() < deadline, "nobody took the lease");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let took = cut.elapsed();
    serving
        .compute_cryptogram(cryptogram("after-takeover", 1, 2))
        .await
        .unwrap();
    let verdict = serving
        .verify_audit(VerifyAuditRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(verdict.ok, "{verdict:?}");
    println!(
        "lease session ended: first instance refusing after {stood_down:?}, one serving again after {took:?}"
    );
}

/// Custody unsealed by custodian shares whose lease session ends (a database restart, a broken
/// connection) takes its lease again and serves unsealed: a database blip does not call the
/// custodians back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_taken_again_keeps_custody_unsealed() {
    let pg = Postgres::shared();
    let url = pg.create_database();
    let database = url
        .split('?')
        .next()
        .and_then(|base| base.rsplit('/').next())
        .unwrap()
        .to_owned();
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new(dir.path());
    let mut config: cms_custody::Config = inproc::config(dir.path(), "custody", &Peers::default());
    config.database.url = Some(url.clone());
    // No dev seal file: the key-encryption key comes from custodian shares.
    config.seal.dev_seal_file = None;
    let server = inproc::Running::start(config, cms_custody::run).await;
    let mut client: Client = CustodyServiceClient::new(inproc::channel(
        pki.tls("gateway"),
        server.grpc,
        pki.id("custody"),
    ));
    client
        .init_seal(InitSealRequest {
            threshold: 2,
            share_count: 3,
            ..Default::default()
        })
        .await
        .unwrap();
    client
        .generate_master_key(GenerateMasterKeyRequest {
            reference: "mk".into(),
            algorithm: KeyAlgorithm::Aes128 as i32,
            ..Default::default()
        })
        .await
        .unwrap();
    client
        .compute_cryptogram(cryptogram("before-cut", 1, 1))
        .await
        .unwrap();
    pg.psql(
        &database,
        "SELECT pg_terminate_backend(pid, 5000) FROM pg_locks WHERE locktype = 'advisory' \
         AND granted AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
    );
    let cut = Instant::now();
    // Refused while the lease is gone (the audit append is fenced), then served again.
    let refused = client
        .compute_cryptogram(cryptogram("at-cut", 1, 2))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    let mut n = 2;
    loop {
        n += 1;
        match client
            .compute_cryptogram(cryptogram(&format!("after-cut-{n}"), 1, n))
            .await
        {
            Ok(_) => break,
            Err(status) => {
                assert_eq!(status.code(), Code::Unavailable, "{status:?}");
                assert!(cut.elapsed() < FAILOVER_TARGET, "not serving again");
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.stop().await.unwrap();
}

#[tokio::test]
async fn a_second_custody_on_one_sqlite_file_refuses_to_start() {
    let (_dir, _pki, first, second) = layouts();
    write_config(&first, "");
    // The second one's database is the first one's file.
    let file = first.service_dir("custody").join("custody.sqlite3");
    let url = format!("sqlite://{}?mode=rwc", file.display());
    write_config(&second, &format!("[database]\nurl = {url:?}\n"));
    let exe = cms_tests::binary("cms");
    let running = supervise::start(&exe, &first, "custody", Duration::from_secs(30))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let refused = supervise::start(&exe, &second, "custody", Duration::from_secs(30))
        .await
        .unwrap_err();
    let SuperviseError::Died { tail, status, .. } = refused else {
        panic!("the second custody did not exit: {refused}");
    };
    assert!(!status.success());
    let lock_file = first.service_dir("custody").join("custody.sqlite3.lock");
    assert!(
        tail.contains(&lock_file.display().to_string()) && tail.contains("another custody"),
        "{tail}"
    );
    // The first one serves on.
    assert!(matches!(
        cms_kit::ops::http_get(running.ops, "/readyz").await,
        Ok((200, _))
    ));
}
