//! Offline unblock through the gateway (operator mTLS -> gateway -> directory, template,
//! custody with its durable audit) at 64 requests in flight, beside a bare mTLS echo baseline
//! (the gateway's gRPC health check on the same port and connection) in the same run: requests
//! per second, median and 99th percentile latency, and CPU time per request of each process.
//!
//! ```text
//! cargo build --release -p cms-launcher --bin cms
//! CMS_BIN_DIR=target/release cargo bench -p cms-tests --bench helpdesk_offline --profile dev
//! ```
//! `CMS_BIN_DIR` picks the service binaries (here the release `cms`; unset, the ones beside
//! the bench, i.e. debug builds under `--profile dev`): the services are what is measured, the
//! bench client only drives them. `CMS_BENCH_SECS` sets each phase's length (default 10 s),
//! `CMS_BENCH_IN_FLIGHT` the concurrency (default 64). The target: offline unblocks at >= 0.30x
//! the echo rate, p99 <= 25 ms, with release binaries.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use cms_cardcrypto::KeyAlgorithm;
use cms_kit::client::Channel;
use cms_kit::pki::LeafSpec;
use cms_proto::common::v1::{CardProfile, Flow, KeyAlgorithm as Alg, TypedCode};
use cms_proto::custody::v1::custody_service_client::CustodyServiceClient;
use cms_proto::directory::v1::{
    CreateOperatorRequest, CreateUserRequest, Credential, Operator, RegisterCredentialRequest, User,
};
use cms_proto::gateway::v1 as gw;
use cms_proto::gateway::v1::admin_service_client::AdminServiceClient;
use cms_proto::gateway::v1::helpdesk_service_client::HelpdeskServiceClient;
use cms_tests::cluster::Cluster;
use cms_tests::custody::{hex, import};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

const MASTER_KEY: &str = "404142434445464748494A4B4C4D4E4F";

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// user + system CPU time of a process, from /proc/<pid>/stat.
fn cpu(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which is in parentheses and may hold spaces).
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // utime and stime are fields 14 and 15 of stat: 11 and 12 after the name.
    let total = ticks(11) + ticks(12);
    // Linux reports these in USER_HZ, which is 100 on every architecture it supports.
    Duration::from_millis(total * 10)
}

struct Phase {
    name: &'static str,
    requests: u64,
    errors: u64,
    elapsed: Duration,
    latencies: Vec<Duration>,
    cpu: Vec<(&'static str, Duration)>,
}

impl Phase {
    fn rate(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64()
    }

    fn percentile(&self, p: f64) -> Duration {
        if self.latencies.is_empty() {
            return Duration::ZERO;
        }
        let i = ((self.latencies.len() as f64 - 1.0) * p).round() as usize;
        self.latencies[i]
    }

    fn print(&self) {
        println!(
            "{:<8} {:>9.0} req/s  p50 {:>6.2} ms  p99 {:>6.2} ms  ({} requests, {} errors)",
            self.name,
            self.rate(),
            self.percentile(0.50).as_secs_f64() * 1000.0,
            self.percentile(0.99).as_secs_f64() * 1000.0,
            self.requests,
            self.errors
        );
        for (process, time) in &self.cpu {
            if self.requests > 0 && !time.is_zero() {
                println!(
                    "         cpu {process:<10} {:>7.1} µs/request",
                    time.as_secs_f64() * 1e6 / self.requests as f64
                );
            }
        }
    }
}

/// Runs `one(i)` from `in_flight` tasks for `length`, measuring each call.
async fn run<F, Fut>(
    name: &'static str,
    cluster: &Cluster,
    in_flight: u64,
    length: Duration,
    one: F,
) -> Phase
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    let pids: Vec<(&'static str, u32)> = cluster
        .services
        .iter()
        .filter_map(|s| s.process.id().map(|p| (s.name, p)))
        .collect();
    let before: Vec<Duration> = pids.iter().map(|(_, p)| cpu(*p)).collect();
    let one = Arc::new(one);
    let counter = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..in_flight {
        let one = one.clone();
        let counter = counter.clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut errors = 0u64;
            while started.elapsed() < length {
                let i = counter.fetch_add(1, Ordering::Relaxed);
                let t = Instant::now();
                if one(i).await {
                    latencies.push(t.elapsed());
                } else {
                    errors += 1;
                }
            }
            (latencies, errors)
        }));
    }
    let mut latencies = Vec::new();
    let mut errors = 0;
    for task in tasks {
        let (l, e) = task.await.expect("task");
        latencies.extend(l);
        errors += e;
    }
    let elapsed = started.elapsed();
    latencies.sort_unstable();
    let cpu = pids
        .iter()
        .zip(before)
        .map(|((name, pid), before)| (*name, cpu(*pid).saturating_sub(before)))
        .collect();
    Phase {
        name,
        requests: latencies.len() as u64,
        errors,
        elapsed,
        latencies,
        cpu,
    }
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let length = Duration::from_secs(env_number("CMS_BENCH_SECS", 10));
    let in_flight = env_number("CMS_BENCH_IN_FLIGHT", 64);
    let cluster = Cluster::start(|name| match name {
        "gateway" => "[helpdesk]\noperator_requests_per_window = 1000000000\n".into(),
        "custody" => "[guards]\nper_card_limit = 1000000000\ncaller_rate_per_sec = 1000000.0\ncaller_burst = 1000000\n".into(),
        _ => String::new(),
    })
    .await;
    let gateway_id = cluster.pki.id("gateway");

    // One card under a 3DES gp-emv template, and an operator with the helpdesk role.
    let mut custody = CustodyServiceClient::new(cms_tests::inproc::channel(
        cluster.pki.tls("gateway"),
        cluster.grpc("custody"),
        cluster.pki.id("custody"),
    ));
    import(
        &mut custody,
        "mk-bench",
        KeyAlgorithm::Tdes2Key,
        &hex(MASTER_KEY),
    )
    .await;
    let mut admin = AdminServiceClient::new(cms_tests::inproc::channel(
        cluster.pki.tls("operator/admin"),
        cluster.grpc("gateway"),
        gateway_id.clone(),
    ));
    let mut spec = cms_template::sample::minidriver("Bench");
    let key = spec.admin_key.as_mut().expect("admin key");
    key.master_key_reference = "mk-bench".into();
    key.algorithm = Alg::Tdes2key as i32;
    spec.unblock_policy
        .as_mut()
        .expect("policy")
        .rate_limits
        .clear();
    let template = admin
        .create_template(gw::CreateTemplateRequest {
            spec: Some(spec),
            change_comment: String::new(),
        })
        .await
        .expect("template")
        .into_inner()
        .template
        .expect("template");
    let mut directory =
        cms_launcher::bootstrap::directory_client(&cluster.layout, cluster.grpc("directory"))
            .expect("directory client");
    let user = directory
        .create_user(CreateUserRequest {
            user: Some(User {
                username: "bench".into(),
                display_name: "Bench User".into(),
                ..Default::default()
            }),
            auth: None,
        })
        .await
        .expect("user")
        .into_inner()
        .user
        .expect("user");
    let card = directory
        .register_credential(RegisterCredentialRequest {
            credential: Some(Credential {
                user_id: user.id.clone(),
                card_id: hex("00010203040506070809"),
                serial: "BENCH-1".into(),
                profile: CardProfile::Minidriver as i32,
                template_id: template.id.clone(),
                template_version: template.version,
                master_key_version: 1,
                ..Default::default()
            }),
            auth: None,
        })
        .await
        .expect("card")
        .into_inner()
        .credential
        .expect("card");
    directory
        .create_operator(CreateOperatorRequest {
            operator: Some(Operator {
                username: "bench-desk".into(),
                roles: vec!["helpdesk".into()],
                ..Default::default()
            }),
            auth: None,
        })
        .await
        .expect("operator");
    let tls = cluster.pki.issue(
        "operator-bench-desk",
        &LeafSpec::new(cluster.pki.id("operator/bench-desk"), 30),
    );
    let channel: Channel = cms_tests::inproc::channel(tls, cluster.grpc("gateway"), gateway_id);
    // Operator accounts are re-read every 10 s by default.
    tokio::time::sleep(Duration::from_secs(11)).await;
    let helpdesk = HelpdeskServiceClient::new(channel.clone());
    let health = HealthClient::new(channel);
    // Warm up the connections behind the gateway.
    let warm = bench_request(&user.id, &card.id, u64::MAX);
    helpdesk
        .clone()
        .compute_offline_response(warm)
        .await
        .expect("a first offline response");

    let echo = run("echo", &cluster, in_flight, length, move |_| {
        let mut health = health.clone();
        async move {
            health
                .check(HealthCheckRequest {
                    service: String::new(),
                })
                .await
                .is_ok()
        }
    })
    .await;
    let (user_id, card_id) = (user.id.clone(), card.id.clone());
    let first_error = Arc::new(std::sync::Mutex::new(None::<String>));
    let fe = first_error.clone();
    let offline = run("offline", &cluster, in_flight, length, move |i| {
        let mut helpdesk = helpdesk.clone();
        let request = bench_request(&user_id, &card_id, i);
        let fe = fe.clone();
        async move {
            match helpdesk.compute_offline_response(request).await {
                Ok(_) => true,
                Err(status) => {
                    fe.lock()
                        .expect("lock")
                        .get_or_insert_with(|| format!("{status:?}"));
                    false
                }
            }
        }
    })
    .await;
    println!("in flight: {in_flight}, {} s per phase", length.as_secs());
    echo.print();
    offline.print();
    println!(
        "offline / echo: {:.2}x (target >= 0.30x), offline p99 {:.1} ms (target <= 25 ms)",
        offline.rate() / echo.rate(),
        offline.percentile(0.99).as_secs_f64() * 1000.0
    );
    if let Some(error) = first_error.lock().expect("lock").take() {
        println!("first offline error: {error}");
    }
    cluster.stop().await;
}

/// An offline request with a challenge unique to `i` (custody refuses a repeated one).
fn bench_request(user_id: &str, card_id: &str, i: u64) -> gw::ComputeOfflineResponseRequest {
    let challenge = i.to_be_bytes();
    gw::ComputeOfflineResponseRequest {
        user_id: user_id.into(),
        credential_id: card_id.into(),
        challenge: Some(TypedCode {
            hex: cms_cardcrypto::format_groups(&challenge),
            checksum: cms_cardcrypto::checksum(&challenge),
        }),
        flow: Flow::OfflineHelpdesk as i32,
        approval_id: String::new(),
        ticket_reference: String::new(),
    }
}
