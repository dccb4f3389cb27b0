//! Custody killed with SIGKILL 20 times under a load of cryptogram requests. Afterwards every
//! response a client received has its audit record (same sequence, same request id), no
//! request is recorded twice, the chain verifies, and each restart was ready within 5 s.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cms_launcher::layout::{Layout, Peers, Ports};
use cms_launcher::supervise::{self, Service};
use cms_proto::common::v1::{ActorKind, AuthContext, DiversificationScheme, KeyAlgorithm};
use cms_proto::custody::v1::custody_service_client::CustodyServiceClient;
use cms_proto::custody::v1::*;
use cms_tests::inproc;
use cms_tests::pki::{TRUST_DOMAIN, TestPki};

const KILLS: usize = 20;
const WORKERS: usize = 8;

async fn start(layout: &Layout) -> (Service, Duration) {
    let started = Instant::now();
    let service = supervise::start(
        &cms_tests::binary("cms"),
        layout,
        "custody",
        Duration::from_secs(30),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    (service, started.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_answered_cryptogram_survives_sigkill_in_the_audit() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new(dir.path());
    let layout = Layout::new(dir.path(), TRUST_DOMAIN).unwrap();
    layout.create_dirs().unwrap();
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let config = layout
        .service_config(
            "custody",
            Ports {
                grpc: any,
                ops: any,
            },
            &Peers::default(),
            "",
        )
        .unwrap()
        + "[guards]\ncaller_rate_per_sec = 100000.0\ncaller_burst = 100000\n";
    std::fs::write(layout.config_path("custody"), &config).unwrap();
    let (mut custody, _) = start(&layout).await;
    // Later starts reuse the address, so clients reconnect to it.
    let pinned = config.replacen(
        "\nlisten = \"127.0.0.1:0\"",
        &format!("\nlisten = \"{}\"", custody.grpc),
        1,
    );
    std::fs::write(layout.config_path("custody"), pinned).unwrap();

    let client = CustodyServiceClient::new(inproc::channel(
        pki.tls("gateway"),
        custody.grpc,
        pki.id("custody"),
    ));
    let key = client
        .clone()
        .generate_master_key(GenerateMasterKeyRequest {
            reference: "mk".into(),
            algorithm: KeyAlgorithm::Aes128 as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .key
        .unwrap();

    // request id -> audit sequence, for every response received.
    let answered: Arc<Mutex<HashMap<String, u64>>> = Arc::default();
    let mut slowest_restart = Duration::ZERO;
    for round in 0..KILLS {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut workers = Vec::new();
        for worker in 0..WORKERS {
            let mut client = client.clone();
            let answered = answered.clone();
            let stop = stop.clone();
            let version = key.version;
            workers.push(tokio::spawn(async move {
                let mut n = 0u32;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    n += 1;
                    let request_id = format!("r{round}-w{worker}-{n}");
                    let mut challenge = [0u8; 16];
                    challenge[..4].copy_from_slice(&n.to_be_bytes());
                    let request = ComputeCryptogramRequest {
                        card_id: request_id.clone().into_bytes(),
                        challenge: challenge.to_vec(),
                        master_key_reference: "mk".into(),
                        master_key_version: version,
                        scheme: DiversificationScheme::Sp800108Cmac as i32,
                        admin_key_algorithm: KeyAlgorithm::Aes128 as i32,
                        auth: Some(AuthContext {
                            actor_kind: ActorKind::Service as i32,
                            request_id: request_id.clone(),
                            ..Default::default()
                        }),
                        challenge_code: None,
                    };
                    match client.compute_cryptogram(request).await {
                        Ok(r) => {
                            let seq = r.into_inner().audit_sequence;
                            assert!(answered.lock().unwrap().insert(request_id, seq).is_none());
                        }
                        Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
                    }
                }
            }));
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
        custody.process.start_kill().unwrap();
        custody.process.wait().await.unwrap();
        let (restarted, took) = start(&layout).await;
        custody = restarted;
        slowest_restart = slowest_restart.max(took);
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for w in workers {
            w.await.unwrap();
        }
    }

    // Read the whole audit back.
    let mut client = client;
    let mut recorded: HashMap<String, (u64, i32)> = HashMap::new();
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
            let ctx = r.context.unwrap_or_default();
            if r.event == AuditEvent::Cryptogram as i32 && !ctx.request_id.is_empty() {
                let previous = recorded.insert(ctx.request_id.clone(), (r.sequence, r.outcome));
                assert!(
                    previous.is_none(),
                    "request {} recorded twice",
                    ctx.request_id
                );
            }
        }
        token = page.page.unwrap_or_default().next_page_token;
        if token.is_empty() {
            break;
        }
    }
    let answered = answered.lock().unwrap().clone();
    assert!(
        answered.len() > KILLS * 10,
        "too little load: {} answers",
        answered.len()
    );
    for (request_id, seq) in &answered {
        let (recorded_seq, outcome) = recorded
            .get(request_id)
            .unwrap_or_else(|| panic!("answered request {request_id} has no audit record"));
        assert_eq!(recorded_seq, seq, "{request_id}");
        assert_eq!(*outcome, AuditOutcome::Success as i32);
    }
    let verdict = client
        .verify_audit(VerifyAuditRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(verdict.ok, "{verdict:?}");
    assert!(
        slowest_restart < Duration::from_secs(5),
        "slowest restart to ready: {slowest_restart:?}"
    );
    println!(
        "{} answered cryptograms across {KILLS} SIGKILLs, {} audit records, slowest restart to ready {slowest_restart:?}",
        answered.len(),
        verdict.records_checked
    );
}
