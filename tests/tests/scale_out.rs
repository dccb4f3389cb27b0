//! The server side scaled out on one machine, as the Helm chart runs it on PostgreSQL: one
//! PostgreSQL, two gateways, two directories, two templates and two custody instances
//! (active/standby), all real processes over mutual TLS (`cms_tests::scale`).
//!
//! - Key administration goes through gateway A (generate, rotate, retire a version); the
//!   directory is written through both gateways and read back through each (active/active).
//! - Offline-style load: helpdesk operators' ComputeOfflineResponse calls through both
//!   gateways (each reads the card and template from its own directory and template, keeps
//!   its workflow state in the gateways' shared database, and calls custody through the one
//!   custody Service). The figure: cryptograms/s through two gateways against one, in the
//!   same run.
//! - The active custody is SIGKILLed 5 times under load. Each time the standby takes over
//!   within 5 s (measured to its /readyz and to the first acknowledged cryptogram), the killed
//!   one comes back as the standby, both gateways reach custody again, and a master key
//!   version retired before the first failover is refused after each one.
//! - A card's limit of 5 cryptograms holds across gateways and failovers.
//! - At the end every acknowledged cryptogram has exactly one audit record (success), no
//!   sequence number is recorded twice, and the chain verifies.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use cms_kit::client::Channel;
use cms_kit::pki::LeafSpec;
use cms_proto::common::v1::{
    CardProfile, DiversificationScheme, Flow, KeyAlgorithm, PageRequest, TypedCode,
};
use cms_proto::custody::v1::custody_service_client::CustodyServiceClient;
use cms_proto::custody::v1::{
    AuditEvent, AuditOutcome, MasterKeyState, QueryAuditRequest, VerifyAuditRequest,
};
use cms_proto::directory::v1::directory_service_client::DirectoryServiceClient;
use cms_proto::directory::v1::{
    CreateOperatorRequest, CreateUserRequest, Credential, Operator, OperatorScope,
    RegisterCredentialRequest, User,
};
use cms_proto::gateway::v1 as gw;
use cms_proto::gateway::v1::admin_service_client::AdminServiceClient;
use cms_proto::gateway::v1::helpdesk_service_client::HelpdeskServiceClient;
use cms_tests::inproc;
use cms_tests::postgres::Postgres;
use cms_tests::scale::{ScaleOut, wait_until};
use tonic::metadata::MetadataValue;
use tonic::{Code, Status};

const FAILOVERS: usize = 5;
/// Concurrent requests per gateway, each from its own helpdesk operator (the gateways count
/// each operator's calls in their shared database: one operator for all the load would make
/// its counter row the bottleneck, which no helpdesk is).
const WORKERS_PER_GATEWAY: usize = 6;
const FAILOVER_TARGET: Duration = Duration::from_secs(5);
/// Length of each throughput phase (one gateway, then two, twice).
const PHASE: Duration = Duration::from_millis(2000);
/// custody's default per-card limit (cryptograms per card per day).
const CARD_LIMIT: usize = 5;
/// Load cards, each used at most [`USES_PER_CARD`] times (below the limit, so that a
/// request custody recorded but could not answer during a failover never makes a later one
/// hit the limit), [`CARDS_PER_USER`] per card holder.
const FIRST_CARDS: usize = 400;
const USES_PER_CARD: usize = 4;
/// Most requests of one throughput phase (the cards it may use are registered first).
const PHASE_QUOTA: i64 = 400;
/// Load time to provide cards for in each failover round, at the measured rate.
const ROUND_LOAD: Duration = Duration::from_secs(6);
/// Cards per card holder (a user's search entry is rebuilt with each card registered).
const CARDS_PER_USER: usize = 10;
const KEY: &str = "mk";
const ORG_UNIT: &str = "Operations";

type Custody = CustodyServiceClient<Channel>;
type Admin = AdminServiceClient<Channel>;
type Directory = DirectoryServiceClient<Channel>;

/// Cards for the load, handed out [`USES_PER_CARD`] times each.
#[derive(Default)]
struct CardPool {
    cards: RwLock<Vec<Credential>>,
    next: AtomicUsize,
}

impl CardPool {
    fn take(&self) -> Credential {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        self.cards
            .read()
            .unwrap()
            .get(n / USES_PER_CARD)
            .cloned()
            .expect("the load used every card: provide more (ROUND_LOAD, PHASE_QUOTA)")
    }

    fn uses_left(&self) -> usize {
        let uses = self.cards.read().unwrap().len() * USES_PER_CARD;
        uses.saturating_sub(self.next.load(Ordering::Relaxed))
    }

    fn add(&self, cards: Vec<Credential>) {
        self.cards.write().unwrap().extend(cards);
    }
}

/// Where load enters: a helpdesk operator's connection to one gateway.
#[derive(Clone)]
struct Front {
    name: &'static str,
    helpdesk: HelpdeskServiceClient<Channel>,
}

static CHALLENGES: AtomicU64 = AtomicU64::new(1);

impl Front {
    /// An offline response for `card` (a challenge never sent before), as request
    /// `request_id`: Ok once the gateway answered with the response and that request id.
    async fn offline(&mut self, request_id: &str, card: &Credential) -> Result<(), Status> {
        let mut challenge = [0u8; 16];
        challenge[..8].copy_from_slice(&CHALLENGES.fetch_add(1, Ordering::Relaxed).to_be_bytes());
        let mut request = tonic::Request::new(gw::ComputeOfflineResponseRequest {
            user_id: card.user_id.clone(),
            credential_id: card.id.clone(),
            challenge: Some(TypedCode {
                hex: cms_cardcrypto::format_groups(&challenge),
                checksum: cms_cardcrypto::checksum(&challenge),
            }),
            flow: Flow::OfflineHelpdesk as i32,
            approval_id: String::new(),
            ticket_reference: "INC-SCALE".into(),
        });
        request.metadata_mut().insert(
            "x-request-id",
            MetadataValue::try_from(request_id).expect("ascii id"),
        );
        let answer = self
            .helpdesk
            .compute_offline_response(request)
            .await?
            .into_inner();
        assert_eq!(answer.request_id, request_id);
        assert_eq!(
            answer.response.expect("a response").hex.len(),
            39,
            "16 bytes in groups of 4"
        );
        Ok(())
    }

    /// As [`Front::offline`], retried while the failover shows (see [`failing_over`]), for at
    /// most the failover target.
    async fn settled(&mut self, request_id: &str, card: &Credential) -> Result<(), Status> {
        let started = Instant::now();
        let mut attempt = 0;
        loop {
            attempt += 1;
            let id = format!("{request_id}-try{attempt}");
            match self.offline(&id, card).await {
                Err(s) if failing_over(&s) && started.elapsed() < FAILOVER_TARGET => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                other => return other,
            }
        }
    }
}

/// What the load saw: acknowledged request ids, and refusals by code.
#[derive(Default)]
struct Ledger {
    acknowledged: Mutex<HashSet<String>>,
    acks: AtomicU64,
    refused: Mutex<HashMap<Code, u64>>,
    /// One message per refusal code, for the figures.
    samples: Mutex<HashMap<Code, String>>,
}

/// Load through `fronts` ([`WORKERS_PER_GATEWAY`] each, cards from `pool`) until stopped.
struct Load {
    stop: Arc<AtomicBool>,
    workers: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    /// Starts the workers; together they send at most `quota` requests.
    fn start(
        fronts: &[Vec<Front>],
        tag: &str,
        quota: i64,
        pool: &Arc<CardPool>,
        ledger: &Arc<Ledger>,
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let left = Arc::new(AtomicI64::new(quota));
        let mut workers = Vec::new();
        for gateway in fronts {
            for (w, front) in gateway.iter().enumerate() {
                let mut front = front.clone();
                let (pool, ledger, stop) = (pool.clone(), ledger.clone(), stop.clone());
                let left = left.clone();
                let prefix = format!("{tag}-{}-w{w}", front.name);
                workers.push(tokio::spawn(async move {
                    let mut n = 0u32;
                    while !stop.load(Ordering::Relaxed) && left.fetch_sub(1, Ordering::Relaxed) > 0
                    {
                        n += 1;
                        let id = format!("{prefix}-{n}");
                        match front.offline(&id, &pool.take()).await {
                            Ok(()) => {
                                let fresh = ledger.acknowledged.lock().unwrap().insert(id.clone());
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
                                ledger
                                    .samples
                                    .lock()
                                    .unwrap()
                                    .entry(status.code())
                                    .or_insert_with(|| status.message().to_owned());
                                tokio::time::sleep(Duration::from_millis(5)).await;
                            }
                        }
                    }
                }));
            }
        }
        Self { stop, workers }
    }

    fn finished(&self) -> bool {
        self.workers.iter().all(|w| w.is_finished())
    }

    async fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        for w in self.workers {
            w.await.expect("load worker");
        }
    }
}

/// Cryptograms per second on `fronts` for [`PHASE`] (or [`PHASE_QUOTA`] requests).
async fn throughput(
    fronts: &[Vec<Front>],
    tag: &str,
    pool: &Arc<CardPool>,
    ledger: &Arc<Ledger>,
) -> f64 {
    let before = ledger.acks.load(Ordering::SeqCst);
    let started = Instant::now();
    let load = Load::start(fronts, tag, PHASE_QUOTA, pool, ledger);
    while started.elapsed() < PHASE && !load.finished() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    load.stop().await;
    let done = ledger.acks.load(Ordering::SeqCst) - before;
    done as f64 / started.elapsed().as_secs_f64()
}

/// What a caller sees while custody fails over: UNAVAILABLE from the gateway (custody
/// refused or unreachable), or a connection to the old active instance that broke under a
/// call in flight (the gateway passes it on as UNKNOWN "transport error", or CANCELLED).
fn failing_over(status: &Status) -> bool {
    matches!(
        status.code(),
        Code::Unavailable | Code::Unknown | Code::Cancelled
    )
}

/// An admin call through a gateway, retried while custody behind it fails over.
async fn through_gateway<T, F, Fut>(mut call: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<T>, Status>>,
{
    let started = Instant::now();
    loop {
        match call().await {
            Ok(r) => return r.into_inner(),
            Err(s) if failing_over(&s) && started.elapsed() < FAILOVER_TARGET => {
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

/// Every cryptogram record: request id -> outcome; asserts that no request and no sequence
/// number is recorded twice.
async fn cryptogram_records(client: &mut Custody) -> HashMap<String, i32> {
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
                let previous = recorded.insert(ctx.request_id.clone(), r.outcome);
                assert!(previous.is_none(), "{} recorded twice", ctx.request_id);
            }
        }
        token = page.page.unwrap_or_default().next_page_token;
        if token.is_empty() {
            return recorded;
        }
    }
}

/// Card holders `<prefix>-0..<prefix>-<count>` in [`ORG_UNIT`], 16 at a time, alternating
/// between the directories.
async fn create_users(directories: &[Directory], prefix: &str, count: usize) -> Vec<User> {
    let mut users = Vec::new();
    let names: Vec<String> = (0..count).map(|i| format!("{prefix}-{i}")).collect();
    for chunk in names.chunks(16) {
        let mut calls = Vec::new();
        for (i, username) in chunk.iter().enumerate() {
            let mut directory = directories[i % directories.len()].clone();
            let user = User {
                username: username.clone(),
                display_name: format!("Card Holder {username}"),
                email: format!("{username}@example.com"),
                org_unit: ORG_UNIT.into(),
                ..Default::default()
            };
            calls.push(tokio::spawn(async move {
                directory
                    .create_user(CreateUserRequest {
                        user: Some(user),
                        auth: None,
                    })
                    .await
                    .expect("create user")
                    .into_inner()
                    .user
                    .expect("user")
            }));
        }
        for call in calls {
            users.push(call.await.expect("create user"));
        }
    }
    users
}

/// `count` more load cards under `template` (master key version 2), [`CARDS_PER_USER`] per
/// new card holder named `<tag>-…`.
async fn load_cards(
    directories: &[Directory],
    template: &cms_proto::template::v1::Template,
    tag: &str,
    count: usize,
) -> Vec<Credential> {
    let holders = create_users(directories, tag, count.div_ceil(CARDS_PER_USER)).await;
    let to_register = (0..count)
        .map(|i| {
            (
                holders[i / CARDS_PER_USER].id.clone(),
                format!("{tag}-card-{i}"),
            )
        })
        .collect();
    register_cards(directories, template, 2, to_register).await
}

/// The offline template of the load: AES-128 cards under master key [`KEY`], no rate limits
/// of its own (custody's per-card limit is the one under test), no dual control.
async fn offline_template(admin: &mut Admin) -> cms_proto::template::v1::Template {
    let mut spec = cms_template::sample::minidriver("Scale-out offline");
    let key = spec.admin_key.as_mut().expect("admin key");
    key.master_key_reference = KEY.into();
    key.algorithm = KeyAlgorithm::Aes128 as i32;
    key.diversification_scheme = DiversificationScheme::Sp800108Cmac as i32;
    key.master_key_version = 0;
    let policy = spec.unblock_policy.as_mut().expect("unblock policy");
    policy.rate_limits.clear();
    policy.offline_challenge_response_allowed = true;
    if let Some(op) = policy.operator_policy.as_mut() {
        op.dual_control = false;
    }
    admin
        .create_template(gw::CreateTemplateRequest {
            spec: Some(spec),
            change_comment: "scale-out test".into(),
        })
        .await
        .expect("create template")
        .into_inner()
        .template
        .expect("template")
}

/// Registers the cards `(owner id, name)` under `template` and master key `version`, 16 at
/// a time, alternating between the directories.
async fn register_cards(
    directories: &[Directory],
    template: &cms_proto::template::v1::Template,
    version: u32,
    to_register: Vec<(String, String)>,
) -> Vec<Credential> {
    let mut cards = Vec::new();
    for chunk in to_register.chunks(16) {
        let mut calls = Vec::new();
        for (i, (owner, name)) in chunk.iter().enumerate() {
            let mut directory = directories[i % directories.len()].clone();
            let credential = Credential {
                user_id: owner.clone(),
                card_id: name.as_bytes().to_vec(),
                serial: name.clone(),
                profile: CardProfile::Minidriver as i32,
                template_id: template.id.clone(),
                template_version: template.version,
                master_key_version: version,
                ..Default::default()
            };
            calls.push(tokio::spawn(async move {
                directory
                    .register_credential(RegisterCredentialRequest {
                        credential: Some(credential),
                        auth: None,
                    })
                    .await
                    .expect("register card")
                    .into_inner()
                    .credential
                    .expect("credential")
            }));
        }
        for call in calls {
            cards.push(call.await.expect("register"));
        }
    }
    cards
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
        // The load operator's workflow calls are counted (in the gateways' database) far
        // above the load; account changes show within the test.
        "[operators]\ncache_ttl_ms = 200\n\n[helpdesk]\noperator_requests_per_window = 10000000\n",
    )
    .await;
    let boot = started.elapsed();
    let pki = &system.pki;
    let gateway_channel =
        |i: usize, tls| inproc::channel(tls, system.gateways[i].grpc, pki.id("gateway"));
    let admins: Vec<Admin> = (0..2)
        .map(|i| AdminServiceClient::new(gateway_channel(i, pki.tls("operator/admin"))))
        .collect();
    let directories: Vec<Directory> = system
        .directories
        .iter()
        .map(|d| {
            DirectoryServiceClient::new(inproc::channel(
                pki.tls("gateway"),
                d.grpc,
                pki.id("directory"),
            ))
        })
        .collect();

    // Directory active/active: operators written through either gateway, read through each.
    for i in 0..10 {
        admins[i % 2]
            .clone()
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

    // Key ceremony through gateway A; a template, a user, an operator and cards.
    let mut admin_a = admins[0].clone();
    admin_a
        .generate_master_key(gw::GenerateMasterKeyRequest {
            reference: KEY.into(),
            algorithm: KeyAlgorithm::Aes128 as i32,
            description: String::new(),
        })
        .await
        .expect("generate");
    let template = offline_template(&mut admin_a).await;
    let preparing = Instant::now();
    let users = create_users(&directories, "holder", 1).await;
    let user = &users[0];

    // Helpdesk operators, one per load worker, with their certificates.
    let mut fronts: Vec<Vec<Front>> = vec![Vec::new(), Vec::new()];
    for (g, name) in ["gateway-a", "gateway-b"].into_iter().enumerate() {
        for w in 0..WORKERS_PER_GATEWAY {
            let username = format!("load-{g}-{w}");
            directories[g]
                .clone()
                .create_operator(CreateOperatorRequest {
                    operator: Some(Operator {
                        username: username.clone(),
                        roles: vec!["helpdesk".into()],
                        scope: Some(OperatorScope {
                            org_units: vec![ORG_UNIT.into()],
                            template_ids: Vec::new(),
                        }),
                        ..Default::default()
                    }),
                    auth: None,
                })
                .await
                .expect("create a load operator");
            let tls = pki.issue(
                &format!("operator-{username}"),
                &LeafSpec::new(pki.id(&format!("operator/{username}")), 30),
            );
            fronts[g].push(Front {
                name,
                helpdesk: HelpdeskServiceClient::new(gateway_channel(g, tls)),
            });
        }
    }

    // The gateways read operator accounts through a cache (cache_ttl_ms = 200 above): the
    // load operators exist for them once it has expired.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let v1_card = register_cards(
        &directories,
        &template,
        1,
        vec![(user.id.clone(), "card-on-v1".into())],
    )
    .await
    .remove(0);
    fronts[0][0]
        .settled("v1-before-retirement", &v1_card)
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
    let limited = register_cards(
        &directories,
        &template,
        2,
        vec![(user.id.clone(), "card-with-a-limit".into())],
    )
    .await
    .remove(0);
    let pool = Arc::new(CardPool::default());
    pool.add(load_cards(&directories, &template, "first", FIRST_CARDS).await);
    let prepared_in = preparing.elapsed();

    // The card with the limit: 2 cryptograms through gateway A before any failover.
    let mut limited_served = 0;
    while limited_served < 2 {
        fronts[0][0]
            .settled(&format!("limit-a{limited_served}"), &limited)
            .await
            .expect("within the card's limit");
        limited_served += 1;
    }

    // Throughput: one gateway, then both, in this run.
    let ledger = Arc::new(Ledger::default());
    // Interleaved (1, 2, 1, 2) so that a warm-up or a burst of other work on the machine
    // does not land on one side only.
    let (mut one, mut two) = (0.0, 0.0);
    for turn in 0..2 {
        one += throughput(&fronts[..1], &format!("one{turn}"), &pool, &ledger).await / 2.0;
        two += throughput(&fronts, &format!("two{turn}"), &pool, &ledger).await / 2.0;
    }

    // For the audit at the end: custody through its Service, as the gateways reach it.
    let mut custody: Custody = CustodyServiceClient::new(inproc::channel(
        pki.tls("gateway"),
        system.custody_service.addr,
        pki.id("custody"),
    ));

    // Cards for the failover rounds, at the rate just measured (with a margin).
    let wanted = (one.max(two) * ROUND_LOAD.as_secs_f64() * FAILOVERS as f64 * 1.5) as usize;
    let more = wanted
        .saturating_sub(pool.uses_left())
        .div_ceil(USES_PER_CARD);
    if more > 0 {
        pool.add(load_cards(&directories, &template, "more", more).await);
    }
    let cards_made = pool.cards.read().unwrap().len() + 2;

    // Failovers under load through both gateways.
    let mut to_ready = Vec::new();
    let mut to_served = Vec::new();
    let mut active = system.active_custody().await.expect("an active custody");
    for round in 0..FAILOVERS {
        let load = Load::start(&fronts, &format!("r{round}"), i64::MAX, &pool, &ledger);
        tokio::time::sleep(Duration::from_millis(400)).await;
        let standby = 1 - active;
        assert_eq!(
            system.custody[standby].readyz().await,
            503,
            "round {round}: the standby is not standing by"
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

        // The version retired before the first failover stays retired, through both
        // gateways, and both list it so.
        for gateway in fronts.iter_mut() {
            let front = &mut gateway[0];
            let refused = front
                .settled(&format!("retired-r{round}-{}", front.name), &v1_card)
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

        // The card's limit, across gateways and failovers: 2 more through B after the first
        // failover, the fifth through A after the second, then refused through both.
        let wanted = if round == 0 { 4 } else { CARD_LIMIT };
        while limited_served < wanted {
            let front = &mut fronts[(round + 1) % 2][0];
            front
                .settled(&format!("limit-r{round}-{limited_served}"), &limited)
                .await
                .expect("within the card's limit");
            limited_served += 1;
        }
        if round >= 1 {
            for gateway in fronts.iter_mut() {
                let front = &mut gateway[0];
                let refused = front
                    .settled(&format!("over-limit-r{round}-{}", front.name), &limited)
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

    // Every acknowledged cryptogram is in the audit, once; the chain holds.
    let recorded = cryptogram_records(&mut custody).await;
    let acknowledged = ledger.acknowledged.lock().unwrap().clone();
    assert!(
        acknowledged.len() > 100,
        "too little load: {}",
        acknowledged.len()
    );
    for request_id in &acknowledged {
        let outcome = recorded
            .get(request_id)
            .unwrap_or_else(|| panic!("acknowledged {request_id} has no audit record"));
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
    let samples = ledger.samples.lock().unwrap().clone();
    // The figures depend on what else the machine runs: its load is part of them.
    let load_average = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "scale-out: 2 gateways, 2 directories, 2 templates, 2 custody (active/standby) on one PostgreSQL; started in {boot:.1?}; {} cards ({} per holder) and {} operators, the first {FIRST_CARDS} made in {prepared_in:.1?}\n\
         offline responses/s through the gateways ({WORKERS_PER_GATEWAY} in flight per gateway): 1 gateway {one:.0}/s, 2 gateways {two:.0}/s ({:.2}x)\n\
         failover after SIGKILL of the active custody ({FAILOVERS}x): standby ready p50 {:?} max {:?}; first acknowledged cryptogram p50 {:?} max {:?}\n\
         {} cryptograms acknowledged, each recorded once; {} audit records verified; refused under load: {refused:?} (e.g. {samples:?}); total {:.1?}; load average {}",
        cards_made,
        CARDS_PER_USER,
        2 * WORKERS_PER_GATEWAY,
        two / one,
        percentile(&to_ready, 50),
        to_ready.last().unwrap(),
        percentile(&to_served, 50),
        to_served.last().unwrap(),
        acknowledged.len(),
        verdict.records_checked,
        started.elapsed(),
        load_average
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" "),
    );
    let slowest = *to_served.last().unwrap();
    assert!(slowest < FAILOVER_TARGET, "slowest failover {slowest:?}");
}
