//! The server side scaled out on one machine, as the Helm chart runs it on PostgreSQL: one
//! PostgreSQL, two gateways, two directories, two templates and two custody instances
//! (active/standby), all real processes over mutual TLS (`cms_tests::scale`).
//!
//! - Key administration goes through gateway A (generate, rotate, retire a version); the
//!   directory is written through both gateways and read back through each (active/active).
//! - Cryptogram load arrives through two fronts, one per gateway, at custody's Service. Until
//!   the gateway serves HelpdeskService.ComputeOfflineResponse, each front calls custody's
//!   cryptogram RPC directly with the gateway's identity, through the same custody Service
//!   the gateways dial: the custody side (lease, failover, audit, guards) is the same.
//! - The figure: cryptograms/s through two fronts against one, in the same run.
//! - The active custody is SIGKILLed 5 times under load. Each time the standby takes over
//!   within 5 s (measured to its /readyz and to the first acknowledged cryptogram), the killed
//!   one comes back as the standby, both gateways reach custody again, and a master key
//!   version retired before the first failover is refused after each one.
//! - A card's limit of 5 cryptograms holds across fronts and failovers.
//! - At the end every acknowledged cryptogram has its audit record (same sequence, success),
//!   no request and no sequence number is recorded twice, and the chain verifies.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cms_kit::client::Channel;
use cms_proto::common::v1::{
    ActorKind, AuthContext, DiversificationScheme, KeyAlgorithm, PageRequest,
};
use cms_proto::custody::v1::custody_service_client::CustodyServiceClient;
use cms_proto::custody::v1::{
    AuditEvent, AuditOutcome, ComputeCryptogramRequest, MasterKeyState, QueryAuditRequest,
    VerifyAuditRequest,
};
use cms_proto::directory::v1::Operator;
use cms_proto::gateway::v1 as gw;
use cms_proto::gateway::v1::admin_service_client::AdminServiceClient;
use cms_tests::inproc;
use cms_tests::postgres::Postgres;
use cms_tests::scale::{ScaleOut, wait_until};
use tonic::{Code, Status};

const FAILOVERS: usize = 5;
/// Concurrent requests per front.
const WORKERS_PER_FRONT: usize = 6;
const FAILOVER_TARGET: Duration = Duration::from_secs(5);
/// Length of each throughput phase (one front, then two).
const PHASE: Duration = Duration::from_millis(2500);
/// custody's default per-card limit (cryptograms per card per day).
const CARD_LIMIT: u32 = 5;
const KEY: &str = "mk";

type Custody = CustodyServiceClient<Channel>;
type Admin = AdminServiceClient<Channel>;

/// Where cryptogram load enters: one per gateway.
#[derive(Clone)]
struct Front {
    name: &'static str,
    custody: Custody,
}

impl Front {
    /// A cryptogram for `card` (a new challenge each call) with master key `version`: the
    /// audit sequence of its record, or why it was refused.
    async fn cryptogram(
        &mut self,
        request_id: &str,
        card: &str,
        version: u32,
    ) -> Result<u64, Status> {
        self.custody
            .compute_cryptogram(cryptogram(request_id, card, version))
            .await
            .map(|r| r.into_inner().audit_sequence)
    }

    /// As [`Front::cryptogram`], retried while custody is unavailable (failing over, the
    /// connection to the old active one being replaced), for at most the failover target.
    async fn settled(&mut self, request_id: &str, card: &str, version: u32) -> Result<u64, Status> {
        let started = Instant::now();
        let mut attempt = 0;
        loop {
            attempt += 1;
            let id = format!("{request_id}-try{attempt}");
            match self.cryptogram(&id, card, version).await {
                Err(s) if s.code() == Code::Unavailable && started.elapsed() < FAILOVER_TARGET => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                other => return other,
            }
        }
    }
}

static CHALLENGES: AtomicU64 = AtomicU64::new(1);

fn cryptogram(request_id: &str, card: &str, version: u32) -> ComputeCryptogramRequest {
    // A challenge never sent before: custody refuses a repeated (card, challenge) pair.
    let mut challenge = [0u8; 16];
    challenge[..8].copy_from_slice(&CHALLENGES.fetch_add(1, Ordering::Relaxed).to_be_bytes());
    ComputeCryptogramRequest {
        card_id: card.as_bytes().to_vec(),
        challenge: challenge.to_vec(),
        master_key_reference: KEY.into(),
        master_key_version: version,
        scheme: DiversificationScheme::Sp800108Cmac as i32,
        admin_key_algorithm: KeyAlgorithm::Aes128 as i32,
        auth: Some(AuthContext {
            actor_kind: ActorKind::Service as i32,
            request_id: request_id.into(),
            ..Default::default()
        }),
        challenge_code: None,
    }
}

/// What the load saw: acknowledged request ids with their audit sequence, and refusals.
#[derive(Default)]
struct Ledger {
    acknowledged: Mutex<HashMap<String, u64>>,
    acks: AtomicU64,
    refused: Mutex<HashMap<Code, u64>>,
}

/// Load on `fronts` (WORKERS_PER_FRONT each, one card per request) until stopped.
struct Load {
    stop: Arc<AtomicBool>,
    workers: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(fronts: &[Front], tag: &str, ledger: &Arc<Ledger>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let mut workers = Vec::new();
        for front in fronts {
            for w in 0..WORKERS_PER_FRONT {
                let mut front = front.clone();
                let ledger = ledger.clone();
                let stop = stop.clone();
                let prefix = format!("{tag}-{}-w{w}", front.name);
                workers.push(tokio::spawn(async move {
                    let mut n = 0u32;
                    while !stop.load(Ordering::Relaxed) {
                        n += 1;
                        let id = format!("{prefix}-{n}");
                        match front.cryptogram(&id, &id, 2).await {
                            Ok(seq) => {
                                let fresh = ledger
                                    .acknowledged
                                    .lock()
                                    .unwrap()
                                    .insert(id.clone(), seq)
                                    .is_none();
                                assert!(fresh, "{id} acknowledged twice");
                                ledger.acks.fetch_add(1, Ordering::SeqCst);
                            }
                            Err(status) => {
                                *ledger
                                    .refused
                                    .lock()
                                    .unwrap()
                                    .entry(status.code())
                                    .or_default() += 1;
                                tokio::time::sleep(Duration::from_millis(5)).await;
                            }
                        }
                    }
                }));
            }
        }
        Self { stop, workers }
    }

    async fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        for w in self.workers {
            w.await.expect("load worker");
        }
    }
}

/// Cryptograms per second on `fronts` for [`PHASE`].
async fn throughput(fronts: &[Front], tag: &str, ledger: &Arc<Ledger>) -> f64 {
    let before = ledger.acks.load(Ordering::SeqCst);
    let started = Instant::now();
    let load = Load::start(fronts, tag, ledger);
    tokio::time::sleep(PHASE).await;
    load.stop().await;
    let done = ledger.acks.load(Ordering::SeqCst) - before;
    done as f64 / started.elapsed().as_secs_f64()
}

/// An admin call through a gateway, retried while custody behind it is unavailable.
async fn through_gateway<T, F, Fut>(mut call: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<T>, Status>>,
{
    let started = Instant::now();
    loop {
        match call().await {
            Ok(r) => return r.into_inner(),
            Err(s) if s.code() == Code::Unavailable && started.elapsed() < FAILOVER_TARGET => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(s) => panic!("through the gateway: {s:?}"),
        }
    }
}

/// The master key versions as a gateway sees them: version -> state.
async fn key_states(admin: &Admin) -> HashMap<u32, i32> {
    let keys = through_gateway(|| {
        let mut admin = admin.clone();
        async move {
            admin
                .list_master_keys(gw::ListMasterKeysRequest {
                    reference: KEY.into(),
                    include_retired: true,
                    ..Default::default()
                })
                .await
        }
    })
    .await;
    keys.keys
        .into_iter()
        .map(|k| (k.version, k.state))
        .collect()
}

/// Every cryptogram record: request id -> (sequence, outcome); asserts that no request and no
/// sequence number is recorded twice.
async fn cryptogram_records(client: &mut Custody) -> HashMap<String, (u64, i32)> {
    let mut recorded = HashMap::new();
    let mut sequences = HashSet::new();
    let mut token = String::new();
    loop {
        let page = client
            .query_audit(QueryAuditRequest {
                page: Some(PageRequest {
                    page_size: 1000,
                    page_token: token.clone(),
                }),
                ..Default::default()
            })
            .await
            .expect("query audit")
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

fn percentile(sorted: &[Duration], p: usize) -> Duration {
    sorted[(sorted.len() * p / 100).min(sorted.len() - 1)]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_of_everything_on_one_postgres_survive_custody_failovers() {
    let started = Instant::now();
    let pg = Postgres::shared();
    let mut system = ScaleOut::start(
        &pg,
        "[guards]\ncaller_rate_per_sec = 100000.0\ncaller_burst = 100000\n",
    )
    .await;
    let boot = started.elapsed();
    let pki = &system.pki;
    let admins: Vec<Admin> = system
        .gateways
        .iter()
        .map(|g| {
            AdminServiceClient::new(inproc::channel(
                pki.tls("operator/admin"),
                g.grpc,
                pki.id("gateway"),
            ))
        })
        .collect();
    let fronts: Vec<Front> = ["gateway-a", "gateway-b"]
        .into_iter()
        .map(|name| Front {
            name,
            custody: CustodyServiceClient::new(inproc::channel(
                pki.tls("gateway"),
                system.custody_service.addr,
                pki.id("custody"),
            )),
        })
        .collect();

    // Directory active/active: operators written through either gateway, read through each.
    for i in 0..10 {
        let mut admin = admins[i % 2].clone();
        admin
            .create_operator(gw::CreateOperatorRequest {
                operator: Some(Operator {
                    username: format!("helpdesk{i}"),
                    roles: vec!["helpdesk".into()],
                    ..Default::default()
                }),
            })
            .await
            .expect("create operator");
    }
    for admin in &admins {
        let listed = admin
            .clone()
            .list_operators(gw::ListOperatorsRequest {
                page: Some(PageRequest {
                    page_size: 100,
                    page_token: String::new(),
                }),
                ..Default::default()
            })
            .await
            .expect("list operators")
            .into_inner();
        let names: HashSet<String> = listed.operators.into_iter().map(|o| o.username).collect();
        for i in 0..10 {
            assert!(names.contains(&format!("helpdesk{i}")), "{names:?}");
        }
    }

    // Key ceremony through gateway A: version 1, then 2 as current, then 1 retired.
    let mut admin_a = admins[0].clone();
    admin_a
        .generate_master_key(gw::GenerateMasterKeyRequest {
            reference: KEY.into(),
            algorithm: KeyAlgorithm::Aes128 as i32,
            description: String::new(),
        })
        .await
        .expect("generate");
    let mut fronts_mut = fronts.clone();
    fronts_mut[0]
        .settled("v1-before-retirement", "card-v1", 1)
        .await
        .expect("version 1 serves before it is retired");
    admin_a
        .rotate_master_key(gw::RotateMasterKeyRequest {
            reference: KEY.into(),
            description: String::new(),
        })
        .await
        .expect("rotate");
    admin_a
        .retire_master_key_version(gw::RetireMasterKeyVersionRequest {
            reference: KEY.into(),
            version: 1,
            reason: "compromised".into(),
        })
        .await
        .expect("retire");

    // The card with the limit: 2 cryptograms through A before any failover.
    let limited = "card-with-a-limit";
    let mut limited_served = 0;
    for i in 0..2 {
        fronts_mut[0]
            .settled(&format!("limit-a{i}"), limited, 2)
            .await
            .expect("within the card's limit");
        limited_served += 1;
    }

    // Throughput: one front, then both, in this run.
    let ledger = Arc::new(Ledger::default());
    let one = throughput(&fronts[..1], "one", &ledger).await;
    let two = throughput(&fronts, "two", &ledger).await;

    // Failovers under load on both fronts.
    let mut to_ready = Vec::new();
    let mut to_served = Vec::new();
    let mut active = system.active_custody().await.expect("an active custody");
    for round in 0..FAILOVERS {
        let load = Load::start(&fronts, &format!("r{round}"), &ledger);
        tokio::time::sleep(Duration::from_millis(400)).await;
        let standby = 1 - active;
        assert_eq!(
            system.custody[standby].readyz().await,
            503,
            "round {round}: standby not standing by"
        );
        let killed_at = Instant::now();
        system.custody[active].kill().await;
        let acks_at_kill = ledger.acks.load(Ordering::SeqCst);
        wait_until(FAILOVER_TARGET, "the standby ready after SIGKILL", || {
            system.custody[standby].ready()
        })
        .await;
        to_ready.push(killed_at.elapsed());
        // Acknowledged after the kill: served by the new active one.
        wait_until(
            FAILOVER_TARGET,
            "a cryptogram acknowledged after SIGKILL",
            || {
                let ledger = ledger.clone();
                async move { ledger.acks.load(Ordering::SeqCst) > acks_at_kill }
            },
        )
        .await;
        to_served.push(killed_at.elapsed());

        // The version retired before the first failover stays retired, through both fronts
        // and as both gateways list it.
        for (i, front) in fronts_mut.iter_mut().enumerate() {
            let refused = front
                .settled(
                    &format!("retired-r{round}-{i}"),
                    &format!("card-retired-{round}-{i}"),
                    1,
                )
                .await
                .expect_err("a retired version must be refused after a failover");
            assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
            assert!(refused.message().contains("retired"), "{refused:?}");
        }
        for admin in &admins {
            let states = key_states(admin).await;
            assert_eq!(
                states.get(&1),
                Some(&(MasterKeyState::Retired as i32)),
                "{states:?}"
            );
            assert_eq!(
                states.get(&2),
                Some(&(MasterKeyState::Current as i32)),
                "{states:?}"
            );
        }

        // The card's limit, across fronts and failovers: 2 more through B after the first
        // failover, the fifth through A after the second, then refused everywhere.
        let wanted = match round {
            0 => 4,
            _ => CARD_LIMIT,
        };
        while limited_served < wanted {
            let front = &mut fronts_mut[(round + 1) % 2];
            front
                .settled(&format!("limit-r{round}-{limited_served}"), limited, 2)
                .await
                .expect("within the card's limit");
            limited_served += 1;
        }
        if round >= 1 {
            for (i, front) in fronts_mut.iter_mut().enumerate() {
                let refused = front
                    .settled(&format!("over-limit-r{round}-{i}"), limited, 2)
                    .await
                    .expect_err("a sixth cryptogram for the card must be refused");
                assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
            }
        }

        // The killed one comes back, as the standby.
        system.restart_custody(active).await;
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert_eq!(
            system.custody[active].readyz().await,
            503,
            "round {round}: the restarted instance must stand by\n{}",
            system.custody[active].log_tail()
        );
        load.stop().await;
        active = standby;
    }

    // Every acknowledged cryptogram is in the audit, once, with its sequence; the chain holds.
    let mut custody = fronts[1].custody.clone();
    let recorded = cryptogram_records(&mut custody).await;
    let acknowledged = ledger.acknowledged.lock().unwrap().clone();
    assert!(
        acknowledged.len() > 100,
        "too little load: {}",
        acknowledged.len()
    );
    for (request_id, seq) in &acknowledged {
        let (recorded_seq, outcome) = recorded
            .get(request_id)
            .unwrap_or_else(|| panic!("acknowledged {request_id} has no audit record"));
        assert_eq!(recorded_seq, seq, "{request_id}");
        assert_eq!(*outcome, AuditOutcome::Success as i32, "{request_id}");
    }
    let verdict = custody
        .verify_audit(VerifyAuditRequest::default())
        .await
        .expect("verify audit")
        .into_inner();
    assert!(verdict.ok, "{verdict:?}");

    to_ready.sort();
    to_served.sort();
    let refused = ledger.refused.lock().unwrap().clone();
    println!(
        "scale-out: 2 gateways, 2 directories, 2 templates, 2 custody (active/standby) on one PostgreSQL; started in {boot:.1?}\n\
         cryptograms/s (load at custody's Service with the gateway identity, {WORKERS_PER_FRONT} in flight per front): 1 front {one:.0}/s, 2 fronts {two:.0}/s ({:.2}x)\n\
         failover after SIGKILL of the active custody ({FAILOVERS}x): standby ready p50 {:?} max {:?}; first acknowledged cryptogram p50 {:?} max {:?}\n\
         {} cryptograms acknowledged, all recorded once; {} audit records verified; refused during failovers: {refused:?}; total {:.1?}",
        two / one,
        percentile(&to_ready, 50),
        to_ready.last().unwrap(),
        percentile(&to_served, 50),
        to_served.last().unwrap(),
        acknowledged.len(),
        verdict.records_checked,
        started.elapsed(),
    );
    let slowest = *to_served.last().unwrap();
    assert!(slowest < FAILOVER_TARGET, "slowest failover {slowest:?}");
}
